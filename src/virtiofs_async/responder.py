"""Inline answers to GETATTR and LOOKUP over a table of host-fd inodes.

The pure twin of ``cyext/responder.pyx``. A :class:`PassthroughResponder` is
what :meth:`VirtQueue.pop_serving <virtiofs_async.vring.VirtQueue.pop_serving>`
offers small requests to, straight from the ring walk: it returns the exact
reply bytes the full path (``FuseSession.handle_request`` over
``PassthroughFS``) would write, or None to leave the request to that path.
It answers only what the full path answers without logging and without
leaving the event loop:

* GETATTR of a known inode that holds an O_PATH fd (``fstat``);
* LOOKUP of a valid component (not ``.`` or ``..``) in a known directory
  that holds an fd, when the name is an inode the table already has
  (``fstatat`` without following), or ENOENT; with an ``adopt`` callback,
  also a name the table does not have yet (an O_PATH fd of it, opened
  without following, goes to ``adopt``);
* with a ``drop`` callback, FORGET of any inode but the root (no reply);
* with ``flush`` / ``release`` callbacks, FLUSH and RELEASE(DIR), which
  they carry out (``flush(fh, lock_owner)``, ``release(fh, is_dir)``),
  returning 0 or an errno for the reply, or -1 to leave the request to the
  full path with nothing done;
* with a ``readdir`` callback, READDIR of up to ``read_max`` bytes that
  fits the reply room: ``readdir(fh, offset, size)`` returns the reply's
  body (at most ``size`` bytes), or None to leave the request to the full
  path (the callback must leave the handle as the full path expects it);
  with a ``readdirplus`` callback, READDIRPLUS likewise (the callback
  counts the lookups of the records it returns, and of no others);
* with a ``create`` callback, CREATE of a valid component (not ``.`` or
  ``..``): ``create(parent, name, mode, flags, umask, uid, gid, pid)``
  returns the reply's body (``fuse_entry_out`` + ``fuse_open_out``, the
  lookup counted and the handle installed), an errno (> 0) for an error
  reply, or None to leave the request to the full path with nothing done;
* with a ``setattr`` callback, SETATTR: ``setattr(nodeid, setattr_in, uid,
  gid, pid)`` (``setattr_in`` the 88-byte ``fuse_setattr_in``) returns the
  ``fuse_attr_out`` body, an errno (> 0), or None (nothing done);
* with a ``mkdir`` callback, MKDIR of a valid component: ``mkdir(parent,
  name, mode, umask, uid, gid, pid)`` returns the ``fuse_entry_out`` body
  (the lookup counted), an errno (> 0), or None (nothing done);
* with a ``remove`` callback, UNLINK and RMDIR of a valid component:
  ``remove(parent, name, is_dir)`` returns 0, an errno (> 0), or None
  (nothing done);
* with an ``open`` callback, OPEN and OPENDIR: ``open(nodeid, flags,
  is_dir)`` returns the ``fuse_open_out`` body (the handle installed), an
  errno (> 0), or None (nothing done).

Everything else (other opcodes, request extensions, errors other than
ENOENT, short reply room) gets None.

Contract: the responder holds the backend's ``inodes`` (nodeid -> inode)
and ``by_key`` ((st_dev, st_ino) -> inode) dicts by reference; an inode
object has ``nodeid``, ``key``, ``kind`` (S_IFMT bits), ``fd`` (-1: none)
and ``lookups``. It changes the tables only through the callbacks:
``adopt(fd, st_dev, st_ino, st_mode)`` takes the O_PATH ``fd`` into a new
entry with no lookups counted (or closes it and returns the entry that
already has that key) and returns the inode; ``drop(inode)`` is called when
a FORGET takes an inode's count to 0 (the backend frees it if nothing else
holds it). Each LOOKUP reply it gives counts one lookup on the inode, and
each FORGET takes its count down (not below 0), as the backend's own
LOOKUP and FORGET do. The timeouts are fixed when it is built.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Any, Callable

import attrs

from .abi import fuse as abi
from .codec import host_rdev_to_guest, split_timeout, wire_seconds

__all__ = ["HostHandle", "HostInode", "InlineGate", "PassthroughResponder", "NAME_MAX"]

#: The longest component name a LOOKUP is answered for (the host's NAME_MAX).
NAME_MAX = 255

_NS = 1_000_000_000


@attrs.define(slots=True, eq=False)
class HostInode:
    """An inode of the passthrough backend's tables, shared by reference
    with its inline responder (the compiled twin is a C type with the same
    fields; the backend builds the one the implementation switch picks).
    Compared by identity."""

    nodeid: int
    #: (st_dev, st_ino) on the host
    key: tuple[int, int]
    #: S_IFMT bits (an inode's type never changes)
    kind: int
    #: O_PATH fd, or -1 when ``handle`` is used
    fd: int
    #: the host file handle (``_hostfs.FileHandle``) when there is no O_PATH fd
    handle: Any = None
    #: a non-O_PATH fd on the handle's mount (shared, not owned)
    mount_fd: int = -1
    lookups: int = 0
    opens: int = 0
    pins: int = 0
    #: POSIX lock owner -> an fd of its own carrying the owner's OFD locks
    plocks: dict[int, int] = attrs.Factory(dict)
    #: POSIX lock owner -> the guest pid its last SETLK carried (GETLK reports it)
    lock_pids: dict[int, int] = attrs.Factory(dict)
    #: dropped from the tables; fd closed
    gone: bool = False

    @property
    def dev(self) -> int:
        return self.key[0]


@attrs.define(slots=True, eq=False)
class HostHandle:
    """An open file or directory of the passthrough backend (``fh`` in its
    handle table), shared by reference with its inline responder; the
    compiled twin is a C type with the same fields."""

    fh: int
    node: HostInode
    fd: int
    is_dir: bool
    writable: bool
    #: try preadv2(RWF_NOWAIT) on the loop first (cleared when the file refuses it)
    nowait_read: bool = False
    #: small writes run on the loop (the backend's ``inline_write_max``)
    inline_write: bool = False
    pins: int = 0
    closed: bool = False
    #: serialises lseek+getdents64 on a directory fd, and the dir_* fields below
    lock: threading.Lock = attrs.Factory(threading.Lock)
    #: directory only: the host cookie the fd is at (-1: unknown); the
    #: raw records the last getdents64 returned, and the cookie they start
    #: after (a reply that used part of them resumes from the rest, no
    #: syscall)
    dir_pos: int = -1
    dir_raw: bytes = b""
    dir_read_from: int = -1
    #: ``(raw, position, cookie)``: where in ``raw`` (the ``dir_raw`` it was
    #: made for) the last READDIR reply stopped, after the record with that
    #: cookie (a hint: the next request usually resumes there)
    dir_hint: tuple[bytes, int, int] | None = None

_IN_HEADER = abi.fuse_in_header.size  # 40
_OUT_HEADER = abi.fuse_out_header.size  # 16
_GETATTR_LEN = _IN_HEADER + abi.fuse_getattr_in.size  # 56
_ATTR_REPLY = _OUT_HEADER + abi.fuse_attr_out.size  # 120
_ENTRY_REPLY = _OUT_HEADER + abi.fuse_entry_out.size  # 144
_U32 = 0xFFFFFFFF
_OP_GETATTR = int(abi.Opcode.GETATTR)
_OP_LOOKUP = int(abi.Opcode.LOOKUP)
_OP_FORGET = int(abi.Opcode.FORGET)
_OP_FLUSH = int(abi.Opcode.FLUSH)
_OP_RELEASE = int(abi.Opcode.RELEASE)
_OP_RELEASEDIR = int(abi.Opcode.RELEASEDIR)
_CLOSE_IN = 24  # fuse_flush_in, fuse_release_in
_OP_READDIR = int(abi.Opcode.READDIR)
_OP_READDIRPLUS = int(abi.Opcode.READDIRPLUS)
_OP_CREATE = int(abi.Opcode.CREATE)
_CREATE_IN = abi.fuse_create_in.size  # 16
_CREATE_BODY = abi.fuse_entry_out.size + abi.fuse_open_out.size  # 144
_create_in_unpack_from = abi.fuse_create_in.unpack_from
_OP_SETATTR = int(abi.Opcode.SETATTR)
_SETATTR_IN = abi.fuse_setattr_in.size  # 88
_ATTR_OUT = abi.fuse_attr_out.size  # 104
_READ_IN = abi.fuse_read_in.size  # 40
_OP_UNLINK = int(abi.Opcode.UNLINK)
_OP_RMDIR = int(abi.Opcode.RMDIR)
_OP_OPEN = int(abi.Opcode.OPEN)
_OP_OPENDIR = int(abi.Opcode.OPENDIR)
_OPEN_IN = abi.fuse_open_in.size  # 8
_OPEN_OUT = abi.fuse_open_out.size  # 16
_OP_MKDIR = int(abi.Opcode.MKDIR)
_MKDIR_IN = abi.fuse_mkdir_in.size  # 8
_ENTRY_OUT = abi.fuse_entry_out.size  # 128
_mkdir_in_unpack_from = abi.fuse_mkdir_in.unpack_from
_O_PATH_NOFOLLOW = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC

log = logging.getLogger(__name__)

_in_header_unpack_from = abi.fuse_in_header.unpack_from
_out_header_pack = abi.fuse_out_header.pack
_read_in_unpack_from = abi.fuse_read_in.unpack_from
_attr_out_pack = abi.fuse_attr_out.pack
_entry_out_pack = abi.fuse_entry_out.pack
_attr_pack = abi.fuse_attr.pack
_dirent_pack = abi.fuse_dirent.pack


def _attr_fields(nodeid: int, st: os.stat_result, flags: int) -> tuple[int, ...] | None:
    """``fuse_attr`` fields, in wire order, of ``st`` as inode ``nodeid``;
    None when one does not fit its wire type (the full path then fails the
    same request with EIO and a log line)."""
    a, m, c = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
    if st.st_nlink > _U32 or not 0 <= st.st_blksize <= _U32:
        return None
    rdev = st.st_rdev
    return (
        nodeid, st.st_size, st.st_blocks,
        wire_seconds(a), wire_seconds(m), wire_seconds(c), a % _NS, m % _NS, c % _NS,
        st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
        host_rdev_to_guest(rdev) if rdev else 0, st.st_blksize, flags,
    )


def _component(body: bytes) -> bytes | None:
    """The name of a body that is one NUL-terminated name (the codec's
    framing rule), if it is a single component other than ``.`` and
    ``..``; else None."""
    if len(body) < 2 or body[-1] != 0:
        return None
    name = body[:-1]
    if len(name) > NAME_MAX or b"/" in name or b"\0" in name or name == b"." or name == b"..":
        return None
    return bytes(name)


def _callback_reply(r: bytes | int | None, unique: int, size: int) -> bytes | None:
    """A backend callback's answer as a reply: None (declined), an errno's
    header, or its ``size``-byte body after a header."""
    if r is None:
        return None
    if isinstance(r, int):
        return _out_header_pack(_OUT_HEADER, -r, unique)
    if len(r) != size:
        raise ValueError(f"a responder callback gave a {len(r)}-byte body, not {size}")
    return _out_header_pack(_OUT_HEADER + size, 0, unique) + r


class InlineGate:
    """A read-only class attribute (a data descriptor) whose value on an
    instance is the instance's attribute ``attr`` (a responder, or None),
    and None while ``logger`` is enabled for ``level``: a session's
    ``inline_responder``, read by the transport at every kick, so the
    check costs no Python frame in the compiled twin."""

    __slots__ = ("_attr", "_logger", "_level")

    def __init__(self, attr: str, logger: logging.Logger, level: int = logging.DEBUG) -> None:
        self._attr = attr
        self._logger = logger
        self._level = level

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return self
        value = getattr(obj, self._attr)
        if value is None or self._logger.isEnabledFor(self._level):
            return None
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        raise AttributeError("inline_responder is read-only (the session sets what it gives)")


class PassthroughResponder:
    """Answers GETATTR (and LOOKUP when ``lookups``) from ``inodes`` and
    ``by_key``; see the module docstring for what it answers and the
    contract on the tables. ``announce_submounts`` sets FUSE_ATTR_SUBMOUNT
    on a LOOKUP of a directory on another device than its parent."""

    __slots__ = ("_inodes", "_by_key", "_entry_valid", "_attr_valid", "_announce_submounts", "_lookups",
                 "_adopt", "_drop", "_flush", "_release", "_readdir", "_readdirplus", "_read_max", "_create",
                 "_setattr", "_remove", "_open", "_mkdir")

    def __init__(
        self,
        inodes: dict[int, Any],
        by_key: dict[tuple[int, int], Any],
        entry_timeout: float,
        attr_timeout: float,
        announce_submounts: bool,
        lookups: bool,
        handles: dict[int, Any] | None = None,
        read_max: int = 0,
        write_max: int = 0,
        adopt: Callable[[int, int, int, int], Any] | None = None,
        drop: Callable[[Any], None] | None = None,
        flush: Callable[[int, int], int] | None = None,
        release: Callable[[int, bool], int] | None = None,
        readdir: Callable[[int, int, int], bytes | None] | None = None,
        create: Callable[[int, bytes, int, int, int, int, int, int], bytes | int | None] | None = None,
        setattr: Callable[[int, bytes, int, int, int], bytes | int | None] | None = None,
        remove: Callable[[int, bytes, bool], int | None] | None = None,
        readdirplus: Callable[[int, int, int], bytes | None] | None = None,
        open: Callable[[int, int, bool], bytes | int | None] | None = None,
        mkdir: Callable[[int, bytes, int, int, int, int, int], bytes | int | None] | None = None,
        proc_fd: int = -1,
        create_host: tuple[Any, ...] | None = None,
        readdir_host: tuple[Any, ...] | None = None,
        tables: tuple[Any, ...] | None = None,
        close_host: Callable[[Any], bool] | None = None,
        remove_host: int | None = None,
    ) -> None:
        # handles (fh -> handle: fd, nowait_read, inline_write, closed),
        # read_max and write_max serve the compiled twin's READ and WRITE,
        # which use the guest's buffers themselves through its C entry
        # point; ``respond`` returns bytes and answers neither, in both
        # twins. read_max also bounds READDIR's size. proc_fd (an open
        # /proc/self/fd, or -1) lets the compiled twin make a SETATTR's host
        # calls itself where the backend's ``setattr`` would make them
        # through it (an inode with an O_PATH fd, no truncation), in the
        # same order with the same answers; this twin always calls
        # ``setattr``, the reference for what those calls are. create_host
        # (the backend's ``created`` callback, the open flags it keeps,
        # whether it switches credentials and handles the umask, its gate
        # for a parent directory, and its ``opened`` callback, the handle
        # half of ``created`` for when ``tables`` lets the compiled twin
        # install the inode) likewise lets the compiled twin make a CREATE's
        # open, fstat and O_PATH reopen itself where ``create`` would make
        # them as the daemon; this twin always calls ``create``.
        # readdir_host (the backend's gate for a directory's inode, its
        # ``remapped`` table, its root inode, the least getdents64 buffers
        # of READDIR and READDIRPLUS, the read-ahead factor and its host
        # record class) lets the compiled twin answer a READDIR as
        # ``readdir`` does (the same checks, host reads, records and handle
        # state), and a READDIRPLUS as ``readdirplus`` does, without calling
        # them; this twin always calls them. tables (the backend's ``remapped`` table, root inode,
        # inode class and first synthetic node id) lets the compiled twin
        # make ``adopt``'s and ``drop``'s table updates itself where they
        # are plain (see its ``_adopt_node``, ``_drop_node``); this twin
        # always calls them. close_host (the backend's gate for an inode's
        # filesystem), with tables, lets the compiled twin make FLUSH's and
        # RELEASE's closes and table updates as ``flush`` and ``release``
        # make them; this twin always calls those. remove_host (the
        # largest file whose last link the backend removes inline), with
        # readdir_host's gate, lets the compiled twin make UNLINK's and
        # RMDIR's checks and unlinkat as ``remove`` makes them; this twin
        # always calls ``remove``.
        self._inodes = inodes
        self._by_key = by_key
        self._entry_valid = split_timeout(entry_timeout)
        self._attr_valid = split_timeout(attr_timeout)
        self._announce_submounts = bool(announce_submounts)
        self._lookups = bool(lookups)
        self._adopt = adopt
        self._drop = drop
        self._flush = flush
        self._release = release
        self._readdir = readdir
        self._readdirplus = readdirplus
        self._create = create
        self._setattr = setattr
        self._remove = remove
        self._open = open
        self._mkdir = mkdir
        self._read_max = min(max(read_max, 0), _U32)

    def respond(self, request: bytes, room: int) -> bytes | None:
        """The reply to ``request`` (one whole request's readable bytes) if
        it fits in ``room`` bytes and is one this responder gives, else None."""
        if len(request) < _IN_HEADER:
            return None
        length, opcode, unique, nodeid, uid, gid, pid, extlen, _pad = _in_header_unpack_from(request)
        if extlen or length > len(request):
            return None
        if opcode == _OP_GETATTR:
            return self._getattr(unique, nodeid, length, room)
        if opcode == _OP_LOOKUP and self._lookups:
            return self._lookup(unique, nodeid, request[_IN_HEADER:length], room)
        if opcode == _OP_FORGET and self._drop is not None:
            return self._forget(nodeid, request[_IN_HEADER:length])
        if opcode in (_OP_FLUSH, _OP_RELEASE, _OP_RELEASEDIR):
            return self._close(opcode, unique, request[_IN_HEADER:length], room)
        if opcode == _OP_READDIR and self._readdir is not None:
            return self._readdir_reply(self._readdir, unique, request[_IN_HEADER:length], room)
        if opcode == _OP_READDIRPLUS and self._readdirplus is not None:
            return self._readdir_reply(self._readdirplus, unique, request[_IN_HEADER:length], room)
        if opcode == _OP_SETATTR and self._setattr is not None:
            return self._setattr_reply(unique, nodeid, uid, gid, pid, request[_IN_HEADER:length], room)
        if opcode == _OP_CREATE and self._create is not None:
            return self._create_reply(unique, nodeid, uid, gid, pid, request[_IN_HEADER:length], room)
        if (opcode == _OP_UNLINK or opcode == _OP_RMDIR) and self._remove is not None:
            name = _component(request[_IN_HEADER:length])
            if name is None or room < _OUT_HEADER:
                return None
            return _callback_reply(self._remove(nodeid, name, opcode == _OP_RMDIR), unique, 0)
        if (opcode == _OP_OPEN or opcode == _OP_OPENDIR) and self._open is not None:
            if length < _IN_HEADER + _OPEN_IN or room < _OUT_HEADER + _OPEN_OUT:
                return None
            flags = int.from_bytes(request[_IN_HEADER:_IN_HEADER + 4], "little")
            return _callback_reply(self._open(nodeid, flags, opcode == _OP_OPENDIR), unique, _OPEN_OUT)
        if opcode == _OP_MKDIR and self._mkdir is not None:
            body = request[_IN_HEADER:length]
            if len(body) < _MKDIR_IN or room < _OUT_HEADER + _ENTRY_OUT:
                return None
            name = _component(body[_MKDIR_IN:])
            if name is None:
                return None
            mode, umask = _mkdir_in_unpack_from(body)
            return _callback_reply(self._mkdir(nodeid, name, mode, umask, uid, gid, pid), unique, _ENTRY_OUT)
        return None

    def _setattr_reply(self, unique: int, nodeid: int, uid: int, gid: int, pid: int, body: bytes,
                       room: int) -> bytes | None:
        if len(body) < _SETATTR_IN or room < _OUT_HEADER + _ATTR_OUT:
            return None
        r = self._setattr(nodeid, bytes(body[:_SETATTR_IN]), uid, gid, pid)  # type: ignore[misc]
        return _callback_reply(r, unique, _ATTR_OUT)

    def _create_reply(self, unique: int, parent: int, uid: int, gid: int, pid: int, body: bytes,
                      room: int) -> bytes | None:
        # body: fuse_create_in, then the name and its NUL (the codec's framing rule)
        if len(body) < _CREATE_IN or room < _OUT_HEADER + _CREATE_BODY:
            return None
        name = _component(body[_CREATE_IN:])
        if name is None:
            return None
        flags, mode, umask, _open_flags = _create_in_unpack_from(body)
        r = self._create(parent, name, mode, flags, umask, uid, gid, pid)  # type: ignore[misc]
        return _callback_reply(r, unique, _CREATE_BODY)

    def _readdir_reply(self, callback: Callable[[int, int, int], bytes | None], unique: int, body: bytes,
                       room: int) -> bytes | None:
        if len(body) < _READ_IN:
            return None
        fh, offset, size = _read_in_unpack_from(body)[:3]
        if size == 0 or size > self._read_max or room < _OUT_HEADER + size:
            return None
        records = callback(fh, offset, size)
        if records is None or len(records) > size:
            return None
        return _out_header_pack(_OUT_HEADER + len(records), 0, unique) + records

    def _close(self, opcode: int, unique: int, body: bytes, room: int) -> bytes | None:
        if len(body) < _CLOSE_IN or room < _OUT_HEADER:
            return None
        fh = int.from_bytes(body[:8], "little")
        if opcode == _OP_FLUSH:
            if self._flush is None:
                return None
            r = self._flush(fh, int.from_bytes(body[16:24], "little"))
        else:
            if self._release is None:
                return None
            r = self._release(fh, opcode == _OP_RELEASEDIR)
        if r < 0:
            return None
        return _out_header_pack(_OUT_HEADER, -r, unique)

    def _forget(self, nodeid: int, body: bytes) -> bytes | None:
        if len(body) < 8 or nodeid == abi.FUSE_ROOT_ID:
            return None
        n = int.from_bytes(body[:8], "little")
        node = self._inodes.get(nodeid)
        if node is None or n == 0:
            return b""  # the full path ignores it too
        if node.lookups <= n:
            node.lookups = 0
            try:
                self._drop(node)  # type: ignore[misc]
            except Exception:
                # Answered all the same: the count is already down, and the
                # full path must not take it down again.
                log.exception("dropping inode %d after FORGET failed", nodeid)
        else:
            node.lookups -= n
        return b""

    def pack_readdirplus(
        self, dirfd: int, parent: Any, batch: list[tuple[int, int, int, bytes]], start: int, room: int,
        dot: int, dotdot: int, counted: list[Any],
    ) -> tuple[bytes, int]:
        """READDIRPLUS records (``fuse_direntplus``, the full path's bytes)
        for host entries ``batch[start:]`` (``(d_ino, d_off, d_type, name)``)
        of directory ``parent``, open as ``dirfd``, as many as fit whole in
        ``room`` bytes; returns them and the index after the last entry
        used. Each name but ``.``/``..`` is looked up as LOOKUP does (an
        O_PATH fd, nothing followed; a new inode goes to ``adopt``) and
        counts one lookup; ``counted`` gets one item per record, in order:
        the inode whose count went up, or None for ``.``/``..`` (uncounted:
        nodeid 0, the dirent's inode number ``dot``, ``dotdot``, or when 0
        the table's node id of the host's, a directory). A name gone since
        getdents is skipped; OSError on another failing call, ValueError on
        a bad name (the records counted so far are in ``counted``)."""
        if self._adopt is None:
            raise ValueError("pack_readdirplus needs an adopt callback")
        parts: list[bytes] = []
        used = 0
        pdev = parent.key[0]
        entry_valid, entry_nsec = self._entry_valid
        attr_valid, attr_nsec = self._attr_valid
        i, count = start, len(batch)
        while i < count:
            d_ino, d_off, _d_type, name = batch[i]
            if not isinstance(name, bytes):
                raise TypeError("a host directory record's name is bytes")
            n = len(name)
            need = (152 + n + 7) & ~7
            if used + need > room:
                break
            if not n or n > NAME_MAX or b"/" in name or b"\0" in name:
                raise ValueError(f"invalid directory entry name {name[:64]!r}")
            if name == b"." or name == b"..":
                if name == b".":
                    nid = dot
                elif dotdot:
                    nid = dotdot
                else:
                    known = self._by_key.get((pdev, d_ino))
                    nid = d_ino if known is None else known.nodeid
                head = bytes(40) + _attr_pack(nid, 0, 0, 0, 0, 0, 0, 0, 0, stat.S_IFDIR, 1, 0, 0, 0, 4096, 0)
                counted.append(None)
                dtype = stat.S_IFDIR >> 12
            else:
                try:
                    fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=dirfd)
                except FileNotFoundError:
                    i += 1  # gone since getdents
                    continue
                try:
                    st = os.fstat(fd)
                except BaseException:
                    os.close(fd)
                    raise
                node = self._by_key.get((st.st_dev, st.st_ino))
                if node is not None:
                    os.close(fd)
                else:
                    try:
                        node = self._adopt(fd, st.st_dev, st.st_ino, st.st_mode)
                    except BaseException:
                        os.close(fd)
                        raise
                nid = node.nodeid
                flags = 0
                if self._announce_submounts and stat.S_ISDIR(st.st_mode) and st.st_dev != pdev:
                    flags = abi.FUSE_ATTR_SUBMOUNT
                fields = _attr_fields(nid, st, flags)
                if fields is None:
                    raise ValueError(f"attributes of {name[:64]!r} do not fit fuse_attr")
                head = _entry_out_pack(nid, 0, entry_valid, attr_valid, entry_nsec, attr_nsec, *fields)
                node.lookups += 1
                counted.append(node)
                dtype = stat.S_IFMT(st.st_mode) >> 12
            parts.append(head + _dirent_pack(nid, d_off, n, dtype) + name + bytes((-n) & 7))
            used += need
            i += 1
        return b"".join(parts), i

    def _open_new(self, dirfd: int, name: bytes) -> tuple[Any, os.stat_result] | None:
        """The inode of ``name`` in ``dirfd`` that the tables do not have
        yet, and its stat: an O_PATH fd of it (a single component, nothing
        followed), ``fstat`` and ``adopt``. None, with nothing left open or
        changed, when a call fails."""
        try:
            fd = os.open(name, _O_PATH_NOFOLLOW, dir_fd=dirfd)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            return None
        try:
            return self._adopt(fd, st.st_dev, st.st_ino, st.st_mode), st  # type: ignore[misc]
        except BaseException:
            os.close(fd)  # adopt takes the fd only when it returns
            raise

    def _getattr(self, unique: int, nodeid: int, length: int, room: int) -> bytes | None:
        if length < _GETATTR_LEN or room < _ATTR_REPLY:
            return None
        node = self._inodes.get(nodeid)
        if node is None or node.fd < 0:
            return None
        try:
            st = os.fstat(node.fd)
        except OSError:
            return None
        fields = _attr_fields(nodeid, st, 0)
        if fields is None:
            return None
        valid, nsec = self._attr_valid
        return _out_header_pack(_ATTR_REPLY, 0, unique) + _attr_out_pack(valid, nsec, 0, *fields)

    def _lookup(self, unique: int, parent_id: int, body: bytes, room: int) -> bytes | None:
        name = _component(body)
        if name is None:
            return None
        parent = self._inodes.get(parent_id)
        if parent is None or parent.kind != stat.S_IFDIR or parent.fd < 0:
            return None
        try:
            st = os.stat(name, dir_fd=parent.fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENOENT and room >= _OUT_HEADER:
                return _out_header_pack(_OUT_HEADER, -errno.ENOENT, unique)
            return None
        if room < _ENTRY_REPLY:
            return None
        node = self._by_key.get((st.st_dev, st.st_ino))
        if node is None:
            if self._adopt is None:
                return None
            found = self._open_new(parent.fd, name)
            if found is None:
                return None
            node, st = found
        flags = 0
        if self._announce_submounts and stat.S_ISDIR(st.st_mode) and st.st_dev != parent.key[0]:
            flags = abi.FUSE_ATTR_SUBMOUNT
        fields = _attr_fields(node.nodeid, st, flags)
        if fields is None:
            return None
        entry_valid, entry_nsec = self._entry_valid
        attr_valid, attr_nsec = self._attr_valid
        reply = _out_header_pack(_ENTRY_REPLY, 0, unique) + _entry_out_pack(
            node.nodeid, 0, entry_valid, attr_valid, entry_nsec, attr_nsec, *fields
        )
        node.lookups += 1
        return reply
