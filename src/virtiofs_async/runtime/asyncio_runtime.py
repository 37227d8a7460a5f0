"""asyncio (and uvloop) implementation of the runtime interface."""
from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import threading
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from ..iopool import PREADV, PWRITEV  # the operation codes of both IoPool twins
from .base import ClosedResourceError, preload_unwinder, signal_handled

T = TypeVar("T")


class _TaskGroup:
    """A task group whose members never take the group down: a failing task
    is logged by the caller's own code; ``cancel`` stops them all."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._tasks: set[asyncio.Task[Any]] = set()
        self._cancelled = False

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        task = self._loop.create_task(fn(*args))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Surface unexpected crashes of a member like an unhandled error.
            self._loop.call_exception_handler(
                {"message": "task in runtime task group failed", "exception": task.exception(), "task": task}
            )

    def cancel(self) -> None:
        self._cancelled = True
        for task in list(self._tasks):
            task.cancel()

    async def _join(self) -> None:
        while self._tasks:
            try:
                await asyncio.wait(list(self._tasks))
            except asyncio.CancelledError:
                self.cancel()
                raise


class _EventfdWaiter:
    """asyncio's :class:`~.base.EventfdWaiter`: one reader registered for the
    waiter's whole life. The reader callback consumes the counter itself, so
    the level-triggered registration never spins, and a kick that arrives
    while nobody waits is remembered as one pending wake-up."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int, on_signal: Callable[[], bool] | None) -> None:
        self._loop = loop
        self._fd = fd
        self._on_signal = on_signal
        self._signalled = False
        self._closed = False
        self._error: OSError | None = None
        self._future: asyncio.Future[None] | None = None
        attach = getattr(on_signal, "attach", None)
        try:
            # An attachable on_signal reads and serves the fd itself (one
            # compiled call per wake-up); wake/fail are its way back here.
            reader = attach(fd, self._wake, self._fail) if attach is not None else self._on_readable
            loop.add_reader(fd, reader)
            self._registered = True
        except (OSError, ValueError) as exc:
            self._registered = False
            self._error = exc if isinstance(exc, OSError) else OSError(str(exc))

    def _on_readable(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(exc)
            return
        if self._future is not None and self._on_signal is not None and signal_handled(self._on_signal):
            return  # dealt with here: the waiter sleeps on
        self._wake()

    def _wake(self) -> None:
        self._signalled = True
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)

    def _fail(self, exc: OSError) -> None:
        self._error = exc
        self._unregister()
        self._wake()

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            with contextlib.suppress(OSError, ValueError):
                self._loop.remove_reader(self._fd)

    async def wait(self) -> None:
        if not (self._signalled or self._closed or self._error is not None):
            future = self._future = self._loop.create_future()
            try:
                await future
            finally:
                self._future = None
        if self._closed:
            raise ClosedResourceError(f"eventfd {self._fd} is no longer watched")
        if self._error is not None:
            raise self._error
        self._signalled = False

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._unregister()
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)


class _Completions:
    """Where worker threads hand results back to one event loop, in batches.

    A worker appends ``(future, ok, value)`` and writes the eventfd only if
    no wake-up is pending; the loop's reader takes the whole batch and
    settles the futures (one wake-up and no per-result call_soon_threadsafe,
    which costs a self-pipe write and a handle each). The eventfd is only
    written under the lock and ``closed`` is set under it before the fd is
    closed, so a late worker never writes to a reused fd number. Holds no
    reference to the loop (the loop holds this object through its reader).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._signalled = False
        self.closed = False
        loop.add_reader(self.efd, self._drain)
        weakref.finalize(loop, self.close, None)

    def post(self, fut: asyncio.Future[Any], ok: bool, value: Any) -> None:
        """Worker thread: deliver one outcome."""
        with self._lock:
            if self.closed:
                return
            self._items.append((fut, ok, value))
            if not self._signalled:
                self._signalled = True
                try:
                    os.eventfd_write(self.efd, 1)
                except BlockingIOError:
                    pass

    def _drain(self) -> None:
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            pass
        with self._lock:
            items, self._items = self._items, []
            self._signalled = False
        for fut, ok, value in items:
            if fut.done():  # the awaiting task was cancelled
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def close(self, loop: asyncio.AbstractEventLoop | None) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._items.clear()
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                loop.remove_reader(self.efd)
        os.close(self.efd)



class _ThreadPool:
    """At most ``max_threads`` worker threads, started on demand, running
    blocking calls for :meth:`AsyncioRuntime.run_in_thread` (what
    concurrent.futures does, without its per-call future, lock and
    callback chain; measured here: 90 -> 31 us per call one at a time,
    50 -> 5 us with 16 in flight). Threads are daemons; :meth:`shutdown`
    lets the running ones finish and stop, and later calls start new ones."""

    def __init__(self, max_threads: int) -> None:
        preload_unwinder()  # now: the first thread may start after a root switch
        self._max = max(1, max_threads)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads done with their last item and not re-claimed (under _lock)
        self._lock = threading.Lock()

    def submit(self, sink: _Completions, fut: asyncio.Future[Any], fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self._queue.put((sink, fut, fn, args))
        with self._lock:
            if self._idle:
                self._idle -= 1
            elif len(self._threads) < self._max:
                t = threading.Thread(target=self._work, name=f"virtiofs-worker_{len(self._threads)}", daemon=True)
                self._threads.append(t)
                t.start()

    def _work(self) -> None:
        get, lock = self._queue.get, self._lock
        while True:
            item = get()
            if item is None:
                return
            sink, fut, fn, args = item
            try:
                value, ok = fn(*args), True
            except BaseException as exc:  # delivered to the awaiting task
                value, ok = (exc if not isinstance(exc, StopIteration) else RuntimeError(repr(exc))), False
            sink.post(fut, ok, value)
            del item, sink, fut, fn, args, value
            with lock:
                self._idle += 1

    def shutdown(self) -> None:
        with self._lock:
            threads, self._threads = self._threads, []
            self._idle = 0
        for _ in threads:
            self._queue.put(None)


class _IoCompletions:
    """One loop's I/O pool (``_accel.IoPool``: compiled workers run the
    syscalls without the GIL): a reader on its eventfd settles the futures
    of the finished jobs. Closed when the runtime's ``run`` ends or the loop
    is collected; queued jobs still run, their results are dropped."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int) -> None:
        from .._accel import IoPool

        self.pool = IoPool(max_threads, "virtiofs-io")
        self._efd = self.pool.fd
        self.closed = False
        loop.add_reader(self._efd, self._drain)
        self._finalizer = weakref.finalize(loop, self._close_pool, self.pool)

    def _drain(self) -> None:
        for fut, result in self.pool.drain():
            if fut.done():  # the awaiting task was cancelled
                continue
            if result >= 0:
                fut.set_result(result)
            else:
                fut.set_exception(OSError(-result, os.strerror(-result)))

    @staticmethod
    def _close_pool(pool: Any) -> None:
        pool.close()

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.closed:
            return
        self.closed = True
        if not loop.is_closed():
            with contextlib.suppress(OSError, ValueError, RuntimeError):
                loop.remove_reader(self._efd)
        self._finalizer()


class AsyncioRuntime:
    """Runtime over the running asyncio loop (uvloop's loop is an asyncio loop)."""

    def __init__(self, *, use_uvloop: bool | None = None, max_threads: int = 64) -> None:
        if use_uvloop is None:
            try:
                import uvloop  # noqa: F401
            except ImportError:
                use_uvloop = False
            else:
                use_uvloop = True
        self._use_uvloop = use_uvloop
        self.name = "uvloop" if use_uvloop else "asyncio"
        self._pool = _ThreadPool(max_threads)
        self._completions: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Completions] = (
            weakref.WeakKeyDictionary()
        )
        self._max_threads = max_threads
        self._io: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _IoCompletions] = weakref.WeakKeyDictionary()
        # fd -> futures waiting on it (readable and writable)
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}

    async def _wait(self, fd: int, readable: bool) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        add, remove = (loop.add_reader, loop.remove_reader) if readable else (loop.add_writer, loop.remove_writer)
        add(fd, _set_result_once, fut)
        self._waiters.setdefault(fd, []).append(fut)
        try:
            await fut
        finally:
            waiters = self._waiters.get(fd)
            if waiters is not None:
                with contextlib.suppress(ValueError):
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[fd]
            with contextlib.suppress(OSError, ValueError):
                remove(fd)

    async def wait_readable(self, fd: int) -> None:
        await self._wait(fd, True)

    async def wait_writable(self, fd: int) -> None:
        await self._wait(fd, False)

    def notify_closing(self, fd: int) -> None:
        loop = asyncio.get_running_loop()
        for fut in self._waiters.pop(fd, []):
            if not fut.done():
                fut.set_exception(ClosedResourceError(f"fd {fd} was closed"))
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(fd)
        with contextlib.suppress(OSError, ValueError):
            loop.remove_writer(fd)

    def eventfd_waiter(self, fd: int, on_signal: Callable[[], bool] | None = None) -> _EventfdWaiter:
        return _EventfdWaiter(asyncio.get_running_loop(), fd, on_signal)

    @contextlib.asynccontextmanager
    async def task_group(self) -> AsyncIterator[_TaskGroup]:
        group = _TaskGroup(asyncio.get_running_loop())
        try:
            yield group
        except BaseException:
            group.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await group._join()
            raise
        await group._join()

    async def run_in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        sink = self._completions.get(loop)
        if sink is None or sink.closed:
            sink = self._completions[loop] = _Completions(loop)
        fut: asyncio.Future[T] = loop.create_future()
        self._pool.submit(sink, fut, fn, args)
        return await fut

    async def preadv(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        return await self._io_job(PREADV, fd, buffers, offset)

    async def pwritev(self, fd: int, buffers: Sequence[Any], offset: int) -> int:
        return await self._io_job(PWRITEV, fd, buffers, offset)

    async def _io_job(self, op: int, fd: int, buffers: Sequence[Any], offset: int) -> int:
        loop = asyncio.get_running_loop()
        io = self._io.get(loop)
        if io is None or io.closed:
            io = self._io[loop] = _IoCompletions(loop, self._max_threads)
        fut: asyncio.Future[int] = loop.create_future()
        io.pool.submit(op, fd, buffers, offset, fut)
        return await fut

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def event(self) -> asyncio.Event:
        return asyncio.Event()

    @contextlib.asynccontextmanager
    async def move_on_after(self, seconds: float) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            pass

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def main() -> T:
            try:
                return await fn(*args)
            finally:
                loop = asyncio.get_running_loop()
                io = self._io.pop(loop, None)
                if io is not None:
                    io.close(loop)

        try:
            if self._use_uvloop:
                import uvloop

                return uvloop.run(main())
            return asyncio.run(main())
        finally:
            self._pool.shutdown()


def _set_result_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
