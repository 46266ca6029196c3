"""Our layer_norm and add_layer_norm against F.layer_norm (and the unfused add + layer norm),
eager and under torch.compile, with the device's measured copy bandwidth as the yardstick.

    python -m benchmarks.layer_norm                # full sweep on a CUDA GPU -> benchmarks/results/<device>/
    python -m benchmarks.layer_norm --quick --output_dir /tmp/b   # tiny shapes, CPU interpreter (CI smoke)

Bytes counted (s = bytes per element of x, N rows, C hidden; weights, bias and the fp32 mean/rstd
are under 1% at these sizes and not counted):
    layer_norm      fwd: read x, write y = 2·N·C·s          fwd+bwd: + read x, dy, write dx = 5·N·C·s
    add_layer_norm  fwd: read x, residual, write y, z = 4·N·C·s
                    fwd+bwd: + read z, dy, dz, write dx (= d residual) = 8·N·C·s
GB/s = bytes / time; "of copy" = that over the bandwidth of a large device-to-device copy measured
in the same run (bytes read + written). A provider whose output or gradients disagree with the
float64 reference is recorded as "mismatch" and not timed.
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
from gpt2.errors import ArgumentParser, exit_on_input_error

SHAPE_FIELDS = ["rows", "hidden"]
POINT_FIELDS = ["kernel", "provider", "dtype", *SHAPE_FIELDS]  # one provider's rows at a point, replaced together
BYTES_PER_ELEMENT_PASS = {("layer_norm", "fwd"): 2, ("layer_norm", "fwd+bwd"): 5,
                          ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "fwd+bwd"): 8}
MISMATCH_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
EPS = 1e-5


def torch_add_layer_norm(x, residual, weight, bias, eps):
    z = x + residual
    return F.layer_norm(z, (z.shape[-1],), weight, bias, eps), z


def providers(kernel: str, quick: bool) -> dict:
    from kernels import add_layer_norm, layer_norm

    if kernel == "layer_norm":
        table = {"ours": lambda x, r, w, b: (layer_norm(x, w, b, EPS),),
                 "torch": lambda x, r, w, b: (F.layer_norm(x, (x.shape[-1],), w, b, EPS),)}
    else:
        table = {"ours": lambda x, r, w, b: add_layer_norm(x, r, w, b, EPS),
                 "torch": lambda x, r, w, b: torch_add_layer_norm(x, r, w, b, EPS)}
    if not quick:  # compiling takes minutes on a CPU; the smoke run leaves it out
        compiled = torch.compile(table["torch"], dynamic=False)
        table["torch.compile"] = compiled
    return table


def copy_bandwidth(quick: bool) -> float | None:
    """GB/s of a 1 GiB device-to-device copy, counting bytes read plus bytes written."""
    if quick:
        return None
    src = torch.randn(2**28, device="cuda")  # 1 GiB of fp32
    dst = torch.empty_like(src)
    p50, _, _ = common.measure(lambda: dst.copy_(src), quick)
    return 2 * src.numel() * 4 / p50 / 1e6


def run_point(kernel, rows_n, hidden, dtype_name, table, env, quick, device, copy_gbps):
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
    from kernels import layer_norm_ref

    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    if kernel == "add_layer_norm":
        rx, rr, rw, rb = ref_inputs
        ref_outs = layer_norm_ref(rx, rw, rb, EPS, residual=rr)
    else:
        rx, rw, rb = ref_inputs
        ref_outs = (layer_norm_ref(rx, rw, rb, EPS),)
    torch.autograd.backward(ref_outs, [d.double() for d in douts[: len(ref_outs)]])
    ref = [o.detach() for o in ref_outs] + [t.grad for t in ref_inputs]

    rows = []
    for name, fn in table.items():
        row = dict(base, provider=name)

        def call(fn=fn):
            return fn(x, residual, weight, bias)

        try:
            outs = call()
            got = [o.detach() for o in outs] + grads_of(outs)
        except RuntimeError as e:
            status = "oom" if common.is_oom(e) else "unsupported"
            rows += [dict(row, mode=m, metric="time", unit="ms", status=status, note=str(e).split("\n")[0][:200])
                     for m in ("fwd", "fwd+bwd")]
            continue
        err = max(common.relative_error(g, r) for g, r in zip(got, ref))
        ok = math.isfinite(err) and err <= MISMATCH_TOL[dtype]
        rows.append(dict(row, mode="check", metric="rel_err", unit="", p50=err, status="ok" if ok else "mismatch"))
        if not ok:
            rows += [dict(row, mode=m, metric="time", unit="ms", status="mismatch") for m in ("fwd", "fwd+bwd")]
            continue

        def fwd(call=call):
            with torch.no_grad():
                call()

        def fwd_bwd(call=call):
            outs = call()
            torch.autograd.backward(outs, douts[: len(outs)])

        for mode, run in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
            p50, p20, p80 = common.measure(run, quick, grad_to_none=inputs)
            for t in inputs:
                t.grad = None
            nbytes = BYTES_PER_ELEMENT_PASS[(kernel, mode)] * rows_n * hidden * x.element_size()
            gbps = nbytes / p50 / 1e6
            rows.append(dict(row, mode=mode, metric="time", unit="ms", p50=p50, p20=p20, p80=p80, status="ok"))
            rows.append(dict(row, mode=mode, metric="bandwidth", unit="GB/s", status="ok",
                             p50=gbps, p20=nbytes / p80 / 1e6, p80=nbytes / p20 / 1e6))
            if copy_gbps:
                rows.append(dict(row, mode=mode, metric="fraction_of_copy", unit="", p50=gbps / copy_gbps, status="ok"))
    return rows


def summarize(rows, out_dir) -> str:
    device = rows[0]["device"] if rows else "no rows"
    copy_gbps = next((r["p50"] for r in rows if r["kernel"] == "copy"), None)
    lines = [
        f"# LayerNorm benchmark — {device}",
        "",
        common.stamp(rows),
        "Command: `python -m benchmarks.layer_norm`. Median GB/s of triton.testing.do_bench over the bytes "
        "stated in benchmarks/layer_norm.py (layer_norm fwd 2·N·C·s, fwd+bwd 5·N·C·s; add_layer_norm fwd "
        "4·N·C·s, fwd+bwd 8·N·C·s). speedup = torch eager time / ours.",
        f"Measured device-to-device copy bandwidth: {common.fmt(copy_gbps)} GB/s.",
        "",
    ]
    groups = sorted({(r["kernel"], r["dtype"], r["mode"]) for r in rows if r["metric"] == "time"},
                    key=lambda g: (g[0], list(common.DTYPES).index(g[1]) if g[1] in common.DTYPES else 9, g[2]))
    names = list(dict.fromkeys(r["provider"] for r in rows))
    for kernel, dtype, mode in groups:
        group = [r for r in rows if (r["kernel"], r["dtype"], r["mode"]) == (kernel, dtype, mode)]
        lines += [f"## {kernel}, {dtype}, {mode} (GB/s; ours as fraction of copy)", ""]
        body = []
        for rows_n, hidden in sorted({(r["rows"], r["hidden"]) for r in group}):
            at = [r for r in group if (r["rows"], r["hidden"]) == (rows_n, hidden)]

            def get(provider, metric, at=at):
                return next((r for r in at if r["provider"] == provider and r["metric"] == metric), None)

            cells = []
            for name in names:
                bw, t = get(name, "bandwidth"), get(name, "time")
                cells.append(bw["p50"] if bw else (t["status"] if t else "—"))
            frac = get("ours", "fraction_of_copy")
            ours, torch_t = get("ours", "time"), get("torch", "time")
            speedup = (torch_t["p50"] / ours["p50"]) if ours and torch_t and ours["p50"] and torch_t["p50"] else None
            body.append([f"{rows_n}×{hidden}", *cells, frac["p50"] if frac else None, speedup])
        lines += [common.markdown_table(["rows×hidden", *names, "ours / copy", "speedup"], body), ""]
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
    parser.add_argument("--hidden", nargs="*", type=common.int_at_least(1), default=None)
    parser.add_argument("--rows", type=common.int_at_least(1), default=None, help="rows (tokens); default 16384")
    parser.add_argument("--output_dir", default=None, help="default: benchmarks/results/<device>/")
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
    csv_path = out_dir / "layer_norm.csv"
    copy_gbps = copy_bandwidth(args.quick)
    results = common.read_csv(csv_path, SHAPE_FIELDS)
    if copy_gbps:
        copy_row = dict(benchmark="layer_norm", kernel="copy", provider="torch", mode="copy", dtype="fp32",
                        metric="bandwidth", unit="GB/s", p50=copy_gbps, status="ok", **env)
        results = common.save_rows([copy_row], csv_path, SHAPE_FIELDS, POINT_FIELDS)
    for kernel in ("layer_norm", "add_layer_norm"):
        for hidden in hiddens:
            for dtype_name in dtypes:
                # A fresh torch.compile per point: one compiled function across every shape, dtype and
                # grad mode would pass Dynamo's recompile limit and silently fall back to eager.
                torch._dynamo.reset()
                table = providers(kernel, args.quick)
                point = run_point(kernel, rows_n, hidden, dtype_name, table, env, args.quick, device, copy_gbps)
                results = common.save_rows(point, csv_path, SHAPE_FIELDS, POINT_FIELDS)
                summary = ", ".join(f"{r['provider']} {r['mode']} {r['p50']:.0f}" for r in point
                                    if r["metric"] == "bandwidth")
                print(f"{kernel} {rows_n}x{hidden} {dtype_name}: GB/s {summary}", file=sys.stderr)
    print(common.write_summary("layer_norm", results, out_dir, summarize))
    return 0


if __name__ == "__main__":
    sys.exit(main())
