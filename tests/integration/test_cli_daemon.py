"""The daemon command as a real process: ``python -m virtiofs_async ...``
started as a subprocess in each sandbox mode and driven through its socket
by the testing frontend + FUSE client (asyncio).

Two kinds of tests:

- with the passthrough backend (``virtiofs_async.backends.passthrough``):
  exactly the shipped command; skipped while that backend is absent;
- with a tiny path-based stand-in backend, started through
  ``virtiofs_async.cli.main(backend_factory=...)``: the process setup
  (sandbox, capabilities, /proc/self/fd kept across pivot_root, exit
  status, signals, socket and pid file, kata's and libvirt's command lines)
  does not depend on which backend serves.

Needs root (namespaces, chroot, capabilities), as virtiofsd does.
"""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

from virtiofs_async import FuseError, cli
from virtiofs_async.abi import fuse as abi
from virtiofs_async.runtime import get_runtime
from virtiofs_async.testing import FuseClient

ROOT = abi.FUSE_ROOT_ID
import virtiofs_async

# Subprocesses import the same build the tests import (site-packages in CI).
SRC = str(Path(virtiofs_async.__file__).resolve().parents[1])
MODES = ["namespace", "chroot", "none"]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the daemon's sandbox needs root")

# Bits of CAP_CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD, SETFCAP.
DEFAULT_CAPS = sum(1 << n for n in (0, 1, 3, 4, 6, 7, 27, 31))

STAND_IN = r'''
"""A stand-in backend for the CLI tests (not shipped): paths relative to a
root fd, files re-opened through the kept /proc/self/fd, as a passthrough
backend does. Built before the sandbox switches root: only fds are used later."""
import json, os, sys
from virtiofs_async import EntryAttributes, FileInfo, FuseError, Operations
from virtiofs_async.cli import main


class StandInFS(Operations):
    def __init__(self, root, *, proc_self_fd=None, **options):
        self.root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY)
        self.proc_fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY)  # by path, like PassthroughFS
        self.given_proc_fd = proc_self_fd
        self.paths = {1: "."}
        self.handles = {}
        # What an fd of /proc/self/fd reaches above itself.
        up = os.open("..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.proc_fd)
        upup = os.open("../..", os.O_RDONLY | os.O_DIRECTORY, dir_fd=self.proc_fd)
        above = [sorted(os.listdir(up))[:5], sorted(os.listdir(upup))[:5]]
        os.close(up)
        os.close(upup)
        print("STAND-IN " + json.dumps({"root": root, "proc_self_fd": proc_self_fd is not None,
                                        "options": options, "above_proc_fd": above}), file=sys.stderr, flush=True)

    def _entry(self, rel):
        st = os.lstat(rel, dir_fd=self.root_fd)
        ino = 1 if rel == "." else st.st_ino + 1
        self.paths[ino] = rel
        return EntryAttributes(st_ino=ino, st_mode=st.st_mode, st_nlink=st.st_nlink, st_size=st.st_size,
                               st_uid=st.st_uid, st_gid=st.st_gid, st_mtime_ns=st.st_mtime_ns)

    async def lookup(self, parent, name, ctx):
        if name in (b".", b".."):
            raise FuseError(22)
        try:
            return self._entry(os.path.join(self.paths[parent], os.fsdecode(name)))
        except OSError as exc:
            raise FuseError(exc.errno)

    async def getattr(self, inode, ctx, fh=None):
        return self._entry(self.paths[inode])

    async def readlink(self, inode, ctx):
        return os.fsencode(os.readlink(self.paths[inode], dir_fd=self.root_fd))

    async def open(self, inode, flags, ctx):
        opath = os.open(self.paths[inode], os.O_PATH | os.O_NOFOLLOW, dir_fd=self.root_fd)
        try:
            # Both /proc fds must work after the root switch.
            for proc in (self.proc_fd, self.given_proc_fd):
                fd = os.open(str(opath), flags & (os.O_ACCMODE | os.O_APPEND), dir_fd=proc)
                if proc == self.proc_fd:
                    os.close(fd)
        finally:
            os.close(opath)
        self.handles[fd] = fd
        return FileInfo(fh=fd)

    async def create(self, parent, name, mode, flags, ctx):
        rel = os.path.join(self.paths[parent], os.fsdecode(name))
        fd = os.open(rel, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, mode, dir_fd=self.root_fd)
        self.handles[fd] = fd
        return FileInfo(fh=fd), self._entry(rel)

    async def read(self, fh, offset, size):
        return os.pread(fh, size, offset)

    async def write(self, fh, offset, data, ctx):
        return os.pwrite(fh, b"".join(bytes(d) for d in data), offset)

    async def release(self, fh):
        os.close(self.handles.pop(fh))


sys.exit(main(backend_factory=StandInFS))
'''


# -- helpers ------------------------------------------------------------------------------


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = SRC + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "stand_in_daemon.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


@pytest.fixture
def passthrough_cmd() -> list[str]:
    pytest.importorskip("virtiofs_async.backends.passthrough", reason="passthrough backend not present")
    return [sys.executable, "-m", "virtiofs_async"]


@pytest.fixture
def share(short_tmp: str) -> Path:
    d = Path(short_tmp) / "share"
    d.mkdir()
    (d / "marker").write_text("inside the share\n")
    os.symlink("/etc/passwd", d / "escape")
    return d


@pytest.fixture
def sock(short_tmp: str) -> str:
    return os.path.join(short_tmp, "vfs.sock")


class Daemon:
    """The daemon as a subprocess; its stderr is collected by a thread."""

    READY = "INFO transport: waiting for a vhost-user frontend"

    def __init__(self, argv: list[str], *, extra_env: dict[str, str] | None = None, **popen: Any) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(argv, env={**env(), **(extra_env or {})}, stderr=subprocess.PIPE,
                                     text=True, **popen)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the daemon logs that it waits for a frontend (sandbox
        entered, capabilities dropped, backend built)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(self.READY in line for line in list(self.lines)):
                return
            if self.proc.poll() is not None:
                self._reader.join(5)
                pytest.fail(f"the daemon exited with {self.proc.returncode} before serving:\n{self.stderr()}")
            time.sleep(0.02)
        self.kill()
        pytest.fail(f"the daemon was not ready after {timeout} s:\n{self.stderr()}")

    def serving_pid(self) -> int:
        """The process that serves: the child in the pid namespace, if
        there is one, else the daemon itself."""
        children = _children(self.proc.pid)
        return children[0] if children else self.proc.pid

    def wait(self, timeout: float = 20.0) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the daemon did not exit within {timeout} s:\n{self.stderr()}")
        self._reader.join(5)
        return code

    def stderr(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def status_field(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise KeyError(name)


def run_client(
    sock: str, body: Callable[[FuseClient], Awaitable[Any]], daemon: "Daemon | None" = None, timeout: float = 30.0
) -> Any:
    """``await body(client)`` on a fresh asyncio loop; fails the test after
    ``timeout`` s (with the daemon's log so far)."""
    rt = get_runtime("asyncio")
    outcome: dict[str, Any] = {}

    async def main() -> None:
        async with rt.move_on_after(timeout):
            async with FuseClient.connect(sock) as client:
                outcome["value"] = await body(client)

    rt.run(main)
    if "value" not in outcome:
        log = daemon.stderr() if daemon is not None else ""
        pytest.fail(f"the client got no answer from the daemon within {timeout} s:\n{log}")
    return outcome["value"]


async def create_write_read(client: FuseClient, name: bytes, data: bytes) -> bytes:
    made = await client.create(ROOT, name, 0o640)
    assert await client.write(made.entry.nodeid, made.open.fh, 0, data) == len(data)
    await client.release(made.entry.nodeid, made.open.fh)
    entry = await client.lookup(ROOT, name)
    assert entry.nodeid == made.entry.nodeid and entry.attr.size == len(data)
    fh = (await client.open(entry.nodeid, os.O_RDONLY)).fh
    back = await client.read(entry.nodeid, fh, 0, 4096)
    await client.release(entry.nodeid, fh)
    return back


def check_confinement(daemon: Daemon, mode: str, share: Path) -> None:
    """From the host: the serving process's root is the share (namespace,
    chroot) or the host's (none); namespaces and capabilities as promised."""
    pid = daemon.serving_pid()
    marker = Path(f"/proc/{pid}/root/marker")
    host_passwd = Path(f"/proc/{pid}/root/etc/passwd")
    if mode == "none":
        assert host_passwd.exists() and not marker.exists()
        assert pid == daemon.proc.pid
    else:
        assert marker.read_text() == "inside the share\n"
        assert os.stat(marker).st_ino == os.stat(share / "marker").st_ino
        assert not host_passwd.exists(), "the sandboxed daemon can see the host's /etc/passwd"
    if mode == "namespace":
        assert pid != daemon.proc.pid  # the supervisor stays outside
        assert status_field(pid, "NSpid").split() == [str(pid), "1"]
        for ns in ("mnt", "pid", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        # The supervisor keeps the host's view.
        assert os.readlink(f"/proc/{daemon.proc.pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    else:
        assert os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink("/proc/self/ns/mnt")
    assert int(status_field(pid, "CapEff"), 16) == DEFAULT_CAPS
    assert int(status_field(pid, "CapPrm"), 16) == DEFAULT_CAPS
    assert int(status_field(pid, "CapBnd"), 16) == DEFAULT_CAPS
    assert status_field(pid, "NoNewPrivs") == "1"
    # The fd table was sized before serving, in the process that serves.
    assert int(status_field(pid, "FDSize")) >= cli.FD_TABLE_RESERVE


def log_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- with the stand-in backend --------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_each_sandbox_serves_confined_and_exits_zero(stand_in, share, sock, mode) -> None:  # type: ignore[no-untyped-def]
    daemon = Daemon(stand_in + ["--socket-path", sock, "--shared-dir", str(share), f"--sandbox={mode}",
                                "--seccomp=none", "--log-level=debug"])
    try:
        daemon.wait_ready()
        assert int(Path(sock + ".pid").read_text()) == daemon.proc.pid
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o700
        check_confinement(daemon, mode, share)

        async def body(client: FuseClient) -> tuple[bytes, int, bytes]:
            back = await create_write_read(client, b"hello.txt", b"written by the guest\n")
            link = await client.lookup(ROOT, b"escape")
            return back, link.attr.mode, await client.readlink(link.nodeid)

        back, link_mode, target = run_client(sock, body, daemon)
        assert back == b"written by the guest\n"
        assert (share / "hello.txt").read_bytes() == b"written by the guest\n"
        assert stat.S_IMODE((share / "hello.txt").stat().st_mode) == 0o640
        # The symlink is served as a symlink, never as the host file it names.
        assert stat.S_ISLNK(link_mode) and target == b"/etc/passwd"
        assert daemon.wait() == 0, daemon.stderr()
    finally:
        daemon.kill()
    err = daemon.stderr()
    starts = [json.loads(line.split("STAND-IN ", 1)[1]) for line in err.splitlines() if "STAND-IN " in line]
    # Built before the root switch: the host path.
    assert starts and starts[0]["root"] == str(share)
    assert starts[0]["proc_self_fd"] is True
    if mode == "namespace":
        # /proc is a tmpfs holding only self/fd and self/fdinfo: nothing else
        # of procfs is reachable.
        assert starts[0]["above_proc_fd"] == [["fd", "fdinfo"], ["self"]]
    else:
        assert starts[0]["above_proc_fd"] != [["fd", "fdinfo"], ["self"]]  # the host's procfs
    assert starts[0]["options"] == {
        "cache": "auto", "xattr": False, "posix_acl": False, "readonly": False, "writeback": False,
        "allow_direct_io": False, "announce_submounts": True, "inode_file_handles": "never",
    }
    # Every log line carries the prefix (the stand-in's own print aside).
    for line in log_lines(err):
        assert line.startswith("virtiofs-async: ") or line.startswith("STAND-IN "), line
    assert re.search(r"DEBUG session: request CreateRequest\(", err)  # --log-level debug: requests decoded
    assert "frontend gone: exiting" in err
    if mode == "chroot":
        # Inside a chroot the host paths are out of reach: left for the next start.
        assert os.path.exists(sock)
    else:
        assert not os.path.exists(sock) and not os.path.exists(sock + ".pid")


def test_a_second_daemon_on_the_same_socket_is_refused(stand_in, share, sock) -> None:  # type: ignore[no-untyped-def]
    first = Daemon(stand_in + ["--socket-path", sock, "--shared-dir", str(share)])
    try:
        first.wait_ready()
        second = Daemon(stand_in + ["--socket-path", sock, "--shared-dir", str(share)])
        assert second.wait() == 1
        assert f"another daemon (pid {first.proc.pid}) serves {sock}" in second.stderr()
        # The first one still serves.
        assert run_client(sock, lambda c: create_write_read(c, b"f", b"still here"), first) == b"still here"
        assert first.wait() == 0
    finally:
        first.kill()


@pytest.mark.parametrize("mode", ["namespace", "none"])
def test_sigterm_stops_the_daemon_with_status_1_and_cleans_up(stand_in, share, sock, mode) -> None:  # type: ignore[no-untyped-def]
    daemon = Daemon(stand_in + ["--socket-path", sock, "--shared-dir", str(share), "--sandbox", mode])
    try:
        daemon.wait_ready()
        time.sleep(0.1)  # the supervisor installs its forwarders right after the fork
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait() == 1
    finally:
        daemon.kill()
    assert "SIGTERM received: exiting" in daemon.stderr()
    assert not os.path.exists(sock) and not os.path.exists(sock + ".pid")
    if mode == "namespace":
        assert not _children(daemon.proc.pid)


def test_kata_command_line_with_an_inherited_socket(stand_in, share, short_tmp) -> None:  # type: ignore[no-untyped-def]
    """kata-containers' runtime (virtiofsd.go): --syslog --cache=auto
    --shared-dir=DIR --fd=N, then its default extra args. Without /dev/log
    here, --syslog says so and logs to stderr."""
    path = os.path.join(short_tmp, "kata.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    argv = stand_in + ["--syslog", "--cache=auto", f"--shared-dir={share}", f"--fd={fd}",
                       "--thread-pool-size=1", "--announce-submounts"]
    daemon = Daemon(argv, pass_fds=[fd])
    listener.close()
    try:
        # The socket listens already: the frontend may connect before the
        # daemon is up, as QEMU does.
        back = run_client(path, lambda c: create_write_read(c, b"kata", b"from kata"), daemon)
        assert back == b"from kata"
        assert daemon.wait() == 0, daemon.stderr()
    finally:
        daemon.kill()
    err = daemon.stderr()
    if not os.path.exists("/dev/log"):
        assert "--syslog: /dev/log is not available" in err
    # --fd: the daemon does not own the path; it leaves it.
    assert os.path.exists(path)


def test_libvirt_c_style_command_line(stand_in, share, short_tmp) -> None:  # type: ignore[no-untyped-def]
    """libvirt without "separate-options": --fd=N -o source=DIR,cache=...,
    sandbox=...,xattr,flock,posix_lock --thread-pool-size=N -d; a comma in
    the directory is doubled (libvirt's escape)."""
    odd = Path(short_tmp) / "a,b"
    share.rename(odd)
    path = os.path.join(short_tmp, "lv.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    fd = listener.fileno()
    source = str(odd).replace(",", ",,")
    argv = stand_in + [f"--fd={fd}", "-o", f"source={source},cache=always,sandbox=chroot,xattr,flock,posix_lock",
                       "--thread-pool-size=16", "-d"]
    daemon = Daemon(argv, pass_fds=[fd])
    listener.close()
    try:
        back = run_client(path, lambda c: create_write_read(c, b"lv", b"from libvirt"), daemon)
        assert back == b"from libvirt"
        assert daemon.wait() == 0
    finally:
        daemon.kill()
    assert (odd / "lv").read_bytes() == b"from libvirt"
    err = daemon.stderr()
    start = json.loads(err.split("STAND-IN ", 1)[1].splitlines()[0])
    assert start["root"] == str(odd) and start["options"]["cache"] == "always" and start["options"]["xattr"] is True
    assert "DEBUG session: request" in err  # -d


def test_daemonize_returns_once_serving(stand_in, share, sock) -> None:  # type: ignore[no-untyped-def]
    front = subprocess.run(
        stand_in + ["--socket-path", sock, "--shared-dir", str(share), "--daemonize", "--sandbox=none"],
        env=env(), capture_output=True, text=True, timeout=30,
    )
    assert front.returncode == 0, front.stderr
    pid = int(Path(sock + ".pid").read_text())
    assert pid != os.getpid() and os.path.exists(f"/proc/{pid}")
    assert status_field(pid, "State")[0] in "SR"
    back = run_client(sock, lambda c: create_write_read(c, b"bg", b"daemonized"))
    assert back == b"daemonized"
    for _ in range(300):
        try:
            if status_field(pid, "State").startswith("Z"):
                break
        except OSError:  # gone (reaped)
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the daemonized daemon did not exit after the frontend left")
    assert not os.path.exists(sock)


def test_start_up_failures_exit_1_with_one_clear_line(stand_in, short_tmp, sock) -> None:  # type: ignore[no-untyped-def]
    missing = os.path.join(short_tmp, "nope")
    proc = subprocess.run(stand_in + ["--socket-path", sock, "--shared-dir", missing],
                          env=env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert re.search(r"^virtiofs-async: .* ERROR cli: shared directory .*nope: No such file or directory$",
                     proc.stderr, re.M), proc.stderr
    assert not os.path.exists(sock)
    no_dir = os.path.join(short_tmp, "no", "dir", "s.sock")
    proc = subprocess.run(stand_in + ["--socket-path", no_dir, "--shared-dir", short_tmp],
                          env=env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "does not exist" in proc.stderr


def test_command_line_errors_and_information_through_python_m(sock, share) -> None:  # type: ignore[no-untyped-def]
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "virtiofs_async", *args], env=env(),
                              capture_output=True, text=True, timeout=30)

    caps = run("--print-capabilities")
    assert caps.returncode == 0 and json.loads(caps.stdout) == {"type": "fs", "features": ["separate-options"]}
    bad = run("--socket-path", sock, "--shared-dir", str(share), "--no-such-thing")
    assert bad.returncode == 2 and "unknown option '--no-such-thing'" in bad.stderr and bad.stdout == ""
    assert not os.path.exists(sock)
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("virtiofs-async ")
    assert run("-h").returncode == 0


# -- with the passthrough backend -------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_passthrough_daemon_in_each_sandbox(passthrough_cmd, share, sock, mode) -> None:  # type: ignore[no-untyped-def]
    daemon = Daemon(passthrough_cmd + ["--socket-path", sock, "--shared-dir", str(share), "--sandbox", mode])
    try:
        daemon.wait_ready()
        check_confinement(daemon, mode, share)

        async def body(client: FuseClient) -> tuple[bytes, int, bytes, bytes]:
            back = await create_write_read(client, b"hello.txt", b"passthrough\n")
            link = await client.lookup(ROOT, b"escape")
            target = await client.readlink(link.nodeid)
            # Opening the symlink's inode must not open what it names.
            try:
                fh = (await client.open(link.nodeid, os.O_RDONLY)).fh
                leaked = await client.read(link.nodeid, fh, 0, 4096)
            except FuseError as exc:
                assert exc.errno in (errno.ELOOP, errno.EINVAL, errno.EACCES, errno.ENXIO, errno.EPERM)
                leaked = b""
            return back, link.attr.mode, target, leaked

        back, link_mode, target, leaked = run_client(sock, body, daemon)
        assert back == b"passthrough\n"
        assert (share / "hello.txt").read_bytes() == b"passthrough\n"
        assert stat.S_ISLNK(link_mode) and target == b"/etc/passwd"
        assert leaked != Path("/etc/passwd").read_bytes()
        assert daemon.wait() == 0, daemon.stderr()
    finally:
        daemon.kill()
    if mode != "chroot":
        assert not os.path.exists(sock)


def test_passthrough_c_style_readonly(passthrough_cmd, share, sock) -> None:  # type: ignore[no-untyped-def]
    """QEMU 7.2 C virtiofsd spellings with the Rust --readonly: reads work,
    every change is refused with EROFS, the host tree is untouched."""
    daemon = Daemon(passthrough_cmd + [f"--socket-path={sock}", "-o", f"source={share},cache=none,no_xattr",
                                       "--readonly", "--sandbox=chroot"])
    try:
        daemon.wait_ready()

        async def body(client: FuseClient) -> tuple[bytes, int]:
            entry = await client.lookup(ROOT, b"marker")
            fh = (await client.open(entry.nodeid, os.O_RDONLY)).fh
            data = await client.read(entry.nodeid, fh, 0, 4096)
            await client.release(entry.nodeid, fh)
            try:
                await client.create(ROOT, b"new", 0o644)
                code = 0
            except FuseError as exc:
                code = exc.errno
            return data, code

        data, code = run_client(sock, body, daemon)
        assert data == b"inside the share\n" and code == errno.EROFS
        assert not (share / "new").exists()
        assert daemon.wait() == 0
    finally:
        daemon.kill()


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_passthrough_xattrs_inside_the_sandbox(passthrough_cmd, share, sock, mode) -> None:  # type: ignore[no-untyped-def]
    """xattrs reach the inode through the /proc/self/fd the backend opened
    before the root switch (the path /proc/self/fd/N no longer exists)."""
    (share / "dir").mkdir()
    daemon = Daemon(passthrough_cmd + ["--socket-path", sock, "--shared-dir", str(share), "--xattr",
                                       f"--sandbox={mode}"])
    try:
        daemon.wait_ready()

        async def body(client: FuseClient) -> list[bytes | int]:
            got = []
            for name in (b"marker", b"dir"):
                entry = await client.lookup(ROOT, name)
                await client.setxattr(entry.nodeid, b"user.cli", b"yes-" + name)
                got.append(await client.getxattr(entry.nodeid, b"user.cli", 64))
            return got

        assert run_client(sock, body, daemon) == [b"yes-marker", b"yes-dir"]
        assert os.getxattr(share / "marker", "user.cli") == b"yes-marker"
        assert os.getxattr(share / "dir", "user.cli") == b"yes-dir"
        assert daemon.wait() == 0
    finally:
        daemon.kill()


UNPRIVILEGED = r'''
"""Start the daemon as an unprivileged user (tests only): import everything
while the interpreter's files are readable, then give up root."""
import ctypes, os, sys
sys.argv[0] = sys.argv.pop(1)  # the stand-in script
source = open(sys.argv[0]).read()
from virtiofs_async import cli
cli.preload(cli.parse_args(sys.argv[1:]))
uid = int(os.environ["VFA_TEST_UID"])
os.setgroups([])
os.setresgid(uid, uid, uid)
os.setresuid(uid, uid, uid)
ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE, as after a real exec by that user
exec(compile(source, sys.argv[0], "exec"))
'''


def _unprivileged_userns_possible(uid: int) -> bool:
    code = ("import ctypes, os; os.setgroups([]); os.setresgid({0},{0},{0}); os.setresuid({0},{0},{0});"
            "raise SystemExit(ctypes.CDLL(None, use_errno=True).unshare(0x10000000))").format(uid)
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_unprivileged_namespace_sandbox_uses_a_user_namespace(stand_in, tmp_path, short_tmp) -> None:  # type: ignore[no-untyped-def]
    uid = 65534
    if not _unprivileged_userns_possible(uid):
        pytest.skip("unprivileged user namespaces are disabled on this host")
    base = Path(short_tmp) / "nobody"
    share = base / "share"
    share.mkdir(parents=True)
    (share / "marker").write_text("inside the share\n")
    for p in (base, share, share / "marker"):
        os.chown(p, uid, uid)
    os.chmod(short_tmp, 0o755)
    sock = str(base / "s.sock")
    wrapper = tmp_path / "unprivileged.py"
    wrapper.write_text(UNPRIVILEGED)
    argv = [sys.executable, str(wrapper), stand_in[1], "--socket-path", sock, "--shared-dir", str(share)]
    daemon = Daemon(argv, extra_env={"VFA_TEST_UID": str(uid)})
    try:
        daemon.wait_ready()
        pid = daemon.serving_pid()
        assert pid != daemon.proc.pid
        assert Path(f"/proc/{pid}/root/marker").read_text() == "inside the share\n"
        assert not Path(f"/proc/{pid}/root/etc/passwd").exists()
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == [str(uid), str(uid), "1"]
        assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
        assert run_client(sock, lambda c: create_write_read(c, b"u", b"unprivileged"), daemon) == b"unprivileged"
        assert daemon.wait() == 0, daemon.stderr()
    finally:
        daemon.kill()
    made = share / "u"
    assert made.read_bytes() == b"unprivileged" and made.stat().st_uid == uid
    assert not os.path.exists(sock)


@pytest.mark.parametrize("runtime", ["asyncio", "uvloop", "trio"])
def test_every_runtime_works_inside_the_sandbox(stand_in, share, sock, runtime) -> None:  # type: ignore[no-untyped-def]
    """Nothing is imported lazily once the share is '/' (the Python
    installation is out of reach there)."""
    pytest.importorskip(runtime if runtime != "asyncio" else "asyncio")
    daemon = Daemon(stand_in + ["--socket-path", sock, "--shared-dir", str(share), "--runtime", runtime,
                                "--thread-pool-size=2"])
    try:
        daemon.wait_ready()
        assert run_client(sock, lambda c: create_write_read(c, b"rt", runtime.encode()), daemon) == runtime.encode()
        assert daemon.wait() == 0, daemon.stderr()
    finally:
        daemon.kill()
    assert "Traceback" not in daemon.stderr() and "ERROR" not in daemon.stderr()
