#!/usr/bin/env bash
# The lent GPU machines' image has torch, triton, transformers, accelerate and tokenizers but no
# `datasets` (nor its dill and multiprocess), and no network. Fetch the wheels here, for its
# Python 3.12 on x86-64, into .whl/ (git-ignored); name .whl in the device call's carry, and
# benchmarks/run_gpu.sh installs what the machine lacks. pyarrow and fsspec come along in case
# the image's versions are outside what datasets asks for (run_gpu.sh checks).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==24.0.0 fsspec==2026.9.0
du -sh .whl && ls .whl
