"""LoRA on the frozen backbone as NNX state: attach, merge, and the trainable filter.

Adapters live on ``Linear`` itself (``lora_a`` [in, r] and ``lora_b`` [r, out],
both ``nnx.LoRAParam``, plus an optional ``layers.Dropout``), so the parameter tree
keeps the torch module paths and PEFT's per-module names map one to one
(``lora_A.weight`` = ``lora_a.T``, ``lora_B.weight`` = ``lora_b.T``).

Dropout follows NNX's mode convention: adapters are attached in eval mode
(``deterministic=True``); ``model.train()`` turns adapter dropout on and
``model.eval()`` off again (``nnx.view(model, deterministic=...)`` works too).

Module selection uses ``re.search`` on the dotted nnx path of each ``Linear``
(``language_model.layers.3.self_attn.q_proj``) and, for ``trainable_extra``, of
each parameter (``classify_linear.0.kernel``); anchor the patterns as needed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from omniret_jax.model.layers import Dropout, Linear

# q/k/v of every decoder layer of the LLM (not the audio tower's q/k/v, not o_proj).
DEFAULT_TARGET = r"(?:^|\.)language_model\.layers\.\d+\.self_attn\.[qkv]_proj$"
# The WAVE modules trained beside the adapters (fusion head, BEATs adaptor); BEATs stays frozen.
DEFAULT_TRAINABLE_EXTRA = (r"(?:^|\.)classify_linear\.", r"(?:^|\.)beats_ln\.", r"(?:^|\.)beats_proj\.")


def _compile(pattern: str, what: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"LoRAConfig.{what}: invalid regex {pattern!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Adapter hyper-parameters (OmniRetriever: rank 16, alpha 32, dropout 0.05 on LLM q/k/v).

    The adapters' dtype is the precision policy's trainable dtype (``apply_lora(dtype=)``):
    float32 by default even on a bf16 backbone, as PEFT does (``autocast_adapter_dtype``).
    """
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target: str = DEFAULT_TARGET
    trainable_extra: tuple[str, ...] = DEFAULT_TRAINABLE_EXTRA

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"LoRAConfig.rank must be a positive int, got {self.rank!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.trainable_extra, str):
            raise ValueError("LoRAConfig.trainable_extra must be a tuple of regexes, not one string")
        _compile(self.target, "target")
        for p in self.trainable_extra:
            _compile(p, "trainable_extra")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def path_str(path) -> str:
    return ".".join(str(p) for p in path)


def iter_linears(model: nnx.Module) -> Iterator[tuple[tuple, Linear]]:
    """(path, Linear) for every Linear in the module tree."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, Linear):
            yield tuple(path), node


def lora_modules(model: nnx.Module) -> dict[str, Linear]:
    """Dotted path -> Linear for every Linear that carries an adapter."""
    return {path_str(p): m for p, m in iter_linears(model) if m.lora_a is not None}


def select_targets(model: nnx.Module, target: str) -> dict[str, Linear]:
    """Dotted path -> Linear for the Linears ``target`` selects; ValueError if none."""
    rx = _compile(target, "target")
    hits = {path_str(p): m for p, m in iter_linears(model) if rx.search(path_str(p))}
    if not hits:
        raise ValueError(f"LoRA target regex '{target}' matches no Linear module of {type(model).__name__}")
    return hits


def attach(linear: Linear, a: jax.Array, b: jax.Array, scale: float, dropout: float, rngs: nnx.Rngs | None,
           *, name: str = "") -> None:
    """Put the adapter (a [in, r], b [r, out]) on ``linear``; its kernel is left untouched."""
    if linear.lora_a is not None:
        raise ValueError(f"{name or 'Linear'} already has a LoRA adapter (merge_lora or rebuild first)")
    d_in, d_out = linear.in_features, linear.out_features
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != d_in or b.shape[1] != d_out or a.shape[1] != b.shape[0]:
        raise ValueError(f"{name}: adapter shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit a "
                         f"Linear({d_in}, {d_out}) (expected A [{d_in}, r], B [r, {d_out}])")
    axes = linear.kernel.get_metadata().get("axes") or (None, None)
    linear.lora_a = nnx.LoRAParam(a, axes=(axes[0], None))
    linear.lora_b = nnx.LoRAParam(b, axes=(None, axes[1]))
    linear.lora_scale = float(scale)
    linear.lora_dropout = Dropout(dropout, deterministic=True, rngs=rngs) if dropout > 0 else None


def apply_lora(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs, *, dtype=jnp.float32) -> list[str]:
    """Attach fresh adapters to every Linear ``cfg.target`` selects, in place; returns their paths.

    ``lora_a`` is drawn like PEFT's default (kaiming-uniform with a=sqrt(5) on
    torch's [r, in] ``lora_A``, i.e. U(-1/sqrt(in), 1/sqrt(in))) and ``lora_b``
    is zero, so a fresh adapter leaves the outputs unchanged. Dropout streams
    come from ``rngs`` ('dropout' stream, else 'default').
    """
    targets = select_targets(model, cfg.target)
    for name, linear in targets.items():
        bound = 1.0 / math.sqrt(linear.in_features)
        a = jax.random.uniform(rngs.params(), (linear.in_features, cfg.rank), jnp.float32, -bound, bound)
        b = jnp.zeros((cfg.rank, linear.out_features), jnp.float32)
        attach(linear, a.astype(dtype), b.astype(dtype), cfg.scale, cfg.dropout, rngs,
               name=name)
    return sorted(targets)


def merged_kernel(linear: Linear) -> jax.Array:
    """kernel + scale * A @ B, summed in float32 and cast to the kernel's dtype."""
    kernel = linear.kernel[...]
    if linear.lora_a is None:
        return kernel
    delta = jnp.matmul(linear.lora_a[...].astype(jnp.float32), linear.lora_b[...].astype(jnp.float32),
                       precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + linear.lora_scale * delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> list[str]:
    """Fold every adapter into its kernel and remove the LoRA variables, in place; returns the paths."""
    merged = lora_modules(model)
    if not merged:
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    for linear in merged.values():
        linear.kernel.set_value(merged_kernel(linear))
        linear.lora_a = linear.lora_b = linear.lora_dropout = None
        linear.lora_scale = 0.0
    return sorted(merged)


class _PathRegex:
    """nnx filter: the dotted variable path matches one of the regexes (re.search)."""

    def __init__(self, patterns: tuple[str, ...]):
        self.patterns = tuple(patterns)
        self._rx = [_compile(p, "trainable_extra") for p in self.patterns]

    def __call__(self, path, value) -> bool:
        s = path_str(path)
        return any(rx.search(s) for rx in self._rx)

    def __repr__(self):
        return f"PathRegex{self.patterns}"


def trainable_filter(cfg: LoRAConfig):
    """One nnx filter for everything that trains: LoRA params plus Params on ``cfg.trainable_extra`` paths.

    Put it first in ``nnx.split(model, trainable_filter(cfg), ...)``: LoRAParam is
    a Param subclass, so a plain ``nnx.Param`` filter listed earlier would take it.
    RNG state of the adapter dropout is not selected.
    """
    extra = nnx.All(nnx.Param, _PathRegex(cfg.trainable_extra))
    return nnx.Any(nnx.LoRAParam, extra) if cfg.trainable_extra else nnx.LoRAParam
