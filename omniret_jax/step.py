"""The pure train step: embeddings of every view, the three losses, one AdamW update.

The model is split once outside jit into (graphdef, trainable, rng, frozen); the
step merges them inside and differentiates only ``trainable`` (LoRA first, plus
the WAVE heads). Towers run once per view and every LLM pass reuses them; the
hard-negative tuple reuses the anchor's towers with rows permuted by a
derangement chosen on the host, so its token layout matches the swapped clip.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omniret_jax.losses import LossConfig, compute_losses, derangement, hard_negative_slot
from omniret_jax.model.embedder import (EmbedConfig, EmbedInputs, PathInputs, Tokens, embed_path, encode_media,
                                        prepare)
from omniret_jax.model.thinker import AUDIO, VIDEO, MediaFeatures


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainInputs:
    anchor: EmbedInputs
    aug: EmbedInputs | None = None
    neg: PathInputs | None = None     # TVA layout of the hard-negative tuple
    neg_rows: jax.Array | None = None  # [B, 3]: text / video / audio source row of each negative


# ----------------------------------------------------------------------------- host side

def needed_paths(loss_cfg: LossConfig) -> tuple[tuple[str, ...], tuple[str, ...], bool]:
    """(anchor paths, augmented-view paths, needs the hard negative) for the active terms."""
    anchor: list[str] = []
    if {"L_A", "L_D"} & set(loss_cfg.terms):
        anchor += ["T", "V", "A"]
    if "L_D" in loss_cfg.terms or ("L_T" in loss_cfg.terms and loss_cfg.tuple_similarity == "joint"):
        anchor += ["TVA"]
    aug: tuple[str, ...] = ()
    if "L_T" in loss_cfg.terms:
        if loss_cfg.tuple_similarity == "joint":
            aug = ("TVA",)
        else:
            anchor += ["T", "V", "A"]
            aug = ("T", "V", "A")
    return tuple(dict.fromkeys(anchor)), aug, "L_T" in loss_cfg.terms


def negative_rows(step: int, batch_size: int, seed: int) -> np.ndarray:
    """[3, B] rows (text, video, audio) of each sample's hard-negative tuple.

    The step's slot (text, audio, video cycling) is shuffled by a derangement,
    the other slots stay the sample's own.
    """
    if batch_size < 2:
        raise ValueError(f"batch of {batch_size} is too small for a derangement (hard negatives need >= 2)")
    key = jax.random.fold_in(jax.random.key(seed), step)
    perm = np.asarray(derangement(key, batch_size))
    rows = np.tile(np.arange(batch_size), (3, 1))
    rows[{"text": 0, "video": 1, "audio": 2}[hard_negative_slot(step)]] = perm
    return rows


def build_inputs(batch: dict, step: int, model_cfg, tokens: Tokens, ecfg: EmbedConfig,
                 loss_cfg: LossConfig, *, seed: int) -> TrainInputs:
    """Host-side arrays of one step from a pipeline batch (with ``batch['aug']`` when L_T is on)."""
    anchor_paths, aug_paths, with_neg = needed_paths(loss_cfg)
    out = TrainInputs(anchor=prepare(batch, anchor_paths, model_cfg, tokens, ecfg))
    if aug_paths:
        if "aug" not in batch:
            raise KeyError("L_T needs the augmented view: set the pipeline's augment option (batch['aug'])")
        out.aug = prepare(batch["aug"], aug_paths, model_cfg, tokens, ecfg)
    if with_neg:
        b = len(batch["caption"])
        rows = negative_rows(step, b, seed)
        t, v, a = rows
        swapped = dict(batch)
        swapped["caption"] = [batch["caption"][i] for i in t]
        for key in ("video_patches", "video_grid_thw", "video_second_per_grid"):
            swapped[key] = np.asarray(batch[key])[v]
        for key in ("mel", "mel_len", "fbank", "fbank_len"):
            swapped[key] = np.asarray(batch[key])[a]
        out.neg = prepare(swapped, ("TVA",), model_cfg, tokens, ecfg).paths["TVA"]
        out.neg_rows = rows.T.astype(np.int32)
    return out


# ----------------------------------------------------------------------------- device side

def _rows(f: MediaFeatures, rows: jax.Array) -> MediaFeatures:
    return MediaFeatures(jnp.take(f.features, rows, axis=0), jnp.take(f.valid, rows, axis=0))


def embeddings(model, inputs: TrainInputs, ecfg: EmbedConfig) -> dict[str, jax.Array]:
    """Every embedding the losses read, keyed as omniret_jax.losses.compute_losses expects."""
    media = encode_media(model, inputs.anchor)
    emb = {p: embed_path(model, p, pi, media, ecfg) for p, pi in inputs.anchor.paths.items()}
    if inputs.aug is not None:
        aug_media = encode_media(model, inputs.aug)
        emb.update({p + "_aug": embed_path(model, p, pi, aug_media, ecfg) for p, pi in inputs.aug.paths.items()})
    if inputs.neg is not None:
        t, v, a = inputs.neg_rows.T
        neg_media = {VIDEO: _rows(media[VIDEO], v), AUDIO: _rows(media[AUDIO], a)}
        emb["TVA_neg"] = embed_path(model, "TVA", inputs.neg, neg_media, ecfg)
        for m, rows in (("T", t), ("V", v), ("A", a)):
            if m in emb:  # per-modality negative for the cross-modal tuple similarity
                emb[m + "_neg"] = jnp.take(emb[m], rows, axis=0)
    return emb


@dataclasses.dataclass(frozen=True)
class StepConfig:
    ecfg: EmbedConfig
    loss: LossConfig


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float, weight_decay: float,
                   clip_norm: float, accumulate: int) -> optax.GradientTransformation:
    """AdamW with linear warm-up + cosine decay and global-norm clipping; ``accumulate`` micro-steps per update."""
    warmup = max(1, int(round(warmup_ratio * total_steps)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total_steps, warmup + 1), end_value=0.0)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
    return optax.MultiSteps(tx, every_k_schedule=accumulate) if accumulate > 1 else tx


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def train_step(graphdef, trainable, frozen, opt_state, inputs: TrainInputs, step, dropout_key,
               *, wrt, tx: optax.GradientTransformation, cfg: StepConfig):
    """One update. Returns (trainable, opt_state, metrics).

    ``frozen`` is everything but the trainable state (base weights, RNG state),
    ``wrt`` the nnx filter that selected ``trainable``. The adapter dropout is
    reseeded from ``dropout_key`` so a resumed run draws the same masks. A
    non-finite loss or gradient skips the update (parameters and optimizer state
    unchanged) and reports ``skipped = 1``.
    """
    model = nnx.merge(graphdef, trainable, frozen)
    nnx.reseed(model, dropout=dropout_key)

    def loss_fn(m):
        return compute_losses(embeddings(m, inputs, cfg.ecfg), step, cfg.loss)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, metrics), grads = grad_fn(model)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_params = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), skipped=1 - finite.astype(jnp.int32))
    return keep(new_params, trainable), keep(new_opt, opt_state), metrics
