"""Escape attempts, run inside the guest (as root) on a virtio-fs mount.

Usage: python3 escape_suite.py MOUNT TOKEN OUTSIDE_DIR INODES

The host prepared, next to the shared directory, ``OUTSIDE_DIR`` holding
files whose content contains ``TOKEN``, and in the share: symlinks pointing
out (``abs``, ``rel``, ``dirlink``, ``rootlink``, ``deep``), ``swapdir/``
(a directory the host replaces by a symlink to OUTSIDE_DIR when asked),
``moveme`` and ``inside``. ``INODES`` is a comma-separated list of the
host inode numbers of the outside files (for forged file handles).

Prints one ``name: blocked ...`` or ``name: ESCAPED ...`` line per
attempt, then ``END``. An attempt has escaped when the guest reads the
token, sees an outside name, or a host-side effect lands outside (the host
checks those itself afterwards).
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import time

MOUNT, TOKEN, OUTSIDE, INODES = sys.argv[1], sys.argv[2].encode(), sys.argv[3], sys.argv[4]
libc = ctypes.CDLL(None, use_errno=True)


def out(name: str, escaped: bool, detail: str) -> None:
    print(f"{name}: {'ESCAPED' if escaped else 'blocked'} ({detail})", flush=True)


def err(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return type(exc).__name__


def m(*parts: str) -> str:
    return os.path.join(MOUNT, *parts)


def try_read(name: str, path: str, dir_fd: int | None = None) -> None:
    """Reading ``path`` must not give the token."""
    try:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError as exc:
        out(name, False, err(exc))
        return
    out(name, TOKEN in data, f"read {len(data)} bytes")


def try_list(name: str, path: str | int) -> None:
    """Listing must not show the outside directory's names."""
    try:
        names = os.listdir(path)
    except OSError as exc:
        out(name, False, err(exc))
        return
    leaked = sorted(n for n in names if n.startswith("secret"))
    out(name, bool(leaked), f"{len(names)} names" + (f", {leaked}" if leaked else ""))


def try_call(name: str, fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    """A call whose effect the host checks; here only its outcome is shown."""
    try:
        fn(*args, **kwargs)
        out(name, False, "ok, effect checked on the host")
    except (OSError, NotImplementedError) as exc:
        out(name, False, err(exc))


def symlinks() -> None:
    for link in ("abs", "rel", "deep"):
        try_read(f"read {link} symlink", m(link))
        try:
            target = os.readlink(m(link))
            out(f"readlink {link}", False, "the target is data: " + ("host path" if target.startswith("/")
                                                                   else "relative"))
        except OSError as exc:
            out(f"readlink {link}", False, err(exc))
    try_list("list dirlink", m("dirlink"))
    try_read("read dirlink/secret", m("dirlink", "secret"))
    try_list("list rootlink + outside path", m("rootlink") + OUTSIDE)
    try_read("read rootlink + outside path", m("rootlink") + OUTSIDE + "/secret")
    try_read("read via .. of the mount", m("..", os.path.basename(OUTSIDE), "secret"))
    try_list("list .. of the mount", m(".."))
    try_read("read via many ..", m(*([".."] * 12)) + OUTSIDE + "/secret")


def metadata_through_symlinks() -> None:
    # No-follow calls act on the symlink itself; the host checks the target.
    try_call("link symlink (no follow)", os.link, m("abs"), m("abs-hard"), follow_symlinks=False)
    try_read("read hard link of symlink", m("abs-hard"))
    try_call("link symlink (follow)", os.link, m("abs"), m("abs-hard2"), follow_symlinks=True)
    try_call("lchown symlink", os.chown, m("abs"), 4242, 4242, follow_symlinks=False)
    try_call("lutimes symlink", os.utime, m("abs"), ns=(10**9, 10**9), follow_symlinks=False)
    try_call("lsetxattr symlink", os.setxattr, m("abs"), "user.escape", b"1", follow_symlinks=False)
    try_call("chmod through symlink", os.chmod, m("abs"), 0o777)
    try_call("truncate through symlink", os.truncate, m("rel"), 0)
    try_call("rename into dirlink", os.rename, m("moveme"), m("dirlink", "moved"))
    try_call("create through dirlink", lambda: os.close(os.open(m("dirlink", "planted"), os.O_CREAT | os.O_WRONLY,
                                                                  0o644)))
    try_call("mkdir through dirlink", os.mkdir, m("dirlink", "planted-dir"))
    try_call("symlink through dirlink", os.symlink, "x", m("dirlink", "planted-link"))


def swapped_directory() -> None:
    """A directory the guest holds open is replaced on the host by a
    symlink pointing out: requests on the old nodeid must stay on the old
    directory."""
    dfd = os.open(m("swapdir"), os.O_RDONLY | os.O_DIRECTORY)
    os.chdir(m("swapdir"))
    open(m(".please-swap"), "w").close()
    deadline = time.monotonic() + 30
    while not os.path.exists(m(".swapped")):
        if time.monotonic() > deadline:
            out("swap", True, "the host never swapped: cannot test")
            return
        time.sleep(0.2)
    try_read("read secret from swapped cwd", "secret")
    try_read("read secret via swapped dir fd", "secret", dir_fd=dfd)
    try_list("list swapped dir fd", dfd)
    try_call("create in swapped dir", lambda: os.close(os.open("planted", os.O_CREAT | os.O_WRONLY, 0o644,
                                                               dir_fd=dfd)))
    try_call("rename into swapped dir", os.rename, m("moveme2"), "planted2", dst_dir_fd=dfd)
    try_call("mkdir in swapped dir", os.mkdir, "planted-dir", dir_fd=dfd)
    os.chdir("/")
    os.close(dfd)
    time.sleep(1.5)  # let the guest's dentry for swapdir expire (cache=auto: 1 s)
    try_read("read swapdir/secret after swap", m("swapdir", "secret"))
    try_list("list swapdir after swap", m("swapdir"))


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int), ("f_handle", ctypes.c_char * 128)]


def forged_handles() -> None:
    """open_by_handle_at with handles naming nodeids the guest was never
    given: the host inode numbers of the outside files, and small numbers."""
    fh = FileHandle()
    fh.handle_bytes = 128
    mount_id = ctypes.c_int()
    if libc.name_to_handle_at(-100, m("inside").encode(), ctypes.byref(fh), ctypes.byref(mount_id), 0) != 0:
        out("name_to_handle_at", False, errno.errorcode.get(ctypes.get_errno(), "?"))
        return
    out("name_to_handle_at", False, f"type {fh.handle_type:#x}, {fh.handle_bytes} bytes")
    mfd = os.open(MOUNT, os.O_RDONLY | os.O_DIRECTORY)
    candidates = [int(i) for i in INODES.split(",") if i] + list(range(1, 40))
    results: dict[str, int] = {}
    leaked = []
    for nodeid in candidates:
        for gen in (0, 1):
            forged = FileHandle()
            forged.handle_bytes = fh.handle_bytes
            forged.handle_type = fh.handle_type
            body = struct.pack("<III", nodeid >> 32, nodeid & 0xFFFFFFFF, gen)
            forged.f_handle = body + bytes(fh.f_handle)[len(body):fh.handle_bytes]
            fd = libc.open_by_handle_at(mfd, ctypes.byref(forged), os.O_RDONLY)
            if fd < 0:
                code = errno.errorcode.get(ctypes.get_errno(), "?")
                results[code] = results.get(code, 0) + 1
                continue
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            finally:
                os.close(fd)
            results["opened"] = results.get("opened", 0) + 1
            if TOKEN in data:
                leaked.append(nodeid)
    os.close(mfd)
    out("open_by_handle_at forged", bool(leaked), f"{sorted(results.items())}" + (f" leaked {leaked}" if leaked else ""))


def main() -> None:
    for section in (symlinks, metadata_through_symlinks, swapped_directory, forged_handles):
        print(f"[{section.__name__}]", flush=True)
        try:
            section()
        except Exception as exc:  # a crash of the suite is a failure too
            print(f"{section.__name__} CRASHED: {exc!r}", flush=True)
    print("END", flush=True)


if __name__ == "__main__":
    main()
