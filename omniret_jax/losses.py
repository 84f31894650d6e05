"""Training losses of OmniRetriever (shared/spec/method.md): symmetric InfoNCE, L_A, L_D, L_T.

Every function takes L2-normalised embeddings of the *global* batch, [B, D]. Under jit with
batch-sharded inputs XLA gathers what each matmul needs, so similarity matrices are B x B
across all shards (cross-device negatives) without any collective written here. The math
runs in float32 whatever the input dtype (bf16 logits at tau = 0.01 lose ~2 digits).
Inputs are not re-normalised: the embedder's output is already unit-norm.
"""

from __future__ import annotations

import dataclasses
import operator

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from omniret_jax.config import EMBED_PATHS, ViewPlan

# Embeddings arrive as jax arrays (the step) or NumPy arrays (evaluation, tests).
Embeddings = Array | np.ndarray

MODALITIES = ("T", "V", "A")
TERMS = ("L_A", "L_D", "L_T")
# The paper's ablation stair-step (Table 5 / S11); "frozen" evaluates the untrained backbone.
PRESETS = {
    "frozen": (),
    "pairwise": ("L_A",),
    "distill": ("L_A", "L_D"),
    "full": ("L_A", "L_D", "L_T"),
}
RECIPES = ("paper", "released")
TUPLE_SIMILARITIES = ("joint", "cross_modal_mean")
NEGATIVE_POOLS = ("own", "batch")
ROTATIONS = ("update", "micro_batch")
_PAPER_PAIRS = (("T", "V"), ("T", "A"), ("V", "A"))
_RELEASED_PAIRS = (("T", "A"), ("T", "V"), ("A", "V"))


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which objective to train; hashable so it can be a static argument of jit.

    recipe: "paper" (L = l_A L_A + l_D L_D + l_T L_T) or "released" (the public code's
      Obj1/Obj2/Obj3, weighted l_T / l_D / l_A: Obj1 is the tuple term, Obj2 the detached
      joint-teacher term, Obj3 the single-modal pair term).
    terms: the subset of ("L_A", "L_D", "L_T") that is on (see `from_preset`).
    tuple_similarity: "joint" scores tuples by the cosine of their joint vectors (released
      code); "cross_modal_mean" by the mean of the six cross-modal cosines (paper text).
    hard_negative_pool: "own": anchor i sees only its own hard negative(s); "batch": every
      anchor sees the hard negatives of the whole global batch, which is what the released code
      does per device (it concatenates the local negatives of all samples and does not gather
      them; this port gathers them). None picks "own" for "paper" and "batch" for "released".
    rotation: what the hard-negative slot (text, audio, video) and the released recipe's pair
      rotation count: "update" (the paper: "cycles deterministically with the step", the
      optimizer step) or "micro_batch" (the released code's forward counters `_neg_step` /
      `_tuple_step`, modeling L3074-3075 and L3180-3185, advance once per micro-batch, 8 per
      update at GRAD_ACCUM=8). None picks "update" for "paper" and "micro_batch" for "released".
      The trainer passes the chosen count as ``step`` to compute_losses and the host layout.
    pairs: the embedding-path pairs of the paper recipe's L_A, e.g. (("T", "V"),) for GVE's one
      text-video InfoNCE, (("TI", "V"),) for a composed-query task of the curriculum; None = the
      paper's (T, V), (T, A), (V, A).
    query_paths: paths of ``pairs`` embedded on each record's reference clip (its ``query_video``)
      instead of its own clip: ("TV",) for a text + video -> video task (tv2v), whose query is
      the record's text over the reference clip and whose document is the record's clip.
    """

    recipe: str = "paper"
    terms: Sequence[str] = TERMS   # stored as a tuple in canonical order
    l_A: float = 1.0
    l_D: float = 1.0
    l_T: float = 1.0
    temperature: float = 0.01
    tuple_similarity: str = "joint"
    hard_negative_pool: str | None = None
    rotation: str | None = None
    pairs: tuple[tuple[str, str], ...] | None = None
    query_paths: tuple[str, ...] = ()

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe={self.recipe!r}; expected one of {RECIPES}")
        if self.tuple_similarity not in TUPLE_SIMILARITIES:
            raise ValueError(
                f"tuple_similarity={self.tuple_similarity!r}; expected one of {TUPLE_SIMILARITIES}"
            )
        if self.hard_negative_pool not in (None, *NEGATIVE_POOLS):
            raise ValueError(
                f"hard_negative_pool={self.hard_negative_pool!r}; expected None or one of "
                f"{NEGATIVE_POOLS}"
            )
        if self.rotation not in (None, *ROTATIONS):
            raise ValueError(f"rotation={self.rotation!r}; expected None or one of {ROTATIONS}")
        if not self.temperature > 0:
            raise ValueError(f"temperature={self.temperature!r} must be > 0")
        terms = tuple(self.terms)
        unknown = [t for t in terms if t not in TERMS]
        if unknown or len(set(terms)) != len(terms):
            raise ValueError(f"terms={terms!r}; expected distinct names out of {TERMS}")
        # Canonical order and a tuple (lists from config files are unhashable).
        object.__setattr__(self, "terms", tuple(t for t in TERMS if t in terms))
        if self.pairs is not None:
            pairs = tuple(tuple(p) for p in self.pairs)
            if (not pairs or any(len(p) != 2 or p[0] == p[1] or not set(p) <= set(EMBED_PATHS) for p in pairs)
                    or self.recipe != "paper"):
                raise ValueError(f"pairs={self.pairs!r}: expected pairs of distinct embedding paths out of "
                                 f"{EMBED_PATHS}, with recipe 'paper' (got {self.recipe!r})")
            object.__setattr__(self, "pairs", pairs)
        query = tuple(self.query_paths)
        if query and (self.pairs is None or not set(query) <= {m for p in self.pairs for m in p}
                      or self.terms != ("L_A",) or any("V" not in m for m in query)):
            raise ValueError(f"query_paths={query!r}: expected video paths of explicit pairs ({self.pairs!r}) "
                             f"under L_A alone (terms {self.terms!r}): the reference clip has no augmented "
                             "view, no audio and no hard-negative tuple")
        object.__setattr__(self, "query_paths", query)

    @property
    def pair_list(self) -> tuple[tuple[str, str], ...]:
        """The L_A pairs of the paper recipe."""
        return _PAPER_PAIRS if self.pairs is None else self.pairs

    @property
    def pair_modalities(self) -> tuple[str, ...]:
        """The embedding paths L_A reads, in EMBED_PATHS order."""
        return tuple(m for m in EMBED_PATHS if any(m in p for p in self.pair_list))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LossConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown loss preset {name!r}; valid presets: {', '.join(PRESETS)}")
        return cls(terms=PRESETS[name], **overrides)

    @property
    def negative_pool(self) -> str:
        if self.hard_negative_pool is not None:
            return self.hard_negative_pool
        return "own" if self.recipe == "paper" else "batch"

    @property
    def counter(self) -> str:
        """The resolved ``rotation``."""
        if self.rotation is not None:
            return self.rotation
        return "update" if self.recipe == "paper" else "micro_batch"


def needed_views(cfg: LossConfig) -> ViewPlan:
    """The embeddings the active terms read: anchor paths, augmented-view paths, hard negative."""
    anchor: list[str] = []
    if "L_A" in cfg.terms:
        anchor += cfg.pair_modalities
    if "L_D" in cfg.terms:
        anchor += ["T", "V", "A"]
    if "L_D" in cfg.terms or ("L_T" in cfg.terms and cfg.tuple_similarity == "joint"):
        anchor += ["TVA"]
    aug: tuple[str, ...] = ()
    if "L_T" in cfg.terms:
        if cfg.tuple_similarity == "joint":
            aug = ("TVA",)
        else:
            anchor += ["T", "V", "A"]
            aug = ("T", "V", "A")
    anchor = [m for m in anchor if m not in cfg.query_paths]
    return ViewPlan(tuple(dict.fromkeys(anchor)), aug, "L_T" in cfg.terms, cfg.query_paths)


def released_pair(step) -> tuple[str, str]:
    """The released recipe's two single-modal embeddings: (T,A), (T,V), (A,V), rotating."""
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    return _RELEASED_PAIRS[step % 3]


def _nce_from_sims(s_xy, s_xn, s_yn, temperature):
    """Symmetric InfoNCE from similarities; target = diagonal of s_xy.

    x -> y rows: [s_xy[i, :], s_xn[i, :]]; y -> x rows: [s_xy[:, i], s_yn[i, :]].
    """

    def cross_entropy(sims, extra):
        logits = sims if extra is None else jnp.concatenate([sims, extra], axis=1)
        logits = logits / temperature
        return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits))

    return 0.5 * (cross_entropy(s_xy, s_xn) + cross_entropy(s_xy.T, s_yn))


def _concat_or_none(parts):
    return jnp.concatenate(parts, axis=1) if parts else None


def _as_f32(name, a, like=None):
    a = jnp.asarray(a)
    if a.ndim != 2 or (like is not None and a.shape != like.shape):
        want = "[B, D]" if like is None else f"{like.shape}"
        raise ValueError(f"{name} has shape {a.shape}; expected {want}")
    return a.astype(jnp.float32)


def info_nce(x: Float[Embeddings, "b d"], y: Float[Embeddings, "b d"], *, temperature: float,
             extra_negatives: Float[Embeddings, "b k d"] | None = None,
             shared_negatives: Float[Embeddings, "m d"] | None = None) -> Float[Array, ""]:
    """0.5 * [CE(x -> y) + CE(y -> x)] with the in-batch positives on the diagonal.

    x, y: [B, D]. extra_negatives [B, K, D]: per-anchor hard negatives; row i of *both*
    directions gets <x_i, n_ik> (x -> y) resp. <y_i, n_ik> (y -> x) appended, k = 1..K.
    shared_negatives [M, D]: a pool appended to every row of both directions (<x_i, m_j>,
    <y_i, m_j>). No stop_gradient is applied here; callers decide.
    """
    x = _as_f32("x", x)
    y = _as_f32("y", y, like=x)
    s_xn, s_yn = [], []
    if extra_negatives is not None:
        n = jnp.asarray(extra_negatives, jnp.float32)
        if n.ndim != 3 or n.shape[0] != x.shape[0] or n.shape[2] != x.shape[1]:
            raise ValueError(
                f"extra_negatives has shape {n.shape}; expected [B, K, D] with B, D = {x.shape}"
            )
        s_xn.append(jnp.einsum("bd,bkd->bk", x, n))
        s_yn.append(jnp.einsum("bd,bkd->bk", y, n))
    if shared_negatives is not None:
        m = jnp.asarray(shared_negatives, jnp.float32)
        if m.ndim != 2 or m.shape[1] != x.shape[1]:
            raise ValueError(f"shared_negatives has shape {m.shape}; expected [M, {x.shape[1]}]")
        s_xn.append(x @ m.T)
        s_yn.append(y @ m.T)
    return _nce_from_sims(x @ y.T, _concat_or_none(s_xn), _concat_or_none(s_yn), temperature)


def _cross_modal_sims(a, b, *, paired=False):
    """Mean over ordered pairs m != n of <a_m, b_n>, for modality stacks a, b: [3, B, D].

    Returns [B, B'] over all (i, j), or [B] for i == j when `paired`.
    """
    off_diagonal = 1.0 - jnp.eye(len(MODALITIES), dtype=jnp.float32)
    n_pairs = off_diagonal.sum()
    if paired:
        return jnp.einsum("mbd,nbd,mn->b", a, b, off_diagonal) / n_pairs
    return jnp.einsum("mid,njd,mn->ij", a, b, off_diagonal) / n_pairs


def _required_keys(cfg: LossConfig) -> dict[str, tuple[str, ...]]:
    """emb keys each active term reads (the same for both recipes)."""
    if cfg.tuple_similarity == "joint":
        tuple_keys = ("TVA", "TVA_aug", "TVA_neg")
    else:
        tuple_keys = tuple(m + s for s in ("", "_aug", "_neg") for m in MODALITIES)
    needs = {"L_A": cfg.pair_modalities, "L_D": (*MODALITIES, "TVA"), "L_T": tuple_keys}
    return {term: needs[term] for term in cfg.terms}


def _tuple_loss(e, cfg: LossConfig):
    """L_T: anchor vs augmented view, the step's hard-negative tuple appended without gradient."""
    sg = jax.lax.stop_gradient
    if cfg.tuple_similarity == "joint":
        neg = sg(e["TVA_neg"])
        if cfg.negative_pool == "own":
            return info_nce(
                e["TVA"], e["TVA_aug"], temperature=cfg.temperature, extra_negatives=neg[:, None]
            )
        return info_nce(e["TVA"], e["TVA_aug"], temperature=cfg.temperature, shared_negatives=neg)
    anchor = jnp.stack([e[m] for m in MODALITIES])
    positive = jnp.stack([e[m + "_aug"] for m in MODALITIES])
    neg = sg(jnp.stack([e[m + "_neg"] for m in MODALITIES]))
    if cfg.negative_pool == "own":
        s_xn = _cross_modal_sims(anchor, neg, paired=True)[:, None]
        s_yn = _cross_modal_sims(positive, neg, paired=True)[:, None]
    else:
        s_xn = _cross_modal_sims(anchor, neg)
        s_yn = _cross_modal_sims(positive, neg)
    return _nce_from_sims(_cross_modal_sims(anchor, positive), s_xn, s_yn, cfg.temperature)


def compute_losses(emb: Mapping[str, Embeddings], step, cfg: LossConfig
                   ) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """Total loss and per-term metrics for one step (jit-able; `step` may be traced).

    emb keys, all [B, D], L2-normalised, global batch:
      "T", "V", "A": single-path embeddings z_T, z_V, z_A;
      "TVA": joint anchor; "TVA_aug": joint of the augmented view; "TVA_neg": joint of the
        step's hard-negative tuple (tuple_similarity "joint");
      "T_aug", "V_aug", "A_aug", "T_neg", "V_neg", "A_neg": per-modality embeddings of the
        augmented view and of the hard-negative tuple (tuple_similarity "cross_modal_mean";
        for the negative, the anchor's T/V/A with the shuffled slot replaced).
    Only the keys of the active terms are read. The hard negative gets no gradient, nor does
    the joint teacher in L_D / Obj2.
    Metrics: "loss" and each active term, unweighted ("L_A", "L_D", "L_T"; with the paper
    recipe also the components "L_A/T-V", ..., "L_D/T", ...). Released recipe: "L_T" is Obj1,
    "L_D" Obj2, "L_A" Obj3.
    """
    if not cfg.terms:
        raise ValueError(
            "LossConfig has no loss terms on (the 'frozen' preset evaluates the backbone and "
            "is not trained)"
        )
    required = _required_keys(cfg)
    for term, keys in required.items():
        for key in keys:
            if key not in emb:
                raise KeyError(f"emb is missing {key!r}, needed by {term} ({cfg.recipe} recipe)")
    needed = sorted({k for keys in required.values() for k in keys})
    shape = jnp.shape(emb[needed[0]])
    for key in needed:
        if jnp.ndim(emb[key]) != 2 or jnp.shape(emb[key]) != shape:
            raise ValueError(
                f"emb[{key!r}] has shape {jnp.shape(emb[key])}; expected [B, D] = {shape} like "
                f"emb[{needed[0]!r}]"
            )
    e = {k: jnp.asarray(emb[k]).astype(jnp.float32) for k in needed}
    sg = jax.lax.stop_gradient
    nce = lambda x, y: info_nce(x, y, temperature=cfg.temperature)  # noqa: E731
    metrics = {}

    if cfg.recipe == "paper":
        if "L_A" in cfg.terms:
            parts = {f"L_A/{a}-{b}": nce(e[a], e[b]) for a, b in cfg.pair_list}
            metrics.update(parts)
            metrics["L_A"] = sum(parts.values()) / len(parts)
        if "L_D" in cfg.terms:
            teacher = sg(e["TVA"])
            parts = {f"L_D/{m}": nce(e[m], teacher) for m in MODALITIES}
            metrics.update(parts)
            metrics["L_D"] = sum(parts.values()) / len(parts)
    elif "L_A" in cfg.terms or "L_D" in cfg.terms:
        # The pair is chosen by a (possibly traced) step: index a stack of the three.
        stack = jnp.stack([e[m] for m in MODALITIES])
        table = jnp.array([[MODALITIES.index(m) for m in p] for p in _RELEASED_PAIRS], jnp.int32)
        pick = table[jnp.asarray(step, jnp.int32) % len(_RELEASED_PAIRS)]
        z_a, z_b = stack[pick[0]], stack[pick[1]]
        if "L_D" in cfg.terms:
            teacher = sg(e["TVA"])
            metrics["L_D"] = 0.5 * (nce(teacher, z_a) + nce(teacher, z_b))
        if "L_A" in cfg.terms:
            metrics["L_A"] = nce(z_a, z_b)
    if "L_T" in cfg.terms:
        metrics["L_T"] = _tuple_loss(e, cfg)

    weights = {"L_A": cfg.l_A, "L_D": cfg.l_D, "L_T": cfg.l_T}
    total = sum(weights[t] * metrics[t] for t in cfg.terms)
    metrics["loss"] = total
    return total, metrics
