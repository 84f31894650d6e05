"""12-direction evaluation, blocked scoring, multi-caption modes and the embedding store."""

import json
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

from omniret_jax.data.manifest import ManifestRecord
from omniret_jax.eval import retrieval as R
from omniret_jax.eval.metrics import metrics_from_ranks, ranks_from_scores
from omniret_jax.eval.store import (PATH_NAMES, EmbeddingSet, caption_entries, load_embeddings,
                                    write_embeddings)

PAIRS = [("T", "V"), ("T", "A"), ("V", "A"), ("T", "AV"), ("A", "TV"), ("V", "TA")]


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def full_topk(scores, k):
    """Reference top-k: full sort by (score desc, index asc)."""
    idx = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.lexsort((idx, -scores), axis=1)[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def test_direction_names():
    assert len(R.DIRECTIONS) == 12 and len(set(R.DIRECTIONS)) == 12
    assert R.direction_paths("V->AT") == ("V", "TA") and R.direction_paths("AT->V") == ("TA", "V")
    assert R.direction_paths("A->TV") == ("A", "TV") and R.direction_paths("T->AV") == ("T", "AV")
    with pytest.raises(ValueError) as e:
        R.direction_paths("T->TA")
    assert all(d in str(e.value) for d in R.DIRECTIONS)
    with pytest.raises(ValueError, match="unknown direction 'X->Y'"):
        R.evaluate({"T": unit(np.eye(3)), "V": unit(np.eye(3))}, ["X->Y"])


def test_exact_scores_are_cosines_and_tie_exactly():
    rng = np.random.default_rng(0)
    q, g = unit(rng.standard_normal((20, 37))), unit(rng.standard_normal((30, 37)))
    g[4] = g[17]
    s = R.cosine_scores(q, g)
    ref = q.astype(np.float64) @ g.astype(np.float64).T
    err = np.abs(s - ref).max()
    print(f"exact fixed-point cosine vs float64 matmul of float32 inputs: max abs err {err:.2e}")
    assert err < 1e-6
    np.testing.assert_array_equal(s[:, 4], s[:, 17])  # identical embeddings, identical scores


@pytest.mark.parametrize("blocks", [(7, 10), (1, 1), (50, None), (None, 17), (13, 1000)])
def test_blocked_equals_one_matrix(blocks):
    rng = np.random.default_rng(1)
    n, d = 103, 37
    q, g = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    g[10], g[60] = g[3], g[80]       # exact duplicates: ties with and beside gold items
    q[20] = q[21]
    g[40] = g[41] * 3.0              # same direction, different norm: a cosine tie
    scores = R.cosine_scores(q, g)
    golds = {"diag": None, "index": rng.integers(0, n, n),
             "sets": [rng.choice(n, size=rng.integers(1, 5), replace=False) for _ in range(n)]}
    qb, gb = blocks
    for name, gold in golds.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unnormalised on purpose
            res = R.rank_queries(q, g, gold, top_k=12, query_block=qb, gallery_block=gb)
        np.testing.assert_array_equal(res.ranks, ranks_from_scores(scores, gold), err_msg=name)
        idx, val = full_topk(scores, 12)
        np.testing.assert_array_equal(res.topk_index, idx, err_msg=name)
        np.testing.assert_array_equal(res.topk_score, val, err_msg=name)
    # the duplicates really produce exact ties at gold items
    assert scores[3, 3] == scores[3, 10] and scores[40, 40] == scores[40, 41]


def test_memmap_gallery_and_top_k_larger_than_gallery(tmp_path):
    rng = np.random.default_rng(2)
    g = unit(rng.standard_normal((29, 16)))
    mm = np.memmap(tmp_path / "g.f32", dtype=np.float32, mode="w+", shape=g.shape)
    mm[:] = g
    res = R.rank_queries(g[:5], mm, np.arange(5), top_k=50, query_block=2, gallery_block=6)
    assert res.topk_index.shape == (5, 29)
    np.testing.assert_array_equal(res.ranks, np.ones(5, dtype=np.int64))


def twelve_paths(n, d, rng, matched=None):
    """Independent random paths; the paths named in `matched` share one base (perfect match)."""
    base = rng.standard_normal((n, d))
    paths = {p: unit(rng.standard_normal((n, d))) for p in PATH_NAMES}
    for p in matched or ():
        paths[p] = unit(base)
    return paths


@pytest.mark.parametrize("pair", PAIRS)
def test_each_direction_reads_its_own_paths(pair):
    rng = np.random.default_rng(3)
    res = R.evaluate(twelve_paths(64, 24, rng, matched=pair))
    assert list(res["directions"]) == list(R.DIRECTIONS)
    for d, m in res["directions"].items():
        expected = set(R.direction_paths(d)) == set(pair)
        assert (m["R@1"] == 100.0) == expected, (d, m["R@1"])
        if not expected:
            assert m["R@1"] < 30.0


def test_evaluate_output_and_averages():
    rng = np.random.default_rng(4)
    n, d = 48, 32
    base = rng.standard_normal((n, d))
    paths = {p: unit(base + s * rng.standard_normal((n, d)))
             for p, s in zip(PATH_NAMES, (1.5, 2.0, 2.5, 1.8, 1.2, 2.2))}
    res = R.evaluate(paths, top_k=3, query_block=10, gallery_block=7)
    json.dumps(res)  # JSON-able
    r1 = {k: v["R@1"] for k, v in res["directions"].items()}
    single, dual = [r1[k] for k in R.SINGLE_DIRECTIONS], [r1[k] for k in R.DUAL_DIRECTIONS]
    assert res["averages"]["AVG single"] == pytest.approx(np.mean(single))
    assert res["averages"]["AVG dual"] == pytest.approx(np.mean(dual))
    assert res["averages"]["AVG all"] == pytest.approx(np.mean(list(r1.values())))
    # one direction by hand: cosine matrix + independent sort-based ranks
    q, g = paths["V"].astype(np.float64), paths["TA"].astype(np.float64)
    s = q @ g.T
    pos = np.argsort(np.argsort(-s, axis=1), axis=1)
    ref = metrics_from_ranks(1 + pos[np.arange(n), np.arange(n)])
    for k, v in ref.items():
        assert res["directions"]["V->AT"][k] == pytest.approx(v), k
    top = res["directions"]["V->AT"]["top_k"]
    assert top["query_ids"][0] == "0" and len(top["gallery_ids"][0]) == 3
    assert top["gallery_ids"][5][0] == str(int(np.argmax(s[5])))
    table = R.markdown_table(res)
    assert "| V->AT |" in table and "| AVG all (R@1) |" in table
    print(table)

    # a subset of directions: no partial averages
    part = R.evaluate({"T": paths["T"], "V": paths["V"]})
    assert list(part["directions"]) == ["T->V", "V->T"] and part["averages"] == {}
    with pytest.raises(ValueError, match=r"needs path\(s\) \['A'\]"):
        R.evaluate({"T": paths["T"], "V": paths["V"]}, ["T->A"])


def test_unnormalised_input_warns_and_matches_normalised():
    rng = np.random.default_rng(5)
    t, v = rng.standard_normal((30, 8)), rng.standard_normal((30, 8))
    with pytest.warns(UserWarning, match="not L2-normalised"):
        raw = R.evaluate({"T": t * 5.0, "V": v})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normed = R.evaluate({"T": unit(t), "V": unit(v)})
    assert raw["directions"] == normed["directions"]


def multi_caption_case(rng, n_clips=40, d=16):
    counts = rng.integers(1, 5, size=n_clips)
    caption_clip = np.repeat(np.arange(n_clips), counts)
    rng.shuffle(caption_clip)  # captions of a clip need not be adjacent
    base = rng.standard_normal((n_clips, d))
    clip = {p: unit(base + 0.9 * rng.standard_normal((n_clips, d))) for p in ("V", "A", "AV")}
    text = {p: unit(base[caption_clip] + 0.9 * rng.standard_normal((len(caption_clip), d)))
            for p in ("T", "TV", "TA")}
    return {**clip, **text}, caption_clip


def test_multi_caption_modes_against_brute_force():
    rng = np.random.default_rng(6)
    paths, cc = multi_caption_case(rng)
    n_clips = len(paths["V"])
    all_res = R.evaluate(paths, mode="all", caption_clip=cc, query_block=9, gallery_block=11)
    first_res = R.evaluate(paths, mode="first", caption_clip=cc)

    def brute_text_to_clip(t, v):
        s = t.astype(np.float64) @ v.astype(np.float64).T
        return np.array([1 + (s[i] > s[i, cc[i]]).sum() for i in range(len(cc))])

    def brute_clip_to_text(v, t):
        s = v.astype(np.float64) @ t.astype(np.float64).T
        out = []
        for c in range(n_clips):  # best rank over the clip's captions
            caps = np.flatnonzero(cc == c)
            out.append(min(1 + (s[c] > s[c, j]).sum() for j in caps))
        return np.array(out)

    for d, (qp, gp) in ((d, R.direction_paths(d)) for d in R.DIRECTIONS):
        m = all_res["directions"][d]
        if qp in ("T", "TV", "TA"):
            ref, nq = brute_text_to_clip(paths[qp], paths[gp]), len(cc)
        elif gp in ("T", "TV", "TA"):
            ref, nq = brute_clip_to_text(paths[qp], paths[gp]), n_clips
        else:
            sc = paths[qp].astype(np.float64) @ paths[gp].astype(np.float64).T
            ref, nq = 1 + (sc > np.diag(sc)[:, None]).sum(1), n_clips
        assert m["queries"] == nq, d
        for k, v in metrics_from_ranks(ref).items():
            assert m[k] == pytest.approx(v), (d, k)

    # mode "first" == a clip-level set built from each clip's first caption row
    first = np.array([np.flatnonzero(cc == c)[0] for c in range(n_clips)])
    clip_level = {p: (x[first] if p in ("T", "TV", "TA") else x) for p, x in paths.items()}
    assert first_res["directions"] == R.evaluate(clip_level)["directions"]
    with pytest.raises(ValueError, match="mode 'all' needs one text embedding per caption"):
        R.evaluate(clip_level, mode="all")
    with pytest.raises(ValueError, match="unknown mode"):
        R.evaluate(clip_level, mode="best")


def records(n, captions_per_clip=None):
    out = []
    for i in range(n):
        caps = [f"caption {i}.{k}" for k in range((captions_per_clip or [1] * n)[i])]
        out.append(ManifestRecord(id=f"clip{i}", caption=caps[0], video=f"/m/{i}.mp4",
                                  meta={"captions": caps}))
    return out


def test_store_round_trip_validation_and_mmap(tmp_path):
    rng = np.random.default_rng(8)
    recs = records(6, [2, 1, 3, 1, 1, 2])
    cap = caption_entries(recs)
    assert [c for c, _ in cap][:3] == ["clip0#0", "clip0#1", "clip1#0"]
    assert cap[5] == ("clip2#2", "caption 2.2")
    ids, caption_ids = [r.id for r in recs], [c for c, _ in cap]
    paths = {"V": rng.standard_normal((6, 12)), "A": rng.standard_normal((6, 12)),
             "T": rng.standard_normal((10, 12)), "TA": rng.standard_normal((10, 12))}
    f = tmp_path / "emb.safetensors"
    write_embeddings(f, paths, ids, caption_ids)
    emb = load_embeddings(f, manifest=recs, expected_dim=12)
    for p, x in paths.items():
        np.testing.assert_array_equal(emb.paths[p], x.astype(np.float32))
    assert emb.caption_clip.tolist() == [0, 0, 1, 2, 2, 2, 3, 4, 5, 5]
    assert emb.first_caption_rows.tolist() == [0, 2, 3, 6, 7, 8]
    mm = load_embeddings(f, mmap=True)
    assert isinstance(mm.paths["V"], np.memmap)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert R.evaluate(mm, mode="all") == R.evaluate(emb, mode="all")

    # manifest mismatch: first mismatching rows, missing and extra ids
    other = records(6)
    other[2] = ManifestRecord(id="zzz", caption="c", video="/m/z.mp4")
    with pytest.raises(ValueError) as e:
        load_embeddings(f, manifest=[r.id for r in other])
    msg = str(e.value)
    assert "row 2: store 'clip2' != manifest 'zzz'" in msg and "missing from the store" in msg
    with pytest.raises(ValueError, match="caption_ids do not match"):
        load_embeddings(f, manifest=records(6))
    with pytest.raises(ValueError, match=r"emb.safetensors: path 'T' has D=12 but expected_dim=16"):
        load_embeddings(f, expected_dim=16)

    # half precision on disk comes back as float32
    h = tmp_path / "half.safetensors"
    write_embeddings(h, {"V": paths["V"]}, ids, dtype=np.float16)
    assert load_embeddings(h).paths["V"].dtype == np.float32


def test_store_rejects_bad_content(tmp_path):
    x = np.ones((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"unknown path name\(s\) \['VT'\]"):
        write_embeddings(tmp_path / "a.safetensors", {"VT": x}, ["a", "b", "c"])
    with pytest.raises(ValueError, match="duplicate ids"):
        write_embeddings(tmp_path / "a.safetensors", {"V": x}, ["a", "b", "a"])
    with pytest.raises(ValueError, match="different dims"):
        EmbeddingSet({"V": x, "A": np.ones((3, 5))}, ("a", "b", "c"))
    with pytest.raises(ValueError, match="path 'A' has 2 rows but there are 3 ids"):
        EmbeddingSet({"V": x, "A": np.ones((2, 4))}, ("a", "b", "c"))
    with pytest.raises(ValueError, match="clips have no caption"):
        EmbeddingSet({"T": np.ones((2, 4))}, ("a", "b", "c"), ("a#0", "b#0"))
    with pytest.raises(ValueError, match="name no clip"):
        EmbeddingSet({"T": np.ones((1, 4))}, ("a",), ("q#0",))
    # files written by hand: unknown tensor name, missing metadata
    meta = {"format": "omniret-embeddings/1", "ids": json.dumps(["a", "b", "c"])}
    save_file({"V": x, "video": x}, str(tmp_path / "b.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"unknown path name\(s\) \['video'\]"):
        load_embeddings(tmp_path / "b.safetensors")
    save_file({"V": x}, str(tmp_path / "c.safetensors"))
    with pytest.raises(ValueError, match="metadata 'format'"):
        load_embeddings(tmp_path / "c.safetensors")
