"""Helpers the op files of gpt2_kernels/ share, as Liger-Kernel keeps ``ops/utils.py`` beside its ops.

Each op file (attention.py, layer_norm.py) needs the same few pieces around its kernels; they live
here once, so the ops agree on them and a test flips one switch for both:

* ``interpreting()``: whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1, the CPU
  test suite) instead of compiling them for a GPU.
* ``autotune_configs(configs, interpret_config)``: the autotune list on a GPU, one pinned config
  under the interpreter (where every config costs seconds of Python and timing means nothing).
* ``autotune_choice(full, short)``: which of an op's two autotune lists it tunes over, by the
  environment switch ``GPT2_SUITE_AUTOTUNE`` (``full``, the default, or ``short``: 3-4 configs per
  head-dim class, for a GPU session whose first calls must compile quickly). Autotune lists are
  built when ``@triton.autotune`` decorates a kernel, so the switch is read when an op file is
  imported: set it before the first use of a kernel (setting it later changes nothing).
* ``launch_device(x)``: a context that makes x's CUDA device current around a launch, since Triton
  launches on the current device (a no-op for CPU tensors).
* ``POISON_OUTPUTS`` and ``empty(shape, dtype, device)``: output allocation behind one debug
  switch; when a test sets it, every buffer a kernel writes starts as NaN, so an element the
  kernel forgets to write shows up.
* ``unit_last_stride(x)``: x, or a contiguous copy when its last stride isn't 1 (the kernels index
  the last dimension as contiguous; any other stride is theirs to follow).
* ``check_device(op, name, x, cpu_alternative)``: CUDA tensors, or CPU tensors under the
  interpreter; anything else is refused with a message naming the CPU alternative.
* ``host_checks()`` and ``without_host_checks()``: whether an input check that reads device data on
  the host (a device-to-host sync) runs now; not while torch.compile traces, while a CUDA stream
  captures a graph (a sync there is an error), or inside ``without_host_checks()``, where the caller
  makes the same check itself without a sync (on the device, read after the work is done).
* ``LOG2E``, ``LN2``: the base-2 conversion constants, as ``tl.constexpr`` so ``@triton.jit`` code
  can use them (``from gpt2_kernels.utils import LOG2E``); ``LOG2E.value`` is the float on the host.
* ``define_op(name, schema, ...)``: registers one PyTorch custom operator
  ``torch.ops.gpt2_suite.<name>`` (``OP_NAMESPACE``) with its CUDA and CPU implementations, its fake
  (meta) implementation, its autograd formula and its FLOP formula, once per process.
* ``call_op(name, *args)``: what the public functions and the backward formulas call instead of
  ``torch.ops.gpt2_suite.<name>``: the registered op wherever something watches the dispatcher
  (torch.compile, torch.export, FlopCounterMode, fake or other tensor subclasses), and in plain
  eager mode the same implementation and autograd formula without it (below).

Why ``torch.library.custom_op`` and not ``torch.library.triton_op``
-------------------------------------------------------------------
A ``triton_op`` is traced: its fake implementation *is* its Python body, run on fake tensors, with
each launch wrapped by ``wrap_triton`` so that dynamo/inductor see the Triton kernels themselves.
Under Triton's interpreter (TRITON_INTERPRET=1, the CPU test suite) ``@triton.jit`` makes an
``InterpretedFunction``, not a kernel that tracing can capture: the body, run as the fake
implementation, launches it on fake tensors and fails ("Cannot access data pointer of Tensor", as
tried with torch 2.13 and a one-kernel triton_op). No CPU test could then compile, export or
opcheck a model with our kernels, and a GPU would run a registration that CI never ran.

A ``custom_op`` is opaque: dynamo, AOTAutograd, torch.export and FlopCounterMode see one node with
a schema, a fake implementation gives its outputs' metadata without running it, and at run time
the node calls our launcher, which validates, allocates and launches the autotuned kernels exactly
as in eager mode. The same registration runs on every machine, so the CPU suite tests the one a
GPU uses. (torch.library.custom_op, register_kernel/register_fake/register_autograd and opcheck
all exist since torch 2.4: the GPU image's 2.11 and CI's 2.13 run the same code.)

On a GPU, inductor treats such an op as an extern (fallback) kernel: the compiled graph calls it
once per use, the surrounding matmuls and pointwise ops are still fused and generated around it,
and the op itself remains our single fused Triton launch (flash attention, or LN with its residual
add). What inductor gives up is fusing *into* our kernels (a prologue or epilogue), which a
hand-fused kernel has little to gain from, and autotuning them itself (our ``triton.autotune`` does).

Plain eager calls skip the dispatcher
------------------------------------
A custom_op's call costs the host: the dispatcher's hops into Python for the autograd kernel and
the device kernel, and custom_op's own checks on every call (output aliasing among them). On the
first GPU session (an H200, 2026-12-04, its second call: results/nvidia-h200/overhead.md) our
LayerNorm forward cost the host 179 µs per call against 141 µs for its launcher alone (the kernel:
15.6 µs), and forward and backward through a prototype of this route (``torch.autograd.Function``
over the launchers) cost 22% less host time than through the op (763 against 981 µs for
LayerNorm, 1142 against 1468 for attention); the route as shipped is not yet timed on a GPU. The host, not
the GPU, then sets the pace of a training step. So ``call_op`` runs the registered pieces
themselves when nothing would see the difference: not compiling, no TorchDispatchMode active, no
functorch transform, every tensor a plain ``torch.Tensor``. The forward implementation and the
``setup_context``/``backward`` pair are the very functions registered on the op, so both routes
compute the same bits (tests/test_ops.py checks it).

Depends on torch and triton only; nothing runs at import time beyond the registrations of the op
files (no kernel is compiled or launched).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable

import torch
import triton
import triton.language as tl
from torch.utils import flop_counter

LOG2E = tl.constexpr(1.4426950408889634)  # 1 / ln 2 = log2(e): exp(x) = exp2(x * LOG2E)
LN2 = tl.constexpr(0.6931471805599453)  # ln 2: log(x) = log2(x) * LN2

# Debug switch for tests: allocate every kernel output (and scratch buffer) filled with NaN instead
# of uninitialised, so an element a kernel forgets to write shows up as NaN.
POISON_OUTPUTS = False


_checks = threading.local()


def host_checks() -> bool:
    """Whether a check that reads device data on the host (a sync) should run: not under
    torch.compile, not while the current CUDA stream captures a graph, not inside without_host_checks()."""
    if getattr(_checks, "off", False) or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def without_host_checks():
    """Inside, the kernels skip their checks that would sync with the host; the caller makes the same
    checks without a sync, e.g. gpt2/graphed_step.py folds the document order into a flag on the
    device and reads it after the graph's replay."""
    before = getattr(_checks, "off", False)
    _checks.off = True
    try:
        yield
    finally:
        _checks.off = before


def interpreting() -> bool:
    """Whether Triton runs in its interpreter (TRITON_INTERPRET=1): kernels then take CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def autotune_configs(configs: list[triton.Config], interpret_config: triton.Config) -> list[triton.Config]:
    """The autotune list on a GPU; the single pinned config under the interpreter."""
    return [interpret_config] if interpreting() else configs


AUTOTUNE_ENV = "GPT2_SUITE_AUTOTUNE"  # "full" (default) or "short"; read when an op file is imported


def autotune_choice(full, short):
    """full, or short when GPT2_SUITE_AUTOTUNE=short (an unset or empty variable means full).
    Any other value raises ValueError naming the two choices."""
    value = os.environ.get(AUTOTUNE_ENV) or "full"
    if value not in ("full", "short"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 'full' or 'short', got {value!r}")
    return short if value == "short" else full


def launch_device(x: torch.Tensor):
    """torch.cuda.device(x.device) for a CUDA tensor, else a no-op context: Triton launches on the
    current CUDA device, so a launcher wraps its launches in this and a tensor on cuda:1 works
    while cuda:0 is current."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty, or a NaN-filled tensor while POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def unit_last_stride(x: torch.Tensor | None) -> torch.Tensor | None:
    """x (None stays None), or a contiguous copy when its last stride isn't 1: the kernels index the
    last dimension as contiguous, and copying only then keeps views (a fused qkv's) free."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


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


OP_NAMESPACE = "gpt2_suite"  # torch.ops.gpt2_suite.flash_attention, ...


def define_op(
    name: str,
    schema: str,
    *,
    cuda: Callable,
    cpu: Callable,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    flop_formula: Callable | None = None,
) -> torch._ops.OpOverloadPacket:
    """Register ``torch.ops.gpt2_suite.<name>`` (functional: it mutates none of its inputs) and
    return it. cuda and cpu are its implementations on those devices, fake gives its outputs'
    shapes, strides and dtypes from the inputs' without computing them, backward/setup_context its
    autograd formula (torch.library.register_autograd), flop_formula its count for
    torch.utils.flop_counter.FlopCounterMode (called with the inputs' shapes, as torch's own).

    Registration happens once per process: when the op already exists (an op file imported a
    second time, under another module name), the existing registration stays and is returned.
    """
    namespace = getattr(torch.ops, OP_NAMESPACE)
    if name not in _EAGER:
        _EAGER[name] = _eager_call(cuda, cpu, backward, setup_context)
        if backward is None:
            _WITHOUT_FORMULA.add(name)
    if not hasattr(namespace, name):
        op = torch.library.custom_op(
            f"{OP_NAMESPACE}::{name}", cuda, mutates_args=(), device_types="cuda", schema=schema
        )
        op.register_kernel("cpu", cpu)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
    packet = getattr(namespace, name)
    if flop_formula is not None and packet not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(packet)(flop_formula)
    return packet


# name -> the op's plain-eager route (call_op): its implementation, under autograd where it has a formula.
_EAGER: dict[str, Callable] = {}
_WITHOUT_FORMULA: set[str] = set()  # the ops registered with no autograd formula


def _eager_call(cuda: Callable, cpu: Callable, backward: Callable | None, setup_context: Callable | None) -> Callable:
    """The op's registered pieces without the dispatcher: the implementation for the first
    argument's device (always a tensor in our schemas), under a torch.autograd.Function built from
    the registered setup_context and backward where the op has them."""

    def implementation(*args):
        return (cuda if args[0].is_cuda else cpu)(*args)

    if backward is None:
        return implementation

    class EagerOp(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            output = implementation(*args)
            setup_context(ctx, args, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    return EagerOp.apply


def _plain_eager(args) -> bool:
    """Whether nothing watches the dispatcher: not compiling or exporting, no TorchDispatchMode (such
    as FlopCounterMode or fake tensors' mode), no functorch transform, only plain torch.Tensors."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return False
    if torch.utils._python_dispatch._get_current_dispatch_mode() is not None:
        return False
    # nn.Parameter is a plain tensor here (a module's weights): no dispatch or function override
    return all(type(a) in (torch.Tensor, torch.nn.Parameter) for a in args if isinstance(a, torch.Tensor))


def _differentiated(args) -> bool:
    return torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def call_op(name: str, *args):
    """torch.ops.gpt2_suite.<name>(*args); in plain eager mode (_plain_eager) the same implementation
    and autograd formula, called without the dispatcher (the module docstring says why). An op with
    no formula (the backward ops) takes the dispatcher when its result would be differentiated (a
    double backward), so that it refuses as the op does instead of returning a constant."""
    if _plain_eager(args) and not (name in _WITHOUT_FORMULA and _differentiated(args)):
        return _EAGER[name](*args)
    return getattr(getattr(torch.ops, OP_NAMESPACE), name)(*args)
