"""Shared fixtures: runtimes, the active implementation, temp sockets."""
from __future__ import annotations

import os

import pytest

import virtiofs_async

RUNTIMES = ["asyncio", "uvloop", "trio"]


def pytest_report_header(config: pytest.Config) -> str:
    return f"virtiofs_async implementation: {virtiofs_async.IMPLEMENTATION} ({virtiofs_async.__file__})"


@pytest.fixture(params=RUNTIMES)
def runtime_name(request: pytest.FixtureRequest) -> str:
    """Each integration test runs under asyncio, uvloop and trio."""
    return request.param


@pytest.fixture
def short_tmp(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A short directory path (unix socket paths are limited to 107 bytes)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="vfa-", dir="/tmp")
    yield path
    import shutil

    shutil.rmtree(path, ignore_errors=True)
