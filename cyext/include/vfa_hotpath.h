/* Small C helpers shared by the Cython twins (cyext/vring.pyx, cyext/codec.pyx).
 *
 * - Little-endian loads/stores that tolerate any alignment (guest rings and
 *   FUSE structs sit wherever the guest put them).
 * - Ring-index accesses that are single-copy atomic when the host address is
 *   naturally aligned, plus the CPU fences the virtio memory model needs
 *   (the pure-Python twin cannot issue them).
 *
 * GCC/Clang builtins only; the project targets Linux (vhost-user).
 */
#ifndef VFA_HOTPATH_H
#define VFA_HOTPATH_H

#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
#define VFA_LE16(x) __builtin_bswap16(x)
#define VFA_LE32(x) __builtin_bswap32(x)
#define VFA_LE64(x) __builtin_bswap64(x)
#else
#define VFA_LE16(x) (x)
#define VFA_LE32(x) (x)
#define VFA_LE64(x) (x)
#endif

/* -- plain little-endian access (any alignment) ---------------------------- */

static inline uint16_t vfa_ld16(const unsigned char *p) { uint16_t v; memcpy(&v, p, 2); return VFA_LE16(v); }
static inline uint32_t vfa_ld32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return VFA_LE32(v); }
static inline uint64_t vfa_ld64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return VFA_LE64(v); }
static inline void vfa_st16(unsigned char *p, uint16_t v) { v = VFA_LE16(v); memcpy(p, &v, 2); }
static inline void vfa_st32(unsigned char *p, uint32_t v) { v = VFA_LE32(v); memcpy(p, &v, 4); }
static inline void vfa_st64(unsigned char *p, uint64_t v) { v = VFA_LE64(v); memcpy(p, &v, 8); }

/* -- shared ring indices and flags ------------------------------------------
 * The other side (the guest driver) reads and writes these concurrently.
 * Relaxed atomics keep each access whole and un-cached by the compiler; the
 * fences below give the ordering. A misaligned host address (possible only
 * with odd region offsets) falls back to a byte copy. */

static inline uint16_t vfa_ring_ld16(const unsigned char *p)
{
    uint16_t v;
    if (((uintptr_t)p & 1u) == 0)
        v = __atomic_load_n((const uint16_t *)(const void *)p, __ATOMIC_RELAXED);
    else
        memcpy(&v, p, 2);
    return VFA_LE16(v);
}

static inline void vfa_ring_st16(unsigned char *p, uint16_t v)
{
    v = VFA_LE16(v);
    if (((uintptr_t)p & 1u) == 0)
        __atomic_store_n((uint16_t *)(void *)p, v, __ATOMIC_RELAXED);
    else
        memcpy(p, &v, 2);
}

/* Order earlier loads before later loads and stores (read avail->idx, then
 * the ring entries and descriptors it covers). */
static inline void vfa_rmb(void) { __atomic_thread_fence(__ATOMIC_ACQUIRE); }
/* Order earlier loads and stores before later stores (reply data and the used
 * element, then used->idx). */
static inline void vfa_wmb(void) { __atomic_thread_fence(__ATOMIC_RELEASE); }
/* Full fence, including store -> load (publish used->idx or avail_event, then
 * read the driver's used_event / flags / avail->idx). */
static inline void vfa_mb(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

/* -- deferred READ copies -----------------------------------------------------
 * A compiled responder may leave the copy of a READ for later: it fills the
 * next job of the walk's ``batch`` and returns VFA_DEFERRED. Before
 * pop_serving returns, the walk runs the batch's copies together, on its own
 * thread and helper threads at once (vfa_copy_pool.h): a job whose preadv2
 * read ``expect`` bytes gets ``header`` written into its header buffers and
 * its chain returned with ``reply_len``; any other result hands the chain to
 * the full path, as a declined request (only reply buffers were written).
 * While a batch holds jobs, a responder offered a request it would not defer
 * returns VFA_FLUSH_FIRST with nothing done: the walk runs the batch, then
 * offers the chain again, so no other request (a RELEASE closing the fd)
 * runs before the copies. The fds stay open until the run: only the loop's
 * thread, which runs pop_serving, closes them. */
#define VFA_DEFERRED (-3)
#define VFA_FLUSH_FIRST (-4)
#define VFA_BATCH_JOBS 32
#define VFA_BATCH_IOV 8192
#define VFA_JOB_HEADER_MAX 32
#define VFA_JOB_CUTS 3              /* spare iov entries after a job's data buffers */
#define VFA_DEFER_MIN (64 * 1024)   /* smaller READs are copied at once */
#define VFA_BATCH_BYTES (4 << 20)   /* the walk stops popping once its batch holds this much */

typedef struct {
    int fd, flags;                 /* preadv2(fd, iov, iov_count, offset, flags) */
    off_t offset;
    int iov_start, iov_count;      /* the data buffers: batch->iov[iov_start:][:iov_count], VFA_JOB_CUTS spare after */
    int hdr_start, hdr_count;      /* the header's buffers: batch->iov[hdr_start:][:hdr_count] */
    size_t expect;                 /* the bytes the copy must read */
    int header_len;
    unsigned char header[VFA_JOB_HEADER_MAX];
    uint32_t reply_len;            /* the used length when it does */
    uint16_t head;                 /* the chain (set by the walk) */
    ssize_t result;                /* set by the run: expect when the job succeeded */
} vfa_job;

typedef struct {
    int count;                     /* jobs[:count] are filled */
    int iov_used;                  /* iov[:iov_used] belong to them */
    size_t bytes;                  /* the jobs' expect, summed */
    vfa_job jobs[VFA_BATCH_JOBS];
    struct iovec iov[VFA_BATCH_IOV];
} vfa_batch;

/* -- inline responders --------------------------------------------------------
 * A responder answers a request in place, from the ring walk
 * (VirtQueue.pop_serving). It gets the chain's device-readable part twice:
 * its first bytes copied into one buffer (``request``, at most
 * VFA_RESPONDER_REQUEST_MAX of the ``readable_len`` in all) and the guest's
 * buffers themselves as host iovecs (``readable``, e.g. for a WRITE's data);
 * and the device-writable buffers as iovecs (``reply``, ``room`` bytes in
 * all). It writes its reply into those (vfa_scatter) and returns the
 * reply's length (0 <= n <= room), or -1 when the request is not one it
 * answers (the full path then serves it; what it may have written into the
 * reply buffers is overwritten or ignored, as the used length says; it must
 * not have changed anything else), or, given a ``batch`` (may be NULL),
 * VFA_DEFERRED / VFA_FLUSH_FIRST as described above. At most
 * VFA_RESPONDER_IOV_MAX buffers each way. It must not leave a Python
 * exception set. The compiled responder exports this function in a capsule
 * named VFA_RESPONDER_CAPSULE (its ``c_responder`` attribute); ``self`` is
 * the responder object, kept alive by the caller. */
typedef Py_ssize_t (*vfa_respond_fn)(PyObject *self, const unsigned char *request, Py_ssize_t request_len,
                                     const struct iovec *readable, int readable_count, Py_ssize_t readable_len,
                                     const struct iovec *reply, int reply_count, Py_ssize_t room,
                                     vfa_batch *batch);
#define VFA_RESPONDER_CAPSULE "virtiofs_async.responder"
/* The request prefix a responder gets (and the largest request a Python
 * ``respond`` is offered); the most buffers each way; the largest reply
 * room a Python ``respond`` is offered. */
#define VFA_RESPONDER_REQUEST_MAX 512
#define VFA_RESPONDER_IOV_MAX 1024
#define VFA_RESPONDER_REPLY_MAX 512

/* Copy ``n`` bytes of ``src`` into the buffers ``iov`` (their total must be
 * at least ``n``). */
static inline void vfa_scatter(const struct iovec *iov, int count, const unsigned char *src, Py_ssize_t n)
{
    for (int i = 0; i < count && n > 0; i++) {
        size_t take = iov[i].iov_len < (size_t)n ? iov[i].iov_len : (size_t)n;
        memcpy(iov[i].iov_base, src, take);
        src += take;
        n -= (Py_ssize_t)take;
    }
}

/* -- growable byte buffers ------------------------------------------------------
 * Make room for ``need`` more bytes after ``used`` in the PyMem buffer
 * ``*buf`` of ``*cap`` bytes, doubling it as needed. Returns the address to
 * write at, or NULL (buffer unchanged, no exception set) when out of memory. */
static inline unsigned char *vfa_reserve(unsigned char **buf, Py_ssize_t *cap, Py_ssize_t used, Py_ssize_t need)
{
    if (used + need > *cap) {
        Py_ssize_t grown = *cap;
        unsigned char *p;
        while (used + need > grown)
            grown *= 2;
        p = (unsigned char *)PyMem_Realloc(*buf, (size_t)grown);
        if (p == NULL)
            return NULL;
        *buf = p;
        *cap = grown;
    }
    return *buf + used;
}
/* -- directory entry names ---------------------------------------------------
 * The length of the NUL-terminated name at ``name``: the index of its first
 * NUL byte among the first ``avail`` bytes, or -1 when there is none there.
 * ``*slash`` is set to 1 when a '/' comes before that NUL (left alone
 * otherwise). ``readable`` (>= ``avail``) bytes may be read from ``name``:
 * eight at a time while that many remain, so a short name costs a word or
 * two instead of a library call. The lowest byte flagged by the zero-byte
 * test below is always a real match (its false positives sit above one). */
static inline Py_ssize_t vfa_name_len(const unsigned char *name, Py_ssize_t avail, Py_ssize_t readable, int *slash)
{
    Py_ssize_t i = 0;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    const uint64_t ones = 0x0101010101010101ULL, highs = 0x8080808080808080ULL;
    const uint64_t slashes = 0x2F2F2F2F2F2F2F2FULL;
    while (i < avail && i + 8 <= readable) {
        uint64_t v, x, zero, sl;
        memcpy(&v, name + i, 8);
        x = v ^ slashes;
        zero = (v - ones) & ~v & highs;
        sl = (x - ones) & ~x & highs;
        if (zero) {
            Py_ssize_t k = (Py_ssize_t)(__builtin_ctzll(zero) >> 3);
            if (i + k >= avail)
                return -1;
            if (sl && (Py_ssize_t)(__builtin_ctzll(sl) >> 3) < k)
                *slash = 1;
            return i + k;
        }
        if (sl)
            *slash = 1;  /* a real '/' in this word: the name has one, or no NUL in reach */
        i += 8;
    }
#endif
    for (; i < avail; i++) {
        if (name[i] == 0)
            return i;
        if (name[i] == '/')
            *slash = 1;
    }
    return -1;
}
/* -- getdents64 records to fuse_dirents ----------------------------------------
 * The host-endian linux_dirent64 record of ``p[:length]`` at ``pos``: its
 * length, its name's (up to the first NUL) in ``*name_len``, ``*slash`` set
 * on a '/' in that name; -1 when the record is cut short, overruns the data
 * or has no NUL (the caller's full check then says which). */
static inline Py_ssize_t vfa_raw_record(const unsigned char *p, Py_ssize_t length, Py_ssize_t pos,
                                        Py_ssize_t *name_len, int *slash)
{
    uint16_t rec;
    Py_ssize_t reclen, n;
    if (length - pos < 19)
        return -1;
    memcpy(&rec, p + pos + 16, 2);
    reclen = rec;
    if (reclen <= 19 || pos + reclen > length)
        return -1;
    n = vfa_name_len(p + pos + 19, reclen - 19, length - pos - 19, slash);
    if (n < 0)
        return -1;
    *name_len = n;
    return reclen;
}

/* Write one fuse_dirent of ``need`` = 24 + round8(n) bytes at ``out``: the
 * name's n bytes, then zeros to the end. The name is copied a word at a
 * time when ``readable`` bytes may be read from ``name`` (round8(n) needed),
 * the bytes after the name in the last word cleared. */
static inline void vfa_put_dirent(unsigned char *out, Py_ssize_t need, uint64_t ino, uint64_t off, uint32_t typ,
                                  const unsigned char *name, Py_ssize_t n, Py_ssize_t readable)
{
    Py_ssize_t span = need - 24;
    vfa_st64(out, ino);
    vfa_st64(out + 8, off);
    vfa_st32(out + 16, (uint32_t)n);
    vfa_st32(out + 20, typ);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (span <= readable) {
        uint64_t v;
        for (Py_ssize_t i = 0; i < span; i += 8) {
            memcpy(&v, name + i, 8);
            memcpy(out + 24 + i, &v, 8);
        }
        if (n & 7) {
            memcpy(&v, out + need - 8, 8);
            v &= (1ULL << (8 * (n & 7))) - 1;  /* the low bytes are the name's */
            memcpy(out + need - 8, &v, 8);
        }
        return;
    }
#endif
    memset(out + 24 + n, 0, (size_t)(span - n));
    memcpy(out + 24, name, (size_t)n);
}
/* Zero ``rec[from:size]`` of a record of ``size`` >= 8 bytes: one masked
 * word when that span lies within the last eight bytes (a kernel record's
 * padding after its name's NUL always does), else memset. */
static inline void vfa_zero_span(unsigned char *rec, Py_ssize_t from, Py_ssize_t size)
{
    if (from >= size)
        return;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    if (size - from <= 8 && size >= 8) {
        uint64_t v;
        int keep = (int)(8 - (size - from));  /* the word's low bytes, before ``from`` */
        memcpy(&v, rec + size - 8, 8);
        v = keep ? v & ((1ULL << (8 * keep)) - 1) : 0;
        memcpy(rec + size - 8, &v, 8);
        return;
    }
#endif
    memset(rec + from, 0, (size_t)(size - from));
}
#endif /* VFA_HOTPATH_H */
