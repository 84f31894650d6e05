"""grain pipeline: exact features, fixed shapes, process slicing, resumable state, bad input.

Every bad-input case is a real file written here (zero bytes, truncated MP4, random bytes, a
stream with an unknown codec tag, no video stream, no audio track, silent audio, ...), and the
pipeline must count each by reason without raising, hanging or shrinking a batch.
"""

import dataclasses
import json
import os
import time

import av
import numpy as np
import pytest

from omniret_jax.data import decode, features, pipeline, synth
from omniret_jax.data.manifest import ManifestRecord, read_manifest
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig

# Small but real: 4 frames at 56x56 (32 patches), up to 6272 px (P = 64), 3 s audio on 2 s clips.
CFG = PipelineConfig(batch_size=2, seed=1, num_frames=4, min_pixels=56 * 56, max_pixels=2 * 56 * 56,
                     audio_seconds=3.0, num_epochs=1, sample_timeout_s=30.0)
SR = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    synth.generate(str(out), 6, seed=2, settings=synth.SynthSettings(seconds=2.0, size=32),
                   progress=False)
    return read_manifest(out / "manifest.jsonl")


def _write_mp4(path, frames=None, wave=None, options=None):
    """An MP4 with an optional H.264 stream and an optional mono AAC stream."""
    with av.open(str(path), "w", format="mp4", options=options or {}) as c:
        if frames is not None:
            v = c.add_stream("libx264", rate=10)
            v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        if wave is not None:
            a = c.add_stream("aac", rate=SR, layout="mono")
        if frames is not None:
            for f in frames:
                c.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            c.mux(v.encode())
        if wave is not None:
            for s in range(0, len(wave), 1024):
                fr = av.AudioFrame.from_ndarray(wave[None, s:s + 1024], format="flt", layout="mono")
                fr.sample_rate, fr.pts = SR, s
                c.mux(a.encode(fr))
            c.mux(a.encode())


def _expected_view(record, cfg, wave_override=None):
    frames, times = decode.decode_video(record.video, num_frames=cfg.num_frames)
    patches, grid = features.vision_patches(frames, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    wave = decode.decode_audio(record.video) if wave_override is None else wave_override
    crop = decode.crop_or_pad(wave, seconds=cfg.audio_seconds, mode="start")
    return patches, grid, times, wave.shape[0], features.whisper_log_mel(crop), features.beats_fbank(crop)


def _assert_batch_shapes(batch, cfg):
    b, p = cfg.batch_size, cfg.num_patches
    n_mel = features.whisper_num_frames(int(cfg.audio_seconds * SR))
    n_fb = 1 + (int(cfg.audio_seconds * SR) - 400) // 160
    assert len(batch["caption"]) == b and len(batch.get("id", batch["caption"])) == b
    assert batch["video_patches"].shape == (b, p, 1176) and batch["video_patches"].dtype == np.float32
    assert batch["video_grid_thw"].shape == (b, 3)
    assert batch["mel"].shape == (b, 128, n_mel) and batch["fbank"].shape == (b, n_fb, 128)
    for key in ("video_num_patches", "mel_len", "fbank_len", "video_second_per_grid"):
        assert batch[key].shape == (b,)


def test_exact_features_and_padding(corpus):
    with DataPipeline(corpus, CFG, process_index=0, process_count=1) as pipe:
        batches = list(pipe)
    assert len(batches) == 3 and CFG.num_patches == 64
    by_id = {r.id: r for r in corpus}
    for batch in batches:
        _assert_batch_shapes(batch, CFG)
        for i, rid in enumerate(batch["id"]):
            patches, grid, _, n_samples, mel, fbank = _expected_view(by_id[rid], CFG)
            n = patches.shape[0]
            assert batch["caption"][i] == by_id[rid].caption
            assert batch["video_num_patches"][i] == n == 32
            assert tuple(batch["video_grid_thw"][i]) == grid == (2, 4, 4)
            np.testing.assert_array_equal(batch["video_patches"][i, :n], patches)
            assert not batch["video_patches"][i, n:].any()
            # The reference's 2 / fps with fps = frames sampled / clip length (20 frames at 10 fps).
            assert batch["video_second_per_grid"][i] == np.float32(2 * 2.0 / 4)
            np.testing.assert_array_equal(batch["mel"][i], mel)
            np.testing.assert_array_equal(batch["fbank"][i], fbank)
            # 2 s clips in a 3 s crop: the lengths count the frames that cover real audio.
            assert batch["mel_len"][i] == -(-n_samples // 160) == 200
            assert batch["fbank_len"][i] == 1 + (n_samples - 400) // 160
    assert sorted(i for b in batches for i in b["id"]) == sorted(by_id)
    print(pipe.summary())


def test_process_slices_and_epochs(corpus):
    cfg = dataclasses.replace(CFG, batch_size=1, max_pixels=56 * 56, audio_seconds=1.0)
    seen = []
    for index in range(2):
        with DataPipeline(corpus, cfg, process_index=index, process_count=2) as pipe:
            seen.append([b["id"][0] for b in pipe])
    assert len(seen[0]) == len(seen[1]) == 3
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == {r.id for r in corpus}
    # Two epochs on one process: every record twice, in a different order the second time.
    two = dataclasses.replace(cfg, num_epochs=2)
    with DataPipeline(corpus, two, process_index=0, process_count=1) as pipe:
        ids = [b["id"][0] for b in pipe]
    assert sorted(ids[:6]) == sorted(ids[6:]) == sorted(r.id for r in corpus)
    assert ids[:6] != ids[6:]


def _assert_same_batches(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for key in w:
            if isinstance(w[key], dict):
                _assert_same_batches([g[key]], [w[key]])
            elif isinstance(w[key], list):
                assert g[key] == w[key]
            else:
                np.testing.assert_array_equal(g[key], w[key])


def test_state_round_trip_with_augmentation(corpus):
    cfg = dataclasses.replace(CFG, num_epochs=None, augment=True, audio_mode="random",
                            max_pixels=56 * 56)
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        head = [next(pipe) for _ in range(2)]
        state = json.loads(json.dumps(pipe.get_state()))  # what a checkpoint stores
        summary = pipe.summary()
        want = [next(pipe) for _ in range(3)]  # crosses the epoch boundary (6 records)
    assert summary.yielded == 4
    for batch in head:
        _assert_batch_shapes(batch["aug"], cfg)
        assert "id" not in batch["aug"]
    # The second view is a perturbed copy: over 4 samples each modality changed at least once.
    changed = {k: 0 for k in ("caption", "video_patches", "mel")}
    for b in head:
        for i in range(2):
            for k in changed:
                changed[k] += not np.array_equal(np.asarray(b[k][i]), np.asarray(b["aug"][k][i]))
    print("augmented views that differ from the anchor (of 4):", changed)
    assert all(changed.values()), changed
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as again:
        again.set_state(state)
        assert again.summary() == summary
        got = [next(again) for _ in range(3)]
    _assert_same_batches(got, want)


def test_workers_match_in_process_stream_and_resume(corpus):
    """Decoding in 2 worker processes gives the same stream, and its state resumes exactly."""
    cfg = dataclasses.replace(CFG, num_epochs=None, max_pixels=56 * 56, audio_seconds=1.0)
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        want = [next(pipe) for _ in range(4)]
    mp_cfg = dataclasses.replace(cfg, num_workers=2)
    t0 = time.perf_counter()
    with DataPipeline(corpus, mp_cfg, process_index=0, process_count=1) as pipe:
        got = [next(pipe) for _ in range(2)]
        state = json.loads(json.dumps(pipe.get_state()))
    with DataPipeline(corpus, mp_cfg, process_index=0, process_count=1) as pipe:
        pipe.set_state(state)
        got += [next(pipe) for _ in range(2)]
        assert pipe.summary().yielded == 8
    print(f"two worker pipelines (incl. spawn) took {time.perf_counter() - t0:.1f} s")
    _assert_same_batches(got, want)


@pytest.fixture(scope="module")
def bad_records(corpus, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (20, 32, 32, 3), dtype=np.uint8)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(2 * SR) / SR)).astype(np.float32)
    good = corpus[0].video
    (d / "empty.mp4").write_bytes(b"")
    (d / "garbage.mp4").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _write_mp4(d / "faststart.mp4", frames, tone, options={"movflags": "faststart"})
    data = (d / "faststart.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])  # header intact, data cut
    (d / "unknown_codec.mp4").write_bytes(open(good, "rb").read().replace(b"avc1", b"zzzz"))
    _write_mp4(d / "no_video.mp4", None, tone)
    _write_mp4(d / "no_audio.mp4", frames, None)
    _write_mp4(d / "silent.mp4", frames, np.zeros(2 * SR, np.float32))

    def rec(rid, video, **kw):
        return ManifestRecord(id=rid, caption=kw.pop("caption", f"clip {rid}"), video=str(video), **kw)

    records = list(corpus[:4]) + [
        rec("missing", d / "nope.mp4"),
        rec("empty", d / "empty.mp4"),
        rec("garbage", d / "garbage.mp4"),
        rec("truncated", d / "truncated.mp4"),
        rec("unknown_codec", d / "unknown_codec.mp4"),
        rec("no_video", d / "no_video.mp4"),
        rec("no_audio", d / "no_audio.mp4"),
        rec("silent", d / "silent.mp4"),
        rec("audio_file_missing", good, audio=str(d / "missing.wav")),
        rec("caption_empty", good, caption="   "),
        rec("caption_long", good, caption="word " * 40),
        rec("window", good, start=10.0, end=12.0),
    ]
    return records


EXPECTED_SKIPS = {"video/missing_file": 1, "video/empty_file": 1, "video/corrupt": 2,
                  "video/unsupported_codec": 1, "video/no_video_stream": 1,
                  "caption/empty": 1, "caption/too_long": 1, "video/out_of_range": 1}
AUDIO_PROBLEMS = {"audio/no_audio_stream": 1, "audio/silent_audio": 1, "audio/missing_file": 1}


def test_bad_inputs_silence_fallback(bad_records):
    cfg = dataclasses.replace(CFG, max_caption_chars=120, max_pixels=56 * 56)
    t0 = time.perf_counter()
    with DataPipeline(bad_records, cfg, process_index=0, process_count=1) as pipe:
        batches = list(pipe)
        summary = pipe.summary()
    print(f"{time.perf_counter() - t0:.1f} s\n{summary}")
    for batch in batches:
        _assert_batch_shapes(batch, cfg)
    ids = sorted(i for b in batches for i in b["id"])
    # 4 good + 3 kept with silent audio = 7 -> 3 full batches, the 7th sample is the remainder.
    assert len(ids) == 6 and set(ids) <= {r.id for r in bad_records[:4]} | {
        "no_audio", "silent", "audio_file_missing"}
    assert summary.skipped == EXPECTED_SKIPS
    assert summary.fallbacks == AUDIO_PROBLEMS
    assert summary.seen == len(bad_records) and summary.yielded == 7
    assert set(summary.examples["skipped:video/corrupt"]) == {"garbage", "truncated"}
    metrics = summary.metrics()
    assert metrics["data/skipped"] == 9 and metrics["data/fallback/audio/silent_audio"] == 1
    # A fallback sample carries the features of a silent crop over its whole length.
    silence = np.zeros(int(cfg.audio_seconds * SR), np.float32)
    for batch in batches:
        for i, rid in enumerate(batch["id"]):
            if rid in ("no_audio", "silent", "audio_file_missing"):
                np.testing.assert_array_equal(batch["mel"][i], features.whisper_log_mel(silence))
                assert batch["mel_len"][i] == batch["mel"].shape[-1]


def test_bad_inputs_skip_audio(bad_records):
    cfg = dataclasses.replace(CFG, max_caption_chars=120, max_pixels=56 * 56, on_missing_audio="skip")
    with DataPipeline(bad_records, cfg, process_index=0, process_count=1) as pipe:
        batches = list(pipe)
        summary = pipe.summary()
    assert sorted(i for b in batches for i in b["id"]) == sorted(r.id for r in bad_records[:4])
    assert summary.skipped == {**EXPECTED_SKIPS, **AUDIO_PROBLEMS} and summary.fallbacks == {}


def test_timeout_and_unexpected_errors(corpus, monkeypatch):
    real = decode.decode_video

    def flaky(path, **kw):
        if path == corpus[1].video:
            time.sleep(20)  # a decode that hangs
        if path == corpus[2].video:
            raise KeyError("bug")
        return real(path, **kw)

    monkeypatch.setattr(pipeline.decode, "decode_video", flaky)
    cfg = dataclasses.replace(CFG, batch_size=1, max_pixels=56 * 56, audio_seconds=1.0,
                            sample_timeout_s=0.5)
    t0 = time.perf_counter()
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        ids = [b["id"][0] for b in pipe]
        summary = pipe.summary()
    elapsed = time.perf_counter() - t0
    print(f"timeout case finished in {elapsed:.1f} s: {summary.skipped}")
    assert elapsed < 15
    assert summary.skipped == {"timeout": 1, "error/KeyError": 1}
    assert sorted(ids) == sorted(r.id for r in corpus[:1] + corpus[3:])
    with pytest.raises(KeyError):
        with DataPipeline(corpus, dataclasses.replace(cfg, strict=True, shuffle=False),
                          process_index=0, process_count=1) as pipe:
            next(pipe), next(pipe), next(pipe)


class _HangingLoad(pipeline.LoadSample):
    """Hangs on one record; importable by reference, so it also runs inside worker processes."""

    def _load(self, record, rng):
        if record.id == "synth-000003":
            time.sleep(60)
        return super()._load(record, rng)


def test_worker_process_timeout(corpus, monkeypatch):
    monkeypatch.setattr(pipeline, "LoadSample", _HangingLoad)
    cfg = dataclasses.replace(CFG, batch_size=1, max_pixels=56 * 56, audio_seconds=1.0,
                              sample_timeout_s=1.0, num_workers=1)
    t0 = time.perf_counter()
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        ids = [b["id"][0] for b in pipe]
        summary = pipe.summary()
    print(f"worker timeout case took {time.perf_counter() - t0:.1f} s")
    assert summary.skipped == {"timeout": 1} and summary.examples["skipped:timeout"] == ["synth-000003"]
    assert sorted(ids) == sorted(r.id for r in corpus if r.id != "synth-000003")


def test_unusable_corpus_fails_loudly(corpus):
    cfg = dataclasses.replace(CFG, num_epochs=None, max_patches=8, max_consecutive_skips=9,
                            max_pixels=56 * 56, audio_seconds=1.0)
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        with pytest.raises(RuntimeError, match="9 consecutive samples were skipped") as info:
            next(pipe)
    assert "video/too_many_patches" in str(info.value)


def test_config_and_argument_errors(corpus, tmp_path):
    for bad in ({"on_missing_audio": "drop"}, {"audio_mode": "end"}, {"batch_size": 0},
                {"num_frames": 200}, {"min_pixels": 9000, "max_pixels": 3000}):
        with pytest.raises(ValueError, match="bad PipelineConfig"):
            PipelineConfig(**bad)
    with pytest.raises(ValueError, match="process_index"):
        DataPipeline(corpus, CFG, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot feed"):
        DataPipeline(corpus[:1], CFG, process_index=0, process_count=2)
    # Training defaults: 8 frames of at most 224x224 -> 4 x 256 patch rows.
    assert PipelineConfig().num_patches == 1024
    # A manifest path works as the source.
    path = os.path.join(os.path.dirname(corpus[0].video), os.pardir, "manifest.jsonl")
    with DataPipeline(path, dataclasses.replace(CFG, max_pixels=56 * 56, audio_seconds=1.0),
                      process_index=0, process_count=1) as pipe:
        assert len(next(pipe)["id"]) == 2
