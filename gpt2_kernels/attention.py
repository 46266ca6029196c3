"""Fused flash attention, forward and backward, in Triton.

Contract
--------
``flash_attention(q, k, v, causal=True, softmax_scale=None, document_ids=None) -> out``

    S   = softmax_scale * Q K^T            (T x T per head; never materialised)
    P   = softmax(S)  (row-wise; with ``causal``, S[i, j] = -inf for j > i; with ``document_ids``,
                       S[i, j] = -inf where ids[b, i] != ids[b, j])
    out = P V

* q: (B, H, T, D); k, v: (B, H_kv, T, D) with H_kv dividing H. Query head h reads K/V head
  h // (H / H_kv) (grouped-query attention, K/V never repeated in memory). out: (B, H, T, D),
  returned as a view of (B, T, H, D) storage so that ``out.transpose(1, 2).reshape(B, T, H * D)``
  is free.
* dtypes: float16, bfloat16, float32 (q, k, v alike). Accumulation, the softmax statistics and
  the saved logsumexp are float32; values are rounded to the input dtype only when stored.
  float32 matmuls follow ``torch.backends.cuda.matmul.allow_tf32`` (IEEE fp32 unless TF32 is on).
* D: any head size 1..256; tiles use the next power of two (at least 16) and mask the padding,
  so 32, 64 and 128 run unpadded. T: any length 1..MAX_SEQ_LEN (2,097,120; no multiple-of-block
  requirement). Any B * H (the heads are on grid axis 0, the sequence blocks on axis 1).
  Causal masking is top-left aligned, which is the only alignment for equal query/key lengths;
  cached decoding with fewer queries than keys belongs to SDPA.
* Inputs may be strided (e.g. views of a fused qkv projection); only the last dimension must be
  contiguous, and it is made so (copy) when it isn't.
* CUDA tensors, or CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, for tests).
* document_ids (packed sequences): None, or an int32/int64 (B, T) tensor on q's device,
  non-decreasing along T in each row (a token's document index). A query attends only to keys of
  its own document (and, with causal, not after itself); every row sees at least itself. The order
  is checked (one small reduction and a device-to-host sync) except while torch.compile traces.
  Or the ids' ``document_bounds(document_ids)``, computed and checked once and then passed to every
  layer's call (as flash-attn's varlen API takes cu_seqlens built once per batch): each call then
  neither recomputes the bounds nor syncs. The ops and launchers take the bounds only, and never
  check them. No gradient for either.
* No attention dropout, no attention mask other than causal and documents, no Tq != Tk.

Operators (registered when this module is imported; see gpt2_kernels/utils.py for why ``custom_op``)
-------------------------------------------------------------------------------------------
``flash_attention`` validates its inputs (the ValueErrors above; CPU tensors only under the
interpreter) and runs the PyTorch custom operator (in plain eager mode its implementation and
autograd formula directly, without the dispatcher: gpt2_kernels/utils.py, call_op)

    gpt2_suite::flash_attention(Tensor q, Tensor k, Tensor v, bool causal, float? softmax_scale,
        Tensor? doc_start, Tensor? doc_end) -> (Tensor out, Tensor lse)

whose autograd formula calls (with the same bounds, saved: not recomputed)

    gpt2_suite::flash_attention_backward(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
        Tensor lse, bool causal, float? softmax_scale, Tensor? doc_start, Tensor? doc_end)
        -> (Tensor dq, Tensor dk, Tensor dv)

(returns unnamed in the schemas; lse is non-differentiable and not returned by ``flash_attention``).
On CUDA the ops run the launchers below; on CPU they run them too under the interpreter, and
otherwise the same math in plain PyTorch, fp32 inside, scores materialised (the forward is
``attention_ref`` of gpt2_kernels/reference.py, the backward its derivation below on the same
scores), so an exported or compiled graph holding the ops has a meaning off-GPU. Their fake
implementations allocate exactly as the launchers do (out, dq, dk, dv as (B, H, T, D) views of
(B, T, H, D) storage; lse (B, H, T) fp32). torch.compile(fullgraph=True) and torch.export keep each
op as one opaque node.

FLOPs: both ops carry torch.utils.flop_counter formulas, torch's own for SDPA, so FlopCounterMode
counts them exactly as it counts ``scaled_dot_product_attention`` on CUDA: the full T x T square,
causal or not (no halving for the mask), every query head (K/V heads of GQA counted as if repeated);
forward 4 B H T^2 D (QK^T and PV), backward 10 B H T^2 D (S recomputed, then dP, dV, dQ, dK). The
forward equals what the matmuls of eager attention count; the backward counts the recomputation of
S (2 B H T^2 D) that eager autograd does not do. FlopCounterMode copies the formula registry when
it is created: import this module first (gpt2_kernels.flash_attention, or building a model with
attn_impl="triton", does).

Algorithm (FlashAttention-2, Dao 2023, arXiv:2307.08691; Triton tutorial 06)
-------------------------------------------------------------------------
Forward: one program per (batch, head, BLOCK_M query rows); causal programs take the query blocks
heaviest (last) first. It streams K/V in BLOCK_N blocks and
keeps the online-softmax state per row: running max m, running sum l and the unnormalised output
acc. Work is in base 2: scores are scaled by ``qk_scale = softmax_scale * log2(e)`` so exp() is a
single exp2; in unmasked blocks the scale is applied inside exp2's argument, ``qk * qk_scale - m'``
as one FMA per score, with m' from the raw scores' row max (a negative softmax_scale is moved onto
q first, exactly). Per block:  m' = max(m, rowmax(S)),  p = exp2(S - m'),  alpha = exp2(m - m'),
l = alpha l + rowsum(p),  acc = alpha acc + p V.  At the end out = acc / l and
``lse = (m + log2 l) * ln 2`` (natural-log logsumexp of the scaled scores, fp32, shape (B, H, T))
is saved for the backward pass. With ``causal``, key blocks entirely above the diagonal are never
visited, blocks entirely below it run without any mask, and only the diagonal blocks (BLOCK_M
divides into BLOCK_N-sized pieces) pay for the mask. Without ``causal``, only the last, partial
key block is masked.

Documents (``document_ids``; the constexpr HAS_DOCS, so the path without them compiles exactly as
before): ``document_bounds`` turns the ids into two int32 (B, T) tensors, each token's document
bounds [doc_start, doc_end) (a cummax/cummin over the positions where the id changes); the ops and
kernels take only these. Key n is visible to query m iff doc_start[m] <= n < doc_end[m] (and n <= m when
causal). Documents are runs, so a query block's first row has the earliest document start and its
last row the latest end: key blocks before the block holding doc_start[first row] or from
doc_end[last row] on share no document with it and are never visited (forward and dQ start their
key loop there; dK/dV, by the same rule on its keys' bounds, ends its query loop at doc_end of
its last key). Of the visited blocks, those inside every row's document (from doc_start[last row]
to doc_end[first row]) run unmasked; the rest carry the document mask. A row can meet whole
masked blocks before its first visible key: the forward then subtracts 0 instead of its row max
(-inf), so p = alpha = 0 rather than NaN.

Backward derivation (same symbols as the code)
----------------------------------------------
With S = scale Q K^T, P = exp(S - lse) (lse recomputed from nothing else), O = P V:

    dV = P^T dO
    dP = dO V^T
    dS = P * (dP - delta),   delta_i = sum_j P_ij dP_ij = sum_j P_ij (dO_i . V_j) = dO_i . O_i
    dQ = scale dS K
    dK = scale dS^T Q

(the softmax Jacobian: dS_ij = P_ij (dP_ij - sum_k P_ik dP_ik)). ``delta`` is computed once by a
preprocess kernel as rowsum(dO * O), in fp32. Then two kernels recompute P block by block from
q, k and lse:
* ``_attn_bwd_dkdv_kernel``: one program per (batch, K/V head, BLOCK_N1 keys). It loops over the
  query heads sharing that K/V head and over their query blocks, accumulating dK and dV in
  registers, so the GQA sum happens inside one program in a fixed order.
* ``_attn_bwd_dq_kernel``: one program per (batch, head, BLOCK_M2 queries), looping over keys;
  heaviest query blocks first when causal, as in the forward (dK/dV's first key blocks are its
  heaviest already).
Every output element is written by exactly one program: no atomics, bitwise-deterministic.
Cost: the dq kernel recomputes P and dP a second time (about 1.4x the FLOPs of a fused
atomic-add backward), the price of determinism. With GQA the dkdv grid has H/H_kv times fewer
programs, each doing H/H_kv times more work.

Tuning: block sizes, warps and pipeline stages are autotuned from the module-level config lists
below (chosen for H100/A100), keyed on head size, causality, dtype and the power-of-two bucket of T.
GPT2_SUITE_AUTOTUNE=short, set before this module is imported, swaps in the short lists (3-4
configs per head-dim class) so that a first GPU call compiles a fraction of the configs.
Under the interpreter one small pinned config is used, so CPU tests are fast and repeatable and
still cover the multi-block and diagonal-split logic (BLOCK_M = 2 BLOCK_N).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch.utils import flop_counter

from . import utils
from .reference import attention_ref, attention_scale, attention_scores, repeat_kv
from .utils import LN2, LOG2E

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# Sequence blocks go on grid axis 1, which CUDA caps at 65,535 programs; no config's row block on
# that axis (BLOCK_M, BLOCK_N1, BLOCK_M2, the preprocess block) is under 32 rows.
MAX_SEQ_LEN = 65535 * 32

# The masks a key (or query) loop applies to its blocks, its MASK argument, named for what each one
# hides. tl.constexpr, like LOG2E, so each loop compiles only its own mask's code.
MASK_NONE = tl.constexpr(0)  # none: every position in the loop's range is valid and visible
MASK_CAUSAL = tl.constexpr(1)  # the diagonal: keys after the query (with documents, also before its document)
MASK_TAIL = tl.constexpr(2)  # the partial last block: positions >= T
MASK_DOCUMENT = tl.constexpr(3)  # outside each row's document [doc_start, doc_end) (doc_end <= T: the tail too)


def _tiles(names: tuple[str, str], by_head_dim: dict[int, list[tuple]]) -> dict[int, list[triton.Config]]:
    """{largest head dim: [triton.Config]} from {largest head dim: [(tile, tile, warps, stages)]}."""
    return {
        max_d: [triton.Config(dict(zip(names, (a, b))), num_warps=w, num_stages=s) for a, b, w, s in rows]
        for max_d, rows in by_head_dim.items()
    }


# Tile configs per head-dim class (D <= 64, <= 128, <= 256); the autotuner times only the class of
# the call's head dim. Chosen for H100/A100 so that none spills registers or overflows shared
# memory on sm_90 (`python -m benchmarks.resources` prints the compiler's report): a 128-row tile
# needs 8 warps above D = 64, and D = 256 needs small tiles.
# (BLOCK_M, BLOCK_N, num_warps, num_stages). BLOCK_N must divide BLOCK_M (causal diagonal split).
FWD_CONFIGS = _tiles(("BLOCK_M", "BLOCK_N"), {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
         (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 3), (64, 32, 4, 2)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
})
FWD_INTERPRET_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=1)

# (BLOCK_M1 queries per step, BLOCK_N1 keys per program, ...). BLOCK_M1 must divide BLOCK_N1.
BWD_DKDV_CONFIGS = _tiles(("BLOCK_M1", "BLOCK_N1"), {
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 64, 4, 2), (32, 32, 4, 2)],
    128: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3), (16, 64, 4, 2), (32, 32, 4, 2)],
    256: [(16, 32, 4, 2)],
})
BWD_DKDV_INTERPRET_CONFIG = triton.Config({"BLOCK_M1": 32, "BLOCK_N1": 64}, num_warps=4, num_stages=1)

# (BLOCK_M2 queries per program, BLOCK_N2 keys per step, ...). BLOCK_N2 must divide BLOCK_M2.
BWD_DQ_CONFIGS = _tiles(("BLOCK_M2", "BLOCK_N2"), {
    64: [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2),
         (32, 32, 4, 2)],
    128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 16, 4, 2), (32, 32, 4, 2)],
    256: [(64, 16, 8, 2), (32, 16, 4, 2)],  # 64x32 on 8 warps spills at D=256 under Triton 3.6 (2026-12-02 report)
})
BWD_DQ_INTERPRET_CONFIG = triton.Config({"BLOCK_M2": 64, "BLOCK_N2": 32}, num_warps=4, num_stages=1)

# The short lists (GPT2_SUITE_AUTOTUNE=short, for a GPU session whose first calls must compile
# quickly): 3-4 configs of each class's full list (all of it where it has no more), picked from the
# compiler report (results/compiler/resources.md: no spills, wgmma tiles) and the configs Triton's
# tutorial 06 pins (forward 128 x 64 on 4 warps; backward dK/dV 32 x 128 and dQ 128 x 32, here on
# 8 warps where 4 spill), plus one 64-row tile for short sequences and occupancy.
FWD_SHORT_CONFIGS = _tiles(("BLOCK_M", "BLOCK_N"), {
    64: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    256: [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
})
BWD_DKDV_SHORT_CONFIGS = _tiles(("BLOCK_M1", "BLOCK_N1"), {
    64: [(32, 128, 8, 3), (64, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3)],
    128: [(32, 128, 8, 3), (32, 64, 4, 3), (32, 64, 8, 3)],
    256: [(16, 32, 4, 2)],
})
BWD_DQ_SHORT_CONFIGS = _tiles(("BLOCK_M2", "BLOCK_N2"), {
    64: [(128, 32, 4, 3), (128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    128: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
    256: [(64, 16, 8, 2), (32, 16, 4, 2)],
})
# What the autotuner gets, fixed when this module is imported (gpt2_kernels/utils.py: autotune_choice).
FWD_TUNED = utils.autotune_choice(FWD_CONFIGS, FWD_SHORT_CONFIGS)
BWD_DKDV_TUNED = utils.autotune_choice(BWD_DKDV_CONFIGS, BWD_DKDV_SHORT_CONFIGS)
BWD_DQ_TUNED = utils.autotune_choice(BWD_DQ_CONFIGS, BWD_DQ_SHORT_CONFIGS)


def _config_key(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages


def _autotune_list(by_head_dim: dict[int, list[triton.Config]], interpret_config: triton.Config):
    """Every class's configs, once each (the pruner picks a class), or the pinned interpreter config."""
    unique = {_config_key(c): c for configs in by_head_dim.values() for c in configs}
    return utils.autotune_configs(list(unique.values()), interpret_config)


def _prune(block_names: tuple[str, str], by_head_dim: dict[int, list[triton.Config]]):
    """early_config_prune for a (outer, inner) tile pair: the configs of the head dim's class
    with no tile longer than the (power-of-two) sequence needs, or else the class's smallest.

    Plain loops and comparisons only: dynamo traces a pruner wherever it traces an autotuned
    launch (a ``wrap_triton`` call; our ops are opaque to it, so not theirs), and
    ``min(..., key=lambda ...)`` broke its graph."""
    outer_name, inner_name = block_names

    def area(config):
        return config.kwargs[outer_name] * config.kwargs[inner_name]

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        t_cap = max(32, args["T_BUCKET"])
        head_dim_class = min(d for d in by_head_dim if d >= args["BLOCK_D"])
        in_class = {_config_key(c) for c in by_head_dim[head_dim_class]}
        # (The interpreter's single pinned config belongs to no class: keep it.)
        candidates = [c for c in configs if _config_key(c) in in_class] or configs
        kept = [c for c in candidates if max(c.kwargs[outer_name], c.kwargs[inner_name]) <= t_cap]
        if kept:
            return kept
        smallest = candidates[0]  # the first of the smallest tile area, as min() would pick
        for config in candidates[1:]:
            if area(config) < area(smallest):
                smallest = config
        return [smallest]

    return prune


# ----------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------


@triton.jit
def _load_tile(base, rows, stride_row, cols, n_rows, HEAD_DIM: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (len(rows), BLOCK_D) tile of a (T, HEAD_DIM) matrix with unit column stride.
    Row offsets are int64. Rows >= n_rows (when CHECK_ROWS) and padded columns read as zero."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    PAD_D: tl.constexpr = HEAD_DIM != cols.shape[0]
    if CHECK_ROWS:
        if PAD_D:
            tile = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if PAD_D:
            tile = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with fp32 accumulation. DOT_PRECISION "ieee" or "tf32" matters only for
    fp32 operands. "interp-bf16" is for Triton's interpreter only, whose tl.dot multiplies bfloat16
    storage bits as integers: there the operands go through fp32, which computes the same thing as
    the GPU's bf16 MMA (bf16 products are exact in fp32; the MMA accumulates in fp32)."""
    if DOT_PRECISION == "interp-bf16":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _store_tile(base, rows, stride_row, cols, n_rows, value, HEAD_DIM: tl.constexpr):
    """Store a tile, rounding to the destination dtype, skipping rows >= n_rows and padded columns."""
    ptrs = base + rows[:, None].to(tl.int64) * stride_row + cols[None, :]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(ptrs, value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _query_block(CAUSAL: tl.constexpr):
    """This program's query block, from grid axis 1. Causal blocks get heavier down the sequence
    (block i visits i + 1 key blocks), so causal programs take them heaviest first: the GPU
    dispatches programs in order (axis 0, every head, fastest), and the last to start, which set
    the tail, are then the lightest (longest-processing-time-first, as FlashAttention-3 schedules)."""
    if CAUSAL:
        block = tl.num_programs(1) - 1 - tl.program_id(1)
    else:
        block = tl.program_id(1)
    return block


@triton.jit
def _doc_rows(DOC_START, DOC_END, off_b, offs, T):
    """Each row's document [start, end) of positions, from the (B, T) int32 bounds tensors; rows
    >= T (never stored) get [0, T), so they see some key and compute no 0/0."""
    start = tl.load(DOC_START + off_b * T + offs, mask=offs < T, other=0)
    end = tl.load(DOC_END + off_b * T + offs, mask=offs < T, other=T)
    return start, end


@triton.jit
def _doc_blocks(DOC_START, DOC_END, off_b, first, last, T, BLOCK: tl.constexpr):
    """For the rows [first, last] (last < T) of one program, the blocks of BLOCK positions on the
    other side (keys of a query block, or queries of a key block) that can share a document with
    them: [lo, hi), of which [mid1, mid2) lie in every row's document (no mask needed). Documents
    are runs of positions, so the first row's document starts first and the last row's ends last:
    lo = the block holding first's document start, hi = last's document end; the unmasked middle
    starts after last's document start and ends before first's document end."""
    first_start = tl.load(DOC_START + off_b * T + first)
    last_start = tl.load(DOC_START + off_b * T + last)
    first_end = tl.load(DOC_END + off_b * T + first)
    hi = tl.load(DOC_END + off_b * T + last)
    lo = (first_start // BLOCK) * BLOCK
    mid1 = tl.minimum(tl.cdiv(last_start, BLOCK) * BLOCK, hi)
    mid2 = tl.maximum(mid1, (first_end // BLOCK) * BLOCK)
    return lo, mid1, mid2, hi


@triton.jit
def _doc_key_blocks(
    DOC_START, DOC_END, off_b, start_m, T, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr
):
    """The key ranges (lo, mid1, mid2, hi) of the query block [start_m, start_m + BLOCK_M) with
    documents (forward and dQ kernels): [lo, mid1) document mask, [mid1, mid2) none, [mid2, hi)
    the edge mask. Causal: keys below the diagonal all precede every row, so only the document
    start matters for them (the unmasked run ends at the diagonal), and hi is the block's end.
    A query's document starts at or before it, so lo <= start_m."""
    last_m = tl.minimum(start_m + BLOCK_M, T) - 1
    lo, mid1, mid2, hi = _doc_blocks(DOC_START, DOC_END, off_b, start_m, last_m, T, BLOCK_N)
    if CAUSAL:
        mid1, mid2, hi = tl.minimum(mid1, start_m), start_m, last_m + 1
    return lo, mid1, mid2, hi


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
    row_start, row_end,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi). MASK: MASK_NONE (every key valid and visible),
    MASK_CAUSAL (key <= query; also excludes keys >= T for every real query row; with HAS_DOCS also
    the document mask), MASK_TAIL (key < T), MASK_DOCUMENT (HAS_DOCS: row_start <= key < row_end,
    each query row's document; row_end <= T excludes the tail).
    qk_scale >= 0 (attention_fwd moves a negative scale's sign onto q).
    The masked loops are a few blocks long: no software pipelining there (num_stages=1)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASK != MASK_NONE else None):
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        qk = _dot(q, tl.trans(k), None, DOT_PRECISION)  # (BLOCK_M, BLOCK_N) raw scores
        # Every row has seen at least one visible key before (or in) its first masked block, so
        # m_new is finite and no exp2(-inf - -inf) NaN can arise.
        if MASK == MASK_NONE:
            # max(s) = max(qk) * qk_scale for qk_scale >= 0, so s - m_new is one FMA per score.
            m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
            m_ref = m_new
            p = tl.exp2(tl.fma(qk, qk_scale, -m_ref[:, None]))
        else:
            s = qk * qk_scale  # log2 units; scaled before masking, so qk_scale = 0 meets no -inf * 0
            if MASK == MASK_CAUSAL:
                visible = offs_m[:, None] >= offs_n[None, :]
                if HAS_DOCS:
                    visible = visible & (offs_n[None, :] >= row_start[:, None])
                s = tl.where(visible, s, float("-inf"))
            elif MASK == MASK_TAIL:
                s = tl.where(offs_n[None, :] < T, s, float("-inf"))
            else:  # MASK_DOCUMENT
                visible = (offs_n[None, :] >= row_start[:, None]) & (offs_n[None, :] < row_end[:, None])
                s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_ref = m_new
            if HAS_DOCS:
                # With documents a row can meet whole masked blocks before its first visible key
                # (m_new = -inf): subtract 0 there, so p = alpha = exp2(-inf) = 0, not NaN; m_i
                # itself stays -inf until the row's first visible key.
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_ref[:, None])
        alpha = tl.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = _dot(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(
    configs=_autotune_list(FWD_TUNED, FWD_INTERPRET_CONFIG),
    key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_DOCS"],
    prune_configs_by={"early_config_prune": _prune(("BLOCK_M", "BLOCK_N"), FWD_TUNED)},
)
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, OUT, LSE, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, T_BUCKET, qk_scale,
    N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tl.static_assert(BLOCK_M % BLOCK_N == 0, "BLOCK_N must divide BLOCK_M (causal diagonal split)")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_bh = tl.program_id(0)  # b * H + h (the grid: _grid)
    start_m = _query_block(CAUSAL) * BLOCK_M
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // N_REP  # the K/V head this query head shares
    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh
    o_base = OUT + off_b * stride_ob + off_h * stride_oh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_base, offs_m, stride_qt, offs_d, T, HEAD_DIM, True)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (log2 units)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running unnormalised output
    # Keys [0, mid) need no mask, keys [mid, hi) the edge mask. Causal: the blocks below the
    # diagonal, then the diagonal [start_m, start_m + BLOCK_M) (blocks above it are skipped).
    # Otherwise: the whole key blocks, then the partial tail.
    if HAS_DOCS:
        # Documents: keys [lo, mid1) with the document mask, [mid1, mid2) unmasked, [mid2, hi)
        # with the edge mask (causal: the diagonal, document mask included; otherwise the
        # document mask, which also excludes keys >= T). Key blocks outside [lo, hi) share no
        # document with this query block and are never visited.
        row_start, row_end = _doc_rows(DOC_START, DOC_END, off_b, offs_m, T)
        lo, mid1, mid2, hi = _doc_key_blocks(DOC_START, DOC_END, off_b, start_m, T, BLOCK_M, BLOCK_N, CAUSAL)
        EDGE_MASK: tl.constexpr = MASK_CAUSAL if CAUSAL else MASK_DOCUMENT
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, mid1, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N, MASK_DOCUMENT, DOT_PRECISION, True,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid1, mid2, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N, MASK_NONE, DOT_PRECISION, True,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid2, hi, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N, EDGE_MASK, DOT_PRECISION, True,
        )
    else:
        if CAUSAL:
            mid, hi = start_m, tl.minimum(start_m + BLOCK_M, T)
        else:
            mid, hi = (T // BLOCK_N) * BLOCK_N, T
        EDGE_MASK: tl.constexpr = MASK_CAUSAL if CAUSAL else MASK_TAIL
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, mid, T, qk_scale,
            None, None, HEAD_DIM, BLOCK_N, MASK_NONE, DOT_PRECISION, False,
        )
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid, hi, T, qk_scale,
            None, None, HEAD_DIM, BLOCK_N, EDGE_MASK, DOT_PRECISION, False,
        )

    acc = acc / l_i[:, None]
    _store_tile(o_base, offs_m, stride_ot, offs_d, T, acc, HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * LN2
    tl.store(LSE + pid_bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def _attn_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O) in fp32, shape (B, H, T)."""
    pid_bh = tl.program_id(0)
    start_m = tl.program_id(1) * BLOCK_M
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(OUT + off_b * stride_ob + off_h * stride_oh, offs_m, stride_ot, offs_d, T, HEAD_DIM, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d, T, HEAD_DIM, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
    offs_n, offs_d, lo, hi, T, qk_scale, key_start, key_end,
    HEAD_DIM: tl.constexpr, BLOCK_M1: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), working transposed
    (keys on rows). MASK: MASK_NONE, MASK_CAUSAL (query >= key; with HAS_DOCS also the document
    mask), MASK_TAIL (loads of query rows >= T read zeros: q = dO = 0 and lse = delta = 0 there,
    so their P^T dO and dS^T Q terms vanish without a score mask), MASK_DOCUMENT (HAS_DOCS:
    key_start <= query < key_end, each key's document; key_end <= T excludes the query rows >= T)."""
    offs_m0 = tl.arange(0, BLOCK_M1)
    for start_m in tl.range(lo, hi, BLOCK_M1, num_stages=1 if MASK != MASK_NONE else None):  # masked: a few steps
        offs_m = start_m + offs_m0
        q = _load_tile(q_base, offs_m, stride_qt, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        do = _load_tile(do_base, offs_m, stride_dot, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        if MASK != MASK_NONE:
            lse = tl.load(lse_base + offs_m, mask=offs_m < T, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < T, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, tl.trans(q), None, DOT_PRECISION) * qk_scale  # S^T, log2 units
        p_t = tl.exp2(s_t - (lse * LOG2E)[None, :])  # P^T = exp(S - lse)^T
        if MASK == MASK_CAUSAL:
            visible = offs_m[None, :] >= offs_n[:, None]
            if HAS_DOCS:
                visible = visible & (offs_m[None, :] < key_end[:, None])
            p_t = tl.where(visible, p_t, 0.0)
        elif MASK == MASK_DOCUMENT:
            visible = (offs_m[None, :] >= key_start[:, None]) & (offs_m[None, :] < key_end[:, None])
            p_t = tl.where(visible, p_t, 0.0)
        dv = _dot(p_t.to(do.dtype), do, dv, DOT_PRECISION)  # dV += P^T dO
        dp_t = _dot(v, tl.trans(do), None, DOT_PRECISION)  # dP^T = V dO^T
        ds_t = p_t * (dp_t - delta[None, :])  # dS^T = P^T * (dP^T - delta)
        dk = _dot(ds_t.to(q.dtype), q, dk, DOT_PRECISION)  # dK += dS^T Q (scaled later)
    return dk, dv


@triton.autotune(
    configs=_autotune_list(BWD_DKDV_TUNED, BWD_DKDV_INTERPRET_CONFIG),
    key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "N_REP", "HAS_DOCS"],
    prune_configs_by={"early_config_prune": _prune(("BLOCK_N1", "BLOCK_M1"), BWD_DKDV_TUNED)},
)
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, T, T_BUCKET, qk_scale, softmax_scale,
    N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr,
):
    tl.static_assert(BLOCK_N1 % BLOCK_M1 == 0, "BLOCK_M1 must divide BLOCK_N1 (causal diagonal split)")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_bhkv = tl.program_id(0)  # b * H_kv + h_kv
    # Key block n meets the queries from n on when causal: program 0 is already the heaviest.
    start_n = tl.program_id(1) * BLOCK_N1
    H_KV = H // N_REP
    off_b = (pid_bhkv // H_KV).to(tl.int64)
    off_hkv = (pid_bhkv % H_KV).to(tl.int64)

    offs_n = start_n + tl.arange(0, BLOCK_N1)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + off_b * stride_kb + off_hkv * stride_kh, offs_n, stride_kt, offs_d, T, HEAD_DIM, True)
    v = _load_tile(V + off_b * stride_vb + off_hkv * stride_vh, offs_n, stride_vt, offs_d, T, HEAD_DIM, True)
    dk = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N1, BLOCK_D], tl.float32)

    # Query blocks: causal starts at the diagonal (earlier queries cannot see these keys).
    if CAUSAL:
        lo = start_n + BLOCK_N1
    else:
        lo = 0
    t_full = lo + (tl.maximum(T - lo, 0) // BLOCK_M1) * BLOCK_M1  # whole query blocks after lo
    if HAS_DOCS:
        # Documents: queries [doc_lo, mid1) with the document mask, [mid1, mid2) unmasked,
        # [mid2, doc_hi) with the document mask again (causal: the diagonal first, then
        # [lo, mid2) unmasked). Query blocks outside share no document with these keys.
        key_start, key_end = _doc_rows(DOC_START, DOC_END, off_b, offs_n, T)
        last_n = tl.minimum(start_n + BLOCK_N1, T) - 1
        doc_lo, mid1, mid2, doc_hi = _doc_blocks(DOC_START, DOC_END, off_b, start_n, last_n, T, BLOCK_M1)
        if CAUSAL:
            # Unmasked: whole query blocks from lo on that end before the first key's document does.
            first_end = tl.load(DOC_END + off_b * T + start_n)
            doc_lo, mid1 = lo, lo
            mid2 = lo + (tl.maximum(first_end - lo, 0) // BLOCK_M1) * BLOCK_M1
    else:
        key_start, key_end = None, None

    # The query heads sharing this K/V head, in a fixed order: the GQA sum needs no atomics.
    for rep in range(N_REP):
        off_h = off_hkv * N_REP + rep
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        stats = (off_b * H + off_h) * T
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, start_n, tl.minimum(start_n + BLOCK_N1, T), T, qk_scale, key_start, key_end,
                HEAD_DIM, BLOCK_M1, MASK_CAUSAL, DOT_PRECISION, HAS_DOCS,
            )
        if HAS_DOCS:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, doc_lo, mid1, T, qk_scale, key_start, key_end, HEAD_DIM, BLOCK_M1, MASK_DOCUMENT,
                DOT_PRECISION, True,
            )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, mid1, mid2, T, qk_scale, key_start, key_end, HEAD_DIM, BLOCK_M1, MASK_NONE,
                DOT_PRECISION, True,
            )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, mid2, doc_hi, T, qk_scale, key_start, key_end, HEAD_DIM, BLOCK_M1, MASK_DOCUMENT,
                DOT_PRECISION, True,
            )
        else:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, lo, t_full, T, qk_scale, None, None, HEAD_DIM, BLOCK_M1, MASK_NONE, DOT_PRECISION,
                False,
            )
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, LSE + stats, DELTA + stats, stride_qt, stride_dot,
                offs_n, offs_d, t_full, T, T, qk_scale, None, None, HEAD_DIM, BLOCK_M1, MASK_TAIL, DOT_PRECISION,
                False,
            )

    dk = dk * softmax_scale  # dK = scale dS^T Q
    _store_tile(DK + off_b * stride_dkb + off_hkv * stride_dkh, offs_n, stride_dkt, offs_d, T, dk, HEAD_DIM)
    _store_tile(DV + off_b * stride_dvb + off_hkv * stride_dvh, offs_n, stride_dvt, offs_d, T, dv, HEAD_DIM)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
    row_start, row_end,
    HEAD_DIM: tl.constexpr, BLOCK_N2: tl.constexpr, MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_DOCS: tl.constexpr,
):
    """Accumulate dQ of one query block over key blocks [lo, hi). MASK: MASK_NONE, MASK_CAUSAL
    (key <= query; with HAS_DOCS also the document mask), MASK_TAIL (key < T), MASK_DOCUMENT
    (HAS_DOCS: row_start <= key < row_end)."""
    offs_n0 = tl.arange(0, BLOCK_N2)
    for start_n in tl.range(lo, hi, BLOCK_N2, num_stages=1 if MASK != MASK_NONE else None):  # masked: a few steps
        offs_n = start_n + offs_n0
        k = _load_tile(k_base, offs_n, stride_kt, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        v = _load_tile(v_base, offs_n, stride_vt, offs_d, T, HEAD_DIM, MASK != MASK_NONE)
        s = _dot(q, tl.trans(k), None, DOT_PRECISION) * qk_scale  # log2 units
        p = tl.exp2(s - lse2[:, None])  # P = exp(S - lse)
        if MASK == MASK_CAUSAL:
            visible = offs_m[:, None] >= offs_n[None, :]
            if HAS_DOCS:
                visible = visible & (offs_n[None, :] >= row_start[:, None])
            p = tl.where(visible, p, 0.0)
        elif MASK == MASK_TAIL:
            p = tl.where(offs_n[None, :] < T, p, 0.0)
        elif MASK == MASK_DOCUMENT:
            visible = (offs_n[None, :] >= row_start[:, None]) & (offs_n[None, :] < row_end[:, None])
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), None, DOT_PRECISION)  # dP = dO V^T
        ds = p * (dp - delta[:, None])  # dS = P * (dP - delta)
        dq = _dot(ds.to(k.dtype), k, dq, DOT_PRECISION)  # dQ += dS K (scaled later)
    return dq


@triton.autotune(
    configs=_autotune_list(BWD_DQ_TUNED, BWD_DQ_INTERPRET_CONFIG),
    key=["T_BUCKET", "HEAD_DIM", "CAUSAL", "HAS_DOCS"],
    prune_configs_by={"early_config_prune": _prune(("BLOCK_M2", "BLOCK_N2"), BWD_DQ_TUNED)},
)
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DOC_START, DOC_END,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, T_BUCKET, qk_scale, softmax_scale,
    N_REP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HAS_DOCS: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
):
    tl.static_assert(BLOCK_M2 % BLOCK_N2 == 0, "BLOCK_N2 must divide BLOCK_M2 (causal diagonal split)")
    tl.static_assert(BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid_bh = tl.program_id(0)
    start_m = _query_block(CAUSAL) * BLOCK_M2
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hkv = off_h // N_REP
    k_base = K + off_b * stride_kb + off_hkv * stride_kh
    v_base = V + off_b * stride_vb + off_hkv * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M2)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, stride_qt, offs_d, T, HEAD_DIM, True)
    do = _load_tile(DO + off_b * stride_dob + off_h * stride_doh, offs_m, stride_dot, offs_d, T, HEAD_DIM, True)
    stats = pid_bh.to(tl.int64) * T
    lse2 = tl.load(LSE + stats + offs_m, mask=offs_m < T, other=0.0) * LOG2E
    delta = tl.load(DELTA + stats + offs_m, mask=offs_m < T, other=0.0)
    dq = tl.zeros([BLOCK_M2, BLOCK_D], tl.float32)

    # Keys [0, mid) unmasked, then [mid, hi) with the edge mask, as in the forward kernel.
    if HAS_DOCS:
        # Documents: the forward kernel's three key ranges (blocks sharing no document skipped).
        row_start, row_end = _doc_rows(DOC_START, DOC_END, off_b, offs_m, T)
        lo, mid1, mid2, hi = _doc_key_blocks(DOC_START, DOC_END, off_b, start_m, T, BLOCK_M2, BLOCK_N2, CAUSAL)
        EDGE_MASK: tl.constexpr = MASK_CAUSAL if CAUSAL else MASK_DOCUMENT
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, lo, mid1, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N2, MASK_DOCUMENT, DOT_PRECISION, True,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid1, mid2, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N2, MASK_NONE, DOT_PRECISION, True,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid2, hi, T, qk_scale,
            row_start, row_end, HEAD_DIM, BLOCK_N2, EDGE_MASK, DOT_PRECISION, True,
        )
    else:
        if CAUSAL:
            mid, hi = start_m, tl.minimum(start_m + BLOCK_M2, T)
        else:
            mid, hi = (T // BLOCK_N2) * BLOCK_N2, T
        EDGE_MASK: tl.constexpr = MASK_CAUSAL if CAUSAL else MASK_TAIL
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, 0, mid, T, qk_scale,
            None, None, HEAD_DIM, BLOCK_N2, MASK_NONE, DOT_PRECISION, False,
        )
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d, mid, hi, T, qk_scale,
            None, None, HEAD_DIM, BLOCK_N2, EDGE_MASK, DOT_PRECISION, False,
        )

    dq = dq * softmax_scale  # dQ = scale dS K
    _store_tile(DQ + off_b * stride_dqb + off_h * stride_dqh, offs_m, stride_dqt, offs_d, T, dq, HEAD_DIM)


# ----------------------------------------------------------------------------------------------
# Launchers: validate, allocate, launch
# ----------------------------------------------------------------------------------------------


def _empty_bhtd(b, h, t, d, dtype, device) -> torch.Tensor:
    """(B, H, T, D) view of (B, T, H, D) storage: the layout the model reshapes back to (B, T, C)."""
    return utils.empty((b, t, h, d), dtype, device).transpose(1, 2)


def _fwd_outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse), allocated: out (B, H, T, D) in q's dtype, laid out as _empty_bhtd; lse (B, H, T)
    fp32. The launcher, the CPU implementation and the fake implementation all allocate here, so
    their outputs' strides agree by construction."""
    b, h, t, d = q.shape
    return _empty_bhtd(b, h, t, d, q.dtype, q.device), utils.empty((b, h, t), torch.float32, q.device)


def _bwd_outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv), allocated like q, k, v but each laid out as _empty_bhtd."""
    return tuple(_empty_bhtd(*x.shape, x.dtype, x.device) for x in (q, k, v))


def _contiguous_bounds(doc_start, doc_end):
    """The kernels index the bounds as contiguous (B, T) rows (a slice of bounds may not be)."""
    return (None, None) if doc_start is None else (doc_start.contiguous(), doc_end.contiguous())


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, doc_start=None, doc_end=None) -> None:
    """Raise ValueError saying exactly what is unsupported."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"flash_attention: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"flash_attention: {name} must be 4-D (batch, heads, seq_len, head_dim), "
                f"got shape {tuple(x.shape)}"
            )
        if x.dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"flash_attention supports float16, bfloat16 and float32, got {name}.dtype={x.dtype}"
            )
        utils.check_device("flash_attention", name, x, "torch.nn.functional.scaled_dot_product_attention")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash_attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(
            f"flash_attention: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}"
        )
    if k.shape != v.shape:
        raise ValueError(
            f"flash_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    b, h, t, d = q.shape
    b_kv, h_kv, t_kv, d_kv = k.shape
    if b_kv != b:
        raise ValueError(f"flash_attention: batch size differs: q has {b}, k/v have {b_kv}")
    if d_kv != d:
        raise ValueError(f"flash_attention: head_dim differs: q has {d}, k/v have {d_kv}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"flash_attention supports head_dim 1..{MAX_HEAD_DIM} (32, 64, 128 unpadded), got {d}")
    if t > MAX_SEQ_LEN:
        raise ValueError(f"flash_attention supports seq_len up to {MAX_SEQ_LEN}, got {t}")
    if t_kv != t:
        raise ValueError(
            f"flash_attention needs equal query and key lengths, got q seq_len {t} and k/v seq_len {t_kv}; "
            f"use scaled_dot_product_attention for cached decoding (seq_len_q < seq_len_k)"
        )
    if h_kv == 0 or h % h_kv:
        raise ValueError(
            f"flash_attention: the number of k/v heads ({h_kv}) must divide the number of query heads ({h})"
        )
    _check_bounds(q, doc_start, doc_end)


def _check_bounds(q: torch.Tensor, doc_start, doc_end) -> None:
    """doc_start, doc_end: both None, or int32 (B, T) tensors on q's device."""
    b, _, t, _ = q.shape
    if (doc_start is None) != (doc_end is None):
        raise ValueError("flash_attention: give both document bounds (doc_start, doc_end) or neither")
    for name, bounds in (("doc_start", doc_start), ("doc_end", doc_end)):
        if bounds is not None and (bounds.shape != (b, t) or bounds.dtype != torch.int32 or bounds.device != q.device):
            raise ValueError(
                f"flash_attention: {name} must be int32 of shape (batch, seq_len) = {(b, t)} on {q.device} "
                f"(from document_bounds(document_ids)), got {bounds.dtype} {tuple(bounds.shape)} on {bounds.device}"
            )


DOCUMENT_ID_DTYPES = (torch.int32, torch.int64)


def _check_document_ids(document_ids, q: torch.Tensor | None = None) -> None:
    """document_ids: an int32/int64 (B, T) tensor (q's batch and seq_len, on q's device, when given)."""
    if not isinstance(document_ids, torch.Tensor):
        raise TypeError(
            f"flash_attention: document_ids must be a torch.Tensor, DocumentBounds or None, "
            f"got {type(document_ids).__name__}"
        )
    bt = None if q is None else (q.shape[0], q.shape[2])
    if document_ids.dim() != 2 or (bt is not None and document_ids.shape != bt):
        expected = "(batch, seq_len)" + ("" if bt is None else f" = {bt}")
        raise ValueError(f"flash_attention: document_ids must have shape {expected}, got {tuple(document_ids.shape)}")
    if document_ids.dtype not in DOCUMENT_ID_DTYPES:
        raise ValueError(f"flash_attention: document_ids must be int32 or int64, got {document_ids.dtype}")
    if q is not None and document_ids.device != q.device:
        raise ValueError(f"flash_attention: document_ids must be on q's device {q.device}, got {document_ids.device}")


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs: IEEE products unless PyTorch itself allows TF32 for matmuls; halves: native
    (the value is then ignored), except bf16 under the interpreter (see _dot)."""
    if dtype == torch.bfloat16 and utils.interpreting():
        return "interp-bf16"
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _grid(heads: int, t: int, block: int) -> tuple[int, int]:
    """A launch grid: (B * heads, sequence blocks of `block` rows). The heads go on axis 0 (up to
    2^31 - 1 programs), the blocks on axis 1, whose CUDA limit 65,535 MAX_SEQ_LEN keeps them under."""
    return heads, triton.cdiv(t, block)


def _strides(*tensors: torch.Tensor) -> list[int]:
    """Each (B, H, T, D) tensor's batch, head and row strides, in order: the kernels' stride_*
    arguments (the last dimension's stride is 1)."""
    return [stride for x in tensors for stride in x.stride()[:3]]


def _t_bucket(t: int) -> int:
    """The autotune key for the sequence length: its power-of-two ceiling (capped), so a new
    length does not retune unless the best tiles could change."""
    return min(triton.next_power_of_2(t), 16384)


def attention_fwd(q, k, v, causal: bool, softmax_scale: float | None, doc_start=None, doc_end=None):
    """Validate and launch the forward kernel. Returns (out, lse): out (B, H, T, D) in q's dtype,
    lse (B, H, T) fp32, the natural-log logsumexp of each row's scaled scores."""
    _check_inputs(q, k, v, doc_start, doc_end)
    q, k, v = utils.unit_last_stride(q), utils.unit_last_stride(k), utils.unit_last_stride(v)
    doc_start, doc_end = _contiguous_bounds(doc_start, doc_end)
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    scale = attention_scale(d, softmax_scale)
    out, lse = _fwd_outputs(q)
    if out.numel() == 0:
        return out, lse
    if scale < 0:  # scale Q K^T = |scale| (-Q) K^T exactly; the kernel's scores need a scale >= 0
        q, scale = -q, -scale

    with utils.launch_device(q):
        _attn_fwd_kernel[lambda meta: _grid(b * h, t, meta["BLOCK_M"])](
            q, k, v, out, lse, doc_start, doc_end, *_strides(q, k, v, out),
            h, t, _t_bucket(t), scale * LOG2E.value,  # qk_scale = scale * log2(e)
            N_REP=h // h_kv, HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=bool(causal),
            DOT_PRECISION=_dot_precision(q.dtype), HAS_DOCS=doc_start is not None,
        )
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, causal: bool, softmax_scale: float | None, doc_start=None, doc_end=None):
    """Launch the backward kernels (preprocess delta, dK/dV, dQ). Returns (dq, dk, dv) shaped and
    typed like q, k, v."""
    dout = utils.unit_last_stride(dout)
    q, k, v = utils.unit_last_stride(q), utils.unit_last_stride(k), utils.unit_last_stride(v)
    doc_start, doc_end = _contiguous_bounds(doc_start, doc_end)
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    scale = attention_scale(d, softmax_scale)
    qk_scale = scale * LOG2E.value  # log2(e): scores in log2 units
    block_d = _block_d(d)
    dq, dk, dv = _bwd_outputs(q, k, v)
    if dq.numel() == 0:
        return dq, dk, dv
    delta = utils.empty((b, h, t), torch.float32, q.device)
    statics = dict(
        N_REP=h // h_kv, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=bool(causal), DOT_PRECISION=_dot_precision(q.dtype),
        HAS_DOCS=doc_start is not None,
    )

    preprocess_block = 64 if block_d <= 128 else 32
    with utils.launch_device(q):
        _attn_bwd_preprocess_kernel[_grid(b * h, t, preprocess_block)](
            out, dout, delta, *_strides(out, dout),
            h, t,
            HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=preprocess_block,
        )
        _attn_bwd_dkdv_kernel[lambda meta: _grid(b * h_kv, t, meta["BLOCK_N1"])](
            q, k, v, dout, lse, delta, dk, dv, doc_start, doc_end, *_strides(q, k, v, dout, dk, dv),
            h, t, _t_bucket(t), qk_scale, scale,
            **statics,
        )
        _attn_bwd_dq_kernel[lambda meta: _grid(b * h, t, meta["BLOCK_M2"])](
            q, k, v, dout, lse, delta, dq, doc_start, doc_end, *_strides(q, k, v, dout, dq),
            h, t, _t_bucket(t), qk_scale, scale,
            **statics,
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Custom operators: torch.ops.gpt2_suite.flash_attention and .flash_attention_backward
# ----------------------------------------------------------------------------------------------


def _bounds_mask(doc_start, doc_end) -> torch.Tensor | None:
    """The dense mask of the document bounds, (B, 1, T, T) bool, True where key n is in query m's
    document (doc_start[m] <= n < doc_end[m]); None without documents."""
    if doc_start is None:
        return None
    keys = torch.arange(doc_start.shape[1], device=doc_start.device)
    return ((keys >= doc_start[:, :, None]) & (keys < doc_end[:, :, None]))[:, None]  # (B, 1, T, T)


def _attention_fwd_math(q, k, v, causal: bool, softmax_scale: float | None, doc_start=None, doc_end=None):
    """attention_fwd as the dense reference (gpt2_kernels/reference.py) computes it in fp32,
    materialising the scores: the op's CPU implementation without the interpreter. Same outputs,
    layout and dtypes as the kernel's."""
    out32, lse32 = attention_ref(q.float(), k.float(), v.float(), causal, softmax_scale, upcast=False,
                                 mask=_bounds_mask(doc_start, doc_end), return_lse=True)
    out, lse = _fwd_outputs(q)
    out.copy_(out32)
    lse.copy_(lse32)
    return out, lse


def _attention_bwd_math(dout, q, k, v, out, lse, causal: bool, softmax_scale: float | None, doc_start=None,
                        doc_end=None):
    """attention_bwd in plain PyTorch, fp32 inside, by the derivation in the module docstring, on
    the reference's scores."""
    b, h, t, d = q.shape
    h_kv = k.shape[1]
    n_rep = h // h_kv
    scale = attention_scale(d, softmax_scale)
    q32, do32 = q.float(), dout.float()
    k32, v32 = repeat_kv(k.float(), n_rep), repeat_kv(v.float(), n_rep)  # (B, H, T, D)
    s = attention_scores(q32, k32, causal, scale, mask=_bounds_mask(doc_start, doc_end))  # S = scale Q K^T
    p = torch.exp(s - lse[..., None])  # P = exp(S - lse)
    dp = do32 @ v32.transpose(-2, -1)  # dP = dO V^T
    delta = (do32 * out.float()).sum(-1, keepdim=True)  # delta = rowsum(dO * O)
    ds = p * (dp - delta)  # dS = P * (dP - delta)
    dq, dk, dv = _bwd_outputs(q, k, v)
    dq.copy_(scale * (ds @ k32))  # dQ = scale dS K
    # dK = scale dS^T Q, dV = P^T dO, summed over the n_rep query heads of each K/V head
    dk.copy_((scale * (ds.transpose(-2, -1) @ q32)).view(b, h_kv, n_rep, t, d).sum(2))
    dv.copy_((p.transpose(-2, -1) @ do32).view(b, h_kv, n_rep, t, d).sum(2))
    return dq, dk, dv


def _fwd_cpu(q, k, v, causal, softmax_scale, doc_start, doc_end):
    """On CPU: our kernels under the interpreter, else the same math in PyTorch."""
    fwd = attention_fwd if utils.interpreting() else _attention_fwd_math
    return fwd(q, k, v, causal, softmax_scale, doc_start, doc_end)


def _bwd_cpu(dout, q, k, v, out, lse, causal, softmax_scale, doc_start, doc_end):
    bwd = attention_bwd if utils.interpreting() else _attention_bwd_math
    return bwd(dout, q, k, v, out, lse, causal, softmax_scale, doc_start, doc_end)


def _fwd_fake(q, k, v, causal, softmax_scale, doc_start, doc_end):
    return _fwd_outputs(q)


def _bwd_fake(dout, q, k, v, out, lse, causal, softmax_scale, doc_start, doc_end):
    return _bwd_outputs(q, k, v)


def _setup_context(ctx, inputs, output):
    q, k, v, causal, softmax_scale, doc_start, doc_end = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, doc_start, doc_end)
    ctx.causal, ctx.softmax_scale = causal, softmax_scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, doc_start, doc_end = ctx.saved_tensors
    dq, dk, dv = utils.call_op(
        "flash_attention_backward", dout, q, k, v, out, lse, ctx.causal, ctx.softmax_scale, doc_start, doc_end
    )
    return dq, dk, dv, None, None, None, None  # no gradient for causal, softmax_scale, the bounds


def _kv_as_query_heads(q_shape, kv_shape) -> tuple[int, ...]:
    """K/V's shape with q's head count: FLOPs are those of every query head scoring its keys."""
    return (q_shape[0], q_shape[1], *kv_shape[2:])


def _fwd_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's formula for SDPA's forward (QK^T and PV, full T x T square)."""
    return flop_counter.sdpa_flop_count(
        q_shape, _kv_as_query_heads(q_shape, k_shape), _kv_as_query_heads(q_shape, v_shape)
    )


def _bwd_flop(dout_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """torch's formula for SDPA's backward (S recomputed, then dV, dP, dQ, dK: five matmuls)."""
    return flop_counter.sdpa_backward_flop_count(
        dout_shape, q_shape, _kv_as_query_heads(q_shape, k_shape), _kv_as_query_heads(q_shape, v_shape)
    )


utils.define_op(
    "flash_attention_backward",
    "(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float? softmax_scale,"
    " Tensor? doc_start, Tensor? doc_end) -> (Tensor, Tensor, Tensor)",
    cuda=attention_bwd, cpu=_bwd_cpu, fake=_bwd_fake, flop_formula=_bwd_flop,
)
utils.define_op(
    "flash_attention",
    "(Tensor q, Tensor k, Tensor v, bool causal, float? softmax_scale, Tensor? doc_start, Tensor? doc_end)"
    " -> (Tensor, Tensor)",
    cuda=attention_fwd, cpu=_fwd_cpu, fake=_fwd_fake,
    backward=_backward, setup_context=_setup_context, flop_formula=_fwd_flop,
)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


class DocumentBounds(NamedTuple):
    """Each token's document as positions [start, end) of its row: int32 (B, T) tensors, contiguous.
    Build with document_bounds(document_ids); pass as flash_attention's document_ids."""

    start: torch.Tensor
    end: torch.Tensor


def document_bounds(document_ids: torch.Tensor) -> DocumentBounds:
    """The document bounds flash_attention works from, for ids (B, T) non-decreasing along T: one
    small reduction and a device-to-host sync check the order (skipped where utils.host_checks()
    says no: while torch.compile traces or a CUDA graph is captured, where the order is the caller's
    to check), a few small ops find the bounds. Build them once per batch and pass them to every
    layer. A document is a run of equal ids."""
    _check_document_ids(document_ids)
    if utils.host_checks() and document_ids.shape[1] > 1:
        if bool((document_ids[:, 1:] < document_ids[:, :-1]).any()):
            raise ValueError("flash_attention: document_ids must be non-decreasing along the sequence in every row")
    b, t = document_ids.shape
    pos = torch.arange(t, dtype=torch.int32, device=document_ids.device).expand(b, t)
    starts_here = torch.ones(b, t, dtype=torch.bool, device=document_ids.device)
    starts_here[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    ends_here = torch.ones_like(starts_here)
    ends_here[:, :-1] = starts_here[:, 1:]
    doc_start = torch.where(starts_here, pos, 0).cummax(dim=1).values
    doc_end = torch.where(ends_here, pos + 1, t).flip(1).cummin(dim=1).values.flip(1)
    return DocumentBounds(doc_start.to(torch.int32).contiguous(), doc_end.to(torch.int32).contiguous())


def flash_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    document_ids: torch.Tensor | DocumentBounds | None = None,
) -> torch.Tensor:
    """softmax(q k^T * softmax_scale [+ causal mask] [+ document mask]) v without materialising
    the scores.

    q: (B, H, T, D); k, v: (B, H_kv, T, D) with H_kv dividing H; float16/bfloat16/float32;
    D <= 256; any T. softmax_scale defaults to 1/sqrt(D). document_ids: None, or an int32/int64
    (B, T) tensor on q's device, non-decreasing along T (checked, except under torch.compile):
    a query then attends only to keys of its own document (packed sequences); or the ids'
    document_bounds(document_ids), built once for all of a batch's layers (no recomputing, no
    sync per call). Differentiable in q, k and v. Runs torch.ops.gpt2_suite.flash_attention (its
    lse output stays internal; in plain eager mode without the dispatcher: utils.call_op). See the
    module docstring for the full contract.
    """
    _check_inputs(q, k, v)  # here, before the op: its CPU implementation would accept CPU tensors
    bounds = document_ids
    if document_ids is not None and not isinstance(document_ids, DocumentBounds):
        _check_document_ids(document_ids, q)
        bounds = document_bounds(document_ids)
    doc_start, doc_end = (None, None) if bounds is None else bounds
    _check_bounds(q, doc_start, doc_end)
    out, _ = utils.call_op(
        "flash_attention", q, k, v, bool(causal), None if softmax_scale is None else float(softmax_scale),
        doc_start, doc_end,
    )
    return out
