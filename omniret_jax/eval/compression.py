"""Post-hoc embedding compression analysis (paper Appendix G).

A setting keeps d of the D dimensions, then optionally quantises, and the 12 directions are
re-scored with the compressed vectors of query and gallery alike:

    select "all":    every dimension (the fp32 reference row)
    select "random": d dimensions drawn without replacement by default_rng(seed), the same
                     index set for every path (query and gallery); repeated for each seed and
                     reported as mean and sample std (ddof=1) over seeds
    select "first":  the first d dimensions (the "head-of-vector" truncation check)

    quant "fp32":    the kept dimensions as they are (re-normalised: cosine of the sub-vector)
    quant "int8":    symmetric per-vector min-max: scale = max|x| / 127 per vector,
                     code = round(x / scale) in [-127, 127]. Score = cosine of the dequantised
                     vectors code * scale; the per-vector scale cancels in a cosine, so this
                     equals the cosine of the integer codes (what an int8 dot-product index
                     with per-vector norms computes).
    quant "binary":  sign hashing, bit = x >= 0 (zero maps to +1). With b in {-1, +1}^d,
                     cosine(b_q, b_g) = <b_q, b_g> / d = 1 - 2 * Hamming(b_q, b_g) / d, so
                     ranking by sign dot and by Hamming distance is identical; ties are
                     frequent and resolved in favour of the gold item like every other score.

Every compressed vector is returned L2-normalised, so retrieval.evaluate scores it by cosine
without a renormalisation warning.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from omniret_jax.eval import retrieval
from omniret_jax.eval.store import EmbeddingSet, load_embeddings

SELECTIONS = ("all", "random", "first")
QUANTS = ("fp32", "int8", "binary")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One compression operating point; `dim` None means all D dimensions (select "all")."""

    select: str = "all"
    dim: int | None = None
    quant: str = "fp32"

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown select {self.select!r}; choose from {SELECTIONS}")
        if self.quant not in QUANTS:
            raise ValueError(f"unknown quant {self.quant!r}; choose from {QUANTS}")
        if (self.select == "all") != (self.dim is None):
            raise ValueError(f"select 'all' goes with dim=None and the others with a dim; got "
                             f"select={self.select!r}, dim={self.dim}")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1, got {self.dim}")

    @property
    def name(self) -> str:
        label = {"fp32": "fp32", "int8": "int8", "binary": "bin"}[self.quant]
        if self.select == "all":
            return label
        return f"{label}/{self.dim}" + (" first-d" if self.select == "first" else "")


# The paper's three operating points plus the front-dim truncation check.
PAPER_SETTINGS = (
    Setting(),
    Setting("random", 1024, "int8"),
    Setting("random", 512, "binary"),
    Setting("first", 1024, "int8"),
    Setting("first", 512, "binary"),
)


def random_dims(total: int, d: int, seed: int) -> np.ndarray:
    """Sorted random subset of d of `total` dimensions (shared by all paths for one seed)."""
    _check_dim(total, d)
    return np.sort(np.random.default_rng(seed).choice(total, size=d, replace=False))


def _check_dim(total: int, d: int) -> None:
    if d > total:
        raise ValueError(f"cannot keep d={d} dimensions of D={total}-dimensional embeddings")


def _normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"row {int(np.argmax(norms[:, 0] == 0))} is all zeros after compression")
    return (x / norms).astype(np.float32)


def quantize_int8(x) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8: (codes int8 [N, d], scales float32 [N]); x ~ codes * scale."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=1) / 127.0
    if (scale == 0).any():
        raise ValueError(f"row {int(np.argmax(scale == 0))} is all zeros; int8 scale undefined")
    codes = np.clip(np.rint(x / scale[:, None]), -127, 127).astype(np.int8)
    return codes, scale.astype(np.float32)


def dequantize_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return codes.astype(np.float32) * scale[:, None]


def sign_bits(x) -> np.ndarray:
    """Sign hash as bool [N, d]: True where x >= 0."""
    return np.asarray(x) >= 0


def hamming_distances(bits_q: np.ndarray, bits_g: np.ndarray) -> np.ndarray:
    """Hamming distances [Q, G] of sign hashes via packed bytes and popcount."""
    pq, pg = np.packbits(bits_q, axis=1), np.packbits(bits_g, axis=1)
    return np.bitwise_count(pq[:, None, :] ^ pg[None, :, :]).sum(axis=2, dtype=np.int64)


def compress_rows(x, setting: Setting, dims: np.ndarray | None) -> np.ndarray:
    """Compressed, L2-normalised float32 rows whose cosine is the setting's similarity."""
    x = np.asarray(x, dtype=np.float32)
    if dims is not None:
        x = x[:, dims]
    if setting.quant == "int8":
        x = dequantize_int8(*quantize_int8(x))
    elif setting.quant == "binary":
        x = np.where(sign_bits(x), 1.0, -1.0).astype(np.float32)
    return _normalise(x)


def setting_dims(setting: Setting, total: int, seed: int) -> np.ndarray | None:
    """The kept dimension indices of a setting (None: all)."""
    if setting.select == "all":
        return None
    _check_dim(total, setting.dim)
    if setting.select == "first":
        return np.arange(setting.dim)
    return random_dims(total, setting.dim, seed)


def compress(emb: EmbeddingSet, setting: Setting, seed: int = 0) -> EmbeddingSet:
    """The same EmbeddingSet with every path compressed by one shared dimension subset."""
    dims = setting_dims(setting, emb.dim, seed)
    paths = {p: compress_rows(x, setting, dims) for p, x in emb.paths.items()}
    return EmbeddingSet(paths, emb.ids, emb.caption_ids,
                        source=f"{emb.source} [{setting.name}, seed {seed}]")


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def compression_table(embeddings, settings: Sequence[Setting] = PAPER_SETTINGS,
                      seeds: Sequence[int] = (0, 1, 2, 3, 4), *,
                      directions: Sequence[str] | None = None, mode: str = "first",
                      **block_kwargs) -> dict:
    """R@1 per direction and AVG single/dual/all for each setting (JSON-able).

    embeddings: an EmbeddingSet or the path of an embedding file. Random selections run once
    per seed; "all" and "first" are deterministic and run once.
    Returns {"settings": [{"name", "select", "dim", "quant", "seeds", "R@1": {direction:
    {"mean", "std"}}, "averages": {name: {"mean", "std"}}}, ...], "D": D, "mode": mode}.
    """
    if isinstance(embeddings, (str, os.PathLike)):
        embeddings = load_embeddings(embeddings)
    if not seeds:
        raise ValueError("seeds must not be empty")
    for s in settings:  # fail before any work on a d larger than D
        if s.dim is not None:
            _check_dim(embeddings.dim, s.dim)
    rows = []
    for s in settings:
        run_seeds = list(seeds) if s.select == "random" else [None]
        runs = [retrieval.evaluate(compress(embeddings, s, seed or 0), directions, mode=mode,
                                   **block_kwargs) for seed in run_seeds]
        dirs = list(runs[0]["directions"])
        rows.append({
            "name": s.name, "select": s.select, "dim": s.dim or embeddings.dim, "quant": s.quant,
            "seeds": [x for x in run_seeds if x is not None],
            "R@1": {d: _mean_std([r["directions"][d]["R@1"] for r in runs]) for d in dirs},
            "averages": {a: _mean_std([r["averages"][a] for r in runs])
                         for a in runs[0]["averages"]},
        })
    return {"D": embeddings.dim, "mode": mode, "settings": rows}


def _cell(stat: dict[str, float], with_std: bool) -> str:
    return f"{stat['mean']:.2f} ± {stat['std']:.2f}" if with_std else f"{stat['mean']:.2f}"


def compression_markdown(table: dict, per_direction: bool = False) -> str:
    """Markdown table: one row per setting; columns the R@1 averages (or every direction).
    Cells of random selections read "mean ± std" over seeds."""
    rows = table["settings"]
    if per_direction:
        cols = list(rows[0]["R@1"])
    else:
        cols = [a for a in retrieval.AVERAGES if a in rows[0]["averages"]]
        if not cols:
            raise ValueError("no R@1 average was computed (needs all 6 single or dual "
                             "directions); use per_direction=True")
    lines = ["| Setting | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        src = r["R@1"] if per_direction else r["averages"]
        with_std = r["select"] == "random"
        lines.append(f"| {r['name']} | " + " | ".join(_cell(src[c], with_std) for c in cols)
                     + " |")
    return "\n".join(lines) + "\n"
