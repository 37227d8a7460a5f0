"""trio implementation of the runtime interface."""
from __future__ import annotations

import contextlib
import os
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import trio

from .base import ClosedResourceError, preload_unwinder, signal_handled

T = TypeVar("T")


class _TaskGroup:
    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        self._nursery.start_soon(fn, *args)

    def cancel(self) -> None:
        self._nursery.cancel_scope.cancel()


class _EventfdWaiter:
    """trio's :class:`~.base.EventfdWaiter`: ``wait_readable`` then one read
    per wait (trio re-arms its one-shot epoll registration per wait; there is
    no persistent-callback API). ``close`` wakes a waiter through
    ``notify_closing``, which also drops trio's registration at once."""

    def __init__(self, fd: int, on_signal: Callable[[], bool] | None) -> None:
        self._fd = fd
        self._on_signal = on_signal
        self._closed = False
        self._waiting = False

    async def wait(self) -> None:
        fd = self._fd
        while True:
            if self._closed:
                raise ClosedResourceError(f"eventfd {fd} is no longer watched")
            self._waiting = True
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError as exc:
                raise ClosedResourceError(str(exc)) from exc
            finally:
                self._waiting = False
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                continue
            if self._on_signal is not None and not self._closed and signal_handled(self._on_signal):
                continue  # dealt with: wait on
            return

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._waiting:
            trio.lowlevel.notify_closing(self._fd)


class TrioRuntime:
    name = "trio"

    def __init__(self, *, max_threads: int = 64) -> None:
        preload_unwinder()  # trio's worker threads may exit after a root switch
        self._max_threads = max_threads
        self._limiter: trio.CapacityLimiter | None = None

    async def wait_readable(self, fd: int) -> None:
        try:
            await trio.lowlevel.wait_readable(fd)
        except trio.ClosedResourceError as exc:
            raise ClosedResourceError(str(exc)) from exc

    async def wait_writable(self, fd: int) -> None:
        try:
            await trio.lowlevel.wait_writable(fd)
        except trio.ClosedResourceError as exc:
            raise ClosedResourceError(str(exc)) from exc

    def notify_closing(self, fd: int) -> None:
        trio.lowlevel.notify_closing(fd)

    def eventfd_waiter(self, fd: int, on_signal: Callable[[], bool] | None = None) -> _EventfdWaiter:
        return _EventfdWaiter(fd, on_signal)

    @contextlib.asynccontextmanager
    async def task_group(self) -> AsyncIterator[_TaskGroup]:
        async with trio.open_nursery() as nursery:
            yield _TaskGroup(nursery)

    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        if self._limiter is None:
            self._limiter = trio.CapacityLimiter(self._max_threads)
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    async def preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        return await self.run_in_thread(os.preadv, fd, buffers, offset)

    async def pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        return await self.run_in_thread(os.pwritev, fd, buffers, offset)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def event(self) -> trio.Event:
        return trio.Event()

    @contextlib.asynccontextmanager
    async def move_on_after(self, seconds: float) -> AsyncIterator[None]:
        with trio.move_on_after(seconds):
            yield

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.run(fn, *args)
