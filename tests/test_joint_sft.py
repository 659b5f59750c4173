"""Joint speech-text SFT (VoiceTextBlender): data types, group/source sampling, masks, splicing,
text retention with LoRA off, bad input, per-kind logging, and the training script end to end."""
import csv
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import nemo_speechlm
from hydra import compose, initialize_config_dir
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from nemo_speechlm.data.datamodule import build_datamodule
from nemo_speechlm.data.joint_sft import (
    ASR_AST,
    MIXED_MODAL,
    SQA,
    TEXT_SFT,
    read_joint_asr_ast,
    read_joint_mixed_modal,
    read_joint_sqa,
    read_joint_text_sft,
)
from nemo_speechlm.data.manifest import ManifestError
from nemo_speechlm.errors import InputError
from nemo_speechlm.models import JointSFTModel
from nemo_speechlm.models.joint_sft_model import batch_kind, batch_sources
from nemo_speechlm.models.speechlm_model import IGNORE_INDEX
from tests.conftest import REPO, model_config, run_python

TAG = "<|audio|>"
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "task_type": "CAUSAL_LM",
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ANSWERS = ["the cat sat", "it is raining", "we walked"]
READERS = {TEXT_SFT: read_joint_text_sft, ASR_AST: read_joint_asr_ast, SQA: read_joint_sqa, MIXED_MODAL: read_joint_mixed_modal}


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _chat(*turns):
    return [{"from": "User" if i % 2 == 0 else "Assistant", "value": v} for i, v in enumerate(turns)]


@pytest.fixture(scope="module")
def data(assets, tmp_path_factory):
    """One small file per data type over the 8 test wavs (as the generators would write them)."""
    root = tmp_path_factory.mktemp("joint_data")
    utts = [json.loads(line) for line in open(assets["manifest"])]
    audio = lambda u: {"audio_filepath": u["audio_filepath"], "duration": u["duration"]}  # noqa: E731
    mixed = [
        {"conversations": _chat(f"Please listen: {TAG} and summarize it.", "a summary", f"Now this one {TAG} too", "done"),
         "audio_filepath": [utts[i]["audio_filepath"], utts[i + 1]["audio_filepath"]],
         "duration": [utts[i]["duration"], utts[i + 1]["duration"]]}
        for i in range(0, 8, 2)
    ] + [{"conversations": _chat(f"What about {TAG}?", "fine"), **audio(u)} for u in utts[:2]]
    return {
        "asr": _write(root / "asr.jsonl", [{**audio(u), "taskname": "asr", "source_lang": "en", "target_lang": "en",
                                             "pnc": "yes", "answer": u["text"]} for u in utts]),
        "ast": _write(root / "ast.jsonl", [{**audio(u), "taskname": "ast", "source_lang": "en", "target_lang": "de",
                                             "pnc": "no", "text": "de " + u["text"]} for u in utts]),
        "sqa": _write(root / "sqa.jsonl", [{**audio(u), "question": "What is said?", "answer": u["text"],
                                             "original_text": u["text"]} for u in utts]),
        "mixed_modal": _write(root / "mixed.jsonl", mixed),
        "text_sft": _write(root / "text.jsonl", [{"conversations": _chat("hello", ANSWERS[0], "and then?", ANSWERS[1], "more", ANSWERS[2])}]
                           + [{"conversations": _chat(f"question {i}", f"answer {i}"), "system": "be brief"} for i in range(4)]),
    }


@pytest.fixture(scope="module")
def model(assets):
    torch.manual_seed(0)
    return JointSFTModel(model_config(assets["llm"], target="nemo_speechlm.models.JointSFTModel", lora=LORA)).eval()


def _joint_data_cfg(data, **train_overrides):
    """``data`` of nemo_speechlm/conf/joint_sft.yaml (the shipped weights) pointed at the test files."""
    cfg = OmegaConf.load(nemo_speechlm.CONF_DIR / "joint_sft.yaml").data
    audio = cfg.train_ds.audio.input_cfg
    for item, name in zip(audio, ("asr", "ast", "sqa", "mixed_modal")):
        item.manifest_filepath = str(data[name])
    cfg.train_ds.text.input_cfg[0].manifest_filepath = str(data["text_sft"])
    cfg.train_ds.shard_seed = 0
    cfg.train_ds.update(train_overrides)
    return cfg


def _single_loader(item: dict, batch_size=1) -> OmegaConf:
    return OmegaConf.create({"train_ds": {"input_cfg": [item], "batch_size": batch_size, "shuffle": False,
                                          "num_workers": 0, "seed": 0, "shard_seed": 0}})


def _first_batch(model, item: dict, batch_size=1) -> dict:
    dm = build_datamodule(_single_loader(item, batch_size), model)
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


def _conversations(data_type, path, **extra):
    cfg = OmegaConf.create({"type": data_type, "manifest_filepath": str(path), "audio_locator_tag": TAG,
                            "token_equivalent_duration": 0.08, "force_finite": True, **extra})
    return list(READERS[data_type](cfg)[0])


# ------------------------------------------------------------------ data types


def test_asr_ast_user_turn_is_the_canary_instruction_before_the_audio(data):
    for name, instruction in [
        ("asr", "Transcribe the content to English, with punctuations and capitalizations."),
        ("ast", "Translate the English content to German, ignoring punctuations and capitalizations."),
    ]:
        conv = _conversations(ASR_AST, data[name])[0]
        kinds = [(t.role, type(t).__name__) for t in conv.turns]
        assert kinds == [("user", "TextTurn"), ("user", "AudioTurn"), ("assistant", "TextTurn")]
        assert conv.turns[0].value == instruction + "\n"
        assert conv.custom["source"] == name
    assert _conversations(ASR_AST, data["ast"])[0].turns[-1].value.startswith("de ")  # `text` when no `answer`
    sqa = _conversations(SQA, data["sqa"])[0]
    assert sqa.turns[0].value == "What is said?\n" and sqa.turns[-1].value == json.loads(open(data["sqa"]).readline())["answer"]


# ------------------------------------------------------------------ sampling


def test_audio_text_split_and_source_shares_follow_the_config_weights(model, data):
    """400 batches from the real dataloader of nemo_speechlm/conf/joint_sft.yaml. Tolerance: 4 binomial standard
    deviations, sqrt(p(1-p)/n), of each share (n = batches for the split, audio examples per source)."""
    cfg = _joint_data_cfg(data)
    cfg.train_ds.audio.input_cfg[0].tags.source = "asr_from_tags"  # the source name comes from `tags`
    dm = build_datamodule(cfg, model)
    dm.setup("fit")
    batches, sources = Counter(), Counter()
    loader = iter(dm.train_dataloader())
    for _ in range(400):
        batch = next(loader)
        kind, names = batch_kind(batch), batch_sources(batch)
        assert (kind == "text") == (set(names) == {"text_sft"}), names  # a batch comes from one group
        batches[kind] += 1
        sources.update(names)
    n = sum(batches.values())
    p_audio = cfg.train_ds.sampler_weights.audio / sum(cfg.train_ds.sampler_weights.values())
    assert abs(batches["audio"] / n - p_audio) <= 4 * math.sqrt(p_audio * (1 - p_audio) / n), batches
    weights = {item.tags.source: item.weight for item in cfg.train_ds.audio.input_cfg}
    n_audio = sum(sources[s] for s in weights)
    assert n_audio == sum(sources.values()) - sources["text_sft"]
    shares = {}
    for source, w in weights.items():
        p = w / sum(weights.values())
        shares[source] = sources[source] / n_audio
        assert abs(shares[source] - p) <= 4 * math.sqrt(p * (1 - p) / n_audio), (source, shares, sources)
    print(f"audio batches {batches['audio'] / n:.3f} (expected {p_audio}); audio sources {shares}")


# ------------------------------------------------------------------ masks and splicing


def test_only_assistant_tokens_of_a_three_turn_conversation_carry_loss(model, data):
    batch = _first_batch(model, {"type": TEXT_SFT, "manifest_filepath": str(data["text_sft"])})
    assert batch_kind(batch) == "text" and batch["audios"] is None
    ids, mask = batch["input_ids"][0], batch["loss_mask"][0]
    hf = model.tokenizer.tokenizer
    edges = torch.diff(mask.int(), prepend=torch.tensor([0]), append=torch.tensor([0]))
    starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
    targets = [hf.decode(ids[s:e], skip_special_tokens=False) for s, e in zip(starts, ends)]
    assert targets == [f"{a}<|im_end|>" for a in ANSWERS]  # each answer + end of turn, nothing else (not its newline)
    inputs = model.prepare_inputs(batch)
    assert int((inputs["target_ids"] != IGNORE_INDEX).sum()) == int(mask.sum())


def test_mixed_modal_user_turns_splice_text_speech_text_in_order(model, data):
    batch = _first_batch(model, {"type": MIXED_MODAL, "manifest_filepath": str(data["mixed_modal"])})
    ids = batch["input_ids"][0]
    hf = model.tokenizer.tokenizer
    first, second = (ids == model.audio_locator_tag_id).nonzero().flatten().tolist()
    assert hf.decode(ids[:first]).endswith("Please listen: ")
    assert hf.decode(ids[first + 1 : second]).startswith(" and summarize it.")
    assert hf.decode(ids[first + 1 : second]).endswith("Now this one ") and hf.decode(ids[second + 1 :]).startswith(" too")
    with torch.no_grad():
        embeds, targets, _ = model.splice_audio(batch)
        audio = model.encode_audio(batch)
        text = model.embed_text(ids)
    la, lb = len(audio[0]), len(audio[1])
    pieces = [text[:first], audio[0], text[first + 1 : second], audio[1], text[second + 1 :]]
    torch.testing.assert_close(embeds[0], torch.cat(pieces))
    # no loss on the spliced audio or the user text; both assistant answers are targets
    assert (targets[0, first : first + la] == IGNORE_INDEX).all() and (targets[0, :first] == IGNORE_INDEX).all()
    assert int((targets != IGNORE_INDEX).sum()) == int(batch["loss_mask"].sum()) and lb > 0


# ------------------------------------------------------------------ text retention


def test_lora_off_gives_the_base_llm_logits_after_training(assets, model, data):
    torch.manual_seed(0)
    trained = JointSFTModel(model_config(assets["llm"], target="nemo_speechlm.models.JointSFTModel", lora=LORA))
    optimizer = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    audio_batch = _first_batch(trained, {"type": ASR_AST, "manifest_filepath": str(data["asr"])}, batch_size=2)
    text_batch = _first_batch(trained, {"type": TEXT_SFT, "manifest_filepath": str(data["text_sft"])})
    for batch in (audio_batch, text_batch, audio_batch, text_batch):  # LoRA, encoder and adapter all move
        optimizer.zero_grad()
        trained.compute_losses(batch)["loss"].backward()
        optimizer.step()
    trained.eval()
    base = AutoModelForCausalLM.from_pretrained(assets["llm"]).eval()
    ids = text_batch["input_ids"]
    with torch.no_grad():
        inputs = trained.prepare_inputs(text_batch)
        with trained.llm.disable_adapter():
            lora_off = trained(inputs["input_embeds"], inputs["attention_mask"])
        lora_on = trained(inputs["input_embeds"], inputs["attention_mask"])
        expected = base(input_ids=ids[:, :-1]).logits
    assert not torch.allclose(lora_on, expected, atol=1e-3)  # the adapters did learn something
    torch.testing.assert_close(lora_off, expected)


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "data_type, row, field, message",
    [
        (TEXT_SFT, {"conversations": [{"from": "Robot", "value": "hi"}, {"from": "Assistant", "value": "x"}]}, "conversations[0].from", "unknown role 'Robot'"),
        (TEXT_SFT, {"conversations": _chat("hi", "  ")}, "conversations[1].value", "empty"),
        (TEXT_SFT, {"conversations": _chat(f"listen {TAG}", "ok")}, "conversations", "placeholder without audio"),
        (MIXED_MODAL, {"conversations": _chat(f"a {TAG} b {TAG}", "ok")}, "conversations", "placeholder without audio"),
        (MIXED_MODAL, {"conversations": _chat("no audio mark here", "ok")}, "audio_filepath", "audio without an audio placeholder"),
        (ASR_AST, {"taskname": "ast", "source_lang": "en", "pnc": "yes", "answer": "hallo"}, "target_lang", "missing language code"),
        (ASR_AST, {"taskname": "ast", "source_lang": "en", "target_lang": "xx", "answer": "hallo"}, "target_lang", "unknown language"),
        (SQA, {"question": "what?"}, "answer", "missing or empty"),
        # an empty answer used to fall back to `text`: here, the English transcript as the German translation
        (ASR_AST, {"taskname": "ast", "source_lang": "en", "target_lang": "de", "text": "the cat sat", "answer": ""},
         "answer", "missing or empty"),
        (ASR_AST, {"taskname": "ast", "source_lang": "en", "target_lang": "de", "text": "the cat sat", "answer": None},
         "answer", "missing or empty"),
        (ASR_AST, {"taskname": "asr", "source_lang": "en", "text": " "}, "text", "missing or empty"),
    ],
)
def test_bad_lines_are_clear_errors(assets, tmp_path, data_type, row, field, message):
    utt = json.loads(open(assets["manifest"]).readline())
    if data_type != TEXT_SFT:
        row = {"audio_filepath": utt["audio_filepath"], "duration": utt["duration"], **row}
    bad = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(ManifestError) as err:
        _conversations(data_type, bad)
    assert f"{bad}:1 field '{field}'" in str(err.value) and message in str(err.value), str(err.value)


def test_a_literal_locator_beside_another_placeholder_is_an_error(assets, tmp_path):
    """With `audio_placeholder` set, the placeholder becomes the locator: a locator already in the text took the audio
    (mixed-modal) or vanished from the prompt (text SFT), silently."""
    utt = json.loads(open(assets["manifest"]).readline())
    for data_type, row in [(TEXT_SFT, {"conversations": _chat(f"The token {TAG} is special.", "ok")}),
                           (MIXED_MODAL, {"conversations": _chat(f"The token {TAG} is special. Listen: <speech> ok", "ok"),
                                          **{k: utt[k] for k in ("audio_filepath", "duration")}})]:
        bad = _write(tmp_path / f"{data_type}.jsonl", [row])
        with pytest.raises(ManifestError, match="contains the model's audio locator"):
            _conversations(data_type, bad, audio_placeholder="<speech>")


def test_a_blank_system_field_keeps_the_configured_system_prompt(data, tmp_path):
    rows = [{"system": "  ", "conversations": _chat("hi", "hello")}]
    turns = _conversations(TEXT_SFT, _write(tmp_path / "t.jsonl", rows), system_prompt="Be brief.")[0].turns
    assert (turns[0].role, turns[0].value) == ("system", "Be brief.")


def test_a_locator_in_the_system_prompt_is_an_error_naming_the_line(tmp_path):
    """The checks read the turns only: a locator in the line's or the config's system prompt stopped training at its
    batch ("1 audio locator tokens but 0 audios"), naming no file or line."""
    rows = [{"system": f"Read {TAG} aloud.", "conversations": _chat("hi", "hello")}]
    with pytest.raises(ManifestError, match=r"t\.jsonl:1 field 'system': the system prompt contains the audio locator"):
        _conversations(TEXT_SFT, _write(tmp_path / "t.jsonl", rows))
    rows = [{"conversations": _chat("hi", "hello")}]
    with pytest.raises(ManifestError, match=r"field 'system': .*\(the data config's system_prompt\)"):
        _conversations(TEXT_SFT, _write(tmp_path / "c.jsonl", rows), system_prompt=f"Listen: {TAG}")
    # another placeholder is not replaced in a system prompt: there it is text
    (conversation,) = _conversations(TEXT_SFT, _write(tmp_path / "p.jsonl", [{"system": "Say <speech>.", **rows[0]}]),
                                     audio_placeholder="<speech>")
    assert conversation.turns[0].value == "Say <speech>."


def test_a_mixed_modal_segment_of_a_longer_file_takes_its_offset(assets, tmp_path):
    """``offset`` was ignored: a segment failed its duration check, told to give the offset it had."""
    utt = json.loads(open(assets["manifest"]).readline())
    row = {"conversations": _chat(f"Listen: {TAG}", "ok"), "audio_filepath": utt["audio_filepath"],
           "offset": 0.25, "duration": round(utt["duration"] - 0.5, 3)}
    (conversation,) = _conversations(MIXED_MODAL, _write(tmp_path / "m.jsonl", [row]))
    (cut,) = [turn.cut for turn in conversation.turns if hasattr(turn, "cut")]
    assert (cut.start, cut.duration) == pytest.approx((0.25, row["duration"]))
    two = {**row, "conversations": _chat(f"{TAG} and {TAG}", "ok"), "audio_filepath": [utt["audio_filepath"]] * 2,
           "duration": [row["duration"]] * 2}  # one offset for both audios
    (conversation,) = _conversations(MIXED_MODAL, _write(tmp_path / "two.jsonl", [two]))
    assert [turn.cut.start for turn in conversation.turns if hasattr(turn, "cut")] == pytest.approx([0.25, 0.25])


def test_skip_invalid_skips_bad_lines_says_so_and_refuses_a_source_with_none_left(data, tmp_path, caplog):
    """Lines refused while their conversation is built were skipped without a word, and a source with every line
    refused vanished from the mix (its share going to the others)."""
    good = open(data["text_sft"]).read()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"conversations": _chat(f"hi {TAG}", "hello")}) + "\n" + good)
    with caplog.at_level("WARNING"):
        assert len(_conversations(TEXT_SFT, mixed, skip_invalid=True)) == len(good.splitlines())
    assert any("Skipping" in r.message and "mixed.jsonl:1" in r.message for r in caplog.records)
    only_bad = _write(tmp_path / "bad.jsonl", [{"conversations": _chat(f"hi {TAG}", "hello")}] * 2)
    with pytest.raises(InputError, match=r"bad\.jsonl: every line was skipped as invalid \(2 lines skipped"):
        _conversations(TEXT_SFT, only_bad, skip_invalid=True)


# ------------------------------------------------------------------ logging, config, script


class _BatchLosses(Callback):
    """Each batch's kind and loss, as the training loop saw them."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate, self.batches = accumulate, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Lightning hands over the loss divided by the accumulation (what was backpropagated)
        self.batches.append((batch_kind(batch), float(outputs["loss"]) * self.accumulate))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_audio_and_text_losses_and_source_counts_are_logged(assets, data, tmp_path, accumulate):
    """Each optimizer step logs the mean loss of its batches of each kind, once: under gradient accumulation the
    per-kind loss used to be written per batch, so a step number appeared once per batch with the last one's value."""
    torch.manual_seed(0)
    model = JointSFTModel(model_config(assets["llm"], target="nemo_speechlm.models.JointSFTModel", lora=LORA))
    cfg = _joint_data_cfg(data, sampler_weights={"audio": 0.5, "text": 0.5})
    cfg.train_ds.audio.batch_size = 2
    steps, batches = 8, _BatchLosses(accumulate)
    trainer = Trainer(accelerator="cpu", max_steps=steps, logger=CSVLogger(tmp_path), log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                      use_distributed_sampler=False, accumulate_grad_batches=accumulate, callbacks=[batches])
    trainer.fit(model, build_datamodule(cfg, model))
    rows = list(csv.DictReader(open(next(tmp_path.rglob("metrics.csv")))))
    logged = {k for r in rows for k, v in r.items() if v}
    assert {"train_batches_audio", "train_batches_text", "train_examples_text_sft"} <= logged
    assert any(k.startswith("train_examples_") and k != "train_examples_text_sft" for k in logged)
    losses = {}  # (step, kind) -> the loss logged for it
    for row in rows:
        for kind in ("audio", "text"):
            if row.get(f"train_{kind}_loss"):
                assert (int(row["step"]), kind) not in losses
                losses[int(row["step"]), kind] = float(row[f"train_{kind}_loss"])
    expected = {}
    for step in range(steps):
        own = batches.batches[step * accumulate:(step + 1) * accumulate]
        for kind in {k for k, _ in own}:
            expected[step, kind] = np.mean([loss for k, loss in own if k == kind])
    assert len(batches.batches) == steps * accumulate and losses.keys() == expected.keys()
    assert all(losses[key] == pytest.approx(expected[key], rel=1e-5) for key in expected)
    if accumulate > 1:  # the seed draws steps of both kinds at once
        assert any(len({k for k, _ in batches.batches[i:i + accumulate]}) == 2
                   for i in range(0, len(batches.batches), accumulate))
    assert Counter(kind for kind, _ in batches.batches) == {k: model.counts[f"batches_{k}"] for k in ("audio", "text")}
    assert model.counts["batches_text"] > 0 and model.counts["batches_audio"] > 0
    assert model.counts["examples_text_sft"] == model.counts["batches_text"]  # text batch size 1


def test_config_has_the_published_recipe():
    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("joint_sft")
    m, train = cfg.model, cfg.data.train_ds
    assert (m.lora.r, m.lora.lora_alpha, m.lora.lora_dropout) == (32, 32, 0.0)
    assert set(m.lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert list(m.freeze_params) == ["^llm\\..+$"]  # encoder + adapter train
    assert (m.optimizer.lr, m.optimizer.weight_decay, list(m.optimizer.betas)) == (1e-4, 1e-3, [0.9, 0.98])
    assert (m.lr_scheduler.warmup_steps, m.lr_scheduler.min_lr, cfg.trainer.gradient_clip_val) == (2500, 1e-6, 1.0)
    assert dict(train.sampler_weights) == {"audio": 0.85, "text": 0.15}
    assert [i.weight for i in train.audio.input_cfg] == [1.0, 1.0, 0.1, 0.1]
    assert m.pretrained_asr == "nvidia/canary-1b-flash" and m.perception.modality_adapter.n_layers == 2


@pytest.mark.slow
def test_joint_sft_script_trains_and_exports(assets, data, tmp_path):
    nemo = tmp_path / "joint.nemo"
    cmd = [
        sys.executable, str(REPO / "examples" / "joint_sft_train.py"),
        # a pretrained NeMo ASR model's encoder, as joint SFT's default (Canary) is: the group sets only pretrained_asr
        "encoder=asr_nemo", f"model.pretrained_asr={assets['asr']}", "llm=hf", f"model.pretrained_llm={assets['llm']}",
        "model.lora.r=4", "model.lora.lora_alpha=4", "model.lr_scheduler.warmup_steps=1",
        *[f"data.train_ds.audio.input_cfg.{i}.manifest_filepath={data[n]}" for i, n in enumerate(("asr", "ast", "sqa", "mixed_modal"))],
        f"data.train_ds.text.input_cfg.0.manifest_filepath={data['text_sft']}", "data.train_ds.audio.batch_size=2",
        "trainer.accelerator=cpu", "trainer.max_steps=3", f"exp_manager.exp_dir={tmp_path / 'runs'}", f"output_nemo={nemo}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "`max_steps=3` reached" in log and nemo.is_file()
    wav = json.loads(open(assets["manifest"]).readline())["audio_filepath"]
    out = run_python(
        "import nemo_speechlm\n"
        "from nemo_speechlm.models import JointSFTModel, SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        "assert isinstance(m, JointSFTModel), type(m)\n"
        "assert any('lora_' in n for n, _ in m.named_parameters())\n"
        "prompt = 'Transcribe the content to English, with punctuations and capitalizations.\\n<|audio|>'\n"
        f"print('ANSWER', repr(m.respond([{wav!r}, None], [prompt, 'hello'], max_new_tokens=3)))\n"
    )
    assert "ANSWER" in out
