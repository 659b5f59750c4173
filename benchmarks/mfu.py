"""Model FLOPs utilisation (MFU) of a training step: model FLOPs per step / measured seconds per step / peak.

Model FLOPs, the usual two per multiply-add over the weight matrices (Kaplan et al. 2020; PaLM's MFU),
counted for the positions that carry data (padding excluded):

* LLM, per attended position: forward ``2 N``; backward ``2 N`` for the activation gradient (the speech
  side below it trains) plus ``2 N_trainable`` for weight gradients. ``N`` leaves out the input
  embedding (a lookup, no matmul) and the LM head, which is counted the same way per target position:
  the loss computes logits only where a token is trained (``SpeechLMModel.response_logits``; packed, the
  default, exactly those positions). Counted at every position it added ~15% to the demo's FLOPs.
* speech encoder, per encoder output frame, and adapter + projection, per adapter output position
  (``frames / stack`` for a frame-stacking adapter, which runs all its layers after stacking; they were
  counted per frame, ``stack`` times over): forward ``2 N``; backward ``4 N_trainable`` (weight and
  activation gradients of what trains; an upper bound for a frozen encoder under a trained adapter,
  which needs no activation gradient).

Not counted: attention scores (``4 * layers * width * length^2`` per sequence forward; a few percent at
a few hundred positions), the encoder's strided convolutions that run before subsampling, the mel
front end. So the MFU printed is a slight underestimate.
"""
from __future__ import annotations

import torch

# Dense bf16 tensor-core peaks, TFLOP/s (vendor data sheets; no sparsity). A plain "H100" / "H200" / "A100" is the SXM
# part ("NVIDIA H100 80GB HBM3"); the PCIe and NVL parts clock lower.
PEAK_BF16_TFLOPS = {"B200": 2250.0, "H200 NVL": 835.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
                    "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L40": 181.0, "A10G": 70.0, "A10": 125.0, "L4": 121.0}


def peak_tflops_of(name: str) -> float | None:
    """The dense bf16 peak of the GPU called ``name`` (``torch.cuda.get_device_name``): the longest key in it, so
    "L40S" is not read as "L40" or "L4", nor "H100 PCIe" as "H100"."""
    key = max((k for k in PEAK_BF16_TFLOPS if k in name), key=len, default=None)
    return PEAK_BF16_TFLOPS[key] if key else None


def gpu_peak_tflops(device: torch.device) -> float | None:
    """The dense bf16 peak of ``device``'s GPU, by name; None when unknown (pass ``--peak-tflops``)."""
    if device.type != "cuda":
        return None
    return peak_tflops_of(torch.cuda.get_device_name(device))


def _counts(module: torch.nn.Module, skip: tuple[torch.nn.Module, ...] = ()) -> tuple[int, int]:
    skipped = {id(p) for m in skip for p in m.parameters()}
    params = [p for p in module.parameters() if id(p) not in skipped]
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def model_flops_per_step(model, llm_positions: float, encoder_frames: float, target_positions: float) -> float:
    """FLOPs of one training step over ``llm_positions`` attended positions, ``target_positions`` trained
    tokens and ``encoder_frames`` frames."""
    embedding, head = model.llm.get_input_embeddings(), model.llm.get_output_embeddings()
    llm, llm_trainable = _counts(model.llm, skip=(embedding, head) if head is not None else (embedding,))
    head_n, head_trainable = _counts(head) if head is not None else (0, 0)  # a tied head: the embedding's weight
    after_encoder = (model.perception.modality_adapter, model.perception.proj)
    stack = getattr(model.perception.modality_adapter, "stack", 1)
    adapter, adapter_trainable = (sum(c) for c in zip(*(_counts(m) for m in after_encoder)))
    speech, speech_trainable = _counts(model.perception, skip=after_encoder)
    return ((4 * llm + 2 * llm_trainable) * llm_positions + (4 * head_n + 2 * head_trainable) * target_positions
            + (2 * speech + 4 * speech_trainable) * encoder_frames
            + (2 * adapter + 4 * adapter_trainable) * encoder_frames / stack)


def mfu(model, llm_positions_per_step: float, encoder_frames_per_step: float, target_positions_per_step: float,
        seconds_per_step: float, peak_tflops: float | None) -> dict:
    """``model_tflops_per_step``, ``achieved_tflops`` and ``mfu`` (None without a peak)."""
    flops = model_flops_per_step(model, llm_positions_per_step, encoder_frames_per_step, target_positions_per_step)
    achieved = flops / seconds_per_step / 1e12
    return {"model_tflops_per_step": flops / 1e12, "achieved_tflops": achieved, "peak_tflops": peak_tflops,
            "mfu": achieved / peak_tflops if peak_tflops else None}


def mfu_of_result(model, result: dict, peak_tflops: float | None) -> dict:
    """:func:`mfu` from a ``train_throughput.benchmark`` result (per-second rates -> per step)."""
    per_step = 1.0 / result["steps_per_s"]
    return mfu(model, result["llm_tokens_per_s"] * per_step,
               result["audio_seconds_per_s"] * per_step / model.encoder_frame_duration,
               result["target_tokens_per_s"] * per_step, per_step, peak_tflops)
