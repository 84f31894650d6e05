"""The Qwen2.5-Omni thinker: towers, placeholder merge, text decoder, LM head.

Multimodal features are written into their placeholder tokens by a gather
whose indices are computed on the host (``merge_indices``): token t of sample b
takes feature ``index[b, t]`` of its modality's flattened tower output. This is
the static-shape equivalent of transformers' ``masked_scatter`` (features fill
placeholders in order), and tower outputs can be reused by any number of LLM
passes.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniret_jax.model.audio import AudioTower
from omniret_jax.model.config import ThinkerConfig
from omniret_jax.model.layers import EMBED, VOCAB, Linear
from omniret_jax.model.text import TextModel
from omniret_jax.model.vision import VisionTower

# Feature sources a token can take its embedding from.
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3


def merge_indices(input_ids: np.ndarray, cfg: ThinkerConfig,
                  n_valid: dict[int, Sequence[int]], capacity: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Host-side: (source [B, S] in {TEXT, IMAGE, VIDEO, AUDIO}, index [B, S]).

    A modality's tower output is [R, capacity, D] (R rows, each padded) with
    ``n_valid[kind][r]`` real features in row r. Like ``masked_scatter``, the
    placeholders of that modality, read row-major over the batch, take the real
    features in order; ``index`` points into the flattened [R * capacity] array.
    """
    ids = np.asarray(input_ids)
    source = np.full(ids.shape, TEXT, np.int32)
    index = np.zeros(ids.shape, np.int32)
    tokens = {IMAGE: cfg.image_token_id, VIDEO: cfg.video_token_id, AUDIO: cfg.audio_token_id}
    names = {IMAGE: "image", VIDEO: "video", AUDIO: "audio"}
    for kind, token in tokens.items():
        hit = ids == token
        counts = np.asarray(n_valid.get(kind, ()), np.int64)
        if hit.sum() != counts.sum():
            raise ValueError(f"{int(hit.sum())} {names[kind]} placeholder tokens in the batch but "
                             f"{int(counts.sum())} {names[kind]} features (valid counts per row: {counts.tolist()})")
        if not hit.any():
            continue
        if (counts > capacity[kind]).any():
            raise ValueError(f"{names[kind]} valid counts {counts.tolist()} exceed the tower capacity {capacity[kind]}")
        flat = np.concatenate([r * capacity[kind] + np.arange(n) for r, n in enumerate(counts)])
        source[hit] = kind
        index[hit] = flat
    return source, index


@dataclasses.dataclass
class MediaFeatures:
    """Tower outputs for one modality: features [R, N, D] and valid mask [R, N]."""
    features: jax.Array
    valid: jax.Array


jax.tree_util.register_dataclass(MediaFeatures, data_fields=["features", "valid"], meta_fields=[])


class Thinker(nnx.Module):
    def __init__(self, cfg: ThinkerConfig, *, rngs: nnx.Rngs, remat: bool | str = False):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.language_model = TextModel(cfg.text, remat=remat, **kw)
        self.visual = VisionTower(cfg.vision, **kw)
        self.audio_tower = AudioTower(cfg.audio, **kw)
        self.lm_head = Linear(cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False,
                              axes=(EMBED, VOCAB), **kw)

    # -- towers (frozen in every recipe: their outputs carry no gradient) --------
    def encode_vision(self, patches: jax.Array, layout: Any) -> MediaFeatures:
        return jax.lax.stop_gradient(MediaFeatures(*self.visual(patches, layout)))

    def encode_audio(self, mel: jax.Array, feature_lens: jax.Array) -> MediaFeatures:
        return jax.lax.stop_gradient(MediaFeatures(*self.audio_tower(mel, feature_lens)))

    # -- merge + decoder ----------------------------------------------------------
    def embed(self, input_ids: jax.Array, source: jax.Array, index: jax.Array,
              media: dict[int, MediaFeatures]) -> jax.Array:
        """Token embeddings with placeholder tokens replaced by media features."""
        h = self.language_model.embed_tokens(input_ids)
        for kind, feats in media.items():
            f = feats.features.astype(h.dtype)
            flat = f.reshape(-1, f.shape[-1])
            gathered = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
            h = jnp.where((source == kind)[..., None], gathered, h)
        return h

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, position_ids: jax.Array,
                 source: jax.Array, index: jax.Array, media: dict[int, MediaFeatures] | None = None, *,
                 pool_index: jax.Array | None = None, logits: bool = False):
        """Returns (last_hidden [B,S,D], hidden_states, logits or None); see TextModel."""
        h = self.embed(input_ids, source, index, media or {})
        last, states = self.language_model(h, attention_mask, position_ids, pool_index=pool_index)
        return last, states, (self.lm_head(last) if logits else None)
