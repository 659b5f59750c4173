"""Small but real assets for the tests and the benchmarks' CPU smoke runs (test-only, so not in the
library): an HF Llama LLM with a trained BPE tokenizer and a chat template, a NeMo CTC ASR ``.nemo``, and wav files + a manifest.

Everything is built locally (no hub access) with the same classes the real checkpoints use.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile
import torch

CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SENTENCES = [
    "the cat sat on the mat",
    "please open the window",
    "it is raining again today",
    "my brother likes green tea",
    "we walked to the station",
    "the meeting starts at nine",
    "turn left after the bridge",
    "she reads a book every week",
]


def make_tiny_llm(out_dir: str | Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                  tie_word_embeddings: bool = False, attention_dropout: float = 0.0) -> Path:
    """A randomly initialised ``LlamaForCausalLM`` + a BPE tokenizer trained on a small corpus (its output layer
    tied to the embeddings with ``tie_word_embeddings``, as in SmolLM2; dropout in training mode with
    ``attention_dropout``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = SENTENCES + ["user assistant system transcribe repeat what is said in the audio answer question"]
    bpe.train_from_iterator(corpus * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=tie_word_embeddings,
        attention_dropout=attention_dropout,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    return out_dir


def make_tiny_whisper(out_dir: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """A random-weight Hugging Face Whisper checkpoint (80 mel bins) saved with ``save_pretrained``."""
    from transformers import WhisperConfig, WhisperModel

    torch.manual_seed(seed)
    config = WhisperConfig(
        d_model=d_model, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
        decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=2 * d_model, num_mel_bins=80,
    )
    WhisperModel(config).save_pretrained(out_dir)
    return Path(out_dir)


def tiny_whisper_perception(whisper_dir: str | Path, d_model: int = 32, pad_to_window: bool = False) -> dict:
    """``model.perception`` preprocessor + encoder entries for :func:`make_tiny_whisper` (as ``nemo_speechlm/conf/encoder/whisper.yaml``)."""
    return {
        "preprocessor": {"_target_": "nemo_speechlm.modules.whisper.WhisperLogMel", "pad_to_window": pad_to_window},
        "encoder": {
            "_target_": "nemo_speechlm.modules.whisper.WhisperEncoder",
            "pretrained_model": str(whisper_dir),
            "d_model": d_model,
            "pad_to_window": pad_to_window,
            "load_pretrained_weights": True,
            "architecture": None,
        },
    }


def tiny_conformer_config(feat_in: int = 32, d_model: int = 32, n_layers: int = 1) -> dict:
    """Preprocessor + FastConformer-style encoder (8x subsampling) small enough for CPU tests."""
    return {
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": 16000,
            "features": feat_in,
            "window_size": 0.025,
            "window_stride": 0.01,
            "normalize": "per_feature",
            "dither": 0.0,
            "pad_to": 0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": feat_in,
            "n_layers": n_layers,
            "d_model": d_model,
            "n_heads": 4,
            "subsampling": "dw_striding",
            "subsampling_factor": 8,
            "subsampling_conv_channels": 16,
            "ff_expansion_factor": 2,
            "conv_kernel_size": 9,
            "dropout": 0.0,
            "dropout_pre_encoder": 0.0,
            "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
    }


def make_tiny_asr_nemo(out_path: str | Path, seed: int = 0) -> Path:
    """A NeMo ``EncDecCTCModel`` saved with ``save_to``: an offline stand-in for a pretrained ASR ``.nemo``."""
    from nemo.collections.asr.models import EncDecCTCModel
    from omegaconf import OmegaConf

    torch.manual_seed(seed)
    labels = list(" abcdefghijklmnopqrstuvwxyz'")
    parts = tiny_conformer_config()
    cfg = OmegaConf.create(
        {
            **parts,
            "decoder": {
                "_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                "feat_in": parts["encoder"]["d_model"],
                "num_classes": len(labels),
                "vocabulary": labels,
            },
            "labels": labels,
            "optim": None,
        }
    )
    model = EncDecCTCModel(cfg=cfg)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model.save_to(str(out_path))
    return out_path


def make_wav_manifest(out_dir: str | Path, n: int = 8, sample_rate: int = 16000, seed: int = 0) -> Path:
    """``n`` short 16 kHz wav files (voiced-like harmonic signals, 0.6-1.2 s) and a NeMo manifest."""
    out_dir = Path(out_dir)
    (out_dir / "wav").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        duration = float(rng.uniform(0.6, 1.2))
        t = np.arange(int(duration * sample_rate)) / sample_rate
        f0 = rng.uniform(90, 220)
        wav = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6)) * 0.1
        wav = (wav * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t)) + rng.normal(0, 0.005, t.shape)).astype(np.float32)
        path = out_dir / "wav" / f"utt{i:03d}.wav"
        soundfile.write(path, wav, sample_rate)
        rows.append({"audio_filepath": str(path), "duration": len(wav) / sample_rate, "text": SENTENCES[i % len(SENTENCES)]})
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def make_damaged_flac(wav: str | Path, out: Path) -> str:
    """``wav`` as FLAC with its frames damaged: the header (rate, length: what the data checks read) is intact,
    decoding fails. Such a file is found only when the audio is decoded."""
    samples, rate = soundfile.read(wav, dtype="float32")
    soundfile.write(out, samples, rate, format="FLAC")
    data = bytearray(out.read_bytes())
    for i in range(200, len(data) - 8, 7):
        data[i] ^= 0x5A
    out.write_bytes(bytes(data))
    return str(out)


def even_word_times(text: str, duration: float) -> list[dict]:
    """Evenly spaced word times (the synthetic test audio has no real words)."""
    tokens = text.split()
    step = duration / len(tokens)
    return [{"word": w, "start": round(i * step, 3), "end": round((i + 0.8) * step, 3)} for i, w in enumerate(tokens)]


def write_behaviors(manifest: str | Path, out_path: str | Path) -> Path:
    """MTBI behaviors lines for a manifest: training prompts of the shipped catalog, made-up responses,
    evenly spaced word times (for interleaving)."""
    from nemo_speechlm.data.task_catalog import TaskCatalog

    prompts = TaskCatalog.load().training_prompts()
    rows = []
    for i, line in enumerate(open(manifest)):
        entry = json.loads(line)
        prompt = prompts[(7 * i) % len(prompts)]
        entry.update(
            words=even_word_times(entry["text"], entry["duration"]),
            task=prompt.task,
            prompt=prompt.text,
            response=entry["text"].upper() if i % 2 else f"it says {entry['text']}",
            split="train",
        )
        rows.append(entry)
    out_path = Path(out_path)
    out_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_path


def relative_bundle(manifest: str | Path, folder: str | Path) -> Path:
    """A portable copy of ``manifest``: its audio files under ``folder/audio`` and ``folder/manifest.jsonl``
    naming them relative to itself (``audio/<name>``), as a dataset shipped as one folder does."""
    import shutil

    folder = Path(folder)
    (folder / "audio").mkdir(parents=True)
    lines = []
    for line in Path(manifest).read_text().splitlines():
        entry = json.loads(line)
        name = Path(entry["audio_filepath"]).name
        if not (folder / "audio" / name).exists():
            shutil.copy(entry["audio_filepath"], folder / "audio" / name)
        lines.append(json.dumps({**entry, "audio_filepath": f"audio/{name}"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"
