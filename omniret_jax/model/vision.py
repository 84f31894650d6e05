"""Qwen2.5-Omni vision tower (the Qwen2.5-VL ViT) with static shapes.

The PyTorch tower packs every image/video of a batch into one ragged sequence
and attends over ``cu_seqlens`` slices. Here each *sample* is one row of a
batch: its patches (all of its images and video clips, in order) are
zero-padded to a fixed ``P`` and every data-dependent index (window
permutation, 2-D rotary positions, attention segments) is computed on the
host by ``omniret_jax.data.vision_layout`` into a ``VisionLayout``. Attention is dense within the row and masked
by segment-id equality, which is exactly the block-diagonal structure of
``cu_seqlens``; padded rows attend to nothing and are never attended to.

Token order follows the reference: patches arrive in the processor's order
(per frame, 2x2 merge blocks contiguous), are regrouped into windows of
``window_size`` pixels for the blocks, merged, and returned in the original
order so the thinker can scatter them into placeholder tokens in sequence.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float

from omniret_jax.config import VisionConfig
from omniret_jax.inputs import Arr, VisionLayout
from omniret_jax.model.layers import (
    CONV, EMBED, VISION_EMBED, VISION_MLP, GatedMLP, Linear, RMSNorm, normal_init,
    apply_rope, segment_attention,
)

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- modules

class PatchConv3d(nnx.Module):
    """Conv3d with stride == kernel, i.e. one matmul per flattened (C, Tp, p, p) patch.

    The weight keeps torch's (out, C, Tp, p, p) layout so checkpoints map 1:1.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        shape = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.weight = nnx.Param(normal_init(rngs, shape, 0.02, param_dtype),
                                axes=(VISION_EMBED, CONV, None, None, None))

    def __call__(self, patches: jax.Array) -> jax.Array:
        w = self.weight[...]
        w = w.reshape(w.shape[0], -1).astype(self.dtype)
        return patches.astype(self.dtype) @ w.T


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.proj = PatchConv3d(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, patches: jax.Array) -> jax.Array:
        return self.proj(patches)


def _rotary(position_ids: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Axial 2-D rope: a quarter of head_dim frequencies per axis, (h, w) laid twice."""
    quarter = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq        # [B, P, 2, D/4]
    freqs = freqs.reshape(*freqs.shape[:-2], -1)                             # (h..., w...)
    emb = jnp.concatenate([freqs, freqs], axis=-1)                           # [B, P, D]
    return jnp.cos(emb), jnp.sin(emb)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        dim = cfg.hidden_size
        if dim % cfg.num_heads:
            raise ValueError(f"vision hidden_size={dim} not divisible by num_heads={cfg.num_heads}")
        self.num_heads, self.head_dim = cfg.num_heads, dim // cfg.num_heads
        self.implementation = cfg.attention_impl
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
        self.q = Linear(dim, dim, axes=(VISION_EMBED, VISION_MLP), **kw)
        self.k = Linear(dim, dim, axes=(VISION_EMBED, VISION_MLP), **kw)
        self.v = Linear(dim, dim, axes=(VISION_EMBED, VISION_MLP), **kw)
        self.proj = Linear(dim, dim, axes=(VISION_MLP, VISION_EMBED), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: jax.Array,
                 band: int | None) -> jax.Array:
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, n, self.num_heads, self.head_dim)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        # Rotary in float32 like the reference, then back to the compute dtype.
        c, s = cos[:, :, None, :], sin[:, :, None, :]
        rope = lambda y: apply_rope(y.astype(jnp.float32), c, s).astype(y.dtype)
        out = segment_attention(rope(q), rope(k), v, segments, band=band, implementation=self.implementation)
        return self.proj(out.reshape(b, n, -1))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        self.attn = VisionAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, use_bias=True,
                            axes_in=(VISION_EMBED, VISION_MLP), axes_out=(VISION_MLP, VISION_EMBED),
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, segments, band):
        x = x + self.attn(self.norm1(x), cos, sin, segments, band)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then concatenate each merge unit's patches and project to the LLM width."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6, param_dtype=param_dtype)
        width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=True)
        # Keys "0"/"2" mirror torch's nn.Sequential(Linear, GELU, Linear).
        self.mlp = nnx.Dict({"0": Linear(width, width, axes=(VISION_EMBED, VISION_MLP), **kw),
                             "2": Linear(width, cfg.out_hidden_size, axes=(VISION_MLP, EMBED), **kw)})
        self.width = width

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x)
        x = x.reshape(x.shape[0], -1, self.width)
        return self.mlp["2"](jax.nn.gelu(self.mlp["0"](x), approximate=False))


class VisionTower(nnx.Module):
    """patches [B, P, C*Tp*p*p] + VisionLayout -> (features [B, P/m^2, out], valid [B, P/m^2]).

    Features are in the original (processor) order; padded units are zero.
    """

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        # transformers tests `layer_num in fullatt_block_indexes` per block, so an entry past the
        # depth (a truncated or hand-edited config) is simply never hit: ignore it likewise, loudly.
        outside = [i for i in cfg.fullatt_block_indexes if not 0 <= i < cfg.depth]
        if outside:
            log.warning("vision config: fullatt_block_indexes %s are outside depth=%d and are ignored (as transformers "
                        "does); full attention runs in blocks %s", outside, cfg.depth,
                        sorted(i for i in cfg.fullatt_block_indexes if 0 <= i < cfg.depth))
        self.full_attention = frozenset(i for i in cfg.fullatt_block_indexes if 0 <= i < cfg.depth)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.blocks = nnx.List([VisionBlock(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def _check(self, patches, layout: VisionLayout) -> None:
        cfg = self.cfg
        feat = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
        b, p = layout.valid.shape
        if patches.ndim != 3 or patches.shape != (b, p, feat):
            raise ValueError(f"patches shape {tuple(patches.shape)} does not match layout "
                             f"(B={b}, P={p}) and patch features {feat}: expected {(b, p, feat)}")

    def __call__(self, patches: Float[Arr, "b p f"], layout: VisionLayout
                 ) -> tuple[Float[Array, "b u d"], Bool[Array, "b u"]]:
        self._check(patches, layout)
        patches, layout = jnp.asarray(patches), jax.tree.map(jnp.asarray, layout)
        cfg = self.cfg
        unit = cfg.spatial_merge_size ** 2
        b, p, _ = patches.shape
        x = self.patch_embed(patches)
        # Regroup merge units into window order (units move as whole m*m patch blocks).
        x = x.reshape(b, p // unit, unit, -1)
        x = jnp.take_along_axis(x, layout.window_index[:, :, None, None], axis=1).reshape(b, p, -1)
        cos, sin = _rotary(layout.position_ids, cfg.hidden_size // cfg.num_heads, cfg.rope_theta)

        valid = layout.valid
        # Windows are contiguous runs of at most window**2 patches in window order, so window
        # attention runs block by block (cost P x window, not P x P); the full-attention blocks
        # attend within each frame of each sample. Padding (segment -1) is never a key and its
        # own rows are discarded.
        window = (cfg.window_size // cfg.patch_size) ** 2
        for i, block in enumerate(self.blocks):
            if i in self.full_attention:
                x = block(x, cos, sin, layout.full_segments, None)
            else:
                x = block(x, cos, sin, layout.window_segments, window)

        merged = self.merger(x)                                                  # window order
        merged = jnp.take_along_axis(merged, layout.inverse_index[:, :, None], axis=1)
        merged_valid = valid.reshape(b, -1, unit)[..., 0]
        return jnp.where(merged_valid[..., None], merged, 0), merged_valid
