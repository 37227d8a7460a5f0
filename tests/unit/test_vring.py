"""Split virtqueue: the device side (VirtQueue) against the driver side
(DriverQueue) sharing one memfd, as a guest and a vhost-user backend would."""
from __future__ import annotations

import collections
import errno
from typing import Callable
import mmap
import os

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

# The active implementation (Cython or pure, see VIRTIOFS_ASYNC_IMPLEMENTATION).
from virtiofs_async._accel import DescriptorChain, VirtQueue, scatter
from virtiofs_async.abi.virtio import (
    DESC_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    vring_need_event,
)
from virtiofs_async.errors import ProtocolError, VringError
from virtiofs_async.memory import GuestMemory
from virtiofs_async.testing.driver_queue import DriverQueue, DriverQueueFull

BASE = 0x4000_0000  # guest physical address of the memfd's first byte
UVA = 0x7F00_0000_0000
MEM_SIZE = 256 * 1024
N = VIRTQ_DESC_F_NEXT
W = VIRTQ_DESC_F_WRITE
I = VIRTQ_DESC_F_INDIRECT


class Rig:
    """One memfd mapped twice: by the driver (DriverQueue) and by the device
    (GuestMemory), with a VirtQueue configured on the driver's rings."""

    def __init__(
        self,
        size: int = 16,
        *,
        event_idx: bool = False,
        indirect: bool = True,
        start_idx: int = 0,
        mem_size: int = MEM_SIZE,
        configure: bool = True,
        queue_type: type = VirtQueue,
    ) -> None:
        self.fd = os.memfd_create("guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, mem_size)
        self.mem_size = mem_size
        self.mm = mmap.mmap(self.fd, mem_size)
        self.memory = GuestMemory()
        self.memory.add_region(os.dup(self.fd), BASE, mem_size, UVA, 0)
        self.drv = DriverQueue(memoryview(self.mm), BASE, size, event_idx=event_idx, start_idx=start_idx)
        self.vq = queue_type(max_size=max(size, 1024))
        self.vq.event_idx = event_idx
        self.vq.indirect = indirect
        if configure:
            self.vq.set_size(size)
            self.vq.next_avail = start_idx
            self.vq.set_addresses(self.memory, self.drv.desc_gpa, self.drv.avail_gpa, self.drv.used_gpa)

    def close(self) -> None:
        self.memory.close()
        os.close(self.fd)

    def pop(self) -> DescriptorChain | None:
        return self.vq.pop(self.memory)

    def complete(self, chain: DescriptorChain, data: bytes = b"") -> None:
        """Device: write ``data`` across the writable views and return it."""
        assert scatter(chain.writable, [data]) == len(data)
        self.vq.add_used(self.memory, chain.head, len(data))


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def expect_chain_error(r: Rig, head: int | None, match: str | None = None) -> VringError:
    before = r.vq.next_avail
    with pytest.raises(VringError, match=match) as info:
        r.pop()
    err = info.value
    assert isinstance(err, ProtocolError)
    assert err.head == head
    if head is not None:
        assert r.vq.next_avail == (before + 1) & 0xFFFF  # consumed
        assert not r.vq.broken
    return err


# -- configuration ------------------------------------------------------------------


def test_unconfigured_queue_pops_nothing(rig: Rig) -> None:
    vq = VirtQueue()
    assert not vq.is_configured
    assert vq.pop(rig.memory) is None
    assert vq.needs_notification(rig.memory) is False
    with pytest.raises(VringError):
        vq.add_used(rig.memory, 0, 0)
    assert rig.vq.is_configured
    assert (rig.vq.desc_gpa, rig.vq.avail_gpa, rig.vq.used_gpa) == (
        rig.drv.desc_gpa,
        rig.drv.avail_gpa,
        rig.drv.used_gpa,
    )


@pytest.mark.parametrize("size", [0, 3, 6, 100, 2048, 65536, -1])
def test_bad_size(size: int) -> None:
    vq = VirtQueue(max_size=1024)
    with pytest.raises(VringError):
        vq.set_size(size)
    assert vq.size == 0


def test_good_sizes() -> None:
    vq = VirtQueue(max_size=32768)
    for size in (1, 2, 256, 32768):
        vq.set_size(size)
        assert vq.size == size


def test_addresses_need_a_size(rig: Rig) -> None:
    vq = VirtQueue()
    with pytest.raises(VringError):
        vq.set_addresses(rig.memory, rig.drv.desc_gpa, rig.drv.avail_gpa, rig.drv.used_gpa)


@pytest.mark.parametrize("which, delta", [(0, 8), (0, 2), (1, 1), (2, 2), (2, 1)])
def test_misaligned_addresses(rig: Rig, which: int, delta: int) -> None:
    addrs = [rig.drv.desc_gpa, rig.drv.avail_gpa, rig.drv.used_gpa]
    addrs[which] += delta
    vq = VirtQueue()
    vq.set_size(16)
    with pytest.raises(VringError, match="aligned"):
        vq.set_addresses(rig.memory, *addrs)
    assert not vq.is_configured


@pytest.mark.parametrize("which", [0, 1, 2])
def test_rings_outside_memory(rig: Rig, which: int) -> None:
    end = BASE + rig.mem_size
    addrs = [rig.drv.desc_gpa, rig.drv.avail_gpa, rig.drv.used_gpa]
    addrs[which] = end - 16  # starts inside, ends outside
    vq = VirtQueue()
    vq.set_size(16)
    with pytest.raises(VringError):
        vq.set_addresses(rig.memory, *addrs)
    addrs[which] = 0x1000  # not mapped at all
    with pytest.raises(VringError):
        vq.set_addresses(rig.memory, *addrs)
    assert not vq.is_configured


def test_event_fields_must_be_mapped(rig: Rig) -> None:
    # The avail ring fits without used_event but not with it.
    end = BASE + rig.mem_size
    vq = VirtQueue()
    vq.set_size(16)
    with pytest.raises(VringError):
        vq.set_addresses(rig.memory, rig.drv.desc_gpa, end - (avail_ring_size(16) - 2), rig.drv.used_gpa)
    vq.set_addresses(rig.memory, rig.drv.desc_gpa, end - avail_ring_size(16), rig.drv.used_gpa)
    assert vq.is_configured


def test_set_size_forgets_addresses(rig: Rig) -> None:
    rig.vq.set_size(16)  # same size: kept
    assert rig.vq.is_configured
    rig.vq.set_size(8)
    assert not rig.vq.is_configured


@pytest.mark.parametrize("value", [-1, 65536, 2**32])
def test_bad_base(rig: Rig, value: int) -> None:
    with pytest.raises(VringError):
        rig.vq.next_avail = value
    with pytest.raises(VringError):
        rig.vq.next_used = value


def test_used_index_is_read_from_the_ring() -> None:
    r = Rig(start_idx=1234)
    assert r.vq.next_avail == 1234
    assert r.vq.next_used == 1234
    r.close()


def test_reset_keeps_features(rig: Rig) -> None:
    rig.drv.add_chain([b"x"], [])
    rig.drv.publish()
    rig.vq.reset()
    assert not rig.vq.is_configured
    assert rig.vq.size == 0
    assert rig.vq.next_avail == 0
    assert rig.vq.indirect is True
    assert rig.pop() is None


# -- data path -------------------------------------------------------------------------


def test_simple_chain(rig: Rig) -> None:
    head = rig.drv.add_chain([b"header", b"body!"], [8, 32])
    assert rig.pop() is None  # not published yet
    assert rig.drv.publish() == 1
    chain = rig.pop()
    assert chain is not None
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"header", b"body!"]
    assert [len(v) for v in chain.writable] == [8, 32]
    assert chain.readable_len == 11
    assert chain.writable_len == 40
    assert all(not v.readonly for v in chain.writable)
    assert rig.pop() is None
    rig.complete(chain, b"0123456789")
    assert rig.vq.needs_notification(rig.memory) is True
    used = rig.drv.pop_used()
    assert used is not None
    assert used == (head, 10, [b"01234567", b"89"])
    assert rig.drv.pop_used() is None
    assert rig.drv.num_free == 16


def test_readable_only_and_writable_only(rig: Rig) -> None:
    a = rig.drv.add_chain([b"only readable"], [])
    b = rig.drv.add_chain([], [4, 4])
    rig.drv.publish()
    ca, cb = rig.pop(), rig.pop()
    assert (ca.head, ca.writable, ca.readable_len) == (a, [], 13)
    assert (cb.head, cb.readable, cb.writable_len) == (b, [], 8)
    rig.complete(cb, b"wxyz!")
    rig.complete(ca)
    assert rig.drv.pop_used() == (b, 5, [b"wxyz", b"!"])
    assert rig.drv.pop_used() == (a, 0, [])


def test_zero_length_descriptors_yield_no_views(rig: Rig) -> None:
    rig.drv.add_chain([b"", b"abc"], [0, 5])
    rig.drv.publish()
    chain = rig.pop()
    assert [bytes(v) for v in chain.readable] == [b"abc"]
    assert [len(v) for v in chain.writable] == [5]


def test_indirect_chain(rig: Rig) -> None:
    head = rig.drv.add_chain([b"in", b"direct"], [3, 3, 3], indirect=True)
    assert rig.drv.num_free == 15  # one main descriptor
    rig.drv.publish()
    chain = rig.pop()
    assert chain.head == head
    assert [bytes(v) for v in chain.readable] == [b"in", b"direct"]
    assert [len(v) for v in chain.writable] == [3, 3, 3]
    rig.complete(chain, b"abcdefg")
    assert rig.drv.pop_used() == (head, 7, [b"abc", b"def", b"g"])
    assert rig.drv.num_free == 16


def test_indirect_chain_longer_than_a_small_queue() -> None:
    r = Rig(size=2)
    r.drv.add_chain([b"a", b"b"], [1], indirect=True)
    r.drv.add_chain([b"c"], [1, 1], indirect=True)
    r.drv.publish()
    assert r.pop().readable_len == 2
    assert r.pop().writable_len == 2
    r.close()


@pytest.mark.parametrize("entries, ok", [(1024, True), (1025, False)])
def test_indirect_chain_length_limit(rig: Rig, entries: int, ok: bool) -> None:
    buf = rig.drv.alloc(1)
    table = rig.drv.alloc(16 * entries)
    rig.drv.write_table(table, [(buf, 1, N if i + 1 < entries else 0, i + 1) for i in range(entries)])
    rig.drv.write_desc(0, table, 16 * entries, I)
    publish_raw(rig, 0)
    if ok:
        assert rig.pop().readable_len == entries
    else:
        expect_chain_error(rig, 0, "too long")


def test_direct_descriptors_then_indirect(rig: Rig) -> None:
    drv = rig.drv
    a = drv.alloc(4)
    drv.write(a, b"head")
    table = drv.alloc(32)
    b = drv.alloc(4)
    drv.write(b, b"tail")
    c = drv.alloc(8)
    drv.write_table(table, [(b, 4, N, 1), (c, 8, W, 0)])
    drv.write_desc(0, a, 4, N, 5)
    drv.write_desc(5, table, 32, I | W, 0)  # WRITE on the table descriptor is ignored
    drv.push_head(0)
    drv.publish()
    chain = rig.pop()
    assert chain.head == 0
    assert [bytes(v) for v in chain.readable] == [b"head", b"tail"]
    assert chain.writable_len == 8


def test_descriptor_spanning_adjacent_regions() -> None:
    r = Rig()
    # Re-map the same memfd as two adjacent regions split at an odd offset.
    split = 0x2_0123
    r.memory.clear()
    r.memory.add_region(os.dup(r.fd), BASE, split, UVA, 0)
    r.memory.add_region(os.dup(r.fd), BASE + split, r.mem_size - split, UVA + 0x100_0000, split)
    payload = bytes(range(256)) * 4
    gpa = BASE + split - 100
    r.drv.write(gpa, payload)
    r.drv.write_desc(3, gpa, len(payload), W)
    r.drv.push_head(3)
    r.drv.publish()
    chain = r.pop()  # rings are looked up again in the new memory table
    assert [len(v) for v in chain.writable] == [100, len(payload) - 100]
    assert b"".join(chain.writable) == payload
    r.close()


def test_fill_the_whole_ring_and_complete_out_of_order() -> None:
    r = Rig(size=8)
    heads = [r.drv.add_chain([bytes([i])], [1]) for i in range(2)]  # 2 descriptors each
    heads += [r.drv.add_chain([bytes([i])], [1], indirect=True) for i in range(2, 6)]
    assert r.drv.num_free == 0
    with pytest.raises(DriverQueueFull):
        r.drv.add_chain([b"x"], [], indirect=True)
    r.drv.publish()
    chains = r.vq.pop_many(r.memory, 100)
    assert [c.head for c in chains] == heads
    assert [bytes(c.readable[0]) for c in chains] == [bytes([i]) for i in range(6)]
    for c in reversed(chains):
        r.complete(c, bytes([0x80 | c.head]))
    got = [r.drv.pop_used() for _ in range(6)]
    assert [(u.head, u.data) for u in got] == [(c.head, [bytes([0x80 | c.head])]) for c in reversed(chains)]
    assert r.drv.pop_used() is None
    assert r.drv.num_free == 8
    # a full ring of single-descriptor chains: avail idx exactly size ahead
    heads = [r.drv.add_chain([], [1]) for _ in range(8)]
    r.drv.publish()
    assert [c.head for c in r.vq.pop_many(r.memory, 100)] == heads
    r.close()


def test_pop_many_respects_limit(rig: Rig) -> None:
    for _ in range(5):
        rig.drv.add_chain([b"x"], [])
    rig.drv.publish()
    assert len(rig.vq.pop_many(rig.memory, 3)) == 3
    assert len(rig.vq.pop_many(rig.memory, 3)) == 2
    assert rig.vq.pop_many(rig.memory, 3) == []


@pytest.mark.parametrize("start", [65530, 65535, 0xFFF0])
def test_indices_wrap_past_65535(start: int) -> None:
    r = Rig(size=8, start_idx=start, event_idx=True)
    total = 0
    for round_ in range(12):
        heads = [r.drv.add_chain([bytes([round_, k])], [2], indirect=k == 1) for k in range(3)]
        r.drv.publish()
        chains = [r.pop() for _ in range(3)]
        assert r.pop() is None
        assert [c.head for c in chains] == heads
        for c in chains:
            r.complete(c, bytes(c.readable[0]))
        assert r.vq.needs_notification(r.memory) in (True, False)
        for c in chains:
            assert r.drv.pop_used() == (c.head, 2, [bytes(c.readable[0])])
        total += 3
        assert r.vq.next_avail == (start + total) & 0xFFFF
        assert r.vq.next_used == (start + total) & 0xFFFF
        assert r.drv.used_idx() == (start + total) & 0xFFFF
    r.close()


def test_memory_changes_are_followed(rig: Rig) -> None:
    rig.drv.add_chain([b"one"], [])
    rig.drv.publish()
    first = rig.pop()
    rig.memory.clear()
    rig.drv.add_chain([b"two"], [])
    rig.drv.publish()
    with pytest.raises(VringError) as info:
        rig.pop()  # rings are gone
    assert info.value.head is None
    rig.memory.add_region(os.dup(rig.fd), BASE, rig.mem_size, UVA, 0)
    assert bytes(rig.pop().readable[0]) == b"two"
    assert bytes(first.readable[0]) == b"one"  # old views stay valid
    rig.vq.add_used(rig.memory, first.head, 0)
    assert rig.drv.pop_used().head == first.head


def test_add_used_checks(rig: Rig) -> None:
    with pytest.raises(VringError):
        rig.vq.add_used(rig.memory, 16, 0)
    with pytest.raises(VringError):
        rig.vq.add_used(rig.memory, -1, 0)
    with pytest.raises(VringError):
        rig.vq.add_used(rig.memory, 0, 2**32)
    assert rig.drv.used_idx() == 0


# -- notifications -------------------------------------------------------------------


def test_vring_need_event() -> None:
    assert vring_need_event(5, 6, 5)  # entry 5 written
    assert not vring_need_event(6, 6, 5)
    assert vring_need_event(5, 10, 0)
    assert not vring_need_event(10, 10, 0)
    assert vring_need_event(0xFFFF, 2, 0xFFFE)  # across the wrap
    assert not vring_need_event(3, 2, 0xFFFE)
    assert not vring_need_event(7, 7, 7)


def test_no_interrupt_flag(rig: Rig) -> None:
    rig.drv.add_chain([b"a"], [])
    rig.drv.add_chain([b"b"], [])
    rig.drv.publish()
    a, b = rig.pop(), rig.pop()
    rig.drv.disable_interrupts()
    rig.complete(a)
    assert rig.vq.needs_notification(rig.memory) is False
    assert rig.drv.enable_interrupts() is True  # one is pending already
    rig.complete(b)
    assert rig.vq.needs_notification(rig.memory) is True


def test_no_notify_flag(rig: Rig) -> None:
    rig.vq.disable_notification(rig.memory)
    rig.drv.add_chain([b"a"], [])
    rig.drv.publish()
    assert rig.drv.needs_kick() is False
    assert rig.vq.enable_notification(rig.memory) is True  # must re-check
    rig.drv.add_chain([b"b"], [])
    rig.drv.publish()
    assert rig.drv.needs_kick() is True
    assert rig.drv.needs_kick() is False  # nothing new published


def test_used_event_suppresses_notifications() -> None:
    r = Rig(event_idx=True, start_idx=65534)
    for _ in range(6):
        r.drv.add_chain([b"x"], [])
    r.drv.publish()
    chains = r.vq.pop_many(r.memory, 6)
    # first decision is always a notification
    r.complete(chains[0])  # used idx 65534 -> 65535
    assert r.vq.needs_notification(r.memory) is True
    # driver: interrupt me when used entry 1 is written (used idx reaches 2)
    r.drv.set_used_event(1)
    r.complete(chains[1])  # -> 0
    assert r.vq.needs_notification(r.memory) is False
    r.complete(chains[2])  # -> 1
    assert r.vq.needs_notification(r.memory) is False
    r.complete(chains[3])  # -> 2: entry 1 written
    assert r.vq.needs_notification(r.memory) is True
    r.complete(chains[4])  # -> 3: event already passed
    assert r.vq.needs_notification(r.memory) is False
    # several add_used between decisions: crossing counts
    r.drv.set_used_event(3)
    r.complete(chains[5])  # -> 4, entry 3 written
    assert r.vq.needs_notification(r.memory) is True
    r.close()


def test_used_event_batch_crossing() -> None:
    r = Rig(event_idx=True)
    for _ in range(5):
        r.drv.add_chain([b"x"], [])
    r.drv.publish()
    chains = r.vq.pop_many(r.memory, 5)
    r.complete(chains[0])
    assert r.vq.needs_notification(r.memory) is True  # used idx 1
    r.drv.set_used_event(2)
    for c in chains[1:]:
        r.complete(c)  # 1 -> 5, passes entry 2
    assert r.vq.needs_notification(r.memory) is True
    assert r.vq.needs_notification(r.memory) is False  # nothing new


def test_avail_event_suppresses_kicks() -> None:
    r = Rig(event_idx=True, start_idx=65535)
    assert r.vq.enable_notification(r.memory) is False  # avail_event = 65535
    r.drv.add_chain([b"1"], [])
    r.drv.publish()
    assert r.drv.needs_kick() is True  # entry 65535 published
    r.drv.add_chain([b"2"], [])
    r.drv.publish()
    assert r.drv.needs_kick() is False  # device has not caught up
    assert r.pop() is not None
    assert r.pop() is not None
    assert r.pop() is None  # drained: re-arms avail_event = 1
    r.drv.add_chain([b"3"], [])
    r.drv.add_chain([b"4"], [])
    r.drv.publish()
    assert r.drv.needs_kick() is True
    r.close()


def test_disabled_event_idx_notifications_do_not_rearm() -> None:
    r = Rig(event_idx=True)
    r.vq.disable_notification(r.memory)
    r.drv.add_chain([b"1"], [])
    r.drv.publish()
    assert r.drv.needs_kick() is True  # avail_event 0 initially
    assert r.pop() is not None
    assert r.pop() is None  # disabled: avail_event stays at 0
    r.drv.add_chain([b"2"], [])
    r.drv.publish()
    assert r.drv.needs_kick() is False
    assert r.vq.enable_notification(r.memory) is True  # buffer 2 is waiting
    r.close()


def test_used_flags_without_event_idx_ignore_used_event(rig: Rig) -> None:
    rig.drv.add_chain([b"a"], [])
    rig.drv.publish()
    rig.drv.set_used_event(100)  # meaningless without EVENT_IDX
    rig.complete(rig.pop())
    assert rig.vq.needs_notification(rig.memory) is True


# -- malformed chains -------------------------------------------------------------------


def publish_raw(r: Rig, head: int) -> None:
    r.drv.push_head(head)
    r.drv.publish()


def test_address_outside_memory_then_queue_continues(rig: Rig) -> None:
    rig.drv.write_desc(2, 0x1000, 16, 0)
    publish_raw(rig, 2)
    good = rig.drv.alloc(4)
    rig.drv.write(good, b"good")
    rig.drv.write_desc(3, good, 4, 0)
    publish_raw(rig, 3)
    err = expect_chain_error(rig, 2)
    # the caller returns the bad head with length 0
    rig.vq.add_used(rig.memory, err.head, 0)
    assert rig.drv.pop_used_raw() == (2, 0)
    chain = rig.pop()
    assert chain.head == 3
    assert bytes(chain.readable[0]) == b"good"


@pytest.mark.parametrize(
    "addr, length",
    [
        (BASE + MEM_SIZE - 8, 16),  # runs off the end
        (BASE - 8, 16),  # starts before
        (2**64 - 8, 16),  # wraps 2**64
        (2**64 - 1, 0xFFFF_FFFF),
    ],
)
def test_bad_buffer_addresses(rig: Rig, addr: int, length: int) -> None:
    ok = rig.drv.alloc(8)
    rig.drv.write_desc(0, ok, 8, N, 1)
    rig.drv.write_desc(1, addr, length, W)
    publish_raw(rig, 0)
    expect_chain_error(rig, 0)


def test_next_index_out_of_range(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    rig.drv.write_desc(0, ok, 8, N, 16)
    publish_raw(rig, 0)
    expect_chain_error(rig, 0, "out of range")


def test_head_out_of_range(rig: Rig) -> None:
    publish_raw(rig, 16)
    expect_chain_error(rig, None)
    assert not rig.vq.broken
    ok = rig.drv.alloc(8)
    rig.drv.write_desc(0, ok, 8, 0)
    publish_raw(rig, 0)
    assert rig.pop().head == 0


@pytest.mark.parametrize(
    "links",
    [
        [(0, 0)],  # a -> a
        [(0, 1), (1, 0)],  # a -> b -> a
        [(4, 9), (9, 15), (15, 9)],  # a -> b -> c -> b
    ],
)
def test_loops(rig: Rig, links: list[tuple[int, int]]) -> None:
    ok = rig.drv.alloc(8)
    for idx, nxt in links:
        rig.drv.write_desc(idx, ok, 8, N, nxt)
    publish_raw(rig, links[0][0])
    expect_chain_error(rig, links[0][0], "loop")


def test_chain_of_exactly_queue_size_is_fine() -> None:
    r = Rig(size=4)
    ok = r.drv.alloc(8)
    for i in range(4):
        r.drv.write_desc(i, ok, 8, N if i < 3 else 0, i + 1)
    publish_raw(r, 0)
    assert r.pop().readable_len == 32
    r.close()


def test_loop_inside_indirect_table(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    table = rig.drv.alloc(48)
    rig.drv.write_table(table, [(ok, 8, N, 1), (ok, 8, N, 2), (ok, 8, N, 0)])
    rig.drv.write_desc(7, table, 48, I)
    publish_raw(rig, 7)
    expect_chain_error(rig, 7, "loop")


def test_indirect_next_out_of_table(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    table = rig.drv.alloc(32)
    rig.drv.write_table(table, [(ok, 8, N, 1), (ok, 8, N, 2)])
    rig.drv.write_desc(7, table, 32, I)
    publish_raw(rig, 7)
    expect_chain_error(rig, 7, "out of range")


def test_indirect_inside_indirect(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    inner = rig.drv.alloc(16)
    rig.drv.write_table(inner, [(ok, 8, 0, 0)])
    outer = rig.drv.alloc(32)
    rig.drv.write_table(outer, [(ok, 8, N, 1), (inner, 16, I, 0)])
    rig.drv.write_desc(1, outer, 32, I)
    publish_raw(rig, 1)
    expect_chain_error(rig, 1, "inside an indirect")


def test_indirect_without_feature() -> None:
    r = Rig(indirect=False)
    r.drv.add_chain([b"x"], [1], indirect=True)
    r.drv.add_chain([b"y"], [1])
    r.drv.publish()
    err = expect_chain_error(r, 0, "INDIRECT_DESC")
    r.vq.add_used(r.memory, err.head, 0)
    assert r.drv.pop_used() == (0, 0, [b""])
    assert bytes(r.pop().readable[0]) == b"y"
    r.close()


@pytest.mark.parametrize(
    "length, flags, reason",
    [(0, I, "multiple of 16"), (24, I, "multiple of 16"), (17, I, "multiple of 16"), (32, I | N, "NEXT")],
)
def test_bad_indirect_descriptor(rig: Rig, length: int, flags: int, reason: str) -> None:
    ok = rig.drv.alloc(8)
    table = rig.drv.alloc(64)
    rig.drv.write_table(table, [(ok, 8, 0, 0), (ok, 8, 0, 0)])
    rig.drv.write_desc(3, table, length, flags, 4)
    rig.drv.write_desc(4, ok, 8, 0)
    publish_raw(rig, 3)
    expect_chain_error(rig, 3, reason)


def test_indirect_table_outside_memory(rig: Rig) -> None:
    rig.drv.write_desc(3, BASE + MEM_SIZE - 16, 32, I)
    publish_raw(rig, 3)
    expect_chain_error(rig, 3)


def test_readable_after_writable(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    rig.drv.write_desc(0, ok, 8, N | W, 1)
    rig.drv.write_desc(1, ok, 8, 0)
    publish_raw(rig, 0)
    expect_chain_error(rig, 0, "after a device-writable")


def test_readable_after_zero_length_writable(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    rig.drv.write_desc(0, ok, 0, N | W, 1)
    rig.drv.write_desc(1, ok, 8, 0)
    publish_raw(rig, 0)
    expect_chain_error(rig, 0, "after a device-writable")


def test_readable_after_writable_in_indirect_table(rig: Rig) -> None:
    ok = rig.drv.alloc(8)
    table = rig.drv.alloc(32)
    rig.drv.write_table(table, [(ok, 8, W | N, 1), (ok, 8, 0, 0)])
    rig.drv.write_desc(0, ok, 8, N | W, 1)
    rig.drv.write_desc(1, table, 32, I)
    publish_raw(rig, 0)
    expect_chain_error(rig, 0, "after a device-writable")


def test_total_length_over_4g() -> None:
    # A sparse 4 GiB + 1 MiB memfd: nothing is touched, the chain is only measured.
    r = Rig(mem_size=(1 << 32) + (1 << 20))
    r.drv.write_desc(0, BASE, 0xFFFF_FFFF, N, 1)
    r.drv.write_desc(1, BASE, 1, N, 2)
    r.drv.write_desc(2, BASE, 1, 0)
    publish_raw(r, 0)
    expect_chain_error(r, 0, "2\\*\\*32")
    # exactly 2**32 bytes is allowed
    r.drv.write_desc(3, BASE, 0xFFFF_FFFF, N, 4)
    r.drv.write_desc(4, BASE, 1, 0)
    publish_raw(r, 3)
    assert r.pop().readable_len == 1 << 32
    r.close()


def test_avail_index_jump_breaks_the_queue(rig: Rig) -> None:
    rig.drv.add_chain([b"x"], [])
    rig.drv.publish()
    assert rig.pop() is not None
    rig.drv.set_avail_idx(rig.vq.next_avail + 17)  # more than size ahead
    with pytest.raises(VringError) as info:
        rig.pop()
    assert info.value.head is None
    assert rig.vq.broken
    assert rig.pop() is None
    assert rig.pop() is None
    rig.vq.reset()
    assert not rig.vq.broken


def test_avail_index_exactly_size_ahead_is_fine(rig: Rig) -> None:
    for _ in range(16):
        rig.drv.add_chain([b"x"], [])
    rig.drv.publish()
    assert len(rig.vq.pop_many(rig.memory, 100)) == 16
    assert not rig.vq.broken


def test_avail_index_going_backwards_is_a_jump(rig: Rig) -> None:
    rig.drv.add_chain([b"x"], [])
    rig.drv.publish()
    rig.pop()
    rig.drv.set_avail_idx(0)  # behind next_avail = 1: 65535 ahead
    with pytest.raises(VringError):
        rig.pop()
    assert rig.vq.broken


def test_enable_notification_sees_a_jump() -> None:
    r = Rig(event_idx=True)
    r.drv.set_avail_idx(100)
    with pytest.raises(VringError):
        r.vq.enable_notification(r.memory)
    assert r.vq.broken
    assert r.vq.enable_notification(r.memory) is False
    r.close()


def test_pop_many_defers_an_error_after_good_chains(rig: Rig) -> None:
    rig.drv.add_chain([b"a"], [])
    rig.drv.add_chain([b"b"], [])
    rig.drv.write_desc(10, 0x10, 8, 0)  # unmapped
    publish_raw(rig, 10)
    rig.drv.add_chain([b"c"], [])
    rig.drv.publish()
    first = rig.vq.pop_many(rig.memory, 10)
    assert [bytes(c.readable[0]) for c in first] == [b"a", b"b"]
    with pytest.raises(VringError) as info:
        rig.vq.pop_many(rig.memory, 10)
    assert info.value.head == 10
    assert [bytes(c.readable[0]) for c in rig.vq.pop_many(rig.memory, 10)] == [b"c"]


# -- pop_serving: small chains answered in place -----------------------------------------------


class EchoResponder:
    """Answers requests that start with b"E": the rest of the request,
    reversed, cut to the room; records every offer."""

    def __init__(self, answer: bytes = b"E") -> None:
        self.answer = answer
        self.offers: list[tuple[bytes, int]] = []

    def respond(self, request: bytes, room: int) -> bytes | None:
        self.offers.append((request, room))
        if not request.startswith(self.answer):
            return None
        return request[:0:-1][:room]


def test_pop_serving_answers_in_place_and_hands_back_the_rest(rig: Rig) -> None:
    echo = rig.drv.add_chain([b"Eab", b"cdef"], [2, 8])
    other = rig.drv.add_chain([b"Nxyz"], [8])
    rig.drv.publish()
    responder = EchoResponder()
    chains, served = rig.vq.pop_serving(rig.memory, 10, responder)
    assert served == 1
    assert [c.head for c in chains] == [other]
    assert responder.offers == [(b"Eabcdef", 10), (b"Nxyz", 8)]
    # the reply crossed both writable buffers; the used length is its size
    assert rig.drv.pop_used() == (echo, 6, [b"fe", b"dcba"])
    assert rig.vq.needs_notification(rig.memory) is True
    rig.complete(chains[0], b"done")
    assert rig.drv.pop_used() == (other, 4, [b"done"])


def test_pop_serving_limit_counts_both_kinds(rig: Rig) -> None:
    heads = [rig.drv.add_chain([(b"E" if i % 2 else b"N") + bytes([65 + i])], [4]) for i in range(6)]
    rig.drv.publish()
    responder = EchoResponder()
    chains, served = rig.vq.pop_serving(rig.memory, 3, responder)
    assert (served, len(chains)) == (1, 2)  # N, E, N
    chains2, served2 = rig.vq.pop_serving(rig.memory, 10, responder)
    assert (served2, len(chains2)) == (2, 1)  # E, N, E
    assert rig.vq.pop_serving(rig.memory, 10, responder) == ([], 0)
    assert [c.head for c in chains + chains2] == heads[0::2]
    assert [rig.drv.pop_used()[:2] for _ in range(3)] == [(h, 1) for h in heads[1::2]]


@pytest.mark.parametrize("budget, per_call", [(0, [5]), (1, [1] * 5), (14, [2, 2, 1]), (15, [3, 2])])
def test_pop_serving_byte_budget_stops_after_that_many_bytes(rig: Rig, budget: int, per_call: list[int]) -> None:
    """Chains of a 4-byte request and a 3-byte reply: a call stops at the
    first one that brings the bytes carried to ``budget`` (0: no bound)."""
    heads = [rig.drv.add_chain([b"Exyz"], [8]) for _ in range(5)]
    rig.drv.publish()
    responder = EchoResponder()
    calls = []
    while True:
        chains, served = rig.vq.pop_serving(rig.memory, 16, responder, budget)
        assert chains == []
        if not served:
            break
        calls.append(served)
    assert calls == per_call
    assert [rig.drv.pop_used()[:2] for _ in heads] == [(h, 3) for h in heads]


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


@pytest.mark.parametrize("no_interrupt, signals", [(False, 2), (True, 0)])
def test_pop_serving_signals_each_chunk_itself_and_goes_on(no_interrupt: bool, signals: int) -> None:
    """With a notify fd, a chunk of ``signal_every`` replies gets its
    notification decision (and, if due, an eventfd write) in the call, which
    goes on; the last chunk's decision is the caller's."""
    r = Rig()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        heads = [r.drv.add_chain([b"Exyz"], [8]) for _ in range(7)]
        r.drv.set_no_interrupt(no_interrupt)
        r.drv.publish()
        chains, served = r.vq.pop_serving(r.memory, 16, EchoResponder(), 0, 3, efd)
        assert (chains, served) == ([], 7)
        assert _eventfd_count(efd) == signals  # after replies 3 and 6
        assert r.vq.needs_notification(r.memory) is not no_interrupt
        assert [r.drv.pop_used()[:2] for _ in heads] == [(h, 3) for h in heads]
    finally:
        os.close(efd)
        r.close()


def test_pop_serving_chunks_without_a_notify_fd_end_the_call(rig: Rig) -> None:
    for _ in range(7):
        rig.drv.add_chain([b"Exyz"], [8])
    rig.drv.publish()
    calls = []
    while served := rig.vq.pop_serving(rig.memory, 16, EchoResponder(), 0, 3)[1]:
        calls.append(served)
    assert calls == [3, 3, 1]


def test_pop_serving_chunk_decisions_follow_used_event() -> None:
    """EVENT_IDX: the driver wants a call once the 5th reply is used; of the
    decisions after replies 2, 4, 6 and 8, the first (always) and the one
    crossing used_event signal."""
    r = Rig(size=32, event_idx=True)
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for _ in range(9):
            r.drv.add_chain([b"Exyz"], [8])
        r.drv.set_used_event(4)
        r.drv.publish()
        assert r.vq.pop_serving(r.memory, 16, EchoResponder(), 0, 2, efd) == ([], 9)
        assert _eventfd_count(efd) == 2
        assert r.vq.needs_notification(r.memory) is False  # reply 9: used_event 4 long passed
    finally:
        os.close(efd)
        r.close()


@pytest.mark.parametrize("budget, chunks", [(14, 3), (0, 1)])
def test_pop_serving_byte_budget_chunks_with_a_notify_fd(budget: int, chunks: int) -> None:
    """Each byte-budget chunk but the last is signalled in the call."""
    r = Rig()
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        for _ in range(5):
            r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert r.vq.pop_serving(r.memory, 16, EchoResponder(), budget, 0, efd) == ([], 5)
        assert _eventfd_count(efd) == chunks - 1  # chunks of 2, 2, 1 (7 bytes each)
    finally:
        os.close(efd)
        r.close()


# -- serve_kick: one call per kick ----------------------------------------------------------------


def _serving_rig(**kw: object) -> tuple[Rig, int]:
    return Rig(**kw), os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # type: ignore[arg-type]


def test_serve_kick_answers_everything_then_asks_for_kicks_and_signals_once() -> None:
    r, efd = _serving_rig()
    try:
        heads = [r.drv.add_chain([b"Exyz"], [8]) for _ in range(5)]
        r.drv.publish()
        assert r.vq.serve_kick(r.memory, 64, EchoResponder(), 0, 0, efd) == ([], 5)
        assert _eventfd_count(efd) == 1
        assert [r.drv.pop_used()[:2] for _ in heads] == [(h, 3) for h in heads]
        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert r.drv.needs_kick() is True  # kicks are on again
    finally:
        os.close(efd)
        r.close()


def test_serve_kick_hands_back_chains_for_the_full_path_with_kicks_off() -> None:
    r, efd = _serving_rig()
    try:
        first = r.drv.add_chain([b"Eab"], [8])
        other = r.drv.add_chain([b"Nxy"], [8])
        last = r.drv.add_chain([b"Ecd"], [8])
        r.drv.publish()
        responder = EchoResponder()
        chains, answered = r.vq.serve_kick(r.memory, 64, responder, 0, 0, efd)
        assert ([c.head for c in chains], answered) == ([other], 2)
        assert _eventfd_count(efd) == 1  # the answered ones are signalled
        assert [r.drv.pop_used()[:2] for _ in range(2)] == [(first, 2), (last, 2)]
        r.drv.add_chain([b"Eef"], [8])
        r.drv.publish()
        assert r.drv.needs_kick() is False  # the caller pops on
    finally:
        os.close(efd)
        r.close()


def test_serve_kick_takes_at_most_limit_and_leaves_kicks_off() -> None:
    r, efd = _serving_rig()
    try:
        for _ in range(6):
            r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert r.vq.serve_kick(r.memory, 4, EchoResponder(), 0, 0, efd) == ([], 4)
        assert _eventfd_count(efd) == 1
        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert r.drv.needs_kick() is False
        assert r.vq.serve_kick(r.memory, 64, EchoResponder(), 0, 0, efd) == ([], 3)
    finally:
        os.close(efd)
        r.close()


def test_serve_kick_serves_what_comes_while_it_answers() -> None:
    """Buffers the driver adds while the responder works are served in the
    same call (the ring is read again until it is empty)."""
    r, efd = _serving_rig()
    try:
        class Adding(EchoResponder):
            def respond(self, request: bytes, room: int) -> bytes | None:
                if len(self.offers) < 3:
                    r.drv.add_chain([b"Emore"], [8])
                    r.drv.publish()
                return super().respond(request, room)

        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert r.vq.serve_kick(r.memory, 64, Adding(), 0, 0, efd) == ([], 4)
        assert _eventfd_count(efd) == 1
    finally:
        os.close(efd)
        r.close()


def test_serve_kick_signals_as_used_event_asks() -> None:
    r, efd = _serving_rig(size=32, event_idx=True)
    try:
        def kick(count: int, used_event: int) -> int:
            for _ in range(count):
                r.drv.add_chain([b"Exyz"], [8])
            r.drv.set_used_event(used_event)
            r.drv.publish()
            assert r.vq.serve_kick(r.memory, 64, EchoResponder(), 0, 0, efd) == ([], count)
            while r.drv.pop_used() is not None:
                pass
            return _eventfd_count(efd)

        assert kick(2, 0) == 1  # the first decision always signals
        assert kick(2, 100) == 0  # replies 3 and 4: used_event 100 not crossed
        assert kick(2, 4) == 1  # reply 5 crosses used_event 4
    finally:
        os.close(efd)
        r.close()


def test_serve_kick_without_a_notify_fd_leaves_the_decision_to_the_caller(rig: Rig) -> None:
    for _ in range(3):
        rig.drv.add_chain([b"Exyz"], [8])
    rig.drv.publish()
    assert rig.vq.serve_kick(rig.memory, 64, EchoResponder()) == ([], 3)
    assert rig.vq.needs_notification(rig.memory) is True


def test_serve_kick_raises_a_malformed_chain_after_signalling_the_answers() -> None:
    r, efd = _serving_rig()
    try:
        good = r.drv.add_chain([b"Exyz"], [8])
        ok = r.drv.alloc(8)
        r.drv.write_desc(15, ok, 8, N, 15)  # a descriptor that chains to itself
        r.drv.push_head(15)
        r.drv.publish()
        with pytest.raises(VringError, match="loop") as info:
            r.vq.serve_kick(r.memory, 64, EchoResponder(), 0, 0, efd)
        assert info.value.head == 15
        assert _eventfd_count(efd) == 1
        assert r.drv.pop_used()[:2] == (good, 3)
        assert r.vq.serve_kick(r.memory, 64, EchoResponder(), 0, 0, efd) == ([], 0)
    finally:
        os.close(efd)
        r.close()


# -- KickServer: a kick served from the event loop's wake-up path -------------------------------


class _Handler:
    """What the transport's handler offers the KickServer: ``inline_responder``."""

    def __init__(self, responder: object) -> None:
        self.inline_responder = responder


class _Device:
    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory


def _kick_server(r: Rig, efd: int, responder: object, limit: int = 64) -> tuple[object, list[tuple[object, object]]]:
    handed: list[tuple[object, object]] = []
    server = r.vq.kick_server(_Device(r.memory), _Handler(responder), limit, 0, 0, efd,
                              lambda chains, exc: handed.append((chains, exc)))
    return server, handed


def test_kick_server_is_of_the_queue_s_implementation() -> None:
    r, efd = _serving_rig()
    try:
        server, _ = _kick_server(r, efd, EchoResponder())
        assert type(server).__module__ == type(r.vq).__module__
    finally:
        os.close(efd)
        r.close()


def test_kick_server_serves_only_when_armed_with_a_responder() -> None:
    r, efd = _serving_rig()
    try:
        server, handed = _kick_server(r, efd, EchoResponder())
        heads = [r.drv.add_chain([b"Exyz"], [8]) for _ in range(3)]
        r.drv.publish()
        assert server() is False  # not armed: the leader's kick
        assert r.vq.next_avail == 0 and _eventfd_count(efd) == 0
        server.arm(True)
        assert server() is True and server.armed
        assert [r.drv.pop_used()[:2] for _ in heads] == [(h, 3) for h in heads]
        assert _eventfd_count(efd) == 1 and handed == []
        assert r.drv.needs_kick() is True
        # no responder (no mount, or DEBUG logging): the leader serves, nothing is popped
        none, _ = _kick_server(r, efd, None)
        none.arm(True)
        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert none() is False and not none.armed
        assert r.vq.next_avail == 3
    finally:
        os.close(efd)
        r.close()


def test_kick_server_signals_the_notify_fd_it_has_now() -> None:
    r, efd = _serving_rig()
    other = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        server, _ = _kick_server(r, efd, EchoResponder())
        server.arm(True)
        server.notify_fd = other  # the frontend changed the call fd
        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert server() is True
        assert (_eventfd_count(other), _eventfd_count(efd)) == (1, 0)
    finally:
        os.close(other)
        os.close(efd)
        r.close()


def test_kick_server_reads_the_handler_s_responder_at_every_kick() -> None:
    r, efd = _serving_rig()
    try:
        first = EchoResponder()
        handler = _Handler(first)
        server = r.vq.kick_server(_Device(r.memory), handler, 64, 0, 0, efd, lambda c, e: None)
        server.arm(True)
        r.drv.add_chain([b"Eab"], [8])
        r.drv.publish()
        assert server() is True
        second = EchoResponder()
        handler.inline_responder = second
        r.drv.add_chain([b"Ecd"], [8])
        r.drv.publish()
        assert server() is True
        assert [o[0] for o in first.offers] == [b"Eab"] and [o[0] for o in second.offers] == [b"Ecd"]
    finally:
        os.close(efd)
        r.close()


def test_kick_server_hands_full_path_chains_over_and_disarms() -> None:
    r, efd = _serving_rig()
    try:
        server, handed = _kick_server(r, efd, EchoResponder())
        server.arm(True)
        r.drv.add_chain([b"Eab"], [8])
        other = r.drv.add_chain([b"Nxy"], [8])
        r.drv.publish()
        assert server() is False and not server.armed
        [(chains, exc)] = handed
        assert exc is None and [c.head for c in chains] == [other]
        assert r.drv.pop_used()[1] == 2  # the echo was answered
        assert r.drv.needs_kick() is False  # the leader pops on
    finally:
        os.close(efd)
        r.close()


def test_kick_server_wakes_the_leader_after_limit_chains() -> None:
    r, efd = _serving_rig()
    try:
        server, handed = _kick_server(r, efd, EchoResponder(), limit=4)
        server.arm(True)
        for _ in range(6):
            r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        assert server() is False and not server.armed and handed == []
        assert r.vq.next_avail == 4
    finally:
        os.close(efd)
        r.close()


def test_kick_server_hands_a_malformed_chain_over() -> None:
    r, efd = _serving_rig()
    try:
        server, handed = _kick_server(r, efd, EchoResponder())
        server.arm(True)
        r.drv.add_chain([b"Exyz"], [8])
        ok = r.drv.alloc(8)
        r.drv.write_desc(15, ok, 8, N, 15)  # a descriptor that chains to itself
        r.drv.push_head(15)
        r.drv.publish()
        assert server() is False and not server.armed
        [(chains, exc)] = handed
        assert chains is None and isinstance(exc, VringError) and exc.head == 15
        assert _eventfd_count(efd) == 1  # the answer before it was signalled
    finally:
        os.close(efd)
        r.close()


def test_kick_server_reader_consumes_the_counter_and_wakes_only_when_needed() -> None:
    r, efd = _serving_rig()
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        server, handed = _kick_server(r, efd, EchoResponder())
        wakes: list[int] = []
        failures: list[OSError] = []
        reader = server.attach(kick, lambda: wakes.append(1), failures.append)
        reader()  # nothing to read: nothing happens
        assert wakes == [] and failures == []
        server.arm(True)
        r.drv.add_chain([b"Exyz"], [8])
        r.drv.publish()
        os.eventfd_write(kick, 3)
        reader()
        assert wakes == [] and r.vq.next_avail == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(kick)  # consumed
        r.drv.add_chain([b"Nxyz"], [8])
        r.drv.publish()
        os.eventfd_write(kick, 1)
        reader()
        assert wakes == [1] and len(handed) == 1 and not server.armed
        os.eventfd_write(kick, 1)
        reader()  # disarmed: every kick wakes the leader
        assert wakes == [1, 1]
    finally:
        os.close(kick)
        os.close(efd)
        r.close()
    reader()  # the fd is gone: fail() gets the error
    assert [e.errno for e in failures] == [errno.EBADF]


def test_kick_server_reader_wakes_the_leader_when_serving_fails(caplog: pytest.LogCaptureFixture) -> None:
    r, efd = _serving_rig()
    kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    class Broken:
        @property
        def inline_responder(self) -> object:
            raise RuntimeError("boom")

    try:
        wakes: list[int] = []
        server = r.vq.kick_server(_Device(r.memory), Broken(), 64, 0, 0, efd, lambda c, e: None)
        reader = server.attach(kick, lambda: wakes.append(1), lambda exc: None)
        server.arm(True)
        os.eventfd_write(kick, 1)
        with caplog.at_level("ERROR"):
            reader()
        assert wakes == [1] and not server.armed
        assert "serving a kick failed" in caplog.text
    finally:
        os.close(kick)
        os.close(efd)
        r.close()


@pytest.mark.parametrize(
    "readable, writable, offered",
    [
        ([b"E" + b"x" * 511], [600], (b"E" + b"x" * 511, 512)),  # 512 readable bytes: offered, room capped
        ([b"E" + b"x" * 300, b"y" * 211], [16], (b"E" + b"x" * 300 + b"y" * 211, 16)),
        ([b"E" + b"x" * 512], [600], None),  # 513 readable bytes: never offered
        ([b"Eabc"], [], (b"Eabc", 0)),  # no room: offered all the same (a FORGET gets no reply)
        ([b"Eabc"], [0, 0], (b"Eabc", 0)),
    ],
)
def test_pop_serving_offers_only_small_chains(rig: Rig, readable: list[bytes], writable: list[int],
                                              offered: tuple[bytes, int] | None) -> None:
    head = rig.drv.add_chain(readable, writable)
    rig.drv.publish()
    responder = EchoResponder()
    chains, served = rig.vq.pop_serving(rig.memory, 4, responder)
    assert responder.offers == ([offered] if offered else [])
    if offered:
        assert (chains, served) == ([], 1)
        got = rig.drv.pop_used()
        assert got[0] == head and got[1] == min(len(b"".join(readable)) - 1, offered[1])
    else:
        assert served == 0 and [c.head for c in chains] == [head]


class BadResponder:
    def __init__(self, outcome: object) -> None:
        self.outcome = outcome

    def respond(self, request: bytes, room: int) -> object:
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize("outcome", [RuntimeError("bug"), b"x" * 9, 42, None])
def test_pop_serving_a_failing_or_oversized_answer_is_no_answer(rig: Rig, outcome: object) -> None:
    head = rig.drv.add_chain([b"Eabc"], [8])
    rig.drv.publish()
    chains, served = rig.vq.pop_serving(rig.memory, 4, BadResponder(outcome))
    assert served == 0 and [c.head for c in chains] == [head]
    assert rig.drv.pop_used() is None  # nothing was written or returned


def test_pop_serving_defers_an_error_after_a_served_chain(rig: Rig) -> None:
    served_head = rig.drv.add_chain([b"Ea"], [4])
    rig.drv.write_desc(10, 0x10, 8, 0)  # unmapped
    publish_raw(rig, 10)
    rig.drv.add_chain([b"Nc"], [4])
    rig.drv.publish()
    responder = EchoResponder()
    assert rig.vq.pop_serving(rig.memory, 10, responder) == ([], 1)
    assert rig.drv.pop_used()[0] == served_head
    with pytest.raises(VringError) as info:
        rig.vq.pop_serving(rig.memory, 10, responder)
    assert info.value.head == 10
    chains, served = rig.vq.pop_serving(rig.memory, 10, responder)
    assert served == 0 and [bytes(c.readable[0]) for c in chains] == [b"Nc"]


def test_pop_serving_indirect_chain(rig: Rig) -> None:
    head = rig.drv.add_chain([b"E12", b"34"], [1, 1, 1, 1], indirect=True)
    rig.drv.publish()
    assert rig.vq.pop_serving(rig.memory, 4, EchoResponder()) == ([], 1)
    assert rig.drv.pop_used() == (head, 4, [b"4", b"3", b"2", b"1"])


def test_pop_serving_buffers_across_regions() -> None:
    """A chain whose buffers cross two regions is served correctly, in place
    or by the full path (the compiled walk leaves such chains to it)."""
    r = Rig()
    split = 0x2_0123
    r.memory.clear()
    r.memory.add_region(os.dup(r.fd), BASE, split, UVA, 0)
    r.memory.add_region(os.dup(r.fd), BASE + split, r.mem_size - split, UVA + 0x100_0000, split)
    req, out = BASE + split - 3, BASE + split + 0x1000 - 2
    r.drv.write(req, b"Eabcdef")
    r.drv.write_desc(3, req, 7, N, 4)
    r.drv.write_desc(4, out, 6, W)
    r.drv.push_head(3)
    r.drv.publish()
    chains, served = r.vq.pop_serving(r.memory, 4, EchoResponder())
    if served:
        assert chains == []
    else:
        assert [bytes(v) for v in chains[0].readable] == [b"Eab", b"cdef"]
        r.complete(chains[0], b"fedcba")
    assert r.drv.read(out, 6) == b"fedcba"
    assert r.drv.pop_used_raw() == (3, 6)
    r.close()


# -- property tests -------------------------------------------------------------------------

payloads = st.lists(st.binary(max_size=40), max_size=3)
writable_lens = st.lists(st.integers(0, 48), max_size=3)


class QueueMachine(RuleBasedStateMachine):
    """Random well-formed driver/device interleavings keep both sides in
    agreement: contents, order, indices, and no lost notifications."""

    @initialize(
        size=st.sampled_from([1, 2, 4, 8, 16]),
        event_idx=st.booleans(),
        start=st.one_of(st.sampled_from([0, 65533, 65535]), st.integers(0, 65535)),
    )
    def setup(self, size: int, event_idx: bool, start: int) -> None:
        self.rig = Rig(size=size, event_idx=event_idx, start_idx=start, mem_size=128 * 1024)
        self.size = size
        self.expected: dict[int, tuple[list[bytes], list[int]]] = {}
        self.unpublished: list[int] = []
        self.published: collections.deque[int] = collections.deque()
        self.device: list[DescriptorChain] = []
        self.used: collections.deque[tuple[int, int, bytes]] = collections.deque()
        self.device_idle = False  # pop found nothing: waiting for a kick
        self.driver_waiting = False  # enabled interrupts with nothing pending
        self.popped = 0

    def teardown(self) -> None:
        if hasattr(self, "rig"):
            self.device.clear()
            self.rig.close()

    @rule(readable=payloads, wlens=writable_lens, indirect=st.booleans())
    def add(self, readable: list[bytes], wlens: list[int], indirect: bool) -> None:
        if not readable and not wlens:
            return
        needed = 1 if indirect else len(readable) + len(wlens)
        if needed > self.rig.drv.num_free:
            with pytest.raises(DriverQueueFull):
                self.rig.drv.add_chain(readable, wlens, indirect)
            return
        head = self.rig.drv.add_chain(readable, wlens, indirect)
        assert head not in self.expected
        self.expected[head] = (readable, wlens)
        self.unpublished.append(head)

    @rule()
    def publish(self) -> None:
        count = self.rig.drv.publish()
        assert count == len(self.unpublished)
        self.published.extend(self.unpublished)
        self.unpublished.clear()
        kick = self.rig.drv.needs_kick()
        if self.device_idle and count:
            assert kick, "device is waiting and was not kicked"
        if kick:
            self.device_idle = False

    @rule()
    def device_pop(self) -> None:
        chain = self.rig.pop()
        if not self.published:
            assert chain is None
            self.device_idle = True
            return
        assert chain is not None
        head = self.published.popleft()
        assert chain.head == head
        readable, wlens = self.expected[head]
        assert b"".join(chain.readable) == b"".join(readable)
        assert chain.writable_len == sum(wlens)
        self.device.append(chain)
        self.popped += 1

    @precondition(lambda self: self.device)
    @rule(data=st.data())
    def device_complete(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.device) - 1))
        chain = self.device.pop(i)
        n = data.draw(st.integers(0, chain.writable_len))
        content = bytes((chain.head * 31 + k) % 256 for k in range(n))
        self.rig.complete(chain, content)
        self.used.append((chain.head, n, content))
        notify = self.rig.vq.needs_notification(self.rig.memory)
        if self.driver_waiting:
            assert notify, "driver is waiting and got no interrupt"
        if notify:
            self.driver_waiting = False

    @rule()
    def driver_pop_used(self) -> None:
        got = self.rig.drv.pop_used()
        if not self.used:
            assert got is None
            return
        head, n, content = self.used.popleft()
        assert got is not None
        assert (got.head, got.written) == (head, n)
        assert b"".join(got.data) == content
        _, wlens = self.expected.pop(head)
        assert [len(d) for d in got.data] == [min(w, max(0, n - sum(wlens[:k]))) for k, w in enumerate(wlens)]

    @rule()
    def driver_wait(self) -> None:
        if not self.rig.drv.enable_interrupts():
            assert not self.used
            self.driver_waiting = True

    @rule()
    def driver_stop_interrupts(self) -> None:
        self.rig.drv.disable_interrupts()
        self.driver_waiting = False

    @invariant()
    def indices_agree(self) -> None:
        if not hasattr(self, "rig"):
            return
        vq, drv = self.rig.vq, self.rig.drv
        assert (drv.avail_idx - vq.next_avail) & 0xFFFF == len(self.published)
        assert (vq.next_used - drv.last_used) & 0xFFFF == len(self.used)
        assert drv.in_flight == len(self.expected)
        assert not vq.broken


TestQueueMachine = QueueMachine.TestCase
TestQueueMachine.settings = settings(
    max_examples=100, stateful_step_count=50, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


# Random rings: only VringError, bounded work, one outcome per available entry.

GARBAGE_SIZE = 8
GARBAGE_MEM = 64 * 1024
_DATA_GPA = BASE + 4096  # where DriverQueue puts the data area for GARBAGE_SIZE
_addresses = st.one_of(
    st.integers(_DATA_GPA, _DATA_GPA + 4096),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, BASE - 8, 2**64 - 1, 2**64 - 16, BASE + GARBAGE_MEM - 16]),
)
_lengths = st.one_of(st.integers(0, 64), st.sampled_from([0xFFFF_FFF0, 0xFFFF_FFFF]), st.integers(0, 2**32 - 1))
_flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
_nexts = st.one_of(st.integers(0, GARBAGE_SIZE + 1), st.integers(0, 0xFFFF))
_descriptor = st.tuples(_addresses, _lengths, _flags, _nexts)
_table = st.lists(_descriptor, min_size=GARBAGE_SIZE, max_size=GARBAGE_SIZE)
_indirect_tables = st.lists(st.lists(_descriptor, min_size=1, max_size=6), max_size=3)
_avail_entries = st.lists(
    st.one_of(st.integers(0, GARBAGE_SIZE), st.integers(0, 0xFFFF)), min_size=GARBAGE_SIZE, max_size=GARBAGE_SIZE
)


@pytest.fixture(scope="module")
def garbage_rig():
    r = Rig(size=GARBAGE_SIZE, mem_size=GARBAGE_MEM)
    assert r.drv.data_gpa == _DATA_GPA
    yield r
    r.close()


def _garbage_rings(test):
    """Hypothesis examples of garbage rings: what _load_garbage takes."""
    return settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])(given(
        table=_table,
        indirect_tables=_indirect_tables,
        noise=st.binary(max_size=256),
        entries=_avail_entries,
        ahead=st.one_of(st.integers(0, GARBAGE_SIZE), st.integers(0, 0xFFFF)),
        indirect=st.booleans(),
        event_idx=st.booleans(),
        start=st.integers(0, 65535),
    )(test))


def _load_garbage(r: Rig, table: list, indirect_tables: list, noise: bytes, entries: list[int], ahead: int,
                  indirect: bool, event_idx: bool, start: int) -> None:
    drv, vq = r.drv, r.vq
    for i, desc in enumerate(table):
        drv.write_desc(i, *desc)
    # indirect tables in the data area, where descriptors may point, then raw noise
    for k, itable in enumerate(indirect_tables):
        drv.write_table(_DATA_GPA + 128 * k, itable)
    drv.write(_DATA_GPA + 512, noise)
    for slot, head in enumerate(entries):
        drv.write(drv.avail_gpa + 4 + 2 * slot, head.to_bytes(2, "little"))
    drv.write(drv.avail_gpa + 2, ((start + ahead) & 0xFFFF).to_bytes(2, "little"))
    vq.reset()
    vq.indirect = indirect
    vq.event_idx = event_idx
    vq.set_size(GARBAGE_SIZE)
    vq.next_avail = start
    vq.set_addresses(r.memory, drv.desc_gpa, drv.avail_gpa, drv.used_gpa)


class _SilentResponder:
    """Answers (with an empty reply: nothing written, so the rings stay as
    they were) the requests whose first byte is even; records its offers."""

    def __init__(self) -> None:
        self.offers: list[tuple[bytes, int]] = []

    def respond(self, request: bytes, room: int) -> bytes | None:
        self.offers.append((request, room))
        return b"" if request and request[0] % 2 == 0 else None


def _outcomes(r: Rig, take: Callable[[], object]) -> list[object]:
    """One outcome per available entry: a chain's content, or an error's head."""
    out: list[object] = []
    for _ in range(GARBAGE_SIZE + 2):
        try:
            got = take()
        except VringError as exc:
            out.append(("error", exc.head))
            if exc.head is None:
                break
            r.vq.add_used(r.memory, exc.head, 0)
            continue
        if got is None:
            break
        out.append(got)
    return out


@_garbage_rings
def test_pop_serving_matches_pop_on_garbage_rings(
    garbage_rig: Rig, table: list, indirect_tables: list, noise: bytes, entries: list[int], ahead: int,
    indirect: bool, event_idx: bool, start: int,
) -> None:
    """Entry by entry, pop_serving gives what pop gives: the same errors
    (heads included), and every chain either handed back with the same
    content or offered (readable bytes, capped room) and answered."""
    r = garbage_rig
    args = (table, indirect_tables, noise, entries, ahead, indirect, event_idx, start)

    def popped() -> object:
        chain = r.vq.pop(r.memory)
        if chain is None:
            return None
        r.vq.add_used(r.memory, chain.head, 0)
        return ("chain", chain.head, b"".join(chain.readable), chain.writable_len)

    _load_garbage(r, *args)
    expected = _outcomes(r, popped)
    responder = _SilentResponder()

    def serving() -> object:
        chains, served = r.vq.pop_serving(r.memory, 1, responder)
        if served:
            assert not chains
            request, room = responder.offers[-1]
            return ("served", request, room)
        if not chains:
            return None
        chain = chains[0]
        r.vq.add_used(r.memory, chain.head, 0)
        return ("chain", chain.head, b"".join(chain.readable), chain.writable_len)

    _load_garbage(r, *args)
    got = _outcomes(r, serving)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if g[0] == "served":
            assert e[0] == "chain"
            assert g[1:] == (e[2], min(e[3], 512))
            assert len(e[2]) <= 512 and e[2][:1] and e[2][0] % 2 == 0
        else:
            assert g == e
    assert r.vq.broken == (ahead > GARBAGE_SIZE)


@_garbage_rings
def test_garbage_rings_only_raise_vring_error(
    garbage_rig: Rig,
    table: list,
    indirect_tables: list,
    noise: bytes,
    entries: list[int],
    ahead: int,
    indirect: bool,
    event_idx: bool,
    start: int,
) -> None:
    r = garbage_rig
    drv, vq = r.drv, r.vq
    _load_garbage(r, table, indirect_tables, noise, entries, ahead, indirect, event_idx, start)

    results = 0
    for _ in range(GARBAGE_SIZE + 2):
        try:
            chain = vq.pop(r.memory)
        except VringError as exc:
            results += 1
            if exc.head is None:
                if ahead > GARBAGE_SIZE:
                    assert vq.broken
                    break
                continue
            assert 0 <= exc.head < GARBAGE_SIZE
            vq.add_used(r.memory, exc.head, 0)
            continue
        if chain is None:
            break
        results += 1
        assert 0 <= chain.head < GARBAGE_SIZE
        assert chain.readable_len + chain.writable_len <= 2**32
        assert all(len(v) > 0 for v in chain.readable + chain.writable)
        vq.add_used(r.memory, chain.head, min(chain.writable_len, 3))
    if ahead <= GARBAGE_SIZE:
        assert results == ahead  # every available entry produced exactly one outcome
        assert vq.next_avail == (start + ahead) & 0xFFFF
    else:
        assert vq.broken and results == 1
