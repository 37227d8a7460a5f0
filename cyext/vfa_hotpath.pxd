# C helpers shared by the Cython twins; implemented in include/vfa_hotpath.h.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from posix.types cimport off_t
from posix.uio cimport iovec


cdef extern from "vfa_hotpath.h" nogil:
    # little-endian loads/stores at any alignment
    uint16_t vfa_ld16(const unsigned char *p)
    uint32_t vfa_ld32(const unsigned char *p)
    uint64_t vfa_ld64(const unsigned char *p)
    void vfa_st16(unsigned char *p, uint16_t v)
    void vfa_st32(unsigned char *p, uint32_t v)
    void vfa_st64(unsigned char *p, uint64_t v)
    # ring indices/flags shared with the driver: whole (atomic when aligned)
    uint16_t vfa_ring_ld16(const unsigned char *p)
    void vfa_ring_st16(unsigned char *p, uint16_t v)
    # fences: acquire (load -> load/store), release (load/store -> store), full
    void vfa_rmb()
    void vfa_wmb()
    void vfa_mb()
    # deferred READ copies (run by VirtQueue.pop_serving, see vfa_copy_pool.h)
    enum: VFA_DEFERRED
    enum: VFA_FLUSH_FIRST
    enum: VFA_BATCH_JOBS
    enum: VFA_BATCH_IOV
    enum: VFA_JOB_HEADER_MAX
    enum: VFA_JOB_CUTS
    enum: VFA_DEFER_MIN
    enum: VFA_BATCH_BYTES
    ctypedef struct vfa_job:
        int fd, flags
        off_t offset
        int iov_start, iov_count
        int hdr_start, hdr_count
        size_t expect
        int header_len
        unsigned char header[VFA_JOB_HEADER_MAX]
        uint32_t reply_len
        uint16_t head
        ssize_t result
    ctypedef struct vfa_batch:
        int count
        int iov_used
        size_t bytes
        vfa_job jobs[VFA_BATCH_JOBS]
        iovec iov[VFA_BATCH_IOV]
    # inline responders (VirtQueue.pop_serving)
    ctypedef Py_ssize_t (*vfa_respond_fn)(object self, const unsigned char *request, Py_ssize_t request_len,
                                          const iovec *readable, int readable_count, Py_ssize_t readable_len,
                                          const iovec *reply, int reply_count, Py_ssize_t room,
                                          vfa_batch *batch)
    const char *VFA_RESPONDER_CAPSULE
    enum: VFA_RESPONDER_REQUEST_MAX
    enum: VFA_RESPONDER_IOV_MAX
    enum: VFA_RESPONDER_REPLY_MAX
    void vfa_scatter(const iovec *iov, int count, const unsigned char *src, Py_ssize_t n)
    # room for ``need`` more bytes in a PyMem buffer (NULL: out of memory)
    unsigned char *vfa_reserve(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t used, Py_ssize_t need)
    # a NUL-terminated name's length (-1: no NUL in ``avail`` bytes); ``slash`` set on a '/'
    Py_ssize_t vfa_name_len(const unsigned char *name, Py_ssize_t avail, Py_ssize_t readable, int *slash)
    # a getdents64 record's length (-1: malformed), its name's, a '/' in it
    Py_ssize_t vfa_raw_record(const unsigned char *p, Py_ssize_t length, Py_ssize_t pos, Py_ssize_t *name_len,
                              int *slash)
    # zero rec[from:size] (size >= 8)
    void vfa_zero_span(unsigned char *rec, Py_ssize_t from_, Py_ssize_t size)
    # one fuse_dirent of ``need`` = 24 + round8(n) bytes, zero padded
    void vfa_put_dirent(unsigned char *out, Py_ssize_t need, uint64_t ino, uint64_t off, uint32_t typ,
                        const unsigned char *name, Py_ssize_t n, Py_ssize_t readable)
