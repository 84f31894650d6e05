"""Embedding cache: one safetensors file holding every evaluated path of a gallery.

File layout (safetensors, little-endian):
    tensors   one per path name in PATH_NAMES ("T", "V", "A", "AV", "TV", "TA", "I", "TI", and "TVA",
              which no direction scores but `--paths` can add), 2-D
              [rows, D]; F32 (written by default), F16, BF16 or F64 are read back as float32.
    metadata  "format":      "omniret-embeddings/1"
              "ids":         JSON list of clip ids, the row order of V, A, AV, I, TI, and of the
                             text-bearing paths T, TV, TA when "caption_ids" is absent.
              "caption_ids": optional JSON list; when present, T, TV and TA hold one row per
                             caption in this order. A caption id is "<clip id>#<k>", k = the
                             caption's 0-based position in the clip's caption list (manifest
                             `meta.captions`, else its single `caption`; see caption_entries).
Ids live in the header metadata (JSON strings) so that the file stays one self-describing
safetensors file; safetensors caps the header at 100 MB, i.e. several million ids.

Validation (load and construction): only known path names, every path 2-D with the same D,
clip-level paths with len(ids) rows, caption-level paths with len(caption_ids) rows, no
duplicate ids, every caption's clip among the ids and every clip with at least one caption;
optionally ids equal to a manifest's ids (in order) and D equal to an expected dimension.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

from omniret_jax.convert.tensors import DTYPES, read_header
from omniret_jax.data.manifest import ManifestRecord, read_manifest

PATH_NAMES = ("T", "V", "A", "AV", "TV", "TA", "I", "TI", "TVA")
CAPTION_LEVEL_PATHS = frozenset({"T", "TV", "TA"})
FORMAT = "omniret-embeddings/1"
_FLOAT_CODES = ("F32", "F16", "BF16", "F64")
_SHOWN = 5


def caption_entries(records: Sequence[ManifestRecord]) -> list[tuple[str, str]]:
    """(caption id, text) of every caption of every record: `meta.captions` when the record
    has that list (benchmarks.py writes it), else its single `caption`; ids "<id>#<k>"."""
    out = []
    for rec in records:
        captions = (rec.meta or {}).get("captions") or [rec.caption]
        out.extend((f"{rec.id}#{k}", text) for k, text in enumerate(captions))
    return out


def _clip_of_caption(caption_id: str) -> str:
    clip, sep, k = caption_id.rpartition("#")
    if not sep or not clip or not k.isdigit():
        raise ValueError(f"caption id {caption_id!r} is not of the form '<clip id>#<k>'")
    return clip


def _duplicates(ids: Sequence[str]) -> list[str]:
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    return dup


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
    """Embeddings of one gallery: {path: [rows, D]} plus the ids of the rows (see module doc)."""

    paths: Mapping[str, np.ndarray]
    ids: tuple[str, ...]
    caption_ids: tuple[str, ...] | None = None
    source: str = "embeddings"

    def __post_init__(self):
        object.__setattr__(self, "ids", tuple(self.ids))
        if self.caption_ids is not None:
            object.__setattr__(self, "caption_ids", tuple(self.caption_ids))
        src = self.source
        if not self.paths:
            raise ValueError(f"{src}: no embedding paths")
        unknown = sorted(set(self.paths) - set(PATH_NAMES))
        if unknown:
            raise ValueError(f"{src}: unknown path name(s) {unknown}; known: {list(PATH_NAMES)}")
        dims = {}
        for p, x in self.paths.items():
            shape = np.shape(x)
            if len(shape) != 2:
                raise ValueError(f"{src}: path {p!r} must be [rows, D], got shape {shape}")
            dims[p] = shape[1]
        if len(set(dims.values())) != 1:
            raise ValueError(f"{src}: paths have different dims {dims}")
        for kind, ids in (("ids", self.ids), ("caption_ids", self.caption_ids)):
            if ids is None:
                continue
            dup = _duplicates(ids)
            if dup:
                raise ValueError(f"{src}: {len(dup)} duplicate {kind}, first: {dup[:_SHOWN]}")
            bad = [i for i in ids if not isinstance(i, str) or not i]
            if bad:
                raise ValueError(f"{src}: {kind} must be non-empty strings, got {bad[:_SHOWN]}")
        for p, x in self.paths.items():
            per_caption = self.caption_ids is not None and p in CAPTION_LEVEL_PATHS
            want, what = ((len(self.caption_ids), "caption_ids") if per_caption
                          else (len(self.ids), "ids"))
            if len(x) != want:
                raise ValueError(f"{src}: path {p!r} has {len(x)} rows but there are {want} "
                                 f"{what}")
        if self.caption_ids is not None:
            known = set(self.ids)
            clips = [_clip_of_caption(c) for c in self.caption_ids]
            orphans = [c for c, clip in zip(self.caption_ids, clips) if clip not in known]
            if orphans:
                raise ValueError(f"{src}: {len(orphans)} caption ids name no clip in ids, "
                                 f"first: {orphans[:_SHOWN]}")
            captioned = set(clips)
            bare = [i for i in self.ids if i not in captioned]
            if bare:
                raise ValueError(f"{src}: {len(bare)} clips have no caption, first: "
                                 f"{bare[:_SHOWN]}")

    @property
    def dim(self) -> int:
        return int(np.shape(next(iter(self.paths.values())))[1])

    @property
    def caption_clip(self) -> np.ndarray | None:
        """Clip row of every caption row (None when text paths are one row per clip)."""
        if self.caption_ids is None:
            return None
        row = {c: i for i, c in enumerate(self.ids)}
        return np.array([row[_clip_of_caption(c)] for c in self.caption_ids], dtype=np.int64)

    @property
    def first_caption_rows(self) -> np.ndarray | None:
        """Per clip, the caption row that comes first in caption order (mode "first")."""
        clip = self.caption_clip
        if clip is None:
            return None
        first = np.full(len(self.ids), -1, dtype=np.int64)
        for r in range(len(clip) - 1, -1, -1):
            first[clip[r]] = r
        return first


def _as_ids(manifest) -> tuple[list[str], list[str] | None]:
    """(clip ids, caption ids) from a manifest path, records or a plain id list."""
    if isinstance(manifest, (str, os.PathLike)):
        manifest = read_manifest(manifest)
    items = list(manifest)
    if items and all(isinstance(r, ManifestRecord) for r in items):
        return [r.id for r in items], [c for c, _ in caption_entries(items)]
    if all(isinstance(r, str) for r in items):
        return items, None
    raise ValueError("manifest must be a manifest path, a list of ManifestRecord or a list of ids")


def _mismatch_report(name: str, got: Sequence[str], want: Sequence[str]) -> str:
    pos = [i for i, (a, b) in enumerate(zip(got, want)) if a != b][:_SHOWN]
    lines = [f"{name} do not match the manifest ({len(got)} in the store, {len(want)} in the "
             f"manifest)"]
    lines += [f"  row {i}: store {got[i]!r} != manifest {want[i]!r}" for i in pos]
    extra, missing = set(got) - set(want), set(want) - set(got)
    if missing:
        lines.append(f"  missing from the store ({len(missing)}): "
                     f"{[i for i in want if i in missing][:_SHOWN]}")
    if extra:
        lines.append(f"  not in the manifest ({len(extra)}): "
                     f"{[i for i in got if i in extra][:_SHOWN]}")
    return "\n".join(lines)


def check_against_manifest(emb: EmbeddingSet, manifest) -> None:
    """Raises ValueError unless the store's ids are the manifest's, in order; caption ids are
    checked too when `manifest` holds records (bare ids carry no captions)."""
    ids, caption_ids = _as_ids(manifest)
    problems = []
    if list(emb.ids) != ids:
        problems.append(_mismatch_report(f"{emb.source}: ids", emb.ids, ids))
    if emb.caption_ids is not None and caption_ids is not None:
        if list(emb.caption_ids) != caption_ids:
            problems.append(_mismatch_report(f"{emb.source}: caption_ids", emb.caption_ids,
                                             caption_ids))
    if problems:
        raise ValueError("\n".join(problems))


def write_embeddings(path: str | os.PathLike, paths: Mapping[str, np.ndarray],
                     ids: Sequence[str], caption_ids: Sequence[str] | None = None,
                     dtype=np.float32) -> None:
    """Validates and writes an embedding file (temporary name, then rename)."""
    from safetensors.numpy import save_file

    path = os.fspath(path)
    emb = EmbeddingSet({p: np.asarray(x) for p, x in paths.items()}, tuple(ids),
                       None if caption_ids is None else tuple(caption_ids), source=path)
    meta = {"format": FORMAT, "ids": json.dumps(list(emb.ids), ensure_ascii=False)}
    if emb.caption_ids is not None:
        meta["caption_ids"] = json.dumps(list(emb.caption_ids), ensure_ascii=False)
    tensors = {p: np.ascontiguousarray(x, dtype=dtype) for p, x in emb.paths.items()}
    tmp = f"{path}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def load_embeddings(path: str | os.PathLike, *, manifest=None, expected_dim: int | None = None,
                    mmap: bool = False) -> EmbeddingSet:
    """Reads and validates an embedding file; arrays are float32 (np.memmap when `mmap` and
    the file is F32, so galleries larger than memory are read block by block)."""
    path = os.fspath(path)
    header, meta, data_start = read_header(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: metadata 'format' is {meta.get('format')!r}, expected "
                         f"{FORMAT!r} (write files with store.write_embeddings)")
    try:
        ids = json.loads(meta["ids"])
        caption_ids = json.loads(meta["caption_ids"]) if "caption_ids" in meta else None
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: metadata 'ids'/'caption_ids' missing or not JSON ({e})") from e
    unknown = sorted(set(header) - set(PATH_NAMES))
    if unknown:
        raise ValueError(f"{path}: unknown path name(s) {unknown}; known: {list(PATH_NAMES)}")
    arrays = {}
    for name in PATH_NAMES:
        if name not in header:
            continue
        info = header[name]
        dt = np.dtype(DTYPES[info["dtype"]]) if info["dtype"] in _FLOAT_CODES else None
        if dt is None:
            raise ValueError(f"{path}: path {name!r} has dtype {info['dtype']}; expected one of "
                             f"F32, F16, BF16, F64")
        shape = tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape)) * dt.itemsize:
            raise ValueError(f"{path}: path {name!r} data size does not match shape {shape}")
        if len(shape) != 2:
            raise ValueError(f"{path}: path {name!r} must be [rows, D], got shape {shape}")
        if expected_dim is not None and shape[1] != expected_dim:
            raise ValueError(f"{path}: path {name!r} has D={shape[1]} but expected_dim="
                             f"{expected_dim}")
        mm = np.memmap(path, dtype=dt, mode="r", offset=data_start + begin, shape=shape)
        arrays[name] = mm if (mmap and dt == np.float32) else np.array(mm, dtype=np.float32)
    emb = EmbeddingSet(arrays, tuple(ids), None if caption_ids is None else tuple(caption_ids),
                       source=path)
    if manifest is not None:
        check_against_manifest(emb, manifest)
    return emb
