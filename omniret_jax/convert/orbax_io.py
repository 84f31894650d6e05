"""Converted parameters on disk: an orbax checkpoint plus the model's config.json ("convert once, load fast").

    DIR/state/        orbax StandardSave of the module's state as a plain nested dict
    DIR/config.json   the Hugging Face thinker config (+ ``beats_config`` for WAVE)

Restoring needs only the config to rebuild the abstract module; each array is read
straight into the dtype of the precision policy and, with a mesh, into the sharding its
logical axes give, so no host or device ever holds a second copy. ``to_flax.load_wave``
reads such a directory when it has ``state/``, so ``config.model.checkpoint`` may point
at one in training and evaluation.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from omniret_jax import sharding

CONFIG_NAME = "config.json"
STATE_DIR = "state"


def is_orbax(path: str | Path) -> bool:
    """A directory written by ``save_module`` (it has ``state/``)."""
    return (Path(path) / STATE_DIR).is_dir()


def save_module(module: nnx.Module, out_dir: str | Path, config: Mapping) -> Path:
    """Write ``out_dir/state`` (orbax) and ``config`` as ``out_dir/config.json``."""
    out_dir = Path(out_dir).absolute()
    if (out_dir / STATE_DIR).exists():
        raise FileExistsError(f"{out_dir / STATE_DIR} exists; choose an empty output directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(module))
    # Bound orbax's in-flight host copies to about one tensor instead of the whole
    # model (orbax counts in units of 1e9 bytes and needs room for the largest).
    largest = max(int(x.nbytes) for x in jax.tree.leaves(state))
    handler = ocp.StandardCheckpointHandler(save_concurrent_gb=max(1, math.ceil(largest / 1e9)))
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(out_dir / STATE_DIR, args=ocp.args.StandardSave(state))
    (out_dir / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True))
    return out_dir


def restore_module(build, ckpt_dir: str | Path, *, mesh: Mesh | None = None) -> nnx.Module:
    """Rebuild ``build()`` abstractly and restore its parameters from ``ckpt_dir/state``, each in
    the dtype ``build`` gives it (orbax casts) and, with ``mesh``, in its sharding."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if not is_orbax(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} has no '{STATE_DIR}/' orbax checkpoint (write one with "
                                "omniret-convert orbax)")
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    shardings = None if mesh is None else nnx.to_pure_dict(sharding.state_shardings(state, mesh))
    target = nnx.to_pure_dict(state)
    if shardings is None:
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    else:
        target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), target, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir / STATE_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
