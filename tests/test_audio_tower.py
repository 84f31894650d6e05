"""Parity of omniret_jax.model.audio.AudioTower with transformers' Qwen2.5-Omni audio encoder.

Reference: ``Qwen2_5OmniThinkerForConditionalGeneration.get_audio_features`` (which runs
``Qwen2_5OmniAudioEncoder``) on the tiny random thinker of tests/hf_tiny.py. Outputs are
compared in float32 with max abs error <= 1e-4 per audio.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError
import torch
from flax import nnx

from omniret_jax.data.layout import audio_output_lengths
from omniret_jax.model.audio import AudioTower, sinusoid_positions
from omniret_jax.config import ThinkerConfig
from tests.hf_tiny import load_torch_weights, tiny_hf_thinker

TOL = 1e-4
CHUNK = 200  # 2 * n_window of the tiny config


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_thinker(seed=0)


@pytest.fixture(scope="module")
def cfg(hf):
    return ThinkerConfig.from_hf_dict(hf.config.to_dict()).audio


def torch_key(path) -> str:
    key = ".".join(map(str, path))
    return key[: -len("kernel")] + "weight" if key.endswith("kernel") else key


def make_tower(hf, cfg, dtype=jnp.float32) -> AudioTower:
    tower = AudioTower(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=jnp.float32)
    load_torch_weights(tower, hf.model.audio_tower)
    return tower


@pytest.fixture(scope="module")
def tower(hf, cfg):
    return make_tower(hf, cfg)


@nnx.jit
def run(tower, mel, lens):
    return tower(mel, lens)


def reference(hf, mels: list[np.ndarray]) -> list[np.ndarray]:
    """Per-audio reference features: the thinker concatenates every audio's tokens, so split them."""
    lens = [m.shape[1] for m in mels]
    width = max(lens)
    batch = np.zeros((len(mels), mels[0].shape[0], width), np.float32)
    mask = np.zeros((len(mels), width), np.int64)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
        mask[i, : m.shape[1]] = 1
    with torch.no_grad():
        out = hf.get_audio_features(torch.from_numpy(batch), feature_attention_mask=torch.from_numpy(mask))
    flat = out.last_hidden_state.numpy()
    counts = audio_output_lengths(lens)
    assert flat.shape[0] == counts.sum()
    return np.split(flat, np.cumsum(counts)[:-1])


def padded_input(mels: list[np.ndarray], t: int, rng: np.random.Generator, fill: float = 1e4):
    """[B, n_mels, t] with frames past each audio's length set to large random values."""
    batch = (fill * rng.standard_normal((len(mels), mels[0].shape[0], t))).astype(np.float32)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    return batch, np.array([m.shape[1] for m in mels], np.int32)


def random_mels(rng, lengths, n_mels=128):
    return [rng.standard_normal((n_mels, n)).astype(np.float32) for n in lengths]


def test_param_paths_and_shapes_match_torch(hf, cfg):
    tower = AudioTower(cfg, rngs=nnx.Rngs(0))
    sd = hf.model.audio_tower.state_dict()
    ours = {torch_key(p): tuple(v.shape)[::-1] if p[-1] == "kernel" else tuple(v.shape)
            for p, v in nnx.to_flat_state(nnx.state(tower, nnx.Param))}
    assert ours == {k: tuple(v.shape) for k, v in sd.items()}
    # Non-parameter state would be an extra checkpoint entry with no torch counterpart.
    assert {torch_key(p) for p, _ in nnx.to_flat_state(nnx.state(tower))} == set(sd)


def test_sinusoid_table_matches_torch(hf, cfg):
    # Positions restart per chunk, so only the first n_window rows are ever used.
    ref = hf.model.audio_tower.positional_embedding.positional_embedding.numpy()[: cfg.n_window]
    err = float(np.abs(sinusoid_positions(cfg.n_window, cfg.d_model) - ref).max())
    print(f"sinusoid table (first {cfg.n_window} rows) max abs err {err:.2e}")
    assert err <= 1e-6


def test_output_lengths_match_torch(hf):
    lens = np.arange(1, 3001)
    _, ref = hf.model.audio_tower._get_feat_extract_output_lengths(torch.from_numpy(lens))
    np.testing.assert_array_equal(audio_output_lengths(lens), ref.numpy())
    assert audio_output_lengths([800, 1000, 357, 200, 3, 2]).tolist() == [200, 250, 89, 50, 1, 0]


@pytest.mark.parametrize("length", [800, 1000, 357, 200, 3, 2])
def test_single_audio_parity(hf, cfg, tower, length):
    rng = np.random.default_rng(length)
    mels = random_mels(rng, [length])
    t = math.ceil(length / CHUNK) * CHUNK
    mel, lens = padded_input(mels, t, rng)
    feats, valid = run(tower, jnp.asarray(mel), jnp.asarray(lens))
    feats, valid = np.asarray(feats), np.asarray(valid)
    n_out = int(audio_output_lengths(length))
    assert feats.shape == (1, t // 4, cfg.output_dim) and valid.shape == (1, t // 4)
    np.testing.assert_array_equal(valid[0], np.arange(t // 4) < n_out)
    (ref,) = reference(hf, mels)
    assert ref.shape[0] == n_out
    err = float(np.abs(feats[0, :n_out] - ref).max()) if n_out else 0.0
    print(f"L={length} T={t}: {n_out} tokens, max abs err {err:.2e}")
    assert err <= TOL
    assert np.isfinite(feats).all()


def test_padded_batch_parity_and_no_leak(hf, tower):
    rng = np.random.default_rng(7)
    lengths = [357, 1000, 601]
    mels = random_mels(rng, lengths)
    mel, lens = padded_input(mels, 1000, rng)
    feats, valid = map(np.asarray, run(tower, jnp.asarray(mel), jnp.asarray(lens)))
    counts = audio_output_lengths(lengths)
    np.testing.assert_array_equal(valid, np.arange(250)[None, :] < counts[:, None])
    refs = reference(hf, mels)
    for i, (ref, n) in enumerate(zip(refs, counts)):
        err = float(np.abs(feats[i, :n] - ref).max())
        print(f"batch audio {i} L={lengths[i]}: max abs err {err:.2e}")
        assert err <= TOL, (i, err)
    # Different garbage in the padded frames must not change a single valid output.
    mel_zero, _ = padded_input(mels, 1000, rng, fill=0.0)
    feats_zero, _ = map(np.asarray, run(tower, jnp.asarray(mel_zero), jnp.asarray(lens)))
    leak = max(float(np.abs(feats[i, :n] - feats_zero[i, :n]).max()) for i, n in enumerate(counts))
    print(f"padding leak (1e4-scale garbage vs zeros) max abs diff {leak:.2e}")
    assert leak == 0.0
    # Each audio alone (its own row, same T) gives the same answer as inside the batch.
    solo, _ = map(np.asarray, run(tower, jnp.asarray(mel[1:2]), jnp.asarray(lens[1:2])))
    assert float(np.abs(solo[0] - feats[1]).max()) <= 1e-6


def test_bfloat16_close_to_float32(hf, cfg, tower):
    rng = np.random.default_rng(3)
    lengths = [1000, 357, 601]
    mel, lens = padded_input(random_mels(rng, lengths), 1000, rng)
    f32, valid = map(np.asarray, run(tower, jnp.asarray(mel), jnp.asarray(lens)))
    bf16_tower = make_tower(hf, cfg, dtype=jnp.bfloat16)
    bf16, valid_bf = run(bf16_tower, jnp.asarray(mel), jnp.asarray(lens))
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(valid_bf), valid)
    a, b = f32[valid].astype(np.float64), np.asarray(bf16.astype(jnp.float32))[valid].astype(np.float64)
    assert np.isfinite(b).all()
    cos = float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))
    per_token = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    print(f"bf16 vs f32: cosine {cos:.6f}, worst token cosine {per_token.min():.6f}")
    assert cos >= 0.999


def test_bad_inputs_raise(tower):
    mel = jnp.zeros((2, 128, 400))
    with pytest.raises(ValueError, match="T=300 is not a multiple"):
        tower(jnp.zeros((2, 128, 300)), jnp.array([10, 20]))
    with pytest.raises(ValueError, match=r"feature_lens\[1\]=401"):
        tower(mel, jnp.array([400, 401]))
    with pytest.raises(ValueError, match=r"feature_lens\[0\]=0"):
        tower(mel, np.array([0, 5]))
    with pytest.raises((ValueError, TypeCheckError), match="feature_lens"):  # the shape contract names it
        tower(mel, jnp.array([5]))
    with pytest.raises(ValueError, match="mel must be"):
        tower(jnp.zeros((2, 80, 400)), jnp.array([5, 5]))
