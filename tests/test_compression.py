"""Appendix G compression: shared dimension subsets, int8, sign hashing, the summary table."""

import json

import numpy as np
import pytest

from omniret_jax.eval import compression as C
from omniret_jax.eval import retrieval as R
from omniret_jax.eval.metrics import metrics_from_ranks
from omniret_jax.eval.store import PATH_NAMES, EmbeddingSet, write_embeddings


def unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gallery(n=40, d=64, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, d))
    paths = {p: unit(base + 1.5 * rng.standard_normal((n, d))) for p in PATH_NAMES}
    return EmbeddingSet(paths, tuple(f"c{i}" for i in range(n)))


def test_random_dims_and_bad_d():
    a, b = C.random_dims(100, 30, seed=1), C.random_dims(100, 30, seed=2)
    assert len(np.unique(a)) == 30 and (np.diff(a) > 0).all() and a.max() < 100
    np.testing.assert_array_equal(a, C.random_dims(100, 30, seed=1))
    assert not np.array_equal(a, b)
    with pytest.raises(ValueError, match="cannot keep d=101 dimensions of D=100"):
        C.random_dims(100, 101, seed=0)
    with pytest.raises(ValueError, match="cannot keep d=128 dimensions of D=64"):
        C.compression_table(gallery(), [C.Setting("first", 128, "int8")], seeds=(0,))
    with pytest.raises(ValueError, match="select 'all' goes with dim=None"):
        C.Setting("random", None, "int8")
    with pytest.raises(ValueError, match="unknown quant"):
        C.Setting("all", None, "int4")


def test_subsets_are_shared_by_every_path():
    emb = gallery()
    same = EmbeddingSet({"T": emb.paths["V"], "V": emb.paths["V"]}, emb.ids)
    for setting in (C.Setting("random", 20, "fp32"), C.Setting("random", 20, "int8"),
                    C.Setting("first", 20, "binary")):
        out = C.compress(same, setting, seed=3)
        np.testing.assert_array_equal(out.paths["T"], out.paths["V"])
    dims = C.random_dims(64, 20, seed=3)
    out = C.compress(emb, C.Setting("random", 20, "fp32"), seed=3)
    np.testing.assert_allclose(out.paths["A"], unit(emb.paths["A"][:, dims]), atol=1e-6)
    first = C.compress(emb, C.Setting("first", 20, "fp32"))
    np.testing.assert_allclose(first.paths["A"], unit(emb.paths["A"][:, :20]), atol=1e-6)


def test_int8_symmetric_per_vector():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 1024)).astype(np.float32) * rng.uniform(0.1, 10, (50, 1))
    codes, scale = C.quantize_int8(x)
    assert codes.dtype == np.int8 and np.abs(codes).max(axis=1).tolist() == [127] * 50
    np.testing.assert_allclose(scale, np.abs(x).max(axis=1) / 127, rtol=1e-6)
    err = np.abs(C.dequantize_int8(codes, scale) - x) / scale[:, None]
    assert err.max() <= 0.5 + 1e-4
    # cosine of the dequantised vectors (what compress returns, float32) == cosine of the
    # integer codes (the per-vector scale cancels), up to float32 rounding
    deq = C.compress_rows(x, C.Setting("all", None, "int8"), None).astype(np.float64)
    ints = codes.astype(np.float64)
    ints /= np.linalg.norm(ints, axis=1, keepdims=True)
    diff = np.abs(deq @ deq.T - ints @ ints.T).max()
    print(f"int8: max |cos(dequantised, float32) - cos(codes, float64)| = {diff:.2e}")
    assert diff < 5e-6


def test_binary_ranks_equal_hamming_ranks():
    emb = gallery(n=60, d=64, seed=2)
    setting = C.Setting("random", 24, "binary")  # small d: many exact ties
    packed = C.compress(emb, setting, seed=5)
    res = R.evaluate(packed, ["T->V", "A->TV"], query_block=7, gallery_block=11)
    dims = C.random_dims(64, 24, seed=5)
    ties = 0
    for d in ("T->V", "A->TV"):
        qp, gp = R.direction_paths(d)
        bq = C.sign_bits(emb.paths[qp][:, dims])
        bg = C.sign_bits(emb.paths[gp][:, dims])
        ham = C.hamming_distances(bq, bg)
        # independent check of the popcount path
        np.testing.assert_array_equal(ham, (bq[:, None, :] != bg[None, :, :]).sum(2))
        gold = np.diag(ham)
        ranks = 1 + (ham < gold[:, None]).sum(1)  # smaller distance = higher score
        ties += int(((ham == gold[:, None]).sum(1) > 1).sum())
        assert res["directions"][d] == {**metrics_from_ranks(ranks), "queries": 60,
                                        "gallery": 60}
    assert ties > 20  # the case really has ties at gold


def test_table_from_file(tmp_path):
    emb = gallery(n=40, d=64, seed=4)
    f = tmp_path / "emb.safetensors"
    write_embeddings(f, emb.paths, emb.ids)
    settings = (C.Setting(), C.Setting("random", 32, "int8"), C.Setting("random", 16, "binary"),
                C.Setting("first", 32, "int8"), C.Setting("random", 32, "fp32"))
    table = C.compression_table(f, settings, seeds=(0, 1, 2))
    json.dumps(table)
    names = [r["name"] for r in table["settings"]]
    assert names == ["fp32", "int8/32", "bin/16", "int8/32 first-d", "fp32/32"]
    ref = R.evaluate(emb)
    full = table["settings"][0]
    assert full["seeds"] == [] and full["dim"] == 64
    for d in R.DIRECTIONS:
        assert full["R@1"][d] == {"mean": ref["directions"][d]["R@1"], "std": 0.0}
    assert full["averages"]["AVG all"]["mean"] == ref["averages"]["AVG all"]
    # random rows: mean/std over the three seeds, recomputed here seed by seed
    runs = [R.evaluate(C.compress(emb, settings[1], s))["averages"]["AVG dual"] for s in (0, 1, 2)]
    row = table["settings"][1]
    assert row["averages"]["AVG dual"]["mean"] == pytest.approx(np.mean(runs))
    assert row["averages"]["AVG dual"]["std"] == pytest.approx(np.std(runs, ddof=1))
    assert table["settings"][2]["averages"]["AVG all"]["std"] > 0
    assert table["settings"][3]["averages"]["AVG all"]["std"] == 0.0
    md = C.compression_markdown(table)
    print(md)
    assert md.splitlines()[0] == "| Setting | AVG single | AVG dual | AVG all |"
    assert "| int8/32 | " in md and " ± " in md
    per_dir = C.compression_markdown(table, per_direction=True)
    assert "V->AT" in per_dir.splitlines()[0]
