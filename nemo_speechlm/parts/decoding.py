"""Batched decoding with a KV cache that drops each row as soon as it is finished.

Why not ``transformers``' ``generate``: in a batch it keeps computing finished rows (fed
padding) until the longest answer ends, so a batch costs ``batch_size x longest answer``
and one rambling answer holds up fifteen short ones. Here a row leaves the batch and the KV
cache at its end token, its stop string or its own token cap (caps may differ per row, so
tasks with different caps share a batch). The prefix all prompts of a batch start with (the
chat template's system prompt and turn header) is computed once. Callers sort items by length
before batching (:func:`length_sorted_batches`) so that batches carry little padding.

Greedy by default (the same answers batched or one at a time); ``sampler`` swaps the
argmax for sampling (:func:`sampler`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

# End-of-turn tokens of common chat templates.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")

Sampler = Callable[[torch.Tensor], torch.Tensor]  # (rows, vocab) logits -> (rows,) next ids


@dataclass(frozen=True)
class Decoded:
    """One row's new tokens (without the end token) and whether it ended by itself (end token or stop
    string) rather than at its token cap."""

    tokens: list[int]
    finished: bool


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of ``batch_size``, longest first, so each batch holds similar lengths
    (little padding) and the slowest batch runs first (a progress bar then errs on the safe side)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def sampler(temperature: float = 1.0, top_p: float = 1.0) -> Sampler:
    """Sampling with ``transformers``' temperature and nucleus warpers (pass to :func:`decode`)."""
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p)])

    def sample(logits: torch.Tensor) -> torch.Tensor:
        scores = warpers(None, logits.float())
        return torch.multinomial(scores.softmax(-1), 1).squeeze(1)

    return sample


@torch.inference_mode()
def decode(
    llm: torch.nn.Module,
    prompt: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int | Sequence[int],
    end_ids: Collection[int],
    stop_strings: Sequence[str] = (),
    tokenizer=None,
    sample: Sampler | None = None,
) -> list[Decoded]:
    """Continue each left-padded row of ``prompt`` until it ends: token ids ``(B, T)`` or input
    embeddings ``(B, T, H)`` (speech spliced in).

    A row ends at any of ``end_ids``, when its decoded text contains one of ``stop_strings``
    (needs ``tokenizer``; the tokens up to and including the one that completed the string are
    kept, the caller cuts the text), or after ``max_new_tokens`` (one cap, or one per row).
    """
    rows = prompt.shape[0]
    caps = [max_new_tokens] * rows if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != rows:
        raise ValueError(f"decode() got {len(caps)} max_new_tokens for {rows} rows")
    if stop_strings and tokenizer is None:
        raise ValueError("decode() needs the tokenizer to look for stop strings")
    end_ids, stop_strings = _special_stops_as_end_ids(tokenizer, end_ids, stop_strings)
    outputs: list[list[int]] = [[] for _ in range(rows)]
    finished = [False] * rows
    live = torch.tensor([i for i in range(rows) if caps[i] > 0], dtype=torch.long)
    if len(live) == 0:
        return [Decoded([], False) for _ in range(rows)]
    device = prompt.device
    end = torch.tensor(sorted(end_ids), dtype=torch.long, device=device)
    step = _Stepper(llm)
    logits, mask, positions = _prefill(step, prompt[live.to(device)], attention_mask[live.to(device)].long())
    while True:
        next_ids = logits.argmax(-1) if sample is None else sample(logits)
        is_end = torch.isin(next_ids, end).tolist()
        keep = []
        for row, (token, ended) in enumerate(zip(next_ids.tolist(), is_end)):
            item = int(live[row])
            if ended:
                finished[item] = True
                continue
            outputs[item].append(token)
            if stop_strings and _has_stop(tokenizer, outputs[item], stop_strings):
                finished[item] = True
            elif len(outputs[item]) < caps[item]:
                keep.append(row)
        if not keep:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, dtype=torch.long, device=device)
            step.cache.batch_select_indices(index)
            live, next_ids, mask, positions = live[keep], next_ids[index], mask[index], positions[index]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = step(mask, positions, input_ids=next_ids[:, None])
    return [Decoded(tokens, done) for tokens, done in zip(outputs, finished)]


def end_token_ids(model, tokenizer) -> set[int]:
    """EOS ids of the model and tokenizer, plus the chat template's end-of-turn token (a config often
    names only its end-of-text token as EOS, while the template closes every turn with another)."""
    ids = tokenizer_end_ids(tokenizer)
    value = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(value, int):
        ids.add(value)
    elif value:
        ids.update(value)
    return ids


def tokenizer_end_ids(tokenizer) -> set[int]:
    """The tokenizer's EOS id and its chat template's end-of-turn token ids (what ends an answer)."""
    ids = set()
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}], tokenize=False
        )
    except Exception:  # a template with unusual role rules: rely on the EOS ids above
        rendered = ""
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in rendered and token in vocab)
    return ids


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first of ``stop_strings`` (all of it if none occurs)."""
    cuts = [text.find(s) for s in stop_strings if s in text]
    return text[: min(cuts)] if cuts else text


def _prefill(step: "_Stepper", prompt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Run the prompts through ``step``; returns the next-token logits, the attention mask and the positions.

    The prefix that every row starts with (a chat template's system prompt and turn header) goes
    through the LLM once and its KV cache is shared: on a CPU, prefill is compute-bound and does not
    get cheaper per row in a batch, so rows' shared tokens are the part worth not repeating.
    Rows are then laid out as ``[shared prefix | padding | own tokens]``; positions skip the padding.
    Not with sliding-window attention (Mistral, Gemma 2, Qwen2 with ``use_sliding_window``): its mask measures
    distance in cache slots, so the padding would push a row's own tokens away from the prefix, and batched
    answers differed from one-at-a-time ones from the first token on.
    """
    kind = "inputs_embeds" if prompt.is_floating_point() else "input_ids"
    shared = _shared_prefix_length(prompt, mask) if len(prompt) > 1 and not step.sliding_window else 0
    if shared:
        starts = mask.argmax(1)
        step(mask.new_ones(1, shared), torch.arange(shared, device=mask.device)[None],
             **{kind: prompt[:1, starts[0] : starts[0] + shared]})
        step.cache.batch_repeat_interleave(len(prompt))
        own = [prompt[i, start + shared :] for i, start in enumerate(starts.tolist())]
        width = max(len(o) for o in own)
        rest = prompt.new_zeros((len(prompt), width, *prompt.shape[2:]))
        rest_mask = mask.new_zeros(len(prompt), width)
        for i, tokens in enumerate(own):
            rest[i, width - len(tokens) :] = tokens
            rest_mask[i, width - len(tokens) :] = 1
        positions = (shared + rest_mask.cumsum(1) - 1).clamp(min=shared)
        mask = torch.cat([mask.new_ones(len(prompt), shared), rest_mask], dim=1)
        return step(mask, positions, **{kind: rest}), mask, positions
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return step(mask, positions, **{kind: prompt}), mask, positions


def _shared_prefix_length(prompt: torch.Tensor, mask: torch.Tensor) -> int:
    """How many leading tokens (ids, or embedding vectors) all left-padded rows share, leaving each row
    at least one token of its own (its last position gives the first answer token)."""
    lengths = mask.sum(1)
    shortest = int(lengths.min())
    index = (mask.shape[1] - lengths)[:, None] + torch.arange(shortest, device=mask.device)[None]  # rows' first tokens
    aligned = prompt.gather(1, index if prompt.dim() == 2 else index[..., None].expand(-1, -1, prompt.shape[2]))
    same = aligned == aligned[:1]
    same = same.all(0) if prompt.dim() == 2 else same.all(-1).all(0)
    differs = (~same).nonzero()
    return min(int(differs[0]) if len(differs) else shortest, shortest - 1)


class _Stepper:
    """One forward through ``llm`` with a KV cache: next-token logits ``(rows, vocab)``."""

    def __init__(self, llm: torch.nn.Module) -> None:
        base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm  # under a peft wrapper
        self.llm = llm
        self.cache = DynamicCache(config=base.config)
        # transformers builds a sliding-window layer exactly for the LLM's sliding-window attention layers
        self.sliding_window = any(getattr(layer, "sliding_window", None) for layer in getattr(self.cache, "layers", []))
        # transformers 5.x calls the KV cache ``cache``; 4.x ``past_key_values``.
        self.cache_argument = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def __call__(self, mask: torch.Tensor, positions: torch.Tensor, **inputs) -> torch.Tensor:
        kwargs = {self.cache_argument: self.cache, "attention_mask": mask, "position_ids": positions}
        return self.llm(**inputs, **kwargs, use_cache=True, logits_to_keep=1).logits[:, -1]


def _special_stops_as_end_ids(tokenizer, end_ids: Collection[int], stop_strings: Sequence[str]) -> tuple[set[int], list[str]]:
    """Stop strings that are one special token (``<|im_end|>``, ``<end_of_turn>``) become end ids: the answer's
    text is decoded without special tokens, so as strings they never matched and the row ran to its cap."""
    if not stop_strings:
        return set(end_ids), []
    special = set(tokenizer.all_special_tokens)
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    token_stops = {tokenizer.convert_tokens_to_ids(s) for s in stop_strings if s in special}
    return set(end_ids) | token_stops, [s for s in stop_strings if s not in special]


def _has_stop(tokenizer, tokens: list[int], stop_strings: Sequence[str]) -> bool:
    """Whether the text of ``tokens`` contains a stop string (the whole answer is decoded: a tail of
    a few tokens can start inside a multi-byte character)."""
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(s in text for s in stop_strings)
