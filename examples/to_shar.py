"""Convert a manifest (plain, MTBI behaviors, joint ASR/AST or SQA) to Lhotse Shar for training at scale.

    python examples/to_shar.py --manifest demo_out/behaviors.jsonl --output shar/behaviors --shard-size 1000

Every audio file is checked once, here (exists, readable, duration matches); the Shar shards hold
each line's audio segment and all its other fields. Train from it by giving a data input
``shar_path: shar/behaviors`` in place of ``manifest_filepath``. Rerun the same command after a
crash or Ctrl-C to continue at the first unfinished shard; ``--skip-invalid`` skips and counts bad
lines instead of stopping at the first. Mixed-modal lines (several audios) stay JSONL.
"""
import json

from nemo_speechlm.datagen.shar import AUDIO_FORMATS, write_shar
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli, SKIP_FLAG_HINT


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--manifest", required=True, help="JSONL manifest: audio_filepath, duration[, offset] and any other fields")
    p.add_argument("--output", required=True, help="Shar directory (created; reruns resume)")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="lines per shard")
    p.add_argument("--audio-format", choices=AUDIO_FORMATS, default="flac", help="how the audio is stored (both lossless)")
    p.add_argument("--skip-invalid", action="store_true", help="skip and count invalid lines instead of stopping")
    args = p.parse_args(argv)
    counts = write_shar(args.manifest, args.output, shard_size=args.shard_size, audio_format=args.audio_format,
                        skip_invalid=args.skip_invalid)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
