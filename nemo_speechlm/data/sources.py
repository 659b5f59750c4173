"""Where a data type's lines come from: a local JSONL manifest, a tarred NeMo manifest, or Lhotse Shar.

Every data type of ours (``speechlm_manifest``, ``mtbi_behaviors``, ``joint_asr_ast``, ``joint_sqa``)
reads its lines through :class:`LineSource`, configured by one of:

* ``manifest_filepath`` alone: local JSONL whose audio files are checked by
  :func:`~nemo_speechlm.data.manifest.read_manifest` (exists, readable, duration matches) until one pass
  has read every line; later passes of the endless training stream trust that check (and skip what it skipped);
* ``manifest_filepath`` + ``tarred_audio_filepaths``: NeMo's tarred audio datasets (sharded
  manifests and tars, ``_OP_0..N_CL_`` brace patterns as NeMo writes them), read by NeMo's
  ``LazyNeMoTarredIterator``;
* ``shar_path``: a Lhotse Shar directory written by ``examples/to_shar.py``, which validated every
  audio file once when it wrote the archive.

Archive lines carry their audio as an in-memory cut (``ManifestEntry.cut``); their text fields
are checked as a manifest's are, and errors name the archive and the item's cut id.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator

from lhotse import CutSet, fastcopy
from lhotse.cut import Cut

from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, check_text_fields, read_manifest
from nemo_speechlm.errors import ConfigError, InputError

log = logging.getLogger(__name__)

@dataclass
class LineSource:
    """One data config's lines (see the module docstring for the three kinds)."""

    manifest_filepath: str | list | None = None
    tarred_audio_filepaths: str | list | None = None
    shar_path: str | None = None
    shuffle_shards: bool = False
    shard_seed: int | str = 0
    _tarred_lines: int | None = field(default=None, init=False, repr=False)  # the shard manifests' lines, once counted

    @classmethod
    def from_config(cls, config, data_type: str, has_audio: bool = True) -> "LineSource":
        source = cls(
            manifest_filepath=config.get("manifest_filepath"),
            tarred_audio_filepaths=config.get("tarred_audio_filepaths"),
            shar_path=config.get("shar_path"),
            shuffle_shards=bool(config.get("shuffle_shards", False)),
            shard_seed=_fixed_shard_seed(config.get("shard_seed", 0), bool(config.get("shuffle_shards", False)), data_type),
        )
        if (source.shar_path is None) == (source.manifest_filepath is None):
            raise ConfigError(f"Data config of type {data_type!r} needs exactly one of `manifest_filepath` (JSONL, "
                              f"optionally with `tarred_audio_filepaths`) or `shar_path` (got {dict(config)}).")
        if source.is_archive and not has_audio:
            raise ConfigError(f"Data type {data_type!r} reads its lines from JSONL only (`manifest_filepath`): its lines "
                              "have no audio, or several audios, which a tarred manifest or Shar cannot hold.")
        return source

    @property
    def is_archive(self) -> bool:
        return self.shar_path is not None or self.tarred_audio_filepaths is not None

    @property
    def name(self) -> str:
        """What errors call this source."""
        return str(self.shar_path or self.manifest_filepath)

    def entries(
        self,
        required_text_fields: tuple[str, ...] = (),
        has_audio: bool = True,
        check_audio: bool = True,
        skip_invalid: bool = False,
        summary: SkipSummary | None = None,
        epoch: int = 0,
    ) -> Iterator[ManifestEntry]:
        """The source's lines, validated; bad ones raise :class:`ManifestError` or, with ``skip_invalid``,
        are counted in ``summary``. ``check_audio`` applies to local files only. ``epoch`` (passes before this one)
        reshuffles archive shards (``shuffle_shards``) with ``shard_seed + epoch``, as one lhotse / NeMo reader
        iterated again does; built anew per pass, the readers started at epoch 0 and gave one order every pass."""
        if not self.is_archive:
            yield from read_manifest(self.manifest_filepath, required_text_fields, has_audio=has_audio,
                                     check_audio=check_audio, skip_invalid=skip_invalid, summary=summary)
            return
        read = 0
        for index, cut in enumerate(self._archive_cuts(self.shard_seed + epoch), start=1):
            read = index
            try:
                yield archive_entry(self.name, index, cut, required_text_fields)
            except ManifestError as e:
                if not skip_invalid:
                    raise
                if summary is not None:
                    summary.add(e)
        if self.tarred_audio_filepaths is not None:
            self._check_every_tarred_line_was_read(read, skip_invalid, summary)

    def _check_every_tarred_line_was_read(self, read: int, skip_invalid: bool, summary: SkipSummary | None) -> None:
        """NeMo's tarred reader leaves out, with a warning at most, a line whose audio is missing from its tar or
        does not decode, and a whole tar it cannot open: the lines it gave are counted against the shard manifests'
        (NeMo's own ``_skipme`` lines aside), an error, or with ``skip_invalid`` counted in ``summary`` once."""
        from nemo.collections.common.data.lhotse.nemo_adapters import LazyNeMoTarredIterator

        if self._tarred_lines is None:
            manifests = LazyNeMoTarredIterator(self.manifest_filepath, self.tarred_audio_filepaths).source
            self._tarred_lines = sum(1 for line in manifests if not line.get("_skipme", False))
        missing = self._tarred_lines - read
        if missing <= 0:
            return
        problem = (f"{missing} of its {self._tarred_lines} lines came back without audio (missing from their tar, "
                   f"not decodable, or in a tar that does not open: NeMo's reader leaves them out; see its warnings)")
        if not skip_invalid:
            raise InputError(f"{self.name}: {problem}", "repair the tars, or set skip_invalid: true to train without them")
        if summary is not None and _TARRED_AUDIO not in summary.counts:
            summary.counts[_TARRED_AUDIO] += missing
            summary.examples[_TARRED_AUDIO] = f"{self.name}: {problem}"

    def _archive_cuts(self, seed: int) -> Iterator[Cut]:
        if self.shar_path is not None:
            return iter(CutSet.from_shar(in_dir=self.shar_path, shuffle_shards=self.shuffle_shards, seed=seed))
        from nemo.collections.common.data.lhotse.nemo_adapters import LazyNeMoTarredIterator

        _cut_segments_with_their_offset()
        tarred = LazyNeMoTarredIterator(self.manifest_filepath, self.tarred_audio_filepaths,
                                        shuffle_shards=self.shuffle_shards, shard_seed=seed)
        # NeMo names a recording after its file inside the tar, which repeats across datasets (the
        # feature cache keys by recording id): qualify it with the tar it came from.
        return (_qualified(cut, cut.custom.get("tar_origin", "")) for cut in tarred)


def _fixed_shard_seed(seed, shuffle_shards: bool, data_type: str) -> int:
    """Every rank reads the whole stream and takes its share of the batches (``data.resumable``), so all ranks need
    one shard order: ``randomized`` (a seed per worker and rank) becomes 0; ``trng`` (a new order each run, NeMo's
    default for an input) would break both the split and the resume: with ``shuffle_shards`` it is 0 too, with a
    warning; any other non-integer is an error."""
    if seed == "randomized" or not shuffle_shards:  # (unshuffled: the seed is not used)
        return 0
    if seed == "trng":
        log.warning(f"Data config of type {data_type!r}: shard_seed 'trng' (a new shard order every run) cannot be "
                    "split across ranks or resumed; using 0 (set shard_seed to an integer to choose the order)")
        return 0
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"Data config of type {data_type!r}: shard_seed {seed!r} is not an integer; our data types "
                          "need one shard order on every rank and after a resume", "set shard_seed to an integer "
                          "(`randomized` means 0 here)")
    return seed


def _qualified(cut: Cut, prefix: str) -> Cut:
    """The recording named by its tar and, for a segment, its offset: NeMo gives every segment of one file the
    file's name and a recording of its own starting at 0, so two segments of equal length had one key, and a batch
    holding both trained them on one audio (lines without an offset keep their id, and their cached features)."""
    offset = float((cut.custom or {}).get("offset") or 0.0)
    segment = f"@{offset:.3f}" if offset else ""
    return fastcopy(cut, recording=fastcopy(cut.recording, id=f"{prefix}:{cut.recording.id}{segment}"))


def _cut_segments_with_their_offset() -> None:
    """Fix NeMo's tarred reader (3.0) for lines with an offset. Its fast path ``offset == 0.0 and duration is None or
    abs(duration - recording.duration) < 0.2`` binds as ``(...) or (...)``, so a segment within 0.2 s of its file's
    length came back as the whole file, offset ignored (audio and word times shifted, silently). Segments it gets
    wrong are cut here (``Cut.truncate``); everything else goes to NeMo's function as before."""
    from nemo.collections.common.data.lhotse import nemo_adapters

    nemo_cut = nemo_adapters.make_cut_with_subset_inmemory_recording
    if getattr(nemo_cut, "cuts_segments_with_their_offset", False):
        return

    def make_cut(recording, offset: float = 0.0, duration: float | None = None):
        if offset and duration is not None and abs(duration - recording.duration) < 0.2:
            return recording.to_cut().truncate(offset=offset, duration=duration, preserve_id=True)
        return nemo_cut(recording, offset=offset, duration=duration)

    make_cut.cuts_segments_with_their_offset = True
    nemo_adapters.make_cut_with_subset_inmemory_recording = make_cut


_TARRED_AUDIO = "tarred audio"  # the skip summary's name for lines NeMo's tarred reader left out
ARCHIVE_EXCLUDED_FIELDS = ("manifest_origin", "tar_origin", "shard_origin", "shar_epoch")


def archive_entry(name: str, index: int, cut: Cut, required_text_fields: tuple[str, ...] = ()) -> ManifestEntry:
    """A tarred / Shar cut as a manifest line (``index``: its position in this pass): its custom fields (the
    line's own), its transcript as ``text``, its ``duration``; ``audio_filepath`` names the audio inside the
    archive. Its errors name the cut (:func:`naming_the_cut`)."""
    data = {k: v for k, v in (cut.custom or {}).items() if k not in ARCHIVE_EXCLUDED_FIELDS}
    if "text" not in data and cut.supervisions and cut.supervisions[0].text:
        data["text"] = cut.supervisions[0].text
    data.pop("offset", None)  # the archive's cut is the segment itself
    data.update(audio_filepath=f"{name}:{cut.recording.id}", duration=cut.duration)
    try:
        check_text_fields(name, index, data, required_text_fields)
    except ManifestError as e:
        raise naming_the_cut(e, cut) from None
    return ManifestEntry(name, index, data, cut=fastcopy(cut, custom=None))


def naming_the_cut(error: ManifestError, cut: Cut) -> ManifestError:
    """``error`` of an archive item, naming it by its cut id (our Shar: ``<manifest stem>-<line>``; NeMo tarred: the
    audio's name in the tar) where it named its position in this pass's shard order, which changes with the seed
    and the pass. (The position stays the item's line otherwise: random choices seeded by line, interleaving spans,
    then match the JSONL the archive was written from.)"""
    return ManifestError(error.path, cut.id, error.problem, error.field)
