"""LoRA adapters <-> PEFT's on-disk format (``adapter_config.json`` + ``adapter_model.safetensors``).

PEFT names a tensor ``base_model.model.<torch module>.lora_{A,B}.weight``, with
the module named as in transformers' in-memory model of the backbone's family
(``Qwen2_5OmniThinkerForConditionalGeneration`` or ``Qwen2_5_VLForConditionalGeneration``,
both ``model.language_model.layers.N.self_attn.q_proj``), i.e. the converter's
``keymap.MEMORY_LAYOUT``; module names come from ``keymap.flax_to_hf_key`` like every
other conversion. A third of Qwen2.5-VL's fused vision qkv has no PEFT name. ``lora_A`` is
[r, in] = ``lora_a.T`` and ``lora_B`` is [out, r] = ``lora_b.T``; scaling is
``lora_alpha / r`` (plain LoRA: no rsLoRA, DoRA or per-module ranks).

Whole modules trained beside the adapters (WAVE's heads ``classify_linear``, ``beats_ln``,
``beats_proj``, as OmniRetriever's released training saves them) are PEFT's
``modules_to_save``: listed in ``adapter_config.json`` and stored in the adapter file as
``base_model.model.<module>.<param>`` (torch parameter names: a Linear's ``weight`` is our
``kernel`` transposed).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omniret_jax.convert.keymap import (MEMORY_LAYOUT, expected_hf_shape, flax_to_hf_array, flax_to_hf_key, fused_part,
                                     hf_to_flax_array)
from omniret_jax.convert.tensors import TensorSource, write_safetensors
from omniret_jax.model.layers import Linear
from omniret_jax.model.lora import LoRAConfig, attach, iter_linears, lora_modules, path_str, select_targets

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")

# adapter_config.json entries that would change the maths; any truthy value is refused.
_UNSUPPORTED = ("use_dora", "use_rslora", "fan_in_fan_out", "lora_bias", "rank_pattern", "alpha_pattern",
                "target_parameters", "trainable_token_indices", "layer_replication",
                "use_qalora", "use_bdlora")


def _torch_names(model: nnx.Module) -> dict[str, tuple[str, Linear]]:
    """PEFT module name -> (our dotted path, Linear) for every Linear the PEFT layout can name."""
    layout = MEMORY_LAYOUT[model.cfg.family]
    out = {}
    for path, linear in iter_linears(model):
        if fused_part((*path, "kernel"), layout) is not None:
            continue  # a third of one torch Linear
        try:
            weight_key = flax_to_hf_key((*path, "kernel"), layout)
        except KeyError:
            continue  # a top-level module outside the transformers model has no PEFT name
        out[weight_key[: -len(".weight")]] = (path_str(path), linear)
    return out


def _module_params(model: nnx.Module, name: str) -> dict[str, tuple[tuple, nnx.Variable]]:
    """PEFT key -> (our path, Variable) of every parameter of the top-level module ``name``."""
    module = getattr(model, name, None)
    if not isinstance(module, nnx.Module):
        raise ValueError(f"modules_to_save entry {name!r} is not a top-level module of {type(model).__name__}")
    out = {}
    for p, var in nnx.to_flat_state(nnx.state(module, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))):
        path = (name, *p)
        out[_PREFIX + flax_to_hf_key(path, MEMORY_LAYOUT[model.cfg.family])] = (path, var)
    return out


def export_peft(model: nnx.Module, cfg: LoRAConfig, out_dir: str | Path, *, base_model_name_or_path: str,
                modules_to_save: tuple[str, ...] = ()) -> Path:
    """Write the model's adapters as a PEFT LoRA adapter directory; returns ``out_dir``.

    The adapters must be the ones ``cfg`` describes (same modules, rank and
    scale), since ``adapter_config.json`` is written from ``cfg``. The top-level modules
    named in ``modules_to_save`` are written whole, as PEFT stores ``modules_to_save``.
    """
    adapters = lora_modules(model)
    if not adapters:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to export")
    selected = set(select_targets(model, cfg.target))
    if selected != set(adapters):
        raise ValueError(f"the model's adapters do not match LoRAConfig.target {cfg.target!r}: "
                         f"{_diff(set(adapters), selected, 'with an adapter', 'selected by target')}")
    names = {path: name for name, (path, _) in _torch_names(model).items()}
    tensors: dict[str, np.ndarray] = {}
    for path, linear in sorted(adapters.items()):
        if path not in names:
            raise ValueError(f"adapter on {path}: the module has no name in the transformers {model.cfg.family} model")
        rank = linear.lora_a.shape[1]
        if rank != cfg.rank or not np.isclose(linear.lora_scale, cfg.scale):
            raise ValueError(f"adapter on {path} has rank {rank} and scale {linear.lora_scale}, but the config "
                             f"says rank {cfg.rank} and scale alpha/rank = {cfg.scale}")
        tensors[f"{_PREFIX}{names[path]}.lora_A.weight"] = np.asarray(linear.lora_a.get_value()).T
        tensors[f"{_PREFIX}{names[path]}.lora_B.weight"] = np.asarray(linear.lora_b.get_value()).T
    for name in modules_to_save:
        for key, (path, var) in _module_params(model, name).items():
            tensors[key] = flax_to_hf_array(path, np.asarray(var.get_value()))

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries = [(k, v.shape, v.dtype) for k, v in sorted(tensors.items())]
    write_safetensors(out_dir / WEIGHTS_FILE, entries, tensors.__getitem__)
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        # Exact module names: PEFT matches a list entry by equality (or dotted suffix).
        "target_modules": sorted(names[p] for p in adapters),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "init_lora_weights": True, "modules_to_save": list(modules_to_save) or None,
        "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True,
    }
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def _diff(have: set, want: set, have_name: str, want_name: str) -> str:
    parts = []
    if have - want:
        parts.append(f"{have_name} but not {want_name}: {sorted(have - want)}")
    if want - have:
        parts.append(f"{want_name} but not {have_name}: {sorted(want - have)}")
    return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """What an ``adapter_config.json`` says, checked to be plain LoRA."""
    file: Path
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...] | str   # exact names (or PEFT's regex string)
    modules_to_save: tuple[str, ...]
    base_model_name_or_path: str | None


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """The adapter directory's config; FileNotFoundError / ValueError naming the file otherwise."""
    adapter_dir = Path(adapter_dir)
    config_file, weights_file = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{adapter_dir} is not a PEFT adapter directory: {f.name} is missing")
    try:
        pc = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: not JSON ({e})") from None
    if pc.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: peft_type {pc.get('peft_type')!r} is not 'LORA'")
    bad = [f"{k}={pc[k]!r}" for k in _UNSUPPORTED if pc.get(k)]
    if pc.get("bias", "none") != "none":
        bad.append(f"bias={pc['bias']!r}")
    if bad:
        raise ValueError(f"{config_file}: unsupported LoRA options {', '.join(bad)} (plain LoRA only)")
    targets = pc.get("target_modules") or ()
    return AdapterConfig(
        file=config_file, rank=int(pc["r"]), alpha=float(pc["lora_alpha"]),
        dropout=float(pc.get("lora_dropout") or 0.0),
        target_modules=targets if isinstance(targets, str) else tuple(targets),
        modules_to_save=tuple(pc.get("modules_to_save") or ()),
        base_model_name_or_path=pc.get("base_model_name_or_path"))


def import_peft(model: nnx.Module, adapter_dir: str | Path, cfg: LoRAConfig | None = None, *,
                allowed_modules_to_save: Sequence[str] | None = None, rngs: nnx.Rngs | None = None) -> LoRAConfig:
    """Attach the adapters of a PEFT LoRA directory to ``model`` in place; returns the LoRAConfig in force.

    With ``cfg`` the adapter must match it (rank, alpha, and exactly the modules
    ``cfg.target`` selects); without, the config is read from the adapter (its
    ``target`` then lists the adapted paths). The adapter's ``modules_to_save`` replace
    those top-level modules' parameters: every parameter must be in the file, with its
    shape; ``allowed_modules_to_save`` (None: any top-level module) refuses other names.
    Everything is checked before the model is touched. Arrays keep the adapter file's
    dtype, so import -> export is lossless; ``rngs`` feeds the adapter dropout (default
    ``nnx.Rngs(0)``).
    """
    ac = read_adapter_config(adapter_dir)
    config_file, weights_file = ac.file, ac.file.with_name(WEIGHTS_FILE)
    rank, alpha, dropout = ac.rank, ac.alpha, ac.dropout
    if cfg is not None:
        if cfg.rank != rank:
            raise ValueError(f"{config_file}: adapter rank r={rank} does not match the requested LoRAConfig.rank={cfg.rank}")
        if not np.isclose(cfg.alpha, alpha):
            raise ValueError(f"{config_file}: adapter lora_alpha={alpha} does not match the requested "
                             f"LoRAConfig.alpha={cfg.alpha}")
    if allowed_modules_to_save is not None:
        refused = [m for m in ac.modules_to_save if m not in allowed_modules_to_save]
        if refused:
            raise ValueError(f"{config_file}: modules_to_save {refused} cannot be imported: only "
                             f"{list(allowed_modules_to_save)} are trained beside the adapters")
    saved: dict[str, tuple[tuple, nnx.Variable]] = {}
    for name in ac.modules_to_save:
        try:
            saved.update(_module_params(model, name))
        except ValueError as e:
            raise ValueError(f"{config_file}: {e}") from None

    source = TensorSource(weights_file)
    modules = _torch_names(model)
    found: dict[str, dict[str, np.ndarray]] = {}
    whole: dict[str, np.ndarray] = {}
    unmapped = []
    for key in source.keys():
        if key in saved:
            whole[key] = source.read(key)
            continue
        m = _KEY.match(key)
        if m is None or m.group(1) not in modules:
            unmapped.append(key)
            continue
        found.setdefault(m.group(1), {})[m.group(2)] = source.read(key)
    if unmapped:
        raise ValueError(f"{weights_file}: {len(unmapped)} key(s) do not map onto a Linear of "
                         f"{type(model).__name__} nor onto its modules_to_save {list(ac.modules_to_save)}: "
                         f"{unmapped[:10]}")
    missing = sorted(set(saved) - set(whole))
    if missing:
        raise ValueError(f"{weights_file}: modules_to_save lists {sorted({saved[k][0][0] for k in missing})}, but "
                         f"{len(missing)} of their tensor(s) are not in the file: {missing[:10]}")

    if not found:
        raise ValueError(f"{weights_file}: no lora_A/lora_B tensors")
    adapted = {}
    for name, ab in sorted(found.items()):
        path, linear = modules[name]
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_file}: {name} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        want_a, want_b = (rank, linear.in_features), (linear.out_features, rank)
        if a.shape != want_a or b.shape != want_b:
            raise ValueError(f"{weights_file}: {name} lora_A {a.shape} / lora_B {b.shape}, expected {want_a} / "
                             f"{want_b} for r={rank} on Linear({linear.in_features}, {linear.out_features}) (an adapter for "
                             "another base model?)")
        if linear.lora_a is not None:
            raise ValueError(f"{path} already has a LoRA adapter")
        adapted[path] = (linear, a, b)
    for key, arr in sorted(whole.items()):
        path, var = saved[key]
        want = expected_hf_shape(path, tuple(var.get_value().shape))
        if tuple(arr.shape) != want:
            raise ValueError(f"{weights_file}: tensor {key!r} has shape {tuple(arr.shape)} but the model expects "
                             f"{want} (an adapter for another base model?)")

    if cfg is None:
        target = "^(?:" + "|".join(re.escape(p) for p in sorted(adapted)) + ")$"
        cfg = LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, target=target)
    else:
        selected = set(select_targets(model, cfg.target))
        if selected != set(adapted):
            raise ValueError(f"{adapter_dir}: target modules differ from LoRAConfig.target {cfg.target!r}: "
                             f"{_diff(set(adapted), selected, 'in the adapter', 'selected by target')}")
    rngs = nnx.Rngs(0) if rngs is None else rngs
    for path, (linear, a, b) in adapted.items():
        attach(linear, jnp.asarray(a.T), jnp.asarray(b.T), cfg.scale, cfg.dropout, rngs, name=path)
    for key, arr in whole.items():
        path, var = saved[key]
        var.set_value(jnp.asarray(hf_to_flax_array(path, arr)))
    return cfg
