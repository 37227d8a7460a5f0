"""Tests of the passthrough backend (virtiofs_async.backends.passthrough).

The async methods are called directly against a temporary host directory, on
an asyncio runtime whose worker pool is injected as ``run_blocking`` (the
server's job), so credential switching happens on real worker threads. The
machine runs these tests as root; the uid 1000 cases use ctx credentials.
Every escape attempt targets a directory *outside* the share that the test
made itself (never /etc), and checks that it is untouched.
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import stat
import threading
import time
from typing import Any, Awaitable, Callable, Iterator

import pytest

import virtiofs_async

from virtiofs_async import codec
from virtiofs_async.abi import fuse as abi
from virtiofs_async.backends import _hostfs
from virtiofs_async.backends.passthrough import CACHE_TIMEOUTS, PassthroughFS
from virtiofs_async.errors import FuseError
from virtiofs_async.operations import (
    ROOT_INODE,
    DirectoryReply,
    EntryAttributes,
    FileLock,
    RequestContext,
    SetattrFields,
)
from virtiofs_async.runtime import get_runtime

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the passthrough tests switch credentials: run as root")

ROOT = RequestContext(uid=0, gid=0, pid=1)
USER = RequestContext(uid=1000, gid=1000, pid=2)
OTHER = RequestContext(uid=1001, gid=1001, pid=3)
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
OFFSET_MAX = _hostfs.OFFSET_MAX


def go(fs: PassthroughFS, body: Callable[[], Awaitable[Any]], *, pool: bool = True) -> Any:
    """Run ``body()`` on a fresh asyncio runtime, its pool injected into ``fs``."""
    rt = get_runtime("asyncio")

    async def main() -> Any:
        if pool:
            fs.run_blocking = rt.run_in_thread  # type: ignore[method-assign]
        try:
            return await body()
        finally:
            if pool:
                del fs.run_blocking

    return rt.run(main)


async def errno_of(coro: Awaitable[Any]) -> int:
    with pytest.raises(FuseError) as info:
        await coro
    return info.value.errno


class Collect(DirectoryReply):
    def __init__(self, plus: bool = False, limit: int | None = None) -> None:
        self.plus = plus
        self.limit = limit
        self.entries: list[tuple[bytes, EntryAttributes, int]] = []

    def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
        if self.limit is not None and len(self.entries) >= self.limit:
            return False
        self.entries.append((name, attributes, next_offset))
        return True


@pytest.fixture
def share(tmp_path: Any) -> str:
    path = tmp_path / "share"
    path.mkdir()
    os.chmod(path, 0o755)
    return str(path)


@pytest.fixture
def outside(tmp_path: Any) -> str:
    """A directory next to the share, with a secret the guest must never reach."""
    path = tmp_path / "outside"
    path.mkdir()
    (path / "secret").write_bytes(b"top secret\n")
    return str(path)


@pytest.fixture
def make_fs(share: str) -> Iterator[Callable[..., PassthroughFS]]:
    made: list[PassthroughFS] = []

    def factory(**options: Any) -> PassthroughFS:
        fs = PassthroughFS(share, **options)
        made.append(fs)
        return fs

    yield factory
    for fs in made:
        fs.close()


@pytest.fixture
def fs(make_fs: Callable[..., PassthroughFS]) -> PassthroughFS:
    return make_fs(xattr=True)


def host(share: str, *parts: str) -> str:
    return os.path.join(share, *parts)


# -- inodes and lookup counts ------------------------------------------------------------


def test_lookup_reports_host_attributes_and_counts(fs: PassthroughFS, share: str) -> None:
    with open(host(share, "f"), "wb") as f:
        f.write(b"hello")
    os.chmod(host(share, "f"), 0o640)
    st = os.lstat(host(share, "f"))

    async def body() -> None:
        base = fs.held_fds()
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        assert e.st_ino == st.st_ino  # the host inode number when it is free
        assert (e.st_mode, e.st_size, e.st_uid, e.st_nlink) == (st.st_mode, 5, st.st_uid, 1)
        assert e.st_mtime_ns == st.st_mtime_ns and e.entry_timeout == e.attr_timeout == 1.0
        assert fs.host_key(e.st_ino) == (st.st_dev, st.st_ino)
        again = await fs.lookup(ROOT_INODE, b"f", ROOT)
        assert again.st_ino == e.st_ino and fs.lookup_count(e.st_ino) == 2
        assert fs.held_fds() == base + 1  # one O_PATH fd per inode, not per lookup
        attr = await fs.getattr(e.st_ino, ROOT)
        assert attr.st_size == 5
        await fs.forget([(e.st_ino, 1)])
        assert fs.lookup_count(e.st_ino) == 1
        await fs.forget([(e.st_ino, 1)])
        assert fs.lookup_count(e.st_ino) == 0 and fs.held_fds() == base
        assert await errno_of(fs.getattr(e.st_ino, ROOT)) == errno.ESTALE
        assert await errno_of(fs.lookup(ROOT_INODE, b"missing", ROOT)) == errno.ENOENT
        # The root is never forgotten.
        await fs.forget([(ROOT_INODE, 100)])
        assert (await fs.getattr(ROOT_INODE, ROOT)).st_ino == ROOT_INODE

    go(fs, body)


def test_dot_and_dotdot(fs: PassthroughFS, share: str) -> None:
    os.makedirs(host(share, "a", "b"))

    async def body() -> None:
        a = await fs.lookup(ROOT_INODE, b"a", ROOT)
        b = await fs.lookup(a.st_ino, b"b", ROOT)
        assert (await fs.lookup(b.st_ino, b"..", ROOT)).st_ino == a.st_ino
        assert (await fs.lookup(b.st_ino, b".", ROOT)).st_ino == b.st_ino
        assert (await fs.lookup(a.st_ino, b"..", ROOT)).st_ino == ROOT_INODE
        assert fs.lookup_count(a.st_ino) == 2 and fs.lookup_count(b.st_ino) == 2

    go(fs, body)


def test_names_are_checked(fs: PassthroughFS) -> None:
    async def body() -> None:
        for bad in (b"a/b", b"../x", b"a\0b", b""):
            assert await errno_of(fs.lookup(ROOT_INODE, bad, ROOT)) == errno.EINVAL
            assert await errno_of(fs.mkdir(ROOT_INODE, bad, 0o755, ROOT)) == errno.EINVAL
        assert await errno_of(fs.lookup(ROOT_INODE, b"x" * 256, ROOT)) == errno.ENAMETOOLONG
        assert await errno_of(fs.create(ROOT_INODE, b"x" * 256, 0o644, os.O_RDWR, ROOT)) == errno.ENAMETOOLONG
        e = await fs.mknod(ROOT_INODE, b"y" * 255, stat.S_IFREG | 0o644, 0, ROOT)
        assert stat.S_ISREG(e.st_mode)

    go(fs, body)


# -- data -----------------------------------------------------------------------------------


def test_create_write_read_release(fs: PassthroughFS, share: str) -> None:
    old_umask = os.umask(0o077)  # the daemon's umask must not leak into modes

    async def body() -> None:
        info, e = await fs.create(ROOT_INODE, b"new", 0o666, os.O_RDWR | os.O_CREAT, ROOT)
        assert fs.lookup_count(e.st_ino) == 1 and stat.S_IMODE(e.st_mode) == 0o666
        payload = bytes(range(256)) * 64
        view = memoryview(payload)
        assert await fs.write(info.fh, 0, [view[:100], view[100:]], ROOT) == len(payload)
        assert await fs.read(info.fh, 0, 10) == payload[:10]
        assert await fs.read(info.fh, len(payload) - 3, 100) == payload[-3:]
        assert await fs.read(info.fh, len(payload), 100) == b""
        await fs.flush(info.fh, 0)
        await fs.release(info.fh)
        assert await errno_of(fs.read(info.fh, 0, 1)) == errno.EBADF
        with open(host(share, "new"), "rb") as f:
            assert f.read() == payload
        # O_EXCL on an existing name; plain create opens it (O_TRUNC truncates).
        assert await errno_of(fs.create(ROOT_INODE, b"new", 0o644, os.O_RDWR | os.O_EXCL, ROOT)) == errno.EEXIST
        info2, e2 = await fs.create(ROOT_INODE, b"new", 0o600, os.O_WRONLY | os.O_TRUNC, ROOT)
        assert e2.st_ino == e.st_ino and fs.lookup_count(e.st_ino) == 2 and e2.st_size == 0
        await fs.release(info2.fh)
        # open() of an existing file, with O_APPEND.
        info3 = await fs.open(e.st_ino, os.O_WRONLY | os.O_APPEND, ROOT)
        await fs.write(info3.fh, 0, [memoryview(b"abc")], ROOT)
        await fs.write(info3.fh, 0, [memoryview(b"def")], ROOT)
        await fs.release(info3.fh)
        with open(host(share, "new"), "rb") as f:
            assert f.read() == b"abcdef"

    try:
        go(fs, body)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(host(share, "new")).st_mode) == 0o666


def test_open_refuses_non_regular_files(fs: PassthroughFS, share: str) -> None:
    os.mkfifo(host(share, "fifo"))
    os.mknod(host(share, "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkdir(host(share, "dir"))
    os.symlink("dir", host(share, "link"))

    async def body() -> None:
        for name, code in ((b"fifo", errno.ENXIO), (b"null", errno.ENXIO), (b"dir", errno.EISDIR),
                           (b"link", errno.ELOOP)):
            e = await fs.lookup(ROOT_INODE, name, ROOT)
            assert await errno_of(fs.open(e.st_ino, os.O_RDONLY, ROOT)) == code, name
        # Nor through CREATE of an existing special file (a host fifo would block,
        # a host device would be the host's).
        assert await errno_of(fs.create(ROOT_INODE, b"null", 0o644, os.O_RDWR, ROOT)) == errno.EEXIST
        assert await errno_of(fs.create(ROOT_INODE, b"fifo", 0o644, os.O_WRONLY, ROOT)) == errno.EEXIST

    go(fs, body)


def test_mknod_mkdir_symlink_link_unlink_rmdir(fs: PassthroughFS, share: str) -> None:
    async def body() -> None:
        fifo = await fs.mknod(ROOT_INODE, b"fifo", stat.S_IFIFO | 0o640, 0, ROOT)
        assert stat.S_ISFIFO(fifo.st_mode) and stat.S_ISFIFO(os.lstat(host(share, "fifo")).st_mode)
        rdev = (1 << 8) | 3  # new_encode_dev(1, 3) as the guest sends it
        dev = await fs.mknod(ROOT_INODE, b"null", stat.S_IFCHR | 0o666, rdev, ROOT)
        assert os.lstat(host(share, "null")).st_rdev == os.makedev(1, 3) and dev.st_rdev == rdev
        big = codec.host_rdev_to_guest(os.makedev(259, 300000))
        assert codec.guest_rdev_to_host(big) == os.makedev(259, 300000)
        d = await fs.mkdir(ROOT_INODE, b"d", 0o1750, ROOT)
        assert stat.S_IMODE(os.lstat(host(share, "d")).st_mode) == 0o1750 and stat.S_ISDIR(d.st_mode)
        ln = await fs.symlink(d.st_ino, b"ln", b"/anything/at/all", ROOT)
        assert os.readlink(host(share, "d", "ln")) == "/anything/at/all"
        assert await fs.readlink(ln.st_ino, ROOT) == b"/anything/at/all"
        assert await errno_of(fs.readlink(d.st_ino, ROOT)) == errno.EINVAL
        info, f = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
        await fs.release(info.fh)
        linked = await fs.link(f.st_ino, d.st_ino, b"hard", ROOT)
        assert linked.st_ino == f.st_ino and linked.st_nlink == 2 and fs.lookup_count(f.st_ino) == 2
        assert os.lstat(host(share, "d", "hard")).st_ino == os.lstat(host(share, "f")).st_ino
        # A symlink can be hard-linked too (the link itself, not its target).
        ln2 = await fs.link(ln.st_ino, ROOT_INODE, b"ln2", ROOT)
        assert stat.S_ISLNK(ln2.st_mode) and os.readlink(host(share, "ln2")) == "/anything/at/all"
        assert await errno_of(fs.link(d.st_ino, ROOT_INODE, b"dirlink", ROOT)) == errno.EPERM
        assert await errno_of(fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)) == errno.EEXIST
        assert await errno_of(fs.rmdir(ROOT_INODE, b"d", ROOT)) == errno.ENOTEMPTY
        assert await errno_of(fs.unlink(ROOT_INODE, b"d", ROOT)) in (errno.EISDIR, errno.EPERM)
        assert await errno_of(fs.rmdir(ROOT_INODE, b"f", ROOT)) == errno.ENOTDIR
        for name in (b"hard", b"ln"):
            await fs.unlink(d.st_ino, name, ROOT)
        await fs.rmdir(ROOT_INODE, b"d", ROOT)
        assert not os.path.exists(host(share, "d"))
        # The guest still holds the removed directory: its nodeid stays valid.
        assert (await fs.getattr(d.st_ino, ROOT)).st_nlink == 0
        assert await errno_of(fs.unlink(ROOT_INODE, b"..", ROOT)) == errno.EISDIR
        assert await errno_of(fs.rmdir(ROOT_INODE, b"..", ROOT)) == errno.ENOTEMPTY

    go(fs, body)


def test_rename_and_rename2_flags(fs: PassthroughFS, share: str) -> None:
    os.mkdir(host(share, "a"))
    os.mkdir(host(share, "b"))
    for name, data in (("a/x", b"x"), ("b/y", b"y")):
        with open(host(share, name), "wb") as f:
            f.write(data)

    async def body() -> None:
        a = await fs.lookup(ROOT_INODE, b"a", ROOT)
        b = await fs.lookup(ROOT_INODE, b"b", ROOT)
        assert await errno_of(fs.rename(a.st_ino, b"x", b.st_ino, b"y", RENAME_NOREPLACE, ROOT)) == errno.EEXIST
        await fs.rename(a.st_ino, b"x", b.st_ino, b"y", RENAME_EXCHANGE, ROOT)
        assert open(host(share, "a", "x"), "rb").read() == b"y"
        assert open(host(share, "b", "y"), "rb").read() == b"x"
        await fs.rename(a.st_ino, b"x", b.st_ino, b"z", 0, ROOT)
        assert sorted(os.listdir(host(share, "b"))) == ["y", "z"] and os.listdir(host(share, "a")) == []
        assert await errno_of(fs.rename(a.st_ino, b"nope", b.st_ino, b"w", 0, ROOT)) == errno.ENOENT
        assert await errno_of(fs.rename(ROOT_INODE, b"a", a.st_ino, b"inside", 0, ROOT)) == errno.EINVAL
        assert await errno_of(fs.rename(b.st_ino, b"..", ROOT_INODE, b"q", 0, ROOT)) == errno.EBUSY

    go(fs, body)


def test_setattr(fs: PassthroughFS, share: str) -> None:
    with open(host(share, "f"), "wb") as f:
        f.write(b"0123456789")

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        a = await fs.setattr(e.st_ino, EntryAttributes(st_mode=0o4711), SetattrFields(update_mode=True), None, ROOT)
        assert stat.S_IMODE(a.st_mode) == 0o4711
        a = await fs.setattr(e.st_ino, EntryAttributes(st_size=4), SetattrFields(update_size=True), None, ROOT)
        assert a.st_size == 4 and os.path.getsize(host(share, "f")) == 4
        assert stat.S_IMODE(a.st_mode) == 0o4711  # root's truncate keeps suid
        times = EntryAttributes(st_atime_ns=1_500_000_000_123_456_789, st_mtime_ns=1_600_000_000_987_654_321)
        a = await fs.setattr(e.st_ino, times, SetattrFields(update_atime=True, update_mtime=True), None, ROOT)
        st = os.stat(host(share, "f"))
        assert st.st_atime_ns == 1_500_000_000_123_456_789 and st.st_mtime_ns == 1_600_000_000_987_654_321
        assert a.st_mtime_ns == st.st_mtime_ns
        # Only mtime "now": atime untouched.
        before = time.time_ns()
        a = await fs.setattr(e.st_ino, EntryAttributes(), SetattrFields(update_mtime=True, update_mtime_now=True),
                             None, ROOT)
        assert a.st_mtime_ns >= before - 10_000_000 and a.st_atime_ns == 1_500_000_000_123_456_789
        a = await fs.setattr(e.st_ino, EntryAttributes(st_uid=1000, st_gid=1001),
                             SetattrFields(update_uid=True, update_gid=True), None, ROOT)
        st = os.stat(host(share, "f"))
        assert (st.st_uid, st.st_gid, a.st_uid) == (1000, 1001, 1000)
        assert not st.st_mode & stat.S_ISUID  # chown drops suid
        # Truncate through a handle.
        info = await fs.open(e.st_ino, os.O_RDWR, ROOT)
        a = await fs.setattr(e.st_ino, EntryAttributes(st_size=100), SetattrFields(update_size=True), info.fh, ROOT)
        assert a.st_size == 100 == os.path.getsize(host(share, "f"))
        await fs.release(info.fh)
        # A symlink's mode cannot change; its owner can (the link's, not the target's).
        os.symlink("f", host(share, "ln"))
        ln = await fs.lookup(ROOT_INODE, b"ln", ROOT)
        assert await errno_of(fs.setattr(ln.st_ino, EntryAttributes(st_mode=0o600),
                                         SetattrFields(update_mode=True), None, ROOT)) == errno.EOPNOTSUPP
        await fs.setattr(ln.st_ino, EntryAttributes(st_uid=1234), SetattrFields(update_uid=True), None, ROOT)
        assert os.lstat(host(share, "ln")).st_uid == 1234 and os.stat(host(share, "f")).st_uid == 1000

    go(fs, body)


def test_sparse_files_fallocate_lseek_copy_file_range(fs: PassthroughFS, share: str) -> None:
    async def body() -> None:
        info, e = await fs.create(ROOT_INODE, b"sparse", 0o644, os.O_RDWR, ROOT)
        fh = info.fh
        far = 5 * (1 << 30)  # past 4 GiB
        await fs.write(fh, far, [memoryview(b"end")], ROOT)
        assert (await fs.getattr(e.st_ino, ROOT)).st_size == far + 3
        assert await fs.lseek(fh, 0, os.SEEK_DATA) >= 1 << 30  # the start is a hole
        assert await fs.lseek(fh, 0, os.SEEK_HOLE) == 0
        assert await errno_of(fs.lseek(fh, far + 10, os.SEEK_DATA)) == errno.ENXIO
        blocks = (await fs.getattr(e.st_ino, ROOT)).st_blocks
        await fs.fallocate(fh, 0, 0, 1 << 20)
        allocated = (await fs.getattr(e.st_ino, ROOT)).st_blocks
        assert allocated >= blocks + (1 << 20) // 512
        await fs.write(fh, 0, [memoryview(b"data")], ROOT)
        assert await fs.lseek(fh, 0, os.SEEK_DATA) == 0
        await fs.fallocate(fh, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE, 0, 1 << 20)
        assert await fs.lseek(fh, 0, os.SEEK_HOLE) == 0
        assert (await fs.getattr(e.st_ino, ROOT)).st_blocks <= blocks
        await fs.fallocate(fh, FALLOC_FL_KEEP_SIZE, far + 3, 1 << 20)
        assert os.path.getsize(host(share, "sparse")) == far + 3
        await fs.write(fh, 0, [memoryview(b"copy me")], ROOT)
        info2, e2 = await fs.create(ROOT_INODE, b"dst", 0o644, os.O_RDWR, ROOT)
        assert await fs.copy_file_range(fh, 0, info2.fh, 10, 7, 0) == 7
        assert await fs.read(info2.fh, 0, 100) == b"\0" * 10 + b"copy me"
        assert await errno_of(fs.copy_file_range(fh, 0, info2.fh, 0, 7, 1)) == errno.EINVAL
        await fs.fsync(fh, False)
        await fs.fsync(fh, True)
        await fs.syncfs()
        await fs.release(fh)
        await fs.release(info2.fh)

    go(fs, body)


def test_statfs_matches_host(fs: PassthroughFS, share: str) -> None:
    async def body() -> None:
        st = await fs.statfs(ROOT)
        host_st = os.statvfs(share)
        assert (st.f_bsize, st.f_blocks, st.f_files, st.f_namemax) == (
            host_st.f_bsize, host_st.f_blocks, host_st.f_files, host_st.f_namemax)

    go(fs, body)


def test_tmpfile_then_link(fs: PassthroughFS, share: str) -> None:
    async def body() -> None:
        info, e = await fs.tmpfile(ROOT_INODE, 0o600, os.O_RDWR, ROOT)
        assert e.st_nlink == 0 and os.listdir(share) == []
        await fs.write(info.fh, 0, [memoryview(b"anonymous")], ROOT)
        named = await fs.link(e.st_ino, ROOT_INODE, b"named", ROOT)
        assert named.st_ino == e.st_ino and named.st_nlink == 1
        assert open(host(share, "named"), "rb").read() == b"anonymous"
        await fs.release(info.fh)

    go(fs, body)


# -- directories ---------------------------------------------------------------------------------


def test_readdir_uses_host_offsets_and_resumes(fs: PassthroughFS, share: str) -> None:
    names = {f"entry-{i:04d}".encode() for i in range(300)}
    for n in names:
        open(os.path.join(share.encode(), n), "wb").close()
    os.mkdir(host(share, "sub"))

    async def body() -> None:
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        seen: list[bytes] = []
        offset = 0
        for _ in range(1000):
            reply = Collect(limit=37)
            await fs.readdir(dirh.fh, offset, reply)
            if not reply.entries:
                break
            seen += [n for n, _, _ in reply.entries]
            offset = reply.entries[-1][2]
        else:
            raise AssertionError("listing did not end")
        assert sorted(seen) == sorted(names | {b".", b"..", b"sub"}) and len(seen) == len(set(seen))
        # Offsets are the host's own cookies: the same as getdents64 on the host.
        fd = os.open(share, os.O_RDONLY | os.O_DIRECTORY)
        try:
            host_offs = {d.name: d.off for d in _hostfs.iter_all(fd)}
        finally:
            os.close(fd)
        full = Collect()
        await fs.readdir(dirh.fh, 0, full)
        assert {n: off for n, _, off in full.entries} == host_offs
        types = {n: a.st_mode for n, a, _ in full.entries}
        assert stat.S_ISDIR(types[b"sub"]) and stat.S_ISREG(types[b"entry-0001"])
        await fs.releasedir(dirh.fh)
        assert await errno_of(fs.readdir(dirh.fh, 0, Collect())) == errno.EBADF

    go(fs, body)


def test_readdir_carries_a_known_inodes_node_id_where_it_is_not_the_host_number(
    fs: PassthroughFS, share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A READDIR record of an inode the tables know under another node id
    than its host inode number (a synthetic id: here forced) carries that
    id, every other record the host's number; once the inode is forgotten,
    the host's number again (``_remapped`` follows the inode table)."""
    for name in ("a", "b"):
        open(host(share, name), "wb").close()
    ino_a, ino_b = os.stat(host(share, "a")).st_ino, os.stat(host(share, "b")).st_ino
    synthetic = (1 << 63) + 5

    async def listing() -> dict[bytes, int]:
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        reply = Collect()
        await fs.readdir(dirh.fh, 0, reply)
        await fs.releasedir(dirh.fh)
        return {n: a.st_ino for n, a, _ in reply.entries}

    async def body() -> None:
        with monkeypatch.context() as p:
            p.setattr(fs, "_alloc_nodeid", lambda ino: synthetic)
            e = await fs.lookup(ROOT_INODE, b"a", ROOT)
        assert e.st_ino == synthetic
        b = await fs.lookup(ROOT_INODE, b"b", ROOT)
        assert b.st_ino == ino_b
        seen = await listing()
        assert (seen[b"a"], seen[b"b"]) == (synthetic, ino_b)
        assert set(fs._remapped) == {fs._root.key, (fs._root.dev, ino_a)}
        await fs.forget([(synthetic, 1), (ino_b, 1)])
        assert set(fs._remapped) == {fs._root.key}
        seen = await listing()
        assert (seen[b"a"], seen[b"b"]) == (ino_a, ino_b)

    go(fs, body)


def test_readdir_resumes_from_its_last_read_without_seeking(
    fs: PassthroughFS, share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reply that takes part of one getdents64 batch leaves the rest for the
    next request (no syscall), and reading on where the fd already is needs
    no seek (on ext4 a seek rebuilds the hash-order state). Offset 0 always
    reads afresh, so a rewinddir sees entries made since."""
    for i in range(200):
        open(host(share, f"entry-{i:04d}"), "wb").close()
    calls: list[int | None] = []
    real = _hostfs.getdents_raw

    def counting(fd: int, offset: int | None, bufsize: int = 32768) -> bytes:
        calls.append(offset)
        return real(fd, offset, bufsize)

    monkeypatch.setattr(_hostfs, "getdents_raw", counting)

    async def body() -> None:
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        seen: list[bytes] = []
        offset, replies = 0, 0
        while True:
            reply = Collect(limit=7)
            await fs.readdir(dirh.fh, offset, reply)
            if not reply.entries:
                break
            replies += 1
            seen += [n for n, _, _ in reply.entries]
            offset = reply.entries[-1][2]
        assert len(seen) == len(set(seen)) == 202
        assert calls[0] == 0  # the first read seeks to the start
        assert len(calls) < replies / 2, (len(calls), replies)  # most replies came from a previous batch
        assert all(c is None for c in calls[1:]), calls  # reading on: never a seek
        open(host(share, "late"), "wb").close()
        calls.clear()
        again = Collect()
        await fs.readdir(dirh.fh, 0, again)
        assert calls[0] == 0 and b"late" in {n for n, _, _ in again.entries}
        await fs.releasedir(dirh.fh)

    go(fs, body)


def test_readdir_fetches_and_looks_up_what_fits(fs: PassthroughFS, share: str) -> None:
    """READDIRPLUS looks up only the entries the reply has room for (every
    lookup opens a host fd): none are opened and dropped."""
    for i in range(100):
        open(host(share, f"f{i:03d}"), "wb").close()

    class Sized(Collect):
        def __init__(self, room: int) -> None:
            super().__init__(plus=True)
            self.room = room

        @property
        def remaining(self) -> int:
            return self.room

        def add(self, name: bytes, attributes: EntryAttributes, next_offset: int) -> bool:
            need = self.entry_size(len(name))
            if need > self.room:
                return False
            self.room -= need
            return super().add(name, attributes, next_offset)

    opened: list[bytes] = []
    real = fs._lookup_at

    def counting(dirfd: int, name: bytes) -> Any:
        opened.append(name)
        return real(dirfd, name)

    fs._lookup_at = counting  # type: ignore[method-assign]

    async def body() -> None:
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        reply = Sized(4096)
        await fs.readdir(dirh.fh, 0, reply)
        names = [n for n, _, _ in reply.entries if n not in (b".", b"..")]
        assert 20 <= len(reply.entries) <= 4096 // 160 + 1
        assert opened == names  # looked up exactly the entries that went in
        await fs.releasedir(dirh.fh)

    go(fs, body)


def test_readdirplus_counts_only_accepted_entries(fs: PassthroughFS, share: str) -> None:
    for i in range(50):
        with open(host(share, f"f{i:02d}"), "wb") as f:
            f.write(b"x" * i)

    async def body() -> None:
        base = fs.held_fds()
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        reply = Collect(plus=True, limit=12)
        await fs.readdir(dirh.fh, 0, reply)
        files = [(n, a) for n, a, _ in reply.entries if n not in (b".", b"..")]
        assert len(reply.entries) == 12
        for n, a in files:
            assert fs.lookup_count(a.st_ino) == 1
            assert a.st_size == int(n[1:]) and a.st_ino == os.lstat(os.path.join(share.encode(), n)).st_ino
        # Rejected entries left nothing behind: one fd per counted inode (+ the dir handle).
        assert fs.held_fds() == base + len(files) + 1
        rest = Collect(plus=True)
        await fs.readdir(dirh.fh, reply.entries[-1][2], rest)
        all_names = [n for n, _, _ in reply.entries + rest.entries]
        assert sorted(all_names) == sorted([b".", b".."] + [f"f{i:02d}".encode() for i in range(50)])
        await fs.forget([(a.st_ino, 1) for _, a, _ in reply.entries + rest.entries if a.st_ino != ROOT_INODE
                         and fs.lookup_count(a.st_ino)])
        await fs.releasedir(dirh.fh)
        assert fs.held_fds() == base

    go(fs, body)


# -- credentials ------------------------------------------------------------------------------------


def test_files_created_by_a_user_belong_to_the_user(fs: PassthroughFS, share: str) -> None:
    os.mkdir(host(share, "pub"))
    os.chmod(host(share, "pub"), 0o777)

    async def body() -> None:
        pub = await fs.lookup(ROOT_INODE, b"pub", USER)
        info, f = await fs.create(pub.st_ino, b"file", 0o640, os.O_RDWR, USER)
        await fs.release(info.fh)
        d = await fs.mkdir(pub.st_ino, b"dir", 0o755, USER)
        await fs.symlink(pub.st_ino, b"ln", b"file", USER)
        await fs.mknod(pub.st_ino, b"fifo", stat.S_IFIFO | 0o600, 0, USER)
        for name in ("file", "dir", "ln", "fifo"):
            st = os.lstat(host(share, "pub", name))
            assert (st.st_uid, st.st_gid) == (1000, 1000), name
        assert (f.st_uid, d.st_uid) == (1000, 1000)
        # A hard link creates no inode: it runs as the daemon, the owner stays.
        await fs.link(f.st_ino, pub.st_ino, b"file2", OTHER)
        assert os.lstat(host(share, "pub", "file2")).st_uid == 1000
        await fs.unlink(pub.st_ino, b"file", USER)

    go(fs, body)


def test_creating_requests_run_as_the_caller_others_as_the_daemon(fs: PassthroughFS, share: str) -> None:
    """Creating requests are checked by the host as the caller (and own the
    result); the others run as the daemon, because the guest kernel
    (default_permissions) already checked them with credentials the request
    does not carry; ACCESS answers for the caller."""
    os.mkdir(host(share, "private"), 0o700)
    with open(host(share, "private", "f"), "wb") as f:
        f.write(b"root's")
    os.chmod(host(share, "private", "f"), 0o600)
    os.mkdir(host(share, "group"))
    os.chmod(host(share, "group"), 0o770)
    os.chown(host(share, "group"), 0, 50)

    async def body() -> None:
        priv = await fs.lookup(ROOT_INODE, b"private", USER)
        # Creating: the host refuses the caller.
        assert await errno_of(fs.create(priv.st_ino, b"mine", 0o644, os.O_RDWR, USER)) == errno.EACCES
        assert await errno_of(fs.mkdir(priv.st_ino, b"mine", 0o755, USER)) == errno.EACCES
        assert await errno_of(fs.symlink(priv.st_ino, b"mine", b"t", USER)) == errno.EACCES
        assert await errno_of(fs.mknod(priv.st_ino, b"mine", stat.S_IFIFO | 0o600, 0, USER)) == errno.EACCES
        assert await errno_of(fs.tmpfile(priv.st_ino, 0o600, os.O_RDWR, USER)) == errno.EACCES
        assert not os.path.exists(host(share, "private", "mine"))
        # Not creating: served as the daemon, whatever the uid says.
        f = await fs.lookup(priv.st_ino, b"f", USER)
        h = await fs.open(f.st_ino, os.O_RDWR, USER)
        assert await fs.read(h.fh, 0, 100) == b"root's"
        await fs.release(h.fh)
        d = await fs.opendir(priv.st_ino, USER)
        await fs.releasedir(d.fh)
        # ACCESS is the caller's question.
        assert await errno_of(fs.access(f.st_ino, os.R_OK, USER)) == errno.EACCES
        await fs.access(f.st_ino, os.R_OK | os.W_OK, ROOT)
        # Supplementary groups count when the request carries them; unknown
        # groups (None) count as none.
        grp = await fs.lookup(ROOT_INODE, b"group", ROOT)
        assert await errno_of(fs.mkdir(grp.st_ino, b"x", 0o755, USER)) == errno.EACCES
        member = RequestContext(uid=1000, gid=1000, pid=2, groups=(50,))
        await fs.mkdir(grp.st_ino, b"x", 0o755, member)
        assert os.stat(host(share, "group", "x")).st_uid == 1000
        assert await errno_of(fs.access(grp.st_ino, os.W_OK, USER)) == errno.EACCES
        await fs.access(grp.st_ino, os.W_OK, member)

    go(fs, body)


def test_credentials_are_per_thread_and_restored(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs()
    os.chmod(share, 0o777)
    users = [RequestContext(uid=2000 + i, gid=3000 + i, pid=i, groups=(7000 + i, 50)) for i in range(24)]

    async def body() -> None:
        async def one(ctx: RequestContext) -> None:
            for j in range(5):
                info, e = await fs.create(ROOT_INODE, f"u{ctx.uid}-{j}".encode(), 0o600, os.O_RDWR, ctx)
                await fs.write(info.fh, 0, [memoryview(b"x")], ctx)
                await fs.release(info.fh)

        await asyncio.gather(*(one(u) for u in users), *(one(ROOT) for _ in range(4)))
        # Every pool thread is back to the daemon's identity.
        ids = await asyncio.gather(*(fs.run_blocking(_ids_after_a_pause) for _ in range(64)))
        assert set(ids) == {(0, 0, tuple(os.getgroups()))}

    go(fs, body)
    for u in users:
        for j in range(5):
            st = os.lstat(host(share, f"u{u.uid}-{j}"))
            assert (st.st_uid, st.st_gid) == (u.uid, u.gid)
    assert os.lstat(host(share, "u0-0")).st_uid == 0
    assert _hostfs.current_fs_ids() == (0, 0)


def _ids_after_a_pause() -> tuple[int, int, tuple[int, ...]]:
    time.sleep(0.005)
    return (*_hostfs.current_fs_ids(), tuple(os.getgroups()))


def test_setattr_runs_inline_unless_it_truncates(
    fs: PassthroughFS, share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """chmod, chown and utimensat are fast metadata calls (on the event
    loop, like getattr); a size change can free a whole file (the pool)."""
    with open(host(share, "f"), "wb") as f:
        f.write(b"x" * 10000)
    threads: list[bool] = []  # ran on the loop's thread?
    real = fs._w_setattr

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return real(*args)

    monkeypatch.setattr(fs, "_w_setattr", spy)

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        a = await fs.setattr(e.st_ino, EntryAttributes(st_mode=0o640, st_mtime_ns=5_000_000_123),
                             SetattrFields(update_mode=True, update_mtime=True), None, ROOT)
        assert stat.S_IMODE(a.st_mode) == 0o640 and a.st_mtime_ns == 5_000_000_123
        a = await fs.setattr(e.st_ino, EntryAttributes(st_uid=1000, st_gid=1000),
                             SetattrFields(update_uid=True, update_gid=True), None, ROOT)
        assert (a.st_uid, a.st_gid) == (1000, 1000)
        a = await fs.setattr(e.st_ino, EntryAttributes(st_size=10), SetattrFields(update_size=True), None, ROOT)
        assert a.st_size == 10

    go(fs, body)
    assert threads == [True, True, False]
    st = os.stat(host(share, "f"))
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size) == (0o640, 1000, 10)  # (the truncate set mtime)


@pytest.mark.parametrize("block_device", [True, False])
def test_flush_and_release_inline_only_where_a_close_cannot_wait(
    fs: PassthroughFS, share: str, monkeypatch: pytest.MonkeyPatch, block_device: bool
) -> None:
    """FLUSH (close of a dup) and RELEASE run on the loop for a file on a
    block-device filesystem whose inode the daemon still holds; elsewhere
    (NFS, FUSE: flush-on-close), or when the close may be the last
    reference, in the pool."""
    from virtiofs_async.backends import passthrough

    monkeypatch.setattr(passthrough, "_on_block_device", lambda dev: block_device)
    closes: list[tuple[str, bool]] = []  # (what, on the loop's thread)
    real_flush, real_close = passthrough._flush_fd, passthrough._close_quietly

    def flush_spy(fd: int) -> None:
        closes.append(("flush", threading.current_thread() is threading.main_thread()))
        real_flush(fd)

    def close_spy(fd: int) -> None:
        closes.append(("close", threading.current_thread() is threading.main_thread()))
        real_close(fd)

    monkeypatch.setattr(passthrough, "_flush_fd", flush_spy)
    monkeypatch.setattr(passthrough, "_close_quietly", close_spy)

    async def body() -> None:
        info, e = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
        await fs.write(info.fh, 0, [memoryview(b"data")], ROOT)
        closes.clear()
        await fs.flush(info.fh, 0)
        await fs.release(info.fh)
        assert closes == [("flush", block_device), ("close", block_device)]
        # The inode forgotten while open: the release is the last close.
        info = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        await fs.forget([(e.st_ino, 1)])
        closes.clear()
        await fs.release(info.fh)
        assert closes[-1] == ("close", False) and len(closes) == 2  # (the O_PATH fd, then the file)

    go(fs, body)
    with open(host(share, "f"), "rb") as f:
        assert f.read() == b"data"


@pytest.mark.parametrize("block_device, own_umask", [(True, True), (True, False), (False, True)])
def test_namespace_calls_and_small_writes_inline_on_a_block_device(
    make_fs: Callable[..., PassthroughFS], share: str, monkeypatch: pytest.MonkeyPatch, block_device: bool,
    own_umask: bool,
) -> None:
    """On a block-device filesystem, create/mkdir/mknod/symlink/link, open
    without O_TRUNC, opendir, READDIR(PLUS), rename, unlink and rmdir, and writes of at most
    ``inline_write_max`` bytes to a buffered handle run on the loop, the
    creating ones as the caller (owner, umask) with the loop thread's
    identity restored after; truncating opens, large or O_SYNC writes, and
    dropping the last link of a large file nobody holds go to the pool.
    Elsewhere (anonymous device numbers: NFS, FUSE, tmpfs) all of them do.
    The calls that apply a umask run inline only on a thread whose umask is
    its own (``own_umask``: the loop runs on a thread that claimed it, as
    the daemon's main thread does); on this unclaimed main thread they go
    to the pool, so no other thread ever sees the umask switch."""
    from virtiofs_async.backends import passthrough

    monkeypatch.setattr(passthrough, "_on_block_device", lambda dev: block_device)
    fs = make_fs(posix_acl=True)  # handles_umask: the request's umask is applied
    os.chmod(share, 0o777)
    with open(host(share, "big"), "wb") as f:  # 2 MiB allocated, never looked up
        f.write(b"b" * (2 << 20))
    with open(host(share, "big2"), "wb") as f:
        f.write(b"c" * (2 << 20))
    U = RequestContext(uid=1000, gid=1000, pid=2, umask=0o027)
    pooled: list[str] = []  # the calls that went to the pool, by request
    steps: list[tuple[str, bool]] = []

    async def body() -> None:
        real = fs.run_blocking

        async def spy(fn: Callable[..., Any], *args: Any) -> Any:
            pooled.append("call")
            return await real(fn, *args)

        fs.run_blocking = spy  # type: ignore[method-assign]

        async def step(name: str, coro: Awaitable[Any]) -> Any:
            before = len(pooled)
            result = await coro
            steps.append((name, len(pooled) > before))
            return result

        d = await step("mkdir", fs.mkdir(ROOT_INODE, b"d", 0o777, U))
        info, f = await step("create", fs.create(ROOT_INODE, b"f", 0o666, os.O_RDWR, U))
        await step("write 4 KiB", fs.write(info.fh, 0, [memoryview(b"w" * 4096)], U))
        await step("write 2 MiB", fs.write(info.fh, 4096, [memoryview(b"W" * 4096)] * 512, U))
        await fs.release(info.fh)
        await step("symlink", fs.symlink(d.st_ino, b"s", b"../f", U))
        await step("mknod", fs.mknod(d.st_ino, b"p", stat.S_IFIFO | 0o666, 0, U))
        await step("link", fs.link(f.st_ino, d.st_ino, b"hard", ROOT))
        await step("rename", fs.rename(ROOT_INODE, b"f", ROOT_INODE, b"g", 0, ROOT))
        h = await step("open", fs.open(f.st_ino, os.O_RDONLY, ROOT))
        await fs.release(h.fh)
        h = await step("open O_TRUNC", fs.open(f.st_ino, os.O_WRONLY | os.O_TRUNC, ROOT))
        await fs.release(h.fh)
        h = await step("open O_SYNC", fs.open(f.st_ino, os.O_WRONLY | os.O_SYNC, ROOT))
        await step("write O_SYNC", fs.write(h.fh, 0, [memoryview(b"s")], ROOT))
        await fs.release(h.fh)
        h = await step("opendir", fs.opendir(d.st_ino, ROOT))
        listing = Collect(plus=True)
        await step("readdirplus", fs.readdir(h.fh, 0, listing))
        assert sorted(n for n, _, _ in listing.entries) == [b".", b"..", b"hard", b"p", b"s"]
        await fs.releasedir(h.fh)
        await step("unlink small", fs.unlink(d.st_ino, b"hard", ROOT))
        await step("unlink big", fs.unlink(ROOT_INODE, b"big", ROOT))
        held = await fs.lookup(ROOT_INODE, b"big2", ROOT)  # our O_PATH fd keeps its blocks
        await step("unlink big held", fs.unlink(ROOT_INODE, b"big2", ROOT))
        await fs.forget([(held.st_ino, 1)])
        await fs.unlink(d.st_ino, b"s", ROOT)
        await fs.unlink(d.st_ino, b"p", ROOT)
        await step("rmdir", fs.rmdir(ROOT_INODE, b"d", ROOT))
        fs.run_blocking = real  # type: ignore[method-assign]

    ids: list[tuple[int, int]] = []

    def serve() -> None:
        if own_umask:
            assert _hostfs.claim_private_fs()
        go(fs, body)
        ids.append(_hostfs.current_fs_ids())  # the loop's thread is the daemon again

    old = os.umask(0o022)
    try:
        if own_umask:
            worker = threading.Thread(target=serve)
            worker.start()
            worker.join()
        else:
            serve()
        assert os.umask(0o022) == 0o022  # the process umask came back (or never moved)
    finally:
        os.umask(old)
    pool_only = {"write 2 MiB", "open O_TRUNC", "write O_SYNC", "unlink big"}
    if not own_umask:
        pool_only |= {"mkdir", "create", "mknod"}
    assert steps == [(name, not block_device or name in pool_only) for name, _ in steps]
    assert [name for name, _ in steps] == [
        "mkdir", "create", "write 4 KiB", "write 2 MiB", "symlink", "mknod", "link", "rename", "open",
        "open O_TRUNC", "open O_SYNC", "write O_SYNC", "opendir", "readdirplus", "unlink small", "unlink big",
        "unlink big held", "rmdir",
    ]
    assert ids == [(0, 0)] and _hostfs.current_fs_ids() == (0, 0)
    st = os.lstat(host(share, "g"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_size) == (1000, 1000, 0o640, 1)
    assert sorted(os.listdir(share)) == ["g"]


def test_inline_fallback_without_a_pool(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(inline_metadata=False)
    os.chmod(share, 0o777)

    async def body() -> None:
        info, e = await fs.create(ROOT_INODE, b"f", 0o666, os.O_RDWR, USER)
        await fs.write(info.fh, 0, [memoryview(b"data")], USER)
        assert await fs.read(info.fh, 0, 10) == b"data"
        await fs.release(info.fh)
        assert (await fs.lookup(ROOT_INODE, b"f", ROOT)).st_uid == 1000

    old = os.umask(0o022)
    try:
        go(fs, body, pool=False)
        assert os.umask(0o022) == 0o022  # the process umask came back
    finally:
        os.umask(old)
    # Created on this (main) thread with the request's umask (0), not the process's.
    assert _hostfs.current_fs_ids() == (0, 0) and stat.S_IMODE(os.stat(host(share, "f")).st_mode) == 0o666


# -- killpriv_v2 ---------------------------------------------------------------------------------


def test_suid_sgid_dropped_by_non_root_write_truncate_and_on_request(fs: PassthroughFS, share: str) -> None:
    os.chmod(share, 0o777)

    def suid_file(name: str) -> None:
        with open(host(share, name), "wb") as f:
            f.write(b"#!")
        os.chown(host(share, name), 1000, 1000)
        os.chmod(host(share, name), 0o6775)

    for name in ("w", "t", "k", "r"):
        suid_file(name)

    async def body() -> None:
        w = await fs.lookup(ROOT_INODE, b"w", USER)
        h = await fs.open(w.st_ino, os.O_WRONLY, USER)
        await fs.write(h.fh, 2, [memoryview(b"sh")], USER)
        await fs.release(h.fh)
        t = await fs.lookup(ROOT_INODE, b"t", USER)
        await fs.setattr(t.st_ino, EntryAttributes(st_size=0), SetattrFields(update_size=True), None, USER)
        k = await fs.lookup(ROOT_INODE, b"k", ROOT)
        a = await fs.setattr(k.st_ino, EntryAttributes(), SetattrFields(kill_suidgid=True), None, ROOT)
        assert stat.S_IMODE(a.st_mode) == 0o775
        r = await fs.lookup(ROOT_INODE, b"r", ROOT)
        h = await fs.open(r.st_ino, os.O_WRONLY, ROOT)
        await fs.write(h.fh, 0, [memoryview(b"ok")], ROOT)  # root keeps them (CAP_FSETID)
        await fs.release(h.fh)

    go(fs, body)
    for name in ("w", "t", "k"):
        assert stat.S_IMODE(os.stat(host(share, name)).st_mode) == 0o775, name
    assert stat.S_IMODE(os.stat(host(share, "r")).st_mode) == 0o6775
    assert PassthroughFS.supports_killpriv_v2


# -- escapes ----------------------------------------------------------------------------------------


def test_host_symlinks_pointing_out_are_never_followed(fs: PassthroughFS, share: str, outside: str) -> None:
    secret = os.path.join(outside, "secret")
    os.symlink(outside, host(share, "abs"))
    os.symlink(os.path.relpath(outside, share), host(share, "rel"))
    os.symlink(secret, host(share, "secret-link"))
    os.symlink("../" * 30 + outside.lstrip("/"), host(share, "deep"))
    before = os.stat(secret)

    async def body() -> None:
        for name in (b"abs", b"rel", b"deep"):
            e = await fs.lookup(ROOT_INODE, name, ROOT)
            assert stat.S_ISLNK(e.st_mode)
            # Looking up through it: the link is not a directory here.
            assert await errno_of(fs.lookup(e.st_ino, b"secret", ROOT)) == errno.ENOTDIR
            assert await errno_of(fs.opendir(e.st_ino, ROOT)) == errno.ENOTDIR
            assert await errno_of(fs.create(e.st_ino, b"x", 0o644, os.O_RDWR, ROOT)) == errno.ENOTDIR
            assert await errno_of(fs.mkdir(e.st_ino, b"x", 0o755, ROOT)) == errno.ENOTDIR
        s = await fs.lookup(ROOT_INODE, b"secret-link", ROOT)
        assert s.st_size == len(secret)  # the link's own attributes, not the target's
        assert await errno_of(fs.open(s.st_ino, os.O_RDONLY, ROOT)) == errno.ELOOP
        assert await errno_of(fs.open(s.st_ino, os.O_WRONLY | os.O_TRUNC, ROOT)) == errno.ELOOP
        # Creating over the link must not write through it.
        assert await errno_of(fs.create(ROOT_INODE, b"secret-link", 0o644, os.O_RDWR | os.O_TRUNC,
                                        ROOT)) in (errno.ELOOP, errno.EEXIST)
        # Attribute changes land on the link itself.
        await fs.setattr(s.st_ino, EntryAttributes(st_uid=4321, st_gid=4321),
                         SetattrFields(update_uid=True, update_gid=True), None, ROOT)
        await fs.setattr(s.st_ino, EntryAttributes(st_mtime_ns=10**9), SetattrFields(update_mtime=True), None, ROOT)
        assert await errno_of(fs.setattr(s.st_ino, EntryAttributes(st_size=0), SetattrFields(update_size=True),
                                         None, ROOT)) == errno.EINVAL
        await fs.setxattr(s.st_ino, b"trusted.escape", b"1", 0, ROOT)
        assert await errno_of(fs.setxattr(s.st_ino, b"user.escape", b"1", 0, ROOT)) == errno.EPERM
        await fs.access(s.st_ino, 0, ROOT)
        assert await fs.readlink(s.st_ino, ROOT) == secret.encode()

    go(fs, body)
    after = os.stat(secret)
    assert open(secret, "rb").read() == b"top secret\n"
    assert (after.st_uid, after.st_gid, after.st_mtime_ns, after.st_mode) == (
        before.st_uid, before.st_gid, before.st_mtime_ns, before.st_mode)
    assert os.listxattr(secret) == [] and "trusted.escape" in os.listxattr(host(share, "secret-link"),
                                                                           follow_symlinks=False)
    assert os.listdir(outside) == ["secret"]


def test_dotdot_at_the_root_stays_at_the_root(fs: PassthroughFS, share: str, outside: str) -> None:
    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"..", ROOT)
        assert e.st_ino == ROOT_INODE
        for _ in range(5):
            e = await fs.lookup(e.st_ino, b"..", ROOT)
            assert e.st_ino == ROOT_INODE
        assert await errno_of(fs.lookup(ROOT_INODE, b"outside", ROOT)) == errno.ENOENT
        assert await errno_of(fs.lookup(ROOT_INODE, b"../outside", ROOT)) == errno.EINVAL
        assert await errno_of(fs.mkdir(ROOT_INODE, b"..", 0o755, ROOT)) == errno.EEXIST
        assert await errno_of(fs.rename(ROOT_INODE, b"..", ROOT_INODE, b"x", 0, ROOT)) == errno.EBUSY
        assert await errno_of(fs.symlink(ROOT_INODE, b"..", b"x", ROOT)) == errno.EEXIST

    go(fs, body)
    assert os.listdir(outside) == ["secret"]


def test_hard_link_to_outside_is_just_a_file_inside(fs: PassthroughFS, share: str, outside: str) -> None:
    os.link(os.path.join(outside, "secret"), host(share, "hard"))

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"hard", ROOT)
        assert e.st_nlink == 2
        h = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        assert await fs.read(h.fh, 0, 100) == b"top secret\n"  # the same inode: shared on purpose by the host
        await fs.release(h.fh)
        await fs.unlink(ROOT_INODE, b"hard", ROOT)  # removes only the name inside

    go(fs, body)
    assert open(os.path.join(outside, "secret"), "rb").read() == b"top secret\n"
    assert os.listdir(share) == []


def test_renames_across_directories_stay_inside(fs: PassthroughFS, share: str, outside: str) -> None:
    os.makedirs(host(share, "a", "deep"))
    with open(host(share, "a", "deep", "f"), "wb") as f:
        f.write(b"inside")

    async def body() -> None:
        a = await fs.lookup(ROOT_INODE, b"a", ROOT)
        deep = await fs.lookup(a.st_ino, b"deep", ROOT)
        await fs.rename(deep.st_ino, b"f", ROOT_INODE, b"moved", 0, ROOT)
        await fs.rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0, ROOT)
        # The directory the guest holds moved; its nodeid still names it, inside.
        await fs.rename(ROOT_INODE, b"moved", deep.st_ino, b"back", 0, ROOT)
        for bad in (b"../escaped", b"x/../../escaped"):
            assert await errno_of(fs.rename(ROOT_INODE, b"b", ROOT_INODE, bad, 0, ROOT)) == errno.EINVAL
        up = await fs.lookup(deep.st_ino, b"..", ROOT)
        assert up.st_ino == a.st_ino and (await fs.lookup(up.st_ino, b"..", ROOT)).st_ino == ROOT_INODE

    go(fs, body)
    assert open(host(share, "b", "deep", "back"), "rb").read() == b"inside"
    assert sorted(os.listdir(outside)) == ["secret"]


@pytest.mark.parametrize("handles", ["never", "mandatory"])
def test_forged_nodeids_are_refused(make_fs: Callable[..., PassthroughFS], share: str, outside: str,
                                    handles: str) -> None:
    fs = make_fs(inode_file_handles=handles, xattr=True)
    foreign = os.stat(os.path.join(outside, "secret")).st_ino
    foreign_dir = os.stat(outside).st_ino

    async def body() -> None:
        for nodeid in (foreign, foreign_dir, 2, 1 << 63, (1 << 64) - 1):
            assert await errno_of(fs.getattr(nodeid, ROOT)) == errno.ESTALE
            assert await errno_of(fs.open(nodeid, os.O_RDONLY, ROOT)) == errno.ESTALE
            assert await errno_of(fs.lookup(nodeid, b".", ROOT)) == errno.ESTALE
            assert await errno_of(fs.opendir(nodeid, ROOT)) == errno.ESTALE
            assert await errno_of(fs.getxattr(nodeid, b"user.x", ROOT)) == errno.ESTALE
            assert await errno_of(fs.link(nodeid, ROOT_INODE, b"stolen", ROOT)) == errno.ESTALE
            assert await errno_of(fs.setattr(nodeid, EntryAttributes(st_mode=0o777), SetattrFields(update_mode=True),
                                             None, ROOT)) == errno.ESTALE
            assert await errno_of(fs.read(nodeid, 0, 10)) == errno.EBADF  # as a file handle number

    go(fs, body)
    assert os.listdir(share) == []


# -- file handles ----------------------------------------------------------------------------------


def test_inode_file_handles_keep_no_fds(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(inode_file_handles="mandatory")
    os.makedirs(host(share, "d"))
    for i in range(20):
        with open(host(share, "d", f"f{i}"), "wb") as f:
            f.write(str(i).encode())

    async def body() -> None:
        base = fs.held_fds()
        d = await fs.lookup(ROOT_INODE, b"d", ROOT)
        entries = [await fs.lookup(d.st_ino, f"f{i}".encode(), ROOT) for i in range(20)]
        assert fs.held_fds() == base  # handles, not fds
        h = await fs.open(entries[7].st_ino, os.O_RDONLY, ROOT)
        assert await fs.read(h.fh, 0, 10) == b"7"
        await fs.release(h.fh)
        info, new = await fs.create(d.st_ino, b"new", 0o644, os.O_RDWR, ROOT)
        await fs.release(info.fh)
        await fs.rename(d.st_ino, b"f3", ROOT_INODE, b"f3moved", 0, ROOT)
        assert (await fs.getattr(entries[3].st_ino, ROOT)).st_size == 1
        os.unlink(host(share, "f3moved"))  # gone on the host: its handle is stale
        assert await errno_of(fs.getattr(entries[3].st_ino, ROOT)) == errno.ESTALE
        assert fs.held_fds() == base

    go(fs, body)


def test_prefer_falls_back_and_bad_options_are_refused(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(inode_file_handles="prefer")
    assert fs.file_handles in ("prefer", "never")
    with pytest.raises(ValueError):
        PassthroughFS(share, cache="sometimes")
    with pytest.raises(ValueError):
        PassthroughFS(share, inode_file_handles="always")


# -- xattrs and ACLs --------------------------------------------------------------------------------


def test_xattrs(fs: PassthroughFS, share: str, make_fs: Callable[..., PassthroughFS]) -> None:
    with open(host(share, "f"), "wb"):
        pass
    os.chmod(host(share, "f"), 0o644)
    off = make_fs()

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        await fs.setxattr(e.st_ino, b"user.colour", b"blue", 0, ROOT)
        assert os.getxattr(host(share, "f"), "user.colour") == b"blue"
        assert await fs.getxattr(e.st_ino, b"user.colour", ROOT) == b"blue"
        assert b"user.colour" in await fs.listxattr(e.st_ino, ROOT)
        assert await errno_of(fs.setxattr(e.st_ino, b"user.colour", b"x", os.XATTR_CREATE, ROOT)) == errno.EEXIST
        assert await errno_of(fs.getxattr(e.st_ino, b"user.none", ROOT)) == errno.ENODATA
        # user.* permission is the guest kernel's check (the request runs as
        # the daemon); trusted.* and security.* stay the guest's privileged rules.
        assert await fs.getxattr(e.st_ino, b"user.colour", USER) == b"blue"
        await fs.setxattr(e.st_ino, b"trusted.t", b"1", 0, ROOT)
        assert await errno_of(fs.setxattr(e.st_ino, b"trusted.t", b"2", 0, USER)) == errno.EPERM
        assert await errno_of(fs.getxattr(e.st_ino, b"trusted.t", USER)) == errno.ENODATA
        assert b"trusted.t" not in await fs.listxattr(e.st_ino, USER)
        assert b"trusted.t" in await fs.listxattr(e.st_ino, ROOT)
        # No POSIX ACLs unless asked for.
        assert await errno_of(fs.getxattr(e.st_ino, b"system.posix_acl_access", ROOT)) == errno.EOPNOTSUPP
        await fs.removexattr(e.st_ino, b"user.colour", ROOT)
        assert "user.colour" not in os.listxattr(host(share, "f"))
        # xattr off: ENOSYS, like virtiofsd.
        e2 = await off.lookup(ROOT_INODE, b"f", ROOT)
        assert await errno_of(off.getxattr(e2.st_ino, b"user.x", ROOT)) == errno.ENOSYS
        assert await errno_of(off.listxattr(e2.st_ino, ROOT)) == errno.ENOSYS
        assert await errno_of(off.setxattr(e2.st_ino, b"user.x", b"", 0, ROOT)) == errno.ENOSYS

    go(fs, body)


def test_posix_acl_mode_applies_umask_per_request(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(posix_acl=True)
    assert fs.handles_umask and fs.supports_posix_acl and fs.xattr
    plain = make_fs()
    assert not plain.handles_umask

    async def body() -> None:
        ctx = RequestContext(uid=0, gid=0, pid=1, umask=0o027)
        info, _ = await fs.create(ROOT_INODE, b"masked", 0o666, os.O_RDWR, ctx)
        await fs.release(info.fh)
        await fs.mkdir(ROOT_INODE, b"dmasked", 0o777, ctx)
        # With a default ACL on the parent, the ACL decides, not the umask.
        await fs.mkdir(ROOT_INODE, b"acl", 0o777, ROOT)
        acl = await fs.lookup(ROOT_INODE, b"acl", ROOT)
        await fs.setxattr(acl.st_ino, b"system.posix_acl_default", _default_acl(0o7, 0o5, 0o5), 0, ROOT)
        info, _ = await fs.create(acl.st_ino, b"f", 0o666, os.O_RDWR, ctx)
        await fs.release(info.fh)

    go(fs, body)
    assert stat.S_IMODE(os.stat(host(share, "masked")).st_mode) == 0o640
    assert stat.S_IMODE(os.stat(host(share, "dmasked")).st_mode) == 0o750
    assert stat.S_IMODE(os.stat(host(share, "acl", "f")).st_mode) == 0o644


def _default_acl(user: int, group: int, other: int) -> bytes:
    """A POSIX ACL xattr value (version 2) with the three base entries."""
    import struct

    entries = [(0x01, user, 0xFFFFFFFF), (0x04, group, 0xFFFFFFFF), (0x20, other, 0xFFFFFFFF)]
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


# -- locks ---------------------------------------------------------------------------------------


def test_posix_locks_are_per_owner(fs: PassthroughFS, share: str) -> None:
    with open(host(share, "f"), "wb") as f:
        f.write(b"x" * 100)

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        h1 = await fs.open(e.st_ino, os.O_RDWR, ROOT)
        h2 = await fs.open(e.st_ino, os.O_RDWR, ROOT)
        await fs.setlk(h1.fh, 111, FileLock(start=0, end=49, type=fcntl.F_WRLCK, pid=4001), False, False)
        # The same owner through another handle: no conflict (POSIX semantics).
        await fs.setlk(h2.fh, 111, FileLock(start=10, end=20, type=fcntl.F_WRLCK, pid=4001), False, False)
        # Another owner conflicts on the range, not outside it.
        assert await errno_of(fs.setlk(h2.fh, 222, FileLock(start=40, end=60, type=fcntl.F_RDLCK), False,
                                       False)) == errno.EAGAIN
        await fs.setlk(h2.fh, 222, FileLock(start=50, end=OFFSET_MAX, type=fcntl.F_WRLCK, pid=4002), False, False)
        # GETLK names the holder by the pid its SETLK carried.
        got = await fs.getlk(h2.fh, 222, FileLock(start=0, end=OFFSET_MAX, type=fcntl.F_WRLCK))
        assert (got.type, got.start, got.end, got.pid) == (fcntl.F_WRLCK, 0, 49, 4001)
        got = await fs.getlk(h1.fh, 111, FileLock(start=0, end=49, type=fcntl.F_WRLCK))
        assert got.type == fcntl.F_UNLCK
        got = await fs.getlk(h1.fh, 111, FileLock(start=0, end=OFFSET_MAX, type=fcntl.F_RDLCK))
        assert (got.type, got.start, got.end, got.pid) == (fcntl.F_WRLCK, 50, OFFSET_MAX, 4002)
        # A host process sees the guest's locks (they are real OFD locks),
        # and a guest sees a host process's lock, with no guest pid for it.
        fd = os.open(host(share, "f"), os.O_RDWR)
        try:
            with pytest.raises(OSError):
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
            await fs.setlk(h2.fh, 222, FileLock(start=50, end=OFFSET_MAX, type=fcntl.F_UNLCK), False, False)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _hostfs.pack_flock(fcntl.F_RDLCK, 70, 79))
            got = await fs.getlk(h1.fh, 111, FileLock(start=60, end=89, type=fcntl.F_WRLCK))
            assert (got.type, got.start, got.end, got.pid) == (fcntl.F_RDLCK, 70, 79, 0)
        finally:
            os.close(fd)
        # close() in the guest (FLUSH with the owner) drops that owner's locks.
        await fs.flush(h1.fh, 111)
        await fs.setlk(h2.fh, 222, FileLock(start=0, end=10, type=fcntl.F_WRLCK), False, False)
        await fs.setlk(h2.fh, 222, FileLock(start=0, end=OFFSET_MAX, type=fcntl.F_UNLCK), False, False)
        assert await errno_of(fs.setlk(h1.fh, 1, FileLock(start=5, end=1, type=fcntl.F_WRLCK), False,
                                       False)) == errno.EINVAL
        assert await errno_of(fs.setlk(h1.fh, 1, FileLock(start=0, end=1, type=99), False, False)) == errno.EINVAL
        await fs.release(h1.fh)
        await fs.release(h2.fh)

    go(fs, body)


def test_setlkw_waits_in_a_worker_not_on_the_loop(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(max_lock_waiters=1)
    with open(host(share, "f"), "wb") as f:
        f.write(b"x")

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        h1 = await fs.open(e.st_ino, os.O_RDWR, ROOT)
        h2 = await fs.open(e.st_ino, os.O_RDWR, ROOT)
        whole = FileLock(start=0, end=OFFSET_MAX, type=fcntl.F_WRLCK)
        await fs.setlk(h1.fh, 1, whole, False, False)
        waiter = asyncio.ensure_future(fs.setlk(h2.fh, 2, whole, True, False))
        poller = asyncio.ensure_future(fs.setlk(h2.fh, 3, whole, True, False))  # beyond max_lock_waiters
        ticks = 0
        start = time.monotonic()
        while time.monotonic() - start < 0.3:  # the loop keeps running meanwhile
            await asyncio.sleep(0.01)
            ticks += 1
            assert (await fs.getattr(e.st_ino, ROOT)).st_size == 1
        assert ticks >= 10 and not waiter.done() and not poller.done()
        await fs.setlk(h1.fh, 1, FileLock(start=0, end=OFFSET_MAX, type=fcntl.F_UNLCK), False, False)
        await asyncio.wait_for(waiter, 5)
        await fs.flush(h2.fh, 2)  # owner 2 closes: now owner 3 gets it
        await asyncio.wait_for(poller, 5)
        # flock: per open file, waits the same way.
        await fs.setlk(h1.fh, 0, FileLock(start=0, end=0, type=fcntl.F_WRLCK), False, True)
        assert await errno_of(fs.setlk(h2.fh, 0, FileLock(start=0, end=0, type=fcntl.F_RDLCK), False,
                                       True)) == errno.EAGAIN
        flocker = asyncio.ensure_future(fs.setlk(h2.fh, 0, FileLock(start=0, end=0, type=fcntl.F_RDLCK), True, True))
        await asyncio.sleep(0.05)
        assert not flocker.done()
        await fs.release(h1.fh)  # closing the file drops its flock
        await asyncio.wait_for(flocker, 5)
        await fs.release(h2.fh)

    go(fs, body)


# -- options -----------------------------------------------------------------------------------------


def test_readonly_refuses_every_mutation(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    os.mkdir(host(share, "d"))
    with open(host(share, "f"), "wb") as f:
        f.write(b"data")
    fs = make_fs(readonly=True, xattr=True)

    async def body() -> None:
        f = await fs.lookup(ROOT_INODE, b"f", ROOT)
        d = await fs.lookup(ROOT_INODE, b"d", ROOT)
        calls = [
            fs.create(ROOT_INODE, b"n", 0o644, os.O_RDWR, ROOT),
            fs.mkdir(ROOT_INODE, b"n", 0o755, ROOT),
            fs.mknod(ROOT_INODE, b"n", stat.S_IFIFO | 0o644, 0, ROOT),
            fs.symlink(ROOT_INODE, b"n", b"f", ROOT),
            fs.link(f.st_ino, ROOT_INODE, b"n", ROOT),
            fs.unlink(ROOT_INODE, b"f", ROOT),
            fs.rmdir(ROOT_INODE, b"d", ROOT),
            fs.rename(ROOT_INODE, b"f", d.st_ino, b"f", 0, ROOT),
            fs.setattr(f.st_ino, EntryAttributes(st_mode=0o777), SetattrFields(update_mode=True), None, ROOT),
            fs.setattr(f.st_ino, EntryAttributes(st_size=0), SetattrFields(update_size=True), None, ROOT),
            fs.open(f.st_ino, os.O_WRONLY, ROOT),
            fs.open(f.st_ino, os.O_RDONLY | os.O_TRUNC, ROOT),
            fs.tmpfile(ROOT_INODE, 0o600, os.O_RDWR, ROOT),
            fs.setxattr(f.st_ino, b"user.x", b"1", 0, ROOT),
            fs.removexattr(f.st_ino, b"user.x", ROOT),
            fs.access(f.st_ino, os.W_OK, ROOT),
        ]
        for call in calls:
            assert await errno_of(call) == errno.EROFS
        h = await fs.open(f.st_ino, os.O_RDONLY, ROOT)
        assert await fs.read(h.fh, 0, 10) == b"data"
        assert await errno_of(fs.write(h.fh, 0, [memoryview(b"x")], ROOT)) == errno.EROFS
        await fs.release(h.fh)

    go(fs, body)
    assert sorted(os.listdir(share)) == ["d", "f"] and open(host(share, "f"), "rb").read() == b"data"


@pytest.mark.parametrize("policy, timeout, file_flags, dir_flags", [
    ("never", 0.0, {"direct_io"}, set()),
    ("metadata", 86400.0, {"direct_io"}, {"keep_cache", "cache_dir"}),
    ("auto", 1.0, set(), set()),
    ("always", 86400.0, {"keep_cache"}, {"keep_cache", "cache_dir"}),
])
def test_cache_policies(make_fs: Callable[..., PassthroughFS], share: str, policy: str, timeout: float,
                        file_flags: set[str], dir_flags: set[str]) -> None:
    with open(host(share, "f"), "wb"):
        pass
    fs = make_fs(cache=policy)
    assert CACHE_TIMEOUTS[policy] == timeout
    assert fs.supports_readdirplus == (policy != "never")

    def flags_of(info: Any) -> set[str]:
        return {k for k in ("direct_io", "keep_cache", "cache_dir") if getattr(info, k)}

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        assert e.entry_timeout == e.attr_timeout == timeout
        assert (await fs.getattr(e.st_ino, ROOT)).attr_timeout == timeout
        fi = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        di = await fs.opendir(ROOT_INODE, ROOT)
        assert flags_of(fi) == file_flags and flags_of(di) == dir_flags
        await fs.release(fi.fh)
        await fs.releasedir(di.fh)

    go(fs, body)


def test_direct_io_is_stripped_unless_allowed(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    with open(host(share, "f"), "wb") as f:
        f.write(b"x" * 4096)
    strict = make_fs()
    allowed = make_fs(allow_direct_io=True)

    async def flags(fs: PassthroughFS) -> tuple[int, bool]:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        info = await fs.open(e.st_ino, os.O_RDONLY | os.O_DIRECT, ROOT)
        fl = fcntl.fcntl(fs._handles[info.fh].fd, fcntl.F_GETFL)
        await fs.release(info.fh)
        return fl, info.direct_io

    fl, direct = go(strict, lambda: flags(strict))
    assert not fl & os.O_DIRECT and not direct
    fl, direct = go(allowed, lambda: flags(allowed))
    assert fl & os.O_DIRECT and direct


def test_writeback_opens_write_only_as_read_write(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(writeback=True)
    assert fs.enable_writeback_cache
    os.chmod(share, 0o777)
    with open(host(share, "wonly"), "wb") as f:
        f.write(b"abcdef")
    os.chown(host(share, "wonly"), 1000, 1000)
    os.chmod(host(share, "wonly"), 0o200)  # write-only for its owner

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"wonly", USER)
        info = await fs.open(e.st_ino, os.O_WRONLY | os.O_APPEND, USER)
        fl = fcntl.fcntl(fs._handles[info.fh].fd, fcntl.F_GETFL)
        assert fl & os.O_ACCMODE == os.O_RDWR and not fl & os.O_APPEND
        # The guest's page cache reads back partial pages through it.
        assert await fs.read(info.fh, 0, 3) == b"abc"
        await fs.write(info.fh, 6, [memoryview(b"gh")], USER)  # the guest computed the offset
        await fs.release(info.fh)
        info, _ = await fs.create(ROOT_INODE, b"created", 0o644, os.O_WRONLY, USER)
        assert fcntl.fcntl(fs._handles[info.fh].fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        await fs.release(info.fh)

    go(fs, body)
    assert open(host(share, "wonly"), "rb").read() == b"abcdefgh"


def test_announce_submounts(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    mnt = host(share, "mnt")
    os.mkdir(mnt)
    if os.system(f"mount -t tmpfs -o size=1m vfa-test {mnt} 2>/dev/null") != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with open(os.path.join(mnt, "inner"), "wb") as f:
            f.write(b"on tmpfs")
        os.mkdir(os.path.join(mnt, "sub"))
        fs = make_fs(announce_submounts=True)
        quiet = make_fs()

        async def body() -> None:
            m = await fs.lookup(ROOT_INODE, b"mnt", ROOT)
            assert m.attr_flags & abi.FUSE_ATTR_SUBMOUNT
            sub = await fs.lookup(m.st_ino, b"sub", ROOT)
            inner = await fs.lookup(m.st_ino, b"inner", ROOT)
            assert not sub.attr_flags and not inner.attr_flags
            assert fs.host_key(inner.st_ino)[0] == os.stat(mnt).st_dev != os.stat(share).st_dev
            reply = Collect(plus=True)
            h = await fs.opendir(ROOT_INODE, ROOT)
            await fs.readdir(h.fh, 0, reply)
            flags = {n: a.attr_flags for n, a, _ in reply.entries}
            assert flags[b"mnt"] & abi.FUSE_ATTR_SUBMOUNT
            await fs.releasedir(h.fh)
            assert not (await quiet.lookup(ROOT_INODE, b"mnt", ROOT)).attr_flags
            # Up and out of the submount: back to the share's root.
            assert (await fs.lookup(m.st_ino, b"..", ROOT)).st_ino == ROOT_INODE

        go(fs, body)
    finally:
        os.system(f"umount -l {mnt}")


def test_destroy_drops_everything_but_the_root(fs: PassthroughFS, share: str) -> None:
    for i in range(5):
        open(host(share, f"f{i}"), "wb").close()

    async def body() -> None:
        base = fs.held_fds()
        es = [await fs.lookup(ROOT_INODE, f"f{i}".encode(), ROOT) for i in range(5)]
        h = await fs.open(es[0].st_ino, os.O_RDONLY, ROOT)
        await fs.setlk(h.fh, 9, FileLock(start=0, end=1, type=fcntl.F_RDLCK), False, False)
        assert fs.held_fds() == base + 7
        await fs.destroy()
        assert fs.held_fds() == base and fs.inode_count == 1
        assert await errno_of(fs.getattr(es[1].st_ino, ROOT)) == errno.ESTALE
        assert await errno_of(fs.read(h.fh, 0, 1)) == errno.EBADF
        assert (await fs.lookup(ROOT_INODE, b"f1", ROOT)).st_ino == es[1].st_ino

    go(fs, body)


def test_bounded_fds_under_many_lookups(fs: PassthroughFS, share: str) -> None:
    for i in range(200):
        open(host(share, f"f{i}"), "wb").close()

    async def body() -> None:
        base = fs.held_fds()
        for round_ in range(3):
            es = await asyncio.gather(*(fs.lookup(ROOT_INODE, f"f{i}".encode(), ROOT) for i in range(200)))
            assert fs.held_fds() == base + 200
            await fs.forget([(e.st_ino, 1) for e in es])
            assert fs.held_fds() == base and fs.inode_count == 1

    go(fs, body)


def test_huge_guest_offsets_are_einval_not_crashes(fs: PassthroughFS, share: str) -> None:
    async def body() -> None:
        info, e = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
        huge = (1 << 64) - 1
        assert await errno_of(fs.read(info.fh, huge, 10)) == errno.EINVAL
        assert await errno_of(fs.write(info.fh, 1 << 63, [memoryview(b"x")], ROOT)) == errno.EINVAL
        assert await errno_of(fs.lseek(info.fh, huge, os.SEEK_DATA)) == errno.EINVAL
        assert await errno_of(fs.fallocate(info.fh, 0, 0, huge)) == errno.EINVAL
        assert await errno_of(fs.fallocate(info.fh, 1 << 31, 0, 1)) == errno.EOPNOTSUPP
        assert await errno_of(fs.copy_file_range(info.fh, huge, info.fh, 0, 1, 0)) == errno.EINVAL
        assert await errno_of(fs.setattr(e.st_ino, EntryAttributes(st_size=huge), SetattrFields(update_size=True),
                                         None, ROOT)) == errno.EINVAL
        assert await fs.copy_file_range(info.fh, 0, info.fh, 100, huge, 0) == 0  # length is clamped
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        assert await errno_of(fs.readdir(dirh.fh, huge, Collect())) == errno.EINVAL
        await fs.releasedir(dirh.fh)
        await fs.release(info.fh)

    go(fs, body)


def test_a_cancelled_request_leaks_no_fd(make_fs: Callable[..., PassthroughFS], share: str) -> None:
    fs = make_fs(inline_metadata=False)  # every call below goes to the pool
    with open(host(share, "f"), "wb") as f:
        f.write(b"x")

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        pool = fs.run_blocking
        started = threading.Event()

        def slow(fn: Callable[..., Any], *args: Any) -> Any:
            started.set()
            time.sleep(0.2)
            return fn(*args)

        fs.run_blocking = lambda fn, *args: pool(slow, fn, *args)  # type: ignore[method-assign]
        await pool(os.getpid)  # the runtime's own per-loop fds exist before counting
        before = len(os.listdir("/proc/self/fd"))
        for call in (fs.open(e.st_ino, os.O_RDONLY, ROOT), fs.create(ROOT_INODE, b"c", 0o644, os.O_RDWR, ROOT),
                     fs.opendir(ROOT_INODE, ROOT), fs.mkdir(ROOT_INODE, b"d", 0o755, ROOT)):
            started.clear()
            task = asyncio.ensure_future(call)
            while not started.is_set():
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await asyncio.sleep(0.5)  # the abandoned workers finish and clean up
        assert len(os.listdir("/proc/self/fd")) == before
        fs.run_blocking = pool  # type: ignore[method-assign]
        # The node the cancelled worker used is still usable.
        h = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        assert await fs.read(h.fh, 0, 1) == b"x"
        await fs.release(h.fh)

    go(fs, body)
    assert sorted(os.listdir(share)) == ["c", "d", "f"]  # the work itself was done


_CHROOTED_XATTR_SCRIPT = r"""
import asyncio, json, os, stat, sys
sys.path[:0] = [%(src)r]
from virtiofs_async.backends.passthrough import PassthroughFS
from virtiofs_async.operations import ROOT_INODE, RequestContext
from virtiofs_async.runtime import get_runtime

share = %(share)r
fs = PassthroughFS(share, xattr=True)  # built before the root switch, as the sandbox does
rt = get_runtime("asyncio")  # imports what it needs before the switch too
os.chroot(share)
os.chdir("/")
R = RequestContext(0, 0, 1)
out = {}

async def main():
    fs.run_blocking = rt.run_in_thread
    for name in ("file", "dir", "link", "fifo"):
        e = await fs.lookup(ROOT_INODE, name.encode(), R)
        await fs.setxattr(e.st_ino, b"trusted.who", name.encode(), 0, R)
        out[name] = [(await fs.getxattr(e.st_ino, b"trusted.who", R)).decode(),
                     sorted(n.decode() for n in await fs.listxattr(e.st_ino, R))]
    # the same on the event loop's own thread (no pool)
    del fs.run_blocking
    e = await fs.lookup(ROOT_INODE, b"link", R)
    await fs.removexattr(e.st_ino, b"trusted.who", R)
    out["inline-removed"] = sorted(n.decode() for n in await fs.listxattr(e.st_ino, R))

rt.run(main)
print(json.dumps(out))
"""


def test_xattrs_never_use_a_path_after_the_root_moves(share: str) -> None:
    """After a sandbox pivots into the share, ``/proc/self/fd/N`` would be a
    guest-made path: plant one for every fd number, pointing at a decoy."""
    import json
    import subprocess
    import sys

    os.makedirs(host(share, "proc", "self", "fd"))
    for n in range(256):
        os.symlink("/decoy", host(share, "proc", "self", "fd", str(n)))
    with open(host(share, "decoy"), "wb"):
        pass
    with open(host(share, "file"), "wb"):
        pass
    os.mkdir(host(share, "dir"))
    os.symlink("decoy", host(share, "link"))
    os.mkfifo(host(share, "fifo"))
    src = os.path.dirname(os.path.dirname(virtiofs_async.__file__))  # the tested install
    script = _CHROOTED_XATTR_SCRIPT % {"src": os.path.abspath(src), "share": share}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    for name in ("file", "dir", "link", "fifo"):
        assert out[name] == [name, ["trusted.who"]], name
    for name in ("file", "dir", "fifo"):
        assert os.getxattr(host(share, name), "trusted.who", follow_symlinks=False) == name.encode()
    assert out["inline-removed"] == [] == os.listxattr(host(share, "link"), follow_symlinks=False)
    assert os.listxattr(host(share, "decoy")) == []


# -- the data path: preadv / pwritev straight into and out of guest buffers ------------------


def _split(buf: bytearray, sizes: list[int]) -> list[memoryview]:
    view = memoryview(buf)
    out, pos = [], 0
    for n in sizes:
        out.append(view[pos:pos + n])
        pos += n
    assert pos == len(buf)
    return out


def test_read_into_fills_the_buffers_in_place(fs: PassthroughFS, share: str) -> None:
    payload = os.urandom(20000)
    with open(host(share, "f"), "wb") as f:
        f.write(payload)

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        info = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        buf = bytearray(12288)
        assert await fs.read_into(info.fh, 100, len(buf), _split(buf, [1, 4095, 4096, 4096])) == len(buf)
        assert buf == payload[100:100 + len(buf)]
        buf = bytearray(8192)  # crosses the end of the file: short, the rest untouched
        assert await fs.read_into(info.fh, 16000, 8192, _split(buf, [4096, 4096])) == 4000
        assert buf[:4000] == payload[16000:] and buf[4000:] == bytes(4192)
        assert await fs.read_into(info.fh, 30000, 4096, [memoryview(bytearray(4096))]) == 0
        assert await fs.read_into(info.fh, 0, 0, []) == 0
        assert await errno_of(fs.read_into(info.fh, (1 << 64) - 1, 1, [memoryview(bytearray(1))])) == errno.EINVAL
        await fs.release(info.fh)
        assert await errno_of(fs.read_into(info.fh, 0, 1, [memoryview(bytearray(1))])) == errno.EBADF
        dirh = await fs.opendir(ROOT_INODE, ROOT)
        assert await errno_of(fs.read_into(dirh.fh, 0, 1, [memoryview(bytearray(1))])) == errno.EISDIR
        await fs.releasedir(dirh.fh)

    go(fs, body)


def test_read_into_tries_the_page_cache_inline_then_the_pool(
    make_fs: Callable[..., PassthroughFS], share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RWF_NOWAIT on the loop first; what it could not read (EAGAIN, a
    partial read, end of file) the pool reads; a file that refuses
    RWF_NOWAIT is never asked again; O_DIRECT handles never try it."""
    payload = os.urandom(8192)
    with open(host(share, "f"), "wb") as f:
        f.write(payload)
    fs = make_fs(allow_direct_io=True)
    real = os.preadv
    calls: list[tuple[str, int, int]] = []  # (thread, flags, offset)
    script: list[Any] = []  # what each RWF_NOWAIT call does: an int (bytes to read) or an errno

    def fake(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        calls.append((threading.current_thread().name, flags, offset))
        if flags and script:
            action = script.pop(0)
            if action in (errno.EAGAIN, errno.EOPNOTSUPP):
                raise OSError(action, os.strerror(action))
            return real(fd, [memoryview(buffers[0])[:action]], offset)
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", fake)
    loop_thread = threading.current_thread().name

    async def read(fh: int, offset: int = 0, size: int = 8192) -> tuple[int, bytes]:
        buf = bytearray(size)
        calls.clear()
        n = await fs.read_into(fh, offset, size, _split(buf, [size // 2, size // 2]))
        return n, bytes(buf[:n])

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        info = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        assert await read(info.fh) == (8192, payload)  # cached: one inline call
        assert [(t == loop_thread, f) for t, f, _ in calls] == [(True, os.RWF_NOWAIT)]
        script[:] = [errno.EAGAIN]
        assert await read(info.fh) == (8192, payload)  # nothing cached: the pool reads it all
        assert [(t == loop_thread, f, o) for t, f, o in calls] == [(True, os.RWF_NOWAIT, 0), (False, 0, 0)]
        script[:] = [100]
        assert await read(info.fh) == (8192, payload)  # partly cached: the pool reads the rest
        assert [(t == loop_thread, f, o) for t, f, o in calls] == [(True, os.RWF_NOWAIT, 0), (False, 0, 100)]
        assert await read(info.fh, 8000, 4096) == (192, payload[8000:])  # end of file: the pool confirms
        assert [(t == loop_thread, f) for t, f, _ in calls] == [(True, os.RWF_NOWAIT), (False, 0)]
        script[:] = [errno.EOPNOTSUPP]
        assert await read(info.fh) == (8192, payload)
        assert await read(info.fh) == (8192, payload)  # not asked again
        assert [f for _, f, _ in calls] == [0]
        await fs.release(info.fh)
        info = await fs.open(e.st_ino, os.O_RDONLY | os.O_DIRECT, ROOT)
        try:
            await read(info.fh)
        except FuseError as exc:
            assert exc.errno == errno.EINVAL  # a filesystem without O_DIRECT support
        assert calls and all(f == 0 and t != loop_thread for t, f, _ in calls)
        await fs.release(info.fh)

    go(fs, body)


def test_read_into_without_inline_reads_in_the_pool(
    make_fs: Callable[..., PassthroughFS], share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(host(share, "f"), "wb") as f:
        f.write(b"abc")
    fs = make_fs(inline_read_max=0)
    real = os.preadv
    flags_seen: list[int] = []

    def fake(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        flags_seen.append(flags)
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", fake)

    async def body() -> None:
        e = await fs.lookup(ROOT_INODE, b"f", ROOT)
        info = await fs.open(e.st_ino, os.O_RDONLY, ROOT)
        buf = bytearray(3)
        assert await fs.read_into(info.fh, 0, 3, [memoryview(buf)]) == 3 and buf == b"abc"
        await fs.release(info.fh)

    go(fs, body)
    assert flags_seen == [0]


def test_many_guest_buffers_are_written_and_read_in_iov_max_batches(
    fs: PassthroughFS, share: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """More buffers than one syscall takes: several pwritev/preadv calls,
    never a joined copy."""
    from virtiofs_async.backends import passthrough

    monkeypatch.setattr(passthrough, "_IOV_MAX", 4)
    real_w, real_r = os.pwritev, os.preadv
    counts: list[int] = []

    def pwritev(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        assert all(isinstance(b, memoryview) for b in buffers)
        counts.append(len(buffers))
        return real_w(fd, buffers, offset, flags)

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        counts.append(len(buffers))
        return real_r(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "preadv", preadv)
    payload = os.urandom(10 * 1000)

    async def body() -> None:
        info, _e = await fs.create(ROOT_INODE, b"f", 0o644, os.O_RDWR, ROOT)
        views = _split(bytearray(payload), [1000] * 10)
        assert await fs.write(info.fh, 0, views, ROOT) == len(payload)
        assert counts == [4, 4, 2]
        counts.clear()
        buf = bytearray(len(payload))
        assert await fs.read_into(info.fh, 0, len(buf), _split(buf, [1000] * 10)) == len(payload)
        assert buf == payload and counts == [4, 4, 2]  # too many views for the inline try
        await fs.release(info.fh)

    go(fs, body)
    with open(host(share, "f"), "rb") as f:
        assert f.read() == payload


def test_lookup_of_a_known_inode_sees_the_name_now(fs: PassthroughFS, share: str) -> None:
    """The known-inode shortcut (fstatat, no open) answers what a full
    lookup would: the same nodeid while the name is that inode, another one
    once the name is replaced, ENOENT once it is gone, symlinks unfollowed."""
    with open(host(share, "f"), "wb") as f:
        f.write(b"1")
    os.symlink("/etc/passwd", host(share, "link"))

    async def body() -> None:
        e1 = await fs.lookup(ROOT_INODE, b"f", ROOT)
        e2 = await fs.lookup(ROOT_INODE, b"f", ROOT)
        assert e2.st_ino == e1.st_ino and fs.lookup_count(e1.st_ino) == 2
        assert (e2.st_mode, e2.st_size) == (e1.st_mode, 1)
        with open(host(share, "g"), "wb") as f:
            f.write(b"22")
        os.rename(host(share, "g"), host(share, "f"))
        e3 = await fs.lookup(ROOT_INODE, b"f", ROOT)
        assert e3.st_ino != e1.st_ino and e3.st_size == 2 and fs.lookup_count(e3.st_ino) == 1
        assert fs.lookup_count(e1.st_ino) == 2  # the old inode lives on for the guest's references
        os.unlink(host(share, "f"))
        assert await errno_of(fs.lookup(ROOT_INODE, b"f", ROOT)) == errno.ENOENT
        l1 = await fs.lookup(ROOT_INODE, b"link", ROOT)
        l2 = await fs.lookup(ROOT_INODE, b"link", ROOT)
        assert l1.st_ino == l2.st_ino and stat.S_ISLNK(l2.st_mode) and fs.lookup_count(l1.st_ino) == 2

    go(fs, body)
