"""Integration tests: the real transport (socket, eventfds, shared memory)
between the testing frontend and a daemon (ours in-process, or QEMU's C
virtiofsd). Shared helpers live here; fixtures in conftest.py."""
from __future__ import annotations

import contextlib
from typing import Any, AsyncIterator

from virtiofs_async.backends.memory import MemoryFS
from virtiofs_async.runtime import Runtime
from virtiofs_async.testing import FuseClient, serve_in_background


@contextlib.asynccontextmanager
async def memfs_client(
    rt: Runtime,
    path: str,
    fs: Any = None,
    *,
    server_kwargs: dict[str, Any] | None = None,
    **client_kwargs: Any,
) -> AsyncIterator[tuple[Any, FuseClient]]:
    """Serve ``fs`` (a fresh MemoryFS by default) on ``path`` in the
    background and yield ``(fs, client)`` with FUSE_INIT done."""
    fs = MemoryFS() if fs is None else fs
    async with serve_in_background(fs, path, runtime=rt, **(server_kwargs or {})):
        async with FuseClient.connect(path, runtime=rt, **client_kwargs) as client:
            yield fs, client
