"""Offline data-generation jobs: MTBI behaviors (:mod:`.behaviors`), speech QA (:mod:`.sqa`), TTS
mixed-modal SFT (:mod:`.mixed_modal`) and word alignments (:mod:`.alignment`), and their shared parts:

* :func:`~nemo_speechlm.parts.runner.run_resumable` (in ``parts/``, since inference and evaluation
  use it too): batched, incremental, crash-safe, resumable output;
* :mod:`.chat_generator` — answering chat conversations with a text LLM (HF or vLLM backend);
* :mod:`.filters` — :func:`degenerate_reason`: rejecting empty, echoed, refused, looping or
  truncated answers.

A job is then a small ``process_batch(items) -> [record | Rejected(reason)]`` function.
"""
from nemo_speechlm.datagen.chat_generator import (
    ChatGenerator,
    GenerationResult,
    HFChatGenerator,
    VLLMChatGenerator,
    build_chat_generator,
)
from nemo_speechlm.datagen.filters import degenerate_reason
from nemo_speechlm.parts.runner import Outcome, Rejected, RunSummary, run_resumable

__all__ = [
    "ChatGenerator",
    "GenerationResult",
    "HFChatGenerator",
    "VLLMChatGenerator",
    "build_chat_generator",
    "degenerate_reason",
    "Outcome",
    "Rejected",
    "RunSummary",
    "run_resumable",
]
