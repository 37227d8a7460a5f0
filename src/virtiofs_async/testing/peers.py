"""Peer daemons to compare against: the Rust virtiofsd from Debian trixie.

Debian 13 (trixie) packages the Rust virtiofsd (1.13); its binary needs a
newer glibc than Debian 12 has, but it runs unchanged through trixie's own
dynamic loader.  :func:`ensure_rust_virtiofsd` fetches it without touching
the system's apt configuration: a private sources list and state directory
point apt at suite ``trixie`` of the machine's configured Debian mirror,
``apt-get download`` fetches the packages, ``dpkg-deb -x`` unpacks them into
one folder of the cache, and the result is an argv prefix::

    argv = ensure_rust_virtiofsd()          # [loader, --library-path, LIB, virtiofsd]
    subprocess.run([*argv, "--version"])
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from .vm import GuestVMError

__all__ = [
    "RUST_VIRTIOFSD_PACKAGES",
    "debian_mirror",
    "default_peers_dir",
    "ensure_rust_virtiofsd",
    "rust_virtiofsd_argv",
]

#: Packages unpacked together: the daemon and the libraries (with trixie's
#: loader, in libc6) it links against.
RUST_VIRTIOFSD_PACKAGES: tuple[str, ...] = (
    "virtiofsd", "libc6", "libcap-ng0", "libseccomp2", "libgcc-s1",
)
_SUITE = "trixie"
_STAMP = "virtiofsd-trixie.json"
_FOLDER = "virtiofsd-trixie"


def default_peers_dir() -> Path:
    """``$VIRTIOFS_ASYNC_PEERS_CACHE`` or ``~/.cache/virtiofs-async/peers``."""
    env = os.environ.get("VIRTIOFS_ASYNC_PEERS_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "virtiofs-async" / "peers"


def _sources_entries(root: Path = Path("/")) -> list[tuple[str, list[str]]]:
    """``[(uri, suites)]`` of every enabled ``deb`` entry of the apt config
    under ``root`` (one-line ``.list`` and deb822 ``.sources`` formats)."""
    files = [root / "etc/apt/sources.list"]
    d = root / "etc/apt/sources.list.d"
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.suffix in (".list", ".sources"))
    out: list[tuple[str, list[str]]] = []
    for f in files:
        try:
            text = f.read_text(errors="replace")
        except OSError:
            continue
        if f.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
                if "deb" not in fields.get("types", "").split():
                    continue
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    out.append((uri, fields.get("suites", "").split()))
        else:
            for line in text.splitlines():
                line = line.split("#", 1)[0].strip()
                m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if m:
                    out.append((m.group(1), [m.group(2)]))
    return out


def debian_mirror(root: Path = Path("/")) -> str:
    """The URI of the machine's configured main Debian archive: the first
    ``deb`` entry whose suites include a plain release name (no ``-security``
    / ``-updates`` suffix) and whose URI path ends in ``/debian``; failing
    that, the first such entry whose URI mentions ``debian``."""
    entries = _sources_entries(root)
    for uri, suites in entries:
        if uri.rstrip("/").endswith("/debian") and any("-" not in s and "/" not in s for s in suites):
            return uri.rstrip("/")
    for uri, suites in entries:  # e.g. a snapshot.debian.org URI
        if "debian" in uri and any("-" not in s and "/" not in s for s in suites):
            return uri.rstrip("/")
    raise GuestVMError(f"no Debian mirror found in {root / 'etc/apt'} (entries: {entries})")


def rust_virtiofsd_argv(folder: Path) -> list[str]:
    """The argv prefix running ``folder``'s virtiofsd through its own loader."""
    lib = folder / "usr" / "lib" / "x86_64-linux-gnu"
    return [str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
            str(folder / "usr" / "libexec" / "virtiofsd")]


def _run(argv: list[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuestVMError(f"{' '.join(argv)}: {exc}") from exc
    if proc.returncode != 0:
        raise GuestVMError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr.strip()}")
    return proc.stdout


def _check(argv: list[str]) -> str:
    """``--version`` of the unpacked daemon; raises unless it runs."""
    out = _run([*argv, "--version"], timeout=30)
    if "virtiofsd" not in out:
        raise GuestVMError(f"unexpected --version output: {out!r}")
    return out.strip()


def _download(cache: Path, folder: Path) -> str:
    mirror = debian_mirror()
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    with tempfile.TemporaryDirectory(dir=cache, prefix=".apt-") as tmpdir:
        tmp = Path(tmpdir)
        (tmp / "lists" / "partial").mkdir(parents=True)
        (tmp / "archives" / "partial").mkdir(parents=True)
        (tmp / "parts").mkdir()
        (tmp / "prefs").mkdir()
        signed = f" [signed-by={keyring}]" if keyring.exists() else ""
        (tmp / "sources.list").write_text(f"deb{signed} {mirror} {_SUITE} main\n")
        (tmp / "status").write_text("")
        opts = [
            "-o", f"Dir::Etc::SourceList={tmp / 'sources.list'}",
            "-o", f"Dir::Etc::SourceParts={tmp / 'parts'}",
            "-o", f"Dir::Etc::Preferences={tmp / 'preferences'}",
            "-o", f"Dir::Etc::PreferencesParts={tmp / 'prefs'}",
            "-o", f"Dir::State={tmp}",
            "-o", f"Dir::State::Lists={tmp / 'lists'}",
            "-o", f"Dir::State::status={tmp / 'status'}",
            "-o", f"Dir::Cache={tmp}",
            "-o", f"Dir::Cache::archives={tmp / 'archives'}",
            "-o", "Dir::Cache::pkgcache=", "-o", "Dir::Cache::srcpkgcache=",
            "-o", "APT::Architecture=amd64", "-o", "APT::Architectures=amd64",
            "-o", "Debug::NoLocking=1", "-q",
        ]
        if os.geteuid() == 0:
            opts += ["-o", "APT::Sandbox::User=root"]
        _run(["apt-get", *opts, "update"])
        dl = tmp / "debs"
        dl.mkdir()
        _run(["apt-get", *opts, "download", *RUST_VIRTIOFSD_PACKAGES], cwd=dl)
        debs = sorted(dl.glob("*.deb"))
        versions = {}
        for pkg in RUST_VIRTIOFSD_PACKAGES:
            found = [d for d in debs if d.name.startswith(pkg + "_")]
            if not found:
                raise GuestVMError(f"apt-get download {pkg} (suite {_SUITE}) produced no .deb")
            versions[pkg] = found[-1].name
        stage = cache / (".stage-" + _FOLDER)
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir()
        for name in versions.values():
            _run(["dpkg-deb", "-x", str(dl / name), str(stage)])
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(stage, folder)
    return json.dumps({"mirror": mirror, "suite": _SUITE, "debs": versions}, indent=1)


def ensure_rust_virtiofsd(cache_dir: Path | str | None = None, *, refresh: bool = False) -> list[str]:
    """Return the argv prefix that runs the Rust virtiofsd of Debian trixie.

    First use downloads and unpacks :data:`RUST_VIRTIOFSD_PACKAGES` into
    ``cache_dir/virtiofsd-trixie`` (default :func:`default_peers_dir`) with a
    private apt configuration (the system's is neither read for packages nor
    modified; only its mirror URI is reused) and checks that ``--version``
    runs.  Later calls find the stamp file and return at once.  Concurrent
    callers are serialised by a lock file.  Raises :class:`GuestVMError` when
    the mirror, apt or the binary fail.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_peers_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / _FOLDER
    stamp = cache / _STAMP
    argv = rust_virtiofsd_argv(folder)
    if not refresh and stamp.is_file() and all(Path(a).is_file() for a in (argv[0], argv[3])):
        return argv
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh and stamp.is_file() and all(Path(a).is_file() for a in (argv[0], argv[3])):
            return argv
        stamp.unlink(missing_ok=True)
        info = _download(cache, folder)
        version = _check(argv)
        data = json.loads(info)
        data["version"] = version
        tmp = stamp.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, stamp)
    return argv


if __name__ == "__main__":  # pragma: no cover - manual use
    import sys

    a = ensure_rust_virtiofsd(sys.argv[1] if len(sys.argv) > 1 else None)
    print(" ".join(a))
    print(_check(a))
