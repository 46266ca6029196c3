#!/usr/bin/env bash
# One GPU call (a lent H200: 15 minutes of device time in all, machine start included), as phases
# ordered by value that each stop at their own time limit, so the call always ends with its
# results packed:
#
#   GIT_COMMIT=$(git describe --always --dirty) bash benchmarks/run_gpu.sh          # the plan (~8 minutes)
#   GIT_COMMIT=... bash benchmarks/run_gpu.sh tests attention-gpt2                  # chosen phases only
#
# The plan, in order (what each phase may take, BUDGET_SECONDS=480 in all):
#   training-gpt2     GPT-2 124M training, side by side in one run: sdpa eager, triton eager,
#                     triton + CUDA graphs, sdpa + CUDA graphs, sdpa + torch.compile (last: its
#                     compile is the longest; each provider's rows are saved when it ends)  (270 s)
#   overhead          the host's cost per call of our ops against PyTorch's                   (75 s)
#   tests             the CUDA correctness tests at real sizes (pytest -m requires_cuda),
#                     the captured training step against eager's among them               (110 s)
#   attention-target  attention at the target point: GPT-2 shape, T=1024, causal, bf16, fwd and
#                     fwd+bwd against every SDPA backend                                      (110 s)
#   layer_norm-768    LayerNorm and add+LayerNorm at hidden 768, 16k rows, bf16               (80 s)
#   fsdp              a 1-process FSDP2 run of GPT-2 124M (accelerate_fsdp2.yaml, bf16): Accelerate's
#                     own FSDP selection, sharded saves, the gathered final model and sample;
#                     then a resume from its step_10, losses compared                         (150 s)
#   attention-documents  document-masked attention (the documents suite: ours, FlexAttention,
#                     SDPA's dense mask) at GPT-2 shapes, T=1024, 4096, 8192, bf16            (120 s)
#   training-documents   the GPT-2 124M step with --document_masking, triton and sdpa        (100 s)
#   training-compile  triton + torch.compile (sdpa + compile ran in training-gpt2)          (what is left)
#   attention-gpt2    attention at every GPT-2 shape, bf16, causal and not                    (what is left)
#   layer_norm        the whole LayerNorm sweep                                               (what is left)
# Other phases, by name: attention (every suite and dtype), training (GPT-2 124M and 355M).
#
# Compile and autotune time: GPT2_SUITE_AUTOTUNE=short (the default here) gives the autotuner 3-4
# configs per head-dim class instead of the full lists; TRITON_CACHE_DIR is .triton_cache/, packed
# into $OUT/triton_cache.tar.gz and unpacked again when a later call carries .triton_cache.tar.gz
# (the run says how many compiled kernels it found there and how many it added);
# TRITON_CACHE_AUTOTUNING=1 keeps autotune results across processes, TRITON_PRINT_AUTOTUNING=1
# writes each key's chosen config into the phase logs.
#
# Results merge into benchmarks/results/<device>/ (a provider measured again at a point replaces
# its old rows; the summaries are rebuilt from everything there) and, after every phase, are
# packed with the logs into $OUT/results.tar.gz: untar it in the repository root and commit.
# Two calls made without untarring in between each pack only their own points:
# `python -m benchmarks.merge_results DIR...` merges them here.
#
# BUDGET_SECONDS (default 480) bounds the phases, leaving the 600-second command limit room to
# pack; with less device time left than that, set it to what is left minus about 90. A phase with
# under 45 s left is skipped (phases.txt says). Exit status: 1 if a phase failed (other than by
# its time limit) or datasets is missing.
#
# The device image has no `datasets`: benchmarks/fetch_gpu_wheels.sh puts the wheels in .whl/
# here; name .whl in the call's carry and they are installed below when missing.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-run}"
logs=benchmarks/results/logs  # packed into the tarball: the device returns at most 8 files
mkdir -p "$out" "$logs"
: >"$out/phases.txt"
deadline=$((SECONDS + ${BUDGET_SECONDS:-480}))
failed=0
note() { echo "$*" | tee -a "$out/phases.txt"; }

[[ -n ${GIT_COMMIT:-} ]] || note "warning: GIT_COMMIT is unset; rows will name commit 'unknown' (no .git here)"

export GPT2_SUITE_AUTOTUNE=${GPT2_SUITE_AUTOTUNE:-short} TRITON_CACHE_DIR="$PWD/.triton_cache"
export TRITON_CACHE_AUTOTUNING=1 TRITON_PRINT_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
[[ -f .triton_cache.tar.gz ]] && tar -xzf .triton_cache.tar.gz
cached_before=$(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l)
note "triton cache: $cached_before compiled kernels carried in; autotune lists: $GPT2_SUITE_AUTOTUNE"

if ! python3 -c "import datasets" 2>/dev/null && ls .whl/datasets-*.whl >/dev/null 2>&1; then
    # datasets, dill and multiprocess always; pyarrow and fsspec only where the image's version is
    # outside what datasets 5.2 asks for.
    wheels=$(python3 - <<'EOF'
import glob, importlib.metadata as md
from packaging.version import Version
need = {"pyarrow": (Version("24.0.0"), None), "fsspec": (Version("2023.1.0"), Version("2026.9.0"))}
for path in sorted(glob.glob(".whl/*.whl")):
    name = path.split("/")[-1].split("-")[0].lower()
    if name in need:
        low, high = need[name]
        try:
            have = Version(md.version(name))
            if have >= low and (high is None or have <= high):
                continue
        except md.PackageNotFoundError:
            pass
    print(path)
EOF
)
    # shellcheck disable=SC2086  # one argument per wheel
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import datasets" 2>/dev/null || { note "datasets is missing: the training phases will fail"; failed=1; }

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "
import importlib.metadata as md
for name in ('torch', 'triton', 'transformers', 'accelerate', 'datasets', 'tokenizers', 'pyarrow', 'fsspec'):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, 'missing')"
    echo "commit ${GIT_COMMIT:-unset}"
} 2>&1 | tee "$out/device.txt"

# Rebuild the summaries (a phase cut short wrote its CSV, not its summary) and pack everything.
pack() {
    local dir bench f
    for dir in benchmarks/results/*/; do
        for bench in attention layer_norm training; do
            [[ -f $dir$bench.csv ]] && python3 -m "benchmarks.$bench" --replot --output_dir "$dir" >>"$logs/replot.log" 2>&1
        done
    done
    note "triton cache: $(find "$TRITON_CACHE_DIR" -name '*.cubin' | wc -l) compiled kernels ($cached_before carried in)" >/dev/null
    cp "$out/phases.txt" "$out/device.txt" "$logs/"
    for f in benchmarks/results/*/training_runs/*.log; do [[ -f $f ]] && cp "$f" "$logs/"; done
    tar -czf "$out/results.tar.gz" --exclude training_runs benchmarks/results
    tar -czf "$out/triton_cache.tar.gz" .triton_cache
}

# run_phase NAME CAP_SECONDS COMMAND...: the command under min(cap, time left), its log in $logs.
run_phase() {
    local name=$1 cap=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 45)); then
        note "== $name: skipped, ${left}s left"
        return
    fi
    note "== $name (at most ${cap}s): $*"
    local start=$SECONDS
    timeout -s INT -k 15 "$cap" "$@" >"$logs/$name.log" 2>&1
    local code=$?
    note "== $name: exit $code after $((SECONDS - start))s$( ((code == 124 || code == 137)) && echo ' (time limit)')"
    ((code != 0 && code != 124 && code != 137)) && failed=1
    tail -n 25 "$logs/$name.log"
    pack
}

phases=("$@")
((${#phases[@]})) || phases=(training-gpt2 overhead tests attention-target layer_norm-768 fsdp attention-documents
                             training-documents training-compile attention-gpt2 layer_norm)

# The fsdp phase: two launches and a comparison (a function, so that run_phase's timeout can run it).
fsdp_phase() {
    local dir=/tmp/gpu-fsdp
    local launch=(python3 -m accelerate.commands.launch --config_file accelerate_fsdp2.yaml --num_processes 1)
    local run=(scripts/pretrain.py --config_name gpt2 --per_device_train_batch_size 8 --block_size 512
               --max_train_steps 20 --checkpointing_steps 10 --eval_steps 10 --logging_steps 1
               --gradient_checkpointing)
    rm -rf "$dir"
    "${launch[@]}" "${run[@]}" --output_dir "$dir/straight" &&
        "${launch[@]}" "${run[@]}" --output_dir "$dir/resumed" --resume_from_checkpoint "$dir/straight/step_10" &&
        python3 -c '
import json, sys
def losses(d):
    rows = [json.loads(line) for line in open(d + "/metrics.jsonl")]
    return {r["step"]: r["train_loss"] for r in rows if "train_loss" in r and r["step"] > 10}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
both = a.keys() & b.keys()
worst = max((abs(a[s] - b[s]) for s in both), default=float("nan"))
print(f"fsdp resume: steps 11-20 in both {len(both)}, bitwise equal {a == b}, max |difference| {worst:.3g}")
sys.exit(len(both) != 10)  # a difference is reported, not failed: bf16 kernels need not repeat bit for bit' "$dir/straight" "$dir/resumed"
}
export -f fsdp_phase

# QUICK=1: a dry run of the same plan on a CPU (tiny shapes, Triton's interpreter, results under
# /tmp/gpu-dry-run), to check that it fits its budget before device time is spent on it.
if [[ ${QUICK:-} == 1 ]]; then
    quick=(--quick --output_dir /tmp/gpu-dry-run/quick) target=() ln768=() gpt2=(--presets gpt2-tiny) gpt2_shapes=()
    documents=(--suite documents-quick) side_by_side=(--providers sdpa triton)  # --cuda_graphs needs a GPU
else
    quick=() target=(--suite gpt2 --dtype bf16 --seqlens 1024 --causal causal) ln768=(--hidden 768 --dtype bf16)
    gpt2=(--presets gpt2) gpt2_shapes=(--suite gpt2 --dtype bf16) documents=(--suite documents --dtype bf16)
    side_by_side=(--providers sdpa triton triton+graphs sdpa+graphs sdpa+compile)
fi
attention=(python3 -m benchmarks.attention "${quick[@]}")
layer_norm=(python3 -m benchmarks.layer_norm "${quick[@]}")
training=(python3 -m benchmarks.training "${quick[@]}")
for phase in "${phases[@]}"; do
    case $phase in
        attention-target) run_phase attention-target 110 "${attention[@]}" "${target[@]}" ;;
        layer_norm-768) run_phase layer_norm-768 80 "${layer_norm[@]}" "${ln768[@]}" ;;
        training-gpt2) run_phase training-gpt2 270 "${training[@]}" "${gpt2[@]}" "${side_by_side[@]}" ;;
        overhead) run_phase overhead 75 python3 -m benchmarks.overhead "${quick[@]}" ;;
        tests) run_phase tests 110 python3 -m pytest -q -m requires_cuda tests -p no:cacheprovider ;;
        fsdp) if [[ ${QUICK:-} == 1 ]]; then note "== fsdp: skipped (Accelerate runs FSDP on GPUs only)"
              else run_phase fsdp 150 bash -c fsdp_phase; fi ;;
        attention-documents) run_phase attention-documents 120 "${attention[@]}" "${documents[@]}" ;;
        training-documents) run_phase training-documents 100 "${training[@]}" "${gpt2[@]}" --providers triton+docs sdpa+docs ;;
        training-compile) run_phase training-compile 480 "${training[@]}" "${gpt2[@]}" --providers triton+compile ;;
        attention-gpt2) run_phase attention-gpt2 480 "${attention[@]}" "${gpt2_shapes[@]}" ;;
        layer_norm) run_phase layer_norm 480 "${layer_norm[@]}" ;;
        attention) run_phase attention 480 "${attention[@]}" ;;
        training) run_phase training 480 "${training[@]}" ;;
        *) note "unknown phase $phase"; failed=1 ;;
    esac
done

[[ -f $out/results.tar.gz ]] || pack
cat "$out/phases.txt"
python3 -m benchmarks.targets  # the short table last: the device tool returns the output's tail
exit $failed
