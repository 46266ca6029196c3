"""The PyTorch custom operators behind gpt2_kernels/ (torch.ops.gpt2_suite.*, registered by gpt2_kernels/utils.py
define_op from the op files): their schemas, torch.library.opcheck, the CPU implementation without
the interpreter, registration that survives a second import, and the FLOP formulas.

Each op has two CPU implementations: our Triton kernels under the interpreter (this suite; on a GPU
machine the same tests run them on CUDA) and, without the interpreter, the same math in plain
PyTorch. Both are opchecked; they agree to fp32 rounding (a few ulps of each output's largest
element: different summation orders of the same fp32 math).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

import gpt2_kernels
import gpt2_kernels.attention  # noqa: F401  (importing the op files registers the ops)
import gpt2_kernels.layer_norm  # noqa: F401
from gpt2_kernels import utils

ops = torch.ops.gpt2_suite
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS_DIR = os.path.dirname(os.path.abspath(gpt2_kernels.__file__))

SCHEMAS = {
    "flash_attention": "(Tensor q, Tensor k, Tensor v, bool causal, float? softmax_scale, Tensor? doc_start, "
    "Tensor? doc_end) -> (Tensor, Tensor)",
    "flash_attention_backward": "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
    "float? softmax_scale, Tensor? doc_start, Tensor? doc_end) -> (Tensor, Tensor, Tensor)",
    "layer_norm": "(Tensor x, Tensor weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "add_layer_norm": "(Tensor x, Tensor residual, Tensor weight, Tensor? bias, float eps) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    "layer_norm_backward": "(Tensor dy, Tensor z, Tensor weight, Tensor? bias, Tensor mean, Tensor rstd, "
    "Tensor? dz_out) -> (Tensor, Tensor, Tensor)",
}


@pytest.fixture(params=["kernels", "math"])
def implementation(request, monkeypatch):
    """The device the ops run on: our kernels (CUDA, or CPU under the interpreter), or CPU without
    the interpreter, where the ops compute the same math in PyTorch."""
    if request.param == "math":
        monkeypatch.setattr(utils, "interpreting", lambda: False)
        return "cpu"
    return DEVICE


def _randn(*shape, device, dtype=torch.float32, grad=True):
    return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)


def _document_ids(b, t, device, dtype=torch.int64):
    """(B, T) non-decreasing document ids: documents of lengths 5, 1, 3 and the rest, per row."""
    ids = torch.zeros(b, t, dtype=dtype)
    ids[:, 5:] += 1
    ids[:, 6:] += 1
    ids[:, 9:] += 1
    return ids.to(device)


def _document_bounds(b, t, device, dtype=torch.int64):
    """The ops' document arguments (doc_start, doc_end) for _document_ids."""
    return tuple(gpt2_kernels.document_bounds(_document_ids(b, t, device, dtype)))


def _attention_args(device, dtype=torch.float32, h_kv=1, grad=True, causal=True, documents=None):
    """(q, k, v, causal, softmax_scale, doc_start, doc_end): T = 17, a partial block; H = 2 query
    heads on h_kv K/V heads; documents: None or the dtype of packed documents' ids."""
    b, h, t, d = 1, 2, 17, 16
    q = _randn(b, h, t, d, device=device, dtype=dtype, grad=grad)
    k, v = (_randn(b, h_kv, t, d, device=device, dtype=dtype, grad=grad) for _ in range(2))
    bounds = (None, None) if documents is None else _document_bounds(b, t, device, documents)
    return q, k, v, causal, None, *bounds


def _strided_attention_args(device):
    """q, k, v as (B, H, T, D) views of one fused (B, T, 3, H, D) projection, as the model makes them."""
    qkv = torch.randn(1, 17, 3, 2, 16, device=device).requires_grad_()
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    return q, k, v, False, 0.3, None, None


def _attention_backward_args(device, **kwargs):
    q, k, v, causal, scale, doc_start, doc_end = _attention_args(device, grad=False, **kwargs)
    out, lse = ops.flash_attention(q, k, v, causal, scale, doc_start, doc_end)
    return torch.randn_like(out), q, k, v, out, lse, causal, scale, doc_start, doc_end


def _norm_args(device, bias=True, x_dtype=torch.float32, residual_dtype=None, grad=True):
    """(x, [residual,] weight, bias, eps) for layer_norm, or add_layer_norm with a residual_dtype."""
    x = _randn(2, 3, 24, device=device, dtype=x_dtype, grad=grad)
    residual = () if residual_dtype is None else (_randn(2, 3, 24, device=device, dtype=residual_dtype, grad=grad),)
    param_dtype = residual_dtype or x_dtype
    weight = _randn(24, device=device, dtype=param_dtype, grad=grad)
    b = _randn(24, device=device, dtype=param_dtype, grad=grad) if bias else None
    return (x, *residual, weight, b, 1e-5)


def _norm_backward_args(device, bias=True, dz_out=True):
    x, residual, weight, b, eps = _norm_args(device, bias, residual_dtype=torch.float32, grad=False)
    _, z, mean, rstd = ops.add_layer_norm(x, residual, weight, b, eps)
    return torch.randn_like(z), z, weight, b, mean, rstd, torch.randn_like(z) if dz_out else None


OPCHECK_CASES = {
    "attention_gqa_causal": ("flash_attention", lambda d: _attention_args(d)),
    "attention_strided_scaled": ("flash_attention", _strided_attention_args),
    "attention_fp16": ("flash_attention", lambda d: _attention_args(d, torch.float16, h_kv=2)),
    "attention_backward": ("flash_attention_backward", _attention_backward_args),
    "attention_documents_causal": ("flash_attention", lambda d: _attention_args(d, documents=torch.int64)),
    "attention_documents_int32_not_causal": (
        "flash_attention", lambda d: _attention_args(d, h_kv=2, causal=False, documents=torch.int32)
    ),
    "attention_backward_documents": (
        "flash_attention_backward", lambda d: _attention_backward_args(d, documents=torch.int32)
    ),
    "layer_norm_no_bias": ("layer_norm", lambda d: _norm_args(d, bias=False)),
    "add_layer_norm_mixed_dtypes": (
        "add_layer_norm", lambda d: _norm_args(d, x_dtype=torch.float16, residual_dtype=torch.float32)
    ),
    "layer_norm_backward": ("layer_norm_backward", _norm_backward_args),
    "layer_norm_backward_no_bias_no_dz": (
        "layer_norm_backward", lambda d: _norm_backward_args(d, bias=False, dz_out=False)
    ),
}


def test_every_op_is_registered_with_its_schema():
    for name, schema in SCHEMAS.items():
        assert str(getattr(ops, name).default._schema) == f"gpt2_suite::{name}{schema}"


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, implementation):
    """Schema (no input mutated or aliased), fake tensors (outputs' shapes, strides and dtypes exactly
    the real ones: out is a view of (B, T, H, D) storage), autograd registration and AOT dispatch
    (forward and backward traced with dynamic shapes, compared with eager)."""
    name, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(ops, name).default, make_args(implementation))


def _outputs_and_grads(device):
    """Every op's outputs and every input gradient, on fixed inputs (drawn on CPU, then moved)."""
    generator = torch.Generator().manual_seed(1)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator).to(device).requires_grad_()

    q, k, v = leaf(2, 4, 37, 32), leaf(2, 2, 37, 32), leaf(2, 2, 37, 32)  # GQA: 2 query heads per K/V head
    x, residual, weight, bias = leaf(3, 5, 48), leaf(3, 5, 48), leaf(48), leaf(48)
    out, lse = ops.flash_attention(q, k, v, True, None, None, None)
    packed = [ops.flash_attention(q, k, v, causal, None, *_document_bounds(2, 37, device))[0]
              for causal in (True, False)]
    y, z, mean, rstd = ops.add_layer_norm(x, residual, weight, bias, 1e-5)
    y1, mean1, rstd1 = ops.layer_norm(z, weight, None, 1e-5)
    loss = sum((t * torch.randn(t.shape, generator=generator).to(device)).sum() for t in (out, *packed, y, z, y1))
    loss.backward()
    return [out, lse, *packed, y, z, mean, rstd, y1, mean1, rstd1] + [
        t.grad for t in (q, k, v, x, residual, weight, bias)
    ]


def test_cpu_math_agrees_with_the_kernels(monkeypatch):
    """Without the interpreter the ops compute on CPU in PyTorch: the same results as our kernels,
    to fp32 rounding, with the same layouts."""
    from_kernels = _outputs_and_grads(DEVICE)
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    from_math = _outputs_and_grads("cpu")
    for i, (got, want) in enumerate(zip(from_kernels, from_math)):
        got = got.cpu()
        assert got.shape == want.shape and got.stride() == want.stride() and got.dtype == want.dtype, i
        bound = 8 * torch.finfo(torch.float32).eps * max(1.0, want.abs().max().item())
        torch.testing.assert_close(got, want, rtol=0, atol=bound, msg=f"output {i}")


class _RecordOps(TorchDispatchMode):
    """Records every op dispatched while active: with it (as with FlopCounterMode, fake tensors or
    torch.compile), the public functions go through the registered ops."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.name()))
        return func(*args, **(kwargs or {}))


def _public_calls(device):
    """Outputs and input gradients of every public function, on fixed inputs."""
    generator = torch.Generator().manual_seed(2)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=generator, dtype=dtype).to(device).requires_grad_()

    q, k, v = leaf(2, 4, 37, 32), leaf(2, 2, 37, 32), leaf(2, 2, 37, 32)
    x, residual, weight, bias = leaf(3, 5, 48), leaf(3, 5, 48, dtype=torch.float16), leaf(48), leaf(48)
    document_ids = _document_ids(2, 37, device)
    outs = [gpt2_kernels.flash_attention(q, k, v), gpt2_kernels.flash_attention(q, k, v, False, 0.3, document_ids),
            *gpt2_kernels.add_layer_norm(x, residual, weight, bias), gpt2_kernels.layer_norm(x, weight, None)]
    loss = sum((t * torch.randn(t.shape, generator=generator, dtype=t.dtype).to(device)).sum() for t in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in (q, k, v, x, residual, weight, bias)]


def test_plain_eager_calls_skip_the_dispatcher_with_the_same_bits(monkeypatch):
    """In plain eager mode the public functions and the backward formulas run the ops' own
    implementations and autograd formulas without the dispatcher (utils.call_op: the host cost of a
    call); under a dispatch mode they go through the ops. Both give the same bits, forward and
    backward."""
    eager_calls = []
    for name, route in list(utils._EAGER.items()):
        def counted(*args, name=name, route=route):
            eager_calls.append(name)
            return route(*args)
        monkeypatch.setitem(utils._EAGER, name, counted)
    plain = _public_calls(DEVICE)
    assert sorted(set(eager_calls)) == ["add_layer_norm", "flash_attention", "flash_attention_backward",
                                        "layer_norm", "layer_norm_backward"]
    eager_calls.clear()
    with _RecordOps() as recorder:
        dispatched = _public_calls(DEVICE)
    assert eager_calls == []
    assert {"gpt2_suite::flash_attention", "gpt2_suite::flash_attention_backward", "gpt2_suite::layer_norm",
            "gpt2_suite::add_layer_norm", "gpt2_suite::layer_norm_backward"} <= set(recorder.seen)
    for i, (got, want) in enumerate(zip(plain, dispatched)):
        assert got.dtype == want.dtype and got.stride() == want.stride() and torch.equal(got, want), i


def test_ops_take_cpu_tensors_without_the_interpreter_the_functions_do_not(monkeypatch):
    """The public functions refuse CPU tensors off the interpreter, before any op runs; the ops
    themselves (an exported or compiled graph on CPU) compute the reference math there."""
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    q, k, v, causal, scale, _, _ = _attention_args("cpu", grad=False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*scaled_dot_product_attention"):
        gpt2_kernels.flash_attention(q, k, v)
    out, _ = ops.flash_attention(q, k, v, causal, scale, None, None)
    torch.testing.assert_close(out, gpt2_kernels.attention_ref(q, k, v).float())
    document_ids = _document_ids(1, 17, "cpu")
    out, _ = ops.flash_attention(q, k, v, causal, scale, *gpt2_kernels.document_bounds(document_ids))
    torch.testing.assert_close(out, gpt2_kernels.attention_ref(q, k, v, document_ids=document_ids).float())
    x, weight, bias, eps = _norm_args("cpu", grad=False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*torch.nn.functional.layer_norm"):
        gpt2_kernels.layer_norm(x, weight, bias, eps)
    y, _, _ = ops.layer_norm(x, weight, bias, eps)
    torch.testing.assert_close(y, gpt2_kernels.layer_norm_ref(x, weight, bias, eps).float())


def _import_again(module_name: str):
    """Execute gpt2_kernels/<module>.py once more, as a module of another name (a second import path;
    inside the package, where its relative imports resolve)."""
    path = os.path.join(KERNELS_DIR, f"{module_name}.py")
    spec = importlib.util.spec_from_file_location(f"gpt2_kernels.again_{module_name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_a_second_import_keeps_the_registrations():
    """Importing an op file again registers nothing twice (no error) and leaves every op, its
    autograd and its FLOP formula working; the second copy's functions call the same ops."""
    formulas = {name: flop_counter.flop_registry.get(getattr(ops, name)) for name in SCHEMAS}
    attention_again, layer_norm_again = _import_again("attention"), _import_again("layer_norm")
    assert {name: flop_counter.flop_registry.get(getattr(ops, name)) for name in SCHEMAS} == formulas
    assert all(formulas[name] is not None for name in ("flash_attention", "flash_attention_backward"))
    q, k, v, *_ = _attention_args(DEVICE)
    out = attention_again.flash_attention(q, k, v)
    out.sum().backward()
    assert torch.equal(out, gpt2_kernels.flash_attention(q, k, v)) and q.grad is not None
    x, residual, weight, bias, eps = _norm_args(DEVICE, residual_dtype=torch.float32)
    for got, want in zip(layer_norm_again.add_layer_norm(x, residual, weight, bias, eps),
                         gpt2_kernels.add_layer_norm(x, residual, weight, bias, eps)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("h_kv, causal", [(4, True), (4, False), (2, True), (1, False)])
def test_flop_formulas_are_torchs_sdpa_formulas(h_kv, causal):
    """FlopCounterMode counts our attention, forward and backward, exactly as it counts
    scaled_dot_product_attention's flash kernels on CUDA: the full T x T square whether causal or
    not, every query head (K/V heads counted as repeated). Meta tensors: only the fake
    implementations run."""
    b, h, t, d = 2, 4, 33, 40
    q = torch.randn(b, h, t, d, device="meta", requires_grad=True)
    k, v = (torch.randn(b, h_kv, t, d, device="meta", requires_grad=True) for _ in range(2))
    with FlopCounterMode(display=False) as counter:
        out, _ = ops.flash_attention(q, k, v, causal, None, None, None)
        out.backward(torch.ones_like(out))
    counts = counter.get_flop_counts()["Global"]

    kv_as_q = torch.empty(b, h, t, d, device="meta")  # K/V repeated to H heads, as torch counts GQA
    aten = torch.ops.aten
    sdpa_fwd = flop_counter.flop_registry[aten._scaled_dot_product_flash_attention]
    sdpa_bwd = flop_counter.flop_registry[aten._scaled_dot_product_flash_attention_backward]
    assert counts[ops.flash_attention] == sdpa_fwd(q, kv_as_q, kv_as_q, out_val=None) == 4 * b * h * t * t * d
    assert counts[ops.flash_attention_backward] == sdpa_bwd(out, q, kv_as_q, kv_as_q, out_val=None)
    assert counts[ops.flash_attention_backward] == 10 * b * h * t * t * d  # S recomputed + dP, dV, dQ, dK
    assert counter.get_total_flops() == 14 * b * h * t * t * d
