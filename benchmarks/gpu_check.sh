#!/usr/bin/env bash
# One command for a GPU machine: short bf16 training of every recipe (DDP over all visible GPUs; with
# several, MTBI also under FSDP2), training throughput vs NeMo's SALM with MFU, generation throughput,
# connector pre-alignment split across the GPUs (several),
# then a table (< 10 minutes).
#   benchmarks/gpu_check.sh [--cpu-smoke] [--out DIR] [--steps N] [--devices N]
# --cpu-smoke runs the same steps on CPU with tiny parts (what tests/test_gpu_check.py runs).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/gpu_check.py "$@"
