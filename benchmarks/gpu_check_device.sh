#!/usr/bin/env bash
# benchmarks/gpu_check.sh on a lent GPU machine with PyTorch but no network and none of NeMo, lhotse, Hydra:
# installs the wheels benchmarks/device_wheels.sh downloaded into .whl/ (carried there), checks the imports,
# runs the check within the machine's 10-minute command limit (--budget, default 480 s, leaves time for the
# install) and copies the step logs into $OUT (the device tool's folder that comes back). The table and the
# RESULT line are on stdout.
#   bash benchmarks/gpu_check_device.sh [gpu_check options]      # run with carry [".whl"]
set -uo pipefail
cd "$(dirname "$0")/.."
ls .whl/*.whl > /dev/null 2>&1 || { echo "no .whl/: run benchmarks/device_wheels.sh where there is network, carry .whl" >&2; exit 2; }
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH="/tmp/site:$PWD"
python3 -c "import nemo_speechlm, nemo.collections.speechlm2, nemo.collections.asr, lightning, torch; \
print('imports ok: lightning', lightning.__version__, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 4
out=$(mktemp -d /tmp/gpu_check.XXXX)  # a fresh folder per run: a rerun into the last one resumed finished runs
PYTHON=python3 bash benchmarks/gpu_check.sh --out "$out" --budget "${BUDGET:-480}" "$@"
code=$?
if [ -n "${OUT:-}" ]; then cp "$out"/*.log "$OUT"/ 2>/dev/null; fi
exit $code
