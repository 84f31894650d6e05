"""Load time of a 7B-width WAVE checkpoint: PyTorch safetensors vs the orbax copy ("convert once, load fast").

Builds (once) the synthetic checkpoint of bench/convert_memory.py (7B widths, 2 layers per
tower, bfloat16, released layout) and its ``omniret-convert orbax`` copy, then times
``convert.to_flax.load_wave`` on each in fresh processes, alternating, ``--repeats`` times:
from the call to the last array on the device, placed on a mesh of ``--devices`` CPU devices
(weights FSDP-sharded over them; 1: one device holds everything) with the frozen weights in
bfloat16 (both read through the same precision policy and placement; the
files sit in the page cache after the first read, so these are warm-cache times). Wall and
CPU seconds (user + system) of the load alone, without the imports.

COMMAND: python bench/convert_load.py --work /tmp/convert_bench [--repeats 3] [--devices 8]
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from convert_memory import bench_args, make_checkpoint

LOAD = """
import json, resource, sys, time
import jax
from flax import nnx
from omniret_jax import sharding
from omniret_jax.config import Precision
from omniret_jax.convert.to_flax import load_wave
mesh = sharding.make_mesh(sharding.MeshConfig(data=1, fsdp=-1))  # every device: FSDP-sharded weights
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
t, c = time.perf_counter(), cpu()
model, report = load_wave(sys.argv[1], precision=Precision.from_names(frozen="bfloat16"), mesh=mesh, progress=False)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c, "gib": report.nbytes / 2**30,
                  "layout": report.layout, "tensors": report.loaded}))
"""


def load_once(path: Path, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    proc = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    args = bench_args(__doc__.splitlines()[0], repeats=dict(type=int, default=3),
                      devices=dict(type=int, default=1, help="CPU devices; the weights are FSDP-sharded over them"))
    src, dst = args.work / "hf", args.work / "orbax"
    make_checkpoint(src, args.layers)
    if not (dst / "state").is_dir():
        shutil.rmtree(dst, ignore_errors=True)
        t = time.time()
        subprocess.run([sys.executable, "-m", "omniret_jax.interop", "orbax", "--src", str(src), "--out", str(dst),
                        "--param-dtype", "bfloat16"], check=True)
        print(f"orbax copy written in {time.time() - t:.0f} s")
    runs: dict[str, list[dict]] = {"safetensors": [], "orbax": []}
    for _ in range(args.repeats):
        for name, path in (("safetensors", src), ("orbax", dst)):
            runs[name].append(load_once(path, args.devices))
    for name, rs in runs.items():
        secs, cpus = [r["seconds"] for r in rs], [r["cpu"] for r in rs]
        print(f"{name:12s} {rs[0]['tensors']} tensors, {rs[0]['gib']:.2f} GiB: median {statistics.median(secs):.1f} s "
              f"wall, {statistics.median(cpus):.1f} s CPU (wall runs: {', '.join(f'{s:.1f}' for s in secs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
