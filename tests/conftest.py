"""Shared fixtures. Triton runs in its interpreter here, on CPU tensors, unless a GPU is present:
TRITON_INTERPRET must be set before triton is first imported, which is why it is set at the top."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

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


def load_script(path: Path):
    """Import a file under scripts/ (not a package) as a module, so tests call its main(argv)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def compile_for_gpu_in_subprocess(script: str) -> None:
    """Run a kernel-compiling script with Triton's real compiler (no interpreter, no GPU needed):
    it proves the kernels are GPU code, not only code the interpreter accepts. Skips when this
    Triton build has no NVIDIA backend."""
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton build has no NVIDIA backend / ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; the CPU suite covers the same code in the interpreter")
    for item in items:
        if "requires_cuda" in item.keywords:
            item.add_marker(skip)
