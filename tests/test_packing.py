"""Row lengths and packing are pure speed changes: the embeddings do not move.

On the tiny random-init WAVE (configs/tiny.py) with a random batch of odd sizes (non-square
video grids, short audio, captions of 1 to 40 tokens):
- every path's rows are exactly as long as the batch's fixed shapes allow (no row is cut);
- packed passes (several sequences per row, block-diagonal causal attention, positions
  restarting per sequence, one pooled token per sequence) give the unpacked embeddings, for
  all seven paths including the fusion head's all-layer pooling: float32 max abs error <= 1e-5;
  likewise on the tiny Omni-Embed-Nemotron (configs/nemotron_tiny.py: bidirectional attention
  within each sequence, each sequence's own mean pool);
- a pass whose sequences do not fit the packed rows falls back to the unpacked layout;
- a row's embedding does not depend on how long the other rows of its pass are;
- a batch cut to the smallest patch bucket that holds its clips (32 of the bound's 232 rows per
  clip here) embeds as the uncut batch on every path (<= 1e-5) with shorter rows; a clip above
  every bucket is refused, naming its patch count.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from omniret_jax import build
from omniret_jax.config import PATHS
from omniret_jax.data.batch import cut_patches, patches_needed, prepare
from omniret_jax.data.pipeline import PipelineConfig
from omniret_jax.data.random_batch import random_batch
from omniret_jax.model.embedder import embed_paths

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5
B = 6


def _setup(config: str):
    c = build.load_config(f"{ROOT}/configs/{config}:full", {"embed.text_len": 48})
    model = build.attach_lora(build.random_model(c), c, train=False)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):  # adapters that do something
        if path[-1] == "lora_b":
            var.set_value(0.05 * jax.random.normal(jax.random.key(len(path)), var.get_value().shape))
    batch = random_batch(c, B, seed=3, augment=False)
    rng = np.random.default_rng(0)
    batch["caption"] = ["x" * int(n) for n in rng.integers(1, 41, size=B)]  # 1..40 tokens
    batch["caption"][2] = "a long caption that fills the budget up to the last tok"[:47]
    jitted = nnx.jit(embed_paths, static_argnames=("ecfg",))
    return c, model, batch, jitted


@pytest.fixture(scope="module")
def setup():
    return _setup("tiny.py")


@pytest.fixture(scope="module")
def nemotron():
    return _setup("nemotron_tiny.py")


def _embed(setup, ecfg, paths=PATHS, batch=None):
    c, model, default_batch, jitted = setup
    inputs = prepare(batch or default_batch, paths, model.cfg, build.tokens_for(c), ecfg)
    return inputs, {p: np.asarray(v) for p, v in jitted(model, inputs, ecfg).items()}


def test_rows_are_as_long_as_the_shapes_allow(setup):
    c, model, batch, _ = setup
    ecfg = dataclasses.replace(build.embed_config(c), length_multiple=1)
    inputs = prepare(batch, PATHS, model.cfg, build.tokens_for(c), ecfg)
    video = batch["video_patches"].shape[1] // 4                 # merge units of P patches
    audio = 2 * (batch["mel"].shape[2] // 4)                     # doubled Whisper tokens of T frames
    prompt = {"V": len(ecfg.video_prompt), "A": len(ecfg.audio_prompt), "AV": len(ecfg.av_prompt)}  # bytes
    want = {"T": 48, "V": 2 + video + prompt["V"] + 1, "A": 2 + audio + prompt["A"] + 1,
            "AV": 4 + video + audio + prompt["AV"] + 1, "TV": 2 + video + 48, "TA": 2 + audio + 48,
            "TVA": 4 + video + audio + 48}
    got = {p: inputs.paths[p].input_ids.shape[1] for p in PATHS}
    print(f"row lengths {got}; real tokens per path "
          f"{ {p: int((inputs.paths[p].attention_mask > 0).sum()) for p in PATHS} }")
    assert got == want


@pytest.mark.parametrize("per_row", [2, 3])
def test_packed_equals_unpacked_on_every_path(setup, per_row):
    c, *_ = setup
    ecfg = build.embed_config(c)
    _, unpacked = _embed(setup, ecfg)
    packed_cfg = dataclasses.replace(ecfg, pack=tuple((p, per_row) for p in PATHS))  # rows per_row x long
    inputs, packed = _embed(setup, packed_cfg)
    rows = {p: inputs.paths[p].input_ids.shape[0] for p in PATHS}
    assert rows == {p: -(-B // per_row) for p in PATHS}, rows
    errs = {p: float(np.max(np.abs(packed[p] - unpacked[p]))) for p in PATHS}
    print(f"{per_row} per row: rows {rows}; max abs err {errs}")
    assert max(errs.values()) <= TOL, errs


def test_packed_mean_pool_equals_unpacked(nemotron):
    c, *_ = nemotron
    ecfg = build.embed_config(c)
    _, unpacked = _embed(nemotron, ecfg)
    inputs, packed = _embed(nemotron, dataclasses.replace(ecfg, pack=tuple((p, 2) for p in PATHS)))
    assert all(inputs.paths[p].attention_mask.max() == 2 for p in PATHS)  # two sequences per row
    errs = {p: float(np.max(np.abs(packed[p] - unpacked[p]))) for p in PATHS}
    print(f"bidirectional + mean pool, 2 per row: max abs err {errs}")
    assert max(errs.values()) <= TOL, errs


def test_short_rows_halve_the_pass_and_overflow_stays_unpacked(setup):
    c, model, batch, _ = setup
    ecfg = dataclasses.replace(build.embed_config(c), pack=(("T", 2, 48),))
    short = dict(batch, caption=["z" * n for n in (5, 20, 30, 9, 1, 40)])      # pairs of <= 48 tokens
    inputs, packed = _embed(setup, ecfg, ("T",), short)
    assert inputs.paths["T"].input_ids.shape == (B // 2, 48)
    _, unpacked = _embed(setup, build.embed_config(c), ("T",), short)
    err = float(np.max(np.abs(packed["T"] - unpacked["T"])))
    print(f"T path, two captions per row of 48: max abs err {err:.1e}")
    assert err <= TOL
    long = dict(batch, caption=["z" * n for n in (40, 40, 5, 5, 5, 5)])       # 41 + 41 > 48
    inputs = prepare(long, ("T",), model.cfg, build.tokens_for(c), ecfg)
    assert inputs.paths["T"].input_ids.shape == (B, 48)


def test_row_does_not_depend_on_other_rows(setup):
    c, model, batch, _ = setup
    ecfg = build.embed_config(c)
    _, ref = _embed(setup, ecfg, ("T", "TV"))
    longer = dict(batch, caption=[batch["caption"][0]] + ["y" * 47] * (B - 1))
    _, got = _embed(setup, ecfg, ("T", "TV"), longer)
    err = max(float(np.max(np.abs(got[p][0] - ref[p][0]))) for p in ("T", "TV"))
    print(f"row 0 with other rows changed: max abs err {err:.1e}")
    assert err <= TOL


def test_patch_bucket_cut_changes_no_embedding(setup):
    c, model, batch, _ = setup
    ecfg = build.embed_config(c)
    sizes = PipelineConfig(num_frames=c.data.num_frames, min_pixels=c.data.min_pixels,
                           max_pixels=c.data.max_pixels).patch_bucket_sizes
    assert sizes == (32, 232) and batch["video_patches"].shape[1] == 232 and patches_needed(batch) == 32
    cut = cut_patches(batch, sizes)
    assert cut["video_patches"].shape[1] == 32
    full_inputs, full = _embed(setup, ecfg)
    cut_inputs, got = _embed(setup, ecfg, batch=cut)
    shorter = {p: (full_inputs.paths[p].input_ids.shape[1], cut_inputs.paths[p].input_ids.shape[1]) for p in PATHS}
    assert all(b < a for p, (a, b) in shorter.items() if "V" in p), shorter
    errs = {p: float(np.max(np.abs(got[p] - full[p]))) for p in PATHS}
    print(f"P 232 -> 32: row lengths {shorter}; max abs err {errs}")
    assert max(errs.values()) <= TOL, errs
    # a clip above every bucket but the bound takes the bound; above the bound it is refused
    grids = batch["video_grid_thw"].copy()
    grids[1] = (2, 6, 8)
    assert cut_patches(dict(batch, video_grid_thw=grids), sizes)["video_patches"].shape[1] == 232
    grids[1] = (2, 12, 12)
    with pytest.raises(ValueError, match="a clip holds 288 patch rows, more than the largest bucket 232"):
        cut_patches(dict(batch, video_grid_thw=grids), sizes)
