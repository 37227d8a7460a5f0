"""PassthroughFS served in-process through the real transport (unix socket,
SCM_RIGHTS, eventfds, shared guest RAM), driven by the testing frontend +
FUSE client; every result is checked on the host directory too.

Each test runs under asyncio, uvloop and trio (the ``run`` fixture). The
backend's worker pool is the runtime's (``run_blocking``), injected here
as the server will.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from typing import Any, AsyncIterator

import pytest

from virtiofs_async import FuseError, _accel
from virtiofs_async.abi import fuse as abi
from virtiofs_async.backends import _hostfs
from virtiofs_async.backends.passthrough import PassthroughFS
from virtiofs_async.runtime import Runtime
from virtiofs_async.session import FuseSession
from virtiofs_async.testing import Caller, FuseClient, serve_in_background

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the passthrough daemon tests need root")

ROOT = abi.FUSE_ROOT_ID
USER = Caller(uid=1000, gid=1000, pid=4242)
OFFSET_MAX = 0x7FFF_FFFF_FFFF_FFFF


@pytest.fixture
def share(short_tmp: str) -> str:
    path = os.path.join(short_tmp, "share")
    os.mkdir(path)
    os.chmod(path, 0o777)
    return path


@contextlib.asynccontextmanager
async def passthrough_client(rt: Runtime, sock: str, share: str, server: dict[str, Any] | None = None,
                             **options: Any) -> AsyncIterator[tuple[PassthroughFS, FuseClient]]:
    fs = PassthroughFS(share, **options)
    fs.run_blocking = rt.run_in_thread  # type: ignore[method-assign]
    try:
        async with serve_in_background(fs, sock, runtime=rt, **(server or {})):
            async with FuseClient.connect(sock, runtime=rt) as client:
                yield fs, client
    finally:
        fs.close()


async def expect_errno(code: int, coro: Any) -> None:
    with pytest.raises(FuseError) as info:
        await coro
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


def test_init_flags_follow_the_options(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            flags = client.flags
            for flag in (abi.FUSE_POSIX_LOCKS, abi.FUSE_FLOCK_LOCKS, abi.FUSE_HANDLE_KILLPRIV_V2,
                         abi.FUSE_DO_READDIRPLUS):
                assert flags & flag, hex(flag)
            for flag in (abi.FUSE_WRITEBACK_CACHE, abi.FUSE_POSIX_ACL, abi.FUSE_DONT_MASK):
                assert not flags & flag, hex(flag)
        async with passthrough_client(rt, sock_path, share, writeback=True, posix_acl=True,
                                      cache="never") as (fs, client):
            flags = client.flags
            for flag in (abi.FUSE_WRITEBACK_CACHE, abi.FUSE_POSIX_ACL, abi.FUSE_DONT_MASK):
                assert flags & flag, hex(flag)
            assert not flags & abi.FUSE_DO_READDIRPLUS  # cache=never, as virtiofsd
            entry = await client.lookup(ROOT, b".")
            assert entry.entry_valid == entry.attr_valid == 0

    run(body)


@pytest.fixture
def session_opcodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The opcodes of the requests that reach the session (the full path), in order."""
    seen: list[int] = []
    real = FuseSession.handle_request

    async def counting(self, readable, writable):  # type: ignore[no-untyped-def]
        seen.append(int.from_bytes(bytes(readable[0][4:8]), "little"))
        return await real(self, readable, writable)

    monkeypatch.setattr(FuseSession, "handle_request", counting)
    return seen


def test_listing_opening_and_removing_are_answered_at_the_queue(run, sock_path, share, session_opcodes) -> None:  # type: ignore[no-untyped-def]
    """What a guest's ``ls -l``, ``cat``, ``mkdir`` and ``rm -r`` send
    besides LOOKUP and GETATTR (OPENDIR, READDIRPLUS, READDIR, RELEASEDIR,
    OPEN, RELEASE, MKDIR, UNLINK, RMDIR) never reaches the session: the inline responder answers
    it at the queue, with the full path's effects on the host and the
    tables (page-sized READDIR(PLUS) replies: the compiled walk)."""
    seen = session_opcodes
    os.mkdir(os.path.join(share, "d"))
    names = [b"file-%03d" % i for i in range(40)]
    for name in names:
        with open(os.path.join(share, "d", name.decode()), "wb") as f:
            f.write(name)

    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            d = await client.lookup(ROOT, b"d")
            dh = (await client.opendir(d.nodeid)).fh
            plus = await client.readdirplus(d.nodeid, dh, 0)
            assert plus and all(fs.lookup_count(e.entry.nodeid) == 1
                                for e in plus if e.dirent.name not in (b".", b".."))
            listed = [e.dirent.name for e in plus]
            off = plus[-1].dirent.off
            while more := await client.readdir(d.nodeid, dh, off):
                listed += [e.name for e in more]
                off = more[-1].off
            assert sorted(listed) == sorted(names + [b".", b".."])
            await client.releasedir(d.nodeid, dh)
            entry = await client.lookup(d.nodeid, names[0])
            fh = (await client.open(entry.nodeid, os.O_RDONLY)).fh
            assert await client.read(entry.nodeid, fh, 0, 100) == names[0]
            await client.release(entry.nodeid, fh)
            sub = await client.mkdir(d.nodeid, b"sub", 0o750)
            assert stat.S_ISDIR(os.lstat(os.path.join(share, "d", "sub")).st_mode)
            assert fs.lookup_count(sub.nodeid) == 1 and (await client.lookup(d.nodeid, b"sub")).nodeid == sub.nodeid
            await client.rmdir(d.nodeid, b"sub")
            for name in names:
                await client.unlink(d.nodeid, name)
            await client.rmdir(ROOT, b"d")
            assert not os.path.exists(os.path.join(share, "d"))
            await expect_errno(errno.ENOENT, client.rmdir(ROOT, b"d"))
            full_path: list[abi.Opcode] = []
            at_queue = [abi.Opcode.OPENDIR, abi.Opcode.RELEASEDIR, abi.Opcode.OPEN, abi.Opcode.RELEASE,
                        abi.Opcode.UNLINK, abi.Opcode.RMDIR]
            # MKDIR sets the umask: inline only on a loop thread that owns
            # its umask (the daemon's does; pytest's main thread does not)
            (at_queue if _hostfs.umask_is_private() else full_path).append(abi.Opcode.MKDIR)
            if _accel.IMPLEMENTATION == "cython":  # the pure walk offers replies of up to 512 bytes
                at_queue += [abi.Opcode.READDIRPLUS, abi.Opcode.READDIR]
            for op in at_queue:
                assert int(op) not in seen, op
            for op in full_path:
                assert int(op) in seen, op

    run(body)


def test_a_burst_of_forgets_is_served_in_a_few_passes(run, sock_path, share, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """FORGETs sent at once (a guest dropping its caches), with
    hiprio_coalesce > 0, wait on the hiprio queue for the rest of the burst
    and are served together, 32 at a time (requests get turns in between),
    each count taken down; by default each kick is served as it comes."""
    from virtiofs_async import transport

    passes: list[tuple[int, int]] = []
    real = transport._QueueWorker._pop_batch

    def counting(self, memory, limit):  # type: ignore[no-untyped-def]
        taken = real(self, memory, limit)
        passes.append((self.index, taken))
        return taken

    monkeypatch.setattr(transport._QueueWorker, "_pop_batch", counting)
    names = [b"f%02d" % i for i in range(70)]
    for name in names:
        open(os.path.join(share, name.decode()), "wb").close()

    async def burst(rt: Runtime, server: dict[str, Any]) -> list[tuple[int, int]]:
        """Forget 70 inodes at once; the hiprio passes that took any."""
        async with passthrough_client(rt, sock_path, share, server) as (fs, client):
            entries = [await client.lookup(ROOT, name) for name in names]
            held = fs.held_fds()
            passes.clear()
            async with rt.task_group() as group:
                for e in entries:
                    group.start_soon(client.forget, e.nodeid, 1)
            assert all(e.nodeid not in fs._inodes for e in entries)
            assert fs.held_fds() == held - len(names)
            return [p for p in passes if p[0] == 0 and p[1]]

    async def body(rt):  # type: ignore[no-untyped-def]
        coalesced = await burst(rt, {"hiprio_coalesce": 0.05})
        assert sum(n for _, n in coalesced) == len(names) and len(coalesced) <= 5, coalesced
        assert max(n for _, n in coalesced) == 32, coalesced
        at_once = await burst(rt, {})  # the default: no coalescing
        # served from the wake-up, 32 at a time: the leader only takes what one turn left
        assert sum(n for _, n in at_once) <= len(names) - 32, at_once

    run(body)


def test_getattr_and_lookup_are_answered_at_the_queue(run, sock_path, share, session_opcodes, caplog) -> None:  # type: ignore[no-untyped-def]
    """GETATTR, LOOKUP (of known and new inodes, and ENOENT) and FORGET never
    reach the session: the backend's inline responder answers them from the ring walk, with
    the replies and lookup counts of the full path; so are cached READs
    and WRITEs with the compiled twins. Not at DEBUG logging, and not for a subclass
    that overrides getattr."""
    seen = session_opcodes

    class Tagged(PassthroughFS):
        async def getattr(self, inode, ctx, fh=None):  # type: ignore[no-untyped-def]
            return await super().getattr(inode, ctx, fh)  # a hook a subclass might add

    async def body(rt):  # type: ignore[no-untyped-def]
        with open(os.path.join(share, "f"), "wb") as f:
            f.write(b"12345")
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            before = len(seen)
            entry = await client.lookup(ROOT, b"f")  # a new inode: installed at the queue too
            assert fs.lookup_count(entry.nodeid) == 1
            for _ in range(5):
                attr = await client.getattr(entry.nodeid)
                assert attr.attr.size == 5 and attr.attr.ino == entry.nodeid
                again = await client.lookup(ROOT, b"f")
                assert again.nodeid == entry.nodeid and again.attr == attr.attr
            await expect_errno(errno.ENOENT, client.lookup(ROOT, b"missing"))
            assert len(seen) == before
            assert fs.lookup_count(entry.nodeid) == 6
            os.truncate(os.path.join(share, "f"), 7)
            assert (await client.getattr(entry.nodeid)).attr.size == 7
            assert len(seen) == before
            # a READ the page cache holds: at the queue with the compiled twins
            fh = (await client.open(entry.nodeid, os.O_RDONLY)).fh
            assert await client.read(entry.nodeid, fh, 1, 100) == b"2345\0\0"
            assert await client.read(entry.nodeid, fh, 0, 3) == b"123"
            reads = seen[before:].count(int(abi.Opcode.READ))
            assert reads == (1 if _accel.IMPLEMENTATION == "cython" else 2)  # the short one: the full path
            await client.release(entry.nodeid, fh)
            # and a WRITE by root (a non-root one would have to drop suid here)
            fh = (await client.open(entry.nodeid, os.O_RDWR)).fh
            os.chmod(os.path.join(share, "f"), 0o4755)
            assert await client.write(entry.nodeid, fh, 1, b"AB") == 2
            assert await client.write(entry.nodeid, fh, 3, b"C", ctx=USER) == 1
            with open(os.path.join(share, "f"), "rb") as f:
                assert f.read() == b"1ABC5\0\0"
            assert stat.S_IMODE(os.stat(os.path.join(share, "f")).st_mode) == 0o755
            writes = seen[before:].count(int(abi.Opcode.WRITE))
            assert writes == (1 if _accel.IMPLEMENTATION == "cython" else 2)
            await client.flush(entry.nodeid, fh)
            held = fs.held_fds()
            await client.release(entry.nodeid, fh)
            assert fs.held_fds() == held - 1
            for op in (abi.Opcode.FLUSH, abi.Opcode.RELEASE):  # both twins answer them at the queue
                assert int(op) not in seen, op
            before = len(seen)
            caplog.set_level(logging.DEBUG, logger="virtiofs_async.session")
            assert (await client.getattr(entry.nodeid)).attr.size == 7
            assert seen[before:] == [int(abi.Opcode.GETATTR)]
            caplog.set_level(logging.WARNING, logger="virtiofs_async.session")
            # FORGET at the queue too: the count goes down; at 0 the inode goes
            count = fs.lookup_count(entry.nodeid)
            assert count == 6  # the first LOOKUP and five more
            before = len(seen)
            await client.forget(entry.nodeid, count - 1)
            assert fs.lookup_count(entry.nodeid) == 1
            held = fs.held_fds()
            await client.forget(entry.nodeid, 5)  # more than it has: down to 0
            assert entry.nodeid not in fs._inodes and fs.held_fds() == held - 1
            await client.forget(entry.nodeid, 1)  # unknown now: ignored
            assert seen[before:] == []
            again = await client.lookup(ROOT, b"f")  # installed afresh
            assert fs.lookup_count(again.nodeid) == 1 and again.attr.size == 7
        seen.clear()
        fs = Tagged(share)
        fs.run_blocking = rt.run_in_thread  # type: ignore[method-assign]
        assert fs.inline_responder(1 << 20) is None
        try:
            async with serve_in_background(fs, sock_path, runtime=rt):
                async with FuseClient.connect(sock_path, runtime=rt) as client:
                    entry = await client.lookup(ROOT, b"f")
                    await client.getattr(entry.nodeid)
                    assert seen.count(int(abi.Opcode.GETATTR)) == 1
        finally:
            fs.close()

    run(body)


def test_kicks_the_responder_answers_leave_the_leader_asleep(run, sock_path, share, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """One request at a time: a kick whose chains the inline responder
    answers is served from the runtime's wake-up path (the queue's leader
    task is not woken); one that needs the full path wakes it, and the
    replies are right either way."""
    from virtiofs_async import transport

    wakes: list[int] = []  # the request queue's leader popping: once per wake-up
    real = transport._QueueWorker._pop_batch

    def counting(self, memory, limit):  # type: ignore[no-untyped-def]
        if self.index == 1:
            wakes.append(limit)
        return real(self, memory, limit)

    monkeypatch.setattr(transport._QueueWorker, "_pop_batch", counting)

    async def body(rt):  # type: ignore[no-untyped-def]
        with open(os.path.join(share, "f"), "wb") as f:
            f.write(b"12345")
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            entry = await client.lookup(ROOT, b"f")
            await rt.sleep(0.01)
            wakes.clear()
            for _ in range(50):
                assert (await client.getattr(entry.nodeid)).attr.size == 5
            assert len(wakes) <= 2, wakes  # a kick may come before the leader parks
            wakes.clear()
            await client.symlink(ROOT, b"l", b"f")  # the full path
            assert os.readlink(os.path.join(share, "l")) == "f"
            assert len(wakes) >= 1
            wakes.clear()
            for _ in range(20):
                assert (await client.getattr(entry.nodeid)).attr.size == 5
            assert len(wakes) <= 2, wakes

    run(body)


def test_a_new_call_fd_is_signalled_by_kicks_served_at_the_queue(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    """QEMU gives a running queue a new call eventfd (SET_VRING_CALL) when
    the guest sets up its interrupts, and closes the old one: the replies
    the queue's KickServer answers (and the leader's) are signalled on the
    new fd, or the driver never hears of them."""

    async def body(rt):  # type: ignore[no-untyped-def]
        with open(os.path.join(share, "f"), "wb") as f:
            f.write(b"12345")
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            entry = await client.lookup(ROOT, b"f")
            for round_ in range(3):
                await client.frontend.replace_call_fd(1)
                done = 0
                async with rt.move_on_after(10):
                    for _ in range(20):
                        assert (await client.getattr(entry.nodeid)).attr.size == 5
                        done += 1
                    await client.symlink(ROOT, b"l%d" % round_, b"f")  # the leader's path
                    done += 1
                assert done == 21, f"round {round_}: {done} replies heard"

    run(body)


def test_create_write_read_readdir_rename(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            d = await client.mkdir(ROOT, b"dir", 0o750)
            assert stat.S_IMODE(os.stat(os.path.join(share, "dir")).st_mode) == 0o750
            created = await client.create(d.nodeid, b"file", 0o640, os.O_RDWR)
            ino, fh = created.entry.nodeid, created.open.fh
            data = bytes(range(251)) * 1000
            n = 0
            while n < len(data):
                n += await client.write(ino, fh, n, data[n:n + client.max_write])
            assert await client.read(ino, fh, 0, len(data)) == data
            await client.flush(ino, fh)
            await client.release(ino, fh)
            with open(os.path.join(share, "dir", "file"), "rb") as f:
                assert f.read() == data
            assert os.stat(os.path.join(share, "dir", "file")).st_ino == ino
            # As a user: the host owns the new file by that user.
            u = await client.create(ROOT, b"users", 0o600, os.O_WRONLY, ctx=USER)
            await client.write(u.entry.nodeid, u.open.fh, 0, b"mine", ctx=USER)
            await client.release(u.entry.nodeid, u.open.fh, ctx=USER)
            st = os.stat(os.path.join(share, "users"))
            assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o600)
            # ... and cannot create where the host says it may not.
            await expect_errno(errno.EACCES, client.mkdir(d.nodeid, b"nope", 0o755, ctx=USER))
            # readdir of a directory the host filled.
            for i in range(100):
                open(os.path.join(share, "dir", f"host-{i:03d}"), "wb").close()
            listing = await client.readdir_all(d.nodeid, size=1024)
            names = [e.name for e in listing]
            assert sorted(names) == sorted([b".", b"..", b"file"] + [f"host-{i:03d}".encode() for i in range(100)])
            # Rename across directories, checked on the host.
            await client.rename(d.nodeid, b"file", ROOT, b"moved")
            assert os.path.exists(os.path.join(share, "moved"))
            assert not os.path.exists(os.path.join(share, "dir", "file"))
            await expect_errno(errno.EEXIST, client.rename(ROOT, b"moved", ROOT, b"users", 1))  # NOREPLACE
            await client.unlink(ROOT, b"moved")
            assert not os.path.exists(os.path.join(share, "moved"))

    run(body)


def test_readdirplus_counts_and_forget_releases(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    for i in range(40):
        with open(os.path.join(share, f"f{i:02d}"), "wb") as f:
            f.write(b"x" * i)

    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            base = fs.held_fds()
            fh = (await client.opendir(ROOT)).fh
            seen = []
            offset = 0
            while True:
                batch = await client.readdirplus(ROOT, fh, offset, 4096)
                if not batch:
                    break
                seen += batch
                offset = batch[-1].dirent.off
            await client.releasedir(ROOT, fh)
            files = [e for e in seen if e.dirent.name not in (b".", b"..")]
            assert len(files) == 40
            for e in files:
                assert e.entry.attr.size == int(e.dirent.name[1:])
                assert fs.lookup_count(e.entry.nodeid) == 1
            assert fs.held_fds() == base + 40
            await client.batch_forget([(e.entry.nodeid, 1) for e in files])
            await client.getattr(ROOT)  # the forget was handled before this reply
            assert fs.held_fds() == base

    run(body)


def test_xattrs_on_the_host(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    open(os.path.join(share, "f"), "wb").close()

    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share, xattr=True) as (fs, client):
            f = await client.lookup(ROOT, b"f")
            await client.setxattr(f.nodeid, b"user.k", b"value")
            assert os.getxattr(os.path.join(share, "f"), "user.k") == b"value"
            assert await client.getxattr(f.nodeid, b"user.k", 0) == 5
            assert await client.getxattr(f.nodeid, b"user.k", 100) == b"value"
            await expect_errno(errno.ERANGE, client.getxattr(f.nodeid, b"user.k", 2))
            assert b"user.k" in await client.listxattr(f.nodeid, 1000)
            await client.removexattr(f.nodeid, b"user.k")
            assert os.listxattr(os.path.join(share, "f")) == []
            await expect_errno(errno.ENODATA, client.getxattr(f.nodeid, b"user.k", 100))
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            f = await client.lookup(ROOT, b"f")
            await expect_errno(errno.ENOSYS, client.getxattr(f.nodeid, b"user.k", 100))

    run(body)


def test_posix_and_flock_locks(run, sock_path, share) -> None:  # type: ignore[no-untyped-def]
    with open(os.path.join(share, "f"), "wb") as f:
        f.write(b"x" * 10)

    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share) as (fs, client):
            f = await client.lookup(ROOT, b"f")
            a = (await client.open(f.nodeid, os.O_RDWR)).fh
            b = (await client.open(f.nodeid, os.O_RDWR)).fh
            await client.setlk(f.nodeid, a, 1, type=fcntl.F_WRLCK, pid=321)
            await expect_errno(errno.EAGAIN, client.setlk(f.nodeid, b, 2, type=fcntl.F_RDLCK, start=5, end=5))
            got = await client.getlk(f.nodeid, b, 2)
            assert (got.type, got.start, got.end, got.pid) == (fcntl.F_WRLCK, 0, OFFSET_MAX, 321)
            granted = rt.event()

            async def waiter() -> None:
                await client.setlkw(f.nodeid, b, 2, type=fcntl.F_WRLCK)
                granted.set()

            async with rt.task_group() as group:
                group.start_soon(waiter)
                for _ in range(5):  # other requests are served while SETLKW waits
                    await client.getattr(f.nodeid)
                    await rt.sleep(0.01)
                assert not granted.is_set()
                await client.setlk(f.nodeid, a, 1, type=fcntl.F_UNLCK)
            assert granted.is_set()
            # The host sees the guest's lock.
            fd = os.open(os.path.join(share, "f"), os.O_RDWR)
            try:
                with pytest.raises(OSError):
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            finally:
                os.close(fd)
            await client.flush(f.nodeid, b, lock_owner=2)  # close() drops the owner's locks
            await client.setlk(f.nodeid, a, 1, type=fcntl.F_WRLCK)
            await client.setlk(f.nodeid, a, 1, type=fcntl.F_UNLCK)
            # flock(): per open file.
            await client.setlk(f.nodeid, a, 0, type=fcntl.F_WRLCK, flock=True)
            await expect_errno(errno.EAGAIN, client.setlk(f.nodeid, b, 0, type=fcntl.F_RDLCK, flock=True))
            await client.release(f.nodeid, a)
            await client.setlk(f.nodeid, b, 0, type=fcntl.F_RDLCK, flock=True)
            await client.release(f.nodeid, b)

    run(body)


def test_escapes_fail_through_the_transport(run, sock_path, share, short_tmp) -> None:  # type: ignore[no-untyped-def]
    outside = os.path.join(short_tmp, "outside")
    os.mkdir(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"secret")
    os.symlink(os.path.join(outside, "secret"), os.path.join(share, "abs"))
    os.symlink("../outside", os.path.join(share, "rel"))

    async def body(rt):  # type: ignore[no-untyped-def]
        async with passthrough_client(rt, sock_path, share, xattr=True) as (fs, client):
            abs_ = await client.lookup(ROOT, b"abs")
            assert stat.S_ISLNK(abs_.attr.mode)
            await expect_errno(errno.ELOOP, client.open(abs_.nodeid, os.O_RDWR | os.O_TRUNC))
            rel = await client.lookup(ROOT, b"rel")
            await expect_errno(errno.ENOTDIR, client.lookup(rel.nodeid, b"secret"))
            await expect_errno(errno.ENOTDIR, client.create(rel.nodeid, b"planted", 0o644))
            assert (await client.lookup(ROOT, b"..")).nodeid == ROOT
            # A forged nodeid: the host inode number of the secret.
            forged = os.stat(os.path.join(outside, "secret")).st_ino
            await expect_errno(errno.ESTALE, client.getattr(forged))
            await expect_errno(errno.ESTALE, client.open(forged, os.O_RDONLY))
            await expect_errno(errno.ESTALE, client.lookup(forged, b"."))
            await expect_errno(errno.ESTALE, client.setxattr(forged, b"user.x", b"1"))

    run(body)
    assert os.listdir(outside) == ["secret"]
    assert open(os.path.join(outside, "secret"), "rb").read() == b"secret"
    assert os.listxattr(os.path.join(outside, "secret")) == []
