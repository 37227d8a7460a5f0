"""A complete POSIX filesystem kept in RAM, behind :class:`Operations`.

Contracts:

* Every method runs to completion without yielding to the event loop (there is
  no ``await`` inside a mutation), so each request is atomic with respect to
  every other request. Nothing here imports an event loop.
* Regular files are sparse: data lives in fixed-size chunks (``chunk_size``,
  64 KiB by default) in a dict keyed by chunk index; a missing chunk is a hole
  that reads as zeros and takes no memory. Space (``size_bytes``) is accounted
  per stored chunk; ``statfs`` and ``st_blocks`` report that.
* Lookup counts follow the operations.py contract; an inode is dropped only
  when it has no name (nlink == 0), no open handle and no lookup left.
* Permission checks follow Linux: owner/group/other bits against
  ``ctx.uid``/``ctx.gid``/``ctx.groups`` (unknown groups count as none),
  uid 0 bypasses read/write and search
  but needs one x bit to execute a non-directory.
* readdir offsets are per-directory cookies given at insertion and never
  reused, so a listing resumed at any offset neither skips nor repeats an
  entry that stayed in place meanwhile. ``.`` and ``..`` have cookies 1 and 2.
"""
from __future__ import annotations

import bisect
import errno
import stat
import time
from typing import Iterator, Sequence

import attrs

from .._accel import scatter
from ..errors import FuseError
from ..operations import (  # RENAME_* re-exported
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    RENAME_WHITEOUT,
    ROOT_INODE,
    DirectoryReply,
    EntryAttributes,
    FileHandleT,
    FileInfo,
    InodeT,
    Operations,
    RequestContext,
    SetattrFields,
    StatvfsData,
)

__all__ = [
    "MemoryFS",
    "DEFAULT_CHUNK_SIZE",
    "MAX_FILE_SIZE",
    "NAME_MAX",
    "SYMLINK_MAX",
    "XATTR_NAME_MAX",
    "XATTR_SIZE_MAX",
    "LINK_MAX",
    "RENAME_NOREPLACE",
    "RENAME_EXCHANGE",
    "RENAME_WHITEOUT",
    "XATTR_CREATE",
    "XATTR_REPLACE",
    "FALLOC_FL_KEEP_SIZE",
    "FALLOC_FL_PUNCH_HOLE",
    "FALLOC_FL_ZERO_RANGE",
    "SEEK_DATA",
    "SEEK_HOLE",
]

# Linux ABI values as the guest sends them (generic values, same on x86 and arm64).
O_ACCMODE = 0o3
O_RDONLY = 0o0
O_WRONLY = 0o1
O_RDWR = 0o2
O_EXCL = 0o200
O_TRUNC = 0o1000
O_APPEND = 0o2000

XATTR_CREATE = 1
XATTR_REPLACE = 2

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

SEEK_DATA = 3
SEEK_HOLE = 4

R_OK = 4
W_OK = 2
X_OK = 1

NAME_MAX = 255
SYMLINK_MAX = 4095  # PATH_MAX - 1
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
#: Total bytes of xattr values one inode may hold (memory bound per inode).
XATTR_VALUES_MAX = 1 << 20
LINK_MAX = 65000
MAX_FILE_SIZE = 2**63 - 1
DEFAULT_CHUNK_SIZE = 64 * 1024

_DOTS = (b".", b"..")
_XATTR_PREFIXES = (b"user.", b"trusted.", b"security.", b"system.")
_BLKSIZE = 4096


def _err(code: int) -> FuseError:
    return FuseError(code)


@attrs.define(slots=True, eq=False)
class _DirData:
    """Entries of one directory, in insertion order, each with its cookie."""

    parent: "_Inode"
    #: name -> (cookie, inode)
    entries: dict[bytes, tuple[int, "_Inode"]] = attrs.Factory(dict)
    #: cookie -> name, for live entries only
    names: dict[int, bytes] = attrs.Factory(dict)
    #: every cookie handed out that may still be live, ascending
    order: list[int] = attrs.Factory(list)
    next_cookie: int = 3
    dead: int = 0

    def add(self, name: bytes, node: "_Inode") -> None:
        cookie = self.next_cookie
        self.next_cookie += 1
        self.entries[name] = (cookie, node)
        self.names[cookie] = name
        self.order.append(cookie)

    def remove(self, name: bytes) -> "_Inode":
        cookie, node = self.entries.pop(name)
        del self.names[cookie]
        self.dead += 1
        if self.dead > 64 and self.dead * 2 > len(self.order):
            self.order = [c for c in self.order if c in self.names]
            self.dead = 0
        return node

    def replace(self, name: bytes, node: "_Inode") -> None:
        """Point an existing entry at another inode, keeping its cookie."""
        cookie, _ = self.entries[name]
        self.entries[name] = (cookie, node)

    def get(self, name: bytes) -> "_Inode | None":
        found = self.entries.get(name)
        return None if found is None else found[1]

    def after(self, offset: int) -> Iterator[tuple[int, bytes, "_Inode"]]:
        """Live entries whose cookie is greater than ``offset``, in order."""
        order = self.order
        i = bisect.bisect_right(order, offset)
        names = self.names
        entries = self.entries
        while i < len(order):
            cookie = order[i]
            i += 1
            name = names.get(cookie)
            if name is not None:
                yield cookie, name, entries[name][1]


@attrs.define(slots=True, eq=False)
class _Inode:
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    rdev: int = 0
    size: int = 0
    #: chunk index -> chunk (regular files only)
    chunks: dict[int, bytearray] | None = None
    #: symlink target
    target: bytes = b""
    #: directory entries (directories only)
    dir: _DirData | None = None
    xattrs: dict[bytes, bytes] | None = None
    lookups: int = 0
    opens: int = 0
    #: an O_TMPFILE inode that ``link`` may give a name despite nlink == 0
    linkable: bool = False

    @property
    def is_dir(self) -> bool:
        return self.dir is not None


@attrs.define(slots=True, eq=False)
class _Handle:
    node: _Inode
    readable: bool = True
    writable: bool = False
    append: bool = False
    is_dir: bool = False


def _in_group(ctx: RequestContext, gid: int) -> bool:
    return ctx.gid == gid or (ctx.groups is not None and gid in ctx.groups)


def _join(data: Sequence[memoryview]) -> bytes | memoryview:
    """One flat byte buffer (no copy for a single byte-format view)."""
    if len(data) == 1:
        view = memoryview(data[0])
        return view if view.format == "B" and view.ndim == 1 else view.cast("B")
    return b"".join(data)


class MemoryFS(Operations):
    """An in-memory filesystem; see the module docstring for its contracts.

    ``size_bytes`` bounds stored file data (ENOSPC beyond), ``max_inodes``
    the number of live inodes, ``uid``/``gid``/``mode`` describe the root
    directory. ``chunk_size`` (a positive multiple of 512) is the sparse-file
    allocation unit.
    """

    supports_killpriv_v2 = True
    supports_readdirplus = True

    def __init__(
        self,
        *,
        size_bytes: int = 1 << 30,
        max_inodes: int = 1 << 20,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o755,
        entry_timeout: float = 1.0,
        attr_timeout: float = 1.0,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if chunk_size <= 0 or chunk_size % 512:
            raise ValueError("chunk_size must be a positive multiple of 512")
        if size_bytes < 0 or max_inodes < 1:
            raise ValueError("size_bytes must be >= 0 and max_inodes >= 1")
        self.size_bytes = size_bytes
        self.max_inodes = max_inodes
        self.entry_timeout = entry_timeout
        self.attr_timeout = attr_timeout
        self.chunk_size = chunk_size
        self._capacity_chunks = size_bytes // chunk_size
        self._used_chunks = 0
        self._next_ino = ROOT_INODE + 1
        self._next_fh = 1
        self._handles: dict[int, _Handle] = {}
        now = time.time_ns()
        root = _Inode(
            ino=ROOT_INODE,
            mode=stat.S_IFDIR | (mode & 0o7777),
            uid=uid,
            gid=gid,
            nlink=2,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        root.dir = _DirData(parent=root)
        self._root = root
        self._inodes: dict[int, _Inode] = {ROOT_INODE: root}

    # ------------------------------------------------------------------
    # introspection helpers (for tests and tools; not part of Operations)
    @property
    def inode_count(self) -> int:
        """Number of live inodes (including unlinked ones still in use)."""
        return len(self._inodes)

    @property
    def used_bytes(self) -> int:
        """Bytes of file data stored (whole chunks)."""
        return self._used_chunks * self.chunk_size

    def lookup_count(self, inode: int) -> int:
        """The lookup count of ``inode``; 0 if it is not (or no longer) known."""
        node = self._inodes.get(inode)
        return 0 if node is None else node.lookups

    def has_inode(self, inode: int) -> bool:
        return inode in self._inodes

    # ------------------------------------------------------------------
    # internal helpers
    def _node(self, ino: int) -> _Inode:
        node = self._inodes.get(ino)
        if node is None:
            raise _err(errno.ESTALE)
        return node

    def _dirnode(self, ino: int) -> _Inode:
        node = self._node(ino)
        if node.dir is None:
            raise _err(errno.ENOTDIR)
        return node

    def _handle(self, fh: int) -> _Handle:
        handle = self._handles.get(fh)
        if handle is None:
            raise _err(errno.EBADF)
        return handle

    def _file_handle(self, fh: int) -> _Handle:
        handle = self._handle(fh)
        if handle.is_dir:
            raise _err(errno.EISDIR)
        return handle

    @staticmethod
    def _check_name(name: bytes) -> None:
        if len(name) > NAME_MAX:
            raise _err(errno.ENAMETOOLONG)
        if not name or b"/" in name or b"\0" in name:
            raise _err(errno.EINVAL)

    @staticmethod
    def _may(node: _Inode, mask: int, ctx: RequestContext) -> None:
        """Raise EACCES unless ``ctx`` has every R/W/X bit of ``mask`` on ``node``."""
        if not mask:
            return
        mode = node.mode
        if ctx.uid == 0:
            if mask & X_OK and node.dir is None and not mode & 0o111:
                raise _err(errno.EACCES)
            return
        if ctx.uid == node.uid:
            bits = (mode >> 6) & 7
        elif _in_group(ctx, node.gid):
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if mask & ~bits:
            raise _err(errno.EACCES)

    @staticmethod
    def _check_sticky(d: _Inode, node: _Inode, ctx: RequestContext) -> None:
        if d.mode & stat.S_ISVTX and ctx.uid not in (0, node.uid, d.uid):
            raise _err(errno.EPERM)

    def _attrs(self, node: _Inode) -> EntryAttributes:
        if node.chunks is not None:
            size = node.size
            blocks = len(node.chunks) * (self.chunk_size // 512)
        elif node.dir is not None:
            size = _BLKSIZE
            blocks = 0
        else:
            size = node.size
            blocks = 0
        return EntryAttributes(
            st_ino=node.ino,
            generation=0,
            entry_timeout=self.entry_timeout,
            attr_timeout=self.attr_timeout,
            st_mode=node.mode,
            st_nlink=node.nlink,
            st_uid=node.uid,
            st_gid=node.gid,
            st_rdev=node.rdev,
            st_size=size,
            st_blksize=_BLKSIZE,
            st_blocks=blocks,
            st_atime_ns=node.atime_ns,
            st_mtime_ns=node.mtime_ns,
            st_ctime_ns=node.ctime_ns,
        )

    def _entry(self, node: _Inode) -> EntryAttributes:
        """Attributes handed to the guest: counts one lookup."""
        node.lookups += 1
        return self._attrs(node)

    def _maybe_drop(self, node: _Inode) -> None:
        if node.nlink == 0 and node.opens == 0 and node.lookups == 0 and node.ino != ROOT_INODE:
            if self._inodes.pop(node.ino, None) is not None and node.chunks:
                self._used_chunks -= len(node.chunks)
                node.chunks.clear()

    def _check_new_name(self, parent: int, name: bytes, ctx: RequestContext) -> _Inode:
        """Checks shared by every call that adds a name; returns the directory."""
        d = self._dirnode(parent)
        self._check_name(name)
        self._may(d, X_OK, ctx)
        if name in _DOTS:
            raise _err(errno.EEXIST)
        if d.nlink == 0:
            raise _err(errno.ENOENT)
        assert d.dir is not None
        if name in d.dir.entries:
            raise _err(errno.EEXIST)
        self._may(d, W_OK | X_OK, ctx)
        return d

    def _prepare_create(self, parent: int, name: bytes, ctx: RequestContext) -> _Inode:
        """``_check_new_name`` plus room for a new inode; returns the directory."""
        d = self._check_new_name(parent, name, ctx)
        self._check_inode_space()
        return d

    def _check_inode_space(self) -> None:
        if len(self._inodes) >= self.max_inodes:
            raise _err(errno.ENOSPC)

    def _new_inode(self, d: _Inode, mode: int, ctx: RequestContext, now: int) -> _Inode:
        """A new inode owned by ``ctx`` in directory ``d`` (setgid rules applied)."""
        gid = ctx.gid
        if d.mode & stat.S_ISGID:
            gid = d.gid
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            elif (
                mode & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP)
                and ctx.uid != 0
                and not _in_group(ctx, gid)
            ):
                mode &= ~stat.S_ISGID
        ino = self._next_ino
        self._next_ino += 1
        node = _Inode(
            ino=ino,
            mode=mode,
            uid=ctx.uid,
            gid=gid,
            nlink=1,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        self._inodes[ino] = node
        return node

    def _link_new(self, d: _Inode, name: bytes, node: _Inode, now: int) -> None:
        assert d.dir is not None
        d.dir.add(name, node)
        d.mtime_ns = d.ctime_ns = now

    @staticmethod
    def _kill_suidgid(node: _Inode) -> bool:
        """Drop S_ISUID, and S_ISGID when group-exec is set (Linux rule).
        Returns whether the mode changed."""
        if node.dir is not None:
            return False
        mode = node.mode
        new = mode & ~stat.S_ISUID
        if new & (stat.S_ISGID | stat.S_IXGRP) == (stat.S_ISGID | stat.S_IXGRP):
            new &= ~stat.S_ISGID
        if new != mode:
            node.mode = new
            return True
        return False

    @staticmethod
    def _is_ancestor(a: _Inode, d: _Inode) -> bool:
        """Whether directory ``a`` is ``d`` or one of its ancestors."""
        node = d
        while True:
            if node is a:
                return True
            assert node.dir is not None
            parent = node.dir.parent
            if parent is node:
                return False
            node = parent

    # -- chunk store ------------------------------------------------------
    def _free_chunks(self) -> int:
        return self._capacity_chunks - self._used_chunks

    def _keys_in(self, node: _Inode, first: int, last: int) -> list[int]:
        """Indices of stored chunks in [first, last], ascending."""
        chunks = node.chunks
        assert chunks is not None
        if last - first + 1 <= len(chunks):
            return [i for i in range(first, last + 1) if i in chunks]
        return sorted(i for i in chunks if first <= i <= last)

    def _read_range(self, node: _Inode, offset: int, n: int) -> bytes:
        parts = self._range_parts(node, offset, n)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def _range_parts(self, node: _Inode, offset: int, n: int) -> list[memoryview]:
        """The ``n`` stored bytes at ``offset`` as views of the chunks (a
        hole reads as zeros); valid until the file next changes."""
        cs = self.chunk_size
        chunks = node.chunks
        assert chunks is not None
        parts: list[memoryview] = []
        idx, start = divmod(offset, cs)
        pos = 0
        while pos < n:
            k = min(cs - start, n - pos)
            chunk = chunks.get(idx)
            parts.append(memoryview(chunk)[start : start + k] if chunk is not None else memoryview(bytes(k)))
            pos += k
            idx += 1
            start = 0
        return parts

    def _write_range(self, node: _Inode, offset: int, buf: bytes | memoryview) -> None:
        """Store ``buf`` at ``offset``; raises ENOSPC before changing anything."""
        n = len(buf)
        if not n:
            return
        cs = self.chunk_size
        chunks = node.chunks
        assert chunks is not None
        first = offset // cs
        last = (offset + n - 1) // cs
        missing = sum(1 for i in range(first, last + 1) if i not in chunks)
        if missing > self._free_chunks():
            raise _err(errno.ENOSPC)
        view = memoryview(buf)
        start = offset - first * cs
        pos = 0
        idx = first
        while pos < n:
            k = min(cs - start, n - pos)
            chunk = chunks.get(idx)
            if chunk is None:
                chunk = chunks[idx] = bytearray(cs)
                self._used_chunks += 1
            chunk[start : start + k] = view[pos : pos + k]
            pos += k
            idx += 1
            start = 0
        if offset + n > node.size:
            node.size = offset + n

    def _punch(self, node: _Inode, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing whole chunks."""
        if length <= 0:
            return
        cs = self.chunk_size
        chunks = node.chunks
        assert chunks is not None
        end = offset + length
        for idx in self._keys_in(node, offset // cs, (end - 1) // cs):
            base = idx * cs
            lo = max(offset, base) - base
            hi = min(end, base + cs) - base
            if lo == 0 and hi == cs:
                del chunks[idx]
                self._used_chunks -= 1
            else:
                chunks[idx][lo:hi] = bytes(hi - lo)

    def _allocate(self, node: _Inode, offset: int, length: int, zero: bool) -> None:
        """Ensure chunks exist over the range (zeroing it first if ``zero``);
        ENOSPC before any change."""
        cs = self.chunk_size
        chunks = node.chunks
        assert chunks is not None
        first = offset // cs
        last = (offset + length - 1) // cs
        present = self._keys_in(node, first, last)
        missing = (last - first + 1) - len(present)
        if missing > self._free_chunks():
            raise _err(errno.ENOSPC)
        if zero:
            end = offset + length
            for idx in present:
                base = idx * cs
                lo = max(offset, base) - base
                hi = min(end, base + cs) - base
                chunks[idx][lo:hi] = bytes(hi - lo)
        if missing:
            for idx in range(first, last + 1):
                if idx not in chunks:
                    chunks[idx] = bytearray(cs)
                    self._used_chunks += 1

    def _set_size(self, node: _Inode, size: int) -> None:
        chunks = node.chunks
        assert chunks is not None
        if size < node.size:
            cs = self.chunk_size
            keep = -(-size // cs)  # chunks with index >= keep lie wholly past EOF
            doomed = [i for i in chunks if i >= keep]
            for i in doomed:
                del chunks[i]
            self._used_chunks -= len(doomed)
            tail = size % cs
            if tail:
                chunk = chunks.get(size // cs)
                if chunk is not None:
                    chunk[tail:] = bytes(cs - tail)
        node.size = size

    # ------------------------------------------------------------------
    # lifecycle
    async def destroy(self) -> None:
        """Drop every lookup count and handle; unlinked inodes go away, the
        tree stays."""
        self._handles.clear()
        for node in list(self._inodes.values()):
            node.lookups = 0
            node.opens = 0
            self._maybe_drop(node)

    # ------------------------------------------------------------------
    # names and inodes
    async def lookup(self, parent: InodeT, name: bytes, ctx: RequestContext) -> EntryAttributes:
        d = self._dirnode(parent)
        self._check_name(name)
        self._may(d, X_OK, ctx)
        assert d.dir is not None
        if name == b".":
            return self._entry(d)
        if d.nlink == 0:
            raise _err(errno.ENOENT)  # looking up in a removed directory
        if name == b"..":
            return self._entry(d.dir.parent)
        node = d.dir.get(name)
        if node is None:
            raise _err(errno.ENOENT)
        return self._entry(node)

    async def forget(self, inodes: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inodes:
            node = self._inodes.get(ino)
            if node is None or n <= 0:
                continue
            node.lookups = max(0, node.lookups - n)
            self._maybe_drop(node)

    async def getattr(self, inode: InodeT, ctx: RequestContext, fh: FileHandleT | None = None) -> EntryAttributes:
        if fh is not None and fh in self._handles:
            return self._attrs(self._handles[fh].node)
        return self._attrs(self._node(inode))

    async def setattr(
        self,
        inode: InodeT,
        attr: EntryAttributes,
        fields: SetattrFields,
        fh: FileHandleT | None,
        ctx: RequestContext,
    ) -> EntryAttributes:
        handle = self._handles.get(fh) if fh is not None else None
        node = handle.node if handle is not None else self._node(inode)
        f = fields
        root = ctx.uid == 0
        owner = root or ctx.uid == node.uid

        # -- validate everything first (the call is all-or-nothing) --
        new_uid = attr.st_uid if f.update_uid else node.uid
        new_gid = attr.st_gid if f.update_gid else node.gid
        if f.update_uid and not root and not (ctx.uid == node.uid and new_uid == node.uid):
            raise _err(errno.EPERM)
        if f.update_gid and not root and not (
            ctx.uid == node.uid and (new_gid == node.gid or _in_group(ctx, new_gid))
        ):
            raise _err(errno.EPERM)
        if f.update_mode and not owner:
            raise _err(errno.EPERM)
        if f.update_size:
            if node.dir is not None:
                raise _err(errno.EISDIR)
            if node.chunks is None:
                raise _err(errno.EINVAL)
            if attr.st_size < 0:
                raise _err(errno.EINVAL)
            if attr.st_size > MAX_FILE_SIZE:
                raise _err(errno.EFBIG)
            if handle is None:
                self._may(node, W_OK, ctx)
            elif not handle.writable:
                raise _err(errno.EBADF)
        atime_set = f.update_atime and not f.update_atime_now
        mtime_set = f.update_mtime and not f.update_mtime_now
        if atime_set or mtime_set:
            if not owner:
                raise _err(errno.EPERM)
        elif (f.update_atime_now or f.update_mtime_now) and not owner:
            self._may(node, W_OK, ctx)

        # -- apply --
        now = time.time_ns()
        changed = False
        if f.update_size:
            self._set_size(node, attr.st_size)
            node.mtime_ns = now
            changed = True
            if f.kill_suidgid or not root:
                self._kill_suidgid(node)
        if f.update_uid or f.update_gid:
            node.uid = new_uid
            node.gid = new_gid
            self._kill_suidgid(node)
            changed = True
        if f.update_mode:
            mode = attr.st_mode & 0o7777
            if not root and not _in_group(ctx, node.gid):
                mode &= ~stat.S_ISGID
            node.mode = stat.S_IFMT(node.mode) | mode
            changed = True
        if f.kill_suidgid and not f.update_size:
            self._kill_suidgid(node)
            changed = True
        if f.update_atime_now:
            node.atime_ns = now
            changed = True
        elif f.update_atime:
            node.atime_ns = attr.st_atime_ns
            changed = True
        if f.update_mtime_now:
            node.mtime_ns = now
            changed = True
        elif f.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
            changed = True
        if f.update_ctime:
            node.ctime_ns = attr.st_ctime_ns
        elif changed:
            node.ctime_ns = now
        return self._attrs(node)

    async def readlink(self, inode: InodeT, ctx: RequestContext) -> bytes:
        node = self._node(inode)
        if not stat.S_ISLNK(node.mode):
            raise _err(errno.EINVAL)
        node.atime_ns = time.time_ns()
        return node.target

    async def mknod(self, parent: InodeT, name: bytes, mode: int, rdev: int, ctx: RequestContext) -> EntryAttributes:
        kind = stat.S_IFMT(mode)
        if kind == 0:
            kind = stat.S_IFREG
        if kind == stat.S_IFDIR:
            raise _err(errno.EPERM)
        if kind not in (stat.S_IFREG, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            raise _err(errno.EINVAL)
        d = self._prepare_create(parent, name, ctx)
        is_dev = kind in (stat.S_IFCHR, stat.S_IFBLK)
        if is_dev and ctx.uid != 0 and not (kind == stat.S_IFCHR and rdev == 0):
            raise _err(errno.EPERM)
        now = time.time_ns()
        node = self._new_inode(d, kind | (mode & ~ctx.umask & 0o7777), ctx, now)
        if kind == stat.S_IFREG:
            node.chunks = {}
        if is_dev:
            node.rdev = rdev
        self._link_new(d, name, node, now)
        return self._entry(node)

    async def mkdir(self, parent: InodeT, name: bytes, mode: int, ctx: RequestContext) -> EntryAttributes:
        d = self._prepare_create(parent, name, ctx)
        now = time.time_ns()
        node = self._new_inode(d, stat.S_IFDIR | (mode & ~ctx.umask & 0o1777), ctx, now)
        node.nlink = 2
        node.dir = _DirData(parent=d)
        d.nlink += 1
        self._link_new(d, name, node, now)
        return self._entry(node)

    async def symlink(self, parent: InodeT, name: bytes, target: bytes, ctx: RequestContext) -> EntryAttributes:
        if not target:
            raise _err(errno.ENOENT)
        if len(target) > SYMLINK_MAX:
            raise _err(errno.ENAMETOOLONG)
        d = self._prepare_create(parent, name, ctx)
        now = time.time_ns()
        node = self._new_inode(d, stat.S_IFLNK | 0o777, ctx, now)
        node.target = bytes(target)
        node.size = len(target)
        self._link_new(d, name, node, now)
        return self._entry(node)

    async def link(self, inode: InodeT, new_parent: InodeT, new_name: bytes, ctx: RequestContext) -> EntryAttributes:
        node = self._node(inode)
        d = self._check_new_name(new_parent, new_name, ctx)
        if node.dir is not None:
            raise _err(errno.EPERM)
        if node.nlink == 0 and not node.linkable:
            raise _err(errno.ENOENT)
        if node.nlink >= LINK_MAX:
            raise _err(errno.EMLINK)
        now = time.time_ns()
        node.nlink += 1
        node.linkable = False
        node.ctime_ns = now
        self._link_new(d, new_name, node, now)
        return self._entry(node)

    async def unlink(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        d = self._dirnode(parent)
        self._check_name(name)
        self._may(d, X_OK, ctx)
        if name in _DOTS:
            raise _err(errno.EISDIR)
        assert d.dir is not None
        node = d.dir.get(name)
        if node is None:
            raise _err(errno.ENOENT)
        self._may(d, W_OK | X_OK, ctx)
        self._check_sticky(d, node, ctx)
        if node.dir is not None:
            raise _err(errno.EISDIR)
        now = time.time_ns()
        d.dir.remove(name)
        d.mtime_ns = d.ctime_ns = now
        node.nlink -= 1
        node.ctime_ns = now
        self._maybe_drop(node)

    async def rmdir(self, parent: InodeT, name: bytes, ctx: RequestContext) -> None:
        d = self._dirnode(parent)
        self._check_name(name)
        self._may(d, X_OK, ctx)
        if name == b".":
            raise _err(errno.EINVAL)
        if name == b"..":
            raise _err(errno.ENOTEMPTY)
        assert d.dir is not None
        node = d.dir.get(name)
        if node is None:
            raise _err(errno.ENOENT)
        self._may(d, W_OK | X_OK, ctx)
        self._check_sticky(d, node, ctx)
        if node.dir is None:
            raise _err(errno.ENOTDIR)
        if node.dir.entries:
            raise _err(errno.ENOTEMPTY)
        now = time.time_ns()
        d.dir.remove(name)
        d.nlink -= 1
        d.mtime_ns = d.ctime_ns = now
        node.nlink = 0
        node.ctime_ns = now
        self._maybe_drop(node)

    async def rename(
        self,
        parent_old: InodeT,
        name_old: bytes,
        parent_new: InodeT,
        name_new: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE | RENAME_WHITEOUT):
            raise _err(errno.EINVAL)
        exchange = bool(flags & RENAME_EXCHANGE)
        if exchange and flags & (RENAME_NOREPLACE | RENAME_WHITEOUT):
            raise _err(errno.EINVAL)
        odir = self._dirnode(parent_old)
        ndir = self._dirnode(parent_new)
        self._check_name(name_old)
        self._check_name(name_new)
        self._may(odir, X_OK, ctx)
        self._may(ndir, X_OK, ctx)
        if name_old in _DOTS:
            raise _err(errno.EBUSY)
        if name_new in _DOTS:
            raise _err(errno.EEXIST if flags & RENAME_NOREPLACE else errno.EBUSY)
        if odir.nlink == 0 or ndir.nlink == 0:
            raise _err(errno.ENOENT)
        assert odir.dir is not None and ndir.dir is not None
        src = odir.dir.get(name_old)
        if src is None:
            raise _err(errno.ENOENT)
        dst = ndir.dir.get(name_new)
        if dst is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST)
        if dst is None and exchange:
            raise _err(errno.ENOENT)
        # Neither may become its own descendant.
        if src.dir is not None and self._is_ancestor(src, ndir):
            raise _err(errno.EINVAL)
        if dst is not None and dst.dir is not None and self._is_ancestor(dst, odir):
            raise _err(errno.EINVAL if exchange else errno.ENOTEMPTY)
        if src is dst:
            return  # same inode (hard links or the very same entry): no-op
        self._may(odir, W_OK | X_OK, ctx)
        self._may(ndir, W_OK | X_OK, ctx)
        self._check_sticky(odir, src, ctx)
        if dst is not None:
            self._check_sticky(ndir, dst, ctx)
        if not exchange and dst is not None:
            if src.dir is not None and dst.dir is None:
                raise _err(errno.ENOTDIR)
            if src.dir is None and dst.dir is not None:
                raise _err(errno.EISDIR)
        if odir is not ndir:
            # Moving a directory rewrites its "..": needs write on it.
            if src.dir is not None:
                self._may(src, W_OK, ctx)
            if exchange and dst is not None and dst.dir is not None:
                self._may(dst, W_OK, ctx)
        if not exchange and dst is not None and dst.dir is not None and dst.dir.entries:
            raise _err(errno.ENOTEMPTY)
        whiteout = bool(flags & RENAME_WHITEOUT)
        if whiteout:
            if ctx.uid != 0:
                raise _err(errno.EPERM)
            self._check_inode_space()

        now = time.time_ns()
        if exchange:
            assert dst is not None
            odir.dir.replace(name_old, dst)
            ndir.dir.replace(name_new, src)
            if odir is not ndir:
                if src.dir is not None:
                    src.dir.parent = ndir
                    odir.nlink -= 1
                    ndir.nlink += 1
                if dst.dir is not None:
                    dst.dir.parent = odir
                    ndir.nlink -= 1
                    odir.nlink += 1
            dst.ctime_ns = now
        else:
            if dst is not None:
                ndir.dir.remove(name_new)
                if dst.dir is not None:
                    dst.nlink = 0
                    ndir.nlink -= 1
                else:
                    dst.nlink -= 1
                dst.ctime_ns = now
            odir.dir.remove(name_old)
            ndir.dir.add(name_new, src)
            if src.dir is not None and odir is not ndir:
                src.dir.parent = ndir
                odir.nlink -= 1
                ndir.nlink += 1
            if whiteout:
                wh = self._new_inode(odir, stat.S_IFCHR, ctx, now)
                odir.dir.add(name_old, wh)
        src.ctime_ns = now
        odir.mtime_ns = odir.ctime_ns = now
        ndir.mtime_ns = ndir.ctime_ns = now
        if dst is not None and not exchange:
            self._maybe_drop(dst)

    # ------------------------------------------------------------------
    # files
    def _new_handle(self, node: _Inode, flags: int, is_dir: bool = False) -> FileInfo:
        acc = flags & O_ACCMODE
        handle = _Handle(
            node=node,
            readable=is_dir or acc != O_WRONLY,
            writable=not is_dir and acc != O_RDONLY,
            append=bool(flags & O_APPEND) and not is_dir,
            is_dir=is_dir,
        )
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = handle
        node.opens += 1
        return FileInfo(fh=fh)

    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        node = self._node(inode)
        if node.dir is not None:
            raise _err(errno.EISDIR)
        if stat.S_ISLNK(node.mode):
            raise _err(errno.ELOOP)
        if node.chunks is None:
            raise _err(errno.ENXIO)  # device nodes, fifos, sockets: guest-side
        acc = flags & O_ACCMODE
        mask = {O_RDONLY: R_OK, O_WRONLY: W_OK}.get(acc, R_OK | W_OK)
        if flags & O_TRUNC:
            mask |= W_OK
        self._may(node, mask, ctx)
        if flags & O_TRUNC:
            now = time.time_ns()
            self._set_size(node, 0)
            node.mtime_ns = node.ctime_ns = now
            if ctx.uid != 0:
                self._kill_suidgid(node)
        return self._new_handle(node, flags)

    async def create(
        self, parent: InodeT, name: bytes, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        d = self._prepare_create(parent, name, ctx)
        now = time.time_ns()
        node = self._new_inode(d, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx, now)
        node.chunks = {}
        self._link_new(d, name, node, now)
        info = self._new_handle(node, flags)
        return info, self._entry(node)

    async def tmpfile(
        self, parent: InodeT, mode: int, flags: int, ctx: RequestContext
    ) -> tuple[FileInfo, EntryAttributes]:
        d = self._dirnode(parent)
        self._may(d, W_OK | X_OK, ctx)
        if d.nlink == 0:
            raise _err(errno.ENOENT)
        self._check_inode_space()
        now = time.time_ns()
        node = self._new_inode(d, stat.S_IFREG | (mode & ~ctx.umask & 0o7777), ctx, now)
        node.chunks = {}
        node.nlink = 0
        node.linkable = not flags & O_EXCL
        info = self._new_handle(node, flags)
        return info, self._entry(node)

    def _read_span(self, fh: FileHandleT, offset: int, size: int) -> tuple[_Inode, int]:
        """The node a READ reads and how many bytes it gets (<= 0: none)."""
        handle = self._file_handle(fh)
        if not handle.readable and not self.enable_writeback_cache:
            raise _err(errno.EBADF)
        if offset < 0 or size < 0:
            raise _err(errno.EINVAL)
        node = handle.node
        node.atime_ns = time.time_ns()
        return node, min(size, node.size - offset)

    async def read(self, fh: FileHandleT, offset: int, size: int) -> bytes:
        node, n = self._read_span(fh, offset, size)
        return self._read_range(node, offset, n) if n > 0 else b""

    async def read_into(self, fh: FileHandleT, offset: int, size: int, buffers: Sequence[memoryview]) -> int:
        """As ``read``, copying from the chunks straight into ``buffers``."""
        node, n = self._read_span(fh, offset, size)
        return scatter(buffers, self._range_parts(node, offset, n)) if n > 0 else 0

    async def write(self, fh: FileHandleT, offset: int, data: Sequence[memoryview], ctx: RequestContext) -> int:
        handle = self._file_handle(fh)
        if not handle.writable:
            raise _err(errno.EBADF)
        node = handle.node
        if offset < 0:
            raise _err(errno.EINVAL)
        buf = _join(data)
        n = len(buf)
        if n == 0:
            return 0
        if handle.append:
            offset = node.size
        if offset + n > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        self._write_range(node, offset, buf)
        node.mtime_ns = node.ctime_ns = time.time_ns()
        if ctx.uid != 0:
            self._kill_suidgid(node)
        return n

    async def flush(self, fh: FileHandleT, lock_owner: int) -> None:
        self._handle(fh)

    async def release(self, fh: FileHandleT) -> None:
        handle = self._handles.pop(fh, None)
        if handle is not None:
            handle.node.opens -= 1
            self._maybe_drop(handle.node)

    async def fsync(self, fh: FileHandleT, datasync: bool) -> None:
        self._handle(fh)

    async def fallocate(self, fh: FileHandleT, mode: int, offset: int, length: int) -> None:
        handle = self._file_handle(fh)
        node = handle.node
        if offset < 0 or length <= 0:
            raise _err(errno.EINVAL)
        if not handle.writable:
            raise _err(errno.EBADF)
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise _err(errno.EOPNOTSUPP)
        if mode & FALLOC_FL_PUNCH_HOLE and mode & FALLOC_FL_ZERO_RANGE:
            raise _err(errno.EINVAL)
        if mode & FALLOC_FL_PUNCH_HOLE and not mode & FALLOC_FL_KEEP_SIZE:
            raise _err(errno.EOPNOTSUPP)
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        now = time.time_ns()
        if mode & FALLOC_FL_PUNCH_HOLE:
            self._punch(node, offset, length)
            node.mtime_ns = node.ctime_ns = now
            return
        zero = bool(mode & FALLOC_FL_ZERO_RANGE)
        self._allocate(node, offset, length, zero)
        if not mode & FALLOC_FL_KEEP_SIZE and end > node.size:
            node.size = end
            node.mtime_ns = node.ctime_ns = now
        elif zero:
            node.mtime_ns = node.ctime_ns = now

    async def lseek(self, fh: FileHandleT, offset: int, whence: int) -> int:
        node = self._file_handle(fh).node
        if whence not in (SEEK_DATA, SEEK_HOLE):
            raise _err(errno.EINVAL)
        if offset < 0 or offset >= node.size:
            raise _err(errno.ENXIO)
        cs = self.chunk_size
        chunks = node.chunks
        assert chunks is not None
        idx = offset // cs
        if whence == SEEK_DATA:
            if idx in chunks:
                return offset
            later = [i for i in chunks if i > idx]
            if not later:
                raise _err(errno.ENXIO)
            pos = min(later) * cs
            if pos >= node.size:
                raise _err(errno.ENXIO)
            return pos
        if idx not in chunks:
            return offset
        while idx in chunks:
            idx += 1
        return min(idx * cs, node.size)

    async def copy_file_range(
        self, fh_in: FileHandleT, off_in: int, fh_out: FileHandleT, off_out: int, length: int, flags: int
    ) -> int:
        hin = self._file_handle(fh_in)
        hout = self._file_handle(fh_out)
        if flags:
            raise _err(errno.EINVAL)
        if off_in < 0 or off_out < 0 or length < 0:
            raise _err(errno.EINVAL)
        if not hin.readable or not hout.writable or hout.append:
            raise _err(errno.EBADF)
        src, dst = hin.node, hout.node
        n = min(length, src.size - off_in)
        if n <= 0:
            return 0
        if src is dst and off_in < off_out + n and off_out < off_in + n:
            raise _err(errno.EINVAL)
        if off_out + n > MAX_FILE_SIZE:
            raise _err(errno.EFBIG)
        cs = self.chunk_size
        schunks = src.chunks
        assert schunks is not None
        data_keys = sorted(schunks)
        done = 0
        try:
            while done < n:
                pos = off_in + done
                idx = pos // cs
                if idx in schunks:
                    k = min(cs - (pos - idx * cs), n - done)
                    piece = bytes(memoryview(schunks[idx])[pos - idx * cs : pos - idx * cs + k])
                    self._write_range(dst, off_out + done, piece)
                else:
                    j = bisect.bisect_right(data_keys, idx)
                    hole_end = off_in + n if j == len(data_keys) else min(off_in + n, data_keys[j] * cs)
                    k = hole_end - pos
                    self._punch(dst, off_out + done, k)
                    if off_out + done + k > dst.size:
                        dst.size = off_out + done + k
                done += k
        except FuseError:
            if not done:
                raise
        now = time.time_ns()
        dst.mtime_ns = dst.ctime_ns = now
        src.atime_ns = now
        return done

    # ------------------------------------------------------------------
    # directories
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileInfo:
        node = self._dirnode(inode)
        self._may(node, R_OK, ctx)
        return self._new_handle(node, O_RDONLY, is_dir=True)

    async def readdir(self, fh: FileHandleT, offset: int, reply: DirectoryReply) -> None:
        handle = self._handle(fh)
        if not handle.is_dir:
            raise _err(errno.ENOTDIR)
        d = handle.node
        assert d.dir is not None
        d.atime_ns = time.time_ns()
        if d.nlink == 0:
            return  # removed while open: empty, like Linux
        if offset < 1 and not reply.add(b".", self._attrs(d), 1):
            return
        if offset < 2 and not reply.add(b"..", self._attrs(d.dir.parent), 2):
            return
        plus = reply.plus
        for cookie, name, node in d.dir.after(max(offset, 2)):
            if not reply.add(name, self._attrs(node), cookie):
                return
            if plus:
                node.lookups += 1

    async def releasedir(self, fh: FileHandleT) -> None:
        await self.release(fh)

    async def fsyncdir(self, fh: FileHandleT, datasync: bool) -> None:
        self._handle(fh)

    # ------------------------------------------------------------------
    # filesystem
    async def statfs(self, ctx: RequestContext) -> StatvfsData:
        blocks = self.size_bytes // _BLKSIZE
        free = max(0, (self.size_bytes - self._used_chunks * self.chunk_size) // _BLKSIZE)
        ffree = max(0, self.max_inodes - len(self._inodes))
        return StatvfsData(
            f_bsize=_BLKSIZE,
            f_frsize=_BLKSIZE,
            f_blocks=blocks,
            f_bfree=free,
            f_bavail=free,
            f_files=self.max_inodes,
            f_ffree=ffree,
            f_favail=ffree,
            f_namemax=NAME_MAX,
        )

    async def access(self, inode: InodeT, mask: int, ctx: RequestContext) -> None:
        node = self._node(inode)
        if mask & ~(R_OK | W_OK | X_OK):
            raise _err(errno.EINVAL)
        self._may(node, mask, ctx)

    # ------------------------------------------------------------------
    # extended attributes
    @staticmethod
    def _xattr_namespace(name: bytes) -> bytes:
        if not name or len(name) > XATTR_NAME_MAX:
            raise _err(errno.ERANGE)
        for prefix in _XATTR_PREFIXES:
            if name.startswith(prefix):
                if len(name) == len(prefix):
                    raise _err(errno.EINVAL)
                if prefix == b"system.":
                    raise _err(errno.EOPNOTSUPP)  # no POSIX ACL support
                return prefix
        raise _err(errno.EOPNOTSUPP)

    def _xattr_may(self, node: _Inode, prefix: bytes, write: bool, ctx: RequestContext) -> None:
        """Linux xattr_permission(): raises EPERM/ENODATA/EACCES."""
        if prefix == b"security.":
            if write and ctx.uid != 0:
                raise _err(errno.EPERM)
            return
        if prefix == b"trusted.":
            if ctx.uid != 0:
                raise _err(errno.EPERM if write else errno.ENODATA)
            return
        # user.
        if node.chunks is None and node.dir is None:
            raise _err(errno.EPERM if write else errno.ENODATA)
        if write and node.dir is not None and node.mode & stat.S_ISVTX and ctx.uid not in (0, node.uid):
            raise _err(errno.EPERM)
        self._may(node, W_OK if write else R_OK, ctx)

    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, flags: int, ctx: RequestContext) -> None:
        node = self._node(inode)
        if flags & ~(XATTR_CREATE | XATTR_REPLACE):
            raise _err(errno.EINVAL)
        prefix = self._xattr_namespace(name)
        if len(value) > XATTR_SIZE_MAX:
            raise _err(errno.E2BIG)
        self._xattr_may(node, prefix, True, ctx)
        xattrs = node.xattrs if node.xattrs is not None else {}
        old = xattrs.get(name)
        if old is not None and flags & XATTR_CREATE:
            raise _err(errno.EEXIST)
        if old is None and flags & XATTR_REPLACE:
            raise _err(errno.ENODATA)
        names_len = sum(len(k) + 1 for k in xattrs) + (0 if old is not None else len(name) + 1)
        values_len = sum(len(v) for v in xattrs.values()) - (len(old) if old is not None else 0) + len(value)
        if names_len > XATTR_LIST_MAX or values_len > XATTR_VALUES_MAX:
            raise _err(errno.ENOSPC)
        xattrs[bytes(name)] = bytes(value)
        node.xattrs = xattrs
        node.ctime_ns = time.time_ns()

    async def getxattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> bytes:
        node = self._node(inode)
        prefix = self._xattr_namespace(name)
        self._xattr_may(node, prefix, False, ctx)
        value = node.xattrs.get(name) if node.xattrs is not None else None
        if value is None:
            raise _err(errno.ENODATA)
        return value

    async def listxattr(self, inode: InodeT, ctx: RequestContext) -> Sequence[bytes]:
        node = self._node(inode)
        if not node.xattrs:
            return []
        if ctx.uid == 0:
            return list(node.xattrs)
        return [k for k in node.xattrs if not k.startswith(b"trusted.")]

    async def removexattr(self, inode: InodeT, name: bytes, ctx: RequestContext) -> None:
        node = self._node(inode)
        prefix = self._xattr_namespace(name)
        self._xattr_may(node, prefix, True, ctx)
        if node.xattrs is None or name not in node.xattrs:
            raise _err(errno.ENODATA)
        del node.xattrs[name]
        node.ctime_ns = time.time_ns()
