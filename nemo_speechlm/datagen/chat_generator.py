"""Answering chat conversations with a text LLM, in batches: the LLM side of data generation.

Generation jobs only need ``generate(conversations) -> [GenerationResult]``; the backend is a
choice of speed, not of behavior:

* :class:`HFChatGenerator` — ``transformers`` on CPU or GPU, always available;
* :class:`VLLMChatGenerator` — vLLM on GPU, when ``vllm`` is installed.

Both render conversations with the LLM's own chat template (with the generation prompt),
decode greedily unless sampling is asked for, and report whether each answer ended by itself
(``finished``) or hit the ``max_new_tokens`` cap, which the degenerate-answer filter needs.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

import torch

from nemo_speechlm.errors import ConfigError, InputError
from nemo_speechlm.parts.cli import positive_int
from nemo_speechlm.parts.decoding import decode, end_token_ids, length_sorted_batches, sampler
from nemo_speechlm.parts.device import resolve_device

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class GenerationResult:
    """One answer: its text (stripped, special tokens removed) and whether it ended by itself
    (end-of-turn/EOS) rather than by hitting ``max_new_tokens``."""

    text: str
    finished: bool


@runtime_checkable
class ChatGenerator(Protocol):
    """What a generation job needs from an LLM backend."""

    def generate(
        self, conversations: list[list[dict]], max_new_tokens: int | Sequence[int] | None = None
    ) -> list[GenerationResult]:
        """One result per conversation (``[{"role", "content"}, ...]``), in input order; ``max_new_tokens``
        is one cap or one per conversation."""

    def generation_settings(self) -> dict:
        """model, backend, do_sample, temperature, top_p, max_new_tokens, seed: recorded with outputs."""


class HFChatGenerator:
    """Batched decoding (:func:`nemo_speechlm.parts.decoding.decode`: KV cache, each row leaves
    the batch when it ends) over chat-templated, left-padded prompts.

    Within a call, prompts are sorted by length before batching (``batch_size`` at a time) to
    reduce padding; results come back in input order. Greedy decoding is deterministic and
    gives the same answers batched or one by one. With ``do_sample=True``, each batch is seeded
    from ``seed`` and its prompts, so a rerun of the same batch samples the same answers.
    The decoding settings are pinned (not inherited from the model's ``generation_config``) so
    :meth:`generation_settings` describes them completely.
    """

    backend = "hf"

    def __init__(
        self,
        model,
        tokenizer=None,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        batch_size: int = 16,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            self.model_name = str(model)
            source = _loadable_source(str(model))
            self.device = resolve_device(device)
            self.model = AutoModelForCausalLM.from_pretrained(source, dtype=_resolve_dtype(dtype, self.device))
            self.model.to(self.device)
            if tokenizer is None:
                tokenizer = AutoTokenizer.from_pretrained(source)
        else:
            self.model = model
            self.model_name = getattr(model, "name_or_path", "") or type(model).__name__
            # "auto" leaves a given model where it is (it may be dispatched over devices).
            self.device = model.device if device == "auto" else resolve_device(device)
            if device != "auto":
                self.model.to(self.device)
            if dtype is not None:
                self.model.to(_resolve_dtype(dtype, self.device))
            if tokenizer is None:
                if not getattr(model, "name_or_path", ""):
                    raise ValueError("HFChatGenerator: pass tokenizer= with a model object that has no name_or_path")
                tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        self.model.eval()
        # NeMo's AutoTokenizer wraps the Hugging Face tokenizer.
        if not hasattr(tokenizer, "apply_chat_template") and hasattr(tokenizer, "tokenizer"):
            tokenizer = tokenizer.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(f"HFChatGenerator: the tokenizer of {self.model_name} has no chat template")
        self.tokenizer = tokenizer
        self.eos_ids = end_token_ids(self.model, tokenizer)
        if not self.eos_ids:
            raise InputError(f"HFChatGenerator: found no EOS / end-of-turn token for {self.model_name}")
        # Generation-only padding (left, masked): any id works, EOS if there is no pad token.
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    def generate(
        self, conversations: list[list[dict]], max_new_tokens: int | Sequence[int] | None = None
    ) -> list[GenerationResult]:
        """Answer each conversation (its last turn is the user's); ``max_new_tokens`` overrides the default
        cap, with one value for all or one per conversation (rows with different caps share a batch)."""
        caps = _caps(max_new_tokens or self.max_new_tokens, len(conversations))
        prompts = [self.encode(conversation) for conversation in conversations]
        results: list[GenerationResult | None] = [None] * len(prompts)
        for chunk in length_sorted_batches([len(p) for p in prompts], self.batch_size):
            for i, result in zip(chunk, self._generate_batch([prompts[i] for i in chunk], [caps[i] for i in chunk])):
                results[i] = result
        return results

    def encode(self, conversation: list[dict]) -> list[int]:
        """Token ids of the conversation rendered by the chat template, ready for the assistant turn."""
        text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        # The template already writes BOS/turn markers; the tokenizer must not add its own.
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generation_settings(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model_name,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "top_p": self.top_p if self.do_sample else None,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            "dtype": str(self.model.dtype).removeprefix("torch."),
        }

    def _generate_batch(self, prompts: list[list[int]], caps: list[int]) -> list[GenerationResult]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompts):
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        sample = sampler(self.temperature, self.top_p) if self.do_sample else None
        with self._seeded(prompts):
            rows = decode(self.model, input_ids.to(self.device), attention_mask.to(self.device), caps, self.eos_ids,
                          sample=sample)
        return [
            GenerationResult(text=self.tokenizer.decode(row.tokens, skip_special_tokens=True).strip(), finished=row.finished)
            for row in rows
        ]

    def _seeded(self, prompts: list[list[int]]):
        if not self.do_sample:
            return contextlib.nullcontext()
        return _seeded_rng(self.seed + zlib.crc32(repr(prompts).encode()), self.device)


class VLLMChatGenerator:
    """The same interface on vLLM (``LLM.chat`` with ``SamplingParams``); needs ``pip install vllm``."""

    backend = "vllm"

    def __init__(
        self,
        model: str,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int = 0,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        dtype: str | None = None,
        **llm_kwargs,
    ) -> None:
        try:
            import vllm
        except ImportError as exc:  # a choice the user can change: one error line at the command line
            raise ConfigError("backend='vllm' needs vLLM, which is not installed",
                              "pip install vllm (on a CUDA machine), or use --backend hf") from exc
        self._vllm = vllm
        self.model_name = str(model)
        self.dtype = dtype  # (was not passed on: --dtype was ignored, and not recorded)
        self.llm = vllm.LLM(model=_loadable_source(str(model)), seed=seed, dtype=dtype or "auto", **llm_kwargs)
        self.do_sample = do_sample
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.max_new_tokens = max_new_tokens

    def generate(
        self, conversations: list[list[dict]], max_new_tokens: int | Sequence[int] | None = None
    ) -> list[GenerationResult]:
        params = [
            self._vllm.SamplingParams(
                max_tokens=cap,
                temperature=self.temperature if self.do_sample else 0.0,
                top_p=self.top_p if self.do_sample else 1.0,
                seed=self.seed if self.do_sample else None,
            )
            for cap in _caps(max_new_tokens or self.max_new_tokens, len(conversations))
        ]
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [
            GenerationResult(text=o.outputs[0].text.strip(), finished=o.outputs[0].finish_reason == "stop")
            for o in outputs
        ]

    def generation_settings(self) -> dict:
        return {
            "backend": self.backend,
            "model": self.model_name,
            "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else None,
            "top_p": self.top_p if self.do_sample else None,
            "max_new_tokens": self.max_new_tokens,
            "seed": self.seed,
            # only when given: outputs written before it was recorded (vLLM's "auto") resume
            **({"dtype": self.dtype} if self.dtype else {}),
        }


BACKENDS = {"hf": HFChatGenerator, "vllm": VLLMChatGenerator}


def build_chat_generator(backend: str = "hf", **kwargs) -> ChatGenerator:
    """``HFChatGenerator(**kwargs)`` or ``VLLMChatGenerator(**kwargs)``, by name (for configs)."""
    if backend not in BACKENDS:
        raise ValueError(f"Unknown generation backend {backend!r}; expected one of {sorted(BACKENDS)}")
    return BACKENDS[backend](**kwargs)


def _caps(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """One token cap per conversation."""
    caps = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(caps) != n:
        raise ValueError(f"generate() got {len(caps)} max_new_tokens for {n} conversations")
    return caps


def _loadable_source(model: str) -> str:
    """A directory as is; a hub id checked (a clear error if it cannot be fetched); a ``.gguf`` file
    converted (once, cached) to an HF directory."""
    from nemo_speechlm.parts.llm import resolve_llm_source

    return resolve_llm_source(model)


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 is slower on common CPUs), bf16 (else fp16) on GPU, unless given."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        return getattr(torch, str(dtype).removeprefix("torch."))
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


@contextlib.contextmanager
def _seeded_rng(seed: int, device: torch.device):
    """Seed torch inside the block without disturbing the caller's random state."""
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    with torch.random.fork_rng(devices=[index] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


def add_teacher_arguments(parser, teacher_help: str = "") -> None:
    """The flags every generation script shares: which LLM, how it decodes, how it is batched."""
    parser.add_argument("--teacher", default=None, help="HF hub id, local HF directory or .gguf (default: offline "
                        f"SmolLM2-135M-Instruct){teacher_help}")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128, help="cap per answer")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--backend", choices=sorted(BACKENDS), default="hf")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None, help="e.g. bfloat16 on GPUs (default: hf float32 on CPU, bfloat16 on CUDA; vllm its own choice)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--system-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (and prompt choice where a job has one)")


def teacher_from_arguments(args) -> ChatGenerator:
    """The generator that :func:`add_teacher_arguments`' flags describe."""
    from nemo_speechlm.parts.offline_models import smollm2_gguf_path

    if args.backend == "vllm" and args.device != "auto":  # vLLM places the model itself; it was silently ignored
        raise ConfigError("--device is not used by --backend vllm", "set CUDA_VISIBLE_DEVICES to choose the GPU")
    kwargs = ({"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size} if args.backend == "hf"
              else {"dtype": args.dtype})  # (vLLM batches by itself: --batch-size only sets how often output is written)
    return build_chat_generator(
        args.backend, model=args.teacher or smollm2_gguf_path(), do_sample=args.sample,
        temperature=args.temperature, top_p=args.top_p, seed=args.seed, **kwargs,
    )
