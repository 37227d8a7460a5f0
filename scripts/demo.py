"""The main job, end to end: serve an in-memory filesystem with
examples/memfs.py, boot a Linux guest under QEMU (TCG) that mounts it over
virtio-fs, use it from the guest, and print what the guest saw.

Run through scripts/demo.sh (which installs what is needed first).
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from virtiofs_async.testing.vm import (
    GuestVM,
    VirtioFsDaemon,
    VirtioFsDevice,
    build_initramfs,
    ensure_guest_kernel,
    make_init_script,
)

REPO = Path(__file__).resolve().parents[1]

GUEST_COMMANDS = r"""
set -x
cd /mnt/memfs
mkdir -p projects/demo
echo "hello from the guest" > projects/demo/hello.txt
dd if=/dev/urandom of=projects/demo/random.bin bs=1M count=4 2>/dev/null
sha256sum projects/demo/random.bin
ln -s demo/hello.txt projects/link
ln projects/demo/hello.txt projects/hardlink
cat projects/link
ls -laR /mnt/memfs
stat -c '%n: %s bytes, %h links, mode %a' projects/demo/hello.txt
df -h /mnt/memfs
mount | grep virtiofs
"""


def main() -> int:
    kernel = ensure_guest_kernel()
    with tempfile.TemporaryDirectory(prefix="vfa-demo-") as tmp:
        tmpdir = Path(tmp)
        sock = tmpdir / "memfs.sock"
        init = make_init_script(kernel.module_names, [("memfs", "/mnt/memfs")], "sh /demo.sh", clock_sync=False)
        initrd = build_initramfs(
            tmpdir / "demo.cpio", init, {**kernel.initramfs_files(), "/demo.sh": GUEST_COMMANDS}
        )
        argv = [sys.executable, str(REPO / "examples" / "memfs.py"), "--socket-path", str(sock)]
        print(f"host: {' '.join(argv)}", flush=True)
        with VirtioFsDaemon(argv, sock, cwd=REPO, log_path=tmpdir / "memfs.log") as daemon:
            print(f"host: booting {kernel.version} under QEMU (TCG) with vhost-user-fs tag 'memfs'", flush=True)
            result = GuestVM(kernel.kernel, initrd, [VirtioFsDevice(sock, "memfs")], timeout=120).run(watch=[daemon])
            print("---- what the guest saw " + "-" * 40)
            print(result.transcript)
            print("-" * 64)
            print(f"guest exit status {result.exit_status}, {result.duration:.1f} s")
            status = daemon.wait(15)
            print(f"host: memfs exited with status {status} after the guest powered off")
            return 0 if result.exit_status == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
