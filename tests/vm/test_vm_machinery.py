"""The VM tier's own machinery: initramfs writer, kernel unpacking, init
script, serial channel, timeouts.  Tests without the ``vm`` mark run in
well under a second each and need only busybox, cpio and lz4."""
from __future__ import annotations

import gzip
import lzma
import os
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from virtiofs_async.testing import vm
from virtiofs_async.testing.vm import (
    GUEST_MODULES,
    GuestVM,
    GuestVMError,
    GuestVMTimeout,
    KernelAssets,
    VMResult,
    build_initramfs,
    extract_vmlinux,
    host_binary_files,
    make_init_script,
    make_switch_root_init,
)


def _cpio(archive: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["cpio", "--quiet", "-i", "--no-absolute-filenames", *args],
        stdin=open(archive, "rb"), capture_output=True, check=True,
    )


def _listing(archive: Path) -> dict[str, str]:
    """{name: `cpio -tv` line} as GNU cpio reads the archive."""
    out = _cpio(archive, "-t", "-v").stdout.decode()
    entries = {}
    for line in out.splitlines():
        name = line.split()[-1] if " -> " not in line else line.split(" -> ")[0].split()[-1]
        entries[name] = line
    return entries


def _member(archive: Path, name: str) -> bytes:
    return _cpio(archive, "--to-stdout", name).stdout


# --------------------------------------------------------------------------
# initramfs


def test_initramfs_layout_read_by_gnu_cpio(tmp_path: Path) -> None:
    script = tmp_path / "tool.sh"
    script.write_text("#!/bin/sh\necho tool\n")
    script.chmod(0o750)
    archive = build_initramfs(
        tmp_path / "i.cpio",
        "#!/bin/sh\necho init\n",
        {
            "/usr/bin/tool": script,
            "/etc/text": "some text\n",
            "/data/bytes.bin": b"\x00\x01\x02",
            "/data/deep/er/moded": (b"m", 0o600),
        },
    )
    entries = _listing(archive)
    assert entries["init"].startswith("-rwxr-xr-x")
    assert entries["bin/busybox"].startswith("-rwxr-xr-x")
    assert entries["bin/sh"].startswith("lrwxrwxrwx") and entries["bin/sh"].endswith("-> busybox")
    assert entries["dev/console"].startswith("crw-------")
    assert entries["dev/null"].startswith("crw-rw-rw-")
    assert entries["tmp"].startswith("drwxrwxrwt")
    assert entries["usr/bin/tool"].startswith("-rwxr-x---")
    assert entries["etc/text"].startswith("-rwxr-xr-x")
    assert entries["data/bytes.bin"].startswith("-rw-r--r--")
    assert entries["data/deep/er/moded"].startswith("-rw-------")
    for parent in ("data", "data/deep", "data/deep/er"):
        assert entries[parent].startswith("drwxr-xr-x"), parent
    # Parents come before children, as the kernel's unpacker needs.
    names = list(entries)
    assert names.index("data/deep") < names.index("data/deep/er/moded")
    assert _member(archive, "init") == b"#!/bin/sh\necho init\n"
    assert _member(archive, "usr/bin/tool") == script.read_bytes()
    assert _member(archive, "data/bytes.bin") == b"\x00\x01\x02"
    assert _member(archive, "bin/busybox") == Path("/bin/busybox").read_bytes()


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789_-.", min_size=1, max_size=13).filter(
    lambda s: s not in (".", "..")
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.dictionaries(st.lists(_name, min_size=1, max_size=3).map(tuple),
                             st.binary(max_size=300), max_size=5))
def test_initramfs_any_names_and_sizes_round_trip(tmp_path: Path, files: dict) -> None:
    """Odd name and data lengths exercise the 4-byte padding of newc."""
    extra = {"/x/" + "/".join(parts): data for parts, data in files.items()}
    # A path may not be both a file and a directory.
    assume(not any(b.startswith(a + "/") for a in extra for b in extra))
    archive = build_initramfs(tmp_path / "h.cpio", "#!/bin/sh\n", extra)
    entries = _listing(archive)
    for path, data in extra.items():
        assert path[1:] in entries
        assert _member(archive, path[1:]) == data
    assert archive.stat().st_size % 4 == 0


def test_initramfs_rejects_relative_and_dotdot_paths(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_initramfs(tmp_path / "a", "", {"etc/x": b""})
    with pytest.raises(ValueError):
        build_initramfs(tmp_path / "b", "", {"/etc/../x": b""})
    with pytest.raises(TypeError):
        build_initramfs(tmp_path / "c", "", {"/etc/x": 42})  # type: ignore[dict-item]


def test_initramfs_needs_an_elf_busybox(tmp_path: Path) -> None:
    fake = tmp_path / "busybox"
    fake.write_text("#!/bin/sh\n")
    with pytest.raises(GuestVMError, match="busybox"):
        build_initramfs(tmp_path / "a", "", {}, busybox=fake)


def test_host_binary_files_brings_the_loader_and_libc() -> None:
    files = host_binary_files("setfattr")
    assert any(p.endswith("/setfattr") for p in files)
    assert any("/libc.so" in p for p in files)
    assert any("ld-linux" in p for p in files)
    for guest, host in files.items():
        assert guest.startswith("/") and host.is_file()
    with pytest.raises(GuestVMError):
        host_binary_files("no-such-binary-here-xyz")


# --------------------------------------------------------------------------
# init script


def test_init_script_is_valid_sh_and_ordered() -> None:
    text = make_init_script(GUEST_MODULES, [("fs0", "/mnt/a"), ("b.2", "/mnt/b")], "echo 'hi'")
    subprocess.run(["busybox", "sh", "-n", "-c", text], check=True)
    insmods = [l.split()[1] for l in text.splitlines() if l.startswith("insmod ")]
    assert insmods == [f"/lib/modules/{m}.ko" for m in GUEST_MODULES]
    assert text.index("mount -t virtiofs fs0 /mnt/a") < text.index("sh -c 'echo '")
    assert "@@CLOCK?" in text
    assert text.rstrip().splitlines()[-2:] == ["poweroff -f", "sleep 10"]
    plain = make_init_script([], [], "true", clock_sync=False)
    assert "@@CLOCK" not in plain
    subprocess.run(["busybox", "sh", "-n", "-c", plain], check=True)


@pytest.mark.parametrize("tag", ["", "has space", "semi;colon", "x" * 37, "quote'"])
def test_init_script_rejects_bad_tags(tag: str) -> None:
    with pytest.raises(ValueError):
        make_init_script([], [(tag, "/mnt")], "true")


def test_init_script_rejects_relative_mountpoint() -> None:
    with pytest.raises(ValueError):
        make_init_script([], [("t", "mnt")], "true")


def test_switch_root_init_hands_over_to_the_share() -> None:
    text = make_switch_root_init(GUEST_MODULES, "rootfs", ["/usr/bin/python3", "-c", "print('it works')"])
    subprocess.run(["busybox", "sh", "-n", "-c", text], check=True)
    lines = text.rstrip().splitlines()
    insmods = [l.split()[1] for l in lines if l.startswith("insmod ")]
    assert insmods == [f"/lib/modules/{m}.ko" for m in GUEST_MODULES]
    assert "mount -t virtiofs -o ro rootfs /newroot || { echo '@@MOUNTFAIL rootfs' >&3; die mount rootfs; }" in lines
    assert lines.index("mount --move /dev /newroot/dev || die 'moving /dev'") > lines.index("mkdir -p /newroot")
    assert lines[-1] == "exec switch_root /newroot /usr/bin/python3 -c 'print('\"'\"'it works'\"'\"')'"
    with pytest.raises(ValueError):
        make_switch_root_init([], "rootfs", ["python3"])
    with pytest.raises(ValueError):
        make_switch_root_init([], "bad tag", ["/sbin/init"])


# --------------------------------------------------------------------------
# bzImage unpacking


def _fake_bzimage(payload: bytes, setup_sects: int = 3) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[0x1F1] = setup_sects
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, 0x20F)
    offset = 0x40
    struct.pack_into("<II", setup, 0x248, offset, len(payload))
    return bytes(setup) + b"\xaa" * offset + payload + b"\xbb" * 100


def _elf(note_name: bytes = b"Xen\0", note_type: int = 18) -> bytes:
    """A minimal ELF64 image whose only program header is one PT_NOTE
    (by default the PVH entry note QEMU looks for), plus filler."""
    desc = struct.pack("<I", 0x1000000)
    note = struct.pack("<III", len(note_name), len(desc), note_type)
    note += note_name + b"\0" * (-len(note_name) % 4) + desc
    header = bytearray(64)
    header[:6] = b"\x7fELF\x02\x01"  # ELFCLASS64, little-endian
    struct.pack_into("<Q", header, 0x20, 64)  # e_phoff
    struct.pack_into("<HH", header, 0x36, 56, 1)  # e_phentsize, e_phnum
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)  # PT_NOTE
    struct.pack_into("<Q", phdr, 8, 64 + 56)  # p_offset
    struct.pack_into("<Q", phdr, 32, len(note))  # p_filesz
    return bytes(header) + bytes(phdr) + note + bytes(range(256)) * 40


ELF = _elf()


@pytest.mark.parametrize("method", ["lz4", "xz", "gzip"])
def test_extract_vmlinux(tmp_path: Path, method: str) -> None:
    if method == "lz4":
        packed = subprocess.run(["lz4", "-l", "-c"], input=ELF, capture_output=True, check=True).stdout
    elif method == "xz":
        packed = lzma.compress(ELF, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    else:
        packed = gzip.compress(ELF)
    payload = packed + struct.pack("<I", len(ELF))  # the kernel's size trailer
    image = tmp_path / "bz"
    image.write_bytes(_fake_bzimage(payload))
    out = extract_vmlinux(image, tmp_path / "vmlinux")
    assert out.read_bytes() == ELF


def test_extract_vmlinux_rejects_garbage(tmp_path: Path) -> None:
    image = tmp_path / "bz"
    image.write_bytes(b"\x00" * 4096)
    with pytest.raises(GuestVMError, match="HdrS"):
        extract_vmlinux(image, tmp_path / "v")
    image.write_bytes(_fake_bzimage(b"\x01\x02\x03\x04" * 10))
    with pytest.raises(GuestVMError, match="compression"):
        extract_vmlinux(image, tmp_path / "v")
    not_elf = gzip.compress(b"not an elf file") + struct.pack("<I", 15)
    image.write_bytes(_fake_bzimage(not_elf))
    with pytest.raises(GuestVMError, match="ELF"):
        extract_vmlinux(image, tmp_path / "v")
    no_pvh = _elf(note_type=17)
    image.write_bytes(_fake_bzimage(gzip.compress(no_pvh) + struct.pack("<I", len(no_pvh))))
    with pytest.raises(GuestVMError, match="PVH"):
        extract_vmlinux(image, tmp_path / "v")
    wrong_size = gzip.compress(ELF) + struct.pack("<I", len(ELF) + 1)
    image.write_bytes(_fake_bzimage(wrong_size))
    with pytest.raises(GuestVMError, match="header says"):
        extract_vmlinux(image, tmp_path / "v")
    corrupt = b"\xfd7zXZ\x00" + b"\x00" * 64
    image.write_bytes(_fake_bzimage(corrupt))
    with pytest.raises(GuestVMError, match="corrupt"):
        extract_vmlinux(image, tmp_path / "v")
    truncated = _fake_bzimage(b"\x02\x21\x4c\x18" * 4)
    image.write_bytes(truncated[: len(truncated) - 130])
    with pytest.raises(GuestVMError, match="out of bounds"):
        extract_vmlinux(image, tmp_path / "v")
    assert list(tmp_path.iterdir()) == [image]  # no output, no temporary left


# --------------------------------------------------------------------------
# serial channel and results


def test_serial_collects_lines_and_answers_clock(tmp_path: Path) -> None:
    serial = vm._Serial(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
        c.connect(str(tmp_path / "s"))
        c.sendall(b"first\r\n@@CLO")
        c.sendall(b"CK?\n")
        before = time.time_ns()
        answer = c.makefile("rb").readline()
        c.sendall(b"@@EXIT 3\nno newline")
    lines = serial.close()
    assert abs(int(answer) - before) < 2_000_000_000
    assert [l.text for l in lines] == ["first", "@@CLOCK?", "@@EXIT 3", "no newline"]
    assert all(a.host_ns <= b.host_ns for a, b in zip(lines, lines[1:]))


def test_result_check_raises_with_transcript() -> None:
    lines = (vm.TranscriptLine(1, "FAIL something"), vm.TranscriptLine(2, "@@EXIT 1"))
    bad = VMResult(1, 0, lines, "console text", 1.0, None, None)
    with pytest.raises(GuestVMError) as info:
        bad.check()
    assert "FAIL something" in str(info.value) and "console text" in str(info.value)
    assert bad.transcript == "FAIL something"
    good = VMResult(0, 0, (vm.TranscriptLine(1, "OK x"), vm.TranscriptLine(2, "@@EXIT 0")),
                    "", 1.0, None, None)
    assert good.check() is good


def test_daemon_that_dies_is_reported(tmp_path: Path) -> None:
    daemon = vm.VirtioFsDaemon(["sh", "-c", "echo oops; exit 3"], tmp_path / "never.sock")
    with pytest.raises(GuestVMError, match="status 3") as info:
        daemon.start()
    assert "oops" in str(info.value)


def test_vm_without_qemu_binary_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(GuestVMError, match="not found"):
        GuestVM(tmp_path / "k", tmp_path / "i", qemu="no-such-qemu-xyz").run()


def test_duplicate_tags_rejected(tmp_path: Path) -> None:
    devs = [vm.VirtioFsDevice(tmp_path / "a", "t"), vm.VirtioFsDevice(tmp_path / "b", "t")]
    with pytest.raises(ValueError):
        GuestVM(tmp_path / "k", tmp_path / "i", devs)


# --------------------------------------------------------------------------
# with the real kernel


@pytest.mark.vm
def test_kernel_assets(guest_kernel: KernelAssets) -> None:
    assert guest_kernel.vmlinux is not None, "vmlinux extraction failed: booting slower bzImage"
    assert guest_kernel.kernel == guest_kernel.vmlinux
    assert vm._has_pvh_note(guest_kernel.vmlinux)  # QEMU boots it directly (PVH)
    assert tuple(guest_kernel.modules) == GUEST_MODULES
    for path in guest_kernel.modules.values():
        assert path.read_bytes()[:4] == b"\x7fELF", path  # uncompressed for busybox insmod
    # Cached: the second call reads the manifest and asks apt nothing.
    start = time.monotonic()
    again = vm.ensure_guest_kernel(guest_kernel.vmlinux.parent.parent)
    assert time.monotonic() - start < 0.5
    assert again == guest_kernel


@pytest.mark.vm
def test_hung_guest_is_killed_at_timeout(guest_kernel: KernelAssets, tmp_path: Path) -> None:
    init = make_init_script(guest_kernel.module_names, [], "echo started; sleep 600",
                            clock_sync=False)
    initrd = build_initramfs(tmp_path / "hang.cpio", init, guest_kernel.initramfs_files())
    start = time.monotonic()
    with pytest.raises(GuestVMTimeout) as info:
        GuestVM(guest_kernel, initrd, timeout=20, quiet=False).run()
    assert time.monotonic() - start < 35
    message = str(info.value)
    assert "started" in message  # the transcript so far
    assert "Linux version" in message or "Run /init" in message  # the console
    # QEMU is gone: no process still has our initrd on its command line.
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        assert str(initrd).encode() not in cmdline


@pytest.mark.vm
def test_guest_whose_daemon_dies_is_stopped_early(
    guest_kernel: KernelAssets, virtiofsd_spec, tmp_path: Path, short_tmp: Path
) -> None:
    """A daemon that dies mid-run ends the run after ``daemon_grace``, not
    at the (long) timeout, and the error names the daemon."""
    init = make_init_script(guest_kernel.module_names, [("fs0", "/mnt")],
                            "echo mounted; sleep 600", clock_sync=False)
    initrd = build_initramfs(tmp_path / "die.cpio", init, guest_kernel.initramfs_files())
    shared = tmp_path / "shared"
    shared.mkdir()
    sock = short_tmp / "d.sock"
    daemon = vm.VirtioFsDaemon(virtiofsd_spec.argv(sock, shared), sock,
                               log_path=tmp_path / "daemon.log")

    def kill_when_connected() -> None:
        deadline = time.monotonic() + 60
        while "Received vhost-user socket connection" not in daemon.log():
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(1.0)
        assert daemon.process is not None
        daemon.process.kill()

    with daemon:
        killer = threading.Thread(target=kill_when_connected, daemon=True)
        killer.start()
        start = time.monotonic()
        with pytest.raises(GuestVMError) as info:
            GuestVM(guest_kernel, initrd, [vm.VirtioFsDevice(sock, "fs0")], timeout=120,
                    daemon_grace=3).run(watch=[daemon])
        killer.join()
    assert not isinstance(info.value, GuestVMTimeout)
    assert time.monotonic() - start < 60
    assert "daemon exited with status -9" in str(info.value)
