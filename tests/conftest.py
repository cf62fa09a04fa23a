"""Test-wide set-up.

On a machine without CUDA, Triton kernels run through the interpreter: TRITON_INTERPRET must be set
before any kernel module is imported, so it is set here, before rapkern is imported by any test.
Tests marked ``gpu`` skip cleanly without CUDA.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Test tensors are tiny: intra-op threads only add overhead, and with pytest-xdist's workers on a
    small shared CPU their spin-waits cost several times the wall time. One thread per test."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_dispatch_caches():
    """Tests swap the registry and monkeypatch backends' reasons, which a backend promises never change
    (dispatch caches its verdicts): forget them around every test."""
    from rapkern import dispatch

    dispatch.clear_caches()
    yield
    dispatch.clear_caches()


@pytest.fixture(scope="session", params=["default", "triton-3.6"])
def aot_env(request):
    """A Python environment for the ahead-of-time compile gates: this one, and the triton 3.6 side
    environment (built on first use by tools/triton36_env.sh; see tests/side_env.py)."""
    import side_env

    return side_env.ensure(request.param)
