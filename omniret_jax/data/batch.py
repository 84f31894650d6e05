"""Assembling a batch's device inputs on the host: token layouts of every path, merge indices, negatives.

From one pipeline batch (``omniret_jax.data.pipeline``) this builds the fixed-shape arrays
of ``omniret_jax.inputs``: for each embedding path the padded token ids, M-RoPE position ids
(``layout.rope_index``), merge indices (which tower output each placeholder takes) and the
pooled index; the vision tower's ``VisionLayout``; and for a train step the augmented view
and the hard-negative tuple, whose rows are drawn here with NumPy (a derangement of the
global batch, one slot per step: text, audio, video, cycling). Several processes each lay
out their own rows of the global batch (``row_offset``) and exchange only the small per-row
metadata a hard negative needs from other rows (``row_metadata``).
"""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from omniret_jax.config import EMBED_PATHS, BackboneConfig, EmbedConfig, ViewPlan, VisionConfig, check_paths
from omniret_jax.data.layout import (Audio, Image, Text, TurnLayout, Video, audio_output_lengths, batch_media,
                                     expand_turn, pad_batch, pad_position, rope_index)
from omniret_jax.data.tokens import Tokens
from omniret_jax.data.vision_layout import vision_layout
from omniret_jax.inputs import AUDIO, IMAGE, PATH_LETTER, TEXT, VIDEO, EmbedInputs, PathInputs, TrainInputs

# Keys whose first axis (or list length) is the batch, in the order they are trusted.
_ROW_KEYS = ("caption", "caption_ids", "video_grid_thw", "image_grid_thw", "mel_len", "video_patches",
             "image_patches", "mel", "fbank")
_SLOTS = ("text", "audio", "video")
# A sample's (and a batch's) per-row token layouts computed in the pipeline's workers (``add_row_layouts``).
ROW_LAYOUT = "row_layout"
# A pipeline batch's other views, beside its own: the augmented copy, the reference clip of a
# text + video query.
VIEWS = ("aug", "query")


def batch_rows(batch: dict) -> int:
    """Rows of a pipeline batch, read from its declared per-row keys (never from dict order,
    which grain's worker processes change); every such key must agree."""
    sizes = {k: len(batch[k]) for k in _ROW_KEYS if k in batch}
    if not sizes:
        raise KeyError(f"batch has none of the per-row keys {_ROW_KEYS}; got keys {sorted(batch)}")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch keys disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def take_rows(batch: dict, start: int, stop: int) -> dict:
    """Rows [start, stop) of a pipeline batch: every leaf is per row (arrays on their first axis,
    lists), views and per-row layouts (dicts) alike."""
    return {k: take_rows(v, start, stop) if isinstance(v, dict) else v[start:stop] for k, v in batch.items()}


def merge_indices(input_ids: np.ndarray, cfg: BackboneConfig, n_valid: Mapping[int, Sequence | np.ndarray],
                  capacity: Mapping[int, int], *, row_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: (source [B, S] in {TEXT, IMAGE, VIDEO, AUDIO}, index [B, S]).

    A modality's tower output is [R, capacity, D] (R rows, each padded) with
    ``n_valid[kind][r]`` real features in row r. Like ``masked_scatter``, the
    placeholders of that modality, read row-major over the batch, take the real
    features in order; ``index`` points into the flattened [R * capacity] array.
    ``row_offset`` is the global row of the first row here (a process's part of a batch
    that is sharded over several): the device sees the global tower output.
    """
    ids = np.asarray(input_ids)
    if cfg.audio_token_id is None and len(n_valid.get(AUDIO, ())):
        raise ValueError(f"audio features given, but the {cfg.family} backbone has no audio tower")
    source = np.full(ids.shape, TEXT, np.int32)
    index = np.zeros(ids.shape, np.int32)
    tokens = {IMAGE: cfg.image_token_id, VIDEO: cfg.video_token_id, AUDIO: cfg.audio_token_id}
    names = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}
    for kind, token in tokens.items():
        hit = ids == token
        counts = np.asarray(n_valid.get(kind, ()), np.int64)
        if hit.sum() != counts.sum():
            raise ValueError(f"{int(hit.sum())} {names[kind]} placeholder tokens in the batch but "
                             f"{int(counts.sum())} {names[kind]} features (valid counts per row: {counts.tolist()})")
        if not hit.any():
            continue
        if (counts > capacity[kind]).any():
            raise ValueError(f"{names[kind]} valid counts {counts.tolist()} exceed the tower capacity {capacity[kind]}")
        flat = np.concatenate([(row_offset + r) * capacity[kind] + np.arange(n) for r, n in enumerate(counts)])
        source[hit] = kind
        index[hit] = flat
    return source, index


def path_length(path: str, ecfg: EmbedConfig, capacity: Mapping[int, int], fixed: Mapping[str, int]) -> int:
    """Padded length of a path's rows: the longest row the batch's fixed shapes allow, exactly.

    Media blocks take their tower capacity (video tokens of P patches, image tokens of its Q
    patches, audio tokens of T mel frames, doubled for WAVE) plus their start/end tokens; text takes the caption budget
    (``text_len - 1`` tokens) on the paths with T; ``fixed[path]`` counts the rest (turn template,
    prefix, the fixed prompt of V / A / AV: ``fixed_ids``). Rounded up to
    ``ecfg.length_multiple``. Nothing depends on the batch's content, so every batch of a run has
    the same shapes and the step compiles once.
    """
    n = fixed[path]
    if "V" in path:
        n += 2 + capacity[VIDEO]
    if "I" in path:
        n += 2 + capacity[IMAGE]
    if "A" in path:
        n += 2 + capacity[AUDIO]
    if "T" in path:
        n += ecfg.text_len - 1
    m = ecfg.length_multiple
    return -(-n // m) * m


def prefix(path: str, ecfg: EmbedConfig) -> str:
    """The text before a path's caption or prompt: the query prefix on T, the passage prefix on
    every path with media."""
    return ecfg.query_prefix if path == "T" else ecfg.passage_prefix


def fixed_ids(ecfg: EmbedConfig, tokens: Tokens) -> tuple[list[int], list[int], dict[str, list[int]]]:
    """(turn start, turn end, {path: the ids of its fixed text}): the prefix on the paths with T
    (where it is encoded together with the caption, as a tokenizer sees the turn), prefix +
    prompt on V / I / A / AV."""
    prompts = {"V": ecfg.video_prompt, "I": ecfg.image_prompt, "A": ecfg.audio_prompt, "AV": ecfg.av_prompt}
    text = {p: tokens.encode_text(prefix(p, ecfg) + ("" if "T" in p else prompts[p])) for p in EMBED_PATHS}
    return tokens.encode_text(ecfg.turn_start), tokens.encode_text(ecfg.turn_end), text


def turn(media: list, text: list[int], start: list[int], end: list[int], ecfg: EmbedConfig,
         cfg: BackboneConfig) -> TurnLayout:
    """One path's sequence: ``start``, then the media blocks and ``text`` in the configured
    order, then ``end``. Media outside ``ecfg.policy`` are an error naming its config key."""
    if ecfg.text_first:
        items, after = [Text(tuple(start + text)), *media], end
    else:
        items, after = [Text(tuple(start)), *media], text + end
    try:
        return expand_turn(items, after, cfg, wave_doubled_audio=ecfg.doubled_audio, policy=ecfg.policy)
    except ValueError as e:
        raise ValueError(str(e).replace("MediaPolicy.kinds", "config.embed.media_kinds")
                         .replace("MediaPolicy.max_frames", "config.embed.max_frames")) from None


def pooled_counts(p: PathInputs) -> np.ndarray:
    """Real tokens of each sequence of a pass [B]: the tokens of its segment in its row (what a
    mean pool averages); 0 when its pooled index points at padding."""
    length = p.attention_mask.shape[1]
    rows, cols = np.divmod(np.asarray(p.pool_index), length)
    seg = np.asarray(p.attention_mask)[rows, cols]
    return np.array([int((np.asarray(p.attention_mask)[r] == g).sum()) if g > 0 else 0 for r, g in zip(rows, seg)])


def check_pooling(p: PathInputs, path: str, ecfg: EmbedConfig) -> None:
    """Host-side guard of a mean-pooled pass: every sequence has real tokens to average."""
    if ecfg.pooling != "mean":
        return
    empty = np.flatnonzero(pooled_counts(p) == 0)
    if len(empty):
        raise ValueError(f"EmbedConfig.pooling='mean' averages each sequence's real tokens, but sample(s) "
                         f"{empty.tolist()} of the {path} path have none (an all-padding row)")


def pack_rows(p: PathInputs, per_row: int, row_len: int, pad_id: int, *, first_row: int = 0) -> PathInputs:
    """Pack consecutive sequences of an unpacked pass into ``ceil(B / per_row)`` rows of ``row_len``
    tokens, when they fit (else the pass stays unpacked: a second program, compiled once).

    Each sequence keeps its tokens, merge indices and positions (which restart per sequence);
    ``attention_mask`` becomes the segment id within the row and ``pool_index`` moves with the
    sequence. Row-major order keeps the sequences in batch order, as merge indices expect.
    ``first_row``: the global index of this pass's first unpacked row (``pool_index`` is flat
    over the global batch's rows); a process's packed rows follow the other processes' equal
    shares.
    """
    b, length = p.input_ids.shape
    if per_row <= 1:
        return p
    if first_row % b:
        raise ValueError(f"first_row={first_row} is not a multiple of the pass's {b} rows (processes hold equal shares)")
    if row_len < length and (p.attention_mask.sum(axis=1) > row_len).any():
        return p
    lens = p.attention_mask.sum(axis=1)
    rows = -(-b // per_row)
    place, row, used, seg = [], 0, 0, 0
    for i, n in enumerate(lens.tolist()):
        if used + n > row_len or seg == per_row:
            row, used, seg = row + 1, 0, 0
        place.append((row, used, seg + 1))
        used, seg = used + n, seg + 1
    if row >= rows:
        return p
    ids = np.full((rows, row_len), pad_id, np.int32)
    mask = np.zeros((rows, row_len), np.int32)
    pos = np.ones((rows, 3, row_len), np.int32)
    source = np.zeros((rows, row_len), np.int32)
    index = np.zeros((rows, row_len), np.int32)
    pool = np.zeros(b, np.int32)
    for i, (r, start, segment) in enumerate(place):
        n = int(lens[i])
        sl = slice(start, start + n)
        ids[r, sl], mask[r, sl], source[r, sl], index[r, sl] = (p.input_ids[i, :n], segment, p.source[i, :n],
                                                              p.index[i, :n])
        pos[r, :, sl] = p.position_ids[i, :, :n]
        pool[i] = (first_row // b * rows + r) * row_len + start + int(p.pool_index[i]) - (first_row + i) * length
    return PathInputs(ids, mask, pos, source, index, pool)


def caption_lists(batch: dict, key: str = "caption", tokens: Tokens | None = None) -> list[list[int]]:
    """Token ids of each row's caption: the pipeline's ``<key>_ids`` / ``<key>_len`` when present
    (already within the budget), else ``tokens.encode`` of the text."""
    if f"{key}_ids" in batch:
        ids, lens = np.asarray(batch[f"{key}_ids"]), np.asarray(batch[f"{key}_len"]).reshape(-1)
        out = [ids[i, :n].tolist() for i, n in enumerate(lens)]
    else:
        if tokens is None:
            raise KeyError(f"batch has no {key}_ids and no tokenizer was given")
        out = [list(tokens.encode(c)) if isinstance(c, str) else [] for c in batch[key]]
    for i, ids in enumerate(out):
        if not ids:
            raise ValueError(f"sample {i}: empty {key}")
    return out


def caption_token_budget(ecfg: EmbedConfig) -> int:
    """Most caption tokens a row holds: ``text_len - 1``. Every path's length (``path_length``)
    reserves that budget next to its fixed text and the largest clip its towers take, so a
    caption within it fits in any path, with any hard-negative clip."""
    if ecfg.text_len < 2:
        raise ValueError(f"embed.text_len={ecfg.text_len} leaves no caption token (need >= 2)")
    return ecfg.text_len - 1


def prefixed_caption(pre: str, pre_ids: list[int], ids: list[int], text: str | None, tokens: Tokens,
                     budget: int) -> list[int]:
    """A caption's ids behind its prefix: prefix and caption text encoded together, as a tokenizer
    sees the turn (a BPE merges the prefix's trailing space into the first word), when the text is
    here; else (a row of another process) the prefix's ids then the caption's. At most
    ``len(pre_ids) + budget`` tokens."""
    if not pre:
        return list(ids)
    if text is None:
        return pre_ids + list(ids)[:budget]
    return list(tokens.encode(pre + text))[:len(pre_ids) + budget]


def _turn_rows(meta: dict, path: str, model_cfg, tokens: Tokens, ecfg: EmbedConfig) -> list[TurnLayout]:
    """Each row's token layout on ``path`` from the per-row metadata (see ``_row_layouts``)."""
    grids, spg, image_grids, mel_len, captions = (
        meta.get(k) for k in ("video_grid_thw", "video_second_per_grid", "image_grid_thw", "mel_len", "captions"))
    texts_in = meta.get("caption_text")
    b = len(next(v for k, v in meta.items() if v is not None and k != ROW_LAYOUT))
    start, end, texts = fixed_ids(ecfg, tokens)
    budget, pre = caption_token_budget(ecfg), prefix(path, ecfg)
    rows = []
    for i in range(b):
        media = []
        if "I" in path:
            media.append(Image(tuple(int(x) for x in image_grids[i])))
        if "V" in path:
            media.append(Video(tuple(int(x) for x in grids[i]), float(spg[i]),
                               int(mel_len[i]) if ("A" in path and ecfg.audio_in_video) else None))
        if "A" in path and not ("V" in path and ecfg.audio_in_video):
            media.append(Audio(int(mel_len[i])))
        if "T" in path:
            text = prefixed_caption(pre, texts[path], captions[i], None if texts_in is None else texts_in[i],
                                    tokens, budget)
        else:
            text = texts[path]
        rows.append(turn(media, text, start, end, ecfg, model_cfg))
    return rows


def row_layouts(sample: dict, paths: Sequence[str], model_cfg, tokens: Tokens, ecfg: EmbedConfig
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """One pipeline sample's token ids [n] and M-RoPE positions [3, n] on each of ``paths``: the
    per-row part of a batch's layout, computed in the pipeline's worker processes
    (``add_row_layouts``) so that ``prepare`` only pads, indexes and packs. Equal to what
    ``prepare`` computes itself. The I / TI paths lay out the still frame ``still_frames`` makes
    of the clip after batching (its grid is known here) unless the sample holds its own image."""
    one = {k: ([v] if isinstance(v, str) else np.asarray(v)[None]) for k, v in sample.items()
           if isinstance(v, (str, np.ndarray, np.generic, int, float))}
    if any("I" in p for p in paths) and "image_grid_thw" not in one:
        one["image_grid_thw"] = still_grids(one["video_grid_thw"])
    meta = _layout_meta(one, paths, tokens)
    out = {}
    for path in paths:
        (row,) = _turn_rows(meta, path, model_cfg, tokens, ecfg)
        ids = np.asarray(row.input_ids, np.int32)
        pos, _ = rope_index(ids[None], np.ones((1, len(ids)), np.int32), model_cfg, **batch_media([row]))
        out[path] = (ids, pos[:, 0])
    return out


def add_row_layouts(sample: dict, *, anchor: Sequence[str], aug: Sequence[str], model_cfg, tokens: Tokens,
                    ecfg: EmbedConfig, query: Sequence[str] = ()) -> dict:
    """``sample`` (and its augmented view, its query clip's view) with ``row_layouts`` of the
    paths each view is embedded on, under ``ROW_LAYOUT``: the pipeline's per-sample hook for a
    train step's layout."""
    sample[ROW_LAYOUT] = row_layouts(sample, anchor, model_cfg, tokens, ecfg)
    for view, paths in (("aug", aug), ("query", query)):
        if paths and isinstance(sample.get(view), dict):
            sample[view][ROW_LAYOUT] = row_layouts(sample[view], paths, model_cfg, tokens, ecfg)
    return sample


def _row_layouts(meta: dict, paths: Sequence[str], model_cfg, tokens: Tokens, ecfg: EmbedConfig,
                 capacity: dict[int, int], *, row_offset: int) -> dict[str, PathInputs]:
    """PathInputs of each path from per-row metadata: ``captions`` (token id lists, within the
    budget), ``caption_text`` (the strings, when this process has them), ``video_grid_thw``
    [b, 3], ``video_second_per_grid`` [b], ``image_grid_thw`` [b, 3], ``mel_len`` [b], and
    optionally ``ROW_LAYOUT`` ({path: each row's (ids, positions)}, from the pipeline's workers:
    those paths are only padded here)."""
    grids, image_grids, mel_len = (meta.get(k) for k in ("video_grid_thw", "image_grid_thw", "mel_len"))
    precomputed = meta.get(ROW_LAYOUT) or {}
    n_valid = {}
    unit = model_cfg.vision.spatial_merge_size ** 2
    if grids is not None:
        n_valid[VIDEO] = [int(np.prod(g)) // unit for g in grids]
    if image_grids is not None:
        n_valid[IMAGE] = [int(np.prod(g)) // unit for g in image_grids]
    if mel_len is not None:
        n_w = audio_output_lengths(np.asarray(mel_len))
        n_valid[AUDIO] = list(2 * n_w) if ecfg.doubled_audio else list(n_w)
    start, end, texts = fixed_ids(ecfg, tokens)
    fixed = {p: len(start) + len(end) + len(texts[p]) for p in EMBED_PATHS}
    out = {}
    for path in paths:
        length = path_length(path, ecfg, capacity, fixed)
        if path in precomputed:
            ids = [r[0] for r in precomputed[path]]
            b = len(ids)
        else:
            rows = _turn_rows(meta, path, model_cfg, tokens, ecfg)
            ids, b = [r.input_ids for r in rows], len(rows)
        padded = pad_batch(ids, length, tokens.pad_id, side="right",
                           names=[f"sample {row_offset + i} ({path} path)" for i in range(b)])
        if path in precomputed:   # right-padded: each row's real tokens come first
            pos = np.full((3, b, length), pad_position(model_cfg), np.int32)
            for i, (_, p) in enumerate(precomputed[path]):
                pos[:, i, :p.shape[1]] = p
        else:
            pos, _ = rope_index(padded.input_ids, padded.attention_mask, model_cfg, **batch_media(rows))
        kinds = {k: v for k, v in n_valid.items() if PATH_LETTER[k] in path}
        source, index = merge_indices(padded.input_ids, model_cfg, kinds, capacity, row_offset=row_offset)
        local = PathInputs(padded.input_ids, padded.attention_mask, np.swapaxes(pos, 0, 1), source, index,
                           np.arange(b, dtype=np.int32) * length + padded.last_index)
        check_pooling(local, path, ecfg)
        unpacked = dataclasses.replace(local, pool_index=local.pool_index + np.int32(row_offset * length))
        per_row, row_len = ecfg.packing(path)
        out[path] = pack_rows(unpacked, per_row, row_len or per_row * length, tokens.pad_id, first_row=row_offset)
    return out


def _capacity(batch: dict, model_cfg, ecfg: EmbedConfig) -> dict[int, int]:
    cap = {}
    if "video_patches" in batch:
        cap[VIDEO] = np.shape(batch["video_patches"])[1] // model_cfg.vision.spatial_merge_size ** 2
    if "image_patches" in batch:
        cap[IMAGE] = np.shape(batch["image_patches"])[1] // model_cfg.vision.spatial_merge_size ** 2
    if "mel" in batch:
        cap[AUDIO] = np.shape(batch["mel"])[-1] // 4 * (2 if ecfg.doubled_audio else 1)
    return cap


def patches_needed(batch: dict) -> int:
    """The most patch rows one clip of ``batch`` (or of its other views: ``VIEWS``)
    holds: the product of its ``video_grid_thw``; 0 without video."""
    views = [batch] + [batch[k] for k in VIEWS if isinstance(batch.get(k), dict)]
    grids = [np.asarray(v["video_grid_thw"]).reshape(-1, 3) for v in views if "video_grid_thw" in v]
    return max((int(np.prod(g, axis=1).max()) for g in grids if len(g)), default=0)


def cut_patches(batch: dict, sizes: Sequence[int], gather=None) -> dict:
    """``batch`` with ``video_patches`` (its other views' too) cut to the smallest P of
    ``sizes`` (ascending: the pipeline's ``patch_bucket_sizes``) that holds every clip of the
    global batch. ``gather`` (as in ``build_inputs``: a dict of per-row arrays -> the same over
    all processes) makes every process cut to the same P; alone, this batch is the global one.
    The rows cut off are padding, so every path's embedding is the same at any P that holds the
    clips; shorter video rows and ViT input are what a batch of ordinary clips gains."""
    need = patches_needed(batch)
    if gather is not None and len(sizes) > 1:
        need = int(gather({"need": np.array([need], np.int32)})["need"].max())
    fits = [int(p) for p in sizes if p >= need]
    if not fits:
        raise ValueError(f"a clip holds {need} patch rows, more than the largest bucket {max(sizes)}")
    size = fits[0]

    def cut(view: dict) -> dict:
        if "video_patches" not in view:
            return view
        patches = view["video_patches"]
        if np.shape(patches)[1] < size:
            raise ValueError(f"video_patches hold {np.shape(patches)[1]} rows per clip, fewer than the bucket {size}")
        return dict(view, video_patches=patches[:, :size])

    out = cut(batch)
    for k in VIEWS:
        if isinstance(batch.get(k), dict):
            out[k] = cut(batch[k])
    return out


def _layout_meta(batch: dict, paths: Sequence[str], tokens: Tokens) -> dict:
    """The per-row metadata the token layouts of ``paths`` read (see ``_row_layouts``)."""
    b = batch_rows(batch)
    need_t = any("T" in p for p in paths)
    try:
        captions = caption_lists(batch, tokens=tokens) if need_t else None
    except ValueError as e:
        if "TI" not in paths:
            raise
        raise ValueError(f"the composed query (TI: image + text) needs its text: {e}") from None
    meta: dict = {"captions": captions,
                  "caption_text": list(batch["caption"]) if need_t and "caption" in batch else None}
    if any("V" in p for p in paths):
        meta["video_grid_thw"] = np.asarray(batch["video_grid_thw"]).reshape(b, 3)
        meta["video_second_per_grid"] = np.asarray(batch["video_second_per_grid"]).reshape(b)
    if any("I" in p for p in paths):
        meta["image_grid_thw"] = np.asarray(batch["image_grid_thw"]).reshape(b, 3)
    if any("A" in p for p in paths):
        meta["mel_len"] = np.asarray(batch["mel_len"], np.int32).reshape(b)
    return meta


def prepare(batch: dict, paths: Sequence[str], model_cfg, tokens: Tokens, ecfg: EmbedConfig, *,
            row_offset: int = 0) -> EmbedInputs:
    """Host-side inputs of ``omniret_jax.model.embedder.embed_paths`` for ``paths``.

    ``batch`` holds (as produced by omniret_jax.data.pipeline): ``caption`` (list
    of str) and/or ``caption_ids`` / ``caption_len``, ``video_patches`` [B, P, F],
    ``video_grid_thw`` [B, 3], ``video_second_per_grid`` [B], ``image_patches`` [B, Q, F],
    ``image_grid_thw`` [B, 3] (one image per row, for I / TI; ``still_frames`` makes them from
    the videos), ``mel`` [B, n_mels, T], ``mel_len`` [B], ``fbank`` [B, T_b, 128], ``fbank_len``
    [B]; only the modalities the paths use are required (``fbank`` only with
    ``ecfg.audio_branch`` "whisper_beats"). The token layout of every path follows ``ecfg`` (see
    ``EmbedConfig``). ``row_offset``: the global row of this batch's first row, when it is one
    process's part of a global batch.
    """
    paths = check_paths(paths)
    need_v = any("V" in p for p in paths)
    need_i = any("I" in p for p in paths)
    need_a = any("A" in p for p in paths)
    need_t = any("T" in p for p in paths)
    if need_v and "video_patches" not in batch and "image_patches" in batch:
        raise ValueError(f"paths {[p for p in paths if 'V' in p]} take a video, but the batch holds an image "
                         "(batch['image_patches']) and no video: embed an image through the I / TI paths")
    for key, needed in (("video_patches", need_v), ("video_grid_thw", need_v), ("video_second_per_grid", need_v),
                        ("image_patches", need_i), ("image_grid_thw", need_i), ("mel", need_a), ("mel_len", need_a)):
        if needed and key not in batch:
            raise KeyError(f"paths {paths} need batch[{key!r}]")
    if need_t and "caption" not in batch and "caption_ids" not in batch:
        what = "the composed query (TI: image + text) needs its text" if "TI" in paths else f"paths {paths} need"
        raise KeyError(f"{what}: batch['caption'] or batch['caption_ids']")
    if ecfg.doubled_audio and need_a and "fbank" not in batch:
        raise KeyError("the WAVE audio path (EmbedConfig.audio_branch='whisper_beats') needs batch['fbank'] and "
                       "batch['fbank_len'] for BEATs")
    b = batch_rows(batch)
    meta = _layout_meta(batch, paths, tokens)
    meta[ROW_LAYOUT] = batch.get(ROW_LAYOUT)

    towers: dict = {}
    if need_v:
        patches = np.asarray(batch["video_patches"], np.float32)
        towers["video_patches"] = patches
        towers["video_layout"] = vision_layout([[tuple(g)] for g in meta["video_grid_thw"]], patches.shape[1],
                                               model_cfg.vision)
    if need_i:
        patches = np.asarray(batch["image_patches"], np.float32)
        towers["image_patches"] = patches
        towers["image_layout"] = vision_layout([[tuple(g)] for g in meta["image_grid_thw"]], patches.shape[1],
                                               model_cfg.vision)
    if need_a:
        towers["mel"], towers["mel_lens"] = np.asarray(batch["mel"], np.float32), meta["mel_len"]
        if ecfg.doubled_audio:
            fbank = np.asarray(batch["fbank"], np.float32)
            t_b = fbank.shape[1] // 16 * 16          # BEATs drops a partial last patch
            lens = np.minimum(np.asarray(batch["fbank_len"]).reshape(b), t_b)
            towers["fbank"] = fbank[:, :t_b]
            towers["fbank_padding"] = np.arange(t_b)[None, :] >= lens[:, None]
    layouts = _row_layouts(meta, paths, model_cfg, tokens, ecfg, _capacity(batch, model_cfg, ecfg),
                           row_offset=row_offset)
    return EmbedInputs(paths=layouts, **towers)


def still_frames(batch: dict, vision: VisionConfig) -> dict:
    """``batch`` plus ``image_patches`` / ``image_grid_thw``: each row's first video frame as an
    image, what the Qwen2.5-VL image processor makes of that frame at the video's size (its one
    frame repeated over the temporal patch). The image query of a video corpus (image -> video,
    composed -> video)."""
    patches = np.asarray(batch["video_patches"], np.float32)
    grids = np.asarray(batch["video_grid_thw"]).reshape(-1, 3)
    n = [int(h * w) for _, h, w in grids]          # the first temporal grid's patches come first
    c, tp = vision.in_channels, vision.temporal_patch_size
    first = patches[:, :max(n)].reshape(len(grids), max(n), c, tp, -1)[:, :, :, :1]
    image = np.broadcast_to(first, first.shape[:3] + (tp, first.shape[-1])).reshape(len(grids), max(n), -1).copy()
    for i, k in enumerate(n):
        image[i, k:] = 0
    return dict(batch, image_patches=image, image_grid_thw=still_grids(grids))


def still_grids(video_grid_thw) -> np.ndarray:
    """The [b, 3] grids of ``still_frames``' images: one temporal patch at each video's size."""
    grids = np.asarray(video_grid_thw).reshape(-1, 3)
    return np.column_stack([np.ones(len(grids), np.int64), grids[:, 1:]])


# ----------------------------------------------------------------------------- train step

def hard_negative_slot(step) -> str:
    """The slot the step's hard negative shuffles: text, audio, video, text, ... (period 3)."""
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return _SLOTS[step % 3]


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """A uniformly random permutation of range(n) with no fixed point, int32 [n].

    Rejection sampling of uniform permutations is exactly uniform over derangements and
    needs e ~ 2.72 draws on average.
    """
    if n < 2:
        raise ValueError(f"batch too small for a derangement: n={n} (need n >= 2)")
    identity = np.arange(n)
    while True:
        perm = rng.permutation(n)
        if not np.any(perm == identity):
            return perm.astype(np.int32)


def negative_rows(step: int, batch_size: int, seed: int, *, counter: int | None = None) -> np.ndarray:
    """[3, B] rows (text, video, audio) of each sample's hard-negative tuple in the global batch.

    ``counter`` picks the shuffled slot (``hard_negative_slot``; default ``step``), the
    derangement of that slot is drawn from (seed, step) alone (``step``: the micro-batch
    index), so every process draws the same one; the other slots stay the sample's own.
    """
    if batch_size < 2:
        raise ValueError(f"batch of {batch_size} is too small for a derangement (hard negatives need >= 2)")
    perm = derangement(np.random.default_rng([seed, step]), batch_size)
    rows = np.tile(np.arange(batch_size), (3, 1))
    rows[{"text": 0, "video": 1, "audio": 2}[hard_negative_slot(step if counter is None else counter)]] = perm
    return rows


TEXT_NEGATIVES = ("batch", "dataset")
_META_KEYS = ("caption_ids", "caption_len", "video_grid_thw", "video_second_per_grid", "mel_len")


def row_metadata(batch: dict, tokens: Tokens | None = None, *, text_negative: str = "batch") -> dict[str, np.ndarray]:
    """What another row's hard negative may take from each row, as fixed-shape arrays (so that
    processes can exchange it): caption ids and length, video grid and second_per_grid, mel
    length, and with ``text_negative="dataset"`` the pipeline's other-record caption."""
    out = {}
    for key in ("caption", "neg_caption") if text_negative == "dataset" else ("caption",):
        if f"{key}_ids" in batch:
            out[f"{key}_ids"] = np.asarray(batch[f"{key}_ids"], np.int32)
            out[f"{key}_len"] = np.asarray(batch[f"{key}_len"], np.int32).reshape(-1)
            continue
        if key not in batch:
            raise KeyError(f"text_negative={text_negative!r} needs batch[{key!r}] (the pipeline's text_negative"
                           "='dataset')")
        lists = caption_lists(batch, key, tokens)
        ids = np.zeros((len(lists), max(map(len, lists))), np.int32)
        for i, c in enumerate(lists):
            ids[i, :len(c)] = c
        out[f"{key}_ids"], out[f"{key}_len"] = ids, np.asarray(list(map(len, lists)), np.int32)
    b = len(out["caption_len"])
    out["video_grid_thw"] = np.asarray(batch["video_grid_thw"], np.int32).reshape(b, 3)
    out["video_second_per_grid"] = np.asarray(batch["video_second_per_grid"], np.float32).reshape(b)
    out["mel_len"] = np.asarray(batch["mel_len"], np.int32).reshape(b)
    return out


def _lists(ids: np.ndarray, lens: np.ndarray) -> list[list[int]]:
    return [ids[i, :n].tolist() for i, n in enumerate(lens)]


def build_inputs(batch: dict, step: int, model_cfg: BackboneConfig, tokens: Tokens, ecfg: EmbedConfig,
                 plan: ViewPlan, *, seed: int, counter: int | None = None, text_negative: str = "batch",
                 gather=None, row_offset: int = 0, neg_towers: bool = False) -> TrainInputs:
    """Host-side arrays of one train step from a pipeline batch (``batch['aug']`` when the
    plan has an augmented view); ``plan`` says which paths the losses read.

    ``step`` is the micro-batch index (seeds the derangement), ``counter`` the count the
    hard-negative slot cycles with (default ``step``: per micro-batch; the trainer passes the
    update index for the paper recipe). ``text_negative``: "batch" takes the text slot's
    caption from another row of the batch (the derangement), "dataset" from the pipeline's
    ``neg_caption`` (a random other record, the released code). With several processes
    ``batch`` is this process's rows, starting at global row ``row_offset``, and ``gather``
    maps a dict of per-row arrays to the same dict over the global batch (every process's rows
    in row order): the negative may combine this row's clip with a caption, video or audio of
    a row that lives on another process. ``neg_towers``: the hard-negative tuple as a view of
    its own (``TrainInputs.neg_view``: the swapped rows' media, for the towers to run on), as a
    chunked step needs; one process only (the media of another process's rows are not here).
    """
    if text_negative not in TEXT_NEGATIVES:
        raise ValueError(f"text_negative={text_negative!r}; expected one of {TEXT_NEGATIVES}")
    counter = step if counter is None else counter
    if neg_towers and gather is not None:
        raise ValueError("a chunked (gradient-cached) step runs in one process: the hard-negative view takes its "
                         "swapped rows' media from this process's batch")
    out = dict(anchor=prepare(batch, plan.anchor, model_cfg, tokens, ecfg, row_offset=row_offset))
    if plan.aug:
        if "aug" not in batch:
            raise KeyError("L_T needs the augmented view: set the pipeline's augment option (batch['aug'])")
        out["aug"] = prepare(batch["aug"], plan.aug, model_cfg, tokens, ecfg, row_offset=row_offset)
    if plan.query:
        if "query" not in batch:
            raise KeyError(f"paths {list(plan.query)} embed each record's reference clip (a text + video query): "
                           "set the pipeline's query_clip option (batch['query'])")
        out["query"] = prepare(batch["query"], plan.query, model_cfg, tokens, ecfg, row_offset=row_offset)
    if plan.negative:
        b = batch_rows(batch)
        if gather is not None and "caption_ids" not in batch:
            raise KeyError("gathering the batch's row metadata needs the pipeline's fixed-width caption_ids")
        meta = row_metadata(batch, tokens, text_negative=text_negative)
        full = meta if gather is None else gather(meta)
        n = len(full["caption_len"])
        if not 0 <= row_offset <= n - b:
            raise ValueError(f"rows {row_offset}..{row_offset + b - 1} are not in the global batch of {n}")
        rows = negative_rows(step, n, seed, counter=counter)
        local = slice(row_offset, row_offset + b)
        t, v, a = (r[local] for r in rows)
        dataset = text_negative == "dataset" and hard_negative_slot(counter) == "text"
        if dataset:
            captions = _lists(full["neg_caption_ids"][local], full["neg_caption_len"][local])
            rows[0] = np.arange(n)  # no batch row supplies the caption
        else:
            captions = _lists(full["caption_ids"][t], full["caption_len"][t])
        # The strings too where this process has them (one process): a prefix is encoded with them.
        key, pick = ("neg_caption", range(b)) if dataset else ("caption", t)
        texts = [batch[key][j] for j in pick] if gather is None and key in batch else None
        swapped = {"captions": captions, "caption_text": texts, "video_grid_thw": full["video_grid_thw"][v],
                   "video_second_per_grid": full["video_second_per_grid"][v], "mel_len": full["mel_len"][a]}
        out["neg"] = _row_layouts(swapped, ("TVA",), model_cfg, tokens, ecfg, _capacity(batch, model_cfg, ecfg),
                                  row_offset=row_offset)["TVA"]
        out["neg_rows"] = rows.T[local].astype(np.int32)
        if neg_towers:
            media = {k: np.asarray(batch[k])[v] for k in ("video_patches", "video_grid_thw", "video_second_per_grid")}
            media |= {k: np.asarray(batch[k])[a] for k in ("mel", "mel_len", "fbank", "fbank_len") if k in batch}
            ids = np.zeros((b, max(map(len, captions))), np.int32)
            for i, c in enumerate(captions):
                ids[i, :len(c)] = c
            media |= {"caption_ids": ids, "caption_len": np.asarray(list(map(len, captions)))}
            if texts is not None:
                media["caption"] = texts
            out["neg_view"] = prepare(media, ("TVA",), model_cfg, tokens, ecfg)
            out["neg"] = None
    return TrainInputs(**out)


def chunked(inputs: TrainInputs, chunks: int) -> TrainInputs:
    """Every leaf [C, ...] -> [chunks, C / chunks, ...]: chunk c holds examples c * K .. c * K + K - 1,
    the layout of ``step.cached_train_step`` (shard its inputs on axis 1)."""
    others = [v.paths for v in (inputs.aug, inputs.query) if v is not None]
    for name, p in functools.reduce(operator.or_, others, dict(inputs.anchor.paths)).items():
        if p.input_ids.shape[0] != len(p.pool_index):
            raise ValueError(f"path {name} is packed ({p.input_ids.shape[0]} rows for {len(p.pool_index)} "
                             "sequences): a chunked step needs unpacked paths (embed.pack = ())")
    if inputs.neg is not None and inputs.neg_view is None:
        raise ValueError("a chunked step needs the hard-negative tuple as its own view: build_inputs(neg_towers=True)")
    rows = len(inputs.anchor.paths[next(iter(inputs.anchor.paths))].pool_index)
    if chunks < 1 or rows % chunks:
        raise ValueError(f"{rows} examples do not split into {chunks} equal chunks")
    k = rows // chunks

    first_row = np.arange(rows) // k * k   # the first row of each row's chunk

    def rebase(p: PathInputs, capacity: dict[int, int]) -> PathInputs:
        """pool_index and the merge indices are flat over a pass's rows (and its towers' rows):
        make them flat over each chunk's own K rows."""
        index = p.index.copy()
        for kind, cap in capacity.items():
            hit = p.source == kind
            index[hit] -= np.broadcast_to(first_row[:, None] * cap, index.shape)[hit]
        pool = p.pool_index - first_row * p.input_ids.shape[1]
        return dataclasses.replace(p, index=index.astype(np.int32), pool_index=pool.astype(np.int32))

    def view(v: EmbedInputs | None) -> EmbedInputs | None:
        if v is None:
            return None
        capacity = {}
        if v.video_layout is not None:
            capacity[VIDEO] = v.video_layout.window_index.shape[1]           # merge units per row
        if v.image_layout is not None:
            capacity[IMAGE] = v.image_layout.window_index.shape[1]
        if v.mel is not None:
            capacity[AUDIO] = v.mel.shape[-1] // 4 * (2 if v.fbank is not None else 1)  # WAVE doubles
        return dataclasses.replace(v, paths={n: rebase(p, capacity) for n, p in v.paths.items()})

    local = dataclasses.replace(inputs, anchor=view(inputs.anchor), aug=view(inputs.aug), query=view(inputs.query),
                                neg_view=view(inputs.neg_view))
    # The reshaped tree is rebuilt by unflattening, which does not re-run the [C, ...] shape contracts.
    return jax.tree.map(lambda x: np.asarray(x).reshape(chunks, k, *np.shape(x)[1:]), local)
