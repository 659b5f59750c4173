"""espeak-ng through ctypes: offline speech with exact word alignments.

The PyPI package ``espeakng-loader`` ships ``libespeak-ng.so`` and its data, so this
works with no system install and no network. espeak reports a word event (character
position in the text + sample offset) at the start of every word it speaks; those
events are the alignments. The library is one process-global engine (one voice, one
rate at a time), so every call goes through one lock and sets its own voice and rate.

espeak carries a little state from one utterance to the next (its waveform phase; not reset
even by re-initializing), so the same text can come out a few samples longer or shorter on a
second call. Its voicing and breath noise come from libc's ``rand()``, which anything else in the
process may draw from too: every call seeds it (and espeak's own generator) from its voice, rate
and text, so a process making the same calls in the same order gets identical audio. Unseeded, 198
of the demo's first 800 clips differed between two runs of the same corpus synthesis, which
changed every number the demo trains and measures; seeded, 0 of 4,880.
"""
from __future__ import annotations

import bisect
import ctypes
import ctypes.util
import math
import re
import threading
import zlib
from typing import Sequence

import numpy as np

from nemo_speechlm.tts.base import Synthesis
from nemo_speechlm.tts.normalize import normalize_for_tts

__all__ = ["EspeakTTS", "available_voices", "speakers", "DEFAULT_VOICES", "DEFAULT_RATES"]

# Distinct-sounding English speakers that exist in the data shipped by espeakng-loader 0.2.4.
DEFAULT_VOICES = ("en-us", "en-us+f3", "en-gb", "en-gb-x-rp+f2", "en-gb-scotland+m3", "en-029+f4")
DEFAULT_RATES = (140, 175, 210)
MIN_RATE, MAX_RATE = 80, 450  # words per minute accepted by espeakRATE

# speak_lib.h constants
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EVENT_LIST_TERMINATED = 0
_EVENT_WORD = 1
_PARAM_RATE = 1
_EE_OK = 0

_SILENCE_REL_DB = -36.0  # a 10 ms frame this far below the loudest frame counts as silence
_FRAME_S = 0.010
_WORD_PAD_S = 0.010  # keep a little context around each word's voiced part
_TAIL_PAD_S = 0.100  # silence kept after the last word


_LOCK = threading.RLock()  # libespeak-ng is one global engine per process


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based character position
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # ms
        ("sample", ctypes.c_int),  # samples since the start of this synthesis
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),
    ]


class _Voice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, name, NUL)* then NUL
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


class _Engine:
    """The process-wide libespeak-ng: loaded and initialized once, used under ``_LOCK``."""

    def __init__(self) -> None:
        try:
            import espeakng_loader
        except ImportError as e:
            raise ImportError(
                "EspeakTTS needs the PyPI package 'espeakng-loader' (libespeak-ng + data): "
                "pip install --no-deps espeakng-loader==0.2.4"
            ) from e
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
            ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]
        lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_Voice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
        data_path = espeakng_loader.get_data_path()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed (returned {rate}) with data path {data_path}")
        self.lib, self.native_rate = lib, rate
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self._chunks: list[np.ndarray] = []
        self._words: list[tuple[int, int]] = []  # (0-based char position, sample)
        self._callback = _SynthCallback(self._on_audio)  # keep a reference: espeak holds a raw pointer
        lib.espeak_SetSynthCallback(self._callback)
        self.voices, self.variants = self._list_voices()

    def _on_audio(self, wav, num_samples: int, events) -> int:
        if num_samples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_WORD:
                self._words.append((events[i].text_position - 1, events[i].sample))
            i += 1
        return 0  # 0 = continue

    def _list_voices(self) -> tuple[dict[str, str], dict[str, str]]:
        """Lower-cased language codes / names / file names -> identifier, and variant names."""
        voices: dict[str, str] = {}
        keys_later: list[tuple[str, str]] = []
        table = self.lib.espeak_ListVoices(None)
        i = 0
        while table[i]:
            v = table[i].contents
            ident = v.identifier.decode()
            langs = _parse_languages(v.languages)
            if langs:
                voices.setdefault(langs[0], ident)  # a voice's own language first
            keys_later += [(k, ident) for k in (*langs[1:], ident.lower(), ident.rsplit("/", 1)[-1].lower(),
                                                 v.name.decode().lower())]
            i += 1
        for key, ident in keys_later:
            voices.setdefault(key, ident)
        variants: dict[str, str] = {}
        variant_lang = ctypes.c_char_p(b"variant")  # named: espeak reads it during the call
        spec = _Voice(languages=ctypes.cast(variant_lang, ctypes.c_void_p))
        table = self.lib.espeak_ListVoices(ctypes.byref(spec))
        i = 0
        while table[i]:
            name = table[i].contents.identifier.decode().rsplit("/", 1)[-1]
            variants[name.lower()] = name
            i += 1
        return voices, variants

    def synthesize(self, voice_id: str, rate: int, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """int16 audio at ``native_rate`` and the word events of one utterance."""
        with _LOCK:  # voice, rate and the callback buffers are global
            return self._synthesize_locked(voice_id, rate, text)

    def _synthesize_locked(self, voice_id: str, rate: int, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        err = self.lib.espeak_SetVoiceByName(voice_id.encode())
        if err != _EE_OK:
            raise RuntimeError(f"espeak_SetVoiceByName({voice_id!r}) failed with error {err}")
        self.lib.espeak_SetParameter(_PARAM_RATE, rate, 0)
        seed = zlib.crc32(f"{voice_id}|{rate}|{text}".encode())
        self.lib.espeak_ng_SetRandSeed(seed)
        self.libc.srand(seed)
        self._chunks, self._words = [], []
        data = text.encode("utf-8")
        err = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with error {err} on text {text[:80]!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        return audio, self._words


def _parse_languages(ptr: int | None) -> list[str]:
    langs, offset = [], 0
    while ptr:
        if ctypes.string_at(ptr + offset, 1) == b"\0":  # priority byte 0 ends the list
            break
        name = ctypes.string_at(ptr + offset + 1).decode()
        langs.append(name.lower())
        offset += len(name) + 2
    return langs


_ENGINE: _Engine | None = None


def _engine() -> _Engine:
    global _ENGINE
    with _LOCK:
        if _ENGINE is None:
            _ENGINE = _Engine()
        return _ENGINE


def available_voices() -> tuple[list[str], list[str]]:
    """(language voices, variants) accepted by ``EspeakTTS(voice="<voice>[+<variant>]")``."""
    engine = _engine()
    return sorted(engine.voices), sorted(engine.variants)


def _resolve_voice(voice: str) -> str:
    """"en-gb-x-rp+f2" -> "gmw/en-GB-x-rp+f2"; unknown names fail listing what exists."""
    engine = _engine()
    base, _, variant = voice.strip().partition("+")
    ident = engine.voices.get(base.lower())
    if ident is None:
        english = sorted(k for k in engine.voices if k.startswith("en-") and "/" not in k)
        raise ValueError(
            f"unknown espeak voice {base!r} in {voice!r}; available English voices: {', '.join(english)} "
            f"({len(engine.voices)} names in all, see nemo_speechlm.tts.available_voices())"
        )
    if not variant:
        return ident
    if variant.lower() not in engine.variants:
        some = ", ".join(sorted(engine.variants)[:12])
        raise ValueError(f"unknown espeak variant {variant!r} in {voice!r}; available variants include: {some}, ...")
    return f"{ident}+{engine.variants[variant.lower()]}"


class EspeakTTS:
    """One espeak-ng speaker (voice + rate) producing audio at ``sample_rate`` with word times.

    ``normalize=True`` expands digits, currency and abbreviations first
    (:func:`normalize_for_tts`); ``Synthesis.text`` is the text actually spoken.
    """

    def __init__(self, voice: str = "en-us", rate: int = 175, sample_rate: int = 16000, normalize: bool = True):
        if not MIN_RATE <= int(rate) <= MAX_RATE:
            raise ValueError(f"EspeakTTS rate must be {MIN_RATE}..{MAX_RATE} words per minute, got {rate}")
        if int(sample_rate) <= 0:
            raise ValueError(f"EspeakTTS sample_rate must be positive, got {sample_rate}")
        self.voice = voice.strip().lower()
        self.rate = int(rate)
        self.sample_rate = int(sample_rate)
        self.normalize = normalize
        self._voice_id = _resolve_voice(self.voice)
        self.speaker = f"{self.voice}@{self.rate}"

    def __repr__(self) -> str:
        return f"EspeakTTS(voice={self.voice!r}, rate={self.rate}, sample_rate={self.sample_rate})"

    def synthesize(self, text: str) -> Synthesis:
        """Speak ``text``; one word alignment per whitespace token of the spoken text."""
        if not isinstance(text, str):
            raise TypeError(f"EspeakTTS.synthesize expects a str, got {type(text).__name__}")
        spoken = normalize_for_tts(text) if self.normalize else " ".join(text.split())
        if not any(c.isalnum() for c in spoken):
            raise ValueError(f"EspeakTTS.synthesize got no speakable text: {text!r} (normalized: {spoken!r})")
        engine = _engine()
        raw, events = engine.synthesize(self._voice_id, self.rate, spoken)
        if raw.size == 0:
            raise RuntimeError(f"espeak produced no audio for {spoken!r} with voice {self.voice!r}")
        audio = _resample(raw.astype(np.float32) / 32768.0, engine.native_rate, self.sample_rate)
        scale = self.sample_rate / engine.native_rate
        tokens = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", spoken)]
        starts = _token_starts(tokens, [(pos, round(s * scale)) for pos, s in events], len(audio))
        spans, end_of_speech = _refine_spans(audio, self.sample_rate, starts)
        audio = audio[: min(len(audio), end_of_speech + round(_TAIL_PAD_S * self.sample_rate))]
        sr = self.sample_rate
        words = [
            {"word": tok[2], "start": _seconds(s, sr), "end": _seconds(e, sr)} for tok, (s, e) in zip(tokens, spans)
        ]
        return Synthesis(audio=audio, sample_rate=sr, words=words, text=spoken, speaker=self.speaker)


def _seconds(sample: int, sr: int) -> float:
    """Rounded down to 0.1 ms, so a word never ends after the audio does."""
    return round(math.floor(sample * 10000 / sr) / 10000, 4)


def _resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    if orig_sr == target_sr:
        return audio.astype(np.float32)
    import soxr

    return soxr.resample(audio, orig_sr, target_sr).astype(np.float32)


def _token_starts(tokens: list[tuple[int, int, str]], events: list[tuple[int, int]], num_samples: int) -> list[int]:
    """Start sample of each token: its first word event; tokens espeak merged share a span by length."""
    token_starts_chars = [t[0] for t in tokens]
    starts: list[int | None] = [None] * len(tokens)
    for pos, sample in events:
        i = bisect.bisect_right(token_starts_chars, pos) - 1
        if i < 0 or pos >= tokens[i][1]:  # event between tokens: it belongs to the next one
            i += 1
        if 0 <= i < len(tokens) and (starts[i] is None or sample < starts[i]):
            starts[i] = min(max(sample, 0), num_samples)
    if starts[0] is None:
        starts[0] = 0
    i = 0
    while i < len(tokens):  # split the span of a token followed by event-less tokens
        j = i + 1
        while j < len(tokens) and starts[j] is None:
            j += 1
        if j > i + 1:
            stop = starts[j] if j < len(tokens) else num_samples
            lengths = np.array([len(tokens[k][2]) for k in range(i, j)], dtype=float)
            edges = starts[i] + (stop - starts[i]) * np.concatenate([[0], np.cumsum(lengths)]) / lengths.sum()
            for k in range(i + 1, j):
                starts[k] = int(round(edges[k - i]))
        i = j
    out, prev = [], 0
    for s in starts:  # espeak's events are monotone; enforce it anyway
        prev = max(prev, int(s))
        out.append(prev)
    return out


def _refine_spans(audio: np.ndarray, sr: int, starts: list[int]) -> tuple[list[tuple[int, int]], int]:
    """Shrink each [start_i, start_{i+1}) to its voiced part (pauses after commas belong to no word).

    Returns the word spans in samples and the end of the last voiced frame.
    """
    frame = max(1, round(_FRAME_S * sr))
    n_frames = -(-len(audio) // frame)
    padded = np.zeros(n_frames * frame, np.float32)
    padded[: len(audio)] = audio
    rms = np.sqrt(np.mean(padded.reshape(n_frames, frame) ** 2, axis=1))
    active = rms > max(rms.max() * 10 ** (_SILENCE_REL_DB / 20), 1e-5)
    pad = round(_WORD_PAD_S * sr)
    bounds = [*starts, len(audio)]
    spans = []
    for i in range(len(starts)):
        lo, hi = bounds[i], bounds[i + 1]
        f_lo, f_hi = -(-lo // frame), hi // frame  # frames wholly inside the span
        idx = np.flatnonzero(active[f_lo:f_hi]) if f_hi > f_lo else np.zeros(0, int)
        if idx.size == 0:  # too short to judge: keep espeak's span
            spans.append((lo, hi if i + 1 < len(starts) else min(hi, lo + pad)))
            continue
        first = lo if idx[0] == 0 else (f_lo + int(idx[0])) * frame - pad
        last = hi if f_lo + int(idx[-1]) + 1 == f_hi else (f_lo + int(idx[-1]) + 1) * frame + pad
        spans.append((max(lo, first), min(hi, last)))
    voiced = np.flatnonzero(active)
    end_of_speech = min(len(audio), (int(voiced[-1]) + 1) * frame) if voiced.size else len(audio)
    end_of_speech = max(end_of_speech, spans[-1][1])
    return spans, end_of_speech


def speakers(
    voices: Sequence[str] = DEFAULT_VOICES, rates: Sequence[int] = DEFAULT_RATES, sample_rate: int = 16000
) -> list[EspeakTTS]:
    """Every voice x rate as a named speaker ("en-gb+f2@140"), for picking random speakers."""
    out = [EspeakTTS(voice, rate, sample_rate) for voice in voices for rate in rates]
    names = [s.speaker for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"speakers(): duplicate voice/rate combinations in {names}")
    return out
