/* The copies of a batch of deferred READs (vfa_batch, vfa_hotpath.h), run by
 * the calling thread and a few helper threads at once.
 *
 * Used by the compiled ring walk (cyext/vring.pyx, VirtQueue.pop_serving).
 * A buffered read from the page cache is a copy, and copies of one file run
 * in parallel, so a batch of large READs completes in about the time of its
 * share per core. vfa_batch_run is synchronous: every job has its result
 * when it returns, so the guest buffers and the fds only need to stay valid
 * for the call (the caller holds them). Without the GIL.
 *
 * The work is cut into pieces (a job, or the halves of a lone large one);
 * the caller takes pieces too and never waits for a helper that has not
 * started one, so a helper that wakes late costs nothing but its wake-up.
 * Batches under VFA_PARALLEL_MIN bytes run on the caller alone. Helpers
 * (online CPUs - 1, at least 1, at most VFA_POOL_HELPERS_MAX; on 2 cores
 * one helper copied 1 MiB READs as fast as three in
 * benchmarks/frontend_bench.py, and leaves the other core to the guest)
 * start on
 * first use, again in a forked child; when the pool is busy (another
 * thread's batch) or cannot start, the caller copies alone.
 */
#ifndef VFA_COPY_POOL_H
#define VFA_COPY_POOL_H

#include <pthread.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#include "vfa_hotpath.h"

#define VFA_POOL_HELPERS_MAX 7
#define VFA_PARALLEL_MIN (128 * 1024) /* a batch this large is shared with the helpers */
#define VFA_SPLIT_MIN (256 * 1024)    /* a lone READ this large is read as two halves at once */
#define VFA_PIECE (256 * 1024)        /* larger READs are read in pieces about this large */

typedef struct {
    int fd, flags;
    off_t offset;
    const struct iovec *iov;
    int iovcnt;
    size_t want;
    ssize_t result;
} vfa_piece;

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t work; /* helpers: pieces[next:count] are waiting */
    pthread_cond_t idle; /* the caller: no piece is running any more */
    pid_t pid;           /* the process the helpers run in (0: none) */
    int helpers;
    int busy;            /* a caller owns the pool */
    vfa_piece *pieces;
    int count, next, running;
} vfa_copy_pool;

static vfa_copy_pool vfa_pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};
static pthread_mutex_t vfa_pool_start_mu = PTHREAD_MUTEX_INITIALIZER;

static inline void vfa_piece_run(vfa_piece *p)
{
    p->result = preadv2(p->fd, p->iov, p->iovcnt, p->offset, p->flags);
}

static void *vfa_pool_main(void *arg)
{
    vfa_copy_pool *P = (vfa_copy_pool *)arg;
    pthread_setname_np(pthread_self(), "vfa-copy");
    pthread_mutex_lock(&P->mu);
    for (;;) {
        while (P->next >= P->count)
            pthread_cond_wait(&P->work, &P->mu);
        vfa_piece *p = &P->pieces[P->next++];
        P->running++;
        pthread_mutex_unlock(&P->mu);
        vfa_piece_run(p);
        pthread_mutex_lock(&P->mu);
        if (--P->running == 0 && P->next >= P->count)
            pthread_cond_signal(&P->idle);
    }
    return NULL;
}

/* Start the helpers unless this process (pid ``me``) has them: never
 * started, or started before a fork (the child has no helper threads and
 * the lock may have been held at the fork). Under vfa_pool_start_mu. */
static void vfa_pool_start(vfa_copy_pool *P, pid_t me)
{
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t work = PTHREAD_COND_INITIALIZER, idle = PTHREAD_COND_INITIALIZER;
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    int want = cpus > 1 ? (int)(cpus - 1) : 1;
    pthread_attr_t attr;
    if (want > VFA_POOL_HELPERS_MAX)
        want = VFA_POOL_HELPERS_MAX;
    P->mu = mu;
    P->work = work;
    P->idle = idle;
    P->helpers = P->busy = 0;
    P->pieces = NULL;
    P->count = P->next = P->running = 0;
    P->pid = me;
    if (pthread_attr_init(&attr) != 0)
        return;
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (int i = 0; i < want; i++) {
        pthread_t t;
        if (pthread_create(&t, &attr, vfa_pool_main, P) != 0)
            break;
        P->helpers++;
    }
    pthread_attr_destroy(&attr);
}

/* Claim the pool (starting it if this process has none); 0 on success. */
static int vfa_pool_claim(void)
{
    vfa_copy_pool *P = &vfa_pool;
    pid_t me = getpid();
    if (P->pid != me) {
        pthread_mutex_lock(&vfa_pool_start_mu);
        if (P->pid != me)
            vfa_pool_start(P, me);
        pthread_mutex_unlock(&vfa_pool_start_mu);
    }
    pthread_mutex_lock(&P->mu);
    if (P->busy || P->helpers == 0) {
        pthread_mutex_unlock(&P->mu);
        return -1;
    }
    P->busy = 1;
    pthread_mutex_unlock(&P->mu);
    return 0;
}

/* Run pieces[:n], sharing them with the helpers; returns when all are done. */
static void vfa_pool_run(vfa_piece *pieces, int n)
{
    vfa_copy_pool *P = &vfa_pool;
    if (n <= 1 || vfa_pool_claim() != 0) {
        for (int i = 0; i < n; i++)
            vfa_piece_run(&pieces[i]);
        return;
    }
    pthread_mutex_lock(&P->mu);
    P->pieces = pieces;
    P->count = n;
    P->next = 0;
    P->running = 0;
    if (n - 1 >= P->helpers)
        pthread_cond_broadcast(&P->work);
    else
        for (int i = 0; i < n - 1; i++)
            pthread_cond_signal(&P->work);
    while (P->next < P->count) {
        vfa_piece *p = &P->pieces[P->next++];
        P->running++;
        pthread_mutex_unlock(&P->mu);
        vfa_piece_run(p);
        pthread_mutex_lock(&P->mu);
        P->running--;
    }
    while (P->running > 0)
        pthread_cond_wait(&P->idle, &P->mu);
    P->pieces = NULL;
    P->count = P->next = 0;
    P->busy = 0;
    pthread_mutex_unlock(&P->mu);
}

/* The index of the first of the buffers ``iov`` (``*count`` of them) that
 * starts ``at`` bytes in, cutting the one that holds that byte in two if
 * needed (``*count`` grows by one: the caller has a spare entry after
 * them). 0 (no cut) when ``at`` is 0 or not inside the buffers. */
static int vfa_cut_iov(struct iovec *iov, int *count, size_t at)
{
    size_t pos = 0;
    int n = *count;
    if (at == 0)
        return 0;
    for (int i = 0; i < n; i++) {
        if (pos == at)
            return i;
        if (pos + iov[i].iov_len > at) {
            size_t into = at - pos;
            memmove(&iov[i + 2], &iov[i + 1], (size_t)(n - i - 1) * sizeof(struct iovec));
            iov[i + 1].iov_base = (unsigned char *)iov[i].iov_base + into;
            iov[i + 1].iov_len = iov[i].iov_len - into;
            iov[i].iov_len = into;
            *count = n + 1;
            return i + 1;
        }
        pos += iov[i].iov_len;
    }
    return 0;
}

/* How many pieces a job of ``bytes`` is read in: pieces of about
 * VFA_PIECE bytes (at most VFA_JOB_CUTS + 1), or two halves for a lone job
 * of VFA_SPLIT_MIN bytes or more. */
static inline int vfa_job_pieces(size_t bytes, int lone)
{
    size_t n = bytes / VFA_PIECE;
    if (n > VFA_JOB_CUTS + 1)
        n = VFA_JOB_CUTS + 1;
    if (lone && bytes >= VFA_SPLIT_MIN && n < 2)
        n = 2;
    return n < 1 ? 1 : (int)n;
}

/* Run every job of ``b``: on return each job's ``result`` is ``expect``
 * when its preadv2 read all of it, else -1 (a piece read less or
 * failed). ``b`` is not otherwise changed, but a job's data buffers may be
 * cut (its spare entries, VFA_JOB_CUTS of them). */
static void vfa_batch_run(vfa_batch *b)
{
    vfa_piece pieces[VFA_BATCH_JOBS * (VFA_JOB_CUTS + 1)];
    int owner[VFA_BATCH_JOBS * (VFA_JOB_CUTS + 1)];
    int np = 0;
    size_t total = 0;
    for (int j = 0; j < b->count; j++)
        total += b->jobs[j].expect;
    for (int j = 0; j < b->count; j++) {
        vfa_job *job = &b->jobs[j];
        struct iovec *iov = b->iov + job->iov_start;
        int want = vfa_job_pieces(job->expect, b->count == 1);
        size_t step = (job->expect / (size_t)want) & ~(size_t)4095; /* page boundaries */
        size_t done = 0;
        int first = 0;
        for (int k = 1; k < want && step; k++) {
            /* cut the rest of the buffers (from ``first``) ``step`` bytes in */
            int rest = job->iov_count - first;
            int at = vfa_cut_iov(iov + first, &rest, step);
            if (at <= 0)
                break;
            job->iov_count = first + rest;
            vfa_piece p = {job->fd, job->flags, job->offset + (off_t)done, iov + first, at, step, 0};
            owner[np] = j;
            pieces[np++] = p;
            done += step;
            first += at;
        }
        vfa_piece last = {job->fd, job->flags, job->offset + (off_t)done, iov + first, job->iov_count - first,
                          job->expect - done, 0};
        owner[np] = j;
        pieces[np++] = last;
    }
    if (total >= VFA_PARALLEL_MIN) {
        vfa_pool_run(pieces, np);
    } else {
        for (int i = 0; i < np; i++)
            vfa_piece_run(&pieces[i]);
    }
    for (int j = 0; j < b->count; j++)
        b->jobs[j].result = 0;
    for (int i = 0; i < np; i++) {
        vfa_job *job = &b->jobs[owner[i]];
        if (job->result < 0)
            continue; /* another piece of it failed */
        if (pieces[i].result < 0 || (size_t)pieces[i].result != pieces[i].want)
            job->result = -1; /* short or failing: the full path serves it */
        else
            job->result += pieces[i].result;
    }
}

#endif /* VFA_COPY_POOL_H */
