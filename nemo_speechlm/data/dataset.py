"""Batches of conversations: speechlm2's ``SALMDataset`` plus speech spans and cached features.

Each audio locator in a conversation stands for an *audio segment*: a whole utterance,
or (speech-text interleaving) a time span of one. A span's cut carries where its
utterance lies in the recording (``SPAN_SOURCE_START``/``SPAN_SOURCE_DURATION`` in
``cut.custom``); the batch holds each distinct utterance once, plus
``audio_segments[i] = (utterance row, start s, end s)`` for locator ``i``. The model
encodes whole utterances and slices the encoder output by time, so a span's features
are the same whether they come from audio or from the feature cache, and a frozen
encoder's cache only ever needs whole utterances.

Why not SALMDataset as is: it loads one audio per locator, which would re-encode every
span on its own (without the rest of the utterance as context) and defeat the cache.
"""
from __future__ import annotations

import torch
from lhotse import CutSet
from lhotse.cut import Cut
from nemo.collections.common.data.lhotse.text_adapters import AudioTurn, TextTurn
from nemo.collections.speechlm2.data import SALMDataset
from nemo.collections.speechlm2.data.salm_dataset import drop_in_memory_data, left_collate_vectors

from nemo_speechlm.data.feature_cache import FeatureCache
from nemo_speechlm.data.utterance import (  # noqa: F401  (speech_span, source_utterance: their home is data.utterance)
    SPAN_SOURCE_DURATION,
    SPAN_SOURCE_START,
    source_utterance,
    speech_span,
    utterance_key,
)
from nemo_speechlm.errors import InputError, WorkerInputError
from nemo_speechlm.parts.audio_decoding import audio_source_name, read_cut_audio
from nemo_speechlm.parts.prompting import encode_messages

def as_text_messages(conversation) -> list[dict]:
    """``{"role", "content"}`` messages with each audio turn read as its text (same-role turns concatenated)."""
    messages = []
    for turn in conversation.turns:
        text = turn.value if isinstance(turn, TextTurn) else turn.text
        if not isinstance(text, str):
            raise ValueError(f"Conversation {conversation.id}: an audio turn has no text to stand in for it")
        if messages and messages[-1]["role"] == turn.role:
            messages[-1]["content"] += text
        else:
            messages.append({"role": turn.role, "content": text})
    return messages


class SpeechLMDataset(SALMDataset):
    """Collates conversations into ``input_ids``/``loss_mask`` plus, per batch, either
    ``audios``/``audio_lens`` (one row per distinct utterance) or, with a feature cache,
    ``encoder_features`` ``(B, D, T)``/``encoder_feature_lens``; always ``audio_segments``.

    With ``text_teacher_formatter`` (MTBI's KL term), also ``teacher_input_ids``/``teacher_loss_mask``:
    the same conversations with every audio turn replaced by the text it stands for.
    """

    def __init__(self, tokenizer, feature_cache: FeatureCache | None = None, text_teacher_formatter=None) -> None:
        super().__init__(tokenizer)
        self.feature_cache = feature_cache
        self.text_teacher_formatter = text_teacher_formatter

    def __getitem__(self, conversations: CutSet) -> dict:
        try:
            return self._batch(conversations)
        except InputError as e:  # (a damaged audio file, ...): one line at the command line, from a worker too
            if torch.utils.data.get_worker_info() is None:
                raise
            raise WorkerInputError.carrying(e) from e

    def _batch(self, conversations: CutSet) -> dict:
        conversations = list(conversations)
        sources, rows, segments = [], {}, []
        for conversation in conversations:
            for turn in conversation.turns:
                if isinstance(turn, AudioTurn):
                    source, start, end = source_utterance(turn.cut)
                    key = utterance_key(source)
                    if key not in rows:
                        rows[key] = len(sources)
                        sources.append(source)
                    segments.append((rows[key], start, end))
        batch = {
            "input_ids": left_collate_vectors([c.input_ids for c in conversations], padding_value=self.pad_id),
            "loss_mask": left_collate_vectors(
                [getattr(c, "mask", torch.empty(0)) for c in conversations], padding_value=0
            ).to(torch.bool),
            "audio_segments": torch.tensor(segments, dtype=torch.float64).reshape(-1, 3),
            "conversations": drop_in_memory_data(CutSet(conversations)),
        }
        if self.text_teacher_formatter is not None:
            teacher = [encode_messages(self.text_teacher_formatter, as_text_messages(c)) for c in conversations]
            batch["teacher_input_ids"] = left_collate_vectors([t["input_ids"] for t in teacher], padding_value=self.pad_id)
            batch["teacher_loss_mask"] = left_collate_vectors([t["mask"] for t in teacher], padding_value=0).to(torch.bool)
        if not sources:
            batch["audios"], batch["audio_lens"] = None, None
        elif self.feature_cache is not None:
            feats = [self.feature_cache.load(s) for s in sources]
            batch["encoder_feature_lens"] = torch.tensor([len(f) for f in feats])
            batch["encoder_features"] = torch.nn.utils.rnn.pad_sequence(feats, batch_first=True).transpose(1, 2)
        else:
            batch["audios"], batch["audio_lens"] = self._load(sources)
        return batch

    def _load(self, sources: list[Cut]) -> tuple[torch.Tensor, torch.Tensor]:
        failure = loaded = None
        try:
            audios, audio_lens, loaded = self.load_audio(CutSet(sources))
        except Exception as e:  # lhotse's collation of a batch where nothing decoded: "max() arg is an empty sequence"
            failure = e
        if loaded is None or len(loaded) != len(sources):  # it drops what does not decode (the checks read headers)
            for source in sources:  # by position: cut ids repeat across manifests that share a file name
                read_cut_audio(source)  # raises AudioError naming the file and why
            if failure is not None:  # every file decodes: not the audio's fault
                raise failure
            raise RuntimeError(f"lhotse dropped audio that decodes on its own from a batch: "
                               f"{[audio_source_name(s) for s in sources]}")
        return audios, audio_lens
