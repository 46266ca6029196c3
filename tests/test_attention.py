"""gpt2_kernels/attention.py: the fused flash attention against float64 references, forward and every
gradient, on CPU through Triton's interpreter (on a CUDA machine the same tests run compiled).

Tolerance (the flash-attention rule): for each of out, dq, dk, dv the kernel's max abs error
against a float64 reference must be at most twice the error of a same-precision PyTorch
computation (attention_ref(upcast=False): scores and P V in the input dtype, the softmax in fp32) plus a
floor. The floor covers tensors whose same-precision error is (near) zero, e.g. T = 1 where
P = 1 exactly and dq = 0 in exact arithmetic: there the kernel still carries fp32 rounding from
its internal reductions (lse round trip, dP - delta), a few fp32 ulps of the largest intermediate,
and half-precision outputs carry up to one ulp of rounding at their largest element. Hence
floor = max(eps(dtype), 8 eps(fp32)) * max(1, max|ref|).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import compile_for_gpu_in_subprocess

from gpt2_kernels import attention_ref, flash_attention, utils

attention = importlib.import_module("gpt2_kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element they skip fails the comparison."""
    monkeypatch.setattr(utils, "POISON_OUTPUTS", True)


def _floor(dtype: torch.dtype, ref: torch.Tensor) -> float:
    eps = max(torch.finfo(dtype).eps, 8 * torch.finfo(torch.float32).eps)
    return eps * max(1.0, ref.abs().max().item())


def _assert_flash_rule(name: str, got: torch.Tensor, ref64: torch.Tensor, same_precision: torch.Tensor):
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an unwritten element stays NaN)"
    err = (got.double() - ref64).abs().max().item()
    baseline = (same_precision.double() - ref64).abs().max().item()
    bound = 2 * baseline + _floor(got.dtype, ref64)
    assert err <= bound, f"{name}: error {err:.3e} > 2 x same-precision error {baseline:.3e} + floor"


def _inputs(b, h, h_kv, t, d, dtype):
    q = torch.randn(b, h, t, d, dtype=dtype, device=DEVICE)
    k = torch.randn(b, h_kv, t, d, dtype=dtype, device=DEVICE)
    v = torch.randn(b, h_kv, t, d, dtype=dtype, device=DEVICE)
    return q, k, v


def _check_against_references(q, k, v, dout, causal, softmax_scale=None, document_ids=None):
    """Run the kernel forward and backward and compare everything with the references."""
    qk, kk, vk = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = flash_attention(qk, kk, vk, causal=causal, softmax_scale=softmax_scale, document_ids=document_ids)
    out.backward(dout)

    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out64 = attention_ref(q64, k64, v64, causal=causal, softmax_scale=softmax_scale, document_ids=document_ids)
    out64.backward(dout.double())

    ql, kl, vl = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out_lp = attention_ref(
        ql, kl, vl, causal=causal, softmax_scale=softmax_scale, upcast=False, document_ids=document_ids
    )
    out_lp.backward(dout)

    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_flash_rule("out", out, out64, out_lp)
    _assert_flash_rule("dq", qk.grad, q64.grad, ql.grad)
    _assert_flash_rule("dk", kk.grad, k64.grad, kl.grad)
    _assert_flash_rule("dv", vk.grad, v64.grad, vl.grad)
    for x, grad in ((q, qk.grad), (k, kk.grad), (v, vk.grad)):
        assert grad.shape == x.shape and grad.dtype == x.dtype


# Each T in {1, 17, 129, 255}, D in {32, 64, 128} (plus 16, 40 and 256), H_kv in {H, H/2, 1}, causal
# and not, and every dtype appear, in combinations rather than the full cross-product: the
# interpreter is slow. With the interpreter's tiles (64 x 32 forward) T = 129 and 255 span several
# query and key blocks, partial last blocks and the two-piece causal diagonal.
CASES = [
    # (B, H, H_kv, T, D, causal, dtype)
    (1, 2, 2, 1, 32, True, torch.float32),
    (1, 2, 2, 1, 64, False, torch.bfloat16),
    (2, 2, 1, 17, 64, False, torch.float32),
    (1, 2, 2, 17, 128, True, torch.float16),
    (1, 4, 2, 129, 32, True, torch.float16),
    (1, 2, 1, 129, 128, False, torch.bfloat16),
    (1, 2, 2, 129, 64, True, torch.float32),
    (1, 2, 2, 255, 64, True, torch.bfloat16),
    (1, 2, 1, 255, 128, True, torch.float16),
    (1, 2, 2, 255, 32, False, torch.float32),
    (1, 2, 2, 64, 40, True, torch.float32),  # head size that is not a power of two (padded to 64)
    (1, 1, 1, 33, 16, False, torch.float16),
    (1, 1, 1, 40, 256, True, torch.bfloat16),
]


@pytest.mark.parametrize("b, h, h_kv, t, d, causal, dtype", CASES)
def test_matches_float64_reference(b, h, h_kv, t, d, causal, dtype):
    q, k, v = _inputs(b, h, h_kv, t, d, dtype)
    dout = torch.randn_like(q)
    _check_against_references(q, k, v, dout, causal)


@pytest.mark.parametrize("softmax_scale, causal", [(0.3, True), (-0.3, True), (-0.3, False), (0.0, True)])
def test_custom_softmax_scale(softmax_scale, causal):
    """Any scale: the forward takes unmasked blocks' row max from the raw scores (an FMA per score),
    which needs a scale >= 0, so a negative one is moved onto q; 0 must not meet -inf * 0 in masked
    blocks. T = 100 spans unmasked blocks below the diagonal and the masked diagonal/tail ones."""
    q, k, v = _inputs(1, 2, 1, 100, 32, torch.float32)
    _check_against_references(q, k, v, torch.randn_like(q), causal=causal, softmax_scale=softmax_scale)


def test_strided_inputs_as_the_model_makes_them():
    """q, k, v as views of one fused projection (B, T, 3, H, D), a non-contiguous upstream gradient,
    and a value tensor whose last dimension is strided (copied by the launcher)."""
    b, t, h, d = 2, 45, 2, 32
    qkv = torch.randn(b, t, 3, h, d, device=DEVICE)
    q, k, _ = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D), strided
    assert not q.is_contiguous()
    v = torch.randn(b, h, t, 2 * d, device=DEVICE)[..., ::2]  # last-dim stride 2
    dout = torch.randn(b, t, h, d, device=DEVICE).transpose(1, 2)
    _check_against_references(q, k, v, dout, causal=True)


def test_output_layout_and_saved_logsumexp():
    """out is a (B, H, T, D) view of (B, T, H, D) storage; lse is the natural-log logsumexp."""
    q, k, v = _inputs(1, 2, 2, 50, 32, torch.float32)
    out, lse = attention.attention_fwd(q, k, v, causal=True, softmax_scale=None)
    assert out.transpose(1, 2).is_contiguous()
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(32)
    scores = scores.masked_fill(~torch.ones(50, 50, dtype=torch.bool, device=DEVICE).tril(), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), rtol=0, atol=1e-5)


def test_backward_is_deterministic():
    """dK/dV of a shared K/V head sum over its query heads in a fixed order: bitwise repeatable."""
    q, k, v = _inputs(1, 4, 1, 70, 32, torch.float16)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        flash_attention(*leaves, causal=True).backward(dout)
        grads.append([x.grad for x in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


# Packed documents (document_ids). The interpreter's tiles: forward 64 x 32, dK/dV 64 keys x 32
# queries, dQ 64 x 32, so a boundary at 64 is a block edge for every kernel and one at 32 is one
# for the inner blocks.
FWD_TILE = attention.FWD_INTERPRET_CONFIG.kwargs
assert FWD_TILE == {"BLOCK_M": 64, "BLOCK_N": 32}  # the boundaries below are chosen for these tiles


def _document_ids(b, t, starts=(), n_random=0, dtype=torch.int64):
    """(B, T) non-decreasing ids: a new document at each position of `starts` (in every row) and at
    n_random random positions per row (repeats allowed: fewer, longer documents)."""
    ids = torch.zeros(b, t, dtype=torch.int64)
    for row in range(b):
        new_doc = torch.zeros(t, dtype=torch.int64)
        positions = list(starts) + torch.randint(1, max(t, 2), (n_random,)).tolist()
        new_doc[[p for p in positions if 0 < p < t]] = 1
        ids[row] = new_doc.cumsum(0)
    return ids.to(device=DEVICE, dtype=dtype)


DOCUMENT_CASES = [
    # (B, H, H_kv, T, D, causal, dtype, starts, n_random)
    (2, 2, 1, 129, 32, True, torch.float32, (40, 41, 42, 100), 5),  # length-1 documents, GQA, random
    (1, 4, 2, 97, 64, False, torch.bfloat16, (1, 2, 50), 4),  # T not a multiple of any block
    (1, 2, 2, 128, 64, True, torch.float16, (32, 64, 96), 0),  # boundaries at block edges
    (1, 2, 2, 128, 32, False, torch.float32, (64,), 0),  # one edge shared by every kernel's blocks
    (2, 2, 2, 150, 40, True, torch.bfloat16, (), 8),  # padded head size, random boundaries
    (1, 2, 1, 17, 16, True, torch.float32, (16,), 3),  # one partial block; last token alone
    (1, 2, 2, 200, 128, False, torch.float16, (63, 65, 127, 129, 190), 0),
    (1, 1, 1, 40, 256, True, torch.bfloat16, (7, 8, 33), 0),
    (1, 2, 2, 1, 32, True, torch.float32, (), 0),  # T = 1
]


@pytest.mark.parametrize("b, h, h_kv, t, d, causal, dtype, starts, n_random", DOCUMENT_CASES)
def test_documents_match_float64_reference(b, h, h_kv, t, d, causal, dtype, starts, n_random):
    q, k, v = _inputs(b, h, h_kv, t, d, dtype)
    document_ids = _document_ids(b, t, starts, n_random, dtype=torch.int32 if b == 1 else torch.int64)
    _check_against_references(q, k, v, torch.randn_like(q), causal, document_ids=document_ids)


@pytest.mark.parametrize("causal", [True, False])
def test_one_document_per_row_is_plain_attention_bit_for_bit(causal):
    """All ids equal: the document path's unmasked ranges are the plain path's, and its masks
    keep what the plain masks keep, so output and gradients are bitwise the same."""
    q, k, v = _inputs(2, 2, 1, 161, 32, torch.float16)
    dout = torch.randn_like(q)
    results = []
    for document_ids in (None, torch.zeros(2, 161, dtype=torch.int64, device=DEVICE) + 7):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=causal, document_ids=document_ids)
        out.backward(dout)
        results.append([out] + [x.grad for x in leaves])
    for plain, packed in zip(*results):
        assert torch.equal(plain, packed)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN inputs
@pytest.mark.parametrize("causal", [True, False])
def test_blocks_of_other_documents_are_never_read(causal):
    """Two documents split at 64, a block edge of every kernel: with NaN in one document's
    inputs, the other document's outputs and gradients stay finite only if no kernel visits a
    block of the poisoned one (a masked but visited block would carry NaN * 0 = NaN)."""
    t, half = 128, 64
    document_ids = _document_ids(1, t, (half,))
    for poisoned, clean in ((slice(0, half), slice(half, t)), (slice(half, t), slice(0, half))):
        q, k, v = _inputs(1, 2, 1, t, 32, torch.float32)
        dout = torch.randn_like(q)
        for x in (q, k, v, dout):
            x[:, :, poisoned] = float("nan")
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=causal, document_ids=document_ids)
        out.backward(dout)
        for name, x in zip(("out", "dq", "dk", "dv"), [out] + [x.grad for x in leaves]):
            assert torch.isfinite(x[:, :, clean]).all(), name
            assert torch.isnan(x[:, :, poisoned]).any(), name


def test_backward_with_documents_is_deterministic():
    q, k, v = _inputs(1, 4, 2, 90, 32, torch.bfloat16)
    document_ids = _document_ids(1, 90, (30, 31), 3)
    dout = torch.randn_like(q)
    grads = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        flash_attention(*leaves, causal=True, document_ids=document_ids).backward(dout)
        grads.append([x.grad for x in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize(
    "make_ids, message",
    [
        (lambda: torch.zeros(1, 8, dtype=torch.int64), r"shape \(batch, seq_len\) = \(2, 8\)"),
        (lambda: torch.zeros(2, 9, dtype=torch.int64), r"shape \(batch, seq_len\)"),
        (lambda: torch.zeros(2, 1, 8, dtype=torch.int64), r"shape \(batch, seq_len\)"),
        (lambda: torch.zeros(2, 8), "int32 or int64"),
        (lambda: torch.zeros(2, 8, dtype=torch.bool), "int32 or int64"),
        (lambda: torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3], [0, 1, 2, 3, 2, 3, 4, 5]]), "non-decreasing"),
    ],
)
def test_bad_document_ids_say_what_is_wrong(make_ids, message):
    q, k, v = _inputs(2, 2, 2, 8, 32, torch.float32)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, document_ids=make_ids().to(DEVICE))


def test_document_ids_on_another_device_are_refused():
    q, k, v = _inputs(1, 2, 2, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="document_ids must be on q's device"):
        flash_attention(q, k, v, document_ids=torch.zeros(1, 8, dtype=torch.int64, device="meta"))


def test_document_bounds_built_once_give_the_same_result():
    """document_bounds(ids), built once and passed to every layer's call, is the ids' own path:
    bitwise the same output and gradients; the bounds are each token's document [start, end)."""
    from gpt2_kernels import DocumentBounds, document_bounds

    ids = torch.tensor([[0, 0, 0, 1, 2, 2, 2, 2, 3]], device=DEVICE)
    bounds = document_bounds(ids)
    assert isinstance(bounds, DocumentBounds) and bounds.start.dtype == bounds.end.dtype == torch.int32
    assert bounds.start.tolist() == [[0, 0, 0, 3, 4, 4, 4, 4, 8]]
    assert bounds.end.tolist() == [[3, 3, 3, 4, 8, 8, 8, 8, 9]]
    q, k, v = _inputs(2, 4, 2, 75, 32, torch.bfloat16)
    document_ids = _document_ids(2, 75, (1, 33), 4)
    dout = torch.randn_like(q)
    results = []
    whole = document_bounds(torch.cat([document_ids, document_ids + 9], dim=1))  # (2, 150)
    sliced = DocumentBounds(whole.start[:, :75], whole.end[:, :75])  # a strided view: the kernels copy it
    assert not sliced.start.is_contiguous()
    for given in (document_ids, document_bounds(document_ids), sliced):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=True, document_ids=given)
        out.backward(dout)
        results.append([out] + [x.grad for x in leaves])
    for from_ids, *from_bounds in zip(*results):
        assert all(torch.equal(from_ids, other) for other in from_bounds)


def test_bad_document_bounds_say_what_is_wrong():
    from gpt2_kernels import DocumentBounds, document_bounds

    q, k, v = _inputs(2, 2, 2, 8, 32, torch.float32)
    with pytest.raises(ValueError, match=r"doc_start must be int32 of shape \(batch, seq_len\) = \(2, 8\)"):
        flash_attention(q, k, v, document_ids=document_bounds(torch.zeros(1, 8, dtype=torch.int64, device=DEVICE)))
    wrong = DocumentBounds(*(torch.zeros(2, 8, dtype=torch.int64, device=DEVICE) for _ in range(2)))
    with pytest.raises(ValueError, match="from document_bounds"):
        flash_attention(q, k, v, document_ids=wrong)
    with pytest.raises(ValueError, match="non-decreasing"):
        document_bounds(torch.tensor([[0, 1, 0]]))


def test_registry_routes_to_kernel():
    """The model's registry entry "triton" calls this kernel (equal lengths) with the same result."""
    registry = importlib.import_module("gpt2.registry")
    q, k, v = _inputs(1, 2, 2, 20, 32, torch.float32)
    got = registry.ATTENTION["triton"](q, k, v, causal=True)
    torch.testing.assert_close(got, flash_attention(q, k, v, causal=True), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: _inputs(1, 2, 2, 8, 32, torch.float64), "float16, bfloat16 and float32"),
        (lambda: _inputs(1, 2, 2, 8, 320, torch.float32), "head_dim 1..256"),
        (lambda: _inputs(1, 3, 2, 8, 32, torch.float32), "must divide the number of query heads"),
        (
            lambda: (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)),
            "equal query and key lengths",
        ),
        (lambda: (torch.randn(2, 8, 32),) * 3, "must be 4-D"),
        (
            lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)),
            "head_dim differs",
        ),
        (
            lambda: (torch.randn(2, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32)),
            "batch size differs",
        ),
        (
            lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32).half(), torch.randn(1, 2, 8, 32)),
            "share a dtype",
        ),
        (
            lambda: (torch.randn(1, 2, 8, 32), torch.randn(1, 2, 8, 32), torch.randn(1, 1, 8, 32)),
            "same shape",
        ),
        (lambda: (torch.zeros(1, 1, 1, 16).expand(1, 1, attention.MAX_SEQ_LEN + 1, 16),) * 3, "seq_len up to"),
    ],
)
def test_unsupported_inputs_say_what_is_wrong(make, message):
    q, k, v = (x.to(DEVICE) for x in make())
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v)


def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    q, k, v = _inputs(1, 1, 1, 4, 32, torch.float32)
    with pytest.raises(ValueError, match="needs CUDA tensors.*scaled_dot_product_attention"):
        flash_attention(q.cpu(), k.cpu(), v.cpu())


def test_one_poison_switch_for_every_output():
    """The fixture's switch is gpt2_kernels.utils.POISON_OUTPUTS, the only one: the launcher's buffers
    come out NaN, and the op file keeps no copy of the switch that the fixture would miss."""
    assert not hasattr(attention, "POISON_OUTPUTS")
    assert torch.isnan(attention._empty_bhtd(1, 2, 3, 16, torch.float32, DEVICE)).all()


def test_interpreter_runs_one_pinned_config():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("only under the interpreter")
    for kernel in (attention._attn_fwd_kernel, attention._attn_bwd_dkdv_kernel, attention._attn_bwd_dq_kernel):
        assert len(kernel.configs) == 1


@pytest.mark.parametrize("by_head_dim, interpret_config, names", [
    (attention.FWD_CONFIGS, attention.FWD_INTERPRET_CONFIG, ("BLOCK_M", "BLOCK_N")),
    (attention.BWD_DKDV_CONFIGS, attention.BWD_DKDV_INTERPRET_CONFIG, ("BLOCK_N1", "BLOCK_M1")),
    (attention.BWD_DQ_CONFIGS, attention.BWD_DQ_INTERPRET_CONFIG, ("BLOCK_M2", "BLOCK_N2")),
], ids=["fwd", "dkdv", "dq"])
def test_autotuner_times_only_the_head_dim_class(monkeypatch, by_head_dim, interpret_config, names):
    """On a GPU the autotuner gets every class's configs; the pruner must leave only those of the
    head dim's class: all of them for long sequences, those no longer than a short sequence
    needs (or the class's smallest) otherwise. Every config keeps the kernels' divisibility."""
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    every = attention._autotune_list(by_head_dim, interpret_config)
    prune = attention._prune(names, by_head_dim)
    outer, inner = names
    assert all(c.kwargs[outer] % c.kwargs[inner] == 0 for c in every)
    for block_d, head_dim_class in ((16, 64), (64, 64), (128, 128), (256, 256)):
        in_class = set(map(attention._config_key, by_head_dim[head_dim_class]))
        kept = prune(every, {"T_BUCKET": 16384, "BLOCK_D": block_d})
        assert set(map(attention._config_key, kept)) == in_class and len(kept) == len(in_class)
        for t_bucket in (16, 32, 64, 128):
            kept = prune(every, {"T_BUCKET": t_bucket, "BLOCK_D": block_d})
            assert kept and set(map(attention._config_key, kept)) <= in_class
            fits = [c for c in kept if max(c.kwargs[outer], c.kwargs[inner]) <= max(32, t_bucket)]
            assert fits == kept or len(kept) == 1
    assert prune([interpret_config], {"T_BUCKET": 16, "BLOCK_D": 64}) == [interpret_config]


@pytest.mark.parametrize("by_head_dim, names", [
    (attention.FWD_CONFIGS, ("BLOCK_M", "BLOCK_N")),
    (attention.BWD_DKDV_CONFIGS, ("BLOCK_N1", "BLOCK_M1")),
    (attention.BWD_DQ_CONFIGS, ("BLOCK_M2", "BLOCK_N2")),
], ids=["fwd", "dkdv", "dq"])
def test_pruner_traces_without_graph_breaks(monkeypatch, by_head_dim, names):
    """Dynamo traces a pruner wherever it traces an autotuned launch. Short sequences (T <= 32)
    take the fallback to the class's smallest tile, which was min(..., key=lambda ...) and broke
    the graph; traced in one graph now, the pruner picks what it picks in eager mode."""
    monkeypatch.setattr(utils, "interpreting", lambda: False)
    every = attention._autotune_list(by_head_dim, attention.FWD_INTERPRET_CONFIG)
    prune = attention._prune(names, by_head_dim)
    outer, inner = names
    cases = [{"T_BUCKET": t_bucket, "BLOCK_D": block_d} for t_bucket in (16, 32, 1024) for block_d in (64, 256)]

    def tile_areas(x):
        return [x * sum(c.kwargs[outer] * c.kwargs[inner] for c in prune(every, args)) for args in cases]

    torch._dynamo.reset()
    try:
        traced = torch.compile(tile_areas, fullgraph=True, backend="eager")(torch.ones(()))
    finally:
        torch._dynamo.reset()
    assert [t.item() for t in traced] == [t.item() for t in tile_areas(torch.ones(()))]


def test_short_autotune_lists_are_part_of_the_full_ones():
    """GPT2_SUITE_AUTOTUNE=short: each head-dim class keeps 3-4 configs of its full list (all of a
    list of fewer), so every short config has the divisibility and the no-spill report of the full."""
    for full, short in ((attention.FWD_CONFIGS, attention.FWD_SHORT_CONFIGS),
                        (attention.BWD_DKDV_CONFIGS, attention.BWD_DKDV_SHORT_CONFIGS),
                        (attention.BWD_DQ_CONFIGS, attention.BWD_DQ_SHORT_CONFIGS)):
        assert short.keys() == full.keys()
        for head_dim_class, configs in short.items():
            keys = [attention._config_key(c) for c in configs]
            assert len(set(keys)) == len(keys) and set(keys) <= set(map(attention._config_key, full[head_dim_class]))
            assert min(3, len(full[head_dim_class])) <= len(keys) <= 4


def test_autotune_switch_picks_the_list(monkeypatch):
    full, short = ["full"], ["short"]
    for value, expected in ((None, full), ("", full), ("full", full), ("short", short)):
        if value is None:
            monkeypatch.delenv(utils.AUTOTUNE_ENV, raising=False)
        else:
            monkeypatch.setenv(utils.AUTOTUNE_ENV, value)
        assert utils.autotune_choice(full, short) is expected
    monkeypatch.setenv(utils.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="'full' or 'short'"):
        utils.autotune_choice(full, short)


# The switch is read when the op files are imported (the autotune lists are built at decoration):
# import them fresh, without the interpreter (whose single pinned config would hide the lists).
_AUTOTUNE_SCRIPT = textwrap.dedent(
    """
    import importlib
    A = importlib.import_module("gpt2_kernels.attention")
    L = importlib.import_module("gpt2_kernels.layer_norm")

    def keys(configs):
        return sorted(map(A._config_key, configs))

    for kernel, short in ((A._attn_fwd_kernel, A.FWD_SHORT_CONFIGS),
                          (A._attn_bwd_dkdv_kernel, A.BWD_DKDV_SHORT_CONFIGS),
                          (A._attn_bwd_dq_kernel, A.BWD_DQ_SHORT_CONFIGS)):
        assert keys(kernel.configs) == sorted(set(keys(c for cs in short.values() for c in cs))), kernel
    for kernel in (L._layer_norm_fwd_kernel, L._layer_norm_bwd_kernel):
        assert keys(kernel.configs) == keys(L.LN_SHORT_CONFIGS), kernel
    print("short")
    """
)


def test_short_switch_is_read_at_import():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[utils.AUTOTUNE_ENV] = "short"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _AUTOTUNE_SCRIPT], env=env, cwd=root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "short", result.stderr[-2000:]


def test_grid_keeps_axis_1_within_cudas_limit():
    """B * H on axis 0 (2^31 - 1), the sequence blocks on axis 1 (65,535): B * H = 100,000 launches,
    and so does the longest sequence at the smallest row block any config puts on axis 1."""
    assert attention._grid(100_000, 1024, 64) == (100_000, 16)
    row_blocks = [c.kwargs[name] for by_head_dim, name in ((attention.FWD_CONFIGS, "BLOCK_M"),
                                                          (attention.BWD_DKDV_CONFIGS, "BLOCK_N1"),
                                                          (attention.BWD_DQ_CONFIGS, "BLOCK_M2"))
                  for configs in by_head_dim.values() for c in configs]
    row_blocks += [attention.FWD_INTERPRET_CONFIG.kwargs["BLOCK_M"],
                   attention.BWD_DKDV_INTERPRET_CONFIG.kwargs["BLOCK_N1"],
                   attention.BWD_DQ_INTERPRET_CONFIG.kwargs["BLOCK_M2"], 32]  # 32: the smallest preprocess block
    assert attention._grid(1, attention.MAX_SEQ_LEN, min(row_blocks))[1] <= 65535


def test_launches_run_under_the_inputs_device():
    """Triton launches on the current CUDA device: the launchers enter the inputs' device first."""
    assert isinstance(utils.launch_device(torch.empty(0)), contextlib.nullcontext)
    cuda_guard = utils.launch_device(_FakeCudaTensor(torch.device("cuda", 1)))
    assert isinstance(cuda_guard, torch.cuda.device) and cuda_guard.idx == 1


class _FakeCudaTensor:
    """Only a .device: enough for launch_device, without a GPU."""

    def __init__(self, device):
        self.device = device


@pytest.mark.requires_cuda
def test_inputs_on_a_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    q, k, v = (x.to("cuda:1") for x in _inputs(1, 2, 2, 300, 64, torch.bfloat16))
    with torch.cuda.device(0):
        _check_against_references(q, k, v, torch.randn_like(q), causal=True)


# Compiles (no launch) each kernel for sm_90 and sm_80 with the real Triton compiler and ptxas, in a
# process without TRITON_INTERPRET: proof on a GPU-less machine that the kernels are GPU code, not
# interpreter-only Python. One tile config each (the pinned interpreter ones, themselves valid GPU
# tiles), D = 64 unpadded and D = 40 padded, without and with document_ids (HAS_DOCS). On sm_90 the
# bf16 products must become Hopper's wgmma.
_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib
    import triton
    from benchmarks.resources import compile_kernel, resource_usage

    A = importlib.import_module("gpt2_kernels.attention")
    R = importlib.import_module("benchmarks.resources")
    R.SCALAR_TYPES.update(DOC_START="*i32", DOC_END="*i32")  # the document bounds: int32 tensors
    no_docs = dict(HAS_DOCS=False, DOC_START=None, DOC_END=None)  # as launched without document_ids
    for cc, dtype, d, causal, docs in ((90, "bf16", 64, True, no_docs), (80, "fp16", 40, False, no_docs),
                                       (90, "bf16", 64, True, dict(HAS_DOCS=True)),
                                       (80, "fp16", 40, False, dict(HAS_DOCS=True))):
        common = dict(N_REP=2, HEAD_DIM=d, BLOCK_D=max(16, triton.next_power_of_2(d)), CAUSAL=causal,
                      DOT_PRECISION="tf32", **docs)
        for kernel, config in ((A._attn_fwd_kernel, A.FWD_INTERPRET_CONFIG),
                               (A._attn_bwd_dkdv_kernel, A.BWD_DKDV_INTERPRET_CONFIG),
                               (A._attn_bwd_dq_kernel, A.BWD_DQ_INTERPRET_CONFIG)):
            compiled = compile_kernel(kernel, {**common, **config.kwargs}, dtype, cc, config.num_warps, 2)
            usage = resource_usage(compiled)
            assert usage["registers"] > 0 and (usage["hgmma"] > 0) == (cc == 90), (kernel, usage)
        compile_kernel(A._attn_bwd_preprocess_kernel, dict(HEAD_DIM=d, BLOCK_D=common["BLOCK_D"], BLOCK_M=64),
                       dtype, cc)
    # fp32 with IEEE products
    compile_kernel(A._attn_fwd_kernel, dict(N_REP=1, HEAD_DIM=32, BLOCK_D=32, CAUSAL=True, DOT_PRECISION="ieee",
                                            **no_docs, **A.FWD_INTERPRET_CONFIG.kwargs), "fp32", 90)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_gpu():
    compile_for_gpu_in_subprocess(_COMPILE_SCRIPT)


@pytest.mark.requires_cuda
@pytest.mark.parametrize("t, d", [(1024, 64), (4096, 128)])
def test_gpt2_sizes_bf16_on_gpu(t, d):
    """The issue's GPU check: GPT-2 sizes in bf16, compiled kernels, causal."""
    b, h = (8, 12) if t == 1024 else (1, 8)
    q, k, v = _inputs(b, h, h, t, d, torch.bfloat16)
    _check_against_references(q, k, v, torch.randn_like(q), causal=True)
