"""``model.scan_layers``: the decoder layers stacked and run by ``lax.scan`` compute what the
unrolled layers compute.

- The decoder alone, 12 layers (more than 9, so the layer order of the per-layer tree, 0 1 2 ...
  10 11, is the stacking order), LoRA B non-zero, adapter dropout on: last hidden state and
  every layer's hidden state within 1e-6 max abs of the unrolled decoder, every adapter's
  gradient within 1e-5 relative, with remat none and full; another dropout key changes them
  (the masks are live, and equal on both sides).
- The whole train step of configs/tiny.py (full preset, dropout on): loss within 1e-6, every
  trainable's gradient within 1e-5 relative; the stacked adapters save and restore through
  the training checkpointer; a checkpoint of the other layout is refused naming the key.
- The factory's per-layer view (``ModelState.model()``, what exports read) equals the unscanned
  model bitwise; stacked parameters shard with a leading replicated layer axis; layers that
  differ (adapters on some only) are refused.
In the slow set: remat full, the whole train step with its checkpoint round trip, and the
factory's per-layer view and sharding test.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omniret_jax import build, sharding
from omniret_jax.checkpoint import TrainCheckpointer
from omniret_jax.data.batch import build_inputs
from omniret_jax.data.random_batch import random_batch
from omniret_jax.losses import needed_views
from omniret_jax.model.layers import reseed_dropout
from omniret_jax.model.lora import LoRAConfig, apply_lora, lora_modules, trainable_filter
from omniret_jax.model.text import scan_layers, unscan_layers
from omniret_jax.step import StepConfig, loss_and_grads

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
OUT_TOL, GRAD_TOL, LOSS_TOL = 1e-6, 1e-5, 1e-6
STACKED = re.compile(r"(^|\.)layers\.module\.")


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def _per_layer(flat: dict) -> dict:
    """{dotted path: array} of a scanned tree with every stacked leaf split into its layers'
    paths (``layers.module.X`` [L, ...] -> ``layers.i.X``), to compare with an unrolled tree."""
    out = {}
    for k, v in flat.items():
        if STACKED.search(k):
            for i in range(v.shape[0]):
                out[STACKED.sub(rf"\g<1>layers.{i}.", k)] = v[i]
        else:
            out[k] = v
    return out


def _flat(tree) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def _nonzero_b(model) -> None:
    for i, (_, linear) in enumerate(sorted(lora_modules(model).items())):
        linear.lora_b.set_value(0.05 * jax.random.normal(jax.random.fold_in(jax.random.key(5), i), linear.lora_b.shape))


def _config(layers: int | None = None, scan: bool = False):
    c = build.load_config(f"{TINY}:full", {"train.steps": 4})
    if layers:
        c.model.tiny.num_hidden_layers = layers
    c.model.scan_layers = scan
    return c


@pytest.mark.parametrize("remat", ["none", pytest.param("full", marks=pytest.mark.slow)])
def test_scanned_decoder_equals_unrolled(remat):
    c = _config(layers=12)
    model = build.attach_lora(build.random_model(c), c, train=True)
    _nonzero_b(model)
    unrolled = model.language_model
    scanned = scan_layers(nnx.clone(unrolled))
    assert scanned.scanned and not unrolled.scanned
    unrolled.remat = scanned.remat = remat
    b, s, d = 3, 11, unrolled.cfg.hidden_size
    x = jax.random.normal(jax.random.key(0), (b, s, d))
    mask = jnp.asarray([[1] * s, [1] * 7 + [0] * 4, [1] * 3 + [2] * 5 + [0] * 3])
    pos = jnp.broadcast_to(jnp.arange(s), (3, b, s))

    @nnx.jit
    def run(m, key):
        def loss(m):
            reseed_dropout(m, key)
            h, states = m(x, mask, pos)
            return jnp.sum(h * jnp.cos(h)) + jnp.sum(states ** 2), (h, states)
        (_, out), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(m)
        return out, grads

    with jax.default_matmul_precision("highest"):
        (h0, s0), g0 = run(unrolled, jax.random.key(7))
        (h1, s1), g1 = run(scanned, jax.random.key(7))
        (h2, _), _ = run(scanned, jax.random.key(8))
    assert s0.shape == s1.shape == (13, b, s, d)
    assert float(jnp.max(jnp.abs(h1 - h0))) <= OUT_TOL
    assert float(jnp.max(jnp.abs(s1 - s0))) <= OUT_TOL
    assert float(jnp.max(jnp.abs(h2 - h1))) > 1e-3   # dropout is on: another key, other masks
    want, got = _flat(g0), _per_layer(_flat(g1))
    assert got.keys() == want.keys() and len(want) == 12 * 6
    worst = max(_rel(got[k], want[k]) for k in want)
    assert worst <= GRAD_TOL, worst
    print(f"12 layers, remat {remat}: hidden states {float(jnp.max(jnp.abs(s1 - s0))):.2e} max abs, "
          f"adapter gradients {worst:.2e} relative")


@pytest.mark.slow
def test_scanned_train_step_equals_unrolled_and_checkpoints(tmp_path):
    runs = {}
    for scan in (False, True):
        c = _config(scan=scan)
        model = build.attach_lora(build.random_model(c), c, train=True)
        if scan:   # same weights as the unrolled run: stack a copy of its model
            model = scan_layers(nnx.clone(runs[False][0]))
        else:
            _nonzero_b(model)
        graphdef, trainable, frozen = build.split_state(model, build.lora_config(c), build.precision(c))
        lcfg, ecfg = build.loss_config(c), build.embed_config(c)
        host = build_inputs(random_batch(c, 8, seed=0), 0, model.cfg, build.tokens_for(c), ecfg, needed_views(lcfg),
                            seed=c.train.seed)
        fn = jax.jit(lambda t, f, i, k, g=graphdef, c=c, lcfg=lcfg, ecfg=ecfg: loss_and_grads(
            g, t, f, i, 0, k, wrt=trainable_filter(build.lora_config(c)), cfg=StepConfig(ecfg=ecfg, loss=lcfg)))
        with jax.default_matmul_precision("highest"):
            loss, _, grads = fn(trainable, frozen, host, jax.random.key(3))
        runs[scan] = (model, float(loss), _flat(grads), trainable, c)
    (_, l0, g0, _, _), (_, l1, g1, trainable, c) = runs[False], runs[True]
    assert runs[True][0].language_model.scanned and any(STACKED.search(k) for k in g1)
    assert abs(l1 - l0) <= LOSS_TOL, (l0, l1)
    got = _per_layer(g1)
    assert got.keys() == g0.keys()
    worst = max(_rel(got[k], g0[k]) for k in g0)
    assert worst <= GRAD_TOL, worst
    print(f"train step: loss {l0:.7f} vs {l1:.7f} scanned, gradients {worst:.2e} relative")

    opt = jax.jit(build.optimizer(c).init)(trainable)
    with TrainCheckpointer(tmp_path / "checkpoints", config=c.to_dict()) as ckpt:
        ckpt.save(1, trainable, opt, force=True)
    with TrainCheckpointer(tmp_path / "checkpoints") as ckpt:
        back = ckpt.restore(1, trainable, opt)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(_flat(back.trainables)),
                                                      jax.tree.leaves(_flat(trainable))))
    with pytest.raises(ValueError, match=r"model\.scan_layers=True.*scan_layers=True"):
        build.check_layer_layout(back.config, _config(scan=False), "checkpoint x")
    build.check_layer_layout(back.config, c, "checkpoint x")


@pytest.mark.slow  # ~35 s: two random-init builds on a mesh; the train-step test covers the factory's stacking
def test_factory_unstacks_for_export_and_shards_the_layer_axis():
    mesh = sharding.make_mesh(sharding.MeshConfig(1, 2, 2), jax.devices()[:4])
    states = {scan: build.build_state(_config(scan=scan), mesh) for scan in (False, True)}
    scanned = states[True]
    flat = dict(nnx.to_flat_state(sharding.param_partition_specs(scanned.frozen, mesh)))
    key = ("language_model", "layers", "module", "self_attn", "q_proj", "kernel")
    assert flat[key].get_value() == P(None, "fsdp", "tensor")
    keys = lambda st: jax.tree.map(lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)  # noqa: E731
                                   else x, nnx.state(st.model()))
    want, got = _flat(keys(states[False])), _flat(keys(scanned))
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_layers_that_differ_are_refused():
    c = _config()
    model = build.random_model(c)
    apply_lora(model, LoRAConfig(target=r"language_model\.layers\.0\.self_attn\.q_proj$"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="module 1 differs in structure from module 0"):
        scan_layers(model)
    assert not model.language_model.scanned
    assert len(unscan_layers(model).language_model.layers) == c.model.tiny.num_hidden_layers
