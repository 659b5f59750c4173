"""``MTBIModel``: multi-task behavior imitation (Xie et al., 2025; BLSP-KD / Ultravox for the KL term).

The speech LLM learns to answer speech the way its own LLM answers the transcript:
cross-entropy on the teacher's recorded response (``examples/generate_behaviors.py``),
plus, optionally, a token-level KL to the distribution of the same frozen LLM reading
the transcript in place of the speech, computed online. The teacher is always the original
text LLM (:func:`~nemo_speechlm.models.base_llm.base_llm`): with LoRA the adapters are switched
off; an LLM fine-tuned without LoRA is reloaded frozen from ``pretrained_llm`` (once, kept beside it),
since its own drifting weights would make the KL pull the student towards itself.

Config keys (``nemo_speechlm/conf/mtbi.yaml``): ``mtbi.ce_weight``, ``mtbi.kl_weight`` (0 = CE only),
``mtbi.kl_temperature``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_speechlm.models.base_llm import base_llm
from nemo_speechlm.models.speechlm_model import IGNORE_INDEX, SpeechLMModel, cross_entropy


class MTBIModel(SpeechLMModel):
    """Speech LLM trained on behaviors; logs ``train_ce`` and ``train_kl`` separately."""

    @property
    def _mtbi(self) -> dict:
        return {"ce_weight": 1.0, "kl_weight": 0.0, "kl_temperature": 2.0, **(self.cfg.get("mtbi") or {})}

    @property
    def needs_text_teacher(self) -> bool:
        """The data module adds the transcript-as-text inputs only when the KL term is on."""
        return self._mtbi["kl_weight"] > 0

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        opts = self._mtbi
        inputs = self.prepare_inputs(batch)
        logits, targets = self.response_logits(inputs["input_embeds"], inputs["attention_mask"], inputs["target_ids"])
        ce = cross_entropy(logits, targets)
        losses = {"ce": ce, "num_target_tokens": (inputs["target_ids"] != IGNORE_INDEX).sum()}
        loss = opts["ce_weight"] * ce
        if opts["kl_weight"] > 0:
            if "teacher_input_ids" not in batch:
                raise ValueError("mtbi.kl_weight > 0 needs teacher_input_ids in the batch (build the data with build_datamodule).")
            teacher_logits, teacher_targets = self.text_teacher_logits(batch["teacher_input_ids"], batch["teacher_loss_mask"])
            kl = token_kl(logits, targets, teacher_logits, teacher_targets, opts["kl_temperature"])
            losses["kl"] = kl
            loss = loss + opts["kl_weight"] * kl
        losses["loss"] = loss
        return losses

    @torch.no_grad()
    def text_teacher_logits(self, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits of the original text LLM (LoRA off, or reloaded if the LLM itself trains) on the transcript
        version, and its shifted targets."""
        attention_mask = input_ids != self.text_pad_id
        with base_llm(self):
            embeds = self.embed_text(input_ids)  # inside: a trained LLM's embedding table has moved too
            return self.response_logits(embeds[:, :-1], attention_mask[:, :-1], input_ids.where(loss_mask, IGNORE_INDEX)[:, 1:])

def token_kl(
    student_logits: torch.Tensor,
    student_targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_targets: torch.Tensor,
    temperature: float = 2.0,
) -> torch.Tensor:
    """Mean over response tokens of ``KL(teacher || student)`` at ``temperature``, times ``T^2``.

    Student and teacher sequences differ before the response (speech vs. text), so the
    response positions are matched by order; their target tokens must be identical.
    """
    student_pos = student_targets != IGNORE_INDEX
    teacher_pos = teacher_targets != IGNORE_INDEX
    if not torch.equal(student_targets[student_pos], teacher_targets[teacher_pos]):
        raise ValueError("Student and teacher responses differ: the KL term needs the same response tokens in both.")
    if not student_pos.any():
        return student_logits.sum() * 0.0
    student = F.log_softmax(student_logits[student_pos].float() / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits[teacher_pos].float() / temperature, dim=-1)
    kl = F.kl_div(student, teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2
