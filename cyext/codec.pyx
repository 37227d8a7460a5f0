# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of the hot functions of :mod:`virtiofs_async.codec`.

Built as ``virtiofs_async._cy_codec``: :func:`decode_request`,
:func:`encode_out_header`, :func:`pack_dirent`, :func:`pack_direntplus`,
:func:`parse_linux_dirents64` and :func:`pack_host_dirents`,
with the pure module's signatures, results (the same request and header
classes, imported from it) and errors. The pure docstrings are the contract;
``tests/unit/test_twins.py`` compares the two on random and malformed input.

How :func:`decode_request` is split:

* In C: taking the input buffers, the header (also when it straddles
  buffers), the framing checks, and the bodies of the frequent opcodes
  (LOOKUP, FORGET, GETATTR, SETATTR, READLINK, MKNOD, MKDIR, UNLINK, RMDIR,
  OPEN, READ, WRITE with zero-copy payload views, STATFS, RELEASE, FSYNC,
  GETXATTR, LISTXATTR, FLUSH, OPENDIR, READDIR, RELEASEDIR, FSYNCDIR, ACCESS,
  CREATE, INTERRUPT, DESTROY, BATCH_FORGET, FALLOCATE, READDIRPLUS, LSEEK)
  and the extension framing.
* The other opcodes: the body is gathered in C and handed to the pure
  codec's decoder for that opcode.
* Anything the C path finds malformed, and any input it does not take in
  directly (not bytes/bytearray/C-contiguous buffers), is re-parsed by the
  pure :func:`~virtiofs_async.codec.decode_request`, which raises its exact
  FuseProtocolError (or, for odd buffer types, does whatever it does). The
  reference decoder is thereby the one source of diagnostics, and the C path
  only ever returns what the reference would.

The pack functions take the C path for plain ints in range and ``bytes``
names, and call the pure functions otherwise (so they raise the same
``struct.error`` or accept the same int-likes).
"""
cimport cython
from cpython.buffer cimport (
    PyBUF_FULL_RO,
    PyBUF_RECORDS,
    PyBUF_SIMPLE,
    PyBuffer_IsContiguous,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from cpython.bytearray cimport PyByteArray_CheckExact
from cpython.float cimport PyFloat_AS_DOUBLE, PyFloat_CheckExact
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_CheckExact
from cpython.list cimport PyList_CheckExact, PyList_GET_ITEM, PyList_GET_SIZE, PyList_New, PyList_SET_ITEM
from cpython.tuple cimport PyTuple_Check, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from cpython.long cimport PyLong_CheckExact
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject, PyTypeObject, descrgetfunc, descrsetfunc
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memchr, memcpy, memmove, memset

from vfa_hotpath cimport (
    vfa_ld16, vfa_ld32, vfa_ld64, vfa_name_len, vfa_put_dirent, vfa_raw_record, vfa_reserve, vfa_st32, vfa_st64,
)

import types

import attrs

from virtiofs_async import codec as _pure
from virtiofs_async.abi.fuse import Opcode
from virtiofs_async.codec import (
    AccessRequest,
    BatchForgetRequest,
    CreateRequest,
    DestroyRequest,
    FallocateRequest,
    FlushRequest,
    ForgetRequest,
    FsyncdirRequest,
    FsyncRequest,
    GetattrRequest,
    GetxattrRequest,
    InHeader,
    InterruptRequest,
    ListxattrRequest,
    LookupRequest,
    LseekRequest,
    MkdirRequest,
    MknodRequest,
    OpendirRequest,
    OpenRequest,
    ReaddirplusRequest,
    ReaddirRequest,
    ReadlinkRequest,
    ReadRequest,
    ReleasedirRequest,
    ReleaseRequest,
    RmdirRequest,
    SetattrRequest,
    StatfsRequest,
    UnlinkRequest,
    WriteRequest,
)

__all__ = [
    "decode_request", "encode_out_header", "pack_attr", "pack_attr_out", "pack_dirent", "pack_direntplus",
    "pack_entry_out", "pack_host_dirents", "pack_raw_dirents", "record_factory", "scan_raw_dirents", "write_reply",
]

_pure_decode_request = _pure.decode_request
_pure_encode_out_header = _pure.encode_out_header
_pure_pack_dirent = _pure.pack_dirent
_pure_pack_direntplus = _pure.pack_direntplus
_pure_pack_attr = _pure.pack_attr
_pure_pack_attr_out = _pure.pack_attr_out
_pure_pack_entry_out = _pure.pack_entry_out
_pure_write_reply = _pure.write_reply
_DECODERS = _pure._DECODERS  # opcode -> (Opcode member, pure body decoder)
_dec_setxattr_ext = _pure._dec_setxattr_ext


# enum fuse_opcode values (fuse.h) this module switches on; checked against
# abi.fuse.Opcode when the module loads.
cdef enum:
    OP_LOOKUP = 1
    OP_FORGET = 2
    OP_GETATTR = 3
    OP_SETATTR = 4
    OP_READLINK = 5
    OP_MKNOD = 8
    OP_MKDIR = 9
    OP_UNLINK = 10
    OP_RMDIR = 11
    OP_OPEN = 14
    OP_READ = 15
    OP_WRITE = 16
    OP_STATFS = 17
    OP_RELEASE = 18
    OP_FSYNC = 20
    OP_SETXATTR = 21
    OP_GETXATTR = 22
    OP_LISTXATTR = 23
    OP_FLUSH = 25
    OP_OPENDIR = 27
    OP_READDIR = 28
    OP_RELEASEDIR = 29
    OP_FSYNCDIR = 30
    OP_ACCESS = 34
    OP_CREATE = 35
    OP_INTERRUPT = 36
    OP_DESTROY = 38
    OP_BATCH_FORGET = 42
    OP_FALLOCATE = 43
    OP_READDIRPLUS = 44
    OP_LSEEK = 46

    IN_HEADER_SIZE = 40
    OUT_HEADER_SIZE = 16
    ATTR_SIZE = 88
    ATTR_OUT_SIZE = 104
    ENTRY_OUT_SIZE = 128
    N_STATIC_REPLY = 16  # buffers write_reply handles without allocating
    MAX_FIXED = 96  # largest fixed argument struct read here (fuse_setattr_in: 88)
    N_STATIC_SEGS = 8

_C_OPCODES = {
    "LOOKUP": OP_LOOKUP, "FORGET": OP_FORGET, "GETATTR": OP_GETATTR, "SETATTR": OP_SETATTR,
    "READLINK": OP_READLINK, "MKNOD": OP_MKNOD, "MKDIR": OP_MKDIR, "UNLINK": OP_UNLINK, "RMDIR": OP_RMDIR,
    "OPEN": OP_OPEN, "READ": OP_READ, "WRITE": OP_WRITE, "STATFS": OP_STATFS, "RELEASE": OP_RELEASE,
    "FSYNC": OP_FSYNC, "SETXATTR": OP_SETXATTR, "GETXATTR": OP_GETXATTR, "LISTXATTR": OP_LISTXATTR,
    "FLUSH": OP_FLUSH, "OPENDIR": OP_OPENDIR, "READDIR": OP_READDIR, "RELEASEDIR": OP_RELEASEDIR,
    "FSYNCDIR": OP_FSYNCDIR, "ACCESS": OP_ACCESS, "CREATE": OP_CREATE, "INTERRUPT": OP_INTERRUPT,
    "DESTROY": OP_DESTROY, "BATCH_FORGET": OP_BATCH_FORGET, "FALLOCATE": OP_FALLOCATE,
    "READDIRPLUS": OP_READDIRPLUS, "LSEEK": OP_LSEEK,
}
for _name, _value in _C_OPCODES.items():
    if Opcode[_name] != _value:
        raise ImportError(f"_cy_codec: opcode {_name} is {int(Opcode[_name])} in abi.fuse, {_value} here")
if (_pure.IN_HEADER_SIZE, _pure.OUT_HEADER_SIZE) != (IN_HEADER_SIZE, OUT_HEADER_SIZE) or (
    _pure.abi.fuse_attr.size, _pure.abi.fuse_attr_out.size, _pure.abi.fuse_entry_out.size
) != (ATTR_SIZE, ATTR_OUT_SIZE, ENTRY_OUT_SIZE):
    raise ImportError("_cy_codec: a struct size disagrees with abi.fuse")

# Opcode members by number, for opcodes that have a request type (None elsewhere).
cdef list _OPCODE_MEMBERS = [None] * (max(_DECODERS) + 1)
for _number, (_member, _decoder) in _DECODERS.items():
    _OPCODE_MEMBERS[_number] = _member
cdef Py_ssize_t _N_OPCODE_MEMBERS = len(_OPCODE_MEMBERS)


# ---------------------------------------------------------------------------
# Building request records
# ---------------------------------------------------------------------------
#
# Calling an attrs class runs its generated Python __init__, which costs more
# than the whole C decode. For the plain classes used here (slotted, no
# validators, converters, hooks or custom __setattr__) that __init__ only
# stores each argument in its slot, so _Maker does the same stores through the
# slots' member descriptors on an instance from the class's own __new__. Each
# maker checks those conditions, and compares one instance against a normally
# constructed one, when the module loads; a class that does not qualify is
# simply called.

cdef tuple _NO_ARGS = ()


@cython.final
cdef class _Maker:
    cdef object cls
    cdef tuple descrs        # slot descriptors: the positional fields, then the defaulted ones
    cdef tuple defaults      # values of the defaulted (keyword-only) fields
    cdef Py_ssize_t nargs
    cdef descrsetfunc set_slot
    cdef bint fast

    cdef object make(self, tuple args):
        """``cls(*args)``."""
        cdef Py_ssize_t i, n = self.nargs
        if not self.fast or len(args) != n:
            return self.cls(*args)
        obj = (<PyTypeObject *>self.cls).tp_new(self.cls, <PyObject *>_NO_ARGS, NULL)
        for i in range(n):
            self.set_slot(self.descrs[i], obj, args[i])
        for i in range(len(self.defaults)):
            self.set_slot(self.descrs[n + i], obj, self.defaults[i])
        return obj

    def __call__(self, *args):
        """``cls(*args)`` (see record_factory)."""
        return self.make(args)


cdef object _slot_descriptor(cls, str name):
    for klass in cls.__mro__:
        if name in klass.__dict__:
            d = klass.__dict__[name]
            return d if type(d) is types.MemberDescriptorType else None
    return None


cdef _Maker _maker(cls):
    cdef _Maker m = _Maker.__new__(_Maker)
    fields = attrs.fields(cls)
    positional = tuple(f.name for f in fields if not f.kw_only)
    keyword = tuple(f for f in fields if f.kw_only)
    m.cls = cls
    m.nargs = len(positional)
    m.fast = False
    plain = (
        cls.__setattr__ is object.__setattr__
        and not hasattr(cls, "__attrs_pre_init__")
        and not hasattr(cls, "__attrs_post_init__")
        and all(f.init and f.validator is None and f.converter is None for f in fields)
        and all(f.default is not attrs.NOTHING and not isinstance(f.default, attrs.Factory) for f in keyword)
    )
    descrs = tuple(_slot_descriptor(cls, f.name) for f in fields if not f.kw_only) + tuple(
        _slot_descriptor(cls, f.name) for f in keyword
    )
    if not plain or any(d is None for d in descrs):
        return m
    m.descrs = descrs
    m.defaults = tuple(f.default for f in keyword)
    m.set_slot = (<PyTypeObject *>types.MemberDescriptorType).tp_descr_set
    sample = tuple(object() for _ in positional)
    expected = cls(*sample)
    m.fast = True
    try:
        got = m.make(sample)
        same = type(got) is cls and all(getattr(got, f.name) is getattr(expected, f.name) for f in fields)
    except Exception:
        same = False
    m.fast = same
    return m


cdef _Maker M_IN_HEADER = _maker(InHeader)
cdef _Maker M_GETATTR = _maker(GetattrRequest)
cdef _Maker M_LOOKUP = _maker(LookupRequest)
cdef _Maker M_UNLINK = _maker(UnlinkRequest)
cdef _Maker M_RMDIR = _maker(RmdirRequest)
cdef _Maker M_READ = _maker(ReadRequest)
cdef _Maker M_READDIR = _maker(ReaddirRequest)
cdef _Maker M_READDIRPLUS = _maker(ReaddirplusRequest)
cdef _Maker M_WRITE = _maker(WriteRequest)
cdef _Maker M_FORGET = _maker(ForgetRequest)
cdef _Maker M_INTERRUPT = _maker(InterruptRequest)
cdef _Maker M_BATCHFORGET = _maker(BatchForgetRequest)
cdef _Maker M_OPEN = _maker(OpenRequest)
cdef _Maker M_OPENDIR = _maker(OpendirRequest)
cdef _Maker M_RELEASE = _maker(ReleaseRequest)
cdef _Maker M_RELEASEDIR = _maker(ReleasedirRequest)
cdef _Maker M_FLUSH = _maker(FlushRequest)
cdef _Maker M_FSYNC = _maker(FsyncRequest)
cdef _Maker M_FSYNCDIR = _maker(FsyncdirRequest)
cdef _Maker M_SETATTR = _maker(SetattrRequest)
cdef _Maker M_CREATE = _maker(CreateRequest)
cdef _Maker M_MKNOD = _maker(MknodRequest)
cdef _Maker M_MKDIR = _maker(MkdirRequest)
cdef _Maker M_STATFS = _maker(StatfsRequest)
cdef _Maker M_READLINK = _maker(ReadlinkRequest)
cdef _Maker M_DESTROY = _maker(DestroyRequest)
cdef _Maker M_ACCESS = _maker(AccessRequest)
cdef _Maker M_LISTXATTR = _maker(ListxattrRequest)
cdef _Maker M_GETXATTR = _maker(GetxattrRequest)
cdef _Maker M_FALLOCATE = _maker(FallocateRequest)
cdef _Maker M_LSEEK = _maker(LseekRequest)


# ---------------------------------------------------------------------------
# The request's bytes: one segment per input buffer
# ---------------------------------------------------------------------------

ctypedef struct Seg:
    const unsigned char *p
    Py_ssize_t n
    bint held         # bufs[i] holds an export to release
    bint byte_shaped  # 1-D with one-byte items: the pure twin slices it without a cast

ctypedef struct Input:
    Seg *segs
    Py_buffer *bufs
    Py_ssize_t nsegs
    Py_ssize_t total


cdef void _copy(const Input *inp, Py_ssize_t a, Py_ssize_t n, unsigned char *dst) noexcept:
    """Copy bytes [a, a + n) of the concatenation (in range) to ``dst``."""
    cdef Py_ssize_t i = 0, pos = 0, off, take
    while n > 0:
        if a < pos + inp.segs[i].n:
            off = a - pos
            take = inp.segs[i].n - off
            if take > n:
                take = n
            memcpy(dst, inp.segs[i].p + off, take)
            dst += take
            a += take
            n -= take
        pos += inp.segs[i].n
        i += 1


cdef const unsigned char *_at(const Input *inp, Py_ssize_t a, Py_ssize_t n, unsigned char *scratch) noexcept:
    """Address of bytes [a, a + n) (in range, n > 0): in place when one buffer
    holds them all, else copied to ``scratch``."""
    cdef Py_ssize_t i, pos = 0
    for i in range(inp.nsegs):
        if a < pos + inp.segs[i].n:
            if a + n <= pos + inp.segs[i].n:
                return inp.segs[i].p + (a - pos)
            break
        pos += inp.segs[i].n
    _copy(inp, a, n, scratch)
    return scratch


cdef bytes _bytes(const Input *inp, Py_ssize_t a, Py_ssize_t n):
    """bytes [a, a + n) of the concatenation (in range)."""
    cdef Py_ssize_t i, pos = 0
    cdef bytes out
    if n <= 0:
        return b""
    for i in range(inp.nsegs):
        if a < pos + inp.segs[i].n:
            if a + n <= pos + inp.segs[i].n:
                return PyBytes_FromStringAndSize(<const char *>inp.segs[i].p + (a - pos), n)
            break
        pos += inp.segs[i].n
    out = PyBytes_FromStringAndSize(NULL, n)
    _copy(inp, a, n, <unsigned char *>PyBytes_AS_STRING(out))
    return out


cdef object _tail_name(const Input *inp, Py_ssize_t body_len, Py_ssize_t start, bint component):
    """``body[start:]`` as one NUL-terminated, non-empty name without NUL (and
    without '/' for a path component); None if it is not one."""
    cdef Py_ssize_t end = body_len - 1
    cdef unsigned char last
    cdef const char *p
    if end <= start:
        return None
    _copy(inp, IN_HEADER_SIZE + end, 1, &last)
    if last != 0:
        return None
    name = _bytes(inp, IN_HEADER_SIZE + start, end - start)
    p = PyBytes_AS_STRING(name)
    if memchr(p, 0, end - start) != NULL:
        return None
    if component and memchr(p, b"/"[0], end - start) != NULL:
        return None
    return name


cdef bint _extensions_ok(bytes ext) noexcept:
    """The ``fuse_ext_header`` framing of codec.iter_extensions."""
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(ext)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(ext), pos = 0
    cdef uint32_t size
    while pos < n:
        if n - pos < 8:
            return False
        size = vfa_ld32(p + pos)
        if size < 8 or size > n - pos:
            return False
        pos += size
    return True


cdef object _byte_view(object item, const Seg *seg):
    """``codec._as_byte_view(item)``, knowing its shape already."""
    mv = item if type(item) is memoryview else memoryview(item)
    return mv if seg.byte_shaped else mv.cast("B")


cdef list _span(list items, const Input *inp, Py_ssize_t start, Py_ssize_t end):
    """``codec._span``: zero-copy slices of the byte views covering [start, end)."""
    cdef list out = []
    cdef Py_ssize_t i, pos = 0, vend, a
    if start >= end:
        return out
    for i in range(inp.nsegs):
        vend = pos + inp.segs[i].n
        if vend > start:
            a = start - pos if start > pos else 0
            v = _byte_view(items[i], &inp.segs[i])
            if end <= vend:
                out.append(v[a:end - pos])
                return out
            out.append(v[a:] if a else v)
        pos = vend
    return out


# ---------------------------------------------------------------------------
# decode_request
# ---------------------------------------------------------------------------


cdef inline object _u64(const unsigned char *p):
    return vfa_ld64(p)


cdef inline object _u32(const unsigned char *p):
    return vfa_ld32(p)


cdef object _decode_body(list items, const Input *inp, uint32_t opcode, h, Py_ssize_t body_end, setxattr_ext):
    """The request for a well-framed header, or None if the body is malformed
    (the caller then lets the pure decoder report it)."""
    cdef Py_ssize_t body_len = body_end - IN_HEADER_SIZE
    cdef unsigned char scratch[MAX_FIXED]
    cdef const unsigned char *p
    cdef uint32_t count, i, size
    cdef list items_out
    cdef _Maker m

    if opcode == OP_GETATTR:
        if body_len < 16:
            return None
        p = _at(inp, IN_HEADER_SIZE, 16, scratch)
        return M_GETATTR.make((h, _u32(p), _u64(p + 8)))
    if opcode == OP_LOOKUP or opcode == OP_UNLINK or opcode == OP_RMDIR:
        name = _tail_name(inp, body_len, 0, True)
        if name is None:
            return None
        if opcode == OP_LOOKUP:
            return M_LOOKUP.make((h, name))
        return M_UNLINK.make((h, name)) if opcode == OP_UNLINK else M_RMDIR.make((h, name))
    if opcode == OP_READ or opcode == OP_READDIR or opcode == OP_READDIRPLUS:
        if body_len < 40:
            return None
        p = _at(inp, IN_HEADER_SIZE, 40, scratch)
        m = M_READ if opcode == OP_READ else (M_READDIR if opcode == OP_READDIR else M_READDIRPLUS)
        return m.make((h, _u64(p), _u64(p + 8), _u32(p + 16), _u32(p + 20), _u64(p + 24), _u32(p + 32)))
    if opcode == OP_WRITE:
        if body_len < 40:
            return None
        p = _at(inp, IN_HEADER_SIZE, 40, scratch)
        size = vfa_ld32(p + 16)
        if body_end - (IN_HEADER_SIZE + 40) != <Py_ssize_t>size:
            return None
        data = _span(items, inp, IN_HEADER_SIZE + 40, body_end)
        return M_WRITE.make((h, _u64(p), _u64(p + 8), size, _u32(p + 20), _u64(p + 24), _u32(p + 32), data))
    if opcode == OP_FORGET or opcode == OP_INTERRUPT:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        return M_FORGET.make((h, _u64(p))) if opcode == OP_FORGET else M_INTERRUPT.make((h, _u64(p)))
    if opcode == OP_BATCH_FORGET:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        count = vfa_ld32(p)
        if <uint64_t>body_len != 8 + 16 * <uint64_t>count:
            return None
        items_out = PyList_New(count)
        for i in range(count):
            p = _at(inp, IN_HEADER_SIZE + 8 + 16 * <Py_ssize_t>i, 16, scratch)
            pair = (_u64(p), _u64(p + 8))
            Py_INCREF(pair)
            PyList_SET_ITEM(items_out, i, pair)
        return M_BATCHFORGET.make((h, items_out))
    if opcode == OP_OPEN or opcode == OP_OPENDIR:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        m = M_OPEN if opcode == OP_OPEN else M_OPENDIR
        return m.make((h, _u32(p), _u32(p + 4)))
    if opcode == OP_RELEASE or opcode == OP_RELEASEDIR:
        if body_len < 24:
            return None
        p = _at(inp, IN_HEADER_SIZE, 24, scratch)
        m = M_RELEASE if opcode == OP_RELEASE else M_RELEASEDIR
        return m.make((h, _u64(p), _u32(p + 8), _u32(p + 12), _u64(p + 16)))
    if opcode == OP_FLUSH:
        if body_len < 24:
            return None
        p = _at(inp, IN_HEADER_SIZE, 24, scratch)
        return M_FLUSH.make((h, _u64(p), _u64(p + 16)))
    if opcode == OP_FSYNC or opcode == OP_FSYNCDIR:
        if body_len < 16:
            return None
        p = _at(inp, IN_HEADER_SIZE, 16, scratch)
        m = M_FSYNC if opcode == OP_FSYNC else M_FSYNCDIR
        return m.make((h, _u64(p), _u32(p + 8)))
    if opcode == OP_SETATTR:
        if body_len < 88:
            return None
        p = _at(inp, IN_HEADER_SIZE, 88, scratch)
        return M_SETATTR.make((
            h, _u32(p), _u64(p + 8), _u64(p + 16), _u64(p + 24), _u64(p + 32), _u64(p + 40), _u64(p + 48),
            _u32(p + 56), _u32(p + 60), _u32(p + 64), _u32(p + 68), _u32(p + 76), _u32(p + 80),
        ))
    if opcode == OP_CREATE or opcode == OP_MKNOD:
        if body_len < 16:
            return None
        p = _at(inp, IN_HEADER_SIZE, 16, scratch)
        a, b, c, d = _u32(p), _u32(p + 4), _u32(p + 8), _u32(p + 12)
        name = _tail_name(inp, body_len, 16, True)
        if name is None:
            return None
        if opcode == OP_CREATE:
            return M_CREATE.make((h, a, b, c, d, name))
        return M_MKNOD.make((h, a, b, c, name))
    if opcode == OP_MKDIR:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        a, b = _u32(p), _u32(p + 4)
        name = _tail_name(inp, body_len, 8, True)
        if name is None:
            return None
        return M_MKDIR.make((h, a, b, name))
    if opcode == OP_STATFS:
        return M_STATFS.make((h,))
    if opcode == OP_READLINK:
        return M_READLINK.make((h,))
    if opcode == OP_DESTROY:
        return M_DESTROY.make((h,))
    if opcode == OP_ACCESS or opcode == OP_LISTXATTR:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        return M_ACCESS.make((h, _u32(p))) if opcode == OP_ACCESS else M_LISTXATTR.make((h, _u32(p)))
    if opcode == OP_GETXATTR:
        if body_len < 8:
            return None
        p = _at(inp, IN_HEADER_SIZE, 8, scratch)
        a = _u32(p)
        name = _tail_name(inp, body_len, 8, False)
        if name is None:
            return None
        return M_GETXATTR.make((h, a, name))
    if opcode == OP_FALLOCATE:
        if body_len < 32:
            return None
        p = _at(inp, IN_HEADER_SIZE, 32, scratch)
        return M_FALLOCATE.make((h, _u64(p), _u64(p + 8), _u64(p + 16), _u32(p + 24)))
    if opcode == OP_LSEEK:
        if body_len < 24:
            return None
        p = _at(inp, IN_HEADER_SIZE, 24, scratch)
        return M_LSEEK.make((h, _u64(p), _u64(p + 8), _u32(p + 16)))
    # Rare opcodes: the pure body decoder, on the gathered body.
    decoder = _DECODERS[opcode][1]
    if opcode == OP_SETXATTR and setxattr_ext:
        decoder = _dec_setxattr_ext
    return decoder(h, _bytes(inp, IN_HEADER_SIZE, body_len))


cdef object _decode(list items, Input *inp, setxattr_ext):
    """decode_request on taken-in buffers; None where the pure decoder must speak."""
    cdef unsigned char hbuf[IN_HEADER_SIZE]
    cdef const unsigned char *hp
    cdef uint32_t length, opcode
    cdef Py_ssize_t extlen, body_end
    if inp.total < IN_HEADER_SIZE:
        return None
    hp = _at(inp, 0, IN_HEADER_SIZE, hbuf)
    length = vfa_ld32(hp)
    opcode = vfa_ld32(hp + 4)
    if length < IN_HEADER_SIZE or length > inp.total:
        return None
    extlen = <Py_ssize_t>vfa_ld16(hp + 36) * 8
    body_end = <Py_ssize_t>length - extlen
    if body_end < IN_HEADER_SIZE:
        return None
    if opcode >= <uint32_t>_N_OPCODE_MEMBERS:
        return None
    op = _OPCODE_MEMBERS[opcode]
    if op is None:
        return None
    h = M_IN_HEADER.make(
        (length, op, _u64(hp + 8), _u64(hp + 16), _u32(hp + 24), _u32(hp + 28), _u32(hp + 32), vfa_ld16(hp + 36))
    )
    req = _decode_body(items, inp, opcode, h, body_end, setxattr_ext)
    if req is None:
        return None
    if extlen:
        ext = _bytes(inp, body_end, extlen)
        if not _extensions_ok(ext):
            return None
        req.ext = ext
    return req


def decode_request(buffers, *, setxattr_ext=False):
    """Parse one FUSE request from the guest-readable buffers ``buffers``.

    Structs and names may straddle buffer boundaries. WRITE payloads stay
    views of ``buffers`` (valid while they are); the rest is copied.
    ``setxattr_ext`` tells whether FUSE_SETXATTR_EXT was agreed (16-byte
    SETXATTR argument). Raises FuseProtocolError, and only that, on
    malformed input (see the module docstring of virtiofs_async.codec).
    """
    # A private list: nothing can change it under the loop below (on Python
    # 3.12+ a __buffer__ method may run arbitrary code).
    cdef list items = list(buffers)
    cdef Py_ssize_t n = len(items), i, taken = 0
    cdef Seg static_segs[N_STATIC_SEGS]
    cdef Py_buffer static_bufs[N_STATIC_SEGS]
    cdef Input inp
    cdef bint usable = True
    cdef Py_buffer *b
    if n <= N_STATIC_SEGS:
        inp.segs = static_segs
        inp.bufs = static_bufs
    else:
        inp.segs = <Seg *>PyMem_Malloc(n * sizeof(Seg))
        inp.bufs = <Py_buffer *>PyMem_Malloc(n * sizeof(Py_buffer))
        if inp.segs == NULL or inp.bufs == NULL:
            PyMem_Free(inp.segs)
            PyMem_Free(inp.bufs)
            raise MemoryError()
    inp.nsegs = n
    inp.total = 0
    try:
        for i in range(n):
            item = items[i]
            inp.segs[i].held = False
            inp.segs[i].byte_shaped = True
            if PyBytes_CheckExact(item):  # immutable, and referenced by items: no export needed
                inp.segs[i].p = <const unsigned char *>PyBytes_AS_STRING(item)
                inp.segs[i].n = PyBytes_GET_SIZE(item)
            else:  # an export keeps it from being resized or released meanwhile
                b = &inp.bufs[i]
                try:
                    PyObject_GetBuffer(item, b, PyBUF_FULL_RO)
                except Exception:
                    usable = False
                    break
                inp.segs[i].held = True
                taken = i + 1
                if b.ndim == 0 or not PyBuffer_IsContiguous(b, b"C"):
                    usable = False
                    break
                inp.segs[i].p = <const unsigned char *>b.buf
                inp.segs[i].n = b.len
                inp.segs[i].byte_shaped = b.ndim == 1 and b.itemsize == 1
            inp.total += inp.segs[i].n
            taken = i + 1
        req = _decode(items, &inp, setxattr_ext) if usable else None
    finally:
        for i in range(taken):
            if inp.segs[i].held:
                PyBuffer_Release(&inp.bufs[i])
        if inp.segs != static_segs:
            PyMem_Free(inp.segs)
            PyMem_Free(inp.bufs)
    if req is None:
        return _pure_decode_request(items, setxattr_ext=setxattr_ext)
    return req


# ---------------------------------------------------------------------------
# Reply encoding
# ---------------------------------------------------------------------------


cdef inline bint _as_u64(object v, uint64_t *out):
    """A plain int in 0..2**64-1 (what struct's "Q" packs as is)."""
    if not PyLong_CheckExact(v):
        return False
    try:
        out[0] = v
    except OverflowError:
        return False
    return True


cdef inline bint _as_u32(object v, uint32_t *out):
    cdef uint64_t x = 0
    if not _as_u64(v, &x) or x > 0xFFFFFFFF:
        return False
    out[0] = <uint32_t>x
    return True


cdef inline bint _put64(unsigned char *p, object v):
    cdef uint64_t x = 0
    if not _as_u64(v, &x):
        return False
    vfa_st64(p, x)
    return True


cdef inline bint _put32(unsigned char *p, object v):
    cdef uint32_t x = 0
    if not _as_u32(v, &x):
        return False
    vfa_st32(p, x)
    return True


def encode_out_header(unique, error, body_len):
    """The 16-byte reply header for a ``body_len``-byte body. ``error`` is a
    positive errno (0 for success); the wire carries it negated."""
    cdef uint64_t u, blen
    cdef int64_t err
    cdef bytes out
    cdef unsigned char *p
    if (
        _as_u64(unique, &u) and _as_u64(body_len, &blen) and blen <= 0xFFFFFFFF - 16
        and PyLong_CheckExact(error) and -0x7FFFFFFF <= error <= 0x80000000
    ):
        err = error
        out = PyBytes_FromStringAndSize(NULL, 16)
        p = <unsigned char *>PyBytes_AS_STRING(out)
        vfa_st32(p, <uint32_t>(16 + blen))
        vfa_st32(p + 4, <uint32_t>(-err))
        vfa_st64(p + 8, u)
        return out
    return _pure_encode_out_header(unique, error, body_len)


def pack_dirent(ino, off, type, name):
    """One ``fuse_dirent`` record, zero-padded to 8 bytes. The caller has
    checked ``name`` (non-empty, no '/' or NUL, at most FUSE_NAME_MAX)."""
    cdef uint64_t c_ino = 0, c_off = 0
    cdef uint32_t c_type = 0
    cdef Py_ssize_t n, size
    cdef bytes out
    cdef unsigned char *p
    if not (
        PyBytes_CheckExact(name) and _as_u64(ino, &c_ino) and _as_u64(off, &c_off) and _as_u32(type, &c_type)
    ) or PyBytes_GET_SIZE(name) > 0xFFFFFFFF:
        return _pure_pack_dirent(ino, off, type, name)
    n = PyBytes_GET_SIZE(name)
    size = (24 + n + 7) & ~7
    out = PyBytes_FromStringAndSize(NULL, size)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    vfa_st64(p, c_ino)
    vfa_st64(p + 8, c_off)
    vfa_st32(p + 16, <uint32_t>n)
    vfa_st32(p + 20, c_type)
    memcpy(p + 24, PyBytes_AS_STRING(name), n)
    memset(p + 24 + n, 0, size - 24 - n)
    return out


_pure_parse_linux_dirents64 = _pure.parse_linux_dirents64
cdef object _tuple_new = tuple.__new__

cdef extern from *:
    """
    /* tuple.__new__(t, (a, b, c, d)) for a tuple subclass t, as CPython's
       tuple_subtype_new builds it: tp_alloc, then the items. */
    static PyObject *vfa_tuple4_of(PyTypeObject *t, PyObject *a, PyObject *b, PyObject *c, PyObject *d)
    {
        PyObject *r = t->tp_alloc(t, 4);
        if (r == NULL)
            return NULL;
        Py_INCREF(a); PyTuple_SET_ITEM(r, 0, a);
        Py_INCREF(b); PyTuple_SET_ITEM(r, 1, b);
        Py_INCREF(c); PyTuple_SET_ITEM(r, 2, c);
        Py_INCREF(d); PyTuple_SET_ITEM(r, 3, d);
        return r;
    }
    """
    object vfa_tuple4_of(PyTypeObject *t, object a, object b, object c, object d)


def parse_linux_dirents64(data, Py_ssize_t length, cls):
    """The records in the first ``length`` bytes of ``data``, a
    ``getdents64(2)`` result, as ``cls`` tuples ``(d_ino, d_off, d_type,
    name)`` (``cls`` is a tuple subclass such as a NamedTuple; ``name``
    without its NUL). ValueError if ``length`` exceeds ``data`` or a record
    is cut short, overruns the data or has no NUL-terminated name."""
    cdef Py_buffer view
    cdef const unsigned char *p
    cdef const unsigned char *nul
    cdef Py_ssize_t pos = 0, reclen, name_start
    cdef uint64_t ino
    cdef int64_t off
    cdef uint16_t rec16
    cdef object name
    cdef list out = []
    # A tuple subclass (a NamedTuple) is built directly; anything else goes
    # through tuple.__new__, which raises what it raises.
    cdef bint direct = isinstance(cls, type) and issubclass(cls, tuple) and cls is not tuple
    PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
    try:
        if length < 0 or length > view.len:
            raise ValueError(f"length {length} outside a buffer of {view.len} bytes")
        p = <const unsigned char *>view.buf
        while pos < length:
            if length - pos < 19:
                raise ValueError(f"truncated getdents64 record at {pos}")
            memcpy(&ino, p + pos, 8)
            memcpy(&off, p + pos + 8, 8)
            memcpy(&rec16, p + pos + 16, 2)
            reclen = rec16
            if reclen <= 19 or pos + reclen > length:
                raise ValueError(f"getdents64 record at {pos} has length {reclen}")
            name_start = pos + 19
            nul = <const unsigned char *>memchr(p + name_start, 0, reclen - 19)
            if nul == NULL:
                raise ValueError(f"getdents64 record at {pos} has no NUL-terminated name")
            name = PyBytes_FromStringAndSize(<const char *>(p + name_start), nul - (p + name_start))
            if direct:
                out.append(vfa_tuple4_of(<PyTypeObject *>cls, ino, off, p[pos + 18], name))
            else:
                out.append(_tuple_new(cls, (ino, off, p[pos + 18], name)))
            pos += reclen
    finally:
        PyBuffer_Release(&view)
    return out


cdef inline bint _store_dirent(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t used, Py_ssize_t need,
                               uint64_t ino, uint64_t off, uint32_t typ, const char *name, Py_ssize_t n) noexcept:
    """Append one ``need``-byte fuse_dirent at ``used`` (growing ``buf``);
    False when out of memory."""
    cdef unsigned char *p = vfa_reserve(buf, cap, used, need)
    if p == NULL:
        return False
    vfa_put_dirent(p, need, ino, off, typ, <const unsigned char *>name, n, 0)
    return True


_pure_pack_host_dirents = _pure.pack_host_dirents


def pack_host_dirents(entries, Py_ssize_t start, Py_ssize_t room, known, dev, dot, dotdot):
    """As :func:`virtiofs_async.codec.pack_host_dirents` (the contract):
    the packed ``fuse_dirent`` records of ``entries[start:]`` that fit in
    ``room`` bytes, inode numbers mapped through ``known``, and the index
    after the last one. Exact lists, dicts and ints here; anything else
    goes to the pure twin."""
    cdef Py_ssize_t count, i, n, need, used = 0, cap = 8192
    cdef object rec, name, node
    cdef dict table
    cdef const char *cname
    cdef unsigned char *buf
    cdef uint64_t ino = 0, off = 0, c_dot = 0, c_dotdot = 0
    cdef uint32_t typ = 0
    if not (PyList_CheckExact(entries) and PyDict_CheckExact(known) and 0 <= start
            and _as_u64(dot, &c_dot) and _as_u64(dotdot, &c_dotdot)):
        return _pure_pack_host_dirents(entries, start, room, known, dev, dot, dotdot)
    table = <dict>known
    count = PyList_GET_SIZE(entries)
    buf = <unsigned char *>PyMem_Malloc(cap)
    if buf == NULL:
        raise MemoryError()
    try:
        # One pass, in the pure twin's order: the room, the name, the
        # inode number, then the record (anything the C side cannot pack
        # as is goes to the pure twin, which raises what it raises).
        i = start
        while i < count:
            rec = <object>PyList_GET_ITEM(entries, i)
            if not PyTuple_Check(rec) or PyTuple_GET_SIZE(rec) != 4:
                return _pure_pack_host_dirents(entries, start, room, known, dev, dot, dotdot)
            name = <object>PyTuple_GET_ITEM(rec, 3)
            if not PyBytes_CheckExact(name):
                return _pure_pack_host_dirents(entries, start, room, known, dev, dot, dotdot)
            n = PyBytes_GET_SIZE(name)
            need = (24 + n + 7) & ~7
            if used + need > room:
                break
            cname = PyBytes_AS_STRING(name)
            if n == 0 or n > 1024 or memchr(cname, 0x2F, n) != NULL or memchr(cname, 0, n) != NULL:
                raise ValueError(f"invalid directory entry name {name[:64]!r}")
            if c_dot and n == 1 and cname[0] == 0x2E:
                ino = c_dot
            elif c_dotdot and n == 2 and cname[0] == 0x2E and cname[1] == 0x2E:
                ino = c_dotdot
            else:
                node = table.get((dev, <object>PyTuple_GET_ITEM(rec, 0)))
                if not _as_u64(<object>PyTuple_GET_ITEM(rec, 0) if node is None else node.nodeid, &ino):
                    return _pure_pack_host_dirents(entries, start, room, known, dev, dot, dotdot)
            if not (_as_u64(<object>PyTuple_GET_ITEM(rec, 1), &off)
                    and _as_u32(<object>PyTuple_GET_ITEM(rec, 2), &typ)):
                return _pure_pack_host_dirents(entries, start, room, known, dev, dot, dotdot)
            if not _store_dirent(&buf, &cap, used, need, ino, off, typ, cname, n):
                raise MemoryError()
            used += need
            i += 1
        return PyBytes_FromStringAndSize(<const char *>buf, used), i
    finally:
        PyMem_Free(buf)


cdef Py_ssize_t _raw_record(const unsigned char *p, Py_ssize_t length, Py_ssize_t pos,
                            Py_ssize_t *name_len, int *slash) except -1:
    """Check the getdents64 record of ``p[:length]`` at ``pos`` as the pure
    twin's ``_raw_dirent`` does (the same ValueErrors); its length, its
    name's in ``name_len``, and ``slash`` set when that name holds a '/'.
    (The loops take ``vfa_raw_record``'s answer and come here for its -1.)"""
    cdef uint16_t rec16
    cdef Py_ssize_t reclen, n
    if length - pos < 19:
        raise ValueError(f"truncated getdents64 record at {pos}")
    memcpy(&rec16, p + pos + 16, 2)
    reclen = rec16
    if reclen <= 19 or pos + reclen > length:
        raise ValueError(f"getdents64 record at {pos} has length {reclen}")
    n = vfa_name_len(p + pos + 19, reclen - 19, length - pos - 19, slash)
    if n < 0:
        raise ValueError(f"getdents64 record at {pos} has no NUL-terminated name")
    name_len[0] = n
    return reclen


_pure_scan_raw_dirents = _pure.scan_raw_dirents
_pure_pack_raw_dirents = _pure.pack_raw_dirents


def scan_raw_dirents(raw, off):
    """As :func:`virtiofs_async.codec.scan_raw_dirents` (the contract);
    exact bytes and an int here, anything else goes to the pure twin."""
    cdef const unsigned char *p
    cdef Py_ssize_t length, pos = 0, after = -1, reclen, n
    cdef int64_t want, last = -1, d_off
    cdef int slash = 0
    cdef bint any_want = True
    if not (PyBytes_CheckExact(raw) and PyLong_CheckExact(off)):
        return _pure_scan_raw_dirents(raw, off)
    try:
        want = off
    except OverflowError:
        any_want = False  # no d_off can match
        want = 0
    p = <const unsigned char *>PyBytes_AS_STRING(raw)
    length = PyBytes_GET_SIZE(raw)
    while pos < length:
        reclen = vfa_raw_record(p, length, pos, &n, &slash)
        if reclen < 0:
            reclen = _raw_record(p, length, pos, &n, &slash)
        memcpy(&d_off, p + pos + 8, 8)
        last = d_off
        pos += reclen
        if any_want and d_off == want and after < 0:
            after = pos
    return after, last


cdef enum:
    # pack_raw_dirents checks a table of at most this many inodes without
    # a lookup per record
    _SMALL_TABLE = 16


def pack_raw_dirents(raw, Py_ssize_t start, Py_ssize_t room, known, dev, dot, dotdot):
    """As :func:`virtiofs_async.codec.pack_raw_dirents` (the contract): one
    pass over the host records, no objects but each unknown inode's key.
    Exact bytes, dicts and ints here; anything else goes to the pure twin."""
    cdef const unsigned char *p
    cdef const char *cname
    cdef Py_ssize_t length, pos, reclen, n, need, used = 0, count = 0, cap = 8192
    cdef unsigned char *buf
    cdef unsigned char *out
    cdef uint64_t ino = 0, d_ino, c_dot = 0, c_dotdot = 0
    cdef int64_t d_off, last = -1
    cdef dict table
    cdef object node
    # a small table's inode numbers on ``dev``: a record whose number is
    # none of them is not in the table (no key built, no lookup)
    cdef uint64_t c_dev = 0, key_dev = 0, key_ino = 0
    cdef uint64_t small[_SMALL_TABLE]
    cdef Py_ssize_t nsmall = -1, j
    cdef bint maybe
    cdef int slash
    if not (PyBytes_CheckExact(raw) and PyDict_CheckExact(known) and 0 <= start
            and _as_u64(dot, &c_dot) and _as_u64(dotdot, &c_dotdot)):
        return _pure_pack_raw_dirents(raw, start, room, known, dev, dot, dotdot)
    table = <dict>known
    if len(table) <= _SMALL_TABLE and _as_u64(dev, &c_dev):
        nsmall = 0
        for key in table:
            if not (type(key) is tuple and PyTuple_GET_SIZE(key) == 2
                    and _as_u64(<object>PyTuple_GET_ITEM(key, 0), &key_dev)
                    and _as_u64(<object>PyTuple_GET_ITEM(key, 1), &key_ino)):
                nsmall = -1  # keys of another shape: look each record up
                break
            if key_dev == c_dev:
                small[nsmall] = key_ino
                nsmall += 1
    p = <const unsigned char *>PyBytes_AS_STRING(raw)
    length = PyBytes_GET_SIZE(raw)
    buf = <unsigned char *>PyMem_Malloc(cap)
    if buf == NULL:
        raise MemoryError()
    try:
        pos = start
        while pos < length:
            slash = 0
            reclen = vfa_raw_record(p, length, pos, &n, &slash)
            if reclen < 0:
                reclen = _raw_record(p, length, pos, &n, &slash)
            need = 24 + ((n + 7) & ~7)
            if used + need > room:
                break
            cname = <const char *>(p + pos + 19)
            if n == 0 or n > 1024 or slash:
                raise ValueError(f"invalid directory entry name {PyBytes_FromStringAndSize(cname, n)[:64]!r}")
            memcpy(&d_ino, p + pos, 8)
            memcpy(&d_off, p + pos + 8, 8)
            if d_off < 0:  # not a fuse_dirent offset: the pure twin raises what it raises
                return _pure_pack_raw_dirents(raw, start, room, known, dev, dot, dotdot)
            if c_dot and n == 1 and cname[0] == 0x2E:
                ino = c_dot
            elif c_dotdot and n == 2 and cname[0] == 0x2E and cname[1] == 0x2E:
                ino = c_dotdot
            elif nsmall == 0:
                ino = d_ino  # no inode of ``dev`` in the table
            else:
                maybe = nsmall < 0
                for j in range(nsmall if nsmall > 0 else 0):
                    if small[j] == d_ino:
                        maybe = True
                        break
                node = table.get((dev, d_ino)) if maybe else None
                if node is None:
                    ino = d_ino
                elif not _as_u64(node.nodeid, &ino):
                    return _pure_pack_raw_dirents(raw, start, room, known, dev, dot, dotdot)
            out = vfa_reserve(&buf, &cap, used, need)
            if out == NULL:
                raise MemoryError()
            vfa_put_dirent(out, need, ino, <uint64_t>d_off, p[pos + 18], p + pos + 19, n, length - pos - 19)
            used += need
            count += 1
            last = d_off
            pos += reclen
        return PyBytes_FromStringAndSize(<const char *>buf, used), pos, count, last
    finally:
        PyMem_Free(buf)


cdef inline bint _put_namelen(unsigned char *p, Py_ssize_t n) noexcept:
    vfa_st32(p, <uint32_t>n)
    return True


# Reading EntryOut / Attr through their slot descriptors skips the attribute
# lookup (the records are plain attrs slotted classes; checked at load).
cdef object _EntryOut = _pure.EntryOut
cdef object _Attr = _pure.Attr
cdef tuple _ENTRY_SLOTS = tuple(
    _slot_descriptor(_EntryOut, name)
    for name in ("nodeid", "generation", "entry_valid", "attr_valid", "entry_valid_nsec", "attr_valid_nsec", "attr")
)
cdef tuple _ATTR_SLOTS = tuple(
    _slot_descriptor(_Attr, name)
    for name in (
        "ino", "size", "blocks", "atime", "mtime", "ctime", "atimensec", "mtimensec", "ctimensec", "mode",
        "nlink", "uid", "gid", "rdev", "blksize", "flags",
    )
)
cdef bint _SLOT_READS = None not in _ENTRY_SLOTS and None not in _ATTR_SLOTS
cdef descrgetfunc _get_slot = (<PyTypeObject *>types.MemberDescriptorType).tp_descr_get


cdef bint _fill_entry_slots(unsigned char *p, entry, a) except -1:
    """fuse_entry_out from an exact EntryOut and Attr, read slot by slot."""
    cdef Py_ssize_t i
    for i in range(4):
        if not _put64(p + 8 * i, _get_slot(_ENTRY_SLOTS[i], entry, _EntryOut)):
            return False
    for i in range(2):
        if not _put32(p + 32 + 4 * i, _get_slot(_ENTRY_SLOTS[4 + i], entry, _EntryOut)):
            return False
    for i in range(6):
        if not _put64(p + 40 + 8 * i, _get_slot(_ATTR_SLOTS[i], a, _Attr)):
            return False
    for i in range(10):
        if not _put32(p + 88 + 4 * i, _get_slot(_ATTR_SLOTS[6 + i], a, _Attr)):
            return False
    return True


cdef bint _fill_direntplus(unsigned char *p, entry, ino, off, dtype, Py_ssize_t namelen) except -1:
    """The 152-byte fixed part of a fuse_direntplus: fuse_entry_out (with its
    fuse_attr), then fuse_dirent. False if a value needs the pure path."""
    if _SLOT_READS and type(entry) is _EntryOut:
        a = _get_slot(_ENTRY_SLOTS[6], entry, _EntryOut)
        if type(a) is _Attr:
            return (
                _fill_entry_slots(p, entry, a)
                and _put64(p + 128, ino) and _put64(p + 136, off) and _put_namelen(p + 144, namelen)
                and _put32(p + 148, dtype)
            )
    a = entry.attr
    return (
        _put64(p, entry.nodeid) and _put64(p + 8, entry.generation) and _put64(p + 16, entry.entry_valid)
        and _put64(p + 24, entry.attr_valid) and _put32(p + 32, entry.entry_valid_nsec)
        and _put32(p + 36, entry.attr_valid_nsec)
        and _put64(p + 40, a.ino) and _put64(p + 48, a.size) and _put64(p + 56, a.blocks)
        and _put64(p + 64, a.atime) and _put64(p + 72, a.mtime) and _put64(p + 80, a.ctime)
        and _put32(p + 88, a.atimensec) and _put32(p + 92, a.mtimensec) and _put32(p + 96, a.ctimensec)
        and _put32(p + 100, a.mode) and _put32(p + 104, a.nlink) and _put32(p + 108, a.uid)
        and _put32(p + 112, a.gid) and _put32(p + 116, a.rdev) and _put32(p + 120, a.blksize)
        and _put32(p + 124, a.flags)
        and _put64(p + 128, ino) and _put64(p + 136, off) and _put_namelen(p + 144, namelen) and _put32(p + 148, dtype)
    )


def pack_direntplus(entry, ino, off, type, name):
    """One ``fuse_direntplus`` record (``entry`` then the dirent), zero-padded
    to 8 bytes. Same contract on ``name`` as :func:`pack_dirent`."""
    cdef Py_ssize_t n, size
    cdef bytes out
    cdef unsigned char *p
    if not PyBytes_CheckExact(name) or PyBytes_GET_SIZE(name) > 0xFFFFFFFF:
        return _pure_pack_direntplus(entry, ino, off, type, name)
    n = PyBytes_GET_SIZE(name)
    size = (152 + n + 7) & ~7
    out = PyBytes_FromStringAndSize(NULL, size)
    p = <unsigned char *>PyBytes_AS_STRING(out)
    try:
        ok = _fill_direntplus(p, entry, ino, off, type, n)
    except Exception:
        ok = False
    if not ok:
        return _pure_pack_direntplus(entry, ino, off, type, name)
    memcpy(p + 152, PyBytes_AS_STRING(name), n)
    memset(p + 152 + n, 0, size - 152 - n)
    return out


# ---------------------------------------------------------------------------
# Replies straight from a backend's attributes, and into the guest's buffers
# ---------------------------------------------------------------------------
#
# Each function takes the C path when every value is a plain int in range (a
# float or plain int timeout) and every buffer a plain one, and otherwise
# calls its pure twin, which raises or converts exactly as it does. Anything
# raised while reading attributes also hands over to the pure twin, so the
# errors are always the reference's.

cdef enum:
    NS = 1000000000


cdef bint _put_time(unsigned char *sec_p, unsigned char *nsec_p, object ns) except -1:
    """Nanoseconds since the epoch as fuse_attr's seconds and nanoseconds
    (before the epoch: the pure twin, codec.wire_seconds)."""
    cdef uint64_t x = 0
    if not _as_u64(ns, &x):
        return False
    vfa_st64(sec_p, x // NS)
    vfa_st32(nsec_p, <uint32_t>(x % NS))
    return True


cdef bint _put_timeout(unsigned char *sec_p, unsigned char *nsec_p, object seconds) except -1:
    """codec.split_timeout, stored: seconds as u64, nanoseconds as u32."""
    cdef double d
    cdef uint64_t whole = 0
    if PyFloat_CheckExact(seconds):
        d = PyFloat_AS_DOUBLE(seconds)
        if d <= 0:
            vfa_st64(sec_p, 0)
            vfa_st32(nsec_p, 0)
            return True
        if not d < 18446744073709551616.0:  # NaN, inf, or a whole part over u64
            return False
        whole = <uint64_t>d
        vfa_st64(sec_p, whole)
        vfa_st32(nsec_p, <uint32_t>((d - <double>whole) * 1e9))
        return True
    if _as_u64(seconds, &whole):  # a plain int: no fraction
        vfa_st64(sec_p, whole)
        vfa_st32(nsec_p, 0)
        return True
    return False


# The fields the packers read (codec.AttributeSource), by index.
cdef enum:
    F_INO, F_SIZE, F_BLOCKS, F_ATIME, F_MTIME, F_CTIME, F_MODE, F_NLINK, F_UID, F_GID, F_RDEV, F_BLKSIZE
    F_FLAGS, F_GENERATION, F_ENTRY_TIMEOUT, F_ATTR_TIMEOUT
cdef tuple _SOURCE_FIELDS = (
    "st_ino", "st_size", "st_blocks", "st_atime_ns", "st_mtime_ns", "st_ctime_ns", "st_mode", "st_nlink",
    "st_uid", "st_gid", "st_rdev", "st_blksize", "attr_flags", "generation", "entry_timeout", "attr_timeout",
)

# A backend returns instances of one slotted class (operations.EntryAttributes)
# over and over: for the last source type seen, the slots' member descriptors
# (None when a field is not a plain slot, or the class customises attribute
# access: then attributes are looked up by name).
cdef object _source_type = None
cdef tuple _source_slots = None


cdef tuple _slots_of(object a):
    global _source_type, _source_slots
    cls = type(a)
    if cls is not _source_type:
        slots = None
        if cls.__getattribute__ is object.__getattribute__:
            slots = tuple(_slot_descriptor(cls, name) for name in _SOURCE_FIELDS)
            if None in slots:
                slots = None
        _source_type = cls
        _source_slots = slots
    return _source_slots


cdef inline object _field(object a, tuple slots, Py_ssize_t i):
    if slots is not None:
        return _get_slot(slots[i], a, _source_type)
    return getattr(a, _SOURCE_FIELDS[i])


cdef bint _fill_attr(unsigned char *p, object a, tuple slots) except -1:
    """The 88-byte fuse_attr of ``a`` (codec._attr_fields); False if a value
    needs the pure path."""
    return (
        _put64(p, _field(a, slots, F_INO)) and _put64(p + 8, _field(a, slots, F_SIZE))
        and _put64(p + 16, _field(a, slots, F_BLOCKS))
        and _put_time(p + 24, p + 48, _field(a, slots, F_ATIME))
        and _put_time(p + 32, p + 52, _field(a, slots, F_MTIME))
        and _put_time(p + 40, p + 56, _field(a, slots, F_CTIME))
        and _put32(p + 60, _field(a, slots, F_MODE)) and _put32(p + 64, _field(a, slots, F_NLINK))
        and _put32(p + 68, _field(a, slots, F_UID)) and _put32(p + 72, _field(a, slots, F_GID))
        and _put32(p + 76, _field(a, slots, F_RDEV)) and _put32(p + 80, _field(a, slots, F_BLKSIZE))
        and _put32(p + 84, _field(a, slots, F_FLAGS))
    )


cdef bint _fill_attr_out(unsigned char *p, object a, tuple slots) except -1:
    vfa_st32(p + 12, 0)
    return _put_timeout(p, p + 8, _field(a, slots, F_ATTR_TIMEOUT)) and _fill_attr(p + 16, a, slots)


cdef bint _fill_entry_out(unsigned char *p, object a, tuple slots) except -1:
    return (
        _put64(p, _field(a, slots, F_INO)) and _put64(p + 8, _field(a, slots, F_GENERATION))
        and _put_timeout(p + 16, p + 32, _field(a, slots, F_ENTRY_TIMEOUT))
        and _put_timeout(p + 24, p + 36, _field(a, slots, F_ATTR_TIMEOUT))
        and _fill_attr(p + 40, a, slots)
    )


ctypedef bint (*_filler)(unsigned char *, object, tuple) except -1


cdef object _packed(Py_ssize_t size, _filler fill, object a):
    """``size`` bytes from ``fill``; None when the pure twin must answer."""
    cdef bytes out = PyBytes_FromStringAndSize(NULL, size)
    try:
        if fill(<unsigned char *>PyBytes_AS_STRING(out), a, _slots_of(a)):
            return out
    except Exception:
        pass
    return None


def pack_attr(a):
    """The 88-byte ``fuse_attr`` of ``a``; raises ``struct.error`` when a
    field does not fit its wire type (times: see codec.wire_seconds)."""
    out = _packed(ATTR_SIZE, _fill_attr, a)
    return _pure_pack_attr(a) if out is None else out


def pack_attr_out(a):
    """The 104-byte ``fuse_attr_out`` (GETATTR, SETATTR) of ``a``, valid for
    ``a.attr_timeout``; the bytes of ``AttrOut(...).encode()``."""
    out = _packed(ATTR_OUT_SIZE, _fill_attr_out, a)
    return _pure_pack_attr_out(a) if out is None else out


def pack_entry_out(a):
    """The 128-byte ``fuse_entry_out`` (LOOKUP, MKNOD, ...) of ``a``: nodeid
    ``a.st_ino``, ``a.generation``, both timeouts; the bytes of
    ``EntryOut(...).encode()``."""
    out = _packed(ENTRY_OUT_SIZE, _fill_entry_out, a)
    return _pure_pack_entry_out(a) if out is None else out


cdef bint _out_header(unsigned char *p, object unique, object error, uint64_t body_len) except -1:
    """encode_out_header into ``p``; False where the pure twin must answer."""
    cdef uint64_t u = 0
    cdef int64_t err
    if not (
        _as_u64(unique, &u) and body_len <= 0xFFFFFFFF - OUT_HEADER_SIZE
        and PyLong_CheckExact(error) and -0x7FFFFFFF <= error <= 0x80000000
    ):
        return False
    err = error
    vfa_st32(p, <uint32_t>(OUT_HEADER_SIZE + body_len))
    vfa_st32(p + 4, <uint32_t>(-err))
    vfa_st64(p + 8, u)
    return True


cdef bint _take_source(object part, Py_buffer *b, bint *held) except -1:
    """A part of a reply body as bytes: False if the pure twin must take it."""
    held[0] = False
    if PyBytes_CheckExact(part):
        b.buf = <void *>PyBytes_AS_STRING(part)
        b.len = PyBytes_GET_SIZE(part)
        return True
    if not (PyByteArray_CheckExact(part) or type(part) is memoryview):
        return False
    try:
        PyObject_GetBuffer(part, b, PyBUF_SIMPLE)  # C-contiguous only
    except Exception:
        return False
    held[0] = True
    return True


cdef bint _take_dest(object view, Py_buffer *b) except -1:
    """A writable, 1-D, C-contiguous memoryview of format "B" (what the pure
    scatter copies into bytewise); False (nothing held) otherwise."""
    if type(view) is not memoryview:
        return False
    try:
        PyObject_GetBuffer(view, b, PyBUF_RECORDS)  # writable, with format and strides
    except Exception:
        return False
    if b.ndim == 1 and b.itemsize == 1 and b.format != NULL and b.format[0] == b"B" and b.format[1] == 0 and (
        b.strides == NULL or b.strides[0] == 1
    ):
        return True
    PyBuffer_Release(b)
    return False


def write_reply(writable, unique, error, body):
    """Write a reply (header, then ``body``: one buffer or a list/tuple of
    them) into the guest buffers ``writable``; return its length. When it
    does not fit, write nothing and return 0. Raises what
    :func:`encode_out_header` raises for out-of-range fields."""
    cdef Py_buffer static_src[N_STATIC_REPLY]
    cdef Py_buffer static_dst[N_STATIC_REPLY]
    cdef bint static_held[N_STATIC_REPLY]
    cdef Py_buffer *src = static_src
    cdef Py_buffer *dst = static_dst
    cdef bint *held = static_held
    cdef Py_ssize_t nsrc, ndst, i, taken_src = 0, taken_dst = 0, j = 0, pos = 0, take, k
    cdef uint64_t body_len = 0, room = 0
    cdef unsigned char header[OUT_HEADER_SIZE]
    cdef const unsigned char *from_p
    cdef Py_ssize_t from_n
    cdef Py_ssize_t outcome = -1  # -1: the pure twin answers; else the bytes written
    single = type(body) is bytes or type(body) is bytearray or type(body) is memoryview
    if not (single or type(body) is list or type(body) is tuple) or not (
        type(writable) is list or type(writable) is tuple
    ):
        return _pure_write_reply(writable, unique, error, body)
    parts = (body,) if single else tuple(body)  # a private copy: nothing changes it meanwhile
    dests = tuple(writable)
    nsrc = len(parts)
    ndst = len(dests)
    if nsrc > N_STATIC_REPLY or ndst > N_STATIC_REPLY:
        src = <Py_buffer *>PyMem_Malloc((nsrc + 1) * sizeof(Py_buffer))
        dst = <Py_buffer *>PyMem_Malloc((ndst + 1) * sizeof(Py_buffer))
        held = <bint *>PyMem_Malloc((nsrc + 1) * sizeof(bint))
        if src == NULL or dst == NULL or held == NULL:
            PyMem_Free(src)
            PyMem_Free(dst)
            PyMem_Free(held)
            raise MemoryError()
    try:
        for i in range(nsrc):
            if not _take_source(parts[i], &src[i], &held[i]):
                break
            taken_src = i + 1
            body_len += <uint64_t>src[i].len
        else:
            for i in range(ndst):
                if not _take_dest(dests[i], &dst[i]):
                    break
                taken_dst = i + 1
                room += <uint64_t>dst[i].len
            else:
                if OUT_HEADER_SIZE + body_len > room:
                    outcome = 0
                elif _out_header(header, unique, error, body_len):
                    # Scatter: the header, then each part, across the buffers in order.
                    for k in range(-1, nsrc):
                        if k < 0:
                            from_p = header
                            from_n = OUT_HEADER_SIZE
                        else:
                            from_p = <const unsigned char *>src[k].buf
                            from_n = src[k].len
                        while from_n > 0:
                            if pos == dst[j].len:
                                j += 1
                                pos = 0
                                continue
                            take = dst[j].len - pos
                            if take > from_n:
                                take = from_n
                            memmove(<unsigned char *>dst[j].buf + pos, from_p, take)
                            pos += take
                            from_p += take
                            from_n -= take
                    outcome = <Py_ssize_t>(OUT_HEADER_SIZE + body_len)
    finally:
        for i in range(taken_src):
            if held[i]:
                PyBuffer_Release(&src[i])
        for i in range(taken_dst):
            PyBuffer_Release(&dst[i])
        if src != static_src:
            PyMem_Free(src)
            PyMem_Free(dst)
            PyMem_Free(held)
    if outcome < 0:
        return _pure_write_reply(writable, unique, error, body)
    return outcome


def record_factory(cls):
    """A callable equivalent to ``cls`` called with positional arguments.
    For a plain slotted attrs class (no validators, converters or hooks) it
    fills the slots directly instead of running the generated __init__;
    any other class is returned as it is."""
    cdef _Maker m = _maker(cls)
    return m if m.fast else cls


def _record_builders():
    """{class name: True if built without its __init__} (see _Maker; for tests)."""
    return {
        m.cls.__name__: m.fast
        for m in (
            M_IN_HEADER, M_GETATTR, M_LOOKUP, M_UNLINK, M_RMDIR, M_READ, M_READDIR, M_READDIRPLUS, M_WRITE,
            M_FORGET, M_INTERRUPT, M_BATCHFORGET, M_OPEN, M_OPENDIR, M_RELEASE, M_RELEASEDIR, M_FLUSH, M_FSYNC,
            M_FSYNCDIR, M_SETATTR, M_CREATE, M_MKNOD, M_MKDIR, M_STATFS, M_READLINK, M_DESTROY, M_ACCESS,
            M_LISTXATTR, M_GETXATTR, M_FALLOCATE, M_LSEEK,
        )
    }
