"""Fixtures of the VM tier: a real Linux guest (QEMU, TCG) mounting virtio-fs.

Needs the packages of scripts/setup-system.sh and access to Debian's package
mirror the first time (the guest kernel is cached, see
``virtiofs_async.testing.vm.default_cache_dir``).  Deselect with
``-m "not vm"``.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import attrs
import pytest

from virtiofs_async.testing.vm import (
    KernelAssets,
    build_initramfs,
    ensure_guest_kernel,
    host_binary_files,
    make_init_script,
)

REPO = Path(__file__).resolve().parents[2]
WORKLOAD = Path(__file__).resolve().parent / "workload.sh"
TAG = "fs0"
MOUNTPOINT = "/mnt/fs0"
#: Upper bound of one boot + workload.  A run takes ~10-20 s; the bound only
#: matters when something hangs (or the machine is badly overloaded).
VM_TIMEOUT = 150.0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "vm: boots a Linux guest under QEMU (TCG); needs scripts/setup-system.sh "
        "and, once, Debian's package mirror",
    )


@attrs.define(frozen=True)
class DaemonSpec:
    """How to start one vhost-user-fs daemon.

    ``argv(socket_path, shared_dir)`` builds the command (run from the repo
    root).  ``ours``: a daemon of this project, expected to outlive the guest
    and stay healthy; otherwise it is QEMU's C virtiofsd, which serves one
    connection and exits 0 when the guest goes away.  ``passthrough``: the
    guest's files appear in ``shared_dir`` on the host.
    """

    name: str
    argv: Callable[[Path, Path], list[str]]
    ours: bool
    passthrough: bool


def _virtiofsd(sock: Path, shared: Path) -> list[str]:
    return [
        "/usr/lib/qemu/virtiofsd",
        f"--socket-path={sock}",
        "-o", f"source={shared}",
        "-o", "cache=auto",
        "-o", "xattr",  # off by default in QEMU 7.2's virtiofsd
    ]


def _memfs(sock: Path, shared: Path) -> list[str]:
    # --persist: keep serving after the guest disconnects (checked by the tests)
    return [sys.executable, "examples/memfs.py", "--socket-path", str(sock), "--persist"]


VIRTIOFSD = DaemonSpec("virtiofsd", _virtiofsd, ours=False, passthrough=True)
MEMFS = DaemonSpec("memfs", _memfs, ours=True, passthrough=False)

#: The daemons every test taking a ``daemon_spec`` argument runs against.
DAEMONS = [
    pytest.param(VIRTIOFSD, id="virtiofsd"),
    pytest.param(MEMFS, id="memfs"),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "daemon_spec" in metafunc.fixturenames:
        metafunc.parametrize("daemon_spec", DAEMONS)


@attrs.define(frozen=True)
class WorkloadImage:
    """The workload initramfs, where its init mounts the share, and the
    sha256 the guest must find for f_64M."""

    path: Path
    tag: str
    mountpoint: str
    sha256_64m: str


def stamped_64m(block: bytes) -> bytes:
    """workload.sh's f_64M: 64 copies of a 1 MiB ``block``, copy ``i`` with
    its first 16 bytes replaced by ``b"%015d\\n" % i``."""
    assert len(block) == 1 << 20
    return b"".join(b"%015d\n" % i + block[16:] for i in range(64))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def vm_timeout() -> float:
    return VM_TIMEOUT


@pytest.fixture(scope="session")
def virtiofsd_spec() -> DaemonSpec:
    return VIRTIOFSD


@pytest.fixture(scope="session")
def guest_kernel() -> KernelAssets:
    """The cached Debian cloud kernel and its virtio-fs modules."""
    missing = [t for t in ("qemu-system-x86_64", "busybox", "setfattr") if shutil.which(t) is None]
    if missing or not Path("/usr/lib/qemu/virtiofsd").exists():
        pytest.fail(f"missing {missing or 'virtiofsd'}: run scripts/setup-system.sh as root")
    return ensure_guest_kernel()


@pytest.fixture(scope="session")
def guest_base_files(guest_kernel: KernelAssets) -> dict:
    """Files every VM-tier initramfs carries: the modules and the xattr tools."""
    return {**guest_kernel.initramfs_files(), **host_binary_files("setfattr", "getfattr")}


@pytest.fixture(scope="session")
def workload_initramfs(
    guest_kernel: KernelAssets, guest_base_files: dict, tmp_path_factory: pytest.TempPathFactory
) -> WorkloadImage:
    """Initramfs that mounts tag ``fs0`` on /mnt/fs0, sets the clock from the
    host and runs workload.sh on it."""
    init = make_init_script(
        guest_kernel.module_names,
        [(TAG, MOUNTPOINT)],
        f"sh /workload.sh {MOUNTPOINT} /workload-data",
        clock_sync=True,
    )
    block = os.urandom(1 << 20)
    digest = hashlib.sha256(stamped_64m(block)).hexdigest()
    path = tmp_path_factory.mktemp("initramfs") / "workload.cpio"
    files = {
        **guest_base_files,
        "/workload.sh": WORKLOAD,
        "/workload-data/block": block,
        "/workload-data/f_64M.sha256": digest + "\n",
    }
    build_initramfs(path, init, files)
    return WorkloadImage(path, TAG, MOUNTPOINT, digest)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory with a short path, for AF_UNIX sockets (108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="vfs-") as d:
        yield Path(d)
