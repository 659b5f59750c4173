"""Data at scale: tarred NeMo manifests and Lhotse Shar as inputs of our data types, audio checked once."""
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import soundfile
import torch
from lhotse import CutSet
from omegaconf import OmegaConf

import nemo_speechlm.data.manifest as manifest_module
from nemo_speechlm.data.conversations import ManifestConversations, entry_cut
from nemo_speechlm.data.datamodule import build_datamodule, fill_model_settings
from nemo_speechlm.data.feature_cache import utterances_in
from nemo_speechlm.data.resumable import skip_batches
from nemo_speechlm.data.sources import LineSource
from nemo_speechlm.data.utterance import utterance_key
from nemo_speechlm.datagen.shar import write_shar
from nemo_speechlm.errors import ConfigError, InputError, ManifestError
from nemo_speechlm.models import MTBIModel
from tests.conftest import REPO, model_config
from tests.tiny_assets import write_behaviors


@pytest.fixture(scope="module")
def behaviors(assets, tmp_path_factory):
    return write_behaviors(assets["manifest"], tmp_path_factory.mktemp("behaviors") / "behaviors.jsonl")


@pytest.fixture(scope="module")
def shar_dir(behaviors, tmp_path_factory):
    out = tmp_path_factory.mktemp("shar") / "behaviors"
    counts = write_shar(behaviors, out, shard_size=3)
    assert counts == {"lines": 8, "shards_written": 3, "shards_before": 0, "skipped_invalid": 0}
    return out


@pytest.fixture(scope="module")
def model(assets):
    return MTBIModel(model_config(assets["llm"], freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$"])).eval()


def _data_cfg(source: dict, prob: float = 0.5):
    return OmegaConf.create({"train_ds": {
        "input_cfg": [{"type": "mtbi_behaviors", **source, "interleave": {"prob": prob}}],
        "batch_size": 4, "shuffle": False, "num_workers": 0, "seed": 0, "shard_seed": 0}})


def _batches(model, source: dict, n: int = 2):
    dm = build_datamodule(_data_cfg(source), model)
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    return [next(it) for _ in range(n)]


def test_shar_trains_on_the_same_batches_and_loss_as_the_manifest(model, behaviors, shar_dir):
    from_jsonl = _batches(model, {"manifest_filepath": str(behaviors)})
    from_shar = _batches(model, {"shar_path": str(shar_dir)})
    for a, b in zip(from_jsonl, from_shar):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["loss_mask"], b["loss_mask"])
        assert torch.equal(a["audio_segments"], b["audio_segments"])  # interleaved spans: the same times
        assert torch.equal(a["audio_lens"], b["audio_lens"]) and torch.equal(a["audios"], b["audios"])  # FLAC is lossless
        with torch.no_grad():
            assert model.compute_losses(a)["loss"].item() == model.compute_losses(b)["loss"].item()


def test_a_resumed_shar_stream_continues_where_the_trained_batches_left_it(model, shar_dir):
    """Archives are read by our data types, whose sampler runs in the training process (``force_map_dataset``),
    so a resumed run replays it to the step reached, as for JSONL (``data/resumable.py``)."""
    def loader():
        cfg = _data_cfg({"shar_path": str(shar_dir)})
        cfg.train_ds.batch_size, cfg.train_ds.shuffle = 2, True
        dm = build_datamodule(cfg, model)
        dm.setup("fit")
        return dm.train_dataloader()

    whole = [b["input_ids"] for _, b in zip(range(6), loader())]
    resumed = loader()
    assert skip_batches(resumed, 3)
    for got, want in zip([b["input_ids"] for _, b in zip(range(3), resumed)], whole[3:], strict=True):
        torch.testing.assert_close(got, want)


def test_feature_cache_finds_every_shar_utterance_once(model, shar_dir):
    data_cfg = fill_model_settings(_data_cfg({"shar_path": str(shar_dir)}, prob=1.0), model)
    utterances = utterances_in(data_cfg)
    assert len(utterances) == 8 and len({u.recording.id for u in utterances}) == 8  # spans map to their utterances


def test_conversion_resumes_at_the_first_unfinished_shard_and_refuses_other_input(behaviors, tmp_path, monkeypatch):
    out = tmp_path / "shar"
    write_shar(behaviors, out, shard_size=3)
    (out / "cuts.000002.jsonl.gz").unlink()  # as if killed while writing the last shard
    checked = []
    real = manifest_module.audio_duration
    monkeypatch.setattr(manifest_module, "audio_duration", lambda p: checked.append(p) or real(p))
    again = write_shar(behaviors, out, shard_size=3)
    assert (again["shards_written"], again["shards_before"], again["lines"]) == (1, 2, 8)
    assert len(checked) == 2  # only the unfinished shard's 2 lines; the 6 before it were checked when written
    assert len(CutSet.from_shar(in_dir=out).to_eager()) == 8
    with pytest.raises(InputError, match="shard_size differ"):
        write_shar(behaviors, out, shard_size=4)
    shutil.rmtree(out)  # start again, as the error advises: its bookkeeping beside it no longer refuses
    assert write_shar(behaviors, out, shard_size=4)["shards_written"] == 2


def test_a_copied_shar_directory_is_not_converted_into(behaviors, shar_dir, tmp_path):
    """Without its bookkeeping (a copy, or the `.<name>.to_shar` folder deleted) a conversion started over in place and
    left the old higher-numbered shards beside the new ones: 3 lines into a copy of 8 read back 11."""
    copy = tmp_path / "copy"
    shutil.copytree(shar_dir, copy)
    short = tmp_path / "short.jsonl"
    short.write_text("".join(open(behaviors).readlines()[:3]))
    with pytest.raises(InputError, match=r"copy holds files, and no record of a conversion into it"):
        write_shar(short, copy, shard_size=1)
    assert len(CutSet.from_shar(in_dir=str(copy))) == 8


def test_a_shar_directory_holding_its_manifest_is_refused(behaviors, tmp_path):
    """lhotse reads every file of a Shar directory as a field: the manifest inside made it unreadable."""
    manifest = tmp_path / "out" / "m.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(open(behaviors).read())
    with pytest.raises(InputError, match="holds the manifest m.jsonl"):
        write_shar(manifest, tmp_path / "out")


def test_a_rerun_of_a_finished_conversion_keeps_its_skip_count(behaviors, tmp_path):
    """The last, partial shard read the manifest to its end: a rerun read the invalid lines after it again and
    counted them twice (1, 2, 2, ...)."""
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(open(behaviors).readlines()[:5]) + "not json\n")
    runs = [write_shar(manifest, tmp_path / "shar", shard_size=3, skip_invalid=True) for _ in range(3)]
    assert [r["skipped_invalid"] for r in runs] == [1, 1, 1] and [r["lines"] for r in runs] == [5, 5, 5]


def test_audio_is_checked_when_converting_and_never_again_when_training(behaviors, shar_dir, tmp_path, monkeypatch):
    rows = [json.loads(line) for line in open(behaviors)]
    rows[4]["audio_filepath"] = str(tmp_path / "gone.wav")
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"broken.jsonl:5 field 'audio_filepath': audio file does not exist"):
        write_shar(broken, tmp_path / "out", shard_size=3)
    counts = write_shar(broken, tmp_path / "skipped", shard_size=3, skip_invalid=True)
    assert (counts["lines"], counts["skipped_invalid"]) == (7, 1)
    (tmp_path / "skipped" / "cuts.000002.jsonl.gz").unlink()  # resumed: the skip counted before is still reported
    again = write_shar(broken, tmp_path / "skipped", shard_size=3, skip_invalid=True)
    assert (again["lines"], again["skipped_invalid"], again["shards_written"]) == (7, 1, 1)
    assert "gone.wav" in again["skipped"]

    calls = []
    real = manifest_module.audio_duration
    monkeypatch.setattr(manifest_module, "audio_duration", lambda p: calls.append(p) or real(p))
    local = ManifestConversations(LineSource(manifest_filepath=str(behaviors)), lambda e, i: e, has_audio=True)
    assert len(list(local)) == 8 and len(calls) == 8  # the first pass checks each local file
    assert len(list(local)) == 8 and len(calls) == 8  # later passes trust that check
    archived = ManifestConversations(LineSource(shar_path=str(shar_dir)), lambda e, i: e, required_text_fields=("text",))
    assert len(list(archived)) == 8 and len(calls) == 8  # Shar was checked when it was written


def test_lines_skipped_on_the_checking_pass_stay_skipped_and_a_partial_pass_checks_again(behaviors, tmp_path):
    """Later passes trust the first full pass's audio check, and so skip what it skipped: they used to yield those
    lines (a missing file failed the next epoch; a wrong duration trained a cut of the audio under the whole
    transcript). A pass abandoned half-way (a validation limit) has not checked the rest, so the next one checks."""
    rows = [json.loads(line) for line in open(behaviors)]
    rows[2]["audio_filepath"] = str(tmp_path / "gone.wav")
    rows[4]["duration"] = 0.3  # the file is longer, and the line has no offset
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = ManifestConversations(LineSource(manifest_filepath=str(bad)),
                                  lambda e, i: (e.line, entry_cut(e, "x").duration), skip_invalid=True)
    first = list(lines)
    assert [line for line, _ in first] == [1, 2, 4, 6, 7, 8] and lines.summary.total == 2
    assert list(lines) == list(lines) == first and lines.summary.total == 2

    partial = ManifestConversations(LineSource(manifest_filepath=str(bad)), lambda e, i: e.line, skip_invalid=True)
    abandoned = iter(partial)
    assert [next(abandoned) for _ in range(3)] == [1, 2, 4]  # abandoned after one skip
    assert list(partial) == [1, 2, 4, 6, 7, 8] and list(partial) == [1, 2, 4, 6, 7, 8]
    assert partial.summary.total == 2  # its skips counted once, though the next pass checked the lines again


def test_tarred_nemo_manifest_reads_like_the_manifest(behaviors, tmp_path):
    """A NeMo tarred dataset (``audio_N.tar`` + ``manifest_N.json`` with ``shard_id``), as NeMo's script writes it."""
    rows = [json.loads(line) for line in open(behaviors)]
    for shard in range(2):
        with tarfile.open(tmp_path / f"audio_{shard}.tar", "w") as tar, open(tmp_path / f"manifest_{shard}.json", "w") as f:
            for row in rows[shard::2]:
                name = row["audio_filepath"].rsplit("/", 1)[-1]
                tar.add(row["audio_filepath"], arcname=name)
                f.write(json.dumps({**row, "audio_filepath": name, "shard_id": shard}) + "\n")
    source = LineSource(manifest_filepath=str(tmp_path / "manifest__OP_0..1_CL_.json"),
                        tarred_audio_filepaths=str(tmp_path / "audio__OP_0..1_CL_.tar"))
    entries = list(source.entries(required_text_fields=("text", "task", "prompt", "response")))
    by_text = {e["text"] + e["response"]: e for e in entries}
    assert len(entries) == 8
    for row in rows:
        entry = by_text[row["text"] + row["response"]]
        assert entry["words"] == row["words"] and entry["duration"] == pytest.approx(row["duration"])
        cut = entry_cut(entry, "x")
        assert cut.recording.id.startswith(str(tmp_path / "audio_"))  # qualified by its tar: unique across datasets
        assert torch.equal(torch.from_numpy(cut.load_audio()[0]), torch.from_numpy(soundfile.read(row["audio_filepath"], dtype="float32")[0]))


def test_tarred_lines_without_audio_are_an_error_or_counted_not_dropped(behaviors, tmp_path):
    """NeMo's tarred reader leaves out lines whose audio is missing from the tar or does not decode (a warning at
    most): 8 lines gave 6 with no error and nothing counted, even without ``skip_invalid``."""
    import io

    rows = [json.loads(line) for line in open(behaviors)]
    for shard in range(2):
        with tarfile.open(tmp_path / f"audio_{shard}.tar", "w") as tar, open(tmp_path / f"manifest_{shard}.json", "w") as f:
            for k, row in enumerate(rows[shard::2]):
                name = row["audio_filepath"].rsplit("/", 1)[-1]
                if (shard, k) == (0, 1):  # bytes that are not audio
                    info = tarfile.TarInfo(name)
                    info.size = 90
                    tar.addfile(info, io.BytesIO(b"not audio" * 10))
                elif (shard, k) != (0, 2):  # (0, 2): not in the tar at all
                    tar.add(row["audio_filepath"], arcname=name)
                f.write(json.dumps({**row, "audio_filepath": name, "shard_id": shard}) + "\n")
    source = LineSource(manifest_filepath=str(tmp_path / "manifest__OP_0..1_CL_.json"),
                        tarred_audio_filepaths=str(tmp_path / "audio__OP_0..1_CL_.tar"))
    with pytest.raises(InputError, match=r"2 of its 8 lines came back without audio"):
        list(source.entries())
    lines = ManifestConversations(source, lambda e, i: e, skip_invalid=True)
    assert len(list(lines)) == len(list(lines)) == 6
    assert lines.summary.total == 2 and "2 of its 8 lines" in str(lines.summary)


def test_tarred_segments_of_one_file_read_like_the_manifest(tmp_path):
    """Segments (``offset``) in a NeMo tarred dataset: the file is in the tar once, each line names a segment of it.
    Two segments of equal length shared one recording key (a batch trained both on one audio), and a segment within
    0.2 s of its file's length came back whole, offset ignored (NeMo's fast path)."""
    rng = np.random.default_rng(0)
    files = {name: tmp_path / f"{name}.wav" for name in ("a", "b")}
    soundfile.write(files["a"], rng.uniform(-0.5, 0.5, 48000).astype(np.float32), 16000, subtype="PCM_16")  # 3 s
    soundfile.write(files["b"], rng.uniform(-0.5, 0.5, 64000).astype(np.float32), 16000, subtype="PCM_16")  # 4 s
    rows = [{"audio_filepath": str(files["a"]), "offset": 0.1, "duration": 2.9, "text": "small offset"},
            {"audio_filepath": str(files["b"]), "offset": 0.0, "duration": 2.0, "text": "first half"},
            {"audio_filepath": str(files["b"]), "offset": 2.0, "duration": 2.0, "text": "second half"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with tarfile.open(tmp_path / "audio_0.tar", "w") as tar, open(tmp_path / "manifest_0.json", "w") as f:
        tar.add(files["a"], arcname="a.wav")
        tar.add(files["b"], arcname="b.wav")
        for row, name in zip(rows, ("a.wav", "b-sub1.wav", "b-sub2.wav")):
            f.write(json.dumps({**row, "audio_filepath": name, "shard_id": 0}) + "\n")
    tarred = LineSource(manifest_filepath=str(tmp_path / "manifest_0.json"),
                        tarred_audio_filepaths=str(tmp_path / "audio_0.tar")).entries(required_text_fields=("text",))
    local = {e["text"]: entry_cut(e, "x") for e in LineSource(manifest_filepath=str(manifest)).entries(("text",))}
    cuts = {e["text"]: entry_cut(e, "y") for e in tarred}
    assert len({utterance_key(c) for c in cuts.values()}) == 3
    for text, cut in cuts.items():
        assert cut.duration == pytest.approx(local[text].duration)
        assert np.array_equal(cut.load_audio(), local[text].load_audio()), text


def test_a_config_names_exactly_one_source_and_lines_without_one_audio_stay_jsonl():
    with pytest.raises(ConfigError, match="exactly one of"):
        LineSource.from_config(OmegaConf.create({"manifest_filepath": "a.jsonl", "shar_path": "s"}), "mtbi_behaviors")
    with pytest.raises(ConfigError, match="exactly one of"):
        LineSource.from_config(OmegaConf.create({}), "mtbi_behaviors")
    with pytest.raises(ConfigError, match="JSONL only"):
        LineSource.from_config(OmegaConf.create({"shar_path": "s"}), "joint_mixed_modal", has_audio=False)


def test_shuffled_shards_take_a_new_order_each_pass_as_one_lhotse_reader_does(shar_dir):
    """Each pass built a new reader, whose epoch counter started at 0: every pass read the shards in one order."""
    lines = ManifestConversations(LineSource(shar_path=str(shar_dir), shuffle_shards=True, shard_seed=0),
                                  lambda e, i: e.cut.recording.id)
    lhotse_reader = CutSet.from_shar(in_dir=str(shar_dir), shuffle_shards=True, seed=0)
    passes = [list(lines) for _ in range(4)]
    assert passes == [[cut.recording.id for cut in lhotse_reader] for _ in range(4)]
    assert len({tuple(p) for p in passes}) > 1


def test_an_archive_error_names_the_same_item_whatever_the_shard_order(behaviors, tmp_path):
    """Errors named the item's position in this pass's shard order (``bad:7`` with one seed, ``bad:1`` with another);
    they name its cut id, which for our Shar is the manifest's name and line."""
    rows = [json.loads(line) for line in open(behaviors)]
    rows[6]["response"] = ""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_shar(bad, tmp_path / "shar", shard_size=2)
    for seed in (0, 1, 2):
        source = LineSource(shar_path=str(tmp_path / "shar"), shuffle_shards=True, shard_seed=seed)
        with pytest.raises(ManifestError, match=r"shar:bad-7 field 'response': missing or empty text"):
            list(source.entries(("text", "response")))

    def refuse_line_7(entry, iteration):  # an error of the data type's own checks
        if entry.cut.id == "bad-7":
            raise ManifestError(entry.path, entry.line, "unknown task", "task")
        return entry

    for seed in (0, 1):
        lines = ManifestConversations(LineSource(shar_path=str(tmp_path / "shar"), shuffle_shards=True, shard_seed=seed),
                                      refuse_line_7)
        with pytest.raises(ManifestError, match=r"shar:bad-7 field 'task': unknown task"):
            list(lines)


def test_shard_seed_randomized_and_trng_are_one_order_for_every_rank():
    config = {"shar_path": "s", "shuffle_shards": True}
    assert LineSource.from_config(OmegaConf.create({**config, "shard_seed": "randomized"}), "mtbi_behaviors").shard_seed == 0
    assert LineSource.from_config(OmegaConf.create({**config, "shard_seed": 7}), "mtbi_behaviors").shard_seed == 7
    assert LineSource.from_config(OmegaConf.create({**config, "shard_seed": "trng"}), "mtbi_behaviors").shard_seed == 0
    with pytest.raises(ConfigError, match="shard_seed 'often' is not an integer"):
        LineSource.from_config(OmegaConf.create({**config, "shard_seed": "often"}), "mtbi_behaviors")
    unshuffled = {"shar_path": "s", "shard_seed": "trng"}  # NeMo's default for an input: unused without shuffling
    assert LineSource.from_config(OmegaConf.create(unshuffled), "mtbi_behaviors").shard_seed == 0


def test_to_shar_script_writes_and_reports_bad_input_in_one_line(behaviors, tmp_path):
    script = [sys.executable, str(REPO / "examples" / "to_shar.py")]
    done = subprocess.run([*script, "--manifest", str(behaviors), "--output", str(tmp_path / "ok"), "--shard-size", "5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout[done.stdout.index("{"):])["shards_written"] == 2
    bad = subprocess.run([*script, "--manifest", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "x")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error:") and "missing.jsonl" in bad.stderr
