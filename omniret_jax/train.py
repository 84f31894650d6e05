"""``python -m omniret_jax.train --config configs/<x>.py --workdir DIR [--config.<key>=<value>]``.

One readable loop: the model factory (``omniret_jax.build``) builds or loads the WAVE
model with LoRA, split once into trainable / frozen state placed on the mesh; then per
micro-batch: host-side token layout -> jitted pure step -> and at each optimizer update
(``optim.accumulate`` micro-batches) metrics (progress bar, JSONL, TensorBoard) and
checkpoint. Resumes from the newest good checkpoint in the workdir; SIGTERM saves at the next
update and exits 0.

Counting: ``train.steps``, ``log_every`` and ``ckpt_every`` count optimizer updates (the
learning-rate schedule's unit); the loop runs ``steps x accumulate`` micro-batches of
``train.batch_size`` samples (more when a non-finite micro-batch is skipped: it does not count
towards its update). Checkpoints are taken at update boundaries only, holding the update
count, the micro-batch count and the pipeline state, so a resumed run continues bitwise.

Gradient caching (``train.contrastive_batch`` > ``train.chunk``, ``grad_cache``): the micro-batch
is the contrastive batch, every example the others' negative, embedded chunk by chunk
(``step.cached_loss_and_grads``) with the activation memory of one chunk.

Several processes (``--config.distributed.*``, or a cluster jax.distributed detects): each
reads its rows of every global batch, lays them out, and exchanges the small per-row metadata
the hard negatives need; the arrays on the devices are global, so the step is the same program
as on one process with as many devices.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from omniret_jax import build, sharding
from omniret_jax.build import define_config_flag
from omniret_jax.checkpoint import TrainCheckpointer
from omniret_jax.data.batch import build_inputs, caption_token_budget, chunked
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.losses import needed_views
from omniret_jax.model.lora import trainable_filter
from omniret_jax.step import StepConfig, lr_schedule, train_step


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
        from omniret_jax.data.synth import SynthSettings, generate

        generate(str(corpus), c.data.synth_n, seed=c.data.synth_seed,
                 settings=SynthSettings(seconds=c.data.synth_seconds, size=c.data.synth_size))
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
        num_workers=d.num_workers)


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events in the workdir (process 0 only)."""

    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.file = open(workdir / "metrics.jsonl", "a")
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

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


def _host_scalars(metrics) -> dict[str, float]:
    """Replicated scalar metrics as Python floats, read from this process's own copy (works
    with several processes, where a global array cannot be fetched whole)."""
    local = jax.device_get({k: v.addressable_data(0) for k, v in metrics.items()})  # one transfer
    return {k: float(v) for k, v in local.items()}


def rotation_count(loss_cfg, micro_batch: int, update: int) -> int:
    """What the hard-negative slot and the released pair rotation count for this micro-batch:
    the optimizer update (paper: "cycles with the step") or the micro-batch (released code)."""
    return micro_batch if loss_cfg.counter == "micro_batch" else update


def gather_rows(meta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every process's per-row metadata, concatenated in process order (= global row order)."""
    from jax.experimental import multihost_utils

    return {k: np.asarray(v) for k, v in multihost_utils.process_allgather(meta, tiled=True).items()}


@dataclasses.dataclass(frozen=True)
class GradCache:
    """How one micro-batch meets the step: whole (``chunks`` 1) or as ``chunks`` chunks of gradient
    caching (``step.cached_loss_and_grads``: every example is every other's negative, memory is
    one chunk's)."""
    chunks: int = 1

    @property
    def on(self) -> bool:
        return self.chunks > 1

    def device_inputs(self, host, mesh):
        """Host TrainInputs -> the step's global arrays: batch-first, or [chunks, chunk, ...]
        sharded on axis 1 (each device holds its rows of every chunk)."""
        if not self.on:
            return sharding.shard_batch(host, mesh)
        return sharding.shard_batch(chunked(host, self.chunks), mesh, batch_axis=1)


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


def train(c, workdir: Path, *, on_update=None) -> dict[str, float]:
    """Run the configured training; returns the last logged metrics. ``on_update(update,
    micro_batches)`` is called after every optimizer update (benchmarks sample memory there)."""
    dc = c.distributed
    sharding.initialize_distributed(dc.coordinator_address or None, dc.num_processes or None,
                                    None if dc.process_id < 0 else dc.process_id)
    workdir.mkdir(parents=True, exist_ok=True)
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    plan = needed_views(lcfg)
    if not lcfg.terms:
        raise ValueError(f"preset {c.loss.preset!r} has no loss terms: evaluate the backbone with "
                         "omniret_jax.eval instead of training it")
    if c.data.text_negative not in ("batch", "dataset"):
        raise ValueError(f"data.text_negative={c.data.text_negative!r}; expected 'batch' or 'dataset'")
    if c.data.text_negative == "dataset" and plan.negative and lcfg.tuple_similarity != "joint":
        raise ValueError("data.text_negative='dataset' needs loss.tuple_similarity='joint' (a dataset caption has "
                         "no text-path embedding in the batch)")
    accumulate, total = int(c.optim.accumulate), int(c.train.steps)
    if accumulate < 1 or total < 1:
        raise ValueError(f"optim.accumulate={accumulate} and train.steps={total} must be >= 1")
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    c, cache = grad_cache(c, mesh)
    sharding.batch_sharding(mesh, c.train.batch_size)  # fails early if the batch does not divide
    rows = sharding.process_rows(mesh, c.train.batch_size)
    local_rows = rows[1] - rows[0]
    if rows[0] != jax.process_index() * local_rows:
        raise ValueError(f"process {jax.process_index()} holds batch rows {rows}: the processes' rows must follow "
                         "their process index (mesh devices ordered by process)")

    state = build.build_state(c, mesh, train=True, verbose=True)  # adapter dropout on
    graphdef, trainable, frozen, tokens = state.graphdef, state.trainable, state.frozen, state.tokens
    wrt = trainable_filter(state.lora)

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
    pipeline = DataPipeline(str(manifest_path(c, workdir)), pcfg, tokens=tokens, rows=rows)
    if jax.process_index() == 0:
        print(f"inputs: {pcfg.num_patches} patch rows per clip, captions up to {budget} tokens "
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
    restored = ckpt.restore_latest(trainable, opt_state)
    if restored is not None:
        trainable, opt_state, updates = restored.trainables, restored.opt_state, restored.step
        if restored.data_state is not None:
            pipeline.set_state(restored.data_state["pipeline"])
            micro = int(restored.data_state["micro_batches"])
        if jax.process_index() == 0:
            print(f"resumed from update {updates} (micro-batch {micro})")

    step_cfg = StepConfig(ecfg=ecfg, loss=lcfg)
    seed = int(c.train.seed)

    def step_fn(params, frozen_state, opt, inputs, micro_index, counter):
        # Adapter dropout of micro-batch m draws from fold_in(key(seed), m): a resumed run draws the same masks.
        key = jax.random.fold_in(jax.random.key(seed), micro_index)
        return train_step(graphdef, params, frozen_state, opt, inputs, counter, key, wrt=wrt, tx=tx, cfg=step_cfg,
                          cached=cache.on)

    gather = gather_rows if jax.process_count() > 1 else None
    jitted = None
    writer = MetricsWriter(workdir)
    last: dict[str, float] = {}
    group: list[dict[str, float]] = []      # metrics of the micro-batches of the update in progress
    consecutive_bad = skipped_since_log = 0
    window: list[float] = []                # seconds per update since the last log
    t_update = 0.0
    bar = tqdm(total=total, initial=updates, desc="train", unit="update", disable=jax.process_index() != 0)
    summary = None
    try:
        while updates < total:
            t0 = time.perf_counter()
            batch = next(pipeline)
            counter = rotation_count(lcfg, micro, updates)
            host = build_inputs(batch, micro, state.cfg, tokens, ecfg, plan, seed=seed, counter=counter,
                                text_negative=c.data.text_negative, gather=gather, row_offset=rows[0],
                                neg_towers=cache.on)
            inputs = cache.device_inputs(host, mesh)
            if jitted is None:
                in_sh = jax.tree.map(lambda x: x.sharding, inputs)
                jitted = jax.jit(step_fn, in_shardings=(param_sh, frozen_sh, opt_sh, in_sh, replicated, replicated),
                                 out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 2))
            trainable, opt_state, metrics = jitted(trainable, frozen, opt_state, inputs,
                                                   sharding.replicated(np.int32(micro), mesh),
                                                   sharding.replicated(np.int32(counter), mesh))
            del batch, host, inputs
            m = _host_scalars(metrics)
            micro += 1
            t_update += time.perf_counter() - t0
            if m["skipped"]:
                consecutive_bad += 1
                skipped_since_log += 1
                logging.warning("micro-batch %d (update %d): non-finite loss %s or gradient; skipped", micro - 1,
                                updates, m["loss"])
                if consecutive_bad > c.train.max_nonfinite:
                    raise FloatingPointError(
                        f"{consecutive_bad} consecutive steps with non-finite loss or gradients (limit "
                        f"train.max_nonfinite={c.train.max_nonfinite}); stopping without saving the diverged state")
                continue
            consecutive_bad = 0
            group.append(m)
            if len(group) < accumulate:
                continue
            # ---- one optimizer update is complete
            lr = float(schedule(updates))
            updates += 1
            window.append(t_update)
            t_update = 0.0
            bar.update(1)
            if updates % c.train.log_every == 0 or updates == total:
                dt = float(np.median(window))
                last = {k: float(np.mean([g[k] for g in group])) for k in group[0]}
                last.update(skipped=float(skipped_since_log), lr=lr, micro_batches=float(micro), step_time_s=dt,
                            examples_per_s=c.train.batch_size * accumulate / dt, **pipeline.summary().metrics())
                writer.write(updates, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", step_s=f"{dt:.2f}")
                window.clear()
                skipped_since_log = 0
            group.clear()
            if on_update is not None:
                on_update(updates, micro)
            data_state = {"pipeline": pipeline.get_state(), "micro_batches": micro}
            ckpt.save(updates, trainable, opt_state, rng=jax.random.key(seed), data_state=data_state,
                      metrics=last, force=updates == total)
            if ckpt.should_stop():
                ckpt.save(updates, trainable, opt_state, rng=jax.random.key(seed), data_state=data_state,
                          metrics=last, force=True)
                if jax.process_index() == 0:
                    print(f"stop requested: saved update {updates}, exiting")
                break
        summary = pipeline.summary()
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        pipeline.close()
    if summary is not None and summary.metrics() and jax.process_index() == 0:
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
