"""Test setup: without CUDA, run hf_flex's Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported, hence here, before any test imports
hf_flex. Fixture ``device``: "cuda" when available, else "cpu" with the interpreter active (tests that
use it always exercise the Triton kernels, never the reference standing in for them).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on the device machine with -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    from hf_flex.dispatch import triton_runs_on

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if not triton_runs_on(dev):
        pytest.fail("Triton kernels are not runnable on CPU: TRITON_INTERPRET=1 was not set before triton import")
    return dev
