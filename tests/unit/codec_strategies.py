"""Hypothesis strategies for FUSE codec records, reusable by other tests.

``requests()`` draws any request (every opcode with a request type),
``request_of(cls)`` one type, ``reply_bodies()`` any reply body record,
``resplit(buffers)`` re-cuts a buffer list at arbitrary points.
Drawn requests have ``header.len``/``opcode``/``total_extlen`` left at 0:
``encode()`` fills them in.
"""
from __future__ import annotations

from typing import Sequence

from hypothesis import strategies as st

from virtiofs_async import codec
from virtiofs_async.abi import fuse as abi
from virtiofs_async.operations import EntryAttributes

u16 = st.integers(0, 2**16 - 1)
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
u64 = st.integers(0, 2**64 - 1)


def _scrub(forbidden: bytes, replacement: bytes = b"_"):
    def fix(b: bytes) -> bytes:
        for ch in forbidden:
            b = b.replace(bytes([ch]), replacement)
        return b

    return fix


#: A path component: non-empty, no '/', no NUL.
names = st.binary(min_size=1, max_size=64).map(_scrub(b"/\0"))
#: An xattr name or symlink target: non-empty, no NUL ('/' allowed).
strings = st.binary(min_size=1, max_size=64).map(_scrub(b"\0"))
#: Arbitrary payload bytes.
payloads = st.binary(max_size=300)


def in_headers() -> st.SearchStrategy[codec.InHeader]:
    return st.builds(
        codec.InHeader, len=st.just(0), opcode=st.just(0), unique=u64, nodeid=u64, uid=u32, gid=u32, pid=u32,
        total_extlen=st.just(0),
    )


@st.composite
def extensions(draw) -> bytes:
    """Well-framed request extension records (usually none)."""
    if draw(st.integers(0, 4)):
        return b""
    out = b""
    for _ in range(draw(st.integers(1, 3))):
        typ = draw(st.sampled_from([abi.FUSE_EXT_GROUPS, 1, 5]) | u32)
        payload = draw(st.binary(max_size=24))
        payload += b"\0" * (-len(payload) % 8)
        out += abi.fuse_ext_header.pack(8 + len(payload), typ) + payload
    return out


file_locks = st.builds(codec.FileLockStruct, start=u64, end=u64, type=u32, pid=u32)


def _req(cls, **fields) -> st.SearchStrategy[codec.Request]:
    return st.builds(cls, header=in_headers(), ext=extensions(), **fields)


@st.composite
def _init_requests(draw) -> codec.InitRequest:
    flags = draw(u32)
    if flags & abi.FUSE_INIT_EXT:
        flags |= draw(u32) << 32
    return codec.InitRequest(draw(in_headers()), draw(u32), draw(u32), draw(u32), flags, ext=draw(extensions()))


@st.composite
def _write_requests(draw) -> codec.WriteRequest:
    chunks = draw(st.lists(st.binary(max_size=200), max_size=4))
    return codec.WriteRequest(
        draw(in_headers()), draw(u64), draw(u64), sum(map(len, chunks)), draw(u32), draw(u64), draw(u32),
        [memoryview(c) for c in chunks], ext=draw(extensions()),
    )


@st.composite
def _setxattr_requests(draw) -> codec.SetxattrRequest:
    extended = draw(st.booleans())
    value = draw(payloads)
    return codec.SetxattrRequest(
        draw(in_headers()), len(value), draw(u32), draw(u32) if extended else 0, draw(strings), value,
        extended=extended, ext=draw(extensions()),
    )


@st.composite
def _ioctl_requests(draw) -> codec.IoctlRequest:
    data = draw(payloads)
    return codec.IoctlRequest(
        draw(in_headers()), draw(u64), draw(u32), draw(u32), draw(u64), len(data), draw(u32), data,
        ext=draw(extensions()),
    )


_read_fields = dict(fh=u64, offset=u64, size=u32, read_flags=u32, lock_owner=u64, flags=u32)
_release_fields = dict(fh=u64, flags=u32, release_flags=u32, lock_owner=u64)
_create_fields = dict(flags=u32, mode=u32, umask=u32, open_flags=u32, name=names)
_lk_fields = dict(fh=u64, owner=u64, lk=file_locks, lk_flags=u32)

#: One strategy per request type.
REQUEST_STRATEGIES: dict[type, st.SearchStrategy[codec.Request]] = {
    codec.InitRequest: _init_requests(),
    codec.LookupRequest: _req(codec.LookupRequest, name=names),
    codec.ForgetRequest: _req(codec.ForgetRequest, nlookup=u64),
    codec.BatchForgetRequest: _req(codec.BatchForgetRequest, items=st.lists(st.tuples(u64, u64), max_size=8)),
    codec.GetattrRequest: _req(codec.GetattrRequest, getattr_flags=u32, fh=u64),
    codec.SetattrRequest: _req(
        codec.SetattrRequest, valid=u32, fh=u64, size=u64, lock_owner=u64, atime=u64, mtime=u64, ctime=u64,
        atimensec=u32, mtimensec=u32, ctimensec=u32, mode=u32, uid=u32, gid=u32,
    ),
    codec.ReadlinkRequest: _req(codec.ReadlinkRequest),
    codec.SymlinkRequest: _req(codec.SymlinkRequest, name=names, target=strings),
    codec.MknodRequest: _req(codec.MknodRequest, mode=u32, rdev=u32, umask=u32, name=names),
    codec.MkdirRequest: _req(codec.MkdirRequest, mode=u32, umask=u32, name=names),
    codec.UnlinkRequest: _req(codec.UnlinkRequest, name=names),
    codec.RmdirRequest: _req(codec.RmdirRequest, name=names),
    codec.RenameRequest: _req(codec.RenameRequest, newdir=u64, oldname=names, newname=names),
    codec.Rename2Request: _req(codec.Rename2Request, newdir=u64, flags=u32, oldname=names, newname=names),
    codec.LinkRequest: _req(codec.LinkRequest, oldnodeid=u64, newname=names),
    codec.OpenRequest: _req(codec.OpenRequest, flags=u32, open_flags=u32),
    codec.ReadRequest: _req(codec.ReadRequest, **_read_fields),
    codec.WriteRequest: _write_requests(),
    codec.StatfsRequest: _req(codec.StatfsRequest),
    codec.ReleaseRequest: _req(codec.ReleaseRequest, **_release_fields),
    codec.FsyncRequest: _req(codec.FsyncRequest, fh=u64, fsync_flags=u32),
    codec.SetxattrRequest: _setxattr_requests(),
    codec.GetxattrRequest: _req(codec.GetxattrRequest, size=u32, name=strings),
    codec.ListxattrRequest: _req(codec.ListxattrRequest, size=u32),
    codec.RemovexattrRequest: _req(codec.RemovexattrRequest, name=strings),
    codec.FlushRequest: _req(codec.FlushRequest, fh=u64, lock_owner=u64),
    codec.OpendirRequest: _req(codec.OpendirRequest, flags=u32, open_flags=u32),
    codec.ReaddirRequest: _req(codec.ReaddirRequest, **_read_fields),
    codec.ReaddirplusRequest: _req(codec.ReaddirplusRequest, **_read_fields),
    codec.ReleasedirRequest: _req(codec.ReleasedirRequest, **_release_fields),
    codec.FsyncdirRequest: _req(codec.FsyncdirRequest, fh=u64, fsync_flags=u32),
    codec.GetlkRequest: _req(codec.GetlkRequest, **_lk_fields),
    codec.SetlkRequest: _req(codec.SetlkRequest, **_lk_fields),
    codec.SetlkwRequest: _req(codec.SetlkwRequest, **_lk_fields),
    codec.AccessRequest: _req(codec.AccessRequest, mask=u32),
    codec.CreateRequest: _req(codec.CreateRequest, **_create_fields),
    codec.TmpfileRequest: _req(codec.TmpfileRequest, **{**_create_fields, "name": st.just(b"/") | names}),
    codec.InterruptRequest: _req(codec.InterruptRequest, unique=u64),
    codec.BmapRequest: _req(codec.BmapRequest, block=u64, blocksize=u32),
    codec.DestroyRequest: _req(codec.DestroyRequest),
    codec.IoctlRequest: _ioctl_requests(),
    codec.PollRequest: _req(codec.PollRequest, fh=u64, kh=u64, flags=u32, events=u32),
    codec.FallocateRequest: _req(codec.FallocateRequest, fh=u64, offset=u64, length=u64, mode=u32),
    codec.LseekRequest: _req(codec.LseekRequest, fh=u64, offset=u64, whence=u32),
    codec.CopyFileRangeRequest: _req(
        codec.CopyFileRangeRequest, fh_in=u64, off_in=u64, nodeid_out=u64, fh_out=u64, off_out=u64, len=u64,
        flags=u64,
    ),
    codec.SetupmappingRequest: _req(codec.SetupmappingRequest, fh=u64, foffset=u64, len=u64, flags=u64, moffset=u64),
    codec.RemovemappingRequest: _req(codec.RemovemappingRequest, items=st.lists(st.tuples(u64, u64), max_size=8)),
    codec.SyncfsRequest: _req(codec.SyncfsRequest),
}


def request_of(cls: type) -> st.SearchStrategy[codec.Request]:
    return REQUEST_STRATEGIES[cls]


def requests() -> st.SearchStrategy[codec.Request]:
    return st.one_of(*REQUEST_STRATEGIES.values())


# -- reply bodies ------------------------------------------------------------

attrs_ = st.builds(
    codec.Attr, ino=u64, size=u64, blocks=u64, atime=u64, mtime=u64, ctime=u64, atimensec=u32, mtimensec=u32,
    ctimensec=u32, mode=u32, nlink=u32, uid=u32, gid=u32, rdev=u32, blksize=u32, flags=u32,
)
entry_outs = st.builds(
    codec.EntryOut, nodeid=u64, generation=u64, entry_valid=u64, attr_valid=u64, entry_valid_nsec=u32,
    attr_valid_nsec=u32, attr=attrs_,
)
attr_outs = st.builds(codec.AttrOut, attr_valid=u64, attr_valid_nsec=u32, attr=attrs_)
open_outs = st.builds(codec.OpenOut, fh=u64, open_flags=u32, backing_id=i32)


@st.composite
def init_outs(draw) -> codec.InitOut:
    flags = draw(u32)
    high = draw(st.just(0) | u32)
    if high:
        flags |= abi.FUSE_INIT_EXT | high << 32
    return codec.InitOut(
        draw(u32), draw(u32), draw(u32), flags, draw(u16), draw(u16), draw(u32), draw(u32), draw(u16), draw(u16)
    )


#: One strategy per reply body class.
REPLY_STRATEGIES: dict[type, st.SearchStrategy] = {
    codec.Attr: attrs_,
    codec.EntryOut: entry_outs,
    codec.AttrOut: attr_outs,
    codec.OpenOut: open_outs,
    codec.CreateOut: st.builds(codec.CreateOut, entry=entry_outs, open=open_outs),
    codec.WriteOut: st.builds(codec.WriteOut, size=u32),
    codec.StatfsOut: st.builds(
        codec.StatfsOut, blocks=u64, bfree=u64, bavail=u64, files=u64, ffree=u64, bsize=u32, namelen=u32, frsize=u32
    ),
    codec.InitOut: init_outs(),
    codec.GetxattrOut: st.builds(codec.GetxattrOut, size=u32),
    codec.LkOut: st.builds(codec.LkOut, lk=file_locks),
    codec.LseekOut: st.builds(codec.LseekOut, offset=u64),
    codec.PollOut: st.builds(codec.PollOut, revents=u32),
    codec.BmapOut: st.builds(codec.BmapOut, block=u64),
    codec.IoctlOut: st.builds(codec.IoctlOut, result=i32, flags=u32, in_iovs=u32, out_iovs=u32, data=payloads),
    codec.FileLockStruct: file_locks,
}


def reply_bodies() -> st.SearchStrategy:
    return st.one_of(*REPLY_STRATEGIES.values())


dirents = st.builds(codec.Dirent, ino=u64, off=u64, type=u32, name=names)
direntpluses = st.builds(codec.Direntplus, entry=entry_outs, dirent=dirents)


# -- buffer splitting ------------------------------------------------------------


@st.composite
def resplit(draw, buffers: Sequence[bytes | bytearray | memoryview], kind: str | None = None) -> list:
    """The concatenation of ``buffers`` cut at arbitrary points (empty pieces
    allowed), each piece a bytes, bytearray or memoryview."""
    data = b"".join(buffers)
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    bounds = [0, *cuts, len(data)]
    pieces = []
    for a, b in zip(bounds, bounds[1:]):
        k = kind or draw(st.sampled_from(["bytes", "bytearray", "memoryview"]))
        chunk = data[a:b]
        if k == "bytearray":
            pieces.append(bytearray(chunk))
        elif k == "memoryview":
            pieces.append(memoryview(bytearray(chunk)))
        else:
            pieces.append(chunk)
    return pieces


# -- a backend's attributes (codec.AttributeSource) --------------------------

#: Cache timeouts as backends give them: seconds as floats or ints, zero or negative for "do not cache".
timeouts = st.one_of(
    st.floats(min_value=-10.0, max_value=1e12, allow_nan=False),
    st.sampled_from([0.0, 1.0, 0.25, 1.5, 86400.0, 1e-9, 0.999999999]),
    st.integers(-5, 2**40),
)
#: Nanoseconds since the epoch whose seconds fit fuse_attr's u64.
times_ns = st.one_of(st.integers(0, 2**64 - 1), st.integers(2**64, 2**64 * 10**9 - 1))
entry_attributes = st.builds(
    EntryAttributes, st_ino=u64, generation=u64, entry_timeout=timeouts, attr_timeout=timeouts, st_mode=u32,
    st_nlink=u32, st_uid=u32, st_gid=u32, st_rdev=u32, st_size=u64, st_blksize=u32, st_blocks=u64,
    st_atime_ns=times_ns, st_mtime_ns=times_ns, st_ctime_ns=times_ns, attr_flags=u32,
)
