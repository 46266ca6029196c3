"""The attention and LayerNorm implementations the model can run, looked up by name.

Attention implementations take q (B, H, Tq, D) and k, v (B, H_kv, Tk, D) with H_kv dividing H
and Tq <= Tk, and return (B, H, Tq, D). When causal, the queries are the last Tq positions of
the Tk keys (bottom-right alignment), which is what a KV cache needs. For packed documents they
take `documents`, what gpt2.documents.prepare_documents built from the ids once per forward for
every layer (the dense mask for eager and sdpa, our kernel's document bounds for triton).

LayerNorm implementations come in pairs: `norm(x, weight, bias, eps)` and
`add_norm(x, residual, weight, bias, eps) -> (normed, x + residual)`.

gpt2_kernels is imported on the first call that needs it, not with this module, so `import gpt2`
imports no Triton and a program can still choose Triton's mode after it (the interpreter,
TRITON_INTERPRET=1, for CPU tensors). Where Triton is installed that first call imports it (the
package registers its ops); "eager" is the dense reference of gpt2_kernels/reference.py, which needs
torch only, so the model runs where Triton can't be installed.
The config field names the implementation; modules look it up on every call, so switching an
existing model's kernels is a change of config, not a rebuild.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gpt2.errors import InputError


def _check_documents(q, k, documents, causal) -> None:
    """eager and sdpa take prepare_documents' dense mask, built causal."""
    if q.shape[2] != k.shape[2]:
        raise InputError("document masking covers whole sequences; cached decoding (fewer queries than keys) "
                         "takes none")
    if not causal:
        raise InputError("documents (prepare_documents) hold a causal mask; non-causal attention takes none")
    if not (isinstance(documents, torch.Tensor) and documents.dtype == torch.bool and documents.dim() == 4):
        raise InputError("documents must be the (B, 1, T, T) bool mask from prepare_documents(attn_impl, "
                         "document_ids), not the ids")


def eager_attention(q, k, v, *, causal=True, dropout_p=0.0, softmax_scale=None, documents=None):
    """The readable reference: softmax(q k^T * scale + mask) v, materialising the scores, in the
    inputs' precision with the softmax in fp32 (gpt2_kernels' attention_ref, the one the kernels
    are tested against). With documents (prepare_documents: the dense mask, causal included), a
    query sees only keys of its own document."""
    if documents is not None:
        _check_documents(q, k, documents, causal)
        causal = False  # the mask holds the causal part
    from gpt2_kernels.reference import attention_ref

    return attention_ref(q, k, v, causal=causal, softmax_scale=softmax_scale, upcast=False, mask=documents,
                         dropout_p=dropout_p)  # (B, H, Tq, D)


def sdpa_attention(q, k, v, *, causal=True, dropout_p=0.0, softmax_scale=None, documents=None):
    """PyTorch's scaled_dot_product_attention (flash / memory-efficient / cuDNN / math). With
    documents it takes the dense (B, 1, T, T) mask, which rules out its fused flash backend: O(T^2)
    memory, and slow (our triton kernel skips other documents' blocks instead)."""
    t_q, t_k = q.shape[2], k.shape[2]
    mask = None
    if documents is not None:
        _check_documents(q, k, documents, causal)
        mask, causal = documents, False  # the mask holds the causal part
    elif causal and t_q != t_k and t_q > 1:
        # is_causal aligns top-left; a KV cache needs bottom-right. One query sees every key.
        from gpt2_kernels.reference import causal_mask

        mask = causal_mask(t_q, t_k, q.device)
    return F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=mask,
        dropout_p=dropout_p,
        is_causal=causal and t_q == t_k,
        scale=softmax_scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )


def triton_attention(q, k, v, *, causal=True, dropout_p=0.0, softmax_scale=None, documents=None):
    """Our fused flash attention (gpt2_kernels/attention.py); documents: the ids' document bounds
    (prepare_documents). Cached decoding, where Tq < Tk, goes through SDPA: one query row per step
    is memory-bound and gains nothing from a fused kernel."""
    if q.shape[2] != k.shape[2]:
        if documents is not None:
            raise InputError("document masking covers whole sequences; cached decoding (fewer queries than keys) "
                             "takes none")
        return sdpa_attention(q, k, v, causal=causal, dropout_p=dropout_p, softmax_scale=softmax_scale)
    if dropout_p > 0.0:  # the model passes its dropout in training only; resolve_kernels avoids this
        raise InputError(f"{NO_TRAINING_DROPOUT}; train with dropout=0 or attn_impl='sdpa'")
    from gpt2_kernels import flash_attention

    return flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, document_ids=documents)


def torch_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_norm(x, residual, weight, bias, eps):
    residual = x + residual
    return F.layer_norm(residual, (x.shape[-1],), weight, bias, eps), residual


def triton_norm(x, weight, bias, eps):
    from gpt2_kernels import layer_norm

    return layer_norm(x, weight, bias, eps)


def triton_add_norm(x, residual, weight, bias, eps):
    from gpt2_kernels import add_layer_norm

    return add_layer_norm(x, residual, weight, bias, eps)


ATTENTION: dict[str, Callable] = {
    "eager": eager_attention,
    "sdpa": sdpa_attention,
    "triton": triton_attention,
}
NORM: dict[str, tuple[Callable, Callable]] = {
    "torch": (torch_norm, torch_add_norm),
    "triton": (triton_norm, triton_add_norm),
}


class KernelUnavailableError(InputError, RuntimeError):
    """A kernel implementation that can't run on this machine (say, triton without a GPU)."""


def triton_unavailable_reason() -> str | None:
    """None when the Triton kernels can run here; otherwise why not and what to use instead."""
    if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
        return (
            "the triton kernels need a CUDA GPU (or TRITON_INTERPRET=1 with CPU tensors, for tests); "
            "use attn_impl='sdpa' and norm_impl='torch' here (--kernels auto picks them)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton, Linux only); use attn_impl='sdpa', norm_impl='torch'"
    return None


KERNEL_CHOICES = {"triton": ("triton", "triton"), "sdpa": ("sdpa", "torch"), "eager": ("eager", "torch")}
# Our attention kernel's one limit a model config can meet. Dropout acts in training only (the model
# passes dropout_p=0 in eval mode), so the kernel serves inference whatever the config's dropout.
NO_TRAINING_DROPOUT = "our triton attention kernel has no attention dropout"
# GPT-2 124M training tokens/s with --kernels triton over --kernels sdpa (benchmarks.training, bf16,
# 16 x 1024), by GPU family (CUDA compute capability), copied from the committed results file named
# beside it (tests/test_model.py checks each against its file, and that no file is left out).
# "auto" takes our kernels on a family only where this is above 1: never a path our own numbers
# show slower.
TRITON_TRAINING_SPEEDUP: dict[tuple[int, int], tuple[float, str]] = {
    (9, 0): (0.65, "benchmarks/results/nvidia-h200/training.csv"),  # NVIDIA H200, 2026-12-04
}


def cuda_capability() -> tuple[int, int] | None:
    """The current CUDA device's compute capability (its family: (9, 0) for H100 and H200), or None."""
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def auto_kernels(device_type: str | None = None, train_dropout: float = 0.0) -> tuple[tuple[str, str], str]:
    """--kernels auto: (attn_impl, norm_impl) and why, in a phrase for the run's banner. Our Triton
    kernels where they can run and a committed benchmark shows them faster on this GPU family
    (TRITON_TRAINING_SPEEDUP), with SDPA's attention when training with dropout; else SDPA and
    torch's LayerNorm."""
    on_cuda = torch.cuda.is_available() if device_type is None else device_type == "cuda"
    if not on_cuda:
        return KERNEL_CHOICES["sdpa"], "PyTorch's kernels off CUDA"
    if triton_unavailable_reason() is not None:
        return KERNEL_CHOICES["sdpa"], "PyTorch's kernels: triton can't run here"
    capability = cuda_capability()
    family = f"sm_{capability[0]}{capability[1]}" if capability else "this GPU"
    speedup, source = TRITON_TRAINING_SPEEDUP.get(capability, (None, None))
    if speedup is None:
        return KERNEL_CHOICES["sdpa"], f"PyTorch's kernels: no committed benchmark shows ours faster on {family}"
    if speedup <= 1:
        return KERNEL_CHOICES["sdpa"], (f"PyTorch's kernels: ours trained at {speedup:.2f}x their tokens/s on "
                                        f"{family} ({source})")
    why = f"our kernels: they trained at {speedup:.2f}x SDPA's tokens/s on {family} ({source})"
    if train_dropout > 0:
        return ("sdpa", "triton"), why + "; SDPA's attention, for the dropout"
    return KERNEL_CHOICES["triton"], why


def resolve_kernels(choice: str, device_type: str | None = None, *, train_dropout: float = 0.0) -> tuple[str, str]:
    """(attn_impl, norm_impl) for the scripts' --kernels {auto, triton, sdpa, eager}, on device_type
    (default: CUDA when there is a GPU). train_dropout is the model's dropout when it is to be
    trained, 0 for inference. "auto": auto_kernels. "triton" where Triton can't run raises
    KernelUnavailableError saying why; "triton" for training with dropout, InputError."""
    if choice == "auto":
        return auto_kernels(device_type, train_dropout)[0]
    if choice not in KERNEL_CHOICES:
        raise InputError(f"--kernels must be one of {['auto', *KERNEL_CHOICES]}, got {choice!r}")
    check_available(*KERNEL_CHOICES[choice])
    if choice == "triton" and train_dropout > 0:
        raise InputError(f"--kernels triton: {NO_TRAINING_DROPOUT} (the model's dropout is {train_dropout:g}); "
                         f"use --kernels auto or sdpa, or dropout=0")
    return KERNEL_CHOICES[choice]


def check_available(attn_impl: str, norm_impl: str) -> None:
    """Raise KernelUnavailableError, saying why and what to use, when a chosen implementation can't run here.

    Where the triton kernels can run, it imports them: that registers their torch.ops.gpt2_suite
    operators and FLOP formulas as soon as a model chooses them, before a FlopCounterMode (which
    copies the formulas it knows when it is created) or a compile would meet them."""
    if "triton" in (attn_impl, norm_impl):
        reason = triton_unavailable_reason()
        if reason:
            raise KernelUnavailableError(reason)
        import gpt2_kernels.attention  # noqa: F401
        import gpt2_kernels.layer_norm  # noqa: F401
