"""Linux syscalls the passthrough backend needs and :mod:`os` lacks (ctypes).

Everything here is a thin, blocking wrapper that raises :class:`OSError`
with the kernel's errno; nothing imports an event loop or knows FUSE.

Contracts:

* :func:`call_as` runs a function with the filesystem credentials
  (fsuid/fsgid via setfsuid/setfsgid, supplementary groups via the raw
  ``setgroups`` syscall) and optionally the umask of a caller, *on the
  calling thread only*, and restores the thread's previous credentials
  before it returns or raises. Linux keeps these per thread; glibc's
  ``setgroups()`` would broadcast to every thread, so the raw syscall is
  used. Switching happens only when the process runs as root
  (``SWITCH_CREDENTIALS``).
* A per-call umask needs a thread-private umask: the first time a worker
  thread needs one it calls ``unshare(CLONE_FS)`` (its cwd, root and umask
  become its own). The main thread unshares only when its owner says so
  (:func:`claim_private_fs`: the daemon does, before it serves); until
  then the process umask is switched there under a global lock, which
  other threads of the process can see for the length of the call, so
  callers keep umask-sensitive work off an unclaimed main thread
  (:func:`umask_is_private`).
* :func:`open_beneath` opens one name relative to a directory fd without
  ever following a symlink or ``..`` on the host: ``openat2`` with
  RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS where the
  kernel has it, else ``openat`` with O_NOFOLLOW (the caller has already
  refused names containing ``/``).
"""
from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from typing import Any, Callable, Iterator, NamedTuple, Sequence, TypeVar

import attrs

from .. import _accel
from .._accel import parse_linux_dirents64 as _parse_dirents

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def _raise_errno() -> None:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))


def _check(ret: int) -> int:
    if ret < 0:
        _raise_errno()
    return ret


# -- syscall numbers that glibc does not wrap (or wraps with other semantics) ----------

_MACHINE = platform.machine()
#: openat2(2) has the same number on every architecture (added in 5.6).
SYS_openat2 = 437
#: setgroups(2), raw (glibc's wrapper changes every thread of the process).
_SETGROUPS_NR = {
    "x86_64": 116,
    "aarch64": 159,
    "arm64": 159,
    "riscv64": 159,
    "loongarch64": 159,
    "ppc64le": 81,
    "ppc64": 81,
}
SYS_setgroups: int | None = _SETGROUPS_NR.get(_MACHINE)

_libc.syscall.restype = ctypes.c_long
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsuid.restype = ctypes.c_int
_libc.setfsgid.argtypes = [ctypes.c_uint]
_libc.setfsgid.restype = ctypes.c_int

# -- openat2 -------------------------------------------------------------------------------

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
_CONFINED = RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


#: None = not probed yet; set by the first call of ``open_beneath``.
HAVE_OPENAT2: bool | None = None


_HOW_SIZE = ctypes.c_size_t(ctypes.sizeof(_OpenHow))
#: (flags, mode, resolve) -> (struct, its byref): read-only once built, so
#: shared by every thread; saves a third of the call's cost.
_how_cache: dict[tuple[int, int, int], Any] = {}


def openat2(dirfd: int, name: bytes, flags: int, mode: int = 0, resolve: int = _CONFINED) -> int:
    """The raw openat2 syscall; OSError(ENOSYS) on kernels before 5.6."""
    key = (flags | os.O_CLOEXEC, mode if flags & (os.O_CREAT | os.O_TMPFILE) else 0, resolve)
    ref = _how_cache.get(key)
    if ref is None:
        how = _OpenHow(*key)
        ref = (how, ctypes.byref(how))
        if len(_how_cache) < 512:
            _how_cache[key] = ref
    return _check(_libc.syscall(SYS_openat2, ctypes.c_int(dirfd), name, ref[1], _HOW_SIZE))


def open_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open the single component ``name`` (no ``/``) relative to ``dirfd``
    without following any host symlink; O_CLOEXEC is always added. A
    trailing symlink with O_PATH|O_NOFOLLOW gives an fd of the link itself;
    otherwise it fails with ELOOP."""
    global HAVE_OPENAT2
    if HAVE_OPENAT2 is not False and name not in (b".", b".."):
        try:
            return openat2(dirfd, name, flags | os.O_NOFOLLOW, mode)
        except OSError as exc:
            if exc.errno not in (errno.ENOSYS, errno.EPERM) or HAVE_OPENAT2:
                raise
            # ENOSYS: no openat2; EPERM on the very first call: a seccomp
            # filter refusing it. Use openat from now on.
            HAVE_OPENAT2 = False
        else:
            HAVE_OPENAT2 = True
    return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dirfd)


# -- file handles ------------------------------------------------------------------------

MAX_HANDLE_SZ = 128
AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100


class _FileHandleStruct(ctypes.Structure):
    _fields_ = [
        ("handle_bytes", ctypes.c_uint),
        ("handle_type", ctypes.c_int),
        ("f_handle", ctypes.c_ubyte * MAX_HANDLE_SZ),
    ]


@attrs.frozen
class FileHandle:
    """A filesystem's persistent name for an inode (name_to_handle_at)."""

    handle_type: int
    data: bytes
    mount_id: int


def name_to_handle(fd: int) -> FileHandle:
    """The file handle of the inode ``fd`` refers to (``fd`` may be O_PATH).
    EOPNOTSUPP / EOVERFLOW when the filesystem cannot make one."""
    fh = _FileHandleStruct(MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    _check(_libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH))
    return FileHandle(fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes]), mount_id.value)


def open_by_handle(mount_fd: int, handle: FileHandle, flags: int) -> int:
    """open_by_handle_at(2). ``mount_fd`` must be a non-O_PATH fd on the
    handle's mount; needs CAP_DAC_READ_SEARCH. ESTALE for a gone inode."""
    fh = _FileHandleStruct(len(handle.data), handle.handle_type)
    ctypes.memmove(fh.f_handle, handle.data, len(handle.data))
    return _check(_libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC))


# -- credentials ---------------------------------------------------------------------------

#: Whether call_as switches anything: only a root daemon can.
SWITCH_CREDENTIALS = os.geteuid() == 0
#: The process's supplementary groups at import (what a thread goes back to).
_BASE_GROUPS: tuple[int, ...] = tuple(os.getgroups())

_gid_array_cache: dict[tuple[int, ...], Any] = {}


def _setgroups_thread(groups: Sequence[int]) -> None:
    if SYS_setgroups is None:
        raise OSError(errno.ENOSYS, "per-thread setgroups is not known on " + _MACHINE)
    key = tuple(groups)
    arr = _gid_array_cache.get(key)
    if arr is None:
        arr = (ctypes.c_uint * max(1, len(key)))(*key)
        if len(_gid_array_cache) < 256:
            _gid_array_cache[key] = arr
    _check(_libc.syscall(SYS_setgroups, len(key), arr))


def per_thread_groups_supported() -> bool:
    return SYS_setgroups is not None


@attrs.frozen
class Credentials:
    """Whom a syscall runs as. ``groups`` None leaves the daemon's groups."""

    uid: int
    gid: int
    groups: tuple[int, ...] | None = None


_local = threading.local()
_umask_lock = threading.Lock()
CLONE_FS = 0x00000200


def _private_umask_possible() -> bool:
    """Give this (non-main) thread its own umask and cwd via unshare(CLONE_FS)."""
    state = getattr(_local, "fs_private", None)
    if state is None:
        if threading.current_thread() is threading.main_thread():
            state = False
        else:
            state = _libc.unshare(CLONE_FS) == 0
        _local.fs_private = state
    return state


def claim_private_fs() -> bool:
    """``unshare(CLONE_FS)`` for the calling thread, the main thread too: its
    cwd, root and umask become its own, so :func:`call_as` switches its
    umask without other threads seeing it. For a process that owns the
    thread (the daemon calls it on its main thread once its sandbox is
    set up). Returns whether the thread's fs context is private now."""
    if getattr(_local, "fs_private", None) is not True:
        _local.fs_private = _libc.unshare(CLONE_FS) == 0
    return _local.fs_private


def umask_is_private() -> bool:
    """Whether this thread's umask is its own already (a worker that
    needed one, or a thread that called :func:`claim_private_fs`): then a
    :func:`call_as` with a umask here changes nothing other threads see."""
    return getattr(_local, "fs_private", None) is True


_cwd_lock = threading.Lock()


def call_in_dir(dirfd: int, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` with this thread's working directory at ``dirfd``
    (relative paths resolve there), then go back. On a worker thread the
    cwd is the thread's own (unshare(CLONE_FS)); on the main thread the
    process cwd moves for the call, under a lock."""
    if _private_umask_possible():
        home = getattr(_local, "home", None)
        if home is None:
            home = _local.home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        os.fchdir(dirfd)
        try:
            return fn(*args)
        finally:
            os.fchdir(home)
    with _cwd_lock:
        home = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fchdir(dirfd)
            try:
                return fn(*args)
            finally:
                os.fchdir(home)
        finally:
            os.close(home)


def call_as(creds: Credentials | None, umask: int | None, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` with ``creds`` as this thread's filesystem
    credentials and ``umask`` as its umask (None: leave as is); restore both
    before returning. See the module docstring."""
    if umask is not None and not _private_umask_possible():
        with _umask_lock:
            old_mask = os.umask(umask)
            try:
                return _call_with_creds(creds, fn, args)
            finally:
                os.umask(old_mask)
    old_mask = os.umask(umask) if umask is not None else None
    try:
        return _call_with_creds(creds, fn, args)
    finally:
        if old_mask is not None:
            os.umask(old_mask)


def _call_with_creds(creds: Credentials | None, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    if creds is None or not SWITCH_CREDENTIALS:
        return fn(*args)
    set_gid = creds.gid != 0
    set_uid = creds.uid != 0
    set_groups = creds.groups is not None and SYS_setgroups is not None
    if set_groups:
        _setgroups_thread(creds.groups)  # type: ignore[arg-type]
    old_gid = _libc.setfsgid(creds.gid) if set_gid else None
    old_uid = _libc.setfsuid(creds.uid) if set_uid else None
    try:
        return fn(*args)
    finally:
        if old_uid is not None:
            _libc.setfsuid(old_uid)
        if old_gid is not None:
            _libc.setfsgid(old_gid)
        if set_groups:
            _setgroups_thread(_BASE_GROUPS)


def current_fs_ids() -> tuple[int, int]:
    """This thread's (fsuid, fsgid) (for tests: setfs*id(-1) changes nothing)."""
    return _libc.setfsuid(0xFFFFFFFF), _libc.setfsgid(0xFFFFFFFF)


# -- misc syscalls -----------------------------------------------------------------------

_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.syncfs.argtypes = [ctypes.c_int]


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=olddirfd, dst_dir_fd=newdirfd)
        return
    _check(_libc.renameat2(olddirfd, old, newdirfd, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_libc.fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_libc.syncfs(fd))


UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _timespec(ns: int | None, now: bool) -> _Timespec:
    if now:
        return _Timespec(0, UTIME_NOW)
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def utimensat(
    dirfd: int, name: bytes, atime_ns: int | None, mtime_ns: int | None,
    atime_now: bool = False, mtime_now: bool = False, flags: int = 0,
) -> None:
    """utimensat(2) with per-field UTIME_NOW / UTIME_OMIT (None = omit)."""
    times = (_Timespec * 2)(_timespec(atime_ns, atime_now), _timespec(mtime_ns, mtime_now))
    _check(_libc.utimensat(dirfd, name, times, flags))


# -- directories: getdents64 with resumable offsets ----------------------------------------

_SYS_getdents64 = {"x86_64": 217, "aarch64": 61, "arm64": 61, "riscv64": 61, "loongarch64": 61,
                   "ppc64le": 202, "ppc64": 202}.get(_MACHINE)
_getdents64 = getattr(_libc, "getdents64", None)


class Dirent(NamedTuple):
    """One host directory entry (a tuple: a directory listing makes many)."""

    ino: int
    #: the host's cookie to resume *after* this entry (lseek(fd, off))
    off: int
    type: int
    name: bytes


#: Each thread's getdents64 buffer (grown as asked; never shrunk).
_dirbuf = threading.local()


def getdents_raw(fd: int, offset: int | None, bufsize: int = 32768) -> bytes:
    """What one getdents64 call on the directory ``fd`` (opened O_RDONLY)
    returns from the host cookie ``offset`` (0 = start; None = where the fd
    is, which saves the seek: on ext4 a seek makes the next call rebuild
    its hash-order state), as bytes of ``struct linux_dirent64`` records
    (empty: the end). After a call the fd is at the last record's
    ``d_off``. The caller serialises use of ``fd``."""
    if offset is not None:
        os.lseek(fd, offset, os.SEEK_SET)
    buf = getattr(_dirbuf, "buf", None)
    if buf is None or len(buf) < bufsize:
        buf = _dirbuf.buf = ctypes.create_string_buffer(bufsize)
    if _getdents64 is not None:
        n = _getdents64(fd, buf, bufsize)
    elif _SYS_getdents64 is not None:
        n = _libc.syscall(_SYS_getdents64, fd, buf, bufsize)
    else:  # pragma: no cover
        raise OSError(errno.ENOSYS, "getdents64 unavailable")
    _check(n)
    return ctypes.string_at(buf, n)


#: The reference above, through ctypes; the compiled twin (the same
#: contract, no ctypes call) where the compiled implementation is active.
getdents_raw_ctypes = getdents_raw
if _accel.getdents_raw is not None:
    getdents_raw = _accel.getdents_raw  # noqa: F811


def parse_raw(raw: bytes, start: int = 0) -> list[Dirent]:
    """The records of ``raw`` (a getdents64 result) from byte position
    ``start`` as :class:`Dirent` tuples; OSError(EIO) for a corrupt one."""
    try:
        return _parse_dirents(memoryview(raw)[start:], len(raw) - start, Dirent)
    except ValueError as exc:
        raise OSError(errno.EIO, f"corrupt getdents64 result: {exc}") from None


def getdents(fd: int, offset: int | None, bufsize: int = 32768) -> list[Dirent]:
    """The entries one getdents64 call returns (see :func:`getdents_raw`),
    as :class:`Dirent` tuples; an empty list means the end."""
    return parse_raw(getdents_raw(fd, offset, bufsize))


def iter_all(fd: int) -> Iterator[Dirent]:
    """Every entry of directory ``fd`` (tests and tools)."""
    off = 0
    while True:
        batch = getdents(fd, off)
        if not batch:
            return
        yield from batch
        off = batch[-1].off


# -- OFD / flock locks ----------------------------------------------------------------------

_FLOCK = struct.Struct("hhqqi4x")
#: FUSE's "to the end of the file" (OFFSET_MAX).
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF


def pack_flock(type_: int, start: int, end: int) -> bytes:
    """A struct flock for [start, end] (end inclusive; OFFSET_MAX = to EOF)."""
    length = 0 if end >= OFFSET_MAX else end - start + 1
    return _FLOCK.pack(type_, os.SEEK_SET, start, length, 0)


def ofd_locks_of(fdinfo_dir: int, fd: int) -> set[tuple[bytes, int, int]]:
    """The OFD locks held through ``fd``, as (b"READ"|b"WRITE", start, end)
    with ``end`` inclusive (OFFSET_MAX for "to EOF"), read from the
    ``lock:`` lines of /proc/self/fdinfo/FD; ``fdinfo_dir`` is an fd of
    /proc/self/fdinfo (usable after a pivot_root)."""
    info = os.open(str(fd), os.O_RDONLY | os.O_CLOEXEC, dir_fd=fdinfo_dir)
    try:
        text = os.read(info, 65536)
    finally:
        os.close(info)
    held = set()
    for line in text.splitlines():
        # lock:	1: OFDLCK  ADVISORY  WRITE -1 00:2b:1234 0 EOF
        words = line.split()
        if len(words) >= 8 and words[0] == b"lock:" and words[2] == b"OFDLCK":
            end = OFFSET_MAX if words[-1] == b"EOF" else int(words[-1])
            held.add((words[4], int(words[-2]), end))
    return held


def unpack_flock(data: bytes) -> tuple[int, int, int, int]:
    """(type, start, end, pid) of a struct flock; end inclusive."""
    type_, _whence, start, length, pid = _FLOCK.unpack(data)
    end = OFFSET_MAX if length == 0 else start + length - 1
    return type_, start, end, pid
