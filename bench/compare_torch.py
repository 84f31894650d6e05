"""Our train step (and eval embedding) against the PyTorch reference, side by side, alternating.

Each round runs ``bench/train_step.py`` and ``bench/torch_reference_step.py`` on the same config
(same widths, batch and random host batch) in fresh subprocesses, one after the other, and the
order alternates between rounds so slow drift of the machine hits both sides alike. The ratio
is our median step time over the PyTorch median step time, per round and over all rounds
(< 1 means we are faster). ``--embed`` adds the inference comparison (clips/s of the AV and T
eval paths, ``bench/embed_throughput.py`` vs ``torch_reference_step.py --embed``).

Both sides get the whole machine for their turn; run it on an otherwise idle machine.
The last line of output is one JSON object with every run's numbers.

COMMAND: python bench/compare_torch.py --config configs/bench.py:tiny --rounds 3
COMMAND: python bench/compare_torch.py --config configs/bench.py:small --rounds 2 --steps 3 --warmup 1 --embed
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], timeout: float) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-4000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise SystemExit(f"{' '.join(cmd)} printed no JSON line:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    out = json.loads(lines[-1])
    out["wall_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.py:tiny")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--embed", action="store_true", help="also compare the eval embedding (AV and T paths)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per subprocess")
    args = p.parse_args(argv)

    py = sys.executable
    timing = ["--steps", str(args.steps), "--warmup", str(args.warmup)]
    ours_cmd = [py, "bench/train_step.py", "--config", args.config, *timing]
    torch_cmd = [py, "bench/torch_reference_step.py", "--config", args.config, *timing]
    runs: dict[str, list[dict]] = {"jax": [], "torch": [], "jax_embed": [], "torch_embed": []}
    for r in range(args.rounds):
        order = [("jax", ours_cmd), ("torch", torch_cmd)]
        if args.embed:
            order += [("jax_embed", [py, "bench/embed_throughput.py", "--config", args.config, *timing]),
                      ("torch_embed", torch_cmd + ["--embed"])]
        if r % 2:
            order.reverse()
        for name, cmd in order:
            res = _run(cmd, args.timeout)
            runs[name].append(res)
            if "median_s" in res:
                print(f"round {r} {name}: median step {1000 * res['median_s']:.1f} ms", file=sys.stderr)
            else:
                print(f"round {r} {name}: AV {res['clips_per_s_AV']:.2f} clips/s, T {res['clips_per_s_T']:.1f} "
                      "clips/s", file=sys.stderr)

    ratios = [j["median_s"] / t["median_s"] for j, t in zip(runs["jax"], runs["torch"])]
    summary = {"config": args.config, "rounds": args.rounds, "steps": args.steps,
               "jax_median_s": statistics.median(r["median_s"] for r in runs["jax"]),
               "torch_median_s": statistics.median(r["median_s"] for r in runs["torch"]),
               "ratio_per_round": ratios, "ratio": statistics.median(ratios)}
    print(f"step time ours / PyTorch: {summary['ratio']:.3f} (per round: "
          f"{', '.join(f'{x:.3f}' for x in ratios)}); ours {1000 * summary['jax_median_s']:.1f} ms, "
          f"PyTorch {1000 * summary['torch_median_s']:.1f} ms")
    if args.embed:
        for path in ("AV", "T"):
            ours = statistics.median(r[f"clips_per_s_{path}"] for r in runs["jax_embed"])
            theirs = statistics.median(r[f"clips_per_s_{path}"] for r in runs["torch_embed"])
            summary[f"embed_{path}"] = {"jax_clips_per_s": ours, "torch_clips_per_s": theirs,
                                        "speedup": ours / theirs}
            print(f"eval embedding {path}: ours {ours:.2f} clips/s, PyTorch {theirs:.2f} clips/s "
                  f"({ours / theirs:.2f}x)")
    summary["runs"] = runs
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
