"""End-to-end training: scripts/pretrain.py with --kernels triton against --kernels sdpa.

    python -m benchmarks.training                          # GPT-2 124M (and 355M), seq 1024, bf16, on a GPU
    python -m benchmarks.training --presets gpt2 --steps 50
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

from benchmarks import common

SHAPE_FIELDS = ["preset", "block_size", "batch_size", "step"]
WARMUP_STEPS = 5  # excluded from the throughput medians


def pretrain_command(args, preset: str, kernels: str, out_dir: Path, tokenizer: Path | None) -> list[str]:
    cmd = [
        sys.executable, str(common.ROOT / "scripts" / "pretrain.py"),
        "--config_name", preset, "--kernels", kernels, "--output_dir", str(out_dir),
        "--block_size", str(args.block_size), "--per_device_train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--logging_steps", "1", "--eval_steps", str(10 * args.steps),
        "--max_eval_samples", str(args.batch_size), "--learning_rate", "6e-4", "--min_lr", "6e-5",
        "--num_warmup_steps", str(max(1, args.steps // 10)), "--seed", "1234", "--sample_tokens", "8",
        "--vocab_size", str(args.vocab_size),
    ]
    if args.config_overrides:
        cmd += ["--config_overrides", args.config_overrides]
    if tokenizer is not None:
        cmd += ["--tokenizer_name", str(tokenizer)]
    return cmd


def run_one(args, preset, kernels, out_dir, tokenizer, log_dir):
    env = dict(os.environ, ACCELERATE_MIXED_PRECISION="no" if args.quick else "bf16", PYTHONUNBUFFERED="1")
    if args.quick:
        env["TRITON_INTERPRET"] = "1"
    shutil.rmtree(out_dir, ignore_errors=True)  # metrics.jsonl appends: start clean
    cmd = pretrain_command(args, preset, kernels, out_dir, tokenizer)
    log = log_dir / f"training_{preset}_{kernels}.log"
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=common.ROOT)
    records = []
    metrics = out_dir / "metrics.jsonl"
    if metrics.exists():
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return proc.returncode, [r for r in records if "train_loss" in r and "tokens_per_s" in r], log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model for a few steps on CPU")
    parser.add_argument("--presets", nargs="*", default=None, help="default: gpt2 gpt2-medium")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--block_size", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=None, help="per device")
    parser.add_argument("--vocab_size", type=int, default=None, help="BPE trained on the built-in corpus")
    parser.add_argument("--config_overrides", default=None)
    parser.add_argument("--output_dir", default=None)
    args = parser.parse_args(argv)
    common.setup_quick_mode(args.quick)
    if not common.require_cuda_or_quick(args.quick, "benchmarks.training"):
        return 0
    if args.quick:
        args.presets = args.presets or ["gpt2-tiny"]
        args.config_overrides = args.config_overrides or "n_layer=1,n_embd=32,n_head=2,n_positions=32"
        args.steps, args.block_size = args.steps or 3, args.block_size or 32
        args.batch_size, args.vocab_size = args.batch_size or 2, args.vocab_size or 300
    else:
        args.presets = args.presets or ["gpt2", "gpt2-medium"]
        args.steps, args.block_size = args.steps or 40, args.block_size or 1024
        args.batch_size, args.vocab_size = args.batch_size or 16, args.vocab_size or 50257
    env = common.environment()
    out_dir = common.output_dir(args.output_dir, env, args.quick)
    work = out_dir / "training_runs"
    work.mkdir(parents=True, exist_ok=True)

    rows, summary = [], []
    for preset in args.presets:
        tokenizer, losses, stats = None, {}, {}
        for kernels in ("sdpa", "triton"):
            run_dir = work / f"{preset}_{kernels}"
            code, records, log = run_one(args, preset, kernels, run_dir, tokenizer, work)
            base = dict(benchmark="training", kernel="gpt2_train_step", provider=kernels, mode="fwd+bwd+step",
                        dtype="fp32" if args.quick else "bf16", preset=preset, block_size=args.block_size,
                        batch_size=args.batch_size, **env)
            if code != 0 or not records:
                tail = log.read_text()[-300:].replace("\n", " ")
                status = "oom" if "out of memory" in tail.lower() else "error"
                rows.append(dict(base, metric="tokens_per_s", unit="tok/s", status=status, note=tail))
                print(f"{preset} {kernels}: {status} (log {log})", file=sys.stderr)
                continue
            tokenizer = tokenizer or run_dir  # the second run reuses the first one's tokenizer
            steady = records[WARMUP_STEPS:] if len(records) > WARMUP_STEPS else records
            tps = sorted(r["tokens_per_s"] for r in steady)
            mfu = [r["mfu"] for r in steady if r.get("mfu") is not None]
            stats[kernels] = dict(
                tokens_per_s=statistics.median(tps),
                mfu=statistics.median(mfu) if mfu else None,
                peak=records[-1].get("peak_memory"),
            )
            rows.append(dict(base, metric="tokens_per_s", unit="tok/s", status="ok", p50=statistics.median(tps),
                             p20=tps[int(0.2 * (len(tps) - 1))], p80=tps[int(0.8 * (len(tps) - 1))]))
            rows.append(dict(base, metric="mfu", unit="", status="ok" if mfu else "n/a",
                             p50=stats[kernels]["mfu"]))
            rows.append(dict(base, metric="peak_memory", unit="", status="ok", note=stats[kernels]["peak"]))
            losses[kernels] = {r["step"]: r["train_loss"] for r in records}
            rows += [dict(base, step=s, metric="train_loss", unit="nats", p50=v, status="ok")
                     for s, v in sorted(losses[kernels].items())]
        if len(losses) == 2:
            common_steps = sorted(set(losses["sdpa"]) & set(losses["triton"]))
            diff = max(abs(losses["sdpa"][s] - losses["triton"][s]) for s in common_steps)
            stats["max_loss_diff"] = diff
        summary.append((preset, stats))

    common.write_csv(rows, out_dir / "training.csv", SHAPE_FIELDS)
    lines = [f"# End-to-end training — {env['device']}", "",
             f"{env['date']}, torch {env['torch']}, triton {env['triton']}, commit {env['commit']}.",
             f"Command: `python -m benchmarks.training`; {args.steps} steps of {args.batch_size} x {args.block_size} "
             f"tokens per device, {'fp32 (quick)' if args.quick else 'bf16 mixed precision'}; medians over steps "
             f"after the first {WARMUP_STEPS}.", ""]
    body = []
    for preset, stats in summary:
        for kernels in ("sdpa", "triton"):
            s = stats.get(kernels)
            if s:
                body.append([preset, kernels, s["tokens_per_s"], s["mfu"], s["peak"]])
        if "sdpa" in stats and "triton" in stats:
            body.append([preset, "triton / sdpa", stats["triton"]["tokens_per_s"] / stats["sdpa"]["tokens_per_s"],
                         None, f"max loss difference {stats['max_loss_diff']:.4f}"])
    lines += [common.markdown_table(["preset", "kernels", "tokens/s", "MFU", "peak memory"], body), ""]
    text = "\n".join(lines) + "\n"
    (out_dir / "training.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
