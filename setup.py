"""nemo_speechlm: a NeMo plugin that gives text LLMs speech ability (MTBI and joint speech-text SFT)."""
from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="nemo_speechlm",
    version="0.1.0",
    description="Speech LLMs from NeMo speech encoders and Hugging Face LLMs: MTBI and joint speech-text SFT",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["nemo_speechlm", "nemo_speechlm.*"]),
    package_data={"nemo_speechlm": ["resources/*.txt", "resources/*.yaml", "conf/*.yaml", "conf/*/*.yaml"]},
    # torch is deliberately not listed: the NeMo container ships its own build, and the
    # dev/CI setup (Makefile) installs the CPU wheel first.
    install_requires=[
        "nemo_toolkit[asr]==3.0.0",
        "lightning>=2.4,<2.5",
        "transformers>=4.51",
        "peft>=0.15",
        "gguf>=0.10",
        "librosa",
        "sentencepiece",
        "soundfile",
        "tokenizers",
        "jiwer>=3",
        "sacrebleu>=2.4",
        "rouge-score>=0.1.2",
        "tqdm",
        "num2words",
        "soxr",
        "matplotlib",
        "scipy",
    ],
    entry_points={"console_scripts": ["speechlm-infer = nemo_speechlm.inference:main"]},
    extras_require={
        # ctranslate2 only checks the Whisper converter against the reference runtime.
        "dev": ["pytest>=8", "pytest-timeout", "ctranslate2>=4"],
    },
)
