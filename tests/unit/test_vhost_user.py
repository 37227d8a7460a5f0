"""vhost-user protocol: framing, the device side as QEMU 7.2 drives it, the
driver-side builders, and every way a message can be malformed."""
from __future__ import annotations

import contextlib
import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from virtiofs_async.abi import vhost_user as abi
from virtiofs_async.abi.vhost_user import FrontendRequest as Req
from virtiofs_async.abi.vhost_user import ProtocolFeature as PF
from virtiofs_async.abi.virtio import (
    VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
    VIRTIO_RING_F_INDIRECT_DESC,
)
from virtiofs_async.errors import ProtocolError, VhostUserProtocolError
from virtiofs_async.vhost_user import (
    DEFAULT_PROTOCOL_FEATURES,
    CallFdChanged,
    FeaturesChanged,
    HandleResult,
    MemoryChanged,
    Message,
    MessageReader,
    QueueStarted,
    QueueStopped,
    Reset,
    VhostUserBackend,
    VhostUserFrontend,
    encode_message,
    nack_reply,
    parse_header,
)

F_PROTOCOL = 1 << abi.VHOST_USER_F_PROTOCOL_FEATURES
DEVICE_FEATURES = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX)
MEM_SIZE = 0x200000  # 2 MiB of guest RAM, two 1 MiB regions
UVA = 0x7F1234000000  # where "QEMU" has the RAM mapped
QSIZE = 128
fe = VhostUserFrontend()


# --- helpers ------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@contextlib.contextmanager
def no_fd_leak():
    before = open_fds()
    yield
    leaked = open_fds() - before
    assert not leaked, f"leaked fds: {sorted(leaked)}"


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


def memfd(size: int = MEM_SIZE) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def make_backend(protocol_features=DEFAULT_PROTOCOL_FEATURES, **kw) -> VhostUserBackend:
    kw.setdefault("num_queues", 2)
    kw.setdefault("device_features", DEVICE_FEATURES)
    return VhostUserBackend(protocol_features=int(protocol_features), **kw)


class Driver:
    """Plays the transport around a backend: frames bytes with MessageReader,
    hands messages to the backend, closes what it says to close."""

    def __init__(self, backend: VhostUserBackend) -> None:
        self.backend = backend
        self.reader = MessageReader()

    def send(self, data: bytes, fds=()) -> HandleResult:
        self.reader.feed(data, list(fds))
        msg = self.reader.next_message()
        assert msg is not None and self.reader.next_message() is None
        result = self.backend.handle(msg)
        assert msg.fds == []
        for fd in result.close_fds:
            os.close(fd)
        return result

    def ask(self, request: int, data: bytes, fds=()):
        """Send a request that has a reply; return the parsed reply."""
        result = self.send(data, fds)
        assert result.reply is not None
        return fe.parse_reply(request, result.reply)

    def close(self) -> None:
        self.reader.close()
        self.backend.close()


def ring_uvas(index: int) -> tuple[int, int, int]:
    """desc, used, avail front-end addresses of queue ``index`` (in region 0)."""
    base = UVA + 0x10000 * (index + 1)
    return base, base + 0x8000, base + 0x4000


def ring_gpas(index: int) -> tuple[int, int, int]:
    desc, used, avail = ring_uvas(index)
    return desc - UVA, avail - UVA, used - UVA


REGIONS = [(0, 0x100000, UVA, 0), (0x100000, 0x100000, UVA + 0x100000, 0x100000)]


def connect(d: Driver, *, mem_slots: bool = True) -> dict:
    """QEMU 7.2 vhost_dev_init for vhost-user-fs (2 queues)."""
    features = d.ask(Req.GET_FEATURES, fe.get_features())
    assert features & F_PROTOCOL
    offered = d.ask(Req.GET_PROTOCOL_FEATURES, fe.get_protocol_features())
    if not mem_slots:
        offered &= ~PF.CONFIGURE_MEM_SLOTS
    assert d.send(fe.set_protocol_features(offered)).reply is None
    if offered & PF.MQ:
        assert d.ask(Req.GET_QUEUE_NUM, fe.get_queue_num()) == 2
    if offered & PF.CONFIGURE_MEM_SLOTS:
        assert d.ask(Req.GET_MAX_MEM_SLOTS, fe.get_max_mem_slots()) == d.backend.max_mem_slots
    assert d.send(fe.set_owner()).reply is None
    assert d.ask(Req.GET_FEATURES, fe.get_features()) == features
    masked = {}
    for i in range(2):
        masked[i] = eventfd()
        r = d.send(fe.set_vring_call(i), [masked[i]])
        assert r.events == [CallFdChanged(i, masked[i])] and r.reply is None
        r = d.send(fe.set_vring_err(i), [eventfd()])
        assert r.events == [] and r.close_fds == []
    return {"features": features, "protocol": offered, "masked_call": masked}


def set_memory(d: Driver, ram: int, *, mem_slots: bool, events_ok=True) -> list:
    """SET_MEM_TABLE, or one ADD_MEM_REG per region; NEED_REPLY (REPLY_ACK)."""
    events = []
    if mem_slots:
        for gpa, size, uva, off in REGIONS:
            r = d.send(fe.add_mem_reg(gpa, size, uva, off, need_reply=True), [os.dup(ram)])
            assert fe.parse_reply(Req.ADD_MEM_REG, r.reply) == 0
            events += r.events
    else:
        r = d.send(fe.set_mem_table(REGIONS, need_reply=True), [os.dup(ram), os.dup(ram)])
        assert fe.parse_reply(Req.SET_MEM_TABLE, r.reply) == 0
        events += r.events
    return events


def start(d: Driver, features: int, ram: int, *, mem_slots: bool = True, base: int = 0) -> dict:
    """QEMU 7.2 vhost_dev_start (+ vuf_start's unmasking)."""
    r = d.send(fe.set_features(features | F_PROTOCOL))
    assert r.events == [FeaturesChanged(features | F_PROTOCOL)]
    events = set_memory(d, ram, mem_slots=mem_slots)
    assert MemoryChanged() in events
    assert not any(isinstance(e, QueueStarted) for e in events)
    kicks = {}
    for i in range(2):
        assert d.send(fe.set_vring_num(i, QSIZE)).events == []
        assert d.send(fe.set_vring_base(i, base)).events == []
        assert d.send(fe.set_vring_addr(i, *ring_uvas(i), log=ring_gpas(i)[2])).events == []
        kicks[i] = eventfd()
        # Protocol features are acked: the ring is disabled until SET_VRING_ENABLE.
        assert d.send(fe.set_vring_kick(i), [kicks[i]]).events == []
        assert not d.backend.is_running(i)
    started = {}
    for i in range(2):
        r = d.send(fe.set_vring_enable(i, True, need_reply=True))
        assert fe.parse_reply(Req.SET_VRING_ENABLE, r.reply) == 0
        (ev,) = r.events
        assert isinstance(ev, QueueStarted) and ev.index == i and ev.kick_fd == kicks[i]
        started[i] = ev
    calls = {}
    for i in range(2):
        calls[i] = eventfd()
        old = d.backend.call_fd(i)
        r = d.send(fe.set_vring_call(i), [calls[i]])
        assert r.events == [CallFdChanged(i, calls[i])]
        assert r.close_fds == ([old] if old is not None else [])
    return {"kicks": kicks, "calls": calls, "started": started}


def stop(d: Driver) -> dict:
    """QEMU 7.2 vhost_dev_stop: disable, then GET_VRING_BASE per queue."""
    bases = {}
    for i in range(2):
        r = d.send(fe.set_vring_enable(i, False))
        assert r.events == [QueueStopped(i)] and r.reply is None
    for i in range(2):
        kick = d.backend.kick_fd(i)
        r = d.send(fe.get_vring_base(i))
        assert r.events == []  # already stopped by the disable
        assert r.close_fds == [kick]
        bases[i] = fe.parse_reply(Req.GET_VRING_BASE, r.reply)
        assert d.backend.kick_fd(i) is None
    return bases


def put_chain(d: Driver, index: int, slot: int, head: int) -> None:
    """Make one one-descriptor chain available in queue ``index``'s ring."""
    mem = d.backend.memory
    desc, avail, _used = ring_gpas(index)
    mem.write(desc + 16 * head, struct.pack("<QIHH", 0x180000, 64, 2, 0))  # device-writable
    mem.write(avail + 4 + 2 * (slot % QSIZE), struct.pack("<H", head))
    mem.write(avail + 2, struct.pack("<H", (slot + 1) & 0xFFFF))


@pytest.fixture
def ram():
    fd = memfd()
    yield fd
    os.close(fd)


@pytest.fixture
def drv():
    d = Driver(make_backend())
    yield d
    d.close()


# --- framing ------------------------------------------------------------------


def test_encode_and_parse_header():
    data = encode_message(Req.SET_VRING_NUM, struct.pack("<II", 1, 256), flags=abi.VERSION | abi.FLAG_NEED_REPLY)
    assert data[:12] == struct.pack("<III", 8, 9, 8)
    assert parse_header(data) == (8, 9, 8)
    with pytest.raises(VhostUserProtocolError, match="header"):
        parse_header(data[:11])
    with pytest.raises(VhostUserProtocolError, match="version"):
        parse_header(struct.pack("<III", 1, 2, 0))
    with pytest.raises(VhostUserProtocolError, match="exceeds"):
        parse_header(struct.pack("<III", 1, 1, abi.MAX_PAYLOAD_SIZE + 1))
    assert parse_header(struct.pack("<III", 1, 1, abi.MAX_PAYLOAD_SIZE))[2] == abi.MAX_PAYLOAD_SIZE
    with pytest.raises(ValueError):
        encode_message(1, bytes(abi.MAX_PAYLOAD_SIZE + 1))


def _stream():
    msgs = [
        (fe.get_features(), 0),
        (fe.set_vring_kick(1), 1),
        (fe.set_mem_table(REGIONS), 2),
        (fe.set_vring_addr(0, 1, 2, 3), 0),
        (fe.set_vring_call(0), 1),
    ]
    return msgs


def _check_messages(out, msgs, fd_lists):
    assert len(out) == len(msgs)
    for m, (data, _n), fds in zip(out, msgs, fd_lists):
        assert (m.request, m.flags) == parse_header(data)[:2]
        assert m.payload == data[12:]
        assert m.fds == fds


def test_reader_byte_by_byte():
    with no_fd_leak():
        msgs = _stream()
        reader = MessageReader()
        fd_lists, out = [], []
        for data, n in msgs:
            fds = [eventfd() for _ in range(n)]
            fd_lists.append(fds)
            for i in range(len(data)):
                reader.feed(data[i : i + 1], fds if i == 0 else [])
                m = reader.next_message()
                if i < len(data) - 1:
                    assert m is None
                else:
                    out.append(m)
        assert reader.buffered == 0
        _check_messages(out, msgs, fd_lists)
        for fds in fd_lists:
            for fd in fds:
                os.close(fd)


def test_reader_big_chunk():
    with no_fd_leak():
        msgs = _stream()
        reader = MessageReader()
        # Everything in one chunk: the fds belong to the last message starting
        # in it (recvmsg stops after the segment that carried fds).
        fds = [eventfd()]
        head = b"".join(d for d, _ in msgs[:-1])
        reader.feed(head + msgs[-1][0], fds)
        reader.feed(msgs[0][0][:5], [])
        out = []
        while (m := reader.next_message()) is not None:
            out.append(m)
        assert [m.request for m in out] == [parse_header(d)[0] for d, _ in msgs]
        assert [m.fds for m in out] == [[], [], [], [], fds]
        assert reader.buffered == 5
        reader.feed(msgs[0][0][5:], [])
        assert reader.next_message().request == Req.GET_FEATURES
        os.close(fds[0])


@settings(max_examples=150, deadline=None)
@given(
    shape=st.lists(
        st.tuples(st.sampled_from([0, 1, 2, 3]), st.integers(0, 3), st.integers(0, 300)), min_size=1, max_size=12
    ),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    data=st.data(),
)
def test_reader_arbitrary_splits(shape, cuts, data):
    """Any split of a stream, fds arriving in the recvmsg that holds the start
    of their message and ending no later than that message, frames right."""
    kinds = [
        lambda n: fe.request(Req.SET_OWNER),
        lambda n: fe.set_vring_num(1, n),
        lambda n: fe.request(Req.SET_CONFIG, bytes(n)),
        lambda n: fe.set_mem_table([(i, 1, 2, 3) for i in range(n % 9)]),
    ]
    msgs = [(kinds[k](size), nfd) for k, nfd, size in shape]
    stream = b"".join(d for d, _ in msgs)
    starts, pos = [], 0
    for d, _ in msgs:
        starts.append(pos)
        pos += len(d)
    cut_set = {c % (len(stream) + 1) for c in cuts} | {0, len(stream)}
    for (d, nfd), s in zip(msgs, starts):
        if nfd:
            cut_set.add(s + data.draw(st.integers(1, len(d))))
            # The chunk holding the start must not hold a later message's start:
            # cut_set now has a cut in (s, s + len(d)].
    bounds = sorted(cut_set)
    with no_fd_leak():
        fd_lists = [[eventfd() for _ in range(nfd)] for _, nfd in msgs]
        reader = MessageReader()
        out = []
        for lo, hi in zip(bounds, bounds[1:]):
            fds = []
            for s, fl in zip(starts, fd_lists):
                if lo <= s < hi:
                    fds = fl  # only the last start in the chunk can have fds
            reader.feed(stream[lo:hi], fds)
            while (m := reader.next_message()) is not None:
                out.append(m)
        _check_messages(out, msgs, fd_lists)
        for fl in fd_lists:
            for fd in fl:
                os.close(fd)


def test_reader_fds_in_middle_of_message_are_closed():
    reader = MessageReader()
    first = fe.get_features()
    second = fe.set_vring_num(0, 8)
    reader.feed(first + second[:4], [])
    stray = eventfd()
    reader.feed(second[4:10], [stray])  # no message starts here
    assert is_closed(stray)
    assert reader.next_message().request == Req.GET_FEATURES  # framed before the corruption
    with pytest.raises(VhostUserProtocolError, match="middle"):
        reader.next_message()
    with pytest.raises(VhostUserProtocolError):
        reader.next_message()
    late = eventfd()
    reader.feed(fe.get_features(), [late])  # a dead reader closes what it gets
    assert is_closed(late)


def test_reader_oversized_header_closes_held_fds():
    reader = MessageReader()
    held = eventfd()
    reader.feed(fe.set_vring_kick(0)[:6], [held])  # incomplete, fds held
    reader.feed(fe.set_vring_kick(0)[6:] + struct.pack("<III", 5, 1, 1 << 20), [])
    m = reader.next_message()
    assert m.fds == [held]  # handed out before the corruption: now ours
    with pytest.raises(VhostUserProtocolError, match="exceeds"):
        reader.next_message()
    os.close(held)
    reader2 = MessageReader()
    held2 = eventfd()
    reader2.feed(fe.set_vring_kick(0)[:3], [held2])
    reader2.feed(fe.set_vring_kick(0)[3:] + struct.pack("<III", 5, 0, 0), [])
    # Bad version after a complete message; the complete one keeps its fd.
    m2 = reader2.next_message()
    assert m2.fds == [held2]
    os.close(held2)
    with pytest.raises(VhostUserProtocolError, match="version"):
        reader2.next_message()


def test_reader_close_closes_pending_and_unclaimed():
    reader = MessageReader()
    a, b = eventfd(), eventfd()
    reader.feed(fe.set_vring_call(0), [a])  # complete, not claimed
    reader.feed(fe.set_vring_call(1)[:5], [b])  # incomplete
    reader.close()
    assert is_closed(a) and is_closed(b)


# --- QEMU 7.2 sequences -------------------------------------------------------------


@pytest.mark.parametrize("mem_slots", [True, False], ids=["add_mem_reg", "set_mem_table"])
def test_qemu_start_sequence(ram, mem_slots):
    with no_fd_leak():
        d = Driver(make_backend())
        info = connect(d, mem_slots=mem_slots)
        assert info["features"] == DEVICE_FEATURES | F_PROTOCOL
        assert d.backend.reply_ack
        s = start(d, DEVICE_FEATURES, ram, mem_slots=mem_slots)
        # (start() checked that the masked call fds of connect() went to close_fds.)
        assert len(d.backend.memory.regions) == 2
        for i in range(2):
            # Started before the unmasking SET_VRING_CALL: with the masked call fd.
            assert s["started"][i].call_fd == info["masked_call"][i]
            q = d.backend.queues[i]
            assert q.size == QSIZE and (q.desc_gpa, q.avail_gpa, q.used_gpa) == ring_gpas(i)
            assert q.event_idx and q.indirect and q.next_avail == 0
            assert d.backend.is_running(i) and d.backend.call_fd(i) == s["calls"][i]
        # The queue works: a chain put in the ring pops out.
        put_chain(d, 1, 0, 3)
        chain = d.backend.queues[1].pop(d.backend.memory)
        assert chain.head == 3 and sum(map(len, chain.writable)) == 64
        del chain  # its views keep the mapping (and, before 3.13, an fd) alive
        d.close()
        for fd in (*s["kicks"].values(), *s["calls"].values()):
            assert is_closed(fd)


def test_get_vring_base_stops_running_queue_with_live_base(ram):
    with no_fd_leak():
        d = Driver(make_backend())
        connect(d)
        start(d, DEVICE_FEATURES, ram, base=5)
        put_chain(d, 0, 5, 1)
        put_chain(d, 0, 6, 2)
        q = d.backend.queues[0]
        assert q.pop(d.backend.memory).head == 1 and q.pop(d.backend.memory).head == 2
        kick = d.backend.kick_fd(0)
        r = d.send(fe.get_vring_base(0))
        # Stop first (the transport drains), the old kick fd is closed after, then the reply.
        assert r.events == [QueueStopped(0)] and r.close_fds == [kick]
        assert fe.parse_reply(Req.GET_VRING_BASE, r.reply) == 7
        assert parse_header(r.reply) == (Req.GET_VRING_BASE, abi.VERSION | abi.FLAG_REPLY, 8)
        assert struct.unpack("<II", r.reply[12:]) == (0, 7)
        assert not d.backend.is_running(0) and d.backend.is_running(1)
        # A stopped queue needs a new kick fd to run again; it resumes at its base.
        kick2 = eventfd()
        r = d.send(fe.set_vring_kick(0), [kick2])
        assert r.events == [QueueStarted(0, kick2, d.backend.call_fd(0))]
        assert q.next_avail == 7
        d.close()


@pytest.mark.parametrize("reset", [None, "owner", "device"])
@pytest.mark.parametrize("mem_slots", [True, False], ids=["add_mem_reg", "set_mem_table"])
def test_reboot_sequence(reset, mem_slots):
    with no_fd_leak():
        ram = memfd()
        d = Driver(make_backend())
        connect(d, mem_slots=mem_slots)
        first = start(d, DEVICE_FEATURES, ram, mem_slots=mem_slots)
        put_chain(d, 0, 0, 0)
        assert d.backend.queues[0].pop(d.backend.memory) is not None
        bases = stop(d)
        assert bases == {0: 1, 1: 0}
        for fd in first["kicks"].values():
            assert is_closed(fd)
        if reset is not None:
            calls = [d.backend.call_fd(i) for i in range(2)]
            errs = [d.backend.err_fd(i) for i in range(2)]
            msg = fe.reset_owner() if reset == "owner" else fe.reset_device()
            r = d.send(msg)
            assert r.events == [Reset()] and r.reply is None
            assert sorted(r.close_fds) == sorted(calls + errs)
            assert d.backend.features == 0 and all(d.backend.call_fd(i) is None for i in range(2))
            assert len(d.backend.memory.regions) == 2  # memory survives a reset
        # The guest rebooted: fresh RAM contents, rings from index 0 again.
        os.close(ram)
        ram = memfd()
        if mem_slots:
            # QEMU only sends the regions that changed: here all of them.
            for gpa, size, uva, _off in REGIONS:
                r = d.send(fe.rem_mem_reg(gpa, size, uva, need_reply=True))
                assert fe.parse_reply(Req.REM_MEM_REG, r.reply) == 0 and r.events == [MemoryChanged()]
            assert d.backend.memory.regions == ()
        second = start(d, DEVICE_FEATURES, ram, mem_slots=mem_slots)
        for i in range(2):
            assert d.backend.is_running(i) and d.backend.queues[i].next_avail == 0
            assert second["started"][i].kick_fd == second["kicks"][i]
        d.close()
        os.close(ram)


def test_reboot_with_set_features_changing_event_idx(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    stop(drv)
    r = drv.send(fe.set_features((1 << VIRTIO_F_VERSION_1) | F_PROTOCOL))
    assert r.events == [FeaturesChanged((1 << VIRTIO_F_VERSION_1) | F_PROTOCOL)]
    for i in range(2):
        kick = eventfd()
        drv.send(fe.set_vring_kick(i), [kick])
        assert drv.send(fe.set_vring_enable(i, True)).events[0].index == i
        assert not drv.backend.queues[i].event_idx and not drv.backend.queues[i].indirect


def test_rings_start_enabled_without_protocol_features(ram, drv):
    drv.send(fe.set_features(DEVICE_FEATURES))  # bit 30 not acked
    drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    drv.send(fe.set_vring_num(0, QSIZE))
    drv.send(fe.set_vring_addr(0, *ring_uvas(0)))
    kick = eventfd()
    r = drv.send(fe.set_vring_kick(0), [kick])
    assert r.events == [QueueStarted(0, kick, None)]
    assert drv.backend.is_enabled(0)


def test_deferred_ring_validation_until_memory_arrives(ram, drv):
    drv.send(fe.set_features(DEVICE_FEATURES))
    drv.send(fe.set_vring_num(0, QSIZE))
    # No memory yet: addresses are accepted, checked when the queue can start.
    assert drv.send(fe.set_vring_addr(0, *ring_uvas(0))).events == []
    kick = eventfd()
    assert drv.send(fe.set_vring_kick(0), [kick]).events == []
    assert not drv.backend.is_running(0)
    r = drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    assert r.events == [MemoryChanged(), QueueStarted(0, kick, None)]
    assert drv.backend.queues[0].desc_gpa == ring_gpas(0)[0]


def test_deferred_ring_addresses_outside_memory_never_start(ram, drv):
    drv.send(fe.set_features(DEVICE_FEATURES))
    drv.send(fe.set_vring_num(0, QSIZE))
    drv.send(fe.set_vring_addr(0, UVA + 0x900000, UVA + 0x908000, UVA + 0x904000))
    drv.send(fe.set_vring_kick(0), [eventfd()])
    r = drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    assert r.events == [MemoryChanged()]  # the queue keeps waiting
    assert not drv.backend.is_running(0)
    # Good addresses now: it starts.
    r = drv.send(fe.set_vring_addr(0, *ring_uvas(0)))
    assert [type(e) for e in r.events] == [QueueStarted]


def test_kick_fd_replacement_restarts_queue(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    old = drv.backend.kick_fd(0)
    new = eventfd()
    r = drv.send(fe.set_vring_kick(0), [new])
    assert r.events == [QueueStopped(0), QueueStarted(0, new, drv.backend.call_fd(0))]
    assert r.close_fds == [old] and is_closed(old)
    # NOFD: no kick fd at all, the queue stops and stays stopped.
    r = drv.send(fe.set_vring_kick(0, has_fd=False))
    assert r.events == [QueueStopped(0)] and r.close_fds == [new]
    assert drv.backend.kick_fd(0) is None and not drv.backend.is_running(0)


def test_call_fd_nofd_and_err_fd(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    old = drv.backend.call_fd(1)
    r = drv.send(fe.set_vring_call(1, has_fd=False))
    assert r.events == [CallFdChanged(1, None)] and r.close_fds == [old]
    assert drv.backend.is_running(1)  # the call fd does not stop the queue
    err_old = drv.backend.err_fd(0)
    err = eventfd()
    r = drv.send(fe.set_vring_err(0), [err])
    assert r.events == [] and r.close_fds == [err_old] and drv.backend.err_fd(0) == err


def test_reconfiguring_running_queue_restarts_it(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    r = drv.send(fe.set_vring_num(0, 64))
    assert [type(e) for e in r.events] == [QueueStopped, QueueStarted]
    assert drv.backend.queues[0].size == 64
    r = drv.send(fe.set_vring_base(0, 9))
    assert [type(e) for e in r.events] == [QueueStopped, QueueStarted]
    assert drv.backend.queues[0].next_avail == 9
    # Enabling an enabled running ring is a no-op.
    assert drv.send(fe.set_vring_enable(0, True)).events == []


def test_reply_ack(ram):
    d = Driver(make_backend())
    # Not negotiated yet: NEED_REPLY is ignored (QEMU never sets it then).
    assert d.send(fe.set_owner(need_reply=True)).reply is None
    d.send(fe.set_protocol_features(PF.REPLY_ACK | PF.MQ))
    for data in (
        fe.set_owner(need_reply=True),
        fe.set_features(DEVICE_FEATURES, need_reply=True),
        fe.set_vring_num(0, 16, need_reply=True),
        fe.set_vring_base(0, 0, need_reply=True),
        fe.set_vring_enable(1, True, need_reply=True),
    ):
        r = d.send(data)
        assert r.reply == encode_message(parse_header(data)[0], struct.pack("<Q", 0), flags=5)
    r = d.send(fe.set_mem_table(REGIONS, need_reply=True), [os.dup(ram), os.dup(ram)])
    assert fe.parse_reply(Req.SET_MEM_TABLE, r.reply) == 0
    # Messages with their own reply get exactly that reply.
    r = d.send(fe.request(Req.GET_QUEUE_NUM, need_reply=True))
    assert fe.parse_reply(Req.GET_QUEUE_NUM, r.reply) == 2
    # Well-formed but refused: a non-zero status, no exception.
    r = d.send(fe.set_config(0, b"tag", need_reply=True))
    assert fe.parse_reply(Req.SET_CONFIG, r.reply) != 0
    # No F_CONFIG: GET_CONFIG's defined error reply is an empty payload.
    r = d.send(fe.get_config(0, 40))
    assert fe.parse_reply(Req.GET_CONFIG, r.reply) == b""
    # Without NEED_REPLY nothing comes back.
    assert d.send(fe.set_vring_num(0, 32)).reply is None
    d.close()


def test_add_rem_mem_reg(ram):
    with no_fd_leak():
        d = Driver(make_backend(max_mem_slots=2))
        d.send(fe.set_protocol_features(DEFAULT_PROTOCOL_FEATURES))
        r = d.send(fe.add_mem_reg(0, 0x100000, UVA, 0), [os.dup(ram)])
        assert r.events == [MemoryChanged()] and r.reply is None
        d.send(fe.add_mem_reg(0x100000, 0x100000, UVA + 0x100000, 0x100000), [os.dup(ram)])
        assert [(m.guest_phys_addr, m.size) for m in d.backend.memory.regions] == [(0, 0x100000), (0x100000, 0x100000)]
        assert d.backend.memory.uva_to_gpa(UVA + 0x100010, 4) == 0x100010
        # Slots are full.
        extra = os.dup(ram)
        with pytest.raises(VhostUserProtocolError, match="slots"):
            d.send(fe.add_mem_reg(0x400000, 0x1000, UVA + 0x400000, 0), [extra])
        assert is_closed(extra)
        # Remove with the compat fd older QEMU sends along: closed unused.
        compat = os.dup(ram)
        r = d.send(fe.rem_mem_reg(0x100000, 0x100000, UVA + 0x100000, need_reply=True), [compat])
        assert is_closed(compat) and r.events == [MemoryChanged()]
        assert fe.parse_reply(Req.REM_MEM_REG, r.reply) == 0
        assert len(d.backend.memory.regions) == 1
        # Overlap with the remaining region.
        dup = os.dup(ram)
        with pytest.raises(VhostUserProtocolError, match="overlap"):
            d.send(fe.add_mem_reg(0x80000, 0x100000, UVA + 0x300000, 0), [dup])
        assert is_closed(dup)
        # Not there / wrong user address.
        with pytest.raises(VhostUserProtocolError, match="no region"):
            d.send(fe.rem_mem_reg(0x100000, 0x100000, UVA + 0x100000))
        with pytest.raises(VhostUserProtocolError, match="no region"):
            d.send(fe.rem_mem_reg(0, 0x100000, UVA + 1))
        # Past the end of the file: refused before mapping (SIGBUS otherwise).
        small = memfd(0x1000)
        with pytest.raises(VhostUserProtocolError, match="past the end"):
            d.send(fe.add_mem_reg(0x800000, 0x2000, UVA + 0x800000, 0), [small])
        assert is_closed(small)
        d.close()


def test_mem_regs_need_configure_mem_slots(ram):
    d = Driver(make_backend(protocol_features=PF.MQ | PF.REPLY_ACK))
    fd = os.dup(ram)
    with pytest.raises(VhostUserProtocolError, match="CONFIGURE_MEM_SLOTS"):
        d.send(fe.add_mem_reg(0, 0x1000, UVA, 0), [fd])
    assert is_closed(fd)
    with pytest.raises(VhostUserProtocolError, match="CONFIGURE_MEM_SLOTS"):
        d.send(fe.get_max_mem_slots())
    d.close()


def test_queue_stops_when_its_rings_leave_memory_and_restarts_when_back(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    # Region 1 holds no ring: removing it leaves the queues running.
    r = drv.send(fe.rem_mem_reg(*REGIONS[1][:3]))
    assert r.events == [MemoryChanged()]
    # Region 0 holds both queues' rings.
    r = drv.send(fe.rem_mem_reg(*REGIONS[0][:3]))
    assert r.events == [MemoryChanged(), QueueStopped(0), QueueStopped(1)]
    kick0 = drv.backend.kick_fd(0)
    r = drv.send(fe.add_mem_reg(*REGIONS[0]), [os.dup(ram)])
    assert r.events == [
        MemoryChanged(),
        QueueStarted(0, kick0, drv.backend.call_fd(0)),
        QueueStarted(1, drv.backend.kick_fd(1), drv.backend.call_fd(1)),
    ]
    # A whole new table that still maps the rings keeps them running.
    r = drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    assert r.events == [MemoryChanged()]
    assert drv.backend.is_running(0) and drv.backend.is_running(1)


def test_set_mem_table_replaces_regions(ram, drv):
    drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    r = drv.send(fe.set_mem_table([(0x1000000, 0x1000, 0x5000, 0x3000)]), [os.dup(ram)])
    assert r.events == [MemoryChanged()]
    assert [m.guest_phys_addr for m in drv.backend.memory.regions] == [0x1000000]
    # The full-size form (all 8 slots sent, nregions used) is accepted too.
    payload = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, 0x1000, UVA, 0) + bytes(32 * 7)
    drv.send(fe.request(Req.SET_MEM_TABLE, payload), [os.dup(ram)])
    assert [m.user_addr for m in drv.backend.memory.regions] == [UVA]


def test_set_mem_table_bad_region(drv):
    good, short = memfd(), memfd(0x1000)
    drv.send(fe.set_mem_table(REGIONS[:1]), [os.dup(good)])
    # The second region's file is too short: refused before anything changes.
    with pytest.raises(VhostUserProtocolError, match="past the end"):
        drv.send(fe.set_mem_table(REGIONS), [os.dup(good), os.dup(short)])
    assert len(drv.backend.memory.regions) == 1
    os.close(good)
    os.close(short)


def test_set_mem_table_failing_half_way_carries_events_to_next_result(ram, drv):
    drv.send(fe.set_features(DEVICE_FEATURES))
    drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)])
    drv.send(fe.set_vring_num(0, QSIZE))
    drv.send(fe.set_vring_addr(0, *ring_uvas(0)))
    assert [type(e) for e in drv.send(fe.set_vring_kick(0), [eventfd()]).events] == [QueueStarted]
    unmappable = eventfd()
    # The first region maps, the eventfd does not: the old table is gone and
    # the new one incomplete, so no memory is left at all.
    with pytest.raises(VhostUserProtocolError, match="cannot map"):
        drv.send(fe.set_mem_table(REGIONS), [os.dup(ram), unmappable])
    assert is_closed(unmappable)
    assert drv.backend.memory.regions == ()
    # The transport never saw the MemoryChanged of the failed message: it
    # comes with the next result.
    r = drv.send(fe.set_owner())
    assert r.events == [MemoryChanged(), QueueStopped(0)]
    assert drv.send(fe.set_owner()).events == []
    assert not drv.backend.is_running(0)


def test_backend_req_fd():
    with no_fd_leak():
        d = Driver(make_backend(protocol_features=DEFAULT_PROTOCOL_FEATURES | PF.BACKEND_REQ))
        d.send(fe.set_protocol_features(DEFAULT_PROTOCOL_FEATURES | PF.BACKEND_REQ))
        a, b = eventfd(), eventfd()
        r = d.send(fe.set_backend_req_fd(need_reply=True), [a])
        assert fe.parse_reply(Req.SET_BACKEND_REQ_FD, r.reply) == 0 and d.backend.backend_req_fd == a
        r = d.send(fe.set_backend_req_fd(), [b])
        assert r.close_fds == [a] and d.backend.backend_req_fd == b
        d.close()
        assert is_closed(b)
        # Not offered: the fd is accepted and closed unused.
        d2 = Driver(make_backend())
        c = eventfd()
        assert d2.send(fe.set_backend_req_fd(), [c]).reply is None
        assert is_closed(c) and d2.backend.backend_req_fd is None
        d2.close()


def test_status():
    d = Driver(make_backend(protocol_features=DEFAULT_PROTOCOL_FEATURES | PF.STATUS))
    d.send(fe.set_status(0x0B))
    assert d.ask(Req.GET_STATUS, fe.get_status()) == 0x0B
    with pytest.raises(VhostUserProtocolError, match="byte"):
        d.send(fe.set_status(0x100))
    d.close()
    d2 = Driver(make_backend())
    with pytest.raises(VhostUserProtocolError, match="STATUS"):
        d2.send(fe.get_status())
    d2.close()


def test_constructor_rejects_unimplemented_protocol_features():
    with pytest.raises(ValueError):
        make_backend(protocol_features=PF.INFLIGHT_SHMFD)
    with pytest.raises(ValueError):
        make_backend(protocol_features=PF.LOG_SHMFD)
    with pytest.raises(ValueError):
        make_backend(num_queues=0)
    with pytest.raises(ValueError):
        make_backend(queue_max_size=1000)


def test_offered_features():
    d = Driver(make_backend())
    assert d.ask(Req.GET_FEATURES, fe.get_features()) == DEVICE_FEATURES | F_PROTOCOL
    assert d.ask(Req.GET_PROTOCOL_FEATURES, fe.get_protocol_features()) == DEFAULT_PROTOCOL_FEATURES
    assert d.ask(Req.GET_QUEUE_NUM, fe.get_queue_num()) == 2
    d.close()


# --- rejected messages ---------------------------------------------------------------


def expect_rejected(d: Driver, data: bytes, fds=(), match=None):
    """The message raises VhostUserProtocolError, its fds are closed and the
    backend reported nothing."""
    fds = list(fds)
    with pytest.raises(VhostUserProtocolError, match=match):
        d.send(data, fds)
    for fd in fds:
        assert is_closed(fd), f"fd {fd} of a rejected message left open"


def test_unknown_and_unsupported_requests(drv):
    expect_rejected(drv, fe.request(99), [eventfd()], match="unknown vhost-user request 99")
    expect_rejected(drv, fe.request(Req.VRING_KICK, struct.pack("<II", 0, 0)), match="not supported")
    expect_rejected(drv, fe.set_log_base(0x1000, 0), [memfd()], match="SET_LOG_BASE is not supported")
    expect_rejected(drv, fe.set_log_fd(), [eventfd()], match="SET_LOG_FD is not supported")
    expect_rejected(drv, fe.request(Req.GET_INFLIGHT_FD, bytes(24)), match="not supported")
    expect_rejected(drv, fe.request(Req.SET_INFLIGHT_FD, bytes(24)), [memfd()], match="not supported")


@pytest.mark.parametrize(
    "data",
    [
        fe.request(Req.GET_FEATURES, bytes(8)),
        fe.request(Req.SET_FEATURES, bytes(4)),
        fe.request(Req.SET_OWNER, bytes(1)),
        fe.request(Req.SET_VRING_NUM, bytes(12)),
        fe.request(Req.SET_VRING_ADDR, bytes(32)),
        fe.request(Req.SET_VRING_BASE, bytes(7)),
        fe.request(Req.GET_VRING_BASE, b""),
        fe.request(Req.SET_VRING_CALL, bytes(4)),
        fe.request(Req.SET_VRING_ENABLE, bytes(16)),
        fe.request(Req.GET_QUEUE_NUM, bytes(8)),
        fe.request(Req.RESET_DEVICE, bytes(8)),
        fe.request(Req.ADD_MEM_REG, bytes(32)),
        fe.request(Req.REM_MEM_REG, bytes(48)),
        fe.request(Req.SET_MEM_TABLE, bytes(4)),
        fe.request(Req.SET_MEM_TABLE, struct.pack("<II", 1, 0) + bytes(31)),
        fe.request(Req.SET_MEM_TABLE, struct.pack("<II", 9, 0) + bytes(9 * 32)),
        fe.request(Req.GET_CONFIG, struct.pack("<III", 0, 4, 0) + bytes(3)),
        fe.request(Req.GET_CONFIG, struct.pack("<III", 0, 300, 0) + bytes(300)),
    ],
    ids=lambda data: f"{Req(parse_header(data)[0]).name}-{len(data) - 12}",
)
def test_wrong_payload_size(drv, data):
    expect_rejected(drv, data)


def test_wrong_payload_size_closes_fds(drv, ram):
    expect_rejected(drv, fe.request(Req.SET_VRING_KICK, bytes(4)), [eventfd()], match="8")
    fd = os.dup(ram)
    expect_rejected(drv, fe.request(Req.ADD_MEM_REG, bytes(39)), [fd])


@pytest.mark.parametrize(
    "data",
    [
        fe.get_features(),
        fe.set_features(DEVICE_FEATURES),
        fe.set_owner(),
        fe.reset_device(),
        fe.set_vring_num(0, 64),
        fe.set_vring_base(0, 0),
        fe.get_vring_base(0),
        fe.set_vring_addr(0, *ring_uvas(0)),
        fe.set_vring_enable(0, True),
        fe.set_vring_kick(0, has_fd=False),
        fe.set_vring_call(0, has_fd=False),
        fe.set_protocol_features(PF.MQ),
        fe.get_queue_num(),
        fe.get_max_mem_slots(),
    ],
    ids=lambda data: Req(parse_header(data)[0]).name,
)
def test_fds_on_message_without_fds_are_closed(drv, data):
    fds = [eventfd(), memfd(0x1000)]
    expect_rejected(drv, data, fds, match="may not carry fds")
    assert drv.backend.features == 0 and drv.backend.protocol_features == 0


def test_fd_count_mismatch(drv, ram):
    expect_rejected(drv, fe.set_vring_kick(0), [], match="expected 1 fds, got 0")
    expect_rejected(drv, fe.set_vring_call(1), [eventfd(), eventfd()], match="expected 1 fds, got 2")
    expect_rejected(drv, fe.set_mem_table(REGIONS), [os.dup(ram)], match="expected 2 fds, got 1")
    expect_rejected(drv, fe.set_backend_req_fd(), [], match="expected 1")
    drv.send(fe.set_protocol_features(DEFAULT_PROTOCOL_FEATURES))
    expect_rejected(drv, fe.add_mem_reg(0, 0x1000, UVA, 0), [], match="expected 1 fds, got 0")
    expect_rejected(drv, fe.rem_mem_reg(0, 0x1000, UVA), [eventfd(), eventfd()], match="0 to 1")
    assert drv.backend.memory.regions == ()


def test_vring_index_out_of_range(drv):
    for data in (
        fe.set_vring_num(2, 64),
        fe.set_vring_base(7, 0),
        fe.get_vring_base(2),
        fe.set_vring_addr(2, *ring_uvas(0)),
        fe.set_vring_enable(255, True),
        fe.set_vring_num(0xFFFFFFFF, 64),
    ):
        expect_rejected(drv, data, match="out of range")
    expect_rejected(drv, fe.set_vring_kick(2), [eventfd()], match="out of range")
    expect_rejected(drv, fe.set_vring_call(200), [eventfd()], match="out of range")
    expect_rejected(drv, fe.set_vring_err(5, has_fd=False), match="out of range")
    # Bits beyond the index and NOFD flag.
    expect_rejected(drv, fe.request(Req.SET_VRING_KICK, struct.pack("<Q", 0x1000)), match="unknown bits")


def test_vring_addresses_outside_memory(ram, drv):
    connect(drv)
    drv.send(fe.set_features(DEVICE_FEATURES | F_PROTOCOL))
    set_memory(drv, ram, mem_slots=True)
    drv.send(fe.set_vring_num(0, QSIZE))
    desc, used, avail = ring_uvas(0)
    for bad in (
        (UVA - 0x1000, used, avail),  # below the regions
        (desc, UVA + MEM_SIZE, avail),  # after them
        (desc, used, UVA + MEM_SIZE - 10),  # avail ring runs off the end
        (UVA + 0x100000 - 16 * 64, used, avail),  # desc table straddles two regions
        (desc + 8, used, avail),  # misaligned descriptor table
        (desc, used + 2, avail),  # misaligned used ring
    ):
        expect_rejected(drv, fe.set_vring_addr(0, *bad), match="vring 0")
    assert not drv.backend.queues[0].is_configured
    # The rejected addresses did not stick: a kick + enable uses none.
    drv.send(fe.set_vring_kick(0), [eventfd()])
    assert drv.send(fe.set_vring_enable(0, True)).events == []
    # A size change that makes good rings overflow memory is refused too.
    drv.send(fe.set_vring_addr(0, UVA + MEM_SIZE - 0x1000, used, avail))
    assert drv.backend.is_running(0)
    expect_rejected(drv, fe.set_vring_num(0, 1024), match="vring 0")
    assert drv.backend.is_running(0) and drv.backend.queues[0].size == QSIZE


def test_bad_vring_values(drv):
    for n in (0, 3, 100, 1000, 2048, 1 << 31):
        expect_rejected(drv, fe.set_vring_num(0, n), match="power of two")
    expect_rejected(drv, fe.set_vring_base(0, 0x10000), match="16-bit")
    expect_rejected(drv, fe.set_vring_enable(0, True)[:-4] + struct.pack("<I", 2), match="neither")
    expect_rejected(drv, fe.set_vring_addr(0, *ring_uvas(0), flags=1), match="logging")
    expect_rejected(drv, fe.set_vring_addr(0, *ring_uvas(0), flags=2), match="flags")


def test_bad_features_and_flags(drv):
    expect_rejected(drv, fe.set_features(1 << 40), match="not offered")
    expect_rejected(drv, fe.set_protocol_features(PF.LOG_SHMFD), match="not offered")
    get = fe.get_features()
    expect_rejected(drv, get[:4] + struct.pack("<I", abi.VERSION | abi.FLAG_REPLY) + get[8:], match="REPLY")
    expect_rejected(drv, get[:4] + struct.pack("<I", abi.VERSION | 0x10) + get[8:], match="unknown flags")
    msg = Message(Req.GET_FEATURES, 2, b"", [eventfd()])
    fd = msg.fds[0]
    with pytest.raises(VhostUserProtocolError, match="version"):
        drv.backend.handle(msg)
    assert is_closed(fd) and msg.fds == []


def test_rejected_message_changes_nothing(ram, drv):
    connect(drv)
    start(drv, DEVICE_FEATURES, ram)
    before = [(drv.backend.kick_fd(i), drv.backend.call_fd(i), drv.backend.is_running(i)) for i in range(2)]
    expect_rejected(drv, fe.set_vring_kick(0), [eventfd(), eventfd()])
    expect_rejected(drv, fe.set_vring_addr(0, 0, 0, 0), match="vring 0")
    expect_rejected(drv, fe.set_mem_table([(0, 0, UVA, 0)]), [os.dup(ram)], match="invalid region")
    expect_rejected(drv, fe.set_mem_table([(0, 0x1000, 1, 0), (0x800, 0x1000, 2, 0)]), [os.dup(ram), os.dup(ram)],
                    match="overlap")
    after = [(drv.backend.kick_fd(i), drv.backend.call_fd(i), drv.backend.is_running(i)) for i in range(2)]
    assert before == after
    assert len(drv.backend.memory.regions) == 2
    # The next good message gets no stale events.
    assert drv.send(fe.set_owner()).events == []


def test_nack_reply():
    bad = Message(Req.SET_VRING_NUM, abi.VERSION | abi.FLAG_NEED_REPLY, b"", [])
    assert fe.parse_reply(Req.SET_VRING_NUM, nack_reply(bad)) == 1
    assert nack_reply(Message(Req.SET_VRING_NUM, abi.VERSION, b"", [])) is None
    assert nack_reply(Message(Req.GET_FEATURES, abi.VERSION | abi.FLAG_NEED_REPLY, b"", [])) is None
    assert nack_reply(Message(Req.GET_VRING_BASE, abi.VERSION, b"", [])) is None
    assert fe.parse_reply(Req.GET_CONFIG, nack_reply(Message(Req.GET_CONFIG, abi.VERSION, b"", []))) == b""
    assert nack_reply(Message(99, abi.VERSION | abi.FLAG_NEED_REPLY, b"", [])) is not None
    backend = make_backend()
    assert backend.nack_reply(bad) is None  # REPLY_ACK not negotiated yet
    backend.protocol_features = PF.REPLY_ACK
    assert backend.nack_reply(bad) == nack_reply(bad)
    backend.close()


# --- driver side ----------------------------------------------------------------------


def test_frontend_builders_layout():
    assert fe.set_vring_addr(1, 0x10, 0x20, 0x30, log=0x40)[12:] == struct.pack("<IIQQQQ", 1, 0, 0x10, 0x20, 0x30, 0x40)
    assert fe.set_vring_kick(3, has_fd=False)[12:] == struct.pack("<Q", 3 | 0x100)
    assert fe.set_vring_call(3)[12:] == struct.pack("<Q", 3)
    assert fe.set_mem_table([(1, 2, 3, 4)])[12:] == struct.pack("<IIQQQQ", 1, 0, 1, 2, 3, 4)
    assert fe.add_mem_reg(1, 2, 3, 4)[12:] == struct.pack("<QQQQQ", 0, 1, 2, 3, 4)
    assert parse_header(fe.set_vring_enable(0, True, need_reply=True)) == (Req.SET_VRING_ENABLE, 9, 8)
    assert fe.expects_reply(fe.get_vring_base(0)) and fe.expects_reply(fe.set_owner(need_reply=True))
    assert not fe.expects_reply(fe.set_owner())
    with pytest.raises(ValueError):
        fe.set_vring_kick(256)
    with pytest.raises(ValueError):
        fe.set_mem_table([(0, 1, 2, 3)] * 9)
    with pytest.raises(ValueError):
        fe.set_vring_num(-1, 8)


def test_frontend_parse_reply_checks():
    good = encode_message(Req.GET_FEATURES, struct.pack("<Q", 7), flags=5)
    assert fe.parse_reply(Req.GET_FEATURES, good) == 7
    with pytest.raises(VhostUserProtocolError, match="expected a reply"):
        fe.parse_reply(Req.GET_PROTOCOL_FEATURES, good)
    with pytest.raises(VhostUserProtocolError, match="flags"):
        fe.parse_reply(Req.GET_FEATURES, encode_message(Req.GET_FEATURES, struct.pack("<Q", 7)))
    with pytest.raises(VhostUserProtocolError, match="expected 8"):
        fe.parse_reply(Req.GET_FEATURES, encode_message(Req.GET_FEATURES, bytes(4), flags=5))
    with pytest.raises(VhostUserProtocolError, match="declares"):
        fe.parse_reply(Req.GET_FEATURES, good + b"x")
    with pytest.raises(VhostUserProtocolError):
        fe.parse_reply(Req.GET_FEATURES, good[:10])


# --- fuzzing ------------------------------------------------------------------------------

_SIZES = [0, 4, 8, 12, 24, 40, 72, 264, 300]


@st.composite
def _fuzz_message(draw):
    kind = draw(st.integers(0, 2))
    if kind == 0:  # raw bytes
        return draw(st.binary(max_size=64)), draw(st.integers(0, 2))
    request = draw(st.one_of(st.integers(0, 45), st.sampled_from(list(Req))))
    flags = draw(st.sampled_from([1, 1, 9, 5, 0, 3, 0x11]))
    size = draw(st.sampled_from(_SIZES))
    if kind == 1:
        payload = draw(st.binary(min_size=size, max_size=size))
    else:  # plausible field values
        words = draw(st.lists(st.sampled_from([0, 1, 2, 8, 128, 0x100, 0x101, 1 << 30, UVA, UVA + 0x10000,
                                               0x100000, 0xFFFFFFFF]), min_size=size // 4 + 1, max_size=size // 4 + 1))
        payload = b"".join(struct.pack("<I", w & 0xFFFFFFFF) for w in words)[:size]
    return encode_message(request, payload, flags=flags), draw(st.integers(0, 2))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    setup=st.booleans(),
    items=st.lists(_fuzz_message(), max_size=25),
    mutate=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
)
def test_fuzz_reader_and_backend_raise_only_protocol_errors(setup, items, mutate):
    """Arbitrary streams raise only ProtocolError subclasses and leak no fd."""
    with no_fd_leak():
        ram = memfd()
        backend = make_backend(protocol_features=DEFAULT_PROTOCOL_FEATURES | PF.BACKEND_REQ | PF.STATUS)
        reader = MessageReader()
        chunks: list[tuple[bytes, list[int]]] = []
        if setup:
            chunks.append((fe.set_protocol_features(DEFAULT_PROTOCOL_FEATURES | PF.BACKEND_REQ), []))
            chunks.append((fe.set_mem_table(REGIONS), [os.dup(ram), os.dup(ram)]))
            for i in range(2):
                chunks.append((fe.set_vring_num(i, QSIZE), []))
                chunks.append((fe.set_vring_addr(i, *ring_uvas(i)), []))
                chunks.append((fe.set_vring_kick(i), [eventfd()]))
        for data, nfd in items:
            data = bytearray(data)
            for pos, value in mutate:
                if data:
                    data[pos % len(data)] = value
            fds = [eventfd() if k % 2 else memfd(0x1000) for k in range(nfd)]
            chunks.append((bytes(data), fds))
        started: set[int] = set()
        dead = False
        for data, fds in chunks:
            reader.feed(data, fds)  # a dead reader closes the fds it gets
            while not dead:
                try:
                    msg = reader.next_message()
                except ProtocolError:
                    dead = True
                    break
                if msg is None:
                    break
                try:
                    result = backend.handle(msg)
                except ProtocolError:
                    assert msg.fds == []
                    continue
                for ev in result.events:
                    if isinstance(ev, QueueStarted):
                        assert ev.index not in started
                        started.add(ev.index)
                        os.fstat(ev.kick_fd)  # still open: the backend owns it
                    elif isinstance(ev, QueueStopped):
                        started.discard(ev.index)
                    elif isinstance(ev, Reset):
                        started.clear()
                for fd in result.close_fds:
                    os.close(fd)
        assert started == {i for i in range(2) if backend.is_running(i)}
        reader.close()
        backend.close()
        os.close(ram)
