"""One key map per on-disk checkpoint layout, used by both conversion directions.

Flax parameter paths mirror the PyTorch module tree (see model/layers.py), so a
layout is only a table from our top-level module names to the checkpoint's
prefixes, plus the prefixes it carries that the port does not use. Linear
kernels are the one leaf whose array differs: ``kernel`` is torch's ``weight``
transposed.

Qwen2.5-VL's vision attention fuses q, k and v into one ``attn.qkv`` Linear
([3C, C] weight, [3C] bias, rows in q, k, v order) where the Omni thinker (and our
tower) has three: in the Qwen2.5-VL layouts our ``attn.{q,k,v}`` are thirds of
that tensor along dim 0 (``fused_part``), split on load and concatenated on export.
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

# Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), verified against transformers 5.24:
# save_pretrained writes the pre-5 names, as the released 4.x checkpoints have them;
# "qwen2_5_vl_transformers5" is its in-memory module tree (what PEFT names).
VL_LAYOUTS = {
    "qwen2_5_vl": {"language_model": "model", "visual": "visual", "lm_head": "lm_head"},
    "qwen2_5_vl_transformers5": {"language_model": "model.language_model", "visual": "model.visual",
                                 "lm_head": "lm_head"},
}

# WAVE's modules sit beside the thinker's at the top level of its checkpoint.
WAVE_MODULES = ("classify_linear", "beats_ln", "beats_proj", "beats")
for _name, _table in LAYOUTS.items():
    _top = "thinker." if _name == "released" else ""
    _table.update({m: _top + m for m in WAVE_MODULES})

# The thinker/WAVE checkpoint layouts (detect_layout recognises these and the VL ones).
THINKER_LAYOUTS = tuple(LAYOUTS)
LAYOUTS.update(VL_LAYOUTS)
# Per backbone family: the layout save_pretrained writes, and transformers' in-memory tree (PEFT's names).
SAVE_LAYOUT = {"qwen2_5_omni": "thinker", "qwen2_5_vl": "qwen2_5_vl"}
MEMORY_LAYOUT = {"qwen2_5_omni": "transformers5", "qwen2_5_vl": "qwen2_5_vl_transformers5"}
# Layouts whose vision attention is one fused qkv Linear.
FUSED_QKV_LAYOUTS = frozenset(VL_LAYOUTS)
_QKV = ("q", "k", "v")
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
    "qwen2_5_vl": (),
    "qwen2_5_vl_transformers5": (),
}


def _path_str(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def fused_part(path: Sequence, layout: str | None) -> int | None:
    """0, 1 or 2 when ``path`` is a third (q, k or v) of a fused ``attn.qkv`` tensor in ``layout``, else None."""
    p = [str(x) for x in path]
    if (layout in FUSED_QKV_LAYOUTS and len(p) >= 4 and p[0] == "visual" and p[-3] == "attn"
            and p[-2] in _QKV):
        return _QKV.index(p[-2])
    return None


def flax_to_hf_key(path: Sequence, layout: str) -> str:
    """('language_model', 'layers', 0, 'self_attn', 'q_proj', 'kernel') -> 'model.layers.0.self_attn.q_proj.weight'.

    The three parts of a fused qkv name the same key (``fused_part`` says which third)."""
    table = LAYOUTS[layout]
    head, rest = str(path[0]), [str(p) for p in path[1:]]
    if head not in table:
        raise KeyError(f"flax parameter {_path_str(path)!r} has no mapping in layout {layout!r}")
    if fused_part(path, layout) is not None:
        rest[-2] = "qkv"
    if rest and rest[-1] == "kernel":
        rest[-1] = "weight"
    return ".".join([table[head], *rest])


def is_kernel(path: Sequence) -> bool:
    return str(path[-1]) == "kernel"


def hf_to_flax_array(path: Sequence, array: np.ndarray, layout: str | None = None) -> np.ndarray:
    """Checkpoint tensor -> the array our parameter at ``path`` holds (a view where possible)."""
    part = fused_part(path, layout)
    if part is not None:
        if array.shape[0] % 3:
            raise ValueError(f"{_path_str(path)}: a fused qkv tensor needs 3 equal row blocks, got shape {array.shape}")
        n = array.shape[0] // 3
        array = array[part * n:(part + 1) * n]
    if is_kernel(path):
        if array.ndim != 2:
            raise ValueError(f"{_path_str(path)}: a Linear weight must be 2-D, got shape {array.shape}")
        return array.T
    return array


def flax_to_hf_array(path: Sequence, array: np.ndarray) -> np.ndarray:
    """Our parameter -> its checkpoint tensor (one third of it for a fused part: see ``fuse_parts``)."""
    return array.T if is_kernel(path) else array


def fuse_parts(parts: Sequence[np.ndarray]) -> np.ndarray:
    """The checkpoint tensor of a fused qkv from its q, k, v parts (``flax_to_hf_array`` of each, in order)."""
    return np.concatenate(parts, axis=0)


def expected_hf_shape(path: Sequence, flax_shape: tuple[int, ...], layout: str | None = None) -> tuple[int, ...]:
    shape = list(reversed(flax_shape)) if is_kernel(path) else list(flax_shape)
    if fused_part(path, layout) is not None:
        shape[0] *= 3
    return tuple(shape)


def detect_layout(keys: Iterable[str], model_type: str | None = None) -> str:
    """Pick the layout whose prefixes the checkpoint uses, or explain what was found;
    ``model_type`` (config.json's) tells the Nemotron checkpoint from a plain thinker."""
    keys = list(keys)
    # A fused vision qkv marks Qwen2.5-VL (the Omni thinker's ViT has separate q/k/v).
    vl = any(k.endswith(".attn.qkv.weight") and "visual." in k for k in keys)
    # "model." is a prefix of transformers5 keys too: test the most specific first.
    if any(k.startswith("thinker.") for k in keys):
        return "released"
    if any(k.startswith("model.language_model.") for k in keys):
        return "qwen2_5_vl_transformers5" if vl else "transformers5"
    if any(k.startswith("model.layers.") or k.startswith("model.embed_tokens.") for k in keys):
        if vl:
            return "qwen2_5_vl"
        return "nemotron" if model_type == NEMOTRON_MODEL_TYPE else "thinker"
    sample = ", ".join(sorted(keys)[:5])
    raise ValueError(
        "cannot tell the checkpoint layout: no key starts with 'thinker.', 'model.language_model.' or "
        f"'model.layers.' (first keys: {sample})"
    )
