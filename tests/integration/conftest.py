"""Integration fixtures: run a test body on the test's runtime, with a deadline.

Every integration test takes the ``runtime_name`` fixture (asyncio, uvloop,
trio: tests/conftest.py) through ``run``, so each one runs three times.
"""
from __future__ import annotations

import os
from typing import Any, Awaitable, Callable

import pytest

from virtiofs_async.runtime import get_runtime

Body = Callable[..., Awaitable[Any]]


@pytest.fixture
def run(runtime_name: str) -> Callable[..., Any]:
    """``run(body, *args, timeout=20)``: ``await body(runtime, *args)`` on a
    fresh event loop of the test's runtime; fails the test if it takes longer
    than ``timeout`` seconds (the body is cancelled then)."""

    def runner(body: Body, *args: Any, timeout: float = 20.0) -> Any:
        rt = get_runtime(runtime_name)
        outcome: dict[str, Any] = {}

        async def main() -> None:
            async with rt.move_on_after(timeout):
                outcome["value"] = await body(rt, *args)

        rt.run(main)
        if "value" not in outcome:
            pytest.fail(f"the test body did not finish within {timeout} s on {runtime_name}")
        return outcome["value"]

    return runner


@pytest.fixture
def sock_path(short_tmp: str) -> str:
    return os.path.join(short_tmp, "vfs.sock")
