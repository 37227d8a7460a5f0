"""An untrusted guest / frontend against the real transport: malformed FUSE
requests, malformed descriptor chains and malformed vhost-user messages each
get the right answer (an errno reply, a used entry of length 0, a NACK or a
disconnect), leave a log line, and never stop the daemon from serving the
next good request. Each test runs under asyncio, uvloop and trio."""
from __future__ import annotations

import errno
import gc
import itertools
import logging
import array
import os
import socket

import pytest

from virtiofs_async import FuseProtocolError, FuseSession, codec, make_server
from virtiofs_async._accel import scatter
from virtiofs_async.abi import fuse as abi
from virtiofs_async.abi import vhost_user as vu_abi
from virtiofs_async.abi.vhost_user import FrontendRequest as Req
from virtiofs_async.abi.virtio import DESC, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from virtiofs_async.backends.memory import MemoryFS
from virtiofs_async.testing import FrontendError, FuseClient, VhostUserFsFrontend, VhostUserNack, serve_in_background
from virtiofs_async.transport import VhostUserServer
from virtiofs_async.vhost_user import encode_message

from . import memfs_client

ROOT = abi.FUSE_ROOT_ID
OUTSIDE = 0x7_0000_0000_0000  # far outside guest RAM


def records(caplog, text: str) -> list[logging.LogRecord]:  # type: ignore[no-untyped-def]
    return [r for r in caplog.records if text in r.getMessage()]


def desc(drv, index: int) -> tuple[int, int, int, int]:  # type: ignore[no-untyped-def]
    return DESC.unpack(drv.read(drv.desc_gpa + 16 * index, 16))


def chain_indices(drv, head: int) -> list[int]:  # type: ignore[no-untyped-def]
    out = [head]
    while True:
        _addr, _len, flags, nxt = desc(drv, out[-1])
        if not flags & VIRTQ_DESC_F_NEXT:
            return out
        out.append(nxt)


def header(unique: int, opcode: int, length: int, nodeid: int = ROOT) -> bytes:
    return codec.InHeader(length, opcode, unique, nodeid, 0, 0, 1).encode()


_names = itertools.count()


async def still_serving(client: FuseClient) -> None:
    assert (await client.getattr(ROOT)).attr.ino == ROOT
    assert (await client.mkdir(ROOT, b"d%d" % next(_names))).nodeid > ROOT


# -- malformed FUSE requests ----------------------------------------------------------------


def test_malformed_fuse_requests_get_errno_replies(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            fe = c.frontend
            # A header cut short: no unique to answer, so the chain comes back empty.
            used = await fe.submit_chain([bytes(20)], 16 + 128)
            assert used.written == 0
            await still_serving(c)

            # An opcode nobody knows: ENOSYS for that unique.
            reply = await fe.submit([header(1001, 9999, 40)], 16)
            h = codec.decode_out_header(reply)
            assert (h.unique, h.error, h.len) == (1001, errno.ENOSYS, 16)
            # CUSE_INIT is a known opcode with no place in virtio-fs.
            reply = await fe.submit([header(1003, abi.Opcode.CUSE_INIT, 40 + 16), bytes(16)], 16)
            assert codec.decode_out_header(reply).error == errno.ENOSYS
            await still_serving(c)

            # A name without its NUL, and names with '/' or empty.
            for unique, name in ((1005, b"abc"), (1007, b"a/b\0"), (1009, b"\0")):
                reply = await fe.submit([header(unique, abi.Opcode.LOOKUP, 40 + len(name)), name], 16 + 128)
                h = codec.decode_out_header(reply)
                assert (h.unique, h.error) == (unique, errno.EINVAL), name
            # A header whose len claims more than the chain holds.
            reply = await fe.submit([header(1011, abi.Opcode.GETATTR, 40 + 160), bytes(16)], 16 + 104)
            assert codec.decode_out_header(reply).error == errno.EINVAL
            # A WRITE whose size disagrees with its payload.
            made = await c.create(ROOT, b"f")
            wr = codec.WriteRequest(c.header(made.entry.nodeid, unique=1013), made.open.fh, 0, 10, 0, 0, 0,
                                    [memoryview(b"12345")])
            reply = await fe.submit(wr.encode(), 16 + 8)
            assert codec.decode_out_header(reply).error == errno.EINVAL
            assert (await c.getattr(made.entry.nodeid)).attr.size == 0
            await still_serving(c)

    with caplog.at_level(logging.INFO, logger="virtiofs_async"):
        run(body)
    assert records(caplog, "malformed FUSE request (unique=None)")
    assert records(caplog, "unsupported opcode 9999")
    assert records(caplog, "is not NUL-terminated")
    assert records(caplog, "exceeds the")


def test_read_reply_buffer_too_small(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            fe = c.frontend
            made = await c.create(ROOT, b"f")
            ino, fh = made.entry.nodeid, made.open.fh
            await c.write(ino, fh, 0, b"z" * 4096)
            read = codec.ReadRequest(c.header(ino, unique=2001), fh, 0, 4096, 0, 0, 0)
            # Room for the header but not the data: EIO for that unique.
            reply = await fe.submit(read.encode(), [16, 100])
            h = codec.decode_out_header(reply)
            assert (h.unique, h.error, len(reply)) == (2001, errno.EIO, 16)
            # Not even room for a header: the chain comes back empty.
            read = codec.ReadRequest(c.header(ino, unique=2003), fh, 0, 4096, 0, 0, 0)
            assert (await fe.submit_chain(read.encode(), [8])).written == 0
            # No writable buffer at all.
            read = codec.ReadRequest(c.header(ino, unique=2005), fh, 0, 4096, 0, 0, 0)
            assert (await fe.submit_chain(read.encode(), 0)).written == 0
            assert await c.read(ino, fh, 0, 4096) == b"z" * 4096

    with caplog.at_level(logging.WARNING, logger="virtiofs_async"):
        run(body)
    assert len(records(caplog, "the guest gave 116")) == 1


# -- malformed descriptor chains -------------------------------------------------------------


def _outside(drv, head):  # type: ignore[no-untyped-def]
    addr, length, flags, nxt = desc(drv, head)
    drv.write_desc(head, OUTSIDE, length, flags, nxt)


def _writable_outside(drv, head):  # type: ignore[no-untyped-def]
    last = chain_indices(drv, head)[-1]
    addr, length, flags, nxt = desc(drv, last)
    assert flags & VIRTQ_DESC_F_WRITE
    drv.write_desc(last, 2**64 - 8, length, flags, nxt)  # also wraps past 2**64


def _loop(drv, head):  # type: ignore[no-untyped-def]
    second = chain_indices(drv, head)[1]  # readable, like the head: a pure cycle
    addr, length, flags, _ = desc(drv, second)
    drv.write_desc(second, addr, length, flags | VIRTQ_DESC_F_NEXT, head)


def _readable_after_writable(drv, head):  # type: ignore[no-untyped-def]
    idx = chain_indices(drv, head)
    addr, length, flags, nxt = desc(drv, idx[-1])
    drv.write_desc(idx[-1], addr, length, flags & ~VIRTQ_DESC_F_WRITE, nxt)


def _indirect_not_negotiated(drv, head):  # type: ignore[no-untyped-def]
    addr, length, flags, nxt = desc(drv, head)
    drv.write_desc(head, addr, 32, VIRTQ_DESC_F_INDIRECT, 0)


def _next_out_of_range(drv, head):  # type: ignore[no-untyped-def]
    addr, length, flags, _ = desc(drv, head)
    drv.write_desc(head, addr, length, flags | VIRTQ_DESC_F_NEXT, 60000)


@pytest.mark.parametrize(
    "tamper, message",
    [
        (_outside, "not in mapped memory"),
        (_writable_outside, "is not in mapped memory"),
        (_loop, "loops"),
        (_readable_after_writable, "device-readable descriptor after"),
        (_indirect_not_negotiated, "without VIRTIO_RING_F_INDIRECT_DESC"),
        (_next_out_of_range, "out of range"),
    ],
    ids=["outside-memory", "writable-wraps", "loop", "read-after-write", "indirect", "next-range"],
)
def test_malformed_chains_come_back_empty(run, sock_path, caplog, tamper, message) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            fe = c.frontend
            for _ in range(3):  # repeatedly: the queue stays usable every time
                req = codec.GetattrRequest(c.header(ROOT), 0, 0)
                used = await fe.submit_chain(req.encode() + [bytes(8)], 16 + 104, tamper=tamper)
                assert used.written == 0
                await still_serving(c)

    with caplog.at_level(logging.WARNING, logger="virtiofs_async"):
        run(body)
    found = records(caplog, "malformed descriptor chain")
    assert len(found) == 3 and message in found[0].getMessage()


def test_corrupt_available_index_breaks_the_queue_until_reset(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path) as (fs, c):
            fe = c.frontend
            drv = fe.driver(1)
            drv.set_avail_idx(drv.avail_idx + drv.size + 5)  # an impossible jump
            os.eventfd_write(fe.kick_fd(1), 1)
            for _ in range(400):
                if records(caplog, "is broken"):
                    break
                await rt.sleep(0.005)
            assert records(caplog, "is broken")
            # Other queues and the control channel still work; a reset heals it.
            await c.forget(ROOT, 0)
            await fe.stop()
            await fe.restart()
            await still_serving(c)

    with caplog.at_level(logging.WARNING, logger="virtiofs_async"):
        run(body)


@pytest.mark.parametrize("how", ["set_mem_table", "rem_add_mem_reg"])
def test_memory_without_the_rings_pauses_the_queues(run, sock_path, how) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        async with memfs_client(rt, sock_path, memory_size=8 << 20) as (fs, c):
            fe = c.frontend
            vu = fe.vu
            gpa, size, uva, off = fe.regions[0]
            half = size // 2
            # The region holding the rings goes away (replaced by the upper
            # half of RAM, or removed outright).
            if how == "set_mem_table":
                await fe.request(vu.set_mem_table([(gpa + half, half, uva + half, half)], need_reply=True), [fe.memfd])
            else:
                await fe.request(vu.rem_mem_reg(gpa, size, uva, off, need_reply=True))
            result = {}

            async def getattr_root() -> None:
                result["attr"] = await c.getattr(ROOT)

            async with rt.task_group() as group:
                group.start_soon(getattr_root)
                await rt.sleep(0.1)
                assert not result and fe.in_flight(1) == 1  # not served while the rings are unmapped
                # The whole RAM again: the queues resume with the waiting chain.
                if how == "set_mem_table":
                    await fe.request(vu.set_mem_table(fe.regions, need_reply=True), [fe.memfd])
                else:
                    await fe.request(vu.add_mem_reg(gpa, size, uva, off, need_reply=True), [fe.memfd])
            assert result["attr"].attr.ino == ROOT
            await still_serving(c)

    run(body)


# -- malformed vhost-user messages --------------------------------------------------------------


def open_fds() -> int:
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def test_bad_vhost_user_messages_nack_or_disconnect_without_leaks(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        fs = MemoryFS()
        async with serve_in_background(fs, sock_path, runtime=rt) as server:
            async with FuseClient.connect(sock_path, runtime=rt) as c:  # warm-up
                await still_serving(c)
            while server.connections_served < 1:
                await rt.sleep(0.005)
            baseline = open_fds()

            async with FuseClient.connect(sock_path, runtime=rt) as c:
                fe = c.frontend
                vu = fe.vu
                # Unknown request with NEED_REPLY: NACK.
                with pytest.raises(VhostUserNack):
                    await fe.request(vu.request(999, b"", need_reply=True))
                # Wrong payload size: NACK.
                with pytest.raises(VhostUserNack):
                    await fe.request(vu.request(Req.SET_VRING_NUM, b"\1\0\0\0", need_reply=True))
                # fds where none belong (SET_OWNER): NACK, and the daemon closes them.
                extra = os.eventfd(0)
                try:
                    with pytest.raises(VhostUserNack):
                        await fe.request(vu.set_owner(need_reply=True), [extra, extra])
                finally:
                    os.close(extra)
                # Out-of-range vring index; a SET_VRING_NUM that is no power of two.
                with pytest.raises(VhostUserNack):
                    await fe.request(vu.set_vring_num(200, 64, need_reply=True))
                with pytest.raises(VhostUserNack):
                    await fe.request(vu.set_vring_num(1, 100, need_reply=True))
                # A memory region past the end of its file (would SIGBUS on touch).
                with pytest.raises(VhostUserNack):
                    await fe.request(
                        vu.set_mem_table([(0x1000_0000_0000, 1 << 30, 0x2000_0000_0000, 0)], need_reply=True),
                        [fe.memfd],
                    )
                # Acking features that were never offered.
                with pytest.raises(VhostUserNack):
                    await fe.request(vu.set_features(1 << 63, need_reply=True))
                # None of it disturbed the running device.
                await still_serving(c)

            # Requests that cannot be NACKed end the connection, never the daemon.
            killers = [
                vu_abi.HEADER.pack(Req.GET_FEATURES, 0x2, 0),  # protocol version 2
                vu_abi.HEADER.pack(Req.SET_OWNER, 0x1, 1 << 20),  # absurd payload size
                encode_message(Req.GET_VRING_BASE, vu_abi.VRING_STATE.pack(77, 0)),  # own reply, bad index
                encode_message(4242, b"unknown, without NEED_REPLY"),
            ]
            for data in killers:
                async with FuseClient.connect(sock_path, runtime=rt) as c:
                    await c.frontend.send_raw(data)
                    assert await c.frontend.wait_disconnected(5.0)
            # More fds than any message may carry: the daemon drops the connection.
            async with FuseClient.connect(sock_path, runtime=rt) as c:
                fds = [os.eventfd(0) for _ in range(vu_abi.MAX_FDS_PER_MESSAGE + 4)]
                try:
                    c.frontend.sock.sendmsg(
                        [c.frontend.vu.set_owner()], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    )
                finally:
                    for fd in fds:
                        os.close(fd)
                assert await c.frontend.wait_disconnected(5.0)
            total = 2 + len(killers) + 1
            while server.connections_served < total:
                await rt.sleep(0.005)
            # Still serving, and nothing leaked.
            async with FuseClient.connect(sock_path, runtime=rt) as c:
                await still_serving(c)
            while server.connections_served < total + 1:
                await rt.sleep(0.005)
            assert open_fds() == baseline

    with caplog.at_level(logging.INFO, logger="virtiofs_async"):
        run(body, timeout=30)
    assert records(caplog, "vhost-user request 999 rejected")
    assert records(caplog, "SET_OWNER may not carry fds")
    assert records(caplog, "disconnecting the frontend")
    assert records(caplog, "corrupt vhost-user stream")
    assert records(caplog, "more fds than a vhost-user message may carry")


# -- a misbehaving daemon, seen from the client -------------------------------------------------


class EvilHandler:
    """A FuseSession that garbles the replies to GETATTR of chosen nodeids."""

    def __init__(self) -> None:
        self.session = FuseSession(MemoryFS())

    async def handle_request(self, readable, writable):  # type: ignore[no-untyped-def]
        req = codec.decode_request(readable)
        h = req.header
        if h.opcode != abi.Opcode.GETATTR or h.nodeid < 10:
            return await self.session.handle_request(readable, writable)
        body = bytes(104)
        if h.nodeid == 10:  # someone else's unique
            parts = [codec.encode_out_header(h.unique + 2, 0, 104), body]
        elif h.nodeid == 11:  # header len disagrees with the bytes written
            parts = [codec.encode_out_header(h.unique, 0, 200), body]
        elif h.nodeid == 12:  # an error reply with a body
            parts = [codec.encode_out_header(h.unique, errno.ENOENT, 104), body]
        elif h.nodeid == 13:  # a fuse_attr_out of the wrong size
            parts = [codec.encode_out_header(h.unique, 0, 50), bytes(50)]
        elif h.nodeid == 14:  # a positive "errno" on the wire
            parts = [struct_out_header(16, 5, h.unique)]
        else:  # claims more bytes than the guest's buffers hold
            return sum(len(w) for w in writable) + 4096
        return scatter(writable, parts)

    async def close(self) -> None:
        await self.session.close()


def struct_out_header(length: int, error: int, unique: int) -> bytes:
    return abi.fuse_out_header.pack(length, error, unique)


def test_client_rejects_malformed_replies(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        server = VhostUserServer(rt, EvilHandler, socket_path=sock_path)
        async with rt.task_group() as daemon:
            daemon.start_soon(server.serve)
            await server.ready.wait()
            async with FuseClient.connect(sock_path, runtime=rt) as c:
                for nodeid in (10, 11, 12, 13, 14):
                    with pytest.raises(FuseProtocolError):
                        await c.getattr(nodeid)
                    assert (await c.getattr(ROOT)).attr.ino == ROOT
                # A used length beyond the chain's buffers: the device is broken.
                with pytest.raises(FrontendError):
                    await c.getattr(15)
                with pytest.raises(FrontendError):
                    await c.getattr(ROOT)
            daemon.cancel()

    run(body)


class StuckFS(MemoryFS):
    def __init__(self, rt) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.entered = rt.event()
        self.never = rt.event()

    async def statfs(self, ctx):  # type: ignore[no-untyped-def]
        self.entered.set()
        await self.never.wait()


def test_daemon_going_away_fails_pending_requests(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    async def body(rt):  # type: ignore[no-untyped-def]
        fs = StuckFS(rt)
        server = make_server(fs, runtime=rt, socket_path=sock_path)
        outcome = {}

        async def stuck(client: FuseClient) -> None:
            try:
                await client.statfs()
            except Exception as exc:  # noqa: BLE001 - the test inspects it
                outcome["error"] = exc

        async with rt.task_group() as clients:
            async with rt.task_group() as daemon:
                daemon.start_soon(server.serve)
                await server.ready.wait()
                fe = await VhostUserFsFrontend.connect(sock_path, runtime=rt)
                client = FuseClient(fe)
                await client.init()
                clients.start_soon(stuck, client)
                await fs.entered.wait()
                daemon.cancel()  # the daemon dies with a request in flight
        assert isinstance(outcome["error"], ConnectionError)
        with pytest.raises(FrontendError):
            await client.getattr(ROOT)
        await fe.close()
        assert fe.closed

    run(body)


def test_frontend_leaving_cancels_its_stuck_requests(run, sock_path) -> None:  # type: ignore[no-untyped-def]
    """A guest that disconnects with a request stuck in the backend (think
    SETLKW) does not hold up the next connection."""

    async def body(rt):  # type: ignore[no-untyped-def]
        fs = StuckFS(rt)
        outcome = {}
        async with serve_in_background(fs, sock_path, runtime=rt) as server:
            fe = await VhostUserFsFrontend.connect(sock_path, runtime=rt)
            client = FuseClient(fe)
            await client.init()

            async def stuck() -> None:
                try:
                    await client.statfs()
                except Exception as exc:  # noqa: BLE001 - the test inspects it
                    outcome["error"] = exc

            async with rt.task_group() as group:
                group.start_soon(stuck)
                await fs.entered.wait()
                await fe.close()
            assert isinstance(outcome["error"], FrontendError)
            async with rt.move_on_after(5):
                async with FuseClient.connect(sock_path, runtime=rt) as c:
                    outcome["next"] = (await c.getattr(ROOT)).attr.ino
            assert outcome.get("next") == ROOT, "the next connection was held up by the stuck request"
            assert server.connections_served >= 1

    run(body)
