"""Flax state -> PyTorch safetensors checkpoint in one of the converter's key layouts.

The inverse of ``to_flax``, through the same key map (``keymap.flax_to_hf_key``
and ``flax_to_hf_array``). Files are written tensor by tensor: the header is
computed from shapes and dtypes first, then each parameter is fetched from the
device, transposed if it is a Linear kernel and appended, so host memory holds
one tensor at a time. Above ``max_shard_bytes`` the checkpoint is split into
``model-0000i-of-0000n.safetensors`` with a ``model.safetensors.index.json``,
the files transformers' ``from_pretrained`` reads.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from omniret_jax.convert.keymap import (LAYOUTS, SAVE_LAYOUT, expected_hf_shape, flax_to_hf_array, flax_to_hf_key,
                                       fuse_parts, fused_part)
from omniret_jax.convert.beats import tied_keys
from omniret_jax.convert.tensors import write_safetensors
from omniret_jax.model.lora import lora_modules, merged_kernel, path_str

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _plan_shards(entries: list[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list]:
    """Greedy split in key order; a tensor larger than the limit gets a shard of its own."""
    shards, current, size = [], [], 0
    for e in entries:
        n = int(np.prod(e[1], dtype=np.int64)) * np.dtype(e[2]).itemsize
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(e)
        size += n
    if current or not shards:
        shards.append(current)
    return shards


def _config_file(config_src: str | Path) -> Path:
    src = Path(config_src)
    src = src / "config.json" if src.is_dir() else src
    if not src.is_file():
        raise FileNotFoundError(f"config_src: no config.json at {src}")
    return src


# Top-level entries of the full Qwen2.5-Omni config.json around its thinker_config.
_OMNI_WRAPPER = ("model_type", "architectures", "thinker_config", "talker_config", "token2wav_config",
                 "enable_audio_output", "enable_talker")


def wave_config(model: nnx.Module, config_src: str | Path | None = None,
                config_updates: Mapping | None = None, *, thinker_only: bool = False) -> dict:
    """The config.json of ``model``'s checkpoint: ``config_src`` (a config.json or the directory
    holding one) or, without it, the thinker config written from ``model.cfg``; a WAVE model's
    ``beats_config`` added and ``config_updates`` merged into the top level. ``thinker_only``
    unwraps a full Qwen2.5-Omni config (``thinker_config`` nested inside) for a checkpoint in a
    thinker layout, keeping its other top-level entries (``beats_config``, say)."""
    config = model.cfg.to_hf_dict() if config_src is None else json.loads(_config_file(config_src).read_text())
    if thinker_only and "thinker_config" in config:
        config = {**config["thinker_config"], **{k: v for k, v in config.items() if k not in _OMNI_WRAPPER}}
    beats_cfg = getattr(model, "beats_cfg", None)
    if beats_cfg is not None:
        config["beats_config"] = dataclasses.asdict(beats_cfg)
    config.update(config_updates or {})
    return config


Entry = tuple[str, tuple[int, ...], np.dtype]
# The parameters one checkpoint tensor is made of: one, or the q, k, v parts of a fused qkv in order.
Parts = list[tuple[tuple, Any]]


def checkpoint_entries(model: nnx.Module, layout: str) -> tuple[list[Entry], dict[str, Parts]]:
    """(key, shape, dtype) of every tensor ``model``'s checkpoint holds in ``layout``, sorted, and
    key -> the (parameter path, Variable) parts each key is made of (Qwen2.5-VL's fused vision
    ``attn.qkv`` joins three of ours).

    Frozen and trainable Params alike (LoRA adapters and RNG state are no tensors of the
    layout); BEATs' one relative-bias table is repeated per layer, as its checkpoints hold it.
    Works on an abstract model (``nnx.eval_shape``) too.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    sources: dict[str, Parts] = {}
    for path, var in nnx.to_flat_state(state):
        sources.setdefault(flax_to_hf_key(path, layout), []).append((path, var))
    entries: dict[str, Entry] = {}
    for key, parts in sources.items():
        parts.sort(key=lambda p: fused_part(p[0], layout) or 0)
        if [fused_part(p, layout) for p, _ in parts] not in ([None], [0, 1, 2]):
            raise ValueError(f"parameters {', '.join(path_str(p) for p, _ in parts)} all map to {key!r}")
        path, var = parts[0]
        value = var.get_value()
        entries[key] = (key, expected_hf_shape(path, tuple(value.shape), layout), np.dtype(value.dtype))
    beats_cfg = getattr(model, "beats_cfg", None)
    if beats_cfg is not None:
        prefix = LAYOUTS[layout]["beats"] + "."
        for copy, source in tied_keys(beats_cfg).items():
            sources[prefix + copy] = sources[prefix + source]
            entries[prefix + copy] = (prefix + copy, *entries[prefix + source][1:])
    return sorted(entries.values()), sources


def write_checkpoint(out_dir: Path, entries: list[Entry], fetch: Callable[[str], np.ndarray], *,
                     max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """``model.safetensors``, or above ``max_shard_bytes`` shards plus the index transformers reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / SINGLE_FILE, shards[0], fetch)
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(out_dir / fname, shard, fetch)
        weight_map.update({key: fname for key, _, _ in shard})
    (out_dir / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def export_safetensors(model: nnx.Module, out_dir: str | Path, *, config_src: str | Path | None = None,
                       layout: str | None = None, merge_lora: bool = False, drop_lora: bool = False,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, config_updates: Mapping | None = None) -> Path:
    """Write every parameter of ``model`` as a PyTorch checkpoint in ``layout`` (default: what
    transformers' ``save_pretrained`` writes for the model's family); returns ``out_dir``.

    config.json comes from ``wave_config``: ``config_src`` (copied) or, without it, the
    thinker config written from ``model.cfg`` (what transformers' ``from_pretrained`` needs for a
    random-init model), with ``beats_config`` and ``config_updates`` merged into its top level.
    With ``merge_lora`` each adapter is folded into its kernel on the way out (the model itself
    is not changed) and no LoRA tensors are written; ``drop_lora`` writes the base weights under
    the adapters. A model with adapters and neither option is refused: the original layout has
    no place for them and transformers would load the base weights without a word; write the
    adapter with ``convert.peft.export_peft`` instead.
    """
    if merge_lora and drop_lora:
        raise ValueError("merge_lora and drop_lora exclude each other")
    layout = layout or SAVE_LAYOUT[model.cfg.family]
    out_dir = Path(out_dir)
    for name in (SINGLE_FILE, INDEX_FILE):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name} exists; choose an empty output directory")
    config = wave_config(model, config_src, config_updates, thinker_only=layout != "released")
    adapters = lora_modules(model)
    if adapters and not (merge_lora or drop_lora):
        raise ValueError(f"{len(adapters)} Linear modules carry LoRA adapters (e.g. {min(adapters)}): pass "
                         "merge_lora=True for merged weights, or save the adapter with export_peft")
    entries, sources = checkpoint_entries(model, layout)

    def one(path, var) -> np.ndarray:
        owner = path_str(path[:-1])
        merge = merge_lora and path[-1] == "kernel" and owner in adapters
        value = merged_kernel(adapters[owner]) if merge else var.get_value()
        return flax_to_hf_array(path, np.asarray(jax.device_get(value)))

    def fetch(key: str) -> np.ndarray:
        parts = sources[key]
        return one(*parts[0]) if len(parts) == 1 else fuse_parts([one(*p) for p in parts])

    write_checkpoint(out_dir, entries, fetch, max_shard_bytes=max_shard_bytes)
    if config_src is not None and config == json.loads(_config_file(config_src).read_text()):
        shutil.copyfile(_config_file(config_src), out_dir / "config.json")  # unchanged: the same bytes
    else:
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir
