"""Device mesh and logical-axis sharding rules: the only place logical names meet mesh axes.

Model code tags every parameter with logical axis names (``nnx.Param(v, axes=(...))``,
constants in ``omniret_jax.model.layers``). Here those names are mapped onto a 3-axis
mesh ("data", "fsdp", "tensor"): batch over data*fsdp, the residual width over fsdp
(ZeRO-3 style parameter sharding), head/feed-forward/vocab widths over tensor. A
dimension that its mesh axes do not divide evenly is replicated instead and reported
(``sharding_fallbacks``) so the trainer can log it rather than fail on odd test sizes.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, NamedTuple, Union

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omniret_jax.model import layers as L

MESH_AXES = ("data", "fsdp", "tensor")

# The batch dimension of every input (not a parameter axis).
BATCH = "batch"

MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

LOGICAL_RULES: Rules = (
    (BATCH, ("data", "fsdp")),
    (L.EMBED, "fsdp"),
    (L.MLP, "tensor"),
    (L.HEADS, "tensor"),
    (L.KV_HEADS, "tensor"),
    (L.VOCAB, "tensor"),
    (L.VISION_EMBED, "fsdp"),
    (L.VISION_MLP, "tensor"),
    (L.AUDIO_EMBED, "fsdp"),
    (L.AUDIO_MLP, "tensor"),
    (L.NORM, None),
    (L.CONV, None),
)


# -- mesh ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh sizes per axis; -1 on one axis takes the devices the others leave.

    ``data``/``fsdp``/``tensor`` are sizes within a slice (ICI); the ``dcn_*`` sizes
    multiply them across slices of a multi-slice TPU job and stay 1 elsewhere.
    """
    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def resolved(self, n_devices: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(ici sizes, dcn sizes) with -1 filled in; ValueError if they cannot cover n_devices."""
        ici = [self.data, self.fsdp, self.tensor]
        dcn = [self.dcn_data, self.dcn_fsdp, self.dcn_tensor]
        desc = (f"mesh sizes data={self.data} fsdp={self.fsdp} tensor={self.tensor} "
                f"(dcn {self.dcn_data}x{self.dcn_fsdp}x{self.dcn_tensor})")
        if any(d < 1 for d in dcn) or any(s == 0 or s < -1 for s in ici):
            raise ValueError(f"{desc}: sizes must be >= 1 (or -1 on one ICI axis)")
        fill = [i for i, s in enumerate(ici) if s == -1]
        if len(fill) > 1:
            raise ValueError(f"{desc}: only one axis may be -1")
        if fill:
            rest = math.prod(s for s in ici if s != -1) * math.prod(dcn)
            if n_devices % rest:
                raise ValueError(f"{desc} do not divide the device count {n_devices}")
            ici[fill[0]] = n_devices // rest
        if math.prod(ici) * math.prod(dcn) != n_devices:
            raise ValueError(f"{desc} multiply to {math.prod(ici) * math.prod(dcn)}, "
                             f"not the device count {n_devices}")
        return tuple(ici), tuple(dcn)


def make_mesh(cfg: MeshConfig, devices: Iterable[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all).

    ``mesh_utils`` orders TPU devices along the physical torus (tensor, the last
    axis, gets the closest chips); on CPU/GPU it is a plain reshape.
    """
    devices = list(jax.devices() if devices is None else devices)
    ici, dcn = cfg.resolved(len(devices))
    if math.prod(dcn) > 1:
        if not hasattr(devices[0], "slice_index"):
            raise ValueError(f"dcn sizes {dcn} need a multi-slice TPU job; {devices[0].platform} devices have "
                             f"no slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    else:
        grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


# -- rules -----------------------------------------------------------------------------
def _normalise_rules(rules: Iterable[tuple[str, MeshAxes]] | Mapping[str, MeshAxes]) -> Rules:
    items = rules.items() if isinstance(rules, Mapping) else rules
    out = []
    for pair in items:
        if len(pair) != 2:
            raise ValueError(f"sharding rule {pair!r} is not a (logical name, mesh axes) pair")
        name, axes = pair
        if axes is not None and not isinstance(axes, str):
            axes = tuple(axes)
        out.append((name, axes))
    return tuple(out)


def _rule_table(rules, mesh: Mesh) -> dict[str, tuple[str, ...]]:
    """Logical name -> tuple of mesh axes (empty = replicated), checked against the mesh."""
    table = {}
    for name, axes in _normalise_rules(LOGICAL_RULES if rules is None else rules):
        axes = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        unknown = [a for a in axes if a not in mesh.shape]
        if unknown:
            raise ValueError(f"sharding rule {name!r} -> {axes} names mesh axes {unknown} not in the mesh "
                             f"{tuple(mesh.shape)}")
        if name in table:
            raise ValueError(f"sharding rules name logical axis {name!r} twice")
        table[name] = axes
    return table


# -- parameter specs -------------------------------------------------------------------
class Fallback(NamedTuple):
    """One dimension replicated because its size does not divide over its mesh axes."""
    path: str               # dotted nnx path
    dim: int
    name: str
    size: int
    mesh_axes: tuple[str, ...]
    mesh_size: int

    def __str__(self) -> str:
        return (f"{self.path} dim {self.dim} ({self.name}, size {self.size}) replicated: "
                f"not divisible by {'*'.join(self.mesh_axes)} = {self.mesh_size}")


def _is_var(x) -> bool:
    return isinstance(x, nnx.Variable)


def _resolve(names, shape, table, mesh: Mesh, path: str, fallbacks: list[Fallback]) -> PartitionSpec:
    """PartitionSpec for logical ``names``; dimensions their mesh axes do not divide are replicated."""
    used: set[str] = set()
    entries = []
    for dim, name in enumerate(names):
        if name is None:
            entries.append(None)
            continue
        if name not in table:
            raise ValueError(f"parameter {path}: unknown logical axis name {name!r}; known: {sorted(table)}")
        # A mesh axis may appear once per spec: axes an earlier dimension already
        # splits over are dropped here (the array is split over them anyway).
        mesh_axes = tuple(a for a in table[name] if a not in used)
        if not mesh_axes:
            entries.append(None)
            continue
        n = math.prod(mesh.shape[a] for a in mesh_axes)
        if shape[dim] % n:
            fallbacks.append(Fallback(path, dim, name, shape[dim], mesh_axes, n))
            entries.append(None)
        else:
            used.update(mesh_axes)
            entries.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return PartitionSpec(*entries)


def _specs(state, mesh: Mesh, rules) -> tuple[Any, list[Fallback]]:
    table = _rule_table(rules, mesh)
    fallbacks: list[Fallback] = []

    def one(key_path, leaf):
        if not _is_var(leaf):
            return PartitionSpec()
        path = jax.tree_util.keystr(key_path, simple=True, separator=".")
        axes = leaf.get_metadata().get("axes")
        if axes is None:
            if isinstance(leaf, nnx.Param):
                raise ValueError(f"parameter {path} has no `axes` metadata (nnx.Param(value, axes=(...)))")
            return leaf.replace(PartitionSpec())
        shape = tuple(leaf.get_value().shape)
        if len(axes) != len(shape):
            raise ValueError(f"parameter {path}: axes {tuple(axes)} have {len(axes)} names but the value has "
                             f"shape {shape}")
        return leaf.replace(_resolve(tuple(axes), shape, table, mesh, path, fallbacks))

    return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var), fallbacks


def param_partition_specs(state, mesh: Mesh, rules=None):
    """Same-structure tree of PartitionSpecs from each Variable's ``axes`` metadata.

    Works on concrete or abstract (``nnx.eval_shape``) states and on optimizer
    states whose variables carry the parameters' metadata. Variables without
    ``axes`` that are not Params (rng counters, step counts) are replicated; a
    Param without ``axes`` or with an unknown logical name is an error.
    """
    return _specs(state, mesh, rules)[0]


def sharding_fallbacks(state, mesh: Mesh, rules=None) -> list[Fallback]:
    """Dimensions replicated because their size does not divide over their mesh axes (for logging)."""
    return _specs(state, mesh, rules)[1]


def state_shardings(state, mesh: Mesh, rules=None):
    """NamedSharding tree for ``state`` (jit in/out shardings, device_put targets)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_partition_specs(state, mesh, rules),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


def shard_state(state, mesh: Mesh, rules=None):
    """``state`` placed on the mesh according to the rules."""
    return put(state, state_shardings(state, mesh, rules))


def put(tree, shardings):
    """``jax.device_put(tree, shardings)`` that also works when the shardings span devices of
    other processes (multi-host): each process then builds its own shards from its host copy
    of the full value, which must be the same on every process (``jax.make_array_from_callback``)."""
    def one(x, s):
        if s.is_fully_addressable:
            return jax.device_put(x, s)
        host = np.asarray(jax.device_get(x)) if isinstance(x, jax.Array) else np.asarray(x)
        return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

    leaves, treedef = jax.tree.flatten(tree)
    sh_leaves = treedef.flatten_up_to(shardings)
    return treedef.unflatten([one(x, s) for x, s in zip(leaves, sh_leaves)])


def replicated(value, mesh: Mesh) -> jax.Array:
    """A host value (the same on every process) as an array replicated over the whole mesh."""
    return put(np.asarray(value), NamedSharding(mesh, PartitionSpec()))


# -- data ------------------------------------------------------------------------------
def _batch_axes(mesh: Mesh, rules) -> tuple[str, ...]:
    return _rule_table(rules, mesh)[BATCH]


def _describe(mesh: Mesh, axes: tuple[str, ...]) -> str:
    """e.g. 'data*fsdp = 2*4 = 8'."""
    n = math.prod(mesh.shape[a] for a in axes)
    if len(axes) == 1:
        return f"{axes[0]} = {n}"
    return f"{'*'.join(axes) or 'no mesh axis'} = {'*'.join(str(mesh.shape[a]) for a in axes)} = {n}"


def batch_sharding(mesh: Mesh, global_batch: int | None = None, *, batch_axis: int = 0,
                   rules=None) -> NamedSharding:
    """Sharding of a batch array: dimension ``batch_axis`` over the "batch" rule's mesh axes
    (("data", "fsdp") by default), the rest replicated. With ``global_batch`` given,
    checks that it divides evenly over them.
    """
    axes = _batch_axes(mesh, rules)
    n = math.prod(mesh.shape[a] for a in axes)
    if global_batch is not None and global_batch % n:
        raise ValueError(f"global batch {global_batch} is not divisible by {_describe(mesh, axes)}")
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_axis), axes or None))


def shard_batch(batch, mesh: Mesh, *, batch_axis: int = 0, rules=None):
    """Host arrays of this process's share of the batch -> global arrays sharded like ``batch_sharding``.

    Every leaf has its batch at ``batch_axis``.
    Multi-host: each process passes its own rows; the global
    batch is the local one times (batch shards in the mesh / batch shards held here).
    """
    axes = _batch_axes(mesh, rules)
    dims = [mesh.axis_names.index(a) for a in axes]
    n = math.prod(mesh.shape[a] for a in axes)
    me = jax.process_index()
    held = len({tuple(idx[i] for i in dims) for idx, d in np.ndenumerate(mesh.devices) if d.process_index == me})

    def put(x):
        x = np.asarray(x)
        if x.ndim <= batch_axis:
            raise ValueError(f"batch leaf of shape {x.shape} has no batch axis {batch_axis}")
        local = x.shape[batch_axis]
        if held == n:   # this process feeds every batch shard: its batch is the global batch
            global_batch = local
        elif local % held:
            raise ValueError(f"{local} rows on process {me} do not split over the {held} batch shards it holds, "
                             f"so the global batch is not divisible by {_describe(mesh, axes)}")
        else:
            global_batch = local // held * n
        sharding = batch_sharding(mesh, global_batch, batch_axis=batch_axis, rules=rules)
        shape = x.shape[:batch_axis] + (global_batch,) + x.shape[batch_axis + 1:]
        return jax.make_array_from_process_local_data(sharding, x, shape)

    return jax.tree.map(put, batch)


def fetch_global(tree):
    """Global arrays (sharded anyhow, over several processes too) as whole host NumPy arrays on
    every process. With several processes this is a collective: every process calls it."""
    if jax.process_count() == 1:
        return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


def process_rows(mesh: Mesh, global_batch: int, *, rules=None) -> tuple[int, int]:
    """Rows [start, stop) of a batch-sharded global batch that live on this process's devices.

    The input pipeline reads exactly these rows of every global batch (``shard_batch`` places
    them there); they must be one contiguous block, which the meshes of ``make_mesh`` give."""
    sh = batch_sharding(mesh, global_batch, rules=rules)
    starts = sorted({(idx[0].start or 0, idx[0].stop if idx[0].stop is not None else global_batch)
                     for idx in sh.addressable_devices_indices_map((global_batch,)).values()})
    start, stop = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != stop - start or any(b[0] != a[1] for a, b in zip(starts, starts[1:])):
        raise ValueError(f"process {jax.process_index()} holds batch rows {starts} of {global_batch}: not one "
                         "contiguous block; order the mesh devices by process")
    return start, stop


# -- multi-host ------------------------------------------------------------------------
def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, auto: bool = False) -> bool:
    """Start JAX's multi-host runtime when configured; a no-op on a single host.

    Configured means any argument given, ``JAX_COORDINATOR_ADDRESS`` set, or ``auto``
    (let JAX detect Cloud TPU pods, SLURM, MPI). Must run before any other JAX call
    touches the devices. Returns whether the distributed runtime is up.
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"num_processes={num_processes} must be >= 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id} is outside [0, num_processes={num_processes})")
    configured = (auto or os.environ.get("JAX_COORDINATOR_ADDRESS")
                  or any(a is not None for a in (coordinator_address, num_processes, process_id)))
    if not configured:
        return False
    # CPU devices of several processes need a collectives backend (jax's default is none);
    # harmless for accelerator runs, whose CPU client is not used for the model.
    if not jax.config.jax_cpu_collectives_implementation:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
