"""Run the benchmarks and write benchmarks/RESULTS.md.

    python benchmarks/run.py                  # quick: both levels, a few minutes
    python benchmarks/run.py --full           # the complete runs
    python benchmarks/run.py --level frontend # frontend | guest | all
    python benchmarks/run.py --runs 5         # interleaved runs per daemon (>= 3)

Each level module has ``run(full, runs, log) -> (rows, command lines)``:
``frontend_bench.py`` (the testing frontend drives the daemons) and
``guest_bench.py`` (a QEMU guest). A level that is missing or fails is
reported in the output and in RESULTS.md; the other still runs.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _report import Row, render_table, use_checkout  # noqa: E402

use_checkout()

LEVELS = {"frontend": "frontend_bench", "guest": "guest_bench"}


def log(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def _first_line(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else f"unavailable (exit {out.returncode})"


def _proc_field(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> list[tuple[str, str]]:
    """(what, value) lines describing this machine and the daemons' versions."""
    import virtiofs_async

    try:
        from virtiofs_async.testing.peers import ensure_rust_virtiofsd

        rust = _first_line([*ensure_rust_virtiofsd(), "--version"])
    except Exception as exc:  # a missing peer is reported, not fatal
        rust = f"unavailable ({exc})"
    env = dict(os.environ, VIRTIOFS_ASYNC_IMPLEMENTATION="python")
    pure = subprocess.run([sys.executable, "-c", "import virtiofs_async; print(virtiofs_async.IMPLEMENTATION)"],
                          env=env, capture_output=True, text=True).stdout.strip()
    mem_kib = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    return [
        ("CPU", _proc_field("/proc/cpuinfo", "model name")),
        ("cores", str(os.cpu_count())),
        ("RAM", f"{int(mem_kib) / 1024 / 1024:.1f} GiB" if mem_kib.isdigit() else mem_kib),
        ("kernel", platform.release()),
        ("Python", sys.version.split()[0]),
        ("QEMU", _first_line(["qemu-system-x86_64", "--version"])),
        ("C virtiofsd", _first_line(["/usr/lib/qemu/virtiofsd", "--version"])),
        ("Rust virtiofsd", rust),
        ("virtiofs_async", f"{virtiofs_async.__version__ if hasattr(virtiofs_async, '__version__') else '?'} "
                           f"from {Path(virtiofs_async.__file__).resolve().parent}"),
        ("implementation", f"{virtiofs_async.IMPLEMENTATION} (ours, ours-tp4, ours-memfs); {pure} (ours-pure)"),
    ]


def daemon_order(rows: Sequence[Row]) -> list[str]:
    """Table columns: ours, ours-pure, ours-memfs, other ours-*, then C and
    Rust, each followed by its variants."""
    names = {d for row in rows for d in row.samples}
    ours_rank = {"ours": 0, "ours-pure": 1, "ours-memfs": 2}
    family_rank = {"ours": 0, "c": 1, "rust": 2}
    return sorted(names, key=lambda d: (family_rank.get(d.split("-")[0], 3), ours_rank.get(d, 3), d))


def load_table(rows: Sequence[Row], daemons: Sequence[str]) -> str:
    """A plain median table (no ratios: the numbers describe the frontend)."""
    lines = ["| workload | unit | " + " | ".join(daemons) + " |", "|" + "---|" * (len(daemons) + 2)]
    for row in rows:
        cells = [f"{row.median(d):.0f}" if row.median(d) is not None else "-" for d in daemons]
        lines.append(f"| {row.workload} | {row.unit} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_level(name: str, full: bool, runs: int, log: Callable[[str], None]) -> tuple[list[Row], list[str], str | None]:
    """(rows, commands, error): error says why the level produced nothing."""
    module_name = LEVELS[name]
    if not (HERE / f"{module_name}.py").exists():
        return [], [], f"benchmarks/{module_name}.py does not exist (yet): the {name} level was skipped"
    try:
        module = importlib.import_module(module_name)
        rows, commands = module.run(full, runs, log)
    except Exception:
        return [], [], f"the {name} level failed:\n\n```\n{traceback.format_exc()}```"
    return list(rows), list(commands), None


def render_level(name: str, rows: Sequence[Row]) -> str:
    daemon_rows = [r for r in rows if r.level == name]
    other_rows = [r for r in rows if r.level != name]
    parts = [render_table(daemon_rows, daemon_order(daemon_rows))] if daemon_rows else []
    if other_rows:
        parts.append("The frontend's own CPU share while driving each daemon (median %, "
                     "process CPU time / wall time; 100 = one core):\n\n"
                     + load_table(other_rows, daemon_order(other_rows)))
    return "\n\n".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the virtiofs-async benchmarks and write RESULTS.md.")
    parser.add_argument("--full", action="store_true", help="complete runs (default: quick)")
    parser.add_argument("--level", choices=("frontend", "guest", "all"), default="all")
    parser.add_argument("--runs", type=int, default=None, help="interleaved runs per daemon (default 3, full 5)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args(argv)
    runs = args.runs or (5 if args.full else 3)
    if runs < 1:
        parser.error("--runs must be at least 1")
    levels = ["frontend", "guest"] if args.level == "all" else [args.level]
    started = datetime.datetime.now().astimezone()
    t0 = time.monotonic()
    info = machine()
    sections: list[str] = []
    status = 0
    for level in levels:
        log(f"{level} level: {'full' if args.full else 'quick'}, {runs} runs")
        failed: list[str] = []

        def level_log(line: str) -> None:
            log(line)
            if "FAILED" in line:
                failed.append(line.splitlines()[0])

        rows, commands, error = run_level(level, args.full, runs, level_log)
        body = error if error else render_level(level, rows)
        if failed:
            status = 1
            body += "\n\nFailed sessions (their runs are missing from the medians):\n\n" + "\n".join(
                f"- {line}" for line in dict.fromkeys(failed))
        if error:
            status = 1
            log(error)
        else:
            print(f"\n## {level} level\n\n{body}\n", flush=True)
        cmd_lines = "\n".join(f"    {c}" for c in commands)
        sections.append(f"## {level.capitalize()} level\n\n{body}\n" + (
            f"\nCommands:\n\n{cmd_lines}\n" if commands else ""))
    header = [
        "# Benchmark results",
        "",
        f"Date: {started:%Y-%m-%d %H:%M %Z}; took {time.monotonic() - t0:.0f} s.",
        f"Command: `{shlex.join(['python', 'benchmarks/run.py', *(argv if argv is not None else sys.argv[1:])])}` "
        f"({'full' if args.full else 'quick'}, {runs} interleaved runs per daemon).",
        "",
        "Machine:",
        "",
        *[f"- {what}: {value}" for what, value in info],
        "",
        "Values are medians over the runs (n = runs that produced a value). Ratios are speed ratios "
        "(> 1: ours is better): ours/peer for higher-is-better units, peer/ours for lower-is-better "
        "ones; best peer = the best median among every C and Rust variant. See benchmarks/README.md.",
        "",
    ]
    args.output.write_text("\n".join(header) + "\n" + "\n".join(sections))
    log(f"wrote {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
