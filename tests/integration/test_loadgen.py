"""The pipelined load generator (testing.loadgen) against an in-process MemoryFS.

No timing is asserted: only that every request is answered, matched and
checked, that the depth is kept, that errors surface, and that the queue is
usable by the ordinary client afterwards.
"""
from __future__ import annotations

import errno
import random
from typing import Any

import pytest

from virtiofs_async import session as session_module
from virtiofs_async.backends import MemoryFS
from virtiofs_async.errors import FuseError
from virtiofs_async.testing import FuseClient, serve_in_background
from virtiofs_async.testing.loadgen import (
    LoadGenError,
    LoadGenerator,
    LoadReplyError,
    create_cycle_slots,
    getattr_slots,
    lookup_slots,
    read_slots,
    write_slots,
)

DURATION = 0.15
CONNECT = dict(indirect=True, queue_size=256, memory_size=64 << 20)


async def _with_client(runtime: Any, sock_path: str, body: Any) -> Any:
    async with serve_in_background(MemoryFS(), sock_path, runtime=runtime):
        async with FuseClient.connect(sock_path, runtime=runtime, **CONNECT) as client:
            return await body(client)


def body_runner(body: Any) -> Any:
    """``run`` body: ``await body(client)`` with a client of an in-process MemoryFS."""
    async def runner(runtime: Any, sock_path: str) -> Any:
        return await _with_client(runtime, sock_path, body)
    return runner


def test_getattr_load_keeps_depth_and_hands_the_queue_back(run: Any, sock_path: str) -> None:
    async def body(client: FuseClient) -> None:
        node = (await client.create(1, b"f")).entry.nodeid
        drv = client.frontend.driver(1)
        free_before = drv.num_free
        with LoadGenerator(client.frontend, getattr_slots(node, 8)) as gen:
            assert drv.num_free == free_before - 8  # one indirect descriptor per chain
            stats = await gen.run(DURATION)
            assert stats.completed > 0 and stats.depth == 8
            assert stats.min_outstanding == stats.max_outstanding == 8
            assert gen.completed_total >= stats.completed
            assert stats.frontend_cpu >= 0 and stats.loop_cpu >= 0
            again = await gen.run(DURATION)  # a generator runs more than once
            assert again.completed > 0
        assert drv.num_free == free_before and client.frontend.in_flight() == 0
        assert (await client.getattr(node)).attr.ino == node  # the ordinary path still works

    run(body_runner(body), sock_path)


def test_lookup_load_counts_every_lookup(run: Any, sock_path: str) -> None:
    async def body(client: FuseClient) -> None:
        node = (await client.mkdir(1, b"d")).nodeid
        with LoadGenerator(client.frontend, lookup_slots(1, b"d", 4)) as gen:
            await gen.run(DURATION)
            looked_up = gen.completed_total
        assert looked_up > 0
        await client.forget(node, looked_up + 1)  # every reply counted one lookup
        assert (await client.lookup(1, b"d")).nodeid == node

    run(body_runner(body), sock_path)


def test_error_reply_is_surfaced_and_the_queue_stays_usable(run: Any, sock_path: str) -> None:
    async def body(client: FuseClient) -> None:
        with LoadGenerator(client.frontend, lookup_slots(1, b"missing", 4)) as gen:
            with pytest.raises(LoadReplyError) as info:
                await gen.run(DURATION)
        assert isinstance(info.value, FuseError) and info.value.errno == errno.ENOENT
        assert "FUSE_LOOKUP" in str(info.value)
        assert client.frontend.in_flight() == 0
        assert (await client.getattr(1)).attr.ino == 1

    run(body_runner(body), sock_path)


def test_reply_with_another_unique_is_refused(run: Any, sock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real = session_module._write_reply  # how the session writes every success reply
    calls = {"n": 0}

    def tampered(writable: Any, unique: int, error: int, body: Any) -> int:
        if unique >= 1 << 40:  # the generator's requests only
            calls["n"] += 1
            if calls["n"] == 20:
                unique += 2  # the id of another request
        return real(writable, unique, error, body)

    monkeypatch.setattr(session_module, "_write_reply", tampered)

    async def body(client: FuseClient) -> None:
        with LoadGenerator(client.frontend, getattr_slots(1, 4)) as gen:
            with pytest.raises(LoadGenError, match="carries unique"):
                await gen.run(5.0)
        assert (await client.getattr(1)).attr.ino == 1

    run(body_runner(body), sock_path)


def test_create_cycles_finish_every_file(run: Any, sock_path: str) -> None:
    async def body(client: FuseClient) -> None:
        with LoadGenerator(client.frontend, create_cycle_slots(client, 1, 4)) as gen:
            assert gen.steps == 4
            stats = await gen.run(DURATION)
        assert stats.cycles > 0
        names = [d.name for d in await client.readdir_all(1)]
        assert names == [b".", b".."]  # every slot ended its cycle: created, released, unlinked

    run(body_runner(body), sock_path)


def test_reads_return_the_file_and_writes_land(run: Any, sock_path: str) -> None:
    span, size = 256 << 10, 16 << 10
    content = random.Random(1).randbytes(span)

    async def body(client: FuseClient) -> None:
        created = await client.create(1, b"data")
        node, fh = created.entry.nodeid, created.open.fh
        for pos in range(0, span, 64 << 10):
            await client.write(node, fh, pos, content[pos:pos + (64 << 10)])
        slots, walkers = read_slots(node, fh, size, 4, span)
        with LoadGenerator(client.frontend, slots) as gen:
            await gen.run(DURATION)
            assert len(walkers) == 4
            for chains, walker in zip(gen.slots, walkers):
                assert walker.done_offset >= 0
                assert chains[0].reply()[16:] == content[walker.done_offset:walker.done_offset + size]
        payload = bytes(range(256)) * (size // 256)
        slots, walkers = write_slots(node, fh, payload, 4, span)
        with LoadGenerator(client.frontend, slots) as gen:
            await gen.run(DURATION)
        for walker in walkers:
            assert await client.read(node, fh, walker.done_offset, size) == payload

    run(body_runner(body), sock_path)


def test_a_load_that_does_not_fit_is_refused(run: Any, sock_path: str) -> None:
    async def body(client: FuseClient) -> None:
        drv = client.frontend.driver(1)
        free = drv.num_free
        with pytest.raises(ValueError, match="does not fit"):
            LoadGenerator(client.frontend, getattr_slots(1, drv.size + 1))
        assert drv.num_free == free
        assert (await client.getattr(1)).attr.ino == 1

    run(body_runner(body), sock_path)
