# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of :mod:`virtiofs_async.vring` and :func:`virtiofs_async.buffers.scatter`.

Built as ``virtiofs_async._cy_vring``; :mod:`virtiofs_async._accel` chooses
between it and the pure-Python modules. The API, the results and the errors
(messages included) are those of the pure twins, whose docstrings are the
contract; ``tests/unit/test_twins.py`` compares the two on random input.

What differs is how the work is done:

* Guest memory is still the pure :class:`~virtiofs_async.memory.GuestMemory`,
  passed to every data-path call. For each ``memory.generation`` the queue
  takes one writable buffer per region (``memory.view`` of the whole region)
  and keeps it until the generation changes, so the raw pointers it reads
  rings and descriptors through cannot dangle. Descriptor chains are walked
  in C; the views handed out are slices of those region views, as in the pure
  twin (same ``obj``, same bytes, writable).
* Every descriptor is read once into locals (the guest may rewrite it).
* Fences: ``avail->idx`` is read before the ring entries and descriptors it
  publishes (acquire), reply data and used elements are written before
  ``used->idx`` (release), and a full fence separates publishing ``used->idx``
  / ``avail_event`` / notification flags from reading the driver's
  ``used_event`` / flags / ``avail->idx`` (the store -> load case that even
  x86 reorders).
"""
from cpython.buffer cimport (
    PyBUF_RECORDS_RO,
    PyBUF_SIMPLE,
    PyBUF_WRITABLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.list cimport PyList_GET_SIZE
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_Check
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.slice cimport PySlice_New
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.string cimport memcpy, memmove, strcmp

from vfa_hotpath cimport (
    VFA_BATCH_BYTES,
    VFA_DEFERRED,
    VFA_FLUSH_FIRST,
    VFA_RESPONDER_CAPSULE,
    VFA_RESPONDER_IOV_MAX,
    VFA_RESPONDER_REPLY_MAX,
    VFA_RESPONDER_REQUEST_MAX,
    vfa_ld16,
    vfa_ld32,
    vfa_ld64,
    vfa_mb,
    vfa_respond_fn,
    vfa_ring_ld16,
    vfa_ring_st16,
    vfa_rmb,
    vfa_scatter,
    vfa_st32,
    vfa_wmb,
    vfa_batch,
    vfa_job,
)
from posix.uio cimport iovec

cdef extern from "vfa_copy_pool.h" nogil:
    void vfa_batch_run(vfa_batch *b)

cdef extern from "<unistd.h>" nogil:
    ssize_t write(int fd, const void *buf, size_t count)
    ssize_t read(int fd, void *buf, size_t count)

from libc.errno cimport EAGAIN, EINTR, errno

import logging
import operator
import os
import struct

from virtiofs_async.abi.virtio import (
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT as _PY_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT as _PY_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT as _PY_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE as _PY_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY as _PY_USED_F_NO_NOTIFY,
    AVAIL_ALIGN,
    DESC_ALIGN,
    USED_ALIGN,
    avail_event_offset,
    avail_ring_size,
    desc_table_size,
    is_valid_queue_size,
    used_event_offset,
    used_ring_size,
)
from virtiofs_async.errors import VringError
from virtiofs_async.vring import INDIRECT_CHAIN_LIMIT as _PY_INDIRECT_CHAIN_LIMIT

__all__ = ["DescriptorChain", "KickServer", "VirtQueue", "scatter"]

cdef object _log = logging.getLogger("virtiofs_async.vring")

cdef uint16_t F_NEXT = _PY_DESC_F_NEXT
cdef uint16_t F_WRITE = _PY_DESC_F_WRITE
cdef uint16_t F_INDIRECT = _PY_DESC_F_INDIRECT
cdef uint16_t AVAIL_F_NO_INTERRUPT = _PY_AVAIL_F_NO_INTERRUPT
cdef uint16_t USED_F_NO_NOTIFY = _PY_USED_F_NO_NOTIFY
cdef uint32_t INDIRECT_CHAIN_LIMIT = _PY_INDIRECT_CHAIN_LIMIT
cdef uint64_t MAX_CHAIN_BYTES = (<uint64_t>1) << 32

_check_used_elem = USED_ELEM.pack_into  # argument checks of the pure add_used, for non-int arguments


cdef inline object _error(str message, object head):
    err = VringError(message)
    err.head = head
    return err


cdef inline object _not_mapped(uint64_t gpa, uint64_t length, object head):
    return _error(f"guest range {gpa:#x}+{length:#x} is not in mapped memory", head)


cdef inline uint16_t _load_desc(const unsigned char *table, uint32_t idx, uint64_t *addr,
                                uint32_t *length, uint16_t *flags) noexcept:
    """Descriptor ``idx`` of ``table`` (guest little-endian): fields out, its next index returned."""
    cdef const unsigned char *d = table + (<size_t>idx << 4)
    addr[0] = vfa_ld64(d)
    length[0] = vfa_ld32(d + 8)
    flags[0] = vfa_ld16(d + 12)
    return vfa_ld16(d + 14)


cdef enum:  # why an indirect descriptor cannot be followed (_read_chain words each)
    _IND_OK = 0
    _IND_NESTED
    _IND_NOT_NEGOTIATED
    _IND_WITH_NEXT
    _IND_BAD_LENGTH


cdef inline int _indirect_refusal(bint in_indirect, bint negotiated, uint16_t flags, uint32_t length) noexcept:
    if in_indirect:
        return _IND_NESTED
    if not negotiated:
        return _IND_NOT_NEGOTIATED
    if flags & F_NEXT:
        return _IND_WITH_NEXT
    if length == 0 or length & 15:
        return _IND_BAD_LENGTH
    return _IND_OK


cdef inline uint32_t _indirect_walk_limit(uint32_t size, uint32_t table_len) noexcept:
    """Descriptors an indirect table may contribute before the chain counts as looping."""
    cdef uint32_t limit = size if size > INDIRECT_CHAIN_LIMIT else INDIRECT_CHAIN_LIMIT
    return table_len if table_len < limit else limit


# ---------------------------------------------------------------------------
# DescriptorChain
# ---------------------------------------------------------------------------


cdef class DescriptorChain:
    """One popped buffer: device-readable views, then device-writable views.

    ``head`` is the index to hand back to :meth:`VirtQueue.add_used`. A
    descriptor that crosses adjacent memory regions yields one view per
    region, and a zero-length descriptor yields none, so the lists are not
    one-to-one with descriptors. The device must not write the readable views.
    """

    cdef public object head
    cdef public object readable
    cdef public object writable

    __match_args__ = ("head", "readable", "writable")

    def __init__(self, head, readable, writable):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def readable_len(self):
        """Total bytes the device may read."""
        return sum(map(len, self.readable))

    @property
    def writable_len(self):
        """Total bytes the device may write."""
        return sum(map(len, self.writable))

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        cdef DescriptorChain o = <DescriptorChain>other
        return (self.head, self.readable, self.writable) == (o.head, o.readable, o.writable)

    def __ne__(self, other):
        result = self.__eq__(other)
        if result is NotImplemented:
            return result
        return not result

    __hash__ = None

    def __repr__(self):
        return f"DescriptorChain(head={self.head!r}, readable={self.readable!r}, writable={self.writable!r})"


# ---------------------------------------------------------------------------
# VirtQueue
# ---------------------------------------------------------------------------

ctypedef struct Region:
    uint64_t gpa
    uint64_t size          # > 0
    unsigned char *base    # buf.buf
    Py_buffer buf          # writable export of memory.view(gpa, size); buf.obj is that view


cdef enum:
    _FLUSH_AND_RETRY = -3  # _serve_inline: run the batch, then offer the chain again


cdef class VirtQueue:
    """Device side of one split virtqueue.

    ``max_size`` is the largest size the device accepts (a power of two up
    to 32768). A fresh queue has no size and no addresses; ``pop`` returns
    None until both are set.
    """

    cdef public object max_size
    cdef uint32_t _size
    cdef uint32_t _mask
    cdef uint32_t _used_event_off
    cdef uint32_t _avail_event_off
    # ring addresses as given (None while unset) and as numbers
    cdef object _desc_gpa
    cdef object _avail_gpa
    cdef object _used_gpa
    cdef uint64_t _desc_addr
    cdef uint64_t _avail_addr
    cdef uint64_t _used_addr
    cdef bint _event_idx
    cdef bint _indirect
    cdef uint16_t _next_avail
    cdef uint16_t _shadow_avail
    cdef uint16_t _next_used
    cdef uint16_t _signalled_used
    cdef bint _signalled_valid
    cdef bint _notify_enabled
    cdef bint _broken
    cdef object _pending_error
    # cached translation for memory.generation == _gen (0: nothing cached)
    cdef object _gen
    # within one serve_kick: the memory object already checked (the
    # frontend's messages, which change the table, are not handled
    # until the call returns), else None
    cdef object _checked
    cdef Region *_regions
    cdef Py_ssize_t _nregions
    cdef unsigned char *_desc
    cdef unsigned char *_avail
    cdef unsigned char *_used
    # deferred READ copies of the current pop_serving (allocated on first use)
    cdef vfa_batch *_batch
    # the responder whose C function (or NULL: none) _fn holds
    cdef object _fn_owner
    cdef vfa_respond_fn _fn

    def __cinit__(self, *args, **kwargs):
        self._batch = NULL
        self._regions = NULL
        self._nregions = 0
        self._desc = self._avail = self._used = NULL
        self._gen = 0

    def __dealloc__(self):
        self._free_regions()
        PyMem_Free(self._batch)

    def __init__(self, max_size=1024):
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

    cdef void _reset_state(self):
        self._desc_gpa = self._avail_gpa = self._used_gpa = None
        self._next_avail = 0
        self._shadow_avail = 0
        self._next_used = 0
        self._signalled_used = 0
        self._signalled_valid = False
        self._notify_enabled = True
        self._broken = False
        self._pending_error = None
        self._fn_owner = None
        self._fn = NULL
        self._drop_views()

    cdef void _drop_views(self):
        """Forget the cached translation (invariant: ``_gen`` is 0 unless the
        region table and the ring addresses are valid)."""
        self._gen = 0  # generations start at 1: 0 never matches
        self._free_regions()

    cdef void _free_regions(self) noexcept:
        cdef Py_ssize_t i
        cdef Region *regions = self._regions
        cdef Py_ssize_t n = self._nregions
        self._regions = NULL
        self._nregions = 0
        self._desc = self._avail = self._used = NULL
        if regions != NULL:
            for i in range(n):
                PyBuffer_Release(&regions[i].buf)
            PyMem_Free(regions)

    # -- translation ----------------------------------------------------------

    cdef int _map(self, memory, uint64_t desc, uint64_t avail, uint64_t used) except -1:
        """Cache a writable buffer of every region of ``memory`` and the ring
        addresses (which ``memory.view`` has accepted), for the current
        generation. Nothing changes if a buffer cannot be taken."""
        regions = memory.regions
        cdef Py_ssize_t n = len(regions)
        cdef Py_ssize_t i, done = 0
        cdef uint32_t size = self._size
        cdef Region *table = <Region *>PyMem_Malloc(max(n, 1) * sizeof(Region))
        if table == NULL:
            raise MemoryError()
        try:
            for i in range(n):
                r = regions[i]
                gpa = r.guest_phys_addr
                length = r.size
                PyObject_GetBuffer(memory.view(gpa, length), &table[i].buf, PyBUF_WRITABLE)
                done += 1
                if table[i].buf.len != length:
                    raise VringError(f"memory region at {gpa:#x}: view of {table[i].buf.len} bytes, not {length}")
                table[i].gpa = gpa
                table[i].size = length
                table[i].base = <unsigned char *>table[i].buf.buf
        except BaseException:
            for i in range(done):
                PyBuffer_Release(&table[i].buf)
            PyMem_Free(table)
            raise
        self._drop_views()
        self._regions = table
        self._nregions = n
        self._desc = self._ptr(desc, 16 * size)
        self._avail = self._ptr(avail, 6 + 2 * size)
        self._used = self._ptr(used, 6 + 8 * size)
        if self._desc == NULL or self._avail == NULL or self._used == NULL:  # GuestMemory disagreeing with itself
            self._drop_views()
            raise VringError("virtqueue rings are not in mapped memory")
        self._gen = memory.generation
        return 0

    cdef inline Py_ssize_t _find(self, uint64_t gpa) noexcept:
        """Index of the last region starting at or below ``gpa``, or -1."""
        cdef Py_ssize_t lo = 0, hi = self._nregions, mid
        while lo < hi:
            mid = (lo + hi) >> 1
            if self._regions[mid].gpa <= gpa:
                lo = mid + 1
            else:
                hi = mid
        return lo - 1

    cdef unsigned char *_ptr(self, uint64_t gpa, uint64_t length) noexcept:
        """Host address of ``[gpa, gpa + length)`` (length > 0) if it lies in one
        region, else NULL (GuestMemory.view's rule)."""
        cdef Py_ssize_t i = self._find(gpa)
        cdef uint64_t off
        if i >= 0:
            off = gpa - self._regions[i].gpa
            if off <= self._regions[i].size and length <= self._regions[i].size - off:
                return self._regions[i].base + off
        return NULL

    cdef int _append_views(self, list out, uint64_t gpa, uint64_t length, object head) except -1:
        """GuestMemory.append_views: one slice per region crossed, none for
        length 0; raises the not-mapped VringError (with ``head``)."""
        cdef Py_ssize_t i
        cdef uint64_t off, size
        if length == 0:
            return 0
        i = self._find(gpa)
        if i >= 0:
            off = gpa - self._regions[i].gpa
            size = self._regions[i].size
            if off < size:
                if length <= size - off:
                    out.append(_slice(&self._regions[i], off, length))
                    return 0
                return self._append_spanning(out, i, off, gpa, length, head)
        raise _not_mapped(gpa, length, head)

    cdef int _append_spanning(self, list out, Py_ssize_t i, uint64_t off, uint64_t gpa, uint64_t length,
                              object head) except -1:
        cdef list pieces = []
        cdef uint64_t remaining = length, take, end
        cdef Region *r
        while True:
            r = &self._regions[i]
            take = r.size - off
            if take > remaining:
                take = remaining
            pieces.append(_slice(r, off, take))
            remaining -= take
            if remaining == 0:
                out.extend(pieces)
                return 0
            end = r.gpa + r.size
            i += 1
            if i == self._nregions or self._regions[i].gpa != end:
                raise _not_mapped(gpa, length, head)
            off = 0

    cdef int _check_memory(self, memory) except -1:
        if memory is self._checked:
            return 0
        gen = memory.generation
        if gen is not self._gen and gen != self._gen:
            self._refresh(memory)
        return 0

    cdef int _refresh(self, memory) except -1:
        cdef uint32_t size = self._size
        try:
            memory.view(self._desc_gpa, desc_table_size(size))
            memory.view(self._avail_gpa, avail_ring_size(size))
            memory.view(self._used_gpa, used_ring_size(size))
        except VringError as exc:
            self._drop_views()
            raise _error(f"virtqueue rings are no longer in mapped memory: {exc}", None) from exc
        self._map(memory, self._desc_addr, self._avail_addr, self._used_addr)
        return 0

    # -- configuration -------------------------------------------------------

    def reset(self):
        """Forget size, addresses, indices, notification state and the broken
        flag. The ring features (``event_idx``, ``indirect``) are kept: they are
        negotiated for the whole device."""
        self._size = 0
        self._mask = 0
        self._reset_state()

    @property
    def size(self):
        """Number of entries, 0 while unset."""
        return self._size

    def set_size(self, size):
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

    def set_addresses(self, memory, desc_gpa, avail_gpa, used_gpa):
        """SET_VRING_ADDR (guest physical addresses; translate user addresses
        with ``GuestMemory.uva_to_gpa`` first).

        Checks alignment (16/2/4) and that each whole table, for the current
        size and including the event-index fields, lies inside one mapped
        region; VringError otherwise (the previous addresses are then kept).
        Reads the device's used index from the used ring, as the driver or a
        previous backend left it.
        """
        cdef uint32_t size = self._size
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
            memory.view(desc_gpa, desc_table_size(size))
            memory.view(avail_gpa, avail_ring_size(size))
            memory.view(used_gpa, used_ring_size(size))
        except VringError as exc:
            raise VringError(f"virtqueue rings are not in mapped memory: {exc}") from exc
        # Mapped, so each address is in 0..2**64-1.
        self._map(memory, desc_gpa, avail_gpa, used_gpa)
        self._desc_gpa, self._avail_gpa, self._used_gpa = desc_gpa, avail_gpa, used_gpa
        self._desc_addr, self._avail_addr, self._used_addr = desc_gpa, avail_gpa, used_gpa
        self._next_used = vfa_ring_ld16(self._used + 2)
        self._signalled_used = self._next_used
        self._signalled_valid = False
        self._shadow_avail = self._next_avail

    @property
    def is_configured(self):
        """True once size and ring addresses are set."""
        return self._desc_gpa is not None

    @property
    def desc_gpa(self):
        return self._desc_gpa

    @property
    def avail_gpa(self):
        return self._avail_gpa

    @property
    def used_gpa(self):
        return self._used_gpa

    @property
    def next_avail(self):
        """Index of the next available-ring entry to consume (SET/GET_VRING_BASE)."""
        return self._next_avail

    @next_avail.setter
    def next_avail(self, value):
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise VringError(f"invalid available index {value!r}")
        self._next_avail = value
        self._shadow_avail = value

    @property
    def next_used(self):
        """Used index the device publishes next (read from the ring by
        ``set_addresses``; settable for state restore)."""
        return self._next_used

    @next_used.setter
    def next_used(self, value):
        if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise VringError(f"invalid used index {value!r}")
        self._next_used = value
        self._signalled_used = value
        self._signalled_valid = False

    @property
    def event_idx(self):
        """VIRTIO_RING_F_EVENT_IDX negotiated."""
        return self._event_idx

    @event_idx.setter
    def event_idx(self, value):
        self._event_idx = bool(value)
        self._signalled_valid = False

    @property
    def indirect(self):
        """VIRTIO_RING_F_INDIRECT_DESC negotiated."""
        return self._indirect

    @indirect.setter
    def indirect(self, value):
        self._indirect = bool(value)

    @property
    def broken(self):
        """The driver corrupted the available index; nothing more is popped
        until :meth:`reset`."""
        return self._broken

    # -- data path -------------------------------------------------------------

    cdef int _read_avail_idx(self) except -1:
        cdef uint16_t idx = vfa_ring_ld16(self._avail + 2)
        if <uint16_t>(idx - self._next_avail) > self._size:
            self._broken = True
            raise _error(
                f"available index jumped from {self._next_avail} to {idx} (queue size {self._size})", None
            )
        return idx

    def pop(self, memory):
        """Take the next available chain, or None if there is none (or the
        queue is unconfigured or broken).

        With EVENT_IDX and notifications enabled, finding the ring empty
        also publishes ``avail_event`` (re-arming kicks) and re-checks, so a
        caller that pops until None never misses a buffer. Raises VringError
        for a malformed chain (``head`` set, already consumed) or a corrupt
        available index (``head`` None, queue now broken).
        """
        return self._pop(memory)

    cdef object _pop(self, memory):
        cdef int head = self._next_head(memory)
        if head < 0:
            return None
        return self._read_chain(<uint16_t>head)

    cdef int _next_head(self, memory) except -2:
        """Consume the next available ring entry: its head index, or -1 when
        there is none (or the queue is unconfigured or broken); raises a
        pending or index error as :meth:`pop` does."""
        cdef uint16_t nxt, idx, head
        if self._pending_error is not None:
            err = self._pending_error
            self._pending_error = None
            raise err
        if self._broken or self._desc_gpa is None:
            return -1
        self._check_memory(memory)
        nxt = self._next_avail
        if nxt == self._shadow_avail:
            idx = <uint16_t>self._read_avail_idx()
            if idx == nxt:
                if not (self._event_idx and self._notify_enabled):
                    return -1
                vfa_ring_st16(self._used + self._avail_event_off, nxt)
                vfa_mb()  # publish avail_event before looking at avail->idx again
                idx = <uint16_t>self._read_avail_idx()
                if idx == nxt:
                    return -1
            vfa_rmb()  # entries and descriptors up to idx are the driver's latest
            self._shadow_avail = idx
        head = vfa_ring_ld16(self._avail + 4 + 2 * (nxt & self._mask))
        self._next_avail = nxt + 1
        return head

    cdef object _read_chain(self, uint16_t head_idx):
        cdef uint32_t size = self._size
        if head_idx >= size:
            raise _error(f"available ring entry {head_idx} is out of range (queue size {size})", None)
        cdef object head = head_idx
        cdef list readable = []
        cdef list writable = []
        cdef const unsigned char *table = self._desc
        cdef uint32_t limit = size  # descriptors that may still be walked in this table
        cdef uint32_t table_len = size
        cdef uint32_t idx = head_idx
        cdef uint64_t total = 0
        cdef uint64_t addr
        cdef uint32_t length
        cdef uint16_t flags, nxt
        cdef bint in_indirect = False
        cdef int refusal
        cdef bint seen_write = False
        cdef DescriptorChain chain
        while True:
            if idx >= table_len:
                raise _error(f"descriptor index {idx} out of range ({table_len} in table)", head)
            if limit == 0:
                raise _error("descriptor chain loops or is too long", head)
            limit -= 1
            nxt = _load_desc(table, idx, &addr, &length, &flags)
            if flags & F_INDIRECT:
                refusal = _indirect_refusal(in_indirect, self._indirect, flags, length)
                if refusal == _IND_NESTED:
                    raise _error("indirect descriptor inside an indirect table", head)
                if refusal == _IND_NOT_NEGOTIATED:
                    raise _error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC", head)
                if refusal == _IND_WITH_NEXT:
                    raise _error("indirect descriptor with VIRTQ_DESC_F_NEXT", head)
                if refusal == _IND_BAD_LENGTH:
                    raise _error(f"indirect table length {length} is not a positive multiple of 16", head)
                table = self._ptr(addr, length)
                if table == NULL:
                    raise _not_mapped(addr, length, head)
                table_len = length >> 4
                limit = _indirect_walk_limit(size, table_len)
                in_indirect = True
                idx = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                raise _error("descriptor chain longer than 2**32 bytes", head)
            if flags & F_WRITE:
                seen_write = True
                self._append_views(writable, addr, length, head)
            elif seen_write:
                raise _error("device-readable descriptor after a device-writable one", head)
            else:
                self._append_views(readable, addr, length, head)
            if not (flags & F_NEXT):
                chain = DescriptorChain.__new__(DescriptorChain)
                chain.head = head
                chain.readable = readable
                chain.writable = writable
                return chain
            idx = nxt

    def pop_many(self, memory, limit):
        """Pop up to ``limit`` chains. A malformed chain met after some good
        ones ends the batch; its VringError is raised by the next pop call,
        so the outcome is the same as calling :meth:`pop` repeatedly."""
        cdef list chains = []
        cdef long long n = 0
        cdef int overflow = 0
        if PyLong_Check(limit):
            n = PyLong_AsLongLongAndOverflow(limit, &overflow)
            if overflow > 0:
                n = 1LL << 62
            elif overflow < 0:
                n = 0
        while (PyList_GET_SIZE(chains) < n) if PyLong_Check(limit) else (len(chains) < limit):
            try:
                chain = self._pop(memory)
            except VringError as exc:
                if not chains:
                    raise
                self._pending_error = exc
                break
            if chain is None:
                break
            chains.append(chain)
        return chains

    def pop_serving(self, memory, limit, responder, byte_budget=0, signal_every=0, notify_fd=-1):
        """Pop up to ``limit`` chains like :meth:`pop_many`, offering each
        one to ``responder`` first (see the pure twin). The chain walk
        and the responder's C function (``c_responder``) run without Python
        objects; that function gets the guest's buffers themselves (up to
        VFA_RESPONDER_IOV_MAX each way) besides the request's first bytes,
        so it is offered every chain and may also answer requests with
        large payloads, such as READ and WRITE, which the pure twin leaves
        to the full path. Chains it does not answer, or that this fast walk
        does not take (buffers crossing regions, more pieces, malformed),
        are walked again by the full path."""
        cdef list chains = []
        cdef long long served = self._pop_serving_into(
            chains, memory, operator.index(limit), responder, operator.index(byte_budget),
            operator.index(signal_every), operator.index(notify_fd))
        return chains, served

    def serve_kick(self, memory, limit, responder, byte_budget=0, signal_every=0, notify_fd=-1):
        """As the pure twin's: kicks disabled, :meth:`pop_serving` until the
        ring is empty, kicks enabled and the ring looked at once more, one
        last notification decision for what was answered, in one call."""
        cdef list chains = []
        cdef long long answered = self._serve_kick_into(
            chains, memory, operator.index(limit), responder, operator.index(byte_budget),
            operator.index(signal_every), operator.index(notify_fd))
        return chains, answered

    cdef long long _serve_kick_into(self, list chains, memory, long long n, responder, long long budget,
                                    long long every, int fd) except -1:
        """serve_kick's work: the chains left to the full path are appended
        to ``chains`` (empty on entry); returns how many were answered."""
        cdef long long answered = 0, served
        cdef uint64_t one = 1
        self._disable(memory)
        self._checked = memory
        try:
            while True:
                served = self._pop_serving_into(chains, memory, n - answered, responder, budget, every, fd)
                answered += served
                if PyList_GET_SIZE(chains) or answered >= n:
                    return answered
                if served:
                    continue  # a chunk ended the call, or the ring has more
                if not self._enable(memory):
                    return answered
                self._disable(memory)
        finally:
            self._checked = None
            if answered and fd >= 0 and self._desc_gpa is not None and self._notify_due():
                write(fd, &one, 8)  # EAGAIN: the counter is full, the driver wakes anyway

    def kick_server(self, device, handler, limit, byte_budget, signal_every, notify_fd, handoff):
        """A :class:`KickServer` for this queue (of this implementation)."""
        return KickServer(self, device, handler, limit, byte_budget, signal_every, notify_fd, handoff)

    cdef long long _pop_serving_into(self, list chains, memory, long long n, responder, long long budget,
                                     long long every, int fd) except -1:
        """pop_serving's work: the chains left to the full path are appended
        to ``chains`` (empty on entry); returns how many were answered."""
        cdef long long served = 0
        cdef long long moved = 0, answered = 0
        cdef uint64_t one = 1
        cdef Py_ssize_t r
        cdef int head
        cdef vfa_respond_fn fn = NULL
        cdef vfa_batch *batch = NULL
        cdef object capsule
        cdef object respond = None
        if responder is not self._fn_owner:
            # the C function of a responder is looked up once (its capsule is fixed)
            capsule = getattr(responder, "c_responder", None)
            self._fn = NULL if capsule is None else <vfa_respond_fn>PyCapsule_GetPointer(capsule, VFA_RESPONDER_CAPSULE)
            self._fn_owner = responder
        fn = self._fn
        if fn != NULL:
            if self._batch == NULL:
                self._batch = <vfa_batch *>PyMem_Malloc(sizeof(vfa_batch))
            batch = self._batch  # NULL (out of memory): the responder copies at once
            if batch != NULL:
                batch.count = batch.iov_used = 0
                batch.bytes = 0
        else:
            respond = responder.respond
        while PyList_GET_SIZE(chains) + served < n:
            if (0 < budget <= moved or 0 < every <= answered
                    or (batch != NULL and batch.bytes >= VFA_BATCH_BYTES)):
                if fd < 0:
                    break
                # a chunk is done: let the driver see it, then go on
                served -= self._run_batch(chains)
                if self._notify_due() and write(fd, &one, 8) < 0:
                    pass  # EAGAIN: the counter is full, the driver wakes anyway
                moved = answered = 0
            try:
                head = self._next_head(memory)
                if head < 0:
                    break
                r = self._serve_inline(<uint16_t>head, fn, responder, respond, batch)
                if r == _FLUSH_AND_RETRY:
                    served -= self._run_batch(chains)
                    r = self._serve_inline(<uint16_t>head, fn, responder, respond, batch)
                if r >= 0:
                    served += 1
                    answered += 1
                    moved += r
                    continue
                chain = self._read_chain(<uint16_t>head)
            except VringError as exc:
                served -= self._run_batch(chains)
                if not chains and not served:
                    raise
                self._pending_error = exc
                break
            chains.append(chain)
        served -= self._run_batch(chains)
        return served

    cdef int _run_batch(self, list chains) except -1:
        """Run the deferred READ copies (vfa_copy_pool.h) and finish their
        chains: a job that read all it expected gets its header and goes to
        the used ring; any other goes to ``chains`` for the full path, as a
        declined request would (walked again; a chain that no longer walks
        leaves its error for the next pop). Returns how many went to
        ``chains``."""
        cdef vfa_batch *b = self._batch
        cdef vfa_job *job
        cdef int i, count, declined = 0
        if b == NULL or b.count == 0:
            return 0
        with nogil:
            vfa_batch_run(b)
        count = b.count
        b.count = 0
        for i in range(count):
            job = &b.jobs[i]
            if job.result >= 0 and <size_t>job.result == job.expect:
                vfa_scatter(b.iov + job.hdr_start, job.hdr_count, job.header, job.header_len)
                self._push_used(job.head, job.reply_len)
                continue
            declined += 1
            try:
                chains.append(self._read_chain(job.head))
            except VringError as exc:
                if self._pending_error is None:
                    self._pending_error = exc
        b.iov_used = 0
        b.bytes = 0
        return declined

    cdef Py_ssize_t _serve_inline(self, uint16_t head_idx, vfa_respond_fn fn, object responder,
                                  object respond, vfa_batch *batch) except -2:
        """Walk chain ``head_idx`` the way _read_chain does, without building
        views; if it is well formed, every buffer lies in one region (and a
        Python ``respond`` is offered only readable parts that fit
        VFA_RESPONDER_REQUEST_MAX) and the responder answers, write the
        reply, return the chain to the used ring and return the bytes the
        chain carried (request and reply, for pop_serving's byte budget).
        -1 (nothing consumed but the ring entry): let _read_chain walk it
        and raise what is wrong. A READ the responder left to ``batch``
        counts as answered (reply length as it will be) and its head is
        recorded in its job; _FLUSH_AND_RETRY when the responder asks for
        the batch to run first (nothing consumed but the ring entry)."""
        cdef unsigned char request[VFA_RESPONDER_REQUEST_MAX]
        cdef unsigned char reply[VFA_RESPONDER_REPLY_MAX]
        cdef iovec wiov[VFA_RESPONDER_IOV_MAX]
        cdef iovec riov[VFA_RESPONDER_IOV_MAX]
        cdef int pieces = 0, rpieces = 0
        cdef uint32_t size = self._size
        cdef const unsigned char *table = self._desc
        cdef const unsigned char *src
        cdef uint32_t limit = size, table_len = size, idx = head_idx, length
        cdef uint64_t addr, total = 0
        cdef Py_ssize_t req_len = 0, readable_len = 0, room = 0, r, take
        cdef uint16_t flags
        cdef bint in_indirect = False, seen_write = False
        if head_idx >= size:
            return -1
        while True:
            if idx >= table_len or limit == 0:
                return -1
            limit -= 1
            idx = _load_desc(table, idx, &addr, &length, &flags)
            if flags & F_INDIRECT:
                if _indirect_refusal(in_indirect, self._indirect, flags, length) != _IND_OK:
                    return -1
                table = self._ptr(addr, length)
                if table == NULL:
                    return -1
                table_len = length >> 4
                limit = _indirect_walk_limit(size, table_len)
                in_indirect = True
                idx = 0
                continue
            total += length
            if total > MAX_CHAIN_BYTES:
                return -1
            if length:
                src = self._ptr(addr, length)
                if src == NULL:
                    return -1
                if flags & F_WRITE:
                    if pieces == VFA_RESPONDER_IOV_MAX:
                        return -1
                    wiov[pieces].iov_base = <void *>src
                    wiov[pieces].iov_len = length
                    pieces += 1
                    room += length
                elif seen_write or rpieces == VFA_RESPONDER_IOV_MAX:
                    return -1
                else:
                    riov[rpieces].iov_base = <void *>src
                    riov[rpieces].iov_len = length
                    rpieces += 1
                    readable_len += length
                    if req_len < VFA_RESPONDER_REQUEST_MAX:
                        take = VFA_RESPONDER_REQUEST_MAX - req_len
                        if take > length:
                            take = length
                        memcpy(request + req_len, src, take)
                        req_len += take
            if flags & F_WRITE:
                seen_write = True
            elif seen_write:
                return -1
            if not (flags & F_NEXT):
                break
        if fn != NULL:
            r = fn(responder, request, req_len, riov, rpieces, readable_len, wiov, pieces, room, batch)
            if r == VFA_DEFERRED and batch != NULL and batch.count > 0:
                batch.jobs[batch.count - 1].head = head_idx
                return 0  # copied later: not counted against pop_serving's byte budget
            if r == VFA_FLUSH_FIRST and batch != NULL and batch.count > 0:
                return _FLUSH_AND_RETRY
            if r < 0 or r > room:
                return -1
        else:
            if readable_len > VFA_RESPONDER_REQUEST_MAX:
                return -1
            if room > VFA_RESPONDER_REPLY_MAX:
                room = VFA_RESPONDER_REPLY_MAX
            r = _call_respond(respond, request, req_len, reply, room)
            if r < 0 or r > room:
                return -1
            vfa_scatter(wiov, pieces, reply, r)
        self._push_used(head_idx, <uint32_t>r)
        return r + readable_len

    def add_used(self, memory, head, length):
        """Return chain ``head`` with ``length`` bytes written and publish the
        used index (element first, then index). VringError if the queue is
        unconfigured, ``head`` >= size or ``length`` does not fit 32 bits."""
        cdef long long h, n
        cdef int overflow_h = 0, overflow_n = 0
        if self._desc_gpa is None:
            raise VringError("add_used on an unconfigured queue")
        self._check_memory(memory)
        if PyLong_Check(head) and PyLong_Check(length):
            h = PyLong_AsLongLongAndOverflow(head, &overflow_h)
            n = PyLong_AsLongLongAndOverflow(length, &overflow_n)
            if overflow_h or not 0 <= h < self._size:
                raise VringError(f"used head {head} out of range (queue size {self._size})")
            if overflow_n or not 0 <= n <= 0xFFFFFFFF:
                raise VringError(f"used length {length} does not fit 32 bits")
        else:
            # Not plain ints: the pure twin's comparisons, then its struct
            # packing decides (struct.error, or the values' __index__).
            if not 0 <= head < self._size:
                raise VringError(f"used head {head} out of range (queue size {self._size})")
            if not 0 <= length <= 0xFFFFFFFF:
                raise VringError(f"used length {length} does not fit 32 bits")
            _check_used_elem(bytearray(8), 0, head, length)
            h = operator.index(head)
            n = operator.index(length)
        self._push_used(<uint32_t>h, <uint32_t>n)

    cdef void _push_used(self, uint32_t head, uint32_t length) noexcept:
        """Write the used element and publish the index (checked arguments)."""
        cdef uint16_t nu = self._next_used
        cdef unsigned char *elem = self._used + 4 + 8 * (nu & self._mask)
        vfa_st32(elem, head)
        vfa_st32(elem + 4, length)
        nu += 1
        vfa_wmb()  # reply data and the element before the index
        vfa_ring_st16(self._used + 2, nu)
        self._next_used = nu
        if nu == self._signalled_used:
            # 65536 entries since the last decision: the 16-bit distance is lost.
            self._signalled_valid = False

    def needs_notification(self, memory):
        """Whether to send a used-buffer notification (call) now, after one or
        more add_used. With EVENT_IDX: whether ``used_event`` was crossed since
        the previous decision (the first decision is always True); otherwise
        unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT."""
        if self._desc_gpa is None:
            return False
        self._check_memory(memory)
        return self._notify_due()

    cdef bint _notify_due(self) noexcept:
        """needs_notification on a configured queue with current memory."""
        cdef uint16_t new, old, event
        cdef bint valid
        if self._event_idx:
            new = self._next_used
            old = self._signalled_used
            valid = self._signalled_valid
            self._signalled_used = new
            self._signalled_valid = True
            if not valid:
                return True
            vfa_mb()  # used->idx is published before used_event is read
            event = vfa_ring_ld16(self._avail + self._used_event_off)
            return <uint16_t>(new - event - 1) < <uint16_t>(new - old)
        vfa_mb()
        return not (vfa_ring_ld16(self._avail) & AVAIL_F_NO_INTERRUPT)

    def enable_notification(self, memory):
        """Ask the driver for kicks again (clear VIRTQ_USED_F_NO_NOTIFY, or
        set ``avail_event`` to ``next_avail``). Returns True if buffers are
        already available, in which case the caller must pop them (no kick
        will come for them). Raises VringError like :meth:`pop` for a corrupt
        available index."""
        return self._enable(memory) == 1

    cdef int _enable(self, memory) except -1:
        if self._desc_gpa is None:
            return 0
        self._check_memory(memory)
        self._notify_enabled = True
        if self._event_idx:
            vfa_ring_st16(self._used + self._avail_event_off, self._next_avail)
        else:
            vfa_ring_st16(self._used, 0)
        if self._broken:
            return 0
        vfa_mb()  # the driver sees the re-enabled kicks before we look at avail->idx
        return 1 if self._read_avail_idx() != self._next_avail else 0

    def disable_notification(self, memory):
        """Tell the driver kicks are not needed (VIRTQ_USED_F_NO_NOTIFY; with
        EVENT_IDX ``avail_event`` is simply no longer advanced). Advisory: the
        driver may still kick."""
        self._disable(memory)

    cdef int _disable(self, memory) except -1:
        if self._desc_gpa is None:
            return 0
        self._check_memory(memory)
        self._notify_enabled = False
        if not self._event_idx:
            vfa_ring_st16(self._used, USED_F_NO_NOTIFY)
        return 0

    def __repr__(self):
        return (
            f"VirtQueue(size={self._size}, next_avail={self._next_avail}, next_used={self._next_used}, "
            f"configured={self.is_configured}, broken={self._broken})"
        )


cdef class KickServer:
    """Compiled twin of :class:`virtiofs_async.vring.KickServer` (its
    docstring is the contract): the reader :meth:`attach` gives reads the
    eventfd and serves the kick with no Python frame in between."""

    cdef VirtQueue queue
    cdef object device
    cdef object handler
    cdef long long limit
    cdef long long byte_budget
    cdef long long signal_every
    cdef public int notify_fd
    cdef object handoff
    cdef public bint armed
    cdef int _fd
    cdef object _wake
    cdef object _fail
    cdef list _chains

    def __init__(self, VirtQueue queue, device, handler, limit, byte_budget, signal_every, notify_fd, handoff):
        self.queue = queue
        self.device = device
        self.handler = handler
        self.limit = operator.index(limit)
        self.byte_budget = operator.index(byte_budget)
        self.signal_every = operator.index(signal_every)
        self.notify_fd = operator.index(notify_fd)
        self.handoff = handoff
        self.armed = False
        self._fd = -1
        self._chains = []

    def arm(self, on):
        """Serve the next kicks (``on``), or leave them to the leader."""
        self.armed = bool(on)

    def __call__(self):
        return self._serve()

    cdef bint _serve(self) except -1:
        cdef list chains
        cdef long long answered
        if not self.armed:
            return False
        responder = getattr(self.handler, "inline_responder", None)
        if responder is None:
            self.armed = False
            return False
        try:
            answered = self.queue._serve_kick_into(self._chains, self.device.memory, self.limit, responder,
                                                   self.byte_budget, self.signal_every, self.notify_fd)
        except VringError as exc:
            chains = self._chains
            self._chains = []
            self.armed = False
            self.handoff(chains or None, exc)
            return False
        if PyList_GET_SIZE(self._chains):
            chains = self._chains
            self._chains = []
            self.armed = False
            self.handoff(chains, None)
            return False
        if answered >= self.limit:
            self.armed = False
            return False
        return True

    def attach(self, fd, wake, fail):
        """As the pure twin's (one reader per server: a later call replaces
        the earlier one's fd and callbacks)."""
        self._fd = operator.index(fd)
        self._wake = wake
        self._fail = fail
        return self._on_readable

    def _on_readable(self):
        cdef uint64_t value
        cdef ssize_t n
        cdef int err = 0
        while True:
            n = read(self._fd, &value, 8)
            if n >= 0:
                break
            err = errno
            if err != EINTR:
                break
        if n < 0:
            if err != EAGAIN:
                self._fail(OSError(err, os.strerror(err)))
            return
        try:
            if self._serve():
                return
        except Exception:
            _log.exception("serving a kick failed; waking the leader")
            self.armed = False
        self._wake()


cdef Py_ssize_t _call_respond(object respond, const unsigned char *request, Py_ssize_t req_len,
                              unsigned char *reply, Py_ssize_t room):
    """A responder without a C function: call its ``respond`` (an exception
    means it did not answer, as in the pure twin)."""
    cdef Py_buffer buf
    cdef Py_ssize_t n
    try:
        out = respond(PyBytes_FromStringAndSize(<const char *>request, req_len), room)
    except Exception:
        return -1
    if out is None:
        return -1
    try:
        PyObject_GetBuffer(out, &buf, PyBUF_SIMPLE)
    except Exception:
        return -1
    try:
        n = buf.len
        if n > room:
            return -1
        memcpy(reply, buf.buf, n)
        return n
    finally:
        PyBuffer_Release(&buf)


cdef inline object _slice(Region *r, uint64_t off, uint64_t length):
    """``view[off:off + length]`` of the region's view (a memoryview of the mmap)."""
    cdef object view = <object>r.buf.obj
    return view[<Py_ssize_t>off:<Py_ssize_t>(off + length)]


# ---------------------------------------------------------------------------
# scatter
# ---------------------------------------------------------------------------


cdef object _byte_view(object part):
    """The pure twin's source view: a 1-D unsigned-byte memoryview of ``part``."""
    src = part if isinstance(part, memoryview) else memoryview(part)
    if src.format != "B" or src.ndim != 1:
        src = src.cast("B")
    return src


cdef inline bint _simple_dest(Py_buffer *b) noexcept:
    """A writable, contiguous, 1-D view of unsigned bytes (format "B")."""
    if b.readonly or b.ndim != 1 or b.itemsize != 1:
        return False
    if b.format == NULL or strcmp(b.format, "B") != 0:
        return False
    return b.strides == NULL or b.strides[0] == 1 or b.shape[0] <= 1


def scatter(writable, parts):
    """Copy ``parts`` back to back into the buffers ``writable``; return the
    number of bytes copied. The caller has checked that they fit: what does not
    fit is dropped (never written past a buffer)."""
    cdef Py_buffer dbuf
    cdef Py_buffer sbuf
    cdef bint dest_held = False   # dbuf is a simple dest we can memcpy into
    cdef bint src_held = False
    cdef object dest = None
    cdef object src_view
    cdef Py_ssize_t dest_pos = 0, dest_len = 0, total = 0, pos, remaining, n
    views = iter(writable)
    try:
        for part in parts:
            src_view = None
            try:
                PyObject_GetBuffer(part, &sbuf, PyBUF_SIMPLE)
                src_held = True
                remaining = sbuf.len
            except Exception:
                src_view = _byte_view(part)  # raises what the pure twin raises
                remaining = len(src_view)
            pos = 0
            while remaining:
                if dest is None or dest_pos == dest_len:
                    if dest_held:
                        PyBuffer_Release(&dbuf)
                        dest_held = False
                    dest = next(views, None)
                    if dest is None:
                        return total
                    dest_pos = 0
                    if isinstance(dest, memoryview):
                        PyObject_GetBuffer(dest, &dbuf, PyBUF_RECORDS_RO)
                        if _simple_dest(&dbuf):
                            dest_held = True
                            dest_len = dbuf.len
                        else:
                            PyBuffer_Release(&dbuf)
                            dest_len = dest.nbytes
                    else:
                        dest_len = dest.nbytes
                    continue
                n = remaining if remaining < dest_len - dest_pos else dest_len - dest_pos
                if dest_held and src_held:
                    memmove(<char *>dbuf.buf + dest_pos, <const char *>sbuf.buf + pos, n)
                else:
                    if src_view is None:
                        src_view = _byte_view(part)
                    dest[dest_pos:dest_pos + n] = src_view[pos:pos + n]
                dest_pos += n
                pos += n
                remaining -= n
                total += n
            if src_held:
                PyBuffer_Release(&sbuf)
                src_held = False
        return total
    finally:
        if src_held:
            PyBuffer_Release(&sbuf)
        if dest_held:
            PyBuffer_Release(&dbuf)
