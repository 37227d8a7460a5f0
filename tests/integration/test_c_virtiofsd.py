"""The testing frontend + FUSE client against QEMU's C virtiofsd
(libvhost-user): proof that the frontend is a real vhost-user driver and the
client a real virtiofs client, independent of our daemon.

virtiofsd serves a temporary host directory; every test checks the effect on
the host too, and that virtiofsd exits cleanly once the frontend leaves.
Each test runs under asyncio, uvloop and trio."""
from __future__ import annotations

import errno
import os
import stat
import subprocess
import time

import pytest

from virtiofs_async import FuseError
from virtiofs_async.abi import fuse as abi
from virtiofs_async.abi.vhost_user import ProtocolFeature as PF
from virtiofs_async.testing import FuseClient

VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
ROOT = abi.FUSE_ROOT_ID

pytestmark = [
    pytest.mark.peer,
    pytest.mark.skipif(not os.access(VIRTIOFSD, os.X_OK), reason=f"{VIRTIOFSD} is not installed"),
]


class Virtiofsd:
    """``virtiofsd --socket-path=S -o source=DIR -o cache=none -o xattr`` as a subprocess."""

    def __init__(self, workdir: str) -> None:
        self.socket = os.path.join(workdir, "c.sock")
        self.source = os.path.join(workdir, "shared")
        os.mkdir(self.source)
        self.log_path = os.path.join(workdir, "virtiofsd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [VIRTIOFSD, f"--socket-path={self.socket}", "-o", f"source={self.source}", "-o", "cache=none",
                 "-o", "xattr"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    async def wait_exit(self, rt, timeout: float = 10.0) -> int | None:  # type: ignore[no-untyped-def]
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await rt.sleep(0.02)
        return self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def virtiofsd(short_tmp):  # type: ignore[no-untyped-def]
    d = Virtiofsd(short_tmp)
    d.start()
    assert d.proc is not None
    deadline = time.monotonic() + 10
    while not os.path.exists(d.socket) and d.proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if d.proc.poll() is not None:
        # Startup failures are environmental (no privileges for its sandbox...).
        pytest.skip(f"virtiofsd could not start here: {d.log()[-500:]}")
    yield d
    d.kill()


async def expect_errno(code: int, coro) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FuseError) as info:
        await coro
    assert info.value.errno == code, f"expected {errno.errorcode[code]}, got {info.value!r}"


@pytest.mark.parametrize("event_idx, indirect", [(True, False), (False, True)], ids=["event_idx", "indirect"])
def test_client_against_c_virtiofsd(run, virtiofsd, event_idx, indirect) -> None:  # type: ignore[no-untyped-def]
    host = virtiofsd.source

    async def body(rt):  # type: ignore[no-untyped-def]
        async with FuseClient.connect(virtiofsd.socket, runtime=rt, event_idx=event_idx, indirect=indirect) as c:
            fe = c.frontend
            # libvhost-user's offer, and what the QEMU-like start settled.
            assert fe.offered_protocol_features & PF.MQ and fe.protocol_features & PF.REPLY_ACK
            assert fe.queue_num is not None and fe.queue_num >= 2
            out = c.init_out
            assert out.major == 7 and 31 <= out.minor <= 38
            assert out.max_write >= 64 * 1024
            # Directories and files, checked on the host.
            d = await c.mkdir(ROOT, b"dir", 0o750)
            assert stat.S_ISDIR(d.attr.mode)
            assert stat.S_IMODE(os.stat(os.path.join(host, "dir")).st_mode) == 0o750
            made = await c.create(d.nodeid, b"file", 0o640)
            ino, fh = made.entry.nodeid, made.open.fh
            data = bytes(range(256)) * 1024  # 256 KiB
            assert await c.write(ino, fh, 0, data) == len(data)
            assert await c.read(ino, fh, 0, len(data)) == data
            assert await c.read(ino, fh, 1000, 10) == data[1000:1010]
            await c.flush(ino, fh)
            with open(os.path.join(host, "dir", "file"), "rb") as f:
                assert f.read() == data
            assert (await c.getattr(ino)).attr.size == len(data)
            await c.release(ino, fh)
            # READDIR sees what the host sees.
            names = {e.name for e in await c.readdir_all(d.nodeid)}
            assert names == {b".", b"..", b"file"}
            with open(os.path.join(host, "dir", "hostmade"), "wb") as f:
                f.write(b"from the host")
            assert b"hostmade" in {e.name for e in await c.readdir_all(d.nodeid)}
            e = await c.lookup(d.nodeid, b"hostmade")
            fh2 = (await c.open(e.nodeid)).fh
            assert await c.read(e.nodeid, fh2, 0, 100) == b"from the host"
            await c.release(e.nodeid, fh2)
            # RENAME (and RENAME2 NOREPLACE refusing an existing target).
            await c.rename(d.nodeid, b"file", ROOT, b"moved")
            assert os.path.exists(os.path.join(host, "moved"))
            assert not os.path.exists(os.path.join(host, "dir", "file"))
            await expect_errno(errno.EEXIST, c.rename(ROOT, b"moved", ROOT, b"dir", 1))
            # UNLINK, RMDIR.
            await c.unlink(ROOT, b"moved")
            assert not os.path.exists(os.path.join(host, "moved"))
            await expect_errno(errno.ENOENT, c.lookup(ROOT, b"moved"))
            await expect_errno(errno.ENOTEMPTY, c.rmdir(ROOT, b"dir"))
            # STATFS matches the host filesystem.
            st = await c.statfs()
            host_st = os.statvfs(host)
            assert st.bsize == host_st.f_bsize and st.blocks == host_st.f_blocks
            assert st.namelen == host_st.f_namemax
            # Extended attributes (virtiofsd -o xattr; user.* on the host fs).
            try:
                await c.setxattr(d.nodeid, b"user.test", b"hello")
            except FuseError as exc:
                assert exc.errno in (errno.ENOTSUP, errno.EPERM, errno.ENOSYS)
            else:
                assert os.getxattr(os.path.join(host, "dir"), "user.test") == b"hello"
                assert await c.getxattr(d.nodeid, b"user.test", 0) == 5
                assert await c.getxattr(d.nodeid, b"user.test", 64) == b"hello"
                await expect_errno(errno.ERANGE, c.getxattr(d.nodeid, b"user.test", 2))
                assert b"user.test" in await c.listxattr(d.nodeid, 4096)
                await c.removexattr(d.nodeid, b"user.test")
                await expect_errno(errno.ENODATA, c.getxattr(d.nodeid, b"user.test", 64))
            # Many requests in flight at once.
            async with rt.task_group() as group:
                results = []

                async def stat_root() -> None:
                    results.append((await c.getattr(ROOT)).attr.ino)

                for _ in range(32):
                    group.start_soon(stat_root)
            assert len(results) == 32 and len(set(results)) == 1
            await c.forget(e.nodeid, 1)
            await c.batch_forget([(d.nodeid, 1)])
            assert fe.in_flight() == 0
        # The frontend left: virtiofsd exits, cleanly.
        return await virtiofsd.wait_exit(rt)

    try:
        rc = run(body)
    except BaseException:
        print(virtiofsd.log())
        raise
    assert rc == 0, virtiofsd.log()


def test_stop_and_restart_against_c_virtiofsd(run, virtiofsd) -> None:  # type: ignore[no-untyped-def]
    """GET_VRING_BASE then a fresh start of the rings, as at a guest reboot:
    libvhost-user drops and re-creates its queue threads."""

    async def body(rt):  # type: ignore[no-untyped-def]
        async with FuseClient.connect(virtiofsd.socket, runtime=rt) as c:
            fe = c.frontend
            await c.mkdir(ROOT, b"before")
            published = [fe.driver(q).avail_idx for q in range(2)]
            assert await fe.stop() == published
            await fe.restart()
            await c.init()  # the rebooted guest mounts again
            assert (await c.lookup(ROOT, b"before")).attr.ino > 0
            await c.mkdir(ROOT, b"after")
        assert sorted(os.listdir(virtiofsd.source)) == ["after", "before"]
        return await virtiofsd.wait_exit(rt)

    try:
        rc = run(body)
    except BaseException:
        print(virtiofsd.log())
        raise
    assert rc == 0, virtiofsd.log()
