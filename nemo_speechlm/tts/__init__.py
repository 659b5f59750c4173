"""Offline text-to-speech with word alignments, text normalization and a synthetic corpus."""
from nemo_speechlm.tts.base import SpeechSynthesizer, Synthesis
from nemo_speechlm.tts.corpus import load_sentences, synthesize_corpus
from nemo_speechlm.tts.espeak import EspeakTTS, available_voices, speakers
from nemo_speechlm.tts.normalize import normalize_for_tts

__all__ = [
    "EspeakTTS",
    "SpeechSynthesizer",
    "Synthesis",
    "available_voices",
    "load_sentences",
    "normalize_for_tts",
    "speakers",
    "synthesize_corpus",
]
