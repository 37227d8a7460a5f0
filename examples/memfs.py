"""Serve a filesystem that lives in this process's memory to a virtual machine.

    python examples/memfs.py --socket-path /tmp/memfs.sock &
    qemu-system-x86_64 ... -chardev socket,id=c0,path=/tmp/memfs.sock \
        -device vhost-user-fs-pci,chardev=c0,tag=memfs
    (guest) mount -t virtiofs memfs /mnt
"""
import argparse
import logging

import virtiofs_async
from virtiofs_async.backends import MemoryFS


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket-path", help="vhost-user unix socket to listen on")
    where.add_argument("--fd", type=int, help="inherited listening socket fd")
    parser.add_argument("--size", type=parse_size, default="1G", help="capacity, e.g. 512M (default 1G)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "asyncio", "uvloop", "trio"])
    parser.add_argument("--persist", action="store_true", help="serve the next frontend after a disconnect")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args()
    logging.basicConfig(level=args.log_level.upper(), format="memfs: %(levelname)s %(name)s: %(message)s")

    backend = MemoryFS(size_bytes=args.size)
    try:
        virtiofs_async.run(
            backend, runtime=args.runtime, socket_path=args.socket_path, fd=args.fd, once=not args.persist
        )
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
