"""The FUSE kernel ABI: opcodes, flag bits and struct layouts.

Transcribed from the facts of Linux's ``include/uapi/linux/fuse.h`` (protocol
7.38, plus the later INIT bits and STATX opcode so they can be named). Every
struct is a little-endian ``struct.Struct`` named exactly like the C struct;
virtio-fs is little-endian on every architecture. Fields are listed in the
comment beside each layout, including padding (which decoders ignore and
encoders write as zero).

This module only describes the wire format; :mod:`virtiofs_async.codec`
uses it to parse and build messages.
"""
from __future__ import annotations

import enum
import struct

# ---------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------

#: Major protocol version we speak.
FUSE_KERNEL_VERSION = 7
#: Minor protocol version we advertise.
FUSE_KERNEL_MINOR_VERSION = 38
#: Oldest guest minor version we accept (DAX mapping, KILLPRIV_V2 era).
FUSE_MIN_SUPPORTED_MINOR = 31

#: The node ID of the root inode.
FUSE_ROOT_ID = 1

#: Longest name the Linux client sends or accepts in a dirent (fs/fuse/fuse_i.h).
FUSE_NAME_MAX = 1024

#: The read buffer of /dev/fuse must be at least this big (not used by virtio-fs).
FUSE_MIN_READ_BUFFER = 8192


# ---------------------------------------------------------------------------
# Opcodes
# ---------------------------------------------------------------------------


class Opcode(enum.IntEnum):
    """``enum fuse_opcode`` (names without the ``FUSE_`` prefix)."""

    LOOKUP = 1
    FORGET = 2  # no reply
    GETATTR = 3
    SETATTR = 4
    READLINK = 5
    SYMLINK = 6
    MKNOD = 8
    MKDIR = 9
    UNLINK = 10
    RMDIR = 11
    RENAME = 12
    LINK = 13
    OPEN = 14
    READ = 15
    WRITE = 16
    STATFS = 17
    RELEASE = 18
    FSYNC = 20
    SETXATTR = 21
    GETXATTR = 22
    LISTXATTR = 23
    REMOVEXATTR = 24
    FLUSH = 25
    INIT = 26
    OPENDIR = 27
    READDIR = 28
    RELEASEDIR = 29
    FSYNCDIR = 30
    GETLK = 31
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42  # no reply
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52  # protocol 7.39; never sent to a 7.38 daemon
    CUSE_INIT = 4096


class NotifyCode(enum.IntEnum):
    """``enum fuse_notify_code`` (device-to-guest notifications)."""

    POLL = 1
    INVAL_INODE = 2
    INVAL_ENTRY = 3
    STORE = 4
    RETRIEVE = 5
    DELETE = 6


# ---------------------------------------------------------------------------
# INIT flags (64-bit; bits 32..63 travel in flags2 when FUSE_INIT_EXT is set)
# ---------------------------------------------------------------------------

FUSE_ASYNC_READ = 1 << 0
FUSE_POSIX_LOCKS = 1 << 1
FUSE_FILE_OPS = 1 << 2
FUSE_ATOMIC_O_TRUNC = 1 << 3
FUSE_EXPORT_SUPPORT = 1 << 4
FUSE_BIG_WRITES = 1 << 5
FUSE_DONT_MASK = 1 << 6
FUSE_SPLICE_WRITE = 1 << 7
FUSE_SPLICE_MOVE = 1 << 8
FUSE_SPLICE_READ = 1 << 9
FUSE_FLOCK_LOCKS = 1 << 10
FUSE_HAS_IOCTL_DIR = 1 << 11
FUSE_AUTO_INVAL_DATA = 1 << 12
FUSE_DO_READDIRPLUS = 1 << 13
FUSE_READDIRPLUS_AUTO = 1 << 14
FUSE_ASYNC_DIO = 1 << 15
FUSE_WRITEBACK_CACHE = 1 << 16
FUSE_NO_OPEN_SUPPORT = 1 << 17
FUSE_PARALLEL_DIROPS = 1 << 18
FUSE_HANDLE_KILLPRIV = 1 << 19
FUSE_POSIX_ACL = 1 << 20
FUSE_ABORT_ERROR = 1 << 21
FUSE_MAX_PAGES = 1 << 22
FUSE_CACHE_SYMLINKS = 1 << 23
FUSE_NO_OPENDIR_SUPPORT = 1 << 24
FUSE_EXPLICIT_INVAL_DATA = 1 << 25
FUSE_MAP_ALIGNMENT = 1 << 26
FUSE_SUBMOUNTS = 1 << 27
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28
FUSE_SETXATTR_EXT = 1 << 29
FUSE_INIT_EXT = 1 << 30
FUSE_INIT_RESERVED = 1 << 31
FUSE_SECURITY_CTX = 1 << 32
FUSE_HAS_INODE_DAX = 1 << 33
FUSE_CREATE_SUPP_GROUP = 1 << 34  # 7.39
FUSE_HAS_EXPIRE_ONLY = 1 << 35
FUSE_DIRECT_IO_ALLOW_MMAP = 1 << 36  # 7.39
FUSE_PASSTHROUGH = 1 << 37  # 7.40
FUSE_NO_EXPORT_SUPPORT = 1 << 38  # 7.40
FUSE_HAS_RESEND = 1 << 39  # 7.40
FUSE_ALLOW_IDMAP = 1 << 40  # 7.40
FUSE_OVER_IO_URING = 1 << 41  # 7.42
FUSE_REQUEST_TIMEOUT = 1 << 42  # 7.43


class InitFlag(enum.IntFlag):
    """The INIT flags as an ``IntFlag`` (same values as the FUSE_* constants)."""

    ASYNC_READ = FUSE_ASYNC_READ
    POSIX_LOCKS = FUSE_POSIX_LOCKS
    FILE_OPS = FUSE_FILE_OPS
    ATOMIC_O_TRUNC = FUSE_ATOMIC_O_TRUNC
    EXPORT_SUPPORT = FUSE_EXPORT_SUPPORT
    BIG_WRITES = FUSE_BIG_WRITES
    DONT_MASK = FUSE_DONT_MASK
    SPLICE_WRITE = FUSE_SPLICE_WRITE
    SPLICE_MOVE = FUSE_SPLICE_MOVE
    SPLICE_READ = FUSE_SPLICE_READ
    FLOCK_LOCKS = FUSE_FLOCK_LOCKS
    HAS_IOCTL_DIR = FUSE_HAS_IOCTL_DIR
    AUTO_INVAL_DATA = FUSE_AUTO_INVAL_DATA
    DO_READDIRPLUS = FUSE_DO_READDIRPLUS
    READDIRPLUS_AUTO = FUSE_READDIRPLUS_AUTO
    ASYNC_DIO = FUSE_ASYNC_DIO
    WRITEBACK_CACHE = FUSE_WRITEBACK_CACHE
    NO_OPEN_SUPPORT = FUSE_NO_OPEN_SUPPORT
    PARALLEL_DIROPS = FUSE_PARALLEL_DIROPS
    HANDLE_KILLPRIV = FUSE_HANDLE_KILLPRIV
    POSIX_ACL = FUSE_POSIX_ACL
    ABORT_ERROR = FUSE_ABORT_ERROR
    MAX_PAGES = FUSE_MAX_PAGES
    CACHE_SYMLINKS = FUSE_CACHE_SYMLINKS
    NO_OPENDIR_SUPPORT = FUSE_NO_OPENDIR_SUPPORT
    EXPLICIT_INVAL_DATA = FUSE_EXPLICIT_INVAL_DATA
    MAP_ALIGNMENT = FUSE_MAP_ALIGNMENT
    SUBMOUNTS = FUSE_SUBMOUNTS
    HANDLE_KILLPRIV_V2 = FUSE_HANDLE_KILLPRIV_V2
    SETXATTR_EXT = FUSE_SETXATTR_EXT
    INIT_EXT = FUSE_INIT_EXT
    INIT_RESERVED = FUSE_INIT_RESERVED
    SECURITY_CTX = FUSE_SECURITY_CTX
    HAS_INODE_DAX = FUSE_HAS_INODE_DAX
    CREATE_SUPP_GROUP = FUSE_CREATE_SUPP_GROUP
    HAS_EXPIRE_ONLY = FUSE_HAS_EXPIRE_ONLY
    DIRECT_IO_ALLOW_MMAP = FUSE_DIRECT_IO_ALLOW_MMAP
    PASSTHROUGH = FUSE_PASSTHROUGH
    NO_EXPORT_SUPPORT = FUSE_NO_EXPORT_SUPPORT
    HAS_RESEND = FUSE_HAS_RESEND
    ALLOW_IDMAP = FUSE_ALLOW_IDMAP
    OVER_IO_URING = FUSE_OVER_IO_URING
    REQUEST_TIMEOUT = FUSE_REQUEST_TIMEOUT


#: CUSE INIT flag.
CUSE_UNRESTRICTED_IOCTL = 1 << 0

# ---------------------------------------------------------------------------
# Other flag words
# ---------------------------------------------------------------------------

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7  # 7.40

# fuse_open_in.open_flags / fuse_create_in.open_flags
FUSE_OPEN_KILL_SUIDGID = 1 << 0

# fuse_release_in.release_flags
FUSE_RELEASE_FLUSH = 1 << 0
FUSE_RELEASE_FLOCK_UNLOCK = 1 << 1

# fuse_getattr_in.getattr_flags
FUSE_GETATTR_FH = 1 << 0

# fuse_lk_in.lk_flags
FUSE_LK_FLOCK = 1 << 0

# fuse_write_in.write_flags
FUSE_WRITE_CACHE = 1 << 0
FUSE_WRITE_LOCKOWNER = 1 << 1
FUSE_WRITE_KILL_SUIDGID = 1 << 2
FUSE_WRITE_KILL_PRIV = FUSE_WRITE_KILL_SUIDGID  # obsolete alias

# fuse_read_in.read_flags
FUSE_READ_LOCKOWNER = 1 << 1

# fuse_ioctl_in.flags / fuse_ioctl_out.flags
FUSE_IOCTL_COMPAT = 1 << 0
FUSE_IOCTL_UNRESTRICTED = 1 << 1
FUSE_IOCTL_RETRY = 1 << 2
FUSE_IOCTL_32BIT = 1 << 3
FUSE_IOCTL_DIR = 1 << 4
FUSE_IOCTL_COMPAT_X32 = 1 << 5
FUSE_IOCTL_MAX_IOV = 256

# fuse_poll_in.flags
FUSE_POLL_SCHEDULE_NOTIFY = 1 << 0

# fuse_fsync_in.fsync_flags
FUSE_FSYNC_FDATASYNC = 1 << 0

# fuse_attr.flags
FUSE_ATTR_SUBMOUNT = 1 << 0
FUSE_ATTR_DAX = 1 << 1

# fuse_setxattr_in.setxattr_flags
FUSE_SETXATTR_ACL_KILL_SGID = 1 << 0

# fuse_notify_inval_entry_out.flags
FUSE_EXPIRE_ONLY = 1 << 0

# fuse_setupmapping_in.flags
FUSE_SETUPMAPPING_FLAG_WRITE = 1 << 0
FUSE_SETUPMAPPING_FLAG_READ = 1 << 1

# fuse_in_header.unique: high bit marks a resent request (7.40)
FUSE_UNIQUE_RESEND = 1 << 63

# Extension types (fuse_ext_header.type); 0..31 are security-context counts.
FUSE_MAX_NR_SECCTX = 31
FUSE_EXT_GROUPS = 32  # 7.39: struct fuse_supp_groups

# ---------------------------------------------------------------------------
# Compat sizes (shorter layouts of older protocol minors)
# ---------------------------------------------------------------------------

FUSE_COMPAT_ENTRY_OUT_SIZE = 120
FUSE_COMPAT_ATTR_OUT_SIZE = 96
FUSE_COMPAT_MKNOD_IN_SIZE = 8
FUSE_COMPAT_WRITE_IN_SIZE = 24
FUSE_COMPAT_STATFS_SIZE = 48
FUSE_COMPAT_SETXATTR_IN_SIZE = 8
FUSE_COMPAT_INIT_IN_SIZE = 16  # fuse_init_in before 7.36 (no flags2)
FUSE_COMPAT_INIT_OUT_SIZE = 8
FUSE_COMPAT_22_INIT_OUT_SIZE = 24

# ---------------------------------------------------------------------------
# Struct layouts
# ---------------------------------------------------------------------------

_ATTR = "QQQQQQIIIIIIIIII"

#: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec,
#: mode, nlink, uid, gid, rdev, blksize, flags
fuse_attr = struct.Struct("<" + _ATTR)
#: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
fuse_kstatfs = struct.Struct("<QQQQQIIII6I")
#: start, end, type, pid
fuse_file_lock = struct.Struct("<QQII")

#: len, opcode, unique, nodeid, uid, gid, pid, total_extlen (8-byte units), padding
fuse_in_header = struct.Struct("<IIQQIIIHH")
#: len, error (negative errno or 0), unique
fuse_out_header = struct.Struct("<IiQ")

#: nodeid, generation, entry_valid, attr_valid, entry_valid_nsec,
#: attr_valid_nsec, then the fuse_attr fields
fuse_entry_out = struct.Struct("<QQQQII" + _ATTR)
#: nlookup
fuse_forget_in = struct.Struct("<Q")
#: nodeid, nlookup
fuse_forget_one = struct.Struct("<QQ")
#: count, dummy
fuse_batch_forget_in = struct.Struct("<II")
#: getattr_flags, dummy, fh
fuse_getattr_in = struct.Struct("<IIQ")
#: attr_valid, attr_valid_nsec, dummy, then the fuse_attr fields
fuse_attr_out = struct.Struct("<QII" + _ATTR)
#: mode, rdev, umask, padding
fuse_mknod_in = struct.Struct("<IIII")
#: mode, umask
fuse_mkdir_in = struct.Struct("<II")
#: newdir
fuse_rename_in = struct.Struct("<Q")
#: newdir, flags, padding
fuse_rename2_in = struct.Struct("<QII")
#: oldnodeid
fuse_link_in = struct.Struct("<Q")
#: valid, padding, fh, size, lock_owner, atime, mtime, ctime, atimensec,
#: mtimensec, ctimensec, mode, unused4, uid, gid, unused5
fuse_setattr_in = struct.Struct("<IIQQQQQQIIIIIIII")
#: flags, open_flags
fuse_open_in = struct.Struct("<II")
#: flags, mode, umask, open_flags
fuse_create_in = struct.Struct("<IIII")
#: fh, open_flags, backing_id (padding before 7.40)
fuse_open_out = struct.Struct("<QIi")
#: fh, flags, release_flags, lock_owner
fuse_release_in = struct.Struct("<QIIQ")
#: fh, unused, padding, lock_owner
fuse_flush_in = struct.Struct("<QIIQ")
#: fh, offset, size, read_flags, lock_owner, flags, padding
fuse_read_in = struct.Struct("<QQIIQII")
#: fh, offset, size, write_flags, lock_owner, flags, padding
fuse_write_in = struct.Struct("<QQIIQII")
#: size, padding
fuse_write_out = struct.Struct("<II")
#: the fuse_kstatfs fields
fuse_statfs_out = fuse_kstatfs
#: fh, fsync_flags, padding
fuse_fsync_in = struct.Struct("<QII")
#: size, flags, setxattr_flags, padding (sent when FUSE_SETXATTR_EXT is agreed)
fuse_setxattr_in = struct.Struct("<IIII")
#: size, flags (the layout sent when FUSE_SETXATTR_EXT is not agreed)
fuse_setxattr_in_compat = struct.Struct("<II")
#: size, padding
fuse_getxattr_in = struct.Struct("<II")
#: size, padding
fuse_getxattr_out = struct.Struct("<II")
#: fh, owner, lk.start, lk.end, lk.type, lk.pid, lk_flags, padding
fuse_lk_in = struct.Struct("<QQQQIIII")
#: lk.start, lk.end, lk.type, lk.pid
fuse_lk_out = fuse_file_lock
#: mask, padding
fuse_access_in = struct.Struct("<II")
#: major, minor, max_readahead, flags, flags2, unused[11]
fuse_init_in = struct.Struct("<IIIII11I")
#: major, minor, max_readahead, flags (before 7.36)
fuse_init_in_compat = struct.Struct("<IIII")
#: major, minor, max_readahead, flags, max_background, congestion_threshold,
#: max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
fuse_init_out = struct.Struct("<IIIIHHIIHHI7I")
#: unique
fuse_interrupt_in = struct.Struct("<Q")
#: block, blocksize, padding
fuse_bmap_in = struct.Struct("<QII")
#: block
fuse_bmap_out = struct.Struct("<Q")
#: fh, flags, cmd, arg, in_size, out_size
fuse_ioctl_in = struct.Struct("<QIIQII")
#: base, len
fuse_ioctl_iovec = struct.Struct("<QQ")
#: result, flags, in_iovs, out_iovs
fuse_ioctl_out = struct.Struct("<iIII")
#: fh, kh, flags, events
fuse_poll_in = struct.Struct("<QQII")
#: revents, padding
fuse_poll_out = struct.Struct("<II")
#: kh
fuse_notify_poll_wakeup_out = struct.Struct("<Q")
#: fh, offset, length, mode, padding
fuse_fallocate_in = struct.Struct("<QQQII")
#: fh, offset, whence, padding
fuse_lseek_in = struct.Struct("<QQII")
#: offset
fuse_lseek_out = struct.Struct("<Q")
#: fh_in, off_in, nodeid_out, fh_out, off_out, len, flags
fuse_copy_file_range_in = struct.Struct("<QQQQQQQ")
#: fh, foffset, len, flags, moffset
fuse_setupmapping_in = struct.Struct("<QQQQQ")
#: count (4 bytes, not padded: the kernel sends exactly 4)
fuse_removemapping_in = struct.Struct("<I")
#: moffset, len
fuse_removemapping_one = struct.Struct("<QQ")
#: padding
fuse_syncfs_in = struct.Struct("<Q")
#: ino, off, namelen, type (the name follows, padded to 8 bytes)
fuse_dirent = struct.Struct("<QQII")
#: fuse_entry_out fields then fuse_dirent fields (the name follows)
fuse_direntplus = struct.Struct("<QQQQII" + _ATTR + "QQII")
#: size, type
fuse_ext_header = struct.Struct("<II")
#: size, nr_secctx
fuse_secctx_header = struct.Struct("<II")
#: size, padding
fuse_secctx = struct.Struct("<II")
#: nr_groups (the gid_t array follows)
fuse_supp_groups = struct.Struct("<I")
#: ino, off, len
fuse_notify_inval_inode_out = struct.Struct("<Qqq")
#: parent, namelen, flags
fuse_notify_inval_entry_out = struct.Struct("<QII")
#: parent, child, namelen, padding
fuse_notify_delete_out = struct.Struct("<QQII")

#: offsetof(struct fuse_dirent, name)
FUSE_NAME_OFFSET = fuse_dirent.size
#: offsetof(struct fuse_direntplus, dirent.name)
FUSE_NAME_OFFSET_DIRENTPLUS = fuse_direntplus.size


def fuse_rec_align(n: int) -> int:
    """Round ``n`` up to a multiple of 8 (FUSE_REC_ALIGN / FUSE_DIRENT_ALIGN)."""
    return (n + 7) & ~7
