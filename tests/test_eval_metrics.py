"""Ranks and retrieval metrics: hand-computed cases with ties, and the classic sort-based rank.

Classic rank (many retrieval codebases): position of the gold item in argsort(-scores) + 1.
Without ties it is identical to ours. With ties it depends on the sort: with a stable sort it
is ours + the number of items tied with the gold item that have a lower gallery index, i.e.
it breaks ties against the gold item by index, while method.md resolves ties in favour of
the gold item (rank = 1 + #strictly higher).
"""

import math

import numpy as np
import pytest

from omniret_jax.eval.metrics import metrics_from_ranks, ranks_from_scores


def classic_ranks(scores, gold_sets):
    """Independent reference: stable argsort of -scores, best position of a gold item."""
    order = np.argsort(-scores, axis=1, kind="stable")
    position = np.argsort(order, axis=1)  # position[q, g] = place of item g in q's ranking
    return np.array([1 + min(position[q, g] for g in golds) for q, golds in enumerate(gold_sets)])


def test_hand_computed_example_with_ties():
    scores = np.array([
        [0.9, 0.9, 0.1, 0.5],   # gold 0 tied with item 1 -> rank 1 (tie favours gold)
        [0.3, 0.3, 0.3, 0.2],   # gold 1 tied with items 0 and 2 -> rank 1
        [0.8, 0.1, 0.4, 0.8],   # two items strictly higher -> rank 3
        [0.5, 0.6, 0.7, 0.1],   # three strictly higher -> rank 4
    ])
    ranks = ranks_from_scores(scores)
    assert ranks.tolist() == [1, 1, 3, 4]
    m = metrics_from_ranks(ranks)
    assert m["R@1"] == 50.0 and m["R@5"] == 100.0 and m["R@10"] == 100.0
    ndcg = (1 + 1 + 1 / math.log2(4) + 1 / math.log2(5)) / 4 * 100
    assert m["NDCG@10"] == pytest.approx(ndcg, abs=1e-12)
    assert m["MRR"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 4) / 4 * 100, abs=1e-12)
    assert m["MedR"] == 2.0
    # The classic stable-sort rank puts tied items with a lower index first.
    assert classic_ranks(scores, [[0], [1], [2], [3]]).tolist() == [1, 2, 3, 4]

    # Explicit gold indices and gold sets (multi-caption): the best gold item counts.
    assert ranks_from_scores(scores, np.array([3, 3, 0, 2])).tolist() == [3, 4, 1, 1]
    assert ranks_from_scores(scores, [[2, 3], [3], [1, 2], [0]]).tolist() == [3, 4, 3, 3]


def test_metrics_cutoffs_by_hand():
    m = metrics_from_ranks(np.array([1, 2, 10, 11]))
    assert (m["R@1"], m["R@5"], m["R@10"]) == (25.0, 50.0, 75.0)
    assert m["NDCG@10"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(11) + 0) / 4 * 100, abs=1e-12)
    assert m["MRR"] == pytest.approx((1 + 0.5 + 0.1 + 1 / 11) / 4 * 100, abs=1e-12)
    assert m["MedR"] == 6.0


@pytest.mark.parametrize("shape", [(50, 50), (37, 120), (200, 9)])
def test_identical_to_classic_sort_without_ties(shape):
    rng = np.random.default_rng(shape[0])
    q, g = shape
    scores = rng.standard_normal(shape)
    assert all(len(np.unique(row)) == g for row in scores)  # tie-free
    gold = rng.integers(0, g, size=q)
    np.testing.assert_array_equal(ranks_from_scores(scores, gold),
                                  classic_ranks(scores, [[x] for x in gold]))
    sets = [rng.choice(g, size=rng.integers(1, 4), replace=False) for _ in range(q)]
    np.testing.assert_array_equal(ranks_from_scores(scores, sets), classic_ranks(scores, sets))
    if q == g:
        np.testing.assert_array_equal(ranks_from_scores(scores),
                                      classic_ranks(scores, [[i] for i in range(q)]))


def test_ties_differ_from_classic_sort_by_the_tied_items_before_gold():
    rng = np.random.default_rng(7)
    scores = rng.integers(0, 4, size=(60, 60)).astype(np.float64)  # heavy ties
    ours = ranks_from_scores(scores)
    classic = classic_ranks(scores, [[i] for i in range(60)])
    tied_before = np.array([(scores[i, :i] == scores[i, i]).sum() for i in range(60)])
    np.testing.assert_array_equal(classic, ours + tied_before)
    assert (classic > ours).sum() > 10  # the example really exercises ties


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="diagonal gold needs"):
        ranks_from_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="outside the gallery"):
        ranks_from_scores(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="empty gold set"):
        ranks_from_scores(np.zeros((2, 3)), [[0], []])
    with pytest.raises(ValueError, match="2 entries for 3 queries"):
        ranks_from_scores(np.zeros((3, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        ranks_from_scores(np.array([[0.0, np.nan], [1.0, 0.0]]))
    with pytest.raises(ValueError, match="integers >= 1"):
        metrics_from_ranks(np.array([0, 1]))
