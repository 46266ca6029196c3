"""Our flash_attention against PyTorch's scaled_dot_product_attention, one backend at a time
(flash, efficient, cudnn, math, forced through torch.nn.attention.sdpa_kernel), and eager attention.

    python -m benchmarks.attention                 # full sweep on a CUDA GPU -> benchmarks/results/<device>/
    python -m benchmarks.attention --suite gpt2    # only GPT-2 shapes (H=12, D=64, 16k tokens per batch)
    python -m benchmarks.attention --suite documents --dtype bf16   # document masking: ours, Flex, SDPA's mask
    python -m benchmarks.attention --quick --output_dir /tmp/b   # tiny shapes, CPU interpreter (CI smoke)

FLOPs (stated in every summary): forward = 4 * B * H * T^2 * D (two matmuls of 2 * T^2 * D per
head), halved when causal since only the lower triangle is computed; backward = 2.5 x forward
(five matmuls to the forward's two); forward+backward = 3.5 x forward. Grouped-query attention
does the same work per query head, so H is the number of query heads.

Every provider's output and gradients are first compared with a float64 reference for every batch
element and every head: the relative error of each (batch element, head) slice of out, dq, dk and
dv, the worst of them recorded (its value in the check row, which tensor, batch element and head in
its note). A provider that disagrees is recorded as "mismatch" and not timed. The reference is
computed a slab of batch elements and K/V head groups at a time (REFERENCE_SCORES), so its memory
is that of at most one K/V head group's scores, as before, while its work is the whole point's:
about 3.5 x 4·B·H·T²·D float64 FLOPs, the causal mask saving none, plus some ten passes over the
B·H·T² float64 scores. At the sweep's 16k tokens that is 0.2 TFLOP and ~16 GB of traffic at GPT-2's
T=1024 (milliseconds) and 15 TFLOP and ~0.7 TB at the largest (H=32, D=128, T=16384): estimated at
about a second per point on an H100 (fp64 tensor cores, ~60 TFLOP/s), not yet measured. Its
float64 out and gradients are kept for all the providers: 4·B·H·T·D·8 bytes, 2 GiB at most here.

The documents suite (document-masked attention over packed rows, causal): every row packs
documents end to end, as pretraining does, with lengths drawn from a real corpus's (the built-in
corpus's training documents, builtin:pydocs, at CHARS_PER_TOKEN characters per token: 607
documents, mean 862 tokens, median 277, on Python 3.11; the --quick suite draws 1 to 12 tokens
uniformly) and one end-of-text token each, in an order and from a start inside the first document
set by a fixed seed. Ours takes the ids (document_ids), FlexAttention a document block mask
(compiled; it is the peer to beat), SDPA the dense (B, 1, T, T) boolean mask (its dispatcher picks
the backend; the flash backend takes no mask). Each provider's mask (ours: document_bounds, which
also checks the ids' order) is built once per point, outside the timed calls, as the model builds
it once per batch for all its layers; the build time is recorded as the "mask" mode. FLOPs count
only the visible pairs: 4·H·D·ΣL²/2 forward over the documents' lengths L (the causal
convention, T²/2 per row, with one document).

Eager attention and SDPA's math backend are skipped where they would materialise more than
MATERIALISED_SCORES_LIMIT scores; FlexAttention (torch.compile'd, causal block mask) is a peer at
causal points on CUDA. Out-of-memory, unsupported and skipped points are recorded as such, with a
note saying why.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from contextlib import nullcontext
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/attention.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import common
from gpt2.errors import ArgumentParser, InputError, bounded_int, exit_on_input_error

MODES = ("fwd", "bwd", "fwd+bwd")
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
SHAPE_FIELDS = ["suite", "B", "H", "H_kv", "T", "D", "causal", "documents"]
# One provider at one point: its rows are replaced together when it is measured again, so a
# re-run of one provider (say ours, after a change) keeps the others' rows.
POINT_FIELDS = ["kernel", "provider", "dtype", *SHAPE_FIELDS]
# Relative L2 error allowed before a provider counts as wrong: a few times what bf16/fp16
# rounding of the inputs and output alone gives (~2^-8 and ~2^-11 relative).
MISMATCH_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
TOKENS = 16384  # B * T, as in the FlashAttention papers
# The float64 reference takes a slab of (batch elements, K/V head groups) at a time, holding at most
# this many float64 scores (2 GiB; attention_ref keeps a few tensors that size for its backward),
# or one K/V head group's (group, T, T) scores where that alone is more: memory stays bounded
# however large B and H are, and small points take a few slabs rather than B x H_kv.
REFERENCE_SCORES = 2**28
# Eager attention and SDPA's math backend materialise the (T, T) scores of every head (the math
# backend in fp32 even for bf16/fp16 inputs) and keep about five tensors that size for the
# backward. Past 2^31 elements (8 GiB per fp32 copy; at 16k tokens: T > 2^17 / H, i.e. T=16384 at
# H=12 and T >= 8192 at H=32) one forward+backward moves some 100 GB and holds ~40 GiB (estimates),
# rising to seconds and out of memory at the sweep's largest points, and says nothing the fused
# backends don't: they are skipped there (status "skipped").
MATERIALISED_SCORES_LIMIT = 2**31
# The documents suite: the built-in corpus's document lengths in characters, over this, are its
# lengths in tokens (an 8k BPE gives 530k tokens for its 2.2 M characters: 4.15 per token).
CHARS_PER_TOKEN = 4
DOCUMENT_SEED = 0


def suites(quick: bool) -> dict[str, list[dict]]:
    """Named lists of shapes: dicts with B, H, H_kv, T, D."""
    if quick:
        return {"quick": [dict(B=1, H=2, H_kv=1, T=17, D=32), dict(B=2, H=2, H_kv=2, T=40, D=32)],
                "documents-quick": [dict(B=2, H=2, H_kv=2, T=40, D=32, documents="uniform-1-12")]}
    seqlens = [512, 1024, 2048, 4096, 8192, 16384]
    return {
        "gpt2": [dict(B=TOKENS // t, H=12, H_kv=12, T=t, D=64) for t in seqlens],
        "fa-d64": [dict(B=TOKENS // t, H=32, H_kv=32, T=t, D=64) for t in seqlens],  # hidden 2048
        "fa-d128": [dict(B=TOKENS // t, H=16, H_kv=16, T=t, D=128) for t in seqlens],  # hidden 2048
        "gqa": [dict(B=TOKENS // t, H=32, H_kv=8, T=t, D=128) for t in seqlens],
        # GPT-2's shapes with packed documents (causal only): to read beside the gpt2 suite's causal rows
        "documents": [dict(B=TOKENS // t, H=12, H_kv=12, T=t, D=64, documents="pydocs") for t in (1024, 4096, 8192)],
    }


@functools.cache
def document_lengths(name: str) -> tuple[int, ...]:
    """The document lengths in tokens that a documents suite packs: "pydocs", the built-in corpus's
    training documents (characters / CHARS_PER_TOKEN, at least 1), or "uniform-A-B"."""
    if name == "pydocs":
        from gpt2.data import _builtin_documents

        return tuple(max(1, len(d["text"]) // CHARS_PER_TOKEN) for d in _builtin_documents("train", "benchmark"))
    low, high = map(int, name.removeprefix("uniform-").split("-"))
    return tuple(range(low, high + 1))


def packed_document_ids(B: int, T: int, name: str, device, seed: int = DOCUMENT_SEED) -> torch.Tensor:
    """(B, T) int32 document ids of B packed rows, counted from 0 in each row: documents of
    document_lengths(name), each closed by one end-of-text token, in a seeded random order (every
    document once before any repeats), the stream starting at a random token of the first one."""
    generator = torch.Generator().manual_seed(seed)
    pool = torch.tensor(document_lengths(name)) + 1  # the end-of-text token closes each document
    lengths = pool[torch.randperm(len(pool), generator=generator)].tolist()
    offset = int(torch.randint(lengths[0], (1,), generator=generator))  # a token of the first document
    while sum(lengths) < offset + B * T:
        lengths += pool[torch.randperm(len(pool), generator=generator)].tolist()
    ends = torch.tensor(lengths).cumsum(0)
    documents = torch.searchsorted(ends, torch.arange(offset, offset + B * T), right=True).view(B, T)
    return (documents - documents[:, :1]).to(torch.int32).to(device)


def visible_pairs(shape: dict, causal: bool, document_ids=None) -> float:
    """The (query, key) pairs attention computes, by the FLOP convention: B·T²/2 causal, B·T²
    not; with documents ΣL²/2 over every row's documents."""
    if document_ids is None:
        return shape["B"] * shape["T"] ** 2 * (0.5 if causal else 1.0)
    _, lengths = torch.unique_consecutive(document_ids.long() + document_ids.shape[1] * torch.arange(
        document_ids.shape[0], device=document_ids.device)[:, None], return_counts=True)
    return float((lengths.double() ** 2).sum()) * (0.5 if causal else 1.0)


def providers(quick: bool) -> dict:
    """name -> (attention function (q, k, v, causal) -> out, context manager factory)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpt2_kernels import attention_ref, flash_attention

    def sdpa(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

    table = {"ours": (lambda q, k, v, causal: flash_attention(q, k, v, causal=causal), nullcontext)}
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    for name, backend in backends.items():
        if quick and name != "math":
            continue
        fn = scores_limited(sdpa) if name == "math" else sdpa
        table[f"sdpa-{name}"] = (fn, lambda backend=backend: sdpa_kernel(backend))
    eager = scores_limited(lambda q, k, v, causal: attention_ref(q, k, v, causal=causal, upcast=False))
    table["eager"] = (eager, nullcontext)
    table["flex"] = (flex_attention_provider(), nullcontext)
    return table


PROVIDER_ORDER = ["ours", "sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "sdpa-mask", "eager", "flex"]


def scores_limited(fn):
    """fn, refusing (as "skipped") inputs whose B·H·T² scores exceed MATERIALISED_SCORES_LIMIT."""

    def limited(q, k, v, causal):
        scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
        if scores > MATERIALISED_SCORES_LIMIT:
            raise common.NotMeasured("skipped", f"B·H·T² = {scores:,} materialised scores > "
                                     f"{MATERIALISED_SCORES_LIMIT:,} (MATERIALISED_SCORES_LIMIT): tens of GiB and "
                                     "up to seconds per repeat")
        return fn(q, k, v, causal)

    return limited


def flex_attention_provider():
    """FlexAttention (torch.nn.attention.flex_attention) under torch.compile with a causal block mask:
    a peer at causal points (skipped at the others), CUDA only (it has no backward on CPU, and is
    slow without compiling). The block mask is built once per sequence length, outside the timed
    call, as a model builds it once for all its layers. run() resets Dynamo before each point, so
    each point compiles once for its own shape (tens of seconds each, the first one most)."""
    unavailable = common.peer_unavailable("torch.nn.attention.flex_attention", "needs torch >= 2.5",
                                          "FlexAttention has no backward on CPU")
    if unavailable:
        return unavailable
    from torch._functorch import config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # The bwd mode replays one backward (retain_graph=True), which a compiled backward with donated
    # buffers refuses (torch 2.11): the buffers are kept instead.
    functorch_config.donated_buffer = False
    compiled = torch.compile(flex_attention, dynamic=False)

    @functools.lru_cache(maxsize=4)
    def causal_block_mask(T, device):
        return create_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, T, T, device=device)

    def flex(q, k, v, causal):
        if not causal:
            raise common.NotMeasured("skipped", "a causal-attention peer: measured at causal points only")
        return compiled(q, k, v, block_mask=causal_block_mask(q.shape[2], str(q.device)),
                        enable_gqa=q.shape[1] != k.shape[1])

    return flex


def document_providers(document_ids: torch.Tensor) -> tuple[dict, dict]:
    """The documents suite's providers for one point's ids (B, T), as providers() gives them, and
    {name: (function building that provider's mask, what it times)} for those that take one. Each
    provider builds its mask on its first call (the unmeasured check), so a failure there is that
    provider's recorded failure, and keeps it for the timed calls."""
    from gpt2.documents import document_mask
    from gpt2_kernels import attention_ref, document_bounds, flash_attention

    def build_dense():
        return document_mask(document_ids, causal=True)  # (B, 1, T, T) bool, True = visible

    def build_bounds():
        return document_bounds(document_ids)

    dense, bounds = functools.cache(build_dense), functools.cache(build_bounds)

    def ours(q, k, v, causal):
        return flash_attention(q, k, v, causal=causal, document_ids=bounds())

    def sdpa_mask(q, k, v, causal):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense(), enable_gqa=q.shape[1] != k.shape[1])

    eager = scores_limited(lambda q, k, v, causal: attention_ref(q, k, v, causal=causal, upcast=False,
                                                                 document_ids=document_ids))
    flex, build_block_mask = flex_document_provider(document_ids)
    table = {"ours": (ours, nullcontext), "sdpa-mask": (sdpa_mask, nullcontext), "eager": (eager, nullcontext),
             "flex": (flex, nullcontext)}
    builders = {"ours": (build_bounds, "document_bounds, its order check's sync included"),
                "sdpa-mask": (build_dense, "the dense (B, 1, T, T) bool mask")}
    if build_block_mask:
        builders["flex"] = (build_block_mask, "torch.compile(create_block_mask), after its first call")
    return table, builders


def document_mask_mod(document_ids: torch.Tensor):
    """FlexAttention's mask_mod for causal attention within each document of ids (B, T)."""

    def same_document_causal(b, h, q_idx, kv_idx):
        return (document_ids[b, q_idx] == document_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return same_document_causal


def flex_document_provider(document_ids: torch.Tensor):
    """FlexAttention with a document block mask over these ids (causal within each document),
    compiled as flex_attention_provider's: (function, a compiled block mask builder, or None).
    The function's block mask is built on its first call by the plain create_block_mask (what
    always works); the builder, timed as Flex's "mask" mode, is the compiled one FlexAttention
    recommends for long sequences."""
    unavailable = common.peer_unavailable("torch.nn.attention.flex_attention", "needs torch >= 2.5",
                                          "FlexAttention has no backward on CPU")
    if unavailable:
        return unavailable, None
    from torch._functorch import config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, T = document_ids.shape
    mask_mod, device = document_mask_mod(document_ids), str(document_ids.device)
    block_mask = functools.cache(lambda: create_block_mask(mask_mod, B, None, T, T, device=device))
    functorch_config.donated_buffer = False  # as in flex_attention_provider
    compiled = torch.compile(flex_attention, dynamic=False)
    compiled_create = torch.compile(create_block_mask)

    def flex(q, k, v, causal):
        return compiled(q, k, v, block_mask=block_mask(), enable_gqa=q.shape[1] != k.shape[1])

    return flex, lambda: compiled_create(mask_mod, B, None, T, T, device=device)


def matmul_tflops() -> float:
    """TFLOP/s of an 8192^3 bf16 matrix product through torch on random data: the device's
    practical ceiling for the matrix units, measured in the same run."""
    a, b = (torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    p50, _, _ = common.measure(lambda: a @ b, quick=False)
    return 2 * 8192**3 / p50 / 1e9


def attention_flops(shape: dict, mode: str, pairs: float) -> float:
    """FLOPs of one call in `mode` over `pairs` visible (query, key) pairs (visible_pairs)."""
    return 4 * shape["H"] * shape["D"] * pairs * FLOP_FACTOR[mode]


def make_inputs(shape, dtype, device):
    B, H, H_kv, T, D = (shape[k] for k in ("B", "H", "H_kv", "T", "D"))
    q = torch.randn(B, H, T, D, dtype=dtype, device=device, requires_grad=True)
    k = torch.randn(B, H_kv, T, D, dtype=dtype, device=device, requires_grad=True)
    v = torch.randn(B, H_kv, T, D, dtype=dtype, device=device, requires_grad=True)
    dout = torch.randn(B, H, T, D, dtype=dtype, device=device)
    return q, k, v, dout


def reference_slabs(B: int, H_kv: int, group_scores: int) -> list[tuple[slice, slice]]:
    """(batch elements, K/V heads) slices that cover every batch element and K/V head once, each
    holding at most REFERENCE_SCORES scores (group_scores per K/V head group), or one group."""
    groups = max(1, REFERENCE_SCORES // group_scores)  # K/V head groups per slab
    if groups >= H_kv:  # whole batch elements fit
        per = groups // H_kv
        return [(slice(b, min(b + per, B)), slice(0, H_kv)) for b in range(0, B, per)]
    return [(slice(b, b + 1), slice(g, min(g + groups, H_kv))) for b in range(B) for g in range(0, H_kv, groups)]


def reference(q, k, v, dout, causal, document_ids=None) -> list[torch.Tensor]:
    """float64 out, dq, dk, dv for every batch element and head, computed a slab at a time (see
    reference_slabs; the cost is in the module docstring); with document_ids (B, T), masked to
    each document (the dense mask)."""
    from gpt2_kernels import attention_ref

    B, H, T, _ = q.shape
    group = H // k.shape[1]
    full = [torch.empty(x.shape, dtype=torch.float64, device=x.device) for x in (q, q, k, v)]  # out, dq, dk, dv
    for batch, kv_heads in reference_slabs(B, k.shape[1], group * T * T):
        heads = slice(kv_heads.start * group, kv_heads.stop * group)  # their query heads
        qs, ks, vs = (x[batch, h].detach().double().requires_grad_() for x, h in ((q, heads), (k, kv_heads),
                                                                                   (v, kv_heads)))
        docs = None if document_ids is None else document_ids[batch]
        out = attention_ref(qs, ks, vs, causal=causal, upcast=True, document_ids=docs)
        out.backward(dout[batch, heads].double())
        for dest, part, h in zip(full, (out.detach(), qs.grad, ks.grad, vs.grad), (heads, heads, kv_heads, kv_heads)):
            dest[batch, h] = part
    return full


def check(fn, ctx, q, k, v, dout, causal, ref) -> tuple[float, str]:
    """The largest relative error of out, dq, dk, dv against the float64 reference, over every
    (batch element, head) slice of each, and which one it is."""
    q.grad = k.grad = v.grad = None
    with ctx():
        out = fn(q, k, v, causal)
    out.backward(dout)
    got = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    q.grad = k.grad = v.grad = None
    worst = [(*common.worst_relative_error(g, r, lead=2), name) for (name, g), r in zip(got.items(), ref)]
    err, (b, h), name = max(worst, key=lambda w: w[0])
    return err, f"worst: {name} at batch {b}, {'K/V head' if name in ('dk', 'dv') else 'head'} {h}"


def time_modes(fn, ctx, q, k, v, dout, causal, quick):
    """{mode: (p50, p20, p80 ms, peak MB)}."""

    def fwd():
        with torch.no_grad(), ctx():
            fn(q, k, v, causal)

    with ctx():
        out = fn(q, k, v, causal)

    def bwd():
        out.backward(dout, retain_graph=True)

    def fwd_bwd():
        with ctx():
            fn(q, k, v, causal).backward(dout)

    results = {}
    for mode, run in (("fwd", fwd), ("bwd", bwd), ("fwd+bwd", fwd_bwd)):
        p50, p20, p80 = common.measure(run, quick, grad_to_none=[q, k, v])
        q.grad = k.grad = v.grad = None
        results[mode] = (p50, p20, p80, common.peak_memory_mb(run))
        q.grad = k.grad = v.grad = None
    return results


def documents_note(shape: dict, document_ids, pairs: float) -> str | None:
    """What a documents point's rows hold: documents per row, visible pairs against causal."""
    if document_ids is None:
        return None
    per_row = float((document_ids[:, -1].double() + 1).mean())
    return f"{per_row:.1f} per row, {pairs / visible_pairs(shape, True):.1%} of causal's pairs ({shape['documents']})"


def run_point(suite, shape, dtype_name, causal, table, env, quick, device, document_ids=None, mask_builders=None):
    """Every provider's rows at one point: checked against float64, then timed. document_ids
    (the documents suites): the ids every provider of the table was built for, and
    mask_builders {provider: function} each timed as that provider's "mask" mode."""
    dtype = common.DTYPES[dtype_name]
    base = dict(benchmark="attention", kernel="flash_attention", dtype=dtype_name, suite=suite,
                causal=int(causal), **shape, **env)
    pairs = visible_pairs(shape, causal, document_ids)
    note = documents_note(shape, document_ids, pairs)
    try:
        q, k, v, dout = make_inputs(shape, dtype, device)
        ref = reference(q, k, v, dout, causal, document_ids)
    except RuntimeError as err:
        status = "oom" if common.is_oom(err) else "error"
        return [dict(base, provider="reference", mode="check", metric="status", status=status, note=str(err)[:200])]
    rows = [dict(base, provider="reference", mode="check", metric="status", status="ok", note=note)]
    for name, (fn, ctx) in table.items():
        row = dict(base, provider=name)
        try:
            err, worst = check(fn, ctx, q, k, v, dout, causal, ref)
        except common.NotMeasured as e:
            rows += common.untimed(row, MODES, e.status, e.note)
            continue
        except RuntimeError as e:
            status = "oom" if common.is_oom(e) else "unsupported"
            rows += common.untimed(row, MODES, status, str(e).split("\n")[0][:200])
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            continue
        ok = math.isfinite(err) and err <= MISMATCH_TOL[dtype]
        rows.append(dict(row, mode="check", metric="rel_err", unit="", p50=err, status="ok" if ok else "mismatch",
                         note=worst))
        if not ok:
            rows += common.untimed(row, MODES, "mismatch", f"rel_err {err:.3g} > {MISMATCH_TOL[dtype]:g}, {worst}")
            continue
        try:
            timed = time_modes(fn, ctx, q, k, v, dout, causal, quick)
        except RuntimeError as e:
            status = "oom" if common.is_oom(e) else "error"
            rows += common.untimed(row, MODES, status, str(e)[:200])
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            continue
        for mode, (p50, p20, p80, peak) in timed.items():
            flops = attention_flops(shape, mode, pairs)
            rows.append(dict(row, mode=mode, metric="time", unit="ms", p50=p50, p20=p20, p80=p80, status="ok"))
            rows.append(dict(row, mode=mode, metric="throughput", unit="TFLOP/s", status="ok",
                             p50=flops / p50 / 1e9, p20=flops / p80 / 1e9, p80=flops / p20 / 1e9))
            rows.append(dict(row, mode=mode, metric="peak_memory", unit="MB", p50=peak, status="ok"))
        if name in (mask_builders or {}):
            build, what = mask_builders[name]
            try:
                build()  # a compiled builder compiles here, outside the timing
                p50, p20, p80 = common.measure(build, quick)
                rows.append(dict(row, mode="mask", metric="time", unit="ms", p50=p50, p20=p20, p80=p80, status="ok",
                                 note=f"building the mask once per batch (not in the timed calls): {what}"))
            except RuntimeError as e:
                status = "oom" if common.is_oom(e) else "error"
                rows += common.untimed(row, ["mask"], status, f"{what}: {(str(e).splitlines() or [''])[0][:200]}")
    return rows


def summarize(rows, out_dir) -> str:
    """Markdown: per suite/dtype/causal/mode, TFLOP/s per provider and our speedup over the best SDPA."""
    present = dict.fromkeys(r["provider"] for r in rows if r["kernel"] == "flash_attention"
                            and r["provider"] != "reference" and not r.get("documents"))
    ceiling = next((r["p50"] for r in rows if r["kernel"] == "matmul"), None)
    names = [n for n in PROVIDER_ORDER if n in present] + [n for n in present if n not in PROVIDER_ORDER]
    sdpa_names = [n for n in names if n.startswith("sdpa-")]
    device = rows[0]["device"] if rows else "no rows"
    lines = [
        f"# Attention benchmark — {device}",
        "",
        common.stamp(rows),
        "Command: `python -m benchmarks.attention`. Median TFLOP/s of triton.testing.do_bench; FLOPs = "
        "4·B·H·T²·D forward, halved when causal; backward 2.5×, forward+backward 3.5×. "
        "speedup = best SDPA backend's median time / ours. oom / unsupported / skipped / mismatch: not timed "
        "(the CSV's note says why).",
        f"Measured bf16 matrix product (8192³, torch): {common.fmt(ceiling)} TFLOP/s.",
        "",
    ]
    keys = sorted({(r["suite"], r["dtype"], r["causal"], r["mode"]) for r in rows
                   if r["metric"] == "time" and not r.get("documents") and r["mode"] in MODES},
                  key=lambda key: (key[0], key[1], -key[2], MODES.index(key[3])))
    for suite, dtype, causal, mode in keys:
        key = (suite, dtype, causal, mode)
        point_rows = [r for r in rows if (r["suite"], r["dtype"], r["causal"], r["mode"]) == key]
        shapes = sorted({(r["T"], r["B"], r["H"], r["H_kv"], r["D"]) for r in point_rows})
        lines.append(f"## {suite}, {dtype}, {'causal' if causal else 'non-causal'}, {mode} (TFLOP/s)")
        lines.append("")
        body = []
        for T, B, H, H_kv, D in shapes:
            cell, times = [], {}
            for name in names:
                match = [r for r in point_rows if r["provider"] == name and r["T"] == T and r["B"] == B
                         and r["H_kv"] == H_kv and r["D"] == D]
                tput = next((r for r in match if r["metric"] == "throughput"), None)
                t = next((r for r in match if r["metric"] == "time"), None)
                cell.append(tput["p50"] if tput else (t["status"] if t else "—"))
                if t and t["status"] == "ok":
                    times[name] = t["p50"]
            best = min((times[n] for n in sdpa_names if n in times), default=None)
            speedup = best / times["ours"] if best and "ours" in times else None
            body.append([f"B={B} H={H}/{H_kv} T={T} D={D}", *cell, speedup])
        lines.append(common.markdown_table(["shape", *names, "speedup"], body))
        lines.append("")
        if mode in ("fwd", "fwd+bwd") and (causal or suite == "quick"):
            series = {n: [(r["T"], r["p50"]) for r in point_rows if r["provider"] == n and r["metric"] == "throughput"]
                      for n in names}
            png = f"attention_{suite}_{dtype}_{'causal' if causal else 'full'}_{mode.replace('+', '_')}.png"
            title = f"attention {suite} {dtype} {'causal' if causal else ''} {mode} — {device}"
            if common.plot_lines(series, title, "sequence length T", "TFLOP/s", out_dir / png):
                lines += [f"![{suite} {dtype} {mode}]({png})", ""]
    lines += summarize_documents(rows)
    return "\n".join(lines) + "\n"


DOCUMENT_PROVIDERS = ["ours", "flex", "sdpa-mask", "eager"]


def summarize_documents(rows) -> list[str]:
    """Markdown lines for the documents suites: median ms per provider, ours against each peer and
    against our plain causal attention at the same shape (from the other suites' rows, when the
    run measured it), and the masks' build times."""
    lines = []
    point_rows = [r for r in rows if r.get("documents") and r["kernel"] == "flash_attention"]

    def find(provider, metric, mode, r0, **where):
        return next((r for r in rows if r["provider"] == provider and r["metric"] == metric and r["mode"] == mode
                     and all(r[f] == r0[f] for f in ("B", "H", "H_kv", "T", "D", "dtype"))
                     and all(r.get(f) == v for f, v in where.items())), None)

    def ms(r):
        return r["p50"] if r and r["status"] == "ok" else (r["status"] if r else "—")

    for suite, dtype in sorted({(r["suite"], r["dtype"]) for r in point_rows}):
        here = [r for r in point_rows if (r["suite"], r["dtype"]) == (suite, dtype)]
        shapes = sorted({r["T"] for r in here})
        names = [n for n in DOCUMENT_PROVIDERS if any(r["provider"] == n for r in here)]
        peers = [n for n in names if n != "ours"]
        masked = [n for n in names if any(r["provider"] == n and r["mode"] == "mask" for r in here)]
        for mode in (*MODES, "mask"):
            body = []
            for T in shapes:
                r0 = next(r for r in here if r["T"] == T)
                docs = find("reference", "status", "check", r0, suite=suite)
                cells = {n: find(n, "time", mode, r0, suite=suite) for n in names}
                if mode == "mask":
                    if any(cells.values()):
                        body.append([f"B={r0['B']} T={T}", *(ms(cells[n]) for n in masked)])
                    continue
                causal = find("ours", "time", mode, r0, causal=1, documents=None)
                tput = find("ours", "throughput", mode, r0, suite=suite)
                ours = cells.get("ours")

                def ratio(other, ours=ours):
                    ok = ours and other and ours["status"] == other["status"] == "ok"
                    return other["p50"] / ours["p50"] if ok else None

                body.append([f"B={r0['B']} H={r0['H']}/{r0['H_kv']} T={T} D={r0['D']}",
                             (docs or {}).get("note") or "—", *(ms(cells[n]) for n in names),
                             ms(causal), tput["p50"] if tput else "—", *(ratio(cells[n]) for n in peers),
                             ratio(causal)])
            if not body:
                continue
            if mode == "mask":
                lines += [f"## {suite}, {dtype}: building the masks (ms, once per batch; not in the times above)", "",
                          common.markdown_table(["shape", *masked], body), ""]
                continue
            lines += [f"## {suite}, {dtype}, causal within documents, {mode} (median ms)", "",
                      "`ours causal`: our attention at the same shape without document ids (the plain causal "
                      "suite's row, where this run measured it). `× name`: name's time / ours. TFLOP/s counts "
                      "the visible pairs only. documents: per row, and the visible pairs against causal "
                      "attention's.", "",
                      common.markdown_table(["shape", "documents", *names, "ours causal", "ours TFLOP/s",
                                             *(f"× {n}" for n in peers), "× ours causal"], body), ""]
    return lines


def progress(point_rows) -> str:
    """One line per point for the log: fwd+bwd TFLOP/s per provider, or why it has none."""
    parts = []
    for r in point_rows:
        if r["metric"] == "throughput" and r["mode"] == "fwd+bwd":
            parts.append(f"{r['provider']} {r['p50']:.1f}")
        elif r["status"] not in ("ok", None) and r["mode"] in ("fwd+bwd", "check"):
            parts.append(f"{r['provider']} {r['status']}")
    return "fwd+bwd TFLOP/s: " + ", ".join(parts)


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.attention"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--suite", nargs="*", choices=[*suites(quick=False), *suites(quick=True)],
                        help="subset of suites (quick is --quick's only one)")
    parser.add_argument("--dtype", nargs="*", default=None, choices=list(common.DTYPES))
    parser.add_argument("--causal", choices=["both", "causal", "full"], default="both")
    parser.add_argument("--provider", nargs="*", choices=PROVIDER_ORDER, help="subset of providers (ours always runs)")
    parser.add_argument("--max_seqlen", type=bounded_int(1), default=None)
    parser.add_argument("--seqlens", type=bounded_int(1), nargs="*", help="only these sequence lengths")
    parser.add_argument("--output_dir", type=common.writable_dir, default=None,
                        help="default: benchmarks/results/<device>/")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: rewrite attention.md and the plots from --output_dir's CSV")
    return parser.parse_args(argv)


def selected_shapes(args) -> list[tuple[str, dict]]:
    """(suite, shape) for every shape that --suite, --seqlens and --max_seqlen let through."""
    table = suites(args.quick)

    def wanted(suite, T):
        return ((not args.suite or suite in args.suite) and (not args.max_seqlen or T <= args.max_seqlen)
                and (not args.seqlens or T in args.seqlens))

    chosen = [(suite, shape) for suite, shapes in table.items() for shape in shapes if wanted(suite, shape["T"])
              and not (args.causal == "full" and shape.get("documents"))]  # documents: causal only
    if not chosen:
        listed = "; ".join(f"{suite}: T = {', '.join(str(s['T']) for s in shapes)}" for suite, shapes in table.items())
        raise InputError(f"--suite, --seqlens, --max_seqlen and --causal leave no shape to measure "
                         f"({'--quick' if args.quick else 'full'} suites: {listed}; documents suites: causal only)")
    return chosen


def run(args) -> int:
    if args.replot:
        return common.replot(args.output_dir, "attention", SHAPE_FIELDS, summarize)
    shapes = selected_shapes(args)
    env, out_dir = common.start_run(args.quick, args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    csv_path = out_dir / "attention.csv"

    def wanted(name):
        return not args.provider or name in args.provider or name == "ours"

    table = {k: v for k, v in providers(args.quick).items() if wanted(k)}
    dtypes = args.dtype or (["fp32"] if args.quick else ["bf16", "fp16"])
    causals = {"both": [True, False], "causal": [True], "full": [False]}[args.causal]
    rows = common.read_csv(csv_path, SHAPE_FIELDS)
    if not args.quick:
        ceiling = dict(benchmark="attention", kernel="matmul", provider="torch", mode="fwd", dtype="bf16",
                       metric="throughput", unit="TFLOP/s", p50=matmul_tflops(), status="ok", **env)
        rows = common.save_rows([ceiling], csv_path, SHAPE_FIELDS, POINT_FIELDS)
    for suite, shape in shapes:
        documents = shape.get("documents")
        for dtype_name in dtypes:
            for causal in [c for c in causals if c or not documents]:  # documents: causal only
                # A fresh torch.compile (FlexAttention's) per point: one compiled function across every
                # shape and dtype would pass Dynamo's recompile limit and silently fall back to eager.
                torch._dynamo.reset()
                ids, point_table, builders = None, table, None
                if documents:
                    ids = packed_document_ids(shape["B"], shape["T"], documents, device)
                    point_table, builders = document_providers(ids)
                    point_table = {k: v for k, v in point_table.items() if wanted(k)}
                point = run_point(suite, shape, dtype_name, causal, point_table, env, args.quick, device, ids, builders)
                rows = common.save_rows(point, csv_path, SHAPE_FIELDS, POINT_FIELDS)
                print(f"{suite} {shape} {dtype_name} causal={causal}: " + progress(point), file=sys.stderr)
    print(common.write_summary("attention", rows, out_dir, summarize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
