#!/usr/bin/env bash
# One command for a GPU machine: short bf16 training of every recipe (DDP over all visible GPUs; with
# several, MTBI also under FSDP2), the MTBI model answering in bf16, training throughput vs NeMo's SALM
# with MFU, generation throughput, connector pre-alignment split across the GPUs (several),
# then a table (< 10 minutes; --budget SECONDS, default 540).
#   benchmarks/gpu_check.sh [--cpu-smoke] [--out DIR] [--steps N] [--devices N] [--budget S]
# --cpu-smoke runs the same steps on CPU with tiny parts (what tests/test_gpu_check.py runs).
# The repository goes on PYTHONPATH, so it runs uninstalled (a GPU image with the dependencies carried as
# wheels: benchmarks/device_wheels.sh says how).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-$(command -v python || command -v python3)}" benchmarks/gpu_check.py "$@"
