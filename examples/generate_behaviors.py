"""Generate MTBI behaviors: the text LLM answers each transcript under the catalog's training prompts.

    python examples/generate_behaviors.py --manifest train.jsonl --output behaviors.jsonl \
        --teacher Qwen/Qwen2.5-1.5B-Instruct --tasks-per-utterance 4 --prompts-per-task 1

Writes one JSON line per (utterance, task, prompt): the manifest fields plus ``task``,
``prompt``, ``prompt_id``, ``split``, ``response`` and ``teacher`` (model and decoding
settings). Rerun the same command after a crash or Ctrl-C to continue; degenerate
answers go to ``<output>.rejected.jsonl`` and are counted in ``<output>.summary.json``.
"""

from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.datagen.behaviors import behavior_items, behavior_job, check_ground_truth_tasks
from nemo_speechlm.datagen.chat_generator import add_teacher_arguments, teacher_from_arguments
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli, SKIP_FLAG_HINT
from nemo_speechlm.parts.runner import run_resumable


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--manifest", required=True, help="NeMo manifest: audio_filepath, duration, text[, offset, words]")
    p.add_argument("--output", required=True, help="behaviors JSONL (appended to; reruns resume)")
    p.add_argument("--catalog", default=None, help="task catalog YAML (default: nemo_speechlm/conf/mtbi/tasks.yaml)")
    p.add_argument("--tasks", nargs="*", default=None, help="only these training tasks")
    p.add_argument("--tasks-per-utterance", type=positive_int, default=4,
                   help="training tasks drawn per utterance (at most the catalog's, or --tasks', count)")
    p.add_argument("--prompts-per-task", type=positive_int, default=1)
    p.add_argument("--ground-truth-tasks", nargs="*", default=[], help="tasks whose response is their ground truth "
                   "field instead of the LLM's answer (e.g. repeat)")
    add_teacher_arguments(p, teacher_help="; use the LLM the speech model will decode with")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad manifest lines and count them")
    args = p.parse_args(argv)

    catalog = TaskCatalog.load(args.catalog)
    if args.tasks:
        catalog = catalog.select(args.tasks)
    skipped = SkipSummary()
    items = list(behavior_items(args.manifest, catalog, args.tasks_per_utterance, args.prompts_per_task,
                                seed=args.seed, skip_invalid=args.skip_invalid, summary=skipped,
                                output_path=args.output))
    check_ground_truth_tasks(catalog, args.ground_truth_tasks)  # before the teacher loads
    generator = teacher_from_arguments(args)
    job = behavior_job(generator, catalog, args.max_new_tokens, args.system_prompt, tuple(args.ground_truth_tasks))
    summary = run_resumable(items, job, args.output, batch_size=args.batch_size, desc="Generating behaviors")
    print(summary)
    if skipped.total:
        print(f"Skipped manifest lines: {skipped}")


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
