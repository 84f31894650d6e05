"""Input-pipeline throughput: decode + all features per clip at the training settings.

    python bench/data_pipeline.py --n 32 --workers 2 --out /tmp/synth_bench

Builds (or reuses) a synthetic corpus in --out, then measures
1. one worker (this process, one core): per-stage seconds per clip and clips/s for the
   anchor view alone and with the augmented second view (the tuple objective's input);
2. the full grain pipeline with --workers processes, after its first batch (spawn excluded).
It prints how many workers keep a global batch of 64 at one step per second fed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from omniret_jax.data import augment, decode, features, synth  # noqa: E402
from omniret_jax.data.manifest import read_manifest  # noqa: E402
from omniret_jax.data.pipeline import SKIP, DataPipeline, LoadSample, PipelineConfig  # noqa: E402

GLOBAL_BATCH = 64
STEPS_PER_S = 1.0


def _corpus(out: str, n: int, seconds: float, size: int):
    manifest = os.path.join(out, "manifest.jsonl")
    if os.path.exists(manifest):
        records = read_manifest(manifest)
        info = decode.probe(records[0].video)
        if len(records) >= n and info.width == size and abs(info.duration_s - seconds) < 0.5:
            return records[:n]
    t0 = time.perf_counter()
    synth.generate(out, n, seed=0, settings=synth.SynthSettings(seconds=seconds, size=size))
    dt = time.perf_counter() - t0
    print(f"generated {n} clips ({seconds:g} s, {size}x{size}) in {dt:.1f} s: {n / dt:.1f} files/s")
    return read_manifest(manifest)


def _stages(records, cfg: PipelineConfig) -> dict[str, float]:
    """Mean seconds per clip of each stage, called directly (same arguments as the loader)."""
    totals = dict.fromkeys(("decode_video", "decode_audio", "vision_patches", "whisper_mel",
                            "beats_fbank", "augment_inputs"), 0.0)
    rng = np.random.default_rng(0)
    for r in records:
        t = time.perf_counter()
        frames, _ = decode.decode_video(r.video, num_frames=cfg.num_frames)
        totals["decode_video"] += time.perf_counter() - t
        t = time.perf_counter()
        wave = decode.crop_or_pad(decode.decode_audio(r.video), seconds=cfg.audio_seconds,
                                  mode=cfg.audio_mode, rng=rng)
        totals["decode_audio"] += time.perf_counter() - t
        t = time.perf_counter()
        features.vision_patches(frames, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
        totals["vision_patches"] += time.perf_counter() - t
        t = time.perf_counter()
        features.whisper_log_mel(wave)
        totals["whisper_mel"] += time.perf_counter() - t
        t = time.perf_counter()
        features.beats_fbank(wave)
        totals["beats_fbank"] += time.perf_counter() - t
        t = time.perf_counter()
        augment.augment_video(frames, rng), augment.augment_audio(wave, rng)
        augment.augment_caption(r.caption, rng)
        totals["augment_inputs"] += time.perf_counter() - t
    return {k: v / len(records) for k, v in totals.items()}


def _per_worker(records, cfg: PipelineConfig) -> float:
    """clips/s of the real per-sample loader on this one process."""
    load = LoadSample(cfg)
    t0 = time.perf_counter()
    for i, r in enumerate(records):
        out = load(r, np.random.default_rng(i))
        if SKIP in out:
            raise RuntimeError(f"benchmark clip {r.id} was skipped: {out[SKIP]}")
    return len(records) / (time.perf_counter() - t0)


def _pipeline(records, cfg: PipelineConfig, batches: int) -> float:
    with DataPipeline(records, cfg, process_index=0, process_count=1) as pipe:
        next(pipe)  # worker spawn and first fill excluded
        t0 = time.perf_counter()
        for _ in range(batches):
            next(pipe)
        return batches * cfg.batch_size / (time.perf_counter() - t0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="clips to measure")
    parser.add_argument("--workers", type=int, default=2, help="pipeline worker processes (0: in this process)")
    parser.add_argument("--out", default="/tmp/omniret_synth_bench", help="corpus directory")
    parser.add_argument("--seconds", type=float, default=8.0, help="clip length of the corpus")
    parser.add_argument("--size", type=int, default=224, help="frame size of the corpus")
    parser.add_argument("--batches", type=int, default=6, help="pipeline batches to time")
    args = parser.parse_args(argv)

    records = _corpus(args.out, args.n, args.seconds, args.size)
    base = PipelineConfig(batch_size=8, num_epochs=None, audio_mode="random")
    print(f"training settings: {base.num_frames} frames, {base.min_pixels}-{base.max_pixels} px "
          f"(P={base.num_patches}), {base.audio_seconds:g} s audio -> mel + fbank; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    stages = _stages(records, base)
    for name, s in stages.items():
        print(f"  {name:15s} {1000 * s:8.1f} ms/clip")
    anchor = _per_worker(records, base)
    both = _per_worker(records, PipelineConfig(batch_size=8, num_epochs=None, audio_mode="random",
                                               augment=True))
    piped = _pipeline(records, PipelineConfig(batch_size=8, num_epochs=None, augment=True, audio_mode="random",
                                              on_bad_sample="replace", num_workers=args.workers), args.batches)
    need = GLOBAL_BATCH * STEPS_PER_S
    result = {
        "clip_seconds": args.seconds, "clip_size": args.size, "n": len(records),
        "stage_ms_per_clip": {k: round(1000 * v, 2) for k, v in stages.items()},
        "clips_per_s_per_worker": round(anchor, 2),
        "clips_per_s_per_worker_with_aug_view": round(both, 2),
        "workers_needed": math.ceil(need / anchor),
        "workers_needed_with_aug_view": math.ceil(need / both),
        "pipeline_workers": args.workers,
        "pipeline_clips_per_s": round(piped, 2),
    }
    print(f"per worker: {anchor:.2f} clips/s (anchor view), {both:.2f} clips/s (anchor + augmented view)")
    where = f"{args.workers} workers" if args.workers else "no workers (decoding in this process)"
    print(f"grain pipeline, {where}, with augmented view: {piped:.2f} clips/s")
    print(f"global batch {GLOBAL_BATCH} at {STEPS_PER_S:g} step/s needs {need:.0f} clips/s: "
          f"{result['workers_needed']} workers (anchor only), "
          f"{result['workers_needed_with_aug_view']} workers (with augmented view)")
    with open(os.path.join(args.out, "bench_data_pipeline.json"), "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
