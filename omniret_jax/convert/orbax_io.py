"""Converted parameters on disk: an orbax checkpoint plus the source config.json.

The checkpoint holds the NNX state as a plain nested dict, so restoring needs
only the config to rebuild the abstract module.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

CONFIG_NAME = "config.json"
STATE_DIR = "state"


def save_module(module: nnx.Module, out_dir: str | Path, hf_config: str | Path) -> Path:
    """Write ``out_dir/state`` (orbax) and copy the Hugging Face config beside it."""
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
    src = Path(hf_config)
    shutil.copyfile(src / CONFIG_NAME if src.is_dir() else src, out_dir / CONFIG_NAME)
    return out_dir


def restore_module(build, ckpt_dir: str | Path) -> nnx.Module:
    """Rebuild ``build()`` abstractly and restore its parameters from ``ckpt_dir/state``."""
    ckpt_dir = Path(ckpt_dir).absolute()
    if not (ckpt_dir / STATE_DIR).is_dir():
        raise FileNotFoundError(f"{ckpt_dir} has no '{STATE_DIR}/' orbax checkpoint (write one with omniret-convert)")
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(state))
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(ckpt_dir / STATE_DIR, target)
    nnx.replace_by_pure_dict(state, restored)
    return nnx.merge(graphdef, state)
