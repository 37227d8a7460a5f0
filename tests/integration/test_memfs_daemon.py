"""MemoryFS served in-process, driven by the testing frontend + FUSE client
through the real transport (unix socket, SCM_RIGHTS, eventfds, shared RAM).

Each test runs under asyncio, uvloop and trio (the ``run`` fixture)."""
from __future__ import annotations

import errno
import logging
import os
import stat

import pytest

from virtiofs_async import FuseError, Operations, codec, make_server
from virtiofs_async.abi import fuse as abi
from virtiofs_async.abi.vhost_user import ProtocolFeature as PF
from virtiofs_async.abi.virtio import DESC, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTQ_DESC_F_NEXT
from virtiofs_async.backends.memory import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    SEEK_DATA,
    SEEK_HOLE,
    XATTR_CREATE,
    MemoryFS,
)
from virtiofs_async.testing import Caller, FrontendError, FuseClient, serve_in_background

from . import memfs_client

ROOT = abi.FUSE_ROOT_ID
KiB = 1024
MiB = 1024 * 1024
USER = Caller(uid=1000, gid=1000, pid=4242)


def pattern(n: int, seed: int = 0) -> bytes:
    """``n`` bytes that differ at every offset modulo 251 (catches shifted data)."""
    block = bytes((i * 7 + seed) % 251 for i in range(251))
    return (block * (n // 251 + 1))[:n]


async def expect_errno(code: int, coro) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FuseError) as info:
        await coro
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


# -- session setup -------------------------------------------------------------------------


def test_init_negotiation(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, client):
            fe = client.frontend
            # vhost-user: what QEMU would have settled.
            assert fe.features & (1 << VIRTIO_F_VERSION_1) and fe.features & (1 << VIRTIO_RING_F_EVENT_IDX)
            assert fe.protocol_features == PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
            assert fe.queue_num == 2
            # FUSE_INIT: the common subset of Linux 6.1's flags and MemoryFS's.
            out = client.init_out
            assert (out.major, out.minor) == (7, 38)
            for flag in (abi.FUSE_ASYNC_READ, abi.FUSE_BIG_WRITES, abi.FUSE_MAX_PAGES, abi.FUSE_DO_READDIRPLUS,
                         abi.FUSE_HANDLE_KILLPRIV_V2, abi.FUSE_PARALLEL_DIROPS, abi.FUSE_INIT_EXT):
                assert out.flags & flag, hex(flag)
            for flag in (abi.FUSE_SECURITY_CTX, abi.FUSE_SETXATTR_EXT, abi.FUSE_WRITEBACK_CACHE,
                         abi.FUSE_DONT_MASK, abi.FUSE_POSIX_LOCKS, abi.FUSE_SUBMOUNTS):
                assert not out.flags & flag, hex(flag)
            assert out.max_write == MiB and out.max_pages == 256
            assert out.max_readahead == 128 * KiB
            # A second FUSE_INIT on a running mount is refused.
            await expect_errno(errno.EPROTO, client.init())
            attr = await client.getattr(ROOT)
            assert stat.S_ISDIR(attr.attr.mode) and attr.attr.ino == ROOT

    run(body)


def test_requests_before_init_fail_and_an_old_guest_is_refused(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with serve_in_background(MemoryFS(), sock_path, runtime=rt):
            async with FuseClient.connect(sock_path, runtime=rt, init=False) as client:
                await expect_errno(errno.EIO, client.getattr(ROOT))
                await expect_errno(errno.EPROTO, client.init(minor=30))
                out = await client.init(minor=31, flags=abi.FUSE_ASYNC_READ)
                assert out.minor == 31 and out.flags == abi.FUSE_ASYNC_READ
                assert out.max_pages == 32 and out.max_write == 32 * 4096  # no FUSE_MAX_PAGES
                assert (await client.getattr(ROOT)).attr.ino == ROOT

    run(body)


# -- data ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * KiB, MiB])
def test_create_write_read(run, sock_path, size) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, client):
            d = await client.mkdir(ROOT, b"dir", 0o750)
            assert stat.S_IMODE(d.attr.mode) == 0o750 and stat.S_ISDIR(d.attr.mode)
            created = await client.create(d.nodeid, b"file", 0o640)
            ino, fh = created.entry.nodeid, created.open.fh
            assert created.entry.attr.size == 0 and stat.S_IMODE(created.entry.attr.mode) == 0o640
            data = pattern(size, seed=size % 251)
            assert await client.write(ino, fh, 0, data) == size
            assert (await client.getattr(ino)).attr.size == size
            assert await client.read(ino, fh, 0, size) == data
            # Reads past the end are short; a read at the end is empty.
            assert await client.read(ino, fh, max(size - 3, 0), 100) == data[max(size - 3, 0):]
            assert await client.read(ino, fh, size, 4096) == b""
            await client.flush(ino, fh)
            await client.release(ino, fh)
            # Again through a fresh lookup + open.
            entry = await client.lookup(d.nodeid, b"file")
            assert entry.nodeid == ino and entry.attr.size == size
            fh2 = (await client.open(ino, os.O_RDONLY)).fh
            assert await client.read(ino, fh2, 0, min(size + 10, 1 << 20)) == data
            await client.release(ino, fh2)
            # A write bigger than max_write never leaves the client.
            with pytest.raises(ValueError):
                await client.write(ino, fh2, 0, bytes(client.max_write + 1))

    run(body)


def test_data_crossing_memory_regions_and_indirect_chains(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    """Guest RAM in two regions (adjacent guest-physical, unrelated user
    addresses): buffers that straddle the boundary still carry the right
    bytes, in both directions, in direct and indirect chains."""
    boundary_crossed = []

    def watch(drv, head):  # type: ignore[no-untyped-def]
        boundary = drv.base_gpa + drv.mem.nbytes // 2
        idx = head
        for _ in range(drv.size):
            addr, length, flags, nxt = DESC.unpack(drv.read(drv.desc_gpa + 16 * idx, 16))
            if addr < boundary < addr + length:
                boundary_crossed.append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            idx = nxt

    async def body(rt, indirect):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path, memory_size=4 * MiB, memory_regions=2, indirect=indirect) as (fs, c):
            fe = c.frontend
            assert len(fe.regions) == 2
            (gpa0, size0, uva0, _), (gpa1, _, uva1, off1) = fe.regions
            assert gpa1 == gpa0 + size0 and uva1 != uva0 + size0 and off1 == size0
            created = await c.create(ROOT, b"big")
            ino, fh = created.entry.nodeid, created.open.fh
            data = pattern(MiB, seed=3)
            # Submit by hand so the chain can be inspected before publishing.
            for rnd in range(3):
                req_data = pattern(MiB, seed=rnd)
                req = c.header(ino)
                wr = codec.WriteRequest(req, fh, rnd * MiB, MiB, 0, 0, 0, [memoryview(req_data)])
                reply = await fe.submit(wr.encode(), 16 + 8, tamper=None if indirect else watch)
                assert codec.decode_reply(abi.Opcode.WRITE, reply)[1].size == MiB
            for rnd in range(3):
                assert await c.read(ino, fh, rnd * MiB, MiB) == pattern(MiB, seed=rnd)
            assert await c.write(ino, fh, 0, data) == MiB
            assert await c.read(ino, fh, 0, MiB) == data
            return True

    run(body, False)
    assert boundary_crossed, "no buffer straddled the region boundary: the test lost its point"
    run(body, True)


# -- directories ------------------------------------------------------------------------------


def test_readdir_and_readdirplus_resume_from_offsets(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    names = [b"entry-%03d-" % i + b"x" * (i % 40) for i in range(60)]

    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, client):
            d = (await client.mkdir(ROOT, b"d")).nodeid
            inos = {}
            for name in names:
                made = await client.create(d, name)
                inos[name] = made.entry.nodeid
                await client.release(made.entry.nodeid, made.open.fh)
            fh = (await client.opendir(d)).fh
            # READDIR in small pages, resuming from the last offset each time.
            seen, offsets, offset, batches = [], [], 0, 0
            while True:
                batch = await client.readdir(d, fh, offset, 512)
                if not batch:
                    break
                batches += 1
                assert sum(codec_size(e.name) for e in batch) <= 512
                seen += [e.name for e in batch]
                offsets += [e.off for e in batch]
                offset = batch[-1].off
            assert batches > 3
            assert seen == [b".", b".."] + names
            assert offsets == sorted(set(offsets))  # strictly increasing cookies
            # Resuming in the middle gives exactly the rest.
            mid = offsets[20]
            rest = await client.readdir(d, fh, mid, 64 * KiB)
            assert [e.name for e in rest] == seen[21:]
            types = {e.name: e.type for e in rest}
            assert types[names[-1]] == stat.S_IFREG >> 12
            # READDIRPLUS: entries carry attributes and each counts a lookup.
            before = {n: fs.lookup_count(i) for n, i in inos.items()}
            plus, offset = [], 0
            while True:
                batch = await client.readdirplus(d, fh, offset, 1024)
                if not batch:
                    break
                plus += batch
                offset = batch[-1].dirent.off
            assert [p.dirent.name for p in plus] == [b".", b".."] + names
            for p in plus[:2]:
                assert p.entry.nodeid == 0  # no lookup counted for . and ..
            for p in plus[2:]:
                assert p.entry.nodeid == p.dirent.ino == inos[p.dirent.name]
                assert stat.S_ISREG(p.entry.attr.mode)
                assert fs.lookup_count(p.entry.nodeid) == before[p.dirent.name] + 1
            await client.releasedir(d, fh)
            listing = await client.readdir_all(d, size=300)
            assert [e.name for e in listing] == [b".", b".."] + names
            await client.fsyncdir(d, (await client.opendir(d)).fh)

    run(body)


def codec_size(name: bytes) -> int:
    return (24 + len(name) + 7) & ~7


def test_rename_plain_noreplace_and_exchange(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            a = (await c.mkdir(ROOT, b"a")).nodeid
            b = (await c.mkdir(ROOT, b"b")).nodeid
            f1 = (await c.create(a, b"one")).entry.nodeid
            f2 = (await c.create(a, b"two")).entry.nodeid
            sub = (await c.mkdir(a, b"sub")).nodeid
            # Plain rename across directories.
            await c.rename(a, b"one", b, b"uno")
            await expect_errno(errno.ENOENT, c.lookup(a, b"one"))
            assert (await c.lookup(b, b"uno")).nodeid == f1
            # RENAME_NOREPLACE refuses an existing target and changes nothing.
            await expect_errno(errno.EEXIST, c.rename(b, b"uno", a, b"two", RENAME_NOREPLACE))
            assert (await c.lookup(a, b"two")).nodeid == f2
            await c.rename(b, b"uno", a, b"one", RENAME_NOREPLACE)
            assert (await c.lookup(a, b"one")).nodeid == f1
            # RENAME_EXCHANGE swaps two entries (even a file and a directory).
            await c.rename(a, b"one", a, b"sub", RENAME_EXCHANGE)
            assert (await c.lookup(a, b"one")).nodeid == sub
            assert (await c.lookup(a, b"sub")).nodeid == f1
            await expect_errno(errno.ENOENT, c.rename(a, b"one", a, b"missing", RENAME_EXCHANGE))
            # Plain rename over an existing file replaces it.
            await c.rename(a, b"sub", a, b"two")
            assert (await c.lookup(a, b"two")).nodeid == f1
            await expect_errno(errno.ENOENT, c.lookup(a, b"sub"))
            # A directory cannot move into itself.
            await expect_errno(errno.EINVAL, c.rename(ROOT, b"a", sub, b"loop"))

    run(body)


def test_link_symlink_readlink_mknod(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            f = await c.create(ROOT, b"f")
            linked = await c.link(f.entry.nodeid, ROOT, b"g")
            assert linked.nodeid == f.entry.nodeid and linked.attr.nlink == 2
            assert (await c.getattr(f.entry.nodeid)).attr.nlink == 2
            target = b"../some/where/" + b"t" * 200
            s = await c.symlink(ROOT, b"s", target)
            assert stat.S_ISLNK(s.attr.mode) and s.attr.size == len(target)
            assert await c.readlink(s.nodeid) == target
            await expect_errno(errno.EINVAL, c.readlink(f.entry.nodeid))
            fifo = await c.mknod(ROOT, b"fifo", stat.S_IFIFO | 0o600)
            assert stat.S_ISFIFO(fifo.attr.mode)
            await expect_errno(errno.EEXIST, c.link(f.entry.nodeid, ROOT, b"s"))
            await c.unlink(ROOT, b"f")
            assert (await c.getattr(f.entry.nodeid)).attr.nlink == 1

    run(body)


def test_setattr_chmod_truncate_utimens(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            made = await c.create(ROOT, b"f", 0o644)
            ino, fh = made.entry.nodeid, made.open.fh
            await c.write(ino, fh, 0, b"0123456789")
            out = await c.setattr(ino, mode=stat.S_IFREG | 0o4711)
            assert stat.S_IMODE(out.attr.mode) == 0o4711
            out = await c.setattr(ino, size=4)
            assert out.attr.size == 4
            out = await c.setattr(ino, size=8, fh=fh)
            assert out.attr.size == 8
            assert await c.read(ino, fh, 0, 100) == b"0123\0\0\0\0"
            atime = 1_234_567_890_123_456_789
            mtime = 987_654_321_000_000_001
            out = await c.setattr(ino, atime_ns=atime, mtime_ns=mtime)
            assert out.attr.atime * 10**9 + out.attr.atimensec == atime
            assert out.attr.mtime * 10**9 + out.attr.mtimensec == mtime
            got = (await c.getattr(ino)).attr
            assert (got.mtime, got.mtimensec) == (mtime // 10**9, mtime % 10**9)
            out = await c.setattr(ino, mtime_now=True)
            assert out.attr.mtime > 1_600_000_000 and out.attr.mtime != mtime // 10**9
            out = await c.setattr(ino, uid=1000, gid=2000)
            assert (out.attr.uid, out.attr.gid) == (1000, 2000)
            # The owner may chmod; a stranger may not.
            await c.setattr(ino, mode=stat.S_IFREG | 0o600, ctx=USER)
            await expect_errno(errno.EPERM, c.setattr(ino, mode=0o777, ctx=Caller(uid=1001, gid=1001)))

    run(body)


def test_xattrs_with_size_probing_and_erange(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            ino = (await c.create(ROOT, b"f")).entry.nodeid
            await expect_errno(errno.ENODATA, c.getxattr(ino, b"user.a", 100))
            assert await c.listxattr(ino, 0) == 0
            assert await c.listxattr(ino, 10) == []
            await c.setxattr(ino, b"user.a", b"value-a")
            await c.setxattr(ino, b"user.bb", b"")
            await expect_errno(errno.EEXIST, c.setxattr(ino, b"user.a", b"x", XATTR_CREATE))
            await expect_errno(errno.EOPNOTSUPP, c.setxattr(ino, b"nonamespace", b"x"))
            assert await c.getxattr(ino, b"user.a", 0) == 7
            assert await c.getxattr(ino, b"user.a", 7) == b"value-a"
            assert await c.getxattr(ino, b"user.a", 4096) == b"value-a"
            await expect_errno(errno.ERANGE, c.getxattr(ino, b"user.a", 6))
            assert await c.getxattr(ino, b"user.bb", 10) == b""
            listing_len = len(b"user.a\0user.bb\0")
            assert await c.listxattr(ino, 0) == listing_len
            assert sorted(await c.listxattr(ino, listing_len)) == [b"user.a", b"user.bb"]
            await expect_errno(errno.ERANGE, c.listxattr(ino, listing_len - 1))
            await c.removexattr(ino, b"user.a")
            await expect_errno(errno.ENODATA, c.removexattr(ino, b"user.a"))
            assert await c.listxattr(ino, 100) == [b"user.bb"]

    run(body)


def test_statfs_tracks_usage(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        fs = MemoryFS(size_bytes=64 * MiB, max_inodes=1000)
        async with memfs_client(rt, sock_path, fs) as (_, c):
            before = await c.statfs()
            assert (before.bsize, before.frsize, before.namelen) == (4096, 4096, 255)
            assert before.blocks == 64 * MiB // 4096 and before.bfree == before.blocks
            assert before.files == 1000 and before.ffree == 999
            made = await c.create(ROOT, b"f")
            await c.write(made.entry.nodeid, made.open.fh, 0, bytes(200 * KiB))
            after = await c.statfs()
            assert after.ffree == 998
            assert before.bfree - after.bfree >= 200 * KiB // 4096
            assert after.bavail == after.bfree

    run(body)


def test_unlink_of_an_open_file(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            made = await c.create(ROOT, b"f")
            ino, fh = made.entry.nodeid, made.open.fh
            await c.write(ino, fh, 0, b"still here")
            await c.unlink(ROOT, b"f")
            await expect_errno(errno.ENOENT, c.lookup(ROOT, b"f"))
            assert await c.read(ino, fh, 0, 100) == b"still here"
            assert await c.write(ino, fh, 10, b"!") == 1
            assert (await c.getattr(ino)).attr.nlink == 0
            await c.release(ino, fh)
            assert fs.has_inode(ino)  # the guest still holds a lookup
            await c.forget(ino, 1)
            assert not fs.has_inode(ino)
            await expect_errno(errno.ESTALE, c.getattr(ino))
            await expect_errno(errno.ENOENT, c.unlink(ROOT, b"f"))

    run(body)


def test_fallocate_and_lseek_data_hole(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            made = await c.create(ROOT, b"sparse")
            ino, fh = made.entry.nodeid, made.open.fh
            await c.write(ino, fh, MiB, b"x" * 4096)  # a hole, then data
            size = MiB + 4096
            assert await c.lseek(ino, fh, 0, SEEK_DATA) == MiB
            assert await c.lseek(ino, fh, 0, SEEK_HOLE) == 0
            assert await c.lseek(ino, fh, MiB + 10, SEEK_DATA) == MiB + 10
            assert await c.lseek(ino, fh, MiB, SEEK_HOLE) == size
            await expect_errno(errno.ENXIO, c.lseek(ino, fh, size, SEEK_DATA))
            await expect_errno(errno.EINVAL, c.lseek(ino, fh, 0, os.SEEK_SET))
            # Allocating the start makes it data; the size does not change.
            await c.fallocate(ino, fh, 0, 8192)
            assert await c.lseek(ino, fh, 0, SEEK_DATA) == 0
            assert (await c.getattr(ino)).attr.size == size
            # Allocating past the end grows the file, unless KEEP_SIZE.
            await c.fallocate(ino, fh, size, 4096)
            assert (await c.getattr(ino)).attr.size == size + 4096
            await c.fallocate(ino, fh, size + 4096, 65536, FALLOC_FL_KEEP_SIZE)
            assert (await c.getattr(ino)).attr.size == size + 4096
            # Punching the data out leaves zeros and a hole.
            await c.fallocate(ino, fh, MiB, 64 * KiB, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            assert await c.read(ino, fh, MiB, 4096) == bytes(4096)
            assert await c.lseek(ino, fh, MiB, SEEK_HOLE) == MiB
            await expect_errno(errno.EOPNOTSUPP, c.fallocate(ino, fh, 0, 10, FALLOC_FL_PUNCH_HOLE))

    run(body)


def test_copy_file_range(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            src = await c.create(ROOT, b"src")
            dst = await c.create(ROOT, b"dst")
            data = pattern(300 * KiB, seed=9)
            await c.write(src.entry.nodeid, src.open.fh, 0, data)
            n = await c.copy_file_range(
                src.entry.nodeid, src.open.fh, 1000, dst.entry.nodeid, dst.open.fh, 5, 200 * KiB
            )
            assert n == 200 * KiB
            got = await c.read(dst.entry.nodeid, dst.open.fh, 0, MiB)
            assert got == bytes(5) + data[1000:1000 + 200 * KiB]
            # Past the end of the source: nothing to copy.
            assert await c.copy_file_range(
                src.entry.nodeid, src.open.fh, len(data), dst.entry.nodeid, dst.open.fh, 0, 10
            ) == 0

    run(body)


def test_tmpfile(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            t = await c.tmpfile(ROOT, 0o600)
            ino, fh = t.entry.nodeid, t.open.fh
            assert stat.S_ISREG(t.entry.attr.mode) and t.entry.attr.nlink == 0
            await c.write(ino, fh, 0, b"anonymous")
            assert await c.read(ino, fh, 0, 100) == b"anonymous"
            assert [e.name for e in await c.readdir_all(ROOT)] == [b".", b".."]
            # It can be given a name (linkat of an O_TMPFILE without O_EXCL).
            named = await c.link(ino, ROOT, b"named")
            assert named.attr.nlink == 1
            assert (await c.lookup(ROOT, b"named")).nodeid == ino

    run(body)


def test_forget_and_batch_forget_return_lookups(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            a = (await c.mkdir(ROOT, b"a")).nodeid
            b = await c.create(ROOT, b"b")
            await c.release(b.entry.nodeid, b.open.fh)
            b = b.entry.nodeid
            for _ in range(4):
                await c.lookup(ROOT, b"a")
                await c.lookup(ROOT, b"b")
            assert fs.lookup_count(a) == 5 and fs.lookup_count(b) == 5
            await c.forget(a, 2)  # the call returns once the device gave the chain back
            assert fs.lookup_count(a) == 3
            await c.batch_forget([(a, 3), (b, 4)])
            assert fs.lookup_count(a) == 0 and fs.lookup_count(b) == 1
            # Named inodes stay; an unlinked one goes with its last lookup.
            assert fs.has_inode(a)
            await c.unlink(ROOT, b"b")
            assert fs.has_inode(b)
            await c.batch_forget([(b, 1)])
            assert not fs.has_inode(b)
            assert c.frontend.in_flight() == 0

    run(body)


def test_permission_denial_for_an_unprivileged_user(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            d = (await c.mkdir(ROOT, b"rootonly", 0o755)).nodeid
            secret = await c.create(ROOT, b"secret", 0o600)
            await c.write(secret.entry.nodeid, secret.open.fh, 0, b"s3cr3t")
            await expect_errno(errno.EACCES, c.create(d, b"x", ctx=USER))
            await expect_errno(errno.EACCES, c.mkdir(d, b"x", ctx=USER))
            await expect_errno(errno.EACCES, c.access(d, os.W_OK, ctx=USER))
            await c.access(d, os.R_OK | os.X_OK, ctx=USER)
            await expect_errno(errno.EACCES, c.open(secret.entry.nodeid, os.O_RDONLY, ctx=USER))
            await expect_errno(errno.EPERM, c.setattr(d, mode=stat.S_IFDIR | 0o777, ctx=USER))
            await expect_errno(errno.EPERM, c.setattr(d, uid=1000, ctx=USER))
            await expect_errno(errno.EACCES, c.unlink(ROOT, b"secret", ctx=USER))
            # Root may; then the user may work in a directory it owns.
            await c.setattr(d, uid=1000, gid=1000)
            made = await c.create(d, b"mine", 0o644, ctx=USER)
            assert (made.entry.attr.uid, made.entry.attr.gid) == (1000, 1000)
            assert await c.write(made.entry.nodeid, made.open.fh, 0, b"ok", ctx=USER) == 2

    run(body)


def test_destroy_ends_the_mount(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            made = await c.create(ROOT, b"f")
            await c.write(made.entry.nodeid, made.open.fh, 0, b"kept")
            assert fs.lookup_count(made.entry.nodeid) == 1
            await c.destroy()
            # The backend dropped lookups and handles; the tree stays.
            assert fs.lookup_count(made.entry.nodeid) == 0
            await expect_errno(errno.EBADF, c.read(made.entry.nodeid, made.open.fh, 0, 10))
            # A new mount on the same connection may follow.
            await c.init()
            entry = await c.lookup(ROOT, b"f")
            fh = (await c.open(entry.nodeid)).fh
            assert await c.read(entry.nodeid, fh, 0, 10) == b"kept"

    run(body)


# -- concurrency ---------------------------------------------------------------------------


class GatedFS(MemoryFS):
    """LOOKUP of any name waits until ``expected`` lookups are inside the
    backend at once; the name ``block`` then also waits for ``release``."""

    def __init__(self, rt, expected: int) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.expected = expected
        self.inside = 0
        self.max_inside = 0
        self.all_inside = rt.event()
        self.release_block = rt.event()

    async def lookup(self, parent, name, ctx):  # type: ignore[no-untyped-def]
        self.inside += 1
        self.max_inside = max(self.max_inside, self.inside)
        if self.inside >= self.expected:
            self.all_inside.set()
        try:
            await self.all_inside.wait()
            if name == b"block":
                await self.release_block.wait()
            return await super().lookup(parent, name, ctx)
        finally:
            self.inside -= 1


def test_64_requests_in_flight_complete_out_of_order(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        n = 64
        fs = GatedFS(rt, n)
        async with memfs_client(rt, sock_path, fs, indirect=True) as (_, c):
            for i in range(n - 1):
                made = await c.create(ROOT, b"f%d" % i)
                await c.release(made.entry.nodeid, made.open.fh)
            await c.mkdir(ROOT, b"block")
            results: dict[int, int] = {}
            order: list[int] = []

            async def one(i: int) -> None:
                name = b"block" if i == n - 1 else b"f%d" % i
                results[i] = (await c.lookup(ROOT, name)).nodeid
                order.append(i)

            async with rt.task_group() as group:
                group.start_soon(one, n - 1)  # submitted first, blocks in the backend
                for i in range(n - 1):
                    group.start_soon(one, i)
                # All 64 reach the backend together: only possible if the
                # daemon runs them concurrently.
                await fs.all_inside.wait()
                while len(order) < n - 1:
                    await rt.sleep(0.005)
                assert n - 1 not in results  # the first request is still in flight
                assert c.frontend.in_flight(1) == 1
                fs.release_block.set()
            assert order[-1] == n - 1 and len(results) == n
            assert fs.max_inside == n
            assert len(set(results.values())) == n

    run(body)


def test_many_concurrent_writers_without_indirect(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    """More chains than the ring holds at once: submitters wait for room."""

    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path, queue_size=16) as (fs, c):
            made = await c.create(ROOT, b"f")
            ino, fh = made.entry.nodeid, made.open.fh

            async def writer(i: int) -> None:
                assert await c.write(ino, fh, i * 1000, pattern(1000, seed=i)) == 1000

            async with rt.task_group() as group:
                for i in range(100):
                    group.start_soon(writer, i)
            data = await c.read(ino, fh, 0, 100 * 1000)
            assert data == b"".join(pattern(1000, seed=i) for i in range(100))
            assert c.frontend.in_flight() == 0

    run(body)


# -- failures and lifecycle ----------------------------------------------------------------


class BuggyFS(MemoryFS):
    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        raise RuntimeError("backend bug")


def test_backend_exception_gives_eio_and_serving_goes_on(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path, BuggyFS()) as (fs, c):
            for _ in range(3):
                await expect_errno(errno.EIO, c.statfs())
            assert (await c.mkdir(ROOT, b"still-serving")).nodeid > ROOT

    with caplog.at_level(logging.ERROR, logger="virtiofs_async"):
        run(body)
    failures = [r for r in caplog.records if "backend failed on STATFS" in r.getMessage()]
    assert len(failures) == 3 and failures[0].exc_info is not None


def test_stop_and_restart_like_a_reboot(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            fe = c.frontend
            made = await c.create(ROOT, b"survivor")
            await c.write(made.entry.nodeid, made.open.fh, 0, b"data")
            await c.forget(made.entry.nodeid, 0)
            published = [fe.driver(q).avail_idx for q in range(2)]
            bases = await fe.stop()
            assert bases == published == [1, 3]  # FORGET; INIT, CREATE, WRITE
            with pytest.raises(FrontendError):
                await c.getattr(ROOT)
            await fe.restart()
            assert fe.driver(1).avail_idx == 0
            # The rebooted guest mounts again: FUSE_INIT is accepted after a reset.
            await c.init()
            assert fs.lookup_count(made.entry.nodeid) == 0  # the old mount's lookups are gone
            entry = await c.lookup(ROOT, b"survivor")
            fh = (await c.open(entry.nodeid)).fh
            assert await c.read(entry.nodeid, fh, 0, 10) == b"data"
            # A pause/resume (stop + start without a new mount) keeps the mount.
            await fe.stop()
            await fe.restart()
            assert await c.read(entry.nodeid, fh, 0, 10) == b"data"
            assert (await c.getattr(ROOT)).attr.ino == ROOT

    run(body)


def test_reconnect_gives_a_fresh_session(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        fs = MemoryFS()
        async with serve_in_background(fs, sock_path, runtime=rt) as server:
            assert server.once is False
            async with FuseClient.connect(sock_path, runtime=rt) as c1:
                made = await c1.create(ROOT, b"f")
                await c1.write(made.entry.nodeid, made.open.fh, 0, b"persisted")
                old = (made.entry.nodeid, made.open.fh)
            while server.connections_served < 1:
                await rt.sleep(0.005)
            # The connection's end destroyed the mount (handles, lookups).
            assert fs.lookup_count(old[0]) == 0
            async with FuseClient.connect(sock_path, runtime=rt) as c2:
                assert c2.init_out.minor == 38  # a fresh session accepted FUSE_INIT
                await expect_errno(errno.EBADF, c2.read(old[0], old[1], 0, 10))
                entry = await c2.lookup(ROOT, b"f")
                fh = (await c2.open(entry.nodeid)).fh
                assert await c2.read(entry.nodeid, fh, 0, 100) == b"persisted"
            while server.connections_served < 2:
                await rt.sleep(0.005)
            assert os.path.exists(sock_path)

    run(body)


def test_once_returns_after_the_disconnect(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        server = make_server(MemoryFS(), runtime=rt, socket_path=sock_path, once=True)
        finished = rt.event()

        async def serve() -> None:
            await server.serve()
            finished.set()

        async with rt.task_group() as group:
            group.start_soon(serve)
            await server.ready.wait()
            async with FuseClient.connect(sock_path, runtime=rt) as c:
                await c.mkdir(ROOT, b"x")
                assert not finished.is_set()
            async with rt.move_on_after(5):
                await finished.wait()
            assert finished.is_set(), "serve() did not return after the frontend left"
        assert server.connections_served == 1
        assert not os.path.exists(sock_path)

    run(body)


class CountingOps(Operations):
    """A minimal backend: proves the client works with any Operations."""

    def __init__(self) -> None:
        self.calls = 0

    async def getattr(self, inode, ctx, fh=None):  # type: ignore[no-untyped-def]
        from virtiofs_async import EntryAttributes

        self.calls += 1
        if inode != ROOT:
            raise FuseError(errno.ENOENT)
        return EntryAttributes(st_ino=ROOT, st_mode=stat.S_IFDIR | 0o755, st_nlink=2, st_uid=ctx.uid)


def test_unimplemented_operations_answer_enosys(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        ops = CountingOps()
        async with memfs_client(rt, sock_path, ops) as (_, c):
            attr = await c.getattr(ROOT, ctx=USER)
            assert attr.attr.uid == 1000 and ops.calls == 1
            await expect_errno(errno.ENOENT, c.getattr(99))
            await expect_errno(errno.ENOSYS, c.lookup(ROOT, b"x"))
            await expect_errno(errno.ENOSYS, c.setupmapping(ROOT, 0, 0, 4096, 0))
            await expect_errno(errno.ENOSYS, c.removemapping(ROOT, [(0, 4096)]))
            await expect_errno(errno.ENOSYS, c.ioctl(ROOT, 0, 0x5401))
            await expect_errno(errno.ENOSYS, c.poll(ROOT, 0, 1))
            await expect_errno(errno.ENOSYS, c.getlk(ROOT, 0, 1))
            await expect_errno(errno.ENOSYS, c.setlk(ROOT, 0, 1))
            await c.syncfs()  # the default syncfs succeeds
            await c.interrupt(c.next_unique())  # no reply, the chain comes back empty
            assert ops.calls == 2

    run(body)


def test_several_request_queues(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(
            rt, sock_path, server_kwargs={"num_request_queues": 3}, num_request_queues=3, indirect=True
        ) as (fs, c):
            fe = c.frontend
            assert fe.queue_num == 4 and fe.num_queues == 4
            clients = [c] + [FuseClient(fe, queue=q) for q in (2, 3)]
            for extra in clients[1:]:
                extra.init_out, extra.flags, extra.max_write = c.init_out, c.flags, c.max_write

            async def work(client: FuseClient, i: int) -> None:
                made = await client.create(ROOT, b"q%d-%d" % (client.queue, i))
                await client.write(made.entry.nodeid, made.open.fh, 0, pattern(10_000, seed=i))
                assert await client.read(made.entry.nodeid, made.open.fh, 0, 10_000) == pattern(10_000, seed=i)

            async with rt.task_group() as group:
                for client in clients:
                    for i in range(10):
                        group.start_soon(work, client, i)
            for q in (1, 2, 3):
                assert fe.driver(q).avail_idx == (1 if q == 1 else 0) + 30  # every queue carried its share
            assert len(await c.readdir_all(ROOT)) == 2 + 30

    run(body)


class ExtrasOps(CountingOps):
    """ioctl, poll and POSIX locks, recording what the session passed on."""

    supports_posix_locks = True
    supports_flock_locks = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    async def ioctl(self, fh, cmd, arg, in_data, out_size, flags):  # type: ignore[no-untyped-def]
        self.seen.append(("ioctl", fh, cmd, arg, in_data, out_size))
        return bytes(reversed(in_data))[:out_size]

    async def poll(self, fh, events):  # type: ignore[no-untyped-def]
        self.seen.append(("poll", fh, events))
        return events & 0x5

    async def getlk(self, fh, owner, lock):  # type: ignore[no-untyped-def]
        from virtiofs_async import FileLock

        self.seen.append(("getlk", fh, owner, lock.start, lock.end, lock.type))
        return FileLock(start=100, end=199, type=1, pid=77)

    async def setlk(self, fh, owner, lock, wait, flock):  # type: ignore[no-untyped-def]
        self.seen.append(("setlk", fh, owner, lock.start, lock.end, lock.type, wait, flock))


def test_ioctl_poll_and_locks_round_trip(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        ops = ExtrasOps()
        async with memfs_client(rt, sock_path, ops) as (_, c):
            assert c.flags & abi.FUSE_POSIX_LOCKS and c.flags & abi.FUSE_FLOCK_LOCKS
            out = await c.ioctl(ROOT, 7, 0x8004_1234, arg=99, in_data=b"abcdef", out_size=4)
            assert (out.result, out.data) == (0, b"fedc")
            assert await c.poll(ROOT, 7, 0x1F) == 0x5
            lk = await c.getlk(ROOT, 7, 0xAB, start=10, end=20, type=0)
            assert (lk.start, lk.end, lk.type, lk.pid) == (100, 199, 1, 77)
            await c.setlk(ROOT, 7, 0xAB, start=0, type=1)
            await c.setlkw(ROOT, 7, 0xAB, type=2, flock=True)
            assert ops.seen == [
                ("ioctl", 7, 0x8004_1234, 99, b"abcdef", 4),
                ("poll", 7, 0x1F),
                ("getlk", 7, 0xAB, 10, 20, 0),
                ("setlk", 7, 0xAB, 0, 0x7FFF_FFFF_FFFF_FFFF, 1, False, False),
                ("setlk", 7, 0xAB, 0, 0x7FFF_FFFF_FFFF_FFFF, 2, True, True),
            ]

    run(body)
