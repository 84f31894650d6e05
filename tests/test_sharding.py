"""Mesh construction, logical-axis partition specs and sharded execution of the thinker.

Runs on the 8 virtual CPU devices of conftest.py. The sharded text-only forward of
the tiny thinker (tests/hf_tiny.py, converted with the real loader) must equal the
unsharded forward within 1e-5 max abs error on every mesh; the 7B shapes are checked
abstractly (nnx.eval_shape, no memory).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.config import ThinkerConfig
from omniret_jax.model.layers import EMBED, MLP
from omniret_jax.model.thinker import Thinker
from omniret_jax.sharding import (
    LOGICAL_RULES, MeshConfig, batch_sharding, initialize_distributed, make_mesh,
    param_partition_specs, shard_batch, shard_state, sharding_fallbacks, state_shardings,
)
from tests.hf_tiny import tiny_hf_thinker

TOL = 1e-5
MESHES = [(1, 1, 1), (8, 1, 1), (2, 2, 2), (1, 4, 2)]


def _mesh(shape):
    n = math.prod(shape)
    return make_mesh(MeshConfig(*shape), jax.devices()[:n])


def _is_var(x):
    return isinstance(x, nnx.Variable)


def _flat(tree):
    """{dotted path: leaf} over Variables (the leaf is the Variable itself)."""
    return {jax.tree_util.keystr(p, simple=True, separator="."): v
            for p, v in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_var)[0]}


# -- mesh ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", MESHES + [(1, 8, 1)])
def test_mesh_builds(shape):
    mesh = _mesh(shape)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert len(set(mesh.devices.flat)) == math.prod(shape)


def test_mesh_fill_axis():
    assert dict(make_mesh(MeshConfig(data=2, fsdp=-1, tensor=2)).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1)).shape) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_dcn_needs_multislice():
    with pytest.raises(ValueError, match="multi-slice TPU"):
        make_mesh(MeshConfig(2, 2, 1, dcn_data=2))


@pytest.mark.parametrize("cfg, words", [
    (MeshConfig(3, 1, 1), ["data=3", "device count 8"]),
    (MeshConfig(2, 2, 4), ["data=2", "fsdp=2", "tensor=4", "device count 8"]),
    (MeshConfig(3, -1, 1), ["data=3", "device count 8"]),
    (MeshConfig(-1, -1, 1), ["only one axis"]),
    (MeshConfig(2, 0, 4), ["must be >= 1"]),
    (MeshConfig(2, 2, 2, dcn_data=2), ["dcn 2x1x1", "device count 8"]),
])
def test_bad_mesh_sizes(cfg, words):
    with pytest.raises(ValueError) as e:
        make_mesh(cfg)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


# -- specs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharding") / "thinker"
    tiny_hf_thinker(seed=5).save_pretrained(path)
    model, _ = load_thinker(path, progress=False)
    return model


def _check_specs(state, mesh, specs):
    """Every spec is a legal sharding of its parameter; returns the number of sharded params."""
    sharded = 0
    flat_specs = _flat(specs)
    for path, var in _flat(state).items():
        spec, shape = flat_specs[path].get_value(), var.get_value().shape
        assert isinstance(spec, P), path
        assert len(spec) <= len(shape), (path, spec, shape)
        used = [a for entry in spec if entry is not None for a in ((entry,) if isinstance(entry, str) else entry)]
        assert len(used) == len(set(used)), (path, spec)
        for entry, size in zip(spec, shape):
            if entry is not None:
                axes = (entry,) if isinstance(entry, str) else entry
                assert size % math.prod(mesh.shape[a] for a in axes) == 0, (path, spec, shape)
        sharded += any(e is not None for e in spec)
    return sharded


@pytest.mark.parametrize("shape", MESHES)
def test_tiny_specs_valid(tiny, shape):
    mesh = _mesh(shape)
    state = nnx.state(tiny)
    specs = param_partition_specs(state, mesh)
    n_sharded = _check_specs(state, mesh, specs)
    flat = _flat(specs)
    assert flat["language_model.layers.0.self_attn.q_proj.kernel"].get_value() == P("fsdp", "tensor")
    assert flat["language_model.layers.0.self_attn.o_proj.kernel"].get_value() == P("tensor", "fsdp")
    assert flat["language_model.embed_tokens.weight"].get_value() == P("tensor", "fsdp")
    assert flat["language_model.norm.weight"].get_value() == P(None)
    assert flat["visual.blocks.0.mlp.gate_proj.kernel"].get_value() == P("fsdp", "tensor")
    # Audio projection is (audio_embed, embed): both map to fsdp, so only dim 0 takes it.
    assert flat["audio_tower.proj.kernel"].get_value() == P("fsdp", None)
    assert n_sharded > 0
    # The tiny sizes (64, 32, 48, 128, 300) all divide by <= 4 ways.
    assert sharding_fallbacks(state, mesh) == [], sharding_fallbacks(state, mesh)


def test_tiny_fallback_reported(tiny):
    mesh = _mesh((1, 1, 8))
    state = nnx.state(tiny)
    fallbacks = sharding_fallbacks(state, mesh)
    got = {(f.path, f.dim, f.size, f.mesh_size) for f in fallbacks}
    assert ("language_model.embed_tokens.weight", 0, 300, 8) in got
    assert ("lm_head.kernel", 1, 300, 8) in got
    assert all(f.size % 8 for f in fallbacks)
    print("\n" + "\n".join(map(str, fallbacks)))
    specs = _flat(param_partition_specs(state, mesh))
    assert specs["lm_head.kernel"].get_value() == P("fsdp", None)
    _check_specs(state, mesh, param_partition_specs(state, mesh))


def _override(**changes):
    return tuple((name, changes.get(name, axes)) for name, axes in LOGICAL_RULES)


def test_rule_overrides(tiny):
    mesh = _mesh((2, 2, 2))
    state = nnx.state(tiny)
    rules = _override(vocab=None, mlp=("fsdp", "tensor"))
    flat = _flat(param_partition_specs(state, mesh, rules))
    assert flat["language_model.embed_tokens.weight"].get_value() == P(None, "fsdp")
    # gate_proj is (embed, mlp): fsdp is taken by embed, so mlp keeps only tensor.
    assert flat["language_model.layers.0.mlp.gate_proj.kernel"].get_value() == P("fsdp", "tensor")
    assert flat["language_model.layers.0.mlp.down_proj.kernel"].get_value() == P(("fsdp", "tensor"), None)
    assert dict(LOGICAL_RULES)["vocab"] == "tensor"   # defaults untouched
    with pytest.raises(ValueError, match="'vocab' twice"):
        param_partition_specs(state, mesh, LOGICAL_RULES + (("vocab", None),))
    with pytest.raises(ValueError, match="'model'"):
        param_partition_specs(state, mesh, _override(mlp="model"))


class _Toy(nnx.Module):
    def __init__(self, axes, shape=(4, 8), param=True):
        cls = nnx.Param if param else nnx.BatchStat
        self.inner = nnx.Dict({"w": cls(jnp.zeros(shape), **({} if axes is None else {"axes": axes}))})
        self.count = nnx.BatchStat(jnp.zeros((), jnp.int32))


def test_bad_axes_metadata():
    mesh = _mesh((2, 2, 2))
    with pytest.raises(ValueError, match=r"inner\.w.*'bogus'"):
        param_partition_specs(nnx.state(_Toy((EMBED, "bogus"))), mesh)
    with pytest.raises(ValueError, match=r"inner\.w has no `axes`"):
        param_partition_specs(nnx.state(_Toy(None)), mesh)
    with pytest.raises(ValueError, match=r"inner\.w.*shape \(4, 8\)"):
        param_partition_specs(nnx.state(_Toy((EMBED,))), mesh)
    # Non-parameter variables without axes (counters) are replicated.
    specs = _flat(param_partition_specs(nnx.state(_Toy(None, param=False)), mesh))
    assert specs["inner.w"].get_value() == P() and specs["count"].get_value() == P()


def test_shard_state_places_arrays():
    mesh = _mesh((2, 2, 2))
    state = nnx.state(_Toy((EMBED, MLP)))
    placed = _flat(shard_state(state, mesh))
    assert placed["inner.w"].get_value().sharding.spec == P("fsdp", "tensor")
    assert placed["inner.w"].get_value().addressable_shards[0].data.shape == (2, 4)
    assert placed["inner.w"].get_metadata()["axes"] == (EMBED, MLP)
    assert placed["count"].get_value().sharding.is_fully_replicated


# -- batch -----------------------------------------------------------------------------
def test_batch_sharding():
    mesh = _mesh((2, 2, 2))
    assert batch_sharding(mesh, 8).spec == P(("data", "fsdp"))
    assert batch_sharding(mesh, batch_axis=1).spec == P(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"global batch 6 .*data\*fsdp = 2\*2 = 4"):
        batch_sharding(mesh, 6)
    with pytest.raises(ValueError, match="global batch 6"):
        shard_batch(np.zeros((6, 3)), mesh)
    arr = shard_batch({"pos": np.arange(3 * 8 * 5).reshape(3, 8, 5)}, mesh, batch_axis=1)["pos"]
    assert arr.shape == (3, 8, 5) and arr.sharding.spec == P(None, ("data", "fsdp"))
    assert arr.addressable_shards[0].data.shape == (3, 2, 5)
    np.testing.assert_array_equal(np.asarray(arr), np.arange(3 * 8 * 5).reshape(3, 8, 5))


# -- sharded forward -------------------------------------------------------------------
def _text_batch(rng, b=8, s=12):
    ids = rng.integers(0, 280, size=(b, s)).astype(np.int32)
    mask = np.ones((b, s), np.int32)
    for i, pad in enumerate(rng.integers(0, s // 2, size=b)):
        mask[i, :pad] = 0                                   # left padding
        ids[i, :pad] = 0
    pos = np.clip(np.cumsum(mask, axis=1) - 1, 0, None).astype(np.int32)
    pos = np.broadcast_to(pos, (3, b, s)).copy()
    zeros = np.zeros((b, s), np.int32)                      # text only: source TEXT everywhere
    return ids, mask, pos, zeros, zeros


def _forward_fn(graphdef):
    def f(state, ids, mask, pos, source, index):
        model = nnx.merge(graphdef, state)
        _, states, logits = model(ids, mask, pos, source, index, logits=True)
        return states, logits
    return f


@pytest.fixture(scope="module")
def reference(tiny):
    graphdef, state = nnx.split(tiny)
    batch = _text_batch(np.random.default_rng(0))
    states, logits = jax.jit(_forward_fn(graphdef))(state, *batch)
    return batch, np.asarray(states), np.asarray(logits)


@pytest.mark.parametrize("shape", MESHES)
def test_sharded_forward_matches(tiny, reference, shape):
    batch, ref_states, ref_logits = reference
    mesh = _mesh(shape)
    graphdef, state = nnx.split(tiny)
    shardings = state_shardings(state, mesh)
    state = shard_state(state, mesh)
    q = _flat(state)["language_model.layers.0.self_attn.q_proj.kernel"].get_value()
    assert q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (64 // shape[1], 64 // shape[2])
    ids, mask, pos, source, index = batch
    sharded_batch = (*shard_batch((ids, mask), mesh), shard_batch(pos, mesh, batch_axis=1),
                     *shard_batch((source, index), mesh))
    assert sharded_batch[0].sharding.spec == P(("data", "fsdp"))
    fn = jax.jit(_forward_fn(graphdef),
                 in_shardings=(shardings, *(x.sharding for x in sharded_batch)))
    states, logits = fn(state, *sharded_batch)
    real = mask.astype(bool)
    err_states = float(np.abs(np.asarray(states) - ref_states)[:, real].max())
    err_logits = float(np.abs(np.asarray(logits) - ref_logits)[real].max())
    print(f"\nmesh {shape}: max abs error hidden={err_states:.2e} logits={err_logits:.2e}")
    assert max(err_states, err_logits) <= TOL, (shape, err_states, err_logits)


# -- 7B shapes -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def abstract_7b():
    return nnx.state(nnx.eval_shape(lambda: Thinker(ThinkerConfig(), rngs=nnx.Rngs(0))))


@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_7b_has_no_fallbacks(abstract_7b, shape):
    mesh = _mesh(shape)
    assert sharding_fallbacks(abstract_7b, mesh) == []
    shardings = _flat(state_shardings(abstract_7b, mesh))
    total = per_device = 0
    for path, var in _flat(abstract_7b).items():
        v = var.get_value()
        total += math.prod(v.shape) * v.dtype.itemsize
        per_device += math.prod(shardings[path].get_value().shard_shape(v.shape)) * v.dtype.itemsize
    ideal = total / math.prod(shape[1:])    # params are split over fsdp*tensor, replicated over data
    print(f"\n7B on {shape}: {total / 2**30:.2f} GiB total, {per_device / 2**30:.3f} GiB per device "
          f"({per_device / ideal:.4f} x the ideal fsdp*tensor split)")
    assert per_device <= 1.01 * ideal


def test_7b_tensor8_falls_back_on_vision_mlp(abstract_7b):
    fallbacks = sharding_fallbacks(abstract_7b, _mesh((1, 1, 8)))
    assert {(f.name, f.size) for f in fallbacks} == {("vision_mlp", 3420)}
    assert len(fallbacks) == 32 * 5    # gate/up kernel+bias, down kernel, in each of 32 vision blocks


# -- multi-host ------------------------------------------------------------------------
def test_distributed_not_configured(monkeypatch):
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    assert initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="process_id=3"):
        initialize_distributed("localhost:1234", num_processes=2, process_id=3)


def test_batch_rule_override():
    mesh = _mesh((2, 2, 2))
    rules = _override(batch="data")
    assert batch_sharding(mesh, 2, rules=rules).spec == P("data")
    with pytest.raises(ValueError, match=r"global batch 3 is not divisible by data = 2$"):
        shard_batch(np.zeros((3, 4)), mesh, rules=rules)
