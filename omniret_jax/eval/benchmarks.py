"""Benchmark adapters: public annotation files + a media folder -> our manifest (JSONL).

Each adapter reads one benchmark's released annotation format, finds every clip's media file
under `media_root` (the folder that directly holds the files; an annotated name is tried as
is, then its stem with each of MEDIA_EXTENSIONS) and returns an AdapterResult; `write` turns
it into a manifest with data.manifest.write_manifest.

Record conventions (the manifest has one `caption` field):
    id        the benchmark's clip id (listed per adapter)
    caption   the clip's first caption (the one mode "first" evaluates)
    meta      {"benchmark": name, "media": "video" | "audio",
               "captions": every caption of the clip in annotation order (captions[0] ==
               caption), plus adapter-specific provenance}
    video     the media file; for audio-only media (Clotho, SoundDescs, audio downloads of
              AudioCaps) `video` and `audio` both name the audio file and meta.media is
              "audio", because the manifest schema requires `video` (see the report: the
              pipeline must not decode frames from such records).
store.caption_entries turns meta.captions into the caption ids "<id>#<k>" used by mode "all".

Missing media: ids whose file is not found are collected in AdapterResult.missing and logged
(count + first ids); they are skipped unless keep_missing=True, in which case the record
points at the expected path.

Formats assumed (public releases):
    MSR-VTT 1k-A  MSRVTT_JSFUSION_test.csv: key,vid_key,video_id,sentence (1 caption/clip);
                  optional MSRVTT_data.json {"sentences": [{"video_id","caption","sen_id"}]}
                  adds the clip's other captions after the JSFusion one. Media <video_id>.mp4.
    MSVD          AllVideoDescriptions.txt: '#' comment lines, then "<clip> <description>";
                  youtube_mapping.txt: "<clip> vid<N>"; splits by N: train 1-1200,
                  val 1201-1300, test 1301-1970. Media <clip>.avi (YouTubeClips).
    DiDeMo        {train,val,test}_data.json: list of {"video", "description", "times", ...};
                  annotations grouped per video in file order. paragraph=True (the standard
                  video-paragraph protocol): caption = the descriptions joined with spaces;
                  otherwise each description is one caption. Id = the video name without its
                  extension.
    VATEX         vatex_*.json: list of {"videoID", "enCap": [10 captions], ...}; optional
                  id subset (e.g. the 1,500-clip test list). Media <videoID>.mp4.
    Clotho        clotho_captions_{evaluation,...}.csv: file_name,caption_1..caption_5.
                  Id = file_name. Media <file_name>.
    SoundDescs    descriptions.pkl from akoepke/audio-retrieval-benchmark (assumed: a pickled
                  plain dict {audio id: description string}; also accepted: a JSON object or a
                  CSV with columns id,description); split list test_list.txt (one id a line)
                  gives the clips and their order. Media <id>.wav (lower-case ids, as that
                  repo's download scripts write them). Only plain containers are unpickled.
    AudioCaps     {train,val,test}.csv: audiocap_id,youtube_id,start_time,caption; rows
                  grouped per (youtube_id, start_time) in file order, id
                  "<youtube_id>_<start_time>". Media found by `name_patterns`.

UVRB datasets (the GVE paper's benchmark; names follow its abbreviations):
    VDC           VDC_1k.jsonl (AuroraCap's Video Detailed Caption): one JSON object a line with
                  video_id, video_name and the captions short_caption, detailed_caption,
                  main_object_caption, background_caption, camera_caption. One adapter call
                  per caption field: UVRB's VDC-D (detailed, "vdc_d") and VDC-O (main object,
                  "vdc_o"); the others are "vdc_short" etc. Id = video_id, media video_name.
    DREAM-1K      DREAM-1k.jsonl (Tarsier): one JSON object a line with vid, dataset,
                  text.response (the clip's description) and extra_info.events (its event
                  sentences). UVRB's DREAM-E ("dream_e"): every event is a query for its clip
                  (captions = the events, scored with mode "all"). The release's video_file
                  is a placeholder: media found by `name_patterns` ("{vid}" first). Id = vid.
    CaReBench     one JSON list of {"video": path, "caption": text or list, ...} (its
                  VideoTextDataset's format); `field` picks the caption: "caption" (UVRB's
                  CRB-G, "crb_g"), "spatial_caption" (CRB-S, "crb_s"), "temporal_caption"
                  (CRB-T, "crb_t"). The last two names are the paper's; CaReBench's own
                  loader reads only "caption". Id = the video's file stem.
Entries lacking the chosen caption are left out and listed in AdapterResult.uncaptioned
(UVRB's VDC-D has fewer queries than videos); our galleries are query-document pairs, so such
a clip is not kept as a distractor.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pickle
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence

from omniret_jax.data.manifest import ManifestRecord, write_manifest

log = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".m4a", ".opus")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".3gp", ".mpg", ".wmv")
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + AUDIO_EXTENSIONS
_SHOWN = 5
MSVD_SPLITS = {"train": (1, 1200), "val": (1201, 1300), "test": (1301, 1970)}


@dataclasses.dataclass(frozen=True)
class AdapterResult:
    """Manifest records of one benchmark and the ids whose media file was not found."""

    benchmark: str
    records: tuple[ManifestRecord, ...]
    missing: tuple[str, ...]
    kept_missing: bool
    uncaptioned: tuple[str, ...] = ()   # ids left out for lacking the chosen caption field

    def summary(self) -> str:
        text = f"{self.benchmark}: {len(self.records)} records"
        if self.missing:
            what = "kept with their expected path" if self.kept_missing else "skipped"
            text += (f"; {len(self.missing)} media files missing ({what}), first: "
                     f"{list(self.missing[:_SHOWN])}")
        if self.uncaptioned:
            text += (f"; {len(self.uncaptioned)} entries without the caption left out, first: "
                     f"{list(self.uncaptioned[:_SHOWN])}")
        return text


class _MediaIndex:
    """File names directly under a media folder, listed once for fast lookups."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.abspath(os.fspath(root))
        if not os.path.isdir(self.root):
            raise ValueError(f"media root {self.root!r} is not a directory")
        self.names = set(os.listdir(self.root))

    def first_found(self, names: Sequence[str], default_ext: str) -> str:
        """The first of ``names`` (candidate file names) that exists, else the first."""
        return next((n for n in names if self.find(n, default_ext)[1]), names[0])

    def find(self, name: str, default_ext: str) -> tuple[str, bool]:
        """(path, found): `name` itself, else its stem with each known extension; when
        nothing exists, the expected path (name, with default_ext if it has no extension)."""
        stem = _strip_media_ext(name)
        has_ext = stem != name
        for cand in ([name] if has_ext else []) + [stem + e for e in MEDIA_EXTENSIONS]:
            if cand in self.names:
                return os.path.join(self.root, cand), True
        return os.path.join(self.root, name if has_ext else name + default_ext), False


def _media_kind(path: str) -> str:
    return "audio" if os.path.splitext(path)[1].lower() in AUDIO_EXTENSIONS else "video"


def _strip_media_ext(name: str) -> str:
    stem, ext = os.path.splitext(name)
    return stem if ext.lower() in MEDIA_EXTENSIONS else name


def _clean(captions: Iterable) -> list[str]:
    return [c.strip() for c in captions if isinstance(c, str) and c.strip()]


def _build(benchmark: str, clips: Sequence[tuple[str, list[str], str, dict]],
           media: _MediaIndex, default_ext: str, keep_missing: bool) -> AdapterResult:
    """clips: (id, captions, media name, extra meta) in benchmark order -> AdapterResult."""
    if not clips:
        raise ValueError(f"{benchmark}: the annotations list no clip")
    dup = [i for i, n in Counter(c[0] for c in clips).items() if n > 1]
    if dup:
        raise ValueError(f"{benchmark}: duplicate clip ids {dup[:_SHOWN]}")
    uncaptioned = [cid for cid, caps, _, _ in clips if not caps]
    if uncaptioned:
        raise ValueError(f"{benchmark}: {len(uncaptioned)} clips have no non-empty caption, "
                         f"first: {uncaptioned[:_SHOWN]}")
    records, missing = [], []
    for cid, captions, name, extra in clips:
        path, found = media.find(name, default_ext)
        if not found:
            missing.append(cid)
            if not keep_missing:
                continue
        kind = _media_kind(path)
        meta = {"benchmark": benchmark, "media": kind, "captions": captions, **extra}
        records.append(ManifestRecord(id=cid, caption=captions[0], video=path,
                                      audio=path if kind == "audio" else None, meta=meta))
    result = AdapterResult(benchmark, tuple(records), tuple(missing), keep_missing)
    if missing:
        log.warning(result.summary())
    if not records:
        raise ValueError(f"{benchmark}: no record left: all {len(clips)} media files are "
                         f"missing under {media.root!r} (first ids {missing[:_SHOWN]})")
    return result


def write(result: AdapterResult, path: str | os.PathLike) -> None:
    """Writes the adapter's records as a manifest (paths relative to it when inside)."""
    write_manifest(path, result.records)


def _read_csv(path, required: Sequence[str]) -> list[dict[str, str]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        return list(reader)


def _read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _expect_list_of_dicts(data, path, keys: Sequence[str]) -> list[dict]:
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    bad = [i for i, e in enumerate(data)
           if not isinstance(e, dict) or any(k not in e for k in keys)]
    if bad:
        raise ValueError(f"{path}: {len(bad)} entries lack key(s) {list(keys)}, first at "
                         f"index {bad[:_SHOWN]}")
    return data


def msrvtt_1ka(csv_path, media_root, *, data_json=None, keep_missing: bool = False
               ) -> AdapterResult:
    """MSR-VTT 1k-A test (JSFusion split); id = video_id ("video7020")."""
    rows = _read_csv(csv_path, ("video_id", "sentence"))
    extra: dict[str, list[tuple[int, str]]] = {}
    if data_json is not None:
        data = _read_json(data_json)
        sentences = data.get("sentences") if isinstance(data, dict) else None
        for s in _expect_list_of_dicts(sentences, data_json, ("video_id", "caption")):
            extra.setdefault(s["video_id"], []).append((int(s.get("sen_id", 0)), s["caption"]))
    clips = []
    for row in rows:
        vid = row["video_id"].strip()
        first = _clean([row["sentence"]])
        others = _clean(c for _, c in sorted(extra.get(vid, []), key=lambda t: t[0]))
        captions = first + [c for c in others if c not in first]
        clips.append((vid, captions, vid, {}))
    return _build("msrvtt_1ka", clips, _MediaIndex(media_root), ".mp4", keep_missing)


def msvd(descriptions_path, media_root, *, mapping_path, split: str = "test",
         keep_missing: bool = False) -> AdapterResult:
    """MSVD (YouTube2Text split by youtube_mapping.txt); id = the clip name."""
    if split not in MSVD_SPLITS:
        raise ValueError(f"unknown MSVD split {split!r}; choose from {list(MSVD_SPLITS)}")
    lo, hi = MSVD_SPLITS[split]
    order = []
    with open(mapping_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            m = re.fullmatch(r"vid(\d+)", parts[-1]) if len(parts) == 2 else None
            if m is None:
                raise ValueError(f"{mapping_path}:{lineno}: expected '<clip> vid<N>', got "
                                 f"{line.strip()!r}")
            if lo <= int(m.group(1)) <= hi:
                order.append((int(m.group(1)), parts[0]))
    captions: dict[str, list[str]] = {}
    with open(descriptions_path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or not line.strip():
                continue
            clip, _, text = line.strip().partition(" ")
            captions.setdefault(clip, []).append(text)
    clips = [(clip, _clean(captions.get(clip, [])), clip, {"vid": f"vid{n}", "split": split})
             for n, clip in sorted(order)]
    return _build("msvd", clips, _MediaIndex(media_root), ".avi", keep_missing)


def didemo(json_path, media_root, *, paragraph: bool = True, keep_missing: bool = False
           ) -> AdapterResult:
    """DiDeMo; id = video name without extension; captions per `paragraph` (module doc)."""
    entries = _expect_list_of_dicts(_read_json(json_path), json_path, ("video", "description"))
    per_video: dict[str, list[dict]] = {}
    for e in entries:
        per_video.setdefault(e["video"], []).append(e)
    clips = []
    for video, anns in per_video.items():
        descriptions = _clean(a["description"] for a in anns)
        segments = [{"description": a["description"], "times": a.get("times")} for a in anns]
        caps = [" ".join(descriptions)] if paragraph and descriptions else descriptions
        clips.append((_strip_media_ext(video), caps, video, {"segments": segments}))
    return _build("didemo", clips, _MediaIndex(media_root), ".mp4", keep_missing)


def _id_list(ids) -> list[str] | None:
    if ids is None:
        return None
    if isinstance(ids, (str, os.PathLike)):
        with open(ids, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    return [str(i) for i in ids]


def vatex(json_path, media_root, *, video_ids=None, keep_missing: bool = False
          ) -> AdapterResult:
    """VATEX; id = videoID. video_ids: optional subset (list or a file, one id a line), in
    whose order the records come; ids absent from the JSON are an error."""
    entries = _expect_list_of_dicts(_read_json(json_path), json_path, ("videoID", "enCap"))
    by_id = {e["videoID"]: e for e in entries}
    wanted = _id_list(video_ids)
    if wanted is not None:
        unknown = [i for i in wanted if i not in by_id]
        if unknown:
            raise ValueError(f"{json_path}: {len(unknown)} requested videoIDs are not in the "
                             f"file, first: {unknown[:_SHOWN]}")
        entries = [by_id[i] for i in wanted]
    clips = [(e["videoID"], _clean(e["enCap"]), e["videoID"], {}) for e in entries]
    return _build("vatex", clips, _MediaIndex(media_root), ".mp4", keep_missing)


def clotho(csv_path, media_root, *, keep_missing: bool = False) -> AdapterResult:
    """Clotho (v1/v2 captions CSV); id = file_name; five captions per clip."""
    rows = _read_csv(csv_path, ("file_name",))
    header = list(rows[0]) if rows else []
    cap_cols = sorted((c for c in header if re.fullmatch(r"caption_\d+", c)),
                      key=lambda c: int(c.split("_")[1]))
    if not cap_cols:
        raise ValueError(f"{csv_path}: expected columns file_name,caption_1..caption_5; found "
                         f"{header}")
    clips = [(r["file_name"], _clean(r[c] for c in cap_cols), r["file_name"], {}) for r in rows]
    return _build("clotho", clips, _MediaIndex(media_root), ".wav", keep_missing)


class _PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers only: a descriptions file must not run code."""

    _ALLOWED = {("collections", "OrderedDict"), ("collections", "defaultdict"),
                ("builtins", "dict"), ("builtins", "list"), ("builtins", "str"),
                ("builtins", "set")}

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise ValueError(f"refusing to unpickle {module}.{name}: descriptions must be a plain "
                         f"dict {{id: description}}")


def _read_descriptions(path) -> dict[str, list[str]]:
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext == ".csv":
        rows = _read_csv(path, ("id", "description"))
        data: dict = {}
        for r in rows:
            data.setdefault(r["id"], []).append(r["description"])
    elif ext == ".json":
        data = _read_json(path)
    else:
        with open(path, "rb") as f:
            data = _PlainUnpickler(f).load()
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping id -> description, got "
                         f"{type(data).__name__}")
    out = {}
    for key, value in data.items():
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{path}: description of {key!r} must be a string or a list of "
                             f"strings, got {type(value).__name__}")
        out[str(key)] = list(texts)
    return out


def sounddescs(descriptions_path, media_root, *, split_list=None, keep_missing: bool = False
               ) -> AdapterResult:
    """SoundDescs; id = the BBC audio id. split_list: test_list.txt (or ids); None = all."""
    descriptions = _read_descriptions(descriptions_path)
    wanted = _id_list(split_list)
    if wanted is None:
        wanted = list(descriptions)
    unknown = [i for i in wanted if i not in descriptions]
    if unknown:
        raise ValueError(f"{descriptions_path}: {len(unknown)} ids of the split have no "
                         f"description, first: {unknown[:_SHOWN]}")
    clips = [(i, _clean(descriptions[i]), i, {}) for i in wanted]
    return _build("sounddescs", clips, _MediaIndex(media_root), ".wav", keep_missing)


AUDIOCAPS_NAME_PATTERNS = ("{youtube_id}_{start_time}", "Y{youtube_id}", "{youtube_id}")


def audiocaps(csv_path, media_root, *, name_patterns: Sequence[str] = AUDIOCAPS_NAME_PATTERNS,
              clip_seconds: float | None = None, keep_missing: bool = False) -> AdapterResult:
    """AudioCaps; id = "<youtube_id>_<start_time>". name_patterns: media file names (without
    extension) tried in order. clip_seconds: set when the media are full YouTube videos, so
    records get start = start_time, end = start_time + clip_seconds; None when the files are
    the released 10 s clips."""
    rows = _read_csv(csv_path, ("audiocap_id", "youtube_id", "start_time", "caption"))
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["youtube_id"].strip(), r["start_time"].strip()), []).append(r)
    media = _MediaIndex(media_root)
    clips, starts = [], {}
    for (yt, start), group in groups.items():
        try:
            start_s = float(start)
        except ValueError:
            raise ValueError(f"{csv_path}: start_time {start!r} of {yt} is not a number") from None
        start_txt = str(int(start_s)) if start_s.is_integer() else start
        names = [p.format(youtube_id=yt, start_time=start_txt) for p in name_patterns]
        name = media.first_found(names, ".wav")
        extra = {"audiocap_ids": [g["audiocap_id"] for g in group]}
        starts[f"{yt}_{start_txt}"] = start_s
        clips.append((f"{yt}_{start_txt}", _clean(g["caption"] for g in group), name, extra))
    result = _build("audiocaps", clips, media, ".wav", keep_missing)
    if clip_seconds is None:
        return result
    timed = tuple(dataclasses.replace(r, start=starts[r.id], end=starts[r.id] + clip_seconds)
                  for r in result.records)
    return dataclasses.replace(result, records=timed)


def _read_jsonl(path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(entry, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(entry).__name__}")
            out.append(entry)
    return out


def _with_uncaptioned(result: AdapterResult, uncaptioned: Sequence[str]) -> AdapterResult:
    result = dataclasses.replace(result, uncaptioned=tuple(uncaptioned))
    if uncaptioned:
        log.warning(result.summary())
    return result


VDC_FIELDS = {"detailed": "vdc_d", "main_object": "vdc_o", "short": "vdc_short", "background": "vdc_background",
              "camera": "vdc_camera"}


def vdc(jsonl_path, media_root, *, caption: str = "detailed", keep_missing: bool = False) -> AdapterResult:
    """VDC (AuroraCap's VDC_1k.jsonl) with one caption field (``VDC_FIELDS``); id = video_id."""
    if caption not in VDC_FIELDS:
        raise ValueError(f"unknown VDC caption {caption!r}; choose from {list(VDC_FIELDS)}")
    entries = _expect_list_of_dicts(_read_jsonl(jsonl_path), jsonl_path, ("video_id", "video_name"))
    field = f"{caption}_caption"
    clips, uncaptioned = [], []
    for e in entries:
        caps = _clean([e.get(field)])
        if not caps:
            uncaptioned.append(str(e["video_id"]))
            continue
        clips.append((str(e["video_id"]), caps, e["video_name"], {"caption_field": field}))
    result = _build(VDC_FIELDS[caption], clips, _MediaIndex(media_root), ".mp4", keep_missing)
    return _with_uncaptioned(result, uncaptioned)


DREAM_NAME_PATTERNS = ("{vid}", "{idx}")


def dream1k(jsonl_path, media_root, *, name_patterns: Sequence[str] = DREAM_NAME_PATTERNS,
            keep_missing: bool = False) -> AdapterResult:
    """DREAM-1K events (UVRB's DREAM-E): captions = extra_info.events; id = vid. ``name_patterns``:
    media file names (without extension) tried in order, formatted with vid and idx."""
    entries = _expect_list_of_dicts(_read_jsonl(jsonl_path), jsonl_path, ("vid", "extra_info"))
    media = _MediaIndex(media_root)
    clips, uncaptioned = [], []
    for e in entries:
        vid, info = str(e["vid"]), e["extra_info"]
        events = _clean(info.get("events") or []) if isinstance(info, dict) else []
        if not events:
            uncaptioned.append(vid)
            continue
        names = [p.format(vid=vid, idx=e.get("idx", vid)) for p in name_patterns]
        name = media.first_found(names, ".mp4")
        text = e.get("text")
        extra = {"source": e.get("dataset"), "description": text.get("response") if isinstance(text, dict) else None,
                 "duration": info.get("duration")}
        clips.append((vid, events, name, extra))
    return _with_uncaptioned(_build("dream_e", clips, media, ".mp4", keep_missing), uncaptioned)


CAREBENCH_FIELDS = {"caption": "crb_g", "spatial_caption": "crb_s", "temporal_caption": "crb_t"}


def carebench(json_path, media_root, *, field: str = "caption", keep_missing: bool = False) -> AdapterResult:
    """CaReBench with one caption field (``CAREBENCH_FIELDS``); id = the video's file stem. A
    list-valued caption gives the clip several captions (mode "all")."""
    if field not in CAREBENCH_FIELDS:
        raise ValueError(f"unknown CaReBench caption field {field!r}; choose from {list(CAREBENCH_FIELDS)}")
    entries = _expect_list_of_dicts(_read_json(json_path), json_path, ("video",))
    clips, uncaptioned = [], []
    for e in entries:
        cid = _strip_media_ext(os.path.basename(e["video"]))
        value = e.get(field)
        caps = _clean([value] if isinstance(value, str) else value or [])
        if not caps:
            uncaptioned.append(cid)
            continue
        clips.append((cid, caps, os.path.basename(e["video"]), {"caption_field": field, "path": e["video"]}))
    result = _build(CAREBENCH_FIELDS[field], clips, _MediaIndex(media_root), ".mp4", keep_missing)
    return _with_uncaptioned(result, uncaptioned)


ADAPTERS: dict[str, Callable[..., AdapterResult]] = {
    "msrvtt_1ka": msrvtt_1ka, "msvd": msvd, "didemo": didemo, "vatex": vatex,
    "clotho": clotho, "sounddescs": sounddescs, "audiocaps": audiocaps,
    "vdc": vdc, "dream1k": dream1k, "carebench": carebench,
}
