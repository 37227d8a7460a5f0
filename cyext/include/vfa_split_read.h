/* One large preadv2 done by two threads at once: the caller's and a helper.
 *
 * Used by the compiled inline responder (cyext/responder.pyx) for READs the
 * page cache holds: a buffered read is a copy, and on a filesystem such as
 * ext4 two copies of one file run in parallel, so a 1 MiB READ completes in
 * about half the time on a machine with a spare core. The call is
 * synchronous: both halves are done when vfa_split_preadv2 returns, so the
 * guest buffers and the fd only need to stay valid for the call (the caller
 * holds them). Without the GIL. One helper thread per process, started on
 * first use (again in a forked child); when it is busy (another thread is
 * using it) or cannot be started, the caller reads alone.
 */
#ifndef VFA_SPLIT_READ_H
#define VFA_SPLIT_READ_H

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pid_t pid;      /* the process the helper runs in (0: none) */
    int busy;       /* a caller owns the helper */
    int has_job;
    int done;
    int fd, iovcnt, flags;
    const struct iovec *iov;
    off_t offset;
    ssize_t result;
} vfa_split_helper;

static vfa_split_helper vfa_split = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t vfa_split_start = PTHREAD_MUTEX_INITIALIZER;

static void *vfa_split_main(void *arg)
{
    vfa_split_helper *h = (vfa_split_helper *)arg;
    pthread_setname_np(pthread_self(), "vfa-split-read");
    pthread_mutex_lock(&h->mu);
    for (;;) {
        while (!h->has_job)
            pthread_cond_wait(&h->cv, &h->mu);
        h->has_job = 0;
        int fd = h->fd, iovcnt = h->iovcnt, flags = h->flags;
        const struct iovec *iov = h->iov;
        off_t offset = h->offset;
        pthread_mutex_unlock(&h->mu);
        ssize_t r = preadv2(fd, iov, iovcnt, offset, flags);
        pthread_mutex_lock(&h->mu);
        h->result = r;
        h->done = 1;
        pthread_cond_broadcast(&h->cv);
    }
    return NULL;
}

/* Start the helper unless this process (pid ``me``) has one: never
 * started, or started before a fork (the child has no helper thread). */
static int vfa_split_start_helper(vfa_split_helper *h, pid_t me)
{
    if (h->pid == me)
        return 0;
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
    pthread_t t;
    pthread_attr_t attr;
    h->mu = mu;
    h->cv = cv;
    h->busy = h->has_job = h->done = 0;
    if (pthread_attr_init(&attr) != 0)
        return -1;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    int err = pthread_create(&t, &attr, vfa_split_main, h);
    pthread_attr_destroy(&attr);
    if (err != 0)
        return -1;
    h->pid = me;
    return 0;
}

/* Claim the helper (starting it if this process has none); 0 on success. */
static int vfa_split_claim(void)
{
    vfa_split_helper *h = &vfa_split;
    pid_t me = getpid();
    if (h->pid != me) {
        pthread_mutex_lock(&vfa_split_start);
        int err = vfa_split_start_helper(h, me);
        pthread_mutex_unlock(&vfa_split_start);
        if (err != 0)
            return -1;
    }
    pthread_mutex_lock(&h->mu);
    if (h->busy) {
        pthread_mutex_unlock(&h->mu);
        return -1;
    }
    h->busy = 1;
    pthread_mutex_unlock(&h->mu);
    return 0;
}

/* preadv2(fd, iov, iovcnt, offset, flags) as two calls at once when
 * ``split`` (0 < split < iovcnt) names the first buffer of the second half,
 * which starts ``head_bytes`` into the read: returns the total when both
 * halves read fully, else the first half's result if it was short or
 * failed, else head_bytes plus the second half's (so a result equal to the
 * sum of the buffers means everything was read). */
static ssize_t vfa_split_preadv2(int fd, const struct iovec *iov, int iovcnt, off_t offset, int flags, int split,
                                 size_t head_bytes)
{
    vfa_split_helper *h = &vfa_split;
    if (split <= 0 || split >= iovcnt || vfa_split_claim() != 0)
        return preadv2(fd, iov, iovcnt, offset, flags);
    pthread_mutex_lock(&h->mu);
    h->fd = fd;
    h->iov = iov + split;
    h->iovcnt = iovcnt - split;
    h->offset = offset + (off_t)head_bytes;
    h->flags = flags;
    h->done = 0;
    h->has_job = 1;
    pthread_cond_broadcast(&h->cv);
    pthread_mutex_unlock(&h->mu);
    ssize_t first = preadv2(fd, iov, split, offset, flags);
    pthread_mutex_lock(&h->mu);
    while (!h->done)
        pthread_cond_wait(&h->cv, &h->mu);
    ssize_t second = h->result;
    h->busy = 0;
    pthread_mutex_unlock(&h->mu);
    if (first < 0 || (size_t)first != head_bytes)
        return first;
    if (second < 0)
        return (ssize_t)head_bytes;
    return (ssize_t)head_bytes + second;
}

#endif /* VFA_SPLIT_READ_H */
