"""Training/eval manifest: one JSON object per line describing a (caption, video, audio) triple.

Schema (keys not listed are rejected so that typos do not silently drop information):

    id       str, required, non-empty, unique within the manifest
    caption  str, required, non-empty
    video    str, required: path of the clip (its audio track is used unless `audio` is given)
    audio    str, optional: path of a separate audio file
    start    number >= 0, optional: clip start in seconds
    end      number > start, optional: clip end in seconds
    meta     object, optional: free-form attributes (e.g. the synthetic corpus' ground truth)
    task     str, optional, non-empty: the training task of a multi-task manifest (its query kind ->
             document kind, e.g. t2v, i2v, ti2v; ``data.curriculum``'s task table gives its level)

Relative paths resolve against the directory holding the manifest. Validation reads every line
and raises one `ManifestError` that lists `file:line: reason` for all bad records at once, so
a broken manifest is fixed in one pass instead of one error per run; or, with
``on_bad_record="skip"`` (training), keeps the valid lines and returns the others with their
line numbers (`load_manifest`), which the input pipeline counts and reports.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REQUIRED_KEYS = ("id", "caption", "video")
OPTIONAL_KEYS = ("audio", "start", "end", "meta", "task", "query_video")
KNOWN_KEYS = frozenset(REQUIRED_KEYS + OPTIONAL_KEYS)


@dataclasses.dataclass(frozen=True)
class ManifestRecord:
    """One validated manifest entry; `video`/`audio` are absolute paths once read from disk."""

    id: str
    caption: str
    video: str
    audio: str | None = None
    start: float | None = None
    end: float | None = None
    meta: Mapping[str, Any] | None = None
    task: str | None = None
    query_video: str | None = None   # the reference clip of a text + video query (tv2v), whole

    def to_json(self, base_dir: str | None = None) -> dict[str, Any]:
        """The JSON object for this record; paths under `base_dir` are written relative to it."""
        out: dict[str, Any] = {"id": self.id, "caption": self.caption,
                               "video": _relative(self.video, base_dir)}
        if self.audio is not None:
            out["audio"] = _relative(self.audio, base_dir)
        if self.start is not None:
            out["start"] = self.start
        if self.end is not None:
            out["end"] = self.end
        if self.meta is not None:
            out["meta"] = dict(self.meta)
        if self.task is not None:
            out["task"] = self.task
        if self.query_video is not None:
            out["query_video"] = _relative(self.query_video, base_dir)
        return out


class ManifestError(ValueError):
    """All problems of a manifest: `problems` is a list of (location, reason)."""

    def __init__(self, source: str, problems: Sequence[tuple[str, str]]):
        self.source = source
        self.problems = list(problems)
        lines = [f"{loc}: {reason}" for loc, reason in self.problems]
        super().__init__(f"{len(self.problems)} bad record(s) in {source}:\n" + "\n".join(lines))


def _relative(path: str, base_dir: str | None) -> str:
    if base_dir is None or not os.path.isabs(path):
        return path
    rel = os.path.relpath(path, base_dir)
    return path if rel.startswith(os.pardir) else rel


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _record_problems(obj: Any) -> list[tuple[str, str]]:
    """Every reason `obj` is not a valid record as (code, message); empty when it is valid.

    Codes (the pipeline counts skipped lines under ``manifest/<code>``): not_object,
    unknown_key, missing_key, bad_type, empty_caption, empty_field, bad_audio, bad_query_video,
    bad_time, bad_meta, bad_task (and bad_json, duplicate_id from the reader)."""
    if not isinstance(obj, dict):
        return [("not_object", f"record must be a JSON object, got {type(obj).__name__}")]
    problems = []
    unknown = sorted(set(obj) - KNOWN_KEYS)
    if unknown:
        problems.append(("unknown_key", f"unknown key(s) {unknown}; allowed: {sorted(KNOWN_KEYS)}"))
    for key in REQUIRED_KEYS:
        if key not in obj:
            problems.append(("missing_key", f"missing required key {key!r}"))
        elif not isinstance(obj[key], str):
            problems.append(("bad_type", f"{key!r} must be a string, got {type(obj[key]).__name__}"))
        elif not obj[key].strip():
            problems.append(("empty_caption" if key == "caption" else "empty_field", f"{key!r} is empty"))
    for key in ("audio", "query_video"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            problems.append((f"bad_{key}", f"{key!r} must be a non-empty string or null, got {value!r}"))
    times = {}
    for key in ("start", "end"):
        value = obj.get(key)
        if value is None:
            continue
        if not _is_number(value) or not math.isfinite(value):
            problems.append(("bad_time", f"{key!r} must be a finite number of seconds, got {value!r}"))
        elif value < 0:
            problems.append(("bad_time", f"{key!r} is negative ({value})"))
        else:
            times[key] = float(value)
    if "start" in times and "end" in times and times["start"] >= times["end"]:
        problems.append(("bad_time", f"'start' ({times['start']}) must be < 'end' ({times['end']})"))
    meta = obj.get("meta")
    if meta is not None and not isinstance(meta, dict):
        problems.append(("bad_meta", f"'meta' must be a JSON object, got {type(meta).__name__}"))
    task = obj.get("task")
    if task is not None and (not isinstance(task, str) or not task.strip()):
        problems.append(("bad_task", f"'task' must be a non-empty string or null, got {task!r}"))
    return problems


def _resolve(path: str, base_dir: str) -> str:
    path = os.path.expanduser(path)
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def _to_record(obj: dict[str, Any], base_dir: str) -> ManifestRecord:
    def seconds(key):
        return None if obj.get(key) is None else float(obj[key])

    return ManifestRecord(
        id=obj["id"], caption=obj["caption"], video=_resolve(obj["video"], base_dir),
        audio=None if obj.get("audio") is None else _resolve(obj["audio"], base_dir),
        start=seconds("start"), end=seconds("end"), meta=obj.get("meta"), task=obj.get("task"),
        query_video=None if obj.get("query_video") is None else _resolve(obj["query_video"], base_dir))


ON_BAD_RECORD = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class BadRecord:
    """One manifest line that was not read: its line number, the first problem's code, and
    every problem of the line."""

    line: int
    code: str
    message: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The valid records of a manifest file and the lines left out (``on_bad_record="skip"``)."""

    source: str
    records: list[ManifestRecord]
    bad: list[BadRecord]

    def bad_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for b in self.bad:
            counts[b.code] = counts.get(b.code, 0) + 1
        return counts


def load_manifest(path: str | os.PathLike, *, on_bad_record: str = "error") -> Manifest:
    """Parses and validates a JSONL manifest.

    ``on_bad_record="error"`` raises one `ManifestError` listing every bad line; ``"skip"``
    keeps the valid records and returns the others in ``Manifest.bad`` (line number, code,
    reasons), so one broken line does not reject the whole corpus. A manifest without one
    valid record is an error either way. Blank lines are ignored. Paths come back absolute
    (relative ones joined to the manifest's directory); file existence is not checked here:
    the pipeline counts missing media.
    """
    if on_bad_record not in ON_BAD_RECORD:
        raise ValueError(f"on_bad_record={on_bad_record!r}; expected one of {ON_BAD_RECORD}")
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    records: list[ManifestRecord] = []
    problems: list[tuple[str, str]] = []
    bad: list[BadRecord] = []
    first_seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            loc = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                reasons = [("bad_json", f"bad JSON ({e.msg} at column {e.colno})")]
            else:
                reasons = _record_problems(obj)
                if not reasons:
                    rid = obj["id"]
                    if rid in first_seen:
                        reasons.append(("duplicate_id", f"duplicate id {rid!r} (first on line {first_seen[rid]})"))
                    else:
                        first_seen[rid] = lineno
            if reasons:
                problems.extend((loc, msg) for _, msg in reasons)
                bad.append(BadRecord(lineno, reasons[0][0], "; ".join(msg for _, msg in reasons)))
            else:
                records.append(_to_record(obj, base_dir))
    if problems and on_bad_record == "error":
        raise ManifestError(path, problems)
    if not records:
        raise ManifestError(path, problems or [(path, "manifest has no records")])
    return Manifest(path, records, bad)


def read_manifest(path: str | os.PathLike, *, on_bad_record: str = "error") -> list[ManifestRecord]:
    """The valid records of `load_manifest` (by default every bad line raises one `ManifestError`)."""
    return load_manifest(path, on_bad_record=on_bad_record).records


def write_manifest(path: str | os.PathLike,
                   records: Iterable[ManifestRecord | Mapping[str, Any]]) -> None:
    """Validates `records` (all problems reported at once) and writes them as JSONL.

    Absolute paths inside the manifest's directory are stored relative to it, so a corpus
    directory can be moved as a whole. The file is written to a temporary name and renamed.
    """
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    objs, problems, first_seen = [], [], {}
    for index, rec in enumerate(records):
        obj = rec.to_json(base_dir) if isinstance(rec, ManifestRecord) else dict(rec)
        loc = f"{path}: record {index}"
        reasons = [msg for _, msg in _record_problems(obj)]
        if not reasons:
            if obj["id"] in first_seen:
                reasons.append(f"duplicate id {obj['id']!r} (first is record {first_seen[obj['id']]})")
            first_seen.setdefault(obj["id"], index)
        problems.extend((loc, r) for r in reasons)
        objs.append(obj)
    if not objs:
        problems.append((path, "no records to write"))
    if problems:
        raise ManifestError(path, problems)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for obj in objs:
            f.write(json.dumps(obj, ensure_ascii=False, sort_keys=False) + "\n")
    os.replace(tmp, path)
