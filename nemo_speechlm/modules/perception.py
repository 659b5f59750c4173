"""Speech perception: preprocessor -> encoder -> modality adapter -> projection.

We reuse speechlm2's ``AudioPerceptionModule`` and its ``setup_speech_encoder`` (which
copies a pretrained NeMo ASR model's preprocessor + encoder config and weights).
This module only decides which of the two paths to take and sizes the output to the LLM.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from nemo.collections.speechlm2.modules import AudioPerceptionModule
from nemo.collections.speechlm2.parts.pretrained import setup_speech_encoder

from nemo_speechlm.errors import ConfigError, InputError


class _PerceptionHost:
    """The minimal object ``setup_speech_encoder`` expects: ``cfg``, ``llm``, and a ``perception`` slot."""

    def __init__(self, cfg: DictConfig, llm) -> None:
        self.cfg, self.llm, self.perception = cfg, llm, None


def fill_pretrained_encoder_config(cfg: DictConfig, new_model: bool = True) -> None:
    """Put the pretrained ASR model's preprocessor + encoder config into ``cfg.perception`` when the config
    names ``pretrained_asr`` (``encoder=canary_1b_flash``, ``parakeet_tdt_0_6b_v2``, ``asr_nemo``).

    It must be there before ``ModelPT`` resolves the config: the adapter's width is
    ``${..encoder.d_model}``, and without an encoder section every such model failed to build
    (``Interpolation key 'encoder.d_model' not found``). For a new model it replaces an encoder section another
    group left there (``pretrained_asr`` set over the default encoder): the adapter was sized to that one, and
    the pretrained encoder :func:`build_perception` loads then did not fit it (an error at the first forward).
    A restored model keeps the section it was saved with. Reads the config only; the weights are
    loaded later by :func:`build_perception` (a hub model is downloaded once and then cached)."""
    if OmegaConf.is_missing(cfg, "pretrained_asr"):
        raise ConfigError("model.pretrained_asr has no value (encoder=asr_nemo takes a NeMo ASR .nemo)",
                          "set model.pretrained_asr=/path/to/model.nemo on the command line")
    if not cfg.get("pretrained_asr") or ("encoder" in cfg.get("perception", {}) and not new_model):
        return
    from nemo.collections.asr.models import ASRModel

    source = str(cfg.pretrained_asr)
    if source.endswith(".nemo") and not Path(source).exists():
        raise ConfigError(f"model.pretrained_asr={source!r}: no such file", "give the path of a NeMo ASR .nemo")
    if Path(source).exists() and source.endswith(".nemo"):  # as speechlm2's load_pretrained_nemo decides
        asr_cfg = ASRModel.restore_from(source, return_config=True, map_location="cpu")
    else:
        asr_cfg = _hub_asr_config(source)
    with open_dict(cfg):
        cfg.perception.preprocessor = asr_cfg.preprocessor
        cfg.perception.encoder = asr_cfg.encoder


def _hub_asr_config(name: str) -> DictConfig:
    """A NeMo ASR model's config by name; a mistyped name or no network is a :class:`ConfigError`, not a traceback."""
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError
    from nemo.collections.asr.models import ASRModel

    try:
        return ASRModel.from_pretrained(name, return_config=True)
    except (HFValidationError, RepositoryNotFoundError, LocalEntryNotFoundError, FileNotFoundError) as exc:
        raise ConfigError(f"model.pretrained_asr={name!r}: not a local .nemo, and no such model could be fetched "
                          f"({type(exc).__name__})", "check the name and the network, or give a local .nemo") from exc


def embedding_rms(llm) -> float:
    """Root mean square of the LLM's input embedding vectors: the scale its inputs live at."""
    weight = llm.get_input_embeddings().weight.detach().float()
    return round(float(weight.pow(2).mean(-1).sqrt().mean()), 4)


def build_perception(cfg: DictConfig, llm, load_pretrained_asr: bool, restoring: bool = False) -> AudioPerceptionModule:
    """See :func:`_build_perception`; a config error of one of its modules comes out as itself, not wrapped in
    Hydra's InstantiationException (a traceback at the command line)."""
    from hydra.errors import InstantiationException

    try:
        return _build_perception(cfg, llm, load_pretrained_asr, restoring)
    except InstantiationException as exc:
        if isinstance(exc.__cause__, InputError):
            raise exc.__cause__ from None
        raise


def _build_perception(cfg: DictConfig, llm, load_pretrained_asr: bool, restoring: bool = False) -> AudioPerceptionModule:
    """Build the perception module for ``cfg`` (the model config), sized to ``llm``'s width.

    With ``cfg.pretrained_asr`` set and ``load_pretrained_asr`` true, the encoder and
    preprocessor come from that ASR model (config *and* weights, written back into
    ``cfg.perception`` so a restored model rebuilds the same architecture); ``restoring`` (a
    trainable-only ``.nemo``) takes only its weights, into the architecture the file was trained with
    (the reference's own config, had it changed since, used to win silently). Otherwise the
    encoder is built from ``cfg.perception.encoder`` alone (random init, or weights filled
    later by ``restore_from``).
    """
    hidden = llm.config.hidden_size
    with open_dict(cfg):
        cfg.perception.output_dim = hidden
        if "output_dim" in cfg.perception.modality_adapter:
            cfg.perception.modality_adapter.output_dim = hidden
        if cfg.perception.modality_adapter.get("output_rms") == "auto":
            # Written into the config as a number, so a restored model rebuilds the same norm.
            cfg.perception.modality_adapter.output_rms = embedding_rms(llm)
    if cfg.get("pretrained_asr") and load_pretrained_asr and restoring:
        from nemo.collections.asr.models import ASRModel
        from nemo.collections.speechlm2.parts.pretrained import load_pretrained_nemo

        perception = AudioPerceptionModule(cfg.perception).train()
        # As setup_speech_encoder loads them; the fingerprint check then confirms they are the weights trained on.
        perception.load_state_dict(load_pretrained_nemo(ASRModel, cfg.pretrained_asr).state_dict(), strict=False)
        return perception
    if cfg.get("pretrained_asr") and load_pretrained_asr:
        # setup_speech_encoder would apply any encoder keys left in our config on top of the
        # pretrained model's own; the pretrained architecture must win, so drop ours.
        with open_dict(cfg):
            cfg.perception.pop("encoder", None)
        host = _PerceptionHost(cfg, llm)
        setup_speech_encoder(host, pretrained_weights=True)
        return host.perception
    with open_dict(cfg):
        if "load_pretrained_weights" in cfg.perception.encoder:
            # Encoders with their own checkpoint (Whisper) load it only for a new model.
            cfg.perception.encoder.load_pretrained_weights = load_pretrained_asr
    perception = AudioPerceptionModule(cfg.perception).train()
    if hasattr(perception.encoder, "architecture_config"):
        with open_dict(cfg):
            # Keep the encoder's architecture in the model config so a .nemo restores without the hub.
            cfg.perception.encoder.architecture = perception.encoder.architecture_config()
    return perception
