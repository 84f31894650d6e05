"""Every weight loader: fill an abstract Flax NNX module from a PyTorch checkpoint, tensor by tensor.

The module is built with ``nnx.eval_shape`` (no memory for random weights); each
checkpoint tensor is read, transposed if it is a Linear weight, checked against the
parameter's shape, cast to the parameter's dtype (the precision policy decides it:
frozen weights in ``Precision.frozen``, WAVE's trained heads in ``Precision.trainable``)
and placed, on a mesh straight into its sharding. Unknown, missing or mis-shaped keys
stop the load with an error naming them.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from omniret_jax import sharding
from omniret_jax.config import BackboneConfig, BEATsConfig, Precision, ThinkerConfig, backbone_config, read_hf_config
from omniret_jax.convert.beats import canonical_state, load_unilm_checkpoint
from omniret_jax.convert.keymap import (
    IGNORED_PREFIXES, LAYOUTS, THINKER_LAYOUTS, VL_LAYOUTS, WAVE_MODULES, detect_layout, expected_hf_shape,
    flax_to_hf_array, flax_to_hf_key, hf_to_flax_array,
)
from omniret_jax.convert.orbax_io import STATE_DIR, is_orbax, restore_module
from omniret_jax.convert.tensors import CheckpointError, MappingSource, OverlaySource, TensorSource
from omniret_jax.model.beats import BEATs
from omniret_jax.model.thinker import Thinker
from omniret_jax.model.wave import WAVE, wave_heads

# WAVE's trained modules (the LoRA adapters come on top of them).
HEADS = ("classify_linear", "beats_ln", "beats_proj")


@dataclasses.dataclass
class LoadReport:
    layout: str
    loaded: int
    ignored: dict[str, int]   # ignored prefix -> number of tensors skipped
    nbytes: int               # bytes of the converted parameters


def _cast(arr: np.ndarray, dtype) -> np.ndarray:
    """One contiguous copy in the target dtype (transposed views are materialised here)."""
    out = np.empty(arr.shape, dtype=dtype)
    np.copyto(out, arr, casting="unsafe")
    return out


def load_module(
    build: Callable[[], nnx.Module],
    source: Any,
    *,
    layout: str | None = None,
    extra_ignored: tuple[str, ...] = (),
    mesh: Mesh | None = None,
    progress: bool = True,
) -> tuple[nnx.Module, LoadReport]:
    """Build ``build()`` abstractly and fill every parameter from ``source`` (a TensorSource,
    MappingSource or OverlaySource).

    Each tensor is placed on the device as it is read (with ``mesh``, straight into the
    sharding its logical axes give), so host memory holds at most one tensor in flight
    beside the converted parameters and no device holds an unsharded copy.
    """
    keys = source.keys()
    layout = layout or detect_layout(keys)
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    placement = None
    if mesh is not None:
        placement = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh)))
    # Checkpoint key -> our parameter(s): three for a fused qkv, else one.
    wanted: dict[str, list[tuple[Any, nnx.Variable]]] = {}
    for path, var in flat:
        wanted.setdefault(flax_to_hf_key(path, layout), []).append((path, var))

    ignored_prefixes = IGNORED_PREFIXES[layout] + tuple(extra_ignored)
    ignored: dict[str, int] = {}
    unknown = []
    for key in keys:
        if key in wanted:
            continue
        hit = next((p for p in ignored_prefixes if key.startswith(p)), None)
        if hit is None:
            unknown.append(key)
        else:
            ignored[hit] = ignored.get(hit, 0) + 1
    missing = sorted(set(wanted) - set(keys))
    if unknown or missing:
        lines = [f"checkpoint does not match the model (layout {layout!r}):"]
        if unknown:
            lines.append(f"  {len(unknown)} unknown key(s): " + ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else ""))
        if missing:
            lines.append(f"  {len(missing)} missing key(s): " + ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else ""))
        raise CheckpointError("\n".join(lines))

    nbytes = 0
    for key in tqdm(sorted(wanted), desc="loading tensors", disable=not progress, unit="tensor"):
        got_shape = tuple(source.shape(key))
        for path, var in wanted[key]:
            want_shape = expected_hf_shape(path, tuple(var.get_value().shape), layout)
            if got_shape != want_shape:
                raise CheckpointError(f"tensor {key!r}: checkpoint shape {got_shape} but the model expects "
                                      f"{want_shape} (from config)")
        tensor = source.read(key)
        for path, var in wanted[key]:
            arr = _cast(hf_to_flax_array(path, tensor, layout), var.get_value().dtype)
            nbytes += arr.nbytes
            target = None if placement is None else placement[path].get_value()
            # sharding.put also places into shardings that span other processes' devices (multi-host)
            var.set_value(jax.device_put(arr) if target is None else sharding.put(arr, target))
            del arr
        del tensor
    module = nnx.merge(graphdef, state)
    return module, LoadReport(layout=layout, loaded=len(wanted), ignored=ignored, nbytes=nbytes)


# The checkpoint layouts of each backbone family.
FAMILY_LAYOUTS = {"qwen2_5_omni": THINKER_LAYOUTS, "qwen2_5_vl": tuple(VL_LAYOUTS)}


def _model_type(path) -> str | None:
    cfg_file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    try:
        return json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError):
        return None


def load_backbone(path, *, precision: Precision = Precision(), layout: str | None = None, mesh: Mesh | None = None,
                  allow_pickle: bool = False, remat: str = "none",
                  configure: Callable[[BackboneConfig], BackboneConfig] | None = None,
                  progress: bool = True) -> tuple[Thinker, LoadReport]:
    """The backbone of a Hugging Face checkpoint directory (config.json + weights), every weight
    in ``precision.frozen``: a Qwen2.5-Omni thinker (released or transformers layouts), or
    Omni-Embed-Nemotron's (bidirectional: ``ThinkerConfig.from_hf_dict`` reads its model_type),
    or a Qwen2.5-VL model when ``model_type`` says so. A WAVE checkpoint's heads are skipped
    (no head is expected of a backbone). ``configure`` adjusts the config read from config.json."""
    cfg = backbone_config(read_hf_config(path), precision=precision)
    if configure is not None:
        cfg = configure(cfg)
    source = TensorSource(path, allow_pickle=allow_pickle)
    layout = layout or detect_layout(source.keys(), _model_type(path))
    if layout not in FAMILY_LAYOUTS[cfg.family]:
        raise CheckpointError(f"{path}: config.json describes a {cfg.family} model but the weights are in the "
                              f"{layout!r} layout (expected one of {FAMILY_LAYOUTS[cfg.family]})")
    # A WAVE checkpoint holds a thinker too; its extra modules are skipped (and counted).
    ignored = tuple(LAYOUTS[layout][m] + "." for m in WAVE_MODULES if m in LAYOUTS[layout])
    if cfg.text.tie_word_embeddings:
        ignored += (LAYOUTS[layout]["lm_head"] + ".",)  # a tied head may be saved anyway; it is the embedding
    return load_module(lambda: Thinker(cfg, rngs=nnx.Rngs(0), remat=remat), source, layout=layout,
                       extra_ignored=ignored, mesh=mesh, progress=progress)


def load_thinker(path, **kw) -> tuple[Thinker, LoadReport]:
    """A Qwen2.5-Omni thinker (``load_backbone``, refusing any other family)."""
    if read_hf_config(path).get("model_type") == "qwen2_5_vl":
        raise CheckpointError(f"{path} is a Qwen2.5-VL checkpoint, not a Qwen2.5-Omni thinker: use load_backbone")
    return load_backbone(path, **kw)


def load_beats(cfg: BEATsConfig, weights: Mapping[str, np.ndarray], *, prefix: str = "",
               precision: Precision = Precision(), progress: bool = False) -> BEATs:
    """A BEATs module from a unilm-layout state dict (keys under ``prefix``; others are ignored)."""
    sub = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    try:
        state = canonical_state(cfg, sub)
    except ValueError as e:
        raise CheckpointError(f"BEATs weights: {e}") from e
    build = lambda: BEATs(cfg, rngs=nnx.Rngs(0), dtype=precision.compute, param_dtype=precision.frozen)  # noqa: E731
    return load_module(build, MappingSource(state), layout="unilm_beats", progress=progress)[0]


def load_wave(path, *, beats_checkpoint=None, precision: Precision = Precision(), layout: str | None = None,
              init_missing_heads: bool = False, allow_pickle: bool = False, seed: int = 0, mesh: Mesh | None = None,
              remat: str = "none", configure: Callable[[ThinkerConfig], ThinkerConfig] | None = None,
              progress: bool = True) -> tuple[WAVE, LoadReport]:
    """A WAVE model (thinker + BEATs + fusion head + BEATs adaptor) from a PyTorch checkpoint.

    BEATs weights come from the checkpoint's ``beats.*`` keys, or from the unilm
    ``.pt`` given as ``beats_checkpoint`` (its config is read from there too; a
    checkpoint written by ``export_safetensors`` stores it as ``beats_config`` in
    config.json). A plain Qwen2.5-Omni checkpoint has no fusion head or adaptor:
    that is an error unless ``init_missing_heads`` starts them from random init. ``configure``
    adjusts the model config read from config.json (run-time choices such as the attention kernel).

    ``path`` may also be an orbax directory written by ``omniret-convert orbax``
    (``state/`` + config.json): the whole model is restored from it, straight into
    the policy's dtypes and ``mesh``'s shardings.
    """
    if is_orbax(path):
        return _restore_wave(path, beats_checkpoint=beats_checkpoint, precision=precision, seed=seed, mesh=mesh,
                             remat=remat, configure=configure)
    cfg = ThinkerConfig.from_pretrained(path, precision=precision)
    if configure is not None:
        cfg = configure(cfg)
    source = TensorSource(path, allow_pickle=allow_pickle)
    layout = layout or detect_layout(source.keys())
    prefix = {m: LAYOUTS[layout][m] + "." for m in WAVE_MODULES}
    extra: dict[str, np.ndarray] = {}
    if beats_checkpoint is not None:
        beats_cfg, beats_weights = load_unilm_checkpoint(beats_checkpoint)
    else:
        beats_cfg = _beats_config(path)
        beats_keys = [k for k in source.keys() if k.startswith(prefix["beats"])]
        if not beats_keys:
            raise CheckpointError(f"{path}: no '{prefix['beats']}*' tensors; pass beats_checkpoint=<unilm .pt>")
        beats_weights = {k[len(prefix["beats"]):]: source.read(k) for k in beats_keys}
    try:
        extra.update({prefix["beats"] + k: v for k, v in canonical_state(beats_cfg, beats_weights).items()})
    except ValueError as e:
        raise CheckpointError(f"BEATs weights: {e}") from e

    build = lambda: WAVE(cfg, beats_cfg, rngs=nnx.Rngs(seed), remat=remat)  # noqa: E731
    missing_heads = [m for m in HEADS if not any(k.startswith(prefix[m]) for k in source.keys())]
    if missing_heads and not init_missing_heads:
        raise CheckpointError(
            f"{path} has no WAVE {', '.join(m + '.*' for m in missing_heads)} (a plain Qwen2.5-Omni thinker?); "
            "pass init_missing_heads=True to start them from random init, as training from the base does")
    if missing_heads:
        # Initialise just the missing heads (small next to the model).
        fresh = wave_heads(cfg, beats_cfg, rngs=nnx.Rngs(seed))
        for name in missing_heads:
            for p, var in nnx.to_flat_state(nnx.state(fresh[name])):
                key_path = (name, *p)
                extra[flax_to_hf_key(key_path, layout)] = flax_to_hf_array(key_path, np.asarray(var.get_value()))
    return load_module(build, OverlaySource(source, extra, hidden=(prefix["beats"],)), layout=layout, mesh=mesh,
                       progress=progress)


def _beats_config(path) -> BEATsConfig:
    raw = json.loads((Path(path) / "config.json").read_text()) if Path(path).is_dir() else {}
    if "beats_config" not in raw:
        raise CheckpointError(f"{path}: no BEATs config (config.json has no 'beats_config'); pass "
                              "beats_checkpoint=<BEATs_iter3_plus .pt> (WAVE's audio_config.beats_path)")
    try:
        return BEATsConfig.from_unilm_dict(raw["beats_config"])
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: beats_config: {e}") from e


def _restore_wave(path, *, beats_checkpoint, precision: Precision, seed: int, mesh: Mesh | None,
                  remat: str, configure: Callable[[ThinkerConfig], ThinkerConfig] | None = None) -> tuple[WAVE, LoadReport]:
    if beats_checkpoint is not None:
        raise CheckpointError(f"{path} is an orbax WAVE checkpoint, which holds BEATs already; "
                              f"beats_checkpoint={beats_checkpoint!s} would not be used (leave it empty)")
    cfg = ThinkerConfig.from_pretrained(path, precision=precision)
    if configure is not None:
        cfg = configure(cfg)
    beats_cfg = _beats_config(path)
    try:
        model = restore_module(lambda: WAVE(cfg, beats_cfg, rngs=nnx.Rngs(seed), remat=remat), path, mesh=mesh)
    except ValueError as e:
        raise CheckpointError(f"{Path(path) / STATE_DIR}: does not match {Path(path) / 'config.json'}: "
                              f"{str(e).splitlines()[0]}") from e
    leaves = jax.tree.leaves(nnx.state(model))
    return model, LoadReport(layout="orbax", loaded=len(leaves), ignored={},
                             nbytes=sum(int(x.nbytes) for x in leaves))


def wave_configs(path, *, precision: Precision = Precision()) -> tuple[ThinkerConfig, BEATsConfig]:
    """(thinker config, BEATs config) of a WAVE checkpoint directory (safetensors or orbax) from its
    config.json, which must carry ``beats_config``."""
    return ThinkerConfig.from_pretrained(path, precision=precision), _beats_config(path)


def load_heads(path, names: tuple[str, ...] = HEADS, *, precision: Precision = Precision(),
               allow_pickle: bool = False) -> dict[str, nnx.Module]:
    """WAVE's trained heads (``names`` of HEADS) alone from a WAVE checkpoint directory, in the
    trainable dtype; only their tensors are read (an orbax directory is restored whole)."""
    if is_orbax(path):
        model, _ = _restore_wave(path, beats_checkpoint=None, precision=precision, seed=0, mesh=None, remat="none")
        return {n: getattr(model, n) for n in names}
    cfg, beats_cfg = wave_configs(path, precision=precision)
    source = TensorSource(path, allow_pickle=allow_pickle)
    layout = detect_layout(source.keys())
    prefixes = tuple(LAYOUTS[layout][n] + "." for n in names)
    missing = [n for n, p in zip(names, prefixes) if not any(k.startswith(p) for k in source.keys())]
    if missing:
        raise CheckpointError(f"{path} has no WAVE {', '.join(m + '.*' for m in missing)} tensors "
                              "(a plain Qwen2.5-Omni thinker?)")
    heads = MappingSource({k: source.read(k) for k in source.keys() if k.startswith(prefixes)})
    build = lambda: nnx.Dict({n: m for n, m in wave_heads(cfg, beats_cfg, rngs=nnx.Rngs(0)).items()  # noqa: E731
                              if n in names})
    loaded, _ = load_module(build, heads, layout=layout, progress=False)
    return {n: loaded[n] for n in names}
