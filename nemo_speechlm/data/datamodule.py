"""Dataloaders: NeMo's lhotse machinery (speechlm2 ``DataModule`` + ``SALMDataset``) fed with our settings.

The model decides five data settings, so users never have to keep them in sync by hand:
the audio locator tag, the prompt format, the sample rate the audio is resampled to (the
encoder's), ``token_equivalent_duration`` (how many
seconds of audio one connector output stands for) and ``speech_positions`` (how token-based
bucketing counts a speech turn: as those outputs, or with the CTC read-out as its transcript's
tokens + 2, which is what the LLM then sees; ``nemo_speechlm.data.conversations``).
"""
from __future__ import annotations

from nemo.utils import logging
from omegaconf import DictConfig, open_dict

from nemo_speechlm.data.dataset import SpeechLMDataset
from nemo_speechlm.data.feature_cache import FeatureCache
from nemo_speechlm.data.joint_sft import TEXT_SFT
from nemo_speechlm.data.resumable import ResumableDataModule
from nemo_speechlm.data.split_config import input_entries, loader_configs
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.parts.prompting import CHAT_TEMPLATE_FORMAT

SPLITS = ("train_ds", "validation_ds", "test_ds")


# Given in a data config, these must be the model's: inference and the KL teacher use the model's, so a data-level
# prompt format trained the speech model under one template and ran it under another, silently; the loader resamples
# to its sample_rate (NeMo's default 16 kHz, whatever the encoder's: inference and the feature cache use the encoder's).
_MUST_MATCH_MODEL = ("audio_locator_tag", "prompt_format", "sample_rate")


def fill_model_settings(data_cfg: DictConfig, model) -> DictConfig:
    """Set locator tag, prompt format, sample rate, token_equivalent_duration and speech_positions on each split
    unless given (a given locator tag, prompt format or sample rate other than the model's is a :class:`ConfigError`)."""
    settings = {
        "audio_locator_tag": model.audio_locator_tag,
        "prompt_format": model.cfg.get("prompt_format") or CHAT_TEMPLATE_FORMAT,
        "sample_rate": model.sampling_rate,
        "token_equivalent_duration": model.token_equivalent_duration,
    }
    # Not a NeMo loader key (NeMo drops unknown split-level keys): set on each input_cfg entry, which our data types read.
    speech_positions = "transcript" if getattr(model, "ctc_readout", None) is not None else "frames"
    with open_dict(data_cfg):
        for split in SPLITS:
            if split in data_cfg and data_cfg[split] is None:
                del data_cfg[split]  # speechlm2's DataModule expects absent, not null, splits
            if data_cfg.get(split) is None:
                continue
            for loader_cfg in loader_configs(data_cfg[split]).values():
                for key, value in settings.items():
                    if loader_cfg.get(key) is None:
                        loader_cfg[key] = value
                    elif key in _MUST_MATCH_MODEL and loader_cfg[key] != value:
                        raise ConfigError(f"data.{split}.{key} is {loader_cfg[key]!r} but the model's is {value!r}: "
                                          "training, inference and the KL teacher must use the same",
                                          f"drop data.{split}.{key} (the model's is used) or set model.{key}")
                for entry in input_entries(loader_cfg.get("input_cfg")):
                    if entry.get("speech_positions") is None:
                        entry["speech_positions"] = speech_positions
    return data_cfg


def record_system_prompt(cfg: DictConfig) -> str | None:
    """Set ``cfg.model.system_prompt`` (a training recipe's config) to the system prompt the speech conversations
    train under, the ``system_prompt`` of the ``cfg.data.train_ds`` inputs other than text SFT, so that the model
    carries it into its ``.nemo``; returns it.

    ``SpeechLMModel.respond`` (inference, the evaluations, the benchmark) uses it when given none: a model trained
    under a system prompt and asked without it answered in a prompt layout it had never seen, and nothing said so
    (the commands' ``--system-prompt`` had to be repeated by hand). Inputs with different prompts leave
    ``model.system_prompt`` as given (null by default), with a warning; a prompt a line gives itself (``system``) is
    not seen here. A ``model.system_prompt`` given stays when the data has none and must equal the data's otherwise
    (:class:`ConfigError`, before any model is built)."""
    prompts = set()
    for loader_cfg in loader_configs(cfg.data.train_ds).values():
        for entry in input_entries(loader_cfg.get("input_cfg")):
            if entry.get("type") != TEXT_SFT:  # text-only steps: not what the model answers speech under
                prompts.add(entry.get("system_prompt") or None)
    given = cfg.model.get("system_prompt") or None
    if len(prompts) > 1:
        logging.warning(f"The speech inputs of data.train_ds train under {len(prompts)} system prompts "
                        f"({sorted(prompts, key=str)}): the .nemo records {given!r}; pass --system-prompt at inference")
        return given
    (data_prompt,) = prompts or {None}
    if data_prompt is None:
        return given
    if given is not None and given != data_prompt:
        raise ConfigError(f"model.system_prompt is {given!r} but the speech data trains under {data_prompt!r}",
                          "drop model.system_prompt (the data's is recorded) or give the data the same")
    with open_dict(cfg.model):
        cfg.model.system_prompt = data_prompt
    return data_prompt


def build_datamodule(data_cfg: DictConfig, model, feature_cache: FeatureCache | None = None) -> ResumableDataModule:
    """A Lightning datamodule for ``trainer.fit(model, datamodule)``; batches read ``feature_cache`` when given,
    and carry the text-teacher inputs when the model asks for them (``model.needs_text_teacher``)."""
    fill_model_settings(data_cfg, model)
    teacher = model.prompt_formatter if getattr(model, "needs_text_teacher", False) else None
    dataset = SpeechLMDataset(model.tokenizer, feature_cache, text_teacher_formatter=teacher)
    return ResumableDataModule(data_cfg, tokenizer=model.tokenizer, dataset=dataset)  # resumes mid-stream
