"""The 7B config's two recipes, and what the released one changes in the host layout and optimizer.

- configs/omniretriever_7b.py:paper and :released hold the settings of configs' docstring table
  (train.sh / data_qwen.py), and every difference the docstring lists is one the configs have.
- With the released settings on the tiny model: every non-text path prompts "Please describe the
  video.", AV and TVA interleave the audio into the video block, the text hard negative is the
  pipeline's other-record caption, and weight decay skips biases and LayerNorm parameters.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest

from omniret_jax import build
from omniret_jax.data.batch import build_inputs, hard_negative_slot
from omniret_jax.data.random_batch import random_batch
from omniret_jax.losses import needed_views
from omniret_jax.step import make_optimizer

REPO = Path(__file__).resolve().parents[1]
B7 = REPO / "configs" / "omniretriever_7b.py"
PROMPT = "Please describe the video."


def test_paper_and_released_settings():
    paper, released = build.load_config(f"{B7}:paper"), build.load_config(f"{B7}:released")
    assert build.load_config(B7).to_dict() == paper.to_dict()
    for c in (paper, released):  # the same in both (train.sh L54-56, L73-76, L85-92)
        assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (16, 32.0, 0.05)
        assert (c.optim.lr, c.optim.warmup_ratio, c.optim.weight_decay, c.optim.clip_norm) == (1e-5, 0.03, 0.01, 1.0)
        assert (c.data.num_frames, c.data.min_pixels, c.data.max_pixels) == (8, 50176, 50176)
        assert (c.data.audio_seconds, c.data.audio_mode, c.loss.temperature) == (8.0, "start", 0.01)
        assert c.train.batch_size == 32
    assert (paper.optim.accumulate, paper.train.steps) == (2, 11192)
    assert (released.optim.accumulate, released.train.steps) == (8, 2798)
    assert released.train.batch_size * released.optim.accumulate == 256
    assert (paper.embed.audio_prompt, paper.embed.audio_in_video) == ("Please describe the audio.", False)
    assert {released.embed.video_prompt, released.embed.audio_prompt, released.embed.av_prompt} == {PROMPT}
    assert released.embed.audio_in_video
    lp, lr = build.loss_config(paper), build.loss_config(released)
    assert (lp.recipe, lp.counter, lp.negative_pool) == ("paper", "update", "own")
    assert (lr.recipe, lr.counter, lr.negative_pool) == ("released", "micro_batch", "batch")
    assert (paper.data.text_negative, released.data.text_negative) == ("batch", "dataset")
    assert (paper.optim.decay, released.optim.decay) == ("all", "no_bias_norm")
    assert build.load_config(f"{B7}:released,pairwise").loss.preset == "pairwise"
    cached = build.load_config(f"{B7}:released,cached")
    assert (cached.train.contrastive_batch, cached.train.chunk, cached.optim.accumulate) == (256, 32, 1)
    assert cached.train.steps == released.train.steps == 2798
    assert (cached.loss.recipe, cached.embed.pack) == ("released", ())
    with pytest.raises(ValueError, match="neither a recipe"):
        build.load_config(f"{B7}:relased")


def _released_tiny():
    c = build.load_config(REPO / "configs" / "tiny.py")
    c.embed.update(video_prompt=PROMPT, audio_prompt=PROMPT, av_prompt=PROMPT, audio_in_video=True)
    c.loss.recipe, c.data.text_negative = "released", "dataset"
    return c


def test_released_layout_prompts_audio_in_video_and_dataset_text_negative():
    c = _released_tiny()
    cfg, tokens, ecfg = build.abstract_state(c)[3], build.tokens_for(c), build.embed_config(c)
    plan = needed_views(build.loss_config(c))
    batch = random_batch(c, 4, seed=0)
    batch["neg_caption"] = [f"another record's caption {i}" for i in range(4)]
    prompt = tokens.encode(PROMPT) + [tokens.im_end_id]
    for step in range(3):
        host = build_inputs(batch, step, cfg, tokens, ecfg, plan, seed=0, counter=step, text_negative="dataset")
        for path in ("V", "A"):
            p = host.anchor.paths[path]
            for i in range(4):
                ids = p.input_ids[i, : p.pool_index[i] - i * p.input_ids.shape[1] + 1].tolist()
                assert ids[-len(prompt):] == prompt, (path, i)
        tva = host.anchor.paths["TVA"].input_ids[0].tolist()
        assert tva[:2] == [cfg.vision_start_token_id, cfg.audio_start_token_id]  # audio inside the video block
        neg = host.neg
        slot = hard_negative_slot(step)
        for i in range(4):
            ids = neg.input_ids[i, : neg.pool_index[i] - i * neg.input_ids.shape[1] + 1].tolist()
            caption = tokens.encode(batch["neg_caption"][i] if slot == "text" else batch["caption"][i])
            assert ids[-len(caption) - 1:-1] == caption, (slot, i)
        t, v, a = host.neg_rows.T
        assert (t == np.arange(4)).all()  # no batch row supplies a dataset caption
        moved = {"text": (v, a), "video": (a,), "audio": (v,)}[slot]
        assert all((r == np.arange(4)).all() for r in moved)


def test_released_weight_decay_skips_biases_and_layer_norms():
    c = build.load_config(REPO / "configs" / "tiny.py")
    model = build.attach_lora(build.random_model(c), c, train=True)
    _, trainable, _ = build.split_state(model, build.lora_config(c), build.precision(c))
    trainable = jax.tree.map(lambda x: x * 0 + 1, trainable)  # every leaf non-zero, so decay shows
    tx = make_optimizer(lr=1.0, total_steps=10, warmup_ratio=0.1, weight_decay=0.5, clip_norm=1.0, accumulate=1,
                        decay="no_bias_norm")
    zero = jax.tree.map(lambda x: x * 0, trainable)
    opt = tx.init(trainable)
    for _ in range(2):  # update 0 has lr 0 under the warm-up; update 1 applies lr * wd * p only
        delta, opt = tx.update(zero, opt, trainable)
    decayed = {}
    for path, d in jax.tree_util.tree_flatten_with_path(delta)[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        decayed[name] = bool(np.any(np.asarray(d) != 0))
    assert not any(v for k, v in decayed.items() if ".bias" in k or k.startswith("beats_ln."))
    assert all(v for k, v in decayed.items() if k.endswith("kernel.value") or "lora_" in k)
    print(f"decayed: {sorted(k for k, v in decayed.items() if v)[:4]} ...; "
          f"not: {sorted(k for k, v in decayed.items() if not v)}")
