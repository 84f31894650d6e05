"""WAVE: the thinker plus a BEATs audio branch and the all-layer fusion head.

Module names mirror WAVE's PyTorch checkpoint (``classify_linear.{0,2}``,
``beats_ln``, ``beats_proj.{0,2}``, ``beats.*`` beside the thinker's keys), so
the converter's key map covers them with the same path rule as the thinker.

- Dual audio encoder: BEATs tokens (~50/s) are cut or zero-padded to 2 * N_w
  (N_w = Whisper tokens of the clip), average-pooled in pairs to N_w, then
  ``beats_ln`` and ``beats_proj``; Whisper and BEATs tokens interleave
  W0, B0, W1, B1, ... into the 2 * N_w audio placeholders.
- Fusion head: the pooled token of every decoder layer output
  (``hidden_states[1..L]``, the last one after the final norm) concatenated,
  Linear(L * D, D), exact GELU, Linear(D, D).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from omniret_jax.config import BEATsConfig, ThinkerConfig
from omniret_jax.inputs import Arr
from omniret_jax.model.beats import BEATs
from omniret_jax.model.layers import AUDIO_EMBED, EMBED, MLP, LayerNorm, Linear, gelu_exact
from omniret_jax.model.thinker import MediaFeatures, Thinker


def _two_layer_mlp(d_in: int, d_hidden: int, d_out: int, axes_in, axes_out, **kw) -> nnx.Dict:
    """torch ``nn.Sequential(Linear, GELU, Linear)``: keys "0" and "2"."""
    return nnx.Dict({"0": Linear(d_in, d_hidden, use_bias=True, axes=axes_in, **kw),
                     "2": Linear(d_hidden, d_out, use_bias=True, axes=axes_out, **kw)})


def _apply_mlp(mlp: nnx.Dict, x: jax.Array) -> jax.Array:
    return mlp["2"](gelu_exact(mlp["0"](x)))


def wave_heads(cfg: ThinkerConfig, beats_cfg: BEATsConfig, *, rngs: nnx.Rngs) -> dict[str, nnx.Module]:
    """The trainable WAVE modules (stored in the trainable dtype), buildable alone (a base
    checkpoint lacks them)."""
    d, n_layers, audio_out = cfg.text.hidden_size, cfg.text.num_hidden_layers, cfg.audio.output_dim
    kw = dict(rngs=rngs, dtype=cfg.precision.compute, param_dtype=cfg.precision.trainable)
    return {
        "beats_ln": LayerNorm(beats_cfg.encoder_embed_dim, param_dtype=cfg.precision.trainable),
        "beats_proj": _two_layer_mlp(beats_cfg.encoder_embed_dim, audio_out, audio_out,
                                     (AUDIO_EMBED, EMBED), (MLP, EMBED), **kw),
        "classify_linear": _two_layer_mlp(d * n_layers, d, d, (MLP, EMBED), (MLP, EMBED), **kw),
    }


class WAVE(Thinker):
    def __init__(self, cfg: ThinkerConfig, beats_cfg: BEATsConfig, *, rngs: nnx.Rngs, remat: bool | str = False):
        super().__init__(cfg, rngs=rngs, remat=remat)
        self.beats_cfg = beats_cfg
        self.beats = BEATs(beats_cfg, rngs=rngs, dtype=cfg.precision.compute, param_dtype=cfg.precision.frozen)
        heads = wave_heads(cfg, beats_cfg, rngs=rngs)
        self.beats_ln, self.beats_proj, self.classify_linear = (
            heads["beats_ln"], heads["beats_proj"], heads["classify_linear"])

    def encode_audio_dual(self, mel: Float[Arr, "r m t"], feature_lens: Int[Arr, "r"],
                          fbank: Float[Arr, "r tb nf"], fbank_padding: Bool[Arr, "r tb"]) -> MediaFeatures:
        """Interleaved Whisper/BEATs features [R, 2 * N, D] for R audios.

        mel [R, n_mels, T] with ``feature_lens``; fbank [R, T_b, 128] (normalised,
        T_b a multiple of 16) with ``fbank_padding`` [R, T_b] (True = padded frame).
        """
        whisper_feats = self.encode_audio(mel, feature_lens)
        whisper, valid = whisper_feats.features, whisper_feats.valid          # [R, N, D]
        # BEATs is frozen; only the adaptor after it trains.
        tokens = jax.lax.stop_gradient(self.beats(fbank, fbank_padding)[0])  # [R, N_b, C], zeros past valid
        n = whisper.shape[1]
        need = 2 * n
        if tokens.shape[1] < need:
            tokens = jnp.pad(tokens, ((0, 0), (0, need - tokens.shape[1]), (0, 0)))
        # Row r keeps its first 2 * N_w(r) tokens; pairs past that feed only padded slots.
        pooled = tokens[:, :need].reshape(tokens.shape[0], n, 2, -1).mean(axis=2)
        beats = _apply_mlp(self.beats_proj, self.beats_ln(pooled)).astype(whisper.dtype)
        feats = jnp.stack([whisper, beats], axis=2).reshape(whisper.shape[0], need, whisper.shape[-1])
        return MediaFeatures(feats, jnp.repeat(valid, 2, axis=1))

    def fuse(self, states: Float[Array, "l1 b d"]) -> Float[Array, "b d"]:
        """Fusion head on pooled states [L+1, B, D] (entry 0, the embedding, is not used)."""
        layers = states[1:]                                                   # [L, B, D]
        x = jnp.transpose(layers, (1, 0, 2)).reshape(layers.shape[1], -1)     # layer-major concat
        return _apply_mlp(self.classify_linear, x)
