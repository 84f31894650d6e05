"""Gradient caching: compiled memory of the cached step against the one-shot step, and its time cost.

``--mode memory`` (default): for each contrastive batch B of ``--batches``, compile (lower +
compile, nothing runs) the cached train step (``train_step(cached=True)`` over B examples in
chunks of ``--chunk``) and the one-shot step over the same B, and print one JSON line per setting:
XLA's per-device memory analysis (argument, output, alias, temporary bytes), the peak estimate
argument + output - alias + temporaries, and the compile seconds. The trainables, frozen weights
and optimizer state are shapes only (``build.abstract_state``), placed as the trainer places them.
The inputs are the pipeline format of ``random_batch`` at B (with ``--abstract``: one chunk's
layout built on the host and repeated B / chunk times as shapes, so the 7B shapes compile without
allocating a batch either; the one-shot step is then skipped unless ``--one_shot``).

``--mode time``: both steps at the first batch of ``--batches``, built and placed like the
trainer (random weights), median of ``--steps`` runs after ``--warmup``; prints the cached /
one-shot ratio (gradient caching pays about one extra forward of the gradient passes).

COMMAND: python bench/grad_cache.py --config configs/bench.py:tiny --batches 8,32,128 --chunk 8
COMMAND: python bench/grad_cache.py --config configs/bench.py:tiny --mode time --batches 32 --chunk 8
COMMAND: XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/grad_cache.py --config configs/omniretriever_7b.py --config.model.init=random --abstract --batches 256 --chunk 64
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniret_jax import build, sharding  # noqa: E402
from omniret_jax.data.batch import build_inputs, chunked  # noqa: E402
from omniret_jax.data.random_batch import random_batch  # noqa: E402
from omniret_jax.losses import needed_views  # noqa: E402
from omniret_jax.model.lora import trainable_filter  # noqa: E402
from omniret_jax.step import StepConfig, make_optimizer, train_step  # noqa: E402

build.define_config_flag()
_MODE = flags.DEFINE_enum("mode", "memory", ["memory", "time"], "compiled memory, or step times")
_BATCHES = flags.DEFINE_list("batches", ["8", "32", "128"], "global contrastive batches")
_CHUNK = flags.DEFINE_integer("chunk", 8, "global examples per forward/backward of the cached step")
_ABSTRACT = flags.DEFINE_boolean("abstract", False, "memory mode: inputs as shapes (one chunk's layout repeated)")
_ONE_SHOT = flags.DEFINE_boolean("one_shot", None, "memory mode: also compile the one-shot step "
                                 "(default: yes, but not with --abstract)")
_STEPS = flags.DEFINE_integer("steps", 5, "time mode: timed runs of each step")
_WARMUP = flags.DEFINE_integer("warmup", 1, "time mode: untimed runs first")
_CAPTION_CHARS = flags.DEFINE_integer("caption_chars", 48, "mean random caption length, unless the config "
                                      "sets bench.caption_tokens")


def host_inputs(c, b: int, model_cfg, tokens):
    """Host TrainInputs of a random batch of b, the hard-negative tuple as its own view (cached and
    one-shot steps read the same inputs)."""
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    plan, chars = needed_views(lcfg), _CAPTION_CHARS.value
    batch = random_batch(c, b, seed=0, augment=bool(plan.aug), caption_chars=(chars // 2, chars * 3 // 2),
                         caption_tokens=c.bench.caption_tokens if "bench" in c else None, bucketed=True)
    return build_inputs(batch, 1, model_cfg, tokens, ecfg, plan, seed=c.train.seed, neg_towers=True)


def abstract_inputs(host, mesh, chunks: int | None):
    """ShapeDtypeStructs of the step's inputs: batch-first, or [chunks, chunk, ...] on axis 1."""
    axis = 0 if chunks is None else 1
    tree = host if chunks is None else chunked(host, chunks)
    sh = sharding.batch_sharding(mesh, batch_axis=axis)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=sh), tree)


def repeated_chunk(host_chunk, mesh, chunks: int):
    """The [chunks, K, ...] shapes of ``chunks`` chunks laid out like ``host_chunk`` (K examples)."""
    one = chunked(host_chunk, 1)
    sh = sharding.batch_sharding(mesh, batch_axis=1)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct((chunks, *np.shape(x)[1:]), np.asarray(x).dtype, sharding=sh),
                        one)


def make_step(c, graphdef, lora, tx, cached: bool):
    cfg, wrt = StepConfig(ecfg=build.embed_config(c), loss=build.loss_config(c)), trainable_filter(lora)

    def step_fn(params, frozen, opt, inputs, step, key):
        return train_step(graphdef, params, frozen, opt, inputs, step, key, wrt=wrt, tx=tx, cfg=cfg, cached=cached)

    return step_fn


def optimizer(c):
    return make_optimizer(lr=c.optim.lr, total_steps=c.train.steps, warmup_ratio=c.optim.warmup_ratio,
                          weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm, accumulate=1,
                          decay=c.optim.get("decay", "all"))


def jit_step(c, mesh, graphdef, lora, tx, trainable, frozen, opt, inputs, cached: bool):
    """The step jitted with the trainer's shardings and donation."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shard = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    return jax.jit(make_step(c, graphdef, lora, tx, cached),
                   in_shardings=(shard(trainable), shard(frozen), shard(opt), shard(inputs), replicated, replicated),
                   out_shardings=(shard(trainable), shard(opt), replicated), donate_argnums=(0, 2))


def memory(c, mesh) -> list[dict]:
    graphdef, trainable, frozen, model_cfg = build.abstract_state(c, train=True)
    tokens, lora = build.tokens_for(c), build.lora_config(c)
    placed = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding.state_shardings(tree, mesh))
    trainable, frozen = placed(trainable), placed(frozen)
    tx = optimizer(c)
    opt = placed(jax.eval_shape(tx.init, trainable))
    replicated = NamedSharding(mesh, PartitionSpec())
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    key = jax.random.key(0)
    k = _CHUNK.value
    one_shot = (not _ABSTRACT.value) if _ONE_SHOT.value is None else _ONE_SHOT.value
    chunk_host = host_inputs(c, k, model_cfg, tokens) if _ABSTRACT.value else None
    rows = []
    for b in map(int, _BATCHES.value):
        if b % k:
            raise SystemExit(f"--batches {b} is not a multiple of --chunk {k}")
        host = None if _ABSTRACT.value else host_inputs(c, b, model_cfg, tokens)
        for cached in (True, False) if one_shot else (True,):
            if cached:
                inputs = repeated_chunk(chunk_host, mesh, b // k) if host is None else abstract_inputs(host, mesh, b // k)
            else:
                inputs = abstract_inputs(host, mesh, None)
            fn = jit_step(c, mesh, graphdef, lora, tx, trainable, frozen, opt, inputs, cached)
            t0 = time.perf_counter()
            mem = fn.lower(trainable, frozen, opt, inputs, step, key).compile().memory_analysis()
            dt = time.perf_counter() - t0
            row = dict(step="cached" if cached else "one_shot", contrastive_batch=b, chunk=k if cached else b,
                       devices=mesh.devices.size, argument_bytes=mem.argument_size_in_bytes,
                       output_bytes=mem.output_size_in_bytes, alias_bytes=mem.alias_size_in_bytes,
                       temp_bytes=mem.temp_size_in_bytes,
                       peak_bytes=(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
                                   + mem.temp_size_in_bytes), compile_s=round(dt, 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def timing(c, mesh) -> dict:
    b, k = int(_BATCHES.value[0]), _CHUNK.value
    state = build.build_state(c, mesh, train=True)
    tx = optimizer(c)
    host = host_inputs(c, b, state.cfg, state.tokens)
    step, key = sharding.replicated(np.int32(1), mesh), jax.random.key(0)
    times = {}
    for cached in (False, True):
        inputs = (sharding.shard_batch(chunked(host, b // k), mesh, batch_axis=1) if cached
                  else sharding.shard_batch(host, mesh))
        opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, state.trainable), mesh)
        params = jax.tree.map(jnp.copy, state.trainable)
        opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
        fn = jit_step(c, mesh, state.graphdef, state.lora, tx, params, state.frozen, opt, inputs, cached)
        runs, loss = [], None
        for i in range(_WARMUP.value + _STEPS.value):
            t0 = time.perf_counter()
            params, opt, metrics = fn(params, state.frozen, opt, inputs, step, key)
            jax.block_until_ready((params, opt, metrics))
            if i >= _WARMUP.value:
                runs.append(time.perf_counter() - t0)
            loss = float(metrics["loss"]) if loss is None else loss
        times["cached" if cached else "one_shot"] = (statistics.median(runs), loss)
    (t1, l1), (tc, lc) = times["one_shot"], times["cached"]
    return dict(mode="time", contrastive_batch=b, chunk=k, devices=mesh.devices.size, one_shot_s=round(t1, 4),
                cached_s=round(tc, 4), ratio=round(tc / t1, 3), steps=_STEPS.value, warmup=_WARMUP.value,
                first_loss_one_shot=l1, first_loss_cached=lc)


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    c = flags.FLAGS.config
    if c is None:
        raise app.UsageError("--config is required, e.g. --config configs/bench.py:tiny")
    if tuple(c.embed.pack):
        raise app.UsageError("the cached step needs unpacked paths: --config.embed.pack=()")
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    sharding.batch_sharding(mesh, _CHUNK.value)  # the chunk divides over the data-parallel devices
    if _MODE.value == "memory":
        memory(c, mesh)
    else:
        print(json.dumps(timing(c, mesh)))


if __name__ == "__main__":
    app.run(main)
