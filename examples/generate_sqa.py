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
import argparse

from nemo_speechlm.data.manifest import SkipSummary
from nemo_speechlm.generation.chat_generator import build_chat_generator
from nemo_speechlm.generation.runner import run_resumable
from nemo_speechlm.generation.sqa import sqa_items, sqa_job, sqa_key
from nemo_speechlm.parts.offline_models import smollm2_gguf_path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, help="NeMo ASR manifest: audio_filepath, duration, text[, offset]")
    p.add_argument("--output", required=True, help="SQA manifest JSONL (appended to; reruns resume)")
    p.add_argument("--teacher", default=None, help="HF hub id, local HF directory or .gguf "
                   "(default: offline SmolLM2-135M-Instruct, which often writes weak questions; use a real LLM)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="e.g. bfloat16 on GPUs (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--skip-invalid", action="store_true", help="skip bad manifest lines and count them")
    args = p.parse_args(argv)

    skipped = SkipSummary()
    items = list(sqa_items(args.manifest, skip_invalid=args.skip_invalid, summary=skipped))
    kwargs = {"device": args.device, "dtype": args.dtype, "batch_size": args.batch_size} if args.backend == "hf" else {}
    generator = build_chat_generator(
        args.backend, model=args.teacher or smollm2_gguf_path(), do_sample=args.sample, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, **kwargs,
    )
    job = sqa_job(generator, args.max_new_tokens, args.system_prompt)
    summary = run_resumable(items, job, args.output, batch_size=args.batch_size, desc="Generating SQA", key=sqa_key)
    print(summary)
    if skipped.total:
        print(f"Skipped manifest lines: {skipped}")


if __name__ == "__main__":
    main()
