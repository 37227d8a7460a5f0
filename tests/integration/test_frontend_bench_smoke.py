"""Smoke test of benchmarks/frontend_bench.py: every daemon variant, one tiny run.

Asserts that the benchmark keeps working (every variant answers every
workload with a positive value, READ replies match the prefill, the load
generator keeps its depth, the table names every daemon); never a speed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def bench():  # type: ignore[no-untyped-def]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import frontend_bench

        yield frontend_bench
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_variant_answers_every_workload(bench) -> None:  # type: ignore[no-untyped-def]
    from _report import render_table

    cfg = bench.Config(duration=0.05, warmup=0.02, span=2 << 20, runs=1)
    lines: list[str] = []
    result = bench.measure(cfg, lines.append)
    assert result.failures == [], "\n".join(lines)

    names = [name for name, _unit, _load in bench.WORKLOADS]
    assert {s.variant for s in result.sessions} == set(bench.ORDER)
    for row in result.rows:
        for variant in bench.ORDER:
            values = row.samples.get(variant)
            # CPU seconds come in 10 ms clock ticks: a tiny window may read 0.
            floor_ok = (lambda v: v >= 0) if row.workload.startswith("daemon CPU") else (lambda v: v > 0)
            assert values and all(floor_ok(v) for v in values), (row.workload, variant, values)
    for session in result.sessions:
        assert list(session.measurements) == names
        # 3 READ sizes, each slot's last reply compared with the prefill pattern
        assert session.verified_reads >= 3, session.variant
        assert session.peak_rss_mib > 0
        for name, m in session.measurements.items():
            depth = m.stats.depth
            assert m.requests > 0, (session.variant, name)
            assert m.stats.min_outstanding == m.stats.max_outstanding == depth, (session.variant, name)
        assert session.measurements["GETATTR qd64"].stats.depth == 64
        assert session.measurements["GETATTR qd1"].stats.depth == 1
        create = [m for n, m in session.measurements.items() if n.startswith("CREATE")][0]
        assert create.stats.steps == 4  # CREATE, RELEASE, UNLINK, FORGET

    table = render_table(result.rows, list(bench.ORDER))
    header = table.splitlines()[0]
    for variant in bench.ORDER:
        assert f" {variant} |" in header
    for name in names:
        assert f"| {name} |" in table
    assert len(result.commands) == len(bench.ORDER)


def test_tables_show_each_daemons_median_and_spread(bench) -> None:  # type: ignore[no-untyped-def]
    """A cell gives the median, the number of runs and, over several runs,
    the lowest and highest; the ratios are of the medians."""
    from _report import Row, render_table

    row = Row("guest", "readdir", "entries/s", True)
    for ours, c in ((60_000, 70_000), (90_000, 75_000), (55_000, 100_000)):
        row.add("ours", ours)
        row.add("c", c)
    row.add("rust", 50_000)
    line = render_table([row], ["ours", "c", "rust"]).splitlines()[2]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[2:5] == ["60,000 (n=3, 55,000-90,000)", "75,000 (n=3, 70,000-100,000)", "50,000 (n=1)"]
    assert cells[5:] == ["0.80", "1.20", "0.80 (c)"]


def test_pattern_is_position_dependent(bench) -> None:  # type: ignore[no-untyped-def]
    a = bench.pattern(0, 8192)
    assert len(a) == 8192 and a[4096:4104] == (4096).to_bytes(8, "little")
    assert bench.pattern(1 << 20, 4096) != a[:4096]  # same place in the MiB, another page
    with pytest.raises(ValueError):
        bench.pattern(100, 4096)



def test_workloads_selects_the_rows_it_names(bench) -> None:  # type: ignore[no-untyped-def]
    cfg = bench.Config(duration=0.05, warmup=0.02, span=2 << 20, runs=3, variants=("ours", "ours-memfs"),
                       workloads=("GETATTR qd1", "READ 4"))
    assert [n for n, _u, _l in bench.WORKLOADS if cfg.runs_workload(n)] == ["GETATTR qd1", "READ 4 KiB qd16"]
    result = bench.measure(cfg, lambda line: None)
    assert result.failures == []
    # interleaved runs, each rotating the order
    assert [s.variant for s in result.sessions] == ["ours", "ours-memfs", "ours-memfs", "ours", "ours", "ours-memfs"]
    measured = {name for s in result.sessions for name in s.measurements}
    assert measured == {"GETATTR qd1", "READ 4 KiB qd16"}
    names = {row.workload for row in result.rows}
    assert {"GETATTR qd1", "READ 4 KiB qd16"} <= names and "WRITE 4 KiB qd16" not in names


def test_the_benchmarks_measure_this_checkout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Started without PYTHONPATH from any directory, a benchmark imports
    the checkout's src/ (when it is built), not an installed copy."""
    import subprocess

    code = ("import sys; sys.path.insert(0, sys.argv[1]); import _report; _report.use_checkout(); "
            "import virtiofs_async; print(virtiofs_async.__file__)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(BENCHMARKS)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, check=True)
    src = BENCHMARKS.parent / "src" / "virtiofs_async"
    if any(src.glob("_cy_vring*.so")):
        assert Path(out.stdout.strip()).resolve().parent == src
    else:  # a clean clone tested on its installed build (scripts/test.sh): said, not silent
        assert Path(out.stdout.strip()).resolve().parent != src
        assert "not this checkout" in out.stderr and "build_ext --inplace" in out.stderr
