"""PyAV decoding: real H.264/AAC MP4 and WAV files written here, plus every bad-file case.

The video's frame i is a flat grey of value 4*i (lossless H.264, qp=0), so the pixels of a
decoded frame identify which source frame was sampled.
"""

import time

import av
import numpy as np
import pytest

from omniret_jax.data.decode import MediaError, crop_or_pad, decode_audio, decode_video, probe

FPS = 25
SECONDS = 2.0
W, H = 64, 48
N_FRAMES = int(FPS * SECONDS)
AUDIO_SR = 44100
TONE_HZ = 440.0


def _write_media(path, *, video=True, audio=True, seconds=SECONDS, tone_hz=TONE_HZ, options=None, fmt=None):
    out = av.open(str(path), "w", format=fmt, options=options or {})
    vs = as_ = None
    if video:
        vs = out.add_stream("h264", rate=FPS, options={"qp": "0", "preset": "ultrafast"})
        vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
    if audio:
        as_ = out.add_stream("aac", rate=AUDIO_SR)
        as_.layout = "stereo"
    if video:
        for i in range(int(FPS * seconds)):
            img = np.full((H, W, 3), 4 * i, np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in vs.encode():
            out.mux(p)
    if audio:
        t = np.arange(int(seconds * AUDIO_SR)) / AUDIO_SR
        x = (0.5 * np.sin(2 * np.pi * tone_hz * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([x, x]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts = AUDIO_SR, 0
        for p in as_.encode(frame):
            out.mux(p)
        for p in as_.encode(None):
            out.mux(p)
    out.close()
    return str(path)


def _write_wav(path, samples: np.ndarray, sr: int):
    out = av.open(str(path), "w", format="wav")
    st = out.add_stream("pcm_s16le", rate=sr)
    st.layout = "mono"
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype(np.int16)[None]
    frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
    frame.sample_rate, frame.pts = sr, 0
    for p in st.encode(frame):
        out.mux(p)
    for p in st.encode(None):
        out.mux(p)
    out.close()
    return str(path)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    files = {
        "av": _write_media(d / "av.mp4"),
        "faststart": _write_media(d / "fs.mp4", options={"movflags": "faststart"}),
        "video_only": _write_media(d / "video_only.mp4", audio=False),
        "audio_only": _write_media(d / "audio_only.m4a", video=False, fmt="mp4"),
        "wav": _write_wav(d / "tone.wav", 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(110250) / AUDIO_SR), AUDIO_SR),
        "silent": _write_wav(d / "silent.wav", np.zeros(AUDIO_SR), AUDIO_SR),
    }
    (d / "empty.mp4").write_bytes(b"")
    files["empty"] = str(d / "empty.mp4")
    (d / "garbage.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    files["garbage"] = str(d / "garbage.mp4")
    for key in ("av", "faststart"):  # cut in half: loses the trailing moov / half of mdat
        data = open(files[key], "rb").read()
        (d / f"{key}_cut.mp4").write_bytes(data[: len(data) // 2])
        files[f"{key}_cut"] = str(d / f"{key}_cut.mp4")
    # A Matroska file whose codec id no decoder knows (H.264 bitstream under a made-up id).
    mkv = _write_media(d / "h264.mkv", audio=False, fmt="matroska")
    data = open(mkv, "rb").read()
    assert data.count(b"V_MPEG4/ISO/AVC") == 1
    (d / "unknown_codec.mkv").write_bytes(data.replace(b"V_MPEG4/ISO/AVC", b"V_ZZZZZ/ISO/ZZZ"))
    files["unknown_codec"] = str(d / "unknown_codec.mkv")
    files["missing"] = str(d / "does_not_exist.mp4")
    return files


def _frame_ids(frames):
    """Source index of each decoded flat-grey frame (value 4*i, lossless encode +-1)."""
    means = frames.reshape(frames.shape[0], -1).astype(np.float64).mean(axis=1)
    ids = np.round(means / 4).astype(int)
    assert np.all(np.abs(means - 4 * ids) <= 1.5), means
    return ids


def test_probe(media):
    info = probe(media["av"])
    assert info.has_video and info.has_audio
    assert info.duration_s == pytest.approx(SECONDS, abs=0.05)
    assert info.fps == pytest.approx(FPS)
    assert (info.width, info.height) == (W, H)
    assert info.num_frames == N_FRAMES
    assert info.sample_rate == AUDIO_SR and info.audio_channels == 2
    a = probe(media["audio_only"])
    assert a.has_audio and not a.has_video and a.fps is None
    u = probe(media["unknown_codec"])
    assert u.has_video and u.width is None


def test_uniform_sampling_matches_reference_indices(media):
    frames, ts = decode_video(media["av"], num_frames=8)
    assert frames.shape == (8, H, W, 3) and frames.dtype == np.uint8
    assert ts.dtype == np.float64
    expected = np.linspace(0, N_FRAMES - 1, 8).astype(int)  # the reference's frame indices
    np.testing.assert_array_equal(_frame_ids(frames), expected)
    np.testing.assert_allclose(ts, expected / FPS, atol=1e-9)
    threaded, ts2 = decode_video(media["av"], num_frames=8, threads=2)  # frame threading: same frames
    np.testing.assert_array_equal(threaded, frames)
    np.testing.assert_array_equal(ts2, ts)


def test_fixed_spacing_and_cap(media):
    frames, ts = decode_video(media["av"], spacing_s=0.4)
    np.testing.assert_array_equal(_frame_ids(frames), [0, 10, 20, 30, 40])
    np.testing.assert_allclose(ts, [0.0, 0.4, 0.8, 1.2, 1.6], atol=1e-9)
    frames, ts = decode_video(media["av"], spacing_s=0.5)  # frame on screen at 0, .5, 1, 1.5 s
    np.testing.assert_array_equal(_frame_ids(frames), [0, 12, 25, 37])
    capped, _ = decode_video(media["av"], spacing_s=0.1, max_frames=7)
    np.testing.assert_array_equal(_frame_ids(capped), np.arange(7) * 2.5 // 1)
    # The reference's variant: round(duration / spacing) frames spread by linspace.
    ref, _ = decode_video(media["av"], spacing_s=0.5, spacing_like_reference=True)
    np.testing.assert_array_equal(_frame_ids(ref), np.linspace(0, N_FRAMES - 1, 4).astype(int))
    few, _ = decode_video(media["av"], spacing_s=10.0, min_frames=3)
    np.testing.assert_array_equal(_frame_ids(few), [0, 24, 49])
    with pytest.raises(ValueError, match="max_frames"):
        decode_video(media["av"], num_frames=200, max_frames=128)


def test_window(media):
    frames, ts = decode_video(media["av"], num_frames=4, start_s=0.5, end_s=1.5)
    # frames 13..37 have 0.5 <= i/25 < 1.5; linspace(0, 24, 4) picks 0, 8, 16, 24 of them
    np.testing.assert_array_equal(_frame_ids(frames), [13, 21, 29, 37])
    assert ts.min() >= 0.5 and ts.max() < 1.5
    with pytest.raises(ValueError, match="no video frames"):
        decode_video(media["av"], start_s=5.0)


def _peak_hz(wave, sr):
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return np.argmax(spec) * sr / len(wave)


def test_audio_from_mp4_resampled(media):
    wave = decode_audio(media["av"], sr=16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == int(SECONDS * 16000)  # trimmed to the stream's declared duration
    assert np.abs(wave).max() <= 1.0
    assert _peak_hz(wave, 16000) == pytest.approx(TONE_HZ, abs=1.0)
    assert np.abs(wave[4000:-4000]).max() == pytest.approx(0.5, abs=0.03)
    left = decode_audio(media["av"], sr=16000, channel=0)  # same tone in both channels,
    np.testing.assert_allclose(left, wave, atol=2e-3)  # up to AAC's lossy stereo coding
    assert not np.array_equal(left, wave)
    with pytest.raises(ValueError, match="channel=2"):
        decode_audio(media["av"], channel=2)


def test_audio_from_wav_44k_sine_phase_and_length(media):
    wave = decode_audio(media["wav"], sr=16000)
    assert wave.shape == (40000,)
    assert _peak_hz(wave, 16000) == pytest.approx(1000.0, abs=1.0)
    ideal = 0.5 * np.sin(2 * np.pi * 1000.0 * np.arange(40000) / 16000)
    err = np.abs(wave[200:-200] - ideal[200:-200]).max()
    print(f"WAV 44.1k->16k sine max abs error vs ideal (interior): {err:.2e}")
    assert err < 5e-3, err  # resampler keeps sample alignment (no delay)


def test_audio_window(media):
    full = decode_audio(media["wav"], sr=16000)
    part = decode_audio(media["wav"], sr=16000, start_s=0.5, end_s=1.5)  # no seek (< 1 s)
    assert part.shape == (16000,)
    np.testing.assert_allclose(part, full[8000:24000], atol=1e-6)
    # Windows past 1 s seek first; the samples must still land on the full decode's grid.
    for key, start, end in (("wav", 1.2345, 2.2), ("av", 1.1, 1.9)):
        full = decode_audio(media[key], sr=16000)
        part = decode_audio(media[key], sr=16000, start_s=start, end_s=end)
        lo, hi = round(start * 16000), round(end * 16000)
        assert part.shape == (hi - lo,)
        err = float(np.abs(part - full[lo:hi]).max())
        print(f"{key} window [{start}, {end}) after seek: max abs error vs full decode {err:.1e}")
        assert err <= 1e-6, err


def test_crop_or_pad():
    rng = np.random.default_rng(0)
    long = np.arange(200, dtype=np.float32)
    out = crop_or_pad(long, seconds=1.0, sr=100, mode="random", rng=np.random.default_rng(3))
    again = crop_or_pad(long, seconds=1.0, sr=100, mode="random", rng=np.random.default_rng(3))
    assert out.shape == (100,) and out.dtype == np.float32
    np.testing.assert_array_equal(out, again)
    assert np.all(np.diff(out) == 1) and 0 <= out[0] <= 100
    offsets = {crop_or_pad(long, seconds=1.0, sr=100, mode="random", rng=rng)[0] for _ in range(20)}
    assert len(offsets) > 1
    np.testing.assert_array_equal(crop_or_pad(long, seconds=1.0, sr=100, mode="center"), long[50:150])
    np.testing.assert_array_equal(crop_or_pad(long, seconds=1.0, sr=100, mode="start"), long[:100])
    short = np.ones(30, dtype=np.float32)
    padded = crop_or_pad(short, seconds=1.0, sr=100, mode="center")
    assert padded.shape == (100,) and padded[:30].sum() == 30 and not padded[30:].any()
    with pytest.raises(ValueError, match="rng"):
        crop_or_pad(long, seconds=1.0, sr=100, mode="random")
    with pytest.raises(ValueError, match="mode"):
        crop_or_pad(long, seconds=1.0, sr=100, mode="middle")


@pytest.mark.parametrize(
    "key, fn, reason",
    [
        ("missing", decode_video, "missing_file"),
        ("missing", decode_audio, "missing_file"),
        ("missing", probe, "missing_file"),
        ("empty", decode_video, "empty_file"),
        ("empty", probe, "empty_file"),
        ("av_cut", decode_video, "corrupt"),  # moov atom lost
        ("av_cut", decode_audio, "corrupt"),
        ("faststart_cut", decode_video, "corrupt"),  # headers intact, half the frames missing
        ("faststart_cut", decode_audio, "corrupt"),
        ("video_only", decode_audio, "no_audio_stream"),
        ("audio_only", decode_video, "no_video_stream"),
        ("garbage", decode_video, "corrupt"),
        ("garbage", probe, "corrupt"),
        ("unknown_codec", decode_video, "unsupported_codec"),
    ],
)
def test_bad_files(media, key, fn, reason):
    t0 = time.perf_counter()
    with pytest.raises(MediaError) as info:
        fn(media[key])
    assert info.value.reason == reason, str(info.value)
    assert info.value.path == media[key]
    assert time.perf_counter() - t0 < 5.0  # bounded: never hangs on a broken file


def test_silent_audio(media):
    wave = decode_audio(media["silent"])
    assert wave.shape == (16000,) and not wave.any()
    with pytest.raises(MediaError) as info:
        decode_audio(media["silent"], reject_silent=True)
    assert info.value.reason == "silent_audio"
    assert decode_audio(media["wav"], reject_silent=True).shape == (40000,)


def test_media_error_rejects_unknown_reason():
    with pytest.raises(ValueError, match="unknown MediaError reason"):
        MediaError("bad", "x.mp4")
