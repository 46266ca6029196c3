"""Helpers the op files of kernels/ share, as Liger-Kernel keeps ``ops/utils.py`` beside its ops.

Each op file (attention.py, layer_norm.py) needs the same few pieces around its kernels; they live
here once, so the ops agree on them and a test flips one switch for both:

* ``interpreting()``: whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, the CPU
  test suite) instead of compiling them for a GPU.
* ``autotune_configs(configs, interpret_config)``: the autotune list on a GPU, one pinned config
  under the interpreter (where every config costs seconds of Python and timing means nothing).
* ``POISON_OUTPUTS`` and ``empty(shape, dtype, device)``: output allocation behind one debug
  switch; when a test sets it, every buffer a kernel writes starts as NaN, so an element the
  kernel forgets to write shows up.
* ``check_device(op, name, x, cpu_alternative)``: CUDA tensors, or CPU tensors under the
  interpreter; anything else is refused with a message naming the CPU alternative.
* ``LOG2E``, ``LN2``: the base-2 conversion constants, as ``tl.constexpr`` so ``@triton.jit`` code
  can use them (``from kernels.utils import LOG2E``); ``LOG2E.value`` is the float on the host.

Depends on torch and triton only; nothing runs at import time.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln 2 = log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln 2: log(x) = log2(x) * LN2

# Debug switch for tests: allocate every kernel output (and scratch buffer) filled with NaN instead
# of uninitialised, so an element a kernel forgets to write shows up as NaN.
POISON_OUTPUTS = False


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """The autotune list on a GPU; the single pinned config under the interpreter."""
    return [interpret_config] if interpreting() else configs


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_device(op: str, name: str, x: torch.Tensor, cpu_alternative: str) -> None:
    """Raise ValueError unless x is a CUDA tensor, or a CPU tensor under the interpreter. op names
    the caller in the message ("flash_attention"), name the argument ("q"), cpu_alternative what to
    use on CPU instead ("torch.nn.functional.layer_norm")."""
    if x.is_cuda or (x.device.type == "cpu" and interpreting()):
        return
    raise ValueError(
        f"{op} needs CUDA tensors, got {name} on {x.device}"
        + (
            " (CPU tensors run only under Triton's interpreter, TRITON_INTERPRET=1, meant for tests); "
            f"on CPU use {cpu_alternative}"
            if x.device.type == "cpu"
            else ""
        )
    )
