"""A guest whose root filesystem is served by our daemon.

The seed's main use (kata-containers' rootfs over virtio-fs): our
passthrough daemon shares the host's ``/`` read-only (``--readonly``, its
default namespace sandbox); the guest's initramfs only loads the virtio-fs
modules, mounts the share and ``switch_root``s into it, so pid 1 of the
guest is the host's own ``/usr/bin/python3``, loaded through virtio-fs.
That program checks where it runs, then runs a real program from the share
(python3 with C extension modules: json, hashlib, sqlite3, zlib) and a
shell pipeline; the host runs the same program itself and the outputs must
be identical.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import virtiofs_async
from virtiofs_async.testing.vm import (
    GuestVM,
    KernelAssets,
    VirtioFsDaemon,
    VirtioFsDevice,
    build_initramfs,
    make_switch_root_init,
)

REPO = Path(__file__).resolve().parents[2]
PYTHON = "/usr/bin/python3"
BOOT_TIMEOUT = 150.0

#: The "real program": its output depends on the interpreter, its stdlib and
#: C extensions, and on files read from the root filesystem.
PROGRAM = r"""
import hashlib, json, os, sqlite3, sys, zlib
exe = os.path.realpath(sys.executable)
with open(exe, "rb") as f:
    exe_sha = hashlib.sha256(f.read()).hexdigest()
with open("/etc/os-release", "rb") as f:
    release = hashlib.sha256(f.read()).hexdigest()
db = sqlite3.connect(":memory:")
db.execute("create table t (x)")
db.executemany("insert into t values (?)", [(i,) for i in range(1000)])
total = db.execute("select sum(x) from t").fetchone()[0]
print(json.dumps({
    "version": sys.version, "executable": exe, "exe_sha256": exe_sha,
    "os_release_sha256": release, "sqlite": sqlite3.sqlite_version, "sum": total,
    "zlib": zlib.ZLIB_RUNTIME_VERSION, "crc": zlib.crc32(b"virtio-fs" * 1000),
    "stdlib_entries": len(os.listdir(os.path.dirname(os.__file__))),
}, sort_keys=True))
"""

SHELL = "ls /usr/lib/python3.11 | wc -l; cat /etc/debian_version"

#: Pid 1 of the guest, run from the share: mounts proc and a tmpfs /tmp,
#: reports facts and the two programs' outputs as one JSON line on ttyS1,
#: then powers off (pid 1 must never exit).
GUEST_INIT = r"""
import ctypes, errno, json, os, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
out = open("/dev/ttyS1", "w", buffering=1)
status = 1
try:
    for src, dst, fstype in ((b"proc", b"/proc", b"proc"), (b"tmpfs", b"/tmp", b"tmpfs")):
        if libc.mount(src, dst, fstype, 0, None) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst.decode())
    facts = {"pid": os.getpid(), "executable": sys.executable}
    for line in open("/proc/self/mountinfo"):
        left, _, right = line.partition(" - ")
        if left.split()[4] == "/":
            facts["root_fstype"] = right.split()[0]
            facts["root_options"] = left.split()[5]
    try:
        open("/virtiofs-async-rootfs-probe", "w").close()
        facts["write_to_root"] = "ok"
    except OSError as exc:
        facts["write_to_root"] = errno.errorcode[exc.errno]
    child = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    facts["program"] = [child.returncode, child.stdout, child.stderr[-2000:]]
    sh = subprocess.run(["/bin/sh", "-c", SHELL], capture_output=True, text=True, timeout=60)
    facts["shell"] = [sh.returncode, sh.stdout, sh.stderr[-2000:]]
    out.write("FACTS " + json.dumps(facts) + "\n")
    status = 0
except BaseException as exc:
    out.write("ERROR " + repr(exc) + "\n")
out.write("@@EXIT %d\n" % status)
out.flush()
os.sync()
libc.reboot(0x4321FEDC)  # LINUX_REBOOT_CMD_POWER_OFF
"""


def _host_outputs() -> tuple[list, list]:
    prog = subprocess.run([PYTHON, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    sh = subprocess.run(["/bin/sh", "-c", SHELL], capture_output=True, text=True, timeout=60)
    return [prog.returncode, prog.stdout, prog.stderr[-2000:]], [sh.returncode, sh.stdout, sh.stderr[-2000:]]


@pytest.mark.vm
def test_guest_boots_into_a_root_served_by_our_daemon(guest_kernel: KernelAssets, tmp_path: Path) -> None:
    init_code = f"PROGRAM = {PROGRAM!r}\nSHELL = {SHELL!r}\n" + GUEST_INIT
    init = make_switch_root_init(guest_kernel.module_names, "rootfs", [PYTHON, "-S", "-c", init_code])
    initrd = build_initramfs(tmp_path / "rootfs.cpio", init, guest_kernel.initramfs_files())
    env = {**os.environ, "PYTHONPATH": str(Path(virtiofs_async.__file__).resolve().parents[1])}
    with tempfile.TemporaryDirectory(prefix="vfs-rootfs-") as sockdir:
        sock = Path(sockdir) / "rootfs.sock"
        argv = [sys.executable, "-m", "virtiofs_async", "--socket-path", str(sock), "--shared-dir", "/",
                "--readonly"]
        with VirtioFsDaemon(argv, sock, log_path=tmp_path / "daemon.log", cwd=REPO, env=env) as daemon:
            vm = GuestVM(guest_kernel, initrd, [VirtioFsDevice(sock, "rootfs")], timeout=BOOT_TIMEOUT,
                         workdir=tmp_path / "vm")
            result = vm.run(watch=[daemon])
            daemon.wait(10)
            log = daemon.log()
    assert not os.path.exists("/virtiofs-async-rootfs-probe")
    assert "Traceback" not in log, log[-3000:]
    result.check()
    facts_lines = [l for l in result.transcript.splitlines() if l.startswith("FACTS ")]
    assert len(facts_lines) == 1, result.raw_transcript
    facts = json.loads(facts_lines[0][len("FACTS "):])
    # Pid 1 is the host's python3, and the guest's / is the read-only share.
    assert facts["pid"] == 1 and facts["executable"] == PYTHON, facts
    assert facts["root_fstype"] == "virtiofs", facts
    assert facts["root_options"].split(",")[0] == "ro", facts
    assert facts["write_to_root"] == "EROFS", facts
    # The same programs give the same output in the guest as on the host.
    host_program, host_shell = _host_outputs()
    assert host_program[0] == 0 and host_program[1], host_program
    assert facts["program"] == host_program, (facts["program"], host_program)
    assert facts["shell"] == host_shell, (facts["shell"], host_shell)
