"""Generate MTBI behaviors: the text LLM answers each transcript under the catalog's training prompts.

    python examples/generate_behaviors.py --manifest train.jsonl --output behaviors.jsonl \
        --teacher Qwen/Qwen2.5-1.5B-Instruct --tasks-per-utterance 4 --prompts-per-task 1

Writes one JSON line per (utterance, task, prompt): the manifest fields plus ``task``,
``prompt``, ``prompt_id``, ``split``, ``response`` and ``teacher`` (model and decoding
settings). Rerun the same command after a crash or Ctrl-C to continue; degenerate
answers go to ``<output>.rejected.jsonl`` and are counted in ``<output>.summary.json``.
"""
import argparse

from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.generation.behaviors import behavior_items, behavior_job
from nemo_speechlm.generation.chat_generator import build_chat_generator
from nemo_speechlm.generation.runner import run_resumable
from nemo_speechlm.parts.offline_models import smollm2_gguf_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="NeMo manifest: audio_filepath, duration, text[, offset, words]")
    p.add_argument("--output", required=True, help="behaviors JSONL (appended to; reruns resume)")
    p.add_argument("--teacher", default=None, help="HF hub id, local HF directory or .gguf (default: offline SmolLM2-135M-Instruct); "
                   "use the LLM the speech model will decode with")
    p.add_argument("--catalog", default=None, help="task catalog YAML (default: conf/mtbi/tasks.yaml)")
    p.add_argument("--tasks", nargs="*", default=None, help="only these training tasks")
    p.add_argument("--tasks-per-utterance", type=int, default=4)
    p.add_argument("--prompts-per-task", type=int, default=1)
    p.add_argument("--ground-truth-tasks", nargs="*", default=[], help="tasks whose response is their ground truth "
                   "field instead of the LLM's answer (e.g. repeat)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="cap per answer (tasks may set a lower one)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 on GPUs (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="prompt choice per utterance (and sampling)")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad manifest lines and count them")
    args = p.parse_args(argv)

    catalog = TaskCatalog.load(args.catalog)
    if args.tasks:
        catalog = catalog.select(args.tasks)
    skipped = SkipSummary()
    items = list(behavior_items(args.manifest, catalog, args.tasks_per_utterance, args.prompts_per_task,
                                seed=args.seed, skip_invalid=args.skip_invalid, summary=skipped))
    kwargs = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size} if args.backend == "hf" else {}
    generator = build_chat_generator(
        args.backend, model=args.teacher or smollm2_gguf_path(), do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, **kwargs,
    )
    job = behavior_job(generator, catalog, args.max_new_tokens, args.system_prompt, tuple(args.ground_truth_tasks))
    summary = run_resumable(items, job, args.output, batch_size=args.batch_size, desc="Generating behaviors")
    print(summary)
    if skipped.total:
        print(f"Skipped manifest lines: {skipped}")


if __name__ == "__main__":
    main()
