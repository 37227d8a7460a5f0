"""Confine the daemon process the way virtiofsd does (Linux only).

Three modes, chosen with ``--sandbox``:

``namespace`` (the default)
    The process enters a new pid namespace (it forks: the child is pid 1 of
    the namespace and serves; the parent stays outside as a *supervisor*
    that forwards SIGTERM/SIGINT/SIGHUP/SIGQUIT to the child, waits for it,
    runs its cleanup and exits with the child's status), then the child
    enters new mount and network namespaces, makes every mount a recursive
    *slave* (so nothing it mounts leaks to the host, while mounts the host
    adds inside the shared directory later, as kata-containers does, still
    propagate in), bind-mounts the shared directory onto itself and
    ``pivot_root``\\s into it: afterwards the daemon's ``/`` *is* the shared
    directory and no path reaches anything outside it.

    Not root: the supervisor first enters a new *user* namespace in which
    its own uid and gid map to themselves (as the Rust virtiofsd does
    without ``--uid-map``), which gives it the right to build the other
    namespaces. Where unprivileged user namespaces are disabled this fails
    with a clear error (use ``--sandbox none``).

``chroot``
    ``chroot(2)`` into the shared directory (for containers whose runtime
    already set up namespaces); needs root (CAP_SYS_CHROOT).

``none``
    Nothing: the backend serves the shared directory by its host path.

The backend is built *inside* the sandbox's namespaces but *before* the
root switch (``enter(..., prepare=...)``): a passthrough backend opens its
root directory and ``/proc/self/fd`` there, by their host paths, and those
fds stay valid afterwards, as the C and Rust virtiofsd keep theirs. In
``namespace`` mode ``/proc`` is, at that moment, a read-only tmpfs holding
only ``self/fd`` and ``self/fdinfo``: binds of this process's own fd
directories from a fresh procfs of the new pid namespace. So the path
``/proc/self/fd`` works (``../fdinfo/N`` from it too: the lock list of an
fd), and an fd to it reaches nothing else of /proc (no /proc/sys, no other
process).
Paths are resolved before the switch only: after it, ``/`` is the shared
directory, and a backend must reach /proc through the fd it kept
(:attr:`Sandbox.proc_self_fd` is one more such ``O_PATH`` fd: use
``os.open(str(n), flags, dir_fd=proc_self_fd)``).

Capabilities: :func:`drop_capabilities` keeps only what a passthrough
daemon needs (:data:`DEFAULT_CAPABILITIES`, plus ``dac_read_search`` for
file handles, as virtiofsd does), in the effective, permitted and bounding
sets, clears the inheritable and ambient sets and sets ``no_new_privs``.
Capabilities are per thread: call it before any thread is started.

Everything here is plain syscalls through ctypes (``os.unshare`` only
exists from Python 3.12).
"""
from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import signal
import sys
from typing import Any, Callable, Iterable, Sequence

import attrs

from .runtime.base import preload_unwinder

log = logging.getLogger("virtiofs_async.sandbox")

__all__ = [
    "CAPABILITIES",
    "DEFAULT_CAPABILITIES",
    "MODES",
    "Sandbox",
    "SandboxError",
    "capability_sets",
    "drop_capabilities",
    "enter",
    "parse_modcaps",
    "required_capabilities",
]

#: The sandbox modes, in the spelling of ``--sandbox``.
MODES = ("namespace", "chroot", "none")

# -- syscall constants (linux/sched.h, linux/mount.h, linux/prctl.h) ----------------
CLONE_NEWNS = 0x0002_0000
CLONE_NEWUSER = 0x1000_0000
CLONE_NEWPID = 0x2000_0000
CLONE_NEWNET = 0x4000_0000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_RELATIME = 1 << 21
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MNT_DETACH = 0x2

AT_FDCWD = -100
OPEN_TREE_CLONE = 0x1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
MOVE_MOUNT_F_EMPTY_PATH = 0x4
#: open_tree(2) and move_mount(2): the same numbers on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429

PR_SET_PDEATHSIG = 1
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4

_LINUX_CAPABILITY_VERSION_3 = 0x2008_0522

#: pivot_root(2) has no libc wrapper: its syscall number per architecture.
_SYS_PIVOT_ROOT = {
    "x86_64": 155,
    "amd64": 155,
    "aarch64": 41,
    "arm64": 41,
    "riscv64": 41,
    "loongarch64": 41,
    "ppc64le": 203,
    "ppc64": 203,
    "s390x": 217,
    "i386": 217,
    "i686": 217,
    "armv7l": 218,
    "armv6l": 218,
}

#: Linux capability numbers (linux/capability.h), by lower-case name without ``cap_``.
CAPABILITIES: dict[str, int] = {
    name: number
    for number, name in enumerate(
        (
            "chown", "dac_override", "dac_read_search", "fowner", "fsetid", "kill", "setgid",
            "setuid", "setpcap", "linux_immutable", "net_bind_service", "net_broadcast",
            "net_admin", "net_raw", "ipc_lock", "ipc_owner", "sys_module", "sys_rawio",
            "sys_chroot", "sys_ptrace", "sys_pacct", "sys_admin", "sys_boot", "sys_nice",
            "sys_resource", "sys_time", "sys_tty_config", "mknod", "lease", "audit_write",
            "audit_control", "setfcap", "mac_override", "mac_admin", "syslog", "wake_alarm",
            "block_suspend", "audit_read", "perfmon", "bpf", "checkpoint_restore",
        )
    )
}
_CAPABILITY_NAMES = {number: name for name, number in CAPABILITIES.items()}

#: What a passthrough daemon keeps (the Rust virtiofsd's list).
DEFAULT_CAPABILITIES = ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod", "setfcap")


class SandboxError(Exception):
    """The sandbox could not be set up; the message says which step failed and why."""


@attrs.define
class Sandbox:
    """Where the serving process ended up."""

    #: ``namespace``, ``chroot`` or ``none``.
    mode: str
    #: The path the backend must serve: ``/`` inside a namespace or chroot
    #: sandbox, the shared directory's host path with ``none``.
    root: str
    #: An ``O_PATH`` fd of this process's ``/proc/self/fd`` that stays valid
    #: in the sandbox (None if /proc was not available).
    proc_self_fd: int | None
    #: What ``prepare`` returned (None without one).
    prepared: Any = None


# -- raw syscalls ----------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{what}: {os.strerror(code)}")


def _path(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """unshare(2)."""
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        raise _fail("unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    """mount(2)."""
    ret = _libc.mount(
        ctypes.c_char_p(_path(source)),
        ctypes.c_char_p(_path(target)),
        ctypes.c_char_p(_path(fstype)),
        ctypes.c_ulong(flags),
        ctypes.c_char_p(_path(data)),
    )
    if ret != 0:
        raise _fail(f"mount {source or fstype or ''} on {target}")


def umount2(target: str, flags: int) -> None:
    """umount2(2)."""
    if _libc.umount2(ctypes.c_char_p(_path(target)), ctypes.c_int(flags)) != 0:
        raise _fail(f"umount {target}")


def pivot_root(new_root: str, put_old: str) -> None:
    """pivot_root(2)."""
    number = _SYS_PIVOT_ROOT.get(platform.machine().lower())
    if number is None:
        raise OSError(errno.ENOSYS, f"pivot_root: unknown syscall number on {platform.machine()}")
    ret = _libc.syscall(ctypes.c_long(number), ctypes.c_char_p(_path(new_root)), ctypes.c_char_p(_path(put_old)))
    if ret != 0:
        raise _fail("pivot_root")


def open_tree(path: str, flags: int) -> int:
    """open_tree(2) relative to the cwd: a new fd."""
    ret = _libc.syscall(ctypes.c_long(_SYS_OPEN_TREE), ctypes.c_int(AT_FDCWD), ctypes.c_char_p(_path(path)),
                        ctypes.c_uint(flags))
    if ret < 0:
        raise _fail(f"open_tree {path}")
    return int(ret)


def move_mount_fd(fd: int, target: str) -> None:
    """move_mount(2) of the detached tree ``fd`` onto ``target``."""
    ret = _libc.syscall(ctypes.c_long(_SYS_MOVE_MOUNT), ctypes.c_int(fd), ctypes.c_char_p(b""),
                        ctypes.c_int(AT_FDCWD), ctypes.c_char_p(_path(target)),
                        ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH))
    if ret < 0:
        raise _fail(f"move_mount onto {target}")


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    """prctl(2) with up to two arguments (the rest zero)."""
    ret = _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), ctypes.c_ulong(0), ctypes.c_ulong(0))
    if ret < 0:
        raise _fail(f"prctl({option})")
    return int(ret)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def capability_sets() -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    """The calling thread's (effective, permitted, inheritable) capability numbers."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(header), data) != 0:
        raise _fail("capget")
    sets = []
    for field in ("effective", "permitted", "inheritable"):
        bits = getattr(data[0], field) | (getattr(data[1], field) << 32)
        sets.append(frozenset(n for n in range(64) if bits >> n & 1))
    return sets[0], sets[1], sets[2]


def _capset(effective: Iterable[int], permitted: Iterable[int]) -> None:
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for field, caps in (("effective", effective), ("permitted", permitted)):
        bits = 0
        for cap in caps:
            bits |= 1 << cap
        setattr(data[0], field, bits & 0xFFFF_FFFF)
        setattr(data[1], field, bits >> 32)
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise _fail("capset")


# -- capabilities ------------------------------------------------------------------------


def _capability_number(name: str) -> int:
    key = name.strip().lower()
    if key.startswith("cap_"):
        key = key[4:]
    if key not in CAPABILITIES:
        raise ValueError(f"unknown capability {name!r}")
    return CAPABILITIES[key]


def parse_modcaps(text: str) -> tuple[frozenset[int], frozenset[int]]:
    """Parse virtiofsd's ``--modcaps``/``-o modcaps=`` value, e.g.
    ``+sys_admin:-mknod``: (capabilities to add, capabilities to remove).
    A later entry for the same capability wins. ValueError if malformed."""
    add: set[int] = set()
    remove: set[int] = set()
    for item in text.split(":"):
        if len(item) < 2 or item[0] not in "+-":
            raise ValueError(f"malformed modcaps entry {item!r}: expected +name or -name (e.g. +sys_admin:-mknod)")
        number = _capability_number(item[1:])
        if item[0] == "+":
            add.add(number)
            remove.discard(number)
        else:
            remove.add(number)
            add.discard(number)
    return frozenset(add), frozenset(remove)


def required_capabilities(*, file_handles: bool = False, modcaps: str | None = None) -> frozenset[int]:
    """The capabilities the daemon keeps: :data:`DEFAULT_CAPABILITIES`,
    ``dac_read_search`` when inodes may be file handles, then ``modcaps``.
    ValueError if ``modcaps`` removes a capability that file handles need."""
    keep = {CAPABILITIES[name] for name in DEFAULT_CAPABILITIES}
    add: frozenset[int] = frozenset()
    remove: frozenset[int] = frozenset()
    if modcaps:
        add, remove = parse_modcaps(modcaps)
    keep = (keep | add) - remove
    if file_handles:
        needed = CAPABILITIES["dac_read_search"]
        if needed in remove:
            raise ValueError("--inode-file-handles needs CAP_DAC_READ_SEARCH, which --modcaps removes")
        keep.add(needed)
    return frozenset(keep)


def capability_names(caps: Iterable[int]) -> list[str]:
    """Sorted ``cap_*`` names of capability numbers (for logs)."""
    return [f"cap_{_CAPABILITY_NAMES.get(n, str(n))}" for n in sorted(caps)]


def _last_capability() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def drop_capabilities(keep: Iterable[int]) -> frozenset[int]:
    """Reduce the calling thread to ``keep`` (intersected with what it has):
    effective = permitted = kept, inheritable and ambient cleared, the rest
    dropped from the bounding set (when CAP_SETPCAP allows it), and
    ``no_new_privs`` set. Returns the capabilities kept."""
    import threading

    if threading.active_count() > 1:
        log.warning("dropping capabilities with %d threads running: only this thread loses them",
                    threading.active_count())
    effective, permitted, _ = capability_sets()
    kept = frozenset(keep) & permitted
    try:
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:
        pass  # kernels before 4.3 have no ambient set
    if CAPABILITIES["setpcap"] in effective:
        for cap in range(_last_capability() + 1):
            if cap in kept:
                continue
            try:
                if prctl(PR_CAPBSET_READ, cap):
                    prctl(PR_CAPBSET_DROP, cap)
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: the kernel does not know this one
                    raise
    _capset(kept, kept)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    return kept


# -- the sandbox ---------------------------------------------------------------------------


Prepare = Callable[[str, "int | None"], Any]


def enter(
    mode: str,
    shared_dir: str,
    *,
    prepare: Prepare | None = None,
    serving_fds: Sequence[int] = (),
    supervisor_fds: Sequence[int] = (),
    on_supervisor_exit: Callable[[], None] | None = None,
) -> Sandbox:
    """Confine this process to ``shared_dir`` (an absolute, resolved path)
    in ``mode``; returns in the process that must serve.

    ``prepare(shared_dir, proc_self_fd)`` runs in the serving process once
    its namespaces are set up but before the root switch, while host paths
    (``shared_dir``, ``/proc/self/fd``) still resolve; what it returns is
    :attr:`Sandbox.prepared`. Exceptions from it propagate.

    ``namespace`` forks: the supervisor never returns from this call (it
    closes ``serving_fds``, waits for the child, calls ``on_supervisor_exit``
    and exits with the child's status); the serving child closes
    ``supervisor_fds``. Other modes do not fork and ignore these three.
    Raises SandboxError (for ``namespace``, an error after the fork is
    raised in the child)."""
    if mode not in MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}")
    if mode != "none":
        preload_unwinder()
    if mode == "namespace":
        box = _enter_namespaces(shared_dir, prepare, serving_fds, supervisor_fds, on_supervisor_exit)
    else:
        proc_fd = _open_proc_self_fd()
        prepared = prepare(shared_dir, proc_fd) if prepare is not None else None
        if mode == "chroot":
            _chroot(shared_dir, proc_fd)
        box = Sandbox(mode, "/" if mode == "chroot" else shared_dir, proc_fd, prepared)
    return box



def _open_proc_self_fd() -> int | None:
    try:
        return os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("cannot open /proc/self/fd (%s): files cannot be re-opened through it", exc.strerror)
        return None


def _chroot(shared_dir: str, proc_fd: int | None) -> None:
    try:
        os.chroot(shared_dir)
        os.chdir("/")
    except OSError as exc:
        if proc_fd is not None:
            os.close(proc_fd)
        hint = " (it needs root or CAP_SYS_CHROOT; use --sandbox namespace or none)" if exc.errno == errno.EPERM else ""
        raise SandboxError(f"chroot into {shared_dir} failed: {exc.strerror}{hint}") from exc


def _enter_namespaces(
    shared_dir: str,
    prepare: Prepare | None,
    serving_fds: Sequence[int],
    supervisor_fds: Sequence[int],
    on_supervisor_exit: Callable[[], None] | None,
) -> Sandbox:
    unprivileged = os.geteuid() != 0
    uid, gid = os.geteuid(), os.getegid()
    flags = CLONE_NEWPID | (CLONE_NEWUSER if unprivileged else 0)
    try:
        unshare(flags)
        if unprivileged:
            _map_own_ids(uid, gid)
    except OSError as exc:
        what = "a user and pid namespace" if unprivileged else "a pid namespace"
        hint = (
            " (unprivileged user namespaces may be disabled here; run as root or use --sandbox none)"
            if unprivileged
            else ""
        )
        raise SandboxError(f"cannot create {what}: {exc.strerror}{hint}") from exc
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    child = os.fork()
    if child:
        _supervise(child, serving_fds, on_supervisor_exit)  # never returns
    # The serving child: pid 1 of the new pid namespace.
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass
    for fd in supervisor_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    try:
        unshare(CLONE_NEWNS | CLONE_NEWNET)
    except OSError as exc:
        raise SandboxError(f"cannot create mount and network namespaces: {exc.strerror}") from exc
    # Our mounts must not propagate to the host; the host's later mounts
    # (kata adds bind mounts to the shared dir after starting us) still
    # propagate to us: slave, not private.
    _step("making mounts slave", mount, None, "/", None, MS_SLAVE | MS_REC)
    _mount_own_proc()
    proc_fd = _step("opening /proc/self/fd", os.open, "/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    assert isinstance(proc_fd, int)
    _step(f"bind-mounting {shared_dir} onto itself", mount, shared_dir, shared_dir, None, MS_BIND | MS_REC)
    prepared = prepare(shared_dir, proc_fd) if prepare is not None else None
    _pivot_into(shared_dir)
    return Sandbox("namespace", "/", proc_fd, prepared)


def _map_own_ids(uid: int, gid: int) -> None:
    """In a fresh user namespace: map our own uid and gid to themselves."""
    with open("/proc/self/setgroups", "w") as f:
        f.write("deny")
    with open("/proc/self/uid_map", "w") as f:
        f.write(f"{uid} {uid} 1")
    with open("/proc/self/gid_map", "w") as f:
        f.write(f"{gid} {gid} 1")


def _step(what: str, fn: Callable[..., object], *args: object) -> object:
    try:
        return fn(*args)
    except OSError as exc:
        raise SandboxError(f"namespace sandbox: {what} failed: {exc.strerror}") from exc


def _mount_own_proc() -> None:
    """Make ``/proc`` a read-only tmpfs whose only content, ``self/fd`` and
    ``self/fdinfo``, are this process's fd directories from a fresh procfs
    of our pid namespace."""
    proc_flags = MS_NODEV | MS_NOEXEC | MS_NOSUID | MS_RELATIME
    _step("mounting proc", mount, "proc", "/proc", "proc", proc_flags)
    trees: dict[str, int] = {}
    try:
        for name in ("fd", "fdinfo"):
            trees[name] = open_tree(f"/proc/self/{name}", OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC)
    except OSError as exc:
        for fd in trees.values():
            os.close(fd)
        # Before Linux 5.2: keep the whole (fresh, pid-namespaced) procfs.
        log.debug("open_tree unavailable (%s): /proc stays a full procfs of the new pid namespace", exc.strerror)
        return
    try:
        _step("mounting a tmpfs on /proc", mount, "tmpfs", "/proc", "tmpfs", MS_NODEV | MS_NOEXEC | MS_NOSUID,
              "mode=0755,size=16k")
        for name, tree in trees.items():
            _step(f"creating /proc/self/{name}", os.makedirs, f"/proc/self/{name}", 0o755)
            _step(f"placing /proc/self/{name}", move_mount_fd, tree, f"/proc/self/{name}")
    finally:
        for fd in trees.values():
            os.close(fd)
    _step("making /proc read-only", mount, None, "/proc", None,
          MS_REMOUNT | MS_RDONLY | MS_NODEV | MS_NOEXEC | MS_NOSUID)


def _pivot_into(shared_dir: str) -> None:
    """Make ``shared_dir`` (bind-mounted onto itself) the root; the old
    root is detached."""
    old_root = _step("opening /", os.open, "/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new_root = _step(f"opening {shared_dir}", os.open, shared_dir, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    assert isinstance(old_root, int) and isinstance(new_root, int)
    try:
        _step(f"entering {shared_dir}", os.fchdir, new_root)
        if os.path.realpath(shared_dir) != "/":
            # pivot_root(".", "."): the old root ends up stacked on the new
            # one; detach it from there.
            _step("pivot_root", pivot_root, ".", ".")
            _step("entering the old root", os.fchdir, old_root)
            _step("making the old root slave", mount, None, ".", None, MS_SLAVE | MS_REC)
            _step("detaching the old root", umount2, ".", MNT_DETACH)
            _step("entering the new root", os.fchdir, new_root)
        os.chdir("/")
    finally:
        os.close(old_root)
        os.close(new_root)


#: Signals the supervisor passes on to the serving child.
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _supervise(child: int, serving_fds: Sequence[int], on_exit: Callable[[], None] | None) -> None:
    """The parent outside the pid namespace: forward signals, wait, clean up,
    exit with the child's status (or die of the child's signal)."""
    for fd in serving_fds:
        try:
            os.close(fd)
        except OSError:
            pass

    def forward(signum: int, frame: object) -> None:
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, forward)
    status = None
    while status is None:
        try:
            _, status = os.waitpid(child, 0)
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
        except ChildProcessError:
            status = 1 << 8
    try:
        if on_exit is not None:
            on_exit()
    except Exception:  # pragma: no cover - cleanup must not mask the status
        log.exception("cleanup after the sandboxed daemon failed")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        log.debug("the sandboxed daemon died of signal %d", sig)
        logging.shutdown()
        try:
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        os._exit(128 + sig)
    logging.shutdown()
    os._exit(os.waitstatus_to_exitcode(status))
