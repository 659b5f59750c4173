"""Turning chat messages into token ids and a loss mask.

By default we use the LLM's own Hugging Face chat template, so any chat LLM works
without writing a formatter. NeMo ``PromptFormatter`` names (``llama3``, ``qwen``,
``gemma``, ...) are accepted as an alternative through :func:`resolve_prompt_formatter`.
"""
from __future__ import annotations

import logging

import torch
from nemo.collections.common.prompts.formatter import Modality, PromptFormatter

from nemo_speechlm.errors import ConfigError
from nemo_speechlm.parts.decoding import tokenizer_end_ids

CHAT_TEMPLATE_FORMAT = "speechlm_chat_template"

ROLES = ("system", "user", "assistant")

log = logging.getLogger(__name__)


def tokenize_chat(hf_tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> dict:
    """Render ``messages`` with the tokenizer's chat template; return ``input_ids`` and ``mask``.

    ``mask`` is True exactly on the tokens of assistant turns (their text and the
    end-of-turn marker the template writes after it, not the newline ChatML writes after
    that marker), never on system/user turns or on the assistant header. We render the conversation prefix by prefix and tokenize the
    pieces separately, so the boundary between a header and an answer is exact.
    """
    if not getattr(hf_tokenizer, "chat_template", None):
        raise ValueError(
            f"The tokenizer {getattr(hf_tokenizer, 'name_or_path', '')!r} has no chat template: "
            f"set `prompt_format` to a NeMo PromptFormatter name (e.g. llama3, qwen, gemma)."
        )
    for i, m in enumerate(messages):
        if m.get("role") not in ROLES:
            raise ValueError(f"Message {i} has role {m.get('role')!r}; expected one of {ROLES}.")
        if not isinstance(m.get("content"), str) or (m["role"] == "assistant" and not m["content"].strip()):
            raise ValueError(f"Message {i} ({m.get('role')}) has empty or non-string content: {m.get('content')!r}.")

    ends, end_texts = _turn_ends(hf_tokenizer)
    for m in messages:  # the text ends its turn there: an answer's targets stop at it, a user's text could close its
        # turn. Found only here, hours into a run, so said (not raised: it stopped the run, and was unskippable)
        literal = next((t for t in end_texts if t in m["content"]), None)
        if literal is not None:
            _warn_end_token_in_text(f"{m['role']} text contains the chat template's end-of-turn token {literal!r}: "
                                    f"its turn ends there (an answer trains only up to it): {m['content'][:80]!r}")
    messages = _system_in_first_user_turn_if_refused(hf_tokenizer, messages)

    def render(msgs, gen_prompt):
        return hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen_prompt)

    pieces: list[tuple[str, bool]] = []  # (text, is_target)
    rendered = ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            header = render(messages[:i], True)
            pieces.append((_suffix_after(rendered, header), False))
            rendered = header
        full = render(messages[: i + 1], False)
        pieces.append((_suffix_after(rendered, full), m["role"] == "assistant"))
        rendered = full
    if add_generation_prompt:
        pieces.append((_suffix_after(rendered, render(messages, True)), False))

    ids, mask = [], []
    for text, is_target in pieces:
        piece_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(piece_ids)
        # an answer's targets: its tokens up to its end-of-turn token, not what the template writes after it
        # (ChatML's and Gemma's newline: 5% of the demo's targets, a token generation never reaches)
        targets = next((n + 1 for n, token in enumerate(piece_ids) if token in ends), len(piece_ids)) if is_target else 0
        mask.extend([True] * targets + [False] * (len(piece_ids) - targets))
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "mask": torch.tensor(mask, dtype=torch.bool)}


_TEMPLATE_TAKES_SYSTEM: dict[str, bool] = {}
_TURN_ENDS: dict[tuple, tuple[frozenset[int], tuple[str, ...]]] = {}


def _turn_ends(hf_tokenizer) -> tuple[frozenset[int], tuple[str, ...]]:
    """The ids that end an assistant turn (EOS, the template's end-of-turn token) and their texts (``<|im_end|>``,
    ...), once per tokenizer and template."""
    key = (getattr(hf_tokenizer, "name_or_path", ""), hf_tokenizer.chat_template, len(hf_tokenizer),
           hf_tokenizer.eos_token_id)
    if key not in _TURN_ENDS:
        ids = frozenset(tokenizer_end_ids(hf_tokenizer))
        _TURN_ENDS[key] = ids, tuple(t for t in hf_tokenizer.convert_ids_to_tokens(sorted(ids)) if t)
    return _TURN_ENDS[key]


_END_TOKEN_WARNINGS = {"left": 10}


def _warn_end_token_in_text(message: str) -> None:
    """The first ten such messages of a process, then one saying the rest are not shown."""
    if _END_TOKEN_WARNINGS["left"] > 0:
        _END_TOKEN_WARNINGS["left"] -= 1
        log.warning(message + ("" if _END_TOKEN_WARNINGS["left"] else " (further ones are not shown)"))


def _system_in_first_user_turn_if_refused(hf_tokenizer, messages: list[dict]) -> list[dict]:
    """``messages`` with a leading system turn moved to the start of the first user turn when the chat template
    refuses system turns (Gemma's raises "System role not supported"; its model card puts such instructions in
    the first user turn). A system prompt or a text SFT line with ``system`` stopped joint SFT's default LLM, with
    a traceback at the first batch holding one."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    template = hf_tokenizer.chat_template
    if template not in _TEMPLATE_TAKES_SYSTEM:
        try:
            hf_tokenizer.apply_chat_template([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                             tokenize=False)
            _TEMPLATE_TAKES_SYSTEM[template] = True
        except Exception:  # jinja's TemplateError from the template's raise_exception, whatever it says
            _TEMPLATE_TAKES_SYSTEM[template] = False
    if _TEMPLATE_TAKES_SYSTEM[template]:
        return messages
    system, user, *rest = messages
    return [{"role": "user", "content": _system_first(system["content"], user["content"])}, *rest]


def _suffix_after(prefix: str, text: str) -> str:
    if not text.startswith(prefix):
        raise ValueError(
            "The chat template does not render conversations incrementally (a shorter conversation is not a "
            "prefix of a longer one), so assistant turns cannot be masked exactly. Set `prompt_format` to a "
            "NeMo PromptFormatter name instead."
        )
    return text[len(prefix) :]


class ChatTemplatePromptFormatter(PromptFormatter):
    """A NeMo ``PromptFormatter`` that delegates to the Hugging Face chat template.

    Registering it under a name lets NeMo's lhotse dataloader (``prompt_format:``) and
    its multimodal-conversation prompt function use any chat LLM's own template.
    """

    NAME = CHAT_TEMPLATE_FORMAT
    OUTPUT_ROLE = "assistant"
    TEMPLATE = {
        role: {"template": "|message|", "slots": {"message": Modality.Text}} for role in ("system", "user", "assistant")
    }

    def encode_dialog(self, turns: list[dict]) -> dict[str, torch.Tensor]:
        messages = []
        for turn in turns:
            role, slots = turn["role"], turn["slots"]
            if role == "system_and_user":  # NeMo's convention for a system prompt on the first turn
                messages.append({"role": "system", "content": slots["system"]})
                role = "user"
            messages.append({"role": role, "content": slots["message"]})
        is_training = bool(messages) and messages[-1]["role"] == self.OUTPUT_ROLE
        ans = tokenize_chat(_hf_tokenizer(self.tokenizer), messages, add_generation_prompt=not is_training)
        if not is_training:
            ans["context_ids"] = ans.pop("input_ids")
            ans["input_ids"] = ans["context_ids"]
            del ans["mask"]
            return ans
        # context = everything before the last assistant turn's first target token (the turn's targets are one run
        # that ends at its end-of-turn token; what the template writes after that is part of the answer, untrained)
        mask = ans["mask"]
        last_target = int(mask.nonzero().max()) if mask.any() else len(mask)
        last_context = int((~mask[:last_target]).nonzero().max()) + 1 if (~mask[:last_target]).any() else 0
        ans["context_ids"] = ans["input_ids"][:last_context]
        ans["answer_ids"] = ans["input_ids"][last_context:]
        return ans


def _hf_tokenizer(tokenizer):
    """NeMo's ``AutoTokenizer`` wraps the Hugging Face tokenizer in ``.tokenizer``."""
    return getattr(tokenizer, "tokenizer", tokenizer)


def resolve_prompt_formatter(name: str | None, tokenizer) -> PromptFormatter:
    """``None`` means the LLM's chat template; anything else is a NeMo PromptFormatter name."""
    return prompt_formatter_class(name)(tokenizer)


def prompt_formatter_class(name: str | None) -> type[PromptFormatter]:
    """The formatter class for ``model.prompt_format``; an unknown name is a :class:`ConfigError` listing the known
    ones (NeMo's RuntimeError was a traceback, after the trainer and run folder were made)."""
    try:
        return PromptFormatter.resolve(name or CHAT_TEMPLATE_FORMAT)
    except RuntimeError as exc:
        known = sorted(getattr(PromptFormatter, "_REGISTERED_FORMATTERS", {}))
        raise ConfigError(f"model.prompt_format={name!r}: no such prompt format",
                          f"use null (the LLM's chat template) or one of {', '.join(known)}") from exc


def encode_messages(formatter: PromptFormatter, messages: list[dict]) -> dict[str, torch.Tensor]:
    """Encode plain ``{"role", "content"}`` messages with any formatter (training or generation)."""
    turns = [{"role": m["role"], "slots": {"message": m["content"]}} for m in messages]
    return formatter.encode_dialog(with_system_turn_for(formatter, turns))


def with_system_turn_for(formatter: PromptFormatter, turns: list[dict]) -> list[dict]:
    """NeMo ``turns`` whose leading ``system`` turn is the one ``formatter`` takes: a ``system`` role where it has
    one (chat templates, llama3, qwen3, ...), else merged into the first user turn as ``system_and_user`` (llama2),
    else put at the start of the first user turn's text (qwen, gemma, ...; as :func:`tokenize_chat` does for a chat
    template that refuses system turns). Training, the KL teacher and generation all go through here (generation
    used to send every NeMo format ``system_and_user``, which only llama2 has, and training ``system``)."""
    if len(turns) < 2 or turns[0]["role"] != "system" or "system" in formatter.TEMPLATE:
        return turns
    system, first, *rest = turns
    system_text, first_text = system["slots"]["message"], first["slots"]["message"]
    if "system_and_user" in formatter.TEMPLATE:
        return [{"role": "system_and_user", "slots": {"system": system_text, "message": first_text}}, *rest]
    return [{"role": first["role"], "slots": {"message": _system_first(system_text, first_text)}}, *rest]


def _system_first(system: str, user: str) -> str:
    """A system prompt in the user turn of a format without a system role (Gemma's model card: instructions first)."""
    return f"{system}\n\n{user}"
