"""Inference throughput of the eval embedding: clips/s of the joint AV path and of the T path.

The model comes from the config as the evaluator builds it (``omniret_jax.build.build_state`` in
eval mode, placed on the config's mesh) and embeds one fixed random batch of the pipeline's
format (``omniret_jax.data.random_batch``); each path is one jitted call of
``model.embedder.embed_paths`` (towers once, then the LLM pass, pooling and the fusion head).
The time is the median of ``--steps`` calls after ``--warmup``; the host-side layout is built
once, outside the timing, as the PyTorch side (bench/torch_reference_step.py --embed) does.
The last line of output is one JSON object.

COMMAND: python bench/embed_throughput.py --config configs/bench.py:small
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
from absl import app, flags
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import allocator  # noqa: E402
from omniret_jax import build, sharding  # noqa: E402
from omniret_jax.data.batch import prepare  # noqa: E402
from omniret_jax.data.random_batch import random_batch  # noqa: E402
from omniret_jax.model.embedder import embed_paths  # noqa: E402

build.define_config_flag()
_BATCH = flags.DEFINE_integer("batch", None, "clips per call (default: the config's train.batch_size)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed calls per path")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed calls first (the first compiles)")
_PATHS = flags.DEFINE_list("paths", ["AV", "T"], "embedding paths to time, one at a time")
_PROFILE = flags.DEFINE_string("profile", None, "write a jax.profiler trace of the timed calls here")


def run(c) -> dict:
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    b = _BATCH.value or c.train.batch_size
    state = build.build_state(c, mesh, train=False)
    ecfg = build.embed_config(c)
    caption_tokens = c.bench.caption_tokens if "bench" in c else None
    batch = random_batch(c, b, seed=0, augment=False, caption_tokens=caption_tokens, bucketed=True)

    @jax.jit
    def embed(trainable, frozen, inputs):
        return embed_paths(nnx.merge(state.graphdef, trainable, frozen), inputs, ecfg)

    out = {"side": "jax", "mode": "embed", "widths": c.get("bench", {}).get("widths", None), "batch": b,
           "steps": _STEPS.value, "malloc": allocator()}
    for path in _PATHS.value:
        inputs = sharding.shard_batch(prepare(batch, (path,), state.cfg, state.tokens, ecfg), mesh)
        times = []
        for i in range(_WARMUP.value + _STEPS.value):
            if i == _WARMUP.value and _PROFILE.value:
                jax.profiler.start_trace(f"{_PROFILE.value}/{path}")
            t0 = time.perf_counter()
            jax.block_until_ready(embed(state.trainable, state.frozen, inputs))
            if i >= _WARMUP.value:
                times.append(time.perf_counter() - t0)
        if _PROFILE.value:
            jax.profiler.stop_trace()
        median = statistics.median(times)
        print(f"{path}: {1000 * median:.1f} ms per batch of {b} (min {1000 * min(times):.1f}), "
              f"{b / median:.1f} clips/s", file=sys.stderr)
        out[f"median_s_{path}"] = median
        out[f"clips_per_s_{path}"] = b / median
    return out


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/bench.py:small")
    print(json.dumps(run(flags.FLAGS.config)))


if __name__ == "__main__":
    app.run(main)
