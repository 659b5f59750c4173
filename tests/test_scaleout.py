"""Scale-out on CPU stand-ins: every recipe under Lightning DDP (2 processes, gloo), FSDP2, the feature
cache filled once across ranks, and kill-and-resume.

* DDP: ``trainer.devices=2`` (Lightning re-runs the script for rank 1; no torchrun) with batch ``b``
  writes the same ``.nemo`` as one process with batch ``b`` and ``accumulate_grad_batches=2``: the
  lhotse sampler gives rank ``r`` batches ``r, r+2, ...`` of the one-process stream, and DDP's
  gradient (the mean of the two ranks' mean losses) is the accumulated one (the mean of the two
  micro-batches' mean losses). Not the same as one process with batch ``2b``: a batch's loss is
  the mean over its tokens, so that one weighs the samples differently.
* FSDP2 (``trainer.strategy=fsdp2``): the same comparison with the LLM, the speech parts and (MTBI) the CTC
  read-out sharded over the 2 ranks and the full weights gathered for the ``.nemo``, in fp32 and (MTBI) bf16-true
  and the GPU commands' bf16-mixed with frozen weights in bf16 (also under DDP);
  the one-process runs are shared with the DDP comparison (:func:`one_process`).
* Feature cache: each rank encodes half of the utterances, then all read the full cache (DDP and FSDP2).
* Kill and resume (2 FSDP2 ranks): ``ExitAfterStep`` kills the run after step 3 (last checkpoint: step 2); the
  same command rerun resumes from step 2 (optimizer, scheduler and the data stream position restored;
  connector pre-alignment skipped, the connector frozen again) and writes the uninterrupted run's
  ``.nemo``.

Adam's ``eps`` is raised to 1e-3 in these runs. With the default 1e-8, Adam moves every weight by about
``lr * sign(gradient)`` whatever the gradient's size, so a gradient that cancels to ~0 takes its sign
from summation-order noise: measured 2 DDP steps vs 2 accumulated, plain SFT at lr 1e-4, 6 of the 64
adapter LayerNorm weights differed by up to 2.4e-4 (~2 lr), and LoRA weights (joint SFT, B starts at 0)
by up to 1.4e-4. With eps 1e-3 an update is linear in a small gradient, so the noise stays noise.
Randomness the comparison would see as noise is switched off: the MTBI adapter's spec augmentation
draws masks from each process's torch RNG (two ranks draw the same masks for different batches, one
process draws two different ones). Tolerance, :data:`ATOL` / :data:`RTOL`: the two sides sum the same
gradients in a different order (gloo all-reduce vs accumulation), about 1e-7 relative. Connector
pre-alignment (MTBI, before ``fit``) splits each batch across the ranks and sums their gradients the same
way. Under bf16-true the model is cast to bf16 after it, and a weight at a rounding boundary can round one
bf16 step (:data:`BF16_STEP`) the other way: measured 2 of the GRU's 393,216 input weights 6.1e-5 apart (one
step at their size), 2.4e-4 the largest difference of any weight, within one step (1.95e-3 once the targets ended
at the end-of-turn token, 2026-12-07: again one step at its size); a weight near 0 is compared at its tensor's scale. Measured
(torch 2.13 CPU): MTBI with KL + interleaving 1.6e-6 under DDP and FSDP2 (fp32), kill-and-resume 1.6e-6 (its
uninterrupted run is one process); both were bit-identical while every rank ran the whole pre-alignment.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from omegaconf import OmegaConf

from nemo_speechlm.data.datamodule import build_datamodule
from nemo_speechlm.data.resumable import skip_batches
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.models import SpeechLMModel
from nemo_speechlm.parts.distributed import broadcast_from_rank0, resolve_strategy
from tests.conftest import REPO, model_config, nemo_weights, run_on_ranks
from tests.tiny_assets import make_damaged_flac
from tests.test_joint_sft import _joint_data_cfg, _single_loader, data, model  # noqa: F401  (fixtures)
from tests.test_mtbi import behaviors, whisper_dir  # noqa: F401  (fixtures)

ATOL = 1e-5  # largest lr here is 1e-2 (MTBI stage 2); see the module docstring
RTOL = 1e-4
BF16_STEP = 2**-7  # one bf16 rounding step, relative: fp32 noise before a bf16-true cast (module docstring)


def _whisper(whisper_dir) -> list[str]:
    return ["encoder=whisper", f"model.perception.encoder.pretrained_model={whisper_dir}",
            "model.perception.encoder.d_model=32", "model.perception.encoder.pad_to_window=false"]


def recipe_command(recipe: str, assets, behaviors, whisper_dir, data, tmp: Path) -> list[str]:  # noqa: F811
    """The training command of ``recipe`` on the tiny assets (2-utterance batches, seeds fixed)."""
    common = ["llm=hf", f"model.pretrained_llm={assets['llm']}", "model.lr_scheduler.warmup_steps=1", "+model.optimizer.eps=1e-3",
              "trainer.accelerator=cpu", "trainer.max_steps=2", "exp_manager.create_tensorboard_logger=false",
              f"exp_manager.exp_dir={tmp / 'runs'}", f"output_nemo={tmp / 'out.nemo'}"]
    if recipe == "plain":
        return [str(REPO / "examples" / "speechlm_train.py"), "encoder=conformer_tiny", *common,
                "model.perception.modality_adapter.hidden_dim=64",
                f"data.train_ds.input_cfg.0.manifest_filepath={assets['manifest']}", "data.train_ds.batch_size=2",
                "data.train_ds.shard_seed=0"]
    if recipe == "mtbi_kl_interleaved":
        return [str(REPO / "examples" / "mtbi_train.py"), *_whisper(whisper_dir), *common,
                "model.perception.modality_adapter.hidden_dim=64", "model.perception.modality_adapter.spec_augment=null",
                "model.mtbi.kl_weight=0.5", "data.train_ds.input_cfg.0.interleave.prob=0.5",
                "connector_pretraining.steps=3", "connector_pretraining.batch_size=4",
                f"data.train_ds.input_cfg.0.manifest_filepath={behaviors}", "data.train_ds.batch_size=2",
                "data.train_ds.shard_seed=0", f"feature_cache.dir={tmp.parent / 'features'}"]
    if recipe == "joint_text_steps":
        # Text-only steps: the speech encoder and adapter get no gradient (find_unused_parameters).
        # The text group only: a multi-config sampler draws one group per step on every rank (2 ranks x
        # group g) where one accumulating process draws one per micro-batch, and lhotse's round robin takes
        # its first batch from the first group whatever the weights (an audio group at weight 0 included).
        return [str(REPO / "examples" / "joint_sft_train.py"), "encoder=conformer_tiny", "adapter=stack_mlp", *common,
                "model.perception.modality_adapter.hidden_dim=64", "model.lora.r=4", "model.lora.lora_alpha=4",
                "~data.train_ds.audio", "~data.train_ds.sampler_weights.audio",
                f"data.train_ds.text.input_cfg.0.manifest_filepath={data['text_sft']}",
                "data.train_ds.sampler_weights.text=1.0", "data.train_ds.shard_seed=0"]
    raise ValueError(recipe)


def run(cmd: list[str], cwd: Path, expect_code: int = 0) -> str:
    """Run a training command; NEMO_TESTING=1 makes NeMo's logger print on every rank, not only rank 0."""
    cwd.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=1800, cwd=cwd,
                          env={**os.environ, "NEMO_TESTING": "1"})
    log = proc.stdout + proc.stderr
    assert proc.returncode == expect_code, log[-6000:]
    return log


def assert_same_weights(got: Path, want: Path, start: Path | None = None, atol: float = ATOL, rtol: float = RTOL) -> float:
    a, b = nemo_weights(got), nemo_weights(want)
    assert a.keys() == b.keys()
    # BatchNorm running statistics are not parameters and DDP does not sync them (no SyncBatchNorm): rank 0
    # saves the statistics of its own micro-batches, the accumulating process those of both. Explained, so left out.
    for k in [k for k in a if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]:
        del a[k], b[k]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].numel())
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m, k=k: f"{k}: {m}")
    if start is not None:
        assert_trained(got, start)
    return worst


def assert_trained(trained: Path, start: Path) -> float:
    """The run at ``trained`` moved its weights from the untrained run's (``start``: the same command at
    ``max_steps=0``) by well over the comparisons' tolerance: two runs that trained nothing write equal files.
    A weight is compared at the trained file's dtype (a bf16-true run's untrained weights are the start's, rounded)."""
    a, s = nemo_weights(trained), nemo_weights(start)
    moved = max(float((a[k].float() - s[k].to(a[k].dtype).float()).abs().max()) for k in a
                if a[k].is_floating_point() and a[k].numel() and not k.endswith(("running_mean", "running_var")))
    assert moved > 3 * ATOL, f"{trained}: the largest weight change from the untrained run is {moved:.2e}"
    return moved


# The precisions the comparisons run in; bf16-mixed+frozen is what the README's GPU commands train in.
PRECISIONS = {"32": ["trainer.precision=32"], "bf16-true": ["trainer.precision=bf16-true"],
              "bf16-mixed+frozen": ["trainer.precision=bf16-mixed", "frozen_weights_dtype=bfloat16"]}


# Plain SFT used to differ too (8.3e-5): the tiny Conformer had NeMo's default 0.1 input/embedding dropout, random
# per process (now 0 in conformer_tiny.yaml), and BatchNorm running statistics, which DDP does not sync (left out
# above). Joint SFT on text-only steps differed by up to 1.7e-4 (also under FSDP2) because the two sides trained
# on different batches: the audio group, at sampler weight 0, still gave the first batch (lhotse's round robin
# starts at its first sampler whatever the weights), and each DDP rank draws the same group per step, so the 2
# ranks trained on two audio batches where one process got audio + text. With the text group alone: 1.2e-10.
# MTBI without KL and interleaving is not run here: its code is a subset of mtbi_kl_interleaved's (measured
# bit-identical under DDP in sessions 12-15), and the suite's time goes to the runs that cover more.
RECIPES = ["plain", "mtbi_kl_interleaved", "joint_text_steps"]


@pytest.fixture(scope="module")
def untrained(assets, behaviors, whisper_dir, data, tmp_path_factory):  # noqa: F811
    """``recipe``'s ``.nemo`` at ``max_steps=0`` (MTBI: after connector pre-alignment, before any step), once."""
    done: dict[str, Path] = {}

    def start(recipe: str) -> Path:
        if recipe not in done:
            start_dir = tmp_path_factory.mktemp(recipe) / "untrained"
            run(recipe_command(recipe, assets, behaviors, whisper_dir, data, start_dir)
                + ["trainer.devices=1", "trainer.max_steps=0"], start_dir)
            done[recipe] = start_dir / "out.nemo"
        return done[recipe]

    return start


@pytest.fixture(scope="module")
def one_process(assets, behaviors, whisper_dir, data, tmp_path_factory, untrained):  # noqa: F811
    """What DDP and FSDP2 are compared with: ``recipe`` in one process accumulating 2 micro-batches, at ``precision``
    (its ``.nemo``), trained once for both comparisons, and checked to have trained (else equal files prove nothing)."""
    done: dict[tuple[str, str], Path] = {}

    def reference(recipe: str, precision: str = "32") -> Path:
        if (recipe, precision) not in done:
            one_dir = tmp_path_factory.mktemp(recipe) / "one"
            run(recipe_command(recipe, assets, behaviors, whisper_dir, data, one_dir)
                + ["trainer.devices=1", "trainer.accumulate_grad_batches=2", *PRECISIONS[precision]], one_dir)
            moved = assert_trained(one_dir / "out.nemo", untrained(recipe))
            print(f"{recipe} {precision}: one process moved its weights by up to {moved:.2e}")
            done[recipe, precision] = one_dir / "out.nemo"
        return done[recipe, precision]

    return reference


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_two_ddp_ranks_equal_one_process_accumulating_two(assets, behaviors, whisper_dir, data, tmp_path, one_process, recipe):  # noqa: F811
    ddp_dir = tmp_path / "ddp"
    ddp_log = run(recipe_command(recipe, assets, behaviors, whisper_dir, data, ddp_dir) + ["trainer.devices=2"], ddp_dir)
    assert "`max_steps=2` reached" in ddp_log
    assert "Rank 1 of 2 started before fit" in ddp_log  # the second process ran (Lightning's launcher)
    if recipe.startswith("mtbi"):  # the cache was filled in halves, one per rank
        assert "'rank': 0, 'this_rank': 4" in ddp_log and "'rank': 1, 'this_rank': 4" in ddp_log
        assert len(list((tmp_path / "features").rglob("*.npy"))) == 8
    worst = assert_same_weights(ddp_dir / "out.nemo", one_process(recipe), atol=ATOL)
    print(f"{recipe}: largest |DDP - one process| weight difference {worst:.2e}")


@pytest.mark.slow
def test_the_gpu_commands_precision_on_two_ddp_ranks_equals_one_process(assets, behaviors, whisper_dir, data, tmp_path,  # noqa: F811
                                                                        one_process):
    """The README's GPU command (bf16-mixed, frozen weights stored in bf16) on 2 DDP ranks: DDP broadcasts the bf16
    frozen weights and reduces the fp32 trained ones' gradients; MTBI, the recipe with every part (feature cache,
    pre-alignment, read-out, KL, interleaving)."""
    ddp_dir = tmp_path / "ddp"
    log = run(recipe_command("mtbi_kl_interleaved", assets, behaviors, whisper_dir, data, ddp_dir)
              + ["trainer.devices=2", *PRECISIONS["bf16-mixed+frozen"]], ddp_dir)
    assert "`max_steps=2` reached" in log and "Rank 1 of 2 started before fit" in log
    weights = nemo_weights(ddp_dir / "out.nemo")
    assert weights["ctc_readout.residual_gate"].dtype == torch.float32  # trained: fp32
    assert weights["llm.base_model.model.lm_head.weight"].dtype == torch.bfloat16  # frozen: bf16
    worst = assert_same_weights(ddp_dir / "out.nemo", one_process("mtbi_kl_interleaved", "bf16-mixed+frozen"),
                                atol=ATOL, rtol=BF16_STEP)
    print(f"bf16-mixed, frozen in bf16: largest |DDP - one process| weight difference {worst:.2e}")


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(assets, behaviors, whisper_dir, data, tmp_path, untrained):  # noqa: F811
    """MTBI with connector pre-alignment + frozen connector, feature cache, KL and interleaving, on 2 FSDP2 ranks:
    the checkpoint is gathered, restored into the sharded model (the read-out's vocabulary included) and each rank's
    stream skips its own trained batches."""
    def command(tmp, *parallel):
        return recipe_command("mtbi_kl_interleaved", assets, behaviors, whisper_dir, data, tmp) + [
            "trainer.max_steps=4", "exp_manager.checkpoint_callback_params.every_n_train_steps=2", *parallel]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    # The uninterrupted run: one process accumulating 2 batches, which 2 FSDP2 ranks equal up to the summation order
    # of pre-alignment's split batches (test_fsdp2_on_two_ranks_equals_one_process_accumulating_two), at less cost
    # than 2 more ranks. Measured 1.6e-6 (bit-identical while every rank ran the whole pre-alignment).
    run(command(whole, "trainer.devices=1", "trainer.accumulate_grad_batches=2"), whole)
    fsdp2 = ("trainer.devices=2", "trainer.strategy=fsdp2",
             "+trainer.callbacks=[{_target_: nemo_speechlm.parts.preemption.ExitAfterStep, step: 3}]")
    log = run(command(killed, *fsdp2), killed, expect_code=75)
    assert "killing the process after step 3" in log and not (killed / "out.nemo").exists()
    log = run(command(killed, *fsdp2), killed)  # the same command again
    assert "Connector pre-alignment skipped: resuming from a checkpoint" in log
    assert "the training stream skips 2 batches" in log
    assert "`max_steps=4` reached" in log
    worst = assert_same_weights(killed / "out.nemo", whole / "out.nemo", start=untrained("mtbi_kl_interleaved"))
    print(f"resume: largest |resumed - uninterrupted| weight difference {worst:.2e}")


# Plain SFT's parts (LLM, encoder, connector) are all in these two; bf16-true is what an LLM too big for one GPU
# trains in, and it once failed under FSDP2 in every recipe (Lightning converted the model after sharding).
# The bf16-true run writes the small file (output_scope=trainable) that a user of an LLM too big for one GPU wants:
# its fingerprints are read from the gathered weights, not from the ranks' shards.
FSDP2_RUNS = [("mtbi_kl_interleaved", "32", "full"), ("mtbi_kl_interleaved", "bf16-true", "trainable"),
              ("mtbi_kl_interleaved", "bf16-mixed+frozen", "full"), ("joint_text_steps", "32", "full")]


@pytest.mark.slow
@pytest.mark.parametrize("recipe, precision, scope", FSDP2_RUNS)
def test_fsdp2_on_two_ranks_equals_one_process_accumulating_two(assets, behaviors, whisper_dir, data, tmp_path, one_process,  # noqa: F811
                                                                recipe, precision, scope):
    """``trainer.strategy=fsdp2``: the LLM's layers, embeddings, head, the speech side and (MTBI) the CTC read-out
    sharded over 2 gloo ranks; the gathered ``.nemo`` equals one unsharded process accumulating the same 2
    micro-batches at the same precision. A trainable-only file, restored here (another process than the one
    that wrote it), equals it too."""
    fsdp_dir = tmp_path / "fsdp2"
    log = run(recipe_command(recipe, assets, behaviors, whisper_dir, data, fsdp_dir)
              + ["trainer.devices=2", "trainer.strategy=fsdp2", *PRECISIONS[precision], f"output_scope={scope}",
                 # AdamW's multi-tensor path over DTensors, which it takes by default on GPUs (CPU defaults to the loop)
                 "+model.optimizer.foreach=true"],
              fsdp_dir)
    assert "`max_steps=2` reached" in log
    assert "sharded over 2 ranks" in log
    weights = nemo_weights(fsdp_dir / "out.nemo")
    if recipe.startswith("mtbi"):  # the cache filled in halves before fit, as under DDP; the read-out's gate trained
        assert "'rank': 0, 'this_rank': 4" in log and "'rank': 1, 'this_rank': 4" in log
        assert weights["ctc_readout.residual_gate"].abs().item() > 0
        assert weights["ctc_readout.residual_gate"].dtype == (torch.bfloat16 if precision == "bf16-true" else torch.float32)
    rtol = RTOL if precision == "32" else BF16_STEP
    if scope == "full":
        worst = assert_same_weights(fsdp_dir / "out.nemo", one_process(recipe, precision), atol=ATOL, rtol=rtol)
    else:
        worst = _assert_trainable_file_restores_to(fsdp_dir / "out.nemo", one_process(recipe, precision), rtol=rtol)
    print(f"{recipe} {precision} {scope}: largest |FSDP2 - one process| weight difference {worst:.2e}")


def _assert_trainable_file_restores_to(small: Path, full: Path, rtol: float) -> float:
    """``small`` (MTBI, written with output_scope=trainable) holds no base LLM or encoder weight, and restored, with
    those from the references, equals ``full``'s weights (fp32 references against a bf16 run's: one bf16 step)."""
    from nemo_speechlm.models import MTBIModel
    from nemo_speechlm.parts.checkpoint import restore_checked

    kept = nemo_weights(small)
    assert not [k for k in kept if k.startswith(("llm.", "perception.encoder.")) and "lora_" not in k]
    assert any("lora_" in k for k in kept) and any(k.startswith("perception.modality_adapter.") for k in kept)
    restored = restore_checked(MTBIModel, small, map_location="cpu").state_dict()
    want = nemo_weights(full)
    assert restored.keys() == want.keys()
    for k in want:
        # bf16-true: a gradient is a sum of bf16 products whose rounding scales with its tensor's values, not with the
        # element's own: a weight near 0 (LoRA B, from 0, after 2 steps) can differ by a step of its tensor's largest
        # (measured 2026-12-07: 3.1e-5 at 1.6e-3 in a LoRA B whose largest is 2.9e-3, one step 2.3e-5 at that size)
        scale = float(want[k].float().abs().max()) if want[k].numel() and rtol == BF16_STEP else 0.0
        torch.testing.assert_close(restored[k].float(), want[k].float(), atol=ATOL + BF16_STEP * scale, rtol=rtol,
                                   msg=lambda m, k=k: f"{k}: {m}")
    return max(float((restored[k].float() - want[k].float()).abs().max()) for k in want if want[k].numel())


# ------------------------------------------------------------------ fast checks of the pieces


def test_every_rank_takes_rank_0s_pre_aligned_connector(tmp_path):
    """FSDP2 does not broadcast the model as DDP does; the recipe broadcasts the pre-aligned connector (2 gloo ranks)."""
    def broadcast(rank: int) -> list:
        connector = torch.nn.Linear(3, 2)  # values that differ per rank, as GPU pre-alignment may leave them
        with torch.no_grad():
            for param in connector.parameters():
                param.fill_(float(rank + 1))
        broadcast_from_rank0(connector.state_dict().values())  # as the recipe passes them: views of the parameters
        return [p.detach().clone() for p in connector.parameters()]

    results = run_on_ranks(broadcast, 2, tmp_path)
    for got in results[1]:
        assert torch.equal(got, torch.ones_like(got))  # rank 1 held 2.0 everywhere; now rank 0's 1.0
    assert all(torch.equal(a, b) for a, b in zip(results[0], results[1]))
    broadcast_from_rank0([torch.zeros(1)])  # without a process group: nothing to do, no error


@pytest.mark.parametrize("devices, nodes, want", [(1, 1, "auto"), ("1", 1, "auto"), ([0], 1, "auto"), (2, 1, "ddp_x"),
                                                  (1, 2, "ddp_x"), ("auto", 1, "ddp_x"), (-1, 1, "ddp_x")])
def test_a_ddp_strategy_on_one_device_is_no_wrapper(devices, nodes, want):
    cfg = resolve_strategy({"strategy": "ddp_x", "devices": devices, "num_nodes": nodes})
    assert cfg["strategy"] == want


def test_fsdp2_strategy_spans_every_device_and_needs_a_device_count():
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = resolve_strategy({"strategy": "fsdp2", "devices": 4, "num_nodes": 2})["strategy"]
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    with pytest.raises(ConfigError, match="trainer.devices to an integer"):
        resolve_strategy({"strategy": "fsdp2", "devices": "auto"})


_RANK_0_FAILS = """
import os, subprocess, sys, time
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch import Trainer
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.parts.distributed import stop_started_ranks_on_failure

trainer = Trainer(devices=2, accelerator="cpu", strategy="ddp", logger=False, enable_checkpointing=False)
launcher = trainer.strategy._launcher
launcher.procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
children = list(launcher.procs)
# Lightning's observer, as start_ranks runs it, polling every 0.1 s instead of 5
_ChildProcessObserver(main_pid=os.getpid(), child_processes=launcher.procs, sleep_period=0.1).start()
with stop_started_ranks_on_failure(trainer):
    pass
try:
    with stop_started_ranks_on_failure(trainer):
        sys.exit(0)  # a clean stop (NeMo's preemption callback after its checkpoint)
except SystemExit:
    pass
time.sleep(0.5)
assert all(child.poll() is None for child in children), "a run that ended well ended its ranks"
try:
    with stop_started_ranks_on_failure(trainer):
        raise ConfigError("bad")
except ConfigError:
    print("CHILDREN", [child.wait(timeout=30) for child in children], flush=True)
    time.sleep(1)  # a rank 0 slow to exit (loggers flushing, CUDA teardown): the observer must not kill it
    sys.exit(2)
"""


def test_rank_0_failing_ends_the_ranks_it_started():
    """A rank-0 failure before, in or after ``fit`` ends the child ranks (NCCL left them waiting in their next
    collective until the process group's timeout), and rank 0 still exits with its own code: Lightning's process
    observer, seeing a child killed, SIGKILLed rank 0 when it took longer than one poll to exit. A run that ends well
    leaves the children to finish. Real Lightning DDP launcher and observer; the child rank is a process that would
    sleep for a minute."""
    import signal

    proc = subprocess.run([sys.executable, "-c", _RANK_0_FAILS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr[-3000:]
    assert f"CHILDREN {[-signal.SIGKILL] * 2}" in proc.stdout


@pytest.mark.slow
def test_a_file_rank_0_cannot_decode_ends_every_rank_with_one_line(assets, behaviors, whisper_dir, data, tmp_path):  # noqa: F811
    """Rank 0's half of the feature cache holds a file that does not decode: the run ends with one line naming it
    and exit code 2, and rank 1 is ended too (it would wait for rank 0 in the cache's barrier)."""
    lines = Path(behaviors).read_text().splitlines()
    first = json.loads(lines[0])
    first["audio_filepath"] = str(make_damaged_flac(first["audio_filepath"], tmp_path / "damaged.flac"))
    damaged = tmp_path / "behaviors.jsonl"
    damaged.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")
    cmd = recipe_command("mtbi_kl_interleaved", assets, damaged, whisper_dir, data, tmp_path / "run")
    started = time.monotonic()
    log = run(cmd + ["trainer.devices=2"], tmp_path / "run", expect_code=2)
    errors = [line for line in log.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: {tmp_path / 'damaged.flac'}: cannot read audio (flac decoder lost sync) — check that it "
                      "is an undamaged audio file (WAV, FLAC, OGG, MP3, ...)"], log[-3000:]
    assert "Rank 0 failed: ending the 1 rank(s) it started" in log
    assert "Traceback" not in log, log[-3000:]  # rank 1 did not fail in a collective with rank 0 gone
    print(f"ended in {time.monotonic() - started:.0f} s")


def test_pre_fit_work_moves_the_speech_side_only(assets):  # noqa: F811
    """The feature cache and pre-alignment need the perception, the read-out and the LLM's input embeddings on the
    rank's device; the LLM's layers stay on the host, for FSDP2 to move only this rank's shards of them at ``fit``
    (the whole fp32 LLM went to every GPU). The meta device stands in for the GPU."""
    model = SpeechLMModel(model_config(assets["llm"], ctc_readout=True))
    model.move_speech_side(torch.device("meta"))
    assert model.device.type == "meta"  # where the speech code puts its inputs
    speech_side = [*model.perception.parameters(), *model.ctc_readout.parameters(), *model.ctc_readout.buffers(),
                   model.embed_tokens.weight]
    assert all(t.is_meta for t in speech_side)
    layers = list(model.llm.model.layers.parameters())
    assert layers and not any(p.is_meta for p in layers)


def _first_input_ids(loader, n: int) -> list[torch.Tensor]:
    return [b["input_ids"] for _, b in zip(range(n), loader)]


@pytest.mark.parametrize("stream", ["single", "bucketed", "joint_mixed_groups"])
def test_a_resumed_stream_skips_exactly_the_batches_trained_on(assets, data, model, stream):  # noqa: F811
    """Replaying 3 batches through the sampler continues the stream where 3 trained batches left it,
    with mtbi.yaml's length bucketing and the joint SFT group draws (audio or text, per step) included."""
    def loader():
        if stream in ("single", "bucketed"):
            cfg = _single_loader({"type": "speechlm_manifest", "manifest_filepath": str(assets["manifest"]),
                                  "prompt": "Repeat: <|audio|>"}, batch_size=2)
            cfg.train_ds.shuffle = True
            if stream == "bucketed":  # mtbi.yaml's batching, scaled to the tiny data
                del cfg.train_ds["batch_size"]
                cfg.train_ds.update({"use_multimodal_sampling": True, "batch_tokens": 120, "use_bucketing": True,
                                     "num_buckets": 2, "bucket_buffer_size": 50, "concurrent_bucketing": False})
        else:
            cfg = _joint_data_cfg(data, sampler_weights={"audio": 0.5, "text": 0.5})
        dm = build_datamodule(OmegaConf.create(cfg), model)
        dm.setup("fit")
        return dm.train_dataloader()

    whole = _first_input_ids(loader(), 6)
    resumed = loader()
    assert skip_batches(resumed, 3)
    for got, want in zip(_first_input_ids(resumed, 3), whole[3:], strict=True):
        torch.testing.assert_close(got, want)


def test_ranks_with_uneven_shares_fill_the_cache_with_a_nemo_conformer(assets, tmp_path):  # noqa: F811
    """NeMo's Conformer all-reduces its longest input in every forward; ranks encoding different numbers of
    batches (3 utterances over 2 ranks: 2 and 1) must neither deadlock nor abort, and end with positional tables of
    the same size (DDP broadcasts buffers), the size one process encoding everything reaches."""
    from nemo_speechlm.data.feature_cache import FeatureCache, fill_feature_cache
    from nemo_speechlm.models import SpeechLMModel
    from tests.conftest import model_config
    from tests.test_connector import utterances

    model = SpeechLMModel(model_config(assets["llm"]))
    model.perception.encoder.set_max_audio_length(4)  # short, so encoding these clips extends it
    cuts = [cut for cut, _ in utterances(assets)[:3]]

    def fill(rank: int, cache_dir: Path) -> tuple[int, int]:
        counts = fill_feature_cache(model, FeatureCache(cache_dir, "fp"), cuts, batch_size=1)
        return counts["encoded"], model.perception.encoder.max_audio_length

    one = run_on_ranks(fill, 1, tmp_path, tmp_path / "cache1")[0]
    two = run_on_ranks(fill, 2, tmp_path, tmp_path / "cache2")
    assert [two[r][0] for r in (0, 1)] == [2, 1]
    assert two[0][1] == two[1][1] == one[1] > 4


def test_a_resumed_fill_shares_what_is_left_evenly(assets, tmp_path):  # noqa: F811
    """A fill stopped after rank 0 cached its share: split before dropping cached utterances, rank 1 then encoded
    its whole share while rank 0 waited at the barrier (past NCCL's timeout on a large corpus)."""
    from nemo_speechlm.data.feature_cache import FeatureCache, fill_feature_cache
    from tests.test_connector import utterances

    model = SpeechLMModel(model_config(assets["llm"]))
    model.perception.encoder.sync_max_audio_length = False  # unequal shares by design in the old split
    cuts = [cut for cut, _ in utterances(assets)[:4]]
    cache_dir = tmp_path / "cache"
    fill_feature_cache(model, FeatureCache(cache_dir, "fp"), cuts[0::2], batch_size=1)  # rank 0's share of 2

    def fill(rank: int) -> int:
        return fill_feature_cache(model, FeatureCache(cache_dir, "fp"), cuts, batch_size=1)["encoded"]

    assert run_on_ranks(fill, 2, tmp_path) == {0: 1, 1: 1}
    assert all(cut in FeatureCache(cache_dir, "fp") for cut in cuts)


def test_a_rank_that_lists_the_cache_slowly_still_gets_its_share(assets, tmp_path):  # noqa: F811
    """Rank 0 began writing while rank 1 still listed the uncached utterances (a slow file system): rank 1 saw a
    shorter list, its stride no longer matched rank 0's, and some utterances were cached by no rank."""
    import time

    from nemo_speechlm.data.feature_cache import FeatureCache, fill_feature_cache
    from tests.test_connector import utterances

    model = SpeechLMModel(model_config(assets["llm"]))
    model.perception.encoder.sync_max_audio_length = False
    cuts = [cut for cut, _ in utterances(assets)[:6]]

    class SlowToList(FeatureCache):
        def __contains__(self, cut) -> bool:
            time.sleep(0.3)
            return super().__contains__(cut)

    def fill(rank: int) -> int:
        cache = (SlowToList if rank == 1 else FeatureCache)(tmp_path / "cache", "fp")
        return fill_feature_cache(model, cache, cuts, batch_size=1)["encoded"]

    assert run_on_ranks(fill, 2, tmp_path) == {0: 3, 1: 3}
    assert all(cut in FeatureCache(tmp_path / "cache", "fp") for cut in cuts)


class _LoggingModel(SpeechLMModel):
    """Records what the validation hooks log (no trainer in these processes)."""

    def log(self, name, value, **kwargs):
        self.logged[name] = float(value)


@pytest.mark.parametrize("shares", [[(0,), (1, 2)], [(0, 1, 2), ()]], ids=["uneven", "rank 1 drew nothing"])
def test_validation_metrics_are_means_over_every_ranks_batches(assets, tmp_path, shares):
    """Logged per rank, val_loss and val_acc were rank 0's share of the validation data (lhotse splits it across
    ranks); every rank now logs the mean over all ranks' batches, also when a rank drew none (no hang)."""
    torch.manual_seed(0)
    model = _LoggingModel(model_config(assets["llm"])).eval()
    # The Conformer all-reduces its longest input in every forward; here the ranks run unequal numbers of batches
    model.perception.encoder.sync_max_audio_length = False
    cfg = OmegaConf.create({"train_ds": {"input_cfg": [{"type": "speechlm_manifest", "prompt": "Repeat: <|audio|>",
                                                        "manifest_filepath": str(assets["manifest"])}],
                                         "batch_size": 3, "shuffle": False, "num_workers": 0, "seed": 0, "shard_seed": 0}})
    dm = build_datamodule(cfg, model)
    dm.setup("fit")
    batches = [batch for _, batch in zip(range(3), dm.train_dataloader())]

    def validate(rank: int, indices=(0, 1, 2)) -> dict:
        model.logged = {}
        model.on_validation_epoch_start()
        with torch.no_grad():
            for i in (shares[rank] if rank is not None else indices):
                model.validation_step(batches[i], i)
        model.on_validation_epoch_end()
        return model.logged

    everything = validate(None)
    assert set(everything) == {"val_loss", "val_acc"}
    rank_0_alone = validate(None, shares[0])
    if shares[1]:
        assert rank_0_alone["val_loss"] != pytest.approx(everything["val_loss"], rel=1e-3)
    results = run_on_ranks(validate, 2, tmp_path)
    for rank in (0, 1):
        assert results[rank] == pytest.approx(everything, rel=1e-5)
    # and Lightning logs them so (one process)
    from lightning.pytorch import Trainer

    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    plain = SpeechLMModel(model.cfg)
    plain.load_state_dict(model.state_dict())
    trainer.validate(plain, dataloaders=torch.utils.data.DataLoader(batches, batch_size=None), verbose=False)
    assert {k: float(v) for k, v in trainer.callback_metrics.items()} == pytest.approx(everything, rel=1e-5)
    loaders = [torch.utils.data.DataLoader(batches[:1], batch_size=None), torch.utils.data.DataLoader(batches[1:], batch_size=None)]
    trainer.validate(plain, dataloaders=loaders, verbose=False)  # several loaders: one mean each, not one for all
    assert set(trainer.callback_metrics) == {f"val_{m}_loader{i}" for m in ("loss", "acc") for i in (0, 1)}
