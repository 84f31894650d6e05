"""Gradient caching: a contrastive batch embedded chunk by chunk gives the one-shot step's loss and gradients.

Tiny random-init WAVE (configs/tiny.py, full preset: L_A + L_D + L_T with the hard negative),
adapter dropout ON with LoRA B non-zero (every adapter and head gets gradient), chunk = B / 4.
One-shot: ``step.loss_and_grads`` over the whole batch; cached: ``step.cached_loss_and_grads``
over ``data.batch.chunked`` inputs (phase 1 embeds without gradient, phase 2 differentiates the
losses with respect to the embeddings, phase 3 re-embeds and pulls the cached gradient back).
Tolerances (float32): loss absolute 1e-6, every trainable's gradient 1e-5 relative
(||a - b|| / ||b||), on one device and on a 2x2x2 mesh.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from omniret_jax import build, sharding
from omniret_jax.data.batch import build_inputs, chunked
from omniret_jax.data.random_batch import random_batch
from omniret_jax.losses import needed_views
from omniret_jax.model.lora import lora_modules, trainable_filter
from omniret_jax.step import StepConfig, cached_loss_and_grads, loss_and_grads

ROOT = Path(__file__).resolve().parents[1]


def _setup(b: int):
    c = build.load_config(f"{ROOT}/configs/tiny.py:full", {"train.batch_size": b})
    model = build.attach_lora(build.random_model(c), c, train=True)
    for i, (_, linear) in enumerate(sorted(lora_modules(model).items())):
        linear.lora_b.set_value(0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(9), i),
                                                         linear.lora_b.shape))
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    host = build_inputs(random_batch(c, b, seed=4), 1, model.cfg, build.tokens_for(c), ecfg, needed_views(lcfg),
                        seed=0, neg_towers=True)
    return c, model, host, StepConfig(ecfg=ecfg, loss=lcfg)


def _run(c, model, host, cfg, mesh, chunks):
    state = build.place(model, c, mesh, tokens=build.tokens_for(c))
    wrt = trainable_filter(state.lora)
    key = jax.random.key(5)
    if chunks == 1:
        fn = lambda t, f, x: loss_and_grads(state.graphdef, t, f, x, 1, key, wrt=wrt, cfg=cfg)  # noqa: E731
        inputs = sharding.shard_batch(host, mesh)
    else:
        fn = lambda t, f, x: cached_loss_and_grads(state.graphdef, t, f, x, 1, key, wrt=wrt, cfg=cfg)  # noqa: E731
        inputs = sharding.shard_batch(chunked(host, chunks), mesh, batch_axis=1)
    loss, metrics, grads = jax.jit(fn)(state.trainable, state.frozen, inputs)
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]}
    return float(loss), {k: float(v) for k, v in metrics.items()}, flat


@pytest.mark.parametrize("mesh_shape, b", [((1, 1, 1), 8), pytest.param((2, 2, 2), 16)])
def test_cached_step_equals_one_shot(mesh_shape, b):
    c, model, host, cfg = _setup(b)
    mesh = sharding.make_mesh(sharding.MeshConfig(*mesh_shape), jax.devices()[:math.prod(mesh_shape)])
    loss1, m1, g1 = _run(c, model, host, cfg, mesh, 1)
    loss4, m4, g4 = _run(c, model, host, cfg, mesh, 4)
    rel = {k: float(np.linalg.norm(g4[k] - g1[k]) / max(np.linalg.norm(g1[k]), 1e-30)) for k in g1}
    worst = max(rel, key=rel.get)
    print(f"mesh {mesh_shape} B={b} chunk {b // 4}: loss {loss1:.7f} vs {loss4:.7f} (diff {abs(loss1 - loss4):.1e}); "
          f"terms {[(t, round(m1[t], 6), round(m4[t], 6)) for t in ('L_A', 'L_D', 'L_T')]}; {len(g1)} gradients, "
          f"worst relative error {rel[worst]:.1e} ({worst})")
    assert g1.keys() == g4.keys()
    assert all(np.linalg.norm(v) > 0 for v in g1.values()), "every trainable must get gradient"
    assert abs(loss1 - loss4) <= 1e-6
    assert rel[worst] <= 1e-5


def test_chunking_rejects_what_it_cannot_split():
    c, model, host, cfg = _setup(8)
    with pytest.raises(ValueError, match="do not split into 3 equal chunks"):
        chunked(host, 3)
    layout_only = build_inputs(random_batch(c, 8, seed=4), 1, model.cfg, build.tokens_for(c), cfg.ecfg,
                               needed_views(cfg.loss), seed=0)
    with pytest.raises(ValueError, match="neg_towers=True"):
        chunked(layout_only, 4)
