"""grain pipeline: exact features, fixed shapes, process slicing, resumable state, bad input.

Every bad-input case is a real file written here (zero bytes, truncated MP4, random bytes, a
stream with an unknown codec tag, no video stream, no audio track, silent audio, ...), and the
pipeline must count each by reason without raising, hanging or shrinking a batch.
"""

import dataclasses
import json
import os
import time

import numpy as np
import pytest

from omniret_jax.data import decode, features, pipeline, synth
from omniret_jax.data.batch import cut_patches
from omniret_jax.data.manifest import ManifestRecord, read_manifest
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.data.tokens import byte_tokens

# Small but real: 4 frames at 56x56 (32 patches), 3136..6272 px (P = 2 x 40 blocks x 4 = 320: what
# smart_resize can reach when it rounds an elongated frame up), 3 s audio on 2 s clips.
CFG = PipelineConfig(batch_size=2, seed=1, num_frames=4, min_pixels=56 * 56, max_pixels=2 * 56 * 56,
                     audio_seconds=3.0, num_epochs=1, sample_timeout_s=30.0)
SR = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipe")
    synth.generate(str(out), 6, seed=2, settings=synth.SynthSettings(seconds=2.0, size=32),
                   progress=False)
    return read_manifest(out / "manifest.jsonl")


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
    assert len(batches) == 3 and CFG.num_patches == 320
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
    """Two processes read rows 0 and 1 of each global batch of 2: disjoint, together the whole
    stream in the one-process order."""
    cfg = dataclasses.replace(CFG, batch_size=2, max_pixels=56 * 56, audio_seconds=1.0)
    seen = []
    for index in range(2):
        with DataPipeline(corpus, cfg, process_index=index, process_count=2) as pipe:
            seen.append([b["id"][0] for b in pipe])
    assert len(seen[0]) == len(seen[1]) == 3
    assert set(seen[0]).isdisjoint(seen[1])
    assert set(seen[0]) | set(seen[1]) == {r.id for r in corpus}
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        assert [b["id"] for b in pipe] == [list(pair) for pair in zip(*seen)]
    # Two epochs on one process: every record twice, in a different order the second time.
    two = dataclasses.replace(cfg, num_epochs=2, batch_size=1)
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
    synth.write_mp4(str(d / "faststart.mp4"), frames, tone, options={"movflags": "faststart"})
    data = (d / "faststart.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])  # header intact, data cut
    (d / "unknown_codec.mp4").write_bytes(open(good, "rb").read().replace(b"avc1", b"zzzz"))
    synth.write_mp4(str(d / "no_video.mp4"), None, tone)
    synth.write_mp4(str(d / "no_audio.mp4"), frames, None)
    synth.write_mp4(str(d / "silent.mp4"), frames, np.zeros(2 * SR, np.float32))

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
                              sample_timeout_s=3.0)   # well above an ordinary sample's time on a loaded machine
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
    """Hangs on one record; importable by reference, so it also runs inside worker processes.
    (synth-000000 is the second clip of the seed-1 stream; not the last, whose skip a finite
    stream with thread prefetch only counts after its final batch.)"""

    def _load(self, record, rng):
        if record.id == "synth-000000":
            time.sleep(60)
        return super()._load(record, rng)


def test_worker_process_timeout(corpus, monkeypatch):
    monkeypatch.setattr(pipeline, "LoadSample", _HangingLoad)
    # 5 s: a fresh worker's first sample pays its imports; 1 s timed ordinary samples out under load.
    cfg = dataclasses.replace(CFG, batch_size=1, max_pixels=56 * 56, audio_seconds=1.0,
                              sample_timeout_s=5.0, num_workers=1)
    t0 = time.perf_counter()
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        ids = [b["id"][0] for b in pipe]
        summary = pipe.summary()
    print(f"worker timeout case took {time.perf_counter() - t0:.1f} s")
    assert summary.skipped == {"timeout": 1} and summary.examples["skipped:timeout"] == ["synth-000000"]
    assert sorted(ids) == sorted(r.id for r in corpus if r.id != "synth-000000")


def test_unusable_corpus_fails_loudly(corpus):
    cfg = dataclasses.replace(CFG, num_epochs=None, max_patches=8, max_consecutive_skips=9,
                            max_pixels=56 * 56, audio_seconds=1.0)
    with DataPipeline(corpus, cfg, process_index=0, process_count=1) as pipe:
        with pytest.raises(RuntimeError, match="9 consecutive samples were skipped") as info:
            next(pipe)
    assert "video/too_many_patches" in str(info.value)


def test_config_and_argument_errors(corpus, tmp_path):
    for bad in ({"on_missing_audio": "drop"}, {"audio_mode": "end"}, {"batch_size": 0},
                {"num_frames": 200}, {"min_pixels": 9000, "max_pixels": 3000}, {"patch_buckets": (1022,)}):
        with pytest.raises(ValueError, match="bad PipelineConfig"):
            PipelineConfig(**bad)
    with pytest.raises(ValueError, match="process_index"):
        DataPipeline(corpus, CFG, process_index=2, process_count=2)
    with pytest.raises(ValueError, match="cannot feed"):
        DataPipeline(corpus[:1], CFG, process_index=0, process_count=2)
    # Training defaults: 8 frames at 224x224 -> 4 x 256 patch rows, but smart_resize can round an
    # elongated frame up to 2 x 65 blocks of 28 px (19x1216 -> 56x1820): 4 x 520 rows.
    assert PipelineConfig().num_patches == 2080
    # A batch is cut to 4 x 256 rows when every clip fits (any frame of >= 224 * 224 pixels does).
    assert PipelineConfig().patch_bucket_sizes == (1024, 2080)
    assert PipelineConfig(patch_buckets=()).patch_bucket_sizes == (2080,)
    assert PipelineConfig(patch_buckets=[512, 4096, 512]).patch_bucket_sizes == (512, 2080)
    # A manifest path works as the source.
    path = os.path.join(os.path.dirname(corpus[0].video), os.pardir, "manifest.jsonl")
    with DataPipeline(path, dataclasses.replace(CFG, max_pixels=56 * 56, audio_seconds=1.0),
                      process_index=0, process_count=1) as pipe:
        assert len(next(pipe)["id"]) == 2


# ----------------------------------------------------------------------------- clips nobody tuned to

PAPER = PipelineConfig(batch_size=1, shuffle=False, num_epochs=1, num_frames=8, min_pixels=50176, max_pixels=50176,
                       audio_seconds=8.0, sample_timeout_s=120.0)
# (width x height, seconds, audio rate) -> the grid Qwen2VLImageProcessorPil gives one frame at 224 * 224
CLIPS = {"64x48": (64, 48, 2.0, SR), "320x240": (320, 240, 2.0, SR), "32x1024": (32, 1024, 2.0, SR),
         "1080x1920": (1080, 1920, 1.0, SR), "1920x1080": (1920, 1080, 1.0, SR),
         "64x48 40 s mono 8 kHz": (64, 48, 40.0, 8000), "320x240 0.2 s": (320, 240, 0.2, SR)}


@pytest.fixture(scope="module")
def odd_clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(5)
    records = []
    for i, (name, (w, h, seconds, sr)) in enumerate(CLIPS.items()):
        n = max(2, int(round(seconds * 10)))
        base = rng.integers(0, 255, (1, h, w, 3), dtype=np.uint8)
        frames = np.repeat(base, n, axis=0)
        frames[:, : h // 4] = (np.arange(n) * 20 % 255)[:, None, None, None]  # some motion
        t = np.arange(int(seconds * sr)) / sr
        wave = (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)
        synth.write_mp4(str(d / f"clip{i}.mp4"), frames, wave, sample_rate=sr)
        records.append(ManifestRecord(id=name, caption=f"an odd clip {name}", video=str(d / f"clip{i}.mp4")))
    return records


def test_odd_clips_at_the_paper_settings_are_all_kept(odd_clips):
    """At min = max = 224 * 224 (train.sh) every clip decodes: the patch bound covers smart_resize
    rounding small and sliver frames up, so nothing is skipped as too_many_patches, and each clip
    gets the grid the Qwen processor gives its frames (4 temporal steps of 8 frames)."""
    from transformers import Qwen2VLImageProcessorPil

    proc = Qwen2VLImageProcessorPil(min_pixels=50176, max_pixels=50176)
    with DataPipeline(odd_clips, PAPER, process_index=0, process_count=1) as pipe:
        batches = list(pipe)
        summary = pipe.summary()
    assert summary.skipped == {} and summary.fallbacks == {} and len(batches) == len(CLIPS), summary
    print(f"\npatch rows per clip P = {PAPER.num_patches}")
    for batch, record in zip(batches, odd_clips):
        frames, _ = decode.decode_video(record.video, num_frames=8)
        ref = proc(images=[frames[0]], return_tensors="np")["image_grid_thw"][0]
        grid = tuple(int(x) for x in batch["video_grid_thw"][0])
        tokens = int(np.prod(grid)) // 4
        qwen = tuple(int(x) for x in ref)
        print(f"{record.id:24s} grid {grid}, {int(batch['video_num_patches'][0])} patches, {tokens} video tokens; "
              f"Qwen processor per frame {qwen} -> {int(np.prod(qwen))} tokens for 8 frames")
        assert grid == (4, int(ref[1]), int(ref[2]))
        patches, want_grid = features.vision_patches(frames, min_pixels=50176, max_pixels=50176)
        assert want_grid == grid
        np.testing.assert_array_equal(batch["video_patches"][0, :len(patches)], patches)
    grids = {r.id: tuple(int(x) for x in b["video_grid_thw"][0]) for r, b in zip(odd_clips, batches)}
    assert grids["64x48"] == (4, 14, 20)      # 196x280: 280 patches per step, more than 50176 px allow
    assert grids["32x1024"] == (4, 92, 4)     # 1288x56
    assert grids["1920x1080"] == (4, 12, 20) and grids["1080x1920"] == (4, 20, 12)  # 168x280, 280x168
    # the patch bucket each takes alone: frames smart_resize rounds up need the bound
    bucket = {r.id: cut_patches(b, PAPER.patch_bucket_sizes)["video_patches"].shape[1] for r, b in zip(odd_clips, batches)}
    print(f"patch buckets {PAPER.patch_bucket_sizes}: {bucket}")
    assert bucket["320x240"] == bucket["1920x1080"] == bucket["1080x1920"] == 1024
    assert bucket["64x48"] == bucket["32x1024"] == 2080


def _good_and_bad(corpus, bad_records):
    return list(corpus) + [r for r in bad_records if r.id in ("missing", "garbage", "caption_empty", "no_video")]


def test_replacement_makes_the_global_batch_topology_independent(corpus, bad_records):
    """on_bad_sample="replace": a bad record's slot takes random records drawn from (seed, slot),
    so the global batch (records, order, augmentations, replacements) is the same read by one
    process or split over two, with or without workers."""
    records = _good_and_bad(corpus, bad_records)
    cfg = dataclasses.replace(CFG, batch_size=4, num_epochs=None, augment=True, audio_mode="random",
                              max_pixels=56 * 56, audio_seconds=1.0, on_bad_sample="replace",
                              text_negative="dataset", caption_tokens=40)
    n = 5
    with DataPipeline(records, cfg, tokens=byte_tokens(), process_index=0, process_count=1) as pipe:
        whole = [next(pipe) for _ in range(n)]
        summary = pipe.summary()
    halves = []
    for index, workers in ((0, 0), (1, 2)):
        with DataPipeline(records, dataclasses.replace(cfg, num_workers=workers), tokens=byte_tokens(),
                          process_index=index, process_count=2) as pipe:
            halves.append([next(pipe) for _ in range(n)])
    print(f"\n{summary}")
    assert summary.yielded == 4 * n and summary.replaced > 0
    assert set(summary.skipped) <= {"video/missing_file", "video/corrupt", "caption/empty", "video/no_video_stream"}
    for k in range(n):
        assert whole[k]["id"] == halves[0][k]["id"] + halves[1][k]["id"]
        for key in ("caption_ids", "video_patches", "mel", "neg_caption_ids"):
            np.testing.assert_array_equal(whole[k][key], np.concatenate([halves[0][k][key], halves[1][k][key]]))
        np.testing.assert_array_equal(whole[k]["aug"]["video_patches"],
                                      np.concatenate([h[k]["aug"]["video_patches"] for h in halves]))
        assert set(whole[k]["id"]) <= {r.id for r in corpus}
    # the dataset text negative is another record's caption
    by_id = {r.id: r.caption for r in records}
    for b in whole:
        for i, rid in enumerate(b["id"]):
            neg = bytes(int(x) - 1 for x in b["neg_caption_ids"][i, :b["neg_caption_len"][i]]).decode()
            assert neg != by_id[rid] and neg in {c.strip()[:40] for c in by_id.values()}


def test_long_captions_are_truncated_or_skipped(corpus):
    """Over the token budget a caption is truncated (default; counted as a fallback) or skipped
    (counted, its slot replaced); never an error downstream."""
    budget = max(len(r.caption) for r in corpus) + 2  # byte tokens: one per character
    long = [dataclasses.replace(r, caption=r.caption + " and then" * 20) for r in corpus[:2]] + list(corpus[2:])
    base = dataclasses.replace(CFG, batch_size=2, max_pixels=56 * 56, audio_seconds=1.0, caption_tokens=budget,
                               augment=True, shuffle=False)
    with DataPipeline(long, base, tokens=byte_tokens(), process_index=0, process_count=1) as pipe:
        batch = next(pipe)
        summary = pipe.summary()
    assert batch["caption_len"].tolist() == [budget, budget] and batch["caption_ids"].shape == (2, budget)
    assert bytes(int(x) - 1 for x in batch["caption_ids"][0]).decode() == long[0].caption[:budget]
    assert summary.fallbacks["caption/too_many_tokens"] == 2, summary
    skip = dataclasses.replace(base, on_long_caption="skip", on_bad_sample="replace")
    with DataPipeline(long, skip, tokens=byte_tokens(), process_index=0, process_count=1) as pipe:
        batch = next(pipe)
        summary = pipe.summary()
    # both slots of the long captions are replaced (a replacement may draw a long one again)
    assert set(summary.skipped) == {"caption/too_many_tokens"} and summary.replaced == 2
    assert not set(batch["id"]) & {r.id for r in long[:2]}
    with pytest.raises(ValueError, match="caption_tokens"):
        DataPipeline(corpus, dataclasses.replace(base, caption_tokens=None), tokens=byte_tokens(),
                     process_index=0, process_count=1)


def test_bad_manifest_lines_are_counted_with_their_line_numbers(corpus, tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(r.to_json()) for r in corpus]
    lines.insert(2, json.dumps({"id": "x", "caption": "", "video": corpus[0].video}))
    lines.insert(4, json.dumps({"id": "y", "caption": "ok", "video": corpus[0].video, "start": 5, "end": 1}))
    lines.append(json.dumps({"id": "z", "caption": "ok", "video": corpus[0].video, "fps": 30}))
    path.write_text("\n".join(lines) + "\n")
    cfg = dataclasses.replace(CFG, max_pixels=56 * 56, audio_seconds=1.0)
    with pytest.raises(Exception, match="3 bad record"):
        DataPipeline(path, cfg, process_index=0, process_count=1)
    with DataPipeline(path, dataclasses.replace(cfg, on_bad_record="skip"), process_index=0, process_count=1) as pipe:
        ids = [i for b in pipe for i in b["id"]]
        summary = pipe.summary()
    assert sorted(ids) == sorted(r.id for r in corpus)
    assert {k: v for k, v in summary.skipped.items() if k.startswith("manifest/")} == {
        "manifest/empty_caption": 1, "manifest/bad_time": 1, "manifest/unknown_key": 1}
    assert summary.examples["skipped:manifest/empty_caption"] == ["line 3"]
    assert summary.examples["skipped:manifest/bad_time"] == ["line 5"]
    assert summary.metrics()["data/skipped/manifest/unknown_key"] == 1.0
