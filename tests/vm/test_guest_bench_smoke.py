"""Smoke test of the guest-level benchmark (benchmarks/guest_bench.py).

Two rounds at the benchmark's TINY sizes against QEMU's C virtiofsd, the
Rust virtiofsd and ours (one boot serving the three).  It checks that the
benchmark works, that the rounds ran in their rotated order and that what
the guest's workloads did reached the host: never a time or a speed, only
that each was measured.
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
    """What is wrong with the files one daemon's rounds left in its shared
    directory, and with the guest's own reports about them."""
    rounds = len(outcome.records)
    left = sorted(p.name for p in outcome.shared_dir.iterdir())
    expected = sorted(name for r in range(1, rounds + 1) for name in (gb.seq_file(r), gb.untar_dir(r)))
    problems = []
    if left != expected:
        problems.append(f"shared dir holds {left}, not {expected} (the metadata phase unlinks its files "
                        "and directory)")
    for round_no, records in enumerate(outcome.records, 1):
        problems += [f"round {round_no}: {problem}"
                     for problem in round_problems(gb, outcome.shared_dir, round_no, records, expected_tree)]
    return problems


def round_problems(gb: ModuleType, shared: Path, round_no: int, records: dict[str, Any],
                   expected_tree: dict[str, tuple[str, int]]) -> list[str]:
    sizes = gb.TINY
    problems = []
    seq = shared / gb.seq_file(round_no)
    if not seq.is_file() or seq.stat().st_size != sizes.seq_mib * MIB:
        problems.append(f"{seq}: not a file of {sizes.seq_mib} MiB")
    elif records["sha256"]["sha256"] != sha256_of(seq):
        problems.append("the fio file's sha256 differs between the guest and the host")
    for name, direction in (("seq_write", "write"), ("seq_read", "read")):
        # each job's own fio run, reported under its name
        jobs = {job["jobname"]: job for job in records[name]["fio"]["jobs"]}
        if sorted(jobs) != [name]:
            problems.append(f"fio {name}'s run reported jobs {sorted(jobs)}")
            continue
        done = jobs[name][direction]["io_bytes"]
        if done != sizes.seq_mib * MIB:
            problems.append(f"fio {name}: {done} bytes, not the whole file")
    for key in ("create", "stat", "unlink"):
        if records[key]["ops"] != sizes.files:
            problems.append(f"{key}: {records[key]['ops']} operations, not {sizes.files}")
    if records["readdir"]["ops"] != sizes.files * sizes.readdir_passes:
        problems.append(f"readdir listed {records['readdir']['ops']} entries in all")
    untarred = shared / gb.untar_dir(round_no)
    tree = gb.host_tree(untarred)
    if tree != expected_tree:
        missing = sorted(set(expected_tree) - set(tree))[:5]
        extra = sorted(set(tree) - set(expected_tree))[:5]
        wrong = sorted(k for k in set(tree) & set(expected_tree) if tree[k] != expected_tree[k])[:5]
        problems.append(f"untar: {len(tree)} entries, tarball has {len(expected_tree)}; "
                        f"missing {missing}, extra {extra}, different kind/size {wrong}")
    else:
        source_parent = gb.STDLIB.parent
        for name, (kind, _size) in expected_tree.items():
            if kind == "f" and sha256_of(untarred / name) != sha256_of(source_parent / name):
                problems.append(f"untar: {name} differs from {source_parent / name}")
    return problems


@pytest.mark.vm
def test_guest_bench_tiny(guest_kernel: KernelAssets, guest_bench: ModuleType, tmp_path: Path) -> None:
    gb = guest_bench
    expected_tree = gb.build_tarball(tmp_path / "expected.tar", gb.TINY).entries
    assert len(expected_tree) > 20 and any(k == "f" for k, _ in expected_tree.values())
    problems: dict[str, list[str]] = {}
    booted: list[str] = []

    devices: dict[str, int] = {}
    phase_lines: list[list[str]] = []

    def inspect(outcome: Any) -> None:
        booted.append(outcome.daemon)
        problems[outcome.daemon] = host_side_problems(gb, outcome, expected_tree)
        # each daemon's share lives in a filesystem of its own, made for it
        devices[outcome.daemon] = os.stat(outcome.shared_dir).st_dev
        assert sorted(os.listdir(outcome.shared_dir.parent)) == ["lost+found", "shared"]
        phase_lines.append([line.text for line in outcome.lines if line.text.startswith("# phase ")])

    rows, commands = gb.run(False, 2, print, sizes=gb.TINY, workdir=tmp_path, inspect=inspect)

    assert booted == list(gb.DAEMONS) == ["c", "rust", "ours"]
    assert {d: p for d, p in problems.items() if p} == {}
    assert len(set(devices.values())) == 3 and os.stat(tmp_path).st_dev not in devices.values()
    # One guest ran every phase, phase by phase, each round in its rotated order.
    expected_order = [f"# phase {p['kind']} {p['daemon']} {p['round']}"
                      for p in gb.make_plan(gb.TINY, gb.PHASES, gb.DAEMONS, 2)]
    assert phase_lines == [expected_order] * 3
    # a round: 4 fio jobs, meta, untar and sha256 on each of the 3 daemons
    assert expected_order[:6] == ["# phase fio c 1", "# phase fio rust 1", "# phase fio ours 1",
                                  "# phase fio rust 1", "# phase fio ours 1", "# phase fio c 1"]
    assert expected_order[21:24] == ["# phase fio rust 2", "# phase fio ours 2", "# phase fio c 2"]
    keys = [w.key for w in gb.workloads(gb.TINY, len(expected_tree))]
    assert len(rows) == len(keys) == 9
    for row in rows:
        assert row.level == "guest"
        for daemon in gb.DAEMONS:
            values = row.samples.get(daemon, [])
            assert len(values) == 2 and all(v > 0 for v in values), (row.workload, daemon, values)
    assert f"({len(expected_tree)} entries)" in rows[-1].workload
    text = "\n".join(commands)
    for needle in ("qemu-system-x86_64", "-accel tcg,thread=multi", "/usr/lib/qemu/virtiofsd",
                   "libexec/virtiofsd", "-m virtiofs_async", "fio --filename=/mnt/c/seq-1.dat",
                   "guest: round 2: fio seq_write on rust, ours, c; fio seq_read on ours, c, rust; "
                   "fio rand_read on c, rust, ours; fio rand_write on rust, ours, c; meta on rust, ours, c;",
                   "tar -xf /tmp/stdlib.tar", "mkfs.ext4", "mount -o loop"):
        assert needle in text, needle
    for daemon in gb.DAEMONS:
        assert any(line.startswith(f"guest: daemon {daemon}: ") for line in commands), daemon
    # The boot removed the shared directories and their filesystems.
    assert all(str(tmp_path) not in line for line in open("/proc/self/mounts"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["expected.tar", "guest.cpio", "stdlib.tar"]


def test_phases_and_daemons_pick_plan_rows_and_boots(guest_bench: ModuleType) -> None:
    gb = guest_bench
    fio_jobs = ["fio"] * len(gb.FIO_JOBS)
    assert [p["kind"] for p in gb.make_plan(gb.TINY, daemons=["c"])] == [*fio_jobs, "meta", "untar", "sha256"]
    assert [p["kind"] for p in gb.make_plan(gb.TINY, ["meta"], ["c"])] == ["meta"]
    assert [p["kind"] for p in gb.make_plan(gb.TINY, ["untar", "fio"], ["c"])] == [*fio_jobs, "untar", "sha256"]
    # rounds rotate the daemons' order; each phase of a round runs on all of them in turn
    plan = gb.make_plan(gb.TINY, ["meta", "untar"], ["c", "ours"], rounds=3)
    assert [(p["kind"], p["daemon"], p["round"]) for p in plan] == [
        ("meta", "c", 1), ("meta", "ours", 1), ("untar", "c", 1), ("untar", "ours", 1),
        ("meta", "ours", 2), ("meta", "c", 2), ("untar", "ours", 2), ("untar", "c", 2),
        ("meta", "c", 3), ("meta", "ours", 3), ("untar", "c", 3), ("untar", "ours", 3)]
    assert plan[4]["dir"] == "/mnt/ours/meta-2" and plan[7]["argv"][-1] == "/mnt/c/untar-2"
    fio = gb.make_plan(gb.TINY, ["fio"], ["rust"], rounds=2)
    assert [p["kind"] for p in fio] == [*fio_jobs, "sha256"] * 2
    # one fio process per job, each on the round's file, its output its own
    assert [p["job"] for p in fio[:4]] == ["seq_write", "seq_read", "rand_read", "rand_write"]
    for p in fio[:4]:
        assert [a for a in p["argv"] if a.startswith("--name=")] == [f"--name={p['job']}"]
        assert "--stonewall" not in p["argv"]
    assert "--filename=/mnt/rust/seq-2.dat" in fio[5]["argv"] and fio[9]["path"] == "/mnt/rust/seq-2.dat"
    assert len({p["output"] for p in fio if p["kind"] == "fio"}) == 8
    # each job's daemons in the round's order, rotated once more per job
    two = gb.make_plan(gb.TINY, ["fio"], ["c", "ours"], rounds=2)
    assert [(p["job"], p["daemon"]) for p in two if p["kind"] == "fio"][:8] == [
        ("seq_write", "c"), ("seq_write", "ours"), ("seq_read", "ours"), ("seq_read", "c"),
        ("rand_read", "c"), ("rand_read", "ours"), ("rand_write", "ours"), ("rand_write", "c")]
    assert gb.fio_argv(gb.TINY, "/f", "/o").count("--stonewall") == len(gb.FIO_JOBS) - 1
    # records parse by (daemon, round)
    transcript = ('BENCH {"key":"stat","ops":5,"seconds":1.0,"daemon":"c","round":2}\n'
                  'BENCH {"key":"stat","ops":5,"seconds":2.0,"daemon":"ours","round":2}\nBENCH-END\n')
    parsed = gb.parse_records(transcript)
    assert sorted(parsed) == [("c", 2), ("ours", 2)] and parsed[("ours", 2)]["stat"]["seconds"] == 2.0
    with pytest.raises(gb.GuestBenchError, match="BENCH-END"):
        gb.parse_records(transcript.replace("BENCH-END", ""))
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


def test_metadata_steps_interleave_chunk_by_chunk(guest_bench: ModuleType, tmp_path: Path, monkeypatch: Any,
                                                  capsys: Any) -> None:
    """The guest's metadata phases of a round run as one group: each step
    chunk by chunk, each chunk on every daemon in turn (rotated chunk by
    chunk), each readdir pass likewise, caches dropped before each; one
    record per daemon and step. Run here on host directories."""
    gb = guest_bench
    assert gb.chunk_bounds(10, 3) == [(0, 3), (3, 6), (6, 10)]
    assert gb.chunk_bounds(2, 5) == [(0, 1), (1, 2)] and gb.chunk_bounds(7, 1) == [(0, 7)]
    plan = gb.make_plan(gb.TINY, ["meta", "untar"], ["c", "rust", "ours"], rounds=2)
    groups = gb.meta_groups(plan)
    assert [[(p["kind"], p["daemon"]) for p in g] for g in groups] == [
        [("meta", "c"), ("meta", "rust"), ("meta", "ours")], [("untar", "c")], [("untar", "rust")],
        [("untar", "ours")], [("meta", "rust"), ("meta", "ours"), ("meta", "c")], [("untar", "rust")],
        [("untar", "ours")], [("untar", "c")]]
    # meta phases of different rounds never join
    assert [len(g) for g in gb.meta_groups(gb.make_plan(gb.TINY, ["meta"], ["c", "ours"], rounds=2))] == [2, 2]

    group = [{**p, "dir": str(tmp_path / p["daemon"]), "files": 6, "chunks": 2, "readdir_passes": 2}
             for p in groups[0]]
    seen: list[tuple[int, ...]] = []  # at each drop: files in each daemon's directory
    monkeypatch.setattr(gb, "_drop_guest_caches",
                        lambda: seen.append(tuple(len(os.listdir(p["dir"])) for p in group)))
    gb._guest_meta(group)
    # create: chunk 1 on c, rust, ours; chunk 2 on rust, ours, c
    assert seen[:6] == [(0, 0, 0), (3, 0, 0), (3, 3, 0), (3, 3, 3), (3, 6, 3), (3, 6, 6)]
    assert seen[6:12] == [(6, 6, 6)] * 6  # stat
    assert seen[12:18] == [(6, 6, 6)] * 6  # readdir: two passes on each
    assert seen[18:] == [(6, 6, 6), (3, 6, 6), (3, 3, 6), (3, 3, 3), (3, 0, 3), (3, 0, 0)]  # unlink
    assert not any((tmp_path / p["daemon"]).exists() for p in group)
    records = gb.parse_records(capsys.readouterr().out + "BENCH-END\n")
    assert sorted(records) == [("c", 1), ("ours", 1), ("rust", 1)]
    for per_key in records.values():
        assert sorted(per_key) == ["create", "readdir", "stat", "unlink"]
        assert [per_key[k]["ops"] for k in ("create", "stat", "readdir", "unlink")] == [6, 6, 12, 6]
        assert all(r["seconds"] > 0 for r in per_key.values())


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
