"""BEATs audio encoder (microsoft unilm, iter3+ architecture) in Flax NNX.

WAVE runs a frozen BEATs beside the Whisper tower. This module takes the
normalised kaldi fbank (computed in ``omniret_jax.data.features``), not the
waveform, and returns one 768-d token per 16x16 time-frequency patch, ordered
time-major (token ``t * 8 + f`` for 128 mel bins), i.e. ~50 tokens per second.

Parameter paths equal the unilm state-dict keys (WAVE stores them under
``beats.``), with these checkpoint details:

- ``encoder.pos_conv.0`` is weight-normalised (``dim=2``); the module keeps
  ``weight_g``/``weight_v`` as parameters and builds the kernel in the forward.
  A plain ``weight`` or torch's ``parametrizations.weight.original0/1`` is
  rewritten to ``weight_g``/``weight_v`` by :func:`canonical_state`.
- unilm ties every layer's ``self_attn.relative_attention_bias`` to layer 0's;
  the checkpoint repeats it under every layer. Only layer 0 holds it here
  (:func:`tied_keys` lists the copies for a converter writing torch layout).
- ``predictor.*`` (the AudioSet head of fine-tuned checkpoints) is not used for
  features and is not a parameter here.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniret_jax.convert.keymap import expected_hf_shape, hf_to_flax_array, is_kernel
from omniret_jax.model.layers import (AUDIO_EMBED, AUDIO_MLP, CONV, HEADS, LayerNorm, Linear,
                                      activation)


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    """Field names follow the unilm ``BEATsConfig``; defaults are BEATs iter3+."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_class: int = 527

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"BEATsConfig: {msg}")

        for name in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                     "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        need(not self.layer_norm_first,
             "layer_norm_first=True (pre-LN BEATs) is not supported; iter3+ is post-LN")
        need(self.activation_fn in ("gelu", "relu"),
             f"activation_fn={self.activation_fn!r} is not supported (gelu, relu)")
        need(self.encoder_embed_dim % self.encoder_attention_heads == 0,
             f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
             f"encoder_attention_heads={self.encoder_attention_heads}")
        need(self.encoder_embed_dim % self.conv_pos_groups == 0,
             f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
             f"conv_pos_groups={self.conv_pos_groups}")
        if self.relative_position_embedding:
            half = self.num_buckets // 2
            need(half >= 2 and self.max_distance > half // 2,
                 f"num_buckets={self.num_buckets} / max_distance={self.max_distance} give an empty "
                 "log-spaced bucket range")
        need(not self.gru_rel_pos or self.relative_position_embedding,
             "gru_rel_pos=True needs relative_position_embedding=True")

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @property
    def deep_norm_alpha(self) -> float:
        return math.pow(2 * self.encoder_layers, 0.25) if self.deep_norm else 1.0

    @classmethod
    def from_unilm_dict(cls, cfg: Mapping[str, Any]) -> "BEATsConfig":
        """Build from the ``cfg`` entry of a unilm checkpoint.

        Every architecture key must be present (unilm's own defaults differ from
        iter3+, so a silent default would change the model); dropout and
        gradient-decay keys are accepted and ignored; anything else is an error.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"BEATs cfg must be a dict, got {type(cfg).__name__}")
        optional = {"predictor_class"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields - _TRAINING_ONLY_KEYS)
        if unknown:
            raise ValueError(f"unknown BEATs cfg keys {unknown}")
        missing = sorted(fields - optional - set(cfg))
        if missing:
            raise ValueError(f"BEATs cfg lacks keys {missing}")
        return cls(**{k: v for k, v in cfg.items() if k in fields})


# unilm cfg entries that only matter for training.
_TRAINING_ONLY_KEYS = frozenset({
    "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
    "layer_wise_gradient_decay_ratio", "predictor_dropout",
})


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

    def __call__(self, fbank: jax.Array, padding_mask: jax.Array | None = None
                 ) -> tuple[jax.Array, jax.Array]:
        """fbank: [B, T, F], already ``(fbank - 15.41663) / (2 * 6.55582)``; T and F multiples of the
        patch size (crop T first: the torch conv drops a partial last patch).
        padding_mask: [B, T] bool, True = padded frame (unilm convention); None = all valid.

        Returns tokens [B, N, C] and token_mask [B, N] (True = valid token). A token is valid
        when all frames of its time patch are valid, so the valid tokens equal those of the
        unpadded clip run alone; padded tokens are set to zero.
        """
        p = self.cfg.input_patch_size
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


# ----------------------------------------------------------------------------- checkpoints

def tied_keys(cfg: BEATsConfig) -> dict[str, str]:
    """Checkpoint keys that are copies of another key (unilm's shared relative bias table)."""
    if not cfg.relative_position_embedding:
        return {}
    src = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    return {src.replace(".0.", f".{i}.", 1): src for i in range(1, cfg.encoder_layers)}


def _pos_conv_from_plain(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight-norm parameters (g, v) reproducing a plain conv weight: v = w, g = ||w|| per kernel tap."""
    w = np.asarray(w, np.float32)
    return np.sqrt(np.sum(w * w, axis=(0, 1), keepdims=True)), w


def canonical_state(cfg: BEATsConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Map a unilm-layout state dict onto exactly this module's parameter keys.

    Rewrites the pos-conv weight-norm variants, checks and drops tied copies of the
    relative bias table, drops ``predictor.*`` of fine-tuned checkpoints. Missing or
    unexpected keys raise ValueError naming them.
    """
    out = dict(weights)
    pc = "encoder.pos_conv.0."
    if pc + "parametrizations.weight.original0" in out:
        out[pc + "weight_g"] = out.pop(pc + "parametrizations.weight.original0")
        out[pc + "weight_v"] = out.pop(pc + "parametrizations.weight.original1")
    if pc + "weight" in out:
        if pc + "weight_g" in out or pc + "weight_v" in out:
            raise ValueError(f"checkpoint has both {pc}weight and {pc}weight_g/weight_v")
        out[pc + "weight_g"], out[pc + "weight_v"] = _pos_conv_from_plain(out.pop(pc + "weight"))
    for copy, src in tied_keys(cfg).items():
        if copy in out:
            if src in out and not np.array_equal(np.asarray(out[copy]), np.asarray(out[src])):
                raise ValueError(f"{copy} differs from {src}; BEATs ties them, so they must be equal")
            del out[copy]
    if cfg.finetuned_model:
        for key in ("predictor.weight", "predictor.bias"):
            out.pop(key, None)
    return out


def load_weights(model: BEATs, weights: Mapping[str, np.ndarray], prefix: str = "") -> None:
    """Copy a unilm-layout state dict (keys under ``prefix``) into ``model`` in place.

    Follows the naming contract: path with final ``kernel`` -> ``weight`` (transposed).
    Raises ValueError for missing keys, unexpected keys or shape mismatches.
    """
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    state = canonical_state(model.cfg, sub)
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    # The converter's leaf rule (a final ``kernel`` is torch's ``weight`` transposed).
    expected = {".".join([*map(str, path[:-1]), "weight" if is_kernel(path) else str(path[-1])]): (path, var)
                for path, var in flat}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"BEATs weights do not match the config: missing {missing}, unexpected "
                         f"{[prefix + k for k in unexpected]}")
    updates = []
    for key, (path, var) in expected.items():
        got = np.asarray(state[key])
        want = expected_hf_shape(path, tuple(var.shape))
        if got.shape != want:
            raise ValueError(f"{prefix}{key}: checkpoint shape {got.shape} does not fit the config (expects {want})")
        updates.append((path, var.replace(jnp.asarray(hf_to_flax_array(path, got), var.dtype))))
    nnx.update(model, nnx.from_flat_state(updates))


def load_unilm_checkpoint(path: str | Path) -> tuple[BEATsConfig, dict[str, np.ndarray]]:
    """Read a unilm BEATs ``.pt`` (a dict with ``cfg`` and ``model``) without running pickled code."""
    import torch  # the reference framework is only needed to read the .pt file

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"cfg", "model"} <= set(ckpt):
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a unilm BEATs checkpoint dict with 'cfg' and 'model', got {got}")
    cfg = BEATsConfig.from_unilm_dict(ckpt["cfg"])
    weights = {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
               for k, v in ckpt["model"].items()}
    return cfg, weights
