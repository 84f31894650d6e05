"""Train on a manifest with bad records of every kind and report what was trained, skipped, kept.

    python bench/bad_records.py --n 200 --bad-fraction 0.05 --out /tmp/omniret_bad

Writes a synthetic corpus of ``--n`` manifest lines (configs/tiny.py's clip settings) of which
``--bad-fraction`` are bad, cycling through the kinds a web-video manifest has: lines that do not
validate (empty caption, bad times, unknown key), media that cannot be read (missing file, random
bytes, a truncated MP4, no video stream), audio problems (no audio stream, silent audio: the
sample is kept with silence) and a caption longer than the token budget (kept, truncated). Then
trains the tiny config on it for ``--epochs`` epochs with ``--workers`` data workers
(``data.on_bad_record="skip"``, bad samples replaced from (seed, slot)) and prints the counts:
samples trained, distinct records trained, manifest lines left out, skipped tries and
fallbacks by reason. The last line of output is one JSON object (also written to ``--json``).

COMMAND: python bench/bad_records.py --n 200 --bad-fraction 0.05 --out /tmp/omniret_bad
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniret_jax import build  # noqa: E402
from omniret_jax import train as trainer  # noqa: E402
from omniret_jax.data.synth import SynthSettings, generate, write_mp4  # noqa: E402
from bench.report import emit  # noqa: E402

KINDS = ("empty_caption", "bad_time", "unknown_key", "missing_file", "garbage_bytes", "truncated_mp4",
         "no_video_stream", "no_audio_stream", "silent_audio", "long_caption")


def build_corpus(out: Path, n: int, bad_fraction: float, seconds: float, size: int) -> tuple[Path, dict[str, int]]:
    """A manifest of n lines, round(n * bad_fraction) of them bad (kinds in turn); returns it and the kinds."""
    n_bad = max(len(KINDS), int(round(n * bad_fraction)))
    good = generate(str(out), n - n_bad, seed=7, settings=SynthSettings(seconds=seconds, size=size), progress=False)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (int(seconds * 10), size, size, 3), dtype=np.uint8)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
    media = out / "bad"
    media.mkdir(exist_ok=True)
    (media / "garbage.mp4").write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    write_mp4(str(media / "full.mp4"), frames, tone, options={"movflags": "faststart"})
    data = (media / "full.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(data[: len(data) * 2 // 3])
    write_mp4(str(media / "no_video.mp4"), None, tone)
    write_mp4(str(media / "no_audio.mp4"), frames, None)
    write_mp4(str(media / "silent.mp4"), frames, np.zeros_like(tone))
    lines = [json.dumps(r.to_json(str(out))) for r in good]
    kinds: dict[str, int] = {}
    for i in range(n_bad):
        kind = KINDS[i % len(KINDS)]
        kinds[kind] = kinds.get(kind, 0) + 1
        rec = {"id": f"bad-{i:03d}-{kind}", "caption": f"a bad record of kind {kind}", "video": "bad/full.mp4"}
        rec.update({
            "empty_caption": {"caption": "  "}, "bad_time": {"start": 3.0, "end": 1.0},
            "unknown_key": {"fps": 30}, "missing_file": {"video": "bad/nope.mp4"},
            "garbage_bytes": {"video": "bad/garbage.mp4"}, "truncated_mp4": {"video": "bad/truncated.mp4"},
            "no_video_stream": {"video": "bad/no_video.mp4"}, "no_audio_stream": {"video": "bad/no_audio.mp4"},
            "silent_audio": {"video": "bad/silent.mp4"},
            # within tiny's 120-character filter but over its 93-token budget (bytes are tokens)
            "long_caption": {"caption": ("a long caption that goes on " * 5)[:110]},
        }[kind])
        lines.insert(int(rng.integers(0, len(lines) + 1)), json.dumps(rec))
    manifest = out / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, kinds


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--bad-fraction", type=float, default=0.05)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default="/tmp/omniret_bad")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    out = Path(args.out)
    if (out / "run").exists():
        raise SystemExit(f"{out / 'run'} holds a previous run; give a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    c = build.load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py")
    manifest, kinds = build_corpus(out, args.n, args.bad_fraction, c.data.synth_seconds, c.data.synth_size)
    steps = max(1, math.ceil(args.epochs * args.n / c.train.batch_size))
    c.data.manifest, c.data.num_workers = str(manifest), args.workers
    c.train.steps, c.train.log_every, c.train.ckpt_every = steps, steps, steps
    trained: list[str] = []

    def record_ids(batch, step, *a, **kw):
        trained.extend(batch["id"])
        return trainer_build(batch, step, *a, **kw)

    trainer_build = trainer.build_inputs
    trainer.build_inputs = record_ids  # count what each micro-batch trained on
    try:
        last = trainer.train(c, out / "run")
    finally:
        trainer.build_inputs = trainer_build
    counts = {k[len("data/"):]: int(v) for k, v in last.items() if k.startswith("data/")}
    result = {
        "manifest_lines": args.n, "bad_lines": sum(kinds.values()), "bad_kinds": kinds,
        "updates": steps, "samples_trained": len(trained), "distinct_records_trained": len(set(trained)),
        "bad_records_trained": sorted({i for i in trained if i.startswith("bad-")}), "pipeline": counts,
    }
    print(f"\n{args.n} manifest lines, {result['bad_lines']} bad ({', '.join(f'{k} {v}' for k, v in kinds.items())})")
    print(f"trained {len(trained)} samples over {steps} updates: {len(set(trained))} distinct records "
          f"(kept bad ones: {result['bad_records_trained']})")
    for key in sorted(counts):
        print(f"  {key:40s} {counts[key]}")
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
