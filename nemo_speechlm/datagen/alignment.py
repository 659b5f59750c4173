"""Word alignments for a NeMo manifest, by CTC forced alignment with a NeMo ASR model.

MTBI interleaving cuts speech at word boundaries, so every line needs
``words: [{"word", "start", "end"}]`` (seconds from the line's ``offset``); real corpora
rarely ship them. We reuse NeMo Forced Aligner's pieces
(``nemo.collections.asr.parts.utils.aligner_utils``): ``get_batch_variables`` builds the
token targets (blanks, word boundaries) and pads the batch, ``viterbi_decoding`` finds the
best CTC path, ``add_t_start_end_to_utt_obj`` turns it into word times. We only compute
the CTC log-probs ourselves (on exactly the line's segment, see :func:`ctc_log_probs`),
map the transcript onto the model's vocabulary, and check the result.

The job runs through the shared :func:`~nemo_speechlm.parts.runner.run_resumable`:
output is appended batch by batch, and a rerun skips lines already aligned (or rejected).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch

from nemo_speechlm.data.audio import read_audio
from nemo_speechlm.data.interleaving import validate_words
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, data_for_output, read_manifest
from nemo_speechlm.data.utterance import segment_key
from nemo_speechlm.errors import InputError
from nemo_speechlm.models.loading import load_asr_model as _load_asr_model
from nemo_speechlm.models.loading import model_id
from nemo_speechlm.parts.runner import Job, Outcome, Rejected, RunSummary, run_resumable

log = logging.getLogger(__name__)


class NoCTCHeadError(InputError):
    """The model cannot do CTC forced alignment (no CTC decoder)."""


@dataclass
class AlignmentSummary:
    """What :func:`align_manifest` did: the runner's counts plus manifest lines skipped as invalid."""

    run: RunSummary
    invalid_lines: SkipSummary = field(default_factory=SkipSummary)

    def __str__(self) -> str:
        return f"{self.run}\ninvalid manifest lines: {self.invalid_lines}"


# ------------------------------------------------------------------------------------------ model


def load_asr_model(name_or_path: str | Path, device: str | None = None):
    """Restore a ``.nemo`` file or download a pretrained NeMo ASR model; fail early without a CTC head."""
    model = _load_asr_model(name_or_path, device)
    ctc_decoder(model)
    return model


def ctc_decoder(model) -> torch.nn.Module:
    """The CTC head: ``decoder`` of a CTC model, ``ctc_decoder`` of a hybrid RNNT-CTC model."""
    from nemo.collections.asr.models import EncDecCTCModel

    if hasattr(model, "ctc_decoder"):
        return model.ctc_decoder
    if isinstance(model, EncDecCTCModel):
        return model.decoder
    raise NoCTCHeadError(
        f"{type(model).__name__} has no CTC head: word alignment needs a NeMo CTC model "
        "(EncDecCTCModel, EncDecCTCModelBPE) or a hybrid RNNT-CTC model (EncDecHybridRNNTCTC[BPE]Model)"
    )


def load_segment(line: dict, sample_rate: int) -> np.ndarray:
    """The line's audio (``offset``, ``duration``), mono float32 at the model's rate: word times count from its start."""
    return read_audio(line["audio_filepath"], sample_rate, line.get("offset", 0.0) or 0.0, line["duration"])


@torch.no_grad()
def ctc_log_probs(model, audio: list[np.ndarray]) -> list[torch.Tensor]:
    """CTC log-probs ``(T_i, V + 1)`` per clip, from one padded batch.

    Not ``model.transcribe``: for arrays it pads clips shorter than 1 s on both sides, which
    would shift every time stamp, and it would run a decoding we do not need.
    """
    device = next(model.parameters()).device
    lengths = torch.tensor([len(a) for a in audio], device=device)
    signal = torch.zeros(len(audio), int(lengths.max()), device=device)
    for i, a in enumerate(audio):
        signal[i, : len(a)] = torch.from_numpy(a).to(device)
    if hasattr(model, "ctc_decoder"):  # hybrid: forward() stops at the encoder
        encoded, encoded_len = model.forward(input_signal=signal, input_signal_length=lengths)
        log_probs = model.ctc_decoder(encoder_output=encoded)
    else:
        log_probs, encoded_len, _ = model.forward(input_signal=signal, input_signal_length=lengths)
    return [lp[:n].float().cpu() for lp, n in zip(log_probs, encoded_len.tolist())]


def _aligner_view(model) -> SimpleNamespace:
    """What ``aligner_utils`` reads from a model, with the CTC head as ``decoder``.

    A hybrid model's ``decoder`` is its RNNT prediction net, which has no ``vocabulary``.
    """
    head = ctc_decoder(model)
    view = SimpleNamespace(decoder=head, blank_id=head.num_classes_with_blank - 1)
    if hasattr(model, "tokenizer"):
        view.tokenizer = model.tokenizer
    return view


def _vocabulary_check(view: SimpleNamespace) -> Callable[[str], bool]:
    """Whether one character can be aligned as itself (char vocabulary, or round-trips the tokenizer)."""
    if not hasattr(view, "tokenizer"):
        vocabulary = set(view.decoder.vocabulary) - {" "}
        return vocabulary.__contains__
    tokenizer, cache = view.tokenizer, {}
    unk_id = getattr(tokenizer, "unk_id", None)

    def known(ch: str) -> bool:
        if ch not in cache:  # sentencepiece spells an unknown piece as its text, so check the ids too
            same_text = "".join(tokenizer.text_to_tokens(ch)).replace("▁", "") == ch
            cache[ch] = same_text and (unk_id is None or unk_id not in tokenizer.text_to_ids(ch))
        return cache[ch]

    return known


def to_vocabulary(word: str, known: Callable[[str], bool]) -> str:
    """The word as the model can spell it: change case where needed, drop other unknown characters."""
    out = []
    for ch in word:
        for candidate in (ch, ch.lower(), ch.upper()):
            if known(candidate):
                out.append(candidate)
                break
    return "".join(out)


# -------------------------------------------------------------------------------------- alignment


class WordAligner:
    """Aligns batches of manifest entries; one outcome per entry, a record with ``words`` or a rejection."""

    def __init__(self, model, skip_invalid: bool = False):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.view = _aligner_view(model)
        self.known = _vocabulary_check(self.view)
        self.sample_rate = int(model.cfg.preprocessor.sample_rate)
        self.frame_s = float(model.cfg.preprocessor.window_stride) * model.encoder.subsampling_factor
        self.skip_invalid = skip_invalid

    def __call__(self, entries: list[ManifestEntry]) -> list[Outcome]:
        from nemo.collections.asr.parts.utils.aligner_utils import (
            add_t_start_end_to_utt_obj,
            get_batch_variables,
            viterbi_decoding,
        )
        from nemo.collections.asr.parts.utils.rnnt_utils import Hypothesis

        outcomes: list[Outcome | None] = [None] * len(entries)
        texts = []
        for i, entry in enumerate(entries):
            try:
                text = self._alignment_text(entry)
            except ManifestError as e:
                outcomes[i], text = self._reject(e, "out_of_vocabulary"), ""
            texts.append(text)
        todo = [i for i, o in enumerate(outcomes) if o is None]
        if not todo:
            return outcomes

        audio = [load_segment(entries[i].data, self.sample_rate) for i in todo]
        log_probs = ctc_log_probs(self.model, audio)
        hypotheses = [Hypothesis(score=0.0, y_sequence=lp, text="") for lp in log_probs]
        try:
            lp_batch, y_batch, t_batch, u_batch, utts, frame_s = get_batch_variables(
                audio=hypotheses,
                model=self.view,
                gt_text_batch=[texts[i] for i in todo],
                segment_separators=None,  # one segment: words are all we need
                output_timestep_duration=self.frame_s,
                has_hypotheses=True,
                verbose=False,
            )
        except RuntimeError as e:  # e.g. a tokenizer that rewrites characters, breaking NeMo's case restoring
            lines = ", ".join(f"{entries[i].path}:{entries[i].line}" for i in todo)
            raise RuntimeError(f"NeMo's aligner failed on one of the lines {lines}: {e}") from e
        paths = viterbi_decoding(lp_batch, y_batch, t_batch, u_batch, viterbi_device=self.device)
        for i, utt, path, frames in zip(todo, utts, paths, t_batch.tolist()):
            try:
                self._check_feasible(entries[i], utt, frames)
            except ManifestError as e:
                outcomes[i] = self._reject(e, "audio_too_short")
                continue
            add_t_start_end_to_utt_obj(utt, path, frame_s)
            try:
                outcomes[i] = self._record(entries[i], utt)
            except ManifestError as e:
                outcomes[i] = self._reject(e, "invalid_alignment")
        return outcomes

    def _alignment_text(self, entry: ManifestEntry) -> str:
        words = entry["text"].split()
        mapped = [to_vocabulary(w, self.known) for w in words]
        bad = [w for w, m in zip(words, mapped) if not m]
        if bad:
            raise ManifestError(
                entry.path, entry.line,
                f"word(s) {bad} have no character the ASR model knows; normalize the transcript "
                "(e.g. spell out numbers) or use a model whose vocabulary covers them", "text",
            )
        return " ".join(mapped)

    def _check_feasible(self, entry: ManifestEntry, utt, frames: int) -> None:
        """A CTC path needs one frame per token plus a blank between repeated tokens."""
        tokens = utt.token_ids_with_blanks[1::2]  # targets alternate blank, token, blank, ...
        needed = len(tokens) + sum(a == b for a, b in zip(tokens, tokens[1:]))
        if not _words_of(utt) or needed > frames:  # get_utt_obj gives no words when tokens > frames
            raise ManifestError(
                entry.path, entry.line,
                f"{entry['duration']} s of audio give {frames} CTC frames ({self.frame_s} s each) but the transcript "
                f"needs {needed if _words_of(utt) else 'more'} (one per token and one between repeated tokens): "
                "wrong duration or transcript, or a truncated recording?",
                "text",
            )

    def _record(self, entry: ManifestEntry, utt) -> dict:
        duration = float(entry["duration"])
        aligned = _words_of(utt)
        original = entry["text"].split()
        if len(aligned) != len(original) or any(w.t_start < 0 or w.t_end < 0 for w in aligned):
            raise ManifestError(entry.path, entry.line, "the aligner returned no time for some words", "words")
        words = []
        for text, w in zip(original, aligned):
            end = round(min(w.t_end, duration), 3)
            words.append({"word": text, "start": min(round(w.t_start, 3), end), "end": end})
        try:
            validate_words(words, duration)
        except ValueError as e:
            raise ManifestError(entry.path, entry.line, str(e), "words") from None
        return {**entry.data, "words": words}

    def _reject(self, error: ManifestError, reason: str) -> Rejected:
        if not self.skip_invalid:
            raise error
        log.warning("Skipping %s", error)
        return Rejected(reason, str(error))


def _words_of(utt) -> list:
    from nemo.collections.asr.parts.utils.aligner_utils import Segment, Word

    segments = [s for s in utt.segments_and_tokens if isinstance(s, Segment)]
    return [w for s in segments for w in s.words_and_tokens if isinstance(w, Word)]


def align_manifest(
    manifest_in: str | Path,
    manifest_out: str | Path,
    asr_model,
    batch_size: int = 8,
    skip_invalid: bool = False,
    model_name: str | None = None,
) -> AlignmentSummary:
    """Write ``manifest_in``'s lines to ``manifest_out`` with ``words`` added (resumable).

    ``asr_model`` is a NeMo CTC / hybrid model, a ``.nemo`` path or a pretrained name.
    Lines keep all their fields; a relative ``audio_filepath`` is written relative to the output's
    directory, an absolute one as it was (``data_for_output``). A line that cannot be aligned raises :class:`ManifestError`; with
    ``skip_invalid`` it is skipped and counted (invalid lines as well as unalignable ones).
    ``model_name`` (or ``asr_model`` itself when it is a name or path) identifies the aligner: an output
    made with another one is not resumed.
    """
    model = asr_model if isinstance(asr_model, torch.nn.Module) else load_asr_model(asr_model)
    aligner = WordAligner(model, skip_invalid=skip_invalid)
    invalid = SkipSummary()
    entries: dict[str, ManifestEntry] = {}
    items: dict[str, dict] = {}  # the lines as the output holds them, by key
    for entry in read_manifest(manifest_in, skip_invalid=skip_invalid, summary=invalid):
        fields = data_for_output(entry, manifest_out)
        first = entries.setdefault(segment_key(fields), entry)
        if first is not entry:  # the output could not tell the two lines apart when resuming
            error = ManifestError(entry.path, entry.line, f"same audio segment as line {first.line}", "audio_filepath")
            if not skip_invalid:
                raise error
            invalid.add(error)
            continue
        items[segment_key(fields)] = fields

    def process_batch(batch: list[dict]) -> list[Outcome]:
        outcomes = aligner([entries[segment_key(item)] for item in batch])
        return [{**outcome, "audio_filepath": item["audio_filepath"]} if isinstance(outcome, dict) else outcome
                for item, outcome in zip(batch, outcomes)]

    name = model_name or (None if isinstance(asr_model, torch.nn.Module) else str(asr_model))
    if name is not None:  # a named model: resuming with another aligner is refused (two models' word times)
        process_batch = Job(process_batch, {"aligner": model_id(name) if Path(name).exists() else name}, ("words",),
                            lambda item: {"text": item["text"]})  # a corrected transcript is aligned anew
    run = run_resumable(list(items.values()), process_batch, manifest_out, batch_size=batch_size, desc="Aligning words", key=segment_key)
    return AlignmentSummary(run, invalid)
