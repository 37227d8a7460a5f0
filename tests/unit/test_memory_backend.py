"""Tests of the in-memory backend (virtiofs_async.backends.memory.MemoryFS).

The backend's methods never yield to an event loop, so ``run`` drives each
coroutine with a single ``send`` and fails if it ever suspends.
"""
from __future__ import annotations

import errno
import itertools
import stat
import types
from typing import Any, Coroutine, Iterator

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from virtiofs_async.backends import MemoryFS
from virtiofs_async.backends import memory as memory_mod
from virtiofs_async.backends.memory import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    MAX_FILE_SIZE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    SEEK_DATA,
    SEEK_HOLE,
    XATTR_CREATE,
    XATTR_REPLACE,
)
from virtiofs_async.errors import FuseError
from virtiofs_async.operations import (
    ROOT_INODE,
    DirectoryReply,
    EntryAttributes,
    RequestContext,
    SetattrFields,
)

O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
O_EXCL, O_TRUNC, O_APPEND = 0o200, 0o1000, 0o2000

ROOT = RequestContext(uid=0, gid=0, pid=1)
USER = RequestContext(uid=1000, gid=1000, pid=2)
OTHER = RequestContext(uid=1001, gid=1001, pid=3)


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a backend coroutine that must complete without suspending."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("backend yielded to the event loop")


def bounded(limit: int = 10_000) -> Iterator[int]:
    """Iterations for a paging loop that must end: a listing that never
    finishes fails the test instead of hanging it."""
    yield from range(limit)
    raise AssertionError("listing did not terminate")


def err(coro: Coroutine[Any, Any, Any]) -> int:
    with pytest.raises(FuseError) as info:
        run(coro)
    return info.value.errno


class Collect(DirectoryReply):
    """A DirectoryReply that accepts up to ``limit`` entries."""

    def __init__(self, plus: bool = False, limit: int | None = None) -> None:
        self.plus = plus
        self.limit = limit
        self.entries: list[tuple[bytes, EntryAttributes, int]] = []

    def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
        if self.limit is not None and len(self.entries) >= self.limit:
            return False
        self.entries.append((name, attributes, next_offset))
        return True

    @property
    def names(self) -> list[bytes]:
        return [e[0] for e in self.entries]


class Clock:
    """A fake time.time_ns: every call returns a strictly larger value."""

    def __init__(self) -> None:
        self.now = 1_000_000_000

    def time_ns(self) -> int:
        self.now += 1000
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(memory_mod, "time", types.SimpleNamespace(time_ns=c.time_ns))
    return c


@pytest.fixture
def fs() -> MemoryFS:
    return MemoryFS(mode=0o777)


# -- small helpers over the API ------------------------------------------


def mkfile(fs: MemoryFS, parent: int, name: bytes, data: bytes = b"", mode: int = 0o644, ctx: RequestContext = ROOT) -> int:
    info, attrs = run(fs.create(parent, name, mode, O_RDWR, ctx))
    if data:
        assert run(fs.write(info.fh, 0, [memoryview(data)], ctx)) == len(data)
    run(fs.release(info.fh))
    return attrs.st_ino


def mkdir(fs: MemoryFS, parent: int, name: bytes, mode: int = 0o755, ctx: RequestContext = ROOT) -> int:
    return run(fs.mkdir(parent, name, mode, ctx)).st_ino


def readall(fs: MemoryFS, ino: int, ctx: RequestContext = ROOT) -> bytes:
    fh = run(fs.open(ino, O_RDONLY, ctx)).fh
    size = run(fs.getattr(ino, ctx)).st_size
    data = bytes(run(fs.read(fh, 0, size + 100)))
    run(fs.release(fh))
    return data


def attr(fs: MemoryFS, ino: int) -> EntryAttributes:
    return run(fs.getattr(ino, ROOT))


def listdir(fs: MemoryFS, ino: int, ctx: RequestContext = ROOT) -> list[bytes]:
    fh = run(fs.opendir(ino, ctx)).fh
    reply = Collect()
    run(fs.readdir(fh, 0, reply))
    run(fs.releasedir(fh))
    return reply.names


def chmod(fs: MemoryFS, ino: int, mode: int, ctx: RequestContext = ROOT) -> EntryAttributes:
    return run(fs.setattr(ino, EntryAttributes(st_mode=mode), SetattrFields(update_mode=True), None, ctx))


def chown(fs: MemoryFS, ino: int, uid: int | None, gid: int | None, ctx: RequestContext = ROOT) -> EntryAttributes:
    fields = SetattrFields(update_uid=uid is not None, update_gid=gid is not None)
    values = EntryAttributes(st_uid=uid or 0, st_gid=gid or 0)
    return run(fs.setattr(ino, values, fields, None, ctx))


def truncate(fs: MemoryFS, ino: int, size: int, ctx: RequestContext = ROOT, **extra: bool):
    return fs.setattr(ino, EntryAttributes(st_size=size), SetattrFields(update_size=True, **extra), None, ctx)


# -- construction, lookup ---------------------------------------------------


def test_root_attributes_follow_constructor() -> None:
    fs = MemoryFS(uid=5, gid=6, mode=0o1750, entry_timeout=2.5, attr_timeout=3.5)
    a = attr(fs, ROOT_INODE)
    assert a.st_ino == ROOT_INODE
    assert stat.S_ISDIR(a.st_mode) and stat.S_IMODE(a.st_mode) == 0o1750
    assert (a.st_uid, a.st_gid, a.st_nlink) == (5, 6, 2)
    assert (a.entry_timeout, a.attr_timeout) == (2.5, 3.5)
    assert MemoryFS.supports_killpriv_v2 is True


def test_backend_never_yields(fs: MemoryFS) -> None:
    # run() raises if a coroutine suspends; exercise a mixed sequence.
    ino = mkfile(fs, ROOT_INODE, b"f", b"x" * 100_000)
    assert readall(fs, ino) == b"x" * 100_000


def test_lookup_counts_and_errors(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f")
    assert fs.lookup_count(ino) == 1  # create counts one
    a = run(fs.lookup(ROOT_INODE, b"f", ROOT))
    assert a.st_ino == ino and fs.lookup_count(ino) == 2
    assert err(fs.lookup(ROOT_INODE, b"missing", ROOT)) == errno.ENOENT
    assert err(fs.lookup(ROOT_INODE, b"x" * 256, ROOT)) == errno.ENAMETOOLONG
    assert err(fs.lookup(ino, b"x", ROOT)) == errno.ENOTDIR
    assert err(fs.lookup(999, b"x", ROOT)) == errno.ESTALE
    mkfile(fs, ROOT_INODE, b"y" * 255)
    assert run(fs.lookup(ROOT_INODE, b"y" * 255, ROOT)).st_size == 0
    assert fs.lookup_count(ino) == 2  # failed lookups count nothing


def test_dot_and_dotdot_lookup(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    e = mkdir(fs, d, b"e")
    assert run(fs.lookup(e, b".", ROOT)).st_ino == e
    assert run(fs.lookup(e, b"..", ROOT)).st_ino == d
    assert run(fs.lookup(ROOT_INODE, b"..", ROOT)).st_ino == ROOT_INODE
    assert fs.lookup_count(e) == 2 and fs.lookup_count(d) == 2
    for op in (fs.mkdir(d, b".", 0o755, ROOT), fs.mknod(d, b"..", stat.S_IFIFO | 0o644, 0, ROOT)):
        assert err(op) == errno.EEXIST
    assert err(fs.create(d, b"..", 0o644, O_RDWR, ROOT)) == errno.EEXIST
    assert err(fs.unlink(d, b".", ROOT)) == errno.EISDIR
    assert err(fs.rmdir(d, b".", ROOT)) == errno.EINVAL
    assert err(fs.rmdir(d, b"..", ROOT)) == errno.ENOTEMPTY


def test_forget_drops_only_unused_unlinked_inodes(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"data")
    run(fs.lookup(ROOT_INODE, b"f", ROOT))  # count 2
    run(fs.forget([(ino, 2)]))
    assert fs.has_inode(ino)  # still linked
    run(fs.lookup(ROOT_INODE, b"f", ROOT))
    run(fs.unlink(ROOT_INODE, b"f", ROOT))
    assert fs.has_inode(ino)  # guest still holds one lookup
    run(fs.forget([(ino, 1)]))
    assert not fs.has_inode(ino)
    # Forgetting unknown inodes or too many counts never raises; root stays.
    run(fs.forget([(12345, 3), (ROOT_INODE, 100)]))
    assert fs.has_inode(ROOT_INODE)
    assert attr(fs, ROOT_INODE).st_nlink == 2


def test_unlinked_open_file_lives_until_release_and_forget(fs: MemoryFS) -> None:
    info, a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    run(fs.write(info.fh, 0, [memoryview(b"keep")], ROOT))
    run(fs.unlink(ROOT_INODE, b"f", ROOT))
    run(fs.forget([(a.st_ino, 1)]))
    assert fs.has_inode(a.st_ino)  # open handle keeps it
    assert attr(fs, a.st_ino).st_nlink == 0
    assert run(fs.read(info.fh, 0, 10)) == b"keep"
    run(fs.write(info.fh, 4, [memoryview(b"!")], ROOT))
    assert run(fs.getattr(a.st_ino, ROOT, info.fh)).st_size == 5
    used = fs.used_bytes
    assert used > 0
    run(fs.release(info.fh))
    assert not fs.has_inode(a.st_ino)
    assert fs.used_bytes == 0
    assert err(fs.lookup(ROOT_INODE, b"f", ROOT)) == errno.ENOENT


def test_handles_are_separate_from_inodes(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abc")
    h1 = run(fs.open(ino, O_RDONLY, ROOT)).fh
    h2 = run(fs.open(ino, O_RDWR, ROOT)).fh
    assert h1 != h2
    run(fs.release(h1))
    assert err(fs.read(h1, 0, 3)) == errno.EBADF
    assert run(fs.read(h2, 0, 3)) == b"abc"
    run(fs.release(h2))
    run(fs.release(h2))  # releasing twice never fails
    assert err(fs.fsync(h2, False)) == errno.EBADF


def test_access_mode_of_handles(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abc")
    ro = run(fs.open(ino, O_RDONLY, ROOT)).fh
    wo = run(fs.open(ino, O_WRONLY, ROOT)).fh
    assert err(fs.write(ro, 0, [memoryview(b"x")], ROOT)) == errno.EBADF
    assert err(fs.read(wo, 0, 1)) == errno.EBADF
    assert err(fs.fallocate(ro, 0, 0, 10)) == errno.EBADF
    assert err(fs.setattr(ino, EntryAttributes(st_size=0), SetattrFields(update_size=True), ro, ROOT)) == errno.EBADF


def test_unknown_inode_is_estale(fs: MemoryFS) -> None:
    assert err(fs.getattr(77, ROOT)) == errno.ESTALE
    assert err(fs.open(77, O_RDONLY, ROOT)) == errno.ESTALE


# -- file data -------------------------------------------------------------


def test_sparse_write_read_and_block_accounting() -> None:
    fs = MemoryFS(chunk_size=4096)
    info, a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    fh = info.fh
    assert run(fs.write(fh, 10 * 4096 + 5, [memoryview(b"he"), memoryview(b"llo")], ROOT)) == 5
    at = attr(fs, a.st_ino)
    assert at.st_size == 10 * 4096 + 10
    assert at.st_blocks == 4096 // 512  # one chunk stored, the rest are holes
    assert fs.used_bytes == 4096
    assert run(fs.read(fh, 0, 8)) == bytes(8)
    assert run(fs.read(fh, 10 * 4096, 10)) == bytes(5) + b"hello"
    # A write straddling chunks.
    run(fs.write(fh, 4096 - 2, [memoryview(b"ABCD")], ROOT))
    assert run(fs.read(fh, 4096 - 3, 6)) == b"\0ABCD\0"
    assert fs.used_bytes == 3 * 4096
    # Reads past EOF are empty; reads at EOF are short.
    assert run(fs.read(fh, at.st_size, 10)) == b""
    assert run(fs.read(fh, at.st_size - 2, 10)) == b"lo"
    assert run(fs.write(fh, 0, [], ROOT)) == 0


def test_read_into_copies_chunks_and_holes_into_the_buffers() -> None:
    """read_into gives what read gives, straight into split buffers."""
    fs = MemoryFS(chunk_size=4096)
    info, _a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    fh = info.fh
    run(fs.write(fh, 4096 - 3, [memoryview(b"ABCDEF")], ROOT))
    run(fs.write(fh, 3 * 4096, [memoryview(b"xyz")], ROOT))  # chunk 2 is a hole
    size = 3 * 4096 + 3
    for split in ([size], [1, 4094, 5, 8192, 3], [4096, 4096, 4096, 3]):
        buf = bytearray(b"?" * size)
        views, pos = [], 0
        for n in split:
            views.append(memoryview(buf)[pos:pos + n])
            pos += n
        assert run(fs.read_into(fh, 0, size, views)) == size
        assert bytes(buf) == run(fs.read(fh, 0, size))
    buf = bytearray(b"?" * 10)
    assert run(fs.read_into(fh, size - 2, 10, [memoryview(buf)])) == 2 and buf == b"yz" + b"?" * 8
    assert run(fs.read_into(fh, size, 10, [memoryview(buf)])) == 0
    assert err(fs.read_into(fh, -1, 1, [memoryview(buf)])) == errno.EINVAL
    run(fs.release(fh))
    assert err(fs.read_into(fh, 0, 1, [memoryview(buf)])) == errno.EBADF


def test_truncate_shrink_then_grow_reads_zeros(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"0123456789" * 10_000)
    run(truncate(fs, ino, 5))
    assert readall(fs, ino) == b"01234"
    run(truncate(fs, ino, 200_000))
    data = readall(fs, ino)
    assert len(data) == 200_000 and data[:5] == b"01234" and data[5:] == bytes(199_995)
    assert attr(fs, ino).st_blocks == fs.chunk_size // 512
    assert err(truncate(fs, ino, -1)) == errno.EINVAL
    assert err(truncate(fs, ino, MAX_FILE_SIZE + 1)) == errno.EFBIG
    d = mkdir(fs, ROOT_INODE, b"d")
    assert err(truncate(fs, d, 0)) == errno.EISDIR
    fifo = run(fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, ROOT)).st_ino
    assert err(truncate(fs, fifo, 0)) == errno.EINVAL


def test_append_writes_go_to_eof(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abc")
    fh = run(fs.open(ino, O_WRONLY | O_APPEND, ROOT)).fh
    assert run(fs.write(fh, 0, [memoryview(b"XY")], ROOT)) == 2
    assert run(fs.write(fh, 1, [memoryview(b"Z")], ROOT)) == 1
    assert readall(fs, ino) == b"abcXYZ"


def test_open_trunc(fs: MemoryFS, clock: Clock) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abcdef", mode=0o644)
    before = attr(fs, ino)
    fh = run(fs.open(ino, O_RDWR | O_TRUNC, ROOT)).fh
    after = attr(fs, ino)
    assert after.st_size == 0 and fs.used_bytes == 0
    assert after.st_mtime_ns > before.st_mtime_ns and after.st_ctime_ns > before.st_ctime_ns
    run(fs.release(fh))
    run(fs.write(run(fs.open(ino, O_WRONLY, ROOT)).fh, 0, [memoryview(b"zz")], ROOT))
    # O_TRUNC needs write permission even with O_RDONLY.
    assert err(fs.open(ino, O_RDONLY | O_TRUNC, USER)) == errno.EACCES
    assert readall(fs, ino) == b"zz"


def test_create_existing_is_eexist(fs: MemoryFS) -> None:
    mkfile(fs, ROOT_INODE, b"f")
    assert err(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT)) == errno.EEXIST
    assert err(fs.create(ROOT_INODE, b"n" * 256, 0o644, O_RDWR, ROOT)) == errno.ENAMETOOLONG


def test_open_non_regular(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    s = run(fs.symlink(ROOT_INODE, b"s", b"d", ROOT)).st_ino
    assert err(fs.open(d, O_RDONLY, ROOT)) == errno.EISDIR
    assert err(fs.open(s, O_RDONLY, ROOT)) == errno.ELOOP
    dh = run(fs.opendir(d, ROOT)).fh
    assert err(fs.read(dh, 0, 1)) == errno.EISDIR
    ino = mkfile(fs, ROOT_INODE, b"f")
    assert err(fs.opendir(ino, ROOT)) == errno.ENOTDIR


def test_write_efbig(fs: MemoryFS) -> None:
    info, a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    assert err(fs.write(info.fh, MAX_FILE_SIZE - 1, [memoryview(b"ab")], ROOT)) == errno.EFBIG
    assert run(fs.write(info.fh, MAX_FILE_SIZE - 1, [memoryview(b"a")], ROOT)) == 1
    assert attr(fs, a.st_ino).st_size == MAX_FILE_SIZE
    assert run(fs.getattr(999, ROOT, info.fh)).st_ino == a.st_ino  # fh wins over inode


def test_enospc_on_data_and_inodes() -> None:
    fs = MemoryFS(size_bytes=2 * 4096, max_inodes=3, chunk_size=4096)
    info, a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    run(fs.write(info.fh, 0, [memoryview(b"a" * 4096)], ROOT))
    assert err(fs.write(info.fh, 4096, [memoryview(b"b" * 4097)], ROOT)) == errno.ENOSPC
    assert attr(fs, a.st_ino).st_size == 4096  # nothing was written
    assert run(fs.write(info.fh, 4096, [memoryview(b"b" * 4096)], ROOT)) == 4096
    assert err(fs.write(info.fh, 5 * 4096, [memoryview(b"c")], ROOT)) == errno.ENOSPC
    # Overwriting stored chunks needs no space.
    assert run(fs.write(info.fh, 10, [memoryview(b"zz")], ROOT)) == 2
    mkdir(fs, ROOT_INODE, b"d")  # third inode
    assert err(fs.mkdir(ROOT_INODE, b"e", 0o755, ROOT)) == errno.ENOSPC
    assert err(fs.symlink(ROOT_INODE, b"e", b"t", ROOT)) == errno.ENOSPC
    sv = run(fs.statfs(ROOT))
    assert (sv.f_files, sv.f_ffree, sv.f_bfree, sv.f_blocks) == (3, 0, 0, 2)


def test_statfs_accounts_chunks(fs: MemoryFS) -> None:
    fs = MemoryFS(size_bytes=1 << 20, max_inodes=100, chunk_size=4096)
    sv0 = run(fs.statfs(ROOT))
    assert sv0.f_blocks == (1 << 20) // sv0.f_frsize
    assert sv0.f_bfree == sv0.f_blocks and sv0.f_ffree == 99 and sv0.f_namemax == 255
    ino = mkfile(fs, ROOT_INODE, b"f", b"x" * 5000)  # two chunks
    sv1 = run(fs.statfs(ROOT))
    assert sv0.f_bfree - sv1.f_bfree == 2 * 4096 // sv1.f_frsize
    assert sv1.f_ffree == 98
    run(fs.unlink(ROOT_INODE, b"f", ROOT))
    run(fs.forget([(ino, 1)]))
    sv2 = run(fs.statfs(ROOT))
    assert (sv2.f_bfree, sv2.f_ffree) == (sv0.f_bfree, 99)


# -- fallocate / lseek / copy_file_range -------------------------------------


@pytest.fixture
def small() -> MemoryFS:
    return MemoryFS(chunk_size=4096, size_bytes=64 * 4096)


def test_fallocate_modes(small: MemoryFS) -> None:
    fs = small
    info, a = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    fh, ino = info.fh, a.st_ino
    run(fs.fallocate(fh, 0, 100, 5000))
    assert attr(fs, ino).st_size == 5100 and fs.used_bytes == 2 * 4096
    run(fs.fallocate(fh, FALLOC_FL_KEEP_SIZE, 0, 4 * 4096))
    assert attr(fs, ino).st_size == 5100 and fs.used_bytes == 4 * 4096
    run(fs.write(fh, 0, [memoryview(b"y" * 5100)], ROOT))
    # Punch: partial chunks zeroed, whole chunks freed.
    run(fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 10, 4096 * 2))
    assert fs.used_bytes == 3 * 4096
    data = readall(fs, ino)
    assert data == b"y" * 10 + bytes(5090) and attr(fs, ino).st_size == 5100
    assert err(fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE, 0, 10)) == errno.EOPNOTSUPP
    # Zero range extends the size and zeroes.
    run(fs.write(fh, 0, [memoryview(b"z" * 20)], ROOT))
    run(fs.fallocate(fh, FALLOC_FL_ZERO_RANGE, 5, 6000))
    assert readall(fs, ino) == b"z" * 5 + bytes(6000)
    run(fs.write(fh, 0, [memoryview(b"q" * 20)], ROOT))
    run(fs.fallocate(fh, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, 5, 10_000))
    assert attr(fs, ino).st_size == 6005 and readall(fs, ino)[:6] == b"qqqqq\0"
    for mode in (0x04, 0x08, 0x20, 0x40):  # NO_HIDE_STALE, COLLAPSE, INSERT, UNSHARE
        assert err(fs.fallocate(fh, mode | FALLOC_FL_KEEP_SIZE, 0, 10)) == errno.EOPNOTSUPP
    assert err(fs.fallocate(fh, 0, 0, 0)) == errno.EINVAL
    assert err(fs.fallocate(fh, 0, -1, 10)) == errno.EINVAL
    assert err(fs.fallocate(fh, 0, 0, 1000 * 4096)) == errno.ENOSPC
    assert err(fs.fallocate(fh, 0, MAX_FILE_SIZE, 2)) == errno.EFBIG


def test_lseek_data_and_hole(small: MemoryFS) -> None:
    fs = small
    cs = 4096
    info, _ = run(fs.create(ROOT_INODE, b"f", 0o644, O_RDWR, ROOT))
    fh = info.fh
    run(fs.write(fh, 2 * cs + 7, [memoryview(b"a" * cs)], ROOT))  # chunks 2 and 3
    run(fs.write(fh, 6 * cs, [memoryview(b"b" * 10)], ROOT))  # chunk 6, EOF in it
    size = 6 * cs + 10
    assert run(fs.lseek(fh, 0, SEEK_DATA)) == 2 * cs
    assert run(fs.lseek(fh, 0, SEEK_HOLE)) == 0
    assert run(fs.lseek(fh, 2 * cs + 1, SEEK_DATA)) == 2 * cs + 1
    assert run(fs.lseek(fh, 2 * cs + 1, SEEK_HOLE)) == 4 * cs
    assert run(fs.lseek(fh, 4 * cs, SEEK_DATA)) == 6 * cs
    assert run(fs.lseek(fh, 6 * cs + 1, SEEK_HOLE)) == size  # implicit hole at EOF
    for whence in (SEEK_DATA, SEEK_HOLE):
        assert err(fs.lseek(fh, size, whence)) == errno.ENXIO
        assert err(fs.lseek(fh, -1, whence)) == errno.ENXIO
    assert err(fs.lseek(fh, 0, 0)) == errno.EINVAL
    run(fs.fallocate(fh, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 6 * cs, cs))
    assert err(fs.lseek(fh, 5 * cs, SEEK_DATA)) == errno.ENXIO  # only a hole remains


def test_copy_file_range(small: MemoryFS) -> None:
    fs = small
    cs = 4096
    a_info, a = run(fs.create(ROOT_INODE, b"a", 0o644, O_RDWR, ROOT))
    b_info, b = run(fs.create(ROOT_INODE, b"b", 0o644, O_RDWR, ROOT))
    run(fs.write(a_info.fh, 0, [memoryview(b"A" * 100)], ROOT))
    run(fs.write(a_info.fh, 5 * cs, [memoryview(b"B" * 100)], ROOT))
    run(fs.write(b_info.fh, 0, [memoryview(b"x" * (3 * cs))], ROOT))  # to be overwritten by a hole
    n = run(fs.copy_file_range(a_info.fh, 0, b_info.fh, 0, 1 << 40, 0))
    assert n == 5 * cs + 100
    assert readall(fs, b.st_ino) == readall(fs, a.st_ino)
    assert attr(fs, b.st_ino).st_blocks == attr(fs, a.st_ino).st_blocks  # holes copied as holes
    assert run(fs.copy_file_range(a_info.fh, 10 * cs, b_info.fh, 0, 10, 0)) == 0
    assert err(fs.copy_file_range(a_info.fh, 0, b_info.fh, 0, 10, 1)) == errno.EINVAL
    assert err(fs.copy_file_range(a_info.fh, 0, a_info.fh, 50, 100, 0)) == errno.EINVAL
    # Same file, disjoint ranges is fine.
    assert run(fs.copy_file_range(a_info.fh, 0, a_info.fh, 200, 100, 0)) == 100
    assert run(fs.read(a_info.fh, 200, 100)) == b"A" * 100
    ro = run(fs.open(b.st_ino, O_RDONLY, ROOT)).fh
    assert err(fs.copy_file_range(a_info.fh, 0, ro, 0, 10, 0)) == errno.EBADF


# -- directories, nlink, links, symlinks, special files ----------------------


def test_directory_nlink(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    assert attr(fs, ROOT_INODE).st_nlink == 3 and attr(fs, d).st_nlink == 2
    mkdir(fs, d, b"e")
    mkfile(fs, d, b"f")
    assert attr(fs, d).st_nlink == 3
    assert err(fs.rmdir(ROOT_INODE, b"d", ROOT)) == errno.ENOTEMPTY
    assert err(fs.rmdir(d, b"f", ROOT)) == errno.ENOTDIR
    assert err(fs.unlink(d, b"e", ROOT)) == errno.EISDIR
    run(fs.rmdir(d, b"e", ROOT))
    assert attr(fs, d).st_nlink == 2
    run(fs.unlink(d, b"f", ROOT))
    run(fs.rmdir(ROOT_INODE, b"d", ROOT))
    assert attr(fs, ROOT_INODE).st_nlink == 2
    # A removed directory still known to the guest: dead, nothing can be created.
    assert attr(fs, d).st_nlink == 0
    assert err(fs.mkdir(d, b"x", 0o755, ROOT)) == errno.ENOENT
    assert err(fs.lookup(d, b"x", ROOT)) == errno.ENOENT


def test_hard_links(fs: MemoryFS, clock: Clock) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"data")
    d = mkdir(fs, ROOT_INODE, b"d")
    c0 = attr(fs, ino).st_ctime_ns
    a = run(fs.link(ino, d, b"g", ROOT))
    assert a.st_ino == ino and a.st_nlink == 2 and a.st_ctime_ns > c0
    assert fs.lookup_count(ino) == 2
    assert err(fs.link(ino, d, b"g", ROOT)) == errno.EEXIST
    assert err(fs.link(d, ROOT_INODE, b"dd", ROOT)) == errno.EPERM
    assert err(fs.link(ino, d, b"." , ROOT)) == errno.EEXIST
    run(fs.unlink(ROOT_INODE, b"f", ROOT))
    assert attr(fs, ino).st_nlink == 1
    assert readall(fs, run(fs.lookup(d, b"g", ROOT)).st_ino) == b"data"
    # A file unlinked to zero cannot be linked again.
    run(fs.unlink(d, b"g", ROOT))
    assert err(fs.link(ino, ROOT_INODE, b"again", ROOT)) == errno.ENOENT


def test_tmpfile(fs: MemoryFS) -> None:
    info, a = run(fs.tmpfile(ROOT_INODE, 0o600, O_RDWR, ROOT))
    assert a.st_nlink == 0 and stat.S_ISREG(a.st_mode)
    assert listdir(fs, ROOT_INODE) == [b".", b".."]
    run(fs.write(info.fh, 0, [memoryview(b"tmp")], ROOT))
    linked = run(fs.link(a.st_ino, ROOT_INODE, b"named", ROOT))
    assert linked.st_nlink == 1
    run(fs.release(info.fh))
    assert readall(fs, run(fs.lookup(ROOT_INODE, b"named", ROOT)).st_ino) == b"tmp"
    # O_EXCL: never linkable; dropped at release + forget.
    info2, a2 = run(fs.tmpfile(ROOT_INODE, 0o600, O_RDWR | O_EXCL, ROOT))
    assert err(fs.link(a2.st_ino, ROOT_INODE, b"x", ROOT)) == errno.ENOENT
    run(fs.release(info2.fh))
    run(fs.forget([(a2.st_ino, 1)]))
    assert not fs.has_inode(a2.st_ino)
    d = mkdir(fs, ROOT_INODE, b"ro", mode=0o755)
    assert err(fs.tmpfile(d, 0o600, O_RDWR, USER)) == errno.EACCES


def test_symlinks(fs: MemoryFS) -> None:
    a = run(fs.symlink(ROOT_INODE, b"s", b"some/where", ROOT))
    assert stat.S_ISLNK(a.st_mode) and a.st_size == 10 and stat.S_IMODE(a.st_mode) == 0o777
    assert run(fs.readlink(a.st_ino, ROOT)) == b"some/where"
    assert run(fs.symlink(ROOT_INODE, b"long", b"x" * 4095, ROOT)).st_size == 4095
    assert err(fs.symlink(ROOT_INODE, b"toolong", b"x" * 4096, ROOT)) == errno.ENAMETOOLONG
    assert err(fs.symlink(ROOT_INODE, b"empty", b"", ROOT)) == errno.ENOENT
    assert err(fs.symlink(ROOT_INODE, b"s", b"t", ROOT)) == errno.EEXIST
    ino = mkfile(fs, ROOT_INODE, b"f")
    assert err(fs.readlink(ino, ROOT)) == errno.EINVAL


def test_mknod_kinds(fs: MemoryFS) -> None:
    dev = (8 << 8) | 1
    c = run(fs.mknod(ROOT_INODE, b"c", stat.S_IFCHR | 0o600, dev, ROOT))
    b = run(fs.mknod(ROOT_INODE, b"b", stat.S_IFBLK | 0o600, dev, ROOT))
    p = run(fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o644, 0, ROOT))
    s = run(fs.mknod(ROOT_INODE, b"s", stat.S_IFSOCK | 0o644, 0, ROOT))
    r = run(fs.mknod(ROOT_INODE, b"r", 0o644, 0, ROOT))  # type 0 = regular
    assert stat.S_ISCHR(c.st_mode) and c.st_rdev == dev
    assert stat.S_ISBLK(b.st_mode) and b.st_rdev == dev
    assert stat.S_ISFIFO(p.st_mode) and stat.S_ISSOCK(s.st_mode) and stat.S_ISREG(r.st_mode)
    assert attr(fs, c.st_ino).st_rdev == dev
    assert err(fs.mknod(ROOT_INODE, b"d", stat.S_IFDIR | 0o755, 0, ROOT)) == errno.EPERM
    assert err(fs.mknod(ROOT_INODE, b"l", stat.S_IFLNK | 0o777, 0, ROOT)) == errno.EINVAL
    assert err(fs.mknod(ROOT_INODE, b"u", stat.S_IFCHR | 0o600, dev, USER)) == errno.EPERM
    # A whiteout (char 0:0) needs no privilege; fifos neither.
    assert stat.S_ISCHR(run(fs.mknod(ROOT_INODE, b"w", stat.S_IFCHR, 0, USER)).st_mode)
    assert run(fs.mknod(ROOT_INODE, b"up", stat.S_IFIFO | 0o600, 0, USER)).st_uid == 1000
    assert err(fs.open(p.st_ino, O_RDONLY, ROOT)) == errno.ENXIO


# -- rename ------------------------------------------------------------------


def test_rename_basic_and_across_directories(fs: MemoryFS, clock: Clock) -> None:
    a = mkdir(fs, ROOT_INODE, b"a")
    b = mkdir(fs, ROOT_INODE, b"b")
    sub = mkdir(fs, a, b"sub")
    f = mkfile(fs, a, b"f", b"1")
    c0 = attr(fs, f).st_ctime_ns
    run(fs.rename(a, b"f", a, b"g", 0, ROOT))
    assert listdir(fs, a) == [b".", b"..", b"sub", b"g"]
    assert attr(fs, f).st_ctime_ns > c0
    run(fs.rename(a, b"sub", b, b"moved", 0, ROOT))
    assert (attr(fs, a).st_nlink, attr(fs, b).st_nlink) == (2, 3)
    assert run(fs.lookup(sub, b"..", ROOT)).st_ino == b
    bm = attr(fs, b)
    assert bm.st_mtime_ns == bm.st_ctime_ns == attr(fs, a).st_mtime_ns  # one rename, one instant


def test_rename_overwrite_rules(fs: MemoryFS) -> None:
    d1 = mkdir(fs, ROOT_INODE, b"d1")
    d2 = mkdir(fs, ROOT_INODE, b"d2")
    mkfile(fs, d2, b"inner")
    empty = mkdir(fs, ROOT_INODE, b"empty")
    f1 = mkfile(fs, ROOT_INODE, b"f1", b"one")
    f2 = mkfile(fs, ROOT_INODE, b"f2", b"two")
    assert err(fs.rename(ROOT_INODE, b"d1", ROOT_INODE, b"d2", 0, ROOT)) == errno.ENOTEMPTY
    assert err(fs.rename(ROOT_INODE, b"d1", ROOT_INODE, b"f1", 0, ROOT)) == errno.ENOTDIR
    assert err(fs.rename(ROOT_INODE, b"f1", ROOT_INODE, b"d1", 0, ROOT)) == errno.EISDIR
    assert err(fs.rename(ROOT_INODE, b"nope", ROOT_INODE, b"x", 0, ROOT)) == errno.ENOENT
    assert err(fs.rename(ROOT_INODE, b"f1", ROOT_INODE, b"f2", RENAME_NOREPLACE, ROOT)) == errno.EEXIST
    # Into its own subtree (or onto itself as parent).
    assert err(fs.rename(ROOT_INODE, b"d2", d2, b"x", 0, ROOT)) == errno.EINVAL
    sub = mkdir(fs, d1, b"sub")
    assert err(fs.rename(ROOT_INODE, b"d1", sub, b"x", 0, ROOT)) == errno.EINVAL
    # Target is an ancestor of the source.
    assert err(fs.rename(d1, b"sub", ROOT_INODE, b"d1", 0, ROOT)) == errno.ENOTEMPTY
    # Directory over an empty directory.
    run(fs.rename(ROOT_INODE, b"d1", ROOT_INODE, b"empty", 0, ROOT))
    assert attr(fs, empty).st_nlink == 0
    assert attr(fs, ROOT_INODE).st_nlink == 2 + 2  # d2 and "empty" (was d1)
    assert run(fs.lookup(ROOT_INODE, b"empty", ROOT)).st_ino == d1
    # File over file: the old target loses a link.
    run(fs.rename(ROOT_INODE, b"f1", ROOT_INODE, b"f2", 0, ROOT))
    assert attr(fs, f2).st_nlink == 0
    assert readall(fs, run(fs.lookup(ROOT_INODE, b"f2", ROOT)).st_ino) == b"one"
    run(fs.forget([(f2, fs.lookup_count(f2))]))
    assert not fs.has_inode(f2)
    assert fs.has_inode(f1)


def test_rename_same_inode_is_noop(fs: MemoryFS) -> None:
    f = mkfile(fs, ROOT_INODE, b"f", b"x")
    run(fs.link(f, ROOT_INODE, b"g", ROOT))
    run(fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0, ROOT))
    assert listdir(fs, ROOT_INODE) == [b".", b"..", b"f", b"g"]
    assert attr(fs, f).st_nlink == 2
    run(fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"f", 0, ROOT))
    run(fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", RENAME_EXCHANGE, ROOT))
    assert listdir(fs, ROOT_INODE) == [b".", b"..", b"f", b"g"]
    assert err(fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"f", RENAME_NOREPLACE, ROOT)) == errno.EEXIST
    d = mkdir(fs, ROOT_INODE, b"d")
    run(fs.rename(ROOT_INODE, b"d", ROOT_INODE, b"d", 0, ROOT))
    assert attr(fs, d).st_nlink == 2


def test_rename_exchange(fs: MemoryFS) -> None:
    a = mkdir(fs, ROOT_INODE, b"a")
    b = mkdir(fs, ROOT_INODE, b"b")
    f = mkfile(fs, a, b"x", b"file")
    d = mkdir(fs, b, b"y")
    mkfile(fs, d, b"inside")
    run(fs.rename(a, b"x", b, b"y", RENAME_EXCHANGE, ROOT))
    assert run(fs.lookup(a, b"x", ROOT)).st_ino == d
    assert run(fs.lookup(b, b"y", ROOT)).st_ino == f
    assert (attr(fs, a).st_nlink, attr(fs, b).st_nlink) == (3, 2)
    assert run(fs.lookup(d, b"..", ROOT)).st_ino == a
    assert err(fs.rename(a, b"x", b, b"nope", RENAME_EXCHANGE, ROOT)) == errno.ENOENT
    assert err(fs.rename(ROOT_INODE, b"a", d, b"inside", RENAME_EXCHANGE, ROOT)) == errno.EINVAL
    assert err(fs.rename(d, b"inside", ROOT_INODE, b"a", RENAME_EXCHANGE, ROOT)) == errno.EINVAL
    for flags in (RENAME_EXCHANGE | RENAME_NOREPLACE, RENAME_EXCHANGE | RENAME_WHITEOUT, 8):
        assert err(fs.rename(a, b"x", b, b"y", flags, ROOT)) == errno.EINVAL


def test_rename_dot_names_and_whiteout(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    mkfile(fs, d, b"f")
    assert err(fs.rename(d, b".", ROOT_INODE, b"x", 0, ROOT)) == errno.EBUSY
    assert err(fs.rename(d, b"f", ROOT_INODE, b"..", 0, ROOT)) == errno.EBUSY
    assert err(fs.rename(d, b"f", ROOT_INODE, b"..", RENAME_NOREPLACE, ROOT)) == errno.EEXIST
    assert err(fs.rename(d, b"f", ROOT_INODE, b"x" * 256, 0, ROOT)) == errno.ENAMETOOLONG
    run(fs.rename(d, b"f", ROOT_INODE, b"g", RENAME_WHITEOUT, ROOT))
    wh = run(fs.lookup(d, b"f", ROOT))
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    mkfile(fs, d, b"h")
    chmod(fs, d, 0o777)
    assert err(fs.rename(d, b"h", ROOT_INODE, b"i", RENAME_WHITEOUT, USER)) == errno.EPERM
    run(fs.rename(d, b"h", ROOT_INODE, b"i", 0, USER))


# -- permissions -------------------------------------------------------------


def test_search_and_write_permission_on_directories(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d", mode=0o700)  # owned by root
    mkfile(fs, d, b"f")
    assert err(fs.lookup(d, b"f", USER)) == errno.EACCES
    assert err(fs.create(d, b"g", 0o644, O_RDWR, USER)) == errno.EACCES
    assert err(fs.opendir(d, USER)) == errno.EACCES
    chmod(fs, d, 0o711)  # search only
    assert run(fs.lookup(d, b"f", USER)).st_ino
    assert err(fs.opendir(d, USER)) == errno.EACCES
    assert err(fs.mkdir(d, b"g", 0o755, USER)) == errno.EACCES
    assert err(fs.unlink(d, b"f", USER)) == errno.EACCES
    assert err(fs.rename(d, b"f", ROOT_INODE, b"g", 0, USER)) == errno.EACCES
    assert err(fs.symlink(d, b"s", b"t", USER)) == errno.EACCES
    assert err(fs.link(run(fs.lookup(d, b"f", ROOT)).st_ino, d, b"l", USER)) == errno.EACCES
    # EEXIST wins over EACCES when the name exists (like Linux may_create).
    assert err(fs.mkdir(d, b"f", 0o755, USER)) == errno.EEXIST
    chmod(fs, d, 0o733)
    assert run(fs.mkdir(d, b"g", 0o755, USER)).st_uid == 1000
    # Root bypasses everything on directories.
    chmod(fs, d, 0o000)
    assert run(fs.lookup(d, b"f", ROOT)).st_ino
    assert listdir(fs, d) == [b".", b"..", b"f", b"g"]


def test_file_permission_bits(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"x", mode=0o640)
    chown(fs, ino, 1000, 2000)
    owner, member, other = USER, RequestContext(1001, 3000, 9, groups=(2000,)), OTHER
    assert run(fs.open(ino, O_RDWR, owner)).fh
    assert err(fs.open(ino, O_WRONLY, member)) == errno.EACCES
    assert run(fs.open(ino, O_RDONLY, member)).fh
    assert err(fs.open(ino, O_RDONLY, other)) == errno.EACCES
    # The owner class does not fall through to group or other bits.
    chmod(fs, ino, 0o077)
    assert err(fs.open(ino, O_RDONLY, owner)) == errno.EACCES
    assert run(fs.open(ino, O_RDWR, member)).fh
    assert run(fs.open(ino, O_RDWR, ROOT)).fh  # root bypasses r/w
    # access(): root needs one x bit to execute a file.
    chmod(fs, ino, 0o644)
    assert err(fs.access(ino, 1, ROOT)) == errno.EACCES
    run(fs.access(ino, 4 | 2, ROOT))
    chmod(fs, ino, 0o601)
    run(fs.access(ino, 1, ROOT))
    assert err(fs.access(ino, 1, owner)) == errno.EACCES
    run(fs.access(ino, 1, other))
    run(fs.access(ino, 0, other))
    assert err(fs.access(ino, 8, ROOT)) == errno.EINVAL
    d = mkdir(fs, ROOT_INODE, b"d", mode=0o000)
    run(fs.access(d, 7, ROOT))
    assert err(fs.access(d, 1, USER)) == errno.EACCES


def test_sticky_directory(fs: MemoryFS) -> None:
    tmp = mkdir(fs, ROOT_INODE, b"tmp", mode=0o1777)
    mine = mkfile(fs, tmp, b"mine", ctx=USER)
    theirs = mkfile(fs, tmp, b"theirs", ctx=OTHER)
    assert run(fs.getattr(mine, ROOT)).st_uid == 1000 and attr(fs, theirs).st_uid == 1001
    assert err(fs.unlink(tmp, b"theirs", USER)) == errno.EPERM
    assert err(fs.rename(tmp, b"theirs", tmp, b"x", 0, USER)) == errno.EPERM
    # Overwriting someone else's file by rename is a delete too.
    assert err(fs.rename(tmp, b"mine", tmp, b"theirs", 0, USER)) == errno.EPERM
    run(fs.rename(tmp, b"mine", tmp, b"mine2", 0, USER))
    run(fs.unlink(tmp, b"mine2", USER))
    dd = mkdir(fs, tmp, b"dd", ctx=OTHER)
    assert err(fs.rmdir(tmp, b"dd", USER)) == errno.EPERM
    # The directory's owner and root may remove anything.
    chown(fs, tmp, 1000, None)
    run(fs.unlink(tmp, b"theirs", USER))
    chown(fs, tmp, 0, None)
    run(fs.rmdir(tmp, b"dd", ROOT))
    assert not fs.has_inode(dd) or attr(fs, dd).st_nlink == 0


def test_moving_directory_needs_write_on_it(fs: MemoryFS) -> None:
    a = mkdir(fs, ROOT_INODE, b"a", mode=0o777)
    b = mkdir(fs, ROOT_INODE, b"b", mode=0o777)
    mkdir(fs, a, b"sub", mode=0o555)  # root-owned, no write for USER
    assert err(fs.rename(a, b"sub", b, b"sub", 0, USER)) == errno.EACCES
    run(fs.rename(a, b"sub", a, b"renamed", 0, USER))  # same parent: no ".." change
    chmod(fs, run(fs.lookup(a, b"renamed", ROOT)).st_ino, 0o777)
    run(fs.rename(a, b"renamed", b, b"sub", 0, USER))


def test_chmod_rules(fs: MemoryFS, clock: Clock) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", mode=0o644, ctx=USER)
    before = attr(fs, ino)
    assert err(fs.setattr(ino, EntryAttributes(st_mode=0o777), SetattrFields(update_mode=True), None, OTHER)) == errno.EPERM
    a = chmod(fs, ino, 0o4755, USER)
    assert stat.S_IMODE(a.st_mode) == 0o4755 and stat.S_ISREG(a.st_mode)
    assert a.st_ctime_ns > before.st_ctime_ns and a.st_mtime_ns == before.st_mtime_ns
    # Owner not in the file's group: S_ISGID silently dropped.
    chown(fs, ino, None, 5000)
    assert stat.S_IMODE(chmod(fs, ino, 0o2755, USER).st_mode) == 0o0755
    in_group = RequestContext(1000, 1000, 2, groups=(5000,))
    assert stat.S_IMODE(chmod(fs, ino, 0o2755, in_group).st_mode) == 0o2755
    assert stat.S_IMODE(chmod(fs, ino, 0o2755, ROOT).st_mode) == 0o2755


def test_chown_rules(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", ctx=USER)
    member = RequestContext(1000, 1000, 2, groups=(7,))
    assert err(fs.setattr(ino, EntryAttributes(st_uid=1001), SetattrFields(update_uid=True), None, USER)) == errno.EPERM
    chown(fs, ino, 1000, None, USER)  # chown to oneself is allowed
    assert chown(fs, ino, None, 7, member).st_gid == 7
    assert err(fs.setattr(ino, EntryAttributes(st_gid=8), SetattrFields(update_gid=True), None, member)) == errno.EPERM
    assert err(fs.setattr(ino, EntryAttributes(st_gid=7), SetattrFields(update_gid=True), None, OTHER)) == errno.EPERM
    a = chown(fs, ino, 1234, 4321, ROOT)
    assert (a.st_uid, a.st_gid) == (1234, 4321)


def test_chown_and_write_kill_suid_sgid(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"x", mode=0o6755, ctx=ROOT)
    chmod(fs, ino, 0o6777)
    # Write by root keeps the bits.
    fh = run(fs.open(ino, O_RDWR, ROOT)).fh
    run(fs.write(fh, 0, [memoryview(b"y")], ROOT))
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o6777
    # Write by anyone else drops suid, and sgid because group-exec is set.
    run(fs.write(fh, 0, [memoryview(b"z")], USER))
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o0777
    # sgid without group exec (mandatory-locking marker) stays.
    chmod(fs, ino, 0o6767)
    run(fs.write(fh, 0, [memoryview(b"z")], USER))
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o2767
    # chown drops them even when root does it (pjdfstest expects this).
    chmod(fs, ino, 0o6755)
    assert stat.S_IMODE(chown(fs, ino, 5, 5).st_mode) == 0o0755
    # Directories keep S_ISGID on chown.
    d = mkdir(fs, ROOT_INODE, b"d", mode=0o2755)
    assert stat.S_IMODE(attr(fs, d).st_mode) == 0o755  # mkdir masks S_ISGID
    chmod(fs, d, 0o2755)
    assert stat.S_IMODE(chown(fs, d, 5, 5).st_mode) == 0o2755


def test_truncate_kill_suid_sgid(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abc", mode=0o6777)
    chmod(fs, ino, 0o6777)
    run(truncate(fs, ino, 1, ROOT))
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o6777
    run(truncate(fs, ino, 1, ROOT, kill_suidgid=True))  # the kernel asks for it
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o0777
    chmod(fs, ino, 0o6777)
    run(truncate(fs, ino, 0, USER))  # non-root truncate
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o0777
    chmod(fs, ino, 0o6777)
    run(fs.open(ino, O_WRONLY | O_TRUNC, USER))
    assert stat.S_IMODE(attr(fs, ino).st_mode) == 0o0777


def test_truncate_permissions(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", b"abc", mode=0o644)
    assert err(truncate(fs, ino, 0, USER)) == errno.EACCES
    fh = run(fs.open(ino, O_RDWR, ROOT)).fh
    # ftruncate on a writable handle is checked at open time, not here.
    fields = SetattrFields(update_size=True)
    run(fs.setattr(ino, EntryAttributes(st_size=1), fields, fh, USER))
    assert attr(fs, ino).st_size == 1


def test_utimens(fs: MemoryFS, clock: Clock) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f", mode=0o666, ctx=USER)
    explicit = SetattrFields(update_atime=True, update_mtime=True)
    now = SetattrFields(update_atime=True, update_mtime=True, update_atime_now=True, update_mtime_now=True)
    vals = EntryAttributes(st_atime_ns=123, st_mtime_ns=456)
    a = run(fs.setattr(ino, vals, explicit, None, USER))
    assert (a.st_atime_ns, a.st_mtime_ns) == (123, 456)
    assert a.st_ctime_ns > 456
    assert err(fs.setattr(ino, vals, explicit, None, OTHER)) == errno.EPERM
    t0 = clock.now
    a = run(fs.setattr(ino, vals, now, None, OTHER))  # write permission suffices
    assert a.st_atime_ns > t0 and a.st_mtime_ns > t0
    chmod(fs, ino, 0o644, USER)
    assert err(fs.setattr(ino, vals, now, None, OTHER)) == errno.EACCES
    # Only mtime, explicit; atime untouched.
    a = run(fs.setattr(ino, EntryAttributes(st_mtime_ns=7), SetattrFields(update_mtime=True), None, ROOT))
    assert a.st_mtime_ns == 7 and a.st_atime_ns > t0
    # An explicit ctime (FATTR_CTIME) is applied as given.
    a = run(fs.setattr(ino, EntryAttributes(st_ctime_ns=99), SetattrFields(update_ctime=True), None, ROOT))
    assert a.st_ctime_ns == 99


def test_timestamps(fs: MemoryFS, clock: Clock) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    d0 = attr(fs, d)
    info, f0 = run(fs.create(d, b"f", 0o644, O_RDWR, ROOT))
    d1 = attr(fs, d)
    assert d1.st_mtime_ns > d0.st_mtime_ns and d1.st_ctime_ns > d0.st_ctime_ns
    assert f0.st_atime_ns == f0.st_mtime_ns == f0.st_ctime_ns == d1.st_mtime_ns
    run(fs.write(info.fh, 0, [memoryview(b"x")], ROOT))
    f1 = attr(fs, f0.st_ino)
    assert f1.st_mtime_ns > f0.st_mtime_ns and f1.st_ctime_ns == f1.st_mtime_ns
    assert f1.st_atime_ns == f0.st_atime_ns
    run(fs.read(info.fh, 0, 1))
    f2 = attr(fs, f0.st_ino)
    assert f2.st_atime_ns > f1.st_atime_ns and f2.st_mtime_ns == f1.st_mtime_ns
    assert attr(fs, d).st_mtime_ns == d1.st_mtime_ns  # writing a file leaves the dir alone
    run(fs.setxattr(f0.st_ino, b"user.k", b"v", 0, ROOT))
    f3 = attr(fs, f0.st_ino)
    assert f3.st_ctime_ns > f2.st_ctime_ns and f3.st_mtime_ns == f2.st_mtime_ns
    run(fs.unlink(d, b"f", ROOT))
    f4 = attr(fs, f0.st_ino)
    assert f4.st_ctime_ns > f3.st_ctime_ns
    assert attr(fs, d).st_mtime_ns > d1.st_mtime_ns
    run(truncate(fs, f0.st_ino, 0))
    f5 = attr(fs, f0.st_ino)
    assert f5.st_mtime_ns > f4.st_mtime_ns and f5.st_ctime_ns == f5.st_mtime_ns


def test_setgid_directory_inheritance(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"shared")
    chown(fs, d, 0, 500)
    chmod(fs, d, 0o2777)
    f = run(fs.create(d, b"f", 0o644, O_RDWR, USER))[1]
    assert f.st_gid == 500 and not f.st_mode & stat.S_ISGID
    sub = run(fs.mkdir(d, b"sub", 0o755, USER))
    assert sub.st_gid == 500 and sub.st_mode & stat.S_ISGID
    deeper = run(fs.mkdir(sub.st_ino, b"deeper", 0o700, USER))
    assert deeper.st_gid == 500 and deeper.st_mode & stat.S_ISGID
    # A non-member asking for a setgid+group-exec file loses S_ISGID.
    g = run(fs.create(d, b"g", 0o2755, O_RDWR, USER))[1]
    assert stat.S_IMODE(g.st_mode) == 0o755
    member = RequestContext(1000, 1000, 2, groups=(500,))
    h = run(fs.create(d, b"h", 0o2755, O_RDWR, member))[1]
    assert stat.S_IMODE(h.st_mode) == 0o2755
    # Outside a setgid directory the creator's gid is used.
    plain = mkdir(fs, ROOT_INODE, b"plain", mode=0o777)
    assert run(fs.mknod(plain, b"p", stat.S_IFIFO | 0o644, 0, USER)).st_gid == 1000
    # mkdir drops a requested S_ISUID/S_ISGID unless inherited.
    assert stat.S_IMODE(run(fs.mkdir(plain, b"x", 0o6755, USER)).st_mode) == 0o755


def test_umask_applied_when_given(fs: MemoryFS) -> None:
    ctx = RequestContext(0, 0, 1, umask=0o022)
    assert stat.S_IMODE(run(fs.mkdir(ROOT_INODE, b"d", 0o777, ctx)).st_mode) == 0o755
    assert stat.S_IMODE(run(fs.create(ROOT_INODE, b"f", 0o666, O_RDWR, ctx))[1].st_mode) == 0o644


# -- xattrs --------------------------------------------------------------------


def test_xattr_basic(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f")
    assert err(fs.getxattr(ino, b"user.a", ROOT)) == errno.ENODATA
    run(fs.setxattr(ino, b"user.a", b"1", 0, ROOT))
    assert run(fs.getxattr(ino, b"user.a", ROOT)) == b"1"
    assert err(fs.setxattr(ino, b"user.a", b"2", XATTR_CREATE, ROOT)) == errno.EEXIST
    assert err(fs.setxattr(ino, b"user.b", b"2", XATTR_REPLACE, ROOT)) == errno.ENODATA
    run(fs.setxattr(ino, b"user.a", b"3", XATTR_REPLACE, ROOT))
    run(fs.setxattr(ino, b"user.b", b"", XATTR_CREATE, ROOT))
    assert run(fs.getxattr(ino, b"user.b", ROOT)) == b""
    assert sorted(run(fs.listxattr(ino, ROOT))) == [b"user.a", b"user.b"]
    run(fs.removexattr(ino, b"user.a", ROOT))
    assert err(fs.removexattr(ino, b"user.a", ROOT)) == errno.ENODATA
    assert list(run(fs.listxattr(ino, ROOT))) == [b"user.b"]
    assert err(fs.setxattr(ino, b"user.c", b"", 4, ROOT)) == errno.EINVAL


def test_xattr_limits(fs: MemoryFS) -> None:
    ino = mkfile(fs, ROOT_INODE, b"f")
    long_name = b"user." + b"n" * 250  # 255 bytes
    run(fs.setxattr(ino, long_name, b"v" * 65536, 0, ROOT))
    assert len(run(fs.getxattr(ino, long_name, ROOT))) == 65536
    assert err(fs.setxattr(ino, long_name + b"x", b"v", 0, ROOT)) == errno.ERANGE
    assert err(fs.getxattr(ino, long_name + b"x", ROOT)) == errno.ERANGE
    assert err(fs.setxattr(ino, b"", b"v", 0, ROOT)) == errno.ERANGE
    assert err(fs.setxattr(ino, b"user.big", b"v" * 65537, 0, ROOT)) == errno.E2BIG
    assert err(fs.setxattr(ino, b"nonsense.x", b"v", 0, ROOT)) == errno.EOPNOTSUPP
    assert err(fs.getxattr(ino, b"nonsense.x", ROOT)) == errno.EOPNOTSUPP
    assert err(fs.setxattr(ino, b"system.posix_acl_access", b"v", 0, ROOT)) == errno.EOPNOTSUPP
    assert err(fs.setxattr(ino, b"user.", b"v", 0, ROOT)) == errno.EINVAL
    # Per-inode memory bound on values.
    for i in range(15):  # 16 values of 64 KiB: the 1 MiB bound
        run(fs.setxattr(ino, b"user.fill%d" % i, b"v" * 65536, 0, ROOT))
    assert err(fs.setxattr(ino, b"user.more", b"v" * 65536, 0, ROOT)) == errno.ENOSPC


def test_xattr_namespaces_and_permissions(fs: MemoryFS) -> None:
    f = mkfile(fs, ROOT_INODE, b"f", mode=0o644, ctx=USER)
    s = run(fs.symlink(ROOT_INODE, b"s", b"f", ROOT)).st_ino
    p = run(fs.mknod(ROOT_INODE, b"p", stat.S_IFIFO | 0o666, 0, ROOT)).st_ino
    d = mkdir(fs, ROOT_INODE, b"d", mode=0o777)
    # user.* only on regular files and directories.
    assert err(fs.setxattr(s, b"user.a", b"1", 0, ROOT)) == errno.EPERM
    assert err(fs.setxattr(p, b"user.a", b"1", 0, ROOT)) == errno.EPERM
    assert err(fs.getxattr(s, b"user.a", ROOT)) == errno.ENODATA
    run(fs.setxattr(d, b"user.a", b"1", 0, ROOT))
    run(fs.setxattr(s, b"trusted.a", b"1", 0, ROOT))  # other namespaces are fine
    # user.* follows the file's permission bits.
    run(fs.setxattr(f, b"user.a", b"1", 0, USER))
    assert run(fs.getxattr(f, b"user.a", OTHER)) == b"1"
    assert err(fs.setxattr(f, b"user.b", b"1", 0, OTHER)) == errno.EACCES
    assert err(fs.removexattr(f, b"user.a", OTHER)) == errno.EACCES
    chmod(fs, f, 0o600, USER)
    assert err(fs.getxattr(f, b"user.a", OTHER)) == errno.EACCES
    # trusted.* is root-only and hidden from others.
    run(fs.setxattr(f, b"trusted.t", b"1", 0, ROOT))
    assert err(fs.setxattr(f, b"trusted.u", b"1", 0, USER)) == errno.EPERM
    assert err(fs.getxattr(f, b"trusted.t", USER)) == errno.ENODATA
    assert sorted(run(fs.listxattr(f, USER))) == [b"user.a"]
    assert sorted(run(fs.listxattr(f, ROOT))) == [b"trusted.t", b"user.a"]
    # security.*: readable by all, writable by root.
    run(fs.setxattr(f, b"security.x", b"lbl", 0, ROOT))
    assert run(fs.getxattr(f, b"security.x", OTHER)) == b"lbl"
    assert err(fs.setxattr(f, b"security.y", b"1", 0, USER)) == errno.EPERM
    # Sticky directory: only its owner (or root) writes user.* on it.
    t = mkdir(fs, ROOT_INODE, b"t", mode=0o1777)
    assert err(fs.setxattr(t, b"user.a", b"1", 0, USER)) == errno.EPERM
    chown(fs, t, 1000, None)
    run(fs.setxattr(t, b"user.a", b"1", 0, USER))


# -- readdir -------------------------------------------------------------------


def test_readdir_offsets_and_plus_lookup_counts(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    inos = [mkfile(fs, d, b"f%d" % i) for i in range(5)]
    fh = run(fs.opendir(d, ROOT)).fh
    reply = Collect()
    run(fs.readdir(fh, 0, reply))
    assert reply.names == [b".", b"..", b"f0", b"f1", b"f2", b"f3", b"f4"]
    assert [e[2] for e in reply.entries] == [1, 2, 3, 4, 5, 6, 7]
    assert reply.entries[0][1].st_ino == d and reply.entries[1][1].st_ino == ROOT_INODE
    counts = [fs.lookup_count(i) for i in inos]
    # Paged, plus: only accepted entries count, "." and ".." never do.
    page = Collect(plus=True, limit=3)
    run(fs.readdir(fh, 0, page))
    assert page.names == [b".", b"..", b"f0"]
    assert fs.lookup_count(inos[0]) == counts[0] + 1 and fs.lookup_count(inos[1]) == counts[1]
    assert fs.lookup_count(d) == 1 and fs.lookup_count(ROOT_INODE) == 0
    page2 = Collect(plus=True, limit=2)
    run(fs.readdir(fh, page.entries[-1][2], page2))
    assert page2.names == [b"f1", b"f2"]
    rest = Collect()
    run(fs.readdir(fh, page2.entries[-1][2], rest))
    assert rest.names == [b"f3", b"f4"]
    end = Collect()
    run(fs.readdir(fh, rest.entries[-1][2], end))
    assert end.names == []
    run(fs.readdir(fh, 1, end))
    assert end.names[0] == b".."
    f = mkfile(fs, d, b"file")
    ffh = run(fs.open(f, O_RDONLY, ROOT)).fh
    assert err(fs.readdir(ffh, 0, Collect())) == errno.ENOTDIR


def test_readdir_stable_under_concurrent_changes(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    for i in range(300):
        mkfile(fs, d, b"e%03d" % i)
    fh = run(fs.opendir(d, ROOT)).fh
    seen: list[bytes] = []
    offset = 0
    removed: set[bytes] = set()
    added = itertools.count()
    rounds = 0
    for _ in bounded():
        page = Collect(limit=7)
        run(fs.readdir(fh, offset, page))
        if not page.entries:
            break
        seen += page.names
        offset = page.entries[-1][2]
        # Between pages: remove some seen and some unseen entries, add new ones.
        rounds += 1
        for name in (b"e%03d" % (rounds * 3), b"e%03d" % (299 - rounds * 2)):
            if name not in removed and rounds * 3 < 300:
                run(fs.unlink(d, name, ROOT))
                removed.add(name)
        if rounds < 60:
            mkfile(fs, d, b"new%d" % next(added))
            mkfile(fs, d, b"new%d" % next(added))
    survivors = {b"e%03d" % i for i in range(300)} - removed
    names = [n for n in seen if n not in (b".", b"..")]
    assert len(names) == len(set(names)), "an entry was returned twice"
    assert survivors <= set(names), "a surviving entry was skipped"
    assert all(n.startswith(b"new") or n not in removed or n in seen for n in names)
    # Entries added during the listing are appended, hence all seen here.
    assert {b"new%d" % i for i in range(next(added))} <= set(names)


def test_readdir_of_removed_directory_is_empty(fs: MemoryFS) -> None:
    d = mkdir(fs, ROOT_INODE, b"d")
    fh = run(fs.opendir(d, ROOT)).fh
    run(fs.rmdir(ROOT_INODE, b"d", ROOT))
    reply = Collect()
    run(fs.readdir(fh, 0, reply))
    assert reply.names == []
    run(fs.releasedir(fh))
    run(fs.forget([(d, 1)]))
    assert not fs.has_inode(d)


def test_destroy_resets_counts_and_handles(fs: MemoryFS) -> None:
    keep = mkfile(fs, ROOT_INODE, b"keep", b"k")
    info, a = run(fs.create(ROOT_INODE, b"gone", 0o644, O_RDWR, ROOT))
    run(fs.unlink(ROOT_INODE, b"gone", ROOT))
    run(fs.destroy())
    assert not fs.has_inode(a.st_ino)
    assert fs.lookup_count(keep) == 0 and fs.has_inode(keep)
    assert err(fs.read(info.fh, 0, 1)) == errno.EBADF
    assert readall(fs, run(fs.lookup(ROOT_INODE, b"keep", ROOT)).st_ino) == b"k"


# -- model-based test ------------------------------------------------------------


class MFile:
    def __init__(self) -> None:
        self.data = bytearray()
        self.nlink = 1
        self.xattrs: dict[bytes, bytes] = {}


class MSym:
    def __init__(self, target: bytes) -> None:
        self.target = target
        self.nlink = 1


class MDir:
    def __init__(self) -> None:
        self.children: dict[bytes, Any] = {}
        self.xattrs: dict[bytes, bytes] = {}


NAMES = st.sampled_from([b"a", b"b", b"c", b"d"])
XNAMES = st.sampled_from([b"user.x", b"user.y"])
#: File data without zero bytes, so stale bytes never pass for a hole.
PAYLOAD = st.binary(max_size=600).map(lambda b: bytes(x % 255 + 1 for x in b))
CHUNK = 512


def outcome(coro: Coroutine[Any, Any, Any]) -> tuple[Any, int | None]:
    try:
        return run(coro), None
    except FuseError as e:
        return None, e.errno


class MemoryFSMachine(RuleBasedStateMachine):
    """MemoryFS against a tree of dicts; every step checked in full."""

    def __init__(self) -> None:
        super().__init__()
        self.fs = MemoryFS(chunk_size=CHUNK, size_bytes=1 << 24)
        self.root = MDir()
        self.looked: dict[int, int] = {}  # lookups we hold, to forget later
        self.open: list[tuple[int, MFile]] = []  # (fh, model file) kept open
        self.fresh = itertools.count()

    # -- helpers --
    def count(self, ino: int) -> None:
        self.looked[ino] = self.looked.get(ino, 0) + 1

    def walk(self) -> list[tuple[tuple[bytes, ...], Any]]:
        out: list[tuple[tuple[bytes, ...], Any]] = [((), self.root)]
        i = 0
        while i < len(out):
            path, node = out[i]
            i += 1
            if isinstance(node, MDir):
                out += [(path + (n,), c) for n, c in node.children.items()]
        return out

    def paths(self, kind: type | tuple[type, ...] | None = None, root: bool = False) -> list[tuple[bytes, ...]]:
        return [p for p, n in self.walk() if (root or p) and (kind is None or isinstance(n, kind))]

    def model(self, path: tuple[bytes, ...]) -> Any:
        node = self.root
        for n in path:
            node = node.children[n]
        return node

    def ino(self, path: tuple[bytes, ...]) -> int:
        ino = ROOT_INODE
        for n in path:
            ino = run(self.fs.lookup(ino, n, ROOT)).st_ino
            self.count(ino)
        return ino

    def has(self, kind: type | tuple[type, ...]) -> bool:
        return any(isinstance(n, kind) for _, n in self.walk())

    def draw(self, data: st.DataObject, choices: list[tuple[bytes, ...]]) -> tuple[bytes, ...]:
        assert choices  # preconditions guarantee it
        return data.draw(st.sampled_from(sorted(choices)))

    # -- rules --
    @initialize(first=PAYLOAD, second=PAYLOAD)
    def populate(self, first: bytes, second: bytes) -> None:
        """Start from a small tree (dirs at two depths, files with data, a
        symlink) so that short runs already reach interesting cases."""
        a = run(self.fs.mkdir(ROOT_INODE, b"a", 0o755, ROOT)).st_ino
        b = run(self.fs.mkdir(ROOT_INODE, b"b", 0o755, ROOT)).st_ino
        c = run(self.fs.mkdir(a, b"c", 0o755, ROOT)).st_ino
        s = run(self.fs.symlink(ROOT_INODE, b"c", b"a/c", ROOT)).st_ino
        for ino in (a, b, c, s):
            self.count(ino)
        self.root.children = {b"a": MDir(), b"b": MDir(), b"c": MSym(b"a/c")}
        self.root.children[b"a"].children[b"c"] = MDir()
        for parent, name, payload in ((a, b"d", first), (b, b"a", second)):
            info, at = run(self.fs.create(parent, name, 0o644, O_RDWR, ROOT))
            self.count(at.st_ino)
            run(self.fs.write(info.fh, 0, [memoryview(payload)], ROOT))
            run(self.fs.release(info.fh))
            m = MFile()
            m.data[:] = payload
            self.model((b"a",) if parent == a else (b"b",)).children[name] = m

    @rule(data=st.data(), name=NAMES)
    def mkdir(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw(data, self.paths(MDir, root=True))
        pnode = self.model(parent)
        res, e = outcome(self.fs.mkdir(self.ino(parent), name, 0o755, ROOT))
        if name in pnode.children:
            assert e == errno.EEXIST
        else:
            assert e is None
            self.count(res.st_ino)
            pnode.children[name] = MDir()

    @rule(data=st.data(), name=NAMES)
    def create(self, data: st.DataObject, name: bytes) -> None:
        parent = self.draw(data, self.paths(MDir, root=True))
        pnode = self.model(parent)
        res, e = outcome(self.fs.create(self.ino(parent), name, 0o644, O_RDWR, ROOT))
        if name in pnode.children:
            assert e == errno.EEXIST
        else:
            assert e is None
            info, a = res
            self.count(a.st_ino)
            run(self.fs.release(info.fh))
            pnode.children[name] = MFile()

    @rule(data=st.data(), name=NAMES, link_to=st.binary(min_size=1, max_size=8))
    def symlink(self, data: st.DataObject, name: bytes, link_to: bytes) -> None:
        parent = self.draw(data, self.paths(MDir, root=True))
        pnode = self.model(parent)
        res, e = outcome(self.fs.symlink(self.ino(parent), name, link_to, ROOT))
        if name in pnode.children:
            assert e == errno.EEXIST
        else:
            assert e is None
            self.count(res.st_ino)
            pnode.children[name] = MSym(link_to)

    @precondition(lambda self: self.has(MFile))
    @rule(data=st.data(), offset=st.integers(0, 4 * CHUNK), payload=PAYLOAD)
    def write(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        path = self.draw(data, self.paths(MFile))
        m = self.model(path)
        fh = run(self.fs.open(self.ino(path), O_WRONLY, ROOT)).fh
        assert run(self.fs.write(fh, offset, [memoryview(payload)], ROOT)) == len(payload)
        run(self.fs.release(fh))
        if payload:
            if len(m.data) < offset:
                m.data += bytes(offset - len(m.data))
            m.data[offset : offset + len(payload)] = payload

    @precondition(lambda self: self.has(MFile))
    @rule(data=st.data(), size=st.integers(0, 4 * CHUNK), shrink=st.booleans())
    def truncate(self, data: st.DataObject, size: int, shrink: bool) -> None:
        path = self.draw(data, self.paths(MFile))
        m = self.model(path)
        if shrink and m.data:
            size = data.draw(st.integers(0, len(m.data) - 1))  # cut into stored data
        a = run(truncate(self.fs, self.ino(path), size))
        assert a.st_size == size
        if size < len(m.data):
            del m.data[size:]
        else:
            m.data += bytes(size - len(m.data))

    @precondition(lambda self: bool(self.root.children))
    @rule(data=st.data(), name=NAMES, flags=st.sampled_from([0, RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_EXCHANGE]))
    def rename(self, data: st.DataObject, name: bytes, flags: int) -> None:
        src = self.draw(data, self.paths())
        dstdir = self.draw(data, self.paths(MDir, root=True))
        sparent, sname = self.model(src[:-1]), src[-1]
        snode = sparent.children[sname]
        dparent = self.model(dstdir)
        if dparent.children and data.draw(st.booleans()):
            name = data.draw(st.sampled_from(sorted(dparent.children)))  # aim at an entry
        dnode = dparent.children.get(name)
        exchange = flags == RENAME_EXCHANGE
        expect: int | None = None
        if flags == RENAME_NOREPLACE and dnode is not None:
            expect = errno.EEXIST
        elif exchange and dnode is None:
            expect = errno.ENOENT
        elif isinstance(snode, MDir) and dstdir[: len(src)] == src:
            expect = errno.EINVAL
        elif isinstance(dnode, MDir) and src[:-1][: len(dstdir) + 1] == dstdir + (name,):
            expect = errno.EINVAL if exchange else errno.ENOTEMPTY
        elif snode is dnode:
            expect = None
        elif not exchange and dnode is not None:
            if isinstance(snode, MDir) and not isinstance(dnode, MDir):
                expect = errno.ENOTDIR
            elif not isinstance(snode, MDir) and isinstance(dnode, MDir):
                expect = errno.EISDIR
            elif isinstance(dnode, MDir) and dnode.children:
                expect = errno.ENOTEMPTY
        _, e = outcome(self.fs.rename(self.ino(src[:-1]), sname, self.ino(dstdir), name, flags, ROOT))
        assert e == expect, (src, dstdir, name, flags)
        if e is not None or snode is dnode:
            return
        if exchange:
            sparent.children[sname], dparent.children[name] = dnode, snode
        else:
            if dnode is not None and not isinstance(dnode, MDir):
                dnode.nlink -= 1
            del sparent.children[sname]
            dparent.children[name] = snode

    @precondition(lambda self: self.has((MFile, MSym)))
    @rule(data=st.data(), name=NAMES)
    def link(self, data: st.DataObject, name: bytes) -> None:
        src = self.draw(data, self.paths((MFile, MSym)))
        dstdir = self.draw(data, self.paths(MDir, root=True))
        m = self.model(src)
        dparent = self.model(dstdir)
        res, e = outcome(self.fs.link(self.ino(src), self.ino(dstdir), name, ROOT))
        if name in dparent.children:
            assert e == errno.EEXIST
        else:
            assert e is None
            self.count(res.st_ino)
            m.nlink += 1
            dparent.children[name] = m
            assert res.st_nlink == m.nlink

    @precondition(lambda self: bool(self.root.children))
    @rule(data=st.data())
    def unlink(self, data: st.DataObject) -> None:
        path = self.draw(data, self.paths())
        parent = self.model(path[:-1])
        m = parent.children[path[-1]]
        _, e = outcome(self.fs.unlink(self.ino(path[:-1]), path[-1], ROOT))
        if isinstance(m, MDir):
            assert e == errno.EISDIR
        else:
            assert e is None
            m.nlink -= 1
            del parent.children[path[-1]]

    @precondition(lambda self: bool(self.root.children))
    @rule(data=st.data())
    def rmdir(self, data: st.DataObject) -> None:
        path = self.draw(data, self.paths())
        parent = self.model(path[:-1])
        m = parent.children[path[-1]]
        _, e = outcome(self.fs.rmdir(self.ino(path[:-1]), path[-1], ROOT))
        if not isinstance(m, MDir):
            assert e == errno.ENOTDIR
        elif m.children:
            assert e == errno.ENOTEMPTY
        else:
            assert e is None
            del parent.children[path[-1]]

    @rule(data=st.data(), name=XNAMES, value=st.binary(max_size=16))
    def setxattr(self, data: st.DataObject, name: bytes, value: bytes) -> None:
        path = self.draw(data, self.paths(root=True))
        m = self.model(path)
        _, e = outcome(self.fs.setxattr(self.ino(path), name, value, 0, ROOT))
        if isinstance(m, MSym):
            assert e == errno.EPERM
        else:
            assert e is None
            m.xattrs[name] = value

    @precondition(lambda self: len(self.open) < 4 and self.has(MFile))
    @rule(data=st.data())
    def open_and_keep(self, data: st.DataObject) -> None:
        path = self.draw(data, self.paths(MFile))
        fh = run(self.fs.open(self.ino(path), O_RDWR, ROOT)).fh
        self.open.append((fh, self.model(path)))

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), offset=st.integers(0, 3 * CHUNK), payload=PAYLOAD.filter(bool))
    def write_kept(self, data: st.DataObject, offset: int, payload: bytes) -> None:
        fh, m = data.draw(st.sampled_from(self.open))
        run(self.fs.write(fh, offset, [memoryview(payload)], ROOT))
        if len(m.data) < offset:
            m.data += bytes(offset - len(m.data))
        m.data[offset : offset + len(payload)] = payload
        assert bytes(run(self.fs.read(fh, 0, len(m.data) + 5))) == bytes(m.data)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data())
    def close_kept(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.open) - 1))
        fh, _ = self.open.pop(i)
        run(self.fs.release(fh))

    @rule()
    def forget_all(self) -> None:
        """Give back every lookup: only linked or open inodes may remain."""
        run(self.fs.forget(list(self.looked.items())))
        self.looked.clear()
        live = {id(n) for _, n in self.walk()} | {id(m) for _, m in self.open}
        assert self.fs.inode_count == len(live)

    @rule(
        data=st.data(),
        first=st.integers(0, 6),
        page=st.integers(1, 4),
        changes=st.lists(
            st.lists(st.tuples(st.sampled_from(["add", "remove", "rename"]), st.integers(0, 99)), max_size=4),
            max_size=3,
        ),
    )
    def readdir_while_changing(
        self, data: st.DataObject, first: int, page: int, changes: list[list[tuple[str, int]]]
    ) -> None:
        """Offsets taken mid-listing stay valid while entries come and go:
        ``changes[i]`` is applied before fetching page ``i + 1``."""
        path = self.draw(data, self.paths(MDir, root=True))
        d = self.model(path)
        ino = self.ino(path)
        fh = run(self.fs.opendir(ino, ROOT)).fh
        start = set(d.children)
        reply = Collect(limit=first)
        run(self.fs.readdir(fh, 0, reply))
        seen = list(reply.names)
        offset = reply.entries[-1][2] if reply.entries else 0
        touched: set[bytes] = set()
        created: set[bytes] = set()
        for round_ in bounded():
            for what, pick in changes[round_] if round_ < len(changes) else ():
                names = sorted(n for n, c in d.children.items() if not isinstance(c, MDir))
                if what == "add" or not names:
                    name = b"t%d" % next(self.fresh)
                    info, a = run(self.fs.create(ino, name, 0o644, O_RDWR, ROOT))
                    run(self.fs.release(info.fh))
                    self.count(a.st_ino)
                    d.children[name] = MFile()
                    created.add(name)
                elif what == "remove":
                    name = names[pick % len(names)]
                    run(self.fs.unlink(ino, name, ROOT))
                    d.children.pop(name).nlink -= 1
                    touched.add(name)
                else:
                    name = names[pick % len(names)]
                    new = b"t%d" % next(self.fresh)
                    run(self.fs.rename(ino, name, ino, new, 0, ROOT))
                    d.children[new] = d.children.pop(name)
                    touched.add(name)
                    created.add(new)
            more = Collect(limit=page)
            run(self.fs.readdir(fh, offset, more))
            if not more.entries:
                break
            seen += more.names
            offset = more.entries[-1][2]
        run(self.fs.releasedir(fh))
        assert seen[:2] == [b".", b".."][: len(seen)]
        names = seen[2:]
        assert len(names) == len(set(names)), f"repeated: {names}"
        assert (start - touched) <= set(names), "a surviving entry was skipped"
        assert set(names) <= start | created
        # Entries added mid-listing land after every offset handed out.
        assert {n for n in created if n in d.children} <= set(names)

    # -- the full comparison after every step --
    @invariant()
    def tree_matches(self) -> None:
        for path, m in self.walk():
            ino = self.ino(path) if path else ROOT_INODE
            a = run(self.fs.getattr(ino, ROOT))
            if isinstance(m, MDir):
                assert stat.S_ISDIR(a.st_mode)
                subdirs = sum(isinstance(c, MDir) for c in m.children.values())
                assert a.st_nlink == 2 + subdirs, path
                fh = run(self.fs.opendir(ino, ROOT)).fh
                names: list[bytes] = []
                offset = 0
                for _ in bounded():  # list in pages of 3 through readdirplus
                    reply = Collect(plus=True, limit=3)
                    run(self.fs.readdir(fh, offset, reply))
                    if not reply.entries:
                        break
                    for n, attrs_, _ in reply.entries:
                        if n not in (b".", b".."):
                            self.count(attrs_.st_ino)
                    names += reply.names
                    offset = reply.entries[-1][2]
                run(self.fs.releasedir(fh))
                assert names[:2] == [b".", b".."]
                assert sorted(names[2:]) == sorted(m.children), path
            elif isinstance(m, MFile):
                assert stat.S_ISREG(a.st_mode)
                assert a.st_size == len(m.data) and a.st_nlink == m.nlink, path
                fh = run(self.fs.open(ino, O_RDONLY, ROOT)).fh
                assert bytes(run(self.fs.read(fh, 0, len(m.data) + 7))) == bytes(m.data)
                run(self.fs.release(fh))
            else:
                assert stat.S_ISLNK(a.st_mode) and a.st_nlink == m.nlink
                assert run(self.fs.readlink(ino, ROOT)) == m.target
            if not isinstance(m, MSym):
                assert sorted(run(self.fs.listxattr(ino, ROOT))) == sorted(m.xattrs)
                for k, v in m.xattrs.items():
                    assert run(self.fs.getxattr(ino, k, ROOT)) == v

    @invariant()
    def space_accounting(self) -> None:
        chunks = 0
        for node in self.fs._inodes.values():
            if node.chunks is not None:
                chunks += len(node.chunks)
                assert all(i * CHUNK < node.size for i in node.chunks)
        assert self.fs.used_bytes == chunks * CHUNK

    def teardown(self) -> None:
        for fh, _ in self.open:
            run(self.fs.release(fh))


MemoryFSMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestMemoryFSModel = MemoryFSMachine.TestCase
