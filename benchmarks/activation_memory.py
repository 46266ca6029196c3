"""Activation checkpointing (--gradient_checkpointing) on the CPU: the memory one forward+backward
needs above the weights and gradients, and its time, with and without recomputing each block.

    python -m benchmarks.activation_memory                       # GPT-2 124M, batch 4 x 256, fp32
    python -m benchmarks.activation_memory --preset gpt2-medium --batch_size 2

Each setting runs in a fresh process, so the process's peak resident memory (ru_maxrss) is that
step's own: gradients are allocated before the baseline is read, and what the step adds above it
is the activations kept for backward plus the temporaries of the largest operation (the loss over
the vocabulary among them). A CPU has no allocator statistics like CUDA's; resident memory is the
honest measure it has. Writes activation_memory.md under results/<device>/ (or --output_dir).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if not __package__:  # run as a file: the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from gpt2.config import PRESETS
from gpt2.errors import ArgumentParser, bounded_int, exit_on_input_error

# One step in a fresh interpreter: prints {"peak_mib": ..., "seconds": ...}.
STEP = """
import json, os, resource, sys, time
import torch
from gpt2 import GPT2
from gpt2.config import GPT2Config
preset, batch, seq, recompute = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
torch.manual_seed(0)
config = GPT2Config.from_name_or_path(preset)
model = GPT2(config).set_kernels("sdpa", "torch")
if recompute:
    model.gradient_checkpointing_enable()
ids = torch.randint(0, config.vocab_size, (batch, seq))
for p in model.parameters():
    p.grad = torch.zeros_like(p)
base = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')  # resident now
start = time.perf_counter()
model(ids, labels=ids).backward()
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"peak_mib": (peak - base) / 2**20, "seconds": seconds}))
"""


def measure(preset: str, batch: int, seq: int, recompute: bool) -> dict:
    proc = subprocess.run([sys.executable, "-c", STEP, preset, str(batch), str(seq), str(int(recompute))],
                          capture_output=True, text=True, cwd=common.ROOT, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.activation_memory"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), default="gpt2")
    parser.add_argument("--batch_size", type=bounded_int(1), default=4)
    parser.add_argument("--seq_len", type=bounded_int(2), default=256)
    parser.add_argument("--repeats", type=bounded_int(1), default=2, help="runs of each setting")
    parser.add_argument("--output_dir", type=common.writable_dir,
                        help="where activation_memory.md goes (default results/<device>/)")
    return parser.parse_args(argv)


def run(args) -> int:
    env = common.environment()
    out_dir = common.output_dir(args.output_dir, env, quick=False)
    rows, runs = [], {}
    for recompute in (False, True):
        found = [measure(args.preset, args.batch_size, args.seq_len, recompute) for _ in range(args.repeats)]
        runs[recompute] = (min(r["peak_mib"] for r in found), min(r["seconds"] for r in found))
    (plain_mib, plain_s), (ckpt_mib, ckpt_s) = runs[False], runs[True]
    rows = [["without", plain_mib, plain_s], ["--gradient_checkpointing", ckpt_mib, ckpt_s],
            ["saved / cost", f"{plain_mib - ckpt_mib:.0f} MiB ({1 - ckpt_mib / plain_mib:.0%} of the step's peak)",
             f"{ckpt_s / plain_s:.2f}x the time"]]
    table = common.markdown_table(["setting", "peak above weights and gradients (MiB)", "fwd+bwd (s)"], rows)
    text = "\n".join([
        f"# Activation checkpointing — {env['device']}", "", common.stamp([env]), "",
        f"Command: `python -m benchmarks.activation_memory --preset {args.preset} --batch_size {args.batch_size} "
        f"--seq_len {args.seq_len}`: one fp32 forward+backward of {args.preset} on {args.batch_size} x "
        f"{args.seq_len} tokens, each setting in a fresh process, the smaller of {args.repeats} runs.", "",
        table, ""])
    out_dir.mkdir(parents=True, exist_ok=True)
    common.atomic_write_text(out_dir / "activation_memory.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
