"""Serving a backend: the few calls most users need.

``serve`` runs inside an event loop you already have (asyncio, uvloop or
trio, detected); ``run`` is the blocking entry point that starts one.
Each vhost-user connection gets a fresh :class:`FuseSession` over the same
backend object, so one process can serve several filesystems on several
sockets at once (no global state).
"""
from __future__ import annotations

import os
from typing import Any

from .operations import Operations
from .runtime import Runtime, current_runtime, get_runtime
from .session import FuseSession, SessionConfig
from .transport import HIPRIO_COALESCE, DeviceConfig, VhostUserServer


def make_server(
    operations: Operations,
    *,
    runtime: Runtime,
    socket_path: str | os.PathLike[str] | None = None,
    fd: int | None = None,
    once: bool = False,
    num_request_queues: int = 1,
    queue_max_size: int = 1024,
    session_config: SessionConfig | None = None,
    socket_group: str | None = None,
    hiprio_coalesce: float = HIPRIO_COALESCE,
) -> VhostUserServer:
    """A server (not yet listening) for ``operations``; see :func:`serve`.

    Gives ``operations.run_blocking`` the runtime's worker pool, and
    ``run_preadv`` / ``run_pwritev`` its I/O pool. ``hiprio_coalesce``:
    seconds a kick of the hiprio queue (FORGETs) waits for the rest of a
    burst before it is served (see ``DeviceConfig``; 0, the default: at
    once)."""
    operations.run_blocking = runtime.run_in_thread  # type: ignore[method-assign]
    operations.run_preadv = runtime.preadv  # type: ignore[method-assign]
    operations.run_pwritev = runtime.pwritev  # type: ignore[method-assign]
    return VhostUserServer(
        runtime,
        lambda: FuseSession(operations, session_config),
        socket_path=socket_path,
        listen_fd=fd,
        device=DeviceConfig(num_request_queues=num_request_queues, queue_max_size=queue_max_size,
                            hiprio_coalesce=hiprio_coalesce),
        once=once,
        socket_group=socket_group,
    )


async def serve(operations: Operations, **kwargs: Any) -> None:
    """Serve ``operations`` on ``socket_path=`` (or an inherited listening
    ``fd=``) until cancelled; with ``once=True`` return when the first
    frontend disconnects (virtiofsd's behaviour). Other keywords: see
    :func:`make_server`. The runtime is the one running this coroutine."""
    runtime = kwargs.pop("runtime", None) or current_runtime()
    await make_server(operations, runtime=runtime, **kwargs).serve()


def run(operations: Operations, *, runtime: str = "auto", max_threads: int = 64, **kwargs: Any) -> None:
    """Blocking: start an event loop (``auto``: asyncio on uvloop when
    installed; ``asyncio``; ``trio``) and :func:`serve` on it."""
    rt = get_runtime(runtime, max_threads=max_threads)
    rt.run(_serve_with, operations, rt, kwargs)


async def _serve_with(operations: Operations, rt: Runtime, kwargs: dict[str, Any]) -> None:
    await make_server(operations, runtime=rt, **kwargs).serve()
