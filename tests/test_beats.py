"""Parity of omniret_jax.model.beats.BEATs with a PyTorch BEATs reference.

Reference: PyPI `openbeats` 0.1.1, which vendors ESPnet's `BeatsEncoder` (the unilm
BEATs code plus ESPnet's padding handling; same state-dict keys as unilm apart from two
frozen all-ones convs `patch_embedding_pad` / `raw2fbank_pad` that only map padding
masks). It is imported through tests/torchaudio_stub.py because its module top imports
torchaudio, which has no wheel for torch 2.13 CPU; the fbank is fed directly
(`skip_fbank_extraction=True`), so the stubbed kaldi front end is never used. ESPnet
normalises fed features with (x - mean) / (2 * std); mean 0 / std 0.5 make that the
identity, so both models see the same normalised fbank.

Tolerances: float32 max abs error <= 1e-4 on every valid token; bfloat16 cosine >= 0.999.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError
import torch
from flax import nnx

from omniret_jax.config import BEATsConfig, Precision
from omniret_jax.convert.beats import canonical_state, load_unilm_checkpoint, tied_keys
from omniret_jax.convert.tensors import CheckpointError
from omniret_jax.convert.to_flax import load_beats
from omniret_jax.model.beats import BEATs, relative_position_buckets
from tests.torchaudio_stub import import_beats_encoder

ref = import_beats_encoder()

TOL = 1e-4
ESPNET_ONLY = ("patch_embedding_pad.weight", "raw2fbank_pad.weight")

# The `cfg` entry of BEATs_iter3_plus_AS2M.pt (unilm), as published.
ITER3_PLUS_CFG = {
    "encoder_layers": 12, "encoder_embed_dim": 768, "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12, "activation_fn": "gelu", "dropout": 0.0, "attention_dropout": 0.0,
    "activation_dropout": 0.0, "encoder_layerdrop": 0.0, "dropout_input": 0.0,
    "layer_norm_first": False, "conv_bias": False, "conv_pos": 128, "conv_pos_groups": 16,
    "relative_position_embedding": True, "num_buckets": 320, "max_distance": 800, "gru_rel_pos": True,
    "deep_norm": True, "input_patch_size": 16, "layer_wise_gradient_decay_ratio": 0.6, "embed_dim": 512,
    "finetuned_model": False, "predictor_dropout": 0.0, "predictor_class": 527,
}

# Tiny: 2 layers, 4 heads, dim 64, FFN 128, patch dim 32, pos conv kernel 16 / 4 groups,
# 32 buckets / max distance 64 (80-token inputs reach the clipped bucket range).
TINY = dict(ITER3_PLUS_CFG, encoder_layers=2, encoder_embed_dim=64, encoder_ffn_embed_dim=128,
            encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4, num_buckets=32,
            max_distance=64)
# Other switches: conv bias, plain post-LN (no deep norm), ungated bias, odd kernel.
VARIANT = dict(TINY, conv_bias=True, deep_norm=False, gru_rel_pos=False, conv_pos=15, conv_pos_groups=2)


def make_reference(cfg: dict, seed: int):
    """ESPnet BeatsEncoder with every trainable tensor randomised (norms and gates included)."""
    torch.manual_seed(seed)
    model = ref.BeatsEncoder(input_size=1, beats_config=cfg, fbank_mean=0.0, fbank_std=0.5).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():          # shared bias table appears once
            if name.split(".")[0] + ".weight" in ESPNET_ONLY:
                continue
            leaf = name.rsplit(".", 1)[-1]
            if "norm" in name and leaf == "weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("grep_a"):
                p.copy_(1.0 + 0.5 * torch.randn_like(p))
            elif leaf == "weight_g":
                p.copy_(p * (0.5 + torch.rand_like(p)))
            elif leaf == "bias" or "relative_attention_bias" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
    return model


def unilm_state(model) -> dict[str, np.ndarray]:
    """The reference's state dict in unilm layout (all tied copies kept, ESPnet-only keys dropped)."""
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items() if k not in ESPNET_ONLY}


def run_reference(model, fbank: np.ndarray, padding_mask: np.ndarray | None = None):
    with torch.no_grad():
        pm = None if padding_mask is None else torch.from_numpy(padding_mask)
        out, pm_out = model.extract_features(torch.from_numpy(fbank), pm, skip_fbank_extraction=True)[:2]
    return out.numpy(), (None if pm_out is None else pm_out.numpy())


def build(cfg: dict, weights, dtype=jnp.float32) -> BEATs:
    return load_beats(BEATsConfig.from_unilm_dict(cfg), weights, precision=Precision(compute=dtype, frozen=dtype))


@nnx.jit
def forward(model, fbank, padding_mask):
    return model(fbank, padding_mask)


def fbank_batch(rng, b, t):
    return rng.standard_normal((b, t, 128)).astype(np.float32)


CONFIGS = {"iter3plus-tiny": TINY, "variant": VARIANT}


@functools.cache
def reference(name: str):
    model = make_reference(CONFIGS[name], seed=len(name))
    return model, unilm_state(model)


@pytest.fixture(scope="module")
def tiny():
    return reference("iter3plus-tiny")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_unpadded_parity(name):
    torch_model, weights = reference(name)
    model = build(CONFIGS[name], weights)
    rng = np.random.default_rng(0)
    for t in (64, 160):                                    # 32 and 80 tokens
        fb = fbank_batch(rng, 2, t)
        want, _ = run_reference(torch_model, fb)
        got, mask = forward(model, jnp.asarray(fb), jnp.zeros((2, t), bool))
        err = float(np.max(np.abs(np.asarray(got) - want)))
        print(f"[{name}] T={t} N={want.shape[1]} max abs err {err:.3e}")
        assert got.shape == want.shape == (2, t // 16 * 8, 64)
        assert bool(mask.all())
        assert err <= TOL, f"T={t}: max abs err {err:.3e} > {TOL}"


def test_padded_batch_parity(tiny):
    torch_model, weights = tiny
    model = build(TINY, weights)
    rng = np.random.default_rng(1)
    t, lengths = 160, (160, 64, 100)                       # 100 frames: 6 whole patches + a partial one
    fb = fbank_batch(rng, len(lengths), t)
    pad = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]
    fb[pad] = 7.0                                          # padding content must not leak into valid tokens
    want, want_pad = run_reference(torch_model, fb, pad)
    got, mask = forward(model, jnp.asarray(fb), jnp.asarray(pad))
    got, mask = np.asarray(got), np.asarray(mask)
    np.testing.assert_array_equal(mask, ~want_pad)
    np.testing.assert_array_equal(mask.sum(1), [80, 32, 48])
    err = float(np.max(np.abs(got[mask] - want[mask])))
    print(f"padded batch vs reference (same mask): max abs err {err:.3e}")
    assert err <= TOL
    assert np.all(got[~mask] == 0.0), "padded tokens must be zero"
    # Valid tokens equal the clip run alone, cropped to whole patches (what WAVE runs).
    for i, length in enumerate(lengths):
        whole = length // 16 * 16
        alone, _ = run_reference(torch_model, fb[i:i + 1, :whole])
        n = alone.shape[1]
        err_alone = float(np.max(np.abs(got[i, :n] - alone[0])))
        print(f"row {i} (length {length}) vs unpadded reference: max abs err {err_alone:.3e}")
        assert err_alone <= TOL


def test_fully_padded_row_is_zero(tiny):
    model = build(TINY, tiny[1])
    fb = fbank_batch(np.random.default_rng(2), 2, 48)
    pad = np.zeros((2, 48), bool)
    pad[1] = True
    got, mask = forward(model, jnp.asarray(fb), jnp.asarray(pad))
    assert bool(jnp.all(jnp.isfinite(got))) and not bool(mask[1].any())
    assert bool(jnp.all(got[1] == 0))


def test_bfloat16_close_to_reference(tiny):
    torch_model, weights = tiny
    model = build(TINY, weights, dtype=jnp.bfloat16)
    rng = np.random.default_rng(3)
    fb = fbank_batch(rng, 2, 160)
    pad = np.zeros((2, 160), bool)
    pad[1, 96:] = True
    want, _ = run_reference(torch_model, fb, pad)
    got, mask = forward(model, jnp.asarray(fb), jnp.asarray(pad))
    assert got.dtype == jnp.bfloat16
    got, mask = np.asarray(got, np.float32)[np.asarray(mask)], np.asarray(mask)
    want = want[mask]
    cos = np.sum(got * want, -1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(want, axis=-1))
    print(f"bfloat16: min per-token cosine {cos.min():.5f}, max abs err {np.abs(got - want).max():.3e}")
    assert cos.min() >= 0.999


def test_relative_position_buckets_match_reference():
    for cfg in (BEATsConfig(), BEATsConfig.from_unilm_dict(TINY)):
        attn = ref.MultiheadAttention(8, 2, self_attention=True, has_relative_attention_bias=True,
                                      num_buckets=cfg.num_buckets, max_distance=cfg.max_distance)
        n = 20000
        want = attn._relative_positions_bucket(torch.arange(-(n - 1), n), bidirectional=True).numpy()
        np.testing.assert_array_equal(relative_position_buckets(cfg, n), want)


def test_full_config_keys_and_shapes():
    """iter3+ defaults: every parameter path is a unilm key with the torch shape (Linear transposed)."""
    assert BEATsConfig.from_unilm_dict(ITER3_PLUS_CFG) == BEATsConfig()
    torch.manual_seed(0)
    torch_model = ref.BeatsEncoder(input_size=1, beats_config=ITER3_PLUS_CFG)
    want = {k: tuple(v.shape) for k, v in torch_model.state_dict().items() if k not in ESPNET_ONLY}
    abstract = nnx.eval_shape(lambda: BEATs(BEATsConfig(), rngs=nnx.Rngs(0)))
    got = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = list(map(str, path))
        shape = tuple(var.shape)
        if names[-1] == "kernel":
            names[-1], shape = "weight", shape[::-1]
        got[".".join(names)] = shape
    tied = tied_keys(BEATsConfig())
    assert len(tied) == 11
    assert got == {k: v for k, v in want.items() if k not in tied}
    n_ref = sum(p.numel() for k, p in torch_model.named_parameters() if k not in ESPNET_ONLY)
    assert sum(int(np.prod(s)) for s in got.values()) == n_ref == 90_311_792


def test_checkpoint_file_and_weight_norm_variants(tiny, tmp_path):
    torch_model, weights = tiny
    fb = fbank_batch(np.random.default_rng(4), 1, 64)
    want, _ = run_reference(torch_model, fb)
    pm = jnp.zeros((1, 64), bool)

    # A unilm .pt in the fine-tuned layout (predictor head present, ignored for features).
    cfg = dict(TINY, finetuned_model=True)
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    state["predictor.weight"], state["predictor.bias"] = torch.zeros(527, 64), torch.zeros(527)
    path = tmp_path / "beats.pt"
    torch.save({"cfg": cfg, "model": state}, path)
    loaded_cfg, loaded = load_unilm_checkpoint(path)
    assert loaded_cfg == BEATsConfig.from_unilm_dict(cfg) and set(loaded) == set(state)
    model = load_beats(loaded_cfg, loaded)
    err = float(np.max(np.abs(np.asarray(forward(model, jnp.asarray(fb), pm)[0]) - want)))
    print(f".pt round trip: max abs err {err:.3e}")
    assert err <= TOL

    # Same weights under a prefix (WAVE's `beats.`), with the pos conv as a plain weight and
    # as torch's parametrization names.
    pc = "encoder.pos_conv.0."
    g, v = torch.from_numpy(weights[pc + "weight_g"]), torch.from_numpy(weights[pc + "weight_v"])
    plain = torch._weight_norm(v, g, 2).numpy()
    variants = {
        "plain": {pc + "weight": plain},
        "parametrizations": {pc + "parametrizations.weight.original0": g.numpy(),
                             pc + "parametrizations.weight.original1": v.numpy()},
    }
    base = {k: w for k, w in weights.items() if not k.startswith(pc + "weight")}
    for name, extra in variants.items():
        model = load_beats(BEATsConfig.from_unilm_dict(TINY),
                           {"beats." + k: w for k, w in {**base, **extra}.items()} | {"other.x": 0}, prefix="beats.")
        err = float(np.max(np.abs(np.asarray(forward(model, jnp.asarray(fb), pm)[0]) - want)))
        print(f"pos conv as {name}: max abs err {err:.3e}")
        assert err <= TOL


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown BEATs cfg keys \['encoder_layer'\]"):
        BEATsConfig.from_unilm_dict(dict(ITER3_PLUS_CFG, encoder_layer=3))
    with pytest.raises(ValueError, match=r"lacks keys \['deep_norm'\]"):
        BEATsConfig.from_unilm_dict({k: v for k, v in ITER3_PLUS_CFG.items() if k != "deep_norm"})
    with pytest.raises(ValueError, match="layer_norm_first"):
        BEATsConfig.from_unilm_dict(dict(ITER3_PLUS_CFG, layer_norm_first=True))
    with pytest.raises(ValueError, match="not divisible by encoder_attention_heads=5"):
        BEATsConfig(encoder_attention_heads=5)
    with pytest.raises(ValueError, match="activation_fn='glu'"):
        dataclasses.replace(BEATsConfig(), activation_fn="glu")
    with pytest.raises(ValueError, match="must be a dict"):
        BEATsConfig.from_unilm_dict([("encoder_layers", 12)])


def test_weight_and_input_errors(tiny, tmp_path):
    weights = tiny[1]
    cfg = BEATsConfig.from_unilm_dict(TINY)
    model = BEATs(cfg, rngs=nnx.Rngs(0))
    bad = dict(weights, **{"encoder.layers.1.fc1.weight": np.zeros((128, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"'encoder.layers.1.fc1.weight': checkpoint shape \(128, 32\)"):
        load_beats(cfg, bad)
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): encoder.layer_norm.bias"):
        load_beats(cfg, {k: v for k, v in weights.items() if k != "encoder.layer_norm.bias"})
    with pytest.raises(CheckpointError, match=r"1 unknown key\(s\): predictor.weight"):
        load_beats(cfg, dict(weights, **{"predictor.weight": np.zeros((527, 64), np.float32)}))
    key = "encoder.layers.1.self_attn.relative_attention_bias.weight"
    with pytest.raises(ValueError, match=f"{key} differs"):
        canonical_state(model.cfg, dict(weights, **{key: weights[key] + 1.0}))
    with pytest.raises(ValueError, match="T, F non-zero multiples of 16"):
        model(jnp.zeros((1, 50, 128)))
    with pytest.raises((ValueError, TypeCheckError), match="padding_mask"):  # the shape contract names it
        model(jnp.zeros((1, 48, 128)), jnp.zeros((1, 47), bool))
    path = tmp_path / "not_beats.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="with 'cfg' and 'model'"):
        load_unilm_checkpoint(path)
