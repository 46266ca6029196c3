"""Shared fixtures. Triton runs in its interpreter here, on CPU tensors, unless a GPU is present:
TRITON_INTERPRET must be set before triton is first imported, which is why it is set at the top."""

import contextlib
import importlib.util
import io
import os
import subprocess
import sys
import time
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
    """Import a file under scripts/ (not a package) as a module, so tests call its main(argv). Its
    folder goes on sys.path first, as when the script runs, so its `import cli` finds scripts/cli.py."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would: dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def expect_input_error(main, argv, *fragments, within: float | None = 10.0) -> str:
    """Run a script's main(argv) on bad input: it must exit with status 2 within `within` seconds
    (None: no clock, for a failure that comes only after training has run), its last words on stderr
    one `prog: error: ...` line holding every fragment, with no traceback (progress bars of datasets
    may come before it). Returns that line."""
    stderr = io.StringIO()
    start = time.perf_counter()
    with pytest.raises(SystemExit) as caught, contextlib.redirect_stderr(stderr):
        main([str(arg) for arg in argv])
    assert within is None or time.perf_counter() - start < within
    output = stderr.getvalue()
    assert caught.value.code == 2, (caught.value.code, output)
    assert "Traceback" not in output and output.endswith("\n"), output
    message = output.splitlines()[-1]
    assert ": error: " in message and output.count(": error: ") == 1, output
    for fragment in fragments:
        assert fragment in message, output
    return message


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
