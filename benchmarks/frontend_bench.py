"""Frontend-level benchmark: the testing frontend drives each daemon directly.

No VM: :class:`~virtiofs_async.testing.loadgen.LoadGenerator` plays the guest
and keeps many requests in flight, so the daemon is what is measured (the
frontend's own CPU share is reported next to the results to show it).

For every run (interleaved: run 1 of every daemon variant, then run 2, ...)
each variant gets a fresh directory (a fresh, empty MemoryFS for
``ours-memfs``) holding the same prefilled files, one daemon process and one
connection (queue size 1024, indirect descriptors, EVENT_IDX, FUSE_INIT as
Linux 6.1 sends it), and runs every workload of :data:`WORKLOADS` for the
configured duration after a short warm-up:

* GETATTR and LOOKUP of a file at queue depth 1 and 64 (ops/s);
* READ and WRITE of 4 KiB, 128 KiB and 1 MiB blocks at depth 16 (MiB/s),
  walking a prefilled file (reads are checked against the prefill pattern);
* CREATE + RELEASE + UNLINK (+ the FORGET a guest sends) of a file, 16
  files at a time (files/s).

Per workload it also records the daemon's CPU seconds per 100 000 requests
(utime + stime of the daemon's processes from /proc, over the measured
window) and the frontend's CPU share; per session the daemon's peak RSS
(VmHWM, the largest among its processes). Every daemon runs without a
sandbox that forks (ours and Rust: ``--sandbox none``; C: ``-o
sandbox=chroot``), so the measured process is the serving one.

Run: ``python benchmarks/frontend_bench.py [--full] [--runs N]`` (or
``benchmarks/run.py``). :func:`run` is what run.py calls.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Sequence

import attrs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _report import Row, render_table, use_checkout  # noqa: E402

use_checkout()
import virtiofs_async  # noqa: E402
from virtiofs_async.testing import FuseClient  # noqa: E402
from virtiofs_async.testing.loadgen import (  # noqa: E402
    LoadGenerator,
    LoadStats,
    OffsetWalker,
    RequestTemplate,
    create_cycle_slots,
    getattr_slots,
    lookup_slots,
    read_slots,
    write_slots,
)

KiB = 1024
MiB = 1024 * KiB
REPO = Path(__file__).resolve().parents[1]
#: The directory holding the imported virtiofs_async package (PYTHONPATH of
#: our daemons, wherever the package comes from).
PACKAGE_ROOT = Path(virtiofs_async.__file__).resolve().parents[1]
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: Thread pool size of the "-tp" peer variants. Both peers default to 0 (no
#: pool: the queue thread does the I/O itself). A one-run sweep on this
#: 2-core machine (2, 4 and 16 threads, every workload): a pool helps 1 MiB
#: I/O and CREATE cycles (x1.2-2.7) and costs GETATTR/LOOKUP at depth 1 and
#: 4 KiB I/O (x0.3-0.6); 4 threads was best or near best for 128 KiB and
#: 1 MiB I/O on both peers; 16 gained nothing (and the C daemon closed the
#: connection mid-run once with 16).
TUNED_THREAD_POOL = 4
IO_DEPTH = 16
CREATE_DEPTH = 16
IO_SIZES = (4 * KiB, 128 * KiB, 1 * MiB)
STAT_FILE = b"stat-target"
READ_FILE = b"read-data"
ORDER = (
    "ours", f"ours-tp{TUNED_THREAD_POOL}", "ours-pure", "ours-memfs",
    "c", f"c-tp{TUNED_THREAD_POOL}", "rust", f"rust-tp{TUNED_THREAD_POOL}",
)


@attrs.frozen
class Config:
    """How long and how big: ``duration`` / ``warmup`` seconds per
    measurement, ``span`` bytes of the file READs and WRITEs walk."""

    duration: float
    warmup: float
    span: int
    runs: int = 3
    variants: tuple[str, ...] = ORDER
    #: workload names to run (prefix match, e.g. "READ"); empty: all
    workloads: tuple[str, ...] = ()

    def runs_workload(self, name: str) -> bool:
        return not self.workloads or any(name.startswith(w) for w in self.workloads)


QUICK = Config(duration=0.3, warmup=0.1, span=8 * MiB)
FULL = Config(duration=2.0, warmup=0.3, span=64 * MiB, runs=5)


@attrs.define
class Variant:
    """One daemon configuration: ``argv(socket, directory)`` starts it."""

    name: str
    argv: Callable[[str, str], list[str]]
    env: dict[str, str] = attrs.Factory(dict)
    passthrough: bool = True  # serves the directory (else: prefill through FUSE)


def _rust_argv() -> list[str]:
    from virtiofs_async.testing.peers import ensure_rust_virtiofsd

    return list(ensure_rust_virtiofsd())


def variants(names: Sequence[str] = ORDER) -> list[Variant]:
    """The daemon variants called ``names`` (see :data:`ORDER`)."""
    py = sys.executable
    ours = [py, "-m", "virtiofs_async"]
    out: list[Variant] = []
    for name in names:
        base, _, suffix = name.partition("-")
        tp = int(suffix[2:]) if suffix.startswith("tp") else None
        if base == "ours" and (suffix in ("", "pure") or tp is not None):
            env = {"VIRTIOFS_ASYNC_IMPLEMENTATION": "python"} if name == "ours-pure" else {}
            extra = ["--thread-pool-size", str(tp)] if tp is not None else []
            out.append(Variant(name, lambda s, d, extra=extra: [
                *ours, "--socket-path", s, "--shared-dir", d, "--cache", "auto", "--sandbox", "none", *extra], env))
        elif name == "ours-memfs":
            out.append(Variant(name, lambda s, d: [py, str(REPO / "examples" / "memfs.py"), "--socket-path", s,
                                                   "--size", "2G"], passthrough=False))
        elif base == "c":
            extra = [f"--thread-pool-size={tp}"] if tp is not None else []
            out.append(Variant(name, lambda s, d, extra=extra: [
                C_VIRTIOFSD, f"--socket-path={s}", "-o", f"source={d}", "-o", "cache=auto", "-o", "sandbox=chroot",
                *extra]))
        elif base == "rust":
            extra = ["--thread-pool-size", str(tp)] if tp is not None else []
            rust = _rust_argv()
            out.append(Variant(name, lambda s, d, extra=extra: [
                *rust, "--socket-path", s, "--shared-dir", d, "--cache=auto", "--sandbox", "none", *extra]))
        else:
            raise ValueError(f"unknown daemon variant {name!r}")
    return out


# -- the prefill pattern ----------------------------------------------------------

_BASE = random.Random(4).randbytes(MiB)


def pattern(offset: int, size: int) -> bytes:
    """The prefilled file's bytes at ``[offset, offset + size)`` (offset and
    size multiples of 4 KiB, the range within one MiB-aligned MiB): a fixed
    random MiB whose pages each start with their file offset, so a read
    from the wrong place never matches."""
    if offset % (4 * KiB) or size % (4 * KiB) or offset % MiB + size > MiB:
        raise ValueError("pattern ranges are page-aligned and stay within one MiB")
    data = bytearray(_BASE[offset % MiB:offset % MiB + size])
    for page in range(0, size, 4 * KiB):
        data[page:page + 8] = (offset + page).to_bytes(8, "little")
    return bytes(data)


def _prefill_host(directory: Path, span: int) -> None:
    (directory / STAT_FILE.decode()).write_bytes(b"x" * 4 * KiB)
    with open(directory / READ_FILE.decode(), "wb") as f:
        for pos in range(0, span, MiB):
            f.write(pattern(pos, min(MiB, span - pos)))


async def _prefill_fuse(client: FuseClient, span: int) -> None:
    created = await client.create(1, STAT_FILE)
    await client.write(created.entry.nodeid, created.open.fh, 0, b"x" * 4 * KiB)
    await client.release(created.entry.nodeid, created.open.fh)
    created = await client.create(1, READ_FILE)
    step = min(MiB, client.max_write)
    for pos in range(0, span, step):
        await client.write(created.entry.nodeid, created.open.fh, pos, pattern(pos, min(step, span - pos)))
    await client.release(created.entry.nodeid, created.open.fh)
    await client.forget(created.entry.nodeid, 1)


# -- daemon processes ----------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (from /proc/PID/task/TID/children)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in children.read_text().split())
            except OSError:
                continue  # the thread ended meanwhile
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its descendants (every thread)."""
    ticks = 0
    for p in process_tree(pid):
        try:
            # after "(comm)": state is field 3 of proc(5); utime and stime are 14 and 15
            after_comm = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        ticks += int(after_comm[14 - 3]) + int(after_comm[15 - 3])
    return ticks / _CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """The largest VmHWM among ``pid`` and its descendants, in MiB."""
    peak = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except OSError:
            continue
    return peak / 1024


def daemon_env(variant: Variant) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PACKAGE_ROOT), env.get("PYTHONPATH")]))
    env.update(variant.env)
    return env


def implementation_of(variant: Variant) -> str:
    """Which twin (cython / python) a Python daemon of ``variant`` runs."""
    out = subprocess.run([sys.executable, "-c", "import virtiofs_async; print(virtiofs_async.IMPLEMENTATION)"],
                         env=daemon_env(variant), capture_output=True, text=True, check=True)
    return out.stdout.strip()


# -- workloads ---------------------------------------------------------------------


@attrs.define
class Session:
    """What the workloads of one daemon session share."""

    client: FuseClient
    pid: int
    cfg: Config
    stat_node: int = 0
    read_node: int = 0
    read_fh: int = 0
    verified: int = 0  # READ replies checked against the pattern


@attrs.frozen
class Measurement:
    value: float  # in the workload's unit
    requests: int  # chains completed in the window
    daemon_cpu: float  # CPU seconds of the daemon in the window
    stats: LoadStats


Load = Callable[[Session], Awaitable[Measurement]]


def _size_name(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


async def _drive(s: Session, slots: list[list[RequestTemplate]], per_cycle: float,
                 check: Callable[[LoadGenerator], Any] | None = None, forget_node: int = 0) -> Measurement:
    """Run the load; ``per_cycle`` converts cycles to the unit; ``check``
    inspects the generator afterwards; every reply looked up ``forget_node``
    once, if given (FORGET them all, as a guest eventually would)."""
    with LoadGenerator(s.client.frontend, slots) as gen:
        stats = await gen.run(s.cfg.duration, warmup=s.cfg.warmup, probe=lambda: cpu_seconds(s.pid))
        if check is not None:
            check(gen)
        if forget_node:
            await s.client.forget(forget_node, gen.completed_total)
    return Measurement(stats.per_second * per_cycle, stats.completed, stats.probe_end - stats.probe_start, stats)


def _getattr(depth: int) -> Load:
    async def load(s: Session) -> Measurement:
        return await _drive(s, getattr_slots(s.stat_node, depth), 1)
    return load


def _lookup(depth: int) -> Load:
    async def load(s: Session) -> Measurement:
        return await _drive(s, lookup_slots(1, STAT_FILE, depth), 1, forget_node=s.stat_node)
    return load


def _read(size: int) -> Load:
    async def load(s: Session) -> Measurement:
        slots, walkers = read_slots(s.read_node, s.read_fh, size, IO_DEPTH, s.cfg.span)

        def check(gen: LoadGenerator) -> None:
            s.verified += _verify_reads(gen, walkers, size)

        return await _drive(s, slots, size / MiB, check)
    return load


def _verify_reads(gen: LoadGenerator, walkers: list[OffsetWalker], size: int) -> int:
    """Compare each slot's last READ reply with the prefill; returns how
    many were checked (AssertionError on a mismatch)."""
    checked = 0
    for chains, walker in zip(gen.slots, walkers):
        if walker.done_offset < 0:
            continue
        body = chains[0].reply()[16:]
        if body != pattern(walker.done_offset, size):
            raise AssertionError(f"READ of {size} bytes at {walker.done_offset} returned other bytes")
        checked += 1
    return checked


def _write(size: int) -> Load:
    async def load(s: Session) -> Measurement:
        created = await s.client.create(1, b"write-%d" % size)
        node, fh = created.entry.nodeid, created.open.fh
        slots, _ = write_slots(node, fh, pattern(0, size), IO_DEPTH, s.cfg.span)
        try:
            return await _drive(s, slots, size / MiB)
        finally:
            await s.client.release(node, fh)
            await s.client.unlink(1, b"write-%d" % size)
            await s.client.forget(node, 1)
    return load


async def _create(s: Session) -> Measurement:
    return await _drive(s, create_cycle_slots(s.client, 1, CREATE_DEPTH), 1)


#: (workload name, unit, load): the throughput rows, in table order.
WORKLOADS: list[tuple[str, str, Load]] = [
    ("GETATTR qd1", "ops/s", _getattr(1)),
    ("GETATTR qd64", "ops/s", _getattr(64)),
    ("LOOKUP qd1", "ops/s", _lookup(1)),
    ("LOOKUP qd64", "ops/s", _lookup(64)),
    *[(f"READ {_size_name(n)} qd{IO_DEPTH}", "MiB/s", _read(n)) for n in IO_SIZES],
    *[(f"WRITE {_size_name(n)} qd{IO_DEPTH}", "MiB/s", _write(n)) for n in IO_SIZES],
    (f"CREATE+RELEASE+UNLINK qd{CREATE_DEPTH}", "files/s", _create),
]


# -- sessions ------------------------------------------------------------------------


@attrs.define
class SessionResult:
    variant: str
    measurements: dict[str, Measurement]
    peak_rss_mib: float
    verified_reads: int
    argv: list[str]


async def _session(variant: Variant, cfg: Config, workdir: Path, log: Callable[[str], None]) -> SessionResult:
    share = workdir / "share"
    share.mkdir()
    if variant.passthrough:
        _prefill_host(share, cfg.span)
    sock = str(workdir / "vfs.sock")
    argv = variant.argv(sock, str(share))
    with open(workdir / "daemon.log", "wb") as daemon_log:
        proc = subprocess.Popen(argv, env=daemon_env(variant), stdin=subprocess.DEVNULL, stdout=daemon_log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        async with FuseClient.connect(sock, indirect=True, queue_size=1024, memory_size=128 * MiB,
                                      connect_timeout=30) as client:
            if not variant.passthrough:
                await _prefill_fuse(client, cfg.span)
            s = Session(client, proc.pid, cfg)
            s.stat_node = (await client.lookup(1, STAT_FILE)).nodeid
            read = await client.lookup(1, READ_FILE)
            s.read_node = read.nodeid
            s.read_fh = (await client.open(read.nodeid)).fh
            results: dict[str, Measurement] = {}
            for name, _unit, load in WORKLOADS:
                if cfg.runs_workload(name):
                    results[name] = await load(s)
            rss = peak_rss_mib(proc.pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log(f"{variant.name}: the daemon did not exit after the disconnect; terminating it")
        return SessionResult(variant.name, results, rss, s.verified, argv)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@attrs.define
class BenchResult:
    rows: list[Row]  # level "frontend": throughput, RSS, CPU per 100k requests
    load_rows: list[Row]  # level "frontend-load": the frontend's CPU share (%)
    commands: list[str]
    sessions: list[SessionResult]
    failures: list[str]


def run_order(variants: Sequence[Variant], run_no: int) -> list[Variant]:
    """The variants in run ``run_no``'s order (from 1): rotated by one each
    run, so that no daemon always follows the same one (each session
    inherits the page cache and writeback the one before it left)."""
    k = (run_no - 1) % len(variants) if variants else 0
    return [*variants[k:], *variants[:k]]


def measure(cfg: Config, log: Callable[[str], None] = print, *, keep_dir: Path | None = None) -> BenchResult:
    """Run ``cfg.runs`` interleaved rounds over ``cfg.variants`` (see
    :func:`run_order`). A session that fails is logged and recorded in
    ``failures``; the others go on."""
    chosen = variants(cfg.variants)
    rows = {name: Row("frontend", name, unit, True) for name, unit, _ in WORKLOADS if cfg.runs_workload(name)}
    rss = Row("frontend", "daemon peak RSS (VmHWM)", "MiB", False)
    cpu = {name: Row("frontend", f"daemon CPU: {name}", "CPU s / 100k req", False) for name, _, _ in WORKLOADS if cfg.runs_workload(name)}
    load = {name: Row("frontend-load", f"frontend CPU: {name}", "% of a core", False) for name, _, _ in WORKLOADS if cfg.runs_workload(name)}
    commands: dict[str, str] = {}
    sessions: list[SessionResult] = []
    failures: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="vfa-fbench-", dir=keep_dir or "/tmp"))
    try:
        for run_no in range(1, cfg.runs + 1):
            for variant in run_order(chosen, run_no):
                workdir = root / f"run{run_no}-{variant.name}"
                workdir.mkdir()
                started = time.monotonic()
                try:
                    result = asyncio.run(_session(variant, cfg, workdir, log))
                except Exception as exc:  # one daemon failing must not stop the others
                    failures.append(f"run {run_no} {variant.name}: {type(exc).__name__}: {exc}")
                    log(f"run {run_no} {variant.name}: FAILED: {type(exc).__name__}: {exc}\n"
                        f"{_log_tail(workdir / 'daemon.log')}")
                    continue
                finally:
                    shutil.rmtree(workdir / "share", ignore_errors=True)
                sessions.append(result)
                commands.setdefault(variant.name, shlex.join(
                    [f"{k}={v}" for k, v in variant.env.items()] + result.argv))
                for name, m in result.measurements.items():
                    rows[name].add(variant.name, m.value)
                    if m.requests:
                        cpu[name].add(variant.name, m.daemon_cpu / m.requests * 100_000)
                    load[name].add(variant.name, 100 * m.stats.frontend_cpu_share)
                rss.add(variant.name, result.peak_rss_mib)
                log(f"run {run_no}/{cfg.runs} {variant.name}: {time.monotonic() - started:.1f} s, "
                    + ", ".join(f"{n} {m.value:,.0f}" for n, m in result.measurements.items()))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return BenchResult([*rows.values(), rss, *cpu.values()], list(load.values()),
                       [f"{name}: {cmd}" for name, cmd in commands.items()], sessions, failures)


def describe(cfg: Config) -> str:
    """One paragraph: what was run (for the results file)."""
    return (f"{cfg.runs} interleaved runs per daemon; per measurement {cfg.warmup} s warm-up then "
            f"{cfg.duration} s; READ/WRITE walk {cfg.span // MiB} MiB at queue depth {IO_DEPTH}; "
            f"CREATE cycles {CREATE_DEPTH} files at a time; queue size 1024, indirect descriptors, EVENT_IDX.")


def run(full: bool, runs: int, log: Callable[[str], None]) -> tuple[list[Row], list[str]]:
    """run.py's entry point: (rows, command lines). The frontend CPU share
    rows (level ``frontend-load``) come after the daemon rows."""
    base = FULL if full else QUICK
    result = measure(attrs.evolve(base, runs=runs), log)  # failed sessions are logged with "FAILED"
    return [*result.rows, *result.load_rows], [describe(attrs.evolve(base, runs=runs)), *result.commands]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="long measurements, 5 runs (default: quick)")
    parser.add_argument("--runs", type=int, help="interleaved runs (default 3 quick, 5 full)")
    parser.add_argument("--duration", type=float, help="seconds per measurement")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(ORDER)}")
    parser.add_argument("--workloads", help="comma-separated workload name prefixes, e.g. 'READ 1,WRITE' (default: all)")
    args = parser.parse_args(argv)
    cfg = FULL if args.full else QUICK
    if args.runs:
        cfg = attrs.evolve(cfg, runs=args.runs)
    if args.duration:
        cfg = attrs.evolve(cfg, duration=args.duration)
    if args.variants:
        cfg = attrs.evolve(cfg, variants=tuple(args.variants.split(",")))
    if args.workloads:
        cfg = attrs.evolve(cfg, workloads=tuple(args.workloads.split(",")))
    result = measure(cfg, lambda line: print(line, file=sys.stderr, flush=True))
    print(render_table(result.rows, list(cfg.variants)))
    print()
    print(render_table(result.load_rows, list(cfg.variants)))
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
