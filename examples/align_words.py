"""Add word alignments (``words: [{"word", "start", "end"}]``) to a NeMo manifest with a NeMo CTC model.

    python examples/align_words.py --manifest train.jsonl --output train_aligned.jsonl \
        --model stt_en_fastconformer_ctc_large --batch-size 16 --device cuda

MTBI speech-text interleaving needs these alignments. ``--model`` is a ``.nemo`` file or a
pretrained NeMo name; CTC and hybrid RNNT-CTC models work (the CTC head aligns). Times are
seconds from each line's ``offset``. Rerun the same command after a crash or Ctrl-C to
continue; with ``--skip-invalid`` lines that cannot be aligned go to
``<output>.rejected.jsonl`` and are counted in ``<output>.summary.json``.
"""
import torch

from nemo_speechlm.datagen.alignment import align_manifest, load_asr_model
from nemo_speechlm.parts.cli import CommandParser, positive_int, run_cli, SKIP_FLAG_HINT


def main(argv=None) -> None:
    p = CommandParser(description=__doc__)
    p.add_argument("--manifest", required=True, help="NeMo manifest: audio_filepath, duration, text[, offset]")
    p.add_argument("--output", required=True, help="aligned manifest (appended to; reruns resume)")
    p.add_argument("--model", required=True, help="NeMo CTC or hybrid RNNT-CTC model: .nemo path or pretrained name")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--skip-invalid", action="store_true", help="skip and count lines that are invalid or cannot be aligned")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    model = load_asr_model(args.model, device=args.device)
    summary = align_manifest(
        args.manifest, args.output, model, batch_size=args.batch_size, skip_invalid=args.skip_invalid, model_name=args.model
    )
    print(summary)


if __name__ == "__main__":
    run_cli(main, skip_hint=SKIP_FLAG_HINT)
