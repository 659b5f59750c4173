"""SpeechLMModel: splicing, encoder swap, LoRA/freezing, inference, .nemo round trips in fresh processes."""
import io
import shutil

import numpy as np
import pytest
import torch
from nemo.collections.asr.models import ASRModel
from nemo.core.classes.common import ALLOWED_TARGET_PREFIXES, safe_instantiate
from omegaconf import OmegaConf

from nemo_speechlm.errors import ConfigError
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.models.reference_weights import fingerprint
from nemo_speechlm.parts.checkpoint import CheckpointError, restore_checked
from nemo_speechlm.parts.llm import check_can_splice
from tests.conftest import model_config, nemo_weights, run_python
from tests.tiny_assets import make_tiny_llm

PROMPTS = ["Repeat exactly what is said in the audio: <|audio|>", "what do you hear <|audio|> ?"]


@pytest.fixture(scope="module")
def model(assets):
    torch.manual_seed(0)
    return SpeechLMModel(model_config(assets["llm"]))


def wavs(assets, n=2):
    return [str(p) for p in sorted((assets["root"] / "data" / "wav").glob("*.wav"))[:n]]


def test_allow_list_has_our_prefix():
    assert "nemo_speechlm." in ALLOWED_TARGET_PREFIXES
    adapter = safe_instantiate({"_target_": "nemo_speechlm.modules.adapters.FrameStackingAdapter", "input_dim": 4, "output_dim": 8})
    assert adapter(torch.randn(2, 4, 7), torch.tensor([7, 5]))[0].shape == (2, 8, 2)


def test_adapter_output_ignores_what_lies_in_the_padding():
    """speechlm2's perception hands the encoder's padded outputs to the adapter; a clip's last stacked
    position must not see them (otherwise its output depends on the batch it is in)."""
    adapter = safe_instantiate({"_target_": "nemo_speechlm.modules.adapters.FrameStackingAdapter", "input_dim": 4,
                                "output_dim": 8, "stack": 2, "hidden_dim": 16}).eval()
    clip = torch.randn(1, 4, 5)
    alone, _ = adapter(clip, torch.tensor([5]))
    padded, lens = adapter(torch.cat([clip, torch.randn(1, 4, 3)], dim=2), torch.tensor([5]))
    assert int(lens) == 3
    torch.testing.assert_close(padded[..., :3], alone)


def test_only_adapter_trainable_with_frozen_llm(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("perception.") for n in trainable)
    counts = model.parameter_counts()
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in trainable)


def test_lora_adds_exactly_lora_parameters(assets):
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    base = SpeechLMModel(model_config(assets["llm"]))
    with_lora = SpeechLMModel(model_config(assets["llm"], lora=lora))
    before = {n for n, p in base.named_parameters() if p.requires_grad}
    after = {n for n, p in with_lora.named_parameters() if p.requires_grad}
    added = after - before
    assert before <= after and added
    assert all(".lora_A." in n or ".lora_B." in n for n in added)
    assert all(("q_proj" in n or "v_proj" in n) for n in added)


def test_lora_modules_to_save_train(assets):
    """peft makes a trainable copy of each module in ``modules_to_save``; the LLM's freeze pattern froze it again."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM"}
    model = SpeechLMModel(model_config(assets["llm"], lora=lora))
    head = {n: p.requires_grad for n, p in model.named_parameters() if "lm_head" in n}
    assert head == {"llm.base_model.model.lm_head.original_module.weight": False,
                    "llm.base_model.model.lm_head.modules_to_save.default.weight": True}


def test_a_kept_llm_weight_that_lora_freezes_is_a_config_error(assets):
    """Under LoRA, peft freezes the LLM's base weights and a ``prevent_freeze_params`` pattern naming them trained
    nothing (speechlm2 logged it as an unmatched, "bad" regexp); ``modules_to_save`` is the way to train them."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}
    keep = [r"^llm\..*embed_tokens\..+$"]
    with pytest.raises(ConfigError, match=r"prevent_freeze_params: .*embed_tokens.* LoRA keeps frozen") as err:
        SpeechLMModel(model_config(assets["llm"], lora=lora, prevent_freeze_params=keep))
    assert "modules_to_save" in err.value.fix
    model = SpeechLMModel(model_config(assets["llm"], lora={**lora, "modules_to_save": ["embed_tokens"]},
                                       prevent_freeze_params=keep))  # the pattern also names the trained copy: fine
    assert any(p.requires_grad for n, p in model.named_parameters() if "embed_tokens.modules_to_save" in n)
    SpeechLMModel(model_config(assets["llm"], prevent_freeze_params=keep))  # no LoRA: the pattern unfreezes them


def test_several_audios_per_sample_are_spliced_in_order(model, assets):
    a, b = wavs(assets, 2)
    ids = model.encode_prompt("first <|audio|> then <|audio|> end")
    audios, lens = torch.nn.utils.rnn.pad_sequence(
        [model._load_waveform(a), model._load_waveform(b)], batch_first=True
    ), torch.tensor([len(model._load_waveform(a)), len(model._load_waveform(b))])
    embeds, _, mask = model.splice_audio({"input_ids": ids[None], "audios": audios, "audio_lens": lens})
    audio_embs = model.encode_audio({"audios": audios, "audio_lens": lens})
    loc = model.audio_locator_tag_id
    first = int((ids == loc).nonzero()[0])
    assert embeds.shape[1] == len(ids) - 2 + sum(e.shape[0] for e in audio_embs)
    torch.testing.assert_close(embeds[0, first : first + audio_embs[0].shape[0]], audio_embs[0])
    second = int((ids == loc).nonzero()[1]) - 1 + audio_embs[0].shape[0]
    torch.testing.assert_close(embeds[0, second : second + audio_embs[1].shape[0]], audio_embs[1])
    assert mask.all()


def test_respond_batches_and_validates(model, assets):
    answers = model.respond(wavs(assets, 2), PROMPTS, max_new_tokens=4)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    # batching does not change greedy answers
    assert model.respond(wavs(assets, 2), PROMPTS, batch_size=1, max_new_tokens=4) == answers
    with pytest.raises(ValueError, match="2 audio locator tags"):
        model.respond(wavs(assets, 1), ["<|audio|> <|audio|>"])
    with pytest.raises(ValueError, match="2 audios but 1 prompts"):
        model.respond(wavs(assets, 2), PROMPTS[:1])
    with pytest.raises(FileNotFoundError):
        model.respond(["/nonexistent.wav"], PROMPTS[:1])
    with pytest.raises(ValueError, match="max_new_tokens has 3 caps for 2 prompts"):  # was cut to 2, silently
        model.respond(wavs(assets, 2), PROMPTS, max_new_tokens=[2, 3, 4])
    pcm = (np.random.default_rng(0).uniform(-0.5, 0.5, 16000) * 32767).astype(np.int16)
    with pytest.raises(ValueError, match="float samples in \\[-1, 1\\], got int16"):  # read as 32768x too loud
        model.respond([pcm], PROMPTS[:1], max_new_tokens=2)


def test_generation_continues_after_one_row_finishes(model):
    """A finished row is fed the pad id while others generate: it must be a real LLM token id."""
    from itertools import combinations

    from nemo_speechlm.models.speechlm_model import left_collate_vectors
    from tests.tiny_assets import SENTENCES

    for pair in combinations(SENTENCES, 2):  # text-only prompts whose greedy answers differ somewhere
        ids = left_collate_vectors([model.encode_prompt(p) for p in pair], padding_value=model.text_pad_id)
        free = model.generate(ids, max_new_tokens=8)
        only_row0 = [t for t in free[0].tolist()[:4] if t not in free[1].tolist()]  # stops row 0 early
        if only_row0:
            break
    assert only_row0, "no prompt pair with different answers"
    assert model.default_generation_config().pad_token_id < model.embed_tokens.num_embeddings
    stopped = model.generate(ids, max_new_tokens=8, eos_token_id=only_row0[0])
    assert stopped[1].tolist() == free[1].tolist()  # row 1 went on after row 0 stopped (no IndexError on the pad id)


def test_pretrained_asr_encoder_weights_are_copied(assets):
    cfg = model_config(assets["llm"], pretrained_asr=str(assets["asr"]))
    model = SpeechLMModel(cfg)
    asr = ASRModel.restore_from(str(assets["asr"]))
    for name, value in asr.encoder.state_dict().items():
        torch.testing.assert_close(model.perception.encoder.state_dict()[name], value, rtol=0, atol=0)
    assert model.cfg.perception.encoder.d_model == asr.cfg.encoder.d_model


@pytest.mark.parametrize(("recipe", "adapter"), [("speechlm", "stack_mlp"), ("joint_sft", "conformer")])
def test_an_encoder_group_naming_only_a_pretrained_asr_model_builds(assets, recipe, adapter):
    """encoder=asr_nemo / canary_1b_flash / parakeet_tdt_0_6b_v2 set only model.pretrained_asr; every such model
    failed to build ("Interpolation key 'encoder.d_model' not found"): the adapter's width refers to the encoder."""
    from hydra import compose, initialize_config_dir

    import nemo_speechlm

    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose(recipe, overrides=["encoder=asr_nemo", f"model.pretrained_asr={assets['asr']}", f"adapter={adapter}",
                                         "llm=hf", f"model.pretrained_llm={assets['llm']}", "model.lora=null"])
    assert "encoder" not in cfg.model.perception
    model = SpeechLMModel(cfg.model)
    asr = ASRModel.restore_from(str(assets["asr"]))
    for name, value in asr.encoder.state_dict().items():
        torch.testing.assert_close(model.perception.encoder.state_dict()[name], value, rtol=0, atol=0)
    width = {"stack_mlp": "input_dim", "conformer": "feat_in"}[adapter]
    assert model.cfg.perception.modality_adapter[width] == asr.cfg.encoder.d_model


def test_unsupported_architecture_has_clear_error():
    class NoEmbeddings(torch.nn.Module):
        def forward(self, input_ids):
            return input_ids

    with pytest.raises(TypeError, match="Cannot splice audio into NoEmbeddings"):
        check_can_splice(NoEmbeddings(), "some/model")


ROUND_TRIP_CHECK = """
import torch, nemo_speechlm
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.models import SpeechLMModel
expected = torch.load({ref!r})
m = SpeechLMModel.restore_from({nemo!r})
m.eval()
with torch.no_grad():
    inputs = m.prepare_inputs(expected["batch"])
    logits = m(inputs["input_embeds"], inputs["attention_mask"])
torch.testing.assert_close(logits, expected["logits"], atol=1e-5, rtol=0)
assert m.respond({wavs!r}, {prompts!r}, max_new_tokens=6) == expected["answers"], "greedy output differs"
print("ROUND_TRIP_OK", type(m).__name__)
"""


def reference_outputs(model, assets, path):
    """Logits on a fixed batch and greedy answers, saved for the fresh process to compare."""
    model.eval()
    ids = [model.encode_prompt(p) for p in PROMPTS]
    batch = {
        "input_ids": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=model.text_pad_id, padding_side="left"),
        "loss_mask": torch.ones(2, max(len(i) for i in ids), dtype=torch.bool),
    }
    w = [model._load_waveform(p) for p in wavs(assets, 2)]
    batch["audios"] = torch.nn.utils.rnn.pad_sequence(w, batch_first=True)
    batch["audio_lens"] = torch.tensor([len(x) for x in w])
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        logits = model(inputs["input_embeds"], inputs["attention_mask"])
    answers = model.respond(wavs(assets, 2), PROMPTS, max_new_tokens=6)
    torch.save({"batch": batch, "logits": logits, "answers": answers}, path)


@pytest.mark.parametrize("with_lora", [False, True])
def test_nemo_round_trip_in_fresh_process_without_original_files(assets, tmp_path, with_lora):
    llm_copy, asr_copy = tmp_path / "llm_copy", tmp_path / "asr_copy.nemo"
    shutil.copytree(assets["llm"], llm_copy)
    shutil.copy(assets["asr"], asr_copy)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"} if with_lora else None
    torch.manual_seed(1)
    model = SpeechLMModel(model_config(llm_copy, lora=lora, pretrained_asr=str(asr_copy)))
    if with_lora:  # make LoRA non-trivial (B is zero-initialised)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.5)
    nemo = tmp_path / "model.nemo"
    model.save_to(str(nemo))
    reference_outputs(model, assets, tmp_path / "ref.pt")
    shutil.rmtree(llm_copy)  # the .nemo must be self-contained
    asr_copy.unlink()
    out = run_python(ROUND_TRIP_CHECK.format(ref=str(tmp_path / "ref.pt"), nemo=str(nemo), wavs=wavs(assets, 2), prompts=PROMPTS))
    assert "ROUND_TRIP_OK SpeechLMModel" in out


def test_a_rank_other_than_0_leaves_the_nemo_file_alone(model, tmp_path, monkeypatch):
    """NeMo writes a .nemo on global rank 0 only; another rank calling save_to once moved a partial file left by a
    killed save over the good model."""
    from nemo_speechlm.models import speechlm_model

    nemo = tmp_path / "out.nemo"
    model.save_to(str(nemo))
    good = nemo.read_bytes()
    (tmp_path / ".out.partial.nemo").write_bytes(b"\0" * 10)  # left by a save killed mid-write
    monkeypatch.setattr(speechlm_model, "is_global_rank_zero", lambda: False)
    monkeypatch.setattr("nemo.core.classes.modelPT.is_global_rank_zero", lambda: False)
    model.save_to(str(nemo))
    assert nemo.read_bytes() == good


def test_trainable_only_export_is_small_and_equivalent(assets, tmp_path):
    """MTBI's default freezes the connector after stage 1 (freeze_aligned_connector): the file must keep it,
    though it is no longer trainable (it left every frozen weight out, and could not be restored)."""
    torch.manual_seed(2)
    model = SpeechLMModel(model_config(assets["llm"], pretrained_asr=str(assets["asr"]), freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$", r"^perception\.preprocessor\..+$"]))
    for name, param in model.perception.named_parameters():
        if name.startswith(("modality_adapter", "proj")):
            param.requires_grad_(False)
    full, small = tmp_path / "full.nemo", tmp_path / "small.nemo"
    model.save_to(str(full))
    model.save_trainable_to(str(small))
    assert model.cfg.get("checkpoint_scope", "full") == "full" and model.cfg.get("reference_fingerprints") is None
    assert small.stat().st_size < full.stat().st_size
    reference_outputs(model, assets, tmp_path / "ref.pt")
    out = run_python(ROUND_TRIP_CHECK.format(ref=str(tmp_path / "ref.pt"), nemo=str(small), wavs=wavs(assets, 2), prompts=PROMPTS))
    assert "ROUND_TRIP_OK" in out
    restored = SpeechLMModel.restore_from(str(small))
    assert restored.cfg.checkpoint_scope == "trainable" and set(restored.cfg.reference_fingerprints) == {"llm", "encoder"}
    sd = OmegaConf.to_container(restored.cfg)
    assert sd["pretrained_llm"] == str(assets["llm"]) and sd["pretrained_asr"] == str(assets["asr"])
    # A full file written from the restored model holds every weight and says so.
    restored.save_to(str(tmp_path / "again.nemo"))
    again = SpeechLMModel.restore_from(str(tmp_path / "again.nemo"))
    assert again.cfg.checkpoint_scope == "full" and again.cfg.reference_fingerprints is None
    assert_same_weights(again, model)


def test_trainable_only_keeps_a_frozen_encoder_that_no_reference_gives_back(assets, tmp_path):
    """An encoder built from config alone (no pretrained_asr) and frozen is in the file: restoring used to
    build another random encoder in its place, silently. The base LLM is not, not even its output layer tied
    to the embeddings (SmolLM2's): the file kept that whole matrix under its second name."""
    llm = make_tiny_llm(tmp_path / "tied_llm", tie_word_embeddings=True)
    torch.manual_seed(3)
    model = SpeechLMModel(model_config(llm, freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$"],
                                       lora={"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    model.save_trainable_to(str(tmp_path / "small.nemo"))
    saved = nemo_weights(tmp_path / "small.nemo")
    assert [k for k in saved if k.startswith("llm.") and ".lora_" not in k] == []
    assert any(".lora_" in k for k in saved) and any(k.startswith("perception.encoder.") for k in saved)
    torch.manual_seed(4)
    restored = SpeechLMModel.restore_from(str(tmp_path / "small.nemo"))
    assert set(restored.cfg.reference_fingerprints) == {"llm"}
    assert_same_weights(restored, model)


def test_trainable_only_with_a_trained_encoder_restores_without_its_reference(assets, tmp_path):
    """Joint SFT trains the encoder: the file holds all of it and records no encoder fingerprint, yet restoring
    loaded the ASR reference anyway (for Canary a 1B download; offline, or with the .nemo moved, a traceback)."""
    asr = tmp_path / "asr.nemo"
    shutil.copy(assets["asr"], asr)
    torch.manual_seed(6)
    model = SpeechLMModel(model_config(assets["llm"], pretrained_asr=str(asr), freeze_params=[r"^llm\..+$"])).eval()
    model.save_trainable_to(str(tmp_path / "small.nemo"))
    asr.unlink()
    restored = SpeechLMModel.restore_from(str(tmp_path / "small.nemo"))
    assert set(restored.cfg.reference_fingerprints) == {"llm"}
    assert_same_weights(restored, model)


def test_trainable_only_records_local_references_as_absolute_paths(assets, tmp_path, monkeypatch):
    """Recorded as given (a path relative to where training ran), the file restored only from that directory."""
    shutil.copytree(assets["llm"], tmp_path / "llm")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(7)
    model = SpeechLMModel(model_config("llm"))
    model.save_trainable_to(str(tmp_path / "small.nemo"))
    assert model.cfg.pretrained_llm == "llm"  # the model's own config is left as it was
    monkeypatch.chdir(tmp_path.parent)
    restored = SpeechLMModel.restore_from(str(tmp_path / "small.nemo"))
    assert restored.cfg.pretrained_llm == str(tmp_path / "llm")
    assert_same_weights(restored, model)


def test_trainable_only_refuses_a_base_llm_replaced_in_place(assets, tmp_path):
    """The file's adapters were trained on one base LLM; the reference now holds another of the same shape."""
    llm = tmp_path / "llm"
    shutil.copytree(assets["llm"], llm)
    SpeechLMModel(model_config(llm)).save_trainable_to(str(tmp_path / "small.nemo"))
    shutil.rmtree(llm)
    make_tiny_llm(llm, seed=1)
    with pytest.raises(CheckpointError, match=r"small\.nemo: this trainable-only model was trained on other llm weights "
                                              r"than '.*llm' gives now") as raised:
        restore_checked(SpeechLMModel, tmp_path / "small.nemo")
    assert "model.pretrained_llm" in raised.value.fix
    SpeechLMModel(model_config(llm))  # a failed restore leaves the process able to build models (NeMo's flag reset)


def test_trainable_only_restores_the_trained_architecture_when_a_reference_config_changed(assets, tmp_path):
    """The references give the base *weights*; the architecture is the one trained. A reference whose config changed
    in place (a hub revision's, same weights) used to win silently: the LLM's config.json, the ASR model's
    preprocessor; the fingerprint of the weights could not see it."""
    import json
    import tarfile

    llm, asr = tmp_path / "llm", tmp_path / "asr.nemo"
    shutil.copytree(assets["llm"], llm)
    shutil.copy(assets["asr"], asr)
    torch.manual_seed(5)
    model = SpeechLMModel(model_config(llm, pretrained_asr=str(asr), freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$",
                                                                                  r"^perception\.preprocessor\..+$"])).eval()
    model.save_trainable_to(str(tmp_path / "small.nemo"))
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.5}))
    with tarfile.open(asr) as tar:
        members = [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]
    with tarfile.open(asr, "w") as tar:
        for member, data in members:
            if member.name.endswith("model_config.yaml"):
                assert b"per_feature" in data
                data = data.replace(b"per_feature", b"all_features")
                member.size = len(data)
            tar.addfile(member, io.BytesIO(data) if data is not None else None)
    restored = SpeechLMModel.restore_from(str(tmp_path / "small.nemo")).eval()
    assert restored.llm.config.rms_norm_eps == model.llm.config.rms_norm_eps != 0.5
    assert restored.cfg.perception.preprocessor.normalize == "per_feature"
    assert_same_weights(restored, model)
    wav = torch.randn(16000)
    ids = model.encode_prompt("Repeat: <|audio|>")[None]
    with torch.no_grad():
        batch = {"input_ids": ids, "audios": wav[None], "audio_lens": torch.tensor([16000])}
        before = model(*model.splice_audio(batch)[::2])
        after = restored(*restored.splice_audio(batch)[::2])
    torch.testing.assert_close(after, before)


def test_reference_fingerprint_is_the_same_in_fp32_and_bf16_and_tells_other_weights_apart():
    """A bf16-true run's model holds its base LLM in bf16; restoring loads the reference in fp32."""
    torch.manual_seed(0)
    weights = {"llm.a.weight": torch.randn(300, 70), "llm.b.weight": torch.randn(5)}
    assert fingerprint(weights) == fingerprint({k: v.to(torch.bfloat16) for k, v in weights.items()})
    other = {**weights, "llm.a.weight": weights["llm.a.weight"] + 0.01 * torch.randn(300, 70)}  # a fine-tune's drift
    assert fingerprint(other) != fingerprint(weights)
    assert fingerprint({"llm.c.weight": weights["llm.a.weight"], "llm.b.weight": weights["llm.b.weight"]}) != fingerprint(weights)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    left, right = a.state_dict(), b.state_dict()
    assert left.keys() == right.keys()
    assert [name for name in left if not torch.equal(left[name], right[name])] == []


def test_optimizer_gets_only_trainable_parameters_and_a_scheduler(assets):
    cfg = model_config(
        assets["llm"],
        lr_scheduler={"_target_": "nemo.core.optim.lr_scheduler.CosineAnnealing", "max_steps": 10, "warmup_steps": 2, "min_lr": 1e-6},
    )
    model = SpeechLMModel(cfg)
    out = model.configure_optimizers()
    optimized = {id(p) for group in out["optimizer"].param_groups for p in group["params"]}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert optimized == trainable and len(trainable) < len(list(model.parameters()))
    assert out["lr_scheduler"]["interval"] == "step"
