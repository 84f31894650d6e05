"""Our train step (and eval embedding) against the PyTorch reference, side by side, alternating.

Each round runs ``bench/train_step.py`` and ``bench/torch_reference_step.py`` on the same config
(same widths, batch and random host batch) in fresh subprocesses, one after the other, and the
order alternates between rounds so slow drift of the machine hits both sides alike. The ratio
is our median step time over the PyTorch median step time, per round and over all rounds
(< 1 means we are faster). ``--embed`` adds the inference comparison (clips/s of the AV and T
eval paths, ``bench/embed_throughput.py`` vs ``torch_reference_step.py --embed``).

Both sides get the whole machine for their turn; run it on an otherwise idle machine. Both run
on the same malloc (``--malloc``: tcmalloc when it is installed, else glibc's; each side's JSON
says which it got). The allocator matters on CPU: XLA allocates each step's temporaries as one
block that glibc maps afresh every step, and the page faults cost us about a quarter of the
small step; PyTorch's many smaller tensors are reused from glibc's heap and gain little.
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
sys.path.insert(0, str(ROOT))

from bench.report import tcmalloc_preload  # noqa: E402


def _run(cmd: list[str], timeout: float, preload: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    if preload:
        env["LD_PRELOAD"] = " ".join(x for x in (preload, env.get("LD_PRELOAD")) if x)
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
    p.add_argument("--malloc", choices=("auto", "tcmalloc", "system"), default="auto",
                   help="the allocator both sides run on: auto = tcmalloc when installed, else glibc's")
    args = p.parse_args(argv)
    preload = None if args.malloc == "system" else tcmalloc_preload(required=args.malloc == "tcmalloc")
    print(f"both sides run on {'tcmalloc (' + preload + ')' if preload else 'glibc malloc'}", file=sys.stderr)

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
            res = _run(cmd, args.timeout, preload)
            runs[name].append(res)
            if "median_s" in res:
                print(f"round {r} {name}: median step {1000 * res['median_s']:.1f} ms", file=sys.stderr)
            else:
                print(f"round {r} {name}: AV {res['clips_per_s_AV']:.2f} clips/s, T {res['clips_per_s_T']:.1f} "
                      "clips/s", file=sys.stderr)

    ratios = [j["median_s"] / t["median_s"] for j, t in zip(runs["jax"], runs["torch"])]
    summary = {"config": args.config, "rounds": args.rounds, "steps": args.steps,
               "malloc": sorted({r.get("malloc", "?") for rs in runs.values() for r in rs}),
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
