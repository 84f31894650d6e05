"""Text + video -> video (tv2v): a query of the record's text over its reference clip (``query_video``).

- The manifest field round-trips (relative paths) and a bad value is counted under its own code;
  the synthetic reference clip has the target's shape and colour and another motion.
- With ``query_clip`` the pipeline's ``query`` view is the reference clip exactly as the pipeline
  loads it as a record's own clip (bitwise); a record without one is skipped, counted.
- The train step: the plan embeds TV on the query view and V on the record's clip; its TV
  embedding equals the eval embedding of TV over records whose own clip is the reference clip
  (float32, max abs 1e-5), and the worker-side layouts equal the main process's (bitwise).
- A tv2v task without reference clips, and query paths outside L_A's pairs, are refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from omniret_jax import build, sharding
from omniret_jax import train as trainer
from omniret_jax.data import curriculum as cur
from omniret_jax.data.batch import add_row_layouts, build_inputs, caption_token_budget, cut_patches
from omniret_jax.data.manifest import ManifestRecord, load_manifest
from omniret_jax.data.pipeline import DataPipeline
from omniret_jax.data.synth import SynthSettings, generate_tasks, make_clip
from omniret_jax.eval.embed import GalleryEmbedder, eval_pipeline_config
from omniret_jax.losses import LossConfig, needed_views
from omniret_jax.step import embeddings

REPO = Path(__file__).resolve().parents[1]
CONFIG = f"{REPO}/configs/gve_tiny.py:pyramid+tv2v"
SETTINGS = SynthSettings(seconds=1.0, size=64)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tv2v")
    generate_tasks(str(out), 8, settings=SETTINGS, tasks=("t2v", "tv2v"), progress=False)
    return out / "manifest.jsonl"


def _tv2v(corpus) -> list[ManifestRecord]:
    return [r for r in load_manifest(corpus).records if r.task == "tv2v"]


def test_manifest_field_and_the_synthetic_reference_clips(corpus, tmp_path):
    records = _tv2v(corpus)
    assert len(records) == 8 and all(r.query_video.endswith("-reference.mp4") and r.query_video != r.video
                                     for r in records)
    line = json.loads(corpus.read_text().splitlines()[1])
    assert line["task"] == "tv2v" and line["query_video"] == "clips/synth-000000-reference.mp4"  # relative
    bad = tmp_path / "m.jsonl"
    bad.write_text(json.dumps({"id": "a", "caption": "c", "video": "a.mp4", "query_video": 3}) + "\n"
                   + json.dumps({"id": "b", "caption": "c", "video": "b.mp4", "query_video": "r.mp4"}) + "\n")
    assert load_manifest(bad, on_bad_record="skip").bad[0].code == "bad_query_video"
    (tmp_path / "clips").mkdir()
    own, ref = make_clip(str(tmp_path), 0, 5, SETTINGS), make_clip(str(tmp_path), 0, 5, SETTINGS, reference=True)
    assert [own.meta[k] == ref.meta[k] for k in ("shape", "colour", "motion")] == [True, True, False]


def _pcfg(c, **kw):
    ecfg = build.embed_config(c)
    return dataclasses.replace(trainer.pipeline_config(c, augment=False, caption_tokens=caption_token_budget(ecfg)),
                               **kw)


def _batch(records, pcfg, tokens, layout=None):
    with DataPipeline(list(records), pcfg, tokens=tokens, rows=(0, len(records)), layout=layout) as pipe:
        return cut_patches(next(pipe), pcfg.patch_bucket_sizes), pipe.summary()


def test_the_query_view_is_the_reference_clip_as_the_pipeline_loads_it(corpus):
    c = build.load_config(CONFIG, {"train.batch_size": 4})
    tokens = build.tokens_for(c)
    records = _tv2v(corpus)[:4]
    batch, _ = _batch(records, _pcfg(c, query_clip=True), tokens)
    as_own = [dataclasses.replace(r, video=r.query_video, query_video=None) for r in records]
    own, _ = _batch(as_own, _pcfg(c), tokens)
    q = batch["query"]
    assert list(own["id"]) == list(batch["id"])            # the same records in the same order
    assert q["caption"] == list(batch["caption"]) == list(own["caption"])
    for k in ("video_patches", "video_num_patches", "video_grid_thw", "video_second_per_grid", "caption_ids"):
        assert np.array_equal(q[k], own[k]), k
    assert not np.array_equal(q["video_patches"], batch["video_patches"])
    missing = [dataclasses.replace(r, query_video=None) for r in _tv2v(corpus)]
    with DataPipeline(missing, _pcfg(c, query_clip=True, on_bad_sample="drop", max_consecutive_skips=100),
                      tokens=tokens, rows=(0, 4)) as pipe:
        with pytest.raises(Exception):
            next(pipe)
        assert pipe.summary().skipped.get("query_video/missing", 0) >= 1


def test_the_step_embeds_tv_over_the_reference_clip(corpus):
    c = build.load_config(CONFIG, {"train.batch_size": 8})
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    state = build.build_state(c, mesh, train=False)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    lcfg = dataclasses.replace(build.loss_config(c), pairs=(("TV", "V"),), query_paths=("TV",))
    plan = needed_views(lcfg)
    assert plan.anchor == ("V",) and plan.query == ("TV",)
    records = _tv2v(corpus)
    pcfg = dataclasses.replace(eval_pipeline_config(c), caption_tokens=caption_token_budget(ecfg))
    step_pcfg = dataclasses.replace(pcfg, query_clip=True, batch_size=8)
    batch, _ = _batch(records, step_pcfg, tokens)   # in record order
    assert list(batch["id"]) == [r.id for r in records]
    inputs = build_inputs(batch, 0, state.cfg, tokens, ecfg, plan, seed=0)
    assert set(inputs.anchor.paths) == {"V"} and set(inputs.query.paths) == {"TV"}
    hook = functools.partial(add_row_layouts, anchor=plan.anchor, aug=plan.aug, query=plan.query,
                             model_cfg=state.cfg, tokens=tokens, ecfg=ecfg)
    hooked, _ = _batch(records, step_pcfg, tokens, layout=hook)
    leaves = jax.tree_util.tree_leaves_with_path
    for (path, x), (_, y) in zip(leaves(inputs), leaves(build_inputs(hooked, 0, state.cfg, tokens, ecfg, plan,
                                                                      seed=0)), strict=True):
        assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)

    step_emb = jax.jit(lambda tr, fr, x: embeddings(nnx.merge(state.graphdef, tr, fr), x, ecfg))(
        state.trainable, state.frozen, inputs)
    assert set(step_emb) == {"V", "TV"}
    embedder = GalleryEmbedder(state, ecfg, mesh, batch_size=8)
    eval_emb = embedder.embed_records(records, ("TV", "V"), pcfg, progress=False, query_paths=("TV",))
    as_own = [dataclasses.replace(r, video=r.query_video, query_video=None) for r in records]
    ref = embedder.embed_records(as_own, ("TV",), pcfg, progress=False)["TV"]
    for name, got in (("step", np.asarray(step_emb["TV"])), ("eval", eval_emb["TV"])):
        err = float(np.abs(got - ref).max())
        print(f"tv2v TV embedding ({name}) vs the reference clip as a record's own: max abs {err:.2e}")
        assert err <= 1e-5, (name, err)
    assert float(np.abs(np.asarray(step_emb["V"]) - eval_emb["V"]).max()) <= 1e-5
    assert float(np.abs(eval_emb["V"] - ref).max()) > 1e-3       # the document is the record's own clip


def test_tv2v_without_reference_clips_and_bad_query_paths_are_refused():
    table = cur.task_table({"t2v": {}, "i2v": {}, "tv2v": {"level": 1, "prerequisites": ("i2v",)}})
    assert table["tv2v"].spec == cur.TaskKind("TV", "V", "composed", query_clip=True)
    records = [ManifestRecord(id=f"c{i}/{t}", caption="the same shape, moving up", video=f"/c{i}.mp4", task=t,
                              query_video=f"/r{i}.mp4" if t == "tv2v" and i else None)
               for t in table for i in range(4)]
    with pytest.raises(ValueError, match=r"task 'tv2v' \(tv2v.*1 record\(s\) have no 'query_video' \(e.g. \['c0/tv2v'\]"):
        cur.split_by_task(records, table, 4)
    with pytest.raises(ValueError, match="query_paths=\\('T',\\)"):
        LossConfig.from_preset("pairwise", pairs=(("T", "V"),), query_paths=("T",))
    with pytest.raises(ValueError, match="query_paths"):
        LossConfig.from_preset("full", pairs=(("TV", "V"),), query_paths=("TV",))
