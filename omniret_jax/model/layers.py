"""Small building blocks shared by every tower.

Parameters are created with a logical-axis tuple in their ``axes`` metadata
(``nnx.Param(value, axes=(...))``); ``omniret_jax.sharding`` is the only place
that maps those names onto mesh axes. Leaf names follow the PyTorch modules
(``weight``/``bias``) except Linear kernels, which are stored as ``kernel`` in
(in, out) order; the converter's key map relies on exactly that convention.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from omniret_jax.model.attention import blocked_attention

Axes = tuple[str | None, ...]

# Logical axis names used across the model. Kept as constants so a typo is an
# import error rather than a silently replicated parameter.
EMBED = "embed"          # residual width of the LLM
MLP = "mlp"              # feed-forward width
HEADS = "heads"          # flattened query heads * head_dim
KV_HEADS = "kv_heads"    # flattened key/value heads * head_dim
VOCAB = "vocab"
VISION_EMBED = "vision_embed"
VISION_MLP = "vision_mlp"
AUDIO_EMBED = "audio_embed"
AUDIO_MLP = "audio_mlp"
NORM = "norm"            # 1-D scale/bias vectors (replicated by default)
CONV = "conv"            # conv/patch input features (replicated by default)


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype) -> jax.Array:
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    """y = x @ kernel (+ bias) (+ LoRA); kernel is (in, out), the transpose of torch's weight."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, axes: Axes,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32, std: float = 0.02):
        self.in_features, self.out_features = in_features, out_features
        self.dtype = dtype
        self.kernel = nnx.Param(normal_init(rngs, (in_features, out_features), std, param_dtype), axes=axes)
        self.bias = (nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[-1],))
                     if use_bias else None)
        # Optional low-rank adapter, attached and removed by model/lora.py (apply_lora,
        # merge_lora) and convert/peft.py (import_peft); absent on a plain Linear.
        self.lora_a = nnx.data(None)        # nnx.LoRAParam [in, rank]
        self.lora_b = nnx.data(None)        # nnx.LoRAParam [rank, out]
        self.lora_dropout = nnx.data(None)  # Dropout on the adapter input, or None
        self.lora_scale = 0.0               # alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if self.lora_a is not None:
            # Like PEFT: the adapter runs in its own dtype (float32 by default) and
            # its contribution is cast back to the activation dtype.
            z = x.astype(self.lora_a.dtype)
            if self.lora_dropout is not None:
                z = self.lora_dropout(z)
            z = (z @ self.lora_a[...]) @ self.lora_b[...]
            y = y + (z * self.lora_scale).astype(y.dtype)
        return y


def _mix32(h: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (xor-shift-multiply, the "lowbias32" constants): every input bit
    flips about half of the output bits, so consecutive indices give independent-looking words."""
    h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
    h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
    return h ^ (h >> 16)


class Dropout(nnx.Dropout):
    """Inverted dropout whose mask is a hash of (a per-call seed from the 'dropout' stream, the
    element's row in the batch, its index within the row): one cheap integer pass instead of a
    threefry draw per element (~13x less work on CPU for the LoRA inputs, where dropout was a large
    part of a step). Each element is kept with probability 1 - rate and the kept ones are scaled
    by 1 / (1 - rate), as ``torch.nn.Dropout`` does; masks are reproducible from the stream.

    Masks are keyed per example: the row is ``row_offset`` + the row's index, so a batch embedded
    in chunks (gradient caching: ``set_row_offset`` to each chunk's first global row, the stream
    reseeded per chunk) draws exactly the masks of the one-shot batch.
    """

    def __init__(self, rate: float, **kw):
        super().__init__(rate, **kw)
        self.row_offset = nnx.Variable(jnp.zeros((), jnp.uint32))

    def __call__(self, inputs, *, deterministic: bool | None = None, rngs=None):
        deterministic = self.deterministic if deterministic is None else deterministic
        if deterministic or self.rate == 0.0:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        seed = jax.random.bits(self.rngs(), (2,), jnp.uint32)
        rows, per_row = inputs.shape[0], inputs.size // max(1, inputs.shape[0])
        row = (jax.lax.iota(jnp.uint32, rows) + self.row_offset[...])[:, None]
        within = jax.lax.iota(jnp.uint32, per_row)[None, :]
        words = _mix32(_mix32(within ^ seed[0]) ^ _mix32(row * jnp.uint32(0x9E3779B9) + seed[1]))
        keep = (words >= jnp.uint32(min(int(self.rate * 2**32), 2**32 - 1))).reshape(inputs.shape)
        return jnp.where(keep, inputs / (1.0 - self.rate), 0).astype(inputs.dtype)


def set_row_offset(model: nnx.Module, offset) -> None:
    """Make every Dropout of ``model`` key its masks as if its batch started at global row ``offset``."""
    for _, m in nnx.iter_graph(model):
        if isinstance(m, Dropout):
            m.row_offset[...] = jnp.asarray(offset, jnp.uint32)


def reseed_dropout(model: nnx.Module, key) -> None:
    """``nnx.reseed(model, dropout=key)`` that also reseeds ``Stacked`` modules: a stacked stream
    (key [n]) stands for the n streams of the modules it was stacked from, and gets the keys
    those would get (stack-major, in the graph's order), so a scanned model draws the masks
    of the unrolled one."""
    stacks = [tuple(p) for p, node in nnx.iter_graph(model) if isinstance(node, Stacked)]
    streams = [(tuple(p), s) for p, s in nnx.iter_graph(model)
               if isinstance(s, nnx.RngStream) and s.key.tag == "dropout"]
    keys = nnx.Rngs(dropout=key)
    i = 0
    while i < len(streams):
        stack = next((q for q in stacks if streams[i][0][:len(q)] == q), None)
        if stack is None:
            streams[i][1].key.set_value(keys.dropout())
            streams[i][1].count.set_value(jnp.zeros((), jnp.uint32))
            i += 1
            continue
        run = [s for p, s in streams[i:] if p[:len(stack)] == stack]   # contiguous: the graph is walked depth first
        n = run[0].key.shape[0]
        drawn = [[keys.dropout() for _ in run] for _ in range(n)]        # [member][stream], as unrolled
        for j, s in enumerate(run):
            s.key.set_value(jnp.stack([drawn[m][j] for m in range(n)]))
            s.count.set_value(jnp.zeros((n,), jnp.uint32))
        i += len(run)


class Stacked(nnx.Module):
    """n structurally identical modules held as one whose every variable has a leading [n] axis
    (logical axis None), run in order by ``lax.scan``: the program holds one copy of the module
    instead of n (compile time flat in depth). ``stack`` builds it from the modules and ``unstack``
    gives them back, so checkpoint layouts, LoRA targeting and exports keep the per-module tree."""

    def __init__(self, module: nnx.Module, n: int):
        self.module, self.n = module, n

    @classmethod
    def stack(cls, modules, *, free: bool = False) -> "Stacked":
        """``free``: delete the modules' concrete arrays as each is stacked (they are being replaced),
        so the copy costs one variable's worth of memory, not the whole stack's."""
        modules = list(modules)
        graphdefs, states = zip(*(nnx.split(m) for m in modules))
        for i, g in enumerate(graphdefs[1:], 1):
            if g != graphdefs[0]:
                raise ValueError(f"module {i} differs in structure from module 0 (adapters on some layers "
                                 "only?): only identical modules can be stacked for a scan")

        def one(*vs):
            axes = vs[0].get_metadata().get("axes")
            values = [v.get_value() for v in vs]
            out = vs[0].replace(jnp.stack(values), **({} if axes is None else {"axes": (None, *axes)}))
            for x in values if free else ():
                if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
                    x.delete()
            return out

        is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
        return cls(nnx.merge(graphdefs[0], jax.tree.map(one, *states, is_leaf=is_var)), len(modules))

    def unstack(self) -> list[nnx.Module]:
        graphdef, state = nnx.split(self.module)

        def member(i):
            def one(v):
                axes = v.get_metadata().get("axes")
                return v.replace(v.get_value()[i], **({} if axes is None else {"axes": tuple(axes[1:])}))
            return nnx.merge(graphdef, jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))

        return [member(i) for i in range(self.n)]

    def scan(self, fn, carry, *, policy=None, remat: bool = False):
        """``carry, y_i = fn(module_i, carry)`` for i in order; returns (carry, ys), ys the y_i
        stacked. ``remat``: recompute each step in the backward pass, keeping what ``policy``
        saves (a ``jax.checkpoint`` policy; None keeps only the carry)."""
        graphdef, state = nnx.split(self.module)

        def body(c, member_state):
            m = nnx.merge(graphdef, member_state)
            c, y = fn(m, c)
            return c, (y, nnx.state(m, nnx.RngCount))   # dropout draws advance their counters

        if remat:
            body = jax.checkpoint(body, policy=policy)
        carry, (ys, counts) = jax.lax.scan(body, carry, state)
        nnx.update(self.module, counts)
        return carry, ys


class GatedMLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x))."""

    def __init__(self, d: int, inner: int, act: str, *, use_bias: bool, axes_in, axes_out,
                 rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=use_bias)
        self.act = activation(act)
        self.gate_proj = Linear(d, inner, axes=axes_in, **kw)
        self.up_proj = Linear(d, inner, axes=axes_in, **kw)
        self.down_proj = Linear(inner, d, axes=axes_out, **kw)

    def __call__(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: normalise in float32, cast back, then scale (torch order)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32, axes: Axes = (NORM,)):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * xf.astype(dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm (biased variance), computed in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32, axes: Axes = (NORM,)):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=axes)
        self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=axes)

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


class Embed(nnx.Module):
    """Token embedding table, (vocab, dim) as in torch."""

    def __init__(self, num: int, dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, axes: Axes = (VOCAB, EMBED)):
        self.dtype = dtype
        self.weight = nnx.Param(normal_init(rngs, (num, dim), 0.02, param_dtype), axes=axes)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu": gelu_exact,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported activation {name!r}; known: {sorted(ACTIVATIONS)}") from None


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x * cos + rotate_half(x) * sin (HF's apply_rotary_pos_emb). The rotation is orthogonal,
    so the backward is the inverse rotation, dx = dy * cos - rotate_half(dy * sin): written so,
    not as the transpose of a concatenate (pads of slices that XLA lays out badly on CPU)."""
    return x * cos + rotate_half(x) * sin


def _rope_fwd(x, cos, sin):
    return apply_rope(x, cos, sin), (cos, sin)


def _rope_bwd(res, dy):
    cos, sin = res
    return (dy * cos - rotate_half(dy * sin)).astype(dy.dtype), None, None  # cos, sin: of positions only


apply_rope.defvjp(_rope_fwd, _rope_bwd)


def dot_product_attention(q: Float[Array, "b sq hq d"], k: Float[Array, "b sk hkv d"], v: Float[Array, "b sk hkv d"],
                          mask: Bool[Array, "#b #hq #sq sk"] | None = None, *, causal: bool = False,
                          lengths: Int[Array, "b"] | None = None, segments: Int[Array, "b sk"] | None = None,
                          implementation: str | None = None) -> Float[Array, "b sq hq d"]:
    """Softmax attention through ``jax.nn.dot_product_attention``: float32 logits and softmax,
    GQA by head grouping (K/V are never repeated), cuDNN flash attention on GPU when asked, or
    ``implementation="blocked"``: ``model.attention.blocked_attention`` (self-attention whose
    mask is ``segments``, contiguous runs of ids with 0 = padding; the fast path on CPU).

    The mask is given in the cheapest form the caller has: ``causal`` and ``lengths`` (valid keys
    of right-padded rows, what the flash kernel takes) or a boolean ``mask`` broadcastable to
    [B, Hq, Sq, Sk] (True = attend; e.g. [B, 1, 1, Sk] key padding, or segment equality for
    packed rows and vision windows). A query with no key to attend (padding) gets finite values
    that callers discard.
    """
    if implementation == "blocked":
        if segments is None or mask is not None or lengths is not None:
            raise ValueError("the blocked kernel takes its mask as segment ids alone")
        return blocked_attention(q, k, v, segments, causal=causal)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, key_value_seq_lengths=lengths,
                                        implementation=implementation)


def segment_attention(q: Float[Array, "b s h d"], k: Float[Array, "b s h d"], v: Float[Array, "b s h d"],
                      segments: Int[Array, "b s"], *, band: int | None = None,
                      implementation: str | None = None) -> Float[Array, "b s h d"]:
    """Bidirectional attention within segments (tokens with equal ids; ids < 0 are padding).

    With ``band`` = B, every segment must be a contiguous run of at most B tokens: the sequence
    is cut into blocks of B and each block attends only to itself and its two neighbours, which
    hold every token of any segment the block touches. Cost S x 3B instead of S x S; exact.
    ``implementation="blocked"``: the blocked kernel, ``band`` as its span (segments renumbered
    from 1, padding 0).
    """
    if implementation == "blocked":
        return blocked_attention(q, k, v, jnp.where(segments < 0, 0, segments + 1), causal=False, span=band)
    valid_key = segments >= 0
    if band is None or 3 * band >= q.shape[1]:
        mask = (segments[:, None, :, None] == segments[:, None, None, :]) & valid_key[:, None, None, :]
        return dot_product_attention(q, k, v, mask)
    b, s, h, d = q.shape
    nb = -(-s // band)
    pad = nb * band - s

    def blocks(x, fill):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return x.reshape(b, nb, band, *x.shape[2:])

    def neighbours(x, fill):
        """Each block with the block before and after it: [B, nb, 3 * band, ...]."""
        x = jnp.pad(x, [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
        return jnp.concatenate([x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=2)

    seg_q = blocks(segments, -1)
    seg_k = neighbours(seg_q, -1)
    qb, kb, vb = blocks(q, 0), neighbours(blocks(k, 0), 0), neighbours(blocks(v, 0), 0)
    mask = (seg_q[..., :, None] == seg_k[..., None, :]) & (seg_k >= 0)[..., None, :]   # [B, nb, band, 3band]
    out = dot_product_attention(qb.reshape(b * nb, band, h, d), kb.reshape(b * nb, 3 * band, h, d),
                                vb.reshape(b * nb, 3 * band, h, d), mask.reshape(b * nb, 1, band, 3 * band))
    return out.reshape(b, nb * band, h, d)[:, :s]
