"""The README's main-job command: scripts/demo.py shares a host directory
with a guest through our daemon; the guest uses it; the host sees the result."""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import virtiofs_async
from virtiofs_async.testing.vm import KernelAssets

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.vm
def test_demo_shares_a_directory(guest_kernel: KernelAssets, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    env = {**os.environ, "PYTHONPATH": str(Path(virtiofs_async.__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "scripts/demo.py", "--shared-dir", str(shared)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "guest exit status 0" in out and "the daemon exited with status 0" in out, out
    # What the guest wrote is in the host directory, as the guest saw it.
    assert (shared / "projects/demo/hello.txt").read_text() == "hello from the guest\n"
    assert os.readlink(shared / "projects/link") == "demo/hello.txt"
    assert os.stat(shared / "projects/hardlink").st_ino == os.stat(shared / "projects/demo/hello.txt").st_ino
    data = (shared / "projects/demo/random.bin").read_bytes()
    assert len(data) == 4 << 20
    digest = hashlib.sha256(data).hexdigest()
    guest_sums = re.findall(r"^([0-9a-f]{64})  projects/demo/random.bin$", out, re.M)
    assert guest_sums == [digest], out
    assert f"projects/demo/random.bin: {4 << 20} bytes, sha256 {digest}" in out
    assert "share on /mnt/share type virtiofs" in out
