"""Our layer_norm and add_layer_norm against F.layer_norm (and the unfused add + layer norm),
eager and under torch.compile, and Liger-Kernel's LayerNorm where it is installed, with the
device's copy bandwidth at each point's size as the yardstick.

    python -m benchmarks.layer_norm                # full sweep on a CUDA GPU -> benchmarks/results/<device>/
    python -m benchmarks.layer_norm --quick --output_dir /tmp/b   # tiny shapes, CPU interpreter (CI smoke)

Bytes counted (s = bytes per element of x, N rows, C hidden; weights, bias and the fp32 mean/rstd
are under 1% at these sizes and not counted):
    layer_norm      fwd: read x, write y = 2·N·C·s          fwd+bwd: + read x, dy, write dx = 5·N·C·s
    add_layer_norm  fwd: read x, residual, write y, z = 4·N·C·s
                    fwd+bwd: + read z, dy, dz, write dx (= d residual) = 8·N·C·s
GB/s = bytes / time; "of copy" = that over the bandwidth of a device-to-device copy of a tensor of
x's size and dtype (bytes read + written), measured at each point just before its providers: at
16384 × 768 bf16 (25 MB) a copy is itself partly launch cost, as the kernels are, where a 1 GiB
copy would run at full DRAM speed. Both are timed by triton.testing.do_bench (L2 flushed between
calls). On CUDA each provider is also timed replayed from a CUDA graph (metrics time_cudagraph and
bandwidth_cudagraph; common.measure_cudagraph): a 12 to 25 µs kernel is not far above its launch
cost, which the graph leaves out (it does not flush L2, so read those as launch-free, not as DRAM
bandwidth). A --quick run on CPU has no CUDA graphs and skips them.

Before timing, every provider's outputs and gradients are compared with the float64 reference:
each row of y, z, dx and d residual on its own and dweight, dbias whole, the worst relative error
recorded (which tensor and row in the check row's note). A provider that disagrees is recorded as
"mismatch" and not timed.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/layer_norm.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import common
from gpt2.errors import ArgumentParser, InputError, bounded_int, exit_on_input_error

SHAPE_FIELDS = ["rows", "hidden"]
POINT_FIELDS = ["kernel", "provider", "dtype", *SHAPE_FIELDS]  # one provider's rows at a point, replaced together
BYTES_PER_ELEMENT_PASS = {("layer_norm", "fwd"): 2, ("layer_norm", "fwd+bwd"): 5,
                          ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "fwd+bwd"): 8}
MISMATCH_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
MODES = ("fwd", "fwd+bwd")
EPS = 1e-5


def torch_add_layer_norm(x, residual, weight, bias, eps):
    z = x + residual
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps), z


def providers(kernel: str, quick: bool) -> dict:
    from gpt2_kernels import add_layer_norm, layer_norm

    if kernel == "layer_norm":
        table = {"ours": lambda x, r, w, b: (layer_norm(x, w, b, EPS),),
                 "torch": lambda x, r, w, b: (F.layer_norm(x, (x.shape[-1],), w, b, EPS),)}
    else:
        table = {"ours": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS),
                 "torch": lambda x, r, w, b: torch_add_layer_norm(x, r, w, b, EPS)}
    if not quick:  # compiling takes minutes on a CPU; the smoke run leaves it out
        compiled = torch.compile(table["torch"], dynamic=False)
        table["torch.compile"] = compiled
    if kernel == "layer_norm":  # Liger has no fused add + LayerNorm
        table["liger"] = liger_provider()
    return table


def liger_provider():
    """Liger-Kernel's LayerNorm, liger_kernel.transformers.functional.liger_layer_norm(X, W, B, eps):
    an optional peer (pip install -e ".[peers]"), CUDA only."""
    unavailable = common.peer_unavailable("liger_kernel", 'pip install -e ".[peers]"',
                                          "Liger's kernels do not run under Triton's interpreter")
    if unavailable:
        return unavailable
    from liger_kernel.transformers.functional import liger_layer_norm

    return lambda x, r, w, b: (liger_layer_norm(x, w, b, EPS),)


def copy_row(base: dict, like: torch.Tensor, quick: bool) -> dict:
    """The point's yardstick: GB/s of a device-to-device copy of a tensor like x (same size and
    dtype), counting bytes read plus bytes written."""
    src = torch.randn_like(like)  # not requiring grad
    dst = torch.empty_like(src)
    p50, p20, p80 = common.measure(lambda: dst.copy_(src), quick)
    nbytes = 2 * src.numel() * src.element_size()
    return dict(base, provider="copy", mode="copy", metric="bandwidth", unit="GB/s", status="ok",
                p50=nbytes / p50 / 1e6, p20=nbytes / p80 / 1e6, p80=nbytes / p20 / 1e6)


def run_point(kernel, rows_n, hidden, dtype_name, table, env, quick, device, cuda_graphs: bool):
    dtype = common.DTYPES[dtype_name]
    base = dict(benchmark="layer_norm", kernel=kernel, dtype=dtype_name, rows=rows_n, hidden=hidden, **env)
    x = torch.randn(rows_n, hidden, dtype=dtype, device=device, requires_grad=True)
    residual = torch.randn(rows_n, hidden, dtype=dtype, device=device, requires_grad=True)
    weight = (1 + 0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    bias = (0.1 * torch.randn(hidden, device=device)).to(dtype).requires_grad_()
    inputs = [x, residual, weight, bias] if kernel == "add_layer_norm" else [x, weight, bias]
    douts = [torch.randn(rows_n, hidden, dtype=dtype, device=device) for _ in range(2)]

    def grads_of(outs):
        torch.autograd.backward(outs, douts[: len(outs)])
        result = [t.grad for t in inputs]
        for t in inputs:
            t.grad = None
        return result

    # float64 reference on the same inputs (layer_norm_ref upcasts).
    from gpt2_kernels import layer_norm_ref

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    if kernel == "add_layer_norm":
        rx, rr, rw, rb = ref_inputs
        ref_outs = layer_norm_ref(rx, rw, rb, EPS, residual=rr)
        names = ["y", "z", "dx", "dresidual", "dweight", "dbias"]  # of the outputs, then the gradients
    else:
        rx, rw, rb = ref_inputs
        ref_outs = (layer_norm_ref(rx, rw, rb, EPS),)
        names = ["y", "dx", "dweight", "dbias"]
    torch.autograd.backward(ref_outs, [d.double() for d in douts[: len(ref_outs)]])
    ref = [o.detach() for o in ref_outs] + [t.grad for t in ref_inputs]

    rows = [copy_row(base, x, quick)]
    copy_gbps = rows[0]["p50"]
    for name, fn in table.items():
        row = dict(base, provider=name)

        def call(fn=fn):
            return fn(x, residual, weight, bias)

        try:
            outs = call()
            got = [o.detach() for o in outs] + grads_of(outs)
            # Drop the checked call's graph now: kept alive, its AccumulateGrad nodes (made on the
            # default stream) would be reused by the CUDA-graph capture on a side stream, which then
            # syncs with the default stream and fails (and leaves the CUDA RNG mid-capture).
            del outs
        except common.NotMeasured as e:
            rows += common.untimed(row, MODES, e.status, e.note)
            continue
        except RuntimeError as e:
            status = "oom" if common.is_oom(e) else "unsupported"
            rows += common.untimed(row, MODES, status, str(e).split("\n")[0][:200])
            continue
        err, worst = check(got, ref, names)
        ok = math.isfinite(err) and err <= MISMATCH_TOL[dtype]
        rows.append(dict(row, mode="check", metric="rel_err", unit="", p50=err, status="ok" if ok else "mismatch",
                         note=worst))
        if not ok:
            rows += common.untimed(row, MODES, "mismatch", f"rel_err {err:.3g} > {MISMATCH_TOL[dtype]:g}, {worst}")
            continue

        def fwd(call=call):
            with torch.no_grad():
                call()

        def fwd_bwd(call=call):
            outs = call()
            torch.autograd.backward(outs, douts[: len(outs)])

        for mode, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            nbytes = BYTES_PER_ELEMENT_PASS[(kernel, mode)] * rows_n * hidden * x.element_size()
            p50, p20, p80 = common.measure(run, quick, grad_to_none=inputs)
            rows += timing_rows(dict(row, mode=mode), "", nbytes, p50, p20, p80)
            rows.append(dict(row, mode=mode, metric="fraction_of_copy", unit="", p50=nbytes / p50 / 1e6 / copy_gbps,
                             status="ok"))
            if cuda_graphs:
                try:
                    p50, p20, p80 = common.measure_cudagraph(run, grad_to_none=inputs)
                except RuntimeError as e:  # a provider that cannot be captured (e.g. it syncs with the host)
                    status = "oom" if common.is_oom(e) else "unsupported"
                    rows.append(dict(row, mode=mode, metric="time_cudagraph", unit="ms", status=status,
                                     note=str(e).split("\n")[0][:200]))
                else:
                    rows += timing_rows(dict(row, mode=mode), "_cudagraph", nbytes, p50, p20, p80)
            for t in inputs:
                t.grad = None
    return rows


def check(got, ref, names) -> tuple[float, str]:
    """The largest relative error against the float64 reference, over every row of the (rows,
    hidden) tensors and over dweight and dbias whole, and where it is."""
    worst = [(*common.worst_relative_error(g, r, lead=r.dim() - 1), name) for g, r, name in zip(got, ref, names)]
    err, index, name = max(worst, key=lambda w: w[0])
    return err, f"worst: {name}" + (f", row {index[0]}" if index else "")


def timing_rows(row: dict, suffix: str, nbytes: int, p50: float, p20: float, p80: float) -> list[dict]:
    """A time row and its bandwidth row (metrics time<suffix>, bandwidth<suffix>)."""
    return [dict(row, metric=f"time{suffix}", unit="ms", p50=p50, p20=p20, p80=p80, status="ok"),
            dict(row, metric=f"bandwidth{suffix}", unit="GB/s", status="ok",
                 p50=nbytes / p50 / 1e6, p20=nbytes / p80 / 1e6, p80=nbytes / p20 / 1e6)]


def summarize(rows, out_dir) -> str:
    device = rows[0]["device"] if rows else "no rows"
    lines = [
        f"# LayerNorm benchmark — {device}",
        "",
        common.stamp(rows),
        "Command: `python -m benchmarks.layer_norm`. Median GB/s of triton.testing.do_bench over the bytes "
        "stated in benchmarks/layer_norm.py (layer_norm fwd 2·N·C·s, fwd+bwd 5·N·C·s; add_layer_norm fwd "
        "4·N·C·s, fwd+bwd 8·N·C·s). copy = a device-to-device copy of a tensor of x's size and dtype, "
        "measured at the same point; ours / copy = their GB/s ratio. ours (graph) = ours replayed from a "
        "CUDA graph (no launch cost, no L2 flush). speedup = torch eager time / ours. "
        "oom / unsupported / skipped / mismatch: not timed (the CSV's note says why).",
        "",
    ]
    groups = sorted({(r["kernel"], r["dtype"], r["mode"]) for r in rows if r["metric"] == "time"},
                    key=lambda g: (g[0], list(common.DTYPES).index(g[1]) if g[1] in common.DTYPES else 9, g[2]))
    for kernel, dtype, mode in groups:
        group = [r for r in rows if (r["kernel"], r["dtype"], r["mode"]) == (kernel, dtype, mode)]
        names = list(dict.fromkeys(r["provider"] for r in group))  # liger: layer_norm only
        lines += [f"## {kernel}, {dtype}, {mode} (GB/s; ours as fraction of copy)", ""]
        body = []
        copies = [r for r in rows if (r["kernel"], r["dtype"], r["mode"]) == (kernel, dtype, "copy")]
        for rows_n, hidden in sorted({(r["rows"], r["hidden"]) for r in group}):
            at = [r for r in group + copies if (r["rows"], r["hidden"]) == (rows_n, hidden)]

            def get(provider, metric, at=at):
                return next((r for r in at if r["provider"] == provider and r["metric"] == metric), None)

            def p50(found):
                return found["p50"] if found else None

            cells = []
            for name in names:
                bw, t = get(name, "bandwidth"), get(name, "time")
                cells.append(bw["p50"] if bw else (t["status"] if t else "—"))
            ours, torch_t = get("ours", "time"), get("torch", "time")
            speedup = (torch_t["p50"] / ours["p50"]) if ours and torch_t and ours["p50"] and torch_t["p50"] else None
            body.append([f"{rows_n}×{hidden}", *cells, p50(get("copy", "bandwidth")),
                         p50(get("ours", "fraction_of_copy")), p50(get("ours", "bandwidth_cudagraph")), speedup])
        header = ["rows×hidden", *names, "copy", "ours / copy", "ours (graph)", "speedup"]
        lines += [common.markdown_table(header, body), ""]
        series = {n: [(r["hidden"], r["p50"]) for r in group if r["provider"] == n and r["metric"] == "bandwidth"]
                  for n in names}
        png = f"{kernel}_{dtype}_{mode.replace('+', '_')}.png"
        if dtype in ("bf16", "fp32") and common.plot_lines(
            series, f"{kernel} {dtype} {mode} — {device}", "hidden size", "GB/s", out_dir / png
        ):
            lines += [f"![{kernel} {dtype} {mode}]({png})", ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.layer_norm"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on CPU through the Triton interpreter")
    parser.add_argument("--dtype", nargs="*", default=None, choices=list(common.DTYPES))
    parser.add_argument("--hidden", nargs="*", type=bounded_int(1), default=None)
    parser.add_argument("--rows", type=bounded_int(1), default=None, help="rows (tokens); default 16384")
    parser.add_argument("--output_dir", type=common.writable_dir, default=None,
                        help="default: benchmarks/results/<device>/")
    parser.add_argument("--replot", action="store_true",
                        help="measure nothing: rewrite layer_norm.md and the plots from --output_dir's CSV")
    return parser.parse_args(argv)


def run(args) -> int:
    if args.replot:
        return common.replot(args.output_dir, "layer_norm", SHAPE_FIELDS, summarize)
    env, out_dir = common.start_run(args.quick, args.output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hiddens = args.hidden or ([64, 200] if args.quick else [768, 1024, 1280, 1600, 4096, 8192])
    rows_n = args.rows or (33 if args.quick else 16384)
    dtypes = args.dtype or (["fp32", "bf16"] if args.quick else ["bf16", "fp16", "fp32"])
    from gpt2_kernels.layer_norm import MAX_FUSED_BYTES  # after start_run: the interpreter switch comes first

    for dtype in dtypes:
        limit = MAX_FUSED_BYTES // common.DTYPES[dtype].itemsize
        if max(hiddens) > limit:
            raise InputError(f"--hidden {max(hiddens)}: our fused LayerNorm holds a row in registers, at most "
                             f"{limit} elements in {dtype}")
    csv_path = out_dir / "layer_norm.csv"
    results = common.read_csv(csv_path, SHAPE_FIELDS)
    for kernel in ("layer_norm", "add_layer_norm"):
        for hidden in hiddens:
            for dtype_name in dtypes:
                # A fresh torch.compile per point: one compiled function across every shape, dtype and
                # grad mode would pass Dynamo's recompile limit and silently fall back to eager.
                torch._dynamo.reset()
                table = providers(kernel, args.quick)
                point = run_point(kernel, rows_n, hidden, dtype_name, table, env, args.quick, device,
                                  cuda_graphs=device == "cuda")
                results = common.save_rows(point, csv_path, SHAPE_FIELDS, POINT_FIELDS)
                summary = ", ".join(f"{r['provider']} {r['p50']:.0f}" if r["mode"] == "copy" else
                                    f"{r['provider']} {r['mode']} {r['p50']:.0f}" for r in point
                                    if r["metric"] == "bandwidth")
                print(f"{kernel} {rows_n}x{hidden} {dtype_name}: GB/s {summary}", file=sys.stderr)
    print(common.write_summary("layer_norm", results, out_dir, summarize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
