"""Runtimes: asyncio (uvloop when installed) and trio behind one interface.

``get_runtime("auto")`` gives the asyncio runtime, on uvloop when it is
installed; ``"asyncio"`` forces the plain loop; ``"trio"`` gives trio.
``current_runtime()`` detects the library that is running the caller.
"""
from __future__ import annotations

from .base import ClosedResourceError, Event, EventfdWaiter, Runtime, TaskGroup, read_eventfd, signal_eventfd

__all__ = [
    "ClosedResourceError",
    "Event",
    "EventfdWaiter",
    "Runtime",
    "TaskGroup",
    "current_runtime",
    "get_runtime",
    "read_eventfd",
    "signal_eventfd",
]


def get_runtime(name: str = "auto", *, max_threads: int = 64) -> Runtime:
    if name in ("auto", "uvloop", "asyncio"):
        from .asyncio_runtime import AsyncioRuntime

        use_uvloop = None if name == "auto" else name == "uvloop"
        return AsyncioRuntime(use_uvloop=use_uvloop, max_threads=max_threads)
    if name == "trio":
        from .trio_runtime import TrioRuntime

        return TrioRuntime(max_threads=max_threads)
    raise ValueError(f"unknown runtime {name!r} (auto, asyncio, uvloop or trio)")


def current_runtime(*, max_threads: int = 64) -> Runtime:
    """The runtime matching the async library that runs the caller."""
    import sniffio

    library = sniffio.current_async_library()
    if library == "trio":
        return get_runtime("trio", max_threads=max_threads)
    import asyncio

    loop = asyncio.get_running_loop()
    is_uvloop = type(loop).__module__.startswith("uvloop")
    return get_runtime("uvloop" if is_uvloop else "asyncio", max_threads=max_threads)
