"""Assembling a batch's device inputs on the host: token layouts of every path, merge indices, negatives.

From one pipeline batch (``omniret_jax.data.pipeline``) this builds the fixed-shape arrays
of ``omniret_jax.inputs``: for each embedding path the padded token ids, M-RoPE position ids
(``layout.rope_index``), merge indices (which tower output each placeholder takes) and the
pooled index; the vision tower's ``VisionLayout``; and for a train step the augmented view
and the hard-negative tuple, whose rows are drawn here with NumPy (a derangement of the
global batch, one slot per step: text, audio, video, cycling).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence

import numpy as np

from omniret_jax.config import PATHS, EmbedConfig, ThinkerConfig, ViewPlan, check_paths
from omniret_jax.data.layout import (Audio, Text, TurnLayout, Video, audio_output_lengths, batch_media, expand_turn,
                                     pad_batch, rope_index)
from omniret_jax.data.tokens import Tokens
from omniret_jax.data.vision_layout import vision_layout
from omniret_jax.inputs import AUDIO, IMAGE, TEXT, VIDEO, EmbedInputs, PathInputs, TrainInputs

# Keys whose first axis (or list length) is the batch, in the order they are trusted.
_ROW_KEYS = ("caption", "video_grid_thw", "mel_len", "video_patches", "mel", "fbank")
_SLOTS = ("text", "audio", "video")


def batch_rows(batch: dict) -> int:
    """Rows of a pipeline batch, read from its declared per-row keys (never from dict order,
    which grain's worker processes change); every such key must agree."""
    sizes = {k: len(batch[k]) for k in _ROW_KEYS if k in batch}
    if not sizes:
        raise KeyError(f"batch has none of the per-row keys {_ROW_KEYS}; got keys {sorted(batch)}")
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch keys disagree on the number of rows: {sizes}")
    return next(iter(sizes.values()))


def merge_indices(input_ids: np.ndarray, cfg: ThinkerConfig, n_valid: Mapping[int, Sequence | np.ndarray],
                  capacity: Mapping[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: (source [B, S] in {TEXT, IMAGE, VIDEO, AUDIO}, index [B, S]).

    A modality's tower output is [R, capacity, D] (R rows, each padded) with
    ``n_valid[kind][r]`` real features in row r. Like ``masked_scatter``, the
    placeholders of that modality, read row-major over the batch, take the real
    features in order; ``index`` points into the flattened [R * capacity] array.
    """
    ids = np.asarray(input_ids)
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
        flat = np.concatenate([r * capacity[kind] + np.arange(n) for r, n in enumerate(counts)])
        source[hit] = kind
        index[hit] = flat
    return source, index


def path_length(path: str, ecfg: EmbedConfig, capacity: Mapping[int, int], fixed: Mapping[str, int]) -> int:
    """Padded length of a path's rows: the longest row the batch's fixed shapes allow, exactly.

    Media blocks take their tower capacity (video tokens of P patches, audio tokens of T mel
    frames, doubled for WAVE) plus their start/end tokens; text takes the caption budget
    (``text_len - 1`` tokens) on the paths with T; ``fixed[path]`` counts the rest (turn template,
    prefix, the fixed prompt of V / A / AV: ``fixed_ids``). Rounded up to
    ``ecfg.length_multiple``. Nothing depends on the batch's content, so every batch of a run has
    the same shapes and the step compiles once.
    """
    n = fixed[path]
    if "V" in path:
        n += 2 + capacity[VIDEO]
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
    prompt on V / A / AV."""
    prompts = {"V": ecfg.video_prompt, "A": ecfg.audio_prompt, "AV": ecfg.av_prompt}
    text = {p: tokens.encode_text(prefix(p, ecfg) + ("" if "T" in p else prompts[p])) for p in PATHS}
    return tokens.encode_text(ecfg.turn_start), tokens.encode_text(ecfg.turn_end), text


def turn(media: list, text: list[int], start: list[int], end: list[int], ecfg: EmbedConfig,
         cfg: ThinkerConfig) -> TurnLayout:
    """One path's sequence: ``start``, then the media blocks and ``text`` in the configured
    order, then ``end``."""
    if ecfg.text_first:
        return expand_turn([Text(tuple(start + text)), *media], end, cfg, wave_doubled_audio=ecfg.doubled_audio)
    return expand_turn([Text(tuple(start)), *media], text + end, cfg, wave_doubled_audio=ecfg.doubled_audio)


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


def pack_rows(p: PathInputs, per_row: int, row_len: int, pad_id: int) -> PathInputs:
    """Pack consecutive sequences of an unpacked pass into ``ceil(B / per_row)`` rows of ``row_len``
    tokens, when they fit (else the pass stays unpacked: a second program, compiled once).

    Each sequence keeps its tokens, merge indices and positions (which restart per sequence);
    ``attention_mask`` becomes the segment id within the row and ``pool_index`` moves with the
    sequence. Row-major order keeps the sequences in batch order, as merge indices expect.
    """
    b, length = p.input_ids.shape
    if per_row <= 1:
        return p
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
        pool[i] = r * row_len + start + int(p.pool_index[i]) - i * length
    return PathInputs(ids, mask, pos, source, index, pool)


def prepare(batch: dict, paths: Sequence[str], model_cfg, tokens: Tokens, ecfg: EmbedConfig) -> EmbedInputs:
    """Host-side inputs of ``omniret_jax.model.embedder.embed_paths`` for ``paths``.

    ``batch`` holds (as produced by omniret_jax.data.pipeline): ``caption`` (list
    of str), ``video_patches`` [B, P, F], ``video_grid_thw`` [B, 3],
    ``video_second_per_grid`` [B], ``mel`` [B, n_mels, T], ``mel_len`` [B],
    ``fbank`` [B, T_b, 128], ``fbank_len`` [B]; only the modalities the paths use
    are required (``fbank`` only with ``ecfg.audio_branch`` "whisper_beats"). The token layout
    of every path follows ``ecfg`` (see ``EmbedConfig``).
    """
    paths = check_paths(paths)
    need_v = any("V" in p for p in paths)
    need_a = any("A" in p for p in paths)
    need_t = any("T" in p for p in paths)
    doubled = ecfg.doubled_audio
    for key, needed in (("video_patches", need_v), ("video_grid_thw", need_v), ("video_second_per_grid", need_v),
                        ("mel", need_a), ("mel_len", need_a), ("caption", need_t)):
        if needed and key not in batch:
            raise KeyError(f"paths {paths} need batch[{key!r}]")
    if doubled and need_a and "fbank" not in batch:
        raise KeyError("the WAVE audio path (EmbedConfig.audio_branch='whisper_beats') needs batch['fbank'] and "
                       "batch['fbank_len'] for BEATs")
    b = batch_rows(batch)
    captions: dict[str, list[list[int]]] = {}   # prefix -> each sample's prefix + caption, encoded together
    if need_t:
        for i, c in enumerate(batch["caption"]):
            if not (isinstance(c, str) and tokens.encode(c)):
                raise ValueError(f"sample {i}: empty caption, but paths {paths} embed text")
        for pre in {prefix(p, ecfg) for p in paths if "T" in p}:
            captions[pre] = [list(tokens.encode(pre + c)) for c in batch["caption"]]

    towers: dict = {}
    n_valid, capacity = {}, {}
    if need_v:
        patches = np.asarray(batch["video_patches"], np.float32)
        grids = np.asarray(batch["video_grid_thw"]).reshape(b, 3)
        towers["video_patches"] = patches
        towers["video_layout"] = vision_layout([[tuple(g)] for g in grids], patches.shape[1], model_cfg.vision)
        unit = model_cfg.vision.spatial_merge_size ** 2
        n_valid[VIDEO] = [int(np.prod(g)) // unit for g in grids]
        capacity[VIDEO] = patches.shape[1] // unit
    if need_a:
        mel = np.asarray(batch["mel"], np.float32)
        mel_lens = np.asarray(batch["mel_len"], np.int32).reshape(b)
        towers["mel"], towers["mel_lens"] = mel, mel_lens
        n_w = audio_output_lengths(mel_lens)
        n_valid[AUDIO] = list(2 * n_w) if doubled else list(n_w)
        capacity[AUDIO] = mel.shape[-1] // 4 * (2 if doubled else 1)
        if doubled:
            fbank = np.asarray(batch["fbank"], np.float32)
            t_b = fbank.shape[1] // 16 * 16          # BEATs drops a partial last patch
            lens = np.minimum(np.asarray(batch["fbank_len"]).reshape(b), t_b)
            towers["fbank"] = fbank[:, :t_b]
            towers["fbank_padding"] = np.arange(t_b)[None, :] >= lens[:, None]

    start, end, texts = fixed_ids(ecfg, tokens)
    fixed = {p: len(start) + len(end) + len(texts[p]) for p in PATHS}
    layouts = {}
    for path in paths:
        rows = []
        for i in range(b):
            media = []
            if "V" in path:
                video = Video(tuple(int(x) for x in batch["video_grid_thw"][i]),
                              float(batch["video_second_per_grid"][i]),
                              int(batch["mel_len"][i]) if ("A" in path and ecfg.audio_in_video) else None)
                media.append(video)
            if "A" in path and not ("V" in path and ecfg.audio_in_video):
                media.append(Audio(int(batch["mel_len"][i])))
            text = captions[prefix(path, ecfg)][i] if "T" in path else texts[path]
            rows.append(turn(media, text, start, end, ecfg, model_cfg))
        length = path_length(path, ecfg, capacity, fixed)
        padded = pad_batch([r.input_ids for r in rows], length, tokens.pad_id, side="right",
                           names=[f"sample {i} ({path} path)" for i in range(b)])
        pos, _ = rope_index(padded.input_ids, padded.attention_mask, model_cfg, **batch_media(rows))
        kinds = {k: v for k, v in n_valid.items() if (k == VIDEO and "V" in path) or (k == AUDIO and "A" in path)}
        source, index = merge_indices(padded.input_ids, model_cfg, kinds, capacity)
        unpacked = PathInputs(padded.input_ids, padded.attention_mask, np.swapaxes(pos, 0, 1), source, index,
                              np.arange(b, dtype=np.int32) * length + padded.last_index)
        per_row, row_len = ecfg.packing(path)
        layouts[path] = pack_rows(unpacked, per_row, row_len or per_row * length, tokens.pad_id)
        check_pooling(layouts[path], path, ecfg)
    return EmbedInputs(paths=layouts, **towers)


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


def negative_rows(step: int, batch_size: int, seed: int) -> np.ndarray:
    """[3, B] rows (text, video, audio) of each sample's hard-negative tuple in the global batch.

    The step's slot is shuffled by a derangement drawn from (seed, step) alone, so every
    process draws the same one; the other slots stay the sample's own.
    """
    if batch_size < 2:
        raise ValueError(f"batch of {batch_size} is too small for a derangement (hard negatives need >= 2)")
    perm = derangement(np.random.default_rng([seed, step]), batch_size)
    rows = np.tile(np.arange(batch_size), (3, 1))
    rows[{"text": 0, "video": 1, "audio": 2}[hard_negative_slot(step)]] = perm
    return rows


def build_inputs(batch: dict, step: int, model_cfg: ThinkerConfig, tokens: Tokens, ecfg: EmbedConfig,
                 plan: ViewPlan, *, seed: int) -> TrainInputs:
    """Host-side arrays of one train step from a pipeline batch (``batch['aug']`` when the
    plan has an augmented view); ``plan`` says which paths the losses read."""
    anchor = prepare(batch, plan.anchor, model_cfg, tokens, ecfg)
    aug = neg = neg_rows = None
    if plan.aug:
        if "aug" not in batch:
            raise KeyError("L_T needs the augmented view: set the pipeline's augment option (batch['aug'])")
        aug = prepare(batch["aug"], plan.aug, model_cfg, tokens, ecfg)
    if plan.negative:
        rows = negative_rows(step, batch_rows(batch), seed)
        t, v, a = rows
        swapped = dict(batch)
        swapped["caption"] = [batch["caption"][i] for i in t]
        for key in ("video_patches", "video_grid_thw", "video_second_per_grid"):
            swapped[key] = np.asarray(batch[key])[v]
        for key in ("mel", "mel_len", "fbank", "fbank_len"):
            if key in batch:  # fbank: only the WAVE audio branch reads it
                swapped[key] = np.asarray(batch[key])[a]
        neg = prepare(swapped, ("TVA",), model_cfg, tokens, ecfg).paths["TVA"]
        neg_rows = rows.T.astype(np.int32)
    return TrainInputs(anchor=anchor, aug=aug, neg=neg, neg_rows=neg_rows)
