"""Gradient caching: compiled memory of the cached step against the one-shot step, and its time cost.

``--mode memory`` (default): compile (lower + compile, nothing runs) the phases of the cached
step (``step.CachedGrads``: embed a chunk, the losses over all B embeddings, re-embed a chunk with
its vjp, the AdamW update; every chunk has one chunk's shapes, so only the loss phase sees B) and
the one-shot step over the same B, and print one JSON line per setting: XLA's per-device memory
analysis of each phase (argument, output, alias, temporary bytes), what else is alive on the
device beside it (optimizer state, the next chunk, the B embeddings, ...) and the peak over the
phases, with the compile seconds. Trainables, frozen weights and optimizer state are shapes only
(``build.abstract_state``), placed as the trainer places them; the inputs are the pipeline format
of ``random_batch``: one chunk's for the cached step, B examples' for the one-shot step (skipped
with ``--abstract`` unless ``--one_shot``, so the 7B shapes need no batch allocated).

``--mode time``: both steps at the first batch of ``--batches``, built and placed like the
trainer (random weights), median of ``--steps`` runs after ``--warmup``; prints the cached /
one-shot ratio (gradient caching pays about one extra forward of the gradient passes).

COMMAND: python bench/grad_cache.py --config configs/bench.py:tiny --batches 8,32,128 --chunk 8
COMMAND: python bench/grad_cache.py --config configs/bench.py:tiny --mode time --batches 32 --chunk 8
COMMAND: XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/grad_cache.py --config configs/omniretriever_7b.py --config.model.init=random --abstract --batches 256 --chunk 64
"""

from __future__ import annotations

import dataclasses
import json
import math
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
from omniret_jax.step import CachedGrads, StepConfig, apply_update, make_optimizer, train_step  # noqa: E402

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


def _shapes(tree, sh=None):
    """ShapeDtypeStructs of a host tree (with sharding ``sh``: a function of the array's rank)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                       sharding=None if sh is None else sh(np.ndim(x))), tree)


def _bytes(tree) -> int:
    """Per-device bytes of a tree of sharded ShapeDtypeStructs."""
    def one(x):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)   # the frozen RNG state: 2 x uint32
        return math.prod(shard) * (8 if key else np.dtype(x.dtype).itemsize)
    return sum(one(x) for x in jax.tree.leaves(tree))


def optimizer(c):
    return make_optimizer(lr=c.optim.lr, total_steps=c.train.steps, warmup_ratio=c.optim.warmup_ratio,
                          weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm, accumulate=1,
                          decay=c.optim.get("decay", "all"))


def _analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return dict(argument=m.argument_size_in_bytes, output=m.output_size_in_bytes, alias=m.alias_size_in_bytes,
                temp=m.temp_size_in_bytes,
                own=m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes)


def memory(c, mesh) -> list[dict]:
    """Compiled per-device memory of the cached step's phases (every chunk has one chunk's shapes,
    so only the loss phase sees C) and of the one-shot step over the same C."""
    graphdef, trainable, frozen, model_cfg = build.abstract_state(c, train=True)
    tokens, lora = build.tokens_for(c), build.lora_config(c)
    cfg = StepConfig(ecfg=build.embed_config(c), loss=build.loss_config(c))
    placed = lambda tree: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding.state_shardings(tree, mesh))
    trainable, frozen = placed(trainable), placed(frozen)
    tx = optimizer(c)
    opt = placed(jax.eval_shape(tx.init, trainable))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = lambda ndim: sharding.batch_sharding(mesh) if ndim else replicated  # noqa: E731
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    offset = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    key = jax.random.key(0)
    k = _CHUNK.value
    one_shot = (not _ABSTRACT.value) if _ONE_SHOT.value is None else _ONE_SHOT.value
    chunk = dataclasses.replace(_shapes(host_inputs(c, k, model_cfg, tokens), batch_sh), neg_rows=None)
    cached = CachedGrads(graphdef, cfg=cfg, place=None)
    t0 = time.perf_counter()
    fwd = cached.forward.lower(trainable, frozen, chunk, offset, key).compile()
    emb = jax.eval_shape(cached.forward, trainable, frozen, chunk, offset, key)
    emb = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh(x.ndim)), emb)
    bwd = cached.backward.lower(trainable, trainable, frozen, chunk, offset, key, emb).compile()
    upd = jax.jit(apply_update, static_argnums=5, donate_argnums=(0, 1)).lower(
        trainable, opt, trainable, jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated), {}, tx).compile()
    chunk_s = time.perf_counter() - t0
    rows = []
    for b in map(int, _BATCHES.value):
        if b % k:
            raise SystemExit(f"--batches {b} is not a multiple of --chunk {k}")
        n = b // k
        neg = jax.ShapeDtypeStruct((b, 3), jnp.int32, sharding=batch_sh(2))
        t0 = time.perf_counter()
        los = cached.losses.lower(tuple([emb] * n), neg, step).compile()
        phases = {name: _analysis(x) for name, x in (("forward", fwd), ("losses", los), ("backward", bwd),
                                                     ("update", upd))}
        # Alive on the device beside each phase's own arguments, outputs and temporaries.
        w, f, o, e, x = _bytes(trainable), _bytes(frozen), _bytes(opt), _bytes(emb), _bytes(chunk)
        beside = {"forward": o + x + n * e, "losses": w + f + o, "backward": o + x + n * e, "update": f}
        peak = max(phases[p]["own"] + beside[p] for p in phases)
        row = dict(step="cached", contrastive_batch=b, chunk=k, devices=mesh.devices.size, peak_bytes=peak,
                   phases={p: dict(v, beside=beside[p]) for p, v in phases.items()},
                   embeddings_bytes=n * e, chunk_input_bytes=x, compile_s=round(chunk_s + time.perf_counter() - t0, 2))
        print(json.dumps(row), flush=True)
        rows.append(row)
        chunk_s = 0.0
        if one_shot:
            inputs = _shapes(host_inputs(c, b, model_cfg, tokens), batch_sh)
            t0 = time.perf_counter()
            fn = jax.jit(make_step(c, graphdef, lora, tx), donate_argnums=(0, 2))
            m = _analysis(fn.lower(trainable, frozen, opt, inputs, step, key).compile())
            row = dict(step="one_shot", contrastive_batch=b, chunk=b, devices=mesh.devices.size, peak_bytes=m["own"],
                       phases={"step": m}, compile_s=round(time.perf_counter() - t0, 2))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def make_step(c, graphdef, lora, tx):
    cfg, wrt = StepConfig(ecfg=build.embed_config(c), loss=build.loss_config(c)), trainable_filter(lora)

    def step_fn(params, frozen, opt, inputs, step, key):
        return train_step(graphdef, params, frozen, opt, inputs, step, key, wrt=wrt, tx=tx, cfg=cfg)

    return step_fn


def timing(c, mesh) -> dict:
    """Both steps at the first batch of --batches, placed like the trainer: the one-shot step
    jitted whole, the cached one streaming host chunks (``step.CachedGrads``) then the update."""
    b, k = int(_BATCHES.value[0]), _CHUNK.value
    state = build.build_state(c, mesh, train=True)
    tx = optimizer(c)
    host = host_inputs(c, b, state.cfg, state.tokens)
    cfg = StepConfig(ecfg=build.embed_config(c), loss=build.loss_config(c))
    step, key = sharding.replicated(np.int32(1), mesh), jax.random.key(0)
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, state.trainable), mesh)
    one_shot = jax.jit(make_step(c, state.graphdef, state.lora, tx), donate_argnums=(0, 2))
    cached = CachedGrads(state.graphdef, cfg=cfg, place=lambda x: sharding.shard_batch(x, mesh))
    update = jax.jit(apply_update, static_argnums=5, donate_argnums=(0, 1))

    def cached_step(params, frozen, opt, inputs, step, key):
        loss, metrics, grads = cached.loss_and_grads(params, frozen, inputs, step, key)
        return update(params, opt, grads, loss, metrics, tx)

    times = {}
    for name, fn, inputs in (("one_shot", one_shot, sharding.shard_batch(host, mesh)),
                             ("cached", cached_step, chunked(host, b // k))):
        params = jax.tree.map(jnp.copy, state.trainable)
        opt = jax.jit(tx.init, out_shardings=opt_sh)(params)
        runs, loss = [], None
        for i in range(_WARMUP.value + _STEPS.value):
            t0 = time.perf_counter()
            params, opt, metrics = fn(params, state.frozen, opt, inputs, step, key)
            jax.block_until_ready((params, opt, metrics))
            if i >= _WARMUP.value:
                runs.append(time.perf_counter() - t0)
            loss = float(metrics["loss"]) if loss is None else loss
        times[name] = (statistics.median(runs), loss)
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
