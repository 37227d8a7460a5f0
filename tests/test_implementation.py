"""The build under test is the one CI meant to test (no silent fallback)."""
from __future__ import annotations

import os

import virtiofs_async
from virtiofs_async import _accel


def test_active_implementation_matches_the_request() -> None:
    expected = os.environ.get("VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION")
    assert virtiofs_async.IMPLEMENTATION in ("cython", "python")
    if expected is not None:
        assert virtiofs_async.IMPLEMENTATION == expected


def test_hot_functions_come_from_the_active_implementation() -> None:
    module = _accel.decode_request.__module__
    vring_module = _accel.VirtQueue.__module__
    pool_module = _accel.IoPool.__module__
    responder_module = _accel.PassthroughResponder.__module__
    if virtiofs_async.IMPLEMENTATION == "cython":
        assert module.endswith("_cy_codec") and vring_module.endswith("_cy_vring")
        assert pool_module.endswith("_cy_iopool") and responder_module.endswith("_cy_responder")
    else:
        assert module.endswith(".codec") and vring_module.endswith(".vring")
        assert pool_module.endswith(".iopool") and responder_module.endswith(".responder")
