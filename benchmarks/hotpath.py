"""Microbenchmark of the hot path, pure Python vs the Cython twins (not a test).

Per operation, best of several rounds:

* ``pop+add_used``: pop one chain of 4 descriptors (2 device-readable: 40 + 16
  bytes, 2 device-writable: 16 + 104 bytes, i.e. a GETATTR) and return it;
  the driver side only moves the available index, so it costs nothing.
* ``pop_many+add_used``: the same, popping 64 chains per call.
* ``decode GETATTR`` / ``decode READ``: decode_request on the two readable
  views of such a chain (header, then the argument).
* ``decode WRITE 4 KiB``: header, write_in, one 4 KiB payload view.
* ``encode_out_header``, ``pack_dirent``, ``scatter`` (header + 104-byte body
  into two views).
* ``pack_attr_out`` / ``pack_entry_out``: GETATTR / LOOKUP reply bodies from
  an ``EntryAttributes``; ``write_reply``: header + that body into two views;
  ``RequestContext``: the session's per-request context (``record_factory``).
* ``session GETATTR`` / ``session LOOKUP``: ``FuseSession.handle_request``
  whole (decode, dispatch, backend call, reply into guest buffers) over a
  backend that answers at once, driven without an event loop; each twin in
  a fresh interpreter (``_accel`` picks one per process).

Run: PYTHONPATH=src python benchmarks/hotpath.py  (after build_ext --inplace).
"""
from __future__ import annotations

import mmap
import os
import struct
import subprocess
import sys
import timeit

from virtiofs_async import buffers, codec, vring
from virtiofs_async.memory import GuestMemory
from virtiofs_async.operations import EntryAttributes, RequestContext

try:
    from virtiofs_async import _cy_codec, _cy_vring
except ImportError:
    sys.exit("build the extensions first: python setup.py build_ext --inplace")

BASE = 0x1_0000_0000
QSIZE = 1024
CHAINS = 256  # 4 descriptors each: the whole descriptor table


def make_ring(mm: mmap.mmap) -> tuple[int, int, int]:
    """Lay out a ring whose slot i always names chain i % CHAINS."""
    desc, avail, used = 0, 16 * QSIZE, 16 * QSIZE + 4096
    data = 0x10_0000
    for c in range(CHAINS):
        base = data + c * 256
        parts = [(base, 40, 1), (base + 64, 16, 1), (base + 128, 16, 3), (base + 144, 104, 2)]
        for k, (addr, length, flags) in enumerate(parts):
            i = 4 * c + k
            struct.pack_into("<QIHH", mm, desc + 16 * i, BASE + addr, length, flags, (i + 1) if flags & 1 else 0)
    for slot in range(QSIZE):
        struct.pack_into("<H", mm, avail + 4 + 2 * slot, 4 * (slot % CHAINS))
    return BASE + desc, BASE + avail, BASE + used


def bench_queue(mod, label: str, batch: bool) -> float:
    fd = os.memfd_create("bench")
    os.ftruncate(fd, 4 << 20)
    mm = mmap.mmap(fd, 4 << 20)
    memory = GuestMemory()
    memory.add_region(os.dup(fd), BASE, 4 << 20, 0x7F00_0000_0000, 0)
    desc, avail, used = make_ring(mm)
    vq = mod.VirtQueue(QSIZE)
    vq.set_size(QSIZE)
    vq.set_addresses(memory, desc, avail, used)
    state = {"idx": 0}

    def round_() -> None:
        state["idx"] = (state["idx"] + CHAINS) & 0xFFFF
        struct.pack_into("<H", mm, avail - BASE + 2, state["idx"])
        if batch:
            for _ in range(CHAINS // 64):
                for chain in vq.pop_many(memory, 64):
                    vq.add_used(memory, chain.head, 120)
        else:
            pop, add_used = vq.pop, vq.add_used
            for _ in range(CHAINS):
                chain = pop(memory)
                add_used(memory, chain.head, 120)

    best = min(timeit.repeat(round_, number=20, repeat=7)) / (20 * CHAINS)
    memory.close()
    mm.close()
    os.close(fd)
    return best


def bench_call(fn, *args, number: int = 20000, **kw) -> float:
    return min(timeit.repeat(lambda: fn(*args, **kw), number=number, repeat=7)) / number


ATTRIBUTES = EntryAttributes(
    st_ino=2, st_mode=0o100644, st_size=4096, st_blocks=8, st_atime_ns=1_700_000_000_123_456_789,
    st_mtime_ns=1_700_000_000_123_456_789, st_ctime_ns=1_700_000_000_123_456_789,
)

#: Run in a child interpreter per twin: the per-request cost of the session.
SESSION_BENCH = """
import sys, timeit
from virtiofs_async import codec
from virtiofs_async.abi import fuse as abi
from virtiofs_async.operations import Operations
from virtiofs_async.session import FuseSession
sys.path.insert(0, sys.argv[1])
from hotpath import ATTRIBUTES

class Ops(Operations):
    async def getattr(self, inode, ctx, fh=None):
        return ATTRIBUTES
    async def lookup(self, parent, name, ctx):
        return ATTRIBUTES

def drive(coro):
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise RuntimeError("the backend suspended")

def views(request):
    return [memoryview(bytearray(b)) for b in request.encode()]

session = FuseSession(Ops())
hdr = lambda unique: codec.InHeader(0, 0, unique, 2, 1000, 1000, 42)
drive(session.handle_request(
    views(codec.InitRequest(hdr(1), 7, 38, 131072, abi.FUSE_INIT_EXT | abi.FUSE_MAX_PAGES)), [memoryview(bytearray(4096))]
))
for name, request, room in (
    ("GETATTR", codec.GetattrRequest(hdr(7), 0, 0), 104), ("LOOKUP", codec.LookupRequest(hdr(8), b"file.dat"), 128)
):
    readable, writable = views(request), [memoryview(bytearray(16)), memoryview(bytearray(room))]
    assert drive(session.handle_request(readable, writable)) == 16 + room
    run = lambda: drive(session.handle_request(readable, writable))
    print(name, min(timeit.repeat(run, number=5000, repeat=7)) / 5000)
"""


def bench_session(implementation: str) -> dict[str, float]:
    """{opcode name: seconds per handle_request} with one twin."""
    env = {**os.environ, "VIRTIOFS_ASYNC_IMPLEMENTATION": implementation}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", SESSION_BENCH, here], env=env, check=True, capture_output=True, text=True
    ).stdout
    return {name: float(value) for name, value in (line.split() for line in out.splitlines())}


def main() -> None:
    hdr = codec.InHeader(0, 0, 7, 2, 1000, 1000, 42)
    getattr_bufs = codec.GetattrRequest(hdr, 0, 0).encode()
    read_bufs = codec.ReadRequest(hdr, 5, 4096, 4096, 0, 0, 0).encode()
    write_bufs = codec.WriteRequest(hdr, 5, 0, 4096, 0, 0, 0, [memoryview(bytes(4096))]).encode()
    as_views = lambda bufs: [memoryview(bytearray(b)) for b in bufs]  # noqa: E731
    getattr_views, read_views, write_views = as_views(getattr_bufs), as_views(read_bufs), as_views(write_bufs)
    entry = codec.EntryOut(2, 0, 1, 1, 0, 0, codec.Attr(2, 10, 1, 1, 1, 1, 0, 0, 0, 0o100644, 1, 0, 0, 0, 4096))
    dest = [memoryview(bytearray(16)), memoryview(bytearray(104))]
    body = bytes(104)

    rows = [
        ("pop+add_used (per chain)", lambda m: bench_queue(m, "pop", False), vring, _cy_vring),
        ("pop_many(64)+add_used (per chain)", lambda m: bench_queue(m, "pop_many", True), vring, _cy_vring),
        ("decode_request GETATTR (2 views)", lambda m: bench_call(m.decode_request, getattr_views), codec, _cy_codec),
        ("decode_request READ (2 views)", lambda m: bench_call(m.decode_request, read_views), codec, _cy_codec),
        ("decode_request READ (1 bytes)", lambda m: bench_call(m.decode_request, [b"".join(read_bufs)]), codec, _cy_codec),
        ("decode_request WRITE 4 KiB (3 views)", lambda m: bench_call(m.decode_request, write_views), codec, _cy_codec),
        ("encode_out_header", lambda m: bench_call(m.encode_out_header, 7, 0, 104), codec, _cy_codec),
        ("pack_dirent", lambda m: bench_call(m.pack_dirent, 2, 1, 8, b"file.txt"), codec, _cy_codec),
        ("pack_direntplus", lambda m: bench_call(m.pack_direntplus, entry, 2, 1, 8, b"file.txt"), codec, _cy_codec),
        ("scatter header+body", lambda m: bench_call(m.scatter, dest, (b"h" * 16, body)), buffers, _cy_vring),
        ("pack_attr_out", lambda m: bench_call(m.pack_attr_out, ATTRIBUTES), codec, _cy_codec),
        ("pack_entry_out", lambda m: bench_call(m.pack_entry_out, ATTRIBUTES), codec, _cy_codec),
        ("write_reply header+body", lambda m: bench_call(m.write_reply, dest, 7, 0, body), codec, _cy_codec),
        (
            "RequestContext (record_factory)",
            lambda m: bench_call(m.record_factory(RequestContext), 1000, 1000, 42, 0, None),
            codec,
            _cy_codec,
        ),
    ]
    print(f"{'operation':40} {'python':>10} {'cython':>10} {'speedup':>8}")
    for name, run, pure, compiled in rows:
        p, c = run(pure), run(compiled)
        print(f"{name:40} {p * 1e9:8.0f}ns {c * 1e9:8.0f}ns {p / c:7.1f}x")
    pure, compiled = bench_session("python"), bench_session("cython")
    for name in pure:
        p, c = pure[name], compiled[name]
        print(f"{'session ' + name + ' (handle_request)':40} {p * 1e9:8.0f}ns {c * 1e9:8.0f}ns {p / c:7.1f}x")


if __name__ == "__main__":
    main()
