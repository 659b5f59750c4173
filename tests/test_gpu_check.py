"""``benchmarks/gpu_check.sh --cpu-smoke``: the GPU check's every step runs on CPU with tiny parts, so the
script cannot rot between GPU runs (its numbers are printed, never asserted)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from nemo_speechlm.parts.checkpoint import read_nemo_config
from tests.conftest import REPO


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_several_gpus_add_an_fsdp2_mtbi_run_beside_the_ddp_ones(tmp_path):
    gpu_check = _gpu_check()
    data = {k: tmp_path / k for k in ("llm", "manifest", "behaviors", "asr", "ast", "sqa", "mixed_modal", "text_sft")}
    one = gpu_check.recipe_commands(data, tmp_path, 1, "gpu", 20)
    several = gpu_check.recipe_commands(data, tmp_path, 8, "gpu", 20)
    assert list(one) == ["plain SFT", "MTBI (KL, interleaving)", "joint SFT"]
    assert list(several) == [*one, "MTBI, FSDP2"]
    fsdp2, ddp = several["MTBI, FSDP2"], several["MTBI (KL, interleaving)"]
    assert {"trainer.strategy=fsdp2", "trainer.devices=8", "trainer.precision=bf16-mixed", "frozen_weights_dtype=bfloat16"} <= set(fsdp2)
    # the same MTBI run, sharded, writing its own model and cache
    assert [a for a in fsdp2 if "mtbi_fsdp2" not in a and "strategy" not in a] == [a for a in ddp if "/mtbi/" not in a]
    # and connector pre-alignment split across the GPUs, timed against one
    assert list(gpu_check.throughput_commands(data, "gpu", smoke=False, devices=1)) == ["train throughput vs SALM",
                                                                                         "generation throughput"]
    pre = gpu_check.throughput_commands(data, "gpu", smoke=False, devices=8)["pre-alignment on 8 ranks"]
    assert pre[0].endswith("prealign_ranks.py") and {"--device", "cuda", "--ranks", "8"} <= set(pre)


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step_and_prints_mfu(tmp_path):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=1500, env={**os.environ, "PYTHON": sys.executable})
    out = proc.stdout + proc.stderr
    print(out[-4000:])
    assert proc.returncode == 0, out[-6000:]
    rows = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert [r["name"] for r in rows] == ["plain SFT", "MTBI (KL, interleaving)", "joint SFT", "MTBI .nemo answers",
                                         "train throughput vs SALM", "generation throughput"]
    assert all(r["ok"] for r in rows)
    for name in ("plain", "mtbi", "joint"):
        assert (tmp_path / name / f"{name}.nemo").is_file()
    assert read_nemo_config(tmp_path / "joint" / "joint.nemo").checkpoint_scope == "trainable"  # the small LoRA file
    assert rows[3]["numbers"].startswith("8 answers, the first")
    ours = rows[4]["result"]["ours"]
    assert ours["model_tflops_per_step"] > 0 and ours["mfu"] == pytest.approx(ours["achieved_tflops"] / 1.0)
    assert "MFU" in proc.stdout


def test_a_spent_budget_skips_the_remaining_steps_and_still_prints_the_table(tmp_path, monkeypatch, capsys):
    """A GPU run killed at the device's command limit printed nothing; the check keeps to --budget instead."""
    gpu_check = _gpu_check()
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--cpu-smoke", "--budget", "1", "--out", str(tmp_path)])
    assert gpu_check.main() == 1
    out = capsys.readouterr().out
    rows = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert len(rows) == 6 and all(r["code"] == "no time" for r in rows)
    assert "[SKIP] plain SFT: no time left in --budget 1 s" in out and "FAIL(no time)" in out


def test_a_terminated_check_kills_its_step_and_prints_the_table_with_the_logs_where_asked(tmp_path):
    """The device's command limit ends the check with SIGTERM: Python used to exit without its table, leaving the
    step's processes running, and its logs in a folder that was copied back only at the end."""
    import signal
    import time

    out, logs = tmp_path / "out", tmp_path / "logs"
    proc = subprocess.Popen([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--cpu-smoke", "--out", str(out),
                             "--log-dir", str(logs)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    log = logs / "plain_sft.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.stat().st_size) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)  # the first step is running and writing its log
    proc.send_signal(signal.SIGTERM)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-3000:]
    rows = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert [(r["name"], r["code"]) for r in rows] == [("plain SFT", "terminated")]
    assert "FAIL(terminated)" in stdout and f"logs in {logs}" in stdout
    assert log.is_file() and not list(out.glob("*.log"))
    left = subprocess.run(["pgrep", "-f", str(out)], capture_output=True, text=True).stdout.split()
    assert not left, f"the step's processes outlived the check: {left}"
