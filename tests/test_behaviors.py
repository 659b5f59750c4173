"""MTBI behavior generation: catalog split rules, resumability after a real kill, the record format."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.data.task_catalog import HELDOUT, TaskCatalog
from nemo_speechlm.datagen.behaviors import behavior_items, behavior_job
from nemo_speechlm.datagen.chat_generator import GenerationResult
from tests.conftest import REPO
from tests.tiny_assets import relative_bundle


def test_heldout_tasks_and_prompts_never_get_training_behaviors(assets):
    catalog = TaskCatalog.load()
    items = list(behavior_items(assets["manifest"], catalog, tasks_per_utterance=20, prompts_per_task=11))
    seen_tasks = {item["prompt"].task for item in items}
    assert seen_tasks == {t.name for t in catalog.training_tasks}
    assert all(item["prompt"].split != HELDOUT for item in items)
    assert len({item["key"] for item in items}) == len(items)


def _moved_corpus(manifest, tmp_path) -> Path:
    """A copy of the manifest's audio in another folder, and its manifest."""
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    lines = []
    for line in open(manifest):
        entry = json.loads(line)
        audio = moved / Path(entry["audio_filepath"]).name
        shutil.copy(entry["audio_filepath"], audio)
        lines.append(json.dumps({**entry, "audio_filepath": str(audio)}))
    (tmp_path / "moved.json").write_text("\n".join(lines) + "\n")
    return tmp_path / "moved.json"


def test_the_same_corpus_in_another_folder_draws_the_same_prompts(assets, tmp_path):
    """Prompts are sampled per utterance by its file name, not its path: a corpus moved (or the demo's
    --out changed) keeps its tasks, and so its behaviors and results."""
    _moved_corpus(assets["manifest"], tmp_path)
    catalog = TaskCatalog.load()

    def prompts(manifest):
        return [item["prompt"].id for item in behavior_items(manifest, catalog, tasks_per_utterance=2, prompts_per_task=1)]

    assert prompts(tmp_path / "moved.json") == prompts(assets["manifest"])


def _cmd(assets, output):
    return [
        sys.executable, str(REPO / "examples" / "generate_behaviors.py"),
        "--manifest", str(assets["manifest"]), "--output", str(output), "--teacher", str(assets["llm"]),
        "--batch-size", "1", "--max-new-tokens", "12", "--tasks-per-utterance", "3", "--ground-truth-tasks", "repeat",
        # every utterance gets these three, so the repeat lines are always accepted (sampled tasks depended on
        # the tmp path: ~6% of runs drew no repeat, the tiny LLM's answers were all rejected, nothing to read)
        "--tasks", "repeat", "continue", "summarize",
    ]


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_killed_run_resumes_to_the_same_output(assets, tmp_path):
    full = tmp_path / "full.jsonl"
    subprocess.run(_cmd(assets, full), check=True, capture_output=True, timeout=600)
    total = len(_lines(full)) + len(_lines(tmp_path / "full.jsonl.rejected.jsonl"))
    assert total == 24  # 8 utterances x 3 tasks, each written or rejected

    part = tmp_path / "part.jsonl"
    rejected = tmp_path / "part.jsonl.rejected.jsonl"
    proc = subprocess.Popen(_cmd(assets, part), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(_lines(part)) + len(_lines(rejected)) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()  # SIGKILL: no cleanup, as in a crash
    proc.wait()
    interrupted_at = len(_lines(part)) + len(_lines(rejected))
    assert 6 <= interrupted_at < 24, "the run must be interrupted part way for this test to mean anything"

    done = subprocess.run(_cmd(assets, part), check=True, capture_output=True, text=True, timeout=600)
    assert f"{interrupted_at} already done" in done.stdout
    assert _lines(part) == _lines(full)
    assert _lines(rejected) == _lines(tmp_path / "full.jsonl.rejected.jsonl")
    record = json.loads(_lines(full)[0])
    assert {"audio_filepath", "duration", "text", "task", "prompt", "response", "split", "teacher"} <= set(record)
    assert Path(record["audio_filepath"]).is_absolute()  # as the manifest gave it

    # The same corpus moved to another folder has other keys (they name the audio file): writing its
    # behaviors into the old output is refused, not appended (a copied demo folder trained on all twice).
    cmd = _cmd(assets, full)
    cmd[cmd.index("--manifest") + 1] = str(_moved_corpus(assets["manifest"], tmp_path))
    moved = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert moved.returncode == 2 and "Traceback" not in moved.stderr, moved.stderr[-2000:]
    assert "full.jsonl holds 24 records of items this run does not have" in moved.stderr.strip().splitlines()[-1]
    assert _lines(full) == _lines(part)

    # The same items with another teacher cap: refused, not resumed (one training set would mix two teachers'
    # answers; that was silent before). The whole file is done, so only the settings check can stop it.
    cmd = _cmd(assets, full)
    cmd[cmd.index("--max-new-tokens") + 1] = "16"
    other = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert other.returncode == 2 and "Traceback" not in other.stderr, other.stderr[-2000:]
    assert "full.jsonl holds results made with other settings (max_new_tokens: 12 -> 16)" in other.stderr.strip().splitlines()[-1]
    assert _lines(full) == _lines(part)


def test_behaviors_of_a_relative_manifest_move_with_their_folder(assets, tmp_path):
    """A dataset shipped as one folder (relative audio paths) keeps working once its behaviors are written:
    the paths and keys stay relative (to the behaviors file), so the folder moved elsewhere trains and resumes."""
    manifest = relative_bundle(assets["manifest"], tmp_path / "bundle")
    output = tmp_path / "bundle" / "behaviors" / "behaviors.jsonl"
    cmd = _cmd(assets, output)
    cmd[cmd.index("--manifest") + 1] = str(manifest)
    cmd[cmd.index("--tasks") + 1 : cmd.index("--tasks") + 4] = ["repeat"]  # the ground truth: no LLM answers
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    records = [json.loads(line) for line in _lines(output)]
    assert len(records) == 8 and all(r["audio_filepath"].startswith("../audio/") for r in records)
    assert all(r["key"].startswith(r["audio_filepath"] + "@0.000|repeat/") for r in records)

    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    moved_output = tmp_path / "moved" / "behaviors" / "behaviors.jsonl"
    assert [e["response"] for e in read_manifest(moved_output)] == [r["response"] for r in records]  # audio found
    cmd[cmd.index("--manifest") + 1] = str(tmp_path / "moved" / "manifest.jsonl")
    cmd[cmd.index("--output") + 1] = str(moved_output)
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert "8 already done" in rerun.stdout and _lines(moved_output) == [json.dumps(r) for r in records]


def test_a_corrected_transcript_is_answered_anew(assets, tmp_path):
    """Keyed by audio and prompt, a line whose transcript was corrected kept the behaviors of the old transcript."""
    rows = [json.loads(line) for line in assets["manifest"].read_text().splitlines()]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    output = tmp_path / "behaviors.jsonl"
    cmd = _cmd(assets, output)
    cmd[cmd.index("--manifest") + 1] = str(manifest)
    cmd[cmd.index("--tasks") + 1 : cmd.index("--tasks") + 4] = ["repeat"]  # the ground truth: the transcript itself
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    rows[3]["text"] = "a corrected transcript"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rerun = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    assert "7 already done, 1 written" in rerun.stdout
    records = {r["audio_filepath"]: r for r in map(json.loads, _lines(output))}
    assert len(records) == 8 and records[rows[3]["audio_filepath"]]["response"] == "a corrected transcript"


class _EchoingTeacher:
    """A teacher that answers every request with the speech's words (the transcript after the prompt's text)."""

    def __init__(self, transcripts: list[str]) -> None:
        self.transcripts = transcripts

    def generate(self, conversations, max_new_tokens=None):
        said = [next(t for t in self.transcripts if t in c[-1]["content"]) for c in conversations]
        return [GenerationResult(text=t[:1].upper() + t[1:] + ".", finished=True) for t in said]

    def generation_settings(self) -> dict:
        return {"model": "echo", "backend": "test", "do_sample": False}


def test_an_echo_of_the_speech_is_rejected_where_the_task_must_differ_from_it(assets):
    """paraphrase, continue and reply ask for something other than the words said: an echo was kept (reply's prompt
    is the speech alone, so the repeats-the-prompt filter never saw it), training the habit reply exists to cure."""
    catalog = TaskCatalog.load().select(["paraphrase", "reply", "summarize", "repeat"])
    items = list(behavior_items(assets["manifest"], catalog, tasks_per_utterance=4, prompts_per_task=1))
    transcripts = [json.loads(line)["text"] for line in open(assets["manifest"])]
    outcomes = behavior_job(_EchoingTeacher(transcripts), catalog, max_new_tokens=32)(items)
    by_task = {}
    for item, outcome in zip(items, outcomes):
        by_task.setdefault(item["prompt"].task, set()).add(getattr(outcome, "reason", "kept"))
    assert by_task["paraphrase"] == by_task["reply"] == {"copies_transcript"}
    assert by_task["repeat"] == {"kept"}  # the words said are repeat's answer
    assert "copies_transcript" not in by_task["summarize"]  # its check is another one


def test_ground_truth_tasks_are_checked_before_any_model_and_a_missing_field_names_its_line(assets, tmp_path):
    """A misspelled name was ignored (the LLM asked instead, the name recorded); a line without the field was a
    bare KeyError."""
    import pytest

    from nemo_speechlm.errors import InputError
    from nemo_speechlm.data.manifest import ManifestError

    catalog = TaskCatalog.load().select(["repeat", "summarize"])
    teacher = _EchoingTeacher([])
    with pytest.raises(InputError, match="unknown task 'Repeat'; the tasks are repeat, summarize"):
        behavior_job(teacher, catalog, 32, ground_truth_tasks=("Repeat",))
    with pytest.raises(InputError, match="task 'summarize' has no ground_truth"):
        behavior_job(teacher, catalog, 32, ground_truth_tasks=("summarize",))
    french = TaskCatalog.load().select(["translate_fr"])
    rows = [{**json.loads(line), "translation_fr": "le chat"} for line in open(assets["manifest"])][:2]
    del rows[1]["translation_fr"]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items = list(behavior_items(manifest, french, 1, 1))
    with pytest.raises(ManifestError, match=r"m\.jsonl:2 field 'translation_fr': missing or empty: task 'translate_fr'"):
        behavior_job(teacher, french, 32, ground_truth_tasks=("translate_fr",))(items)


def test_a_task_cap_or_prompt_edited_in_the_catalog_is_not_resumed_into(assets, tmp_path):
    """Each task's cap and each prompt's words are part of the job's settings: edited, the run resumed and mixed
    answers made under two caps."""
    import dataclasses

    import pytest

    from nemo_speechlm.parts.runner import run_resumable

    catalog = TaskCatalog.load().select(["summarize", "paraphrase"])
    transcripts = [json.loads(line)["text"] for line in open(assets["manifest"])]
    items = list(behavior_items(assets["manifest"], catalog, 2, 1))
    out = tmp_path / "behaviors.jsonl"
    run_resumable(items[:4], behavior_job(_EchoingTeacher(transcripts), catalog, 32), out, batch_size=4, desc="b")
    capped = TaskCatalog([dataclasses.replace(t, max_new_tokens=4) if t.name == "summarize" else t for t in catalog],
                         catalog.path)
    with pytest.raises(ValueError, match=r"other settings \(task_caps\.summarize: \d+ -> 4\)"):
        run_resumable(items, behavior_job(_EchoingTeacher(transcripts), capped, 32), out, batch_size=4, desc="b")
    settings = out.with_name(out.name + ".settings.json")
    recorded = json.loads(settings.read_text())
    settings.write_text(json.dumps({k: v for k, v in recorded.items() if k not in ("task_caps", "prompts")}))
    summary = run_resumable(items, behavior_job(_EchoingTeacher(transcripts), catalog, 32), out, batch_size=4, desc="b")
    assert summary.done_before == 4  # an output from before they were recorded resumes


def test_a_repeated_manifest_line_is_named_by_its_file_lines(assets, tmp_path):
    """A line given twice makes the same items twice; the error named their positions among the items (e.g. "items
    1 and 9"), not the manifest lines to remove."""
    from nemo_speechlm.errors import InputError
    from nemo_speechlm.parts.runner import run_resumable

    lines = Path(assets["manifest"]).read_text().splitlines()
    manifest = tmp_path / "twice.jsonl"
    manifest.write_text("\n".join(lines[:3] + lines[:1]) + "\n")
    items = list(behavior_items(manifest, TaskCatalog.load(), 1, 1))
    with pytest.raises(InputError, match=rf"{manifest}:1 and {manifest}:4 are the same item"):
        run_resumable(items, lambda batch: [], tmp_path / "out.jsonl", batch_size=4, desc="Generating behaviors")
