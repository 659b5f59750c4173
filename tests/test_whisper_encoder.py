"""Whisper as a swappable encoder: exact front end, HF-equal padded encoding, batch-independent
variable-length encoding, and a .nemo that restores with the original checkpoint gone."""
import shutil

import numpy as np
import pytest
import torch
from transformers import WhisperFeatureExtractor, WhisperModel

from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.modules.whisper import WhisperEncoder, WhisperLogMel
from tests.tiny_assets import make_tiny_whisper, tiny_whisper_perception
from tests.conftest import model_config, run_python


@pytest.fixture(scope="module")
def whisper_dir(tmp_path_factory):
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "tiny")


def _waves():
    rng = np.random.default_rng(0)
    waves = [(0.3 * np.sin(np.arange(n) * 0.05) + rng.normal(0, 0.01, n)).astype(np.float32) for n in (48000, 32037)]
    batch = torch.zeros(2, 48000)
    for i, w in enumerate(waves):
        batch[i, : len(w)] = torch.from_numpy(w)
    return waves, batch, torch.tensor([len(w) for w in waves])


@pytest.mark.parametrize("pad_to_window", [True, False])
def test_log_mel_equals_whisper_feature_extractor(pad_to_window):
    waves, batch, lens = _waves()
    reference = WhisperFeatureExtractor(feature_size=80)(waves, sampling_rate=16000, return_tensors="pt").input_features
    mel, mel_lens = WhisperLogMel(pad_to_window=pad_to_window)(batch, lens)
    assert mel_lens.tolist() == [300, 200]
    assert mel.shape[-1] == (3000 if pad_to_window else 300)
    for i, n in enumerate(mel_lens.tolist()):
        torch.testing.assert_close(mel[i, :, :n], reference[i, :, :n], atol=1e-5, rtol=0)


def test_padded_window_encoding_equals_hf_whisper(whisper_dir):
    waves, batch, lens = _waves()
    mel, mel_lens = WhisperLogMel(pad_to_window=True)(batch, lens)
    ours, out_lens = WhisperEncoder(str(whisper_dir), d_model=32, pad_to_window=True).eval()(mel, mel_lens)
    with torch.no_grad():
        reference = WhisperModel.from_pretrained(whisper_dir).encoder(mel).last_hidden_state
    assert out_lens.tolist() == [150, 100]  # 50 frames/s
    torch.testing.assert_close(ours.transpose(1, 2), reference, atol=1e-5, rtol=1e-5)


def test_variable_length_encoding_does_not_depend_on_the_batch(whisper_dir):
    _, batch, lens = _waves()
    pre = WhisperLogMel(pad_to_window=False)
    encoder = WhisperEncoder(str(whisper_dir), pad_to_window=False).eval()
    with torch.no_grad():
        together, together_lens = encoder(*pre(batch, lens))
        alone, alone_lens = encoder(*pre(batch[1:, : lens[1]], lens[1:]))
    n = int(alone_lens[0])
    assert together_lens[1] == n
    torch.testing.assert_close(together[1, :, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_wrong_width_is_a_clear_error(whisper_dir):
    with pytest.raises(ValueError, match="d_model=768 .* has d_model=32"):
        WhisperEncoder(str(whisper_dir), d_model=768)


def test_whisper_speechlm_restores_without_the_checkpoint(assets, whisper_dir, tmp_path):
    local = shutil.copytree(whisper_dir, tmp_path / "whisper")
    cfg = model_config(assets["llm"])
    cfg.perception.update(tiny_whisper_perception(local))
    cfg.perception.modality_adapter.stack = 4
    model = SpeechLMModel(cfg).eval()
    assert model.token_equivalent_duration == pytest.approx(0.08)  # 10 ms hop x 2 (conv) x 4 (stack)
    wav = str(next((assets["root"] / "data" / "wav").glob("*.wav")))
    before = model.respond([wav], ["Repeat: <|audio|>"], max_new_tokens=4)[0]
    nemo = tmp_path / "whisper.nemo"
    model.save_to(str(nemo))
    shutil.rmtree(local)  # the restore must not need the original checkpoint
    out = run_python(
        "import nemo_speechlm\n"
        "from nemo_speechlm.models import SpeechLMModel\n"
        f"m = SpeechLMModel.restore_from({str(nemo)!r})\n"
        f"print('ANSWER', repr(m.respond([{wav!r}], ['Repeat: <|audio|>'], max_new_tokens=4)[0]))\n"
    )
    assert f"ANSWER {before!r}" in out


def test_encoder_lora_is_the_only_trainable_encoder_part(assets, whisper_dir):
    cfg = model_config(assets["llm"])
    cfg.perception.update(tiny_whisper_perception(whisper_dir))
    cfg.perception.encoder.lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg.freeze_params = [r"^llm\..+$", r"^perception\.encoder\..+$"]
    model = SpeechLMModel(cfg)
    trainable = [n for n, p in model.perception.encoder.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)


def test_trainable_only_file_reloads_whisper_and_keeps_its_lora(assets, whisper_dir, tmp_path):
    """Whisper's weights come back from its own checkpoint (``pretrained_model``); its LoRA is in the file."""
    cfg = model_config(assets["llm"])
    cfg.perception.update(tiny_whisper_perception(whisper_dir))
    cfg.perception.encoder.lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    cfg.freeze_params = [r"^llm\..+$", r"^perception\.encoder\..+$"]
    torch.manual_seed(0)
    model = SpeechLMModel(cfg)
    with torch.no_grad():  # LoRA B starts at zero: make the adapters matter
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_()
    model.save_trainable_to(str(tmp_path / "small.nemo"))
    model.save_to(str(tmp_path / "full.nemo"))
    assert (tmp_path / "small.nemo").stat().st_size < (tmp_path / "full.nemo").stat().st_size
    restored = SpeechLMModel.restore_from(str(tmp_path / "small.nemo"))
    assert set(restored.cfg.reference_fingerprints) == {"llm", "encoder"}
    before, after = model.state_dict(), restored.state_dict()
    assert before.keys() == after.keys()
    assert [name for name in before if not torch.equal(before[name], after[name])] == []
