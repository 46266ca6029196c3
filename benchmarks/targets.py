"""The performance targets, checked against measured results: one row per target with the numbers
it compares, whether it is met, and the device, date and commit they come from.

    python -m benchmarks.targets                       # every device folder in benchmarks/results/
    python -m benchmarks.targets --results benchmarks/results/nvidia-h100-80gb-hbm3

Prints a Markdown table; the README's performance table is this output. A target whose point
was not measured (or was measured as oom / mismatch) says so rather than passing or failing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/targets.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import attention, common, layer_norm, training
from gpt2.errors import ArgumentParser, InputError, exit_on_input_error

RESULTS = common.ROOT / "benchmarks" / "results"


def _one(csv_rows, /, **match):
    """The single ok row matching every field, or None."""
    found = [r for r in csv_rows if r.get("status") == "ok" and all(r.get(k) == v for k, v in match.items())]
    return found[0] if found else None


def _source(*rows) -> str:
    return ", ".join(dict.fromkeys(f"{r['date']} @ {r['commit']}" for r in rows if r))


def attention_target(rows, mode: str) -> dict:
    """Ours against the fastest SDPA backend, GPT-2 shape T=1024, D=64, causal, bf16."""
    point = dict(kernel="flash_attention", suite="gpt2", T=1024, D=64, causal=1, dtype="bf16", mode=mode,
                 metric="time")
    ours = _one(rows, provider="ours", **point)
    sdpa = [r for r in (_one(rows, provider=p, **point) for p in attention.PROVIDER_ORDER if p.startswith("sdpa-"))
            if r]
    best = min(sdpa, key=lambda r: r["p50"]) if sdpa else None
    ratio = best["p50"] / ours["p50"] if ours and best else None
    measured = (f"ours {ours['p50'] * 1e3:.0f} µs, {best['provider']} {best['p50'] * 1e3:.0f} µs"
                if ratio else None)
    return dict(target=f"attention {mode}, T=1024 D=64 causal bf16: ours / best SDPA speed", value=ratio,
                required=1.0, measured=measured, source=_source(ours, best))


def layer_norm_targets(rows) -> list[dict]:
    point = dict(kernel="layer_norm", hidden=768, dtype="bf16")
    ours, torch_ = (_one(rows, provider=p, mode="fwd+bwd", metric="time", **point) for p in ("ours", "torch"))
    speedup = torch_["p50"] / ours["p50"] if ours and torch_ else None
    # ours' GB/s over that of a copy of x's size and dtype, measured at the same point (layer_norm.copy_row)
    frac = _one(rows, provider="ours", mode="fwd", metric="fraction_of_copy", **point)
    bw = _one(rows, provider="ours", mode="fwd", metric="bandwidth", **point)
    copy = frac and _one(rows, provider="copy", mode="copy", metric="bandwidth", rows=frac["rows"], **point)
    return [
        dict(target="LayerNorm fwd+bwd, hidden 768 bf16: F.layer_norm time / ours", value=speedup, required=1.5,
             measured=f"ours {ours['p50'] * 1e3:.0f} µs, torch {torch_['p50'] * 1e3:.0f} µs" if speedup else None,
             source=_source(ours, torch_)),
        dict(target="LayerNorm fwd, hidden 768 bf16: fraction of copy bandwidth", value=frac and frac["p50"],
             required=0.8, source=_source(frac, copy),
             measured=f"ours {bw['p50']:.0f} GB/s, same-size copy {copy['p50']:.0f} GB/s" if bw and frac and copy
             else None),
    ]


# (faster, baseline, at least): issue 29's targets for GPT-2 124M's training step, side by side in one run
TRAINING_TARGETS = [("triton", "sdpa", 1.0), ("triton+graphs", "sdpa", 1.25), ("triton+graphs", "sdpa+compile", 1.05)]


def training_target(rows, faster: str, baseline: str, required: float) -> dict:
    point = dict(preset="gpt2", metric="tokens_per_s", dtype="bf16")
    base, ours = (_one(rows, provider=p, **point) for p in (baseline, faster))
    ratio = ours["p50"] / base["p50"] if base and ours else None
    return dict(target=f"training GPT-2 124M bf16: tokens/s, {faster} / {baseline}", value=ratio, required=required,
                measured=f"{faster} {ours['p50']:,.0f}, {baseline} {base['p50']:,.0f} tok/s" if ratio else None,
                source=_source(base, ours))


def check(results_dir: Path) -> list[dict]:
    att = common.read_csv(results_dir / "attention.csv", attention.SHAPE_FIELDS)
    ln = common.read_csv(results_dir / "layer_norm.csv", layer_norm.SHAPE_FIELDS)
    tr = common.read_csv(results_dir / "training.csv", training.SHAPE_FIELDS)
    return [attention_target(att, "fwd"), attention_target(att, "fwd+bwd"), *layer_norm_targets(ln),
            *(training_target(tr, *target) for target in TRAINING_TARGETS)]


def render(device: str, targets: list[dict]) -> str:
    body = []
    for t in targets:
        status = "not measured" if t["value"] is None else ("met" if t["value"] >= t["required"] else "missed")
        body.append([t["target"], t["value"], f"≥ {t['required']}", status, t["measured"], t["source"] or None])
    return f"### {device}\n\n" + common.markdown_table(
        ["target", "measured", "required", "status", "numbers", "date @ commit"], body) + "\n"


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.targets"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, nargs="*", help="device folders (default: all under results/)")
    return parser.parse_args(argv)


def run(args) -> int:
    for folder in args.results or []:
        if not folder.is_dir():
            raise InputError(f"no folder {folder}: name a device folder of results, e.g. {RESULTS}/<device>")
    folders = args.results or sorted(p for p in RESULTS.glob("*") if p.is_dir() and any(p.glob("*.csv")))
    if not folders:
        print("no measured results yet: run the benchmarks on a GPU (benchmarks/run_gpu.sh)", file=sys.stderr)
        return 0
    for folder in folders:
        rows = [r for name in ("attention", "layer_norm", "training")
                for r in common.read_csv(folder / f"{name}.csv", [])]
        device = next((r["device"] for r in rows if r.get("device")), folder.name)
        print(render(device, check(folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
