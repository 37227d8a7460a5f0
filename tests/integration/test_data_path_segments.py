"""The compiled data path hands the kernel one segment per run of adjacent
guest buffers: a WRITE or READ of 128 KiB whose 4 KiB pages follow each
other in guest memory is one ``pwritev`` / ``preadv2`` segment, not 32.

The daemon runs as a process under ``strace``, which records the segment
count of each call; the bytes are checked too.
"""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import virtiofs_async
from virtiofs_async.testing import FuseClient

SRC = str(Path(virtiofs_async.__file__).resolve().parents[1])
SIZE = 128 * 1024
# strace -s 0: ``PID   pwritev(25, [...], 1, 0)          = 131072`` and
# ``PID   preadv2(25, [...], 1, 0, RWF_NOWAIT) = 131072`` (fd, segments, offset)
CALL = re.compile(r"^\d+\s+(pwritev2?|preadv2?)\(\d+, \[.*\], (\d+), (\d+)(?:, [^)]*)?\)\s+= (-?\d+)")


def _calls(log: Path) -> list[tuple[str, int, int, int]]:
    """(syscall, segment count, offset, result) of each traced call."""
    return [(m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)))
            for m in map(CALL.match, log.read_text().splitlines()) if m]


def test_adjacent_guest_pages_are_one_segment_for_the_kernel(tmp_path: Path) -> None:
    # Both needed, not optional: scripts/setup-system.sh installs strace, and
    # every test run builds the compiled modules (the daemon runs them here).
    assert shutil.which("strace"), "strace is missing: run scripts/setup-system.sh"
    import virtiofs_async._cy_responder  # noqa: F401
    share = tmp_path / "share"
    share.mkdir()
    sock = str(tmp_path / "vfs.sock")
    log = tmp_path / "strace.log"
    env = {**os.environ, "PYTHONPATH": SRC, "VIRTIOFS_ASYNC_IMPLEMENTATION": "cython"}
    proc = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "0", "-e", "trace=pwritev,pwritev2,preadv,preadv2", "-o", str(log),
         sys.executable, "-m", "virtiofs_async", "--socket-path", sock, "--shared-dir", str(share),
         "--cache", "auto", "--sandbox", "none"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    data = os.urandom(SIZE)

    async def drive() -> bytes:
        async with FuseClient.connect(sock, connect_timeout=30) as client:
            created = await client.create(1, b"f")
            node, fh = created.entry.nodeid, created.open.fh
            assert await client.write(node, fh, 0, data) == SIZE
            got = await client.read(node, fh, 0, SIZE)
            await client.release(node, fh)
            return bytes(got)

    try:
        assert asyncio.run(drive()) == data
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (share / "f").read_bytes() == data
    calls = _calls(log)
    writes = [c[1:] for c in calls if c[0].startswith("pwritev")]
    reads = [c[1:] for c in calls if c[0].startswith("preadv")]
    # The client's pages are adjacent in guest memory: one segment each call.
    assert writes == [(1, 0, SIZE)], calls
    # (a large READ may be read in pieces by two threads: one segment each)
    assert reads and all(count == 1 for count, _, _ in reads), calls
    assert sum(r for *_, r in reads) == SIZE and min(o for _, o, _ in reads) == 0, calls
