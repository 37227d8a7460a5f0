"""The compiled twins (virtiofs_async._cy_vring, _cy_codec) against the pure
modules (vring, buffers, codec): the same random input, well-formed and
garbage, must give the same results, errors (type, message, ``head`` /
``unique`` / ``errno``), queue state and guest-memory contents.

The shared suites (test_vring.py, test_codec.py) run on whichever twin
``_accel`` selects; this file runs both side by side. It skips when the
extensions are not built, except when VIRTIOFS_ASYNC_IMPLEMENTATION (or
VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION) asks for cython: then it fails.
"""
from __future__ import annotations

import array
import errno
import mmap
import os
import struct

import attrs
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from virtiofs_async import buffers, codec, vring
from virtiofs_async.abi import fuse as abi
from virtiofs_async.abi.fuse import Opcode
from virtiofs_async.errors import FuseProtocolError, VringError
from virtiofs_async.memory import GuestMemory
from virtiofs_async.operations import EntryAttributes, RequestContext

from .compiled import need_compiled
from .codec_strategies import direntpluses, entry_attributes, entry_outs, request_of, requests, resplit

try:
    from virtiofs_async import _cy_codec, _cy_vring
except ImportError as exc:  # not built
    _cy_codec = _cy_vring = None
    _MISSING: ImportError | None = exc
else:
    _MISSING = None



def _need_compiled() -> None:
    need_compiled(_MISSING, "the Cython twins are")


@pytest.fixture(autouse=True)
def _compiled() -> None:
    _need_compiled()


def test_compiled_twins_are_the_ones_in_the_package() -> None:
    assert _cy_codec.__name__ == "virtiofs_async._cy_codec"
    assert _cy_vring.__name__ == "virtiofs_async._cy_vring"
    assert _cy_codec.__file__.endswith((".so", ".pyd"))
    assert _cy_vring.__file__.endswith((".so", ".pyd"))


def test_request_records_skip_the_python_init() -> None:
    """Every record the C path builds takes the fast construction (a change to
    a codec class that disables it shows up here, not as a slowdown)."""
    builders = _cy_codec._record_builders()
    assert builders and all(builders.values()), [name for name, fast in builders.items() if not fast]


# ---------------------------------------------------------------------------
# Outcome comparison
# ---------------------------------------------------------------------------


def outcome(fn, *args, **kw):
    """("ok", result) or ("raise", type, message, head, unique, errno, cause type)."""
    try:
        return ("ok", fn(*args, **kw))
    except Exception as exc:  # noqa: BLE001 - the exception itself is what is compared
        return (
            "raise",
            type(exc),
            str(exc),
            getattr(exc, "head", "-"),
            getattr(exc, "unique", "-"),
            getattr(exc, "errno", "-"),
            type(exc.__cause__),
        )


def same_outcome(a, b) -> None:
    if a[0] == "raise" or b[0] == "raise":
        assert a == b
    else:
        assert type(a[1]) is type(b[1])
        assert a[1] == b[1]


# ---------------------------------------------------------------------------
# Virtqueue: one ring image per twin, driven identically
# ---------------------------------------------------------------------------

BASE = 0x10_0000
UVA = 0x7F00_0000_0000
MEM = 0x8000
DESC_OFF, AVAIL_OFF, USED_OFF, DATA_OFF = 0x0, 0x1000, 0x2000, 0x3000


class Twin:
    """A guest RAM image (memfd) with its GuestMemory and a queue of one twin."""

    def __init__(self, module, layout: list[tuple[int, int]], max_size: int = 32768) -> None:
        self.fd = os.memfd_create("twin", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, MEM)
        self.mm = mmap.mmap(self.fd, MEM)
        self.memory = GuestMemory()
        self.map(layout)
        self.vq = module.VirtQueue(max_size)

    def map(self, layout: list[tuple[int, int]]) -> None:
        """Replace the memory table: regions (offset, size) of the memfd at BASE + offset."""
        self.memory.clear()
        for off, size in layout:
            self.memory.add_region(os.dup(self.fd), BASE + off, size, UVA + off, off)

    def close(self) -> None:
        self.memory.close()
        self.mm.close()
        os.close(self.fd)


class TwinRig:
    def __init__(self, layout: list[tuple[int, int]]) -> None:
        self.py = Twin(vring, layout)
        self.cy = Twin(_cy_vring, layout)
        self.chains: list[tuple[object, object]] = []

    def write(self, off: int, data: bytes) -> None:
        """The driver writes guest RAM (both images)."""
        for t in (self.py, self.cy):
            t.mm[off : off + len(data)] = data

    def both(self, name: str, *args):
        """Call queue method ``name`` on both twins (with each one's memory when
        it takes one) and check the outcomes agree."""
        takes_memory = name not in ("set_size", "reset")
        results = []
        for t in (self.py, self.cy):
            fn = getattr(t.vq, name)
            results.append(outcome(fn, t.memory, *args) if takes_memory else outcome(fn, *args))
        a, b = results
        if name in ("pop", "pop_many"):
            assert normalize(a) == normalize(b)
            if a[0] == "ok" and a[1] is not None:
                pairs = zip(a[1], b[1]) if name == "pop_many" else [(a[1], b[1])]
                for pc, cc in pairs:
                    assert type(cc) is _cy_vring.DescriptorChain and type(pc) is vring.DescriptorChain
                    self.chains.append((pc, cc))
        else:
            same_outcome(a, b)
        self.check_state()
        return a

    def check_state(self) -> None:
        p, c = self.py.vq, self.cy.vq
        for attr in ("size", "next_avail", "next_used", "event_idx", "indirect", "broken", "is_configured",
                     "desc_gpa", "avail_gpa", "used_gpa", "max_size"):
            assert getattr(p, attr) == getattr(c, attr), attr
        assert repr(p) == repr(c)

    def images_equal(self) -> None:
        assert self.py.mm[:] == self.cy.mm[:]

    def close(self) -> None:
        self.chains.clear()
        self.py.close()
        self.cy.close()


def chain_shape(chain) -> tuple:
    """What a chain says, in terms comparable across twins and images."""
    return (
        chain.head,
        [bytes(v) for v in chain.readable],
        [(len(v), v.readonly, v.format, v.ndim) for v in chain.writable],
        [(v.readonly, v.format, v.ndim, v.contiguous) for v in chain.readable],
        chain.readable_len,
        chain.writable_len,
    )


def normalize(result):
    if result[0] == "raise":
        return result
    value = result[1]
    if value is None:
        return ("ok", None)
    if isinstance(value, list):
        return ("ok", [chain_shape(c) for c in value])
    return ("ok", chain_shape(value))


def desc(addr: int, length: int, flags: int, nxt: int) -> bytes:
    return struct.pack("<QIHH", addr & (2**64 - 1), length & 0xFFFFFFFF, flags & 0xFFFF, nxt & 0xFFFF)


N, W, I = 1, 2, 4  # VIRTQ_DESC_F_NEXT, _WRITE, _INDIRECT
TABLES_OFF = 0x6000  # indirect tables live here: TABLES_OFF + 0x100 * k, up to 16 entries each

#: Offsets where region layouts like to cut the memfd (two inside indirect
#: tables); descriptors like to point just below them, to cross or end there.
CUTS = [0x4000, 0x4801, TABLES_OFF + 0x40, TABLES_OFF + 0x108, TABLES_OFF + 0x200]
_data_addrs = st.one_of(
    st.integers(BASE + DATA_OFF, BASE + TABLES_OFF),
    st.integers(BASE + DATA_OFF, BASE + MEM - 1).map(lambda a: a - a % 16),
    st.sampled_from([*CUTS, MEM]).flatmap(lambda c: st.integers(BASE + c - 24, BASE + c)),
)
_garbage_addrs = st.one_of(
    st.integers(BASE - 64, BASE + MEM + 64),
    st.integers(0, 2**64 - 1),
    st.sampled_from([0, 2**64 - 1, 2**64 - 16, BASE + MEM - 16, BASE + MEM - 1]),
)
_small_lengths = st.one_of(st.integers(0, 32), st.integers(0, 64), st.integers(0, 0x1400))
_garbage_lengths = st.one_of(st.sampled_from([0xFFFF_FFF0, 0xFFFF_FFFF, 2**31]), st.integers(0, 2**32 - 1))
_data_flags = st.one_of(st.sampled_from([0, N, N, N, W, N | W, N | W, 0]), st.integers(0, 0xFFFF))


@st.composite
def descriptors(draw, table_len: int, tables: list[tuple[int, int]]) -> tuple[int, int, int, int]:
    """One descriptor of a table of ``table_len`` entries: mostly a plausible
    buffer, sometimes an indirect descriptor (``tables``: (gpa, entries)),
    sometimes garbage. ``next`` mostly stays in the table."""
    kind = draw(st.sampled_from(["data"] * 6 + ["indirect"] * 2 + ["garbage"]))
    nxt = draw(st.one_of(st.integers(0, table_len - 1), st.integers(0, table_len - 1), st.integers(0, 0xFFFF)))
    if kind == "indirect" and tables:
        gpa, entries = draw(st.sampled_from(tables))
        length = draw(st.one_of(st.just(16 * entries), st.just(16 * entries), _small_lengths))
        flags = draw(st.sampled_from([I, I, I, I | W, I | N]))
        return gpa, length, flags, nxt
    if kind == "garbage":
        return draw(_garbage_addrs), draw(_garbage_lengths), draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF))
    return draw(_data_addrs), draw(_small_lengths), draw(_data_flags), nxt


@st.composite
def region_layouts(draw, ring_safe: bool = True) -> list[tuple[int, int]]:
    """The memfd as 1-3 adjacent regions (split at arbitrary offsets), maybe
    with a hole; with ``ring_safe`` the rings stay mapped in one region."""
    low = DATA_OFF if ring_safe else 1
    cuts = sorted(set(draw(st.lists(st.one_of(st.sampled_from(CUTS), st.integers(low, MEM - 1)), max_size=2))))
    bounds = [0, *cuts, MEM]
    regions = [(a, b - a) for a, b in zip(bounds, bounds[1:])]
    if len(regions) > 1 and draw(st.integers(0, 2)) == 0:
        del regions[draw(st.integers(1, len(regions) - 1))]  # a hole (never the rings' region)
    return regions


@st.composite
def chain_rows(draw, free: list[int]) -> tuple[int, list[tuple[int, tuple]]]:
    """A well-formed chain on descriptors taken from ``free``: (head, [(index, descriptor)])."""
    length = draw(st.integers(1, min(3, len(free))))
    n_read = draw(st.integers(0, length))
    idx = [free.pop() for _ in range(length)]
    rows = []
    for k, i in enumerate(idx):
        flags = (N if k + 1 < length else 0) | (W if k >= n_read else 0)
        rows.append((i, (draw(_data_addrs), draw(st.integers(0, 64)), flags, idx[k + 1] if k + 1 < length else 0)))
    return idx[0], rows


@st.composite
def holey_layouts(draw) -> list[tuple[int, int]]:
    """Two regions with unmapped guest-physical space between them."""
    a, b = sorted(draw(st.lists(st.sampled_from(CUTS), min_size=2, max_size=2, unique=True)))
    if draw(st.booleans()):
        b = min(MEM - 1, b + draw(st.integers(1, 40)))
    return [(0, a), (b, MEM - b)]


@st.composite
def ring_images(draw, size: int) -> list[tuple[int, bytes]]:
    """Writes (offset, bytes): data pattern, indirect tables, descriptor
    table, available ring (entries, used_event, flags). Either well-formed
    chains with a few corrupted descriptors, or random descriptors."""
    writes = [(DATA_OFF, bytes(range(256)) * ((MEM - DATA_OFF) // 256))]
    tables = [(BASE + TABLES_OFF + 0x100 * k, draw(st.integers(1, 16))) for k in range(draw(st.integers(0, 4)))]
    table_rows = {}
    for gpa, entries in tables:
        if draw(st.booleans()):  # a well-formed indirect chain: 0..k readable, then writable
            n_read = draw(st.integers(0, entries))
            table_rows[gpa] = [
                (draw(_data_addrs), draw(st.integers(0, 64)), (N if k + 1 < entries else 0) | (W if k >= n_read else 0),
                 k + 1 if k + 1 < entries else 0)
                for k in range(entries)
            ]
        else:
            table_rows[gpa] = draw(st.lists(descriptors(entries, tables), min_size=entries, max_size=entries))
    if draw(st.booleans()):
        rows = draw(st.lists(descriptors(size, tables), min_size=size, max_size=size))
        heads = []
    else:
        rows = [(0, 0, 0, 0)] * size
        free = draw(st.permutations(range(size)))
        heads = []
        while free:
            if tables and draw(st.integers(0, 3)) == 0:
                gpa, entries = draw(st.sampled_from(tables))
                i = free.pop()
                rows[i] = (gpa, 16 * entries, I, 0)
                heads.append(i)
                continue
            head, chain = draw(chain_rows(free))
            heads.append(head)
            for i, row in chain:
                rows[i] = row
        for _ in range(draw(st.integers(0, 2))):  # corrupt a few descriptors
            rows[draw(st.integers(0, size - 1))] = draw(descriptors(size, tables))
    for gpa, trows in table_rows.items():
        writes.append((gpa - BASE, b"".join(desc(*d) for d in trows)))
    writes.append((DESC_OFF, b"".join(desc(*d) for d in rows)))
    if heads:
        ring = [heads[k % len(heads)] for k in range(size)]
    else:
        ring = draw(
            st.lists(st.one_of(st.integers(0, size - 1), st.integers(0, 0xFFFF)), min_size=size, max_size=size)
        )
    writes.append((AVAIL_OFF + 4, struct.pack(f"<{size}H", *ring)))
    writes.append((AVAIL_OFF + 4 + 2 * size, struct.pack("<H", draw(st.integers(0, 0xFFFF)))))  # used_event
    writes.append((AVAIL_OFF, struct.pack("<H", draw(st.sampled_from([0, 1])))))  # flags
    return writes


_ops = st.one_of(
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop_many"), st.integers(0, 5)),
    st.tuples(st.just("add_used"), st.integers(-2, 20), st.one_of(st.integers(0, 300), st.sampled_from([-1, 2**32]))),
    st.tuples(st.just("complete")),  # add_used for the oldest popped chain, after writing its buffers
    st.tuples(st.just("complete")),
    st.tuples(st.just("needs_notification")),
    st.tuples(st.just("needs_notification")),
    st.tuples(st.just("enable_notification")),
    st.tuples(st.just("disable_notification")),
    st.tuples(st.just("publish"), st.one_of(st.integers(0, 2), st.integers(0, 2), st.integers(0, 0xFFFF))),
    st.tuples(st.just("used_event"), st.integers(0, 0xFFFF)),
    st.tuples(st.just("used_event_near"), st.integers(-3, 2)),
    st.tuples(st.just("used_event_near"), st.integers(-3, 2)),
    st.tuples(st.just("avail_flags"), st.integers(0, 3)),
    st.tuples(st.just("rewrite_desc"), st.integers(0, 15), descriptors(16, [(BASE + TABLES_OFF, 4)])),
    st.tuples(st.just("remap"), st.one_of(region_layouts(), region_layouts(ring_safe=False))),
    st.tuples(st.just("set_next_avail"), st.one_of(st.integers(0, 0xFFFF), st.sampled_from([-1, 65536]))),
    st.tuples(st.just("set_next_used"), st.one_of(st.integers(0, 0xFFFF), st.sampled_from([-1, 65536]))),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    data=st.data(),
    size=st.sampled_from([1, 2, 4, 8, 16]),
    layout=region_layouts(),
    event_idx=st.booleans(),
    indirect=st.booleans(),
    start=st.one_of(st.integers(0, 0xFFFF), st.sampled_from([0, 0xFFFE, 0xFFFF])),
    ops=st.lists(_ops, max_size=25),
)
def test_random_rings_and_operations_agree(data, size, layout, event_idx, indirect, start, ops) -> None:
    ahead = data.draw(
        st.one_of(st.integers(1, size), st.integers(1, size), st.integers(0, size), st.integers(0, 0xFFFF)), label="ahead"
    )
    rig = TwinRig(layout)
    try:
        for off, blob in data.draw(ring_images(size)):
            rig.write(off, blob)
        rig.write(USED_OFF + 2, struct.pack("<H", data.draw(st.integers(0, 0xFFFF))))  # a previous used idx
        avail_idx = (start + ahead) & 0xFFFF
        rig.write(AVAIL_OFF + 2, struct.pack("<H", avail_idx))
        for t in (rig.py, rig.cy):
            t.vq.event_idx = event_idx
            t.vq.indirect = indirect
        rig.both("set_size", size)
        for t in (rig.py, rig.cy):
            t.vq.next_avail = start
        rig.both("set_addresses", BASE + DESC_OFF, BASE + AVAIL_OFF, BASE + USED_OFF)
        pending: list[tuple[object, object]] = []
        for op, *args in [("pop",), ("pop_many", size), *ops]:
            if op in ("pop", "needs_notification", "enable_notification", "disable_notification"):
                before = len(rig.chains)
                rig.both(op)
                pending.extend(rig.chains[before:])
            elif op == "pop_many":
                before = len(rig.chains)
                rig.both(op, *args)
                pending.extend(rig.chains[before:])
            elif op == "add_used":
                rig.both(op, *args)
            elif op == "complete":
                if pending:
                    pc, cc = pending.pop(0)
                    for chain in (pc, cc):  # each twin writes its own chain's buffers
                        n = 0
                        for v in chain.writable:
                            v[:] = bytes((chain.head * 7 + n + k) & 0xFF for k in range(len(v)))
                            n += len(v)
                    rig.both("add_used", pc.head, min(pc.writable_len, 2**32 - 1))
            elif op == "publish":
                avail_idx = (avail_idx + args[0]) & 0xFFFF
                rig.write(AVAIL_OFF + 2, struct.pack("<H", avail_idx))
            elif op == "used_event":
                rig.write(AVAIL_OFF + 4 + 2 * size, struct.pack("<H", args[0]))
            elif op == "used_event_near":  # interrupt me around the next used entries
                rig.write(AVAIL_OFF + 4 + 2 * size, struct.pack("<H", (rig.py.vq.next_used + args[0]) & 0xFFFF))
            elif op == "avail_flags":
                rig.write(AVAIL_OFF, struct.pack("<H", args[0]))
            elif op == "rewrite_desc":
                index, d = args
                if index < size:
                    rig.write(DESC_OFF + 16 * index, desc(*d))
            elif op == "remap":
                for t in (rig.py, rig.cy):
                    t.map(args[0])
            elif op in ("set_next_avail", "set_next_used"):
                name = op[4:]
                got = [outcome(setattr, t.vq, name, args[0]) for t in (rig.py, rig.cy)]
                same_outcome(*got)
                rig.check_state()
        rig.images_equal()
        # Views handed out by both twins cover the same guest bytes.
        for pc, cc in rig.chains:
            assert chain_shape(pc) == chain_shape(cc)
    finally:
        rig.close()


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.one_of(region_layouts(), holey_layouts()),
    length=st.one_of(st.integers(0, 80), st.sampled_from([8, 16, 24, 32, 48, 64, 4096])),
    flags=st.sampled_from([0, W, I, I]),
    table_entries=st.integers(1, 5),
    indirect=st.booleans(),
    data=st.data(),
)
def test_address_translation_at_region_borders_agrees(layout, length, flags, table_entries, indirect, data):
    """One descriptor (or an indirect table) that starts or ends around a
    region border, a hole or the end of RAM: same views or same VringError."""
    borders = sorted({edge for off, size in layout for edge in (off, off + size)} - {0})
    border = BASE + data.draw(st.sampled_from(borders), label="border")
    if data.draw(st.booleans(), label="end_near_border"):
        addr = border - length + data.draw(st.integers(-2, 2), label="end_delta")
    else:
        addr = border + data.draw(st.integers(-40, 8), label="start_delta")
    rig = TwinRig(layout)
    try:
        if flags & I and 0 <= addr - BASE <= MEM - 16 * table_entries:
            # a table whose buffers also sit around the border: 1 readable, then writable
            rows = [
                (border - 16 + 4 * k, 8 + 4 * k, (N if k + 1 < table_entries else 0) | (W if k else 0), k + 1)
                for k in range(table_entries)
            ]
            rig.write(addr - BASE, b"".join(desc(*row) for row in rows))
        rig.write(DESC_OFF, desc(addr, length, flags, 0))
        rig.write(AVAIL_OFF + 2, struct.pack("<H", 1))
        for t in (rig.py, rig.cy):
            t.vq.indirect = indirect
        rig.both("set_size", 4)
        rig.both("set_addresses", BASE + DESC_OFF, BASE + AVAIL_OFF, BASE + USED_OFF)
        rig.both("pop")
        rig.images_equal()
    finally:
        rig.close()


_session_ops = st.one_of(
    # a whole round: add and publish chains, pop them, complete some, decide, reap
    st.tuples(st.just("round"), st.integers(0, 3), st.integers(0, 4), st.one_of(st.none(), st.integers(-2, 3))),
    st.tuples(st.just("round"), st.integers(0, 3), st.integers(0, 4), st.one_of(st.none(), st.integers(-2, 3))),
    st.tuples(st.just("add"), st.lists(st.binary(max_size=24), max_size=2), st.lists(st.integers(0, 24), max_size=2),
              st.booleans()),
    st.tuples(st.just("publish")),
    st.tuples(st.just("pop")),
    st.tuples(st.just("pop_many"), st.integers(1, 4)),
    st.tuples(st.just("complete"), st.integers(0, 7), st.integers(0, 48)),
    st.tuples(st.just("notify")),
    st.tuples(st.just("used_event"), st.integers(-2, 3)),
    st.tuples(st.just("kicks"), st.booleans()),
    st.tuples(st.just("interrupts"), st.booleans()),
    st.tuples(st.just("pop_used")),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([1, 2, 4, 8]),
    event_idx=st.booleans(),
    start=st.one_of(st.sampled_from([0, 0xFFFD, 0xFFFF]), st.integers(0, 0xFFFF)),
    ops=st.lists(_session_ops, max_size=40),
)
def test_driver_sessions_agree(size, event_idx, start, ops) -> None:
    """Well-formed driver sessions (the testing DriverQueue on each image):
    every device call, kick and interrupt decision agrees."""
    from virtiofs_async.testing.driver_queue import DriverQueue

    rig = TwinRig([(0, MEM)])
    drivers = [
        DriverQueue(memoryview(t.mm), BASE, size, event_idx=event_idx, start_idx=start) for t in (rig.py, rig.cy)
    ]
    try:
        for t, drv in zip((rig.py, rig.cy), drivers):
            t.vq.event_idx = event_idx
            t.vq.indirect = True
            t.vq.set_size(size)
            t.vq.next_avail = start
        rig.both("set_addresses", drivers[0].desc_gpa, drivers[0].avail_gpa, drivers[0].used_gpa)
        in_device: list[tuple[object, object]] = []
        def complete(index: int, length: int) -> None:
            pc, cc = in_device.pop(index % len(in_device))
            n = min(length, pc.writable_len)
            payload = bytes((pc.head * 13 + k) & 0xFF for k in range(n))
            for chain in (pc, cc):
                assert _cy_vring.scatter(chain.writable, [payload]) == n
            rig.both("add_used", pc.head, n)

        for op, *args in ops:
            if op == "round":
                adds, completions, event = args
                for k in range(adds):
                    got = [outcome(d.add_chain, [b"req%d" % k], [8, 8], k == 1) for d in drivers]
                    assert got[0] == got[1]
                assert drivers[0].publish() == drivers[1].publish()
                assert drivers[0].needs_kick() == drivers[1].needs_kick()
                while True:
                    before = len(rig.chains)
                    if rig.both("pop")[1] is None:
                        break
                    in_device.extend(rig.chains[before:])
                if event is not None:
                    for d in drivers:
                        d.set_used_event((d.last_used + event) & 0xFFFF)
                for _ in range(min(completions, len(in_device))):
                    complete(0, 12)
                rig.both("needs_notification")
                while True:
                    used = drivers[0].pop_used()
                    assert used == drivers[1].pop_used()
                    if used is None:
                        break
            elif op == "add":
                readable, wlens, indirect = args
                if readable or wlens:
                    got = [outcome(d.add_chain, readable, wlens, indirect) for d in drivers]
                    assert got[0] == got[1]
            elif op == "publish":
                assert drivers[0].publish() == drivers[1].publish()
                assert drivers[0].needs_kick() == drivers[1].needs_kick()
            elif op in ("pop", "pop_many"):
                before = len(rig.chains)
                rig.both(op, *args)
                in_device.extend(rig.chains[before:])
            elif op == "complete":
                if in_device:
                    complete(*args)
            elif op == "notify":
                rig.both("needs_notification")
            elif op == "used_event":
                for d in drivers:
                    d.set_used_event((d.last_used + args[0]) & 0xFFFF)
            elif op == "kicks":
                rig.both("enable_notification" if args[0] else "disable_notification")
            elif op == "interrupts":
                if args[0]:
                    assert drivers[0].enable_interrupts() == drivers[1].enable_interrupts()
                else:
                    for d in drivers:
                        d.disable_interrupts()
            elif op == "pop_used":
                assert drivers[0].pop_used() == drivers[1].pop_used()
        rig.images_equal()
    finally:
        for d in drivers:
            d.mem.release()
        rig.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=region_layouts(ring_safe=False),
    size=st.one_of(st.sampled_from([0, 1, 2, 3, 8, 16, 1024, 32768, 65536]), st.integers(-2, 40)),
    addrs=st.lists(
        st.one_of(
            st.sampled_from([BASE + DESC_OFF, BASE + AVAIL_OFF, BASE + USED_OFF]),
            st.integers(BASE - 32, BASE + MEM + 32),
            st.integers(-(2**65), 2**65),
            st.just(True),
            st.just("0x1000"),
        ),
        min_size=3,
        max_size=3,
    ),
    max_size=st.sampled_from([1, 16, 1024, 32768]),
)
def test_configuration_agrees(layout, size, addrs, max_size) -> None:
    py, cy = Twin(vring, layout, max_size), Twin(_cy_vring, layout, max_size)
    try:
        same_outcome(outcome(py.vq.set_size, size), outcome(cy.vq.set_size, size))
        same_outcome(
            outcome(py.vq.set_addresses, py.memory, *addrs), outcome(cy.vq.set_addresses, cy.memory, *addrs)
        )
        for name in ("size", "is_configured", "desc_gpa", "avail_gpa", "used_gpa", "next_used"):
            assert getattr(py.vq, name) == getattr(cy.vq, name)
        same_outcome(outcome(py.vq.pop, py.memory), outcome(cy.vq.pop, cy.memory))
    finally:
        py.close()
        cy.close()


@pytest.mark.parametrize("max_size", [0, 3, 65536, -1, 2**70])
def test_bad_max_size_agrees(max_size) -> None:
    same_outcome(outcome(vring.VirtQueue, max_size), outcome(_cy_vring.VirtQueue, max_size))


def test_queue_features_survive_reset_in_both() -> None:
    for mod in (vring, _cy_vring):
        vq = mod.VirtQueue(8)
        vq.event_idx = 1
        vq.indirect = "yes"
        vq.set_size(8)
        vq.next_avail = 5
        vq.reset()
        assert (vq.event_idx, vq.indirect, vq.size, vq.next_avail, vq.is_configured) == (True, True, 0, 0, False)


def test_descriptor_chain_behaves_like_the_attrs_record() -> None:
    views = [memoryview(bytearray(b"abc")), memoryview(bytearray(5))]
    for mod in (vring, _cy_vring):
        c = mod.DescriptorChain(3, [views[0]], [views[1]])
        assert (c.head, c.readable_len, c.writable_len) == (3, 3, 5)
        assert c == mod.DescriptorChain(3, [memoryview(b"abc")], [memoryview(bytes(5))])
        assert c != mod.DescriptorChain(4, [views[0]], [views[1]])
        assert c != (3, [views[0]], [views[1]])
        c.head = 9
        c.readable.append(memoryview(b"de"))
        assert (c.head, c.readable_len) == (9, 5)
        with pytest.raises(TypeError):
            hash(c)
        match c:
            case mod.DescriptorChain(head, readable, writable):
                assert (head, len(readable), len(writable)) == (9, 2, 1)
    py = vring.DescriptorChain(1, [], [views[1]])
    cy = _cy_vring.DescriptorChain(1, [], [views[1]])
    assert repr(py) == repr(cy)
    assert py != cy  # different classes, as two attrs classes would be


def test_views_keep_guest_memory_alive_after_the_table_changes() -> None:
    """The compiled queue caches region buffers per generation: removing the
    regions must neither invalidate views already handed out nor let later
    calls touch the old mappings."""
    rig = TwinRig([(0, MEM)])
    try:
        rig.write(DATA_OFF, b"payload!")
        rig.write(DESC_OFF, desc(BASE + DATA_OFF, 8, 0, 0))
        rig.write(AVAIL_OFF + 2, struct.pack("<H", 1))
        rig.both("set_size", 4)
        rig.both("set_addresses", BASE + DESC_OFF, BASE + AVAIL_OFF, BASE + USED_OFF)
        rig.both("pop")
        _, chain = rig.chains[0]
        for t in (rig.py, rig.cy):
            t.memory.clear()
        assert bytes(chain.readable[0]) == b"payload!"
        result = rig.both("pop")  # rings unmapped now: same VringError, head None
        assert result[0] == "raise" and result[1] is VringError and result[3] is None
        rig.both("add_used", 0, 0)
        for t in (rig.py, rig.cy):
            t.map([(0, MEM)])
        rig.both("add_used", 0, 0)
        rig.images_equal()
    finally:
        rig.close()


# ---------------------------------------------------------------------------
# scatter
# ---------------------------------------------------------------------------


_DEST_KINDS = ["mv", "mv", "mv", "empty", "readonly", "cast", "strided", "bytearray", "none"]
destination_specs = st.lists(
    st.tuples(st.sampled_from(_DEST_KINDS), st.one_of(st.integers(1, 8), st.integers(9, 64))), max_size=4
)


def build_destinations(specs) -> tuple[list, list]:
    """(writable list for scatter, the storage behind each entry) from specs."""
    dests, storage = [], []
    for kind, n in specs:
        raw = bytes(n) if kind == "readonly" else bytearray(0 if kind == "empty" else 4 * n if kind == "cast" else 2 * n if kind == "strided" else n)
        storage.append(raw)
        if kind in ("mv", "empty", "readonly"):
            dests.append(memoryview(raw))
        elif kind == "cast":
            dests.append(memoryview(raw).cast("I"))
        elif kind == "strided":
            dests.append(memoryview(raw)[::2])
        elif kind == "bytearray":
            dests.append(raw)
        else:
            dests.append(None)
    return dests, storage


@st.composite
def sources(draw) -> list:
    out = []
    for _ in range(draw(st.integers(0, 4))):
        size = draw(st.one_of(st.integers(0, 8), st.integers(9, 80)))
        blob = bytes(b | 0x80 for b in draw(st.binary(min_size=size, max_size=size)))  # never 0: a missed byte shows
        kind = draw(st.sampled_from(["bytes", "bytes", "bytearray", "mv", "strided", "cast", "array", "str"]))
        if kind == "bytes":
            out.append(blob)
        elif kind == "bytearray":
            out.append(bytearray(blob))
        elif kind == "mv":
            out.append(memoryview(blob))
        elif kind == "strided":
            out.append(memoryview(blob)[::2])
        elif kind == "cast":
            out.append(memoryview(blob[: len(blob) // 2 * 2]).cast("H"))
        elif kind == "array":
            out.append(array.array("h", blob[: len(blob) // 2 * 2]))
        else:
            out.append("text")
    return out


@settings(max_examples=300, deadline=None)
@given(specs=destination_specs, parts=sources())
@example(specs=[("mv", 3), ("mv", 8)], parts=[b"hello", b"", b"world!"])
def test_scatter_agrees(specs, parts) -> None:
    py_dests, py_storage = build_destinations(specs)
    cy_dests, cy_storage = build_destinations(specs)
    same_outcome(outcome(buffers.scatter, py_dests, iter(parts)), outcome(_cy_vring.scatter, cy_dests, iter(parts)))
    assert py_storage == cy_storage


def test_scatter_copies_and_stops_at_the_end() -> None:
    dest = [memoryview(bytearray(4)), memoryview(bytearray(0)), memoryview(bytearray(6))]
    assert _cy_vring.scatter(dest, [b"abc", memoryview(b"defgh"), bytearray(b"ijklmnop")]) == 10
    assert [bytes(d) for d in dest] == [b"abcd", b"", b"efghij"]


# ---------------------------------------------------------------------------
# Codec
# ---------------------------------------------------------------------------


def _same_request(a, b, same_input: bool = True) -> None:
    assert type(a) is type(b)
    assert a == b
    assert a.header == b.header and type(a.header.opcode) is type(b.header.opcode) is Opcode
    assert a.ext == b.ext and type(a.ext) is type(b.ext)
    if isinstance(a, codec.WriteRequest):
        # The same zero-copy slices: same count, sizes and flags, of the same exporters.
        assert [(len(v), v.readonly, v.format, v.ndim) for v in a.data] == [
            (len(v), v.readonly, v.format, v.ndim) for v in b.data
        ]
        if same_input:
            assert [v.obj for v in a.data] == [v.obj for v in b.data]
            assert all(x.obj is y.obj for x, y in zip(a.data, b.data))
    else:
        assert repr(a) == repr(b)


def decode_both(pieces, cy_pieces=None, **kw):
    """Decode with both twins (``cy_pieces``: an equal, separate input for the
    compiled one, for inputs that are consumed); the outcomes must agree."""
    a = outcome(codec.decode_request, pieces, **kw)
    b = outcome(_cy_codec.decode_request, pieces if cy_pieces is None else cy_pieces, **kw)
    if a[0] == "ok" and b[0] == "ok":
        _same_request(a[1], b[1], same_input=cy_pieces is None)
    else:
        assert a == b
    return b


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests(), data=st.data())
def test_well_formed_requests_decode_identically(req, data) -> None:
    wire = req.encode()
    ext = getattr(req, "extended", False)
    result = decode_both(data.draw(resplit(wire)), setxattr_ext=ext)
    assert result[0] == "ok" and result[1] == req
    decode_both(data.draw(resplit([*wire, data.draw(st.binary(max_size=12))])), setxattr_ext=ext)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(req=requests(), data=st.data())
def test_corrupted_requests_agree(req, data) -> None:
    wire = bytearray(b"".join(req.encode()))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(wire) - 1))
        wire[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(wire)))
        del wire[cut:]
        if cut >= 4 and data.draw(st.booleans()):
            struct.pack_into("<I", wire, 0, cut)
    decode_both(data.draw(resplit([bytes(wire)])), setxattr_ext=data.draw(st.booleans()))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    req=st.one_of(
        requests(), request_of(codec.BatchForgetRequest), request_of(codec.RemovemappingRequest),
        request_of(codec.WriteRequest),
    ),
    change=st.integers(-24, 24),
    count_delta=st.integers(-1, 1),
    data=st.data(),
)
def test_bodies_with_bytes_added_or_removed_agree(req, change, count_delta, data) -> None:
    """A valid request whose body (before the extensions) grows or shrinks by a
    few bytes, with the header length kept consistent, and counted records
    (BATCH_FORGET, REMOVEMAPPING) whose count is off by one."""
    wire = bytearray(b"".join(req.encode()))
    body_end = len(wire) - len(req.ext)
    if change > 0:
        wire[body_end:body_end] = bytes(range(1, change + 1))
    elif change < 0:
        del wire[max(40, body_end + change) : body_end]
    struct.pack_into("<I", wire, 0, len(wire))
    if isinstance(req, (codec.BatchForgetRequest, codec.RemovemappingRequest)) and len(wire) >= 44:
        count = struct.unpack_from("<I", wire, 40)[0]
        struct.pack_into("<I", wire, 40, (count + count_delta) & 0xFFFFFFFF)
    decode_both(data.draw(resplit([bytes(wire)])), setxattr_ext=getattr(req, "extended", False))


@st.composite
def extension_areas(draw) -> bytes:
    """Request-extension bytes whose record sizes are plausible but not always right."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        payload = bytes(8 * draw(st.integers(0, 3)))
        size = draw(st.one_of(st.just(8 + len(payload)), st.integers(0, 48)))
        out += struct.pack("<II", size, draw(st.sampled_from([abi.FUSE_EXT_GROUPS, 1, 7]))) + payload
    return out[: len(out) // 8 * 8]


@settings(max_examples=400, deadline=None)
@given(
    req=st.sampled_from([
        codec.GetattrRequest(codec.InHeader(0, 0, 1, 1, 0, 0, 0), 0, 0),
        codec.MkdirRequest(codec.InHeader(0, 0, 2, 1, 0, 0, 0), 0o755, 0o22, b"dir"),
        codec.WriteRequest(codec.InHeader(0, 0, 3, 1, 0, 0, 0), 1, 0, 3, 0, 0, 0, [memoryview(b"abc")]),
        codec.SymlinkRequest(codec.InHeader(0, 0, 4, 1, 0, 0, 0), b"l", b"target"),
    ]),
    ext=extension_areas(),
    data=st.data(),
)
def test_extension_framing_agrees(req, ext, data) -> None:
    req.ext = ext
    decode_both(data.draw(resplit(req.encode())))


@settings(max_examples=400, deadline=None)
@given(
    opcode=st.one_of(st.sampled_from(sorted(set(Opcode))), st.integers(0, 60), st.integers(0, 2**32 - 1)),
    body=st.one_of(st.binary(max_size=120), st.binary(max_size=120).map(lambda b: b.replace(b"\0", b"") + b"\0")),
    extlen=st.integers(0, 4),
    ext=st.binary(max_size=40),
    length_delta=st.one_of(st.just(0), st.integers(-48, 8)),
    setxattr_ext=st.booleans(),
    data=st.data(),
)
def test_valid_headers_with_arbitrary_bodies_agree(opcode, body, extlen, ext, length_delta, setxattr_ext, data) -> None:
    n = 40 + len(body) + len(ext)
    header = struct.pack("<IIQQIIIHH", max(0, n + length_delta), opcode, 0xABCDEF, 1, 2, 3, 4, extlen, 0)
    decode_both(data.draw(resplit([header, body, ext])), setxattr_ext=setxattr_ext)


#: Name-carrying opcodes: the fixed struct before the name(s), and how many names.
_NAME_OPS = {
    Opcode.LOOKUP: (0, 1), Opcode.UNLINK: (0, 1), Opcode.RMDIR: (0, 1), Opcode.REMOVEXATTR: (0, 1),
    Opcode.MKDIR: (8, 1), Opcode.MKNOD: (16, 1), Opcode.CREATE: (16, 1), Opcode.TMPFILE: (16, 1),
    Opcode.GETXATTR: (8, 1), Opcode.LINK: (8, 1), Opcode.SYMLINK: (0, 2), Opcode.RENAME: (8, 2),
    Opcode.RENAME2: (16, 2), Opcode.SETXATTR: (8, 2),
}


@st.composite
def _tricky(draw) -> bytes:
    """A name field: mostly a NUL-terminated name, often with one '/' or NUL
    put first, last or anywhere (the cases the checks care about)."""
    core = draw(st.lists(st.sampled_from([b"a", b".", b"\xff"]), max_size=4))
    if draw(st.integers(0, 2)):
        where = draw(st.sampled_from(["first", "last", "any"]))
        at = 0 if where == "first" else len(core) if where == "last" else draw(st.integers(0, len(core)))
        core.insert(at, draw(st.sampled_from([b"/", b"\0"])))
    return b"".join(core) + (b"\0" if draw(st.integers(0, 5)) else b"")


@settings(max_examples=500, deadline=None)
@given(
    opcode=st.sampled_from(sorted(_NAME_OPS)),
    fixed=st.binary(min_size=16, max_size=16),
    names=st.lists(_tricky(), min_size=1, max_size=2),
    exact_count=st.integers(0, 4),
    setxattr_ext=st.booleans(),
    data=st.data(),
)
def test_names_with_slashes_and_nuls_agree(opcode, fixed, names, exact_count, setxattr_ext, data) -> None:
    size, count = _NAME_OPS[opcode]
    if exact_count:
        names = (names * 2)[:count]
    body = fixed[:size] + b"".join(names)
    header = struct.pack("<IIQQIIIHH", 40 + len(body), opcode, 31337, 1, 2, 3, 4, 0, 0)
    decode_both(data.draw(resplit([header, body])), setxattr_ext=setxattr_ext)


@settings(max_examples=300, deadline=None)
@given(blob=st.binary(max_size=200), data=st.data())
def test_garbage_bytes_agree(blob, data) -> None:
    decode_both(data.draw(resplit([blob])))


@pytest.mark.parametrize(
    "make",
    [
        lambda wire: [wire],
        lambda wire: (wire,),
        lambda wire: iter([wire[:10], wire[10:]]),
        lambda wire: [memoryview(bytearray(wire)).cast("I")],
        lambda wire: [array.array("B", wire)],
        lambda wire: [memoryview(wire + wire)[::2]],  # strided: not C-contiguous
        lambda wire: [memoryview(bytearray(wire)).cast("B", (len(wire) // 8, 8))],  # 2-D
        lambda wire: [wire[:40], memoryview(bytearray(wire[40:]))],
        lambda wire: [wire, "not a buffer"],
        lambda wire: [wire, None],
        lambda wire: 5,
        lambda wire: [bytearray(wire[:3]), b"", memoryview(wire[3:50]), bytearray(wire[50:])],
    ],
)
@pytest.mark.parametrize("kind", ["getattr", "write", "lookup"])
def test_unusual_buffer_types_agree(make, kind) -> None:
    h = codec.InHeader(0, 0, 99, 1, 0, 0, 0)
    if kind == "getattr":
        req = codec.GetattrRequest(h, 1, 2)
    elif kind == "write":
        req = codec.WriteRequest(h, 1, 2, 64, 0, 0, 0, [memoryview(bytes(range(64)))])
    else:
        req = codec.LookupRequest(h, b"name.txt")
    wire = b"".join(req.encode())
    wire += bytes(-len(wire) % 8)  # trailing bytes are ignored; lets the casts above work
    pieces = make(wire)
    if isinstance(pieces, type(iter([]))):
        decode_both(pieces, make(wire))  # an iterator is consumed: one each
    else:
        decode_both(pieces)


def test_released_view_agrees() -> None:
    h = codec.InHeader(0, 0, 5, 1, 0, 0, 0)
    wire = b"".join(codec.GetattrRequest(h, 0, 0).encode())
    view = memoryview(bytearray(wire))
    view.release()
    assert decode_both([view])[1] is ValueError


def test_write_payload_views_are_the_pure_twins_slices() -> None:
    h = codec.InHeader(0, 0, 5, 1, 0, 0, 0)
    payload = bytearray(b"x" * 100)
    head = b"".join(codec.WriteRequest(h, 1, 0, 100, 0, 0, 0, [memoryview(payload)]).encode()[:2])
    whole = memoryview(payload)
    for pieces in ([head, payload], [head, whole], [head + bytes(payload[:10]), payload[10:]], [head, b"", whole]):
        req = decode_both(pieces)[1]
        assert b"".join(req.data) == bytes(payload)
    first, rest = memoryview(payload)[:60], memoryview(payload)[60:]
    for fn in (codec.decode_request, _cy_codec.decode_request):
        data = fn([head, first, rest]).data
        assert data[0] is first  # a piece wholly inside the payload is passed through
        assert data[1] is not rest and data[1].obj is payload


@settings(max_examples=300, deadline=None)
@given(
    unique=st.one_of(st.integers(0, 2**64 - 1), st.integers(-5, 2**65), st.booleans()),
    error=st.one_of(st.sampled_from([0, errno.ENOENT, errno.EIO]), st.integers(-(2**32), 2**32)),
    body_len=st.one_of(st.integers(0, 2**20), st.integers(-20, 2**33)),
)
def test_encode_out_header_agrees(unique, error, body_len) -> None:
    same_outcome(
        outcome(codec.encode_out_header, unique, error, body_len),
        outcome(_cy_codec.encode_out_header, unique, error, body_len),
    )


_ints = st.one_of(st.integers(0, 2**64 - 1), st.integers(-(2**65), 2**66), st.booleans())
_names = st.one_of(
    st.binary(min_size=0, max_size=40),
    st.binary(max_size=20).map(bytearray),
    st.binary(max_size=20).map(memoryview),
    st.just("str-name"),
)


@settings(max_examples=300, deadline=None)
@given(ino=_ints, off=_ints, dtype=st.one_of(st.integers(0, 2**32 - 1), _ints), name=_names)
def test_pack_dirent_agrees(ino, off, dtype, name) -> None:
    same_outcome(outcome(codec.pack_dirent, ino, off, dtype, name), outcome(_cy_codec.pack_dirent, ino, off, dtype, name))


@st.composite
def odd_entries(draw) -> codec.EntryOut:
    """EntryOut with, now and then, a field struct refuses or converts."""
    entry = draw(entry_outs)
    if draw(st.booleans()):
        target = entry if draw(st.booleans()) else entry.attr
        field = draw(st.sampled_from([f.name for f in type(target).__attrs_attrs__ if f.name != "attr"]))
        setattr(target, field, draw(st.one_of(st.integers(-3, -1), st.just(2**64), st.booleans(), st.just(1.5))))
    return entry


@settings(max_examples=300, deadline=None)
@given(entry=odd_entries(), ino=_ints, off=_ints, dtype=st.integers(0, 2**32 - 1), name=_names)
def test_pack_direntplus_agrees(entry, ino, off, dtype, name) -> None:
    same_outcome(
        outcome(codec.pack_direntplus, entry, ino, off, dtype, name),
        outcome(_cy_codec.pack_direntplus, entry, ino, off, dtype, name),
    )


@given(entries=st.lists(direntpluses, max_size=4))
def test_packed_direntplus_records_parse_back(entries) -> None:
    packed = b"".join(
        _cy_codec.pack_direntplus(d.entry, d.dirent.ino, d.dirent.off, d.dirent.type, d.dirent.name) for d in entries
    )
    assert list(codec.iter_direntplus(packed)) == entries


class _HostDirent(tuple):
    """A tuple subclass standing for the backend's NamedTuple."""


_LINUX_DIRENT64 = struct.Struct("=QqHB")


@st.composite
def linux_dirent64_buffers(draw) -> tuple[bytes, int]:
    """getdents64 results: well-formed records (names with their NUL and
    padding), now and then damaged (cut, a bad reclen, no NUL), and a length
    that may stop short of or run past the data."""
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        name = draw(st.binary(min_size=1, max_size=30).filter(lambda n: b"\0" not in n))
        pad = draw(st.integers(1, 8))  # the NUL and alignment
        reclen = 19 + len(name) + pad
        out += _LINUX_DIRENT64.pack(draw(st.integers(0, 2**64 - 1)), draw(st.integers(-(2**63), 2**63 - 1)),
                                    reclen, draw(st.integers(0, 255))) + name + bytes(pad)
    data = bytearray(out)
    damage = draw(st.sampled_from(["none", "none", "reclen", "nul", "cut"]))
    if data and damage == "reclen":
        struct.pack_into("=H", data, 16, draw(st.integers(0, 0xFFFF)))
    elif data and damage == "nul":
        data[19:] = data[19:].replace(b"\0", b"x")
    length = len(data)
    if damage == "cut":
        length = draw(st.integers(0, len(data) + 4))
    return bytes(data), length


@settings(max_examples=400, deadline=None)
@given(case=linux_dirent64_buffers(), kind=st.sampled_from([bytes, bytearray, memoryview]))
def test_parse_linux_dirents64_agrees(case, kind) -> None:
    data, length = case
    a = outcome(codec.parse_linux_dirents64, kind(data), length, _HostDirent)
    b = outcome(_cy_codec.parse_linux_dirents64, kind(data), length, _HostDirent)
    same_outcome(a, b)
    if a[0] == "ok":
        assert all(type(r) is _HostDirent for r in b[1])


def test_parse_linux_dirents64_of_a_real_directory(tmp_path) -> None:
    """Both twins read a real getdents64 result the way os.scandir does."""
    import ctypes

    names = [b"a", b"x" * 255, "é".encode(), b"with space", *(b"f%d" % i for i in range(50))]
    for name in names:
        open(os.path.join(os.fsencode(tmp_path), name), "wb").close()
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        n = ctypes.CDLL(None, use_errno=True).getdents64(fd, buf, len(buf))
        assert n > 0
        expected = {e.name: e.inode() for e in os.scandir(os.fsencode(tmp_path))}
        for parse in (codec.parse_linux_dirents64, _cy_codec.parse_linux_dirents64):
            records = parse(buf, n, _HostDirent)
            assert {r[3]: r[0] for r in records if r[3] not in (b".", b"..")} == expected
            assert {r[3] for r in records} >= {b".", b".."}
            assert all(r[2] in (4, 8) for r in records)  # DT_DIR, DT_REG
    finally:
        os.close(fd)


class _Node:
    """Stands for an inode-table entry (only ``nodeid`` is read)."""

    def __init__(self, nodeid) -> None:
        self.nodeid = nodeid


_NAMES = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n),
    st.sampled_from([b".", b"..", b"x" * 255, b"y" * 1024, b"z" * 1025, b"", b"a/b", b"nul\0"]),
)


@st.composite
def host_dirent_batches(draw):
    """Host records (a few odd ones: a negative or huge cookie, a type out of
    u32, a str name, a short tuple), an inode table that knows some of them,
    a start index, a room and the dot/dotdot overrides."""
    records = []
    for _ in range(draw(st.integers(0, 12))):
        ino = draw(st.integers(0, 2**64 - 1) | st.sampled_from([1, 2, 3]))
        rec = _HostDirent((ino, draw(st.integers(0, 2**63 - 1)), draw(st.integers(0, 15)), draw(_NAMES)))
        odd = draw(st.sampled_from(["none"] * 12 + ["off", "type", "str", "short"]))
        if odd == "off":
            rec = _HostDirent((rec[0], draw(st.sampled_from([-1, 2**64])), rec[2], rec[3]))
        elif odd == "type":
            rec = _HostDirent((rec[0], rec[1], 2**32, rec[3]))
        elif odd == "str":
            rec = _HostDirent((rec[0], rec[1], rec[2], "name"))
        elif odd == "short":
            rec = _HostDirent(rec[:3])
        records.append(rec)
    dev = draw(st.integers(0, 2**20))
    known = {}
    for rec in records:
        if len(rec) == 4 and draw(st.booleans()):
            nodeid = draw(st.integers(1, 2**64 - 1) | st.sampled_from([-5, 2**64]))
            known[(draw(st.sampled_from([dev, dev + 1])), rec[0])] = _Node(nodeid)
    start = draw(st.integers(0, len(records) + 1))
    room = draw(st.integers(0, 600) | st.sampled_from([4096, 1 << 20]))
    dot = draw(st.sampled_from([0, 0, 7, 2**64 - 1, -1]))
    dotdot = draw(st.sampled_from([0, 0, 1, 9]))
    return records, start, room, known, dev, dot, dotdot


@settings(max_examples=500, deadline=None)
@given(case=host_dirent_batches())
def test_pack_host_dirents_agrees(case) -> None:
    """Same bytes and index (or the same error) from both twins; what they
    give parses back to the records, mapped through the inode table."""
    records, start, room, known, dev, dot, dotdot = case
    a = outcome(codec.pack_host_dirents, records, start, room, known, dev, dot, dotdot)
    b = outcome(_cy_codec.pack_host_dirents, records, start, room, known, dev, dot, dotdot)
    same_outcome(a, b)
    if a[0] != "ok":
        return
    packed, end = a[1]
    assert start <= end <= max(start, len(records))
    assert len(packed) <= room
    parsed = list(codec.iter_dirents(packed))
    assert [d.name for d in parsed] == [r[3] for r in records[start:end]]
    for d, r in zip(parsed, records[start:end]):
        if dot and r[3] == b".":
            want = dot
        elif dotdot and r[3] == b"..":
            want = dotdot
        else:
            node = known.get((dev, r[0]))
            want = r[0] if node is None else node.nodeid
        assert (d.ino, d.off, d.type) == (want, r[1], r[2])
    if end < len(records) and end >= start and len(records[end]) == 4 and isinstance(records[end][3], bytes):
        assert len(packed) + codec.dirent_size(len(records[end][3])) > room  # stopped because it was full


def test_pack_host_dirents_of_a_long_listing() -> None:
    """Records past the compiled twin's first buffer (8 KiB) pack the same."""
    records = [_HostDirent((i + 10, i + 1, 8, b"entry-%014d" % i)) for i in range(2000)]
    known = {(3, 15): _Node(99)}
    a = codec.pack_host_dirents(records, 5, 1 << 20, known, 3, 0, 0)
    assert _cy_codec.pack_host_dirents(records, 5, 1 << 20, known, 3, 0, 0) == a
    assert a[1] == 2000 and len(a[0]) == 1995 * 48


def _getdents64_of(path) -> tuple[bytes, int]:  # type: ignore[no-untyped-def]
    """One getdents64 call's buffer and length for the directory ``path``."""
    import ctypes
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = ctypes.create_string_buffer(1 << 16)
        n = ctypes.CDLL(None, use_errno=True).getdents64(fd, buf, len(buf))
        return buf.raw, n
    finally:
        os.close(fd)


def test_pack_host_dirents_of_a_real_directory(tmp_path) -> None:
    """A whole real listing, packed a page at a time, reads back as the
    directory's names with the table's node ids for known inodes."""
    for i in range(300):
        open(tmp_path / f"file-{i:04d}", "wb").close()
    buf, n = _getdents64_of(tmp_path)
    records = codec.parse_linux_dirents64(buf, n, _HostDirent)
    dev = os.stat(tmp_path).st_dev
    known = {(dev, r[0]): _Node(10**6 + k) for k, r in enumerate(records) if k % 3 == 0}
    for pack in (codec.pack_host_dirents, _cy_codec.pack_host_dirents):
        start, pages = 0, []
        while start < len(records):
            packed, start2 = pack(records, start, 4096, known, dev, 5, 0)
            assert start2 > start and len(packed) <= 4096
            pages.append(packed)
            start = start2
        parsed = [d for page in pages for d in codec.iter_dirents(page)]
        assert sorted(d.name for d in parsed) == sorted([b".", b"..", *(b"file-%04d" % i for i in range(300))])
        by_name = {r[3]: r for r in records}
        for d in parsed:
            r = by_name[d.name]
            want = 5 if d.name == b"." else known[(dev, r[0])].nodeid if (dev, r[0]) in known else r[0]
            assert d.ino == want
        assert len(pages) > 2


def _linux_dirent64(ino: int, off: int, dtype: int, name: bytes, junk: bytes = b"") -> bytes:
    """One record; ``junk`` after the name's NUL (where the kernel leaves
    the buffer's old bytes), then zeros to the 8-byte boundary."""
    reclen = (19 + len(name) + 1 + len(junk) + 7) & ~7
    after = (junk + bytes(reclen))[:reclen - 20 - len(name)]
    return struct.pack("=QqHB", ino, off, reclen, dtype) + name + b"\0" + after


@st.composite
def raw_dirent_batches(draw):
    """A getdents64 result (records with valid names, a few with names the
    packers refuse or a negative cookie; the tail sometimes cut or
    corrupt), an inode table knowing some of them, a start position (a
    record boundary, or not), a room, dot/dotdot and a cookie to look for."""
    names = st.one_of(
        st.binary(min_size=1, max_size=40).filter(lambda n: b"/" not in n and b"\0" not in n),
        st.sampled_from([b".", b"..", b"x" * 255, b"y" * 1024, b"z" * 1025, b"", b"a/b"]),
    )
    recs, bounds = [], [0]
    raw = b""
    for _ in range(draw(st.integers(0, 12))):
        ino = draw(st.integers(0, 2**64 - 1) | st.sampled_from([1, 2, 3]))
        off = draw(st.integers(0, 2**63 - 1) | st.sampled_from([-1, 5]))
        rec = (ino, off, draw(st.integers(0, 15)), draw(names))
        recs.append(rec)
        # bytes after the NUL: not the name's (a '/' there is no error),
        # and not copied into the packed record's zero padding
        junk = draw(st.sampled_from([b""] * 6 + [b"\xff" * 7, b"/", b"\x01/\xff", b"\xfe" * 12]))
        raw += _linux_dirent64(*rec, junk)
        bounds.append(len(raw))
    tail = draw(st.sampled_from(["none"] * 8 + ["cut", "reclen", "nonul"]))
    if tail == "cut" and raw:
        raw = raw[:-draw(st.integers(1, 8))]
    elif tail == "reclen":
        raw += struct.pack("=QqHB", 1, 1, 19, 0)
    elif tail == "nonul":
        raw += struct.pack("=QqHB", 1, 1, 24, 0) + b"abcde"
    dev = draw(st.integers(0, 2**20))
    known = {}
    for rec in recs:
        if draw(st.booleans()):
            known[(draw(st.sampled_from([dev, dev + 1])), rec[0])] = _Node(draw(st.integers(1, 2**64 - 1)))
    start = draw(st.sampled_from(bounds) | st.integers(0, len(raw) + 1))
    room = draw(st.integers(0, 600) | st.sampled_from([4096, 1 << 20]))
    dot = draw(st.sampled_from([0, 0, 7, 2**64 - 1]))
    dotdot = draw(st.sampled_from([0, 0, 1, 9]))
    want = draw(st.sampled_from([r[1] for r in recs] + [-1, 2**63, 12345]))
    return raw, recs, start, room, known, dev, dot, dotdot, want


@settings(max_examples=500, deadline=None)
@given(case=raw_dirent_batches())
def test_raw_dirent_twins_agree(case) -> None:
    """pack_raw_dirents and scan_raw_dirents: the same results (or errors)
    from both twins; what pack_raw_dirents gives from a record boundary is
    what pack_host_dirents gives for the parsed records, and the position
    it returns is the boundary after the last record packed."""
    raw, recs, start, room, known, dev, dot, dotdot, want = case
    a = outcome(codec.pack_raw_dirents, raw, start, room, known, dev, dot, dotdot)
    same_outcome(a, outcome(_cy_codec.pack_raw_dirents, raw, start, room, known, dev, dot, dotdot))
    scanned = outcome(codec.scan_raw_dirents, raw, want)
    same_outcome(scanned, outcome(_cy_codec.scan_raw_dirents, raw, want))
    bounds = [0]
    pos = 0
    for _ in recs:
        pos += struct.unpack_from("=H", raw, pos + 16)[0] if pos + 18 <= len(raw) else 0
        bounds.append(pos)
    clean = len(raw) == bounds[-1]
    if scanned[0] == "ok" and clean:
        after, last = scanned[1]
        assert last == (recs[-1][1] if recs else -1)
        hits = [bounds[i + 1] for i, r in enumerate(recs) if r[1] == want]
        assert after == (hits[0] if hits else -1)
    if a[0] != "ok" or start not in bounds:
        return
    packed, after, count, last = a[1]
    i = bounds.index(start)
    host = outcome(codec.pack_host_dirents, [_HostDirent(r) for r in recs], i, room, known, dev, dot, dotdot)
    assert host[0] == "ok"
    assert (packed, i + count) == host[1]
    assert after == bounds[i + count] and last == (recs[i + count - 1][1] if count else -1)


def test_raw_dirents_of_a_real_directory(tmp_path) -> None:
    """A whole real listing, packed a page at a time from the raw
    getdents64 result, equals pack_host_dirents over the parsed records."""
    for i in range(300):
        open(tmp_path / f"file-{i:04d}", "wb").close()
    buf, n = _getdents64_of(tmp_path)
    raw = buf[:n]
    records = codec.parse_linux_dirents64(raw, n, _HostDirent)
    dev = os.stat(tmp_path).st_dev
    big = {(dev, r[0]): _Node(10**6 + k) for k, r in enumerate(records) if k % 3 == 0}
    # a table of a few inodes (the compiled twin checks it without a lookup
    # per record), with keys of another device and of other shapes
    small = {(dev, r[0]): _Node(10**6 + k) for k, r in enumerate(records) if k % 60 == 7}
    small[(dev + 1, records[1][0])] = _Node(3)
    odd = dict(small)
    odd[("dev", 5)] = _Node(4)
    odd[(True, records[2][0])] = _Node(5)
    cases = [(known, pack, scan) for known in (big, small, odd)
             for pack, scan in ((codec.pack_raw_dirents, codec.scan_raw_dirents),
                                (_cy_codec.pack_raw_dirents, _cy_codec.scan_raw_dirents))]
    assert 2 < len(small) < 16
    for known, pack, scan in cases:
        pos, i, pages = 0, 0, 0
        while pos < len(raw):
            packed, after, count, last = pack(raw, pos, 4096, known, dev, 5, 0)
            assert (packed, i + count) == codec.pack_host_dirents(records, i, 4096, known, dev, 5, 0)
            assert last == records[i + count - 1][1] and scan(raw, last)[0] == after
            pos, i, pages = after, i + count, pages + 1
        assert i == len(records) and pages > 2
        assert scan(raw, -7) == (-1, records[-1][1])


def test_pack_direntplus_with_a_non_attrs_entry() -> None:
    """Duck-typed entries work as in the pure twin (attribute access)."""

    class Entry:
        nodeid, generation, entry_valid, attr_valid, entry_valid_nsec, attr_valid_nsec = 1, 2, 3, 4, 5, 6
        attr = codec.Attr(*range(16))

    assert _cy_codec.pack_direntplus(Entry(), 1, 2, 3, b"n") == codec.pack_direntplus(Entry(), 1, 2, 3, b"n")
    with pytest.raises(AttributeError):
        _cy_codec.pack_direntplus(object(), 1, 2, 3, b"n")


class _DuckAttributes:
    """Attributes in an instance __dict__ (no slots): looked up by name."""

    def __init__(self, source: EntryAttributes, drop: str | None = None) -> None:
        self.__dict__.update(attrs.asdict(source))
        if drop is not None:
            del self.__dict__[drop]


class _PropertyAttributes(EntryAttributes):
    """A subclass whose size is computed: a field that is no plain slot."""

    __slots__ = ()
    st_size = property(lambda self: 12345, lambda self, value: None)  # type: ignore[assignment]


class _CustomAccess(EntryAttributes):
    """A subclass that customises attribute access."""

    __slots__ = ()

    def __getattribute__(self, name: str) -> object:
        value = object.__getattribute__(self, name)
        return value + 1 if name == "st_nlink" and type(value) is int else value


_ODD_VALUES = st.one_of(
    st.integers(-3, -1), st.just(2**64), st.just(2**70), st.booleans(), st.just(1.5), st.just("x"),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), -0.0, 1e30, 2.0**64, 2.0**64 - 2048]),
    st.integers(-(2**65), 2**66),
)
_SOURCE_FIELDS = [f.name for f in attrs.fields(EntryAttributes)]


@st.composite
def odd_sources(draw):
    """An EntryAttributes with, now and then, a field the wire cannot carry
    as is, or a source of another shape."""
    source = draw(entry_attributes)
    if draw(st.booleans()):
        setattr(source, draw(st.sampled_from(_SOURCE_FIELDS)), draw(_ODD_VALUES))
    shape = draw(st.sampled_from(["slots", "slots", "duck", "duck-missing", "property", "custom"]))
    if shape == "duck":
        return _DuckAttributes(source)
    if shape == "duck-missing":
        return _DuckAttributes(source, drop=draw(st.sampled_from(_SOURCE_FIELDS)))
    if shape in ("property", "custom"):
        return (_PropertyAttributes if shape == "property" else _CustomAccess)(**attrs.asdict(source))
    return source


@settings(max_examples=500, deadline=None)
@given(sources=st.lists(odd_sources(), min_size=1, max_size=3))
def test_attribute_packers_agree(sources) -> None:
    """Same bytes or the same exception, also when the source type changes
    from call to call (the compiled twin caches the last type's slots)."""
    for source in sources:
        for name in ("pack_attr", "pack_attr_out", "pack_entry_out"):
            same_outcome(outcome(getattr(codec, name), source), outcome(getattr(_cy_codec, name), source))


def test_unset_slot_raises_the_pure_attribute_error() -> None:
    source = EntryAttributes()
    del source.st_nlink
    a, b = outcome(codec.pack_attr_out, source), outcome(_cy_codec.pack_attr_out, source)
    assert a == b and a[1] is AttributeError


_bodies = st.one_of(
    sources().map(lambda parts: parts[0] if len(parts) == 1 else parts),  # one buffer, or a list
    sources().map(tuple),
    st.just(None),
)


@settings(max_examples=400, deadline=None)
@given(
    specs=destination_specs,
    body=_bodies,
    unique=st.one_of(st.integers(0, 2**64 - 1), st.integers(-5, 2**65), st.booleans()),
    error=st.one_of(st.sampled_from([0, errno.ENOENT]), st.integers(-(2**32), 2**32)),
    as_tuple=st.booleans(),
)
@example(specs=[("mv", 10), ("mv", 40)], body=[b"abc", b"de"], unique=7, error=0, as_tuple=False)
@example(specs=[("mv", 16)], body=(), unique=7, error=errno.EIO, as_tuple=True)
def test_write_reply_agrees(specs, body, unique, error, as_tuple) -> None:
    py_dests, py_storage = build_destinations(specs)
    cy_dests, cy_storage = build_destinations(specs)
    if as_tuple:
        py_dests, cy_dests = tuple(py_dests), tuple(cy_dests)
    same_outcome(
        outcome(codec.write_reply, py_dests, unique, error, body),
        outcome(_cy_codec.write_reply, cy_dests, unique, error, body),
    )
    assert py_storage == cy_storage


def test_write_reply_spreads_over_many_buffers() -> None:
    """More buffers and parts than the compiled twin keeps on its stack."""
    body = [bytes([i]) * (i % 5) for i in range(40)]
    for fn in (codec.write_reply, _cy_codec.write_reply):
        dests = [memoryview(bytearray(3)) for _ in range(40)]
        total = 16 + sum(len(p) for p in body)
        assert fn(dests, 1, 0, body) == total
        assert b"".join(bytes(d) for d in dests)[:total] == codec.encode_out_header(1, 0, total - 16) + b"".join(body)


def test_record_factory_skips_init_only_for_plain_records() -> None:
    make = _cy_codec.record_factory(RequestContext)
    assert make is not RequestContext
    assert make(1, 2, 3, 4, (5,)) == RequestContext(1, 2, 3, 4, (5,))
    assert make(1, 2, 3) == RequestContext(1, 2, 3)

    @attrs.define
    class Checked:
        x: int = attrs.field(validator=attrs.validators.instance_of(int))

    assert _cy_codec.record_factory(Checked) is Checked
    assert codec.record_factory(RequestContext) is RequestContext


def test_fuse_protocol_error_carries_unique_in_both() -> None:
    wire = struct.pack("<IIQQIIIHH", 46, 1, 4242, 1, 0, 0, 0, 0, 0) + b"a/b\0\0\0"
    for fn in (codec.decode_request, _cy_codec.decode_request):
        with pytest.raises(FuseProtocolError) as info:
            fn([wire])
        assert (info.value.unique, info.value.errno) == (4242, errno.EINVAL)
    assert abi.FUSE_NAME_MAX == 1024  # names are not length-checked by the decoder (pure semantics)


def test_getdents_raw_twins_agree(tmp_path) -> None:
    """The compiled getdents_raw (no ctypes) against _hostfs's ctypes one:
    the same records from the start, from a cookie and from where the fd
    is (no seek), the same empty result at the end, the same errors; the
    padding after each name is zeros (no bytes of an earlier call)."""
    from virtiofs_async import _cy_responder
    from virtiofs_async.backends import _hostfs

    for i in range(300):
        (tmp_path / f"name-{i:04d}-{'y' * (i % 11)}").touch()
    twins = (_cy_responder.getdents_raw, _hostfs.getdents_raw_ctypes)
    fds = [os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY) for _ in twins]
    try:
        firsts = [g(fd, 0, 2048) for g, fd in zip(twins, fds)]
        assert len(firsts[0]) == len(firsts[1]) > 0
        assert _hostfs.parse_raw(firsts[0]) == _hostfs.parse_raw(firsts[1])
        assert _hostfs.parse_raw(firsts[0])[-1].off == codec.scan_raw_dirents(firsts[0], -1)[1]
        cookie = codec.scan_raw_dirents(firsts[0], -1)[1]
        middle = _hostfs.parse_raw(firsts[0])[len(_hostfs.parse_raw(firsts[0])) // 2][1]
        for offset in (None, middle, cookie):  # where the fd is; back to a cookie; on again
            got = [g(fd, offset, 4096) for g, fd in zip(twins, fds)]
            assert _hostfs.parse_raw(got[0]) == _hostfs.parse_raw(got[1])
        ends = [g(fd, 0x7FFFFFFFFFFFFFFF, 4096) for g, fd in zip(twins, fds)]
        assert ends == [b"", b""]
        # zero padding in the compiled one, also when its buffer is the
        # block an earlier call freed (records at other positions then)
        for offset in (0, middle, 0):
            raw = _cy_responder.getdents_raw(fds[0], offset, 32768)
            pos = 0
            while pos < len(raw):
                reclen = struct.unpack_from("<H", raw, pos + 16)[0]
                name_end = raw.index(b"\0", pos + 19)
                assert raw[name_end:pos + reclen] == bytes(pos + reclen - name_end)
                pos += reclen
        # errors: a bad fd, a file, a buffer too small for one record
        with open(tmp_path / "name-0000-", "rb") as f:
            for fd, err in ((-1, errno.EBADF), (f.fileno(), errno.ENOTDIR), (fds[0], errno.EINVAL)):
                bufsize = 8 if fd == fds[0] else 4096
                for g in twins:
                    with pytest.raises(OSError) as info:
                        g(fd, 0 if fd == fds[0] else None, bufsize)
                    assert info.value.errno == err
    finally:
        for fd in fds:
            os.close(fd)
