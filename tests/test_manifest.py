"""Bad manifest input raises errors that name the file, the line and the field."""
import json
import shutil

import pytest
from omegaconf import OmegaConf

from nemo_speechlm.data.conversations import DATA_TYPE, entry_to_conversation, read_speechlm_manifest
from nemo_speechlm.data.manifest import ManifestError, SkipSummary, read_manifest


def good_line(assets, i=0):
    return json.loads(assets["manifest"].read_text().splitlines()[i])


def write(tmp_path, lines):
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return path


def first_error(path, **kwargs):
    with pytest.raises(ManifestError) as info:
        list(read_manifest(path, **kwargs))
    return str(info.value)


def test_valid_manifest_reads(assets):
    entries = list(read_manifest(assets["manifest"]))
    assert len(entries) == 8 and entries[0].line == 1


def test_not_json(assets, tmp_path):
    path = write(tmp_path, [good_line(assets), "{not json"])
    msg = first_error(path)
    assert f"{path}:2" in msg and "not valid JSON" in msg


def test_missing_audio_filepath(assets, tmp_path):
    line = good_line(assets)
    del line["audio_filepath"]
    msg = first_error(write(tmp_path, [line]))
    assert ":1 field 'audio_filepath'" in msg


def test_file_does_not_exist(assets, tmp_path):
    line = dict(good_line(assets), audio_filepath=str(tmp_path / "nope.wav"))
    msg = first_error(write(tmp_path, [line]))
    assert "does not exist" in msg and "nope.wav" in msg and ":1 field 'audio_filepath'" in msg


def test_corrupt_wav(assets, tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 3)
    line = dict(good_line(assets), audio_filepath=str(corrupt))
    msg = first_error(write(tmp_path, [good_line(assets, 1), line]))
    assert ":2 field 'audio_filepath'" in msg and "cannot read" in msg


def test_duration_must_match_file(assets, tmp_path):
    line = dict(good_line(assets))
    line["duration"] += 1.0
    msg = first_error(write(tmp_path, [line]))
    assert ":1 field 'duration'" in msg


def test_empty_transcript(assets, tmp_path):
    msg = first_error(write(tmp_path, [dict(good_line(assets), text="  ")]))
    assert ":1 field 'text'" in msg


def test_relative_paths_resolve_against_manifest_dir(assets, tmp_path):
    line = good_line(assets)
    shutil.copy(line["audio_filepath"], tmp_path / "a.wav")
    entries = list(read_manifest(write(tmp_path, [dict(line, audio_filepath="a.wav")])))
    assert entries[0]["audio_filepath"] == str(tmp_path / "a.wav")


def test_skip_invalid_counts_instead_of_failing(assets, tmp_path):
    path = write(tmp_path, [good_line(assets), "[1, 2]", dict(good_line(assets), text=""), good_line(assets, 2)])
    summary = SkipSummary()
    entries = list(read_manifest(path, skip_invalid=True, summary=summary))
    assert [e.line for e in entries] == [1, 4]
    assert summary.total == 2 and "2 lines skipped" in str(summary)


def test_a_line_that_is_not_utf8_is_an_error_naming_it_or_is_skipped(assets, tmp_path):
    """Decoded as a whole, one bad byte stopped every tool with a UnicodeDecodeError traceback, --skip-invalid or not."""
    from nemo_speechlm.data.text_sft import read_records

    bad = json.dumps(good_line(assets, 1)).encode().replace(b'"text": "', b'"text": "\xff')
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b"\n".join([json.dumps(good_line(assets)).encode(), bad, json.dumps(good_line(assets, 2)).encode()]) + b"\n")
    assert f"{path}:2: not valid UTF-8 (byte 0xff at byte " in first_error(path)
    summary = SkipSummary()
    assert [e.line for e in read_manifest(path, skip_invalid=True, summary=summary)] == [1, 3] and summary.total == 1
    with pytest.raises(ManifestError, match=":2: not valid UTF-8"):  # the text SFT reader, lines and JSON arrays
        list(read_records(path))
    array = tmp_path / "array.json"
    array.write_bytes(b'[\n{"a": "b"},\n{"a": "\xff"}\n]\n')
    with pytest.raises(ManifestError, match=":3: not valid UTF-8"):
        list(read_records(array))


def test_prompt_locator_count_must_match_audios(assets):
    entry = next(iter(read_manifest(assets["manifest"])))
    with pytest.raises(ManifestError, match=r":1 field 'prompt'.*found 2"):
        entry_to_conversation(entry, "compare <|audio|> and <|audio|>", "<|audio|>", 0.08)
    with pytest.raises(ManifestError, match=r"field 'prompt'.*found 0"):
        entry_to_conversation(entry, "no locator here", "<|audio|>", 0.08)


def test_data_type_builds_conversations_in_prompt_order(assets):
    cfg = OmegaConf.create(
        {
            "type": DATA_TYPE,
            "manifest_filepath": str(assets["manifest"]),
            "audio_locator_tag": "<|audio|>",
            "token_equivalent_duration": 0.08,
            "prompt": "before <|audio|> after",
            "force_finite": True,
        }
    )
    cuts, is_iterable = read_speechlm_manifest(cfg)
    convs = list(cuts)
    assert is_iterable and len(convs) == 8
    roles_kinds = [(t.role, type(t).__name__) for t in convs[0].turns]
    assert roles_kinds == [("user", "TextTurn"), ("user", "AudioTurn"), ("user", "TextTurn"), ("assistant", "TextTurn")]
    assert convs[0].turns[-1].value == good_line(assets)["text"]
