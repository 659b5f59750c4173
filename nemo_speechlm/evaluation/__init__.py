"""Evaluation jobs: the generalization benchmark (``benchmark*``), the standard evaluations
(``standard``) and listening diagnostics (``listening``).

The text metrics (:mod:`nemo_speechlm.parts.metrics`) and the per-task "task-following" checks
(:mod:`nemo_speechlm.data.task_checks`) live lower down, since training data and data generation use
them too; they are re-exported here."""
from nemo_speechlm.data.task_checks import TASK_CHECKS, resolve_check, run_check
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
