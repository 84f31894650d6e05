"""The backbone: towers, placeholder merge, text decoder, LM head.

One module serves both families of ``config.BackboneConfig``: the Qwen2.5-Omni thinker
(vision and audio towers) and Qwen2.5-VL (``cfg.audio`` is None: no audio tower). With
``tie_word_embeddings`` (Qwen2.5-VL-3B) the LM head is the embedding table.

Multimodal features are written into their placeholder tokens by a gather
whose indices are computed on the host (``omniret_jax.data.batch.merge_indices``): token t of sample b
takes feature ``index[b, t]`` of its modality's flattened tower output. This is
the static-shape equivalent of transformers' ``masked_scatter`` (features fill
placeholders in order), and tower outputs can be reused by any number of LLM
passes.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from omniret_jax.config import BackboneConfig
from omniret_jax.inputs import Arr, VisionLayout
from omniret_jax.model.audio import AudioTower
from omniret_jax.model.layers import EMBED, VOCAB, Linear
from omniret_jax.model.text import TextModel
from omniret_jax.model.vision import VisionTower


@dataclasses.dataclass
class MediaFeatures:
    """Tower outputs for one modality: features [R, N, D] and valid mask [R, N]."""
    features: jax.Array
    valid: jax.Array


jax.tree_util.register_dataclass(MediaFeatures, data_fields=["features", "valid"], meta_fields=[])


class Thinker(nnx.Module):
    def __init__(self, cfg: BackboneConfig, *, rngs: nnx.Rngs, remat: bool | str = False):
        self.cfg = cfg
        kw = dict(rngs=rngs, dtype=cfg.precision.compute, param_dtype=cfg.precision.frozen)
        self.language_model = TextModel(cfg.text, remat=remat, **kw)
        self.visual = VisionTower(cfg.vision, **kw)
        self.audio_tower = nnx.data(None) if cfg.audio is None else AudioTower(cfg.audio, **kw)
        self.lm_head = nnx.data(None) if cfg.text.tie_word_embeddings else Linear(
            cfg.text.hidden_size, cfg.text.vocab_size, use_bias=False, axes=(EMBED, VOCAB), **kw)

    # -- towers (frozen in every recipe: their outputs carry no gradient) --------
    def encode_vision(self, patches: Float[Arr, "b p f"], layout: VisionLayout) -> MediaFeatures:
        return jax.lax.stop_gradient(MediaFeatures(*self.visual(patches, layout)))

    def encode_audio(self, mel: Float[Arr, "b m t"], feature_lens: Int[Arr, "b"]) -> MediaFeatures:
        if self.audio_tower is None:
            raise ValueError(f"the {self.cfg.family} backbone has no audio tower")
        return jax.lax.stop_gradient(MediaFeatures(*self.audio_tower(mel, feature_lens)))

    # -- merge + decoder ----------------------------------------------------------
    def input_embeddings(self, input_ids: Int[Arr, "b s"], source: Int[Arr, "b s"], index: Int[Arr, "b s"],
                         media: dict[int, MediaFeatures]) -> Float[Array, "b s d"]:
        """Token embeddings with placeholder tokens replaced by media features."""
        input_ids, source, index = jnp.asarray(input_ids), jnp.asarray(source), jnp.asarray(index)
        h = self.language_model.embed_tokens(input_ids)
        for kind, feats in media.items():
            f = feats.features.astype(h.dtype)
            flat = f.reshape(-1, f.shape[-1])
            gathered = jnp.take(flat, jnp.clip(index, 0, flat.shape[0] - 1), axis=0)
            h = jnp.where((source == kind)[..., None], gathered, h)
        return h

    def __call__(self, input_ids: Int[Arr, "r s"], attention_mask: Int[Arr, "r s"],
                 position_ids: Int[Arr, "3 r s"], source: Int[Arr, "r s"], index: Int[Arr, "r s"],
                 media: dict[int, MediaFeatures] | None = None, *, pool_index: Int[Arr, "b"] | None = None,
                 packed: bool = False, logits: bool = False):
        """Returns (last_hidden [R, S, D], hidden_states, logits or None); see TextModel."""
        h = self.input_embeddings(input_ids, source, index, media or {})
        last, states = self.language_model(h, attention_mask, position_ids, pool_index=pool_index, packed=packed)
        return last, states, (self.logits(last) if logits else None)

    def logits(self, h: Float[Array, "b s d"]) -> Float[Array, "b s v"]:
        if self.lm_head is not None:
            return self.lm_head(h)
        table = self.language_model.embed_tokens.weight[...]
        return h @ table.astype(h.dtype).T
