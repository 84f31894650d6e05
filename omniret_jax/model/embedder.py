"""The device half of the seven embedding paths (T, V, A, AV, TV, TA, TVA).

The towers run once per batch (``encode_media``) and every LLM pass reuses their
outputs (``embed_path``); each path pools its last real token and returns an
L2-normalised float32 embedding. The host half (token layouts, position ids, merge
indices) is ``omniret_jax.data.batch``.

- Media and mixed paths (V, A, AV, TV, TA, TVA): ``[media][PROMPT]<|im_end|>``,
  the user turn of the chat template with everything up to the user header cut;
  PROMPT is the caption when text is in the path, else a fixed instruction;
  all-layer fusion head.
- Text path T: raw caption + ``<|im_end|>``, no template; the final-norm state of
  the last token, no fusion head (WAVE/OmniRetriever code). ``text_fusion_head``
  switches to the paper's wording (the head on every path).

Rows are right-padded and the last real token is gathered; the reference
left-pads and takes position -1, which selects the same token (tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from omniret_jax.config import EmbedConfig
from omniret_jax.inputs import AUDIO, VIDEO, EmbedInputs, PathInputs
from omniret_jax.model.thinker import MediaFeatures
from omniret_jax.model.wave import WAVE


def l2_normalize(x: Float[Array, "b d"]) -> Float[Array, "b d"]:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def encode_media(model: WAVE, inputs: EmbedInputs) -> dict[int, MediaFeatures]:
    """Run each tower once; every LLM pass of the batch reuses the result."""
    media: dict[int, MediaFeatures] = {}
    if inputs.video_patches is not None:
        media[VIDEO] = model.encode_vision(inputs.video_patches, inputs.video_layout)
    if inputs.mel is not None:
        if inputs.fbank is not None:
            media[AUDIO] = model.encode_audio_dual(inputs.mel, inputs.mel_lens, inputs.fbank, inputs.fbank_padding)
        else:
            media[AUDIO] = model.encode_audio(inputs.mel, inputs.mel_lens)
    return media


def embed_path(model: WAVE, path: str, p: PathInputs, media: dict[int, MediaFeatures],
               ecfg: EmbedConfig) -> Float[Array, "b d"]:
    """One LLM pass: the path's tokens with its media, pooled, fused, unit-normalised (float32)."""
    used = {k: v for k, v in media.items() if (k == VIDEO and "V" in path) or (k == AUDIO and "A" in path)}
    _, states, _ = model(p.input_ids, p.attention_mask, jnp.swapaxes(p.position_ids, 0, 1), p.source, p.index,
                         used, pool_index=p.pool_index, packed=ecfg.packing(path)[0] > 1)
    e = states[-1] if (path == "T" and not ecfg.text_fusion_head) else model.fuse(states)
    return l2_normalize(e)


def embed_paths(model: WAVE, inputs: EmbedInputs, ecfg: EmbedConfig) -> dict[str, jax.Array]:
    """Embeddings [B, D] (float32, unit norm) for every path in ``inputs.paths``; towers run once."""
    media = encode_media(model, inputs)
    return {path: embed_path(model, path, p, media, ecfg) for path, p in inputs.paths.items()}

