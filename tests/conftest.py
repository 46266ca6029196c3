"""Shared fixtures. Triton runs in its interpreter here, on CPU tensors, unless a GPU is present:
TRITON_INTERPRET must be set before triton is first imported, which is why it is set at the top."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


@pytest.fixture(autouse=True)
def seed():
    """Fresh but reproducible random inputs in every test."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data():
    """Path to ../shared/data (real text); tests that use it skip when it is absent."""
    if not os.path.isdir(SHARED_DATA):
        pytest.skip("../shared/data is not present beside this checkout")
    return os.path.abspath(SHARED_DATA)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU suite covers the same code in the interpreter")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
