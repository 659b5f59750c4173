"""A normal (non-editable) install works: the wheel carries every module, config and resource,
and from outside the repository the installed package trains, saves and restores a model."""
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

INSIDE_VENV = """
import sys
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
import nemo_speechlm
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.tts.grammar import RequestGrammar
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.recipe import train

llm, manifest, out = sys.argv[1:4]
assert "site-packages" in nemo_speechlm.__file__ and "{repo}" not in nemo_speechlm.__file__, nemo_speechlm.__file__
print("catalog tasks", len(TaskCatalog.load().names))
print("grammar sentences", RequestGrammar.load().size())
with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
    cfg = compose("speechlm", overrides=[
        "encoder=conformer_tiny", "llm=hf", f"model.pretrained_llm={{llm}}",
        "model.perception.modality_adapter.hidden_dim=32", f"data.train_ds.input_cfg.0.manifest_filepath={{manifest}}",
        "data.train_ds.batch_size=2", "trainer.accelerator=cpu", "trainer.max_steps=2", "model.lr_scheduler.warmup_steps=1",
        f"exp_manager.exp_dir={{out}}/runs", f"output_nemo={{out}}/model.nemo",
    ])
nemo = train(cfg, SpeechLMModel)
model = SpeechLMModel.restore_from(str(nemo)).eval()
torch.manual_seed(0)
wave = torch.randn(1, 8000)
ids = model.encode_prompt("Repeat: <|audio|>").unsqueeze(0)
with torch.no_grad():
    embeds, _, mask = model.splice_audio({{"input_ids": ids, "audios": wave, "audio_lens": torch.tensor([8000])}})
    print("logit sum %.6f" % model(embeds, mask).sum().item())
"""


def _run(cmd, cwd):
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_wheel_installs_and_trains_outside_the_repository(assets, tmp_path):
    wheel_dir = tmp_path / "wheel"
    _run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir)],
         cwd=tmp_path)
    wheel = next(wheel_dir.glob("nemo_speechlm-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("nemo_speechlm/data/__init__.py", "nemo_speechlm/data/manifest.py", "nemo_speechlm/conf/speechlm.yaml",
                   "nemo_speechlm/conf/mtbi.yaml", "nemo_speechlm/conf/mtbi/tasks.yaml",
                   "nemo_speechlm/conf/encoder/whisper_tiny_en.yaml", "nemo_speechlm/resources/assistant_requests.yaml",
                   "nemo_speechlm/resources/sentences.txt", "nemo_speechlm/datagen/__init__.py",
                   "nemo_speechlm/datagen/behaviors.py", "nemo_speechlm/parts/runner.py"):
        assert needed in names, f"{needed} missing from {wheel.name}"
    assert not any("tiny_assets" in name or name.startswith("tests/") for name in names), "test-only files in the wheel"

    # A fresh virtual environment with the wheel installed normally; its dependencies are read from
    # the suite's environment through a path entry (its .pth files, including our editable install, are not).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).strip())
    (site / "suite_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], cwd=tmp_path)

    script = tmp_path / "use_installed.py"
    script.write_text(INSIDE_VENV.format(repo=REPO))
    out = _run([str(python), str(script), str(assets["llm"]), str(assets["manifest"]), str(tmp_path / "out")], cwd=tmp_path)
    assert "catalog tasks 15" in out
    assert int(out.split("grammar sentences ")[1].split()[0]) >= 3000
    installed = float(out.split("logit sum ")[1].split()[0])

    # The .nemo the installed package wrote restores to the same outputs in this (repository) install.
    import torch
    from nemo_speechlm.models import SpeechLMModel

    model = SpeechLMModel.restore_from(str(tmp_path / "out" / "model.nemo")).eval()
    torch.manual_seed(0)
    wave = torch.randn(1, 8000)
    ids = model.encode_prompt("Repeat: <|audio|>").unsqueeze(0)
    with torch.no_grad():
        embeds, _, mask = model.splice_audio({"input_ids": ids, "audios": wave, "audio_lens": torch.tensor([8000])})
        assert model(embeds, mask).sum().item() == pytest.approx(installed, rel=1e-5, abs=1e-3)
