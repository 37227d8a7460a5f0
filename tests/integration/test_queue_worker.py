"""The transport's queue worker under asyncio, uvloop and trio: requests
run inline until they suspend, then finish in the task they started in.
A batch mixing inline requests, suspending ones (with task-bound
primitives: a timeout block, a worker thread), and requests that fail
inline or after suspending gets every reply right; each request sees its
own contextvars context."""
from __future__ import annotations

import contextvars
import logging
from typing import Any, Sequence

import sniffio

from virtiofs_async import FuseSession
from virtiofs_async.abi import fuse as abi
from virtiofs_async import codec
from virtiofs_async.backends.memory import MemoryFS
from virtiofs_async.runtime import Runtime
from virtiofs_async.testing import FuseClient
from virtiofs_async.transport import VhostUserServer

ROOT = abi.FUSE_ROOT_ID
SUSPENDS, FAILS_LATE, FAILS_INLINE = 20, 21, 22
REQUEST: contextvars.ContextVar[int | None] = contextvars.ContextVar("REQUEST", default=None)


def current_task() -> object:
    if sniffio.current_async_library() == "trio":
        import trio

        return trio.lowlevel.current_task()
    import asyncio

    return asyncio.current_task()


class SchedulingHandler:
    """A FuseSession whose GETATTR of chosen nodeids suspends and/or fails,
    checking its task and contextvars on the way."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.session = FuseSession(MemoryFS())
        self.suspended = 0

    async def handle_request(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        req = codec.decode_request(readable)
        h = req.header
        assert REQUEST.get() is None, "a request saw another request's context"
        REQUEST.set(h.unique)
        if h.opcode == abi.Opcode.GETATTR and h.nodeid == FAILS_INLINE:
            raise RuntimeError("failed inline")
        if h.opcode == abi.Opcode.GETATTR and h.nodeid in (SUSPENDS, FAILS_LATE):
            task = current_task()
            async with self.rt.move_on_after(30):  # bound to the current task
                await self.rt.sleep(0)
                assert current_task() is task
                await self.rt.run_in_thread(lambda: None)
                assert current_task() is task
            assert REQUEST.get() == h.unique
            self.suspended += 1
            if h.nodeid == FAILS_LATE:
                raise RuntimeError("failed after suspending")
            # Answered as a GETATTR of the root.
            readable = [memoryview(getattr_parts(h.unique, ROOT)[0] + bytes(16))]
        return await self.session.handle_request(readable, writable)

    async def close(self) -> None:
        await self.session.close()


def getattr_parts(unique: int, nodeid: int) -> list[bytes]:
    return [codec.InHeader(40 + 16, abi.Opcode.GETATTR, unique, nodeid, 0, 0, 1).encode(), bytes(16)]


def test_a_mixed_batch_is_served_right(run, sock_path, caplog) -> None:  # type: ignore[no-untyped-def]
    async def body(rt: Runtime) -> None:
        handler = SchedulingHandler(rt)
        server = VhostUserServer(rt, lambda: handler, socket_path=sock_path)
        async with rt.task_group() as daemon:
            daemon.start_soon(server.serve)
            await server.ready.wait()
            async with FuseClient.connect(sock_path, runtime=rt, indirect=True) as c:
                plan = [ROOT, SUSPENDS, ROOT, ROOT, FAILS_INLINE, SUSPENDS, ROOT, FAILS_LATE, ROOT] * 4
                replies: dict[int, bytes] = {}

                async def one(i: int, nodeid: int) -> None:
                    replies[i] = await c.frontend.submit(getattr_parts(1000 + i, nodeid), 16 + 104)

                for _ in range(3):  # a batch popped at once, three times over
                    replies.clear()
                    async with rt.task_group() as group:
                        for i, nodeid in enumerate(plan):
                            group.start_soon(one, i, nodeid)
                    for i, nodeid in enumerate(plan):
                        if nodeid in (FAILS_INLINE, FAILS_LATE):
                            assert replies[i] == b""  # an empty used entry
                        else:
                            out = codec.decode_out_header(replies[i][:16])
                            assert (out.error, out.unique, len(replies[i])) == (0, 1000 + i, 120)
                    assert (await c.getattr(ROOT)).attr.ino == ROOT
                assert handler.suspended == 3 * 4 * 3
            daemon.cancel()

    with caplog.at_level(logging.ERROR, logger="virtiofs_async"):
        run(body)
    failed = [r for r in caplog.records if "request handler failed" in r.getMessage()]
    assert len(failed) == 3 * 4 * 2
