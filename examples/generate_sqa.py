"""Generate speech QA data (VoiceTextBlender): an LLM writes a question and its answer for each transcript.

    python examples/generate_sqa.py --manifest train.jsonl --output sqa.jsonl \
        --teacher google/gemma-2-2b-it --batch-size 32

Input: a NeMo ASR manifest (``audio_filepath``, ``duration``, ``text``[, ``offset``]).
Output: one SQA line per utterance, pointing at the same audio: the input's fields with
``text`` moved to ``original_text``, plus ``question``, ``answer`` and ``teacher`` (model and
decoding settings). Outputs that are not a JSON question/answer pair, or that say ``none``
(meaningless text), go to ``<output>.rejected.jsonl`` and are counted in
``<output>.summary.json``. Rerun the same command after a crash or Ctrl-C to continue.
"""

from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.datagen.chat_generator import add_teacher_arguments, teacher_from_arguments
from nemo_speechlm.datagen.sqa import sqa_items, sqa_job, sqa_key
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, CommandParser, run_cli
from nemo_speechlm.parts.runner import run_resumable


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--manifest", required=True, help="NeMo ASR manifest: audio_filepath, duration, text[, offset]")
    p.add_argument("--output", required=True, help="SQA manifest JSONL (appended to; reruns resume)")
    add_teacher_arguments(p, teacher_help="; SmolLM2 often writes weak questions: use a real LLM")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad manifest lines and count them")
    args = p.parse_args(argv)

    skipped = SkipSummary()
    items = list(sqa_items(args.manifest, skip_invalid=args.skip_invalid, summary=skipped, output_path=args.output))
    generator = teacher_from_arguments(args)
    job = sqa_job(generator, args.max_new_tokens, args.system_prompt)
    summary = run_resumable(items, job, args.output, batch_size=args.batch_size, desc="Generating SQA", key=sqa_key)
    print(summary)
    if skipped.total:
        print(f"Skipped manifest lines: {skipped}")


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
