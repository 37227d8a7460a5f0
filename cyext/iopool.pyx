# cython: language_level=3
"""Compiled twin of ``virtiofs_async.iopool``: worker threads that run
``preadv``/``pwritev`` without holding the GIL.

A Python worker pool pays for the GIL twice per job (taking it after the
wake-up and again after the syscall, each time against the event loop's
thread); these workers take it never: a job's buffers are pinned and turned
into an ``iovec`` array by ``submit`` (on the caller's thread, with the
GIL), the worker runs the one syscall in C, and ``drain`` (with the GIL
again) releases the buffers and returns the results. The contract is the
pure twin's; see its docstring.
"""
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.errno cimport EAGAIN, errno
from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from posix.types cimport off_t
from posix.uio cimport iovec, preadv, pwritev
from posix.unistd cimport close, read, write

import os
import threading


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_mutex_init(pthread_mutex_t*, void*)
    int pthread_mutex_destroy(pthread_mutex_t*)
    int pthread_mutex_lock(pthread_mutex_t*)
    int pthread_mutex_unlock(pthread_mutex_t*)
    int pthread_cond_init(pthread_cond_t*, void*)
    int pthread_cond_destroy(pthread_cond_t*)
    int pthread_cond_wait(pthread_cond_t*, pthread_mutex_t*)
    int pthread_cond_signal(pthread_cond_t*)
    int pthread_cond_broadcast(pthread_cond_t*)


cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    int EFD_NONBLOCK
    int EFD_CLOEXEC


PREADV = 0
PWRITEV = 1
#: The most buffers one job may carry (the kernel's IOV_MAX).
MAX_BUFFERS = 1024


cdef struct Job:
    Job* next
    int op
    int fd
    off_t offset
    iovec* iov
    Py_buffer* bufs
    int nbufs
    long result
    PyObject* token


cdef void _free_job(Job* job):
    """With the GIL: release the buffers, drop the token, free the job."""
    cdef int i
    for i in range(job.nbufs):
        PyBuffer_Release(&job.bufs[i])
    if job.token != NULL:
        Py_DECREF(<object>job.token)
    free(job.bufs)
    free(job.iov)
    free(job)


cdef class IoPool:
    cdef pthread_mutex_t _lock
    cdef pthread_cond_t _wake
    cdef Job* _queue_head
    cdef Job* _queue_tail
    cdef Job* _done_head
    cdef Job* _done_tail
    cdef int _idle
    cdef int _threads
    cdef int _max
    cdef bint _closing
    cdef int _efd
    cdef object _name

    def __cinit__(self, int max_threads=64, str name="virtiofs-io"):
        pthread_mutex_init(&self._lock, NULL)
        pthread_cond_init(&self._wake, NULL)
        self._efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._efd < 0:
            raise OSError(errno, os.strerror(errno))
        self._max = max_threads if max_threads > 0 else 1
        self._name = name

    @property
    def fd(self):
        """The eventfd that is readable while results wait for ``drain``."""
        return self._efd

    def submit(self, int op, int fd, buffers, long long offset, token):
        if op != PREADV and op != PWRITEV:
            raise ValueError(f"unknown operation {op}")
        if self._closing:
            raise RuntimeError("the I/O pool is closed")
        cdef Py_ssize_t n = len(buffers)
        if n < 1 or n > MAX_BUFFERS:
            raise ValueError(f"a job takes 1 to {MAX_BUFFERS} buffers, not {n}")
        if offset < 0:
            raise ValueError("negative offset")
        cdef Job* job = <Job*>calloc(1, sizeof(Job))
        if job == NULL:
            raise MemoryError()
        job.iov = <iovec*>calloc(n, sizeof(iovec))
        job.bufs = <Py_buffer*>calloc(n, sizeof(Py_buffer))
        if job.iov == NULL or job.bufs == NULL:
            _free_job(job)
            raise MemoryError()
        cdef int flags = PyBUF_WRITABLE if op == PREADV else PyBUF_SIMPLE
        cdef Py_ssize_t i
        try:
            for i in range(n):
                PyObject_GetBuffer(buffers[i], &job.bufs[i], flags)
                job.nbufs = i + 1
                job.iov[i].iov_base = job.bufs[i].buf
                job.iov[i].iov_len = job.bufs[i].len
        except BaseException:
            _free_job(job)
            raise
        job.op = op
        job.fd = fd
        job.offset = offset
        Py_INCREF(token)
        job.token = <PyObject*>token
        cdef bint start = False
        pthread_mutex_lock(&self._lock)
        if self._queue_tail == NULL:
            self._queue_head = job
        else:
            self._queue_tail.next = job
        self._queue_tail = job
        if self._idle > 0:
            pthread_cond_signal(&self._wake)
        elif self._threads < self._max:
            self._threads += 1
            start = True
        pthread_mutex_unlock(&self._lock)
        if start:
            t = threading.Thread(target=self._work, name=f"{self._name}_{self._threads}", daemon=True)
            t.start()

    def _work(self):
        with nogil:
            self._serve()

    cdef void _serve(self) noexcept nogil:
        cdef Job* job
        cdef long r
        cdef bint was_empty
        cdef bint last
        cdef uint64_t one = 1
        while True:
            pthread_mutex_lock(&self._lock)
            while self._queue_head == NULL and not self._closing:
                self._idle += 1
                pthread_cond_wait(&self._wake, &self._lock)
                self._idle -= 1
            job = self._queue_head
            if job == NULL:  # closing, and nothing left to do
                self._threads -= 1
                last = self._threads == 0
                pthread_mutex_unlock(&self._lock)
                if last:
                    close(self._efd)
                    self._efd = -1
                return
            self._queue_head = job.next
            if self._queue_head == NULL:
                self._queue_tail = NULL
            job.next = NULL
            pthread_mutex_unlock(&self._lock)
            if job.op == 0:
                r = preadv(job.fd, job.iov, job.nbufs, job.offset)
            else:
                r = pwritev(job.fd, job.iov, job.nbufs, job.offset)
            job.result = r if r >= 0 else -errno
            pthread_mutex_lock(&self._lock)
            was_empty = self._done_head == NULL
            if self._done_tail == NULL:
                self._done_head = job
            else:
                self._done_tail.next = job
            self._done_tail = job
            if was_empty:
                # Under the lock: close() cannot close the eventfd meanwhile.
                write(self._efd, &one, 8)
            pthread_mutex_unlock(&self._lock)

    def drain(self):
        """``[(token, result), ...]`` of the jobs finished since the last
        call, in the order they finished; ``result`` is the byte count or
        ``-errno``. Consumes the eventfd's wake-up."""
        cdef uint64_t value
        cdef Job* job
        cdef Job* nxt
        if self._efd >= 0:
            read(self._efd, &value, 8)
        pthread_mutex_lock(&self._lock)
        job = self._done_head
        self._done_head = self._done_tail = NULL
        pthread_mutex_unlock(&self._lock)
        out = []
        while job != NULL:
            nxt = job.next
            out.append((<object>job.token, job.result))
            _free_job(job)
            job = nxt
        return out

    def close(self):
        """Stop the workers once the queue is empty (jobs already submitted
        still run); the eventfd is closed when the last worker is gone.
        Results not drained are dropped with their buffers."""
        cdef bint now
        pthread_mutex_lock(&self._lock)
        self._closing = True
        pthread_cond_broadcast(&self._wake)
        now = self._threads == 0 and self._efd >= 0
        if now:
            close(self._efd)
            self._efd = -1
        pthread_mutex_unlock(&self._lock)

    @property
    def closed(self):
        return self._closing

    def __dealloc__(self):
        # Workers hold a reference to the pool while they run: none is left.
        cdef Job* job = self._queue_head
        cdef Job* nxt
        while job != NULL:
            nxt = job.next
            _free_job(job)
            job = nxt
        job = self._done_head
        while job != NULL:
            nxt = job.next
            _free_job(job)
            job = nxt
        if self._efd >= 0:
            close(self._efd)
        pthread_mutex_destroy(&self._lock)
        pthread_cond_destroy(&self._wake)
