"""Manifests (plain, behaviors, ASR/AST, SQA) -> Lhotse Shar, every audio file validated once, here.

Training from Shar reads the audio out of tar shards written next to their lines, so nothing on
the training machines touches the original files or checks them again. Each line becomes one cut
holding only its segment's audio (``offset``/``duration`` applied) and, as custom fields, every
other field of the line (``text``, ``task``, ``prompt``, ``response``, ``words``, ...), which is what
``shar_path`` inputs of our data types read back (``nemo_speechlm.data.sources``).

Shards are written one at a time into a temporary directory and moved into place, lines file
last, so a crashed run resumes at the first shard whose lines file is missing, reading the manifest from
the line after the last finished shard (its audio is not checked again). Rerunning over a changed
manifest is refused. The bookkeeping (``info.json`` with the manifest's size and mtime, ``shards.json``
with where each finished shard ends in the manifest, the shard being written) lives next to the output,
in ``.<name>.to_shar/``: lhotse reads every file inside a Shar directory as a field.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

from lhotse import CutSet
from tqdm import tqdm

from nemo_speechlm.data.conversations import cut_for_audio
from nemo_speechlm.data.manifest import ManifestEntry, ManifestError, SkipSummary, read_manifest
from nemo_speechlm.errors import InputError
from nemo_speechlm.parts.runner import read_json_object, write_json_atomic

AUDIO_FORMATS = ("flac", "wav")
_SEGMENT_FIELDS = ("audio_filepath", "duration", "offset")


def write_shar(
    manifest: str | Path,
    out_dir: str | Path,
    shard_size: int = 1000,
    audio_format: str = "flac",
    skip_invalid: bool = False,
) -> dict:
    """Write ``manifest`` to ``out_dir`` as Shar (``cuts.NNNNNN.jsonl.gz`` + ``recording.NNNNNN.tar``);
    resumable. Returns counts: lines, shards written now and before, lines skipped as invalid."""
    if audio_format not in AUDIO_FORMATS:
        raise InputError(f"unknown audio format {audio_format!r}", f"use one of {AUDIO_FORMATS}")
    if shard_size < 1:
        raise InputError(f"shard size must be at least 1 (got {shard_size})")
    manifest, out_dir = Path(manifest), Path(out_dir)
    if manifest.resolve().parent == out_dir.resolve():  # lhotse reads every file of a Shar directory as a field
        raise InputError(f"{out_dir} holds the manifest {manifest.name}, and lhotse would read it as a Shar field",
                         "write the Shar to a directory of its own")
    work_dir = out_dir.parent / f".{out_dir.name}.to_shar"
    holds_files = out_dir.is_dir() and any(out_dir.iterdir())
    if work_dir.exists() and not holds_files:  # the Shar was deleted to start
        shutil.rmtree(work_dir)  # again, as the settings check advises: its bookkeeping goes with it
    if holds_files and not work_dir.exists():  # a copied or moved Shar, or its bookkeeping deleted: shards from
        # other input would have stayed beside the new ones (a 3-line manifest into a 4-shard copy read back 7 lines)
        raise InputError(f"{out_dir} holds files, and no record of a conversion into it ({work_dir} is missing)",
                         "write to a new or empty directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(exist_ok=True)
    _check_same_input(manifest, out_dir, work_dir, shard_size, audio_format)
    done = _finished_shards(out_dir, work_dir)
    # Resume after the last finished shard without reading, let alone re-checking, the lines before it:
    # every line's audio was checked once, when its shard was written.
    last = done[-1] if done else {"next_line": 1, "lines": 0, "skipped": {}, "examples": {}}
    summary = SkipSummary(Counter(last["skipped"]), dict(last["examples"]))
    # A last shard shorter than shard_size read the manifest to its end (invalid lines after it counted too):
    # nothing is left to read, and reading again from its next line counted those lines twice.
    entries = iter(()) if last.get("manifest_done") else read_manifest(
        manifest, required_text_fields=(), skip_invalid=skip_invalid, summary=summary, start_line=last["next_line"])
    counts = {"lines": last["lines"], "shards_written": 0, "shards_before": len(done)}
    with tqdm(desc=f"Writing Shar to {out_dir}", unit="line", initial=last["lines"]) as bar:
        for shard in range(len(done), 1 << 30):
            chunk = list(islice(entries, shard_size))
            if not chunk:
                break
            _write_shard(chunk, out_dir, work_dir, shard, audio_format)
            counts["lines"] += len(chunk)
            counts["shards_written"] += 1
            done.append({"next_line": chunk[-1].line + 1, "lines": counts["lines"], "manifest_done": len(chunk) < shard_size,
                         "skipped": dict(summary.counts), "examples": dict(summary.examples)})
            write_json_atomic(work_dir / "shards.json", done)
            bar.update(len(chunk))
    counts["skipped_invalid"] = summary.total
    if summary.total:
        counts["skipped"] = str(summary)
    return counts


def _finished_shards(out_dir: Path, work_dir: Path) -> list[dict]:
    """Progress records (``shards.json``: per shard, the manifest line after it and the running counts) of the
    shards written before, up to the first whose lines file is missing: that one and all after it are redone."""
    path = work_dir / "shards.json"
    records = json.loads(path.read_text()) if path.is_file() else []
    finished = 0
    while finished < len(records) and (out_dir / f"cuts.{finished:06d}.jsonl.gz").is_file():
        finished += 1
    return records[:finished]


def _write_shard(entries: list[ManifestEntry], out_dir: Path, work_dir: Path, shard: int, audio_format: str) -> None:
    cuts = []
    for entry in entries:
        cut = cut_for_audio(entry["audio_filepath"], entry.get("offset", 0.0) or 0.0, entry["duration"],
                            cut_id=f"{Path(entry.path).stem}-{entry.line}")
        # Stable across reruns and unique across manifests: the feature cache keys a Shar cut by it.
        cut.recording.id = hashlib.sha1(
            f"{entry['audio_filepath']}|{entry.get('offset', 0.0) or 0.0}|{entry['duration']}".encode()).hexdigest()
        cut.custom = {k: v for k, v in entry.data.items() if k not in _SEGMENT_FIELDS}
        cuts.append(cut)
    tmp = work_dir / f"shard-{shard:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        CutSet(cuts).to_shar(tmp, fields={"recording": audio_format}, shard_size=len(cuts), shard_offset=shard)
    except Exception as e:  # lhotse re-raises the reader's error; name the shard's lines
        raise ManifestError(entries[0].path, entries[0].line,
                            f"cannot write the audio of lines {entries[0].line}-{entries[-1].line} to Shar: {e}",
                            "audio_filepath") from e
    os.replace(tmp / f"recording.{shard:06d}.tar", out_dir / f"recording.{shard:06d}.tar")
    os.replace(tmp / f"cuts.{shard:06d}.jsonl.gz", out_dir / f"cuts.{shard:06d}.jsonl.gz")  # last: marks it done
    tmp.rmdir()


def _check_same_input(manifest: Path, out_dir: Path, work_dir: Path, shard_size: int, audio_format: str) -> None:
    if not manifest.is_file():
        raise FileNotFoundError(f"Manifest not found: {manifest}")
    stat = manifest.stat()
    info = {"manifest": str(manifest.resolve()), "size": stat.st_size, "mtime": stat.st_mtime,
            "shard_size": shard_size, "audio_format": audio_format}
    path = work_dir / "info.json"
    if path.is_file():
        before = read_json_object(path, "record of the conversion's input")
        if before != info:
            changed = sorted(k for k in info if before.get(k) != info[k])
            raise InputError(f"{out_dir} holds Shar written from other input or settings ({', '.join(changed)} differ)",
                             "write to a new directory, or delete this one to start again")
    else:
        write_json_atomic(path, info)
