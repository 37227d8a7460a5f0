"""Escape attempts from inside a real guest (escape_suite.py), against our
passthrough daemon, with QEMU's C virtiofsd run through the same attempts.

Layout on the host, in a fresh directory under /tmp::

    outside/secret, outside/secret2      content holds a random token
    shared/                              the share (mounted on /mnt in the guest)
        abs -> <base>/outside/secret     absolute symlink out
        rel -> ../outside/secret         relative symlink out
        deep -> ../../..(x12)<base>/outside/secret
        dirlink -> ../outside            symlink to the outside directory
        rootlink -> /
        swapdir/                         replaced by a symlink to outside/ on request
        inside, moveme, moveme2

The guest runs the suite as root in a chroot of the host's / (served
read-only by our daemon; a tmpfs hides the host's /tmp, so the outside
directory is reachable by no legitimate path). The test fails when a guest
line says ESCAPED, when the outside directory changed in any way (names,
content, mode, owner, times, link counts, xattrs), or when a request on a
swapped directory's nodeid landed anywhere but in the directory it named.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

import virtiofs_async
from virtiofs_async.testing.vm import (
    GuestVM,
    KernelAssets,
    VirtioFsDaemon,
    VirtioFsDevice,
    build_initramfs,
    make_init_script,
)

SUITE = Path(__file__).resolve().parent / "escape_suite.py"
REPO = Path(__file__).resolve().parents[2]
BOOT_TIMEOUT = 150.0

GUEST_COMMAND = r"""
set -u
mount -t proc proc /host/proc || exit 90
mount -t devtmpfs devtmpfs /host/dev || exit 91
mount -t tmpfs tmpfs /host/tmp || exit 92
cp /escape_suite.py /host/tmp/escape_suite.py || exit 93
chroot /host /usr/bin/python3 -S /tmp/escape_suite.py /mnt $(cat /escape-args)
rc=$?
umount /host/mnt || echo "# umount /host/mnt failed"
umount /host/tmp /host/dev /host/proc
exit $rc
"""


def daemon_argv(name: str, sock: Path, shared: Path) -> list[str]:
    if name == "ours":
        return [sys.executable, "-m", "virtiofs_async", "--socket-path", str(sock), "--shared-dir", str(shared),
                "--xattr"]
    return ["/usr/lib/qemu/virtiofsd", f"--socket-path={sock}", "-o", f"source={shared}", "-o", "cache=auto",
            "-o", "xattr"]


def root_argv(sock: Path) -> list[str]:
    """Our daemon serving the host's / read-only, for the guest's python3."""
    return [sys.executable, "-m", "virtiofs_async", "--socket-path", str(sock), "--shared-dir", "/",
            "--readonly", "--cache", "always"]


def snapshot(top: Path) -> dict[str, Any]:
    """Everything about a tree that an escape could change."""
    state: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [*dirnames, *filenames, "."]:
            p = Path(dirpath, name)
            st = os.lstat(p)
            entry: dict[str, Any] = {
                "mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size,
                "nlink": st.st_nlink, "mtime": st.st_mtime_ns, "ctime": st.st_ctime_ns,
                "xattrs": sorted(os.listxattr(p, follow_symlinks=False)),
            }
            if p.is_file() and not p.is_symlink():
                entry["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            state[str(p.relative_to(top))] = entry
    return state


def make_layout(base: Path, token: str) -> tuple[Path, Path]:
    outside, shared = base / "outside", base / "shared"
    outside.mkdir()
    shared.mkdir()
    (outside / "secret").write_text(f"secret {token}\n")
    (outside / "secret2").write_text(f"second {token}\n")
    (shared / "abs").symlink_to(outside / "secret")
    (shared / "rel").symlink_to("../outside/secret")
    (shared / "deep").symlink_to("../" * 12 + str(outside / "secret")[1:])
    (shared / "dirlink").symlink_to("../outside")
    (shared / "rootlink").symlink_to("/")
    (shared / "swapdir").mkdir()
    (shared / "swapdir" / "inside-swap").write_text("inside\n")
    for name in ("inside", "moveme", "moveme2"):
        (shared / name).write_text(f"{name}\n")
    return outside, shared


class Swapper(threading.Thread):
    """Replaces shared/swapdir by a symlink to outside/ when the guest
    creates shared/.please-swap, then creates shared/.swapped."""

    def __init__(self, shared: Path, outside: Path) -> None:
        super().__init__(daemon=True)
        self.shared, self.outside = shared, outside
        self.stop = threading.Event()
        self.swapped = False

    def run(self) -> None:
        while not self.stop.wait(0.05):
            if (self.shared / ".please-swap").exists():
                os.rename(self.shared / "swapdir", self.shared / "swapdir.old")
                os.symlink(self.outside, self.shared / "swapdir")
                (self.shared / ".swapped").touch()
                self.swapped = True
                return


def run_escape_suite(name: str, kernel: KernelAssets, tmp: Path) -> tuple[str, Path, Path, bool]:
    token = secrets.token_hex(16)
    base = Path(tempfile.mkdtemp(prefix="vfs-esc-", dir="/tmp"))  # hidden from the guest by its /tmp
    try:
        outside, shared = make_layout(base, token)
        inodes = ",".join(str(os.stat(outside / n).st_ino) for n in ("secret", "secret2")) + "," + str(
            os.stat(outside).st_ino)
        args = f"{token} {outside} {inodes}"
        init = make_init_script(kernel.module_names, [("root", "/host"), ("fs0", "/host/mnt")], GUEST_COMMAND,
                                clock_sync=False)
        initrd = build_initramfs(tmp / "escape.cpio", init, {
            **kernel.initramfs_files(), "/escape_suite.py": SUITE.read_bytes(), "/escape-args": args,
        })
        before = snapshot(outside)
        env = {**os.environ, "PYTHONPATH": str(Path(virtiofs_async.__file__).resolve().parents[1])}
        swapper = Swapper(shared, outside)
        with tempfile.TemporaryDirectory(prefix="vfs-esc-s-") as sockdir:
            sock_root, sock = Path(sockdir) / "root.sock", Path(sockdir) / "fs0.sock"
            root_d = VirtioFsDaemon(root_argv(sock_root), sock_root, log_path=tmp / "root.log", cwd=REPO, env=env)
            test_d = VirtioFsDaemon(daemon_argv(name, sock, shared), sock, log_path=tmp / f"{name}.log", cwd=REPO,
                                    env=env)
            with root_d, test_d:
                swapper.start()
                vm = GuestVM(kernel, initrd, [VirtioFsDevice(sock_root, "root"), VirtioFsDevice(sock, "fs0")],
                             timeout=BOOT_TIMEOUT, workdir=tmp / "vm")
                result = vm.run(watch=[root_d, test_d])
                swapper.stop.set()
                log = test_d.log()
        result.check()
        assert before == snapshot(outside), f"{name}: the outside directory changed"
        assert "Traceback" not in log, log[-3000:]
        # Keep the tree as it is (owners included) for the host-side checks.
        kept = tmp / "after"
        os.rename(base, kept)
        return result.transcript, kept / "shared", kept / "outside", swapper.swapped
    finally:
        shutil.rmtree(base, ignore_errors=True)  # gone already unless something failed


@pytest.mark.vm
@pytest.mark.parametrize("name", ["ours", "c"])
def test_no_escape_from_the_share(name: str, guest_kernel: KernelAssets, tmp_path: Path) -> None:
    transcript, shared, outside, swapped = run_escape_suite(name, guest_kernel, tmp_path)
    lines = transcript.splitlines()
    print(f"\n{name}:\n{transcript}")
    assert "END" in lines, transcript
    assert not [l for l in lines if "CRASHED" in l], transcript
    escaped = [l for l in lines if ": ESCAPED" in l]
    assert not escaped, "\n".join(escaped)
    attempts = [l for l in lines if ": blocked" in l]
    assert len(attempts) >= 30, transcript
    assert swapped, "the swap never happened"
    # Nothing was planted outside; what the guest created on the swapped
    # directory's nodeid is in that directory (now swapdir.old).
    assert sorted(p.name for p in outside.iterdir()) == ["secret", "secret2"]
    served = 0
    for attempt, planted in (("create in swapped dir", "planted"), ("rename into swapped dir", "planted2"),
                             ("mkdir in swapped dir", "planted-dir")):
        if f"{attempt}: blocked (ok, effect checked on the host)" in lines:
            assert (shared / "swapdir.old" / planted).exists(), attempt
            served += 1
    if name == "ours":
        assert served == 3, transcript  # ours serves all three on the old directory
    # Calls on a symlink's name acted on the symlink itself, in the share
    # (link() never follows a symlink, whatever the flag).
    for attempt, link in (("link symlink (no follow)", "abs-hard"), ("link symlink (follow)", "abs-hard2")):
        if f"{attempt}: blocked (ok, effect checked on the host)" in lines:
            assert (shared / link).is_symlink() and os.readlink(shared / link) == os.readlink(shared / "abs")
    if "lchown symlink: blocked (ok, effect checked on the host)" in lines:
        assert os.lstat(shared / "abs").st_uid == 4242
