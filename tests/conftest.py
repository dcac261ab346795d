"""pytest configuration: the multi-rank harness and the backend parametrization."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import harness  # noqa: E402


def cuda_backend_skip_reason(device: str):
    """Why the cuda backend cannot run in this test process, or None."""
    try:
        from fuser_moe.executors.backend_selection import cuda_backend_missing
    except ImportError as exc:  # pragma: no cover
        return f"cuda backend not importable: {exc}"
    missing = cuda_backend_missing(device)
    return None if missing is None else f"cuda backend skipped: {missing}"


@pytest.fixture(params=["nccl", "cuda"])
def backend(request):
    """Every backend; a missing one is skipped with the reason named."""
    if request.param == "cuda":
        reason = cuda_backend_skip_reason(harness.TEST_DEVICE)
        if reason:
            pytest.skip(reason)
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _close_rank_pools():
    yield
    harness.close_pools()
