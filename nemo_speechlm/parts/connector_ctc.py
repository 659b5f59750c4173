"""Connector pre-alignment: CTC from the connector's outputs onto the LLM's own token embeddings.

A frozen LLM only understands vectors that look like its input embeddings. Trained through the
LLM alone, a connector learns that slowly: every step pays a full LLM forward and backward, and
the signal (the answer's CE) reaches each speech position only through 30 frozen layers. Here the
connector is first trained on its own: each output position is scored against the LLM's input
embedding of every token in the training transcripts (plus a learned blank) and the transcript is
the CTC target. Words become linearly readable *in the LLM's embedding space* before the first LLM
step, and a step costs the connector's forward only (~50 ms for batch 8 on 2 CPU cores against
~2 s for a step through SmolLM2). The idea follows LegoSLM (arXiv 2505.11352: CTC posteriors over
the LLM vocabulary times its embeddings) and Wav2Prompt (arXiv 2406.00522: LLM token embeddings as
speech-side targets); measured in ``benchmarks/convergence.py``.

Only the adapter (and projection) train. With ``model.ctc_readout`` on, the blank vector and the
vocabulary are the read-out's and are kept (``nemo_speechlm.modules.ctc_readout``); otherwise the
blank is discarded afterwards.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Sequence

import torch
from lhotse.cut import Cut
from tqdm import tqdm

from nemo.utils import logging

from nemo_speechlm.parts.audio_decoding import read_cut_audio
from nemo_speechlm.parts.distributed import encoding_on_this_rank_only, rank_and_world, sum_over_ranks

__all__ = ["transcript_vocabulary", "transcript_targets", "connector_ctc_loss", "embed_vocabulary", "pretrain_connector_ctc",
           "freeze_aligned_connector", "connector_transcripts", "save_aligned_connector", "load_aligned_connector"]

# What connector pre-alignment trains (and the read-out's vocabulary, a buffer): the weights that
# save_aligned_connector writes and load_aligned_connector puts back into another model of the same config.
ALIGNED_CONNECTOR_PREFIXES = ("perception.modality_adapter.", "perception.proj.", "ctc_readout.")


def transcript_vocabulary(tokenizer, texts: Sequence[str]) -> dict[int, int]:
    """LLM token id -> CTC class (1..V; 0 is blank) for every token of ``texts``."""
    ids = sorted({i for text in texts for i in tokenizer(text, add_special_tokens=False).input_ids})
    return {token: k + 1 for k, token in enumerate(ids)}


def transcript_targets(tokenizer, vocabulary: dict[int, int], text: str) -> list[int]:
    """CTC classes of ``text``'s tokens (tokens outside ``vocabulary`` are dropped)."""
    return [vocabulary[i] for i in tokenizer(text, add_special_tokens=False).input_ids if i in vocabulary]


def connector_ctc_loss(
    outputs: Sequence[torch.Tensor],
    targets: Sequence[Sequence[int]],
    vocabulary_embeddings: torch.Tensor,
    blank: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    """CTC loss of connector ``outputs`` (one ``(positions, hidden)`` tensor per utterance) against
    ``targets`` (from :func:`transcript_targets`); logits are dot products with ``[blank; vocabulary_embeddings]``
    (the LLM input embeddings of the vocabulary's tokens, in class order: :func:`embed_vocabulary`).
    Each utterance's loss is divided by its target length, as torch's ``reduction="mean"`` does, then
    averaged (``"mean"``) or summed (``"sum"``: one rank's share of a batch split across ranks)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', not {reduction!r}")
    classes = torch.cat([blank, vocabulary_embeddings], 0)
    log_probs = torch.nn.utils.rnn.pad_sequence([h @ classes.T for h in outputs]).log_softmax(-1)
    target_lengths = torch.tensor([len(t) for t in targets])
    losses = torch.nn.functional.ctc_loss(
        log_probs, torch.tensor([c for t in targets for c in t]), torch.tensor([len(h) for h in outputs]), target_lengths,
        reduction="none", zero_infinity=True,  # an utterance with more tokens than positions is skipped, not NaN
    )
    per_utterance = losses / target_lengths.to(losses.device, losses.dtype).clamp(min=1)  # torch's "mean", before averaging
    return per_utterance.mean() if reduction == "mean" else per_utterance.sum()


def embed_vocabulary(model, token_ids: Sequence[int]) -> torch.Tensor:
    """The LLM input embeddings ``(len(token_ids), hidden)`` of ``token_ids``, through the embedding module as
    the CTC read-out reads them (:meth:`CTCReadout.vocabulary_embeddings`), detached: the LLM does not train here."""
    embedding = model.embed_tokens
    return embedding(torch.tensor(list(token_ids), dtype=torch.long, device=embedding.weight.device)).detach()


def pretrain_connector_ctc(
    model,
    utterances: Sequence[tuple[Cut, str]],
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 16,
    feature_cache=None,
    seed: int = 0,
) -> dict:
    """Train ``model``'s modality adapter with :func:`connector_ctc_loss` for ``steps`` steps over
    ``(utterance cut, transcript)`` pairs; encoder features come from ``feature_cache`` when given.
    Returns ``{"steps", "first_loss", "final_loss"}`` (loss averaged over the first/last 20 steps).

    With a process group (several devices; the recipe starts it before ``fit``), each step's batch is split
    across the ranks, each rank encodes and computes its share on its own device, and the gradients are summed
    over the ranks: the step is the one-process step (same batch, same loss), ``world_size`` times less work
    per rank. SpecAugment and dropout draw from a generator seeded ``seed + rank``."""
    if not utterances:
        raise ValueError("connector pre-alignment needs utterances with transcripts; the training data has none")
    tokenizer = model.tokenizer.tokenizer
    vocabulary = transcript_vocabulary(tokenizer, [text for _, text in utterances])
    targets = [transcript_targets(tokenizer, vocabulary, text) for _, text in utterances]  # once, not every step
    embeddings = embed_vocabulary(model, vocabulary)
    readout = getattr(model, "ctc_readout", None)
    if readout is not None:
        quotes = [tokenizer(mark, add_special_tokens=False).input_ids[-1] for mark in (' "', '"')]
        readout.set_vocabulary(list(vocabulary), boundaries=embed_vocabulary(model, quotes))
        blank = readout.blank
    else:
        blank = torch.nn.Parameter(torch.zeros(1, embeddings.shape[1], device=embeddings.device))
    params = [p for n, p in model.perception.named_parameters() if p.requires_grad and n.startswith(("modality_adapter", "proj"))]
    optimizer = torch.optim.AdamW(params + [blank], lr=lr)
    # Linear warm-up over the first 10% of steps, then cosine decay to 0 (as the one-cycle schedule the
    # connector curves in docs/connector.md were measured with).
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                  0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, steps - warmup))))
    rank, world = rank_and_world()
    rng = random.Random(seed)  # the same on every rank: all ranks agree on each step's batch
    order: list[int] = []
    losses: list[float] = []
    was_training = model.training
    model.train()
    for module in (model.perception.preprocessor, model.perception.encoder, model.llm):
        # Not trained here: no dither, dropout or batch statistics (a Conformer's BatchNorm), as in inference
        # and the feature cache, and no running statistics updated.
        module.eval()
    bar = tqdm(range(steps), desc="Connector pre-alignment (CTC onto LLM embeddings)", unit="step", disable=rank > 0)
    # SpecAugment and dropout draw from torch's generator: seed it here, in a fork, so the aligned connector
    # depends on ``seed`` and the data only, not on how much randomness the stage-2 data set-up used before.
    with torch.random.fork_rng(devices=[embeddings.device] if embeddings.device.type == "cuda" else []), \
            encoding_on_this_rank_only(model):  # without a feature cache, a rank with an empty share does not encode
        torch.manual_seed(seed + rank)
        for _ in bar:
            if len(order) < batch_size:
                order += rng.sample(range(len(utterances)), len(utterances))
            batch, order = order[:batch_size], order[batch_size:]
            optimizer.zero_grad()
            loss = _share_of_batch_loss(model, batch[rank::world], len(batch), utterances, targets, embeddings, blank,
                                        feature_cache)
            if world > 1:
                loss = _sum_gradients_over_ranks(params + [blank], loss)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.set_postfix(ctc=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    model.train(was_training)
    result = {"steps": steps, "first_loss": _mean(losses[:20]), "final_loss": _mean(losses[-20:]),
              "vocabulary": len(vocabulary)}
    logging.info(f"Connector pre-alignment: {result}")
    return result


def _share_of_batch_loss(model, share: list[int], batch_size: int, utterances, targets, embeddings, blank,
                         feature_cache) -> torch.Tensor:
    """This rank's share of the batch's mean loss (its utterances' losses summed, divided by the whole batch's
    size), backpropagated; zero where the share is empty (more ranks than utterances in a step)."""
    if not share:
        return torch.zeros((), device=embeddings.device)
    features = _encoder_features(model, [utterances[i][0] for i in share], feature_cache)
    outputs = model.adapt(features, readout=False)
    loss = connector_ctc_loss(outputs, [targets[i] for i in share], embeddings, blank, reduction="sum") / batch_size
    loss.backward()
    return loss.detach()


def _sum_gradients_over_ranks(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' gradients (each is its share of the batch mean's gradient) and losses in one all-reduce;
    returns the batch's loss. A parameter without gradient on this rank contributes zeros."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    total = loss.clone()
    sum_over_ranks([p.grad for p in params] + [total])
    return total


def freeze_aligned_connector(model) -> None:
    """Keep the pre-aligned recognition as it is: freeze the modality adapter, the projection and the
    read-out's blank, so training through the LLM tunes only the read-out's gate and boundary vectors
    and LoRA, if any (mtbi.yaml has it); the encoder stays as ``freeze_params`` says. Measured on the demo: when the whole connector trained through the LLM, its own
    CTC WER rose from 2.6% to 7.5% (lr 1e-3) or 48.5% (lr 3e-3) and the LLM repeated 51.8% WER; frozen,
    the connector kept 2.3% and the LLM repeated at 6.2% (docs/connector.md)."""
    readout = getattr(model, "ctc_readout", None)
    if readout is None:  # (not readout.ready: when resuming, the checkpoint fills the vocabulary later, in fit)
        raise ValueError("connector_pretraining.freeze_connector needs model.ctc_readout=true (the read-out's gate and "
                         "boundaries are what trains through the LLM); set freeze_connector=false without the read-out")
    for name, param in model.perception.named_parameters():
        if name.startswith(("modality_adapter", "proj")):
            param.requires_grad_(False)
    readout.blank.requires_grad_(False)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    logging.info(f"Connector frozen after pre-alignment; training through the LLM: {len(trainable)} tensors "
                 f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters)")


def save_aligned_connector(model, path) -> None:
    """Write the pre-aligned connector (adapter, projection, read-out with its vocabulary) to ``path``
    (``torch.save``, written to a temporary file and renamed), for ``connector_pretraining.init_from``."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if k.startswith(ALIGNED_CONNECTOR_PREFIXES)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_aligned_connector(model, path) -> None:
    """Load a connector written by :func:`save_aligned_connector` into ``model`` (same connector config);
    every saved tensor must have a place in the model, and the model's connector must be covered."""
    state = torch.load(path, map_location="cpu")
    wanted = {k for k in model.state_dict() if k.startswith(ALIGNED_CONNECTOR_PREFIXES)}
    missing, extra = sorted(wanted - set(state)), sorted(set(state) - wanted)
    if missing or extra:
        raise ValueError(f"{path}: the saved connector does not match the model's (missing {missing[:5]}, "
                         f"unexpected {extra[:5]}); was it saved from a model with the same connector config?")
    torch.nn.Module.load_state_dict(model, state, strict=False)
    logging.info(f"Connector loaded from {path} ({len(state)} tensors)")


@torch.no_grad()
def connector_transcripts(model, audios: Sequence, batch_size: int = 16) -> list[str]:
    """What the connector alone hears: greedy CTC decoding of its outputs through the model's read-out,
    no LLM (waveforms at ``model.sampling_rate``). Needs ``model.ctc_readout`` with a vocabulary."""
    readout = getattr(model, "ctc_readout", None)
    if readout is None or not readout.ready:
        raise ValueError("connector_transcripts needs a model trained with model.ctc_readout and connector pre-alignment")
    tokenizer, vocabulary = model.tokenizer.tokenizer, readout.vocabulary_embeddings(model.embed_tokens)
    texts = []
    for start in range(0, len(audios), batch_size):
        features = _encode_waveforms(model, [torch.as_tensor(a, dtype=torch.float32) for a in audios[start : start + batch_size]])
        for outputs in model.adapt(features, readout=False):
            texts.append(tokenizer.decode(readout.greedy_token_ids(outputs, vocabulary)).strip())
    return texts


@torch.no_grad()
def _encoder_features(model, cuts: list[Cut], feature_cache) -> list[torch.Tensor]:
    if feature_cache is not None:
        return [feature_cache.load(c).to(model.device) for c in cuts]
    wavs = [torch.from_numpy(read_cut_audio(c, model.sampling_rate)) for c in cuts]
    return [f.detach() for f in _encode_waveforms(model, wavs)]


def _encode_waveforms(model, wavs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Encoder outputs of mono waveforms at ``model.sampling_rate``, batched together."""
    lens = torch.tensor([len(w) for w in wavs], device=model.device)
    return model.encode_speech(torch.nn.utils.rnn.pad_sequence(wavs, batch_first=True).to(model.device), lens)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None
