"""Synthetic WAVE checkpoints: every tensor a real checkpoint of the given widths holds, random values.

For benchmarks and tests at the real 7B widths without the real weights: the key set and
shapes come from the model (the same key map every conversion uses, BEATs' tied tables
repeated as in its checkpoints), the values from a seeded generator per tensor, and files
are written tensor by tensor (host memory holds one tensor at a time). Matrices are
N(0, 0.02^2); 1-D norm scales and gates 1 + N(0, 0.02^2); other vectors N(0, 0.02^2).

``seven_b_widths(layers)`` gives WAVE-7B's widths (text 3584 / vocab 152064, vision 1280,
audio 1280, BEATs 768, the fusion head over ``layers`` layers) with ``layers`` layers per tower.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
from flax import nnx

from omniret_jax.convert.keymap import flax_to_hf_key
from omniret_jax.config import AudioConfig, BEATsConfig, TextConfig, ThinkerConfig, VisionConfig
from omniret_jax.convert.to_torch import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SINGLE_FILE, checkpoint_entries,
                                          wave_config, write_checkpoint)
from omniret_jax.model.wave import WAVE


def seven_b_widths(layers: int = 2) -> tuple[ThinkerConfig, BEATsConfig]:
    """WAVE-7B's widths with ``layers`` layers per tower (text, vision, audio, BEATs)."""
    cfg = ThinkerConfig(text=TextConfig(num_hidden_layers=layers),
                        vision=VisionConfig(depth=layers, fullatt_block_indexes=(layers - 1,)),
                        audio=AudioConfig(encoder_layers=layers))
    return cfg, BEATsConfig(encoder_layers=layers)


def _value(key: str, shape: tuple[int, ...], dtype, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")])
    x = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    leaf = key.rsplit(".", 1)[-1]
    if len(shape) == 1 and leaf in ("weight", "weight_g", "grep_a") and "bias" not in key:
        x += np.float32(1.0)
    return x.astype(dtype)


def write_synthetic_wave(out_dir: str | Path, cfg: ThinkerConfig, beats_cfg: BEATsConfig, *, layout: str = "thinker",
                         dtype=ml_dtypes.bfloat16, seed: int = 0, extra: Mapping[str, tuple[int, ...]] | None = None,
                         config_updates: Mapping | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """A WAVE checkpoint directory (safetensors + config.json with ``beats_config``) in ``layout``.

    ``extra`` adds tensors the model does not read (the released layout's ``talker.*``, say);
    ``config_updates`` go into the top level of config.json.
    The "released" layout nests the thinker config under ``thinker_config`` as Qwen2.5-Omni does.
    """
    out_dir = Path(out_dir)
    for name in (SINGLE_FILE, INDEX_FILE):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name} exists; choose an empty output directory")
    model = nnx.eval_shape(lambda: WAVE(cfg, beats_cfg, rngs=nnx.Rngs(0)))
    entries, sources = checkpoint_entries(model, layout)
    # A tied copy (BEATs' relative bias table) takes its source's values.
    seed_key = {k: flax_to_hf_key(parts[0][0], layout) for k, parts in sources.items()}
    entries = sorted([(k, s, np.dtype(dtype)) for k, s, _ in entries]
                     + [(k, tuple(s), np.dtype(dtype)) for k, s in (extra or {}).items()])
    shapes = {k: s for k, s, _ in entries}
    write_checkpoint(out_dir, entries, lambda k: _value(seed_key.get(k, k), shapes[k], dtype, seed), max_shard_bytes=max_shard_bytes)
    config = wave_config(model, config_updates=config_updates)
    if layout == "released":
        config = {"model_type": "qwen2_5_omni", "beats_config": config.pop("beats_config"), "thinker_config": config}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir
