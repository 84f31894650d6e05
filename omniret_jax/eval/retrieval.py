"""12-direction retrieval evaluation from embeddings (method.md, "Evaluation protocol").

Directions: single T->V, V->T, T->A, A->T, V->A, A->V; dual T->AV, AV->T, A->TV, TV->A,
V->AT, AT->V, where a dual side is one joint embedding path (AV; TV; AT = the "TA" path).

Scores are cosines. Rows are L2-normalised here (with a warning when the input was not
already unit norm: the embedder is supposed to normalise), then scored *exactly*: each
normalised row is rounded to the fixed-point grid 2^-26 (error <= 2^-27 ~ 7.5e-9 per
component, about float32 resolution for typical components; scores within ~1e-7 of a float64
cosine) and the dot products of these integer-valued
vectors are computed in float64, where every product and partial sum is an integer below
2^53 (|sum| <= 2^52 (1 + tiny) for unit rows), hence exact in any summation order. Why: BLAS
rounds the same dot product differently depending on the matrix shape and the position in
the tile, so with plain float32 matmuls a blocked computation differs from the one-matrix
computation, and two identical embeddings (duplicate captions, duplicate clips) can score a
different last bit, which silently breaks "ties are resolved in favour of the gold item".
With exact scores, ranks do not depend on block sizes, devices or BLAS.

Large galleries are scored in query blocks x gallery blocks: the gold score of every query is
computed first (exact, so it equals the matrix entry), then each block adds its count of
strictly higher scores and merges its candidates into a running top-k (ties by lower gallery
index). Inputs may be np.memmap arrays (see store.load_embeddings(mmap=True)); only blocks are
read.

Multi-caption benchmarks: text-bearing paths (T, TV, TA) may hold one row per caption
(`caption_clip[r]` = clip row of caption row r); V, A, AV hold one row per clip.
    mode "first": the first caption row of each clip is used; every direction is diagonal.
    mode "all":   every caption is a query whose gold is its clip; a clip query (e.g. V->T) is
                  ranked against all captions and its rank is the best rank over its captions.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping, Sequence

import numpy as np

from omniret_jax.eval import metrics as M
from omniret_jax.eval.store import CAPTION_LEVEL_PATHS, PATH_NAMES, EmbeddingSet

SINGLE_DIRECTIONS = ("T->V", "V->T", "T->A", "A->T", "V->A", "A->V")
DUAL_DIRECTIONS = ("T->AV", "AV->T", "A->TV", "TV->A", "V->AT", "AT->V")
DIRECTIONS = SINGLE_DIRECTIONS + DUAL_DIRECTIONS
# GVE's visual queries against videos: an image, and the composed query text + image (path TI).
IMAGE_DIRECTIONS = ("I->V", "TI->V")
# The composed query text + reference video against videos (tv2v: its TV embeds the record's
# query_video, eval.tasks), as the per-task evaluation scores it.
KNOWN_DIRECTIONS = DIRECTIONS + IMAGE_DIRECTIONS + ("TV->V",)
# Direction side name -> embedding path name ("AT" is the joint text+audio path "TA").
_SIDE_TO_PATH = {"T": "T", "V": "V", "A": "A", "AV": "AV", "TV": "TV", "AT": "TA", "I": "I", "TI": "TI"}
AVERAGES = {"AVG single": SINGLE_DIRECTIONS, "AVG dual": DUAL_DIRECTIONS, "AVG all": DIRECTIONS}
MODES = ("first", "all")

_GRID_BITS = 26
_GRID = float(2**_GRID_BITS)
_UNSCALE = float(2.0 ** (-2 * _GRID_BITS))
_NORM_TOLERANCE = 1e-3
DEFAULT_QUERY_BLOCK = 1024
DEFAULT_GALLERY_BLOCK = 8192


def direction_paths(direction: str) -> tuple[str, str]:
    """(query path, gallery path) of a direction name; ValueError listing the 12 otherwise."""
    if direction not in KNOWN_DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; known: {', '.join(KNOWN_DIRECTIONS)}")
    q, g = direction.split("->")
    return _SIDE_TO_PATH[q], _SIDE_TO_PATH[g]


class _NormWarner:
    """Warns once per array that was not L2-normalised (the embedder should normalise)."""

    def __init__(self, name: str):
        self.name, self.warned = name, False

    def check(self, norms: np.ndarray) -> None:
        if not self.warned and norms.size and np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
            self.warned = True
            warnings.warn(f"{self.name}: rows are not L2-normalised (norms in "
                          f"[{norms.min():.4g}, {norms.max():.4g}]); normalising for cosine",
                          stacklevel=4)


def fixed_point_rows(x, warner: _NormWarner | None = None) -> np.ndarray:
    """Rows L2-normalised in float64 and rounded to integers on the 2^-26 grid (as float64).

    Every step is elementwise or a per-row reduction, so a row's result does not depend on
    which other rows share the block."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [rows, dim], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"embeddings contain NaN/inf (first bad row "
                         f"{int(np.argwhere(~np.isfinite(x))[0, 0])} of this block)")
    a = x.astype(np.float64)
    norms = np.sqrt((a * a).sum(axis=1))
    if (norms == 0).any():
        raise ValueError(f"embedding row {int(np.argmax(norms == 0))} of this block is all zeros; "
                         f"cosine is undefined")
    if warner is not None:
        warner.check(norms)
    a *= (_GRID / norms)[:, None]
    return np.rint(a, out=a)


def exact_scores(q_fixed: np.ndarray, g_fixed: np.ndarray) -> np.ndarray:
    """Cosine matrix of fixed-point rows; exact (independent of shape and summation order)."""
    return (q_fixed @ g_fixed.T) * _UNSCALE


def cosine_scores(queries, gallery) -> np.ndarray:
    """The one-matrix score computation: [Q, G] exact cosines (float64)."""
    return exact_scores(fixed_point_rows(queries), fixed_point_rows(gallery))


@dataclasses.dataclass(frozen=True)
class RankResult:
    """1-based ranks [Q]; top-k gallery indices and scores [Q, k] (k = 0 when not requested)."""

    ranks: np.ndarray
    topk_index: np.ndarray
    topk_score: np.ndarray


def _block_topk(scores: np.ndarray, offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each row of a block, ordered by (score desc, index asc), exact under ties."""
    n = scores.shape[1]
    if n <= k:
        idx = np.broadcast_to(np.arange(n), scores.shape)
    else:
        # k-th largest value per row; everything above it is in, ties at it by lower index.
        kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1:k]
        above = scores > kth
        room = k - above.sum(axis=1, keepdims=True)
        ties = scores == kth
        take = above | (ties & (np.cumsum(ties, axis=1) <= room))
        idx = np.nonzero(take)[1].reshape(scores.shape[0], k)
    vals = np.take_along_axis(scores, idx, axis=1)
    return vals, idx + offset


def _merge_topk(vals: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((idx, -vals), axis=1)[:, :k]
    return np.take_along_axis(vals, order, axis=1), np.take_along_axis(idx, order, axis=1)


def rank_queries(queries, gallery, gold=None, *, top_k: int = 0,
                 query_block: int | None = None, gallery_block: int | None = None,
                 name: str = "embeddings") -> RankResult:
    """Ranks (and optionally top-k) of `queries` [Q, D] against `gallery` [G, D] by cosine.

    gold: see metrics.gold_pairs. Blocks of `query_block` x `gallery_block` rows are scored at
    a time (None: the whole side at once); the result does not depend on the block sizes.
    Arrays (np.memmap included) are read one block at a time.
    """
    queries, gallery = np.asarray(queries), np.asarray(gallery)
    if queries.ndim != 2 or gallery.ndim != 2:
        raise ValueError(f"{name}: queries and gallery must be [rows, dim], got shapes "
                         f"{queries.shape} and {gallery.shape}")
    (nq, dq), (ng, dg) = queries.shape, gallery.shape
    if nq == 0 or ng == 0:
        raise ValueError(f"{name}: empty queries ({nq}) or gallery ({ng})")
    if dq != dg:
        raise ValueError(f"{name}: query dim {dq} != gallery dim {dg}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    qb = nq if query_block is None else int(query_block)
    gb = ng if gallery_block is None else int(gallery_block)
    if qb < 1 or gb < 1:
        raise ValueError(f"block sizes must be >= 1, got query_block={qb}, gallery_block={gb}")
    k = min(top_k, ng)
    index, starts = M.gold_pairs(gold, nq, ng)
    owner = M.query_of_pairs(starts, len(index))
    qwarn, gwarn = _NormWarner(f"{name} (queries)"), _NormWarner(f"{name} (gallery)")

    # A gallery that fits in one block is converted once, not once per query block.
    whole = fixed_point_rows(gallery, gwarn) if gb >= ng else None
    ranks = np.empty(nq, dtype=np.int64)
    topk_index = np.empty((nq, k), dtype=np.int64)
    topk_score = np.empty((nq, k), dtype=np.float64)
    for q0 in range(0, nq, qb):
        q1 = min(q0 + qb, nq)
        qf = fixed_point_rows(queries[q0:q1], qwarn)
        p0, p1 = starts[q0], (starts[q1] if q1 < nq else len(index))
        # Gold scores first; exact, so a row-wise dot equals the matrix entry bit for bit.
        pair_scores = np.empty(p1 - p0)
        for c0 in range(p0, p1, gb):
            c1 = min(c0 + gb, p1)
            rows = (whole[index[c0:c1]] if whole is not None
                    else fixed_point_rows(_take_rows(gallery, index[c0:c1]), gwarn))
            pair_scores[c0 - p0:c1 - p0] = np.einsum("ij,ij->i", qf[owner[c0:c1] - q0], rows)
        best = M.best_gold_scores(pair_scores * _UNSCALE, starts[q0:q1] - p0)
        higher = np.zeros(q1 - q0, dtype=np.int64)
        run_v = np.empty((q1 - q0, 0))
        run_i = np.empty((q1 - q0, 0), dtype=np.int64)
        for g0 in range(0, ng, gb):
            g1 = min(g0 + gb, ng)
            gf = whole if whole is not None else fixed_point_rows(gallery[g0:g1], gwarn)
            s = exact_scores(qf, gf)
            higher += (s > best[:, None]).sum(axis=1)
            if k:
                v, i = _block_topk(s, g0, k)
                run_v, run_i = _merge_topk(np.concatenate([run_v, v], 1),
                                           np.concatenate([run_i, i], 1), k)
        ranks[q0:q1] = higher + 1
        topk_index[q0:q1], topk_score[q0:q1] = run_i, run_v
    return RankResult(ranks, topk_index, topk_score)


def _take_rows(x, rows: np.ndarray) -> np.ndarray:
    """x[rows] in ascending row order (sequential reads when x is a memmap)."""
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), x.shape[1]), dtype=x.dtype)
    out[order] = x[rows[order]]
    return out


@dataclasses.dataclass(frozen=True)
class _Side:
    array: np.ndarray
    ids: Sequence[str]


def _as_embedding_set(embeddings, caption_clip) -> EmbeddingSet:
    """EmbeddingSet as is; a plain mapping gets ids "0".."N-1" (captions "<clip>#<k>")."""
    if isinstance(embeddings, EmbeddingSet):
        if caption_clip is not None:
            raise ValueError("caption_clip comes from the EmbeddingSet's caption_ids; "
                             "do not pass it as well")
        return embeddings
    if not isinstance(embeddings, Mapping) or not embeddings:
        raise ValueError("embeddings must be an EmbeddingSet or a non-empty {path: [rows, D]} "
                         "mapping")
    if caption_clip is None:
        n = len(next(iter(embeddings.values())))
        return EmbeddingSet(dict(embeddings), ids=tuple(map(str, range(n))))
    cc = np.asarray(caption_clip)
    if cc.ndim != 1 or cc.size == 0 or not np.issubdtype(cc.dtype, np.integer) or cc.min() < 0:
        raise ValueError(f"caption_clip must be a non-empty 1-D array of clip rows >= 0, got "
                         f"dtype {cc.dtype}, shape {cc.shape}")
    clip_paths = [p for p in embeddings if p not in CAPTION_LEVEL_PATHS]
    n_clips = len(embeddings[clip_paths[0]]) if clip_paths else int(cc.max()) + 1
    seen: dict[int, int] = {}
    caption_ids = []
    for c in cc.tolist():
        caption_ids.append(f"{c}#{seen.get(c, 0)}")
        seen[c] = seen.get(c, 0) + 1
    return EmbeddingSet(dict(embeddings), ids=tuple(map(str, range(n_clips))),
                        caption_ids=tuple(caption_ids))


def _direction_problem(emb: EmbeddingSet, direction: str, mode: str):
    """(query side, gallery side, gold) of one direction under the caption mode."""
    qp, gp = direction_paths(direction)
    missing = [p for p in (qp, gp) if p not in emb.paths]
    if missing:
        raise ValueError(f"direction {direction} needs path(s) {missing}; the embeddings have "
                         f"{sorted(emb.paths)}")
    caption_level = emb.caption_ids is not None
    if mode == "all" and not caption_level:
        raise ValueError("mode 'all' needs one text embedding per caption (EmbeddingSet with "
                         "caption_ids, or caption_clip); these embeddings have one per clip")
    clip_of = emb.caption_clip
    first = emb.first_caption_rows

    def side(path: str) -> tuple[_Side, bool]:
        x = emb.paths[path]
        if caption_level and path in CAPTION_LEVEL_PATHS:
            if mode == "first":
                return _Side(_take_rows(x, first), emb.ids), False
            return _Side(x, emb.caption_ids), True
        return _Side(x, emb.ids), False

    (qs, q_per_caption), (gs, g_per_caption) = side(qp), side(gp)
    if q_per_caption:
        gold = clip_of.astype(np.int64)
    elif g_per_caption:
        order = np.argsort(clip_of, kind="stable")
        gold = np.split(order, np.cumsum(np.bincount(clip_of, minlength=len(emb.ids)))[:-1])
    else:
        gold = None
    return qs, gs, gold


def evaluate(embeddings, directions: Sequence[str] | None = None, *, mode: str = "first",
             caption_clip=None, top_k: int = 0, query_block: int | None = DEFAULT_QUERY_BLOCK,
             gallery_block: int | None = DEFAULT_GALLERY_BLOCK) -> dict:
    """Per-direction metrics and R@1 averages as a JSON-able dict.

    embeddings: a store.EmbeddingSet, or a {path: [rows, D]} mapping (row i of every path is
    item i; with `caption_clip`, text-bearing paths have one row per caption instead).
    directions: None = every one of the 12 whose two paths are present; names otherwise.
    Averages ("AVG single", "AVG dual", "AVG all", of R@1) are reported only when every
    direction of the group was evaluated, so a partial mean never poses as the paper's number.
    top_k > 0 adds each query's top-k gallery ids and scores.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    emb = _as_embedding_set(embeddings, caption_clip)
    if directions is None:
        directions = [d for d in DIRECTIONS if set(direction_paths(d)) <= set(emb.paths)]
        if not directions:
            raise ValueError(f"no direction can be evaluated with paths {sorted(emb.paths)}; "
                             f"known paths: {PATH_NAMES}")
    else:
        directions = list(directions)
        for d in directions:
            direction_paths(d)
        if len(set(directions)) != len(directions):
            raise ValueError(f"directions listed twice: {directions}")
    per_direction = {}
    for d in directions:
        qs, gs, gold = _direction_problem(emb, d, mode)
        res = rank_queries(qs.array, gs.array, gold, top_k=top_k, query_block=query_block,
                           gallery_block=gallery_block, name=d)
        entry = M.metrics_from_ranks(res.ranks)
        entry.update(queries=int(len(res.ranks)), gallery=int(len(gs.ids)))
        if top_k:
            entry["top_k"] = {
                "query_ids": list(qs.ids),
                "gallery_ids": [[gs.ids[j] for j in row] for row in res.topk_index.tolist()],
                "scores": res.topk_score.tolist(),
            }
        per_direction[d] = entry
    averages = {name: float(np.mean([per_direction[d]["R@1"] for d in group]))
                for name, group in AVERAGES.items() if all(d in per_direction for d in group)}
    return {"mode": mode, "units": "R@k, NDCG@10, MRR in percent; MedR in ranks; AVG = mean R@1",
            "directions": per_direction, "averages": averages}


def _fmt(value: float) -> str:
    return f"{value:.2f}"


def markdown_table(result: dict) -> str:
    """A Markdown table of an `evaluate` result: one row per direction, then the averages."""
    head = "| Direction | " + " | ".join(M.METRIC_NAMES) + " | queries | gallery |"
    lines = [head, "|" + "---|" * (len(M.METRIC_NAMES) + 3)]
    for d, m in result["directions"].items():
        cells = [_fmt(m[k]) for k in M.METRIC_NAMES] + [str(m["queries"]), str(m["gallery"])]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    for name, value in result["averages"].items():
        cells = [_fmt(value)] + [""] * (len(M.METRIC_NAMES) + 1)
        lines.append(f"| {name} (R@1) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
