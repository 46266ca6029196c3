#!/usr/bin/env bash
# A GPU session's runs, as phases that each stop at their own time limit, so that one device
# command (10 minutes at most there) always ends with its results packed:
#
#   GIT_COMMIT=$(git describe --always --dirty) bash benchmarks/run_gpu.sh first    # the target points
#   GIT_COMMIT=... bash benchmarks/run_gpu.sh second                                # then the rest
#
# Phases, in the order given (default: all but the groups):
#   tests             the CUDA correctness tests at real sizes (pytest -m requires_cuda)
#   attention-target  attention at the target point only: GPT-2 shape, T=1024, causal, bf16
#   layer_norm-768    both LayerNorm kernels at hidden 768, bf16 (the target point)
#   training-gpt2     end-to-end GPT-2 124M, --kernels triton against sdpa
#   attention-gpt2    attention at every GPT-2 shape, bf16, causal and not
#   attention         every attention suite and dtype
#   layer_norm        the whole LayerNorm sweep
#   training          GPT-2 124M and 355M
#   first             = tests attention-target layer_norm-768 training-gpt2
#   second            = attention-gpt2 layer_norm attention
#
# Results merge into benchmarks/results/<device>/ (a provider measured again at a point replaces
# its old rows; the summaries are rebuilt from everything there) and, after every phase, are
# packed with the logs into $OUT/results.tar.gz: untar it in the repository root and commit; the
# next call carries them. Two calls made back to back without that each pack only their own
# points: `python -m benchmarks.merge_results DIR...` merges them here.
#
# BUDGET_SECONDS (default 500) bounds the phases, leaving the 600-second command limit room to
# pack; with less device time left than that, set it to what is left minus about 90. Each phase
# also has its own cap below, and a phase with under a minute left is skipped (phases.txt says).
# Exit status: 1 if a phase failed (other than by its time limit) or datasets is missing.
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
deadline=$((SECONDS + ${BUDGET_SECONDS:-500}))
failed=0
note() { echo "$*" | tee -a "$out/phases.txt"; }

[[ -n ${GIT_COMMIT:-} ]] || note "warning: GIT_COMMIT is unset; rows will name commit 'unknown' (no .git here)"

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
    cp "$out/phases.txt" "$out/device.txt" "$logs/"
    for f in benchmarks/results/*/training_runs/*.log; do [[ -f $f ]] && cp "$f" "$logs/"; done
    tar -czf "$out/results.tar.gz" --exclude training_runs benchmarks/results
}

# run_phase NAME CAP_SECONDS COMMAND...: the command under min(cap, time left), its log in $logs.
run_phase() {
    local name=$1 cap=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 60)); then
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
((${#phases[@]})) || phases=(tests attention-target layer_norm-768 training-gpt2 attention layer_norm training)
expanded=()
for phase in "${phases[@]}"; do
    case $phase in
        first) expanded+=(tests attention-target layer_norm-768 training-gpt2) ;;
        second) expanded+=(attention-gpt2 layer_norm attention) ;;
        *) expanded+=("$phase") ;;
    esac
done

attention=(python3 -m benchmarks.attention)
for phase in "${expanded[@]}"; do
    case $phase in
        tests) run_phase tests 210 python3 -m pytest -q -m requires_cuda tests -p no:cacheprovider ;;
        attention-target) run_phase attention-target 150 "${attention[@]}" --suite gpt2 --dtype bf16 --seqlens 1024 --causal causal ;;
        layer_norm-768) run_phase layer_norm-768 150 python3 -m benchmarks.layer_norm --hidden 768 --dtype bf16 ;;
        training-gpt2) run_phase training-gpt2 240 python3 -m benchmarks.training --presets gpt2 ;;
        attention-gpt2) run_phase attention-gpt2 240 "${attention[@]}" --suite gpt2 --dtype bf16 ;;
        attention) run_phase attention 500 "${attention[@]}" ;;
        layer_norm) run_phase layer_norm 500 python3 -m benchmarks.layer_norm ;;
        training) run_phase training 500 python3 -m benchmarks.training ;;
        *) note "unknown phase $phase"; failed=1 ;;
    esac
done

((${#expanded[@]})) && [[ -f $out/results.tar.gz ]] || pack
cat "$out/phases.txt"
python3 -m benchmarks.targets  # the short table last: the device tool returns the output's tail
exit $failed
