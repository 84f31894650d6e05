"""Synthetic AVT corpus: real MP4s, determinism, and facts that survive H.264/AAC encoding.

The fact checks decode each clip back through decode.py and recover every caption attribute
from the pixels or the waveform alone (shape, colour, motion from video; instrument, pitch,
rhythm from audio), which is what makes the 12 retrieval directions learnable.
"""

import filecmp
import subprocess
import sys

import numpy as np
import pytest

from omniret_jax.data import decode, synth
from omniret_jax.data.manifest import read_manifest

SETTINGS = synth.SynthSettings(seconds=2.0, size=64, fps=10, sample_rate=16000)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.generate(str(out), 12, seed=5, settings=SETTINGS, progress=False)
    return out


def _visual_facts(frames):
    bg = np.median(frames.reshape(-1, 3), axis=0)
    mask = np.abs(frames.astype(np.float32) - bg).max(axis=-1) > 40
    colours = frames[mask].astype(np.float32).mean(axis=0)
    names = list(synth.COLOURS)
    colour = names[int(np.argmin([np.abs(colours - synth.COLOURS[c]).sum() for c in names]))]
    ys, xs = [], []
    fills = []
    for m in mask:
        yy, xx = np.nonzero(m)
        ys.append(yy.mean())
        xs.append(xx.mean())
        box = (yy.max() - yy.min() + 1) * (xx.max() - xx.min() + 1)
        fills.append(m.sum() / box)
    dx, dy = xs[-1] - xs[0], ys[-1] - ys[0]
    if abs(dx) > abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    fill = float(np.median(fills))  # circle pi/4, square 1, triangle ~1/2
    shape = min({"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}.items(),
                key=lambda kv: abs(kv[1] - fill))[0]
    return {"shape": shape, "colour": colour, "motion": motion}, max(abs(dx), abs(dy))


def _audio_facts(wave, sr):
    spec = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    freqs = np.fft.rfftfreq(len(wave), 1 / sr)
    f0 = freqs[np.argmax(spec)]
    pitch = min(synth.PITCHES, key=lambda p: abs(np.log(synth.PITCHES[p] / f0)))

    def level(f):
        band = (freqs > f * 0.97) & (freqs < f * 1.03)
        return spec[band].max()

    h2, h3 = level(2 * f0) / level(f0), level(3 * f0) / level(f0)
    instrument = "violin" if h2 > 0.3 else ("clarinet" if h3 > 0.15 else "flute")
    frame = sr // 50
    rms = np.sqrt((wave[: len(wave) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    rms = rms[5:-5]  # ignore the fade edges
    quiet = float((rms < 0.1 * rms.max()).mean())
    cv = float(rms.std() / rms.mean())
    rhythm = "beeping" if quiet > 0.3 else ("pulsing" if cv > 0.2 else "steady")
    return {"pitch": pitch, "instrument": instrument, "rhythm": rhythm}, abs(f0 / synth.PITCHES[pitch] - 1)


def test_corpus_files_and_manifest(corpus):
    records = read_manifest(corpus / "manifest.jsonl")
    assert [r.id for r in records] == [f"synth-{i:06d}" for i in range(12)]
    assert len({r.caption for r in records}) == 12  # distinct attribute combinations
    for r in records:
        info = decode.probe(r.video)
        assert info.has_video and info.has_audio
        assert (info.width, info.height, info.fps, info.sample_rate) == (64, 64, 10.0, 16000)
        assert abs(info.duration_s - 2.0) < 0.1, info
        attrs = {k: r.meta[k] for k in synth.ATTRIBUTE_KEYS}
        words = dict(attrs, rhythm=synth.RHYTHM_PHRASES[r.meta["rhythm"]])
        for value in words.values():  # every fact is spelled out in the caption
            assert value in r.caption.lower()
        assert r.meta["composed_query"] == f"the same shape, moving {attrs['motion']}"
    # The 12 clips exercise more than one value of every attribute.
    for key in synth.ATTRIBUTE_KEYS:
        assert len({r.meta[key] for r in records}) >= 2, key


def test_facts_recoverable_after_encoding(corpus):
    records = read_manifest(corpus / "manifest.jsonl")
    worst_pitch = 0.0
    for r in records:
        frames, _ = decode.decode_video(r.video, num_frames=20)
        wave = decode.decode_audio(r.video, sr=16000)
        seen, travel = _visual_facts(frames)
        heard, pitch_err = _audio_facts(wave, 16000)
        worst_pitch = max(worst_pitch, pitch_err)
        assert travel > 15, (r.id, travel)
        for key, value in {**seen, **heard}.items():
            assert value == r.meta[key], (r.id, key, value, r.meta)
    print(f"worst relative pitch error after AAC: {worst_pitch:.3f}")
    assert worst_pitch < 0.05


def test_same_seed_same_corpus(tmp_path, corpus):
    again = tmp_path / "again"
    synth.generate(str(again), 4, seed=5, settings=SETTINGS, progress=False)
    first = (corpus / "manifest.jsonl").read_text().splitlines()
    assert (again / "manifest.jsonl").read_text().splitlines() == first[:4]
    for r, r0 in zip(read_manifest(again / "manifest.jsonl"), read_manifest(corpus / "manifest.jsonl")):
        # Byte-identical on one PyAV/FFmpeg build (single-threaded x264, native AAC).
        assert filecmp.cmp(r.video, r0.video, shallow=False)
        f, t = decode.decode_video(r.video, num_frames=6)
        f0, t0 = decode.decode_video(r0.video, num_frames=6)
        np.testing.assert_array_equal(f, f0)
        np.testing.assert_array_equal(t, t0)
        np.testing.assert_array_equal(decode.decode_audio(r.video), decode.decode_audio(r0.video))
    other = tmp_path / "other"
    synth.generate(str(other), 4, seed=6, settings=SETTINGS, progress=False)
    assert (other / "manifest.jsonl").read_text().splitlines() != first[:4]


def test_cli(tmp_path):
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "omniret_jax.data.synth", "--out", str(out), "--n", "2",
         "--seed", "1", "--seconds", "1", "--size", "32"],
        capture_output=True, text=True, timeout=120, check=True)
    assert "wrote 2 clips" in proc.stdout and "files/s" in proc.stdout
    assert "synth clips" in proc.stderr  # tqdm progress bar
    records = read_manifest(out / "manifest.jsonl")
    assert len(records) == 2
    assert decode.probe(records[0].video).width == 32


def test_bad_settings():
    with pytest.raises(ValueError, match="even size"):
        synth.SynthSettings(size=33)
    with pytest.raises(ValueError, match="n must be positive"):
        synth.generate("/tmp/unused", 0, progress=False)
