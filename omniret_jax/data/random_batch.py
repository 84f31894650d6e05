"""Random arrays in the input pipeline's batch format (no decoding), for benchmarks and tests.

Both sides of the side-by-side benchmark against PyTorch consume the same host batch
(captions, patches, mel, fbank and their lengths), so they do the same work. The shapes are
what the training pipeline produces at fixed frames and seconds: every clip has all its frames
(the pipeline always samples ``num_frames``), odd rows have a non-square frame (a 4:3-like
grid two patches narrower and two wider, as smart_resize gives within the same pixel budget),
and every fourth row has a short audio track (3/5 of the crop, the rest zero-padded). Captions
are ``caption_tokens`` bytes long (the tiny models' tokenizer maps one byte to one token) or,
without it, random words of ``caption_chars`` characters.
"""

from __future__ import annotations

import math

import numpy as np

from omniret_jax.data import features
from omniret_jax.data.batch import cut_patches
from omniret_jax.data.pipeline import SAMPLE_RATE, PipelineConfig

WORDS = "a the red blue small loud quiet dog cat bird piano river street rain sings runs barks plays".split()


def _pipeline_config(c) -> PipelineConfig:
    d = c.data
    return PipelineConfig(num_frames=d.num_frames, min_pixels=d.min_pixels, max_pixels=d.max_pixels,
                          patch_buckets=d.get("patch_buckets"))


def random_view(rng: np.random.Generator, c, b: int, caption_chars: tuple[int, int] = (12, 60),
                caption_tokens: int | None = None) -> dict:
    """One view of ``b`` clips for config ``c`` (its data.* media settings); see the module docstring."""
    pcfg = _pipeline_config(c)
    side = math.isqrt(c.data.max_pixels) // pcfg.patch_size
    t_full = pcfg.temporal_grids
    samples = int(round(c.data.audio_seconds * SAMPLE_RATE))
    n_mel, t_mel = features.whisper_log_mel(np.zeros(samples, np.float32)).shape
    t_fb, n_fb = features.beats_fbank(np.zeros(samples, np.float32)).shape
    grid = np.array([[t_full, side, side] if i % 2 == 0 else [t_full, side - 2, side + 2] for i in range(b)],
                    np.int32)
    n_patch = grid.prod(axis=1)
    width = 3 * pcfg.temporal_patch_size * pcfg.patch_size**2
    patches = rng.standard_normal((b, pcfg.num_patches, width)).astype(np.float32)
    patches[np.arange(pcfg.num_patches)[None, :] >= n_patch[:, None]] = 0.0
    mel_len = np.array([t_mel if i % 4 != 3 else t_mel * 3 // 5 for i in range(b)], np.int32)
    win, hop = SAMPLE_RATE * 25 // 1000, SAMPLE_RATE // 100
    fbank_len = np.minimum(t_fb, 1 + (mel_len * hop - win) // hop).astype(np.int32)
    fbank = rng.standard_normal((b, t_fb, n_fb)).astype(np.float32)
    fbank[np.arange(t_fb)[None, :] >= fbank_len[:, None]] = 0.0

    def caption() -> str:
        if caption_tokens is not None:
            return "".join(str(rng.choice(WORDS))[0] if i % 4 else " " for i in range(caption_tokens)).strip().ljust(
                caption_tokens, "a")
        words = []
        while len(" ".join(words)) < int(rng.integers(*caption_chars)):
            words.append(str(rng.choice(WORDS)))
        return " ".join(words)

    return {
        "caption": [caption() for _ in range(b)],
        "video_patches": patches,
        "video_num_patches": n_patch.astype(np.int32),
        "video_grid_thw": grid,
        "video_second_per_grid": np.full(b, 1.0, np.float32),
        "mel": (0.5 * rng.standard_normal((b, n_mel, t_mel))).astype(np.float32),
        "mel_len": mel_len,
        "fbank": fbank,
        "fbank_len": fbank_len,
    }


def random_batch(c, b: int, seed: int = 0, *, augment: bool = True, caption_chars=(12, 60),
                 caption_tokens: int | None = None, bucketed: bool = False) -> dict:
    """A pipeline-format batch of random arrays, with the augmented view under ``aug``;
    ``bucketed``: its patches cut to the bucket the trainer cuts such a batch to (``cut_patches``)."""
    rng = np.random.default_rng(seed)
    batch = {"id": [f"clip{i}" for i in range(b)], **random_view(rng, c, b, caption_chars, caption_tokens)}
    if augment:
        batch["aug"] = random_view(rng, c, b, caption_chars, caption_tokens)
    if bucketed:
        batch = cut_patches(batch, _pipeline_config(c).patch_bucket_sizes)
    return batch
