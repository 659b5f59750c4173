"""``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check's every step runs on CPU with tiny parts, so the
script cannot rot between GPU runs (its numbers are printed, never asserted)."""
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_check_cpu_smoke_runs_every_step_and_prints_mfu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500, env={**os.environ, "PYTHON": sys.executable})
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    assert proc.returncode == 0, out[-6000:]
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert [r["name"] for r in rows] == ["plain SFT", "MTBI (KL, interleaving)", "joint SFT",
                                         "train throughput vs SALM", "generation throughput"]
    assert all(r["ok"] for r in rows)
    for name in ("plain", "mtbi", "joint"):
        assert (tmp_path / name / f"{name}.nemo").is_file()
    ours = rows[3]["result"]["ours"]
    assert ours["model_tflops_per_step"] > 0 and ours["mfu"] == pytest.approx(ours["achieved_tflops"] / 1.0)
    assert "MFU" in proc.stdout
