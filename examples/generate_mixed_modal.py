"""Generate mixed-modal conversations (VoiceTextBlender): part of each text instruction becomes speech.

    python examples/generate_mixed_modal.py --input text_sft.jsonl --output mixed_modal.jsonl \
        --audio-dir mixed_modal_wavs [--tts fastpitch --device cuda]

Input: text SFT conversations in our format (``examples/prepare_text_sft.py`` converts
ShareGPT / OpenAI / Alpaca; those formats are also read directly). For each conversation a
random run of sentences of the first user turn is spoken by a random speaker (16 kHz wav in
``--audio-dir``) and replaced by the locator tag. Output lines: ``id``, ``conversations``
(the user turn holds the locator), ``audio_filepath``, ``duration``, ``spoken_text``
(normalized text of the audio), ``speaker`` (and ``system`` when given). Unusable
conversations go to ``<output>.rejected.jsonl`` and are counted in ``<output>.summary.json``.
Rerun the same command to resume; the same ``--seed`` makes the same choices.

TTS backends: ``espeak`` (offline; every ``--voices`` x ``--rates`` combination is a speaker)
or ``fastpitch`` (NeMo FastPitch + HiFi-GAN; needs ``nemo_toolkit[tts]`` and the checkpoints;
``--speaker-ids`` picks speakers of a multi-speaker model).
"""

from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.datagen.mixed_modal import DEFAULT_LOCATOR, SAMPLE_RATE, mixed_modal_items, mixed_modal_job
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli, SKIP_FLAG_HINT
from nemo_speechlm.parts.runner import run_resumable
from nemo_speechlm.tts.espeak import DEFAULT_RATES, DEFAULT_VOICES, speakers


def build_speakers(args) -> list:
    """The speakers to pick from at random, for the chosen backend."""
    if args.tts == "espeak":
        return speakers(args.voices, args.rates, sample_rate=SAMPLE_RATE)
    from nemo_speechlm.tts.fastpitch import FastPitchTTS

    ids = args.speaker_ids or [None]
    return [FastPitchTTS(args.fastpitch, args.vocoder, device=args.device, speaker=i, sample_rate=SAMPLE_RATE)
            for i in ids]


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--input", required=True, help="text SFT conversations (JSONL or JSON array)")
    p.add_argument("--output", required=True, help="mixed-modal manifest JSONL (appended to; reruns resume)")
    p.add_argument("--audio-dir", required=True, help="where the wavs go (16 kHz, 16-bit)")
    p.add_argument("--tts", choices=["espeak", "fastpitch"], default="espeak")
    p.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES), help="espeak voices")
    p.add_argument("--rates", nargs="+", type=positive_int, default=list(DEFAULT_RATES), help="espeak rates (words/minute)")
    p.add_argument("--fastpitch", default="tts_en_fastpitch", help="FastPitch pretrained name or .nemo")
    p.add_argument("--vocoder", default="tts_en_hifigan", help="HiFi-GAN pretrained name or .nemo")
    p.add_argument("--speaker-ids", nargs="*", type=int, default=None, help="speakers of a multi-speaker FastPitch")
    p.add_argument("--device", default="cpu", help="FastPitch device")
    p.add_argument("--audio-locator-tag", default=DEFAULT_LOCATOR)
    p.add_argument("--max-spoken-words", type=positive_int, default=100, help="longest run of sentences to speak")
    p.add_argument("--batch-size", type=positive_int, default=32, help="conversations per write to the output")
    p.add_argument("--seed", type=int, default=0, help="speaker and sentence choice (per conversation id)")
    p.add_argument("--skip-invalid", action="store_true", help="skip lines that are not JSON objects, and repeated ids")
    args = p.parse_args(argv)

    skipped = SkipSummary()
    items = list(mixed_modal_items(args.input, skip_invalid=args.skip_invalid, summary=skipped))
    # what the lines depend on: resuming an output made with other voices, locator or span limit is refused
    voices = ({"voices": args.voices, "rates": args.rates} if args.tts == "espeak"
              else {"fastpitch": args.fastpitch, "vocoder": args.vocoder, "speaker_ids": args.speaker_ids})
    job = mixed_modal_job(build_speakers(args), args.audio_dir, seed=args.seed, audio_locator_tag=args.audio_locator_tag,
                          max_spoken_words=args.max_spoken_words, sample_rate=SAMPLE_RATE,
                          settings={"tts": args.tts, **voices})
    summary = run_resumable(items, job, args.output, batch_size=args.batch_size, desc="Generating mixed-modal",
                            key="id")
    print(summary)
    if skipped.total:
        print(f"Skipped input lines: {skipped}")


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
