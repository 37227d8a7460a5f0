"""Guest-level benchmark: a Linux guest (QEMU, TCG) working on virtio-fs
shares served by QEMU's C virtiofsd, the Rust virtiofsd and ours.

One guest serves every daemon: it boots with ``root``, the host's ``/``
read-only (QEMU's C virtiofsd, ``cache=always``, in a private mount
namespace), into which it chroots to run the host's ``python3``, ``fio``
and ``tar``, and one device per daemon under test (tag ``fs-DAEMON``), each
serving a fresh empty host directory (``cache=auto``), mounted on
``/mnt/DAEMON`` inside the chroot.  The guest side of this file
(``--guest-plan``, standard library only) runs the phases of a plan written
by the host, drops the guest's caches before each measurement (``sync; echo
3 > /proc/sys/vm/drop_caches``) and prints one ``BENCH {json}`` line per
phase, daemon and round on the guest's results channel (ttyS1); the host
parses them (fio's own JSON output included).

Phases: fio sequential write then read (1 MiB blocks, MiB/s); fio 4 KiB
random read then random write (psync, O_DIRECT so that every I/O is one
request to the daemon whatever the guest's page cache holds; the daemons
themselves do not open host files with O_DIRECT), IOPS (each job a fio
process of its own, see :func:`fio_argv`); create, stat,
readdir and unlink of many empty files (python3 in the guest, ops/s;
readdir counts listed entries per second); extracting an uncompressed
tarball of the Python standard library with GNU tar (seconds, copied into
the guest's RAM before the phase).

Runs are rounds, interleaved phase by phase in the one guest: round 1
runs fio's sequential write on c, rust, ours, then its sequential read
on rust, ours, c (each fio job a phase, rotated job by job), ..., then
meta on c, rust, ours, ...; each round
rotates the daemons' order (round 2 starts with rust), so that every daemon
is measured next to the others, under the same host load and guest state,
and none is always first.  The metadata phases of a round are interleaved
finer still: each step (create, stat, unlink) runs in chunks of the files
(``Sizes.meta_chunks``), each chunk on every daemon in turn before the
next, and each readdir pass on every daemon in turn; a daemon's time is
the sum of its chunks' (each timed after its own cache drop).  A step
takes seconds per daemon and the host's speed moves on that scale, so
this keeps a slow spell from landing on one daemon's whole step.

Alone: ``PYTHONPATH=src python benchmarks/guest_bench.py [--full] [--runs N]``
prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:  # the host side imports these lazily: the guest has neither
    from _report import Row
    from virtiofs_async.testing.vm import KernelAssets, TranscriptLine

LEVEL = "guest"
#: Daemons in the order each run boots them.
DAEMONS: tuple[str, ...] = ("c", "rust", "ours")
#: the guest's phases, in run order (``--phases`` picks some)
PHASES: tuple[str, ...] = ("fio", "meta", "untar")
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
STDLIB = Path("/usr/lib/python3.11")
GUEST_PYTHON = "/usr/bin/python3"
#: Inside the guest's chroot (the host's root): a tmpfs holding a mount
#: point per daemon under test (``/mnt/DAEMON``), and the guest's own RAM
#: (a bind of the initramfs's tmpfs).
GUEST_MOUNT = "/mnt"
GUEST_TMP = "/tmp"
MIB = 1 << 20


def seq_file(round_no: int) -> str:
    """The fio file of round ``round_no`` (from 1), in each daemon's share."""
    return f"seq-{round_no}.dat"


def untar_dir(round_no: int) -> str:
    """The extraction directory of round ``round_no``."""
    return f"untar-{round_no}"


def meta_dir(round_no: int) -> str:
    """The metadata phase's directory of round ``round_no`` (removed by it)."""
    return f"meta-{round_no}"


def device_tag(daemon: str) -> str:
    """The virtio-fs tag of ``daemon``'s device."""
    return f"fs-{daemon}"


def daemon_order(daemons: Sequence[str], round_no: int) -> list[str]:
    """The daemons in round ``round_no``'s order: rotated by one each round."""
    k = (round_no - 1) % len(daemons)
    return [*daemons[k:], *daemons[:k]]


class GuestBenchError(RuntimeError):
    """A boot failed, timed out, or its guest reported incomplete results."""


@dataclass(frozen=True)
class Sizes:
    """How big each workload is.

    ``seq_mib``: the fio file (sequential phases write/read it whole, the
    random phases work inside it); ``random_seconds``: duration of each
    random phase; ``files``: files of the metadata phases; ``readdir_passes``:
    listings of the directory (caches dropped before each, only the listing
    timed); ``stdlib_parts``: top-level names of /usr/lib/python3.11 to tar
    (empty: all of it); ``pycache``: include ``__pycache__`` directories;
    ``checksum``: the guest also prints the sha256 of the fio file (untimed,
    for checks); ``boot_timeout``: bound of one boot, seconds;
    ``meta_chunks``: chunks of each metadata step (see the module
    docstring).
    """

    seq_mib: int
    random_seconds: int
    files: int
    readdir_passes: int
    stdlib_parts: tuple[str, ...]
    pycache: bool
    checksum: bool
    boot_timeout: float
    meta_chunks: int = 5


FULL = Sizes(seq_mib=512, random_seconds=10, files=5000, readdir_passes=5,
             stdlib_parts=(), pycache=True, checksum=False, boot_timeout=1200.0)
#: A few minutes for 3 runs: a quarter of the stdlib's packages (~270 entries).
QUICK = Sizes(seq_mib=64, random_seconds=2, files=500, readdir_passes=3,
              stdlib_parts=("asyncio", "email", "encodings", "importlib", "json", "logging",
                            "unittest", "xml"),
              pycache=False, checksum=False, boot_timeout=300.0)
#: For the smoke test: every phase, a few seconds of work.
TINY = Sizes(seq_mib=8, random_seconds=1, files=50, readdir_passes=2,
             stdlib_parts=("json", "email", "abc.py"), pycache=False, checksum=True,
             boot_timeout=180.0, meta_chunks=2)


@dataclass(frozen=True)
class Workload:
    """One row of the table: ``key`` names the guest's measurement."""

    key: str
    title: str
    unit: str
    higher_is_better: bool


def workloads(sizes: Sizes, tar_entries: int, phases: Sequence[str] = PHASES) -> list[Workload]:
    """The rows of ``phases``, in table order, titled with their sizes."""
    seq, rnd, n = sizes.seq_mib, sizes.random_seconds, sizes.files
    rows = [
        Workload("seq_write", f"seq write {seq} MiB, 1 MiB blocks (fio)", "MiB/s", True),
        Workload("seq_read", f"seq read {seq} MiB, 1 MiB blocks (fio)", "MiB/s", True),
        Workload("rand_read", f"rand read 4 KiB, psync direct, {rnd} s (fio)", "IOPS", True),
        Workload("rand_write", f"rand write 4 KiB, psync direct, {rnd} s (fio)", "IOPS", True),
        Workload("create", f"create {n} files", "ops/s", True),
        Workload("stat", f"stat {n} files", "ops/s", True),
        Workload("readdir", f"readdir {n} files x{sizes.readdir_passes}", "entries/s", True),
        Workload("unlink", f"unlink {n} files", "ops/s", True),
        Workload("untar", f"untar Python stdlib ({tar_entries} entries)", "s", False),
    ]
    return [w for w in rows if phase_of(w.key) in phases]


def phase_of(key: str) -> str:
    """The guest phase that measures workload ``key``."""
    if key in {name for name, *_ in FIO_JOBS}:
        return "fio"
    return "untar" if key == "untar" else "meta"


# --------------------------------------------------------------------------
# Guest side (runs under the host's /usr/bin/python3 -S in the guest's chroot:
# standard library only)
# --------------------------------------------------------------------------


def _drop_guest_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:  # DROP_CACHES_SH
        f.write("3")


def _emit(phase: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """One ``BENCH`` line: ``record`` tagged with ``phase``'s daemon and round."""
    tagged = {**record, "daemon": phase["daemon"], "round": phase["round"]}
    print("BENCH " + json.dumps(tagged, separators=(",", ":")), flush=True)


def _guest_fio(phase: Mapping[str, Any]) -> None:
    """One fio run of the phase's job (fio itself drops the caches before
    it: see :func:`fio_argv`); its JSON output goes to the host as is,
    under the job's name."""
    # cwd: fio writes each job's exec_prerun output there.
    subprocess.run(phase["argv"], check=True, stdout=subprocess.DEVNULL, cwd=GUEST_TMP)
    with open(phase["output"]) as f:
        _emit(phase, {"key": phase["job"], "fio": json.load(f)})


def chunk_bounds(count: int, chunks: int) -> list[tuple[int, int]]:
    """``range(count)`` cut into ``chunks`` (at most ``count``) consecutive
    ``(start, stop)`` pieces whose sizes differ by at most one."""
    chunks = max(1, min(chunks, count))
    return [(count * i // chunks, count * (i + 1) // chunks) for i in range(chunks)]


def meta_groups(phases: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """``phases`` cut into runs: consecutive metadata phases of the same
    round form one group (run interleaved); every other phase is a group
    of its own."""
    groups: list[list[Mapping[str, Any]]] = []
    for phase in phases:
        last = groups[-1] if groups else None
        if (phase["kind"] == "meta" and last and last[0]["kind"] == "meta"
                and last[0]["round"] == phase["round"]):
            last.append(phase)
        else:
            groups.append([phase])
    return groups


def _guest_meta(group: Sequence[Mapping[str, Any]]) -> None:
    """create, stat, readdir, unlink of ``files`` empty files on each
    daemon of ``group`` (one round's metadata phases, in the round's
    order), interleaved chunk by chunk (see the module docstring): ops/s
    each, one record per daemon and step."""
    count, chunks = group[0]["files"], group[0]["chunks"]
    flags = os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC
    paths = [[f"{phase['dir']}/f{i:06d}" for i in range(count)] for phase in group]
    seconds = [{"create": 0.0, "stat": 0.0, "readdir": 0.0, "unlink": 0.0} for _ in group]
    listed = [0 for _ in group]
    for phase in group:
        os.mkdir(phase["dir"])

    for step in ("create", "stat", "unlink"):
        for k, (lo, hi) in enumerate(chunk_bounds(count, chunks)):
            # rotated chunk by chunk too: no daemon always right after another
            for j in [(i + k) % len(group) for i in range(len(group))]:
                chunk = paths[j][lo:hi]
                _drop_guest_caches()
                start = time.perf_counter()
                if step == "create":
                    for path in chunk:
                        os.close(os.open(path, flags, 0o644))
                elif step == "stat":
                    for path in chunk:
                        os.stat(path)
                else:
                    for path in chunk:
                        os.unlink(path)
                seconds[j][step] += time.perf_counter() - start
        if step == "stat":
            for k in range(group[0]["readdir_passes"]):
                for j in [(i + k) % len(group) for i in range(len(group))]:
                    _drop_guest_caches()
                    start = time.perf_counter()
                    names = os.listdir(group[j]["dir"])
                    seconds[j]["readdir"] += time.perf_counter() - start
                    if len(names) != count:
                        raise RuntimeError(f"readdir listed {len(names)} entries in {group[j]['dir']}, "
                                           f"created {count}")
                    listed[j] += len(names)

    for j, phase in enumerate(group):
        for key in ("create", "stat", "readdir", "unlink"):
            _emit(phase, {"key": key, "seconds": seconds[j][key], "ops": listed[j] if key == "readdir" else count})
        os.rmdir(phase["dir"])


def _guest_untar(phase: Mapping[str, Any]) -> None:
    os.mkdir(phase["dir"])
    _drop_guest_caches()
    # Load tar and its libraries again (dropped above) before the clock starts.
    subprocess.run(phase["warmup"], check=True, stdout=subprocess.DEVNULL)
    start = time.perf_counter()
    subprocess.run(phase["argv"], check=True)
    _emit(phase, {"key": "untar", "seconds": time.perf_counter() - start})


def _guest_sha256(phase: Mapping[str, Any]) -> None:
    _drop_guest_caches()
    digest = hashlib.sha256()
    with open(phase["path"], "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    _emit(phase, {"key": "sha256", "path": phase["path"], "sha256": digest.hexdigest()})


_GUEST_PHASES: dict[str, Callable[[Mapping[str, Any]], None]] = {
    "fio": _guest_fio, "untar": _guest_untar, "sha256": _guest_sha256,
}


def guest_main(plan_path: str) -> int:
    """Run every phase of the plan (JSON: ``{"phases": [...]}``) in order
    (each drops the guest's caches before each measurement).  Exit status 0
    when all completed."""
    with open(plan_path) as f:
        plan = json.load(f)
    for group in meta_groups(plan["phases"]):
        for phase in group:
            # diagnostics (the host stamps lines), and the order, for the tests
            print(f"# phase {phase['kind']} {phase['daemon']} {phase['round']}", flush=True)
        if group[0]["kind"] == "meta":
            _guest_meta(group)
        else:
            _GUEST_PHASES[group[0]["kind"]](group[0])
    print("BENCH-END", flush=True)
    return 0


# --------------------------------------------------------------------------
# Host side: the plan, the guest image, the daemons
# --------------------------------------------------------------------------


#: fio's jobs, in order: (workload key, rw, block size, random phase).
FIO_JOBS: tuple[tuple[str, str, str, bool], ...] = (
    ("seq_write", "write", "1M", False),
    ("seq_read", "read", "1M", False),
    ("rand_read", "randread", "4k", True),
    ("rand_write", "randwrite", "4k", True),
)
DROP_CACHES_SH = "sync; echo 3 > /proc/sys/vm/drop_caches"


def fio_argv(sizes: Sizes, filename: str, output: str, jobs: Sequence[str] | None = None) -> list[str]:
    """One fio command running the :data:`FIO_JOBS` named in ``jobs`` (all
    by default) one after the other (``stonewall``), each on ``filename``
    (made by the first writer) and preceded by a drop of the guest's caches
    (``exec_prerun``: after fio has loaded its ~60 shared libraries, whose
    loading costs seconds under TCG); JSON results in ``output``.  Random
    jobs use O_DIRECT and run ``sizes.random_seconds``."""
    argv = [
        "fio", f"--filename={filename}", f"--size={sizes.seq_mib}M",
        "--ioengine=psync", "--fallocate=none", f"--exec_prerun=sh -c '{DROP_CACHES_SH}'",
        "--output-format=json", f"--output={output}",
    ]
    chosen = [job for job in FIO_JOBS if jobs is None or job[0] in jobs]
    for i, (name, rw, block, random_io) in enumerate(chosen):
        argv += [f"--name={name}", f"--rw={rw}", f"--bs={block}"]
        if i:
            argv.append("--stonewall")
        if rw == "write":
            argv.append("--end_fsync=1")
        if random_io:
            argv += ["--direct=1", "--time_based=1", f"--runtime={sizes.random_seconds}"]
    return argv


def _phase(kind: str, sizes: Sizes, daemon: str, round_no: int, job: str = "") -> dict[str, Any]:
    """Phase ``kind`` of round ``round_no`` on ``daemon``'s share (``job``:
    the fio job of a fio phase)."""
    mount = f"{GUEST_MOUNT}/{daemon}"
    where = {"daemon": daemon, "round": round_no}
    if kind == "fio":
        output = f"{GUEST_TMP}/fio-{daemon}-{round_no}-{job}.json"
        return {"kind": "fio", **where, "job": job, "output": output,
                "argv": fio_argv(sizes, f"{mount}/{seq_file(round_no)}", output, [job])}
    if kind == "meta":
        return {"kind": "meta", **where, "dir": f"{mount}/{meta_dir(round_no)}", "files": sizes.files,
                "readdir_passes": sizes.readdir_passes, "chunks": sizes.meta_chunks}
    if kind == "untar":
        target = f"{mount}/{untar_dir(round_no)}"
        return {"kind": "untar", **where, "dir": target, "warmup": ["tar", "--version"],
                "argv": ["tar", "-xf", f"{GUEST_TMP}/stdlib.tar", "-C", target]}
    return {"kind": "sha256", **where, "path": f"{mount}/{seq_file(round_no)}"}


def make_plan(sizes: Sizes, phases: Sequence[str] = PHASES, daemons: Sequence[str] = DAEMONS,
              rounds: int = 1) -> list[dict[str, Any]]:
    """The guest's phases in run order (JSON-serialisable): for each round,
    each of ``phases`` (:data:`PHASES` order; fio job by job, in
    :data:`FIO_JOBS` order) on every daemon in the round's
    :func:`daemon_order` (rotated once more for each fio job after the
    first), then (``sizes.checksum``) the checksums of the round's fio
    files."""
    kinds = [kind for kind in PHASES if kind in phases]
    if sizes.checksum and "fio" in phases:
        kinds.append("sha256")
    plan: list[dict[str, Any]] = []
    for round_no in range(1, rounds + 1):
        order = daemon_order(list(daemons), round_no)
        for kind in kinds:
            if kind == "fio":
                for k, (job, *_) in enumerate(FIO_JOBS):
                    plan += [_phase(kind, sizes, daemon, round_no, job) for daemon in daemon_order(order, k + 1)]
            else:
                plan += [_phase(kind, sizes, daemon, round_no) for daemon in order]
    return plan


@dataclass(frozen=True)
class Tarball:
    """The stdlib tarball on the host; ``entries`` maps each member's name
    to its kind (``"d"``, ``"f"``, ``"l"`` symlink) and size (files)."""

    path: Path
    entries: dict[str, tuple[str, int]]


def build_tarball(path: Path, sizes: Sizes, source: Path = STDLIB) -> Tarball:
    """Write an uncompressed tar of ``source`` (members under its base name)
    restricted to ``sizes.stdlib_parts`` and ``sizes.pycache``."""
    if not source.is_dir():
        raise GuestBenchError(f"{source} not found: the untar workload needs it")

    def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        if not sizes.pycache and "__pycache__" in info.name.split("/"):
            return None
        return info

    with tarfile.open(path, "w") as tar:
        if sizes.stdlib_parts:
            tar.add(source, arcname=source.name, recursive=False)
            for part in sizes.stdlib_parts:
                tar.add(source / part, arcname=f"{source.name}/{part}", filter=keep)
        else:
            tar.add(source, arcname=source.name, filter=keep)
    entries: dict[str, tuple[str, int]] = {}
    with tarfile.open(path) as tar:
        for info in tar.getmembers():
            kind = "d" if info.isdir() else "l" if info.issym() else "f" if info.isfile() else "?"
            entries[info.name] = (kind, info.size if kind == "f" else 0)
    return Tarball(path, entries)


def host_tree(root: Path) -> dict[str, tuple[str, int]]:
    """``{relative name: (kind, size)}`` of a host directory tree, in the
    form of :attr:`Tarball.entries` (to compare an extraction with it)."""
    out: dict[str, tuple[str, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath, name)
            st = full.lstat()
            rel = str(full.relative_to(root))
            if full.is_symlink():
                out[rel] = ("l", 0)
            elif full.is_dir():
                out[rel] = ("d", 0)
            else:
                out[rel] = ("f", st.st_size)
    return out


#: Where the init mounts each daemon's share (``/vfs/DAEMON``) before the
#: command binds it into the chroot.
INIT_MOUNTS = "/vfs"

#: The guest's command (busybox sh, run by the init once the shares are
#: mounted: the host's / on /host, each daemon's on /vfs/DAEMON, bound on
#: /host/mnt/DAEMON over a tmpfs: the host's /mnt is read-only).
GUEST_COMMAND = """set -u
mount -t proc proc /host/proc || exit 90
mount -t devtmpfs devtmpfs /host/dev || exit 91
cp {tarball} /tmp/stdlib.tar || exit 92
cp /bench/guest_bench.py /bench/plan.json /tmp/ || exit 93
mount -o bind /tmp /host/tmp || exit 94
mount -t tmpfs -o size=1m tmpfs /host/mnt || exit 95
for d in {daemons}; do
  mkdir /host/mnt/$d && mount -o bind {init_mounts}/$d /host/mnt/$d || exit 96
done
chroot /host {python} -S /tmp/guest_bench.py --guest-plan /tmp/plan.json
rc=$?
for d in {daemons}; do umount /host/mnt/$d || echo "# umount /host/mnt/$d failed"; done
umount /host/mnt /host/tmp /host/dev /host/proc
exit $rc
"""


def guest_command(tarball: Path, daemons: Sequence[str]) -> str:
    return GUEST_COMMAND.format(tarball=shlex.quote(f"/host{tarball}"), python=GUEST_PYTHON,
                                daemons=" ".join(shlex.quote(d) for d in daemons), init_mounts=INIT_MOUNTS)


def build_guest_image(path: Path, kernel: "KernelAssets", plan: list[dict[str, Any]],
                      tarball: Path, daemons: Sequence[str]) -> Path:
    """The initramfs: mounts the shares, runs :func:`guest_command`."""
    from virtiofs_async.testing.vm import build_initramfs, make_init_script

    mounts = [("root", "/host"), *[(device_tag(d), f"{INIT_MOUNTS}/{d}") for d in daemons]]
    init = make_init_script(kernel.module_names, mounts, guest_command(tarball, daemons), clock_sync=False)
    files = {
        **kernel.initramfs_files(),
        "/bench/guest_bench.py": Path(__file__).resolve().read_bytes(),
        "/bench/plan.json": json.dumps({"phases": plan}).encode(),
    }
    return build_initramfs(path, init, files)


def rootfs_argv(sock: Path | str, ro_dir: Path | str) -> list[str]:
    """QEMU's C virtiofsd serving the host's / read-only (``cache=always``):
    a bind of / onto ``ro_dir`` remounted read-only in a private mount
    namespace.  Non-recursive: only files of the root filesystem show."""
    script = (
        'mount --bind / "$1" && mount -o remount,bind,ro "$1" && '
        f'exec {C_VIRTIOFSD} --socket-path="$2" -o source="$1" -o cache=always -o no_xattr'
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
            str(ro_dir), str(sock)]


DaemonArgv = Callable[[Path | str, Path | str], list[str]]


def daemon_argvs() -> dict[str, DaemonArgv]:
    """``{daemon: argv(socket, shared_dir)}``, every one with cache=auto.
    Fetches the Rust virtiofsd on first use."""
    from virtiofs_async.testing.peers import ensure_rust_virtiofsd

    rust = ensure_rust_virtiofsd()
    return {
        "c": lambda s, d: [C_VIRTIOFSD, f"--socket-path={s}", "-o", f"source={d}",
                           "-o", "cache=auto"],
        "rust": lambda s, d: [*rust, "--socket-path", str(s), "--shared-dir", str(d),
                              "--cache=auto"],
        "ours": lambda s, d: [sys.executable, "-m", "virtiofs_async", "--socket-path", str(s),
                              "--shared-dir", str(d), "--cache", "auto"],
    }


def daemon_env() -> dict[str, str]:
    """The environment of the daemons: ours imports the package this process
    imported."""
    import virtiofs_async

    package_parent = Path(virtiofs_async.__file__).resolve().parents[1]
    return {**os.environ, "PYTHONPATH": str(package_parent)}


# --------------------------------------------------------------------------
# Host side: one boot, results
# --------------------------------------------------------------------------


@dataclass
class BootOutcome:
    """One daemon's part of a boot.  ``values[r]``: round r+1's workload
    key -> value (in the unit of :func:`workloads`); ``records[r]``: round
    r+1's ``BENCH`` records by key (each fio job's JSON under the job's name);
    ``shared_dir``: the host directory the daemon served (deleted after the
    ``inspect`` callback); ``duration``: the boot's; ``lines``: the guest's
    ttyS1 lines (every daemon's), each with its host arrival time."""

    daemon: str
    shared_dir: Path
    duration: float
    records: list[dict[str, dict[str, Any]]]
    values: list[dict[str, float]]
    lines: tuple["TranscriptLine", ...] = ()


def parse_records(transcript: str) -> dict[tuple[str, int], dict[str, dict[str, Any]]]:
    """The ``BENCH {json}`` lines of a transcript by (daemon, round), then
    by key; raises :class:`GuestBenchError` unless the guest reached
    ``BENCH-END``."""
    records: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    ended = False
    for line in transcript.splitlines():
        if line.startswith("BENCH "):
            record = json.loads(line[6:])
            records.setdefault((record["daemon"], record["round"]), {})[record["key"]] = record
        elif line == "BENCH-END":
            ended = True
    if not ended:
        raise GuestBenchError("the guest did not finish its phases (no BENCH-END)")
    return records


def fio_value(fio: Mapping[str, Any], job_name: str, unit: str) -> float:
    """MiB/s or IOPS of job ``job_name`` in fio's JSON output, checked."""
    jobs = {job["jobname"]: job for job in fio["jobs"]}
    job = jobs.get(job_name)
    if job is None:
        raise GuestBenchError(f"fio reported no job {job_name!r} (has {sorted(jobs)})")
    if job.get("error"):
        raise GuestBenchError(f"fio {job_name}: error {job['error']}")
    direction = "write" if "write" in job_name else "read"
    section = job[direction]
    if section["io_bytes"] <= 0:
        raise GuestBenchError(f"fio {job_name}: no {direction} I/O done")
    return section["bw_bytes"] / MIB if unit == "MiB/s" else float(section["iops"])


def values_of(records: Mapping[str, Mapping[str, Any]], sizes: Sizes,
              phases: Sequence[str] = PHASES) -> dict[str, float]:
    """Workload key -> value, for the workloads of ``phases``; raises :class:`GuestBenchError` on a missing
    or non-positive measurement."""
    out: dict[str, float] = {}
    fio_jobs = {name for name, *_ in FIO_JOBS}
    for w in workloads(sizes, 0, phases):
        record = records.get(w.key)
        if record is None:
            raise GuestBenchError(f"the guest reported no {w.key!r}")
        if w.key in fio_jobs:
            value = fio_value(record["fio"], w.key, w.unit)
        elif w.unit == "s":
            value = record["seconds"]
        else:
            value = record["ops"] / record["seconds"] if record["seconds"] > 0 else 0.0
        if not value > 0:
            raise GuestBenchError(f"{w.key}: measured {value!r}")
        out[w.key] = float(value)
    return out


def _tail(text: str, chars: int = 3000) -> str:
    return text if len(text) <= chars else "[...]\n" + text[-chars:]


def boot(daemons: Sequence[str], rounds: int, kernel: "KernelAssets", initrd: Path,
         argvs: Mapping[str, DaemonArgv], base: Path, shared: Mapping[str, Path], sizes: Sizes,
         phases: Sequence[str] = PHASES) -> list[BootOutcome]:
    """Boot one guest with a device per daemon of ``daemons`` (each serving
    its fresh ``shared[daemon]``, started by ``argvs[daemon]``) that runs
    ``rounds`` rounds of the plan; return each daemon's measurements.
    Raises :class:`GuestBenchError` on any failure (the message carries the
    guest's transcript and the daemons' logs)."""
    from virtiofs_async.testing.vm import (
        GuestVM, GuestVMError, VirtioFsDaemon, VirtioFsDevice,
    )

    ro = base / "ro"
    ro.mkdir(parents=True)
    for directory in shared.values():
        directory.mkdir(parents=True)
        directory.chmod(0o755)
    # AF_UNIX paths are limited to 108 bytes: sockets go in a short directory.
    with tempfile.TemporaryDirectory(prefix="vfs-gb-") as sockdir, contextlib.ExitStack() as stack:
        root_sock = Path(sockdir, "root.sock")
        root_d = VirtioFsDaemon(rootfs_argv(root_sock, ro), root_sock, log_path=base / "root.log")
        socks = {d: Path(sockdir, f"{d}.sock") for d in daemons}
        tested = {d: VirtioFsDaemon(argvs[d](socks[d], shared[d]), socks[d], log_path=base / f"{d}.log",
                                    cwd=base, env=daemon_env(), start_timeout=30.0) for d in daemons}
        devices = [VirtioFsDevice(root_sock, "root"), *[VirtioFsDevice(socks[d], device_tag(d)) for d in daemons]]
        # a boot's bound: the per-daemon round's, for every round and daemon
        vm = GuestVM(kernel, initrd, devices, timeout=sizes.boot_timeout * rounds * len(daemons),
                     workdir=base / "vm")

        def logs() -> str:
            return "".join(f"\n--- {d} daemon log ---\n{_tail(t.log())}" for d, t in tested.items())

        try:
            stack.enter_context(root_d)
            for daemon in tested.values():
                stack.enter_context(daemon)
            result = vm.run(watch=[root_d, *tested.values()])
            for daemon in tested.values():
                daemon.wait(10)
            stack.close()
            result.check()
            records = parse_records(result.transcript)
            outcomes = []
            for d in daemons:
                per_round = [records.get((d, r), {}) for r in range(1, rounds + 1)]
                values = []
                for r, got in enumerate(per_round, 1):
                    try:
                        values.append(values_of(got, sizes, phases))
                    except GuestBenchError as exc:
                        raise GuestBenchError(f"{d}, round {r}: {exc}") from None
                outcomes.append(BootOutcome(d, shared[d], result.duration, per_round, values, result.lines))
        except (GuestVMError, GuestBenchError) as exc:
            raise GuestBenchError(f"guest bench: {exc}{logs()}") from None
    return outcomes


def _prefixed(argv: DaemonArgv, prefix: Sequence[str], **names: object) -> DaemonArgv:
    """``argv`` with ``prefix`` (its ``{daemon}``, ``{run}`` filled in) in front."""
    if not prefix:
        return argv
    head = [word.format(**names) for word in prefix]
    return lambda sock, shared: head + argv(sock, shared)


def describe_commands(kernel: "KernelAssets", initrd: Path, argvs: Mapping[str, DaemonArgv],
                      plan: list[dict[str, Any]], tarball: Tarball, sizes: Sizes, daemons: Sequence[str],
                      rounds: int) -> list[str]:
    """The exact command lines of a run (sockets, directories and QEMU's
    serial files as placeholders), and the order of its phases."""
    from virtiofs_async.testing.vm import GuestVM, VirtioFsDevice

    vm = GuestVM(kernel, initrd, [VirtioFsDevice("<root.sock>", "root"),
                                  *[VirtioFsDevice(f"<{d}.sock>", device_tag(d)) for d in daemons]],
                 timeout=sizes.boot_timeout)
    lines = [
        "guest: qemu: " + shlex.join(vm.command(Path("<console.log>"), Path("<ttyS1.sock>"))),
        "guest: host / read-only for the guest's chroot: "
        + shlex.join(rootfs_argv("<root.sock>", "<empty-dir>")),
    ]
    lines.append(f"guest: each daemon's shared directory: <fresh-shared-dir> = shared/ in a fresh ext4 "
                 f"({shlex.join(MKFS_EXT4)} on a sparse {fresh_fs_mib(sizes, rounds)} MiB image, mount -o loop)")
    lines += [f"guest: daemon {name}: " + shlex.join(argvs[name](f"<{name}.sock>", "<fresh-shared-dir>"))
              for name in daemons]
    lines.append(f"guest: init (busybox sh, root on /host, each daemon's share on {INIT_MOUNTS}/DAEMON): "
                 + "; ".join(guest_command(tarball.path, daemons).strip().splitlines()[:-1]))
    lines.append(f"guest: before each measurement: {DROP_CACHES_SH}")
    for round_no in range(1, rounds + 1):
        steps: list[str] = []
        for phase in plan:
            if phase["round"] == round_no:
                label = " ".join(filter(None, (phase["kind"], phase.get("job"))))
                if steps and steps[-1].startswith(label + " on "):
                    steps[-1] += f", {phase['daemon']}"
                else:
                    steps.append(f"{label} on {phase['daemon']}")
        lines.append(f"guest: round {round_no}: " + "; ".join(steps))
    described: set[tuple[str, str]] = set()
    for phase in plan:
        label = (phase["kind"], phase.get("job", ""))
        if label in described or phase["daemon"] != daemons[0]:
            continue
        described.add(label)
        if phase["kind"] == "fio":
            lines.append("guest: (cwd /tmp) " + shlex.join(phase["argv"]))
        elif phase["kind"] == "meta":
            lines.append(
                f"guest: python3: in {phase['dir']}, {phase['files']} x os.close(os.open(path, "
                "O_CREAT|O_EXCL|O_WRONLY, 0o644)); os.stat(path) each; "
                f"{phase['readdir_passes']} x os.listdir(dir); os.unlink(path) each; each step in "
                f"{len(chunk_bounds(phase['files'], phase['chunks']))} chunks, each chunk (and each listing) "
                "on the round's daemons in turn, rotated chunk by chunk, caches dropped before each, "
                "time.perf_counter around each chunk's loop")
        elif phase["kind"] == "untar":
            size = tarball.path.stat().st_size / MIB
            lines.append(f"guest: {shlex.join(phase['argv'])}  (tarball: {len(tarball.entries)} "
                         f"entries, {size:.1f} MiB, of {STDLIB}"
                         f"{'' if sizes.pycache else ' without __pycache__'}, in guest RAM)")
        elif phase["kind"] == "sha256":
            lines.append(f"guest: python3: sha256 of {phase['path']} (untimed)")
    lines.append(f"guest: (the other daemons' and rounds' phases: the same in {GUEST_MOUNT}/DAEMON, "
                 "with the round's number in the file and directory names)")
    return lines


# --------------------------------------------------------------------------
# Host side: the benchmark
# --------------------------------------------------------------------------


def _row_class() -> type["Row"]:
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from _report import Row

    return Row


def check_host() -> None:
    """Raise :class:`GuestBenchError` naming what the host lacks."""
    missing = [tool for tool in ("qemu-system-x86_64", "fio", "tar", "unshare", "busybox")
               if shutil.which(tool) is None]
    missing += [p for p in (C_VIRTIOFSD, GUEST_PYTHON) if not Path(p).exists()]
    if missing:
        raise GuestBenchError(f"missing {', '.join(missing)}: run scripts/setup-system.sh as root")


def fresh_fs_mib(sizes: Sizes, rounds: int) -> int:
    """Size of the sparse image of each daemon's fresh filesystem (a fio
    file per round)."""
    return max(1024, (rounds + 2) * sizes.seq_mib + 512)


#: mkfs.ext4 options of each boot's fresh filesystem: inode tables and
#: journal written at once (no lazy initialisation running in the background
#: during the measurements), inodes for the metadata and untar phases.
MKFS_EXT4 = ("mkfs.ext4", "-q", "-F", "-N", "65536", "-E", "lazy_itable_init=0,lazy_journal_init=0")


@contextlib.contextmanager
def fresh_filesystem(directory: Path, size_mib: int, log: Callable[[str], None]) -> Iterator[Path]:
    """A new ext4 filesystem of ``size_mib`` mounted at ``directory`` for
    one daemon of a boot (a sparse image next to it, loop-mounted;
    unmounted and deleted at the end), so that each daemon works on a fresh
    filesystem of its own whatever ran before (ext4's create and unlink
    costs depend on its recent history).
    Without root, mkfs.ext4 or a loop device: ``directory`` on the root
    filesystem, said in the log."""
    directory.mkdir(parents=True)
    image = directory.with_name(directory.name + ".img")
    mounted = False
    try:
        with open(image, "wb") as f:
            f.truncate(size_mib * MIB)
        subprocess.run([*MKFS_EXT4, str(image)], check=True, capture_output=True)
        subprocess.run(["mount", "-o", "loop", str(image), str(directory)], check=True, capture_output=True)
        mounted = True
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr.decode(errors="replace").strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        log(f"guest bench: no fresh filesystem ({detail}); sharing a directory of the root filesystem")
    try:
        yield directory
    finally:
        if mounted:
            done = subprocess.run(["umount", str(directory)], check=False, capture_output=True)
            if done.returncode:
                log(f"guest bench: umount {directory}: {done.stderr.decode(errors='replace').strip()}")
        with contextlib.suppress(FileNotFoundError):
            image.unlink()


def _pick_workdir() -> Path:
    """A scratch directory on the root filesystem (the guest sees the
    tarball through a non-recursive bind of /)."""
    root_dev = os.stat("/").st_dev
    for candidate in (tempfile.gettempdir(), "/var/tmp"):
        if os.stat(candidate).st_dev == root_dev:
            return Path(tempfile.mkdtemp(prefix="vfs-guest-bench-", dir=candidate))
    raise GuestBenchError("no temporary directory on the root filesystem: pass workdir=")


def run(full: bool, runs: int, log: Callable[[str], None], *, sizes: Sizes | None = None,
        workdir: Path | None = None, daemons: Sequence[str] = DAEMONS, phases: Sequence[str] = PHASES,
        inspect: Callable[[BootOutcome], None] | None = None,
        daemon_prefix: Sequence[str] = ()) -> tuple[list["Row"], list[str]]:
    """The guest level: one boot serving every daemon, ``runs`` rounds of
    the phases in it (see :func:`make_plan`).  Returns the rows (level
    ``"guest"``, one value per round and daemon) and the exact command
    lines.

    ``sizes`` overrides :data:`FULL` / :data:`QUICK`; ``workdir`` (on the
    root filesystem; default a fresh temporary directory, removed at the
    end) holds the tarball, the image and each daemon's shared directory;
    ``inspect`` is called with each daemon's :class:`BootOutcome` before its
    shared directory is removed; ``daemons`` and ``phases`` pick some of
    :data:`DAEMONS` and :data:`PHASES`; ``daemon_prefix`` goes in front of
    every daemon's command line (a profiler, e.g. ``perf stat -o F --``), its
    ``{daemon}`` and ``{run}`` replaced by the daemon's name and the boot's
    number (1).  Raises :class:`GuestBenchError` when the boot fails.
    """
    from virtiofs_async.testing.vm import ensure_guest_kernel

    row_class = _row_class()
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    unknown = sorted(set(daemons) - set(DAEMONS)) + sorted(set(phases) - set(PHASES))
    if unknown or not daemons or not phases:
        raise ValueError(f"daemons must come from {DAEMONS} and phases from {PHASES}: got {unknown or 'none'}")
    chosen = [d for d in DAEMONS if d in daemons]
    sizes = sizes if sizes is not None else FULL if full else QUICK
    check_host()
    kernel = ensure_guest_kernel()
    argvs = daemon_argvs()
    own_workdir = workdir is None
    work = _pick_workdir() if workdir is None else Path(workdir)
    try:
        if os.stat(work).st_dev != os.stat("/").st_dev:
            raise GuestBenchError(f"workdir {work} is not on the root filesystem")
        tarball = build_tarball(work / "stdlib.tar", sizes)
        plan = make_plan(sizes, phases, chosen, runs)
        initrd = build_guest_image(work / "guest.cpio", kernel, plan, tarball.path, chosen)
        table = workloads(sizes, len(tarball.entries), phases)
        rows = {w.key: row_class(LEVEL, w.title, w.unit, w.higher_is_better) for w in table}
        base = work / "boot"
        try:
            with contextlib.ExitStack() as stack:
                shared = {d: stack.enter_context(fresh_filesystem(base / f"fs-{d}", fresh_fs_mib(sizes, runs), log))
                          / "shared" for d in chosen}
                started = {d: _prefixed(argvs[d], daemon_prefix, daemon=d, run=1) for d in chosen}
                outcomes = boot(chosen, runs, kernel, initrd, started, base, shared, sizes, phases)
                log(f"guest: one boot, {runs} round(s) of {', '.join(chosen)} ({outcomes[0].duration:.0f} s)")
                for outcome in outcomes:
                    for round_no, values in enumerate(outcome.values, 1):
                        for key, value in values.items():
                            rows[key].add(outcome.daemon, value)
                        log(f"guest {outcome.daemon} round {round_no}/{runs}: "
                            + ", ".join(f"{w.key} {values[w.key]:.4g} {w.unit}" for w in table))
                    if inspect is not None:
                        inspect(outcome)
        finally:
            shutil.rmtree(base, ignore_errors=True)
        commands = describe_commands(kernel, initrd, argvs, plan, tarball, sizes, chosen, runs)
        if daemon_prefix:
            commands.append("guest: every daemon started under: " + shlex.join(daemon_prefix))
    finally:
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)
    return list(rows.values()), commands


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="complete sizes (default: quick)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--daemons", default=",".join(DAEMONS),
                        help=f"comma-separated, from {','.join(DAEMONS)} (default: all)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated guest phases, from {','.join(PHASES)} (default: all)")
    parser.add_argument("--daemon-prefix", default="",
                        help="a command in front of every daemon's, e.g. 'perf stat -o /tmp/{daemon}-{run}.txt --'"
                             " ({daemon}, {run}: the daemon's name, the run's number)")
    parser.add_argument("--guest-plan", help=argparse.SUPPRESS)  # the guest side
    args = parser.parse_args(argv)
    if args.guest_plan:
        return guest_main(args.guest_plan)
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from _report import render_table, use_checkout

    use_checkout()
    started = time.monotonic()
    daemons = [d for d in args.daemons.split(",") if d]
    phases = [p for p in args.phases.split(",") if p]
    rows, commands = run(args.full, args.runs, lambda line: print(line, flush=True), daemons=daemons,
                         phases=phases, daemon_prefix=shlex.split(args.daemon_prefix))
    print(render_table(rows, [d for d in DAEMONS if d in daemons]))
    print("\n".join(commands))
    print(f"guest level: {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
