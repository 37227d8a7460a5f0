"""Boot a throwaway Linux guest under QEMU that mounts virtio-fs shares.

The machinery of the VM test tier, usable by anyone testing a virtio-fs
daemon against a real guest kernel driver::

    kernel = ensure_guest_kernel()                     # Debian cloud kernel, cached
    init = make_init_script(kernel.module_names, [("myfs", "/mnt")],
                            "sh /workload.sh /mnt")
    initrd = build_initramfs(tmp / "initrd.cpio", init,
                             {**kernel.initramfs_files(), "/workload.sh": script_text})
    with VirtioFsDaemon([...daemon argv...], socket_path):
        result = GuestVM(kernel, initrd, [VirtioFsDevice(socket_path, "myfs")]).run()
    result.check()                 # GuestVMError unless the workload exited 0
    print(result.transcript)       # what the workload printed (ttyS1)

Design
------
* The guest runs under TCG (``-accel tcg,thread=multi -cpu max``): the KVM
  found on some CI machines cannot run a stock kernel.
* The kernel is Debian's current ``linux-image-*-cloud-amd64``, fetched with
  ``apt-get download`` and unpacked once into a cache.  The LZ4 payload of its
  bzImage is unpacked to an ELF ``vmlinux`` that QEMU boots through the PVH
  entry point, which skips the decompressor: measured here, ~1 s less from
  QEMU start to the kernel's first instant than the bzImage under TCG.
* The initramfs is a ``newc`` cpio written here in pure Python: busybox-static,
  the virtio/fuse modules, ``/init`` and whatever the caller adds.
* Two serial ports: ttyS0 is the kernel console (written to a file), ttyS1 is
  a clean line-oriented channel for the workload (a socket read by a host
  thread that stamps every line with the host clock).  The init script also
  uses ttyS1 to set the guest clock from the host's (the emulated RTC has
  whole-second resolution).
* Nothing here may hang a caller: QEMU is killed when the timeout expires and
  :class:`GuestVMTimeout` carries the console log.

Guest-side conventions on ttyS1 (lines starting with ``@@`` are the
protocol's; everything else is the workload's transcript):

``@@CLOCK?``          guest asks for the host time; the host answers one line,
                      its ``CLOCK_REALTIME`` in nanoseconds.
``@@CLOCKSKEW <ns>``  the guest's estimate of (guest - host) after setting.
``@@CLOCKNOW <ns>``   the guest's realtime when it wrote the line.
``@@CLOCKINFO ...``   / ``@@CLOCKFAIL <why>``: diagnostics of the clock setting.
``@@MOUNTFAIL <tag>`` mounting a share failed (``@@INITFAIL <why>`` for other
                      setup failures; the status is then 125).
``@@EXIT <status>``   the workload command's exit status; the init then
                      powers the guest off.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path
from typing import IO, Mapping, Sequence, Union

import attrs

from ..errors import VirtioFsError

__all__ = [
    "GUEST_MODULES",
    "GuestVM",
    "GuestVMError",
    "GuestVMTimeout",
    "KernelAssets",
    "TranscriptLine",
    "VMResult",
    "VirtioFsDaemon",
    "VirtioFsDevice",
    "build_initramfs",
    "default_cache_dir",
    "ensure_guest_kernel",
    "extract_vmlinux",
    "host_binary_files",
    "make_init_script",
    "make_switch_root_init",
    "wait_for_unix_socket",
]

#: Modules the guest needs for virtio-fs, in insmod order (dependencies first).
GUEST_MODULES: tuple[str, ...] = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "fuse",
    "virtiofs",
)

_KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
_MANIFEST = "assets.json"
_MANIFEST_VERSION = 1


class GuestVMError(VirtioFsError):
    """The guest could not be prepared, booted, or its workload failed.

    ``console`` is the kernel console log and ``transcript`` the ttyS1 output
    seen so far (either may be empty); both are appended to ``str(err)``.
    """

    def __init__(self, message: str, console: str = "", transcript: str = "") -> None:
        self.console = console
        self.transcript = transcript
        parts = [message]
        if transcript:
            parts.append("--- guest transcript (ttyS1) ---\n" + _tail(transcript, 200))
        if console:
            parts.append("--- guest console (ttyS0, tail) ---\n" + _tail(console, 80))
        super().__init__("\n".join(parts))


class GuestVMTimeout(GuestVMError):
    """The guest did not power off in time; QEMU was killed."""


def _tail(text: str, lines: int) -> str:
    split = text.splitlines()
    if len(split) <= lines:
        return text
    return f"[... {len(split) - lines} lines cut ...]\n" + "\n".join(split[-lines:])


# --------------------------------------------------------------------------
# Kernel assets
# --------------------------------------------------------------------------


@attrs.define(frozen=True)
class KernelAssets:
    """A guest kernel unpacked on the host.

    ``vmlinux`` is the uncompressed ELF image (PVH boot), None when it could
    not be extracted; ``bzimage`` the packaged image; ``modules`` maps each
    name of :data:`GUEST_MODULES` to an uncompressed ``.ko`` file.
    """

    version: str
    package: str
    bzimage: Path
    vmlinux: Path | None
    modules: Mapping[str, Path] = attrs.field(hash=False)

    @property
    def kernel(self) -> Path:
        """The image to boot: ``vmlinux`` when available (faster), else the bzImage."""
        return self.vmlinux if self.vmlinux is not None else self.bzimage

    @property
    def module_names(self) -> tuple[str, ...]:
        """Module names in insmod order."""
        return tuple(self.modules)

    def initramfs_files(self, directory: str = "/lib/modules") -> dict[str, Path]:
        """``{guest path: host file}`` for the modules, as ``directory/NAME.ko``.

        This is the layout :func:`make_init_script` expects.
        """
        return {f"{directory}/{name}.ko": path for name, path in self.modules.items()}


def default_cache_dir() -> Path:
    """``$VIRTIOFS_ASYNC_VM_CACHE`` or ``~/.cache/virtiofs-async/vm``."""
    env = os.environ.get("VIRTIOFS_ASYNC_VM_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "virtiofs-async" / "vm"


def _run(argv: Sequence[str], cwd: Path | None = None, timeout: float = 600) -> str:
    try:
        proc = subprocess.run(
            list(argv), cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError as exc:
        raise GuestVMError(f"{argv[0]} not found; run scripts/setup-system.sh") from exc
    except subprocess.TimeoutExpired as exc:
        raise GuestVMError(f"{shlex.join(argv)} timed out after {timeout} s") from exc
    if proc.returncode != 0:
        raise GuestVMError(
            f"{shlex.join(argv)} failed with status {proc.returncode}:\n{proc.stderr.strip()}"
        )
    return proc.stdout


def _resolve_kernel_package() -> str:
    """The versioned image package the cloud metapackage currently depends on."""
    out = _run(["apt-cache", "depends", _KERNEL_METAPACKAGE])
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+-cloud-amd64)\s*$", line)
        if m:
            return m.group(1)
    raise GuestVMError(
        f"apt-cache depends {_KERNEL_METAPACKAGE} names no linux-image-*-cloud-amd64:\n{out}"
    )


def _load_manifest(path: Path) -> KernelAssets | None:
    try:
        data = json.loads(path.read_text())
        if data.get("manifest") != _MANIFEST_VERSION:
            return None
        assets = KernelAssets(
            version=data["version"],
            package=data["package"],
            bzimage=Path(data["bzimage"]),
            vmlinux=Path(data["vmlinux"]) if data["vmlinux"] else None,
            modules={name: Path(p) for name, p in data["modules"]},
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    files = [assets.bzimage, *assets.modules.values()]
    if assets.vmlinux is not None:
        files.append(assets.vmlinux)
    if tuple(assets.modules) != GUEST_MODULES or not all(f.is_file() for f in files):
        return None
    return assets


def _store_manifest(path: Path, assets: KernelAssets) -> None:
    data = {
        "manifest": _MANIFEST_VERSION,
        "version": assets.version,
        "package": assets.package,
        "bzimage": str(assets.bzimage),
        "vmlinux": str(assets.vmlinux) if assets.vmlinux else None,
        "modules": [[name, str(p)] for name, p in assets.modules.items()],
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def extract_vmlinux(bzimage: Path, out: Path) -> Path:
    """Unpack the ELF kernel inside an x86 bzImage to ``out``.

    Reads the boot protocol header (``payload_offset``/``payload_length``,
    boot protocol >= 2.08) and decompresses the payload with the matching
    tool (lz4, xz, gzip, zstd).  Raises :class:`GuestVMError` when the image
    is not a bzImage, the payload's format is unsupported or corrupt, or the
    result has no PVH entry note (QEMU could not boot it).
    """
    data = bzimage.read_bytes()
    if len(data) < 0x250 or data[0x202:0x206] != b"HdrS":
        raise GuestVMError(f"{bzimage}: not a bzImage (no HdrS header)")
    (proto,) = struct.unpack_from("<H", data, 0x206)
    if proto < 0x208:
        raise GuestVMError(f"{bzimage}: boot protocol {proto:#x} has no payload fields")
    setup_sects = data[0x1F1] or 4
    offset, length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = data[start : start + length]
    if len(payload) != length or length < 8:
        raise GuestVMError(f"{bzimage}: payload out of bounds")
    # Every kernel payload ends with the uncompressed size (32-bit LE).
    (size,) = struct.unpack_from("<I", payload, len(payload) - 4)
    tmp = out.with_name(out.name + ".tmp")
    try:
        _unpack_payload(bzimage, payload, tmp)
        with open(tmp, "rb") as f:
            if f.read(4) != b"\x7fELF":
                raise GuestVMError(f"{bzimage}: payload is not an ELF image")
        if tmp.stat().st_size != size:
            raise GuestVMError(
                f"{bzimage}: payload unpacked to {tmp.stat().st_size} bytes, header says {size}"
            )
        if not _has_pvh_note(tmp):
            raise GuestVMError(f"{bzimage}: the kernel has no PVH entry point (CONFIG_PVH)")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _unpack_payload(bzimage: Path, payload: bytes, dst: Path) -> None:
    def tool(argv: list[str], data: bytes) -> None:
        with open(dst, "wb") as f:
            try:
                proc = subprocess.run(argv, input=data, stdout=f, stderr=subprocess.PIPE, check=False)
            except FileNotFoundError:
                raise GuestVMError(f"{argv[0]} not found; run scripts/setup-system.sh") from None
        if proc.returncode != 0:
            raise GuestVMError(
                f"{argv[0]} failed on {bzimage}: {proc.stderr.decode(errors='replace').strip()}"
            )

    try:
        if payload[:4] == b"\x02\x21\x4c\x18":  # LZ4 legacy frame, as the kernel writes it
            # lz4 would read the size trailer as one more block header and fail.
            tool(["lz4", "-d", "-c"], payload[:-4])
        elif payload[:6] == b"\xfd7zXZ\x00":
            # A decompressor object stops at the end of the stream and leaves
            # the size trailer in unused_data.
            dst.write_bytes(lzma.LZMADecompressor().decompress(payload))
        elif payload[:2] == b"\x1f\x8b":
            dst.write_bytes(zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload))
        elif payload[:4] == b"\x28\xb5\x2f\xfd":
            tool(["zstd", "-d", "-c"], payload[:-4])
        else:
            raise GuestVMError(f"{bzimage}: unknown payload compression {payload[:6].hex()}")
    except (lzma.LZMAError, zlib.error) as exc:
        raise GuestVMError(f"{bzimage}: corrupt payload: {exc}") from None


def _has_pvh_note(elf: Path) -> bool:
    """True if the ELF64 image has the Xen PVH entry note (QEMU's -kernel
    boots such an image directly)."""
    XEN_ELFNOTE_PHYS32_ENTRY = 18
    with open(elf, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[4] != 2 or header[5] != 1:  # ELFCLASS64, little-endian
            return False
        phoff, = struct.unpack_from("<Q", header, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", header, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
        for i in range(phnum):
            p_type, = struct.unpack_from("<I", table, i * phentsize)
            if p_type != 4:  # PT_NOTE
                continue
            offset, = struct.unpack_from("<Q", table, i * phentsize + 8)
            filesz, = struct.unpack_from("<Q", table, i * phentsize + 32)
            f.seek(offset)
            notes = f.read(filesz)
            pos = 0
            while pos + 12 <= len(notes):
                namesz, descsz, ntype = struct.unpack_from("<III", notes, pos)
                name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
                if name == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                    return True
                pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def _decompress_module(src: Path, dst: Path) -> Path:
    """Write an uncompressed copy of a ``.ko[.xz|.gz|.zst]`` (busybox insmod
    cannot load compressed modules)."""
    name = src.name
    if name.endswith(".ko"):
        shutil.copyfile(src, dst)
    elif name.endswith(".ko.xz"):
        dst.write_bytes(lzma.decompress(src.read_bytes()))
    elif name.endswith(".ko.gz"):
        dst.write_bytes(gzip.decompress(src.read_bytes()))
    elif name.endswith(".ko.zst"):
        with open(dst, "wb") as f:
            if subprocess.run(["zstd", "-d", "-c", str(src)], stdout=f, check=False).returncode:
                raise GuestVMError(f"zstd could not unpack {src}")
    else:
        raise GuestVMError(f"{src}: unknown module format")
    return dst


def ensure_guest_kernel(cache_dir: Path | str | None = None, *, refresh: bool = False) -> KernelAssets:
    """Return the guest kernel, downloading and unpacking it on first use.

    The package is the one ``linux-image-cloud-amd64`` depends on (asked of
    ``apt-cache``); it is fetched with ``apt-get download`` into
    ``cache_dir`` (default :func:`default_cache_dir`), unpacked with
    ``dpkg-deb -x``, the vmlinux and the :data:`GUEST_MODULES` extracted
    (uncompressed) and a manifest written.  Later calls read the manifest and
    touch neither apt nor the network; ``refresh=True`` asks apt again and
    fetches a newer kernel if there is one.  Safe against concurrent callers
    (a lock file serialises the first download).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    manifest = cache / _MANIFEST
    if not refresh:
        found = _load_manifest(manifest)
        if found is not None:
            return found
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not refresh:
            found = _load_manifest(manifest)
            if found is not None:
                return found
        package = _resolve_kernel_package()
        version = package[len("linux-image-") :]
        existing = _load_manifest(manifest)
        if existing is not None and existing.package == package:
            return existing
        assets = _fetch_kernel(cache, package, version)
        _store_manifest(manifest, assets)
        return assets


def _fetch_kernel(cache: Path, package: str, version: str) -> KernelAssets:
    root = cache / version
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmpdir:
        tmp = Path(tmpdir)
        # APT::Sandbox::User=root: the _apt user cannot write into a private
        # directory; without it apt warns and downloads as root anyway.
        argv = ["apt-get", "download", "-q"]
        if os.geteuid() == 0:
            argv += ["-o", "APT::Sandbox::User=root"]
        _run([*argv, package], cwd=tmp)
        debs = sorted(tmp.glob(f"{package}_*.deb"))
        if not debs:
            raise GuestVMError(f"apt-get download {package} produced no .deb in {tmp}")
        tree = tmp / "tree"
        _run(["dpkg-deb", "-x", str(debs[-1]), str(tree)])
        images = sorted((tree / "boot").glob("vmlinuz-*"))
        if not images:
            raise GuestVMError(f"{debs[-1].name} has no /boot/vmlinuz-*")
        bzimage = root / "vmlinuz"
        shutil.copyfile(images[0], bzimage)
        moddirs = sorted((tree / "lib" / "modules").glob("*"))
        if not moddirs:
            moddirs = sorted((tree / "usr" / "lib" / "modules").glob("*"))
        if not moddirs:
            raise GuestVMError(f"{debs[-1].name} has no lib/modules")
        found: dict[str, Path] = {}
        for path in moddirs[0].rglob("*.ko*"):
            stem = path.name.split(".ko", 1)[0]
            if stem in GUEST_MODULES and stem not in found:
                found[stem] = path
        missing = [m for m in GUEST_MODULES if m not in found]
        if missing:
            raise GuestVMError(
                f"{package} lacks modules {missing} (built in? this kernel is not supported)"
            )
        (root / "modules").mkdir()
        modules = {
            m: _decompress_module(found[m], root / "modules" / f"{m}.ko") for m in GUEST_MODULES
        }
    try:
        vmlinux: Path | None = extract_vmlinux(bzimage, root / "vmlinux")
    except GuestVMError as exc:
        # The bzImage still boots, only slower: say so rather than fail.
        warnings.warn(f"booting the bzImage (slower under TCG): {exc}", RuntimeWarning, stacklevel=3)
        vmlinux = None
    return KernelAssets(
        version=version, package=package, bzimage=bzimage, vmlinux=vmlinux, modules=modules
    )


# --------------------------------------------------------------------------
# Initramfs
# --------------------------------------------------------------------------

#: A file for the initramfs: host file (``os.PathLike``, mode kept), text
#: (``str``, mode 0755 — scripts), bytes (mode 0644) or ``(bytes, mode)``.
InitramfsContent = Union[os.PathLike, str, bytes, "tuple[bytes, int]"]


class _CpioWriter:
    """Minimal ``newc`` (SVR4 without CRC) archive writer."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        self._ino = 1
        self._seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)) -> None:
        name = name.strip("/")
        if name in self._seen:
            return
        self._seen.add(name)
        encoded = name.encode() + b"\0"
        nlink = 2 if (mode & 0o170000) == 0o040000 else 1
        fields = (
            self._ino, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0,
        )
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._f.write(header + encoded)
        self._f.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self._f.write(data)
        self._f.write(b"\0" * (-len(data) % 4))

    def parents(self, name: str) -> None:
        parts = name.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            self.directory("/".join(parts[:i]))

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, 0o040000 | mode)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.parents(name)
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.parents(name)
        self._entry(name, 0o120777, target.encode())

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.parents(name)
        self._entry(name, 0o020000 | mode, rdev=(major, minor))

    def trailer(self) -> None:
        self._entry("TRAILER!!!", 0)


def build_initramfs(
    path: Path | str,
    init_script: str,
    extra_files: Mapping[str, InitramfsContent],
    *,
    busybox: Path | str = "/bin/busybox",
) -> Path:
    """Write an uncompressed newc cpio initramfs to ``path`` and return it.

    Contents: ``/bin/busybox`` (a static build; ``/init`` should run
    ``/bin/busybox --install -s`` first), ``/bin/sh`` linked to it, the usual
    empty directories, ``/dev/console`` and ``/dev/null`` nodes (the kernel
    opens the console before ``/init`` runs), ``/init`` = ``init_script``
    (mode 0755), and ``extra_files`` (``{absolute guest path: content}``, see
    :data:`InitramfsContent`; parent directories are created).
    Uncompressed because unpacking is faster than decompressing under TCG.
    """
    path = Path(path)
    bb = Path(busybox)
    head = bb.read_bytes()[:64] if bb.is_file() else b""
    if not head.startswith(b"\x7fELF"):
        raise GuestVMError(f"{bb}: not an ELF busybox; install busybox-static")
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        w = _CpioWriter(f)
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                  "mnt", "run", "etc", "root", "lib"):
            w.directory(d, 0o1777 if d == "tmp" else 0o755)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.file("bin/busybox", bb.read_bytes(), 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", init_script.encode(), 0o755)
        for guest_path, content in extra_files.items():
            if not guest_path.startswith("/") or ".." in guest_path.split("/"):
                raise ValueError(f"guest path must be absolute and normalised: {guest_path!r}")
            if isinstance(content, os.PathLike):
                host = Path(content)
                w.file(guest_path, host.read_bytes(), host.stat().st_mode & 0o7777)
            elif isinstance(content, str):
                w.file(guest_path, content.encode(), 0o755)
            elif isinstance(content, bytes):
                w.file(guest_path, content, 0o644)
            elif isinstance(content, tuple) and len(content) == 2:
                w.file(guest_path, bytes(content[0]), int(content[1]))
            else:
                raise TypeError(f"unsupported initramfs content for {guest_path!r}: {type(content)}")
        w.trailer()
    os.replace(tmp, path)
    return path


def host_binary_files(*binaries: str | Path) -> dict[str, Path]:
    """``{guest path: host file}`` for dynamically linked host binaries and
    every shared library (and the loader) ``ldd`` says they need.

    Each file keeps its host path inside the guest, which is where the
    loader looks for it.  Binaries may be names found on ``PATH``.
    """
    out: dict[str, Path] = {}
    for binary in binaries:
        found = shutil.which(str(binary))
        if found is None:
            raise GuestVMError(f"{binary}: not found on the host (install it)")
        real = Path(found)
        out[str(real)] = real.resolve()
        text = _run(["ldd", str(real)])
        for line in text.splitlines():
            line = line.strip()
            m = re.match(r"\S+\s+=>\s+(/\S+)\s+\(0x[0-9a-f]+\)$", line) or re.match(
                r"(/\S+)\s+\(0x[0-9a-f]+\)$", line
            )
            if m:
                lib = m.group(1)
                out[lib] = Path(lib).resolve()
            elif "not found" in line:
                raise GuestVMError(f"{binary}: {line}")
    return out


def _init_preamble(maker: str, modules: Sequence[str], module_dir: str, mounts: Sequence[str]) -> list[str]:
    """The first lines of a generated busybox /init: the busybox applets,
    ``mount -t FSTYPE`` of each ``"fstype mountpoint"`` of ``mounts``,
    ttyS1 raw on fd 3, a ``die`` that reports ``@@EXIT 125`` and powers
    off, then the insmods of ``modules``."""
    q = shlex.quote
    lines = [
        "#!/bin/sh",
        f"# generated by virtiofs_async.testing.vm.{maker}",
        "/bin/busybox --install -s",
        "export PATH=/usr/bin:/bin:/usr/sbin:/sbin HOME=/root",
        *(f"mount -t {m.split()[0]} {m}" for m in mounts),
        "stty -F /dev/ttyS1 115200 raw -echo",
        "exec 3<>/dev/ttyS1",
        "die() {",
        "  echo \"@@INITFAIL $*\" >&3; echo \"init: $*\" >/dev/console",
        "  echo '@@EXIT 125' >&3; sync; poweroff -f; sleep 10; exit 1",
        "}",
    ]
    for name in modules:
        lines.append(f"insmod {q(module_dir + '/' + name + '.ko')} || die insmod {q(name)}")
    return lines


def make_init_script(
    modules: Sequence[str],
    mounts: Sequence[tuple[str, str]],
    command: str,
    *,
    module_dir: str = "/lib/modules",
    clock_sync: bool = True,
    mount_options: str = "",
) -> str:
    """The text of a busybox ``/init`` that runs ``command`` on virtio-fs shares.

    It mounts proc, sysfs, devtmpfs and a tmpfs on /tmp; insmods
    ``module_dir/NAME.ko`` for each of ``modules`` in order; puts ttyS1 in
    raw mode on fd 3; sets the guest clock from the host's over ttyS1
    (``clock_sync``, ~1-3 s of waiting for whole seconds); mounts every
    ``(tag, mountpoint)`` with ``mount -t virtiofs`` (``mount_options`` for
    ``-o``); runs ``command`` with ``sh -c`` with stdout and stderr on ttyS1
    (cwd ``/``, ``$VM_MOUNTS`` holding the mountpoints); unmounts the shares
    the command left mounted; reports ``@@EXIT <status>`` and powers off.
    Any setup failure is reported as a nonzero ``@@EXIT`` (with the reason on
    ttyS1 and the console), and the guest still powers off.
    """
    for tag, mountpoint in mounts:
        _check_tag(tag)
        if not mountpoint.startswith("/"):
            raise ValueError(f"mountpoint must be absolute: {mountpoint!r}")
    q = shlex.quote
    lines = _init_preamble("make_init_script", modules, module_dir,
                           ("proc /proc", "sysfs /sys", "devtmpfs /dev", "tmpfs /tmp"))
    if clock_sync:
        lines += _CLOCK_SYNC_SH.splitlines()
    mountpoints = []
    for tag, mountpoint in mounts:
        opts = f" -o {q(mount_options)}" if mount_options else ""
        lines.append(f"mkdir -p {q(mountpoint)}")
        lines.append(
            f"mount -t virtiofs{opts} {q(tag)} {q(mountpoint)} "
            f"|| {{ echo '@@MOUNTFAIL {tag}' >&3; die mount {q(tag)}; }}"
        )
        mountpoints.append(mountpoint)
    lines += [
        f"export VM_MOUNTS={q(' '.join(mountpoints))}",
        "cd /",
        f"sh -c {q(command)} >&3 2>&3 </dev/null",
        "rc=$?",
        "cd /",
        # Unmount what the command left mounted, so daemons see a clean
        # unmount (FUSE_DESTROY) rather than a vanished guest.
        "for m in $VM_MOUNTS; do",
        "  grep -q \" $m virtiofs \" /proc/mounts && umount \"$m\"",
        "done",
        "echo \"@@EXIT $rc\" >&3",
        "sync",
        "poweroff -f",
        "sleep 10",
    ]
    return "\n".join(lines) + "\n"


def make_switch_root_init(
    modules: Sequence[str],
    tag: str,
    init_argv: Sequence[str],
    *,
    module_dir: str = "/lib/modules",
    mount_options: str = "ro",
) -> str:
    """The text of a busybox ``/init`` that makes virtio-fs share ``tag``
    the guest's root filesystem and hands over to a program on it.

    It insmods ``modules``, mounts ``tag`` on /newroot (``-o
    mount_options``), moves its devtmpfs there (so ``/dev/ttyS1``, raw, is
    the program's results channel) and ``switch_root``s: ``init_argv``, a
    path on the share plus arguments, becomes pid 1 of a guest whose ``/``
    is the share. That program must write ``@@EXIT <status>`` to ttyS1 and
    power the guest off itself (pid 1 must not exit). A failure before the
    hand-over is reported as ``@@EXIT 125`` and the guest powers off.
    """
    _check_tag(tag)
    if not init_argv or not init_argv[0].startswith("/"):
        raise ValueError(f"init_argv must start with an absolute path: {init_argv!r}")
    q = shlex.quote
    lines = _init_preamble("make_switch_root_init", modules, module_dir, ("proc /proc", "devtmpfs /dev"))
    opts = f" -o {q(mount_options)}" if mount_options else ""
    lines += [
        "mkdir -p /newroot",
        f"mount -t virtiofs{opts} {q(tag)} /newroot || {{ echo '@@MOUNTFAIL {tag}' >&3; die mount {q(tag)}; }}",
        "[ -d /newroot/dev ] || die 'no /dev on the share'",
        "mount --move /dev /newroot/dev || die 'moving /dev'",
        "exec 3>&-",
        "umount /proc",
        "exec switch_root /newroot " + " ".join(q(a) for a in init_argv),
    ]
    return "\n".join(lines) + "\n"


# Guest side of the clock handshake (busybox ash, 64-bit arithmetic).
#
# `date -s @N` only sets whole seconds, so the guest must call it exactly at
# a whole second of host time.  Guest-side clocks come from /proc/timer_list,
# readable with the shell's own `read` (no fork): "now at N nsecs" is
# CLOCK_MONOTONIC and the ".offset" of the ktime_get_real base is
# CLOCK_REALTIME - CLOCK_MONOTONIC, both in ns.
#  1. Handshake: read the monotonic clock, ask the host ("@@CLOCK?"), read
#     its answer, read the monotonic clock again; the host's answer belongs
#     to the middle of that window (less the cost of one clock read).  Of
#     three exchanges the narrowest window wins.  That gives D, the wanted
#     realtime-monotonic offset.
#  2. Calibrate K, the delay from the end of a sleep to date's settimeofday
#     (a fork+exec, a few ms under TCG).  Sleeps are `read -t` timeouts on
#     a fifo: no fork, so nothing else to calibrate.
#  3. Sleep until K before the next whole host second, `date -s` it, read
#     back the offset O; E = O - D is the error (ns, >0 = guest ahead).
#     Correct K by E and repeat while |E| > 2 ms, at most 3 times.
#  4. Cross-check O against busybox adjtimex (realtime, microseconds) and
#     report "@@CLOCKSKEW E" and "@@CLOCKNOW <guest realtime ns>" (the host
#     compares the latter with the line's arrival time).
_CLOCK_SYNC_SH = r"""
_mono() {
  while read -r _k1 _k2 _k3 _k4; do
    if [ "$_k1 $_k2" = "now at" ]; then M=$_k3; return 0; fi
  done < /proc/timer_list
  return 1
}
_offs() {
  O=; _ok=1
  while read -r _k1 _k2 _k3; do
    if [ "$_k1 $_k2" = ".get_time: ktime_get_real" ]; then
      read -r _k1 _k2 _k3
      if [ -z "$O" ]; then O=$_k2; elif [ "$O" != "$_k2" ]; then _ok=0; fi
    fi
  done < /proc/timer_list
  [ -n "$O" ] && [ "$_ok" = 1 ]
}
_sleep_ns() {
  # sleep without a fork: a read that times out on a fifo nobody writes to
  _us=$(( $1 / 1000 % 1000000 + 1000000 ))
  read -t "$(( $1 / 1000000000 )).${_us#1}" _k1 <&4
  return 0
}
_handshake() {
  # three exchanges; keep the one with the narrowest window
  _best=; _j=0
  while [ $_j -lt 3 ]; do
    _j=$(( _j + 1 ))
    _mono || return 1; _m1=$M
    echo '@@CLOCK?' >&3
    read -t 5 -r H <&3 || return 1
    _mono; _m2=$M
    case "$H" in ''|*[!0-9]*) return 1;; esac
    if [ -z "$_best" ] || [ $(( _m2 - _m1 )) -lt "$_best" ]; then
      _best=$(( _m2 - _m1 )); D=$(( H - (_m1 + _m2 - _mcost) / 2 ))
    fi
  done
}
_set_at_boundary() {
  _mono; _h=$(( M + D )); _n=$(( _h / 1000000000 + 1 ))
  _w=$(( _n * 1000000000 - _h - K ))
  if [ "$_w" -lt 50000000 ]; then _n=$(( _n + 1 )); _w=$(( _w + 1000000000 )); fi
  _sleep_ns "$_w"
  date -s "@$_n" >/dev/null || return 1
  _offs || { usleep 5000; _offs; } || return 1
  E=$(( O - D ))
}
_clock_sync() {
  [ -r /proc/timer_list ] || { echo '@@CLOCKFAIL no /proc/timer_list' >&3; return 1; }
  mkfifo /tmp/.clock-fifo && exec 4<>/tmp/.clock-fifo || return 1
  _mono && _a=$M && _mono && _mcost=$(( M - _a )) || return 1
  _handshake || { echo '@@CLOCKFAIL no answer from host' >&3; return 1; }
  _mono; _a=$M; _n=$(( (_a + D) / 1000000000 ))
  _sleep_ns 1000000; date -s "@$_n" >/dev/null
  _offs || return 1
  K=$(( _n * 1000000000 - O - _a - 1000000 ))
  _i=0
  while [ $_i -lt 3 ]; do
    _i=$(( _i + 1 ))
    _set_at_boundary || { echo '@@CLOCKFAIL cannot set' >&3; return 1; }
    if [ "$E" -gt -2000000 ] && [ "$E" -lt 2000000 ]; then break; fi
    K=$(( K - E ))
  done
  _mono; _a=$M
  _r=$(adjtimex | awk '/tv_sec/{s=$2} /tv_usec/{u=$2} END{printf "%d%06d000", s, u}')
  _mono
  if [ "$_r" -lt $(( _a + O - 1000000 )) ] || [ "$_r" -gt $(( M + O + 1000000 )) ]; then
    echo "@@CLOCKFAIL timer_list offset disagrees with adjtimex" >&3; return 1
  fi
  echo "@@CLOCKINFO rounds=$_i lead_ns=$K mono_read_ns=$_mcost window_ns=$_best" >&3
  echo "@@CLOCKSKEW $E" >&3
  _mono; echo "@@CLOCKNOW $(( M + O ))" >&3
}
_clock_sync
exec 4<&-
rm -f /tmp/.clock-fifo
"""


# --------------------------------------------------------------------------
# Running the guest
# --------------------------------------------------------------------------


@attrs.define(frozen=True)
class VirtioFsDevice:
    """One vhost-user-fs device: the daemon's socket and the guest tag."""

    socket: Path | str
    tag: str
    queue_size: int | None = None


@attrs.define(frozen=True)
class TranscriptLine:
    """A ttyS1 line and the host ``time.time_ns()`` at which it arrived."""

    host_ns: int
    text: str


@attrs.define(frozen=True)
class VMResult:
    """What a guest run produced.

    ``exit_status`` is the workload's status from ``@@EXIT`` (None if the
    guest never reported one); ``qemu_returncode`` QEMU's own; ``lines`` the
    ttyS1 lines (protocol lines included); ``clock_skew_ns`` the guest's
    estimate of (guest - host) after the clock was set, if it was.
    """

    exit_status: int | None
    qemu_returncode: int
    lines: tuple[TranscriptLine, ...]
    console: str
    duration: float
    clock_skew_ns: int | None
    clock_check_ns: int | None

    @property
    def transcript(self) -> str:
        """The workload's output: ttyS1 lines that are not ``@@`` protocol lines."""
        return "\n".join(l.text for l in self.lines if not l.text.startswith("@@"))

    @property
    def raw_transcript(self) -> str:
        return "\n".join(l.text for l in self.lines)

    def check(self) -> "VMResult":
        """Raise :class:`GuestVMError` unless the workload exited 0 and QEMU cleanly."""
        if self.exit_status != 0 or self.qemu_returncode != 0:
            raise GuestVMError(
                f"guest workload exit status {self.exit_status}, "
                f"qemu exit status {self.qemu_returncode}",
                self.console,
                self.raw_transcript,
            )
        return self


class _Serial:
    """Host end of ttyS1: QEMU connects to our listening socket; a thread
    collects lines and answers ``@@CLOCK?``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._listener.settimeout(0.2)
        self.lines: list[TranscriptLine] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vm-ttyS1", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        conn = None
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
                break
            except socket.timeout:
                continue
            except OSError:
                return
        if conn is None:
            return
        self._connected.set()
        conn.settimeout(0.2)
        buf = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except socket.timeout:
                    if self._stop.is_set():
                        break
                    continue
                except OSError:
                    break
                now = time.time_ns()
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    text = raw.decode("utf-8", "replace").rstrip("\r")
                    if text == "@@CLOCK?":
                        try:
                            conn.sendall(b"%d\n" % time.time_ns())
                        except OSError:
                            pass
                    with self._lock:
                        self.lines.append(TranscriptLine(now, text))
            if buf:
                with self._lock:
                    self.lines.append(
                        TranscriptLine(time.time_ns(), buf.decode("utf-8", "replace").rstrip("\r"))
                    )

    def close(self, wait: float = 2.0) -> tuple[TranscriptLine, ...]:
        """Stop and return the lines.  Call after QEMU has exited: its end
        of the socket is closed, so the reader drains what is left and sees
        EOF; ``wait`` bounds that."""
        self._thread.join(wait if self._connected.is_set() else min(wait, 0.5))
        self._stop.set()
        self._thread.join(1.0)
        self._listener.close()
        with self._lock:
            return tuple(self.lines)


class GuestVM:
    """One QEMU (TCG) guest run: boot ``kernel`` with ``initrd``, attach the
    virtio-fs ``devices``, wait for power-off (at most ``timeout`` seconds).

    ``kernel`` is a :class:`KernelAssets` (its :attr:`~KernelAssets.kernel`
    is booted) or a path.  The daemons behind the devices' sockets must be
    listening before :meth:`run`.  ``append`` adds kernel parameters
    (``quiet=False`` keeps the kernel's boot messages on the console);
    ``extra_args`` adds QEMU arguments.  ``workdir`` (default: a temporary
    directory) receives ``console.log`` and ``qemu.stderr``.  :meth:`run`
    may be called again for another boot.
    """

    def __init__(
        self,
        kernel: KernelAssets | Path | str,
        initrd: Path | str,
        devices: Sequence[VirtioFsDevice] = (),
        *,
        memory_mib: int = 2048,
        cpus: int = 2,
        timeout: float = 60.0,
        append: str = "",
        quiet: bool = True,
        extra_args: Sequence[str] = (),
        qemu: str = "qemu-system-x86_64",
        workdir: Path | str | None = None,
        daemon_grace: float = 5.0,
    ) -> None:
        self.kernel = kernel.kernel if isinstance(kernel, KernelAssets) else Path(kernel)
        self.initrd = Path(initrd)
        self.devices = list(devices)
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.timeout = timeout
        self.append = append
        self.quiet = quiet
        self.extra_args = list(extra_args)
        self.qemu = qemu
        self.workdir = Path(workdir) if workdir is not None else None
        self.daemon_grace = daemon_grace
        tags = [d.tag for d in self.devices]
        if len(set(tags)) != len(tags):
            raise ValueError(f"duplicate virtio-fs tags: {tags}")
        for tag in tags:
            _check_tag(tag)

    def command(self, console_log: Path, serial_socket: Path) -> list[str]:
        """The QEMU argv (exposed for logging and debugging)."""
        mem = f"{self.memory_mib}M"
        argv = [
            self.qemu,
            "-nodefaults", "-no-user-config", "-nographic", "-monitor", "none",
            "-no-reboot",
            "-accel", "tcg,thread=multi",
            "-cpu", "max",
            "-m", mem,
            "-smp", str(self.cpus),
            "-object", f"memory-backend-memfd,id=mem,size={mem},share=on",
            "-numa", "node,memdev=mem",
            "-chardev", f"file,id=ttyS0,path={_qemu_opt(console_log)}",
            "-serial", "chardev:ttyS0",
            "-chardev", f"socket,id=ttyS1,path={_qemu_opt(serial_socket)}",
            "-serial", "chardev:ttyS1",
        ]
        for i, dev in enumerate(self.devices):
            opts = f"vhost-user-fs-pci,chardev=vfs{i},tag={dev.tag}"
            if dev.queue_size is not None:
                opts += f",queue-size={dev.queue_size}"
            argv += ["-chardev", f"socket,id=vfs{i},path={_qemu_opt(dev.socket)}", "-device", opts]
        # panic=-1 + -no-reboot: a panicking guest ends QEMU at once.
        # cryptomgr.notests: the crypto self-tests cost ~1 s of boot under TCG.
        cmdline = (
            "console=ttyS0 panic=-1 oops=panic reboot=t i8042.noaux i8042.nokbd"
            " cryptomgr.notests"
        )
        if self.quiet:
            cmdline += " quiet"
        if self.append:
            cmdline += " " + self.append
        argv += ["-kernel", str(self.kernel), "-initrd", str(self.initrd), "-append", cmdline]
        return argv + self.extra_args

    def run(self, watch: Sequence["VirtioFsDaemon | subprocess.Popen"] = ()) -> VMResult:
        """Boot, wait for power-off, return the result (not checked: see
        :meth:`VMResult.check`).

        Raises :class:`GuestVMTimeout` (QEMU killed) after ``timeout``
        seconds, and :class:`GuestVMError` if QEMU cannot start or if one of
        the ``watch`` processes (the daemons) exits while the guest still
        runs ``daemon_grace`` seconds later: a guest whose daemon is gone
        would otherwise hang in the FUSE driver until the timeout.
        """
        watched = [w.process if isinstance(w, VirtioFsDaemon) else w for w in watch]
        if any(p is None for p in watched):
            raise ValueError("watch: a daemon that was not started")
        if shutil.which(self.qemu) is None:
            raise GuestVMError(f"{self.qemu} not found; run scripts/setup-system.sh")
        with tempfile.TemporaryDirectory(prefix="vfs-vm-") as tmpdir:
            work = self.workdir or Path(tmpdir)
            work.mkdir(parents=True, exist_ok=True)
            console_log = work / "console.log"
            console_log.write_bytes(b"")
            # AF_UNIX paths are limited to 108 bytes: keep the socket short.
            serial_sock = Path(tmpdir) / "s1"
            serial = _Serial(serial_sock)
            argv = self.command(console_log, serial_sock)
            stderr_path = work / "qemu.stderr"
            start = time.monotonic()
            with open(stderr_path, "wb") as stderr:
                try:
                    proc = subprocess.Popen(
                        argv, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                        start_new_session=True,
                    )
                except OSError as exc:
                    serial.close(0)
                    raise GuestVMError(f"cannot start {self.qemu}: {exc}") from exc
                try:
                    returncode, error, why = self._wait(proc, start, watched, watch)
                except BaseException:
                    _kill(proc)
                    serial.close(0)
                    raise
                if error is not None:
                    _kill(proc)
                    lines = serial.close(1.0)
                    raise error(
                        f"{why}; qemu killed\nqemu: {shlex.join(argv)}\nqemu stderr: "
                        f"{stderr_path.read_text(errors='replace').strip()}",
                        console_log.read_text(errors="replace"),
                        "\n".join(l.text for l in lines),
                    )
            duration = time.monotonic() - start
            lines = serial.close()
            console = console_log.read_text(errors="replace")
            qemu_err = stderr_path.read_text(errors="replace").strip()
            if qemu_err:
                console = f"{console}\n--- qemu stderr ---\n{qemu_err}"
        exit_status = skew = check = None
        for line in lines:
            if line.text.startswith("@@EXIT "):
                exit_status = _int_or_none(line.text[7:])
            elif line.text.startswith("@@CLOCKSKEW "):
                skew = _int_or_none(line.text[12:])
            elif line.text.startswith("@@CLOCKNOW "):
                now = _int_or_none(line.text[11:])
                check = None if now is None else line.host_ns - now
        return VMResult(
            exit_status=exit_status,
            qemu_returncode=returncode,
            lines=lines,
            console=console,
            duration=duration,
            clock_skew_ns=skew,
            clock_check_ns=check,
        )


    def _wait(
        self, proc: subprocess.Popen, start: float, watched: list, originals: Sequence
    ) -> tuple[int, None, str] | tuple[None, type[GuestVMError], str]:
        """Wait for QEMU: ``(returncode, None, "")`` when it exits by itself,
        ``(None, error class, why)`` when it must be killed."""
        deadline = start + self.timeout
        died_at: float | None = None
        why = ""
        while True:
            try:
                return proc.wait(0.1), None, ""
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if died_at is None:
                for process, original in zip(watched, originals):
                    if process.poll() is not None:
                        died_at, why = now, _describe_exit(original, process.returncode)
                        break
            elif now - died_at > self.daemon_grace:
                return None, GuestVMError, why
            if now > deadline:
                return None, GuestVMTimeout, f"guest did not power off within {self.timeout} s"


def _describe_exit(watched: object, status: int) -> str:
    text = f"daemon exited with status {status} while the guest was running"
    if isinstance(watched, VirtioFsDaemon):
        text += f" ({shlex.join(watched.argv)})\n--- daemon log ---\n{_tail(watched.log(), 40)}"
    return text


def _qemu_opt(value: object) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return str(value).replace(",", ",,")


def _check_tag(tag: str) -> None:
    # virtio-fs tags are at most 36 bytes; keep them shell- and QEMU-safe.
    if not re.fullmatch(r"[A-Za-z0-9_.:-]{1,36}", tag):
        raise ValueError(f"bad virtio-fs tag {tag!r}")


def _int_or_none(text: str) -> int | None:
    try:
        return int(text.strip())
    except ValueError:
        return None


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:  # pragma: no cover - unkillable process
        pass


# --------------------------------------------------------------------------
# Daemon processes
# --------------------------------------------------------------------------


def wait_for_unix_socket(
    path: Path | str, timeout: float = 10.0, process: subprocess.Popen | None = None
) -> None:
    """Wait until the AF_UNIX socket file ``path`` exists.

    It does not connect: a vhost-user daemon may serve a single connection,
    and a probe would use it up.  Raises :class:`GuestVMError` if ``process``
    exits first or after ``timeout`` seconds.
    """
    import stat as _stat

    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _stat.S_ISSOCK(path.stat().st_mode):
                return
        except FileNotFoundError:
            pass
        if process is not None and process.poll() is not None:
            raise GuestVMError(f"daemon exited with status {process.returncode} before {path} appeared")
        if time.monotonic() > deadline:
            raise GuestVMError(f"{path} did not appear within {timeout} s")
        time.sleep(0.02)


class VirtioFsDaemon:
    """A vhost-user-fs daemon subprocess, as a context manager.

    ``argv`` is the full command (it must create ``socket_path``); its
    stdout+stderr go to ``log_path`` (default: next to the socket).  On
    entry waits for the socket; on exit terminates the daemon if it still
    runs (SIGTERM, then SIGKILL after ``stop_timeout``).
    """

    def __init__(
        self,
        argv: Sequence[str],
        socket_path: Path | str,
        *,
        log_path: Path | str | None = None,
        cwd: Path | str | None = None,
        start_timeout: float = 10.0,
        stop_timeout: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.socket_path = Path(socket_path)
        self.log_path = Path(log_path) if log_path else self.socket_path.with_suffix(".log")
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.env = dict(env) if env is not None else None
        self.process: subprocess.Popen | None = None

    def start(self) -> "VirtioFsDaemon":
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.cwd, env=self.env, start_new_session=True,
            )
        try:
            wait_for_unix_socket(self.socket_path, self.start_timeout, self.process)
        except GuestVMError as exc:
            self.stop()
            raise GuestVMError(f"{exc}\n--- daemon log ---\n{self.log()}") from None
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self, timeout: float) -> int | None:
        """Wait for the daemon to exit by itself; its status, or None on timeout."""
        assert self.process is not None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal the daemon (if still running) and reap it; its exit status."""
        proc = self.process
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
        return proc.returncode

    def __enter__(self) -> "VirtioFsDaemon":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
