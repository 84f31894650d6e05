"""``python -m omniret_jax.train --config configs/<x>.py --workdir DIR [--config.<key>=<value>]``.

One readable loop: the model factory (``omniret_jax.build``) builds or loads the WAVE
model with LoRA, split once into trainable / frozen state placed on the mesh; then per
micro-batch: host-side token layout -> jitted pure step -> and at each optimizer update
(``optim.accumulate`` micro-batches) metrics (progress bar, JSONL, TensorBoard) and
checkpoint. Resumes from the newest good checkpoint in the workdir; SIGTERM saves at the next
poll (every ``train.stop_every`` updates) and exits 0.

Counting: ``train.steps``, ``log_every`` and ``ckpt_every`` count optimizer updates (the
learning-rate schedule's unit); the loop runs ``steps x accumulate`` micro-batches of
``train.batch_size`` samples (more when a non-finite micro-batch is skipped: it does not count
towards its update). Checkpoints are taken at update boundaries only, holding the update
count, the micro-batch count and the pipeline state, so a resumed run continues bitwise.

Gradient caching (``train.contrastive_batch`` > ``train.chunk``, ``grad_cache``): the micro-batch
is the contrastive batch, every example the others' negative, embedded chunk by chunk
(``step.CachedGrads``) with the activation memory of one chunk.

Asynchronous (``train.prefetch`` > 0): a producer thread reads, lays out and places micro-batch
n+1 (up to ``prefetch`` ahead) while step n runs, and the host reads nothing back per step:
the step's metrics stay on the device until a log, checkpoint, stop or the last update. What
a micro-batch's layout needs from the past (the update count the paper's hard-negative slot
cycles with) is laid out assuming every earlier micro-batch finite; the step carries on the
device the index of the first non-finite micro-batch since the last read, and every later step
changes nothing. A read that finds one rewinds there: the pipeline goes back to the state saved
with that batch and the loop continues exactly as the synchronous loop (``prefetch=0``: build,
step, read, every micro-batch) would have, so both give bitwise the same run.

Curriculum (``config.curriculum``, GVE's Modality Pyramid: ``omniret_jax.data.curriculum``): each
update trains one task drawn by the schedule, its micro-batches from that task's pipeline, laid out
for its query kind, through that task's step (compiled once per task). A probe due after update k
forces a read, scores the tasks with the prober and is recorded before update k is laid out (the
producer waits for it) and before checkpoint k is saved (which holds the probe history).

Several processes (``--config.distributed.*``, or a cluster jax.distributed detects): each
reads its rows of every global batch, lays them out, and exchanges the small per-row metadata
the hard negatives need through jax.distributed's key-value store; the arrays on the devices
are global, so the step is the same program as on one process with as many devices.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import queue
import statistics
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from omniret_jax import build, sharding
from omniret_jax.build import define_config_flag
from omniret_jax.checkpoint import CheckpointError, TrainCheckpointer
from omniret_jax.data import curriculum as cur
from omniret_jax.data.batch import (add_row_layouts, build_inputs, caption_token_budget, chunked, cut_patches,
                                    still_frames)
from omniret_jax.data.manifest import load_manifest
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.eval.tasks import Prober
from omniret_jax.losses import needed_views
from omniret_jax.model.lora import trainable_filter
from omniret_jax.step import CachedGrads, StepConfig, apply_update, loss_and_grads, lr_schedule


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def manifest_path(c, workdir: Path) -> Path:
    """The configured manifest, or the synthetic corpus generated (by process 0) into the workdir."""
    if c.data.manifest:
        return Path(c.data.manifest)
    corpus = workdir / "corpus"
    manifest = corpus / "manifest.jsonl"
    if not manifest.exists() and jax.process_index() == 0:
        from omniret_jax.data.synth import SynthSettings, generate, generate_tasks

        settings = SynthSettings(seconds=c.data.synth_seconds, size=c.data.synth_size)
        if c.data.get("synth_tasks"):   # the curriculum's multi-task corpus
            generate_tasks(str(corpus), c.data.synth_n, seed=c.data.synth_seed, settings=settings,
                           tasks=tuple(c.data.synth_tasks))
        else:
            generate(str(corpus), c.data.synth_n, seed=c.data.synth_seed, settings=settings)
    _barrier("omniret_synthetic_corpus")
    return manifest


def pipeline_config(c, *, augment: bool, caption_tokens: int | None = None) -> PipelineConfig:
    """The training input settings of config ``c`` (global batch = train.batch_size)."""
    d = c.data
    return PipelineConfig(
        batch_size=c.train.batch_size, seed=c.train.seed, num_frames=d.num_frames,
        min_pixels=d.min_pixels, max_pixels=d.max_pixels, audio_seconds=d.audio_seconds,
        audio_mode=d.audio_mode, on_missing_audio=d.on_missing_audio, max_caption_chars=d.max_caption_chars,
        caption_tokens=caption_tokens, on_long_caption=d.on_long_caption,
        text_negative="dataset" if d.text_negative == "dataset" else "none", augment=augment,
        on_bad_record=d.on_bad_record, on_bad_sample="replace", max_replacements=d.max_replacements,
        num_workers=d.num_workers, patch_buckets=d.get("patch_buckets"))


# The curriculum's probes with every probe record's margin, one JSON line a probe (a probe a
# resumed run takes again is appended again: the last line of an update counts).
PROBES_FILE = "probes.jsonl"


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: Path):
        self.enabled, self.workdir = jax.process_index() == 0, workdir
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write_line(self, name: str, record: dict) -> None:
        """Appends one JSON line to workdir/name (process 0)."""
        if self.enabled:
            with open(self.workdir / name, "a") as f:
                f.write(json.dumps(record) + "\n")

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.file.flush()
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            self.tb.close()


def _fetch(tree):
    """Replicated device values as host NumPy, read from this process's own copy (works with
    several processes, where a global array cannot be fetched whole): one ``device_get``, the
    loop's only device-to-host reads."""
    return jax.device_get(jax.tree.map(lambda v: v.addressable_data(0), tree))


def rotation_count(loss_cfg, micro_batch: int, update: int) -> int:
    """What the hard-negative slot and the released pair rotation count for this micro-batch:
    the optimizer update (paper: "cycles with the step") or the micro-batch (released code)."""
    return micro_batch if loss_cfg.counter == "micro_batch" else update


class RowExchange:
    """Every process's per-row metadata (the hard negatives', the clips' patch need) through
    jax.distributed's key-value store rather than a device collective: the producer thread lays
    batches out while the main thread's step runs, and collectives must not be issued from two
    threads at once."""

    def __init__(self, lag: int, timeout_s: float = 600.0):
        from jax._src import distributed

        self._client = distributed.global_state.client
        self._me, self._count = jax.process_index(), jax.process_count()
        self._lag, self._timeout_s = lag, timeout_s

    def gather(self, micro: int, stop: threading.Event | None = None, what: str = "rows"):
        """``build_inputs``' ``gather`` of micro-batch ``micro``: the dict over the global batch,
        every process's rows in process order (= global row order). Set ``stop`` to give up;
        ``what`` names the exchange (one key each per micro-batch)."""
        def gather(meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            buf = io.BytesIO()
            np.savez(buf, **meta)
            # A rewound loop lays the same micro-batch out again: the same rows, the same bytes.
            self._client.key_value_set_bytes(self._key(what, micro, self._me), buf.getvalue(), allow_overwrite=True)
            parts = [self._get(self._key(what, micro, p), stop) for p in range(self._count)]
            if micro >= self._lag:
                # Every process has read it by now: each step is a collective over all processes and
                # neither a producer nor the device runs more than lag micro-batches ahead of a step.
                self._client.key_value_delete(self._key(what, micro - self._lag, self._me))
            return {k: np.concatenate([p[k] for p in parts]) for k in meta}

        return gather

    @staticmethod
    def _key(what: str, micro: int, process: int) -> str:
        return f"omniret_jax/{what}/{micro}/{process}"

    def _get(self, key: str, stop: threading.Event | None) -> dict[str, np.ndarray]:
        deadline = time.monotonic() + self._timeout_s
        while True:  # short waits, so that a producer being closed is not stuck here
            try:
                return dict(np.load(io.BytesIO(self._client.blocking_key_value_get_bytes(key, 200))))
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise
            if stop is not None and stop.is_set():
                raise _Stopped()
            if time.monotonic() > deadline:
                raise TimeoutError(f"no row metadata {key!r} from another process within {self._timeout_s:.0f} s")


class _Stopped(Exception):
    """The producer was closed while it waited."""


@dataclasses.dataclass
class _Item:
    """One micro-batch ready for the step."""
    micro: int
    counter: int
    inputs: object       # TrainInputs, placed on the mesh
    data_state: dict     # pipeline state after this batch and the micro-batch count: what a checkpoint saves
    host_s: float        # pipeline + layout + transfer
    task: str | None = None  # the curriculum task of its update


@dataclasses.dataclass(frozen=True)
class _Tally:
    """Where the loop stands: updates done, micro-batches consumed, the (device) metrics of the
    update in progress and of the one just completed, non-finite micro-batches in a row and
    since the last log."""
    updates: int
    micro: int
    group: tuple = ()
    closed: tuple = ()
    bad_run: int = 0
    skipped: int = 0

    def finite(self, metrics, accumulate: int) -> _Tally:
        group = self.group + (metrics,)
        done = len(group) == accumulate
        return dataclasses.replace(self, updates=self.updates + done, micro=self.micro + 1,
                                   group=() if done else group, closed=group if done else (), bad_run=0)

    def nonfinite(self) -> _Tally:
        return dataclasses.replace(self, micro=self.micro + 1, closed=(), bad_run=self.bad_run + 1,
                                   skipped=self.skipped + 1)


def _schedule(tally: _Tally, accumulate: int, total: int):
    """(micro-batch, updates done before it) from ``tally`` on, every micro-batch assumed finite."""
    micro, updates, in_group = tally.micro, tally.updates, len(tally.group)
    while updates < total:
        yield micro, updates
        micro, in_group = micro + 1, in_group + 1
        if in_group == accumulate:
            updates, in_group = updates + 1, 0


class _Producer:
    """Micro-batches ``make(micro, updates, stop)`` in ``_schedule`` order. ``depth`` > 0: a thread
    builds them up to ``depth`` ahead of ``get`` (its exceptions are raised by ``get``, with their
    traceback); 0: ``get`` builds each one."""

    def __init__(self, make, tally: _Tally, accumulate: int, total: int, depth: int):
        self._make, self._depth = make, depth
        self._plan = _schedule(tally, accumulate, total)
        self._stop = threading.Event()
        if depth:
            self._queue: queue.Queue = queue.Queue(depth)
            self._thread = threading.Thread(target=self._run, name="omniret-input", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            for micro, updates in self._plan:
                if not self._put(self._make(micro, updates, self._stop)):
                    return
        except BaseException as e:  # noqa: BLE001 -- handed to the main thread
            if not self._stop.is_set():
                self._put(e)

    def _put(self, x) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def get(self) -> _Item:
        if not self._depth:
            return self._make(*next(self._plan), None)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stops the thread (it finishes the batch in hand) and drops what it had ready."""
        if self._depth:
            self._stop.set()
            self._thread.join()


@dataclasses.dataclass(frozen=True)
class GradCache:
    """How one micro-batch meets the step: whole (``chunks`` 1) or as ``chunks`` chunks of gradient
    caching (``step.CachedGrads``: every example is every other's negative, memory is
    one chunk's)."""
    chunks: int = 1

    @property
    def on(self) -> bool:
        return self.chunks > 1

    def device_inputs(self, host, mesh):
        """Host TrainInputs -> the step's inputs: global batch-first arrays on the mesh, or with
        caching the host's [chunks, chunk, ...] arrays (the device never holds the whole batch)."""
        if not self.on:
            return sharding.shard_batch(host, mesh)
        return chunked(host, self.chunks)   # stays on the host: CachedGrads places one chunk at a time


def grad_cache(c, mesh):
    """(config, GradCache) from train.contrastive_batch and train.chunk (configs/common.py): a
    non-zero contrastive batch becomes the micro-batch (train.batch_size of the returned copy).
    Raises naming the key for a combination the cached step cannot run."""
    t = c.train
    contrastive = int(t.get("contrastive_batch", 0) or t.batch_size)
    chunk = int(t.get("chunk", 0) or contrastive)
    if contrastive < 1 or chunk < 1:
        raise ValueError(f"train.contrastive_batch={contrastive} and train.chunk={chunk} must be >= 1 (0: the default)")
    if contrastive % chunk:
        raise ValueError(f"train.contrastive_batch={contrastive} is not a multiple of train.chunk={chunk}")
    if chunk < contrastive:
        try:
            sharding.batch_sharding(mesh, chunk)
        except ValueError as e:
            raise ValueError(f"train.chunk={chunk} must be a multiple of the data-parallel devices: {e}") from e
        if tuple(c.embed.pack):
            raise ValueError(f"gradient caching (train.chunk={chunk} < train.contrastive_batch={contrastive}) needs "
                             f"unpacked paths: set embed.pack=() (it is {tuple(c.embed.pack)})")
        if jax.process_count() > 1:
            raise ValueError(f"gradient caching (train.chunk={chunk} < train.contrastive_batch={contrastive}) runs "
                             f"in one process for now; {jax.process_count()} are running")
    if contrastive != t.batch_size:
        c = c.copy_and_resolve_references()
        c.train.batch_size = contrastive
    return c, GradCache(contrastive // chunk)


@dataclasses.dataclass
class Curriculum:
    """The Modality Pyramid in the loop (``omniret_jax.data.curriculum``): the schedule, the
    manifest's records by task (one input pipeline each), each task's loss (InfoNCE of its query
    path and document path) and probe subset, the prober."""
    schedule: cur.Schedule
    by_task: dict
    bad: list
    losses: dict
    subsets: dict
    prober: Prober | None = None

    @staticmethod
    def check(c, lcfg) -> tuple[cur.CurriculumConfig, dict]:
        """(settings, task table) of ``config.curriculum``, checked before any model is built."""
        ccfg = cur.CurriculumConfig(**{k: v for k, v in c.curriculum.to_dict().items() if k != "tasks"})
        table = cur.task_table(c.curriculum.tasks.to_dict())
        if lcfg.terms != ("L_A",) or lcfg.recipe != "paper":
            raise ValueError(f"the curriculum trains each task's InfoNCE of its query and document (loss.preset="
                             f"'pairwise', recipe 'paper'); got terms {lcfg.terms}, recipe {lcfg.recipe!r}")
        return ccfg, table

    @classmethod
    def start(cls, c, lcfg, manifest: Path) -> Curriculum:
        """Splits the manifest by task (the errors name the task), before any model is built."""
        ccfg, table = cls.check(c, lcfg)
        batch = int(c.train.batch_size)
        m = load_manifest(manifest, on_bad_record=c.data.on_bad_record)
        by_task = cur.split_by_task(m.records, table, batch)
        every = cur.probe_period(ccfg, by_task, batch, int(c.optim.accumulate))
        schedule = cur.Schedule(table, ccfg, seed=int(c.train.seed), total=int(c.train.steps), every=every)
        losses = {t: dataclasses.replace(lcfg, pairs=((k.spec.query, k.spec.document),),
                                         query_paths=k.spec.query_paths)
                  for t, k in table.items()}
        return cls(schedule, by_task, m.bad, losses, cur.probe_subsets(by_task, ccfg.probe_size, int(c.train.seed)))

    def probe(self, updates: int, trainable, writer: MetricsWriter) -> None:
        """Scores every task with the prober, records the probe, logs it and any task it unlocks;
        every probe record's margin goes to workdir/probes.jsonl (process 0)."""
        scores = self.prober(trainable)
        entry = self.schedule.record(updates, scores)
        writer.write(updates, self.schedule.log_metrics(entry, updates))
        writer.write_line(PROBES_FILE, {"update": updates, "tasks": {
            t: {"alignment": s["alignment"], "R@1": s["R@1"],
                "margins": {r.id: float(m) for r, m in zip(self.subsets[t], s["margins"])}}
            for t, s in scores.items()}})
        if entry["newly"] and jax.process_index() == 0:
            print(f"curriculum: after {updates} updates unlocked {', '.join(entry['newly'])}")


def train(c, workdir: Path, *, on_update=None) -> dict[str, float]:
    """Run the configured training; returns the last logged metrics. ``on_update(update,
    micro_batches)`` is called after every optimizer update is dispatched (again for an update a
    rewind repeats; benchmarks sample memory there)."""
    dc = c.distributed
    sharding.initialize_distributed(dc.coordinator_address or None, dc.num_processes or None,
                                    None if dc.process_id < 0 else dc.process_id)
    workdir.mkdir(parents=True, exist_ok=True)
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    plan = needed_views(lcfg)
    if not lcfg.terms:
        raise ValueError(f"preset {c.loss.preset!r} has no loss terms: evaluate the backbone with "
                         "omniret_jax.eval instead of training it")
    if c.get("curriculum") and c.curriculum.schedule:
        ccfg = Curriculum.check(c, lcfg)[0]
    else:
        ccfg = None
    if c.data.text_negative not in ("batch", "dataset"):
        raise ValueError(f"data.text_negative={c.data.text_negative!r}; expected 'batch' or 'dataset'")
    if c.data.text_negative == "dataset" and plan.negative and lcfg.tuple_similarity != "joint":
        raise ValueError("data.text_negative='dataset' needs loss.tuple_similarity='joint' (a dataset caption has "
                         "no text-path embedding in the batch)")
    accumulate, total = int(c.optim.accumulate), int(c.train.steps)
    if accumulate < 1 or total < 1:
        raise ValueError(f"optim.accumulate={accumulate} and train.steps={total} must be >= 1")
    depth, stop_every = int(c.train.prefetch), int(c.train.stop_every)
    if depth < 0 or stop_every < 1:
        raise ValueError(f"train.prefetch={depth} must be >= 0 and train.stop_every={stop_every} >= 1")
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    c, cache = grad_cache(c, mesh)
    sharding.batch_sharding(mesh, c.train.batch_size)  # fails early if the batch does not divide
    rows = sharding.process_rows(mesh, c.train.batch_size)
    local_rows = rows[1] - rows[0]
    if rows[0] != jax.process_index() * local_rows:
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows}: the processes' rows must follow "
                         "their process index (mesh devices ordered by process)")

    tasks = None if ccfg is None else Curriculum.start(c, lcfg, manifest_path(c, workdir))
    state = build.build_state(c, mesh, train=True, verbose=True)  # adapter dropout on
    graphdef, trainable, frozen, tokens = state.graphdef, state.trainable, state.frozen, state.tokens
    wrt = trainable_filter(state.lora)
    # The frozen-base prober scores the fresh adapters (the step donates these buffers: a copy).
    base = jax.tree.map(jnp.copy, trainable) if ccfg is not None and ccfg.prober == "base" else None

    tx = build.optimizer(c)
    schedule = lr_schedule(lr=c.optim.lr, total_updates=total, warmup_ratio=c.optim.warmup_ratio)
    param_sh, frozen_sh = state.trainable_shardings, state.frozen_shardings
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments follow their parameters (the axes metadata travels with them); counters are
    # replicated on the mesh, as the step returns them (else step 2 would compile again).
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)

    budget = caption_token_budget(ecfg)
    pcfg = pipeline_config(c, augment=bool(plan.aug), caption_tokens=budget)
    # The per-row token layouts of the step's views run in the data workers (with
    # data.num_workers > 0), not in this process; the hard-negative tuple's stays here.
    layout = lambda views: functools.partial(add_row_layouts, anchor=views.anchor, aug=views.aug,  # noqa: E731
                                             query=views.query, model_cfg=state.cfg, tokens=tokens, ecfg=ecfg)
    if tasks is None:
        pipeline = DataPipeline(str(manifest_path(c, workdir)), pcfg, tokens=tokens, rows=rows, layout=layout(plan))
    else:
        pipeline = cur.TaskPipelines(tasks.by_task, pcfg, tokens=tokens, rows=rows, bad=tasks.bad,
                                     layouts={t: layout(needed_views(loss)) for t, loss in tasks.losses.items()},
                                     query_clips=[t for t, loss in tasks.losses.items() if loss.query_paths])
        tasks.prober = Prober(state, c, mesh, tasks.schedule.tasks, tasks.subsets, wrt=wrt, base=base is not None,
                              progress=jax.process_index() == 0)
    if jax.process_index() == 0:
        print(f"inputs: {'/'.join(map(str, pcfg.patch_bucket_sizes))} patch rows per clip, captions up to {budget} tokens "
              f"({c.data.on_long_caption} beyond), global micro-batch {c.train.batch_size} x {accumulate} "
              f"accumulated = {c.train.batch_size * accumulate} per update, {jax.process_count()} process(es)"
              + (f", gradient caching: {cache.chunks} chunks of {c.train.batch_size // cache.chunks}" if cache.on else ""))
        if pipeline.bad_records:
            bad = pipeline.bad_records
            shown = "; ".join(f"line {b.line}: {b.message}" for b in bad[:5])
            logging.warning("%d manifest line(s) left out (data.on_bad_record=skip): %s%s", len(bad), shown,
                            " ..." if len(bad) > 5 else "")
    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=c.train.keep, save_every=c.train.ckpt_every,
                             config=c.to_dict())
    ckpt.install_sigterm_handler()
    updates = micro = 0
    try:
        saved = ckpt.read_meta()["config"] if ckpt.all_steps() else None
    except CheckpointError:
        saved = None   # an unusable newest step: restore_latest moves it aside and falls back
    if saved is not None:
        build.check_layer_layout(saved, c, f"the run in {workdir}")
    restored = ckpt.restore_latest(trainable, opt_state)
    if restored is not None:
        trainable, opt_state, updates = restored.trainables, restored.opt_state, restored.step
        if restored.data_state is not None:
            pipeline.set_state(restored.data_state["pipeline"])
            micro = int(restored.data_state["micro_batches"])
            if tasks is not None:
                if "curriculum" not in restored.data_state:
                    raise ValueError(f"checkpoint step {updates} was trained without a curriculum; this config has one")
                tasks.schedule.set_state(restored.data_state["curriculum"])
        if jax.process_index() == 0:
            print(f"resumed from update {updates} (micro-batch {micro})")

    step_cfgs = {None: StepConfig(ecfg=ecfg, loss=lcfg)}
    if tasks is not None:   # one step per task: its query <-> document InfoNCE
        step_cfgs = {t: StepConfig(ecfg=ecfg, loss=loss) for t, loss in tasks.losses.items()}
    seed = int(c.train.seed)

    def dropout_key(micro_index):
        # Adapter dropout of micro-batch m draws from fold_in(key(seed), m): a resumed run draws the same masks.
        return jax.random.fold_in(jax.random.key(seed), micro_index)

    def finish(params, opt, loss, metrics, grads, micro_index, bad):
        new_params, new_opt, metrics = apply_update(params, opt, grads, loss, metrics, tx)
        # bad: the first non-finite micro-batch since the host last read (-1: none). The loop rewinds
        # to it, so a later step (laid out assuming it finite) must change nothing.
        stale = bad >= 0
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(stale, o, n), new, old)  # noqa: E731
        bad = jnp.where(stale, bad, jnp.where(metrics["skipped"] > 0, micro_index, -1))
        return keep(new_params, params), keep(new_opt, opt), metrics, bad

    def step_fn(params, frozen_state, opt, inputs, micro_index, counter, bad, *, step_cfg):
        loss, metrics, grads = loss_and_grads(graphdef, params, frozen_state, inputs, counter, dropout_key(micro_index),
                                              wrt=wrt, cfg=step_cfg)
        return finish(params, opt, loss, metrics, grads, micro_index, bad)

    def make_step(inputs, step_cfg):
        """The jitted step of ``step_cfg`` for inputs like these (placed; with gradient caching,
        host chunks that ``CachedGrads`` places one at a time)."""
        outs = (param_sh, opt_sh, replicated, replicated)
        if not cache.on:
            in_sh = jax.tree.map(lambda x: x.sharding, inputs)
            return jax.jit(functools.partial(step_fn, step_cfg=step_cfg), in_shardings=(param_sh, frozen_sh, opt_sh, in_sh) + (replicated,) * 3,
                           out_shardings=outs, donate_argnums=(0, 2))
        grads_of = CachedGrads(graphdef, cfg=step_cfg, place=lambda x: sharding.shard_batch(x, mesh))
        done = jax.jit(finish, out_shardings=outs, donate_argnums=(0, 1))

        def cached_step(params, frozen_state, opt, inputs, micro_index, counter, bad):
            loss, metrics, grads = grads_of.loss_and_grads(params, frozen_state, inputs, counter,
                                                           dropout_key(micro_index))
            return done(params, opt, loss, metrics, grads, micro_index, bad)

        return cached_step

    exchange = RowExchange(lag=depth + 8) if jax.process_count() > 1 else None

    def make_item(micro: int, updates_done: int, stop) -> _Item:
        t0 = time.perf_counter()
        # Every micro-batch of an update comes from the update's task (waits for the probe it needs).
        task = None if tasks is None else tasks.schedule.task_for(updates_done, stop)
        batch = next(pipeline) if task is None else pipeline.next(task)
        data_state = {"pipeline": pipeline.get_state(), "micro_batches": micro + 1}
        counter = rotation_count(lcfg, micro, updates_done)
        batch = cut_patches(batch, pcfg.patch_bucket_sizes,
                            gather=None if exchange is None else exchange.gather(micro, stop, "patches"))
        views = plan if task is None else needed_views(tasks.losses[task])
        if any("I" in p for p in views.anchor):   # the image query: the clip's still frame
            batch = still_frames(batch, state.cfg.vision)
        host = build_inputs(batch, micro, state.cfg, tokens, ecfg, views, seed=seed, counter=counter,
                            text_negative=c.data.text_negative, row_offset=rows[0],
                            gather=None if exchange is None else exchange.gather(micro, stop), neg_towers=cache.on)
        inputs = cache.device_inputs(host, mesh)
        return _Item(micro, counter, inputs, data_state, time.perf_counter() - t0, task)

    def no_bad():
        return sharding.replicated(np.int32(-1), mesh)

    jitted: dict = {}   # the step of each task (None: no curriculum), compiled on first use
    writer = MetricsWriter(workdir)
    last: dict[str, float] = {}
    tally = _Tally(updates, micro)
    window: list[float] = []                # seconds per update since the last log
    host_s: list[float] = []                # producer seconds per micro-batch since the last log
    device_s: list[float] = []              # seconds of a step started on an idle device, since the last log
    bar = tqdm(total=total, initial=updates, desc="train", unit="update", disable=jax.process_index() != 0)
    summary_state = None
    if tasks is not None and tasks.schedule.due(updates):
        tasks.probe(updates, trainable if base is None else base, writer)
    producer = _Producer(make_item, tally, accumulate, total, depth)
    try:
        bad = no_bad()
        # Dispatched since the last read: (tally before it, micro-batch, data state, metrics).
        pending: list[tuple[_Tally, int, dict, dict]] = []
        in_flight: collections.deque = collections.deque()
        idle, read_next, stopping = True, False, False
        t_mark = time.perf_counter()
        while tally.updates < total:
            item = producer.get()
            host_s.append(item.host_s)
            timed = idle and item.task in jitted    # (the first call compiles)
            if item.task not in jitted:
                jitted[item.task] = make_step(item.inputs, step_cfgs[item.task])
            t0 = time.perf_counter()
            trainable, opt_state, metrics, bad = jitted[item.task](
                trainable, frozen, opt_state, item.inputs, sharding.replicated(np.int32(item.micro), mesh),
                sharding.replicated(np.int32(item.counter), mesh), bad)
            if timed:
                bad.block_until_ready()   # a wait, not a transfer
                device_s.append(time.perf_counter() - t0)
            idle = False
            in_flight.append(bad)
            if len(in_flight) > 2:        # at most two steps queued behind the running one
                in_flight.popleft().block_until_ready()
            pending.append((tally, item.micro, item.data_state, metrics))
            tally = tally.finite(metrics, accumulate)   # until a read says otherwise
            done = bool(tally.closed)
            if done:
                now = time.perf_counter()
                window.append(now - t_mark)
                t_mark = now
                bar.update(1)
                if on_update is not None:
                    on_update(tally.updates, tally.micro)
            log = done and (tally.updates % c.train.log_every == 0 or tally.updates == total)
            save = done and (tally.updates == total or ckpt.should_save(tally.updates))
            stop = done and (stopping or tally.updates % stop_every == 0) and ckpt.should_stop()
            probing = done and tasks is not None and tasks.schedule.due(tally.updates)
            if not (depth == 0 or read_next or log or save or stop or probing):
                continue
            # ---- read: every micro-batch since the last read finite?
            first_bad = int(_fetch(bad))
            idle, read_next = True, False
            in_flight.clear()
            if first_bad >= 0:
                before, _, bad_state, bad_metrics = pending[first_bad - pending[0][1]]
                tally = before.nonfinite()
                logging.warning("micro-batch %d (update %d): non-finite loss %s or gradient; skipped", first_bad,
                                tally.updates, float(_fetch(bad_metrics["loss"])))
                if tally.bad_run > c.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{tally.bad_run} consecutive steps with non-finite loss or gradients (limit "
                        f"train.max_nonfinite={c.train.max_nonfinite}); stopping without saving the diverged state")
                # Rewind to just after it: what was laid out since assumed it finite.
                producer.close()
                if depth:
                    pipeline.set_state(bad_state["pipeline"])
                producer = _Producer(make_item, tally, accumulate, total, depth)
                summary_state = bad_state["pipeline"]
                pending.clear()
                bad, read_next, stopping = no_bad(), True, stopping or stop
                bar.n = tally.updates
                bar.refresh()
                continue
            pending.clear()
            summary_state = item.data_state["pipeline"]
            if not done:
                continue
            # ---- one optimizer update is complete, and every micro-batch before it is confirmed
            if log:
                dt = float(np.median(window))
                values = _fetch(list(tally.closed))   # the update's metrics, one transfer
                last = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
                last.update(skipped=float(tally.skipped), lr=float(schedule(tally.updates - 1)),
                            micro_batches=float(tally.micro), step_time_s=dt,
                            examples_per_s=c.train.batch_size * accumulate / dt, host_s=statistics.median(host_s),
                            **({"device_s": statistics.median(device_s)} if device_s else {}),
                            **pipeline.summary(summary_state).metrics(),
                            **({} if tasks is None else {f"curriculum/{t}/updates": float(n) for t, n in
                                                         tasks.schedule.counts(tally.updates).items()}))
                writer.write(tally.updates, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", step_s=f"{dt:.2f}")
                window.clear()
                host_s.clear()
                device_s.clear()
                tally = dataclasses.replace(tally, skipped=0)
            if probing:   # before the save, which then holds it
                tasks.probe(tally.updates, trainable if base is None else base, writer)
            if save or stop:
                data_state = item.data_state if tasks is None else dict(item.data_state,
                                                                        curriculum=tasks.schedule.state())
                ckpt.save(tally.updates, trainable, opt_state, rng=jax.random.key(seed), data_state=data_state,
                          metrics=last, force=tally.updates == total or stop)
            if stop:
                if jax.process_index() == 0:
                    print(f"stop requested: saved update {tally.updates}, exiting")
                break
        summary = pipeline.summary(summary_state)
    finally:
        producer.close()
        bar.close()
        writer.close()
        ckpt.close()
        pipeline.close()
    if summary.metrics() and jax.process_index() == 0:
        print(f"data summary (process 0's rows): {summary}")
    return last


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    train(flags.FLAGS.config, Path(flags.FLAGS.workdir))


if __name__ == "__main__":
    define_config_flag()
    flags.DEFINE_string("workdir", None, "checkpoints, metrics and the synthetic corpus go here")
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
