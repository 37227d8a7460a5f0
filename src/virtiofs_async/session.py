"""The FUSE session: negotiates FUSE_INIT and dispatches requests to a backend.

One :class:`FuseSession` per vhost-user connection (the guest's mount). The
transport hands it one descriptor chain at a time as two scatter-gather
lists: ``readable`` (the request) and ``writable`` (room for the reply); it
returns how many bytes of reply it wrote. It never sees vrings or sockets, and
it never imports an event loop: requests are independent coroutines, so the
transport may run any number of them concurrently and they may finish in any
order.

Errors: a malformed request is answered with the protocol error's errno when
its ``unique`` is known (else dropped) and logged once; a backend's
``FuseError`` becomes its errno; any other exception becomes EIO plus a logged
traceback. Nothing raises out of :meth:`FuseSession.handle_request`.
"""
from __future__ import annotations

import errno
import logging
import os
from typing import Any, Awaitable, Callable, Sequence

import attrs

from . import _accel
from .abi import fuse as abi
from . import codec
from .errors import FuseError, FuseProtocolError
from .operations import (
    EntryAttributes,
    FileLock,
    Operations,
    RequestContext,
    SizedDirectoryReply,
    pack_open_out,
    setattr_arguments,
)

log = logging.getLogger("virtiofs_async.session")

#: The protocol we speak; a kernel with an older minor still works down to 7.31.
OUR_MAJOR = abi.FUSE_KERNEL_VERSION
OUR_MINOR = abi.FUSE_KERNEL_MINOR_VERSION
OLDEST_MINOR = 31

_OUT_HEADER_SIZE = 16
_OP_INIT = int(abi.Opcode.INIT)
_OP_READ = int(abi.Opcode.READ)  # answered in place: FuseSession._read_into

# The hot functions, bound once (``_accel`` picks the Cython or pure twins).
_decode_request = _accel.decode_request
_write_reply = _accel.write_reply
_pack_attr = _accel.pack_attr
_pack_attr_out = _accel.pack_attr_out
_pack_entry_out = _accel.pack_entry_out
_pack_dirent = _accel.pack_dirent
_supp_groups = codec.supp_groups
#: RequestContext(uid, gid, pid, umask, groups), built cheaply (one per request).
_new_context = _accel.record_factory(RequestContext)
#: Reply bodies that go to the guest as they are (else None, or encode()).
_RAW_BODIES = (bytes, bytearray, memoryview, list)


@attrs.define(frozen=True)
class SessionConfig:
    """Limits the session offers at FUSE_INIT."""

    max_write: int = 1 << 20
    max_pages: int = 256
    max_background: int = 64
    congestion_threshold: int = 48
    time_gran: int = 1


@attrs.define(frozen=True)
class Negotiated:
    """What FUSE_INIT settled: the kernel's protocol minor and the common flags."""

    major: int
    minor: int
    flags: int
    max_write: int
    max_readahead: int
    #: The largest READ/READDIR the kernel can ask for (max_pages pages).
    max_read: int = 1 << 20


#: Operations capability attribute -> the FUSE_INIT flags it asks for.
_CAPABILITY_FLAGS = (
    ("supports_readdirplus", abi.FUSE_DO_READDIRPLUS | abi.FUSE_READDIRPLUS_AUTO),
    ("enable_writeback_cache", abi.FUSE_WRITEBACK_CACHE),
    ("handles_umask", abi.FUSE_DONT_MASK),
    ("supports_posix_locks", abi.FUSE_POSIX_LOCKS),
    ("supports_flock_locks", abi.FUSE_FLOCK_LOCKS),
    ("supports_killpriv_v2", abi.FUSE_HANDLE_KILLPRIV_V2),
    ("supports_posix_acl", abi.FUSE_POSIX_ACL),
)


_write_out_pack = abi.fuse_write_out.pack
#: fuse_entry_out's head (nodeid .. attr_valid_nsec) for "." and ".." in READDIRPLUS.
_UNCOUNTED_ENTRY_HEAD = bytes(abi.fuse_entry_out.size - abi.fuse_attr.size)


class _DirectoryReply(SizedDirectoryReply):
    """Packs entries into one READDIR(PLUS) reply of at most ``size`` bytes."""

    __slots__ = ()

    def add_names(self, entries: Sequence[tuple[int, int, int, bytes]]) -> int:
        if self.plus:
            return super().add_names(entries)
        parts, used, size, count = self.parts, self._used, self._size, 0
        for ino, next_offset, dtype, name in entries:
            n = len(name)
            need = (24 + n + 7) & ~7  # codec.dirent_size
            if used + need > size:
                break
            if not n or b"/" in name or b"\0" in name:
                raise ValueError(f"backend produced an invalid directory entry name {name!r}")
            parts.append(_pack_dirent(ino, next_offset, dtype, name))
            used += need
            count += 1
        self._used = used
        return count

    def entry_size(self, name_len: int) -> int:
        return codec.direntplus_size(name_len) if self.plus else codec.dirent_size(name_len)

    def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
        if not name or b"/" in name or b"\0" in name:
            raise ValueError(f"backend produced an invalid directory entry name {name!r}")
        dtype = (attributes.st_mode & 0o170000) >> 12
        # A fuse_direntplus is a fuse_entry_out followed by a fuse_dirent.
        if self.plus:
            need = codec.direntplus_size(len(name))
            if self._used + need > self._size:
                return False
            if name in (b".", b".."):
                # The kernel does not count lookups for these; a zero nodeid
                # (and zero generation and timeouts) tells it so explicitly.
                entry = _UNCOUNTED_ENTRY_HEAD + _pack_attr(attributes)
            else:
                entry = _pack_entry_out(attributes)
            dirent = _pack_dirent(attributes.st_ino, next_offset, dtype, name)
            self.parts.append(entry)
            self.parts.append(dirent)
        else:
            need = codec.dirent_size(len(name))
            if self._used + need > self._size:
                return False
            self.parts.append(_pack_dirent(attributes.st_ino, next_offset, dtype, name))
        self._used += need
        return True


#: Returned by handlers of requests that get no reply (FORGET, INTERRUPT).
NO_REPLY = object()

Body = Any  # bytes-like, a list of bytes-like, an object with encode(), None or NO_REPLY


class FuseSession:
    """FUSE protocol state for one guest mount, over one backend.

    ``handle_request`` is the whole interface the transport uses.
    """

    def __init__(self, operations: Operations, config: SessionConfig | None = None) -> None:
        self.operations = operations
        self.config = config or SessionConfig()
        self.negotiated: Negotiated | None = None
        self.destroyed = False
        self._reinit_allowed = False
        #: The backend's inline responder for the current mount (see inline_responder).
        self._responder: Any | None = None
        self._live_responder: Any | None = None
        handlers: dict[int, Callable[[Any], Awaitable[Body]]] = {
            abi.Opcode.INIT: self._init,
            abi.Opcode.DESTROY: self._destroy,
            abi.Opcode.LOOKUP: self._lookup,
            abi.Opcode.FORGET: self._forget,
            abi.Opcode.BATCH_FORGET: self._batch_forget,
            abi.Opcode.GETATTR: self._getattr,
            abi.Opcode.SETATTR: self._setattr,
            abi.Opcode.READLINK: self._readlink,
            abi.Opcode.SYMLINK: self._symlink,
            abi.Opcode.MKNOD: self._mknod,
            abi.Opcode.MKDIR: self._mkdir,
            abi.Opcode.UNLINK: self._unlink,
            abi.Opcode.RMDIR: self._rmdir,
            abi.Opcode.RENAME: self._rename,
            abi.Opcode.RENAME2: self._rename2,
            abi.Opcode.LINK: self._link,
            abi.Opcode.OPEN: self._open,
            abi.Opcode.READ: self._read,
            abi.Opcode.WRITE: self._write,
            abi.Opcode.STATFS: self._statfs,
            abi.Opcode.RELEASE: self._release,
            abi.Opcode.FSYNC: self._fsync,
            abi.Opcode.SETXATTR: self._setxattr,
            abi.Opcode.GETXATTR: self._getxattr,
            abi.Opcode.LISTXATTR: self._listxattr,
            abi.Opcode.REMOVEXATTR: self._removexattr,
            abi.Opcode.FLUSH: self._flush,
            abi.Opcode.OPENDIR: self._opendir,
            abi.Opcode.READDIR: self._readdir,
            abi.Opcode.READDIRPLUS: self._readdirplus,
            abi.Opcode.RELEASEDIR: self._releasedir,
            abi.Opcode.FSYNCDIR: self._fsyncdir,
            abi.Opcode.GETLK: self._getlk,
            abi.Opcode.SETLK: self._setlk,
            abi.Opcode.SETLKW: self._setlkw,
            abi.Opcode.ACCESS: self._access,
            abi.Opcode.CREATE: self._create,
            abi.Opcode.INTERRUPT: self._interrupt,
            abi.Opcode.FALLOCATE: self._fallocate,
            abi.Opcode.LSEEK: self._lseek,
            abi.Opcode.COPY_FILE_RANGE: self._copy_file_range,
            abi.Opcode.SYNCFS: self._syncfs,
            abi.Opcode.TMPFILE: self._tmpfile,
            abi.Opcode.IOCTL: self._ioctl,
            abi.Opcode.POLL: self._poll,
            abi.Opcode.SETUPMAPPING: self._enosys,
            abi.Opcode.REMOVEMAPPING: self._enosys,
        }
        #: opcode -> handler (None: virtio-fs does not use it); every decoded
        #: opcode is an Opcode member, so it indexes this list.
        self._handlers: list[Callable[[Any], Awaitable[Body]] | None] = [None] * (max(abi.Opcode) + 1)
        for opcode, handler in handlers.items():
            self._handlers[opcode] = handler

    # -- the transport's entry point ---------------------------------------
    async def handle_request(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Serve one request; return the number of reply bytes written into
        ``writable`` (0 when the request gets no reply)."""
        try:
            request = _decode_request(readable)
        except FuseProtocolError as exc:
            log.warning("malformed FUSE request (unique=%s): %s -> errno %d", exc.unique, exc, exc.errno)
            if exc.unique is None:
                return 0
            return self._reply_error(writable, exc.unique, exc.errno)
        header = request.header
        opcode = header.opcode
        if log.isEnabledFor(logging.DEBUG):
            log.debug("request %r", request)
        if self.negotiated is None and opcode != _OP_INIT:
            log.warning("opcode %s before FUSE_INIT (unique=%d) -> EIO", _opname(opcode), header.unique)
            return self._reply_error(writable, header.unique, errno.EIO)
        handler = self._handlers[opcode]
        if handler is None:  # a known opcode that virtio-fs does not use (e.g. CUSE_INIT)
            log.warning("unsupported opcode %s (unique=%d) -> ENOSYS", _opname(opcode), header.unique)
            return self._reply_error(writable, header.unique, errno.ENOSYS)
        try:
            if opcode == _OP_READ:
                return await self._read_into(request, writable)
            body = await handler(request)
        except FuseError as exc:
            if exc.errno != errno.ENOENT or log.isEnabledFor(logging.DEBUG):
                log.log(
                    logging.DEBUG if exc.errno in _QUIET_ERRNOS else logging.INFO,
                    "%s nodeid=%d unique=%d -> %s",
                    _opname(opcode), header.nodeid, header.unique, errno.errorcode.get(exc.errno, exc.errno),
                )
            return self._reply_error(writable, header.unique, exc.errno)
        except Exception:
            log.exception("backend failed on %s nodeid=%d unique=%d -> EIO", _opname(opcode), header.nodeid, header.unique)
            return self._reply_error(writable, header.unique, errno.EIO)
        if body is NO_REPLY:
            return 0
        if body is None:
            body = ()
        elif not isinstance(body, _RAW_BODIES):
            body = body.encode()
        written = _write_reply(writable, header.unique, 0, body)
        return written if written else self._reply_too_big(writable, header.unique, body, opcode)

    #: What the transport may offer small requests to before calling
    #: :meth:`handle_request` (``VirtQueue.pop_serving``): the backend's
    #: :meth:`~virtiofs_async.operations.Operations.inline_responder` once
    #: FUSE_INIT has succeeded, while the mount lasts (``_live_responder``,
    #: kept by ``_update_live``). None otherwise, and while this module logs
    #: at DEBUG (every request is then logged here). Read-only; read at
    #: every kick, so a compiled descriptor when the compiled twins run.
    inline_responder = _accel.InlineGate("_live_responder", log)

    def _update_live(self) -> None:
        """Recompute what ``inline_responder`` gives, after ``negotiated``,
        ``destroyed`` or ``_responder`` changed."""
        live = self.negotiated is not None and not self.destroyed
        self._live_responder = self._responder if live else None

    def device_reset(self) -> None:
        """The transport stopped a queue (guest reset or reboot, VM pause):
        a FUSE_INIT that follows starts a new mount instead of being an
        error. Requests of the current mount keep working meanwhile."""
        if self.negotiated is not None:
            self._reinit_allowed = True

    async def close(self) -> None:
        """The connection is gone: let the backend forget this mount."""
        if self.negotiated is not None and not self.destroyed:
            self.destroyed = True
            self._update_live()
            try:
                await self.operations.destroy()
            except Exception:
                log.exception("backend failed in destroy()")

    # -- reply writing -------------------------------------------------------
    def _reply_error(self, writable: Sequence[memoryview], unique: int, err: int) -> int:
        if not 0 < err < 4096:
            log.error("invalid errno %r for unique=%d, answering EIO", err, unique)
            err = errno.EIO
        header = _accel.encode_out_header(unique, err, 0)
        return _accel.scatter(writable, (header,))

    def _reply_too_big(self, writable: Sequence[memoryview], unique: int, body: Any, opcode: int) -> int:
        """``write_reply`` found no room for ``body`` (bytes-like or a list):
        log it and answer EIO when at least a header fits."""
        parts = body if isinstance(body, (list, tuple)) else (body,)
        body_len = 0
        for part in parts:
            body_len += len(part) if not isinstance(part, memoryview) else part.nbytes
        room = 0
        for view in writable:
            room += view.nbytes
        log.warning(
            "reply to %s unique=%d needs %d bytes, the guest gave %d -> EIO",
            _opname(opcode), unique, _OUT_HEADER_SIZE + body_len, room,
        )
        return self._reply_error(writable, unique, errno.EIO) if room >= _OUT_HEADER_SIZE else 0

    # -- helpers ---------------------------------------------------------------
    def _ctx(self, req: Any, umask: int = 0) -> RequestContext:
        header = req.header
        ext = req.ext
        return _new_context(
            header.uid,
            header.gid,
            header.pid,
            umask if umask and self.operations.handles_umask else 0,
            _supp_groups(ext) if ext else None,  # None: not sent
        )

    def _flag(self, flag: int) -> bool:
        neg = self.negotiated
        return neg is not None and bool(neg.flags & flag)

    # -- handlers ----------------------------------------------------------------
    async def _init(self, req: codec.InitRequest) -> Body:
        if self.negotiated is not None:
            # Linux sends FUSE_INIT once per mount. Another one is a new mount
            # after FUSE_DESTROY, or the guest driver starting over after a
            # device reset (reboot): end the old mount as virtiofsd does and
            # negotiate afresh. Anything else is a protocol error.
            if not (self.destroyed or self._reinit_allowed):
                log.warning("second FUSE_INIT on one session -> EPROTO")
                raise FuseError(errno.EPROTO)
            log.info("FUSE_INIT after %s: starting a new mount", "FUSE_DESTROY" if self.destroyed else "a device reset")
            self.negotiated = None
            self._responder = None
            self._update_live()
            if not self.destroyed:
                self.destroyed = True
                try:
                    await self.operations.destroy()
                except Exception:
                    log.exception("backend failed in destroy()")
            self.destroyed = False
            self._reinit_allowed = False
        if req.major > OUR_MAJOR:
            # Tell the kernel our major; it retries with it (fuse.h "INIT request and reply").
            return codec.InitOut(major=OUR_MAJOR, minor=OUR_MINOR, max_readahead=0, flags=0,
                                 max_background=0, congestion_threshold=0, max_write=0,
                                 time_gran=0, max_pages=0, map_alignment=0)
        if req.major < OUR_MAJOR or req.minor < OLDEST_MINOR:
            log.error("guest speaks FUSE %d.%d, we need 7.%d or later", req.major, req.minor, OLDEST_MINOR)
            raise FuseError(errno.EPROTO)
        ops = self.operations
        wanted = (
            abi.FUSE_ASYNC_READ
            | abi.FUSE_ATOMIC_O_TRUNC
            | abi.FUSE_BIG_WRITES
            | abi.FUSE_AUTO_INVAL_DATA
            | abi.FUSE_ASYNC_DIO
            | abi.FUSE_PARALLEL_DIROPS
            | abi.FUSE_MAX_PAGES
            | abi.FUSE_CACHE_SYMLINKS
            | abi.FUSE_INIT_EXT
        )
        for name, flag in _CAPABILITY_FLAGS:
            if getattr(ops, name):
                wanted |= flag
        flags = wanted & req.flags
        minor = min(req.minor, OUR_MINOR)
        cfg = self.config
        max_pages = cfg.max_pages if flags & abi.FUSE_MAX_PAGES else 32
        max_write = min(cfg.max_write, max_pages * 4096)
        await ops.init()
        self.negotiated = Negotiated(
            major=OUR_MAJOR, minor=minor, flags=flags, max_write=max_write, max_readahead=req.max_readahead,
            max_read=max_pages * 4096,
        )
        self._responder = ops.inline_responder(max_pages * 4096)
        self._update_live()
        log.info("FUSE_INIT: guest 7.%d, agreed 7.%d, flags %#x, max_write %d", req.minor, minor, flags, max_write)
        return codec.InitOut(
            major=OUR_MAJOR,
            minor=minor,
            max_readahead=req.max_readahead,
            flags=flags,
            max_background=cfg.max_background,
            congestion_threshold=cfg.congestion_threshold,
            max_write=max_write,
            time_gran=cfg.time_gran,
            max_pages=max_pages,
            map_alignment=0,
        )

    async def _destroy(self, req: codec.DestroyRequest) -> Body:
        self.destroyed = True
        self._update_live()
        await self.operations.destroy()
        return None

    async def _lookup(self, req: codec.LookupRequest) -> Body:
        return _pack_entry_out(await self.operations.lookup(req.header.nodeid, req.name, self._ctx(req)))

    async def _forget(self, req: codec.ForgetRequest) -> Body:
        await self._forget_many([(req.header.nodeid, req.nlookup)])
        return NO_REPLY

    async def _batch_forget(self, req: codec.BatchForgetRequest) -> Body:
        await self._forget_many(list(req.items))
        return NO_REPLY

    async def _forget_many(self, items: list[tuple[int, int]]) -> None:
        try:
            await self.operations.forget(items)  # type: ignore[arg-type]
        except Exception:
            log.exception("backend failed in forget(%d inodes)", len(items))

    async def _getattr(self, req: codec.GetattrRequest) -> Body:
        fh = req.fh if req.getattr_flags & abi.FUSE_GETATTR_FH else None
        return _pack_attr_out(await self.operations.getattr(req.header.nodeid, self._ctx(req), fh))

    async def _setattr(self, req: codec.SetattrRequest) -> Body:
        attr, fields, fh = setattr_arguments(
            req.header.nodeid, req.valid, req.fh, req.size, req.atime, req.mtime, req.ctime,
            req.atimensec, req.mtimensec, req.ctimensec, req.mode, req.uid, req.gid,
        )
        return _pack_attr_out(await self.operations.setattr(req.header.nodeid, attr, fields, fh, self._ctx(req)))

    async def _readlink(self, req: codec.ReadlinkRequest) -> Body:
        return bytes(await self.operations.readlink(req.header.nodeid, self._ctx(req)))

    async def _symlink(self, req: codec.SymlinkRequest) -> Body:
        return _pack_entry_out(await self.operations.symlink(req.header.nodeid, req.name, req.target, self._ctx(req)))

    async def _mknod(self, req: codec.MknodRequest) -> Body:
        entry = await self.operations.mknod(
            req.header.nodeid, req.name, req.mode, req.rdev, self._ctx(req, req.umask)
        )
        return _pack_entry_out(entry)

    async def _mkdir(self, req: codec.MkdirRequest) -> Body:
        entry = await self.operations.mkdir(req.header.nodeid, req.name, req.mode, self._ctx(req, req.umask))
        return _pack_entry_out(entry)

    async def _unlink(self, req: codec.UnlinkRequest) -> Body:
        await self.operations.unlink(req.header.nodeid, req.name, self._ctx(req))
        return None

    async def _rmdir(self, req: codec.RmdirRequest) -> Body:
        await self.operations.rmdir(req.header.nodeid, req.name, self._ctx(req))
        return None

    async def _rename(self, req: codec.RenameRequest) -> Body:
        await self.operations.rename(
            req.header.nodeid, req.oldname, req.newdir, req.newname, 0, self._ctx(req)
        )
        return None

    async def _rename2(self, req: codec.Rename2Request) -> Body:
        await self.operations.rename(
            req.header.nodeid, req.oldname, req.newdir, req.newname, req.flags, self._ctx(req)
        )
        return None

    async def _link(self, req: codec.LinkRequest) -> Body:
        return _pack_entry_out(await self.operations.link(req.oldnodeid, req.header.nodeid, req.newname, self._ctx(req)))

    async def _open(self, req: codec.OpenRequest) -> Body:
        return pack_open_out(await self.operations.open(req.header.nodeid, req.flags, self._ctx(req)))

    def _check_io_size(self, size: int, what: str) -> None:
        # A guest asking for more than it negotiated would make a backend
        # allocate it: refuse instead.
        neg = self.negotiated
        limit = neg.max_read if neg is not None else 0
        if size > max(limit, neg.max_write if neg is not None else 0):
            log.warning("%s of %d bytes exceeds the negotiated %d -> EINVAL", what, size, limit)
            raise FuseError(errno.EINVAL)

    async def _read(self, req: codec.ReadRequest) -> Body:
        self._check_io_size(req.size, "READ")
        data = await self.operations.read(req.fh, req.offset, req.size)
        if len(data) > req.size:
            raise _backend_bug(f"read() returned {len(data)} bytes, {req.size} were asked")
        return data

    async def _read_into(self, req: codec.ReadRequest, writable: Sequence[memoryview]) -> int:
        """READ answered in place: the backend fills the guest's buffers
        after the reply header (``Operations.read_into``: no copy here), the
        header goes in front; returns the reply length. Errors propagate as
        from any handler. A guest that gave less room than it asked for is
        answered as ``_read`` + the generic reply would: the data when it
        fits, else EIO (nothing without room for a header)."""
        size = req.size
        self._check_io_size(size, "READ")
        unique = req.header.unique
        views = self._read_reply_views(writable, size)
        if views is not None:
            n = await self.operations.read_into(req.fh, req.offset, size, views)
            if not 0 <= n <= size:
                raise _backend_bug(f"read_into() returned {n} for a read of {size} bytes")
            return _accel.scatter(writable, (_accel.encode_out_header(unique, 0, n),)) + n
        data = await self._read(req)
        n = data.nbytes if isinstance(data, memoryview) else len(data)
        room = sum(view.nbytes for view in writable)
        if _OUT_HEADER_SIZE + n > room:
            log.warning("reply to READ unique=%d needs %d bytes, the guest gave %d -> EIO",
                        unique, _OUT_HEADER_SIZE + n, room)
            if room < _OUT_HEADER_SIZE:
                return 0
            raise FuseError(errno.EIO)
        return _accel.scatter(writable, (_accel.encode_out_header(unique, 0, n), data))

    @staticmethod
    def _read_reply_views(writable: Sequence[memoryview], size: int) -> Sequence[memoryview] | None:
        """The ``size`` bytes of ``writable`` (byte views) that follow the
        reply header, as views of it; None when the guest gave less room."""
        if writable and writable[0].nbytes == _OUT_HEADER_SIZE:  # Linux: the header has its own buffer
            rest = writable[1:]
            if sum(map(len, rest)) == size:
                return rest
        views: list[memoryview] = []
        skip = _OUT_HEADER_SIZE
        for view in writable:
            n = view.nbytes
            if skip:
                if n <= skip:
                    skip -= n
                    continue
                view = view[skip:]
                n -= skip
                skip = 0
            if n >= size:
                if size:
                    views.append(view if n == size else view[:size])
                return views
            views.append(view)
            size -= n
        return views if not skip and not size else None

    async def _write(self, req: codec.WriteRequest) -> Body:
        written = await self.operations.write(req.fh, req.offset, req.data, self._ctx(req))
        if not 0 <= written <= req.size:
            raise _backend_bug(f"write() returned {written} for a write of {req.size} bytes")
        return _write_out_pack(written, 0)

    async def _statfs(self, req: codec.StatfsRequest) -> Body:
        st = await self.operations.statfs(self._ctx(req))
        return codec.StatfsOut(
            blocks=st.f_blocks,
            bfree=st.f_bfree,
            bavail=st.f_bavail,
            files=st.f_files,
            ffree=st.f_ffree,
            bsize=st.f_bsize,
            namelen=st.f_namemax,
            frsize=st.f_frsize,
        )

    async def _release(self, req: codec.ReleaseRequest) -> Body:
        try:
            await self.operations.release(req.fh)
        except FuseError:
            pass  # close(2) in the guest has already returned; nothing to tell
        return None

    async def _fsync(self, req: codec.FsyncRequest) -> Body:
        await self.operations.fsync(req.fh, bool(req.fsync_flags & 1))
        return None

    async def _setxattr(self, req: codec.SetxattrRequest) -> Body:
        await self.operations.setxattr(req.header.nodeid, req.name, bytes(req.value), req.flags, self._ctx(req))
        return None

    async def _getxattr(self, req: codec.GetxattrRequest) -> Body:
        value = bytes(await self.operations.getxattr(req.header.nodeid, req.name, self._ctx(req)))
        if req.size == 0:
            return codec.GetxattrOut(size=len(value))
        if len(value) > req.size:
            raise FuseError(errno.ERANGE)
        return value

    async def _listxattr(self, req: codec.ListxattrRequest) -> Body:
        names = await self.operations.listxattr(req.header.nodeid, self._ctx(req))
        value = b"".join(bytes(n) + b"\0" for n in names)
        if req.size == 0:
            return codec.GetxattrOut(size=len(value))
        if len(value) > req.size:
            raise FuseError(errno.ERANGE)
        return value

    async def _removexattr(self, req: codec.RemovexattrRequest) -> Body:
        await self.operations.removexattr(req.header.nodeid, req.name, self._ctx(req))
        return None

    async def _flush(self, req: codec.FlushRequest) -> Body:
        await self.operations.flush(req.fh, req.lock_owner)
        return None

    async def _opendir(self, req: codec.OpendirRequest) -> Body:
        return pack_open_out(await self.operations.opendir(req.header.nodeid, self._ctx(req)))

    async def _readdir_common(self, req: codec.ReaddirRequest, plus: bool) -> Body:
        self._check_io_size(req.size, "READDIR")
        reply = _DirectoryReply(req.size, plus)
        await self.operations.readdir(req.fh, req.offset, reply)
        return reply.parts

    async def _readdir(self, req: codec.ReaddirRequest) -> Body:
        return await self._readdir_common(req, False)

    async def _readdirplus(self, req: codec.ReaddirplusRequest) -> Body:
        return await self._readdir_common(req, True)

    async def _releasedir(self, req: codec.ReleasedirRequest) -> Body:
        try:
            await self.operations.releasedir(req.fh)
        except FuseError:
            pass
        return None

    async def _fsyncdir(self, req: codec.FsyncdirRequest) -> Body:
        await self.operations.fsyncdir(req.fh, bool(req.fsync_flags & 1))
        return None

    def _lock_of(self, req: Any) -> FileLock:
        return FileLock(start=req.lk.start, end=req.lk.end, type=req.lk.type, pid=req.lk.pid)

    async def _getlk(self, req: codec.GetlkRequest) -> Body:
        if not self.operations.supports_posix_locks:
            raise FuseError(errno.ENOSYS)
        lock = await self.operations.getlk(req.fh, req.owner, self._lock_of(req))
        return codec.LkOut(lk=codec.FileLockStruct(start=lock.start, end=lock.end, type=lock.type, pid=lock.pid))

    async def _setlk_common(self, req: Any, wait: bool) -> Body:
        flock = bool(req.lk_flags & abi.FUSE_LK_FLOCK)
        if not (self.operations.supports_flock_locks if flock else self.operations.supports_posix_locks):
            raise FuseError(errno.ENOSYS)
        await self.operations.setlk(req.fh, req.owner, self._lock_of(req), wait, flock)
        return None

    async def _setlk(self, req: codec.SetlkRequest) -> Body:
        return await self._setlk_common(req, False)

    async def _setlkw(self, req: codec.SetlkwRequest) -> Body:
        return await self._setlk_common(req, True)

    async def _access(self, req: codec.AccessRequest) -> Body:
        await self.operations.access(req.header.nodeid, req.mask, self._ctx(req))
        return None

    async def _create(self, req: codec.CreateRequest) -> Body:
        fi, entry = await self.operations.create(
            req.header.nodeid, req.name, req.mode, req.flags, self._ctx(req, req.umask)
        )
        return [_pack_entry_out(entry), pack_open_out(fi)]

    async def _tmpfile(self, req: codec.TmpfileRequest) -> Body:
        fi, entry = await self.operations.tmpfile(
            req.header.nodeid, req.mode, req.flags, self._ctx(req, req.umask)
        )
        return [_pack_entry_out(entry), pack_open_out(fi)]

    async def _interrupt(self, req: codec.InterruptRequest) -> Body:
        # Linux's virtiofs driver does not send interrupts; when one comes,
        # the request it names simply completes as usual.
        log.debug("FUSE_INTERRUPT for unique=%d ignored", req.unique)
        return NO_REPLY

    async def _fallocate(self, req: codec.FallocateRequest) -> Body:
        await self.operations.fallocate(req.fh, req.mode, req.offset, req.length)
        return None

    async def _lseek(self, req: codec.LseekRequest) -> Body:
        if req.whence not in (os.SEEK_DATA, os.SEEK_HOLE):
            raise FuseError(errno.EINVAL)
        offset = await self.operations.lseek(req.fh, req.offset, req.whence)
        return codec.LseekOut(offset=offset)

    async def _copy_file_range(self, req: codec.CopyFileRangeRequest) -> Body:
        copied = await self.operations.copy_file_range(
            req.fh_in, req.off_in, req.fh_out, req.off_out, req.len, req.flags
        )
        return codec.WriteOut(size=copied)

    async def _syncfs(self, req: codec.SyncfsRequest) -> Body:
        await self.operations.syncfs()
        return None

    async def _ioctl(self, req: codec.IoctlRequest) -> Body:
        out = bytes(await self.operations.ioctl(req.fh, req.cmd, req.arg, bytes(req.in_data), req.out_size, req.flags))
        if len(out) > req.out_size:
            raise _backend_bug(f"ioctl() returned {len(out)} bytes, out_size is {req.out_size}")
        return [codec.IoctlOut(result=0, flags=0, in_iovs=0, out_iovs=0).encode(), out]

    async def _poll(self, req: codec.PollRequest) -> Body:
        revents = await self.operations.poll(req.fh, req.events)
        return codec.PollOut(revents=revents)

    async def _enosys(self, req: Any) -> Body:
        raise FuseError(errno.ENOSYS)


_QUIET_ERRNOS = frozenset({errno.ENOENT, errno.ENODATA, errno.EEXIST, errno.ENOTEMPTY, errno.ENOSYS})


def _backend_bug(message: str) -> Exception:
    return RuntimeError(message)


def _opname(opcode: int) -> str:
    try:
        return abi.Opcode(opcode).name
    except ValueError:
        return str(opcode)
