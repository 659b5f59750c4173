"""The throughput benchmarks run end to end in tiny mode (their numbers are printed, never asserted)."""
import json
import subprocess
import sys

import pytest

from nemo_speechlm.models import MTBIModel
from tests.conftest import REPO, model_config
from tests.tiny_assets import write_behaviors


def run_benchmark(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=900, cwd=REPO)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads([line for line in proc.stdout.splitlines() if line.startswith("RESULT ")][-1][len("RESULT "):])


def test_generation_benchmark_tiny_batched_answers_equal_one_at_a_time():
    result = run_benchmark("generation_throughput.py", "--tiny", "--items", "6", "--batch-size", "3", "--threads", "1")
    for part in ("speech", "text"):
        assert result[part]["identical_answers"] == 6
        assert result[part]["batch_1"]["tokens"] == result[part]["batch_3"]["tokens"] > 0
        assert result[part]["speedup"] > 0


def test_salm_comparison_tiny_sees_the_same_inputs():
    """The harness refuses to time unless SALM's same-weights losses equal ours (1e-4), so a run that
    finishes compared like for like."""
    result = run_benchmark("train_throughput.py", "--tiny", "--steps", "2", "--warmup", "1", "--vs-salm")
    assert all(abs(ours - salm) <= 1e-4 for ours, salm in result["same_weights_losses"])
    assert result["salm"]["padding_share"] == result["ours"]["padding_share"]
    assert result["ours_over_salm"]["steps_per_s"] > 0


def test_padding_benchmark_counts_the_spliced_positions_of_each_batching(assets, tmp_path):
    """A read-out model (pre-aligned for 2 CTC steps, so the read-out has its vocabulary) under the three batchings."""
    from nemo_speechlm.data.conversations import cut_for_audio
    from nemo_speechlm.data.manifest import read_manifest
    from nemo_speechlm.parts.connector_ctc import pretrain_connector_ctc

    model = MTBIModel(model_config(assets["llm"], freeze_params=[r"^llm\..+$", r"^perception\.encoder\..+$"], ctc_readout=True))
    utterances = [(cut_for_audio(e["audio_filepath"], 0.0, e["duration"]), e["text"]) for e in read_manifest(assets["manifest"])]
    pretrain_connector_ctc(model, utterances, steps=2, batch_size=2)
    model.save_to(str(tmp_path / "mtbi.nemo"))
    behaviors = write_behaviors(assets["manifest"], tmp_path / "behaviors.jsonl")
    result = run_benchmark("padding.py", "--nemo", str(tmp_path / "mtbi.nemo"), "--behaviors", str(behaviors),
                           "--features", str(tmp_path / "features"), "--batches", "4", "--num-buckets", "2",
                           "data.train_ds.batch_size=2")
    assert set(result) == {"fixed", "frames", "readout"}
    assert result["fixed"]["examples_per_batch"] == 2
    for r in result.values():
        assert 0 <= r["padding"] < 1 and r["positions_per_batch"] > 0
        assert 0 <= r["packed_padding"] <= r["padding"] and r["packed_positions_per_batch"] <= r["positions_per_batch"]


def test_prealign_ranks_benchmark_tiny_two_ranks_align_the_one_process_connector(tmp_path):
    """Without SpecAugment (masks are seeded per rank) the 2-rank connector is the one-process one up to summation order."""
    result = run_benchmark("prealign_ranks.py", "--tiny", "--steps", "4", "--utterances", "8", "--heldout", "2",
                           "--batch-size", "4", "--out", str(tmp_path), "model.perception.modality_adapter.spec_augment=null")
    assert set(result["heldout_connector_wer"]) == {"1", "2"}
    assert result["max_weight_difference"] < 1e-4
    assert result["final_loss"]["2"] == pytest.approx(result["final_loss"]["1"], abs=2e-4)  # rounded to 4 digits
    assert result["speedup"] > 0


def test_mfu_counts_the_adapter_at_its_stacked_positions(assets):
    """A frame-stacking adapter runs every layer on frames / stack positions; it was counted per frame."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mfu import model_flops_per_step

    from nemo_speechlm.models import SpeechLMModel

    model = SpeechLMModel(model_config(assets["llm"]))  # the tiny conformer, a stack-2 adapter, the LLM frozen
    assert model.perception.modality_adapter.stack == 2

    def counted(prefixes):
        params = [p for n, p in model.named_parameters() if n.startswith(prefixes)]
        return 2 * sum(p.numel() for p in params) + 4 * sum(p.numel() for p in params if p.requires_grad)

    frames = 100
    by_hand = (counted(("perception.preprocessor", "perception.encoder")) * frames
               + counted(("perception.modality_adapter", "perception.proj")) * frames / 2)
    assert model_flops_per_step(model, 0, frames, 0) == pytest.approx(by_hand)


def test_mfu_counts_the_lm_head_at_trained_positions_only(assets):
    """The loss computes logits only where a token is trained; the LM head was counted at every position."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mfu import model_flops_per_step

    from nemo_speechlm.models import SpeechLMModel

    model = SpeechLMModel(model_config(assets["llm"]))  # the LLM frozen: forward + activation gradient, 4 N
    llm = model.llm
    head = llm.get_output_embeddings().weight.numel()
    body = sum(p.numel() for p in llm.parameters()) - llm.get_input_embeddings().weight.numel()
    body -= 0 if llm.get_output_embeddings().weight is llm.get_input_embeddings().weight else head
    assert model_flops_per_step(model, 10, 0, 3) == pytest.approx(4 * body * 10 + 4 * head * 3)


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0),
                                        ("NVIDIA L4", 121.0), ("NVIDIA A10G", 70.0), ("NVIDIA GeForce RTX 4090", None)])
def test_the_gpu_peak_is_the_longest_name_that_matches(name, peak):
    """By the first key in the name, the PCIe and NVL H100s got the SXM part's peak and an L40 an L4's."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from mfu import peak_tflops_of

    assert peak_tflops_of(name) == peak
