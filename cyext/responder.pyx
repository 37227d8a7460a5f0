# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of :mod:`virtiofs_async.responder`.

Built as ``virtiofs_async._cy_responder``. :class:`PassthroughResponder`
answers exactly what the pure one answers, with the same bytes and the same
lookup counting (``tests/unit/test_responder.py`` runs both against the
session's full path). Its ``c_responder`` capsule carries a C function
(``vfa_respond_fn``, see include/vfa_hotpath.h) that the compiled
``VirtQueue.pop_serving`` calls with the request gathered from guest memory
and the guest's buffers: a GETATTR costs one dict lookup, one ``fstat``
and the stores of the reply, with no Python objects but the nodeid key; a
cached READ one ``preadv2`` into the guest's reply buffers, a WRITE one
``pwritev`` from its request buffers.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetFromErrno
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.pycapsule cimport PyCapsule_New
from libc.errno cimport EEXIST, EIO, ENOENT, ENOTEMPTY, errno
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memmove, memset
from posix.stat cimport S_ISDIR, S_ISREG, S_ISGID, S_ISUID, S_IXGRP, fchmodat, fstat, fstatat, struct_stat, utimensat
from posix.time cimport timespec

from posix.types cimport off_t
from posix.uio cimport iovec

from vfa_hotpath cimport (
    VFA_BATCH_IOV,
    VFA_BATCH_JOBS,
    VFA_DEFER_MIN,
    VFA_DEFERRED,
    VFA_FLUSH_FIRST,
    VFA_JOB_CUTS,
    VFA_RESPONDER_CAPSULE,
    VFA_RESPONDER_IOV_MAX,
    VFA_RESPONDER_REPLY_MAX,
    vfa_name_len,
    vfa_reserve,
    vfa_zero_span,
    vfa_scatter,
    vfa_ld16,
    vfa_ld32,
    vfa_batch,
    vfa_job,
    vfa_ld64,
    vfa_st32,
    vfa_st64,
)

import errno as _errno_mod
import logging as _logging
import os as _os
from _thread import allocate_lock as _allocate_lock

from virtiofs_async.abi import fuse as _abi
from virtiofs_async.codec import split_timeout
from virtiofs_async._cy_codec import (
    pack_raw_dirents as _cy_pack_raw_dirents,
    parse_linux_dirents64 as _cy_parse_linux_dirents64,
    scan_raw_dirents as _cy_scan_raw_dirents,
)

cdef object _log = _logging.getLogger("virtiofs_async.responder")


cdef object _errno_name(int err):
    return _errno_mod.errorcode.get(err, err)

cdef extern from "<fcntl.h>" nogil:
    enum: AT_SYMLINK_NOFOLLOW
    enum: AT_REMOVEDIR
    enum: O_PATH
    enum: O_NOFOLLOW
    enum: O_CLOEXEC
    enum: O_CREAT
    enum: O_EXCL
    int openat(int dirfd, const char *path, int flags, ...)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    int fchownat(int dirfd, const char *path, unsigned int owner, unsigned int group, int flags)

cdef extern from "<sys/stat.h>" nogil:
    unsigned int umask(unsigned int mask)
    enum: UTIME_NOW
    enum: UTIME_OMIT

cdef extern from "<stdio.h>" nogil:
    int snprintf(char *s, size_t n, const char *fmt, ...)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv2(int fd, const iovec *iov, int iovcnt, off_t offset, int flags)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, off_t offset)

cdef extern from "<unistd.h>" nogil:
    int dup(int fd)
    int unlinkat(int dirfd, const char *path, int flags)
    off_t lseek(int fd, off_t offset, int whence)
    long syscall(long number, ...)

cdef extern from "<sys/syscall.h>" nogil:
    long SYS_getdents64

cdef extern from "<sys/sysmacros.h>" nogil:
    unsigned int major(unsigned long long dev)
    unsigned int minor(unsigned long long dev)

cdef enum:
    IN_HEADER = 40
    OUT_HEADER = 16
    GETATTR_LEN = 56     # header + fuse_getattr_in
    READ_LEN = 80        # header + fuse_read_in
    WRITE_LEN = 80       # header + fuse_write_in
    WRITE_REPLY = 24     # header + fuse_write_out
    ATTR_REPLY = 120     # header + fuse_attr_out
    ENTRY_REPLY = 144    # header + fuse_entry_out
    NAME_MAX = 255
    S_IFMT_BITS = 0o170000
    S_IFDIR_BITS = 0o040000
    ROOT_ID = 1
    CLOSE_IN = 24        # fuse_flush_in, fuse_release_in
    CREATE_IN = 16       # fuse_create_in
    CREATE_BODY = 144    # fuse_entry_out + fuse_open_out
    SETATTR_IN = 88      # fuse_setattr_in
    ATTR_OUT = 104       # fuse_attr_out
    OPEN_IN = 8          # fuse_open_in
    OPEN_OUT = 16        # fuse_open_out
    MKDIR_IN = 8         # fuse_mkdir_in
    ENTRY_OUT = 128      # fuse_entry_out
    S_IFREG_BITS = 0o100000
    S_IFLNK_BITS = 0o120000

cdef uint32_t OP_GETATTR = int(_abi.Opcode.GETATTR)
cdef uint32_t OP_LOOKUP = int(_abi.Opcode.LOOKUP)
cdef uint32_t OP_FORGET = int(_abi.Opcode.FORGET)
cdef uint32_t OP_FLUSH = int(_abi.Opcode.FLUSH)
cdef uint32_t OP_RELEASE = int(_abi.Opcode.RELEASE)
cdef uint32_t OP_RELEASEDIR = int(_abi.Opcode.RELEASEDIR)
cdef uint32_t OP_READ = int(_abi.Opcode.READ)
cdef uint32_t OP_WRITE = int(_abi.Opcode.WRITE)
cdef uint32_t OP_READDIR = int(_abi.Opcode.READDIR)
cdef uint32_t OP_READDIRPLUS = int(_abi.Opcode.READDIRPLUS)
cdef uint32_t OP_CREATE = int(_abi.Opcode.CREATE)
cdef uint32_t OP_SETATTR = int(_abi.Opcode.SETATTR)
cdef uint32_t OP_UNLINK = int(_abi.Opcode.UNLINK)
cdef uint32_t OP_RMDIR = int(_abi.Opcode.RMDIR)
cdef uint32_t OP_OPEN = int(_abi.Opcode.OPEN)
cdef uint32_t OP_OPENDIR = int(_abi.Opcode.OPENDIR)
cdef uint32_t OP_MKDIR = int(_abi.Opcode.MKDIR)
cdef int RWF_NOWAIT = getattr(_os, "RWF_NOWAIT", 8)
cdef uint32_t O_ACCMODE_BITS = _os.O_ACCMODE
cdef uint32_t O_RDONLY_BITS = _os.O_RDONLY
cdef uint32_t O_DIRECT_BITS = _os.O_DIRECT
# the backend's _WAITING_WRITES: writes that wait for the device
cdef uint32_t O_WAITING_WRITES = _os.O_DIRECT | _os.O_SYNC | _os.O_DSYNC
cdef uint32_t FOPEN_DIRECT_IO = _abi.FOPEN_DIRECT_IO
cdef uint32_t FOPEN_KEEP_CACHE = _abi.FOPEN_KEEP_CACHE
cdef uint64_t OFF_MAX = 0x7FFFFFFFFFFFFFFF
cdef uint32_t ATTR_SUBMOUNT = _abi.FUSE_ATTR_SUBMOUNT
cdef uint64_t NS = 1000000000
cdef uint32_t FATTR_MODE = _abi.FATTR_MODE
cdef uint32_t FATTR_UID = _abi.FATTR_UID
cdef uint32_t FATTR_GID = _abi.FATTR_GID
cdef uint32_t FATTR_SIZE = _abi.FATTR_SIZE
cdef uint32_t FATTR_ATIME = _abi.FATTR_ATIME
cdef uint32_t FATTR_MTIME = _abi.FATTR_MTIME
cdef uint32_t FATTR_FH = _abi.FATTR_FH
cdef uint32_t FATTR_ATIME_NOW = _abi.FATTR_ATIME_NOW
cdef uint32_t FATTR_MTIME_NOW = _abi.FATTR_MTIME_NOW
cdef uint32_t FATTR_KILL_SUIDGID = _abi.FATTR_KILL_SUIDGID


cdef inline uint32_t _guest_rdev(unsigned long long dev) noexcept:
    cdef unsigned int ma, mi
    if dev == 0:
        return 0
    ma = major(dev)
    mi = minor(dev)
    return <uint32_t>((mi & 0xFF) | (ma << 8) | ((mi & ~(<unsigned int>0xFF)) << 12))


cdef bint _store_attr(unsigned char *p, uint64_t nodeid, struct_stat *st, uint32_t flags) noexcept:
    """The 88-byte fuse_attr of ``st`` as inode ``nodeid`` at ``p``; False
    (nothing meaningful written) where the pure twin's _attr_fields gives None."""
    if <unsigned long long>st.st_nlink > 0xFFFFFFFF or st.st_blksize < 0 or <unsigned long long>st.st_blksize > 0xFFFFFFFF:
        return False
    vfa_st64(p, nodeid)
    vfa_st64(p + 8, <uint64_t>st.st_size)
    vfa_st64(p + 16, <uint64_t>st.st_blocks)
    vfa_st64(p + 24, <uint64_t>st.st_atim.tv_sec)  # two's complement before the epoch (codec.wire_seconds)
    vfa_st64(p + 32, <uint64_t>st.st_mtim.tv_sec)
    vfa_st64(p + 40, <uint64_t>st.st_ctim.tv_sec)
    vfa_st32(p + 48, <uint32_t>st.st_atim.tv_nsec)
    vfa_st32(p + 52, <uint32_t>st.st_mtim.tv_nsec)
    vfa_st32(p + 56, <uint32_t>st.st_ctim.tv_nsec)
    vfa_st32(p + 60, <uint32_t>st.st_mode)
    vfa_st32(p + 64, <uint32_t>st.st_nlink)
    vfa_st32(p + 68, <uint32_t>st.st_uid)
    vfa_st32(p + 72, <uint32_t>st.st_gid)
    vfa_st32(p + 76, _guest_rdev(st.st_rdev))
    vfa_st32(p + 80, <uint32_t>st.st_blksize)
    vfa_st32(p + 84, flags)
    return True


cdef int _slice_iov(const iovec *src, int count, Py_ssize_t skip, Py_ssize_t want, iovec *out) noexcept:
    """Describe in ``out`` the ``want`` bytes of the buffers ``src`` that
    follow their first ``skip`` bytes (the caller checked they hold them);
    returns how many entries of ``out`` it used (at most ``count``).
    Buffers that follow each other in the daemon's memory become one
    entry (a guest's adjacent pages: fewer segments for the kernel to
    walk in preadv/pwritev)."""
    cdef int i, k = 0
    cdef unsigned char *base
    cdef Py_ssize_t length
    for i in range(count):
        if want == 0:
            break
        if <Py_ssize_t>src[i].iov_len <= skip:
            skip -= src[i].iov_len
            continue
        base = <unsigned char *>src[i].iov_base + skip
        length = <Py_ssize_t>src[i].iov_len - skip
        skip = 0
        if length > want:
            length = want
        want -= length
        if k and <unsigned char *>out[k - 1].iov_base + out[k - 1].iov_len == base:
            out[k - 1].iov_len += <size_t>length
        else:
            out[k].iov_base = base
            out[k].iov_len = <size_t>length
            k += 1
    return k


cdef inline void _store_out_header(unsigned char *p, uint32_t length, int error, uint64_t unique) noexcept:
    vfa_st32(p, length)
    vfa_st32(p + 4, <uint32_t>error)
    vfa_st64(p + 8, unique)


cdef inline bint _component(const unsigned char *name, Py_ssize_t nlen) noexcept:
    """Whether ``name`` (``nlen`` bytes, its NUL after them) is a single
    component other than ``.`` and ``..`` (the pure twin's _component)."""
    cdef int slash = 0
    if nlen < 1 or nlen > NAME_MAX:
        return False
    if vfa_name_len(name, nlen, nlen, &slash) >= 0 or slash:
        return False
    return not (name[0] == ord('.') and (nlen == 1 or (nlen == 2 and name[1] == ord('.'))))


cdef Py_ssize_t _callback_reply(object r, uint64_t unique, Py_ssize_t size, unsigned char *reply) except? -2:
    """A backend callback's answer as a reply: None -1 (declined), an
    errno a header with it, else its ``size``-byte body after a header."""
    if r is None:
        return -1
    if not PyBytes_CheckExact(r):
        _store_out_header(reply, OUT_HEADER, -<int>r, unique)
        return OUT_HEADER
    if PyBytes_GET_SIZE(r) != size:
        raise ValueError(f"a responder callback gave a {PyBytes_GET_SIZE(r)}-byte body, not {size}")
    _store_out_header(reply, <uint32_t>(OUT_HEADER + size), 0, unique)
    memcpy(reply + OUT_HEADER, PyBytes_AS_STRING(r), size)
    return OUT_HEADER + size


@cython.final
cdef int _host_errno(str what, uint64_t nodeid, int err):
    """A failed host call's errno (0: EIO) for an answer, logged as the
    backend's _inline_errno logs it (ENOENT not at all, EEXIST and ENOTEMPTY
    at DEBUG, others at INFO)."""
    if err == 0:
        err = EIO
    if err == EEXIST or err == ENOTEMPTY:
        _log.debug("%s nodeid=%d -> %s", what, nodeid, _errno_name(err))
    elif err != ENOENT:
        _log.info("%s nodeid=%d -> %s", what, nodeid, _errno_name(err))
    return err


@cython.final
@cython.freelist(64)
cdef class HostInode:
    """See :class:`virtiofs_async.responder.HostInode`. The same fields as C
    members (the responder reads them without attribute lookups);
    ``plocks`` and ``lock_pids`` are made on first use."""

    cdef public uint64_t nodeid
    cdef public tuple key
    cdef public int kind
    cdef public int fd
    cdef public object handle
    cdef public int mount_fd
    cdef public long long lookups
    cdef public long long opens
    cdef public long long pins
    cdef dict _plocks
    cdef dict _lock_pids
    cdef public bint gone

    def __init__(self, uint64_t nodeid, tuple key, int kind, int fd, handle=None, int mount_fd=-1,
                 long long lookups=0, long long opens=0, long long pins=0, dict plocks=None, dict lock_pids=None,
                 bint gone=False):
        self.nodeid = nodeid
        self.key = key
        self.kind = kind
        self.fd = fd
        self.handle = handle
        self.mount_fd = mount_fd
        self.lookups = lookups
        self.opens = opens
        self.pins = pins
        self._plocks = plocks
        self._lock_pids = lock_pids
        self.gone = gone

    @property
    def plocks(self):
        if self._plocks is None:
            self._plocks = {}
        return self._plocks

    @plocks.setter
    def plocks(self, dict value):
        self._plocks = value

    @property
    def lock_pids(self):
        if self._lock_pids is None:
            self._lock_pids = {}
        return self._lock_pids

    @lock_pids.setter
    def lock_pids(self, dict value):
        self._lock_pids = value

    @property
    def dev(self):
        return self.key[0]

    cdef inline bint holds_locks(self) noexcept:
        """Whether it has POSIX lock fds or pids recorded."""
        return bool(self._plocks) or bool(self._lock_pids)

    def __repr__(self):
        return (f"HostInode(nodeid={self.nodeid!r}, key={self.key!r}, kind={self.kind!r}, fd={self.fd!r}, "
                f"handle={self.handle!r}, mount_fd={self.mount_fd!r}, lookups={self.lookups!r}, "
                f"opens={self.opens!r}, pins={self.pins!r}, plocks={self.plocks!r}, "
                f"lock_pids={self.lock_pids!r}, gone={self.gone!r})")


@cython.final
@cython.freelist(16)
cdef class HostHandle:
    """See :class:`virtiofs_async.responder.HostHandle`: the same fields as
    C members."""

    cdef public uint64_t fh
    cdef public HostInode node
    cdef public int fd
    cdef public bint is_dir
    cdef public bint writable
    cdef public bint nowait_read
    cdef public bint inline_write
    cdef public long long pins
    cdef public bint closed
    cdef public object lock
    cdef public long long dir_pos
    cdef public bytes dir_raw
    cdef public long long dir_read_from
    cdef public object dir_hint

    def __init__(self, uint64_t fh, HostInode node not None, int fd, bint is_dir, bint writable,
                 bint nowait_read=False, bint inline_write=False, long long pins=0, bint closed=False, lock=None,
                 long long dir_pos=-1, bytes dir_raw=b"", long long dir_read_from=-1, dir_hint=None):
        self.fh = fh
        self.node = node
        self.fd = fd
        self.is_dir = is_dir
        self.writable = writable
        self.nowait_read = nowait_read
        self.inline_write = inline_write
        self.pins = pins
        self.closed = closed
        self.lock = _allocate_lock() if lock is None else lock
        self.dir_pos = dir_pos
        self.dir_raw = dir_raw
        self.dir_read_from = dir_read_from
        self.dir_hint = dir_hint

    def __repr__(self):
        return (f"HostHandle(fh={self.fh!r}, node={self.node!r}, fd={self.fd!r}, is_dir={self.is_dir!r}, "
                f"writable={self.writable!r}, nowait_read={self.nowait_read!r}, "
                f"inline_write={self.inline_write!r}, pins={self.pins!r}, closed={self.closed!r}, "
                f"dir_pos={self.dir_pos!r}, dir_read_from={self.dir_read_from!r})")


cdef inline int _dict_discard(dict d, object key) except -1:
    """``d.pop(key, None)`` without the method call."""
    if PyDict_GetItem(d, key) != NULL:
        del d[key]
    return 0


cdef inline HostInode _new_inode(uint64_t nodeid, tuple key, int kind, int fd):
    """``HostInode(nodeid, key, kind, fd)`` without the call's argument parsing."""
    cdef HostInode node = HostInode.__new__(HostInode)
    node.nodeid = nodeid
    node.key = key
    node.kind = kind
    node.fd = fd
    node.mount_fd = -1
    return node


cdef class InlineGate:
    """See :class:`virtiofs_async.responder.InlineGate`."""

    cdef object _attr
    cdef object _logger
    cdef object _level
    # the logger's own isEnabledFor cache (CPython's logging keeps one per
    # logger, cleared in place whenever a level changes), or None
    cdef dict _cache

    def __init__(self, str attr, logger, int level=_logging.DEBUG):
        self._attr = attr
        self._logger = logger
        self._level = level
        cache = getattr(logger, "_cache", None)
        self._cache = cache if type(cache) is dict else None

    def __get__(self, obj, objtype):
        cdef PyObject *known
        if obj is None:
            return self
        value = getattr(obj, self._attr)
        if value is None:
            return None
        # isEnabledFor's answer without its Python frame where the logger
        # has it cached (a disabled logger is never enabled: asked, not cached)
        if self._cache is not None and not self._logger.disabled:
            known = PyDict_GetItem(self._cache, self._level)
            if known != NULL:
                return None if <object>known else value
        return None if self._logger.isEnabledFor(self._level) else value

    def __set__(self, obj, value):
        raise AttributeError("inline_responder is read-only (the session sets what it gives)")


@cython.final
cdef class PassthroughResponder:
    """See :class:`virtiofs_async.responder.PassthroughResponder`."""

    cdef dict _inodes
    cdef dict _by_key
    cdef dict _handles
    cdef uint64_t _entry_valid, _attr_valid
    cdef uint32_t _entry_nsec, _attr_nsec
    cdef bint _announce_submounts, _lookups
    cdef uint32_t _read_max, _write_max
    cdef object _adopt, _drop, _flush, _release, _readdir_cb, _create_cb, _setattr_cb, _remove_cb, _open_cb
    cdef object _readdirplus_cb, _mkdir_cb
    cdef int _proc_fd
    cdef object _created_cb, _create_gate, _handles_owner
    cdef uint32_t _create_allowed
    cdef bint _create_host_ok, _create_switching, _create_umask
    cdef object _rd_gate, _rd_remapped, _rd_root, _rd_record_cls
    cdef Py_ssize_t _rd_read_min, _rd_ahead, _rd_plus_min
    cdef bint _readdir_host_ok
    cdef dict _tb_remapped
    cdef object _tb_root, _tb_inode_cls
    cdef uint64_t _tb_first_synthetic
    cdef bint _tables_ok
    cdef object _close_gate
    cdef uint64_t _fast_drop_bytes
    cdef bint _remove_host_ok

    def __init__(self, dict inodes, dict by_key, entry_timeout, attr_timeout, announce_submounts, lookups,
                 dict handles=None, read_max=0, write_max=0, adopt=None, drop=None, flush=None, release=None,
                 readdir=None, create=None, setattr=None, remove=None, open=None, readdirplus=None, mkdir=None,
                 int proc_fd=-1, create_host=None, readdir_host=None, tables=None, close_host=None,
                 remove_host=None):
        self._proc_fd = proc_fd
        # close_host: the backend's gate for an inode's filesystem (with tables and the handles)
        self._close_gate = close_host if tables is not None and adopt is not None and drop is not None \
            and handles is not None and flush is not None and release is not None else None
        # tables: (remapped, root, inode class, first synthetic node id)
        self._tables_ok = tables is not None and adopt is not None and drop is not None
        if self._tables_ok:
            self._tb_remapped, self._tb_root, self._tb_inode_cls, self._tb_first_synthetic = tables
            if self._tb_inode_cls is not HostInode:
                # it installs compiled records: a table of others must not get them
                raise TypeError(f"the compiled responder's tables hold HostInode records, not "
                                f"{self._tb_inode_cls!r}")
        # readdir_host: (gate, remapped, root, read_min, ahead, plus_min, record class), with the handles
        self._readdir_host_ok = readdir_host is not None and readdir is not None and handles is not None
        if self._readdir_host_ok:
            (self._rd_gate, self._rd_remapped, self._rd_root, self._rd_read_min, self._rd_ahead, self._rd_plus_min,
             self._rd_record_cls) = readdir_host
        # remove_host: the largest file whose last link goes inline (with readdir_host's gate)
        self._remove_host_ok = remove_host is not None and remove is not None and self._readdir_host_ok
        if self._remove_host_ok:
            self._fast_drop_bytes = remove_host
        # create_host: (created, allowed, switching, handles_umask, gate, the backend: its handle
        # counter, table and policies, for _install_handle)
        self._create_host_ok = create_host is not None and create is not None and proc_fd >= 0
        if self._create_host_ok:
            self._created_cb, allowed, switching, handles_umask, self._create_gate, self._handles_owner = create_host
            self._create_allowed = allowed
            self._create_switching = bool(switching)
            self._create_umask = bool(handles_umask)
        self._readdirplus_cb = readdirplus
        self._mkdir_cb = mkdir
        self._remove_cb = remove
        self._open_cb = open
        self._readdir_cb = readdir
        self._setattr_cb = setattr
        self._create_cb = create
        self._flush = flush
        self._release = release
        self._adopt = adopt
        self._drop = drop
        self._inodes = inodes
        self._by_key = by_key
        self._handles = handles if handles is not None else {}
        self._read_max = min(max(read_max, 0), 0xFFFFFFFF)
        self._write_max = min(max(write_max, 0), 0xFFFFFFFF)
        self._entry_valid, self._entry_nsec = split_timeout(entry_timeout)
        self._attr_valid, self._attr_nsec = split_timeout(attr_timeout)
        self._announce_submounts = bool(announce_submounts)
        self._lookups = bool(lookups)

    @property
    def c_responder(self):
        """The capsule of the C function VirtQueue.pop_serving calls."""
        return _CAPSULE

    def respond(self, request, Py_ssize_t room):
        """As the pure twin's: the reply bytes, or None."""
        cdef const unsigned char[::1] req = request
        cdef unsigned char reply[VFA_RESPONDER_REPLY_MAX]
        cdef Py_ssize_t n
        if room > VFA_RESPONDER_REPLY_MAX:
            room = VFA_RESPONDER_REPLY_MAX
        if room < 0 or req.shape[0] < IN_HEADER:
            return None
        if vfa_ld32(&req[0] + 4) == OP_READDIR or vfa_ld32(&req[0] + 4) == OP_READDIRPLUS:
            body = self._readdir_body(&req[0], req.shape[0], room)
            if body is None:
                return None
            _store_out_header(reply, <uint32_t>(OUT_HEADER + PyBytes_GET_SIZE(body)), 0, vfa_ld64(&req[0] + 8))
            return PyBytes_FromStringAndSize(<char *>reply, OUT_HEADER) + body
        n = self._answer(&req[0], req.shape[0], reply, room)
        if n < 0:
            return None
        return PyBytes_FromStringAndSize(<char *>reply, n)

    cdef Py_ssize_t _answer(self, const unsigned char *request, Py_ssize_t n, unsigned char *reply,
                            Py_ssize_t room) except? -2:
        cdef uint32_t length, opcode
        cdef uint64_t unique, nodeid
        if n < IN_HEADER:
            return -1
        length = vfa_ld32(request)
        opcode = vfa_ld32(request + 4)
        unique = vfa_ld64(request + 8)
        nodeid = vfa_ld64(request + 16)
        if vfa_ld16(request + 36) != 0 or length > n:  # total_extlen
            return -1
        if opcode == OP_GETATTR:
            return self._getattr(unique, nodeid, length, reply, room)
        if opcode == OP_LOOKUP and self._lookups:
            return self._lookup(unique, nodeid, request + IN_HEADER, <Py_ssize_t>length - IN_HEADER, reply, room)
        if opcode == OP_FORGET and self._drop is not None:
            return self._forget(nodeid, request + IN_HEADER, <Py_ssize_t>length - IN_HEADER)
        if opcode == OP_FLUSH or opcode == OP_RELEASE or opcode == OP_RELEASEDIR:
            return self._close(opcode, unique, request + IN_HEADER, <Py_ssize_t>length - IN_HEADER, reply, room)
        if opcode == OP_SETATTR and self._setattr_cb is not None:
            return self._setattr(request, <Py_ssize_t>length - IN_HEADER, reply, room)
        if opcode == OP_CREATE and self._create_cb is not None:
            return self._create(request, <Py_ssize_t>length - IN_HEADER, reply, room)
        if (opcode == OP_UNLINK or opcode == OP_RMDIR) and self._remove_cb is not None:
            # body: the name and its NUL, nothing else (the codec's framing rule)
            if (length < IN_HEADER + 2 or request[length - 1] != 0 or room < OUT_HEADER
                    or not _component(request + IN_HEADER, <Py_ssize_t>length - IN_HEADER - 1)):
                return -1
            if self._remove_host_ok:
                r = self._remove_host(nodeid, <const char *>(request + IN_HEADER), opcode == OP_RMDIR)
            else:
                r = self._remove_cb(nodeid, PyBytes_FromStringAndSize(<const char *>(request + IN_HEADER),
                                                                      <Py_ssize_t>length - IN_HEADER - 1),
                                    opcode == OP_RMDIR)
            return _callback_reply(r, unique, 0, reply)
        if (opcode == OP_OPEN or opcode == OP_OPENDIR) and self._open_cb is not None:
            if length < IN_HEADER + OPEN_IN or room < OUT_HEADER + OPEN_OUT:
                return -1
            r = self._open_cb(nodeid, vfa_ld32(request + IN_HEADER), opcode == OP_OPENDIR)
            return _callback_reply(r, unique, OPEN_OUT, reply)
        if opcode == OP_MKDIR and self._mkdir_cb is not None:
            # body: fuse_mkdir_in, then the name and its NUL
            if (length < IN_HEADER + MKDIR_IN + 2 or request[length - 1] != 0 or room < OUT_HEADER + ENTRY_OUT
                    or not _component(request + IN_HEADER + MKDIR_IN, <Py_ssize_t>length - IN_HEADER - MKDIR_IN - 1)):
                return -1
            r = self._mkdir_cb(nodeid, PyBytes_FromStringAndSize(<const char *>(request + IN_HEADER + MKDIR_IN),
                                                                 <Py_ssize_t>length - IN_HEADER - MKDIR_IN - 1),
                               vfa_ld32(request + IN_HEADER), vfa_ld32(request + IN_HEADER + 4),
                               vfa_ld32(request + 24), vfa_ld32(request + 28), vfa_ld32(request + 32))
            return _callback_reply(r, unique, ENTRY_OUT, reply)
        return -1

    cdef object _remove_host(self, uint64_t parent_id, const char *name, bint is_dir):
        """UNLINK / RMDIR of ``name`` (a checked component, NUL-terminated)
        as the backend's ``remove`` callback (``_remove_inline``) makes it:
        None, nothing done, for an unknown parent, one that is not a
        directory with an O_PATH fd, one ``gate`` keeps off this thread, or
        the last link of a regular file larger than ``remove_host`` bytes
        that no inode of the tables holds open (freeing its blocks goes to
        the pool); else unlinkat(2) relative to the parent's fd: 0 or its
        errno."""
        cdef PyObject *found = PyDict_GetItem(self._inodes, parent_id)
        cdef struct_stat st
        cdef int pfd
        cdef HostInode parent
        if found == NULL:
            return None
        parent = <HostInode?><object>found
        if parent.kind != S_IFDIR_BITS or parent.fd < 0 or not self._rd_gate(parent):
            return None
        pfd = parent.fd
        if (fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) == 0 and S_ISREG(st.st_mode) and st.st_nlink <= 1
                and <uint64_t>st.st_blocks * 512 > self._fast_drop_bytes):
            found = PyDict_GetItem(self._by_key, (<unsigned long long>st.st_dev, <unsigned long long>st.st_ino))
            if found == NULL or (<HostInode?><object>found).fd < 0 or (<HostInode>found).gone:
                return None
        if unlinkat(pfd, name, AT_REMOVEDIR if is_dir else 0) != 0:
            return _host_errno("RMDIR" if is_dir else "UNLINK", parent_id, errno)
        return 0

    cdef Py_ssize_t _setattr(self, const unsigned char *request, Py_ssize_t blen, unsigned char *reply,
                             Py_ssize_t room) except? -2:
        """SETATTR: made here (``_setattr_host``) where it can be, else
        through the backend's ``setattr`` callback: its fuse_attr_out after
        a header, a header with its errno, or -1."""
        cdef uint64_t unique = vfa_ld64(request + 8)
        cdef Py_ssize_t n
        if blen < SETATTR_IN or room < OUT_HEADER + ATTR_OUT:
            return -1
        if self._proc_fd >= 0:
            n = self._setattr_host(request, reply)
            if n >= 0:
                return n
        r = self._setattr_cb(vfa_ld64(request + 16),
                             PyBytes_FromStringAndSize(<const char *>(request + IN_HEADER), SETATTR_IN),
                             vfa_ld32(request + 24), vfa_ld32(request + 28), vfa_ld32(request + 32))
        return _callback_reply(r, unique, ATTR_OUT, reply)

    cdef Py_ssize_t _setattr_host(self, const unsigned char *request, unsigned char *reply) except? -2:
        """The host calls the backend's ``_w_setattr`` makes for a SETATTR
        without FATTR_SIZE of an inode that has an O_PATH fd, in its order
        (chmod, chown, utimensat through /proc/self/fd, then fstat, then
        the suid/sgid drop FATTR_KILL_SUIDGID asks on a regular file), and
        the reply; -1, with nothing done, for anything else (the callback
        decides). A failing call's errno is the answer (what changed before
        stays changed, as in the callback)."""
        cdef const unsigned char *b = request + IN_HEADER
        cdef uint32_t valid = vfa_ld32(b)
        cdef uint64_t nodeid = vfa_ld64(request + 16)
        cdef PyObject *found
        cdef HostInode node = None
        cdef int fd, kind, i, err = 0
        cdef uint32_t mode, new
        cdef int64_t sec
        cdef timespec times[2]
        cdef struct_stat st
        cdef char name[24]
        if valid & FATTR_SIZE:
            return -1  # truncation: the pool
        if valid & FATTR_FH:
            found = PyDict_GetItem(self._handles, vfa_ld64(b + 8))
            if found != NULL and (<HostHandle?><object>found).node.nodeid == nodeid:
                node = (<HostHandle>found).node
        if node is None:
            found = PyDict_GetItem(self._inodes, nodeid)
            if found == NULL:
                return -1
            node = <HostInode?><object>found
        fd = node.fd
        kind = node.kind
        if fd < 0 or (valid & FATTR_MODE and kind == S_IFLNK_BITS):
            return -1
        # the times as the callback computes them: signed seconds plus
        # nanoseconds, normalized (nanoseconds may exceed a second)
        for i in range(2):
            if valid & (FATTR_ATIME_NOW if i == 0 else FATTR_MTIME_NOW):
                times[i].tv_sec = 0
                times[i].tv_nsec = UTIME_NOW
            elif valid & (FATTR_ATIME if i == 0 else FATTR_MTIME):
                sec = <int64_t>vfa_ld64(b + 32 + 8 * i)
                if sec > 0x7FFFFFFFFFFFFFF0:
                    return -1
                times[i].tv_sec = sec + vfa_ld32(b + 56 + 4 * i) // NS
                times[i].tv_nsec = vfa_ld32(b + 56 + 4 * i) % NS
            else:
                times[i].tv_sec = 0
                times[i].tv_nsec = UTIME_OMIT
        snprintf(name, sizeof(name), b"%d", fd)
        if valid & FATTR_MODE and fchmodat(self._proc_fd, name, vfa_ld32(b + 68) & 0o7777, 0) != 0:
            err = errno
        elif (valid & (FATTR_UID | FATTR_GID)
              and fchownat(self._proc_fd, name, vfa_ld32(b + 76) if valid & FATTR_UID else <unsigned int>-1,
                           vfa_ld32(b + 80) if valid & FATTR_GID else <unsigned int>-1, 0) != 0):
            err = errno
        elif (valid & (FATTR_ATIME | FATTR_MTIME | FATTR_ATIME_NOW | FATTR_MTIME_NOW)
              and utimensat(self._proc_fd, name, times, 0) != 0):
            err = errno
        elif fstat(fd, &st) != 0:
            err = errno
        elif kind == S_IFREG_BITS and valid & FATTR_KILL_SUIDGID:
            mode = <uint32_t>st.st_mode
            new = mode & ~(<uint32_t>S_ISUID)
            if new & (S_ISGID | S_IXGRP) == (S_ISGID | S_IXGRP):
                new &= ~(<uint32_t>S_ISGID)
            if new != mode and (fchmodat(self._proc_fd, name, new & 0o7777, 0) != 0 or fstat(fd, &st) != 0):
                err = errno
        if err == 0 and not _store_attr(reply + 32, nodeid, &st, 0):
            _log.error("SETATTR nodeid=%d: attributes out of the protocol's range -> EIO", nodeid)
            err = EIO
        elif err != 0:
            _log.info("SETATTR nodeid=%d -> %s", nodeid, _errno_name(err))
        if err != 0:
            _store_out_header(reply, OUT_HEADER, -err, vfa_ld64(request + 8))
            return OUT_HEADER
        return self._attr_reply_head(reply, vfa_ld64(request + 8))

    cdef Py_ssize_t _create(self, const unsigned char *request, Py_ssize_t blen, unsigned char *reply,
                            Py_ssize_t room) except? -2:
        """CREATE (fuse_create_in, then the name and its NUL) through the
        backend's ``create`` callback: its body after a header, a header
        with its errno, or -1 when it declines."""
        cdef const unsigned char *body = request + IN_HEADER
        cdef Py_ssize_t nlen = blen - CREATE_IN - 1
        cdef const unsigned char *name = body + CREATE_IN
        cdef uint64_t unique = vfa_ld64(request + 8)
        cdef Py_ssize_t n
        if nlen < 1 or body[blen - 1] != 0 or room < OUT_HEADER + CREATE_BODY or not _component(name, nlen):
            return -1
        if self._create_host_ok:
            n = self._create_host(request, name, reply)
            if n >= 0:
                return n
        r = self._create_cb(vfa_ld64(request + 16), PyBytes_FromStringAndSize(<const char *>name, nlen),
                            vfa_ld32(body + 4), vfa_ld32(body), vfa_ld32(body + 8),
                            vfa_ld32(request + 24), vfa_ld32(request + 28), vfa_ld32(request + 32))
        return _callback_reply(r, unique, CREATE_BODY, reply)

    cdef HostInode _known_dir(self, uint64_t nodeid):
        """The table's inode ``nodeid`` if it is a directory with an fd, else None."""
        cdef PyObject *found = PyDict_GetItem(self._inodes, nodeid)
        cdef HostInode node
        if found == NULL:
            return None
        node = <HostInode?><object>found
        if node.kind != S_IFDIR_BITS or node.fd < 0:
            return None
        return node

    cdef Py_ssize_t _attr_reply_head(self, unsigned char *reply, uint64_t unique) noexcept:
        """An ATTR reply's header and fuse_attr_out fields before its
        fuse_attr (stored at ``reply + 32``); the reply's length."""
        _store_out_header(reply, ATTR_REPLY, 0, unique)
        vfa_st64(reply + 16, self._attr_valid)
        vfa_st32(reply + 24, self._attr_nsec)
        vfa_st32(reply + 28, 0)
        return ATTR_REPLY

    cdef void _store_entry_head(self, unsigned char *p, uint64_t nodeid) noexcept:
        """The fuse_entry_out fields before its fuse_attr (node id,
        generation 0, the timeouts) at ``p``."""
        vfa_st64(p, nodeid)
        vfa_st64(p + 8, 0)  # generation
        vfa_st64(p + 16, self._entry_valid)
        vfa_st64(p + 24, self._attr_valid)
        vfa_st32(p + 32, self._entry_nsec)
        vfa_st32(p + 36, self._attr_nsec)

    cdef Py_ssize_t _create_host(self, const unsigned char *request, const unsigned char *name,
                                 unsigned char *reply) except? -2:
        """CREATE as the backend's ``_w_create`` makes it, where it runs as
        the daemon (a root caller, or no credential switching) in a known
        directory where the backend's ``gate`` lets it run here (a
        writable share, a block-device filesystem, a thread with a umask
        of its own): open(name, O_CREAT|O_EXCL|O_NOFOLLOW) relative
        to the parent's fd with the request's umask (0 unless the backend
        handles the umask), fstat, an O_PATH fd of the new file through
        /proc/self/fd, then the inode and the handle installed as its full
        path installs them (with the tables, here: ``_adopt_node`` and
        ``_install_handle``; else the backend's ``created`` callback); the
        reply. -1, with
        nothing done, for anything else, and for an existing name without
        O_EXCL (the callback opens it). A failing call's errno is the
        answer, logged as the callback logs it."""
        cdef const unsigned char *body = request + IN_HEADER
        cdef uint64_t unique = vfa_ld64(request + 8), parent_id = vfa_ld64(request + 16)
        cdef uint32_t flags = vfa_ld32(body), oflags
        cdef int pfd, fd, opath, err = 0
        cdef unsigned int old_mask
        cdef struct_stat st
        cdef char fdname[24]
        cdef HostInode parent, node
        if self._create_switching and (vfa_ld32(request + 24) != 0 or vfa_ld32(request + 28) != 0):
            return -1  # runs as the caller: the callback switches credentials
        parent = self._known_dir(parent_id)
        if parent is None or not self._create_gate(parent):
            return -1
        pfd = parent.fd
        oflags = flags & self._create_allowed
        old_mask = umask(vfa_ld32(body + 8) if self._create_umask else 0)
        fd = openat(pfd, <const char *>name, <int>(oflags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC),
                    vfa_ld32(body + 4) & 0o7777)
        if fd < 0:
            err = errno
        umask(old_mask)
        if fd < 0:
            if err == EEXIST and not flags & O_EXCL:
                return -1
            return self._create_error(unique, parent_id, err, reply)
        if fstat(fd, &st) != 0:
            err = errno
            close(fd)
            return self._create_error(unique, parent_id, err, reply)
        snprintf(fdname, sizeof(fdname), b"%d", fd)
        opath = openat(self._proc_fd, fdname, O_PATH | O_CLOEXEC)
        if opath < 0:
            err = errno
            close(fd)
            return self._create_error(unique, parent_id, err, reply)
        try:
            if self._tables_ok:
                # ``created`` as it is made: the inode installed (here, where
                # that is plain), one lookup counted, then the handle
                try:
                    node = self._adopt_node(opath, <unsigned long long>st.st_dev, <unsigned long long>st.st_ino,
                                            st.st_mode)
                except BaseException:
                    close(opath)
                    raise
                node.lookups += 1
                nid = node.nodeid
                fh, open_flags = self._install_handle(node, fd, oflags)
            else:
                nid, fh, open_flags = self._created_cb(opath, <unsigned long long>st.st_dev,
                                                       <unsigned long long>st.st_ino, st.st_mode, fd, oflags)
        except Exception:
            close(fd)
            _log.exception("CREATE nodeid=%d: installing the new inode failed -> EIO", parent_id)
            _store_out_header(reply, OUT_HEADER, -EIO, unique)
            return OUT_HEADER
        if not _store_attr(reply + 56, nid, &st, 0):
            _log.error("CREATE nodeid=%d: attributes out of the protocol's range -> EIO", parent_id)
            _store_out_header(reply, OUT_HEADER, -EIO, unique)
            return OUT_HEADER
        _store_out_header(reply, OUT_HEADER + CREATE_BODY, 0, unique)
        self._store_entry_head(reply + OUT_HEADER, nid)
        vfa_st64(reply + 144, fh)
        vfa_st32(reply + 152, open_flags)
        vfa_st32(reply + 156, 0)
        return OUT_HEADER + CREATE_BODY

    cdef tuple _install_handle(self, HostInode node, int fd, uint32_t oflags):
        """The backend's ``_new_handle(node, fd, False, oflags)`` and the
        FOPEN flags of its ``FileInfo``, made here for a file this thread
        created (``fd`` consumed): the next handle number of the backend
        (``create_host``'s last item), in its handle table, reading with
        RWF_NOWAIT unless ``inline_read_max`` is 0 or the file is
        O_DIRECT, writes inline when writable, ``inline_write_max`` is not
        0 and no flag makes writes wait (its filesystem is on a block
        device: ``gate`` agreed for its directory); its inode's open count
        up; DIRECT_IO for the ``never`` and ``metadata`` policies or an
        allowed O_DIRECT, KEEP_CACHE for ``always``. ``(fh, flags)``."""
        cdef HostHandle h
        cdef uint32_t flags = 0
        cdef bint writable = (oflags & O_ACCMODE_BITS) != O_RDONLY_BITS
        owner = self._handles_owner
        fh = owner._next_fh
        owner._next_fh = fh + 1
        h = HostHandle.__new__(HostHandle)
        h.fh = fh
        h.node = node
        h.fd = fd
        h.writable = writable
        h.nowait_read = owner.inline_read_max > 0 and not (oflags & O_DIRECT_BITS)
        h.inline_write = writable and owner.inline_write_max > 0 and not (oflags & O_WAITING_WRITES)
        h.lock = _allocate_lock()
        h.dir_pos = -1
        h.dir_raw = b""
        h.dir_read_from = -1
        owner._handles[fh] = h
        node.opens += 1
        policy = owner.cache
        if policy == "never" or policy == "metadata" or (owner.allow_direct_io and oflags & O_DIRECT_BITS):
            flags |= FOPEN_DIRECT_IO
        if policy == "always":
            flags |= FOPEN_KEEP_CACHE
        return fh, flags

    cdef Py_ssize_t _create_error(self, uint64_t unique, uint64_t parent_id, int err, unsigned char *reply):
        """A failed CREATE's reply (see :func:`_host_errno`)."""
        _store_out_header(reply, OUT_HEADER, -_host_errno("CREATE", parent_id, err), unique)
        return OUT_HEADER

    cdef object _readdir_body(self, const unsigned char *request, Py_ssize_t n, Py_ssize_t room):
        """READDIR's (READDIRPLUS's) reply body from the backend's
        ``readdir`` (``readdirplus``) callback (bytes of at most the
        request's size, which fits ``room`` after the header), or None to
        decline."""
        cdef uint32_t length, size
        callback = self._readdirplus_cb if vfa_ld32(request + 4) == OP_READDIRPLUS else self._readdir_cb
        if callback is None or n < READ_LEN:
            return None
        length = vfa_ld32(request)
        if vfa_ld16(request + 36) != 0 or length > n or length < READ_LEN:
            return None
        size = vfa_ld32(request + 56)
        if size == 0 or size > self._read_max or room < OUT_HEADER + <Py_ssize_t>size:
            return None
        if self._readdir_host_ok and callback is self._readdir_cb:
            return self._readdir_host(vfa_ld64(request + 40), vfa_ld64(request + 48), size)
        if self._readdir_host_ok and self._adopt is not None:
            return self._readdirplus_host(vfa_ld64(request + 40), vfa_ld64(request + 48), size)
        body = callback(vfa_ld64(request + 40), vfa_ld64(request + 48), size)
        if body is None or not PyBytes_CheckExact(body) or PyBytes_GET_SIZE(body) > <Py_ssize_t>size:
            return None
        return body

    cdef HostHandle _dir_handle(self, uint64_t fh, uint64_t offset):
        """Directory handle ``fh`` if the callbacks would list it here (open,
        a directory, ``offset`` an off_t, ``gate`` agreeing), else None."""
        cdef PyObject *found = PyDict_GetItem(self._handles, fh)
        cdef HostHandle h
        if found == NULL or offset > OFF_MAX:
            return None
        h = <HostHandle?><object>found
        if not h.is_dir or h.closed or not self._rd_gate(h.node):
            return None
        return h

    cdef object _readdir_host(self, uint64_t fh, uint64_t offset, uint32_t size):
        """READDIR as the backend's ``readdir`` callback (``_readdir_inline``)
        makes it, without its Python frames: the same handle checks and
        ``gate``, the same host reads (``_getdents_locked``: the rest of the
        handle's last getdents64 result, found from its hint or by a scan,
        else one getdents64, seeking only when the fd is elsewhere) and the
        same records (``pack_raw_dirents`` with the ``remapped`` table), the
        handle's ``dir_*`` state left as the callback leaves it. The body,
        or None for the full path (which also answers the errors)."""
        cdef Py_ssize_t remaining = size, start, end, count
        cdef uint64_t dotdot
        cdef int64_t pos = <int64_t>offset, last
        cdef HostHandle h
        cdef HostInode node
        h = self._dir_handle(fh, offset)
        if h is None:
            return None
        node = h.node
        dotdot = ROOT_ID if node is self._rd_root else 0
        dev = node.key[0]
        nid = node.nodeid
        parts = []
        try:
            while True:
                raw, start = self._getdents_locked(h, pos, max(self._rd_read_min, remaining * self._rd_ahead))
                end = PyBytes_GET_SIZE(raw)
                if start >= end:
                    break
                last = -1
                while start < end:
                    records, start, count, last = _cy_pack_raw_dirents(raw, start, remaining, self._rd_remapped,
                                                                       dev, nid, dotdot)
                    if count == 0:
                        return b"".join(parts)  # full (a later request finds its cookie in ``raw``)
                    parts.append(records)
                    remaining -= PyBytes_GET_SIZE(records)
                    h.dir_hint = (raw, start, last)
                pos = last
        except (OSError, ValueError):
            h.dir_pos = -1  # where the fd is: unknown (the full path seeks)
            return None
        return b"".join(parts)

    cdef object _readdirplus_host(self, uint64_t fh, uint64_t offset, uint32_t size):
        """READDIRPLUS as the backend's ``readdirplus`` callback
        (``_readdir_inline`` with ``plus``) makes it, without its Python
        frames: the checks and host reads of :meth:`_readdir_host` (a
        getdents64 of a quarter of the room, at least ``plus_min`` bytes),
        the records and lookups of :meth:`pack_readdirplus` (this
        responder's timeouts: the backend's at its making); on a failure
        every lookup counted is given back. The body, or None for the full
        path."""
        cdef Py_ssize_t remaining = size, start, end, i, j, total
        cdef uint64_t dotdot
        cdef int64_t pos = <int64_t>offset
        cdef HostHandle h
        cdef HostInode node
        h = self._dir_handle(fh, offset)
        if h is None:
            return None
        node = h.node
        dotdot = ROOT_ID if node is self._rd_root else 0
        nid = node.nodeid
        parts = []
        taken = []
        try:
            while True:
                raw, start = self._getdents_locked(h, pos, max(self._rd_plus_min, remaining // 4))
                end = PyBytes_GET_SIZE(raw)
                if start >= end:
                    break
                try:
                    batch = _cy_parse_linux_dirents64(memoryview(raw)[start:], end - start, self._rd_record_cls)
                except ValueError as exc:
                    raise OSError(EIO, f"corrupt getdents64 result: {exc}") from None
                total = len(batch)
                i = 0
                while i < total:
                    counted = []
                    try:
                        records, j = self.pack_readdirplus(h.fd, node, batch, i, remaining, nid, dotdot, counted)
                    except BaseException:
                        self._give_back(counted)
                        raise
                    if counted:
                        parts.append(records)
                        remaining -= PyBytes_GET_SIZE(records)
                        taken += counted
                    if j == i:
                        return b"".join(parts)  # the next one does not fit
                    i = j
                pos = batch[total - 1][1]
        except (OSError, ValueError):
            self._give_back(taken)
            h.dir_pos = -1  # where the fd is: unknown (the full path seeks)
            return None
        return b"".join(parts)

    cdef _give_back(self, list counted):
        """The backend's ``_give_back``: one lookup less for each counted
        inode (None: ``.``/``..``), dropped when that was its last."""
        cdef HostInode child
        for obj in counted:
            if obj is not None:
                child = <HostInode?>obj
                child.lookups -= 1
                self._drop_node(child)

    cdef tuple _getdents_locked(self, HostHandle h, int64_t offset, Py_ssize_t bufsize):
        """The backend's ``_getdents_locked``: ``(raw, start)``."""
        cdef Py_ssize_t start
        with h.lock:
            raw = h.dir_raw
            if offset and PyBytes_GET_SIZE(raw):
                if offset == h.dir_read_from:
                    return raw, 0
                hint = h.dir_hint
                if hint is not None and (<tuple>hint)[0] is raw and (<tuple>hint)[2] == offset:
                    start = (<tuple>hint)[1]
                else:
                    start = _cy_scan_raw_dirents(raw, offset)[0]
                if 0 <= start < PyBytes_GET_SIZE(raw):
                    return raw, start
            raw = getdents_raw(h.fd, None if offset == h.dir_pos and offset else offset, bufsize)
            try:
                last = _cy_scan_raw_dirents(raw, -1)[1]
            except ValueError as exc:
                h.dir_pos = -1
                raise OSError(EIO, f"corrupt getdents64 result: {exc}") from None
            h.dir_raw = raw
            h.dir_read_from = offset
            h.dir_hint = None
            h.dir_pos = last if PyBytes_GET_SIZE(raw) else offset
            return raw, 0

    cdef Py_ssize_t _readdir(self, const unsigned char *request, Py_ssize_t n, const iovec *reply, int count,
                             Py_ssize_t room) except? -2:
        """READDIR answered into the guest's buffers (header, then the body)."""
        cdef iovec data[VFA_RESPONDER_IOV_MAX]
        cdef unsigned char header[OUT_HEADER]
        cdef Py_ssize_t m
        cdef int k
        body = self._readdir_body(request, n, room)
        if body is None:
            return -1
        m = PyBytes_GET_SIZE(body)
        k = _slice_iov(reply, count, OUT_HEADER, m, data)
        vfa_scatter(data, k, <const unsigned char *>PyBytes_AS_STRING(body), m)
        _store_out_header(header, <uint32_t>(OUT_HEADER + m), 0, vfa_ld64(request + 8))
        vfa_scatter(reply, count, header, OUT_HEADER)
        return OUT_HEADER + m

    cdef Py_ssize_t _close(self, uint32_t opcode, uint64_t unique, const unsigned char *body, Py_ssize_t blen,
                           unsigned char *reply, Py_ssize_t room) except? -2:
        """FLUSH (fuse_flush_in: fh, lock_owner at 16) and RELEASE(DIR)
        (fuse_release_in: fh) through the backend's callbacks: a header
        with their errno, or -1 when they decline."""
        cdef object r
        if blen < CLOSE_IN or room < OUT_HEADER:
            return -1
        if opcode == OP_FLUSH:
            if self._flush is None:
                return -1
            if self._close_gate is not None:
                r = self._flush_host(vfa_ld64(body), vfa_ld64(body + 16))
            else:
                r = self._flush(vfa_ld64(body), vfa_ld64(body + 16))
        else:
            if self._release is None:
                return -1
            if self._close_gate is not None:
                r = self._release_host(vfa_ld64(body), opcode == OP_RELEASEDIR)
            else:
                r = self._release(vfa_ld64(body), opcode == OP_RELEASEDIR)
        if r < 0:
            return -1
        _store_out_header(reply, OUT_HEADER, -<int>r, unique)
        return OUT_HEADER

    cdef bint _closes_fast(self, HostHandle h) except -1:
        """The backend's ``_closes_fast(h)``: the handle's inode holds its
        O_PATH fd, is not gone, and ``close_host`` lets its filesystem's
        calls run inline."""
        cdef HostInode node = h.node
        return node.fd >= 0 and not node.gone and bool(self._close_gate(node))

    cdef int _flush_host(self, uint64_t fh, uint64_t lock_owner) except? -2:
        """The backend's ``flush`` callback (``_flush_inline``) made here: -1
        for a handle it does not know, a lock owner with POSIX locks on the
        inode, or a file whose close may wait; else a dup of the handle's
        fd closed, and 0 or that close's errno."""
        cdef PyObject *found = PyDict_GetItem(self._handles, fh)
        cdef int fd, err = 0
        cdef HostHandle h
        cdef HostInode node
        if found == NULL:
            return -1
        h = <HostHandle?><object>found
        node = h.node
        if (node._plocks is not None and lock_owner in node._plocks) \
                or (node._lock_pids is not None and lock_owner in node._lock_pids) or not self._closes_fast(h):
            return -1
        fd = dup(h.fd)
        if fd < 0 or close(fd) != 0:
            err = errno or EIO
        return err

    cdef int _release_host(self, uint64_t fh, bint is_dir) except? -2:
        """The backend's ``release`` callback (``_release_inline``) made
        here: 0 for an unknown handle; -1, nothing done, where the full path
        closes in the pool (the last reference to its inode, or a file
        whose close may wait); else the handle out of the table and closed,
        its inode's open count down (and the inode dropped at 0, as
        ``drop`` does), its fd closed unless a request still uses it."""
        cdef PyObject *found = PyDict_GetItem(self._handles, fh)
        cdef int fd
        cdef HostHandle h
        cdef HostInode node
        if found == NULL:
            return 0
        h = <HostHandle?><object>found
        node = h.node
        if not is_dir and h.pins == 0 and h.fd >= 0:
            if (node.opens == 1 and node.lookups <= 0 and node.pins <= 0 and node is not self._tb_root) \
                    or not self._closes_fast(h):
                return -1
        del self._handles[fh]
        h.closed = True
        node.opens -= 1
        self._drop_node(node)
        if h.pins == 0:
            fd = h.fd
            if fd >= 0:
                close(fd)  # errors ignored, as the callback's
                h.fd = -1
        return 0

    cdef HostInode _adopt_node(self, int fd, unsigned long long dev, unsigned long long ino, unsigned int mode):
        """The backend's ``adopt(fd, dev, ino, mode)`` (fd consumed), made
        here with ``tables`` where its node id is the host's inode number:
        the known inode (fd closed), else a new one of the backend's inode
        class, in ``inodes`` and ``by_key`` (and out of ``remapped``), with
        no lookups counted. A synthetic node id, or no ``tables``: the
        callback."""
        cdef PyObject *found
        cdef HostInode node
        key = (dev, ino)
        found = PyDict_GetItem(self._by_key, key)
        if found != NULL:
            close(fd)
            return <HostInode?><object>found
        if not self._tables_ok or ino <= ROOT_ID or ino >= self._tb_first_synthetic \
                or PyDict_GetItem(self._inodes, ino) != NULL:
            return <HostInode?>self._adopt(fd, dev, ino, mode)
        node = _new_inode(ino, key, mode & S_IFMT_BITS, fd)
        self._inodes[ino] = node
        self._by_key[key] = node
        if self._tb_remapped:
            _dict_discard(self._tb_remapped, key)
        return node

    cdef _drop_node(self, HostInode node):
        """The backend's ``drop(node)``, made here with ``tables`` for an
        inode that holds no POSIX lock fds: nothing when it is still
        counted, opened or pinned, the root, or gone already; else marked
        gone, out of ``inodes``, ``by_key`` and ``remapped`` (where it is
        the one there), its O_PATH fd closed. Otherwise: the callback."""
        cdef PyObject *found
        cdef int fd
        if not self._tables_ok or node.holds_locks():
            self._drop(node)
            return
        if node.lookups > 0 or node.opens > 0 or node.pins > 0 or node is self._tb_root or node.gone:
            return
        node.gone = True
        nodeid = node.nodeid
        found = PyDict_GetItem(self._inodes, nodeid)
        if found != NULL and found == <PyObject *>node:
            del self._inodes[nodeid]
        key = node.key
        found = PyDict_GetItem(self._by_key, key)
        if found != NULL and found == <PyObject *>node:
            del self._by_key[key]
            if self._tb_remapped:
                _dict_discard(self._tb_remapped, key)
        fd = node.fd
        if fd >= 0:
            close(fd)  # errors ignored, as the callback's
            node.fd = -1

    cdef Py_ssize_t _forget(self, uint64_t nodeid, const unsigned char *body, Py_ssize_t blen) except? -2:
        cdef PyObject *found
        cdef uint64_t n
        cdef HostInode node
        if blen < 8 or nodeid == ROOT_ID:
            return -1
        n = vfa_ld64(body)
        found = PyDict_GetItem(self._inodes, nodeid)
        if found == NULL or n == 0:
            return 0  # the full path ignores it too
        node = <HostInode?><object>found
        if node.lookups <= 0 or <uint64_t>node.lookups <= n:
            node.lookups = 0
            try:
                self._drop_node(node)
            except Exception:
                # Answered all the same: the count is already down, and the
                # full path must not take it down again.
                _log.exception("dropping inode %d after FORGET failed", nodeid)
        else:
            node.lookups -= <long long>n
        return 0

    cdef Py_ssize_t _getattr(self, uint64_t unique, uint64_t nodeid, uint32_t length, unsigned char *reply,
                             Py_ssize_t room) except? -2:
        cdef struct_stat st
        cdef PyObject *found
        cdef int fd
        if length < GETATTR_LEN or room < ATTR_REPLY:
            return -1
        found = PyDict_GetItem(self._inodes, nodeid)
        if found == NULL:
            return -1
        fd = (<HostInode?><object>found).fd
        if fd < 0 or fstat(fd, &st) != 0:
            return -1
        if not _store_attr(reply + 32, nodeid, &st, 0):
            return -1
        return self._attr_reply_head(reply, unique)

    cdef Py_ssize_t _lookup(self, uint64_t unique, uint64_t parent_id, const unsigned char *body, Py_ssize_t blen,
                            unsigned char *reply, Py_ssize_t room) except? -2:
        cdef char name[NAME_MAX + 1]
        cdef Py_ssize_t nlen = blen - 1
        cdef struct_stat st
        cdef PyObject *found
        cdef int pfd
        cdef uint64_t parent_dev, nid
        cdef uint32_t flags = 0
        cdef HostInode parent, node
        if blen < 2 or body[nlen] != 0 or not _component(body, nlen):
            return -1
        parent = self._known_dir(parent_id)
        if parent is None:
            return -1
        pfd = parent.fd
        memcpy(name, body, blen)  # with its NUL
        if fstatat(pfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0:
            if errno == ENOENT and room >= OUT_HEADER:
                _store_out_header(reply, OUT_HEADER, -ENOENT, unique)
                return OUT_HEADER
            return -1
        if room < ENTRY_REPLY:
            return -1
        found = PyDict_GetItem(self._by_key, (<unsigned long long>st.st_dev, <unsigned long long>st.st_ino))
        if found == NULL:
            if self._adopt is None:
                return -1
            node = self._open_new(pfd, name, &st)
            if node is None:
                return -1
        else:
            node = <HostInode?><object>found
        if self._announce_submounts and S_ISDIR(st.st_mode):
            parent_dev = parent.key[0]
            if <uint64_t>st.st_dev != parent_dev:
                flags = ATTR_SUBMOUNT
        nid = node.nodeid
        if not _store_attr(reply + 56, nid, &st, flags):
            return -1
        _store_out_header(reply, ENTRY_REPLY, 0, unique)
        self._store_entry_head(reply + OUT_HEADER, nid)
        node.lookups += 1
        return ENTRY_REPLY

    def pack_readdirplus(self, int dirfd, parent, list batch, Py_ssize_t start, Py_ssize_t room, dot, dotdot,
                         list counted):
        """See the pure twin's :meth:`pack_readdirplus` (the contract)."""
        cdef Py_ssize_t count = PyList_GET_SIZE(batch), i, n, need, used = 0, cap = 16384
        cdef uint64_t c_dot = dot, c_dotdot = dotdot, d_ino, nid, pdev = parent.key[0]
        cdef uint32_t flags
        cdef struct_stat st
        cdef int fd
        cdef const char *cname
        cdef char cbuf[NAME_MAX + 1]
        cdef HostInode node
        cdef unsigned char *buf
        cdef unsigned char *p
        cdef PyObject *found
        if self._adopt is None:
            raise ValueError("pack_readdirplus needs an adopt callback")
        buf = <unsigned char *>PyMem_Malloc(cap)
        if buf == NULL:
            raise MemoryError()
        try:
            i = start
            while i < count:
                rec = <object>PyList_GET_ITEM(batch, i)
                if not PyTuple_Check(rec) or PyTuple_GET_SIZE(rec) != 4:
                    raise TypeError("host directory records are (d_ino, d_off, d_type, name) tuples")
                name = <object>PyTuple_GET_ITEM(rec, 3)
                if not PyBytes_CheckExact(name):
                    raise TypeError("a host directory record's name is bytes")
                n = PyBytes_GET_SIZE(name)
                need = (152 + n + 7) & ~7
                if used + need > room:
                    break
                cname = PyBytes_AS_STRING(name)
                if n == 0 or n > NAME_MAX or memchr(cname, 0x2F, n) != NULL or memchr(cname, 0, n) != NULL:
                    raise ValueError(f"invalid directory entry name {name[:64]!r}")
                d_ino = <object>PyTuple_GET_ITEM(rec, 0)
                p = vfa_reserve(&buf, &cap, used, need)
                if p == NULL:
                    raise MemoryError()
                memset(p, 0, need)
                if cname[0] == 0x2E and (n == 1 or (n == 2 and cname[1] == 0x2E)):
                    # Not counted (nodeid 0): the dirent's ino, a directory.
                    if n == 1:
                        nid = c_dot
                    elif c_dotdot:
                        nid = c_dotdot
                    else:
                        known = self._by_key.get((pdev, d_ino))
                        nid = d_ino if known is None else known.nodeid
                    vfa_st64(p + 40, nid)
                    vfa_st32(p + 40 + 60, S_IFDIR_BITS)
                    vfa_st32(p + 40 + 64, 1)      # nlink
                    vfa_st32(p + 40 + 80, 4096)   # blksize
                    counted.append(None)
                    flags = S_IFDIR_BITS >> 12
                else:
                    memcpy(cbuf, cname, n)
                    cbuf[n] = 0
                    fd = openat(dirfd, cbuf, O_PATH | O_NOFOLLOW | O_CLOEXEC)
                    if fd < 0:
                        if errno == ENOENT:
                            i += 1  # gone since getdents
                            continue
                        PyErr_SetFromErrno(OSError)
                    if fstat(fd, &st) != 0:
                        close(fd)
                        PyErr_SetFromErrno(OSError)
                    found = PyDict_GetItem(self._by_key, (<unsigned long long>st.st_dev,
                                                          <unsigned long long>st.st_ino))
                    if found != NULL:
                        close(fd)
                        node = <HostInode?><object>found
                    else:
                        try:
                            node = self._adopt_node(fd, <unsigned long long>st.st_dev,
                                                    <unsigned long long>st.st_ino, st.st_mode)
                        except BaseException:
                            close(fd)
                            raise
                    nid = node.nodeid
                    flags = 0
                    if self._announce_submounts and S_ISDIR(st.st_mode) and <uint64_t>st.st_dev != pdev:
                        flags = ATTR_SUBMOUNT
                    if not _store_attr(p + 40, nid, &st, flags):
                        raise ValueError(f"attributes of {name[:64]!r} do not fit fuse_attr")
                    vfa_st64(p, nid)
                    vfa_st64(p + 16, self._entry_valid)
                    vfa_st64(p + 24, self._attr_valid)
                    vfa_st32(p + 32, self._entry_nsec)
                    vfa_st32(p + 36, self._attr_nsec)
                    node.lookups += 1
                    counted.append(node)
                    flags = (st.st_mode & S_IFMT_BITS) >> 12
                vfa_st64(p + 128, nid)
                vfa_st64(p + 136, <uint64_t>(<object>PyTuple_GET_ITEM(rec, 1)))
                vfa_st32(p + 144, <uint32_t>n)
                vfa_st32(p + 148, flags)
                memcpy(p + 152, cname, n)
                used += need
                i += 1
            return PyBytes_FromStringAndSize(<const char *>buf, used), i
        finally:
            PyMem_Free(buf)

    cdef HostInode _open_new(self, int pfd, const char *name, struct_stat *st):
        """The inode of ``name`` in ``pfd`` that the tables do not have yet:
        an O_PATH fd of it (a single component, nothing followed: the full
        path's open_beneath), its ``fstat`` in ``st`` and the backend's
        ``adopt(fd, dev, ino, mode)``, which takes the fd into a new table
        entry (or finds the entry that has its key now). None, with nothing
        left open or changed, when a call fails."""
        cdef int fd = openat(pfd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)
        if fd < 0:
            return None
        if fstat(fd, st) != 0:
            close(fd)
            return None
        try:
            return self._adopt_node(fd, <unsigned long long>st.st_dev, <unsigned long long>st.st_ino, st.st_mode)
        except BaseException:
            close(fd)
            raise

    cdef int _handle_fd(self, uint64_t fh, bint write) except? -2:
        """The fd of open handle ``fh`` if it reads without waiting (or,
        with ``write``, writes inline), else -1. The fd stays open while
        the caller runs: RELEASE takes the handle out of the table on the
        loop's thread before it closes the fd."""
        cdef PyObject *found = PyDict_GetItem(self._handles, fh)
        cdef HostHandle h
        if found == NULL:
            return -1
        h = <HostHandle?><object>found
        if h.closed or not (h.inline_write if write else h.nowait_read):
            return -1
        return h.fd if h.fd >= 0 else -1

    cdef Py_ssize_t _read(self, const unsigned char *request, Py_ssize_t n, const iovec *reply, int count,
                          Py_ssize_t room, vfa_batch *batch) except? -2:
        """READ of a handle that reads without waiting: the whole ``size``
        from the page cache (preadv2 RWF_NOWAIT) straight into the guest's
        buffers after the header, else -1 (short, not cached, an error: the
        full path reads again and answers). Given a ``batch``, the copy of
        a READ of VFA_DEFER_MIN bytes or more is left to the walk as its next job (VFA_DEFERRED; VFA_FLUSH_FIRST
        when the batch is full), which reads it with the batch's other
        READs at once and writes the header when it succeeds."""
        cdef iovec data[VFA_RESPONDER_IOV_MAX]
        cdef unsigned char header[OUT_HEADER]
        cdef uint32_t length = vfa_ld32(request), size
        cdef uint64_t unique, fh, offset
        cdef Py_ssize_t got
        cdef int k, fd
        cdef vfa_job *job
        if vfa_ld16(request + 36) != 0 or length > n or length < READ_LEN:
            return -1
        unique = vfa_ld64(request + 8)
        fh = vfa_ld64(request + 40)
        offset = vfa_ld64(request + 48)
        size = vfa_ld32(request + 56)
        if size == 0 or size > self._read_max or offset > OFF_MAX or room < OUT_HEADER + <Py_ssize_t>size:
            return -1
        fd = self._handle_fd(fh, False)
        if fd < 0:
            return -1
        if batch != NULL and size >= VFA_DEFER_MIN:
            # header pieces (at most OUT_HEADER), data pieces and the spares
            if batch.count == VFA_BATCH_JOBS or batch.iov_used + OUT_HEADER + count + VFA_JOB_CUTS > VFA_BATCH_IOV:
                return VFA_FLUSH_FIRST if batch.count else -1
            job = &batch.jobs[batch.count]
            job.hdr_start = batch.iov_used
            job.hdr_count = _slice_iov(reply, count, 0, OUT_HEADER, batch.iov + job.hdr_start)
            job.iov_start = job.hdr_start + job.hdr_count
            job.iov_count = _slice_iov(reply, count, OUT_HEADER, size, batch.iov + job.iov_start)
            job.fd = fd
            job.flags = RWF_NOWAIT
            job.offset = <off_t>offset
            job.expect = size
            job.header_len = OUT_HEADER
            _store_out_header(job.header, OUT_HEADER + size, 0, unique)
            job.reply_len = OUT_HEADER + size
            batch.iov_used = job.iov_start + job.iov_count + VFA_JOB_CUTS
            batch.bytes += size
            batch.count += 1
            return VFA_DEFERRED
        k = _slice_iov(reply, count, OUT_HEADER, size, data)  # after the header
        with nogil:
            got = preadv2(fd, data, k, <off_t>offset, RWF_NOWAIT)
        if got != size:
            return -1
        _store_out_header(header, OUT_HEADER + size, 0, unique)
        vfa_scatter(reply, count, header, OUT_HEADER)
        return OUT_HEADER + size

    cdef Py_ssize_t _write(self, const unsigned char *request, Py_ssize_t n, const iovec *readable, int rcount,
                           Py_ssize_t readable_len, const iovec *reply, int count, Py_ssize_t room) except? -2:
        """WRITE to a handle that writes on the loop (``inline_write``): one
        pwritev from the guest's buffers, answered with what it wrote, as
        the backend's write does; -1 before anything is written when the
        full path must serve it (malformed, too large, a non-root writer
        to a file whose suid/sgid the write would drop, a failing pwritev:
        nothing was written, the full path writes again and answers)."""
        cdef iovec data[VFA_RESPONDER_IOV_MAX]
        cdef unsigned char out[WRITE_REPLY]
        cdef uint32_t length = vfa_ld32(request), size
        cdef uint64_t unique, fh, offset
        cdef Py_ssize_t got
        cdef int k, fd
        cdef struct_stat st
        if n < WRITE_LEN or vfa_ld16(request + 36) != 0 or length < WRITE_LEN or length > readable_len:
            return -1
        if room < WRITE_REPLY:
            return -1
        unique = vfa_ld64(request + 8)
        fh = vfa_ld64(request + 40)
        offset = vfa_ld64(request + 48)
        size = vfa_ld32(request + 56)
        if size == 0 or length - WRITE_LEN != size or size > self._write_max or offset > OFF_MAX:
            return -1
        fd = self._handle_fd(fh, True)
        if fd < 0:
            return -1
        if vfa_ld32(request + 24) != 0:  # uid: the backend drops suid/sgid after such a write
            if fstat(fd, &st) != 0:
                return -1
            if st.st_mode & S_ISUID or (st.st_mode & (S_ISGID | S_IXGRP)) == (S_ISGID | S_IXGRP):
                return -1
        k = _slice_iov(readable, rcount, WRITE_LEN, size, data)  # after fuse_write_in
        with nogil:
            got = pwritev(fd, data, k, <off_t>offset)
        if got < 0:
            return -1
        _store_out_header(out, WRITE_REPLY, 0, unique)
        vfa_st32(out + 16, <uint32_t>got)
        vfa_st32(out + 20, 0)
        vfa_scatter(reply, count, out, WRITE_REPLY)
        return WRITE_REPLY


cdef Py_ssize_t _respond_c(object self, const unsigned char *request, Py_ssize_t n, const iovec *readable,
                           int rcount, Py_ssize_t readable_len, const iovec *reply, int count,
                           Py_ssize_t room, vfa_batch *batch) noexcept:
    cdef unsigned char small[VFA_RESPONDER_REPLY_MAX]
    cdef Py_ssize_t r
    cdef uint32_t opcode
    if type(self) is not PassthroughResponder:
        return -1
    try:
        opcode = vfa_ld32(request + 4) if n >= IN_HEADER else 0
        if opcode == OP_READ:
            return (<PassthroughResponder>self)._read(request, n, reply, count, room, batch)
        if batch != NULL and batch.count:
            return VFA_FLUSH_FIRST  # nothing runs before the batch's copies
        if opcode == OP_WRITE:
            return (<PassthroughResponder>self)._write(request, n, readable, rcount, readable_len, reply, count,
                                                       room)
        if opcode == OP_READDIR or opcode == OP_READDIRPLUS:
            return (<PassthroughResponder>self)._readdir(request, n, reply, count, room)
        r = (<PassthroughResponder>self)._answer(request, n, small, room if room < VFA_RESPONDER_REPLY_MAX
                                                 else VFA_RESPONDER_REPLY_MAX)
    except Exception:
        return -1
    if r > 0:
        vfa_scatter(reply, count, small, r)
    return r


def getdents_raw(int fd, offset, Py_ssize_t bufsize=32768):
    """See :func:`virtiofs_async.backends._hostfs.getdents_raw` (the
    contract): one getdents64 call without ctypes. The bytes after each
    record's name are zeros (the kernel leaves them as the buffer had them):
    each record's NUL found a word at a time, the padding after it (within
    the record's last word for the kernel's records) cleared."""
    cdef long n
    cdef off_t off
    cdef char *buf
    cdef unsigned char *p
    cdef Py_ssize_t pos = 0, reclen, k
    cdef int slash = 0
    if bufsize <= 0:
        raise ValueError("bufsize must be positive")
    if offset is not None:
        off = offset
        if lseek(fd, off, 0) < 0:
            PyErr_SetFromErrno(OSError)
    buf = <char *>PyMem_Malloc(bufsize)
    if buf == NULL:
        raise MemoryError()
    try:
        with nogil:
            n = syscall(SYS_getdents64, fd, buf, <size_t>bufsize)
        if n < 0:
            PyErr_SetFromErrno(OSError)
        # zero each record's padding (linux_dirent64: d_reclen at 16, the
        # name from 19); a malformed record is left to the parsers to refuse
        p = <unsigned char *>buf
        while pos + 19 < n:
            reclen = p[pos + 16] | p[pos + 17] << 8
            if reclen < 20 or pos + reclen > n:
                break
            k = vfa_name_len(p + pos + 19, reclen - 19, n - pos - 19, &slash)
            if k < 0:
                break
            vfa_zero_span(p + pos, 20 + k, reclen)  # from the byte after the NUL
            pos += reclen
        return PyBytes_FromStringAndSize(buf, n)
    finally:
        PyMem_Free(buf)


cdef object _CAPSULE = PyCapsule_New(<void *>_respond_c, VFA_RESPONDER_CAPSULE, NULL)
