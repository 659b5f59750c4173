"""`make demo` (smoke version): build tiny real assets, train a speech LLM for a few steps on CPU
with the real training recipe, export a .nemo, reload it in a fresh process and answer.

The full MTBI demo (espeak-ng corpus, Whisper tiny.en, SmolLM2) replaces this script
once the MTBI, Whisper and evaluation pieces land.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

import nemo_speechlm  # noqa: F401
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.recipe import train
from nemo_speechlm.tiny_assets import make_tiny_llm, make_wav_manifest

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "demo_out"


def stage(msg: str) -> None:
    print(f"\n=== {msg}", flush=True)


def main() -> None:
    stage("1/4 assets: tiny Llama LLM + BPE tokenizer, 16 wav files + NeMo manifest")
    llm = OUT / "tiny_llm"
    if not (llm / "config.json").is_file():
        make_tiny_llm(llm)
    manifest = OUT / "data" / "manifest.jsonl"
    if not manifest.is_file():
        make_wav_manifest(OUT / "data", n=16)
    nemo = OUT / "speechlm_smoke.nemo"

    stage("2/4 training: 30 steps on CPU (conformer encoder -> frame-stacking adapter -> LLM)")
    overrides = [
        "encoder=conformer_tiny",
        "llm=hf",
        f"model.pretrained_llm={llm}",
        "model.perception.modality_adapter.hidden_dim=64",
        "model.optimizer.lr=3e-3",
        "model.lr_scheduler.warmup_steps=3",
        f"data.train_ds.input_cfg.0.manifest_filepath={manifest}",
        "trainer.accelerator=cpu",
        "trainer.max_steps=30",
        "trainer.log_every_n_steps=5",
        f"exp_manager.exp_dir={OUT / 'runs'}",
        "exp_manager.resume_if_exists=false",
        "exp_manager.create_checkpoint_callback=false",
        f"output_nemo={nemo}",
    ]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("speechlm", overrides=overrides)
    train(cfg, SpeechLMModel)

    stage("3/4 export: restore the .nemo in a fresh process and answer")
    wav = sorted((OUT / "data" / "wav").glob("*.wav"))[0]
    code = (
        "import nemo_speechlm\nfrom nemo_speechlm.models import SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        f"print('answer:', m.respond([{str(wav)!r}], ['Repeat exactly what is said in the audio: <|audio|>'], max_new_tokens=12)[0])\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

    stage("4/4 artifacts")
    for path in (llm, manifest, nemo, OUT / "runs"):
        print(f"  {path}")


if __name__ == "__main__":
    main()
