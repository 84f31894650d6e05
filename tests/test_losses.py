"""Training losses vs an independent float64 NumPy transcription of shared/spec/method.md.

Tolerances: values 1e-6 relative (float32 math vs float64 reference); bf16 inputs 1e-2
relative to the float32-input loss. Gradient checks are exact zeros / non-zeros.
"""

import functools
import itertools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omniret_jax.data.batch import derangement, hard_negative_slot
from omniret_jax.losses import LossConfig, compute_losses, info_nce, released_pair

B, D = 8, 32
MODS = ("T", "V", "A")
ALL_KEYS = ("T", "V", "A", "TVA", "TVA_aug", "TVA_neg") + tuple(
    m + s for s in ("_aug", "_neg") for m in MODS
)


def unit(rng, *shape):
    v = rng.standard_normal(shape)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def make_emb(seed=0, b=B, d=D, share=0.4):
    """Correlated unit embeddings (a shared per-sample direction) so losses are O(1), not O(50)."""
    rng = np.random.default_rng(seed)
    base = unit(rng, b, d)
    return {
        k: (lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True))(
            share * base + (1 - share) * unit(rng, b, d)
        ).astype(np.float32)
        for k in ALL_KEYS
    }


# ----------------------------------------------------------------------------- NumPy reference


def np_logsumexp(v):
    top = np.max(v)
    return top + np.log(np.sum(np.exp(v - top)))


def np_sym_nce(xs, ys, sim, tau, negs_of_row):
    """0.5 [CE(x->y) + CE(y->x)], rows written out one by one from the formula.

    xs, ys: lists of items; sim(item, item) -> float; negs_of_row(i) -> negative items of row i
    (appended to both directions).
    """

    def one_direction(a, b):
        total = 0.0
        for i in range(len(a)):
            logits = [sim(a[i], b[j]) for j in range(len(b))]
            logits += [sim(a[i], n) for n in negs_of_row(i)]
            logits = np.array(logits) / tau
            total += np_logsumexp(logits) - logits[i]
        return total / len(a)

    return 0.5 * (one_direction(xs, ys) + one_direction(ys, xs))


def dot(u, v):
    return float(np.dot(u, v))


def cross_modal_mean(p, q):
    """Mean of the six cosines <p_m, q_n>, m != n, of two tuples given as dicts m -> vector."""
    return float(np.mean([np.dot(p[m], q[n]) for m in MODS for n in MODS if m != n]))


def np_losses(emb, step, *, recipe, terms, sim, pool, w, tau):
    e = {k: np.asarray(v, np.float64) for k, v in emb.items()}
    b = len(e["T"])
    rows = lambda key: [e[key][i] for i in range(b)]  # noqa: E731
    plain = lambda x, y: np_sym_nce(rows(x), rows(y), dot, tau, lambda i: [])  # noqa: E731
    out = {}
    if "L_T" in terms:
        if sim == "joint":
            xs, ys, negs, s = rows("TVA"), rows("TVA_aug"), rows("TVA_neg"), dot
        else:
            tup = lambda suffix: [{m: e[m + suffix][i] for m in MODS} for i in range(b)]  # noqa
            xs, ys, negs, s = tup(""), tup("_aug"), tup("_neg"), cross_modal_mean
        of_row = (lambda i: [negs[i]]) if pool == "own" else (lambda i: negs)
        out["L_T"] = np_sym_nce(xs, ys, s, tau, of_row)
    if recipe == "paper":
        if "L_A" in terms:
            out["L_A"] = np.mean([plain("T", "V"), plain("T", "A"), plain("V", "A")])
        if "L_D" in terms:
            out["L_D"] = np.mean([plain(m, "TVA") for m in MODS])
    else:
        a, c = [("T", "A"), ("T", "V"), ("A", "V")][step % 3]
        if "L_D" in terms:
            out["L_D"] = 0.5 * (plain("TVA", a) + plain("TVA", c))
        if "L_A" in terms:
            out["L_A"] = plain(a, c)
    out["loss"] = sum(w[t] * out[t] for t in terms)
    return out


def assert_rel(got, want, rtol, what=""):
    err = abs(float(got) - float(want)) / abs(float(want))
    assert err <= rtol, f"{what}: got {float(got)!r}, want {float(want)!r}, rel err {err:.2e}"
    return err


# ----------------------------------------------------------------------------- values


def test_info_nce_matches_numpy_with_hard_negatives():
    rng = np.random.default_rng(1)
    x, y = unit(rng, B, D).astype(np.float32), unit(rng, B, D).astype(np.float32)
    own = unit(rng, B, 3, D).astype(np.float32)
    pool = unit(rng, 5, D).astype(np.float32)
    for tau in (0.01, 0.07):
        got = info_nce(x, y, temperature=tau, extra_negatives=own, shared_negatives=pool)
        want = np_sym_nce(
            list(x.astype(np.float64)), list(y.astype(np.float64)), dot, tau,
            lambda i: list(own[i].astype(np.float64)) + list(pool.astype(np.float64)),
        )
        err = assert_rel(got, want, 1e-6, f"tau={tau}")
        print(f"info_nce tau={tau}: {float(got):.6f} rel err {err:.1e}")
        plain = info_nce(x, y, temperature=tau)
        assert_rel(plain, np_sym_nce(list(x), list(y), dot, tau, lambda i: []), 1e-6)


CASES = [(r, p, "joint", None) for r in ("paper", "released") for p in ("pairwise", "distill")]
CASES += [
    (r, "full", s, pool)
    for r, s, pool in itertools.product(
        ("paper", "released"), ("joint", "cross_modal_mean"), ("own", "batch")
    )
]


@pytest.mark.parametrize("recipe,preset,sim,pool", CASES)
def test_compute_losses_matches_numpy(recipe, preset, sim, pool):
    w = {"L_A": 0.7, "L_D": 1.3, "L_T": 2.0}
    cfg = LossConfig.from_preset(
        preset, recipe=recipe, tuple_similarity=sim, hard_negative_pool=pool,
        l_A=w["L_A"], l_D=w["L_D"], l_T=w["L_T"],
    )
    emb = make_emb(seed=3)
    fn = jax.jit(lambda e, s: compute_losses(e, s, cfg))
    worst = 0.0
    for step in range(4):
        total, metrics = fn(emb, jnp.int32(step))
        want = np_losses(emb, step, recipe=recipe, terms=cfg.terms, sim=sim,
                         pool=cfg.negative_pool, w=w, tau=cfg.temperature)
        assert set(want) <= set(metrics)
        assert float(metrics["loss"]) == float(total)
        for name, value in want.items():
            worst = max(worst, assert_rel(metrics[name], value, 1e-6, f"{name} step {step}"))
        if step == 1:  # a Python-int step (not traced) gives the same values
            assert_rel(compute_losses(emb, step, cfg)[0], want["loss"], 1e-6, "int step")
    print(f"{recipe}/{preset}/{sim}/{cfg.negative_pool}: max rel err {worst:.1e}")


def test_paper_components_and_default_pool():
    assert LossConfig().negative_pool == "own"
    assert LossConfig(recipe="released").negative_pool == "batch"
    emb = make_emb(seed=4)
    _, m = compute_losses(emb, 0, LossConfig())
    np.testing.assert_allclose(
        float(m["L_A"]), np.mean([float(m[k]) for k in ("L_A/T-V", "L_A/T-A", "L_A/V-A")]),
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        float(m["L_D"]), np.mean([float(m[f"L_D/{k}"]) for k in MODS]), rtol=1e-6
    )


def test_global_batch_negatives_under_sharding():
    """Batch split over 8 devices: same value as unsharded, i.e. negatives span all shards."""
    emb = make_emb(seed=5, b=16)
    cfg = LossConfig.from_preset("full", hard_negative_pool="batch")
    want = np_losses(emb, 0, recipe="paper", terms=cfg.terms, sim="joint", pool="batch",
                     w={"L_A": 1, "L_D": 1, "L_T": 1}, tau=0.01)["loss"]
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.device_put(emb, NamedSharding(mesh, PartitionSpec("data", None)))
    assert len(sharded["T"].sharding.device_set) == 8
    total, _ = jax.jit(lambda e: compute_losses(e, 0, cfg))(sharded)
    err = assert_rel(total, want, 1e-6, "sharded")
    print(f"sharded over 8 devices: rel err {err:.1e}")


# ----------------------------------------------------------------------------- gradients


@functools.lru_cache(maxsize=None)
def grad_fn(term, cfg):
    """jit(grad) of one metric w.r.t. the whole emb dict; the step stays traced (one compile)."""
    return jax.jit(jax.grad(lambda e, step: compute_losses(e, step, cfg)[1][term]))


def grads_of(term, emb, cfg, step=0):
    return grad_fn(term, cfg)(emb, jnp.int32(step))


@pytest.mark.parametrize("recipe", ["paper", "released"])
def test_teacher_gets_no_gradient_from_distillation(recipe):
    emb = make_emb(seed=6)
    cfg = LossConfig(recipe=recipe)
    for step in range(3):
        g = grads_of("L_D", emb, cfg, step)
        assert np.all(np.asarray(g["TVA"]) == 0.0)
        students = released_pair(step) if recipe == "released" else MODS
        for m in students:
            assert np.abs(np.asarray(g[m])).max() > 1e-3, (recipe, step, m)
        # The joint anchor does learn, through the tuple term.
        assert np.abs(np.asarray(grads_of("loss", emb, cfg, step)["TVA"])).max() > 1e-3


@pytest.mark.parametrize("sim", ["joint", "cross_modal_mean"])
@pytest.mark.parametrize("pool", ["own", "batch"])
def test_hard_negative_gets_no_gradient(sim, pool):
    emb = make_emb(seed=7)
    cfg = LossConfig(tuple_similarity=sim, hard_negative_pool=pool)
    g_t = grads_of("L_T", emb, cfg)
    g_all = grads_of("loss", emb, cfg)
    neg_keys = ["TVA_neg"] if sim == "joint" else [m + "_neg" for m in MODS]
    for k in neg_keys:
        assert np.all(np.asarray(g_t[k]) == 0.0) and np.all(np.asarray(g_all[k]) == 0.0), k
    live = ["TVA", "TVA_aug"] if sim == "joint" else [m + s for m in MODS for s in ("", "_aug")]
    for k in live:
        assert np.abs(np.asarray(g_t[k])).max() > 1e-3, k
    # The hard negative does change the loss value (it is in the softmax, just detached).
    no_neg = dict(emb)
    for k in neg_keys:
        no_neg[k] = -emb[k]
    flipped, kept = compute_losses(no_neg, 0, cfg)[0], compute_losses(emb, 0, cfg)[0]
    assert abs(float(flipped) - float(kept)) > 1e-4


# ----------------------------------------------------------------------------- sanity


def test_aligned_embeddings_give_zero_loss_at_low_temperature():
    z = np.eye(B, D, dtype=np.float32)  # orthonormal rows
    perm = derangement(np.random.default_rng(0), B)
    emb = {k: z for k in ALL_KEYS}
    emb["TVA_neg"] = z[perm]
    for m in MODS:
        emb[m + "_neg"] = z[perm]
    for sim in ("joint", "cross_modal_mean"):
        total, _ = compute_losses(emb, 0, LossConfig(tuple_similarity=sim))
        assert 0.0 <= float(total) < 1e-6, (sim, float(total))
    # Same embeddings, tau = 1: the softmax is far from one-hot, loss is log(1 + (B-1)/e) per term.
    warm = float(info_nce(z, z, temperature=1.0))
    np.testing.assert_allclose(warm, np.log(1 + (B - 1) / np.e), rtol=1e-6)
    assert float(info_nce(z, z, temperature=0.01)) < 1e-6


@pytest.mark.parametrize("sim", ["joint", "cross_modal_mean"])
def test_bf16_inputs_match_float32(sim):
    emb = make_emb(seed=8, d=256, share=0.25)  # losses ~1-7
    cfg = LossConfig(tuple_similarity=sim)
    f32, m32 = compute_losses(emb, 1, cfg)
    bf16, m16 = compute_losses({k: jnp.asarray(v, jnp.bfloat16) for k, v in emb.items()}, 1, cfg)
    assert bf16.dtype == jnp.float32
    for name in ("L_A", "L_D", "L_T", "loss"):
        err = assert_rel(m16[name], m32[name], 1e-2, f"bf16 {name}")
        print(f"bf16 vs f32 {sim} {name}: rel err {err:.1e}")


# ----------------------------------------------------------------------------- derangement


@functools.lru_cache(maxsize=None)
def derangement_draws(n, count=3600):
    """`count` derangements of size n from one seeded generator (the host draws them with NumPy)."""
    rng = np.random.default_rng(n)
    return np.stack([derangement(rng, n) for _ in range(count)])


@pytest.mark.parametrize("n", [2, 3, 4, 64])
def test_derangements_are_fixed_point_free_permutations(n):
    perms = derangement_draws(n)
    assert perms.dtype == np.int32 and perms.shape == (3600, n)
    assert not np.any(perms == np.arange(n)), "fixed point"
    assert np.all(np.sort(perms, axis=1) == np.arange(n)), "not a permutation"
    if n == 2:
        assert np.all(perms == [1, 0])
    # Every off-diagonal target i -> j is reachable.
    hits = np.zeros((n, n), int)
    np.add.at(hits, (np.broadcast_to(np.arange(n), perms.shape), perms), 1)
    assert np.all(hits[~np.eye(n, dtype=bool)] > 0), f"unreached targets for n={n}"


@pytest.mark.parametrize("n,count", [(3, 2), (4, 9)])
def test_derangement_distribution(n, count):
    """Uniform over derangements: n = 3 has 2 of them, n = 4 has 9; all appear, chi2 small."""
    perms = derangement_draws(n)
    counts = Counter(map(tuple, perms))
    assert len(counts) == count
    expected = len(perms) / count
    chi2 = sum((c - expected) ** 2 / expected for c in counts.values())
    limit = {1: 10.8, 8: 26.1}[count - 1]  # p = 0.001
    assert chi2 < limit, f"chi2 {chi2:.1f} >= {limit} ({count - 1} dof): {counts}"
    print(f"derangement n={n}: chi2 {chi2:.2f} ({count - 1} dof)")


@pytest.mark.parametrize("n", [0, 1])
def test_derangement_too_small(n):
    with pytest.raises(ValueError, match="batch too small for a derangement"):
        derangement(np.random.default_rng(0), n)


def test_slot_and_pair_cycles():
    assert [hard_negative_slot(s) for s in range(7)] == [
        "text", "audio", "video", "text", "audio", "video", "text"]
    assert hard_negative_slot(np.int64(4)) == "audio"
    assert [released_pair(s) for s in range(4)] == [("T", "A"), ("T", "V"), ("A", "V"), ("T", "A")]
    with pytest.raises(ValueError, match="step"):
        hard_negative_slot(-1)


# ----------------------------------------------------------------------------- config and errors


def test_presets_and_config_validation():
    assert LossConfig.from_preset("frozen").terms == ()
    assert LossConfig.from_preset("pairwise").terms == ("L_A",)
    assert LossConfig.from_preset("distill").terms == ("L_A", "L_D")
    assert LossConfig.from_preset("full").terms == ("L_A", "L_D", "L_T")
    assert LossConfig(terms=["L_T", "L_A"]).terms == ("L_A", "L_T")
    hash(LossConfig())
    with pytest.raises(ValueError, match="frozen, pairwise, distill, full"):
        LossConfig.from_preset("tuple")
    with pytest.raises(ValueError, match="no loss terms"):
        compute_losses(make_emb(), 0, LossConfig.from_preset("frozen"))
    for bad in ({"recipe": "wave"}, {"tuple_similarity": "max"}, {"temperature": 0.0},
                {"terms": ("L_X",)}, {"hard_negative_pool": "device"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LossConfig(**bad)


def test_missing_keys_and_bad_shapes():
    emb = make_emb()
    for key, cfg, term in [
        ("TVA_neg", LossConfig(), "L_T"),
        ("TVA", LossConfig.from_preset("distill"), "L_D"),
        ("A_aug", LossConfig(tuple_similarity="cross_modal_mean"), "L_T"),
        ("V", LossConfig.from_preset("pairwise", recipe="released"), "L_A"),
    ]:
        partial = {k: v for k, v in emb.items() if k != key}
        with pytest.raises(KeyError, match=f"'{key}'.*{term}"):
            compute_losses(partial, 0, cfg)
    # Keys of inactive terms are not needed.
    only = {k: emb[k] for k in MODS}
    compute_losses(only, 0, LossConfig.from_preset("pairwise"))
    bad = dict(emb, TVA_aug=emb["TVA_aug"][:-1])
    with pytest.raises(ValueError, match="TVA_aug"):
        compute_losses(bad, 0, LossConfig())
    # The shape contract (jaxtyping, checked in the test suite) or the function's own check names it.
    with pytest.raises((ValueError, TypeCheckError), match="extra_negatives"):
        info_nce(emb["T"], emb["V"], temperature=0.01, extra_negatives=emb["A"])
