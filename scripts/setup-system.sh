#!/usr/bin/env bash
# Install the system packages the VM test tier needs (Debian 12, run as root).
#
# Idempotent: packages already installed are skipped, and `apt-get update` runs
# at most once, only when something is missing.  Safe to run on a fresh CI
# machine or again on a machine that is already set up.
#
#   qemu-system-x86     qemu-system-x86_64 (TCG guest)
#   qemu-system-common  QEMU's C virtiofsd (/usr/lib/qemu/virtiofsd), reference daemon
#   busybox-static      the guest's whole userland, one static binary
#   cpio                inspecting initramfs images by hand (the tests write newc themselves)
#   lz4 xz-utils zstd   unpacking the guest kernel (LZ4 bzImage payload; other kernels
#                       may use xz or zstd, and compressed .ko.xz/.ko.zst modules)
#   attr                setfattr/getfattr, copied into the guest for the xattr checks
#   apt-utils dpkg      `apt-get download` / `dpkg-deb -x` of the guest kernel package
#   ca-certificates     the mirror may be https
#   fio                 benchmarks/guest_bench.py: the guest runs the host's fio (chroot into /)
#   python3             the guest's chroot runs the host's /usr/bin/python3 (VM tests, guest
#                       benchmark); its /usr/lib/python3.11 is also the untar workload's input
#   e2fsprogs mount     benchmarks/guest_bench.py: a fresh ext4 (mkfs.ext4, mount -o loop)
#                       for each daemon's shared directory
#   valgrind            benchmarks/instructions.py: instructions per request (callgrind)
#   strace              tests/integration/test_data_path_segments.py: the segments of the
#                       daemon's preadv/pwritev calls
set -euo pipefail

if [[ ${EUID} -ne 0 ]]; then
    echo "setup-system.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
    qemu-system-x86
    qemu-system-common
    busybox-static
    cpio
    lz4
    xz-utils
    zstd
    attr
    dpkg
    ca-certificates
    fio
    python3
    e2fsprogs
    mount
    valgrind
    strace
)

installed() {
    # True when the package is fully installed ("install ok installed").
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! installed "${pkg}"; then
        missing+=("${pkg}")
    fi
done

if ((${#missing[@]} == 0)); then
    echo "setup-system.sh: all packages already installed"
else
    echo "setup-system.sh: installing ${missing[*]}"
    apt-get update
    apt-get install -y --no-install-recommends "${missing[@]}"
fi

# The guest kernel is fetched later by `apt-get download` from the package
# lists, so the metapackage must be known to apt.  Refresh the lists only if
# apt does not know it yet (e.g. a CI image shipped with empty lists) and we
# did not just update.
if ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
    if ((${#missing[@]} == 0)); then
        apt-get update
    fi
    apt-cache show linux-image-cloud-amd64 >/dev/null
fi

# Sanity checks: fail loudly here rather than in the middle of a test run.
for path in /usr/bin/qemu-system-x86_64 /usr/lib/qemu/virtiofsd /bin/busybox \
            /usr/bin/setfattr /usr/bin/getfattr /usr/bin/lz4 /usr/bin/fio /usr/bin/python3 \
            /usr/sbin/mkfs.ext4 /usr/bin/mount; do
    if [[ ! -x ${path} ]]; then
        echo "setup-system.sh: ${path} missing after install" >&2
        exit 1
    fi
done
echo "setup-system.sh: ok"
