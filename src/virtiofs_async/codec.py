"""Sans-IO FUSE codec: guest request buffers in, typed records out, and back.

Two directions:

* Daemon side: :func:`decode_request` parses one request from the guest's
  scatter-gather list of readable buffers; reply bodies (``EntryOut``,
  ``AttrOut`` ...) and :func:`encode_out_header`, :func:`pack_dirent`,
  :func:`pack_direntplus` build the answer.
* Host side of a directory listing: :func:`parse_linux_dirents64` splits a
  ``getdents64(2)`` result into records, and :func:`pack_host_dirents` turns
  those records into READDIR reply bytes (the one host format a backend
  handles in bulk, here so that it has a compiled twin too).
* Frontend side (tests, the built-in FUSE client): ``Request.encode()`` turns
  a request record into buffers, :func:`decode_reply` and the ``decode``
  class methods parse the daemon's answer.

Wire rules this module enforces (facts of Linux's fuse.h and fs/fuse/*.c):

* ``fuse_in_header.len`` counts the header, every argument and the request
  extensions. It must be at least the header size and at most the number of
  readable bytes. Readable bytes beyond ``len`` are ignored: a transport may
  hand over a longer buffer, and the virtio-fs device reads ``len`` bytes.
* ``total_extlen`` (8-byte units, 7.38) says how many of the last bytes are
  extension records (``fuse_ext_header``); they are split off into
  ``Request.ext`` and checked for framing.
* Every fixed-size argument struct must be complete. Extra bytes after a
  request whose arguments are only fixed structs are ignored (a newer minor
  may grow a struct). Variable parts must match exactly: names are
  NUL-terminated and end where the next part starts, a WRITE payload is
  exactly ``size`` bytes, BATCH_FORGET / REMOVEMAPPING carry exactly
  ``count`` records, and so on.
* Path component names (lookup, mknod, rename, link, ...) are non-empty and
  contain neither ``/`` nor NUL. Xattr names and symlink targets are
  non-empty without NUL (``/`` allowed). TMPFILE's name is whatever the
  kernel put there (it sends ``"/"``) and is only checked for framing.
* The SETXATTR argument is 8 bytes unless FUSE_SETXATTR_EXT was agreed, then
  16: the caller says which with ``decode_request(..., setxattr_ext=True)``.
* FUSE_SECURITY_CTX before 7.38 (context as an extra argument) is not
  supported: a daemon must not agree to it with a kernel older than 7.38.

Malformed input raises :class:`~virtiofs_async.errors.FuseProtocolError`
and nothing else; ``.unique`` is set whenever the header was readable, and
``.errno`` is EINVAL (ENOSYS for opcodes without a request type).

Names, targets and xattr names are ``bytes`` without the NUL. WRITE payloads
are zero-copy ``memoryview`` slices of the input buffers; everything else is
copied into ``bytes``.
"""
from __future__ import annotations

import errno as _errno
import os
import struct
from typing import Any, Callable, ClassVar, Iterator, Mapping, NoReturn, Protocol, Sequence, TypeVar, Union

import attrs

from .abi import fuse as abi
from .abi.fuse import Opcode
from .buffers import scatter as _scatter
from .errors import FuseProtocolError

__all__ = [
    "InHeader", "OutHeader", "Request", "FileLockStruct",
    "decode_request", "encode_out_header", "decode_out_header", "decode_reply",
    "dirent_size", "direntplus_size", "pack_dirent", "pack_direntplus", "pack_host_dirents", "pack_raw_dirents",
    "scan_raw_dirents",
    "parse_linux_dirents64",
    "AttributeSource", "split_timeout", "pack_attr", "pack_attr_out", "pack_entry_out", "write_reply", "record_factory",
    "iter_dirents", "iter_direntplus", "iter_extensions", "supp_groups",
    "Attr", "EntryOut", "AttrOut", "OpenOut", "CreateOut", "WriteOut", "StatfsOut",
    "InitOut", "GetxattrOut", "LkOut", "LseekOut", "PollOut", "IoctlOut", "BmapOut",
    "Dirent", "Direntplus", "REPLY_BODY", "REQUEST_TYPES", "NO_REPLY", "EMPTY_REPLY",
    "RAW_REPLY", "IN_HEADER_SIZE", "OUT_HEADER_SIZE",
]

Buffer = Union[bytes, bytearray, memoryview]
T = TypeVar("T")

_EINVAL = _errno.EINVAL

_IN_HEADER = abi.fuse_in_header
_OUT_HEADER = abi.fuse_out_header
IN_HEADER_SIZE = _IN_HEADER.size  # 40
OUT_HEADER_SIZE = _OUT_HEADER.size  # 16
_in_header_unpack_from = _IN_HEADER.unpack_from
_out_header_pack = _OUT_HEADER.pack


# ---------------------------------------------------------------------------
# Headers
# ---------------------------------------------------------------------------


@attrs.define
class InHeader:
    """``fuse_in_header``. ``opcode`` is an :class:`Opcode` after decoding."""

    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    #: Length of the request extensions in 8-byte units (7.38).
    total_extlen: int = 0

    def encode(self) -> bytes:
        return _IN_HEADER.pack(
            self.len, self.opcode, self.unique, self.nodeid, self.uid, self.gid, self.pid, self.total_extlen, 0
        )

    @classmethod
    def decode(cls, data: Buffer) -> InHeader:
        """Parse the first 40 bytes of ``data`` (more may follow)."""
        if len(data) < IN_HEADER_SIZE:
            raise FuseProtocolError(f"fuse_in_header needs {IN_HEADER_SIZE} bytes, got {len(data)}")
        f = _in_header_unpack_from(data)
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7])


@attrs.define
class OutHeader:
    """``fuse_out_header``; ``error`` is a positive errno (0 for success)."""

    len: int
    error: int
    unique: int


def encode_out_header(unique: int, error: int, body_len: int) -> bytes:
    """The 16-byte reply header for a ``body_len``-byte body. ``error`` is a
    positive errno (0 for success); the wire carries it negated."""
    return _out_header_pack(16 + body_len, -error, unique)


def decode_out_header(data: Buffer) -> OutHeader:
    """Parse a reply header (the first 16 bytes of ``data``). The wire error
    must lie in (-512, 0], as the Linux client demands."""
    if len(data) < OUT_HEADER_SIZE:
        raise FuseProtocolError(f"fuse_out_header needs {OUT_HEADER_SIZE} bytes, got {len(data)}")
    length, error, unique = _OUT_HEADER.unpack_from(data)
    if error > 0 or error <= -512:
        raise FuseProtocolError(f"reply error {error} is not a negated errno", unique=unique)
    return OutHeader(length, -error, unique)


# ---------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------


def _bad(h: InHeader, msg: str, err: int = _EINVAL) -> NoReturn:
    op = h.opcode
    name = op.name if isinstance(op, Opcode) else str(op)
    raise FuseProtocolError(f"FUSE_{name} (unique={h.unique}): {msg}", err, h.unique)


def _short(h: InHeader, what: str, need: int, got: int) -> NoReturn:
    _bad(h, f"{what} needs {need} bytes, {got} present")


def _check_component(h: InHeader, name: bytes, what: str) -> bytes:
    if not name:
        _bad(h, f"empty {what}")
    if b"/" in name:
        _bad(h, f"{what} {name[:64]!r} contains '/'")
    if b"\0" in name:
        _bad(h, f"{what} {name[:64]!r} contains NUL")
    return name


def _check_string(h: InHeader, s: bytes, what: str) -> bytes:
    if not s:
        _bad(h, f"empty {what}")
    if b"\0" in s:
        _bad(h, f"{what} {s[:64]!r} contains NUL")
    return s


def _last_string(h: InHeader, body: bytes, start: int, what: str) -> bytes:
    """``body[start:]`` must be one NUL-terminated string; return it without the NUL."""
    end = len(body) - 1
    if end < start:
        _bad(h, f"{what} missing")
    if body[end] != 0:
        _bad(h, f"{what} is not NUL-terminated")
    return body[start:end]


def _first_string(h: InHeader, body: bytes, start: int, what: str) -> tuple[bytes, int]:
    """A NUL-terminated string at ``start``; return it and the offset after its NUL."""
    nul = body.find(b"\0", start)
    if nul < 0:
        _bad(h, f"{what} is not NUL-terminated")
    return body[start:nul], nul + 1


def _span(views: list[memoryview], start: int, end: int) -> list[memoryview]:
    """Zero-copy slices covering bytes [start, end) of the concatenation of ``views``."""
    out: list[memoryview] = []
    if start >= end:
        return out
    pos = 0
    for v in views:
        vend = pos + len(v)
        if vend > start:
            a = start - pos if start > pos else 0
            if end <= vend:
                out.append(v[a:end - pos])
                return out
            out.append(v[a:] if a else v)
        pos = vend
    return out  # unreachable for in-range spans: callers check totals


def _gather(views: list[memoryview], start: int, end: int) -> bytes:
    parts = _span(views, start, end)
    if len(parts) == 1:
        return bytes(parts[0])
    return b"".join(parts)


def _as_byte_view(b: Buffer) -> memoryview:
    mv = b if type(b) is memoryview else memoryview(b)
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def iter_extensions(ext: Buffer) -> Iterator[tuple[int, bytes]]:
    """Yield ``(type, payload)`` for each ``fuse_ext_header`` record in ``ext``
    (payload excludes the 8-byte record header). Types 0..31 are security
    contexts (the type is their count); FUSE_EXT_GROUPS carries groups."""
    pos = 0
    n = len(ext)
    unpack = abi.fuse_ext_header.unpack_from
    while pos < n:
        if n - pos < 8:
            raise FuseProtocolError(f"truncated extension header at offset {pos}")
        size, typ = unpack(ext, pos)
        if size < 8 or size > n - pos:
            raise FuseProtocolError(f"extension at offset {pos} has bad size {size}")
        yield typ, bytes(ext[pos + 8:pos + size])
        pos += size


def supp_groups(ext: Buffer) -> tuple[int, ...] | None:
    """The supplementary group ids of a FUSE_EXT_GROUPS extension in ``ext``
    (7.39 FUSE_CREATE_SUPP_GROUP), or None when there is none."""
    for typ, payload in iter_extensions(ext):
        if typ == abi.FUSE_EXT_GROUPS:
            if len(payload) < 4:
                raise FuseProtocolError("truncated fuse_supp_groups")
            (count,) = abi.fuse_supp_groups.unpack_from(payload)
            if 4 + 4 * count > len(payload):
                raise FuseProtocolError(f"fuse_supp_groups claims {count} groups in {len(payload)} bytes")
            return struct.unpack_from(f"<{count}I", payload, 4)
    return None


def _check_extensions(h: InHeader, ext: bytes) -> None:
    try:
        for _ in iter_extensions(ext):
            pass
    except FuseProtocolError as exc:
        _bad(h, str(exc))


# ---------------------------------------------------------------------------
# Shared sub-records
# ---------------------------------------------------------------------------


@attrs.define
class FileLockStruct:
    """``fuse_file_lock``: ``end`` inclusive, ``type`` F_RDLCK/F_WRLCK/F_UNLCK, ``pid`` a tgid."""

    start: int
    end: int
    type: int
    pid: int

    def encode(self) -> bytes:
        return abi.fuse_file_lock.pack(self.start, self.end, self.type, self.pid)

    @classmethod
    def decode(cls, data: Buffer) -> FileLockStruct:
        _exact(data, abi.fuse_file_lock.size, "fuse_file_lock")
        return cls(*abi.fuse_file_lock.unpack(data))


def _exact(data: Buffer, size: int, what: str) -> None:
    if len(data) != size:
        raise FuseProtocolError(f"{what} is {size} bytes, got {len(data)}")


# ---------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------


@attrs.define
class Request:
    """Base of every request record: the header, then the body fields.

    ``ext`` holds the raw request extensions (a multiple of 8 bytes; see
    :func:`iter_extensions`). ``encode()`` fills in ``header.len``,
    ``header.opcode`` and ``header.total_extlen`` (it mutates ``header``)
    and returns the buffers, laid out as Linux's virtio-fs driver does: the
    header alone, then the arguments, then page data (WRITE, IOCTL input),
    then the extensions.
    """

    header: InHeader
    ext: bytes = attrs.field(default=b"", kw_only=True)

    OPCODE: ClassVar[Opcode]

    def _args(self) -> list[Buffer]:
        return []

    def encode(self) -> list[Buffer]:
        parts = self._args()
        ext = self.ext
        if len(ext) % 8:
            raise ValueError(f"request extensions must be a multiple of 8 bytes, got {len(ext)}")
        size = IN_HEADER_SIZE + len(ext)
        for p in parts:
            size += len(p)
        h = self.header
        h.len = size
        h.opcode = self.OPCODE
        h.total_extlen = len(ext) // 8
        out: list[Buffer] = [h.encode()]
        out.extend(p for p in parts if len(p))
        if ext:
            out.append(ext)
        return out


# -- no-argument requests ------------------------------------------------


@attrs.define
class ReadlinkRequest(Request):
    OPCODE = Opcode.READLINK


@attrs.define
class StatfsRequest(Request):
    OPCODE = Opcode.STATFS


@attrs.define
class DestroyRequest(Request):
    OPCODE = Opcode.DESTROY


@attrs.define
class SyncfsRequest(Request):
    """FUSE_SYNCFS (its ``fuse_syncfs_in`` is only padding)."""

    OPCODE = Opcode.SYNCFS

    def _args(self) -> list[Buffer]:
        return [abi.fuse_syncfs_in.pack(0)]


# -- single-name requests -------------------------------------------------


@attrs.define
class _NameBody(Request):
    """A request whose whole body is one NUL-terminated name."""

    name: bytes

    def _args(self) -> list[Buffer]:
        return [self.name + b"\0"]


@attrs.define
class LookupRequest(_NameBody):
    OPCODE = Opcode.LOOKUP


@attrs.define
class UnlinkRequest(_NameBody):
    OPCODE = Opcode.UNLINK


@attrs.define
class RmdirRequest(_NameBody):
    OPCODE = Opcode.RMDIR


@attrs.define
class RemovexattrRequest(_NameBody):
    OPCODE = Opcode.REMOVEXATTR


@attrs.define
class SymlinkRequest(Request):
    """``name`` is the new entry in ``header.nodeid``; ``target`` its contents."""

    OPCODE = Opcode.SYMLINK
    name: bytes
    target: bytes

    def _args(self) -> list[Buffer]:
        return [self.name + b"\0" + self.target + b"\0"]


# -- inode / entry requests -------------------------------------------------


@attrs.define
class ForgetRequest(Request):
    """Drop ``nlookup`` lookups of ``header.nodeid``; gets no reply."""

    OPCODE = Opcode.FORGET
    nlookup: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_forget_in.pack(self.nlookup)]


@attrs.define
class BatchForgetRequest(Request):
    """``items`` are ``(nodeid, nlookup)`` pairs; gets no reply."""

    OPCODE = Opcode.BATCH_FORGET
    items: list[tuple[int, int]]

    def _args(self) -> list[Buffer]:
        pack = abi.fuse_forget_one.pack
        return [abi.fuse_batch_forget_in.pack(len(self.items), 0) + b"".join(pack(n, c) for n, c in self.items)]


@attrs.define
class GetattrRequest(Request):
    OPCODE = Opcode.GETATTR
    getattr_flags: int
    fh: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_getattr_in.pack(self.getattr_flags, 0, self.fh)]


@attrs.define
class SetattrRequest(Request):
    """``valid`` (FATTR_*) says which of the other fields are meaningful."""

    OPCODE = Opcode.SETATTR
    valid: int
    fh: int
    size: int
    lock_owner: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    uid: int
    gid: int

    def _args(self) -> list[Buffer]:
        return [
            abi.fuse_setattr_in.pack(
                self.valid, 0, self.fh, self.size, self.lock_owner, self.atime, self.mtime, self.ctime,
                self.atimensec, self.mtimensec, self.ctimensec, self.mode, 0, self.uid, self.gid, 0,
            )
        ]


@attrs.define
class MknodRequest(Request):
    OPCODE = Opcode.MKNOD
    mode: int
    rdev: int
    umask: int
    name: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_mknod_in.pack(self.mode, self.rdev, self.umask, 0) + self.name + b"\0"]


@attrs.define
class MkdirRequest(Request):
    OPCODE = Opcode.MKDIR
    mode: int
    umask: int
    name: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_mkdir_in.pack(self.mode, self.umask) + self.name + b"\0"]


@attrs.define
class RenameRequest(Request):
    """Move ``oldname`` in ``header.nodeid`` to ``newname`` in ``newdir``."""

    OPCODE = Opcode.RENAME
    newdir: int
    oldname: bytes
    newname: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_rename_in.pack(self.newdir) + self.oldname + b"\0" + self.newname + b"\0"]


@attrs.define
class Rename2Request(Request):
    """RENAME with ``flags`` (RENAME_NOREPLACE / EXCHANGE / WHITEOUT)."""

    OPCODE = Opcode.RENAME2
    newdir: int
    flags: int
    oldname: bytes
    newname: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_rename2_in.pack(self.newdir, self.flags, 0) + self.oldname + b"\0" + self.newname + b"\0"]


@attrs.define
class LinkRequest(Request):
    """Make ``newname`` in ``header.nodeid`` a hard link to ``oldnodeid``."""

    OPCODE = Opcode.LINK
    oldnodeid: int
    newname: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_link_in.pack(self.oldnodeid) + self.newname + b"\0"]


@attrs.define
class AccessRequest(Request):
    OPCODE = Opcode.ACCESS
    mask: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_access_in.pack(self.mask, 0)]


# -- open / create ------------------------------------------------------------


@attrs.define
class _OpenBody(Request):
    flags: int
    open_flags: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_open_in.pack(self.flags, self.open_flags)]


@attrs.define
class OpenRequest(_OpenBody):
    OPCODE = Opcode.OPEN


@attrs.define
class OpendirRequest(_OpenBody):
    OPCODE = Opcode.OPENDIR


@attrs.define
class _CreateBody(Request):
    flags: int
    mode: int
    umask: int
    open_flags: int
    name: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_create_in.pack(self.flags, self.mode, self.umask, self.open_flags) + self.name + b"\0"]


@attrs.define
class CreateRequest(_CreateBody):
    OPCODE = Opcode.CREATE


@attrs.define
class TmpfileRequest(_CreateBody):
    """O_TMPFILE in ``header.nodeid``. Linux sends ``name`` ``b"/"``; it is
    meaningless and only checked for framing."""

    OPCODE = Opcode.TMPFILE


# -- file I/O -------------------------------------------------------------------


@attrs.define
class _ReadBody(Request):
    fh: int
    offset: int
    size: int
    read_flags: int
    lock_owner: int
    flags: int

    def _args(self) -> list[Buffer]:
        return [
            abi.fuse_read_in.pack(self.fh, self.offset, self.size, self.read_flags, self.lock_owner, self.flags, 0)
        ]


@attrs.define
class ReadRequest(_ReadBody):
    OPCODE = Opcode.READ


@attrs.define
class ReaddirRequest(_ReadBody):
    OPCODE = Opcode.READDIR


@attrs.define
class ReaddirplusRequest(_ReadBody):
    OPCODE = Opcode.READDIRPLUS


def _join_views(views: Sequence[Buffer]) -> bytes:
    return b"".join(views)


@attrs.define
class WriteRequest(Request):
    """``data`` are zero-copy views of the payload, possibly several (one per
    input buffer it spans); compare equal when their concatenations do.
    ``size`` is the wire field; decoding checks it equals the payload length,
    encoding writes it as given."""

    OPCODE = Opcode.WRITE
    fh: int
    offset: int
    size: int
    write_flags: int
    lock_owner: int
    flags: int
    data: list[memoryview] = attrs.field(eq=attrs.cmp_using(eq=lambda a, b: _join_views(a) == _join_views(b)))

    def _args(self) -> list[Buffer]:
        fixed = abi.fuse_write_in.pack(self.fh, self.offset, self.size, self.write_flags, self.lock_owner, self.flags, 0)
        return [fixed, *(_as_byte_view(d) for d in self.data)]


@attrs.define
class _ReleaseBody(Request):
    fh: int
    flags: int
    release_flags: int
    lock_owner: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_release_in.pack(self.fh, self.flags, self.release_flags, self.lock_owner)]


@attrs.define
class ReleaseRequest(_ReleaseBody):
    OPCODE = Opcode.RELEASE


@attrs.define
class ReleasedirRequest(_ReleaseBody):
    OPCODE = Opcode.RELEASEDIR


@attrs.define
class _FsyncBody(Request):
    fh: int
    fsync_flags: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_fsync_in.pack(self.fh, self.fsync_flags, 0)]


@attrs.define
class FsyncRequest(_FsyncBody):
    OPCODE = Opcode.FSYNC


@attrs.define
class FsyncdirRequest(_FsyncBody):
    OPCODE = Opcode.FSYNCDIR


@attrs.define
class FlushRequest(Request):
    OPCODE = Opcode.FLUSH
    fh: int
    lock_owner: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_flush_in.pack(self.fh, 0, 0, self.lock_owner)]


@attrs.define
class FallocateRequest(Request):
    OPCODE = Opcode.FALLOCATE
    fh: int
    offset: int
    length: int
    mode: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_fallocate_in.pack(self.fh, self.offset, self.length, self.mode, 0)]


@attrs.define
class LseekRequest(Request):
    OPCODE = Opcode.LSEEK
    fh: int
    offset: int
    whence: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_lseek_in.pack(self.fh, self.offset, self.whence, 0)]


@attrs.define
class CopyFileRangeRequest(Request):
    """Copy from (``header.nodeid``, ``fh_in``, ``off_in``) to (``nodeid_out``, ``fh_out``, ``off_out``)."""

    OPCODE = Opcode.COPY_FILE_RANGE
    fh_in: int
    off_in: int
    nodeid_out: int
    fh_out: int
    off_out: int
    len: int
    flags: int

    def _args(self) -> list[Buffer]:
        return [
            abi.fuse_copy_file_range_in.pack(
                self.fh_in, self.off_in, self.nodeid_out, self.fh_out, self.off_out, self.len, self.flags
            )
        ]


# -- extended attributes ---------------------------------------------------------


@attrs.define
class SetxattrRequest(Request):
    """``size`` is the wire field (checked equal to ``len(value)`` on decode).
    ``extended`` selects the 16-byte ``fuse_setxattr_in`` (FUSE_SETXATTR_EXT
    agreed) over the 8-byte compat one, which cannot carry ``setxattr_flags``."""

    OPCODE = Opcode.SETXATTR
    size: int
    flags: int
    setxattr_flags: int
    name: bytes
    value: bytes
    extended: bool = attrs.field(default=False, kw_only=True)

    def _args(self) -> list[Buffer]:
        if self.extended:
            fixed = abi.fuse_setxattr_in.pack(self.size, self.flags, self.setxattr_flags, 0)
        else:
            if self.setxattr_flags:
                raise ValueError("setxattr_flags needs the extended fuse_setxattr_in (extended=True)")
            fixed = abi.fuse_setxattr_in_compat.pack(self.size, self.flags)
        return [fixed + self.name + b"\0", self.value]


@attrs.define
class GetxattrRequest(Request):
    """``size`` 0 asks for the value's length (GetxattrOut reply)."""

    OPCODE = Opcode.GETXATTR
    size: int
    name: bytes

    def _args(self) -> list[Buffer]:
        return [abi.fuse_getxattr_in.pack(self.size, 0) + self.name + b"\0"]


@attrs.define
class ListxattrRequest(Request):
    OPCODE = Opcode.LISTXATTR
    size: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_getxattr_in.pack(self.size, 0)]


# -- locks ---------------------------------------------------------------------------


@attrs.define
class _LkBody(Request):
    fh: int
    owner: int
    lk: FileLockStruct
    lk_flags: int

    def _args(self) -> list[Buffer]:
        lk = self.lk
        return [abi.fuse_lk_in.pack(self.fh, self.owner, lk.start, lk.end, lk.type, lk.pid, self.lk_flags, 0)]


@attrs.define
class GetlkRequest(_LkBody):
    OPCODE = Opcode.GETLK


@attrs.define
class SetlkRequest(_LkBody):
    OPCODE = Opcode.SETLK


@attrs.define
class SetlkwRequest(_LkBody):
    OPCODE = Opcode.SETLKW


# -- session-level -----------------------------------------------------------------


@attrs.define
class InitRequest(Request):
    """``flags`` is 64-bit: ``flags | flags2 << 32`` when FUSE_INIT_EXT is set.
    Encoding sends the 64-byte 7.36+ layout (setting FUSE_INIT_EXT when bits
    above 31 are present) if FUSE_INIT_EXT or a high bit is set, else the
    16-byte layout of older kernels."""

    OPCODE = Opcode.INIT
    major: int
    minor: int
    max_readahead: int
    flags: int

    def _args(self) -> list[Buffer]:
        low = self.flags & 0xFFFFFFFF
        high = self.flags >> 32
        if high or low & abi.FUSE_INIT_EXT:
            low |= abi.FUSE_INIT_EXT
            return [abi.fuse_init_in.pack(self.major, self.minor, self.max_readahead, low, high, *([0] * 11))]
        return [abi.fuse_init_in_compat.pack(self.major, self.minor, self.max_readahead, low)]


@attrs.define
class InterruptRequest(Request):
    """Interrupt the request whose id is ``unique`` (not ``header.unique``)."""

    OPCODE = Opcode.INTERRUPT
    unique: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_interrupt_in.pack(self.unique)]


@attrs.define
class BmapRequest(Request):
    OPCODE = Opcode.BMAP
    block: int
    blocksize: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_bmap_in.pack(self.block, self.blocksize, 0)]


@attrs.define
class IoctlRequest(Request):
    """``in_data`` is the ``in_size`` bytes of ioctl input (checked on decode)."""

    OPCODE = Opcode.IOCTL
    fh: int
    flags: int
    cmd: int
    arg: int
    in_size: int
    out_size: int
    in_data: bytes

    def _args(self) -> list[Buffer]:
        return [
            abi.fuse_ioctl_in.pack(self.fh, self.flags, self.cmd, self.arg, self.in_size, self.out_size),
            self.in_data,
        ]


@attrs.define
class PollRequest(Request):
    OPCODE = Opcode.POLL
    fh: int
    kh: int
    flags: int
    events: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_poll_in.pack(self.fh, self.kh, self.flags, self.events)]


@attrs.define
class SetupmappingRequest(Request):
    """DAX: map ``len`` bytes of ``fh`` at ``foffset`` to window offset ``moffset``."""

    OPCODE = Opcode.SETUPMAPPING
    fh: int
    foffset: int
    len: int
    flags: int
    moffset: int

    def _args(self) -> list[Buffer]:
        return [abi.fuse_setupmapping_in.pack(self.fh, self.foffset, self.len, self.flags, self.moffset)]


@attrs.define
class RemovemappingRequest(Request):
    """DAX: ``items`` are ``(moffset, len)`` ranges of the window to unmap."""

    OPCODE = Opcode.REMOVEMAPPING
    items: list[tuple[int, int]]

    def _args(self) -> list[Buffer]:
        pack = abi.fuse_removemapping_one.pack
        return [abi.fuse_removemapping_in.pack(len(self.items)) + b"".join(pack(m, n) for m, n in self.items)]


#: Every request type, by opcode.
REQUEST_TYPES: dict[Opcode, type[Request]] = {
    cls.OPCODE: cls
    for cls in (
        LookupRequest, ForgetRequest, GetattrRequest, SetattrRequest, ReadlinkRequest, SymlinkRequest,
        MknodRequest, MkdirRequest, UnlinkRequest, RmdirRequest, RenameRequest, LinkRequest, OpenRequest,
        ReadRequest, WriteRequest, StatfsRequest, ReleaseRequest, FsyncRequest, SetxattrRequest,
        GetxattrRequest, ListxattrRequest, RemovexattrRequest, FlushRequest, InitRequest, OpendirRequest,
        ReaddirRequest, ReleasedirRequest, FsyncdirRequest, GetlkRequest, SetlkRequest, SetlkwRequest,
        AccessRequest, CreateRequest, InterruptRequest, BmapRequest, DestroyRequest, IoctlRequest,
        PollRequest, BatchForgetRequest, FallocateRequest, ReaddirplusRequest, Rename2Request, LseekRequest,
        CopyFileRangeRequest, SetupmappingRequest, RemovemappingRequest, SyncfsRequest, TmpfileRequest,
    )
}


# ---------------------------------------------------------------------------
# Request decoders: (header, body bytes without extensions) -> Request
# ---------------------------------------------------------------------------

_Decoder = Callable[[InHeader, bytes], Request]


def _dec_noargs(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        return cls(h)

    return dec


def _dec_component(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        return cls(h, _check_component(h, _last_string(h, body, 0, "name"), "name"))

    return dec


def _dec_symlink(h: InHeader, body: bytes) -> Request:
    name, pos = _first_string(h, body, 0, "name")
    _check_component(h, name, "name")
    target = _check_string(h, _last_string(h, body, pos, "symlink target"), "symlink target")
    return SymlinkRequest(h, name, target)


def _dec_removexattr(h: InHeader, body: bytes) -> Request:
    return RemovexattrRequest(h, _check_string(h, _last_string(h, body, 0, "xattr name"), "xattr name"))


_forget_in_unpack = abi.fuse_forget_in.unpack_from


def _dec_forget(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_forget_in", 8, len(body))
    return ForgetRequest(h, _forget_in_unpack(body)[0])


def _dec_batch_forget(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_batch_forget_in", 8, len(body))
    count = abi.fuse_batch_forget_in.unpack_from(body)[0]
    if len(body) != 8 + 16 * count:
        _bad(h, f"{count} forget records need {8 + 16 * count} bytes, {len(body)} present")
    return BatchForgetRequest(h, list(abi.fuse_forget_one.iter_unpack(body[8:])))


_getattr_in_unpack = abi.fuse_getattr_in.unpack_from


def _dec_getattr(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_getattr_in", 16, len(body))
    flags, _, fh = _getattr_in_unpack(body)
    return GetattrRequest(h, flags, fh)


_setattr_in_unpack = abi.fuse_setattr_in.unpack_from


def _dec_setattr(h: InHeader, body: bytes) -> Request:
    if len(body) < 88:
        _short(h, "fuse_setattr_in", 88, len(body))
    f = _setattr_in_unpack(body)
    return SetattrRequest(h, f[0], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[13], f[14])


def _dec_mknod(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_mknod_in", 16, len(body))
    mode, rdev, umask, _ = abi.fuse_mknod_in.unpack_from(body)
    return MknodRequest(h, mode, rdev, umask, _check_component(h, _last_string(h, body, 16, "name"), "name"))


def _dec_mkdir(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_mkdir_in", 8, len(body))
    mode, umask = abi.fuse_mkdir_in.unpack_from(body)
    return MkdirRequest(h, mode, umask, _check_component(h, _last_string(h, body, 8, "name"), "name"))


def _two_names(h: InHeader, body: bytes, start: int) -> tuple[bytes, bytes]:
    old, pos = _first_string(h, body, start, "old name")
    _check_component(h, old, "old name")
    new = _check_component(h, _last_string(h, body, pos, "new name"), "new name")
    return old, new


def _dec_rename(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_rename_in", 8, len(body))
    (newdir,) = abi.fuse_rename_in.unpack_from(body)
    old, new = _two_names(h, body, 8)
    return RenameRequest(h, newdir, old, new)


def _dec_rename2(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_rename2_in", 16, len(body))
    newdir, flags, _ = abi.fuse_rename2_in.unpack_from(body)
    old, new = _two_names(h, body, 16)
    return Rename2Request(h, newdir, flags, old, new)


def _dec_link(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_link_in", 8, len(body))
    (oldnodeid,) = abi.fuse_link_in.unpack_from(body)
    return LinkRequest(h, oldnodeid, _check_component(h, _last_string(h, body, 8, "new name"), "new name"))


_open_in_unpack = abi.fuse_open_in.unpack_from


def _dec_open(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        if len(body) < 8:
            _short(h, "fuse_open_in", 8, len(body))
        flags, open_flags = _open_in_unpack(body)
        return cls(h, flags, open_flags)

    return dec


def _dec_create(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_create_in", 16, len(body))
    flags, mode, umask, open_flags = abi.fuse_create_in.unpack_from(body)
    name = _check_component(h, _last_string(h, body, 16, "name"), "name")
    return CreateRequest(h, flags, mode, umask, open_flags, name)


def _dec_tmpfile(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_create_in", 16, len(body))
    flags, mode, umask, open_flags = abi.fuse_create_in.unpack_from(body)
    name = _last_string(h, body, 16, "name")
    if b"\0" in name:
        _bad(h, "name contains NUL")
    return TmpfileRequest(h, flags, mode, umask, open_flags, name)


_read_in_unpack = abi.fuse_read_in.unpack_from


def _dec_read(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        if len(body) < 40:
            _short(h, "fuse_read_in", 40, len(body))
        fh, offset, size, read_flags, lock_owner, flags, _ = _read_in_unpack(body)
        return cls(h, fh, offset, size, read_flags, lock_owner, flags)

    return dec


_release_in_unpack = abi.fuse_release_in.unpack_from


def _dec_release(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        if len(body) < 24:
            _short(h, "fuse_release_in", 24, len(body))
        return cls(h, *_release_in_unpack(body))

    return dec


_fsync_in_unpack = abi.fuse_fsync_in.unpack_from


def _dec_fsync(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        if len(body) < 16:
            _short(h, "fuse_fsync_in", 16, len(body))
        fh, fsync_flags, _ = _fsync_in_unpack(body)
        return cls(h, fh, fsync_flags)

    return dec


def _dec_flush(h: InHeader, body: bytes) -> Request:
    if len(body) < 24:
        _short(h, "fuse_flush_in", 24, len(body))
    fh, _, _, lock_owner = abi.fuse_flush_in.unpack_from(body)
    return FlushRequest(h, fh, lock_owner)


def _dec_fallocate(h: InHeader, body: bytes) -> Request:
    if len(body) < 32:
        _short(h, "fuse_fallocate_in", 32, len(body))
    fh, offset, length, mode, _ = abi.fuse_fallocate_in.unpack_from(body)
    return FallocateRequest(h, fh, offset, length, mode)


def _dec_lseek(h: InHeader, body: bytes) -> Request:
    if len(body) < 24:
        _short(h, "fuse_lseek_in", 24, len(body))
    fh, offset, whence, _ = abi.fuse_lseek_in.unpack_from(body)
    return LseekRequest(h, fh, offset, whence)


def _dec_copy_file_range(h: InHeader, body: bytes) -> Request:
    if len(body) < 56:
        _short(h, "fuse_copy_file_range_in", 56, len(body))
    return CopyFileRangeRequest(h, *abi.fuse_copy_file_range_in.unpack_from(body))


def _setxattr_rest(h: InHeader, body: bytes, start: int, size: int) -> tuple[bytes, bytes]:
    name, pos = _first_string(h, body, start, "xattr name")
    _check_string(h, name, "xattr name")
    if len(body) - pos != size:
        _bad(h, f"xattr value is {len(body) - pos} bytes, size says {size}")
    return name, body[pos:]


def _dec_setxattr_compat(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_setxattr_in (compat)", 8, len(body))
    size, flags = abi.fuse_setxattr_in_compat.unpack_from(body)
    name, value = _setxattr_rest(h, body, 8, size)
    return SetxattrRequest(h, size, flags, 0, name, value)


def _dec_setxattr_ext(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_setxattr_in", 16, len(body))
    size, flags, setxattr_flags, _ = abi.fuse_setxattr_in.unpack_from(body)
    name, value = _setxattr_rest(h, body, 16, size)
    return SetxattrRequest(h, size, flags, setxattr_flags, name, value, extended=True)


def _dec_getxattr(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_getxattr_in", 8, len(body))
    size, _ = abi.fuse_getxattr_in.unpack_from(body)
    return GetxattrRequest(h, size, _check_string(h, _last_string(h, body, 8, "xattr name"), "xattr name"))


def _dec_listxattr(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_getxattr_in", 8, len(body))
    size, _ = abi.fuse_getxattr_in.unpack_from(body)
    return ListxattrRequest(h, size)


_lk_in_unpack = abi.fuse_lk_in.unpack_from


def _dec_lk(cls: type[Request]) -> _Decoder:
    def dec(h: InHeader, body: bytes) -> Request:
        if len(body) < 48:
            _short(h, "fuse_lk_in", 48, len(body))
        fh, owner, start, end, typ, pid, lk_flags, _ = _lk_in_unpack(body)
        return cls(h, fh, owner, FileLockStruct(start, end, typ, pid), lk_flags)

    return dec


def _dec_access(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_access_in", 8, len(body))
    mask, _ = abi.fuse_access_in.unpack_from(body)
    return AccessRequest(h, mask)


def _dec_init(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_init_in", 16, len(body))
    major, minor, max_readahead, flags = abi.fuse_init_in_compat.unpack_from(body)
    if flags & abi.FUSE_INIT_EXT:
        if len(body) < 64:
            _short(h, "extended fuse_init_in (FUSE_INIT_EXT)", 64, len(body))
        flags |= abi.fuse_init_in.unpack_from(body)[4] << 32
    return InitRequest(h, major, minor, max_readahead, flags)


def _dec_interrupt(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_interrupt_in", 8, len(body))
    return InterruptRequest(h, abi.fuse_interrupt_in.unpack_from(body)[0])


def _dec_bmap(h: InHeader, body: bytes) -> Request:
    if len(body) < 16:
        _short(h, "fuse_bmap_in", 16, len(body))
    block, blocksize, _ = abi.fuse_bmap_in.unpack_from(body)
    return BmapRequest(h, block, blocksize)


def _dec_ioctl(h: InHeader, body: bytes) -> Request:
    if len(body) < 32:
        _short(h, "fuse_ioctl_in", 32, len(body))
    fh, flags, cmd, arg, in_size, out_size = abi.fuse_ioctl_in.unpack_from(body)
    if len(body) - 32 != in_size:
        _bad(h, f"ioctl input is {len(body) - 32} bytes, in_size says {in_size}")
    return IoctlRequest(h, fh, flags, cmd, arg, in_size, out_size, body[32:])


def _dec_poll(h: InHeader, body: bytes) -> Request:
    if len(body) < 24:
        _short(h, "fuse_poll_in", 24, len(body))
    return PollRequest(h, *abi.fuse_poll_in.unpack_from(body))


def _dec_setupmapping(h: InHeader, body: bytes) -> Request:
    if len(body) < 40:
        _short(h, "fuse_setupmapping_in", 40, len(body))
    return SetupmappingRequest(h, *abi.fuse_setupmapping_in.unpack_from(body))


def _dec_removemapping(h: InHeader, body: bytes) -> Request:
    if len(body) < 4:
        _short(h, "fuse_removemapping_in", 4, len(body))
    (count,) = abi.fuse_removemapping_in.unpack_from(body)
    if len(body) != 4 + 16 * count:
        _bad(h, f"{count} removemapping records need {4 + 16 * count} bytes, {len(body)} present")
    return RemovemappingRequest(h, list(abi.fuse_removemapping_one.iter_unpack(body[4:])))


def _dec_syncfs(h: InHeader, body: bytes) -> Request:
    if len(body) < 8:
        _short(h, "fuse_syncfs_in", 8, len(body))
    return SyncfsRequest(h)


_DECODERS: dict[int, tuple[Opcode, _Decoder]] = {
    int(op): (op, dec)
    for op, dec in {
        Opcode.LOOKUP: _dec_component(LookupRequest),
        Opcode.FORGET: _dec_forget,
        Opcode.GETATTR: _dec_getattr,
        Opcode.SETATTR: _dec_setattr,
        Opcode.READLINK: _dec_noargs(ReadlinkRequest),
        Opcode.SYMLINK: _dec_symlink,
        Opcode.MKNOD: _dec_mknod,
        Opcode.MKDIR: _dec_mkdir,
        Opcode.UNLINK: _dec_component(UnlinkRequest),
        Opcode.RMDIR: _dec_component(RmdirRequest),
        Opcode.RENAME: _dec_rename,
        Opcode.LINK: _dec_link,
        Opcode.OPEN: _dec_open(OpenRequest),
        Opcode.READ: _dec_read(ReadRequest),
        Opcode.WRITE: _dec_noargs(WriteRequest),  # placeholder: decode_request handles WRITE itself
        Opcode.STATFS: _dec_noargs(StatfsRequest),
        Opcode.RELEASE: _dec_release(ReleaseRequest),
        Opcode.FSYNC: _dec_fsync(FsyncRequest),
        Opcode.SETXATTR: _dec_setxattr_compat,
        Opcode.GETXATTR: _dec_getxattr,
        Opcode.LISTXATTR: _dec_listxattr,
        Opcode.REMOVEXATTR: _dec_removexattr,
        Opcode.FLUSH: _dec_flush,
        Opcode.INIT: _dec_init,
        Opcode.OPENDIR: _dec_open(OpendirRequest),
        Opcode.READDIR: _dec_read(ReaddirRequest),
        Opcode.RELEASEDIR: _dec_release(ReleasedirRequest),
        Opcode.FSYNCDIR: _dec_fsync(FsyncdirRequest),
        Opcode.GETLK: _dec_lk(GetlkRequest),
        Opcode.SETLK: _dec_lk(SetlkRequest),
        Opcode.SETLKW: _dec_lk(SetlkwRequest),
        Opcode.ACCESS: _dec_access,
        Opcode.CREATE: _dec_create,
        Opcode.INTERRUPT: _dec_interrupt,
        Opcode.BMAP: _dec_bmap,
        Opcode.DESTROY: _dec_noargs(DestroyRequest),
        Opcode.IOCTL: _dec_ioctl,
        Opcode.POLL: _dec_poll,
        Opcode.BATCH_FORGET: _dec_batch_forget,
        Opcode.FALLOCATE: _dec_fallocate,
        Opcode.READDIRPLUS: _dec_read(ReaddirplusRequest),
        Opcode.RENAME2: _dec_rename2,
        Opcode.LSEEK: _dec_lseek,
        Opcode.COPY_FILE_RANGE: _dec_copy_file_range,
        Opcode.SETUPMAPPING: _dec_setupmapping,
        Opcode.REMOVEMAPPING: _dec_removemapping,
        Opcode.SYNCFS: _dec_syncfs,
        Opcode.TMPFILE: _dec_tmpfile,
    }.items()
}
_OP_WRITE = int(Opcode.WRITE)
_OP_SETXATTR = int(Opcode.SETXATTR)
_write_in_unpack = abi.fuse_write_in.unpack_from
_WRITE_IN_SIZE = abi.fuse_write_in.size


def decode_request(buffers: Sequence[Buffer], *, setxattr_ext: bool = False) -> Request:
    """Parse one FUSE request from the guest-readable buffers ``buffers``.

    Structs and names may straddle buffer boundaries. WRITE payloads stay
    views of ``buffers`` (valid while they are); the rest is copied.
    ``setxattr_ext`` tells whether FUSE_SETXATTR_EXT was agreed (16-byte
    SETXATTR argument). Raises FuseProtocolError, and only that, on
    malformed input (see the module docstring for the rules).
    """
    views: list[memoryview] = []
    total = 0
    for b in buffers:
        v = b if type(b) is memoryview else memoryview(b)
        if v.itemsize != 1 or v.ndim != 1:
            v = v.cast("B")
        views.append(v)
        total += len(v)
    if total < IN_HEADER_SIZE:
        raise FuseProtocolError(f"request of {total} bytes is shorter than fuse_in_header")
    first = views[0]
    if len(first) >= IN_HEADER_SIZE:
        f = _in_header_unpack_from(first)
    else:
        f = _in_header_unpack_from(_gather(views, 0, IN_HEADER_SIZE))
    length, opcode, unique = f[0], f[1], f[2]
    if length < IN_HEADER_SIZE:
        raise FuseProtocolError(f"header len {length} is shorter than fuse_in_header", _EINVAL, unique)
    if length > total:
        raise FuseProtocolError(f"header len {length} exceeds the {total} readable bytes", _EINVAL, unique)
    extlen = f[7] * 8
    body_end = length - extlen
    if body_end < IN_HEADER_SIZE:
        raise FuseProtocolError(f"total_extlen {f[7]} does not fit in len {length}", _EINVAL, unique)
    entry = _DECODERS.get(opcode)
    if entry is None:
        raise FuseProtocolError(f"unsupported opcode {opcode}", _errno.ENOSYS, unique)
    op, dec = entry
    h = InHeader(length, op, unique, f[3], f[4], f[5], f[6], f[7])
    if opcode == _OP_WRITE:
        if body_end - IN_HEADER_SIZE < _WRITE_IN_SIZE:
            _short(h, "fuse_write_in", _WRITE_IN_SIZE, body_end - IN_HEADER_SIZE)
        data_start = IN_HEADER_SIZE + _WRITE_IN_SIZE
        fh, offset, size, write_flags, lock_owner, flags, _ = _write_in_unpack(
            _gather(views, IN_HEADER_SIZE, data_start)
        )
        if body_end - data_start != size:
            _bad(h, f"payload is {body_end - data_start} bytes, size says {size}")
        req: Request = WriteRequest(
            h, fh, offset, size, write_flags, lock_owner, flags, _span(views, data_start, body_end)
        )
    else:
        if opcode == _OP_SETXATTR and setxattr_ext:
            dec = _dec_setxattr_ext
        # Fast paths: one buffer, or Linux's header-then-arguments split.
        if len(first) >= body_end:
            body = bytes(first[IN_HEADER_SIZE:body_end])
        elif len(first) == IN_HEADER_SIZE and len(views[1]) >= body_end - IN_HEADER_SIZE:
            body = bytes(views[1][:body_end - IN_HEADER_SIZE])
        else:
            body = _gather(views, IN_HEADER_SIZE, body_end)
        req = dec(h, body)
    if extlen:
        ext = _gather(views, body_end, length)
        _check_extensions(h, ext)
        req.ext = ext
    return req


# ---------------------------------------------------------------------------
# Reply bodies
# ---------------------------------------------------------------------------

_attr_pack = abi.fuse_attr.pack
_attr_unpack = abi.fuse_attr.unpack


@attrs.define
class Attr:
    """``fuse_attr``: times are seconds + nanoseconds; ``flags`` FUSE_ATTR_*."""

    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int = 0

    def _fields(self) -> tuple[int, ...]:
        return (
            self.ino, self.size, self.blocks, self.atime, self.mtime, self.ctime, self.atimensec,
            self.mtimensec, self.ctimensec, self.mode, self.nlink, self.uid, self.gid, self.rdev,
            self.blksize, self.flags,
        )

    def encode(self) -> bytes:
        return _attr_pack(*self._fields())

    @classmethod
    def decode(cls, data: Buffer) -> Attr:
        _exact(data, 88, "fuse_attr")
        return cls(*_attr_unpack(data))


_entry_out_pack = abi.fuse_entry_out.pack
_entry_out_unpack_from = abi.fuse_entry_out.unpack_from


def _entry_fields(e: EntryOut) -> tuple[int, ...]:
    return (
        e.nodeid, e.generation, e.entry_valid, e.attr_valid, e.entry_valid_nsec, e.attr_valid_nsec,
        *e.attr._fields(),
    )


@attrs.define
class EntryOut:
    """``fuse_entry_out``; ``nodeid`` 0 means a negative entry to cache."""

    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: Attr

    def encode(self) -> bytes:
        return _entry_out_pack(*_entry_fields(self))

    @classmethod
    def _from(cls, f: tuple[int, ...]) -> EntryOut:
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], Attr(*f[6:22]))

    @classmethod
    def decode(cls, data: Buffer) -> EntryOut:
        _exact(data, 128, "fuse_entry_out")
        return cls._from(_entry_out_unpack_from(data))


@attrs.define
class AttrOut:
    """``fuse_attr_out``."""

    attr_valid: int
    attr_valid_nsec: int
    attr: Attr

    def encode(self) -> bytes:
        return abi.fuse_attr_out.pack(self.attr_valid, self.attr_valid_nsec, 0, *self.attr._fields())

    @classmethod
    def decode(cls, data: Buffer) -> AttrOut:
        _exact(data, 104, "fuse_attr_out")
        f = abi.fuse_attr_out.unpack(data)
        return cls(f[0], f[1], Attr(*f[3:19]))


@attrs.define
class OpenOut:
    """``fuse_open_out``: ``open_flags`` FOPEN_*; ``backing_id`` is padding before 7.40."""

    fh: int
    open_flags: int
    backing_id: int = 0

    def encode(self) -> bytes:
        return abi.fuse_open_out.pack(self.fh, self.open_flags, self.backing_id)

    @classmethod
    def decode(cls, data: Buffer) -> OpenOut:
        _exact(data, 16, "fuse_open_out")
        return cls(*abi.fuse_open_out.unpack(data))


@attrs.define
class CreateOut:
    """The CREATE / TMPFILE reply: ``fuse_entry_out`` then ``fuse_open_out``."""

    entry: EntryOut
    open: OpenOut

    def encode(self) -> bytes:
        return self.entry.encode() + self.open.encode()

    @classmethod
    def decode(cls, data: Buffer) -> CreateOut:
        _exact(data, 144, "fuse_entry_out + fuse_open_out")
        mv = memoryview(data)
        return cls(EntryOut.decode(mv[:128]), OpenOut.decode(mv[128:]))


@attrs.define
class WriteOut:
    """``fuse_write_out`` (WRITE and COPY_FILE_RANGE replies)."""

    size: int

    def encode(self) -> bytes:
        return abi.fuse_write_out.pack(self.size, 0)

    @classmethod
    def decode(cls, data: Buffer) -> WriteOut:
        _exact(data, 8, "fuse_write_out")
        return cls(abi.fuse_write_out.unpack(data)[0])


@attrs.define
class StatfsOut:
    """``fuse_statfs_out`` (``fuse_kstatfs``)."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int

    def encode(self) -> bytes:
        return abi.fuse_kstatfs.pack(
            self.blocks, self.bfree, self.bavail, self.files, self.ffree, self.bsize, self.namelen, self.frsize,
            0, 0, 0, 0, 0, 0, 0,
        )

    @classmethod
    def decode(cls, data: Buffer) -> StatfsOut:
        _exact(data, 80, "fuse_statfs_out")
        return cls(*abi.fuse_kstatfs.unpack(data)[:8])


@attrs.define
class InitOut:
    """``fuse_init_out``. ``flags`` is 64-bit: on the wire bits 32..63 go to
    ``flags2`` and FUSE_INIT_EXT is set when any of them is; decoding reads
    ``flags2`` only when FUSE_INIT_EXT is set."""

    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int

    def encode(self) -> bytes:
        low = self.flags & 0xFFFFFFFF
        high = self.flags >> 32
        if high:
            low |= abi.FUSE_INIT_EXT
        return abi.fuse_init_out.pack(
            self.major, self.minor, self.max_readahead, low, self.max_background, self.congestion_threshold,
            self.max_write, self.time_gran, self.max_pages, self.map_alignment, high, 0, 0, 0, 0, 0, 0, 0,
        )

    @classmethod
    def decode(cls, data: Buffer) -> InitOut:
        _exact(data, 64, "fuse_init_out")
        f = abi.fuse_init_out.unpack(data)
        flags = f[3]
        if flags & abi.FUSE_INIT_EXT:
            flags |= f[10] << 32
        return cls(f[0], f[1], f[2], flags, f[4], f[5], f[6], f[7], f[8], f[9])


@attrs.define
class GetxattrOut:
    """``fuse_getxattr_out``: the size answer to a GETXATTR/LISTXATTR with size 0."""

    size: int

    def encode(self) -> bytes:
        return abi.fuse_getxattr_out.pack(self.size, 0)

    @classmethod
    def decode(cls, data: Buffer) -> GetxattrOut:
        _exact(data, 8, "fuse_getxattr_out")
        return cls(abi.fuse_getxattr_out.unpack(data)[0])


@attrs.define
class LkOut:
    """``fuse_lk_out``."""

    lk: FileLockStruct

    def encode(self) -> bytes:
        return self.lk.encode()

    @classmethod
    def decode(cls, data: Buffer) -> LkOut:
        _exact(data, 24, "fuse_lk_out")
        return cls(FileLockStruct(*abi.fuse_file_lock.unpack(data)))


@attrs.define
class LseekOut:
    offset: int

    def encode(self) -> bytes:
        return abi.fuse_lseek_out.pack(self.offset)

    @classmethod
    def decode(cls, data: Buffer) -> LseekOut:
        _exact(data, 8, "fuse_lseek_out")
        return cls(abi.fuse_lseek_out.unpack(data)[0])


@attrs.define
class PollOut:
    revents: int

    def encode(self) -> bytes:
        return abi.fuse_poll_out.pack(self.revents, 0)

    @classmethod
    def decode(cls, data: Buffer) -> PollOut:
        _exact(data, 8, "fuse_poll_out")
        return cls(abi.fuse_poll_out.unpack(data)[0])


@attrs.define
class BmapOut:
    block: int

    def encode(self) -> bytes:
        return abi.fuse_bmap_out.pack(self.block)

    @classmethod
    def decode(cls, data: Buffer) -> BmapOut:
        _exact(data, 8, "fuse_bmap_out")
        return cls(abi.fuse_bmap_out.unpack(data)[0])


@attrs.define
class IoctlOut:
    """``fuse_ioctl_out`` followed by ``data`` (the ioctl's output bytes).
    ``encode()`` returns both; ``decode`` takes the rest after 16 bytes as ``data``."""

    result: int
    flags: int
    in_iovs: int
    out_iovs: int
    data: bytes = b""

    def encode(self) -> bytes:
        return abi.fuse_ioctl_out.pack(self.result, self.flags, self.in_iovs, self.out_iovs) + bytes(self.data)

    @classmethod
    def decode(cls, data: Buffer) -> IoctlOut:
        if len(data) < 16:
            raise FuseProtocolError(f"fuse_ioctl_out is 16 bytes, got {len(data)}")
        result, flags, in_iovs, out_iovs = abi.fuse_ioctl_out.unpack_from(data)
        return cls(result, flags, in_iovs, out_iovs, bytes(data[16:]))


# ---------------------------------------------------------------------------
# Reply bodies straight from a backend's attributes (the daemon's hot path)
# ---------------------------------------------------------------------------


class AttributeSource(Protocol):
    """What the packers below read: ``operations.EntryAttributes``'s fields
    (times in integer nanoseconds, timeouts in seconds)."""

    st_ino: int
    generation: int
    entry_timeout: float
    attr_timeout: float
    st_mode: int
    st_nlink: int
    st_uid: int
    st_gid: int
    st_rdev: int
    st_size: int
    st_blksize: int
    st_blocks: int
    st_atime_ns: int
    st_mtime_ns: int
    st_ctime_ns: int
    attr_flags: int


_NS = 1_000_000_000
_ENTRY_OUT_HEAD = abi.fuse_entry_out.size - abi.fuse_attr.size  # nodeid .. attr_valid_nsec: 40 bytes


def split_timeout(seconds: float) -> tuple[int, int]:
    """A cache timeout in seconds as the wire's (seconds, nanoseconds), both
    truncated; (0, 0) when it is not positive."""
    if seconds <= 0:
        return 0, 0
    whole = int(seconds)
    return whole, int((seconds - whole) * _NS)


def guest_rdev_to_host(rdev: int) -> int:
    """A device number from the wire (Linux's 32-bit ``new_encode_dev``
    value, as MKNOD carries it) as a host ``dev_t``."""
    major = (rdev & 0xFFF00) >> 8
    minor = (rdev & 0xFF) | ((rdev >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def host_rdev_to_guest(dev: int) -> int:
    """A host ``st_rdev`` as the wire's 32-bit ``new_encode_dev`` value."""
    if dev == 0:
        return 0
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def wire_seconds(ns: int) -> int:
    """Whole seconds of a time in nanoseconds since the epoch, as fuse_attr's
    u64 carries them: the kernel reads the field as signed, so a time
    before the epoch goes as two's complement (floored; the nanoseconds
    field, ``ns % 10**9``, adds up to it). Beyond the signed 64-bit range
    the value stays out of range (``struct.error`` when packed)."""
    sec = ns // _NS
    return sec + (1 << 64) if -(1 << 63) <= sec < 0 else sec


def wire_time_ns(sec: int, nsec: int) -> int:
    """The inverse of :func:`wire_seconds`: a wire (u64 seconds, nanoseconds)
    pair, e.g. SETATTR's, as signed nanoseconds since the epoch."""
    return (sec - (1 << 64) if sec >= 1 << 63 else sec) * _NS + nsec


def _attr_fields(a: AttributeSource) -> tuple[int, ...]:
    """The ``fuse_attr`` fields of ``a``, in wire order."""
    return (
        a.st_ino, a.st_size, a.st_blocks,
        wire_seconds(a.st_atime_ns), wire_seconds(a.st_mtime_ns), wire_seconds(a.st_ctime_ns),
        a.st_atime_ns % _NS, a.st_mtime_ns % _NS, a.st_ctime_ns % _NS,
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_blksize, a.attr_flags,
    )


def pack_attr(a: AttributeSource) -> bytes:
    """The 88-byte ``fuse_attr`` of ``a``; raises ``struct.error`` when a
    field does not fit its wire type (times: see :func:`wire_seconds`)."""
    return _attr_pack(*_attr_fields(a))


def pack_attr_out(a: AttributeSource) -> bytes:
    """The 104-byte ``fuse_attr_out`` (GETATTR, SETATTR) of ``a``, valid for
    ``a.attr_timeout``; the bytes of ``AttrOut(...).encode()``."""
    valid, nsec = split_timeout(a.attr_timeout)
    return abi.fuse_attr_out.pack(valid, nsec, 0, *_attr_fields(a))


def pack_entry_out(a: AttributeSource) -> bytes:
    """The 128-byte ``fuse_entry_out`` (LOOKUP, MKNOD, ...) of ``a``: nodeid
    ``a.st_ino``, ``a.generation``, both timeouts; the bytes of
    ``EntryOut(...).encode()``."""
    entry_valid, entry_nsec = split_timeout(a.entry_timeout)
    attr_valid, attr_nsec = split_timeout(a.attr_timeout)
    return _entry_out_pack(a.st_ino, a.generation, entry_valid, attr_valid, entry_nsec, attr_nsec, *_attr_fields(a))


def write_reply(writable: Sequence[memoryview], unique: int, error: int, body: Buffer | Sequence[Buffer]) -> int:
    """Write a reply (header, then ``body``: one buffer or a list/tuple of
    them) into the guest buffers ``writable``; return its length. When it
    does not fit, write nothing and return 0. Raises what
    :func:`encode_out_header` raises for out-of-range fields."""
    parts = body if isinstance(body, (list, tuple)) else (body,)
    body_len = 0
    for part in parts:
        body_len += part.nbytes if isinstance(part, memoryview) else len(part)
    room = 0
    for view in writable:
        room += view.nbytes
    if OUT_HEADER_SIZE + body_len > room:
        return 0
    return _scatter(writable, (encode_out_header(unique, error, body_len), *parts))


_T = TypeVar("_T")


def record_factory(cls: type[_T]) -> Callable[..., _T]:
    """A callable equivalent to ``cls`` called with positional arguments.
    Here ``cls`` itself; the compiled twin builds plain slotted attrs records
    (the session's per-request ``RequestContext``) without their __init__."""
    return cls


# ---------------------------------------------------------------------------
# Directory entries
# ---------------------------------------------------------------------------

_dirent_pack = abi.fuse_dirent.pack
_dirent_unpack_from = abi.fuse_dirent.unpack_from
_direntplus_pack = abi.fuse_direntplus.pack
_direntplus_unpack_from = abi.fuse_direntplus.unpack_from
_PAD = b"\0" * 8


@attrs.define
class Dirent:
    """One ``fuse_dirent``: ``off`` is the offset to resume after it, ``type`` a DT_* value."""

    ino: int
    off: int
    type: int
    name: bytes


@attrs.define
class Direntplus:
    """One ``fuse_direntplus``."""

    entry: EntryOut
    dirent: Dirent


def dirent_size(namelen: int) -> int:
    """Bytes one READDIR entry with a ``namelen``-byte name takes (8-aligned)."""
    return (24 + namelen + 7) & ~7


def direntplus_size(namelen: int) -> int:
    """Bytes one READDIRPLUS entry with a ``namelen``-byte name takes (8-aligned)."""
    return (152 + namelen + 7) & ~7


def pack_dirent(ino: int, off: int, type: int, name: bytes) -> bytes:
    """One ``fuse_dirent`` record, zero-padded to 8 bytes. The caller has
    checked ``name`` (non-empty, no '/' or NUL, at most FUSE_NAME_MAX)."""
    n = len(name)
    return _dirent_pack(ino, off, n, type) + name + _PAD[: (-n) & 7]


#: struct linux_dirent64's head: d_ino, d_off, d_reclen, d_type (native order).
_LINUX_DIRENT64_HEAD = struct.Struct("=QqHB")
_tuple_new = tuple.__new__


def parse_linux_dirents64(data: Buffer, length: int, cls: type[T]) -> list[T]:
    """The records in the first ``length`` bytes of ``data``, a
    ``getdents64(2)`` result, as ``cls`` tuples ``(d_ino, d_off, d_type,
    name)`` (``cls`` is a tuple subclass such as a NamedTuple; ``name``
    without its NUL). ValueError if ``length`` exceeds ``data`` or a record
    is cut short, overruns the data or has no NUL-terminated name."""
    view = memoryview(data).cast("B")
    if not 0 <= length <= view.nbytes:
        raise ValueError(f"length {length} outside a buffer of {view.nbytes} bytes")
    raw = bytes(view[:length])
    out: list[T] = []
    append = out.append
    unpack_from = _LINUX_DIRENT64_HEAD.unpack_from
    head_size = _LINUX_DIRENT64_HEAD.size
    index = raw.index
    pos = 0
    while pos < length:
        if length - pos < head_size:
            raise ValueError(f"truncated getdents64 record at {pos}")
        ino, off, reclen, dtype = unpack_from(raw, pos)
        if reclen <= head_size or pos + reclen > length:
            raise ValueError(f"getdents64 record at {pos} has length {reclen}")
        name_start = pos + head_size
        try:
            end = index(b"\0", name_start, pos + reclen)
        except ValueError:
            raise ValueError(f"getdents64 record at {pos} has no NUL-terminated name") from None
        append(_tuple_new(cls, (ino, off, dtype, raw[name_start:end])))
        pos += reclen
    return out


def pack_host_dirents(
    entries: Sequence[tuple[int, int, int, bytes]], start: int, room: int,
    known: Mapping[tuple[int, int], Any], dev: int, dot: int, dotdot: int,
) -> tuple[bytes, int]:
    """READDIR reply records for host directory entries ``entries[start:]``
    (``(d_ino, d_off, d_type, name)`` records such as
    :func:`parse_linux_dirents64` gives), as many as fit whole in ``room``
    bytes; returns the packed ``fuse_dirent`` records and the index after
    the last one packed (``start`` when none fits).

    Each record's inode number is ``known[(dev, d_ino)].nodeid`` when
    ``known`` (an inode table keyed by the host's ``(st_dev, st_ino)``)
    holds that key, else ``d_ino``; the entry ``.`` takes ``dot`` and ``..``
    takes ``dotdot`` when they are not 0. ValueError on a name that is
    empty, longer than FUSE_NAME_MAX or holds '/' or NUL."""
    parts: list[bytes] = []
    used = 0
    i, count = start, len(entries)
    while i < count:
        d_ino, d_off, d_type, name = entries[i]
        n = len(name)
        need = (24 + n + 7) & ~7
        if used + need > room:
            break
        parts.append(_host_dirent_record(d_ino, d_off, d_type, name, known, dev, dot, dotdot))
        used += need
        i += 1
    return b"".join(parts), i


def _host_dirent_record(d_ino: int, d_off: int, d_type: int, name: bytes, known: Mapping[tuple[int, int], Any],
                        dev: int, dot: int, dotdot: int) -> bytes:
    """One host entry's ``fuse_dirent`` (see :func:`pack_host_dirents`)."""
    n = len(name)
    if not n or n > abi.FUSE_NAME_MAX or b"/" in name or b"\0" in name:
        raise ValueError(f"invalid directory entry name {name[:64]!r}")
    if dot and name == b".":
        ino = dot
    elif dotdot and name == b"..":
        ino = dotdot
    else:
        node = known.get((dev, d_ino))
        ino = d_ino if node is None else node.nodeid
    return _dirent_pack(ino, d_off, n, d_type) + name + _PAD[: (-n) & 7]


def _raw_dirent(raw: bytes, pos: int) -> tuple[int, int, int, int, bytes]:
    """The getdents64 record of ``raw`` at ``pos``: (reclen, d_ino, d_off,
    d_type, name); ValueError as :func:`parse_linux_dirents64`."""
    length = len(raw)
    if length - pos < _LINUX_DIRENT64_HEAD.size:
        raise ValueError(f"truncated getdents64 record at {pos}")
    ino, off, reclen, dtype = _LINUX_DIRENT64_HEAD.unpack_from(raw, pos)
    if reclen <= _LINUX_DIRENT64_HEAD.size or pos + reclen > length:
        raise ValueError(f"getdents64 record at {pos} has length {reclen}")
    name_start = pos + _LINUX_DIRENT64_HEAD.size
    try:
        end = raw.index(b"\0", name_start, pos + reclen)
    except ValueError:
        raise ValueError(f"getdents64 record at {pos} has no NUL-terminated name") from None
    return reclen, ino, off, dtype, raw[name_start:end]


def scan_raw_dirents(raw: bytes, off: int) -> tuple[int, int]:
    """Walk ``raw``, a whole ``getdents64(2)`` result: the position just
    after the record whose ``d_off`` is ``off`` (-1 when none is) and the
    last record's ``d_off`` (-1 when ``raw`` is empty). ValueError as
    :func:`parse_linux_dirents64` for a malformed record."""
    pos, after, last = 0, -1, -1
    while pos < len(raw):
        reclen, _ino, last, _dtype, _name = _raw_dirent(raw, pos)
        pos += reclen
        if last == off and after < 0:
            after = pos
    return after, last


def pack_raw_dirents(
    raw: bytes, start: int, room: int, known: Mapping[tuple[int, int], Any], dev: int, dot: int, dotdot: int,
) -> tuple[bytes, int, int, int]:
    """:func:`pack_host_dirents` straight from ``raw``, a whole
    ``getdents64(2)`` result, from its record at byte position ``start``
    (no record objects): the packed ``fuse_dirent`` records that fit whole
    in ``room`` bytes, the position after the last one packed, how many
    were packed and the last one's ``d_off`` (-1 when none fits). The same
    inode mapping and name rules; ValueError also for a malformed host
    record."""
    parts: list[bytes] = []
    used = count = 0
    last = -1
    pos = start
    while pos < len(raw):
        reclen, d_ino, d_off, d_type, name = _raw_dirent(raw, pos)
        n = len(name)
        need = (24 + n + 7) & ~7
        if used + need > room:
            break
        parts.append(_host_dirent_record(d_ino, d_off, d_type, name, known, dev, dot, dotdot))
        used += need
        count += 1
        last = d_off
        pos += reclen
    return b"".join(parts), pos, count, last


def pack_direntplus(entry: EntryOut, ino: int, off: int, type: int, name: bytes) -> bytes:
    """One ``fuse_direntplus`` record (``entry`` then the dirent), zero-padded
    to 8 bytes. Same contract on ``name`` as :func:`pack_dirent`."""
    a = entry.attr
    n = len(name)
    return (
        _direntplus_pack(
            entry.nodeid, entry.generation, entry.entry_valid, entry.attr_valid, entry.entry_valid_nsec,
            entry.attr_valid_nsec, a.ino, a.size, a.blocks, a.atime, a.mtime, a.ctime, a.atimensec,
            a.mtimensec, a.ctimensec, a.mode, a.nlink, a.uid, a.gid, a.rdev, a.blksize, a.flags,
            ino, off, n, type,
        )
        + name
        + _PAD[: (-n) & 7]
    )


def _dirent_name(data: Buffer, start: int, namelen: int, pos: int) -> bytes:
    if namelen == 0 or namelen > abi.FUSE_NAME_MAX:
        raise FuseProtocolError(f"dirent at offset {pos} has name length {namelen}")
    name = bytes(data[start:start + namelen])
    if b"/" in name or b"\0" in name:
        raise FuseProtocolError(f"dirent at offset {pos} has an invalid name {name[:64]!r}")
    return name


def iter_dirents(data: Buffer) -> Iterator[Dirent]:
    """Parse a READDIR reply body. Every record must be complete including
    its padding; names are 1..FUSE_NAME_MAX bytes without '/' or NUL."""
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 24:
            raise FuseProtocolError(f"truncated fuse_dirent at offset {pos}")
        ino, off, namelen, typ = _dirent_unpack_from(data, pos)
        size = (24 + namelen + 7) & ~7
        if size > n - pos:
            raise FuseProtocolError(f"fuse_dirent at offset {pos} runs past the end")
        yield Dirent(ino, off, typ, _dirent_name(data, pos + 24, namelen, pos))
        pos += size


def iter_direntplus(data: Buffer) -> Iterator[Direntplus]:
    """Parse a READDIRPLUS reply body (same rules as :func:`iter_dirents`)."""
    pos = 0
    n = len(data)
    while pos < n:
        if n - pos < 152:
            raise FuseProtocolError(f"truncated fuse_direntplus at offset {pos}")
        f = _direntplus_unpack_from(data, pos)
        namelen = f[24]
        size = (152 + namelen + 7) & ~7
        if size > n - pos:
            raise FuseProtocolError(f"fuse_direntplus at offset {pos} runs past the end")
        name = _dirent_name(data, pos + 152, namelen, pos)
        yield Direntplus(EntryOut._from(f), Dirent(f[22], f[23], f[25], name))
        pos += size


# ---------------------------------------------------------------------------
# Reply dispatch (frontend side)
# ---------------------------------------------------------------------------

#: Requests that get no reply at all.
NO_REPLY: frozenset[Opcode] = frozenset({Opcode.FORGET, Opcode.BATCH_FORGET})

#: Requests whose success reply is the header alone.
EMPTY_REPLY: frozenset[Opcode] = frozenset({
    Opcode.UNLINK, Opcode.RMDIR, Opcode.RENAME, Opcode.RENAME2, Opcode.RELEASE, Opcode.RELEASEDIR,
    Opcode.FSYNC, Opcode.FSYNCDIR, Opcode.FLUSH, Opcode.SETXATTR, Opcode.REMOVEXATTR, Opcode.SETLK,
    Opcode.SETLKW, Opcode.ACCESS, Opcode.INTERRUPT, Opcode.DESTROY, Opcode.FALLOCATE, Opcode.SYNCFS,
    Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING,
})

#: Requests whose success reply is raw data (GETXATTR/LISTXATTR with size 0
#: are the exception: they answer GetxattrOut, see ``decode_reply``).
RAW_REPLY: frozenset[Opcode] = frozenset({
    Opcode.READ, Opcode.READLINK, Opcode.READDIR, Opcode.READDIRPLUS, Opcode.GETXATTR, Opcode.LISTXATTR,
})

#: The body class of each opcode's success reply; None for raw data,
#: header-only and no-reply opcodes (see RAW_REPLY, EMPTY_REPLY, NO_REPLY).
REPLY_BODY: dict[Opcode, type | None] = {
    Opcode.LOOKUP: EntryOut,
    Opcode.FORGET: None,
    Opcode.GETATTR: AttrOut,
    Opcode.SETATTR: AttrOut,
    Opcode.READLINK: None,
    Opcode.SYMLINK: EntryOut,
    Opcode.MKNOD: EntryOut,
    Opcode.MKDIR: EntryOut,
    Opcode.UNLINK: None,
    Opcode.RMDIR: None,
    Opcode.RENAME: None,
    Opcode.LINK: EntryOut,
    Opcode.OPEN: OpenOut,
    Opcode.READ: None,
    Opcode.WRITE: WriteOut,
    Opcode.STATFS: StatfsOut,
    Opcode.RELEASE: None,
    Opcode.FSYNC: None,
    Opcode.SETXATTR: None,
    Opcode.GETXATTR: None,
    Opcode.LISTXATTR: None,
    Opcode.REMOVEXATTR: None,
    Opcode.FLUSH: None,
    Opcode.INIT: InitOut,
    Opcode.OPENDIR: OpenOut,
    Opcode.READDIR: None,
    Opcode.RELEASEDIR: None,
    Opcode.FSYNCDIR: None,
    Opcode.GETLK: LkOut,
    Opcode.SETLK: None,
    Opcode.SETLKW: None,
    Opcode.ACCESS: None,
    Opcode.CREATE: CreateOut,
    Opcode.INTERRUPT: None,
    Opcode.BMAP: BmapOut,
    Opcode.DESTROY: None,
    Opcode.IOCTL: IoctlOut,
    Opcode.POLL: PollOut,
    Opcode.BATCH_FORGET: None,
    Opcode.FALLOCATE: None,
    Opcode.READDIRPLUS: None,
    Opcode.RENAME2: None,
    Opcode.LSEEK: LseekOut,
    Opcode.COPY_FILE_RANGE: WriteOut,
    Opcode.SETUPMAPPING: None,
    Opcode.REMOVEMAPPING: None,
    Opcode.SYNCFS: None,
    Opcode.TMPFILE: CreateOut,
}


def decode_reply(opcode: int, data: Buffer, *, size_probe: bool = False) -> tuple[OutHeader, object | bytes | None]:
    """Parse a whole reply to an ``opcode`` request: header, then the body.

    The body is None for errors and header-only replies, ``bytes`` for raw
    data replies, else an instance of ``REPLY_BODY[opcode]``. Set
    ``size_probe`` when the GETXATTR/LISTXATTR request had size 0: the
    body is then a GetxattrOut. ``header.len`` must equal ``len(data)``, an
    error reply must have no body, and typed bodies must have their exact size.
    """
    hdr = decode_out_header(data)
    if hdr.len != len(data):
        raise FuseProtocolError(f"reply header len {hdr.len} but {len(data)} bytes", unique=hdr.unique)
    body = bytes(data[OUT_HEADER_SIZE:])
    try:
        op = Opcode(opcode)
    except ValueError:
        raise FuseProtocolError(f"no reply format for opcode {opcode}", unique=hdr.unique) from None
    if op in NO_REPLY:
        raise FuseProtocolError(f"FUSE_{op.name} gets no reply", unique=hdr.unique)
    if hdr.error:
        if body:
            raise FuseProtocolError(f"error reply carries {len(body)} body bytes", unique=hdr.unique)
        return hdr, None
    if size_probe and op in (Opcode.GETXATTR, Opcode.LISTXATTR):
        return hdr, GetxattrOut.decode(body)
    cls = REPLY_BODY.get(op)
    if cls is not None:
        try:
            return hdr, cls.decode(body)
        except FuseProtocolError as exc:
            exc.unique = hdr.unique
            raise
    if op in EMPTY_REPLY:
        if body:
            raise FuseProtocolError(f"FUSE_{op.name} reply should be empty, has {len(body)} bytes", unique=hdr.unique)
        return hdr, None
    if op in RAW_REPLY:
        return hdr, body
    raise FuseProtocolError(f"no reply format for FUSE_{op.name}", unique=hdr.unique)
