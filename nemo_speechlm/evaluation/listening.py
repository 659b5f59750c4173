"""Listening diagnostics: does a speech LLM use the audio, and what does it add to the words it hears?

Every condition asks the same "repeat" prompt and scores WER against the utterance's transcript:

* ``speech`` — the held-out speech, as in use;
* ``text_oracle`` — the transcript's text in place of the speech: what this LLM does with the words
  alone. A ceiling for an untrained LLM side only; training through the LLM teaches the answer
  form, so a trained model can beat it (the demo's SmolLM2 *answers* a written request instead of
  repeating it);
* ``zero_audio`` — silence of the same length: a model that listens fails here (WER near 100%),
  a model that guesses from the prompt and the training prior does not;
* ``shuffled_audio`` — another held-out utterance's speech: scored against the transcript of the
  utterance *played* (``wer_vs_played``) and of the one it replaced (``wer``);
* ``training_subset`` — the same speech condition on training utterances: far below the held-out
  WER means memorising rather than generalising;
* ``connector_ctc`` (models with ``model.ctc_readout``) — the connector alone, greedy CTC decoding of
  the held-out speech, no LLM: what reaches the LLM, so ``speech`` minus this is what the LLM adds or loses.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from nemo_speechlm.data.audio import load_entry_audio
from nemo_speechlm.data.manifest import read_manifest
from nemo_speechlm.errors import InputError
from nemo_speechlm.models.answering import SYSTEM_PROMPT_HELP
from nemo_speechlm.parts.cli import count_or_all, positive_int
from nemo_speechlm.parts.connector_ctc import connector_transcripts
from nemo_speechlm.parts.metrics import word_error_rate

__all__ = ["CONDITIONS", "listening_diagnostics", "listening_table"]

CONDITIONS = ("text_oracle", "speech", "zero_audio", "shuffled_audio", "training_subset", "connector_ctc")


def _entries(manifest: str | Path, limit: int | None) -> list:
    entries = list(read_manifest(manifest))[: limit or None]
    if not entries:
        raise InputError(f"{manifest}: no utterances to evaluate")
    return entries


def listening_diagnostics(
    model,
    heldout_manifest: str | Path,
    prompt: str,
    train_manifest: str | Path | None = None,
    num_utterances: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    out_dir: str | Path | None = None,
    system_prompt: str | None = None,
) -> dict:
    """Run every condition; returns ``{condition: {"wer", "n", "examples": [...]}}`` (and writes
    ``listening.json`` + ``listening.md`` to ``out_dir`` when given). ``system_prompt``: as
    ``SpeechLMModel.respond``'s (``None``: the one the model trained under, ``""``: none)."""
    tag = model.audio_locator_tag
    if prompt.count(tag) != 1:
        raise InputError(f"the diagnostics prompt needs exactly one audio locator {tag!r}: {prompt!r}")
    rate = model.sampling_rate
    held = _entries(heldout_manifest, num_utterances)
    if len(held) < 2:  # one utterance would be "shuffled" onto itself
        raise InputError(f"{heldout_manifest}: the listening diagnostics need at least 2 utterances (shuffled audio "
                         f"plays each one another's speech); got {len(held)}")
    texts = [e["text"] for e in held]
    speech = [load_entry_audio(e, rate) for e in held]

    def answer(audios, prompts) -> list[str]:
        return model.respond(audios, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             system_prompt=system_prompt)

    def scored(refs: Sequence[str], hyps: Sequence[str], **extra) -> dict:
        examples = [{"reference": r, "answer": h} for r, h in list(zip(refs, hyps))[:5]]
        return {"wer": word_error_rate(refs, hyps)["wer"], "n": len(refs), **extra, "examples": examples}

    results = {}
    oracle_prompts = [prompt.replace(tag, text) for text in texts]
    results["text_oracle"] = scored(texts, answer([None] * len(held), oracle_prompts))
    results["speech"] = scored(texts, answer(speech, [prompt] * len(held)))
    silence = [np.zeros_like(s) for s in speech]
    results["zero_audio"] = scored(texts, answer(silence, [prompt] * len(held)))
    order = list(range(1, len(held))) + [0]  # each utterance replaced by the next one's speech
    shuffled = answer([speech[j] for j in order], [prompt] * len(held))
    played = [texts[j] for j in order]
    results["shuffled_audio"] = scored(texts, shuffled, wer_vs_played=word_error_rate(played, shuffled)["wer"])
    if train_manifest is not None:
        train = _entries(train_manifest, len(held))
        answers = answer([load_entry_audio(e, rate) for e in train], [prompt] * len(train))
        results["training_subset"] = scored([e["text"] for e in train], answers)
    readout = getattr(model, "ctc_readout", None)
    if readout is not None and readout.ready:
        results["connector_ctc"] = scored(texts, connector_transcripts(model, speech, batch_size=batch_size))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "listening.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
        (out / "listening.md").write_text(listening_table(results) + "\n")
    return results


_MEANING = {
    "text_oracle": "transcript text instead of speech (what the LLM does with the words alone)",
    "speech": "held-out speech",
    "zero_audio": "silence instead of speech (high = the model listens)",
    "shuffled_audio": "another utterance's speech",
    "training_subset": "training speech (far below held-out = memorising)",
    "connector_ctc": "the connector alone, greedy CTC, no LLM (what reaches the LLM)",
}


def listening_table(results: dict) -> str:
    """One markdown table: condition, n, WER (and WER against the played utterance for shuffled audio)."""
    rows = ["| Condition | n | WER | What it shows |", "|---|---:|---:|---|"]
    for name in CONDITIONS:
        if name not in results:
            continue
        r = results[name]
        wer = f"{r['wer']:.1%}"
        if "wer_vs_played" in r:
            wer += f" ({r['wer_vs_played']:.1%} vs the utterance played)"
        rows.append(f"| {name} | {r['n']} | {wer} | {_MEANING[name]} |")
    return "\n".join(rows)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="trained speech LLM (.nemo)")
    parser.add_argument("--manifest", required=True, help="held-out manifest (audio_filepath, duration, text)")
    parser.add_argument("--train-manifest", default=None, help="training manifest, for the training-subset row")
    parser.add_argument("--prompt", default=None,
                        help="repeat prompt with the audio locator (default: the task catalog's first repeat prompt)")
    parser.add_argument("--num-utterances", type=count_or_all, default=40, help="utterances per condition (0 = all)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=48)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--out-dir", required=True, help="writes listening.json and listening.md")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--system-prompt", default=None, help=SYSTEM_PROMPT_HELP)


def main(args) -> dict:
    from nemo_speechlm.data.task_catalog import TRAIN, TaskCatalog
    from nemo_speechlm.models.loading import load_model

    model = load_model(args.model, args.device)
    prompt = args.prompt or TaskCatalog.load().task("repeat").prompts_in(TRAIN)[0].render(model.audio_locator_tag)
    results = listening_diagnostics(model, args.manifest, prompt, args.train_manifest, args.num_utterances or None,
                                    args.max_new_tokens, args.batch_size, args.out_dir, args.system_prompt)
    print(f"prompt: {prompt!r}, system prompt: {model.system_prompt_for(args.system_prompt)!r}")
    print(listening_table(results))
    return results
