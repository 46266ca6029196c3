#!/usr/bin/env bash
# A GPU session's runs, as phases that each stop at their own time limit, so that one device
# command (10 minutes at most there) always ends with its results packed:
#
#   GIT_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/run_gpu.sh first      # the target points
#   GIT_COMMIT=... bash benchmarks/run_gpu.sh second                                 # then the rest
#
# Phases, in the order given (default: all of them):
#   tests            the CUDA correctness tests at real sizes (pytest -m requires_cuda)
#   attention-gpt2   attention at GPT-2 shapes, bf16, causal then not (the target: T=1024 causal)
#   layer_norm-768   both LayerNorm kernels at hidden 768, bf16 (the target point)
#   training-gpt2    end-to-end GPT-2 124M, --kernels triton against sdpa
#   attention        every attention suite and dtype
#   layer_norm       the whole LayerNorm sweep
#   training         GPT-2 124M and 355M
#   first            = tests attention-gpt2 layer_norm-768
#   second           = training-gpt2 layer_norm attention
#
# Results merge into benchmarks/results/<device>/ (a point measured again replaces its old rows;
# the summaries are rebuilt from everything there) and are packed with the logs into
# $OUT/results.tar.gz: untar it in the repository root, commit, and the next call carries them.
# BUDGET_SECONDS (default 540) bounds the whole command; each phase also has its own cap below,
# and a phase with under a minute left is skipped (phases.txt says so). Two calls made back to
# back without carrying each other's results each pack only their own points: merge them here
# with `python -m benchmarks.merge_results DIR...`.
#
# The device image has no `datasets`: benchmarks/fetch_gpu_wheels.sh puts the wheels in .whl/
# here; name .whl in the call's carry and they are installed below when missing.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-run}"
logs=benchmarks/results/logs  # packed into the tarball: the device returns at most 8 files
mkdir -p "$out" "$logs"
deadline=$((SECONDS + ${BUDGET_SECONDS:-540}))

if ! python3 -c "import datasets" 2>/dev/null && ls .whl/datasets-*.whl >/dev/null 2>&1; then
    # datasets, dill and multiprocess always; pyarrow and fsspec only where the image's version is
    # outside what datasets asks for.
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
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $wheels \
        && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

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

# run_phase NAME CAP_SECONDS COMMAND...: the command under min(cap, time left), its log in $out.
run_phase() {
    local name=$1 cap=$2 left=$((deadline - SECONDS))
    shift 2
    ((left < cap)) && cap=$left
    if ((cap < 60)); then
        echo "== $name: skipped, ${left}s left" | tee -a "$out/phases.txt"
        return
    fi
    echo "== $name (at most ${cap}s): $*" | tee -a "$out/phases.txt"
    local start=$SECONDS
    timeout -s INT -k 15 "$cap" "$@" >"$logs/$name.log" 2>&1
    local code=$?
    echo "== $name: exit $code after $((SECONDS - start))s" | tee -a "$out/phases.txt"
    tail -n 25 "$logs/$name.log"
}

phases=("$@")
((${#phases[@]})) || phases=(tests attention-gpt2 layer_norm-768 training-gpt2 attention layer_norm training)
expanded=()
for phase in "${phases[@]}"; do
    if [[ $phase == first ]]; then
        expanded+=(tests attention-gpt2 layer_norm-768)
    elif [[ $phase == second ]]; then
        expanded+=(training-gpt2 layer_norm attention)
    else
        expanded+=("$phase")
    fi
done

for phase in "${expanded[@]}"; do
    case $phase in
        tests) run_phase tests 210 python3 -m pytest -q -m requires_cuda tests -p no:cacheprovider ;;
        attention-gpt2) run_phase attention-gpt2 180 python3 -m benchmarks.attention --suite gpt2 --dtype bf16 ;;
        layer_norm-768) run_phase layer_norm-768 120 python3 -m benchmarks.layer_norm --hidden 768 --dtype bf16 ;;
        training-gpt2) run_phase training-gpt2 240 python3 -m benchmarks.training --presets gpt2 ;;
        attention) run_phase attention 540 python3 -m benchmarks.attention ;;
        layer_norm) run_phase layer_norm 540 python3 -m benchmarks.layer_norm ;;
        training) run_phase training 540 python3 -m benchmarks.training ;;
        *) echo "unknown phase $phase" | tee -a "$out/phases.txt" ;;
    esac
done

# A phase cut short by its time limit wrote its CSV but not its summary: rebuild them all.
for dir in benchmarks/results/*/; do
    for bench in attention layer_norm training; do
        [[ -f $dir$bench.csv ]] && python3 -m "benchmarks.$bench" --replot --output_dir "$dir" >/dev/null 2>&1
    done
done
cp "$out/phases.txt" "$out/device.txt" "$logs/"
for f in benchmarks/results/*/training_runs/*.log; do [[ -f $f ]] && cp "$f" "$logs/"; done
tar -czf "$out/results.tar.gz" --exclude training_runs benchmarks/results
cat "$out/phases.txt"
python3 -m benchmarks.targets  # the short table last: the device tool returns the output's tail
