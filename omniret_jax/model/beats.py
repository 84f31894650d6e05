"""BEATs audio encoder (microsoft unilm, iter3+ architecture) in Flax NNX.

WAVE runs a frozen BEATs beside the Whisper tower. This module takes the
normalised kaldi fbank (computed in ``omniret_jax.data.features``), not the
waveform, and returns one 768-d token per 16x16 time-frequency patch, ordered
time-major (token ``t * 8 + f`` for 128 mel bins), i.e. ~50 tokens per second.

Parameter paths equal the unilm state-dict keys (WAVE stores them under
``beats.``): ``encoder.pos_conv.0`` keeps weight norm's ``weight_g``/``weight_v``
and builds the kernel in the forward; only layer 0 holds the relative bias table
unilm ties across layers; ``predictor.*`` (the AudioSet head) is not a parameter.
``omniret_jax.convert.beats`` maps checkpoints onto these names.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float

from omniret_jax.config import BEATsConfig
from omniret_jax.inputs import Arr
from omniret_jax.model.layers import (AUDIO_EMBED, AUDIO_MLP, CONV, HEADS, LayerNorm, Linear,
                                      activation)


def relative_position_buckets(cfg: BEATsConfig, length: int) -> np.ndarray:
    """Bucket of each key-minus-query offset ``-(length-1) .. length-1`` (unilm, bidirectional).

    Computed on the host in float32 like the reference (log then truncation), so
    bucket edges match it exactly.
    """
    half = cfg.num_buckets // 2
    max_exact = half // 2
    rel = np.arange(-(length - 1), length, dtype=np.int64)
    base = np.where(rel > 0, half, 0)
    dist = np.abs(rel)
    far = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact))
    far = far / np.float32(math.log(cfg.max_distance / max_exact)) * np.float32(half - max_exact)
    far = np.minimum(max_exact + far.astype(np.int64), half - 1)
    return (base + np.where(dist < max_exact, dist, far)).astype(np.int32)


class PatchEmbedding(nnx.Module):
    """Conv2d(1, embed_dim, p, stride p) on [T, F], as a reshape and a matmul."""

    def __init__(self, cfg: BEATsConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        p = cfg.input_patch_size
        self.patch, self.dtype = p, dtype
        std = math.sqrt(2.0 / (p * p + cfg.embed_dim))
        w = jax.random.normal(rngs.params(), (cfg.embed_dim, 1, p, p), jnp.float32) * std
        self.weight = nnx.Param(w.astype(param_dtype), axes=(CONV, None, None, None))
        self.bias = (nnx.Param(jnp.zeros((cfg.embed_dim,), param_dtype), axes=(CONV,))
                     if cfg.conv_bias else None)

    def __call__(self, fbank: jax.Array) -> jax.Array:
        b, t, f = fbank.shape
        p = self.patch
        x = fbank.astype(self.dtype).reshape(b, t // p, p, f // p, p)
        w = self.weight[...].astype(self.dtype)[:, 0]                     # (D, p_t, p_f)
        y = jnp.einsum("bipjq,dpq->bijd", x, w).reshape(b, (t // p) * (f // p), -1)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class PosConv(nnx.Module):
    """Grouped Conv1d with weight norm over dim 2, torch layout (out, in/groups, k)."""

    def __init__(self, cfg: BEATsConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        c, k = cfg.encoder_embed_dim, cfg.conv_pos
        self.kernel_size, self.groups, self.dtype = k, cfg.conv_pos_groups, dtype
        std = math.sqrt(4.0 / (k * c))
        v = jax.random.normal(rngs.params(), (c, c // self.groups, k), jnp.float32) * std
        self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(v * v, axis=(0, 1), keepdims=True)).astype(param_dtype),
                                  axes=(None, None, None))
        self.weight_v = nnx.Param(v.astype(param_dtype), axes=(AUDIO_EMBED, None, None))
        self.bias = nnx.Param(jnp.zeros((c,), param_dtype), axes=(AUDIO_EMBED,))

    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.weight_v[...].astype(jnp.float32)
        w = self.weight_g[...].astype(jnp.float32) * v * jax.lax.rsqrt(
            jnp.sum(v * v, axis=(0, 1), keepdims=True))
        k = self.kernel_size
        # torch pads k//2 on both sides and, for an even kernel, drops the last output step.
        right = k // 2 - (1 if k % 2 == 0 else 0)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), w.astype(self.dtype), window_strides=(1,), padding=[(k // 2, right)],
            dimension_numbers=("NWC", "OIW", "NWC"), feature_group_count=self.groups)
        return y + self.bias[...].astype(self.dtype)


class SelfAttention(nnx.Module):
    """unilm MultiheadAttention (self-attention only) with gated relative position bias."""

    def __init__(self, cfg: BEATsConfig, *, has_bias_table: bool, rngs: nnx.Rngs, dtype, param_dtype):
        c, h = cfg.encoder_embed_dim, cfg.encoder_attention_heads
        self.heads, self.head_dim, self.dtype = h, cfg.head_dim, dtype
        lin = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.k_proj = Linear(c, c, axes=(AUDIO_EMBED, HEADS), **lin)
        self.v_proj = Linear(c, c, axes=(AUDIO_EMBED, HEADS), **lin)
        self.q_proj = Linear(c, c, axes=(AUDIO_EMBED, HEADS), **lin)
        self.out_proj = Linear(c, c, axes=(HEADS, AUDIO_EMBED), **lin)
        self.grep_linear = (Linear(cfg.head_dim, 8, axes=(None, None), **lin) if cfg.gru_rel_pos else None)
        self.grep_a = (nnx.Param(jnp.ones((1, h, 1, 1), param_dtype), axes=(None, None, None, None))
                       if cfg.gru_rel_pos else None)
        self.relative_attention_bias = (
            _BiasTable(cfg, rngs=rngs, param_dtype=param_dtype) if has_bias_table else None)

    def __call__(self, x: jax.Array, key_valid: jax.Array, pos_bias: jax.Array | None) -> jax.Array:
        """x: [B, N, C]; key_valid: [B, N] bool; pos_bias: [H, N, N] float32 or None."""
        b, n, _ = x.shape
        split = lambda y: y.reshape(b, n, self.heads, self.head_dim)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * (self.head_dim ** -0.5)
        if pos_bias is not None:
            bias = pos_bias[None]
            if self.grep_linear is not None:
                # Per-query, per-head gate from the unscaled query (BEATs "gru_rel_pos").
                g = self.grep_linear(q).astype(jnp.float32).reshape(b, n, self.heads, 2, 4).sum(-1)
                g = jax.nn.sigmoid(jnp.transpose(g, (0, 2, 1, 3)))          # [B, H, N, 2]
                grep_a = self.grep_a[...].astype(jnp.float32)
                gate = g[..., :1] * (g[..., 1:] * grep_a - 1.0) + 2.0       # [B, H, N, 1]
                bias = gate * bias
            scores = scores + bias
        mask = key_valid[:, None, None, :]
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
        probs = jnp.where(mask, jax.nn.softmax(scores, axis=-1), 0.0)   # all-padded rows -> zeros
        out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, n, -1)
        return self.out_proj(out)


class _BiasTable(nnx.Module):
    """nn.Embedding(num_buckets, heads) of the relative position bias."""

    def __init__(self, cfg: BEATsConfig, *, rngs: nnx.Rngs, param_dtype):
        h, nb = cfg.encoder_attention_heads, cfg.num_buckets
        std = math.sqrt(2.0 / (nb + h))
        self.weight = nnx.Param((jax.random.normal(rngs.params(), (nb, h), jnp.float32) * std
                                 ).astype(param_dtype), axes=(None, None))


class EncoderLayer(nnx.Module):
    """Post-LN transformer layer; deep norm scales the residual by alpha = (2 L)^(1/4)."""

    def __init__(self, cfg: BEATsConfig, *, has_bias_table: bool, rngs: nnx.Rngs, dtype, param_dtype):
        c, f = cfg.encoder_embed_dim, cfg.encoder_ffn_embed_dim
        self.alpha = cfg.deep_norm_alpha
        self.act = activation(cfg.activation_fn)
        self.self_attn = SelfAttention(cfg, has_bias_table=has_bias_table, rngs=rngs, dtype=dtype,
                                       param_dtype=param_dtype)
        self.self_attn_layer_norm = LayerNorm(c, param_dtype=param_dtype)
        lin = dict(use_bias=True, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = Linear(c, f, axes=(AUDIO_EMBED, AUDIO_MLP), **lin)
        self.fc2 = Linear(f, c, axes=(AUDIO_MLP, AUDIO_EMBED), **lin)
        self.final_layer_norm = LayerNorm(c, param_dtype=param_dtype)

    def __call__(self, x, key_valid, pos_bias):
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, key_valid, pos_bias))
        return self.final_layer_norm(x * self.alpha + self.fc2(self.act(self.fc1(x))))


class Encoder(nnx.Module):
    def __init__(self, cfg: BEATsConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        # torch: nn.Sequential(weight-normed Conv1d, SamePad, GELU); only index 0 has parameters.
        self.pos_conv = nnx.Dict({"0": PosConv(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)})
        self.layers = nnx.List([
            EncoderLayer(cfg, has_bias_table=cfg.relative_position_embedding and i == 0, rngs=rngs,
                         dtype=dtype, param_dtype=param_dtype)
            for i in range(cfg.encoder_layers)])
        self.layer_norm = LayerNorm(cfg.encoder_embed_dim, param_dtype=param_dtype)

    def _position_bias(self, n: int) -> jax.Array:
        """[H, N, N] float32 bias from layer 0's table, shared by every layer (gated per layer)."""
        buckets = jnp.asarray(relative_position_buckets(self.cfg, n))          # [2N - 1]
        per_offset = jnp.take(self.layers[0].self_attn.relative_attention_bias.weight[...].astype(
            jnp.float32), buckets, axis=0)                                       # [2N - 1, H]
        pos = jnp.arange(n)
        offset = pos[None, :] - pos[:, None] + (n - 1)                           # key - query
        return jnp.transpose(jnp.take(per_offset, offset, axis=0), (2, 0, 1))

    def __call__(self, x: jax.Array, valid: jax.Array) -> jax.Array:
        x = jnp.where(valid[..., None], x, 0).astype(x.dtype)
        x = x + jax.nn.gelu(self.pos_conv["0"](x), approximate=False)
        x = self.layer_norm(x)
        pos_bias = self._position_bias(x.shape[1]) if self.cfg.relative_position_embedding else None
        for layer in self.layers:
            x = layer(x, valid, pos_bias)
        return x


class BEATs(nnx.Module):
    """BEATs feature extractor: normalised fbank [B, T, F] -> tokens [B, (T/p)(F/p), C]."""

    def __init__(self, cfg: BEATsConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm = LayerNorm(cfg.embed_dim, param_dtype=param_dtype)
        self.post_extract_proj = (
            Linear(cfg.embed_dim, cfg.encoder_embed_dim, use_bias=True, axes=(CONV, AUDIO_EMBED), rngs=rngs,
                   dtype=dtype, param_dtype=param_dtype)
            if cfg.embed_dim != cfg.encoder_embed_dim else None)
        self.encoder = Encoder(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, fbank: Float[Arr, "b t f"], padding_mask: Bool[Arr, "b t"] | None = None
                 ) -> tuple[Float[Array, "b n c"], Bool[Array, "b n"]]:
        """fbank: [B, T, F], already ``(fbank - 15.41663) / (2 * 6.55582)``; T and F multiples of the
        patch size (crop T first: the torch conv drops a partial last patch).
        padding_mask: [B, T] bool, True = padded frame (unilm convention); None = all valid.

        Returns tokens [B, N, C] and token_mask [B, N] (True = valid token). A token is valid
        when all frames of its time patch are valid, so the valid tokens equal those of the
        unpadded clip run alone; padded tokens are set to zero.
        """
        p = self.cfg.input_patch_size
        fbank = jnp.asarray(fbank)
        if fbank.ndim != 3 or fbank.shape[1] % p or fbank.shape[2] % p or fbank.shape[1] == 0:
            raise ValueError(f"fbank must be [B, T, F] with T, F non-zero multiples of {p}; "
                             f"got shape {fbank.shape}")
        b, t, f = fbank.shape
        if padding_mask is None:
            padding_mask = jnp.zeros((b, t), bool)
        if padding_mask.shape != (b, t):
            raise ValueError(f"padding_mask must be [B, T] = {(b, t)}, got {padding_mask.shape}")
        patch_valid = jnp.logical_not(padding_mask.reshape(b, t // p, p).any(-1))
        valid = jnp.repeat(patch_valid, f // p, axis=1)                           # [B, N]

        x = self.layer_norm(self.patch_embedding(fbank))
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        x = self.encoder(x, valid)
        return jnp.where(valid[..., None], x, 0).astype(x.dtype), valid
