"""MTBI: interleaving spans, behaviors data, the CE/KL objective, and the frozen-encoder feature cache."""
import dataclasses
import json
import logging
import os
import random

import pytest
import soundfile
import torch
from lightning.pytorch import Trainer
from nemo.collections.asr.modules import SpectrogramAugmentation
from omegaconf import OmegaConf, open_dict

from nemo_speechlm.data.behaviors import behavior_to_conversation
from nemo_speechlm.data.conversations import cut_for_audio
from nemo_speechlm.data.datamodule import build_datamodule, fill_model_settings
from nemo_speechlm.data.dataset import as_text_messages
from nemo_speechlm.data.feature_cache import (FeatureCache, cache_dtype, encoder_fingerprint, fill_feature_cache,
                                              open_feature_cache, transcribed_utterances, utterances_in)
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.data.interleaving import InterleaveConfig, choose_spans
from nemo_speechlm.data.manifest import ManifestError, read_manifest
from nemo_speechlm.data.task_catalog import TaskCatalog, render_prompt
from nemo_speechlm.models import MTBIModel
from nemo_speechlm.models.mtbi_model import token_kl
from nemo_speechlm.models.speechlm_model import IGNORE_INDEX, cross_entropy
from nemo_speechlm.parts.packing import pack_rows
from tests.tiny_assets import make_tiny_llm, make_tiny_whisper, tiny_whisper_perception, even_word_times, write_behaviors
from tests.conftest import model_config

TAG = "<|audio|>"


@pytest.fixture(scope="module")
def behaviors(assets, tmp_path_factory):
    return write_behaviors(assets["manifest"], tmp_path_factory.mktemp("behaviors") / "behaviors.jsonl")


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


def _entries(path):
    return list(read_manifest(path, required_text_fields=()))


# ------------------------------------------------------------------ interleaving


def test_spans_cover_replaced_words_and_keep_text_in_order():
    words = even_word_times("one two three four five six seven eight nine ten", 5.0)
    for seed in range(50):
        spans = choose_spans(words, InterleaveConfig(prob=1.0, text_span_words=(1, 3), speech_span_words=(1, 3)), random.Random(seed))
        assert [s.first for s in spans] == [0] + [s.last for s in spans[:-1]] and spans[-1].last == len(words)
        assert {s.is_speech for s in spans} == {True, False}
        for s in spans:
            assert s.text == " ".join(w["word"] for w in words[s.first : s.last])
            if s.is_speech:
                assert (s.start, s.end) == (words[s.first]["start"], words[s.last - 1]["end"])
                assert 1 <= s.last - s.first <= 3


def test_interleaved_conversation_cuts_audio_by_time(behaviors):
    entry = next(e for e in _entries(behaviors) if len(set(e["text"].split())) == len(e["text"].split()))
    conv = behavior_to_conversation(entry, TAG, 0.08, TaskCatalog.load(), InterleaveConfig(prob=1.0), random.Random(3))
    audio_turns = [t for t in conv.turns if not hasattr(t, "value")]
    assert audio_turns
    for turn in audio_turns:
        span_words = turn.text.split()
        match = [w for w in entry["words"] if w["word"] in span_words]
        assert turn.cut.start == pytest.approx(match[0]["start"]) and turn.cut.end == pytest.approx(match[-1]["end"])
    user = as_text_messages(conv)[0]["content"]
    assert user == render_prompt(entry["prompt"], " ".join(w["word"] for w in entry["words"]))


def test_a_word_that_lasts_no_time_is_read_as_text_when_interleaved(behaviors):
    """An aligner clamping a word at the audio's end writes start == end; drawn as a speech span alone it used to
    stop training (a ValueError from cutting an empty span)."""
    first = _entries(behaviors)[0]
    words = [dict(w) for w in first["words"]]
    words[-1]["start"] = words[-1]["end"]
    entry = dataclasses.replace(first, data={**first.data, "words": words})
    cfg = InterleaveConfig(prob=1.0, text_span_words=(1, 1), speech_span_words=(1, 1))
    alone = 0
    for seed in range(20):
        conv = behavior_to_conversation(entry, TAG, 0.08, TaskCatalog.load(), cfg, random.Random(seed))
        spoken = [t.text for t in conv.turns if hasattr(t, "cut")]
        assert words[-1]["word"] not in spoken and all(t.cut.duration > 0 for t in conv.turns if hasattr(t, "cut"))
        assert as_text_messages(conv)[0]["content"] == render_prompt(entry["prompt"], " ".join(w["word"] for w in words))
        alone += choose_spans(words, cfg, random.Random(seed))[-1].is_speech
    assert alone  # some seeds did draw the empty word as a speech span


def test_a_word_starting_at_the_audios_end_is_read_as_text_when_interleaved(behaviors):
    """Alignment times may pass the end by validate_words' tolerance; a speech span starting there was cut from
    nothing and stopped training with a bare ValueError (no file or line)."""
    first = _entries(behaviors)[0]
    words = [dict(w) for w in first["words"]]
    words[-1].update(start=first["duration"] + 0.02, end=first["duration"] + 0.06)
    entry = dataclasses.replace(first, data={**first.data, "words": words})
    cfg = InterleaveConfig(prob=1.0, text_span_words=(1, 1), speech_span_words=(1, 1))
    drawn = 0
    for seed in range(20):
        conv = behavior_to_conversation(entry, TAG, 0.08, TaskCatalog.load(), cfg, random.Random(seed))
        assert words[-1]["word"] not in [t.text for t in conv.turns if hasattr(t, "cut")]
        drawn += choose_spans(words, cfg, random.Random(seed))[-1].is_speech
    assert drawn


def test_words_spell_the_transcript_as_outside_aligners_write_them():
    """Apostrophes dropped and Unicode in another normal form are the same words; other words are not."""
    from nemo_speechlm.data.behaviors import _check_words_for_interleaving
    from nemo_speechlm.data.manifest import ManifestEntry

    entry = ManifestEntry("b.jsonl", 1, {"text": "Don't go to the café."})
    _check_words_for_interleaving(entry, [{"word": w} for w in ("dont", "go", "to", "the", "cafe\u0301")])
    with pytest.raises(ManifestError, match=r"b\.jsonl:1 field 'words': the words .* do not spell the transcript"):
        _check_words_for_interleaving(entry, [{"word": w} for w in ("do", "go", "to", "the", "cafe")])


@pytest.mark.parametrize("prompt_format", [None, "qwen"])
def test_the_student_reads_the_prompt_the_teacher_reads_with_the_speech_in_place_of_the_words(
        assets, whisper_dir, behaviors, prompt_format):
    """Under the LLM's chat template and a NeMo prompt format alike: the speech row is the teacher's row with the
    transcript replaced by the locator, nothing added. NeMo's own prompt function put a space on each side of every
    locator (``model.prompt_format=qwen``: "said:  <|audio|>"), where inference and the teacher have none."""
    model = _mtbi_model(assets, whisper_dir, prompt_format=prompt_format, mtbi={"kl_weight": 1.0})
    tokenizer = model.tokenizer.tokenizer
    batch = _first_batch(model, behaviors, prob=0.0)
    texts = {e["text"] for e in _entries(behaviors)}
    for student, teacher in zip(batch["input_ids"], batch["teacher_input_ids"]):
        student = tokenizer.decode(student[student != model.text_pad_id])
        teacher = tokenizer.decode(teacher[teacher != model.text_pad_id])
        transcript = next(t for t in texts if t in teacher)
        assert student == teacher.replace(transcript, TAG, 1)
    interleaved = _first_batch(model, behaviors, prob=1.0)["input_ids"]
    assert not any("  " in tokenizer.decode(row[row != model.text_pad_id]) for row in interleaved)


@pytest.mark.parametrize("key, value", [("prompt_format", "qwen"), ("sample_rate", 8000)])
def test_a_data_config_may_not_train_under_another_prompt_format_than_the_model_uses(assets, whisper_dir, behaviors,
                                                                                   key, value):
    """The model answers under the LLM's chat template, and hears audio at its encoder's rate (NeMo's loader resampled
    to its own 16 kHz default whatever the encoder's, where inference and the feature cache use the encoder's)."""
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 1.0})
    assert fill_model_settings(_data_cfg(behaviors), model).train_ds.sample_rate == model.sampling_rate == 16000
    cfg = _data_cfg(behaviors)
    cfg.train_ds[key] = value
    with pytest.raises(ConfigError, match=f"data.train_ds.{key} is {value!r} but the model's is"):
        build_datamodule(cfg, model)


def test_ratio_zero_is_the_plain_speech_input(behaviors):
    entry = _entries(behaviors)[1]
    conv = behavior_to_conversation(entry, TAG, 0.08, TaskCatalog.load(), InterleaveConfig(prob=0.0), random.Random(0))
    audio_turns = [t for t in conv.turns if not hasattr(t, "value")]
    assert len(audio_turns) == 1 and audio_turns[0].cut.duration == pytest.approx(entry["duration"])
    assert as_text_messages(conv)[0]["content"] == render_prompt(entry["prompt"], entry["text"])
    assert conv.turns[-1].value == entry["response"]


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_the_bare_reply_prompt_is_the_speech_alone(behaviors, prob):
    """The shipped ``reply`` task trains on the speech with no instruction: the user turn holds the audio (or,
    interleaved, audio and text spans of the same words) and nothing else, no empty text turns around it."""
    first = _entries(behaviors)[0]
    entry = dataclasses.replace(first, data={**first.data, "task": "reply", "prompt": "{input}"})
    assert [p.text for p in TaskCatalog.load().task("reply").prompts_in("train")] == ["{input}"]
    conv = behavior_to_conversation(entry, TAG, 0.08, TaskCatalog.load(), InterleaveConfig(prob=prob), random.Random(3))
    user = [t for t in conv.turns if t.role == "user"]
    assert all(hasattr(t, "cut") or t.value.strip() for t in user)  # no empty text turn
    assert sum(hasattr(t, "cut") for t in user) >= 1
    assert as_text_messages(conv)[0]["content"].split() == " ".join(w["word"] for w in entry["words"]).split()
    assert [t.role for t in conv.turns][-1] == "assistant"


@pytest.mark.parametrize(
    "change, field",
    [
        ({"response": None}, "response"),
        ({"task": "no_such_task"}, "task"),
        ({"task": "translate_de"}, "task"),  # held out in the catalog
        ({"words": "reverse"}, "words"),
        ({"words": "too_long"}, "words"),
        # answered under a system prompt the training (None here) does not use
        ({"teacher": {"source": "llm", "model": "m", "system_prompt": "Be brief."}}, "teacher"),
        # held-out prompts up to case and whitespace, of any task, and lines marked held out: all trained before
        ({"prompt": "summarize:heldout:0:upper+space"}, "prompt"),
        ({"prompt": "explain_child:heldout:0", "task": "paraphrase"}, "prompt"),  # a held-out task's prompt
        ({"split": "heldout"}, "split"),
        # words of another transcript (a corrected text, not aligned again), with interleaving on
        ({"text": "a corrected transcript of the clip"}, "words"),
    ],
)
def test_bad_behavior_lines_are_clear_errors(behaviors, tmp_path, change, field):
    row = json.loads(open(behaviors).readline())
    catalog = TaskCatalog.load()
    for key, value in list(change.items()):
        if isinstance(value, str) and ":heldout:" in value:
            task, _, index, *how = value.split(":")
            text = [p.text for p in catalog.task(task).prompts if task != "summarize" or p.split == "heldout"][int(index)]
            change = {**change, key: text.replace("{input}", "\0").upper().replace("\0", "{input}") + " " if how else text}
    key, value = next(iter(change.items()))
    row.update({k: v for k, v in change.items() if k != key})
    if value == "reverse":
        row["words"] = list(reversed(row["words"]))
    elif value == "too_long":
        row["words"][-1]["end"] = row["duration"] + 5
    elif value is None:
        del row[key]
    else:
        row[key] = value
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(ManifestError) as err:
        entries = list(read_manifest(bad, required_text_fields=("text", "task", "prompt", "response")))
        behavior_to_conversation(entries[0], TAG, 0.08, catalog, InterleaveConfig(prob=0.3))
    assert f"{bad}:1" in str(err.value) and f"field '{field}'" in str(err.value), str(err.value)



def test_behaviors_train_under_the_system_prompt_they_were_answered_with(behaviors):
    def system_turns(conversation) -> list[str]:
        return [t.value for t in conversation.turns if getattr(t, "role", None) == "system"]

    entry = _entries(behaviors)[0]
    for answered_with, trained_with, system in [("Be brief.", "Be brief.", ["Be brief."]), (None, None, []), (None, "", [])]:
        line = dataclasses.replace(entry, data={**entry.data, "teacher": {"source": "llm", "system_prompt": answered_with}})
        conversation = behavior_to_conversation(line, TAG, 0.08, TaskCatalog.load(), system_prompt=trained_with)
        assert system_turns(conversation) == system and getattr(conversation.turns[0], "role", None) == (
            "system" if system else "user")
    ground_truth = dataclasses.replace(entry, data={**entry.data, "teacher": {"source": "ground_truth", "field": "text"}})
    conversation = behavior_to_conversation(ground_truth, TAG, 0.08, TaskCatalog.load(), system_prompt="Be brief.")
    assert system_turns(conversation) == ["Be brief."]  # no LLM asked: trained under the configured one


# ------------------------------------------------------------------ objective


def test_token_kl_is_zero_for_identical_inputs_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    targets = torch.full((2, 5), IGNORE_INDEX)
    targets[0, 3:] = torch.tensor([1, 2])
    shifted = torch.full((2, 7, 11), 0.0)
    shifted[:, 2:] = logits  # the teacher has a longer prefix: response tokens are matched by order
    t_targets = torch.full((2, 7), IGNORE_INDEX)
    t_targets[0, 5:] = torch.tensor([1, 2])
    assert token_kl(logits, targets, shifted, t_targets).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(logits, targets, torch.randn(2, 7, 11), t_targets).item() > 0
    t_targets[0, 6] = 3
    with pytest.raises(ValueError, match="responses differ"):
        token_kl(logits, targets, shifted, t_targets)


def _mtbi_model(assets, whisper_dir, freeze_params=(r"^llm\..+$", r"^perception\.encoder\..+$"), **overrides):
    cfg = model_config(assets["llm"], target="nemo_speechlm.models.MTBIModel", **overrides)
    cfg.perception.update(tiny_whisper_perception(whisper_dir))
    cfg.perception.modality_adapter.stack = 4
    cfg.freeze_params = list(freeze_params)
    return MTBIModel(cfg)


def _data_cfg(behaviors, prob=1.0, batch_size=4):
    return OmegaConf.create(
        {
            "train_ds": {
                "input_cfg": [{"type": "mtbi_behaviors", "manifest_filepath": str(behaviors), "interleave": {"prob": prob}}],
                "batch_size": batch_size,
                "shuffle": False,
                "num_workers": 0,
                "seed": 0,
                "shard_seed": 0,
            }
        }
    )


def _first_batch(model, behaviors, cache=None, prob=1.0):
    dm = build_datamodule(_data_cfg(behaviors, prob), model, cache)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def test_kl_is_zero_when_the_student_reads_the_same_text(assets, whisper_dir, behaviors):
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 1.0}).eval()
    batch = _first_batch(model, behaviors)
    text_only = {"input_ids": batch["teacher_input_ids"], "loss_mask": batch["teacher_loss_mask"], **{
        k: batch[k] for k in ("teacher_input_ids", "teacher_loss_mask")}}
    with torch.no_grad():
        losses = model.compute_losses(text_only)
        speech = model.compute_losses(batch)
    assert losses["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert speech["kl"].item() > 100 * max(losses["kl"].item(), 1e-7)  # speech in place of text does change it


def test_the_kl_teacher_stays_the_pretrained_llm_when_the_llm_itself_trains(assets, whisper_dir, behaviors):
    """Without LoRA and with the LLM trainable, the teacher must not be the student's own drifting LLM."""
    model = _mtbi_model(assets, whisper_dir, freeze_params=[r"^perception\.encoder\..+$"], mtbi={"kl_weight": 1.0})
    assert any(p.requires_grad for p in model.llm.parameters())
    batch = _first_batch(model, behaviors)
    ids = batch["teacher_input_ids"]
    teacher = lambda: model.text_teacher_logits(ids, batch["teacher_loss_mask"])[0]  # noqa: E731
    student = lambda: model(model.embed_text(ids), ids != model.text_pad_id)  # noqa: E731 - the LLM that trains
    model.eval()
    with torch.no_grad():
        teacher_before, student_before = teacher(), student()
        for p in model.llm.parameters():  # a training step's worth of drift, in every LLM weight (embeddings too)
            p.add_(0.05 * torch.randn_like(p))
        student_llm = model.llm
        assert torch.equal(teacher(), teacher_before)
        assert model.llm is student_llm  # the student's LLM is back in place after the teacher ran
        assert (student() - student_before).abs().max() > 1e-2  # the drift the teacher must not follow


def test_the_kl_teacher_runs_without_dropout_inside_a_training_step(assets, whisper_dir, behaviors, tmp_path):
    """With LoRA the LLM trains, so in a training step it is in training mode; an LLM with dropout must still give
    the KL the same teacher every time (the base LLM as at inference), and stay in training mode after."""
    llm = make_tiny_llm(tmp_path / "llm", attention_dropout=0.5)
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    model = _mtbi_model({**assets, "llm": llm}, whisper_dir, lora=lora, mtbi={"kl_weight": 1.0}).train()
    batch = _first_batch(model, behaviors)
    ids = batch["teacher_input_ids"]
    with torch.no_grad():
        teacher = [model.text_teacher_logits(ids, batch["teacher_loss_mask"])[0] for _ in range(2)]
        student = [model(model.embed_text(ids), ids != model.text_pad_id) for _ in range(2)]
    assert not torch.equal(student[0], student[1])  # the dropout the teacher must not have
    assert torch.equal(teacher[0], teacher[1])
    assert all(m.training for m in model.llm.modules())


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_a_frozen_connector_keeps_augmenting_in_training_steps(assets, whisper_dir, behaviors):
    """Deliberate and measured (docs/connector.md, "SpecAugment in stage 2"): frozen after pre-alignment, the
    connector's SpecAugment still masks the speech the LLM trains on, while the frozen encoder and LLM run as at
    inference. Running the connector as at inference too kept ROUGE-L level and the held-out repeat WER no lower."""
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 0.0})
    model.perception.modality_adapter.spec_augment = SpectrogramAugmentation(time_masks=4, time_width=5)
    for param in [*model.perception.modality_adapter.parameters(), *model.perception.proj.parameters()]:
        param.requires_grad_(False)
    batch = _first_batch(model, behaviors, prob=0.0)
    model.train()
    losses = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # the masks' randomness
        with torch.no_grad():
            losses.append(model.training_step(batch, 0).item())
    assert losses[0] != losses[1] and model.perception.modality_adapter.training
    assert not model.llm.training and not model.perception.encoder.training


def test_losses_from_response_logits_equal_full_vocabulary_logits(assets, whisper_dir, behaviors):
    """The LM head runs only where a target is; CE and KL must not change (interleaved rows included)."""
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 1.0}).eval()
    batch = _first_batch(model, behaviors, prob=0.5)
    with torch.no_grad():
        inputs = model.prepare_inputs(batch)
        full = model(inputs["input_embeds"], inputs["attention_mask"])
        kept, kept_targets = model.response_logits(inputs["input_embeds"], inputs["attention_mask"], inputs["target_ids"])
        teacher = model(model.embed_text(batch["teacher_input_ids"])[:, :-1],
                        (batch["teacher_input_ids"] != model.text_pad_id)[:, :-1])
        teacher_targets = batch["teacher_input_ids"].where(batch["teacher_loss_mask"], IGNORE_INDEX)[:, 1:]
        losses = model.compute_losses(batch)
    assert kept.shape[:2].numel() < full.shape[:2].numel()  # prompt and speech positions were dropped
    assert losses["ce"].item() == pytest.approx(cross_entropy(full, inputs["target_ids"]).item(), rel=1e-6)
    full_kl = token_kl(full, inputs["target_ids"], teacher, teacher_targets)
    # The KL of two nearly equal distributions is tiny (~7e-4 here): compare it to the logits' rounding, not relatively.
    assert losses["kl"].item() == pytest.approx(full_kl.item(), abs=1e-6)
    assert torch.equal(kept_targets[kept_targets != IGNORE_INDEX], inputs["target_ids"][inputs["target_ids"] != IGNORE_INDEX])


def test_packed_rows_give_the_padded_batch_losses_and_gradients(assets, whisper_dir, behaviors):
    """model.pack_sequences lays the batch's sequences end to end in fewer rows: same CE, KL and gradients."""
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 1.0}).eval()  # eval: no random masking
    batch = _first_batch(model, behaviors, prob=0.5)
    rows = model.prepare_inputs(batch)["attention_mask"]
    assert pack_rows(rows)[0].shape[0] < rows.shape[0]  # the plan really packs this batch
    results = {}
    for pack in (False, True):
        with open_dict(model.cfg):
            model.cfg.pack_sequences = pack
        model.zero_grad()
        losses = model.compute_losses(batch)
        losses["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[pack] = ({k: v.item() for k, v in losses.items()}, grads)
    (padded, padded_grads), (packed, packed_grads) = results[False], results[True]
    assert model._packing_checked  # the LLM was tried once before packing was trusted
    assert packed == pytest.approx(padded, rel=1e-5, abs=1e-6)  # abs: the KL is ~7e-4, its rounding ~1e-7
    assert padded_grads.keys() == packed_grads.keys() and padded_grads
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_ce_and_kl_decrease_with_training(assets, whisper_dir, behaviors, tmp_path):
    torch.manual_seed(0)
    # Only the connector trains, against a tiny random frozen LLM: its distributions are nearly
    # flat, so KL starts small (weight it up) and CE can only move a little (6.01 -> 5.95 here).
    model = _mtbi_model(assets, whisper_dir, mtbi={"kl_weight": 50.0}, optimizer={"_target_": "torch.optim.AdamW", "lr": 1e-2})
    fixed = _first_batch(model, behaviors, prob=0.0)
    with torch.no_grad():
        before = {k: v.item() for k, v in model.eval().compute_losses(fixed).items()}
    trainer = Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, use_distributed_sampler=False,
                      default_root_dir=tmp_path)
    trainer.fit(model.train(), build_datamodule(_data_cfg(behaviors, prob=0.5), model))
    with torch.no_grad():
        after = {k: v.item() for k, v in model.eval().compute_losses(fixed).items()}
    assert after["ce"] < before["ce"] - 0.03, (before, after)
    assert after["kl"] < 0.7 * before["kl"], (before, after)


# ------------------------------------------------------------------ feature cache


def test_cached_features_give_the_same_loss_with_interleaving(assets, whisper_dir, behaviors, tmp_path):
    model = _mtbi_model(assets, whisper_dir).eval()
    fingerprint = encoder_fingerprint(model.perception, model.cfg.perception)
    cache = FeatureCache(tmp_path / "features", fingerprint)
    data_cfg = _data_cfg(behaviors)
    fill_model_settings(data_cfg, model)
    utterances = utterances_in(data_cfg)
    assert len(utterances) == 8  # spans map back to their 8 whole utterances
    first = fill_feature_cache(model, cache, utterances[:3])
    rest = fill_feature_cache(model, cache, utterances)  # resumes: only the missing ones are encoded
    assert (first["encoded"], rest["cached_before"], rest["encoded"]) == (3, 3, 5)
    with torch.no_grad():
        plain = model.compute_losses(_first_batch(model, behaviors))
        cached_batch = _first_batch(model, behaviors, cache)
        assert "audios" not in cached_batch and cached_batch["encoder_features"].shape[0] == 4
        cached = model.compute_losses(cached_batch)
    assert cached["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-5)


def test_the_fill_encodes_in_the_order_given_and_the_configured_batch_size(assets, whisper_dir, behaviors, tmp_path):
    """``feature_cache.batch_size`` holds for every fill (the pre-alignment's used 8 whatever it said), and
    utterances are encoded in the order given: what the recipe relies on to encode the pre-alignment
    manifest in a fixed order (``tests/test_demo.py`` checks that order in a real run)."""
    from nemo_speechlm.data.datamodule import fill_model_settings

    model = _mtbi_model(assets, whisper_dir).eval()
    data_cfg = _data_cfg(behaviors)
    fill_model_settings(data_cfg, model)
    utterances = utterances_in(data_cfg)[::-1]
    cache = open_feature_cache(OmegaConf.create({"dir": str(tmp_path / "features"), "batch_size": 3}), model)
    encode, calls = model.encode_speech, []

    def recording(audio, lengths):  # the real encoder, its calls recorded
        calls.append([int(n) for n in lengths])
        return encode(audio, lengths)

    model.encode_speech = recording
    assert fill_feature_cache(model, cache, utterances)["encoded"] == 8
    expected = [len(c.resample(model.sampling_rate).load_audio().mean(axis=0)) for c in utterances]
    assert calls == [expected[:3], expected[3:6], expected[6:]]


def test_opening_a_cache_names_the_other_caches_in_its_folder(assets, whisper_dir, tmp_path, caplog):
    """Nothing deletes a superseded cache (another run may read it); the user is told it is there."""
    nemo_logger = logging.getLogger("nemo_logger")  # NeMo's logger does not propagate to the root logger
    nemo_logger.addHandler(caplog.handler)
    try:
        model = _mtbi_model(assets, whisper_dir).eval()
        cfg = OmegaConf.create({"dir": str(tmp_path / "features")})
        open_feature_cache(cfg, model)
        assert "feature cache(s) this run does not read" not in caplog.text
        (tmp_path / "features" / "0123456789abcdef").mkdir(parents=True)
        cache = open_feature_cache(cfg, model)
    finally:
        nemo_logger.removeHandler(caplog.handler)
    assert (f"also holds 1 feature cache(s) this run does not read (0123456789abcdef): other encoder settings, weights "
            f"or storage dtype. Delete those no run needs to free the disk; this run's is {cache.root.name}.") in caplog.text


def test_a_bf16_cache_gives_bf16_true_training_the_same_loss_from_half_the_bytes(assets, whisper_dir, behaviors, tmp_path):
    from nemo_speechlm.data.datamodule import fill_model_settings
    from nemo_speechlm.parts.precision import HalfPrecisionForSpeech

    model = _mtbi_model(assets, whisper_dir).eval()
    fingerprint = encoder_fingerprint(model.perception, model.cfg.perception)
    fp32, bf16 = (FeatureCache(tmp_path / "features", fingerprint, dtype) for dtype in (torch.float32, torch.bfloat16))
    assert fp32.root != bf16.root  # one directory per storage dtype: neither reads the other's files
    data_cfg = _data_cfg(behaviors)
    fill_model_settings(data_cfg, model)
    utterances = utterances_in(data_cfg)
    for cache in (fp32, bf16):
        assert fill_feature_cache(model, cache, utterances)["encoded"] == 8
    for cut in utterances:  # exactly the rounding a bf16 adapter applies to fp32 features
        assert bf16.load(cut).dtype == torch.bfloat16 and torch.equal(bf16.load(cut), fp32.load(cut).to(torch.bfloat16))
    size = lambda cache: sum(f.stat().st_size for f in cache.root.rglob("*.npy"))  # noqa: E731
    assert size(bf16) < 0.55 * size(fp32)  # half, plus the .npy headers
    batches = [_first_batch(model, behaviors, cache) for cache in (fp32, bf16)]
    assert batches[1]["encoder_features"].dtype == torch.bfloat16
    half = HalfPrecisionForSpeech("bf16-true").convert_module(model)
    with torch.no_grad():
        losses = [half.compute_losses(b)["loss"].item() for b in batches]
    assert losses[0] == losses[1]


@pytest.mark.parametrize(("dtype", "precision", "expected"), [
    (None, "bf16-true", torch.bfloat16), (None, "bf16-mixed", torch.float32), (None, "32-true", torch.float32),
    ("float32", "bf16-true", torch.float32), ("bfloat16", "32-true", torch.bfloat16)])
def test_cache_dtype_is_bf16_under_bf16_true_unless_set(dtype, precision, expected):
    assert cache_dtype(OmegaConf.create({"dir": "f", "dtype": dtype}), precision) == expected


def test_an_unknown_cache_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="feature_cache.dtype='float16' is not one of"):
        cache_dtype(OmegaConf.create({"dir": "f", "dtype": "float16"}), "bf16-true")


def test_audio_rewritten_in_place_is_encoded_again_not_read_stale(assets, whisper_dir, tmp_path):
    model = _mtbi_model(assets, whisper_dir).eval()
    cache = FeatureCache(tmp_path / "features", encoder_fingerprint(model.perception, model.cfg.perception))
    wav = tmp_path / "utt.wav"
    audio, rate = soundfile.read(json.loads(open(assets["manifest"]).readline())["audio_filepath"])
    soundfile.write(wav, audio, rate)
    cut = cut_for_audio(str(wav), 0.0, len(audio) / rate)
    assert fill_feature_cache(model, cache, [cut])["encoded"] == 1
    before = cache.load(cut)
    soundfile.write(wav, audio[::-1].copy(), rate)  # same path, length and size; other content
    os.utime(wav, ns=(os.stat(wav).st_atime_ns, os.stat(wav).st_mtime_ns + 10**9))
    assert cut not in cache
    assert fill_feature_cache(model, cache, [cut])["encoded"] == 1
    with torch.no_grad():
        fresh = model.encode_speech(torch.as_tensor(audio[::-1].copy(), dtype=torch.float32)[None], torch.tensor([len(audio)]))[0]
    torch.testing.assert_close(cache.load(cut), fresh)
    assert not torch.allclose(before, fresh)


def test_a_whole_utterance_segment_equals_encoding_it_alone(assets, whisper_dir, behaviors):
    model = _mtbi_model(assets, whisper_dir).eval()
    batch = _first_batch(model, behaviors, prob=0.0)
    with torch.no_grad():
        sliced = model.encode_audio(batch)
        alone = model.adapt(model.encode_speech(batch["audios"], batch["audio_lens"]))
    for a, b in zip(sliced, alone):
        torch.testing.assert_close(a, b)


def test_changed_encoder_weights_change_the_fingerprint(assets, whisper_dir):
    model = _mtbi_model(assets, whisper_dir)
    before = encoder_fingerprint(model.perception, model.cfg.perception)
    with torch.no_grad():
        next(model.perception.encoder.parameters()).add_(1e-3)
    assert encoder_fingerprint(model.perception, model.cfg.perception) != before
    # the chunk length long clips are encoded in: other chunks, other features (a run with another read the first's)
    assert encoder_fingerprint(model.perception, model.cfg.perception, 10.0) != encoder_fingerprint(
        model.perception, model.cfg.perception)


def test_a_clip_just_under_the_window_is_encoded_alike_in_training_and_inference(assets, whisper_dir):
    """29.9-30 s: chunked at inference (and so in the feature cache), whole in training without the cache."""
    model = _mtbi_model(assets, whisper_dir)
    wav = torch.randn(int(29.95 * model.sampling_rate)) * 0.1
    with torch.no_grad():
        model.eval()
        inference = model.encode_speech(wav[None], torch.tensor([len(wav)]))[0]
        model.train()
        model.perception.encoder.eval()  # no dropout: the frozen encoder's mode in a training step
        training = model.encode_speech(wav[None], torch.tensor([len(wav)]))[0]
    torch.testing.assert_close(training, inference)


def test_pre_alignment_reads_every_training_utterance_whole_and_no_validation_one(assets, whisper_dir, behaviors, tmp_path):
    """Read with MTBI's interleaving, a line drawn as interleaved was left out of stage 1 (its spans stand for parts
    of it), with every token only it had; and the validation data trained the connector too."""
    rows = [json.loads(line) for line in open(assets["manifest"])]
    validation = tmp_path / "val.jsonl"
    validation.write_text(json.dumps({**rows[0], "text": "a validation sentence"}) + "\n")
    cfg = _data_cfg(behaviors, prob=1.0)
    cfg.validation_ds = {**OmegaConf.to_container(cfg.train_ds), "input_cfg": [{"type": "speechlm_manifest",
                                                                                  "manifest_filepath": str(validation)}]}
    fill_model_settings(cfg, _mtbi_model(assets, whisper_dir))
    found = sorted((cut.recording.sources[0].source, text) for cut, text in transcribed_utterances(cfg))
    assert found == sorted((e["audio_filepath"], e["text"]) for e in _entries(behaviors))


@pytest.mark.slow
def test_mtbi_script_trains_from_cached_features_and_exports(assets, whisper_dir, behaviors, tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO, run_python

    nemo = tmp_path / "mtbi.nemo"
    cmd = [
        sys.executable, str(REPO / "examples" / "mtbi_train.py"),
        "encoder=whisper", f"model.perception.encoder.pretrained_model={whisper_dir}", "model.perception.encoder.d_model=32",
        "model.perception.encoder.pad_to_window=false",
        "llm=hf", f"model.pretrained_llm={assets['llm']}", "model.perception.modality_adapter.hidden_dim=64",
        "model.mtbi.kl_weight=0.5", "model.lr_scheduler.warmup_steps=1", "connector_pretraining.steps=20",
        f"data.train_ds.input_cfg.0.manifest_filepath={behaviors}", "data.train_ds.batch_size=4",
        f"feature_cache.dir={tmp_path / 'features'}",
        "trainer.accelerator=cpu", "trainer.max_steps=3", f"exp_manager.exp_dir={tmp_path / 'runs'}", f"output_nemo={nemo}",
        "trainer.log_every_n_steps=1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "'encoded': 8" in log  # the feature cache was filled
    assert "`max_steps=3` reached" in log
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "runs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    kl = [e.value for e in events.Scalars("train_kl")]  # exp_manager's TensorBoard log
    assert len(kl) == 3 and all(v > 0 for v in kl)  # the KL term trained at every step
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 8
    wav = json.loads(open(behaviors).readline())["audio_filepath"]
    out = run_python(
        "import nemo_speechlm\n"
        "from nemo_speechlm.models import MTBIModel, SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        "assert isinstance(m, MTBIModel), type(m)\n"
        f"print('ANSWER', repr(m.respond([{wav!r}], ['Summarize: <|audio|>'], max_new_tokens=3)[0]))\n"
    )
    assert "ANSWER" in out


def test_alignment_times_rounded_past_the_end_are_clipped(assets):
    from nemo_speechlm.data.conversations import cut_for_audio
    from nemo_speechlm.data.dataset import speech_span

    entry = _entries(assets["manifest"])[0]
    cut = cut_for_audio(entry["audio_filepath"], 0.0, entry["duration"])
    span = speech_span(cut, 0.2, entry["duration"] + 0.00004)
    assert span.end == pytest.approx(cut.duration)
    with pytest.raises(ValueError, match="outside utterance"):
        speech_span(cut, 0.2, entry["duration"] + 1.0)


def test_behaviors_bucket_by_total_tokens(assets, whisper_dir, behaviors):
    """GPU recipe batching: lhotse dynamic bucketing where audio counts as duration / token_equivalent_duration."""
    model = _mtbi_model(assets, whisper_dir)
    cfg = _data_cfg(behaviors, prob=0.0)
    cfg.train_ds.pop("batch_size")
    cfg.train_ds.update({"use_multimodal_sampling": True, "batch_tokens": 200, "use_bucketing": True,
                         "num_buckets": 2, "bucket_buffer_size": 100, "shuffle": True,
                         "concurrent_bucketing": False})  # its background thread would keep pytest from exiting
    dm = build_datamodule(cfg, model)
    dm.setup("fit")
    batches = [b for _, b in zip(range(6), dm.train_dataloader())]
    for b in batches:  # each batch fits the token budget (a lone over-long example may exceed it)
        tokens = sum(c.total_length for c in b["conversations"])
        assert tokens <= 200 or len(b["conversations"]) == 1, tokens
    assert max(len(b["conversations"]) for b in batches) > 1  # batches are built by tokens, not one by one
    with torch.no_grad():
        assert torch.isfinite(model.compute_losses(batches[0])["loss"])


def test_readout_models_count_a_speech_turn_as_its_transcript_tokens(assets, whisper_dir, behaviors):
    """With the CTC read-out the LLM sees a speech turn as its transcript's tokens + 2, not its frames:
    the sampler's lengths (what bucketing and max_tokens use) count that, for whole utterances and
    interleaved spans, in ``type: group`` entries too; a value the user set is kept."""
    from nemo.collections.common.data.lhotse.text_adapters import AudioTurn

    from nemo_speechlm.data.conversations import ReadoutConversation

    for readout in (True, False):
        model = _mtbi_model(assets, whisper_dir, ctc_readout=readout)
        tokenizer = model.tokenizer.tokenizer
        cfg = _data_cfg(behaviors, prob=0.5)
        cfg.train_ds.input_cfg = [{"type": "group", "input_cfg": cfg.train_ds.input_cfg}]
        dm = build_datamodule(cfg, model)
        assert cfg.train_ds.input_cfg[0].input_cfg[0].speech_positions == ("transcript" if readout else "frames")
        dm.setup("fit")
        conversations = [c for _, b in zip(range(3), dm.train_dataloader()) for c in b["conversations"]]
        assert sum(isinstance(t, AudioTurn) for c in conversations for t in c.turns) > len(conversations)  # spans too
        for c in conversations:
            speech = [t for t in c.turns if isinstance(t, AudioTurn)]
            frames = sum(-(-t.cut.duration // c.token_equivalent_duration) - 1 for t in speech)
            words = sum(len(tokenizer(t.text, add_special_tokens=False).input_ids) + 1 for t in speech)
            assert isinstance(c, ReadoutConversation) == readout
            assert c.total_length == len(c.input_ids) + (words if readout else frames)
            assert c.input_length + c.output_length == c.total_length
    kept = _data_cfg(behaviors)
    kept.train_ds.input_cfg[0].speech_positions = "frames"
    build_datamodule(kept, model=_mtbi_model(assets, whisper_dir, ctc_readout=True))
    assert kept.train_ds.input_cfg[0].speech_positions == "frames"
