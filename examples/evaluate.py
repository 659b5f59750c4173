"""Evaluate speech LLMs (``.nemo``): the prompt/task generalization benchmark and standard evaluations.

    python examples/evaluate.py benchmark --model mtbi=mtbi.nemo --model sft=sft.nemo \
        --manifest heldout.jsonl --out-dir eval/ [--asr-model stt_en_fastconformer_ctc_large]
    python examples/evaluate.py asr --model m.nemo --manifest test.jsonl --out-dir eval/
    python examples/evaluate.py ast | sqa | text-retention ...
    python examples/evaluate.py listening --model m.nemo --manifest heldout.jsonl --train-manifest train.jsonl --out-dir eval/

Every mode but ``listening`` writes per-item predictions (JSONL, resumable: rerun to continue) and a metrics
JSON; the benchmark also writes results.md (tables per split and task) and splits.png; ``listening`` writes
listening.json and listening.md (one pass, not resumed). A bad file or
argument ends the command with one line on stderr and exit code 2 (``--debug`` shows the traceback).
"""
import sys

from nemo_speechlm.evaluation import benchmark, listening, standard
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, CommandParser, run_cli


def main(argv=None) -> dict:
    parser = CommandParser(description=__doc__)
    modes = parser.add_subparsers(dest="mode", required=True)
    benchmark.add_arguments(modes.add_parser(
        "benchmark", help="prompt/task generalization vs. the text LLM on the transcript (MTBI's question)"))
    standard.add_arguments(modes)
    listening.add_arguments(modes.add_parser(
        "listening", help="does the model use the audio? text oracle, zero and shuffled audio, training subset"))
    args = parser.parse_args(argv)
    if args.mode == "listening":
        return listening.main(args)
    return standard.main(args) if args.mode in standard.MODES else benchmark.main(args)


if __name__ == "__main__":
    mode = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), None)
    run_cli(main, skip_hint=SKIP_FLAG_HINT if mode in standard.MODES else None)  # the modes with --skip-invalid
