"""Chooses the compiled (Cython) or the pure-Python hot-path implementation.

``VIRTIOFS_ASYNC_IMPLEMENTATION`` selects it: ``python`` forces the pure
twins, ``cython`` requires the compiled modules (ImportError otherwise: no
silent fallback), ``auto`` (the default) prefers compiled when present.
Everything else imports the hot functions and classes from here, so one
switch changes all of them together.
"""
from __future__ import annotations

import os

_choice = os.environ.get("VIRTIOFS_ASYNC_IMPLEMENTATION", "auto").strip().lower() or "auto"
if _choice not in ("auto", "python", "cython"):
    raise ImportError(f"VIRTIOFS_ASYNC_IMPLEMENTATION={_choice!r}: expected auto, python or cython")

IMPLEMENTATION = "python"

if _choice != "python":
    try:
        from . import _cy_codec as _codec
        from ._cy_iopool import IoPool
        from ._cy_responder import HostHandle, HostInode, InlineGate, PassthroughResponder, getdents_raw
        from ._cy_vring import DescriptorChain, VirtQueue, scatter
    except ImportError:
        if _choice == "cython":
            raise
    else:
        IMPLEMENTATION = "cython"

if IMPLEMENTATION == "python":
    from . import codec as _codec  # type: ignore[no-redef]
    from .buffers import scatter
    from .iopool import IoPool
    from .responder import HostHandle, HostInode, InlineGate, PassthroughResponder  # type: ignore[assignment]
    #: the pure one is backends._hostfs's own (ctypes), which it keeps then
    getdents_raw = None
    from .vring import DescriptorChain, VirtQueue

decode_request = _codec.decode_request
encode_out_header = _codec.encode_out_header
pack_attr = _codec.pack_attr
pack_attr_out = _codec.pack_attr_out
pack_dirent = _codec.pack_dirent
pack_direntplus = _codec.pack_direntplus
pack_entry_out = _codec.pack_entry_out
pack_host_dirents = _codec.pack_host_dirents
pack_raw_dirents = _codec.pack_raw_dirents
scan_raw_dirents = _codec.scan_raw_dirents
parse_linux_dirents64 = _codec.parse_linux_dirents64
record_factory = _codec.record_factory
write_reply = _codec.write_reply

__all__ = [
    "IMPLEMENTATION", "DescriptorChain", "HostHandle", "HostInode", "InlineGate", "IoPool", "PassthroughResponder",
    "VirtQueue", "decode_request",
    "encode_out_header", "getdents_raw", "pack_attr", "pack_attr_out", "pack_dirent", "pack_direntplus", "pack_entry_out",
    "pack_host_dirents", "pack_raw_dirents", "parse_linux_dirents64", "record_factory", "scan_raw_dirents", "scatter",
    "write_reply",
]
