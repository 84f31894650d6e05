"""The pure train step: embeddings of every view, the three losses, one AdamW update.

The model is split once outside jit into (graphdef, trainable, frozen); the step merges
them inside and differentiates only ``trainable`` (LoRA first, plus the WAVE heads).
Towers run once per view and every LLM pass reuses them; the hard-negative tuple reuses
the anchor's towers with rows permuted by the derangement ``omniret_jax.data.batch``
drew on the host, so its token layout matches the swapped clip.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from omniret_jax.config import EmbedConfig
from omniret_jax.inputs import AUDIO, VIDEO, TrainInputs
from omniret_jax.losses import LossConfig, compute_losses
from omniret_jax.model.embedder import embed_path, encode_media
from omniret_jax.model.layers import reseed_dropout, set_row_offset
from omniret_jax.model.thinker import MediaFeatures


def _rows(f: MediaFeatures, rows: jax.Array) -> MediaFeatures:
    return MediaFeatures(jnp.take(f.features, rows, axis=0), jnp.take(f.valid, rows, axis=0))


def embeddings(model, inputs: TrainInputs, ecfg: EmbedConfig, *, negatives: bool = True) -> dict[str, jax.Array]:
    """Every embedding the losses read, keyed as omniret_jax.losses.compute_losses expects
    (without the hard-negative tuple when ``negatives`` is False: it never takes gradient)."""
    media = encode_media(model, inputs.anchor)
    emb = {p: embed_path(model, p, pi, media, ecfg) for p, pi in inputs.anchor.paths.items()}
    if inputs.aug is not None:
        aug_media = encode_media(model, inputs.aug)
        emb.update({p + "_aug": embed_path(model, p, pi, aug_media, ecfg) for p, pi in inputs.aug.paths.items()})
    if inputs.query is not None:   # a text + video query's own clip: its paths under their names
        query_media = encode_media(model, inputs.query)
        emb.update({p: embed_path(model, p, pi, query_media, ecfg) for p, pi in inputs.query.paths.items()})
    if not negatives:
        return emb
    if inputs.neg_view is not None:
        emb["TVA_neg"] = embed_path(model, "TVA", inputs.neg_view.paths["TVA"], encode_media(model, inputs.neg_view),
                                    ecfg)
    elif inputs.neg is not None:
        _, v, a = inputs.neg_rows.T
        neg_media = {VIDEO: _rows(media[VIDEO], v), AUDIO: _rows(media[AUDIO], a)}
        emb["TVA_neg"] = embed_path(model, "TVA", inputs.neg, neg_media, ecfg)
    if inputs.neg_rows is not None:
        emb.update(modality_negatives(emb, inputs.neg_rows))
    return emb


def modality_negatives(emb: dict[str, jax.Array], neg_rows: jax.Array) -> dict[str, jax.Array]:
    """Per-modality embeddings of the hard-negative tuple (the cross-modal tuple similarity):
    the batch's own T/V/A rows, taken at the tuple's source rows."""
    t, v, a = neg_rows.T
    return {m + "_neg": jnp.take(emb[m], rows, axis=0) for m, rows in (("T", t), ("V", v), ("A", a)) if m in emb}


@dataclasses.dataclass(frozen=True)
class StepConfig:
    ecfg: EmbedConfig
    loss: LossConfig


def warmup_steps(total_updates: int, warmup_ratio: float) -> int:
    """Warm-up length in updates: ceil(ratio * updates), at least 1 (as transformers' Trainer counts it)."""
    return max(1, math.ceil(warmup_ratio * total_updates))


def lr_schedule(*, lr: float, total_updates: int, warmup_ratio: float) -> optax.Schedule:
    """Learning rate of update u (0-based): linear warm-up from 0 over ``warmup_steps`` updates,
    then a cosine that reaches 0 at the last update (u = total_updates - 1)."""
    if total_updates < 1:
        raise ValueError(f"total_updates={total_updates} must be >= 1")
    warmup = warmup_steps(total_updates, warmup_ratio)
    last = max(total_updates - 1, warmup + 1)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, last, end_value=0.0)


def decay_mask(rule: str):
    """Which trainables weight decay applies to: "all", or "no_bias_norm" (every weight but biases
    and LayerNorm/RMSNorm parameters: transformers' Trainer grouping, which the released
    recipe inherits)."""
    if rule == "all":
        return None
    if rule != "no_bias_norm":
        raise ValueError(f"weight decay rule {rule!r}; expected 'all' or 'no_bias_norm'")

    def mask(params):
        def keep(path, _):
            names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
            return not any(n == "bias" or "norm" in n.lower() or n.endswith("_ln") for n in names)
        return jax.tree_util.tree_map_with_path(keep, params)

    return mask


def make_optimizer(*, lr: float, total_steps: int, warmup_ratio: float, weight_decay: float,
                   clip_norm: float, accumulate: int, decay: str = "all") -> optax.GradientTransformation:
    """AdamW with linear warm-up + cosine decay (``lr_schedule``) and global-norm clipping.

    ``total_steps`` counts optimizer *updates*; each update averages the gradients of
    ``accumulate`` micro-batches (``optax.MultiSteps``, whose inner state advances once per
    update, so the schedule is the same function of the update index at any accumulation).
    Clipping applies to the averaged gradient of the update, as in transformers' Trainer.
    """
    if accumulate < 1:
        raise ValueError(f"accumulate={accumulate} must be >= 1")
    schedule = lr_schedule(lr=lr, total_updates=total_steps, warmup_ratio=warmup_ratio)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask(decay)))
    if accumulate == 1:
        return tx
    return optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def loss_and_grads(graphdef, trainable, frozen, inputs: TrainInputs, step, dropout_key, *, wrt, cfg: StepConfig):
    """(loss, metrics, gradients of the trainables) of one batch, all embeddings in one pass."""
    model = nnx.merge(graphdef, trainable, frozen)
    reseed_dropout(model, dropout_key)

    def loss_fn(m):
        return compute_losses(embeddings(m, inputs, cfg.ecfg), step, cfg.loss)

    grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)
    (loss, metrics), grads = grad_fn(model)
    return loss, metrics, grads


def train_step(graphdef, trainable, frozen, opt_state, inputs: TrainInputs, step, dropout_key,
               *, wrt, tx: optax.GradientTransformation, cfg: StepConfig):
    """One update. Returns (trainable, opt_state, metrics).

    ``frozen`` is everything but the trainable state (base weights, RNG state),
    ``wrt`` the nnx filter that selected ``trainable``. The adapter dropout is
    reseeded from ``dropout_key`` so a resumed run draws the same masks. A
    non-finite loss or gradient skips the update (parameters and optimizer state
    unchanged) and reports ``skipped = 1``.
    """
    loss, metrics, grads = loss_and_grads(graphdef, trainable, frozen, inputs, step, dropout_key, wrt=wrt, cfg=cfg)
    return apply_update(trainable, opt_state, grads, loss, metrics, tx)


def apply_update(trainable, opt_state, grads, loss, metrics, tx):
    """AdamW on finite loss and gradients; otherwise parameters and optimizer state unchanged."""
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, new_opt = tx.update(grads, opt_state, trainable)
    new_params = optax.apply_updates(trainable, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    metrics = dict(metrics, grad_norm=optax.global_norm(grads), skipped=1 - finite.astype(jnp.int32))
    return keep(new_params, trainable), keep(new_opt, opt_state), metrics


# ----------------------------------------------------------------------------- gradient caching

class CachedGrads:
    """``loss_and_grads`` over a contrastive batch of C examples that stays on the host as n chunks
    of K (``data.batch.chunked``: every leaf [n, K, ...]), with the device memory of one chunk
    (Gao et al.'s gradient caching):

    1. embed every chunk without gradient;
    2. the losses over all C embeddings (every example the others' negative) and their gradient
       with respect to the embeddings (the teacher under stop_gradient, the hard negatives never
       differentiated, exactly as in the one-shot step);
    3. embed every chunk again, pulling its slice of the cached embedding gradient back to the
       trainables (a vjp), and add it to the running sum.
    Example g = c * K + j of chunk c. The adapter dropout is reseeded identically before every
    chunk and keyed by the example's global row, so both passes draw the masks the one-shot step
    draws: loss and gradients equal it up to float round-off, for one extra forward.

    Each phase is one jitted function, compiled once per run. ``place`` puts one host chunk on the
    mesh; at most two chunks are on the device at once (the next one's transfer overlaps this
    one's compute), so beside the weights, the optimizer state and the gradient sum the device
    holds two chunks and the C embeddings (C x D floats per view): flat in C at fixed K. The
    hard-negative tuple must come as ``neg_view`` (its towers run in its chunk) and paths must be
    unpacked (a chunk is a slice of rows).
    """

    def __init__(self, graphdef, *, cfg: StepConfig, place):
        self._place = place

        def embed(params, frozen, chunk, offset, key, *, negatives: bool):
            model = nnx.merge(graphdef, params, frozen, copy=True)
            reseed_dropout(model, key)
            set_row_offset(model, offset)
            return embeddings(model, chunk, cfg.ecfg, negatives=negatives)

        def forward(params, frozen, chunk, offset, key):
            e = embed(params, frozen, chunk, offset, key, negatives=True)
            return {k: v for k, v in e.items() if not k.endswith("_neg") or k == "TVA_neg"}

        def losses(chunk_embs, neg_rows, step):
            emb = {k: jnp.concatenate([e[k] for e in chunk_embs]) for k in chunk_embs[0]}
            if neg_rows is not None:
                emb.update(modality_negatives(emb, neg_rows))
            (loss, metrics), grads = jax.value_and_grad(lambda e: compute_losses(e, step, cfg.loss), has_aux=True)(emb)
            k = chunk_embs[0][next(iter(chunk_embs[0]))].shape[0]
            return loss, metrics, tuple({key: grads[key][i * k:(i + 1) * k] for key in chunk_embs[0]}
                                        for i in range(len(chunk_embs)))

        def backward(acc, params, frozen, chunk, offset, key, emb_grads):
            out, pull = jax.vjp(lambda p: embed(p, frozen, chunk, offset, key, negatives=False), params)
            (g,) = pull({k: emb_grads[k] for k in out})
            return jax.tree.map(jnp.add, acc, g)

        self.forward, self.losses = jax.jit(forward), jax.jit(losses)
        self.backward = jax.jit(backward, donate_argnums=0)
        self.zeros = jax.jit(lambda params: jax.tree.map(jnp.zeros_like, params))

    def _stream(self, inputs: TrainInputs, run) -> None:
        """``run(i, offset, chunk)`` for every chunk in order, chunk i placed on the mesh. Chunk
        i + 1 is placed once chunk i's work is dispatched (the transfer overlaps it) and chunk i is
        let go once its result is ready: never more than two on the device."""
        n, k = inputs.anchor.paths[next(iter(inputs.anchor.paths))].input_ids.shape[:2]
        local = dataclasses.replace(inputs, neg_rows=None)   # the losses take the global rows
        take = lambda i: self._place(jax.tree.map(lambda x: x[i], local))  # noqa: E731
        current = take(0)
        for i in range(n):
            result = run(i, np.int32(i * k), current)
            ahead = take(i + 1) if i + 1 < n else None
            jax.block_until_ready(result)
            current = ahead

    def loss_and_grads(self, trainable, frozen, inputs: TrainInputs, step, dropout_key):
        """(loss, metrics, gradients of the trainables), as ``loss_and_grads`` over the C examples."""
        embs = []

        def forward(i, offset, chunk):
            embs.append(self.forward(trainable, frozen, chunk, offset, dropout_key))
            return embs[-1]

        self._stream(inputs, forward)
        neg_rows = None if inputs.neg_rows is None else np.asarray(inputs.neg_rows).reshape(-1, 3)
        loss, metrics, emb_grads = self.losses(tuple(embs), neg_rows, step)
        grads = [self.zeros(trainable)]

        def backward(i, offset, chunk):
            grads[0] = self.backward(grads[0], trainable, frozen, chunk, offset, dropout_key, emb_grads[i])
            return grads[0]

        self._stream(inputs, backward)
        return loss, metrics, grads[0]
