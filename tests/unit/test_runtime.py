"""The runtimes' eventfd waiters (``Runtime.eventfd_waiter``) under asyncio,
uvloop and trio: a signal before the wait or during it wakes it once and
consumes the counter, ``close`` wakes a pending wait with
ClosedResourceError and stops watching, an unusable fd raises OSError."""
from __future__ import annotations

import errno
import os
import time
from typing import Any, Awaitable, Callable

import pytest

from virtiofs_async.runtime import ClosedResourceError, Runtime, get_runtime

RUNTIMES = ["asyncio", "uvloop", "trio"]


def run_on(name: str, body: Callable[[Runtime], Awaitable[Any]]) -> Any:
    rt = get_runtime(name)

    async def main() -> Any:
        return await body(rt)

    return rt.run(main)


@pytest.fixture
def efd():  # type: ignore[no-untyped-def]
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.mark.parametrize("name", RUNTIMES)
def test_a_signal_before_the_wait_wakes_it_once(name: str, efd: int) -> None:
    async def body(rt: Runtime) -> None:
        waiter = rt.eventfd_waiter(efd)
        try:
            os.eventfd_write(efd, 1)
            os.eventfd_write(efd, 1)  # merges with the first
            await waiter.wait()
            with pytest.raises(BlockingIOError):
                os.eventfd_read(efd)  # consumed
            woke = []

            async def waiting() -> None:
                await waiter.wait()
                woke.append(True)

            async with rt.task_group() as group:
                group.start_soon(waiting)
                for _ in range(5):
                    await rt.sleep(0)
                assert not woke  # nothing new was signalled
                os.eventfd_write(efd, 1)
            assert woke == [True]
        finally:
            waiter.close()

    run_on(name, body)


@pytest.mark.parametrize("name", RUNTIMES)
def test_close_wakes_the_waiter_and_stops_watching(name: str, efd: int) -> None:
    async def body(rt: Runtime) -> None:
        waiter = rt.eventfd_waiter(efd)
        outcome: list[BaseException] = []

        async def waiting() -> None:
            try:
                await waiter.wait()
            except ClosedResourceError as exc:
                outcome.append(exc)

        async with rt.task_group() as group:
            group.start_soon(waiting)
            await rt.sleep(0.01)
            waiter.close()
            waiter.close()  # idempotent
        assert len(outcome) == 1
        with pytest.raises(ClosedResourceError):
            await waiter.wait()
        # No longer watched: a signal stays in the counter for its next owner.
        os.eventfd_write(efd, 1)
        await rt.sleep(0.01)
        assert os.eventfd_read(efd) == 1
        # The fd can be watched again (a restarted queue keeps its kick fd).
        again = rt.eventfd_waiter(efd)
        os.eventfd_write(efd, 1)
        await again.wait()
        again.close()

    run_on(name, body)


@pytest.mark.parametrize("name", RUNTIMES)
def test_on_signal_deals_with_signals_while_a_task_waits(name: str, efd: int) -> None:
    """The handler runs for each signal during a wait: True keeps the task
    waiting, False (or raising, which is logged) wakes it."""
    answers = [True, True, False, "raise"]
    calls: list[object] = []

    def on_signal() -> bool:
        answer = answers[len(calls)]
        calls.append(answer)
        if answer == "raise":
            raise RuntimeError("handler bug")
        return bool(answer)

    async def body(rt: Runtime) -> None:
        waiter = rt.eventfd_waiter(efd, on_signal)
        woke: list[int] = []

        async def waiting() -> None:
            await waiter.wait()
            woke.append(len(calls))

        try:
            for round_, expected_calls in enumerate((3, 4)):
                async with rt.task_group() as group:
                    group.start_soon(waiting)
                    for _ in range(3):
                        await rt.sleep(0.01)
                        if len(woke) > round_:
                            break
                        os.eventfd_write(efd, 1)
                        for _ in range(5):
                            await rt.sleep(0)
                assert woke[-1] == expected_calls
                with pytest.raises(BlockingIOError):
                    os.eventfd_read(efd)  # every signal was consumed
        finally:
            waiter.close()

    run_on(name, body)
    assert calls == [True, True, False, "raise"]


@pytest.mark.parametrize("name", ["asyncio", "uvloop"])
def test_on_signal_is_not_called_for_a_signal_nobody_waits_for(name: str, efd: int) -> None:
    """asyncio consumes signals as they come: one while nobody waits is
    left pending for the next wait, not handled (trio reads the counter
    only in a wait, so it offers a pending signal to the handler too)."""
    calls: list[int] = []

    async def body(rt: Runtime) -> None:
        waiter = rt.eventfd_waiter(efd, lambda: calls.append(1) is None)
        try:
            os.eventfd_write(efd, 1)
            await rt.sleep(0.01)  # the reader consumes it now
            await waiter.wait()  # returns at once: the signal is pending, not handled
        finally:
            waiter.close()

    run_on(name, body)
    assert calls == []


@pytest.mark.parametrize("name", RUNTIMES)
def test_an_unusable_fd_raises_oserror(name: str, tmp_path: Any) -> None:
    fd = os.open(tmp_path / "regular", os.O_RDWR | os.O_CREAT)  # epoll refuses regular files

    async def body(rt: Runtime) -> None:
        waiter = rt.eventfd_waiter(fd)
        with pytest.raises(OSError):
            await waiter.wait()
        waiter.close()

    try:
        run_on(name, body)
    finally:
        os.close(fd)


@pytest.mark.parametrize("name", RUNTIMES)
def test_building_a_runtime_loads_the_unwinder(name: str) -> None:
    """A worker thread that exits after a chroot/pivot_root makes glibc dlopen
    libgcc_s, which aborts the process once the host's /lib is gone: every
    runtime loads it when built, before any root switch (a fresh process,
    so nothing else has loaded it yet)."""
    import subprocess
    import sys

    import virtiofs_async

    src = os.path.dirname(os.path.dirname(os.path.abspath(virtiofs_async.__file__)))
    script = (
        "import sys; sys.path[:0] = [%r]\n"
        "from virtiofs_async.runtime import get_runtime\n"
        "loaded = lambda: 'libgcc_s.so' in open('/proc/self/maps').read()\n"
        "before = loaded(); get_runtime(%r); print(before, loaded())\n" % (src, name)
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True"]


@pytest.mark.parametrize("name", RUNTIMES)
def test_preadv_and_pwritev_off_the_loop(name: str, tmp_path: Any) -> None:
    """The runtimes' I/O calls: data in and out of the given buffers, OSError
    with the errno on failure, and (asyncio) no I/O worker left after run."""
    import threading

    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    ro = os.open(tmp_path / "f", os.O_RDONLY)

    async def body(rt: Runtime) -> Any:
        n = await rt.pwritev(fd, [b"abc", bytearray(b"defg")], 2)
        head, tail = bytearray(3), bytearray(10)
        m = await rt.preadv(fd, [head, tail], 0)
        with pytest.raises(OSError) as err:
            await rt.pwritev(ro, [b"x"], 0)
        return n, m, bytes(head), bytes(tail), err.value.errno

    try:
        assert run_on(name, body) == (7, 9, b"\0\0a", b"bcdefg\0\0\0\0", errno.EBADF)
    finally:
        os.close(fd)
        os.close(ro)
    deadline = time.monotonic() + 5
    while any(t.name.startswith("virtiofs-io") for t in threading.enumerate()):
        assert time.monotonic() < deadline, "I/O workers outlived the runtime"
        time.sleep(0.01)
