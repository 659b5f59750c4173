"""The real instruction-tuned SmolLM2-135M-Instruct (GGUF from PyPI) as ``pretrained_llm``."""
import pytest
import torch

from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.offline_models import smollm2_gguf_path
from tests.conftest import model_config

pytestmark = pytest.mark.slow  # real models from PyPI


def test_smollm2_gguf_loads_and_answers_a_text_prompt(tmp_path, monkeypatch):
    monkeypatch.setenv("NEMO_SPEECHLM_CACHE", str(tmp_path / "cache"))
    model = SpeechLMModel(model_config(smollm2_gguf_path()))
    assert model.llm.config.hidden_size == 576
    assert model.perception.proj is not None
    answer = model.respond([None], ["What is the capital of France? Answer in one word."], max_new_tokens=8)[0]
    assert "paris" in answer.lower(), answer
    # the converted directory is cached, and a second load reuses it
    cached = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    with torch.no_grad():
        ids = model.encode_prompt("hello")
        assert model.tokenizer.tokenizer.decode(ids).startswith("<|im_start|>")
