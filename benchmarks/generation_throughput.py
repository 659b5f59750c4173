"""Generation throughput, one answer at a time vs batched: the speech LLM and the text LLM behaviors.

    python benchmarks/generation_throughput.py [--tiny] [--items 32] [--batch-size 16] [--max-new-tokens 48]
        [--threads N] [--part speech|text|both] [--nemo model.nemo] [--config-name speechlm] [hydra overrides ...]

The same items go through both settings: utterance i spoken by espeak-ng (``--tiny``: synthetic
wavs) with a training prompt of the task catalog, capped at its task's ``max_new_tokens`` (and
``--max-new-tokens``).

* **speech**: ``SpeechLMModel.respond`` (audio encoding included) on the config's model, by
  default the demo's parts (Whisper tiny.en, stack 4, SmolLM2-135M-Instruct) with an untrained
  connector, or a trained ``--nemo``;
* **text**: ``HFChatGenerator`` on the same LLM answering the transcripts, as behavior generation does.

Prints answers/s and tokens/s (answer tokens, counted by re-tokenizing the answers) for batch 1
and ``--batch-size``, their ratio, and how many batched answers equal the one-at-a-time ones
(greedy: all of them, up to floating-point ties). Last line: ``RESULT {json}``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import nemo_speechlm  # noqa: F401  (resolvers, target allow-list)
from nemo_speechlm.data.task_catalog import TaskCatalog
from nemo_speechlm.datagen.chat_generator import HFChatGenerator
from nemo_speechlm.models import SpeechLMModel
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for tests.tiny_assets
from tests.tiny_assets import make_tiny_llm, make_wav_manifest  # noqa: E402
from train_throughput import compose_config, machine_info

Answerer = Callable[[int, int | None], list[str]]  # (batch size, cap override) -> answers, in item order


def parse_args() -> argparse.Namespace:
    """CLI flags; positional arguments are Hydra overrides of the speech model's config."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="speechlm")
    p.add_argument("--nemo", default=None, help="a trained .nemo instead of a model built from the config")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + conformer, synthetic wavs (smoke test)")
    p.add_argument("--items", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=48, help="cap on every answer (tasks may cap lower)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); on a "
                   "shared machine 1 thread gives steadier numbers")
    p.add_argument("--device", default="cpu", help="cpu or cuda (both models)")
    p.add_argument("--part", choices=["speech", "text", "both"], default="both")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.perception.encoder.pad_to_window=false")
    args = p.parse_intermixed_args()
    if args.items < 1 or args.batch_size < 1 or args.max_new_tokens < 1:
        p.error("--items, --batch-size and --max-new-tokens must be >= 1")
    return args


def load_model(args: argparse.Namespace, root: Path) -> SpeechLMModel:
    """The speech LLM: ``--nemo``, or built from the config (tiny parts with ``--tiny``)."""
    if args.nemo:
        return SpeechLMModel.restore_from(args.nemo, map_location="cpu")
    if args.tiny:
        parts = ["encoder=conformer_tiny", "llm=hf", f"model.pretrained_llm={make_tiny_llm(root / 'llm')}",
                 "model.perception.modality_adapter.hidden_dim=64"]
    else:
        parts = ["encoder=whisper_tiny_en", "model.perception.modality_adapter.stack=4"]
    overrides = parts + list(args.overrides)
    cfg = compose_config(args.config_name, overrides)
    torch.manual_seed(cfg.get("seed", 0))
    return SpeechLMModel(cfg.model)


def make_items(n: int, tiny: bool, sample_rate: int, max_new_tokens: int, root: Path) -> list[dict]:
    """``n`` utterances (transcript + waveform), each with a catalog training prompt and its task's cap."""
    if tiny:
        manifest = make_wav_manifest(root / "data", n=n, sample_rate=sample_rate)
        speech = [(json.loads(line)["text"], json.loads(line)["audio_filepath"]) for line in manifest.read_text().splitlines()]
    else:
        from nemo_speechlm.tts.corpus import load_sentences
        from nemo_speechlm.tts.espeak import EspeakTTS

        tts = EspeakTTS(sample_rate=sample_rate)
        speech = [(s.text, s.audio) for s in (tts.synthesize(text) for text in load_sentences()[:n])]
    catalog = TaskCatalog.load()
    prompts = catalog.training_prompts()
    items = []
    for i, (text, audio) in enumerate(speech):
        prompt = prompts[(i * 7) % len(prompts)]  # a spread of tasks and wordings
        cap = min(max_new_tokens, catalog.task(prompt.task).max_new_tokens or max_new_tokens)
        items.append({"text": text, "audio": audio, "prompt": prompt, "cap": cap})
    return items


def speech_answerer(model: SpeechLMModel, items: list[dict]) -> Answerer:
    """Speech LLM answers: the prompt with the audio in place of ``{input}``."""
    prompts = [it["prompt"].render(model.audio_locator_tag) for it in items]
    return lambda batch_size, cap=None: model.respond([it["audio"] for it in items], prompts, batch_size=batch_size,
                                                      max_new_tokens=cap or [it["cap"] for it in items])


def text_answerer(generator: HFChatGenerator, items: list[dict]) -> Answerer:
    """Text LLM behaviors: the prompt with the transcript in place of ``{input}``."""
    conversations = [[{"role": "user", "content": it["prompt"].render(it["text"])}] for it in items]

    def answer(batch_size: int, cap: int | None = None) -> list[str]:
        generator.batch_size = batch_size
        return [r.text for r in generator.generate(conversations, max_new_tokens=cap or [it["cap"] for it in items])]

    return answer


def measure(name: str, answer: Answerer, batch_size: int, count_tokens: Callable[[str], int]) -> dict:
    """Answer every item one at a time, then in batches; print and return both rates and their ratio.

    A third, batched pass with a 1-token cap times the prompt alone (audio encoding + prefill): work
    that batching cannot shrink on a CPU, which bounds the speedup. An untimed pass with that cap comes first:
    a cold first pass (CUDA context and kernels, cuBLAS handles, allocator) was timed as batch 1's and inflated
    the speedup.
    """
    answer(batch_size, 1)  # warm-up, untimed
    runs = {}
    for size in (1, batch_size):
        start = time.perf_counter()
        answers = answer(size, None)
        seconds = time.perf_counter() - start
        tokens = sum(count_tokens(a) for a in answers)
        runs[size] = {"seconds": seconds, "answers_per_s": len(answers) / seconds, "tokens_per_s": tokens / seconds,
                      "tokens": tokens, "answers": answers}
        print(f"[{name}] batch {size:>3}: {len(answers) / seconds:6.2f} answers/s | {tokens / seconds:7.1f} tokens/s "
              f"| {tokens} tokens in {seconds:.1f} s", flush=True)
    start = time.perf_counter()
    answer(batch_size, 1)
    prompt_seconds = time.perf_counter() - start
    single, batched = runs[1], runs[batch_size]
    speedup = batched["answers_per_s"] / single["answers_per_s"]
    decoding = batched["seconds"] - prompt_seconds  # <= 0 when timing noise exceeds the decoding (tiny runs)
    decoding_speedup = (single["seconds"] - prompt_seconds) / decoding if decoding > 0 else None
    one_by_one, together = single.pop("answers"), batched.pop("answers")
    same = sum(a == b for a, b in zip(one_by_one, together))
    print(f"[{name}] prompts alone (audio encoding + prefill, batch {batch_size}): {prompt_seconds:.1f} s; "
          "decoding after them: " + (f"x{decoding_speedup:.2f} batched" if decoding_speedup else
                                     "n/a (the prompts alone took as long as the whole batched run)"))
    print(f"[{name}] batched / one at a time: answers/s x{speedup:.2f}; {same}/{len(together)} answers identical")
    return {"batch_1": single, f"batch_{batch_size}": batched, "speedup": speedup, "prompt_seconds": prompt_seconds,
            "decoding_speedup": decoding_speedup, "identical_answers": same}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="speechlm_gen_bench_") as tmp:
        model = load_model(args, Path(tmp)).eval().to(args.device)
        items = make_items(args.items, args.tiny, model.sampling_rate, args.max_new_tokens, Path(tmp))
        tokenizer = model.tokenizer.tokenizer
        header = {
            "model": args.nemo or "untrained connector (built from the config)",
            "encoder": model.cfg.perception.encoder.get("_target_"),
            "llm": model.cfg.pretrained_llm,
            "items": len(items),
            "batch_size": args.batch_size,
            "caps": sorted({it["cap"] for it in items}),
            "threads": torch.get_num_threads(),
            "machine": machine_info(torch.device(args.device)),
        }
        print("=" * 72 + "\nGeneration throughput: one at a time vs batched\n" + "=" * 72)
        print("\n".join(f"{key:>10}: {value}" for key, value in header.items()))
        result = {"header": header}
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        if args.part in ("speech", "both"):
            result["speech"] = measure("speech", speech_answerer(model, items), args.batch_size, count)
        if args.part in ("text", "both"):
            generator = HFChatGenerator(model.cfg.pretrained_llm, device=args.device)
            result["text"] = measure("text behaviors", text_answerer(generator, items), args.batch_size, count)
        print("RESULT " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
