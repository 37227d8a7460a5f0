"""The guest-side POSIX suite (posix_suite.py) against three daemons, compared.

One guest boot per daemon.  The guest gets two virtio-fs devices:

* ``root``: the host's ``/``, read-only (a plain bind of ``/`` remounted
  read-only inside a private mount namespace, served by QEMU's C virtiofsd
  with ``cache=always``), mounted on ``/host``: the guest chroots into it to
  run the host's ``/usr/bin/python3``;
* ``fs0``: a fresh empty directory served by the daemon under test, mounted
  on ``/host/mnt`` (inside the chroot: ``/mnt``).

The suite prints one ``name: value`` line per check; the transcripts of QEMU's
C virtiofsd and of the Rust virtiofsd 1.13 must match line by line except for
the differences listed (and justified) in :data:`EXPECTED_C_RUST`; ours is
compared with the C daemon's the same way (:data:`EXPECTED_OURS_C`).
"""
from __future__ import annotations

import difflib
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

import virtiofs_async

from virtiofs_async.testing.vm import (
    GuestVM,
    GuestVMError,
    KernelAssets,
    VirtioFsDaemon,
    VirtioFsDevice,
    build_initramfs,
    make_init_script,
)

SUITE = Path(__file__).resolve().parent / "posix_suite.py"
REPO = Path(__file__).resolve().parents[2]
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
#: One boot + suite takes ~20-40 s under TCG; this bounds a hang.
BOOT_TIMEOUT = 150.0
#: Entries of the big directory, created on the host before the boot.
MANY = 10_000

#: ``{check name: (C value, Rust value, why)}``: where QEMU 7.2's C
#: virtiofsd and the Rust virtiofsd 1.13 are known to behave differently.
#: Empty: measured identical on every check (225 lines) (QEMU 7.2's virtiofsd with
#: ``-o cache=auto -o xattr``, virtiofsd 1.13.2 with ``--cache=auto --xattr``
#: and its default namespace sandbox, Debian's 6.1 cloud kernel in the guest).
#: Both leave POSIX and flock locks to the guest kernel (C: posix_lock and
#: flock are off by default; Rust: no remote locks), both answer FUSE_TMPFILE
#: with ENOSYS, both refuse trusted.* xattrs (no CAP_SYS_ADMIN kept).
EXPECTED_C_RUST: dict[str, tuple[str, str, str]] = {}

#: ``{check name: (C value, our value, why)}``: justified differences.
EXPECTED_OURS_C: dict[str, tuple[str, str, str]] = {
    "O_TMPFILE": (
        "ENOTSUP", "ok nlink=0",
        "ours implements FUSE_TMPFILE; QEMU 7.2's C virtiofsd (and the Rust "
        "virtiofsd 1.13) answer ENOSYS, which the guest reports as EOPNOTSUPP",
    ),
}

#: ``{check name: (C value, our value, what is wrong)}``: differences that
#: are bugs of ours, still open.  While only these remain the comparison is
#: an expected failure; once one is fixed, remove it here (the test fails
#: on a listed difference that no longer occurs).
KNOWN_OURS_BUGS: dict[str, tuple[str, str, str]] = {}

# --------------------------------------------------------------------------
# Daemons
# --------------------------------------------------------------------------


def c_argv(sock: Path, shared: Path) -> list[str]:
    return [C_VIRTIOFSD, f"--socket-path={sock}", "-o", f"source={shared}",
            "-o", "cache=auto", "-o", "xattr"]


def rust_argv(sock: Path, shared: Path) -> list[str]:
    from virtiofs_async.testing.peers import ensure_rust_virtiofsd

    return [*ensure_rust_virtiofsd(), "--socket-path", str(sock), "--shared-dir", str(shared),
            "--cache=auto", "--xattr"]


def ours_argv(sock: Path, shared: Path) -> list[str]:
    return [sys.executable, "-m", "virtiofs_async", "--socket-path", str(sock),
            "--shared-dir", str(shared), "--xattr"]


def _ours_unavailable() -> str | None:
    env = {**os.environ, "PYTHONPATH": str(Path(virtiofs_async.__file__).resolve().parents[1])}
    try:
        proc = subprocess.run([sys.executable, "-m", "virtiofs_async", "--help"], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"python -m virtiofs_async --help: {exc}"
    if proc.returncode != 0 or "--shared-dir" not in proc.stdout:
        return (f"python -m virtiofs_async --help failed ({proc.returncode}): "
                f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return None


DAEMONS: dict[str, Callable[[Path, Path], list[str]]] = {
    "c": c_argv, "rust": rust_argv, "ours": ours_argv,
}

# --------------------------------------------------------------------------
# The guest
# --------------------------------------------------------------------------

GUEST_COMMAND = r"""
set -u
mount -t proc proc /host/proc || exit 90
mount -t devtmpfs devtmpfs /host/dev || exit 91
mount -t tmpfs tmpfs /host/tmp || exit 92
cp /posix_suite.py /host/tmp/posix_suite.py || exit 93
chroot /host /usr/bin/python3 -S /tmp/posix_suite.py /mnt
rc=$?
umount /host/mnt || echo "# umount /host/mnt failed"
umount /host/tmp /host/dev /host/proc
exit $rc
"""


def rootfs_argv(sock: Path, ro_dir: Path) -> list[str]:
    """C virtiofsd serving the host's / read-only (a non-recursive bind of /
    onto ``ro_dir``, remounted ro, in a private mount namespace)."""
    script = (
        'mount --bind / "$1" && mount -o remount,bind,ro "$1" && '
        f'exec {C_VIRTIOFSD} --socket-path="$2" -o source="$1" -o cache=always'
        " -o no_xattr"
    )
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
            str(ro_dir), str(sock)]


@pytest.fixture(scope="module")
def posix_initrd(guest_kernel: KernelAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    init = make_init_script(
        guest_kernel.module_names,
        [("root", "/host"), ("fs0", "/host/mnt")],
        GUEST_COMMAND,
        clock_sync=False,
    )
    path = tmp_path_factory.mktemp("posix") / "posix.cpio"
    return build_initramfs(path, init, {**guest_kernel.initramfs_files(),
                                        "/posix_suite.py": SUITE.read_bytes()})


def suite_lines(transcript: str) -> list[str]:
    """The checks of a transcript: every line up to ``END``, minus
    diagnostics (``#``)."""
    out = []
    for line in transcript.splitlines():
        if line == "END":
            break
        if not line.startswith("#"):
            out.append(line)
    return out


def as_dict(lines: list[str]) -> dict[str, str]:
    d: dict[str, str] = {}
    section = ""
    for line in lines:
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        name, _, value = line.partition(": ")
        key = name
        i = 2
        while key in d:
            key = f"{name} #{i}"
            i += 1
        d[key] = value
    return d


class SuiteRun:
    def __init__(self, name: str, transcript: str, duration: float, daemon_log: str) -> None:
        self.name = name
        self.transcript = transcript
        self.duration = duration
        self.daemon_log = daemon_log
        self.lines = suite_lines(transcript)
        self.checks = as_dict(self.lines)


def run_suite(name: str, kernel: KernelAssets, initrd: Path, base: Path) -> SuiteRun:
    base.mkdir(parents=True, exist_ok=True)
    shared = base / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    many = shared / "many"  # see posix_suite.many
    many.mkdir()
    for i in range(MANY):
        (many / f"e{i:05d}").touch()
    ro = base / "ro"
    ro.mkdir()
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vfs-px-") as sockdir:
        sock_root = Path(sockdir) / "root.sock"
        sock = Path(sockdir) / "fs0.sock"
        env = {**os.environ, "PYTHONPATH": str(Path(virtiofs_async.__file__).resolve().parents[1])}
        argv = DAEMONS[name](sock, shared)
        root_d = VirtioFsDaemon(rootfs_argv(sock_root, ro), sock_root, log_path=base / "root.log")
        test_d = VirtioFsDaemon(argv, sock, log_path=base / f"{name}.log", cwd=REPO, env=env)
        with root_d, test_d:
            vm = GuestVM(kernel, initrd,
                         [VirtioFsDevice(sock_root, "root"), VirtioFsDevice(sock, "fs0")],
                         timeout=BOOT_TIMEOUT, workdir=base / "vm")
            result = vm.run(watch=[root_d, test_d])
            test_d.wait(10)
            log = test_d.log()
    try:
        result.check()
    except GuestVMError as exc:
        raise AssertionError(f"{name}: {exc}\n--- daemon log ---\n{log[-3000:]}") from None
    (base / "transcript.txt").write_text(result.transcript + "\n")
    return SuiteRun(name, result.transcript, result.duration, log)


@pytest.fixture(scope="module")
def suite_runs(guest_kernel: KernelAssets, posix_initrd: Path,
               tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], SuiteRun]:
    """``get(name)``: the suite's run against daemon ``name`` (booted once
    per module, on first request)."""
    cache: dict[str, SuiteRun | BaseException] = {}

    def get(name: str) -> SuiteRun:
        if name not in cache:
            if name == "ours":
                why = _ours_unavailable()
                if why:
                    pytest.fail(why)
            try:
                cache[name] = run_suite(name, guest_kernel, posix_initrd,
                                        tmp_path_factory.mktemp(f"posix-{name}"))
            except BaseException as exc:  # remembered: do not boot twice
                cache[name] = exc
        got = cache[name]
        if isinstance(got, BaseException):
            raise got
        return got

    return get


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------


def compare(a: SuiteRun, b: SuiteRun, expected: dict[str, tuple[str, str, str]]) -> list[str]:
    """Problems: differing checks not in ``expected`` (or with other values
    than documented), and documented differences that did not occur."""
    problems = []
    for key in sorted(set(a.checks) | set(b.checks), key=lambda k: (k not in a.checks, k)):
        va, vb = a.checks.get(key, "<missing>"), b.checks.get(key, "<missing>")
        if key in expected:
            ea, eb, _why = expected[key]
            if (va, vb) != (ea, eb):
                problems.append(f"{key}: {a.name}={va!r} {b.name}={vb!r}, "
                                f"documented {a.name}={ea!r} {b.name}={eb!r}")
        elif va != vb:
            problems.append(f"{key}: {a.name}={va!r} {b.name}={vb!r}")
    return problems


def _report(a: SuiteRun, b: SuiteRun, problems: list[str]) -> str:
    diff = "\n".join(difflib.unified_diff(a.lines, b.lines, a.name, b.name, lineterm="", n=0))
    return ("\n".join(problems) + "\n--- full diff ---\n" + diff)


def _sane(run: SuiteRun) -> None:
    text = "\n".join(run.lines)
    assert "END" in run.transcript.splitlines(), f"{run.name}: no END\n{run.transcript}"
    assert "CRASHED" not in text and "child-" not in text, f"{run.name}:\n{run.transcript}"
    assert len(run.checks) > 200, f"{run.name}: only {len(run.checks)} checks"


@pytest.mark.vm
@pytest.mark.parametrize("name", ["c", "rust", "ours"])
def test_suite_runs(name: str, suite_runs) -> None:
    """The suite completes on each daemon (no crash) and the basic checks
    have the values every POSIX filesystem gives."""
    run = suite_runs(name)
    print(f"\n{name}: boot + suite {run.duration:.1f} s, {len(run.checks)} checks")
    print("\n".join(l for l in run.transcript.splitlines() if l.startswith("#")))
    _sane(run)
    c = run.checks
    must = {
        "chmod 0754": "754",
        "create mode": "644",
        "O_EXCL existing": "EEXIST",
        "rename dir over nonempty dir": "ENOTEMPTY",
        "link count": "2 2",
        "open symlink loop": "ELOOP",
        "create 256-byte name": "ENAMETOOLONG",
        "many listdir count": str(MANY + 400),
        "many listdir exact": "True",
        "many after unlink": "True",
        "unlinked fstat nlink": "0",
        "pread 5GiB": "b'far'",
        "uid1000 read 0600 root file": "EACCES",
        "uid1000 created owner": "1000:1000",
        "flock EX|NB while held": "EAGAIN",
        "getxattr": "b'v1'",
    }
    wrong = {k: (c.get(k), v) for k, v in must.items() if c.get(k) != v}
    assert not wrong, f"{name}: (got, want) {wrong}\n{run.transcript}"


@pytest.mark.vm
def test_c_and_rust_agree(suite_runs) -> None:
    """QEMU's C virtiofsd and the Rust virtiofsd give the same transcript,
    except for the documented differences."""
    c, rust = suite_runs("c"), suite_runs("rust")
    problems = compare(c, rust, EXPECTED_C_RUST)
    assert not problems, _report(c, rust, problems)


@pytest.mark.vm
def test_ours_agrees_with_c(suite_runs) -> None:
    """Our daemon gives the C virtiofsd's transcript, except for the
    documented differences."""
    c, ours = suite_runs("c"), suite_runs("ours")
    problems = compare(c, ours, EXPECTED_OURS_C)
    bugs = [p for p in problems if p.split(": ", 1)[0] in KNOWN_OURS_BUGS]
    others = [p for p in problems if p not in bugs]
    assert not others, _report(c, ours, others)
    for key, (vc, vo, _why) in KNOWN_OURS_BUGS.items():
        got = (c.checks.get(key), ours.checks.get(key))
        assert got == (vc, vo), (f"known bug {key!r} now gives {got}, listed as {(vc, vo)}: "
                                 "update KNOWN_OURS_BUGS")
    if bugs:
        pytest.xfail("known bugs of ours: " + "; ".join(bugs))


def test_compare_logic() -> None:
    """compare() flags undocumented differences, wrong documented values and
    documented differences that did not occur."""
    a = SuiteRun("a", "[s]\nx: 1\ny: 2\nz: 3\nEND\n# t\n", 0, "")
    b = SuiteRun("b", "[s]\nx: 1\ny: 9\nw: 4\nEND\n", 0, "")
    assert a.checks == {"x": "1", "y": "2", "z": "3"}
    got = compare(a, b, {})
    assert got == ["y: a='2' b='9'", "z: a='3' b='<missing>'", "w: a='<missing>' b='4'"]
    assert compare(a, b, {"y": ("2", "9", ""), "z": ("3", "<missing>", ""),
                          "w": ("<missing>", "4", "")}) == []
    assert len(compare(a, a, {"x": ("1", "2", "")})) == 1
    dup = SuiteRun("d", "k: 1\nk: 2\n", 0, "")
    assert dup.checks == {"k": "1", "k #2": "2"}


def test_debian_mirror_parsing(tmp_path: Path) -> None:
    """The mirror is read from the machine's apt config, deb822 or one-line,
    skipping security/updates suites, other archives and deb-src."""
    from virtiofs_async.testing.peers import debian_mirror

    apt = tmp_path / "etc" / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list.d" / "debian.sources").write_text(
        "Types: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n\n"
        "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n"
        "Types: deb\n# comment\nURIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    (apt / "sources.list.d" / "other.list").write_text("deb https://example.org/apt stable main\n")
    assert debian_mirror(tmp_path) == "http://mirror.example/debian"
    (apt / "sources.list.d" / "debian.sources").unlink()
    (apt / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] http://one.example/debian bookworm main contrib\n"
    )
    assert debian_mirror(tmp_path) == "http://one.example/debian"
    (apt / "sources.list").write_text("")
    with pytest.raises(GuestVMError):
        debian_mirror(tmp_path)


@pytest.mark.vm
def test_rust_virtiofsd_runs() -> None:
    """The cached Rust virtiofsd (fetched once from Debian trixie) runs
    through trixie's loader and is version 1.13; a second call is instant."""
    import time

    from virtiofs_async.testing.peers import ensure_rust_virtiofsd

    argv = ensure_rust_virtiofsd()
    assert argv[1] == "--library-path" and argv[0].endswith("ld-linux-x86-64.so.2")
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("virtiofsd 1.13"), out.stdout
    t = time.monotonic()
    assert ensure_rust_virtiofsd() == argv
    assert time.monotonic() - t < 1.0
