"""A pool of worker threads for ``preadv`` / ``pwritev`` whose results come
back in batches through one eventfd (the pure-Python twin of
``cyext/iopool.pyx``, which runs the same jobs without the GIL).

Contract (both twins):

* ``submit(op, fd, buffers, offset, token)`` queues one ``preadv``
  (:data:`PREADV`, ``buffers`` writable) or ``pwritev`` (:data:`PWRITEV`)
  of 1 to :data:`MAX_BUFFERS` buffers at ``offset``: one syscall, so the
  transfer may be short. The pool keeps each buffer exported (and
  ``token`` referenced) until the job's result is drained: the caller must
  keep ``fd`` open until then. Bad arguments raise at once.
* ``fd`` is an eventfd that becomes readable when results are waiting;
  ``drain()`` consumes it and returns ``[(token, result), ...]``, the byte
  count or ``-errno``, in the order the jobs finished.
* At most ``max_threads`` workers, started on demand. ``close()`` lets the
  queued jobs run, then the workers stop and the eventfd is closed.
"""
from __future__ import annotations

import errno
import os
import threading
from collections import deque
from typing import Any, Sequence

PREADV = 0
PWRITEV = 1
#: The most buffers one job may carry (the kernel's IOV_MAX).
MAX_BUFFERS = 1024


class IoPool:
    def __init__(self, max_threads: int = 64, name: str = "virtiofs-io") -> None:
        self._max = max(1, max_threads)
        self._name = name
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[tuple[int, int, list[memoryview], int, Any]] = deque()
        #: (token, result, views): the views are released by ``drain``
        self._done: list[tuple[Any, int, list[memoryview]]] = []
        self._idle = 0
        self._threads = 0
        self._closing = False
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    @property
    def fd(self) -> int:
        return self._efd

    @property
    def closed(self) -> bool:
        return self._closing

    def submit(self, op: int, fd: int, buffers: Sequence[Any], offset: int, token: Any) -> None:
        if op not in (PREADV, PWRITEV):
            raise ValueError(f"unknown operation {op}")
        if self._closing:
            raise RuntimeError("the I/O pool is closed")
        if not 1 <= len(buffers) <= MAX_BUFFERS:
            raise ValueError(f"a job takes 1 to {MAX_BUFFERS} buffers, not {len(buffers)}")
        if offset < 0:
            raise ValueError("negative offset")
        views = [memoryview(b) for b in buffers]  # exported until the job is drained
        if op == PREADV and any(v.readonly for v in views):
            raise BufferError("preadv needs writable buffers")
        start = False
        with self._lock:
            self._queue.append((op, fd, views, offset, token))
            if self._idle:
                self._wake.notify()
            elif self._threads < self._max:
                self._threads += 1
                start = True
        if start:
            threading.Thread(target=self._work, name=f"{self._name}_{self._threads}", daemon=True).start()

    def _work(self) -> None:
        lock = self._lock
        while True:
            with lock:
                while not self._queue and not self._closing:
                    self._idle += 1
                    self._wake.wait()
                    self._idle -= 1
                if not self._queue:
                    self._threads -= 1
                    if self._threads == 0:
                        os.close(self._efd)
                        self._efd = -1
                    return
                op, fd, views, offset, token = self._queue.popleft()
            try:
                result = (os.preadv if op == PREADV else os.pwritev)(fd, views, offset)
            except OSError as exc:
                result = -(exc.errno or errno.EIO)
            with lock:
                self._done.append((token, result, views))
                if len(self._done) == 1:
                    os.eventfd_write(self._efd, 1)
            del views, token

    def drain(self) -> list[tuple[Any, int]]:
        if self._efd >= 0:
            try:
                os.eventfd_read(self._efd)
            except BlockingIOError:
                pass
        with self._lock:
            done, self._done = self._done, []
        out = []
        for token, result, views in done:
            for view in views:
                view.release()
            out.append((token, result))
        return out

    def close(self) -> None:
        with self._lock:
            self._closing = True
            self._wake.notify_all()
            if self._threads == 0 and self._efd >= 0:
                os.close(self._efd)
                self._efd = -1
