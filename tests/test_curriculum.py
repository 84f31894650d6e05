"""The Modality Pyramid (omniret_jax.data.curriculum, eval.tasks, the trainer's curriculum hook).

- The task table: a prerequisite cycle, an unknown prerequisite or kind, a prerequisite on the
  same level are start-up errors naming the task; so are a manifest task the table lacks, a
  record without a task and a task with fewer records than a global batch (through train()).
- The probe score: mean margin of the gold document over the hardest other one, R@1.
- The schedule: the composed task stays locked (weight 0, never drawn) while a foundational
  prerequisite is below curriculum.unlock_threshold and unlocks at the first probe where both
  pass; the weights are the softmax of (1 - alignment) / sigma(u), sigma annealing geometrically;
  uniform: every task, equal weights; draws are a pure function of (seed, update, history), the
  state round-trips through JSON, a draw waits for its window's probe.
- Batches are task-homogeneous, each task's rows laid out for its query kind (I, TI: the still frame).
- Evaluation: tasks of a multi-task manifest and of benchmark manifests, grouped per query kind and
  per ability.
- Slow: the pyramid preset trains with the real prober and unlocks ti2v only after t2v and i2v pass
  the threshold; stopping at update k and resuming gives the same task sequence and bitwise-equal
  trainables; both presets train and resume from the CLI, and uniform+tv2v (with the text + video
  -> video task) trains, resumes and evaluates its four tasks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from omniret_jax import build
from omniret_jax import train as trainer
from omniret_jax.data import curriculum as cur
from omniret_jax.data.manifest import ManifestRecord, load_manifest, read_manifest
from omniret_jax.eval import tasks as evtasks

REPO = Path(__file__).resolve().parents[1]
GVE = REPO / "configs" / "gve_tiny.py"
PYRAMID = {"t2v": {"level": 0}, "i2v": {"level": 0},
           "ti2v": {"level": 1, "prerequisites": ("t2v", "i2v"), "ability": "fine-grained"}}


def _records(tasks: dict[str, int]) -> list[ManifestRecord]:
    return [ManifestRecord(id=f"c{i}/{t}", caption="a red circle", video=f"/c{i}.mp4", task=t)
            for t, n in tasks.items() for i in range(n)]


# ----------------------------------------------------------------------------- the task table

@pytest.mark.parametrize("table, words", [
    ({"a": {"prerequisites": ("b",), "kind": "t2v", "level": 1}, "b": {"prerequisites": ("a",), "kind": "i2v"}},
     ["prerequisite cycle", "a -> b -> a"]),
    ({"ti2v": {"prerequisites": ("t2v",), "level": 1}}, ["'ti2v'", "['t2v'] are not in the task table"]),
    ({"t2v": {}, "odd": {"kind": "a2v"}}, ["'odd'", "kind 'a2v'"]),
    ({"t2v": {}, "ti2v": {"prerequisites": ("t2v",)}}, ["'ti2v' (level 0)", "lower pyramid level"]),
    ({"t2v": {"ability": "spatial"}}, ["'t2v'", "ability 'spatial'"]),
])
def test_bad_task_tables_are_refused_naming_the_task(table, words):
    with pytest.raises(ValueError) as e:
        cur.task_table(table)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_task_table_orders_by_level_and_defaults_the_kind_to_the_name():
    table = cur.task_table({"ti2v": PYRAMID["ti2v"], "t2v": {}, "i2v": {}})
    assert list(table) == ["i2v", "t2v", "ti2v"]
    assert table["ti2v"].spec == cur.TaskKind("TI", "V", "composed") and table["t2v"].spec.direction == "T->V"


def test_manifest_tasks_are_checked_against_the_table():
    table = cur.task_table(PYRAMID)
    with pytest.raises(ValueError, match=r"task 'v2t' \(2 records, e.g. 'c0/v2t'\).*known: \['i2v', 't2v', 'ti2v'\]"):
        cur.split_by_task(_records({"t2v": 8, "i2v": 8, "ti2v": 8, "v2t": 2}), table, 8)
    with pytest.raises(ValueError, match=r"task 'ti2v' has 3 manifest record\(s\), fewer than one global batch of 8"):
        cur.split_by_task(_records({"t2v": 8, "i2v": 9, "ti2v": 3}), table, 8)
    with pytest.raises(ValueError, match=r"1 manifest record\(s\) name no task \(e.g. \['x'\]\)"):
        cur.split_by_task(_records({"t2v": 8}) + [ManifestRecord(id="x", caption="c", video="/x.mp4")], table, 8)
    by_task = cur.split_by_task(_records({"ti2v": 8, "t2v": 8, "i2v": 9}), table, 8)
    assert {t: len(r) for t, r in by_task.items()} == {"i2v": 9, "t2v": 8, "ti2v": 8}
    subsets = cur.probe_subsets(by_task, 4, seed=0)
    assert subsets == cur.probe_subsets(by_task, 4, seed=0) and all(len(s) == 4 for s in subsets.values())
    assert all(r.task == t for t, s in subsets.items() for r in s)


def test_manifest_task_field(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"id": "a", "caption": "c", "video": "a.mp4", "task": "ti2v"}) + "\n"
                    + json.dumps({"id": "b", "caption": "c", "video": "b.mp4", "task": 3}) + "\n")
    m = load_manifest(path, on_bad_record="skip")
    assert [r.task for r in m.records] == ["ti2v"] and m.bad[0].code == "bad_task"
    assert m.records[0].to_json()["task"] == "ti2v"


def test_a_task_loss_is_the_infonce_of_its_query_and_document_paths():
    from omniret_jax.losses import LossConfig, compute_losses, info_nce, needed_views

    cfg = LossConfig.from_preset("pairwise", pairs=(("TI", "V"),), temperature=0.05)
    assert needed_views(cfg).anchor == ("V", "TI") and not needed_views(cfg).negative
    e = np.random.default_rng(0).normal(size=(2, 6, 8)).astype(np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True)
    loss, metrics = compute_losses({"TI": e[0], "V": e[1]}, 0, cfg)
    assert float(metrics["L_A/TI-V"]) == pytest.approx(float(info_nce(e[0], e[1], temperature=0.05)))
    with pytest.raises(ValueError, match="pairs of distinct embedding paths"):
        LossConfig.from_preset("pairwise", pairs=(("TI", "X"),))


# ----------------------------------------------------------------------------- probe scores

def test_alignment_is_the_mean_margin_over_the_hardest_negative():
    q = np.eye(3)
    d = np.array([[0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    s = cur.alignment(q, d)
    # query 0: gold 0.8, hardest other 0.0; query 1: gold 1.0 vs 0.6; query 2: 1.0 vs 0.
    np.testing.assert_allclose(s["margins"], [0.8, 0.4, 1.0])
    assert s["alignment"] == pytest.approx(2.2 / 3) and s["R@1"] == 1.0
    swapped = cur.alignment(q, d[[1, 0, 2]])
    assert swapped["R@1"] == pytest.approx(1 / 3) and swapped["alignment"] < 0


# ----------------------------------------------------------------------------- the schedule

def _schedule(schedule="pyramid", total=40, every=10, threshold=0.1, seed=0) -> cur.Schedule:
    ccfg = cur.CurriculumConfig(schedule=schedule, unlock_threshold=threshold, sigma_start=1.0, sigma_end=0.1)
    return cur.Schedule(cur.task_table(PYRAMID), ccfg, seed=seed, total=total, every=every)


def _scores(t2v, i2v, ti2v):
    return {"t2v": {"alignment": t2v, "R@1": 0.5}, "i2v": {"alignment": i2v, "R@1": 0.5},
            "ti2v": {"alignment": ti2v, "R@1": 0.1}}


def test_composed_task_unlocks_only_after_its_foundations_pass():
    s = _schedule()
    first = s.record(0, _scores(0.05, 0.3, -0.2))          # t2v below the threshold 0.1
    assert first["unlocked"] == ["i2v", "t2v"] and s.weights(5)["ti2v"] == 0.0
    assert "ti2v" not in {s.task_for(u) for u in range(10)}
    second = s.record(10, _scores(0.12, 0.3, -0.1))        # both foundations pass
    assert second["newly"] == ["ti2v"]
    w = s.weights(10)
    d = {t: 1 - a for t, a in (("i2v", 0.3), ("t2v", 0.12), ("ti2v", -0.1))}
    z = {t: np.exp(v / s.sigma(10)) for t, v in d.items()}
    assert w == pytest.approx({t: v / sum(z.values()) for t, v in z.items()})
    assert max(w, key=w.get) == "ti2v"                      # the hardest unlocked task leads
    assert "ti2v" in {s.task_for(u) for u in range(10, 20)}
    third = s.record(20, _scores(0.0, 0.0, 0.0))            # unlocked tasks stay unlocked
    assert third["unlocked"] == ["i2v", "t2v", "ti2v"] and not third["newly"]
    print(f"unlocking: probe 0 {first['unlocked']}, probe 10 newly {second['newly']}, weights at 10 "
          f"{ {t: round(v, 3) for t, v in w.items()} }; 10 draws before: {[s.task_for(u) for u in range(10)]}")


def test_sigma_anneals_and_sharpens_the_weights():
    s = _schedule()
    assert s.sigma(0) == pytest.approx(1.0) and s.sigma(39) == pytest.approx(0.1)
    assert s.sigma(20) == pytest.approx(0.1 ** (20 / 39))
    s.record(0, _scores(0.5, 0.5, 0.0))
    s.record(10, _scores(0.5, 0.5, 0.0))
    s.record(20, _scores(0.5, 0.5, 0.0))
    s.record(30, _scores(0.5, 0.5, 0.0))
    assert s.weights(10)["ti2v"] < s.weights(39)["ti2v"]


def test_uniform_unlocks_every_task_with_equal_weights():
    s = _schedule("uniform")
    entry = s.record(0, _scores(-1.0, -1.0, 0.9))
    assert entry["unlocked"] == ["i2v", "t2v", "ti2v"]
    assert s.weights(3) == pytest.approx(dict.fromkeys(["i2v", "t2v", "ti2v"], 1 / 3))


def test_draws_are_a_function_of_seed_update_and_history_and_the_state_round_trips():
    a = _schedule()
    a.record(0, _scores(0.2, 0.3, -0.2))
    a.record(10, _scores(0.3, 0.3, -0.1))
    b = _schedule()
    b.set_state(json.loads(json.dumps(a.state())))
    assert [a.task_for(u) for u in range(20)] == [b.task_for(u) for u in range(20)]
    assert a.counts(20) == b.counts(20) and sum(a.counts(20).values()) == 20
    other = _schedule(seed=1)
    other.set_state(dict(a.state(), seed=1))
    assert [a.task_for(u) for u in range(20)] != [other.task_for(u) for u in range(20)]
    with pytest.raises(ValueError, match="train.seed 0"):
        _schedule().set_state(dict(a.state(), seed=5))
    assert not b.due(10) and b.due(20) and not b.due(40)


def test_a_draw_waits_for_its_probe():
    s = _schedule()
    with pytest.raises(LookupError, match="before its probe"):
        s.task_for(3)
    got, stop = [], threading.Event()
    waiter = threading.Thread(target=lambda: got.append(s.task_for(3, stop)))
    waiter.start()
    waiter.join(0.3)
    assert waiter.is_alive() and not got
    s.record(0, _scores(0.05, 0.2, 0.0))                   # t2v below the threshold: ti2v locked
    waiter.join(5)
    assert got and got[0] in ("t2v", "i2v")
    with pytest.raises(InterruptedError):
        stop.set()
        s.task_for(12, stop)


# ----------------------------------------------------------------------------- batches and evaluation

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from omniret_jax.data.synth import SynthSettings, generate_tasks

    out = tmp_path_factory.mktemp("tasks")
    generate_tasks(str(out), 8, settings=SynthSettings(seconds=1.0, size=64), progress=False)
    return out / "manifest.jsonl"


def test_synthetic_tasks_and_homogeneous_batches_laid_out_per_kind(corpus):
    """Fast (no jit): each task's pipeline yields only its records; t2v lays out T and V, i2v I and V
    (the still frame), ti2v TI (still frame + the composed text) and V."""
    from omniret_jax.data.batch import build_inputs, still_frames
    from omniret_jax.inputs import IMAGE, VIDEO
    from omniret_jax.losses import needed_views

    records = load_manifest(corpus).records
    assert len(records) == 24 and len({(r.meta["shape"], r.meta["colour"], r.meta["motion"]) for r in records}) == 8
    c = build.load_config(f"{GVE}:pyramid", {"train.batch_size": 4})
    table = cur.task_table(c.curriculum.tasks.to_dict())
    cfg, _ = build._random_configs(c)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    pcfg = dataclasses.replace(trainer.pipeline_config(c, augment=False, caption_tokens=ecfg.text_len - 1))
    lcfg = build.loss_config(c)
    pipes = cur.TaskPipelines(cur.split_by_task(records, table, 4), pcfg, tokens=tokens, rows=(0, 4))
    try:
        for t, task in table.items():
            batch = pipes.next(t)
            assert all(i.endswith(f"/{t}") for i in batch["id"]), batch["id"]
            views = needed_views(dataclasses.replace(lcfg, pairs=((task.spec.query, task.spec.document),)))
            assert set(views.anchor) == {task.spec.query, "V"}
            if "I" in task.spec.query:
                batch = still_frames(batch, cfg.vision)
            paths = build_inputs(batch, 0, cfg, tokens, ecfg, views, seed=0).anchor.paths
            query = paths[task.spec.query]
            assert (query.source == IMAGE).any() == ("I" in task.spec.query) and not (query.source == VIDEO).any()
        state = pipes.get_state()
        ahead = pipes.next("t2v")["id"]
        pipes.set_state(state)
        assert pipes.next("t2v")["id"] == ahead and pipes.summary().yielded == 16
    finally:
        pipes.close()


def test_tasks_of_manifests_and_benchmarks_are_grouped_as_uvrb_reports():
    table = cur.task_table(PYRAMID)
    bench = [ManifestRecord(id=f"{b}{i}", caption="c", video="/v.mp4", meta={"benchmark": b})
             for b in ("didemo", "vdc_d", "dream_e") for i in range(2)]
    tasks = evtasks.manifest_tasks(_records({"t2v": 2, "ti2v": 2}) + bench, table)
    assert {t: (k.kind, k.ability, len(r)) for t, (k, r) in tasks.items()} == {
        "t2v": ("t2v", "coarse", 2), "ti2v": ("ti2v", "fine-grained", 2), "didemo": ("t2v", "coarse", 2),
        "vdc_d": ("t2v", "long-context", 2), "dream_e": ("t2v", "fine-grained", 2)}
    with pytest.raises(ValueError, match=r"record 'a': task 'clotho' is neither"):
        evtasks.manifest_tasks([ManifestRecord(id="a", caption="c", video="/a.wav", meta={"benchmark": "clotho"})],
                               table)
    per_task = {"t2v": {"R@1": 50.0, "group": "textual", "ability": "coarse"},
                "didemo": {"R@1": 10.0, "group": "textual", "ability": "long-context"},
                "i2v": {"R@1": 30.0, "group": "visual", "ability": "coarse"},
                "ti2v": {"R@1": 20.0, "group": "composed", "ability": "fine-grained"}}
    g = evtasks.grouped(per_task)
    assert g["groups"] == {"textual": 30.0, "composed": 20.0, "visual": 30.0}
    assert g["abilities"] == {"coarse": 40.0, "fine-grained": 20.0, "long-context": 10.0}
    assert g["overall"] == pytest.approx(27.5)


@pytest.mark.parametrize("name", ["gve_tiny", "gve_7b", "gve_3b"])
def test_gve_configs_take_the_curriculum_presets(name):
    """configs/gve_*.py:<preset>: the curriculum with the shared task table (the 7B / 3B probing
    larger subsets of a real corpus); any other argument is the system-turn instruction; an unknown
    '+' names the config."""
    path = REPO / "configs" / f"{name}.py"
    c = build.load_config(f"{path}:pyramid+tv2v")
    assert c.curriculum.schedule == "pyramid" and list(c.curriculum.tasks) == ["i2v", "t2v", "ti2v", "tv2v"]
    assert c.curriculum.probe_size == (16 if name == "gve_tiny" else 256)
    assert build.load_config(f"{path}:uniform").curriculum.schedule == "uniform"
    plain = build.load_config(f"{path}:Find the clip.")
    assert "curriculum" not in plain and "system\nFind the clip.<|im_end|>" in plain.embed.turn_start
    assert c.embed.turn_start == build.load_config(str(path)).embed.turn_start != plain.embed.turn_start
    with pytest.raises(ValueError, match=rf"configs/{'gve_7b' if name == 'gve_3b' else name}.py:pyramid\+x"):
        build.load_config(f"{path}:pyramid+x")


def test_evaluation_refuses_several_processes(monkeypatch, tmp_path):
    """The trainer's prober embeds on many processes; the evaluation CLIs, which write the results
    files, refuse before any work."""
    import jax

    from omniret_jax.eval import embed

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="per-task evaluation runs in one process .* 2 processes"):
        evtasks.evaluate_tasks(None, "none", [], tmp_path)
    with pytest.raises(ValueError, match="evaluation runs in one process"):
        embed.evaluate_checkpoint(None, "none", tmp_path / "m.jsonl", tmp_path)


def test_train_refuses_bad_curricula_at_start_up(tmp_path, corpus):
    c = build.load_config(f"{GVE}:pyramid", {"train.batch_size": 16, "data.manifest": str(corpus)})
    with pytest.raises(ValueError, match=r"task 'i2v' has 8 manifest record\(s\), fewer than one global batch of 16"):
        trainer.train(c, tmp_path / "few")
    c = build.load_config(f"{GVE}:pyramid", {"data.manifest": str(corpus)})
    c.curriculum.tasks.i2v.prerequisites = ("ti2v",)
    with pytest.raises(ValueError, match=r"prerequisite cycle i2v -> ti2v -> i2v"):
        trainer.train(c, tmp_path / "cycle")
    c = build.load_config(f"{GVE}:pyramid", {"data.manifest": str(corpus)})
    del c.curriculum.tasks["i2v"]
    c.curriculum.tasks.ti2v.prerequisites = ("t2v",)
    with pytest.raises(ValueError, match=r"manifest tasks missing from config.curriculum.tasks: task 'i2v'"):
        trainer.train(c, tmp_path / "missing")
    c = build.load_config(f"{GVE}:pyramid", {"loss.preset": "full"})
    with pytest.raises(ValueError, match=r"loss.preset='pairwise'"):
        trainer.train(c, tmp_path / "loss")


# ----------------------------------------------------------------------------- training (slow)

def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _train_config(preset: str, corpus: Path, **overrides):
    return build.load_config(f"{GVE}:{preset}", {"data.manifest": str(corpus), "train.steps": 4, "train.log_every": 1,
                                                 "train.ckpt_every": 2, "curriculum.probe_every": 2,
                                                 "curriculum.unlock_threshold": -1.0, **overrides})


def _tasks_of(logged: list[dict]) -> list[tuple[int, str]]:
    """(update, its task) of every logged update, read off the loss component it logged."""
    pairs = {"L_A/T-V": "t2v", "L_A/I-V": "i2v", "L_A/TI-V": "ti2v", "L_A/TV-V": "tv2v"}
    return [(m["step"], next(t for k, t in pairs.items() if k in m)) for m in logged if "loss" in m]


@pytest.mark.slow
def test_resume_gives_the_same_tasks_and_bitwise_trainables(corpus, tmp_path):
    """Pyramid with a threshold every task passes: a straight 4-update run, and one resumed from its
    update-2 checkpoint in a fresh workdir, draw the same tasks and end bitwise equal."""
    from tests.test_train import _assert_same_state, _restored

    c = _train_config("pyramid", corpus)
    straight = tmp_path / "straight"
    trainer.train(c, straight)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "2", resumed / "checkpoints" / "2")
    trainer.train(c, resumed)
    a, b = _metrics(straight), _metrics(resumed)
    assert _tasks_of(a)[2:] == _tasks_of(b) and len(_tasks_of(a)) == 4
    assert [(m["step"], m["loss"]) for m in a if "loss" in m][2:] == [(m["step"], m["loss"]) for m in b if "loss" in m]
    assert [m["step"] for m in a if "probe/ti2v/alignment" in m] == [0, 2]
    assert not [m for m in b if "probe/ti2v/alignment" in m]   # update 2's probe came with the checkpoint
    history = [_restored(c, w, 4).data_state["curriculum"]["history"] for w in (straight, resumed)]
    assert history[0] == history[1] and [e["update"] for e in history[0]] == [0, 2]
    # per sample: every probe record's margin, averaging to the task's alignment
    probes = [json.loads(line) for line in (straight / trainer.PROBES_FILE).read_text().splitlines()]
    assert [p["update"] for p in probes] == [0, 2]
    for p, e in zip(probes, history[0]):
        for t, s in p["tasks"].items():
            assert len(s["margins"]) == 8 and all(r.endswith(f"/{t}") for r in s["margins"])
            assert np.mean(list(s["margins"].values())) == pytest.approx(e["scores"][t]["alignment"], abs=1e-12)
            assert s["R@1"] == np.mean(np.array(list(s["margins"].values())) > 0)
    n = _assert_same_state(c, straight, resumed, 4)
    print(f"resume at update 2: tasks {_tasks_of(a)}; {n} trainable leaves and the optimizer state bitwise equal")


@pytest.mark.slow
def test_pyramid_unlocks_the_composed_task_after_its_foundations_pass(corpus, tmp_path):
    """The real prober on the current model: ti2v is locked (never trained) while its prerequisite
    (configs/common.gve_curriculum: i2v) is below the threshold, and unlocks at the first probe where
    it reaches it."""
    c = _train_config("pyramid", corpus, **{"train.steps": 24, "curriculum.probe_every": 4,
                                            "curriculum.unlock_threshold": 0.0, "train.ckpt_every": 100})
    trainer.train(c, tmp_path)
    logged = _metrics(tmp_path)
    probes = [m for m in logged if "probe/ti2v/alignment" in m]
    unlocked = [m["step"] for m in probes if m["curriculum/ti2v/unlocked"]]
    assert unlocked, [(m["step"], m["probe/t2v/alignment"], m["probe/i2v/alignment"]) for m in probes]
    first = unlocked[0]
    for m in probes:
        passed = min(m[f"probe/{p}/alignment"] for p in c.curriculum.tasks.ti2v.prerequisites) >= 0.0
        assert m["curriculum/ti2v/unlocked"] == float(m["step"] >= first)
        if m["step"] == first:
            assert passed
        if m["step"] < first:
            assert not passed
    trained = [(u, t) for u, t in _tasks_of(logged)]
    assert all(t != "ti2v" for u, t in trained if u <= first), trained
    assert first > 0 and any(t == "ti2v" for u, t in trained if u > first), trained
    print("probes (update, t2v, i2v, ti2v alignment, ti2v unlocked):",
          [(m["step"], round(m["probe/t2v/alignment"], 3), round(m["probe/i2v/alignment"], 3),
            round(m["probe/ti2v/alignment"], 3), m["curriculum/ti2v/unlocked"]) for m in probes])
    print("tasks:", trained)


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


def _dream_manifest(corpus: Path, tmp_path: Path) -> Path:
    """A DREAM-1k.jsonl (Tarsier's format) over 5 of the corpus' clips, two events each, through
    the adapter into a benchmark manifest."""
    from omniret_jax.eval import benchmarks

    clips = sorted({Path(r.video).resolve() for r in read_manifest(corpus / "manifest.jsonl")})[:5]
    media = tmp_path / "dream_media"
    media.mkdir()
    lines = []
    for i, clip in enumerate(clips, 1):
        (media / f"{i}.mp4").symlink_to(clip)
        lines.append(json.dumps({"idx": i, "vid": i, "dataset": "DREAM/synthetic", "video_file": "<placeholder>",
                                 "text": {"prompt": "<video>", "response": f"clip {i}"},
                                 "extra_info": {"duration": 1.0, "events": [f"a shape moves in clip {i}",
                                                                            f"the shape stops in clip {i}"]}}))
    (tmp_path / "DREAM-1k.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "dream_e.jsonl"
    benchmarks.write(benchmarks.dream1k(tmp_path / "DREAM-1k.jsonl", media), out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["pyramid", "uniform", "uniform+tv2v"])
def test_cli_trains_resumes_and_evaluates_per_task(preset, tmp_path):
    work = tmp_path / "run"
    common = ("--config", f"configs/gve_tiny.py:{preset}", "--workdir", work, "--config.data.synth_n=8",
              "--config.train.batch_size=4", "--config.train.log_every=1", "--config.train.ckpt_every=2",
              "--config.curriculum.probe_every=2")
    r = _cli("omniret_jax.train", *common, "--config.train.steps=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli("omniret_jax.train", *common, "--config.train.steps=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from update 2" in r.stdout, r.stdout[-2000:]
    logged = _metrics(work)
    assert [u for u, _ in _tasks_of(logged)] == [1, 2, 3, 4]
    manifests = [work / "corpus" / "manifest.jsonl"]
    if preset == "uniform":   # and a UVRB benchmark: DREAM-E in Tarsier's format over the corpus' clips
        manifests.append(_dream_manifest(work / "corpus", tmp_path))
    r = _cli("omniret_jax.eval", "--config", f"configs/gve_tiny.py:{preset}", "--checkpoint", work, "--manifest",
             ",".join(map(str, manifests)), "--out", tmp_path / "eval", "--batch_size", "4", "--by_task")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "eval" / "results_tasks.json").read_text())
    dream = {"dream_e"} if preset == "uniform" else set()
    assert set(res["tasks"]) == {"t2v", "i2v", "ti2v"} | ({"tv2v"} if "tv2v" in preset else set()) | dream
    assert res["step"] == 4
    assert set(res["groups"]) == {"textual", "visual", "composed"} and set(res["abilities"]) == {"coarse",
                                                                                                 "fine-grained"}
    if dream:   # every event is a query (mode "all"): two per clip, over the 5 clips' gallery
        assert res["tasks"]["dream_e"]["queries"] == 10 and res["tasks"]["dream_e"]["ability"] == "fine-grained"
    print(r.stdout)
