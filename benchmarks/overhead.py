"""Host cost per call: how long the CPU takes to issue one call of our ops against PyTorch's, and
where that time goes.

    python -m benchmarks.overhead                 # GPU: LayerNorm at 16384x768, attention at GPT-2's shape, bf16
    python -m benchmarks.overhead --quick         # CPU (Triton's interpreter), tiny shapes: the path only

The first GPU run (2026-12-04) timed our LayerNorm forward at 195 µs by do_bench against 15.6 µs
replayed from a CUDA graph: the kernel is fast and the call around it is not. do_bench flushes L2
(about 60 to 90 µs of GPU work) before each call and records its start event behind the flush, so
a call whose host side takes longer than the flush is timed by its host side. This probe measures
that side directly, per case:

* host µs: perf_counter over N calls issued back to back (no sync inside; the GPU queue absorbs
  them), i.e. what one call costs the CPU;
* wall µs: the same N calls through a final synchronize, i.e. max(host, GPU) per call;
* GPU µs: the kernels' own time per call, from torch.profiler's device events.

Every forward+backward call starts without gradients (they are dropped after each call, as a
training step's zero_grad does), so no gradient-accumulation kernel is counted on either side.

Cases: ours through the public function (in eager mode the ops' implementations without the
dispatcher: gpt2_kernels/utils.py, call_op), ours through the registered op, ours through the
launcher alone (no autograd), and PyTorch's F.layer_norm / SDPA; forward under no_grad and forward+backward. Then a
cProfile of our forward+backward calls (top functions by own time) says which Python costs most.
Writes overhead.md under results/<device>/ (or --output_dir); prints the table last.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if not __package__:  # run as a file (python benchmarks/overhead.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from gpt2.errors import ArgumentParser, bounded_int, exit_on_input_error


def cases(quick: bool, device: str) -> dict:
    """{name: (fn, inputs that get gradients or None)}: each fn one call of the case."""
    import gpt2_kernels
    from gpt2_kernels.attention import attention_fwd

    ln_module = sys.modules["gpt2_kernels.layer_norm"]  # the module (gpt2_kernels.layer_norm is the function)
    (b, h, t, d), dtype = attention_shape(quick)
    rows, hidden = (64, 64) if quick else (16384, 768)
    x = torch.randn(rows, hidden, dtype=dtype, device=device, requires_grad=True)
    w = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
    bias = torch.randn(hidden, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(rows, hidden, dtype=dtype, device=device)
    q, k, v = (torch.randn(b, h, t, d, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
    do = torch.randn(b, h, t, d, dtype=dtype, device=device)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def backward(fn, grad):
        def run():
            fn().backward(grad)
        return run

    ours_ln = lambda: gpt2_kernels.layer_norm(x, w, bias, 1e-5)  # noqa: E731
    torch_ln = lambda: F.layer_norm(x, (hidden,), w, bias, 1e-5)  # noqa: E731
    ours_attn = lambda: gpt2_kernels.flash_attention(q, k, v, causal=True)  # noqa: E731
    # The registered ops themselves: what torch.compile and torch.export call, and what the public
    # functions called in eager mode too before utils.call_op.
    op_ln = lambda: torch.ops.gpt2_suite.layer_norm(x, w, bias, 1e-5)[0]  # noqa: E731
    op_attn = lambda: torch.ops.gpt2_suite.flash_attention(q, k, v, True, None, None, None)[0]  # noqa: E731
    sdpa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return {
        "layer_norm fwd: ours": (no_grad(ours_ln), None),
        "layer_norm fwd: ours, launcher only": (no_grad(lambda: ln_module.layer_norm_fwd(x, w, bias, 1e-5)), None),
        "layer_norm fwd: F.layer_norm": (no_grad(torch_ln), None),
        "layer_norm fwd+bwd: ours": (backward(ours_ln, dy), [x, w, bias]),
        "layer_norm fwd+bwd: ours through torch.ops (the dispatcher)": (backward(op_ln, dy), [x, w, bias]),
        "layer_norm fwd+bwd: F.layer_norm": (backward(torch_ln, dy), [x, w, bias]),
        "attention fwd: ours": (no_grad(ours_attn), None),
        "attention fwd: ours, launcher only": (no_grad(lambda: attention_fwd(q, k, v, True, None)), None),
        "attention fwd: sdpa": (no_grad(sdpa), None),
        "attention fwd+bwd: ours": (backward(ours_attn, do), [q, k, v]),
        "attention fwd+bwd: ours through torch.ops (the dispatcher)": (backward(op_attn, do), [q, k, v]),
        "attention fwd+bwd: sdpa": (backward(sdpa, do), [q, k, v]),
    }


def attention_shape(quick: bool) -> tuple[tuple[int, int, int, int], torch.dtype]:
    """(B, H, T, D) and dtype of the attention cases: GPT-2's, or a tiny one for --quick."""
    return ((1, 2, 64, 16), torch.float32) if quick else ((16, 12, 1024, 64), torch.bfloat16)


def sdpa_backend(quick: bool, device: str) -> str:
    """The backend the sdpa cases run on, at their shape and dtype."""
    shape, dtype = attention_shape(quick)
    q = torch.randn(shape, dtype=dtype, device=device)
    return common.sdpa_backend(q, q, q, is_causal=True)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_and_wall(fn, grads, calls: int) -> tuple[float, float]:
    """(host µs, wall µs) per call over `calls` calls after a warm-up."""
    for _ in range(5):
        fn()
    sync()
    start = time.perf_counter()
    for _ in range(calls):
        call_fresh(fn, grads)
    issued = time.perf_counter()
    sync()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def call_fresh(fn, grads):
    """One call of fn, its inputs' gradients dropped after it: every call then writes fresh
    gradients, as a training step does, and no gradient-accumulation kernel is timed."""
    fn()
    for t in grads or ():
        t.grad = None


def gpu_time(fn, grads, calls: int) -> float | None:
    """The device kernels' time per call in µs, from torch.profiler (None on CPU)."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    call_fresh(fn, grads)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call_fresh(fn, grads)
        sync()
    total = 0.0
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total += getattr(event, "device_time", None) or getattr(event, "cuda_time", 0.0)
    return total / calls


def python_profile(fn, grads, calls: int, top: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        call_fresh(fn, grads)
    sync()
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    lines = [line for line in text.getvalue().splitlines() if line.strip()]
    return "\n".join(lines[: top + 8])


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.overhead"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes; on a CPU, Triton's interpreter")
    parser.add_argument("--output_dir", type=common.writable_dir,
                        help="where overhead.md goes (default results/<device>/)")
    parser.add_argument("--calls", type=bounded_int(1), default=200)
    return parser.parse_args(argv)


def run(args) -> int:
    env, out_dir = common.start_run(args.quick, args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    calls = 3 if args.quick else args.calls
    rows, profiles = [], []
    for name, (fn, grads) in cases(args.quick, device).items():
        host, wall = host_and_wall(fn, grads, calls)
        gpu = gpu_time(fn, grads, min(calls, 20))
        rows.append([name, common.fmt(host), common.fmt(wall), common.fmt(gpu) if gpu is not None else "—"])
        print(f"{name}: host {host:.1f} µs, wall {wall:.1f} µs, GPU {gpu if gpu is None else round(gpu, 1)} µs",
              flush=True)
    for name in ("layer_norm fwd+bwd: ours", "attention fwd+bwd: ours"):
        fn, grads = cases(args.quick, device)[name]
        profiles += [f"### {name}: cProfile over {calls} calls, by own time", "", "```",
                     python_profile(fn, grads, calls), "```", ""]
    table = common.markdown_table(["case", "host µs per call", "wall µs per call", "GPU µs per call"], rows)
    backend = sdpa_backend(args.quick, device)
    text = "\n".join([f"# Host cost per call — {env['device']}", "", common.stamp([env]), "",
                      "Command: `python -m benchmarks.overhead`. " + __doc__.split("\n\n")[2].replace("\n", " "),
                      "", f"The sdpa rows ran SDPA's {backend} backend (its default at this shape and dtype).", "",
                      table, "", *profiles])
    out_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write_text(out_dir / "overhead.md", text + "\n")
    print("\n".join(profiles))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
