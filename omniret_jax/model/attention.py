"""Blockwise softmax attention with a memory-lean backward, for hosts without a fused kernel.

XLA has no fused attention on CPU: ``jax.nn.dot_product_attention`` materialises the scores of
the whole batch ([B, H, S, S] float32, tens of MB at 700 tokens), walks them several times in
the softmax and again in its transposed layout for the backward, and computes every causal
score it then masks. This kernel (the flash-attention recurrence, written in plain JAX) works
one kv head at a time and one block of queries at a time, so the scores of a block stay in
cache:

* rows batched (vmap), kv heads in a loop (lax.map): a head's blocks stay in cache, and the
  rows a data / fsdp mesh shards are never looped over (that would gather them);
* causal rows: query block i reads only keys [0, end of block i): about half the work; with
  segments no longer than a known ``span`` (vision windows) only the keys within reach;
* GQA without repeated K/V: queries are grouped [K, G, T, D] against keys [K, S, D];
* masks as segment ids, each segment a contiguous run: a key is seen when its segment equals
  the query's and is not 0 (padding); an unpacked row (left or right padded) is segment 1 where
  valid, a packed row numbers its sequences;
* float32 logits, softmax statistics and accumulators whatever the input dtype;
* a custom VJP that keeps only the output and the row log-sum-exp (not the probabilities) and
  recomputes each block's scores in the backward (dS = P * (dP - rowsum(dO * O))).

A query with no visible key (padding) gets zeros and no gradient. Exact, not approximate:
equal to ``jax.nn.dot_product_attention`` up to float32 rounding (tests/test_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from omniret_jax.inputs import Arr

F32 = jnp.float32


def block_size(seq: int) -> int:
    """Queries per block: 128, more for long rows so that a layer unrolls at most 16 blocks."""
    return max(128, -(-seq // 16 // 8) * 8)


def _blocks(seq: int, block: int, causal: bool, span: int | None) -> list[tuple[int, int, int, int]]:
    """(lo, hi) of each query block and the keys [k0, k1) it can see: up to its end when causal,
    within ``span`` - 1 of it when segments are at most ``span`` long."""
    out = []
    for lo in range(0, seq, block):
        hi = min(seq, lo + block)
        k0 = 0 if span is None else max(0, lo - span + 1)
        k1 = hi if causal else (seq if span is None else min(seq, hi + span - 1))
        out.append((lo, hi, k0, k1))
    return out


def _mask(lo_k, hi_k, lo: int, hi: int, k0: int, k1: int):
    """[t, s] visibility of keys [k0, k1) to queries [lo, hi): key s is seen by query t when
    lo_k[t] <= s < hi_k[t] (comparisons against an iota: cheap, vectorisable)."""
    s = jnp.arange(k0, k1)[None, :]
    return (s >= lo_k[lo:hi, None]) & (s < hi_k[lo:hi, None])


def _scores(qb, kk, m, scale):
    s = jnp.einsum("kgtd,ksd->kgts", qb, kk, preferred_element_type=F32) * scale
    return jnp.where(m, s, -jnp.inf)


def _row_forward(q, k, v, lo_k, hi_k, *, causal: bool, block: int, span: int | None, scale: float):
    """One row: q [T, K, G, D] as [K, G, T, D], k / v [K, S, D]. Returns out [K, G, T, D] (f32), lse [K, G, T]."""
    outs, lses = [], []
    for lo, hi, k0, k1 in _blocks(q.shape[2], block, causal, span):
        m = _mask(lo_k, hi_k, lo, hi, k0, k1)
        s = _scores(q[:, :, lo:hi], k[:, k0:k1], m, scale)
        mx = jnp.max(s, axis=-1, keepdims=True)
        mx = jnp.where(jnp.isfinite(mx), mx, 0.0)
        p = jnp.exp(s - mx)
        l = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("kgts,ksd->kgtd", p.astype(v.dtype), v[:, k0:k1], preferred_element_type=F32)
        outs.append(o / jnp.where(l > 0, l, 1.0))
        lses.append(jnp.where(l[..., 0] > 0, mx[..., 0] + jnp.log(l[..., 0]), jnp.inf))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


def _row_backward(q, k, v, o, lse, do, lo_k, hi_k, *, causal: bool, block: int, span: int | None, scale: float):
    s_len = k.shape[1]
    delta = jnp.sum(do.astype(F32) * o, axis=-1)  # [K, G, T]
    dq, dk, dv = [], jnp.zeros(k.shape, F32), jnp.zeros(v.shape, F32)
    for lo, hi, k0, k1 in _blocks(q.shape[2], block, causal, span):
        m = _mask(lo_k, hi_k, lo, hi, k0, k1)
        p = jnp.exp(_scores(q[:, :, lo:hi], k[:, k0:k1], m, scale) - lse[:, :, lo:hi, None])  # 0 where masked
        dob = do[:, :, lo:hi]
        dv_b = jnp.einsum("kgts,kgtd->ksd", p.astype(do.dtype), dob, preferred_element_type=F32)
        dp = jnp.einsum("kgtd,ksd->kgts", dob, v[:, k0:k1], preferred_element_type=F32)
        ds = (p * (dp - delta[:, :, lo:hi, None]) * scale).astype(q.dtype)
        dq.append(jnp.einsum("kgts,ksd->kgtd", ds, k[:, k0:k1], preferred_element_type=F32))
        dk_b = jnp.einsum("kgts,kgtd->ksd", ds, q[:, :, lo:hi], preferred_element_type=F32)
        if (k0, k1) == (0, s_len):
            dk, dv = dk + dk_b, dv + dv_b
        else:
            dk, dv = dk.at[:, k0:k1].add(dk_b), dv.at[:, k0:k1].add(dv_b)
    return jnp.concatenate(dq, axis=2), dk, dv


def _grouped_q(q, kv: int):
    """[B, T, Hq, D] -> [B, K, G, T, D]."""
    b, t, hq, d = q.shape
    return q.reshape(b, t, kv, hq // kv, d).transpose(0, 2, 3, 1, 4)


def _grouped(q, k, v):
    """[B, T, Hq, D], [B, S, K, D] -> [B, K, G, T, D], [B, K, S, D]."""
    return _grouped_q(q, k.shape[2]), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)


def _ungrouped(x, shape):
    """[B, K, G, T, D] -> [B, T, Hq, D]."""
    return x.transpose(0, 3, 1, 2, 4).reshape(shape)


def key_ranges(segments: Int[Array, "b t"], causal: bool) -> tuple[Int[Array, "b t"], Int[Array, "b t"]]:
    """Per query, the keys [lo, hi) it sees: its own segment (a contiguous run of equal nonzero
    ids), up to itself when causal; padding queries (id 0) see nothing (lo = hi = 0)."""
    t = segments.shape[1]
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segments.shape)
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    ends = jnp.concatenate([segments[:, 1:] != segments[:, :-1], jnp.ones_like(segments[:, :1], bool)], axis=1)
    lo = jax.lax.cummax(jnp.where(starts, pos, 0), axis=1)
    hi = pos + 1 if causal else jax.lax.cummin(jnp.where(ends, pos + 1, t), axis=1, reverse=True)
    valid = segments != 0
    return jnp.where(valid, lo, 0), jnp.where(valid, hi, 0)


def _per_head(row, per_head, per_row):
    """``row`` over every (row, kv head): a loop over kv heads (lax.map: one head's blocks stay
    in cache) of all rows at once (vmap). Rows, not heads, are what a data / fsdp mesh shards,
    and a loop over a sharded axis would gather it onto every device.

    per_head: arrays [B, K, ...]; per_row: arrays [B, ...] shared by the heads. ``row`` takes
    one row's per-head arrays (with a kv-head axis of 1), then its per-row arrays."""
    def one_head(xs):
        out = jax.vmap(row)(*[x[:, None] for x in xs], *per_row)
        return tuple(y[:, 0] for y in out)

    outs = jax.lax.map(one_head, tuple(jnp.moveaxis(x, 1, 0) for x in per_head))
    return tuple(jnp.moveaxis(y, 0, 1) for y in outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _attention(q, k, v, lo_k, hi_k, causal: bool, block: int, span: int | None):
    return _attention_fwd(q, k, v, lo_k, hi_k, causal, block, span)[0]


def _attention_fwd(q, k, v, lo_k, hi_k, causal, block, span):
    qg, kk, vv = _grouped(q, k, v)
    row = functools.partial(_row_forward, causal=causal, block=block, span=span, scale=1.0 / math.sqrt(q.shape[-1]))
    o, lse = _per_head(row, (qg, kk, vv), (lo_k, hi_k))
    return _ungrouped(o, q.shape).astype(q.dtype), (q, k, v, lo_k, hi_k, o, lse)


def _attention_bwd(causal, block, span, res, do):
    q, k, v, lo_k, hi_k, o, lse = res
    qg, kk, vv = _grouped(q, k, v)
    dog = _grouped_q(do, k.shape[2])
    row = functools.partial(_row_backward, causal=causal, block=block, span=span,
                            scale=1.0 / math.sqrt(q.shape[-1]))
    dq, dk, dv = _per_head(row, (qg, kk, vv, o, lse, dog), (lo_k, hi_k))
    dk, dv = dk.transpose(0, 2, 1, 3).astype(k.dtype), dv.transpose(0, 2, 1, 3).astype(v.dtype)
    return _ungrouped(dq, q.shape).astype(q.dtype), dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def blocked_attention(q: Float[Array, "b t hq d"], k: Float[Array, "b t hkv d"], v: Float[Array, "b t hkv d"],
                      segments: Int[Arr, "b t"], *, causal: bool, block: int | None = None,
                      span: int | None = None) -> Float[Array, "b t hq d"]:
    """Self-attention of rows whose tokens carry segment ids (0 = padding); see the module doc.

    ``span``: a bound on every segment's length (vision windows, packed captions); a query
    block then reads only the keys within ``span`` - 1 of it. The caller guarantees the bound."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} key/value heads")
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"self-attention needs as many keys as queries, got {k.shape[1]} and {q.shape[1]}")
    lo_k, hi_k = key_ranges(jnp.asarray(segments).astype(jnp.int32), bool(causal))
    span = None if span is None or span >= q.shape[1] else int(span)
    return _attention(q, k, v, lo_k, hi_k, bool(causal), int(block or block_size(q.shape[1])), span)
