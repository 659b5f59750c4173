"""``SpeechLMModel``: speech encoder -> modality adapter -> Hugging Face LLM, as a NeMo ``ModelPT``.

The shared core of every objective. It reuses speechlm2's perception module, audio
splicing (``replace_placeholders_and_build_targets``), freezing and optimizer setup,
and adds what SALM lacks for us: ``.nemo`` export (SALM is not a ``ModelPT``), any
Hugging Face causal LM (not only Llama-style ``model.embed_tokens``), chat templates,
and a text-in/text-out ``respond``. Subclasses change the objective by overriding
:meth:`compute_losses`.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from nemo.collections.speechlm2.data.salm_dataset import left_collate_vectors
from nemo.collections.speechlm2.models.salm import replace_placeholders_and_build_targets
from nemo.collections.speechlm2.parts.encoder_chunking import encode_audio_with_optional_chunking
from nemo.collections.speechlm2.parts.optim_setup import freeze_and_subset, is_frozen
from nemo.core.classes.common import safe_instantiate
from nemo.core.classes import ModelPT, typecheck
from nemo.utils import logging
from nemo.utils.get_rank import is_global_rank_zero
from nemo.utils.msc_utils import is_multistorageclient_url
from omegaconf import DictConfig, OmegaConf, open_dict
from peft import LoraConfig, get_peft_model
from transformers import GenerationConfig

from nemo_speechlm.data.audio import check_audio_length, read_audio
from nemo_speechlm.errors import ConfigError
from nemo_speechlm.models.reference_weights import check_reference_weights, reference_fingerprints, reference_weight_names
from nemo_speechlm.modules.ctc_readout import CTCReadout
from nemo_speechlm.modules.perception import build_perception, fill_pretrained_encoder_config
from nemo_speechlm.parts.checkpoint import stamp_checkpoint_format
from nemo_speechlm.parts.distributed import means_over_ranks
from nemo_speechlm.parts.fsdp import shard_model
from nemo_speechlm.parts.decoding import cut_at_stop, decode, end_token_ids, length_sorted_batches, sampler
from nemo_speechlm.parts.llm import load_llm, load_tokenizer, pack_llm_files, resolve_llm_source, unpack_llm_files
from nemo_speechlm.parts.packing import check_llm_keeps_packed_sequences_apart, pack_rows
from nemo_speechlm.parts.prompting import encode_messages, resolve_prompt_formatter
from nemo_speechlm.parts.schedule import apply_configured_schedule

IGNORE_INDEX = -100
# Artifacts must outlive __init__ (save_to copies them later); one directory per process, removed at exit.
_ARTIFACT_DIR = tempfile.TemporaryDirectory(prefix="speechlm_artifacts_")
LORA_PARAM_PATTERN = r"^.+\.lora_.+$"
# peft's trainable copies of the modules named in ``lora.modules_to_save`` (e.g. lm_head); the LLM's freeze pattern
# froze them again, so they never trained.
LORA_MODULES_TO_SAVE_PATTERN = r"^.+\.modules_to_save\..+$"
# speechlm2's chunking folds a tail shorter than two feature frames into the chunk before it,
# which must still fit the encoder's window: chunks stay this much under it.
_CHUNK_TAIL_MARGIN_SECONDS = 0.1


class SpeechLMModel(ModelPT):
    """Speech LLM core. Config keys are documented in ``nemo_speechlm/conf/speechlm.yaml``."""

    def __init__(self, cfg: DictConfig, trainer=None) -> None:
        fill_pretrained_encoder_config(cfg, new_model=not self._is_model_being_restored())  # before ModelPT resolves
        super().__init__(cfg=cfg, trainer=trainer)
        restoring = self._is_model_being_restored()
        # A "trainable" checkpoint stores only what was trained; base weights come from the references.
        load_base_weights = not restoring or self.cfg.get("checkpoint_scope", "full") == "trainable"
        with tempfile.TemporaryDirectory() as tmp:
            if restoring:
                llm_dir = unpack_llm_files(self.register_artifact("llm_files", self.cfg.llm_files), Path(tmp))
            else:
                llm_dir = resolve_llm_source(self.cfg.pretrained_llm)
            self.tokenizer = load_tokenizer(llm_dir, self.cfg.audio_locator_tag)
            llm_source = resolve_llm_source(self.cfg.pretrained_llm) if load_base_weights else llm_dir
            # The architecture is the one trained (restoring: the packed config), whatever pretrained_llm's says now.
            self.llm = load_llm(llm_source, pretrained_weights=load_base_weights, config_source=llm_dir)
            if (Path(llm_dir) / "generation_config.json").is_file():
                self.llm.generation_config = GenerationConfig.from_pretrained(llm_dir)
        if not restoring:
            self._register_llm_files()
        # A trainable-only file that left no encoder weights out (joint SFT trains the encoder) records no encoder
        # fingerprint: its encoder is in the file, and loading the reference (a 1B hub download) is not needed.
        recorded = self.cfg.get("reference_fingerprints")
        encoder_reference = load_base_weights and not (restoring and recorded is not None and "encoder" not in recorded)
        self.perception = build_perception(self.cfg, self.llm, load_pretrained_asr=encoder_reference, restoring=restoring)
        # Built empty; connector pre-alignment fills its vocabulary (nemo_speechlm.modules.ctc_readout).
        self.ctc_readout = CTCReadout(self.llm.config.hidden_size) if self.cfg.get("ctc_readout") else None
        self._install_lora()
        self._freeze()
        if not restoring:
            self._check_lora_leaves_kept_weights_trainable()
        self.prompt_formatter = resolve_prompt_formatter(self.cfg.get("prompt_format"), self.tokenizer)
        self._packing_checked = False  # model.pack_sequences: the LLM is tried once, at the first packed batch
        self._validation_totals: dict[str, torch.Tensor] = {}  # per validation set: [samples, loss sum, acc sum]
        counts = self.parameter_counts()
        logging.info(
            f"{type(self).__name__}: {counts['trainable']:,} trainable of {counts['total']:,} parameters "
            f"({counts['trainable'] / counts['total']:.2%})"
        )

    # ------------------------------------------------------------------ construction helpers

    def _register_llm_files(self) -> None:
        """Bundle the LLM config + tokenizer as one artifact so ``.nemo`` files load offline."""
        tar_path = Path(_ARTIFACT_DIR.name) / f"llm_files_{id(self)}.tar"
        pack_llm_files(self.llm, self.tokenizer, tar_path)
        with open_dict(self._cfg):
            self._cfg.llm_files = str(tar_path)
        self.register_artifact("llm_files", str(tar_path))

    def _install_lora(self) -> None:
        encoder_lora = (self.cfg.perception.get("encoder") or {}).get("lora")  # installed by the encoder itself
        if self.cfg.get("lora"):
            lora_cfg = OmegaConf.to_container(self.cfg.lora, resolve=True)
            try:
                self.llm = get_peft_model(self.llm, LoraConfig(**lora_cfg))
            except (TypeError, ValueError) as exc:  # an unknown key, target modules the LLM lacks (peft's error is one)
                raise ConfigError(f"model.lora: {exc}", "see peft's LoraConfig for the keys; target_modules are module "
                                  "names of the LLM (q_proj, v_proj, ...)") from exc
        if self.cfg.get("lora") or encoder_lora:
            patterns = [LORA_PARAM_PATTERN]
            if (self.cfg.get("lora") or {}).get("modules_to_save"):
                patterns.append(LORA_MODULES_TO_SAVE_PATTERN)
            with open_dict(self._cfg):
                keep = list(self._cfg.get("prevent_freeze_params", []))
                self._cfg.prevent_freeze_params = keep + [p for p in patterns if p not in keep]

    def _freeze(self) -> None:
        """Apply ``freeze_params``/``prevent_freeze_params`` regexes now, so counts and ``requires_grad`` are right
        before training (speechlm2 applies them only inside ``configure_optimizers``)."""
        for key in ("freeze_params", "prevent_freeze_params"):
            for pattern in self.cfg.get(key, []):
                try:
                    re.compile(pattern)
                except re.error as exc:  # was a traceback from inside speechlm2
                    raise ConfigError(f"model.{key}: {pattern!r} is not a regular expression ({exc})") from None
        for _ in freeze_and_subset(
            self.named_parameters(),
            exclude_patterns=list(self.cfg.get("freeze_params", [])),
            keep_patterns=list(self.cfg.get("prevent_freeze_params", [])),
        ):
            pass

    def _check_lora_leaves_kept_weights_trainable(self) -> None:
        """A ``prevent_freeze_params`` pattern naming LLM base weights trains nothing under LoRA: peft freezes every
        base weight and speechlm2's freezing skips frozen ones, so the pattern was ignored with a warning that called
        it a bad regexp. (Unfrozen, they would also train under the KL teacher, which only switches the adapters off.)"""
        if not self.cfg.get("lora"):
            return
        ours = (LORA_PARAM_PATTERN, LORA_MODULES_TO_SAVE_PATTERN)
        for pattern in [p for p in self.cfg.get("prevent_freeze_params", []) if p not in ours]:
            named = {n: p.requires_grad for n, p in self.llm.named_parameters(prefix="llm") if re.match(pattern, n)}
            frozen = [n for n, trains in named.items() if not trains]
            if frozen and not any(named.values()):  # (with modules_to_save the pattern also names the trained copy)
                raise ConfigError(
                    f"model.prevent_freeze_params: {pattern!r} names LLM base weights that LoRA keeps frozen "
                    f"({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}), so they would not train",
                    "train whole LLM modules beside LoRA with model.lora.modules_to_save (e.g. [embed_tokens, lm_head]), "
                    "or drop model.lora to train the LLM's weights themselves")

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"trainable": trainable, "total": total}

    # ------------------------------------------------------------------ properties

    @property
    def embed_tokens(self) -> torch.nn.Embedding:
        return self.llm.get_input_embeddings()

    def move_speech_side(self, device: torch.device) -> None:
        """Move what encodes and aligns speech before ``fit`` (the perception, the CTC read-out and the LLM's input
        embeddings, which connector pre-alignment targets) to ``device``, leaving the rest of the LLM where it is.

        ``fit`` then moves the whole model (DDP) or each rank's shards only (FSDP2: ``fully_shard`` moves each unit's
        shard to the mesh's device). The whole model moved here made the LLM's fp32 weights fit one GPU under FSDP2."""
        for child in self.children():
            if child is not self.llm:
                child.to(device)
        self.embed_tokens.to(device)
        # Lightning's ``self.device`` (where the speech code puts its inputs) follows ``self.to`` only.
        _update_properties(self, device=torch.device(device))

    @property
    def audio_locator_tag(self) -> str:
        return self.cfg.audio_locator_tag

    @property
    def audio_locator_tag_id(self) -> int:
        return self.tokenizer.token_to_id(self.cfg.audio_locator_tag)

    @property
    def text_pad_id(self) -> int:
        return self.tokenizer.tokenizer.pad_token_id

    @property
    def sampling_rate(self) -> int:
        return self.perception.preprocessor.featurizer.sample_rate

    @property
    def token_equivalent_duration(self) -> float:
        """Seconds of audio per LLM input position (for bucketing by total tokens)."""
        return self.perception.token_equivalent_duration

    # ------------------------------------------------------------------ forward / loss

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ids; the locator and pad ids may lie outside the LLM's table, so embed them as id 0
        (their positions are replaced by audio or masked out)."""
        special = (input_ids == self.audio_locator_tag_id) | (input_ids == self.text_pad_id)
        return self.embed_tokens(input_ids.masked_fill(special, 0))

    @property
    def encoder_frame_duration(self) -> float:
        """Seconds per encoder output frame (before the adapter)."""
        featurizer = self.perception.preprocessor.featurizer
        return featurizer.hop_length / featurizer.sample_rate * self.perception.encoder.subsampling_factor

    @property
    def encoder_window_seconds(self) -> float | None:
        """Longest clip the encoder takes in one piece (Whisper: 30 s); None: no limit."""
        return getattr(self.perception.encoder, "max_audio_seconds", None)

    def encode_speech(self, audios: torch.Tensor, audio_lens: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs ``(frames, d_model)`` per waveform: what the feature cache stores.

        Clips are cut in chunks of ``encoder_chunk_size_seconds``; clips longer than the encoder's window less a
        margin are chunked even when that is unset, in training as at inference (at inference only until 2026-12-07:
        a 29.9-30 s Whisper clip was cached in two pieces and trained on whole without the cache). Training refuses
        clips over the window up front (``nemo_speechlm.data.preflight``).
        """
        chunk, window = self.cfg.get("encoder_chunk_size_seconds", None), self.encoder_window_seconds
        if window is not None:
            chunk = min(chunk or window, window - _CHUNK_TAIL_MARGIN_SECONDS)
        return encode_audio_with_optional_chunking(
            _EncoderStage(self.perception),
            audios,
            audio_lens,
            chunk_size_seconds=chunk,
            sampling_rate=self.sampling_rate,
        )

    def encode_audio(self, batch: dict) -> list[torch.Tensor]:
        """One ``(positions, hidden)`` tensor per audio locator, in locator order.

        Whole utterances are encoded once (or read from ``encoder_features``, the feature
        cache), then each locator's segment (``audio_segments``: row, start s, end s) is
        sliced out by time and passed through the adapter on its own.
        """
        if batch.get("encoder_features") is not None:
            feats = [f[:, :n].T for f, n in zip(batch["encoder_features"].to(self.device), batch["encoder_feature_lens"])]
        else:
            feats = self.encode_speech(batch["audios"], batch["audio_lens"])
        segments = batch.get("audio_segments")
        if segments is None:
            return self.adapt(feats)
        frame = self.encoder_frame_duration
        pieces = []
        for row, start, end in segments.tolist():
            full = feats[int(row)]
            first = min(int(round(start / frame)), len(full) - 1)
            last = len(full) if end == float("inf") else min(max(int(round(end / frame)), first + 1), len(full))
            pieces.append(full[first:last])
        return self.adapt(pieces)

    def adapt(self, features: list[torch.Tensor], readout: bool = True) -> list[torch.Tensor]:
        """Modality adapter + projection over encoder outputs ``(frames, d_model)`` -> LLM embeddings
        (then the CTC read-out where ``model.ctc_readout`` is on and ``readout``; pre-alignment trains without it)."""
        lens = torch.tensor([len(f) for f in features], device=self.device)
        padded = torch.nn.utils.rnn.pad_sequence(list(features), batch_first=True).transpose(1, 2)
        # Cached features are read from disk as fp32; in bf16-true the adapter's weights are bf16.
        padded = padded.to(_param_dtype(self.perception.modality_adapter, self.perception.proj) or padded.dtype)
        with typecheck.disable_checks():  # a NeMo ConformerEncoder adapter would reject these types, as in speechlm2
            adapted, adapted_lens = self.perception.modality_adapter(audio_signal=padded, length=lens)
        adapted = self.perception.proj(adapted.transpose(1, 2))
        adapted = [a[:n] for a, n in zip(adapted, adapted_lens.tolist())]
        if self.ctc_readout is not None and readout:
            if not self.ctc_readout.ready:
                raise RuntimeError("model.ctc_readout is on but the read-out has no vocabulary: it is filled by connector "
                                   "pre-alignment (connector_pretraining.steps > 0) before training through the LLM")
            adapted = self.ctc_readout(adapted, self.embed_tokens)
        return adapted

    def splice_audio(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Embeddings with audio spliced at the locators (left-padded), targets (-100 except on
        assistant tokens; ``None`` without ``loss_mask``) and the attention mask."""
        input_ids = batch["input_ids"]
        n_locators = int((input_ids == self.audio_locator_tag_id).sum())
        n_audios = _count_audios(batch)
        if n_locators != n_audios:
            raise ValueError(f"The batch has {n_locators} audio locator tokens but {n_audios} audios.")
        replacements = self.encode_audio(batch) if n_audios else []
        targets = input_ids.where(batch["loss_mask"], IGNORE_INDEX) if "loss_mask" in batch else None
        return replace_placeholders_and_build_targets(
            input_ids=input_ids,
            embeds=self.embed_text(input_ids),
            padding_id=self.text_pad_id,
            placeholder_id=self.audio_locator_tag_id,
            replacements=replacements,
            target_ids=targets,
        )

    def prepare_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Teacher-forcing inputs: position t predicts target t+1."""
        embeds, target_ids, attention_mask = self.splice_audio(batch)
        return {
            "input_embeds": embeds[:, :-1],
            "attention_mask": attention_mask[:, :-1],
            "target_ids": target_ids[:, 1:],
        }

    def forward(
        self, input_embeds: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int | torch.Tensor = 0
    ) -> torch.Tensor:
        """Logits ``(B, T', V)`` of the LLM over spliced embeddings (``logits_to_keep`` as in HF; 0 = all).

        Positions count from each row's first token, past its left padding, as in decoding and packing (left to the
        LLM, a GPT-2-style LLM with learned positions trained every padded row on shifted ones)."""
        position_ids = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
        return self.llm(
            inputs_embeds=input_embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
            logits_to_keep=logits_to_keep,
        ).logits

    def response_logits(
        self, input_embeds: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and targets at only the positions that some row is trained on.

        The LM head over a 49k-150k vocabulary is a large share of a step, and most positions
        (system prompt, instruction, speech) have no target; answers sit at the end of the
        left-padded rows, so the kept columns are few.
        """
        if self.cfg.get("pack_sequences", True):
            return self._packed_response_logits(input_embeds, attention_mask, target_ids)
        keep = (target_ids != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        return self(input_embeds, attention_mask, logits_to_keep=keep), target_ids[:, keep]

    def _packed_response_logits(
        self, input_embeds: torch.Tensor, attention_mask: torch.Tensor, target_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`response_logits` with the rows packed (``nemo_speechlm.parts.packing``): the same logits for
        fewer computed positions, returned as one row ``(1, targets, V)`` in the batch's row-major target order
        (the order ``token_kl`` matches student and teacher tokens by)."""
        if not self._packing_checked:
            check_llm_keeps_packed_sequences_apart(self.llm)
            self._packing_checked = True
        source, position_ids = pack_rows(attention_mask)
        batch, width, hidden = input_embeds.shape
        padded = source < 0
        flat = torch.cat([input_embeds.reshape(batch * width, hidden), input_embeds.new_zeros(1, hidden)])
        embeds = flat[source.masked_fill(padded, batch * width)]
        targets = target_ids.reshape(-1)[source.clamp(min=0)].masked_fill(padded, IGNORE_INDEX)
        keep = (targets != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        logits = self.llm(
            inputs_embeds=embeds, position_ids=position_ids, attention_mask=None, use_cache=False, logits_to_keep=keep
        ).logits
        targets, source = targets[:, keep], source[:, keep]
        scored = targets != IGNORE_INDEX
        order = source[scored].argsort()
        return logits[scored][order].unsqueeze(0), targets[scored][order].unsqueeze(0)

    def compute_losses(self, batch: dict) -> dict[str, torch.Tensor]:
        """Objective hook. Returns ``{"loss": ..., <named terms>...}``; the base is CE on assistant tokens."""
        inputs = self.prepare_inputs(batch)
        logits, targets = self.response_logits(inputs["input_embeds"], inputs["attention_mask"], inputs["target_ids"])
        return {"loss": cross_entropy(logits, targets), "num_target_tokens": _num_targets(inputs)}

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # No dropout in the frozen encoder and LLM. The connector stays in training mode even when frozen after
        # pre-alignment (connector_pretraining.freeze_connector), so its SpecAugment keeps masking the speech the
        # LLM trains on. Measured against running it as at inference: ROUGE-L level, held-out repeat WER lower
        # in two of three runs and equal in the third (docs/connector.md, "SpecAugment in stage 2").
        for module in (self.perception.preprocessor, self.perception.encoder, self.llm):
            if is_frozen(module):
                module.eval()
        losses = self.compute_losses(batch)
        batch_size = batch["input_ids"].shape[0]
        self.log("loss", losses["loss"], on_step=True, prog_bar=True, batch_size=batch_size)
        for name, value in losses.items():
            if name != "loss":
                self.log(f"train_{name}", value.float(), on_step=True, batch_size=batch_size)
        if self._trainer is not None:
            self.log("learning_rate", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)
        self.log(
            "padding_ratio",
            (batch["input_ids"] == self.text_pad_id).float().mean(),
            on_step=True,
            batch_size=batch_size,
        )
        return losses["loss"]

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        batches = batch.items() if "input_ids" not in batch else [("", batch)]
        for name, sub in batches:
            if sub is None:
                continue
            inputs = self.prepare_inputs(sub)
            logits, targets = self.response_logits(inputs["input_embeds"], inputs["attention_mask"], inputs["target_ids"])
            loss = cross_entropy(logits, targets)
            valid = targets != IGNORE_INDEX
            acc = (logits.argmax(-1)[valid] == targets[valid]).float().mean()
            suffix = f"_{name}" if name else self._dataloader_suffix(dataloader_idx)
            bs = sub["input_ids"].shape[0]
            batch_totals = torch.stack([loss.new_tensor(float(bs)), loss.detach().float() * bs, acc * bs])
            self._validation_totals[suffix] = self._validation_totals.get(suffix, 0) + batch_totals

    def _dataloader_suffix(self, dataloader_idx: int) -> str:
        """``_loader<i>`` where ``trainer.validate`` was given several loaders, so they are not merged into one mean
        (a named set of the data config is ``_<name>``; Lightning reserves its own ``/dataloader_idx_<i>``)."""
        several = self._trainer is not None and len(self.trainer.num_val_batches) > 1
        return f"_loader{dataloader_idx}" if several else ""

    def on_validation_epoch_start(self) -> None:
        self._validation_totals = {}

    def on_validation_epoch_end(self) -> None:
        """``val_loss`` / ``val_acc`` (per set: ``val_loss_<name>``), means over the batches weighted by their
        samples, as Lightning's epoch means, but over every rank's batches: logged per rank, they were rank 0's
        share of the validation data (lhotse splits it across ranks). Not ``sync_dist``: a rank that drew no batch
        of a loader never logged its key, and the others' epoch-end all-reduce would wait for it."""
        totals = {suffix: values.tolist() for suffix, values in self._validation_totals.items()}
        for suffix, (loss, acc) in means_over_ranks(totals).items():
            self.log(f"val_loss{suffix}", loss, prog_bar=not suffix)
            self.log(f"val_acc{suffix}", acc)

    def on_train_start(self) -> None:
        """Resuming: this run's optimizer and scheduler settings apply from the checkpoint's step, where
        Lightning would restore the old ones (a longer ``trainer.max_steps`` trained at ``min_lr``)."""
        super().on_train_start()
        if not self.trainer.ckpt_path or not self.trainer.optimizers:
            return
        schedulers = self.trainer.lr_scheduler_configs
        changed = apply_configured_schedule(self.trainer.optimizers[0], schedulers[0].scheduler if schedulers else None,
                                            self.cfg.optimizer, self.cfg.get("lr_scheduler"))
        if changed:
            logging.warning(f"Resuming from {self.trainer.ckpt_path} at step {self.trainer.global_step} with this run's "
                            f"optimizer and schedule, which differ from the checkpoint's: {'; '.join(changed)}")

    def configure_optimizers(self):
        """Optimizer over the parameters left trainable by :meth:`_freeze`, plus the LR scheduler."""
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = safe_instantiate(self.cfg.optimizer, params, _convert_="all")
        if self.cfg.get("lr_scheduler") is None:
            return optimizer
        scheduler = safe_instantiate(self.cfg.lr_scheduler, optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        audios: torch.Tensor | None = None,
        audio_lens: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generation_kwargs,
    ) -> torch.Tensor:
        """Token-level generation. ``input_ids`` are left-padded prompts with one locator per audio;
        returns only the new tokens ``(B, T_new)``."""
        embeds, _, attention_mask = self.splice_audio({"input_ids": input_ids, "audios": audios, "audio_lens": audio_lens})
        config = copy.deepcopy(generation_config or self.default_generation_config())
        extra = config.update(**generation_kwargs)  # returns the kwargs that are not generation settings
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask, generation_config=config, **extra)

    def default_generation_config(self) -> GenerationConfig:
        """Greedy decoding that stops at the LLM's end-of-turn token(s)."""
        eos = sorted(self.end_token_ids)
        return GenerationConfig(
            do_sample=False,
            max_new_tokens=self.cfg.get("max_new_tokens", 128),
            eos_token_id=eos,
            # Finished rows are fed this id while others still generate: it must be inside the LLM's
            # embedding table, which our dedicated pad token (added to the tokenizer only) is not.
            pad_token_id=eos[0],
            bos_token_id=self.tokenizer.tokenizer.bos_token_id,
        )

    @property
    def end_token_ids(self) -> set[int]:
        """Ids that end an answer: the LLM's EOS and its chat template's end-of-turn token."""
        return end_token_ids(self.llm, self.tokenizer.tokenizer)

    @property
    def system_prompt(self) -> str | None:
        """The system prompt the speech data trained under (recorded by the training recipe,
        ``nemo_speechlm.data.datamodule.record_system_prompt``); :meth:`respond` uses it when given none."""
        return self.cfg.get("system_prompt") or None

    def system_prompt_for(self, given: str | None) -> str | None:
        """The system prompt a request answers under: ``given``, or :attr:`system_prompt` when ``None``;
        ``""`` (no system prompt) as ``None``."""
        return (self.system_prompt if given is None else given) or None

    def encode_prompt(self, prompt: str, system_prompt: str | None = None) -> torch.Tensor:
        """Token ids of a user prompt rendered for generation (assistant header appended); ``system_prompt=None``:
        none (:meth:`respond` puts the model's own in first, :meth:`system_prompt_for`)."""
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return encode_messages(self.prompt_formatter, messages)["context_ids"]

    @torch.no_grad()
    def respond(
        self,
        audios: Sequence[Any],
        prompts: Sequence[str],
        batch_size: int = 16,
        system_prompt: str | None = None,
        **decoding: Any,
    ) -> list[str]:
        """Answer each prompt about its audio; returns plain text.

        ``audios[i]`` is a file path, a mono waveform at :attr:`sampling_rate` (numpy or
        tensor), a list of those (one per locator in ``prompts[i]``), or ``None`` for a
        text-only prompt. ``system_prompt``: ``None`` for the one the model trained under
        (:attr:`system_prompt`, if any), ``""`` for none. ``decoding`` options are those of :meth:`complete`.
        """
        system_prompt = self.system_prompt_for(system_prompt)
        if len(audios) != len(prompts):
            raise ValueError(f"respond() got {len(audios)} audios but {len(prompts)} prompts; pass one audio per prompt.")
        ids, waveforms = [], []
        for i, (audio, prompt) in enumerate(zip(audios, prompts)):
            item_audios = _as_list(audio)
            n_tags = prompt.count(self.audio_locator_tag)
            if n_tags != len(item_audios):
                raise ValueError(
                    f"Prompt {i} has {n_tags} audio locator tags ({self.audio_locator_tag!r}) but "
                    f"{len(item_audios)} audios were given for it: {prompt!r}"
                )
            ids.append(self.encode_prompt(prompt, system_prompt))
            waveforms.append([self._load_waveform(a) for a in item_audios])
        return self.complete(ids, waveforms, batch_size, **decoding)

    @torch.no_grad()
    def complete(
        self,
        prompt_ids: Sequence[torch.Tensor],
        waveforms: Sequence[Sequence[torch.Tensor]] | None = None,
        batch_size: int = 16,
        max_new_tokens: int | Sequence[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop_strings: Sequence[str] = (),
    ) -> list[str]:
        """Answers to encoded prompts (one locator per waveform of the item), in input order.

        Items are batched by length (prompt tokens + audio positions), so batches carry little
        padding, and each answer leaves its batch at its end token, a stop string (cut from the
        text) or its cap: ``max_new_tokens`` is one cap (default: the config's) or one per item.
        Greedy unless ``do_sample``.
        """
        waveforms = waveforms if waveforms is not None else [[] for _ in prompt_ids]
        cap = max_new_tokens if max_new_tokens is not None else self.cfg.get("max_new_tokens", 128)
        caps = [cap] * len(prompt_ids) if isinstance(cap, int) else list(cap)
        if len(caps) != len(prompt_ids):  # a longer list was cut silently, a shorter one an IndexError
            raise ValueError(f"max_new_tokens has {len(caps)} caps for {len(prompt_ids)} prompts: give one, or one per prompt")
        positions_per_sample = 1 / (self.sampling_rate * self.token_equivalent_duration)
        lengths = [len(ids) + sum(len(w) for w in wavs) * positions_per_sample for ids, wavs in zip(prompt_ids, waveforms)]
        sample = sampler(temperature, top_p) if do_sample else None
        answers: list[str] = [""] * len(prompt_ids)
        was_training = self.training
        self.eval()
        try:
            for batch in length_sorted_batches(lengths, batch_size):
                input_ids = left_collate_vectors([prompt_ids[i] for i in batch], padding_value=self.text_pad_id)
                audio, audio_lens = _collate_waveforms([w for i in batch for w in waveforms[i]], self.device)
                embeds, _, attention_mask = self.splice_audio(
                    {"input_ids": input_ids.to(self.device), "audios": audio, "audio_lens": audio_lens}
                )
                rows = decode(self.llm, embeds, attention_mask, [caps[i] for i in batch], self.end_token_ids,
                              stop_strings, self.tokenizer.tokenizer, sample)
                for i, row in zip(batch, rows):
                    text = self.tokenizer.tokenizer.decode(row.tokens, skip_special_tokens=True)
                    answers[i] = cut_at_stop(text, stop_strings).strip()
        finally:
            self.train(was_training)
        return answers

    def _load_waveform(self, audio: Any) -> torch.Tensor:
        """Mono fp32 waveform from a path or an array. Audio shorter than one encoder frame is refused
        (:class:`~nemo_speechlm.errors.AudioError`): empty audio would be answered as if there were none."""
        if isinstance(audio, (str, Path)):
            wav, name = torch.as_tensor(read_audio(audio, self.sampling_rate)), str(audio)
        else:
            array = np.asarray(audio) if not torch.is_tensor(audio) else audio
            floating = array.dtype.is_floating_point if torch.is_tensor(array) else np.issubdtype(array.dtype, np.floating)
            if not floating:
                # Integer PCM (int16 from a wav reader) read as floats is 32768x too loud; the encoder's features,
                # and so the answers, depend on the level.
                raise ValueError(f"Waveforms must be float samples in [-1, 1], got {array.dtype} (integer PCM: divide "
                                 "by 32768 for int16, or pass the file path)")
            wav = torch.as_tensor(array, dtype=torch.float32)
            name = "waveform"
            if wav.ndim != 1:
                raise ValueError(f"Waveforms must be mono 1-D arrays at {self.sampling_rate} Hz, got shape {tuple(wav.shape)}")
        check_audio_length(len(wav), self.sampling_rate, self.encoder_frame_duration, name)
        return wav

    # ------------------------------------------------------------------ export

    def save_to(self, save_path: str) -> None:
        """Write the ``.nemo`` with every weight, stamped with the checkpoint format so that every later version
        can tell whether it can read it (``nemo_speechlm.parts.checkpoint``)."""
        with self._checkpoint_scope("full", None):  # also for a model restored from a trainable-only file
            self._write_nemo(save_path)

    def save_trainable_to(self, save_path: str) -> None:
        """Write a small ``.nemo`` without the frozen weights that ``pretrained_llm``/``pretrained_asr`` (or the
        encoder's own checkpoint) load again; restoring loads them from there and checks that they are the same
        (``models/reference_weights.py``)."""
        left_out = reference_weight_names(self)
        with self._checkpoint_scope("trainable", reference_fingerprints(self, left_out)), self._absolute_references():
            self._state_dict_filter = {name for names in left_out.values() for name in names}
            try:
                self._write_nemo(save_path)
            finally:
                self._state_dict_filter = None

    @contextlib.contextmanager
    def _absolute_references(self):
        """A trainable-only file records its references as absolute paths where they are local: recorded as given
        (``pretrained_llm=assets/llm``), it could be restored only from the directory it was trained in."""
        keys = ("pretrained_llm", "pretrained_asr", "perception.encoder.pretrained_model")
        given = {key: OmegaConf.select(self._cfg, key, default=None) for key in keys}
        local = {key: str(Path(value).resolve()) for key, value in given.items()
                 if isinstance(value, str) and not Path(value).is_absolute() and Path(value).exists()}
        with open_dict(self._cfg):
            for key, value in local.items():
                OmegaConf.update(self._cfg, key, value)
        try:
            yield
        finally:
            with open_dict(self._cfg):
                for key in local:
                    OmegaConf.update(self._cfg, key, given[key])

    def _write_nemo(self, save_path: str) -> None:
        """Written beside its path and moved into place: NeMo writes the tar in place, so a run killed mid-write left a
        truncated ``.nemo`` under the final name (which the demo then reused on every rerun), and a rerun killed while
        saving destroyed the good file it replaced."""
        with open_dict(self._cfg):
            stamp_checkpoint_format(self._cfg)
        if is_multistorageclient_url(save_path) or not is_global_rank_zero():  # NeMo writes on global rank 0 only:
            super().save_to(save_path)  # the others leave the file alone (a partial left by a killed save included)
            return
        path = Path(save_path).expanduser().resolve()
        partial = path.with_name(f".{path.stem}.partial.nemo")
        try:
            super().save_to(str(partial))
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _checkpoint_scope(self, scope: str, fingerprints: dict | None):
        """The config a file is written with says what it holds; the model's own config is left as it was."""
        keys = ("checkpoint_scope", "reference_fingerprints")
        before = {key: self._cfg[key] for key in keys if key in self._cfg}
        with open_dict(self._cfg):
            self._cfg.checkpoint_scope = scope
            self._cfg.reference_fingerprints = fingerprints
        try:
            yield
        finally:
            with open_dict(self._cfg):
                for key in keys:
                    self._cfg.pop(key, None)
                self._cfg.update(before)

    def state_dict(self, *args, **kwargs):
        gathered = getattr(self, "_gathered_state_dict", None)  # FSDP2: the full weights (parts/fsdp.py)
        sd = gathered if gathered is not None else super().state_dict(*args, **kwargs)
        left_out = getattr(self, "_state_dict_filter", None)  # save_trainable_to
        if left_out:
            sd = type(sd)((k, v) for k, v in sd.items() if k not in left_out)
        return sd

    def load_state_dict(self, state_dict, strict: bool = True, **kwargs):
        if self.cfg.get("checkpoint_scope", "full") != "trainable":
            return super().load_state_dict(state_dict, strict=strict, **kwargs)
        result = super().load_state_dict(state_dict, strict=False, **kwargs)
        from_references = {n for names in reference_weight_names(self, frozen_only=False).values() for n in names}
        missing = [k for k in result.missing_keys if k not in from_references]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(
                f"Trainable-only checkpoint does not match the model: missing weights {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        check_reference_weights(self, [k for k in result.missing_keys if k in from_references])
        return result

    # ------------------------------------------------------------------ ModelPT plumbing

    @classmethod
    def restore_from(cls, restore_path: str, *args, **kwargs):
        """NeMo's ``restore_from``, leaving the process able to build models when it fails: NeMo marks "a model is
        being restored" for the whole process and clears it only after a successful load, so after a failed restore
        (a missing reference, other base weights) every new model took itself for a restored one and died
        (``Key 'llm_files' is not in struct``)."""
        try:
            return super().restore_from(restore_path, *args, **kwargs)
        except Exception:
            cls._set_model_restore_state(is_being_restored=False)
            raise

    def configure_model(self) -> None:
        """Lightning calls this inside ``fit``; under ``trainer.strategy=fsdp2`` it shards the model (``parts/fsdp.py``)."""
        if self._device_mesh is not None:
            # Lightning converts the model to a "-true" precision only after configure_model, when FSDP2 has set
            # up its all-gathers in fp32 (bf16-true then failed: "Expected out tensor to have dtype BFloat16").
            # Converting first makes the shards bf16; Lightning's own conversion then changes nothing.
            self.trainer.precision_plugin.convert_module(self)
            shard_model(self, self._device_mesh)

    def setup_training_data(self, train_data_config) -> None:
        """Data lives outside the model config (see ``nemo_speechlm.data.datamodule``)."""

    def setup_validation_data(self, val_data_config) -> None:
        """Data lives outside the model config (see ``nemo_speechlm.data.datamodule``)."""

    @classmethod
    def list_available_models(cls) -> None:
        return None


class _EncoderStage:
    """The preprocessor -> spec augment -> encoder part of ``AudioPerceptionModule.forward``.

    speechlm2 runs encoder and adapter in one call; we need the encoder output on its
    own (to cache it and to slice interleaved speech spans before the adapter).
    """

    def __init__(self, perception) -> None:
        self.perception = perception
        self.preprocessor = perception.preprocessor  # read by speechlm2's chunking helper

    def __call__(self, input_signal: torch.Tensor, input_signal_length: torch.Tensor):
        p = self.perception
        feats, feat_lens = p.preprocessor(input_signal=input_signal, length=input_signal_length)
        if p.spec_augmentation is not None and p.training:
            feats = p.spec_augmentation(input_spec=feats, length=feat_lens)
        # The preprocessor computes fp32 features (see nemo_speechlm.parts.precision); a bf16-true
        # encoder needs them in bf16 (under autocast the weights are fp32 and this is a no-op).
        feats = feats.to(_param_dtype(p.encoder) or feats.dtype)
        encoded, encoded_lens = p.encoder(audio_signal=feats, length=feat_lens)
        return encoded.transpose(1, 2), encoded_lens


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token CE over non-ignored targets (0 if there are none), in fp32 whatever the logits' dtype
    (the log-softmax over the vocabulary and the sum over tokens lose digits in bf16)."""
    n = (targets != IGNORE_INDEX).sum().clamp(min=1)
    loss = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(0, 1), reduction="sum", ignore_index=IGNORE_INDEX
    )
    return loss / n


def _param_dtype(*modules: torch.nn.Module) -> torch.dtype | None:
    """dtype of the first floating-point parameter of ``modules`` (None if they have none)."""
    for module in modules:
        for param in module.parameters():
            if param.is_floating_point():
                return param.dtype
    return None


def _num_targets(inputs: dict) -> torch.Tensor:
    return (inputs["target_ids"] != IGNORE_INDEX).sum()


def _count_audios(batch: dict) -> int:
    if batch.get("audio_segments") is not None:
        return len(batch["audio_segments"])
    return 0 if batch.get("audios") is None else len(batch["audio_lens"])


def _as_list(audio: Any) -> list:
    if audio is None:
        return []
    return list(audio) if isinstance(audio, (list, tuple)) else [audio]


def _collate_waveforms(wavs: list[torch.Tensor], device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    if not wavs:
        return None, None
    lens = torch.tensor([len(w) for w in wavs], dtype=torch.long)
    out = torch.zeros(len(wavs), int(lens.max()))
    for i, w in enumerate(wavs):
        out[i, : len(w)] = w
    return out.to(device), lens.to(device)

