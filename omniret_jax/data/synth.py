"""Synthetic audio-video-text corpus: real H.264 + AAC MP4 clips with compositional captions.

Each clip shows one coloured shape moving across a grey background while one synthetic
instrument plays. Facts are split between the modalities so that every retrieval direction
has something to learn and dual-modal queries carry more than either modality alone:

    visual only:  shape (circle/square/triangle), colour (red/green/blue/yellow),
                  motion (left/right/up/down)
    audible only: instrument timbre (flute: near-sine, clarinet: odd harmonics,
                  violin: all harmonics), pitch (low/mid/high), rhythm (steady/pulsing/beeping)
    caption:      all six, e.g. "a red circle moving left while a low flute plays a steady tone"
    composed:     ``meta.composed_query``, the text of a composed (still frame + text) query whose
                  gold is the clip itself: "the same shape, moving left" (a still frame shows
                  shape and colour, not the motion the text adds)

Clip i's attribute combination comes from a seeded permutation of all 1296 combinations, so
captions are unique while N <= 1296. Nuisance factors (background level, shape size and path,
detune, loudness, noise) vary per clip from `default_rng([seed, i])`, so the corpus is a pure
function of (seed, settings): same seed -> same manifest, same decoded frames and audio.
With one encoder thread the encoded bytes are identical as well on the same PyAV/FFmpeg build
(not promised across FFmpeg versions, whose muxer writes its version string).

``generate_tasks`` writes the curriculum's multi-task version: clips of distinct shape x colour x
motion, each the document of a text -> video, a still frame -> video and a composed (still frame +
text) -> video record.

    python -m omniret_jax.data.synth --out DIR --n N [--seed S] [--seconds 3] [--size 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import time

import av
import numpy as np
from tqdm import tqdm

from omniret_jax.data.manifest import ManifestRecord, write_manifest

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230),
           "yellow": (235, 215, 40)}
MOTIONS = ("left", "right", "up", "down")
INSTRUMENTS = ("flute", "clarinet", "violin")
PITCHES = {"low": 165.0, "mid": 440.0, "high": 1175.0}
RHYTHMS = ("steady", "pulsing", "beeping")
ATTRIBUTE_KEYS = ("shape", "colour", "motion", "instrument", "pitch", "rhythm")

RHYTHM_PHRASES = {"steady": "a steady tone", "pulsing": "a pulsing tone",
                   "beeping": "a series of short beeps"}
_TEMPLATES = (
    "a {colour} {shape} moving {motion} while a {pitch} {instrument} plays {rhythm}",
    "a {pitch} {instrument} plays {rhythm} as a {colour} {shape} moves {motion}",
    "{rhythm} from a {pitch} {instrument} while a {colour} {shape} travels {motion}",
)
# Harmonic amplitude profiles (index n-1 -> amplitude of harmonic n) that give each instrument
# a distinct timbre: flute near-sine, clarinet odd harmonics (square-like), violin all
# harmonics falling as 1/n (sawtooth-like).
_HARMONICS = {
    "flute": {1: 1.0, 2: 0.12},
    "clarinet": {n: 1.0 / n for n in range(1, 16, 2)},
    "violin": {n: 1.0 / n for n in range(1, 16)},
}
_COMBOS = tuple(itertools.product(SHAPES, COLOURS, MOTIONS, INSTRUMENTS, PITCHES, RHYTHMS))


@dataclasses.dataclass(frozen=True)
class SynthSettings:
    seconds: float = 3.0
    size: int = 64
    fps: int = 10
    sample_rate: int = 16000

    def __post_init__(self):
        if self.seconds <= 0 or self.size < 16 or self.size % 2 or self.fps <= 0:
            raise ValueError(f"bad synth settings {self}: need seconds > 0, even size >= 16, fps > 0")
        if self.sample_rate not in (16000, 22050, 24000, 32000, 44100, 48000):
            raise ValueError(f"sample_rate {self.sample_rate} is not an AAC rate this corpus uses")


def clip_attributes(seed: int, index: int) -> dict[str, str]:
    """The attribute combination of clip `index`: walks seeded permutations of all combos."""
    rnd, pos = divmod(index, len(_COMBOS))
    perm = np.random.default_rng([seed, 7919, rnd]).permutation(len(_COMBOS))
    return dict(zip(ATTRIBUTE_KEYS, _COMBOS[perm[pos]]))


def composed_query(attrs: dict[str, str]) -> str:
    """The text half of the clip's composed query; its still frame is the image half."""
    return f"the same shape, moving {attrs['motion']}"


def caption_for(attrs: dict[str, str], rng: np.random.Generator) -> str:
    template = _TEMPLATES[rng.integers(len(_TEMPLATES))]
    words = dict(attrs, rhythm=RHYTHM_PHRASES[attrs["rhythm"]])
    text = template.format(**words)
    return text[0].upper() + text[1:] + "."


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    # Upward-pointing triangle inscribed in the radius-r circle.
    return (dy <= r * 0.6) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.62)


def render_video(attrs: dict[str, str], rng: np.random.Generator,
                 s: SynthSettings) -> np.ndarray:
    """uint8 [T, H, W, 3] frames of the shape moving along its stated direction."""
    n = max(1, round(s.seconds * s.fps))
    size = s.size
    r = size * rng.uniform(0.12, 0.18)
    background = rng.uniform(70, 140)
    travel = size * rng.uniform(0.45, 0.6)
    across = rng.uniform(r + 2, size - r - 2)
    along0 = (size - travel) / 2
    sign = {"left": -1, "right": 1, "up": -1, "down": 1}[attrs["motion"]]
    colour = np.array(COLOURS[attrs["colour"]], np.float32)
    frames = np.empty((n, size, size, 3), np.uint8)
    for t in range(n):
        frac = t / max(n - 1, 1)
        along = along0 + travel * (frac if sign > 0 else 1 - frac)
        cx, cy = (along, across) if attrs["motion"] in ("left", "right") else (across, along)
        img = np.full((size, size, 3), background, np.float32)
        img[_shape_mask(attrs["shape"], size, cx, cy, r)] = colour
        frames[t] = img.astype(np.uint8)
    return frames


def render_audio(attrs: dict[str, str], rng: np.random.Generator,
                 s: SynthSettings) -> np.ndarray:
    """float32 [N] mono waveform in [-1, 1]: the instrument at its pitch with its rhythm."""
    sr = s.sample_rate
    t = np.arange(round(s.seconds * sr), dtype=np.float64) / sr
    f0 = PITCHES[attrs["pitch"]] * rng.uniform(0.97, 1.03)
    wave = np.zeros_like(t)
    for harmonic, amp in _HARMONICS[attrs["instrument"]].items():
        if harmonic * f0 < 0.45 * sr:  # band-limited: no aliasing
            wave += amp * np.sin(2 * np.pi * harmonic * f0 * t + rng.uniform(0, 2 * np.pi))
    wave /= np.max(np.abs(wave)) + 1e-9
    if attrs["rhythm"] == "pulsing":
        rate = rng.uniform(2.5, 3.5)
        envelope = 0.55 + 0.45 * np.sin(2 * np.pi * rate * t + rng.uniform(0, 2 * np.pi))
    elif attrs["rhythm"] == "beeping":
        rate = rng.uniform(3.5, 4.5)
        phase = (t * rate + rng.uniform()) % 1.0
        envelope = np.clip(np.minimum(phase, 0.4 - phase) / 0.02, 0.0, 1.0)  # 40 % duty, soft edges
    else:
        envelope = np.ones_like(t)
    ramp = np.minimum(1.0, np.minimum(t, t[-1] - t) / 0.01)  # 10 ms fades against clicks
    wave = wave * envelope * ramp * rng.uniform(0.25, 0.5)
    wave += rng.normal(0.0, 0.003, size=t.shape)
    return np.clip(wave, -1, 1).astype(np.float32)


def write_mp4(path: str, frames: np.ndarray | None, wave: np.ndarray | None, *, fps: int = 10,
              sample_rate: int = 16000, options: dict[str, str] | None = None) -> None:
    """Writes an MP4 with an H.264 (yuv420p) stream of ``frames`` (T, H, W, 3) uint8 and a mono AAC
    stream of ``wave`` (float32), either one optional; ``options`` go to the container (e.g.
    movflags). Written to a temporary name and renamed, so a reader never sees half a file."""
    needed = (["libx264"] if frames is not None else []) + (["aac"] if wave is not None else [])
    for codec in needed:
        if codec not in av.codecs_available:
            raise RuntimeError(f"PyAV build lacks the {codec!r} encoder needed to write {path}")
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    with av.open(tmp, "w", format="mp4", options=options or {}) as container:
        if frames is not None:
            video = container.add_stream("libx264", rate=fps)
            video.width, video.height, video.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            # One thread keeps the encoded bytes deterministic; small frames do not need more.
            video.options = {"preset": "veryfast", "crf": "20", "threads": "1"}
        if wave is not None:
            audio = container.add_stream("aac", rate=sample_rate, layout="mono")
        if frames is not None:
            for frame in frames:
                container.mux(video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(video.encode())
        if wave is not None:
            chunk = 1024
            for start in range(0, len(wave), chunk):
                frame = av.AudioFrame.from_ndarray(wave[None, start:start + chunk], format="flt",
                                                   layout="mono")
                frame.sample_rate = sample_rate
                frame.pts = start
                container.mux(audio.encode(frame))
            container.mux(audio.encode())
    os.replace(tmp, path)


def make_clip(out_dir: str, seed: int, index: int, s: SynthSettings, reference: bool = False) -> ManifestRecord:
    """Renders, encodes and describes clip `index` (a pure function of seed, index, settings), or
    with ``reference`` its tv2v reference clip: the same shape and colour, the next motion, its
    own positions and sound."""
    attrs = clip_attributes(seed, index)
    if reference:
        attrs["motion"] = MOTIONS[(MOTIONS.index(attrs["motion"]) + 1) % len(MOTIONS)]
    rng = np.random.default_rng([seed, index] + ([1] if reference else []))
    caption = caption_for(attrs, rng)
    frames = render_video(attrs, rng, s)
    wave = render_audio(attrs, rng, s)
    clip_id = f"synth-{index:06d}" + ("-reference" if reference else "")
    path = os.path.join(out_dir, "clips", f"{clip_id}.mp4")
    write_mp4(path, frames, wave, fps=s.fps, sample_rate=s.sample_rate)
    return ManifestRecord(id=clip_id, caption=caption, video=os.path.abspath(path),
                          meta=dict(attrs, composed_query=composed_query(attrs)))


def _make_clip_star(args):
    return make_clip(*args)


def _make_clips(jobs: list[tuple], workers: int, progress: bool) -> list[ManifestRecord]:
    bar = tqdm(total=len(jobs), desc="synth clips", unit="clip", disable=not progress)
    records = []
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            for rec in pool.imap(_make_clip_star, jobs, chunksize=4):
                records.append(rec)
                bar.update()
    else:
        for job in jobs:
            records.append(make_clip(*job))
            bar.update()
    bar.close()
    return records


def generate(out_dir: str, n: int, *, seed: int = 0, settings: SynthSettings = SynthSettings(),
             workers: int = 1, progress: bool = True) -> list[ManifestRecord]:
    """Writes `n` clips under out_dir/clips and out_dir/manifest.jsonl; returns the records."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    records = _make_clips([(out_dir, seed, i, settings) for i in range(n)], workers, progress)
    write_manifest(os.path.join(out_dir, "manifest.jsonl"), records)
    return records


TASKS = ("t2v", "i2v", "ti2v")            # the default corpus
ALL_TASKS = TASKS + ("tv2v",)
VISUAL_COMBOS = len(SHAPES) * len(COLOURS) * len(MOTIONS)


def generate_tasks(out_dir: str, n: int, *, seed: int = 0, settings: SynthSettings = SynthSettings(),
                   tasks: tuple[str, ...] = TASKS, workers: int = 1, progress: bool = True) -> list[ManifestRecord]:
    """The curriculum's multi-task corpus: `n` clips (at most 48) whose visual facts (shape, colour,
    motion) all differ, so every task's gold document is the only right one (the video path sees
    no audio), and per clip one record of each task, the clip its document, ``task`` set, id
    ``<clip id>/<task>``:
        t2v   caption -> clip
        i2v   the clip's still frame -> clip (shape, colour and the start position: motion is guessed)
        ti2v  that still frame + ``composed_query`` ("the same shape, moving left") -> clip
        tv2v  ``composed_query`` over a reference clip (``query_video``: the same shape and
              colour moving another way, not in the gallery) -> clip
    The image queries are the still frame of the document clip (``data.batch.still_frames``), so a
    record's caption is its text query (i2v keeps the clip's caption, which its I path never reads).
    Writes out_dir/clips and out_dir/manifest.jsonl; returns the records."""
    unknown = [t for t in tasks if t not in ALL_TASKS]
    if unknown or not 0 < n <= VISUAL_COMBOS:
        raise ValueError(f"tasks {list(tasks)} must be out of {ALL_TASKS} and 0 < n={n} <= {VISUAL_COMBOS} (distinct "
                         "shape x colour x motion)")
    picked, seen, index = [], set(), 0
    while len(picked) < n:
        a = clip_attributes(seed, index)
        if (a["shape"], a["colour"], a["motion"]) not in seen:
            seen.add((a["shape"], a["colour"], a["motion"]))
            picked.append(index)
        index += 1
    os.makedirs(os.path.join(out_dir, "clips"), exist_ok=True)
    jobs = [(out_dir, seed, i, settings) for i in picked]
    clips = _make_clips(jobs + ([job + (True,) for job in jobs] if "tv2v" in tasks else []), workers, progress)
    references = {c.id.removesuffix("-reference"): c.video for c in clips[len(jobs):]}
    records = []
    for clip in clips[:len(jobs)]:
        q = clip.meta["composed_query"]
        text = {"t2v": clip.caption, "i2v": clip.caption, "ti2v": q, "tv2v": q}
        records += [dataclasses.replace(clip, id=f"{clip.id}/{t}", caption=text[t], task=t,
                                        meta=dict(clip.meta, clip=clip.id),
                                        query_video=references[clip.id] if t == "tv2v" else None) for t in tasks]
    write_manifest(os.path.join(out_dir, "manifest.jsonl"), records)
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n", type=int, required=True, help="number of clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--size", type=int, default=64, help="frame width = height in pixels")
    parser.add_argument("--fps", type=int, default=10)
    parser.add_argument("--sample-rate", type=int, default=16000)
    parser.add_argument("--workers", type=int, default=1, help="encoder processes")
    args = parser.parse_args(argv)
    settings = SynthSettings(args.seconds, args.size, args.fps, args.sample_rate)
    t0 = time.perf_counter()
    generate(args.out, args.n, seed=args.seed, settings=settings, workers=args.workers)
    dt = time.perf_counter() - t0
    print(f"wrote {args.n} clips + manifest.jsonl to {args.out} in {dt:.1f} s "
          f"({args.n / dt:.1f} files/s)")


if __name__ == "__main__":
    main()
