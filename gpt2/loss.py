"""Next-token cross-entropy fused with the LM head, chunked so the logits never exist at once.

For N tokens and a vocabulary V, the logits are N x V: for a 16k-token GPT-2 batch that is 3.3 GB
in fp32, and autograd would keep them alive until backward. Instead we compute them a chunk of
rows at a time (the matmul in the inputs' dtype, or autocast's; the softmax and loss in fp32), take
the loss, and immediately turn them into the two gradients backward will need (the trick of
Liger-Kernel's fused linear cross-entropy):

    logits = h W^T                      (n, V), one chunk
    nll_i  = lse_i - logits[i, y_i]      lse = logsumexp over the vocabulary
    d nll_i / d logits_i = softmax(logits_i) - onehot(y_i)     (zero for ignored rows)
    dh = dlogits W,  dW = dlogits^T h

So at most one chunk of fp32 logits is alive, plus dh (like h) and dW (fp32, like W). The
gradients are computed whenever autograd will need them and simply scaled in backward.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # a target that is not scored (PyTorch's and Hugging Face's convention)
# Rows per chunk so that one chunk of fp32 logits is at most 2**26 elements (256 MB).
_MAX_CHUNK_ELEMENTS = 2**26


def _chunk_nll(h, weight, targets, ignore_index, want_grad):
    """Per-row NLL (0 for ignored rows) for one chunk and, when asked, the gradient of their sum
    w.r.t. the chunk's logits."""
    logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # (n, V), fp32 or wider
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (n,)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    nll = (lse - target_logits) * valid
    if not want_grad:
        return nll, None
    dlogits = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits' memory
    dlogits[torch.arange(len(targets), device=h.device), safe_targets] -= 1.0
    dlogits *= valid[:, None]
    return nll, dlogits


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, want_grad):
        n_rows = h.shape[0]
        chunk = max(1, _MAX_CHUNK_ELEMENTS // weight.shape[0])
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        dh = torch.empty_like(h) if want_grad else None
        acc_dtype = torch.promote_types(weight.dtype, torch.float32)
        dweight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if want_grad else None
        for start in range(0, n_rows, chunk):
            h_c, t_c = h[start : start + chunk], targets[start : start + chunk]
            nll, dlogits = _chunk_nll(h_c, weight, t_c, ignore_index, want_grad)
            total += nll.sum()
            if want_grad:
                dh[start : start + chunk] = (dlogits.to(h.dtype) @ weight.to(h.dtype)).to(h.dtype)
                dweight += (dlogits.T.to(h.dtype) @ h_c).to(acc_dtype)
        # The mean is over targets that count; with none, 0/0 = nan, as F.cross_entropy gives.
        scale = 1.0 / (targets != ignore_index).sum().to(total.dtype) if reduction == "mean" else None
        # A new tensor, not the accumulator itself: returning the buffer that the loop added into in
        # place gave zero gradients under torch.compile in torch 2.11.
        loss = total * scale if scale is not None else total.clone()
        if want_grad:
            ctx.save_for_backward(dh, dweight.to(weight.dtype), scale if scale is not None else total.new_ones(()))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dweight, scale = ctx.saved_tensors
        factor = grad_loss * scale
        return dh * factor.to(dh.dtype), dweight * factor.to(dweight.dtype), None, None, None, None


def linear_cross_entropy(h, weight, targets, ignore_index: int = IGNORE_INDEX, reduction: str = "mean"):
    """Cross-entropy of softmax(h @ weight.T) against targets, with h (N, C), weight (V, C),
    targets (N,). reduction "mean" averages over targets != ignore_index; "sum" adds them up;
    "none" (evaluation only, no gradient) gives each target's NLL, 0 where ignored."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    want_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    if reduction == "none":
        if want_grad:
            raise ValueError("reduction='none' is for evaluation: call it under torch.no_grad()")
        chunk = max(1, _MAX_CHUNK_ELEMENTS // weight.shape[0])
        nll_dtype = torch.promote_types(h.dtype, torch.float32)
        return torch.cat([  # (no rows, e.g. a one-token window: an empty result, not an error)
            torch.empty(0, dtype=nll_dtype, device=h.device),
            *(_chunk_nll(h[i : i + chunk], weight, targets[i : i + chunk], ignore_index, False)[0]
              for i in range(0, h.shape[0], chunk)),
        ])
    return LinearCrossEntropyFunction.apply(h, weight, targets, ignore_index, reduction, want_grad)
