"""User-space instructions our daemon spends per request, counted by callgrind.

Timing on a shared 2-core machine moves by 15-40% from one run to the
next; instruction counts do not. This runs our daemon under
``valgrind --tool=callgrind``, drives it with the testing frontend (one
request at a time), zeroes the counters after a warm-up, runs ``--count``
operations, dumps the counters and prints instructions per operation.
Syscalls (kernel time) are not counted: this is the part a Python daemon
adds. QEMU's C virtiofsd does not run under valgrind (its seccomp filter
refuses valgrind's syscalls), so only our daemon is measured.

Operations: ``getattr`` (one GETATTR), ``lookup`` (one LOOKUP of a known
name), ``list`` (what a guest's ``os.listdir`` of a 500-entry directory
sends: OPENDIR, READDIRPLUS of a page, READDIRs to the end, RELEASEDIR,
then FORGET of the READDIRPLUS entries), ``untar`` (what a guest's
``tar -x`` sends per file of a few KiB: GETATTR of the directory, LOOKUP
of the new name (ENOENT), CREATE, two WRITEs, SETATTR of the mtime, of
the owner and of the mode, FLUSH, RELEASE: 11 requests, each file a new
one in a directory that grows); and what a guest's metadata phase sends
per file, each file one it has not seen (``create``: LOOKUP of the new
name (ENOENT), CREATE, FLUSH, RELEASE, then the FORGET its cache drop
sends; ``stat``: LOOKUP, FORGET; ``unlink``: LOOKUP, UNLINK, FORGET).

Run: PYTHONPATH=src python benchmarks/instructions.py --op getattr --count 1000
(add --callgrind-out FILE to keep the profile for callgrind_annotate).
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from virtiofs_async.errors import FuseError
from virtiofs_async.testing.client import FuseClient

LIST_FILES = 500
OPS = ("getattr", "lookup", "list", "untar", "create", "stat", "unlink")


async def _listing(client: FuseClient, dnode: int) -> None:
    fh = (await client.opendir(dnode)).fh
    plus = await client.readdirplus(dnode, fh, 0, 4096)
    total, off = len(plus), plus[-1].dirent.off
    while True:
        entries = await client.readdir(dnode, fh, off, 4096)
        if not entries:
            break
        total, off = total + len(entries), entries[-1].off
    await client.releasedir(dnode, fh)
    if total != LIST_FILES + 2:
        raise AssertionError(f"listed {total} entries, expected {LIST_FILES + 2}")
    for e in plus:
        if e.dirent.name not in (b".", b".."):
            await client.forget(e.entry.nodeid, 1)


_UNTAR_DATA = bytes(range(256)) * 10 + bytes(783)


async def _lookup_absent(client: FuseClient, dnode: int, name: bytes) -> None:
    """The LOOKUP a guest sends before it creates ``name`` (ENOENT)."""
    try:
        await client.lookup(dnode, name)
    except FuseError as exc:
        if exc.errno != errno.ENOENT:
            raise
    else:
        raise AssertionError(f"{name!r} exists before its CREATE")


async def _untar_file(client: FuseClient, dnode: int, name: bytes) -> None:
    await client.getattr(dnode)
    await _lookup_absent(client, dnode, name)
    created = await client.create(dnode, name, 0o600, os.O_WRONLY | os.O_EXCL)
    node, fh = created.entry.nodeid, created.open.fh
    await client.write(node, fh, 0, _UNTAR_DATA[:2560])
    await client.write(node, fh, 2560, _UNTAR_DATA[2560:])
    await client.setattr(node, mtime_ns=1_700_000_000 * 10**9)
    await client.setattr(node, uid=os.getuid(), gid=os.getgid(), lock_owner=0)
    out = await client.setattr(node, mode=0o644)
    if out.attr.size != len(_UNTAR_DATA):
        raise AssertionError(f"{name!r}: size {out.attr.size}, wrote {len(_UNTAR_DATA)}")
    await client.flush(node, fh)
    await client.release(node, fh, os.O_WRONLY)


async def _meta_file(client: FuseClient, op: str, dnode: int, name: bytes) -> None:
    if op == "create":
        await _lookup_absent(client, dnode, name)
        created = await client.create(dnode, name, 0o644, os.O_WRONLY | os.O_EXCL)
        node, fh = created.entry.nodeid, created.open.fh
        await client.flush(node, fh)
        await client.release(node, fh, os.O_WRONLY)
    else:
        node = (await client.lookup(dnode, name)).nodeid
        if op == "unlink":
            await client.unlink(dnode, name)
    await client.forget(node, 1)


def _summary(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError(f"{path}: no callgrind summary line")


async def measure(op: str, count: int, workdir: Path, out: Path | None = None, warmup: int = 3) -> float:
    """Instructions per ``op`` (see the module docstring) over ``count``."""
    share = workdir / "share"
    share.mkdir(parents=True)
    (share / "stat-target").write_bytes(b"x" * 4096)
    listed = share / "dir"
    listed.mkdir()
    for i in range(LIST_FILES):
        (listed / f"f{i:06d}").touch()
    meta = share / "meta"
    meta.mkdir()
    if op in ("stat", "unlink"):
        for i in range(warmup + count):
            (meta / f"m{i:06d}").touch()
    sock = workdir / "vfs.sock"
    dump = workdir / "callgrind.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}", sys.executable, "-m",
            "virtiofs_async", "--socket-path", str(sock), "--shared-dir", str(share), "--cache", "auto",
            "--sandbox", "none"]
    with open(workdir / "daemon.log", "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with FuseClient.connect(str(sock), indirect=True, queue_size=1024, memory_size=128 << 20,
                                      connect_timeout=120) as client:
            node = (await client.lookup(1, b"stat-target")).nodeid
            dnode = (await client.lookup(1, b"dir")).nodeid
            unode = (await client.mkdir(1, b"untar", 0o755)).nodeid
            mnode = (await client.lookup(1, b"meta")).nodeid
            files = iter(range(1 << 30))

            async def one() -> None:
                if op == "getattr":
                    await client.getattr(node)
                elif op == "lookup":
                    await client.lookup(1, b"stat-target")
                elif op == "untar":
                    await _untar_file(client, unode, b"f%06d.py" % next(files))
                elif op in ("create", "stat", "unlink"):
                    await _meta_file(client, op, mnode, b"m%06d" % next(files))
                else:
                    await _listing(client, dnode)

            for _ in range(warmup):
                await one()
            subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
            for _ in range(count):
                await one()
            subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    dumps = sorted(workdir.glob("callgrind.out.*"))  # the counters dumped after the zeroing
    if not dumps:
        raise RuntimeError(f"callgrind wrote no dump; see {workdir / 'daemon.log'}")
    if out is not None:
        shutil.copyfile(dumps[0], out)
    return _summary(dumps[0]) / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--op", choices=OPS, default="getattr")
    ap.add_argument("--count", type=int, default=1000, help="operations counted (after 3 uncounted)")
    ap.add_argument("--callgrind-out", type=Path, help="keep the callgrind profile here")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (scripts/setup-system.sh installs it)")
    with tempfile.TemporaryDirectory(prefix="vfa-instr-") as tmp:
        per_op = asyncio.run(measure(args.op, args.count, Path(tmp), args.callgrind_out))
    print(f"{args.op}: {per_op:,.0f} instructions per operation (user space, daemon process, "
          f"{args.count} counted)")


if __name__ == "__main__":
    main()
