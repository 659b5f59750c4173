"""The generalization benchmark end to end on a tiny real SpeechLMModel: outputs, catalog splits,
resume, bad input, and the scores of hand-made answers."""
import argparse
import json
import os
import shutil

import numpy as np
import pytest
import torch

from nemo_speechlm.data.task_catalog import EVALUATION_SPLITS, TaskCatalog, UnknownTaskError
from nemo_speechlm.evaluation import benchmark
from nemo_speechlm.evaluation.benchmark import (
    CASCADE,
    UPPER_BOUND,
    copy_expected,
    parse_model_specs,
    run_benchmark,
    score_answer,
    summarize_lines,
    write_results_md,
)
from nemo_speechlm.evaluation.benchmark_scoring import aggregate
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.models.base_llm import base_llm_identity
from tests.conftest import model_config

# Three seen tasks (one with a WER ground truth, one with BLEU) and two held-out tasks.
TASKS = ["repeat", "summarize", "translate_fr", "translate_de", "mentions_person"]
N_UTTERANCES = 4
SETTINGS = dict(tasks=TASKS, prompts_per_task=1, max_new_tokens=8, batch_size=8, seed=0)


@pytest.fixture(scope="module")
def setup(assets, tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmark")
    torch.manual_seed(0)
    nemo = root / "tiny.nemo"
    SpeechLMModel(model_config(assets["llm"])).save_to(str(nemo))
    other = root / "other.nemo"  # a second model (other adapter weights) to compare side by side
    SpeechLMModel(model_config(assets["llm"])).save_to(str(other))
    lines = [json.loads(l) for l in assets["manifest"].read_text().splitlines()[:N_UTTERANCES]]
    for line in lines[:2]:
        line["translation_fr"] = "le chat est assis sur le tapis"
    missing = {"audio_filepath": str(root / "gone.wav"), "duration": 1.0, "text": "this audio was deleted"}
    manifest = root / "heldout.jsonl"
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines[:2] + [missing] + lines[2:]))
    out, asr = root / "out", str(assets["asr"])
    metrics = run_benchmark({"tiny": str(nemo)}, manifest, out, asr_model=asr, **SETTINGS)
    return {"nemo": nemo, "other": other, "manifest": manifest, "out": out, "metrics": metrics, "asr": asr}


def read_jsonl(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def test_all_four_outputs_exist_and_parse(setup):
    out = setup["out"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["systems"]) == {"tiny", CASCADE, UPPER_BOUND}
    for system in metrics["systems"].values():
        assert set(system["splits"]) == set(EVALUATION_SPLITS)
        assert system["overall"]["count"] == len(read_jsonl(out / "predictions.jsonl")) // 3
    results = (out / "results.md").read_text()
    assert "| Split | n | tiny | cascade | text_upper_bound |" in results
    for title in benchmark.SPLIT_TITLES.values():
        assert f"## {title}" in results
    assert (out / "splits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(out / "splits.png").shape[2] in (3, 4)


def test_items_and_splits_follow_the_catalog(setup):
    catalog = TaskCatalog.load().select(TASKS)
    lines = read_jsonl(setup["out"] / "predictions.jsonl")
    for line in lines:
        task, index = line["prompt_id"].split("/")
        prompt = catalog.task(task).prompts[int(index)]
        assert line["split"] == catalog.evaluation_split(prompt)
        assert line["prompt"] == prompt.text
    assert {l["split"] for l in lines} == set(EVALUATION_SPLITS)
    expected = {(s, p.id) for s in EVALUATION_SPLITS for p in catalog.evaluation_prompts(s, 1, seed=0)}
    for system in ("tiny", CASCADE, UPPER_BOUND):
        own = [l for l in lines if l["system"] == system]
        assert len(own) == N_UTTERANCES * len(expected)
        assert {(l["split"], l["prompt_id"]) for l in own} == expected


def test_references_are_cached_and_the_upper_bound_is_the_reference(setup):
    refs = {r["key"]: r["reference"] for r in read_jsonl(setup["out"] / "references.jsonl")}
    upper = [l for l in read_jsonl(setup["out"] / "predictions.jsonl") if l["system"] == UPPER_BOUND]
    assert len(refs) == len(upper)
    for line in upper:
        assert line["prediction"] == line["reference"] == refs[line["key"]]
        assert line["scores"]["rouge_l"] == pytest.approx(1.0) or not line["reference"].strip()


def test_ground_truth_scored_only_where_task_and_line_have_it(setup):
    for line in read_jsonl(setup["out"] / "predictions.jsonl"):
        gt_keys = {k for k in line["scores"] if k.startswith("gt_")}
        if line["task"] == "repeat":
            assert gt_keys == {"gt_wer"} and line["copy_expected"]
        elif line["task"] == "translate_fr" and "ground_truth" in line:
            assert gt_keys == {"gt_bleu"} and line["ground_truth"]["field"] == "translation_fr"
        else:
            assert not gt_keys  # translate_de: no translation_de in the manifest -> not scored, no error
    tasks = setup["metrics"]["systems"]["tiny"]["tasks"]
    assert tasks["translate_fr"]["gt_bleu_count"] == 2 * 2  # 2 lines with the field x 2 prompts (two splits)
    assert "gt_bleu" not in tasks["translate_de"]


def test_missing_audio_is_skipped_and_counted(setup):
    skipped = setup["metrics"]["skipped_lines"]
    assert skipped["total"] == 1 and skipped["counts"] == {"audio_filepath": 1}
    assert "gone.wav" in skipped["examples"]["audio_filepath"]
    assert all("gone.wav" not in l["audio_filepath"] for l in read_jsonl(setup["out"] / "predictions.jsonl"))
    assert "1 bad line(s) skipped" in (setup["out"] / "results.md").read_text()


def test_interrupted_predictions_resume_without_recomputing(setup, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    path = out / "predictions.jsonl"
    full = path.read_text().splitlines()
    n_items = len(full) // 3
    kept = full[: len(full) - n_items - 3]  # drop every upper-bound line and the speech model's last 3
    path.write_text("".join(l + "\n" for l in kept))

    metrics = run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, asr_model=setup["asr"], **SETTINGS)
    runs = metrics["runs"]
    assert runs["references"]["written"] == 0 and runs["references"]["done_before"] == n_items
    assert runs["asr_transcripts"]["written"] == 0
    assert runs[CASCADE]["written"] == 0
    assert runs["tiny"]["written"] == 3 and runs["tiny"]["done_before"] == n_items - 3
    assert runs[UPPER_BOUND]["written"] == n_items
    resumed = path.read_text().splitlines()
    assert resumed[: len(kept)] == kept
    assert resumed == full  # greedy answers are the same batched differently

    with pytest.raises(ValueError, match="max_new_tokens"):  # cached answers of other settings are not mixed in
        run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, **{**SETTINGS, "max_new_tokens": 9})


def test_answers_scored_by_an_earlier_version_are_scored_again(setup, tmp_path):
    """A folder answered before a scoring change (here: lines without ``same_label``, a wrong ROUGE-L) is reported
    with today's scores, and its lines are updated; nothing is answered again."""
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    path = out / "predictions.jsonl"
    today = read_jsonl(path)
    old = json.loads(json.dumps(today))
    for line in old:
        line["scores"].pop("same_label", None)
        line["scores"]["rouge_l"] = 0.0
    path.write_text("".join(json.dumps(l) + "\n" for l in old))

    metrics = run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, asr_model=setup["asr"], **SETTINGS)
    assert metrics["runs"]["references"]["written"] == metrics["runs"]["tiny"]["written"] == 0
    assert read_jsonl(path) == today
    assert metrics["systems"] == setup["metrics"]["systems"]
    assert metrics["differences"] == setup["metrics"]["differences"]


def test_a_model_retrained_into_the_same_file_is_not_mixed_with_its_old_answers(setup, tmp_path, monkeypatch):
    """The cached answers belong to a model file as it was: a retrained model written to the same path
    (a new modification time) is refused, where its predecessor's answers used to be reused as its own;
    with ``replace`` only its answers are made anew (the references of the same base LLM are kept)."""
    import os

    models = {name: tmp_path / f"{name}.nemo" for name in ("tiny", "other")}
    for name, path in models.items():
        shutil.copy2(setup[name if name == "other" else "nemo"], path)
    models = {name: str(path) for name, path in models.items()}
    settings = {**SETTINGS, "tasks": ["repeat"]}
    run_benchmark(models, setup["manifest"], tmp_path / "out", **settings)
    with monkeypatch.context() as patched:  # nothing left to answer: no model is loaded, not even for the references
        patched.setattr(benchmark, "load_model", lambda *a, **k: pytest.fail("a fully cached rerun loaded a model"))
        rerun = run_benchmark(models, setup["manifest"], tmp_path / "out", **settings)
    assert all(run["written"] == 0 for run in rerun["runs"].values())  # unchanged files: every answer reused
    for name in ("other", "tiny"):
        stat = os.stat(models[name])
        os.utime(models[name], ns=(stat.st_atime_ns, stat.st_mtime_ns + 5 * 10**9))  # rewritten: "retrained"
        with pytest.raises(ValueError, match=f"answers of system '{name}'"):
            run_benchmark(models, setup["manifest"], tmp_path / "out", **settings)
        replaced = run_benchmark(models, setup["manifest"], tmp_path / "out", replace=True, **settings)["runs"]
        assert replaced[name]["written"] == replaced[name]["total"] > 0
        assert all(run["written"] == 0 for system, run in replaced.items() if system != name)
    lines = read_jsonl(tmp_path / "out" / "predictions.jsonl")
    assert len(lines) == len({(l["system"], l["key"]) for l in lines}) == 3 * replaced["tiny"]["total"]


def test_a_model_that_failed_to_load_does_not_block_its_corrected_rerun(setup, tmp_path):
    """A truncated .nemo was recorded under its name before it failed to load; the rerun with the right file was
    refused for 'answers' it never gave, unless --replace."""
    from nemo_speechlm.parts.checkpoint import CheckpointError

    broken = tmp_path / "broken.nemo"
    broken.write_bytes(setup["nemo"].read_bytes()[:1000])
    settings = {**SETTINGS, "tasks": ["repeat"]}
    with pytest.raises(CheckpointError):  # model a answers, then b fails to load
        run_benchmark({"a": str(setup["nemo"]), "b": str(broken)}, setup["manifest"], tmp_path / "out", **settings)
    fixed = run_benchmark({"a": str(setup["nemo"]), "b": str(setup["other"])}, setup["manifest"], tmp_path / "out",
                          **settings)
    assert fixed["runs"]["b"]["written"] == fixed["runs"]["b"]["total"] > 0


def test_models_on_the_same_llm_share_the_references(setup, tmp_path):
    """The references are the base LLM's answers, so another model on the same LLM (here other adapter
    weights) reuses them as the first model; other settings are refused, or start over with ``replace``."""
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    runs = run_benchmark({"other": str(setup["other"])}, setup["manifest"], out, **SETTINGS)["runs"]
    assert runs["references"]["written"] == 0 and runs["references"]["done_before"] > 0
    assert runs["other"]["written"] == runs["other"]["total"] > 0
    assert json.loads((out / "metrics.json").read_text())["systems"].keys() == {"other", UPPER_BOUND}

    longer = {**SETTINGS, "max_new_tokens": 9}
    with pytest.raises(ValueError, match="max_new_tokens=8"):
        run_benchmark({"other": str(setup["other"])}, setup["manifest"], out, **longer)
    runs = run_benchmark({"other": str(setup["other"])}, setup["manifest"], out, replace=True, **longer)["runs"]
    assert runs["references"]["written"] == runs["references"]["total"] > 0  # every answer made anew
    systems = {l["system"] for l in read_jsonl(out / "predictions.jsonl")}
    assert systems == {"other", UPPER_BOUND} and not (out / "asr_transcripts.jsonl").exists()


def test_a_corrected_transcript_gets_a_new_reference_and_new_answers(setup, tmp_path):
    """Answers are cached by audio and prompt; an item whose transcript changed in the manifest is answered anew
    (reference and every system), the others reused. Its old reference used to be kept, and a model added later was
    scored against the text LLM's answer to the old transcript."""
    out, settings = tmp_path / "out", {**SETTINGS, "tasks": ["repeat"]}
    shutil.copytree(setup["out"], out)
    lines = [json.loads(l) for l in setup["manifest"].read_text().splitlines()]
    lines[0]["text"] = "a corrected transcript of the first clip"
    manifest = tmp_path / "heldout.jsonl"
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines))
    runs = run_benchmark({"tiny": str(setup["nemo"])}, manifest, out, **settings)["runs"]
    references = {r["key"]: r for r in read_jsonl(out / "references.jsonl")}
    changed = sum(r.get("transcript") == lines[0]["text"] for r in references.values())  # the changed clip's items
    assert runs["references"]["written"] == runs["tiny"]["written"] == changed > 0
    assert runs["references"]["done_before"] == runs["references"]["total"] - changed
    for line in read_jsonl(out / "predictions.jsonl"):
        if line["task"] == "repeat":
            assert line["transcript"] == references[line["key"]]["transcript"]
            assert line["reference"] == references[line["key"]]["reference"]


def test_an_edited_catalog_prompt_gets_new_references_and_answers(setup, tmp_path):
    """Prompt ids are positions in the task's list (``summarize/3``): a prompt edited in the catalog keeps its id,
    and its items are answered anew (reference and model), the rest reused. Its old references were reused (scoring
    a new model against the text LLM's answers to the old prompt) or, with the old answers there, the run refused."""
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    old = read_jsonl(out / "references.jsonl")[0]
    catalog_file = tmp_path / "tasks.yaml"
    text = TaskCatalog.load().path.read_text()
    catalog_file.write_text(text.replace(old["prompt"], old["prompt"].replace("{input}", "{input} (edited)"), 1))
    catalog = TaskCatalog.load(catalog_file)
    assert catalog.task(old["task"]).prompts[int(old["prompt_id"].split("/")[1])].text.endswith("(edited)")
    runs = run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, catalog=catalog, **SETTINGS)["runs"]
    edited = [r for r in read_jsonl(out / "references.jsonl") if r["prompt_id"] == old["prompt_id"]]
    assert len(edited) == N_UTTERANCES and all(r["prompt"].endswith("(edited)") for r in edited)
    assert runs["references"]["written"] == runs["tiny"]["written"] == len(edited)
    assert runs["references"]["done_before"] == runs["references"]["total"] - len(edited)
    lines = [l for l in read_jsonl(out / "predictions.jsonl") if l["key"] in {r["key"] for r in edited}]
    assert {l["system"] for l in lines} == {"tiny", UPPER_BOUND}  # the cascade's, made for the old prompt, dropped
    assert all(l["prompt"].endswith("(edited)") for l in lines)


def test_a_changed_asr_model_redoes_the_cascade_only_with_replace(setup, tmp_path):
    """The cascade's transcripts belong to its ASR model: another one (here the same file rewritten) is
    refused, and with ``replace`` its transcripts and answers are made anew while the rest is kept."""
    out, asr = tmp_path / "out", tmp_path / "asr.nemo"
    shutil.copytree(setup["out"], out)
    shutil.copy2(setup["asr"], asr)
    os.utime(asr, ns=(0, os.stat(asr).st_mtime_ns + 5 * 10**9))
    with pytest.raises(ValueError, match="answers of system 'cascade'"):
        run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, asr_model=str(asr), **SETTINGS)
    runs = run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], out, asr_model=str(asr), replace=True,
                         **SETTINGS)["runs"]
    assert runs["asr_transcripts"]["written"] == runs["asr_transcripts"]["total"] == N_UTTERANCES
    assert runs[CASCADE]["written"] == runs[CASCADE]["total"] > 0
    assert runs["references"]["written"] == runs["tiny"]["written"] == 0


def test_cli_compares_models_side_by_side_reusing_cached_answers(setup, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(setup["out"], out)
    parser = benchmark.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args([
        "--model", f"tiny={setup['nemo']}", "--model", str(setup["other"]), "--manifest", str(setup["manifest"]),
        "--out-dir", str(out), "--tasks", *TASKS, "--prompts-per-task", "1", "--max-new-tokens", "8",
        "--asr-model", setup["asr"], "--device", "cpu",
    ])
    metrics = benchmark.main(args)
    printed = capsys.readouterr().out
    assert "| Split | n | tiny | other | cascade | text_upper_bound |" in printed
    assert str(out / "results.md") in printed and str(out / "splits.png") in printed
    runs = metrics["runs"]
    assert runs["other"]["written"] == runs["other"]["total"] > 0  # only the new model is computed
    assert all(run["written"] == 0 for name, run in runs.items() if name != "other")
    assert "| tiny | other | cascade | text_upper_bound |" in (out / "results.md").read_text()
    # every pair of systems but the references themselves, per split, on the same items
    assert "Paired differences (same items)" in printed
    differences = metrics["differences"]
    assert set(differences) == set(EVALUATION_SPLITS)
    for pairs in differences.values():
        assert [(p["a"], p["b"]) for p in pairs] == [("tiny", "other"), ("tiny", CASCADE), ("other", CASCADE)]
        assert all(p["count"] > 0 and p["rouge_l_ci"][0] <= p["rouge_l"] <= p["rouge_l_ci"][1] for p in pairs)
    assert "| tiny − other |" in (out / "results.md").read_text()


@pytest.mark.parametrize("source", ["flag", "recorded", "recorded, '' given"])
def test_a_system_prompt_reaches_every_system_and_is_part_of_the_settings(setup, assets, tmp_path, monkeypatch, source):
    """The system prompt of ``--system-prompt``, else the one the model trained under (recorded in its ``.nemo``),
    goes to the speech model and to the text LLM's references alike (``''``: none); answers cached without it are
    refused, not mixed in."""
    seen = []
    encode_prompt = SpeechLMModel.encode_prompt
    monkeypatch.setattr(SpeechLMModel, "encode_prompt",
                        lambda self, prompt, system_prompt=None: seen.append((prompt, system_prompt))
                        or encode_prompt(self, prompt, system_prompt))
    nemo, flag = setup["nemo"], ["--system-prompt", "Be brief."]
    if source.startswith("recorded"):
        torch.manual_seed(0)  # the weights of setup's model: the cached answers below are its answers
        nemo = tmp_path / "trained_under_a_prompt.nemo"
        SpeechLMModel(model_config(assets["llm"], system_prompt="Be brief.")).save_to(str(nemo))
        flag = ["--system-prompt", ""] if "given" in source else []
    flags = ["--model", f"tiny={nemo}", "--manifest", str(setup["manifest"]), "--tasks", *TASKS,
             "--prompts-per-task", "1", "--max-new-tokens", "8", "--device", "cpu", *flag]
    parser = benchmark.add_arguments(argparse.ArgumentParser())
    out = tmp_path / "out"
    metrics = benchmark.main(parser.parse_args(flags + ["--out-dir", str(out)]))
    want = None if "given" in source else "Be brief."
    assert metrics["config"]["generation_kwargs"] == ({"system_prompt": want} if want else {})
    runs = metrics["runs"]
    assert runs["tiny"]["written"] == runs[UPPER_BOUND]["written"] > 0
    tag = SpeechLMModel.restore_from(str(nemo)).audio_locator_tag
    with_audio = [system for prompt, system in seen if tag in prompt]
    text_only = [system for prompt, system in seen if tag not in prompt]
    assert len(with_audio) == runs["tiny"]["written"] and len(text_only) == runs[UPPER_BOUND]["written"]
    assert set(with_audio) == set(text_only) == {want}

    if want:
        cached = tmp_path / "cached"  # answers made without a system prompt
        shutil.copytree(setup["out"], cached)
        with pytest.raises(ValueError, match="generation_kwargs={}, this run asks for {'system_prompt': 'Be brief.'}"):
            benchmark.main(parser.parse_args(flags + ["--out-dir", str(cached)]))


def test_unknown_task_is_a_clear_error(setup, tmp_path):
    with pytest.raises(UnknownTaskError, match="unknown task 'summarise'.*known tasks: repeat, continue"):
        run_benchmark({"tiny": str(setup["nemo"])}, setup["manifest"], tmp_path, tasks=["summarise"])


def test_model_specs():
    assert parse_model_specs(["a=x/m1.nemo", "y/m2.nemo"]) == {"a": "x/m1.nemo", "m2": "y/m2.nemo"}
    with pytest.raises(ValueError, match="two models named 'm'"):
        parse_model_specs(["a/m.nemo", "b/m.nemo"])


def test_scores_of_hand_made_answers():
    catalog = TaskCatalog.load()
    repeat, summarize, translate = (catalog.task(t) for t in ("repeat", "summarize", "translate_fr"))
    text = "the cat sat on the mat"
    same = score_answer(repeat, text, text, text, ground_truth=text)
    assert same["rouge_l"] == 1.0 and same["chrf"] == pytest.approx(100.0)
    assert same["gt_wer"] == 0.0 and same["follows_task"] and same["transcript_copy"]
    assert copy_expected(repeat) and not copy_expected(summarize)
    half = score_answer(summarize, "the cat sat", "the cat sat on the mat", text, ground_truth=None)
    assert half["rouge_l"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # P=3/3, R=3/6
    assert "gt_wer" not in half and half["follows_task"]
    fr = "le chat est assis sur le tapis"
    assert score_answer(translate, fr, fr, text, ground_truth=fr)["gt_bleu"] == pytest.approx(100.0)

    def line(copy, expected, rouge):
        return {"utt": f"u{rouge}", "scores": {"rouge_l": rouge, "chrf": 0.0, "follows_task": True, "transcript_copy": copy},
                "copy_expected": expected}

    summary = summarize_lines([line(True, True, 1.0), line(True, False, 0.5), line(False, False, 0.0)])
    assert summary["count"] == 3 and summary["rouge_l"] == pytest.approx(0.5)
    assert summary["transcript_copy"] == pytest.approx(0.5) and summary["transcript_copy_count"] == 2
    assert summary["transcript_copy_where_expected"] == 1.0


def test_classification_answers_are_also_scored_on_the_label(tmp_path):
    """ROUGE-L rates the wrong sentiment in the reference's own words high; the label score does not."""
    sentiment = TaskCatalog.load().task("sentiment")
    text, reference = "what a lovely day", "The sentiment of this sentence is positive."
    wrong = score_answer(sentiment, "The sentiment of this sentence is negative.", reference, text, None)
    right = score_answer(sentiment, "Positive.", reference, text, None)
    assert wrong["rouge_l"] > 0.8 > right["rouge_l"]
    assert wrong["same_label"] is False and right["same_label"] is True
    no_label = score_answer(sentiment, "Positive.", "It is a day.", text, None)  # nothing to agree with
    two_labels = score_answer(sentiment, "Positive.", "Positive or negative.", text, None)
    assert "same_label" not in no_label and "same_label" not in two_labels
    assert "same_label" not in score_answer(TaskCatalog.load().task("summarize"), text, text, text, None)
    yes_no = TaskCatalog.load().task("mentions_person")  # a yes/no question is a classification too
    assert score_answer(yes_no, "No, nobody.", "No.", text, None)["same_label"] is True
    assert score_answer(yes_no, "Yes, the speaker.", "**No**", text, None)["same_label"] is False
    assert "same_label" not in score_answer(yes_no, "No.", "I'm sorry for", text, None)

    lines = [{"utt": f"u{i}", "scores": s, "copy_expected": False} for i, s in enumerate((wrong, right, no_label))]
    summary = summarize_lines(lines)
    assert summary["same_label"] == pytest.approx(0.5) and summary["same_label_count"] == 2
    assert "same_label" not in summarize_lines(lines[2:])

    split = "seen_task_seen_prompt"
    lines = [{**l, "system": "m", "split": split, "task": "sentiment"} for l in lines]
    config = {"manifest": "x", "utterances": 3, "catalog": "c", "prompts_per_task": 1, "seed": 0, "splits": [split]}
    metrics = {"config": config, "skipped_lines": {"total": 0}, "systems": aggregate(lines, ["m"], [split])}
    write_results_md(metrics, tmp_path / "results.md")
    assert "| same label as reference (n=2) | 50% |" in (tmp_path / "results.md").read_text()


def test_intervals_resample_utterances_and_differences_pair_the_items(tmp_path):
    """An utterance's items go together (they share its audio). Answering each utterance's
    prompts k times over adds no evidence, so it must not narrow the interval (an item bootstrap would)."""
    split = "seen_task_seen_prompt"

    def lines(system, scores, copies=1):
        return [{"system": system, "split": split, "task": "summarize", "utt": f"u{u}", "key": f"u{u}|{c}",
                 "copy_expected": False, "scores": {"rouge_l": score, "chrf": 0.0, "follows_task": True,
                                                    "transcript_copy": False}}
                for u, score in enumerate(scores) for c in range(copies)]

    scores = [0.1, 0.9, 0.4, 0.6, 0.2, 0.8, 0.5, 0.3, 0.7, 0.0]
    once, ten_times = summarize_lines(lines("m", scores)), summarize_lines(lines("m", scores, copies=10))
    assert once["rouge_l"] == pytest.approx(0.45) and once["rouge_l_ci"] == ten_times["rouge_l_ci"]
    low, high = once["rouge_l_ci"]
    assert 0.25 < low < 0.45 < high < 0.65  # the mean's spread over 10 utterances: 0.30 / sqrt(10) ~ 0.09 a side
    assert summarize_lines(lines("m", [0.5], copies=3))["rouge_l_ci"] is None  # one utterance: no interval

    # b answers every item 0.2 worse than a; c answered only the first half of the items
    worse = [s - 0.2 for s in scores]
    both = lines("a", scores) + lines("b", worse) + lines("c", scores[:5])
    (ab, ac, bc) = benchmark.paired_differences(both, ["a", "b", "c"], [split])[split]
    assert (ab["a"], ab["b"], ab["count"]) == ("a", "b", 10)
    assert ab["rouge_l"] == pytest.approx(0.2) and ab["rouge_l_ci"] == pytest.approx([0.2, 0.2])
    assert ac["count"] == 5 and ac["rouge_l"] == pytest.approx(0.0)
    assert bc["rouge_l"] == pytest.approx(-0.2)
    # two runs (training seeds) on the same items: each item's difference is averaged over them
    seed1 = lines("a", scores) + lines("b", [s - 0.4 for s in scores])
    pooled = benchmark.paired_difference([lines("a", scores) + lines("b", worse), seed1], "a", "b", split)
    assert pooled["count"] == 10 and pooled["rouge_l"] == pytest.approx(0.3) and pooled["rouge_l_ci"] == pytest.approx([0.3, 0.3])

    config = {"manifest": "x", "utterances": 10, "catalog": "c", "prompts_per_task": 1, "seed": 0, "splits": [split]}
    metrics = {"config": config, "skipped_lines": {"total": 0},
               "systems": aggregate(both, ["a", "b", "c"], [split]),
               "differences": benchmark.paired_differences(both, ["a", "b", "c"], [split])}
    write_results_md(metrics, tmp_path / "results.md")
    results = (tmp_path / "results.md").read_text()
    assert f"| 0.450 [{low:.3f}, {high:.3f}] (100%) |" in results
    assert "| Seen task, seen prompt | a − b | 10 | +0.200 [+0.200, +0.200] |" in results
    assert "With 10 utterances these intervals are about 18% narrower than a t interval" in results


def test_the_stated_shortfall_of_few_utterances_is_what_the_bootstrap_gives():
    """The report's caution: a percentile bootstrap over n utterances is narrower than the t interval on the same
    scores by ``bootstrap_shortfall(n)``, checked against the bootstrap itself on normal scores."""
    from scipy.stats import t

    from nemo_speechlm.evaluation.benchmark_report import few_utterances_caution
    from nemo_speechlm.evaluation.benchmark_scoring import bootstrap_shortfall, utterance_bootstrap

    rng = np.random.default_rng(1)
    for n in (8, 32):
        ratios = []
        for seed in range(40):
            scores = rng.normal(size=n)
            low, high = utterance_bootstrap([{"utt": f"u{i}", "v": float(v)} for i, v in enumerate(scores)],
                                            lambda line: line["v"], seed=seed)
            ratios.append((high - low) / (2 * t.ppf(0.975, n - 1) * scores.std(ddof=1) / np.sqrt(n)))
        assert 1 - np.mean(ratios) == pytest.approx(bootstrap_shortfall(n), abs=0.03)
    assert bootstrap_shortfall(8) == pytest.approx(0.225, abs=0.001) and few_utterances_caution(40) == ""
    assert "29 utterances" in few_utterances_caution(29) and few_utterances_caution(30) == ""  # "under 30", as documented


def test_text_upper_bound_turns_lora_off(assets):
    """References come from the plain text LLM, not from the LoRA-tuned one."""
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}
    torch.manual_seed(0)
    tuned = SpeechLMModel(model_config(assets["llm"], lora=lora)).eval()
    for name, p in tuned.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    plain = SpeechLMModel(model_config(assets["llm"])).eval()
    prompt = TaskCatalog.load().task("summarize").prompts[0]
    item = {"prompt": prompt, "entry": {"text": "the cat sat on the mat"}}
    answer = benchmark.text_answerer(benchmark.LazyModel(lambda: tuned), lambda it: it["entry"]["text"], {})
    expected = plain.respond([None], [prompt.render("the cat sat on the mat")], max_new_tokens=8)
    assert answer([item], 8) == expected
    assert tuned.respond([None], [prompt.render("the cat sat on the mat")], max_new_tokens=8) != expected

    # the references' key: the same base LLM under LoRA or not; another LLM (one weight, or its dtype) differs
    assert base_llm_identity(tuned) == base_llm_identity(plain)
    with torch.no_grad():
        plain.llm.lm_head.weight[0, 0] += 1e-3
    assert base_llm_identity(plain) != base_llm_identity(tuned)
    assert base_llm_identity(tuned.to(torch.bfloat16)) != base_llm_identity(tuned.float())
