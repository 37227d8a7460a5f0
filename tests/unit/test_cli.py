"""The daemon's command line (``virtiofs_async.cli``) and the pure parts of
``virtiofs_async.sandbox``: every option in its Rust virtiofsd and QEMU C
virtiofsd spellings, the exact command lines kata-containers and libvirt
build, errors, informational outputs, logging, limits, the listening socket.
"""
from __future__ import annotations

import grp
import io
import json
import logging
import os
import resource
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virtiofs_async import cli, sandbox
from virtiofs_async.cli import DaemonError, Options, UsageError, parse_args, split_compat_options

import virtiofs_async

# Subprocesses import the same build the tests import (site-packages in CI).
SRC = str(Path(virtiofs_async.__file__).resolve().parents[1])
BASE = ["--socket-path", "/run/vfs.sock", "--shared-dir", "/srv/share"]


def parse(*args: str) -> Options:
    return parse_args(list(args))


def usage_error(*args: str) -> str:
    with pytest.raises(UsageError) as info:
        parse_args(list(args))
    return str(info.value)


# -- defaults and every Rust option ----------------------------------------------------------


def test_defaults_are_the_rust_daemons() -> None:
    o = parse(*BASE)
    assert (o.socket_path, o.shared_dir, o.fd) == ("/run/vfs.sock", "/srv/share", None)
    assert (o.cache, o.sandbox, o.seccomp, o.inode_file_handles, o.log_level) == (
        "auto", "namespace", "kill", "never", "info")
    assert o.announce_submounts is True
    assert not (o.readonly or o.xattr or o.posix_acl or o.writeback or o.allow_direct_io or o.syslog)
    assert (o.readdirplus, o.killpriv_v2, o.posix_lock, o.flock) == (None, None, None, None)
    assert (o.thread_pool_size, o.rlimit_nofile, o.socket_group, o.modcaps, o.tag) == (None, None, None, None, None)
    assert o.runtime == "auto" and o.notes == []


def test_every_rust_option_separate_values() -> None:
    o = parse(
        "--socket-path", "/s", "--shared-dir", "/d", "--cache", "never", "--sandbox", "chroot",
        "--seccomp", "none", "--readonly", "--xattr", "--posix-acl", "--thread-pool-size", "4",
        "--socket-group", "kvm", "--log-level", "debug", "--syslog", "--no-announce-submounts",
        "--inode-file-handles", "mandatory", "--writeback", "--allow-direct-io", "--rlimit-nofile", "4096",
        "--no-readdirplus", "--killpriv-v2", "--allow-mmap", "--preserve-noatime", "--modcaps", "+sys_admin:-mknod",
        "--tag", "myfs", "--runtime", "trio",
    )
    assert (o.socket_path, o.shared_dir, o.cache, o.sandbox, o.seccomp) == ("/s", "/d", "never", "chroot", "none")
    assert o.readonly and o.xattr and o.posix_acl and o.writeback and o.allow_direct_io and o.syslog
    assert (o.thread_pool_size, o.socket_group, o.log_level, o.rlimit_nofile) == (4, "kvm", "debug", 4096)
    assert o.announce_submounts is False and o.inode_file_handles == "mandatory"
    assert (o.readdirplus, o.killpriv_v2, o.allow_mmap, o.preserve_noatime) == (False, True, True, True)
    assert (o.modcaps, o.tag, o.runtime) == ("+sys_admin:-mknod", "myfs", "trio")


def test_every_rust_option_equals_values() -> None:
    o = parse(
        "--socket-path=/s", "--shared-dir=/d=x", "--cache=metadata", "--sandbox=none", "--seccomp=log",
        "--thread-pool-size=0", "--log-level=trace", "--inode-file-handles=prefer", "--rlimit-nofile=0")
    assert (o.socket_path, o.shared_dir, o.cache, o.sandbox, o.seccomp) == ("/s", "/d=x", "metadata", "none", "log")
    assert (o.thread_pool_size, o.log_level, o.inode_file_handles, o.rlimit_nofile) == (0, "trace", "prefer", 0)


@pytest.mark.parametrize("spelling, expected", [
    ("never", "never"), ("none", "never"), ("metadata", "metadata"), ("auto", "auto"), ("always", "always"),
    ("NEVER", "never"),
])
def test_cache_spellings(spelling: str, expected: str) -> None:
    assert parse(*BASE, f"--cache={spelling}").cache == expected
    assert parse(*BASE, "-o", f"cache={spelling}").cache == expected


@pytest.mark.parametrize("level, expected", [
    ("error", "error"), ("err", "error"), ("warn", "warn"), ("warning", "warn"), ("info", "info"),
    ("debug", "debug"), ("trace", "trace"), ("off", "off"),
])
def test_log_levels_in_every_spelling(level: str, expected: str) -> None:
    assert parse(*BASE, "--log-level", level).log_level == expected
    assert parse(*BASE, "-o", f"log_level={level}").log_level == expected
    assert parse(*BASE, "-o", f"loglevel={level}").log_level == expected  # the Rust compat spelling


def test_posix_acl_implies_xattr() -> None:
    assert parse(*BASE, "--posix-acl").xattr_enabled
    assert parse(*BASE, "-o", "posix_acl").xattr_enabled
    assert not parse(*BASE).xattr_enabled


def test_deprecated_spellings_work_and_are_noted() -> None:
    o = parse("--socket", "/old.sock", "--shared-dir", "/d", "--inode-file-handles=fallback", "-f", "-d")
    assert o.socket_path == "/old.sock" and o.inode_file_handles == "prefer" and o.log_level == "debug"
    notes = " ".join(o.notes)
    assert "--socket is deprecated" in notes and "fallback is deprecated" in notes
    assert "-d is deprecated" in notes and "-f has no effect" in notes
    o = parse("--fd", "3", "-o", "source=/d", "--foreground")
    assert any("--foreground has no effect" in n for n in o.notes)
    o = parse("-o", "vhost_user_socket=/c.sock,source=/d")
    assert o.socket_path == "/c.sock"


def test_short_option_clusters() -> None:
    o = parse(*BASE, "-df")
    assert o.log_level == "debug" and any("-f" in n for n in o.notes)
    o = parse("--fd=3", "-fosource=/d,cache=always")
    assert o.shared_dir == "/d" and o.cache == "always"
    assert parse(*BASE, "-hV").show_help


def test_accepted_without_effect() -> None:
    o = parse(*BASE, "--migration-mode=file-handles", "--migration-on-error", "guest-error",
              "--migration-verify-handles", "--migration-confirm-paths", "-o", "timeout=5,max_idle_threads=10,norace,allow_root")
    text = " | ".join(o.notes)
    for what in ("--migration-mode", "--migration-on-error", "--migration-verify-handles",
                 "--migration-confirm-paths", "-o timeout", "-o max_idle_threads", "-o norace", "-o allow_root"):
        assert what in text


def test_last_value_wins_within_a_spelling_kind() -> None:
    o = parse(*BASE, "--cache=never", "--cache=always", "--xattr", "-o", "no_xattr", "--log-level=warn", "-d")
    # -o is applied after the long options (as the Rust daemon does).
    assert o.cache == "always" and o.xattr is False and o.log_level == "debug"


# -- -o, the C daemon's options -------------------------------------------------------------------


def test_every_c_option() -> None:
    o = parse("--socket-path=/s", "-o",
              "source=/d,cache=none,xattr,posix_acl,writeback,announce_submounts,allow_direct_io,"
              "sandbox=chroot,log_level=warn,flock,posix_lock,killpriv_v2,readdirplus,no_security_label,"
              "modcaps=-mknod")
    assert (o.shared_dir, o.cache, o.sandbox, o.log_level) == ("/d", "never", "chroot", "warn")
    assert o.xattr and o.posix_acl and o.writeback and o.announce_submounts and o.allow_direct_io
    assert (o.flock, o.posix_lock, o.killpriv_v2, o.readdirplus, o.modcaps) == (True, True, True, True, "-mknod")
    o = parse("--socket-path=/s", "-o", "source=/d", "-o", "no_xattr,no_posix_acl,no_writeback,no_allow_direct_io",
              "-o", "no_flock,no_posix_lock,no_killpriv_v2,no_readdirplus,no_announce_submounts,debug")
    assert not (o.xattr or o.posix_acl or o.writeback or o.allow_direct_io or o.announce_submounts)
    assert (o.flock, o.posix_lock, o.killpriv_v2, o.readdirplus, o.log_level) == (False, False, False, False, "debug")


def test_attached_o_value() -> None:
    o = parse("--fd=3", "-osource=/d,sandbox=namespace")
    assert o.shared_dir == "/d" and o.sandbox == "namespace"


@pytest.mark.parametrize("text, items", [
    ("a,b=c", ["a", "b=c"]),
    ("source=/x,,y,cache=none", ["source=/x,y", "cache=none"]),
    ("source=/x\\,y,xattr", ["source=/x,y", "xattr"]),
    ("source=/x\\\\,xattr", ["source=/x\\", "xattr"]),
    (",,,", [","]),
    ("a,,,b", ["a,", "b"]),
    ("", []),
    ("a,,", ["a,"]),
    ("a,", ["a"]),
])
def test_split_compat_options(text: str, items: list[str]) -> None:
    assert split_compat_options(text) == items


@given(st.lists(st.text(alphabet="ab=,\\/ x", min_size=1).filter(lambda t: not t.startswith(",")), min_size=1))
def test_split_compat_options_inverts_qemu_comma_escaping(items: list[str]) -> None:
    # QEMU/libvirt escape a comma by doubling it; a backslash is escaped too
    # so that "\," stays literal. (An item may not start with a comma: after
    # a separator it would read as ",,".)
    def escape(item: str) -> str:
        return item.replace("\\", "\\\\").replace(",", ",,")

    assert split_compat_options(",".join(escape(i) for i in items)) == items


# -- the command lines others build ---------------------------------------------------------------


def test_kata_go_runtime_command_line() -> None:
    # kata-containers src/runtime/virtcontainers/virtiofsd.go args(), then
    # configuration.toml's virtio_fs_extra_args (both generations).
    base = ["--syslog", "--cache=auto", "--shared-dir=/run/kata-containers/shared/sandboxes/abc/shared", "--fd=3"]
    for extra in (["--thread-pool-size=1", "--announce-submounts"], ["--thread-pool-size=1", "-o", "announce_submounts"]):
        o = parse(*base, "--inode-file-handles=prefer", *extra)
        assert o.syslog and o.cache == "auto" and o.fd == 3 and o.thread_pool_size == 1
        assert o.shared_dir == "/run/kata-containers/shared/sandboxes/abc/shared"
        assert o.inode_file_handles == "prefer" and o.announce_submounts
        assert o.socket_path is None and o.notes == []


def test_kata_tcg_style_extra_args() -> None:
    o = parse("--syslog", "--cache=never", "--shared-dir=/s", "--fd=3", "--thread-pool-size=1",
              "--announce-submounts", "--sandbox=none", "--seccomp=none", "--inode-file-handles=never")
    assert (o.sandbox, o.seccomp, o.cache) == ("none", "none", "never")


def test_libvirt_c_style_command_line() -> None:
    # libvirt qemuVirtioFSBuildCommandLine without "separate-options": a
    # comma in the path doubled by virQEMUBuildBufferEscapeComma.
    o = parse("--fd=23", "-o", "source=/var/lib/a,,b,cache=always,sandbox=chroot,xattr,flock,posix_lock",
              "--thread-pool-size=16", "--rlimit-nofile=2048", "-d")
    assert (o.fd, o.shared_dir, o.cache, o.sandbox) == (23, "/var/lib/a,b", "always", "chroot")
    assert o.xattr and o.flock and o.posix_lock and o.log_level == "debug"
    assert (o.thread_pool_size, o.rlimit_nofile) == (16, 2048)
    o = parse("--fd=23", "-o", "source=/x,cache=none,no_xattr,no_flock,no_posix_lock")
    assert o.cache == "never" and (o.xattr, o.flock, o.posix_lock) == (False, False, False)


def test_libvirt_separate_options_command_line() -> None:
    # libvirt with "separate-options" (which --print-capabilities announces).
    o = parse("--fd=23", "--shared-dir", "/var/lib/share", "--cache", "never", "--sandbox", "chroot", "--xattr",
              "--thread-pool-size=16", "--rlimit-nofile=4096", "--log-level", "debug")
    assert (o.fd, o.shared_dir, o.cache, o.sandbox, o.xattr) == (23, "/var/lib/share", "never", "chroot", True)
    assert (o.thread_pool_size, o.rlimit_nofile, o.log_level) == (16, 4096, "debug")


def test_common_wrapper_command_lines() -> None:
    # podman machine / coreos-assembler style.
    o = parse("--sandbox", "none", "--socket-path", "/tmp/s", "--shared-dir", ".", "--modcaps=-mknod:-setfcap",
              "--seccomp=none")
    assert o.shared_dir == "." and o.modcaps == "-mknod:-setfcap" and o.sandbox == "none"


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--bogus"], "unknown option '--bogus'"),
    (["--bogus=1"], "unknown option '--bogus'"),
    (["--sock", "/s"], "unknown option '--sock'"),  # no prefix abbreviations
    (["-z"], "unknown option '-z'"),
    (["-dz"], "unknown option '-z' (in '-dz')"),
    (["-o", "frobnicate"], "unknown -o option 'frobnicate'"),
    (["-o", "frob=1"], "unknown -o option 'frob=1'"),
    (["-o"], "option -o needs a value"),
    (["--cache"], "option --cache needs a value"),
    (["--xattr=yes"], "option --xattr takes no value"),
    (["--cache=sometimes"], "invalid value 'sometimes' for --cache (expected one of: never, metadata, auto, always)"),
    (["-o", "cache=sometimes"], "invalid value 'sometimes' for -o cache"),
    (["--sandbox=jail"], "invalid value 'jail' for --sandbox"),
    (["--seccomp=strict"], "invalid value 'strict' for --seccomp"),
    (["--log-level=loud"], "invalid value 'loud' for --log-level"),
    (["--inode-file-handles=always"], "invalid value 'always' for --inode-file-handles"),
    (["--runtime=gevent"], "invalid value 'gevent' for --runtime"),
    (["--thread-pool-size=-1"], "invalid value '-1' for --thread-pool-size (expected a non-negative integer)"),
    (["--thread-pool-size=many"], "invalid value 'many' for --thread-pool-size"),
    (["--rlimit-nofile=1.5"], "invalid value '1.5' for --rlimit-nofile"),
    (["--tag="], "invalid value '' for --tag"),
    (["--tag=" + "t" * 37], "for --tag (1 to 36 bytes)"),
    (["--modcaps=sys_admin"], "invalid value 'sys_admin' for --modcaps"),
    (["--modcaps=+warp_drive"], "unknown capability 'warp_drive'"),
    (["-o", "modcaps=+"], "invalid value '+' for -o modcaps"),
    (["-o", "timeout=soon"], "invalid value 'soon' for -o timeout"),
    (["--migration-mode=teleport"], "invalid value 'teleport' for --migration-mode"),
    (["stray"], "unexpected argument 'stray'"),
    (["--", "stray"], "unexpected argument 'stray'"),
])
def test_bad_command_lines(args: list[str], message: str) -> None:
    assert message in usage_error(*BASE, *args)


@pytest.mark.parametrize("option", [
    "--translate-uid=map:0:1000:1", "--translate-gid=map:0:1000:1", "--uid-map=:0:1000:1:", "--gid-map=:0:1000:1:",
    "--xattrmap=:map::user.virtiofs.:", "--security-label",
])
def test_unsupported_options_are_refused_clearly(option: str) -> None:
    message = usage_error(*BASE, option)
    assert f"{option.split('=')[0]} is not supported by virtiofs-async" in message


@pytest.mark.parametrize("item", ["xattrmap=:map::user.virtiofs.:", "security_label"])
def test_unsupported_c_options_are_refused_clearly(item: str) -> None:
    assert "is not supported by virtiofs-async" in usage_error(*BASE, "-o", item)


def test_required_and_exclusive_options() -> None:
    assert "missing --shared-dir" in usage_error("--socket-path", "/s")
    assert "missing --socket-path" in usage_error("--shared-dir", "/d")
    assert "--fd and --socket-path exclude each other" in usage_error(*BASE, "--fd=3")
    assert "--socket-group applies to --socket-path only" in usage_error("--fd=3", "--shared-dir=/d", "--socket-group=kvm")
    assert "needs CAP_DAC_READ_SEARCH" in usage_error(*BASE, "--inode-file-handles=prefer", "--modcaps=-dac_read_search")
    assert "--shared-dir needs a directory" in usage_error("--socket-path=/s", "--shared-dir=")


def test_two_different_shared_directories_are_refused() -> None:
    # An appended "-o source=/" (kata's extra args) must not widen the share.
    message = usage_error("--shared-dir=/run/share", "--fd=3", "-o", "source=/")
    assert "two shared directories given" in message and "'/run/share'" in message and "'/'" in message
    assert "two shared directories" in usage_error("--shared-dir=/a", "--shared-dir=/b", "--fd=3")
    assert "two socket paths" in usage_error("--socket-path=/a", "--socket=/b", "--shared-dir=/d")
    # The same directory twice is fine.
    assert parse("--shared-dir=/a", "--fd=3", "-o", "source=/a").shared_dir == "/a"


def test_information_options_need_nothing_else() -> None:
    assert parse("--print-capabilities").print_capabilities
    assert parse("--version").show_version and parse("-V").show_version
    assert parse("--help").show_help and parse("-h").show_help


# -- main(): exit statuses and outputs ----------------------------------------------------------


def test_main_exit_status_2_with_the_option_named(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*BASE, "--definitely-not"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "virtiofs-async: error: unknown option '--definitely-not'",
        "Try 'virtiofs-async --help' for more information.",
    ]
    assert cli.main([]) == 2
    assert "missing --shared-dir" in capsys.readouterr().err


def test_print_capabilities_is_the_vhost_user_backend_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--print-capabilities"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    # vhost-user.rst "Backend program conventions": a VHostUserBackendCapabilities
    # object; "separate-options" tells libvirt to use the long options. No
    # "migrate-precopy": this daemon offers no migration.
    assert data == {"type": "fs", "features": ["separate-options"]}
    assert out.endswith("}\n")


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    import virtiofs_async

    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"virtiofs-async {virtiofs_async.__version__} (virtiofsd 1.13 command line)\n"
    assert cli.main(["-h"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Usage: virtiofs-async --shared-dir DIR")
    for option in ("--socket-path", "--fd", "--shared-dir", "--cache", "--sandbox", "--seccomp", "--readonly",
                   "--xattr", "--posix-acl", "--thread-pool-size", "--socket-group", "--log-level", "--syslog",
                   "--announce-submounts", "--inode-file-handles", "--writeback", "--allow-direct-io",
                   "--rlimit-nofile", "--print-capabilities", "--version", "--help", "--modcaps", "-o OPT"):
        assert option in text, option
    # Help wins over a broken rest of the line.
    assert cli.main(["--cache=bogus", "--help"]) == 0
    assert capsys.readouterr().out.startswith("Usage:")


def test_console_entry_points() -> None:
    proc = subprocess.run([sys.executable, "-m", "virtiofs_async", "--print-capabilities"],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["type"] == "fs"
    proc = subprocess.run([sys.executable, "-m", "virtiofs_async", "--nope"],
                          env={**os.environ, "PYTHONPATH": SRC}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown option '--nope'" in proc.stderr
    text = Path(__file__).resolve().parents[2].joinpath("pyproject.toml").read_text()
    assert 'virtiofs-async = "virtiofs_async.cli:main"' in text


# -- logging ------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_log_lines_are_single_lines_with_the_prefix(restore_logging) -> None:  # type: ignore[no-untyped-def]
    stream = io.StringIO()
    cli.configure_logging("info", stream=stream)
    logging.getLogger("virtiofs_async.transport").warning("queue %d:\nbroken", 1)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("virtiofs_async.session").exception("backend failed on STATFS")
    logging.getLogger("virtiofs_async.session").debug("not shown at info")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert all(line.startswith("virtiofs-async: ") for line in lines)
    assert lines[0].endswith("WARNING transport: queue 1: | broken")
    assert "ERROR session: backend failed on STATFS | Traceback (most recent call last):" in lines[1]
    assert lines[1].endswith("RuntimeError: boom")


def test_log_levels_filter(restore_logging) -> None:  # type: ignore[no-untyped-def]
    for level, shown in (("error", {"E"}), ("warn", {"E", "W"}), ("debug", {"E", "W", "I", "D"}),
                         ("trace", {"E", "W", "I", "D", "T"}), ("off", set())):
        stream = io.StringIO()
        cli.configure_logging(level, stream=stream)
        lg = logging.getLogger("virtiofs_async.x")
        lg.error("E")
        lg.warning("W")
        lg.info("I")
        lg.debug("D")
        lg.log(cli.TRACE, "T")
        got = {line.rsplit(": ", 1)[1] for line in stream.getvalue().splitlines()}
        assert got == shown, level
    stream = io.StringIO()
    cli.configure_logging("trace", stream=stream)
    logging.getLogger("virtiofs_async.x").log(cli.TRACE, "t")
    assert " TRACE x: t" in stream.getvalue()


def test_syslog_without_dev_log_warns_and_uses_stderr(restore_logging, monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(cli, "SYSLOG_ADDRESS", str(tmp_path / "no-log"))
    stream = io.StringIO()
    handler = cli.configure_logging("info", use_syslog=True, stream=stream)
    assert isinstance(handler, logging.StreamHandler)
    logging.getLogger("virtiofs_async.cli").info("still logged")
    lines = stream.getvalue().splitlines()
    assert "WARNING cli: --syslog: " in lines[0] and "is not available" in lines[0] and "stderr instead" in lines[0]
    assert lines[1].endswith("INFO cli: still logged")


def test_syslog_records(restore_logging, monkeypatch, short_tmp) -> None:  # type: ignore[no-untyped-def]
    address = os.path.join(short_tmp, "log")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(address)
    receiver.settimeout(5)
    monkeypatch.setattr(cli, "SYSLOG_ADDRESS", address)
    handler = cli.configure_logging("trace", use_syslog=True)
    assert isinstance(handler, logging.handlers.SysLogHandler)
    logging.getLogger("virtiofs_async.session").warning("a\nb")
    logging.getLogger("virtiofs_async.session").log(cli.TRACE, "fine")
    first = receiver.recv(4096).decode()
    second = receiver.recv(4096).decode()
    handler.close()
    receiver.close()
    # <priority>: facility daemon (3) * 8 + warning (4) = 28; trace -> debug (7) = 31.
    assert first.startswith(f"<28>virtiofs-async[{os.getpid()}]: WARNING session: a | b")
    assert second.startswith(f"<31>virtiofs-async[{os.getpid()}]: TRACE session: fine")


# -- process setup pieces --------------------------------------------------------------------------


@pytest.fixture
def restore_nofile():  # type: ignore[no-untyped-def]
    saved = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield saved
    resource.setrlimit(resource.RLIMIT_NOFILE, saved)


def test_rlimit_nofile(restore_nofile) -> None:  # type: ignore[no-untyped-def]
    soft, hard = restore_nofile
    assert cli.raise_nofile_limit(0) == (soft, hard)
    lower = min(soft, 512)
    assert cli.raise_nofile_limit(lower)[0] == lower
    # Default: up to min(1000000, nr_open), or at least to the hard limit.
    new_soft, new_hard = cli.raise_nofile_limit(None)
    target = min(1_000_000, int(Path("/proc/sys/fs/nr_open").read_text()))
    assert new_soft == target or new_soft == new_hard == hard
    if new_soft == new_hard == hard < target:
        # Not privileged to raise the hard limit: an explicit value above it fails clearly.
        with pytest.raises(DaemonError, match=rf"--rlimit-nofile {hard + 10}: cannot set the open-file limit"):
            cli.raise_nofile_limit(hard + 10)


def test_reserve_fd_table_sizes_a_fresh_process_table_once() -> None:
    # A fresh interpreter: its table is still small (64 or so), and grows
    # to the next power of two that holds the reserved count.
    code = (
        "import resource; from virtiofs_async import cli\n"
        "before = cli.fd_table_size()\n"
        "limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]\n"
        "after = cli.reserve_fd_table(3000, limit)\n"
        "capped = cli.reserve_fd_table(1 << 30, 40)\n"
        "print(before, after, cli.fd_table_size(), capped)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                         capture_output=True, text=True, check=True).stdout.split()
    before, after, now, capped = map(int, out)
    assert before < 3000 <= after == now
    assert after & (after - 1) == 0  # a power of two
    assert capped == 0  # a limit under 64: nothing reserved, nothing opened
    # No fd is left open by it (the probe and the high fd are closed).
    open_before = sorted(os.listdir("/proc/self/fd"))
    assert cli.reserve_fd_table(300, resource.getrlimit(resource.RLIMIT_NOFILE)[0]) >= 300
    assert sorted(os.listdir("/proc/self/fd")) == open_before


def test_threads_option() -> None:
    assert cli._threads(parse(*BASE)) == cli.DEFAULT_THREADS
    assert cli._threads(parse(*BASE, "--thread-pool-size=0")) == 1
    assert cli._threads(parse(*BASE, "--thread-pool-size=7")) == 7


def test_listener_create_modes_group_pid_file_and_cleanup(short_tmp) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(short_tmp, "a.sock")
    listener = cli.Listener.create(path)
    try:
        st_ = os.stat(path)
        assert stat.S_ISSOCK(st_.st_mode) and stat.S_IMODE(st_.st_mode) == 0o700
        assert listener.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        listener.write_pid()
        assert Path(path + ".pid").read_text() == f"{os.getpid()}\n"
        with pytest.raises(DaemonError, match=rf"another daemon \(pid {os.getpid()}\) serves {path}"):
            cli.Listener.create(path)
        assert os.path.exists(path)  # the refused second start touched nothing
    finally:
        listener.cleanup()
        listener.sock.close()
    assert not os.path.exists(path) and not os.path.exists(path + ".pid")
    listener.cleanup()  # idempotent

    group = grp.getgrgid(os.getegid()).gr_name
    listener = cli.Listener.create(path, group)
    try:
        st_ = os.stat(path)
        assert stat.S_IMODE(st_.st_mode) == 0o770 and st_.st_gid == os.getegid()
    finally:
        listener.cleanup()
        listener.sock.close()


def test_listener_replaces_a_stale_socket_but_nothing_else(short_tmp) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(short_tmp, "b.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()
    listener = cli.Listener.create(path)
    listener.cleanup()
    listener.sock.close()
    Path(path).write_text("precious")
    with pytest.raises(DaemonError, match="exists and is not a socket"):
        cli.Listener.create(path)
    assert Path(path).read_text() == "precious" and not os.path.exists(path + ".pid")
    with pytest.raises(DaemonError, match="does not exist"):
        cli.Listener.create(os.path.join(short_tmp, "missing", "c.sock"))
    with pytest.raises(DaemonError, match="no such group"):
        cli.Listener.create(os.path.join(short_tmp, "d.sock"), "no-such-group-here")
    assert not os.path.exists(os.path.join(short_tmp, "d.sock.pid"))


def test_listener_cleanup_leaves_a_replaced_socket(short_tmp) -> None:  # type: ignore[no-untyped-def]
    path = os.path.join(short_tmp, "e.sock")
    listener = cli.Listener.create(path)
    listener.sock.close()
    os.unlink(path)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)  # someone else's socket now
    listener.cleanup()
    assert os.path.exists(path)
    other.close()


def test_listener_adopt_checks_the_fd(short_tmp) -> None:  # type: ignore[no-untyped-def]
    with open(os.devnull) as f:
        with pytest.raises(DaemonError, match="not a usable socket"):
            cli.Listener.adopt(f.fileno())
    unbound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with pytest.raises(DaemonError, match="is not a listening unix stream socket"):
        cli.Listener.adopt(unbound.fileno())
    unbound.fileno()  # still open: adopt() gave it back
    unbound.close()
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    with pytest.raises(DaemonError, match="is not a listening unix stream socket"):
        cli.Listener.adopt(tcp.fileno())
    tcp.close()
    good = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    good.bind(os.path.join(short_tmp, "f.sock"))
    good.listen(1)
    adopted = cli.Listener.adopt(good.detach())
    assert adopted.path is None and adopted.pid_fd is None
    adopted.cleanup()
    assert os.path.exists(os.path.join(short_tmp, "f.sock"))  # --fd: not ours to remove
    adopted.sock.close()


# -- what reaches the backend -----------------------------------------------------------------------


class ExplicitBackend:
    supports_readdirplus = True
    supports_posix_locks = True
    supports_flock_locks = False
    supports_killpriv_v2 = True

    def __init__(self, root, *, cache="auto", xattr=False, posix_acl=False, readonly=False, writeback=False,  # type: ignore[no-untyped-def]
                 allow_direct_io=False, announce_submounts=False, inode_file_handles="never"):
        self.root = root


def test_backend_arguments_follow_the_constructor(caplog) -> None:  # type: ignore[no-untyped-def]
    o = parse(*BASE, "--cache=never", "--posix-acl", "--readonly", "--allow-mmap", "-o", "no_readdirplus")
    kwargs = cli.backend_arguments(o, 9, ExplicitBackend)
    assert kwargs == {"cache": "never", "xattr": True, "posix_acl": True, "readonly": True, "writeback": False,
                      "allow_direct_io": False, "announce_submounts": True, "inode_file_handles": "never"}
    assert "--allow-mmap has no effect: the backend does not support it" in caplog.text

    def flexible(root, **kw):  # type: ignore[no-untyped-def]
        return kw

    kwargs = cli.backend_arguments(o, 9, flexible)
    assert kwargs["proc_self_fd"] == 9 and kwargs["allow_mmap"] is True and kwargs["readdirplus"] is False
    assert "posix_locks" not in kwargs  # not asked for: the backend decides


def test_feature_switches(caplog) -> None:  # type: ignore[no-untyped-def]
    b = ExplicitBackend("/")
    cli.apply_feature_switches(b, parse(*BASE))
    assert (b.supports_readdirplus, b.supports_posix_locks, b.supports_killpriv_v2) == (True, True, True)
    cli.apply_feature_switches(b, parse(*BASE, "-o", "no_posix_lock,flock", "--no-killpriv-v2"))
    assert (b.supports_posix_locks, b.supports_flock_locks, b.supports_killpriv_v2) == (False, False, False)
    assert "flock: the backend does not support it; it stays off" in caplog.text
    b = ExplicitBackend("/")
    cli.apply_feature_switches(b, parse(*BASE, "--cache=never"))  # as both daemons: no READDIRPLUS
    assert b.supports_readdirplus is False
    b = ExplicitBackend("/")
    cli.apply_feature_switches(b, parse(*BASE, "--cache=never", "-o", "readdirplus"))
    assert b.supports_readdirplus is True


# -- sandbox: capabilities ---------------------------------------------------------------------------


def test_modcaps_parsing() -> None:
    add, remove = sandbox.parse_modcaps("+sys_admin:-mknod:+CAP_NET_RAW:-net_raw")
    assert add == {sandbox.CAPABILITIES["sys_admin"]}
    assert remove == {sandbox.CAPABILITIES["mknod"], sandbox.CAPABILITIES["net_raw"]}
    for bad in ("", "sys_admin", "+", "+nope", "+chown::-mknod", "*chown"):
        with pytest.raises(ValueError):
            sandbox.parse_modcaps(bad)


def test_required_capabilities() -> None:
    names = {n: sandbox.CAPABILITIES[n] for n in sandbox.CAPABILITIES}
    default = {names[n] for n in ("chown", "dac_override", "fowner", "fsetid", "setgid", "setuid", "mknod", "setfcap")}
    assert sandbox.required_capabilities() == default
    assert sandbox.required_capabilities(file_handles=True) == default | {names["dac_read_search"]}
    assert sandbox.required_capabilities(modcaps="+sys_admin:-mknod") == (default | {names["sys_admin"]}) - {names["mknod"]}
    with pytest.raises(ValueError, match="CAP_DAC_READ_SEARCH"):
        sandbox.required_capabilities(file_handles=True, modcaps="-dac_read_search")
    assert sandbox.capability_names([27, 0]) == ["cap_chown", "cap_mknod"]
    assert sandbox.CAPABILITIES["checkpoint_restore"] == 40 and sandbox.CAPABILITIES["setfcap"] == 31


def test_drop_capabilities_in_a_child_process() -> None:
    code = (
        "from virtiofs_async import sandbox\n"
        "kept = sandbox.drop_capabilities({0, 27, 21})\n"
        "eff, prm, inh = sandbox.capability_sets()\n"
        "status = dict(l.split(':\\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\\t' in l)\n"
        "print(sorted(kept), sorted(eff), sorted(prm), sorted(inh), status['CapBnd'].strip(), status['NoNewPrivs'].strip())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip()
    _, prm_have = sandbox.capability_sets()[:2]
    expected = sorted({0, 27, 21} & prm_have)
    assert line.startswith(f"{expected} {expected} {expected} []")
    assert line.endswith(" 1")  # no_new_privs
    if 8 in sandbox.capability_sets()[0]:  # CAP_SETPCAP: the bounding set shrinks too
        assert line.split()[-2] == f"{sum(1 << c for c in expected):016x}"


def test_sandbox_modes_and_errors() -> None:
    assert sandbox.MODES == ("namespace", "chroot", "none")
    with pytest.raises(ValueError):
        sandbox.enter("jail", "/")
    seen = []
    box = sandbox.enter("none", "/srv", prepare=lambda root, fd: seen.append((root, fd)) or "built")
    try:
        assert (box.mode, box.root, box.prepared) == ("none", "/srv", "built")
        assert seen == [("/srv", box.proc_self_fd)] and box.proc_self_fd is not None
        # The fd is this process's /proc/self/fd: our own fds show in it.
        r, w = os.pipe()
        fd = os.open(str(w), os.O_WRONLY, dir_fd=box.proc_self_fd)
        os.write(fd, b"x")
        assert os.read(r, 1) == b"x"
        for f in (r, w, fd):
            os.close(f)
    finally:
        os.close(box.proc_self_fd)


def test_chroot_failure_is_a_clear_sandbox_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(sandbox.SandboxError, match=r"chroot into .*missing failed"):
        sandbox.enter("chroot", str(tmp_path / "missing"))
    assert os.path.exists("/proc/self/status")  # still in our own root
