"""Positive-view augmentations: determinism per seed, parameter ranges, exact op semantics."""

from collections import Counter

import numpy as np
import pytest

from omniret_jax.data.augment import (
    AudioAugParams,
    VideoAugParams,
    apply_audio_params,
    apply_video_params,
    augment_audio,
    augment_caption,
    augment_video,
    change_speed,
    sample_audio_params,
    sample_video_params,
)


@pytest.fixture
def clip():
    return np.random.default_rng(0).integers(0, 256, (3, 12, 16, 3), dtype=np.uint8)


@pytest.fixture
def tone():
    t = np.arange(16000) / 16000
    return (0.5 * np.sin(2 * np.pi * 500 * t)).astype(np.float32)


CAPTION = "a brown dog runs across the wet sand while waves crash behind it at sunset today"


# ----------------------------------------------------------------------------- video


def test_video_deterministic_and_shape(clip):
    a = augment_video(clip, np.random.default_rng(7))
    b = augment_video(clip, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    assert a.shape == clip.shape and a.dtype == np.uint8
    outs = {augment_video(clip, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert len(outs) > 5


def test_video_param_ranges():
    rng = np.random.default_rng(1)
    params = [sample_video_params(rng, p=1.0) for _ in range(200)]
    for name in ("brightness", "contrast", "saturation"):
        vals = np.array([getattr(q, name) for q in params])
        assert vals.min() >= 0.8 and vals.max() <= 1.2 and vals.std() > 0.05, name
    assert all(q.flip for q in params)
    assert all(sample_video_params(rng, p=0.0) == VideoAugParams() for _ in range(20))
    half = [sample_video_params(rng, p=0.5) for _ in range(400)]
    assert 0.35 < np.mean([q.flip for q in half]) < 0.65
    assert 0.35 < np.mean([q.brightness != 1.0 for q in half]) < 0.65


def test_video_ops_exact(clip):
    np.testing.assert_array_equal(apply_video_params(clip, VideoAugParams()), clip)
    np.testing.assert_array_equal(apply_video_params(clip, VideoAugParams(flip=True)), clip[:, :, ::-1])
    bright = apply_video_params(clip, VideoAugParams(brightness=1.1))
    np.testing.assert_array_equal(bright, np.rint(np.clip(clip.astype(np.float32) * np.float32(1.1), 0, 255)))
    # Contrast keeps each frame's mean (up to clipping and rounding); saturation keeps greys.
    low = apply_video_params(clip, VideoAugParams(contrast=0.8)).astype(np.float64)
    np.testing.assert_allclose(low.mean(axis=(1, 2, 3)), clip.mean(axis=(1, 2, 3)), atol=0.5)
    assert low.std() < clip.std()
    grey = np.repeat(clip[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(apply_video_params(grey, VideoAugParams(saturation=1.2)), grey)
    with pytest.raises(ValueError, match="uint8"):
        apply_video_params(clip.astype(np.float32), VideoAugParams())


# ----------------------------------------------------------------------------- audio


def test_audio_deterministic_and_shape(tone):
    a = augment_audio(tone, np.random.default_rng(3))
    b = augment_audio(tone, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.shape == tone.shape and a.dtype == np.float32 and np.abs(a).max() <= 1.0
    outs = {augment_audio(tone, np.random.default_rng(s)).tobytes() for s in range(10)}
    assert len(outs) > 5


def test_audio_param_ranges():
    rng = np.random.default_rng(2)
    params = [sample_audio_params(rng, p=1.0) for _ in range(200)]
    for name, lo, hi in (("gain", 0.8, 1.2), ("noise_level", 0.001, 0.01), ("speed", 0.9, 1.1), ("shift", -0.1, 0.1)):
        vals = np.array([getattr(q, name) for q in params])
        assert vals.min() >= lo and vals.max() <= hi and vals.std() > 0, name
    off = sample_audio_params(rng, p=0.0)
    assert (off.gain, off.noise_level, off.speed, off.shift) == (1.0, 0.0, 1.0, 0.0)


def _peak_hz(x, sr=16000):
    return np.argmax(np.abs(np.fft.rfft(x * np.hanning(len(x))))) * sr / len(x)


def test_audio_ops_exact(tone):
    np.testing.assert_array_equal(apply_audio_params(tone, AudioAugParams()), tone)
    np.testing.assert_allclose(apply_audio_params(tone, AudioAugParams(gain=0.8)), tone * 0.8, atol=1e-7)
    shifted = apply_audio_params(tone, AudioAugParams(shift=-0.05))
    np.testing.assert_array_equal(shifted, np.roll(tone, -800))
    noisy = apply_audio_params(tone, AudioAugParams(noise_level=0.01, noise_seed=5))
    resid = noisy.astype(np.float64) - tone
    assert abs(resid.std() - 0.01 * 0.5) < 0.0005
    np.testing.assert_array_equal(noisy, apply_audio_params(tone, AudioAugParams(noise_level=0.01, noise_seed=5)))
    for speed in (0.9, 1.1):
        fast = apply_audio_params(tone, AudioAugParams(speed=speed))
        assert fast.shape == tone.shape
        kept = int(len(tone) / speed) if speed > 1 else len(tone)
        assert _peak_hz(fast[:kept]) == pytest.approx(500 * speed, abs=2.0)
    slow = change_speed(tone.astype(np.float64), 1.1)
    assert not slow[int(16000 / 1.1) :].any()  # faster playback ends early, zero-padded


def test_audio_clips_to_unit_range():
    loud = np.full(100, 0.95, np.float32)
    assert apply_audio_params(loud, AudioAugParams(gain=1.2)).max() == 1.0
    with pytest.raises(ValueError, match="float"):
        apply_audio_params(np.zeros(10, np.int16), AudioAugParams())


# ----------------------------------------------------------------------------- caption


def test_caption_deterministic():
    a = augment_caption(CAPTION, np.random.default_rng(11))
    assert a == augment_caption(CAPTION, np.random.default_rng(11))
    assert len({augment_caption(CAPTION, np.random.default_rng(s)) for s in range(20)}) > 10


def test_caption_drop_fraction():
    words = CAPTION.split()
    n = len(words)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        out = augment_caption(CAPTION, rng, p=1.0).split()
        dropped = n - len(out)
        assert 0.1 * n - 0.5 <= dropped <= 0.2 * n + 0.5 and dropped >= 1
        assert not Counter(out) - Counter(words)  # only removals (and reordering)


def test_caption_swaps_are_adjacent():
    words = [f"w{i}" for i in range(10)]
    text = " ".join(words)
    for seed in range(50):
        rng = np.random.default_rng(seed)
        out = augment_caption(text, rng, p=1.0).split()
        kept = [w for w in words if w in out]  # drop keeps relative order
        assert sorted(out) == sorted(kept)
        assert len(kept) in (8, 9)  # round(f * 10) words dropped, f in [0.1, 0.2]
        moved = sum(a != b for a, b in zip(out, kept))
        assert 2 <= moved <= 4  # one swap moves 2 words; two distinct swaps move 3 or 4
        pos = {w: i for i, w in enumerate(kept)}
        assert all(abs(pos[w] - i) <= 2 for i, w in enumerate(out))


def test_caption_never_empty():
    rng = np.random.default_rng(0)
    for text in ("hello", "two words", "  padded   spaces here "):
        for _ in range(30):
            out = augment_caption(text, rng, p=1.0)
            assert out.strip() and set(out.split()) <= set(text.split())
    assert augment_caption("hello", rng, p=1.0) == "hello"
    assert augment_caption(CAPTION, rng, p=0.0) == CAPTION
    with pytest.raises(ValueError, match="non-empty"):
        augment_caption("   ", rng)
