"""FuseSession without a transport: requests in as buffers, replies out."""
from __future__ import annotations

import asyncio
import errno
import logging

import pytest

from virtiofs_async import codec
from virtiofs_async.abi import fuse as abi
from virtiofs_async.errors import FuseError
from virtiofs_async.operations import DirectoryReply, EntryAttributes, Operations
from virtiofs_async.session import OLDEST_MINOR, OUR_MINOR, FuseSession, _DirectoryReply

LINUX_61_FLAGS = (
    abi.FUSE_ASYNC_READ | abi.FUSE_POSIX_LOCKS | abi.FUSE_ATOMIC_O_TRUNC | abi.FUSE_BIG_WRITES
    | abi.FUSE_DONT_MASK | abi.FUSE_FLOCK_LOCKS | abi.FUSE_AUTO_INVAL_DATA | abi.FUSE_DO_READDIRPLUS
    | abi.FUSE_READDIRPLUS_AUTO | abi.FUSE_ASYNC_DIO | abi.FUSE_WRITEBACK_CACHE | abi.FUSE_PARALLEL_DIROPS
    | abi.FUSE_HANDLE_KILLPRIV_V2 | abi.FUSE_POSIX_ACL | abi.FUSE_MAX_PAGES | abi.FUSE_CACHE_SYMLINKS
    | abi.FUSE_INIT_EXT
)


def hdr(unique: int, nodeid: int = 1, uid: int = 0, gid: int = 0) -> codec.InHeader:
    return codec.InHeader(len=0, opcode=0, unique=unique, nodeid=nodeid, uid=uid, gid=gid, pid=42)


def call(session: FuseSession, request: codec.Request, room: int = 4096) -> tuple[codec.OutHeader, bytes]:
    out = bytearray(room)
    n = asyncio.run(session.handle_request([memoryview(b) for b in _bytes(request)], [memoryview(out)]))
    if n == 0:
        return None, b""  # type: ignore[return-value]
    header = codec.decode_out_header(bytes(out[:16]))
    assert header.len == n
    return header, bytes(out[16:n])


def _bytes(request: codec.Request) -> list[bytes]:
    return [bytes(p) for p in request.encode()]


def init(session: FuseSession, minor: int = 38, flags: int = LINUX_61_FLAGS) -> codec.InitOut:
    h, body = call(session, codec.InitRequest(hdr(1), major=7, minor=minor, max_readahead=131072, flags=flags))
    assert h.error == 0, h
    return codec.InitOut.decode(body)


class Files(Operations):
    """A root with one file, plus hooks for failure cases."""

    async def lookup(self, parent, name, ctx):
        if name == b"boom":
            raise RuntimeError("backend bug")
        if name != b"f":
            raise FuseError(errno.ENOENT)
        return EntryAttributes(st_ino=2, st_mode=0o100644, st_size=3, entry_timeout=1.5, attr_timeout=0.25)

    async def getxattr(self, inode, name, ctx):
        return b"value!"

    async def read(self, fh, offset, size):
        return b"x" * (size + 1) if fh == 99 else b"abc"[offset:offset + size]


def test_requests_before_init_get_eio() -> None:
    s = FuseSession(Files())
    h, _ = call(s, codec.LookupRequest(hdr(5), name=b"f"))
    assert (h.unique, h.error) == (5, errno.EIO)


def test_init_negotiates_the_common_flags_only() -> None:
    s = FuseSession(Files())
    out = init(s, flags=abi.FUSE_ASYNC_READ | abi.FUSE_MAX_PAGES | abi.FUSE_POSIX_LOCKS)
    assert out.major == 7 and out.minor == OUR_MINOR
    assert out.flags & abi.FUSE_ASYNC_READ and out.flags & abi.FUSE_MAX_PAGES
    # Files() does not implement locks: the flag the kernel offered is refused.
    assert not out.flags & abi.FUSE_POSIX_LOCKS
    assert out.max_write == 1 << 20 and out.max_pages == 256
    assert s.negotiated is not None and s.negotiated.minor == OUR_MINOR


def test_init_with_an_old_minor_answers_with_it_and_too_old_is_refused() -> None:
    out = init(FuseSession(Files()), minor=OLDEST_MINOR)
    assert out.minor == OLDEST_MINOR
    h, _ = call(FuseSession(Files()), codec.InitRequest(hdr(1), major=7, minor=OLDEST_MINOR - 1, max_readahead=0, flags=0))
    assert h.error == errno.EPROTO


def test_init_from_a_newer_major_gets_our_major_to_retry_with() -> None:
    h, body = call(FuseSession(Files()), codec.InitRequest(hdr(1), major=8, minor=0, max_readahead=0, flags=0))
    assert h.error == 0
    assert codec.InitOut.decode(body).major == 7


def test_second_init_is_a_protocol_error() -> None:
    s = FuseSession(Files())
    init(s)
    h, _ = call(s, codec.InitRequest(hdr(2), major=7, minor=38, max_readahead=0, flags=0))
    assert h.error == errno.EPROTO


def test_lookup_reply_carries_entry_and_timeouts() -> None:
    s = FuseSession(Files())
    init(s)
    h, body = call(s, codec.LookupRequest(hdr(7), name=b"f"))
    assert (h.unique, h.error) == (7, 0)
    entry = codec.EntryOut.decode(body)
    assert entry.nodeid == 2 and entry.attr.size == 3 and entry.attr.mode == 0o100644
    assert (entry.entry_valid, entry.entry_valid_nsec) == (1, 500_000_000)
    assert (entry.attr_valid, entry.attr_valid_nsec) == (0, 250_000_000)


def test_fuse_error_becomes_its_errno_and_other_exceptions_eio(caplog: pytest.LogCaptureFixture) -> None:
    s = FuseSession(Files())
    init(s)
    h, _ = call(s, codec.LookupRequest(hdr(8), name=b"nope"))
    assert h.error == errno.ENOENT
    with caplog.at_level(logging.ERROR):
        h, _ = call(s, codec.LookupRequest(hdr(9), name=b"boom"))
    assert h.error == errno.EIO
    assert "backend bug" in caplog.text and "LOOKUP" in caplog.text


def test_unimplemented_operation_is_enosys() -> None:
    s = FuseSession(Files())
    init(s)
    h, _ = call(s, codec.MkdirRequest(hdr(3), mode=0o755, umask=0o22, name=b"d"))
    assert h.error == errno.ENOSYS


def test_getxattr_size_probe_and_erange() -> None:
    s = FuseSession(Files())
    init(s)
    h, body = call(s, codec.GetxattrRequest(hdr(4), size=0, name=b"user.a"))
    assert h.error == 0 and codec.GetxattrOut.decode(body).size == 6
    h, _ = call(s, codec.GetxattrRequest(hdr(5), size=3, name=b"user.a"))
    assert h.error == errno.ERANGE
    h, body = call(s, codec.GetxattrRequest(hdr(6), size=100, name=b"user.a"))
    assert body == b"value!"


def test_read_reply_goes_into_the_guest_buffers_and_backend_overrun_is_eio() -> None:
    s = FuseSession(Files())
    init(s)
    h, body = call(s, codec.ReadRequest(hdr(10, nodeid=2), fh=1, offset=1, size=10, read_flags=0, lock_owner=0, flags=0))
    assert h.error == 0 and body == b"bc"
    h, _ = call(s, codec.ReadRequest(hdr(11, nodeid=2), fh=99, offset=0, size=4, read_flags=0, lock_owner=0, flags=0))
    assert h.error == errno.EIO


def test_reply_larger_than_the_guest_buffer_is_eio_and_no_buffer_means_no_reply() -> None:
    s = FuseSession(Files())
    init(s)
    h, _ = call(s, codec.LookupRequest(hdr(12), name=b"f"), room=40)
    assert h.error == errno.EIO
    h, body = call(s, codec.LookupRequest(hdr(13), name=b"f"), room=8)
    assert h is None


def test_malformed_request_is_answered_with_its_errno(caplog: pytest.LogCaptureFixture) -> None:
    s = FuseSession(Files())
    init(s)
    parts = _bytes(codec.LookupRequest(hdr(14), name=b"f"))
    raw = b"".join(parts)
    bad = raw[:-1] + b"x"  # the name loses its NUL terminator
    out = bytearray(64)
    with caplog.at_level(logging.WARNING):
        n = asyncio.run(s.handle_request([memoryview(bad)], [memoryview(out)]))
    header = codec.decode_out_header(bytes(out[:16]))
    assert n == 16 and header.unique == 14 and header.error == errno.EINVAL
    assert "malformed" in caplog.text
    # Garbage too short for a header: no unique to answer, nothing written.
    assert asyncio.run(s.handle_request([memoryview(b"\x01\x02")], [memoryview(out)])) == 0


def test_forget_gets_no_reply_and_reaches_the_backend() -> None:
    seen = []

    class Forgetful(Files):
        async def forget(self, inodes):
            seen.extend(inodes)

    s = FuseSession(Forgetful())
    init(s)
    h, _ = call(s, codec.ForgetRequest(hdr(20, nodeid=2), nlookup=3))
    assert h is None
    h, _ = call(s, codec.BatchForgetRequest(hdr(21), items=[(2, 1), (5, 7)]))
    assert h is None
    assert seen == [(2, 3), (2, 1), (5, 7)]


def test_read_larger_than_negotiated_is_refused_before_the_backend() -> None:
    asked = []

    class Recorder(Files):
        async def read(self, fh, offset, size):
            asked.append(size)
            return b""

    s = FuseSession(Recorder())
    init(s)
    h, _ = call(s, codec.ReadRequest(hdr(30, nodeid=2), fh=1, offset=0, size=(1 << 20) + 1, read_flags=0, lock_owner=0, flags=0))
    assert h.error == errno.EINVAL and asked == []
    h, _ = call(s, codec.ReadRequest(hdr(31, nodeid=2), fh=1, offset=0, size=1 << 20, read_flags=0, lock_owner=0, flags=0))
    assert h.error == 0 and asked == [1 << 20]


def test_backend_capabilities_become_init_flags_when_the_kernel_offers_them() -> None:
    class Capable(Files):
        supports_posix_locks = True
        supports_flock_locks = True
        enable_writeback_cache = True
        supports_readdirplus = False

    out = init(FuseSession(Capable()))
    assert out.flags & abi.FUSE_POSIX_LOCKS and out.flags & abi.FUSE_FLOCK_LOCKS
    assert out.flags & abi.FUSE_WRITEBACK_CACHE
    assert not out.flags & abi.FUSE_DO_READDIRPLUS
    assert not out.flags & abi.FUSE_DONT_MASK  # handles_umask is off


# -- READ answered in place (Operations.read_into) ----------------------------------------


class InPlace(Files):
    """read_into writes a pattern into the views it gets and records them;
    ``read`` must not be used while the guest gave room for the whole read."""

    def __init__(self, available: int | None = None, overrun: bool = False) -> None:
        self.available = available
        self.overrun = overrun
        self.seen: list[list[int]] = []

    async def read(self, fh, offset, size):
        raise AssertionError("read() used although the guest gave room")

    async def read_into(self, fh, offset, size, buffers):
        self.seen.append([b.nbytes for b in buffers])
        assert sum(b.nbytes for b in buffers) == size and all(not b.readonly for b in buffers)
        n = size if self.available is None else min(size, self.available)
        data = bytes((offset + i) % 251 for i in range(n))
        pos = 0
        for b in buffers:
            take = min(b.nbytes, n - pos)
            b[:take] = data[pos:pos + take]
            pos += take
        return size + 1 if self.overrun else n


def read_with(session: FuseSession, unique: int, offset: int, size: int, room: list[int]) -> tuple[int, bytes]:
    """A READ whose reply buffers have the sizes ``room``: (reply length, the bytes written)."""
    bufs = [bytearray(n) for n in room]
    req = codec.ReadRequest(hdr(unique, nodeid=2), fh=1, offset=offset, size=size, read_flags=0, lock_owner=0, flags=0)
    n = asyncio.run(session.handle_request([memoryview(b) for b in _bytes(req)], [memoryview(b) for b in bufs]))
    return n, b"".join(bufs)[:n]


def _pattern(offset: int, n: int) -> bytes:
    return bytes((offset + i) % 251 for i in range(n))


@pytest.mark.parametrize("room", [[16, 4096, 4096], [16 + 8192], [10, 6 + 100, 9000], [16, 4096, 8192, 50]])
def test_read_goes_straight_into_the_guest_buffers(room: list[int]) -> None:
    """The backend gets views of exactly ``size`` bytes after the header,
    wherever the guest's buffers split; the header goes in front."""
    ops = InPlace()
    s = FuseSession(ops)
    init(s)
    n, out = read_with(s, 40, 7, 8192, room)
    header = codec.decode_out_header(out[:16])
    assert n == 16 + 8192 and (header.unique, header.error, header.len) == (40, 0, n)
    assert out[16:] == _pattern(7, 8192)
    assert len(ops.seen) == 1 and sum(ops.seen[0]) == 8192


def test_read_in_place_short_overrun_and_errors() -> None:
    ops = InPlace(available=100)
    s = FuseSession(ops)
    init(s)
    n, out = read_with(s, 41, 0, 4096, [16, 4096])  # end of file: a shorter reply
    assert n == 116 and codec.decode_out_header(out[:16]).len == 116 and out[16:] == _pattern(0, 100)
    ops.overrun = True
    n, out = read_with(s, 42, 0, 4096, [16, 4096])
    assert n == 16 and codec.decode_out_header(out[:16]).error == errno.EIO

    class Failing(InPlace):
        async def read_into(self, fh, offset, size, buffers):
            raise FuseError(errno.EBADF)

    s = FuseSession(Failing())
    init(s)
    n, out = read_with(s, 43, 0, 4096, [16, 4096])
    assert n == 16 and codec.decode_out_header(out[:16]).error == errno.EBADF


def test_read_with_less_room_than_asked_falls_back_to_read() -> None:
    """Too little room for ``size``: ``read()`` answers; its data is sent
    when it fits (EOF), else EIO; without room for a header, no reply."""
    s = FuseSession(Files())  # read() returns b"abc"[offset:offset + size]
    init(s)
    n, out = read_with(s, 50, 0, 4096, [16, 100])
    assert n == 19 and out[16:] == b"abc"
    n, out = read_with(s, 51, 0, 4096, [17])
    assert n == 16 and codec.decode_out_header(out[:16]).error == errno.EIO
    assert read_with(s, 52, 0, 4096, [8])[0] == 0


def test_default_read_into_copies_what_read_returns() -> None:
    """A backend with only ``read`` is served through Operations.read_into."""
    s = FuseSession(Files())
    init(s)
    n, out = read_with(s, 60, 1, 2, [16, 1, 1])
    assert n == 18 and out[16:] == b"bc"
    n, out = read_with(s, 61, 0, 2, [16, 1, 1])
    assert n == 18 and out[16:] == b"ab"


# -- DirectoryReply.add_dirents: packed fuse_dirent records --------------------------------


def _records(names: list[bytes], first_ino: int = 100) -> bytes:
    return b"".join(codec.pack_dirent(first_ino + i, i + 1, 8, n) for i, n in enumerate(names))


def test_add_dirents_takes_records_that_fit_whole() -> None:
    names = [b"a", b"bb", b"c" * 20]
    records = _records(names)
    reply = _DirectoryReply(4096, False)
    assert reply.add_dirents(records, 3) == 3
    assert reply.remaining == 4096 - len(records)
    got = list(codec.iter_dirents(b"".join(reply.parts)))
    assert [(d.name, d.ino, d.off, d.type) for d in got] == [(n, 100 + i, i + 1, 8) for i, n in enumerate(names)]


def test_add_dirents_that_overflow_adds_what_fits_one_by_one() -> None:
    names = [b"f%03d" % i for i in range(10)]  # 32 bytes each
    reply = _DirectoryReply(100, False)
    assert reply.add_dirents(_records(names), 10) == 3
    assert [d.name for d in codec.iter_dirents(b"".join(reply.parts))] == names[:3]
    assert reply.remaining == 100 - 96


def _plus_records(names: list[bytes]) -> list[bytes]:
    out = []
    for i, name in enumerate(names):
        if name in (b".", b".."):
            attr = codec.Attr(50 + i, 0, 0, 0, 0, 0, 0, 0, 0, 0o40000, 1, 0, 0, 0, 4096, 0)
            entry = codec.EntryOut(0, 0, 0, 0, 0, 0, attr)
        else:
            attr = codec.Attr(100 + i, 5, 8, 1_700_000_000, (1 << 64) - 3, 7, 1, 999_999_999, 0, 0o100644, 2,
                              1000, 1000, 0, 4096, 0)
            entry = codec.EntryOut(100 + i, 0, 1, 2, 500_000_000, 250_000_000, attr)
        out.append(codec.pack_direntplus(entry, attr.ino, i + 1, attr.mode >> 12, name))
    return out


def test_add_dirents_takes_readdirplus_records_too() -> None:
    """Whole direntplus records go in as they are; when they overflow, what
    fits goes through ``add`` and comes out byte for byte the same (times
    before the epoch, sub-second timeouts and uncounted dots included)."""
    records = _plus_records([b".", b"..", b"a", b"bb", b"c" * 30])
    reply = _DirectoryReply(4096, True)
    assert reply.add_dirents(b"".join(records), 5) == 5
    assert b"".join(reply.parts) == b"".join(records)
    small = _DirectoryReply(sum(map(len, records[:3])) + 10, True)
    assert small.add_dirents(b"".join(records), 5) == 3
    assert b"".join(small.parts) == b"".join(records[:3])


def test_add_dirents_default_goes_through_add() -> None:
    """The base class's add_dirents (for replies that only implement add)
    parses the records and stops at the first one add refuses."""
    got: list[tuple[bytes, int, int, int]] = []

    class Two(DirectoryReply):
        def add(self, name, attributes, next_offset) -> bool:
            if len(got) == 2:
                return False
            got.append((name, attributes.st_ino, attributes.st_mode, next_offset))
            return True

    assert Two().add_dirents(_records([b"x", b"y", b"z"]), 3) == 2
    assert got == [(b"x", 100, 8 << 12, 1), (b"y", 101, 8 << 12, 2)]
