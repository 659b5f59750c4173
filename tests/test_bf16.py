"""bf16-true and bf16-mixed on both encoder families (NeMo Conformer, Hugging Face Whisper), on CPU.

* the real recipe (``nemo_speechlm.recipe.train``) runs a training step in each precision, also
  from the frozen-encoder feature cache (stored in bf16 under bf16-true; fp32 features into a bf16
  adapter in the fixed-batch test);
* the mel features are computed in fp32, bit for bit the fp32 model's, under both precisions;
* the loss of a bf16 forward on a fixed batch stays within a stated tolerance of the fp32 loss.
"""
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch import Trainer
from nemo.collections.speechlm2.data.salm_dataset import left_collate_vectors
from nemo.utils.trainer_utils import resolve_trainer_cfg
from omegaconf import OmegaConf

import nemo_speechlm
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.precision import HalfPrecisionForSpeech, resolve_precision_plugins
from nemo_speechlm.recipe import train
from tests.tiny_assets import make_tiny_whisper, tiny_whisper_perception
from tests.conftest import model_config

pytestmark = pytest.mark.slow

PRECISIONS = ["bf16-true", "bf16-mixed"]
ENCODERS = ["conformer", "whisper"]

# Loss tolerance, relative: bf16 keeps 8 significand bits, so each rounding is off by up to
# 2^-9 (0.2%). The tiny models round activations a few dozen times on the way to the loss and
# the errors mostly cancel: measured |bf16 - fp32| / fp32 is 0.01-0.06% (conformer/whisper,
# true/mixed, torch 2.13 CPU). 0.5% is about 2.5 roundings: room for other CPUs and kernels,
# yet tight enough to catch precision lost where it should not be (the cross entropy computed
# in bf16 instead of fp32 was off by 0.96% on the whisper batch). A random LLM's logits are nearly flat (loss ~ ln 400 whatever
# its hidden states), which would hide such errors, so the fixed-batch model gets an LM head
# scaled by LM_HEAD_SCALE (logits spread like a trained model's; loss ~7.3 instead of ~6.0).
# With random weights the audio moves the loss by < 0.1%, so no loss tolerance can vouch for
# the features: the mel check below is exact instead.
LOSS_RTOL = 0.005
LM_HEAD_SCALE = 10.0


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


def encoder_overrides(encoder: str, whisper_dir) -> list[str]:
    if encoder == "conformer":
        return ["encoder=conformer_tiny"]
    return ["encoder=whisper", f"model.perception.encoder.pretrained_model={whisper_dir}",
            "model.perception.encoder.d_model=32", "model.perception.encoder.pad_to_window=false"]


class _Probe(SpeechLMModel):
    """Records what one training step saw: its loss and the dtypes that matter."""

    seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        pre, front_end = self.perception.preprocessor, {}
        # What the model's own encoder stage hands the mel front end and gets back (no mel of this step: cached features)
        hook = pre.register_forward_hook(lambda module, args, kwargs, out: front_end.update(
            signal=kwargs["input_signal"].dtype, features=out[0].dtype), with_kwargs=True)
        try:
            loss = super().training_step(batch, batch_idx)
        finally:
            hook.remove()
        _Probe.seen.append({
            "loss": float(loss.detach()),
            "llm": next(self.llm.parameters()).dtype,
            "adapter": next(self.perception.modality_adapter.parameters()).dtype,
            "front_end_buffers": {b.dtype for b in pre.buffers() if b.is_floating_point()},
            "signal": front_end.get("signal"),
            "features": front_end.get("features"),
            "encoder_features": None if batch.get("encoder_features") is None else batch["encoder_features"].dtype,
        })
        return loss


def recipe_config(assets, tmp_path, overrides, max_steps: int = 1):
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        return compose("speechlm", overrides=[
            "llm=hf", f"model.pretrained_llm={assets['llm']}", "model.perception.modality_adapter.hidden_dim=64",
            "model.lr_scheduler.warmup_steps=1", f"data.train_ds.input_cfg.0.manifest_filepath={assets['manifest']}",
            "data.train_ds.batch_size=2", "trainer.accelerator=cpu", f"trainer.max_steps={max_steps}",
            f"exp_manager.exp_dir={tmp_path / 'runs'}", f"output_nemo={tmp_path / 'out.nemo'}", *overrides,
        ])


def run_recipe(assets, tmp_path, overrides) -> list[dict]:
    cfg = recipe_config(assets, tmp_path, overrides)
    _Probe.seen = []
    nemo = train(cfg, _Probe)
    assert nemo.is_file()
    assert len(_Probe.seen) == 1
    return _Probe.seen


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_recipe_trains_a_step(assets, whisper_dir, tmp_path, encoder, precision):
    (step,) = run_recipe(assets, tmp_path, [f"trainer.precision={precision}", *encoder_overrides(encoder, whisper_dir)])
    assert math.isfinite(step["loss"])
    # bf16-true casts the weights, bf16-mixed autocasts fp32 weights; the mel front end is fp32 in both.
    assert step["llm"] == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    assert step["front_end_buffers"] == {torch.float32}
    assert step["signal"] == step["features"] == torch.float32


@pytest.mark.parametrize("encoder", ENCODERS)
def test_recipe_trains_from_the_feature_cache_in_bf16_true(assets, whisper_dir, tmp_path, encoder):
    def step(name: str, *extra: str) -> dict:
        (seen,) = run_recipe(assets, tmp_path / name, [
            "trainer.precision=bf16-true", *encoder_overrides(encoder, whisper_dir), f"feature_cache.dir={tmp_path / name}",
            "model.freeze_params=['^llm\\..+$','^perception\\.encoder\\..+$']", *extra,
        ])
        return seen

    stored_bf16, stored_fp32 = step("auto"), step("fp32", "feature_cache.dtype=float32")
    # bf16-true stores the features in bf16 (feature_cache.dtype=null): the adapter rounds them to bf16 anyway,
    # so the step is the one an fp32 cache gives, from half the bytes.
    assert [p.parent.parent.name.endswith("-bf16") for p in (tmp_path / "auto").rglob("*.npy")] == [True] * 8
    assert [p.parent.parent.name.endswith("-bf16") for p in (tmp_path / "fp32").rglob("*.npy")] == [False] * 8
    assert math.isfinite(stored_bf16["loss"]) and stored_bf16["loss"] == stored_fp32["loss"]
    assert stored_bf16["encoder_features"] == torch.bfloat16 and stored_bf16["adapter"] == torch.bfloat16


class _Moves(SpeechLMModel):
    """Which of the trained weights a run changed at all, and how it stored its weights."""

    result: dict = {}

    def on_train_start(self) -> None:
        _Moves.result = {"start": {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad},
                         "dtypes": {n: p.dtype for n, p in self.named_parameters()}}

    def on_train_end(self) -> None:
        now = dict(self.named_parameters())
        _Moves.result["moved"] = {n: ((now[n].detach() != start).float().mean().item(), start.numel())
                                  for n, start in _Moves.result["start"].items()}


def test_bf16_mixed_with_frozen_weights_in_bf16_trains_every_weight_that_bf16_true_leaves(assets, tmp_path):
    """bf16-true keeps no fp32 copy of the trained weights: an AdamW update below about |w|/512 rounds away, so at
    the configs' lr (1e-4) few weights move at all and no LayerNorm gain (|w| = 1) does. ``frozen_weights_dtype=
    bfloat16`` under bf16-mixed trains every weight in fp32 and stores the frozen ones (the LLM) in bf16."""
    def run(name: str, *precision: str) -> dict:
        train(recipe_config(assets, tmp_path / name, ["encoder=conformer_tiny", *precision], max_steps=10), _Moves)
        result = dict(_Moves.result)
        moved = result["moved"]
        result["share"] = sum(f * n for f, n in moved.values()) / sum(n for _, n in moved.values())
        result["gains"] = [f for name, (f, _) in moved.items() if "norm" in name and name.endswith(".weight")]
        return result

    true = run("true", "trainer.precision=bf16-true")
    frozen = run("frozen", "trainer.precision=bf16-mixed", "frozen_weights_dtype=bfloat16")
    # A frozen Conformer encoder in the step (no feature cache): its BatchNorm's bf16 weights beside fp32 statistics
    # were refused by torch ("expected scalar type BFloat16 but found Float"; also MTBI's frozen conformer connector).
    frozen_speech = run("frozen_speech", "trainer.precision=bf16-mixed", "frozen_weights_dtype=bfloat16",
                        "model.freeze_params=['^llm\\..+$','^perception\\.encoder\\..+$']")
    assert frozen_speech["share"] > 0.99 and not any(n.startswith("perception.encoder.") for n in frozen_speech["start"])
    batch_norm = [d for n, d in frozen_speech["dtypes"].items() if "batch_norm" in n and "running" not in n]
    assert batch_norm and set(batch_norm) == {torch.float32}  # beside its fp32 statistics
    print(f"share of trained weights moved in 10 steps: bf16-true {true['share']:.1%}, frozen in bf16 {frozen['share']:.1%}")
    assert true["gains"] and max(true["gains"]) == 0.0 and true["share"] < 0.5  # the control: bf16-true loses them
    assert min(frozen["gains"]) > 0.9 and frozen["share"] > 0.99
    trained = frozen["start"].keys()
    assert all(frozen["dtypes"][n] == torch.float32 for n in trained)
    llm = [d for n, d in frozen["dtypes"].items() if n.startswith("llm.") and n not in trained]
    assert llm and set(llm) == {torch.bfloat16}


@pytest.mark.parametrize("precision, warned", [("bf16-true", True), ("16-true", True), ("bf16-mixed", False),
                                               ("32", False)])
def test_half_precision_true_with_trained_weights_is_warned(precision, warned, caplog):
    """The recipe says it when bf16-true (or fp16-true) will round small updates of its trained weights away."""
    from nemo_speechlm.parts.precision import warn_if_trained_weights_in_half_precision

    trained, frozen = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).requires_grad_(False)
    with caplog.at_level("WARNING", logger="nemo_logger"):  # NeMo's logger
        warn_if_trained_weights_in_half_precision(precision, torch.nn.Sequential(trained, frozen))
        warn_if_trained_weights_in_half_precision(precision, frozen)  # nothing trains: nothing to say
    said = caplog.text
    assert said.count("frozen_weights_dtype=bfloat16") == (1 if warned else 0)
    assert ("stores the 6 trained weights" in said) == warned


# ---------------------------------------------------------------- fixed-batch numerics


def build_model(assets, whisper_dir, encoder: str) -> SpeechLMModel:
    torch.manual_seed(0)
    cfg = model_config(assets["llm"])
    if encoder == "whisper":
        cfg.perception.update(tiny_whisper_perception(whisper_dir))
    model = SpeechLMModel(cfg).eval()
    with torch.no_grad():
        model.llm.lm_head.weight.mul_(LM_HEAD_SCALE)
    return model


def fixed_batch(model: SpeechLMModel, assets) -> dict:
    wav_paths = sorted((assets["root"] / "data" / "wav").glob("*.wav"))[:2]
    answers = ["the cat sat on the mat", "please open the window"]
    ids, masks = [], []
    for answer in answers:
        context = model.encode_prompt("Repeat: <|audio|>")
        target = torch.tensor(model.tokenizer.text_to_ids(answer) + [model.tokenizer.tokenizer.eos_token_id])
        ids.append(torch.cat([context, target]))
        masks.append(torch.cat([torch.zeros(len(context), dtype=torch.bool), torch.ones(len(target), dtype=torch.bool)]))
    wavs = [model._load_waveform(str(p)) for p in wav_paths]
    return {
        "input_ids": left_collate_vectors(ids, padding_value=model.text_pad_id),
        "loss_mask": left_collate_vectors(masks, padding_value=False),
        "audios": torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True),
        "audio_lens": torch.tensor([len(w) for w in wavs]),
    }


def recipe_precision_plugin(precision: str):
    """The precision plugin the recipe's Trainer gets for ``trainer.precision=precision``."""
    trainer_cfg = resolve_precision_plugins(resolve_trainer_cfg(OmegaConf.create(
        {"accelerator": "cpu", "devices": 1, "precision": precision, "logger": False, "enable_checkpointing": False}
    )))
    return Trainer(**trainer_cfg).precision_plugin


def same_weights(model: SpeechLMModel, assets, whisper_dir, encoder: str) -> SpeechLMModel:
    """A second model with ``model``'s weights (a ModelPT does not deep-copy)."""
    twin = build_model(assets, whisper_dir, encoder)
    twin.load_state_dict(model.state_dict())
    return twin


def in_precision(model: SpeechLMModel, batch: dict, precision: str, fn):
    """``fn(model, batch)`` the way Lightning runs a step under ``precision`` (``model`` is converted in place)."""
    plugin = recipe_precision_plugin(precision)
    if precision == "bf16-true":
        assert isinstance(plugin, HalfPrecisionForSpeech)
    model = plugin.convert_module(model)
    batch = plugin.convert_input(batch)
    with torch.no_grad(), plugin.forward_context():
        return fn(model, batch)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("encoder", ENCODERS)
def test_features_are_fp32_and_loss_is_close_to_fp32(assets, whisper_dir, encoder, precision):
    model = build_model(assets, whisper_dir, encoder)
    batch = fixed_batch(model, assets)

    def loss_and_mel(m, b):
        """The loss, and what the model's own encoder stage gave the mel front end and got back."""
        front_end = {}
        hook = m.perception.preprocessor.register_forward_hook(lambda module, args, kwargs, out: front_end.update(
            signal=kwargs["input_signal"], mel=out[0]), with_kwargs=True)
        try:
            return m.compute_losses(b)["loss"], front_end
        finally:
            hook.remove()

    with torch.no_grad():
        loss32, seen32 = loss_and_mel(model, batch)
    loss32 = float(loss32)
    half = same_weights(model, assets, whisper_dir, encoder)
    loss16, seen16 = in_precision(half, batch, precision, loss_and_mel)
    assert seen16["signal"].dtype == seen16["mel"].dtype == torch.float32
    torch.testing.assert_close(seen16["signal"], seen32["signal"], rtol=0, atol=0)  # the waveform as it was
    torch.testing.assert_close(seen16["mel"], seen32["mel"], rtol=0, atol=0)  # the same fp32 computation, bit for bit

    print(f"{encoder} {precision}: fp32 loss {loss32:.5f}, bf16 loss {float(loss16):.5f}")
    assert loss16.dtype == torch.float32  # cross entropy in fp32 over bf16 logits
    assert abs(float(loss16) - loss32) <= LOSS_RTOL * abs(loss32)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_fp32_cached_features_into_a_bf16_adapter(assets, whisper_dir, encoder):
    """Features read from the cache are fp32; a bf16-true model (adapter in bf16) takes them as they are."""
    model = build_model(assets, whisper_dir, encoder)
    batch = fixed_batch(model, assets)
    with torch.no_grad():
        feats = model.encode_speech(batch["audios"], batch["audio_lens"])
    cached = dict(batch, audios=None, audio_lens=None,
                  encoder_features=torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).transpose(1, 2).float(),
                  encoder_feature_lens=torch.tensor([len(f) for f in feats]),
                  audio_segments=torch.tensor([[0.0, 0.0, math.inf], [1.0, 0.0, math.inf]], dtype=torch.float64))
    with torch.no_grad():
        loss32 = float(model.compute_losses(cached)["loss"])
    bf16 = HalfPrecisionForSpeech("bf16-true").convert_module(same_weights(model, assets, whisper_dir, encoder))
    with torch.no_grad():  # no convert_input: the features reach the adapter in fp32
        loss16 = float(bf16.compute_losses(cached)["loss"])
    assert abs(loss16 - loss32) <= LOSS_RTOL * abs(loss32)


@pytest.mark.parametrize("ctc_readout", [False, True], ids=["plain", "ctc_readout"])
def test_bf16_llm_inference_with_fp32_perception(assets, whisper_dir, ctc_readout):
    """What ``inference.load_model(bf16=True)`` does (it needs CUDA; the same casts on CPU here). With MTBI's
    CTC read-out, the fp32 connector outputs met the bf16 vocabulary embeddings in one matmul (a dtype error)."""
    torch.manual_seed(0)
    cfg = model_config(assets["llm"], ctc_readout=ctc_readout)
    cfg.perception.update(tiny_whisper_perception(whisper_dir))
    model = SpeechLMModel(cfg).eval()
    if ctc_readout:
        model.ctc_readout.set_vocabulary(list(range(5, 60)))
    wav = str(sorted((assets["root"] / "data" / "wav").glob("*.wav"))[0])
    model.llm.to(torch.bfloat16)
    answer = model.respond([wav], ["Repeat: <|audio|>"], max_new_tokens=3)
    assert len(answer) == 1 and isinstance(answer[0], str)


@pytest.mark.parametrize(("cuda", "cuda_bf16", "cpu_bf16", "expected"), [
    (True, True, False, "bf16-mixed"), (True, False, True, "32"),  # a GPU decides for itself
    (False, False, True, "bf16-mixed"), (False, False, False, "32"),  # CPUs without native bf16 emulate it: slower
])
def test_fastest_training_precision_picks_bf16_only_where_it_is_native(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    from nemo_speechlm.parts.precision import fastest_training_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    assert fastest_training_precision() == expected
