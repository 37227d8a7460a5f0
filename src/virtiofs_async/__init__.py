"""virtiofs-async: build virtio-fs daemons in Python.

Layers, lowest first (each imports only those below it):

- ``abi``: FUSE, virtio and vhost-user constants and struct layouts.
- ``codec`` (FUSE requests/replies), ``memory`` + ``vring`` (guest memory,
  split virtqueue): sans-IO cores, each with a Cython twin in ``cyext/``;
  ``_accel`` picks the active one (see ``IMPLEMENTATION``).
- ``vhost_user`` (sans-IO vhost-user messages) and ``session`` (FUSE_INIT,
  dispatch to a backend).
- ``operations``: the backend interface; ``backends``: the bundled backends.
- ``runtime``: asyncio/uvloop and trio behind one small interface.
- ``transport``: the vhost-user unix socket and queue workers.
- ``server`` and the ``virtiofs_async`` command: serving it all.
- ``testing``: a vhost-user frontend + FUSE client that plays QEMU and the
  guest, for tests without a VM.
"""
from __future__ import annotations

from ._accel import IMPLEMENTATION
from .errors import (
    FuseError,
    FuseProtocolError,
    ProtocolError,
    VhostUserProtocolError,
    VirtioFsError,
    VringError,
)
from .operations import (
    ROOT_INODE,
    DirectoryReply,
    EntryAttributes,
    FileHandleT,
    FileInfo,
    FileLock,
    InodeT,
    Operations,
    RequestContext,
    SetattrFields,
    StatvfsData,
)
from .server import make_server, run, serve
from .session import FuseSession, SessionConfig

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATION",
    "ROOT_INODE",
    "DirectoryReply",
    "EntryAttributes",
    "FileHandleT",
    "FileInfo",
    "FileLock",
    "FuseError",
    "FuseProtocolError",
    "FuseSession",
    "InodeT",
    "Operations",
    "ProtocolError",
    "RequestContext",
    "SessionConfig",
    "SetattrFields",
    "StatvfsData",
    "VhostUserProtocolError",
    "VirtioFsError",
    "VringError",
    "__version__",
    "make_server",
    "run",
    "serve",
]
