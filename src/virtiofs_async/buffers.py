"""Scatter-gather helpers over lists of guest buffers (memoryviews).

Pure-Python reference; the compiled twin lives in cyext/vring.pyx.
"""
from __future__ import annotations

from typing import Iterable, Sequence


def scatter(writable: Sequence[memoryview], parts: Iterable[bytes | bytearray | memoryview]) -> int:
    """Copy ``parts`` back to back into the buffers ``writable``; return the
    number of bytes copied. The caller has checked that they fit: what does not
    fit is dropped (never written past a buffer)."""
    views = iter(writable)
    dest: memoryview | None = None
    dest_pos = 0
    dest_len = 0
    total = 0
    for part in parts:
        src = part if isinstance(part, memoryview) else memoryview(part)
        if src.format != "B" or src.ndim != 1:
            src = src.cast("B")
        pos = 0
        remaining = len(src)
        while remaining:
            if dest is None or dest_pos == dest_len:
                dest = next(views, None)
                if dest is None:
                    return total
                dest_pos = 0
                dest_len = dest.nbytes
                continue
            n = min(remaining, dest_len - dest_pos)
            dest[dest_pos:dest_pos + n] = src[pos:pos + n]
            dest_pos += n
            pos += n
            remaining -= n
            total += n
    return total


def gather(readable: Sequence[memoryview]) -> bytes:
    """The concatenation of ``readable`` as one bytes object (copies)."""
    return b"".join(readable)
