"""An async FUSE client over :class:`~.frontend.VhostUserFsFrontend`: the guest's
virtiofs driver without the kernel.

:class:`FuseClient` builds each request with the codec's request classes
(laid out like Linux: the header, then the arguments, then page data, each
in its own descriptor), submits it and decodes the reply with
``codec.decode_reply``. One method per opcode; each returns the decoded body
(``EntryOut``, ``AttrOut``, ``bytes``, a list of ``Dirent`` ...), raises
:class:`~virtiofs_async.errors.FuseError` for an error reply, and
:class:`~virtiofs_async.errors.FuseProtocolError` for a malformed reply (wrong
``unique``, wrong length, a body of the wrong size, a reply to a request that
gets none). Any number of calls may run concurrently.

Every request carries the caller's credentials: ``uid``/``gid``/``pid`` given
to the constructor (0/0/1 by default), or per call with ``ctx=`` (anything
with ``uid``, ``gid`` and ``pid`` attributes, e.g.
``operations.RequestContext``).

FORGET, BATCH_FORGET and INTERRUPT go on the hiprio queue (0) with no room
for a reply, as Linux sends them; everything else goes on ``queue`` (1).

As the Linux driver does, modes are sent with ``umask`` already applied
unless FUSE_DONT_MASK was agreed (then the daemon gets ``umask`` itself).
The client's default ``umask`` is 0, so ``mode`` is what you get.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator, Sequence, Union

import attrs

from .. import codec
from ..abi import fuse as abi
from ..errors import FuseError, FuseProtocolError
from .frontend import VhostUserFsFrontend

__all__ = ["FuseClient", "LINUX_6_1_INIT_FLAGS", "Caller"]

Buffer = Union[bytes, bytearray, memoryview]

#: The FUSE_INIT flags a Linux 6.1 virtiofs guest sends (no DAX):
#: fs/fuse/inode.c ``fuse_send_init`` plus FUSE_SUBMOUNTS (virtiofs mounts
#: with auto_submounts).
LINUX_6_1_INIT_FLAGS = (
    abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_EXPORT_SUPPORT
    | abi.FUSE_BIG_WRITES | abi.FUSE_DONT_MASK | abi.FUSE_SPLICE_WRITE | abi.FUSE_SPLICE_MOVE
    | abi.FUSE_SPLICE_READ | abi.FUSE_FLOCK_LOCKS | abi.FUSE_HAS_IOCTL_DIR | abi.FUSE_AUTO_INVAL_DATA
    | abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_ASYNC_DIO | abi.FUSE_WRITEBACK_CACHE
    | abi.FUSE_NO_OPEN_SUPPORT | abi.FUSE_PARALLEL_DIROPS | abi.FUSE_HANDLE_KILLPRIV | abi.FUSE_POSIX_ACL
    | abi.FUSE_ABORT_ERROR | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS | abi.FUSE_NO_OPENDIR_SUPPORT
    | abi.FUSE_EXPLICIT_INVAL_DATA | abi.FUSE_HANDLE_KILLPRIV_V2 | abi.FUSE_SETXATTR_EXT
    | abi.FUSE_INIT_EXT | abi.FUSE_SECURITY_CTX | abi.FUSE_SUBMOUNTS
)

#: Linux's readahead window (max_readahead in FUSE_INIT): 32 pages.
DEFAULT_MAX_READAHEAD = 128 * 1024
#: The end of a whole-file lock (OFFSET_MAX).
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF

_OUT = codec.OUT_HEADER_SIZE
_NS = 1_000_000_000
_PAGE = 4096
# An empty security context (nr_secctx = 0) as a 7.38 request extension.
_EMPTY_SECCTX_EXT = abi.fuse_secctx_header.pack(abi.fuse_secctx_header.size, 0)


@attrs.frozen
class Caller:
    """Credentials of a request (what ``ctx=`` may be)."""

    uid: int = 0
    gid: int = 0
    pid: int = 1


class FuseClient:
    """FUSE requests over a connected :class:`VhostUserFsFrontend`.

    Call :meth:`init` first (``connect`` does). After it, ``init_out`` is
    the daemon's ``InitOut``, ``flags`` the agreed flags, ``minor`` the
    agreed protocol minor and ``max_write`` the largest WRITE the client
    sends (a bigger one raises ValueError, as the kernel never sends one).
    """

    def __init__(
        self,
        frontend: VhostUserFsFrontend,
        *,
        uid: int = 0,
        gid: int = 0,
        pid: int = 1,
        umask: int = 0,
        queue: int = 1,
    ) -> None:
        self.frontend = frontend
        self.caller = Caller(uid, gid, pid)
        self.umask = umask
        self.queue = queue
        self.init_out: codec.InitOut | None = None
        self.flags = 0
        self.minor = abi.FUSE_KERNEL_MINOR_VERSION
        self.max_write = 4096
        self._unique = 0

    # -- construction ------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        uid: int = 0,
        gid: int = 0,
        pid: int = 1,
        umask: int = 0,
        queue: int = 1,
        init: bool = True,
        init_flags: int = LINUX_6_1_INIT_FLAGS,
        **frontend_kwargs: Any,
    ) -> AsyncIterator[FuseClient]:
        """``async with FuseClient.connect(path) as client:`` connects a
        frontend (``frontend_kwargs`` go to ``VhostUserFsFrontend.connect``),
        sends FUSE_INIT (unless ``init=False``) and closes it all at the end.
        The other keywords are the constructor's."""
        frontend = await VhostUserFsFrontend.connect(socket_path, **frontend_kwargs)
        try:
            client = cls(frontend, uid=uid, gid=gid, pid=pid, umask=umask, queue=queue)
            if init:
                await client.init(flags=init_flags)
            yield client
        finally:
            await frontend.close()

    async def close(self) -> None:
        """Close the frontend (disconnects from the daemon)."""
        await self.frontend.close()

    # -- plumbing -------------------------------------------------------------------

    def next_unique(self) -> int:
        """A fresh request id (Linux steps by 2: odd ids mark interrupts)."""
        self._unique += 2
        return self._unique

    def header(self, nodeid: int, ctx: Any = None, unique: int | None = None) -> codec.InHeader:
        """A request header for ``nodeid`` from ``ctx`` (default: the client's
        caller); ``len`` and ``opcode`` are filled in by ``encode``."""
        c = ctx if ctx is not None else self.caller
        return codec.InHeader(
            0, 0, self.next_unique() if unique is None else unique, nodeid, c.uid, c.gid, c.pid
        )

    async def call(
        self,
        request: codec.Request,
        reply_size: int | Sequence[int],
        *,
        queue: int | None = None,
        size_probe: bool = False,
    ) -> object | bytes | None:
        """Send ``request`` with room for ``reply_size`` reply bytes (header
        included) and return the decoded body (see ``codec.decode_reply``).
        FuseError for an error reply, FuseProtocolError for a malformed one."""
        unique = request.header.unique
        opcode = request.OPCODE
        data = await self.frontend.submit(request.encode(), reply_size, self.queue if queue is None else queue)
        header, body = codec.decode_reply(opcode, data, size_probe=size_probe)
        if header.unique != unique:
            raise FuseProtocolError(
                f"reply to FUSE_{opcode.name} unique={unique} carries unique={header.unique}", unique=header.unique
            )
        if header.error:
            raise FuseError(header.error, f"FUSE_{opcode.name}: {os.strerror(header.error)}")
        return body

    async def call_no_reply(self, request: codec.Request) -> None:
        """Send ``request`` on the hiprio queue with no reply buffer; the
        device must return the chain with nothing written."""
        opcode = request.OPCODE
        data = await self.frontend.submit(request.encode(), 0, 0)
        if data:
            raise FuseProtocolError(f"FUSE_{opcode.name} got a {len(data)}-byte reply; it gets none")

    def _pieces(self, length: int) -> list[int]:
        """Buffer lengths for ``length`` bytes of page data: 4 KiB pages like
        Linux when the chain fits the ring (always with indirect
        descriptors), else fewer, larger page-aligned buffers."""
        if length == 0:
            return []
        pages = -(-length // _PAGE)
        limit = 1024 if self.frontend.indirect else max(1, self.frontend.queue_size // 4 - 4)
        chunk = _PAGE * -(-pages // min(pages, limit))
        return [min(chunk, length - pos) for pos in range(0, length, chunk)]

    def _mode(self, mode: int, umask: int | None) -> tuple[int, int]:
        umask = self.umask if umask is None else umask
        if not self.flags & abi.FUSE_DONT_MASK:
            mode &= ~umask
        return mode, umask

    def _create_ext(self) -> bytes:
        # With FUSE_SECURITY_CTX agreed (7.38), Linux attaches a (here empty)
        # security context to every request that creates an inode.
        if self.flags & abi.FUSE_SECURITY_CTX and self.minor >= 38:
            return _EMPTY_SECCTX_EXT
        return b""

    # -- session ------------------------------------------------------------------------

    async def init(
        self,
        *,
        flags: int = LINUX_6_1_INIT_FLAGS,
        max_readahead: int = DEFAULT_MAX_READAHEAD,
        major: int = abi.FUSE_KERNEL_VERSION,
        minor: int = abi.FUSE_KERNEL_MINOR_VERSION,
        max_write: int | None = None,
    ) -> codec.InitOut:
        """FUSE_INIT (protocol 7.38 by default, with Linux 6.1's flags).
        Records the reply; ``max_write`` caps the client's own limit below
        the daemon's. FuseProtocolError if the daemon answers another major
        or agrees to flags that were not offered."""
        req = codec.InitRequest(self.header(0), major, minor, max_readahead, flags)
        out = await self.call(req, _OUT + 64)
        assert isinstance(out, codec.InitOut)
        if out.major != major:
            raise FuseProtocolError(f"the daemon answers FUSE {out.major}.{out.minor}, we sent {major}.{minor}")
        extra = out.flags & ~flags & ~abi.FUSE_INIT_EXT
        if extra:
            raise FuseProtocolError(f"the daemon agreed to INIT flags {extra:#x} that were not offered")
        self.init_out = out
        self.flags = out.flags
        self.minor = min(out.minor, minor)
        self.max_write = out.max_write if max_write is None else min(out.max_write, max_write)
        return out

    async def destroy(self, *, ctx: Any = None) -> None:
        await self.call(codec.DestroyRequest(self.header(0, ctx)), _OUT)

    async def statfs(self, nodeid: int = abi.FUSE_ROOT_ID, *, ctx: Any = None) -> codec.StatfsOut:
        return await self.call(codec.StatfsRequest(self.header(nodeid, ctx)), _OUT + 80)  # type: ignore[return-value]

    async def syncfs(self, *, ctx: Any = None) -> None:
        await self.call(codec.SyncfsRequest(self.header(abi.FUSE_ROOT_ID, ctx)), _OUT)

    async def interrupt(self, unique: int, *, ctx: Any = None) -> None:
        """FUSE_INTERRUPT of request ``unique`` (hiprio, no reply; the id of
        an interrupt is odd: the interrupted request's id + 1)."""
        await self.call_no_reply(codec.InterruptRequest(self.header(0, ctx, unique=unique | 1), unique))

    # -- names and inodes ------------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes, *, ctx: Any = None) -> codec.EntryOut:
        return await self.call(codec.LookupRequest(self.header(parent, ctx), name), _OUT + 128)  # type: ignore[return-value]

    async def forget(self, nodeid: int, nlookup: int, *, ctx: Any = None) -> None:
        await self.call_no_reply(codec.ForgetRequest(self.header(nodeid, ctx), nlookup))

    async def batch_forget(self, items: Sequence[tuple[int, int]], *, ctx: Any = None) -> None:
        """Forget ``(nodeid, nlookup)`` pairs in one request."""
        await self.call_no_reply(codec.BatchForgetRequest(self.header(0, ctx), list(items)))

    async def getattr(self, nodeid: int, fh: int | None = None, *, ctx: Any = None) -> codec.AttrOut:
        flags = abi.FUSE_GETATTR_FH if fh is not None else 0
        req = codec.GetattrRequest(self.header(nodeid, ctx), flags, fh or 0)
        return await self.call(req, _OUT + 104)  # type: ignore[return-value]

    async def setattr(
        self,
        nodeid: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        ctime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
        fh: int | None = None,
        lock_owner: int | None = None,
        kill_suidgid: bool = False,
        ctx: Any = None,
    ) -> codec.AttrOut:
        """SETATTR of the given fields only (FATTR_* ``valid`` bits follow
        the keywords). ``atime_now`` / ``mtime_now`` set the time to "now"
        (FATTR_ATIME|FATTR_ATIME_NOW, as Linux sends UTIME_NOW)."""
        valid = 0
        if mode is not None:
            valid |= abi.FATTR_MODE
        if uid is not None:
            valid |= abi.FATTR_UID
        if gid is not None:
            valid |= abi.FATTR_GID
        if size is not None:
            valid |= abi.FATTR_SIZE
        if atime_ns is not None or atime_now:
            valid |= abi.FATTR_ATIME
        if atime_now:
            valid |= abi.FATTR_ATIME_NOW
        if mtime_ns is not None or mtime_now:
            valid |= abi.FATTR_MTIME
        if mtime_now:
            valid |= abi.FATTR_MTIME_NOW
        if ctime_ns is not None:
            valid |= abi.FATTR_CTIME
        if fh is not None:
            valid |= abi.FATTR_FH
        if lock_owner is not None:
            valid |= abi.FATTR_LOCKOWNER
        if kill_suidgid:
            valid |= abi.FATTR_KILL_SUIDGID
        a = atime_ns or 0
        m = mtime_ns or 0
        c = ctime_ns or 0
        req = codec.SetattrRequest(
            self.header(nodeid, ctx), valid, fh or 0, size or 0, lock_owner or 0,
            a // _NS, m // _NS, c // _NS, a % _NS, m % _NS, c % _NS,
            mode or 0, uid or 0, gid or 0,
        )
        return await self.call(req, _OUT + 104)  # type: ignore[return-value]

    async def readlink(self, nodeid: int, *, ctx: Any = None) -> bytes:
        return await self.call(codec.ReadlinkRequest(self.header(nodeid, ctx)), _OUT + _PAGE)  # type: ignore[return-value]

    async def symlink(self, parent: int, name: bytes, target: bytes, *, ctx: Any = None) -> codec.EntryOut:
        req = codec.SymlinkRequest(self.header(parent, ctx), name, target, ext=self._create_ext())
        return await self.call(req, _OUT + 128)  # type: ignore[return-value]

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int = 0, *, umask: int | None = None, ctx: Any = None
    ) -> codec.EntryOut:
        mode, umask = self._mode(mode, umask)
        req = codec.MknodRequest(self.header(parent, ctx), mode, rdev, umask, name, ext=self._create_ext())
        return await self.call(req, _OUT + 128)  # type: ignore[return-value]

    async def mkdir(
        self, parent: int, name: bytes, mode: int = 0o755, *, umask: int | None = None, ctx: Any = None
    ) -> codec.EntryOut:
        mode, umask = self._mode(mode, umask)
        req = codec.MkdirRequest(self.header(parent, ctx), mode, umask, name, ext=self._create_ext())
        return await self.call(req, _OUT + 128)  # type: ignore[return-value]

    async def unlink(self, parent: int, name: bytes, *, ctx: Any = None) -> None:
        await self.call(codec.UnlinkRequest(self.header(parent, ctx), name), _OUT)

    async def rmdir(self, parent: int, name: bytes, *, ctx: Any = None) -> None:
        await self.call(codec.RmdirRequest(self.header(parent, ctx), name), _OUT)

    async def rename(
        self, parent: int, name: bytes, newparent: int, newname: bytes, flags: int = 0, *, ctx: Any = None
    ) -> None:
        """RENAME, or RENAME2 when ``flags`` (RENAME_NOREPLACE/EXCHANGE/WHITEOUT) is set, as Linux does."""
        req: codec.Request
        if flags:
            req = codec.Rename2Request(self.header(parent, ctx), newparent, flags, name, newname)
        else:
            req = codec.RenameRequest(self.header(parent, ctx), newparent, name, newname)
        await self.call(req, _OUT)

    async def link(self, nodeid: int, newparent: int, newname: bytes, *, ctx: Any = None) -> codec.EntryOut:
        req = codec.LinkRequest(self.header(newparent, ctx), nodeid, newname)
        return await self.call(req, _OUT + 128)  # type: ignore[return-value]

    async def access(self, nodeid: int, mask: int, *, ctx: Any = None) -> None:
        await self.call(codec.AccessRequest(self.header(nodeid, ctx), mask), _OUT)

    # -- files -------------------------------------------------------------------------

    async def open(self, nodeid: int, flags: int = os.O_RDONLY, open_flags: int = 0, *, ctx: Any = None) -> codec.OpenOut:
        req = codec.OpenRequest(self.header(nodeid, ctx), flags, open_flags)
        return await self.call(req, _OUT + 16)  # type: ignore[return-value]

    async def create(
        self,
        parent: int,
        name: bytes,
        mode: int = 0o644,
        flags: int = os.O_RDWR,
        *,
        umask: int | None = None,
        open_flags: int = 0,
        ctx: Any = None,
    ) -> codec.CreateOut:
        """CREATE (``flags`` gets O_CREAT added, as in the kernel's request)."""
        mode, umask = self._mode(mode, umask)
        req = codec.CreateRequest(
            self.header(parent, ctx), flags | os.O_CREAT, mode, umask, open_flags, name, ext=self._create_ext()
        )
        return await self.call(req, _OUT + 144)  # type: ignore[return-value]

    async def tmpfile(
        self,
        parent: int,
        mode: int = 0o600,
        flags: int = os.O_RDWR,
        *,
        umask: int | None = None,
        open_flags: int = 0,
        ctx: Any = None,
    ) -> codec.CreateOut:
        """TMPFILE (O_TMPFILE); the name Linux sends is ``b"/"``."""
        mode, umask = self._mode(mode, umask)
        req = codec.TmpfileRequest(
            self.header(parent, ctx), flags, mode, umask, open_flags, b"/", ext=self._create_ext()
        )
        return await self.call(req, _OUT + 144)  # type: ignore[return-value]

    async def read(
        self, nodeid: int, fh: int, offset: int, size: int, *, flags: int = 0, lock_owner: int | None = None,
        ctx: Any = None,
    ) -> bytes:
        """READ up to ``size`` bytes; the reply buffer is split per page like
        Linux's (a header buffer, then 4 KiB buffers)."""
        read_flags = abi.FUSE_READ_LOCKOWNER if lock_owner is not None else 0
        req = codec.ReadRequest(self.header(nodeid, ctx), fh, offset, size, read_flags, lock_owner or 0, flags)
        return await self.call(req, [_OUT, *self._pieces(size)])  # type: ignore[return-value]

    async def write(
        self,
        nodeid: int,
        fh: int,
        offset: int,
        data: Buffer,
        *,
        flags: int = 0,
        write_flags: int = 0,
        lock_owner: int | None = None,
        ctx: Any = None,
    ) -> int:
        """WRITE ``data`` (at most ``max_write`` bytes); returns the count written.
        The payload travels in 4 KiB descriptors, like Linux's pages."""
        mv = memoryview(data).cast("B")
        if len(mv) > self.max_write:
            raise ValueError(f"a write of {len(mv)} bytes exceeds max_write {self.max_write}")
        if lock_owner is not None:
            write_flags |= abi.FUSE_WRITE_LOCKOWNER
        pages = []
        pos = 0
        for n in self._pieces(len(mv)):
            pages.append(mv[pos:pos + n])
            pos += n
        req = codec.WriteRequest(
            self.header(nodeid, ctx), fh, offset, len(mv), write_flags, lock_owner or 0, flags, pages
        )
        out = await self.call(req, _OUT + 8)
        assert isinstance(out, codec.WriteOut)
        return out.size

    async def flush(self, nodeid: int, fh: int, lock_owner: int = 0, *, ctx: Any = None) -> None:
        await self.call(codec.FlushRequest(self.header(nodeid, ctx), fh, lock_owner), _OUT)

    async def release(
        self, nodeid: int, fh: int, flags: int = 0, release_flags: int = 0, lock_owner: int = 0, *, ctx: Any = None
    ) -> None:
        req = codec.ReleaseRequest(self.header(nodeid, ctx), fh, flags, release_flags, lock_owner)
        await self.call(req, _OUT)

    async def fsync(self, nodeid: int, fh: int, datasync: bool = False, *, ctx: Any = None) -> None:
        flags = abi.FUSE_FSYNC_FDATASYNC if datasync else 0
        await self.call(codec.FsyncRequest(self.header(nodeid, ctx), fh, flags), _OUT)

    async def fallocate(
        self, nodeid: int, fh: int, offset: int, length: int, mode: int = 0, *, ctx: Any = None
    ) -> None:
        await self.call(codec.FallocateRequest(self.header(nodeid, ctx), fh, offset, length, mode), _OUT)

    async def lseek(self, nodeid: int, fh: int, offset: int, whence: int, *, ctx: Any = None) -> int:
        out = await self.call(codec.LseekRequest(self.header(nodeid, ctx), fh, offset, whence), _OUT + 8)
        assert isinstance(out, codec.LseekOut)
        return out.offset

    async def copy_file_range(
        self,
        nodeid_in: int,
        fh_in: int,
        off_in: int,
        nodeid_out: int,
        fh_out: int,
        off_out: int,
        length: int,
        flags: int = 0,
        *,
        ctx: Any = None,
    ) -> int:
        req = codec.CopyFileRangeRequest(
            self.header(nodeid_in, ctx), fh_in, off_in, nodeid_out, fh_out, off_out, length, flags
        )
        out = await self.call(req, _OUT + 8)
        assert isinstance(out, codec.WriteOut)
        return out.size

    async def ioctl(
        self,
        nodeid: int,
        fh: int,
        cmd: int,
        arg: int = 0,
        in_data: bytes = b"",
        out_size: int = 0,
        flags: int = 0,
        *,
        ctx: Any = None,
    ) -> codec.IoctlOut:
        req = codec.IoctlRequest(self.header(nodeid, ctx), fh, flags, cmd, arg, len(in_data), out_size, in_data)
        return await self.call(req, _OUT + 16 + out_size)  # type: ignore[return-value]

    async def poll(
        self, nodeid: int, fh: int, events: int, kh: int = 0, flags: int = 0, *, ctx: Any = None
    ) -> int:
        out = await self.call(codec.PollRequest(self.header(nodeid, ctx), fh, kh, flags, events), _OUT + 8)
        assert isinstance(out, codec.PollOut)
        return out.revents

    # -- directories -------------------------------------------------------------------

    async def opendir(self, nodeid: int, flags: int = os.O_RDONLY | os.O_DIRECTORY, *, ctx: Any = None) -> codec.OpenOut:
        req = codec.OpendirRequest(self.header(nodeid, ctx), flags, 0)
        return await self.call(req, _OUT + 16)  # type: ignore[return-value]

    async def readdir(
        self, nodeid: int, fh: int, offset: int = 0, size: int = _PAGE, *, ctx: Any = None
    ) -> list[codec.Dirent]:
        """One READDIR reply as a list of entries; resume from the last
        entry's ``off``. An empty list means the end of the directory."""
        req = codec.ReaddirRequest(self.header(nodeid, ctx), fh, offset, size, 0, 0, 0)
        body = await self.call(req, _OUT + size)
        assert isinstance(body, bytes)
        return list(codec.iter_dirents(body))

    async def readdirplus(
        self, nodeid: int, fh: int, offset: int = 0, size: int = _PAGE, *, ctx: Any = None
    ) -> list[codec.Direntplus]:
        """One READDIRPLUS reply; resume from the last entry's ``dirent.off``.
        Every entry but ``.``/``..`` counts one lookup of its inode."""
        req = codec.ReaddirplusRequest(self.header(nodeid, ctx), fh, offset, size, 0, 0, 0)
        body = await self.call(req, _OUT + size)
        assert isinstance(body, bytes)
        return list(codec.iter_direntplus(body))

    async def readdir_all(self, nodeid: int, size: int = _PAGE, *, ctx: Any = None) -> list[codec.Dirent]:
        """OPENDIR, READDIR until the end, RELEASEDIR: the whole listing."""
        fh = (await self.opendir(nodeid, ctx=ctx)).fh
        out: list[codec.Dirent] = []
        try:
            offset = 0
            while True:
                batch = await self.readdir(nodeid, fh, offset, size, ctx=ctx)
                if not batch:
                    return out
                out.extend(batch)
                offset = batch[-1].off
        finally:
            await self.releasedir(nodeid, fh, ctx=ctx)

    async def releasedir(self, nodeid: int, fh: int, flags: int = 0, *, ctx: Any = None) -> None:
        await self.call(codec.ReleasedirRequest(self.header(nodeid, ctx), fh, flags, 0, 0), _OUT)

    async def fsyncdir(self, nodeid: int, fh: int, datasync: bool = False, *, ctx: Any = None) -> None:
        flags = abi.FUSE_FSYNC_FDATASYNC if datasync else 0
        await self.call(codec.FsyncdirRequest(self.header(nodeid, ctx), fh, flags), _OUT)

    # -- extended attributes --------------------------------------------------------------

    async def setxattr(
        self, nodeid: int, name: bytes, value: bytes, flags: int = 0, setxattr_flags: int = 0, *, ctx: Any = None
    ) -> None:
        """SETXATTR; the 16-byte argument when FUSE_SETXATTR_EXT was agreed."""
        extended = bool(self.flags & abi.FUSE_SETXATTR_EXT)
        req = codec.SetxattrRequest(
            self.header(nodeid, ctx), len(value), flags, setxattr_flags, name, bytes(value), extended=extended
        )
        await self.call(req, _OUT)

    async def getxattr(self, nodeid: int, name: bytes, size: int, *, ctx: Any = None) -> bytes | int:
        """The value (``size`` > 0: ERANGE if it is longer) or, with
        ``size`` 0, the value's length (an int)."""
        req = codec.GetxattrRequest(self.header(nodeid, ctx), size, name)
        body = await self.call(req, _OUT + max(size, 8), size_probe=size == 0)
        if size == 0:
            assert isinstance(body, codec.GetxattrOut)
            return body.size
        assert isinstance(body, bytes)
        if len(body) > size:
            raise FuseProtocolError(f"getxattr reply of {len(body)} bytes exceeds the asked {size}")
        return body

    async def listxattr(self, nodeid: int, size: int, *, ctx: Any = None) -> list[bytes] | int:
        """The attribute names (``size`` > 0) or, with ``size`` 0, the
        length of the NUL-separated list (an int)."""
        req = codec.ListxattrRequest(self.header(nodeid, ctx), size)
        body = await self.call(req, _OUT + max(size, 8), size_probe=size == 0)
        if size == 0:
            assert isinstance(body, codec.GetxattrOut)
            return body.size
        assert isinstance(body, bytes)
        if body and not body.endswith(b"\0"):
            raise FuseProtocolError("listxattr reply is not a NUL-terminated list")
        return body.split(b"\0")[:-1] if body else []

    async def removexattr(self, nodeid: int, name: bytes, *, ctx: Any = None) -> None:
        await self.call(codec.RemovexattrRequest(self.header(nodeid, ctx), name), _OUT)

    # -- locks ------------------------------------------------------------------------------

    def _lk(self, cls: type, nodeid: int, fh: int, owner: int, start: int, end: int, type: int, pid: int,
            flock: bool, ctx: Any) -> codec.Request:
        lk = codec.FileLockStruct(start, end, type, pid)
        return cls(self.header(nodeid, ctx), fh, owner, lk, abi.FUSE_LK_FLOCK if flock else 0)

    async def getlk(
        self, nodeid: int, fh: int, owner: int, *, start: int = 0, end: int = OFFSET_MAX, type: int = 1,
        pid: int = 0, ctx: Any = None,
    ) -> codec.FileLockStruct:
        """GETLK (``type`` F_RDLCK 0 / F_WRLCK 1 / F_UNLCK 2): the conflicting
        lock, or one of type F_UNLCK."""
        req = self._lk(codec.GetlkRequest, nodeid, fh, owner, start, end, type, pid, False, ctx)
        out = await self.call(req, _OUT + 24)
        assert isinstance(out, codec.LkOut)
        return out.lk

    async def setlk(
        self, nodeid: int, fh: int, owner: int, *, start: int = 0, end: int = OFFSET_MAX, type: int = 1,
        pid: int = 0, flock: bool = False, ctx: Any = None,
    ) -> None:
        req = self._lk(codec.SetlkRequest, nodeid, fh, owner, start, end, type, pid, flock, ctx)
        await self.call(req, _OUT)

    async def setlkw(
        self, nodeid: int, fh: int, owner: int, *, start: int = 0, end: int = OFFSET_MAX, type: int = 1,
        pid: int = 0, flock: bool = False, ctx: Any = None,
    ) -> None:
        req = self._lk(codec.SetlkwRequest, nodeid, fh, owner, start, end, type, pid, flock, ctx)
        await self.call(req, _OUT)

    # -- DAX ---------------------------------------------------------------------------------

    async def setupmapping(
        self, nodeid: int, fh: int, foffset: int, length: int, moffset: int, flags: int = 0, *, ctx: Any = None
    ) -> None:
        req = codec.SetupmappingRequest(self.header(nodeid, ctx), fh, foffset, length, flags, moffset)
        await self.call(req, _OUT)

    async def removemapping(self, nodeid: int, items: Sequence[tuple[int, int]], *, ctx: Any = None) -> None:
        """REMOVEMAPPING of ``(moffset, len)`` ranges."""
        await self.call(codec.RemovemappingRequest(self.header(nodeid, ctx), list(items)), _OUT)

