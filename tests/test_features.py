"""Feature parity against the references.

Measured on this machine (float32 outputs):
- vision patches vs ``Qwen2VLImageProcessorPil``: max abs error 0.0 (bit-identical), identical
  ``grid_thw`` and resized size, for up- and down-scaled and odd-aspect images.
- Whisper log-mel vs ``WhisperFeatureExtractor(feature_size=128)`` (torch STFT path, what the
  processor runs when torch is installed): ~2.5e-5 (float32 STFT there, float64 here); vs its
  NumPy path ~1.2e-7. Boundary frames match because we pad with zeros like the 30 s reference.
- BEATs fbank vs lhotse ``Wav2LogFilterBank`` at torchaudio's kaldi defaults: ~3e-5 in normalised
  units (lhotse computes window, mel banks and FFT in float32); with lhotse run in float64 and
  its float32-built banks/window replaced by exact ones: ~6e-8, i.e. no algorithmic difference.
"""

import warnings

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessorPil, WhisperFeatureExtractor

from omniret_jax.data.features import (
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    CLIP_MEAN,
    CLIP_STD,
    beats_fbank,
    kaldi_mel_banks,
    max_resize_blocks,
    smart_resize,
    vision_patches,
    whisper_log_mel,
    whisper_num_frames,
)

PATCH_TOL = 1e-5
MEL_TOL = 1e-4
FBANK_TOL = 1e-4


def _signal(n, seed=0):
    """Tone plus broadband noise: every mel/fbank bin well above float32 round-off."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


# ----------------------------------------------------------------------------- vision


def _sweep_blocks(min_pixels: int, max_pixels: int, heights=range(1, 301), max_side: int = 20000, factor: int = 28):
    """Most blocks smart_resize's rule gives over h in ``heights``, w in [h, min(200 h, max_side)]
    (vectorised copy of the rule, float64 as Python's); returns (blocks, (h, w))."""
    best, arg = 0, None
    for h in heights:
        w = np.arange(h, min(200 * h, max_side) + 1, dtype=np.float64)
        hb, wb = np.round(h / factor) * factor, np.round(w / factor) * factor
        shrink, grow = np.sqrt(h * w / max_pixels), np.sqrt(min_pixels / (h * w))
        rh = np.where(hb * wb > max_pixels, np.maximum(factor, np.floor(h / shrink / factor) * factor),
                      np.where(hb * wb < min_pixels, np.ceil(h * grow / factor) * factor, hb))
        rw = np.where(hb * wb > max_pixels, np.maximum(factor, np.floor(w / shrink / factor) * factor),
                      np.where(hb * wb < min_pixels, np.ceil(w * grow / factor) * factor, wb))
        blocks = rh * rw / factor**2
        i = int(np.argmax(blocks))
        if blocks[i] > best:
            best, arg = int(blocks[i]), (h, int(w[i]))
    return best, arg


@pytest.mark.parametrize("pixels, want", [((50176, 50176), 130), ((3136, 3136), 29), ((3136, 6272), 40),
                                          ((784, 50176), 113), ((50176, 176400), 225)])
def test_patch_bound_covers_smart_resize_rounding_up(pixels, want):
    """The fixed patch count must hold every frame smart_resize accepts: a sweep of frame sizes
    (slivers and tiny frames included) reaches the analytic bound and never passes it, and the
    sweep's worst frame really resizes to that many blocks in transformers' smart_resize."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    lo, hi = pixels
    bound = max_resize_blocks(min_pixels=lo, max_pixels=hi)
    worst, (h, w) = _sweep_blocks(lo, hi)
    rh, rw = hf_smart_resize(h, w, factor=28, min_pixels=lo, max_pixels=hi)
    print(f"min/max pixels {lo}/{hi}: bound {bound} blocks of 28 px ({bound * 4} patches per frame pair, "
          f"{hi // 784} blocks fit max_pixels); worst swept frame {h}x{w} -> {rh}x{rw}")
    assert bound == want == worst == rh * rw // 784
    rng = np.random.default_rng(0)
    for hh, ww in zip(rng.integers(1, 3000, 2000), rng.integers(1, 3000, 2000)):
        if max(hh, ww) / min(hh, ww) <= 200:
            ours = smart_resize(int(hh), int(ww), factor=28, min_pixels=lo, max_pixels=hi)
            assert ours == hf_smart_resize(int(hh), int(ww), factor=28, min_pixels=lo, max_pixels=hi)
            assert ours[0] * ours[1] // 784 <= bound


@pytest.mark.parametrize("hw", [(48, 64), (224, 224), (300, 500), (37, 1000), (720, 1280), (29, 31)])
def test_image_patches_match_pil_processor(hw):
    h, w = hw
    img = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    proc = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=50176)
    ref = proc(images=[img], return_tensors="np")
    ours, grid = vision_patches(img, min_pixels=56 * 56, max_pixels=50176)
    assert ours.dtype == np.float32
    assert grid == tuple(int(v) for v in ref["image_grid_thw"][0])
    rh, rw = smart_resize(h, w, factor=28, min_pixels=56 * 56, max_pixels=50176)
    assert (rh // 14, rw // 14) == grid[1:] and rh * rw <= 50176 and rh % 28 == 0 and rw % 28 == 0
    err = float(np.abs(ref["pixel_values"] - ours).max())
    print(f"image {hw}: patch max abs error {err:.2e}, grid {grid}")
    assert ref["pixel_values"].shape == ours.shape and err <= PATCH_TOL, err


def test_smart_resize_matches_reference():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    rng = np.random.default_rng(5)
    sizes = [(int(h), int(w)) for h, w in rng.integers(10, 2000, (300, 2))] + [(42, 42), (70, 14 * 9), (1080, 1920)]
    for h, w in sizes:
        for lo, hi in ((56 * 56, 50176), (56 * 56, 28 * 28 * 1280), (128 * 28 * 28, 768 * 28 * 28)):
            assert smart_resize(h, w, min_pixels=lo, max_pixels=hi) == reference(h, w, 28, lo, hi), (h, w, lo, hi)
    assert smart_resize(224, 224, max_pixels=50176) == (224, 224)
    assert smart_resize(1080, 1920, max_pixels=50176) == (168, 280)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500)


def _normalised_value(v):
    x = np.float32(np.float64(v) / 255.0)
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def test_video_frame_pairing_layout():
    """Independent check of the video processor's temporal layout.

    transformers' Qwen2-VL video processor views the clip as (t-pair, frame-in-pair, C, ...)
    and emits rows (t, blocks...) with columns (C, frame-in-pair, row, col); an odd frame
    count is completed by repeating the last frame. Frames here are flat colours identifying
    their index, so every column block names the frame it came from.
    """
    h, w = 56, 84
    values = [10, 60, 110, 160, 210]
    frames = np.stack([np.full((h, w, 3), v, np.uint8) for v in values])
    patches, grid = vision_patches(frames)
    assert grid == (3, 4, 6)
    rows = patches.reshape(3, 4 * 6, 3, 2, 14, 14)  # (t, spatial rows, C, frame-in-pair, p, p)
    source = [[0, 1], [2, 3], [4, 4]]  # last pair repeats frame 4
    for g in range(3):
        for k in range(2):
            want = _normalised_value(values[source[g][k]])
            got = rows[g, :, :, k]  # (spatial, C, p, p)
            np.testing.assert_array_equal(got, np.broadcast_to(want[None, :, None, None], got.shape))


def test_video_patches_pair_image_patches():
    """Frame 2g+k of a video lands in column block k of temporal row g, with the image layout."""
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (4, 60, 90, 3), dtype=np.uint8)
    patches, (gt, gh, gw) = vision_patches(frames)
    assert gt == 2
    rows = patches.reshape(gt, gh * gw, 3, 2, 14 * 14)
    for i in range(4):
        img_patches, img_grid = vision_patches(frames[i])
        assert img_grid == (1, gh, gw)
        img = img_patches.reshape(gh * gw, 3, 2, 14 * 14)
        np.testing.assert_array_equal(rows[i // 2, :, :, i % 2], img[:, :, 0])
        np.testing.assert_array_equal(img[:, :, 0], img[:, :, 1])  # an image fills both slots


def test_vision_patches_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        vision_patches(np.zeros((2, 32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="shape"):
        vision_patches(np.zeros((2, 32, 32), np.uint8))


# ----------------------------------------------------------------------------- whisper


@pytest.fixture(scope="module")
def whisper_fe():
    return WhisperFeatureExtractor(feature_size=128)


def _whisper_reference(fe, wave):
    """The Qwen2.5-Omni processor's call: pad to 30 s, keep the attention-mask length."""
    out = fe(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    n = int(out["attention_mask"][0].sum())
    return out["input_features"][0][:, :n]


@pytest.mark.parametrize("n", [128000, 19744, 401, 150])
def test_whisper_log_mel_matches_processor(whisper_fe, n):
    wave = _signal(n, seed=n)
    ref = _whisper_reference(whisper_fe, wave)
    ours = whisper_log_mel(wave)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (128, whisper_num_frames(n))
    err = float(np.abs(ref - ours).max())
    print(f"whisper log-mel n={n}: max abs error {err:.2e}")
    assert err <= MEL_TOL, err


def test_whisper_log_mel_loud_tail(whisper_fe):
    """A burst in the last samples peaks in the frame just past the valid length.

    With N a multiple of the hop, the first frame beyond ceil(N / hop) is centred on the
    burst; its value sets the reference's max - 8 floor, so it must count here too.
    """
    wave = 1e-4 * _signal(16000)
    wave[-10:] = 0.9
    out = whisper_fe(wave, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="np")
    full = out["input_features"][0]
    n = int(out["attention_mask"][0].sum())
    assert full[:, n].max() > full[:, :n].max() + 0.1  # the premise: the peak is past the end
    err = float(np.abs(full[:, :n] - whisper_log_mel(wave)).max())
    print(f"whisper log-mel loud tail: max abs error {err:.2e}")
    assert err <= MEL_TOL, err


def test_whisper_log_mel_numpy_reference(whisper_fe):
    wave = _signal(19744, seed=7)
    padded = np.zeros(whisper_fe.n_samples, np.float32)
    padded[: wave.shape[0]] = wave
    ref = whisper_fe._np_extract_fbank_features(padded[None], "cpu")[0][:, : whisper_num_frames(wave.shape[0])]
    err = float(np.abs(ref - whisper_log_mel(wave)).max())
    print(f"whisper log-mel vs NumPy path: max abs error {err:.2e}")
    assert err <= 1e-6, err


# ----------------------------------------------------------------------------- BEATs fbank


def _lhotse_fbank():
    from lhotse.features.kaldi.layers import Wav2LogFilterBank

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lhotse warns that snip_edges=True is unusual for it
        return Wav2LogFilterBank(
            sampling_rate=16000,
            frame_length=0.025,
            frame_shift=0.01,
            round_to_power_of_two=True,
            remove_dc_offset=True,
            preemph_coeff=0.97,
            window_type="povey",
            dither=0.0,
            snip_edges=True,
            use_energy=False,
            use_fft_mag=False,  # power spectrum
            low_freq=20.0,
            high_freq=0.0,  # Nyquist
            num_filters=128,
            norm_filters=False,
            torchaudio_compatible_mel_scale=True,
        )


def _normalise(x):
    return (x - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)


@pytest.mark.parametrize("n", [128000, 16000, 567, 400])
def test_beats_fbank_matches_lhotse(n):
    wave = _signal(n, seed=n)
    with torch.no_grad():
        ref = _normalise(_lhotse_fbank()(torch.from_numpy(wave[None] * 32768.0))[0].numpy())
    ours = beats_fbank(wave)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (1 + (n - 400) // 160, 128)
    err = float(np.abs(ref - ours).max())
    print(f"beats fbank n={n}: max abs error vs lhotse float32 {err:.2e}")
    assert err <= FBANK_TOL, err


def test_beats_fbank_float64_oracle():
    """With lhotse in float64 and exact banks/window, only FFT round-off remains."""
    module = _lhotse_fbank().double()
    banks = kaldi_mel_banks(128, 512, 16000)
    bank_err = float(np.abs(module._fb.detach().numpy() - banks).max())
    assert bank_err <= 2e-5, bank_err  # lhotse builds the banks in float32
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85
    with torch.no_grad():
        module._fb.copy_(torch.from_numpy(banks))
        module.wav2win._window.copy_(torch.from_numpy(povey))
        wave = _signal(16000, seed=3)
        ref = _normalise(module(torch.from_numpy(wave[None].astype(np.float64) * 32768.0))[0].numpy())
    err = float(np.abs(ref - beats_fbank(wave)).max())
    print(f"beats fbank vs lhotse float64: max abs error {err:.2e} (banks {bank_err:.1e})")
    assert err <= 1e-6, err


def test_beats_fbank_short_input():
    with pytest.raises(ValueError, match="at least 400"):
        beats_fbank(np.zeros(399, np.float32))
