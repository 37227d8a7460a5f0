"""Guest memory: the vhost-user frontend's shared RAM, mapped into this process.

The frontend hands over memory regions as file descriptors (SET_MEM_TABLE /
ADD_MEM_REG). :class:`GuestMemory` maps them and translates guest physical
addresses (what descriptors hold) into writable ``memoryview`` slices.

Every address that comes from the guest is checked: a range must lie inside
mapped memory, and ``gpa + length`` may not exceed 2**64. Bad ranges raise
:class:`~virtiofs_async.errors.VringError`; bad region parameters from the
frontend raise :class:`~virtiofs_async.errors.VhostUserProtocolError`.

Views handed out keep their mapping alive: removing a region (or closing)
drops this object's reference, and the kernel mapping goes away when the last
view is garbage-collected. So a view is never dangling, but it may point at
memory the frontend no longer considers part of the guest.
"""
from __future__ import annotations

import bisect
import itertools
import mmap
import os
import sys
import attrs

from .errors import VhostUserProtocolError, VringError

__all__ = ["GuestMemory", "MemoryRegion"]

_ADDR_LIMIT = 1 << 64
_OFF_LIMIT = 1 << 63  # off_t is signed
_PAGE = mmap.ALLOCATIONGRANULARITY
_EMPTY = memoryview(bytearray())  # writable, zero-length; shared by all empty views
_generations = itertools.count(1)


@attrs.frozen
class MemoryRegion:
    """One mapped region, as the frontend described it (read-only record)."""

    guest_phys_addr: int
    size: int
    user_addr: int
    mmap_offset: int


class _Mapping:
    """A region plus the live mapping backing it."""

    __slots__ = ("region", "gpa", "end", "size", "uva", "mm", "view")

    def __init__(self, region: MemoryRegion, mm: mmap.mmap, view: memoryview) -> None:
        self.region = region
        self.gpa = region.guest_phys_addr
        self.size = region.size
        self.end = region.guest_phys_addr + region.size
        self.uva = region.user_addr
        self.mm = mm
        self.view = view

    def unmap(self) -> None:
        """Release our view and unmap; if views are still exported, leave the
        unmapping to the garbage collector (never raises)."""
        view, self.view = self.view, _EMPTY
        try:
            view.release()
        except BufferError:
            pass
        try:
            self.mm.close()
        except BufferError:
            pass


def _check_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise VhostUserProtocolError(f"memory region {name} must be an int, not {type(value).__name__}")
    if value < 0:
        raise VhostUserProtocolError(f"memory region {name} is negative: {value}")
    return value


class GuestMemory:
    """The guest's RAM as a set of non-overlapping (in guest-physical space)
    mapped regions.

    ``generation`` is a number that is unique across all instances and changes
    whenever the set of regions changes; users that cache views (the virtqueue)
    compare it to know when to look addresses up again.
    """

    __slots__ = ("_starts", "_maps", "generation", "__weakref__")

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[_Mapping] = []
        self.generation: int = next(_generations)

    # -- configuration -------------------------------------------------------

    def add_region(self, fd: int, guest_phys_addr: int, size: int, user_addr: int, mmap_offset: int) -> None:
        """Map ``size`` bytes of ``fd`` from ``mmap_offset`` at ``guest_phys_addr``.

        Takes ownership of ``fd``: it is closed before this returns, whether
        the call succeeds or fails. Raises VhostUserProtocolError for a zero
        size, a range past 2**64, an overlap with an existing region, or a
        mapping the kernel refuses (e.g. past the end of the file).
        """
        try:
            gpa = _check_int("guest_phys_addr", guest_phys_addr)
            size = _check_int("size", size)
            uva = _check_int("user_addr", user_addr)
            offset = _check_int("mmap_offset", mmap_offset)
            if size == 0:
                raise VhostUserProtocolError("memory region of size 0")
            if gpa + size > _ADDR_LIMIT:
                raise VhostUserProtocolError(f"memory region {gpa:#x}+{size:#x} overflows the guest address space")
            if uva + size > _ADDR_LIMIT:
                raise VhostUserProtocolError(f"memory region user address {uva:#x}+{size:#x} overflows")
            delta = offset % _PAGE
            aligned = offset - delta
            if offset + size > _OFF_LIMIT or delta + size > sys.maxsize:
                raise VhostUserProtocolError(f"memory region offset {offset:#x}+{size:#x} is too large")
            end = gpa + size
            i = bisect.bisect_right(self._starts, gpa)
            if i > 0 and self._maps[i - 1].end > gpa:
                raise VhostUserProtocolError(f"memory region at {gpa:#x} overlaps an existing region")
            if i < len(self._maps) and self._maps[i].gpa < end:
                raise VhostUserProtocolError(f"memory region at {gpa:#x} overlaps an existing region")
            kwargs = {"trackfd": False} if sys.version_info >= (3, 13) else {}
            try:
                mm = mmap.mmap(
                    fd,
                    delta + size,
                    flags=mmap.MAP_SHARED,
                    prot=mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=aligned,
                    **kwargs,
                )
            except (OSError, ValueError, OverflowError, TypeError) as exc:
                raise VhostUserProtocolError(f"cannot map memory region at {gpa:#x}: {exc}") from exc
        finally:
            try:
                os.close(fd)
            except (OSError, TypeError):
                pass
        view = memoryview(mm)[delta : delta + size]
        region = MemoryRegion(guest_phys_addr=gpa, size=size, user_addr=uva, mmap_offset=offset)
        self._starts.insert(i, gpa)
        self._maps.insert(i, _Mapping(region, mm, view))
        self.generation = next(_generations)

    def remove_region(self, guest_phys_addr: int, size: int) -> None:
        """Unmap the region that starts at ``guest_phys_addr`` with ``size``
        bytes; VhostUserProtocolError if there is no such region."""
        i = bisect.bisect_left(self._starts, guest_phys_addr)
        if i == len(self._maps) or self._starts[i] != guest_phys_addr or self._maps[i].size != size:
            raise VhostUserProtocolError(f"no memory region at {guest_phys_addr:#x} of size {size:#x}")
        m = self._maps.pop(i)
        del self._starts[i]
        self.generation = next(_generations)
        m.unmap()

    def clear(self) -> None:
        """Remove every region (views already handed out stay valid)."""
        maps = self._maps
        self._maps = []
        self._starts = []
        self.generation = next(_generations)
        for m in maps:
            m.unmap()

    def close(self) -> None:
        """Same as :meth:`clear`; never raises."""
        self.clear()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """The mapped regions, sorted by guest physical address."""
        return tuple(m.region for m in self._maps)

    def __repr__(self) -> str:
        parts = ", ".join(f"{m.gpa:#x}+{m.size:#x}" for m in self._maps)
        return f"GuestMemory([{parts}])"

    # -- translation ----------------------------------------------------------

    def uva_to_gpa(self, user_addr: int, length: int) -> int:
        """Translate a frontend virtual address range to guest physical.

        The whole ``[user_addr, user_addr + length)`` must lie in one region;
        VringError otherwise.
        """
        if user_addr < 0 or length < 0 or user_addr + length > _ADDR_LIMIT:
            raise VringError(f"user address range {user_addr:#x}+{length:#x} is invalid")
        for m in self._maps:
            off = user_addr - m.uva
            if 0 <= off and off + length <= m.size:
                return m.gpa + off
        raise VringError(f"user address range {user_addr:#x}+{length:#x} is not in guest memory")

    def view(self, gpa: int, length: int) -> memoryview:
        """Writable view of ``[gpa, gpa + length)``, which must lie inside one
        region. A zero-length view is allowed at any address below 2**64 (it
        touches no memory). VringError otherwise."""
        if length > 0:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i >= 0:
                m = self._maps[i]
                off = gpa - m.gpa
                if off + length <= m.size:
                    return m.view[off : off + length]
        elif length == 0 and 0 <= gpa <= _ADDR_LIMIT:
            return _EMPTY
        raise VringError(f"guest range {gpa:#x}+{length:#x} is not in mapped memory")

    def append_views(self, out: list, gpa: int, length: int) -> None:
        """Append to ``out`` views covering ``[gpa, gpa + length)``, which may
        span regions that are adjacent in guest physical space (one view per
        region crossed; none for a zero length). VringError if any byte is
        unmapped; ``out`` is left unchanged then."""
        if length > 0:
            i = bisect.bisect_right(self._starts, gpa) - 1
            if i >= 0:
                m = self._maps[i]
                off = gpa - m.gpa
                if off + length <= m.size:  # fast path: one region
                    out.append(m.view[off : off + length])
                    return
                if off < m.size:
                    self._append_spanning(out, i, off, gpa, length)
                    return
        elif length == 0 and 0 <= gpa <= _ADDR_LIMIT:
            return
        raise VringError(f"guest range {gpa:#x}+{length:#x} is not in mapped memory")

    def _append_spanning(self, out: list, i: int, off: int, gpa: int, length: int) -> None:
        maps = self._maps
        pieces = []
        remaining = length
        while True:
            m = maps[i]
            take = min(m.size - off, remaining)
            pieces.append(m.view[off : off + take])
            remaining -= take
            if remaining == 0:
                out.extend(pieces)
                return
            i += 1
            if i == len(maps) or maps[i].gpa != m.end:
                raise VringError(f"guest range {gpa:#x}+{length:#x} is not in mapped memory")
            off = 0

    def views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering ``[gpa, gpa + length)``, possibly across adjacent
        regions; an empty list for a zero length. VringError if unmapped."""
        out: list[memoryview] = []
        self.append_views(out, gpa, length)
        return out

    def read(self, gpa: int, length: int) -> bytes:
        """Copy of ``[gpa, gpa + length)`` (may span adjacent regions)."""
        pieces = self.views(gpa, length)
        if len(pieces) == 1:
            return bytes(pieces[0])
        return b"".join(pieces)

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Copy ``data`` to ``gpa`` (may span adjacent regions); nothing is
        written if any byte of the range is unmapped (VringError)."""
        src = memoryview(data).cast("B")
        pos = 0
        for piece in self.views(gpa, len(src)):
            n = len(piece)
            piece[:] = src[pos : pos + n]
            pos += n
