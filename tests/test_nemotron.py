"""The Omni-Embed-Nemotron backbone: bidirectional thinker, masked mean pool, its checkpoint and configs.

Reference: transformers' Qwen2.5-Omni thinker (tiny random, tests/hf_tiny.py) made bidirectional as
the published modeling file does (every decoder layer ``is_causal = False``) and called, as
transformers 5 needs, with a 4-D additive padding-only mask and explicit M-RoPE position ids. Its
checkpoint is written like Omni-Embed-Nemotron's: save_pretrained's flat keys, config.json with
model_type "nvomniembed".
- Thinker: every hidden state and the logits at real tokens, and the masked-mean embedding, for
  text, video, audio and a padded mixed batch (both padding sides): float32, max abs error <= 1e-4.
- The seven paths: ``prepare`` + ``embed_paths`` with configs/nemotron_tiny.py's embedding settings
  against each sample run alone through the reference, its token ids written here from the model
  card's usage (chat-template user turn with Qwen's default system turn, "query: " / "passage: ",
  text then video then audio, ``<|im_end|>\\n``): max abs error <= 1e-4.
- Padding: a row's embedding does not move when the batch's padding changes (max abs error
  <= 1e-6, measured values printed).
- Bad input: WAVE-only options on this backbone, mean pooling of a sequence with no real token.
- configs/nemotron_3b.py: the 3B shapes, LoRA on q/k/v/o of all 36 layers and nothing else trained.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from omniret_jax import build
from omniret_jax.config import PATHS, EmbedConfig
from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.data.batch import check_pooling, prepare
from omniret_jax.data.layout import Audio, Video
from omniret_jax.data.tokens import IM_START as IM_START_TEXT
from omniret_jax.data.tokens import Tokens
from omniret_jax.eval import retrieval
from omniret_jax.inputs import PathInputs
from omniret_jax.model import embedder as E
from omniret_jax.model.lora import lora_modules
from omniret_jax.model.thinker import Thinker
from tests.hf_tiny import (AUDIO_BOS, AUDIO_EOS, AUDIO_ID, IM_END, IM_START, VIDEO_ID, VISION_BOS, VISION_EOS,
                           bidirectional_mask, make_bidirectional, tiny_hf_thinker)
from tests.test_embedder_parity import encode, make_batch, path_errors
from tests.parity import with_kernel
from tests.test_thinker_parity import _run

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4
PAD_TOL = 1e-6
TOKENS = Tokens(encode=encode, im_end_id=IM_END, pad_id=0, special=((IM_START_TEXT, IM_START),))
embed = nnx.jit(E.embed_paths, static_argnames=("ecfg",))


def nemotron_ecfg(**kw) -> EmbedConfig:
    """configs/nemotron_tiny.py's embedding settings (captions of <= 47 tokens)."""
    c = build.load_config(f"{ROOT}/configs/nemotron_tiny.py", {"embed.text_len": 48})
    return dataclasses.replace(build.embed_config(c), **kw)


# The default run covers the kernel CPUs run (blocked); jax.nn's (GPUs, TPUs) is in the slow set.
@pytest.fixture(scope="module", params=[pytest.param("xla", marks=pytest.mark.slow), "blocked"])
def models(tmp_path_factory, request):
    """(bidirectional reference, our model loaded from its Nemotron-style checkpoint), with either
    attention kernel."""
    hf = make_bidirectional(tiny_hf_thinker(seed=13))
    path = tmp_path_factory.mktemp("nemotron") / "ckpt"
    hf.save_pretrained(path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(model_type="nvomniembed", architectures=["NVOmniEmbedModel"],
               auto_map={"AutoModel": "modeling_nv_omni_embed.NVOmniEmbedModel"})
    (path / "config.json").write_text(json.dumps(cfg))
    model, report = load_thinker(path, progress=False, configure=with_kernel(request.param))
    assert report.layout == "nemotron" and not report.ignored
    assert type(model) is Thinker and model.cfg.text.causal is False  # read from model_type
    return hf, model


# ----------------------------------------------------------------------------- the thinker


def test_text(models):
    _run(models, [([], 11), ([], 5)], np.random.default_rng(0), bidirectional=True)


def test_video(models):
    _run(models, [([Video((2, 8, 12), second_per_grid=1.0)], 5)], np.random.default_rng(3), bidirectional=True)


def test_audio(models):
    _run(models, [([Audio(357)], 7)], np.random.default_rng(4), bidirectional=True)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_mixed_batch(models, side):
    rows = [([], 9), ([Video((2, 8, 12), second_per_grid=2.0), Audio(1000)], 4), ([Audio(200)], 12),
            ([Video((2, 4, 4), second_per_grid=0.5)], 3)]
    _run(models, rows, np.random.default_rng(6), side=side, bidirectional=True)


# ----------------------------------------------------------------------------- the seven paths

SYSTEM_TURN = [IM_START] + encode("system\nYou are a helpful assistant.") + [IM_END] + encode("\n")


@torch.no_grad()
def reference_embedding(hf, path: str, s: dict) -> np.ndarray:
    """One sample alone and unpadded: the chat-template user turn, mean of the last hidden state."""
    text = "query: " + s["caption"] if path == "T" else "passage: " + (s["caption"] if "T" in path else "")
    ids = SYSTEM_TURN + [IM_START] + encode("user\n") + encode(text)
    kw = {}
    if "V" in path:
        ids += [VISION_BOS] + [VIDEO_ID] * (int(np.prod(s["grid"])) // 4) + [VISION_EOS]
        kw.update(pixel_values_videos=torch.from_numpy(s["patches"]), video_grid_thw=torch.tensor([s["grid"]]),
                  video_second_per_grid=torch.tensor([s["spg"]]))
    if "A" in path:
        ids += [AUDIO_BOS] + [AUDIO_ID] * (((s["mel_len"] - 1) // 2 + 1 - 2) // 2 + 1) + [AUDIO_EOS]
        kw.update(input_features=torch.from_numpy(s["mel"][None, :, : s["mel_len"]]),
                  feature_attention_mask=torch.ones(1, s["mel_len"], dtype=torch.long))
    ids += [IM_END] + encode("\n")
    ids = torch.tensor([ids])
    mask = torch.ones_like(ids)
    pos, _ = hf.model.get_rope_index(ids, None, kw.get("video_grid_thw"), mask, False,
                                     torch.tensor([s["mel_len"]]) if "A" in path else None,
                                     kw.get("video_second_per_grid"))
    out = hf(input_ids=ids, attention_mask=bidirectional_mask(mask), position_ids=pos, output_hidden_states=True,
             use_cache=False, **kw)
    return torch.nn.functional.normalize(out.hidden_states[-1].mean(dim=1), dim=-1)[0].numpy()


def test_seven_paths_match_reference(models):
    hf, model = models
    ecfg = nemotron_ecfg()
    batch, samples = make_batch(np.random.default_rng(0))
    inputs = prepare(batch, PATHS, model.cfg, TOKENS, ecfg)
    assert inputs.fbank is None  # Whisper only
    errors = path_errors(embed(model, inputs, ecfg), lambda p, s: reference_embedding(hf, p, s), samples,
                         "float32, mean pool")
    assert max(errors.values()) <= TOL, errors


def test_row_ignores_the_batch_padding(models):
    """Longer rows elsewhere in the batch, a longer caption budget and another row multiple only
    add padding to row 0: its embedding stays."""
    _, model = models
    batch, _ = make_batch(np.random.default_rng(1))
    ecfg, wide = nemotron_ecfg(), nemotron_ecfg(text_len=80, length_multiple=24)
    base = prepare(batch, PATHS, model.cfg, TOKENS, ecfg)
    ref = {p: np.asarray(v) for p, v in embed(model, base, ecfg).items()}
    longer = prepare(dict(batch, caption=[batch["caption"][0], "w" * 47, "v" * 40]), PATHS, model.cfg, TOKENS, wide)
    widths = {p: (base.paths[p].input_ids.shape[1], longer.paths[p].input_ids.shape[1]) for p in PATHS}
    assert all(a < b for a, b in widths.values()), widths
    got = embed(model, longer, wide)
    errs = {p: float(np.abs(np.asarray(got[p])[0] - ref[p][0]).max()) for p in PATHS}
    print(f"\nrow lengths {widths}; row 0 under more padding: max abs err {errs}")
    assert max(errs.values()) <= PAD_TOL, errs


# ----------------------------------------------------------------------------- bad input


def test_wave_only_options_are_named():
    for key, value, words in (("embed.pooling", "fusion", "pooling='fusion'"),
                              ("embed.audio_branch", "whisper_beats", "audio_branch='whisper_beats'"),
                              ("model.beats_checkpoint", "/x/beats.pt", "config.model.beats_checkpoint"),
                              ("model.init_missing_heads", True, "config.model.init_missing_heads")):
        c = build.load_config(f"{ROOT}/configs/nemotron_tiny.py", {key: value})
        with pytest.raises(ValueError, match=words):
            build.build_model(c)
    c = build.load_config(f"{ROOT}/configs/nemotron_tiny.py", {"embed.text_fusion_head": True})
    with pytest.raises(ValueError, match="text_fusion_head=True"):
        build.embed_config(c)
    with pytest.raises(ValueError, match="pooling='max'"):
        EmbedConfig(pooling="max")
    with pytest.raises(ValueError, match="config.model.backbone=.bogus."):
        build.random_model(build.load_config(f"{ROOT}/configs/nemotron_tiny.py", {"model.backbone": "bogus"}))


def test_wave_embedding_settings_on_the_plain_thinker_are_named(models):
    _, model = models
    batch, _ = make_batch(np.random.default_rng(2))
    ecfg = EmbedConfig(text_len=48, audio_branch="whisper")  # WAVE's fusion pooling
    with pytest.raises(ValueError, match="pooling='fusion' needs WAVE's all-layer fusion head.*Thinker"):
        embed(model, prepare(batch, ("V",), model.cfg, TOKENS, ecfg), ecfg)


def test_mean_pool_of_a_sequence_without_real_tokens_is_an_error():
    s = 6
    mask = np.array([[1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], np.int32)
    p = PathInputs(np.zeros((2, s), np.int32), mask, np.zeros((2, 3, s), np.int32), np.zeros((2, s), np.int32),
                   np.zeros((2, s), np.int32), np.array([2, s + 5], np.int32))
    check_pooling(p, "T", EmbedConfig(pooling="last"))  # the last token of padding is not averaged
    with pytest.raises(ValueError, match=r"pooling='mean'.*sample\(s\) \[1\] of the T path"):
        check_pooling(p, "T", EmbedConfig(pooling="mean", audio_branch="whisper"))


# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize("preset", ["frozen", "pairwise", "distill", "full"])
def test_3b_presets(preset):
    c = build.load_config(f"{ROOT}/configs/nemotron_3b.py:{preset}")
    assert (c.model.backbone, c.model.causal, c.loss.preset) == ("nemotron", False, preset)
    ecfg = build.embed_config(c)
    assert (ecfg.pooling, ecfg.audio_branch, ecfg.query_prefix, ecfg.passage_prefix) == (
        "mean", "whisper", "query: ", "passage: ")
    seven_b = build.load_config(f"{ROOT}/configs/omniretriever_7b.py:{preset}")
    assert c.data.to_dict() == seven_b.data.to_dict() and c.optim.to_dict() == seven_b.optim.to_dict()


@pytest.mark.slow  # keeps the default run under 20 min on 2 cores
def test_3b_shapes_and_lora_on_qkvo_only():
    c = build.load_config(f"{ROOT}/configs/nemotron_3b.py", {"model.init": "random"})
    _, trainable, frozen, cfg = build.abstract_state(c)
    t = cfg.text
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size, t.causal) == (2048, 36, 16, 2, 11008, 151936, False)
    paths = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    modules = {p.rsplit(".", 1)[0] for p in paths}
    assert len(modules) == 4 * 36 and len(paths) == 2 * 4 * 36
    assert {m.split(".")[-1] for m in modules} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert all(m.startswith("language_model.layers.") for m in modules)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(frozen) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating))
    print(f"\n3B: {len(modules)} LoRA modules, {n / 1e9:.4f} B frozen parameters")
    assert abs(n / 1e9 - 4.70) < 0.01  # the published ~4.7 B parameters (untied lm_head, both towers)


def test_tiny_lora_targets():
    c = build.load_config(f"{ROOT}/configs/nemotron_tiny.py")
    model = build.attach_lora(build.random_model(c), c, train=False)
    layers = c.model.tiny.num_hidden_layers
    assert sorted(lora_modules(model)) == sorted(f"language_model.layers.{i}.self_attn.{p}_proj"
                                                 for i in range(layers) for p in "qkvo")


# ----------------------------------------------------------------------------- CLI


def _cli(module, *args):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow
def test_cli_trains_and_evaluates(tmp_path):
    work = tmp_path / "run"
    r = _cli("omniret_jax.train", "--config", "configs/nemotron_tiny.py:full", "--workdir", work,
             "--config.train.steps=2", "--config.data.synth_n=8", "--config.train.batch_size=4",
             "--config.train.log_every=1")
    assert r.returncode == 0, r.stderr[-3000:]
    logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 2 and np.isfinite(logged[-1]["loss"]) and "L_T" in logged[-1]
    out = tmp_path / "eval"
    r = _cli("omniret_jax.eval", "--config", "configs/nemotron_tiny.py:full", "--checkpoint", work, "--manifest",
             work / "corpus" / "manifest.jsonl", "--out", out, "--batch_size", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert list(res["directions"]) == list(retrieval.DIRECTIONS) and res["step"] == 2 and res["gallery"] == 8
    assert res["dim"] == 64
    print(r.stdout)
