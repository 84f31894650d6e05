"""LoRA as NNX state on the tiny thinker: targets, PEFT-like init, identity at init, merge, dropout, filter.

Tolerance: merged vs unmerged outputs (hidden states of every layer and logits),
float32 with HIGHEST matmul precision, max abs error <= 1e-5. A fresh adapter
(B = 0) must leave the outputs bit-identical.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from omniret_jax.config import ThinkerConfig
from omniret_jax.model.layers import EMBED, HEADS, KV_HEADS, LayerNorm, Linear
from omniret_jax.model.lora import (
    LoRAConfig, apply_lora, iter_linears, lora_modules, merge_lora, path_str, trainable_filter,
)
from omniret_jax.model.text import TextModel
from omniret_jax.model.thinker import Thinker
from tests.hf_tiny import tiny_hf_config

MERGE_TOL = 1e-5
QKV = [f"language_model.layers.{i}.self_attn.{p}_proj" for i in range(3) for p in "kqv"]


@pytest.fixture(scope="module")
def cfg():
    return ThinkerConfig.from_hf_dict(tiny_hf_config().to_dict())


@pytest.fixture()
def model(cfg):
    return Thinker(cfg, rngs=nnx.Rngs(0))


IDS = jnp.asarray(np.random.default_rng(0).integers(0, 280, size=(2, 9)), jnp.int32)


@nnx.jit
def _forward(model, ids):
    b, s = ids.shape
    zeros = jnp.zeros((b, s), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (3, b, s))
    _, states, logits = model(ids, jnp.ones((b, s), jnp.int32), pos, zeros, zeros, logits=True)
    return states, logits


def _max_err(a, b) -> float:
    return max(float(jnp.abs(x - y).max()) for x, y in zip(a, b))


def _randomise_adapters(model, seed=0, std=0.2):
    rng = np.random.default_rng(seed)
    for linear in lora_modules(model).values():
        for var in (linear.lora_a, linear.lora_b):
            var.set_value(jnp.asarray(rng.normal(0, std, var.shape), var.dtype))


def test_targets_axes_init_and_frozen_kernel(model):
    kernels = {path_str(p): m.kernel.get_value() for p, m in iter_linears(model)}
    paths = apply_lora(model, LoRAConfig(), nnx.Rngs(1))
    assert paths == sorted(QKV)
    # Audio-tower q/k/v, o_proj, MLPs, vision, lm_head stay plain.
    assert sorted(lora_modules(model)) == sorted(QKV)
    for p, m in iter_linears(model):
        assert m.kernel.get_value() is kernels[path_str(p)], f"{path_str(p)}: kernel was copied or replaced"

    bound = 1.0 / math.sqrt(64)
    # PEFT: kaiming_uniform_(a=sqrt(5)) on torch's [r, in] lora_A.
    torch_bound = torch.nn.init.calculate_gain("leaky_relu", math.sqrt(5)) * math.sqrt(3.0 / 64)
    assert math.isclose(bound, torch_bound, rel_tol=1e-12)
    a_all = []
    for name, m in lora_modules(model).items():
        out_axis = HEADS if name.endswith("q_proj") else KV_HEADS
        assert m.lora_a.shape == (64, 16) and m.lora_b.shape == (16, m.out_features)
        assert m.lora_a.get_metadata()["axes"] == (EMBED, None)
        assert m.lora_b.get_metadata()["axes"] == (None, out_axis)
        assert m.lora_a.dtype == jnp.float32 and isinstance(m.lora_a, nnx.LoRAParam)
        assert not np.asarray(m.lora_b.get_value()).any()
        assert m.lora_scale == 2.0 and m.lora_dropout.rate == 0.05 and m.lora_dropout.deterministic
        a_all.append(np.asarray(m.lora_a.get_value()))
    a_all = np.stack(a_all)
    assert np.abs(a_all).max() <= bound
    std = a_all.std()
    print(f"\nlora_a std {std:.5f}, U(-b, b) std {bound / math.sqrt(3):.5f}")
    assert abs(std / (bound / math.sqrt(3)) - 1) < 0.05
    assert not np.array_equal(a_all[0], a_all[1]), "each adapter needs its own draw"

    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(), nnx.Rngs(2))


def test_bad_configs_are_named(model):
    with pytest.raises(ValueError, match=r"regex 'self_attn\\\.zz_proj\$' matches no Linear"):
        apply_lora(model, LoRAConfig(target=r"self_attn\.zz_proj$"), nnx.Rngs(0))
    with pytest.raises(ValueError, match="invalid regex"):
        LoRAConfig(target="(q_proj")
    with pytest.raises(ValueError, match="rank"):
        LoRAConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRAConfig(dropout=1.0)
    assert not lora_modules(model)


def test_fresh_adapter_changes_nothing_even_in_training(model):
    base = _forward(model, IDS)
    apply_lora(model, LoRAConfig(), nnx.Rngs(1))
    for i, (x, y) in enumerate(zip(base, _forward(model, IDS))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"output {i}")
    model.train()  # dropout on: B = 0 still contributes nothing
    for x, y in zip(base, _forward(model, IDS)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_merge_equals_unmerged(model):
    base = _forward(model, IDS)
    before = {path_str(p): np.asarray(m.kernel.get_value()) for p, m in iter_linears(model)}
    apply_lora(model, LoRAConfig(rank=4, alpha=8.0), nnx.Rngs(1))
    _randomise_adapters(model)
    adapted = _forward(model, IDS)
    moved = _max_err(base, adapted)
    assert moved > 1e-2, f"random adapters should move the outputs (moved {moved:.2e})"

    assert merge_lora(model) == sorted(QKV)
    assert not nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
    assert not nnx.to_flat_state(nnx.state(model, nnx.RngState)), "dropout RNG state must go with the adapter"
    for p, m in iter_linears(model):
        changed = not np.array_equal(np.asarray(m.kernel.get_value()), before[path_str(p)])
        assert changed == (path_str(p) in QKV), path_str(p)
    err = _max_err(adapted, _forward(model, IDS))
    print(f"\nmerged vs unmerged max abs error {err:.2e} (adapter moved outputs by {moved:.2e})")
    assert err <= MERGE_TOL
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_dropout_only_in_training_mode(model):
    apply_lora(model, LoRAConfig(rank=4, dropout=0.5), nnx.Rngs(params=1, dropout=2))
    _randomise_adapters(model)
    eval1, eval2 = _forward(model, IDS), _forward(model, IDS)
    assert _max_err(eval1, eval2) == 0.0
    model.train()
    train1, train2 = _forward(model, IDS), _forward(model, IDS)
    assert _max_err(train1, eval1) > 1e-3, "dropout should act in training mode"
    assert _max_err(train1, train2) > 1e-3, "each training step needs a fresh dropout mask"
    model.eval()
    assert _max_err(_forward(model, IDS), eval1) == 0.0
    # The same through nnx.view, leaving the model itself in eval mode.
    assert _max_err(_forward(nnx.view(model, deterministic=False), IDS), eval1) > 1e-3
    assert _max_err(_forward(model, IDS), eval1) == 0.0


class _WaveLike(nnx.Module):
    """The WAVE module names around a decoder: heads train, ``beats`` stays frozen."""

    def __init__(self, cfg: ThinkerConfig, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, use_bias=True)
        self.language_model = TextModel(cfg.text, rngs=rngs, remat=True)
        self.classify_linear = nnx.Dict({"0": Linear(64 * 3, 64, axes=(EMBED, EMBED), **kw),
                                         "2": Linear(64, 64, axes=(EMBED, EMBED), **kw)})
        self.beats_ln = LayerNorm(16)
        self.beats_proj = nnx.Dict({"0": Linear(16, 64, axes=(EMBED, EMBED), **kw),
                                    "2": Linear(64, 64, axes=(EMBED, EMBED), **kw)})
        self.beats = Linear(16, 16, axes=(EMBED, EMBED), **kw)

    def __call__(self, x, feats):
        b, s, _ = x.shape
        pos = jnp.broadcast_to(jnp.arange(s), (3, b, s))
        _, states = self.language_model(x, jnp.ones((b, s), jnp.int32), pos, pool_index=jnp.arange(b) * s + s - 1)
        fused = self.classify_linear["2"](self.classify_linear["0"](jnp.moveaxis(states[1:], 0, 1).reshape(b, -1)))
        audio = self.beats_proj["2"](self.beats_proj["0"](self.beats_ln(self.beats(feats))))
        return fused + audio.mean(axis=1)


def test_trainable_filter_split_state_and_grad(cfg):
    model = _WaveLike(cfg, nnx.Rngs(0))
    lcfg = LoRAConfig(rank=4)
    apply_lora(model, lcfg, nnx.Rngs(1))
    expected = sorted(
        [f"{m}.lora_{x}" for m in QKV for x in "ab"]
        + [f"classify_linear.{i}.{w}" for i in "02" for w in ("kernel", "bias")]
        + [f"beats_proj.{i}.{w}" for i in "02" for w in ("kernel", "bias")]
        + ["beats_ln.weight", "beats_ln.bias"])
    filt = trainable_filter(lcfg)
    _, trainable, rest = nnx.split(model, filt, ...)
    names = sorted(path_str(p) for p, _ in nnx.to_flat_state(trainable))
    assert names == expected
    assert sorted(path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, filt))) == expected
    rest_names = [path_str(p) for p, _ in nnx.to_flat_state(rest)]
    assert "beats.kernel" in rest_names and any(n.endswith("lora_dropout.rngs.key") for n in rest_names)

    # Gradients flow to exactly the trainable set, with adapter dropout on under remat.
    model.train()
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
    feats = jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32)

    @nnx.jit
    def grads(model, x, feats):
        return nnx.grad(lambda m: jnp.sum(m(x, feats) ** 2), argnums=nnx.DiffState(0, filt))(model)

    g = grads(model, x, feats)
    flat = {path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(g)}
    assert sorted(flat) == expected
    nonzero = [k for k in expected if np.abs(flat[k]).max() > 0]
    # lora_a gets no gradient while lora_b is zero (dL/dA = x^T dL/dz B^T); everything else does.
    assert sorted(nonzero) == sorted(k for k in expected if not k.endswith("lora_a")), nonzero


def test_bf16_backbone_keeps_float32_adapters():
    lin = Linear(8, 6, use_bias=True, axes=(EMBED, HEADS), rngs=nnx.Rngs(0), dtype=jnp.bfloat16,
                 param_dtype=jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 8)), jnp.bfloat16)
    before = lin(x)
    apply_lora(lin, LoRAConfig(rank=2, target="^$"), nnx.Rngs(1))  # "^$" = the root module
    assert lin.lora_a.dtype == jnp.float32 and lin.kernel.dtype == jnp.bfloat16
    after = lin(x)
    assert after.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(before, np.float32), np.asarray(after, np.float32))


def test_hash_dropout_keeps_the_right_fraction_and_scales():
    """The adapter dropout's hashed mask: Bernoulli(1 - rate) per element, kept values scaled by
    1 / (1 - rate) like torch.nn.Dropout; a fresh mask per call, a reproducible one per seed."""
    from omniret_jax.model.layers import Dropout

    x = jnp.ones((64, 128, 96))
    for rate in (0.05, 0.5):
        drop = Dropout(rate, deterministic=False, rngs=nnx.Rngs(dropout=3))
        a, b = np.asarray(drop(x)), np.asarray(drop(x))
        kept = float((a != 0).mean())
        sigma = np.sqrt(rate * (1 - rate) / a.size)
        print(f"rate {rate}: kept {kept:.5f} (want {1 - rate}, 5 sigma = {5 * sigma:.1e})")
        assert abs(kept - (1 - rate)) < 5 * sigma
        np.testing.assert_allclose(np.unique(a), [0.0, 1.0 / (1 - rate)], rtol=1e-6)
        assert (a != b).any(), "each call needs a fresh mask"
        # No structure along any axis: per-row and per-column keep rates stay near 1 - rate.
        for axis in (0, 1, 2):
            rates = (a != 0).mean(axis=tuple(i for i in range(3) if i != axis))
            assert np.abs(rates - (1 - rate)).max() < 6 * np.sqrt(rate * (1 - rate) / (a.size / a.shape[axis]))
        again = Dropout(rate, deterministic=False, rngs=nnx.Rngs(dropout=3))
        np.testing.assert_array_equal(np.asarray(again(x)), a)
    assert (np.asarray(Dropout(0.5, deterministic=True, rngs=nnx.Rngs(0))(x)) == 1).all()


def test_hash_dropout_masks_are_keyed_per_row():
    """Rows r..r+k of a batch get the masks they get inside the whole batch when the chunk says it
    starts at row r (the gradient-cached step embeds a contrastive batch chunk by chunk)."""
    from omniret_jax.model.layers import Dropout, set_row_offset

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5, 6)), jnp.float32) + 3.0
    whole = Dropout(0.3, deterministic=False, rngs=nnx.Rngs(dropout=1))
    want = np.asarray(whole(x))
    for start in (0, 2, 6):
        part = Dropout(0.3, deterministic=False, rngs=nnx.Rngs(dropout=1))
        set_row_offset(part, start)
        np.testing.assert_array_equal(np.asarray(part(x[start:start + 2])), want[start:start + 2])
