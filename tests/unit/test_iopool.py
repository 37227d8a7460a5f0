"""The I/O pool (``iopool.IoPool`` and its compiled twin ``_cy_iopool``):
both run side by side on the same checks. The compiled one skips when the
extensions are not built, unless the cython implementation is required
(VIRTIOFS_ASYNC_IMPLEMENTATION / VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION)."""
from __future__ import annotations

import errno
import os
import select
import time
from typing import Any, Callable

import pytest

from virtiofs_async import iopool

from .compiled import need_compiled

try:
    from virtiofs_async import _cy_iopool
except ImportError as exc:  # not built
    _cy_iopool = None  # type: ignore[assignment]
    _MISSING: ImportError | None = exc
else:
    _MISSING = None


@pytest.fixture(params=["python", "cython"])
def make_pool(request: pytest.FixtureRequest) -> Any:
    if request.param == "cython":
        need_compiled(_MISSING, "the compiled I/O pool is")
        cls = _cy_iopool.IoPool
    else:
        cls = iopool.IoPool
    pools: list[Any] = []

    def make(max_threads: int = 4) -> Any:
        pool = cls(max_threads)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


def wait_results(pool: Any, count: int, timeout: float = 10.0) -> list[tuple[Any, int]]:
    """Drain until ``count`` results came (waiting on the pool's eventfd)."""
    out: list[tuple[Any, int]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} results"
        select.select([pool.fd], [], [], left)
        out += pool.drain()
    return out


def test_write_then_read_back_with_several_buffers(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        pool.submit(iopool.PWRITEV, fd, [b"hello ", memoryview(b"big world")[:5], bytearray(b"!")], 3, "w")
        assert wait_results(pool, 1) == [("w", 12)]
        with open(tmp_path / "f", "rb") as f:
            assert f.read() == b"\0\0\0hello big w!"
        a, b = bytearray(4), bytearray(100)
        pool.submit(iopool.PREADV, fd, [a, memoryview(b)[10:20]], 3, ("r", 1))
        assert wait_results(pool, 1) == [(("r", 1), 12)]  # short: the end of the file
        assert bytes(a) == b"hell" and bytes(b[10:18]) == b"o big w!" and b[18:20] == b"\0\0"
    finally:
        os.close(fd)


def test_errors_come_back_as_negative_errno(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    ro = os.open(path, os.O_RDONLY)
    d = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        pool.submit(iopool.PWRITEV, ro, [b"data"], 0, "ro")
        pool.submit(iopool.PREADV, d, [bytearray(8)], 0, "dir")
        assert sorted(wait_results(pool, 2)) == [("dir", -errno.EISDIR), ("ro", -errno.EBADF)]
    finally:
        os.close(ro)
        os.close(d)


def test_bad_jobs_are_refused_at_submit(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool()
    with pytest.raises(ValueError):
        pool.submit(7, 0, [bytearray(1)], 0, None)
    with pytest.raises(ValueError):
        pool.submit(iopool.PREADV, 0, [], 0, None)
    with pytest.raises(ValueError):
        pool.submit(iopool.PWRITEV, 0, [b"x"] * (iopool.MAX_BUFFERS + 1), 0, None)
    with pytest.raises(ValueError):
        pool.submit(iopool.PWRITEV, 0, [b"x"], -1, None)
    with pytest.raises(BufferError):  # preadv into read-only memory
        pool.submit(iopool.PREADV, 0, [bytearray(1), b"ro"], 0, None)
    with pytest.raises(TypeError):
        pool.submit(iopool.PWRITEV, 0, [b"x", 3], 0, None)
    assert pool.drain() == []  # nothing was queued


def test_many_jobs_each_complete_once(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool(3)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(300):
            pool.submit(iopool.PWRITEV, fd, [bytes([i % 251]) * 512], i * 512, i)
        results = wait_results(pool, 300)
        assert sorted(t for t, _ in results) == list(range(300)) and {r for _, r in results} == {512}
        data = os.pread(fd, 300 * 512, 0)
        assert all(data[i * 512:(i + 1) * 512] == bytes([i % 251]) * 512 for i in range(300))
    finally:
        os.close(fd)


def test_the_eventfd_wakes_once_per_batch_and_drain_consumes_it(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool(1)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert select.select([pool.fd], [], [], 0)[0] == []
        for i in range(5):
            pool.submit(iopool.PWRITEV, fd, [b"abcd"], 4 * i, i)
        assert select.select([pool.fd], [], [], 10)[0] == [pool.fd]
        got = wait_results(pool, 5)
        assert [t for t, _ in got] == [0, 1, 2, 3, 4]  # one worker: in order
        assert select.select([pool.fd], [], [], 0)[0] == [] and pool.drain() == []
    finally:
        os.close(fd)


def test_buffers_stay_exported_until_drained(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        buf = bytearray(b"0123")
        pool.submit(iopool.PWRITEV, fd, [buf], 0, "t")
        select.select([pool.fd], [], [], 10)
        with pytest.raises(BufferError):
            buf.extend(b"x")  # the job still holds it
        assert wait_results(pool, 1) == [("t", 4)]
        buf.extend(b"x")  # released by drain
    finally:
        os.close(fd)


def test_close_runs_what_was_queued_then_stops(make_pool: Callable[..., Any], tmp_path: Any) -> None:
    pool = make_pool(1)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for i in range(20):
            pool.submit(iopool.PWRITEV, fd, [b"z" * 100], 100 * i, i)
        pool.close()
        assert pool.closed
        with pytest.raises(RuntimeError):
            pool.submit(iopool.PWRITEV, fd, [b"late"], 0, None)
        deadline = time.monotonic() + 10
        while pool.fd != -1:  # the last worker closes the eventfd
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert os.pread(fd, 3000, 0) == b"z" * 2000
    finally:
        os.close(fd)


def test_a_pool_that_never_started_a_worker_closes_at_once(make_pool: Callable[..., Any]) -> None:
    pool = make_pool()
    efd = pool.fd
    pool.close()
    assert pool.fd == -1
    with pytest.raises(OSError):
        os.fstat(efd)
