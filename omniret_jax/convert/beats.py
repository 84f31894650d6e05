"""BEATs checkpoints: the unilm ``.pt`` reader and the rules that map its state dict onto our module.

- ``encoder.pos_conv.0`` is weight-normalised (``dim=2``); a plain ``weight`` or torch's
  ``parametrizations.weight.original0/1`` is rewritten to the ``weight_g``/``weight_v`` pair
  the module holds.
- unilm ties every layer's ``self_attn.relative_attention_bias`` to layer 0's and the
  checkpoint repeats it under every layer: the copies are checked and dropped on the way in
  (``tied_keys`` lists them so an export writes them back).
- ``predictor.*`` (the AudioSet head of fine-tuned checkpoints) is not used for features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from omniret_jax.config import BEATsConfig


def tied_keys(cfg: BEATsConfig) -> dict[str, str]:
    """Checkpoint keys that are copies of another key (unilm's shared relative bias table)."""
    if not cfg.relative_position_embedding:
        return {}
    src = "encoder.layers.0.self_attn.relative_attention_bias.weight"
    return {src.replace(".0.", f".{i}.", 1): src for i in range(1, cfg.encoder_layers)}


def _pos_conv_from_plain(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weight-norm parameters (g, v) reproducing a plain conv weight: v = w, g = ||w|| per kernel tap."""
    w = np.asarray(w, np.float32)
    return np.sqrt(np.sum(w * w, axis=(0, 1), keepdims=True)), w


def canonical_state(cfg: BEATsConfig, weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A unilm-layout state dict rewritten onto exactly the BEATs module's parameter keys.

    Rewrites the pos-conv weight-norm variants, checks and drops tied copies of the
    relative bias table, drops ``predictor.*`` of fine-tuned checkpoints.
    """
    out = dict(weights)
    pc = "encoder.pos_conv.0."
    if pc + "parametrizations.weight.original0" in out:
        out[pc + "weight_g"] = out.pop(pc + "parametrizations.weight.original0")
        out[pc + "weight_v"] = out.pop(pc + "parametrizations.weight.original1")
    if pc + "weight" in out:
        if pc + "weight_g" in out or pc + "weight_v" in out:
            raise ValueError(f"checkpoint has both {pc}weight and {pc}weight_g/weight_v")
        out[pc + "weight_g"], out[pc + "weight_v"] = _pos_conv_from_plain(out.pop(pc + "weight"))
    for copy, src in tied_keys(cfg).items():
        if copy in out:
            if src in out and not np.array_equal(np.asarray(out[copy]), np.asarray(out[src])):
                raise ValueError(f"{copy} differs from {src}; BEATs ties them, so they must be equal")
            del out[copy]
    if cfg.finetuned_model:
        for key in ("predictor.weight", "predictor.bias"):
            out.pop(key, None)
    return out


def load_unilm_checkpoint(path: str | Path) -> tuple[BEATsConfig, dict[str, np.ndarray]]:
    """Read a unilm BEATs ``.pt`` (a dict with ``cfg`` and ``model``) without running pickled code."""
    import torch  # the reference framework is only needed to read the .pt file

    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"cfg", "model"} <= set(ckpt):
        got = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: expected a unilm BEATs checkpoint dict with 'cfg' and 'model', got {got}")
    cfg = BEATsConfig.from_unilm_dict(ckpt["cfg"])
    weights = {k: v.detach().to(torch.float32).numpy() if v.is_floating_point() else v.numpy()
               for k, v in ckpt["model"].items()}
    return cfg, weights
