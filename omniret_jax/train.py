"""``python -m omniret_jax.train --config configs/<x>.py --workdir DIR [--config.<key>=<value>]``.

One readable loop: build (or load) the WAVE model, attach LoRA, split once into
trainable / frozen state, shard both over the mesh, then step: host-side token
layout -> jitted pure step -> metrics (progress bar, JSONL, TensorBoard) ->
checkpoint. Resumes from the newest good checkpoint in the workdir; SIGTERM
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
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import config_flags
from tqdm.auto import tqdm

from omniret_jax import sharding
from omniret_jax.checkpoint import CheckpointError, TrainCheckpointer
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.losses import LossConfig
from omniret_jax.model.beats import BEATsConfig
from omniret_jax.model.config import AudioConfig, TextConfig, ThinkerConfig, VisionConfig, dtype_from_name
from omniret_jax.model.embedder import EmbedConfig, Tokens
from omniret_jax.model.lora import LoRAConfig, apply_lora, trainable_filter
from omniret_jax.model.text import remat_name
from omniret_jax.model.wave import WAVE
from omniret_jax.step import StepConfig, build_inputs, make_optimizer, train_step



def define_config_flag() -> None:
    """``--config`` (a configs/*.py file, optionally ``:preset``) with ``--config.<key>=<value>`` overrides."""
    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally :preset)")

# Special token ids of the random-init tiny model (its vocabulary is bytes + these).
TINY_IDS = dict(audio_token_id=300, image_token_id=301, video_token_id=302, audio_start_token_id=303,
                audio_end_token_id=304, vision_start_token_id=305, vision_end_token_id=306)
TINY_IM_END, TINY_PAD = 307, 0


def byte_tokens() -> Tokens:
    """Tokenizer of the tiny model: UTF-8 bytes shifted by one (0 is padding)."""
    return Tokens(encode=lambda s: [b + 1 for b in s.encode()], im_end_id=TINY_IM_END, pad_id=TINY_PAD)


def tiny_model(c, rngs: nnx.Rngs) -> WAVE:
    t = c.model.tiny
    cfg = ThinkerConfig(
        text=TextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                        num_key_value_heads=t.num_key_value_heads, mrope_section=tuple(t.mrope_section)),
        vision=VisionConfig(depth=t.vision_depth, hidden_size=t.vision_hidden_size,
                            intermediate_size=t.vision_intermediate_size, num_heads=t.vision_num_heads,
                            out_hidden_size=t.hidden_size,
                            fullatt_block_indexes=tuple(t.vision_fullatt_block_indexes)),
        audio=AudioConfig(encoder_layers=t.audio_layers, d_model=t.audio_d_model, encoder_attention_heads=t.audio_heads,
                          encoder_ffn_dim=t.audio_ffn, output_dim=t.hidden_size),
        dtype=dtype_from_name(c.model.dtype), param_dtype=dtype_from_name(c.model.param_dtype), **TINY_IDS)
    beats = BEATsConfig(encoder_layers=t.beats_layers, encoder_embed_dim=t.beats_dim,
                        encoder_attention_heads=t.beats_heads, encoder_ffn_embed_dim=t.beats_ffn,
                        embed_dim=t.beats_patch_dim, conv_pos=t.beats_conv_pos,
                        conv_pos_groups=t.beats_conv_pos_groups, num_buckets=t.beats_buckets,
                        max_distance=t.beats_max_distance)
    return WAVE(cfg, beats, rngs=rngs, remat=c.model.remat)


def build_model(c) -> tuple[WAVE, Tokens]:
    if c.model.init == "random":
        return tiny_model(c, nnx.Rngs(params=c.model.seed)), byte_tokens()
    if c.model.init != "checkpoint":
        raise ValueError(f"config.model.init={c.model.init!r}: expected 'checkpoint' or 'random'")
    if not c.model.checkpoint:
        raise ValueError("config.model.checkpoint is empty: point it at a WAVE-7B (or Qwen2.5-Omni) directory")
    from omniret_jax.convert.to_flax import load_wave

    model, _ = load_wave(c.model.checkpoint, beats_checkpoint=c.model.beats_checkpoint or None,
                         dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                         init_missing_heads=c.model.init_missing_heads, seed=c.model.seed)
    model.language_model.remat = remat_name(c.model.remat)
    return model, Tokens.from_pretrained(c.model.tokenizer or c.model.checkpoint)


def lora_config(c) -> LoRAConfig:
    return LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout)


def restore_trained(c, checkpoint_dir: str | Path, step: int | None = None) -> tuple[WAVE, Tokens, int]:
    """The config's model in eval mode with LoRA attached and the trainables (adapters + heads)
    of a training checkpoint directory (``<workdir>/checkpoints``) restored; ``step`` None takes
    the newest. Frozen weights come from the config: the checkpoint holds only what training
    changed. Returns (model, tokens, restored step)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    model, tokens = build_model(c)
    lora = lora_config(c)
    apply_lora(model, lora, nnx.Rngs(params=c.model.seed + 1, dropout=c.model.seed + 2))
    model.eval()
    _, trainable, _ = nnx.split(model, trainable_filter(lora), ...)
    ckpt = TrainCheckpointer(checkpoint_dir, keep=c.train.keep, save_every=c.train.ckpt_every)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint step in {checkpoint_dir}")
        restored = ckpt.restore(steps[-1] if step is None else step, trainable)
    finally:
        ckpt.close()
    nnx.update(model, restored.trainables)
    saved, given = restored.config, json.loads(json.dumps(c.to_dict()))
    drift = [f"{section}.{k}" for section in ("model", "lora") for k in sorted(given.get(section, {}))
             if k in saved.get(section, {}) and saved[section][k] != given[section][k]]
    if drift:
        logging.warning("config differs from the one step %d was trained with: %s", restored.step,
                        ", ".join(drift))
    return model, tokens, restored.step


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


def loss_config(c) -> LossConfig:
    return LossConfig.from_preset(
        c.loss.preset, recipe=c.loss.recipe, l_A=c.loss.l_A, l_D=c.loss.l_D, l_T=c.loss.l_T,
        temperature=c.loss.temperature, tuple_similarity=c.loss.tuple_similarity,
        hard_negative_pool=c.loss.hard_negative_pool or None)


def embed_config(c) -> EmbedConfig:
    return EmbedConfig(**c.embed.to_dict())


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
    lcfg, ecfg = loss_config(c), embed_config(c)
    if not lcfg.terms:
        raise ValueError(f"preset {c.loss.preset!r} has no loss terms: evaluate the backbone with "
                         "omniret_jax.eval instead of training it")
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    sharding.batch_sharding(mesh, c.train.batch_size)  # fails early if the batch does not divide

    model, tokens = build_model(c)
    lora = lora_config(c)
    apply_lora(model, lora, nnx.Rngs(params=c.model.seed + 1, dropout=c.model.seed + 2))
    model.train()  # adapter dropout on
    wrt = trainable_filter(lora)
    graphdef, trainable, frozen = nnx.split(model, wrt, ...)
    frozen_dtype = dtype_from_name(c.model.frozen_dtype)
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, frozen)
    for fb in sharding.sharding_fallbacks(trainable, mesh) + sharding.sharding_fallbacks(frozen, mesh):
        print(f"sharding: {fb}")
    trainable, frozen = sharding.shard_state(trainable, mesh), sharding.shard_state(frozen, mesh)

    tx = make_optimizer(lr=c.optim.lr, total_steps=c.train.steps, warmup_ratio=c.optim.warmup_ratio,
                        weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm,
                        accumulate=c.optim.accumulate)
    param_sh = sharding.state_shardings(trainable, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Moments follow their parameters (the axes metadata travels with them); counters are
    # replicated on the mesh, as the step returns them (else step 2 would compile again).
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    frozen_sh = sharding.state_shardings(frozen, mesh)

    pipeline = build_pipeline(c, workdir, augment="L_T" in lcfg.terms)
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
            host = build_inputs(batch, step, model.cfg, tokens, ecfg, lcfg, seed=c.train.seed)
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
