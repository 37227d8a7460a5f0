"""The vhost-user transport: a unix socket, its fds, and the queue workers.

It moves bytes and fds between the socket and the sans-IO
:class:`~virtiofs_async.vhost_user.VhostUserBackend`, watches each running
queue's kick eventfd, pops descriptor chains and hands each one to a
:class:`RequestHandler` (the FUSE session), concurrently (a request runs
inline until it suspends, then in its own task: see ``_QueueWorker``), then
returns the chain to the used ring and signals the call eventfd, once per
batch, when the guest wants it. It knows nothing of FUSE or backends: only of ``RequestHandler``.

Ownership: the vhost-user handler owns guest memory, the queues and their
kick/call fds; it tells this layer which fds to stop watching (events) and
which to close (``close_fds``). This layer owns the sockets and a queue
worker's in-flight tasks; it never closes an fd it did not receive as
``close_fds`` or create itself.
"""
from __future__ import annotations

import array
import collections
import contextvars
import errno
import logging
import os
import socket
import stat
import types
from typing import Any, Awaitable, Callable, Coroutine, Generator, Protocol, Sequence, TypeVar

import attrs

from . import vhost_user
from .errors import ProtocolError, VhostUserProtocolError, VringError
from .runtime import ClosedResourceError, Event, EventfdWaiter, Runtime, TaskGroup, signal_eventfd

T = TypeVar("T")

log = logging.getLogger("virtiofs_async.transport")

#: vhost-user messages carry at most 8 fds (SET_MEM_TABLE).
_MAX_FDS = 8
_RECV_SIZE = 1 << 16


class RequestHandler(Protocol):
    """What serves the requests of one connection (a FuseSession)."""

    async def handle_request(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Serve one chain; return the number of bytes written to ``writable``.

        Must be a coroutine function (``async def``). Its coroutine is
        started inline by the queue's current leader task; if it suspends,
        it is finished in that same task (never moved between tasks), with
        its own copy of the contextvars context. Requests are thus not
        guaranteed a task of their own: a task may run several requests one
        after another."""

    async def close(self) -> None:
        """The connection ended; no further request will come."""

    # Optional: ``device_reset()`` is called (if the handler has it) whenever
    # a queue is stopped or the device is reset, so a FUSE session may accept
    # the FUSE_INIT of a rebooted guest.
    # Optional: ``inline_responder`` (an attribute, read at every batch pop):
    # when not None, chains are first offered to it (VirtQueue.pop_serving);
    # the ones it answers never reach handle_request.


#: DeviceConfig.hiprio_coalesce's default, in seconds: none.
HIPRIO_COALESCE = 0.0


@attrs.define
class DeviceConfig:
    """What the vhost-user-fs device offers the frontend."""

    #: Request queues (the hiprio queue 0 comes on top of these).
    num_request_queues: int = 1
    queue_max_size: int = 1024
    #: Seconds the hiprio queue waits after a kick before it is served, with
    #: kicks off meanwhile (0, the default: each kick is served at once).
    #: Linux puts only FORGETs there (no reply, nobody waits for them), and
    #: a guest dropping its caches sends hundreds in a burst: held back,
    #: they cost fewer wake-ups of the loop that also serves the requests,
    #: but the guest cannot free its ring's slots meanwhile and sends the
    #: rest of the burst later, in the middle of its next requests. Guest
    #: benchmark (500 files, 10 interleaved boots): with 0.001 the first
    #: listing after a cache drop took 7.7 ms and the three 19.3 ms in all
    #: (77 000 entries/s); with 0, 6.6 and 16.1 ms (91 000 entries/s).
    hiprio_coalesce: float = HIPRIO_COALESCE


#: Chains a leader serves before it lets other tasks run (and signals the
#: replies so far) when the guest keeps the queue full.
_TURN_BUDGET = 256
#: ... on the hiprio queue: a burst of FORGETs (hundreds, when the guest
#: drops its caches) is served this many at a time, with the requests that
#: came meanwhile served between turns, as they would be by a thread of
#: their own (the C and Rust daemons serve hiprio on one).
_HIPRIO_TURN_BUDGET = 32
#: Replies answered inline (pop_serving) between notification decisions: a
#: driver that waits for a call gets the first replies while the daemon
#: answers the rest (GETATTR qd64 ran about twice as fast as with one call
#: per batch, and faster than with 32 or 64, in benchmarks/frontend_bench.py).
_SIGNAL_EVERY = 16
#: ... or after chains carrying this many bytes (request and reply): READs
#: and WRITEs (data copied in place) are signalled one by one, so that the
#: driver refills the queue while the next ones are copied. Frontend
#: benchmark, READ 4 KiB qd16, 3 runs: 16 replies per signal 758 MiB/s, 1
#: per signal ~1070; GETATTR and LOOKUP (under 200 bytes each way) still go
#: 16 at a time (one per reply halved GETATTR qd64).
_SIGNAL_BYTES = 4096


class _Done:
    """What a request driver yields when a request has completed: a private
    type, never a value an event loop's awaitables yield."""

    __slots__ = ("written",)

    def __init__(self) -> None:
        self.written = 0


@types.coroutine
def _request_driver(worker: "_QueueWorker", done: _Done) -> Generator[Any, Any, None]:
    """Serve the chains sent in, one after another: ``send(chain)`` returns
    ``done`` (``done.written`` set) when the request completed, or else the
    value the request yielded to the event loop (it suspended; drive the
    generator on with :func:`_resume`). A request that completes costs no
    StopIteration. A request's exception is logged and answered with 0 bytes
    (an empty used entry); a BaseException ends the driver."""
    handle = worker.conn.handler.handle_request
    chain = yield None
    while True:
        try:
            written = yield from handle(chain.readable, chain.writable)
        except Exception:
            log.exception("queue %d: request handler failed", worker.index)
            written = 0
        done.written = written
        chain = yield done


@types.coroutine
def _resume(driver: Generator[Any, Any, None], value: Any, ctx: contextvars.Context, done: _Done) -> Generator[Any, Any, int]:
    """Drive ``driver``, whose request suspended yielding ``value``, until
    that request completes, in the current task: ``yield from`` for a
    generator that already started. Every step runs in ``ctx``. Returns the
    request's ``written``."""
    while value is not done:
        try:
            sent = yield value
        except GeneratorExit:
            driver.close()
            raise
        except BaseException as exc:  # cancellation and the like: the request sees it
            value = ctx.run(driver.throw, exc)
        else:
            value = ctx.run(driver.send, sent)
    return done.written


class _QueueWorker:
    """Serves one started queue until it is stopped.

    Leader/follower: exactly one task at a time, the *leader*, waits for
    kicks, pops chains and runs each request inline, so a request that
    completes without suspending (inline metadata) costs no task, and the
    replies of a batch share one used-buffer notification. When a request
    suspends, its task stays with that request to its end and hands the
    leader role to a new task of the connection's group; the chains of the
    batch not started yet each get a task of their own (as before: a batch
    of reads offloaded to threads starts at once). So every request runs
    start to end in one task, and task-bound primitives (``asyncio.timeout``,
    trio cancel scopes, anything that records the current task) behave as
    with a task per request. Each request runs in its own copy of the
    contextvars context. No backend opt-in is needed.
    """

    def __init__(self, conn: "Connection", index: int, kick_fd: int, call_fd: int | None) -> None:
        self.conn = conn
        self.index = index
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.queue = conn.backend.queues[index]
        #: Chains popped and not yet completed (backlog included).
        self.in_flight = 0
        self.stopping = False
        self._idle: Event | None = None
        self._group: TaskGroup | None = None
        self._waiter: EventfdWaiter | None = None
        #: Popped chains no request has started on yet (the leader's).
        self._backlog: collections.deque[Any] = collections.deque()
        #: add_used happened since the last notification decision.
        self._unsignalled = False
        #: The leader's request driver (``_request_driver``) and its result
        #: slot; a driver whose request suspended leaves with its task.
        self._done = _Done()
        self._driver: Generator[Any, Any, None] | None = None
        #: The leader waits for a kick with nothing popped.
        self._parked = False
        #: Serves kicks while the leader waits (request queues; see run).
        self._kick: Any = None
        #: How long a kick waits for more to come before the pop (hiprio).
        self._coalesce = max(0.0, conn.device.hiprio_coalesce) if index == 0 else 0.0
        #: Chains served before other tasks and callbacks get a turn.
        self._turn_budget = _HIPRIO_TURN_BUDGET if index == 0 else _TURN_BUDGET

    async def run(self, group: TaskGroup) -> None:
        """Serve the queue until ``stop``: this task is the first leader;
        requests that suspend (and later leaders) run as tasks of ``group``."""
        if self.stopping:
            return
        self._group = group
        on_signal: Callable[[], bool] = self._hold_kicks
        if not self._coalesce:
            # Kicks are served by the queue's KickServer (compiled with the
            # compiled queue), armed while the leader waits.
            self._kick = self.queue.kick_server(
                self.conn.backend, self.conn.handler, self._turn_budget, _SIGNAL_BYTES, _SIGNAL_EVERY,
                -1 if self.call_fd is None else self.call_fd, self._kick_handoff,
            )
            on_signal = self._kick
        self._waiter = self.conn.runtime.eventfd_waiter(self.kick_fd, on_signal)
        await self._lead()

    def stop(self) -> None:
        """Stop taking chains from the ring, at once: the kick fd is no
        longer watched when this returns. Chains already popped (running or
        not yet started) are still served; see :meth:`wait_idle`."""
        self.stopping = True
        if self._kick is not None:
            self._kick.arm(False)
        if self._waiter is not None:
            self._waiter.close()

    async def wait_idle(self) -> None:
        """Return when every popped chain has been completed or abandoned."""
        if self.in_flight:
            if self._idle is None:
                self._idle = self.conn.runtime.event()
            await self._idle.wait()

    def _finished(self, count: int = 1) -> None:
        """``count`` chains left the worker (0: just check for idleness)."""
        self.in_flight -= count
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()
            self._idle = None

    async def _lead(self) -> None:
        """Hold the leader role until a request suspends (the role then
        passes to a new task, and this one finishes that request) or the
        queue stops."""
        queue = self.queue
        runtime = self.conn.runtime
        served = 0  # chains taken since this task last waited or yielded
        while True:
            if self._backlog and await self._serve_backlog():
                return  # now a follower that finished its request
            if self.stopping:
                return
            memory = self.conn.backend.memory
            if served >= self._turn_budget:
                # The guest keeps the queue full: let other tasks run.
                self._signal(memory)
                served = 0
                await runtime.sleep(0)
                continue
            try:
                queue.disable_notification(memory)
                served += self._pop_batch(memory, self._turn_budget - served)
                if self._backlog or self.stopping or queue.enable_notification(memory):
                    continue
            except VringError as exc:
                # The guest corrupted the available index after the last
                # pop, or the rings left mapped memory.
                log.warning("queue %d: %s", self.index, exc)
                self._broken()
                continue
            self._signal(memory)
            served = 0
            assert self._waiter is not None
            self._parked = True
            kick = self._kick
            if kick is not None:
                kick.arm(True)
            try:
                await self._waiter.wait()
            except ClosedResourceError:
                return  # stopped
            except OSError as exc:
                log.error("queue %d: kick fd unusable (%s); queue stopped", self.index, exc)
                self.stop()
                return
            finally:
                self._parked = False
                if kick is not None:
                    kick.arm(False)
            if self._coalesce and not self.stopping:
                await runtime.sleep(self._coalesce)  # let the rest of a burst come

    def _hold_kicks(self) -> bool:
        """A kick while the hiprio leader waits (a coalescing queue's
        ``on_signal``): kicks off until the leader, once woken, has waited
        ``_coalesce`` and popped; the leader wakes (False)."""
        if self._parked and not self.stopping:
            self.queue.disable_notification(self.conn.backend.memory)
        return False

    def set_call_fd(self, call_fd: int | None) -> None:
        """The frontend gave the queue a new call eventfd (SET_VRING_CALL
        while it runs): every later notification goes there, the
        KickServer's included (the old fd is closed after this returns)."""
        self.call_fd = call_fd
        if self._kick is not None:
            self._kick.notify_fd = -1 if call_fd is None else call_fd

    def _kick_handoff(self, chains: list[Any] | None, exc: VringError | None) -> None:
        """What the KickServer popped and could not answer: the chains for
        the full path go to the backlog, a malformed chain is returned (the
        leader, woken next, carries on from the queue's state)."""
        if chains:
            self.in_flight += len(chains)
            self._backlog.extend(chains)
        if exc is not None:
            self._malformed(self.conn.backend.memory, exc)

    def _broken(self) -> None:
        log.error("queue %d is broken; it stops until the frontend resets it", self.index)
        self.stop()

    def _malformed(self, memory: Any, exc: VringError) -> bool:
        """A pop met a malformed chain: return it with nothing written
        (True), or stop a queue whose rings are corrupt (False)."""
        head = exc.head  # type: ignore[attr-defined]
        log.warning("queue %d: malformed descriptor chain (head=%s): %s", self.index, head, exc)
        if head is None:
            self._broken()
            return False
        self.queue.add_used(memory, head, 0)
        self._unsignalled = True
        return True

    def _pop_batch(self, memory: Any, limit: int) -> int:
        """Move up to ``limit`` available chains into the backlog; return how
        many chains were taken (malformed ones, and those the handler's
        inline responder answers, are returned at once). VringError for a
        broken queue."""
        queue = self.queue
        handler = self.conn.handler
        taken = 0
        while taken < limit and not self.stopping:
            responder = getattr(handler, "inline_responder", None)
            answered = 0
            try:
                if responder is None:
                    chains = queue.pop_many(memory, limit - taken)
                else:
                    # Every _SIGNAL_EVERY replies or _SIGNAL_BYTES the queue
                    # itself decides and signals the call eventfd, and goes on;
                    # the last replies' decision is ours.
                    chains, answered = queue.pop_serving(
                        memory, limit - taken, responder, _SIGNAL_BYTES, _SIGNAL_EVERY,
                        -1 if self.call_fd is None else self.call_fd,
                    )
                    if answered:
                        self._unsignalled = True
                        self._signal(memory)
                        taken += answered
            except VringError as exc:
                if not self._malformed(memory, exc):
                    return taken
                taken += 1
                continue
            if not chains:
                if answered:
                    continue
                break
            self.in_flight += len(chains)
            self._backlog.extend(chains)
            taken += len(chains)
        return taken

    async def _serve_backlog(self) -> bool:
        """Run the backlog's requests inline, in order. Returns False when
        the backlog is empty (still the leader), True when one of them
        suspended and this task, no longer the leader, has finished it."""
        backlog = self._backlog
        driver = self._driver
        done = self._done
        if driver is None:
            done = self._done = _Done()
            driver = self._driver = _request_driver(self, done)
            driver.send(None)
        queue = self.queue
        memory = self.conn.backend.memory
        copy_context = contextvars.copy_context
        while backlog:
            chain = backlog.popleft()
            ctx = copy_context()
            try:
                value = ctx.run(driver.send, chain)
            except BaseException:
                # Not a request's own failure (e.g. KeyboardInterrupt): this
                # chain is abandoned, the queue goes on under a new leader.
                self._driver = None
                self._finished()
                self._hand_over()
                raise
            if value is done:
                try:
                    queue.add_used(memory, chain.head, done.written)
                    self._unsignalled = True
                except ProtocolError as exc:
                    log.warning("queue %d: cannot complete head %s: %s", self.index, chain.head, exc)
                self.in_flight -= 1
                continue
            # The request waits for something: it keeps this task (and the
            # driver), a new leader takes the rest.
            self._driver = None
            self._finished(0)
            self._hand_over()
            try:
                written = await _resume(driver, value, ctx, done)
            except BaseException:
                # Cancelled (the frontend left, or the daemon shuts down):
                # abandoned, not completed with an empty reply.
                self._finished()
                raise
            finally:
                driver.close()
            self._complete(chain, written)
            self._signal(self.conn.backend.memory)
            return True
        self._finished(0)
        return False

    def _hand_over(self) -> None:
        """A request suspended: signal the replies so far, start each chain
        still in the backlog in a task of its own (a batch whose requests
        suspend, like reads offloaded to threads, then starts them all at
        once, as one task per request would), and pass the leader role to
        a new task."""
        self._signal(self.conn.backend.memory)
        group = self._group
        assert group is not None
        backlog = self._backlog
        while backlog:
            group.start_soon(self._serve_one, backlog.popleft())
        if not self.stopping:
            group.start_soon(self._lead)

    async def _serve_one(self, chain: Any) -> None:
        """Serve ``chain`` in the current task (one started for it)."""
        written = 0
        try:
            try:
                written = await self.conn.handler.handle_request(chain.readable, chain.writable)
            except Exception:
                log.exception("queue %d: request handler failed", self.index)
        except BaseException:
            self._finished()  # cancelled: abandoned, not completed
            raise
        self._complete(chain, written)
        self._signal(self.conn.backend.memory)

    def _complete(self, chain: Any, written: int) -> None:
        """Return ``chain`` to the used ring (signalled later by the caller)."""
        try:
            self.queue.add_used(self.conn.backend.memory, chain.head, written)
            self._unsignalled = True
        except ProtocolError as exc:
            log.warning("queue %d: cannot complete head %s: %s", self.index, chain.head, exc)
        self._finished()

    def _signal(self, memory: Any) -> None:
        """One used-buffer notification decision for every add_used since
        the previous one (EVENT_IDX: whether ``used_event`` was crossed)."""
        if self._unsignalled:
            self._unsignalled = False
            if self.call_fd is not None:
                try:
                    if self.queue.needs_notification(memory):
                        signal_eventfd(self.call_fd)
                except ProtocolError as exc:
                    log.warning("queue %d: cannot signal: %s", self.index, exc)


class Connection:
    """One frontend connection: the vhost-user state and its queue workers."""

    def __init__(
        self,
        runtime: Runtime,
        sock: socket.socket,
        handler: RequestHandler,
        device: DeviceConfig,
    ) -> None:
        from .abi import virtio as virtio_abi
        from .abi import vhost_user as vu_abi

        self.runtime = runtime
        self.sock = sock
        self.handler = handler
        self.device = device
        num_queues = 1 + device.num_request_queues
        features = (
            (1 << virtio_abi.VIRTIO_F_VERSION_1)
            | (1 << virtio_abi.VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << virtio_abi.VIRTIO_RING_F_EVENT_IDX)
            | (1 << vu_abi.VHOST_USER_F_PROTOCOL_FEATURES)
        )
        protocol_features = (
            vu_abi.ProtocolFeature.MQ
            | vu_abi.ProtocolFeature.REPLY_ACK
            | vu_abi.ProtocolFeature.RESET_DEVICE
            | vu_abi.ProtocolFeature.CONFIGURE_MEM_SLOTS
        )
        self.backend = vhost_user.VhostUserBackend(
            num_queues=num_queues,
            queue_max_size=device.queue_max_size,
            device_features=features,
            protocol_features=int(protocol_features),
        )
        self.reader = vhost_user.MessageReader()
        self.workers: dict[int, _QueueWorker] = {}

    async def serve(self) -> None:
        """Run until the frontend disconnects or breaks the protocol."""
        async with self.runtime.task_group() as group:
            try:
                await self._message_loop(group)
            finally:
                # The frontend is gone: nobody will read the replies of the
                # requests still running, so cancel them rather than wait.
                for index in list(self.workers):
                    await self._stop_queue(index, drain=False)
                group.cancel()
        await self.handler.close()

    async def _message_loop(self, group: TaskGroup) -> None:
        while True:
            try:
                msg = self.reader.next_message()
            except VhostUserProtocolError as exc:
                log.error("corrupt vhost-user stream (%s); disconnecting the frontend", exc)
                return
            if msg is None:
                if not await self._receive():
                    log.info("frontend disconnected")
                    return
                continue
            try:
                result = self.backend.handle(msg)
            except VhostUserProtocolError as exc:
                name = _request_name(msg.request)
                log.error("vhost-user %s rejected: %s", name, exc)
                nack = self.backend.nack_reply(msg)
                if nack is None:
                    log.error("disconnecting the frontend after a protocol error")
                    return
                await self._send(nack)
                continue
            for event in result.events:
                await self._apply(event, group)
            for fd in result.close_fds:
                _close_quietly(fd)
            if result.reply is not None:
                await self._send(result.reply)

    async def _apply(self, event: object, group: TaskGroup) -> None:
        if isinstance(event, vhost_user.QueueStarted):
            await self._stop_queue(event.index)
            worker = _QueueWorker(self, event.index, event.kick_fd, event.call_fd)
            self.workers[event.index] = worker
            group.start_soon(worker.run, group)
            log.debug("queue %d started", event.index)
        elif isinstance(event, vhost_user.QueueStopped):
            await self._stop_queue(event.index)
            self._device_reset()
        elif isinstance(event, vhost_user.CallFdChanged):
            worker = self.workers.get(event.index)
            if worker is not None:
                worker.set_call_fd(event.call_fd)
        elif isinstance(event, vhost_user.Reset):
            for index in list(self.workers):
                await self._stop_queue(index)
            self._device_reset()

    def _device_reset(self) -> None:
        reset = getattr(self.handler, "device_reset", None)
        if reset is not None:
            reset()

    async def _stop_queue(self, index: int, drain: bool = True) -> None:
        worker = self.workers.pop(index, None)
        if worker is None:
            return
        worker.stop()
        if not drain:
            return
        # Requests already taken from the ring must be answered before the
        # frontend reads the ring's state (GET_VRING_BASE) or frees it.
        async with self.runtime.move_on_after(30):
            await worker.wait_idle()
        if worker.in_flight:
            log.error("queue %d stopped with %d requests still running", index, worker.in_flight)
        log.debug("queue %d stopped", index)

    async def _receive(self) -> bool:
        fds = array.array("i")
        while True:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(
                    _RECV_SIZE, socket.CMSG_SPACE(_MAX_FDS * fds.itemsize)
                )
                break
            except BlockingIOError:
                await self.runtime.wait_readable(self.sock.fileno())
            except ConnectionResetError:
                return False
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
        received = list(fds)
        if msg_flags & socket.MSG_CTRUNC:
            log.error("frontend sent more fds than a vhost-user message may carry")
            for fd in received:
                _close_quietly(fd)
            return False
        if not data:
            for fd in received:
                _close_quietly(fd)
            return False
        self.reader.feed(data, received)
        return True

    async def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self.sock.send(view)
            except BlockingIOError:
                await self.runtime.wait_writable(self.sock.fileno())
                continue
            except (BrokenPipeError, ConnectionResetError):
                return
            view = view[sent:]

    def close(self) -> None:
        """Release everything of this connection (fds, memory)."""
        self.reader.close()
        self.backend.close()


def _request_name(request: int) -> str:
    from .abi import vhost_user as vu_abi

    try:
        return vu_abi.FrontendRequest(request).name
    except ValueError:
        return f"request {request}"


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


HandlerFactory = Callable[[], RequestHandler]


class VhostUserServer:
    """Listens on a unix socket and serves one frontend at a time.

    ``once=True`` (virtiofsd's behaviour) returns after the first connection
    ends; otherwise it waits for the next one, each with fresh state.
    """

    def __init__(
        self,
        runtime: Runtime,
        handler_factory: HandlerFactory,
        *,
        socket_path: str | os.PathLike[str] | None = None,
        listen_fd: int | None = None,
        device: DeviceConfig | None = None,
        once: bool = False,
        socket_group: str | None = None,
    ) -> None:
        if (socket_path is None) == (listen_fd is None):
            raise ValueError("give exactly one of socket_path and listen_fd")
        self.runtime = runtime
        self.handler_factory = handler_factory
        self.socket_path = os.fspath(socket_path) if socket_path is not None else None
        self.listen_fd = listen_fd
        self.device = device or DeviceConfig()
        self.once = once
        self.socket_group = socket_group
        self.listener: socket.socket | None = None
        self.connections_served = 0
        self.ready = runtime.event()

    def bind(self) -> socket.socket:
        """Create (or adopt) the listening socket; idempotent."""
        if self.listener is not None:
            return self.listener
        if self.listen_fd is not None:
            sock = socket.socket(fileno=self.listen_fd)
            if sock.family != socket.AF_UNIX:
                raise OSError(errno.EINVAL, f"--fd {self.listen_fd} is not a unix socket")
        else:
            assert self.socket_path is not None
            try:
                if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                    os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.socket_path)
            if self.socket_group is not None:
                import grp

                gid = grp.getgrnam(self.socket_group).gr_gid
                os.chown(self.socket_path, -1, gid)
                os.chmod(self.socket_path, 0o660)
            sock.listen(1)
        sock.setblocking(False)
        self.listener = sock
        return sock

    async def serve(self) -> None:
        listener = self.bind()
        self.ready.set()
        log.info("waiting for a vhost-user frontend on %s", self.socket_path or f"fd {self.listen_fd}")
        try:
            while True:
                conn_sock = await self._accept(listener)
                conn_sock.setblocking(False)
                handler = self.handler_factory()
                conn = Connection(self.runtime, conn_sock, handler, self.device)
                log.info("frontend connected")
                try:
                    await conn.serve()
                except Exception:
                    # A bug, not the peer's fault (that is a ProtocolError,
                    # handled inside): drop this connection, keep listening.
                    log.exception("the connection failed; dropping it")
                finally:
                    conn.close()
                    conn_sock.close()
                    self.connections_served += 1
                if self.once:
                    return
        finally:
            self.close()

    async def _accept(self, listener: socket.socket) -> socket.socket:
        while True:
            try:
                sock, _ = listener.accept()
                return sock
            except BlockingIOError:
                await self.runtime.wait_readable(listener.fileno())

    def close(self) -> None:
        if self.listener is not None:
            try:
                self.runtime.notify_closing(self.listener.fileno())
            except Exception:
                pass
            self.listener.close()
            self.listener = None
            if self.socket_path is not None:
                try:
                    os.unlink(self.socket_path)
                except OSError:
                    pass


async def serve(
    runtime: Runtime,
    handler_factory: HandlerFactory,
    **kwargs: object,
) -> None:
    """Convenience: ``await VhostUserServer(runtime, handler_factory, **kwargs).serve()``."""
    await VhostUserServer(runtime, handler_factory, **kwargs).serve()  # type: ignore[arg-type]


__all__ = ["Connection", "DeviceConfig", "HIPRIO_COALESCE", "RequestHandler", "VhostUserServer", "serve", "Awaitable"]
