"""Peak host memory of checkpoint conversion at the real 7B widths.

Writes a synthetic WAVE checkpoint (``omniret_jax.convert.synthetic``) in the released
layout (``thinker.*`` plus ``talker.*`` keys the converter must skip), bfloat16, sharded
with an index, with the 7B widths (hidden 3584, vocab 152064, vision 1280, audio 1280,
BEATs 768) but 2 layers per tower; then runs ``omniret-convert orbax`` under
``/usr/bin/time -v`` and compares its peak RSS with the size of the converted
parameters. The loader streams if peak RSS <= converted size + largest tensor + 1 GiB.
bench/convert_load.py times loading the same checkpoint and its orbax copy.

COMMAND: python bench/convert_memory.py --work /tmp/convert_bench [--param-dtype bfloat16]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

GiB = 2**30


def make_checkpoint(out: Path, layers: int) -> None:
    """The synthetic WAVE checkpoint, once: released layout (``thinker.*``), bfloat16, sharded with
    an index, plus ``talker.*`` / ``token2wav.*`` keys the converter must skip."""
    from omniret_jax.build import BYTE_TOKENIZER, TOKENIZER_KEY
    from omniret_jax.convert.synthetic import seven_b_widths, write_synthetic_wave

    if (out / "model.safetensors.index.json").exists():
        return
    t = time.time()
    cfg, beats = seven_b_widths(layers)
    write_synthetic_wave(out, cfg, beats, layout="released", max_shard_bytes=2 * GiB,
                         extra={"talker.model.norm.weight": (896,), "token2wav.code_embedding.weight": (8, 4)},
                         config_updates={TOKENIZER_KEY: BYTE_TOKENIZER})
    print(f"synthetic checkpoint written in {time.time() - t:.0f} s")


def bench_args(description: str, **extra) -> argparse.Namespace:
    """--work (the bench directory, shared by the convert benchmarks), --layers, and ``extra``
    (name -> argparse keywords)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--work", type=Path, default=Path("/tmp/convert_bench"))
    p.add_argument("--layers", type=int, default=2)
    for name, kw in extra.items():
        p.add_argument(f"--{name.replace('_', '-')}", **kw)
    return p.parse_args()


def main() -> int:
    args = bench_args(__doc__.splitlines()[0], param_dtype=dict(default="bfloat16", choices=["bfloat16", "float32"]))
    src, dst = args.work / "hf", args.work / "flax"
    make_checkpoint(src, args.layers)
    shutil.rmtree(dst, ignore_errors=True)

    from omniret_jax.convert.tensors import TensorSource
    from omniret_jax.config import dtype_from_name
    import numpy as np

    source = TensorSource(src)
    itemsize = np.dtype(dtype_from_name(args.param_dtype)).itemsize
    keys = [k for k in source.keys() if k.startswith("thinker.")]
    sizes = {k: int(np.prod(source.shape(k))) * itemsize for k in keys}
    converted, largest = sum(sizes.values()), max(sizes.values())

    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "omniret_jax.interop", "orbax", "--src", str(src),
           "--out", str(dst), "--param-dtype", args.param_dtype]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    wall = time.time() - t
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        return proc.returncode
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    peak = rss_kb * 1024
    budget = converted + largest + GiB
    print([line for line in proc.stdout.splitlines() if line.startswith("converted")][0])
    print(f"converted parameters: {converted / GiB:.2f} GiB ({args.param_dtype}); largest tensor {largest / GiB:.2f} GiB")
    print(f"peak RSS: {peak / GiB:.2f} GiB; budget (converted + largest + 1 GiB): {budget / GiB:.2f} GiB; "
          f"wall {wall:.0f} s -> {'OK' if peak <= budget else 'OVER BUDGET'}")
    return 0 if peak <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
