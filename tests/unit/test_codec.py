"""Tests of the FUSE ABI layouts and the sans-IO codec."""
from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from virtiofs_async import codec
# The hot functions come from the active implementation (Cython or pure, see
# VIRTIOFS_ASYNC_IMPLEMENTATION); the record classes always from codec.
from virtiofs_async._accel import decode_request, encode_out_header, pack_dirent, pack_direntplus
from virtiofs_async._accel import pack_attr, pack_attr_out, pack_entry_out, record_factory, write_reply
from virtiofs_async.abi import fuse as abi
from virtiofs_async.abi.fuse import Opcode
from virtiofs_async.errors import FuseProtocolError
from virtiofs_async.operations import EntryAttributes, RequestContext

from .codec_strategies import (
    REPLY_STRATEGIES,
    REQUEST_STRATEGIES,
    direntpluses,
    dirents,
    entry_attributes,
    entry_outs,
    in_headers,
    names,
    requests,
    resplit,
)

#: Per-test settings (not a global profile): no deadline, since CI machines may be loaded.
relaxed = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ALL_REQUEST_TYPES = sorted(REQUEST_STRATEGIES, key=lambda c: c.OPCODE)
#: Opcodes that have no request type on purpose (never sent to a 7.38 virtio-fs daemon).
UNSUPPORTED = {Opcode.NOTIFY_REPLY, Opcode.STATX, Opcode.CUSE_INIT}


def hdr(unique: int = 0x1122334455667788, nodeid: int = 1) -> codec.InHeader:
    return codec.InHeader(0, 0, unique, nodeid, 1000, 100, 4242)


def raw_request(opcode: int, body: bytes, unique: int = 77, nodeid: int = 1, extlen: int = 0, length=None) -> bytes:
    """A request built by hand from fuse_in_header's C layout."""
    n = 40 + len(body) if length is None else length
    return struct.pack("<IIQQIIIHH", n, opcode, unique, nodeid, 1, 2, 3, extlen, 0) + body


def decode_error(buffers, **kw) -> FuseProtocolError:
    with pytest.raises(FuseProtocolError) as info:
        decode_request(buffers, **kw)
    return info.value


# ---------------------------------------------------------------------------
# ABI layouts against fuse.h
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,size",
    [
        ("fuse_in_header", 40), ("fuse_out_header", 16), ("fuse_attr", 88), ("fuse_entry_out", 128),
        ("fuse_attr_out", 104), ("fuse_init_in", 64), ("fuse_init_in_compat", 16), ("fuse_init_out", 64),
        ("fuse_kstatfs", 80), ("fuse_file_lock", 24), ("fuse_lk_in", 48), ("fuse_read_in", 40),
        ("fuse_write_in", 40), ("fuse_write_out", 8), ("fuse_setattr_in", 88), ("fuse_getattr_in", 16),
        ("fuse_open_in", 8), ("fuse_open_out", 16), ("fuse_create_in", 16), ("fuse_release_in", 24),
        ("fuse_flush_in", 24), ("fuse_fsync_in", 16), ("fuse_mknod_in", 16), ("fuse_mkdir_in", 8),
        ("fuse_rename_in", 8), ("fuse_rename2_in", 16), ("fuse_link_in", 8), ("fuse_setxattr_in", 16),
        ("fuse_setxattr_in_compat", 8), ("fuse_getxattr_in", 8), ("fuse_getxattr_out", 8),
        ("fuse_access_in", 8), ("fuse_interrupt_in", 8), ("fuse_forget_in", 8), ("fuse_forget_one", 16),
        ("fuse_batch_forget_in", 8), ("fuse_fallocate_in", 32), ("fuse_lseek_in", 24), ("fuse_lseek_out", 8),
        ("fuse_copy_file_range_in", 56), ("fuse_ioctl_in", 32), ("fuse_ioctl_out", 16), ("fuse_poll_in", 24),
        ("fuse_poll_out", 8), ("fuse_setupmapping_in", 40), ("fuse_removemapping_in", 4),
        ("fuse_removemapping_one", 16), ("fuse_syncfs_in", 8), ("fuse_dirent", 24), ("fuse_direntplus", 152),
        ("fuse_ext_header", 8), ("fuse_bmap_in", 16),
    ],
)
def test_struct_sizes_match_fuse_h(name, size):
    s = getattr(abi, name)
    assert s.size == size
    assert s.format.startswith("<")


def test_compat_sizes_are_prefixes_of_current_structs():
    assert abi.FUSE_COMPAT_SETXATTR_IN_SIZE == abi.fuse_setxattr_in_compat.size
    assert abi.FUSE_COMPAT_INIT_IN_SIZE == abi.fuse_init_in_compat.size
    assert abi.FUSE_COMPAT_ENTRY_OUT_SIZE == abi.fuse_entry_out.size - 8
    assert abi.FUSE_COMPAT_ATTR_OUT_SIZE == abi.fuse_attr_out.size - 8
    assert abi.FUSE_NAME_OFFSET == 24 and abi.FUSE_NAME_OFFSET_DIRENTPLUS == 152


def test_opcode_numbers():
    assert (Opcode.LOOKUP, Opcode.FORGET, Opcode.MKNOD, Opcode.FSYNC, Opcode.INIT) == (1, 2, 8, 20, 26)
    assert (Opcode.BATCH_FORGET, Opcode.RENAME2, Opcode.COPY_FILE_RANGE) == (42, 45, 47)
    assert (Opcode.SETUPMAPPING, Opcode.REMOVEMAPPING, Opcode.SYNCFS, Opcode.TMPFILE, Opcode.STATX) == (
        48, 49, 50, 51, 52,
    )
    assert Opcode.CUSE_INIT == 4096
    assert 7 not in set(Opcode) and 19 not in set(Opcode)
    assert abi.FUSE_KERNEL_VERSION == 7 and abi.FUSE_KERNEL_MINOR_VERSION == 38


def test_init_flags_bits_and_intflag_agree():
    assert abi.FUSE_ASYNC_READ == 1
    assert abi.FUSE_WRITEBACK_CACHE == 1 << 16
    assert abi.FUSE_HANDLE_KILLPRIV_V2 == 1 << 28
    assert abi.FUSE_INIT_EXT == 1 << 30
    assert abi.FUSE_SECURITY_CTX == 1 << 32
    assert abi.FUSE_HAS_INODE_DAX == 1 << 33
    assert abi.FUSE_HAS_EXPIRE_ONLY == 1 << 35
    for member in abi.InitFlag:
        assert getattr(abi, "FUSE_" + member.name) == member.value
    assert abi.FATTR_KILL_SUIDGID == 1 << 11
    assert abi.FOPEN_PARALLEL_DIRECT_WRITES == 1 << 6
    assert abi.FUSE_SETUPMAPPING_FLAG_READ == 2


def test_every_opcode_has_a_request_type_or_is_deliberately_unsupported():
    assert set(codec.REQUEST_TYPES) | UNSUPPORTED == set(Opcode)
    assert set(REQUEST_STRATEGIES) == set(codec.REQUEST_TYPES.values())
    for op, cls in codec.REQUEST_TYPES.items():
        assert cls.OPCODE == op
        assert cls.__name__.endswith("Request")


# ---------------------------------------------------------------------------
# Hand-made vectors
# ---------------------------------------------------------------------------


def test_lookup_hand_vector():
    wire = raw_request(1, b"hello\0", unique=0x0102030405060708, nodeid=1)
    assert len(wire) == 46
    req = decode_request([wire])
    assert req == codec.LookupRequest(codec.InHeader(46, Opcode.LOOKUP, 0x0102030405060708, 1, 1, 2, 3), b"hello")
    assert type(req.header.opcode) is Opcode
    again = codec.LookupRequest(codec.InHeader(0, 0, 0x0102030405060708, 1, 1, 2, 3), b"hello")
    assert b"".join(again.encode()) == wire


def test_in_header_field_offsets():
    h = codec.InHeader(0x11111111, 0x22, 0x3333333333333333, 0x4444444444444444, 0x55, 0x66, 0x77, 0x0102)
    raw = h.encode()
    assert len(raw) == 40
    assert raw[0:4] == b"\x11" * 4
    assert raw[4:8] == b"\x22\0\0\0"
    assert raw[8:16] == b"\x33" * 8
    assert raw[16:24] == b"\x44" * 8
    assert (raw[24], raw[28], raw[32]) == (0x55, 0x66, 0x77)
    assert raw[36:38] == b"\x02\x01" and raw[38:40] == b"\0\0"
    assert codec.InHeader.decode(raw + b"junk") == h
    with pytest.raises(FuseProtocolError):
        codec.InHeader.decode(raw[:39])


def test_write_hand_vector_and_rename_two_names():
    body = struct.pack("<QQIIQII", 9, 4096, 3, 2, 0xAB, 0o2, 0) + b"xyz"
    req = decode_request([raw_request(16, body)])
    assert isinstance(req, codec.WriteRequest)
    assert (req.fh, req.offset, req.size, req.write_flags, req.lock_owner, req.flags) == (9, 4096, 3, 2, 0xAB, 2)
    assert b"".join(req.data) == b"xyz"
    rn = decode_request([raw_request(12, struct.pack("<Q", 5) + b"a\0bc\0")])
    assert rn == codec.RenameRequest(rn.header, 5, b"a", b"bc")


def test_entry_out_hand_vector():
    attr = struct.pack("<QQQQQQIIIIIIIIII", 2, 10, 1, 100, 200, 300, 1, 2, 3, 0o100644, 1, 1000, 100, 0, 4096, 1)
    raw = struct.pack("<QQQQII", 2, 7, 5, 6, 500, 600) + attr
    assert len(raw) == 128
    e = codec.EntryOut.decode(raw)
    assert (e.nodeid, e.generation, e.entry_valid, e.attr_valid, e.entry_valid_nsec, e.attr_valid_nsec) == (
        2, 7, 5, 6, 500, 600,
    )
    assert e.attr == codec.Attr(2, 10, 1, 100, 200, 300, 1, 2, 3, 0o100644, 1, 1000, 100, 0, 4096, 1)
    assert e.encode() == raw
    assert len(e.attr.encode()) == 88


def test_init_out_wire_layout_splits_flags():
    out = codec.InitOut(7, 38, 65536, abi.FUSE_ASYNC_READ | abi.FUSE_HAS_INODE_DAX, 16, 12, 1 << 20, 1, 256, 12)
    raw = out.encode()
    assert len(raw) == 64
    major, minor, ra, flags, bg, cong, mw, tg, mp, ma, flags2 = struct.unpack_from("<IIIIHHIIHHI", raw)
    assert (major, minor, ra, bg, cong, mw, tg, mp, ma) == (7, 38, 65536, 16, 12, 1 << 20, 1, 256, 12)
    assert flags == abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT
    assert flags2 == 1 << 1
    assert raw[40:] == b"\0" * 24
    assert codec.InitOut.decode(raw).flags == abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT | abi.FUSE_HAS_INODE_DAX
    low_only = codec.InitOut(7, 38, 0, abi.FUSE_ASYNC_READ, 0, 0, 0, 0, 0, 0).encode()
    assert struct.unpack_from("<I", low_only, 12)[0] == abi.FUSE_ASYNC_READ  # no INIT_EXT without flags2


def test_init_request_compat_and_extended_layouts():
    compat = decode_request([raw_request(26, struct.pack("<IIII", 7, 31, 131072, abi.FUSE_ASYNC_READ))])
    assert compat == codec.InitRequest(compat.header, 7, 31, 131072, abi.FUSE_ASYNC_READ)
    ext_flags = abi.FUSE_ASYNC_READ | abi.FUSE_INIT_EXT
    body = struct.pack("<IIIII11I", 7, 38, 4096, ext_flags, 0b11, *([0] * 11))
    req = decode_request([raw_request(26, body)])
    assert req.flags == ext_flags | abi.FUSE_SECURITY_CTX | abi.FUSE_HAS_INODE_DAX
    # flags2 is ignored without FUSE_INIT_EXT
    body = struct.pack("<IIIII11I", 7, 38, 4096, abi.FUSE_ASYNC_READ, 0b11, *([0] * 11))
    assert decode_request([raw_request(26, body)]).flags == abi.FUSE_ASYNC_READ
    # FUSE_INIT_EXT promises the 64-byte struct
    err = decode_error([raw_request(26, struct.pack("<IIII", 7, 38, 0, ext_flags))])
    assert err.unique == 77
    # encoding picks the layout from the flags
    assert len(b"".join(codec.InitRequest(hdr(), 7, 38, 0, abi.FUSE_ASYNC_READ).encode())) == 56
    assert len(b"".join(codec.InitRequest(hdr(), 7, 38, 0, abi.FUSE_SECURITY_CTX).encode())) == 104


def test_out_header_error_is_negated_on_the_wire():
    raw = encode_out_header(0xDEAD, errno.ENOENT, 0)
    assert raw == struct.pack("<IiQ", 16, -errno.ENOENT, 0xDEAD)
    assert encode_out_header(5, 0, 128)[:4] == struct.pack("<I", 144)
    assert codec.decode_out_header(raw) == codec.OutHeader(16, errno.ENOENT, 0xDEAD)
    with pytest.raises(FuseProtocolError):
        codec.decode_out_header(struct.pack("<IiQ", 16, 5, 1))
    with pytest.raises(FuseProtocolError):
        codec.decode_out_header(struct.pack("<IiQ", 16, -512, 1))
    with pytest.raises(FuseProtocolError):
        codec.decode_out_header(raw[:15])


def test_setxattr_layout_depends_on_setxattr_ext():
    value = b"v" * 5
    compat = raw_request(21, struct.pack("<II", 5, 1) + b"user.a\0" + value)
    req = decode_request([compat])
    assert (req.size, req.flags, req.setxattr_flags, req.name, req.value, req.extended) == (
        5, 1, 0, b"user.a", value, False,
    )
    ext = raw_request(21, struct.pack("<IIII", 5, 2, abi.FUSE_SETXATTR_ACL_KILL_SGID, 0) + b"user.a\0" + value)
    req = decode_request([ext], setxattr_ext=True)
    assert (req.flags, req.setxattr_flags, req.name, req.value, req.extended) == (2, 1, b"user.a", value, True)
    # Read with the wrong layout, the extended message does not frame.
    decode_error([ext])
    with pytest.raises(ValueError):
        codec.SetxattrRequest(hdr(), 0, 0, 1, b"n", b"").encode()


# ---------------------------------------------------------------------------
# Request round trips
# ---------------------------------------------------------------------------


def _decode_kw(req: codec.Request) -> dict:
    return {"setxattr_ext": getattr(req, "extended", False)}


@pytest.mark.parametrize("cls", ALL_REQUEST_TYPES, ids=lambda c: c.__name__)
@settings(relaxed, max_examples=60)
@given(data=st.data())
def test_request_round_trip(cls, data):
    req = data.draw(REQUEST_STRATEGIES[cls])
    buffers = req.encode()
    wire = b"".join(buffers)
    assert req.header.len == len(wire)
    assert req.header.opcode == cls.OPCODE
    assert len(buffers[0]) == 40
    assert req.header.total_extlen * 8 == len(req.ext)
    decoded = decode_request(buffers, **_decode_kw(req))
    assert type(decoded) is cls
    assert decoded == req
    pieces = data.draw(resplit(buffers))
    assert decode_request(pieces, **_decode_kw(req)) == req
    # bytes past header.len are ignored
    assert decode_request([*pieces, b"trailing garbage"], **_decode_kw(req)) == req


@relaxed
@given(req=requests())
def test_requests_differ_when_a_field_differs(req):
    """Equality is not vacuous: changing the header changes the decoded request."""
    buffers = req.encode()
    decoded = decode_request(buffers, **_decode_kw(req))
    decoded.header.unique ^= 1
    assert decoded != req


def test_write_payload_views_are_zero_copy():
    req = codec.WriteRequest(hdr(), 1, 0, 8, 0, 0, 0, [memoryview(b"abcdefgh")])
    wire = b"".join(req.encode())
    source_a = bytearray(wire[:84])  # header, write_in and 4 payload bytes
    source_b = bytearray(wire[84:])
    decoded = decode_request([source_a, memoryview(source_b)])
    assert [bytes(v) for v in decoded.data] == [b"abcd", b"efgh"]
    assert decoded.data[0].obj is source_a and decoded.data[1].obj is source_b
    source_a[80] = ord("X")
    source_b[3] = ord("Y")
    assert bytes(decoded.data[0]) == b"Xbcd" and bytes(decoded.data[1]) == b"efgY"


def test_write_payload_split_from_header_is_a_single_view():
    payload = bytearray(b"p" * 4096)
    head = b"".join(codec.WriteRequest(hdr(), 1, 0, 4096, 0, 0, 0, [memoryview(payload)]).encode()[:2])
    decoded = decode_request([head, payload])
    assert len(decoded.data) == 1 and decoded.data[0].obj is payload


def test_non_byte_memoryviews_are_accepted():
    wire = bytearray(b"".join(codec.GetattrRequest(hdr(), 0, 0).encode()))
    assert len(wire) % 4 == 0
    req = decode_request([memoryview(wire).cast("I")])
    assert isinstance(req, codec.GetattrRequest)


def test_extensions_are_split_off_and_parsed():
    groups = struct.pack("<III", 2, 1000, 1001) + b"\0" * 4
    ext = abi.fuse_ext_header.pack(8 + len(groups), abi.FUSE_EXT_GROUPS) + groups
    req = codec.MkdirRequest(hdr(), 0o755, 0o22, b"d", ext=ext)
    wire = b"".join(req.encode())
    assert req.header.total_extlen == 3
    decoded = decode_request([wire])
    assert decoded.name == b"d" and decoded.ext == ext
    assert codec.supp_groups(decoded.ext) == (1000, 1001)
    assert codec.supp_groups(b"") is None
    assert list(codec.iter_extensions(ext)) == [(abi.FUSE_EXT_GROUPS, groups)]
    # an extension record whose size runs past the area
    bad = abi.fuse_ext_header.pack(64, 32) + b"\0" * 8
    err = decode_error([raw_request(9, struct.pack("<II", 0, 0) + b"d\0" + bad, extlen=2)])
    assert err.unique == 77
    # total_extlen bigger than the message
    err = decode_error([raw_request(9, struct.pack("<II", 0, 0) + b"d\0", extlen=10)])
    assert err.unique == 77


def test_tmpfile_accepts_the_slash_name_linux_sends():
    body = struct.pack("<IIII", 0o100000 | 0o2, 0o600, 0o22, 0) + b"/\0"
    req = decode_request([raw_request(51, body)])
    assert isinstance(req, codec.TmpfileRequest) and req.name == b"/"
    with pytest.raises(FuseProtocolError):
        decode_request([raw_request(35, body)])  # CREATE needs a real component


# ---------------------------------------------------------------------------
# Malformed requests
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opcode,body",
    [
        (1, b"a/b\0"),  # slash in a component
        (1, b"\0"),  # empty name
        (1, b"abc"),  # not NUL-terminated
        (1, b"ab\0c\0"),  # embedded NUL
        (1, b""),  # missing name
        (10, b"x/\0"),
        (11, b""),
        (12, struct.pack("<Q", 2) + b"old\0"),  # second name missing
        (12, struct.pack("<Q", 2) + b"old\0new"),  # second name unterminated
        (12, struct.pack("<Q", 2) + b"\0new\0"),  # empty first name
        (45, struct.pack("<QII", 2, 0, 0) + b"a\0b/c\0"),
        (13, struct.pack("<Q", 2) + b"\0"),
        (6, b"link\0\0"),  # empty symlink target
        (6, b"li/nk\0target\0"),
        (6, b"link\0tar\0get\0"),
        (8, struct.pack("<IIII", 0, 0, 0, 0) + b"..\0x\0"),
        (9, struct.pack("<II", 0, 0)),
        (35, struct.pack("<IIII", 0, 0, 0, 0) + b"a/b\0"),
        (22, struct.pack("<II", 0, 0) + b"\0"),  # empty xattr name
        (24, b"user.x"),
        (21, struct.pack("<II", 4, 0) + b"user.x\0abc"),  # value shorter than size
        (21, struct.pack("<II", 2, 0) + b"user.x\0abc"),  # value longer than size
        (16, struct.pack("<QQIIQII", 0, 0, 10, 0, 0, 0, 0) + b"short"),  # payload != size
        (16, struct.pack("<QQII", 0, 0, 0, 0)),  # truncated write_in
        (42, struct.pack("<II", 2, 0) + struct.pack("<QQ", 1, 1)),  # count says 2, one record
        (42, struct.pack("<II", 0, 0) + struct.pack("<QQ", 1, 1)),  # count says 0, one record
        (49, struct.pack("<I", 1)),  # removemapping count without records
        (39, struct.pack("<QIIQII", 0, 0, 0, 0, 8, 0) + b"1234"),  # ioctl in_size mismatch
        (2, b"\0" * 7),
        (3, b"\0" * 15),
        (4, b"\0" * 87),
        (15, b"\0" * 39),
        (31, b"\0" * 47),
        (47, b"\0" * 55),
        (48, b"\0" * 39),
        (50, b""),
        (26, b"\0" * 15),
    ],
)
def test_malformed_bodies_raise_einval_with_unique(opcode, body):
    err = decode_error([raw_request(opcode, body, unique=4242)])
    assert err.errno == errno.EINVAL
    assert err.unique == 4242


@pytest.mark.parametrize("opcode", [0, 7, 19, 41, 52, 53, 999, 4096, 0xFFFFFFFF])
def test_unknown_or_unsupported_opcode_is_enosys(opcode):
    err = decode_error([raw_request(opcode, b"\0" * 64, unique=99)])
    assert err.errno == errno.ENOSYS
    assert err.unique == 99


def test_header_length_checks():
    err = decode_error([b"\0" * 39])
    assert err.unique is None
    err = decode_error([])
    assert err.unique is None
    err = decode_error([raw_request(1, b"name\0", length=100)])  # len beyond the buffers
    assert err.unique == 77 and err.errno == errno.EINVAL
    err = decode_error([raw_request(1, b"name\0", length=39)])
    assert err.unique == 77


@relaxed
@given(
    req=requests(),
    data=st.data(),
)
def test_truncated_requests_raise_protocol_error(req, data):
    wire = b"".join(req.encode())
    cut = data.draw(st.integers(0, len(wire) - 1))
    err = decode_error(data.draw(resplit([wire[:cut]])), **_decode_kw(req))
    assert err.unique == (req.header.unique if cut >= 40 else None)


@relaxed
@given(req=requests(), data=st.data())
def test_corrupted_requests_raise_only_protocol_error(req, data):
    wire = bytearray(b"".join(req.encode()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        # shorten the body but keep the header consistent with it
        cut = data.draw(st.integers(40, len(wire)))
        del wire[cut:]
        struct.pack_into("<I", wire, 0, cut)
    try:
        decode_request(data.draw(resplit([bytes(wire)])), setxattr_ext=data.draw(st.booleans()))
    except FuseProtocolError as exc:
        assert isinstance(exc.errno, int)


@relaxed
@given(blob=st.binary(max_size=400), data=st.data())
@example(blob=b"", data=None)
def test_arbitrary_bytes_raise_only_protocol_error(blob, data):
    pieces = [blob] if data is None else data.draw(resplit([blob]))
    try:
        decode_request(pieces)
    except FuseProtocolError:
        pass


@relaxed
@given(
    opcode=st.sampled_from(sorted(codec.REQUEST_TYPES)),
    body=st.binary(max_size=200),
    extlen=st.integers(0, 3),
    unique=st.integers(0, 2**64 - 1),
    data=st.data(),
)
def test_valid_header_with_arbitrary_body_raises_only_protocol_error(opcode, body, extlen, unique, data):
    wire = raw_request(opcode, body, unique=unique, extlen=extlen)
    try:
        req = decode_request(data.draw(resplit([wire])), setxattr_ext=data.draw(st.booleans()))
    except FuseProtocolError as exc:
        assert exc.unique == unique
    else:
        assert req.header.opcode == opcode and req.header.unique == unique


@relaxed
@given(name=names)
def test_valid_names_are_returned_without_nul(name):
    req = decode_request([raw_request(1, name + b"\0")])
    assert req.name == name


# ---------------------------------------------------------------------------
# Reply bodies
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("cls", list(REPLY_STRATEGIES), ids=lambda c: c.__name__)
@relaxed
@given(data=st.data())
def test_reply_body_round_trip(cls, data):
    body = data.draw(REPLY_STRATEGIES[cls])
    raw = body.encode()
    assert isinstance(raw, bytes)
    assert cls.decode(raw) == body
    assert cls.decode(bytearray(raw)) == body
    if cls is not codec.IoctlOut:
        with pytest.raises(FuseProtocolError):
            cls.decode(raw[:-1])
        with pytest.raises(FuseProtocolError):
            cls.decode(raw + b"\0")
    else:
        with pytest.raises(FuseProtocolError):
            cls.decode(raw[:15])


def test_reply_sizes_match_fuse_h():
    a = codec.Attr(*range(16))
    e = codec.EntryOut(1, 2, 3, 4, 5, 6, a)
    assert len(e.encode()) == 128
    assert len(codec.AttrOut(1, 2, a).encode()) == 104
    assert len(codec.OpenOut(1, 2).encode()) == 16
    assert codec.OpenOut(1, 2).backing_id == 0
    assert len(codec.CreateOut(e, codec.OpenOut(1, 2)).encode()) == 144
    assert len(codec.StatfsOut(*range(8)).encode()) == 80
    assert len(codec.LkOut(codec.FileLockStruct(1, 2, 3, 4)).encode()) == 24
    assert len(codec.IoctlOut(0, 0, 0, 0).encode()) == 16
    assert codec.IoctlOut(-1, 0, 0, 0, b"xy").encode() == struct.pack("<iIII", -1, 0, 0, 0) + b"xy"
    for one in (codec.WriteOut(1), codec.GetxattrOut(1), codec.LseekOut(1), codec.PollOut(1), codec.BmapOut(1)):
        assert len(one.encode()) == 8


def test_reply_tables_partition_the_opcodes():
    typed = {op for op, cls in codec.REPLY_BODY.items() if cls is not None}
    assert set(codec.REPLY_BODY) == set(codec.REQUEST_TYPES)
    assert codec.NO_REPLY == {Opcode.FORGET, Opcode.BATCH_FORGET}
    groups = [typed, set(codec.EMPTY_REPLY), set(codec.RAW_REPLY), set(codec.NO_REPLY)]
    assert sum(map(len, groups)) == len(codec.REPLY_BODY)
    assert set().union(*groups) == set(codec.REPLY_BODY)
    assert codec.REPLY_BODY[Opcode.LOOKUP] is codec.EntryOut
    assert codec.REPLY_BODY[Opcode.CREATE] is codec.CreateOut
    assert codec.REPLY_BODY[Opcode.TMPFILE] is codec.CreateOut
    assert codec.REPLY_BODY[Opcode.COPY_FILE_RANGE] is codec.WriteOut
    assert codec.REPLY_BODY[Opcode.READ] is None


@relaxed
@given(data=st.data())
def test_decode_reply_typed_bodies(data):
    op = data.draw(st.sampled_from(sorted(op for op, cls in codec.REPLY_BODY.items() if cls is not None)))
    body = data.draw(REPLY_STRATEGIES[codec.REPLY_BODY[op]])
    raw = body.encode()
    unique = data.draw(st.integers(0, 2**64 - 1))
    out_hdr, decoded = codec.decode_reply(op, encode_out_header(unique, 0, len(raw)) + raw)
    assert out_hdr == codec.OutHeader(16 + len(raw), 0, unique)
    assert decoded == body


def test_decode_reply_other_shapes():
    ok = encode_out_header
    assert codec.decode_reply(Opcode.READ, ok(1, 0, 3) + b"abc") == (codec.OutHeader(19, 0, 1), b"abc")
    assert codec.decode_reply(Opcode.UNLINK, ok(1, 0, 0)) == (codec.OutHeader(16, 0, 1), None)
    assert codec.decode_reply(Opcode.LOOKUP, ok(1, errno.ENOENT, 0)) == (codec.OutHeader(16, errno.ENOENT, 1), None)
    probe = codec.GetxattrOut(12).encode()
    assert codec.decode_reply(Opcode.GETXATTR, ok(1, 0, 8) + probe, size_probe=True)[1] == codec.GetxattrOut(12)
    assert codec.decode_reply(Opcode.GETXATTR, ok(1, 0, 8) + probe)[1] == probe
    bad = [
        (Opcode.UNLINK, ok(1, 0, 1) + b"x"),  # header-only reply with a body
        (Opcode.LOOKUP, ok(1, errno.ENOENT, 4) + b"xxxx"),  # error with a body
        (Opcode.LOOKUP, ok(1, 0, 8) + b"\0" * 8),  # short entry_out
        (Opcode.READ, ok(1, 0, 5) + b"abc"),  # len disagrees
        (Opcode.FORGET, ok(1, 0, 0)),  # no reply expected
        (9999, ok(1, 0, 0)),
    ]
    for op, raw in bad:
        with pytest.raises(FuseProtocolError) as info:
            codec.decode_reply(op, raw)
        assert info.value.unique == 1


# ---------------------------------------------------------------------------
# Directory entries
# ---------------------------------------------------------------------------


@relaxed
@given(entries=st.lists(dirents, max_size=8))
def test_dirent_round_trip(entries):
    packed = [pack_dirent(d.ino, d.off, d.type, d.name) for d in entries]
    for d, p in zip(entries, packed):
        assert len(p) == codec.dirent_size(len(d.name))
        assert len(p) % 8 == 0
        assert struct.unpack_from("<QQII", p) == (d.ino, d.off, len(d.name), d.type)
        assert p[24:24 + len(d.name)] == d.name and not p[24 + len(d.name):].strip(b"\0")
    assert list(codec.iter_dirents(b"".join(packed))) == entries


@relaxed
@given(entries=st.lists(direntpluses, max_size=5))
def test_direntplus_round_trip(entries):
    packed = [
        pack_direntplus(d.entry, d.dirent.ino, d.dirent.off, d.dirent.type, d.dirent.name) for d in entries
    ]
    for d, p in zip(entries, packed):
        assert len(p) == codec.direntplus_size(len(d.dirent.name))
        assert len(p) % 8 == 0
        assert p[:128] == d.entry.encode()
    assert list(codec.iter_direntplus(b"".join(packed))) == entries


def test_dirent_sizes():
    assert codec.dirent_size(1) == 32 and codec.dirent_size(8) == 32 and codec.dirent_size(9) == 40
    assert codec.direntplus_size(1) == 160 and codec.direntplus_size(8) == 160 and codec.direntplus_size(9) == 168


@relaxed
@given(entry=dirents, cut=st.integers(1, 40))
def test_truncated_dirents_raise(entry, cut):
    packed = pack_dirent(entry.ino, entry.off, entry.type, entry.name)
    assume(cut < len(packed))
    with pytest.raises(FuseProtocolError):
        list(codec.iter_dirents(packed[:-cut]))


@relaxed
@given(entry=entry_outs, cut=st.integers(1, 200))
def test_truncated_direntplus_raise(entry, cut):
    packed = pack_direntplus(entry, 1, 2, 4, b"name")
    assume(cut < len(packed))
    with pytest.raises(FuseProtocolError):
        list(codec.iter_direntplus(packed[:-cut]))


@pytest.mark.parametrize("name", [b"", b"a/b", b"a\0b", b"x" * (abi.FUSE_NAME_MAX + 1)])
def test_bad_dirent_names_raise(name):
    with pytest.raises(FuseProtocolError):
        list(codec.iter_dirents(pack_dirent(1, 1, 8, name)))


@relaxed
@given(blob=st.binary(max_size=400))
def test_arbitrary_dirent_data_raises_only_protocol_error(blob):
    for it in (codec.iter_dirents, codec.iter_direntplus):
        try:
            list(it(blob))
        except FuseProtocolError:
            pass


@relaxed
@given(header=in_headers())
def test_in_header_round_trip(header):
    assert codec.InHeader.decode(header.encode()) == header


# ---------------------------------------------------------------------------
# Replies straight from a backend's attributes, and into guest buffers
# ---------------------------------------------------------------------------


def _expected_attr(a) -> codec.Attr:
    ns = 1_000_000_000
    return codec.Attr(
        a.st_ino, a.st_size, a.st_blocks, a.st_atime_ns // ns, a.st_mtime_ns // ns, a.st_ctime_ns // ns,
        a.st_atime_ns % ns, a.st_mtime_ns % ns, a.st_ctime_ns % ns, a.st_mode, a.st_nlink, a.st_uid, a.st_gid,
        a.st_rdev, a.st_blksize, a.attr_flags,
    )


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(1.0, (1, 0)), (1.5, (1, 500_000_000)), (0.25, (0, 250_000_000)), (0, (0, 0)), (-3.5, (0, 0)), (7, (7, 0))],
)
def test_split_timeout(seconds, expected):
    assert codec.split_timeout(seconds) == expected


@relaxed
@given(a=entry_attributes)
def test_attribute_packers_match_the_reply_records(a):
    attr = _expected_attr(a)
    attr_valid, attr_nsec = codec.split_timeout(a.attr_timeout)
    entry_valid, entry_nsec = codec.split_timeout(a.entry_timeout)
    assert pack_attr(a) == attr.encode()
    assert pack_attr_out(a) == codec.AttrOut(attr_valid, attr_nsec, attr).encode()
    assert pack_entry_out(a) == codec.EntryOut(a.st_ino, a.generation, entry_valid, attr_valid, entry_nsec, attr_nsec, attr).encode()
    assert codec.AttrOut.decode(pack_attr_out(a)).attr == attr


def test_attribute_packers_refuse_what_the_wire_cannot_carry():
    with pytest.raises(struct.error):
        pack_attr_out(EntryAttributes(st_mtime_ns=-(1 << 63) * 10**9 - 1))  # beyond a signed 64-bit second
    with pytest.raises(struct.error):
        pack_entry_out(EntryAttributes(st_ino=2**64))
    with pytest.raises(AttributeError):
        pack_attr(object())


def test_times_before_the_epoch_are_twos_complement_seconds_as_the_kernel_reads_them():
    attr = abi.fuse_attr.unpack(pack_attr(EntryAttributes(st_mtime_ns=-1, st_atime_ns=-5_000_000_123)))
    mtime, atime, mtimensec, atimensec = attr[4], attr[3], attr[7], attr[6]
    assert (mtime, mtimensec) == ((1 << 64) - 1, 999_999_999)  # -1 s + 0.999999999 s
    assert (atime - (1 << 64)) * 10**9 + atimensec == -5_000_000_123
    assert codec.wire_time_ns(atime, atimensec) == -5_000_000_123 and codec.wire_time_ns(5, 7) == 5_000_000_007
    assert codec.wire_seconds(-(1 << 63) * 10**9) == 1 << 63


def test_write_reply_scatters_header_and_body_or_writes_nothing():
    dest = [memoryview(bytearray(10)), memoryview(bytearray(0)), memoryview(bytearray(20))]
    assert write_reply(dest, 9, 0, [b"abc", bytearray(b"de"), memoryview(b"f")]) == 22
    assert b"".join(bytes(d) for d in dest) == encode_out_header(9, 0, 6) + b"abcdef" + bytes(8)
    small = [memoryview(bytearray(21))]
    assert write_reply(small, 9, 0, b"x" * 6) == 0 and bytes(small[0]) == bytes(21)  # 22 bytes do not fit
    assert write_reply(small, 9, errno.ENOENT, ()) == 16
    assert bytes(small[0][:16]) == encode_out_header(9, errno.ENOENT, 0)
    assert write_reply([], 9, 0, ()) == 0


def test_record_factory_builds_equal_records():
    make = record_factory(RequestContext)
    assert make(1, 2, 3, 0o22, (4, 5)) == RequestContext(uid=1, gid=2, pid=3, umask=0o22, groups=(4, 5))
    assert make(1, 2, 3) == RequestContext(1, 2, 3)  # defaults filled by the class
    assert type(make(1, 2, 3, 0, None)) is RequestContext
