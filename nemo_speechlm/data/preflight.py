"""Checks before training: read the data once before any model is built, then hold its clips
against the encoder once the model exists.

A bad manifest line, a missing audio file, a broken task catalog or an unset config value
would otherwise surface after the LLM and encoder are loaded (minutes on a real model), or
mid-training. :func:`check_training_data` goes through every train/validation conversation
the way the dataloader will (same parsers, one pass, no audio decoded) and returns the
shortest and longest clip; :func:`check_clip_lengths` then refuses clips shorter than one
encoder frame, and clips longer than the encoder's window unless
``model.encoder_chunk_size_seconds`` is set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lhotse.cut import Cut
from nemo.collections.common.data.lhotse.cutset import get_known_config_data_types, read_cutset_from_config
from nemo.collections.common.data.lhotse.sampling import DurationFilter
from nemo.collections.common.data.lhotse.text_adapters import AudioTurn
from omegaconf import DictConfig, ListConfig, OmegaConf

from nemo_speechlm.data.split_config import loader_configs
from nemo_speechlm.data.utterance import source_utterance
from nemo_speechlm.errors import AudioError, ConfigError
from nemo_speechlm.parts.prompting import CHAT_TEMPLATE_FORMAT, prompt_formatter_class

CHECKED_SPLITS = ("train_ds", "validation_ds")


@dataclass
class Clip:
    """A whole utterance the training data uses: its length and its audio file."""

    seconds: float
    source: str


@dataclass
class ClipRange:
    """The shortest and longest utterance of the training data (None: no audio at all)."""

    shortest: Clip | None = None
    longest: Clip | None = None

    def add(self, clip: Clip) -> None:
        if self.shortest is None or clip.seconds < self.shortest.seconds:
            self.shortest = clip
        if self.longest is None or clip.seconds > self.longest.seconds:
            self.longest = clip


def check_training_data(cfg: DictConfig) -> ClipRange:
    """Validate ``cfg.data`` (a training recipe's config) without a model: unset values, then every
    line of every train/validation input through its data type's parser. Raises the parsers' errors
    (:class:`~nemo_speechlm.data.manifest.ManifestError`, ...) or :class:`ConfigError`."""
    # (model values too: once NeMo copies cfg.model, a missing one was named without its `model.` prefix, and the
    # override the hint suggested did not exist)
    missing = missing_values(cfg.data, "data") + missing_values(cfg.model, "model")
    if missing:
        raise ConfigError(f"config: {', '.join(missing)} not set (???)",
                          f"give {'it' if len(missing) == 1 else 'each'} on the command line, e.g. {missing[0]}=<value>")
    # What the model would fill in (nemo_speechlm.data.datamodule.fill_model_settings); the token
    # rate only sizes buckets, which reading the data does not use.
    prompt_formatter_class(cfg.model.get("prompt_format"))  # an unknown name, before any model or run folder
    settings = {
        "audio_locator_tag": cfg.model.audio_locator_tag,
        "prompt_format": cfg.model.get("prompt_format") or CHAT_TEMPLATE_FORMAT,
        "token_equivalent_duration": 1.0,
    }
    clips = ClipRange()
    for split in CHECKED_SPLITS:
        if cfg.data.get(split) is None:
            continue
        for key, loader_cfg in loader_configs(cfg.data[split]).items():
            check_data_types(loader_cfg, ".".join(filter(None, ("data", split, key))))
            read_cfg = OmegaConf.create(OmegaConf.to_container(loader_cfg, resolve=True))
            for setting, value in settings.items():
                if read_cfg.get(setting) is None:
                    read_cfg[setting] = value
            read_cfg.force_finite = True  # one pass, not the endless training stream
            kept = DurationFilter(read_cfg.get("min_duration"), read_cfg.get("max_duration"))  # as the loader drops
            conversations, _ = read_cutset_from_config(read_cfg)
            examples = 0
            for conversation in conversations:
                if not kept(conversation):  # a clip the loader filters out was refused here
                    continue
                examples += 1
                for turn in getattr(conversation, "turns", []):
                    if isinstance(turn, AudioTurn):
                        clips.add(_whole_utterance(turn.cut))
            if not examples and split == "train_ds":  # an empty stream: Lightning cycled through empty epochs for ever
                name = ".".join(filter(None, ("data", split, key)))
                raise ConfigError(f"config: {name} has no examples (its inputs are empty, or every line was skipped "
                                  "or filtered out by min_duration/max_duration)", f"point {name}.input_cfg at data")
    return clips


def check_pre_alignment_data(cfg: DictConfig) -> None:
    """Every line of ``connector_pretraining.manifest_filepath``, before any model is built (it was read after the
    model loaded, minutes on a real one); the stage has no ``skip_invalid``, so a bad line must be fixed."""
    from nemo_speechlm.data.manifest import ManifestError, read_manifest

    pre_cfg = cfg.get("connector_pretraining") or {}
    path = pre_cfg.get("manifest_filepath")
    if not path or not pre_cfg.get("steps") or pre_cfg.get("init_from"):
        return
    try:
        lines = sum(1 for _ in read_manifest(path))
    except ManifestError as error:
        error.fix = "fix the line (connector pre-alignment reads every line of its manifest)"
        raise
    except FileNotFoundError as error:
        raise ConfigError(f"config: connector_pretraining.manifest_filepath: {error}",
                          "give an existing manifest, or null to pre-align on the training data") from error
    if not lines:
        raise ConfigError(f"config: connector_pretraining.manifest_filepath {path} has no lines",
                          "give a manifest with transcribed audio, or null to pre-align on the training data")


def check_clip_lengths(clips: ClipRange, model) -> None:
    """Refuse training clips the model's encoder cannot take (:class:`AudioError` naming the file)."""
    frame = model.encoder_frame_duration
    if clips.shortest is not None and clips.shortest.seconds < frame:
        raise AudioError(
            clips.shortest.source,
            f"{clips.shortest.seconds * 1000:.0f} ms of audio is shorter than one encoder frame ({frame * 1000:.0f} ms)",
            "remove its line from the training data",
        )
    window = model.encoder_window_seconds
    chunked = model.cfg.get("encoder_chunk_size_seconds") is not None
    if window is not None and not chunked and clips.longest is not None and clips.longest.seconds > window:
        raise AudioError(
            clips.longest.source,
            f"{clips.longest.seconds:.1f} s of audio is longer than the encoder's {window:g} s window",
            f"set model.encoder_chunk_size_seconds={window:g} to encode long clips in chunks, or cut the clip",
        )


def check_data_types(loader_cfg: DictConfig, name: str) -> None:
    """Every ``input_cfg`` entry (in groups too) names a registered data type (NeMo would assert)."""
    inputs = loader_cfg.get("input_cfg")
    if not isinstance(inputs, ListConfig):  # absent, or a YAML file NeMo reads itself
        return
    known = get_known_config_data_types()
    for i, item in enumerate(inputs):
        data_type = item.get("type") if isinstance(item, DictConfig) else None
        if data_type == "group":
            check_data_types(item, f"{name}.input_cfg.{i}")
        elif data_type not in known:
            raise ConfigError(f"config: {name}.input_cfg.{i}.type is {data_type!r}, not a known data type",
                              f"use one of {', '.join(sorted(known))}")
        shar = item.get("shar_path") if isinstance(item, DictConfig) else None
        if isinstance(shar, str) and not Path(shar).is_dir():  # lhotse asserted on a missing one, a traceback
            raise ConfigError(f"config: {name}.input_cfg.{i}.shar_path: no such directory: {shar}",
                              "give the directory examples/to_shar.py wrote")


def missing_values(node: DictConfig | ListConfig, prefix: str) -> list[str]:
    """Dotted names (Hydra override spelling) of the ``???`` values under ``node``; interpolations are not followed."""
    keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
    found = []
    for key in keys:
        name = f"{prefix}.{key}"
        if OmegaConf.is_missing(node, key):
            found.append(name)
        elif not OmegaConf.is_interpolation(node, key) and OmegaConf.is_config(node[key]):
            found.extend(missing_values(node[key], name))
    return found


def _whole_utterance(cut: Cut) -> Clip:
    source, _, _ = source_utterance(cut)  # an interleaved speech span stands for its whole utterance
    sources = source.recording.sources
    return Clip(source.duration, sources[0].source if sources else source.recording.id)
