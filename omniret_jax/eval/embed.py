"""Gallery embedding and scoring of a model: manifest -> embedding paths -> cache -> metrics.

The input pipeline runs as for evaluation (no shuffle, one epoch, centred audio crop, no
augmentation) and yields one clip at a time; clips are grouped into batches of `batch_size`
rows and the last batch is padded by repeating its last clip, so one compiled program serves
the whole gallery, and the pad rows are dropped. Batches are sharded over the mesh's batch
axes, parameters by the logical rules, as in training. The towers run once per batch and
every path reuses them (embedder.embed_paths).

A clip the pipeline would skip (unreadable media, empty or too long caption) would make the
gallery smaller than the manifest, which changes every metric: it is an error naming the clip.

GVE's visual queries: the image of the I / TI paths is a still frame of the clip
(``data.batch.still_frames``), and the composed query's text (TI) is the record's
``meta.composed_query`` (the synthetic corpus writes "the same shape, moving <motion>"), embedded
in a pass of its own whose records carry that text as their caption.

Mode "all" (multi-caption benchmarks): the text-bearing paths T, TV, TA get one row per
caption (store.caption_entries order); captions after a clip's first are embedded in a
second pass whose records repeat the clip with that caption.

Cache: OUTDIR/embeddings.safetensors (store.py format) plus OUTDIR/embeddings.json holding
the fingerprint of everything the vectors depend on (model/LoRA/embed/data config, the
checkpoint step and its metadata, mode, paths). A matching fingerprint reuses the file, whose
ids must then equal the manifest's; a different fingerprint re-embeds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from omniret_jax import build, sharding
from omniret_jax.build import ModelState
from omniret_jax.config import EmbedConfig
from omniret_jax.data.batch import caption_token_budget, cut_patches, prepare, still_frames, take_rows
from omniret_jax.data.manifest import ManifestRecord, read_manifest
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig
from omniret_jax.eval import compression as C
from omniret_jax.eval import retrieval
from omniret_jax.eval.store import (CAPTION_LEVEL_PATHS, PATH_NAMES, EmbeddingSet, caption_entries,
                                    load_embeddings, write_embeddings)
from omniret_jax.model.embedder import embed_paths

FINGERPRINT_FORMAT = 1
EMBEDDINGS_FILE = "embeddings.safetensors"
FINGERPRINT_FILE = "embeddings.json"
# The paper's compression operating points for D = 3584 (WAVE-7B's hidden size).
PAPER_DIM, PAPER_INT8_DIM, PAPER_BINARY_DIM = 3584, 1024, 512
COMPOSED, COMPOSED_KEY = "TI", "composed_query"
_DATA_KEYS = ("num_frames", "min_pixels", "max_pixels", "audio_seconds", "on_missing_audio", "max_caption_chars",
              "on_long_caption")


def paths_for(directions: Sequence[str], extra: Sequence[str] = ()) -> tuple[str, ...]:
    """Embedding paths (in PATH_NAMES order) that the directions need, plus ``extra`` ones (TVA,
    say, which no direction scores); unknown names raise."""
    unknown = [p for p in extra if p not in PATH_NAMES]
    if unknown:
        raise ValueError(f"unknown embedding path(s) {unknown}; known: {', '.join(PATH_NAMES)}")
    used = {p for d in directions for p in retrieval.direction_paths(d)} | set(extra)
    return tuple(p for p in PATH_NAMES if p in used)


def eval_pipeline_config(c, num_workers: int | None = None) -> PipelineConfig:
    """One clip per batch, in manifest order, once, with the centred audio crop; a record that
    fails is dropped (and then reported: the gallery must be complete), never replaced."""
    d = c.data
    return PipelineConfig(
        batch_size=1, seed=0, shuffle=False, num_epochs=1, num_frames=d.num_frames, min_pixels=d.min_pixels,
        max_pixels=d.max_pixels, audio_seconds=d.audio_seconds, audio_mode="center",
        on_missing_audio=d.on_missing_audio, max_caption_chars=d.max_caption_chars,
        on_long_caption=d.get("on_long_caption", "truncate"), augment=False, on_bad_sample="drop",
        num_workers=d.num_workers if num_workers is None else num_workers, patch_buckets=d.get("patch_buckets"))


def _embed_state(graphdef, trainable, frozen, inputs, ecfg):
    return embed_paths(nnx.merge(graphdef, trainable, frozen), inputs, ecfg)


# Module level, so models with the same graph and shapes (presets of one config) share programs.
_embed_jit = jax.jit(_embed_state, static_argnums=(0, 4))


def _concat(samples: list[dict]) -> dict:
    """Stacks one-row pipeline batches into one batch (lists joined, arrays concatenated, views
    such as ``query`` stacked alike)."""
    def join(values):
        if isinstance(values[0], dict):
            return _concat(values)
        return sum(values, []) if isinstance(values[0], list) else np.concatenate(values)

    return {k: join([s[k] for s in samples]) for k in samples[0]}


class GalleryEmbedder:
    """Embeds records with one placed model (eval mode, ``build.build_state``/``restore_trained``)
    in fixed-shape batches sharded over `mesh`. With several processes every process reads the
    same records, places its rows of each batch and gets every row's embedding back (a collective:
    all call it alike)."""

    def __init__(self, state: ModelState, ecfg: EmbedConfig, mesh, *, batch_size: int):
        sharding.batch_sharding(mesh, batch_size)  # the batch must split over the batch axes
        self.state, self.ecfg, self.mesh, self.batch_size = state, ecfg, mesh, batch_size
        self.rows = sharding.process_rows(mesh, batch_size)

    def embed_batch(self, batch: dict, paths: Sequence[str], patch_buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
        """{path: float32 [B, D]} for a batch of exactly `batch_size` rows; its video patches cut to
        the smallest of ``patch_buckets`` (the pipeline's ``patch_bucket_sizes``) that holds them."""
        s = self.state
        if patch_buckets:   # the whole batch's bucket, the same on every process
            batch = cut_patches(batch, patch_buckets)
        start, stop = self.rows   # every process holds the whole batch and places its own rows
        batch = take_rows(batch, start, stop)
        if any("I" in p for p in paths) and "image_patches" not in batch:
            batch = still_frames(batch, s.cfg.vision)
        host = prepare(batch, paths, s.cfg, s.tokens, self.ecfg, row_offset=start)
        inputs = sharding.shard_batch(host, self.mesh)  # every input leaf is batch-first
        out = sharding.fetch_global(_embed_jit(s.graphdef, s.trainable, s.frozen, inputs, self.ecfg))
        return {p: np.asarray(v, np.float32) for p, v in out.items()}

    def embed_records(self, records: Sequence[ManifestRecord], paths: Sequence[str], pcfg: PipelineConfig, *,
                      desc: str = "embed", progress: bool = True, query_paths: Sequence[str] = ()
                      ) -> dict[str, np.ndarray]:
        """{path: float32 [len(records), D]} in record order; ValueError if the pipeline skips one.
        ``query_paths``: as in ``embed_batches`` (the pipeline then loads the reference clips)."""
        if query_paths:
            pcfg = dataclasses.replace(pcfg, query_clip=True)
        return self.embed_batches(self.batches(records, pcfg, desc=desc, progress=progress), paths,
                                  pcfg.patch_bucket_sizes, query_paths=query_paths)

    def embed_batches(self, batches, paths: Sequence[str], patch_buckets: Sequence[int] = (), *,
                      query_paths: Sequence[str] = ()) -> dict[str, np.ndarray]:
        """{path: float32 [rows, D]} of (batch, real rows) pairs (``batches``), the pad rows dropped;
        ``query_paths`` embed each record's reference clip (the batch's ``query`` view: a text +
        video query) instead of its own clip."""
        out: dict[str, list[np.ndarray]] = {p: [] for p in paths}
        own = [p for p in paths if p not in query_paths]
        for batch, n in batches:
            embedded = self.embed_batch(batch, own, patch_buckets) if own else {}
            if query_paths:
                if "query" not in batch:
                    raise KeyError(f"paths {list(query_paths)} embed the records' reference clips: load them with "
                                   "the pipeline's query_clip option")
                embedded |= self.embed_batch(batch["query"], query_paths, patch_buckets)
            for p, e in embedded.items():
                out[p].append(e[:n])
        return {p: np.concatenate(v) for p, v in out.items()}

    def batches(self, records: Sequence[ManifestRecord], pcfg: PipelineConfig, *, desc: str = "embed",
                progress: bool = True):
        """Yields (batch of exactly ``batch_size`` rows, its real rows n) over ``records`` in order, the
        last padded by repeating its last clip; ValueError if the pipeline skips one."""
        expected = [r.id for r in records]
        pending: list[dict] = []
        done = 0
        bar = tqdm(total=len(records), desc=desc, unit="clip", disable=not progress)

        def padded():
            n = len(pending)
            rows = pending + [pending[-1]] * (self.batch_size - n)  # pad by repeating; dropped by the caller
            pending.clear()
            bar.update(n)
            return _concat(rows), n

        if pcfg.caption_tokens is None:  # captions tokenised in the pipeline, within the padded lengths
            pcfg = dataclasses.replace(pcfg, caption_tokens=caption_token_budget(self.ecfg))
        pipeline = DataPipeline(list(records), pcfg, tokens=self.state.tokens, process_index=0, process_count=1)
        try:
            for sample in pipeline:
                sid = sample["id"][0]
                if sid != expected[done]:
                    self._skipped(expected[done:expected.index(sid, done)], pipeline)
                done += 1
                pending.append(sample)
                if len(pending) == self.batch_size:
                    yield padded()
            if done < len(expected):
                self._skipped(expected[done:], pipeline)
            if pending:
                yield padded()
        finally:
            bar.close()
            pipeline.close()

    @staticmethod
    def _skipped(ids: list[str], pipeline: DataPipeline):
        shown = ", ".join(repr(i) for i in ids[:5]) + (" ..." if len(ids) > 5 else "")
        raise ValueError(f"the input pipeline could not load {len(ids)} gallery clip(s) ({shown}); an evaluation "
                         f"gallery must be complete: fix or remove them from the manifest.\n{pipeline.summary()}")

    def embed_gallery(self, records: Sequence[ManifestRecord], paths: Sequence[str], *, mode: str = "first",
                      pcfg: PipelineConfig, progress: bool = True) -> EmbeddingSet:
        """EmbeddingSet of the gallery: one row per clip, or per caption on T/TV/TA in mode "all"."""
        if mode not in retrieval.MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {retrieval.MODES}")
        ids = tuple(r.id for r in records)
        if COMPOSED in paths:
            rest = [p for p in paths if p != COMPOSED]
            own = self.embed_records(composed_records(records), [COMPOSED], pcfg, desc="embed composed",
                                     progress=progress)
            out = self.embed_gallery(records, rest, mode=mode, pcfg=pcfg, progress=progress) if rest else None
            if out is None:
                return EmbeddingSet(own, ids)
            return dataclasses.replace(out, paths={**out.paths, **own})
        if mode == "first":
            return EmbeddingSet(self.embed_records(records, paths, pcfg, progress=progress), ids)
        entries = caption_entries(records)
        captions: dict[str, list[str]] = {}
        for cid, text in entries:
            captions.setdefault(cid.rpartition("#")[0], []).append(text)
        firsts = [dataclasses.replace(r, caption=captions[r.id][0]) for r in records]
        first = self.embed_records(firsts, paths, pcfg, progress=progress)
        text_paths = [p for p in paths if p in CAPTION_LEVEL_PATHS]
        extra_records = [dataclasses.replace(r, id=f"{r.id}#{k}", caption=text, meta=None)
                         for r in records for k, text in enumerate(captions[r.id]) if k > 0]
        extra = (self.embed_records(extra_records, text_paths, pcfg, desc="embed captions", progress=progress)
                 if extra_records and text_paths else {})
        row = {r.id: i for i, r in enumerate(records)}
        extra_row = {r.id: i for i, r in enumerate(extra_records)}
        out = {}
        for p in paths:
            if p not in CAPTION_LEVEL_PATHS:
                out[p] = first[p]
                continue
            parts = [first[p][row[cid.rpartition("#")[0]]] if cid.endswith("#0") else extra[p][extra_row[cid]]
                     for cid, _ in entries]
            out[p] = np.stack(parts)
        return EmbeddingSet(out, ids, tuple(cid for cid, _ in entries))


def composed_records(records: Sequence[ManifestRecord]) -> list[ManifestRecord]:
    """The records with the composed query's text (``meta.composed_query``) as their caption."""
    out = []
    for r in records:
        text = (r.meta or {}).get(COMPOSED_KEY)
        if not isinstance(text, str) or not text:
            raise ValueError(f"record {r.id!r} has no meta[{COMPOSED_KEY!r}]: the composed query (TI path, "
                             "direction TI->V) needs its text")
        out.append(dataclasses.replace(r, caption=text))
    return out


# ---------------------------------------------------------------------------------------- checkpoint


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """Where trained trainables come from: None dir = the untrained ("frozen") model."""

    directory: Path | None
    step: int | None

    @property
    def label(self) -> str:
        return "none (frozen base)" if self.directory is None else f"{self.directory} step {self.step}"


def _steps(directory: Path) -> list[int]:
    return sorted(int(q.name) for q in directory.iterdir() if q.name.isdigit() and (q / "trainables").is_dir())


def resolve_checkpoint(arg: str | os.PathLike) -> CheckpointRef:
    """`none`, a training workdir (its newest step), its `checkpoints` dir (newest step), or one
    step directory in it."""
    if str(arg).lower() == "none":
        return CheckpointRef(None, None)
    p = Path(arg).absolute()
    if not p.is_dir():
        raise FileNotFoundError(f"checkpoint {arg}: no such directory (give a training workdir, its "
                                f"checkpoints/ directory, one step directory in it, or 'none')")
    if p.name.isdigit() and (p / "trainables").is_dir():
        return CheckpointRef(p.parent, int(p.name))
    directory = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    steps = _steps(directory)
    if not steps:
        raise ValueError(f"checkpoint {arg}: no training checkpoint in {directory} (expected <step>/trainables "
                         f"directories written by omniret_jax.train)")
    return CheckpointRef(directory, steps[-1])


def model_dim(c) -> int:
    """Embedding width D of the config's model, without building it."""
    from omniret_jax.config import backbone_config, qwen_vl_of_size, read_hf_config, thinker_of_size

    if c.model.init == "random":
        if "tiny" in c.model:
            return int(c.model.tiny.hidden_size)
        of_size = qwen_vl_of_size if build.backbone(c) == "gve" else thinker_of_size
        return of_size(c.model.get("size", "7b")).text.hidden_size
    return backbone_config(read_hf_config(c.model.checkpoint)).text.hidden_size


def load_state(c, ref: CheckpointRef, mesh) -> ModelState:
    """The placed eval-mode model: untrained (fresh, zero-effect adapters) for ref.directory None,
    else with the trained adapters and heads."""
    if ref.directory is None:
        return build.build_state(c, mesh, train=False)
    return build.restore_trained(c, ref.directory, mesh, ref.step)[0]


def fingerprint(c, ref: CheckpointRef, mode: str, paths: Sequence[str]) -> str:
    """Hash of everything the embeddings depend on (not the batch size or mesh)."""
    d = c.to_dict()
    h = hashlib.sha256()
    ckpt = None
    if ref.directory is not None:
        meta = ref.directory / str(ref.step) / "meta"
        ckpt = {"dir": str(ref.directory), "step": ref.step,
                "meta": [hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(meta.rglob("*")) if f.is_file()]}
    payload = {"format": FINGERPRINT_FORMAT, "model": d["model"], "embed": d["embed"],
               "lora": d["lora"] if ref.directory is not None else None,
               "data": {k: d["data"][k] for k in _DATA_KEYS},
               "checkpoint": ckpt, "mode": mode, "paths": list(paths)}
    h.update(json.dumps(payload, sort_keys=True, default=list).encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- scoring


def compression_settings(dim: int, int8_dim: int | None = None, binary_dim: int | None = None):
    """The paper's operating points (int8 at 1024, sign hash at 512, random and first-d); a
    backbone narrower than those keeps the paper's fractions of D = 3584 instead."""
    def auto(paper):
        return paper if dim >= paper else max(1, round(dim * paper / PAPER_DIM))

    i8 = auto(PAPER_INT8_DIM) if int8_dim is None else int8_dim
    b = auto(PAPER_BINARY_DIM) if binary_dim is None else binary_dim
    return (C.Setting(), C.Setting("random", i8, "int8"), C.Setting("random", b, "binary"),
            C.Setting("first", i8, "int8"), C.Setting("first", b, "binary"))


def results_markdown(result: dict) -> str:
    lines = ["# Retrieval evaluation", "",
             f"- checkpoint: {result['checkpoint']}", f"- gallery: {result['gallery']} clips, mode "
             f"{result['mode']!r}, D = {result['dim']}", f"- embeddings: {result['embeddings']['file']} "
             f"({'cached' if result['embeddings']['cached'] else 'computed'})", "",
             retrieval.markdown_table(result)]
    if "compression" in result:
        table = result["compression"]
        per_direction = not table["settings"][0]["averages"]
        lines += [f"## Compression (R@1{' per direction' if per_direction else ' averages'}; random "
                  f"selections: mean ± std over seeds {table['settings'][1]['seeds']})", "",
                  C.compression_markdown(table, per_direction=per_direction)]
    return "\n".join(lines)


def _stored_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):  # missing or damaged: embed again
        return None


def one_host(what: str) -> None:
    """Evaluation writes its results from one process; the trainer's prober embeds on many."""
    if jax.process_count() > 1:
        raise ValueError(f"{what} runs in one process (it writes the results); this job has "
                         f"{jax.process_count()} processes")


def evaluate_checkpoint(c, checkpoint, manifest, out, *, mode: str = "first", block: int = 1024,
                        batch_size: int | None = None, directions: Sequence[str] | None = None,
                        compression: bool = False, compression_seeds: Sequence[int] = (0, 1, 2, 3, 4),
                        recompute: bool = False, progress: bool = True, extra_paths: Sequence[str] = ()) -> dict:
    """Embeds the manifest's gallery with the config's model and `checkpoint` (see
    resolve_checkpoint), caches the embeddings in `out`, scores the directions (default: all
    12) and writes out/results.json and out/results.md. `extra_paths` are embedded and cached
    too. Returns the results dict."""
    one_host("evaluation")
    if mode not in retrieval.MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {retrieval.MODES}")
    if directions is None:  # the config's own (GVE has no audio), else the 12
        directions = c.get("eval", {}).get("directions") or retrieval.DIRECTIONS
    directions = list(directions)
    paths = paths_for(directions, extra_paths)  # unknown directions fail here, before any model work
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    records = read_manifest(manifest)
    ref = resolve_checkpoint(checkpoint)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emb_file, fp_file = out / EMBEDDINGS_FILE, out / FINGERPRINT_FILE

    fp = fingerprint(c, ref, mode, paths)
    cached = not recompute and emb_file.exists() and _stored_fingerprint(fp_file) == fp
    t0 = time.perf_counter()
    if cached:
        try:
            emb = load_embeddings(emb_file, manifest=records, expected_dim=model_dim(c))
        except ValueError as e:
            raise ValueError(f"{e}\nThe cached embeddings in {out} do not fit this model and gallery: pass "
                             f"--recompute (recompute=True) or use another output directory.") from e
    else:
        mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
        embedder = GalleryEmbedder(load_state(c, ref, mesh), build.embed_config(c), mesh,
                                   batch_size=batch_size or c.train.batch_size)
        emb = embedder.embed_gallery(records, paths, mode=mode, pcfg=eval_pipeline_config(c), progress=progress)
        fp_file.unlink(missing_ok=True)  # a crash below leaves no stale fingerprint behind
        write_embeddings(emb_file, emb.paths, emb.ids, emb.caption_ids)
        fp_file.write_text(json.dumps({"fingerprint": fp, "checkpoint": ref.label, "mode": mode,
                                       "paths": list(paths)}, indent=1) + "\n")
    embed_s = time.perf_counter() - t0
    result = retrieval.evaluate(emb, directions, mode=mode, query_block=block)
    result.update(checkpoint=ref.label, step=ref.step, gallery=len(records), dim=emb.dim,
                  embeddings={"file": str(emb_file), "cached": bool(cached), "fingerprint": fp,
                              "seconds": round(embed_s, 3)})
    if compression:
        result["compression"] = C.compression_table(emb, compression_settings(emb.dim), compression_seeds,
                                                    directions=directions, mode=mode, query_block=block)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results.md").write_text(results_markdown(result))
    return result
