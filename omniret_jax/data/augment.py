"""Seeded positive-view augmentations for the tuple (positive-pair) objective.

OmniRetriever builds a second view of each sample by perturbing video, audio and caption
(architecture.md section 4). Each op fires independently with probability ``p`` (0.5 in the
reference), and all randomness comes from an explicit ``np.random.Generator`` so that views
are reproducible per seed and independent across data-loader workers.

Video and audio split into ``sample_*_params`` (all random draws) and ``apply_*_params``
(deterministic), so tests and logs can see exactly what was applied; ``augment_*`` does both.
"""

from __future__ import annotations

import dataclasses

import numpy as np

JITTER_RANGE = (0.8, 1.2)
GAIN_RANGE = (0.8, 1.2)
NOISE_RANGE = (0.001, 0.01)  # noise std as a fraction of the clip's peak amplitude
SPEED_RANGE = (0.9, 1.1)
SHIFT_RANGE = (-0.1, 0.1)  # circular shift as a fraction of the length
DROP_RANGE = (0.1, 0.2)


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")


def _maybe_uniform(rng: np.random.Generator, p: float, bounds: tuple[float, float], identity: float) -> float:
    """A factor drawn from ``bounds`` with probability ``p``, else ``identity``."""
    fire = rng.random() < p
    value = rng.uniform(*bounds)  # drawn either way: the op set does not shift later draws
    return float(value) if fire else identity


# --------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VideoAugParams:
    """One clip's perturbation; factors of 1.0 and ``flip=False`` are no-ops."""

    flip: bool = False
    brightness: float = 1.0
    contrast: float = 1.0
    saturation: float = 1.0


def sample_video_params(rng: np.random.Generator, *, p: float = 0.5) -> VideoAugParams:
    _check_p(p)
    flip = bool(rng.random() < p)
    return VideoAugParams(
        flip=flip,
        brightness=_maybe_uniform(rng, p, JITTER_RANGE, 1.0),
        contrast=_maybe_uniform(rng, p, JITTER_RANGE, 1.0),
        saturation=_maybe_uniform(rng, p, JITTER_RANGE, 1.0),
    )


def apply_video_params(frames: np.ndarray, params: VideoAugParams) -> np.ndarray:
    """Apply one set of params to every frame of a uint8 ``[T, H, W, 3]`` clip.

    Order as in the reference: horizontal flip, brightness (scale), contrast (scale about
    each frame's mean), saturation (scale about each pixel's channel mean). Arithmetic stays
    in float32 and is rounded to uint8 once at the end.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if params == VideoAugParams():
        return frames.copy()
    x = frames[:, :, ::-1] if params.flip else frames
    x = x.astype(np.float32)
    if params.brightness != 1.0:
        x = np.clip(x * np.float32(params.brightness), 0.0, 255.0)
    if params.contrast != 1.0:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        x = np.clip((x - mean) * np.float32(params.contrast) + mean, 0.0, 255.0)
    if params.saturation != 1.0:
        gray = x.mean(axis=-1, keepdims=True)
        x = np.clip(gray + (x - gray) * np.float32(params.saturation), 0.0, 255.0)
    return np.rint(x).astype(np.uint8)


def augment_video(frames: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Random flip and brightness/contrast/saturation jitter in [0.8, 1.2]; uint8 in, uint8 out."""
    return apply_video_params(frames, sample_video_params(rng, p=p))


# --------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AudioAugParams:
    """One waveform's perturbation; the defaults are no-ops."""

    gain: float = 1.0
    noise_level: float = 0.0  # std of added Gaussian noise / peak |x|
    noise_seed: int = 0
    speed: float = 1.0
    shift: float = 0.0  # fraction of the length, circular


def sample_audio_params(rng: np.random.Generator, *, p: float = 0.5) -> AudioAugParams:
    _check_p(p)
    return AudioAugParams(
        gain=_maybe_uniform(rng, p, GAIN_RANGE, 1.0),
        noise_level=_maybe_uniform(rng, p, NOISE_RANGE, 0.0),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
        speed=_maybe_uniform(rng, p, SPEED_RANGE, 1.0),
        shift=_maybe_uniform(rng, p, SHIFT_RANGE, 0.0),
    )


def change_speed(wave: np.ndarray, speed: float) -> np.ndarray:
    """Play ``speed`` times faster by linear interpolation, then crop or zero-pad back to the length.

    Pitch moves with speed (a tape-speed change, like the reference); ``int(N / speed)``
    output samples span the input's first to last sample.
    """
    n = wave.shape[0]
    new_len = int(n / speed)
    if speed == 1.0 or new_len < 2:
        return wave.copy()
    stretched = np.interp(np.linspace(0.0, n - 1, new_len), np.arange(n), wave)
    if new_len >= n:
        return stretched[:n]
    return np.concatenate([stretched, np.zeros(n - new_len)])


def apply_audio_params(wave: np.ndarray, params: AudioAugParams) -> np.ndarray:
    """Gain, Gaussian noise, speed change, circular shift (reference order); length kept.

    Computed in float64 and returned as float32 clipped to [-1, 1], the decoder's contract.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.shape[0] == 0 or not np.issubdtype(wave.dtype, np.floating):
        raise ValueError(f"wave must be a non-empty float 1-D array, got {wave.dtype} {wave.shape}")
    n = wave.shape[0]
    x = wave.astype(np.float64) * params.gain
    if params.noise_level > 0.0:
        noise = np.random.default_rng(params.noise_seed).standard_normal(n)
        x = x + noise * (params.noise_level * np.abs(x).max())
    if params.speed != 1.0:
        x = change_speed(x, params.speed)
    if params.shift != 0.0:
        x = np.roll(x, int(params.shift * n))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def augment_audio(wave: np.ndarray, rng: np.random.Generator, *, p: float = 0.5) -> np.ndarray:
    """Random gain [0.8, 1.2], noise, speed [0.9, 1.1] (length kept), circular shift +-10 %."""
    return apply_audio_params(wave, sample_audio_params(rng, p=p))


# --------------------------------------------------------------------------------------
# Caption
# --------------------------------------------------------------------------------------


def augment_caption(text: str, rng: np.random.Generator, *, p: float = 0.5) -> str:
    """Drop ``round(f * n)`` of the n words (f in [0.1, 0.2]), then 1-2 adjacent swaps.

    Words are whitespace-separated and re-joined with single spaces. At least one word is
    always kept, so the result is never empty; a one-word caption comes back unchanged.
    """
    _check_p(p)
    if not isinstance(text, str) or not text.split():
        raise ValueError(f"caption must be a non-empty string, got {text!r}")
    words = text.split()
    do_drop = rng.random() < p
    frac = rng.uniform(*DROP_RANGE)
    if do_drop and len(words) > 1:
        n_drop = min(int(round(frac * len(words))), len(words) - 1)
        if n_drop:
            dropped = set(rng.choice(len(words), size=n_drop, replace=False).tolist())
            words = [w for i, w in enumerate(words) if i not in dropped]
    do_swap = rng.random() < p
    n_swaps = int(rng.integers(1, 3))
    if do_swap and len(words) > 1:
        n_swaps = min(n_swaps, len(words) - 1)
        for i in rng.choice(len(words) - 1, size=n_swaps, replace=False).tolist():
            words[i], words[i + 1] = words[i + 1], words[i]
    return " ".join(words)


__all__ = [
    "VideoAugParams",
    "sample_video_params",
    "apply_video_params",
    "augment_video",
    "AudioAugParams",
    "sample_audio_params",
    "apply_audio_params",
    "change_speed",
    "augment_audio",
    "augment_caption",
]
