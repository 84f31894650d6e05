"""Qwen2.5-Omni audio tower (Whisper-style encoder) with static shapes.

The reference packs every audio's chunks into one ragged sequence. Here each
audio is a row of a fixed-width batch: ``T`` mel frames, a multiple of the
chunk size ``2 * n_window``, of which the first ``feature_lens[b]`` are real.
Reshaping to ``[B, T / (2n), n_mels, 2n]`` makes every chunk a batch element,
so the per-chunk convolutions, per-chunk position restart and block-diagonal
attention all fall out of the shape; masks derived from ``feature_lens`` keep
padding from reaching real tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from omniret_jax.config import AudioConfig
from omniret_jax.inputs import Arr
from omniret_jax.model.layers import (AUDIO_EMBED, AUDIO_MLP, CONV, EMBED, NORM, Embed, LayerNorm, Linear,
                                      normal_init, activation, dot_product_attention, gelu_exact)


def sinusoid_positions(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper sinusoid table [length, channels], evaluated in float32 like the torch buffer."""
    if channels % 2:
        raise ValueError(f"sinusoid position embedding needs an even width, got {channels}")
    step = np.float32(np.log(max_timescale) / (channels // 2 - 1))
    # float32 arguments, transcendental functions correctly rounded from float64 (as torch's are).
    inv_timescales = np.exp((-step * np.arange(channels // 2, dtype=np.float32)).astype(np.float64))
    angles = (np.arange(length, dtype=np.float32)[:, None] * inv_timescales.astype(np.float32)[None, :])
    angles = angles.astype(np.float64)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class Conv1d(nnx.Module):
    """torch.nn.Conv1d on [N, C, W]; the weight stays in torch layout (out, in, k)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, *, stride: int, padding: int, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.stride, self.padding, self.dtype = stride, padding, dtype
        self.weight = nnx.Param(normal_init(rngs, (out_ch, in_ch, kernel), 0.02, param_dtype),
                                axes=(AUDIO_EMBED, CONV, None))
        self.bias = nnx.Param(jnp.zeros((out_ch,), param_dtype), axes=(AUDIO_EMBED,))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.weight[...].astype(self.dtype), window_strides=(self.stride,),
            padding=[(self.padding, self.padding)], dimension_numbers=("NCH", "OIH", "NCH"))
        return y + self.bias[...].astype(self.dtype)[:, None]


class AudioAttention(nnx.Module):
    """Bidirectional multi-head attention; k_proj has no bias, as in Whisper."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.d_model
        if d % cfg.encoder_attention_heads:
            raise ValueError(f"audio d_model {d} is not divisible by encoder_attention_heads "
                             f"{cfg.encoder_attention_heads}")
        self.num_heads = cfg.encoder_attention_heads
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.q_proj = Linear(d, d, use_bias=True, axes=(AUDIO_EMBED, AUDIO_MLP), **kw)
        self.k_proj = Linear(d, d, use_bias=False, axes=(AUDIO_EMBED, AUDIO_MLP), **kw)
        self.v_proj = Linear(d, d, use_bias=True, axes=(AUDIO_EMBED, AUDIO_MLP), **kw)
        self.out_proj = Linear(d, d, use_bias=True, axes=(AUDIO_MLP, AUDIO_EMBED), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        n, s, d = x.shape
        split = lambda t: t.reshape(n, s, self.num_heads, d // self.num_heads)
        out = dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)), mask)
        return self.out_proj(out.reshape(n, s, d))


class AudioEncoderLayer(nnx.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d, kw = cfg.d_model, dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.self_attn = AudioAttention(cfg, **kw)
        self.self_attn_layer_norm = LayerNorm(d, param_dtype=param_dtype, axes=(NORM,))
        self.fc1 = Linear(d, cfg.encoder_ffn_dim, use_bias=True, axes=(AUDIO_EMBED, AUDIO_MLP), **kw)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d, use_bias=True, axes=(AUDIO_MLP, AUDIO_EMBED), **kw)
        self.final_layer_norm = LayerNorm(d, param_dtype=param_dtype, axes=(NORM,))
        self.act = activation(cfg.activation_function)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))
        if x.dtype == jnp.float16:  # the reference clamps float16 activations to stay finite
            limit = float(jnp.finfo(jnp.float16).max) - 1000
            x = jnp.clip(x, -limit, limit)
        return x


class AudioTower(nnx.Module):
    """mel [B, n_mels, T] + feature_lens [B] -> (features [B, T//4, output_dim], valid [B, T//4]).

    Valid features of each audio form a prefix of its row, in the reference's
    order; their count is ``omniret_jax.data.layout.audio_output_lengths(feature_lens)``.
    ``cfg.scale_embedding`` is ignored because the reference ignores it too.
    """

    def __init__(self, cfg: AudioConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        if cfg.n_window > cfg.max_source_positions:
            raise ValueError(f"audio n_window {cfg.n_window} exceeds max_source_positions "
                             f"{cfg.max_source_positions}")
        self.cfg, self.dtype = cfg, dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.d_model
        self.conv1 = Conv1d(cfg.num_mel_bins, d, 3, stride=1, padding=1, **kw)
        self.conv2 = Conv1d(d, d, 3, stride=2, padding=1, **kw)
        # Unused by the forward pass; kept so a checkpoint round trip preserves it.
        self.audio_bos_eos_token = Embed(2, cfg.output_dim, axes=(None, EMBED), **kw)
        self.layers = nnx.List([AudioEncoderLayer(cfg, **kw) for _ in range(cfg.encoder_layers)])
        self.ln_post = LayerNorm(d, param_dtype=param_dtype, axes=(NORM,))
        self.proj = Linear(d, cfg.output_dim, use_bias=True, axes=(AUDIO_EMBED, EMBED), **kw)

    def _check(self, mel: Arr, feature_lens: Arr) -> None:
        chunk = 2 * self.cfg.n_window
        if mel.ndim != 3 or mel.shape[1] != self.cfg.num_mel_bins:
            raise ValueError(f"mel must be [B, {self.cfg.num_mel_bins}, T], got shape {tuple(mel.shape)}")
        b, _, t = mel.shape
        if t % chunk:
            raise ValueError(f"mel frame count T={t} is not a multiple of the chunk size 2*n_window={chunk}")
        if tuple(feature_lens.shape) != (b,):
            raise ValueError(f"feature_lens must have shape ({b},), got {tuple(feature_lens.shape)}")
        if isinstance(feature_lens, jax.core.Tracer):
            return  # values unknown under jit; callers validate on the host
        lens = np.asarray(feature_lens)
        for i, n in enumerate(lens.tolist()):
            if not 1 <= n <= t:
                raise ValueError(f"feature_lens[{i}]={n} is outside [1, T={t}]")

    def __call__(self, mel: Float[Arr, "b m t"], feature_lens: Int[Arr, "b"]
                 ) -> tuple[Float[Array, "b n d"], Bool[Array, "b n"]]:
        self._check(mel, feature_lens)
        mel = jnp.asarray(mel)
        cfg, dt = self.cfg, self.dtype
        b, n_mels, t = mel.shape
        n = cfg.n_window
        chunk, n_chunks = 2 * n, t // (2 * n)
        lens = jnp.asarray(feature_lens, jnp.int32)

        # Zero padded frames first: conv1's receptive field reaches one frame past a chunk's end.
        frame_ok = jnp.arange(t)[None, :] < lens[:, None]                                   # [B, T]
        x = jnp.where(frame_ok[:, None, :], mel.astype(dt), 0)
        x = x.reshape(b, n_mels, n_chunks, chunk).transpose(0, 2, 1, 3).reshape(b * n_chunks, n_mels, chunk)
        frame_ok = frame_ok.reshape(b * n_chunks, 1, chunk)
        x = gelu_exact(self.conv1(x)) * frame_ok.astype(dt)
        x = gelu_exact(self.conv2(x)).transpose(0, 2, 1)                                     # [B*C, n, D]
        # Positions restart in every chunk, so one chunk's worth of the table is all that is used.
        # A host constant rather than state: the torch buffer is not in the checkpoint either.
        x = x + jnp.asarray(sinusoid_positions(n, cfg.d_model), dt)[None]

        # After the stride-2 conv an audio of L frames keeps its first (L+1)//2 tokens;
        # every full chunk is even, so only the last partial chunk is cut.
        token_ok = jnp.arange(n_chunks * n)[None, :] < ((lens + 1) // 2)[:, None]             # [B, C*n]
        key_mask = token_ok.reshape(b * n_chunks, 1, 1, n)
        for layer in self.layers:
            x = layer(x, key_mask)

        # Pairwise average pool over each audio's token sequence (pairs may straddle chunks).
        n_out = (n_chunks * n) // 2
        x = x.reshape(b, n_chunks * n, -1)[:, : 2 * n_out]
        x = x.reshape(b, n_out, 2, -1).mean(axis=2).astype(dt)
        x = self.proj(self.ln_post(x))
        valid = jnp.arange(n_out)[None, :] < (((lens + 1) // 2) // 2)[:, None]
        return x, valid
