"""The dense references: attention and LayerNorm as their textbook formulas, in plain PyTorch.

One home for the math our kernels must reproduce, so that everything that needs it computes it the
same way:

* the tests and benchmarks measure the kernels against ``attention_ref(..., upcast=True)`` and
  ``layer_norm_ref(...)`` in float64, and against ``upcast=False`` for the error eager PyTorch makes
  in the inputs' own precision;
* the attention custom op's CPU implementation without the interpreter (gpt2_kernels/attention.py)
  is ``attention_ref`` on fp32 inputs, its backward recomputes the scores with ``attention_scores``;
* the model's ``eager`` attention (gpt2/registry.py) is ``attention_ref`` in the inputs' precision,
  with attention dropout and the KV cache's alignment.

Depends on torch only: no triton, so that gpt2's eager attention runs where Triton can't be
installed (there ``import gpt2_kernels`` loads this module alone).

Attention
---------
``attention_ref(q, k, v, causal, softmax_scale, upcast, document_ids, mask=, dropout_p=, return_lse=)``

    S   = softmax_scale * Q K^T      (softmax_scale defaults to 1/sqrt(D): attention_scale)
    P   = softmax(S)  with S[i, j] = -inf where key j is hidden from query i
    out = P V

* q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with H_kv dividing H: query head h reads K/V head
  h // (H / H_kv) (grouped-query attention; here K and V are repeated in memory).
* causal: query i is position Tk - Tq + i, so it sees keys j <= Tk - Tq + i (bottom-right
  alignment: with a KV cache the queries are the last Tq of the Tk positions; for Tq = Tk the
  usual lower triangle).
* document_ids (B, T): a query sees only keys of its own id (any order of ids). mask: a bool tensor
  broadcastable to (B, H, Tq, Tk), True where visible (gpt2's prepared document mask). Masks
  combine: a key must pass all of them; every query must keep at least one key.
* The softmax runs in at least fp32 (so half-precision scores don't lose the small
  probabilities); scores, probabilities and P V are otherwise in the compute dtype: float64 with
  upcast=True (the ground truth, returned as float64), the inputs' dtype with upcast=False.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def attention_scale(head_dim: int, softmax_scale: float | None = None) -> float:
    """The factor on Q K^T: softmax_scale, or 1/sqrt(head_dim) when it is None (the transformer's)."""
    return softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)


def causal_mask(t_q: int, t_k: int, device) -> torch.Tensor:
    """(Tq, Tk) bool, True where query i (at position Tk - Tq + i) may attend to key j."""
    offset = t_k - t_q
    rows = torch.arange(t_q, device=device)[:, None]
    cols = torch.arange(t_k, device=device)[None, :]
    return cols <= rows + offset


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """K or V (B, H_kv, T, D) with each head repeated n_rep times: (B, H_kv * n_rep, T, D)."""
    return x.repeat_interleave(n_rep, dim=1) if n_rep > 1 else x


def attention_scores(q, k, causal: bool, softmax_scale: float | None = None, document_ids=None, mask=None):
    """S = softmax_scale Q K^T (B, H, Tq, Tk) in q's dtype, -inf where a key is hidden from a query
    (the module docstring's masks); K (B, H_kv, Tk, D) is repeated to q's heads."""
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scores = (q @ k.transpose(-2, -1)) * attention_scale(q.shape[-1], softmax_scale)  # (B, H, Tq, Tk)
    if causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    if document_ids is not None:
        same_doc = document_ids[:, :, None] == document_ids[:, None, :]  # (B, T, T)
        scores = scores.masked_fill(~same_doc[:, None], float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores


def attention_ref(
    q, k, v, causal: bool = True, softmax_scale: float | None = None, upcast: bool = True, document_ids=None,
    *, mask=None, dropout_p: float = 0.0, return_lse: bool = False,
):
    """Plain PyTorch attention, materialising the scores: softmax(q k^T * scale + masks) v, as the
    module docstring states it (GQA, bottom-right causal, document ids and/or a bool mask).

    upcast=True computes in float64 and returns float64: the ground truth for tests.
    upcast=False computes in the inputs' dtype, step by step as eager PyTorch would (scores and
    P V in that dtype, the softmax in fp32 rounded back to it): the "same-precision PyTorch" error
    baseline, and the model's eager attention.
    dropout_p > 0 drops probabilities (F.dropout, after the softmax) as attention dropout does.
    return_lse: also return each row's natural-log logsumexp of its scaled scores (B, H, Tq), in
    the softmax's dtype: (out, lse).
    """
    dtype = torch.float64 if upcast else q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scores = attention_scores(q, k, causal, softmax_scale, document_ids, mask)
    scores = scores.to(torch.promote_types(dtype, torch.float32))  # the softmax in fp32 or wider
    probs = torch.softmax(scores, dim=-1).to(dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    out = probs @ repeat_kv(v, q.shape[1] // v.shape[1])  # (B, H, Tq, D)
    return (out, torch.logsumexp(scores, dim=-1)) if return_lse else out


def layer_norm_ref(x, weight, bias, eps: float = 1e-5, residual=None, upcast: bool = True):
    """Plain PyTorch LayerNorm with the same contract as layer_norm / add_layer_norm.

    Returns y, or (y, z) with z = x + residual when a residual is given.
    upcast=True computes everything, the residual add included, in float64 and returns float64:
    the exact math, for tests. upcast=False computes as eager PyTorch would in the inputs' own
    precision (z = x + residual in the promoted dtype, F.layer_norm in that dtype with weight and
    bias cast to it): the same-precision error baseline.
    """
    if upcast:
        x = x.double()
        residual = residual.double() if residual is not None else None
    z = x + residual if residual is not None else x
    w = weight.to(z.dtype)
    b = bias.to(z.dtype) if bias is not None else None
    y = F.layer_norm(z, (z.shape[-1],), w, b, eps)
    return (y, z) if residual is not None else y
