"""The shared generation machinery: batched chat generation, the resumable runner, answer filters."""
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from nemo_speechlm.datagen import (
    GenerationResult,
    HFChatGenerator,
    Rejected,
    build_chat_generator,
    degenerate_reason,
    run_resumable,
)
from nemo_speechlm.errors import InputError
from nemo_speechlm.parts.runner import Job, check_run_settings, keep_only
from tests.tiny_assets import make_tiny_llm
from tests.conftest import REPO, run_python

PROMPTS = [
    "the cat",
    "please open the window, it is raining again today",
    "we walked to the station",
    "my brother likes green tea and the meeting starts at nine",
]


def conversations(prompts=PROMPTS):
    return [[{"role": "user", "content": p}] for p in prompts]


# ---------------------------------------------------------------- HFChatGenerator


@pytest.fixture(scope="module")
def tiny_generator(tmp_path_factory):
    llm_dir = make_tiny_llm(tmp_path_factory.mktemp("tiny_llm"))
    return HFChatGenerator(str(llm_dir), device="cpu", batch_size=4, max_new_tokens=12)


def test_greedy_batched_equals_one_by_one(tiny_generator):
    lengths = {len(tiny_generator.encode(c)) for c in conversations()}
    assert len(lengths) == 4  # the batch really is left-padded
    batched = tiny_generator.generate(conversations())
    single = [tiny_generator.generate([c])[0] for c in conversations()]
    assert batched == single
    assert all(isinstance(r, GenerationResult) and r.text for r in batched)
    # random weights never say end-of-turn within the cap
    assert not any(r.finished for r in batched)
    assert tiny_generator.generate(conversations()) == batched  # deterministic
    settings = tiny_generator.generation_settings()
    assert settings["backend"] == "hf" and settings["do_sample"] is False and settings["max_new_tokens"] == 12


def test_finished_when_the_model_says_end_of_turn(tiny_generator):
    """Make the tiny model emit end-of-turn where it would emit its 4th answer token; the answer is
    then the first 3 tokens, ``finished``, while the other prompts still hit the cap."""
    from transformers import AutoModelForCausalLM

    source = tiny_generator.model.name_or_path
    prompt = torch.tensor([tiny_generator.encode(conversations()[1])])
    with torch.inference_mode():
        reference = tiny_generator.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False,
            pad_token_id=tiny_generator.pad_id,
        )[0, prompt.shape[1]:].tolist()
    assert len(reference) == 12
    k = next(i for i in range(3, 12) if reference[i] not in reference[:i])
    model = AutoModelForCausalLM.from_pretrained(source)
    eos = tiny_generator.tokenizer.eos_token_id
    with torch.no_grad():  # equal logits for EOS and token k; argmax takes the lower id, EOS
        model.lm_head.weight[eos] = model.lm_head.weight[reference[k]]
    assert eos < reference[k]
    generator = HFChatGenerator(model, tiny_generator.tokenizer, batch_size=4, max_new_tokens=12)
    results = generator.generate(conversations())
    expected = tiny_generator.tokenizer.decode(reference[:k], skip_special_tokens=True).strip()
    assert results[1] == GenerationResult(text=expected, finished=True)


def test_unknown_backend_and_missing_vllm():
    with pytest.raises(ValueError, match="expected one of"):
        build_chat_generator("onnx", model="x")
    try:
        import vllm  # noqa: F401
    except ImportError:
        from nemo_speechlm.errors import ConfigError

        with pytest.raises(ConfigError, match="backend='vllm' needs vLLM") as missing:  # one line at the command line
            build_chat_generator("vllm", model="x")
        assert "pip install vllm" in missing.value.fix


def test_the_vllm_backend_takes_and_records_dtype_and_refuses_device(monkeypatch, tmp_path):
    """--dtype was not passed to vLLM nor recorded (a rerun in another dtype resumed), --device silently ignored."""
    import argparse
    import types

    from nemo_speechlm.datagen.chat_generator import add_teacher_arguments, teacher_from_arguments
    from nemo_speechlm.errors import ConfigError

    made = {}
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=lambda **kwargs: made.update(kwargs)))
    parser = argparse.ArgumentParser()
    add_teacher_arguments(parser)
    args = parser.parse_args(["--teacher", str(tmp_path), "--backend", "vllm", "--dtype", "float16"])
    generator = teacher_from_arguments(args)
    assert made["dtype"] == "float16" and generator.generation_settings()["dtype"] == "float16"
    plain = teacher_from_arguments(parser.parse_args(["--teacher", str(tmp_path), "--backend", "vllm"]))
    assert made["dtype"] == "auto" and "dtype" not in plain.generation_settings()  # outputs from before it resume
    with pytest.raises(ConfigError, match="--device is not used by --backend vllm"):
        teacher_from_arguments(parser.parse_args(["--teacher", str(tmp_path), "--backend", "vllm", "--device", "cuda:1"]))


@pytest.mark.timeout(600)
def test_smollm2_answers_two_prompts_in_one_batch():
    """The real SmolLM2-135M-Instruct (GGUF, converted once to the user cache) answers greedily."""
    from nemo_speechlm.parts.offline_models import smollm2_gguf_path

    generator = HFChatGenerator(smollm2_gguf_path(), device="cpu", batch_size=2, max_new_tokens=32)
    prompts = ["What is the capital of France? Answer in one sentence.", "Name three colors."]
    results = generator.generate(conversations(prompts))
    assert all(r.text and r.finished for r in results), results
    assert "paris" in results[0].text.lower()
    assert [degenerate_reason(r.text, p, r.finished) for r, p in zip(results, prompts)] == [None, None]


# ---------------------------------------------------------------- run_resumable

ITEMS = [{"key": f"utt{i:02d}", "text": f"sentence number {i}"} for i in range(23)]


def job(batch):
    """A deterministic job: every 5th item is rejected."""
    return [
        Rejected("empty", detail=item["text"]) if int(item["key"][3:]) % 5 == 0
        else {"key": item["key"], "answer": item["text"].upper()}
        for item in batch
    ]


def counting(calls):
    def process(batch):
        calls.extend(item["key"] for item in batch)
        return job(batch)

    return process


def full_run(path):
    summary = run_resumable(ITEMS, job, path, batch_size=4, desc="full")
    return path.read_text(), summary


def test_full_run_writes_records_rejections_and_summary(tmp_path):
    text, summary = full_run(tmp_path / "out.jsonl")
    lines = [json.loads(line) for line in text.splitlines()]
    assert [r["key"] for r in lines] == [i["key"] for i in ITEMS if int(i["key"][3:]) % 5]
    assert summary.total == 23 and summary.written == 18 and summary.rejected == {"empty": 5}
    assert summary.done_before == 0 and summary.status == "done" and summary.items_per_s > 0
    assert "18 written" in str(summary) and "empty=5" in str(summary)
    saved = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert saved["written"] == 18 and saved["rejected"] == {"empty": 5}
    rejected = [json.loads(line) for line in (tmp_path / "out.jsonl.rejected.jsonl").read_text().splitlines()]
    assert rejected[0] == {"key": "utt00", "reason": "empty", "detail": "sentence number 0"}


def test_rerun_after_a_real_crash_continues_without_duplicates(tmp_path):
    expected, _ = full_run(tmp_path / "full.jsonl")
    out = tmp_path / "crashed.jsonl"
    # A subprocess killed by SIGKILL while computing its 4th batch: no exception handler runs.
    crash = f"""
import os, signal
from nemo_speechlm.datagen import run_resumable
from tests.test_generation import ITEMS, job
batches = []
def process(batch):
    batches.append(batch)
    if len(batches) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return job(batch)
run_resumable(ITEMS, process, {str(out)!r}, batch_size=4, desc="crash")
"""
    with pytest.raises(AssertionError, match="subprocess failed"):
        run_python(crash, cwd=REPO)
    assert len(out.read_text().splitlines()) + len(out.with_name("crashed.jsonl.rejected.jsonl").read_text().splitlines()) == 12

    calls = []
    summary = run_resumable(ITEMS, counting(calls), out, batch_size=4, desc="resume")
    assert summary.done_before == 12 and summary.written + sum(summary.rejected.values()) == 11
    assert summary.rejected_before == {"empty": 3}
    assert calls == [i["key"] for i in ITEMS[12:]]  # neither written nor rejected items recomputed
    assert out.read_text() == expected
    keys = [json.loads(line)["key"] for line in out.read_text().splitlines()]
    assert len(keys) == len(set(keys))


def test_rejected_items_are_not_recomputed(tmp_path):
    out = tmp_path / "out.jsonl"
    full_run(out)
    calls = []
    summary = run_resumable(ITEMS, counting(calls), out, batch_size=4, desc="rerun")
    assert calls == [] and summary.done_before == 23 and summary.written == 0
    assert summary.rejected_before == {"empty": 5}
    # a rejected line fixed in the input keeps its key: the summary says how to retry (it said nothing)
    assert f"not retried: delete {out}.rejected.jsonl to retry them" in str(summary)


def test_torn_final_line_is_cut_away_and_recomputed(tmp_path, caplog):
    expected, _ = full_run(tmp_path / "full.jsonl")
    out = tmp_path / "out.jsonl"
    run_resumable(ITEMS[:7], job, out, batch_size=4, desc="part")
    with open(out, "a") as f:
        f.write('{"key": "utt07", "answer": "SENT')  # crash mid-write
    with caplog.at_level(logging.WARNING, logger="nemo_speechlm.parts.runner"):
        run_resumable(ITEMS, job, out, batch_size=4, desc="resume")
    assert "incomplete" in caplog.text and str(out) in caplog.text
    assert out.read_text() == expected


def test_complete_final_record_missing_its_newline_is_kept(tmp_path):
    expected, _ = full_run(tmp_path / "full.jsonl")
    out = tmp_path / "out.jsonl"
    out.write_text(expected.rstrip("\n"))
    calls = []
    run_resumable(ITEMS, counting(calls), out, batch_size=4, desc="resume")
    assert out.read_text() == expected
    assert json.loads(expected.splitlines()[-1])["key"] not in calls


def test_corrupt_line_is_an_error_naming_file_and_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text('{"key": "utt01", "answer": "A"}\nnot json\n{"key": "utt02", "answer": "B"}\n')
    with pytest.raises(ValueError, match=r"out\.jsonl:2: not a JSON object"):
        run_resumable(ITEMS, job, out, batch_size=4, desc="x")
    out.write_text('{"answer": "A"}\n')
    with pytest.raises(ValueError, match=r"out\.jsonl:1: output record without its key"):
        run_resumable(ITEMS, job, out, batch_size=4, desc="x")


def test_duplicate_input_keys_are_an_error(tmp_path):
    from nemo_speechlm.errors import InputError

    with pytest.raises(InputError, match=r"dup: item 4 and item 24 are the same item \('utt03'\)"):
        run_resumable(ITEMS + [ITEMS[3]], job, tmp_path / "out.jsonl", batch_size=4, desc="dup")


def test_deleting_the_output_to_start_over_redoes_its_rejections(tmp_path):
    """The settings check advises deleting the output and its settings to start over; the rejections file stayed,
    and the items it named were never made again (raising a too-low cap left them rejected for ever)."""
    out = tmp_path / "out.jsonl"
    full_run(out)
    out.unlink()
    calls = []
    summary = run_resumable(ITEMS, counting(calls), out, batch_size=4, desc="again")
    assert calls == [item["key"] for item in ITEMS] and summary.rejected_before == {} and summary.rejected == {"empty": 5}


def test_records_and_rejections_of_a_changed_item_are_made_anew(tmp_path, caplog):
    """Keyed by item, a corrected input line kept its old record and its old rejection (an SQA pair refused as
    "none" for a misheard transcript stayed refused after the transcript was corrected)."""
    def copying(calls):  # records copy their item's text, as SQA's copy the transcript
        def process(batch):
            return [dict(o, text=i["text"]) if isinstance(o, dict) else o for i, o in zip(batch, counting(calls)(batch))]
        return Job(process, {}, ("answer",), lambda item: {"text": item["text"]})

    out, rejections = tmp_path / "out.jsonl", tmp_path / "out.jsonl.rejected.jsonl"
    run_resumable(ITEMS, copying([]), out, 4, "first")
    assert json.loads(rejections.read_text().splitlines()[0])["inputs"] == {"text": "sentence number 0"}
    corrected = [dict(item, text="corrected") if item["key"] in ("utt05", "utt07") else item for item in ITEMS]
    calls = []
    with caplog.at_level(logging.WARNING, logger="nemo_speechlm.parts.runner"):
        summary = run_resumable(corrected, copying(calls), out, 4, "again")
    assert calls == ["utt05", "utt07"] and summary.done_before == 21  # a rejection (05) and a record (07)
    assert "1 records of items changed" in caplog.text and "1 rejections of items changed" in caplog.text
    records = {r["key"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["utt07"] == {"key": "utt07", "answer": "CORRECTED", "text": "corrected"}
    # rejections written before they kept their inputs are kept (not all redone)
    lines = [json.loads(line) for line in rejections.read_text().splitlines()]
    rejections.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "inputs"}) + "\n" for line in lines))
    calls = []
    run_resumable([dict(item, text="other") for item in ITEMS], copying(calls), out, 4, "old")
    assert len(calls) == 18 and all(int(key[3:]) % 5 for key in calls)  # every record redone, no rejection


def test_an_output_that_this_job_did_not_write_is_refused(tmp_path):
    """The input manifest given as the output: its lines carry the items' keys, so every item read as done and the
    run wrote nothing, exit 0."""
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    with pytest.raises(InputError, match=r"manifest.jsonl: record 1 has no 'answer', so it is not an output of "
                                         r"answering \(the input given as the output\?\)"):
        run_resumable(ITEMS, Job(job, {}, ("answer",)), manifest, batch_size=4, desc="Answering")
    assert not (tmp_path / "manifest.jsonl.settings.json").exists()  # nothing written beside it


def test_records_must_carry_their_key_and_callable_keys_work(tmp_path):
    with pytest.raises(ValueError, match="carries key"):
        run_resumable(ITEMS, lambda b: [{"key": "other"} for _ in b], tmp_path / "a.jsonl", 4, "x")
    items = [{"utt": i["key"], "task": t} for i in ITEMS[:3] for t in ("sum", "rep")]
    key = lambda r: f"{r['utt']}/{r['task']}"  # noqa: E731
    summary = run_resumable(items, lambda b: [dict(r, answer="a") for r in b], tmp_path / "b.jsonl", 4, "x", key=key)
    assert summary.written == 6
    assert run_resumable(items, job, tmp_path / "b.jsonl", 4, "x", key=key).done_before == 6


def test_output_of_other_items_is_an_error_not_appended_to(tmp_path):
    """A copied demo folder (keys name the audio file, which moved) once got every behavior twice."""
    out = tmp_path / "out.jsonl"
    run_resumable(ITEMS[:7], job, out, batch_size=4, desc="first")
    before = out.read_text()
    moved = [{**item, "key": "moved/" + item["key"]} for item in ITEMS]
    with pytest.raises(InputError, match=r"holds 7 records of items this run does not have \(e.g. 'utt00'\)") as err:
        run_resumable(moved, job, out, batch_size=4, desc="moved")
    assert "delete" in err.value.fix and "out.jsonl.rejected.jsonl" in err.value.fix
    assert out.read_text() == before
    larger = tmp_path / "larger.jsonl"
    run_resumable(ITEMS[:21], job, larger, batch_size=4, desc="larger")
    with pytest.raises(InputError, match="holds 1 records"):  # utt20 was rejected: it is in the sidecar only
        run_resumable(ITEMS[:20], job, larger, batch_size=4, desc="smaller")
    # Outputs read by key (evaluation predictions) keep an earlier, larger run's records.
    summary = run_resumable(ITEMS[:5], job, larger, batch_size=4, desc="subset", exclusive=False)
    assert summary.done_before == 5 and summary.written == 0


def test_keep_only_trims_an_owned_output_to_the_items_of_this_run(tmp_path, caplog):
    expected = tmp_path / "expected.jsonl"
    run_resumable(ITEMS[:5], job, expected, batch_size=4, desc="fresh")
    out = tmp_path / "out.jsonl"
    run_resumable(ITEMS[:10], job, out, batch_size=4, desc="larger")
    with caplog.at_level(logging.WARNING):
        assert keep_only(out, [item["key"] for item in ITEMS[:5]]) == 5  # utt06-09 and utt05's rejection
    assert f"{out}: dropped 5 records" in caplog.text  # the caller's user is told
    calls = []
    assert run_resumable(ITEMS[:5], counting(calls), out, batch_size=4, desc="smaller").done_before == 5
    assert calls == []
    assert out.read_text() == expected.read_text()
    assert Path(str(out) + ".rejected.jsonl").read_text() == Path(str(expected) + ".rejected.jsonl").read_text()
    assert keep_only(tmp_path / "missing.jsonl", ["utt00"]) == 0


def test_settings_no_longer_recorded_are_not_a_change_but_changed_ones_are(tmp_path):
    """A caller whose results stopped depending on a setting (compare_objectives' evaluation sizes) stops recording
    it; an output written with it is then resumed, not refused. A value that changed still is."""
    out = tmp_path / "results"
    out.mkdir()
    check_run_settings(out, {"steps": 100, "benchmark_utterances": 8})
    check_run_settings(out, {"steps": 100})
    with pytest.raises(InputError, match=r"other settings \(steps: 100 -> 200\)"):
        check_run_settings(out, {"steps": 200})


def test_a_settings_record_cut_short_is_one_error_naming_it_and_one_written_whole_is_not_rewritten(tmp_path):
    """Rewritten in place on every run, a kill mid-write left an empty settings file, and every rerun stopped with a
    JSONDecodeError traceback."""
    out = tmp_path / "out.jsonl"
    run_resumable(ITEMS, Job(job, {"teacher": "a"}), out, 4, "first")
    settings = tmp_path / "out.jsonl.settings.json"
    stamp = settings.stat().st_mtime_ns
    run_resumable(ITEMS, Job(job, {"teacher": "a"}), out, 4, "again")
    assert settings.stat().st_mtime_ns == stamp  # the same settings: not written again
    settings.write_text("")
    with pytest.raises(InputError, match=r"out\.jsonl\.settings\.json: the record of the settings is not a JSON "
                                         r"object \(a write cut short\?\)"):
        run_resumable(ITEMS, Job(job, {"teacher": "a"}), out, 4, "cut")


def test_a_setting_added_since_at_its_default_is_not_a_change(tmp_path):
    """A package upgrade adds a config key: an output written before it resumes where the key has its default
    value (the behaviour the key made configurable), and is refused where it has another."""
    out = tmp_path / "results"
    out.mkdir()
    defaults = {"config": {"trainer": {"max_steps": 100, "new_key": "default"}, "new_section": {"a": 1}}}
    check_run_settings(out, {"config": {"trainer": {"max_steps": 100}}})
    check_run_settings(out, {"config": {"trainer": {"max_steps": 100, "new_key": "default"}, "new_section": {"a": 1}}},
                       defaults=defaults)
    (tmp_path / "results.settings.json").write_text(json.dumps({"config": {"trainer": {"max_steps": 100}}}))
    with pytest.raises(InputError, match=r"other settings \(config\.trainer\.new_key: None -> 'other'\)"):
        check_run_settings(out, {"config": {"trainer": {"max_steps": 100, "new_key": "other"}}}, defaults=defaults)
    with pytest.raises(InputError, match=r"config\.new_section: None -> \{'a': 2\}"):
        check_run_settings(out, {"config": {"trainer": {"max_steps": 100}, "new_section": {"a": 2}}}, defaults=defaults)
    with pytest.raises(InputError, match=r"config\.trainer\.max_steps: 100 -> 200"):
        check_run_settings(out, {"config": {"trainer": {"max_steps": 200}}}, defaults=defaults)


def test_ctrl_c_keeps_written_lines_and_says_how_to_resume(tmp_path):
    out = tmp_path / "out.jsonl"
    calls = []

    def interrupted(batch):
        calls.append(batch)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return job(batch)

    with pytest.raises(KeyboardInterrupt, match="rerun the same command to resume"):
        run_resumable(ITEMS, interrupted, out, batch_size=4, desc="ctrl-c")
    assert len(out.read_text().splitlines()) == 3  # utt01..utt03 (utt00 rejected)
    assert json.loads((tmp_path / "out.jsonl.summary.json").read_text())["status"] == "interrupted"
    assert run_resumable(ITEMS, job, out, batch_size=4, desc="resume").done_before == 4


# ---------------------------------------------------------------- degenerate_reason

TRANSCRIPT = "i cannot come to the meeting tomorrow because my car broke down"


@pytest.mark.parametrize(
    "answer, prompt, finished, transcript, reason",
    [
        ("", "Summarize the text.", True, None, "empty"),
        (" ... ", "Summarize the text.", True, None, "empty"),
        ("Summarize the following text.", f"Summarize the following text. {TRANSCRIPT}", True, TRANSCRIPT,
         "repeats_prompt"),
        (f"Summarize the following text: {TRANSCRIPT}", f"Summarize the following text: {TRANSCRIPT}", True,
         TRANSCRIPT, "repeats_prompt"),
        ("I'm sorry, but I can't help with that.", "Summarize the text.", True, None, "refusal"),
        ("As an AI language model, I do not have opinions.", "What do you think?", True, None, "refusal"),
        ("I cannot provide that information.", "Who is this?", True, None, "refusal"),
        ("the cat the cat the cat the cat the cat the cat", "Continue.", True, None, "repetition_loop"),
        ("It is late. I am here. I am here. I am here. I am here. I am here.", "Continue.", False, None,
         "repetition_loop"),
        ("The speaker explains that the car broke down and", "Summarize.", False, TRANSCRIPT, "truncated"),
        ("The speaker explains that the car bro", "Summarize.", False, TRANSCRIPT, "truncated"),
        # negatives: normal answers
        ("The speaker cannot attend tomorrow's meeting because their car broke down.",
         f"Summarize: {TRANSCRIPT}", True, TRANSCRIPT, None),
        ("I cannot come to the meeting tomorrow because my car broke down.", f"Repeat: {TRANSCRIPT}", True,
         TRANSCRIPT, None),  # a faithful repeat, not a refusal nor an echo
        ("I cannot make it tomorrow, my car is broken.", f"Paraphrase: {TRANSCRIPT}", True, TRANSCRIPT, None),
        ("They are sorry, but the car broke down, so they cannot come.", f"Explain: {TRANSCRIPT}", True,
         TRANSCRIPT, None),
        ("I'm sorry to hear that your car broke down.", f"Respond: {TRANSCRIPT}", True, TRANSCRIPT, None),
        ("No, no, no. That is not what she said.", "Did she agree?", True, None, None),
        ("The speaker's car broke down.", "Summarize.", False, TRANSCRIPT, None),  # cap hit at a sentence end
        ('He said "stop!"', "Quote him.", False, None, None),
        # refusal phrases the speech says too, as an ASR transcript writes them, and openings that only look like one
        ("I'm sorry, but we are closed today.", "Fix the grammar: im sorry but we are closed today", True,
         "im sorry but we are closed today", None),
        ("I cannot help you today.", "Paraphrase: i can not help you today", True, "i can not help you today", None),
        ("I cannot wait to feel the sand between my toes.", "Continue: we are going to the beach", True,
         "we are going to the beach", None),
        ("As an AI researcher, she studies language.", "Describe her.", True, None, None),
        ("As an AI, I have no opinions.", "What do you think?", True, None, "refusal"),
        ("I can't assist with that request.", "Summarize the text.", True, None, "refusal"),
    ],
)
def test_degenerate_reason(answer, prompt, finished, transcript, reason):
    assert degenerate_reason(answer, prompt, finished, transcript) == reason


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
