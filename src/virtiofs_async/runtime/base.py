"""The runtime interface: the only thing in the library that knows an event loop.

Everything above the sans-IO cores (transport, daemon, testing frontend) is
written against :class:`Runtime`; :mod:`.asyncio_runtime` and
:mod:`.trio_runtime` implement it. Keep it small: waiting for an fd, a task
group, running a blocking call in a thread, sleeping, events, timeouts.

fd contract (after trio): whoever owns an fd calls ``notify_closing(fd)``
before closing it while another task may be waiting on it; the waiter then
gets :class:`ClosedResourceError`. A task never waits on an fd it does not
own or borrow from a live owner.
"""
from __future__ import annotations

import ctypes
import logging
import os
from contextlib import AbstractAsyncContextManager
from typing import Any, Awaitable, Callable, Protocol, Sequence, TypeVar

T = TypeVar("T")


class ClosedResourceError(Exception):
    """The fd a task was waiting on was closed (see ``notify_closing``)."""


class TaskGroup(Protocol):
    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` concurrently; the group's ``async with`` waits for it."""

    def cancel(self) -> None:
        """Cancel every task of the group (the ``async with`` then returns)."""


class Event(Protocol):
    def set(self) -> None: ...

    def is_set(self) -> bool: ...

    async def wait(self) -> None: ...


class EventfdWaiter(Protocol):
    """A persistent watch of one non-blocking eventfd (a kick fd), made by
    :meth:`Runtime.eventfd_waiter` for the one task at a time that waits on it."""

    async def wait(self) -> None:
        """Return once the eventfd was signalled since the previous ``wait``
        returned (the counter is consumed; several signals may merge into one
        return). Raises ClosedResourceError once :meth:`close` was called, and
        OSError if the fd cannot be watched or read (then it is no longer
        watched). At most one task waits at a time."""

    def close(self) -> None:
        """Stop watching the fd, at once: when this returns the fd may be
        closed or handed to another waiter. A pending ``wait`` raises
        ClosedResourceError. Idempotent."""


class Runtime(Protocol):
    #: "asyncio", "uvloop" or "trio".
    name: str

    async def wait_readable(self, fd: int) -> None:
        """Return when ``fd`` is readable (or raise ClosedResourceError)."""

    async def wait_writable(self, fd: int) -> None: ...

    def notify_closing(self, fd: int) -> None:
        """Wake every waiter of ``fd`` with ClosedResourceError; call before close."""

    def eventfd_waiter(self, fd: int, on_signal: Callable[[], bool] | None = None) -> EventfdWaiter:
        """Start watching the eventfd ``fd`` (call from inside the running
        loop). Cheaper than ``read_eventfd`` per wait: asyncio keeps one
        reader registered (its callback consumes the counter, so a fd that
        nobody waits on never makes the loop spin). ``on_signal``, when
        given, is called (synchronously, from the runtime's own wake-up
        path) for each signal a waiting task would wake for (asyncio: one
        that arrives during a wait; trio, which reads the counter only in
        a wait: also one pending when it starts); when it returns True it
        has dealt with the signal and the task keeps waiting. It should
        not raise; if it does, that is logged and the task is woken.

        An ``on_signal`` with an ``attach(fd, wake, fail)`` method (a
        :class:`~virtiofs_async.vring.KickServer`) may be given the fd's
        wake-ups whole: a runtime with persistent readers (asyncio)
        registers what ``attach`` returns in place of its own callback.
        That reader consumes the counter, calls ``on_signal``'s logic
        itself (it decides whether anyone waits), ``wake()`` for a signal
        the waiting task must see, and ``fail(exc)`` when the fd cannot be
        read. trio ignores ``attach``."""

    def task_group(self) -> AbstractAsyncContextManager[TaskGroup]: ...

    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking ``fn(*args)`` in the runtime's bounded thread pool."""

    async def preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """One ``preadv(2)`` into the writable ``buffers`` at ``offset`` off
        the event loop (it may be short); OSError on failure. The caller
        keeps ``fd`` open and the buffers alive until it returns, and, if
        it is cancelled, until the call would have returned (the syscall
        still runs)."""

    async def pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        """One ``pwritev(2)``, under the contract of :meth:`preadv`."""

    async def sleep(self, seconds: float) -> None: ...

    def event(self) -> Event: ...

    def move_on_after(self, seconds: float) -> AbstractAsyncContextManager[Any]:
        """A block that is cancelled (silently) after ``seconds``."""

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``fn(*args)`` to completion on a fresh event loop (entry point)."""


async def read_eventfd(runtime: Runtime, fd: int) -> int:
    """Wait for an eventfd (non-blocking) to be signalled and consume its count."""
    while True:
        try:
            return os.eventfd_read(fd)
        except BlockingIOError:
            await runtime.wait_readable(fd)


def signal_eventfd(fd: int) -> None:
    """Add 1 to an eventfd. A full counter (EAGAIN) already means "signalled"."""
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass


def preload_unwinder() -> bool:
    """Load libgcc_s into the process now, while the host's libraries are
    reachable. glibc dlopens it the first time a thread exits through
    pthread_exit (a daemon thread at interpreter exit); after a chroot or
    pivot_root into the share that dlopen fails and aborts the process
    ("libgcc_s.so.1 must be installed"). Every runtime calls this when it
    is built, so build the runtime before switching the root. Returns
    whether the library is loaded."""
    try:
        ctypes.CDLL("libgcc_s.so.1")
    except OSError as exc:
        logging.getLogger(__name__).warning(
            "cannot preload libgcc_s.so.1 (%s): a worker thread exiting after a root switch would abort", exc
        )
        return False
    return True


def signal_handled(on_signal: Callable[[], bool]) -> bool:
    """Run an ``eventfd_waiter`` signal handler: whether it dealt with the
    signal (a handler that raises is logged and has not)."""
    try:
        return on_signal() is True
    except Exception:
        logging.getLogger(__name__).exception("eventfd signal handler failed; waking the waiter")
        return False
