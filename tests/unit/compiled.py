"""Whether a test may skip for want of the compiled twins: only when the
cython implementation is not what this run asks for."""
from __future__ import annotations

import os

import pytest

#: This run asks for the compiled twins (VIRTIOFS_ASYNC_IMPLEMENTATION or
#: VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION is ``cython``).
REQUIRED = "cython" in (
    os.environ.get("VIRTIOFS_ASYNC_IMPLEMENTATION", "").strip().lower(),
    os.environ.get("VIRTIOFS_ASYNC_EXPECT_IMPLEMENTATION", "").strip().lower(),
)


def need_compiled(missing: ImportError | None, what: str) -> None:
    """Fail (compiled required) or skip (not built) when ``missing`` is set."""
    if missing is not None:
        if REQUIRED:
            pytest.fail(f"{what} required but not importable: {missing}")
        pytest.skip(f"{what} not built ({missing}); run: python setup.py build_ext --inplace")
