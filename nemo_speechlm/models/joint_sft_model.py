"""``JointSFTModel``: joint speech-text SFT (VoiceTextBlender; Peng et al., NAACL 2025).

One stage over text-only SFT, ASR/AST, speech QA and mixed-modal conversations
(``nemo_speechlm.data.joint_sft``), LoRA on the LLM, encoder and adapter trained. The
objective is the core's CE on every assistant turn; what this class adds is what tells
you whether speech is learned without forgetting text: the loss of audio batches and of
text batches logged apart, and how many batches/examples each data source has supplied.

Logged: ``train_audio_loss`` at every optimizer step with a batch that has audio and ``train_text_loss``
at every one with a batch that has none (under gradient accumulation: the mean over that step's batches of the
kind, once per step); ``train_batches_audio``/``train_batches_text`` (batches, not optimizer steps) and
``train_examples_<source>`` (conversations per ``source`` tag), cumulative, every logging
step (kept in Lightning checkpoints, so a resumed run keeps counting).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from omegaconf import DictConfig

from nemo_speechlm.data.joint_sft import SOURCE_FIELD
from nemo_speechlm.models.speechlm_model import SpeechLMModel

UNKNOWN_SOURCE = "unknown"
_COUNTS_KEY = "joint_sft_counts"


def batch_kind(batch: dict) -> str:
    """``"audio"`` when the batch carries any audio (waveforms or cached features), else ``"text"``."""
    has_audio = batch.get("audios") is not None or batch.get("encoder_features") is not None
    return "audio" if has_audio else "text"


def batch_sources(batch: dict) -> list[str]:
    """The data source of each conversation in the batch (its ``source`` tag)."""
    return [(c.custom or {}).get(SOURCE_FIELD, UNKNOWN_SOURCE) for c in batch.get("conversations") or []]


class JointSFTModel(SpeechLMModel):
    """Speech LLM trained on a blend of speech and text conversations (``nemo_speechlm/conf/joint_sft.yaml``)."""

    def __init__(self, cfg: DictConfig, trainer=None) -> None:
        super().__init__(cfg=cfg, trainer=trainer)
        self.counts: Counter = Counter()  # cumulative batches per kind and examples per source
        self._step_losses: dict[str, list[torch.Tensor]] = {}  # this optimizer step's batch losses per kind

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        kind = batch_kind(batch)
        self.counts[f"batches_{kind}"] += 1
        self.counts.update(f"examples_{s}" for s in batch_sources(batch))
        for name, value in sorted(self.counts.items()):
            self.log(f"train_{name}", float(value), on_step=True, batch_size=1)
        self._step_losses.setdefault(kind, []).append(loss.detach())
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Log this step's per-kind losses, once per optimizer step (its last batch has run).

        Lightning repeats a metric's last value at later steps that do not log it, which would smear the text
        loss over audio steps: the per-kind loss goes straight to the loggers, at exactly the steps of its kind.
        Written per batch, a step of several accumulated batches wrote its step number once per batch."""
        super().on_before_optimizer_step(optimizer)
        losses, self._step_losses = self._step_losses, {}
        metrics = {f"train_{kind}_loss": float(torch.stack(values).float().mean()) for kind, values in losses.items()}
        for logger in self.loggers if self._trainer is not None else ():
            logger.log_metrics(metrics, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[_COUNTS_KEY] = dict(self.counts)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.counts = Counter(checkpoint.get(_COUNTS_KEY, {}))
