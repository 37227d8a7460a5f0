"""Benchmark results: rows of samples per daemon, medians, ratios, tables.

Shared by every benchmark in this folder (not part of the library).

A :class:`Row` is one workload's measurements: for each daemon variant, one
value per run.  Daemon variant names are free-form; by convention ``ours``
is this project's daemon in its default configuration, ``c`` QEMU's C
virtiofsd and ``rust`` the Rust virtiofsd, and variants add a suffix
(``ours-pure``, ``ours-memfs``, ``c-tp16``, ``rust-tp16`` ...).

Ratios are speed ratios, so that 1.0 means "as fast" and more is better
whatever the unit: ``ours / peer`` for a higher-is-better unit (ops/s,
MiB/s), ``peer / ours`` for a lower-is-better one (seconds, CPU seconds,
MiB of RSS).  ``best peer`` is the best median among every variant of the
C and Rust daemons.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Iterable, Sequence

import attrs

CHECKOUT_SRC = Path(__file__).resolve().parents[1] / "src"


def use_checkout() -> None:
    """Measure the checkout the benchmark lives in, not an older installed
    copy: put its ``src/`` first on sys.path (and so in the daemons'
    PYTHONPATH) when it holds a built package (``python setup.py build_ext
    --inplace``). Otherwise, or when virtiofs_async is already imported from
    elsewhere, say on stderr which copy is measured."""
    pkg = CHECKOUT_SRC / "virtiofs_async"
    if not pkg.is_dir():
        return  # benchmarks copied out of a checkout: the installed package it is
    built = any(pkg.glob("_cy_vring*.so"))
    loaded = sys.modules.get("virtiofs_async")
    if loaded is None and built:
        if str(CHECKOUT_SRC) not in sys.path:
            sys.path.insert(0, str(CHECKOUT_SRC))
        return
    import virtiofs_async

    where = Path(virtiofs_async.__file__).resolve().parent
    if where != pkg:
        why = "" if built else " (src/ has no compiled modules: python setup.py build_ext --inplace)"
        print(f"benchmarks: measuring virtiofs_async from {where}, not this checkout's {pkg}{why}",
              file=sys.stderr, flush=True)


@attrs.define
class Row:
    level: str  # "frontend" or "guest"
    workload: str  # e.g. "GETATTR qd64"
    unit: str  # e.g. "ops/s", "MiB/s", "s", "MiB", "CPU s / 100k req"
    higher_is_better: bool
    #: daemon variant -> one value per run
    samples: dict[str, list[float]] = attrs.Factory(dict)

    def add(self, daemon: str, value: float) -> None:
        self.samples.setdefault(daemon, []).append(float(value))

    def median(self, daemon: str) -> float | None:
        values = self.samples.get(daemon)
        return statistics.median(values) if values else None

    def ratio(self, ours: str, peer: str) -> float | None:
        """Speed ratio of ``ours`` against ``peer`` (>1: ours is better)."""
        a, b = self.median(ours), self.median(peer)
        if a is None or b is None or a <= 0 or b <= 0:
            return None
        return a / b if self.higher_is_better else b / a

    def best_peer(self, peers: Iterable[str] | None = None) -> str | None:
        """The peer variant (name starting with ``c`` or ``rust``) with the
        best median."""
        names = [d for d in (peers if peers is not None else self.samples)
                 if (d == "c" or d.startswith(("c-", "rust"))) and self.median(d) is not None]
        if not names:
            return None
        key = (lambda d: self.median(d)) if self.higher_is_better else (lambda d: -self.median(d))  # type: ignore[operator]
        return max(names, key=key)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def render_table(rows: Sequence[Row], daemons: Sequence[str], ours: str = "ours") -> str:
    """A Markdown table: one line per row, each daemon's median (with the
    number of runs and, over several, the lowest and highest run: how far
    one run moves), then ours/c, ours/rust and ours/best-peer ratios."""
    head = ["workload", "unit", *daemons, f"{ours}/c", f"{ours}/rust", f"{ours}/best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.workload, row.unit + ("" if row.higher_is_better else " (lower is better)")]
        for d in daemons:
            values = row.samples.get(d)
            if not values:
                cells.append("-")
            elif len(values) == 1:
                cells.append(f"{_fmt(values[0])} (n=1)")
            else:
                cells.append(f"{_fmt(row.median(d))} (n={len(values)}, {_fmt(min(values))}-{_fmt(max(values))})")
        best = row.best_peer()
        for i, peer in enumerate(("c", "rust", best)):
            r = row.ratio(ours, peer) if peer else None
            cells.append("-" if r is None else f"{r:.2f}" + (f" ({peer})" if i == 2 else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
