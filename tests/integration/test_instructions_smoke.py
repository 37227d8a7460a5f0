"""Smoke test of benchmarks/instructions.py (our daemon under callgrind):
one tiny count of a directory listing. Asserts that it keeps working and
that the figure it gives is a count of this workload (a listing of 500
entries cannot cost fewer instructions than the 502 records it packs);
never a speed."""
from __future__ import annotations

import asyncio
import shutil
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def instructions():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import instructions

        yield instructions
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_a_listing_is_counted(instructions, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    assert shutil.which("valgrind"), "valgrind is missing: scripts/setup-system.sh installs it"
    out = tmp_path / "profile.out"
    per_listing = asyncio.run(instructions.measure("list", 2, tmp_path / "work", out, warmup=1))
    assert 502 * 10 < per_listing < 100_000_000
    assert out.read_text().count("summary:") == 1
