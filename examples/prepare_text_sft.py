"""Convert text SFT data (ShareGPT, OpenAI messages, Alpaca) into our conversation JSONL.

    python examples/prepare_text_sft.py --inputs sharegpt.jsonl alpaca_data.json --output text_sft.jsonl

Each input is JSONL or one JSON array; formats may be mixed, even within a file. Output
lines: ``{"conversations": [{"from": "User"|"Assistant", "value"}, ...]}`` plus ``system``
and ``id`` when the input has them. A record with an unknown role, an empty turn, turns
that do not alternate user/assistant or no final assistant turn stops the conversion with
an error naming the file, the line (the record's position in a JSON array) and the field;
``--skip-invalid`` skips such records and counts them instead.
"""
from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.data.text_sft import prepare_text_sft
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, CommandParser, run_cli


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--inputs", nargs="+", required=True, help="JSONL or JSON array files in any accepted format")
    p.add_argument("--output", required=True, help="our conversation JSONL (overwritten)")
    p.add_argument("--skip-invalid", action="store_true", help="skip unusable records and count them")
    args = p.parse_args(argv)

    skipped = SkipSummary()
    count = prepare_text_sft(args.inputs, args.output, skip_invalid=args.skip_invalid, summary=skipped)
    print(f"Wrote {count} conversations to {args.output}")
    if skipped.total:
        print(f"Skipped records: {skipped}")


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
