#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a lent GPU machine with PyTorch but no network and none of NeMo, lhotse, Hydra:
# installs the wheels benchmarks/device_wheels.sh downloaded into .whl/ (carried there), checks the imports,
# runs the check within the command's time limit and writes the step logs straight into $OUT (the device tool's
# folder that comes back, also when the limit cuts the command short). The table and the RESULT line are on stdout.
#   LIMIT=<the run's timeout_s> bash benchmarks/gpu_check_device.sh [gpu_check options]   # run with carry [".whl"]
# LIMIT (default 600): the seconds the whole command may take; the check gets what the install and the import
# check left of it, less a 30 s margin for the table (--budget; BUDGET=S sets it directly).
set -uo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/: run benchmarks/device_wheels.sh where there is network, carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD"
python3 -c "import nemo_speechlm, nemo.collections.speechlm2, nemo.collections.asr, lightning, torch, tests.tiny_assets; \
print('imports ok: lightning', lightning.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 4
budget="${BUDGET:-$(( ${LIMIT:-600} - SECONDS - 30 ))}"
[ "$budget" -ge 0 ] 2>/dev/null || budget=0  # no time left: every step is skipped and the table prints
echo "install + imports took ${SECONDS} s; the check gets --budget ${budget} s"
out=$(mktemp -d /tmp/gpu_check.XXXX)  # a fresh folder per run: a rerun into the last one resumed finished runs
logs="${OUT:-$out}"
PYTHON=python3 exec bash benchmarks/gpu_check.sh --out "$out" --log-dir "$logs" --budget "$budget" "$@"
