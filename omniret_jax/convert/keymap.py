"""One key map per on-disk checkpoint layout, used by both conversion directions.

Flax parameter paths mirror the PyTorch module tree (see model/layers.py), so a
layout is only a table from our top-level module names to the checkpoint's
prefixes, plus the prefixes it carries that the port does not use. Linear
kernels are the one leaf whose array differs: ``kernel`` is torch's ``weight``
transposed.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from omniret_jax.config import NEMOTRON_MODEL_TYPE

# Layouts verified against transformers 5.23 (save_pretrained of the thinker
# class writes "thinker"; its in-memory module tree is "transformers5") and the
# released Qwen2.5-Omni index (thinker nested under "thinker.").
#
# "nemotron": nvidia/omni-embed-nemotron-3b. Its modeling file (modeling_nv_omni_embed.py) subclasses
# the transformers-4.5x thinker (which holds model / visual / audio_tower / lm_head as attributes of
# its own) and only swaps ``self.model`` for a bidirectional text model of the same module tree: no
# extra module, no pooler. Verified: those module names, and that transformers 5.24's save_pretrained
# of the thinker writes these prefixes. Inferred (no index.json of the repository was readable): the
# checkpoint's keys carry no "thinker." prefix and include lm_head (the published 4.7 B parameter
# count needs an untied lm_head). Its keys are the "thinker" layout's; config.json's model_type
# "nvomniembed" tells it apart (``detect_layout``).
LAYOUTS: dict[str, dict[str, str]] = {
    "released": {
        "language_model": "thinker.model",
        "visual": "thinker.visual",
        "audio_tower": "thinker.audio_tower",
        "lm_head": "thinker.lm_head",
    },
    "thinker": {
        "language_model": "model",
        "visual": "visual",
        "audio_tower": "audio_tower",
        "lm_head": "lm_head",
    },
    "transformers5": {
        "language_model": "model.language_model",
        "visual": "model.visual",
        "audio_tower": "model.audio_tower",
        "lm_head": "lm_head",
    },
    "nemotron": {
        "language_model": "model",
        "visual": "visual",
        "audio_tower": "audio_tower",
        "lm_head": "lm_head",
    },
}

# WAVE's modules sit beside the thinker's at the top level of its checkpoint.
WAVE_MODULES = ("classify_linear", "beats_ln", "beats_proj", "beats")
for _name, _table in LAYOUTS.items():
    _top = "thinker." if _name == "released" else ""
    _table.update({m: _top + m for m in WAVE_MODULES})

# The thinker/WAVE checkpoint layouts (the ones detect_layout recognises).
THINKER_LAYOUTS = tuple(LAYOUTS)
# A standalone unilm BEATs state dict: our BEATs module's top-level names are its keys.
LAYOUTS["unilm_beats"] = {m: m for m in ("patch_embedding", "layer_norm", "post_extract_proj", "encoder")}

# Checkpoint prefixes that belong to parts of Qwen2.5-Omni the port does not
# model (speech generation). They are skipped and counted, never guessed at.
IGNORED_PREFIXES: dict[str, tuple[str, ...]] = {
    "released": ("talker.", "token2wav."),
    "thinker": (),
    "transformers5": (),
    "nemotron": (),
    "unilm_beats": (),
}


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def flax_to_hf_key(path: Sequence, layout: str) -> str:
    """('language_model', 'layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj.weight'."""
    table = LAYOUTS[layout]
    head, rest = str(path[0]), [str(p) for p in path[1:]]
    if head not in table:
        raise KeyError(f"flax parameter {_path_str(path)!r} has no mapping in layout {layout!r}")
    if rest and rest[-1] == "kernel":
        rest[-1] = "weight"
    return ".".join([table[head], *rest])


def is_kernel(path: Sequence) -> bool:
    return str(path[-1]) == "kernel"


def hf_to_flax_array(path: Sequence, array: np.ndarray) -> np.ndarray:
    """Checkpoint tensor -> the array our parameter at ``path`` holds (a view where possible)."""
    if is_kernel(path):
        if array.ndim != 2:
            raise ValueError(f"{_path_str(path)}: a Linear weight must be 2-D, got shape {array.shape}")
        return array.T
    return array


def flax_to_hf_array(path: Sequence, array: np.ndarray) -> np.ndarray:
    return array.T if is_kernel(path) else array


def expected_hf_shape(path: Sequence, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(reversed(flax_shape)) if is_kernel(path) else tuple(flax_shape)


def detect_layout(keys: Iterable[str], model_type: str | None = None) -> str:
    """Pick the layout whose prefixes the checkpoint uses, or explain what was found;
    ``model_type`` (config.json's) tells the Nemotron checkpoint from a plain thinker."""
    keys = list(keys)
    # "model." is a prefix of transformers5 keys too: test the most specific first.
    if any(k.startswith("thinker.") for k in keys):
        return "released"
    if any(k.startswith("model.language_model.") for k in keys):
        return "transformers5"
    if any(k.startswith("model.layers.") or k.startswith("model.embed_tokens.") for k in keys):
        return "nemotron" if model_type == NEMOTRON_MODEL_TYPE else "thinker"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(
        "cannot tell the checkpoint layout: no key starts with 'thinker.', 'model.language_model.' or "
        f"'model.layers.' (first keys: {sample})"
    )
