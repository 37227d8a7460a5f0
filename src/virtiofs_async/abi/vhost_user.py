"""vhost-user wire format (facts from QEMU's docs/interop/vhost-user.rst).

A message is a 12-byte header ``request, flags, size`` (three native-endian
u32; every platform we run on is little-endian) followed by ``size`` bytes of
payload. File descriptors travel as SCM_RIGHTS ancillary data with the
message's first bytes.

Constants that are *bit numbers* say so (``VHOST_USER_F_PROTOCOL_FEATURES``,
the ``VIRTIO_*`` ones); :class:`ProtocolFeature` members are *masks*, so they
can be or-ed together.
"""
from __future__ import annotations

import enum
import struct

# --- header ---------------------------------------------------------------

#: request, flags, size.
HEADER = struct.Struct("<III")
HEADER_SIZE = HEADER.size  # 12

#: The protocol version, in the low two bits of ``flags``.
VERSION = 0x1
VERSION_MASK = 0x3
#: Set on every reply (back-end to front-end on the main channel).
FLAG_REPLY = 0x4
#: REPLY_ACK: the sender wants a u64 status reply to a message without one.
FLAG_NEED_REPLY = 0x8
#: Every flag bit this protocol version defines.
KNOWN_FLAGS = VERSION_MASK | FLAG_REPLY | FLAG_NEED_REPLY

#: Largest payload we accept. QEMU's biggest payload (the crypto session) is
#: about 1.1 KiB; a memory table of 8 regions is 264 bytes.
MAX_PAYLOAD_SIZE = 4096

#: Most fds one message carries (SET_MEM_TABLE: one per region).
MAX_FDS_PER_MESSAGE = 8

# --- feature bits -----------------------------------------------------------

#: Virtio feature *bit number* reused by vhost-user: the back-end supports
#: GET/SET_PROTOCOL_FEATURES (and, once acked, rings start disabled).
VHOST_USER_F_PROTOCOL_FEATURES = 30
#: Virtio feature *bit number* of vhost dirty-page logging (migration).
VHOST_F_LOG_ALL = 26


class ProtocolFeature(enum.IntFlag):
    """vhost-user protocol feature masks (``1 << VHOST_USER_PROTOCOL_F_*``)."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    MTU = 1 << 4
    BACKEND_REQ = 1 << 5  # formerly SLAVE_REQ
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10  # formerly SLAVE_SEND_FD
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19


# --- requests ---------------------------------------------------------------


class FrontendRequest(enum.IntEnum):
    """Requests the front-end (QEMU) sends on the main socket."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # formerly SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class BackendRequest(enum.IntEnum):
    """Requests the back-end sends on the back-end channel (SET_BACKEND_REQ_FD)."""

    NONE = 0
    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8


# --- payloads ---------------------------------------------------------------

#: A single u64 (features, vring index + NOFD flag, status, REPLY_ACK status).
U64 = struct.Struct("<Q")

#: struct vhost_vring_state: index, num.
VRING_STATE = struct.Struct("<II")

#: struct vhost_vring_addr: index, flags, desc, used, avail (front-end user
#: addresses), log (guest physical).
VRING_ADDR = struct.Struct("<IIQQQQ")
#: ``flags`` bit of VRING_ADDR: log used-ring writes (migration).
VHOST_VRING_F_LOG = 0

#: Low byte of the u64 of SET_VRING_KICK/CALL/ERR: the vring index.
VHOST_USER_VRING_IDX_MASK = 0xFF
#: Bit 8 of that u64: no fd is attached (polling / no notification).
VHOST_USER_VRING_NOFD_MASK = 1 << 8

#: One memory region: guest_phys_addr, memory_size, userspace_addr, mmap_offset.
MEMORY_REGION = struct.Struct("<QQQQ")
#: Head of the SET_MEM_TABLE payload: nregions, padding; regions follow.
MEMORY_HEADER = struct.Struct("<II")
#: Regions one SET_MEM_TABLE carries at most.
VHOST_MEMORY_BASELINE_NREGIONS = 8

#: ADD_MEM_REG / REM_MEM_REG payload: u64 padding, then one region.
MEM_REG = struct.Struct("<QQQQQ")

#: SET_LOG_BASE payload: mmap_size, mmap_offset.
LOG = struct.Struct("<QQ")

#: struct vhost_iotlb_msg: iova, size, uaddr, perm, type (padded to 32 bytes).
IOTLB = struct.Struct("<QQQBB6x")

#: Head of GET_CONFIG / SET_CONFIG payloads: offset, size, flags; data follows.
CONFIG_HEADER = struct.Struct("<III")
#: Largest device config space a CONFIG message carries.
VHOST_USER_MAX_CONFIG_SIZE = 256

#: VRING_HOST_NOTIFIER_MSG payload: u64 (index | NOFD), size, offset.
VRING_AREA = struct.Struct("<QQQ")

#: GET/SET_INFLIGHT_FD payload: mmap_size, mmap_offset, num_queues,
#: queue_size (padded to 24 bytes).
INFLIGHT = struct.Struct("<QQHH4x")

#: SHARED_OBJECT payloads: a 16-byte UUID.
SHARED_OBJECT = struct.Struct("<16s")

#: SET_DEVICE_STATE_FD payload: direction, phase.
DEVICE_STATE_TRANSFER = struct.Struct("<II")


__all__ = [
    "BackendRequest",
    "CONFIG_HEADER",
    "DEVICE_STATE_TRANSFER",
    "FLAG_NEED_REPLY",
    "FLAG_REPLY",
    "FrontendRequest",
    "HEADER",
    "HEADER_SIZE",
    "INFLIGHT",
    "IOTLB",
    "KNOWN_FLAGS",
    "LOG",
    "MAX_FDS_PER_MESSAGE",
    "MAX_PAYLOAD_SIZE",
    "MEMORY_HEADER",
    "MEMORY_REGION",
    "MEM_REG",
    "ProtocolFeature",
    "SHARED_OBJECT",
    "U64",
    "VERSION",
    "VERSION_MASK",
    "VHOST_F_LOG_ALL",
    "VHOST_MEMORY_BASELINE_NREGIONS",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "VHOST_USER_MAX_CONFIG_SIZE",
    "VHOST_USER_VRING_IDX_MASK",
    "VHOST_USER_VRING_NOFD_MASK",
    "VHOST_VRING_F_LOG",
    "VRING_ADDR",
    "VRING_AREA",
    "VRING_STATE",
]
