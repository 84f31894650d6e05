"""Training checkpoints: trainable parameters, optimizer state, step, RNG key, input state.

One orbax `CheckpointManager` step directory per saved step:

    workdir/<step>/trainables   StandardSave of the trainable tree (nnx Variables unwrapped,
                                nnx.State as plain nested dicts, like convert/orbax_io.py)
    workdir/<step>/opt_state    StandardSave of the optax state (same unwrapping)
    workdir/<step>/meta         JSON: format, step, items written, leaf specs, RNG key, config,
                                metrics
    workdir/<step>/data         JSON: the input pipeline's `get_state()` (only when given)

Frozen base weights are never written here: they come from the converted base checkpoint, so
a training checkpoint holds only what training changes. The RNG key lives in the JSON as its
raw uint32 words plus the PRNG implementation name, which round-trips typed keys exactly.

A step that cannot be restored (unreadable metadata, a missing item, a truncated or unreadable
file, values that are no longer finite) is moved to `workdir/corrupt/` next to a reason file,
a warning names the step and the problem, and `restore_latest` falls back to the previous
step. Unfinished saves left by a crash (orbax `*.orbax-checkpoint-tmp*` directories) are moved
aside the same way when the checkpointer opens the workdir. Nothing is ever deleted except by
the keep-N policy. Restoring into trees that do not match the checkpoint (changed model or
optimizer, bad shardings) is a ValueError and moves nothing.

Typical loop (step = number of optimizer updates done):

    ckpt = TrainCheckpointer(workdir, keep=3, save_every=1000, config=cfg.to_dict())
    ckpt.install_sigterm_handler()
    r = ckpt.restore_latest(abstract_trainables, abstract_opt_state)
    step = 0 if r is None else r.step            # ... and load r.* / pipeline.set_state(r.data_state)
    while step < total:
        trainables, opt_state, key = train_step(...); step += 1
        stop = ckpt.should_stop()
        ckpt.save(step, trainables, opt_state, rng=key, data_state=pipeline.get_state(),
                  metrics=metrics, force=stop)
        if stop:
            break
    ckpt.close()                                  # waits for async saves; then exit 0
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
import signal
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

log = logging.getLogger(__name__)

FORMAT = 1
CORRUPT_DIR = "corrupt"
TRAINABLES, OPT_STATE, META, DATA = "trainables", "opt_state", "meta", "data"
# orbax writes a step into "<step>.orbax-checkpoint-tmp-<time>" and renames it when complete.
_TMP_MARK = ".orbax-checkpoint-tmp"
_TMP_STEP = re.compile(r"^(\d+)" + re.escape(_TMP_MARK))
_META_KEYS = {"format", "step", "items", "specs", "rng", "config", "metrics"}


class CheckpointError(RuntimeError):
    """No usable checkpoint, or an explicitly requested step is unusable."""


class NonFiniteError(ValueError):
    """A tree about to be checkpointed holds NaN or Inf."""


class _Corrupt(Exception):
    """Internal: the step directory itself is bad (as opposed to the caller's trees)."""


@dataclasses.dataclass
class RestoredState:
    step: int
    trainables: Any
    opt_state: Any  # None when no abstract optimizer state was given
    rng: jax.Array | None
    data_state: dict[str, Any] | None
    config: dict[str, Any]
    metrics: dict[str, Any]


def _leaf_path(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _plain(tree: Any) -> Any:
    """nnx.State -> nested dict, nnx.Variable -> its value; other nodes stay. Leaves are the
    same objects in the same order, so the caller's tree structure can be rebuilt from them."""
    def unwrap(x):
        if isinstance(x, nnx.State):
            return nnx.to_pure_dict(x)
        if isinstance(x, nnx.Variable):
            return x.get_value()
        return x

    return jax.tree.map(unwrap, tree, is_leaf=lambda x: isinstance(x, (nnx.State, nnx.Variable)))


def _is_float(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _local_scalar(x) -> Any:
    """A replicated scalar's value from this process's own copy (a multi-host array cannot be
    fetched whole; every process holds the replicated result)."""
    return np.asarray(x.addressable_data(0)).item() if isinstance(x, jax.Array) else np.asarray(x).item()


def assert_finite(tree: Any, what: str) -> None:
    """Raises NonFiniteError naming the first leaf (tree order) holding NaN or Inf."""
    flat = [(p, x) for p, x in jax.tree_util.tree_flatten_with_path(_plain(tree))[0] if _is_float(x)]
    finite = [_local_scalar(jnp.isfinite(x).all()) for _, x in flat]
    for (path, x), ok in zip(flat, finite):
        if not ok:
            n_nan, n_inf = int(_local_scalar(jnp.isnan(x).sum())), int(_local_scalar(jnp.isinf(x).sum()))
            raise NonFiniteError(
                f"{what}: leaf '{_leaf_path(path)}' {tuple(x.shape)} {x.dtype} has {n_nan} NaN "
                f"and {n_inf} Inf of {math.prod(x.shape)} values; refusing to checkpoint it")


def _spec(plain_tree: Any) -> list[list]:
    return [[_leaf_path(p), list(x.shape), str(x.dtype)]
            for p, x in jax.tree_util.tree_flatten_with_path(plain_tree)[0]]


def _jsonable(obj: Any, where: str) -> Any:
    """JSON-ready copy: numpy/jax scalars become Python numbers, tuples lists, ConfigDicts
    dicts; dict keys must be strings. Raises ValueError naming the offending entry."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if callable(getattr(obj, "to_dict", None)):  # ml_collections.ConfigDict
        obj = obj.to_dict()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: key {k!r} is not a string; JSON state needs string keys")
            out[k] = _jsonable(v, f"{where}.{k}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (np.generic, np.ndarray, jax.Array)) and np.ndim(obj) == 0:
        return np.asarray(obj).item()
    raise ValueError(f"{where}: {type(obj).__name__} is not JSON-serialisable "
                     "(use numbers, strings, lists and dicts)")


def _rng_to_json(key: Any) -> dict[str, Any]:
    if not hasattr(key, "dtype"):
        raise ValueError(f"rng must be a JAX key array, got {type(key).__name__}")
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl, data = str(jax.random.key_impl(key)), jax.random.key_data(key)
    elif key.dtype == jnp.uint32:
        impl, data = None, key  # legacy raw key (jax.random.PRNGKey)
    else:
        raise ValueError(f"rng has dtype {key.dtype}; expected a typed key or raw uint32 key data")
    return {"impl": impl, "data": np.asarray(jax.device_get(data)).tolist()}


def _rng_from_json(d: dict[str, Any] | None) -> jax.Array | None:
    if d is None:
        return None
    data = jnp.asarray(np.asarray(d["data"], dtype=np.uint32))
    return data if d["impl"] is None else jax.random.wrap_key_data(data, impl=d["impl"])


def _abstract_leaf(x: Any, sharding=None) -> jax.ShapeDtypeStruct:
    if sharding is None and isinstance(x, (jax.ShapeDtypeStruct, jax.Array)):
        sharding = x.sharding
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def _first_line(e: BaseException, limit: int = 400) -> str:
    """Exception summary for a warning; drops tensorstore's long spec dump."""
    text = (str(e).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
    return f"{type(e).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


class TrainCheckpointer:
    """Saves and restores training state under `workdir`; see the module docstring."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = False, config: Any = None):
        if keep < 1:
            raise ValueError(f"keep={keep} must be >= 1")
        if save_every < 1:
            raise ValueError(f"save_every={save_every} must be >= 1")
        self.workdir = Path(workdir).absolute()
        self.save_every = save_every
        self._config = _jsonable({} if config is None else config, "config")
        if not isinstance(self._config, dict):
            raise ValueError(f"config must be a mapping or ConfigDict, got {type(config).__name__}")
        self._stop_signal: int | None = None
        self._stop_agreed = False
        self._previous_handlers: dict[int, Any] = {}
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._move_aside_unfinished()
        self._manager = ocp.CheckpointManager(
            self.workdir, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

    # ----------------------------------------------------------------------------- steps
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def should_save(self, step: int) -> bool:
        return step % self.save_every == 0 or self._stop_agreed

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, trainables: Any, opt_state: Any, *, rng: Any = None,
             data_state: Mapping[str, Any] | None = None,
             metrics: Mapping[str, Any] | None = None, force: bool = False) -> bool:
        """Saves when `force`, when `step` is a multiple of save_every, or once a stop was
        requested; returns whether it saved. Raises NonFiniteError (writing nothing) when
        the trainables or optimizer state hold NaN/Inf."""
        if not (force or self.should_save(step)):
            return False
        latest = self._manager.latest_step()
        if latest is not None and step <= latest:
            if step == latest:
                log.info("checkpoint step %d already saved in %s", step, self.workdir)
                return False
            raise ValueError(
                f"cannot save step {step}: {self.workdir} already holds step {latest}. Resuming "
                "from an older step would mix two runs; move the newer steps away or use a new "
                "workdir")
        train_plain, opt_plain = _plain(trainables), _plain(opt_state)
        assert_finite(train_plain, TRAINABLES)
        assert_finite(opt_plain, "optimizer state")
        items = {TRAINABLES: ocp.args.StandardSave(train_plain),
                 OPT_STATE: ocp.args.StandardSave(opt_plain)}
        if data_state is not None:
            items[DATA] = ocp.args.JsonSave(_jsonable(dict(data_state), "data_state"))
        meta = {
            "format": FORMAT, "step": int(step), "items": sorted(items),
            "specs": {TRAINABLES: _spec(train_plain), OPT_STATE: _spec(opt_plain)},
            "rng": None if rng is None else _rng_to_json(rng),
            "config": self._config,
            "metrics": _jsonable(dict(metrics or {}), "metrics"),
        }
        items[META] = ocp.args.JsonSave(meta)
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)
        return True

    # --------------------------------------------------------------------------- restore
    def restore_latest(self, abstract_trainables: Any,
                       abstract_opt_state: Any = None) -> RestoredState | None:
        """Newest usable step, or None in an empty workdir. Unusable steps are moved aside
        with a warning and the next older one is tried; CheckpointError if none works.

        The abstract trees give structure, shapes, dtypes and (optionally) shardings; their
        leaves may be jax.ShapeDtypeStruct or arrays. With abstract_opt_state=None the
        optimizer state is not read (evaluation, export)."""
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            return None
        problems = []
        for i, step in enumerate(steps):
            try:
                return self._restore(step, abstract_trainables, abstract_opt_state)
            except _Corrupt as e:
                moved = self._move_aside(self.workdir / str(step), str(e))
                then = f"falling back to step {steps[i + 1]}" if i + 1 < len(steps) else "no older step"
                log.warning("checkpoint step %d in %s is unusable: %s. Moved it to %s; %s.",
                            step, self.workdir, e, moved, then)
                problems.append(f"step {step}: {e}")
                self._manager.reload()
        raise CheckpointError(
            f"no usable checkpoint in {self.workdir}: {'; '.join(problems)}. The bad step "
            f"directories were moved to {self.workdir / CORRUPT_DIR} (nothing was deleted); "
            "repair them or start from the base checkpoint in a fresh workdir")

    def restore(self, step: int, abstract_trainables: Any,
                abstract_opt_state: Any = None) -> RestoredState:
        """Restores exactly `step`; an unusable step raises CheckpointError and stays put."""
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if step not in steps:
            raise ValueError(f"no checkpoint step {step} in {self.workdir}; available: {steps}")
        try:
            return self._restore(step, abstract_trainables, abstract_opt_state)
        except _Corrupt as e:
            raise CheckpointError(f"checkpoint step {step} in {self.workdir} is unusable: {e}") from e

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of `step` (None: the newest): step, config, metrics, leaf specs.
        CheckpointError when there is no step or it is unreadable, ValueError for a step that
        does not exist (the message lists those that do)."""
        self._manager.wait_until_finished()
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint step in {self.workdir}")
        if step is None:
            step = steps[-1]
        if step not in steps:
            raise ValueError(f"no checkpoint step {step} in {self.workdir}; available: {steps}")
        try:
            return self._read_meta(step)
        except _Corrupt as e:
            raise CheckpointError(f"checkpoint step {step} in {self.workdir} is unusable: {e}") from e

    def _read_meta(self, step: int) -> dict[str, Any]:
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(
                **{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # any failure to read our own small JSON means a damaged step
            raise _Corrupt(f"item '{META}' is missing or unreadable ({_first_line(e)})") from e
        if (not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("step") != step
                or not _META_KEYS <= meta.keys()):
            raise _Corrupt(f"item '{META}' is not a format-{FORMAT} record of step {step}")
        return meta

    def _restore(self, step: int, abstract_trainables: Any, abstract_opt_state: Any) -> RestoredState:
        step_dir = self.workdir / str(step)
        meta = self._read_meta(step)
        for item in meta["items"]:
            if not (step_dir / item).is_dir():
                raise _Corrupt(f"item '{item}' is missing")
        leftovers = sorted(p.name for p in step_dir.iterdir() if _TMP_MARK in p.name)
        if leftovers:
            raise _Corrupt(f"unfinished item write(s) {leftovers}")

        wanted = {TRAINABLES: abstract_trainables}
        if abstract_opt_state is not None:
            wanted[OPT_STATE] = abstract_opt_state
        treedefs, targets = {}, {}
        for name, tree in wanted.items():
            leaves, treedefs[name] = jax.tree.flatten(tree)
            plain = _plain(tree)
            if any(a is not b for a, b in zip(leaves, jax.tree.leaves(plain), strict=True)):
                raise AssertionError("unwrapping nnx Variables changed the leaf order")
            _check_spec(meta["specs"][name], _spec(plain), name, step)
            targets[name] = jax.tree.map(_abstract_leaf, plain)

        def read(targets):
            args = {n: ocp.args.StandardRestore(t) for n, t in targets.items()}
            if DATA in meta["items"]:
                args[DATA] = ocp.args.JsonRestore()
            return self._manager.restore(step, args=ocp.args.Composite(**args))

        try:
            restored = read(targets)
        except Exception as e:
            # Bad shardings in the caller's abstract trees fail here too: if the step reads
            # fine onto one CPU device, the checkpoint is good and the caller's trees are not.
            cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
            try:
                read(jax.tree.map(lambda x: _abstract_leaf(x, cpu), targets))
            except Exception:
                raise _Corrupt(f"a file is unreadable or truncated ({_first_line(e)})") from e
            raise ValueError(f"checkpoint step {step} is readable, but not into the given abstract "
                             f"trees (check their shardings): {_first_line(e)}") from e

        out = {}
        for name in wanted:
            out[name] = jax.tree.unflatten(treedefs[name], jax.tree.leaves(restored[name]))
            try:
                assert_finite(out[name], name)
            except NonFiniteError as e:
                raise _Corrupt(f"{e} (it was finite when saved)") from e
        return RestoredState(
            step=step, trainables=out[TRAINABLES], opt_state=out.get(OPT_STATE),
            rng=_rng_from_json(meta["rng"]),
            data_state=restored[DATA] if DATA in meta["items"] else None,
            config=meta["config"], metrics=meta["metrics"])

    # ------------------------------------------------------------------------ bad steps
    def _move_aside(self, path: Path, reason: str) -> Path:
        """Moves a bad step directory to workdir/corrupt/ (never deletes) with a reason file."""
        dest_dir = self.workdir / CORRUPT_DIR
        if jax.process_index() == 0:
            dest_dir.mkdir(exist_ok=True)
            dest, n = dest_dir / path.name, 1
            while dest.exists():
                dest, n = dest_dir / f"{path.name}.{n}", n + 1
            shutil.move(str(path), str(dest))
            dest.with_name(dest.name + ".reason.txt").write_text(reason + "\n")
        else:
            dest = dest_dir / path.name
        if jax.process_count() > 1:
            ocp.multihost.sync_global_processes(f"omniret_checkpoint_move_aside_{path.name}")
        return dest

    def _move_aside_unfinished(self) -> None:
        for path in sorted(self.workdir.iterdir()):
            m = _TMP_STEP.match(path.name)
            if m and path.is_dir():
                reason = f"unfinished save of step {m.group(1)} (orbax temporary directory left by a crash)"
                moved = self._move_aside(path, reason)
                log.warning("%s: %s in %s; moved it to %s", path.name, reason, self.workdir, moved)

    # ------------------------------------------------------------------------- stopping
    def install_sigterm_handler(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        """On these signals only set a flag; the loop polls `should_stop()` at a step boundary,
        saves and exits (saving inside a signal handler could interrupt a running step)."""
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("install_sigterm_handler must be called from the main thread")
        for sig in signals:
            previous = signal.signal(sig, self._on_signal)
            self._previous_handlers.setdefault(sig, previous)

    def _on_signal(self, signum, frame) -> None:
        self._stop_signal = signum

    def should_stop(self) -> bool:
        """True once a stop was requested on any process. With several processes this is a
        collective: call it at the same step everywhere."""
        local = self._stop_signal is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            local = bool(np.any(multihost_utils.process_allgather(np.int32(local))))
        if local and not self._stop_agreed:
            name = signal.Signals(self._stop_signal).name if self._stop_signal else "another process"
            log.warning("stop requested (%s): saving at this step and stopping", name)
            self._stop_agreed = True
        return self._stop_agreed

    # ---------------------------------------------------------------------------- close
    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Waits for pending (async) saves and restores the previous signal handlers."""
        self._manager.wait_until_finished()
        self._manager.close()
        for sig, previous in self._previous_handlers.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous_handlers.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _check_spec(saved: list, given: list, name: str, step: int) -> None:
    """ValueError naming the first leaf where the caller's abstract tree and the checkpoint
    disagree (the model or optimizer changed since the checkpoint was written)."""
    saved_d = {p: (tuple(s), d) for p, s, d in saved}
    given_d = {p: (tuple(s), d) for p, s, d in given}
    for path, (shape, dtype) in saved_d.items():
        if path not in given_d:
            raise ValueError(f"checkpoint step {step}: {name} leaf '{path}' {shape} {dtype} is "
                             "not in the given abstract tree")
        if given_d[path] != (shape, dtype):
            raise ValueError(f"checkpoint step {step}: {name} leaf '{path}' is {shape} {dtype} in "
                             f"the checkpoint but {given_d[path][0]} {given_d[path][1]} in the "
                             "given abstract tree")
    extra = [p for p in given_d if p not in saved_d]
    if extra:
        raise ValueError(f"checkpoint step {step}: {name} leaf '{extra[0]}' of the given abstract "
                         "tree is not in the checkpoint")
