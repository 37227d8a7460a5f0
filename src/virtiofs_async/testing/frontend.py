"""A vhost-user-fs *frontend* in Python: QEMU plus the guest's virtio rings.

:class:`VhostUserFsFrontend` connects to a virtio-fs daemon's unix socket the
way QEMU 7.2's ``vhost-user-fs-pci`` does, hands it guest RAM (a memfd, shared
with SCM_RIGHTS), lays out split virtqueues in that RAM with
:class:`~virtiofs_async.testing.driver_queue.DriverQueue` and then moves
descriptor chains like the guest driver: :meth:`VhostUserFsFrontend.submit`
places one chain, kicks when the device asks for it and returns what the
device wrote. Any number of submissions may be in flight at once; they
complete in whatever order the device returns them.

Completion (no background task): a submitter waiting for its chain takes the
*reaper* role if nobody holds it, waits for a used-buffer notification (the
call eventfds, plus hang-up of the socket, through one epoll fd), drains every
used ring and completes the waiters by head; the other submitters sleep on a
shared wake-up event and take over the role when the reaper is done. So
nothing runs once no request is pending, the frontend needs no task group,
and it works under asyncio, uvloop and trio alike.

It is a test tool: it trusts its caller but checks what the device does
(used heads and lengths, vhost-user replies) and raises
:class:`FrontendError` (or :class:`VhostUserNack`) when the device misbehaves.

:func:`serve_in_background` runs a daemon in-process for such tests.
"""
from __future__ import annotations

import array
import contextlib
import mmap
import os
import select
import socket
import threading
from typing import Any, AsyncIterator, Callable, Sequence, Union

from ..abi import vhost_user as vu_abi
from ..abi.vhost_user import FrontendRequest as Req
from ..abi.vhost_user import ProtocolFeature as PF
from ..abi.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from ..errors import VirtioFsError
from ..runtime import ClosedResourceError, Runtime, current_runtime, signal_eventfd
from ..vhost_user import Message, MessageReader, VhostUserFrontend, encode_message, has_own_reply
from .driver_queue import DriverQueue, DriverQueueError, DriverQueueFull, Used

__all__ = [
    "DEFAULT_PROTOCOL_FEATURES",
    "FrontendError",
    "UVA_OFFSET",
    "VhostUserFsFrontend",
    "VhostUserNack",
    "serve_in_background",
]

Buffer = Union[bytes, bytearray, memoryview]

#: The frontend's "user address" of guest physical address 0 (plus a 4 GiB
#: step per extra region): the daemon must translate, never assume uva == gpa.
UVA_OFFSET = 0x7F00_0000_0000
_REGION_UVA_STEP = 1 << 32
#: Guest RAM starts here in guest-physical space (not at the memfd offset 0,
#: so a daemon that confuses guest addresses with file offsets fails).
GUEST_RAM_BASE = 0x4000_0000
#: Protocol features QEMU 7.2 acks for vhost-user-fs (when offered) that this
#: frontend implements.
DEFAULT_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.CONFIGURE_MEM_SLOTS | PF.RESET_DEVICE
_PROTOCOL_FEATURES_BIT = 1 << vu_abi.VHOST_USER_F_PROTOCOL_FEATURES
_HIPRIO_DATA = 1 << 20
_PAGE = 4096
_MAX_FDS = vu_abi.MAX_FDS_PER_MESSAGE
_FUSE_OUT_HEADER = 16

# A locked instruction (here: taking an uncontended lock) is a full memory
# barrier on x86; the driver needs one between publishing the available index
# and reading avail_event, and between writing used_event and re-reading the
# used index (store -> load ordering, which TSO alone does not give).
_fence_lock = threading.Lock()


def _fence() -> None:
    _fence_lock.acquire()
    _fence_lock.release()


def _align(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class FrontendError(VirtioFsError):
    """The device (daemon) misbehaved or went away, or the frontend is unusable
    (closed, stopped)."""


class VhostUserNack(FrontendError):
    """The back-end answered a REPLY_ACK request with a non-zero status."""

    def __init__(self, request: int, status: int) -> None:
        self.request = request
        self.status = status
        try:
            name = Req(request).name
        except ValueError:
            name = f"request {request}"
        super().__init__(f"vhost-user {name} failed (status {status})")


class _Pending:
    """One chain in flight: completed with ``used`` or failed with ``error``."""

    __slots__ = ("used", "error")

    def __init__(self) -> None:
        self.used: Used | None = None
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self.used is not None or self.error is not None


class _Queue:
    """One virtqueue as the driver sees it, plus its eventfds and waiters."""

    def __init__(self, index: int, ring_gpa: int, data_gpa: int, data_len: int) -> None:
        self.index = index
        self.ring_gpa = ring_gpa
        self.data_gpa = data_gpa
        self.data_len = data_len
        self.driver: DriverQueue | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.pending: dict[int, _Pending] = {}
        self.running = False


class VhostUserFsFrontend:
    """The driver side of a vhost-user-fs device, over one unix socket.

    Create it with :meth:`connect`; release it with :meth:`close` (or use it
    as an async context manager). Queue 0 is the hiprio queue, 1.. the
    request queues. Attributes after connecting: ``device_features`` /
    ``features`` (offered / acked virtio bits), ``offered_protocol_features``
    / ``protocol_features``, ``queue_num`` (GET_QUEUE_NUM, None without MQ),
    ``max_mem_slots``, ``regions`` (the memory table sent), ``memfd``
    (guest RAM, to send along hand-made memory messages), ``vu`` (a
    :class:`~virtiofs_async.vhost_user.VhostUserFrontend` message builder,
    for :meth:`request`) and ``sock``.
    """

    def __init__(
        self,
        runtime: Runtime,
        sock: socket.socket,
        *,
        memory_size: int,
        memory_regions: int,
        num_request_queues: int,
        queue_size: int,
        event_idx: bool,
        indirect: bool,
        protocol_features: int,
    ) -> None:
        if num_request_queues < 1:
            raise ValueError("num_request_queues must be at least 1")
        if memory_regions < 1 or memory_regions > vu_abi.VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError("memory_regions must be in 1..8")
        if memory_size % (_PAGE * memory_regions):
            raise ValueError("memory_size must be a multiple of 4 KiB per region")
        self.runtime = runtime
        self.sock = sock
        self.memory_size = memory_size
        self.num_request_queues = num_request_queues
        self.num_queues = 1 + num_request_queues
        self.queue_size = queue_size
        self.event_idx = event_idx
        self.indirect = indirect
        self.wanted_protocol_features = int(protocol_features)
        self.vu = VhostUserFrontend()
        self.reader = MessageReader()

        self.device_features = 0
        self.features = 0
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num: int | None = None
        self.max_mem_slots: int | None = None

        # Guest RAM: one memfd, mapped here in full; the daemon gets
        # ``memory_regions`` adjacent (in guest-physical space) regions of it.
        self.guest_base = GUEST_RAM_BASE
        region_size = memory_size // memory_regions
        #: (guest_phys_addr, size, user_addr, mmap_offset) of each region.
        self.regions: list[tuple[int, int, int, int]] = [
            (
                self.guest_base + i * region_size,
                region_size,
                UVA_OFFSET + self.guest_base + i * region_size + i * _REGION_UVA_STEP,
                i * region_size,
            )
            for i in range(memory_regions)
        ]
        self._memfd: int | None = None
        self._mmap: mmap.mmap | None = None
        self._mem: memoryview | None = None

        # Layout: the rings of every queue first (one 4 KiB-aligned slot
        # each), then the hiprio data area, then the request queues' areas.
        stride = _align(DriverQueue.ring_bytes(queue_size), _PAGE)
        rings_end = self.guest_base + stride * self.num_queues
        if rings_end - self.guest_base > region_size:
            raise ValueError("the rings do not fit in the first memory region")
        data_start = _align(rings_end, _PAGE)
        per_queue = ((self.guest_base + memory_size - data_start - _HIPRIO_DATA) // num_request_queues) // _PAGE * _PAGE
        if per_queue < 1 << 20:
            raise ValueError(f"memory_size {memory_size} leaves too little room for request data")
        self._queues: list[_Queue] = [_Queue(0, self.guest_base, data_start, _HIPRIO_DATA)]
        for i in range(1, self.num_queues):
            self._queues.append(
                _Queue(i, self.guest_base + stride * i, data_start + _HIPRIO_DATA + per_queue * (i - 1), per_queue)
            )

        self._epoll: select.epoll | None = None
        self._reaping = False
        self._wakeup = runtime.event()
        self._control_busy = False
        self._control_idle = runtime.event()
        self._control_idle.set()
        self._broken: BaseException | None = None
        self._closed = False
        self._stopped = True

    # -- construction ------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        socket_path: str | os.PathLike[str],
        *,
        runtime: Runtime | None = None,
        memory_size: int = 64 << 20,
        memory_regions: int = 1,
        num_request_queues: int = 1,
        queue_size: int = 128,
        event_idx: bool = True,
        indirect: bool = False,
        protocol_features: int = int(DEFAULT_PROTOCOL_FEATURES),
        connect_timeout: float = 5.0,
    ) -> VhostUserFsFrontend:
        """Connect to ``socket_path`` and start the device as QEMU does.

        ``memory_regions`` splits guest RAM into that many regions (adjacent
        in guest-physical space, scattered in user addresses), so buffers
        may cross regions. ``protocol_features`` is the most this frontend
        acks (intersected with what the back-end offers). The connection is
        retried for ``connect_timeout`` seconds while the socket does not
        exist or refuses (a daemon still starting). Raises FrontendError /
        VhostUserNack / ConnectionError when the daemon rejects the start.
        """
        runtime = runtime or current_runtime()
        sock = await _connect_unix(runtime, os.fspath(socket_path), connect_timeout)
        try:
            self = cls(
                runtime,
                sock,
                memory_size=memory_size,
                memory_regions=memory_regions,
                num_request_queues=num_request_queues,
                queue_size=queue_size,
                event_idx=event_idx,
                indirect=indirect,
                protocol_features=protocol_features,
            )
        except BaseException:
            sock.close()
            raise
        try:
            self._create_memory()
            self._epoll = select.epoll()
            self._epoll.register(sock.fileno(), select.EPOLLRDHUP)
            await self._handshake()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aenter__(self) -> VhostUserFsFrontend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _create_memory(self) -> None:
        fd = os.memfd_create("virtiofs-async-guest-ram", os.MFD_CLOEXEC)
        self._memfd = fd
        os.ftruncate(fd, self.memory_size)
        self._mmap = mmap.mmap(fd, self.memory_size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._mem = memoryview(self._mmap)

    # -- vhost-user messaging --------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK was negotiated (every setup message then asks for an ack)."""
        return bool(self.protocol_features & PF.REPLY_ACK)

    async def send_raw(self, data: Buffer, fds: Sequence[int] = ()) -> None:
        """Send ``data`` as is (one or more messages, or garbage), with
        ``fds`` attached to its first byte. The fds stay the caller's."""
        view = memoryview(data).cast("B")
        pending_fds = list(fds)
        if len(pending_fds) > _MAX_FDS:
            raise ValueError(f"at most {_MAX_FDS} fds per message")
        sock = self.sock
        while view or pending_fds:
            try:
                if pending_fds:
                    sent = sock.sendmsg(
                        [view], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", pending_fds))]
                    )
                    pending_fds = []
                else:
                    sent = sock.send(view)
            except BlockingIOError:
                await self.runtime.wait_writable(sock.fileno())
                continue
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ConnectionError(f"the vhost-user back-end closed the connection: {exc}") from exc
            view = view[sent:]

    async def receive_message(self) -> Message:
        """The next message from the back-end (its fds are the caller's).
        ConnectionError when the back-end closes the connection;
        VhostUserProtocolError when what it sends cannot be framed."""
        while True:
            msg = self.reader.next_message()
            if msg is not None:
                return msg
            sock = self.sock
            try:
                data, ancdata, msg_flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(_MAX_FDS * 4))
            except BlockingIOError:
                await self.runtime.wait_readable(sock.fileno())
                continue
            except ConnectionResetError:
                data, ancdata, msg_flags = b"", [], 0
            fds = array.array("i")
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
            if not data:
                for fd in fds:
                    os.close(fd)
                raise ConnectionError("the vhost-user back-end closed the connection")
            self.reader.feed(data, list(fds))

    async def wait_disconnected(self, timeout: float = 5.0) -> bool:
        """Read and discard whatever the back-end sends until it closes the
        connection; True if it did within ``timeout`` seconds."""
        closed = False
        async with self.runtime.move_on_after(timeout):
            try:
                while True:
                    msg = await self.receive_message()
                    for fd in msg.fds:
                        os.close(fd)
            except ConnectionError:
                closed = True
        return closed

    async def request(
        self, data: bytes, fds: Sequence[int] = (), *, reply: bool | None = None
    ) -> int | bytes | None:
        """Send one request message and, if it gets a reply, return its value
        (see ``VhostUserFrontend.parse_reply``). ``reply`` says whether to
        wait for one; by default: requests with their own reply, and
        NEED_REPLY ones when REPLY_ACK is negotiated. A REPLY_ACK status
        other than 0 raises :class:`VhostUserNack`."""
        request, flags, _size = vu_abi.HEADER.unpack_from(data)
        if reply is None:
            reply = has_own_reply(request) or bool(flags & vu_abi.FLAG_NEED_REPLY and self.reply_ack)
        await self.send_raw(data, fds)
        if not reply:
            return None
        msg = await self.receive_message()
        for fd in msg.fds:
            os.close(fd)
        value = self.vu.parse_reply(request, encode_message(msg.request, msg.payload, flags=msg.flags))
        if not has_own_reply(request) and value != 0:
            raise VhostUserNack(request, int(value))  # type: ignore[arg-type]
        return value

    async def _handshake(self) -> None:
        vu = self.vu
        ack = False  # NEED_REPLY only once REPLY_ACK is negotiated
        features = await self.request(vu.get_features())
        assert isinstance(features, int)
        self.device_features = features
        if features & _PROTOCOL_FEATURES_BIT:
            offered = await self.request(vu.get_protocol_features())
            assert isinstance(offered, int)
            self.offered_protocol_features = offered
            self.protocol_features = offered & self.wanted_protocol_features
            await self.request(vu.set_protocol_features(self.protocol_features))
            ack = self.reply_ack
            if self.protocol_features & PF.MQ:
                num = await self.request(vu.get_queue_num())
                assert isinstance(num, int)
                self.queue_num = num
                if num < self.num_queues:
                    raise FrontendError(f"the device has {num} queues, {self.num_queues} are needed")
            if self.protocol_features & PF.CONFIGURE_MEM_SLOTS:
                slots = await self.request(vu.get_max_mem_slots())
                assert isinstance(slots, int)
                self.max_mem_slots = slots
        elif self.num_request_queues > 1:
            raise FrontendError("multiple request queues need VHOST_USER_F_PROTOCOL_FEATURES (MQ)")
        await self.request(vu.set_owner(need_reply=ack))
        wanted = 1 << VIRTIO_F_VERSION_1
        if self.event_idx:
            wanted |= 1 << VIRTIO_RING_F_EVENT_IDX
        if self.indirect:
            wanted |= 1 << VIRTIO_RING_F_INDIRECT_DESC
        missing = wanted & ~features
        if missing:
            raise FrontendError(f"the device does not offer the virtio features {missing:#x}")
        self.features = wanted | (features & _PROTOCOL_FEATURES_BIT)
        await self._start()

    async def _start(self) -> None:
        """Driver start: features, memory table, then every queue."""
        vu = self.vu
        ack = self.reply_ack
        assert self._memfd is not None and self._mem is not None
        await self.request(vu.set_features(self.features, need_reply=ack))
        await self.request(vu.set_mem_table(self.regions, need_reply=ack), [self._memfd] * len(self.regions))
        for q in self._queues:
            if q.driver is not None:
                q.driver.mem.release()  # the rings of the previous start are gone
            q.driver = DriverQueue(
                self._mem,
                self.guest_base,
                self.queue_size,
                event_idx=self.event_idx,
                ring_gpa=q.ring_gpa,
                data_gpa=q.data_gpa,
                data_len=q.data_len,
            )
            self._close_queue_fds(q)
            q.kick_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            q.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            assert self._epoll is not None
            self._epoll.register(q.call_fd, select.EPOLLIN)
            drv = q.driver
            i = q.index
            await self.request(vu.set_vring_num(i, self.queue_size, need_reply=ack))
            await self.request(vu.set_vring_base(i, 0, need_reply=ack))
            await self.request(
                vu.set_vring_addr(
                    i, self.gpa_to_uva(drv.desc_gpa), self.gpa_to_uva(drv.used_gpa), self.gpa_to_uva(drv.avail_gpa),
                    need_reply=ack,
                )
            )
            await self.request(vu.set_vring_kick(i, need_reply=ack), [q.kick_fd])
            await self.request(vu.set_vring_call(i, need_reply=ack), [q.call_fd])
            await self.request(vu.set_vring_enable(i, True, need_reply=ack))
            q.running = True
        self._stopped = False

    async def replace_call_fd(self, queue: int) -> None:
        """Give running queue ``queue`` a new call eventfd (SET_VRING_CALL,
        as QEMU does when the guest sets up its interrupt vectors); the old
        one is closed, so a back-end that signals it is never heard."""
        q = self._queues[queue]
        assert self._epoll is not None and q.running
        old = q.call_fd
        q.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(q.call_fd, select.EPOLLIN)
        await self.request(self.vu.set_vring_call(queue, need_reply=self.reply_ack), [q.call_fd])
        if old is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(old)
            os.close(old)

    def gpa_to_uva(self, gpa: int) -> int:
        """The frontend user address of guest-physical ``gpa``."""
        for r_gpa, size, uva, _off in self.regions:
            if r_gpa <= gpa < r_gpa + size:
                return uva + gpa - r_gpa
        raise ValueError(f"guest address {gpa:#x} is not in guest RAM")

    # -- control: stop / restart / close ----------------------------------------------

    @contextlib.asynccontextmanager
    async def _control(self) -> AsyncIterator[None]:
        while self._control_busy:
            await self._control_idle.wait()
        self._control_busy = True
        self._control_idle = self.runtime.event()
        try:
            yield
        finally:
            self._control_busy = False
            self._control_idle.set()

    async def stop(self) -> list[int]:
        """Stop every queue as QEMU does at guest reset or VM stop
        (SET_VRING_ENABLE 0, then GET_VRING_BASE); returns the bases (the
        next available index of each queue, in queue order). Chains in
        flight are completed by the device first; new submissions raise
        FrontendError until :meth:`restart`."""
        self._check_open()
        async with self._control():
            self._stopped = True
            ack = self.reply_ack
            bases: list[int] = []
            for q in self._queues:
                if self.features & _PROTOCOL_FEATURES_BIT:
                    await self.request(self.vu.set_vring_enable(q.index, False, need_reply=ack))
                base = await self.request(self.vu.get_vring_base(q.index))
                assert isinstance(base, int)
                bases.append(base)
                q.running = False
            # Whatever the device completed before answering is collected now.
            self._drain_all()
            self._broadcast()
            return bases

    async def restart(self) -> None:
        """Start the device again as after a guest reboot: fresh (zeroed)
        rings from index 0, new kick/call eventfds, features and memory table
        sent again. Chains still in flight are failed with FrontendError."""
        self._check_open()
        async with self._control():
            if not self._stopped:
                raise FrontendError("restart() needs stop() first")
            self._fail_pending(FrontendError("the device was reset before the request completed"))
            await self._start()

    async def close(self) -> None:
        """Disconnect and free everything (socket, eventfds, guest RAM).
        Pending submissions fail with FrontendError. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._fail_pending(FrontendError("the frontend was closed"))
        if self._epoll is not None:
            with contextlib.suppress(Exception):
                self.runtime.notify_closing(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        with contextlib.suppress(Exception):
            self.runtime.notify_closing(self.sock.fileno())
        self.sock.close()
        self.reader.close()
        for q in self._queues:
            self._close_queue_fds(q)
            if q.driver is not None:
                q.driver.mem.release()
                q.driver = None
        if self._mem is not None:
            self._mem.release()
            self._mem = None
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a view escaped (DriverQueue.mem kept by a caller)
                pass
            self._mmap = None
        if self._memfd is not None:
            os.close(self._memfd)
            self._memfd = None
        self._broadcast()

    def _close_queue_fds(self, q: _Queue) -> None:
        if q.call_fd is not None:
            if self._epoll is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(q.call_fd)
            os.close(q.call_fd)
            q.call_fd = None
        if q.kick_fd is not None:
            os.close(q.kick_fd)
            q.kick_fd = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def memfd(self) -> int:
        """The memfd holding guest RAM (still owned by the frontend)."""
        if self._memfd is None:
            raise FrontendError("the frontend is closed")
        return self._memfd

    def _check_open(self) -> None:
        if self._closed:
            raise FrontendError("the frontend is closed")
        if self._broken is not None:
            raise FrontendError(f"the device is unusable: {self._broken}") from self._broken

    # -- the data path ------------------------------------------------------------

    def driver(self, queue: int) -> DriverQueue:
        """The :class:`DriverQueue` of ``queue`` (for building odd chains)."""
        drv = self._queues[queue].driver
        if drv is None:
            raise FrontendError(f"queue {queue} is not set up")
        return drv

    def kick_fd(self, queue: int) -> int | None:
        return self._queues[queue].kick_fd

    def call_fd(self, queue: int) -> int | None:
        return self._queues[queue].call_fd

    def in_flight(self, queue: int | None = None) -> int:
        """Chains submitted and not yet returned (on ``queue`` or on all)."""
        qs = self._queues if queue is None else [self._queues[queue]]
        return sum(len(q.pending) for q in qs)

    @staticmethod
    def _reply_layout(reply_size: int | Sequence[int]) -> list[int]:
        if not isinstance(reply_size, int):
            return [int(n) for n in reply_size]
        if reply_size < 0:
            raise ValueError("reply_size must be >= 0")
        if reply_size <= _FUSE_OUT_HEADER:
            return [reply_size] if reply_size else []
        # Like Linux: the fuse_out_header in a buffer of its own.
        return [_FUSE_OUT_HEADER, reply_size - _FUSE_OUT_HEADER]

    async def submit(
        self,
        parts: Sequence[Buffer],
        reply_size: int | Sequence[int],
        queue: int = 1,
        *,
        tamper: Callable[[DriverQueue, int], Any] | None = None,
    ) -> bytes:
        """Place one chain (``parts`` readable, one descriptor each, then room
        for ``reply_size`` bytes), kick if the device wants it, wait for the
        device to return it and give back the bytes it wrote (b"" if none).
        See :meth:`submit_chain`."""
        used = await self.submit_chain(parts, reply_size, queue, tamper=tamper)
        return b"".join(used.data)

    async def submit_chain(
        self,
        parts: Sequence[Buffer],
        reply_size: int | Sequence[int],
        queue: int = 1,
        *,
        tamper: Callable[[DriverQueue, int], Any] | None = None,
    ) -> Used:
        """Like :meth:`submit` but return the whole :class:`Used` entry.

        ``reply_size`` is a byte count (split like Linux does: a 16-byte
        header buffer, then the rest) or an explicit list of writable buffer
        lengths. With ``indirect=True`` at connect time the chain goes in an
        indirect table. When descriptors or data space run out, this waits
        for earlier chains to complete. ``tamper(driver_queue, head)`` runs
        after the chain is written and before it is published: tests use it
        to corrupt descriptors (the queue's bookkeeping still frees the
        chain when the device returns it). Cancelling the wait leaves the
        chain in flight; its completion is then dropped.
        """
        self._check_open()
        if not 0 <= queue < self.num_queues:
            raise ValueError(f"queue {queue} does not exist ({self.num_queues} queues)")
        q = self._queues[queue]
        writable = self._reply_layout(reply_size)
        while True:
            self._check_running(q)
            drv = q.driver
            assert drv is not None
            try:
                head = drv.add_chain(list(parts), writable, indirect=self.indirect)
                break
            except DriverQueueFull:
                if not q.pending:
                    raise
                await self._step()
        rec = _Pending()
        q.pending[head] = rec
        try:
            if tamper is not None:
                tamper(drv, head)
        finally:
            drv.publish()
            _fence()
            if drv.needs_kick():
                assert q.kick_fd is not None
                signal_eventfd(q.kick_fd)
        while not rec.done:
            await self._step()
        if rec.error is not None:
            raise rec.error
        assert rec.used is not None
        return rec.used

    def _check_running(self, q: _Queue) -> None:
        self._check_open()
        if self._stopped or not q.running or q.driver is None:
            raise FrontendError(f"queue {q.index} is stopped")

    async def _step(self) -> None:
        """Make progress once: as the reaper (wait for a notification and
        drain the used rings) or, when another task reaps, wait until it
        reports."""
        if self._reaping or self._closed:
            wake = self._wakeup
            if self._closed:
                return
            await wake.wait()
            return
        self._reaping = True
        try:
            await self._reap_once()
        finally:
            self._reaping = False
            self._broadcast()

    async def _reap_once(self) -> None:
        if self._drain_all():
            return
        epoll = self._epoll
        if epoll is None or self._closed:
            return
        try:
            await self.runtime.wait_readable(epoll.fileno())
        except ClosedResourceError:
            return
        if self._closed or self._epoll is None:
            return
        hung_up = False
        for fd, _events in self._epoll.poll(0):
            if fd == self.sock.fileno():
                hung_up = True
        for q in self._queues:
            if q.call_fd is not None:
                try:
                    os.eventfd_read(q.call_fd)
                except BlockingIOError:
                    pass
        self._drain_all()
        if hung_up:
            self._fail_pending(ConnectionError("the vhost-user back-end closed the connection"))
            self._broken = self._broken or ConnectionError("the vhost-user back-end closed the connection")

    def _drain_all(self) -> int:
        """Collect every used entry of every queue; returns how many."""
        count = 0
        for q in self._queues:
            drv = q.driver
            if drv is None:
                continue
            while True:
                while True:
                    try:
                        used = drv.pop_used()
                    except DriverQueueError as exc:
                        err = FrontendError(f"queue {q.index}: the device returned a bad used entry: {exc}")
                        self._broken = err
                        self._fail_pending(err)
                        return count
                    if used is None:
                        break
                    count += 1
                    rec = q.pending.pop(used.head, None)
                    if rec is not None:
                        rec.used = used
                # Re-arm the interrupt, then look again: an entry the device
                # added before it could see the re-arming gets no call.
                if drv.event_idx:
                    drv.set_used_event(drv.last_used)
                else:
                    drv.set_no_interrupt(False)
                _fence()
                if drv.used_idx() == drv.last_used:
                    break
        return count

    def _fail_pending(self, exc: BaseException) -> None:
        for q in self._queues:
            for rec in q.pending.values():
                if not rec.done:
                    rec.error = exc
            q.pending.clear()
        self._broadcast()

    def _broadcast(self) -> None:
        wake, self._wakeup = self._wakeup, self.runtime.event()
        wake.set()


async def _connect_unix(runtime: Runtime, path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    waited = 0.0
    delay = 0.01
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError, BlockingIOError, InterruptedError) as exc:
                if waited >= timeout:
                    raise ConnectionError(f"cannot connect to {path}: {exc}") from exc
            await runtime.sleep(delay)
            waited += delay
            delay = min(delay * 2, 0.1)
    except BaseException:
        sock.close()
        raise


@contextlib.asynccontextmanager
async def serve_in_background(
    operations: Any, socket_path: str | os.PathLike[str], *, runtime: Runtime | None = None, **server_kwargs: Any
) -> AsyncIterator[Any]:
    """Run ``make_server(operations, socket_path=..., **server_kwargs).serve()``
    in a task until the block ends (then it is cancelled); the block starts
    once the server listens. Yields the ``VhostUserServer``. If ``serve()``
    fails, the exception is raised when the block exits (or at once, if it
    fails before listening)."""
    from ..server import make_server

    runtime = runtime or current_runtime()
    server = make_server(operations, runtime=runtime, socket_path=socket_path, **server_kwargs)
    failure: list[BaseException] = []

    async def run() -> None:
        try:
            await server.serve()
        except Exception as exc:  # reported to the caller, not to the loop
            failure.append(exc)
        finally:
            server.ready.set()

    async with runtime.task_group() as group:
        group.start_soon(run)
        await server.ready.wait()
        if failure:
            raise failure[0]
        try:
            yield server
        finally:
            group.cancel()
    if failure:
        raise failure[0]
