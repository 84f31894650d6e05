"""The seven embedding paths of OmniRetriever: T, V, A, AV, TV, TA, TVA.

Host side (``prepare``): token layouts of every requested path with fixed
padded shapes, built from one batch of clips. Device side (``embed``): the
towers run once per batch and every LLM pass reuses their outputs; each path
pools its last real token and returns an L2-normalised float32 embedding.

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

import dataclasses
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniret_jax.data.layout import Audio, Video, batch_media, expand_turn, pad_batch, rope_index
from omniret_jax.model.audio import audio_output_lengths
from omniret_jax.model.thinker import AUDIO, VIDEO, MediaFeatures, merge_indices
from omniret_jax.model.vision import VisionLayout, vision_layout
from omniret_jax.model.wave import WAVE

PATHS = ("T", "V", "A", "AV", "TV", "TA", "TVA")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    text_len: int = 64            # padded length of the text path
    seq_len: int = 512            # padded length of every media path
    video_prompt: str = "Please describe the video."
    audio_prompt: str = "Please describe the audio."
    av_prompt: str = "Please describe the video and the audio."
    text_fusion_head: bool = False
    audio_in_video: bool = False  # interleave a clip's audio into its video block (processor's use_audio_in_video)


@dataclasses.dataclass(frozen=True)
class Tokens:
    """What the layout needs from a tokenizer."""
    encode: Callable[[str], list[int]]
    im_end_id: int
    pad_id: int

    @classmethod
    def from_pretrained(cls, path) -> "Tokens":
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(path)
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        if im_end is None or im_end == tok.unk_token_id:
            raise ValueError(f"tokenizer at {path} has no <|im_end|> token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.convert_tokens_to_ids("<|endoftext|>")
        return cls(encode=lambda s: tok(s, add_special_tokens=False)["input_ids"], im_end_id=im_end, pad_id=pad)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PathInputs:
    input_ids: jax.Array       # [B, S]
    attention_mask: jax.Array  # [B, S]
    position_ids: jax.Array    # [B, 3, S] (batch first so every input shards on axis 0)
    source: jax.Array          # [B, S]
    index: jax.Array           # [B, S]
    last_index: jax.Array      # [B]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class EmbedInputs:
    paths: dict[str, PathInputs]
    video_patches: jax.Array | None = None    # [B, P, C*Tp*p*p]
    video_layout: VisionLayout | None = None
    mel: jax.Array | None = None              # [B, n_mels, T]
    mel_lens: jax.Array | None = None         # [B]
    fbank: jax.Array | None = None            # [B, T_b, 128], T_b a multiple of 16
    fbank_padding: jax.Array | None = None    # [B, T_b] True = padded frame


def check_paths(paths: Sequence[str]) -> tuple[str, ...]:
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise ValueError(f"unknown embedding path(s) {bad or list(paths)}; valid: {', '.join(PATHS)}")
    return tuple(dict.fromkeys(paths))


def prepare(batch: dict, paths: Sequence[str], model_cfg, tokens: Tokens, ecfg: EmbedConfig, *,
            wave_doubled_audio: bool = True) -> EmbedInputs:
    """Host-side inputs for ``embed``.

    ``batch`` holds (as produced by omniret_jax.data.pipeline): ``caption`` (list
    of str), ``video_patches`` [B, P, F], ``video_grid_thw`` [B, 3],
    ``video_second_per_grid`` [B], ``mel`` [B, n_mels, T], ``mel_len`` [B],
    ``fbank`` [B, T_b, 128], ``fbank_len`` [B]; only the modalities the paths use
    are required.
    """
    paths = check_paths(paths)
    need_v = any("V" in p for p in paths)
    need_a = any("A" in p for p in paths)
    need_t = any("T" in p for p in paths)
    for key, needed in (("video_patches", need_v), ("video_grid_thw", need_v), ("video_second_per_grid", need_v),
                        ("mel", need_a), ("mel_len", need_a), ("caption", need_t)):
        if needed and key not in batch:
            raise KeyError(f"paths {paths} need batch[{key!r}]")
    if wave_doubled_audio and need_a and "fbank" not in batch:
        raise KeyError("the WAVE audio path needs batch['fbank'] and batch['fbank_len'] for BEATs")
    b = len(next(iter(batch.values())))
    captions = None
    if need_t:
        captions = []
        for i, c in enumerate(batch["caption"]):
            ids = tokens.encode(c) if isinstance(c, str) else []
            if not ids:
                raise ValueError(f"sample {i}: empty caption, but paths {paths} embed text")
            captions.append(list(ids))

    out = EmbedInputs(paths={})
    n_valid, capacity = {}, {}
    if need_v:
        patches = np.asarray(batch["video_patches"], np.float32)
        grids = np.asarray(batch["video_grid_thw"]).reshape(b, 3)
        out.video_patches = patches
        out.video_layout = vision_layout([[tuple(g)] for g in grids], patches.shape[1], model_cfg.vision)
        unit = model_cfg.vision.spatial_merge_size ** 2
        n_valid[VIDEO] = [int(np.prod(g)) // unit for g in grids]
        capacity[VIDEO] = patches.shape[1] // unit
    if need_a:
        mel = np.asarray(batch["mel"], np.float32)
        mel_lens = np.asarray(batch["mel_len"], np.int32).reshape(b)
        out.mel, out.mel_lens = mel, mel_lens
        n_w = audio_output_lengths(mel_lens)
        n_valid[AUDIO] = list(2 * n_w) if wave_doubled_audio else list(n_w)
        capacity[AUDIO] = mel.shape[-1] // 4 * (2 if wave_doubled_audio else 1)
        if wave_doubled_audio:
            fbank = np.asarray(batch["fbank"], np.float32)
            t_b = fbank.shape[1] // 16 * 16          # BEATs drops a partial last patch
            lens = np.minimum(np.asarray(batch["fbank_len"]).reshape(b), t_b)
            out.fbank = fbank[:, :t_b]
            out.fbank_padding = np.arange(t_b)[None, :] >= lens[:, None]

    for path in paths:
        rows = []
        for i in range(b):
            if path == "T":
                rows.append(expand_turn([], captions[i] + [tokens.im_end_id], model_cfg))
                continue
            media = []
            if "V" in path:
                video = Video(tuple(int(x) for x in batch["video_grid_thw"][i]),
                              float(batch["video_second_per_grid"][i]),
                              int(batch["mel_len"][i]) if ("A" in path and ecfg.audio_in_video) else None)
                media.append(video)
            if "A" in path and not ("V" in path and ecfg.audio_in_video):
                media.append(Audio(int(batch["mel_len"][i])))
            if "T" in path:
                prompt = captions[i]
            else:
                prompt = tokens.encode({"V": ecfg.video_prompt, "A": ecfg.audio_prompt,
                                        "AV": ecfg.av_prompt}[path])
            rows.append(expand_turn(media, list(prompt) + [tokens.im_end_id], model_cfg,
                                    wave_doubled_audio=wave_doubled_audio))
        length = ecfg.text_len if path == "T" else ecfg.seq_len
        padded = pad_batch([r.input_ids for r in rows], length, tokens.pad_id, side="right",
                           names=[f"sample {i} ({path} path)" for i in range(b)])
        pos, _ = rope_index(padded.input_ids, padded.attention_mask, model_cfg, **batch_media(rows))
        kinds = {k: v for k, v in n_valid.items() if (k == VIDEO and "V" in path) or (k == AUDIO and "A" in path)}
        source, index = merge_indices(padded.input_ids, model_cfg, kinds, capacity)
        out.paths[path] = PathInputs(padded.input_ids, padded.attention_mask, np.swapaxes(pos, 0, 1), source,
                                     index, padded.last_index)
    return out


def l2_normalize(x: jax.Array) -> jax.Array:
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
               ecfg: EmbedConfig) -> jax.Array:
    """One LLM pass: the path's tokens with its media, pooled, fused, unit-normalised (float32)."""
    used = {k: v for k, v in media.items() if (k == VIDEO and "V" in path) or (k == AUDIO and "A" in path)}
    _, states, _ = model(p.input_ids, p.attention_mask, jnp.swapaxes(p.position_ids, 0, 1), p.source, p.index,
                         used, pool_index=p.last_index)
    e = states[-1] if (path == "T" and not ecfg.text_fusion_head) else model.fuse(states)
    return l2_normalize(e)


def embed_paths(model: WAVE, inputs: EmbedInputs, ecfg: EmbedConfig) -> dict[str, jax.Array]:
    """Embeddings [B, D] (float32, unit norm) for every path in ``inputs.paths``; towers run once."""
    media = encode_media(model, inputs)
    return {path: embed_path(model, path, p, media, ecfg) for path, p in inputs.paths.items()}


embed = nnx.jit(embed_paths, static_argnames=("ecfg",))
