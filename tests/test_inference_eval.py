"""Inference CLI and standard evaluations (ASR, AST, SQA, text retention) on a tiny LoRA model."""
import json
import subprocess
import sys

import pytest
import torch

from nemo_speechlm import inference
from nemo_speechlm.data.manifest import ManifestError, SkipSummary
from nemo_speechlm.evaluation import standard
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.metrics import utterance_wer, word_error_rate
from tests.conftest import REPO, model_config

LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}


@pytest.fixture(scope="module")
def tiny(assets, tmp_path_factory):
    """A tiny SpeechLMModel with untrained LoRA (peft initialises B to zero), and its .nemo."""
    torch.manual_seed(0)
    model = SpeechLMModel(model_config(assets["llm"], lora=LORA)).eval()
    nemo = tmp_path_factory.mktemp("infer") / "model.nemo"
    model.save_to(str(nemo))
    return model, nemo


def manifest_lines(assets) -> list[dict]:
    return [json.loads(line) for line in assets["manifest"].read_text().splitlines()]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- inference CLI


def test_cli_prints_one_answer_per_audio_and_appends_the_locator(tiny, assets):
    model, nemo = tiny
    wavs = [row["audio_filepath"] for row in manifest_lines(assets)[:2]]
    proc = subprocess.run(
        [sys.executable, "examples/infer.py", str(nemo), *wavs, "--prompt", "Repeat:", "--max-new-tokens", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = model.respond(wavs, ["Repeat:\n<|audio|>"] * 2, max_new_tokens=3)
    assert proc.stdout == "".join(a + "\n" for a in expected)  # only answers on stdout, NeMo logs go to stderr
    assert proc.stderr.count("no audio locator") == 1
    assert "torch_dtype" not in proc.stderr  # transformers' deprecation line of the LLM loading, in every command


def test_cli_missing_audio_is_a_clear_error(tiny, capsys):
    with pytest.raises(SystemExit) as exc:
        inference.main([str(tiny[1]), "/nonexistent/a.wav", "--prompt", "Repeat:"])
    assert exc.value.code == 2
    assert "audio file not found: /nonexistent/a.wav" in capsys.readouterr().err


def test_manifest_mode_writes_answers_and_resumes_only_what_is_missing(tiny, assets, tmp_path):
    out = tmp_path / "answers.jsonl"
    argv = [str(tiny[1]), "--manifest", str(assets["manifest"]), "--output", str(out), "--prompt", "Repeat: <|audio|>",
            "--max-new-tokens", "3", "--batch-size", "3"]
    inference.main(argv)
    first = out.read_text().splitlines()
    records = [json.loads(line) for line in first]
    assert len(records) == 8
    assert [r["text"] for r in records] == [row["text"] for row in manifest_lines(assets)]
    assert all(isinstance(r["answer"], str) and r["prompt"] == "Repeat: <|audio|>" for r in records)

    out.write_text("".join(line + "\n" for line in first[:-1]))  # as if interrupted before the last line
    inference.main(argv)
    summary = json.loads((tmp_path / "answers.jsonl.summary.json").read_text())
    assert (summary["done_before"], summary["written"]) == (7, 1)
    assert out.read_text().splitlines() == first

    with pytest.raises(ValueError, match="other settings.*max_new_tokens"):
        inference.infer_manifest(tiny[0], assets["manifest"], out, prompt="Repeat: <|audio|>", max_new_tokens=5,
                                 do_sample=False, model_name=inference.model_id(tiny[1]))


def test_manifest_line_with_missing_audio_is_skipped_and_counted(tiny, assets, tmp_path):
    rows = manifest_lines(assets)[:2]
    rows.insert(1, {**rows[0], "audio_filepath": str(tmp_path / "gone.wav")})
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(ManifestError, match=r"m\.jsonl:2 field 'audio_filepath': audio file does not exist"):
        inference.infer_manifest(tiny[0], manifest, tmp_path / "a.jsonl", prompt="Repeat:", max_new_tokens=2)
    skipped = SkipSummary()
    summary = inference.infer_manifest(tiny[0], manifest, tmp_path / "b.jsonl", prompt="Repeat:", skip_invalid=True,
                                       skipped=skipped, max_new_tokens=2)
    assert (summary.written, skipped.total, dict(skipped.counts)) == (2, 1, {"audio_filepath": 1})


# --------------------------------------------------------------------------- standard evaluations


def test_asr_eval_writes_per_utterance_wer_and_corpus_wer(tiny, assets, tmp_path):
    metrics = standard.evaluate_asr(tiny[0], assets["manifest"], tmp_path, batch_size=4, max_new_tokens=4)
    records = [json.loads(line) for line in (tmp_path / "asr_predictions.jsonl").read_text().splitlines()]
    assert len(records) == 8 and metrics["num_utterances"] == 8
    assert records[0]["prompt"] == "Transcribe the content to English, with punctuations and capitalizations.\n<|audio|>"
    refs, hyps = [r["reference"] for r in records], [r["prediction"] for r in records]
    assert refs == [row["text"] for row in manifest_lines(assets)]
    assert all(r["wer"] == utterance_wer(r["reference"], r["prediction"]) for r in records)
    assert metrics["wer"] == word_error_rate(refs, hyps)["wer"]
    assert json.loads((tmp_path / "asr_metrics.json").read_text())["wer"] == metrics["wer"]


def test_a_resumed_evaluation_scores_against_the_references_as_they_are_now(tiny, assets, tmp_path):
    """Answers resume by audio and prompt; references and scores come from the manifest and settings of this run.
    A corrected transcript, another --reference-field or --no-normalize used to keep the first run's."""
    rows = manifest_lines(assets)
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    standard.evaluate_asr(tiny[0], manifest, tmp_path / "out", batch_size=4, max_new_tokens=4)
    answers = [r["prediction"] for r in _records(tmp_path / "out" / "asr_predictions.jsonl")]
    rows[0] = {**rows[0], "text": "a corrected transcript", "alt": "Another, Reference."}
    for row in rows[1:]:
        row["alt"] = row["text"].upper()
    write_jsonl(tmp_path / "m.jsonl", rows)
    for kwargs in ({}, {"reference_field": "alt"}, {"reference_field": "alt", "normalize": False}):
        metrics = standard.evaluate_asr(tiny[0], manifest, tmp_path / "out", batch_size=4, max_new_tokens=4, **kwargs)
        records = _records(tmp_path / "out" / "asr_predictions.jsonl")
        field, normalize = kwargs.get("reference_field", "text"), kwargs.get("normalize", True)
        refs = [row[field] for row in rows]
        assert [r["prediction"] for r in records] == answers  # resumed, not answered again
        assert [r["reference"] for r in records] == refs
        assert all(r["wer"] == utterance_wer(r["reference"], r["prediction"], normalize) for r in records)
        assert metrics["wer"] == word_error_rate(refs, answers, normalize)["wer"]


def test_an_answer_to_an_edited_question_or_segment_is_made_anew(tiny, assets, tmp_path):
    """Answers resume by the line's key (its own ``key`` field, or audio and offset): an edited question or a
    corrected segment duration kept the old answer, relabelled with the new question or duration."""
    rows = [{**row, "key": f"q{i}", "question": "What is said?", "answer": row["text"], "offset": 0.0}
            for i, row in enumerate(manifest_lines(assets)[:4])]
    rows[3] = {**rows[3], "offset": 0.1, "duration": round(rows[3]["duration"] - 0.1, 3)}
    manifest = write_jsonl(tmp_path / "sqa.jsonl", rows)
    run = dict(batch_size=4, max_new_tokens=3)
    standard.evaluate_sqa(tiny[0], manifest, tmp_path / "out", **run)
    first = {r["key"]: r for r in _records(tmp_path / "out" / "sqa_predictions.jsonl")}
    rows[0]["question"] = "Who speaks?"
    rows[1]["duration"] = round(rows[1]["duration"] / 2, 3)
    del rows[3]["offset"]  # the segment now starts at 0 (it kept the answer about the segment from 0.1 s)
    write_jsonl(tmp_path / "sqa.jsonl", rows)
    standard.evaluate_sqa(tiny[0], manifest, tmp_path / "out", **run)
    summary = json.loads((tmp_path / "out" / "sqa_predictions.jsonl.summary.json").read_text())
    assert (summary["done_before"], summary["written"]) == (1, 3)
    records = {r["key"]: r for r in _records(tmp_path / "out" / "sqa_predictions.jsonl")}
    assert records["q0"]["question"] == "Who speaks?" and records["q0"]["prompt"].startswith("Who speaks?")
    assert records["q1"]["duration"] == rows[1]["duration"] and records["q2"] == first["q2"]
    assert "offset" in first["q3"] and "offset" not in records["q3"]


def test_a_resume_in_another_dtype_or_answer_field_is_refused(tiny, assets, tmp_path):
    """The settings record the LLM's dtype (``--bf16`` casts it) and inference's answer field: a resumed run in bf16
    mixed its answers with fp32 ones, and another ``--answer-field`` mixed two field names in one file."""
    out = tmp_path / "a.jsonl"
    inference.infer_manifest(tiny[0], assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m")
    with pytest.raises(ValueError, match=r"other settings \(answer_field: 'answer' -> 'prediction'\)"):
        inference.infer_manifest(tiny[0], assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m",
                                 answer_field="prediction")
    old = tmp_path / "old.jsonl"  # written before the answer field was recorded, with another one: resumes
    inference.infer_manifest(tiny[0], assets["manifest"], old, prompt="Repeat:", max_new_tokens=2, model_name="m",
                             answer_field="prediction")
    settings = tmp_path / "old.jsonl.settings.json"
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "answer_field"}))
    inference.infer_manifest(tiny[0], assets["manifest"], old, prompt="Repeat:", max_new_tokens=2, model_name="m",
                             answer_field="prediction")
    bf16 = SpeechLMModel.restore_from(str(tiny[1])).eval()
    bf16.llm.to(torch.bfloat16)  # what load_model(bf16=True) does (it needs CUDA)
    with pytest.raises(ValueError, match=r"other settings \(llm_dtype: 'float32' -> 'bfloat16'\)"):
        inference.infer_manifest(bf16, assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m")
    standard.evaluate_asr(tiny[0], assets["manifest"], tmp_path / "asr", max_new_tokens=2, model_name="m")
    with pytest.raises(ValueError, match=r"other settings \(llm_dtype: 'float32' -> 'bfloat16'\)"):
        standard.evaluate_asr(bf16, assets["manifest"], tmp_path / "asr", max_new_tokens=2, model_name="m")


def test_inference_and_evaluation_record_the_system_prompt_they_answered_under(tiny, assets, tmp_path):
    """A model trained under a system prompt (``model.system_prompt``, recorded by training) answers under it when
    given none; the settings record that one, so a rerun that names it resumes and one without it is refused."""
    from omegaconf import open_dict

    model = SpeechLMModel.restore_from(str(tiny[1])).eval()
    with open_dict(model.cfg):
        model.cfg.system_prompt = "Be brief."
    out = tmp_path / "a.jsonl"
    inference.infer_manifest(model, assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m")
    assert json.loads((tmp_path / "a.jsonl.settings.json").read_text())["system_prompt"] == "Be brief."
    inference.infer_manifest(model, assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m",
                             system_prompt="Be brief.")
    with pytest.raises(ValueError, match=r"other settings \(system_prompt: 'Be brief.' -> None\)"):
        inference.infer_manifest(model, assets["manifest"], out, prompt="Repeat:", max_new_tokens=2, model_name="m",
                                 system_prompt="")
    standard.evaluate_asr(model, assets["manifest"], tmp_path / "asr", max_new_tokens=2, model_name="m")
    with pytest.raises(ValueError, match=r"other settings \(system_prompt: 'Be brief.' -> None\)"):
        standard.evaluate_asr(model, assets["manifest"], tmp_path / "asr", max_new_tokens=2, model_name="m",
                              system_prompt="")


def test_bad_evaluation_prompts_and_clips_are_errors_naming_the_line_or_skipped(tiny, assets, tmp_path, capsys):
    rows = manifest_lines(assets)[:2]
    with pytest.raises(ManifestError, match=r":1 field 'prompt': the prompt has 2 audio locators"):
        standard.evaluate_asr(tiny[0], assets["manifest"], tmp_path / "a", prompt="A <|audio|> B <|audio|>",
                              max_new_tokens=2)
    sqa = write_jsonl(tmp_path / "sqa.jsonl", [{**rows[0], "question": "Who?", "answer": "x"}])
    standard.evaluate_sqa(tiny[0], sqa, tmp_path / "s", prompt="Answer briefly.", max_new_tokens=2)  # the audio asks
    assert "has no {question}" in capsys.readouterr().err
    short = tmp_path / "short.wav"
    import soundfile

    soundfile.write(short, [0.0] * 480, 16000)  # 30 ms: shorter than one encoder frame
    manifest = write_jsonl(tmp_path / "m.jsonl", rows + [{**rows[0], "audio_filepath": str(short), "duration": 0.03}])
    metrics = standard.evaluate_asr(tiny[0], manifest, tmp_path / "b", max_new_tokens=2, skip_invalid=True)
    assert (metrics["num_utterances"], metrics["skipped_lines"]) == (2, 1)
    with pytest.raises(ManifestError, match=r"t\.jsonl:2 field 'target_lang': expected a language code"):
        standard.evaluate_ast(tiny[0], write_jsonl(tmp_path / "t.jsonl", [{**rows[0], "target_lang": "de", "answer": "x"},
                                                                           {**rows[1], "target_lang": ["de"], "answer": "y"}]),
                              tmp_path / "c", max_new_tokens=2)


def _records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_library_evaluation_of_another_model_into_the_same_folder_is_refused(tiny, assets, tmp_path):
    """Called without ``model_name`` (a model in memory), answers resume under a digest of the weights: the same
    model resumes, a model trained on since is refused instead of being credited with the first one's answers."""
    from nemo_speechlm.errors import InputError
    from nemo_speechlm.models.loading import model_identity

    model, answers = tiny[0], tmp_path / "answers.jsonl"
    first = standard.evaluate_asr(model, assets["manifest"], tmp_path, batch_size=4, max_new_tokens=4)
    assert first["model"] == model_identity(model) and "in memory" in first["model"]
    assert standard.evaluate_asr(model, assets["manifest"], tmp_path, batch_size=4, max_new_tokens=4)["wer"] == first["wer"]
    inference.infer_manifest(model, assets["manifest"], answers, prompt="Repeat: <|audio|>", max_new_tokens=2)
    weight = next(model.perception.modality_adapter.parameters())
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.add_(1e-3)  # "trained on"
        with pytest.raises(InputError, match="other settings.*model"):
            standard.evaluate_asr(model, assets["manifest"], tmp_path, batch_size=4, max_new_tokens=4)
        with pytest.raises(InputError, match="other settings.*model"):
            inference.infer_manifest(model, assets["manifest"], answers, prompt="Repeat: <|audio|>", max_new_tokens=2)
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert model_identity(model) == first["model"]


def test_canary_style_prompts():
    assert standard.canary_prompt("en", "de", pnc=False) == (
        "Translate the English content to German, ignoring punctuations and capitalizations.")
    assert standard.canary_prompt("en", "en", pnc=True) == (
        "Transcribe the content to English, with punctuations and capitalizations.")


@pytest.mark.parametrize("fields", [{"taskname": "ast", "target_lang": "de"}, {"taskname": "ast", "target_lang": "de", "pnc": "no"},
                                    {"taskname": "asr"}, {"taskname": "asr", "pnc": False}])
def test_evaluation_asks_a_line_what_training_taught_for_it(fields):
    """The evaluation's default instruction for a Canary-style line is the training data's (a line without `pnc`
    was asked to ignore punctuation in evaluation and trained with it)."""
    from nemo_speechlm.data.joint_sft import _asr_ast_instruction
    from nemo_speechlm.data.manifest import ManifestEntry

    entry = ManifestEntry("ast.jsonl", 1, {"audio_filepath": "a.wav", "duration": 1.0, "source_lang": "en", **fields})
    assert standard.line_instruction(entry, require_target=fields["taskname"] == "ast") == _asr_ast_instruction(entry)[0]


def test_ast_eval_scores_per_language_and_names_a_line_without_target_lang(tiny, assets, tmp_path):
    rows = manifest_lines(assets)[:2]
    rows = [{**rows[0], "source_lang": "en", "target_lang": "de", "pnc": "no", "answer": "die Katze sitzt"},
            {**rows[1], "source_lang": "en", "target_lang": "fr", "pnc": "yes", "answer": "Ouvrez la fenêtre."}]
    metrics = standard.evaluate_ast(tiny[0], write_jsonl(tmp_path / "ast.jsonl", rows), tmp_path / "out", max_new_tokens=3)
    assert set(metrics["by_target_lang"]) == {"de", "fr"} and 0 <= metrics["bleu"] <= 100 and 0 <= metrics["chrf"] <= 100
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "out" / "ast_predictions.jsonl").read_text().splitlines()]
    assert prompts[1] == "Translate the English content to French, with punctuations and capitalizations.\n<|audio|>"

    del rows[1]["target_lang"]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2 field 'target_lang': missing"):
        standard.evaluate_ast(tiny[0], bad, tmp_path / "out2")


def test_sqa_scoring_on_fixed_predictions():
    metrics = standard.score_sqa(["Paris", "the cat sat on the mat"], ["paris.", "the cat sat"])
    assert metrics["exact_match"] == 0.5  # "paris." normalizes to "paris"
    # ROUGE-L of the second: LCS 3 words, precision 3/3, recall 3/6 -> F = 2/3; the first is 1.0
    assert metrics["rouge_l"] == pytest.approx((1.0 + 2 / 3) / 2)
    assert metrics["num_items"] == 2


def test_agreement_scoring_on_fixed_answers():
    metrics = standard.score_agreement(["Hello there.", "", "a b c d"], ["Hello there.", "", "a b x y"])
    assert metrics["agreement_exact_match"] == pytest.approx(2 / 3)
    assert metrics["agreement_rouge_l"] == pytest.approx((1 + 1 + 0.5) / 3)


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat"},
                  {"role": "assistant", "content": "on the mat"}, {"role": "user", "content": "please open the window"},
                  {"role": "assistant", "content": "it is raining"}]},
    {"conversations": [{"from": "User", "value": "what is said in the audio"}]},
]


def test_conversations_in_both_formats_keep_context_and_reference(tmp_path):
    convs = standard.read_conversations(write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS))
    assert [m["role"] for m in convs[0]["messages"]] == ["system", "user", "assistant", "user"]
    assert convs[0]["reference"] == "it is raining" and convs[1]["reference"] is None
    assert convs[1]["messages"] == [{"role": "user", "content": "what is said in the audio"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", [CONVERSATIONS[1], {"conversations": [{"from": "Bot", "value": "hi"}]}])
    with pytest.raises(ManifestError, match=r"bad\.jsonl:2 field 'conversations\[0\]\.from': unknown role 'Bot'"):
        standard.read_conversations(bad)


def test_text_retention_agreement_with_lora_disabled(tiny, tmp_path):
    model = tiny[0]
    path = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    metrics = standard.evaluate_text_retention(model, path, tmp_path / "zero", max_new_tokens=4)
    assert (metrics["agreement_rouge_l"], metrics["agreement_exact_match"]) == (1.0, 1.0)  # B = 0: LoRA is a no-op
    assert "LoRA adapters disabled" in metrics["base_llm"] and metrics["num_with_reference"] == 1
    zero = [json.loads(line) for line in (tmp_path / "zero" / "text_retention_predictions.jsonl").read_text().splitlines()]
    assert zero[0]["context"][0] == {"role": "system", "content": "Be brief."}

    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    try:
        torch.manual_seed(3)
        with torch.no_grad():
            for p in lora_b:
                p.normal_(std=0.5)
        metrics = standard.evaluate_text_retention(model, path, tmp_path / "trained", max_new_tokens=4)
    finally:
        with torch.no_grad():
            for p, value in zip(lora_b, saved):
                p.copy_(value)
    trained = [json.loads(line) for line in (tmp_path / "trained" / "text_retention_predictions.jsonl").read_text().splitlines()]
    assert [r["base"] for r in trained] == [r["base"] for r in zero]  # the base side ignores the adapters
    assert metrics["agreement_rouge_l"] == standard.score_agreement([r["base"] for r in trained], [r["trained"] for r in trained])["agreement_rouge_l"]
    assert any(r["trained"] != r["base"] for r in trained)


def test_text_retention_rejects_audio_in_conversations(tiny, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hear <|audio|>"}]}])
    with pytest.raises(ManifestError, match=r"chat\.jsonl:1: contains the audio locator"):
        standard.evaluate_text_retention(tiny[0], path, tmp_path / "out")


def test_evaluate_cli_subcommands_parse():
    import argparse

    parser = argparse.ArgumentParser()
    standard.add_arguments(parser.add_subparsers(dest="mode", required=True))
    args = parser.parse_args(["ast", "--model", "m.nemo", "--manifest", "x.jsonl", "--out-dir", "o", "--max-new-tokens", "7"])
    assert (args.mode, args.reference_field, args.max_new_tokens, args.device) == ("ast", "answer", 7, "auto")
    args = parser.parse_args(["text-retention", "--model", "m.nemo", "--conversations", "c.jsonl", "--out-dir", "o"])
    assert args.mode in standard.MODES
