"""A pipelined load generator over :class:`~.frontend.VhostUserFsFrontend`.

:class:`FuseClient` encodes, submits and decodes one request per call: right
for tests, too slow to measure a fast daemon. :class:`LoadGenerator` instead

* encodes every request once, into guest memory, as descriptor chains built
  with :meth:`DriverQueue.add_chain` (reply areas reserved at the same time);
* keeps ``depth`` of them in flight: each *slot* cycles through its chains
  (one chain: the same request again and again; several: a sequence such as
  CREATE, RELEASE, UNLINK, FORGET), and a completed chain's successor is put
  back in the available ring at once;
* drains the used ring in bulk, publishes every re-submission of a drain with
  one index update and kicks at most once per drain (EVENT_IDX honoured),
  sleeping on the call eventfd only when nothing is used;
* changes nothing per request but the request's ``unique`` (so that each
  reply is matched to the request it answers) and what per-chain hooks patch
  (an offset, ids from a previous reply): no encoding and no allocations
  beyond Python ints in the loop.

Every reply is checked: the used head must name a chain in flight, the used
length must be the chain's expected reply length, the reply header must
carry that length, error 0 and the request's current ``unique``. Anything
else raises :class:`LoadGenError` (:class:`LoadReplyError`, a
:class:`~virtiofs_async.errors.FuseError`, for an error reply).

The loop is plain blocking code (``select.poll`` on the call eventfd and the
vhost-user socket) meant for a thread of its own: :meth:`LoadGenerator.run`
runs it through the runtime's ``run_in_thread`` (asyncio, uvloop, trio), so
the event loop stays free (an in-process daemon keeps running) and the loop
pays no event-loop overhead per wake-up. :meth:`LoadGenerator.run_blocking`
runs it in the calling thread. It reports its own CPU time (thread and
process) next to the counts, so a benchmark can show the frontend was not
the bottleneck.

While a generator exists, nothing else may submit on its queue: it drives
the ring directly, then hands the ring indices back to the
:class:`DriverQueue` (:meth:`DriverQueue.adopt_indices`) and frees its chains
on :meth:`LoadGenerator.close`.
"""
from __future__ import annotations

import functools
import os
import resource
import select
import threading
import time
from typing import Any, Callable, Sequence, Union

import attrs

from .. import codec
from ..abi import fuse as abi
from ..abi.virtio import VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_USED_F_NO_NOTIFY, avail_ring_size, used_ring_size
from ..errors import FuseError, VirtioFsError
from .client import FuseClient
from .driver_queue import DriverQueueFull
from .frontend import VhostUserFsFrontend

__all__ = [
    "Chain",
    "LoadGenError",
    "LoadGenerator",
    "LoadReplyError",
    "LoadStats",
    "OffsetWalker",
    "RequestTemplate",
    "create_cycle_slots",
    "getattr_slots",
    "lookup_slots",
    "read_slots",
    "write_slots",
]

Buffer = Union[bytes, bytearray, memoryview]
#: Called once per chain when the generator is built, with the chains of its
#: slot and its step; returns the zero-argument hook run after each reply of
#: that chain (before its successor is re-submitted), or None.
HookFactory = Callable[[Sequence["Chain"], int], Union[Callable[[], None], None]]

_OUT = codec.OUT_HEADER_SIZE
_PAGE = 4096
_UNIQUE_START = 1 << 40  # far from FuseClient's ids (which count up from 2)
_ENTRY_OUT = abi.fuse_entry_out.size


class LoadGenError(VirtioFsError):
    """The device returned something the generator did not ask for (unknown
    or idle head, wrong length or ``unique``), went away, or stalled."""


class LoadReplyError(FuseError, LoadGenError):
    """A request of the load got an error reply (``errno`` says which)."""


@attrs.define
class RequestTemplate:
    """One request, encoded once: ``parts`` are its readable buffers (as
    ``codec.Request.encode()`` lays them out), ``reply_lens`` the writable
    buffers (empty: no reply, like FORGET), ``expect_written`` the exact
    reply length the device must report. ``hook`` (see ``HookFactory``)
    patches this or other chains of the slot after each reply."""

    opcode: int
    parts: Sequence[Buffer]
    reply_lens: Sequence[int]
    expect_written: int
    hook: HookFactory | None = None

    @classmethod
    def of(cls, request: codec.Request, body_lens: Sequence[int] | None, hook: HookFactory | None = None) -> RequestTemplate:
        """``request`` with a reply of a 16-byte header buffer plus buffers of
        ``body_lens`` bytes (which the device must fill exactly); None: no
        reply at all."""
        if body_lens is None:
            return cls(int(request.OPCODE), request.encode(), [], 0, hook)
        return cls(int(request.OPCODE), request.encode(), [_OUT, *body_lens], _OUT + sum(body_lens), hook)


class Chain:
    """A request built in guest memory: ``readable`` / ``writable`` are
    views of its buffers (valid until the generator is closed); ``header``
    is the request's fuse_in_header as 64-bit words (1: unique, 2: nodeid)."""

    __slots__ = ("head", "slot", "step", "template", "readable", "writable", "header", "_views")

    def __init__(self, head: int, slot: int, step: int, template: RequestTemplate,
                 readable: list[memoryview], writable: list[memoryview]) -> None:
        self.head = head
        self.slot = slot
        self.step = step
        self.template = template
        self.readable = readable
        self.writable = writable
        self._views: list[memoryview] = []
        self.header = self.words(readable[0], 0, codec.IN_HEADER_SIZE)

    def words(self, buffer: memoryview, start: int, stop: int) -> memoryview:
        """``buffer[start:stop]`` (one of this chain's views) as 64-bit
        words, to read a reply field or patch a request field between
        submissions; released with the chain."""
        view = buffer[start:stop].cast("Q")
        self._views.append(view)
        return view

    def reply(self) -> bytes:
        """What the device wrote at this chain's last completion (its
        expected length, header included)."""
        out = bytearray()
        remaining = self.template.expect_written
        for view in self.writable:
            take = min(len(view), remaining)
            out += view[:take]
            remaining -= take
        return bytes(out)

    def release(self) -> None:
        for view in (*self._views, *self.readable, *self.writable):
            view.release()


@attrs.frozen
class LoadStats:
    """What one :meth:`LoadGenerator.run` measured, over its window (after
    the warm-up, until the deadline; the final drain is not counted)."""

    depth: int
    steps: int  # chains per slot cycle
    completed: int  # chains completed in the window
    seconds: float  # wall time of the window
    frontend_cpu: float  # CPU seconds of this whole process in the window
    loop_cpu: float  # CPU seconds of the generator's thread in the window
    wakeups: int  # sleeps on the call eventfd in the window
    kicks: int  # kicks sent in the window
    min_outstanding: int  # fewest chains published and not yet consumed, after a publish
    max_outstanding: int
    probe_start: Any = None  # what ``probe()`` returned at the window's start
    probe_end: Any = None

    @property
    def cycles(self) -> float:
        """Completed slot cycles (requests, for one-chain slots)."""
        return self.completed / self.steps

    @property
    def per_second(self) -> float:
        return self.cycles / self.seconds if self.seconds > 0 else 0.0

    @property
    def frontend_cpu_share(self) -> float:
        """Process CPU time / wall time (1.0 = one core busy all along)."""
        return self.frontend_cpu / self.seconds if self.seconds > 0 else 0.0


def _cpu_now() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class LoadGenerator:
    """``depth = len(slots)`` requests in flight on ``queue`` of ``frontend``.

    ``slots[i]`` is the cycle of requests slot ``i`` goes through. Building
    raises ValueError when the chains do not fit the queue (descriptors or
    data area). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, frontend: VhostUserFsFrontend, slots: Sequence[Sequence[RequestTemplate]], *, queue: int = 1) -> None:
        if not slots or any(not s for s in slots):
            raise ValueError("a load needs at least one slot, each with at least one request")
        steps = len(slots[0])
        if any(len(s) != steps for s in slots):
            raise ValueError("every slot must cycle through the same number of requests")
        if frontend.in_flight(queue):
            raise ValueError(f"queue {queue} has submissions in flight")
        self.frontend = frontend
        self.queue = queue
        self.depth = len(slots)
        self.steps = steps
        self.driver = drv = frontend.driver(queue)
        self._unique = _UNIQUE_START
        self._stop = threading.Event()
        self._closed = False
        #: Chains completed over every run, warm-up and final drain included
        #: (e.g. the lookups to FORGET after a LOOKUP load).
        self.completed_total = 0
        avail_idx, last_used = drv.avail_idx, drv.last_used
        self.slots: list[list[Chain]] = []
        try:
            for s, templates in enumerate(slots):
                chains = []
                for step, t in enumerate(templates):
                    head = drv.add_chain(list(t.parts), list(t.reply_lens), indirect=frontend.indirect)
                    chains.append(self._chain(head, s, step, t))
                self.slots.append(chains)
        except DriverQueueFull as exc:
            self._release_chains()
            raise ValueError(f"the load does not fit queue {queue}: {exc}") from exc
        finally:
            drv.adopt_indices(avail_idx, last_used)  # add_chain's pushes were never published
        size = drv.size
        self._next_head: list[int] = [0] * size
        self._header: list[Any] = [None] * size
        self._reply_header: list[Any] = [None] * size
        self._expect: list[int] = [-1] * size
        self._hook: list[Callable[[], None] | None] = [None] * size
        self._starts_cycle = bytearray(size)
        for chains in self.slots:
            for step, chain in enumerate(chains):
                h = chain.head
                self._starts_cycle[h] = step == 0
                self._next_head[h] = chains[(step + 1) % steps].head
                self._header[h] = chain.header
                self._expect[h] = chain.template.expect_written
                if chain.template.reply_lens:
                    self._reply_header[h] = chain.words(chain.writable[0], 0, _OUT)
                if chain.template.hook is not None:
                    self._hook[h] = chain.template.hook(chains, step)

    def _chain(self, head: int, slot: int, step: int, template: RequestTemplate) -> Chain:
        drv = self.driver
        readable, writable = drv.chain_buffers(head)
        base = drv.base_gpa
        views = [drv.mem[gpa - base:gpa - base + n] for gpa, n in readable]
        wviews = [drv.mem[gpa - base:gpa - base + n] for gpa, n in writable]
        return Chain(head, slot, step, template, views, wviews)

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free every chain (the queue is usable by others again). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._header.clear()
        self._reply_header.clear()
        self._hook.clear()
        self._release_chains()

    def _release_chains(self) -> None:
        for chains in self.slots:
            for chain in chains:
                chain.release()
                self.driver.release_chain(chain.head)
        self.slots = []

    def stop(self) -> None:
        """Ask a running :meth:`run_blocking` to end its window now (thread-safe)."""
        self._stop.set()

    async def run(self, duration: float, *, warmup: float = 0.0, probe: Callable[[], Any] | None = None,
                  stall_timeout: float = 10.0) -> LoadStats:
        """:meth:`run_blocking` in a worker thread of the frontend's runtime."""
        call = functools.partial(self.run_blocking, duration, warmup=warmup, probe=probe, stall_timeout=stall_timeout)
        try:
            return await self.frontend.runtime.run_in_thread(call)
        finally:
            self.stop()  # a cancelled waiter must not leave the thread running

    def run_blocking(self, duration: float, *, warmup: float = 0.0, probe: Callable[[], Any] | None = None,
                     stall_timeout: float = 10.0) -> LoadStats:
        """Keep every slot busy for ``warmup`` then ``duration`` seconds
        (or until :meth:`stop`), then let the last requests complete.
        ``probe()`` (e.g. reading the daemon's CPU time) runs at the start
        and at the end of the measured window; its results are in the
        stats. Raises LoadGenError / LoadReplyError (the ring indices are
        handed back to the queue in any case)."""
        if self._closed:
            raise LoadGenError("the load generator is closed")
        fe = self.frontend
        if fe.closed:
            raise LoadGenError("the frontend is closed")
        self._stop.clear()
        drv = self.driver
        size = drv.size
        mask = size - 1
        off = drv.avail_gpa - drv.base_gpa
        avail = drv.mem[off:off + avail_ring_size(size)].cast("H")
        off = drv.used_gpa - drv.base_gpa
        used_h = drv.mem[off:off + used_ring_size(size)].cast("H")
        used_i = drv.mem[off + 4:off + 4 + 8 * size].cast("I")
        try:
            return self._loop(avail, used_h, used_i, size, mask, duration, warmup, probe, stall_timeout)
        finally:
            avail.release()
            used_h.release()
            used_i.release()

    def _loop(self, avail: memoryview, used_h: memoryview, used_i: memoryview, size: int, mask: int,
              duration: float, warmup: float, probe: Callable[[], Any] | None, stall_timeout: float) -> LoadStats:
        drv = self.driver
        fe = self.frontend
        kick_fd = fe.kick_fd(self.queue)
        call_fd = fe.call_fd(self.queue)
        assert kick_fd is not None and call_fd is not None
        sock_fd = fe.sock.fileno()
        poller = select.poll()
        poller.register(call_fd, select.POLLIN)
        poller.register(sock_fd, select.POLLRDHUP)
        stall_ms = int(stall_timeout * 1000)
        event_idx = drv.event_idx
        used_event_at = 2 + size  # in 16-bit words of the available ring
        avail_event_at = 2 + 4 * size  # in 16-bit words of the used ring
        next_head = self._next_head
        header = self._header
        reply_header = self._reply_header
        expect = self._expect
        hooks = self._hook
        starts_cycle = self._starts_cycle
        busy = bytearray(size)
        fence_lock = threading.Lock()
        fence_acquire, fence_release = fence_lock.acquire, fence_lock.release
        eventfd_read, eventfd_write = os.eventfd_read, os.eventfd_write
        perf_counter = time.perf_counter
        stop_requested = self._stop.is_set

        avail_idx = drv.avail_idx
        last_used = drv.last_used
        unique = self._unique
        # Submit the first request of every slot.
        for chains in self.slots:
            h = chains[0].head
            header[h][1] = unique
            unique += 2
            busy[h] = 1
            avail[2 + (avail_idx & mask)] = h
            avail_idx = (avail_idx + 1) & 0xFFFF
        in_flight = self.depth
        avail[1] = avail_idx
        fence_acquire()
        fence_release()
        eventfd_write(kick_fd, 1)
        kick_old = avail_idx

        start = perf_counter()
        window_start = start + warmup
        deadline = window_start + duration
        measuring = warmup <= 0
        stopping = False
        completed = wakeups = kicks = 0
        total = self.completed_total
        min_out, max_out = size, 0
        probe_start = probe() if measuring and probe is not None else None
        cpu0, thread0 = _cpu_now(), time.thread_time()
        probe_end: Any = None
        failure: LoadGenError | None = None
        cpu1 = thread1 = end = 0.0
        try:
            while True:
                idx = used_h[1]
                if idx == last_used:
                    if in_flight == 0:
                        break
                    # Ask for a call at the next used entry, then look again
                    # (an entry used before the device saw the request gets none).
                    if event_idx:
                        avail[used_event_at] = last_used
                    else:
                        avail[0] = 0
                    fence_acquire()
                    fence_release()
                    if used_h[1] != last_used:
                        continue
                    events = poller.poll(stall_ms)
                    if not events:
                        raise LoadGenError(f"no request completed for {stall_timeout} s ({in_flight} in flight)")
                    for fd, _ev in events:
                        if fd == sock_fd:
                            raise LoadGenError("the vhost-user back-end closed the connection")
                    try:
                        eventfd_read(call_fd)
                    except BlockingIOError:
                        pass
                    if measuring:
                        wakeups += 1
                    continue
                if ((idx - last_used) & 0xFFFF) > size:
                    raise LoadGenError(f"device used index jumped from {last_used} to {idx}")
                batch = 0
                while last_used != idx:
                    j = (last_used & mask) << 1
                    head = used_i[j]
                    written = used_i[j + 1]
                    last_used = (last_used + 1) & 0xFFFF
                    if head >= size or not busy[head]:
                        raise LoadGenError(f"device returned head {head}, which is not in flight")
                    busy[head] = 0
                    batch += 1
                    rh = reply_header[head]
                    if written != expect[head] or rh is not None and (rh[0] != written or rh[1] != header[head][1]):
                        # Stop submitting, collect what is in flight, then raise.
                        failure = failure or self._reply_error(head, written)
                        stopping = True
                        in_flight -= 1
                        continue
                    hook = hooks[head]
                    if hook is not None:
                        hook()
                    nh = next_head[head]
                    if stopping and (failure is not None or starts_cycle[nh]):
                        in_flight -= 1  # the slot finished its cycle
                        continue
                    header[nh][1] = unique
                    unique += 2
                    busy[nh] = 1
                    avail[2 + (avail_idx & mask)] = nh
                    avail_idx = (avail_idx + 1) & 0xFFFF
                total += batch
                if measuring:
                    completed += batch
                avail[1] = avail_idx
                fence_acquire()
                fence_release()
                if event_idx:
                    event = used_h[avail_event_at]
                    kick = ((avail_idx - event - 1) & 0xFFFF) < ((avail_idx - kick_old) & 0xFFFF)
                else:
                    kick = not used_h[0] & VIRTQ_USED_F_NO_NOTIFY
                kick_old = avail_idx
                if kick:
                    eventfd_write(kick_fd, 1)
                if stopping:
                    continue
                now = perf_counter()
                if measuring:
                    kicks += kick
                    outstanding = (avail_idx - last_used) & 0xFFFF
                    if outstanding < min_out:
                        min_out = outstanding
                    if outstanding > max_out:
                        max_out = outstanding
                    if now >= deadline or stop_requested():
                        end = now
                        cpu1, thread1 = _cpu_now(), time.thread_time()
                        probe_end = probe() if probe is not None else None
                        stopping = True
                        measuring = False
                elif now >= window_start or stop_requested():
                    measuring = True
                    probe_start = probe() if probe is not None else None
                    cpu0, thread0 = _cpu_now(), time.thread_time()
                    window_start = perf_counter()
                    deadline = window_start + duration
        finally:
            self._unique = unique
            self.completed_total = total
            if event_idx:
                avail[used_event_at] = last_used
            else:
                avail[0] = 0
            drv.adopt_indices(avail_idx, last_used)
            poller.unregister(call_fd)
            poller.unregister(sock_fd)
        if failure is not None:
            raise failure
        return LoadStats(
            depth=self.depth, steps=self.steps, completed=completed, seconds=end - window_start,
            frontend_cpu=cpu1 - cpu0, loop_cpu=thread1 - thread0, wakeups=wakeups, kicks=kicks,
            min_outstanding=min_out if max_out else 0, max_outstanding=max_out,
            probe_start=probe_start, probe_end=probe_end,
        )

    def _reply_error(self, head: int, written: int) -> LoadGenError:
        """The error that describes the unexpected reply of ``head``."""
        chain = next(c for chains in self.slots for c in chains if c.head == head)
        name = _opcode_name(chain.template.opcode)
        expected = chain.template.expect_written
        rh = self._reply_header[head]
        if rh is not None and written >= _OUT:
            length, error = rh[0] & 0xFFFFFFFF, rh[0] >> 32
            if error:
                errno = (1 << 32) - error
                return LoadReplyError(errno, f"{name} (slot {chain.slot}): {os.strerror(errno)}")
            if rh[1] != chain.header[1]:
                return LoadGenError(f"reply to {name} unique={chain.header[1]} carries unique={rh[1]}")
            if length != written:
                return LoadGenError(f"{name}: reply header says {length} bytes, the used length is {written}")
        return LoadGenError(f"{name} (slot {chain.slot}): the device wrote {written} bytes, {expected} expected")


def _opcode_name(opcode: int) -> str:
    try:
        return f"FUSE_{codec.Opcode(opcode).name}"
    except ValueError:
        return f"opcode {opcode}"


# -- ready-made loads ----------------------------------------------------------------

_ATTR_OUT = 104


def _header(nodeid: int) -> codec.InHeader:
    return codec.InHeader(0, 0, 0, nodeid, 0, 0, 1)


def getattr_slots(nodeid: int, depth: int) -> list[list[RequestTemplate]]:
    """GETATTR of ``nodeid``, ``depth`` at a time."""
    return [[RequestTemplate.of(codec.GetattrRequest(_header(nodeid), 0, 0), [_ATTR_OUT])] for _ in range(depth)]


def lookup_slots(parent: int, name: bytes, depth: int) -> list[list[RequestTemplate]]:
    """LOOKUP of ``name`` in ``parent``, ``depth`` at a time. Each reply
    counts one lookup of the inode: FORGET them afterwards
    :attr:`LoadGenerator.completed_total` of them)."""
    return [[RequestTemplate.of(codec.LookupRequest(_header(parent), name), [_ENTRY_OUT])] for _ in range(depth)]


def _pages(length: int) -> list[int]:
    """Linux's page split of ``length`` bytes of data."""
    return [min(_PAGE, length - pos) for pos in range(0, length, _PAGE)]


class OffsetWalker:
    """Moves the offset field of a slot's READ or WRITE after each reply:
    slot ``i`` of ``depth`` visits blocks ``i, i + depth, ...`` of
    ``io_size`` bytes, modulo ``span`` (a multiple of ``io_size``).
    ``done_offset`` is the offset of the last completed request (-1: none)."""

    __slots__ = ("view", "offset", "done_offset", "stride", "span")

    def __init__(self, view: memoryview, first: int, stride: int, span: int) -> None:
        self.view = view
        self.offset = first
        self.done_offset = -1
        self.stride = stride
        self.span = span

    def advance(self) -> None:
        self.done_offset = offset = self.offset
        offset += self.stride
        if offset >= self.span:
            offset %= self.span
        self.offset = offset
        self.view[0] = offset


def _walkers(depth: int, io_size: int, span: int) -> tuple[list[OffsetWalker], HookFactory]:
    if span < io_size or span % io_size:
        raise ValueError("span must be a positive multiple of io_size")
    stride = depth * io_size % span or io_size
    walkers: list[OffsetWalker] = []

    def factory(chains: Sequence[Chain], step: int) -> Callable[[], None]:
        chain = chains[step]
        walker = OffsetWalker(chain.words(chain.readable[1], 8, 16), chain.slot * io_size % span, stride, span)
        walker.view[0] = walker.offset
        walkers.append(walker)
        return walker.advance

    return walkers, factory


def read_slots(nodeid: int, fh: int, io_size: int, depth: int, span: int) -> tuple[list[list[RequestTemplate]], list[OffsetWalker]]:
    """READs of ``io_size`` bytes of an open file, ``depth`` at a time,
    walking the first ``span`` bytes (which must exist: every read must be
    full). Returns the slots and their walkers (filled in when the
    generator is built, in slot order), to check what was read."""
    walkers, factory = _walkers(depth, io_size, span)
    slots = [
        [RequestTemplate.of(codec.ReadRequest(_header(nodeid), fh, 0, io_size, 0, 0, 0), _pages(io_size), factory)]
        for _ in range(depth)
    ]
    return slots, walkers


def write_slots(nodeid: int, fh: int, payload: Buffer, depth: int, span: int) -> tuple[list[list[RequestTemplate]], list[OffsetWalker]]:
    """WRITEs of ``payload`` (its size is the I/O size) to an open file,
    ``depth`` at a time, walking the first ``span`` bytes; as :func:`read_slots`."""
    data = memoryview(payload).cast("B")
    io_size = len(data)
    walkers, factory = _walkers(depth, io_size, span)
    pages = [data[pos:pos + n] for pos, n in zip(range(0, io_size, _PAGE), _pages(io_size))]
    slots = [
        [RequestTemplate.of(codec.WriteRequest(_header(nodeid), fh, 0, io_size, 0, 0, 0, pages), [8], factory)]
        for _ in range(depth)
    ]
    return slots, walkers


def create_cycle_slots(client: FuseClient, parent: int, depth: int, prefix: bytes = b"lg") -> list[list[RequestTemplate]]:
    """Per slot: CREATE ``<prefix>-<slot>`` in ``parent``, RELEASE it, UNLINK
    it, FORGET its inode (on the request queue; no reply), as a guest that
    creates and deletes a file does. One cycle = one file. The new nodeid
    and fh are copied from the CREATE reply into the next requests."""
    ext = client._create_ext()
    flags = os.O_RDWR | os.O_CREAT

    def copy_ids(chains: Sequence[Chain], step: int) -> Callable[[], None]:
        created, release, _unlink, forget = chains
        body = created.words(created.writable[1], 0, _ENTRY_OUT + 8)
        release_fh = release.words(release.readable[1], 0, 8)
        release_header, forget_header = release.header, forget.header
        fh_at = _ENTRY_OUT // 8

        def hook() -> None:
            nodeid = body[0]
            release_header[2] = nodeid
            forget_header[2] = nodeid
            release_fh[0] = body[fh_at]

        return hook

    slots = []
    for i in range(depth):
        name = b"%s-%d" % (prefix, i)
        slots.append([
            RequestTemplate.of(
                codec.CreateRequest(_header(parent), flags, 0o100644, 0, 0, name, ext=ext), [_ENTRY_OUT + 16], copy_ids
            ),
            RequestTemplate.of(codec.ReleaseRequest(_header(0), 0, os.O_RDWR, 0, 0), []),
            RequestTemplate.of(codec.UnlinkRequest(_header(parent), name), []),
            RequestTemplate.of(codec.ForgetRequest(_header(0), 1), None),
        ])
    return slots
