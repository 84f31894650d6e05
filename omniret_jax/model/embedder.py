"""The device half of the embedding paths (T, V, A, AV, TV, TA, TVA; I, TI), for every backbone.

The towers run once per batch (``encode_media``) and every LLM pass reuses their
outputs (``embed_path``); each path pools its sequence as ``EmbedConfig.pooling`` says and
returns an L2-normalised float32 embedding. The host half (token layouts, position ids, merge
indices) is ``omniret_jax.data.batch``.

One embedder, several backbones: the model is a ``Thinker`` (towers + decoder; causal or
bidirectional by ``TextConfig.causal``) and may have WAVE's capabilities on top,
``encode_audio_dual`` (the BEATs branch) and ``fuse`` (the all-layer fusion head).
``check_backbone`` says once whether a model can serve an ``EmbedConfig``.

- WAVE (pooling "fusion", audio branch "whisper_beats"): media and mixed paths
  ``[media][PROMPT]<|im_end|>`` through the fusion head; the text path T (raw caption +
  ``<|im_end|>``) takes the final-norm state of its last token, no fusion head (WAVE/OmniRetriever
  code); ``text_fusion_head`` switches to the paper's wording (the head on every path). Rows are
  right-padded and the last real token is gathered; the reference left-pads and takes position
  -1, which selects the same token (tested).
- Omni-Embed-Nemotron (pooling "mean", audio branch "whisper", bidirectional attention): the
  mean of the final-norm states over each sequence's real tokens, template included
  (``mean_pool``).
- GVE (Qwen2.5-VL, pooling "last"): the final-norm state of each sequence's last real token,
  the ``<|endoftext|>`` after the generation prompt; images (I, TI) run through the same ViT as
  videos and fill the ``<|image_pad|>`` placeholders.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from omniret_jax.config import EmbedConfig
from omniret_jax.inputs import AUDIO, IMAGE, PATH_LETTER, VIDEO, Arr, EmbedInputs, PathInputs
from omniret_jax.model.thinker import MediaFeatures, Thinker


def l2_normalize(x: Float[Array, "b d"]) -> Float[Array, "b d"]:
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def check_backbone(model, ecfg: EmbedConfig) -> None:
    """ValueError naming the option when ``ecfg`` asks for a WAVE module the model (an instance
    or its class) lacks: the fusion head (``pooling='fusion'``) or the BEATs branch
    (``audio_branch='whisper_beats'``)."""
    name = model.__name__ if isinstance(model, type) else type(model).__name__
    if ecfg.pooling == "fusion" and not hasattr(model, "fuse"):
        raise ValueError(f"EmbedConfig.pooling='fusion' needs WAVE's all-layer fusion head, which the {name} "
                         "backbone does not have: use pooling 'mean' or 'last'")
    if ecfg.audio_branch == "whisper_beats" and not hasattr(model, "encode_audio_dual"):
        raise ValueError(f"EmbedConfig.audio_branch='whisper_beats' needs WAVE's BEATs branch, which the {name} "
                         "backbone does not have: use audio_branch 'whisper'")


def encode_media(model: Thinker, inputs: EmbedInputs) -> dict[int, MediaFeatures]:
    """Run each tower once; every LLM pass of the batch reuses the result. Audio goes through
    the BEATs branch too when the host laid it out for it (``inputs.fbank``)."""
    media: dict[int, MediaFeatures] = {}
    if inputs.video_patches is not None:
        media[VIDEO] = model.encode_vision(inputs.video_patches, inputs.video_layout)
    if inputs.image_patches is not None:
        media[IMAGE] = model.encode_vision(inputs.image_patches, inputs.image_layout)
    if inputs.mel is not None:
        if inputs.fbank is not None:
            media[AUDIO] = model.encode_audio_dual(inputs.mel, inputs.mel_lens, inputs.fbank, inputs.fbank_padding)
        else:
            media[AUDIO] = model.encode_audio(inputs.mel, inputs.mel_lens)
    return media


def mean_pool(last: Float[Array, "r s d"], attention_mask: Int[Arr, "r s"], pool_index: Int[Arr, "b"]
              ) -> Float[Array, "b d"]:
    """Mean of the final hidden states over each sequence's own tokens, float32 [B, D].

    A sequence is the segment of its pooled (last real) token within that token's row
    (``attention_mask`` holds segment ids, 0 = padding), so packed rows pool per sequence and
    padding never counts. Only the last hidden state is read. The host guarantees every sequence
    has real tokens (``data.batch.check_pooling``); an empty one would give zeros, not NaN.
    """
    r, s, d = last.shape
    seg = jnp.asarray(attention_mask).reshape(-1)                                # [R * S]
    pool_index = jnp.asarray(pool_index)
    row = jnp.arange(r * s) // s
    member = ((row[None, :] == (pool_index // s)[:, None]) & (seg[None, :] == seg[pool_index][:, None])
              & (seg[None, :] > 0)).astype(jnp.float32)                          # [B, R * S]
    total = jnp.einsum("bt,td->bd", member, last.reshape(r * s, d).astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return total / jnp.maximum(member.sum(axis=-1, keepdims=True), 1.0)


def embed_path(model: Thinker, path: str, p: PathInputs, media: dict[int, MediaFeatures],
               ecfg: EmbedConfig) -> Float[Array, "b d"]:
    """One LLM pass: the path's tokens with its media, pooled, unit-normalised (float32)."""
    used = {k: v for k, v in media.items() if PATH_LETTER[k] in path}
    last, states, _ = model(p.input_ids, p.attention_mask, jnp.swapaxes(p.position_ids, 0, 1), p.source, p.index,
                            used, pool_index=p.pool_index, packed=ecfg.packing(path)[0] > 1)
    if ecfg.pooling == "mean":
        e = mean_pool(last, p.attention_mask, p.pool_index)
    elif ecfg.pooling == "fusion" and (path != "T" or ecfg.text_fusion_head):
        e = model.fuse(states)
    else:
        e = states[-1]
    return l2_normalize(e)


def embed_paths(model: Thinker, inputs: EmbedInputs, ecfg: EmbedConfig) -> dict[str, jax.Array]:
    """Embeddings [B, D] (float32, unit norm) for every path in ``inputs.paths``; towers run once."""
    check_backbone(model, ecfg)
    media = encode_media(model, inputs)
    return {path: embed_path(model, path, p, media, ecfg) for path, p in inputs.paths.items()}
