"""The vhost-user protocol, sans-IO, both sides.

- :class:`MessageReader` frames a byte stream (plus the fds that came with it)
  into :class:`Message` objects.
- :class:`VhostUserBackend` is the device side: it takes one message at a time
  and returns a :class:`HandleResult` (reply bytes, events for the transport,
  fds to close). It owns the guest memory, the virtqueues and their fds.
- :class:`VhostUserFrontend` is the driver side (what QEMU does): it builds
  request bytes and checks replies, for tests that play QEMU.

Nothing here touches a socket or an event loop. Malformed input from the peer
raises :class:`~virtiofs_async.errors.VhostUserProtocolError` and nothing else.

What QEMU 7.2's vhost-user-fs-pci sends, for orientation:

- connect: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
  GET_QUEUE_NUM (MQ), GET_MAX_MEM_SLOTS (CONFIGURE_MEM_SLOTS),
  SET_BACKEND_REQ_FD (BACKEND_REQ), SET_OWNER, GET_FEATURES, then
  SET_VRING_CALL and SET_VRING_ERR per queue;
- driver start: SET_FEATURES, SET_MEM_TABLE (or ADD/REM_MEM_REG for the
  regions that changed), per queue SET_VRING_NUM, SET_VRING_BASE,
  SET_VRING_ADDR, SET_VRING_KICK, then SET_VRING_ENABLE 1 per queue and
  SET_VRING_CALL per queue (unmasking);
- driver stop (reset, reboot): SET_VRING_ENABLE 0 and GET_VRING_BASE per
  queue, maybe SET_VRING_CALL (masking); the next start repeats the start
  sequence (RESET_OWNER / RESET_DEVICE are handled too).

With REPLY_ACK negotiated QEMU sets NEED_REPLY on SET_MEM_TABLE, ADD/REM_MEM_REG,
SET_BACKEND_REQ_FD and (newer versions) SET_VRING_ENABLE.
"""
from __future__ import annotations

import collections
import os
import stat
from typing import Iterable, Sequence, Union

import attrs

from ._accel import VirtQueue
from .abi import vhost_user as abi
from .abi.virtio import (
    VIRTIO_F_RING_PACKED,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_ring_size,
)
from .abi.vhost_user import FrontendRequest as Req
from .abi.vhost_user import ProtocolFeature as PF
from .errors import VhostUserProtocolError, VringError
from .memory import GuestMemory

__all__ = [
    "CallFdChanged",
    "Event",
    "DEFAULT_PROTOCOL_FEATURES",
    "FeaturesChanged",
    "HandleResult",
    "IMPLEMENTED_PROTOCOL_FEATURES",
    "MemoryChanged",
    "Message",
    "MessageReader",
    "QueueStarted",
    "QueueStopped",
    "Reset",
    "VhostUserBackend",
    "VhostUserFrontend",
    "encode_message",
    "has_own_reply",
    "nack_reply",
    "parse_header",
]

_U64 = abi.U64
_STATE = abi.VRING_STATE
_ADDR = abi.VRING_ADDR
_REGION = abi.MEMORY_REGION
_MEM_HDR = abi.MEMORY_HEADER
_MEM_REG = abi.MEM_REG
_CONFIG_HDR = abi.CONFIG_HEADER
_NOFD = abi.VHOST_USER_VRING_NOFD_MASK
_IDX_MASK = abi.VHOST_USER_VRING_IDX_MASK
_REPLY_FLAGS = abi.VERSION | abi.FLAG_REPLY
_PROTOCOL_FEATURES_BIT = 1 << abi.VHOST_USER_F_PROTOCOL_FEATURES
_ADDR_LIMIT = 1 << 64

#: Protocol features this back-end implements (it may advertise any subset).
IMPLEMENTED_PROTOCOL_FEATURES = (
    PF.MQ | PF.REPLY_ACK | PF.BACKEND_REQ | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS | PF.STATUS
)
#: A sensible set for a virtio-fs device behind QEMU.
DEFAULT_PROTOCOL_FEATURES = PF.MQ | PF.REPLY_ACK | PF.RESET_DEVICE | PF.CONFIGURE_MEM_SLOTS

#: Requests whose reply is defined by the request itself (not REPLY_ACK).
_OWN_REPLY = frozenset(
    {
        Req.GET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.GET_VRING_BASE,
        Req.GET_QUEUE_NUM,
        Req.GET_MAX_MEM_SLOTS,
        Req.GET_CONFIG,
        Req.GET_STATUS,
        Req.GET_INFLIGHT_FD,
        Req.IOTLB_MSG,
        Req.POSTCOPY_ADVISE,
        Req.POSTCOPY_END,
        Req.CREATE_CRYPTO_SESSION,
        Req.GET_SHARED_OBJECT,
        Req.SET_DEVICE_STATE_FD,
        Req.CHECK_DEVICE_STATE,
    }
)
#: Of those, the ones whose reply is a u64 status (0 = success).
_STATUS_REPLY = frozenset({Req.IOTLB_MSG, Req.POSTCOPY_END, Req.CHECK_DEVICE_STATE})
#: Of those, the ones whose reply is a plain u64 value.
_U64_REPLY = frozenset(
    {
        Req.GET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.GET_QUEUE_NUM,
        Req.GET_MAX_MEM_SLOTS,
        Req.GET_STATUS,
        Req.SET_DEVICE_STATE_FD,
    }
)


def _name(request: int) -> str:
    try:
        return Req(request).name
    except ValueError:
        return f"request {request}"


def has_own_reply(request: int) -> bool:
    """Whether ``request`` is always answered (GET_FEATURES, GET_VRING_BASE...),
    independently of REPLY_ACK."""
    return request in _OWN_REPLY


def _check_region_fd(request: str, fd: int, offset: int, size: int) -> None:
    """A region must lie inside its file when the file has a size (regular
    files, memfd, hugetlbfs): touching a mapping past the end of the file
    raises SIGBUS, which would kill the daemon."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise VhostUserProtocolError(f"{request}: unusable memory fd: {exc}") from exc
    if stat.S_ISREG(st.st_mode) and offset + size > st.st_size:
        raise VhostUserProtocolError(
            f"{request}: region {offset:#x}+{size:#x} extends past the end of its file ({st.st_size:#x} bytes)"
        )


def _close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- messages and framing ------------------------------------------------------


@attrs.define
class Message:
    """One framed message. Whoever holds it owns ``fds`` (close or pass on)."""

    request: int
    flags: int
    payload: bytes
    fds: list[int] = attrs.field(factory=list)

    @property
    def need_reply(self) -> bool:
        """The NEED_REPLY flag (REPLY_ACK) is set."""
        return bool(self.flags & abi.FLAG_NEED_REPLY)

    @property
    def is_reply(self) -> bool:
        """The REPLY flag is set."""
        return bool(self.flags & abi.FLAG_REPLY)


def encode_message(request: int, payload: bytes = b"", *, flags: int = abi.VERSION) -> bytes:
    """Header + payload. ValueError for a payload over MAX_PAYLOAD_SIZE or
    out-of-range header fields (this is local input, not peer input)."""
    if len(payload) > abi.MAX_PAYLOAD_SIZE:
        raise ValueError(f"vhost-user payload of {len(payload)} bytes exceeds {abi.MAX_PAYLOAD_SIZE}")
    if not 0 <= request <= 0xFFFFFFFF or not 0 <= flags <= 0xFFFFFFFF:
        raise ValueError("vhost-user request and flags are 32-bit")
    return abi.HEADER.pack(request, flags, len(payload)) + bytes(payload)


def parse_header(data: bytes | bytearray | memoryview) -> tuple[int, int, int]:
    """``(request, flags, size)`` from the first 12 bytes of ``data``.

    VhostUserProtocolError if ``data`` is shorter than a header, the version
    is not 1, or ``size`` exceeds MAX_PAYLOAD_SIZE.
    """
    if len(data) < abi.HEADER_SIZE:
        raise VhostUserProtocolError(f"vhost-user header needs {abi.HEADER_SIZE} bytes, got {len(data)}")
    request, flags, size = abi.HEADER.unpack_from(data)
    if flags & abi.VERSION_MASK != abi.VERSION:
        raise VhostUserProtocolError(
            f"vhost-user {_name(request)}: unsupported protocol version {flags & abi.VERSION_MASK}"
        )
    if size > abi.MAX_PAYLOAD_SIZE:
        raise VhostUserProtocolError(
            f"vhost-user {_name(request)}: payload size {size} exceeds the maximum {abi.MAX_PAYLOAD_SIZE}"
        )
    return request, flags, size


class MessageReader:
    """Frames a vhost-user byte stream into :class:`Message` objects.

    Feed it exactly what each ``recvmsg`` returned: the bytes and the fds of
    that one call. Descriptors travel with the first bytes of the message
    that carries them, and Linux ends a stream ``recvmsg`` right after the
    segment that brought descriptors, so the fds of one call belong to the
    *last* message that starts within its bytes (with one message per call,
    or fed byte by byte, that is simply the message that starts there).

    Fds that arrive where no message starts, and a header with a bad version
    or an oversized payload, corrupt the stream: every fd the reader holds is
    closed, and :meth:`next_message` raises VhostUserProtocolError once the
    messages framed before the corruption are handed out (and keeps raising).
    ``feed`` itself never raises. The reader owns the fds it holds until
    :meth:`next_message` hands them out; :meth:`close` closes the rest.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._base = 0  # stream offset of _buf[0], always a message start
        self._fds: dict[int, list[int]] = {}  # message start offset -> its fds
        self._ready: collections.deque[Message] = collections.deque()
        self._error: VhostUserProtocolError | None = None
        self._closed = False

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> None:
        """Add what one ``recvmsg`` returned. Takes ownership of ``fds``."""
        fds = list(fds)
        if self._error is not None or self._closed:
            _close_fds(fds)
            return
        start = self._base + len(self._buf)
        self._buf += data
        end = start + len(data)
        if fds:
            owner = self._last_start(start, end)
            if owner is None:
                _close_fds(fds)
                self._fail(VhostUserProtocolError(f"{len(fds)} fds arrived in the middle of a message"))
                return
            self._fds[owner] = fds
        self._extract()

    def _last_start(self, start: int, end: int) -> int | None:
        """Stream offset of the last message that starts in [start, end)."""
        last = None
        pos = self._base
        buf = self._buf
        while pos < end:
            if pos >= start:
                last = pos
            rel = pos - self._base
            if rel + abi.HEADER_SIZE > len(buf):
                break
            size = abi.HEADER.unpack_from(buf, rel)[2]
            pos += abi.HEADER_SIZE + size
        return last

    def _extract(self) -> None:
        buf = self._buf
        while len(buf) >= abi.HEADER_SIZE:
            try:
                request, flags, size = parse_header(buf)
            except VhostUserProtocolError as exc:
                self._fail(exc)
                return
            total = abi.HEADER_SIZE + size
            if len(buf) < total:
                return
            payload = bytes(buf[abi.HEADER_SIZE : total])
            fds = self._fds.pop(self._base, [])
            del buf[:total]
            self._base += total
            self._ready.append(Message(request, flags, payload, fds))

    def _fail(self, exc: VhostUserProtocolError) -> None:
        self._error = exc
        for fds in self._fds.values():
            _close_fds(fds)
        self._fds.clear()
        self._buf.clear()

    def next_message(self) -> Message | None:
        """The next complete message (its fds now the caller's), None if
        more bytes are needed; VhostUserProtocolError if the stream is corrupt."""
        if self._ready:
            return self._ready.popleft()
        if self._error is not None:
            raise self._error
        return None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet framed into a message."""
        return len(self._buf)

    def close(self) -> None:
        """Close every fd still held (pending or in unclaimed messages)."""
        self._closed = True
        for msg in self._ready:
            _close_fds(msg.fds)
            msg.fds = []
        self._ready.clear()
        for fds in self._fds.values():
            _close_fds(fds)
        self._fds.clear()
        self._buf.clear()


def nack_reply(msg: Message) -> bytes | None:
    """The reply that reports failure of ``msg`` when the back-end rejected it,
    or None when there is no way to (the transport then disconnects).

    A failed request with NEED_REPLY gets a non-zero u64 (REPLY_ACK);
    GET_CONFIG gets an empty payload (its defined error reply); requests
    whose reply is a status get a non-zero status; other requests that
    expect a specific reply (GET_FEATURES, GET_VRING_BASE...) and requests
    without NEED_REPLY get nothing.
    """
    request = msg.request
    if request == Req.GET_CONFIG:
        return encode_message(request, b"", flags=_REPLY_FLAGS)
    if request in _STATUS_REPLY:
        return encode_message(request, _U64.pack(1), flags=_REPLY_FLAGS)
    if request == Req.SET_DEVICE_STATE_FD:
        return encode_message(request, _U64.pack(1 | _NOFD), flags=_REPLY_FLAGS)
    if request in _OWN_REPLY:
        return None
    if msg.need_reply:
        return encode_message(request, _U64.pack(1), flags=_REPLY_FLAGS)
    return None


# --- events -------------------------------------------------------------------


@attrs.frozen
class QueueStarted:
    """Queue ``index`` runs: watch ``kick_fd``, signal ``call_fd`` (None: no
    used-buffer notifications until a CallFdChanged). The fds stay owned by
    the back-end."""

    index: int
    kick_fd: int
    call_fd: int | None


@attrs.frozen
class QueueStopped:
    """Queue ``index`` stopped: stop watching its kick fd and finish (drain)
    its in-flight requests before acting on the rest of the result."""

    index: int


@attrs.frozen
class CallFdChanged:
    """Signal ``call_fd`` (None: nothing) for queue ``index`` from now on."""

    index: int
    call_fd: int | None


@attrs.frozen
class MemoryChanged:
    """The memory table changed (regions replaced, added or removed)."""


@attrs.frozen
class Reset:
    """RESET_OWNER / RESET_DEVICE: every queue is stopped, its fds are in
    ``close_fds``, the acked features are cleared (memory is kept)."""


@attrs.frozen
class FeaturesChanged:
    """SET_FEATURES acked ``features`` (virtio bits, plus bit 30)."""

    features: int


Event = Union[QueueStarted, QueueStopped, CallFdChanged, MemoryChanged, Reset, FeaturesChanged]


@attrs.define
class HandleResult:
    """What the transport does after :meth:`VhostUserBackend.handle`, in this
    order: act on ``events``, close ``close_fds``, send ``reply`` (if any)."""

    reply: bytes | None
    events: list = attrs.field(factory=list)
    close_fds: list[int] = attrs.field(factory=list)


# --- device side --------------------------------------------------------------


@attrs.define
class _Vring:
    """The front-end's configuration of one queue, as received."""

    num: int | None = None
    desc: int | None = None  # front-end user addresses
    avail: int | None = None
    used: int | None = None
    base: int = 0  # next avail index to start from
    kick_fd: int | None = None
    call_fd: int | None = None
    err_fd: int | None = None
    enabled: bool = False
    running: bool = False


class _Ctx:
    """Per-message bookkeeping: unconsumed message fds, events, fds to close."""

    __slots__ = ("fds", "events", "close_fds")

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.events: list = []
        self.close_fds: list[int] = []

    def take_fd(self) -> int:
        return self.fds.pop(0)


class _Failure:
    """A handler outcome: the request was well-formed but not carried out
    (REPLY_ACK answers it with a non-zero status)."""

    __slots__ = ()


_FAILED = _Failure()


class VhostUserBackend:
    """The device side of vhost-user for one connection.

    ``device_features`` are the virtio feature bits offered (bit 30,
    VHOST_USER_F_PROTOCOL_FEATURES, is always added); ``protocol_features``
    (a mask of :class:`~virtiofs_async.abi.vhost_user.ProtocolFeature`) must
    be a subset of IMPLEMENTED_PROTOCOL_FEATURES. ValueError for bad
    arguments (they are local configuration).

    Owns :attr:`memory`, the :attr:`queues` and every kick/call/err fd and
    the back-end channel fd; :meth:`close` releases them.
    """

    def __init__(
        self,
        *,
        num_queues: int,
        queue_max_size: int = 1024,
        device_features: int,
        protocol_features: int,
        max_mem_slots: int = 32,
    ) -> None:
        if not 1 <= num_queues <= _IDX_MASK + 1:
            raise ValueError(f"num_queues must be in 1..{_IDX_MASK + 1}, not {num_queues}")
        if not is_valid_queue_size(queue_max_size):
            raise ValueError(f"queue_max_size must be a power of two up to 32768, not {queue_max_size}")
        if device_features & (1 << VIRTIO_F_RING_PACKED):
            raise ValueError("packed virtqueues are not supported")
        if device_features & (1 << abi.VHOST_F_LOG_ALL):
            raise ValueError("dirty page logging (VHOST_F_LOG_ALL) is not supported")
        if not 0 <= device_features < _ADDR_LIMIT:
            raise ValueError("device_features is a 64-bit mask")
        protocol_features = int(protocol_features)
        unsupported = protocol_features & ~int(IMPLEMENTED_PROTOCOL_FEATURES)
        if protocol_features < 0 or unsupported:
            raise ValueError(f"protocol features {unsupported:#x} are not implemented")
        if not 1 <= max_mem_slots <= 4096:
            raise ValueError(f"max_mem_slots must be in 1..4096, not {max_mem_slots}")
        self.num_queues = num_queues
        self.queue_max_size = queue_max_size
        self.max_mem_slots = max_mem_slots
        #: Virtio features offered (GET_FEATURES).
        self.device_features = device_features | _PROTOCOL_FEATURES_BIT
        #: Protocol features offered (GET_PROTOCOL_FEATURES).
        self.offered_protocol_features = protocol_features
        #: Virtio features acked by SET_FEATURES (0 until then, and after a reset).
        self.features = 0
        #: Protocol features acked by SET_PROTOCOL_FEATURES.
        self.protocol_features = 0
        #: SET_OWNER was received.
        self.owner = False
        #: Device status (SET_STATUS / GET_STATUS, with the STATUS feature).
        self.status = 0
        #: Socket for back-end initiated requests (SET_BACKEND_REQ_FD), if any.
        self.backend_req_fd: int | None = None
        self.memory = GuestMemory()
        self.queues: list = [VirtQueue(queue_max_size) for _ in range(num_queues)]
        self._vrings = [_Vring() for _ in range(num_queues)]
        self._carry_events: list = []
        self._carry_close: list[int] = []
        self._closed = False

    # -- introspection ---------------------------------------------------------

    def kick_fd(self, index: int) -> int | None:
        return self._vrings[index].kick_fd

    def call_fd(self, index: int) -> int | None:
        return self._vrings[index].call_fd

    def err_fd(self, index: int) -> int | None:
        return self._vrings[index].err_fd

    def is_running(self, index: int) -> bool:
        """QueueStarted was reported for ``index`` and no QueueStopped since."""
        return self._vrings[index].running

    def is_enabled(self, index: int) -> bool:
        """The ring counts as enabled (SET_VRING_ENABLE 1, or implicitly when
        VHOST_USER_F_PROTOCOL_FEATURES is not acked)."""
        return self._enabled(self._vrings[index], self.features)

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK is negotiated."""
        return bool(self.protocol_features & PF.REPLY_ACK)

    # -- entry point -----------------------------------------------------------

    def handle(self, msg: Message) -> HandleResult:
        """Process one front-end message.

        Takes ownership of ``msg.fds`` at once (``msg.fds`` is emptied). A
        malformed, unsupported or out-of-sequence message raises
        VhostUserProtocolError after closing its fds and without changing
        any state (see :func:`nack_reply`); nothing else is raised. The one
        exception to "no state change": a SET_MEM_TABLE whose region the
        kernel refuses to map after the old table was dropped leaves no
        memory at all; its events (MemoryChanged, QueueStopped for running
        queues) then come first in the next result.
        """
        fds, msg.fds = list(msg.fds), []
        ctx = _Ctx(fds)
        try:
            if self._closed:
                raise VhostUserProtocolError("the back-end is closed")
            outcome = self._dispatch(msg, ctx)
        except BaseException:
            _close_fds(ctx.fds)
            # Only a failure half-way through replacing the memory table gets
            # here with events; they are delivered with the next result.
            self._carry_events.extend(ctx.events)
            self._carry_close.extend(ctx.close_fds)
            raise
        _close_fds(ctx.fds)
        if isinstance(outcome, bytes):
            reply: bytes | None = encode_message(msg.request, outcome, flags=_REPLY_FLAGS)
        elif msg.need_reply and self.reply_ack:
            status = 1 if outcome is _FAILED else 0
            reply = encode_message(msg.request, _U64.pack(status), flags=_REPLY_FLAGS)
        else:
            reply = None
        events, close = ctx.events, ctx.close_fds
        if self._carry_events or self._carry_close:
            events = self._carry_events + events
            close = self._carry_close + close
            self._carry_events, self._carry_close = [], []
        return HandleResult(reply, events, close)

    def nack_reply(self, msg: Message) -> bytes | None:
        """Like the module's :func:`nack_reply`, but a NEED_REPLY message only
        gets a NACK when REPLY_ACK is negotiated."""
        if msg.request not in _OWN_REPLY and not self.reply_ack:
            return None
        return nack_reply(msg)

    def close(self) -> None:
        """Close every fd this back-end owns and unmap guest memory. The
        transport must have stopped using the queues and fds."""
        if self._closed:
            return
        self._closed = True
        fds = list(self._carry_close)
        self._carry_close = []
        self._carry_events = []
        for vr in self._vrings:
            fds.extend(fd for fd in (vr.kick_fd, vr.call_fd, vr.err_fd) if fd is not None)
            vr.kick_fd = vr.call_fd = vr.err_fd = None
            vr.running = False
        if self.backend_req_fd is not None:
            fds.append(self.backend_req_fd)
            self.backend_req_fd = None
        _close_fds(fds)
        for q in self.queues:
            q.reset()
        self.memory.close()

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self, msg: Message, ctx: _Ctx) -> bytes | _Failure | None:
        request = msg.request
        flags = msg.flags
        if flags & abi.VERSION_MASK != abi.VERSION:
            raise VhostUserProtocolError(f"{_name(request)}: unsupported version {flags & abi.VERSION_MASK}")
        if flags & abi.FLAG_REPLY:
            raise VhostUserProtocolError(f"{_name(request)}: a request with the REPLY flag")
        if flags & ~abi.KNOWN_FLAGS:
            raise VhostUserProtocolError(f"{_name(request)}: unknown flags {flags & ~abi.KNOWN_FLAGS:#x}")
        if len(msg.payload) > abi.MAX_PAYLOAD_SIZE:
            raise VhostUserProtocolError(f"{_name(request)}: payload of {len(msg.payload)} bytes is too big")
        handler = self._HANDLERS.get(request)
        if handler is None:
            if request in Req.__members__.values():
                raise VhostUserProtocolError(f"{_name(request)} is not supported by this back-end")
            raise VhostUserProtocolError(f"unknown vhost-user request {request}")
        return handler(self, msg, ctx)

    # -- validation helpers --------------------------------------------------------

    @staticmethod
    def _size(msg: Message, size: int) -> None:
        if len(msg.payload) != size:
            raise VhostUserProtocolError(
                f"{_name(msg.request)}: payload is {len(msg.payload)} bytes, expected {size}"
            )

    @staticmethod
    def _fds(msg: Message, ctx: _Ctx, low: int, high: int | None = None) -> None:
        high = low if high is None else high
        n = len(ctx.fds)
        if not low <= n <= high:
            want = str(low) if low == high else f"{low} to {high}"
            if high == 0:
                raise VhostUserProtocolError(f"{_name(msg.request)} may not carry fds, got {n}")
            raise VhostUserProtocolError(f"{_name(msg.request)}: expected {want} fds, got {n}")

    def _plain(self, msg: Message, ctx: _Ctx, size: int) -> None:
        self._size(msg, size)
        self._fds(msg, ctx, 0)

    def _index(self, msg: Message, index: int) -> int:
        if index >= self.num_queues:
            raise VhostUserProtocolError(
                f"{_name(msg.request)}: vring index {index} out of range ({self.num_queues} queues)"
            )
        return index

    def _require(self, msg: Message, feature: PF) -> None:
        if not self.offered_protocol_features & feature:
            raise VhostUserProtocolError(
                f"{_name(msg.request)} needs protocol feature {feature.name}, which is not offered"
            )

    def _state(self, msg: Message, ctx: _Ctx) -> tuple[int, int]:
        self._plain(msg, ctx, _STATE.size)
        index, num = _STATE.unpack(msg.payload)
        return self._index(msg, index), num

    def _file(self, msg: Message, ctx: _Ctx) -> tuple[int, int | None]:
        """SET_VRING_KICK/CALL/ERR: (index, fd or None); takes the fd."""
        self._size(msg, _U64.size)
        (value,) = _U64.unpack(msg.payload)
        if value & ~(_IDX_MASK | _NOFD):
            raise VhostUserProtocolError(f"{_name(msg.request)}: unknown bits in {value:#x}")
        nofd = bool(value & _NOFD)
        self._fds(msg, ctx, 0 if nofd else 1)
        index = self._index(msg, value & _IDX_MASK)
        return index, (None if nofd else ctx.take_fd())

    # -- queue state machine -------------------------------------------------------

    @staticmethod
    def _enabled(vr: _Vring, features: int) -> bool:
        return vr.enabled or not features & _PROTOCOL_FEATURES_BIT

    def _startable(self, vr: _Vring, features: int) -> bool:
        return (
            vr.kick_fd is not None
            and vr.num is not None
            and vr.desc is not None
            and self._enabled(vr, features)
        )

    def _translate(self, index: int, num: int, desc: int, avail: int, used: int) -> tuple[int, int, int]:
        """Ring user addresses -> guest physical, validated as VirtQueue would.
        Pure (a scratch queue is configured); VhostUserProtocolError if bad."""
        memory = self.memory
        try:
            gpas = (
                memory.uva_to_gpa(desc, desc_table_size(num)),
                memory.uva_to_gpa(avail, avail_ring_size(num)),
                memory.uva_to_gpa(used, used_ring_size(num)),
            )
            scratch = VirtQueue(self.queue_max_size)
            scratch.set_size(num)
            scratch.set_addresses(memory, *gpas)
            scratch.reset()
        except VringError as exc:
            raise VhostUserProtocolError(f"vring {index}: bad ring addresses: {exc}") from exc
        return gpas

    def _plan(self, index: int, vr: _Vring) -> tuple[int, int, int]:
        assert vr.num is not None and vr.desc is not None and vr.avail is not None and vr.used is not None
        return self._translate(index, vr.num, vr.desc, vr.avail, vr.used)

    def _stop(self, ctx: _Ctx, index: int) -> None:
        vr = self._vrings[index]
        if vr.running:
            vr.running = False
            vr.base = self.queues[index].next_avail
            ctx.events.append(QueueStopped(index))

    def _start(self, ctx: _Ctx, index: int, gpas: tuple[int, int, int]) -> None:
        """Configure the VirtQueue and report it running. Never raises:
        ``gpas`` come from :meth:`_plan` against the same state."""
        vr = self._vrings[index]
        assert vr.num is not None and vr.kick_fd is not None and not vr.running
        q = self.queues[index]
        q.reset()
        q.event_idx = bool(self.features & (1 << VIRTIO_RING_F_EVENT_IDX))
        q.indirect = bool(self.features & (1 << VIRTIO_RING_F_INDIRECT_DESC))
        q.set_size(vr.num)
        q.next_avail = vr.base
        q.set_addresses(self.memory, *gpas)
        vr.running = True
        ctx.events.append(QueueStarted(index, vr.kick_fd, vr.call_fd))

    _RESTART_FIELDS = ("num", "desc", "avail", "used", "base", "kick_fd")

    def _update(self, ctx: _Ctx, index: int, **changes: object) -> None:
        """Change vring ``index``'s configuration: validated first (raises,
        nothing changed), then applied. A running queue whose rings, base or
        kick fd change, or that gets disabled, is stopped; the queue is
        (re)started when it can run and there is memory to run it in."""
        vr = self._vrings[index]
        new = attrs.evolve(vr, **changes)
        startable = self._startable(new, self.features)
        restart = vr.running and (
            not startable or any(getattr(vr, f) != getattr(new, f) for f in self._RESTART_FIELDS if f in changes)
        )
        plan = None
        if startable and self.memory.regions and (restart or not vr.running):
            plan = self._plan(index, new)  # may raise: nothing has changed yet
        # -- commit (nothing below raises) --
        if restart:
            self._stop(ctx, index)
        if "kick_fd" in changes and vr.kick_fd is not None and vr.kick_fd != new.kick_fd:
            ctx.close_fds.append(vr.kick_fd)
        for field, value in changes.items():
            setattr(vr, field, value)
        if plan is not None:
            self._start(ctx, index, plan)

    def _memory_changed(self, ctx: _Ctx) -> None:
        """After a memory change: stop running queues whose rings are no
        longer mapped, then start queues that can run now. Queues whose rings
        are not in memory keep waiting for another memory change or new
        addresses."""
        ctx.events.append(MemoryChanged())
        for index, vr in enumerate(self._vrings):
            if not vr.running:
                continue
            q = self.queues[index]
            try:
                self.memory.view(q.desc_gpa, desc_table_size(q.size))
                self.memory.view(q.avail_gpa, avail_ring_size(q.size))
                self.memory.view(q.used_gpa, used_ring_size(q.size))
            except (VringError, TypeError):
                self._stop(ctx, index)
        self._start_waiting(ctx)

    def _start_waiting(self, ctx: _Ctx) -> None:
        """After a memory change: start queues that were only waiting for it.
        Queues whose rings are still not in memory keep waiting."""
        for index, vr in enumerate(self._vrings):
            if vr.running:
                continue
            if not self._startable(vr, self.features) or not self.memory.regions:
                continue
            try:
                plan = self._plan(index, vr)
            except VhostUserProtocolError:
                continue
            self._start(ctx, index, plan)

    def _reset(self, ctx: _Ctx) -> None:
        for index, vr in enumerate(self._vrings):
            self._stop(ctx, index)
            ctx.close_fds.extend(fd for fd in (vr.kick_fd, vr.call_fd, vr.err_fd) if fd is not None)
            self._vrings[index] = _Vring()
        self.features = 0
        self.status = 0
        ctx.events.append(Reset())

    # -- handlers ------------------------------------------------------------------

    def _get_features(self, msg: Message, ctx: _Ctx) -> bytes:
        self._plain(msg, ctx, 0)
        return _U64.pack(self.device_features)

    def _set_features(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, _U64.size)
        (features,) = _U64.unpack(msg.payload)
        extra = features & ~self.device_features
        if extra:
            raise VhostUserProtocolError(f"SET_FEATURES acks features {extra:#x} that were not offered")
        plans: list[tuple[int, int, int] | None] = []
        for index, vr in enumerate(self._vrings):
            plan = None
            if not vr.running and self._startable(vr, features) and self.memory.regions:
                plan = self._plan(index, vr)  # may raise: nothing has changed yet
            plans.append(plan)
        # -- commit --
        self.features = features
        for index, vr in enumerate(self._vrings):
            if vr.running and not self._startable(vr, features):
                self._stop(ctx, index)
        ctx.events.append(FeaturesChanged(features))
        for index, plan in enumerate(plans):
            if plan is not None:
                self._start(ctx, index, plan)

    def _get_protocol_features(self, msg: Message, ctx: _Ctx) -> bytes:
        self._plain(msg, ctx, 0)
        return _U64.pack(self.offered_protocol_features)

    def _set_protocol_features(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, _U64.size)
        (features,) = _U64.unpack(msg.payload)
        extra = features & ~self.offered_protocol_features
        if extra:
            raise VhostUserProtocolError(f"SET_PROTOCOL_FEATURES acks {extra:#x}, which were not offered")
        self.protocol_features = features

    def _set_owner(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, 0)
        self.owner = True

    def _reset_owner(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, 0)
        self._reset(ctx)

    def _reset_device(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, 0)
        self._reset(ctx)

    def _set_mem_table(self, msg: Message, ctx: _Ctx) -> None:
        payload = msg.payload
        if len(payload) < _MEM_HDR.size:
            raise VhostUserProtocolError(f"SET_MEM_TABLE: payload of {len(payload)} bytes has no header")
        nregions, _padding = _MEM_HDR.unpack_from(payload)
        if nregions > abi.VHOST_MEMORY_BASELINE_NREGIONS:
            raise VhostUserProtocolError(
                f"SET_MEM_TABLE: {nregions} regions, at most {abi.VHOST_MEMORY_BASELINE_NREGIONS}"
            )
        full = _MEM_HDR.size + _REGION.size * abi.VHOST_MEMORY_BASELINE_NREGIONS
        exact = _MEM_HDR.size + _REGION.size * nregions
        if len(payload) not in (exact, full):
            raise VhostUserProtocolError(
                f"SET_MEM_TABLE: payload is {len(payload)} bytes, expected {exact} for {nregions} regions"
            )
        self._fds(msg, ctx, nregions)
        regions = [_REGION.unpack_from(payload, _MEM_HDR.size + i * _REGION.size) for i in range(nregions)]
        spans = []
        for gpa, size, uva, offset in regions:
            if size == 0 or gpa + size > _ADDR_LIMIT or uva + size > _ADDR_LIMIT or offset + size > 1 << 63:
                raise VhostUserProtocolError(
                    f"SET_MEM_TABLE: invalid region gpa={gpa:#x} size={size:#x} uva={uva:#x} offset={offset:#x}"
                )
            spans.append((gpa, gpa + size))
        for fd, (_gpa, size, _uva, offset) in zip(ctx.fds, regions):
            _check_region_fd("SET_MEM_TABLE", fd, offset, size)
        spans.sort()
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise VhostUserProtocolError("SET_MEM_TABLE: regions overlap in guest physical space")
        # -- commit: queues whose rings stay mapped keep running (VirtQueue
        # looks its views up again when the memory generation changes) --
        fds = [ctx.take_fd() for _ in range(nregions)]
        self.memory.clear()
        for i, (gpa, size, uva, offset) in enumerate(regions):
            try:
                self.memory.add_region(fds[i], gpa, size, uva, offset)
            except VhostUserProtocolError:
                _close_fds(fds[i + 1 :])
                self.memory.clear()
                self._memory_changed(ctx)  # delivered with the next result
                raise
        self._memory_changed(ctx)

    def _get_max_mem_slots(self, msg: Message, ctx: _Ctx) -> bytes:
        self._require(msg, PF.CONFIGURE_MEM_SLOTS)
        self._plain(msg, ctx, 0)
        return _U64.pack(self.max_mem_slots)

    def _mem_reg(self, msg: Message) -> tuple[int, int, int, int]:
        self._size(msg, _MEM_REG.size)
        _padding, gpa, size, uva, offset = _MEM_REG.unpack(msg.payload)
        return gpa, size, uva, offset

    def _add_mem_reg(self, msg: Message, ctx: _Ctx) -> None:
        self._require(msg, PF.CONFIGURE_MEM_SLOTS)
        gpa, size, uva, offset = self._mem_reg(msg)
        self._fds(msg, ctx, 1)
        if len(self.memory.regions) >= self.max_mem_slots:
            raise VhostUserProtocolError(f"ADD_MEM_REG: all {self.max_mem_slots} memory slots are in use")
        _check_region_fd("ADD_MEM_REG", ctx.fds[0], offset, size)
        self.memory.add_region(ctx.take_fd(), gpa, size, uva, offset)  # closes the fd even on failure
        self._memory_changed(ctx)

    def _rem_mem_reg(self, msg: Message, ctx: _Ctx) -> None:
        self._require(msg, PF.CONFIGURE_MEM_SLOTS)
        gpa, size, uva, _offset = self._mem_reg(msg)
        # The spec lets a back-end accept (and close, unused) one fd: older
        # QEMU sent the region's fd along.
        self._fds(msg, ctx, 0, 1)
        for region in self.memory.regions:
            if region.guest_phys_addr == gpa and region.size == size and region.user_addr == uva:
                break
        else:
            raise VhostUserProtocolError(
                f"REM_MEM_REG: no region gpa={gpa:#x} size={size:#x} uva={uva:#x}"
            )
        self.memory.remove_region(gpa, size)
        self._memory_changed(ctx)

    def _set_vring_num(self, msg: Message, ctx: _Ctx) -> None:
        index, num = self._state(msg, ctx)
        if not is_valid_queue_size(num) or num > self.queue_max_size:
            raise VhostUserProtocolError(
                f"SET_VRING_NUM: size {num} of vring {index} is not a power of two in 1..{self.queue_max_size}"
            )
        self._update(ctx, index, num=num)

    def _set_vring_addr(self, msg: Message, ctx: _Ctx) -> None:
        self._plain(msg, ctx, _ADDR.size)
        index, flags, desc, used, avail, _log = _ADDR.unpack(msg.payload)
        index = self._index(msg, index)
        if flags & (1 << abi.VHOST_VRING_F_LOG):
            raise VhostUserProtocolError(f"SET_VRING_ADDR: vring {index} asks for logging, which is not supported")
        if flags:
            raise VhostUserProtocolError(f"SET_VRING_ADDR: unknown flags {flags:#x}")
        num = self._vrings[index].num
        if num is not None and self.memory.regions:
            self._translate(index, num, desc, avail, used)
        self._update(ctx, index, desc=desc, avail=avail, used=used)

    def _set_vring_base(self, msg: Message, ctx: _Ctx) -> None:
        index, num = self._state(msg, ctx)
        if num > 0xFFFF:
            raise VhostUserProtocolError(f"SET_VRING_BASE: base {num:#x} of vring {index} is not a 16-bit index")
        self._update(ctx, index, base=num)

    def _get_vring_base(self, msg: Message, ctx: _Ctx) -> bytes:
        index, _num = self._state(msg, ctx)
        vr = self._vrings[index]
        self._stop(ctx, index)
        if vr.kick_fd is not None:
            ctx.close_fds.append(vr.kick_fd)
            vr.kick_fd = None
        return _STATE.pack(index, vr.base)

    def _set_vring_kick(self, msg: Message, ctx: _Ctx) -> None:
        index, fd = self._file(msg, ctx)
        try:
            self._update(ctx, index, kick_fd=fd)
        except BaseException:
            if fd is not None:
                ctx.fds.append(fd)  # closed by handle()
            raise

    def _set_vring_call(self, msg: Message, ctx: _Ctx) -> None:
        index, fd = self._file(msg, ctx)
        vr = self._vrings[index]
        old, vr.call_fd = vr.call_fd, fd
        ctx.events.append(CallFdChanged(index, fd))
        if old is not None:
            ctx.close_fds.append(old)

    def _set_vring_err(self, msg: Message, ctx: _Ctx) -> None:
        index, fd = self._file(msg, ctx)
        vr = self._vrings[index]
        old, vr.err_fd = vr.err_fd, fd
        if old is not None:
            ctx.close_fds.append(old)

    def _get_queue_num(self, msg: Message, ctx: _Ctx) -> bytes:
        self._plain(msg, ctx, 0)
        return _U64.pack(self.num_queues)

    def _set_vring_enable(self, msg: Message, ctx: _Ctx) -> None:
        index, num = self._state(msg, ctx)
        if num > 1:
            raise VhostUserProtocolError(f"SET_VRING_ENABLE: vring {index} state {num} is neither 0 nor 1")
        self._update(ctx, index, enabled=bool(num))

    def _set_backend_req_fd(self, msg: Message, ctx: _Ctx) -> None:
        self._size(msg, 0)
        self._fds(msg, ctx, 1)
        if not self.offered_protocol_features & PF.BACKEND_REQ:
            return None  # not offered: the fd is closed unused
        old, self.backend_req_fd = self.backend_req_fd, ctx.take_fd()
        if old is not None:
            ctx.close_fds.append(old)
        return None

    def _config(self, msg: Message, ctx: _Ctx) -> tuple[int, int, int]:
        self._fds(msg, ctx, 0)
        if len(msg.payload) < _CONFIG_HDR.size:
            raise VhostUserProtocolError(f"{_name(msg.request)}: payload of {len(msg.payload)} bytes has no header")
        offset, size, flags = _CONFIG_HDR.unpack_from(msg.payload)
        if size > abi.VHOST_USER_MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"{_name(msg.request)}: config size {size} exceeds 256")
        self._size(msg, _CONFIG_HDR.size + size)
        return offset, size, flags

    def _get_config(self, msg: Message, ctx: _Ctx) -> bytes:
        self._config(msg, ctx)
        return b""  # an empty payload is the defined error reply: no config space

    def _set_config(self, msg: Message, ctx: _Ctx) -> _Failure:
        self._config(msg, ctx)
        return _FAILED  # no writable config space

    def _set_status(self, msg: Message, ctx: _Ctx) -> None:
        self._require(msg, PF.STATUS)
        self._plain(msg, ctx, _U64.size)
        (status,) = _U64.unpack(msg.payload)
        if status > 0xFF:
            raise VhostUserProtocolError(f"SET_STATUS: status {status:#x} is not a byte")
        self.status = status

    def _get_status(self, msg: Message, ctx: _Ctx) -> bytes:
        self._require(msg, PF.STATUS)
        self._plain(msg, ctx, 0)
        return _U64.pack(self.status)

    _HANDLERS = {
        Req.GET_FEATURES: _get_features,
        Req.SET_FEATURES: _set_features,
        Req.GET_PROTOCOL_FEATURES: _get_protocol_features,
        Req.SET_PROTOCOL_FEATURES: _set_protocol_features,
        Req.SET_OWNER: _set_owner,
        Req.RESET_OWNER: _reset_owner,
        Req.RESET_DEVICE: _reset_device,
        Req.SET_MEM_TABLE: _set_mem_table,
        Req.GET_MAX_MEM_SLOTS: _get_max_mem_slots,
        Req.ADD_MEM_REG: _add_mem_reg,
        Req.REM_MEM_REG: _rem_mem_reg,
        Req.SET_VRING_NUM: _set_vring_num,
        Req.SET_VRING_ADDR: _set_vring_addr,
        Req.SET_VRING_BASE: _set_vring_base,
        Req.GET_VRING_BASE: _get_vring_base,
        Req.SET_VRING_KICK: _set_vring_kick,
        Req.SET_VRING_CALL: _set_vring_call,
        Req.SET_VRING_ERR: _set_vring_err,
        Req.GET_QUEUE_NUM: _get_queue_num,
        Req.SET_VRING_ENABLE: _set_vring_enable,
        Req.SET_BACKEND_REQ_FD: _set_backend_req_fd,
        Req.GET_CONFIG: _get_config,
        Req.SET_CONFIG: _set_config,
        Req.SET_STATUS: _set_status,
        Req.GET_STATUS: _get_status,
    }
    # Not handled (VhostUserProtocolError "not supported"): SET_LOG_BASE and
    # SET_LOG_FD (LOG_SHMFD is not offered), GET/SET_INFLIGHT_FD
    # (INFLIGHT_SHMFD is not offered), and the net, crypto, IOTLB, postcopy,
    # GPU, in-band notification, shared object and device state requests.


# --- driver side --------------------------------------------------------------


class VhostUserFrontend:
    """Builds front-end requests and checks replies, like QEMU would (sans-IO).

    Each builder returns the message bytes; the caller sends them together
    with the fds the message needs (one per region for SET_MEM_TABLE, one
    for ADD_MEM_REG, SET_BACKEND_REQ_FD and SET_VRING_KICK/CALL/ERR unless
    ``has_fd`` is False). ``need_reply=True`` sets NEED_REPLY (REPLY_ACK).
    Builders raise ValueError for arguments that do not fit the wire format.
    """

    @staticmethod
    def _msg(request: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
        flags = abi.VERSION | (abi.FLAG_NEED_REPLY if need_reply else 0)
        return encode_message(request, payload, flags=flags)

    @staticmethod
    def _pack(st, *values: int) -> bytes:  # type: ignore[no-untyped-def]
        try:
            return st.pack(*values)
        except Exception as exc:  # struct.error, OverflowError
            raise ValueError(f"value out of range for the vhost-user payload: {values}") from exc

    def request(self, request: int, payload: bytes = b"", *, need_reply: bool = False) -> bytes:
        """Any request with a raw payload."""
        return self._msg(request, payload, need_reply)

    def get_features(self) -> bytes:
        return self._msg(Req.GET_FEATURES)

    def set_features(self, features: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_FEATURES, self._pack(_U64, features), need_reply)

    def get_protocol_features(self) -> bytes:
        return self._msg(Req.GET_PROTOCOL_FEATURES)

    def set_protocol_features(self, features: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_PROTOCOL_FEATURES, self._pack(_U64, int(features)), need_reply)

    def set_owner(self, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_OWNER, b"", need_reply)

    def reset_owner(self, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.RESET_OWNER, b"", need_reply)

    def reset_device(self, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.RESET_DEVICE, b"", need_reply)

    def set_mem_table(self, regions: Sequence[tuple[int, int, int, int]], *, need_reply: bool = False) -> bytes:
        """``regions``: (guest_phys_addr, size, user_addr, mmap_offset), at most 8."""
        if len(regions) > abi.VHOST_MEMORY_BASELINE_NREGIONS:
            raise ValueError(f"SET_MEM_TABLE carries at most {abi.VHOST_MEMORY_BASELINE_NREGIONS} regions")
        payload = _MEM_HDR.pack(len(regions), 0) + b"".join(self._pack(_REGION, *r) for r in regions)
        return self._msg(Req.SET_MEM_TABLE, payload, need_reply)

    def get_max_mem_slots(self) -> bytes:
        return self._msg(Req.GET_MAX_MEM_SLOTS)

    def add_mem_reg(
        self, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int, *, need_reply: bool = False
    ) -> bytes:
        payload = self._pack(_MEM_REG, 0, guest_phys_addr, size, user_addr, mmap_offset)
        return self._msg(Req.ADD_MEM_REG, payload, need_reply)

    def rem_mem_reg(
        self, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int = 0, *, need_reply: bool = False
    ) -> bytes:
        payload = self._pack(_MEM_REG, 0, guest_phys_addr, size, user_addr, mmap_offset)
        return self._msg(Req.REM_MEM_REG, payload, need_reply)

    def set_vring_num(self, index: int, num: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_VRING_NUM, self._pack(_STATE, index, num), need_reply)

    def set_vring_addr(
        self,
        index: int,
        desc_uva: int,
        used_uva: int,
        avail_uva: int,
        log: int = 0,
        flags: int = 0,
        *,
        need_reply: bool = False,
    ) -> bytes:
        payload = self._pack(_ADDR, index, flags, desc_uva, used_uva, avail_uva, log)
        return self._msg(Req.SET_VRING_ADDR, payload, need_reply)

    def set_vring_base(self, index: int, num: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_VRING_BASE, self._pack(_STATE, index, num), need_reply)

    def get_vring_base(self, index: int) -> bytes:
        return self._msg(Req.GET_VRING_BASE, self._pack(_STATE, index, 0))

    def _vring_file(self, request: int, index: int, has_fd: bool, need_reply: bool) -> bytes:
        if not 0 <= index <= _IDX_MASK:
            raise ValueError(f"vring index {index} does not fit 8 bits")
        value = index if has_fd else index | _NOFD
        return self._msg(request, _U64.pack(value), need_reply)

    def set_vring_kick(self, index: int, has_fd: bool = True, *, need_reply: bool = False) -> bytes:
        return self._vring_file(Req.SET_VRING_KICK, index, has_fd, need_reply)

    def set_vring_call(self, index: int, has_fd: bool = True, *, need_reply: bool = False) -> bytes:
        return self._vring_file(Req.SET_VRING_CALL, index, has_fd, need_reply)

    def set_vring_err(self, index: int, has_fd: bool = True, *, need_reply: bool = False) -> bytes:
        return self._vring_file(Req.SET_VRING_ERR, index, has_fd, need_reply)

    def set_vring_enable(self, index: int, on: bool, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_VRING_ENABLE, self._pack(_STATE, index, 1 if on else 0), need_reply)

    def get_queue_num(self) -> bytes:
        return self._msg(Req.GET_QUEUE_NUM)

    def set_backend_req_fd(self, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_BACKEND_REQ_FD, b"", need_reply)

    def get_config(self, offset: int, size: int, flags: int = 0) -> bytes:
        payload = self._pack(_CONFIG_HDR, offset, size, flags) + bytes(size)
        return self._msg(Req.GET_CONFIG, payload)

    def set_config(self, offset: int, data: bytes, flags: int = 0, *, need_reply: bool = False) -> bytes:
        payload = self._pack(_CONFIG_HDR, offset, len(data), flags) + bytes(data)
        return self._msg(Req.SET_CONFIG, payload, need_reply)

    def set_status(self, status: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_STATUS, self._pack(_U64, status), need_reply)

    def get_status(self) -> bytes:
        return self._msg(Req.GET_STATUS)

    def set_log_base(self, mmap_size: int, mmap_offset: int, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_LOG_BASE, self._pack(abi.LOG, mmap_size, mmap_offset), need_reply)

    def set_log_fd(self, *, need_reply: bool = False) -> bytes:
        return self._msg(Req.SET_LOG_FD, b"", need_reply)

    @staticmethod
    def expects_reply(data: bytes | bytearray | memoryview) -> bool:
        """Whether the back-end answers the request in ``data`` (its own
        reply, or NEED_REPLY set; NEED_REPLY is only honoured once REPLY_ACK
        is negotiated, which the caller knows)."""
        request, flags, _size = abi.HEADER.unpack_from(data)
        return request in _OWN_REPLY or bool(flags & abi.FLAG_NEED_REPLY)

    def parse_reply(self, expected_request: int, data: bytes | bytearray | memoryview) -> int | bytes:
        """Check one complete reply (header + payload) and return its value:
        the u64 of GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
        GET_MAX_MEM_SLOTS, GET_STATUS and of REPLY_ACK replies (0 = success);
        the base (``num``) of GET_VRING_BASE; the raw payload otherwise
        (GET_CONFIG...). VhostUserProtocolError if the flags are not exactly
        VERSION|REPLY, the request differs or the size is wrong."""
        request, flags, size = parse_header(data)
        if flags != _REPLY_FLAGS:
            raise VhostUserProtocolError(f"reply to {_name(expected_request)} has flags {flags:#x}")
        if request != expected_request:
            raise VhostUserProtocolError(
                f"expected a reply to {_name(expected_request)}, got one to {_name(request)}"
            )
        if len(data) != abi.HEADER_SIZE + size:
            raise VhostUserProtocolError(
                f"reply to {_name(request)} declares {size} payload bytes, has {len(data) - abi.HEADER_SIZE}"
            )
        payload = bytes(data[abi.HEADER_SIZE :])
        if expected_request == Req.GET_VRING_BASE:
            if size != _STATE.size:
                raise VhostUserProtocolError(f"GET_VRING_BASE reply has {size} bytes, expected {_STATE.size}")
            return _STATE.unpack(payload)[1]
        if (
            expected_request in _U64_REPLY
            or expected_request in _STATUS_REPLY
            or expected_request not in _OWN_REPLY
        ):
            if size != _U64.size:
                raise VhostUserProtocolError(f"reply to {_name(request)} has {size} bytes, expected 8")
            return _U64.unpack(payload)[0]
        return payload
