#!/usr/bin/env bash
# Everything a GPU session should run, in one go: the CUDA correctness tests at real sizes, then the
# three benchmarks. Results land in benchmarks/results/<device>/ and, when $OUT is set (the device
# tool's output folder), as one tarball there plus the logs.
#
#   bash benchmarks/run_gpu.sh                # everything (about 10-20 minutes on an H100)
#   BENCH_ARGS="--suite gpt2" bash benchmarks/run_gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
out="${OUT:-/tmp/gpu-run}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/device.txt"

python3 -m pytest -q -m requires_cuda tests -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
python3 -m benchmarks.attention ${BENCH_ARGS:-} 2>&1 | tee "$out/attention.log" | tail -40
python3 -m benchmarks.layer_norm 2>&1 | tee "$out/layer_norm.log" | tail -40
python3 -m benchmarks.training 2>&1 | tee "$out/training.log" | tail -20

tar -czf "$out/results.tar.gz" --exclude training_runs benchmarks/results
