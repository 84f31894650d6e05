"""What the backbone parity tests share: media tensors, the Flax side of a forward, the comparison.

Each test builds its own reference call (the two transformers families take different
arguments) and hands the reference outputs to ``compare``; the Flax side is the same for
every backbone: towers over one row per item, the host merge indices, one jitted pass.
Tolerance: float32, matmul precision HIGHEST (tests/conftest.py), max abs error <= 1e-4 on
every hidden state and the logits at real tokens.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx

from omniret_jax.data.batch import merge_indices
from omniret_jax.data.vision_layout import vision_layout
from omniret_jax.inputs import AUDIO

TOL = 1e-4


def with_kernel(kernel: str):
    """A ``configure`` for the loaders: the attention kernel of the LLM and the vision tower, as
    ``build.with_attention`` sets it ("xla" = jax.nn's, or "blocked"). ``with_kernel("xla")(cfg)``
    is also ``cfg`` without the run-time choice, as a config.json stores it."""
    impl = None if kernel == "xla" else kernel
    return lambda cfg: cfg.replace(text=dataclasses.replace(cfg.text, attention_impl=impl),
                                   vision=dataclasses.replace(cfg.vision, attention_impl=impl))
PATCH = 3 * 2 * 14 * 14


def vision_items(rng, grids) -> list[np.ndarray]:
    """Random patches [t*h*w, PATCH] for each grid (None: no item)."""
    return [rng.standard_normal((int(np.prod(g)), PATCH)).astype(np.float32) for g in (grids if grids is not None else [])]


def vision_inputs(cfg, items: dict[int, tuple[list[np.ndarray], np.ndarray]]):
    """Tower inputs (one padded row per item) plus the merge-index counts of each vision kind.

    ``items`` maps IMAGE / VIDEO to (patch arrays in reading order, their grids)."""
    vis_in, n_valid, capacity = {}, {}, {}
    unit = cfg.vision.spatial_merge_size ** 2
    for kind, (arrays, grids) in items.items():
        if not arrays:
            continue
        p = max(x.shape[0] for x in arrays)
        patches = np.zeros((len(arrays), p, PATCH), np.float32)
        for i, x in enumerate(arrays):
            patches[i, : len(x)] = x
        vis_in[kind] = (patches, vision_layout([[tuple(g)] for g in grids], p, cfg.vision))
        n_valid[kind] = [int(np.prod(g)) // unit for g in grids]
        capacity[kind] = p // unit
    return vis_in, n_valid, capacity


@nnx.jit
def _forward(model, input_ids, attention_mask, position_ids, source, index, vis_in, aud_in):
    media = {kind: model.encode_vision(patches, layout) for kind, (patches, layout) in vis_in.items()}
    if aud_in is not None:
        media[AUDIO] = model.encode_audio(*aud_in)
    _, states, logits = model(input_ids, attention_mask, position_ids, source, index, media, logits=True)
    return states, logits


def flax_forward(model, batch, pos, vis_in, n_valid, capacity, aud_in=None):
    """(hidden states [L+1, B, S, D], logits) of the Flax backbone on a padded batch."""
    source, index = merge_indices(batch.input_ids, model.cfg, n_valid, capacity)
    return _forward(model, batch.input_ids, batch.attention_mask, pos, source, index, vis_in, aud_in)


def compare(ref, states, logits, attention_mask, label: str) -> dict[str, float]:
    """Max abs error of every hidden state and the logits at real tokens; asserts <= TOL."""
    real = np.asarray(attention_mask).astype(bool)
    assert len(ref.hidden_states) == states.shape[0]
    errors = {f"hidden_{i}": float(np.abs(np.asarray(states[i]) - h.numpy())[real].max())
              for i, h in enumerate(ref.hidden_states)}
    errors["logits"] = float(np.abs(np.asarray(logits) - ref.logits.numpy())[real].max())
    worst = max(errors.values())
    print(f"\nmax abs error ({label}): " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    assert worst <= TOL, f"max abs error {worst:.3e} > {TOL} ({errors})"
    return errors
