"""``python -m omniret_jax.train --config configs/<x>.py --workdir DIR [--config.<key>=<value>]``.

One readable loop: the model factory (``omniret_jax.build``) builds or loads the WAVE
model with LoRA, split once into trainable / frozen state placed on the mesh; then
step: host-side token layout -> jitted pure step -> metrics (progress bar, JSONL,
TensorBoard) -> checkpoint. Resumes from the newest good checkpoint in the workdir; SIGTERM
saves and exits 0.
"""

from __future__ import annotations

import json
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
from omniret_jax.checkpoint import TrainCheckpointer
from omniret_jax.data.batch import build_inputs
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.losses import needed_views
from omniret_jax.model.lora import trainable_filter
from omniret_jax.step import StepConfig, train_step



def build_pipeline(c, workdir: Path, *, augment: bool) -> DataPipeline:
    manifest = c.data.manifest
    if not manifest:
        corpus = workdir / "corpus"
        manifest = corpus / "manifest.jsonl"
        if not manifest.exists() and jax.process_index() == 0:
            from omniret_jax.data.synth import SynthSettings, generate

            generate(str(corpus), c.data.synth_n, seed=c.data.synth_seed,
                     settings=SynthSettings(seconds=c.data.synth_seconds, size=c.data.synth_size))
    pcfg = PipelineConfig(
        batch_size=c.train.batch_size // jax.process_count(), seed=c.train.seed, num_frames=c.data.num_frames,
        min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels, audio_seconds=c.data.audio_seconds,
        audio_mode=c.data.audio_mode, on_missing_audio=c.data.on_missing_audio,
        max_caption_chars=c.data.max_caption_chars, augment=augment, num_workers=c.data.num_workers)
    return DataPipeline(str(manifest), pcfg, process_index=jax.process_index(), process_count=jax.process_count())


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


def train(c, workdir: Path) -> dict[str, float]:
    """Run the configured training; returns the last logged metrics."""
    dc = c.distributed
    sharding.initialize_distributed(dc.coordinator_address or None, dc.num_processes or None,
                                    None if dc.process_id < 0 else dc.process_id)
    workdir.mkdir(parents=True, exist_ok=True)
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    plan = needed_views(lcfg)
    if not lcfg.terms:
        raise ValueError(f"preset {c.loss.preset!r} has no loss terms: evaluate the backbone with "
                         "omniret_jax.eval instead of training it")
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    sharding.batch_sharding(mesh, c.train.batch_size)  # fails early if the batch does not divide

    state = build.build_state(c, mesh, train=True, verbose=True)  # adapter dropout on
    graphdef, trainable, frozen, tokens = state.graphdef, state.trainable, state.frozen, state.tokens
    wrt = trainable_filter(state.lora)

    tx = build.optimizer(c)
    param_sh, frozen_sh = state.trainable_shardings, state.frozen_shardings
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments follow their parameters (the axes metadata travels with them); counters are
    # replicated on the mesh, as the step returns them (else step 2 would compile again).
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)

    pipeline = build_pipeline(c, workdir, augment=bool(plan.aug))
    ckpt = TrainCheckpointer(workdir / "checkpoints", keep=c.train.keep, save_every=c.train.ckpt_every,
                             config=c.to_dict())
    ckpt.install_sigterm_handler()
    base_key = jax.random.key(c.train.seed)
    start = 0
    restored = ckpt.restore_latest(trainable, opt_state)
    if restored is not None:
        trainable, opt_state, start = restored.trainables, restored.opt_state, restored.step
        if restored.data_state is not None:
            pipeline.set_state(restored.data_state)
        print(f"resumed from step {start}")

    step_cfg = StepConfig(ecfg=ecfg, loss=lcfg)

    def step_fn(params, frozen_state, opt, inputs, step, dropout_key):
        return train_step(graphdef, params, frozen_state, opt, inputs, step, dropout_key, wrt=wrt, tx=tx,
                          cfg=step_cfg)

    jitted = None
    writer = MetricsWriter(workdir)
    last: dict[str, float] = {}
    consecutive_bad = 0
    bar = tqdm(total=c.train.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    window: list[float] = []
    try:
        for step in range(start, c.train.steps):
            t0 = time.perf_counter()
            batch = next(pipeline)
            host = build_inputs(batch, step, state.cfg, tokens, ecfg, plan, seed=c.train.seed)
            inputs = sharding.shard_batch(host, mesh)  # every input leaf is batch-first
            in_sh = jax.tree.map(lambda x: x.sharding, inputs)
            if jitted is None:
                jitted = jax.jit(step_fn, in_shardings=(param_sh, frozen_sh, opt_sh, in_sh, replicated, replicated),
                                 out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 2))
            trainable, opt_state, metrics = jitted(trainable, frozen, opt_state, inputs, jnp.int32(step),
                                                   jax.random.fold_in(base_key, step))
            skipped = int(metrics["skipped"])
            consecutive_bad = consecutive_bad + 1 if skipped else 0
            if consecutive_bad > c.train.max_nonfinite:
                raise FloatingPointError(f"{consecutive_bad} consecutive steps with non-finite loss or gradients "
                                         f"(limit train.max_nonfinite={c.train.max_nonfinite}); stopping without "
                                         "saving the diverged state")
            window.append(time.perf_counter() - t0)
            bar.update(1)
            done = step + 1
            if done % c.train.log_every == 0 or done == c.train.steps:
                dt = float(np.median(window))
                last = {k: float(v) for k, v in metrics.items()}
                last.update(step_time_s=dt, examples_per_s=c.train.batch_size / dt,
                            **pipeline.summary().metrics())
                writer.write(done, last)
                bar.set_postfix(loss=f"{last['loss']:.4f}", step_s=f"{dt:.2f}", ex_s=f"{last['examples_per_s']:.1f}")
                window.clear()
            if skipped == 0:
                ckpt.save(done, trainable, opt_state, rng=base_key, data_state=pipeline.get_state(),
                          metrics=last, force=done == c.train.steps)
            if ckpt.should_stop():
                ckpt.save(done, trainable, opt_state, rng=base_key, data_state=pipeline.get_state(),
                          metrics=last, force=True)
                print(f"stop requested: saved step {done}, exiting")
                break
    finally:
        bar.close()
        writer.close()
        ckpt.close()
        pipeline.close()
    summary = pipeline.summary()
    if summary.metrics():
        print(f"data summary: {summary}")
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
