"""Host memory over a long training run: RSS per optimizer update, with 0 or more data workers.

    python bench/soak.py --steps 3000 --workers 0 --out /tmp/soak0
    python bench/soak.py --steps 3000 --workers 2 --out /tmp/soak2 --report 100,1000,3000

Trains ``--config`` (default configs/tiny.py, its synthetic corpus generated once into
``--corpus``) through ``omniret_jax.train.train`` exactly as the CLI does (checkpoints every
``--ckpt-every`` updates, metrics every ``--log-every``) and samples after every update:
- rss_mb: this process's resident set, anon_mb its anonymous part (RssAnon: what a leak grows;
  RSS also counts file-backed pages the kernel may reclaim); workers_mb: the data worker
  processes' RSS (psutil);
- live_arrays: ``jax.live_arrays()`` (device buffers still referenced from Python);
- objects: ``len(gc.get_objects())`` (Python objects tracked by the collector);
- compiles: XLA backend compilations so far (jax.monitoring): flat after the first updates
  means no program is recompiled per step;
- with ``--tracemalloc``, the 10 source lines whose allocations grew most between the first
  and the last report step.
Writes ``<out>/soak.jsonl`` (one sample per ``--every`` updates) and prints the values at the
``--report`` steps and the slope of RSS (MB per 1000 updates, least squares over the second
half of the run, past warm-up and the first checkpoints). The last line of output is one JSON
object (also written to ``--json``).

COMMAND: python bench/soak.py --steps 3000 --workers 0 --out /tmp/soak0
COMMAND: python bench/soak.py --steps 3000 --workers 2 --out /tmp/soak2
COMMAND: python bench/soak.py --steps 3000 --workers 2 --out /tmp/soak2_b2 --set train.batch_size=2
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import psutil  # noqa: E402

from omniret_jax import build  # noqa: E402
from omniret_jax import train as trainer  # noqa: E402
from bench.report import emit  # noqa: E402


def _rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / 2**20


def _anon_mb() -> float:
    """RssAnon of this process: its heap and anonymous mappings, without file-backed pages (shared
    libraries) that the kernel may drop under memory pressure elsewhere, which moves plain RSS."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _workers_mb(proc: psutil.Process) -> float:
    total = 0.0
    for child in proc.children(recursive=True):
        try:
            total += _rss_mb(child)
        except psutil.Error:
            pass
    return total


def _slope(samples: list[dict], key: str) -> float:
    """Least-squares slope of samples[key] over the second half, in MB per 1000 updates."""
    half = samples[len(samples) // 2:]
    if len(half) < 2:
        return float("nan")
    xs = [s["update"] for s in half]
    ys = [s[key] for s in half]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"))
    p.add_argument("--steps", type=int, default=3000, help="optimizer updates")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--out", default="/tmp/omniret_soak")
    p.add_argument("--corpus", default="", help="directory of the synthetic corpus (default <out>/../soak_corpus)")
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--every", type=int, default=10, help="sample every this many updates")
    p.add_argument("--report", default="100,1000,3000", help="updates to report")
    p.add_argument("--tracemalloc", action="store_true")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. train.batch_size=2 (repeatable)")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)

    out = Path(args.out)
    if (out / "checkpoints").exists():
        raise SystemExit(f"{out} holds a previous run; give a fresh --out")
    out.mkdir(parents=True, exist_ok=True)
    corpus = Path(args.corpus) if args.corpus else out.parent / "soak_corpus"
    overrides = {"train.steps": args.steps, "train.ckpt_every": args.ckpt_every, "train.log_every": args.log_every,
                 "data.num_workers": args.workers}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = type(build.load_config(args.config)[key.split(".")[0]][key.split(".")[1]])(value)
    c = build.load_config(args.config, overrides)
    if not c.data.manifest:
        manifest = corpus / "manifest.jsonl"
        if not manifest.exists():
            from omniret_jax.data.synth import SynthSettings, generate

            generate(str(corpus), c.data.synth_n, seed=c.data.synth_seed,
                     settings=SynthSettings(seconds=c.data.synth_seconds, size=c.data.synth_size))
        c.data.manifest = str(manifest)
    report = sorted({int(s) for s in args.report.split(",") if s} | {args.steps})
    compiles = [0]

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[0] += 1

    jax.monitoring.register_event_duration_secs_listener(on_event)
    proc = psutil.Process(os.getpid())
    samples: list[dict] = []
    snapshots = {}
    log = open(out / "soak.jsonl", "w")
    t0 = time.perf_counter()
    if args.tracemalloc:
        tracemalloc.start(5)

    def on_update(update: int, micro: int) -> None:
        if update % args.every and update not in report:
            return
        s = {"update": update, "micro_batches": micro, "rss_mb": round(_rss_mb(proc), 1),
             "anon_mb": round(_anon_mb(), 1),
             "workers_mb": round(_workers_mb(proc), 1), "live_arrays": len(jax.live_arrays()),
             "objects": len(gc.get_objects()), "compiles": compiles[0],
             "seconds": round(time.perf_counter() - t0, 1)}
        samples.append(s)
        log.write(json.dumps(s) + "\n")
        log.flush()
        if args.tracemalloc and update in report:
            snapshots[update] = tracemalloc.take_snapshot()

    trainer.train(c, out, on_update=on_update)
    log.close()
    at = {s["update"]: s for s in samples}
    print(f"\n{'update':>7} {'RSS MB':>8} {'anon MB':>8} {'workers MB':>10} {'live arrays':>11} {'objects':>9} "
          f"{'compiles':>8} {'s':>7}")
    for u in report:
        if u in at:
            s = at[u]
            print(f"{u:7d} {s['rss_mb']:8.1f} {s['anon_mb']:8.1f} {s['workers_mb']:10.1f} {s['live_arrays']:11d} "
                  f"{s['objects']:9d} {s['compiles']:8d} {s['seconds']:7.1f}")
    result = {"config": args.config, "workers": args.workers, "updates": args.steps,
              "batch_size": int(c.train.batch_size), "accumulate": int(c.optim.accumulate),
              "rss_mb": {str(u): at[u]["rss_mb"] for u in report if u in at},
              "anon_mb": {str(u): at[u]["anon_mb"] for u in report if u in at},
              "workers_mb": {str(u): at[u]["workers_mb"] for u in report if u in at},
              "live_arrays": {str(u): at[u]["live_arrays"] for u in report if u in at},
              "compiles": {str(u): at[u]["compiles"] for u in report if u in at},
              "rss_slope_mb_per_1000_updates": round(_slope(samples, "rss_mb"), 2),
              "anon_slope_mb_per_1000_updates": round(_slope(samples, "anon_mb"), 2),
              "workers_slope_mb_per_1000_updates": round(_slope(samples, "workers_mb"), 2)}
    print("slope over the second half, MB per 1000 updates: RSS {rss_slope_mb_per_1000_updates}, anonymous "
          "{anon_slope_mb_per_1000_updates}, workers {workers_slope_mb_per_1000_updates}".format(**result))
    if len(snapshots) >= 2:
        first, last = snapshots[min(snapshots)], snapshots[max(snapshots)]
        print(f"tracemalloc: growth between update {min(snapshots)} and {max(snapshots)}")
        for stat in last.compare_to(first, "lineno")[:10]:
            print(f"  {stat}")
    emit(result, args.json)
    return result


if __name__ == "__main__":
    main()
