"""A host directory served to the guest, as QEMU's C and the Rust virtiofsd do.

Contracts:

* **Inodes.** A host inode is identified by ``(st_dev, st_ino)``. Each one
  the guest knows holds either an ``O_PATH`` fd or, with
  ``inode_file_handles="prefer"|"mandatory"``, a file handle
  (``name_to_handle_at``; reopened with ``open_by_handle_at`` when needed),
  so open fds stay bounded by what the guest caches. Lookup counts follow
  ``operations.py``; an inode is dropped (its fd closed) when it has no
  lookup, no open handle and no request in flight. The guest's nodeid is
  also the ``st_ino`` it sees (the interface has one number for both): the
  host ``st_ino`` when that number is free, else a number from ``2**63`` up.
  A nodeid only ever resolves through this table: a guest that forges one
  (say, the host inode number of ``/etc/passwd``) gets ESTALE.
* **Confinement.** Names are resolved one component at a time relative to
  the parent's fd, never following a host symlink (``openat2`` with
  RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS where the
  kernel has it, else ``openat`` + O_NOFOLLOW; a name whose inode the
  table already holds is found by ``fstatat(AT_SYMLINK_NOFOLLOW)`` of that
  one component, without opening it); ``..`` at the root is the
  root; names with ``/`` or NUL are EINVAL. Files are opened for I/O by
  reopening the inode's own fd through ``/proc/self/fd/N`` (or by handle),
  never through a path built from guest names; only regular files and
  directories are ever opened for I/O (a device node or fifo in the share
  is never opened on the host). Symlinks in the share are the guest's to
  resolve. Not covered: a host process moving a directory out of the shared
  tree while the guest is using it.
* **Credentials.** A request that creates an inode (mknod, mkdir, symlink,
  create, O_TMPFILE) runs its syscall with the caller's fsuid/fsgid and
  supplementary groups (``ctx.groups`` when the request carried them, none
  otherwise) on the thread that makes it (:func:`_hostfs.call_as`), so the
  new inode is owned by the caller and the host checks the caller may
  create there. ACCESS is answered as the caller too. Every other request
  runs as the daemon, as in both virtiofsd: the guest kernel mounts
  virtio-fs with ``default_permissions`` and has already checked the
  caller's full credentials, supplementary groups included, which the
  request does not carry (a Linux guest sends groups for creating requests
  only, and only from 6.2), so a host-side check with the uid/gid alone
  would refuse what the guest rightly allowed. The guest could claim any
  uid anyway: per-request credentials are about ownership and POSIX
  semantics, not a boundary; the boundary is the share and the daemon's own
  (reduced) privileges. Credentials are not switched when the daemon is
  not root.
* **killpriv_v2.** suid (and sgid with group-exec) is dropped by a write or
  truncate from a non-root caller, by chown, and whenever SETATTR carries
  FATTR_KILL_SUIDGID.
* **Blocking.** Calls that can block on I/O go through ``run_blocking``
  (the runtime's worker pool, injected by the server; inline until then).
  Fast metadata calls (lookup, getattr, setattr without a size change,
  readlink, access, xattr reads, statfs, non-waiting locks, forget, and
  FLUSH and RELEASE of files on a block-device filesystem whose inode
  stays open, see ``_closes_fast``) run inline on the event loop when
  ``inline_metadata`` is true (the default: measured faster, see
  ``INLINE_METADATA_DEFAULT``). So do namespace calls on a block-device
  filesystem (``_fast_namespace``: create, mkdir, mknod, symlink, link,
  open without O_TRUNC, opendir and the getdents64 of READDIR; unlink,
  rmdir and rename unless they drop the last link of a large file we do
  not hold, ``_drops_fast``), the creating ones under the caller's
  credentials switched on the loop's thread for the call; those that
  apply a umask (create, mkdir, mknod) only where the loop's thread has a
  umask of its own (``_hostfs.umask_is_private``: the daemon claims one
  for its main thread), else other threads would see the switch. Network
  and FUSE filesystems (anonymous device numbers) send all of these to the
  pool. A waiting SETLKW / flock occupies one pool
  thread; at most ``max_lock_waiters`` do so at once, further waiters poll.
  Inline calls take no pins: nothing else runs on the loop until they
  return, so no fd they use can be closed under them.
* **Data path.** READ goes ``preadv`` straight into the guest's reply
  buffers (``read_into``) and WRITE ``pwritev`` straight from the guest's
  request buffers: no copy in the daemon. Both go through ``run_preadv`` /
  ``run_pwritev``, the runtime's I/O pool (its compiled workers run the
  syscall without taking the GIL), except: a READ of at most
  ``inline_read_max`` bytes first tries ``preadv2(RWF_NOWAIT)`` on the
  event loop, which only copies what the page cache already holds and
  fails with EAGAIN instead of waiting for I/O or a lock; whatever it could
  not read goes to the pool (as do O_DIRECT handles and filesystems that
  refuse RWF_NOWAIT, learnt per handle). A WRITE of at most
  ``inline_write_max`` bytes to a file on a block-device filesystem
  (handle not O_DIRECT/O_SYNC/O_DSYNC) runs on the loop: ext4 refuses
  RWF_NOWAIT for buffered writes, so this one can wait when the host
  throttles dirty pages (both virtiofsd, at their default thread pool
  size 0, run every write that way). Other closes, truncating opens and
  syncs go to the pool: a last close can free a whole file. The numbers
  are at ``INLINE_READ_MAX_DEFAULT`` and ``INLINE_WRITE_MAX_DEFAULT``.
* **readdir offsets** are the host filesystem's own ``d_off`` cookies:
  each READDIR seeks the handle's directory fd to the guest's offset and
  calls ``getdents64`` (ctypes), so listings resume exactly where the host
  would, with the host's guarantees under concurrent changes; calls on
  one handle are serialised by a per-handle lock.
* **Cache policies** give the Rust virtiofsd's timeouts and open flags:
  ``never`` 0 s + FOPEN_DIRECT_IO (and no READDIRPLUS); ``metadata``
  86400 s, DIRECT_IO for files, KEEP_CACHE + CACHE_DIR for directories;
  ``auto`` 1 s, no flags; ``always`` 86400 s, KEEP_CACHE (+ CACHE_DIR for
  directories).
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import threading
import time
from typing import Any, Callable, Iterable, Sequence, TypeVar

from .. import _accel, codec
from ..abi import fuse as abi
from ..errors import FuseError
from ..operations import (
    RENAME_EXCHANGE,
    ROOT_INODE,
    DirectoryReply,
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileLock,
    InodeT,
    Operations,
    RequestContext,
    SetattrFields,
    SizedDirectoryReply,
    StatvfsData,
    open_flags,
    pack_open_out,
    setattr_arguments,
)
from . import _hostfs
from ._hostfs import Credentials, FileHandle, call_as

__all__ = [
    "PassthroughFS", "CACHE_POLICIES", "CACHE_TIMEOUTS", "INODE_FILE_HANDLES", "INLINE_METADATA_DEFAULT",
    "INLINE_READ_MAX_DEFAULT", "INLINE_WRITE_MAX_DEFAULT",
]

log = logging.getLogger("virtiofs_async.passthrough")
_setattr_in_unpack = abi.fuse_setattr_in.unpack_from
T = TypeVar("T")

CACHE_POLICIES = ("never", "metadata", "auto", "always")
#: entry/attr timeout per cache policy (the Rust virtiofsd's values).
CACHE_TIMEOUTS = {"never": 0.0, "metadata": 86400.0, "auto": 1.0, "always": 86400.0}
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")
#: Run fast metadata syscalls on the event loop (see the module docstring;
#: the numbers are in the module's report / benchmark).
INLINE_METADATA_DEFAULT = True
#: READs up to this size first try a non-blocking, page-cache-only
#: ``preadv2(RWF_NOWAIT)`` on the event loop (0: always the pool). Measured
#: with the frontend benchmark's READ loads (depth 16, 4 KiB guest buffers,
#: file in the host's page cache, ext4, 2 busy cores), both zero-copy,
#: pool -> inline, medians of 9 (1 MiB: 15) samples: 4 KiB 25 -> 42 MiB/s,
#: 128 KiB 618 -> 804 MiB/s, 1 MiB 1671 -> 1651 MiB/s (daemon CPU per
#: request 640 -> 465 us). Inline wins up to 128 KiB; at 1 MiB it is a tie
#: here, and the pool copies on another core while the loop goes on (an
#: inline 1 MiB copy holds the loop for ~0.2 ms), so larger reads use it.
#: Re-measured against the compiled I/O pool (same run, 3 runs each):
#: 128 KiB reads inline 4.3-4.4 GiB/s, through the pool 3.5-3.7. Since the
#: compiled inline responder serves cached READs from the ring walk (no
#: Python per request) the limit is 1 MiB, the largest READ: 5 runs each,
#: limit 128 KiB -> 1 MiB: 128 KiB reads 0.64 -> 0.85 of the C virtiofsd,
#: 1 MiB reads 0.77 -> 0.91.
INLINE_READ_MAX_DEFAULT = 1024 * 1024
#: WRITEs up to this size to a file on a block-device filesystem (not
#: O_DIRECT, O_SYNC or O_DSYNC) run ``pwritev`` on the event loop (0: always
#: the pool): a buffered write of that size is a copy into the page cache,
#: as cheap as the reads above; it waits only when the host throttles dirty
#: pages, as both virtiofsd do for every write at their default thread pool
#: size (0). Measured with the frontend benchmark (depth 16, 4 KiB
#: descriptors, ext4): through the compiled I/O pool -> inline, 4 KiB
#: 162 -> 293 MiB/s; at 128 KiB inline 3.8-4.3 GiB/s against 2.9-3.2 with
#: a 64 KiB limit (same run); at 1 MiB inline fell to 0.56 of the C
#: daemon from 0.66-0.77 through the pool. Since the compiled inline
#: responder writes from the ring walk (no Python per request), 1 MiB
#: inline runs at 0.93 of the C daemon against 0.56 through the pool (3
#: runs each), so every WRITE (1 MiB at most) qualifies.
INLINE_WRITE_MAX_DEFAULT = 1024 * 1024

NAME_MAX = 255
_DOTS = (b".", b"..")
_pack_raw_dirents = _accel.pack_raw_dirents
_scan_raw_dirents = _accel.scan_raw_dirents
_O_PATH = os.O_PATH | os.O_CLOEXEC
_OPEN_ALLOWED = (
    os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_TRUNC | getattr(os, "O_LARGEFILE", 0)
)
#: open flags whose writes wait for the device
_WAITING_WRITES = os.O_DIRECT | os.O_SYNC | os.O_DSYNC
_F_RDLCK, _F_WRLCK, _F_UNLCK = fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK
_FIRST_SYNTHETIC_NODEID = 1 << 63
_NO_HANDLE_ERRNOS = (errno.EOPNOTSUPP, errno.EOVERFLOW, errno.ENOTSUP, errno.EPERM, errno.ENOSYS)
_XATTR_ACL_NAMES = (b"system.posix_acl_access", b"system.posix_acl_default")


#: the tables' records: the implementation switch's twin (the compiled
#: responder reads the compiled ones' fields without attribute lookups)
_Inode = _accel.HostInode
_Handle = _accel.HostHandle


class _Box:
    """Hands a worker's result to the request, or to ``cleanup`` when the
    request was cancelled before it could take it."""

    __slots__ = ("_cleanup", "_lock", "_done", "_abandoned", "_value")

    def __init__(self, cleanup: Callable[[Any], None] | None) -> None:
        self._cleanup = cleanup
        self._lock = threading.Lock()
        self._done = False
        self._abandoned = False
        self._value: Any = None

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        value = fn(*args)
        if self._cleanup is None:
            return value
        with self._lock:
            if self._abandoned:
                self._cleanup(value)
                return None
            self._done = True
            self._value = value
        return value

    def abandon(self) -> None:
        if self._cleanup is None:
            return
        with self._lock:
            self._abandoned = True
            if self._done:
                self._done = False
                self._cleanup(self._value)


def _close_lookup_result(result: tuple[int, os.stat_result, Any]) -> None:
    fd, _st, info = result
    _close_quietly(fd)
    if info is not None and info[1] <= -2:
        _close_quietly(-info[1] - 2)


def _close_open_result(result: tuple[int, tuple[int, os.stat_result, Any]]) -> None:
    _close_quietly(result[0])
    _close_lookup_result(result[1])


#: The methods a GETATTR, LOOKUP, FORGET, READ, WRITE, FLUSH or RELEASE(DIR) goes through; the inline
#: responder answers those requests without them (see
#: PassthroughFS.inline_responder).
_RESPONDER_BYPASSES = (
    "lookup", "getattr", "_attrs", "_entry", "_entry_flags", "_node", "_dir_node", "read_into", "_file_handle",
    "_handle", "write", "_check_writable_fs", "forget", "_maybe_drop", "_adopt", "_install", "_register",
    "_lookup_at", "_alloc_nodeid", "flush", "release", "releasedir", "_drop_handle", "_closes_fast",
    "_close_handle_fd", "_flush_inline", "_release_inline", "readdir", "_readdir_batch", "_readdir_inline",
    "_fast_namespace", "_key_node", "_unkey", "_plus_packer", "_readdirplus_packed", "_give_back",
    "_readdirplus_inline", "create", "_w_create", "_create_inline", "_created_inline", "_create_host_config",
    "_create_gate", "_open_flags", "_new_handle", "_creds", "_umask",
    "_with_fd", "setattr", "_w_setattr", "_setattr_inline", "unlink", "rmdir", "_remove", "_drops_fast",
    "_remove_inline", "open", "opendir", "_check_openable", "_w_open", "_upgrade_for_writeback", "_proc_open",
    "_open_inline", "mkdir", "_make", "_w_make", "_mkdir_inline", "_inline_parent", "_readdir_host_config",
    "_tables_config",
)


def _err(code: int) -> FuseError:
    return FuseError(code)


def _inline_errno(what: str, nodeid: int, exc: Exception) -> int:
    """The errno an inline answer gives for a failure, logged as the session
    logs it: a host call's errno (ENOENT not at all), EIO with the traceback
    for anything else (a backend failure)."""
    if not isinstance(exc, OSError):
        log.error("%s nodeid=%d failed -> EIO", what, nodeid, exc_info=exc)
        return errno.EIO
    err = exc.errno or errno.EIO
    if err != errno.ENOENT:
        log.log(logging.DEBUG if err in (errno.EEXIST, errno.ENOTEMPTY) else logging.INFO,
                "%s nodeid=%d -> %s", what, nodeid, errno.errorcode.get(err, err))
    return err


_OFF_MAX = (1 << 63) - 1


def _check_range(*values: int) -> None:
    """Offsets/lengths from the guest are u64: refuse what no off_t holds."""
    for v in values:
        if not 0 <= v <= _OFF_MAX:
            raise _err(errno.EINVAL)


def _check_name(name: bytes) -> None:
    if not name or b"/" in name or b"\0" in name:
        raise _err(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise _err(errno.ENAMETOOLONG)


def _kill_suidgid_mode(mode: int) -> int:
    """The mode with suid dropped, and sgid when group-exec is set (Linux)."""
    new = mode & ~stat.S_ISUID
    if new & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP):
        new &= ~stat.S_ISGID
    return new


class PassthroughFS(Operations):
    """Serve the host directory ``root``; see the module docstring.

    Options (the daemon's command line maps onto them): ``readonly`` (EROFS
    on every mutation), ``xattr`` (off: xattr requests answer ENOSYS, as in
    virtiofsd), ``posix_acl`` (implies ``xattr``; FUSE_POSIX_ACL and
    FUSE_DONT_MASK), ``cache`` (one of ``CACHE_POLICIES``), ``writeback``
    (FUSE_WRITEBACK_CACHE: write-only opens are made read-write and O_APPEND
    is left to the guest), ``announce_submounts`` (FUSE_ATTR_SUBMOUNT on
    directories whose st_dev differs from their parent's),
    ``allow_direct_io`` (pass O_DIRECT through; stripped otherwise),
    ``inode_file_handles`` (one of ``INODE_FILE_HANDLES``), ``posix_locks``
    and ``flock_locks``, ``readdirplus``, ``entry_timeout`` /
    ``attr_timeout`` (override the policy's), ``inline_metadata``,
    ``inline_read_max``, ``inline_write_max``, ``max_lock_waiters``.
    """

    supports_killpriv_v2 = True

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        readonly: bool = False,
        xattr: bool = False,
        posix_acl: bool = False,
        cache: str = "auto",
        writeback: bool = False,
        announce_submounts: bool = False,
        allow_direct_io: bool = False,
        inode_file_handles: str = "never",
        posix_locks: bool = True,
        flock_locks: bool = True,
        readdirplus: bool = True,
        entry_timeout: float | None = None,
        attr_timeout: float | None = None,
        inline_metadata: bool = INLINE_METADATA_DEFAULT,
        inline_read_max: int = INLINE_READ_MAX_DEFAULT,
        inline_write_max: int = INLINE_WRITE_MAX_DEFAULT,
        max_lock_waiters: int = 16,
        proc_self_fd: int | None = None,
    ) -> None:
        if cache not in CACHE_POLICIES:
            raise ValueError(f"cache must be one of {', '.join(CACHE_POLICIES)}, not {cache!r}")
        if inode_file_handles not in INODE_FILE_HANDLES:
            raise ValueError(f"inode_file_handles must be one of {', '.join(INODE_FILE_HANDLES)}")
        self.root_path = os.fspath(root)
        self.readonly = readonly
        self.xattr = xattr or posix_acl
        self.posix_acl = posix_acl
        self.cache = cache
        self.writeback = writeback
        self.announce_submounts = announce_submounts
        self.allow_direct_io = allow_direct_io
        self.inline_metadata = inline_metadata
        self.inline_read_max = inline_read_max
        self.inline_write_max = inline_write_max
        self.max_lock_waiters = max_lock_waiters
        timeout = CACHE_TIMEOUTS[cache]
        self.entry_timeout = timeout if entry_timeout is None else entry_timeout
        self.attr_timeout = timeout if attr_timeout is None else attr_timeout
        # Instance values of the session's capability flags.
        self.enable_writeback_cache = writeback
        self.handles_umask = posix_acl
        self.supports_posix_acl = posix_acl
        self.supports_posix_locks = posix_locks
        self.supports_flock_locks = flock_locks
        self.supports_readdirplus = readdirplus and cache != "never"

        if proc_self_fd is not None:
            self._proc_fd = fcntl.fcntl(proc_self_fd, fcntl.F_DUPFD_CLOEXEC, 3)
        else:
            self._proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            # /proc/self/fdinfo, for the lock lists of our fds (GETLK's pid);
            # reached now, while the sandbox's /proc still has it in place.
            self._fdinfo_fd = os.open("../fdinfo", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self._proc_fd)
        except OSError as exc:
            log.info("no /proc/self/fdinfo (%s): GETLK reports no holder pid", exc.strerror)
            self._fdinfo_fd = -1
        try:
            root_fd = os.open(self.root_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(self._proc_fd)
            if self._fdinfo_fd >= 0:
                os.close(self._fdinfo_fd)
            raise
        # A readable fd of the root: syncfs(), and open_by_handle_at's mount fd.
        self._root_rd = self._proc_open(root_fd, os.O_RDONLY | os.O_DIRECTORY)
        st = os.fstat(root_fd)
        self._root = _Inode(ROOT_INODE, (st.st_dev, st.st_ino), stat.S_IFDIR, root_fd, lookups=1)
        self._inodes: dict[int, _Inode] = {ROOT_INODE: self._root}
        self._by_key: dict[tuple[int, int], _Inode] = {self._root.key: self._root}
        #: The part of _by_key whose node id is not the host inode number
        #: (the root, synthetic ids): what a READDIR record must translate.
        self._remapped: dict[tuple[int, int], _Inode] = {self._root.key: self._root}
        self._handles: dict[int, _Handle] = {}
        self._next_fh = 1
        self._next_synthetic = _FIRST_SYNTHETIC_NODEID
        self._mount_fds: dict[int, int] = {}
        self._lock_waiters = 0
        self._switching = _hostfs.SWITCH_CREDENTIALS
        if self._switching and not _hostfs.per_thread_groups_supported():
            log.warning("no per-thread setgroups on %s: requests keep the daemon's supplementary groups",
                        _hostfs._MACHINE)
        self.file_handles = inode_file_handles
        if inode_file_handles != "never":
            self._setup_file_handles(inode_file_handles)

    def _setup_file_handles(self, mode: str) -> None:
        try:
            handle = _hostfs.name_to_handle(self._root.fd)
            probe = _hostfs.open_by_handle(self._root_rd, handle, os.O_PATH)
            os.close(probe)
        except OSError as exc:
            if mode == "mandatory":
                self.close()
                raise OSError(exc.errno, f"inode_file_handles=mandatory, but file handles fail here: {exc.strerror}")
            log.warning("file handles unavailable (%s): using O_PATH fds", exc.strerror)
            self.file_handles = "never"
            return
        self._mount_fds[handle.mount_id] = self._root_rd

    # ------------------------------------------------------------------
    # the worker pool (replaced by the server with the runtime's run_in_thread)
    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:  # type: ignore[override]
        """Run the blocking ``fn(*args)``; this fallback runs it inline."""
        return fn(*args)

    # ------------------------------------------------------------------
    # introspection (tests and tools)
    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    def lookup_count(self, nodeid: int) -> int:
        node = self._inodes.get(nodeid)
        return 0 if node is None else node.lookups

    def held_fds(self) -> int:
        """fds this backend holds open right now (inodes, handles, locks, mounts)."""
        n = 2 + sum(1 for node in self._inodes.values() if node.fd >= 0)
        n += sum(len(node.plocks) for node in self._inodes.values())
        n += sum(1 for h in self._handles.values())
        n += sum(1 for fd in self._mount_fds.values() if fd != self._root_rd)
        return n

    def host_key(self, nodeid: int) -> tuple[int, int]:
        """The (st_dev, st_ino) behind a nodeid."""
        return self._node(nodeid).key

    def close(self) -> None:
        """Close every fd, the root's too; the object is unusable after."""
        self._reset()
        for node in list(self._inodes.values()):  # still pinned by abandoned workers
            if node is not self._root:
                node.pins = 0
                self._maybe_drop(node)
        for fd in {self._root.fd, self._root_rd, self._proc_fd, self._fdinfo_fd, *self._mount_fds.values()}:
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._mount_fds.clear()
        self._root.fd = -1
        self._root_rd = -1
        self._proc_fd = -1
        self._fdinfo_fd = -1

    # ------------------------------------------------------------------
    # plumbing
    def _node(self, nodeid: int) -> _Inode:
        node = self._inodes.get(nodeid)
        if node is None:
            raise _err(errno.ESTALE)
        return node

    def _dir_node(self, nodeid: int) -> _Inode:
        node = self._node(nodeid)
        if node.kind != stat.S_IFDIR:
            raise _err(errno.ENOTDIR)
        return node

    def _handle(self, fh: int) -> _Handle:
        h = self._handles.get(fh)
        if h is None:
            raise _err(errno.EBADF)
        return h

    def _file_handle(self, fh: int) -> _Handle:
        h = self._handle(fh)
        if h.is_dir:
            raise _err(errno.EISDIR)
        return h

    def _check_writable_fs(self) -> None:
        if self.readonly:
            raise _err(errno.EROFS)

    def _creds(self, ctx: RequestContext) -> Credentials | None:
        """The caller's credentials, for the requests that run as the caller
        (see the module docstring); None to run as the daemon."""
        if not self._switching or (ctx.uid == 0 and ctx.gid == 0):
            return None
        return Credentials(ctx.uid, ctx.gid, None if ctx.uid == 0 else tuple(ctx.groups or ()))

    def _umask(self, ctx: RequestContext) -> int:
        return ctx.umask if self.handles_umask else 0

    async def _run(
        self, pins: Iterable[Any], blocking: bool, fn: Callable[..., T], *args: Any,
        cleanup: Callable[[T], None] | None = None,
    ) -> T:
        """Run ``fn(*args)`` (in the pool if ``blocking`` or not inlining)
        with the inodes/handles in ``pins`` kept open; OSError -> FuseError.

        Inline, nothing else runs until ``fn`` returns: no pins needed. In
        the pool, if the awaiting request is cancelled while a worker still
        runs, the pins stay (the worker may be using their fds) and
        ``cleanup`` undoes whatever the worker returns (closes the fds it
        opened)."""
        if not blocking and self.inline_metadata:
            try:
                return fn(*args)
            except OSError as exc:
                raise FuseError(exc.errno or errno.EIO) from None
        pinned = tuple(pins)
        for obj in pinned:
            obj.pins += 1
        box = None if cleanup is None else _Box(cleanup)
        try:
            if box is None:
                result = await self.run_blocking(fn, *args)
            else:
                result = await self.run_blocking(box.run, fn, *args)
        except OSError as exc:
            self._unpin(pinned)
            raise FuseError(exc.errno or errno.EIO) from None
        except Exception:
            self._unpin(pinned)
            raise
        except BaseException:
            if box is not None:
                box.abandon()  # cancelled: leave the pins, let the worker clean up
            raise
        self._unpin(pinned)
        return result

    def _unpin(self, pinned: tuple[Any, ...]) -> None:
        for obj in pinned:
            obj.pins -= 1
            if obj.pins == 0:
                if isinstance(obj, _Inode):
                    self._maybe_drop(obj)
                elif obj.closed:
                    self._close_handle_fd(obj)

    # -- fds of inodes (called on worker threads) ------------------------------------
    def _with_fd(self, node: _Inode, fn: Callable[..., T], *args: Any) -> T:
        """``fn(fd, *args)`` with an O_PATH fd of ``node``."""
        if node.fd >= 0:
            return fn(node.fd, *args)
        assert node.handle is not None
        fd = _hostfs.open_by_handle(node.mount_fd, node.handle, os.O_PATH)
        try:
            return fn(fd, *args)
        finally:
            os.close(fd)

    def _proc_open(self, fd: int, flags: int) -> int:
        """Reopen the inode behind ``fd`` through /proc/self/fd (no path
        from the guest involved)."""
        return os.open(str(fd), flags | os.O_CLOEXEC, dir_fd=self._proc_fd)

    def _lookup_at(self, dirfd: int, name: bytes) -> tuple[int, os.stat_result, Any]:
        """(O_PATH fd, stat, handle info) of ``name`` in ``dirfd``."""
        if name == b"..":
            fd = os.open(b"..", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
        else:
            fd = _hostfs.open_beneath(dirfd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
            info = self._handle_info(fd, st) if self.file_handles != "never" else None
        except BaseException:
            os.close(fd)
            raise
        return fd, st, info

    def _handle_info(self, fd: int, st: os.stat_result) -> tuple[FileHandle, int] | None:
        """A file handle for ``fd`` plus a mount fd to open it with (a new
        fd when its mount is new, else the known one), or None to keep the
        O_PATH fd. Worker thread; the loop registers the result."""
        try:
            handle = _hostfs.name_to_handle(fd)
        except OSError as exc:
            if self.file_handles == "mandatory" or exc.errno not in _NO_HANDLE_ERRNOS:
                raise
            return None
        mount_fd = self._mount_fds.get(handle.mount_id)
        if mount_fd is None:
            if not stat.S_ISDIR(st.st_mode):
                if self.file_handles == "mandatory":
                    raise OSError(errno.EOPNOTSUPP, "no mount fd for a non-directory on a new mount")
                return None
            mount_fd = self._proc_open(fd, os.O_RDONLY | os.O_DIRECTORY)
            return handle, -mount_fd - 2  # marks "new mount fd, register it"
        return handle, mount_fd

    # -- the inode table (event loop only) -------------------------------------------
    def _alloc_nodeid(self, ino: int) -> int:
        if 1 < ino < _FIRST_SYNTHETIC_NODEID and ino not in self._inodes:
            return ino
        while self._next_synthetic in self._inodes:
            self._next_synthetic += 1
        nodeid = self._next_synthetic
        self._next_synthetic += 1
        return nodeid

    def _adopt(self, fd: int, dev: int, ino: int, mode: int) -> _Inode:
        """The table's inode for a fresh O_PATH ``fd`` of host inode
        ``(dev, ino)`` (fd is consumed): the known one (fd closed), else a
        new one that keeps fd, with no lookups counted. Also the inline
        responder's ``adopt``."""
        key = (dev, ino)
        node = self._by_key.get(key)
        if node is not None:
            os.close(fd)
            return node
        nodeid = self._alloc_nodeid(ino)
        node = _Inode(nodeid, key, stat.S_IFMT(mode), fd, None, -1)
        self._inodes[nodeid] = node
        self._key_node(key, node)
        return node

    def _key_node(self, key: tuple[int, int], node: _Inode) -> None:
        """``node`` is now the table's inode for host key ``key``."""
        self._by_key[key] = node
        if node.nodeid != key[1]:
            self._remapped[key] = node
        else:
            self._remapped.pop(key, None)

    def _unkey(self, key: tuple[int, int]) -> None:
        """Host key ``key`` has no inode in the table any more."""
        del self._by_key[key]
        self._remapped.pop(key, None)

    def _install(self, fd: int, st: os.stat_result, info: Any) -> _Inode:
        """The table's inode for a fresh lookup result (fd is consumed);
        a new one is added with no lookups counted."""
        if info is None:
            return self._adopt(fd, st.st_dev, st.st_ino, st.st_mode)
        key = (st.st_dev, st.st_ino)
        handle: FileHandle | None = None
        mount_fd = -1
        if info is not None:
            handle, mount_fd = info
            if mount_fd <= -2:  # a new mount fd from the worker
                mount_fd = -mount_fd - 2
                known = self._mount_fds.get(handle.mount_id)
                if known is None:
                    self._mount_fds[handle.mount_id] = mount_fd
                else:
                    os.close(mount_fd)
                    mount_fd = known
        node = self._by_key.get(key)
        if node is not None and (handle is None or node.handle is None or node.handle == handle):
            os.close(fd)
            return node
        if node is not None:
            # Same (dev, ino), another handle: the old inode is gone and its
            # number reused. The old record lives on for its holders only.
            self._unkey(key)
        nodeid = self._alloc_nodeid(st.st_ino)
        if handle is not None:
            os.close(fd)
            fd = -1
        node = _Inode(nodeid, key, stat.S_IFMT(st.st_mode), fd, handle, mount_fd)
        self._inodes[nodeid] = node
        self._key_node(key, node)
        return node

    def _maybe_drop(self, node: _Inode) -> None:
        if node.lookups > 0 or node.opens > 0 or node.pins > 0 or node is self._root or node.gone:
            return
        node.gone = True
        if self._inodes.get(node.nodeid) is node:
            del self._inodes[node.nodeid]
        if self._by_key.get(node.key) is node:
            self._unkey(node.key)
        for fd in node.plocks.values():
            _close_quietly(fd)
        node.plocks.clear()
        node.lock_pids.clear()
        if node.fd >= 0:
            _close_quietly(node.fd)
            node.fd = -1

    def _attrs(self, nodeid: int, st: os.stat_result, flags: int = 0) -> EntryAttributes:
        rdev = st.st_rdev
        # Positional, in EntryAttributes' field order (the hot path: every
        # GETATTR and LOOKUP); tests compare with the keyword form.
        return EntryAttributes(
            nodeid, 0, self.entry_timeout, self.attr_timeout,
            st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
            codec.host_rdev_to_guest(rdev) if rdev else 0,
            st.st_size, st.st_blksize, st.st_blocks,
            st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns, flags,
        )

    def _entry_flags(self, st: os.stat_result, parent: _Inode) -> int:
        if self.announce_submounts and stat.S_ISDIR(st.st_mode) and st.st_dev != parent.dev:
            return abi.FUSE_ATTR_SUBMOUNT
        return 0

    def _entry(self, node: _Inode, st: os.stat_result, parent: _Inode) -> EntryAttributes:
        """Attributes handed to the guest: counts one lookup of ``node``."""
        node.lookups += 1
        return self._attrs(node.nodeid, st, self._entry_flags(st, parent))

    def _register(self, result: tuple[int, os.stat_result, Any], parent: _Inode) -> tuple[_Inode, EntryAttributes]:
        fd, st, info = result
        node = self._install(fd, st, info)
        return node, self._entry(node, st, parent)

    # -- handles -----------------------------------------------------------------------
    def _new_handle(self, node: _Inode, fd: int, is_dir: bool, flags: int) -> FileInfo:
        fh = self._next_fh
        self._next_fh += 1
        writable = not is_dir and (flags & os.O_ACCMODE) != os.O_RDONLY
        # O_DIRECT reads wait for the device even with RWF_NOWAIT.
        nowait = not is_dir and self.inline_read_max > 0 and not flags & os.O_DIRECT
        inline_write = (
            writable and self.inline_write_max > 0 and not flags & _WAITING_WRITES and _on_block_device(node.dev)
        )
        self._handles[fh] = _Handle(fh, node, fd, is_dir, writable, nowait, inline_write)
        node.opens += 1
        policy = self.cache
        if is_dir:
            cached = policy in ("metadata", "always")
            return FileInfo(fh=fh, keep_cache=cached, cache_dir=cached)
        direct = policy in ("never", "metadata") or bool(self.allow_direct_io and flags & os.O_DIRECT)
        return FileInfo(fh=fh, direct_io=direct, keep_cache=policy == "always")

    def _close_handle_fd(self, h: _Handle) -> None:
        if h.fd >= 0:
            _close_quietly(h.fd)
            h.fd = -1

    def _drop_handle(self, fh: int) -> _Handle | None:
        """Take ``fh`` out of the table; its fd is closed by the caller when
        nothing uses it, else by the last user."""
        h = self._handles.pop(fh, None)
        if h is None:
            return None
        h.closed = True
        h.node.opens -= 1
        self._maybe_drop(h.node)
        return h

    def _reset(self) -> None:
        for fh in list(self._handles):
            h = self._drop_handle(fh)
            if h is not None and h.pins == 0:
                self._close_handle_fd(h)
        for node in list(self._inodes.values()):
            if node is self._root:
                continue
            node.lookups = 0
            self._maybe_drop(node)
        for fd in self._root.plocks.values():
            _close_quietly(fd)
        self._root.plocks.clear()
        self._root.lock_pids.clear()

    def _open_flags(self, flags: int) -> int:
        allowed = _OPEN_ALLOWED | (os.O_DIRECT if self.allow_direct_io else 0)
        out = flags & allowed
        if self.writeback:
            out &= ~os.O_APPEND  # the guest's page cache decides where appends go
        return out

    # ------------------------------------------------------------------
    # lifecycle
    def inline_responder(self, max_read: int) -> Any | None:
        """With ``inline_metadata``: a responder that answers GETATTR and
        LOOKUP from this backend's tables at the queue
        (:mod:`virtiofs_async.responder`; LOOKUP only without file handles,
        and then also of names new to the tables, which it installs with
        ``_adopt``), FORGET (``_maybe_drop`` frees what drops to 0), and
        FLUSH, RELEASE and RELEASEDIR where they close inline
        (``_flush_inline``, ``_release_inline``), READDIR and READDIRPLUS
        where :meth:`readdir` reads inline (``_readdir_inline``), CREATE where
        :meth:`create` creates inline (``_create_inline``), SETATTR where
        :meth:`setattr` runs inline (``_setattr_inline``: no truncation),
        MKDIR where :meth:`mkdir` creates inline (``_mkdir_inline``),
        UNLINK and RMDIR where :meth:`unlink` / :meth:`rmdir` remove inline
        (``_remove_inline``), OPEN and OPENDIR where :meth:`open` /
        :meth:`opendir` open inline (``_open_inline``: no O_TRUNC),
        with the timeouts as they are now, and (compiled twin) READs of up
        to ``min(max_read, inline_read_max)`` bytes that the page cache
        holds whole, read with ``preadv2(RWF_NOWAIT)`` straight into the
        guest's buffers, and WRITEs of up to ``inline_write_max`` bytes to
        handles that write inline (``pwritev`` from the guest's buffers).
        None when a subclass or the instance replaces a method those
        answers go through, since the responder would bypass it."""
        if not self.inline_metadata or not self._bypasses_intact():
            return None
        read_max = max(0, min(max_read, self.inline_read_max))
        write_max = 0 if self.readonly else max(0, self.inline_write_max)
        lookups = self.file_handles == "never"
        return _accel.PassthroughResponder(
            self._inodes, self._by_key, self.entry_timeout, self.attr_timeout, self.announce_submounts,
            lookups, self._handles, read_max, write_max,
            adopt=self._adopt if lookups else None, drop=self._maybe_drop,
            flush=self._flush_inline, release=self._release_inline, readdir=self._readdir_inline,
            readdirplus=self._readdirplus_inline if lookups else None,
            create=self._create_inline, setattr=self._setattr_inline, remove=self._remove_inline,
            open=self._open_inline, mkdir=self._mkdir_inline, proc_fd=-1 if self.readonly else self._proc_fd,
            create_host=self._create_host_config(),
            readdir_host=self._readdir_host_config(), tables=self._tables_config() if lookups else None,
            close_host=self._fast_namespace, remove_host=None if self.readonly else _FAST_DROP_BYTES,
        )

    def _create_host_config(self) -> tuple[Any, ...] | None:
        """What the compiled responder needs to make a CREATE's host calls
        itself, as ``_w_create`` makes them (see ``_created_inline``); None
        where those calls differ: a read-only share, file handles (the new
        inode's handle is asked for), the write-back cache (a write-only
        open is reopened read-write). Its last item is the backend itself:
        given the tables too, the responder installs the new handle as
        ``_new_handle`` does, from its ``_next_fh``, ``inline_read_max``,
        ``inline_write_max``, ``cache`` and ``allow_direct_io``."""
        if self.readonly or self.writeback or self.file_handles != "never":
            return None
        allowed = _OPEN_ALLOWED | (os.O_DIRECT if self.allow_direct_io else 0)
        return (self._created_inline, allowed, self._switching, self.handles_umask, self._create_gate, self)

    def _readdir_host_config(self) -> tuple[Any, ...]:
        """What the compiled responder needs to answer a READDIR (and a
        READDIRPLUS) as ``_readdir_inline`` does without calling it: the
        gate for the handle's directory, the ``_remapped`` table, the root
        inode, ``_getdents_size``'s terms and the host record class."""
        return (self._fast_namespace, self._remapped, self._root, _READDIR_READ, _READDIR_AHEAD, _GETDENTS_MIN,
                _hostfs.Dirent)

    def _tables_config(self) -> tuple[Any, ...]:
        """What the compiled responder needs to make ``_adopt`` and
        ``_maybe_drop``'s table updates itself where they are plain (a node
        id that is the host's inode number; an inode without POSIX lock
        fds): the ``_remapped`` table, the root, the inode class and the
        first synthetic node id."""
        return (self._remapped, self._root, _Inode, _FIRST_SYNTHETIC_NODEID)

    def _create_gate(self, parent: _Inode) -> bool:
        """Whether a CREATE or MKDIR in known directory ``parent`` runs
        inline on this thread: a writable share, namespace calls inline on
        its filesystem, a umask of the thread's own."""
        return not self.readonly and self._fast_namespace(parent) and _hostfs.umask_is_private()

    def _created_inline(self, opath: int, dev: int, ino: int, mode: int, fd: int, oflags: int) -> tuple[int, int, int]:
        """A file the compiled responder created (``fd`` open with
        ``oflags``, ``opath`` an O_PATH fd of it: both consumed), installed
        as ``_create_inline`` installs it (one lookup counted, a new
        handle): its ``(nodeid, fh, fuse_open_out flags)``."""
        node = self._adopt(opath, dev, ino, mode)
        node.lookups += 1
        fi = self._new_handle(node, fd, False, oflags)
        return node.nodeid, fi.fh, open_flags(fi)

    def _bypasses_intact(self) -> bool:
        """Whether neither a subclass nor the instance replaces a method the
        inline responder's answers bypass."""
        cls = type(self)
        own = vars(self)
        for name in _RESPONDER_BYPASSES:
            if getattr(cls, name) is not getattr(PassthroughFS, name) or name in own:
                return False
        return True

    def _plus_packer(self, checked: bool = False) -> Any | None:
        """A responder whose ``pack_readdirplus`` builds READDIRPLUS records
        (lookups included) in one call, or None where LOOKUP would not run
        inline or a bypassed method is replaced (``checked``: the caller
        knows none is, as the inline responder's callbacks do). Rebuilt
        when the timeouts change."""
        if not self.inline_metadata or self.file_handles != "never" or not (checked or self._bypasses_intact()):
            return None
        key = (self.entry_timeout, self.attr_timeout, self.announce_submounts)
        cached = getattr(self, "_packer_cache", None)
        if cached is None or cached[0] != key:
            cached = (key, _accel.PassthroughResponder(
                self._inodes, self._by_key, self.entry_timeout, self.attr_timeout, self.announce_submounts, True,
                adopt=self._adopt, drop=self._maybe_drop, tables=self._tables_config(),
            ))
            self._packer_cache = cached
        return cached[1]

    async def destroy(self) -> None:
        """Drop every lookup and handle; the root stays."""
        self._reset()

    # ------------------------------------------------------------------
    # names and inodes
    async def lookup(self, parent: InodeT, name: bytes, ctx: RequestContext) -> EntryAttributes:
        p = self._dir_node(parent)
        _check_name(name)
        if name == b"." or (name == b".." and p is self._root):
            st = await self._run((p,), False, self._with_fd, p, os.fstat)
            return self._entry(p, st, p)
        if self.inline_metadata and p.fd >= 0 and self.file_handles == "never" and name != b"..":
            # An inode we know: fstatat of the one component (following
            # nothing) finds it without opening it. Exact while every known
            # inode holds an O_PATH fd: its number cannot be reused meanwhile.
            try:
                st = os.stat(name, dir_fd=p.fd, follow_symlinks=False)
            except OSError as exc:
                raise FuseError(exc.errno or errno.EIO) from None
            node = self._by_key.get((st.st_dev, st.st_ino))
            if node is not None:
                return self._entry(node, st, p)
        result = await self._run((p,), False, self._with_fd, p, self._lookup_at, name,
                                 cleanup=_close_lookup_result)
        return self._register(result, p)[1]

    async def forget(self, inodes: Sequence[tuple[InodeT, int]]) -> None:
        for nodeid, n in inodes:
            node = self._inodes.get(nodeid)
            if node is None or node is self._root or n <= 0:
                continue
            node.lookups = max(0, node.lookups - n)
            self._maybe_drop(node)

    async def getattr(self, inode: InodeT, ctx: RequestContext, fh: FileHandleT | None = None) -> EntryAttributes:
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.node.nodeid == inode:
            fd = h.fd
        else:
            node = self._inodes.get(inode)
            if node is None:
                raise _err(errno.ESTALE)
            fd = node.fd
            if fd < 0 or not self.inline_metadata:
                st = await self._run((node,), False, self._with_fd, node, os.fstat)
                return self._attrs(inode, st)
        if self.inline_metadata:  # the hot path: no coroutine, no pins (see _run)
            try:
                st = os.fstat(fd)
            except OSError as exc:
                raise FuseError(exc.errno or errno.EIO) from None
        else:
            st = await self._run((h,), False, os.fstat, fd)
        return self._attrs(inode, st)

    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        self._check_writable_fs()
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.node.nodeid != inode:
            h = None
        node = h.node if h is not None else self._node(inode)
        f = fields
        if f.update_mode and node.kind == stat.S_IFLNK:
            raise _err(errno.EOPNOTSUPP)
        if f.update_size:
            if node.kind != stat.S_IFREG:
                raise _err(errno.EISDIR if node.kind == stat.S_IFDIR else errno.EINVAL)
            _check_range(attr.st_size)
        pins: tuple[Any, ...] = (node,) if h is None else (node, h)
        # chmod/chown/utimensat only touch the inode: fast metadata, inline
        # like getattr; a truncate can free a whole file: the pool.
        st = await self._run(
            pins, f.update_size, self._with_fd, node, self._w_setattr, node, attr, f, h, ctx.uid
        )
        return self._attrs(node.nodeid, st)

    def _setattr_inline(self, nodeid: int, setattr_in: bytes, uid: int, gid: int, pid: int) -> bytes | int | None:
        """SETATTR for the inline responder (``setattr_in``: the request's
        88-byte ``fuse_setattr_in``), as :meth:`setattr` does it inline:
        the ``fuse_attr_out`` body, or the errno of a failing host call
        (what it changed before stays changed, as in the full path), or
        None, with nothing done, for the full path (truncation, which goes
        to the pool, an unknown inode, a read-only share, a symlink's mode)."""
        if not self.inline_metadata or self.readonly:
            return None
        v = _setattr_in_unpack(setattr_in)
        attr, f, fh = setattr_arguments(nodeid, v[0], v[2], v[3], v[5], v[6], v[7], v[8], v[9], v[10], v[11],
                                        v[13], v[14])
        if f.update_size:
            return None
        h = self._handles.get(fh) if fh is not None else None
        if h is not None and h.node.nodeid != nodeid:
            h = None
        node = h.node if h is not None else self._inodes.get(nodeid)
        if node is None or (f.update_mode and node.kind == stat.S_IFLNK):
            return None
        try:
            st = self._with_fd(node, self._w_setattr, node, attr, f, h, uid)
        except OSError as exc:
            err = exc.errno or errno.EIO
            log.info("SETATTR nodeid=%d -> %s", nodeid, errno.errorcode.get(err, err))
            return err
        except Exception:
            log.exception("SETATTR nodeid=%d failed -> EIO", nodeid)
            return errno.EIO  # as the full path answers a backend failure
        return _accel.pack_attr_out(self._attrs(node.nodeid, st))

    def _w_setattr(
        self, pfd: int, node: _Inode, attr: EntryAttributes, f: SetattrFields, h: _Handle | None, uid: int,
    ) -> os.stat_result:
        name = str(pfd).encode()
        proc = self._proc_fd
        if f.update_mode:
            os.chmod(name, attr.st_mode & 0o7777, dir_fd=proc)
        if f.update_uid or f.update_gid:
            # Following the magic link reaches the inode itself, a symlink included.
            os.chown(name, attr.st_uid if f.update_uid else -1, attr.st_gid if f.update_gid else -1,
                     dir_fd=proc)
        if f.update_size:
            if h is not None and h.writable:
                os.ftruncate(h.fd, attr.st_size)
            else:
                fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=proc)
                try:
                    os.ftruncate(fd, attr.st_size)
                finally:
                    os.close(fd)
        if f.update_atime or f.update_mtime or f.update_atime_now or f.update_mtime_now:
            _hostfs.utimensat(
                proc, name,
                attr.st_atime_ns if f.update_atime else None,
                attr.st_mtime_ns if f.update_mtime else None,
                atime_now=f.update_atime_now, mtime_now=f.update_mtime_now,
            )
        st = os.fstat(pfd)
        if node.kind == stat.S_IFREG and (f.kill_suidgid or (uid != 0 and f.update_size)):
            new = _kill_suidgid_mode(st.st_mode)
            if new != st.st_mode:
                os.chmod(name, stat.S_IMODE(new), dir_fd=proc)
                st = os.fstat(pfd)
        return st

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        node = self._node(inode)
        if node.kind != stat.S_IFLNK:
            raise _err(errno.EINVAL)
        return await self._run((node,), False, self._with_fd, node, _readlink)

    async def _make(
        self, parent: InodeT, name: bytes, ctx: RequestContext, fn: Callable[..., Any], *args: Any,
        umask: bool = True,
    ) -> EntryAttributes:
        """Create ``name`` in ``parent`` with ``fn(dirfd, name, *args)`` as
        the caller, then look it up (counts one lookup)."""
        self._check_writable_fs()
        p = self._dir_node(parent)
        _check_name(name)
        creds = self._creds(ctx)
        mask = self._umask(ctx) if umask else None
        inline = self._fast_namespace(p) and (mask is None or _hostfs.umask_is_private())
        result = await self._run((p,), not inline, self._with_fd, p, self._w_make, name, creds, mask, fn, *args,
                                 cleanup=_close_lookup_result)
        return self._register(result, p)[1]

    def _w_make(self, dirfd: int, name: bytes, creds: Credentials | None, umask: int | None, fn: Callable[..., Any],
                *args: Any) -> tuple[int, os.stat_result, Any]:
        call_as(creds, umask, fn, dirfd, name, *args)
        return self._lookup_at(dirfd, name)

    def _inline_parent(self, parent: int, name: bytes) -> _Inode | None:
        """The directory an inline CREATE or MKDIR of ``name`` makes it in,
        or None where the full path must: not inline, a read-only share,
        an unknown or non-directory parent, a bad name, namespace calls that
        go to the pool, or a loop thread whose umask the process shares."""
        if not self.inline_metadata:
            return None
        try:
            p = self._dir_node(parent)
            _check_name(name)
        except FuseError:
            return None
        return p if self._create_gate(p) else None

    def _mkdir_inline(self, parent: int, name: bytes, mode: int, umask: int, uid: int, gid: int,
                      pid: int) -> bytes | int | None:
        """MKDIR for the inline responder (a request without extensions: no
        supplementary groups), as :meth:`mkdir` does it when it runs inline:
        the ``fuse_entry_out`` body (the lookup counted), or the errno of a
        failed host call, or None, with nothing done, for the full path (an
        unknown or non-directory parent, a bad name, a read-only share, a
        directory whose namespace calls go to the pool)."""
        p = self._inline_parent(parent, name)
        if p is None:
            return None
        ctx = RequestContext(uid, gid, pid, umask)
        try:
            result = self._with_fd(p, self._w_make, name, self._creds(ctx), self._umask(ctx), _mkdirat, mode & 0o7777)
        except Exception as exc:
            return _inline_errno("MKDIR", parent, exc)
        try:
            entry = self._register(result, p)[1]
        except Exception:
            _close_lookup_result(result)
            log.exception("MKDIR nodeid=%d: installing the new inode failed -> EIO", parent)
            return errno.EIO
        return _accel.pack_entry_out(entry)

    async def mknod(self, parent: InodeT, name: bytes, mode: int, rdev: int, ctx: RequestContext) -> EntryAttributes:
        kind = stat.S_IFMT(mode) or stat.S_IFREG
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EPERM if kind == stat.S_IFDIR else errno.EINVAL)
        device = codec.guest_rdev_to_host(rdev) if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
        return await self._make(parent, name, ctx, _mknodat, kind | (mode & 0o7777), device)

    async def mkdir(self, parent: InodeT, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        return await self._make(parent, name, ctx, _mkdirat, mode & 0o7777)

    async def symlink(self, parent: InodeT, name: bytes, target: bytes, ctx: RequestContext) -> EntryAttributes:
        if not target or b"\0" in target:
            raise _err(errno.ENOENT if not target else errno.EINVAL)
        return await self._make(parent, name, ctx, _symlinkat, bytes(target), umask=False)

    async def link(self, inode: InodeT, new_parent: InodeT, new_name: bytes, ctx: RequestContext) -> EntryAttributes:
        self._check_writable_fs()
        node = self._node(inode)
        p = self._dir_node(new_parent)
        _check_name(new_name)
        if node.kind == stat.S_IFDIR:
            raise _err(errno.EPERM)

        def work(dirfd: int) -> os.stat_result:
            return self._with_fd(node, self._w_link, dirfd, new_name)

        st = await self._run((p, node), not self._fast_namespace(p), self._with_fd, p, work)
        return self._entry(node, st, p)

    def _w_link(self, srcfd: int, dirfd: int, name: bytes) -> os.stat_result:
        _linkat_proc(self._proc_fd, srcfd, dirfd, name)
        return os.fstat(srcfd)

    async def _remove(self, parent: InodeT, name: bytes, fn: Callable[..., None]) -> None:
        self._check_writable_fs()
        p = self._dir_node(parent)
        _check_name(name)
        blocking = not (self._fast_namespace(p) and self._drops_fast(p, name))
        await self._run((p,), blocking, self._with_fd, p, fn, name)

    def _remove_inline(self, parent: int, name: bytes, is_dir: bool) -> int | None:
        """UNLINK / RMDIR for the inline responder (``name`` a component
        other than ``.`` and ``..``), as :meth:`unlink` / :meth:`rmdir` do
        it when they run inline: 0, or the errno of the failed host call,
        or None, with nothing done, for the full path (an unknown or
        non-directory parent, a read-only share, a removal that goes to the
        pool: a slow filesystem, or the last link of a large file)."""
        if not self.inline_metadata or self.readonly:
            return None
        p = self._inodes.get(parent)
        if p is None or p.kind != stat.S_IFDIR:
            return None
        if not (self._fast_namespace(p) and self._drops_fast(p, name)):
            return None
        try:
            self._with_fd(p, _rmdirat if is_dir else _unlinkat, name)
        except OSError as exc:
            return _inline_errno("RMDIR" if is_dir else "UNLINK", parent, exc)
        return 0

    async def unlink(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        if name in _DOTS:
            raise _err(errno.EISDIR)
        await self._remove(parent, name, _unlinkat)

    async def rmdir(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        if name in _DOTS:
            raise _err(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
        await self._remove(parent, name, _rmdirat)

    async def rename(
        self,
        parent_old: InodeT,
        name_old: bytes,
        parent_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        self._check_writable_fs()
        op = self._dir_node(parent_old)
        np = self._dir_node(parent_new)
        _check_name(name_old)
        _check_name(name_new)
        if name_old in _DOTS or name_new in _DOTS:
            raise _err(errno.EBUSY)

        def work(ofd: int) -> None:
            self._with_fd(np, lambda nfd: _hostfs.renameat2(ofd, name_old, nfd, name_new, flags))

        blocking = not (self._fast_namespace(op) and self._fast_namespace(np)
                        and (flags & RENAME_EXCHANGE or self._drops_fast(np, name_new)))
        await self._run((op, np), blocking, self._with_fd, op, work)

    # ------------------------------------------------------------------
    # files
    def _check_openable(self, node: _Inode) -> None:
        if node.kind == stat.S_IFDIR:
            raise _err(errno.EISDIR)
        if node.kind == stat.S_IFLNK:
            raise _err(errno.ELOOP)
        if node.kind != stat.S_IFREG:
            raise _err(errno.ENXIO)  # devices, fifos, sockets: the guest's own business

    def _upgrade_for_writeback(self, fd: int, oflags: int) -> int:
        """With the write-back cache, the guest reads through write-only
        handles (partial pages): reopen read-write, the open itself having passed the
        guest's permission check."""
        if not self.writeback or oflags & os.O_ACCMODE != os.O_WRONLY:
            return fd
        try:
            rw = self._proc_open(fd, (oflags & ~(os.O_ACCMODE | os.O_TRUNC)) | os.O_RDWR)
        except OSError:
            return fd
        os.close(fd)
        return rw

    def _w_open(self, pfd: int, oflags: int) -> int:
        return self._upgrade_for_writeback(self._proc_open(pfd, oflags), oflags)

    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        node = self._node(inode)
        self._check_openable(node)
        if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
            raise _err(errno.EROFS)
        oflags = self._open_flags(flags)
        blocking = oflags & os.O_TRUNC or not self._fast_namespace(node)
        fd = await self._run((node,), blocking, self._with_fd, node, self._w_open, oflags,
                             cleanup=_close_quietly)
        return self._new_handle(node, fd, False, oflags)

    def _open_inline(self, nodeid: int, flags: int, is_dir: bool) -> bytes | int | None:
        """OPEN / OPENDIR for the inline responder, as :meth:`open` /
        :meth:`opendir` do it when they run inline: the ``fuse_open_out``
        body (the handle installed), or the errno of the failed host call,
        or None, with nothing done, for the full path (an unknown inode, one
        the full path refuses, O_TRUNC, a read-only share asked to write,
        a slow filesystem)."""
        if not self.inline_metadata:
            return None
        node = self._inodes.get(nodeid)
        if node is None:
            return None
        if is_dir:
            if node.kind != stat.S_IFDIR:
                return None
            oflags = os.O_RDONLY
            how = os.O_RDONLY | os.O_DIRECTORY
        else:
            if node.kind != stat.S_IFREG:
                return None
            if self.readonly and (flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC):
                return None
            how = oflags = self._open_flags(flags)
            if oflags & os.O_TRUNC:
                return None  # truncation runs in the pool
        if not self._fast_namespace(node):
            return None
        try:
            fd = self._with_fd(node, self._w_open, how)
        except OSError as exc:
            return _inline_errno("OPENDIR" if is_dir else "OPEN", nodeid, exc)
        return pack_open_out(self._new_handle(node, fd, is_dir, oflags))

    async def create(
        self, parent: InodeT, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        self._check_writable_fs()
        p = self._dir_node(parent)
        _check_name(name)
        oflags = self._open_flags(flags)
        excl = bool(flags & os.O_EXCL)
        args = (oflags, mode & 0o7777, excl, self._creds(ctx), self._umask(ctx))
        inline = self._fast_namespace(p) and _hostfs.umask_is_private()
        fd, result = await self._run((p,), not inline, self._with_fd, p, self._w_create, name, *args,
                                     cleanup=_close_open_result)
        try:
            node, entry = self._register(result, p)
        except BaseException:
            os.close(fd)
            raise
        return self._new_handle(node, fd, False, oflags), entry

    def _create_inline(
        self, parent: int, name: bytes, mode: int, flags: int, umask: int, uid: int, gid: int, pid: int
    ) -> bytes | int | None:
        """CREATE for the inline responder, as :meth:`create` does it when it
        runs inline (a request without extensions: no supplementary groups):
        the reply body (``fuse_entry_out`` + ``fuse_open_out``), or the
        errno of a failed create (``_w_create`` leaves nothing behind), or
        None, with nothing done, for the full path (an unknown or
        non-directory parent, a bad name or flags, a read-only share, a
        directory whose namespace calls go to the pool)."""
        p = self._inline_parent(parent, name)
        if p is None:
            return None
        oflags = self._open_flags(flags)
        ctx = RequestContext(uid, gid, pid, umask)
        try:
            fd, result = self._with_fd(p, self._w_create, name, oflags, mode & 0o7777, bool(flags & os.O_EXCL),
                                       self._creds(ctx), self._umask(ctx))
        except Exception as exc:
            return _inline_errno("CREATE", parent, exc)
        try:
            node, entry = self._register(result, p)
        except Exception:
            os.close(fd)
            log.exception("CREATE nodeid=%d: installing the new inode failed -> EIO", parent)
            return errno.EIO  # as the full path answers a backend failure
        return _accel.pack_entry_out(entry) + pack_open_out(self._new_handle(node, fd, False, oflags))

    def _w_create(
        self, dirfd: int, name: bytes, oflags: int, mode: int, excl: bool, creds: Credentials | None, umask: int
    ) -> tuple[int, tuple[int, os.stat_result, Any]]:
        try:
            fd = call_as(creds, umask, _hostfs.open_beneath, dirfd, name, oflags | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            if excl:
                raise
            # It exists: open it as ``open`` would, never a non-regular file.
            opath, st, info = self._lookup_at(dirfd, name)
            try:
                if not stat.S_ISREG(st.st_mode):
                    raise OSError(errno.EISDIR if stat.S_ISDIR(st.st_mode) else errno.EEXIST, "not a regular file")
                fd = self._w_open(opath, oflags)
            except BaseException:
                os.close(opath)
                raise
            return fd, (opath, os.fstat(fd), info)  # after O_TRUNC
        try:
            fd = self._upgrade_for_writeback(fd, oflags)
            st = os.fstat(fd)
            opath = self._proc_open(fd, os.O_PATH)
        except BaseException:
            os.close(fd)
            raise
        try:
            info = self._handle_info(opath, st) if self.file_handles != "never" else None
        except BaseException:
            os.close(fd)
            os.close(opath)
            raise
        return fd, (opath, st, info)

    async def tmpfile(
        self, parent: InodeT, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        self._check_writable_fs()
        p = self._dir_node(parent)
        oflags = self._open_flags(flags) | (flags & os.O_EXCL)
        if oflags & os.O_ACCMODE == os.O_RDONLY:
            oflags |= os.O_RDWR  # O_TMPFILE needs write access
        creds = self._creds(ctx)
        umask = self._umask(ctx)

        def work(dirfd: int) -> tuple[int, tuple[int, os.stat_result, Any]]:
            fd = call_as(creds, umask, _open_tmpfile, dirfd, oflags, mode & 0o7777)
            try:
                fd = self._upgrade_for_writeback(fd, oflags)
                st = os.fstat(fd)
                opath = self._proc_open(fd, os.O_PATH)
            except BaseException:
                os.close(fd)
                raise
            return fd, (opath, st, None)  # unnamed: no file handle can reopen it

        fd, result = await self._run((p,), True, self._with_fd, p, work, cleanup=_close_open_result)
        try:
            node, entry = self._register(result, p)
        except BaseException:
            os.close(fd)
            raise
        return self._new_handle(node, fd, False, oflags), entry

    async def read(self, fh: FileHandleT, offset: int, size: int) -> bytes:
        h = self._file_handle(fh)
        _check_range(offset, size)
        return await self._run((h,), True, os.pread, h.fd, size, offset)

    async def read_into(self, fh: FileHandleT, offset: int, size: int, buffers: Sequence[memoryview]) -> int:
        """preadv into ``buffers`` (see the module docstring, "Data path")."""
        h = self._file_handle(fh)
        _check_range(offset, size)
        done = 0
        if h.nowait_read and size <= self.inline_read_max and len(buffers) <= _IOV_MAX:
            try:
                done = os.preadv(h.fd, buffers, offset, _RWF_NOWAIT)
            except BlockingIOError:
                pass  # not (all) in the page cache
            except OSError as exc:
                if exc.errno in _NOWAIT_REFUSED:
                    h.nowait_read = False
                # else the pool's attempt gives the error
            else:
                if done == size:
                    return done
                if done:
                    buffers = _skip(buffers, done)
                # 0: end of file, or nothing cached: the pool tells which
        size -= done
        offset += done
        while size > 0:  # short only at end of file
            n = await self._io(h, False, buffers if len(buffers) <= _IOV_MAX else buffers[:_IOV_MAX], offset)
            if n == 0:
                break
            done += n
            size -= n
            offset += n
            if size > 0:
                buffers = _skip(buffers, n)
        return done

    async def write(self, fh: FileHandleT, offset: int, data: Sequence[memoryview], ctx: RequestContext) -> int:
        """pwritev from ``data`` (IOV_MAX views per syscall, never joined;
        stops at the first short write; an error after some bytes went out
        returns their count, as write(2) does). A non-root writer then
        drops suid (and sgid with group-exec) as Linux would; the daemon's
        own write keeps them (it has CAP_FSETID)."""
        h = self._file_handle(fh)
        self._check_writable_fs()
        _check_range(offset)
        if h.inline_write and len(data) <= _IOV_MAX and _fits(data, self.inline_write_max):
            try:
                done = os.pwritev(h.fd, data, offset)
            except OSError as exc:
                raise FuseError(exc.errno or errno.EIO) from None
        elif len(data) <= _IOV_MAX:
            done = await self._io(h, True, data, offset)
        else:
            done = 0
            for start in range(0, len(data), _IOV_MAX):
                chunk = data[start:start + _IOV_MAX]
                try:
                    n = await self._io(h, True, chunk, offset + done)
                except FuseError:
                    if done:
                        break
                    raise
                done += n
                if n < sum(v.nbytes for v in chunk):
                    break
        if ctx.uid != 0 and done and h.fd >= 0:
            _kill_suidgid_after_write(h.fd)  # fstat + fchmod: inline metadata
        return done

    async def _io(self, h: _Handle, write: bool, views: Sequence[memoryview], offset: int) -> int:
        """One pwritev/preadv of ``h``'s fd through the runtime's I/O pool,
        ``h`` pinned meanwhile (left pinned if the request is cancelled:
        the syscall may still be using the fd); OSError -> FuseError."""
        h.pins += 1
        try:
            n = await (self.run_pwritev if write else self.run_preadv)(h.fd, views, offset)
        except OSError as exc:
            self._unpin((h,))
            raise FuseError(exc.errno or errno.EIO) from None
        except Exception:
            self._unpin((h,))
            raise
        self._unpin((h,))
        return n

    async def flush(self, fh: FileHandleT, lock_owner: int) -> None:
        h = self._handle(fh)
        fd = h.node.plocks.pop(lock_owner, None)
        h.node.lock_pids.pop(lock_owner, None)
        if fd is not None:
            _close_quietly(fd)  # the owner's POSIX locks on this file go with it
        # close(dup(fd)): the host filesystem's own flush-on-close (NFS, FUSE).
        await self._run((h,), not self._closes_fast(h), _flush_fd, h.fd)

    async def release(self, fh: FileHandleT) -> None:
        h = self._drop_handle(fh)
        if h is not None and h.pins == 0 and h.fd >= 0:
            fd, h.fd = h.fd, -1
            if self._closes_fast(h):
                _close_quietly(fd)
            else:
                await self.run_blocking(_close_quietly, fd)  # a last close may free blocks

    def _flush_inline(self, fh: int, lock_owner: int) -> int:
        """FLUSH for the inline responder: 0, or the errno the full path
        would answer, when :meth:`flush` would run inline and drop no
        lock; -1, with nothing done, otherwise."""
        h = self._handles.get(fh)
        if h is None or lock_owner in h.node.plocks or lock_owner in h.node.lock_pids or not self._closes_fast(h):
            return -1
        try:
            _flush_fd(h.fd)
        except OSError as exc:
            return exc.errno or errno.EIO
        return 0

    def _release_inline(self, fh: int, is_dir: bool) -> int:
        """RELEASE / RELEASEDIR for the inline responder: 0 when done as
        :meth:`release` / :meth:`releasedir` does it (an unknown handle:
        nothing to do); -1, with nothing done, when the full path would
        close the fd in the pool (a slow filesystem, or the last reference
        to an inode that goes with this handle)."""
        h = self._handles.get(fh)
        if h is None:
            return 0
        if not is_dir and h.pins == 0 and h.fd >= 0:
            node = h.node
            last = node.opens == 1 and node.lookups <= 0 and node.pins <= 0 and node is not self._root
            if last or not self._closes_fast(h):
                return -1
        self._handles.pop(fh)
        h.closed = True
        h.node.opens -= 1
        self._maybe_drop(h.node)
        if h.pins == 0:
            self._close_handle_fd(h)
        return 0

    def _closes_fast(self, h: _Handle) -> bool:
        """Whether closing an fd of ``h`` (or a dup of it) cannot wait, so
        FLUSH and RELEASE may run inline: the file lives on a filesystem on
        a block device (ext4, xfs: no flush-on-close; NFS, FUSE, CIFS, and
        also tmpfs and btrfs, have anonymous device numbers and go to the
        pool), and its inode stays held by its O_PATH fd, so the close is
        never the last reference (which may free a whole unlinked file)."""
        node = h.node
        return self.inline_metadata and node.fd >= 0 and not node.gone and _on_block_device(node.dev)

    def _fast_namespace(self, node: _Inode) -> bool:
        """Whether namespace calls on ``node``'s filesystem (create, mkdir,
        mknod, symlink, link, open without O_TRUNC, opendir and getdents64,
        and unlink, rmdir and rename where :meth:`_drops_fast` agrees) run
        inline: a filesystem on a block device, where they are journalled
        metadata updates like the lookups that already run inline (network
        and FUSE filesystems go to the pool)."""
        return self.inline_metadata and _on_block_device(node.dev)

    def _drops_fast(self, parent: _Inode, name: bytes) -> bool:
        """Whether removing (or renaming over) ``name`` in ``parent``
        cannot free much: it does not exist, is not a regular file, has
        other links, is small (at most ``_FAST_DROP_BYTES`` allocated), or is
        an inode this backend holds open (then its blocks are freed only
        when our fd goes). A large file's last link goes to the pool:
        freeing its blocks can take long. Inline (one fstatat)."""
        try:
            st = self._with_fd(parent, _lstat_at, name)
        except OSError:
            return True  # the call itself gives the error
        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1 or st.st_blocks * 512 <= _FAST_DROP_BYTES:
            return True
        node = self._by_key.get((st.st_dev, st.st_ino))
        return node is not None and node.fd >= 0 and not node.gone

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        await self._run((h,), True, os.fdatasync if datasync else os.fsync, h.fd)

    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        h = self._file_handle(fh)
        self._check_writable_fs()
        _check_range(offset, length)
        if not 0 <= mode < 1 << 31:
            raise _err(errno.EOPNOTSUPP)
        await self._run((h,), True, _hostfs.fallocate, h.fd, mode, offset, length)

    async def lseek(self, fh: FileHandleT, offset: int, whence: int) -> int:
        h = self._file_handle(fh)
        if whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise _err(errno.EINVAL)
        _check_range(offset)
        return await self._run((h,), True, os.lseek, h.fd, offset, whence)

    async def copy_file_range(
        self, fh_in: FileHandleT, off_in: int, fh_out: FileHandleT, off_out: int, length: int, flags: int
    ) -> int:
        hin = self._file_handle(fh_in)
        hout = self._file_handle(fh_out)
        self._check_writable_fs()
        if flags:
            raise _err(errno.EINVAL)
        _check_range(off_in, off_out)
        length = min(length, _OFF_MAX)
        return await self._run((hin, hout), True, os.copy_file_range, hin.fd, hout.fd, length, off_in, off_out)

    # ------------------------------------------------------------------
    # directories
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileInfo:
        node = self._dir_node(inode)
        fd = await self._run(
            (node,), not self._fast_namespace(node), self._with_fd, node, self._w_open,
            os.O_RDONLY | os.O_DIRECTORY, cleanup=_close_quietly,
        )
        return self._new_handle(node, fd, True, os.O_RDONLY)

    async def readdir(self, fh: FileHandleT, offset: int, reply: DirectoryReply) -> None:
        h = self._handle(fh)
        if not h.is_dir:
            raise _err(errno.ENOTDIR)
        node = h.node
        _check_range(offset)
        plus = reply.plus
        pos = offset
        blocking = not self._fast_namespace(node)  # every call on this handle takes the same road
        while True:
            bufsize = _getdents_size(reply.remaining, plus)
            raw, start = await self._run((h,), blocking, _getdents_locked, h, pos, bufsize)
            if start >= len(raw):
                return
            if plus:
                batch = _hostfs.parse_raw(raw, start)
                packer = self._plus_packer()
                if packer is not None:
                    done = self._readdirplus_packed(packer, h, batch, 0, reply)
                else:
                    done = await self._readdirplus_batch(h, batch, reply)
                if done:
                    return
                pos = batch[-1].off
            else:
                after = self._readdir_batch(h, raw, start, reply)
                if after is None:
                    return
                pos = after

    def _readdir_inline(self, fh: int, offset: int, size: int, plus: bool = False) -> bytes | None:
        """READDIR (READDIRPLUS with ``plus``) for the inline responder: the
        reply body :meth:`readdir` would give (the same host reads, the same
        records, READDIRPLUS's lookups counted), when it would run inline
        on a directory handle (READDIRPLUS: with the compiled packer);
        None, with the handle as it was and no lookup counted, for the
        full path to serve (and answer errors)."""
        h = self._handles.get(fh)
        if h is None or not h.is_dir or h.closed or not 0 <= offset <= _OFF_MAX or not self._fast_namespace(h.node):
            return None
        # built with the responder, which exists only with the bypassed methods intact
        packer = self._plus_packer(checked=True) if plus else None
        if plus and packer is None:
            return None
        reply = _InlineDirents(size, plus)
        taken: list[Any] = []
        pos = offset
        try:
            while True:
                raw, start = _getdents_locked(h, pos, _getdents_size(reply.remaining, plus))
                if start >= len(raw):
                    return b"".join(reply.parts)
                if plus:
                    batch = _hostfs.parse_raw(raw, start)
                    if self._readdirplus_packed(packer, h, batch, 0, reply, taken):
                        return b"".join(reply.parts)
                    pos = batch[-1].off
                else:
                    after = self._readdir_batch(h, raw, start, reply)
                    if after is None:
                        return b"".join(reply.parts)
                    pos = after
        except (OSError, ValueError, FuseError):
            self._give_back(taken)
            h.dir_pos = -1  # where the fd is: unknown (the full path seeks)
            return None

    def _readdirplus_inline(self, fh: int, offset: int, size: int) -> bytes | None:
        """READDIRPLUS for the inline responder: see :meth:`_readdir_inline`."""
        return self._readdir_inline(fh, offset, size, True)

    def _dirent_ino(self, node: _Inode, d: _hostfs.Dirent) -> int:
        if d.name == b".":
            return node.nodeid
        if d.name == b".." and node is self._root:
            return ROOT_INODE
        known = self._by_key.get((node.dev, d.ino))
        return known.nodeid if known is not None else d.ino

    def _readdir_batch(self, h: _Handle, raw: bytes, start: int, reply: DirectoryReply) -> int | None:
        """Add the records of ``raw`` (a getdents64 result) from byte
        position ``start`` to ``reply``, packed in compiled calls straight
        from the host records (a READDIR reply carries a hundred entries);
        None when the reply is full, else the cookie after the last record
        (``raw`` was used up). A known inode's entry carries its node id,
        any other the host's inode number (the same number but for the
        inodes in ``_remapped``, the only ones looked up)."""
        node = h.node
        dotdot = ROOT_INODE if node is self._root else 0
        end = len(raw)
        last = -1
        while start < end:
            # ``remaining`` is a hint: what does not fit now is packed again
            # against the room left after it (none: the reply is full).
            # _remapped: the known inodes whose entry differs from the host's
            records, after, count, last_packed = _pack_raw_dirents(raw, start, reply.remaining, self._remapped,
                                                                   node.dev, node.nodeid, dotdot)
            added = reply.add_dirents(records, count) if count else 0
            if added < count or not count:
                return None  # full (a later request finds its cookie in ``raw``)
            start, last = after, last_packed
            h.dir_hint = (raw, start, last)
        return last

    def _readdirplus_packed(self, packer: Any, h: _Handle, batch: list[_hostfs.Dirent], start: int,
                            reply: DirectoryReply, taken: list[Any] | None = None) -> bool:
        """:meth:`_readdirplus_batch` in one compiled call per reply's worth:
        the same records and lookup counts. The counts of records the reply
        does not take (or of a call that fails) are given back; ``taken``
        gets the inodes counted for the records it took (None for ``.``
        and ``..``)."""
        node = h.node
        dotdot = ROOT_INODE if node is self._root else 0
        total = len(batch)
        while start < total:
            counted: list[Any] = []
            try:
                records, end = packer.pack_readdirplus(h.fd, node, batch, start, reply.remaining, node.nodeid,
                                                       dotdot, counted)
            except OSError as exc:
                self._give_back(counted)
                raise FuseError(exc.errno or errno.EIO) from None
            except BaseException:
                self._give_back(counted)
                raise
            added = reply.add_dirents(records, len(counted)) if counted else 0
            if taken is not None:
                taken += counted[:added]
            if added < len(counted):
                self._give_back(counted[added:])
                return True
            if end == start:
                return True  # the next one does not fit
            start = end
        return False

    def _give_back(self, counted: list[Any]) -> None:
        for child in counted:
            if child is not None:
                child.lookups -= 1
                self._maybe_drop(child)

    async def _readdirplus_batch(self, h: _Handle, batch: list[_hostfs.Dirent], reply: DirectoryReply) -> bool:
        node = h.node
        start, count = 0, len(batch)
        entry_size = reply.entry_size
        while start < count:
            # Look up only what still fits in the reply.
            room = reply.remaining
            end = start
            while end < count and (need := entry_size(len(batch[end].name))) <= room:
                room -= need
                end += 1
            if end == start:
                return True
            part = batch[start:end]
            start = end
            names = [d.name for d in part if d.name not in _DOTS]
            looked = await self._run((h,), False, self._lookup_many, h.fd, names, cleanup=_close_many)
            try:
                for d in part:
                    if d.name in _DOTS:
                        a = EntryAttributes(st_ino=self._dirent_ino(node, d), st_mode=stat.S_IFDIR)
                        if not reply.add(d.name, a, d.off):
                            return True
                        continue
                    result = looked.pop(d.name)
                    if isinstance(result, OSError):
                        if result.errno == errno.ENOENT:
                            continue  # gone since getdents
                        raise FuseError(result.errno or errno.EIO)
                    fd, st, info = result
                    child = self._install(fd, st, info)
                    a = self._attrs(child.nodeid, st, self._entry_flags(st, node))
                    if not reply.add(d.name, a, d.off):
                        self._maybe_drop(child)
                        return True
                    child.lookups += 1
            finally:
                for rest in looked.values():
                    if not isinstance(rest, OSError):
                        _close_quietly(rest[0])
        return False

    def _lookup_many(self, dirfd: int, names: list[bytes]) -> dict[bytes, Any]:
        out: dict[bytes, Any] = {}
        for name in names:
            try:
                out[name] = self._lookup_at(dirfd, name)
            except OSError as exc:
                out[name] = exc
        return out

    async def releasedir(self, fh: FileHandleT) -> None:
        h = self._drop_handle(fh)
        if h is not None and h.pins == 0:
            self._close_handle_fd(h)

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        h = self._handle(fh)
        await self._run((h,), True, os.fdatasync if datasync else os.fsync, h.fd)

    # ------------------------------------------------------------------
    # filesystem
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        st = await self._run((self._root,), False, os.fstatvfs, self._root.fd)
        return StatvfsData(
            f_bsize=st.f_bsize,
            f_frsize=st.f_frsize,
            f_blocks=st.f_blocks,
            f_bfree=st.f_bfree,
            f_bavail=st.f_bavail,
            f_files=st.f_files,
            f_ffree=st.f_ffree,
            f_favail=st.f_favail,
            f_namemax=st.f_namemax,
        )

    async def syncfs(self) -> None:
        await self._run((), True, _hostfs.syncfs, self._root_rd)

    async def access(self, inode: InodeT, mask: int, ctx: RequestContext) -> None:
        node = self._node(inode)
        if mask & ~(os.R_OK | os.W_OK | os.X_OK):
            raise _err(errno.EINVAL)
        if self.readonly and mask & os.W_OK and node.kind in (stat.S_IFREG, stat.S_IFDIR):
            raise _err(errno.EROFS)
        creds = self._creds(ctx)
        ok = await self._run((node,), False, self._with_fd, node, self._w_access, mask, creds)
        if not ok:
            raise _err(errno.EACCES)

    def _w_access(self, pfd: int, mask: int, creds: Credentials | None) -> bool:
        return call_as(creds, None, _faccess_proc, self._proc_fd, pfd, mask)

    # ------------------------------------------------------------------
    # extended attributes
    def _xattr_check(self, name: bytes, write: bool, ctx: RequestContext) -> None:
        if not self.xattr:
            raise _err(errno.ENOSYS)
        if not name or len(name) > 255 or b"\0" in name:
            raise _err(errno.ERANGE if name else errno.EINVAL)
        if name in _XATTR_ACL_NAMES and not self.posix_acl:
            raise _err(errno.EOPNOTSUPP)
        if ctx.uid != 0:
            # CAP_SYS_ADMIN survives the fsuid switch: keep the guest's rules.
            if name.startswith(b"trusted."):
                raise _err(errno.EPERM if write else errno.ENODATA)
            if write and name.startswith(b"security."):
                raise _err(errno.EPERM)
        if write:
            self._check_writable_fs()

    async def _xattr_call(self, inode: InodeT, ctx: RequestContext, blocking: bool, fn: Callable[..., T], *args: Any) -> T:
        node = self._node(inode)
        if node.kind not in (stat.S_IFREG, stat.S_IFDIR):
            blocking = True  # moves a worker's private cwd (see _w_xattr)
        return await self._run((node,), blocking, self._with_fd, node, self._w_xattr, node, fn, *args)

    def _w_xattr(self, pfd: int, node: _Inode, fn: Callable[..., T], *args: Any) -> T:
        """``fn(target, *args)``, ``target`` naming ``node``
        without any path from the guest or from the filesystem root (which
        is the share itself once a sandbox pivoted into it): a fresh fd for
        files and directories (f*xattr), else the name ``N`` relative to
        /proc/self/fd, whose magic link lands on the inode itself and never
        follows a symlink further."""
        if node.kind in (stat.S_IFREG, stat.S_IFDIR):
            try:
                fd = self._proc_open(pfd, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
            except OSError:
                fd = -1  # e.g. an unreadable file for a non-root daemon
            if fd >= 0:
                try:
                    return fn(fd, *args)
                finally:
                    os.close(fd)
        return _hostfs.call_in_dir(self._proc_fd, fn, str(pfd).encode(), *args)

    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, flags: int, ctx: RequestContext) -> None:
        self._xattr_check(name, True, ctx)
        await self._xattr_call(inode, ctx, True, os.setxattr, name, bytes(value), flags)

    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        self._xattr_check(name, False, ctx)
        return await self._xattr_call(inode, ctx, False, os.getxattr, name)

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        if not self.xattr:
            raise _err(errno.ENOSYS)
        names = [os.fsencode(n) for n in await self._xattr_call(inode, ctx, False, os.listxattr)]
        if not self.posix_acl:
            names = [n for n in names if n not in _XATTR_ACL_NAMES]
        if ctx.uid != 0:
            names = [n for n in names if not n.startswith(b"trusted.")]
        return names

    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        self._xattr_check(name, True, ctx)
        await self._xattr_call(inode, ctx, True, os.removexattr, name)

    # ------------------------------------------------------------------
    # locks: POSIX locks are OFD locks on one host fd per (inode, lock owner);
    # flock() locks are flock() on the handle's own fd.
    @staticmethod
    def _check_lock(lock: FileLock) -> None:
        if lock.type not in (_F_RDLCK, _F_WRLCK, _F_UNLCK):
            raise _err(errno.EINVAL)
        if lock.start < 0 or lock.end < lock.start or lock.start > _hostfs.OFFSET_MAX:
            raise _err(errno.EINVAL)

    def _owner_fd(self, node: _Inode, owner: int) -> int:
        fd = node.plocks.get(owner)
        if fd is None:
            fd = self._with_fd(node, _open_for_locks, self._proc_fd)
            node.plocks[owner] = fd
        return fd

    async def getlk(self, fh: FileHandleT, owner: int, lock: FileLock) -> FileLock:
        h = self._file_handle(fh)
        self._check_lock(lock)
        fd = h.node.plocks.get(owner, h.fd)
        req = _hostfs.pack_flock(lock.type, lock.start, lock.end)
        out = await self._run((h,), False, fcntl.fcntl, fd, fcntl.F_OFD_GETLK, req)
        type_, start, end, _pid = _hostfs.unpack_flock(out)
        if type_ == _F_UNLCK:
            return FileLock(start=lock.start, end=lock.end, type=_F_UNLCK, pid=0)
        return FileLock(start=start, end=end, type=type_, pid=self._holder_pid(h.node, owner, type_, start, end))

    def _holder_pid(self, node: _Inode, asker: int, type_: int, start: int, end: int) -> int:
        """The guest pid of the owner holding the conflicting lock ``type_``
        over [start, end], found among the other owners' OFD fds by the
        locks their /proc fdinfo lists; 0 when none of them holds it (a
        host process does, or another connection) or fdinfo is out of reach."""
        want = b"WRITE" if type_ == _F_WRLCK else b"READ"
        for owner, fd in node.plocks.items():
            if owner == asker:
                continue
            try:
                held = _hostfs.ofd_locks_of(self._fdinfo_fd, fd)
            except OSError:
                continue
            if (want, start, end) in held:
                return node.lock_pids.get(owner, 0)
        return 0

    async def setlk(self, fh: FileHandleT, owner: int, lock: FileLock, wait: bool, flock: bool) -> None:
        h = self._file_handle(fh)
        self._check_lock(lock)
        if flock:
            op = {_F_RDLCK: fcntl.LOCK_SH, _F_WRLCK: fcntl.LOCK_EX, _F_UNLCK: fcntl.LOCK_UN}[lock.type]
            await self._lock(h, wait and lock.type != _F_UNLCK, _flock_try, _flock_wait, lambda: h.fd, op)
            return
        node = h.node
        if lock.type == _F_UNLCK and owner not in node.plocks:
            return
        try:
            self._owner_fd(node, owner)
        except OSError as exc:
            raise FuseError(exc.errno or errno.EIO) from None
        req = _hostfs.pack_flock(lock.type, lock.start, lock.end)
        await self._lock(h, wait and lock.type != _F_UNLCK, _ofd_try, _ofd_wait,
                         lambda: node.plocks.get(owner, -1), req)
        if lock.type != _F_UNLCK:
            node.lock_pids[owner] = lock.pid

    async def _lock(
        self, h: _Handle, wait: bool, try_fn: Callable[[int, Any], None], wait_fn: Callable[[int, Any], None],
        fd_of: Callable[[], int], arg: Any,
    ) -> None:
        """Take a lock without ever blocking the event loop: try at once; a
        waiting request then blocks in one pool thread (at most
        ``max_lock_waiters`` at a time), or polls with back-off beyond that."""
        fd = fd_of()
        try:
            await self._run((h,), False, try_fn, fd, arg)
            return
        except FuseError as exc:
            if not wait or exc.errno != errno.EAGAIN:
                raise
        if self._lock_waiters < self.max_lock_waiters:
            self._lock_waiters += 1
            try:
                await self._run((h,), True, wait_fn, fd, arg)
            finally:
                self._lock_waiters -= 1
            return
        delay = 0.001
        while True:
            await self.run_blocking(time.sleep, delay)
            if h.closed or fd_of() != fd:
                raise _err(errno.ENOLCK)  # the handle or the owner's fd went away meanwhile
            try:
                await self._run((h,), False, try_fn, fd, arg)
                return
            except FuseError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            delay = min(delay * 2, 0.05)


# -- blocking helpers (worker threads) ----------------------------------------------------


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _close_many(results: dict[bytes, Any]) -> None:
    for value in results.values():
        if not isinstance(value, OSError):
            _close_lookup_result(value)


def _readlink(fd: int) -> bytes:
    return os.readlink(b"", dir_fd=fd)


def _mknodat(dirfd: int, name: bytes, mode: int, device: int) -> None:
    os.mknod(name, mode, device, dir_fd=dirfd)


def _mkdirat(dirfd: int, name: bytes, mode: int) -> None:
    os.mkdir(name, mode, dir_fd=dirfd)


def _symlinkat(dirfd: int, name: bytes, target: bytes) -> None:
    os.symlink(target, name, dir_fd=dirfd)


def _unlinkat(dirfd: int, name: bytes) -> None:
    os.unlink(name, dir_fd=dirfd)


def _rmdirat(dirfd: int, name: bytes) -> None:
    os.rmdir(name, dir_fd=dirfd)


def _linkat_proc(proc_fd: int, srcfd: int, dirfd: int, name: bytes) -> None:
    # Through the magic link: the inode itself, even a symlink or an
    # O_TMPFILE file (AT_EMPTY_PATH would need CAP_DAC_READ_SEARCH).
    os.link(str(srcfd).encode(), name, src_dir_fd=proc_fd, dst_dir_fd=dirfd, follow_symlinks=True)


def _open_tmpfile(dirfd: int, flags: int, mode: int) -> int:
    return os.open(".", flags | os.O_TMPFILE | os.O_CLOEXEC, mode, dir_fd=dirfd)


def _faccess_proc(proc_fd: int, fd: int, mask: int) -> bool:
    return os.access(str(fd), mask, dir_fd=proc_fd, effective_ids=True)


def _open_for_locks(pfd: int, proc_fd: int) -> int:
    last: OSError | None = None
    for flags in (os.O_RDWR, os.O_RDONLY, os.O_WRONLY):
        try:
            return os.open(str(pfd), flags | os.O_CLOEXEC, dir_fd=proc_fd)
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


#: The smallest getdents64 buffer: room for a few entries with 255-byte names.
_GETDENTS_MIN = 2048
#: READDIR reads this many replies' worth of host entries at once, and at
#: least _READDIR_READ bytes (glibc's readdir buffer: a directory of a few
#: hundred entries comes in one call, as a C daemon's readdir gets it).
_READDIR_AHEAD = 4
_READDIR_READ = 32768


class _InlineDirents(SizedDirectoryReply):
    """READDIR records collected for :meth:`PassthroughFS._readdir_inline`:
    records packed against ``remaining`` (``_readdir_batch``), which it
    takes whole; nothing is added one by one."""

    __slots__ = ()

    def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
        raise ValueError("records packed past the reply's room")


def _getdents_size(room: int, plus: bool) -> int:
    """The getdents64 buffer for a reply with ``room`` bytes left. A host
    dirent takes about the room of a READDIR entry, a fifth of a
    READDIRPLUS one: READDIR reads ahead (the next replies come from what
    is left, without a trip to the pool); READDIRPLUS reads about what fits
    (each entry is looked up)."""
    return max(_GETDENTS_MIN, room // 4) if plus else max(_READDIR_READ, room * _READDIR_AHEAD)


def _getdents_locked(h: _Handle, offset: int, bufsize: int) -> tuple[bytes, int]:
    """The records of directory handle ``h`` after host cookie ``offset``,
    as ``(raw, start)`` (a getdents64 result; the ones wanted start at byte
    position ``start``): the rest of the previous result when ``offset``
    falls inside it (what a stream's readdir buffer gives), else one
    getdents64 call, without a seek when the fd is already there. Offset 0
    always reads afresh (rewinddir shows the directory as it is now)."""
    with h.lock:
        raw = h.dir_raw
        if offset and raw:
            if offset == h.dir_read_from:
                return raw, 0
            hint = h.dir_hint
            if hint is not None and hint[0] is raw and hint[2] == offset:
                start = hint[1]  # where the last reply stopped
            else:
                start = _scan_raw_dirents(raw, offset)[0]
            if 0 <= start < len(raw):
                return raw, start
            # past the whole result (the fd is there: read on), or not in it
        raw = _hostfs.getdents_raw(h.fd, None if offset == h.dir_pos and offset else offset, bufsize)
        try:
            last = _scan_raw_dirents(raw, -1)[1]
        except ValueError as exc:
            h.dir_pos = -1
            raise OSError(errno.EIO, f"corrupt getdents64 result: {exc}") from None
        h.dir_raw, h.dir_read_from, h.dir_hint = raw, offset, None
        h.dir_pos = last if raw else offset
        return raw, 0


_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 8)
#: preadv2(RWF_NOWAIT) errnos that mean "this file (or kernel) cannot do it".
_NOWAIT_REFUSED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


def _skip(views: Sequence[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (no copy of the data)."""
    out = list(views)
    i = 0
    while n:
        size = out[i].nbytes
        if n < size:
            out[i] = out[i][n:]
            break
        n -= size
        i += 1
    return out[i:]


def _kill_suidgid_after_write(fd: int) -> None:
    try:
        mode = os.fstat(fd).st_mode
        new = _kill_suidgid_mode(mode)
        if new != mode:
            os.fchmod(fd, stat.S_IMODE(new))
    except OSError as exc:  # the data is written: do not fail the write
        log.warning("could not drop suid/sgid after a write: %s", exc.strerror)


#: A file with at most this much allocated is removed inline (see ``_drops_fast``).
_FAST_DROP_BYTES = 1 << 20


def _fits(views: Sequence[memoryview], limit: int) -> bool:
    """Whether ``views`` hold at most ``limit`` bytes in all (stops
    counting as soon as they do not: a 1 MiB WRITE has 256 views)."""
    total = 0
    for view in views:
        total += view.nbytes
        if total > limit:
            return False
    return True


def _lstat_at(dirfd: int, name: bytes) -> os.stat_result:
    return os.stat(name, dir_fd=dirfd, follow_symlinks=False)


def _on_block_device(dev: int) -> bool:
    """``st_dev`` of a filesystem on a block device (major number not 0)."""
    return os.major(dev) != 0


def _flush_fd(fd: int) -> None:
    os.close(os.dup(fd))


def _ofd_try(fd: int, req: bytes) -> None:
    if fd < 0:
        raise OSError(errno.ENOLCK, "no lock fd")
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, req)
    except OSError as exc:
        if exc.errno == errno.EACCES:
            raise OSError(errno.EAGAIN, exc.strerror) from None
        raise


def _ofd_wait(fd: int, req: bytes) -> None:
    fcntl.fcntl(fd, fcntl.F_OFD_SETLKW, req)


def _flock_try(fd: int, op: int) -> None:
    try:
        fcntl.flock(fd, op | (fcntl.LOCK_NB if op != fcntl.LOCK_UN else 0))
    except BlockingIOError:
        raise OSError(errno.EAGAIN, "would block") from None


def _flock_wait(fd: int, op: int) -> None:
    fcntl.flock(fd, op)

