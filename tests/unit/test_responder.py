"""The inline responders (pure virtiofs_async.responder, compiled
_cy_responder) against the session's full path over a real PassthroughFS:
for every request either twin answers, its bytes are the full path's reply
and the lookup counts move the same way; a request it does not answer
changes nothing. Both twins always agree. Where the compiled twin is
built, the tables here hold the compiled inode and handle records (which
it requires; the pure twin reads either), in the pure run too; the pure
records under the pure twin are checked on their own below, and by the
rest of the pure run.

Skips the compiled twin when it is not built, except when the run asks for
cython (then it fails).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import struct
import threading
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs_async import _accel, codec
from virtiofs_async import responder as pure
from virtiofs_async.abi import fuse as abi
from virtiofs_async.backends import passthrough
from virtiofs_async.backends.passthrough import PassthroughFS
from virtiofs_async.session import FuseSession

from .compiled import need_compiled

try:
    from virtiofs_async import _cy_responder
except ImportError as exc:  # not built
    _cy_responder = None  # type: ignore[assignment]
    _MISSING: ImportError | None = exc
else:
    _MISSING = None

IN = abi.fuse_in_header
GETATTR = int(abi.Opcode.GETATTR)
LOOKUP = int(abi.Opcode.LOOKUP)
NAMES = [b"f", b"d", b"s", b"fifo", b"old", b"missing", b"d/g", b".", b"..", b"", b"x" * 255, b"x" * 256, b"a\0b"]


def _twins() -> list[type]:
    out: list[type] = [pure.PassthroughResponder]
    if _cy_responder is not None:
        out.append(_cy_responder.PassthroughResponder)
    return out


def request(opcode: int, nodeid: int, body: bytes, unique: int = 7, *, extlen: int = 0, len_delta: int = 0,
            trailing: bytes = b"", uid: int = 0) -> bytes:
    length = IN.size + len(body) + 8 * extlen + len_delta
    return (IN.pack(length & 0xFFFFFFFF, opcode, unique, nodeid, uid, uid, 1, extlen, 0) + body + b"\0" * 8 * extlen
            + trailing)


def getattr_req(nodeid: int, **kw: Any) -> bytes:
    return request(GETATTR, nodeid, abi.fuse_getattr_in.pack(0, 0, 0), **kw)


def lookup_req(parent: int, name: bytes, **kw: Any) -> bytes:
    return request(LOOKUP, parent, name + b"\0", **kw)


class Mount:
    """A PassthroughFS over a small tree, mounted by a FuseSession."""

    def __init__(self, root: str, **options: Any) -> None:
        self.root = root
        for name in ("f", "old"):
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"hello")
        os.makedirs(os.path.join(root, "d"), exist_ok=True)
        with open(os.path.join(root, "d", "g"), "wb") as f:
            f.write(b"g" * 5000)
        if not os.path.lexists(os.path.join(root, "s")):
            os.symlink("f", os.path.join(root, "s"))
        if not os.path.exists(os.path.join(root, "fifo")):
            os.mkfifo(os.path.join(root, "fifo"))
        os.utime(os.path.join(root, "old"), ns=(-5_000_000_123, 1_000_000_007))  # before the epoch
        self.fs = PassthroughFS(root, **options)
        self.session = FuseSession(self.fs)
        h, _ = self.full(codec.InitRequest(
            codec.InHeader(len=0, opcode=0, unique=1, nodeid=0, uid=0, gid=0, pid=1),
            major=7, minor=38, max_readahead=131072, flags=abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES,
        ).encode())
        # the full path installs the inodes the responders may then answer for
        self.nodeids = {b"": abi.FUSE_ROOT_ID}
        for name in (b"f", b"d", b"s", b"fifo", b"old"):
            self.nodeids[name] = self.lookup_via_session(abi.FUSE_ROOT_ID, name)
        self.nodeids[b"d/g"] = self.lookup_via_session(self.nodeids[b"d"], b"g")

    def full(self, req: bytes | list[bytes], room: int = 4096) -> tuple[int, bytes]:
        parts = [req] if isinstance(req, bytes) else req
        out = bytearray(room)
        n = asyncio.run(self.session.handle_request([memoryview(bytes(p)) for p in parts], [memoryview(out)]))
        return n, bytes(out[:n])

    def lookup_via_session(self, parent: int, name: bytes) -> int:
        n, reply = self.full(lookup_req(parent, name))
        assert n == 144, reply
        return abi.fuse_entry_out.unpack_from(reply, 16)[0]

    def counts(self) -> dict[int, int]:
        return {nodeid: node.lookups for nodeid, node in self.fs._inodes.items()}

    def responders(self) -> list[Any]:
        fs = self.fs
        return [cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, fs.announce_submounts,
                    fs.file_handles == "never") for cls in _twins()]

    def check(self, req: bytes, room: int) -> bytes | None:
        """Offer ``req`` to each twin, then to the full path; assert they agree.
        Returns the responders' answer (None: not answered)."""
        answers = []
        deltas = []
        for r in self.responders():
            before = self.counts()
            answers.append(r.respond(req, room))
            deltas.append(_delta(before, self.counts()))
        assert all(a == answers[0] for a in answers), answers
        answer = answers[0]
        if answer is None:
            assert all(not d for d in deltas), deltas
            return None
        before = self.counts()
        n, reply = self.full(req, room)
        assert answer == reply
        assert all(d == _delta(before, self.counts()) for d in deltas)
        return answer

    def close(self) -> None:
        asyncio.run(self.session.close())
        self.fs.close()


def _delta(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after) if after.get(k, 0) != before.get(k, 0)}


@pytest.fixture(autouse=True)
def _compiled() -> None:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")


@pytest.fixture(autouse=True, scope="module")
def _compiled_records() -> Iterator[None]:
    if _cy_responder is None:
        yield
        return
    with pytest.MonkeyPatch.context() as p:
        p.setattr(passthrough, "_Inode", _cy_responder.HostInode)
        p.setattr(passthrough, "_Handle", _cy_responder.HostHandle)
        yield


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    m = Mount(str(tmp_path_factory.mktemp("responder")))
    yield m
    m.close()


def test_the_package_uses_the_selected_twin() -> None:
    compiled = _accel.IMPLEMENTATION == "cython"
    expected = _cy_responder.PassthroughResponder if compiled else pure.PassthroughResponder
    assert _accel.PassthroughResponder is expected
    # the backend's records are the selected twin's (this module's fixture
    # swaps in the compiled ones where they are built: the switch's own here)
    records = (_cy_responder.HostInode, _cy_responder.HostHandle) if compiled else (pure.HostInode, pure.HostHandle)
    assert (_accel.HostInode, _accel.HostHandle) == records
    with pytest.MonkeyPatch.context() as p:
        p.setattr(passthrough, "_Inode", _accel.HostInode)
        p.setattr(passthrough, "_Handle", _accel.HostHandle)
        fs = PassthroughFS(os.getcwd())
    try:
        assert type(fs.inline_responder(1 << 20)) is expected
        assert type(fs._inodes[abi.FUSE_ROOT_ID]) is records[0]
    finally:
        fs.close()


def test_the_pure_twin_over_the_pure_records(tmp_path: Any, monkeypatch: Any) -> None:
    """The pure records (the pure run's tables) under the pure twin: the
    full path's bytes and counts for GETATTR, LOOKUP (known, new, missing)
    and FORGET. The compiled twin refuses them (TypeError: it reads the
    compiled records' fields directly)."""
    monkeypatch.setattr(passthrough, "_Inode", pure.HostInode)
    monkeypatch.setattr(passthrough, "_Handle", pure.HostHandle)
    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        assert type(fs._inodes[abi.FUSE_ROOT_ID]) is pure.HostInode
        r = pure.PassthroughResponder(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True,
                                      adopt=fs._adopt, drop=fs._maybe_drop)
        open(os.path.join(m.root, "new"), "w").close()
        for req in (getattr_req(m.nodeids[b"f"]), lookup_req(abi.FUSE_ROOT_ID, b"f"),
                    lookup_req(abi.FUSE_ROOT_ID, b"missing"), lookup_req(abi.FUSE_ROOT_ID, b"new")):
            before = m.counts()
            answer = r.respond(req, 512)
            assert answer is not None
            delta = _delta(before, m.counts())
            before = m.counts()
            assert m.full(req, 512)[1] == answer
            assert _delta(before, m.counts()) == delta
        new = abi.fuse_entry_out.unpack_from(answer, 16)[0]
        assert type(fs._inodes[new]) is pure.HostInode and fs.lookup_count(new) == 2
        assert r.respond(request(int(abi.Opcode.FORGET), new, struct.pack("<Q", 2)), 512) == b""  # handled, no reply
        assert new not in fs._inodes
        if _cy_responder is not None:
            c = _cy_responder.PassthroughResponder(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
            with pytest.raises(TypeError):
                c.respond(getattr_req(m.nodeids[b"f"]), 512)
            with pytest.raises(TypeError, match="HostInode records"):
                _cy_responder.PassthroughResponder(fs._inodes, fs._by_key, 1.0, 1.0, False, True,
                                                   adopt=fs._adopt, drop=fs._maybe_drop,
                                                   tables=fs._tables_config())
    finally:
        m.close()


def test_getattr_of_known_inodes_is_answered_like_the_session(mount: Mount) -> None:
    for name in (b"", b"f", b"d", b"s", b"fifo", b"d/g"):
        nodeid = mount.nodeids[name]
        answer = mount.check(getattr_req(nodeid), 512)
        assert answer is not None, name
        length, error, unique = abi.fuse_out_header.unpack_from(answer)
        assert (length, error, unique) == (120, 0, 7)
        attr = abi.fuse_attr_out.unpack_from(answer, 16)
        st = os.lstat(os.path.join(mount.root, name.decode()))
        assert attr[3] == nodeid and attr[4] == st.st_size and attr[12] == st.st_mode
        assert attr[7] == st.st_mtime_ns // 10**9 and attr[10] == st.st_mtime_ns % 10**9  # mtime, mtimensec


def test_lookup_of_known_names_counts_one_lookup_each(mount: Mount) -> None:
    nodeid = mount.nodeids[b"f"]
    before = mount.fs.lookup_count(nodeid)
    answer = mount.check(lookup_req(abi.FUSE_ROOT_ID, b"f"), 512)
    assert answer is not None
    assert abi.fuse_entry_out.unpack_from(answer, 16)[0] == nodeid
    # each twin once, then the full path once
    assert mount.fs.lookup_count(nodeid) == before + len(_twins()) + 1
    assert mount.check(lookup_req(mount.nodeids[b"d"], b"g"), 144) is not None


def test_times_before_the_epoch_go_as_the_kernel_reads_them(mount: Mount) -> None:
    for req in (getattr_req(mount.nodeids[b"old"]), lookup_req(abi.FUSE_ROOT_ID, b"old")):
        answer = mount.check(req, 512)
        assert answer is not None
        offset = 16 + (16 if len(answer) == 120 else 40)
        fields = abi.fuse_attr.unpack_from(answer, offset)
        atime, mtime, atimensec, mtimensec = fields[3], fields[4], fields[6], fields[7]
        assert atime - (1 << 64) == -6 and atimensec == 999_999_877  # -5.000000123 s
        assert (mtime, mtimensec) == (1, 7)


def test_missing_names_get_enoent(mount: Mount) -> None:
    answer = mount.check(lookup_req(abi.FUSE_ROOT_ID, b"missing", unique=99), 16)
    assert answer == abi.fuse_out_header.pack(16, -errno.ENOENT, 99)


@pytest.mark.parametrize("case", [
    "unknown nodeid", "short room", "extension",
    "len beyond the bytes", "dot", "dotdot", "slash", "not a directory", "unknown inode", "nul in name",
    "too long", "other opcode", "read", "short header",
])
def test_what_the_responders_leave_to_the_full_path(mount: Mount, case: str) -> None:
    root, f = abi.FUSE_ROOT_ID, mount.nodeids[b"f"]
    reqs = {
        "unknown nodeid": (getattr_req(123456), 512),
        "short room": (getattr_req(f), 119),
        "extension": (getattr_req(f, extlen=1), 512),
        "len beyond the bytes": (getattr_req(f, len_delta=1), 512),
        "dot": (lookup_req(root, b"."), 512),
        "dotdot": (lookup_req(mount.nodeids[b"d"], b".."), 512),
        "slash": (lookup_req(root, b"d/g"), 512),
        "not a directory": (lookup_req(f, b"x"), 512),
        "unknown inode": (lookup_req(root, b"new"), 512),
        "nul in name": (lookup_req(root, b"f\0f"), 512),
        "too long": (lookup_req(root, b"x" * 256), 512),
        "other opcode": (request(int(abi.Opcode.READLINK), mount.nodeids[b"s"], b""), 512),
        "read": (request(int(abi.Opcode.READ), 0, abi.fuse_read_in.pack(1, 0, 8, 0, 0, 0, 0)), 512),
        "short header": (getattr_req(f)[:39], 512),
    }
    req, room = reqs[case]
    if case == "unknown inode":
        with open(os.path.join(mount.root, "new"), "wb"):
            pass
    try:
        assert mount.check(req, room) is None
    finally:
        if case == "unknown inode":
            os.unlink(os.path.join(mount.root, "new"))


def test_lookup_room_for_enoent_but_not_for_an_entry(mount: Mount) -> None:
    assert mount.check(lookup_req(abi.FUSE_ROOT_ID, b"f"), 143) is None
    assert mount.check(lookup_req(abi.FUSE_ROOT_ID, b"nope"), 15) is None


def test_trailing_bytes_after_len_are_ignored_as_the_codec_does(mount: Mount) -> None:
    assert mount.check(getattr_req(mount.nodeids[b"f"], trailing=b"junk"), 512) is not None
    assert mount.check(lookup_req(abi.FUSE_ROOT_ID, b"f", trailing=b"junk"), 512) is not None


def test_submounts_are_flagged_when_announced(tmp_path: Any) -> None:
    m = Mount(str(tmp_path), announce_submounts=True)
    try:
        # Pretend the root is on another device: every directory under it
        # is then a submount for the full path and the responders alike.
        m.fs._root.key = (m.fs._root.key[0] + 1, m.fs._root.key[1])
        answer = m.check(lookup_req(abi.FUSE_ROOT_ID, b"d"), 512)
        assert answer is not None
        assert abi.fuse_entry_out.unpack_from(answer, 16)[-1] == abi.FUSE_ATTR_SUBMOUNT
        answer = m.check(lookup_req(abi.FUSE_ROOT_ID, b"f"), 512)
        assert answer is not None and abi.fuse_entry_out.unpack_from(answer, 16)[-1] == 0
    finally:
        m.close()


def test_device_numbers_are_encoded_as_the_session_does(tmp_path: Any) -> None:
    try:
        os.mknod(os.path.join(tmp_path, "dev"), stat.S_IFCHR | 0o600, os.makedev(259, 300000))
    except PermissionError:
        pytest.skip("mknod of a character device is not allowed here")
    m = Mount(str(tmp_path))
    try:
        nodeid = m.lookup_via_session(abi.FUSE_ROOT_ID, b"dev")
        answer = m.check(getattr_req(nodeid), 512)
        assert answer is not None
        assert abi.fuse_attr_out.unpack_from(answer, 16)[16] == codec.host_rdev_to_guest(os.makedev(259, 300000))
    finally:
        m.close()


def test_file_handle_mode_answers_no_lookup(tmp_path: Any) -> None:
    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        for cls in _twins():
            r = cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, False)
            assert r.respond(lookup_req(abi.FUSE_ROOT_ID, b"f"), 512) is None
            assert r.respond(getattr_req(m.nodeids[b"f"]), 512) is not None
    finally:
        m.close()


def _installing(fs: PassthroughFS, cls: type) -> Any:
    """A responder of twin ``cls`` wired as PassthroughFS.inline_responder
    wires it: new names installed with ``_adopt``, FORGETs dropping with
    ``_maybe_drop``."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, fs.announce_submounts, True,
               adopt=fs._adopt, drop=fs._maybe_drop)


def forget_req(nodeid: int, n: int, **kw: Any) -> bytes:
    return request(int(abi.Opcode.FORGET), nodeid, struct.pack("<Q", n), **kw)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("name", [b"newfile", b"newdir", b"newlink", b"newfifo"])
def test_lookup_of_a_new_name_installs_it_as_the_full_path_does(tmp_path: Any, name: bytes) -> None:
    """A name the tables do not have: each twin installs it (an O_PATH fd,
    nothing followed) and answers with the bytes the full path gives for the
    same inode afterwards; one lookup counted per reply; one fd held."""
    m = Mount(str(tmp_path))
    try:
        path = os.path.join(m.root, name.decode())
        {b"newfile": lambda: open(path, "wb").close(), b"newdir": lambda: os.mkdir(path),
         b"newlink": lambda: os.symlink("d", path), b"newfifo": lambda: os.mkfifo(path)}[name]()
        fs = m.fs
        req = lookup_req(abi.FUSE_ROOT_ID, name)
        for cls in _twins():
            fds = _open_fds()
            answer = _installing(fs, cls).respond(req, 512)
            assert answer is not None and len(answer) == 144
            nodeid = abi.fuse_entry_out.unpack_from(answer, 16)[0]
            node = fs._inodes[nodeid]
            assert fs._by_key[node.key] is node and node.lookups == 1 and node.fd >= 0
            assert _open_fds() == fds + 1
            assert stat.S_IFMT(os.fstat(node.fd).st_mode) == node.kind == stat.S_IFMT(os.lstat(path).st_mode)
            n, full = m.full(req, 512)
            assert full == answer and node.lookups == 2 and _open_fds() == fds + 1
            # forget both: the inode goes, its fd with it
            assert _installing(fs, cls).respond(forget_req(nodeid, 2), 0) == b""
            assert nodeid not in fs._inodes and node.key not in fs._by_key and _open_fds() == fds
    finally:
        m.close()


def test_a_failing_adopt_leaves_nothing_open(mount: Mount) -> None:
    path = os.path.join(mount.root, "adopt-fails")
    open(path, "wb").close()
    fs = mount.fs

    def adopt(fd: int, dev: int, ino: int, mode: int) -> Any:
        raise RuntimeError("no room in the table")

    try:
        for cls in _twins():
            r = cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, adopt=adopt)
            fds, before = _open_fds(), dict(fs._inodes)
            with pytest.raises(RuntimeError):
                r.respond(lookup_req(abi.FUSE_ROOT_ID, b"adopt-fails"), 512)
            assert _open_fds() == fds and fs._inodes == before
    finally:
        os.unlink(path)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["lookup", "forget", "getattr"]), st.sampled_from([b"f", b"d", b"g"]),
                              st.sampled_from([0, 1, 2, 5, 2**64 - 1])), max_size=12))
def test_lookups_and_forgets_count_as_the_full_path_counts(tmp_path_factory: Any, ops: list) -> None:
    """The same sequence of LOOKUPs, FORGETs and GETATTRs through each twin
    (what it leaves goes to the full path, as at the queue) and through the
    full path alone, on mounts of copies of one tree: the same kind of
    reply, lookup count and fds held at every step."""
    mounts = [Mount(str(tmp_path_factory.mktemp("counting"))) for _ in range(1 + len(_twins()))]
    try:
        responders = [None] + [_installing(m.fs, cls) for m, cls in zip(mounts[1:], _twins())]
        for op, name, n in ops:
            results = []
            for m, r in zip(mounts, responders):
                ids = m.nodeids
                parent = ids[b"d"] if name == b"g" else abi.FUSE_ROOT_ID
                nodeid = ids[b"d/g" if name == b"g" else name]
                req = {"lookup": lookup_req(parent, name), "forget": forget_req(nodeid, n),
                       "getattr": getattr_req(nodeid)}[op]
                if r is None:
                    out, reply = m.full(req, 0 if op == "forget" else 512)
                    answer = reply if out or op == "forget" else None
                else:
                    answer = r.respond(req, 0 if op == "forget" else 512)
                    if answer is None:  # left to the full path, as the queue would
                        answer = m.full(req, 512)[1]
                node = m.fs._inodes.get(nodeid)
                # the trees differ in inode numbers and times: compare the
                # reply's length and error
                shape = None if answer is None else (len(answer), answer[4:8] if answer else b"")
                results.append((shape, None if node is None else node.lookups, m.fs.held_fds()))
            assert all(x == results[0] for x in results), (op, name, n, results)
    finally:
        for m in mounts:
            m.close()


def test_forget_of_the_root_and_of_malformed_requests_is_left_to_the_full_path(mount: Mount) -> None:
    fs = mount.fs
    for cls in _twins():
        r = _installing(fs, cls)
        assert r.respond(forget_req(abi.FUSE_ROOT_ID, 1), 0) is None
        assert r.respond(request(int(abi.Opcode.FORGET), mount.nodeids[b"f"], b"\1" * 7), 0) is None
        assert r.respond(forget_req(mount.nodeids[b"f"], 1, extlen=1), 0) is None
        assert r.respond(forget_req(987654321, 3), 0) == b""  # unknown: ignored, as the full path does
    # without a drop callback, no FORGET is answered
    r = pure.PassthroughResponder(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
    assert r.respond(forget_req(mount.nodeids[b"f"], 1), 0) is None


def _hdr(opcode: int, nodeid: int, unique: int) -> codec.InHeader:
    return codec.InHeader(len=0, opcode=opcode, unique=unique, nodeid=nodeid, uid=0, gid=0, pid=1)


def _listing_plus(m: Mount, nodeid: int, size: int) -> tuple[list[bytes], dict[int, int]]:
    """Every READDIRPLUS reply of directory ``nodeid`` (replies of ``size``
    bytes) through the session, and the lookup counts after."""
    n, reply = m.full(codec.OpendirRequest(_hdr(int(abi.Opcode.OPENDIR), nodeid, 2), os.O_RDONLY, 0).encode())
    fh = abi.fuse_open_out.unpack_from(reply, 16)[0]
    replies, offset = [], 0
    while True:
        req = codec.ReaddirplusRequest(_hdr(int(abi.Opcode.READDIRPLUS), nodeid, 3), fh, offset, size, 0, 0, 0)
        n, reply = m.full(req.encode(), 16 + size)
        assert n >= 16 and abi.fuse_out_header.unpack_from(reply)[1] == 0, reply[:16]
        if n == 16:
            break
        replies.append(reply[16:])
        offset = list(codec.iter_direntplus(reply[16:]))[-1].dirent.off
    m.full(codec.ReleasedirRequest(_hdr(int(abi.Opcode.RELEASEDIR), nodeid, 4), fh, 0, 0, 0).encode())
    return replies, m.counts()


@pytest.mark.parametrize("size", [4096, 300, 1 << 16])
def test_readdirplus_packed_in_one_call_gives_the_python_loops_bytes(tmp_path: Any, size: int) -> None:
    """The same tree listed by two mounts, one with the compiled (or pure)
    ``pack_readdirplus`` and one with the backend's own per-entry loop:
    the same replies byte for byte and the same lookup counts, at the root
    (``..`` is the root) and in a subdirectory (``..`` looked up by key)."""
    root = str(tmp_path / "t")
    os.makedirs(root + "/sub/deep")
    for i in range(150):  # a 64 KiB reply's records outgrow the packer's first buffer
        with open(f"{root}/sub/file-{i:03d}", "wb") as f:
            f.write(b"x" * i)
    os.symlink("nowhere", root + "/sub/link")
    os.mkfifo(root + "/sub/fifo")
    os.utime(root + "/sub/file-000", ns=(-5_000_000_123, 1_000_000_007))
    packed, loop = Mount(root), Mount(root)
    try:
        loop.fs._plus_packer = lambda checked=False: None  # type: ignore[method-assign]
        assert packed.fs._plus_packer() is not None
        for name in (b"", b"d"):
            nodeid = packed.nodeids[name]
            a, b = _listing_plus(packed, nodeid, size), _listing_plus(loop, nodeid, size)
            assert a == b
        sub = packed.lookup_via_session(abi.FUSE_ROOT_ID, b"sub")
        assert loop.lookup_via_session(abi.FUSE_ROOT_ID, b"sub") == sub
        a, b = _listing_plus(packed, sub, size), _listing_plus(loop, sub, size)
        assert a == b
        names = {d.dirent.name for r in a[0] for d in codec.iter_direntplus(r)}
        assert {b".", b"..", b"deep", b"link", b"fifo", b"file-000", b"file-039"} <= names
        assert packed.fs.held_fds() == loop.fs.held_fds()
    finally:
        packed.close()
        loop.close()


def test_pack_readdirplus_twins_agree(tmp_path: Any) -> None:
    """Both twins' pack_readdirplus over one host listing: the same bytes,
    index and counted inodes; a name gone since getdents is skipped."""
    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        fd = os.open(m.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            from virtiofs_async.backends import _hostfs
            batch = _hostfs.getdents(fd, 0)
            batch.insert(2, _hostfs.Dirent(424242, batch[1].off, 8, b"vanished"))
            results = []
            for cls in _twins():
                counted: list[Any] = []
                records, end = _installing(fs, cls).pack_readdirplus(fd, fs._root, batch, 0, 1 << 16, 1, 1, counted)
                results.append((records, end, [None if c is None else c.nodeid for c in counted]))
                for c in counted:
                    if c is not None:
                        c.lookups -= 1
            assert all(r == results[0] for r in results)
            records, end, counted = results[0]
            assert end == len(batch) and len(counted) == len(batch) - 1
            names = [d.dirent.name for d in codec.iter_direntplus(records)]
            assert b"vanished" not in names and len(names) == len(batch) - 1
            # room for none
            assert _installing(fs, _twins()[0]).pack_readdirplus(fd, fs._root, batch, 0, 100, 1, 1, []) == (b"", 0)
        finally:
            os.close(fd)
    finally:
        m.close()


def _closing(fs: PassthroughFS, cls: type, host_calls: bool = False) -> Any:
    """A responder answering FLUSH and RELEASE(DIR) through the backend's
    callbacks, or (``host_calls``) with the closes and table updates the
    compiled twin makes itself."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True,
               flush=fs._flush_inline, release=fs._release_inline, adopt=fs._adopt, drop=fs._maybe_drop,
               handles=fs._handles if host_calls else None, tables=fs._tables_config() if host_calls else None,
               close_host=fs._fast_namespace if host_calls else None)


def _open_via_session(m: Mount, nodeid: int, directory: bool = False) -> int:
    op = abi.Opcode.OPENDIR if directory else abi.Opcode.OPEN
    cls = codec.OpendirRequest if directory else codec.OpenRequest
    n, reply = m.full(cls(_hdr(int(op), nodeid, 5), os.O_RDONLY, 0).encode())
    assert n == 32, reply
    return abi.fuse_open_out.unpack_from(reply, 16)[0]


def flush_req(fh: int, owner: int = 0, unique: int = 9) -> bytes:
    return request(int(abi.Opcode.FLUSH), 0, struct.pack("<QIIQ", fh, 0, 0, owner), unique)


def release_req(fh: int, directory: bool = False, unique: int = 9) -> bytes:
    op = abi.Opcode.RELEASEDIR if directory else abi.Opcode.RELEASE
    return request(int(op), 0, struct.pack("<QIIQ", fh, 0, 0, 0), unique)


def test_flush_and_release_at_the_queue_do_what_the_full_path_does(mount: Mount) -> None:
    """Each twin answers FLUSH, RELEASE and RELEASEDIR of handles that close
    inline with the full path's reply bytes, and leaves the tables and fds
    as the full path leaves them."""
    fs = mount.fs
    ok = abi.fuse_out_header.pack(16, 0, 9)
    for cls, host_calls in _readers(fs):
        r = _closing(fs, cls, host_calls)
        fds = fs.held_fds()
        fh = _open_via_session(mount, mount.nodeids[b"f"])
        assert fs.held_fds() == fds + 1
        assert r.respond(flush_req(fh), 16) == ok == mount.full(flush_req(fh), 16)[1]
        assert fs.held_fds() == fds + 1 and fh in fs._handles
        assert r.respond(release_req(fh), 16) == ok
        assert fh not in fs._handles and fs.held_fds() == fds
        assert r.respond(release_req(fh), 16) == ok == mount.full(release_req(fh), 16)[1]  # unknown: nothing to do
        assert r.respond(flush_req(fh), 16) is None  # unknown: the full path's EBADF
        dh = _open_via_session(mount, mount.nodeids[b"d"], directory=True)
        assert r.respond(release_req(dh, directory=True), 16) == ok
        assert dh not in fs._handles and fs.held_fds() == fds
        # a FLUSH whose close fails answers its errno (the handle's fd is
        # not open: EBADF, as the full path's dup gives)
        fh = _open_via_session(mount, mount.nodeids[b"f"])
        real_fd = fs._handles[fh].fd
        fs._handles[fh].fd = 1 << 20
        try:
            assert r.respond(flush_req(fh), 16) == abi.fuse_out_header.pack(16, -errno.EBADF, 9) \
                == mount.full(flush_req(fh), 16)[1]
        finally:
            fs._handles[fh].fd = real_fd
        assert r.respond(release_req(fh), 16) == ok and fs.held_fds() == fds


@pytest.mark.skipif(_cy_responder is None, reason="the compiled twin is not built")
def test_compiled_flush_and_release_make_the_closes_themselves(mount: Mount, monkeypatch: Any) -> None:
    """Given close_host and the tables, the compiled twin answers FLUSH,
    RELEASE and RELEASEDIR without the backend's callbacks (or ``drop``,
    for a plain inode); without them, through the callbacks."""
    fs = mount.fs
    calls: list[str] = []
    for name in ("_flush_inline", "_release_inline", "_maybe_drop"):
        real = getattr(fs, name)
        monkeypatch.setattr(fs, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    for host_calls in (True, False):
        r = _closing(fs, _cy_responder.PassthroughResponder, host_calls)
        calls.clear()
        fh = _open_via_session(mount, mount.nodeids[b"f"])
        assert r.respond(flush_req(fh), 16) is not None
        assert r.respond(release_req(fh), 16) is not None and fh not in fs._handles
        dh = _open_via_session(mount, mount.nodeids[b"d"], directory=True)
        assert r.respond(release_req(dh, directory=True), 16) is not None and dh not in fs._handles
        if host_calls:
            assert calls == []
        else:
            assert calls == ["_flush_inline", "_release_inline", "_maybe_drop", "_release_inline", "_maybe_drop"]


def test_what_flush_and_release_leave_to_the_full_path(tmp_path: Any) -> None:
    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        for cls, host_calls in _readers(fs):
            r = _closing(fs, cls, host_calls)
            fh = _open_via_session(m, m.nodeids[b"f"])
            assert r.respond(flush_req(fh)[:-1], 16) is None  # short body
            assert r.respond(flush_req(fh), 15) is None  # no room for the reply
            fs._handles[fh].node.plocks[77] = os.dup(fs._handles[fh].fd)  # owner 77 holds POSIX locks
            assert r.respond(flush_req(fh, owner=77), 16) is None
            assert r.respond(flush_req(fh, owner=78), 16) is not None
            os.close(fs._handles[fh].node.plocks.pop(77))
            # the last reference to an inode the guest forgot: its close goes to the pool
            node = fs._handles[fh].node
            saved, node.lookups = node.lookups, 0
            assert r.respond(release_req(fh), 16) is None and fh in fs._handles
            node.lookups = saved
            # a filesystem whose calls go to the pool
            with pytest.MonkeyPatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)
                assert r.respond(flush_req(fh), 16) is None
                assert r.respond(release_req(fh), 16) is None and fh in fs._handles
            assert r.respond(release_req(fh), 16) is not None and fh not in fs._handles
        # without callbacks, none of them is answered
        plain = pure.PassthroughResponder(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
        fh = _open_via_session(m, m.nodeids[b"f"])
        assert plain.respond(flush_req(fh), 16) is None and plain.respond(release_req(fh), 16) is None
    finally:
        m.close()


def test_timeouts_split_as_the_codec_does(tmp_path: Any) -> None:
    m = Mount(str(tmp_path), entry_timeout=2.75, attr_timeout=0.5)
    try:
        answer = m.check(lookup_req(abi.FUSE_ROOT_ID, b"f"), 512)
        assert answer is not None
        _, _, ev, av, evn, avn = abi.fuse_entry_out.unpack_from(answer, 16)[:6]
        assert (ev, evn, av, avn) == (2, 750_000_000, 0, 500_000_000)
    finally:
        m.close()


_NODES = st.integers(0, 9)  # an index into Mount.nodeids (0: the root, 2: d), or an unknown number past them


def _nodeid(mount: Mount, k: int) -> int:
    known = list(mount.nodeids.values())
    return known[k] if k < len(known) else [0, 123456, 2**64 - 1][k % 3]


_options = {"extlen": st.sampled_from([0, 0, 0, 1]), "len_delta": st.sampled_from([0, 0, -1, -16, 1]),
            "trailing": st.binary(max_size=8)}
_requests = st.one_of(
    # well-formed, mostly answered
    st.tuples(st.just("getattr"), _NODES, st.just(b""), st.just({})),
    st.tuples(st.just("lookup"), st.sampled_from([0, 2]), st.sampled_from(NAMES[:6] + [b"g"]), st.just({})),
    # framing mutated, and anything else
    st.tuples(st.just("getattr"), _NODES, st.just(b""), st.fixed_dictionaries(_options)),
    st.tuples(st.just("lookup"), _NODES, st.one_of(st.sampled_from(NAMES), st.binary(max_size=12)),
              st.fixed_dictionaries(_options)),
    st.tuples(st.integers(0, 60), _NODES, st.binary(max_size=40), st.just({})),
    st.binary(max_size=80),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=_requests, room=st.sampled_from([0, 15, 16, 119, 120, 143, 144, 300, 512]))
def test_random_requests_agree_with_the_session(mount: Mount, spec: Any, room: int) -> None:
    if isinstance(spec, bytes):
        req = spec
    else:
        kind, k, body, options = spec
        nodeid = _nodeid(mount, k)
        if kind == "getattr":
            req = getattr_req(nodeid, **options)
        elif kind == "lookup":
            req = lookup_req(nodeid, body, **options)
        else:
            req = request(kind, nodeid, body)
    quiet = logging.getLogger("virtiofs_async")
    quiet.setLevel(logging.CRITICAL)  # the full path logs what it refuses
    try:
        mount.check(req, room)
    finally:
        quiet.setLevel(logging.NOTSET)


def test_setattr_times_before_the_epoch_reach_the_host(tmp_path: Any) -> None:
    """The session's side of the same encoding: SETATTR's u64 seconds are
    read as signed (``touch -d 1969-12-31`` in a guest)."""
    m = Mount(str(tmp_path))
    try:
        req = codec.SetattrRequest(
            codec.InHeader(len=0, opcode=0, unique=5, nodeid=m.nodeids[b"f"], uid=0, gid=0, pid=1),
            valid=abi.FATTR_MTIME | abi.FATTR_ATIME, fh=0, size=0, lock_owner=0,
            atime=(1 << 64) - 6, mtime=(1 << 64) - 1, ctime=0, atimensec=999_999_877, mtimensec=5,
            ctimensec=0, mode=0, uid=0, gid=0,
        )
        n, reply = m.full([bytes(p) for p in req.encode()])
        assert n == 120 and abi.fuse_out_header.unpack_from(reply)[1] == 0
        st = os.stat(os.path.join(m.root, "f"))
        assert (st.st_atime_ns, st.st_mtime_ns) == (-5_000_000_123, -999_999_995)
        attr = abi.fuse_attr_out.unpack_from(m.check(getattr_req(m.nodeids[b"f"]), 512), 16)
        assert (attr[7], attr[10]) == ((1 << 64) - 1, 5)  # mtime, mtimensec
    finally:
        m.close()


# -- READ answered at the queue (compiled twins only) ------------------------------------------
#
# The compiled responder's C entry writes READ data straight into the guest's
# buffers, which only the compiled VirtQueue.pop_serving hands it. Each case
# runs one READ chain through pop_serving with the responder the backend
# gives, and the same request through the session's full path: when served,
# the guest sees the full path's bytes and used length; when not, the chain
# comes back untouched, and the full path is what answers it.

READ = int(abi.Opcode.READ)
DATA = bytes(range(256)) * 1200  # 300 KiB


class ReadRig:
    """A Mount whose file ``big`` is open through the session, and a compiled
    VirtQueue on a driver's rings."""

    def __init__(self, root: str, mem_size: int = 8 << 20, **options: Any) -> None:
        from virtiofs_async import _cy_vring

        from .test_vring import Rig

        with open(os.path.join(root, "big"), "wb") as f:
            f.write(DATA)
        self.mount = Mount(root, **options)
        self.big = self.mount.lookup_via_session(abi.FUSE_ROOT_ID, b"big")
        self.fh = self.open(self.big, os.O_RDONLY)
        self.rig = Rig(size=64, mem_size=mem_size, queue_type=_cy_vring.VirtQueue)
        # the compiled twin, built by the backend as it would build it, in
        # the pure run too
        saved, _accel.PassthroughResponder = _accel.PassthroughResponder, _cy_responder.PassthroughResponder
        try:
            self.responder = self.mount.fs.inline_responder(1 << 20)
        finally:
            _accel.PassthroughResponder = saved

    def open(self, nodeid: int, flags: int, opcode: int = int(abi.Opcode.OPEN)) -> int:
        n, reply = self.mount.full(request(opcode, nodeid, abi.fuse_open_in.pack(flags, 0)))
        assert n == 32, reply
        return abi.fuse_open_out.unpack_from(reply, 16)[0]

    def offer(self, req: bytes, writable: list[int], readable: list[int] | None = None) -> tuple[bool, int, bytes]:
        """pop_serving one chain (in an indirect table when it has many
        buffers), ``req`` cut into buffers of ``readable`` bytes (default:
        the header, then the rest); returns (served, reply length, reply
        bytes), the unserved chain being answered by the full path on its
        own views."""
        cuts = readable or [40, len(req) - 40]
        assert sum(cuts) == len(req)
        pieces, pos = [], 0
        for n in cuts:
            pieces.append(req[pos:pos + n])
            pos += n
        head = self.rig.drv.add_chain(pieces, writable, indirect=len(writable) + len(pieces) > 32)
        self.rig.drv.publish()
        chains, served = self.rig.vq.pop_serving(self.rig.memory, 4, self.responder)
        if not served:
            assert [c.head for c in chains] == [head]
            n = asyncio.run(self.mount.session.handle_request(chains[0].readable, chains[0].writable))
            self.rig.vq.add_used(self.rig.memory, head, n)
        got_head, n, pieces = self.rig.drv.pop_used()
        assert got_head == head
        return bool(served), n, b"".join(pieces)

    def offer_many(self, reqs: list[tuple[bytes, list[int]]], limit: int = 64,
                   budget: int = 0) -> tuple[int, list[int], list[int], dict[int, tuple[int, bytes]]]:
        """Publish every request (request, reply layout) at once and
        pop_serving once; the chains it hands back are answered by the full
        path, in order, after it. Returns (served, heads in request order,
        heads in used-ring order, {head: (reply length, reply bytes)})."""
        heads = []
        for req, writable in reqs:
            heads.append(self.rig.drv.add_chain([req[:40], req[40:]], writable, indirect=True))
        self.rig.drv.publish()
        chains, served = self.rig.vq.pop_serving(self.rig.memory, limit, self.responder, budget)
        for chain in chains:
            n = asyncio.run(self.mount.session.handle_request(chain.readable, chain.writable))
            self.rig.vq.add_used(self.rig.memory, chain.head, n)
        order, replies = [], {}
        while (used := self.rig.drv.pop_used()) is not None:
            head, n, pieces = used
            order.append(head)
            replies[head] = (n, b"".join(pieces))
        return served, heads, order, replies

    def check(self, req: bytes, writable: list[int], **kw: Any) -> bool:
        """Offer ``req``; assert the guest got what the full path answers
        into a buffer of the same layout (for a WRITE: when it writes the
        same bytes again). Returns whether it was served."""
        served, n, reply = self.offer(req, writable, **kw)
        full_n, full_reply = self.mount.full(req, sum(writable))
        assert (n, reply) == (full_n, full_reply)
        return served

    def close(self) -> None:
        self.rig.close()
        self.mount.close()


def read_req(fh: int, offset: int, size: int, unique: int = 7, **kw: Any) -> bytes:
    return request(READ, 0, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), unique, **kw)


def linux_layout(size: int) -> list[int]:
    """How the guest driver lays out a READ reply: the header, then pages."""
    return [16] + [4096] * (size // 4096) + ([size % 4096] if size % 4096 else [])


@pytest.fixture
def reads(tmp_path: Any) -> Iterator[ReadRig]:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    try:
        from virtiofs_async import _cy_vring  # noqa: F401
    except ImportError as exc:
        need_compiled(exc, "virtiofs_async._cy_vring is")
    r = ReadRig(str(tmp_path), inline_read_max=1 << 20)
    yield r
    r.close()


def _resident_pages(path: str, offset: int, size: int) -> int:
    """How many of the pages of ``path`` covering ``offset``..+``size`` the
    page cache holds (mincore(2) on a fresh mapping; reads nothing)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    start = offset - offset % mmap.PAGESIZE
    length = offset + size - start
    vec = ctypes.create_string_buffer((length + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()
        try:
            assert libc.mincore(addr, length, vec) == 0, ctypes.get_errno()
        finally:
            libc.munmap(addr, length)
    finally:
        os.close(fd)
    return sum(b & 1 for b in vec.raw)


@pytest.mark.parametrize("offset, size, layout", [
    (0, 4096, None),
    (4096 * 3, 128 * 1024, None),
    (5, 1000, None),  # unaligned
    (0, 300 * 1024, [16 + 300 * 1024]),  # header and data in one buffer
    (100, 9000, [7, 9, 4000, 1, 4999, 300]),  # odd pieces, header split, spare room
])
def test_cached_reads_are_served_with_the_full_paths_bytes(reads: ReadRig, offset: int, size: int,
                                                           layout: list[int] | None) -> None:
    layout = layout or linux_layout(size)
    assert reads.check(read_req(reads.fh, offset, size, unique=4242), layout) is True
    _, _, reply = reads.offer(read_req(reads.fh, offset, size, unique=4242), layout)
    assert reply[:16] == abi.fuse_out_header.pack(16 + size, 0, 4242)
    assert reply[16:] == DATA[offset:offset + size]


@pytest.mark.parametrize("offset, size, layout", [
    (0, 256 * 1024, None),  # two threads copy from 256 KiB on: halves at a page boundary
    (3, 256 * 1024 + 7, None),
    (4096, 280 * 1024, [16 + 140 * 1024 - 5, 10, 140 * 1024 - 5]),  # the half falls inside a buffer
    (10, 256 * 1024, [16 + 128 * 1024 - 10, 128 * 1024 + 10]),  # ... at a buffer's start
])
def test_large_reads_split_across_two_threads_read_the_same_bytes(reads: ReadRig, offset: int, size: int,
                                                                  layout: list[int] | None) -> None:
    layout = layout or linux_layout(size)
    assert reads.check(read_req(reads.fh, offset, size), layout) is True
    _, _, reply = reads.offer(read_req(reads.fh, offset, size), layout)
    assert reply[16:] == DATA[offset:offset + size]
    assert "vfa-copy" in _thread_names()  # a helper did its half


def _huge(r: ReadRig, size: int) -> tuple[int, bytes]:
    """A file of ``size`` random bytes opened for reading: (fh, its bytes)."""
    data = os.urandom(size)
    with open(os.path.join(r.mount.root, "huge"), "wb") as f:
        f.write(data)
    return r.open(r.mount.lookup_via_session(abi.FUSE_ROOT_ID, b"huge"), os.O_RDONLY), data


@pytest.fixture
def batch_reads(tmp_path: Any) -> Iterator[ReadRig]:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    r = ReadRig(str(tmp_path), mem_size=16 << 20, inline_read_max=1 << 20)
    yield r
    r.close()


def test_large_reads_of_one_kick_are_copied_together(batch_reads: ReadRig) -> None:
    """READs of 64 KiB and more are left to the walk's batch and copied by
    several threads at once; each reply has the full path's bytes."""
    r = batch_reads
    fh, data = _huge(r, 5 << 20)
    spots = [(0, 1 << 20), (3 << 20, 1 << 20), (12345, 128 * 1024), (1 << 20, 64 * 1024), (7, 300 * 1024)]
    reqs = [(read_req(fh, off, size, unique=100 + i), linux_layout(size)) for i, (off, size) in enumerate(spots)]
    served, heads, _, replies = r.offer_many(reqs)
    assert served == len(spots)
    for i, (head, (off, size)) in enumerate(zip(heads, spots)):
        assert replies[head][0] == 16 + size
        assert replies[head][1][:16] == abi.fuse_out_header.pack(16 + size, 0, 100 + i)
        assert replies[head][1][16:] == data[off:off + size]
    assert "vfa-copy" in _thread_names()


def test_a_batch_stops_the_pop_at_4_mib(batch_reads: ReadRig) -> None:
    r = batch_reads
    fh, data = _huge(r, 6 << 20)
    reqs = [(read_req(fh, i << 20, 1 << 20, unique=i + 1), linux_layout(1 << 20)) for i in range(6)]
    served, heads, order, replies = r.offer_many(reqs)
    assert served == 4 and order == heads[:4]
    chains, served = r.rig.vq.pop_serving(r.rig.memory, 64, r.responder)  # the rest stayed in the ring
    assert (chains, served) == ([], 2)
    for i, head in enumerate(heads[4:], 4):
        got_head, n, pieces = r.rig.drv.pop_used()
        assert (got_head, n) == (head, 16 + (1 << 20))
        assert b"".join(pieces)[16:] == data[i << 20:(i + 1) << 20]


def test_deferred_reads_do_not_count_against_the_byte_budget(reads: ReadRig) -> None:
    small = [(read_req(reads.fh, i * 4096, 4096), linux_layout(4096)) for i in range(3)]
    assert reads.offer_many(small, budget=4096)[0] == 1  # copied at once: one per call, as before
    for _ in range(2):
        assert reads.rig.vq.pop_serving(reads.rig.memory, 64, reads.responder, 4096)[1] == 1
    while reads.rig.drv.pop_used() is not None:
        pass
    large = [(read_req(reads.fh, i * 65536, 65536), linux_layout(65536)) for i in range(3)]
    assert reads.offer_many(large, budget=4096)[0] == 3


def test_a_read_that_falls_short_in_a_batch_goes_to_the_full_path(batch_reads: ReadRig) -> None:
    r = batch_reads
    fh, data = _huge(r, 1 << 20)
    end = len(data)
    spots = [(0, 256 * 1024), (end - 100 * 1024, 256 * 1024), (512 * 1024, 256 * 1024)]
    reqs = [(read_req(fh, off, size, unique=i + 1), linux_layout(size)) for i, (off, size) in enumerate(spots)]
    served, heads, order, replies = r.offer_many(reqs)
    assert served == 2
    assert order == [heads[0], heads[2], heads[1]]  # the short one answered by the full path, after
    assert replies[heads[1]] == (16 + 100 * 1024, abi.fuse_out_header.pack(16 + 100 * 1024, 0, 2) + data[-100 * 1024:])
    assert replies[heads[0]][1][16:] == data[:256 * 1024]
    assert replies[heads[2]][1][16:] == data[512 * 1024:768 * 1024]


def test_nothing_else_is_answered_before_the_batch_is_copied(batch_reads: ReadRig) -> None:
    """A GETATTR after deferred READs waits for their copies (its reply
    comes after theirs); a RELEASE of the handle they read cannot close it
    under them."""
    r = batch_reads
    fh, data = _huge(r, 1 << 20)
    node = r.mount.lookup_via_session(abi.FUSE_ROOT_ID, b"huge")
    reqs = [(read_req(fh, 0, 128 * 1024, unique=1), linux_layout(128 * 1024)),
            (getattr_req(r.big, unique=2), [120]),
            (read_req(fh, 128 * 1024, 128 * 1024, unique=3), linux_layout(128 * 1024)),
            (request(int(abi.Opcode.RELEASE), node, abi.fuse_release_in.pack(fh, 0, 0, 0), unique=4), [16])]
    served, heads, order, replies = r.offer_many(reqs)
    assert order[:3] == heads[:3]
    assert replies[heads[0]][1][16:] == data[:128 * 1024]
    assert replies[heads[2]][1][16:] == data[128 * 1024:256 * 1024]
    assert replies[heads[1]] == r.mount.full(getattr_req(r.big, unique=2), 120)
    assert replies[heads[3]] == (16, abi.fuse_out_header.pack(16, 0, 4))
    assert fh not in r.mount.fs._handles  # released after the copies


def test_more_reads_than_a_batch_holds_run_in_several_batches(reads: ReadRig) -> None:
    spots = [(i * 5000, 65536) for i in range(40)]  # 40 jobs: the 33rd waits for the first 32 to be copied
    reqs = [(read_req(reads.fh, off, size, unique=i + 1), linux_layout(size)) for i, (off, size) in enumerate(spots)]
    served, heads, order, replies = reads.offer_many(reqs)
    assert served == 40 and order == heads
    for i, (off, size) in enumerate(spots):
        assert replies[heads[i]][1] == abi.fuse_out_header.pack(16 + size, 0, i + 1) + DATA[off:off + size]


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{tid}/comm") as f:
            names.append(f.read().strip())
    return names


def test_a_large_read_over_the_end_of_file_goes_to_the_full_path(reads: ReadRig) -> None:
    end = len(DATA)
    for offset in (end - 200 * 1024, end - 10 * 1024):  # short in the second half, in the first
        assert reads.check(read_req(reads.fh, offset, 256 * 1024), linux_layout(256 * 1024)) is False
        assert reads.offer(read_req(reads.fh, offset, 256 * 1024), linux_layout(256 * 1024))[1] == 16 + end - offset


def test_a_1mib_read_in_an_indirect_table(tmp_path: Any) -> None:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    with open(os.path.join(tmp_path, "huge"), "wb") as f:
        f.write(os.urandom(3 << 20))
    r = ReadRig(str(tmp_path), inline_read_max=1 << 20)
    try:
        fh = r.open(r.mount.lookup_via_session(abi.FUSE_ROOT_ID, b"huge"), os.O_RDONLY)
        assert r.check(read_req(fh, 1 << 20, 1 << 20), linux_layout(1 << 20)) is True
    finally:
        r.close()


def test_reads_the_responder_leaves_to_the_full_path(reads: ReadRig, tmp_path: Any) -> None:
    fh, end = reads.fh, len(DATA)
    wronly = reads.open(reads.big, os.O_WRONLY)
    d = reads.open(abi.FUSE_ROOT_ID, os.O_RDONLY | os.O_DIRECTORY, int(abi.Opcode.OPENDIR))
    released = reads.open(reads.big, os.O_RDONLY)
    n, _ = reads.mount.full(request(int(abi.Opcode.RELEASE), reads.big, abi.fuse_release_in.pack(released, 0, 0, 0)))
    assert n == 16
    cases = {
        "short at end of file": (read_req(fh, end - 100, 4096), linux_layout(4096)),
        "past the end": (read_req(fh, end + 1, 4096), linux_layout(4096)),
        "zero bytes": (read_req(fh, 0, 0), [16]),
        "over the negotiated max": (read_req(fh, 0, (1 << 20) + 4096), linux_layout((1 << 20) + 4096)),
        "offset beyond off_t": (read_req(fh, 1 << 63, 4096), linux_layout(4096)),
        "unknown fh": (read_req(987654, 0, 4096), linux_layout(4096)),
        "write-only handle": (read_req(wronly, 0, 4096), linux_layout(4096)),
        "directory handle": (read_req(d, 0, 4096), linux_layout(4096)),
        "released handle": (read_req(released, 0, 4096), linux_layout(4096)),
        "room short of the size": (read_req(fh, 0, 8192), linux_layout(4096)),
        "extension": (read_req(fh, 0, 4096, extlen=1), linux_layout(4096)),
        "len beyond the bytes": (read_req(fh, 0, 4096, len_delta=8), linux_layout(4096)),
    }
    for case, (req, layout) in cases.items():
        assert reads.check(req, layout) is False, case
    # and what the full path then said
    assert reads.offer(*cases["unknown fh"])[2][:16] == abi.fuse_out_header.pack(16, -errno.EBADF, 7)
    assert reads.offer(*cases["short at end of file"])[1] == 16 + 100


def test_evicted_reads_are_answered_right_either_way(reads: ReadRig) -> None:
    """A READ of pages the page cache dropped: RWF_NOWAIT fails with EAGAIN
    (then the full path reads) or, when the readahead it starts completes
    at once (a fast disk), reads them; the guest gets the right bytes
    either way, and once cached the READ is served."""
    path = os.path.join(reads.mount.root, "big")
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    assert _resident_pages(path, 200 * 1024, 64 * 1024) < 16, "POSIX_FADV_DONTNEED kept the pages"
    reads.check(read_req(reads.fh, 200 * 1024, 64 * 1024), linux_layout(64 * 1024))
    assert _resident_pages(path, 200 * 1024, 64 * 1024) == 16
    assert reads.check(read_req(reads.fh, 200 * 1024, 64 * 1024), linux_layout(64 * 1024)) is True


def test_inline_read_max_bounds_what_is_served(tmp_path: Any) -> None:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    for limit, size, served in ((8192, 8192, True), (8192, 8193, False), (0, 4096, False)):
        r = ReadRig(_fresh(tmp_path, f"{limit}-{size}"), inline_read_max=limit)
        try:
            assert r.check(read_req(r.fh, 0, size), linux_layout(size)) is served, (limit, size)
        finally:
            r.close()


def _fresh(tmp_path: Any, name: str) -> str:
    path = os.path.join(tmp_path, name)
    os.mkdir(path)
    return path


def test_metadata_replies_scatter_over_small_guest_buffers(reads: ReadRig) -> None:
    """GETATTR and LOOKUP through the C entry: the reply crosses the buffers
    as the guest laid them out."""
    assert reads.check(getattr_req(reads.big), [7, 100, 13]) is True
    assert reads.check(lookup_req(abi.FUSE_ROOT_ID, b"big"), [1] * 144) is True
    assert reads.check(getattr_req(reads.big), [7, 100, 12]) is False  # 119 bytes: no room


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, len(DATA) + 10),
    size=st.integers(0, 70_000),
    cuts=st.lists(st.integers(1, 70_016), max_size=6),
    spare=st.integers(0, 40),
)
def test_random_reads_agree_with_the_full_path(reads: ReadRig, offset: int, size: int, cuts: list[int],
                                               spare: int) -> None:
    room = 16 + size + spare
    points = sorted({c for c in cuts if c < room})
    layout = [b - a for a, b in zip([0] + points, points + [room])]
    served = reads.check(read_req(reads.fh, offset, size), layout)
    assert served == (size > 0 and offset + size <= len(DATA))


# -- WRITE answered at the queue (compiled twins only) -----------------------------------------

WRITE = int(abi.Opcode.WRITE)


def write_req(fh: int, offset: int, data: bytes, unique: int = 7, *, size: int | None = None, **kw: Any) -> bytes:
    body = abi.fuse_write_in.pack(fh, offset, len(data) if size is None else size, 0, 0, 0, 0) + data
    return request(WRITE, 0, body, unique, **kw)


def linux_write_cuts(size: int) -> list[int]:
    """How the guest driver lays out a WRITE: header, fuse_write_in, pages."""
    return [40, 40] + [4096] * (size // 4096) + ([size % 4096] if size % 4096 else [])


class WriteRig(ReadRig):
    """A ReadRig with file ``w`` (300 KiB of zeros) open read-write."""

    def __init__(self, root: str, **options: Any) -> None:
        with open(os.path.join(root, "w"), "wb") as f:
            f.write(bytes(300 * 1024))
        super().__init__(root, **options)
        self.w = self.mount.lookup_via_session(abi.FUSE_ROOT_ID, b"w")
        self.wfh = self.open(self.w, os.O_RDWR)
        self.path = os.path.join(root, "w")

    def content(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()


@pytest.fixture
def writes(tmp_path: Any) -> Iterator[WriteRig]:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    r = WriteRig(str(tmp_path), inline_write_max=128 * 1024)
    yield r
    r.close()


@pytest.mark.parametrize("offset, size, cuts", [
    (0, 4096, None),
    (1000, 128 * 1024, None),  # the fixture's inline_write_max
    (5, 777, [80 + 777]),  # one buffer
    (299 * 1024, 4096, [7, 33, 50, 4000, 86]),  # header split, data starting inside a buffer; grows the file
])
def test_writes_are_served_like_the_backends_write(writes: WriteRig, offset: int, size: int,
                                                   cuts: list[int] | None) -> None:
    data = os.urandom(size)
    before = writes.content()
    req = write_req(writes.wfh, offset, data, unique=99)
    served, n, reply = writes.offer(req, [16, 8], cuts or linux_write_cuts(size))
    assert served is True
    assert (n, reply) == (24, abi.fuse_out_header.pack(24, 0, 99) + abi.fuse_write_out.pack(size, 0))
    expected = bytearray(before)
    expected[offset:offset + size] = data
    assert writes.content() == bytes(expected)
    assert writes.mount.full(req, 24) == (n, reply)  # the full path, writing the same again


def test_writes_the_responder_leaves_to_the_full_path(writes: WriteRig) -> None:
    ro = writes.open(writes.w, os.O_RDONLY)
    released = writes.open(writes.w, os.O_RDWR)
    n, _ = writes.mount.full(request(int(abi.Opcode.RELEASE), writes.w, abi.fuse_release_in.pack(released, 0, 0, 0)))
    assert n == 16
    fh, data = writes.wfh, b"x" * 4096
    big = b"y" * (128 * 1024 + 4096)
    cases = {
        "over inline_write_max": (write_req(fh, 0, big), linux_write_cuts(len(big))),
        "zero bytes": (write_req(fh, 0, b""), [80]),
        "size says more": (write_req(fh, 0, data, size=4097), linux_write_cuts(4096)),
        "size says less": (write_req(fh, 0, data, size=4095), linux_write_cuts(4096)),
        "len beyond the bytes": (write_req(fh, 0, data, len_delta=8), linux_write_cuts(4096)),
        "extension": (write_req(fh, 0, data, extlen=1) , [40, 40, 4096 + 8]),
        "read-only handle": (write_req(ro, 0, data), linux_write_cuts(4096)),
        "unknown fh": (write_req(424242, 0, data), linux_write_cuts(4096)),
        "released handle": (write_req(released, 0, data), linux_write_cuts(4096)),
        "offset beyond off_t": (write_req(fh, 1 << 63, data), linux_write_cuts(4096)),
        "pwritev fails (EFBIG)": (write_req(fh, (1 << 63) - 100, data), linux_write_cuts(4096)),
    }
    for case, (req, cuts) in cases.items():
        before = writes.content()
        served, n, reply = writes.offer(req, [16, 8], cuts)
        assert served is False, case
        assert writes.mount.full(req, 24) == (n, reply), case
        if case == "zero bytes":
            assert reply == abi.fuse_out_header.pack(24, 0, 7) + abi.fuse_write_out.pack(0, 0)
        elif case != "over inline_write_max":
            assert abi.fuse_out_header.unpack_from(reply)[1] < 0, case  # the full path refused it too
            assert writes.content() == before, case
    assert writes.content()[:len(big)] == big  # the one the full path wrote


def test_a_non_root_write_is_served_unless_it_must_drop_suid(writes: WriteRig) -> None:
    data = b"u" * 4096
    os.chmod(writes.path, 0o4755)
    served, _, reply = writes.offer(write_req(writes.wfh, 0, data, uid=1000), [24], linux_write_cuts(4096))
    assert served is False and reply[16:20] == (4096).to_bytes(4, "little")
    assert os.stat(writes.path).st_mode & 0o7777 == 0o755  # the full path dropped it
    assert writes.check(write_req(writes.wfh, 0, data, uid=1000), [24], readable=linux_write_cuts(4096)) is True
    os.chmod(writes.path, 0o2740)  # sgid without group-exec stays: nothing to drop
    assert writes.check(write_req(writes.wfh, 0, data, uid=1000), [24], readable=linux_write_cuts(4096)) is True
    assert os.stat(writes.path).st_mode & 0o7777 == 0o2740
    os.chmod(writes.path, 0o2770)
    assert writes.check(write_req(writes.wfh, 0, data, uid=1000), [24], readable=linux_write_cuts(4096)) is False
    assert os.stat(writes.path).st_mode & 0o7777 == 0o770
    os.chmod(writes.path, 0o4755)
    assert writes.check(write_req(writes.wfh, 0, data), [24], readable=linux_write_cuts(4096)) is True  # root
    assert os.stat(writes.path).st_mode & 0o7777 == 0o4755


def test_a_1mib_write_at_the_default_inline_write_max(tmp_path: Any) -> None:
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    r = WriteRig(str(tmp_path))
    try:
        data = os.urandom(1 << 20)
        assert r.check(write_req(r.wfh, 4096, data), [24], readable=linux_write_cuts(1 << 20)) is True
        assert r.content()[4096:4096 + len(data)] == data
    finally:
        r.close()


def test_write_room_short_of_a_reply(writes: WriteRig) -> None:
    assert writes.offer(write_req(writes.wfh, 0, b"abc"), [23], [40, 43])[0] is False


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    offset=st.integers(0, 400_000),
    data=st.binary(min_size=0, max_size=20_000),
    cuts=st.lists(st.integers(1, 20_080), max_size=5),
)
def test_random_writes_land_where_the_full_path_puts_them(writes: WriteRig, offset: int, data: bytes,
                                                          cuts: list[int]) -> None:
    req = write_req(writes.wfh, offset, data)
    points = sorted({c for c in cuts if c < len(req)})
    layout = [b - a for a, b in zip([0] + points, points + [len(req)])]
    before = writes.content()
    served = writes.check(req, [16, 8], readable=layout)
    assert served == bool(data)
    expected = bytearray(before)
    if data:
        if len(expected) < offset:
            expected.extend(bytes(offset - len(expected)))
        expected[offset:offset + len(data)] = data
    assert writes.content() == bytes(expected)


# -- READDIR at the queue -------------------------------------------------------------

READDIR = int(abi.Opcode.READDIR)


def readdir_req(fh: int, offset: int, size: int, unique: int = 11, **kw: Any) -> bytes:
    return request(READDIR, 0, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), unique, **kw)


def _listing_dir(m: Mount, name: str, count: int) -> int:
    path = os.path.join(m.root, name)
    os.mkdir(path)
    for i in range(count):
        open(os.path.join(path, f"entry-{i:04d}-{'x' * (i % 13)}"), "w").close()
    return m.lookup_via_session(abi.FUSE_ROOT_ID, name.encode())


def _reading(fs: PassthroughFS, cls: type, host_calls: bool = False, **kw: Any) -> Any:
    """A responder answering READDIR through the backend's ``readdir``
    callback, or (``host_calls``) with the host calls the compiled twin
    makes itself."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, **{
        "read_max": 1 << 20, "readdir": fs._readdir_inline,
        "readdir_host": fs._readdir_host_config() if host_calls else None,
        "handles": fs._handles if host_calls else None, **kw})


def _readers(fs: PassthroughFS) -> list[tuple[type, bool]]:
    return [(cls, host_calls) for cls in _twins() for host_calls in (False, True)]


def _next_offset(reply: bytes) -> int | None:
    entries = list(codec.iter_dirents(reply[16:]))
    return entries[-1].off if entries else None


def test_readdir_at_the_queue_lists_what_the_full_path_lists(tmp_path: Any) -> None:
    """Each twin walks a directory in small replies on one handle while the
    full path walks it on another: every reply has the same bytes, and the
    walk ends with the same (empty) reply after every entry."""
    m = Mount(str(tmp_path))
    try:
        d = _listing_dir(m, "many", 150)
        for cls, host_calls in _readers(m.fs):
            r = _reading(m.fs, cls, host_calls)
            mine, theirs = _open_via_session(m, d, directory=True), _open_via_session(m, d, directory=True)
            offset, names, replies, offsets = 0, [], 0, []
            while True:
                size = 200 + 37 * (replies % 5)  # room left over at different places
                answer = r.respond(readdir_req(mine, offset, size), 512)
                n, full = m.full(readdir_req(theirs, offset, size), 512)
                assert answer is not None and answer == full
                replies += 1
                nxt = _next_offset(answer)
                if nxt is None:
                    break
                names += [e.name for e in codec.iter_dirents(answer[16:])]
                offset = nxt
                offsets.append(offset)
            assert sorted(names) == sorted([b".", b".."] + [n.encode() for n in os.listdir(os.path.join(m.root, "many"))])
            assert replies > 20
            # seekdir back to an earlier cookie: found by a scan of the last read
            for back in (offsets[3], offsets[-2]):
                answer = r.respond(readdir_req(mine, back, 300), 512)
                assert answer is not None and answer == m.full(readdir_req(theirs, back, 300), 512)[1]
            # rewinding reads the directory as it is now
            os.unlink(os.path.join(m.root, "many", "entry-0000-"))
            answer = r.respond(readdir_req(mine, 0, 480), 512)
            assert answer == m.full(readdir_req(theirs, 0, 480), 512)[1]
            open(os.path.join(m.root, "many", "entry-0000-"), "w").close()
    finally:
        m.close()


@pytest.mark.skipif(_cy_responder is None, reason="the compiled twin is not built")
def test_compiled_readdir_makes_the_host_calls_itself(tmp_path: Any, monkeypatch: Any) -> None:
    """Given the backend's readdir_host, the compiled twin answers a whole
    listing without calling ``readdir`` (and without the backend's
    ``_getdents_locked``), with the callback's bytes; without it, every
    READDIR goes through the callback."""
    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        d = _listing_dir(m, "calls", 300)
        calls: list[str] = []
        real_inline, real_locked = fs._readdir_inline, passthrough._getdents_locked
        monkeypatch.setattr(fs, "_readdir_inline", lambda *a: calls.append("readdir") or real_inline(*a))
        monkeypatch.setattr(passthrough, "_getdents_locked", lambda *a: calls.append("getdents") or real_locked(*a))
        for host_calls in (True, False):
            r = _reading(fs, _cy_responder.PassthroughResponder, host_calls)
            mine, theirs = _open_via_session(m, d, directory=True), _open_via_session(m, d, directory=True)
            calls.clear()
            offset, replies = 0, 0
            while True:
                answer = r.respond(readdir_req(mine, offset, 480), 512)
                assert answer == m.full(readdir_req(theirs, offset, 480), 512)[1]
                replies += 1
                offset = _next_offset(answer)
                if offset is None:
                    break
            if host_calls:
                assert calls.count("readdir") == 0
            else:
                assert calls.count("readdir") == replies
    finally:
        m.close()


def test_what_readdir_at_the_queue_leaves_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import _hostfs, passthrough

    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        d = _listing_dir(m, "few", 5)
        for cls, host_calls in _readers(fs):
            r = _reading(fs, cls, host_calls)
            dh = _open_via_session(m, d, directory=True)
            fh = _open_via_session(m, m.nodeids[b"f"])
            assert r.respond(readdir_req(dh, 0, 300), 512) is not None
            assert r.respond(readdir_req(dh + 1000, 0, 300), 512) is None  # unknown handle: EBADF there
            assert r.respond(readdir_req(fh, 0, 300), 512) is None  # not a directory: ENOTDIR there
            assert r.respond(readdir_req(dh, 1 << 63, 300), 512) is None  # no off_t: EINVAL there
            assert r.respond(readdir_req(dh, 0, 0), 512) is None
            assert r.respond(readdir_req(dh, 0, 497), 512) is None  # the reply could take 513 bytes
            assert r.respond(readdir_req(dh, 0, 300)[:-1], 512) is None  # short body
            assert r.respond(readdir_req(dh, 0, 300, extlen=1), 512) is None
            small = _reading(fs, cls, host_calls, read_max=256)
            assert small.respond(readdir_req(dh, 0, 257), 512) is None
            assert small.respond(readdir_req(dh, 0, 256), 512) is not None
            without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True, read_max=1 << 20)
            assert without.respond(readdir_req(dh, 0, 300), 512) is None
            # a filesystem whose namespace calls go to the pool
            with monkeypatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)
                assert r.respond(readdir_req(dh, 0, 300), 512) is None
            # a closed handle (RELEASEDIR on its way)
            with monkeypatch.context() as p:
                p.setattr(fs._handles[dh], "closed", True)
                assert r.respond(readdir_req(dh, 0, 300), 512) is None
            # a failing getdents64: nothing answered, and the full path,
            # which meets the same error, answers it
            first = r.respond(readdir_req(dh, 0, 120), 512)
            offset = _next_offset(first)
            with monkeypatch.context() as p, open(os.path.join(m.root, "f"), "rb") as not_a_dir:
                # the seek to the hash cookie (past a file's size limit)
                # gives EINVAL, or getdents64 ENOTDIR
                p.setattr(fs._handles[dh], "fd", not_a_dir.fileno())
                p.setattr(fs._handles[dh], "dir_raw", b"")  # nothing buffered: the host is asked
                assert r.respond(readdir_req(dh, offset, 300), 512) is None
                assert fs._handles[dh].dir_pos == -1
                n, reply = m.full(readdir_req(dh, offset, 300), 512)
                assert abi.fuse_out_header.unpack_from(reply)[1] in (-errno.EINVAL, -errno.ENOTDIR)
            # a corrupt getdents64 result: the same
            with monkeypatch.context() as p:
                def corrupt(*args: Any) -> bytes:
                    return b"\x01" * 30
                p.setattr(_hostfs, "getdents_raw", corrupt)
                if host_calls and cls is not pure.PassthroughResponder:
                    p.setattr(_cy_responder, "getdents_raw", corrupt)
                p.setattr(fs._handles[dh], "dir_raw", b"")
                assert r.respond(readdir_req(dh, offset, 300), 512) is None
                assert fs._handles[dh].dir_pos == -1
            # and then the listing goes on from there, as the full path's would
            other = _open_via_session(m, d, directory=True)
            m.full(readdir_req(other, 0, 120), 512)
            assert r.respond(readdir_req(dh, offset, 300), 512) == m.full(readdir_req(other, offset, 300), 512)[1]
    finally:
        m.close()


def test_readdir_replies_go_into_the_guests_buffers(reads: ReadRig) -> None:
    """The compiled entry point: a page-sized READDIR scattered over the
    guest's buffers as the driver laid them out (header, then a page; or
    smaller pieces), with the full path's bytes."""
    m = reads.mount
    d = _listing_dir(m, "paged", 400)
    for layout in ([16, 4096], [16, 100, 3996], [5, 4107]):
        mine, theirs = _open_via_session(m, d, directory=True), _open_via_session(m, d, directory=True)
        offset, pages = 0, 0
        while True:
            served, n, reply = reads.offer(readdir_req(mine, offset, 4096), layout)
            assert served
            full_n, full = m.full(readdir_req(theirs, offset, 4096), 4112)
            assert (n, reply[:n]) == (full_n, full)
            nxt = _next_offset(full)
            if nxt is None:
                break
            offset, pages = nxt, pages + 1
        assert pages >= 4
    # no room for the page it could fill: the full path answers it
    served, n, reply = reads.offer(readdir_req(_open_via_session(m, d, directory=True), 0, 4096), [16, 4000])
    assert not served


CREATE = int(abi.Opcode.CREATE)


def create_req(parent: int, name: bytes, mode: int = 0o100666, flags: int = os.O_WRONLY | os.O_CREAT | os.O_EXCL,
               umask: int = 0o022, unique: int = 13, **kw: Any) -> bytes:
    return request(CREATE, parent, abi.fuse_create_in.pack(flags, mode, umask, 0) + name + b"\0", unique, **kw)


def _on_own_fs(fn: Any, *args: Any) -> None:
    """``fn(*args)`` on a thread whose umask is its own, as the daemon's
    loop thread is (else creates go to the pool and are not answered)."""
    from virtiofs_async.backends import _hostfs

    failed: list[BaseException] = []

    def run() -> None:
        try:
            assert _hostfs.claim_private_fs()
            fn(*args)
        except BaseException as exc:
            failed.append(exc)

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if failed:
        raise failed[0]


def _creating(fs: PassthroughFS, cls: type) -> Any:
    """A responder that answers CREATE as the backend builds it (the
    compiled twin makes the host calls itself where it can)."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, create=fs._create_inline,
               proc_fd=fs._proc_fd, create_host=fs._create_host_config())


def _created(m: Mount, reply: bytes, name: bytes, parent: int = abi.FUSE_ROOT_ID) -> int:
    """Check a CREATE reply against the tables and the host; returns its fh:
    its entry is what a LOOKUP of the name answers now, its handle is
    installed and its inode counts one lookup more than before that LOOKUP."""
    assert len(reply) == 160 and abi.fuse_out_header.unpack_from(reply)[:2] == (160, 0)
    entry = reply[16:144]
    nodeid = abi.fuse_entry_out.unpack_from(entry)[0]
    assert m.fs._inodes[nodeid].lookups == 1
    n, looked_up = m.full(lookup_req(parent, name))
    assert looked_up[16:] == entry  # nodeid, generation, timeouts, attributes
    m.fs._inodes[nodeid].lookups -= 1
    fh, open_flags, _ = abi.fuse_open_out.unpack_from(reply, 144)
    assert m.fs._handles[fh].node is m.fs._inodes[nodeid] and m.fs._handles[fh].writable
    return fh


def test_create_at_the_queue_does_what_the_full_path_does(tmp_path: Any) -> None:
    """Each twin creates the file as the full path would: the same mode
    (umask applied only where the backend handles it), the entry a LOOKUP
    then gives, a writable handle with the full path's FOPEN flags, one
    lookup counted; O_EXCL on an existing name gets the full path's EEXIST
    reply; the handle releases through the full path, leaving no fd."""
    _on_own_fs(_check_creates, tmp_path)


def _check_creates(tmp_path: Any) -> None:
    for options in ({}, {"posix_acl": True}):
        root = _fresh(tmp_path, f"create-{len(options)}")
        m = Mount(root, **options)
        try:
            fs = m.fs
            fds = fs.held_fds()
            n, theirs = m.full(create_req(abi.FUSE_ROOT_ID, b"by-full-path"))
            full_fh = _created(m, theirs, b"by-full-path")
            for k, cls in enumerate(_twins()):
                name = b"by-twin-%d" % k
                reply = _creating(fs, cls).respond(create_req(abi.FUSE_ROOT_ID, name), 512)
                fh = _created(m, reply, name)
                assert reply[144:148] != theirs[144:148] and reply[148:] == theirs[148:]  # another fh, same flags
                mine, full = os.lstat(os.path.join(root, name.decode())), os.lstat(os.path.join(root, "by-full-path"))
                assert stat.S_IMODE(mine.st_mode) == stat.S_IMODE(full.st_mode) == (0o644 if options else 0o666)
                os.write(fs._handles[fh].fd, b"written")
                assert open(os.path.join(root, name.decode()), "rb").read() == b"written"
                again = _creating(fs, cls).respond(create_req(abi.FUSE_ROOT_ID, name, unique=21), 512)
                assert again == m.full(create_req(abi.FUSE_ROOT_ID, name, unique=21))[1]
                assert again == abi.fuse_out_header.pack(16, -errno.EEXIST, 21)
                assert m.full(release_req(fh))[1] == abi.fuse_out_header.pack(16, 0, 9)
            m.full(release_req(full_fh))
            assert fs.held_fds() == fds + len(_twins()) + 1  # one O_PATH fd per inode the guest still knows
        finally:
            m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating as another user needs root")
def test_create_at_the_queue_creates_as_the_caller(tmp_path: Any) -> None:
    _on_own_fs(_check_owners, tmp_path)


def _check_owners(tmp_path: Any) -> None:
    root = _fresh(tmp_path, "owners")
    os.chmod(root, 0o777)
    m = Mount(root)
    try:
        for k, cls in enumerate(_twins()):
            name = b"owned-%d" % k
            reply = _creating(m.fs, cls).respond(create_req(abi.FUSE_ROOT_ID, name, uid=4321), 512)
            _created(m, reply, name)
            st_ = os.lstat(os.path.join(root, name.decode()))
            assert (st_.st_uid, st_.st_gid) == (4321, 4321)
            assert abi.fuse_attr.unpack_from(reply, 16 + 40)[11:13] == (4321, 4321)
    finally:
        m.close()


def test_what_create_at_the_queue_leaves_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    _on_own_fs(_check_create_declines, tmp_path, monkeypatch)
    # a thread whose umask the process shares: the full path creates in the pool
    m = Mount(_fresh(tmp_path, "shared-umask"))
    try:
        for cls in _twins():
            assert _creating(m.fs, cls).respond(create_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
        assert not os.path.exists(os.path.join(m.root, "new"))
    finally:
        m.close()


def _check_create_declines(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import passthrough

    root = _fresh(tmp_path, "declines")
    m = Mount(root)
    try:
        fs = m.fs
        fh = _open_via_session(m, m.nodeids[b"f"])
        for cls in _twins():
            r = _creating(fs, cls)
            before = sorted(os.listdir(root)), fs.held_fds(), m.counts(), dict(fs._handles)
            for name in (b".", b"..", b"a/b", b"x" * 256, b"a\0b"):
                assert r.respond(create_req(abi.FUSE_ROOT_ID, name), 512) is None, name
            assert r.respond(request(CREATE, 1, abi.fuse_create_in.pack(0o1, 0o100644, 0, 0) + b"\0"), 512) is None
            assert r.respond(create_req(abi.FUSE_ROOT_ID, b"new")[:-1], 512) is None  # no NUL
            assert r.respond(create_req(abi.FUSE_ROOT_ID, b"new", extlen=1), 512) is None  # supplementary groups
            assert r.respond(create_req(abi.FUSE_ROOT_ID, b"new"), 159) is None  # no room for the reply
            assert r.respond(create_req(m.nodeids[b"f"], b"new"), 512) is None  # not a directory: ENOTDIR there
            assert r.respond(create_req(999_999, b"new"), 512) is None  # unknown parent
            with monkeypatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)  # namespace calls in the pool
                assert r.respond(create_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
            with monkeypatch.context() as p:
                p.setattr(fs, "readonly", True)
                assert r.respond(create_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
            without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
            assert without.respond(create_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
            assert (sorted(os.listdir(root)), fs.held_fds(), m.counts(), dict(fs._handles)) == before
        # the host refuses: the full path's errno, nothing left behind
        os.chmod(os.path.join(root, "d"), 0o500)
        try:
            for cls in _twins():
                req = create_req(m.nodeids[b"d"], b"refused", uid=4321)
                if os.geteuid() == 0:
                    assert _creating(fs, cls).respond(req, 512) == m.full(req)[1] == abi.fuse_out_header.pack(
                        16, -errno.EACCES, 13)
                assert not os.path.exists(os.path.join(root, "d", "refused"))
        finally:
            os.chmod(os.path.join(root, "d"), 0o755)
        m.full(release_req(fh))
    finally:
        m.close()


def test_the_compiled_twin_makes_create_and_setattr_host_calls_itself(tmp_path: Any, monkeypatch: Any) -> None:
    """Given the backend's /proc/self/fd and create_host, the compiled twin
    creates and changes attributes without the backend's Python host calls
    (open_beneath, _w_setattr), with the full path's results; without them
    it goes through those calls."""
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    _on_own_fs(_check_compiled_host_calls, tmp_path, monkeypatch)


def _check_compiled_host_calls(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import _hostfs as hostfs

    m = Mount(_fresh(tmp_path, "host-calls"))
    try:
        fs = m.fs
        calls: list[str] = []
        real_open, real_setattr = hostfs.open_beneath, fs._w_setattr
        monkeypatch.setattr(hostfs, "open_beneath", lambda *a: calls.append("open") or real_open(*a))
        monkeypatch.setattr(fs, "_w_setattr", lambda *a: calls.append("setattr") or real_setattr(*a))
        for name in ("_adopt", "_new_handle"):
            real = getattr(fs, name)
            monkeypatch.setattr(fs, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
        cls = _cy_responder.PassthroughResponder
        for host_calls, tables in ((True, True), (True, False), (False, False)):
            name = b"made-%d-%d" % (host_calls, tables)
            r = cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True,
                    create=fs._create_inline, setattr=fs._setattr_inline,
                    proc_fd=fs._proc_fd if host_calls else -1,
                    create_host=fs._create_host_config() if host_calls else None,
                    adopt=fs._adopt, drop=fs._maybe_drop, tables=fs._tables_config() if tables else None)
            calls.clear()
            fh = _created(m, r.respond(create_req(abi.FUSE_ROOT_ID, name), 512), name)
            # the inode installed as the backend does: one lookup, the host inode number as node id
            node = fs._handles[fh].node
            assert node.lookups == 1 and node.nodeid == os.lstat(os.path.join(m.root, name.decode())).st_ino
            assert fs._by_key[node.key] is node and fs._inodes[node.nodeid] is node
            nodeid = m.lookup_via_session(abi.FUSE_ROOT_ID, name)
            assert nodeid == node.nodeid
            answer = r.respond(setattr_req(nodeid, abi.FATTR_MODE, mode=0o100604), 512)
            # (the full path's LOOKUP finds the inode: no adopt)
            want = [] if tables else ["_adopt", "_new_handle"] if host_calls else \
                ["open", "_adopt", "_new_handle", "setattr"]
            assert calls == want, calls
            assert stat.S_IMODE(os.lstat(os.path.join(m.root, name.decode())).st_mode) == 0o604
            assert _without_ctime(answer) == _without_ctime(m.full(setattr_req(nodeid, abi.FATTR_MODE,
                                                                                mode=0o100604))[1])
            m.full(release_req(fh))
    finally:
        m.close()


def test_the_compiled_twin_installs_created_handles_as_the_backend_does(tmp_path: Any) -> None:
    """Given the tables and create_host, the compiled twin installs the
    new file's handle itself: for each cache policy, open mode and flag
    that decides something (O_DIRECT allowed or not, O_SYNC, O_DSYNC) and
    with the inline read/write limits at 0 or not, the same handle fields,
    handle numbers, open counts and FOPEN flags as the backend's
    ``_new_handle`` (the callback path, without the tables)."""
    need_compiled(_MISSING, "virtiofs_async._cy_responder is")
    _on_own_fs(_check_handle_parity, tmp_path)


def _check_handle_parity(tmp_path: Any) -> None:
    m = Mount(_fresh(tmp_path, "handles"))
    try:
        fs = m.fs
        cls = _cy_responder.PassthroughResponder
        seen = set()
        k = 0
        for policy in ("auto", "always", "never", "metadata"):
            for direct_ok in (False, True):
                for limits in (True, False):
                    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY, os.O_WRONLY | os.O_DIRECT,
                                  os.O_RDWR | os.O_SYNC, os.O_WRONLY | os.O_DSYNC):
                        fs.cache, fs.allow_direct_io = policy, direct_ok
                        fs.inline_read_max, fs.inline_write_max = (1 << 20, 1 << 20) if limits else (0, 0)
                        made = []
                        for tables in (True, False):
                            r = cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True,
                                    create=fs._create_inline, proc_fd=fs._proc_fd,
                                    create_host=fs._create_host_config(), adopt=fs._adopt, drop=fs._maybe_drop,
                                    tables=fs._tables_config() if tables else None)
                            name = b"h-%d-%d" % (k, tables)
                            next_fh = fs._next_fh
                            reply = r.respond(create_req(abi.FUSE_ROOT_ID, name, flags=flags | os.O_CREAT | os.O_EXCL),
                                              512)
                            assert reply is not None and len(reply) == 160, (policy, flags, reply)
                            fh, open_flags, _ = abi.fuse_open_out.unpack_from(reply, 144)
                            assert fh == next_fh and fs._next_fh == next_fh + 1
                            h = fs._handles[fh]
                            assert h.fh == fh and h.fd >= 0 and h.node.opens == 1 and h.node.lookups == 1
                            assert not h.is_dir and not h.closed and h.pins == 0
                            assert (h.dir_pos, h.dir_raw, h.dir_read_from, h.dir_hint) == (-1, b"", -1, None)
                            assert h.lock.acquire(blocking=False)
                            h.lock.release()
                            made.append((open_flags, h.writable, h.nowait_read, h.inline_write))
                            m.full(release_req(fh))
                        assert made[0] == made[1], (policy, direct_ok, limits, flags, made)
                        seen.add(made[0])
                        k += 1
        # the matrix moves every field both ways
        for i in range(4):
            assert len({v[i] for v in seen}) > 1, (i, seen)
        assert {v[0] for v in seen} >= {0, abi.FOPEN_DIRECT_IO, abi.FOPEN_KEEP_CACHE}
    finally:
        m.close()


def test_create_replies_go_into_the_guests_buffers(reads: ReadRig) -> None:
    """The compiled entry point answers CREATE (the backend's responder has
    the callback) across the buffers as the guest laid them out, and leaves
    it to the full path when the reply does not fit."""
    _on_own_fs(_check_ring_creates, reads)


def _check_ring_creates(reads: ReadRig) -> None:
    m = reads.mount
    served, n, reply = reads.offer(create_req(abi.FUSE_ROOT_ID, b"through-the-ring"), [16, 144])
    assert served and n == 160
    _created(m, reply[:n], b"through-the-ring")
    served, n, reply = reads.offer(create_req(abi.FUSE_ROOT_ID, b"split"), [7, 100, 53])
    assert served and n == 160
    _created(m, reply[:n], b"split")
    served, n, reply = reads.offer(create_req(abi.FUSE_ROOT_ID, b"cramped"), [16, 100])
    # the full path's answer to a reply room the guest made too small
    assert not served and abi.fuse_out_header.unpack_from(reply)[1] == -errno.EIO


SETATTR = int(abi.Opcode.SETATTR)


def setattr_req(nodeid: int, valid: int, *, fh: int = 0, size: int = 0, times: tuple[int, int] = (0, 0),
                mode: int = 0, owner: tuple[int, int] = (0, 0), unique: int = 17, **kw: Any) -> bytes:
    u64 = (1 << 64) - 1  # times go as the kernel sends them: two's complement
    body = abi.fuse_setattr_in.pack(valid, 0, fh, size, 0, times[0] & u64, times[1] & u64, 0, 5, 6, 0, mode, 0, *owner, 0)
    return request(SETATTR, nodeid, body, unique, **kw)


def _without_ctime(attr_reply: bytes) -> bytes:
    """A SETATTR reply but its ctime (fuse_attr at 32: ctime at 40, ctimensec at 56)."""
    return attr_reply[:72] + attr_reply[80:88] + attr_reply[92:]


def _setting(fs: PassthroughFS, cls: type, proc_fd: bool = True) -> Any:
    """A responder that answers SETATTR (the compiled twin makes the host
    calls itself with ``proc_fd``, as the backend builds it)."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, setattr=fs._setattr_inline,
               proc_fd=fs._proc_fd if proc_fd else -1)


def test_setattr_at_the_queue_does_what_the_full_path_does(tmp_path: Any) -> None:
    """Each twin changes mode, owner and times as the full path does and
    answers with the bytes the full path gives for the same request right
    after (it changes nothing more then); truncation, unknown inodes and short requests go to the full path."""
    m = Mount(_fresh(tmp_path, "setattr"))
    try:
        fs = m.fs
        f = m.nodeids[b"f"]
        path = os.path.join(m.root, "f")
        for k, cls in enumerate(_twins()):
            r = _setting(fs, cls)
            cases = [
                (abi.FATTR_MODE, {"mode": 0o100600 + k}),
                (abi.FATTR_UID | abi.FATTR_GID, {"owner": (1234 + k, 4321)}),
                (abi.FATTR_ATIME | abi.FATTR_MTIME, {"times": (1_000_000 + k, -20 - k)}),
            ]
            for valid, kw in cases:
                req = setattr_req(f, valid, **kw)
                answer = r.respond(req, 512)
                assert answer is not None and len(answer) == 120
                assert _without_ctime(answer) == _without_ctime(m.full(req)[1])  # the full path's change is a new ctime
            st_ = os.lstat(path)
            assert stat.S_IMODE(st_.st_mode) == 0o600 + k and (st_.st_uid, st_.st_gid) == (1234 + k, 4321)
            assert (st_.st_atime_ns, st_.st_mtime_ns) == ((1_000_000 + k) * 10**9 + 5, (-20 - k) * 10**9 + 6)
            # declined, nothing changed
            before = os.lstat(path)
            assert r.respond(setattr_req(f, abi.FATTR_SIZE | abi.FATTR_MODE, size=1, mode=0o100644), 512) is None
            assert r.respond(setattr_req(999_999, abi.FATTR_MODE, mode=0o100644), 512) is None
            assert r.respond(setattr_req(f, abi.FATTR_MODE, mode=0o100644)[:-1], 512) is None
            assert r.respond(setattr_req(f, abi.FATTR_MODE, mode=0o100644), 119) is None
            assert r.respond(setattr_req(f, abi.FATTR_MODE, mode=0o100644, extlen=1), 512) is None
            assert r.respond(setattr_req(m.nodeids[b"s"], abi.FATTR_MODE, mode=0o120644), 512) is None
            assert os.lstat(path) == before
        # times far from now, as the full path sets them
        req = setattr_req(f, abi.FATTR_ATIME | abi.FATTR_MTIME, times=(1 << 40, -(1 << 33)))
        for cls in _twins():
            assert _without_ctime(_setting(fs, cls).respond(req, 512)) == _without_ctime(m.full(req)[1])
    finally:
        m.close()


def _kill_req(nodeid: int, fh: int | None = None) -> bytes:
    """SETATTR of the mtime with FATTR_KILL_SUIDGID (what a guest's write by
    a non-owner asks with HANDLE_KILLPRIV_V2), through a handle if ``fh``."""
    valid = abi.FATTR_MTIME | abi.FATTR_KILL_SUIDGID | (abi.FATTR_FH if fh is not None else 0)
    return setattr_req(nodeid, valid, fh=fh or 0, times=(0, 1_600_000_000))


def test_setattr_at_the_queue_drops_suid_and_sgid_as_the_full_path_does(tmp_path: Any) -> None:
    """FATTR_KILL_SUIDGID on a regular file (by node id, and through a
    handle of it): each twin, with and without making the host calls
    itself, drops setuid and, with group execute, setgid, and answers the
    full path's bytes; a directory keeps its bits; FATTR_ATIME_NOW and
    FATTR_MTIME_NOW set the host's times to now."""
    m = Mount(_fresh(tmp_path, "kill"))
    try:
        fs = m.fs
        f, d = m.nodeids[b"f"], m.nodeids[b"d"]
        path, dpath = os.path.join(m.root, "f"), os.path.join(m.root, "d")
        fh = _open_via_session(m, f)
        for cls in _twins():
            for with_fd in (True, False):
                for start, expected, handle in ((0o6755, 0o755, None), (0o6745, 0o2745, fh), (0o4644, 0o644, fh)):
                    r = _setting(fs, cls, with_fd)
                    os.chmod(path, start)
                    answer = r.respond(_kill_req(f, handle), 512)
                    assert stat.S_IMODE(os.lstat(path).st_mode) == expected, (cls, with_fd, oct(start))
                    os.chmod(path, start)
                    assert _without_ctime(answer) == _without_ctime(m.full(_kill_req(f, handle))[1])
                os.chmod(dpath, 0o6755)
                r.respond(_kill_req(d), 512)
                assert stat.S_IMODE(os.lstat(dpath).st_mode) == 0o6755
                os.chmod(dpath, 0o755)
                before = os.lstat(path)
                now = abi.FATTR_ATIME | abi.FATTR_ATIME_NOW | abi.FATTR_MTIME | abi.FATTR_MTIME_NOW
                answer = r.respond(setattr_req(f, now, times=(1, 1)), 512)
                after = os.lstat(path)
                assert answer is not None and len(answer) == 120
                assert after.st_mtime_ns >= before.st_mtime_ns and after.st_mtime_ns > 10**18
                assert struct.unpack_from("<QQ", answer, 56) == (after.st_atime_ns // 10**9, after.st_mtime_ns // 10**9)
    finally:
        m.close()


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IMMUTABLE_FL = 0x80086601, 0x40086602, 0x10


def _set_immutable(path: str, on: bool) -> None:
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        flags = bytearray(8)
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, flags)
        value = struct.unpack("<q", flags)[0]
        value = value | FS_IMMUTABLE_FL if on else value & ~FS_IMMUTABLE_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<q", value))
    finally:
        os.close(fd)


def test_setattr_at_the_queue_answers_the_hosts_refusal(tmp_path: Any, caplog: Any) -> None:
    """The host refuses (an immutable file: EPERM even for root): each twin
    answers the full path's errno, logs it, changes nothing, and keeps
    answering afterwards."""
    m = Mount(_fresh(tmp_path, "refused"))
    path = os.path.join(m.root, "f")
    try:
        fs = m.fs
        f = m.nodeids[b"f"]
        try:
            _set_immutable(path, True)
        except OSError as exc:
            pytest.fail(f"tmp_path's filesystem has no immutable flag ({exc}): the test needs one (ext4, xfs, btrfs)")
        before = os.lstat(path)
        for valid, kw in ((abi.FATTR_MODE, {"mode": 0o100600}), (abi.FATTR_UID, {"owner": (7, 0)}),
                          (abi.FATTR_MTIME, {"times": (0, 5)})):
            req = setattr_req(f, valid, **kw)
            expected = m.full(req)[1]
            assert expected == abi.fuse_out_header.pack(16, -errno.EPERM, 17)
            for cls in _twins():
                caplog.clear()
                with caplog.at_level(logging.INFO):
                    assert _setting(fs, cls).respond(req, 512) == expected
                assert any("SETATTR" in r.getMessage() and "EPERM" in r.getMessage() for r in caplog.records)
        assert os.lstat(path) == before
        _set_immutable(path, False)
        for cls in _twins():
            assert len(_setting(fs, cls).respond(setattr_req(f, abi.FATTR_MODE, mode=0o100640), 512)) == 120
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o640
    finally:
        with contextlib.suppress(OSError):
            _set_immutable(path, False)
        m.close()


# -- UNLINK, RMDIR, OPEN and OPENDIR at the queue ----------------------------------------------------------

UNLINK, RMDIR = int(abi.Opcode.UNLINK), int(abi.Opcode.RMDIR)
OPEN, OPENDIR = int(abi.Opcode.OPEN), int(abi.Opcode.OPENDIR)


def remove_req(parent: int, name: bytes, directory: bool = False, unique: int = 17, **kw: Any) -> bytes:
    return request(RMDIR if directory else UNLINK, parent, name + b"\0", unique, **kw)


def open_req(nodeid: int, flags: int, directory: bool = False, unique: int = 19, **kw: Any) -> bytes:
    return request(OPENDIR if directory else OPEN, nodeid, abi.fuse_open_in.pack(flags, 0), unique, **kw)


def _removing(fs: PassthroughFS, cls: type, host_calls: bool = False) -> Any:
    """A responder answering UNLINK and RMDIR through the backend's
    ``remove`` callback, or (``host_calls``) with the checks and unlinkat
    the compiled twin makes itself (given as the backend gives them)."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, remove=fs._remove_inline,
               readdir=fs._readdir_inline if host_calls else None, handles=fs._handles if host_calls else None,
               readdir_host=fs._readdir_host_config() if host_calls else None,
               remove_host=None if not host_calls or fs.readonly else passthrough._FAST_DROP_BYTES)


def _opening(fs: PassthroughFS, cls: type) -> Any:
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, open=fs._open_inline)


def _host_state(m: Mount) -> tuple[Any, ...]:
    listing = sorted((d, sorted(f)) for d, _, f in os.walk(m.root))
    return listing, m.fs.held_fds(), m.counts(), dict(m.fs._handles)


def test_unlink_and_rmdir_at_the_queue_do_what_the_full_path_does(tmp_path: Any, monkeypatch: Any) -> None:
    """Each twin removes a file and an empty directory as the full path
    would (the inode the guest still knows stays in the tables until its
    FORGET), and answers a failing removal with the full path's bytes; the
    compiled one given remove_host without the backend's callback."""
    root = _fresh(tmp_path, "remove")
    m = Mount(root)
    try:
        fs = m.fs
        calls: list[bytes] = []
        real = fs._remove_inline
        monkeypatch.setattr(fs, "_remove_inline", lambda parent, name, is_dir: calls.append(name)
                            or real(parent, name, is_dir))
        for k, (cls, host_calls) in enumerate(_readers(fs)):
            r = _removing(fs, cls, host_calls)
            calls.clear()
            open(os.path.join(root, f"file-{k}"), "wb").close()
            os.mkdir(os.path.join(root, f"dir-{k}"))
            known = m.lookup_via_session(abi.FUSE_ROOT_ID, b"file-%d" % k)
            before = m.counts()
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"file-%d" % k), 16) == abi.fuse_out_header.pack(16, 0, 17)
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"dir-%d" % k, True), 16) == abi.fuse_out_header.pack(
                16, 0, 17)
            assert not os.path.lexists(os.path.join(root, f"file-{k}"))
            assert not os.path.lexists(os.path.join(root, f"dir-{k}"))
            assert m.counts() == before and fs._inodes[known].fd >= 0
            for req, err in [
                (remove_req(abi.FUSE_ROOT_ID, b"missing"), errno.ENOENT),
                (remove_req(abi.FUSE_ROOT_ID, b"d", True), errno.ENOTEMPTY),
                (remove_req(abi.FUSE_ROOT_ID, b"d"), errno.EISDIR),
                (remove_req(abi.FUSE_ROOT_ID, b"f", True), errno.ENOTDIR),
            ]:
                state = _host_state(m)
                mine = r.respond(req, 16)
                assert mine == abi.fuse_out_header.pack(16, -err, 17), (req, mine)
                assert _host_state(m) == state
                assert m.full(req)[1] == mine
            compiled_host = host_calls and cls is not pure.PassthroughResponder
            assert len(calls) == (0 if compiled_host else 6), calls  # the 2 removals and the 4 failures
    finally:
        m.close()


def test_what_unlink_and_rmdir_at_the_queue_leave_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import passthrough

    root = _fresh(tmp_path, "remove-declines")
    m = Mount(root)
    try:
        fs = m.fs
        with open(os.path.join(root, "large"), "wb") as f:
            f.truncate(passthrough._FAST_DROP_BYTES * 2)
            os.posix_fallocate(f.fileno(), 0, passthrough._FAST_DROP_BYTES * 2)
        for cls, host_calls in _readers(fs):
            r = _removing(fs, cls, host_calls)
            state = _host_state(m)
            for name in (b".", b"..", b"a/b", b"x" * 256, b"a\0b", b""):
                assert r.respond(remove_req(abi.FUSE_ROOT_ID, name), 16) is None, name
                assert r.respond(remove_req(abi.FUSE_ROOT_ID, name, True), 16) is None, name
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"f")[:-1], 16) is None  # no NUL
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"f", extlen=1), 16) is None
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"f"), 15) is None  # no room for the reply
            assert r.respond(remove_req(m.nodeids[b"f"], b"x"), 16) is None  # not a directory
            assert r.respond(remove_req(999_999, b"f"), 16) is None  # unknown parent
            assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"large"), 16) is None  # its last link frees 2 MiB
            with monkeypatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)  # namespace calls in the pool
                assert r.respond(remove_req(abi.FUSE_ROOT_ID, b"f"), 16) is None
            with monkeypatch.context() as p:
                p.setattr(fs, "readonly", True)  # (a responder is made for a share as it is)
                assert _removing(fs, cls, host_calls).respond(remove_req(abi.FUSE_ROOT_ID, b"f"), 16) is None
            without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
            assert without.respond(remove_req(abi.FUSE_ROOT_ID, b"f"), 16) is None
            assert _host_state(m) == state
    finally:
        m.close()


def _opened(m: Mount, reply: bytes, theirs: bytes, nodeid: int, directory: bool) -> int:
    """Check an OPEN(DIR) reply against the full path's: another handle with
    the same FOPEN flags, installed on the inode; returns its fh."""
    assert len(reply) == 32 and abi.fuse_out_header.unpack_from(reply)[:2] == (32, 0)
    fh, open_flags, _ = abi.fuse_open_out.unpack_from(reply, 16)
    assert reply[8:16] == theirs[8:16] and reply[24:] == theirs[24:]  # unique, FOPEN flags, padding
    h = m.fs._handles[fh]
    assert h.node is m.fs._inodes[nodeid] and h.is_dir is directory
    return fh


def test_open_and_opendir_at_the_queue_do_what_the_full_path_does(tmp_path: Any) -> None:
    for options in ({}, {"cache": "always"}, {"writeback": True}):
        root = _fresh(tmp_path, "open-%s" % "-".join(options))
        m = Mount(root, **options)
        try:
            fs = m.fs
            fds = fs.held_fds()
            f, d = m.nodeids[b"f"], m.nodeids[b"d"]
            for cls in _twins():
                r = _opening(fs, cls)
                for flags in (os.O_RDONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR):
                    theirs = m.full(open_req(f, flags))[1]
                    fh = _opened(m, r.respond(open_req(f, flags), 32), theirs, f, False)
                    full_fh = abi.fuse_open_out.unpack_from(theirs, 16)[0]
                    mine, full = fs._handles[fh], fs._handles[full_fh]
                    assert (mine.writable, mine.nowait_read, mine.inline_write) == (
                        full.writable, full.nowait_read, full.inline_write)
                    assert fcntl_flags(mine.fd) == fcntl_flags(full.fd)
                    if fcntl_flags(mine.fd) & os.O_ACCMODE != os.O_WRONLY:
                        assert os.pread(mine.fd, 5, 0) == b"hello"
                    m.full(release_req(fh))
                    m.full(release_req(full_fh))
                theirs = m.full(open_req(d, os.O_RDONLY | os.O_DIRECTORY, True))[1]
                fh = _opened(m, r.respond(open_req(d, os.O_RDONLY | os.O_DIRECTORY, True), 32), theirs, d, True)
                full_fh = abi.fuse_open_out.unpack_from(theirs, 16)[0]
                assert sorted(os.listdir(fs._handles[fh].fd)) == ["g"]
                m.full(release_req(fh, True))
                m.full(release_req(full_fh, True))
            assert fs.held_fds() == fds
        finally:
            m.close()


def fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def test_a_failing_open_at_the_queue_gets_the_full_paths_errno(tmp_path: Any, monkeypatch: Any) -> None:
    m = Mount(_fresh(tmp_path, "open-fails"))
    try:
        fs = m.fs

        def refuse(pfd: int, oflags: int) -> int:
            raise OSError(errno.EACCES, "refused")

        monkeypatch.setattr(fs, "_w_open", refuse)
        for cls in _twins():
            r = _opening(fs, cls)
            state = _host_state(m)
            for req in (open_req(m.nodeids[b"f"], os.O_RDONLY), open_req(m.nodeids[b"d"], os.O_RDONLY, True)):
                mine = r.respond(req, 32)
                assert mine == abi.fuse_out_header.pack(16, -errno.EACCES, 19)
                assert m.full(req)[1] == mine
            assert _host_state(m) == state
    finally:
        m.close()


def test_what_open_at_the_queue_leaves_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import passthrough

    m = Mount(_fresh(tmp_path, "open-declines"))
    try:
        fs = m.fs
        f, d, s, fifo = (m.nodeids[n] for n in (b"f", b"d", b"s", b"fifo"))
        for cls in _twins():
            r = _opening(fs, cls)
            state = _host_state(m)
            assert r.respond(open_req(f, os.O_RDONLY)[:-1], 32) is None  # short fuse_open_in
            assert r.respond(open_req(f, os.O_RDONLY, extlen=1), 32) is None
            assert r.respond(open_req(f, os.O_RDONLY), 31) is None  # no room for the reply
            assert r.respond(open_req(999_999, os.O_RDONLY), 32) is None  # unknown: ESTALE there
            for nodeid in (d, s, fifo):  # EISDIR, ELOOP, ENXIO there
                assert r.respond(open_req(nodeid, os.O_RDONLY), 32) is None
            assert r.respond(open_req(f, os.O_RDONLY, True), 32) is None  # ENOTDIR there
            assert r.respond(open_req(f, os.O_RDWR | os.O_TRUNC), 32) is None  # truncates in the pool
            with monkeypatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)  # namespace calls in the pool
                assert r.respond(open_req(f, os.O_RDONLY), 32) is None
                assert r.respond(open_req(d, os.O_RDONLY, True), 32) is None
            with monkeypatch.context() as p:
                p.setattr(fs, "readonly", True)
                assert r.respond(open_req(f, os.O_WRONLY), 32) is None  # EROFS there
            without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
            assert without.respond(open_req(f, os.O_RDONLY), 32) is None
            assert _host_state(m) == state
        with monkeypatch.context() as p:  # read-only share, read-only open: answered
            p.setattr(fs, "readonly", True)
            reply = _opening(fs, _twins()[0]).respond(open_req(f, os.O_RDONLY), 32)
            m.full(release_req(abi.fuse_open_out.unpack_from(reply, 16)[0]))
    finally:
        m.close()


def test_open_and_unlink_replies_go_into_the_guests_buffers(reads: ReadRig) -> None:
    """The compiled entry point answers OPEN, OPENDIR, UNLINK and RMDIR (the
    backend's responder has the callbacks) across the guest's buffers."""
    m = reads.mount
    served, n, reply = reads.offer(open_req(m.nodeids[b"f"], os.O_RDONLY), [16, 16])
    assert served and n == 32
    fh = abi.fuse_open_out.unpack_from(reply, 16)[0]
    assert m.fs._handles[fh].node is m.fs._inodes[m.nodeids[b"f"]]
    served, n, reply = reads.offer(open_req(m.nodeids[b"d"], os.O_RDONLY, True), [7, 25])
    assert served and n == 32 and m.fs._handles[abi.fuse_open_out.unpack_from(reply, 16)[0]].is_dir
    open(os.path.join(m.root, "gone"), "wb").close()
    served, n, reply = reads.offer(remove_req(abi.FUSE_ROOT_ID, b"gone"), [16])
    assert served and reply[:n] == abi.fuse_out_header.pack(16, 0, 17)
    assert not os.path.exists(os.path.join(m.root, "gone"))
    served, n, reply = reads.offer(remove_req(abi.FUSE_ROOT_ID, b"gone"), [8, 8])
    assert served and reply[:n] == abi.fuse_out_header.pack(16, -errno.ENOENT, 17)


READDIRPLUS = int(abi.Opcode.READDIRPLUS)


def readdirplus_req(fh: int, offset: int, size: int, unique: int = 23, **kw: Any) -> bytes:
    return request(READDIRPLUS, 0, abi.fuse_read_in.pack(fh, offset, size, 0, 0, 0, 0), unique, **kw)


def _reading_plus(fs: PassthroughFS, cls: type, host_calls: bool = False) -> Any:
    """A responder answering READDIRPLUS through the backend's
    ``readdirplus`` callback, or (``host_calls``) with the host calls and
    table updates the compiled twin makes itself."""
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, read_max=1 << 20,
               adopt=fs._adopt, drop=fs._maybe_drop, readdirplus=fs._readdirplus_inline,
               readdir=fs._readdir_inline if host_calls else None, handles=fs._handles if host_calls else None,
               readdir_host=fs._readdir_host_config() if host_calls else None,
               tables=fs._tables_config() if host_calls else None)


def _walk_plus(m: Mount, respond: Any, fh: int, sizes: list[int]) -> tuple[list[bytes], dict[int, int]]:
    """READDIRPLUS replies of a whole listing of handle ``fh`` and the lookup
    counts they added."""
    before = m.counts()
    offset, replies = 0, []
    while True:
        reply = respond(readdirplus_req(fh, offset, sizes[len(replies) % len(sizes)]))
        assert reply is not None
        replies.append(reply)
        entries = list(codec.iter_direntplus(reply[16:]))
        if not entries:
            return replies, _delta(before, m.counts())
        offset = entries[-1].dirent.off


def test_readdirplus_at_the_queue_lists_and_counts_what_the_full_path_does(tmp_path: Any) -> None:
    """Each twin walks a directory with READDIRPLUS (replies of a few
    records: ``respond`` has 512 bytes of room) while the full path walks it
    on another handle: the same bytes (entries, node ids, attributes) and
    the same lookups counted, new names installed as the full path installs
    them. Page-sized replies: test_readdirplus_replies_go_into_the_guests_buffers."""
    m = Mount(str(tmp_path))
    try:
        d = _listing_dir(m, "plus", 40)
        for cls, host_calls in _readers(m.fs):
            r = _reading_plus(m.fs, cls, host_calls)
            for sizes in ([496], [333, 250, 400]):  # room for at least one record
                mine, theirs = _open_via_session(m, d, directory=True), _open_via_session(m, d, directory=True)
                got, counted = _walk_plus(m, lambda req: r.respond(req, 512), mine, sizes)
                want, full_counted = _walk_plus(m, lambda req: m.full(req, 512)[1], theirs, sizes)
                assert got == want and len(got) > 10
                assert counted == full_counted and len(counted) == 40
                assert all(n == 1 for n in counted.values())
                m.full(release_req(mine, True))
                m.full(release_req(theirs, True))
    finally:
        m.close()


def test_what_readdirplus_at_the_queue_leaves_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    from virtiofs_async.backends import _hostfs, passthrough

    m = Mount(str(tmp_path))
    try:
        fs = m.fs
        d = _listing_dir(m, "long", 0)
        for i in range(60):
            open(os.path.join(m.root, "long", f"{i:03d}" + "n" * 120), "w").close()
        short = _listing_dir(m, "short", 0)
        for i in range(20):
            open(os.path.join(m.root, "short", f"s{i:02d}"), "w").close()
        for cls, host_calls in _readers(fs):
            r = _reading_plus(fs, cls, host_calls)
            dh = _open_via_session(m, d, directory=True)
            fh = _open_via_session(m, m.nodeids[b"f"])
            counts = m.counts()
            assert r.respond(readdirplus_req(dh + 1000, 0, 496), 512) is None  # EBADF there
            assert r.respond(readdirplus_req(fh, 0, 496), 512) is None  # ENOTDIR there
            assert r.respond(readdirplus_req(dh, 1 << 63, 496), 512) is None  # EINVAL there
            assert r.respond(readdirplus_req(dh, 0, 497), 512) is None  # no room for it
            assert r.respond(readdirplus_req(dh, 0, 496, extlen=1), 512) is None
            without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True, read_max=1 << 20, readdir=fs._readdir_inline)
            assert without.respond(readdirplus_req(dh, 0, 496), 512) is None
            with monkeypatch.context() as p:
                p.setattr(passthrough, "_on_block_device", lambda dev: False)
                assert r.respond(readdirplus_req(dh, 0, 496), 512) is None
            with monkeypatch.context() as p:
                p.setattr(fs, "inline_metadata", False)  # no compiled packer: the full path's loop
                assert r.respond(readdirplus_req(dh, 0, 496), 512) is None
            assert m.counts() == counts
            # the host fails on the second getdents64 of one reply (the
            # first gives three records, which fit): the lookups of the
            # records packed before it are given back
            real = _hostfs.getdents_raw_ctypes
            calls = []

            def second_fails(fd: int, offset: Any, bufsize: int = 32768) -> bytes:
                calls.append(offset)
                if len(calls) > 1:
                    raise OSError(errno.EIO, "injected")
                return real(fd, offset, 72)

            sh = _open_via_session(m, short, directory=True)
            with monkeypatch.context() as p:
                p.setattr(_hostfs, "getdents_raw", second_fails)
                if _cy_responder is not None:
                    p.setattr(_cy_responder, "getdents_raw", second_fails)
                assert r.respond(readdirplus_req(sh, 0, 496), 512) is None
            assert len(calls) == 2 and fs._handles[sh].dir_pos == -1
            assert m.counts() == counts
            m.full(release_req(sh, True))
            # a corrupt getdents64 result: the same
            with monkeypatch.context() as p:
                p.setattr(_hostfs, "getdents_raw", lambda *a: b"\x02" * 40)
                if host_calls and cls is not pure.PassthroughResponder:
                    p.setattr(_cy_responder, "getdents_raw", lambda *a: b"\x02" * 40)
                p.setattr(fs._handles[dh], "dir_raw", b"")
                assert r.respond(readdirplus_req(dh, 0, 496), 512) is None
            assert fs._handles[dh].dir_pos == -1 and m.counts() == counts
            # the listing then goes as the full path's does
            other = _open_via_session(m, d, directory=True)
            assert _walk_plus(m, lambda req: r.respond(req, 512), dh, [496])[0] == \
                _walk_plus(m, lambda req: m.full(req, 512)[1], other, [496])[0]
            for h in (dh, other):
                m.full(release_req(h, True))
            m.full(release_req(fh))
    finally:
        m.close()


def test_readdirplus_replies_go_into_the_guests_buffers(reads: ReadRig) -> None:
    """The compiled entry point: page-sized READDIRPLUS replies, as Linux
    asks for them, scattered over the guest's buffers with the full path's
    bytes and lookup counts."""
    m = reads.mount
    d = _listing_dir(m, "paged-plus", 60)
    mine, theirs = _open_via_session(m, d, directory=True), _open_via_session(m, d, directory=True)
    offset, pages = 0, 0
    while True:
        before = m.counts()
        served, n, reply = reads.offer(readdirplus_req(mine, offset, 4096), [16, 100, 3996])
        assert served
        counted = _delta(before, m.counts())
        before = m.counts()
        full_n, full = m.full(readdirplus_req(theirs, offset, 4096), 4112)
        assert (n, reply[:n]) == (full_n, full)
        assert counted == _delta(before, m.counts())
        entries = list(codec.iter_direntplus(full[16:]))
        if not entries:
            break
        offset, pages = entries[-1].dirent.off, pages + 1
    assert pages >= 3


MKDIR = int(abi.Opcode.MKDIR)


def mkdir_req(parent: int, name: bytes, mode: int = 0o777, umask: int = 0o022, unique: int = 29, **kw: Any) -> bytes:
    return request(MKDIR, parent, abi.fuse_mkdir_in.pack(mode, umask) + name + b"\0", unique, **kw)


def _making(fs: PassthroughFS, cls: type) -> Any:
    return cls(fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, mkdir=fs._mkdir_inline)


def _made(m: Mount, reply: bytes, name: bytes, parent: int = abi.FUSE_ROOT_ID) -> int:
    """Check a MKDIR reply: its entry is what a LOOKUP of the name answers
    now, one lookup counted before that LOOKUP; returns the node id."""
    assert len(reply) == 144 and abi.fuse_out_header.unpack_from(reply)[:2] == (144, 0)
    nodeid = abi.fuse_entry_out.unpack_from(reply, 16)[0]
    assert m.fs._inodes[nodeid].lookups == 1
    assert m.full(lookup_req(parent, name))[1][16:] == reply[16:]
    m.fs._inodes[nodeid].lookups -= 1
    return nodeid


def test_mkdir_at_the_queue_does_what_the_full_path_does(tmp_path: Any) -> None:
    """Each twin makes the directory as the full path would: the mode (umask
    applied only where the backend handles it), the entry a LOOKUP then
    gives, one lookup counted; an existing name gets the full path's
    EEXIST reply and a missing parent directory on the host its ENOENT."""
    _on_own_fs(_check_mkdirs, tmp_path)


def _check_mkdirs(tmp_path: Any) -> None:
    for options in ({}, {"posix_acl": True}):
        root = _fresh(tmp_path, f"mkdir-{len(options)}")
        m = Mount(root, **options)
        try:
            fs = m.fs
            assert m.full(mkdir_req(abi.FUSE_ROOT_ID, b"by-full-path"))[0] == 144
            for k, cls in enumerate(_twins()):
                name = b"by-twin-%d" % k
                reply = _making(fs, cls).respond(mkdir_req(abi.FUSE_ROOT_ID, name, mode=0o1777), 512)
                _made(m, reply, name)
                mine = os.lstat(os.path.join(root, name.decode()))
                assert stat.S_ISDIR(mine.st_mode)
                assert stat.S_IMODE(mine.st_mode) == (0o1755 if options else 0o1777)
                for req, err in [(mkdir_req(abi.FUSE_ROOT_ID, name, unique=31), errno.EEXIST),
                                 (mkdir_req(m.nodeids[b"d"], b"g", unique=31), errno.EEXIST)]:
                    state = _host_state(m)
                    again = _making(fs, cls).respond(req, 512)
                    assert again == abi.fuse_out_header.pack(16, -err, 31)
                    assert _host_state(m) == state
                    assert m.full(req)[1] == again
            # the parent vanished on the host (its O_PATH fd still held)
            gone = m.lookup_via_session(abi.FUSE_ROOT_ID, b"by-twin-0")
            os.rmdir(os.path.join(root, "by-twin-0"))
            req = mkdir_req(gone, b"x", unique=33)
            assert _making(fs, _twins()[0]).respond(req, 512) == m.full(req)[1] == abi.fuse_out_header.pack(
                16, -errno.ENOENT, 33)
        finally:
            m.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="creating as another user needs root")
def test_mkdir_at_the_queue_makes_as_the_caller(tmp_path: Any) -> None:
    def check() -> None:
        root = _fresh(tmp_path, "mkdir-owners")
        os.chmod(root, 0o777)
        m = Mount(root)
        try:
            for k, cls in enumerate(_twins()):
                name = b"owned-%d" % k
                reply = _making(m.fs, cls).respond(mkdir_req(abi.FUSE_ROOT_ID, name, uid=4321), 512)
                _made(m, reply, name)
                st_ = os.lstat(os.path.join(root, name.decode()))
                assert (st_.st_uid, st_.st_gid) == (4321, 4321)
        finally:
            m.close()

    _on_own_fs(check)


def test_what_mkdir_at_the_queue_leaves_to_the_full_path(tmp_path: Any, monkeypatch: Any) -> None:
    def check() -> None:
        from virtiofs_async.backends import passthrough

        m = Mount(_fresh(tmp_path, "mkdir-declines"))
        try:
            fs = m.fs
            for cls in _twins():
                r = _making(fs, cls)
                state = _host_state(m)
                for name in (b".", b"..", b"a/b", b"x" * 256, b"a\0b", b""):
                    assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, name), 512) is None, name
                assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new")[:-1], 512) is None  # no NUL
                assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new")[:44], 512) is None  # short fuse_mkdir_in
                assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new", extlen=1), 512) is None  # groups
                assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new"), 143) is None  # no room for the reply
                assert r.respond(mkdir_req(m.nodeids[b"f"], b"new"), 512) is None  # ENOTDIR there
                assert r.respond(mkdir_req(999_999, b"new"), 512) is None  # ESTALE there
                with monkeypatch.context() as p:
                    p.setattr(passthrough, "_on_block_device", lambda dev: False)  # namespace calls in the pool
                    assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
                with monkeypatch.context() as p:
                    p.setattr(fs, "readonly", True)
                    assert r.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
                without = cls(fs._inodes, fs._by_key, 1.0, 1.0, False, True)
                assert without.respond(mkdir_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
                assert _host_state(m) == state
        finally:
            m.close()

    _on_own_fs(check)
    # a thread whose umask the process shares: the full path makes it in the pool
    m = Mount(_fresh(tmp_path, "mkdir-shared-umask"))
    try:
        for cls in _twins():
            assert _making(m.fs, cls).respond(mkdir_req(abi.FUSE_ROOT_ID, b"new"), 512) is None
        assert not os.path.exists(os.path.join(m.root, "new"))
    finally:
        m.close()


def test_mkdir_replies_go_into_the_guests_buffers(reads: ReadRig) -> None:
    def check() -> None:
        m = reads.mount
        served, n, reply = reads.offer(mkdir_req(abi.FUSE_ROOT_ID, b"through-the-ring"), [16, 128])
        assert served and n == 144
        _made(m, reply[:n], b"through-the-ring")
        served, n, reply = reads.offer(mkdir_req(abi.FUSE_ROOT_ID, b"split"), [9, 100, 35])
        assert served and n == 144
        _made(m, reply[:n], b"split")

    _on_own_fs(check)


def _gate_classes() -> list[type]:
    out: list[type] = [pure.InlineGate]
    if _cy_responder is not None:
        out.append(_cy_responder.InlineGate)
    return out


@pytest.mark.parametrize("gate_cls", _gate_classes(), ids=lambda c: c.__module__)
def test_the_inline_gate_gives_the_responder_unless_its_logger_is_at_debug(gate_cls: type) -> None:
    """A session's inline_responder: the instance's attribute, None while
    the logger is enabled for DEBUG (at once after each level change, also
    through a parent's level and logging.disable), the attribute again when
    the logger is disabled (nothing it logs would show); read-only."""
    logger = logging.getLogger(f"virtiofs_async.test_gate.{gate_cls.__module__}")
    parent = logger.parent
    assert parent is not None

    class Holder:
        gate = gate_cls("_value", logger)

        def __init__(self) -> None:
            self._value: Any = None

    h = Holder()
    marker = object()
    old_level, old_parent_level = logger.level, parent.level
    try:
        logger.setLevel(logging.INFO)
        assert h.gate is None
        h._value = marker
        for _ in range(2):  # the second read finds the logger's cached answer
            assert h.gate is marker
        logger.setLevel(logging.DEBUG)
        assert h.gate is None and h.gate is None
        logger.setLevel(logging.NOTSET)
        parent.setLevel(logging.DEBUG)
        assert h.gate is None
        logging.disable(logging.CRITICAL)
        try:
            assert h.gate is marker
        finally:
            logging.disable(logging.NOTSET)
        assert h.gate is None
        logger.disabled = True
        try:
            assert h.gate is marker and h.gate is marker
        finally:
            logger.disabled = False
        parent.setLevel(logging.WARNING)
        assert h.gate is marker
        with pytest.raises(AttributeError):
            h.gate = object()
        assert isinstance(Holder.gate, gate_cls)
    finally:
        logger.setLevel(old_level)
        parent.setLevel(old_parent_level)



def _tables_state(fs: PassthroughFS) -> tuple[Any, ...]:
    """The inode tables as the guest and the host see them."""
    return (sorted((nid, node.key, node.kind, node.lookups, node.fd >= 0, node.gone)
                   for nid, node in fs._inodes.items()),
            sorted((key, node.nodeid) for key, node in fs._by_key.items()),
            sorted((key, node.nodeid) for key, node in fs._remapped.items()),
            fs.held_fds())


@pytest.mark.skipif(_cy_responder is None, reason="the compiled twin is not built")
def test_compiled_tables_install_and_drop_as_the_callbacks_do(tmp_path: Any, monkeypatch: Any) -> None:
    """With ``tables`` the compiled twin installs (LOOKUP of a new name,
    READDIRPLUS) and drops (FORGET) plain inodes itself, without ``adopt``
    and ``drop``: the same replies and the same tables, node ids, fds and
    ``_remapped`` as a mount whose responder goes through the callbacks.
    What is not plain goes to the callbacks: a host inode number that is a
    node id already (a synthetic id), an inode holding POSIX lock fds."""
    # the backend's READDIRPLUS packer is the compiled twin, in the pure run too
    monkeypatch.setattr(_accel, "PassthroughResponder", _cy_responder.PassthroughResponder)
    root = str(tmp_path / "t")
    os.makedirs(root + "/dir")
    for i in range(40):
        open(f"{root}/dir/n-{i:02d}", "w").close()
    mounts = [Mount(root), Mount(root)]
    calls: list[list[str]] = [[], []]
    try:
        responders, dnodes = [], []
        for i, m in enumerate(mounts):
            fs = m.fs
            dnodes.append(m.lookup_via_session(abi.FUSE_ROOT_ID, b"dir"))
            adopt, drop = fs._adopt, fs._maybe_drop
            # counted wherever the backend calls them (the READDIRPLUS packer too)
            fs._adopt = lambda *a, c=calls[i], f=adopt: c.append("adopt") or f(*a)  # type: ignore[method-assign]
            fs._maybe_drop = lambda node, c=calls[i], f=drop: c.append("drop") or f(node)  # type: ignore[method-assign]
            if i == 1:
                fs._tables_config = lambda: None  # type: ignore[method-assign]
            responders.append(_cy_responder.PassthroughResponder(
                fs._inodes, fs._by_key, fs.entry_timeout, fs.attr_timeout, False, True, fs._handles, 1 << 20,
                adopt=fs._adopt, drop=fs._maybe_drop, readdirplus=fs._readdirplus_inline,
                readdir=fs._readdir_inline, tables=fs._tables_config()))
        # a node id taken by the host inode number of dir/n-07 (the same in both)
        ino = os.lstat(f"{root}/dir/n-07").st_ino
        for m in mounts:
            m.fs._inodes[ino] = passthrough._Inode(ino, (0, ino), stat.S_IFREG, -1, lookups=1)
        replies: list[list[bytes]] = [[], []]
        for i, (m, r, dnode) in enumerate(zip(mounts, responders, dnodes)):
            for name in (b"n-00", b"n-01", b"n-07"):
                replies[i].append(r.respond(lookup_req(dnode, name), 512))
            dh = _open_via_session(m, dnode, directory=True)
            plus, _ = _walk_plus(m, lambda req, r=r: r.respond(req, 512), dh, [496, 300])
            replies[i] += plus
            m.full(release_req(dh, True))
        assert replies[0] == replies[1]
        assert _tables_state(mounts[0].fs) == _tables_state(mounts[1].fs)
        synthetic = mounts[0].fs._by_key[(os.lstat(f"{root}/dir/n-07").st_dev, ino)]
        assert synthetic.nodeid >= passthrough._FIRST_SYNTHETIC_NODEID
        assert calls[0].count("adopt") == 1  # n-07's synthetic id only
        assert calls[1].count("adopt") == 40  # each file once: LOOKUP's three, READDIRPLUS's others
        for c in calls:
            c.clear()  # (RELEASEDIR's full path asked drop about dir)
        # lock fds on n-01: its drop goes to the callback, which closes them
        lock_fds = []
        for m in mounts:
            node = m.fs._by_key[(os.lstat(f"{root}/dir/n-01").st_dev, os.lstat(f"{root}/dir/n-01").st_ino)]
            fd = os.open(f"{root}/dir/n-01", os.O_RDONLY)
            node.plocks[77] = fd
            lock_fds.append(fd)
        forgotten = []
        for m, r in zip(mounts, responders):
            nodes = [node for node in m.fs._inodes.values()
                     if node.nodeid != abi.FUSE_ROOT_ID and node.key[0] != 0 and node.lookups]
            for node in nodes:
                assert r.respond(forget_req(node.nodeid, node.lookups), 512) == b""  # no reply
            forgotten.append(len(nodes))
        assert _tables_state(mounts[0].fs) == _tables_state(mounts[1].fs)
        assert forgotten[0] == forgotten[1] > 40
        assert calls[0].count("drop") == 1  # n-01 only
        assert calls[1].count("drop") == forgotten[1]
        for fd in lock_fds:
            with pytest.raises(OSError):
                os.fstat(fd)
        gone = [node for node in mounts[0].fs._inodes.values() if node.key[0] != 0 and node.nodeid != 1]
        assert gone == []  # every counted inode dropped, fds closed (held_fds compared above)
    finally:
        for m in mounts:
            m.close()
