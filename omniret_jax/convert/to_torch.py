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
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from omniret_jax.convert.keymap import (LAYOUTS, SAVE_LAYOUT, expected_hf_shape, flax_to_hf_array, flax_to_hf_key, fuse_parts,
                                        fused_part)
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


def export_safetensors(model: nnx.Module, out_dir: str | Path, *, config_src: str | Path, layout: str | None = None,
                       merge_lora: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                       config_updates: Mapping | None = None) -> Path:
    """Write every parameter of ``model`` as a PyTorch checkpoint in ``layout`` (default: what
    transformers' ``save_pretrained`` writes for the model's family); returns ``out_dir``.

    ``config_src`` (a config.json or the directory holding one) is copied beside
    the weights, with ``config_updates`` merged into its top level. With
    ``merge_lora`` each adapter is folded into its kernel on the way out (the
    model itself is not changed) and no LoRA tensors are written. A model with
    adapters and ``merge_lora=False`` is refused: the original layout has no
    place for them and transformers would load the base weights without a word;
    write the adapter with ``convert.peft.export_peft`` instead.
    """
    layout = layout or SAVE_LAYOUT[model.cfg.family]
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(LAYOUTS)}")
    out_dir = Path(out_dir)
    for name in (SINGLE_FILE, INDEX_FILE):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir / name} exists; choose an empty output directory")
    src = Path(config_src)
    src = src / "config.json" if src.is_dir() else src
    if not src.is_file():
        raise FileNotFoundError(f"config_src: no config.json at {src}")

    adapters = lora_modules(model)
    if adapters and not merge_lora:
        raise ValueError(f"{len(adapters)} Linear modules carry LoRA adapters (e.g. {min(adapters)}): pass "
                         "merge_lora=True for merged weights, or save the adapter with export_peft")

    # Frozen and trainable Params alike; adapters (folded in below) and RNG state are not tensors of the layout.
    state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    # Checkpoint key -> its parameter, or the q, k, v parts of a fused qkv in order.
    variables: dict[str, list[tuple[tuple, nnx.Variable]]] = {}
    entries = []
    for path, var in nnx.to_flat_state(state):
        variables.setdefault(flax_to_hf_key(path, layout), []).append((path, var))
    for key, parts in variables.items():
        parts.sort(key=lambda p: fused_part(p[0], layout) or 0)
        if [fused_part(p, layout) for p, _ in parts] not in ([None], [0, 1, 2]):
            raise ValueError(f"parameters {', '.join(path_str(p) for p, _ in parts)} all map to {key!r}")
        path, var = parts[0]
        value = var.get_value()
        entries.append((key, expected_hf_shape(path, tuple(value.shape), layout), np.dtype(value.dtype)))
    # BEATs keeps one relative-bias table; its checkpoint layout repeats it per layer.
    aliases: dict[str, str] = {}
    beats_cfg = getattr(model, "beats_cfg", None)
    if beats_cfg is not None:
        prefix = LAYOUTS[layout]["beats"] + "."
        for copy, source in tied_keys(beats_cfg).items():
            aliases[prefix + copy] = prefix + source
            _, shape, dtype = next(e for e in entries if e[0] == prefix + source)
            entries.append((prefix + copy, shape, dtype))
        config_updates = {"beats_config": dataclasses.asdict(beats_cfg), **(config_updates or {})}
    entries.sort(key=lambda e: e[0])

    def one(path, var) -> np.ndarray:
        owner = path_str(path[:-1])
        value = merged_kernel(adapters[owner]) if path[-1] == "kernel" and owner in adapters else var.get_value()
        return flax_to_hf_array(path, np.asarray(jax.device_get(value)))

    def fetch(key: str) -> np.ndarray:
        parts = variables[aliases.get(key, key)]
        return one(*parts[0]) if len(parts) == 1 else fuse_parts([one(*p) for p in parts])

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(entries, max_shard_bytes)
    if len(shards) == 1:
        write_safetensors(out_dir / SINGLE_FILE, shards[0], fetch)
    else:
        weight_map, total = {}, 0
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            total += write_safetensors(out_dir / fname, shard, fetch)
            weight_map.update({key: fname for key, _, _ in shard})
        (out_dir / INDEX_FILE).write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    if config_updates:
        config = json.loads(src.read_text())
        config.update(config_updates)
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    elif src.resolve() != (out_dir / "config.json").resolve():
        shutil.copyfile(src, out_dir / "config.json")
    return out_dir
