"""The main job, end to end: share a host directory with a Linux guest
through our passthrough daemon (``python -m virtiofs_async``, the virtiofsd
drop-in), boot the guest under QEMU (TCG), let it mount the share over
virtio-fs and use it, then print what the guest saw and what it left in the
host directory.

    python scripts/demo.py                       # shares a fresh temporary directory
    python scripts/demo.py --shared-dir /srv/x   # shares (and writes into) /srv/x
    python scripts/demo.py --memfs               # the in-memory example backend instead

Run through scripts/demo.sh (which installs what is needed first).
"""
from __future__ import annotations

import argparse
import hashlib
import os
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
cd /mnt/share
mkdir -p projects/demo
echo "hello from the guest" > projects/demo/hello.txt
dd if=/dev/urandom of=projects/demo/random.bin bs=1M count=4 2>/dev/null
sha256sum projects/demo/random.bin
ln -s demo/hello.txt projects/link
ln projects/demo/hello.txt projects/hardlink
cat projects/link
ls -laR /mnt/share
stat -c '%n: %s bytes, %h links, mode %a' projects/demo/hello.txt
df -h /mnt/share
mount | grep virtiofs
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--shared-dir", type=Path, help="host directory to share (default: a fresh temporary one)")
    what.add_argument("--memfs", action="store_true", help="serve examples/memfs.py instead of a host directory")
    args = parser.parse_args(argv)
    kernel = ensure_guest_kernel()
    with tempfile.TemporaryDirectory(prefix="vfa-demo-") as tmp:
        tmpdir = Path(tmp)
        sock = tmpdir / "share.sock"
        init = make_init_script(kernel.module_names, [("share", "/mnt/share")], "sh /demo.sh", clock_sync=False)
        initrd = build_initramfs(
            tmpdir / "demo.cpio", init, {**kernel.initramfs_files(), "/demo.sh": GUEST_COMMANDS}
        )
        shared = None
        if args.memfs:
            cmd = [sys.executable, str(REPO / "examples" / "memfs.py"), "--socket-path", str(sock)]
        else:
            shared = (args.shared_dir or tmpdir / "shared").resolve()
            shared.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "virtiofs_async", "--socket-path", str(sock), "--shared-dir", str(shared)]
        print(f"host: {' '.join(cmd)}", flush=True)
        with VirtioFsDaemon(cmd, sock, cwd=REPO, log_path=tmpdir / "daemon.log") as daemon:
            print(f"host: booting {kernel.version} under QEMU (TCG) with vhost-user-fs tag 'share'", flush=True)
            result = GuestVM(kernel.kernel, initrd, [VirtioFsDevice(sock, "share")], timeout=120).run(watch=[daemon])
            print("---- what the guest saw " + "-" * 40)
            print(result.transcript)
            print("-" * 64)
            print(f"guest exit status {result.exit_status}, {result.duration:.1f} s")
            status = daemon.wait(15)
            print(f"host: the daemon exited with status {status} after the guest powered off")
        if shared is not None:
            print(f"---- what the guest left in {shared} (host view) " + "-" * 10)
            for dirpath, dirnames, filenames in sorted(os.walk(shared)):
                for name in sorted(dirnames + filenames):
                    p = Path(dirpath, name)
                    st = p.lstat()
                    if p.is_symlink():
                        kind = "link -> " + os.readlink(p)
                    elif p.is_dir():
                        kind = "dir"
                    else:
                        kind = f"{st.st_size} bytes, sha256 {hashlib.sha256(p.read_bytes()).hexdigest()}"
                    print(f"{p.relative_to(shared)}: {kind}, uid {st.st_uid}, mode {st.st_mode & 0o7777:o}")
        return 0 if result.exit_status == 0 and status == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
