"""The backend interface: what a filesystem implements to be served.

A backend is a subclass of :class:`Operations` whose ``async`` methods answer
FUSE requests. Every method defaults to ``ENOSYS``. A method answers an error
by raising :class:`~virtiofs_async.errors.FuseError`; any other exception is a
backend bug: the session answers EIO and logs the traceback.

Backends know nothing of vrings, vhost-user or event loops: they get Python
values in and give Python values out. The session calls them concurrently
(one task per request), so a backend that awaits must keep its own state
consistent across the await.

Lookup counts (the contract the kernel relies on)
-------------------------------------------------
Each successful reply that hands the guest an inode counts one *lookup* of
it: ``lookup``, ``mknod``, ``mkdir``, ``symlink``, ``link``, ``create``,
``tmpfile``, and every entry that ``DirectoryReply.add`` accepts while
``reply.plus`` is true (except ``.`` and ``..``). The backend increments
its own count for the returned inode *before it returns*. ``forget`` later
gives back counts; an inode whose count reaches zero (and that has no other
user) may be dropped. The root inode (``ROOT_INODE``) is never forgotten.

Names are ``bytes`` (the kernel does not promise any encoding). The session
guarantees a name is non-empty, has no ``/`` and no NUL; the backend checks
length (``ENAMETOOLONG``) and the meaning of ``.`` / ``..``.
"""
from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING, Any, Callable, NewType, Sequence, TypeVar

import attrs

from . import codec
from .abi import fuse as abi
from ._accel import scatter
from .errors import FuseError

if TYPE_CHECKING:  # pragma: no cover
    pass

T = TypeVar("T")

InodeT = NewType("InodeT", int)
FileHandleT = NewType("FileHandleT", int)

#: The nodeid of the mount's root directory, fixed by the FUSE protocol.
ROOT_INODE = InodeT(1)

#: RENAME's ``flags`` bits (Linux's values, as the guest sends them).
RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2


@attrs.define(slots=True)
class RequestContext:
    """Who sent a request. ``umask`` is only meaningful for create-type calls
    when the backend set ``Operations.handles_umask`` (FUSE_DONT_MASK); it is
    0 otherwise, because then the guest kernel applied it already."""

    uid: int
    gid: int
    pid: int
    umask: int = 0
    #: Supplementary groups when the request carried them (a FUSE_EXT_GROUPS
    #: request extension); ``None`` when it did not, which is the case for
    #: every request of a Linux guest before 6.2 and for every non-creating
    #: request of newer ones. ``None`` means "unknown", not "no groups".
    groups: tuple[int, ...] | None = None


@attrs.define(slots=True)
class EntryAttributes:
    """An inode's attributes plus how long the guest may cache them.

    Times are integer nanoseconds since the epoch. ``entry_timeout`` and
    ``attr_timeout`` are in seconds (float)."""

    st_ino: int = 0
    generation: int = 0
    entry_timeout: float = 1.0
    attr_timeout: float = 1.0
    st_mode: int = 0
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blksize: int = 4096
    st_blocks: int = 0
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    #: FUSE_ATTR_* flags (e.g. FUSE_ATTR_SUBMOUNT).
    attr_flags: int = 0


@attrs.define(slots=True)
class SetattrFields:
    """Which attributes a ``setattr`` changes; values live in the
    ``EntryAttributes`` passed beside it. ``update_atime_now`` /
    ``update_mtime_now`` mean "set to the current time" (UTIME_NOW)."""

    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_atime_now: bool = False
    update_mtime_now: bool = False
    #: FATTR_KILL_SUIDGID: the guest asks to drop suid/sgid (killpriv_v2).
    kill_suidgid: bool = False


@attrs.define(slots=True)
class FileInfo:
    """The answer to ``open``/``create``/``opendir``: a handle plus FOPEN_* hints."""

    fh: int
    direct_io: bool = False
    keep_cache: bool = False
    nonseekable: bool = False
    cache_dir: bool = False
    noflush: bool = False
    parallel_direct_writes: bool = False


def setattr_arguments(
    nodeid: int, valid: int, fh: int, size: int, atime: int, mtime: int, ctime: int,
    atimensec: int, mtimensec: int, ctimensec: int, mode: int, uid: int, gid: int,
) -> tuple[EntryAttributes, SetattrFields, int | None]:
    """``setattr``'s ``attr``, ``fields`` and ``fh`` (None without
    FATTR_FH) for a SETATTR's ``fuse_setattr_in`` fields."""
    fields = SetattrFields(
        update_mode=bool(valid & abi.FATTR_MODE),
        update_uid=bool(valid & abi.FATTR_UID),
        update_gid=bool(valid & abi.FATTR_GID),
        update_size=bool(valid & abi.FATTR_SIZE),
        update_atime=bool(valid & abi.FATTR_ATIME),
        update_mtime=bool(valid & abi.FATTR_MTIME),
        update_ctime=bool(valid & abi.FATTR_CTIME),
        update_atime_now=bool(valid & abi.FATTR_ATIME_NOW),
        update_mtime_now=bool(valid & abi.FATTR_MTIME_NOW),
        kill_suidgid=bool(valid & abi.FATTR_KILL_SUIDGID),
    )
    attr = EntryAttributes(
        st_ino=nodeid,
        st_mode=mode,
        st_uid=uid,
        st_gid=gid,
        st_size=size,
        st_atime_ns=codec.wire_time_ns(atime, atimensec),
        st_mtime_ns=codec.wire_time_ns(mtime, mtimensec),
        st_ctime_ns=codec.wire_time_ns(ctime, ctimensec),
    )
    return attr, fields, (fh if valid & abi.FATTR_FH else None)


#: FileInfo attribute -> FOPEN_* flag.
_FOPEN_FLAGS = (
    ("direct_io", abi.FOPEN_DIRECT_IO),
    ("keep_cache", abi.FOPEN_KEEP_CACHE),
    ("nonseekable", abi.FOPEN_NONSEEKABLE),
    ("cache_dir", abi.FOPEN_CACHE_DIR),
    ("noflush", abi.FOPEN_NOFLUSH),
    ("parallel_direct_writes", abi.FOPEN_PARALLEL_DIRECT_WRITES),
)


def open_flags(fi: FileInfo) -> int:
    """The ``fuse_open_out.open_flags`` (FOPEN_*) of ``fi``."""
    flags = 0
    for name, flag in _FOPEN_FLAGS:
        if getattr(fi, name):
            flags |= flag
    return flags


def pack_open_out(fi: FileInfo) -> bytes:
    """The ``fuse_open_out`` (OPEN, OPENDIR, CREATE) of ``fi``."""
    return abi.fuse_open_out.pack(fi.fh, open_flags(fi), 0)


@attrs.define(slots=True)
class StatvfsData:
    f_bsize: int = 4096
    f_frsize: int = 4096
    f_blocks: int = 0
    f_bfree: int = 0
    f_bavail: int = 0
    f_files: int = 0
    f_ffree: int = 0
    f_favail: int = 0
    f_namemax: int = 255


@attrs.define(slots=True)
class FileLock:
    """A POSIX byte-range lock as FUSE carries it (``end`` is inclusive,
    ``type`` is F_RDLCK / F_WRLCK / F_UNLCK)."""

    start: int
    end: int
    type: int
    pid: int = 0


class DirectoryReply:
    """Collects directory entries for one READDIR / READDIRPLUS reply.

    ``add`` returns False, without adding, when the entry no longer fits: the
    backend stops there and the guest asks again from that entry's offset.
    While ``plus`` is true, every accepted entry other than ``.``/``..``
    counts one lookup of ``attributes.st_ino`` (see the module docstring).
    The session implements this; backends only call ``add``.
    """

    plus: bool = False

    def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
        raise NotImplementedError

    def add_names(self, entries: Sequence[tuple[int, int, int, bytes]]) -> int:
        """READDIR's fast form of ``add``: ``(ino, next_offset, dtype, name)``
        entries (``dtype`` a DT_* value), added in order while they fit;
        returns how many were added. In a READDIRPLUS reply use ``add``."""
        count = 0
        for ino, next_offset, dtype, name in entries:
            if not self.add(name, EntryAttributes(st_ino=ino, st_mode=dtype << 12), next_offset):
                break
            count += 1
        return count

    def add_dirents(self, records: bytes, count: int) -> int:
        """The fastest form of ``add``: ``records``, ``count`` whole records
        of this reply's kind, ``fuse_dirent`` in READDIR
        (:func:`~virtiofs_async.codec.pack_host_dirents` packs them from a
        host listing) or ``fuse_direntplus`` in READDIRPLUS (whose lookups
        the backend has counted, nodeid 0 for uncounted ``.``/``..``),
        sized to ``remaining``, added in order while they fit; returns how
        many were added (a backend gives back the lookups of the rest)."""
        added = 0
        if self.plus:
            for d in codec.iter_direntplus(records):
                e, a = d.entry, d.entry.attr
                attributes = EntryAttributes(
                    d.dirent.ino, e.generation, e.entry_valid + e.entry_valid_nsec / 1e9,
                    e.attr_valid + e.attr_valid_nsec / 1e9, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.size,
                    a.blksize, a.blocks, codec.wire_time_ns(a.atime, a.atimensec), codec.wire_time_ns(a.mtime, a.mtimensec),
                    codec.wire_time_ns(a.ctime, a.ctimensec), a.flags,
                )
                if not self.add(d.dirent.name, attributes, d.dirent.off):
                    break
                added += 1
            return added
        for d in codec.iter_dirents(records):
            if not self.add(d.name, EntryAttributes(st_ino=d.ino, st_mode=d.type << 12), d.off):
                break
            added += 1
        return added

    @property
    def remaining(self) -> int:
        """Bytes still free in the reply: a backend that fetches entries in
        batches can fetch (and, for READDIRPLUS, look up) only what fits.
        This default, for replies that do not know, is a page."""
        return 4096

    def entry_size(self, name_len: int) -> int:
        """Bytes one entry with a ``name_len``-byte name takes in this reply:
        a fuse_dirent (24 bytes and the name, 8-aligned), after a
        fuse_entry_out (128 bytes) in READDIRPLUS."""
        return (24 + name_len + 7) // 8 * 8 + (128 if self.plus else 0)


class SizedDirectoryReply(DirectoryReply):
    """A reply that holds at most ``size`` bytes of records, kept in
    ``parts`` (to be joined): ``add_dirents`` takes records whole when they
    fit, else one by one through ``add``, which subclasses implement."""

    __slots__ = ("plus", "_size", "_used", "parts")

    def __init__(self, size: int, plus: bool = False) -> None:
        self.plus = plus
        self._size = size
        self._used = 0
        self.parts: list[bytes] = []

    @property
    def remaining(self) -> int:
        return self._size - self._used

    def add_dirents(self, records: bytes, count: int) -> int:
        if self._used + len(records) > self._size:
            return super().add_dirents(records, count)  # what fits, one by one
        self.parts.append(records)
        self._used += len(records)
        return count


def _enosys() -> FuseError:
    return FuseError(errno.ENOSYS)


class Operations:
    """Base class of every backend; see the module docstring for the rules.

    Class attributes say what the backend supports; the session turns them
    into FUSE_INIT flags.
    """

    #: Answer the kernel's write-back cache requests (FUSE_WRITEBACK_CACHE).
    enable_writeback_cache: bool = False
    #: The backend applies ``ctx.umask`` itself (FUSE_DONT_MASK), e.g. for ACLs.
    handles_umask: bool = False
    #: The backend implements POSIX byte-range locks (getlk/setlk).
    supports_posix_locks: bool = False
    #: The backend implements BSD flock() locks through setlk with ``flock=True``.
    supports_flock_locks: bool = False
    #: The backend honours FATTR_KILL_SUIDGID / FUSE_WRITE_KILL_SUIDGID.
    supports_killpriv_v2: bool = False
    #: The backend supports POSIX ACLs via xattrs (FUSE_POSIX_ACL).
    supports_posix_acl: bool = False
    #: READDIRPLUS is offered to the guest (FUSE_DO_READDIRPLUS).
    supports_readdirplus: bool = True

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking ``fn(*args)`` without holding up other requests.

        The server replaces this, before ``init()``, with its runtime's
        bounded worker pool (``--thread-pool-size``), so a backend can offload
        blocking syscalls without knowing which event loop runs it. This
        default (no server) simply calls ``fn`` inline."""
        return fn(*args)

    async def run_preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """One ``preadv(2)`` into ``buffers`` without holding up other
        requests (it may be short; OSError on failure). The server replaces
        this with its runtime's I/O pool (compiled: the syscall runs without
        the GIL); this default goes through ``run_blocking``. Keep ``fd``
        open until it returns (and, if cancelled, until the syscall would
        have ended)."""
        return await self.run_blocking(os.preadv, fd, buffers, offset)

    async def run_pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """One ``pwritev(2)`` from ``buffers``; see :meth:`run_preadv`."""
        return await self.run_blocking(os.pwritev, fd, buffers, offset)

    def inline_responder(self, max_read: int) -> Any | None:
        """An object that answers some requests straight from the queue,
        without the session (its ``respond(request: bytes, room: int) ->
        bytes | None`` gives the complete reply, header included, that the
        session's full path would write for that request; None: not
        answered; a compiled one may also carry a ``c_responder`` capsule,
        see ``cyext/include/vfa_hotpath.h``). ``max_read`` is the mount's
        negotiated READ limit: larger READs are the session's to refuse.
        The session asks once per mount, after ``init()``. The default,
        None, sends every request through the session; the passthrough
        backend answers GETATTR and LOOKUP of known inodes, and (compiled)
        cached READs and WRITEs (see :mod:`virtiofs_async.responder`)."""
        return None

    # -- lifecycle -------------------------------------------------------
    async def init(self) -> None:
        """Called once per FUSE session (per guest mount), before any request."""

    async def destroy(self) -> None:
        """Called at FUSE_DESTROY (guest unmount) or when the connection ends.
        All lookup counts are implicitly dropped; the backend may reset to
        the state of a fresh mount (the root stays)."""

    # -- names and inodes --------------------------------------------------
    async def lookup(self, parent: InodeT, name: bytes, ctx: RequestContext) -> EntryAttributes:
        """Find ``name`` in directory ``parent``; counts one lookup.
        A missing entry raises ``FuseError(ENOENT)``."""
        raise _enosys()

    async def forget(self, inodes: Sequence[tuple[InodeT, int]]) -> None:
        """Drop ``nlookup`` lookups of each ``(inode, nlookup)``. Never raises:
        the guest gets no reply to FORGET."""

    async def getattr(self, inode: InodeT, ctx: RequestContext, fh: FileHandleT | None = None) -> EntryAttributes:
        raise _enosys()

    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        """Change the attributes ``fields`` selects to the values in ``attr``;
        return the new attributes."""
        raise _enosys()

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        raise _enosys()

    async def mknod(self, parent: InodeT, name: bytes, mode: int, rdev: int, ctx: RequestContext) -> EntryAttributes:
        """Create a regular file, device node, fifo or socket; counts one lookup."""
        raise _enosys()

    async def mkdir(self, parent: InodeT, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        raise _enosys()

    async def symlink(self, parent: InodeT, name: bytes, target: bytes, ctx: RequestContext) -> EntryAttributes:
        raise _enosys()

    async def link(self, inode: InodeT, new_parent: InodeT, new_name: bytes, ctx: RequestContext) -> EntryAttributes:
        raise _enosys()

    async def unlink(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        raise _enosys()

    async def rmdir(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        raise _enosys()

    async def rename(
        self,
        parent_old: InodeT,
        name_old: bytes,
        parent_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        """``flags`` is 0 or RENAME_NOREPLACE / RENAME_EXCHANGE / RENAME_WHITEOUT."""
        raise _enosys()

    # -- files -----------------------------------------------------------
    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        """``flags`` are the guest's open(2) flags (O_CREAT/O_EXCL already handled)."""
        raise _enosys()

    async def create(
        self, parent: InodeT, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        """Create and open ``name``; counts one lookup."""
        raise _enosys()

    async def tmpfile(self, parent: InodeT, mode: int, flags: int, ctx: RequestContext) -> tuple[FileInfo, EntryAttributes]:
        """O_TMPFILE: an unnamed regular file in ``parent``; counts one lookup."""
        raise _enosys()

    async def read(self, fh: FileHandleT, offset: int, size: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer only at end of file).
        May return any bytes-like object."""
        raise _enosys()

    async def read_into(self, fh: FileHandleT, offset: int, size: int, buffers: Sequence[memoryview]) -> int:
        """:meth:`read` straight into the guest's reply buffers: put up to
        ``size`` bytes at ``offset`` into ``buffers``, filled one after the
        other, and return how many (fewer only at end of file). The session
        calls this for READ when the guest gave room for ``size`` bytes.

        ``buffers`` are writable 1-D byte views into guest memory holding
        exactly ``size`` bytes together. The session owns them; they are
        valid only until this call returns: never keep one, nor hand it to
        anything that outlives the call (a worker thread that the call
        awaits is fine). What lies past the returned count is not sent, and
        nothing is sent on an error. This default calls :meth:`read` and
        copies (a result longer than ``size`` is a backend bug:
        RuntimeError); override it to read without that copy, e.g. with
        ``os.preadv(fd, buffers, offset)``."""
        data = await self.read(fh, offset, size)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        if n > size:
            raise RuntimeError(f"read() returned {n} bytes, {size} were asked")
        return scatter(buffers, (data,))

    async def write(self, fh: FileHandleT, offset: int, data: Sequence[memoryview], ctx: RequestContext) -> int:
        """Write the concatenation of ``data`` at ``offset``; return the count.

        ``data`` are views straight into guest memory, valid only until this
        call returns: copy what you keep. ``ctx`` tells the writer (for
        killpriv: a write by a non-owner drops suid/sgid)."""
        raise _enosys()

    async def flush(self, fh: FileHandleT, lock_owner: int) -> None:
        """close(2) of one file descriptor in the guest (may happen many times)."""

    async def release(self, fh: FileHandleT) -> None:
        """The last reference to ``fh`` is gone. Never fails visibly."""

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        pass

    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        raise _enosys()

    async def lseek(self, fh: FileHandleT, offset: int, whence: int) -> int:
        """Only SEEK_DATA / SEEK_HOLE reach the backend; return the new offset."""
        raise _enosys()

    async def copy_file_range(
        self, fh_in: FileHandleT, off_in: int, fh_out: FileHandleT, off_out: int, length: int, flags: int
    ) -> int:
        raise _enosys()

    # -- directories -----------------------------------------------------
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileInfo:
        raise _enosys()

    async def readdir(self, fh: FileHandleT, offset: int, reply: DirectoryReply) -> None:
        """Add entries following ``offset`` (0 = from the start) with
        ``reply.add(name, attrs, next_offset)`` until it returns False or the
        directory ends. ``next_offset`` is the offset the guest passes to
        resume after this entry; it must stay valid while entries are added
        or removed concurrently (no entry skipped or returned twice)."""
        raise _enosys()

    async def releasedir(self, fh: FileHandleT) -> None:
        pass

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        pass

    # -- filesystem -------------------------------------------------------
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        raise _enosys()

    async def syncfs(self) -> None:
        pass

    async def access(self, inode: InodeT, mask: int, ctx: RequestContext) -> None:
        """Check ``mask`` (R_OK|W_OK|X_OK, or F_OK=0) for ``ctx``; raise EACCES."""
        raise _enosys()

    # -- extended attributes -----------------------------------------------
    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, flags: int, ctx: RequestContext) -> None:
        """``flags`` is 0, XATTR_CREATE or XATTR_REPLACE."""
        raise _enosys()

    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        """Missing attribute: ``FuseError(ENODATA)``. The session handles size
        probing and ERANGE."""
        raise _enosys()

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        raise _enosys()

    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        raise _enosys()

    # -- locks (only called when the matching supports_* flag is set) ----------
    async def getlk(self, fh: FileHandleT, owner: int, lock: FileLock) -> FileLock:
        raise _enosys()

    async def setlk(self, fh: FileHandleT, owner: int, lock: FileLock, wait: bool, flock: bool) -> None:
        """Take or drop a lock; ``wait`` (SETLKW) may block for long: the
        backend must await without holding up other requests."""
        raise _enosys()

    # -- rarely used -------------------------------------------------------
    async def ioctl(self, fh: FileHandleT, cmd: int, arg: int, in_data: bytes, out_size: int, flags: int) -> bytes:
        raise _enosys()

    async def poll(self, fh: FileHandleT, events: int) -> int:
        raise _enosys()
