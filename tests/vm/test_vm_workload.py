"""Boot a guest, run workload.sh on a virtio-fs mount, check the transcript."""
from __future__ import annotations

import hashlib
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from virtiofs_async.testing.vm import (
    GuestVM,
    KernelAssets,
    VMResult,
    VirtioFsDaemon,
    VirtioFsDevice,
    build_initramfs,
    make_init_script,
)

#: Check names workload.sh must report as OK (its first word after "OK").
EXPECTED_OK = [
    "mounted", "mkdir:vmtest", "mkdir-p", "isdir:a/b/c",
    *(f"{step}:{f}" for f in ("f_0", "f_1", "f_4K", "f_1M", "f_64M")
      for step in ("write", "size", "readback")),
    "sync", "drop_caches", "readback:t4k", "readback-dd:f_1M",
    "ls", "ls-la:f_4K", "readdir-count", "readdir-unique", "rm-many",
    "rename", "rename:old-gone", "rename:content", "rename-replace",
    "rename-replace:content", "rename-dir", "rename-dir:moved",
    "link", "link:nlink", "link:same-inode", "link:content", "unlink-link",
    "unlink-link:nlink",
    "symlink", "symlink:is-link", "readlink", "symlink:follow", "symlink-dangling",
    "readlink-dangling", "symlink-dangling:no-target",
    "chmod", "chmod:mode", "chmod-dir", "chmod-dir:mode", "chmod-x", "chmod-x:mode",
    "truncate-grow", "truncate-grow:size", "truncate-grow:head", "truncate-grow:tail-zero",
    "truncate-shrink", "truncate-shrink:size", "truncate-shrink:content",
    "truncate-shrink:after-drop", "truncate-zero", "truncate-zero:size",
    "overwrite", "overwrite:content", "append:content",
    "unlink", "unlink:gone", "rmdir-nonempty:refused", "rm-tree", "rm-tree:gone", "rmdir",
    "xattr-set", "xattr-get", "xattr-list", "xattr-replace", "xattr-replaced",
    "xattr-remove", "xattr-removed:absent", "cleanup",
    "mtime", "df", "final-listing", "umount", "umount:gone",
]

#: The guest clock must match the host's far better than the RTC's 1 s.
CLOCK_TOLERANCE_NS = 50_000_000


def parse_transcript(text: str) -> tuple[dict[str, str], list[str], int | None]:
    """``({name: detail} of OK lines, FAIL lines, n of "DONE fails=n")``."""
    oks: dict[str, str] = {}
    fails: list[str] = []
    done = None
    for line in text.splitlines():
        if line.startswith("OK "):
            name, _, detail = line[3:].partition(" ")
            oks[name] = detail
        elif line.startswith("FAIL"):
            fails.append(line)
        elif m := re.fullmatch(r"DONE fails=(\d+)", line):
            done = int(m.group(1))
    return oks, fails, done


def test_parse_transcript() -> None:
    oks, fails, done = parse_transcript(
        "@@CLOCK?\nOK write:f_1 sha256=ab\n| -rw FAIL-looking listing\n"
        "FAIL size:f_1 got '0' expected '1'\nOK umount\nDONE fails=1\n"
    )
    assert oks == {"write:f_1": "sha256=ab", "umount": ""}
    assert fails == ["FAIL size:f_1 got '0' expected '1'"]
    assert done == 1


def _probe_socket(path: Path) -> None:
    """Connect to a daemon's listening socket and hang up at once."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(path))


def run_workload(
    spec, kernel: KernelAssets, image, tmp: Path, sock_dir: Path, repo: Path, timeout: float
) -> tuple[VMResult, Path]:
    """Start the daemon, boot the guest, check the daemon afterwards."""
    shared = tmp / "shared"
    shared.mkdir()
    sock = sock_dir / "vfs.sock"
    daemon = VirtioFsDaemon(spec.argv(sock, shared), sock, cwd=repo, log_path=tmp / "daemon.log")
    with daemon:
        device = VirtioFsDevice(sock, image.tag)
        result = GuestVM(kernel, image.path, [device], timeout=timeout).run(watch=[daemon])
        if spec.ours:
            # Ours outlives the guest: alive, still accepting, no traceback.
            assert daemon.alive(), f"daemon died with the guest:\n{daemon.log()}"
            _probe_socket(sock)
            time.sleep(0.5)
            assert daemon.alive(), f"daemon died after a bare connection:\n{daemon.log()}"
            status = daemon.stop(signal.SIGTERM)
            assert status != -signal.SIGKILL, f"daemon ignored SIGTERM:\n{daemon.log()}"
            assert "Traceback" not in daemon.log(), daemon.log()
        else:
            # QEMU's virtiofsd serves one connection and exits when it ends.
            status = daemon.wait(15)
            assert status == 0, f"virtiofsd exit status {status}:\n{daemon.log()}"
    return result, shared


@pytest.mark.vm
def test_workload(
    daemon_spec,
    guest_kernel: KernelAssets,
    workload_initramfs,
    tmp_path: Path,
    short_tmp: Path,
    repo_root: Path,
    vm_timeout: float,
    record_property,
) -> None:
    """workload.sh passes on the daemon; the daemon behaves when the guest goes."""
    spec = daemon_spec
    result, shared = run_workload(
        spec, guest_kernel, workload_initramfs, tmp_path, short_tmp, repo_root, vm_timeout
    )
    record_property("vm_seconds", round(result.duration, 2))
    print(f"\n{spec.name}: boot + workload + poweroff {result.duration:.1f} s, "
          f"clock skew {result.clock_skew_ns} ns, check {result.clock_check_ns} ns")
    result.check()

    oks, fails, done = parse_transcript(result.transcript)
    context = "\n" + result.raw_transcript
    assert not fails, context
    missing = [name for name in EXPECTED_OK if name not in oks]
    assert not missing, f"missing OK lines {missing}" + context
    assert done == 0, context
    assert "virtiofs" in oks["mounted"], context
    assert oks["write:f_64M"] == f"sha256={workload_initramfs.sha256_64m}", context

    # The clock was set from the host: the guest's own estimate, and the
    # host's view (arrival time of a stamped line minus its stamp).
    assert result.clock_skew_ns is not None, context
    assert abs(result.clock_skew_ns) < CLOCK_TOLERANCE_NS, result.clock_skew_ns
    assert result.clock_check_ns is not None, context
    assert -CLOCK_TOLERANCE_NS < result.clock_check_ns < 2 * CLOCK_TOLERANCE_NS, (
        result.clock_check_ns
    )

    if spec.passthrough:
        # The data reached the host's filesystem as the guest wrote it.
        for name in ("f_0", "f_1", "f_4K", "f_1M", "f_64M"):
            expected = oks[f"write:{name}"].removeprefix("sha256=")
            digest = hashlib.sha256((shared / "vmtest" / name).read_bytes()).hexdigest()
            assert digest == expected, name
        assert sorted(p.name for p in (shared / "vmtest").iterdir()) == [
            "f_0", "f_1", "f_1M", "f_4K", "f_64M"
        ]


TWO_SHARES = r"""
set -u
for m in $VM_MOUNTS; do echo "MOUNT $m $(grep " $m " /proc/mounts | cut -d' ' -f1,3)"; done
echo one > /mnt/one/hello && echo two > /mnt/two/hello || echo "FAIL write"
echo "READ $(cat /mnt/one/hello) $(cat /mnt/two/hello)"
umount /mnt/one && umount /mnt/two && echo "UMOUNTED"
"""


@pytest.mark.vm
def test_two_shares(
    guest_kernel: KernelAssets,
    virtiofsd_spec,
    tmp_path: Path,
    short_tmp: Path,
    vm_timeout: float,
) -> None:
    """Two vhost-user-fs devices, two daemons, two tags: each reaches its own."""
    init = make_init_script(
        guest_kernel.module_names,
        [("one", "/mnt/one"), ("two", "/mnt/two")],
        "sh /two.sh",
        clock_sync=False,
    )
    initrd = build_initramfs(
        tmp_path / "two.cpio", init, {**guest_kernel.initramfs_files(), "/two.sh": TWO_SHARES}
    )
    dirs = {t: tmp_path / t for t in ("one", "two")}
    daemons: list[VirtioFsDaemon] = []
    try:
        for tag, d in dirs.items():
            d.mkdir()
            sock = short_tmp / f"{tag}.sock"
            log = tmp_path / f"{tag}.log"
            daemons.append(VirtioFsDaemon(virtiofsd_spec.argv(sock, d), sock, log_path=log).start())
        devices = [VirtioFsDevice(d.socket_path, tag) for d, tag in zip(daemons, dirs)]
        result = GuestVM(guest_kernel, initrd, devices, timeout=vm_timeout).run(watch=daemons)
        statuses = [d.wait(15) for d in daemons]
    finally:
        for d in daemons:
            d.stop()
    result.check()
    lines = result.transcript.splitlines()
    assert "MOUNT /mnt/one one virtiofs" in lines, result.raw_transcript
    assert "MOUNT /mnt/two two virtiofs" in lines, result.raw_transcript
    assert "READ one two" in lines and "UMOUNTED" in lines, result.raw_transcript
    assert (dirs["one"] / "hello").read_text() == "one\n"
    assert (dirs["two"] / "hello").read_text() == "two\n"
    assert statuses == [0, 0]
    assert result.clock_skew_ns is None  # clock_sync=False: no handshake
