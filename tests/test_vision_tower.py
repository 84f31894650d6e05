"""Parity of omniret_jax.model.vision against transformers' Qwen2_5OmniVisionEncoder.

Reference: ``tiny_hf_thinker().model.visual`` (hidden 32, 2 heads, depth 3, block 1 full
attention, 112 px windows = 4x4 merge units) called as ``visual(pixel_values, grid_thw=...)``;
we compare its ``pooler_output``. Tolerance: float32 max abs error <= 1e-4; bfloat16 compute
cosine >= 0.999 against the float32 reference.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers.vision_utils import (
    get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index,
)

from omniret_jax.config import VisionConfig
from omniret_jax.data.vision_layout import vision_layout
from omniret_jax.model.vision import VisionTower
from tests.hf_tiny import load_torch_weights, tiny_hf_thinker

TOL = 1e-4
PATCH_DIM = 3 * 2 * 14 * 14
QK_SCALE = 15.0  # applied to the reference's q/k weights: attention logits of order 1-10


def jax_config(hf_vision) -> VisionConfig:
    c = hf_vision.config
    return VisionConfig(
        depth=c.depth, hidden_size=c.hidden_size, hidden_act=c.hidden_act,
        intermediate_size=c.intermediate_size, num_heads=c.num_heads, in_channels=c.in_channels,
        patch_size=c.patch_size, spatial_merge_size=c.spatial_merge_size,
        temporal_patch_size=c.temporal_patch_size, window_size=c.window_size,
        out_hidden_size=c.out_hidden_size, fullatt_block_indexes=tuple(c.fullatt_block_indexes),
        rope_theta=float(c.rope_parameters["rope_theta"]),
    )


@functools.lru_cache(maxsize=None)
def reference(act: str = "silu", kernel: str | None = None):
    """(torch visual, float32 tower, jitted forward) for one activation and attention kernel
    (None: jax.nn with segment masks; "blocked": omniret_jax.model.attention)."""
    visual = tiny_hf_thinker(vision_act=act).model.visual
    with torch.no_grad():  # default init gives near-uniform attention that hides rope/mask bugs
        for blk in visual.blocks:
            blk.attn.q.weight.mul_(QK_SCALE)
            blk.attn.k.weight.mul_(QK_SCALE)
    tower = VisionTower(dataclasses.replace(jax_config(visual), attention_impl=kernel), rngs=nnx.Rngs(0))
    load_torch_weights(tower, visual)
    return visual, tower, nnx.jit(lambda m, x, lay: m(x, lay))


def torch_run(visual, pixels: np.ndarray, grids) -> np.ndarray:
    with torch.no_grad():
        out = visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grids, dtype=torch.long))
    return out.pooler_output.numpy()


def random_patches(rng, grids) -> np.ndarray:
    n = sum(t * h * w for t, h, w in grids)
    return rng.standard_normal((n, PATCH_DIM)).astype(np.float32)


def pad_batch(rng, samples, max_patches):
    """Pad each sample's patches to max_patches with large noise (must not leak)."""
    out = 10.0 * rng.standard_normal((len(samples), max_patches, PATCH_DIM)).astype(np.float32)
    for i, x in enumerate(samples):
        out[i, : len(x)] = x
    return out


def max_err(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("act,grids", [
    ("silu", [(1, 8, 8)]),              # one image, exactly one 4x4-unit window
    ("silu", [(2, 8, 12)]),             # video, 2 temporal steps, 2 windows per step
    ("silu", [(1, 10, 6)]),             # ragged windows (5x3 units)
    ("silu", [(1, 16, 20)]),            # 2x3 windows, ragged on both axes
    ("silu", [(1, 8, 8), (1, 10, 6)]),  # one sample holding two images
    ("quick_gelu", [(2, 8, 12), (1, 10, 6)]),
])
@pytest.mark.parametrize("kernel", [None, "blocked"])
def test_single_sample_matches_reference(act, grids, kernel):
    visual, tower, fwd = reference(act, kernel)
    rng = np.random.default_rng(1)
    x = random_patches(rng, grids)
    want = torch_run(visual, x, grids)
    pad = 16  # a few padded merge units at the tail
    lay = vision_layout([grids], len(x) + pad, tower.cfg)
    feats, valid = fwd(tower, jnp.asarray(pad_batch(rng, [x], len(x) + pad)), lay)
    n = len(want)
    assert feats.shape == (1, (len(x) + pad) // 4, 64)
    assert np.asarray(valid[0]).tolist() == [True] * n + [False] * (pad // 4)
    err = max_err(feats[0, :n], want)
    print(f"\n{act} {grids}: max abs err {err:.2e}")
    assert err <= TOL, err
    assert np.all(np.asarray(feats[0, n:]) == 0)


@pytest.mark.parametrize("kernel", [None, "blocked"])
def test_padded_batch_matches_each_sample_alone(kernel):
    visual, tower, fwd = reference("silu", kernel)
    rng = np.random.default_rng(2)
    samples = [[(1, 8, 8)], [(2, 8, 12), (1, 10, 6)], [(1, 4, 4)], []]
    xs = [random_patches(rng, g) if g else np.zeros((0, PATCH_DIM), np.float32) for g in samples]
    max_p = 272  # > the largest sample (252)
    lay = vision_layout(samples, max_p, tower.cfg)
    feats, valid = fwd(tower, jnp.asarray(pad_batch(rng, xs, max_p)), lay)
    feats, valid = np.asarray(feats), np.asarray(valid)
    errs = []
    for i, (g, x) in enumerate(zip(samples, xs)):
        n = len(x) // 4
        assert valid[i].sum() == n and valid[i, :n].all()
        assert np.all(feats[i, n:] == 0), f"sample {i}: padded units not zero"
        if g:
            errs.append(max_err(feats[i, :n], torch_run(visual, x, g)))
    print(f"\npadded batch per-sample max abs err: {[f'{e:.2e}' for e in errs]}")
    assert max(errs) <= TOL, errs


@pytest.mark.parametrize("grids", [
    [(1, 8, 8)], [(2, 8, 12)], [(1, 10, 6)], [(3, 16, 20), (1, 10, 6), (1, 2, 2)], [(1, 18, 34)],
])
def test_layout_matches_transformers(grids):
    visual, tower, _ = reference()
    cfg = tower.cfg
    g = torch.tensor(grids, dtype=torch.long)
    win_idx, cu_win = get_vision_window_index(g, cfg.spatial_merge_size, cfg.window_size, cfg.patch_size)
    pos = get_vision_position_ids(g, cfg.spatial_merge_size)
    cu_full, _ = get_vision_attention_seqlens(g, visual.config)
    win_idx, pos = win_idx.numpy(), pos.numpy()
    pos_windowed = pos.reshape(-1, 4, 2)[win_idx].reshape(-1, 2)

    n = len(pos)
    lay = vision_layout([grids], n + 8, cfg)
    u = n // 4
    np.testing.assert_array_equal(lay.window_index[0, :u], win_idx)
    np.testing.assert_array_equal(lay.window_index[0, u:], np.arange(u, u + 2))
    np.testing.assert_array_equal(lay.inverse_index[0, :u], np.argsort(win_idx))
    np.testing.assert_array_equal(lay.position_ids[0, :n], pos_windowed)

    def bounds(seg):  # segment ids -> cumulative boundaries, like cu_seqlens
        change = np.flatnonzero(np.diff(seg)) + 1
        assert len(np.unique(seg)) == len(change) + 1, "a segment id is reused non-contiguously"
        return np.concatenate([[0], change, [len(seg)]])

    np.testing.assert_array_equal(bounds(lay.full_segments[0, :n]), cu_full.numpy())
    np.testing.assert_array_equal(bounds(lay.window_segments[0, :n]), cu_win.numpy())
    assert np.all(lay.full_segments[0, n:] == -1) and np.all(lay.window_segments[0, n:] == -1)
    assert lay.valid[0].tolist() == [True] * n + [False] * 8


def test_bfloat16_compute_close_to_reference():
    visual, tower, _ = reference()
    grids = [(2, 8, 12), (1, 10, 6)]
    rng = np.random.default_rng(3)
    x = random_patches(rng, grids)
    want = torch_run(visual, x, grids)
    tower16 = VisionTower(tower.cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.float32)
    load_torch_weights(tower16, visual)
    lay = vision_layout([grids], len(x), tower.cfg)
    feats, _ = nnx.jit(lambda m, a, l: m(a, l))(tower16, jnp.asarray(x[None]), lay)
    assert feats.dtype == jnp.bfloat16
    got = np.asarray(feats[0], np.float64)
    cos = float(got.ravel() @ want.ravel() / (np.linalg.norm(got) * np.linalg.norm(want)))
    rows = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    print(f"\nbf16 compute: cosine {cos:.6f}, worst row cosine {rows.min():.6f}, "
          f"max abs err {max_err(got, want):.2e}")
    assert cos >= 0.999 and rows.min() >= 0.99, (cos, rows.min())


def test_bad_inputs_raise():
    cfg = reference()[1].cfg
    with pytest.raises(ValueError, match="max_patches=64"):
        vision_layout([[(1, 8, 8)], [(1, 8, 10)]], 64, cfg)   # second sample needs 80
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size"):
        vision_layout([[(1, 8, 7)]], 64, cfg)
    with pytest.raises(ValueError, match="multiple of spatial_merge_size"):
        vision_layout([[(1, 2, 2)]], 66, cfg)
    with pytest.raises(ValueError, match="three integers"):
        vision_layout([[(8, 8)]], 64, cfg)
    with pytest.raises(ValueError, match="empty"):
        vision_layout([], 64, cfg)
    tower = reference()[1]
    lay = vision_layout([[(1, 8, 8)]], 64, cfg)
    with pytest.raises(ValueError, match="patches shape"):
        tower(jnp.zeros((1, 68, PATCH_DIM)), lay)


def test_banded_window_attention_equals_dense():
    """Window attention block by block (cost P x 3W) equals the dense masked form (P x P) exactly."""
    from omniret_jax.model.layers import segment_attention

    rng = np.random.default_rng(5)
    band = 16
    # Contiguous windows of 1..16 tokens (ragged, as at frame edges), then padding (-1).
    sizes = rng.integers(1, band + 1, size=40)
    seg = np.concatenate([np.full(n, i) for i, n in enumerate(sizes)])[:300]
    seg = np.concatenate([seg, np.full(301 - len(seg), -1)])[None]          # S = 301, not a multiple
    q, k, v = (jnp.asarray(rng.standard_normal((1, seg.shape[1], 2, 8)), jnp.float32) for _ in range(3))
    dense = segment_attention(q, k, v, jnp.asarray(seg))
    banded = segment_attention(q, k, v, jnp.asarray(seg), band=band)
    real = seg[0] >= 0
    err = max_err(np.asarray(banded)[0, real], np.asarray(dense)[0, real])
    print(f"banded vs dense window attention: max abs err {err:.1e}")
    assert err <= 1e-6


def test_full_attention_blocks_past_the_depth_are_ignored_like_transformers(caplog):
    """transformers accepts fullatt_block_indexes beyond the depth and never hits them; so do we,
    with a warning naming them, and the outputs equal the reference's."""
    visual, tower, fwd = reference()
    cfg = dataclasses.replace(tower.cfg, fullatt_block_indexes=(1, 7, 31))
    with caplog.at_level(logging.WARNING, logger="omniret_jax.model.vision"):
        wide = VisionTower(cfg, rngs=nnx.Rngs(0))
    assert "[7, 31] are outside depth=3" in caplog.text, caplog.text
    assert wide.full_attention == frozenset({1})
    load_torch_weights(wide, visual)
    grids = [(2, 8, 12)]
    x = random_patches(np.random.default_rng(4), grids)
    saved = list(visual.fullatt_block_indexes)
    visual.fullatt_block_indexes = [1, 7, 31]
    try:
        want = torch_run(visual, x, grids)
    finally:
        visual.fullatt_block_indexes = saved
    feats, _ = fwd(wide, jnp.asarray(x[None]), vision_layout([grids], len(x), cfg))
    err = max_err(feats[0], want)
    print(f"\nfullatt (1, 7, 31) at depth 3: max abs err {err:.2e} against transformers")
    assert err <= TOL
