"""Retrieval metrics from ranks, and ranks from a score matrix.

Rank convention (method.md): the rank of a query is 1 + the number of gallery items that score
*strictly* higher than its gold item, so ties are resolved in favour of the gold item. With
several gold items (a clip with several captions) the best-scoring gold item counts, i.e. the
rank is the best rank over the gold items.

Gold is given per query as
    None                        diagonal: query i's gold is gallery item i (needs Q == G)
    int array [Q]               one gold gallery index per query
    sequence of int sequences   a non-empty set of gold gallery indices per query

Every rate (R@k, NDCG@10, MRR) is reported in percent (0-100), as in the paper's tables;
MedR is the median rank (np.median, so it can end in .5 for an even number of queries).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)
NDCG_K = 10
METRIC_NAMES = ("R@1", "R@5", "R@10", "NDCG@10", "MRR", "MedR")


def gold_pairs(gold, num_queries: int, gallery_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Gold relevance as flat (gallery index, first-slot offset) arrays, CSR style.

    Returns `index` (int64 [P]) and `starts` (int64 [Q]): query q's gold items are
    index[starts[q]:starts[q+1]] (to the end for the last query). Raises ValueError for an empty
    gold set, an index outside [0, gallery_size) or a length that does not match the queries.
    """
    if gold is None:
        if num_queries != gallery_size:
            raise ValueError(f"diagonal gold needs as many queries as gallery items, got "
                             f"{num_queries} queries and {gallery_size} gallery items; "
                             f"pass the gold gallery index of every query")
        ar = np.arange(num_queries, dtype=np.int64)
        return ar, ar.copy()
    if isinstance(gold, np.ndarray) and gold.ndim == 1 and gold.dtype != object:
        if not np.issubdtype(gold.dtype, np.integer):
            raise ValueError(f"gold indices must be integers, got dtype {gold.dtype}")
        index = gold.astype(np.int64)
        starts = np.arange(len(index), dtype=np.int64)
    elif isinstance(gold, Sequence) or isinstance(gold, np.ndarray):
        sets = [np.atleast_1d(np.asarray(g)) for g in gold]
        empty = [q for q, g in enumerate(sets) if g.size == 0]
        if empty:
            raise ValueError(f"{len(empty)} queries have an empty gold set, first: {empty[:5]}")
        bad_type = [q for q, g in enumerate(sets) if not np.issubdtype(g.dtype, np.integer)]
        if bad_type:
            raise ValueError(f"gold indices must be integers; queries {bad_type[:5]} are not")
        lengths = np.array([g.size for g in sets], dtype=np.int64)
        index = (np.concatenate(sets).astype(np.int64) if sets else np.zeros(0, np.int64))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    else:
        raise ValueError(f"gold must be None, an int array or a sequence of index sets, "
                         f"got {type(gold).__name__}")
    if len(starts) != num_queries:
        raise ValueError(f"gold has {len(starts)} entries for {num_queries} queries")
    out = (index < 0) | (index >= gallery_size)
    if out.any():
        raise ValueError(f"gold index {int(index[out][0])} outside the gallery of {gallery_size} "
                         f"items ({int(out.sum())} such indices)")
    return index, starts


def query_of_pairs(starts: np.ndarray, num_pairs: int) -> np.ndarray:
    """The query each gold pair belongs to (inverse of the CSR `starts`)."""
    owner = np.zeros(num_pairs, dtype=np.int64)
    if len(starts) > 1:
        np.add.at(owner, starts[1:], 1)
    return np.cumsum(owner)


def best_gold_scores(pair_scores: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per query, the highest score among its gold items (pair_scores aligned with gold_pairs)."""
    return np.maximum.reduceat(pair_scores, starts) if len(starts) else pair_scores[:0]


def _check_scores(scores) -> np.ndarray:
    s = np.asarray(scores)
    if s.ndim != 2:
        raise ValueError(f"scores must be a [queries, gallery] matrix, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.floating) and not np.issubdtype(s.dtype, np.integer):
        raise ValueError(f"scores must be numeric, got dtype {s.dtype}")
    if np.issubdtype(s.dtype, np.floating) and not np.isfinite(s).all():
        bad = np.argwhere(~np.isfinite(s))[0]
        raise ValueError(f"scores contain NaN/inf (first at query {bad[0]}, item {bad[1]})")
    return s


def ranks_from_scores(scores, gold=None) -> np.ndarray:
    """1-based rank of every query: 1 + #gallery items scoring strictly above its best gold item."""
    s = _check_scores(scores)
    index, starts = gold_pairs(gold, s.shape[0], s.shape[1])
    owner = query_of_pairs(starts, len(index))
    best = best_gold_scores(s[owner, index], starts)
    return 1 + (s > best[:, None]).sum(axis=1, dtype=np.int64)


def metrics_from_ranks(ranks) -> dict[str, float]:
    """R@1/5/10, NDCG@10, MRR (percent) and MedR from 1-based ranks."""
    r = np.asarray(ranks)
    if r.ndim != 1 or r.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.integer) or (r < 1).any():
        raise ValueError("ranks must be integers >= 1")
    r = r.astype(np.float64)
    out = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in RECALL_KS}
    # One relevant item: DCG = 1/log2(rank+1) within the cut-off, ideal DCG = 1.
    gain = np.where(r <= NDCG_K, 1.0 / np.log2(r + 1.0), 0.0)
    out[f"NDCG@{NDCG_K}"] = float(100.0 * np.mean(gain))
    out["MRR"] = float(100.0 * np.mean(1.0 / r))
    out["MedR"] = float(np.median(r))
    return out
