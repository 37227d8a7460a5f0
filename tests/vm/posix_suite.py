"""POSIX behaviour suite, run INSIDE a guest on a virtio-fs mount.

Usage (as root in the guest): ``python3 posix_suite.py MOUNTPOINT``

Prints a deterministic transcript, one ``name: value`` line per check, whose
values depend only on the filesystem's behaviour (never on inode numbers,
pids, creation timestamps or free space): modes in octal, errno names, "ok",
counts.  Lines starting with ``#`` are diagnostics (timings) and are not
part of the transcript.  The last line is ``END``.  Runs with the standard
library of Python 3.11 only; checks as another user run in forked children
after ``setresuid``.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import sys
import time

U1, G1 = 1000, 1000  # the non-root guest user
U2, G2 = 1001, 1001  # another one

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2
MOUNT = "."  # the mountpoint (argv[1])


def out(name: str, value: object) -> None:
    print(f"{name}: {value}", flush=True)


def ename(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, str(exc.errno)) if exc.errno else type(exc).__name__


def attempt(name: str, fn, *args, **kw) -> None:
    """Run ``fn``; print its result ("ok" for None) or the errno name."""
    try:
        v = fn(*args, **kw)
    except OSError as exc:
        v = ename(exc)
    out(name, "ok" if v is None else v)


def mode(path: str, follow: bool = True) -> str:
    return "%o" % stat.S_IMODE(os.stat(path, follow_symlinks=follow).st_mode)


def owner(path: str) -> str:
    st = os.lstat(path)
    return f"{st.st_uid}:{st.st_gid}"


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write(path: str, data: bytes, flags: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
          perm: int = 0o644) -> None:
    fd = os.open(path, flags, perm)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def as_user(uid: int, gid: int, fn, groups: tuple[int, ...] = ()) -> None:
    """Run ``fn()`` in a forked child with all uids/gids set (capabilities
    dropped as setresuid does); its lines go to our stdout."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups(list(groups))
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            fn()
        except BaseException as exc:  # noqa: BLE001 - reported, not raised
            out("child-crash", f"{type(exc).__name__}: {exc}")
            code = 1
        sys.stdout.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        out("child-status", status)


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, old.encode(), AT_FDCWD, new.encode(), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


class Timer:
    def __init__(self) -> None:
        self.t = time.monotonic()

    def lap(self, what: str) -> None:
        now = time.monotonic()
        print(f"# {what} {now - self.t:.2f}s", flush=True)
        self.t = now


# --------------------------------------------------------------------------


def basics() -> None:
    os.mkdir("d")
    out("mkdir mode", mode("d"))
    os.chmod("d", 0o754)
    out("chmod 0754", mode("d"))
    write("f", b"hello")
    out("create mode", mode("f"))
    out("create owner", owner("f"))
    out("size", os.stat("f").st_size)
    attempt("mkdir existing", os.mkdir, "d")
    attempt("open missing", os.open, "nope", os.O_RDONLY)
    attempt("open dir for write", os.open, "d", os.O_WRONLY)
    attempt("rmdir file", os.rmdir, "f")
    attempt("unlink dir", os.unlink, "d")
    os.mkdir("d/sub")
    write("d/sub/x", b"")
    attempt("rmdir nonempty", os.rmdir, "d/sub")
    attempt("open missing in file", os.open, "f/x", os.O_RDONLY)
    out("dir nlink after subdir", os.stat("d").st_nlink)
    for m in (0o7777, 0o4755, 0o2750, 0o1777, 0o0):
        os.chmod("f", m)
        out(f"chmod {m:04o}", mode("f"))
    os.chmod("f", 0o644)
    os.chown("f", 1234, 5678)
    out("chown 1234:5678", owner("f"))
    os.chown("f", -1, 42)
    out("chown -1:42", owner("f"))
    os.chown("f", 0, 0)
    # chown clears suid/sgid of an executable file (even as root)
    os.chmod("f", 0o6755)
    os.chown("f", 1234, 1234)
    out("chown clears suid/sgid", mode("f"))
    os.chown("f", 0, 0)
    os.chmod("f", 0o644)
    os.utime("f", ns=(1_234_567_890_123_456_789, 987_654_321_987_654_321))
    st = os.stat("f")
    out("utimensat atime_ns", st.st_atime_ns)
    out("utimensat mtime_ns", st.st_mtime_ns)
    os.utime("f", ns=(1, 2))
    st = os.stat("f")
    out("utimensat small", f"{st.st_atime_ns} {st.st_mtime_ns}")
    before = os.stat("f").st_mtime_ns
    os.utime("f")
    out("utime now advances mtime", os.stat("f").st_mtime_ns > before)
    # truncate / ftruncate / fallocate
    os.truncate("f", 10000)
    out("truncate grow", os.stat("f").st_size)
    out("truncate grow head", read("f")[:6])
    os.truncate("f", 3)
    out("truncate shrink", read("f"))
    fd = os.open("f", os.O_RDWR)
    os.posix_fallocate(fd, 0, 1 << 20)
    out("fallocate size", os.fstat(fd).st_size)
    os.ftruncate(fd, 0)
    out("ftruncate 0", os.fstat(fd).st_size)
    os.close(fd)
    # ctime on chmod
    os.utime("f", ns=(5, 5))
    c0 = os.stat("f").st_ctime_ns
    time.sleep(0.01)
    os.chmod("f", 0o600)
    out("chmod bumps ctime", os.stat("f").st_ctime_ns > c0)


def open_flags() -> None:
    write("o", b"abcdef")
    attempt("O_EXCL existing", os.open, "o", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    fd = os.open("o2", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    out("O_EXCL new mode", mode("o2"))
    os.close(os.open("o", os.O_WRONLY | os.O_TRUNC))
    out("O_TRUNC size", os.stat("o").st_size)
    write("o", b"12", os.O_WRONLY)
    write("o", b"34", os.O_WRONLY | os.O_APPEND)
    fd = os.open("o", os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"56")
    out("O_APPEND ignores seek pos", os.lseek(fd, 0, os.SEEK_CUR))
    os.close(fd)
    out("O_APPEND content", read("o"))
    attempt("O_DIRECTORY on file", os.open, "o", os.O_RDONLY | os.O_DIRECTORY)
    os.symlink("o", "o-link")
    attempt("O_NOFOLLOW on symlink", os.open, "o-link", os.O_RDONLY | os.O_NOFOLLOW)
    attempt("O_CREAT|O_EXCL on symlink", os.open, "o-link",
            os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fd = os.open(".", os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as exc:
        out("O_TMPFILE", ename(exc))
    else:
        os.write(fd, b"tmp")
        out("O_TMPFILE", f"ok nlink={os.fstat(fd).st_nlink}")
        os.close(fd)
    # read/write at offsets
    fd = os.open("o", os.O_RDWR)
    os.pwrite(fd, b"XY", 1)
    out("pwrite/pread", os.pread(fd, 10, 0))
    os.close(fd)
    # copy_file_range
    write("cfr-src", b"0123456789" * 1000)
    fi = os.open("cfr-src", os.O_RDONLY)
    fo = os.open("cfr-dst", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        n = os.copy_file_range(fi, fo, 5000, 10)
        out("copy_file_range", f"{n} {read('cfr-dst')[:20]!r} size={os.stat('cfr-dst').st_size}")
    except OSError as exc:
        out("copy_file_range", ename(exc))
    os.close(fi)
    os.close(fo)


def renames() -> None:
    write("r1", b"one")
    write("r2", b"two")
    os.rename("r1", "r2")
    out("rename over file", f"{read('r2')!r} r1 exists={os.path.exists('r1')}")
    os.mkdir("rd1")
    write("rd1/in", b"x")
    os.mkdir("rd2")
    os.rename("rd1", "rd2")
    out("rename over empty dir", sorted(os.listdir("rd2")))
    os.mkdir("rd3")
    write("rd3/y", b"")
    attempt("rename dir over nonempty dir", os.rename, "rd2", "rd3")
    attempt("rename file over dir", os.rename, "r2", "rd3")
    attempt("rename dir over file", os.rename, "rd3", "r2")
    attempt("rename dir into itself", os.rename, "rd3", "rd3/sub")
    attempt("rename missing", os.rename, "nope", "nope2")
    os.rename("r2", "rd3/moved")
    out("rename across dirs", read("rd3/moved"))
    write("n1", b"a")
    write("n2", b"b")
    attempt("RENAME_NOREPLACE existing", renameat2, "n1", "n2", RENAME_NOREPLACE)
    attempt("RENAME_NOREPLACE new", renameat2, "n1", "n3", RENAME_NOREPLACE)
    attempt("RENAME_EXCHANGE", renameat2, "n2", "n3", RENAME_EXCHANGE)
    out("RENAME_EXCHANGE content", f"{read('n2')!r} {read('n3')!r}")
    os.mkdir("xd")
    attempt("RENAME_EXCHANGE file<->dir", renameat2, "n2", "xd", RENAME_EXCHANGE)
    out("RENAME_EXCHANGE types", f"n2 dir={os.path.isdir('n2')} xd dir={os.path.isdir('xd')}")
    attempt("RENAME_EXCHANGE missing", renameat2, "n3", "nope", RENAME_EXCHANGE)
    attempt("RENAME_NOREPLACE|EXCHANGE", renameat2, "n3", "xd",
            RENAME_NOREPLACE | RENAME_EXCHANGE)


def links() -> None:
    write("h", b"hard")
    os.link("h", "h2")
    out("link count", f"{os.stat('h').st_nlink} {os.stat('h2').st_nlink}")
    out("link same inode", os.stat("h").st_ino == os.stat("h2").st_ino)
    os.unlink("h")
    out("link count after unlink", os.stat("h2").st_nlink)
    out("link content", read("h2"))
    os.mkdir("hd")
    attempt("link to dir", os.link, "hd", "hd2")
    attempt("link over existing", os.link, "h2", "o")
    os.symlink("target-does-not-exist", "dangling")
    out("readlink", os.readlink("dangling"))
    out("lstat symlink", f"{stat.S_ISLNK(os.lstat('dangling').st_mode)} size={os.lstat('dangling').st_size}")
    attempt("stat dangling", os.stat, "dangling")
    os.symlink("loop-b", "loop-a")
    os.symlink("loop-a", "loop-b")
    attempt("open symlink loop", os.open, "loop-a", os.O_RDONLY)
    attempt("stat symlink loop", os.stat, "loop-a")
    prev = "h2"
    for i in range(41):
        os.symlink(prev, f"chain{i}")
        prev = f"chain{i}"
    attempt("symlink chain 40", lambda: len(read("chain39")))
    attempt("symlink chain 41", lambda: len(read("chain40")))
    os.symlink("/" + "x" * 4000, "longlink")
    out("long symlink target len", len(os.readlink("longlink")))
    attempt("symlink over existing", os.symlink, "x", "h2")
    os.link("dangling", "dangling-hard")
    out("hard link to symlink", f"{os.lstat('dangling').st_nlink} {os.readlink('dangling-hard')}")
    attempt("chmod follows dangling", os.chmod, "dangling", 0o600)
    attempt("lchown symlink", os.chown, "dangling", 1234, 1234, follow_symlinks=False)
    out("lchown symlink owner", owner("dangling"))


def names() -> None:
    n255 = "n" * 255
    attempt("create 255-byte name", write, n255, b"")
    out("255 listed", n255 in os.listdir("."))
    attempt("create 256-byte name", write, "n" * 256, b"")
    attempt("mkdir 256-byte name", os.mkdir, "m" * 256)
    attempt("stat 256-byte name", os.stat, "s" * 256)
    attempt("create utf8 name", write, "\u00e9t\u00e9-\u2603", b"")
    out("utf8 listed", "\u00e9t\u00e9-\u2603" in os.listdir("."))
    attempt("create name with newline", write, "a\nb", b"")
    attempt("mkdir 4095 path", os.makedirs, "/".join(["p" * 200] * 10))


def many(count: int = 10_000, extra: int = 400) -> None:
    """A directory of ``count`` entries.  When the host pre-created them
    (``MOUNT/many`` holding ``e00000``..; creating 10 000 entries through
    FUSE under TCG takes ~20 s) the guest lists them and adds ``extra``
    more; otherwise it creates them all."""
    pre = os.path.isdir(MOUNT + "/many")
    d = MOUNT + "/many" if pre else "many"
    if not pre:
        os.mkdir(d)
    todo = [f"e{i:05d}" for i in range(count)] if not pre else []
    todo += [f"g{i:05d}" for i in range(extra)]
    workers = 2
    sys.stdout.flush()
    pids = []
    for w in range(workers):
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                for name in todo[w::workers]:
                    os.mknod(f"{d}/{name}", 0o644 | stat.S_IFREG)
            except OSError as exc:
                print(f"many: mknod failed {ename(exc)}", flush=True)
                code = 1
            os._exit(code)
        pids.append(pid)
    bad = [os.waitpid(p, 0)[1] for p in pids]
    out("many create status", bad)
    want = [f"e{i:05d}" for i in range(count)] + [f"g{i:05d}" for i in range(extra)]
    got = os.listdir(d)
    out("many listdir count", len(got))
    out("many listdir exact", sorted(got) == want)
    with os.scandir(d) as it:
        types = {e.is_file(follow_symlinks=False) for e in it}
    out("many scandir all files", types)
    out("many stat one", os.stat(f"{d}/e09999").st_size)
    for name in want[count:]:
        os.unlink(f"{d}/{name}")
    out("many after unlink", sorted(os.listdir(d)) == want[:count])


def unlinked_open() -> None:
    write("u", b"still here")
    fd = os.open("u", os.O_RDWR)
    os.unlink("u")
    out("unlinked exists", os.path.exists("u"))
    out("unlinked fstat nlink", os.fstat(fd).st_nlink)
    out("unlinked read", os.pread(fd, 100, 0))
    os.pwrite(fd, b"!", 10)
    out("unlinked write+read", os.pread(fd, 100, 0))
    os.ftruncate(fd, 4)
    out("unlinked ftruncate", os.fstat(fd).st_size)
    os.close(fd)
    # rename over an open file
    write("ro1", b"old")
    write("ro2", b"new")
    fd = os.open("ro1", os.O_RDONLY)
    os.rename("ro2", "ro1")
    out("open file renamed over", f"{os.pread(fd, 10, 0)!r} {read('ro1')!r}")
    os.close(fd)


def sparse() -> None:
    fd = os.open("sp", os.O_RDWR | os.O_CREAT, 0o644)
    os.pwrite(fd, b"A" * 4096, 0)
    os.pwrite(fd, b"B" * 4096, 1 << 20)
    os.fsync(fd)
    out("sparse size", os.fstat(fd).st_size)
    for name, off, whence in (("SEEK_HOLE 0", 0, os.SEEK_HOLE),
                              ("SEEK_DATA 4096", 4096, os.SEEK_DATA),
                              ("SEEK_HOLE 1M", 1 << 20, os.SEEK_HOLE),
                              ("SEEK_DATA 0", 0, os.SEEK_DATA)):
        attempt(name, os.lseek, fd, off, whence)
    attempt("SEEK_DATA past end", os.lseek, fd, (1 << 20) + 8192, os.SEEK_DATA)
    attempt("SEEK_HOLE past end", os.lseek, fd, (1 << 20) + 8192, os.SEEK_HOLE)
    out("sparse hole reads zero", os.pread(fd, 8, 8192) == b"\0" * 8)
    out("sparse blocks < full", os.fstat(fd).st_blocks * 512 < (1 << 20))
    # offsets past 4 GiB
    big = (5 << 30) + 123
    os.pwrite(fd, b"far", big)
    out("pwrite 5GiB size", os.fstat(fd).st_size)
    out("pread 5GiB", os.pread(fd, 3, big))
    out("lseek 5GiB SEEK_DATA", os.lseek(fd, (4 << 30), os.SEEK_DATA) == big - big % 4096)
    os.ftruncate(fd, 6 << 30)
    out("ftruncate 6GiB", os.fstat(fd).st_size)
    os.close(fd)
    os.truncate("sp", 0)


def mapped() -> None:
    fd = os.open("mm", os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, 8192)
    m = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    m[0:5] = b"hello"
    m[4096:4101] = b"world"
    m.flush()
    m.close()
    os.close(fd)
    data = read("mm")
    out("mmap shared write", f"{data[0:5]!r} {data[4096:4101]!r} {len(data)}")
    fd = os.open("mm", os.O_RDWR)
    os.pwrite(fd, b"HELLO", 0)
    m = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ)
    out("mmap sees write", m[0:5])
    m.close()
    attempt("fsync", os.fsync, fd)
    attempt("fdatasync", os.fdatasync, fd)
    os.close(fd)
    fd = os.open(".", os.O_RDONLY)
    attempt("fsync dir", os.fsync, fd)
    os.close(fd)
    attempt("sync", os.sync)
    sv = os.statvfs(".")
    out("statvfs namemax", sv.f_namemax)
    out("statvfs bsize", sv.f_bsize)
    out("statvfs frsize", sv.f_frsize)
    out("statvfs sane", sv.f_blocks > 0 and sv.f_bfree <= sv.f_blocks and sv.f_bavail <= sv.f_bfree)
    out("statvfs files sane", sv.f_files >= sv.f_ffree)


def specials() -> None:
    os.mkfifo("fifo", 0o640)
    st = os.lstat("fifo")
    out("mkfifo", f"fifo={stat.S_ISFIFO(st.st_mode)} mode={stat.S_IMODE(st.st_mode):o}")
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open("fifo", os.O_WRONLY)
        os.write(fd, b"through the fifo")
        os.close(fd)
        os._exit(0)
    fd = os.open("fifo", os.O_RDONLY)
    data = b""
    while chunk := os.read(fd, 100):
        data += chunk
    os.close(fd)
    os.waitpid(pid, 0)
    out("fifo data", data)
    attempt("mknod chr 1,3", os.mknod, "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    if os.path.exists("null"):
        st = os.lstat("null")
        out("mknod chr rdev", f"{os.major(st.st_rdev)},{os.minor(st.st_rdev)} chr={stat.S_ISCHR(st.st_mode)}")
        attempt("mknod chr write", lambda: os.write(os.open("null", os.O_WRONLY), b"x"))
    attempt("mknod blk 7,0", os.mknod, "loop", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    attempt("mknod sock", os.mknod, "sock", 0o600 | stat.S_IFSOCK)
    if os.path.exists("sock"):
        out("mknod sock type", stat.S_ISSOCK(os.lstat("sock").st_mode))
    os.mkdir("pub", 0o777)
    os.chmod("pub", 0o777)

    def user() -> None:
        attempt("uid1000 mknod chr", os.mknod, "pub/n", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        attempt("uid1000 mkfifo", os.mkfifo, "pub/f", 0o600)
        out("uid1000 mkfifo owner", owner("pub/f"))
    as_user(U1, G1, user)


def xattrs() -> None:
    write("xa", b"")
    attempt("setxattr", os.setxattr, "xa", "user.k1", b"v1")
    attempt("setxattr empty value", os.setxattr, "xa", "user.empty", b"")
    attempt("getxattr", os.getxattr, "xa", "user.k1")
    attempt("getxattr empty", os.getxattr, "xa", "user.empty")
    attempt("listxattr", lambda: sorted(n for n in os.listxattr("xa") if n.startswith("user.")))
    attempt("getxattr missing", os.getxattr, "xa", "user.none")
    attempt("XATTR_CREATE existing", os.setxattr, "xa", "user.k1", b"x", os.XATTR_CREATE)
    attempt("XATTR_REPLACE missing", os.setxattr, "xa", "user.none", b"x", os.XATTR_REPLACE)
    attempt("XATTR_REPLACE existing", os.setxattr, "xa", "user.k1", b"v2", os.XATTR_REPLACE)
    attempt("getxattr replaced", os.getxattr, "xa", "user.k1")
    attempt("setxattr big", os.setxattr, "xa", "user.big", b"z" * 4000)
    attempt("getxattr big len", lambda: len(os.getxattr("xa", "user.big")))
    attempt("setxattr too big", os.setxattr, "xa", "user.huge", b"z" * 70000)
    attempt("removexattr", os.removexattr, "xa", "user.k1")
    attempt("removexattr missing", os.removexattr, "xa", "user.k1")
    attempt("listxattr after", lambda: sorted(n for n in os.listxattr("xa") if n.startswith("user.")))
    os.mkdir("xd2")
    attempt("setxattr dir", os.setxattr, "xd2", "user.d", b"dir")
    attempt("getxattr dir", os.getxattr, "xd2", "user.d")
    os.symlink("xa", "xl")
    attempt("setxattr user on symlink", os.setxattr, "xl", "user.l", b"x", follow_symlinks=False)
    attempt("setxattr trusted as root", os.setxattr, "xa", "trusted.t", b"t")
    attempt("getxattr trusted as root", os.getxattr, "xa", "trusted.t")
    attempt("setxattr bad namespace", os.setxattr, "xa", "bogus.x", b"x")
    os.mkdir("xpub", 0o777)
    os.chmod("xpub", 0o777)
    write("xpub/rootfile", b"")

    def user() -> None:
        attempt("uid1000 setxattr on root 0644 file", os.setxattr, "xpub/rootfile", "user.u", b"u")
        attempt("uid1000 getxattr trusted", os.getxattr, "xa", "trusted.t")
        write("xpub/mine", b"")
        attempt("uid1000 setxattr own file", os.setxattr, "xpub/mine", "user.u", b"u")
        attempt("uid1000 setxattr trusted", os.setxattr, "xpub/mine", "trusted.t", b"t")
    as_user(U1, G1, user)


def permissions() -> None:
    os.mkdir("perm", 0o755)
    os.chmod("perm", 0o755)
    write("perm/secret", b"secret")
    os.chmod("perm/secret", 0o600)
    write("perm/readable", b"r")
    os.chmod("perm/readable", 0o644)
    os.mkdir("perm/home")
    os.chown("perm/home", U1, G1)
    os.chmod("perm/home", 0o755)
    write("perm/grp", b"g")
    os.chown("perm/grp", 0, 4321)
    os.chmod("perm/grp", 0o660)
    write("perm/x", b"#!/bin/sh\n")
    os.chmod("perm/x", 0o711)

    def user() -> None:
        out("uid1000 ids", f"{os.getuid()} {os.geteuid()} {os.getgid()}")
        attempt("uid1000 read 0600 root file", read, "perm/secret")
        attempt("uid1000 read 0644 root file", read, "perm/readable")
        attempt("uid1000 write 0644 root file", write, "perm/readable", b"w", os.O_WRONLY)
        attempt("uid1000 create in root 0755 dir", write, "perm/new", b"")
        attempt("uid1000 create in own dir", write, "perm/home/mine", b"")
        out("uid1000 created owner", owner("perm/home/mine"))
        out("uid1000 created mode", mode("perm/home/mine"))
        os.mkdir("perm/home/sub")
        out("uid1000 mkdir owner", owner("perm/home/sub"))
        attempt("uid1000 chmod root file", os.chmod, "perm/readable", 0o666)
        attempt("uid1000 chown own file to root", os.chown, "perm/home/mine", 0, 0)
        attempt("uid1000 chown own file to other group", os.chown, "perm/home/mine", -1, 4321)
        attempt("uid1000 chown own file to own group", os.chown, "perm/home/mine", -1, G1)
        attempt("uid1000 chmod own file 4755", os.chmod, "perm/home/mine", 0o4755)
        out("uid1000 own file mode", mode("perm/home/mine"))
        write("perm/home/mine", b"data", os.O_WRONLY | os.O_TRUNC)
        out("uid1000 write clears suid", mode("perm/home/mine"))
        os.chmod("perm/home/mine", 0o2755)
        out("uid1000 chmod g+s own group", mode("perm/home/mine"))
        attempt("uid1000 utime root file explicit", os.utime, "perm/readable", ns=(1, 1))
        attempt("uid1000 utime root file now", os.utime, "perm/readable")
        attempt("uid1000 unlink in root dir", os.unlink, "perm/readable")
        attempt("uid1000 read group file (no group)", read, "perm/grp")
        attempt("uid1000 exec-only read", read, "perm/x")
        for name in ("perm/secret", "perm/readable", "perm/home", "perm/x"):
            flags = "".join(c for c, m in (("r", os.R_OK), ("w", os.W_OK), ("x", os.X_OK))
                            if os.access(name, m))
            out(f"uid1000 access {name}", flags or "-")
        out("uid1000 access missing", os.access("perm/none", os.F_OK))
    as_user(U1, G1, user)

    def member() -> None:
        attempt("uid1001+grp4321 read group file", read, "perm/grp")
        attempt("uid1001+grp4321 write group file", write, "perm/grp", b"G", os.O_WRONLY)
        attempt("uid1001 read uid1000 file", read, "perm/home/mine")
        attempt("uid1001 create in uid1000 dir", write, "perm/home/other", b"")
    as_user(U2, G2, member, groups=(4321,))
    out("group file after", read("perm/grp"))
    out("root access secret", os.access("perm/secret", os.R_OK | os.W_OK))
    out("root access x of 0600", os.access("perm/secret", os.X_OK))
    out("root access x of 0711", os.access("perm/x", os.X_OK))
    out("root read 0000 file", (os.chmod("perm/secret", 0), read("perm/secret"))[1])


def sticky_setgid() -> None:
    os.mkdir("sticky")
    os.chmod("sticky", 0o1777)
    out("sticky mode", mode("sticky"))
    write("sticky/rootfile", b"")
    os.chmod("sticky/rootfile", 0o666)

    def u1() -> None:
        write("sticky/u1file", b"")
        attempt("sticky uid1000 unlink root file", os.unlink, "sticky/rootfile")
        attempt("sticky uid1000 rename root file", os.rename, "sticky/rootfile", "sticky/r2")
        attempt("sticky uid1000 write root 0666 file", write, "sticky/rootfile", b"x", os.O_WRONLY)
    as_user(U1, G1, u1)

    def u2() -> None:
        attempt("sticky uid1001 unlink uid1000 file", os.unlink, "sticky/u1file")
    as_user(U2, G2, u2)

    def u1b() -> None:
        attempt("sticky owner unlink own file", os.unlink, "sticky/u1file")
    as_user(U1, G1, u1b)
    os.mkdir("sgid")
    os.chown("sgid", 0, 1234)
    os.chmod("sgid", 0o2775)
    out("setgid dir mode", mode("sgid"))
    write("sgid/f", b"")
    out("setgid dir file group", owner("sgid/f"))
    os.mkdir("sgid/d")
    out("setgid dir subdir", f"{owner('sgid/d')} {mode('sgid/d')}")
    os.chmod("sgid", 0o2777)

    def u1c() -> None:
        write("sgid/uf", b"", perm=0o2755)
        out("setgid dir uid1000 file", f"{owner('sgid/uf')} {mode('sgid/uf')}")
        os.mkdir("sgid/ud", 0o755)
        out("setgid dir uid1000 subdir", f"{owner('sgid/ud')} {mode('sgid/ud')}")
    as_user(U1, G1, u1c)


def locks() -> None:
    write("lk", b"0123456789")
    rd, wr = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        # the other process: hold flock EX and a POSIX write lock on [0, 5)
        fd = os.open("lk", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_EX, 5, 0)
        os.write(wr, b"1")
        os.read(go_r, 1)  # wait for "release"
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.lockf(fd, fcntl.LOCK_UN, 5, 0)
        os.write(wr, b"2")
        os.read(go_r, 1)
        os.close(fd)
        os._exit(0)
    os.read(rd, 1)
    fd = os.open("lk", os.O_RDWR)
    attempt("flock EX|NB while held", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    attempt("flock SH|NB while held", fcntl.flock, fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    attempt("lockf overlapping while held", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)
    attempt("lockf disjoint while held", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 5)
    import struct
    req = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    got = fcntl.fcntl(fd, fcntl.F_GETLK, req)
    typ, _, start, length, lpid = struct.unpack("hhqqi", got)
    who = "holder" if lpid == pid else lpid if lpid in (0, -1) else "other"
    out("F_GETLK conflict", f"type={'WR' if typ == fcntl.F_WRLCK else typ} start={start} len={length} "
        f"pid={who}")
    os.write(go_w, b"r")
    os.read(rd, 1)
    attempt("flock EX|NB after release", fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    attempt("lockf after release", fcntl.lockf, fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 0)
    req = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    typ = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, req))[0]
    out("F_GETLK own lock", "UNLCK" if typ == fcntl.F_UNLCK else typ)
    os.write(go_w, b"x")
    os.waitpid(pid, 0)
    os.close(fd)
    for p in (rd, wr, go_r, go_w):
        os.close(p)


def readdir_types() -> None:
    os.mkdir("types")
    write("types/file", b"")
    os.mkdir("types/dir")
    os.symlink("file", "types/link")
    os.mkfifo("types/fifo")
    with os.scandir("types") as it:
        kinds = sorted(
            (e.name, "l" if e.is_symlink() else "d" if e.is_dir(follow_symlinks=False)
             else "f" if e.is_file(follow_symlinks=False) else "o")
            for e in it)
    out("readdir types", kinds)
    out("readdir dot entries", sorted(n for n in os.listdir("types")) == ["dir", "fifo", "file", "link"])
    # readdir while deleting
    os.mkdir("rdel")
    for i in range(200):
        write(f"rdel/f{i}", b"")
    seen = 0
    with os.scandir("rdel") as it:
        for e in it:
            os.unlink(e.path)
            seen += 1
    out("readdir+unlink", f"{seen} left={len(os.listdir('rdel'))}")
    os.rmdir("rdel")
    out("rmdir after", os.path.exists("rdel"))


def killpriv() -> None:
    """suid/sgid bits dropped by writes, truncates and chmods of unprivileged
    callers, kept for root (CAP_FSETID)."""
    os.mkdir("kp", 0o777)
    os.chmod("kp", 0o777)
    for name, m in (("kp/a", 0o6777), ("kp/b", 0o4755), ("kp/c", 0o4755), ("kp/d", 0o644),
                    ("kp/e", 0o6777)):
        write(name, b"x")
        os.chown(name, U1, G1)
        os.chmod(name, m)
    os.chown("kp/d", U1, 4321)

    def other() -> None:
        write("kp/a", b"y", os.O_WRONLY)
        out("uid1001 write to uid1000 06777 file", mode("kp/a"))
        os.truncate("kp/e", 0)
        out("uid1001 truncate uid1000 06777 file", mode("kp/e"))
    as_user(U2, G2, other)

    def owner_() -> None:
        os.truncate("kp/b", 0)
        out("uid1000 truncate own 04755 file", mode("kp/b"))
        attempt("uid1000 chmod 02755 file of foreign group", os.chmod, "kp/d", 0o2755)
        out("uid1000 chmod 02755 file of foreign group mode", mode("kp/d"))
    as_user(U1, G1, owner_)
    write("kp/c", b"root", os.O_WRONLY)
    out("root write to uid1000 04755 file", mode("kp/c"))
    os.truncate("kp/c", 0)
    out("root truncate uid1000 04755 file", mode("kp/c"))


def main() -> int:
    global MOUNT
    mnt = MOUNT = sys.argv[1]
    os.umask(0o022)
    os.chmod(mnt, 0o755)
    work = os.path.join(mnt, "posix")
    os.mkdir(work)
    os.chmod(work, 0o777)
    os.chdir(work)
    t = Timer()
    sections = [basics, open_flags, renames, links, names, unlinked_open, sparse, mapped,
                specials, xattrs, permissions, sticky_setgid, killpriv, locks, readdir_types, many]
    only = set(sys.argv[2:])
    for section in sections:
        if only and section.__name__ not in only:
            continue
        print(f"[{section.__name__}]", flush=True)
        try:
            section()
        except Exception as exc:  # noqa: BLE001 - a crash is a transcript line too
            out(f"{section.__name__} CRASHED", f"{type(exc).__name__}: "
                f"{ename(exc) if isinstance(exc, OSError) else exc}")
        t.lap(section.__name__)
    print("END", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
