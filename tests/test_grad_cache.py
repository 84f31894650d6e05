"""Gradient caching: a contrastive batch embedded chunk by chunk gives the one-shot step's loss and gradients.

Tiny random-init WAVE (configs/tiny.py, full preset: L_A + L_D + L_T with the hard negative),
adapter dropout ON with LoRA B non-zero (every adapter and head gets gradient), chunk = B / 4.
One-shot: ``step.loss_and_grads`` over the whole batch; cached: ``step.CachedGrads`` over
``data.batch.chunked`` inputs kept on the host (phase 1 embeds chunk by chunk without gradient,
phase 2 differentiates the losses with respect to the embeddings, phase 3 re-embeds each chunk
and pulls the cached gradient back), one chunk on the mesh at a time.
Tolerances (float32): loss absolute 1e-6, every trainable's gradient 1e-5 relative
(||a - b|| / ||b||), on one device and on a 2x2x2 mesh.
The trainer: ``train.contrastive_batch`` 8 in ``train.chunk`` 2 trains through ``train.train`` and
its first update's loss equals the uncached run's (same seed) within 1e-5; combinations the
cached step cannot run raise naming the key, before any work.
"""

from __future__ import annotations

import gc
import json
import math
import weakref
from pathlib import Path

import jax
import numpy as np
import pytest

from omniret_jax import build, sharding
from omniret_jax import train as trainer
from omniret_jax.data.batch import build_inputs, chunked
from omniret_jax.data.random_batch import random_batch
from omniret_jax.data.synth import SynthSettings, generate
from omniret_jax.losses import needed_views
from omniret_jax.model.lora import lora_modules, trainable_filter
from omniret_jax.step import CachedGrads, StepConfig, loss_and_grads

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
        loss, metrics, grads = jax.jit(fn)(state.trainable, state.frozen, sharding.shard_batch(host, mesh))
    else:  # the chunks stay on the host; no more than two are on the mesh at a time
        placed, alive = [], []

        def place(x):
            gc.collect()
            alive.append(sum(r() is not None for r in placed))   # chunks still on the device
            out = sharding.shard_batch(x, mesh)
            placed.append(weakref.ref(out.anchor.video_patches))
            return out

        cached = CachedGrads(state.graphdef, cfg=cfg, place=place)
        loss, metrics, grads = cached.loss_and_grads(state.trainable, state.frozen, chunked(host, chunks), 1, key)
        assert len(placed) == 2 * chunks and max(alive) <= 1, alive   # each chunk placed once per pass
    flat = {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]}
    return float(loss), {k: float(v) for k, v in metrics.items()}, flat


# The 2x2x2 mesh case takes ~100 s on 2 cores: slow (run with -m slow).
@pytest.mark.parametrize("mesh_shape, b", [((1, 1, 1), 8), pytest.param((2, 2, 2), 16, marks=pytest.mark.slow)])
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


# ----------------------------------------------------------------------------- the trainer

def _train_config(manifest: Path, **train):
    """Tiny full preset, 2 updates on the 8-clip corpus, mesh data 2 x tensor 4 (2 data-parallel devices)."""
    c = build.load_config(f"{ROOT}/configs/tiny.py:full", {"train.steps": 2})
    c.data.manifest = str(manifest)
    c.train.update(log_every=1, ckpt_every=100, **train)
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 1, 4
    return c


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    generate(str(out), 8, seed=0, settings=SynthSettings(seconds=2.0, size=64), progress=False)
    return out / "manifest.jsonl"


@pytest.mark.slow  # two compiles of the tiny step on 8 virtual devices: ~3 min on a loaded 2-core host
def test_train_with_gradient_caching_matches_uncached(manifest, tmp_path):
    """contrastive_batch 8 replaces batch_size 2 as the micro-batch; update 1 (lr 0 under warm-up,
    so update 2 sees the same parameters) has the one-shot loss."""
    logs = {}
    for name, train in (("one-shot", dict(batch_size=8)), ("cached", dict(batch_size=2, contrastive_batch=8, chunk=2))):
        trainer.train(_train_config(manifest, **train), tmp_path / name)
        logs[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    one, cached = logs["one-shot"], logs["cached"]
    print("losses one-shot", [round(m["loss"], 7) for m in one], "cached", [round(m["loss"], 7) for m in cached])
    assert [m["step"] for m in cached] == [1, 2] and all(m["skipped"] == 0 for m in cached)
    assert cached[0]["examples_per_s"] > 0 and cached[0]["micro_batches"] == 1
    assert abs(cached[0]["loss"] - one[0]["loss"]) <= 1e-5
    assert abs(cached[0]["grad_norm"] - one[0]["grad_norm"]) <= 1e-5 * one[0]["grad_norm"]


@pytest.mark.parametrize("train, embed, words", [
    (dict(contrastive_batch=8, chunk=3), {}, ["train.contrastive_batch=8", "train.chunk=3"]),
    (dict(contrastive_batch=8, chunk=1), {}, ["train.chunk=1", "data-parallel", "data*fsdp = 2*1 = 2"]),
    (dict(contrastive_batch=8, chunk=2), {"pack": (("T", 4),)}, ["embed.pack=()"]),
])
def test_train_rejects_what_caching_cannot_run(tmp_path, train, embed, words):
    c = _train_config(tmp_path / "absent.jsonl", **train)
    c.embed.update(embed)
    with pytest.raises(ValueError) as e:
        trainer.train(c, tmp_path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_caching_is_one_process_for_now(monkeypatch):
    c = _train_config(Path("absent.jsonl"), contrastive_batch=8, chunk=2)
    mesh = sharding.make_mesh(sharding.MeshConfig(2, 1, 4))
    monkeypatch.setattr(trainer.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match=r"train\.chunk=2 < train\.contrastive_batch=8.*one process"):
        trainer.grad_cache(c, mesh)
