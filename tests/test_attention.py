"""The blocked attention kernel equals jax.nn.dot_product_attention (XLA) on what the models feed it.

float32, matmul precision HIGHEST: outputs of attended queries <= 2e-6 max abs error, gradients of
q, k, v <= 1e-5 relative to their largest entry, for causal and bidirectional rows, left / right
padding, packed segments, GQA groups of 1, 3 and 4, odd lengths that leave a short last block,
one-block rows; bfloat16 inputs stay within bfloat16 rounding (2e-2). Padding queries get zeros
and no gradient flows out of them. (tests/test_thinker_parity.py and tests/test_nemotron.py run
the transformers parity suites with this kernel too.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omniret_jax.model.attention import block_size, blocked_attention, key_ranges

OUT_TOL, GRAD_TOL = 2e-6, 1e-5


def _reference(q, k, v, segments, causal):
    seg = jnp.asarray(segments)
    mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] != 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)


def _qkv(b, t, hq, hkv, d=16, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(b, t, h, d)), dtype) for h in (hq, hkv, hkv))


def _segments(b, t, kind, seed=0):
    rng = np.random.default_rng(seed + 1)
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        n = int(rng.integers(1, t + 1)) if r else t    # row 0 full, the others padded
        if kind == "right":
            seg[r, :n] = 1
        elif kind == "left":
            seg[r, t - n:] = 1
        else:  # packed: back-to-back sequences of random lengths, then padding
            at, sid = 0, 1
            while at < n:
                m = int(rng.integers(1, max(2, n // 2)))
                seg[r, at:min(n, at + m)] = sid
                at, sid = at + m, sid + 1
    return seg


def _check(q, k, v, seg, causal, block=None, out_tol=OUT_TOL, grad_tol=GRAD_TOL, span=None):
    valid = jnp.asarray(seg != 0)[:, :, None, None]
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))   # a loss that weighs every output

    def loss(f):
        return lambda q, k, v: jnp.sum(jnp.where(valid, f(q, k, v), 0).astype(jnp.float32) * w)

    ours = lambda q, k, v: blocked_attention(q, k, v, seg, causal=causal, block=block, span=span)  # noqa: E731
    ref = lambda q, k, v: _reference(q, k, v, seg, causal)  # noqa: E731
    got, want = jax.jit(ours)(q, k, v), jax.jit(ref)(q, k, v)
    err = float(jnp.max(jnp.abs(jnp.where(valid, got.astype(jnp.float32) - want.astype(jnp.float32), 0))))
    assert err <= out_tol, f"output max abs error {err:.2e}"
    assert float(jnp.max(jnp.abs(jnp.where(valid, 0, got.astype(jnp.float32))))) == 0.0, "padding queries not 0"
    g_ours = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
    g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", g_ours, g_ref):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        rel = np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)
        assert rel <= grad_tol, f"d{name}: relative error {rel:.2e}"
    return err


@pytest.fixture(autouse=True)
def _highest():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kind", ["right", "left", "packed"])
def test_matches_xla(causal, kind):
    q, k, v = _qkv(3, 77, 8, 2)                 # 77 tokens in blocks of 32: a short last block
    _check(q, k, v, _segments(3, 77, kind), causal, block=32)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (8, 2)])
def test_gqa_groups(hq, hkv):
    q, k, v = _qkv(2, 50, hq, hkv, seed=hq)
    _check(q, k, v, _segments(2, 50, "packed", seed=hq), True, block=16)


def test_one_block_row_and_default_block():
    q, k, v = _qkv(2, 9, 4, 2, d=8)
    _check(q, k, v, _segments(2, 9, "right"), True)
    assert block_size(9) == 128 and block_size(4096) == 256 and block_size(700) == 128


def test_bfloat16_inputs_keep_float32_statistics():
    q, k, v = _qkv(2, 64, 4, 2, dtype=jnp.bfloat16)
    got = blocked_attention(q, k, v, _segments(2, 64, "right"), causal=True, block=16)
    assert got.dtype == jnp.bfloat16
    _check(q, k, v, _segments(2, 64, "right"), True, block=16, out_tol=2e-2, grad_tol=2e-2)


def test_key_ranges_are_the_segments():
    seg = jnp.asarray([[0, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1]])
    lo, hi = key_ranges(seg, causal=False)
    np.testing.assert_array_equal(lo, [[0, 1, 1, 3, 3, 3, 0], [0] * 7])
    np.testing.assert_array_equal(hi, [[0, 3, 3, 6, 6, 6, 0], [7] * 7])
    lo, hi = key_ranges(seg, causal=True)
    np.testing.assert_array_equal(hi, [[0, 2, 3, 4, 5, 6, 0], list(range(1, 8))])


def test_bad_shapes_are_named():
    q, k, v = _qkv(1, 8, 3, 2)
    with pytest.raises(ValueError, match="not a multiple"):
        blocked_attention(q, k, v, np.ones((1, 8), np.int32), causal=True)


@pytest.mark.parametrize("causal", [True, False])
def test_span_reads_only_keys_in_reach(causal):
    """Segments of at most 10 tokens (windows, packed captions): with span=10 each block of 16
    queries reads 25 keys at most, and the result is still exact."""
    t = 70
    seg = np.zeros((2, t), np.int32)
    seg[0, :64] = np.repeat(np.arange(1, 9), 8)          # windows of 8
    seg[1, :] = np.repeat(np.arange(1, 8), 10)           # windows of 10, no padding
    q, k, v = _qkv(2, t, 4, 2, seed=5)
    _check(q, k, v, seg, causal, block=16, span=10)
    full = blocked_attention(q, k, v, seg, causal=causal, block=16)
    # a span shorter than a segment is a broken promise: the result changes, so the bound matters
    short = blocked_attention(q, k, v, seg, causal=causal, block=16, span=3)
    assert float(jnp.max(jnp.abs(short - full))) > 1e-3


def test_rope_backward_is_the_inverse_rotation():
    """apply_rope's hand-written backward equals autodiff of HF's formula (x*cos + rotate_half(x)*sin)."""
    from omniret_jax.model.layers import apply_rope, rotate_half
    x = jax.random.normal(jax.random.key(0), (2, 7, 3, 12))
    ang = jnp.arange(7 * 12, dtype=jnp.float32).reshape(1, 7, 1, 12) * 0.37
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    w = jax.random.normal(jax.random.key(1), x.shape)
    ours = jax.grad(lambda x: jnp.sum(apply_rope(x, cos, sin) * w))(x)
    ref = jax.grad(lambda x: jnp.sum((x * cos + rotate_half(x) * sin) * w))(x)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos, sin)), np.asarray(x * cos + rotate_half(x) * sin),
                               atol=0, rtol=0)


def test_rows_sharded_over_a_mesh_stay_local():
    """With the batch sharded over a data mesh, the kernel's step compiles without any
    collective and keeps the batch sharding (a loop over rows would gather them everywhere)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    n = len(jax.devices())
    if n < 2:
        pytest.skip("needs several (virtual) devices")
    sh = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    q, k, _ = _qkv(n, 40, 4, 2)
    q, k = jax.device_put(q, sh), jax.device_put(k, sh)
    seg = jax.device_put(jnp.asarray(_segments(n, 40, "packed")), sh)
    step = jax.jit(jax.grad(lambda q, k: jnp.sum(blocked_attention(q, k, k, seg, causal=True, block=16))))
    hlo = step.lower(q, k).compile().as_text()
    for op in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
        assert op not in hlo, op
    assert step(q, k).sharding.spec == PartitionSpec("data")
