"""The Qwen2 text decoder of the thinker: GQA with q/k/v bias, RMSNorm, SwiGLU, M-RoPE.

Returns the final (normed) output and the hidden state after every layer, in the
order of transformers' ``output_hidden_states``: entry 0 is the embedding, entries
1..L-1 the raw residual outputs, entry L the final-RMSNorm output. The WAVE fusion
head only needs the pooled token of each entry, so ``pool_index`` lets the caller
keep one position per layer instead of L full sequences.

``scan_layers`` (config ``model.scan_layers``) turns the layer list into one ``layers.Stacked``
layer run by ``lax.scan``: the same function, compiled once instead of L times (the 7B step's
compile time). Checkpoints, LoRA targeting and exports see the per-layer tree:
the factory stacks after loading and attaching adapters, and ``unscan_layers`` undoes it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from omniret_jax.config import TextConfig
from omniret_jax.inputs import Arr
from omniret_jax.model.layers import (
    EMBED, HEADS, KV_HEADS, MLP, VOCAB, Embed, GatedMLP, Linear, RMSNorm, Stacked, dot_product_attention, apply_rope,
)


def mrope_cos_sin(position_ids: jax.Array, cfg: TextConfig, dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, S, head_dim] for 3-axis positions [3, B, S].

    The rotary frequency bands are split by ``mrope_section`` (temporal, height,
    width); band group i takes its angle from position axis i. Angles are computed
    in float32 and cast to the activation dtype, like the reference.
    """
    dim = cfg.dim_per_head
    if sum(cfg.mrope_section) != dim // 2:
        raise ValueError(f"mrope_section {cfg.mrope_section} must sum to head_dim/2 = {dim // 2}")
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    # axis_of_band[j] in {0,1,2}: which position axis drives frequency band j.
    axis_of_band = np.concatenate([np.full(n, i % 3) for i, n in enumerate(cfg.mrope_section)])
    pos = position_ids.astype(jnp.float32)                         # [3, B, S]
    pos_per_band = jnp.take(pos, jnp.asarray(axis_of_band), axis=0)  # [dim/2, B, S]
    angles = jnp.moveaxis(pos_per_band, 0, -1) * jnp.asarray(inv_freq)  # [B, S, dim/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, hd = cfg.hidden_size, cfg.dim_per_head
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, self.num_heads * hd, use_bias=True, axes=(EMBED, HEADS), **kw)
        self.k_proj = Linear(d, self.num_kv_heads * hd, use_bias=True, axes=(EMBED, KV_HEADS), **kw)
        self.v_proj = Linear(d, self.num_kv_heads * hd, use_bias=True, axes=(EMBED, KV_HEADS), **kw)
        self.o_proj = Linear(self.num_heads * hd, d, use_bias=False, axes=(HEADS, EMBED), **kw)

    def __call__(self, x, cos, sin, mask: dict):
        b, s, _ = x.shape
        q = self.q_proj(x).reshape(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, s, self.num_kv_heads, self.head_dim)
        c, sn = cos[:, :, None, :], sin[:, :, None, :]
        q, k = apply_rope(q, c, sn), apply_rope(k, c, sn)
        out = dot_product_attention(q, k, v, **mask)
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden_size
        self.self_attn = Attention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.mlp = GatedMLP(d, cfg.intermediate_size, cfg.hidden_act, use_bias=False,
                            axes_in=(EMBED, MLP), axes_out=(MLP, EMBED),
                            rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.post_attention_layernorm = RMSNorm(d, eps=cfg.rms_norm_eps, param_dtype=param_dtype)

    def __call__(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


def attention_mask_args(attention_mask: jax.Array, cfg: TextConfig, *, packed: bool) -> dict:
    """The mask of every decoder layer, in the cheapest form for the attention kernel.

    ``attention_mask`` [R, S]: 0 = padding, else the token's segment id (1 in an unpacked row).
    Packed rows attend within their own segment (block-diagonal); unpacked rows take a key
    mask [R, 1, 1, S], or with the cuDNN kernel their valid lengths (rows right-padded); the
    blocked kernel takes the segment ids themselves, packed or not.
    Causal (the Qwen thinker) or bidirectional (``TextConfig.causal`` False) within a segment.
    """
    impl = cfg.attention_impl
    if impl == "blocked":
        return dict(segments=attention_mask, causal=cfg.causal, implementation=impl)
    if packed:
        seg = attention_mask
        mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] > 0)
        return dict(mask=mask, causal=cfg.causal, implementation=impl)
    if impl == "cudnn":
        return dict(lengths=jnp.sum(attention_mask > 0, axis=-1).astype(jnp.int32), causal=cfg.causal,
                    implementation=impl)
    return dict(mask=(attention_mask > 0)[:, None, None, :], causal=cfg.causal, implementation=impl)


# Rematerialisation of each decoder layer in the backward pass.
REMAT_POLICIES = {
    "none": None,  # keep every activation
    "full": None,  # keep only layer inputs, recompute the rest
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep matmul outputs
}


def remat_name(remat: bool | str) -> str:
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected one of {sorted(REMAT_POLICIES)}")
    return name


def scan_layers(model: nnx.Module, *, free: bool = False) -> nnx.Module:
    """Every TextModel of ``model`` with its decoder layers stacked for a scan, in place. ``free``
    deletes the per-layer arrays as they are stacked (at most one variable held twice): only for
    a model whose arrays nothing else shares (``nnx.clone`` shares them)."""
    for text in [n for _, n in nnx.iter_graph(model) if isinstance(n, TextModel) and not n.scanned]:
        text.layers = Stacked.stack(text.layers, free=free)
    return model


def unscan_layers(model: nnx.Module) -> nnx.Module:
    """The inverse of ``scan_layers``, in place: the per-layer tree (export, PEFT, checkpoint keys)."""
    for text in [n for _, n in nnx.iter_graph(model) if isinstance(n, TextModel) and n.scanned]:
        text.layers = nnx.List(text.layers.unstack())
    return model


class TextModel(nnx.Module):
    """Embedding, decoder layers and final norm (the ``model`` of the HF thinker)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 remat: bool | str = False):
        self.cfg, self.dtype = cfg, dtype
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, dtype=dtype,
                                  param_dtype=param_dtype, axes=(VOCAB, EMBED))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype)
        self.remat = remat_name(remat)

    @property
    def scanned(self) -> bool:
        return isinstance(self.layers, Stacked)

    def __call__(self, inputs_embeds: Float[Array, "r s d"], attention_mask: Int[Arr, "r s"],
                 position_ids: Int[Arr, "3 r s"], *, pool_index: Int[Arr, "b"] | None = None, packed: bool = False
                 ) -> tuple[Float[Array, "r s d"], Float[Array, "l ..."]]:
        """Run the decoder.

        inputs_embeds [R, S, D]; attention_mask [R, S] (0 = padding, else the segment id: 1 in
        an unpacked row; with ``packed`` a row holds several sequences, see
        ``attention_mask_args``); position_ids [3, R, S] (restarting in every segment). Returns
        (last_hidden [R, S, D], hidden_states): [L+1, R, S, D], or [L+1, B, D] gathered at
        ``pool_index`` [B], flat indices into the R * S tokens (one pooled token per sequence).
        """
        attention_mask, position_ids = jnp.asarray(attention_mask), jnp.asarray(position_ids)
        cos, sin = mrope_cos_sin(position_ids, self.cfg, self.dtype)
        mask = attention_mask_args(attention_mask, self.cfg, packed=packed)

        def keep(h):
            if pool_index is None:
                return h
            return jnp.take(h.reshape(-1, h.shape[-1]), pool_index, axis=0)

        def run_layer(layer, h):
            return layer(h, cos, sin, mask)

        h = inputs_embeds.astype(self.dtype)
        first = keep(h)
        if self.scanned:
            def step(layer, x):
                y = run_layer(layer, x)
                return y, keep(y)

            h, mid = self.layers.scan(step, h, policy=REMAT_POLICIES[self.remat], remat=self.remat != "none")
            mid = mid[:-1]
        else:
            if self.remat != "none":
                run_layer = nnx.remat(run_layer, policy=REMAT_POLICIES[self.remat])
            mid = []
            for i, layer in enumerate(self.layers):
                h = run_layer(layer, h)
                if i < len(self.layers) - 1:
                    mid.append(keep(h))
            mid = jnp.stack(mid) if mid else jnp.zeros((0, *first.shape), first.dtype)
        h = self.norm(h)
        return h, jnp.concatenate([first[None], mid, keep(h)[None]])
