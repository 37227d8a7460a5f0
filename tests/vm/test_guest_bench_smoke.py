"""Smoke test of the guest-level benchmark (benchmarks/guest_bench.py).

One run at the benchmark's TINY sizes against QEMU's C virtiofsd, the Rust
virtiofsd and ours (one boot each).  It checks that the benchmark works and
that what the guest's workloads did reached the host: never a time or a
speed, only that each was measured.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from virtiofs_async.testing.vm import KernelAssets

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
MIB = 1 << 20


@pytest.fixture(scope="module")
def guest_bench() -> ModuleType:
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    import guest_bench

    return guest_bench


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            digest.update(chunk)
    return digest.hexdigest()


def host_side_problems(gb: ModuleType, outcome: Any, expected_tree: dict[str, tuple[str, int]]) -> list[str]:
    """What is wrong with the files one boot left in its shared directory,
    and with the guest's own reports about them."""
    sizes = gb.TINY
    shared: Path = outcome.shared_dir
    records = outcome.records
    problems = []
    left = sorted(p.name for p in shared.iterdir())
    if left != sorted([gb.SEQ_FILE, gb.UNTAR_DIR]):
        problems.append(f"shared dir holds {left} (the metadata phase unlinks its files and directory)")
    seq = shared / gb.SEQ_FILE
    if not seq.is_file() or seq.stat().st_size != sizes.seq_mib * MIB:
        problems.append(f"{seq}: not a file of {sizes.seq_mib} MiB")
    elif records["sha256"]["sha256"] != sha256_of(seq):
        problems.append("the fio file's sha256 differs between the guest and the host")
    jobs = {job["jobname"]: job for job in records["fio"]["fio"]["jobs"]}
    for name, direction in (("seq_write", "write"), ("seq_read", "read")):
        done = jobs[name][direction]["io_bytes"]
        if done != sizes.seq_mib * MIB:
            problems.append(f"fio {name}: {done} bytes, not the whole file")
    for key in ("create", "stat", "unlink"):
        if records[key]["ops"] != sizes.files:
            problems.append(f"{key}: {records[key]['ops']} operations, not {sizes.files}")
    if records["readdir"]["ops"] != sizes.files * sizes.readdir_passes:
        problems.append(f"readdir listed {records['readdir']['ops']} entries in all")
    tree = gb.host_tree(shared / gb.UNTAR_DIR)
    if tree != expected_tree:
        missing = sorted(set(expected_tree) - set(tree))[:5]
        extra = sorted(set(tree) - set(expected_tree))[:5]
        wrong = sorted(k for k in set(tree) & set(expected_tree) if tree[k] != expected_tree[k])[:5]
        problems.append(f"untar: {len(tree)} entries, tarball has {len(expected_tree)}; "
                        f"missing {missing}, extra {extra}, different kind/size {wrong}")
    else:
        source_parent = gb.STDLIB.parent
        for name, (kind, _size) in expected_tree.items():
            if kind == "f" and sha256_of(shared / gb.UNTAR_DIR / name) != sha256_of(source_parent / name):
                problems.append(f"untar: {name} differs from {source_parent / name}")
    return problems


@pytest.mark.vm
def test_guest_bench_tiny(guest_kernel: KernelAssets, guest_bench: ModuleType, tmp_path: Path) -> None:
    gb = guest_bench
    expected_tree = gb.build_tarball(tmp_path / "expected.tar", gb.TINY).entries
    assert len(expected_tree) > 20 and any(k == "f" for k, _ in expected_tree.values())
    problems: dict[str, list[str]] = {}
    booted: list[str] = []

    fresh: dict[str, bool] = {}

    def inspect(outcome: Any) -> None:
        booted.append(outcome.daemon)
        problems[outcome.daemon] = host_side_problems(gb, outcome, expected_tree)
        # each boot's share lives in a filesystem of its own, made for it
        fresh[outcome.daemon] = (os.stat(outcome.shared_dir).st_dev != os.stat(tmp_path).st_dev
                                 and sorted(os.listdir(outcome.shared_dir.parent)) == ["lost+found", "shared"])

    rows, commands = gb.run(False, 1, print, sizes=gb.TINY, workdir=tmp_path, inspect=inspect)

    assert booted == list(gb.DAEMONS) == ["c", "rust", "ours"]
    assert {d: p for d, p in problems.items() if p} == {}
    assert fresh == {d: True for d in gb.DAEMONS}
    keys = [w.key for w in gb.workloads(gb.TINY, len(expected_tree))]
    assert len(rows) == len(keys) == 9
    for row in rows:
        assert row.level == "guest"
        for daemon in gb.DAEMONS:
            values = row.samples.get(daemon, [])
            assert len(values) == 1 and values[0] > 0, (row.workload, daemon, values)
    assert f"({len(expected_tree)} entries)" in rows[-1].workload
    text = "\n".join(commands)
    for needle in ("qemu-system-x86_64", "-accel tcg,thread=multi", "/usr/lib/qemu/virtiofsd",
                   "libexec/virtiofsd", "-m virtiofs_async", "fio --filename=/mnt/seq.dat",
                   "tar -xf /tmp/stdlib.tar", "mkfs.ext4", "mount -o loop"):
        assert needle in text, needle
    for daemon in gb.DAEMONS:
        assert any(line.startswith(f"guest: daemon {daemon}: ") for line in commands), daemon
    # Every boot removed its shared directory and its filesystem.
    assert all(str(tmp_path) not in line for line in open("/proc/self/mounts"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.tar", "guest.cpio", "stdlib.tar"]


def test_phases_and_daemons_pick_plan_rows_and_boots(guest_bench: ModuleType) -> None:
    gb = guest_bench
    assert [p["kind"] for p in gb.make_plan(gb.TINY)] == ["fio", "meta", "untar", "sha256"]
    assert [p["kind"] for p in gb.make_plan(gb.TINY, ["meta"])] == ["meta"]
    assert [p["kind"] for p in gb.make_plan(gb.TINY, ["untar", "fio"])] == ["fio", "untar", "sha256"]
    assert [w.key for w in gb.workloads(gb.TINY, 1, ["meta"])] == ["create", "stat", "readdir", "unlink"]
    assert [w.key for w in gb.workloads(gb.TINY, 1, ["fio"])] == ["seq_write", "seq_read", "rand_read",
                                                                    "rand_write"]
    assert {gb.phase_of(w.key) for w in gb.workloads(gb.TINY, 1)} == set(gb.PHASES)
    for daemons, phases in ((["ours", "nfs"], gb.PHASES), (gb.DAEMONS, ["meta", "dd"]), ([], gb.PHASES)):
        with pytest.raises(ValueError, match="daemons must come from"):
            gb.run(False, 1, print, sizes=gb.TINY, daemons=daemons, phases=phases)
    # A record missing for a phase that ran is an error; one of a phase
    # that did not run is not asked for.
    meta = {"create": {"ops": 5, "seconds": 1.0}, "stat": {"ops": 5, "seconds": 0.5},
            "readdir": {"ops": 10, "seconds": 0.1}, "unlink": {"ops": 5, "seconds": 2.0}}
    assert gb.values_of(meta, gb.TINY, ["meta"]) == {"create": 5.0, "stat": 10.0, "readdir": 100.0,
                                                      "unlink": 2.5}
    with pytest.raises(gb.GuestBenchError, match="no 'untar'"):
        gb.values_of(meta, gb.TINY, ["meta", "untar"])


@pytest.mark.vm
def test_guest_bench_one_phase_one_daemon(guest_kernel: KernelAssets, guest_bench: ModuleType,
                                          tmp_path: Path) -> None:
    gb = guest_bench
    booted: list[str] = []
    mark = tmp_path / "prefix-ran"
    # --daemon-prefix: a wrapper that notes its first argument, then runs the daemon
    prefix = ["sh", "-c", f'echo "$0" >> {mark}; exec "$@"', "{daemon}-{run}"]
    rows, commands = gb.run(False, 1, print, sizes=gb.TINY, workdir=tmp_path, daemons=["ours"],
                            phases=["meta"], inspect=lambda outcome: booted.append(outcome.daemon),
                            daemon_prefix=prefix)
    assert booted == ["ours"]
    assert mark.read_text() == "ours-1\n"
    assert commands[-1].startswith("guest: every daemon started under: sh -c")
    assert [row.workload.split()[0] for row in rows] == ["create", "stat", "readdir", "unlink"]
    for row in rows:
        assert list(row.samples) == ["ours"] and row.samples["ours"][0] > 0
    assert not any("fio --filename" in line or "tar -xf" in line for line in commands)
