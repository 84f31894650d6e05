"""End-to-end parity of the Flax thinker with transformers' Qwen2_5OmniThinkerForConditionalGeneration.

Reference: transformers' own thinker (tiny random config from tests/hf_tiny.py,
every tensor randomised), saved with ``save_pretrained`` and loaded into Flax
through the converter. Both sides get the same token layout, pixels and mel
features; the reference computes its own M-RoPE position ids in ``forward``.
Tolerance: float32, matmul precision HIGHEST, max abs error <= 1e-4 on every
layer's hidden state and on the logits at real tokens; position ids equal exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.data.layout import Audio, Image, Video, audio_output_lengths, batch_media, expand_turn, pad_batch, rope_index
from omniret_jax.inputs import AUDIO, IMAGE, VIDEO
from omniret_jax.model.embedder import l2_normalize, mean_pool
from tests.hf_tiny import IM_END, bidirectional_mask, tiny_hf_thinker
from tests.parity import TOL, compare, with_kernel, flax_forward, vision_inputs, vision_items


# The default run covers the kernel CPUs run (blocked); jax.nn's (GPUs, TPUs) is in the slow set.
@pytest.fixture(scope="module", params=[pytest.param("xla", marks=pytest.mark.slow), "blocked"])
def models(tmp_path_factory, request):
    """The reference and our thinker, with either attention kernel (jax.nn's XLA one, the blocked one)."""
    hf = tiny_hf_thinker(seed=3)
    path = tmp_path_factory.mktemp("parity") / "thinker"
    hf.save_pretrained(path)
    flax_model, _ = load_thinker(path, progress=False, configure=with_kernel(request.param))
    return hf, flax_model


def _row(rng, media, n_prompt, cfg):
    prompt = [int(t) for t in rng.integers(0, 280, size=n_prompt)] + [IM_END]
    return expand_turn(media, prompt, cfg)


def _run(models, rows, rng, side="left", *, bidirectional=False):
    """rows: list of (media items, prompt length). Returns the measured errors.

    ``bidirectional``: both models are (tests/hf_tiny.make_bidirectional, TextConfig.causal
    False); the reference gets the 4-D padding-only mask and explicit position ids, and the
    masked mean of the last hidden state (the Nemotron embedding) is compared too."""
    hf, fx = models
    cfg = fx.cfg
    layouts = [_row(rng, media, n, cfg) for media, n in rows]
    s = max(len(lay.input_ids) for lay in layouts) + 2
    batch = pad_batch([lay.input_ids for lay in layouts], s, pad_id=0, side=side)
    meta = batch_media(layouts)

    # Media content, one tensor per item in reading order (= masked_scatter order).
    images, videos = vision_items(rng, meta["image_grid_thw"]), vision_items(rng, meta["video_grid_thw"])
    mel_lens = meta["audio_feature_lens"] if meta["audio_feature_lens"] is not None else np.zeros(0, int)
    mels = [rng.standard_normal((128, int(n))).astype(np.float32) for n in mel_lens]

    # --- reference
    kw = dict(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
              output_hidden_states=True, use_audio_in_video=meta["use_audio_in_video"])
    if images:
        kw.update(pixel_values=torch.tensor(np.concatenate(images)),
                  image_grid_thw=torch.tensor(meta["image_grid_thw"]))
    if videos:
        kw.update(pixel_values_videos=torch.tensor(np.concatenate(videos)),
                  video_grid_thw=torch.tensor(meta["video_grid_thw"]),
                  video_second_per_grid=torch.tensor(meta["second_per_grid"]))
    t_max = 0
    if mels:
        t_max = int(np.ceil(max(mel_lens) / 200) * 200)
        feats = np.zeros((len(mels), 128, t_max), np.float32)
        fmask = np.zeros((len(mels), t_max), np.int64)
        for i, m in enumerate(mels):
            feats[i, :, : m.shape[1]] = m
            fmask[i, : m.shape[1]] = 1
        kw.update(input_features=torch.tensor(feats), feature_attention_mask=torch.tensor(fmask))
    with torch.no_grad():
        ref_pos, _ = hf.model.get_rope_index(
            kw["input_ids"], kw.get("image_grid_thw"), kw.get("video_grid_thw"), kw["attention_mask"],
            meta["use_audio_in_video"], torch.tensor(mel_lens) if mels else None, kw.get("video_second_per_grid"))
        if bidirectional:
            ref = hf(**dict(kw, attention_mask=bidirectional_mask(kw["attention_mask"]), position_ids=ref_pos))
        else:
            ref = hf(**kw)

    # --- ours: position ids on the host, towers over one row per item, gather-merge
    pos, _ = rope_index(batch.input_ids, batch.attention_mask, cfg, **meta)
    np.testing.assert_array_equal(pos, ref_pos.numpy(), err_msg="M-RoPE position ids differ")

    vis_in, n_valid, capacity = vision_inputs(cfg, {IMAGE: (images, meta["image_grid_thw"]),
                                                    VIDEO: (videos, meta["video_grid_thw"])})
    aud_in = None
    if mels:
        aud_in = (kw["input_features"].numpy(), np.asarray(mel_lens, np.int32))
        n_valid[AUDIO] = audio_output_lengths(mel_lens)
        capacity[AUDIO] = t_max // 4
    states, logits = flax_forward(fx, batch, pos, vis_in, n_valid, capacity, aud_in)
    errors = compare(ref, states, logits, batch.attention_mask,
                     f"{side}-padded{', bidirectional' if bidirectional else ''}")
    if bidirectional:
        real = batch.attention_mask.astype(bool)
        mask = kw["attention_mask"][..., None]
        want = torch.nn.functional.normalize((ref.hidden_states[-1] * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        last = np.arange(len(real)) * real.shape[1] + batch.last_index
        got = l2_normalize(mean_pool(states[-1], batch.attention_mask, last))
        errors["mean_pool"] = float(np.abs(np.asarray(got) - want).max())
        print(f"mean-pooled embedding: max abs error {errors['mean_pool']:.2e}")
        assert errors["mean_pool"] <= TOL, errors
    return errors


def test_text_only(models):
    rng = np.random.default_rng(0)
    _run(models, [([], 11), ([], 5)], rng)


def test_image(models):
    rng = np.random.default_rng(1)
    _run(models, [([Image((1, 8, 8))], 6)], rng)


def test_two_images_in_one_row(models):
    rng = np.random.default_rng(2)
    _run(models, [([Image((1, 8, 8)), Image((1, 6, 10))], 4)], rng)


def test_video(models):
    rng = np.random.default_rng(3)
    _run(models, [([Video((2, 8, 12), second_per_grid=1.0)], 5)], rng)


def test_audio(models):
    rng = np.random.default_rng(4)
    _run(models, [([Audio(357)], 7)], rng)


def test_audio_in_video(models):
    # 4 temporal grids at 1 s each and 8 s of audio: several interleaved chunks.
    rng = np.random.default_rng(5)
    _run(models, [([Video((4, 4, 4), second_per_grid=1.0, audio_mel_len=800)], 5)], rng)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_mixing_modalities(models, side):
    rng = np.random.default_rng(6)
    rows = [
        ([], 9),
        ([Image((1, 8, 8))], 3),
        ([Video((2, 8, 12), second_per_grid=2.0), Audio(1000)], 4),
        ([Audio(200)], 12),
    ]
    _run(models, rows, rng, side=side)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_mixing_audio_in_video(models, side):
    # transformers reads use_audio_in_video per batch, so plain videos cannot share
    # this batch; everything else can.
    rng = np.random.default_rng(7)
    rows = [
        ([Video((4, 4, 4), second_per_grid=1.0, audio_mel_len=800)], 2),
        ([], 6),
        ([Image((1, 6, 10)), Audio(357)], 3),
        ([Video((2, 8, 4), second_per_grid=0.5, audio_mel_len=300)], 5),
    ]
    _run(models, rows, rng, side=side)
