"""Padding in training batches: the share of spliced LLM positions that are padding, per batching setting.

    python benchmarks/padding.py --nemo demo_out/mtbi.nemo --behaviors demo_out/behaviors.jsonl \
        --features demo_out/features [--batches 60] [--num-buckets 8] [hydra overrides of nemo_speechlm/conf/mtbi.yaml ...]

Builds the MTBI training stream exactly as ``examples/mtbi_train.py`` does (``mtbi.yaml``'s data config,
interleaving included, batches read from the feature cache) and splices each batch with the trained
model (encoder features -> connector -> CTC read-out -> LLM input positions; no LLM forward), so the
positions are the real ones. Settings compared on the same data:

* ``fixed``: mtbi.yaml's batching as it is: ``batch_size`` examples per batch, no bucketing (the demo);
* ``frames``: lhotse dynamic bucketing by total tokens (``use_multimodal_sampling``, ``batch_tokens``
  chosen so that a batch holds ``batch_size`` examples on average, ``--num-buckets`` buckets), a speech
  turn counted as NeMo counts it (``duration / token_equivalent_duration``: the connector's frames);
* ``readout``: the same bucketing, a speech turn counted as the CTC read-out gives it to the LLM
  (transcript tokens + 2; ``speech_positions=transcript``, what our data types do for a read-out model).

Prints one line per setting: padding share of positions, examples per batch, and positions per batch,
in padded rows and packed (``model.pack_sequences``, on by default: what a training step computes);
the last line, ``RESULT {json}``, holds the same numbers.
Data loading is cheap here (cached features); nothing is timed.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics

import torch
from hydra import compose, initialize_config_dir
from nemo.collections.common.data.lhotse import NeMoMultimodalConversation
from omegaconf import OmegaConf, open_dict

import nemo_speechlm
from nemo_speechlm.data.datamodule import build_datamodule, fill_model_settings
from nemo_speechlm.data.feature_cache import prepare_feature_cache
from nemo_speechlm.models.loading import load_model
from nemo_speechlm.parts.packing import pack_rows


def batches_of(data_cfg, model, cache, n: int) -> list[dict]:
    dm = build_datamodule(data_cfg, model, cache)
    dm.setup("fit")
    return [b for _, b in zip(range(n), dm.train_dataloader())]


@torch.no_grad()
def measure(model, batches: list[dict]) -> dict:
    """Padding share of the LLM input positions after audio splicing, in padded rows and after
    ``model.pack_sequences`` packs them (what a training step computes over; ``parts/packing.py``)."""
    attended = total = packed = 0
    for batch in batches:
        mask = model.prepare_inputs(batch)["attention_mask"]
        attended, total, packed = attended + int(mask.sum()), total + mask.numel(), packed + pack_rows(mask)[0].numel()
    sizes = [len(b["input_ids"]) for b in batches]
    return {"padding": 1 - attended / total, "examples_per_batch": statistics.mean(sizes),
            "positions_per_batch": total / len(batches), "packed_padding": 1 - attended / packed,
            "packed_positions_per_batch": packed / len(batches)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nemo", required=True, help="a trained MTBI .nemo (the demo's demo_out/mtbi.nemo)")
    p.add_argument("--behaviors", required=True, help="the behaviors JSONL it trained on")
    p.add_argument("--features", required=True, help="the feature cache folder")
    p.add_argument("--batches", type=int, default=60, help="batches per setting")
    p.add_argument("--num-buckets", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    with initialize_config_dir(config_dir=str(nemo_speechlm.CONF_DIR), version_base=None):
        cfg = compose("mtbi", overrides=[f"data.train_ds.input_cfg.0.manifest_filepath={args.behaviors}", *args.overrides])
    OmegaConf.resolve(cfg.data)
    model = load_model(args.nemo, device="cpu").eval()
    fill_model_settings(cfg.data, model)
    cache = prepare_feature_cache(OmegaConf.create({"dir": args.features}), model, cfg.data)

    batch_size = cfg.data.train_ds.batch_size
    fixed = batches_of(cfg.data, model, cache, args.batches)
    examples = [c for b in fixed for c in b["conversations"]]
    mean_length = {"frames": statistics.mean(NeMoMultimodalConversation.total_length.fget(c) for c in examples),
                   "readout": statistics.mean(c.total_length for c in examples)}  # (the same without a read-out)
    results = {"fixed": measure(model, fixed)}
    names = {"fixed": f"fixed, batch_size={batch_size}, no bucketing (mtbi.yaml, the demo)"}
    for counting in ("frames", "readout"):
        batch_tokens = int(batch_size * mean_length[counting])  # batch_size examples per batch on average
        bucketed = copy.deepcopy(cfg.data)
        with open_dict(bucketed):
            bucketed.train_ds.pop("batch_size")
            bucketed.train_ds.update({
                "use_multimodal_sampling": True, "batch_tokens": batch_tokens, "use_bucketing": True,
                "num_buckets": args.num_buckets, "bucket_buffer_size": 2000, "concurrent_bucketing": False})
            for entry in bucketed.train_ds.input_cfg:
                entry.speech_positions = "frames" if counting == "frames" else "transcript"
        results[counting] = measure(model, batches_of(bucketed, model, cache, args.batches))
        what = "the connector's frames" if counting == "frames" else "the read-out's positions"
        names[counting] = f"bucketed, batch_tokens={batch_tokens}, {args.num_buckets} buckets, speech counted as {what}"
    print(f"data: {args.behaviors}; model: {args.nemo}; {args.batches} batches per setting")
    print("| setting | padding | examples / batch | positions / batch | packed: padding | packed: positions / batch |\n"
          "|---|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        print(f"| {names[key]} | {r['padding']:.1%} | {r['examples_per_batch']:.1f} | {r['positions_per_batch']:.0f} | "
              f"{r['packed_padding']:.1%} | {r['packed_positions_per_batch']:.0f} |")
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()
