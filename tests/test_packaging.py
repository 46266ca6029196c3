"""How users install and import us: beside the newest Hugging Face stack, which brings Hugging Face's
own top-level `kernels` package (transformers requires it). Our kernels are `gpt2_kernels`; these
tests fail if any package of ours shares a file or an import name with another installed
distribution, or if transformers and our triton path can't run in one process, from the repository
root (where the checkout's folders come first on sys.path) or from anywhere else."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# One process: our checkpoint loaded by transformers, the same weights through our Triton kernels
# (interpreter, CPU), and Hugging Face's `kernels` importing its own API when it is installed.
SIDE_BY_SIDE = r"""
import importlib.metadata, json, sys
import torch
import transformers
from gpt2 import GPT2, GPT2Config
import gpt2_kernels

torch.manual_seed(0)
model = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=64, n_layer=2, n_head=2)).eval()
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.1)
model.save_pretrained(sys.argv[1])
hf = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1]).eval()
ids = torch.randint(0, 97, (2, 17))
calls = []
flash_attention = gpt2_kernels.flash_attention
gpt2_kernels.flash_attention = lambda *a, **k: calls.append(1) or flash_attention(*a, **k)
with torch.no_grad():
    ours = model.set_kernels(attn_impl="triton", norm_impl="triton")(ids)
    theirs = hf(ids).logits
try:
    importlib.metadata.distribution("kernels")
    from kernels import get_kernel
    hub_kernels = get_kernel.__module__
except importlib.metadata.PackageNotFoundError:
    hub_kernels = None
print(json.dumps({"max_diff": (ours - theirs).abs().max().item(), "flash_attention_calls": len(calls),
                  "gpt2_kernels": gpt2_kernels.__file__, "hub_kernels": hub_kernels}))
"""


def _installed_elsewhere_than(path: Path) -> bool:
    """Whether `import gpt2` works from a directory outside the checkout (pip install -e / .)."""
    probe = subprocess.run([sys.executable, "-c", "import gpt2, gpt2_kernels"], cwd=path, capture_output=True)
    return probe.returncode == 0


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_transformers_and_our_kernels_side_by_side(tmp_path, where):
    """Run from the root, the checkout's folders shadow installed packages of the same name; run
    from elsewhere, the installed ones win. Either way transformers loads our checkpoint, our triton
    path runs (and agrees with it), and Hugging Face's `kernels` is its own."""
    pytest.importorskip("transformers")
    cwd = ROOT if where == "repository root" else tmp_path
    if where == "another directory" and not _installed_elsewhere_than(tmp_path):
        pytest.skip("gpt2-suite is not installed (pip install -e .), so it imports only from the checkout")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)
    result = subprocess.run([sys.executable, "-c", SIDE_BY_SIDE, str(tmp_path / "checkpoint")], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # fp32 logits of order 1 through two implementations: summation order only (test_interop's bound)
    assert report["max_diff"] < 1e-5, report
    assert report["flash_attention_calls"] == 2, report  # one per layer: the triton path really ran
    if where == "repository root":
        assert Path(report["gpt2_kernels"]).parent == ROOT / "gpt2_kernels"  # the checkout's own
    if report["hub_kernels"] is not None:  # installed (transformers >= 5.25 requires it): its own API
        assert report["hub_kernels"].split(".")[0] == "kernels", report


def test_no_top_level_kernels_in_the_checkout():
    """The clash's cause, stated once: no folder or module of ours is importable as `kernels`."""
    assert not (ROOT / "kernels").exists() and not (ROOT / "kernels.py").exists()


def _top_level_names(paths) -> set[str]:
    """The import names that installed paths (relative to site-packages) provide."""
    tops = (Path(p).parts[0] for p in paths)
    return {top.removesuffix(".py") for top in tops if not top.endswith((".dist-info", ".data"))}


@pytest.mark.slow
def test_wheel_shares_no_file_with_installed_distributions(tmp_path):
    """`pip wheel --no-deps .`: every file it would install is ours alone. A file (or top-level
    package) that another installed distribution also installs would be overwritten by whichever
    came last, and uninstalling either would break the other, with no warning from pip."""
    # Built from a copy: setuptools builds in the source tree, and a build/ left in the checkout
    # would be one more copy of the packages for tools (and people) to read.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "__pycache__"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(source)],
                           capture_output=True, text=True, timeout=900)
    if build.returncode != 0 and "No matching distribution" in build.stderr:
        pytest.skip("setuptools can't be fetched for the isolated build here")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = tmp_path.glob("gpt2_suite-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        record = next(name for name in archive.namelist() if name.endswith(".dist-info/RECORD"))
        ours = {line.split(",")[0] for line in archive.read(record).decode().splitlines() if line}
    assert {"gpt2_kernels/__init__.py", "gpt2_kernels/attention.py", "gpt2/model.py"} <= ours
    assert _top_level_names(ours) == {"gpt2", "gpt2_kernels"}

    shared, clashing = {}, {}
    for dist in importlib.metadata.distributions():
        if dist.metadata["Name"] in (None, "gpt2-suite", "gpt2_suite"):
            continue
        theirs = {str(f).replace(os.sep, "/") for f in dist.files or ()}
        if both := ours & theirs:
            shared[dist.metadata["Name"]] = sorted(both)[:5]
        top = _top_level_names(f for f in theirs if not f.startswith(".."))
        if both := _top_level_names(ours) & top:
            clashing[dist.metadata["Name"]] = sorted(both)
    assert not shared, f"files that another distribution also installs: {shared}"
    assert not clashing, f"top-level packages that another distribution also installs: {clashing}"


# A machine without Triton (macOS, Windows): every import of triton fails, as it does there. The model
# must still build and run with its torch implementations, and the kernels' references import.
WITHOUT_TRITON = r"""
import importlib.abc, sys


class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "triton":
            raise ImportError(f"No module named {name!r}")


sys.meta_path.insert(0, NoTriton())
import torch
from gpt2 import GPT2, GPT2Config
from gpt2.registry import KernelUnavailableError
from gpt2_kernels import attention_ref, layer_norm_ref

ids = torch.randint(0, 97, (2, 13))
document_ids = torch.arange(13).expand(2, 13) // 5
logits = {}
for attn_impl in ("eager", "sdpa"):
    torch.manual_seed(0)  # the same weights for both
    model = GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                            attn_impl=attn_impl)).eval()
    with torch.no_grad():
        logits[attn_impl] = (model(ids), model(ids, document_ids=document_ids))
        model.generate(ids[:, :4], max_new_tokens=3)  # the KV cache: fewer queries than keys
q = torch.randn(1, 2, 5, 8)
assert attention_ref(q, q, q).shape == q.shape and layer_norm_ref(q, torch.ones(8), None).shape == q.shape
try:
    GPT2(GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=1, n_head=4, attn_impl="triton"))
    raise AssertionError("a triton model was built without triton")
except KernelUnavailableError as error:
    assert "triton is not installed" in str(error), error
import gpt2_kernels
assert not hasattr(gpt2_kernels, "flash_attention"), "flash_attention imported without triton"
for eager, sdpa in zip(logits["eager"], logits["sdpa"]):
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
assert "triton" not in sys.modules
print("ran without triton")
"""


def test_the_model_runs_without_triton():
    """gpt2 imports no triton for eager and sdpa, and gpt2_kernels none for its references: both
    work where every import of triton fails; a triton model says why it can't be built."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}  # the check reaches `import triton`
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "ran without triton" in result.stdout, result.stderr[-3000:]


# The op file gpt2_kernels/layer_norm.py and the public function gpt2_kernels.layer_norm share a name:
# whichever is imported first, the package's `layer_norm` is the function and the op file still
# registers its ops. And `import gpt2` imports no triton: a program chooses Triton's mode (the
# interpreter, TRITON_INTERPRET=1) after importing gpt2, before the first kernel runs.
LAYER_NORM_NAME = r"""
import importlib, sys, types
import torch
import gpt2, gpt2.model, gpt2.registry, gpt2.documents
assert "triton" not in sys.modules, "import gpt2 imported triton"
import gpt2_kernels.layer_norm
from gpt2_kernels import layer_norm
assert gpt2_kernels.layer_norm is layer_norm and not isinstance(layer_norm, types.ModuleType), layer_norm
assert importlib.import_module("gpt2_kernels.layer_norm").layer_norm is layer_norm
x, weight = torch.randn(3, 8), torch.ones(8)
torch.testing.assert_close(layer_norm(x, weight, None), gpt2_kernels.layer_norm_ref(x, weight, None).float())
y, _, _ = torch.ops.gpt2_suite.layer_norm(x, weight, None, 1e-5)
print("function")
"""


def test_layer_norm_names_the_function_whatever_is_imported_first():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", LAYER_NORM_NAME], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "function", result.stderr[-3000:]
