"""The vhost-user transport: a unix socket, its fds, and the queue workers.

It moves bytes and fds between the socket and the sans-IO
:class:`~virtiofs_async.vhost_user.VhostUserBackend`, watches each running
queue's kick eventfd, pops descriptor chains and hands each one to a
:class:`RequestHandler` (the FUSE session) as a concurrent task, then returns
the chain to the used ring and signals the call eventfd when the guest wants
it. It knows nothing of FUSE or backends: only of ``RequestHandler``.

Ownership: the vhost-user handler owns guest memory, the queues and their
kick/call fds; it tells this layer which fds to stop watching (events) and
which to close (``close_fds``). This layer owns the sockets and a queue
worker's in-flight tasks; it never closes an fd it did not receive as
``close_fds`` or create itself.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import socket
import stat
from typing import Awaitable, Callable, Protocol, Sequence

import attrs

from . import vhost_user
from .errors import ProtocolError, VhostUserProtocolError, VringError
from .runtime import Runtime, TaskGroup, read_eventfd, signal_eventfd

log = logging.getLogger("virtiofs_async.transport")

#: vhost-user messages carry at most 8 fds (SET_MEM_TABLE).
_MAX_FDS = 8
_RECV_SIZE = 1 << 16


class RequestHandler(Protocol):
    """What serves the requests of one connection (a FuseSession)."""

    async def handle_request(self, readable: Sequence[memoryview], writable: Sequence[memoryview]) -> int:
        """Serve one chain; return the number of bytes written to ``writable``."""

    async def close(self) -> None:
        """The connection ended; no further request will come."""

    # Optional: ``device_reset()`` is called (if the handler has it) whenever
    # a queue is stopped or the device is reset, so a FUSE session may accept
    # the FUSE_INIT of a rebooted guest.


@attrs.define
class DeviceConfig:
    """What the vhost-user-fs device offers the frontend."""

    #: Request queues (the hiprio queue 0 comes on top of these).
    num_request_queues: int = 1
    queue_max_size: int = 1024


class _QueueWorker:
    """Serves one started queue until it is stopped."""

    def __init__(self, conn: "Connection", index: int, kick_fd: int, call_fd: int | None) -> None:
        self.conn = conn
        self.index = index
        self.kick_fd = kick_fd
        self.call_fd = call_fd
        self.queue = conn.backend.queues[index]
        self.in_flight = 0
        self.stopping = False
        self.idle = conn.runtime.event()
        self.idle.set()
        self.done = conn.runtime.event()
        self._own: TaskGroup | None = None

    async def run(self, group: TaskGroup) -> None:
        """Serve the queue until ``stop``; requests run as tasks of ``group``."""
        try:
            async with self.conn.runtime.task_group() as own:
                self._own = own
                own.start_soon(self._kick_loop, group)
        finally:
            self.done.set()

    def stop(self) -> None:
        """Stop taking chains from the ring; in-flight requests go on."""
        self.stopping = True
        if self._own is not None:
            self._own.cancel()

    async def _kick_loop(self, group: TaskGroup) -> None:
        runtime = self.conn.runtime
        queue = self.queue
        # Chains may already be waiting (a restarted queue): look before waiting.
        while not self.stopping:
            memory = self.conn.backend.memory
            while True:
                try:
                    queue.disable_notification(memory)
                    self._pop_all(group, memory)
                    if self.stopping or not queue.enable_notification(memory):
                        break
                except VringError as exc:
                    # The guest corrupted the available index after the last
                    # pop, or the rings left mapped memory: same as in _pop_all.
                    log.warning("queue %d: %s", self.index, exc)
                    log.error("queue %d is broken; it stops until the frontend resets it", self.index)
                    self.stopping = True
            if self.stopping:
                return
            try:
                await read_eventfd(runtime, self.kick_fd)
            except OSError as exc:
                log.error("queue %d: kick fd unusable (%s); queue stopped", self.index, exc)
                return

    def _pop_all(self, group: TaskGroup, memory: object) -> None:
        queue = self.queue
        while not self.stopping:
            try:
                chain = queue.pop(memory)
            except VringError as exc:
                head = exc.head
                log.warning("queue %d: malformed descriptor chain (head=%s): %s", self.index, head, exc)
                if head is None:
                    log.error("queue %d is broken; it stops until the frontend resets it", self.index)
                    self.stopping = True
                    return
                queue.add_used(memory, head, 0)
                self._notify(memory)
                continue
            if chain is None:
                return
            self.in_flight += 1
            if self.in_flight == 1:  # busy again: a fresh event for the next idle moment
                self.idle = self.conn.runtime.event()
            group.start_soon(self._serve, chain)

    async def _serve(self, chain: object) -> None:
        written = 0
        try:
            try:
                written = await self.conn.handler.handle_request(chain.readable, chain.writable)  # type: ignore[attr-defined]
            except Exception:
                log.exception("queue %d: request handler failed", self.index)
            # Only a request that ran to its end is returned to the guest: a
            # cancelled one (the frontend left, or the daemon shuts down) is
            # abandoned, not completed with an empty reply.
            memory = self.conn.backend.memory
            try:
                self.queue.add_used(memory, chain.head, written)  # type: ignore[attr-defined]
                self._notify(memory)
            except ProtocolError as exc:
                log.warning("queue %d: cannot complete head %s: %s", self.index, chain.head, exc)  # type: ignore[attr-defined]
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self.idle.set()

    def _notify(self, memory: object) -> None:
        if self.call_fd is not None and self.queue.needs_notification(memory):
            signal_eventfd(self.call_fd)


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
                worker.call_fd = event.call_fd
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
        await worker.done.wait()
        if not drain:
            return
        # Requests already taken from the ring must be answered before the
        # frontend reads the ring's state (GET_VRING_BASE) or frees it.
        async with self.runtime.move_on_after(30):
            await worker.idle.wait()
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


__all__ = ["Connection", "DeviceConfig", "RequestHandler", "VhostUserServer", "serve", "Awaitable"]
