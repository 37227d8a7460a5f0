"""GuestMemory: mapping frontend regions and translating guest addresses."""
from __future__ import annotations

import errno
import mmap
import os

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtiofs_async.errors import ProtocolError, VhostUserProtocolError, VringError
from virtiofs_async.memory import GuestMemory, MemoryRegion

PAGE = mmap.ALLOCATIONGRANULARITY
FILE_SIZE = 16 * PAGE
PATTERN = bytes((i * 7 + i // 251) % 256 for i in range(FILE_SIZE))
UVA = 0x7F00_0000_0000


@pytest.fixture
def memfd():
    """A memfd filled with PATTERN; the test's own fd (dup it for add_region)."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.write(fd, PATTERN)
    yield fd
    os.close(fd)


def fd_is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        return exc.errno == errno.EBADF
    return False


def test_unaligned_offset_maps_the_right_bytes(memfd: int) -> None:
    mem = GuestMemory()
    offset = 0x1234
    mem.add_region(os.dup(memfd), 0x10_0000, 0x3000, UVA, offset)
    assert bytes(mem.view(0x10_0000, 16)) == PATTERN[offset : offset + 16]
    assert mem.read(0x10_0000 + 0x2FF0, 0x10) == PATTERN[offset + 0x2FF0 : offset + 0x3000]
    # writes land in the shared file at the right offset
    mem.write(0x10_0010, b"hello")
    assert os.pread(memfd, 5, offset + 0x10) == b"hello"
    view = mem.view(0x10_0020, 3)
    assert not view.readonly
    view[:] = b"xyz"
    assert os.pread(memfd, 3, offset + 0x20) == b"xyz"
    mem.close()


def test_region_record(memfd: int) -> None:
    mem = GuestMemory()
    mem.add_region(os.dup(memfd), 0x20_0000, PAGE, UVA + PAGE, 0)
    mem.add_region(os.dup(memfd), 0x1000, 0x800, UVA, 0x10)
    assert mem.regions == (
        MemoryRegion(guest_phys_addr=0x1000, size=0x800, user_addr=UVA, mmap_offset=0x10),
        MemoryRegion(guest_phys_addr=0x20_0000, size=PAGE, user_addr=UVA + PAGE, mmap_offset=0),
    )
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        mem.regions[0].size = 1  # type: ignore[misc]
    mem.close()
    assert mem.regions == ()


def test_fd_is_closed_after_success(memfd: int) -> None:
    fd = os.dup(memfd)
    GuestMemory().add_region(fd, 0, PAGE, UVA, 0)
    assert fd_is_closed(fd)


@pytest.mark.parametrize(
    "gpa, size, uva, offset",
    [
        (0, 0, UVA, 0),  # zero size
        (2**64 - PAGE, 2 * PAGE, UVA, 0),  # guest range overflows
        (0, PAGE, 2**64 - 1, 0),  # user range overflows
        (0, FILE_SIZE + 1, UVA, 0),  # past the end of the file
        (0, PAGE, UVA, FILE_SIZE - 1),  # offset + size past the end of the file
        (-PAGE, PAGE, UVA, 0),  # negative
        (0, PAGE, UVA, -1),
        (0, PAGE, UVA, 2**63),  # offset does not fit off_t
    ],
)
def test_bad_region_is_rejected_and_fd_closed(memfd: int, gpa: int, size: int, uva: int, offset: int) -> None:
    mem = GuestMemory()
    fd = os.dup(memfd)
    with pytest.raises(VhostUserProtocolError) as info:
        mem.add_region(fd, gpa, size, uva, offset)
    assert isinstance(info.value, ProtocolError)
    assert fd_is_closed(fd)
    assert mem.regions == ()


def test_bad_fd_is_a_protocol_error() -> None:
    r, w = os.pipe()  # a pipe cannot be mmapped
    os.close(w)
    with pytest.raises(VhostUserProtocolError):
        GuestMemory().add_region(r, 0, PAGE, UVA, 0)
    assert fd_is_closed(r)


@pytest.mark.parametrize(
    "gpa, size",
    [
        (0x10000, 0x1000),  # identical
        (0x0F800, 0x1000),  # overlaps the start
        (0x10800, 0x1000),  # overlaps the end
        (0x0F000, 0x4000),  # contains it
        (0x10400, 0x0100),  # inside it
    ],
)
def test_overlapping_regions_are_rejected(memfd: int, gpa: int, size: int) -> None:
    mem = GuestMemory()
    mem.add_region(os.dup(memfd), 0x10000, 0x1000, UVA, 0)
    fd = os.dup(memfd)
    with pytest.raises(VhostUserProtocolError):
        mem.add_region(fd, gpa, size, UVA + 0x10000, 0)
    assert fd_is_closed(fd)
    assert len(mem.regions) == 1


def test_adjacent_regions_are_accepted(memfd: int) -> None:
    mem = GuestMemory()
    mem.add_region(os.dup(memfd), 0x10000, 0x1000, UVA, 0)
    mem.add_region(os.dup(memfd), 0x11000, 0x1000, UVA + 0x1000, 0x1000)
    mem.add_region(os.dup(memfd), 0x0F000, 0x1000, UVA + 0x2000, 0x2000)
    assert [r.guest_phys_addr for r in mem.regions] == [0xF000, 0x10000, 0x11000]


@pytest.fixture
def two_regions(memfd: int) -> GuestMemory:
    """gpa 0x1000..0x1a35 -> file 0x123..; gpa 0x1a35..0x3000 -> file 0x5000..;
    gap; gpa 0x8000..0x9000 -> file 0x9000.."""
    mem = GuestMemory()
    mem.add_region(os.dup(memfd), 0x1000, 0xA35, UVA, 0x123)
    mem.add_region(os.dup(memfd), 0x1A35, 0x3000 - 0x1A35, UVA + 0x10000, 0x5000)
    mem.add_region(os.dup(memfd), 0x8000, 0x1000, UVA + 0x20000, 0x9000)
    yield mem
    mem.close()


def model_read(gpa: int, length: int) -> bytes:
    """What two_regions holds, computed from PATTERN."""
    out = bytearray()
    for g in range(gpa, gpa + length):
        if 0x1000 <= g < 0x1A35:
            out.append(PATTERN[0x123 + g - 0x1000])
        elif 0x1A35 <= g < 0x3000:
            out.append(PATTERN[0x5000 + g - 0x1A35])
        elif 0x8000 <= g < 0x9000:
            out.append(PATTERN[0x9000 + g - 0x8000])
        else:
            raise AssertionError("unmapped")
    return bytes(out)


def test_views_span_adjacent_regions(two_regions: GuestMemory) -> None:
    mem = two_regions
    pieces = mem.views(0x1A30, 0x10)
    assert [len(p) for p in pieces] == [5, 11]
    assert mem.read(0x1A30, 0x10) == model_read(0x1A30, 0x10)
    with pytest.raises(VringError):
        mem.view(0x1A30, 0x10)  # view() is one region only
    # a range that runs into the gap
    with pytest.raises(VringError):
        mem.views(0x2FF0, 0x20)
    with pytest.raises(VringError):
        mem.read(0x1000, 0x3000)


def test_write_spanning_regions(two_regions: GuestMemory, memfd: int) -> None:
    two_regions.write(0x1A33, b"ABCDEF")
    assert os.pread(memfd, 2, 0x123 + 0xA33) == b"AB"
    assert os.pread(memfd, 4, 0x5000) == b"CDEF"


def test_failed_write_writes_nothing(two_regions: GuestMemory, memfd: int) -> None:
    before = os.pread(memfd, 16, 0x5000 + 0x3000 - 0x1A35 - 8)
    with pytest.raises(VringError):
        two_regions.write(0x2FF8, b"x" * 16)  # last 8 bytes are in the gap
    assert os.pread(memfd, 16, 0x5000 + 0x3000 - 0x1A35 - 8) == before


@pytest.mark.parametrize(
    "gpa, length",
    [
        (0x0FFF, 1),  # just before the first region
        (0x0FFF, 2),  # straddles the start
        (0x2FFF, 2),  # straddles into the gap
        (0x3000, 1),  # in the gap
        (0x9000, 1),  # just after the last region
        (0x8FFF, 2),
        (2**64 - 1, 2),  # overflows 2**64
        (2**64, 1),
        (-1, 1),
        (0x1000, -1),
        (0x8000, 2**64),
    ],
)
def test_out_of_range_is_a_vring_error(two_regions: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(VringError):
        two_regions.view(gpa, length)
    with pytest.raises(VringError):
        two_regions.views(gpa, length)
    with pytest.raises(VringError):
        two_regions.read(gpa, length)


def test_zero_length(two_regions: GuestMemory) -> None:
    mem = two_regions
    assert len(mem.view(0x1000, 0)) == 0
    assert len(mem.view(0x5000, 0)) == 0  # touches no memory, so allowed in the gap
    assert not mem.view(0x5000, 0).readonly
    assert mem.views(0x5000, 0) == []
    assert mem.read(0x8FFF, 0) == b""
    mem.write(0x4000, b"")
    with pytest.raises(VringError):
        mem.view(2**64 + 1, 0)


def test_uva_to_gpa(two_regions: GuestMemory) -> None:
    mem = two_regions
    assert mem.uva_to_gpa(UVA, 0xA35) == 0x1000
    assert mem.uva_to_gpa(UVA + 0x10, 4) == 0x1010
    assert mem.uva_to_gpa(UVA + 0x20000 + 0x800, 0x800) == 0x8800
    for uva, length in [(UVA + 0xA30, 0x10), (UVA - 1, 2), (UVA + 0x20000, 0x1001), (2**64 - 1, 2), (-1, 1)]:
        with pytest.raises(VringError):
            mem.uva_to_gpa(uva, length)


def test_remove_region(two_regions: GuestMemory) -> None:
    mem = two_regions
    kept = mem.view(0x8000, 4)
    gen = mem.generation
    with pytest.raises(VhostUserProtocolError):
        mem.remove_region(0x8000, 0x800)  # wrong size
    with pytest.raises(VhostUserProtocolError):
        mem.remove_region(0x8800, 0x800)  # not a region start
    assert mem.generation == gen
    mem.remove_region(0x8000, 0x1000)
    assert mem.generation != gen
    assert [r.guest_phys_addr for r in mem.regions] == [0x1000, 0x1A35]
    with pytest.raises(VringError):
        mem.view(0x8000, 4)
    # a view taken before removal still works (the mapping lives on)
    assert bytes(kept) == PATTERN[0x9000:0x9004]


def test_close_with_exported_views_does_not_raise(memfd: int) -> None:
    mem = GuestMemory()
    mem.add_region(os.dup(memfd), 0, 2 * PAGE, UVA, 0)
    held = mem.view(16, 8)
    also = mem.views(PAGE - 4, 8)[0]
    mem.close()
    mem.close()  # idempotent
    assert mem.regions == ()
    assert bytes(held) == PATTERN[16:24]
    also[:] = b"12345678"
    assert os.pread(memfd, 8, PAGE - 4) == b"12345678"
    with pytest.raises(VringError):
        mem.view(16, 8)


def test_generation_is_unique_and_changes() -> None:
    a, b = GuestMemory(), GuestMemory()
    assert a.generation != b.generation
    g = a.generation
    a.clear()
    assert a.generation not in (g, b.generation)


def test_context_manager(memfd: int) -> None:
    with GuestMemory() as mem:
        mem.add_region(os.dup(memfd), 0, PAGE, UVA, 0)
        assert mem.read(0, 4) == PATTERN[:4]
    assert mem.regions == ()


# -- property test against a byte-level model ---------------------------------------

_SEGMENTS = [(0x1000, 0x1A35), (0x1A35, 0x3000), (0x8000, 0x9000)]


@pytest.fixture(scope="module")
def shared_regions() -> GuestMemory:
    """The two_regions layout, built once for the property test (read-only)."""
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.write(fd, PATTERN)
    mem = GuestMemory()
    mem.add_region(os.dup(fd), 0x1000, 0xA35, UVA, 0x123)
    mem.add_region(os.dup(fd), 0x1A35, 0x3000 - 0x1A35, UVA + 0x10000, 0x5000)
    mem.add_region(fd, 0x8000, 0x1000, UVA + 0x20000, 0x9000)
    yield mem
    mem.close()


@settings(max_examples=300, deadline=None)
@given(gpa=st.integers(0x0F00, 0x9100), length=st.integers(0, 0x2100))
def test_lookup_matches_model(shared_regions: GuestMemory, gpa: int, length: int) -> None:
    mem = shared_regions
    end = gpa + length
    in_one = length == 0 or any(lo <= gpa and end <= hi for lo, hi in _SEGMENTS)
    in_span = length == 0 or (0x1000 <= gpa and end <= 0x3000) or (0x8000 <= gpa and end <= 0x9000)
    if in_one:
        assert bytes(mem.view(gpa, length)) == (model_read(gpa, length) if length else b"")
    else:
        with pytest.raises(VringError):
            mem.view(gpa, length)
    if in_span:
        pieces = mem.views(gpa, length)
        assert sum(map(len, pieces)) == length
        assert all(len(p) > 0 for p in pieces)
        assert mem.read(gpa, length) == (model_read(gpa, length) if length else b"")
    else:
        with pytest.raises(VringError):
            mem.views(gpa, length)
