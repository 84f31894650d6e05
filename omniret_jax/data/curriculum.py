"""The Modality Pyramid (GVE's curriculum), host side: the task table, task-homogeneous batches, the schedule.

A multi-task manifest names each record's task (``ManifestRecord.task``); ``config.curriculum.tasks``
gives every task its kind (query -> document, ``KINDS``), its pyramid level, its prerequisite
tasks and the ability it trains (coarse, fine-grained, long-context: how UVRB groups results).
Every global batch holds one task's records (``TaskPipelines``: one input pipeline per task), so
its in-batch negatives are documents of the same kind of problem; the task of update u is drawn
by ``Schedule.task_for(u)``.

The schedule. GVE's paper describes the shape (a prober scores how well each task is already
aligned; tasks are scheduled by their dependencies, foundational grounding first; a temperature
moves sampling towards harder tasks) but not the formula. What follows is this project's
reconstruction, not the published schedule:

    probe at updates k = 0, P, 2P, ... (P = curriculum.probe_every; 0 = once per epoch) with the
    prober (the frozen base model or the current one) on a fixed seeded probe subset of each task:
        s_i(q) = cos(query q, its document) - max over the subset's other documents d of cos(q, d)
        a_i    = mean over the task's probe queries of s_i(q)          (alignment, a mean margin)
        R@1_i  = share of probe queries whose document ranks first
    unlocked: U_k = U_{k-P} + {i : every prerequisite j of i is in U_k and a_j >= unlock_threshold}
              (tasks without prerequisites are always unlocked; a task never locks again)
    temperature: sigma(u) = sigma_start * (sigma_end / sigma_start) ** (u / (T - 1)), T = train.steps
    weights of update u (k = the last probe at or before u), softmax over difficulty 1 - a_i:
        w_i(u) = exp((1 - a_i) / sigma(u)) / sum_{j in U_k} exp((1 - a_j) / sigma(u)),  i in U_k; else 0
    task of update u: a draw from w(u) with numpy's PCG64 seeded by (train.seed, u)

A high sigma early samples the unlocked (foundational) tasks about evenly; as sigma falls the
hardest unlocked task, typically a dependent one unlocked later, takes most updates. The
``uniform`` schedule (the ablation baseline) has every task unlocked and w_i = 1 / n throughout;
it still probes, for the log. Not built: the optional within-task weighting of samples.

Resumable: the draw is a pure function of (seed, update, probe history), and the history
(``Schedule.state()``: every probe's scores and unlocked set) travels in the checkpoint's data
state, so a run stopped at update k and resumed draws the same tasks.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from omniret_jax.data.manifest import BadRecord, ManifestRecord
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig, PipelineSummary


@dataclasses.dataclass(frozen=True)
class TaskKind:
    """A task's query path, document path (``omniret_jax.config.EMBED_PATHS``), UVRB query group,
    and whether the query embeds the record's reference clip (``query_video``) instead of its own."""
    query: str
    document: str
    group: str        # "textual" | "composed" | "visual"
    query_clip: bool = False

    @property
    def query_paths(self) -> tuple[str, ...]:
        """The paths embedded on each record's reference clip (``LossConfig.query_paths``)."""
        return (self.query,) if self.query_clip else ()

    @property
    def direction(self) -> str:
        """The eval direction (``eval.retrieval``) this kind scores."""
        return f"{self.query}->{self.document}"


# The image queries are the record's still frame; tv2v's query is the record's text over its
# reference clip (``query_video``), its document the record's own clip.
KINDS = {
    "t2v": TaskKind("T", "V", "textual"),
    "v2t": TaskKind("V", "T", "textual"),
    "i2v": TaskKind("I", "V", "visual"),
    "ti2v": TaskKind("TI", "V", "composed"),
    "tv2v": TaskKind("TV", "V", "composed", query_clip=True),
}
GROUPS = ("textual", "composed", "visual")
ABILITIES = ("coarse", "fine-grained", "long-context")
SCHEDULES = ("pyramid", "uniform")
PROBERS = ("current", "base")
_DRAW = 0x70797261   # the task draw's stream (seeded with train.seed and the update)
_SUBSET = 0x70726f62  # the probe subsets' stream


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str
    level: int
    prerequisites: tuple[str, ...]
    ability: str

    @property
    def spec(self) -> TaskKind:
        return KINDS[self.kind]


def task_table(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Task]:
    """``config.curriculum.tasks`` ({name: {kind, level, prerequisites, ability}}; kind defaults to
    the name) checked and ordered by (level, name). Raises naming the task: an unknown kind or
    ability, an unknown prerequisite, a prerequisite cycle, a prerequisite not on a lower level."""
    if not tasks:
        raise ValueError("config.curriculum.tasks is empty: a curriculum needs at least one task")
    out = {}
    for name, t in tasks.items():
        t = dict(t)
        unknown = sorted(set(t) - {"kind", "level", "prerequisites", "ability"})
        if unknown:
            raise ValueError(f"curriculum task {name!r}: unknown key(s) {unknown}; expected kind, level, "
                             "prerequisites, ability")
        kind = t.get("kind") or name
        if kind not in KINDS:
            raise ValueError(f"curriculum task {name!r}: kind {kind!r} is not one of {sorted(KINDS)}")
        ability = t.get("ability", "coarse")
        if ability not in ABILITIES:
            raise ValueError(f"curriculum task {name!r}: ability {ability!r} is not one of {ABILITIES}")
        pre = t.get("prerequisites") or ()
        if isinstance(pre, str):
            raise ValueError(f"curriculum task {name!r}: prerequisites must be a tuple of task names, not {pre!r}")
        out[name] = Task(name, kind, int(t.get("level", 0)), tuple(pre), ability)
    for t in out.values():
        missing = [p for p in t.prerequisites if p not in out]
        if missing:
            raise ValueError(f"curriculum task {t.name!r}: prerequisite(s) {missing} are not in the task table "
                             f"(known: {sorted(out)})")
    cycle = _cycle(out)
    if cycle:
        raise ValueError(f"curriculum tasks: prerequisite cycle {' -> '.join(cycle)}; the pyramid needs a "
                         f"dependency order (task {cycle[0]!r} can never unlock)")
    for t in out.values():
        low = [p for p in t.prerequisites if out[p].level >= t.level]
        if low:
            raise ValueError(f"curriculum task {t.name!r} (level {t.level}): prerequisite(s) {low} must sit on a "
                             "lower pyramid level")
    return {t.name: t for t in sorted(out.values(), key=lambda t: (t.level, t.name))}


def _cycle(tasks: Mapping[str, Task]) -> list[str]:
    """One prerequisite cycle as a closed path of names, or [] (depth-first search)."""
    state: dict[str, int] = {}        # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(name: str) -> list[str]:
        state[name] = 1
        stack.append(name)
        for p in tasks[name].prerequisites:
            if state.get(p) == 1:
                return stack[stack.index(p):] + [p]
            if p not in state:
                found = visit(p)
                if found:
                    return found
        stack.pop()
        state[name] = 2
        return []

    for name in sorted(tasks):
        if name not in state:
            found = visit(name)
            if found:
                return found
    return []


def split_by_task(records: Sequence[ManifestRecord], tasks: Mapping[str, Task], batch_size: int
                  ) -> dict[str, list[ManifestRecord]]:
    """The records of each task, in manifest order. Raises naming the task or record: a record
    without a task, a task the table lacks, a tv2v record without its reference clip, a task
    with fewer records than one global batch."""
    by_task: dict[str, list[ManifestRecord]] = {name: [] for name in tasks}
    untasked = [r.id for r in records if r.task is None]
    if untasked:
        raise ValueError(f"{len(untasked)} manifest record(s) name no task (e.g. {untasked[:3]}): with a curriculum "
                         "every record needs a 'task' field")
    unknown: dict[str, list[str]] = {}
    for r in records:
        (by_task[r.task] if r.task in by_task else unknown.setdefault(r.task, [])).append(r)
    if unknown:
        shown = "; ".join(f"task {t!r} ({len(rs)} records, e.g. {rs[0].id!r})" for t, rs in sorted(unknown.items()))
        raise ValueError(f"manifest tasks missing from config.curriculum.tasks: {shown} (known: {sorted(tasks)})")
    for name, rs in by_task.items():
        lacking = [r.id for r in rs if tasks[name].spec.query_clip and r.query_video is None]
        if lacking:
            raise ValueError(f"curriculum task {name!r} ({tasks[name].kind}: text + reference video -> video): "
                             f"{len(lacking)} record(s) have no 'query_video' (e.g. {lacking[:3]})")
        if len(rs) < batch_size:
            raise ValueError(f"curriculum task {name!r} has {len(rs)} manifest record(s), fewer than one global batch "
                             f"of {batch_size} (train.batch_size): its batches are task-homogeneous")
    return by_task


def probe_subsets(by_task: Mapping[str, Sequence[ManifestRecord]], size: int, seed: int
                  ) -> dict[str, list[ManifestRecord]]:
    """Each task's fixed probe subset: ``size`` records (all, if fewer) drawn without replacement
    from (seed, task index), in manifest order."""
    out = {}
    for i, (name, rs) in enumerate(by_task.items()):
        pick = np.random.default_rng([seed, _SUBSET, i]).choice(len(rs), min(size, len(rs)), replace=False)
        out[name] = [rs[j] for j in sorted(pick)]
    return out


def alignment(queries: np.ndarray, documents: np.ndarray) -> dict[str, Any]:
    """Probe scores of one task from L2-normalised [n, D] query and document embeddings (row i's
    gold is document i): per-query margins (positive minus hardest other document), their mean
    (the alignment) and R@1 (rank = 1 + documents scoring strictly higher than the gold)."""
    q, d = np.asarray(queries, np.float64), np.asarray(documents, np.float64)
    if q.shape != d.shape or q.ndim != 2 or len(q) < 2:
        raise ValueError(f"probe embeddings {q.shape} and {d.shape}: need two equal [n >= 2, D] arrays")
    s = q @ d.T
    pos = np.diagonal(s).copy()
    np.fill_diagonal(s, -np.inf)
    margins = pos - s.max(axis=1)
    return {"alignment": float(margins.mean()), "R@1": float(np.mean(margins > 0)), "margins": margins}


@dataclasses.dataclass(frozen=True)
class CurriculumConfig:
    schedule: str = "pyramid"
    probe_every: int = 0           # updates between probes; 0 = once per epoch
    probe_size: int = 16
    prober: str = "current"
    unlock_threshold: float = 0.05
    sigma_start: float = 1.0
    sigma_end: float = 0.1

    def __post_init__(self):
        problems = []
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule={self.schedule!r} is not one of {SCHEDULES}")
        if self.prober not in PROBERS:
            problems.append(f"prober={self.prober!r} is not one of {PROBERS}")
        if self.probe_every < 0 or self.probe_size < 2:
            problems.append(f"need probe_every >= 0 (0: once per epoch) and probe_size >= 2, got {self.probe_every} "
                            f"and {self.probe_size}")
        if not (self.sigma_start > 0 and self.sigma_end > 0):
            problems.append(f"sigma_start={self.sigma_start} and sigma_end={self.sigma_end} must be > 0")
        if problems:
            raise ValueError("config.curriculum: " + "; ".join(problems))


class Schedule:
    """Which task each update trains (module docstring), from the probe history.

    Thread-safe: the trainer's producer thread asks ``task_for(u, stop)`` while the main thread
    records probes; a draw waits until the probe its update needs is recorded."""

    def __init__(self, tasks: Mapping[str, Task], cfg: CurriculumConfig, *, seed: int, total: int, every: int):
        if every < 1 or total < 1:
            raise ValueError(f"probe period {every} and train.steps {total} must be >= 1")
        self.tasks, self.cfg, self.seed, self.total, self.every = dict(tasks), cfg, seed, total, every
        self.history: list[dict[str, Any]] = []
        self._drawn: dict[int, str] = {}    # task_for's draws (fixed once their probe is recorded)
        self._changed = threading.Condition()

    # ---- probes
    def due(self, updates: int) -> bool:
        """Whether a probe must run before update ``updates`` (0-based) is laid out."""
        return updates < self.total and updates % self.every == 0 and not self._probe_at(updates)

    def record(self, updates: int, scores: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
        """Adds the probe taken after ``updates`` updates ({task: {"alignment", "R@1"}}); returns it
        with the tasks it unlocks."""
        missing = sorted(set(self.tasks) - set(scores))
        if missing:
            raise ValueError(f"probe at update {updates} lacks task(s) {missing}")
        with self._changed:
            if self.history and updates <= self.history[-1]["update"]:
                raise ValueError(f"probe at update {updates} after one at {self.history[-1]['update']}")
            before = set(self.history[-1]["unlocked"]) if self.history else set()
            unlocked = self._unlocked(before, scores)
            entry = {"update": int(updates), "unlocked": [t for t in self.tasks if t in unlocked],
                     "scores": {t: {"alignment": float(scores[t]["alignment"]), "R@1": float(scores[t]["R@1"])}
                                for t in self.tasks}}
            self.history.append(entry)
            self._changed.notify_all()
        return dict(entry, newly=[t for t in entry["unlocked"] if t not in before])

    def _unlocked(self, before: set[str], scores) -> set[str]:
        if self.cfg.schedule == "uniform":
            return set(self.tasks)
        out = set(before)
        for t in self.tasks.values():   # (level, name) order: prerequisites come first
            if all(p in out and scores[p]["alignment"] >= self.cfg.unlock_threshold for p in t.prerequisites):
                out.add(t.name)
        return out

    def _probe_at(self, updates: int) -> dict[str, Any] | None:
        for entry in reversed(self.history):
            if entry["update"] == updates:
                return entry
        return None

    # ---- the draw
    def sigma(self, u: int) -> float:
        c = self.cfg
        return c.sigma_start * (c.sigma_end / c.sigma_start) ** (u / max(self.total - 1, 1))

    def weights(self, u: int) -> dict[str, float]:
        """w(u) of every task (0 for a locked one) from the probe of u's window."""
        probe = self._probe_at(u // self.every * self.every)
        if probe is None:
            raise LookupError(f"no probe recorded for update {u} (window {u // self.every * self.every})")
        live = probe["unlocked"]
        if self.cfg.schedule == "uniform":
            z = np.zeros(len(live))
        else:
            z = np.array([1.0 - probe["scores"][t]["alignment"] for t in live]) / self.sigma(u)
        p = np.exp(z - z.max())
        p /= p.sum()
        w = dict.fromkeys(self.tasks, 0.0)
        w.update(zip(live, map(float, p)))
        return w

    def task_for(self, u: int, stop: threading.Event | None = None) -> str:
        """The task of update ``u``. Waits for the probe of u's window (``stop`` set: gives up,
        raising InterruptedError); without ``stop`` (the caller is the thread that probes) that
        probe must already be recorded."""
        if u in self._drawn:
            return self._drawn[u]
        window = u // self.every * self.every
        with self._changed:
            while self._probe_at(window) is None:
                if stop is None:
                    raise LookupError(f"update {u} is laid out before its probe (after {window} updates) was taken")
                if stop.is_set():
                    raise InterruptedError("the producer was closed while it waited for a probe")
                self._changed.wait(0.1)
        w = self.weights(u)
        names = list(w)
        p = np.array([w[t] for t in names])
        task = names[int(np.random.default_rng([self.seed, _DRAW, u]).choice(len(names), p=p / p.sum()))]
        self._drawn[u] = task
        return task

    def counts(self, updates: int) -> dict[str, int]:
        """Updates each task has trained among the first ``updates`` (remembered draws: the log
        step asks this for the whole run so far)."""
        out = dict.fromkeys(self.tasks, 0)
        for u in range(updates):
            out[self.task_for(u)] += 1
        return out

    # ---- checkpoint
    def state(self) -> dict[str, Any]:
        """JSON-able: the probe history (every probe's scores and unlocked tasks) and the draw's seed."""
        with self._changed:
            return {"seed": self.seed, "schedule": self.cfg.schedule, "tasks": list(self.tasks),
                    "history": [dict(e) for e in self.history]}

    def set_state(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != list(self.tasks) or state["seed"] != self.seed:
            raise ValueError(f"the checkpoint's curriculum (tasks {state['tasks']}, seed {state['seed']}) is not this "
                             f"config's (tasks {list(self.tasks)}, train.seed {self.seed})")
        with self._changed:
            self.history = [dict(e) for e in state["history"]]
            self._drawn.clear()
            self._changed.notify_all()

    def log_metrics(self, probe: Mapping[str, Any], updates: int) -> dict[str, float]:
        """A probe's scalars: per task alignment, R@1, unlocked and its weight of the next update."""
        w = self.weights(updates) if updates < self.total else {}
        out = {"curriculum/sigma": self.sigma(min(updates, self.total - 1))}
        for t, s in probe["scores"].items():
            out |= {f"probe/{t}/alignment": s["alignment"], f"probe/{t}/R@1": s["R@1"],
                    f"curriculum/{t}/unlocked": float(t in probe["unlocked"])}
            if w:
                out[f"curriculum/{t}/weight"] = w[t]
        return out


def probe_period(cfg: CurriculumConfig, by_task: Mapping[str, Sequence], batch_size: int, accumulate: int) -> int:
    """``probe_every``, or one epoch of the multi-task corpus in updates (every task's records once)."""
    if cfg.probe_every:
        return cfg.probe_every
    return max(1, math.ceil(sum(map(len, by_task.values())) / (batch_size * accumulate)))


class TaskPipelines:
    """One ``DataPipeline`` per task (global batches of one task each), with one checkpointable
    state and one bad-input summary, as the trainer uses a single pipeline."""

    def __init__(self, by_task: Mapping[str, Sequence[ManifestRecord]], config: PipelineConfig, *, tokens=None,
                 rows: tuple[int, int] | None = None, bad: Sequence[BadRecord] = (), layouts=None,
                 query_clips: Collection[str] = ()):
        """``layouts``: {task: its pipeline's per-sample ``layout`` hook} (``DataPipeline``);
        ``query_clips``: the tasks whose pipelines load each record's reference clip (tv2v)."""
        self._bad = list(bad)
        self.pipelines: dict[str, DataPipeline] = {}
        try:
            for name, rs in by_task.items():
                pcfg = dataclasses.replace(config, query_clip=name in query_clips)
                self.pipelines[name] = DataPipeline(list(rs), pcfg, tokens=tokens, rows=rows,
                                                    layout=(layouts or {}).get(name))
        except BaseException:
            self.close()
            raise

    def next(self, task: str) -> dict[str, Any]:
        return next(self.pipelines[task])

    @property
    def bad_records(self) -> list[BadRecord]:
        return list(self._bad)

    def get_state(self) -> dict[str, Any]:
        return {"tasks": {t: p.get_state() for t, p in self.pipelines.items()}}

    def set_state(self, state: Mapping[str, Any]) -> None:
        missing = sorted(set(self.pipelines) - set(state["tasks"]))
        if missing:
            raise ValueError(f"the checkpoint's data state has no pipeline of task(s) {missing}")
        for t, p in self.pipelines.items():
            p.set_state(state["tasks"][t])

    def summary(self, state: Mapping[str, Any] | None = None) -> PipelineSummary:
        """Every task's counts summed (``DataPipeline.summary``), plus the manifest lines left out."""
        total = PipelineSummary()
        for t, p in self.pipelines.items():
            total.add(p.summary(None if state is None else state["tasks"][t]))
        for b in self._bad:
            total.note("skipped", f"manifest/{b.code}", f"line {b.line}")
        return total

    def close(self) -> None:
        """Closes every task's pipeline at once: grain stops a pipeline's decode processes one by
        one (up to 25 s each while one is still starting), so closing them in turn added up (3 min
        with 16 workers a task on 2 cores)."""
        threads = [threading.Thread(target=p.close, name=f"close {t}") for t, p in self.pipelines.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
