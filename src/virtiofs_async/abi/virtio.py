"""Virtio 1.x constants and split-virtqueue layout (facts from the virtio spec).

Everything here is little-endian on the wire. Feature constants are *bit
numbers*; use ``1 << VIRTIO_F_VERSION_1`` for the mask.

Split virtqueue of ``n`` entries (``n`` a power of two, at most 32768)::

    descriptor table  align 16   16 * n        struct virtq_desc {le64 addr; le32 len; le16 flags; le16 next}
    available ring    align 2    6 + 2 * n     le16 flags; le16 idx; le16 ring[n]; le16 used_event
    used ring         align 4    6 + 8 * n     le16 flags; le16 idx; {le32 id; le32 len} ring[n]; le16 avail_event

``used_event`` / ``avail_event`` only have meaning with VIRTIO_RING_F_EVENT_IDX,
but the sizes above always include them.
"""
from __future__ import annotations

import struct

# --- device-independent feature bits (bit numbers) -------------------------

VIRTIO_F_NOTIFY_ON_EMPTY = 24  # legacy: notify when the avail ring runs empty
VIRTIO_F_ANY_LAYOUT = 27  # legacy: no framing assumptions (implied by VERSION_1)
VIRTIO_RING_F_INDIRECT_DESC = 28
VIRTIO_RING_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_SR_IOV = 37
VIRTIO_F_NOTIFICATION_DATA = 38
VIRTIO_F_NOTIF_CONFIG_DATA = 39
VIRTIO_F_RING_RESET = 40
VIRTIO_F_ADMIN_VQ = 41

#: virtio-fs device-specific feature: the notification queue exists.
VIRTIO_FS_F_NOTIFICATION = 0

# --- descriptor / ring flags ----------------------------------------------

VIRTQ_DESC_F_NEXT = 1  # chain continues via ``next``
VIRTQ_DESC_F_WRITE = 2  # device-writable (otherwise device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # buffer holds a table of descriptors

VIRTQ_AVAIL_F_NO_INTERRUPT = 1  # driver: no used-buffer notification wanted
VIRTQ_USED_F_NO_NOTIFY = 1  # device: no available-buffer notification wanted

#: Largest queue size the split format allows (highest power of two in u16).
VIRTQ_MAX_SIZE = 32768

# --- struct layouts ---------------------------------------------------------

#: struct virtq_desc: addr, len, flags, next.
DESC = struct.Struct("<QIHH")
DESC_SIZE = DESC.size  # 16
#: struct virtq_used_elem: id, len.
USED_ELEM = struct.Struct("<II")
USED_ELEM_SIZE = USED_ELEM.size  # 8
U16 = struct.Struct("<H")

DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

# Offsets inside the available ring.
AVAIL_FLAGS_OFFSET = 0
AVAIL_IDX_OFFSET = 2
AVAIL_RING_OFFSET = 4
# Offsets inside the used ring.
USED_FLAGS_OFFSET = 0
USED_IDX_OFFSET = 2
USED_RING_OFFSET = 4


def desc_table_size(queue_size: int) -> int:
    """Bytes of the descriptor table for ``queue_size`` entries."""
    return DESC_SIZE * queue_size


def avail_ring_size(queue_size: int) -> int:
    """Bytes of the available ring, including the trailing ``used_event``."""
    return 6 + 2 * queue_size


def used_ring_size(queue_size: int) -> int:
    """Bytes of the used ring, including the trailing ``avail_event``."""
    return 6 + USED_ELEM_SIZE * queue_size


def avail_entry_offset(slot: int) -> int:
    """Offset of ``ring[slot]`` inside the available ring."""
    return AVAIL_RING_OFFSET + 2 * slot


def used_event_offset(queue_size: int) -> int:
    """Offset of ``used_event`` inside the available ring."""
    return AVAIL_RING_OFFSET + 2 * queue_size


def used_elem_offset(slot: int) -> int:
    """Offset of ``ring[slot]`` inside the used ring."""
    return USED_RING_OFFSET + USED_ELEM_SIZE * slot


def avail_event_offset(queue_size: int) -> int:
    """Offset of ``avail_event`` inside the used ring."""
    return USED_RING_OFFSET + USED_ELEM_SIZE * queue_size


def is_valid_queue_size(queue_size: int) -> bool:
    """True for a power of two in 1..VIRTQ_MAX_SIZE."""
    return 0 < queue_size <= VIRTQ_MAX_SIZE and queue_size & (queue_size - 1) == 0


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """EVENT_IDX rule: notify iff ``event_idx`` lies in ``[old_idx, new_idx)``.

    All three are free-running 16-bit indices; ``old_idx`` is the index at the
    previous notification decision, ``new_idx`` the current one.
    """
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
