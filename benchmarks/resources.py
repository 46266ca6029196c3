"""What each autotune config costs on a Hopper GPU, read off the compiler: no GPU needed.

Triton compiles for a GPU it does not have. This compiles every kernel in `gpt2_kernels/` with every
config of its autotune list for sm_90 and reports what ptxas says: registers per thread, bytes
spilled to local memory, the shared memory Triton asks for, and whether the matrix products became
Hopper's warpgroup MMA (HGMMA in the SASS) or the older HMMA. A config that spills or needs more
shared memory than an SM has costs autotuning time and is unlikely to win: it is the first to cut,
before any timing. Registers are not speed: only the benchmarks say which config is fastest.

    python -m benchmarks.resources                 # attention at D=64, 128, 256; LayerNorm at 768, 1600, 8192
    python -m benchmarks.resources --out benchmarks/results/compiler
    GPT2_SUITE_AUTOTUNE=short python -m benchmarks.resources --time --width 64 --width 768
        # seconds per compile, one at a time in a fresh cache: what a first GPU call's autotuning
        # spends compiling (the short lists; unset the variable for the full ones)

Needs a Triton build with the NVIDIA backend (the Linux wheels) and must run without
TRITON_INTERPRET. Also used by the tests' compile checks (`compile_kernel`).
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if not __package__:  # run as a file (python benchmarks/resources.py): the checkout goes on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common
from gpt2.errors import ArgumentParser, InputError, bounded_int, exit_on_input_error

# Runtime (non-constexpr) arguments of our kernels that are not tensors; strides are i32 too.
SCALAR_TYPES = {
    "H": "i32", "T": "i32", "T_BUCKET": "i32", "M": "i32", "N": "i32", "rows_per_program": "i32", "programs": "i32",
    "qk_scale": "fp32", "softmax_scale": "fp32", "eps": "fp32",
}
# Tensor arguments that are fp32 whatever the input dtype (statistics and partial sums).
FP32_POINTERS = {"LSE", "DELTA", "MEAN", "RSTD", "DW_PARTIAL", "DB_PARTIAL"}
SMEM_PER_BLOCK = {90: 227 * 1024, 80: 163 * 1024}  # opt-in maximum per block (CUDA guide)


def _nvidia_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_kernel(kernel, constexprs: dict, dtype: str, cc: int = 90, num_warps: int = 4, num_stages: int = 3):
    """Compile a (possibly autotuned) @triton.jit kernel for compute capability `cc` without a GPU.
    `dtype` ("bf16", "fp16", "fp32") types every tensor argument except FP32_POINTERS. Pointers
    and i32 arguments are marked 16-divisible, as Triton's launch-time specialisation would mark
    them for contiguous inputs whose sizes are multiples of 16 (real launches differ where an
    argument is not, e.g. H=12: close enough for a resource report)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_kernel needs the real compiler: run without TRITON_INTERPRET=1")
    fn = kernel.fn if hasattr(kernel, "configs") else kernel  # unwrap the autotuner
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.startswith("stride"):
            signature[name] = "i32"
        elif name in SCALAR_TYPES:
            signature[name] = SCALAR_TYPES[name]
        else:
            signature[name] = "*fp32" if name in FP32_POINTERS else "*" + dtype
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name][0] == "*" or signature[name] == "i32"}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages)
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


def resource_usage(compiled) -> dict:
    """ptxas's report for a compiled kernel, plus its SASS's matrix and local-memory instructions."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp, "kernel.cubin")
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_nvidia_tool("cuobjdump"), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    return {
        "registers": regs,
        "stack_bytes": stack,  # ptxas puts spills on the stack frame: > 0 means local-memory traffic
        "local_ops": len(re.findall(r"\b(?:LDL|STL)\b", sass)),
        "shared_bytes": compiled.metadata.shared,
        "hgmma": len(re.findall(r"\bHGMMA\b", sass)),
        "hmma": len(re.findall(r"\bHMMA\b", sass)),
    }


# (module, kernel) -> the constexpr flags it is compiled with here, besides its tile config.
KERNELS = {
    ("attention", "_attn_fwd_kernel"): {},
    ("attention", "_attn_bwd_dkdv_kernel"): {},
    ("attention", "_attn_bwd_dq_kernel"): {},
    ("layer_norm", "_layer_norm_fwd_kernel"): {"HAS_RESIDUAL": True, "HAS_BIAS": True},
    ("layer_norm", "_layer_norm_bwd_kernel"): {"HAS_DRESIDUAL": True, "HAS_BIAS": True},
}


def _kernel(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(f"gpt2_kernels.{module}"), name)


def _tried_configs(kernel, **args):
    """The configs the autotuner would time for these arguments: its list after early pruning."""
    prune = getattr(kernel, "early_config_prune", None)
    return prune(kernel.configs, args) if prune else kernel.configs


def jobs(family: str | None, dtype: str = "bf16", widths: list[int] | None = None):
    """(label, job) for every (kernel, shape, config) the autotuner would try at the long-sequence
    bucket: attention at D = 64, 128, 256, causal and not; LayerNorm at GPT-2 small and XL widths
    and 8192 (only those in `widths`, when given)."""
    import triton

    for (module, name), flags in KERNELS.items():
        if family not in (None, module):
            continue
        kernel = _kernel(module, name)
        if module == "attention":  # (width, constexprs, the autotuner's prune arguments)
            # Without document_ids, as a plain launch passes them (HAS_DOCS off, no bounds tensors).
            shapes = [(d, dict(N_REP=1, HEAD_DIM=d, BLOCK_D=d, CAUSAL=causal, DOT_PRECISION="tf32", HAS_DOCS=False,
                               DOC_START=None, DOC_END=None),
                       dict(T_BUCKET=16384, BLOCK_D=d)) for d in (64, 128, 256) for causal in (True, False)]
        else:
            shapes = [(n, dict(BLOCK_N=triton.next_power_of_2(n), **flags), dict(BLOCK_N=triton.next_power_of_2(n)))
                      for n in (768, 1600, 8192)]
        for width, shape, prune_args in shapes:
            if widths and width not in widths:
                continue
            for config in _tried_configs(kernel, **prune_args):
                tile = "x".join(str(v) for v in config.kwargs.values())
                if module == "layer_norm":
                    tile = f"rows={tile}"
                label = dict(kernel=name.strip("_").removesuffix("_kernel"), width=width,
                             causal=shape.get("CAUSAL", ""), dtype=dtype, tile=tile,
                             warps=config.num_warps, stages=config.num_stages)
                yield label, (module, name, {**shape, **config.kwargs}, dtype, config.num_warps, config.num_stages)


def _compile_job(job) -> dict:
    module, name, constexprs, dtype, num_warps, num_stages = job
    try:
        kernel = _kernel(module, name)
        start = time.perf_counter()
        compiled = compile_kernel(kernel, constexprs, dtype, 90, num_warps, num_stages)
        return {**resource_usage(compiled), "compile_s": time.perf_counter() - start}
    except Exception as e:  # an invalid config (e.g. out of shared memory at compile time) is a result too
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}


def main(argv=None) -> int:
    with exit_on_input_error("benchmarks.resources"):
        return run(parse_args(argv))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=common.writable_dir, help="also write resources.md there")
    parser.add_argument("--jobs", type=bounded_int(1), default=os.cpu_count() or 1)
    parser.add_argument("--only", choices=["attention", "layer_norm"], help="one kernel family")
    parser.add_argument("--width", type=int, action="append",
                        help="only this head dim (attention) or row size (LayerNorm); repeatable")
    parser.add_argument("--time", action="store_true",
                        help="compile one config at a time (--jobs 1) in a fresh Triton cache and report the "
                             "seconds each compile takes, and their sum per kernel")
    return parser.parse_args(argv)


def run(args) -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise InputError("benchmarks.resources compiles for a real GPU: unset TRITON_INTERPRET")
    if not os.path.exists(_nvidia_tool("cuobjdump")):
        print("this Triton build has no NVIDIA backend (cuobjdump); nothing to report", file=sys.stderr)
        return 0

    import triton

    todo = list(jobs(args.only, widths=args.width))
    with tempfile.TemporaryDirectory() as fresh_cache:
        if args.time:  # no cache hits, no competing compiles: what one process's autotuning pays
            os.environ["TRITON_CACHE_DIR"] = fresh_cache
        with ProcessPoolExecutor(1 if args.time else args.jobs) as pool:
            usages = list(pool.map(_compile_job, [job for _, job in todo]))

    header = ["kernel", "width", "causal", "dtype", "tile", "warps", "stages", "registers", "stack_bytes",
              "local_ops", "shared_KiB", "hgmma", "hmma", "verdict"] + (["compile_s"] if args.time else [])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    lines = [f"Compiled for sm_90 by Triton {triton.__version__} on {date}; no GPU involved. stack_bytes > 0 or "
             f"local_ops > 0: spills to local memory. Shared memory limit per block: "
             f"{SMEM_PER_BLOCK[90] // 1024} KiB.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, _), usage in zip(todo, usages):
        if "error" in usage:
            row = [*label.values(), "", "", "", "", "", "", usage["error"]] + ([""] if args.time else [])
        else:
            verdict = []
            if usage["stack_bytes"] or usage["local_ops"]:
                verdict.append("spills")
            if usage["shared_bytes"] > SMEM_PER_BLOCK[90]:
                verdict.append("too much shared memory")
            row = [*label.values(), usage["registers"], usage["stack_bytes"], usage["local_ops"],
                   round(usage["shared_bytes"] / 1024, 1), usage["hgmma"], usage["hmma"], ", ".join(verdict) or "ok"]
            if args.time:
                row.append(f"{usage['compile_s']:.2f}")
        lines.append("| " + " | ".join(str(v) for v in row) + " |")
    if args.time:
        lines += ["", "| kernel | width | causal | configs | compile seconds |", "|---|---|---|---|---|"]
        totals: dict[tuple, list[float]] = {}
        for (label, _), usage in zip(todo, usages):
            totals.setdefault((label["kernel"], label["width"], label["causal"]), []).append(usage.get("compile_s", 0))
        for (kernel, width, causal), seconds in totals.items():
            lines.append(f"| {kernel} | {width} | {causal} | {len(seconds)} | {sum(seconds):.1f} |")
        lines.append(f"| all | | | {len(usages)} | {sum(u.get('compile_s', 0) for u in usages):.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "resources.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
