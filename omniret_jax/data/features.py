"""Host-side (NumPy) model inputs: Qwen2-VL vision patches, Whisper log-mel, BEATs fbank.

Each function reproduces what the PyTorch stack feeds the model, so that checkpoints trained
there see the same numbers here; tests/test_features.py measures the agreement with the
reference implementations (transformers' processors, lhotse's Kaldi fbank).
"""

from __future__ import annotations

import math

import librosa
import numpy as np
from PIL import Image

MAX_ASPECT_RATIO = 200  # smart_resize refuses frames more elongated than this

# OpenAI CLIP normalisation used by every Qwen2/2.5-VL processor.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# BEATs fbank normalisation constants (dataset statistics of the released checkpoints).
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582


# --------------------------------------------------------------------------------------
# Vision
# --------------------------------------------------------------------------------------


def smart_resize(
    h: int, w: int, *, factor: int = 28, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280
) -> tuple[int, int]:
    """Target (height, width): multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Same rule as Qwen2-VL's processor: round each side to the nearest multiple (Python's
    round, ties to even), then if the area is out of range rescale both sides by the square
    root of the area ratio, flooring when shrinking and ceiling when growing.
    """
    if h <= 0 or w <= 0:
        raise ValueError(f"image size must be positive, got h={h}, w={w}")
    if max(h, w) / min(h, w) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {max(h, w) / min(h, w):.1f} "
                         f"for h={h}, w={w}")
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    rh = round(h / factor) * factor
    rw = round(w / factor) * factor
    if rh * rw > max_pixels:
        scale = math.sqrt(h * w / max_pixels)
        rh = max(factor, math.floor(h / scale / factor) * factor)
        rw = max(factor, math.floor(w / scale / factor) * factor)
    elif rh * rw < min_pixels:
        scale = math.sqrt(min_pixels / (h * w))
        rh = math.ceil(h * scale / factor) * factor
        rw = math.ceil(w * scale / factor) * factor
    return rh, rw


def max_resize_blocks(*, factor: int = 28, min_pixels: int, max_pixels: int,
                      max_ratio: float = MAX_ASPECT_RATIO) -> int:
    """The most ``factor`` x ``factor`` blocks (``h * w / factor**2``) ``smart_resize`` can return
    for any frame it accepts (aspect ratio <= ``max_ratio``): a tight upper bound (the sweep
    in tests/test_features.py reaches it for the training settings).

    More than ``max_pixels / factor**2`` is possible in two of its branches:
    - growing (the rounded area is below ``min_pixels``): each side is scaled to
      ``x = sqrt(m / r)``, ``y = sqrt(m r)`` blocks (``m = min_pixels / factor**2``, r the aspect
      ratio) and *ceiled*, so ``ceil(x) * ceil(y)`` can reach about twice ``m`` (64x48 at
      224 * 224 gives 7 x 10 = 70 blocks, not 64; a 1:64 sliver 2 x 65 = 130);
    - shrinking a sliver: the short side is clamped to one block, so ``floor(sqrt(M r))``
      blocks remain on the long side (``M = max_pixels / factor**2``).
    The supremum of ``ceil(x) * ceil(y)`` over ``x * y = m``, ``x <= y <= max_ratio * x`` is
    taken interval by interval of ``ceil(x) = k + 1``: at the left end of ``x``'s interval
    ``y`` is largest. The ends are counted as if rounding tipped both sides over (x just
    above k, y at m / k, each ceiled up: smart_resize computes them in floating point, and
    19x1216 at 224 * 224 really does come out as 2 x 65 blocks).
    """
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got {min_pixels}, {max_pixels}")
    m, big_m = min_pixels / factor**2, max_pixels / factor**2
    # the rounding branch keeps the area <= max_pixels; shrinking keeps it <= M unless clamped
    best = max(math.floor(big_m), math.floor(math.sqrt(big_m * max_ratio)))
    x_lo = math.sqrt(m / max_ratio)       # the thinnest accepted frame's short side, in blocks
    x_hi = math.sqrt(m)                   # a square frame
    k = 0
    while k < x_hi:
        start = max(float(k), x_lo)
        if start <= min(k + 1, x_hi):
            best = max(best, (k + 1) * (math.floor(m / start) + 1))
        k += 1
    return int(best)


def _resize_normalize(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """PIL bicubic resize of a uint8 RGB frame, then x/255 and CLIP mean/std, in float32.

    The arithmetic mirrors the processor's order (rescale in float64 then cast, normalise in
    float32) so that the output is bit-identical to it, not merely close.
    """
    rh, rw = size
    if frame.shape[:2] != (rh, rw):
        image = Image.fromarray(np.ascontiguousarray(frame))
        frame = np.asarray(image.resize((rw, rh), resample=Image.Resampling.BICUBIC))
    x = (frame.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def vision_patches(
    frames: np.ndarray,
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 50176,
    patch_size: int = 14,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Flattened ViT patches ``float32 [N, 3 * Tp * p * p]`` and ``grid_thw`` for a video or image.

    ``frames`` is uint8 ``[T, H, W, 3]`` (video) or ``[H, W, 3]`` (image, T = 1). T is padded
    to a multiple of ``temporal_patch_size`` by repeating the last frame (an image becomes Tp
    copies of itself, as the image processor does). Rows are ordered
    (t, h-block, w-block, h-in-block, w-in-block) with ``merge_size`` x ``merge_size``
    neighbours adjacent, and each row is laid out (channel, frame-in-pair, row, column): the
    Qwen2-VL processors' layout that the vision tower's patch embedding expects.
    """
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] or [H, W, 3], got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB, got dtype {frames.dtype}")
    t, h, w, c = frames.shape
    factor = patch_size * merge_size
    rh, rw = smart_resize(h, w, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    x = np.stack([_resize_normalize(f, (rh, rw)) for f in frames])  # [T, rh, rw, C]
    if pad := -t % temporal_patch_size:
        x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)], axis=0)
    gt, gh, gw = x.shape[0] // temporal_patch_size, rh // patch_size, rw // patch_size
    m, p, tp = merge_size, patch_size, temporal_patch_size
    x = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, c)
    # -> (gt, h-block, w-block, h-in-block, w-in-block, C, Tp, p_row, p_col)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p)), (gt, gh, gw)


# --------------------------------------------------------------------------------------
# Whisper log-mel (Qwen2.5-Omni audio tower input)
# --------------------------------------------------------------------------------------


def slaney_mel_filters(n_mels: int, n_fft: int, sr: int) -> np.ndarray:
    """Whisper's filter bank ``[n_fft // 2 + 1, n_mels]``: librosa's Slaney-scale, area-normalised
    triangles over 0 .. sr/2 (what Whisper itself builds its bank with)."""
    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=sr / 2, htk=False,
                               norm="slaney", dtype=np.float64).T


_MEL_CACHE: dict = {}


def whisper_num_frames(num_samples: int, hop: int = 160) -> int:
    """Frames the reference's attention mask keeps for ``num_samples`` samples: ceil(N / hop)."""
    return -(-num_samples // hop)


def whisper_log_mel(
    wave: np.ndarray, *, n_mels: int = 128, sr: int = 16000, n_fft: int = 400, hop: int = 160
) -> np.ndarray:
    """Whisper log-mel ``float32 [n_mels, ceil(N / hop)]`` of a 16 kHz mono waveform.

    Equals the first ``ceil(N / hop)`` frames of ``WhisperFeatureExtractor(feature_size=128)``
    as the Qwen2.5-Omni processor calls it (zero-padded to 30 s, attention mask giving the
    valid length): the signal is followed by zeros, not reflected, at its end, and the
    ``max - 8`` dynamic-range floor is taken over every frame that touches the signal, so
    boundary frames match the padded reference. Exact for N <= 30 s - n_fft / 2 samples; the
    reference truncates longer input to 30 s, this function does not.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise ValueError(f"wave must be a non-empty 1-D array, got shape {wave.shape}")
    n = wave.shape[0]
    half = n_fft // 2
    n_out = whisper_num_frames(n, hop)
    n_touch = (n - 1 + half) // hop + 1  # frames whose window overlaps the signal
    x = np.concatenate([wave.astype(np.float64), np.zeros(n_touch * hop + n_fft, np.float64)])
    x = np.concatenate([x[half:0:-1], x])  # centred STFT: reflect on the left, zeros on the right
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[: n_touch * hop : hop]
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, n=n_fft, axis=-1)) ** 2
    key = (n_mels, n_fft, sr)
    if key not in _MEL_CACHE:
        _MEL_CACHE[key] = slaney_mel_filters(n_mels, n_fft, sr)
    log_spec = np.log10(np.maximum(power @ _MEL_CACHE[key], 1e-10)).T  # [n_mels, n_touch]
    log_spec = np.maximum(log_spec, log_spec.max() - 8.0)
    return ((log_spec[:, :n_out] + 4.0) / 4.0).astype(np.float32)


# --------------------------------------------------------------------------------------
# BEATs Kaldi fbank
# --------------------------------------------------------------------------------------


def _kaldi_mel(f):
    return 1127.0 * np.log1p(np.asarray(f, dtype=np.float64) / 700.0)


def kaldi_mel_banks(
    n_mels: int, padded_window: int, sr: int, low_freq: float = 20.0, high_freq: float = 0.0
) -> np.ndarray:
    """Kaldi's triangular mel banks ``[padded_window // 2 + 1, n_mels]`` (Nyquist bin weight 0).

    Triangles are linear in Kaldi's mel scale 1127 ln(1 + f / 700) and unnormalised;
    ``high_freq <= 0`` is an offset from Nyquist, as in Kaldi.
    """
    nyquist = sr / 2
    if high_freq <= 0:
        high_freq += nyquist
    if not 0 <= low_freq < high_freq <= nyquist:
        raise ValueError(f"need 0 <= low_freq < high_freq <= {nyquist}, got {low_freq}, {high_freq}")
    lo, hi = _kaldi_mel(low_freq), _kaldi_mel(high_freq)
    delta = (hi - lo) / (n_mels + 1)
    left = lo + delta * np.arange(n_mels)
    centre, right = left + delta, left + 2 * delta
    mel = _kaldi_mel(np.arange(padded_window // 2) * (sr / padded_window))[:, None]
    banks = np.maximum(0.0, np.minimum((mel - left) / (centre - left), (right - mel) / (right - centre)))
    return np.concatenate([banks, np.zeros((1, n_mels))], axis=0)


_KALDI_CACHE: dict = {}


def beats_fbank(wave: np.ndarray, *, sr: int = 16000, n_mels: int = 128) -> np.ndarray:
    """BEATs input: normalised Kaldi log-mel fbank ``float32 [frames, n_mels]`` of a [-1, 1] waveform.

    ``torchaudio.compliance.kaldi.fbank`` defaults as BEATs calls it on ``wave * 2**15``:
    25 ms frames every 10 ms with edges snipped (``1 + (N - 400) // 160`` frames), no
    dither, per-frame DC removal, pre-emphasis 0.97 (first sample against itself), Povey
    window (Hann ** 0.85), zero-padding to 512, power spectrum, banks 20 Hz to Nyquist,
    ``log(max(e, float32 eps))``; then ``(x - 15.41663) / (2 * 6.55582)``.
    """
    wave = np.asarray(wave)
    if wave.ndim != 1:
        raise ValueError(f"wave must be 1-D, got shape {wave.shape}")
    win = int(0.025 * sr)
    shift = int(0.010 * sr)
    if wave.shape[0] < win:
        raise ValueError(f"beats_fbank needs at least {win} samples (one 25 ms frame), got {wave.shape[0]}")
    padded = 1 << (win - 1).bit_length()
    n_frames = 1 + (wave.shape[0] - win) // shift
    x = wave.astype(np.float64) * 32768.0
    frames = np.lib.stride_tricks.sliding_window_view(x, win)[: n_frames * shift : shift]
    frames = frames - frames.mean(axis=1, keepdims=True)
    previous = np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)
    frames = frames - 0.97 * previous
    n = np.arange(win)
    povey = (0.5 - 0.5 * np.cos(2.0 * np.pi * n / (win - 1))) ** 0.85
    power = np.abs(np.fft.rfft(frames * povey, n=padded, axis=-1)) ** 2
    key = (n_mels, padded, sr)
    if key not in _KALDI_CACHE:
        _KALDI_CACHE[key] = kaldi_mel_banks(n_mels, padded, sr)
    energies = power @ _KALDI_CACHE[key]
    logmel = np.log(np.maximum(energies, float(np.finfo(np.float32).eps)))
    return ((logmel - BEATS_FBANK_MEAN) / (2.0 * BEATS_FBANK_STD)).astype(np.float32)


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "smart_resize",
    "vision_patches",
    "slaney_mel_filters",
    "whisper_num_frames",
    "whisper_log_mel",
    "kaldi_mel_banks",
    "beats_fbank",
]
