"""gpt2_kernels/layer_norm.py: layer_norm and add_layer_norm against float64 references, the output(s)
and every gradient (dx, dresidual, dweight, dbias), on CPU through Triton's interpreter.

Tolerance: the kernel's max abs error against float64 must be at most twice the error of the same
computation done by eager PyTorch in the same precision (layer_norm_ref(upcast=False), i.e.
F.layer_norm in the input dtype), plus a floor of max(eps(dtype), 8 eps(fp32)) * max(1, max|ref|):
a few fp32 ulps for the kernel's fp32 row reductions over N elements, or one ulp of the output
dtype at its largest element, for tensors where PyTorch happens to be (nearly) exact. Where PyTorch's
own fp32 error is large (rows far from 0: 1000 + small noise), one test takes its error on the same
rows without the offset instead, which LayerNorm ignores.
"""

from __future__ import annotations

import importlib
import os
import textwrap

import pytest
import torch
from conftest import compile_for_gpu_in_subprocess

from gpt2_kernels import add_layer_norm, layer_norm, layer_norm_ref, utils

ln_module = importlib.import_module("gpt2_kernels.layer_norm")  # the package's `layer_norm` is the function

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-5


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element they skip fails the comparison."""
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)


def _assert_rule(name, got, ref64, same_precision):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element stays NaN)"
    err = (got.double() - ref64).abs().max().item()
    baseline = (same_precision.double() - ref64).abs().max().item()
    eps = max(torch.finfo(got.dtype).eps, 8 * torch.finfo(torch.float32).eps)
    bound = 2 * baseline + eps * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > 2 x same-precision error {baseline:.3e} + floor"


def _params(n, dtype, bias=True):
    weight = (1 + 0.2 * torch.randn(n, device=DEVICE)).to(dtype)
    b = (0.2 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None
    return weight, b


def _leaves(tensors, dtype=None):
    """Fresh autograd leaves: cast to dtype, or (dtype None) the tensors themselves with their strides
    (a strided weight stays strided)."""
    return [
        None if t is None else (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()
        for t in tensors
    ]


def _kernel(eps):
    def kernel(x, residual, weight, bias):
        if residual is None:
            return layer_norm(x, weight, bias, eps)
        return add_layer_norm(x, residual, weight, bias, eps)

    return kernel


def _reference(upcast, eps):
    def ref(x, residual, weight, bias):
        return layer_norm_ref(x, weight, bias, eps, residual=residual, upcast=upcast)

    return ref


def _run(fn, leaves, dy, dz):
    """Forward + backward of fn (kernel or reference) on leaves; returns outputs and grads."""
    outs = fn(*leaves)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    grads_out = [dy.to(outs[0].dtype)] + ([dz.to(outs[1].dtype)] if dz is not None else [])
    torch.autograd.backward(outs[: len(grads_out)], grads_out)
    return outs, [t.grad if t is not None else None for t in leaves]


def _check(x, residual, weight, bias, dy, dz=None, eps=EPS, baseline_x=None):
    """Kernel vs float64 reference vs same-precision PyTorch: outputs and every gradient.
    baseline_x, for layer_norm only: the x of the same-precision run instead of x, a better-conditioned
    input with the same exact normalisation (x without its rows' common offset)."""
    assert baseline_x is None or residual is None
    inputs = [x, residual, weight, bias]
    k_leaves = _leaves(inputs)
    k_outs, k_grads = _run(_kernel(eps), k_leaves, dy, dz)
    r_outs, r_grads = _run(_reference(True, eps), _leaves(inputs, torch.float64), dy, dz)
    baseline_inputs = inputs if baseline_x is None else [baseline_x, *inputs[1:]]
    p_outs, p_grads = _run(_reference(False, eps), _leaves(baseline_inputs), dy, dz)

    for name, got, want, base in zip(["y", "z"], k_outs, r_outs, p_outs):
        assert got.shape == x.shape
        _assert_rule(name, got, want, base)
    grad_names = ["dx", "dresidual", "dweight", "dbias"]
    for name, leaf, got, want, base in zip(grad_names, k_leaves, k_grads, r_grads, p_grads):
        if leaf is None:
            continue
        assert got.dtype == leaf.dtype and got.shape == leaf.shape, name
        _assert_rule(name, got, want, base)
    return k_outs


@pytest.mark.parametrize(
    "shape, dtype, bias",
    [
        ((2, 3, 17), torch.float32, True),  # odd hidden size, 3-D leading shape
        ((4, 96), torch.bfloat16, False),  # no bias
        ((5, 1, 768), torch.float16, True),  # GPT-2 width
        ((3, 8192), torch.float32, True),  # the largest size the issue asks for
        ((1, 1), torch.float32, True),  # a single element: xhat = 0
    ],
)
def test_layer_norm_matches_float64(shape, dtype, bias):
    x = torch.randn(shape, device=DEVICE).to(dtype)
    weight, b = _params(shape[-1], dtype, bias)
    dy = torch.randn(shape, device=DEVICE)
    _check(x, None, weight, b, dy)


@pytest.mark.parametrize(
    "shape, x_dtype, residual_dtype, param_dtype, bias",
    [
        ((2, 5, 768), torch.bfloat16, torch.bfloat16, torch.bfloat16, True),
        ((3, 7, 100), torch.float32, torch.float32, torch.float32, False),
        # autocast-style: half block outputs into an fp32 residual stream with fp32 parameters
        ((4, 7, 100), torch.float16, torch.float32, torch.float32, True),
        ((2, 4096), torch.float16, torch.float16, torch.float32, True),
    ],
)
def test_add_layer_norm_matches_float64(shape, x_dtype, residual_dtype, param_dtype, bias):
    x = torch.randn(shape, device=DEVICE).to(x_dtype)
    residual = (3 * torch.randn(shape, device=DEVICE)).to(residual_dtype)
    weight, b = _params(shape[-1], param_dtype, bias)
    dy = torch.randn(shape, device=DEVICE)
    dz = torch.randn(shape, device=DEVICE)  # the residual stream's own downstream gradient
    y, z = _check(x, residual, weight, b, dy, dz)
    assert z.dtype == y.dtype == torch.promote_types(x_dtype, residual_dtype)
    # z is exactly x + residual, except that Triton's interpreter truncates fp32 -> bfloat16 where
    # the GPU (and PyTorch) round to nearest: there allow one bfloat16 ulp.
    one_ulp = 2.0**-7 if z.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1" else 0.0
    torch.testing.assert_close(z, x.to(z.dtype) + residual.to(z.dtype), rtol=one_ulp, atol=0)


def test_add_layer_norm_with_only_the_normalised_output_used():
    """The last block's residual stream may feed nothing else: dz_out is absent."""
    shape = (3, 64)
    x, residual = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    weight, b = _params(64, torch.float32)
    _check(x, residual, weight, b, torch.randn(shape, device=DEVICE), dz=None)


def test_strided_rows():
    """Rows of a wider buffer (a row stride that is not N) and a transposed leading layout."""
    x = torch.randn(2, 3, 2 * 48, device=DEVICE)[..., :48]  # row stride 96
    residual = torch.randn(3, 2, 48, device=DEVICE).transpose(0, 1)  # rows not evenly strided: copied
    weight, b = _params(48, torch.float32)
    _check(x, residual, weight, b, torch.randn(2, 3, 48, device=DEVICE), torch.randn(2, 3, 48, device=DEVICE))


@pytest.mark.parametrize(
    "residual_dtype, dtype, weight_step, bias_step",
    [
        (None, torch.float32, 2, 2),  # w[::2], b[::2]
        (torch.bfloat16, torch.bfloat16, 3, 0),  # a stride-3 weight, a bias expanded from one value
        (torch.float32, torch.float16, 2, None),  # autocast-style, no bias
    ],
    ids=["layer_norm", "add_layer_norm", "add_layer_norm_mixed"],
)
def test_strided_weight_and_bias(residual_dtype, dtype, weight_step, bias_step):
    """Weight and bias views whose stride is not 1: the kernels index them as contiguous, so the
    launchers copy them; their gradients come back shaped like them."""
    shape = (2, 3, 40)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    residual = torch.randn(shape, device=DEVICE).to(residual_dtype) if residual_dtype else None
    param_dtype = residual_dtype or dtype
    weight = (1 + 0.2 * torch.randn(40 * weight_step, device=DEVICE)).to(param_dtype)[::weight_step]
    bias = None
    if bias_step == 0:
        bias = (0.2 * torch.randn((), device=DEVICE)).to(param_dtype).expand(40)
    elif bias_step:
        bias = (0.2 * torch.randn(40 * bias_step, device=DEVICE)).to(param_dtype)[::bias_step]
    assert weight.stride(0) == weight_step and (bias is None or bias.stride(0) == bias_step)
    dz = torch.randn(shape, device=DEVICE) if residual is not None else None
    _check(x, residual, weight, bias, torch.randn(shape, device=DEVICE), dz)


def _offset_rows(kind, shape):
    """(offset, rows) in fp32: rows around a large common offset, a different one per row
    (1000 + N(0, 1)), constant (zero variance) or the offset plus N(0, 1e-2) noise."""
    offset = 1000 + torch.randn(*shape[:-1], 1, device=DEVICE)
    noise = torch.randn(shape, device=DEVICE) if kind == "noisy" else torch.zeros(shape, device=DEVICE)
    return offset, offset + 1e-2 * noise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("eps", [1e-5, 1e-12])
@pytest.mark.parametrize("kind", ["constant", "noisy"])
@pytest.mark.parametrize("fused", [False, True], ids=["layer_norm", "add_layer_norm"])
def test_rows_with_zero_variance_or_a_large_offset(fused, kind, eps, dtype):
    """A constant row must normalise to exactly 0 (y = bias), at any eps, and a row of 1000 + small
    noise no worse than PyTorch does: an fp32 mean of such rows is off by ulps of 1000, which rstd
    then magnifies. In bfloat16, 1000 + N(0, 1e-2) rounds to a constant row."""
    shape = (3, 100)
    _, rows = _offset_rows(kind, shape)
    x, residual = rows.to(dtype), None
    if fused:
        # Part of the offset comes in x: per-row multiples of 1/4, so that z = x + residual is exact
        # near 1000 in fp32 and the reference normalises the same z as the kernel.
        x = (0.25 * torch.randint(-8, 9, (shape[0], 1), device=DEVICE) + torch.zeros(shape, device=DEVICE)).to(dtype)
        residual = rows.to(dtype)
    weight, bias = _params(shape[-1], dtype)
    dz = torch.randn(shape, device=DEVICE) if fused else None
    _check(x, residual, weight, bias, torch.randn(shape, device=DEVICE), dz, eps=eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_offset_rows_as_accurate_as_centred_rows(eps):
    """LayerNorm ignores a common offset, and so should its error: y and every gradient of rows of
    1000 + N(0, 1e-2) noise in fp32 must be as accurate as PyTorch's normalisation of the same rows
    without the offset. (PyTorch's own fp32 error on the offset rows, ulps of 1000 in its mean times
    rstd, is the looser bound the test above applies: a backward that recomputed xhat from the saved
    fp32 mean alone would pass that one, at ~1e-3 relative error, and fail this one.)"""
    shape = (3, 100)
    offset, x = _offset_rows("noisy", shape)
    centred = x - offset  # exact in fp32 (x is within a factor 2 of offset): x = offset + centred
    weight, bias = _params(shape[-1], torch.float32)
    _check(x, None, weight, bias, torch.randn(shape, device=DEVICE), eps=eps, baseline_x=centred)


def test_parameter_gradients_are_deterministic():
    x = torch.randn(37, 80, device=DEVICE, dtype=torch.float16)
    weight, b = _params(80, torch.float32)
    dy = torch.randn(37, 80, device=DEVICE, dtype=torch.float16)
    grads = []
    for _ in range(2):
        w, bb = weight.clone().requires_grad_(), b.clone().requires_grad_()
        layer_norm(x, w, bb, EPS).backward(dy)
        grads.append((w.grad, bb.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_empty_batch():
    x = torch.randn(0, 32, device=DEVICE, requires_grad=True)
    weight, b = (t.requires_grad_() for t in _params(32, torch.float32))
    y = layer_norm(x, weight, b, EPS)
    y.sum().backward()
    assert y.shape == (0, 32) and torch.equal(weight.grad, torch.zeros(32, device=DEVICE))


def test_registry_pair_matches_torch_pair():
    registry = importlib.import_module("gpt2.registry")
    x, residual = torch.randn(2, 3, 64, device=DEVICE), torch.randn(2, 3, 64, device=DEVICE)
    weight, b = _params(64, torch.float32)
    (norm, add_norm), (torch_norm, torch_add_norm) = registry.NORM["triton"], registry.NORM["torch"]
    torch.testing.assert_close(norm(x, weight, b, EPS), torch_norm(x, weight, b, EPS))
    for got, want in zip(add_norm(x, residual, weight, b, EPS), torch_add_norm(x, residual, weight, b, EPS)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: (torch.randn(2, 8, dtype=torch.float64), torch.ones(8), None, None), "float16, bfloat16 and float32"),
        (lambda: (torch.randn(2, 8), torch.ones(7), None, None), r"weight must have shape \(8,\)"),
        (lambda: (torch.randn(2, 8), torch.ones(8), torch.ones(9), None), r"bias must have shape \(8,\)"),
        (lambda: (torch.randn(2, 8), torch.ones(8), None, torch.randn(3, 8)), "residual shape"),
        (lambda: (torch.randn(2, 16385), torch.ones(16385), None, None), "up to 16384"),
    ],
)
def test_unsupported_inputs_say_what_is_wrong(make, message):
    x, weight, bias, residual = (t.to(DEVICE) if t is not None else None for t in make())
    with pytest.raises(ValueError, match=message):
        if residual is None:
            layer_norm(x, weight, bias, EPS)
        else:
            add_layer_norm(x, residual, weight, bias, EPS)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors.*torch.nn.functional.layer_norm"):
        layer_norm(torch.randn(2, 8), torch.ones(8), None, EPS)


def test_one_poison_switch_for_every_output():
    """The fixture's switch is gpt2_kernels.utils.POISON_OUTPUTS, the only one; the op file keeps no copy."""
    assert not hasattr(ln_module, "POISON_OUTPUTS")
    assert torch.isnan(utils.empty((3, 8), torch.float32, DEVICE)).all()


@pytest.mark.parametrize("max_per_thread", [64, 32], ids=["fwd", "bwd"])
def test_autotune_prune_keeps_tiles_within_limits(max_per_thread):
    """For every row length up to 32768 the pruner leaves configs, all within the per-thread
    limit, except the documented one-row fallback for rows no config can hold."""
    prune = ln_module._prune_tiles(max_per_thread)
    for block_n in (2**i for i in range(4, 16)):
        kept = prune(ln_module.LN_CONFIGS, {"BLOCK_N": block_n})
        assert kept
        fallback = [(c.kwargs["ROWS"], c.num_warps) for c in kept] == [(1, 16)]
        for c in kept:
            per_thread = c.kwargs["ROWS"] * block_n / (32 * c.num_warps)
            assert per_thread <= max_per_thread or fallback
            assert per_thread >= 2 or c.num_warps == 1 or fallback


def test_short_autotune_list_is_part_of_the_full_one():
    """GPT2_SUITE_AUTOTUNE=short tunes over LN_SHORT_CONFIGS: configs of LN_CONFIGS, which leave
    every row size up to 32768 at least one config after pruning (no fallback needed for N <= 16384)."""
    full = {(c.kwargs["ROWS"], c.num_warps) for c in ln_module.LN_CONFIGS}
    short = [(c.kwargs["ROWS"], c.num_warps) for c in ln_module.LN_SHORT_CONFIGS]
    assert 3 <= len(short) <= 4 and set(short) <= full
    for max_per_thread in (64, 32):
        prune = ln_module._prune_tiles(max_per_thread)
        for block_n in (2**i for i in range(4, 15)):
            kept = prune(ln_module.LN_SHORT_CONFIGS, {"BLOCK_N": block_n})
            assert kept and all(c in ln_module.LN_SHORT_CONFIGS for c in kept), (max_per_thread, block_n)


@pytest.mark.parametrize("programs, n, weight_dtype, bias_dtype", [
    (70, 100, torch.bfloat16, torch.float32),  # several row steps, a partial last one, a partial column tile
    (1, 64, torch.float32, None),
    (33, 129, torch.float16, torch.float16),
])
def test_partial_sums_in_a_fixed_order_and_the_parameters_dtype(programs, n, weight_dtype, bias_dtype):
    """dweight/dbias: the partials' column sums, fp32 inside, rounded once to each parameter's
    dtype, and bitwise repeatable."""
    dw_partial = torch.randn(programs, n, device=DEVICE)
    db_partial = torch.randn(programs, n, device=DEVICE) if bias_dtype is not None else None
    dweight, dbias = ln_module._sum_partials(dw_partial, db_partial, weight_dtype, bias_dtype)
    pairs = [(dweight, dw_partial, weight_dtype)] + ([(dbias, db_partial, bias_dtype)] if bias_dtype else [])
    for got, partial, dtype in pairs:
        ref = partial.double().sum(0)
        assert got.dtype == dtype and got.shape == (n,)
        bound = torch.finfo(dtype).eps * ref.abs() + 8 * torch.finfo(torch.float32).eps * programs
        assert ((got.double() - ref).abs() <= bound).all()
    again = ln_module._sum_partials(dw_partial, db_partial, weight_dtype, bias_dtype)
    assert torch.equal(again[0], dweight) and (dbias is None or torch.equal(again[1], dbias))


# Compiles (no launch) the three kernels for sm_90 and sm_80 with the real Triton compiler and ptxas, in
# a process without TRITON_INTERPRET: proof on a GPU-less machine that they are GPU code.
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib
    from benchmarks.resources import compile_kernel

    L = importlib.import_module("gpt2_kernels.layer_norm")
    for cc, dtype, block_n, rows, warps in ((90, "bf16", 1024, 4, 4), (80, "fp16", 8192, 1, 16),
                                            (90, "fp32", 128, 16, 4)):
        flags = dict(HAS_BIAS=True, BLOCK_N=block_n, ROWS=rows)
        compile_kernel(L._layer_norm_fwd_kernel, dict(HAS_RESIDUAL=True, **flags), dtype, cc, warps)
        compile_kernel(L._layer_norm_bwd_kernel, dict(HAS_DRESIDUAL=True, **flags), dtype, cc, warps)
        compile_kernel(L._layer_norm_dwdb_kernel, dict(HAS_BIAS=True, ROWS=L.DWDB_ROWS, COLS=L.DWDB_COLS),
                       dtype, cc)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    compile_for_gpu_in_subprocess(_COMPILE_SCRIPT)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("n", [768, 1600, 8192])
def test_gpt2_sizes_bf16_on_gpu(n):
    shape = (8, 1024, n)
    x, residual = torch.randn(shape, device=DEVICE).bfloat16(), torch.randn(shape, device=DEVICE).bfloat16()
    weight, b = _params(n, torch.float32)
    _check(x, residual, weight, b, torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE))
