"""The jaxtyping shape contracts on the device-side boundaries are checked in the test suite.

pyproject.toml's pytest options install jaxtyping's import hook with beartype for
omniret_jax.inputs, .model, .losses, .step and .data.batch, so every call in every test checks
the annotated shapes. Here: a broken contract fails with a TypeCheckError naming the argument,
at the towers, the thinker, the step inputs and the losses.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jaxtyping import TypeCheckError

from omniret_jax.config import AudioConfig, VisionConfig
from omniret_jax.inputs import PathInputs
from omniret_jax.losses import info_nce
from omniret_jax.model.audio import AudioTower
from omniret_jax.model.vision import VisionTower


def _path_inputs(b=2, s=5, **override):
    kw = dict(input_ids=np.zeros((b, s), np.int32), attention_mask=np.ones((b, s), np.int32),
              position_ids=np.zeros((b, 3, s), np.int32), source=np.zeros((b, s), np.int32),
              index=np.zeros((b, s), np.int32), pool_index=np.arange(b, dtype=np.int32) * s + s - 1)
    kw.update(override)
    return PathInputs(**kw)


def test_hook_is_installed():
    assert hasattr(info_nce, "__wrapped__"), "jaxtyping's pytest hook did not instrument omniret_jax.losses"


def test_step_inputs_contract():
    p = _path_inputs()
    assert p.input_ids.shape == (2, 5)
    with pytest.raises(TypeCheckError, match="source"):
        _path_inputs(source=np.zeros((3, 5), np.int32))        # 3 rows != 2
    with pytest.raises(TypeCheckError, match="pool_index"):
        _path_inputs(pool_index=np.zeros((2, 1), np.int32))    # one flat index per sequence
    with pytest.raises(TypeCheckError, match="position_ids"):
        _path_inputs(position_ids=np.zeros((2, 5), np.int32))  # not [B, 3, S]
    with pytest.raises(TypeCheckError, match="attention_mask"):
        _path_inputs(attention_mask=np.ones((2, 5), np.float32))  # masks are integers
    with pytest.raises(TypeCheckError, match="position_ids"):
        dataclasses.replace(p, position_ids=np.zeros((2, 3, 6), np.int32))  # length 6 != 5


def test_tower_contracts():
    vision = VisionTower(VisionConfig(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=8,
                                      fullatt_block_indexes=()), rngs=nnx.Rngs(0))
    with pytest.raises(TypeCheckError, match="patches"):
        vision(jnp.zeros((8, 1176)), None)
    audio = AudioTower(AudioConfig(encoder_layers=1, d_model=16, encoder_attention_heads=2, encoder_ffn_dim=16,
                                   output_dim=8), rngs=nnx.Rngs(0))
    with pytest.raises(TypeCheckError, match="feature_lens"):
        audio(jnp.zeros((2, 128, 200)), jnp.array([200.0, 100.0]))  # lengths are integers


def test_loss_contracts():
    x = jnp.ones((4, 8)) / jnp.sqrt(8.0)
    assert np.isfinite(float(info_nce(x, x, temperature=0.1)))
    with pytest.raises(TypeCheckError, match="parameter 'y'"):
        info_nce(x, jnp.ones((5, 8)), temperature=0.1)
    with pytest.raises(TypeCheckError, match="shared_negatives"):
        info_nce(x, x, temperature=0.1, shared_negatives=jnp.ones((3, 7)))
