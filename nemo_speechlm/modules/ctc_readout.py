"""CTC read-out: hand the frozen LLM its own token embeddings, read off the connector's CTC posteriors.

After connector pre-alignment (``nemo_speechlm.parts.connector_ctc``) every connector position
scores the transcript vocabulary (LLM token ids, plus a learned blank) by dot product with the
LLM's input embeddings. Read-out turns that into what the LLM was trained on: positions whose most
likely class is blank are dropped, runs of positions with the same most likely token are merged
(CTC's collapse), and each remaining segment becomes the posterior-weighted average of the token
embeddings (LegoSLM, arXiv 2505.11352). A speech span of 40 positions becomes ~12 text-like
vectors, so a frozen LLM reads the words from the first step instead of learning a new input
language through its answers.

A gated residual adds the connector's own output on each segment (gate initialised to 0): the
posteriors carry *which* words, the residual lets training through the LLM carry what the
embeddings cannot (that the words were spoken, how they sound). The posteriors stay differentiable,
so training through the LLM can move the recognition too; measured, it erodes it (docs/connector.md),
so ``connector_pretraining.freeze_connector`` (mtbi.yaml) trains only the gate and the boundaries.

Read as plain text, a spoken request is a request: SmolLM2 asked to "Repeat exactly what is said:
Set an alarm ..." sets the alarm (94% WER on the demo's held-out sentences); with the words in
quotes it repeats far more often (77%, and 19% for another phrasing). So the segments are bracketed
by two learned vectors initialised to the LLM's quotation marks, which training then tunes into
"these are the words that were spoken".
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["CTCReadout", "readout_positions"]


def readout_positions(hf_tokenizer, transcript: str) -> int:
    """LLM positions the read-out gives an utterance that is recognised right: one segment per token of
    its transcript (tokenized as connector pre-alignment does) plus the two boundary vectors."""
    return len(hf_tokenizer(transcript, add_special_tokens=False).input_ids) + 2


class CTCReadout(nn.Module):
    """Blank vector, gate and the CTC class -> LLM token id table, saved with the model.

    ``token_ids`` is empty until :meth:`set_vocabulary` (connector pre-alignment) fills it; its
    size differs between models, so loading a state dict resizes it (``_load_from_state_dict``).
    """

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.blank = nn.Parameter(torch.zeros(1, hidden_size))
        self.residual_gate = nn.Parameter(torch.zeros(1))  # not a scalar: FSDP2 cannot shard 0-d parameters
        self.boundaries = nn.Parameter(torch.zeros(2, hidden_size))  # before and after the segments
        self.register_buffer("token_ids", torch.zeros(0, dtype=torch.long))

    @property
    def ready(self) -> bool:
        return self.token_ids.numel() > 0

    def set_vocabulary(self, token_ids: list[int], boundaries: torch.Tensor | None = None) -> None:
        """Fill the class table (and start the boundary vectors at ``boundaries``, e.g. the LLM's quotation marks)."""
        self.token_ids = torch.tensor(token_ids, dtype=torch.long, device=self.blank.device)
        if boundaries is not None:
            with torch.no_grad():
                self.boundaries.copy_(boundaries)

    def vocabulary_embeddings(self, embedding: nn.Module) -> torch.Tensor:
        """``(V, hidden)``: the LLM input embedding of each class's token, in class order.

        Through the embedding module's forward, not its ``weight``: under FSDP2 the weight is a shard
        outside that forward, whose hooks gather it (and route its gradient, if it trains)."""
        return embedding(self.token_ids)

    def classes(self, vocabulary: torch.Tensor) -> torch.Tensor:
        """``(1 + V, hidden)``: the blank, then ``vocabulary`` (:meth:`vocabulary_embeddings`)."""
        return torch.cat([self.blank.to(vocabulary.dtype), vocabulary], 0)

    def logits(self, outputs: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        """CTC logits ``(positions, 1 + V)`` of one utterance's connector outputs; class 0 is blank. In the
        vocabulary's dtype: bf16 inference (``load_model(bf16=True)``) keeps the connector fp32 and the LLM's
        embeddings bf16."""
        return outputs.to(vocabulary.dtype) @ self.classes(vocabulary).T

    def greedy_token_ids(self, outputs: torch.Tensor, vocabulary: torch.Tensor) -> list[int]:
        """Greedy CTC decoding of one utterance: LLM token ids (best class per position, runs merged, blanks dropped)."""
        best = self.logits(outputs, vocabulary).argmax(-1)
        positions = (best != 0).nonzero().squeeze(1)
        return self.token_ids[best[positions[_segment_starts(best, positions)]] - 1].tolist()

    def forward(self, outputs: list[torch.Tensor], embedding: nn.Module) -> list[torch.Tensor]:
        """Each utterance's connector outputs ``(positions, hidden)`` -> ``(segments + 2, hidden)`` LLM inputs.

        A batch per call: under FSDP2 this module and ``embedding`` (the LLM's input embeddings) are
        sharded units, gathered once per call."""
        vocabulary = self.vocabulary_embeddings(embedding)
        return [self._read(o, vocabulary) for o in outputs]

    def _read(self, outputs: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
        posteriors = self.logits(outputs, vocabulary).float().softmax(-1)
        best = posteriors.argmax(-1)
        keep = best != 0
        if not keep.any():  # silence: keep the one position most likely to be a word, so the span is not empty
            keep[posteriors[:, 0].argmin()] = True
            best = torch.where(keep, posteriors[:, 1:].argmax(-1) + 1, best)
        positions = keep.nonzero().squeeze(1)
        segment = _segment_starts(best, positions).cumsum(0) - 1
        n = int(segment[-1]) + 1
        # dtype=float throughout: bf16-true training makes bf16 the default dtype
        counts = torch.zeros(n, device=outputs.device, dtype=torch.float).index_add_(0, segment, torch.ones_like(segment, dtype=torch.float))
        words = posteriors[positions, 1:]
        words = words / words.sum(-1, keepdim=True)  # within a word segment, blank mass is not a token
        mean_words = torch.zeros(n, words.shape[1], device=outputs.device, dtype=torch.float).index_add_(0, segment, words) / counts[:, None]
        mean_outputs = torch.zeros(n, outputs.shape[1], device=outputs.device, dtype=torch.float).index_add_(
            0, segment, outputs[positions].float()) / counts[:, None]
        text_like = mean_words @ vocabulary.float()
        segments = text_like + self.residual_gate * mean_outputs
        return torch.cat([self.boundaries[:1].float(), segments, self.boundaries[1:].float()]).to(outputs.dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved = state_dict.get(prefix + "token_ids")
        if saved is not None:
            self.token_ids = torch.zeros_like(saved, device=self.token_ids.device)
        gate = state_dict.get(prefix + "residual_gate")
        if gate is not None and gate.dim() == 0:  # saved before the gate became 1-d
            state_dict[prefix + "residual_gate"] = gate.reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _segment_starts(best: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """CTC collapse over the kept (non-blank) ``positions``: True where a new token starts, i.e. the
    best class differs from the previous kept position's or a blank lies between ("a _ a" is two tokens)."""
    starts = torch.ones_like(positions, dtype=torch.bool)
    starts[1:] = (best[positions[1:]] != best[positions[:-1]]) | (positions[1:] != positions[:-1] + 1)
    return starts
