"""Word alignment of a manifest with NeMo CTC forced alignment (random-weight models: the times
mean nothing, but they must be structurally valid, resumable and tied to the right words)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from omegaconf import OmegaConf

from nemo_speechlm.data.manifest import ManifestError, read_manifest
from nemo_speechlm.datagen.alignment import NoCTCHeadError, align_manifest, load_asr_model, load_segment
from nemo_speechlm.errors import InputError
from nemo_speechlm.parts.runner import REJECTED_SUFFIX
from tests.tiny_assets import SENTENCES, relative_bundle, tiny_conformer_config
from tests.conftest import REPO

SR = 16000
HALF_SECOND = SR // 2  # clip lengths are whole half seconds, so offsets in seconds are exact sample counts


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(assets, tmp_path_factory) -> Path:
    """The fixture's wavs tiled to 2-4.5 s (a char CTC model at 80 ms per frame needs a frame per
    character), one transcript with capitals and punctuation, and a last line that is a segment
    (``offset``) of a file holding clips 0 and 1 back to back."""
    out = tmp_path_factory.mktemp("align_corpus")
    rows, clips = [], []
    for i, row in enumerate(read_jsonl(assets["manifest"])):
        wav = np.tile(soundfile.read(row["audio_filepath"], dtype="float32")[0], 4)
        wav = wav[: len(wav) // HALF_SECOND * HALF_SECOND]
        path = out / f"clip{i}.wav"
        soundfile.write(path, wav, SR)
        clips.append(wav)
        rows.append({"audio_filepath": str(path), "duration": len(wav) / SR, "text": row["text"], "id": i})
    rows[0]["text"] = "The cat, sat on the MAT."
    soundfile.write(out / "both.wav", np.concatenate(clips[:2]), SR)
    rows.append({"audio_filepath": str(out / "both.wav"), "offset": len(clips[0]) / SR,
                 "duration": len(clips[1]) / SR, "text": rows[1]["text"], "id": "segment"})
    return write_jsonl(out / "manifest.jsonl", rows)


@pytest.fixture(scope="module")
def ctc_model(assets):
    return load_asr_model(assets["asr"])


def run_example(*argv: str) -> None:
    spec = importlib.util.spec_from_file_location("align_words", REPO / "examples" / "align_words.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(list(argv))


def check_words(row: dict) -> None:
    words = row["words"]
    assert [w["word"] for w in words] == row["text"].split()
    times = [t for w in words for t in (w["start"], w["end"])]
    assert times == sorted(times) and times[0] >= 0 and times[-1] <= row["duration"]
    assert all(round(t, 3) == t for t in times)


def test_cli_adds_words_to_every_line(assets, corpus, tmp_path, capsys):
    out = tmp_path / "aligned.jsonl"
    run_example("--manifest", str(corpus), "--output", str(out), "--model", str(assets["asr"]),
                "--batch-size", "4", "--device", "cpu")
    assert "9 written" in capsys.readouterr().out
    rows, inputs = read_jsonl(out), read_jsonl(corpus)
    assert [{k: v for k, v in r.items() if k != "words"} for r in rows] == inputs
    for row in rows:
        check_words(row)
    assert rows[0]["words"][-1]["word"] == "MAT."
    frame = 0.08  # 10 ms hop x 8x subsampling: starts fall on frame boundaries
    assert all(abs(w["start"] / frame - round(w["start"] / frame)) < 1e-6 for r in rows for w in r["words"])
    # the offset line hears exactly clip 1, so it gets clip 1's alignment
    np.testing.assert_array_equal(load_segment(inputs[-1], SR), load_segment(inputs[1], SR))
    assert rows[-1]["words"] == rows[1]["words"]

    # Resuming into that output with another aligner is refused: word times of two models would be mixed.
    import shutil

    other = tmp_path / "other_aligner.nemo"
    shutil.copy(assets["asr"], other)
    with pytest.raises(InputError, match="holds results made with other settings \\(aligner: "):
        run_example("--manifest", str(corpus), "--output", str(out), "--model", str(other), "--device", "cpu")


def test_rerun_resumes_without_duplicates(ctc_model, corpus, tmp_path):
    full = tmp_path / "full.jsonl"
    assert align_manifest(corpus, full, ctc_model, batch_size=4).run.written == 9
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(full.read_text().splitlines(keepends=True)[:5]))  # as if stopped after line 5

    summary = align_manifest(corpus, partial, ctc_model, batch_size=4)
    assert (summary.run.done_before, summary.run.written) == (5, 4)
    assert partial.read_bytes() == full.read_bytes()
    again = align_manifest(corpus, partial, ctc_model, batch_size=4)
    assert (again.run.done_before, again.run.written) == (9, 0)
    assert partial.read_bytes() == full.read_bytes()


def test_a_corrected_transcript_is_aligned_anew(ctc_model, corpus, tmp_path):
    """Keyed by audio, a line whose transcript was corrected kept its old record: the old text and its words."""
    rows = read_jsonl(corpus)
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    out = tmp_path / "aligned.jsonl"
    assert align_manifest(manifest, out, ctc_model, batch_size=4, model_name="tiny").run.written == 9
    rows[2]["text"] = " ".join(reversed(rows[2]["text"].split()))  # the same words, corrected order
    write_jsonl(manifest, rows)
    again = align_manifest(manifest, out, ctc_model, batch_size=4, model_name="tiny")
    assert (again.run.done_before, again.run.written) == (8, 1)
    aligned = {row["id"]: row for row in read_jsonl(out)}
    assert len(aligned) == 9 and aligned[2]["text"] == rows[2]["text"]
    check_words(aligned[2])


def test_a_relative_manifest_gives_an_output_that_moves_with_its_folder(ctc_model, corpus, tmp_path):
    """Relative audio paths stay relative (to the output's directory): the folder moved elsewhere is read and
    resumed as it was; absolute inputs stay absolute."""
    import shutil

    manifest = relative_bundle(corpus, tmp_path / "bundle")
    assert align_manifest(manifest, tmp_path / "bundle" / "aligned" / "out.jsonl", ctc_model, batch_size=4).run.written == 9
    rows = read_jsonl(tmp_path / "bundle" / "aligned" / "out.jsonl")
    assert [r["audio_filepath"] for r in rows] == [f"../audio/{Path(r['audio_filepath']).name}" for r in read_jsonl(corpus)]
    shutil.move(tmp_path / "bundle", tmp_path / "moved")
    out = tmp_path / "moved" / "aligned" / "out.jsonl"
    assert [e["words"] for e in read_manifest(out)] == [r["words"] for r in rows]  # audio found, durations match
    again = align_manifest(tmp_path / "moved" / "manifest.jsonl", out, ctc_model, batch_size=4)
    assert (again.run.done_before, again.run.written) == (9, 0)
    absolute = tmp_path / "absolute.jsonl"
    align_manifest(corpus, absolute, ctc_model, batch_size=4)
    assert [r["audio_filepath"] for r in read_jsonl(absolute)] == [r["audio_filepath"] for r in read_jsonl(corpus)]


@pytest.mark.parametrize(
    "bad, message, reason",
    [
        ("short", r"manifest\.jsonl:2 field 'text'.*CTC frames", "audio_too_short"),
        ("unknown_chars", r"manifest\.jsonl:2 field 'text'.*\['2024'\]", "out_of_vocabulary"),
    ],
)
def test_unalignable_line_fails_or_is_skipped(ctc_model, corpus, tmp_path, bad, message, reason):
    good = read_jsonl(corpus)[1]
    if bad == "short":  # 0.3 s give 3 frames, far fewer than the transcript's characters
        soundfile.write(tmp_path / "short.wav", np.zeros(int(0.3 * SR), dtype="float32"), SR)
        line = {"audio_filepath": str(tmp_path / "short.wav"), "duration": 0.3, "text": SENTENCES[0]}
    else:  # digits are not in the character vocabulary
        line = {**read_jsonl(corpus)[2], "text": "it is 2024 again"}
    manifest = write_jsonl(tmp_path / "manifest.jsonl", [good, line])

    with pytest.raises(ManifestError, match=message):
        align_manifest(manifest, tmp_path / "strict.jsonl", ctc_model, batch_size=1)
    assert len(read_jsonl(tmp_path / "strict.jsonl")) == 1  # the good line before it is kept

    out = tmp_path / "lenient.jsonl"
    summary = align_manifest(manifest, out, ctc_model, batch_size=2, skip_invalid=True)
    assert (summary.run.written, summary.run.rejected) == (1, {reason: 1})
    assert [r["text"] for r in read_jsonl(out)] == [good["text"]]
    assert read_jsonl(Path(str(out) + REJECTED_SUFFIX))[0]["reason"] == reason
    rerun = align_manifest(manifest, out, ctc_model, batch_size=2, skip_invalid=True)
    assert rerun.run.processed == 0 and rerun.run.rejected_before == {reason: 1}


# ---------------------------------------------------------------- BPE, hybrid and non-CTC models


@pytest.fixture(scope="module")
def bpe_model_config(tmp_path_factory) -> dict:
    """A lower-case SentencePiece tokenizer and a tiny transducer config built around it."""
    from nemo.collections.common.tokenizers.sentencepiece_tokenizer import create_spt_model

    root = tmp_path_factory.mktemp("bpe")
    (root / "text.txt").write_text("\n".join(SENTENCES * 5) + "\n")
    create_spt_model(
        str(root / "text.txt"), vocab_size=40, sample_size=-1, do_lower_case=True, output_dir=str(root / "tok")
    )
    parts = tiny_conformer_config()
    d_model = parts["encoder"]["d_model"]
    ctc_decoder = {
        "_target_": "nemo.collections.asr.modules.ConvASRDecoder", "feat_in": d_model, "num_classes": -1, "vocabulary": [],
    }
    return {
        **parts,
        "tokenizer": {"dir": str(root / "tok"), "type": "bpe"},
        "model_defaults": {"enc_hidden": d_model, "pred_hidden": 16},
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder", "prednet": {"pred_hidden": 16, "pred_rnn_layers": 1},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint", "jointnet": {"joint_hidden": 16, "activation": "relu"},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 5}},
        "aux_ctc": {"decoder": ctc_decoder, "decoding": {"strategy": "greedy_batch"}},
        "optim": None,
    }


def build(cls_name: str, cfg: dict):
    from nemo.collections.asr import models

    torch.manual_seed(0)
    return getattr(models, cls_name)(cfg=OmegaConf.create(cfg))


@pytest.mark.parametrize("kind", ["ctc_bpe", "hybrid_bpe"])
def test_bpe_and_hybrid_models_align(bpe_model_config, corpus, tmp_path, kind):
    if kind == "ctc_bpe":
        cfg = {k: bpe_model_config[k] for k in ("preprocessor", "encoder", "tokenizer", "optim")}
        model = build("EncDecCTCModelBPE", {**cfg, "decoder": bpe_model_config["aux_ctc"]["decoder"]})
    else:
        model = build("EncDecHybridRNNTCTCBPEModel", bpe_model_config)
    out = tmp_path / "aligned.jsonl"
    # the tokenizer is lower case: "The", "MAT." are aligned as "the", "mat"
    assert align_manifest(corpus, out, model, batch_size=4).run.written == 9
    for row in read_jsonl(out):
        check_words(row)


def test_model_without_ctc_head_is_refused(bpe_model_config, corpus, tmp_path):
    rnnt = build("EncDecRNNTBPEModel", {k: v for k, v in bpe_model_config.items() if k != "aux_ctc"})
    with pytest.raises(NoCTCHeadError, match="EncDecRNNTBPEModel has no CTC head"):
        align_manifest(corpus, tmp_path / "out.jsonl", rnnt)
    assert not (tmp_path / "out.jsonl").exists()
