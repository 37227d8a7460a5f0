"""``virtiofs-async`` / ``python -m virtiofs_async``: a drop-in virtiofsd.

Shares a host directory with a guest through the passthrough backend. The
command line is the Rust virtiofsd 1.13's, and the QEMU 7.2 C virtiofsd's
spellings work too (``-o source=DIR,cache=none,xattr``, ``-d``, ``-f``,
``--daemonize``), so kata-containers and libvirt start it unchanged. It
serves one frontend connection and exits 0 when the frontend disconnects.

Decisions where the two daemons differ, or where this one cannot follow:

- Defaults are the Rust daemon's: ``--sandbox namespace``, ``--cache auto``,
  ``--announce-submounts`` on (``--no-announce-submounts`` turns it off),
  ``--inode-file-handles never``. ``-o`` options are applied after the long
  options (as the Rust daemon does).
- ``--seccomp``: every value is accepted (the Rust default is ``kill``), but
  no syscall filter is installed: a Python interpreter's syscall set is too
  open-ended for a fixed allow-list. Unless ``--seccomp=none`` is given, a
  warning at start-up says so, so the weaker confinement is never silent.
- The shared directory may be given once (``--shared-dir`` or
  ``-o source=``); naming two different directories is an error, not "the
  last one wins": a second, appended ``-o source=/`` must not widen a share.
- Not supported, refused with a clear error (exit 2): ``--translate-uid``,
  ``--translate-gid``, ``--uid-map``, ``--gid-map``, ``--xattrmap``
  (``-o xattrmap=``), ``--security-label`` (``-o security_label``).
- Accepted with no effect (logged): ``--tag`` (the frontend's tag is used;
  VHOST_USER_PROTOCOL_F_CONFIG is not offered), the ``--migration-*``
  options (this daemon offers no migration), ``-o timeout=``,
  ``-o max_idle_threads=``, ``-o norace``, ``-o allow_root``, ``-f``.
  ``--allow-mmap``, ``--preserve-noatime``, ``--killpriv-v2`` reach the
  backend when its constructor takes them, else a warning says they have
  no effect. ``no_readdirplus``, ``no_posix_lock``, ``no_flock`` and
  ``--no-killpriv-v2`` switch the backend's feature off; READDIRPLUS is
  off with ``--cache=never`` unless ``-o readdirplus`` asks for it (as both
  daemons do).
- ``-o`` values: ``,`` separates options; ``,,`` (QEMU's and libvirt's
  escape) and ``\\,`` stand for a literal comma in a value.
- ``--thread-pool-size N`` bounds the runtime's worker threads. virtiofsd
  reads 0 as "no pool": here 0 means a single worker thread, so blocking
  calls still never run on the event loop. Not given: 64.
- ``--print-capabilities`` prints ``{"type": "fs", "features":
  ["separate-options"]}``: libvirt then uses the long options; no
  ``migrate-precopy``, since migration is not offered.
- ``--socket-path`` also creates ``<socket>.pid``, locked while the daemon
  runs (as the Rust daemon does), so two daemons never fight over one
  socket. The socket and the pid file are removed at exit where the host
  path is still reachable (``--sandbox namespace``: by the supervisor
  outside the sandbox; ``none``: by the daemon); with ``chroot`` they are
  left (a later start replaces them).
- Exit status: 0 after the frontend disconnects, 1 on a start-up failure or
  when stopped by SIGTERM/SIGHUP/SIGINT/SIGQUIT (as the Rust daemon), 2 for
  a bad command line. ``--help`` wins over the rest of the line.

Process setup, in order: the open-file limit; the listening socket (and its
pid file); ``--daemonize``; the sandbox (:mod:`virtiofs_async.sandbox`): the
backend is built inside the sandbox's namespaces but before the root switch,
from the share's host path, so the fds it opens (its root, /proc/self/fd)
stay valid; capabilities dropped; then one connection is served. Every
module the daemon may need is imported before the sandbox, which hides the
Python installation.

Logs: one line per record, ``virtiofs-async: TIME LEVEL logger: message``
(a traceback is folded into its line with `` | ``); ``--log-level debug``
shows every request decoded. ``--syslog``: facility daemon, ident
``virtiofs-async[PID]``; without /dev/log, a warning and stderr (as the Rust
daemon). ``--daemonize`` (C daemon): the foreground process exits 0 once the
daemon serves (1 if it fails first); stdio goes to /dev/null, as the C
daemon does, so use it with ``--syslog``.

Extension: ``--runtime auto|asyncio|uvloop|trio`` picks the event loop.
"""
from __future__ import annotations

import errno
import fcntl
import grp
import inspect
import json
import logging
import logging.handlers
import os
import resource
import signal
import socket
import stat
import sys
from typing import Any, Callable, Sequence

import attrs

from . import sandbox as sandbox_mod
from .errors import FuseError

log = logging.getLogger("virtiofs_async.cli")

PROG = "virtiofs-async"

CACHE_POLICIES = ("never", "metadata", "auto", "always")
SECCOMP_ACTIONS = ("none", "kill", "log", "trap")
INODE_FILE_HANDLES = ("never", "prefer", "mandatory")
LOG_LEVELS = ("error", "warn", "info", "debug", "trace", "off")
RUNTIMES = ("auto", "asyncio", "uvloop", "trio")

#: The vhost-user queue size limit offered (the Rust virtiofsd's).
QUEUE_MAX_SIZE = 32768
#: Worker threads when ``--thread-pool-size`` is not given.
DEFAULT_THREADS = 64
#: Longest ``--tag`` (the virtio-fs config space field).
MAX_TAG_LEN = 36
#: Where ``--syslog`` sends records.
SYSLOG_ADDRESS = "/dev/log"
#: Python logging level for ``--log-level trace``.
TRACE = 5

_LEVEL_VALUES = {
    "error": logging.ERROR,
    "warn": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": TRACE,
    "off": logging.CRITICAL + 10,
}
_LEVEL_ALIASES = {"err": "error", "warning": "warn"}


class UsageError(Exception):
    """The command line is wrong (exit status 2)."""


class DaemonError(Exception):
    """Start-up failed (exit status 1); the message says what and why."""


@attrs.define
class Options:
    """The parsed command line. ``None`` means "not given" where the
    default depends on other options or on the backend."""

    shared_dir: str | None = None
    socket_path: str | None = None
    fd: int | None = None
    socket_group: str | None = None
    tag: str | None = None
    thread_pool_size: int | None = None
    cache: str = "auto"
    sandbox: str = "namespace"
    seccomp: str = "kill"
    readonly: bool = False
    xattr: bool = False
    posix_acl: bool = False
    writeback: bool = False
    allow_direct_io: bool = False
    announce_submounts: bool = True
    inode_file_handles: str = "never"
    readdirplus: bool | None = None
    killpriv_v2: bool | None = None
    posix_lock: bool | None = None
    flock: bool | None = None
    allow_mmap: bool = False
    preserve_noatime: bool = False
    modcaps: str | None = None
    log_level: str = "info"
    syslog: bool = False
    rlimit_nofile: int | None = None
    daemonize: bool = False
    runtime: str = "auto"
    print_capabilities: bool = False
    show_help: bool = False
    show_version: bool = False
    #: Remarks for the log once it is set up (deprecated spellings, options without effect).
    notes: list[str] = attrs.Factory(list)

    @property
    def xattr_enabled(self) -> bool:
        """``--posix-acl`` implies ``--xattr`` (both daemons)."""
        return self.xattr or self.posix_acl


# -- parsing -------------------------------------------------------------------------------


def _choice(option: str, value: str, choices: Sequence[str], aliases: dict[str, str] | None = None) -> str:
    key = value.strip().lower()
    key = (aliases or {}).get(key, key)
    if key not in choices:
        raise UsageError(f"invalid value {value!r} for {option} (expected one of: {', '.join(choices)})")
    return key


def _count(option: str, value: str) -> int:
    try:
        number = int(value, 10)
    except ValueError:
        number = -1
    if number < 0:
        raise UsageError(f"invalid value {value!r} for {option} (expected a non-negative integer)")
    return number


def split_compat_options(text: str) -> list[str]:
    """Split one ``-o`` argument at commas; ``,,`` and ``\\,`` are a literal
    comma, ``\\\\`` a backslash. Empty items are dropped."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in ",\\":
            current.append(text[i + 1])
            i += 2
            continue
        if ch == ",":
            if i + 1 < len(text) and text[i + 1] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
            i += 1
            continue
        current.append(ch)
        i += 1
    items.append("".join(current))
    return [item for item in items if item]


_UNSUPPORTED = {
    "--translate-uid": "uid translation is not implemented; the guest's uids are used on the host unchanged",
    "--translate-gid": "gid translation is not implemented; the guest's gids are used on the host unchanged",
    "--uid-map": "user-namespace id maps are not implemented (run as root, or in a user namespace set up beforehand)",
    "--gid-map": "user-namespace id maps are not implemented (run as root, or in a user namespace set up beforehand)",
    "--xattrmap": "extended attribute mapping is not implemented",
    "--security-label": "security labels (FUSE_SECURITY_CTX) are not implemented",
}

# Long options that take no value -> the attribute set and its value.
_FLAGS: dict[str, tuple[str, object]] = {
    "--print-capabilities": ("print_capabilities", True),
    "--xattr": ("xattr", True),
    "--posix-acl": ("posix_acl", True),
    "--readonly": ("readonly", True),
    "--writeback": ("writeback", True),
    "--allow-direct-io": ("allow_direct_io", True),
    "--announce-submounts": ("announce_submounts", True),
    "--no-announce-submounts": ("announce_submounts", False),
    "--no-readdirplus": ("readdirplus", False),
    "--killpriv-v2": ("killpriv_v2", True),
    "--no-killpriv-v2": ("killpriv_v2", False),
    "--allow-mmap": ("allow_mmap", True),
    "--preserve-noatime": ("preserve_noatime", True),
    "--syslog": ("syslog", True),
    "--daemonize": ("daemonize", True),
}
_NO_EFFECT_FLAGS = {
    "--foreground": "always runs in the foreground unless --daemonize",
    "-f": "always runs in the foreground unless --daemonize",
    "--migration-verify-handles": "migration is not offered",
    "--migration-confirm-paths": "migration is not offered",
}
_VALUED = {
    "--shared-dir", "--tag", "--socket", "--socket-path", "--socket-group", "--fd", "--thread-pool-size",
    "--sandbox", "--seccomp", "--inode-file-handles", "--cache", "--modcaps", "--log-level",
    "--rlimit-nofile", "--migration-mode", "--migration-on-error", "--runtime",
    "--translate-uid", "--translate-gid", "--uid-map", "--gid-map", "--xattrmap",
}
_NO_VALUE = set(_FLAGS) | set(_NO_EFFECT_FLAGS) | {"--help", "--version", "--security-label"}


class _Parser:
    def __init__(self) -> None:
        self.options = Options()
        self.compat: list[str] = []
        self._shared_from: str | None = None
        self._socket_from: str | None = None

    # -- assignments that may conflict ----------------------------------------------
    def set_shared_dir(self, value: str, spelling: str) -> None:
        if not value:
            raise UsageError(f"{spelling} needs a directory")
        current = self.options.shared_dir
        if current is not None and current != value:
            raise UsageError(
                f"two shared directories given ({self._shared_from} {current!r} and {spelling} {value!r}): give one"
            )
        self.options.shared_dir = value
        self._shared_from = spelling

    def set_socket_path(self, value: str, spelling: str) -> None:
        if not value:
            raise UsageError(f"{spelling} needs a path")
        current = self.options.socket_path
        if current is not None and current != value:
            raise UsageError(f"two socket paths given ({self._socket_from} {current!r} and {spelling} {value!r})")
        self.options.socket_path = value
        self._socket_from = spelling
        if spelling == "--socket":
            self.options.notes.append("--socket is deprecated: use --socket-path")

    def set_log_level(self, value: str, spelling: str) -> None:
        self.options.log_level = _choice(spelling, value, LOG_LEVELS, _LEVEL_ALIASES)

    def set_modcaps(self, value: str, spelling: str) -> None:
        try:
            sandbox_mod.parse_modcaps(value)
        except ValueError as exc:
            raise UsageError(f"invalid value {value!r} for {spelling}: {exc}") from None
        self.options.modcaps = value

    # -- long options -------------------------------------------------------------------
    def long_option(self, name: str, value: str | None) -> None:
        o = self.options
        if name in _UNSUPPORTED:
            raise UsageError(f"{name} is not supported by {PROG}: {_UNSUPPORTED[name]}")
        if name in ("--help",):
            o.show_help = True
        elif name == "--version":
            o.show_version = True
        elif name in _FLAGS:
            attr, flag_value = _FLAGS[name]
            setattr(o, attr, flag_value)
        elif name in _NO_EFFECT_FLAGS:
            o.notes.append(f"{name} has no effect: {PROG} {_NO_EFFECT_FLAGS[name]}")
        else:
            assert value is not None
            if name == "--shared-dir":
                self.set_shared_dir(value, name)
            elif name in ("--socket-path", "--socket"):
                self.set_socket_path(value, name)
            elif name == "--fd":
                o.fd = _count(name, value)
            elif name == "--socket-group":
                if not value:
                    raise UsageError("--socket-group needs a group name")
                o.socket_group = value
            elif name == "--tag":
                if not value or len(value.encode()) > MAX_TAG_LEN:
                    raise UsageError(f"invalid value {value!r} for --tag (1 to {MAX_TAG_LEN} bytes)")
                o.tag = value
            elif name == "--thread-pool-size":
                o.thread_pool_size = _count(name, value)
            elif name == "--rlimit-nofile":
                o.rlimit_nofile = _count(name, value)
            elif name == "--cache":
                o.cache = _choice(name, value, CACHE_POLICIES, {"none": "never"})
            elif name == "--sandbox":
                o.sandbox = _choice(name, value, sandbox_mod.MODES)
            elif name == "--seccomp":
                o.seccomp = _choice(name, value, SECCOMP_ACTIONS)
            elif name == "--inode-file-handles":
                mode = _choice(name, value, INODE_FILE_HANDLES + ("fallback",))
                if mode == "fallback":
                    o.notes.append("--inode-file-handles=fallback is deprecated: use prefer")
                    mode = "prefer"
                o.inode_file_handles = mode
            elif name == "--modcaps":
                self.set_modcaps(value, name)
            elif name == "--log-level":
                self.set_log_level(value, name)
            elif name == "--runtime":
                o.runtime = _choice(name, value, RUNTIMES)
            elif name == "--migration-mode":
                _choice(name, value, ("find-paths", "file-handles"))
                o.notes.append(f"{name} has no effect: {PROG} offers no migration")
            elif name == "--migration-on-error":
                _choice(name, value, ("abort", "guest-error"))
                o.notes.append(f"{name} has no effect: {PROG} offers no migration")
            else:  # pragma: no cover - _VALUED and this chain agree
                raise UsageError(f"unknown option {name!r}")

    # -- -o, the C daemon's options -----------------------------------------------------
    def compat_option(self, item: str) -> None:
        o = self.options
        key, has_value, value = item.partition("=")
        spelling = f"-o {key}"
        if has_value:
            if key == "source":
                self.set_shared_dir(value, "-o source=")
            elif key == "vhost_user_socket":
                self.set_socket_path(value, "-o vhost_user_socket=")
            elif key == "cache":
                o.cache = _choice(spelling, value, CACHE_POLICIES, {"none": "never"})
            elif key == "sandbox":
                o.sandbox = _choice(spelling, value, sandbox_mod.MODES)
            elif key in ("log_level", "loglevel"):
                self.set_log_level(value, spelling)
            elif key == "modcaps":
                self.set_modcaps(value, spelling)
            elif key == "xattrmap":
                raise UsageError(f"-o xattrmap is not supported by {PROG}: {_UNSUPPORTED['--xattrmap']}")
            elif key in ("timeout", "max_idle_threads"):
                try:
                    float(value)
                except ValueError:
                    raise UsageError(f"invalid value {value!r} for {spelling} (expected a number)") from None
                reason = "the cache policy sets the timeouts" if key == "timeout" else "see --thread-pool-size"
                o.notes.append(f"{spelling} has no effect: {reason}")
            else:
                raise UsageError(f"unknown -o option {item!r}")
            return
        switches: dict[str, tuple[str, object]] = {
            "xattr": ("xattr", True), "no_xattr": ("xattr", False),
            "posix_acl": ("posix_acl", True), "no_posix_acl": ("posix_acl", False),
            "writeback": ("writeback", True), "no_writeback": ("writeback", False),
            "allow_direct_io": ("allow_direct_io", True), "no_allow_direct_io": ("allow_direct_io", False),
            "announce_submounts": ("announce_submounts", True),
            "no_announce_submounts": ("announce_submounts", False),
            "killpriv_v2": ("killpriv_v2", True), "no_killpriv_v2": ("killpriv_v2", False),
            "readdirplus": ("readdirplus", True), "no_readdirplus": ("readdirplus", False),
            "flock": ("flock", True), "no_flock": ("flock", False),
            "posix_lock": ("posix_lock", True), "no_posix_lock": ("posix_lock", False),
        }
        if key in switches:
            attr, flag_value = switches[key]
            setattr(o, attr, flag_value)
        elif key == "debug":
            o.log_level = "debug"
        elif key == "security_label":
            raise UsageError(f"-o security_label is not supported by {PROG}: {_UNSUPPORTED['--security-label']}")
        elif key == "no_security_label":
            pass
        elif key in ("norace", "allow_root"):
            o.notes.append(f"-o {key} has no effect")
        else:
            raise UsageError(f"unknown -o option {item!r}")

    # -- the walk -------------------------------------------------------------------------
    def parse(self, argv: Sequence[str]) -> Options:
        args = list(argv)
        i = 0
        while i < len(args):
            arg = args[i]
            i += 1
            if arg == "--":
                if i < len(args):
                    raise UsageError(f"unexpected argument {args[i]!r}")
                break
            if arg.startswith("--"):
                name, has_value, inline = arg.partition("=")
                if name in _NO_VALUE:
                    if has_value:
                        raise UsageError(f"option {name} takes no value")
                    self.long_option(name, None)
                elif name in _VALUED:
                    if has_value:
                        value = inline
                    elif i < len(args):
                        value = args[i]
                        i += 1
                    else:
                        raise UsageError(f"option {name} needs a value")
                    self.long_option(name, value)
                else:
                    raise UsageError(f"unknown option {name!r}")
            elif arg.startswith("-") and len(arg) > 1:
                self._short_cluster(arg, args, i)
                if self._consumed_next:
                    i += 1
            else:
                raise UsageError(f"unexpected argument {arg!r} (options start with - or --)")
        for text in self.compat:
            for item in split_compat_options(text):
                self.compat_option(item)
        return self.options

    _consumed_next = False

    def _short_cluster(self, arg: str, args: list[str], i: int) -> None:
        """``-d``, ``-f``, ``-V``, ``-h``, ``-o VALUE``/``-oVALUE``, clusters like ``-df``."""
        self._consumed_next = False
        letters = arg[1:]
        for pos, letter in enumerate(letters):
            if letter == "o":
                rest = letters[pos + 1:]
                if rest:
                    self.compat.append(rest)
                elif i < len(args):
                    self.compat.append(args[i])
                    self._consumed_next = True
                else:
                    raise UsageError("option -o needs a value")
                return
            if letter == "h":
                self.options.show_help = True
            elif letter == "V":
                self.options.show_version = True
            elif letter == "d":
                self.options.log_level = "debug"
                self.options.notes.append("-d is deprecated: use --log-level debug")
            elif letter == "f":
                self.options.notes.append(f"-f has no effect: {PROG} {_NO_EFFECT_FLAGS['-f']}")
            else:
                raise UsageError(f"unknown option '-{letter}'" + (f" (in {arg!r})" if len(letters) > 1 else ""))


def parse_args(argv: Sequence[str]) -> Options:
    """Parse a command line (without the program name). UsageError if it
    is wrong; requirements (a shared dir, a socket) are only checked when
    the daemon would actually run (not for --help/--version/--print-capabilities)."""
    options = _Parser().parse(argv)
    if options.show_help or options.show_version or options.print_capabilities:
        return options
    if options.shared_dir is None:
        raise UsageError("missing --shared-dir DIR (or -o source=DIR)")
    if options.fd is not None and options.socket_path is not None:
        raise UsageError("--fd and --socket-path exclude each other")
    if options.fd is None and options.socket_path is None:
        raise UsageError("missing --socket-path PATH (or --fd N)")
    if options.socket_group is not None and options.fd is not None:
        raise UsageError("--socket-group applies to --socket-path only, not to --fd")
    if options.modcaps is not None and options.inode_file_handles != "never":
        try:
            sandbox_mod.required_capabilities(file_handles=True, modcaps=options.modcaps)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    return options


# -- informational outputs ---------------------------------------------------------------


def capabilities_json() -> str:
    """What ``--print-capabilities`` prints: the vhost-user.rst "backend
    program conventions" JSON of a vhost-user-fs backend."""
    return json.dumps({"type": "fs", "features": ["separate-options"]}, indent=2)


def version_text() -> str:
    from . import __version__

    return f"{PROG} {__version__} (virtiofsd 1.13 command line)"


HELP = f"""\
Usage: {PROG} --shared-dir DIR (--socket-path PATH | --fd N) [OPTIONS]
       python -m virtiofs_async ...

Share a host directory with a virtual machine: a vhost-user-fs backend that
accepts the command lines of the Rust virtiofsd and of QEMU's C virtiofsd.
It serves one frontend connection and exits 0 when it disconnects.

Where:
  --shared-dir DIR             directory to share (C spelling: -o source=DIR)
  --socket-path PATH           vhost-user socket to create and listen on
                               (deprecated spellings: --socket, -o vhost_user_socket=)
  --fd N                       inherited, already listening socket instead
  --socket-group GROUP         group of the socket (mode 0770 then, else 0700)

Behaviour of the share:
  --cache never|metadata|auto|always
                               guest caching policy (default auto; none = never)
  --readonly                   refuse every modification
  --xattr                      extended attributes
  --posix-acl                  POSIX ACLs (implies --xattr)
  --writeback                  writeback caching in the guest
  --allow-direct-io            honour the guest's O_DIRECT
  --announce-submounts         tell the guest about mount points (default)
  --no-announce-submounts      don't
  --inode-file-handles never|prefer|mandatory
                               reference inodes by file handles (default never)
  --no-readdirplus             no READDIRPLUS (also off with --cache=never)
  --killpriv-v2, --no-killpriv-v2
                               FUSE_HANDLE_KILLPRIV_V2 on/off
  --allow-mmap, --preserve-noatime
                               passed to the backend when it supports them

Process:
  --sandbox namespace|chroot|none
                               confinement (default namespace: pid, mount and
                               net namespaces, pivot_root into DIR)
  --seccomp none|kill|log|trap accepted; no syscall filter is installed (a
                               warning says so unless none)
  --modcaps +CAP:-CAP...       change the capabilities kept (e.g. +sys_admin:-mknod)
  --thread-pool-size N         worker threads for blocking calls (0: one; default 64)
  --rlimit-nofile N            open-file limit (0: unchanged; default: raise to
                               min(1000000, fs.nr_open) or the hard limit)
  --log-level error|warn|info|debug|trace|off
                               (default info; debug shows every request)
  --syslog                     log to syslog ({SYSLOG_ADDRESS}) instead of stderr
  --daemonize                  go to the background once serving
  --runtime auto|asyncio|uvloop|trio
                               event loop (default auto: asyncio on uvloop)

Information:
  --print-capabilities         print the vhost-user backend capabilities JSON
  -V, --version                print the version
  -h, --help                   print this help

C virtiofsd spellings: -o OPT[,OPT...] with source=DIR, cache=auto|always|none,
sandbox=namespace|chroot, log_level=debug|info|warn|err, modcaps=..., xattr,
no_xattr, posix_acl, no_posix_acl, writeback, no_writeback, allow_direct_io,
no_allow_direct_io, announce_submounts, killpriv_v2, no_killpriv_v2,
readdirplus, no_readdirplus, flock, no_flock, posix_lock, no_posix_lock,
debug; -d (debug), -f (no effect).

Not supported (refused): --translate-uid, --translate-gid, --uid-map,
--gid-map, --xattrmap, --security-label.

Exit status: 0 after the frontend disconnects or for --help/--version/
--print-capabilities, 1 on failure or SIGTERM/SIGHUP/SIGINT, 2 for a wrong
command line.
"""


# -- logging --------------------------------------------------------------------------------


class _OneLineFormatter(logging.Formatter):
    """One line per record: newlines (tracebacks too) become `` | ``; the
    ``virtiofs_async.`` logger prefix is dropped."""

    def format(self, record: logging.LogRecord) -> str:
        name = record.name
        record.shortname = name[len("virtiofs_async."):] if name.startswith("virtiofs_async.") else name
        text = super().format(record)
        lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
        return " | ".join(line for line in lines if line)


class _SyslogHandler(logging.handlers.SysLogHandler):
    def mapPriority(self, levelName: str) -> str:  # noqa: N802 - logging's name
        return "debug" if levelName == "TRACE" else super().mapPriority(levelName)


STDERR_FORMAT = f"{PROG}: %(asctime)s.%(msecs)03d %(levelname)s %(shortname)s: %(message)s"
SYSLOG_FORMAT = "%(levelname)s %(shortname)s: %(message)s"


def configure_logging(level: str, *, use_syslog: bool = False, stream: Any = None) -> logging.Handler:
    """Send every record (root logger) at ``level`` and above to stderr (or
    ``stream``), one line each with the ``virtiofs-async`` prefix, or to
    syslog with ``use_syslog`` (a warning and stderr if syslog is absent)."""
    logging.addLevelName(TRACE, "TRACE")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler | None = None
    failure: str | None = None
    if use_syslog:
        try:
            if not os.path.exists(SYSLOG_ADDRESS):
                raise FileNotFoundError(errno.ENOENT, "no such socket")
            handler = _SyslogHandler(address=SYSLOG_ADDRESS, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            handler.ident = f"{PROG}[{os.getpid()}]: "
            handler.setFormatter(_OneLineFormatter(SYSLOG_FORMAT))
        except OSError as exc:
            failure = f"--syslog: {SYSLOG_ADDRESS} is not available ({exc.strerror or exc}); logging to stderr instead"
            handler = None
    if handler is None:
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(_OneLineFormatter(STDERR_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(_LEVEL_VALUES[level])
    if failure:
        log.warning("%s", failure)
    return handler


# -- process setup ----------------------------------------------------------------------------


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 1 << 20


def raise_nofile_limit(requested: int | None) -> tuple[int, int]:
    """Apply ``--rlimit-nofile``: None raises the soft limit to
    min(1000000, fs.nr_open) (the hard limit too when privileged; else up to
    the hard limit); 0 leaves it; N sets it. Returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if requested == 0:
        return soft, hard
    infinity = resource.RLIM_INFINITY
    if requested is None:
        target = min(1_000_000, _nr_open())
        if soft == infinity or soft >= target:
            return soft, hard
    else:
        target = requested
    new_hard = hard if hard == infinity or hard >= target else target
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, new_hard))
    except (OSError, ValueError) as exc:
        if requested is not None:
            raise DaemonError(f"--rlimit-nofile {requested}: cannot set the open-file limit (hard limit {hard}): {exc}")
        if soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            log.info("open-file limit raised to the hard limit %d (cannot go to %d: %s)", hard, target, exc)
        else:
            log.info("open-file limit stays at the hard limit %d (cannot go to %d: %s)", hard, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


#: Open files the serving process's fd table is sized for before it serves
#: (see :func:`reserve_fd_table`).
FD_TABLE_RESERVE = 16384


def reserve_fd_table(count: int, limit: int) -> int:
    """Size this process's fd table for ``count`` fds (at most ``limit``,
    the open-file soft limit) now, by opening one fd at ``count - 1`` and
    closing it; returns the table's size (FDSize), or 0 when it could not.

    The kernel grows a shared fd table by doubling it, and each growth in
    a multi-threaded process waits for an RCU grace period: 5-8 ms apiece
    on this project's machines, paid by whichever call opened the 64th,
    128th, 256th... fd, in the middle of serving a guest (a FLUSH's dup,
    a LOOKUP's O_PATH open). Done once at start, it costs that once (the
    table: 8 bytes an fd, 128 KiB for the default)."""
    target = min(count, limit) - 1
    if target < 64:
        return 0
    try:
        probe = os.open("/", os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(probe, fcntl.F_DUPFD_CLOEXEC, target)
        os.close(high)
    except OSError as exc:
        log.debug("cannot reserve an fd table of %d: %s", target + 1, exc)
    finally:
        os.close(probe)
    return fd_table_size()


def fd_table_size() -> int:
    """This process's fd table size (FDSize in /proc/self/status), 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("FDSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Listener:
    """The listening vhost-user socket, created (or adopted) before the
    sandbox, and the ``<socket>.pid`` lock file of ``--socket-path``."""

    def __init__(self, sock: socket.socket, path: str | None = None) -> None:
        self.sock = sock
        self.path = path
        self._identity: tuple[int, int, int] | None = None
        self.pid_path: str | None = None
        self.pid_fd: int | None = None
        if path is not None:
            st = os.stat(path)
            # ctime too: an inode number is reused once the file is gone.
            self._identity = (st.st_dev, st.st_ino, st.st_ctime_ns)

    @classmethod
    def adopt(cls, fd: int) -> "Listener":
        """An inherited listening socket (``--fd``)."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise DaemonError(f"--fd {fd}: not a usable socket ({exc.strerror})") from None
        try:
            listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        except OSError:
            listening = 0
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or not listening:
            sock.detach()
            raise DaemonError(f"--fd {fd} is not a listening unix stream socket")
        os.set_inheritable(fd, False)
        return cls(sock)

    @classmethod
    def create(cls, path: str, group: str | None = None) -> "Listener":
        """Create, bind and listen on ``path`` (mode 0700, or 0770 and group
        ``group``), after taking the ``<path>.pid`` lock. A stale socket is
        replaced; anything else at ``path`` is an error."""
        path = os.path.abspath(path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise DaemonError(f"--socket-path {path}: directory {parent} does not exist")
        gid = None
        if group is not None:
            gid = _group_id(group)
        pid_path, pid_fd = _lock_pid_file(path + ".pid", path)
        try:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                pass
            else:
                if not stat.S_ISSOCK(st.st_mode):
                    raise DaemonError(f"--socket-path {path} exists and is not a socket; not replacing it")
                os.unlink(path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            old_umask = os.umask(0o077 if group is None else 0o007)
            try:
                sock.bind(path)
            except OSError as exc:
                sock.close()
                raise DaemonError(f"--socket-path {path}: cannot bind ({exc.strerror or exc})") from None
            finally:
                os.umask(old_umask)
            if gid is not None:
                os.chown(path, -1, gid)
            sock.listen(1)
            listener = cls(sock, path)
        except BaseException:
            _unlink_quietly(pid_path)
            os.close(pid_fd)
            raise
        listener.pid_path, listener.pid_fd = pid_path, pid_fd
        return listener

    def write_pid(self) -> None:
        """Record this process's pid in the pid file (after --daemonize)."""
        if self.pid_fd is not None:
            os.ftruncate(self.pid_fd, 0)
            os.pwrite(self.pid_fd, f"{os.getpid()}\n".encode(), 0)

    def fileno(self) -> int:
        return self.sock.fileno()

    def cleanup(self) -> None:
        """Remove the socket (if it is still ours) and the pid file; idempotent."""
        if self.path is not None and self._identity is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino, st.st_ctime_ns) == self._identity:
                    os.unlink(self.path)
            except OSError:
                pass
            self._identity = None
        if self.pid_fd is not None:
            if self.pid_path is not None:
                try:
                    mine, there = os.fstat(self.pid_fd), os.stat(self.pid_path)
                    if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
                        os.unlink(self.pid_path)
                except OSError:
                    pass
            try:
                os.close(self.pid_fd)
            except OSError:
                pass
            self.pid_fd = None

    def forget_host_paths(self) -> None:
        """Inside a chroot the host paths are gone: never touch them."""
        self._identity = None
        self.pid_path = None
        if self.pid_fd is not None:
            try:
                os.close(self.pid_fd)
            except OSError:
                pass
            self.pid_fd = None


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise DaemonError(f"--socket-group {group}: no such group") from None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _lock_pid_file(pid_path: str, socket_path: str) -> tuple[str, int]:
    try:
        fd = os.open(pid_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as exc:
        raise DaemonError(f"cannot create the pid file {pid_path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        finally:
            os.close(fd)
        raise DaemonError(f"another daemon (pid {other}) serves {socket_path}: {pid_path} is locked") from None
    return pid_path, fd


def _daemonize() -> Callable[[], None]:
    """Fork into the background; the foreground process exits 0 once the
    returned ``ready()`` is called, 1 if the daemon dies before that."""
    read_fd, write_fd = os.pipe()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    if os.fork():
        os.close(write_fd)
        while True:
            try:
                data = os.read(read_fd, 1)
                break
            except InterruptedError:  # pragma: no cover
                continue
        os._exit(0 if data == b"R" else 1)
    os.close(read_fd)
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.close(null)

    def ready() -> None:
        try:
            os.write(write_fd, b"R")
            os.close(write_fd)
        except OSError:
            pass

    return ready


def _install_exit_handlers(cleanup: Callable[[], None]) -> None:
    """SIGTERM, SIGHUP, SIGINT, SIGQUIT: clean up and exit 1 (virtiofsd's
    behaviour). Needed as pid 1 of a pid namespace, which ignores signals it
    has no handler for."""

    def on_signal(signum: int, frame: object) -> None:
        log.info("%s received: exiting", signal.Signals(signum).name)
        try:
            cleanup()
        finally:
            logging.shutdown()
            os._exit(1)

    for sig in sandbox_mod.FORWARDED_SIGNALS:
        signal.signal(sig, on_signal)


# -- the backend ---------------------------------------------------------------------------------

BackendFactory = Callable[..., Any]


def _default_backend_factory() -> BackendFactory:
    try:
        from .backends.passthrough import PassthroughFS
    except ImportError as exc:
        raise DaemonError(f"the passthrough backend is not available: {exc}") from None
    return PassthroughFS


def _accepted_keywords(factory: BackendFactory) -> tuple[set[str], bool]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return set(), False
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def backend_arguments(options: Options, proc_self_fd: int | None, factory: BackendFactory) -> dict[str, Any]:
    """The keywords for ``factory(root, **kw)``: the constructor's required
    set, plus the optional ones the factory declares (a warning for an
    option that was asked for but cannot reach the backend)."""
    kwargs: dict[str, Any] = {
        "cache": options.cache,
        "xattr": options.xattr_enabled,
        "posix_acl": options.posix_acl,
        "readonly": options.readonly,
        "writeback": options.writeback,
        "allow_direct_io": options.allow_direct_io,
        "announce_submounts": options.announce_submounts,
        "inode_file_handles": options.inode_file_handles,
    }
    names, takes_any = _accepted_keywords(factory)
    # (keyword, value or None when not asked for, option to name in a warning)
    optional: list[tuple[str, Any, str | None]] = [
        ("proc_self_fd", proc_self_fd, None),
        ("allow_mmap", True if options.allow_mmap else None, "--allow-mmap"),
        ("preserve_noatime", True if options.preserve_noatime else None, "--preserve-noatime"),
        # Explicit feature switches go to the constructor when it takes
        # them (apply_feature_switches covers the others).
        ("readdirplus", options.readdirplus, None),
        ("posix_locks", options.posix_lock, None),
        ("flock_locks", options.flock, None),
        ("killpriv_v2", options.killpriv_v2, None),
    ]
    for name, value, option in optional:
        if value is None:
            continue
        if takes_any or name in names:
            kwargs[name] = value
        elif option is not None:
            log.warning("%s has no effect: the backend does not support it", option)
    return kwargs


def apply_feature_switches(backend: Any, options: Options) -> None:
    """Turn off the backend features the command line refuses (never turns
    one on that the backend lacks: that is a warning)."""
    readdirplus = options.readdirplus
    if readdirplus is None and options.cache == "never":
        readdirplus = False
    switches = [
        ("supports_readdirplus", readdirplus, "readdirplus"),
        ("supports_posix_locks", options.posix_lock, "posix_lock"),
        ("supports_flock_locks", options.flock, "flock"),
        ("supports_killpriv_v2", options.killpriv_v2, "killpriv_v2"),
    ]
    for attr, wanted, name in switches:
        if wanted is None:
            continue
        have = bool(getattr(backend, attr, False))
        if wanted and not have:
            log.warning("%s: the backend does not support it; it stays off", name)
        elif not wanted and have:
            try:
                setattr(backend, attr, False)
            except AttributeError:
                log.warning("no_%s: the backend cannot switch it off", name)


# -- main ---------------------------------------------------------------------------------------


def _check_shared_dir(path: str) -> str:
    resolved = os.path.realpath(path)
    try:
        st = os.stat(resolved)
    except OSError as exc:
        raise DaemonError(f"shared directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"shared directory {path} is not a directory")
    return resolved


def _threads(options: Options) -> int:
    if options.thread_pool_size is None:
        return DEFAULT_THREADS
    return max(1, options.thread_pool_size)


#: Standard modules that are imported lazily on paths the daemon takes.
_PRELOAD_STDLIB = (
    "concurrent.futures.thread",
    "asyncio.runners",
    "asyncio.unix_events",
    "encodings.idna",
    "logging.handlers",
    "traceback",
    "linecache",
)


def preload(options: Options) -> Any:
    """Import everything the daemon may need once it is sandboxed (the
    sandbox hides the Python installation: a lazy import there fails) and
    return the runtime for ``options.runtime``."""
    import importlib
    import pkgutil

    import virtiofs_async

    for name in _PRELOAD_STDLIB:
        importlib.import_module(name)
    skip: tuple[str, ...] = ("virtiofs_async.testing", "virtiofs_async.cli", "virtiofs_async.__main__")
    if options.runtime != "trio":
        skip += ("virtiofs_async.runtime.trio_runtime",)
    for info in pkgutil.walk_packages(virtiofs_async.__path__, "virtiofs_async."):
        if info.name.startswith(skip):
            continue
        try:
            importlib.import_module(info.name)
        except ImportError as exc:
            # An optional part (e.g. the trio runtime without trio) is only
            # a problem if it is the one in use: get_runtime says so below.
            log.debug("preload: %s not loaded (%s)", info.name, exc)
    from .runtime import get_runtime

    try:
        if options.runtime in ("uvloop", "trio"):
            importlib.import_module(options.runtime)
        return get_runtime(options.runtime, max_threads=_threads(options))
    except ImportError as exc:
        raise DaemonError(f"--runtime {options.runtime}: {exc}") from None


async def _serve(backend: Any, runtime: Any, fd: int) -> None:
    from .server import make_server

    server = make_server(backend, runtime=runtime, fd=fd, once=True, queue_max_size=QUEUE_MAX_SIZE)
    await server.serve()


def run_daemon(options: Options, backend_factory: BackendFactory | None = None) -> int:
    """Set the process up (limits, socket, sandbox, capabilities) and serve
    until the frontend disconnects. Raises DaemonError on a start-up failure."""
    for note in options.notes:
        log.warning("%s", note)
    if options.seccomp != "none":
        log.warning(
            "seccomp filtering is not implemented: running without a syscall filter "
            "(--seccomp=%s asked for one; --seccomp=none acknowledges this)",
            options.seccomp,
        )
    if options.tag is not None:
        log.info("--tag %s: accepted; the frontend's tag is used (no VHOST_USER_PROTOCOL_F_CONFIG)", options.tag)
    factory = backend_factory or _default_backend_factory()
    assert options.shared_dir is not None
    shared = _check_shared_dir(options.shared_dir)
    soft, _ = raise_nofile_limit(options.rlimit_nofile)
    log.debug("open-file limit %s", soft)

    # After the sandbox switches root, Python can no longer import from its
    # installation: load every module the daemon will need, and build the
    # runtime, now.
    runtime = preload(options)

    if options.fd is not None:
        listener = Listener.adopt(options.fd)
        where = f"fd {options.fd}"
    else:
        assert options.socket_path is not None
        listener = Listener.create(options.socket_path, options.socket_group)
        where = listener.path or ""
    try:
        ready = _daemonize() if options.daemonize else (lambda: None)
        listener.write_pid()
        supervisor_fds = [listener.pid_fd] if listener.pid_fd is not None else []

        def build_backend(root: str, proc_self_fd: int | None) -> Any:
            # Runs inside the sandbox's namespaces, before the root switch:
            # the backend opens its root and /proc/self/fd by their paths.
            kwargs = backend_arguments(options, proc_self_fd, factory)
            try:
                return factory(root, **kwargs)
            except (OSError, FuseError, ValueError) as exc:
                raise DaemonError(f"cannot serve {shared}: {exc}") from None

        try:
            box = sandbox_mod.enter(
                options.sandbox,
                shared,
                prepare=build_backend,
                serving_fds=[listener.fileno()],
                supervisor_fds=supervisor_fds,
                on_supervisor_exit=listener.cleanup,
            )
        except sandbox_mod.SandboxError as exc:
            raise DaemonError(str(exc)) from None
        if box.mode == "namespace":
            listener.pid_fd = None  # closed: the supervisor outside owns the files
            listener.forget_host_paths()
        elif box.mode == "chroot":
            listener.forget_host_paths()
        _install_exit_handlers(listener.cleanup)

        keep = sandbox_mod.required_capabilities(
            file_handles=options.inode_file_handles != "never", modcaps=options.modcaps
        )
        try:
            kept = sandbox_mod.drop_capabilities(keep)
            log.debug("capabilities kept: %s", " ".join(sandbox_mod.capability_names(kept)) or "none")
        except OSError as exc:
            raise DaemonError(f"cannot drop capabilities: {exc}") from None
        backend = box.prepared
        apply_feature_switches(backend, options)
        # In the process that serves (the sandbox may have forked: a child's
        # table is only as big as its open fds).
        log.debug("fd table: %d", reserve_fd_table(FD_TABLE_RESERVE, resource.getrlimit(resource.RLIMIT_NOFILE)[0]))

        log.info(
            "sharing %s (sandbox %s, cache %s%s) on %s",
            shared,
            box.mode,
            options.cache,
            ", read-only" if options.readonly else "",
            where,
        )
        ready()
        # The loop's thread switches its umask for inline creates: its own.
        from .backends import _hostfs

        _hostfs.claim_private_fs()
        fd = listener.sock.detach()
        runtime.run(_serve, backend, runtime, fd)
        log.info("frontend gone: exiting")
        return 0
    finally:
        listener.cleanup()


def main(argv: Sequence[str] | None = None, *, backend_factory: BackendFactory | None = None) -> int:
    """The command: parse ``argv`` (default ``sys.argv[1:]``), serve, and
    return the exit status. ``backend_factory(root, **options)`` replaces
    the passthrough backend (to serve another filesystem with the same
    command line and process setup)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if "--help" in args or "-h" in args:
        print(HELP, end="")
        return 0
    try:
        options = parse_args(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        print(f"Try '{PROG} --help' for more information.", file=sys.stderr)
        return 2
    if options.show_help:
        print(HELP, end="")
        return 0
    if options.show_version:
        print(version_text())
        return 0
    if options.print_capabilities:
        print(capabilities_json())
        return 0
    configure_logging(options.log_level, use_syslog=options.syslog)
    try:
        return run_daemon(options, backend_factory)
    except DaemonError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 1
    except Exception:
        log.exception("the daemon failed")
        return 1
    finally:
        logging.shutdown()
