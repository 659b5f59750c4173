"""One resumable, batched runner for every data generation job (behaviors, SQA, mixed-modal, ...).

A job is a function ``process_batch(items) -> outcomes`` (one outcome per item, same order);
the runner owns everything that makes long jobs safe to run:

* **Output.** Each accepted item becomes one JSON line in ``output_path``; each rejected item
  one ``{"key", "reason"[, "detail"][, "inputs"]}`` line in ``<output>.rejected.jsonl``. Lines are appended
  in input order, flushed and fsync'ed after every batch, so a crash loses at most the batch
  being computed.
* **Resume.** On start both files are read; items whose key is already in either are skipped,
  so a rerun after a crash or Ctrl-C continues where it stopped and never duplicates a line.
  A :class:`Job` that declares the input fields its records copy (``copied_inputs``: the
  transcript) has the records and rejections of an item whose input changed since (a corrected
  transcript under the same key) dropped and made anew; rejections keep those copies as ``inputs``.
  Because pending items keep their input order, an interrupted-then-resumed run writes the same
  file as an uninterrupted one (given a deterministic ``process_batch``).
* **Someone else's file.** A datagen output is read whole (as training data), so it must hold
  this job's items only: a record whose key is not among the items means the file came from
  other input (another manifest, other tasks or limits, or a folder that moved: keys name the
  audio file), and appending to it would silently mix the two (a copied demo folder once
  trained on every behavior twice). That is an error; outputs read by key (evaluation
  predictions) pass ``exclusive=False`` and may keep records of earlier, larger runs, and a
  caller that owns its output as a cache (the demo) trims it with :func:`keep_only` first.
* **Other settings.** A :class:`Job` declares what its outputs depend on (the teacher model, its
  decoding); resuming into an output made with other settings is an error naming them
  (:func:`check_run_settings`, ``<output>.settings.json``): a rerun with another teacher once kept
  the first teacher's answers and added the second's, one training set from two LLMs.
* **Crash mid-write.** A final line without its newline is a torn write: it is cut away (with a
  warning) and its item recomputed. Any other unreadable line means the file is not ours or was
  edited, and is an error naming the file and line.
* **Summary.** A :class:`RunSummary` (counts, rejections by reason, throughput) is returned,
  logged and written to ``<output>.summary.json``.
"""
from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, Union

from tqdm import tqdm

from nemo_speechlm.errors import InputError

log = logging.getLogger(__name__)

REJECTED_SUFFIX = ".rejected.jsonl"
SUMMARY_SUFFIX = ".summary.json"


@dataclass(frozen=True)
class Rejected:
    """Outcome of an item that produced no output record (e.g. a degenerate LLM answer).

    ``reason`` is a short key counted in the summary (``"empty"``, ``"refusal"``, ...);
    ``detail`` (optional) is stored in the sidecar file to help inspect the rejections.
    """

    reason: str
    detail: str | None = None


Outcome = Union[dict, Rejected]
KeyFn = Callable[[dict], Any]


@dataclass(frozen=True)
class Job:
    """A ``process_batch`` with the settings its outputs depend on; :func:`run_resumable` checks them."""

    process: Callable[[list[dict]], list[Outcome]]
    settings: dict | None  # None: the caller checks the output's settings itself (check_run_settings)
    output_fields: tuple[str, ...] = ()  # what every output record has: an output without them is not this job's
    copied_inputs: Callable[[dict], dict] | None = None  # item -> the input fields its record copies (a record whose
    # copy differs from the item now, e.g. a corrected transcript, is redone)
    settings_defaults: dict | None = None  # settings an older output did not record, taken as these values

    def __call__(self, items: list[dict]) -> list[Outcome]:
        return self.process(items)


@dataclass
class RunSummary:
    """What one call of :func:`run_resumable` did. ``rejected`` counts this run's rejections by
    reason, ``rejected_before`` those found in the sidecar from earlier runs."""

    output_path: str
    total: int = 0
    done_before: int = 0
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    rejected_before: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    status: str = "running"  # then "done", "interrupted" (Ctrl-C) or "failed" (an exception)

    @property
    def processed(self) -> int:
        return self.written + sum(self.rejected.values())

    @property
    def items_per_s(self) -> float:
        return self.processed / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def remaining(self) -> int:
        return self.total - self.done_before - self.processed

    def to_dict(self) -> dict:
        return {**asdict(self), "processed": self.processed, "items_per_s": round(self.items_per_s, 3),
                "remaining": self.remaining}

    def __str__(self) -> str:
        def reasons(counts: dict[str, int]) -> str:
            return ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "none"

        return (
            f"{self.output_path}: {self.status}; {self.total} items, {self.done_before} already done, "
            f"{self.written} written, {sum(self.rejected.values())} rejected ({reasons(self.rejected)}), "
            f"{self.remaining} remaining; rejected in earlier runs: {reasons(self.rejected_before)}"
            + (f" (not retried: delete {self.output_path}{REJECTED_SUFFIX} to retry them)"
               if self.rejected_before else "") + "; "
            f"{self.elapsed_s:.1f} s, {self.items_per_s:.2f} items/s"
        )


def run_resumable(
    items: Iterable[dict],
    process_batch: Callable[[list[dict]], list[Outcome]],
    output_path: str | Path,
    batch_size: int,
    desc: str,
    key: KeyFn | str = "key",
    exclusive: bool = True,
) -> RunSummary:
    """Run ``process_batch`` over the items not yet in ``output_path``, appending as it goes.

    ``key`` names the field (or is a function) that gives an item's unique key; the same
    field/function must give the same key for the item's output record, which is how a rerun
    knows what is done. Items are processed in input order, ``batch_size`` at a time.
    ``exclusive``: records (or rejections) of items not in ``items`` are an error (see module doc).
    A :class:`Job` resumes only into an output made with its settings.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    key_of = _key_function(key)
    output_path = Path(output_path)
    rejected_path = Path(str(output_path) + REJECTED_SUFFIX)
    items = list(items)
    keys = [key_of(item) for item in items]
    _check_unique(keys, items, desc)

    output_path.parent.mkdir(parents=True, exist_ok=True)
    records = _read_jsonl(output_path, key_of, what="output record")
    copied_inputs = process_batch.copied_inputs if isinstance(process_batch, Job) else None
    if isinstance(process_batch, Job):
        _check_output_fields(records, process_batch.output_fields, output_path, desc)
        if process_batch.settings is not None:
            check_run_settings(output_path, process_batch.settings, defaults=process_batch.settings_defaults)
    items_by_key = dict(zip(keys, items)) if copied_inputs is not None else {}
    if copied_inputs is not None:
        records = _drop_records_of_changed_items(records, items_by_key, copied_inputs, key_of, output_path,
                                                 lambda record: record, "records")
    done = {key_of(rec) for rec in records}
    if rejected_path.exists() and not output_path.exists():  # the output was deleted to start over (as the settings
        # check advises): its rejections went with it, or the items they name were never made again
        log.warning(f"{rejected_path}: rejections of a deleted output; removed, their items are made anew")
        rejected_path.unlink()
    earlier_rejections = _read_jsonl(rejected_path, _key_function("key"), what="rejection")
    if copied_inputs is not None:
        earlier_rejections = _drop_records_of_changed_items(
            earlier_rejections, items_by_key, copied_inputs, _key_function("key"), rejected_path,
            lambda rejection: rejection.get("inputs"), "rejections")
    rejected_before = Counter(rec.get("reason", "unknown") for rec in earlier_rejections)
    done |= {rec["key"] for rec in earlier_rejections}
    if exclusive:
        _check_no_foreign_records(done - set(keys), output_path, rejected_path)
    pending = [item for item, k in zip(items, keys) if k not in done]
    summary = RunSummary(
        output_path=str(output_path), total=len(items), done_before=len(items) - len(pending),
        rejected_before=dict(rejected_before),
    )
    if summary.done_before:
        log.info("%s: resuming %s, %d of %d items already done", desc, output_path, summary.done_before, len(items))

    start = time.perf_counter()
    rejected = Counter()
    bar = tqdm(total=len(items), initial=summary.done_before, desc=desc, unit="item", dynamic_ncols=True)
    with open(output_path, "a", encoding="utf-8") as out, open(rejected_path, "a", encoding="utf-8") as rej:
        try:
            for begin in range(0, len(pending), batch_size):
                batch = pending[begin : begin + batch_size]
                outcomes = process_batch(batch)
                _check_outcomes(batch, outcomes, key_of, desc)
                for item, outcome in zip(batch, outcomes):
                    if isinstance(outcome, Rejected):
                        line = {"key": key_of(item), "reason": outcome.reason}
                        if outcome.detail is not None:
                            line["detail"] = outcome.detail
                        if copied_inputs is not None:
                            line["inputs"] = copied_inputs(item)
                        rej.write(json.dumps(line, ensure_ascii=False) + "\n")
                        rejected[outcome.reason] += 1
                    else:
                        out.write(json.dumps(outcome, ensure_ascii=False) + "\n")
                        summary.written += 1
                _sync(out, rej)
                summary.rejected = dict(rejected)
                bar.update(len(batch))
                bar.set_postfix(written=summary.written, rejected=sum(rejected.values()), refresh=False)
            summary.status = "done"
        except KeyboardInterrupt as exc:
            _sync(out, rej)
            summary.status = "interrupted"
            raise KeyboardInterrupt(
                f"{desc} interrupted: {summary.written} records written to {output_path} are kept; "
                "rerun the same command to resume where it stopped."
            ) from exc
        except BaseException:
            _sync(out, rej)
            summary.status = "failed"
            raise
        finally:
            bar.close()
            summary.elapsed_s = time.perf_counter() - start
            summary.rejected = dict(rejected)
            _write_summary(output_path, summary)
    log.info("%s: %s", desc, summary)
    return summary


def keep_only(output_path: str | Path, keys: Iterable, key: KeyFn | str = "key",
              why: str = "items not in this run (fewer items, or inputs that moved)") -> int:
    """Rewrite ``output_path`` and its rejections with the records of ``keys`` only; returns how many were dropped.

    For a caller whose output is its own cache, before :func:`run_resumable`: the demo rerun with
    fewer utterances, or in a copied folder (its audio paths, and so its keys, changed), regenerates
    what it needs instead of stopping at the runner's refusal; the benchmark drops the answers of a
    retrained model (``key="system"``). Each file is replaced atomically, and what was dropped is
    logged with ``why`` (a warning: the cache held answers this run does not use)."""
    wanted = set(keys)
    dropped = 0
    output_path = Path(output_path)
    for path, key_of in ((output_path, _key_function(key)), (Path(str(output_path) + REJECTED_SUFFIX), _key_function("key"))):
        records = _read_jsonl(path, key_of, what="record")
        kept = [record for record in records if key_of(record) in wanted]
        if len(kept) < len(records):
            dropped += len(records) - len(kept)
            _replace_jsonl(path, kept)
    if dropped:
        log.warning(f"{output_path}: dropped {dropped} records of {why}; what is missing is made anew")
    return dropped


def update_records(output_path: str | Path, update: Callable[[dict], dict], why: str,
                   key: KeyFn | str = "key") -> list[dict]:
    """Replace each record of ``output_path`` by ``update(record)`` and return the records as they now are (the
    file is rewritten atomically only where one changed, and how many logged with ``why``).

    For a caller that derives part of its records from the rest: the benchmark rescores cached answers,
    so a folder answered before a scoring change is not reported with the old scores."""
    output_path = Path(output_path)
    records = _read_jsonl(output_path, _key_function(key), what="record")
    updated = [update(record) for record in records]
    changed = sum(_canonical(a) != _canonical(b) for a, b in zip(records, updated))
    if changed:
        _replace_jsonl(output_path, updated)
        log.warning(f"{output_path}: updated {changed} of {len(records)} records ({why})")
    return updated


def _canonical(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)  # NaN == NaN here, unlike in dict comparison


def _replace_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


def _check_output_fields(records: list[dict], fields: Sequence[str], output_path: Path, desc: str) -> None:
    """Every record already in the output has the job's fields: one without them was not written by this job (the
    input manifest given as the output read as all done, and the run wrote nothing)."""
    for number, record in enumerate(records, start=1):
        missing = [name for name in fields if name not in record]
        if missing:
            raise InputError(f"{output_path}: record {number} has no {', '.join(map(repr, missing))}, so it is not an "
                             f"output of {desc.lower()} (the input given as the output?)", "give another output path")


def _drop_records_of_changed_items(records: list[dict], items: dict, copied_inputs: Callable[[dict], dict],
                                   key_of: KeyFn, output_path: Path, stored: Callable[[dict], dict | None],
                                   what: str) -> list[dict]:
    """The records whose copies of their item's input fields (``copied_inputs(item)``, as ``stored(record)`` holds
    them) still hold; the others are removed from ``output_path`` (rewritten atomically, with a warning) so their
    items are made anew. Keyed by audio, a line whose transcript was corrected kept its old record (its words, or its
    answers, of the old transcript), and its old rejection (a QA pair refused for the misheard text). A record that
    stores no copies (a rejection written before they were kept) is kept."""
    def changed(record: dict) -> bool:
        item, copies = items.get(key_of(record)), stored(record)
        return item is not None and copies is not None and any(
            copies.get(f) != value for f, value in copied_inputs(item).items())

    stale_ids = {id(r) for r in records if changed(r)}
    if not stale_ids:
        return records
    kept = [r for r in records if id(r) not in stale_ids]
    _replace_jsonl(output_path, kept)
    log.warning(f"{output_path}: {len(stale_ids)} {what} of items changed in the input since (e.g. a corrected "
                "transcript) were dropped; they are made anew")
    return kept


def _key_function(key: KeyFn | str) -> KeyFn:
    if callable(key):
        return key
    field_name = key

    def get(record: dict) -> Any:
        if field_name not in record:
            raise KeyError(f"record has no key field {field_name!r}: {json.dumps(record)[:200]}")
        return record[field_name]

    return get


def _check_unique(keys: list, items: list, desc: str) -> None:
    first_index: dict = {}
    for index, k in enumerate(keys):
        if not isinstance(k, (str, int)):
            raise TypeError(f"{desc}: item {index} has key {k!r} of type {type(k).__name__}; keys must be str (or int)")
        if k in first_index:  # an input line given twice (a traceback before)
            first, again = (_where(items[i], i) for i in (first_index[k], index))
            raise InputError(
                f"{desc}: {first} and {again} are the same item ({k!r}); each needs its own key, "
                "or resuming cannot tell which ones are done",
                "remove the entry given twice from the input (e.g. a repeated manifest line)",
            )
        first_index[k] = index


def _where(item: Any, index: int) -> str:
    """An item's manifest file and line where it carries its line (``entry``: a ManifestEntry), else its position."""
    entry = item.get("entry") if isinstance(item, dict) else None
    if getattr(entry, "path", None) is not None and getattr(entry, "line", None) is not None:
        return f"{entry.path}:{entry.line}"
    return f"item {index + 1}"


def _check_no_foreign_records(foreign: set, output_path: Path, rejected_path: Path) -> None:
    if foreign:
        raise InputError(
            f"{output_path} holds {len(foreign)} records of items this run does not have "
            f"(e.g. {min(foreign, key=str)!r}): it was written from other input (another manifest, other tasks "
            "or limits, or audio that has moved since: keys name the audio file), and appending would mix the two",
            f"write to another output, or delete {output_path} and {rejected_path.name} to generate it anew",
        )


def _check_outcomes(batch: list[dict], outcomes: list[Outcome], key_of: KeyFn, desc: str) -> None:
    if not isinstance(outcomes, list) or len(outcomes) != len(batch):
        got = len(outcomes) if isinstance(outcomes, list) else type(outcomes).__name__
        raise ValueError(f"{desc}: process_batch must return a list with one outcome per item: {len(batch)} items, got {got}")
    for item, outcome in zip(batch, outcomes):
        if isinstance(outcome, Rejected):
            continue
        if not isinstance(outcome, dict):
            raise TypeError(f"{desc}: an outcome must be a dict record or a Rejected, got {type(outcome).__name__}")
        if key_of(outcome) != key_of(item):
            raise ValueError(
                f"{desc}: the output record for item {key_of(item)!r} carries key {key_of(outcome)!r}; "
                "records must carry their item's key so that a rerun can resume."
            )


def _read_jsonl(path: Path, key_of: KeyFn, what: str) -> list[dict]:
    """Records of a JSONL file we append to, after repairing a torn final line (see module doc)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        cut = data.rfind(b"\n") + 1
        tail = data[cut:]
        if _parse_object(tail) is not None:
            # The record is complete and only its newline is missing: keep it.
            with open(path, "ab") as f:
                f.write(b"\n")
            data += b"\n"
        else:
            log.warning(
                "%s: the last line (%d bytes, line %d) is incomplete, as after a crash mid-write; removing it, "
                "its item will be recomputed",
                path, len(tail), data.count(b"\n") + 1,
            )
            with open(path, "r+b") as f:
                f.truncate(cut)
                f.flush()
                os.fsync(f.fileno())
            data = data[:cut]
    records = []
    for line_no, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_object(line)
        if record is None:
            raise InputError(
                f"{path}:{line_no}: not a JSON object ({line[:80]!r}...). Only a torn final line is repaired "
                f"automatically; fix or remove this line (or the file) and rerun."
            )
        try:
            key_of(record)
        except (KeyError, TypeError) as exc:
            raise InputError(f"{path}:{line_no}: {what} without its key: {exc}") from exc
        records.append(record)
    return records


def _parse_object(text: str | bytes) -> dict | None:
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _sync(*files) -> None:
    for f in files:
        f.flush()
        os.fsync(f.fileno())


def _write_summary(output_path: Path, summary: RunSummary) -> None:
    write_json_atomic(Path(str(output_path) + SUMMARY_SUFFIX), summary.to_dict())


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written beside ``path`` and moved into place: a kill mid-write leaves the old file
    (written in place, an emptied settings file stopped every rerun with a traceback)."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if path.is_file() and path.read_text(encoding="utf-8", errors="replace") == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``{}`` when there is none); an unreadable one is an :class:`InputError` naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        data = exc
    if not isinstance(data, dict):
        raise InputError(f"{path}: the {what} is not a JSON object (a write cut short?)",
                         f"delete {path} together with the results beside it, to start over")
    return data


# --------------------------------------------------------------------------- run files

SETTINGS_SUFFIX = ".settings.json"


def check_run_settings(output_path: str | Path, settings: dict, settings_file: str | Path | None = None,
                       defaults: dict | None = None) -> None:
    """Refuse to resume into an output (a file, or a folder of results) written with other settings
    (model, prompt, decoding, training config): the old results would be silently mixed with new ones.
    Writes ``settings_file`` (default ``<output>.settings.json``). A top-level setting recorded before and no
    longer given is one the caller's results stopped depending on (compare_objectives' evaluation sizes), not a change.
    ``defaults``: the settings as the package's defaults make them; a setting missing from the recorded ones (a
    config key added by an upgrade) that has its default value is not a change either."""
    path = Path(settings_file) if settings_file is not None else Path(str(output_path) + SETTINGS_SUFFIX)
    settings = json.loads(json.dumps(settings))  # normalize tuples etc. for the comparison
    if path.is_file() and Path(output_path).exists():
        before = {k: v for k, v in read_json_object(path, "record of the settings").items() if k in settings}
        changed = changed_values(before, settings, defaults=json.loads(json.dumps(defaults or {})))
        if changed:
            diff = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changed)
            raise InputError(
                f"{output_path} holds results made with other settings ({diff})",
                f"use another output location, or delete {output_path} and {path} to start over",
            )
    write_json_atomic(path, settings)


_ABSENT = object()


def changed_values(before: dict, after: dict, prefix: str = "", defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
    """``(dotted key, before, after)`` for each value that differs, nested dicts compared key by key
    (so a changed training config names ``config.trainer.max_steps``, not the whole config). A key only
    ``after`` has, at its value in ``defaults`` (same nesting), is not a change."""
    changed = []
    defaults = defaults if isinstance(defaults, dict) else {}
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += changed_values(old, new, f"{prefix}{key}.", defaults.get(key))
        elif key not in before and defaults.get(key, _ABSENT) == new:
            continue
        elif old != new:
            changed.append((f"{prefix}{key}", old, new))
    return changed


def read_records(path: str | Path, keys: Sequence) -> list[dict]:
    """The output records for ``keys``, in that order (a predictions file may hold them in any order)."""
    by_key = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                record = json.loads(line)
                by_key[record["key"]] = record
    missing = [k for k in keys if k not in by_key]
    if missing:
        raise InputError(f"{path}: no prediction for {len(missing)} items (e.g. {missing[0]!r})", "rerun to complete it")
    return [by_key[k] for k in keys]
