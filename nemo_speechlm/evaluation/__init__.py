"""Evaluation: text metrics (WER/CER, BLEU, chrF, ROUGE-L, exact match, transcript copies)
and per-task "task-following" checks used to score a speech LLM's answers."""
from nemo_speechlm.parts.metrics import (
    bleu,
    char_error_rate,
    chrf,
    exact_match,
    is_transcript_copy,
    normalize_english,
    rouge_l,
    sentence_bleu,
    sentence_chrf,
    utterance_wer,
    word_error_rate,
)
from nemo_speechlm.data.task_checks import TASK_CHECKS, resolve_check, run_check

__all__ = [
    "TASK_CHECKS",
    "bleu",
    "char_error_rate",
    "chrf",
    "exact_match",
    "is_transcript_copy",
    "normalize_english",
    "resolve_check",
    "rouge_l",
    "run_check",
    "sentence_bleu",
    "sentence_chrf",
    "utterance_wer",
    "word_error_rate",
]
