"""End-to-end training: scripts/pretrain.py with --kernels triton against --kernels sdpa.

    python -m benchmarks.training                          # GPT-2 124M (and 355M), seq 1024, bf16, on a GPU
    python -m benchmarks.training --presets gpt2 --steps 50
    python -m benchmarks.training --presets gpt2 --providers sdpa+compile triton+compile   # pretrain.py --compile
    python -m benchmarks.training --presets gpt2 --providers sdpa triton+graphs    # pretrain.py --cuda_graphs
    python -m benchmarks.training --presets gpt2 --providers triton triton+docs sdpa+docs  # --document_masking
    python -m benchmarks.training --presets gpt2 --providers sdpa sdpa+ckpt     # --gradient_checkpointing
    python -m benchmarks.training --quick --output_dir /tmp/b   # a tiny model on CPU (interpreter), CI smoke

Each run is the real pretraining script in its own process (accelerate's bf16 mixed precision),
on the same data with the same seed and the same tokenizer, so the two runs see identical batches
and start from identical weights. From its metrics.jsonl (logged every step) we take the median
tokens/s and MFU over the steps after the first few (compilation, autotuning and allocator warm-up),
the peak memory, and the training loss at every step. Both runs' losses are written side by side;
they should agree to within bf16 noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

if not __package__:  # run as a file (python benchmarks/training.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from gpt2.config import PRESETS, GPT2Config
from gpt2.errors import ArgumentParser, InputError, bounded_int, exit_on_input_error

SHAPE_FIELDS = ["preset", "block_size", "batch_size", "step"]
POINT_FIELDS = ["preset", "block_size", "batch_size", "dtype", "provider"]  # one run's rows, replaced together
WARMUP_STEPS = 5  # excluded from the throughput medians


class Provider(NamedTuple):
    """What one run passes to pretrain.py."""

    kernels: str  # --kernels
    compile: bool = False  # --compile (inductor, through Accelerate)
    graphs: bool = False  # --cuda_graphs (the step captured once, replayed)
    documents: bool = False  # --document_masking (sdpa: a dense mask)
    recompute: bool = False  # --gradient_checkpointing (activation memory against time)


# --providers picks from these (default: the two eager, unmasked ones)
PROVIDERS = {"sdpa": Provider("sdpa"), "triton": Provider("triton"),
             "sdpa+compile": Provider("sdpa", compile=True), "triton+compile": Provider("triton", compile=True),
             "sdpa+graphs": Provider("sdpa", graphs=True), "triton+graphs": Provider("triton", graphs=True),
             "sdpa+docs": Provider("sdpa", documents=True), "triton+docs": Provider("triton", documents=True),
             "sdpa+ckpt": Provider("sdpa", recompute=True), "triton+ckpt": Provider("triton", recompute=True)}
# (a, b): b's tokens/s over a's, and the two runs' largest loss difference where they train the same model
RATIOS = [("sdpa", "triton"), ("sdpa", "triton+graphs"), ("sdpa+compile", "triton+graphs"), ("sdpa", "sdpa+graphs"),
          ("sdpa", "sdpa+compile"), ("sdpa+compile", "triton+compile"), ("sdpa+docs", "triton+docs"),
          ("triton", "triton+docs"), ("sdpa", "sdpa+ckpt"), ("triton", "triton+ckpt")]


def pretrain_command(args, preset: str, provider: str, out_dir: Path, tokenizer: Path | None) -> list[str]:
    run = PROVIDERS[provider]
    cmd = [
        sys.executable, str(common.ROOT / "scripts" / "pretrain.py"),
        "--config_name", preset, "--kernels", run.kernels, "--output_dir", str(out_dir),
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--logging_steps", "1", "--eval_steps", str(10 * args.steps),
        "--max_eval_samples", str(args.batch_size), "--learning_rate", "6e-4", "--min_lr", "6e-5",
        "--num_warmup_steps", str(max(1, args.steps // 10)), "--seed", "1234", "--sample_tokens", "8",
        "--vocab_size", str(args.vocab_size),
    ]
    flags = {"--compile": run.compile, "--cuda_graphs": run.graphs, "--document_masking": run.documents,
             "--gradient_checkpointing": run.recompute}
    cmd += [flag for flag, wanted in flags.items() if wanted]
    cmd += ["--config_overrides", model_overrides(preset, args.config_overrides)]
    if tokenizer is not None:
        cmd += ["--tokenizer_name", str(tokenizer)]
    return cmd


def model_overrides(preset: str, overrides: str | None) -> str:
    """--config_overrides with the preset's own vocabulary pinned: the model keeps its 50,257-way
    softmax (GPT-2 124M's 124,439,808 parameters) whatever size the BPE trained on the built-in
    corpus reaches (about 16k tokens), which would otherwise set the vocabulary."""
    if overrides and "vocab_size" in overrides:
        return overrides
    return ",".join(filter(None, [f"vocab_size={GPT2Config.from_preset(preset).vocab_size}", overrides]))


def model_config(preset: str, overrides: str | None) -> GPT2Config:
    return GPT2Config.from_preset(preset).with_overrides(model_overrides(preset, overrides))


def sdpa_backend_of(args, preset: str, provider: str, env: dict) -> str | None:
    """The SDPA backend a provider's attention calls run on (None where attention isn't SDPA's):
    one call at the run's shape and dtype, with the dense document mask for +docs."""
    kernels, documents = PROVIDERS[provider].kernels, PROVIDERS[provider].documents
    if kernels != "sdpa":
        return None
    import torch

    config = model_config(preset, args.config_overrides)
    device = "cpu" if env["device"].startswith("cpu") else "cuda"
    dtype = torch.float32 if args.quick else torch.bfloat16
    q = torch.randn(args.batch_size, config.n_head, args.block_size, config.head_dim, device=device, dtype=dtype)
    mask = torch.ones(args.block_size, args.block_size, device=device, dtype=torch.bool).tril() if documents else None
    return common.sdpa_backend(q, q, q, attn_mask=mask, is_causal=mask is None)


def parameters(preset: str, overrides: str | None) -> int:
    """The trained model's parameter count (built on the meta device: shapes, no memory)."""
    import torch

    from gpt2 import GPT2

    with torch.device("meta"):
        return GPT2(model_config(preset, overrides)).num_parameters()


def run_one(args, preset, provider, out_dir, tokenizer, log_dir):
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="no" if args.quick else "bf16", PYTHONUNBUFFERED="1")
    if args.quick:
        env["TRITON_INTERPRET"] = "1"
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cmd = pretrain_command(args, preset, provider, out_dir, tokenizer)
    log = log_dir / f"training_{preset}_{provider.replace('+', '_')}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT)
    records = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return proc.returncode, [r for r in records if "train_loss" in r and "tokens_per_s" in r], log


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.training"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps on CPU")
    parser.add_argument("--presets", nargs="*", default=None, choices=list(PRESETS),
                        help="default: gpt2 gpt2-medium (--quick: gpt2-tiny, shrunk)")
    parser.add_argument("--steps", type=bounded_int(1), default=None)
    parser.add_argument("--block_size", type=bounded_int(2), default=None,
                        help="tokens per sequence, 2 at least (an input and its target)")
    parser.add_argument("--batch_size", type=bounded_int(1), default=None, help="per device")
    parser.add_argument("--vocab_size", type=bounded_int(257), default=None,
                        help="the BPE trained on the built-in corpus (the model keeps its preset's vocabulary)")
    parser.add_argument("--config_overrides", default=None)
    parser.add_argument("--providers", nargs="+", choices=list(PROVIDERS), default=["sdpa", "triton"],
                        help="runs to make; +compile: pretrain.py --compile, +graphs: --cuda_graphs")
    parser.add_argument("--output_dir", type=common.writable_dir, default=None)
    parser.add_argument("--replot", action="store_true", help="measure nothing: rewrite training.md from the CSV")
    return parser.parse_args(argv)


def run(args) -> int:
    if args.replot:
        return common.replot(args.output_dir, "training", SHAPE_FIELDS, summarize)
    env, out_dir = common.start_run(args.quick, args.output_dir)
    if args.quick:
        args.presets = args.presets or ["gpt2-tiny"]
        args.config_overrides = args.config_overrides or "n_layer=1,n_embd=32,n_head=2,n_positions=32"
        args.steps, args.block_size = args.steps or 3, args.block_size or 32
        args.batch_size, args.vocab_size = args.batch_size or 2, args.vocab_size or 300
    else:
        args.presets = args.presets or ["gpt2", "gpt2-medium"]
        args.steps, args.block_size = args.steps or 40, args.block_size or 1024
        args.batch_size, args.vocab_size = args.batch_size or 16, args.vocab_size or 50257
    for preset in args.presets:  # a bad --config_overrides is refused before any run
        try:
            model_config(preset, args.config_overrides)
        except InputError as err:
            raise InputError(f"--config_overrides {args.config_overrides}: {err}") from None
    work = out_dir / "training_runs"
    work.mkdir(parents=True, exist_ok=True)

    csv_path = out_dir / "training.csv"
    rows = common.read_csv(csv_path, SHAPE_FIELDS)
    failed = 0
    for preset in args.presets:
        tokenizer = None
        for provider in args.providers:
            run_dir = work / f"{preset}_{provider.replace('+', '_')}"
            code, records, log = run_one(args, preset, provider, run_dir, tokenizer, work)
            base = dict(benchmark="training", kernel="gpt2_train_step", provider=provider, mode="fwd+bwd+step",
                        dtype="fp32" if args.quick else "bf16", preset=preset, block_size=args.block_size,
                        batch_size=args.batch_size, sdpa_backend=sdpa_backend_of(args, preset, provider, env), **env)
            if code != 0 or not records:
                tail = log.read_text()[-300:].replace("\n", " ")
                status = "oom" if "out of memory" in tail.lower() else "error"
                rows = common.save_rows([dict(base, metric="tokens_per_s", unit="tok/s", status=status, note=tail)],
                                        csv_path, SHAPE_FIELDS, POINT_FIELDS)
                print(f"{preset} {provider}: {status} (log {log})", file=sys.stderr)
                failed += 1
                continue
            tokenizer = tokenizer or run_dir  # the second run reuses the first one's tokenizer
            steady = records[WARMUP_STEPS:] if len(records) > WARMUP_STEPS else records
            tps = sorted(r["tokens_per_s"] for r in steady)
            mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
            run_rows = [
                dict(base, metric="parameters", unit="", status="ok", p50=parameters(preset, args.config_overrides)),
                dict(base, metric="tokens_per_s", unit="tok/s", status="ok", p50=statistics.median(tps),
                     p20=tps[int(0.2 * (len(tps) - 1))], p80=tps[int(0.8 * (len(tps) - 1))]),
                dict(base, metric="mfu", unit="", status="ok" if mfu else "n/a",
                     p50=statistics.median(mfu) if mfu else None),
                dict(base, metric="peak_memory", unit="", status="ok", note=records[-1].get("peak_memory")),
            ]
            run_rows += [dict(base, step=r["step"], metric="train_loss", unit="nats", p50=r["train_loss"], status="ok")
                         for r in records]
            rows = common.save_rows(run_rows, csv_path, SHAPE_FIELDS, POINT_FIELDS)

    print(common.write_summary("training", rows, out_dir, summarize))
    if failed == len(args.presets) * len(args.providers):
        print("every training run failed: see the logs above", file=sys.stderr)
        return 1
    return 0


def summarize(rows, out_dir) -> str:
    """Markdown: tokens/s, MFU and peak memory per preset and kernels, triton / sdpa, and the largest
    difference between the two runs' losses at the same step."""
    device = rows[0]["device"] if rows else "no rows"
    lines = [f"# End-to-end training — {device}", "", common.stamp(rows)]
    body = []
    for preset, block_size, batch_size, dtype in dict.fromkeys(
        (r["preset"], r["block_size"], r["batch_size"], r["dtype"]) for r in rows
    ):
        at = [r for r in rows if (r["preset"], r["block_size"], r["batch_size"], r["dtype"])
              == (preset, block_size, batch_size, dtype)]

        def get(provider, metric, at=at):
            return next((r for r in at if r["provider"] == provider and r["metric"] == metric), None)

        losses = {k: {r["step"]: r["p50"] for r in at if r["provider"] == k and r["metric"] == "train_loss"}
                  for k in PROVIDERS}
        steps = max((max(v) for v in losses.values() if v), default=0)
        for provider in PROVIDERS:
            tps = get(provider, "tokens_per_s")
            if tps and tps["status"] != "ok":
                body.append([f"{preset} ({batch_size}×{block_size}, {dtype})", provider, tps["status"], None, None])
            elif tps:
                mfu, peak, params = get(provider, "mfu"), get(provider, "peak_memory"), get(provider, "parameters")
                size = f"{int(float(params['p50'])):,} parameters, " if params else ""
                backend = f" ({tps['sdpa_backend']})" if tps.get("sdpa_backend") else ""
                body.append([f"{preset} ({size}{batch_size}×{block_size}, {dtype}, {steps} steps)",
                             provider + backend, tps["p50"], mfu["p50"] if mfu else None,
                             peak["note"] if peak else None])
        for first, second in RATIOS:
            a, b = get(first, "tokens_per_s"), get(second, "tokens_per_s")
            if a and b and a["status"] == b["status"] == "ok":
                note = None
                if PROVIDERS[first].documents == PROVIDERS[second].documents:  # the same model: the losses should agree
                    la, lb = losses[first], losses[second]
                    both = sorted(set(la) & set(lb))
                    diff = max((abs(la[s] - lb[s]) for s in both), default=float("nan"))
                    note = f"max loss difference {diff:.4f} over {len(both)} steps"
                body.append([preset, f"{second} / {first}", b["p50"] / a["p50"], None, note])
    lines += [
        f"Command: `python -m benchmarks.training`: scripts/pretrain.py, --kernels sdpa then triton, same data, "
        f"seed and tokenizer; medians over the steps after the first {WARMUP_STEPS}. +compile: --compile; "
        "+docs: --document_masking (attention within each packed document); +ckpt: --gradient_checkpointing "
        "(every block recomputed in backward). sdpa rows name the backend SDPA picked at that shape; the "
        "model keeps its preset's vocabulary (50,257 for GPT-2) whatever the size of the BPE trained for the run.",
        "",
        common.markdown_table(["run", "kernels", "tokens/s", "MFU", "peak memory"], body), "",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
