"""The per-row token layouts computed in the data workers (``batch.add_row_layouts``, the trainer's
pipeline hook) give exactly the train step's inputs that ``build_inputs`` lays out itself.

WAVE tiny (full preset: anchor T / V / A / AV / TVA, augmented view, hard negative) on synthetic
clips of 3 s at 48 px and of 2 s at 80 px, and GVE tiny (Qwen2.5-VL: padded positions are 0, not
1), the pipeline's batches with and without the hook, and with the hook in 2 grain worker
processes: every array of the step's inputs bitwise equal. The same on hand-made rows unlike the
corpus (64x48, 32x1024 and 1920x1080 grids, 1 to 40 caption tokens, 3 to 799 mel frames) for both
families, the image paths included. GVE's image and composed queries (I, TI: the clip's still
frame, made after batching) through the pipeline, as its i2v / ti2v tasks train. A sample without
a key a path needs is refused naming it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import numpy as np
import pytest

from omniret_jax import build
from omniret_jax import train as trainer
from omniret_jax.data.batch import (ROW_LAYOUT, add_row_layouts, build_inputs, caption_token_budget, cut_patches,
                                    still_frames, still_grids)
from omniret_jax.data.pipeline import DataPipeline
from omniret_jax.data.synth import SynthSettings, generate
from omniret_jax.losses import needed_views

ROOT = Path(__file__).resolve().parents[1]


def _inputs(c, manifest: Path, *, layout: bool, workers: int = 0, batches: int = 2, plan=None):
    _, _, _, model_cfg = build.abstract_state(c)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    plan = plan or needed_views(build.loss_config(c))
    c.data.num_workers = workers
    pcfg = trainer.pipeline_config(c, augment=bool(plan.aug), caption_tokens=caption_token_budget(ecfg))
    hook = functools.partial(add_row_layouts, anchor=plan.anchor, aug=plan.aug, model_cfg=model_cfg, tokens=tokens,
                             ecfg=ecfg) if layout else None
    out = []
    with DataPipeline(str(manifest), pcfg, tokens=tokens, rows=(0, c.train.batch_size), layout=hook) as pipe:
        for step in range(batches):
            batch = cut_patches(next(pipe), pcfg.patch_bucket_sizes)
            assert (ROW_LAYOUT in batch) == layout
            if any("I" in p for p in plan.anchor):       # as the trainer does for an image query
                batch = still_frames(batch, model_cfg.vision)
            out.append(build_inputs(batch, step, model_cfg, tokens, ecfg, plan, seed=c.train.seed))
    return out


def _assert_equal(a, b) -> int:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (path, x), (_, y) in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)
    return len(la)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    out = {}
    for name, settings in (("48px_3s", SynthSettings(seconds=3.0, size=48)), ("80px_2s", SynthSettings(seconds=2.0, size=80))):
        d = tmp_path_factory.mktemp(name)
        generate(str(d), 8, seed=1, settings=settings, progress=False)
        out[name] = d / "manifest.jsonl"
    return out


@pytest.mark.parametrize("corpus", ["48px_3s", "80px_2s"])
def test_worker_layouts_equal_the_main_process_layouts_wave(corpora, corpus):
    c = build.load_config(f"{ROOT}/configs/tiny.py:full", {"train.batch_size": 4})
    plain = _inputs(c, corpora[corpus], layout=False)
    hooked = _inputs(c, corpora[corpus], layout=True)
    n = sum(_assert_equal(a, b) for a, b in zip(plain, hooked))
    assert hooked[0].aug is not None and hooked[0].neg is not None and n > 50


def test_worker_layouts_in_worker_processes_and_on_qwen_vl(corpora):
    c = build.load_config(f"{ROOT}/configs/tiny.py:full", {"train.batch_size": 4})
    _assert_equal(_inputs(c, corpora["48px_3s"], layout=False, batches=1),
                  _inputs(c, corpora["48px_3s"], layout=True, workers=2, batches=1))
    g = build.load_config(f"{ROOT}/configs/gve_tiny.py", {"train.batch_size": 4})
    plain, hooked = _inputs(g, corpora["80px_2s"], layout=False), _inputs(g, corpora["80px_2s"], layout=True)
    for a, b in zip(plain, hooked):
        _assert_equal(a, b)
    text = hooked[0].anchor.paths["T"]                 # position_ids [R, 3, S]
    pads = np.swapaxes(text.position_ids, 0, 1)[:, text.attention_mask == 0]
    assert pads.size and (pads == 0).all()              # Qwen2.5-VL pads positions with 0


def test_worker_layouts_of_image_and_composed_queries(corpora):
    """GVE's i2v and ti2v plans (anchor I + V, TI + V): the still frame's grid is the clip's."""
    import dataclasses
    g = build.load_config(f"{ROOT}/configs/gve_tiny.py", {"train.batch_size": 4})
    lcfg = build.loss_config(g)
    for query in ("I", "TI"):
        plan = needed_views(dataclasses.replace(lcfg, pairs=((query, "V"),)))
        assert query in plan.anchor
        plain = _inputs(g, corpora["80px_2s"], layout=False, plan=plan)
        hooked = _inputs(g, corpora["80px_2s"], layout=True, plan=plan)
        for a, b in zip(plain, hooked):
            _assert_equal(a, b)
        assert hooked[0].anchor.paths[query].input_ids.shape[0] == 4


def test_worker_layout_names_a_missing_key():
    c = build.load_config(f"{ROOT}/configs/tiny.py:full")
    _, _, _, model_cfg = build.abstract_state(c)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    sample = {"caption": "a red square", "video_grid_thw": np.array([2, 4, 4]),
              "video_second_per_grid": np.float32(1.0), "mel_len": np.int32(400)}
    with pytest.raises(KeyError, match="video_grid_thw"):
        add_row_layouts({k: v for k, v in sample.items() if k != "video_grid_thw"}, anchor=("V",), aug=(),
                        model_cfg=model_cfg, tokens=tokens, ecfg=ecfg)
    out = add_row_layouts(dict(sample), anchor=("T", "V", "TI", "TVA"), aug=(), model_cfg=model_cfg, tokens=tokens,
                          ecfg=ecfg)[ROW_LAYOUT]
    assert sorted(out) == ["T", "TI", "TVA", "V"]    # TI: the still frame's grid is the clip's
    ids, pos = out["TVA"]
    assert ids.dtype == np.int32 and pos.shape == (3, len(ids))


@pytest.mark.parametrize("config", ["tiny.py:full", "gve_tiny.py"])
def test_worker_layouts_equal_on_non_square_grids_and_uneven_rows(config):
    """Grids of clips unlike the synthetic corpus (64x48, 32x1024 sliver, 1920x1080 at two
    temporal sizes), captions of 1 to 40 tokens and audio of 4 different lengths (3 mel frames: one token): the per-sample
    layouts padded into the batch equal the batch's own layout."""
    from omniret_jax.data import batch as B
    c = build.load_config(f"{ROOT}/configs/{config}")
    _, _, _, model_cfg = build.abstract_state(c)
    tokens, ecfg = build.tokens_for(c), build.embed_config(c)
    grids = np.array([[4, 14, 20], [4, 92, 4], [2, 12, 20], [4, 12, 20]])
    mel = np.array([400, 123, 799, 3]) if model_cfg.audio is not None else None
    captions = ["a", "a slow grey sliver of a clip that is very tall and narrow indeed", "x y", "z" * 40]
    paths = [p for p in ("T", "V", "I", "TI", "A", "AV", "TVA") if model_cfg.audio is not None or "A" not in p]
    samples = [{"caption": t, "video_grid_thw": g, "video_second_per_grid": np.float32(0.5 + i)}
               | ({} if mel is None else {"mel_len": np.int32(mel[i])}) for i, (t, g) in enumerate(zip(captions, grids))]
    batch = {"caption": captions, "video_grid_thw": grids, "video_second_per_grid": np.float32([0.5, 1.5, 2.5, 3.5])}
    batch["image_grid_thw"] = still_grids(grids)
    shaped = {"video_patches": np.zeros((4, int(grids.prod(1).max()), 1)),
              "image_patches": np.zeros((4, int(grids[:, 1:].prod(1).max()), 1))}
    if mel is not None:
        batch["mel_len"] = mel.astype(np.int32)
        shaped["mel"] = np.zeros((4, 1, 800))
    capacity = B._capacity(shaped, model_cfg, ecfg)
    meta = B._layout_meta(batch, paths, tokens)
    plain = B._row_layouts(meta, paths, model_cfg, tokens, ecfg, capacity, row_offset=0)
    rows = [B.row_layouts(s, paths, model_cfg, tokens, ecfg) for s in samples]
    meta[ROW_LAYOUT] = {p: [r[p] for r in rows] for p in paths}
    hooked = B._row_layouts(meta, paths, model_cfg, tokens, ecfg, capacity, row_offset=0)
    for p in paths:
        _assert_equal(plain[p], hooked[p])
    assert len({len(r[paths[-1]][0]) for r in rows}) == 4      # four different row lengths
