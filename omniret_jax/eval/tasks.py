"""Per-task scoring: the curriculum's prober, and evaluation grouped as UVRB reports it.

``Prober``: the alignment of every curriculum task (``data.curriculum.alignment``: mean margin of
a query's document over its hardest other probe document, and R@1) on the fixed probe subsets,
embedded once decoded (the clips are cached on the host) by the prober: the model being trained
(``current``) or the frozen base (``base``: the fresh adapters, scored once since it never changes).
It embeds in eval mode (no adapter dropout) with the trainer's parameters, no second model.
With several processes each decodes the whole subsets, embeds the rows of every probe batch its
devices hold and gathers the rest, so every process scores alike and draws the same tasks.

``evaluate_tasks``: a multi-task manifest (``task`` per record) and benchmark manifests (the
adapters' ``meta.benchmark``), each task scored on its own gallery (its records' documents,
diagonal relevance) in its direction (t2v: T->V, i2v: I->V, ti2v: TI->V, v2t: V->T, tv2v: TV->V
with TV over each record's reference clip), then R@1 averaged per query group (textual,
composed, visual) and per ability (coarse, fine-grained, long-context), the two ways UVRB
groups its results. Benchmarks' abilities (``BENCHMARK_ABILITY``) are UVRB's (the GVE
paper's Table 4) for the datasets UVRB holds, and this project's assignment for the others.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from flax import nnx

from omniret_jax import build, sharding
from omniret_jax.build import ModelState
from omniret_jax.data.curriculum import ABILITIES, GROUPS, Task, alignment, task_table
from omniret_jax.data.manifest import ManifestRecord, read_manifest
from omniret_jax.eval import retrieval
from omniret_jax.eval.embed import GalleryEmbedder, eval_pipeline_config, load_state, one_host, resolve_checkpoint
from omniret_jax.eval.store import EmbeddingSet

# The video benchmarks the adapters write (eval.benchmarks), as text -> video tasks, and the
# ability each is averaged under: UVRB's for its datasets (MSR-VTT, DiDeMo paragraphs and CRB-G
# coarse; CRB-S, VDC-O spatial, CRB-T temporal and DREAM-E partially relevant are fine-grained;
# VDC-D long-context), ours for MSVD, VATEX and the VDC captions UVRB does not score.
BENCHMARK_ABILITY = {"msrvtt_1ka": "coarse", "didemo": "coarse", "crb_g": "coarse", "crb_s": "fine-grained",
                     "crb_t": "fine-grained", "vdc_o": "fine-grained", "dream_e": "fine-grained",
                     "vdc_d": "long-context", "msvd": "coarse", "vatex": "coarse", "vdc_short": "coarse",
                     "vdc_background": "fine-grained", "vdc_camera": "fine-grained"}
# Benchmarks whose every caption is a query of its clip (DREAM-E: each event; mode "all").
EVERY_CAPTION = {"dream_e"}


def eval_mode(state: ModelState, wrt) -> ModelState:
    """``state`` with the graph of its model in eval mode (adapter dropout off), the same arrays."""
    model = nnx.merge(state.graphdef, state.trainable, state.frozen)
    model.eval()
    return dataclasses.replace(state, graphdef=nnx.split(model, wrt, ...)[0])


PROBE_CLIPS_PER_WORKER = 64   # probe clips per decode process (fewer: decoded in the trainer's thread)


class Prober:
    """``prober(trainable)`` -> {task: {"alignment", "R@1", "margins"}} on each task's probe records."""

    def __init__(self, state: ModelState, c, mesh, tasks: Mapping[str, Task],
                 subsets: Mapping[str, Sequence[ManifestRecord]], *, wrt, base: bool, progress: bool = True):
        self.state, self.tasks, self.base = eval_mode(state, wrt), dict(tasks), base
        self.embedder = GalleryEmbedder(self.state, build.embed_config(c), mesh, batch_size=int(c.train.batch_size))
        # A probe subset is small: starting data.num_workers processes for 16 clips costs more than
        # decoding them here (measured: 5.5 s a clip with 16 workers on 2 cores, 0.05 s in-thread).
        clips = max(map(len, subsets.values()), default=0)
        self.pcfg = eval_pipeline_config(c, num_workers=min(int(c.data.num_workers), clips // PROBE_CLIPS_PER_WORKER))
        self.batches = {t: list(self.embedder.batches(rs, dataclasses.replace(
            self.pcfg, query_clip=self.tasks[t].spec.query_clip), desc=f"probe clips {t}", progress=progress))
            for t, rs in subsets.items()}
        self._cached: dict | None = None

    def __call__(self, trainable) -> dict[str, dict]:
        if self.base and self._cached is not None:
            return self._cached
        self.embedder.state = dataclasses.replace(self.state, trainable=trainable)
        out = {}
        for t, batches in self.batches.items():
            kind = self.tasks[t].spec
            e = self.embedder.embed_batches(batches, (kind.query, kind.document), self.pcfg.patch_bucket_sizes,
                                            query_paths=kind.query_paths)
            out[t] = alignment(e[kind.query], e[kind.document])
        self._cached = out if self.base else None
        return out


def manifest_tasks(records: Sequence[ManifestRecord], tasks: Mapping[str, Task]) -> dict[str, tuple[Task, list]]:
    """{task: (Task, its records)}: a record's ``task`` (from ``tasks``), else its benchmark's as a
    t2v task (``BENCHMARK_ABILITY``). Raises naming the record's task or benchmark."""
    out: dict[str, tuple[Task, list]] = {}
    for r in records:
        name = r.task or (r.meta or {}).get("benchmark")
        if name is None:
            raise ValueError(f"record {r.id!r} names no task and no meta.benchmark: per-task evaluation needs one")
        if name not in out:
            if name in tasks:
                task = tasks[name]
            elif r.task is None and name in BENCHMARK_ABILITY:
                task = Task(name, "t2v", 0, (), BENCHMARK_ABILITY[name])
            else:
                raise ValueError(f"record {r.id!r}: task {name!r} is neither in config.curriculum.tasks "
                                 f"({sorted(tasks)}) nor a video benchmark ({sorted(BENCHMARK_ABILITY)})")
            out[name] = (task, [])
        out[name][1].append(r)
    return out


def grouped(per_task: Mapping[str, Mapping]) -> dict[str, dict[str, float]]:
    """Mean R@1 of the tasks in each UVRB query group and ability that has any, and overall."""
    def mean(names):
        return float(np.mean([per_task[t]["R@1"] for t in names]))

    out = {"groups": {}, "abilities": {}}
    for key, values, field in (("groups", GROUPS, "group"), ("abilities", ABILITIES, "ability")):
        for v in values:
            names = [t for t, r in per_task.items() if r[field] == v]
            if names:
                out[key][v] = mean(names)
    out["overall"] = mean(per_task)
    return out


def evaluate_tasks(c, checkpoint, manifests: Sequence[str], out, *, batch_size: int | None = None,
                   progress: bool = True) -> dict:
    """Scores every task of ``manifests`` with the config's model and ``checkpoint``
    (``embed.resolve_checkpoint``); writes out/results_tasks.json and .md; returns the dict."""
    one_host("per-task evaluation")
    table = task_table(c.curriculum.tasks.to_dict()) if "curriculum" in c else {}
    records = [r for m in manifests for r in read_manifest(m)]
    tasks = manifest_tasks(records, table)
    ref = resolve_checkpoint(checkpoint)
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    embedder = GalleryEmbedder(load_state(c, ref, mesh), build.embed_config(c), mesh,
                               batch_size=batch_size or int(c.train.batch_size))
    pcfg = eval_pipeline_config(c)
    per_task = {}
    for name, (task, rs) in tasks.items():
        kind = task.spec
        if name in EVERY_CAPTION and name not in table:   # the benchmark, not a curriculum task of that name
            mode = "all"
            emb = embedder.embed_gallery(rs, (kind.query, kind.document), mode=mode, pcfg=pcfg, progress=progress)
        else:
            mode = "first"
            emb = EmbeddingSet(embedder.embed_records(rs, (kind.query, kind.document), pcfg, desc=f"embed {name}",
                                                      progress=progress, query_paths=kind.query_paths),
                               tuple(r.id for r in rs))
        res = retrieval.evaluate(emb, [kind.direction], mode=mode)
        per_task[name] = dict(res["directions"][kind.direction], kind=task.kind, direction=kind.direction,
                              group=kind.group, ability=task.ability)
    result = {"checkpoint": ref.label, "step": ref.step, "units": "R@k, MRR in percent", "tasks": per_task,
              **grouped(per_task)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results_tasks.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "results_tasks.md").write_text(tasks_markdown(result))
    return result


def tasks_markdown(result: Mapping) -> str:
    lines = ["# Per-task retrieval (UVRB grouping)", "", f"- checkpoint: {result['checkpoint']}", "",
             "| task | direction | group | ability | queries | R@1 | R@5 | R@10 | MRR |", "|---|---|---|---|---|---|---|---|---|"]
    for t, r in result["tasks"].items():
        lines.append(f"| {t} | {r['direction']} | {r['group']} | {r['ability']} | {r['queries']} | {r['R@1']:.2f} | "
                     f"{r['R@5']:.2f} | {r['R@10']:.2f} | {r['MRR']:.2f} |")
    lines += ["", "| R@1 mean over | value |", "|---|---|"]
    lines += [f"| {g} | {v:.2f} |" for g, v in (result["groups"] | result["abilities"]).items()]
    lines.append(f"| all tasks | {result['overall']:.2f} |")
    return "\n".join(lines) + "\n"

