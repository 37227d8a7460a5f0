# C helpers shared by the Cython twins; implemented in include/vfa_hotpath.h.
from libc.stdint cimport uint16_t, uint32_t, uint64_t
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
    # inline responders (VirtQueue.pop_serving)
    ctypedef Py_ssize_t (*vfa_respond_fn)(object self, const unsigned char *request, Py_ssize_t request_len,
                                          const iovec *readable, int readable_count, Py_ssize_t readable_len,
                                          const iovec *reply, int reply_count, Py_ssize_t room)
    const char *VFA_RESPONDER_CAPSULE
    enum: VFA_RESPONDER_REQUEST_MAX
    enum: VFA_RESPONDER_IOV_MAX
    enum: VFA_RESPONDER_REPLY_MAX
    void vfa_scatter(const iovec *iov, int count, const unsigned char *src, Py_ssize_t n)
    # room for ``need`` more bytes in a PyMem buffer (NULL: out of memory)
    unsigned char *vfa_reserve(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t used, Py_ssize_t need)
