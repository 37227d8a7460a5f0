"""The device side of a split virtqueue (virtio 1.x), sans-IO.

:class:`VirtQueue` holds only queue state (size, ring addresses, indices,
negotiated ring features). Guest memory is passed to every data-path call, so
the same queue works across memory-table changes; ring views are cached and
looked up again whenever ``memory.generation`` changes.

Configuration (vhost-user SET_VRING_NUM / _BASE / _ADDR, features) goes
through ``set_size``, ``next_avail``, ``set_addresses``, ``event_idx`` and
``indirect``. The data path is ``pop`` -> (handle the request) ->
``add_used`` -> ``needs_notification``.

Everything read from the rings is guest-controlled: a malformed chain raises
:class:`~virtiofs_async.errors.VringError` with ``head`` set (the head index,
so the caller can still complete it with used length 0, or None when no head
can be returned) and the queue moves on to the next chain; an available index
that runs more than the queue size ahead makes the queue ``broken``.
(``head`` is set on every VringError that ``pop``/``pop_many`` raise.)

Chains accepted: up to ``size`` descriptors in the main table, optionally
ending in one descriptor that points to an indirect table (with
VIRTIO_RING_F_INDIRECT_DESC; the table must lie in one memory region and its
chain walks at most ``max(size, INDIRECT_CHAIN_LIMIT)`` entries); device-readable
buffers before device-writable ones; at most 2**32 bytes in total. Buffers may
cross adjacent memory regions.

Memory ordering: this pure-Python implementation reads the available index
before the ring entries and descriptors, and writes used elements before the
used index, in program order. It issues no CPU fences (none are reachable from
Python); that is sufficient on x86 (TSO). A native twin adds the fences.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Callable, Protocol

import attrs

from .abi.virtio import (
    DESC,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_event_offset,
    used_ring_size,
    vring_need_event,
)
from .buffers import scatter
from .errors import VringError
from .memory import GuestMemory

__all__ = ["DescriptorChain", "InlineResponder", "VirtQueue"]

_unpack_desc = DESC.unpack_from
_unpack_u16 = U16.unpack_from
_pack_used = USED_ELEM.pack_into
_MAX_CHAIN_BYTES = 1 << 32  # a chain may not be longer than 2**32 bytes in total
#: Descriptors walked in one indirect table are limited to max(queue size, this).
#: The spec caps chains at the queue size; QEMU accepts up to 1024 buffers, so
#: we do too, which still bounds the work a huge guest table can cause.
INDIRECT_CHAIN_LIMIT = 1024
#: :meth:`VirtQueue.pop_serving` offers a responder only chains with at most
#: this many device-readable bytes, and at most this much reply room.
RESPONDER_REQUEST_MAX = 512
RESPONDER_REPLY_MAX = 512

#: What an eventfd write adds: 1, as 8 native-endian bytes.
_EVENTFD_ONE = (1).to_bytes(8, sys.byteorder)
_log = logging.getLogger(__name__)


def _error(message: str, head: int | None) -> VringError:
    err = VringError(message)
    err.head = head  # type: ignore[attr-defined]
    return err


class InlineResponder(Protocol):
    """Answers small requests in place, during :meth:`VirtQueue.pop_serving`.

    ``respond(request, room)`` gets the chain's device-readable bytes
    (at most ``RESPONDER_REQUEST_MAX``) and the room for a reply (the
    chain's device-writable length, at most ``RESPONDER_REPLY_MAX``; 0 for a
    chain with no device-writable part, such as a FORGET's); it returns the
    reply (at most ``room`` bytes; ``b""`` answers a request that gets no
    reply) or None when the request is not one it answers. It must give exactly the reply the full
    request path would give, because which of the two serves a request is
    the queue's choice. A compiled responder may also export its C function
    as a capsule (``c_responder``, see cyext/include/vfa_hotpath.h), which
    the compiled queue calls instead.
    """

    def respond(self, request: bytes, room: int) -> bytes | None: ...


@attrs.define
class DescriptorChain:
    """One popped buffer: device-readable views, then device-writable views.

    ``head`` is the index to hand back to :meth:`VirtQueue.add_used`. A
    descriptor that crosses adjacent memory regions yields one view per
    region, and a zero-length descriptor yields none, so the lists are not
    one-to-one with descriptors. The device must not write the readable views.
    """

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def readable_len(self) -> int:
        """Total bytes the device may read."""
        return sum(map(len, self.readable))

    @property
    def writable_len(self) -> int:
        """Total bytes the device may write."""
        return sum(map(len, self.writable))


class VirtQueue:
    """Device side of one split virtqueue.

    ``max_size`` is the largest size the device accepts (a power of two up
    to 32768). A fresh queue has no size and no addresses; ``pop`` returns
    None until both are set.
    """

    __slots__ = (
        "max_size",
        "_size",
        "_mask",
        "_used_event_off",
        "_avail_event_off",
        "_desc_gpa",
        "_avail_gpa",
        "_used_gpa",
        "_event_idx",
        "_indirect",
        "_next_avail",
        "_shadow_avail",
        "_next_used",
        "_signalled_used",
        "_signalled_valid",
        "_notify_enabled",
        "_broken",
        "_pending_error",
        "_gen",
        "_desc",
        "_avail",
        "_used",
        "_used16",
    )

    def __init__(self, max_size: int = 1024) -> None:
        if not is_valid_queue_size(max_size):
            raise ValueError(f"max_size must be a power of two in 1..32768, not {max_size}")
        self.max_size = max_size
        self._event_idx = False
        self._indirect = False
        self._size = 0
        self._mask = 0
        self._used_event_off = 0
        self._avail_event_off = 0
        self._reset_state()

    def _reset_state(self) -> None:
        self._desc_gpa: int | None = None
        self._avail_gpa: int | None = None
        self._used_gpa: int | None = None
        self._next_avail = 0
        self._shadow_avail = 0
        self._next_used = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._notify_enabled = True
        self._broken = False
        self._pending_error: VringError | None = None
        self._drop_views()

    def _drop_views(self) -> None:
        self._gen = 0  # generations start at 1: 0 never matches
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        #: the used ring as 16-bit words: the driver reads flags, idx and
        #: avail_event concurrently, so each is one 16-bit store (struct's
        #: pack_into zero-fills its target first: a torn value in between)
        self._used16: memoryview | None = None

    # -- configuration -------------------------------------------------------

    def reset(self) -> None:
        """Forget size, addresses, indices, notification state and the broken
        flag. The ring features (``event_idx``, ``indirect``) are kept: they are
        negotiated for the whole device."""
        self._size = 0
        self._mask = 0
        self._reset_state()

    @property
    def size(self) -> int:
        """Number of entries, 0 while unset."""
        return self._size

    def set_size(self, size: int) -> None:
        """SET_VRING_NUM: a power of two in 1..max_size, else VringError.
        Changing the size forgets the ring addresses (set them again)."""
        if not isinstance(size, int) or not is_valid_queue_size(size) or size > self.max_size:
            raise VringError(f"invalid queue size {size!r} (power of two up to {self.max_size})")
        if size != self._size:
            self._size = size
            self._mask = size - 1
            self._used_event_off = used_event_offset(size)
            self._avail_event_off = avail_event_offset(size)
            self._desc_gpa = self._avail_gpa = self._used_gpa = None
            self._drop_views()

    def set_addresses(self, memory: GuestMemory, desc_gpa: int, avail_gpa: int, used_gpa: int) -> None:
        """SET_VRING_ADDR (guest physical addresses; translate user addresses
        with ``GuestMemory.uva_to_gpa`` first).

        Checks alignment (16/2/4) and that each whole table, for the current
        size and including the event-index fields, lies inside one mapped
        region; VringError otherwise (the previous addresses are then kept).
        Reads the device's used index from the used ring, as the driver or a
        previous backend left it.
        """
        size = self._size
        if not size:
            raise VringError("queue size must be set before the ring addresses")
        for name, gpa, align in (
            ("descriptor table", desc_gpa, DESC_ALIGN),
            ("available ring", avail_gpa, AVAIL_ALIGN),
            ("used ring", used_gpa, USED_ALIGN),
        ):
            if not isinstance(gpa, int) or gpa % align:
                raise VringError(f"{name} address {gpa!r} is not {align}-byte aligned")
        try:
            desc = memory.view(desc_gpa, desc_table_size(size))
            avail = memory.view(avail_gpa, avail_ring_size(size))
            used = memory.view(used_gpa, used_ring_size(size))
        except VringError as exc:
            raise VringError(f"virtqueue rings are not in mapped memory: {exc}") from exc
        self._desc_gpa, self._avail_gpa, self._used_gpa = desc_gpa, avail_gpa, used_gpa
        self._desc, self._avail, self._used = desc, avail, used
        self._used16 = used.cast("H")
        self._gen = memory.generation
        self._next_used = _unpack_u16(used, 2)[0]
        self._signalled_used = self._next_used
        self._signalled_valid = False
        self._shadow_avail = self._next_avail

    @property
    def is_configured(self) -> bool:
        """True once size and ring addresses are set."""
        return self._desc_gpa is not None

    @property
    def desc_gpa(self) -> int | None:
        return self._desc_gpa

    @property
    def avail_gpa(self) -> int | None:
        return self._avail_gpa

    @property
    def used_gpa(self) -> int | None:
        return self._used_gpa

    @property
    def next_avail(self) -> int:
        """Index of the next available-ring entry to consume (SET/GET_VRING_BASE)."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise VringError(f"invalid available index {value!r}")
        self._next_avail = value
        self._shadow_avail = value

    @property
    def next_used(self) -> int:
        """Used index the device publishes next (read from the ring by
        ``set_addresses``; settable for state restore)."""
        return self._next_used

    @next_used.setter
    def next_used(self, value: int) -> None:
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise VringError(f"invalid used index {value!r}")
        self._next_used = value
        self._signalled_used = value
        self._signalled_valid = False

    @property
    def event_idx(self) -> bool:
        """VIRTIO_RING_F_EVENT_IDX negotiated."""
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value: bool) -> None:
        self._event_idx = bool(value)
        self._signalled_valid = False

    @property
    def indirect(self) -> bool:
        """VIRTIO_RING_F_INDIRECT_DESC negotiated."""
        return self._indirect

    @indirect.setter
    def indirect(self, value: bool) -> None:
        self._indirect = bool(value)

    @property
    def broken(self) -> bool:
        """The driver corrupted the available index; nothing more is popped
        until :meth:`reset`."""
        return self._broken

    # -- data path -------------------------------------------------------------

    def _refresh(self, memory: GuestMemory) -> None:
        size = self._size
        try:
            self._desc = memory.view(self._desc_gpa, desc_table_size(size))  # type: ignore[arg-type]
            self._avail = memory.view(self._avail_gpa, avail_ring_size(size))  # type: ignore[arg-type]
            self._used = memory.view(self._used_gpa, used_ring_size(size))  # type: ignore[arg-type]
            self._used16 = self._used.cast("H")
        except VringError as exc:
            self._drop_views()
            raise _error(f"virtqueue rings are no longer in mapped memory: {exc}", None) from exc
        self._gen = memory.generation

    def _read_avail_idx(self) -> int:
        idx = _unpack_u16(self._avail, 2)[0]
        if ((idx - self._next_avail) & 0xFFFF) > self._size:
            self._broken = True
            raise _error(
                f"available index jumped from {self._next_avail} to {idx} (queue size {self._size})", None
            )
        return idx

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """Take the next available chain, or None if there is none (or the
        queue is unconfigured or broken).

        With EVENT_IDX and notifications enabled, finding the ring empty
        also publishes ``avail_event`` (re-arming kicks) and re-checks, so a
        caller that pops until None never misses a buffer. Raises VringError
        for a malformed chain (``head`` set, already consumed) or a corrupt
        available index (``head`` None, queue now broken).
        """
        if self._pending_error is not None:
            err, self._pending_error = self._pending_error, None
            raise err
        if self._broken or self._desc_gpa is None:
            return None
        if memory.generation != self._gen:
            self._refresh(memory)
        nxt = self._next_avail
        if nxt == self._shadow_avail:
            idx = self._read_avail_idx()
            if idx == nxt:
                if not (self._event_idx and self._notify_enabled):
                    return None
                self._used16[self._avail_event_off >> 1] = nxt  # type: ignore[index]
                idx = self._read_avail_idx()
                if idx == nxt:
                    return None
            self._shadow_avail = idx
        head = _unpack_u16(self._avail, 4 + 2 * (nxt & self._mask))[0]
        self._next_avail = (nxt + 1) & 0xFFFF
        return self._read_chain(memory, head)

    def _read_chain(self, memory: GuestMemory, head: int) -> DescriptorChain:
        size = self._size
        if head >= size:
            raise _error(f"available ring entry {head} is out of range (queue size {size})", None)
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        table = self._desc
        limit = size  # descriptors that may still be walked in this table
        table_len = size
        idx = head
        total = 0
        in_indirect = False
        seen_write = False
        try:
            while True:
                if idx >= table_len:
                    raise VringError(f"descriptor index {idx} out of range ({table_len} in table)")
                if limit == 0:
                    raise VringError("descriptor chain loops or is too long")
                limit -= 1
                addr, length, flags, nxt = _unpack_desc(table, idx << 4)
                if flags & VIRTQ_DESC_F_INDIRECT:
                    if in_indirect:
                        raise VringError("indirect descriptor inside an indirect table")
                    if not self._indirect:
                        raise VringError("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")
                    if flags & VIRTQ_DESC_F_NEXT:
                        raise VringError("indirect descriptor with VIRTQ_DESC_F_NEXT")
                    if length == 0 or length & 15:
                        raise VringError(f"indirect table length {length} is not a positive multiple of 16")
                    table = memory.view(addr, length)
                    table_len = length >> 4
                    limit = min(table_len, max(size, INDIRECT_CHAIN_LIMIT))
                    in_indirect = True
                    idx = 0
                    continue
                total += length
                if total > _MAX_CHAIN_BYTES:
                    raise VringError("descriptor chain longer than 2**32 bytes")
                if flags & VIRTQ_DESC_F_WRITE:
                    seen_write = True
                    memory.append_views(writable, addr, length)
                elif seen_write:
                    raise VringError("device-readable descriptor after a device-writable one")
                else:
                    memory.append_views(readable, addr, length)
                if not flags & VIRTQ_DESC_F_NEXT:
                    return DescriptorChain(head, readable, writable)
                idx = nxt
        except VringError as exc:
            exc.head = head  # type: ignore[attr-defined]
            raise

    def pop_many(self, memory: GuestMemory, limit: int) -> list[DescriptorChain]:
        """Pop up to ``limit`` chains. A malformed chain met after some good
        ones ends the batch; its VringError is raised by the next pop call,
        so the outcome is the same as calling :meth:`pop` repeatedly."""
        chains: list[DescriptorChain] = []
        while len(chains) < limit:
            try:
                chain = self.pop(memory)
            except VringError as exc:
                if not chains:
                    raise
                self._pending_error = exc
                break
            if chain is None:
                break
            chains.append(chain)
        return chains

    def pop_serving(
        self, memory: GuestMemory, limit: int, responder: InlineResponder, byte_budget: int = 0,
        signal_every: int = 0, notify_fd: int = -1,
    ) -> tuple[list[DescriptorChain], int]:
        """Pop up to ``limit`` chains like :meth:`pop_many`, offering each
        small one (see :class:`InlineResponder`) to ``responder`` first: a
        chain it answers is written and returned to the used ring at once
        (call :meth:`needs_notification` afterwards, as after add_used).
        Returns the chains it did not answer and how many it answered;
        ``limit`` counts both. A chunk ends once the chains answered since
        the chunk began carried ``byte_budget`` bytes (requests and
        replies) or numbered ``signal_every`` (when > 0), so that the driver
        sees replies sooner: without ``notify_fd`` the call stops there;
        with an eventfd ``notify_fd`` (>= 0; the call eventfd) it makes the
        notification decision (:meth:`needs_notification`), signals
        ``notify_fd`` if due, and goes on. A responder that raises has not
        answered."""
        chains: list[DescriptorChain] = []
        served = 0
        moved = answered = 0
        respond = responder.respond
        while len(chains) + served < limit:
            if 0 < byte_budget <= moved or 0 < signal_every <= answered:
                if notify_fd < 0:
                    break
                if self.needs_notification(memory):
                    with contextlib.suppress(BlockingIOError):  # a full counter wakes the driver anyway
                        os.write(notify_fd, _EVENTFD_ONE)
                moved = answered = 0
            try:
                chain = self.pop(memory)
            except VringError as exc:
                if not chains and not served:
                    raise
                self._pending_error = exc
                break
            if chain is None:
                break
            reply = None
            room = min(chain.writable_len, RESPONDER_REPLY_MAX)
            if chain.readable_len <= RESPONDER_REQUEST_MAX:
                try:
                    reply = respond(b"".join(chain.readable), room)
                    if reply is not None and memoryview(reply).nbytes > room:
                        reply = None
                except Exception:
                    reply = None
            if reply is not None:
                n = scatter(chain.writable, (reply,))
                self.add_used(memory, chain.head, n)
                served += 1
                answered += 1
                moved += n + chain.readable_len
            else:
                chains.append(chain)
        return chains, served

    def serve_kick(
        self, memory: GuestMemory, limit: int, responder: InlineResponder, byte_budget: int = 0,
        signal_every: int = 0, notify_fd: int = -1,
    ) -> tuple[list[DescriptorChain], int]:
        """Serve what a kick brought in one call: with kicks disabled,
        :meth:`pop_serving` (same arguments) until the ring is empty, then
        kicks enabled again and the ring looked at once more (buffers that
        came meanwhile are served too, as :meth:`enable_notification` asks).
        Returns as :meth:`pop_serving` does: the chains left to the full
        path and how many were answered (``limit`` counts both). When it
        returns chains, or took ``limit`` in all, kicks stay disabled: the
        caller pops on. The replies answered get one last notification
        decision, signalled on ``notify_fd`` if due (without one, call
        :meth:`needs_notification` as after add_used), also when a
        malformed chain raises VringError (as :meth:`pop`: ``head`` set,
        already consumed)."""
        self.disable_notification(memory)
        answered = 0
        try:
            while True:
                chains, served = self.pop_serving(
                    memory, limit - answered, responder, byte_budget, signal_every, notify_fd,
                )
                answered += served
                if chains or answered >= limit:
                    return chains, answered
                if served:
                    continue  # a chunk ended the call, or the ring has more
                if not self.enable_notification(memory):
                    return chains, answered
                self.disable_notification(memory)
        finally:
            if answered and notify_fd >= 0 and self.needs_notification(memory):
                with contextlib.suppress(BlockingIOError):  # a full counter wakes the driver anyway
                    os.write(notify_fd, _EVENTFD_ONE)

    def kick_server(
        self, device: Any, handler: Any, limit: int, byte_budget: int, signal_every: int, notify_fd: int,
        handoff: Callable[[list[DescriptorChain] | None, VringError | None], None],
    ) -> KickServer:
        """A :class:`KickServer` for this queue (of this implementation)."""
        return KickServer(self, device, handler, limit, byte_budget, signal_every, notify_fd, handoff)

    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        """Return chain ``head`` with ``length`` bytes written and publish the
        used index (element first, then index). VringError if the queue is
        unconfigured, ``head`` >= size or ``length`` does not fit 32 bits."""
        if self._desc_gpa is None:
            raise VringError("add_used on an unconfigured queue")
        if memory.generation != self._gen:
            self._refresh(memory)
        if not 0 <= head < self._size:
            raise VringError(f"used head {head} out of range (queue size {self._size})")
        if not 0 <= length <= 0xFFFFFFFF:
            raise VringError(f"used length {length} does not fit 32 bits")
        used = self._used
        nu = self._next_used
        _pack_used(used, 4 + 8 * (nu & self._mask), head, length)
        nu = (nu + 1) & 0xFFFF
        self._used16[1] = nu  # type: ignore[index]
        self._next_used = nu
        if nu == self._signalled_used:
            # 65536 entries since the last decision: the 16-bit distance is lost.
            self._signalled_valid = False

    def needs_notification(self, memory: GuestMemory) -> bool:
        """Whether to send a used-buffer notification (call) now, after one or
        more add_used. With EVENT_IDX: whether ``used_event`` was crossed since
        the previous decision (the first decision is always True); otherwise
        unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT."""
        if self._desc_gpa is None:
            return False
        if memory.generation != self._gen:
            self._refresh(memory)
        if self._event_idx:
            new = self._next_used
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            event = _unpack_u16(self._avail, self._used_event_off)[0]
            return vring_need_event(event, new, old)
        return not _unpack_u16(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self, memory: GuestMemory) -> bool:
        """Ask the driver for kicks again (clear VIRTQ_USED_F_NO_NOTIFY, or
        set ``avail_event`` to ``next_avail``). Returns True if buffers are
        already available, in which case the caller must pop them (no kick
        will come for them). Raises VringError like :meth:`pop` for a corrupt
        available index."""
        if self._desc_gpa is None:
            return False
        if memory.generation != self._gen:
            self._refresh(memory)
        self._notify_enabled = True
        if self._event_idx:
            self._used16[self._avail_event_off >> 1] = self._next_avail  # type: ignore[index]
        else:
            self._used16[0] = 0  # type: ignore[index]
        if self._broken:
            return False
        return self._read_avail_idx() != self._next_avail

    def disable_notification(self, memory: GuestMemory) -> None:
        """Tell the driver kicks are not needed (VIRTQ_USED_F_NO_NOTIFY; with
        EVENT_IDX ``avail_event`` is simply no longer advanced). Advisory: the
        driver may still kick."""
        if self._desc_gpa is None:
            return
        if memory.generation != self._gen:
            self._refresh(memory)
        self._notify_enabled = False
        if not self._event_idx:
            self._used16[0] = VIRTQ_USED_F_NO_NOTIFY  # type: ignore[index]

    def __repr__(self) -> str:
        return (
            f"VirtQueue(size={self._size}, next_avail={self._next_avail}, next_used={self._next_used}, "
            f"configured={self.is_configured}, broken={self._broken})"
        )


class KickServer:
    """The kicks of one queue, answered from the event loop's wake-up path.

    The transport arms it (:meth:`arm`) while its leader task waits for a
    kick; each kick then costs one :meth:`VirtQueue.serve_kick` with the
    handler's current ``inline_responder`` (read at every kick: it comes
    and goes with the mount and with DEBUG logging), and no task switch.
    Calling it (the ``on_signal`` of an eventfd waiter, after the waiter
    consumed the counter) returns True when the kick was dealt with:
    everything popped was answered, fewer than ``limit`` chains.
    Otherwise it disarms itself and returns False, for the leader to wake:
    chains popped for the full path are first given to
    ``handoff(chains, None)``, a malformed chain's VringError to
    ``handoff(None, exc)`` (its chain consumed, as :meth:`VirtQueue.pop`
    leaves it). :meth:`attach` makes the callable an event loop registers
    as the kick fd's reader instead of its own. ``device.memory`` (the
    guest memory) is read at every kick too: the map may change; the
    owner sets ``notify_fd`` when the call eventfd changes."""

    __slots__ = ("queue", "device", "handler", "limit", "byte_budget", "signal_every", "notify_fd", "handoff",
                 "armed")

    def __init__(
        self, queue: VirtQueue, device: Any, handler: Any, limit: int, byte_budget: int, signal_every: int,
        notify_fd: int, handoff: Callable[[list[DescriptorChain] | None, VringError | None], None],
    ) -> None:
        self.queue = queue
        self.device = device
        self.handler = handler
        self.limit = limit
        self.byte_budget = byte_budget
        self.signal_every = signal_every
        self.notify_fd = notify_fd
        self.handoff = handoff
        #: Kicks are served (else each one only wakes the leader).
        self.armed = False

    def arm(self, on: bool) -> None:
        """Serve the next kicks (``on``), or leave them to the leader."""
        self.armed = on

    def __call__(self) -> bool:
        if not self.armed:
            return False
        responder = getattr(self.handler, "inline_responder", None)
        if responder is None:
            self.armed = False
            return False
        try:
            chains, answered = self.queue.serve_kick(
                self.device.memory, self.limit, responder, self.byte_budget, self.signal_every, self.notify_fd,
            )
        except VringError as exc:
            self.armed = False
            self.handoff(None, exc)
            return False
        if chains:
            self.armed = False
            self.handoff(chains, None)
            return False
        if answered >= self.limit:
            self.armed = False
            return False
        return True

    def attach(self, fd: int, wake: Callable[[], None], fail: Callable[[OSError], None]) -> Callable[[], None]:
        """The kick fd ``fd``'s reader callback: it consumes the counter
        (nothing to read: nothing happens), serves the kick as a call does,
        and calls ``wake()`` when it was not dealt with (also when serving
        raised anything but VringError: that is logged), ``fail(exc)`` when
        the fd cannot be read."""

        def on_readable() -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            except OSError as exc:
                fail(exc)
                return
            try:
                if self():
                    return
            except Exception:
                _log.exception("serving a kick failed; waking the leader")
                self.armed = False
            wake()

        return on_readable
