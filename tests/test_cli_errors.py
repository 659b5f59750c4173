"""Bad input at the command line: one line on stderr naming the file (line, field) and what to do,
exit code 2, no traceback (``--debug`` shows it); valid but unusual input is answered.

Each row of the table runs the real script as ``python examples/<script>.py ...`` in a subprocess;
the rows of one script share that subprocess (``tests/run_commands.py``) so torch and NeMo are
imported once per script, not once per row.
"""
import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
import torch
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from nemo_speechlm.data.audio import check_audio_length, read_audio
from nemo_speechlm.data.manifest import ManifestError, read_manifest
from nemo_speechlm.errors import AudioError
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.checkpoint import CHECKPOINT_FORMAT, read_nemo_config
from nemo_speechlm.parts.cli import SKIP_FLAG_HINT, error_line
from tests.tiny_assets import make_damaged_flac, make_tiny_whisper, tiny_whisper_perception
from tests.conftest import REPO, model_config

SR = 16000
E = re.escape


# --------------------------------------------------------------------------- inputs


def write_wav(path: Path, samples) -> str:
    soundfile.write(path, np.asarray(samples, dtype=np.float32), SR)
    return str(path)


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def rewrite_config(src: Path, dst: Path, edit) -> str:
    """A copy of a .nemo whose model_config.yaml went through ``edit(dict)``."""
    with tarfile.open(src) as tar, tarfile.open(dst, "w:") as out:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None
            if member.name.endswith("model_config.yaml"):
                cfg = yaml.safe_load(data)
                edit(cfg)
                data = yaml.safe_dump(cfg).encode()
                member.size = len(data)
            out.addfile(member, io.BytesIO(data) if data is not None else None)
    return str(dst)


@pytest.fixture(scope="module")
def files(assets, tmp_path_factory) -> dict:
    """Tiny conformer and Whisper speech LLMs, bad .nemo files, odd audio and bad manifests."""
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    model = SpeechLMModel(model_config(assets["llm"])).eval()
    model.save_to(str(root / "model.nemo"))
    whisper_cfg = model_config(assets["llm"])
    whisper_cfg.perception.update(tiny_whisper_perception(make_tiny_whisper(root / "whisper"), pad_to_window=True))
    SpeechLMModel(whisper_cfg).save_to(str(root / "whisper.nemo"))
    nemo = (root / "model.nemo").read_bytes()
    (root / "truncated.nemo").write_bytes(nemo[: len(nemo) // 2])
    (root / "notatar.nemo").write_text("not a model\n")
    (root / "text.wav").write_text("hello, I am text\n")
    (root / "corrupt.wav").write_bytes(b"RIFF" + bytes(40))
    rows = [json.loads(line) for line in assets["manifest"].read_text().splitlines()]
    t = np.arange(45 * SR) / SR
    f = {
        "model_obj": model,
        "model": str(root / "model.nemo"),
        "whisper": str(root / "whisper.nemo"),
        "truncated": str(root / "truncated.nemo"),
        "notatar": str(root / "notatar.nemo"),
        "asr": str(assets["asr"]),  # a NeMo EncDecCTCModel .nemo
        "newer": rewrite_config(root / "model.nemo", root / "newer.nemo",
                                lambda c: c.update(checkpoint_format=99, nemo_speechlm_version="9.0.0")),
        "unsafe": rewrite_config(root / "model.nemo", root / "unsafe.nemo",
                                 lambda c: c["perception"]["encoder"].update(_target_="os.system")),
        "wav": rows[0]["audio_filepath"],
        "wav2": rows[1]["audio_filepath"],
        "text_wav": str(root / "text.wav"),
        "corrupt": str(root / "corrupt.wav"),
        "empty": write_wav(root / "empty.wav", []),
        "short": write_wav(root / "short.wav", np.full(50, 0.1)),
        "silence": write_wav(root / "silence.wav", np.zeros(SR)),
        "long": write_wav(root / "long.wav", 0.1 * np.sin(2 * np.pi * 200 * t)),
        "bad_json": write_jsonl(root / "bad_json.jsonl", [rows[0], "{not json"]),
        "too_long": write_jsonl(root / "too_long.jsonl", [rows[0], {**rows[1], "duration": rows[1]["duration"] + 5}]),
        "missing_audio": write_jsonl(root / "missing_audio.jsonl", [rows[0], {**rows[1], "audio_filepath": str(root / "gone.wav")}]),
        "bad_catalog": str(root / "catalog.yaml"),
        "behaviors": write_jsonl(root / "behaviors.jsonl", [{**rows[0], "task": "repeat", "prompt": "Repeat: {input}",
                                                            "response": rows[0]["text"]}]),
        "root": root,
        "llm": str(assets["llm"]),
        "whisper_dir": str(root / "whisper"),
    }
    f["good_manifest"] = write_jsonl(root / "good_manifest.jsonl", rows[:2])
    f["damaged_flac"] = make_damaged_flac(rows[1]["audio_filepath"], root / "damaged.flac")
    f["damaged_manifest"] = write_jsonl(root / "damaged.jsonl", [rows[0], {**rows[1], "audio_filepath": f["damaged_flac"]}])
    f["only_damaged"] = write_jsonl(root / "only_damaged.jsonl", [{**rows[1], "audio_filepath": f["damaged_flac"]}])
    f["not_utf8"] = str(root / "not_utf8.jsonl")
    (root / "not_utf8.jsonl").write_bytes(json.dumps(rows[0]).encode() + b"\n" + json.dumps(rows[1]).encode().replace(
        b'"text": "', b'"text": "\xff\xfe') + b"\n")
    f["empty_manifest"] = write_jsonl(root / "empty_manifest.jsonl", [])
    f["only_missing_audio"] = write_jsonl(root / "only_missing_audio.jsonl", [{**rows[1], "audio_filepath": str(root / "gone.wav")}])
    f["empty_line"] = write_jsonl(root / "empty_line.jsonl", [rows[0], {**rows[1], "audio_filepath": f["empty"], "duration": 0.1}])
    f["long_manifest"] = write_jsonl(root / "long.jsonl", [rows[0], {**rows[1], "audio_filepath": f["long"], "duration": 45.0}])
    (root / "catalog.yaml").write_text("tasks: [unclosed\n")
    return f


def run_rows(script: str, rows: dict[str, list[str]]) -> dict[str, dict]:
    """``python script args`` for every row (one subprocess for all rows): {row: {code, stdout, stderr}}."""
    proc = subprocess.run([sys.executable, "tests/run_commands.py", script], input=json.dumps(list(rows.values())),
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return dict(zip(rows, json.loads(proc.stdout)))


def assert_one_error_line(result: dict, pattern: str, answers_on_stdout: bool = True) -> None:
    """Exit code 2, no traceback, and one ``error:`` line, the last on stderr, matching ``pattern``; nothing on
    stdout where it is for answers only (training scripts log there)."""
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    assert result["code"] == 2, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert re.match("error: " + pattern, errors[0]), errors[0]
    assert "Traceback" not in result["stdout"]
    if answers_on_stdout:
        assert result["stdout"] == ""


# --------------------------------------------------------------------------- speechlm-infer / examples/infer.py

ASK = ["--prompt", "Repeat:", "--max-new-tokens", "2"]
FIX_AUDIO = E(" — check that it is an undamaged audio file")
FIX_NEMO = E(" — give a .nemo written by nemo_speechlm training")

INFER_ERRORS = {  # row: (arguments, pattern of the error line)
    "missing audio": (lambda f: [f["model"], "/nonexistent/a.wav", *ASK],
                      E("audio file not found: /nonexistent/a.wav — check the path")),
    "missing model": (lambda f: ["/nonexistent/m.nemo", f["wav"], *ASK], E("model file not found: /nonexistent/m.nemo")),
    "corrupt wav": (lambda f: [f["model"], f["corrupt"], *ASK],
                    ".*corrupt.wav" + E(": cannot read audio (Format not recognised)") + FIX_AUDIO),
    # the header reads (rate, length), the frames do not decode: lhotse's first line named no reason
    "damaged FLAC": (lambda f: [f["model"], f["damaged_flac"], *ASK],
                     ".*damaged.flac" + E(": cannot read audio (flac decoder lost sync)") + FIX_AUDIO),
    "text file named .wav": (lambda f: [f["model"], f["text_wav"], *ASK],
                             ".*text.wav" + E(": cannot read audio (Format not recognised)") + FIX_AUDIO),
    "empty wav": (lambda f: [f["model"], f["empty"], *ASK],
                  ".*empty.wav" + E(": the audio is empty (0 samples) — give a recording with sound in it")),
    "audio shorter than one encoder frame": (lambda f: [f["model"], f["short"], *ASK],
                                             ".*short.wav" + E(": the audio lasts 3.1 ms, shorter than one encoder frame (80 ms)")),
    "truncated .nemo": (lambda f: [f["truncated"], f["wav"], *ASK],
                        ".*truncated.nemo" + E(": the .nemo file is truncated or damaged (unexpected end of data) — copy")),
    "not a tar": (lambda f: [f["notatar"], f["wav"], *ASK], ".*notatar.nemo" + E(": not a .nemo file (not a tar archive)") + FIX_NEMO),
    "another toolkit's .nemo": (lambda f: [f["asr"], f["wav"], *ASK],
                                ".*asr.nemo" + E(": is a NeMo model (nemo.collections.asr.") + r"\S+EncDecCTCModel"
                                + E("), not a nemo_speechlm speech LLM") + FIX_NEMO),
    "newer incompatible version": (lambda f: [f["newer"], f["wav"], *ASK],
                                   ".*newer.nemo" + E(": written by nemo_speechlm 9.0.0 in checkpoint format 99; this install")
                                   + ".*" + E(f"reads formats up to {CHECKPOINT_FORMAT} — upgrade nemo_speechlm")),
    "config names os.system": (lambda f: [f["unsafe"], f["wav"], *ASK],
                               ".*unsafe.nemo" + E(": its config names 'os.system', which NeMo refuses to build")
                               + ".*" + E(" — only load .nemo files from sources you trust")),
    "manifest with a non-JSON line": (lambda f: [f["model"], "--manifest", f["bad_json"], "--output", f"{f['root']}/a.jsonl",
                                                 "--prompt", "Repeat:"],
                                      ".*bad_json.jsonl" + E(":2: not valid JSON (") + ".*"
                                      + E(" — fix the line, or pass --skip-invalid to skip and count such lines")),
    "manifest duration longer than the file": (lambda f: [f["model"], "--manifest", f["too_long"], "--output",
                                                          f"{f['root']}/b.jsonl", "--prompt", "Repeat:"],
                                               ".*too_long.jsonl" + E(":2 field 'duration': offset 0.0 + duration ")
                                               + ".*" + E("exceeds the file's length")),
    "two audio locators for one audio": (lambda f: [f["model"], f["wav"], "--prompt", "<|audio|> or <|audio|>?"],
                                         E("--prompt has 2 audio locators '<|audio|>' but each audio file is one audio — keep one")),
    "--max-new-tokens -3": (lambda f: [f["model"], f["wav"], "--prompt", "Repeat:", "--max-new-tokens", "-3"],
                            E("argument --max-new-tokens: must be 1 or more, got -3 — see speechlm-infer --help")),
    "--batch-size 0": (lambda f: [f["model"], f["wav"], *ASK, "--batch-size", "0"],
                       E("argument --batch-size: must be 1 or more, got 0 — see speechlm-infer --help")),
    "output under a file": (lambda f: [f["model"], "--manifest", f["good_manifest"], "--output", f"{f['text_wav']}/x.jsonl",
                                       *ASK], ".*text.wav" + E(": File exists")),
    "manifest with a line that is not UTF-8": (lambda f: [f["model"], "--manifest", f["not_utf8"], "--output",
                                                          f"{f['root']}/d.jsonl", *ASK],
                                               ".*not_utf8.jsonl" + E(":2: not valid UTF-8 (byte 0xff at byte ") + ".*"
                                               + E(" — fix the line, or pass --skip-invalid to skip and count such lines")),
}
INFER_ANSWERS = {  # row: (arguments, number of answers)
    "silence": (lambda f: [f["model"], f["silence"], *ASK, "--jsonl"], 1),
    "45 s wav (encoded in chunks)": (lambda f: [f["whisper"], f["long"], *ASK, "--jsonl"], 1),
    "options before files": (lambda f: [f["model"], "--prompt", "Repeat:", f["wav"], f["wav2"], "--jsonl"], 2),
}


@pytest.fixture(scope="module")
def infer_results(files) -> dict:
    rows = {name: args(files) for name, (args, _) in {**INFER_ERRORS, **INFER_ANSWERS}.items()}
    rows["manifest line with empty audio, skipped"] = [
        files["model"], "--manifest", files["empty_line"], "--output", f"{files['root']}/c.jsonl", *ASK, "--skip-invalid"]
    return run_rows("examples/infer.py", rows)


@pytest.mark.parametrize("row", INFER_ERRORS)
def test_infer_error_is_one_line(infer_results, row):
    assert_one_error_line(infer_results[row], INFER_ERRORS[row][1])


@pytest.mark.parametrize("row", INFER_ANSWERS)
def test_infer_answers_unusual_but_valid_input(infer_results, row):
    result = infer_results[row]
    assert result["code"] == 0, result["stderr"][-3000:]
    assert len([json.loads(line) for line in result["stdout"].splitlines()]) == INFER_ANSWERS[row][1]


def test_infer_skips_and_counts_a_manifest_line_with_empty_audio(infer_results, files):
    result = infer_results["manifest line with empty audio, skipped"]
    assert result["code"] == 0, result["stderr"][-3000:]
    assert "1 lines skipped: 1 x audio_filepath" in result["stderr"] and "the audio file is empty (0 samples)" in result["stderr"]
    assert len(Path(files["root"], "c.jsonl").read_text().splitlines()) == 1


def test_installed_command_takes_options_before_files(files):
    command = Path(sys.executable).with_name("speechlm-infer")  # installed by `make setup` (setup.py console_scripts)
    assert command.is_file(), f"{command} is missing: install the package (make setup) before running the tests"
    proc = subprocess.run([str(command), files["model"], "--prompt", "Repeat:", files["wav"], "--max-new-tokens", "2",
                           "--jsonl"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["audio_filepath"] == files["wav"]


def test_an_error_is_the_only_line_on_stderr_in_a_fresh_process(tmp_path):
    """The rows above share one process, so the import's own output lands in the first row only; here a
    fresh process: nothing but the error (NeMo's import warned twice about its disabled telemetry)."""
    command = Path(sys.executable).with_name("speechlm-infer")
    proc = subprocess.run([str(command), str(tmp_path / "missing.nemo"), "a.wav", "--prompt", "x <|audio|>"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"error: model file not found: {tmp_path / 'missing.nemo'} — check the path"]
    assert proc.stdout == ""


def test_debug_flag_shows_the_traceback(files):
    proc = subprocess.run([sys.executable, "examples/infer.py", files["truncated"], files["wav"], "--prompt", "x", "--debug"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "CheckpointError: " in proc.stderr.strip().splitlines()[-1]


# --------------------------------------------------------------------------- training scripts


def train_args(f: dict, *overrides: str) -> list[str]:
    return ["encoder=conformer_tiny", "llm=hf", f"model.pretrained_llm={f['llm']}", "trainer.accelerator=cpu",
            "trainer.max_steps=1", "data.train_ds.batch_size=2", f"exp_manager.exp_dir={f['root']}/runs", *overrides]


MANIFEST = "data.train_ds.input_cfg.0.manifest_filepath"
SKIP_IN_CONFIG = E(" — fix the line, or set skip_invalid: true on that data input to skip and count such lines")
TRAIN_ERRORS = {  # row: (overrides, pattern of the error line, whether a model is built before the error)
    "bad manifest line": (lambda f: [f"{MANIFEST}={f['bad_json']}"],
                          ".*bad_json.jsonl" + E(":2: not valid JSON (") + ".*" + SKIP_IN_CONFIG, False),
    "missing audio": (lambda f: [f"{MANIFEST}={f['missing_audio']}"],
                      ".*missing_audio.jsonl" + E(":2 field 'audio_filepath': audio file does not exist: ") + ".*gone.wav"
                      + SKIP_IN_CONFIG, False),
    "config value not set": (lambda f: [], E(f"config: {MANIFEST} not set (???) — give it on the command line, e.g. {MANIFEST}="),
                             False),
    "unknown data type": (lambda f: [f"{MANIFEST}={f['behaviors']}", "data.train_ds.input_cfg.0.type=nonexistent"],
                          E("config: data.train_ds.input_cfg.0.type is 'nonexistent', not a known data type — use one of"),
                          False),
    "bad task catalog": (lambda f: [f"{MANIFEST}={f['behaviors']}", "data.train_ds.input_cfg.0.type=mtbi_behaviors",
                                    f"+data.train_ds.input_cfg.0.catalog={f['bad_catalog']}"],
                         ".*catalog.yaml" + E(": not valid YAML"), False),
    "unknown output scope": (lambda f: [f"{MANIFEST}={f['behaviors']}", "output_scope=lora"],
                             E("config: output_scope is 'lora', not one of full, trainable — output_scope=full (every "
                               "weight) or output_scope=trainable (without the frozen base weights)"), False),
    "unknown config option": (lambda f: ["encoder=nonexistent"],
                              E("In 'speechlm': Could not find 'encoder/nonexistent' Available options in 'encoder': "), False),
    "clip longer than the encoder's window": (
        lambda f: [f"{MANIFEST}={f['long_manifest']}", "encoder=whisper", "model.perception.encoder.d_model=32",
                   f"model.perception.encoder.pretrained_model={f['whisper_dir']}"],
        ".*long.wav" + E(": 45.0 s of audio is longer than the encoder's 30 s window — set model.encoder_chunk_size_seconds=30"),
        True),
}
# The data checks read headers only; a damaged body is found when a batch decodes it (a RuntimeError traceback)
TRAIN_ERRORS["audio that does not decode"] = (lambda f: [f"{MANIFEST}={f['damaged_manifest']}"],
                                              ".*damaged.flac" + E(": cannot read audio (flac decoder lost sync)") + FIX_AUDIO,
                                              True)
# ... alone in its batch: lhotse's collation raised "max() arg is an empty sequence"
TRAIN_ERRORS["a batch where no audio decodes"] = (
    lambda f: [f"{MANIFEST}={f['only_damaged']}", "data.train_ds.batch_size=1"], TRAIN_ERRORS["audio that does not decode"][1], True)
# ... in a DataLoader worker (GPU configs use 4-8): PyTorch re-raised it as a RuntimeError with the worker's traceback
TRAIN_ERRORS["audio that does not decode, in a loader worker"] = (
    lambda f: [f"{MANIFEST}={f['damaged_manifest']}", "data.train_ds.num_workers=2"], TRAIN_ERRORS["audio that does not decode"][1], True)
TRAINER_FIX = ("set trainer.accelerator / trainer.devices / trainer.strategy / trainer.precision to values Lightning "
               "knows and this machine has (e.g. trainer.accelerator=cpu)")
TRAIN_ERRORS.update({
    # an empty training stream: Lightning cycled through empty epochs for ever, never reaching max_steps
    "empty manifest": (lambda f: [f"{MANIFEST}={f['empty_manifest']}"],
                       E("config: data.train_ds has no examples (its inputs are empty, or every line was skipped or "
                         "filtered out by min_duration/max_duration) — point data.train_ds.input_cfg at data"), False),
    "every line skipped": (lambda f: [f"{MANIFEST}={f['only_missing_audio']}", "data.train_ds.input_cfg.0.skip_invalid=true"],
                           r"\S*only_missing_audio\.jsonl: every line was skipped as invalid \(1 lines skipped: 1 x "
                           r"audio_filepath" + ".*" + E("fix the lines, or remove this input from the data config"), False),
    "unknown precision": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "trainer.precision=bf17"],
                          E("trainer: Precision 'bf17' is invalid.") + ".*" + E(TRAINER_FIX), False),
    "missing Shar directory": (lambda f: [f"{MANIFEST}=null", f"+data.train_ds.input_cfg.0.shar_path={f['root']}/no_shar"],
                               E("config: data.train_ds.input_cfg.0.shar_path: no such directory: ") + ".*no_shar"
                               + E(" — give the directory examples/to_shar.py wrote"), False),
    # read after the model was built (minutes on a real one); its hint offered a skip_invalid the stage does not have
    "bad pre-alignment manifest": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "connector_pretraining.steps=1",
                                              f"connector_pretraining.manifest_filepath={f['missing_audio']}"],
                                   ".*missing_audio.jsonl" + E(":2 field 'audio_filepath': audio file does not exist: ")
                                   + ".*gone.wav" + E(" — fix the line (connector pre-alignment reads every line of its "
                                                      "manifest)"), False),
    # tracebacks (exit 1) after the trainer and run folder were made, or a hint naming an override that did not exist
    "unknown prompt format": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "model.prompt_format=nosuch"],
                              E("model.prompt_format='nosuch': no such prompt format — use null"), False),
    "model value not set": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "model.pretrained_llm=???"],
                            E("config: model.pretrained_llm not set (???) — give it on the command line, e.g. "
                              "model.pretrained_llm=<value>"), False),
    "bad max_steps": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "trainer.max_steps=abc"],
                      E("trainer: max_steps is 'abc', not an integer — set trainer.max_steps to a whole number"), False),
    "bad num_nodes": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "trainer.num_nodes=two"],  # read by the strategy
                      E("trainer: num_nodes is 'two', not an integer — set trainer.num_nodes to a whole number"), False),
    "frozen weights in bf16 without bf16-mixed": (
        lambda f: [f"{MANIFEST}={f['good_manifest']}", "frozen_weights_dtype=bfloat16"],
        E("config: frozen_weights_dtype=bfloat16 needs trainer.precision=bf16-mixed (it is 32)"), False),
    "unknown frozen weights dtype": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "trainer.precision=bf16-mixed",
                                                "frozen_weights_dtype=fp8"],
                                     E("config: frozen_weights_dtype is 'fp8', not one of bfloat16"), False),
    "system prompt other than the data's": (
        lambda f: [f"{MANIFEST}={f['good_manifest']}", "data.train_ds.input_cfg.0.system_prompt=Be brief.",
                   "model.system_prompt=Say yes."],
        E("model.system_prompt is 'Say yes.' but the speech data trains under 'Be brief.' — drop model.system_prompt"),
        False),
    "unknown LoRA key": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "model.lora={r: 4, rank: 3}"],
                         E("model.lora: LoraConfig.__init__() got an unexpected keyword argument 'rank'"), False),
    "bad freeze pattern": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "model.freeze_params=['^llm(']"],
                           E("model.freeze_params: '^llm(' is not a regular expression"), False),
    "adapter stacking 0 frames": (lambda f: [f"{MANIFEST}={f['good_manifest']}", "model.perception.modality_adapter.stack=0"],
                                  E("model.perception.modality_adapter: stack 0"), False),
})
if not torch.cuda.is_available():  # the README's GPU command on a machine without one: Lightning raised a traceback
    TRAIN_ERRORS["GPU command without a GPU"] = (
        lambda f: [f"{MANIFEST}={f['behaviors']}", "data.train_ds.input_cfg.0.type=mtbi_behaviors", "trainer.accelerator=gpu"],
        E(f"trainer: No supported gpu backend found! — {TRAINER_FIX}"), False)


@pytest.fixture(scope="module")
def train_results(files) -> dict:
    return run_rows("examples/speechlm_train.py", {row: train_args(files, *args(files))
                                                    for row, (args, _, _) in TRAIN_ERRORS.items()})


@pytest.mark.parametrize("row", TRAIN_ERRORS)
def test_training_error_is_one_line_before_any_model_is_built(train_results, row):
    result = train_results[row]
    assert_one_error_line(result, TRAIN_ERRORS[row][1], answers_on_stdout=False)
    built = "SpeechLMModel: " in result["stdout"] + result["stderr"]  # the model logs its size when built
    assert built == TRAIN_ERRORS[row][2]


def test_clips_the_loader_filters_out_are_not_checked(files):
    """`max_duration` drops the 45 s clip from the stream: refusing it for the encoder's window stopped a run that
    would never have seen it."""
    from hydra import compose, initialize_config_dir

    import nemo_speechlm
    from nemo_speechlm.data.preflight import check_training_data

    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        args = train_args(files, f"{MANIFEST}={files['long_manifest']}")
        cfg, filtered = compose("speechlm", overrides=args), compose("speechlm", overrides=[*args, "+data.train_ds.max_duration=20"])
    assert check_training_data(cfg).longest.seconds == 45.0
    assert check_training_data(filtered).longest.seconds < 20.0


# --------------------------------------------------------------------------- the library underneath


def test_audio_errors_name_the_file_and_silence_is_valid(files):
    with pytest.raises(AudioError, match=E(f"{files['text_wav']}: cannot read audio (Format not recognised)")):
        read_audio(files["text_wav"], SR)
    with pytest.raises(FileNotFoundError, match="gone.wav"):
        read_audio(Path(files["root"], "gone.wav"), SR)
    with pytest.raises(AudioError, match=E(f"{files['empty']}: the audio is empty (0 samples)")):
        check_audio_length(len(read_audio(files["empty"], SR)), SR, 0.08, files["empty"])
    check_audio_length(len(read_audio(files["silence"], SR)), SR, 0.08, files["silence"])
    assert len(read_audio(files["wav"], 8000, offset=0.1, duration=100.0)) > 0  # a duration past the end is clipped


def test_respond_refuses_empty_and_too_short_waveforms_and_answers_silence(files):
    model = files["model_obj"]
    with pytest.raises(AudioError, match=E("waveform: the audio is empty (0 samples)")):
        model.respond([np.zeros(0)], ["<|audio|>"], max_new_tokens=1)
    with pytest.raises(AudioError, match="shorter than one encoder frame"):
        model.respond([np.zeros(100)], ["<|audio|>"], max_new_tokens=1)
    assert len(model.respond([np.zeros(SR)], ["<|audio|>"], max_new_tokens=1)) == 1


def test_manifest_refuses_empty_audio_and_clips_shorter_than_the_minimum(files):
    with pytest.raises(ManifestError, match=r"empty_line\.jsonl:2 field 'audio_filepath': the audio file is empty"):
        list(read_manifest(files["empty_line"]))
    with pytest.raises(ManifestError, match=E("bad_json.jsonl:1 field 'duration': ") + ".* shorter than one encoder frame"):
        next(read_manifest(files["bad_json"], min_duration=100.0))


def test_long_audio_is_encoded_in_chunks_in_training_as_in_inference(files):
    """The training recipe refuses clips over the window up front (the row above); the model itself encodes one in
    chunks in either mode (training mode raised, and a 29.9-30 s clip was chunked in one mode only)."""
    model = SpeechLMModel.restore_from(files["whisper"]).eval()
    audio = torch.as_tensor(read_audio(files["long"], SR))[None]
    with torch.no_grad():
        (features,) = model.encode_speech(audio, torch.tensor([audio.shape[1]]))
        assert len(features) == pytest.approx(45 * 50, abs=4)  # 50 Whisper frames/s over the whole clip
        model.train()
        model.perception.encoder.eval()  # the frozen encoder's mode in a training step
        (trained_on,) = model.encode_speech(audio, torch.tensor([audio.shape[1]]))
    torch.testing.assert_close(trained_on, features)


def test_saved_nemo_records_its_checkpoint_format(files):
    cfg = read_nemo_config(files["model"])
    assert cfg.checkpoint_format == CHECKPOINT_FORMAT and cfg.nemo_speechlm_version


def test_error_line_is_one_line_with_what_to_do(tmp_path):
    manifest_error = ManifestError("m.jsonl", 3, "not valid JSON", None)
    assert error_line(manifest_error, SKIP_FLAG_HINT) == (
        "error: m.jsonl:3: not valid JSON — fix the line, or pass --skip-invalid to skip and count such lines")
    with pytest.raises(MissingMandatoryValue) as missing:
        OmegaConf.create({"data": {"files": [{"path": "???"}]}}).data.files[0].path
    assert error_line(missing.value) == (
        "error: config: data.files[0].path has no value — set it on the command line: data.files.0.path=...")
    with pytest.raises(FileNotFoundError) as not_found:
        open(tmp_path / "gone.jsonl")
    assert error_line(not_found.value) == f"error: {tmp_path / 'gone.jsonl'}: No such file or directory"
    assert error_line(ValueError("two\nlines")) == "error: two lines"


def test_ctrl_c_is_one_line_saying_what_was_kept(capsys, monkeypatch):
    """The runner's message (records kept, rerun to resume) came after a chained traceback."""
    from nemo_speechlm.parts.cli import run_cli

    def interrupted(_):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise KeyboardInterrupt("3 records written to out.jsonl are kept; rerun the same command to resume") from exc

    monkeypatch.delenv("NEMO_SPEECHLM_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(interrupted, [])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted: 3 records written to out.jsonl are kept; rerun the same command to resume\n"


@pytest.mark.parametrize(("source", "message"), [
    ("./no/such/llm_dir", "no such file or directory, and not a Hugging Face hub id"),
    ("nemo-speechlm-tests/no-such-llm", "not a local path, and the Hugging Face hub could not be reached"),
])
def test_an_llm_that_cannot_be_found_is_a_config_error_saying_what_to_do(monkeypatch, source, message):
    """A mistyped model.pretrained_llm (or no network) was a ValueError traceback from NeMo's tokenizer wrapper."""
    from huggingface_hub import constants

    from nemo_speechlm.errors import ConfigError
    from nemo_speechlm.parts.llm import resolve_llm_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # what an unreachable hub gives, without waiting for retries
    with pytest.raises(ConfigError, match=f"model.pretrained_llm='{source}': {message}") as error:
        resolve_llm_source(source)
    assert "local Hugging Face directory or .gguf file" in error.value.fix


@pytest.mark.parametrize("damage", ["truncated", "not a tar"])
def test_a_damaged_asr_model_is_an_input_error(files, tmp_path, damage):
    """align_words --model / benchmark --asr-model: a tarfile traceback before."""
    from nemo_speechlm.errors import InputError
    from nemo_speechlm.models.loading import load_asr_model

    data = Path(files["asr"]).read_bytes()
    path = tmp_path / "asr.nemo"
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a model\n")
    with pytest.raises(InputError, match="not a readable .nemo archive"):
        load_asr_model(path)


def test_an_unknown_device_and_a_negative_count_are_one_line_errors(capsys):
    """``--device foo`` was a torch RuntimeError traceback (no command limits it to a list), and ``listening
    --num-utterances -1`` silently left the last utterance out (a slice)."""
    from nemo_speechlm.errors import InputError
    from nemo_speechlm.evaluation import listening
    from nemo_speechlm.parts.device import resolve_device

    with pytest.raises(InputError, match="unknown device 'foo'"):
        resolve_device("foo")
    parser = argparse.ArgumentParser()
    listening.add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "m.nemo", "--manifest", "h.jsonl", "--out-dir", "o", "--num-utterances", "-1"])
    assert "must be 0 (all) or more" in capsys.readouterr().err


def test_synthesize_corpus_bad_arguments_are_one_line(files):
    """A sentence list with a byte that is not UTF-8, and a zero rate: tracebacks before."""
    bad = files["root"] / "sentences.txt"
    bad.write_bytes(b"hello world\n\xff bad\n")
    out = str(files["root"] / "corpus")
    results = run_rows("examples/synthesize_corpus.py", {"not utf-8": ["--out-dir", out, "--sentences", str(bad)],
                                                          "rate 0": ["--out-dir", out, "--rates", "0"]})
    assert_one_error_line(results["not utf-8"], ".*sentences.txt" + E(":2: not valid UTF-8 (byte 0xff at byte 1) — fix the line"),
                          answers_on_stdout=False)
    assert_one_error_line(results["rate 0"], E("argument --rates: must be 1 or more, got 0"), answers_on_stdout=False)
