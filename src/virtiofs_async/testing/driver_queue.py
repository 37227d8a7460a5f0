"""The driver side of a split virtqueue: what the guest kernel does.

:class:`DriverQueue` lays out a descriptor table, available ring and used ring
inside a writable buffer that stands for guest RAM (typically an mmap of the
memfd that is also handed to :class:`~virtiofs_async.memory.GuestMemory`),
plus a data area from which it allocates payload buffers and indirect tables.
It is a test tool: it trusts its caller, but checks what the device writes.

Typical use::

    drv = DriverQueue(mem, base_gpa=0, size=64, event_idx=True)
    head = drv.add_chain([b"request"], [4096])
    drv.publish()
    if drv.needs_kick(): ...            # the device wants a kick
    ...                                  # device pops, writes, add_used
    used = drv.pop_used()                # Used(head, written, [bytes, ...])

The raw helpers (``write_desc``, ``write_table``, ``push_head``,
``set_avail_idx``, ``pop_used_raw``) build malformed rings for tests; do not
mix them with ``add_chain``/``pop_used`` on descriptors the queue hands out.
"""
from __future__ import annotations

import bisect
import collections
import sys
from typing import NamedTuple, Sequence

from ..abi.virtio import (
    DESC,
    DESC_SIZE,
    U16,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_event_offset,
    used_ring_size,
    vring_need_event,
)

__all__ = ["DriverQueue", "DriverQueueError", "DriverQueueFull", "Used"]

_ALLOC_ALIGN = 16
_NATIVE_LE = sys.byteorder == "little"


class DriverQueueError(Exception):
    """The device broke the virtqueue contract (bad used entry), or the
    driver was misused."""


class DriverQueueFull(DriverQueueError):
    """No free descriptor or no room in the data area for this chain."""


class Used(NamedTuple):
    """A used buffer: ``data`` has one bytes object per writable buffer,
    holding the first ``written`` bytes of the chain's writable part."""

    head: int
    written: int
    data: list[bytes]


class _InFlight:
    __slots__ = ("descs", "allocs", "writable")

    def __init__(self, descs: list[int], allocs: list[tuple[int, int]], writable: list[tuple[int, int]]) -> None:
        self.descs = descs
        self.allocs = allocs
        self.writable = writable


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


class DriverQueue:
    """A split virtqueue as the driver sees it, inside ``mem``.

    ``mem`` is guest RAM starting at guest physical address ``base_gpa``.
    The rings start at ``ring_gpa`` (default ``base_gpa``, 16-byte aligned):
    descriptor table, then available ring, then the used ring (4-aligned).
    Payloads and indirect tables come from ``[data_gpa, data_gpa + data_len)``
    (default: from the next 4 KiB boundary after the rings to the end of
    ``mem``). ``start_idx`` is the initial value of both ring indices, to
    test wrap-around.
    """

    def __init__(
        self,
        mem: memoryview | bytearray,
        base_gpa: int,
        size: int,
        *,
        event_idx: bool = False,
        ring_gpa: int | None = None,
        data_gpa: int | None = None,
        data_len: int | None = None,
        start_idx: int = 0,
    ) -> None:
        view = memoryview(mem).cast("B")
        if view.readonly:
            raise ValueError("DriverQueue needs writable memory")
        if not is_valid_queue_size(size):
            raise ValueError(f"invalid queue size {size}")
        self.mem = view
        self.base_gpa = base_gpa
        self.size = size
        self.event_idx = event_idx
        self._mask = size - 1
        ring_gpa = base_gpa if ring_gpa is None else ring_gpa
        if ring_gpa % 16:
            raise ValueError("ring_gpa must be 16-byte aligned")
        self.desc_gpa = ring_gpa
        self.avail_gpa = ring_gpa + desc_table_size(size)
        self.used_gpa = _align_up(self.avail_gpa + avail_ring_size(size), 4)
        ring_end = self.used_gpa + used_ring_size(size)
        mem_end = base_gpa + len(view)
        if data_gpa is None:
            data_gpa = _align_up(ring_end, 4096)
        if data_len is None:
            data_len = mem_end - data_gpa
        if ring_end > mem_end or data_len <= 0 or data_gpa + data_len > mem_end or data_gpa < base_gpa:
            raise ValueError("rings or data area do not fit in mem")
        if data_gpa < ring_end and ring_gpa < data_gpa + data_len:
            raise ValueError("data area overlaps the rings")
        self.data_gpa = data_gpa
        self.data_len = data_len
        self._used_event_gpa = self.avail_gpa + used_event_offset(size)
        self._avail_event_gpa = self.used_gpa + avail_event_offset(size)

        start_idx &= 0xFFFF
        self._avail_idx = start_idx  # next slot to fill (not yet published)
        self._published = start_idx
        self._kick_old = start_idx
        self._last_used = start_idx
        self._free: collections.deque[int] = collections.deque(range(size))
        self._inflight: dict[int, _InFlight] = {}
        # allocator: sorted, coalesced holes (start, length)
        self._holes: list[tuple[int, int]] = [(data_gpa, data_len)]

        self.write(self.desc_gpa, bytes(desc_table_size(size)))
        self.write(self.avail_gpa, bytes(avail_ring_size(size)))
        self.write(self.used_gpa, bytes(used_ring_size(size)))
        self._w16(self.avail_gpa + 2, start_idx)
        self._w16(self.used_gpa + 2, start_idx)
        self._w16(self._used_event_gpa, start_idx)
        self._w16(self._avail_event_gpa, start_idx)

    @staticmethod
    def ring_bytes(size: int) -> int:
        """Bytes the three rings take from a 16-aligned ``ring_gpa``."""
        used = _align_up(desc_table_size(size) + avail_ring_size(size), 4)
        return used + used_ring_size(size)

    # -- raw memory access -----------------------------------------------------

    def _off(self, gpa: int, length: int) -> int:
        off = gpa - self.base_gpa
        if off < 0 or off + length > len(self.mem):
            raise DriverQueueError(f"guest range {gpa:#x}+{length:#x} is outside the driver's memory")
        return off

    def read(self, gpa: int, length: int) -> bytes:
        off = self._off(gpa, length)
        return bytes(self.mem[off : off + length])

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        off = self._off(gpa, len(data))
        self.mem[off : off + len(data)] = data

    def _r16(self, gpa: int) -> int:
        return U16.unpack_from(self.mem, self._off(gpa, 2))[0]

    def _w16(self, gpa: int, value: int) -> None:
        # One 16-bit store: struct.pack_into zero-fills its target before
        # writing it, so the device could read a transient 0 (an index jump).
        off = self._off(gpa, 2)
        if _NATIVE_LE:
            view = self.mem[off : off + 2].cast("H")
            view[0] = value & 0xFFFF
            view.release()
        else:
            U16.pack_into(self.mem, off, value & 0xFFFF)

    # -- data-area allocator -----------------------------------------------------

    def alloc(self, length: int) -> int:
        """Reserve ``length`` bytes (16-aligned, at least 16) in the data area."""
        need = max(_ALLOC_ALIGN, _align_up(length, _ALLOC_ALIGN))
        for i, (start, hole) in enumerate(self._holes):
            if hole >= need:
                if hole == need:
                    del self._holes[i]
                else:
                    self._holes[i] = (start + need, hole - need)
                return start
        raise DriverQueueFull(f"no room for {length} bytes in the data area")

    def free(self, gpa: int, length: int) -> None:
        """Give back a range returned by :meth:`alloc` with the same length."""
        need = max(_ALLOC_ALIGN, _align_up(length, _ALLOC_ALIGN))
        holes = self._holes
        i = bisect.bisect_left(holes, (gpa, 0))
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] > gpa or i < len(holes) and holes[i][0] < gpa + need:
            raise DriverQueueError(f"double free of {gpa:#x}")
        holes.insert(i, (gpa, need))
        if i + 1 < len(holes) and gpa + need == holes[i + 1][0]:
            holes[i] = (gpa, need + holes[i + 1][1])
            del holes[i + 1]
        if i > 0 and holes[i - 1][0] + holes[i - 1][1] == gpa:
            holes[i - 1] = (holes[i - 1][0], holes[i - 1][1] + holes[i][1])
            del holes[i]

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._holes)

    # -- driver operations -------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Free descriptors in the main table."""
        return len(self._free)

    @property
    def in_flight(self) -> int:
        """Chains added with add_chain and not yet returned by pop_used."""
        return len(self._inflight)

    @property
    def avail_idx(self) -> int:
        """Available index as published to the device."""
        return self._published

    @property
    def last_used(self) -> int:
        """Next used-ring index the driver will consume."""
        return self._last_used

    def add_chain(
        self, readable: Sequence[bytes | bytearray | memoryview], writable_lens: Sequence[int], indirect: bool = False
    ) -> int:
        """Copy ``readable`` payloads into fresh buffers, allocate writable
        buffers of ``writable_lens`` bytes, chain them (readable first) and
        put the head in the available ring. Not visible to the device until
        :meth:`publish`. With ``indirect`` the chain lives in an indirect
        table and takes one main descriptor. Raises DriverQueueFull."""
        n = len(readable) + len(writable_lens)
        if n == 0:
            raise ValueError("a chain needs at least one buffer")
        if len(self._free) < (1 if indirect else n):
            raise DriverQueueFull("not enough free descriptors")
        allocs: list[tuple[int, int]] = []
        entries: list[tuple[int, int, int]] = []
        writable: list[tuple[int, int]] = []
        try:
            for payload in readable:
                payload = memoryview(payload).cast("B")
                gpa = self.alloc(len(payload))
                allocs.append((gpa, len(payload)))
                self.write(gpa, payload)
                entries.append((gpa, len(payload), 0))
            for length in writable_lens:
                gpa = self.alloc(length)
                allocs.append((gpa, length))
                entries.append((gpa, length, VIRTQ_DESC_F_WRITE))
                writable.append((gpa, length))
            if indirect:
                table = self.alloc(DESC_SIZE * n)
                allocs.append((table, DESC_SIZE * n))
        except DriverQueueFull:
            for gpa, length in allocs:
                self.free(gpa, length)
            raise
        if indirect:
            self.write_table(
                table,
                [
                    (gpa, length, flags | (VIRTQ_DESC_F_NEXT if i + 1 < n else 0), i + 1 if i + 1 < n else 0)
                    for i, (gpa, length, flags) in enumerate(entries)
                ],
            )
            descs = [self._free.popleft()]
            self.write_desc(descs[0], table, DESC_SIZE * n, VIRTQ_DESC_F_INDIRECT, 0)
        else:
            descs = [self._free.popleft() for _ in range(n)]
            for i, (gpa, length, flags) in enumerate(entries):
                if i + 1 < n:
                    self.write_desc(descs[i], gpa, length, flags | VIRTQ_DESC_F_NEXT, descs[i + 1])
                else:
                    self.write_desc(descs[i], gpa, length, flags, 0)
        head = descs[0]
        self._inflight[head] = _InFlight(descs, allocs, writable)
        self.push_head(head)
        return head

    def publish(self) -> int:
        """Expose every chain added since the last publish (write avail idx);
        returns how many."""
        count = (self._avail_idx - self._published) & 0xFFFF
        self._w16(self.avail_gpa + 2, self._avail_idx)
        self._published = self._avail_idx
        return count

    def needs_kick(self) -> bool:
        """After publish: whether the device asked to be notified of what was
        published since the previous needs_kick (avail_event with EVENT_IDX,
        else VIRTQ_USED_F_NO_NOTIFY)."""
        new = self._published
        old = self._kick_old
        self._kick_old = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(self._r16(self._avail_event_gpa), new, old)
        return not self._r16(self.used_gpa) & VIRTQ_USED_F_NO_NOTIFY

    def used_idx(self) -> int:
        """The used index the device has published."""
        return self._r16(self.used_gpa + 2)

    def _next_used_elem(self) -> tuple[int, int] | None:
        idx = self.used_idx()
        if idx == self._last_used:
            return None
        if ((idx - self._last_used) & 0xFFFF) > self.size:
            raise DriverQueueError(f"device used index jumped from {self._last_used} to {idx}")
        slot = self._last_used & self._mask
        elem = USED_ELEM.unpack_from(self.mem, self._off(self.used_gpa + 4 + 8 * slot, 8))
        self._last_used = (self._last_used + 1) & 0xFFFF
        return elem

    def pop_used(self) -> Used | None:
        """Consume the next used entry: check it names a chain in flight and
        that ``written`` fits its writable buffers, free its descriptors and
        buffers, and return what the device wrote. None if nothing is used."""
        elem = self._next_used_elem()
        if elem is None:
            return None
        head, written = elem
        rec = self._inflight.pop(head, None)
        if rec is None:
            raise DriverQueueError(f"device returned head {head}, which is not in flight")
        capacity = sum(length for _, length in rec.writable)
        data: list[bytes] = []
        remaining = written
        for gpa, length in rec.writable:
            take = min(length, remaining)
            data.append(self.read(gpa, take))
            remaining -= take
        self._release(rec)
        if written > capacity:
            raise DriverQueueError(f"device wrote {written} bytes into {capacity} writable bytes (head {head})")
        return Used(head, written, data)

    def pop_used_raw(self) -> tuple[int, int] | None:
        """Consume the next used entry without any bookkeeping: (id, len)."""
        return self._next_used_elem()

    # -- handing the ring to a fast path (testing.loadgen) -------------------------------

    def adopt_indices(self, avail_idx: int, last_used: int) -> None:
        """Take over the ring indices reached by a caller that drove this
        ring directly (re-publishing heads of chains from :meth:`add_chain`
        and consuming their used entries itself, as ``testing.loadgen``
        does): ``avail_idx`` becomes the next available slot and the
        published index (written to the ring), ``last_used`` the next used
        entry to consume. Chains recorded in flight stay recorded."""
        self._avail_idx = self._published = self._kick_old = avail_idx & 0xFFFF
        self._last_used = last_used & 0xFFFF
        self._w16(self.avail_gpa + 2, self._avail_idx)

    def release_chain(self, head: int) -> None:
        """Free the descriptors and buffers of chain ``head`` (from
        :meth:`add_chain`) whose used entry the caller consumed itself, or
        which it never published. DriverQueueError if it is not in flight."""
        rec = self._inflight.pop(head, None)
        if rec is None:
            raise DriverQueueError(f"head {head} is not in flight")
        self._release(rec)

    def _release(self, rec: _InFlight) -> None:
        for gpa, length in rec.allocs:
            self.free(gpa, length)
        self._free.extend(rec.descs)

    def chain_buffers(self, head: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(readable, writable)`` ``(gpa, length)`` buffers of chain
        ``head`` in flight (from :meth:`add_chain`), in chain order."""
        rec = self._inflight.get(head)
        if rec is None:
            raise DriverQueueError(f"head {head} is not in flight")
        writable = list(rec.writable)
        readable = len(rec.allocs) - len(writable)
        if len(rec.descs) == 1 and self._desc_flags(head) & VIRTQ_DESC_F_INDIRECT:
            readable -= 1  # the last allocation is the indirect table
        return list(rec.allocs[:readable]), writable

    def _desc_flags(self, index: int) -> int:
        return U16.unpack_from(self.mem, self._off(self.desc_gpa + DESC_SIZE * index + 12, 2))[0]

    # -- interrupt (used buffer notification) suppression --------------------------

    def set_used_event(self, idx: int) -> None:
        """EVENT_IDX: ask for an interrupt once used idx passes ``idx``."""
        self._w16(self._used_event_gpa, idx)

    def set_no_interrupt(self, flag: bool) -> None:
        """Set or clear VIRTQ_AVAIL_F_NO_INTERRUPT in the available ring."""
        self._w16(self.avail_gpa, VIRTQ_AVAIL_F_NO_INTERRUPT if flag else 0)

    def enable_interrupts(self) -> bool:
        """Ask for an interrupt at the next used entry; True if used entries
        are already pending (so the caller should pop them now)."""
        if self.event_idx:
            self.set_used_event(self._last_used)
        else:
            self.set_no_interrupt(False)
        return self.used_idx() != self._last_used

    def disable_interrupts(self) -> None:
        """Ask for no interrupts (advisory)."""
        if self.event_idx:
            self.set_used_event((self._last_used - 1) & 0xFFFF)
        else:
            self.set_no_interrupt(True)

    # -- raw helpers for malformed rings ----------------------------------------------

    def write_desc(self, index: int, addr: int, length: int, flags: int, next: int = 0) -> None:
        """Write main-table descriptor ``index`` verbatim."""
        DESC.pack_into(self.mem, self._off(self.desc_gpa + DESC_SIZE * index, DESC_SIZE), addr, length, flags, next)

    def write_table(self, gpa: int, entries: Sequence[tuple[int, int, int, int]]) -> None:
        """Write (addr, len, flags, next) descriptors verbatim at ``gpa``."""
        for i, (addr, length, flags, nxt) in enumerate(entries):
            DESC.pack_into(self.mem, self._off(gpa + DESC_SIZE * i, DESC_SIZE), addr, length, flags, nxt)

    def push_head(self, head: int) -> None:
        """Put ``head`` in the next available slot (unpublished), no checks."""
        self._w16(self.avail_gpa + 4 + 2 * (self._avail_idx & self._mask), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF

    def set_avail_idx(self, idx: int) -> None:
        """Write the available index verbatim (e.g. an impossible jump)."""
        self._avail_idx = idx & 0xFFFF
        self.publish()
