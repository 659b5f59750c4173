"""VoiceTextBlender data generation: speech QA (real SmolLM2 + espeak), mixed-modal (espeak), text SFT conversion."""
import json
import os
import re
import runpy
from pathlib import Path

import pytest
import soundfile

from nemo_speechlm.data.manifest import ManifestError, SkipSummary
from nemo_speechlm.data.task_checks import split_sentences
from nemo_speechlm.data.text_sft import prepare_text_sft, read_text_sft
from nemo_speechlm.datagen.mixed_modal import choose_spoken_span, sentence_spans
from nemo_speechlm.datagen.sqa import REASONS, parse_sqa
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, run_cli
from nemo_speechlm.parts.runner import Rejected
from nemo_speechlm.tts import EspeakTTS, normalize_for_tts
from tests.conftest import REPO

TAG = "<|audio|>"


def script(name):
    """``main`` of an example script, run in this process (no second NeMo import)."""
    return runpy.run_path(str(REPO / "examples" / name), run_name="example")["main"]


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def assert_audio_matches(record):
    assert os.path.isfile(record["audio_filepath"]), record
    info = soundfile.info(record["audio_filepath"])
    assert abs(record["duration"] - info.frames / info.samplerate) <= 0.01, (record, info)
    return info


# ---------------------------------------------------------------- speech QA

TRANSCRIPTS = [
    "The train to Boston leaves at seven thirty every morning.",
    "My sister planted tomatoes and basil in the garden last spring.",
    "The library closes early on Sundays because of the holiday.",
]


@pytest.fixture(scope="module")
def asr_manifest(tmp_path_factory):
    """Three real espeak utterances as a NeMo ASR manifest."""
    root = tmp_path_factory.mktemp("asr")
    tts = EspeakTTS("en-us", rate=175, sample_rate=16000)
    lines = []
    for i, text in enumerate(TRANSCRIPTS):
        syn = tts.synthesize(text)
        wav = root / f"utt{i}.wav"
        soundfile.write(str(wav), syn.audio, syn.sample_rate, subtype="PCM_16")
        lines.append({"audio_filepath": str(wav), "duration": round(syn.duration, 4), "text": syn.text})
    return write_jsonl(root / "asr.jsonl", lines)


@pytest.mark.timeout(600)
def test_sqa_with_smollm2_gives_valid_lines_or_counted_rejections(asr_manifest, tmp_path, capsys):
    out = tmp_path / "sqa.jsonl"
    script("generate_sqa.py")(["--manifest", str(asr_manifest), "--output", str(out), "--device", "cpu",
                               "--batch-size", "3", "--max-new-tokens", "64"])
    lines, rejected = jsonl(out), jsonl(tmp_path / "sqa.jsonl.rejected.jsonl")
    summary = json.loads((tmp_path / "sqa.jsonl.summary.json").read_text())
    print(f"SmolLM2 SQA: {len(lines)} accepted, rejected {summary['rejected']}: {lines} {rejected}")
    assert len(lines) + len(rejected) == len(TRANSCRIPTS) == summary["written"] + sum(summary["rejected"].values())
    inputs = {r["audio_filepath"]: r for r in jsonl(asr_manifest)}
    for line in lines:
        assert isinstance(line["question"], str) and line["question"].strip()
        assert isinstance(line["answer"], str) and line["answer"].strip()
        assert line["original_text"] == inputs[line["audio_filepath"]]["text"] and "text" not in line
        assert line["teacher"]["model"].endswith(".gguf") and line["teacher"]["max_new_tokens"] == 64
        assert_audio_matches(line)
    assert all(r["reason"] in REASONS for r in rejected), rejected
    # a corrected transcript is asked about anew, accepted or rejected before (keyed by audio, it kept its old pair)
    corrected = jsonl(asr_manifest)
    corrected[1]["text"] = "My brother planted roses in the garden last autumn."
    manifest = write_jsonl(tmp_path / "corrected.jsonl", corrected)
    capsys.readouterr()
    script("generate_sqa.py")(["--manifest", str(manifest), "--output", str(out), "--device", "cpu",
                               "--batch-size", "3", "--max-new-tokens", "64"])
    assert f"{len(TRANSCRIPTS)} items, {len(TRANSCRIPTS) - 1} already done" in capsys.readouterr().out
    redone = [r for r in jsonl(out) if r["audio_filepath"] == corrected[1]["audio_filepath"]]
    assert [r["original_text"] for r in redone] in ([], [corrected[1]["text"]])
    assert len(jsonl(out)) + len(jsonl(tmp_path / "sqa.jsonl.rejected.jsonl")) == len(TRANSCRIPTS)


def test_sqa_parser_on_hand_written_outputs():
    qa = {"question": "When does the train leave?", "answer": "At seven thirty."}
    assert parse_sqa(json.dumps(qa)) == qa
    assert parse_sqa(f"```json\n{json.dumps(qa, indent=2)}\n```") == qa
    assert parse_sqa(f"Sure! Here it is: {json.dumps(qa)} Hope it helps.") == qa
    assert parse_sqa('{"question": "How many?", "answer": 3}') == {"question": "How many?", "answer": "3"}
    assert parse_sqa("{oops} then " + json.dumps(qa)) == qa  # the first *valid* object
    for output in ("none", "None.", "NONE", "```\nnone\n```", '"none"'):
        assert parse_sqa(output) == Rejected("none", output), output
    for output in ("I think the question is about trains.", "", '{"question": "When', "[1, 2]", "nonetheless, hi"):
        assert parse_sqa(output).reason == "unparsable", output
    # the instruction's own template, echoed by a small teacher, is no question
    for output in ('{"question": "", "answer": "x"}', '{"question": "Why?"}', '{"question": "Why?", "answer": "  "}',
                   '{"question": "...", "answer": "..."}', 'Reply with a single JSON object: {"question": "...", "answer": '
                   '"..."}. If the text is meaningless, reply with: none'):
        assert parse_sqa(output).reason == "empty_field", output
    for output in ('{"question": "none", "answer": "none"}', '{"question": "None.", "answer": "x"}'):
        assert parse_sqa(output).reason == "none", output
    assert parse_sqa('{"question": "How many are left?", "answer": "None."}') == {"question": "How many are left?",
                                                                                 "answer": "None."}
    for question in ("When does the museum open?", "when does the museum open ?", "When does the museum open"):
        assert parse_sqa(json.dumps({"question": question, "answer": "At ten."})).reason == "copied_example", question


# ---------------------------------------------------------------- mixed-modal

CONVERSATIONS = [
    {"id": "multi", "conversations": [
        {"from": "User", "value": "I bought 3 apples for $2.50 at the market. How much did each one cost? "
                                  "Please explain your steps briefly."},
        {"from": "Assistant", "value": "Each apple cost about 83 cents."},
        {"from": "User", "value": "And 6 apples?"},
        {"from": "Assistant", "value": "Five dollars."}]},
    {"id": "single", "system": "You are a poet.", "conversations": [
        {"from": "User", "value": "Write 2 short poems about the sea for Dr. Lee."},
        {"from": "Assistant", "value": "Waves fold into foam."}]},
    {"id": "two", "conversations": [
        {"from": "User", "value": "Summarize the text below.\n\nDr. Lee opened the clinic in 1998. It is still open."},
        {"from": "Assistant", "value": "Dr. Lee's clinic, opened in 1998, is still open."}]},
]
UNUSABLE = [
    {"id": "no_user", "conversations": [{"from": "Assistant", "value": "Hello."}]},
    {"id": "empty", "conversations": [{"from": "User", "value": "  "}, {"from": "Assistant", "value": "Hm."}]},
    # the locator anywhere else: accepted, then refused by training (more locators than audio)
    {"id": "later_locator", "conversations": [{"from": "User", "value": "Hello there."}, {"from": "Assistant", "value": "Hi."},
                                              {"from": "User", "value": "What is <|audio|>?"}, {"from": "Assistant", "value": "A tag."}]},
    {"id": "system_locator", "system": "Read <|audio|> aloud.",
     "conversations": [{"from": "User", "value": "Hello there."}, {"from": "Assistant", "value": "Hi."}]},
]


def run_mixed_modal(input_path, out, audio_dir):
    script("generate_mixed_modal.py")(["--input", str(input_path), "--output", str(out), "--audio-dir", str(audio_dir),
                                       "--voices", "en-us", "en-gb", "--rates", "160", "200", "--seed", "3"])


@pytest.fixture(scope="module")
def mixed_modal(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    source = write_jsonl(root / "text_sft.jsonl", CONVERSATIONS + UNUSABLE)
    out = root / "mixed.jsonl"
    run_mixed_modal(source, out, root / "wavs")
    return root, source, out


def test_mixed_modal_lines_are_valid_and_reconstruct_the_instruction(mixed_modal):
    _, _, out = mixed_modal
    lines = {r["id"]: r for r in jsonl(out)}
    assert sorted(lines) == sorted(c["id"] for c in CONVERSATIONS)
    for source in CONVERSATIONS:
        line = lines[source["id"]]
        assert set(line) == {"id", "conversations", "audio_filepath", "duration", "spoken_text", "speaker"} | (
            {"system"} if "system" in source else set())
        assert assert_audio_matches(line).samplerate == 16000
        assert line["speaker"] in {"en-us@160", "en-us@200", "en-gb@160", "en-gb@200"}
        user, *rest = line["conversations"]
        assert rest == source["conversations"][1:] and user["from"] == "User"
        assert user["value"].count(TAG) == 1
        before, after = user["value"].split(TAG)
        original = source["conversations"][0]["value"]
        assert original.startswith(before) and original.endswith(after)
        spoken_part = original[len(before): len(original) - len(after)]
        assert spoken_part.strip() and line["spoken_text"] == normalize_for_tts(spoken_part)
        # Whole sentences were spoken: the three parts split into the instruction's sentences, in order.
        assert split_sentences(before) + split_sentences(spoken_part) + split_sentences(after) == split_sentences(original)
    assert lines["single"]["conversations"][0]["value"] == TAG  # one sentence: fully spoken, normalized
    assert lines["single"]["spoken_text"] == "Write two short poems about the sea for Doctor Lee."
    assert lines["single"]["system"] == "You are a poet."


def test_the_spoken_run_is_drawn_uniformly_from_every_speakable_run_within_the_word_limit():
    """Against the definition, run by run (the generator used to compute it so, in cubic time: minutes for a pasted
    10,000-line text); the draw must stay the same, or a resumed generation would redo its lines."""
    import random

    def by_definition(text, rng, limit):
        spans = sentence_spans(text)
        spoken = [normalize_for_tts(text[a:b]) for a, b in spans]
        runs, too_long = [], False
        for i in range(len(spans)):
            for j in range(i + 1, len(spans) + 1):
                if not any(any(c.isalnum() for c in s) for s in spoken[i:j]):
                    continue
                if limit is not None and sum(len(s.split()) for s in spoken[i:j]) > limit:
                    too_long = True
                    continue
                runs.append((spans[i][0], spans[j - 1][1]))
        return rng.choice(runs) if runs else ("too_long" if too_long else "empty_text")

    pieces = ["Hello there.", "...", "I bought 3 apples for $2.50.", "?!", "What is the time?", "A B C D E F G.", "Ok."]
    draw = random.Random(0)
    for seed in range(400):
        text = " ".join(draw.choice(pieces) for _ in range(draw.randint(1, 8)))
        limit = draw.choice([None, 1, 3, 5, 100])
        assert choose_spoken_span(text, random.Random(seed), limit) == by_definition(text, random.Random(seed), limit)


def test_unusable_conversations_are_rejected_and_counted(mixed_modal):
    root, _, out = mixed_modal
    rejected = {r["key"]: r["reason"] for r in jsonl(root / "mixed.jsonl.rejected.jsonl")}
    assert rejected == {"no_user": "no_user_turn", "empty": "empty_text", "later_locator": "locator_in_text",
                        "system_locator": "locator_in_text"}
    summary = json.loads((root / "mixed.jsonl.summary.json").read_text())
    assert summary["written"] == 3 and summary["rejected"] == {"empty_text": 1, "no_user_turn": 1, "locator_in_text": 2}


def test_mixed_modal_rerun_resumes_and_reproduces_the_choices(mixed_modal, tmp_path):
    root, source, out = mixed_modal
    before = out.read_bytes(), (root / "mixed.jsonl.rejected.jsonl").read_bytes()
    wav_times = {p: p.stat().st_mtime_ns for p in (root / "wavs").iterdir()}
    run_mixed_modal(source, out, root / "wavs")
    assert (out.read_bytes(), (root / "mixed.jsonl.rejected.jsonl").read_bytes()) == before
    assert {p: p.stat().st_mtime_ns for p in (root / "wavs").iterdir()} == wav_times  # nothing re-synthesized
    summary = json.loads((root / "mixed.jsonl.summary.json").read_text())
    assert summary["done_before"] == len(CONVERSATIONS + UNUSABLE) and summary["written"] == 0
    # Other voices into the same output: refused, not appended in the new voices (settings.json beside it).
    from nemo_speechlm.errors import InputError

    with pytest.raises(InputError, match="holds results made with other settings \\(voices: \\['en-us', 'en-gb'\\] -> "):
        script("generate_mixed_modal.py")(["--input", str(source), "--output", str(out), "--audio-dir", str(root / "wavs"),
                                           "--voices", "en-us", "--rates", "160", "200", "--seed", "3"])
    # A fresh run with the same seed picks the same speakers and sentences (the audio may differ by a few samples).
    run_mixed_modal(source, tmp_path / "again.jsonl", tmp_path / "wavs")
    choices = lambda path: [(r["id"], r["conversations"], r["spoken_text"], r["speaker"]) for r in jsonl(path)]  # noqa: E731
    assert choices(tmp_path / "again.jsonl") == choices(out)


def test_an_edited_conversation_is_spoken_anew_and_a_fixed_one_retried(mixed_modal, tmp_path):
    """Keyed by id, an edited conversation kept its old line (speech of the old instruction) and a fixed one its
    rejection."""
    import shutil

    root, _, out = mixed_modal
    for name in ("mixed.jsonl", "mixed.jsonl.rejected.jsonl", "mixed.jsonl.settings.json"):
        shutil.copy(root / name, tmp_path / name)
    edited = json.loads(json.dumps(CONVERSATIONS + UNUSABLE))
    edited[1]["conversations"][0]["value"] = "Write a haiku about the moon."
    edited[4]["conversations"][0]["value"] = "Say hello."  # "empty" was rejected as empty_text
    run_mixed_modal(write_jsonl(tmp_path / "edited.jsonl", edited), tmp_path / "mixed.jsonl", root / "wavs")
    summary = json.loads((tmp_path / "mixed.jsonl.summary.json").read_text())
    assert summary["done_before"] == len(edited) - 2 and summary["written"] == 2
    lines = {r["id"]: r for r in jsonl(tmp_path / "mixed.jsonl")}
    assert lines["single"]["spoken_text"] == "Write a haiku about the moon." and lines["empty"]["spoken_text"] == "Say hello."
    assert {r["id"]: r for r in jsonl(out)}["multi"] == lines["multi"]  # the unchanged lines are kept as they were
    assert [r["key"] for r in jsonl(tmp_path / "mixed.jsonl.rejected.jsonl")] == ["no_user", "later_locator", "system_locator"]


def test_two_datasets_sharing_an_audio_dir_keep_their_own_speech(mixed_modal, tmp_path):
    """Named by id alone, a second dataset with an id of the first ("single") replaced its wav under its lines."""
    root, _, out = mixed_modal
    first = {r["id"]: r for r in jsonl(out)}["single"]
    wav_before = Path(first["audio_filepath"]).read_bytes()
    other = write_jsonl(tmp_path / "other.jsonl", [{"id": "single", "conversations": [
        {"from": "User", "value": "Tell me a joke about the moon."}, {"from": "Assistant", "value": "It was full."}]}])
    run_mixed_modal(other, tmp_path / "other_mixed.jsonl", root / "wavs")
    second = jsonl(tmp_path / "other_mixed.jsonl")[0]
    assert second["audio_filepath"] != first["audio_filepath"]
    assert Path(first["audio_filepath"]).read_bytes() == wav_before


# ---------------------------------------------------------------- text SFT conversion

EXPECTED = {"conversations": [{"from": "User", "value": "Hi there."}, {"from": "Assistant", "value": "Hello!"}]}
WITH_SYSTEM = {"system": "Be brief.", **EXPECTED}


@pytest.mark.parametrize("record, expected", [
    ({"conversations": [{"from": "human", "value": "Hi there."}, {"from": "gpt", "value": "Hello!"}]}, EXPECTED),
    ({"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there."},
                        {"from": "gpt", "value": "Hello!"}]}, WITH_SYSTEM),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
                   {"role": "assistant", "content": "Hello!"}]}, WITH_SYSTEM),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi there."}]},
                   {"role": "assistant", "content": "Hello!"}]}, EXPECTED),
    ({"instruction": "Hi there.", "input": "", "output": "Hello!"}, EXPECTED),
    ({"instruction": "Translate to French.", "input": "Good night.", "output": "Bonne nuit."},
     {"conversations": [{"from": "User", "value": "Translate to French.\n\nGood night."},
                        {"from": "Assistant", "value": "Bonne nuit."}]}),
    ({"id": 7, **WITH_SYSTEM}, {"id": 7, **WITH_SYSTEM}),  # our own format passes through
    # LLaMA-Factory's Alpaca history: the turns before (it was dropped); an empty instruction takes the input
    ({"instruction": "And in French?", "output": "Bonjour", "history": [["Say hello in German.", "Hallo"]]},
     {"conversations": [{"from": "User", "value": "Say hello in German."}, {"from": "Assistant", "value": "Hallo"},
                        {"from": "User", "value": "And in French?"}, {"from": "Assistant", "value": "Bonjour"}]}),
    ({"instruction": "", "input": "Hi there.", "output": "Hello!"}, EXPECTED),
    ({"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi there."},
                   {"role": "assistant", "content": "Hello!", "weight": 1}]}, WITH_SYSTEM),  # OpenAI's newer name
])
def test_prepare_text_sft_converts_each_format(tmp_path, record, expected):
    out = tmp_path / "ours.jsonl"
    assert prepare_text_sft([write_jsonl(tmp_path / "in.jsonl", [record])], out) == 1
    assert jsonl(out) == [expected]


def test_prepare_text_sft_cli_reads_json_arrays_and_mixed_files(tmp_path, capsys):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Hi there.", "input": "", "output": "Hello!"}] * 2))
    sharegpt = write_jsonl(tmp_path / "mixed.jsonl", [
        {"conversations": [{"from": "human", "value": "Hi there."}, {"from": "gpt", "value": "Hello!"}]},
        "",
        {"messages": [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello!"}]},
    ])
    script("prepare_text_sft.py")(["--inputs", str(alpaca), str(sharegpt), "--output", str(tmp_path / "out.jsonl")])
    assert "Wrote 4 conversations" in capsys.readouterr().out
    assert jsonl(tmp_path / "out.jsonl") == [EXPECTED] * 4


@pytest.mark.parametrize("record, field, message", [
    ({"conversations": [{"from": "human", "value": "Hi"}, {"from": "bot", "value": "Hello"}]},
     "conversations[1].from", "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  "}]},
     "messages[1].content", "empty Assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
                   {"role": "assistant", "content": "Yes"}]}, "messages[1].role", "alternate"),
    ({"conversations": [{"from": "human", "value": "Hi"}]}, "conversations[0].from", "end with an assistant turn"),
    ({"conversations": [{"from": "gpt", "value": "Hi"}]}, "conversations[0].from", "start with a user turn"),
    ({"instruction": "Say hi.", "output": ""}, "output", "empty Assistant turn"),
    ({"prompt": "Hi", "completion": "Hello"}, None, "unrecognized SFT record"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Bad", "weight": 0},
                   {"role": "user", "content": "Again"}, {"role": "assistant", "content": "Good"}]},
     "messages[1].weight", "`weight: 0`"),  # was trained like any answer
    ({"instruction": "Hi", "output": "Hello", "history": [["only one"]]}, "history", "list of \\[user, assistant\\] pairs"),
])
def test_bad_sft_records_fail_naming_file_line_and_field(tmp_path, record, field, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXPECTED, record])
    with pytest.raises(ManifestError, match=message) as err:
        list(read_text_sft(path))
    assert err.value.line == 2 and err.value.field == field and str(err.value).startswith(f"{path}:2")
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ManifestError):
        prepare_text_sft([path], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()  # no partial output
    skipped = SkipSummary()
    assert prepare_text_sft([path], tmp_path / "out.jsonl", skip_invalid=True, summary=skipped) == 1
    assert skipped.total == 1


def test_a_byte_order_mark_does_not_hide_the_first_record(tmp_path):
    """A BOM made a JSON array read as JSONL (the array lost, line by line) and a JSONL file's first line invalid."""
    bom = "\ufeff"
    array = tmp_path / "bom.json"
    array.write_text(bom + json.dumps([{"instruction": "Hi there.", "output": "Hello!"}] * 2), encoding="utf-8")
    lines = tmp_path / "bom.jsonl"
    lines.write_text(bom + json.dumps(EXPECTED) + "\n" + json.dumps(EXPECTED) + "\n", encoding="utf-8")
    for path in (array, lines):
        assert prepare_text_sft([path], tmp_path / "out.jsonl") == 2 and jsonl(tmp_path / "out.jsonl") == [EXPECTED] * 2


def test_prepare_text_sft_into_a_directory_is_an_error_naming_it(tmp_path):
    """Found at the final rename, the error named the temporary file ("out.tmp: Is a directory") and no fix."""
    from nemo_speechlm.errors import InputError

    (tmp_path / "out").mkdir()
    with pytest.raises(InputError, match=r"out: is a directory"):
        prepare_text_sft([write_jsonl(tmp_path / "in.jsonl", [EXPECTED])], tmp_path / "out")


def test_prepare_text_sft_cli_error_names_the_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXPECTED, "{not json"])
    with pytest.raises(SystemExit) as exc:
        run_cli(script("prepare_text_sft.py"), ["--inputs", str(path), "--output", str(tmp_path / "out.jsonl")],
                skip_hint=SKIP_FLAG_HINT)
    assert exc.value.code == 2
    assert re.fullmatch(re.escape(f"error: {path}:2: not valid JSON") + ".*--skip-invalid.*\n", capsys.readouterr().err)


def test_fastpitch_missing_checkpoint_is_a_clear_error(tmp_path):
    from nemo_speechlm.tts.fastpitch import FastPitchTTS

    with pytest.raises(FileNotFoundError, match="missing.nemo"):
        FastPitchTTS(fastpitch=str(tmp_path / "missing.nemo"))
