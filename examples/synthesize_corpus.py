"""Speak English sentences with several espeak-ng speakers and write NeMo manifests.

    python examples/synthesize_corpus.py --out-dir data/espeak --num-sentences 600 --heldout 0.05

Reruns reuse finished wav files, so an interrupted run just continues.
"""
from __future__ import annotations

import logging
from pathlib import Path

from nemo_speechlm.data.manifest import decode_line
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli
from nemo_speechlm.tts import load_sentences, speakers, synthesize_corpus
from nemo_speechlm.tts.espeak import DEFAULT_RATES, DEFAULT_VOICES


def parse_heldout(value: str) -> int | float:
    """"20" is a count, "0.05" a fraction."""
    return float(value) if any(c in value for c in ".eE") else int(value)


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--out-dir", type=Path, required=True, help="wavs/ and the two manifests go here")
    parser.add_argument("--num-sentences", type=positive_int, default=None, help="use only the first N sentences")
    parser.add_argument("--heldout", type=parse_heldout, default=0.05, help="held-out count (int) or fraction (float)")
    parser.add_argument("--voices", nargs="+", default=list(DEFAULT_VOICES), help="espeak voices, e.g. en-us en-gb+f2")
    parser.add_argument("--rates", nargs="+", type=positive_int, default=list(DEFAULT_RATES), help="speaking rates in words/min")
    parser.add_argument("--seed", type=int, default=0, help="picks speakers and the held-out sentences")
    parser.add_argument("--sample-rate", type=positive_int, default=16000)
    parser.add_argument("--sentences", type=Path, default=None, help="one sentence a line (default: shipped list)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.sentences is not None:
        raw_lines = args.sentences.read_bytes().splitlines()
        lines = [decode_line(args.sentences, i, raw) for i, raw in enumerate(raw_lines, start=1)]
        sentences = [line.strip() for line in lines if line.strip()]
    else:
        sentences = load_sentences()
    if args.num_sentences is not None:
        if args.num_sentences > len(sentences):
            parser.error(f"--num-sentences {args.num_sentences} but only {len(sentences)} sentences are available")
        sentences = sentences[: args.num_sentences]

    voices = speakers(args.voices, args.rates, sample_rate=args.sample_rate)
    train, heldout = synthesize_corpus(
        sentences, args.out_dir, voices, heldout=args.heldout, seed=args.seed, sample_rate=args.sample_rate
    )
    for path in (train, heldout):
        with open(path, encoding="utf-8") as f:
            print(f"{path}\t{sum(1 for _ in f)} utterances")


if __name__ == "__main__":
    run_cli(main)
