"""The seven embedding paths against a PyTorch WAVE reference.

Reference: tests/torch_wave.py's TorchWave, written from architecture.md sections 2-3
(not from our JAX code): transformers' Qwen2.5-Omni thinker (tiny, tests/hf_tiny.py) +
openbeats' BEATs (tiny config of tests/test_beats.py) + torch modules for the WAVE heads,
every tensor random. Each sample is run alone and unpadded through the reference; ours
runs the whole right-padded batch at once (towers once, every path reusing them).

Tolerances: float32 with matmul precision HIGHEST, max abs error <= 1e-4 per path
(embeddings are unit vectors); bfloat16 compute: cosine >= 0.9999 per path (stated
below, measured values printed).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from flax import nnx

from omniret_jax.config import PATHS, EmbedConfig, Precision
from omniret_jax.convert.tensors import CheckpointError
from omniret_jax.convert.to_flax import load_wave
from omniret_jax.data.batch import prepare
from omniret_jax.data.tokens import Tokens
from omniret_jax.model import embedder as E
from tests.hf_tiny import IM_END, tiny_hf_thinker
from tests.test_beats import TINY as BEATS_TINY
from tests.test_beats import make_reference as make_beats_reference
from tests.test_beats import unilm_state
from tests.torch_wave import HEADS, TorchWave

TOL = 1e-4
PATCH = 3 * 2 * 14 * 14
ECFG = EmbedConfig(text_len=48)


def encode(s: str) -> list[int]:
    """A byte-level stand-in tokenizer inside the tiny vocabulary (ids 1..250)."""
    return [b % 250 + 1 for b in s.encode()]


TOKENS = Tokens(encode=encode, im_end_id=IM_END, pad_id=0)
embed = nnx.jit(E.embed_paths, static_argnames=("ecfg",))


PROMPTS = {"V": ECFG.video_prompt, "A": ECFG.audio_prompt, "AV": ECFG.av_prompt}


def make_reference(seed: int):
    """(TorchWave with every tensor random, its transformers thinker)."""
    thinker = tiny_hf_thinker(seed=seed)
    ref = TorchWave(thinker, BEATS_TINY)
    ref.beats = make_beats_reference(BEATS_TINY, seed=seed + 1)
    c = BEATS_TINY["encoder_embed_dim"]
    with torch.no_grad():
        ref.beats_ln.weight.copy_(1 + 0.2 * torch.randn(c))
        ref.beats_ln.bias.copy_(0.2 * torch.randn(c))
    return ref.eval(), thinker


def checkpoint_state(ref, thinker) -> dict[str, torch.Tensor]:
    """The WAVE checkpoint of the reference: the thinker's in-memory (transformers-5) names,
    the heads beside them, BEATs in unilm layout under ``beats.``."""
    sd = dict(thinker.state_dict())
    for name in HEADS:
        sd.update({f"{name}.{k}": v for k, v in getattr(ref, name).state_dict().items()})
    sd.update({f"beats.{k}": torch.from_numpy(v) for k, v in unilm_state(ref.beats).items()})
    return {k: v.contiguous() for k, v in sd.items()}


def ref_embed(ref, path: str, s: dict, **kw) -> np.ndarray:
    return ref.embed(path, s, encode=encode, im_end=IM_END, prompts=PROMPTS, **kw)


def make_batch(rng) -> tuple[dict, list[dict]]:
    """3 clips: different video sizes/rates, mel lengths and BEATs lengths (pad and cut cases)."""
    grids = [(2, 4, 4), (2, 4, 8), (2, 8, 4)]
    spgs = [1.0, 2.0, 0.5]
    mel_lens = [400, 357, 200]          # N_w = 100, 89, 50 -> BEATs needs 200, 178, 100 tokens
    fbank_lens = [398, 355, 398]        # BEATs gives 192, 176, 192 tokens: pad, pad, cut
    captions = ["a red circle moves left", "a low flute plays", "a blue square and a fast drum beat"]
    p = max(int(np.prod(g)) for g in grids)
    samples, batch = [], {k: [] for k in ("caption", "video_patches", "video_grid_thw", "video_second_per_grid",
                                          "mel", "mel_len", "fbank", "fbank_len")}
    for g, spg, ml, fl, cap in zip(grids, spgs, mel_lens, fbank_lens, captions):
        patches = rng.standard_normal((int(np.prod(g)), PATCH)).astype(np.float32)
        mel = rng.standard_normal((128, 400)).astype(np.float32)
        fbank = rng.standard_normal((400, 128)).astype(np.float32)
        samples.append(dict(caption=cap, grid=g, spg=spg, patches=patches, mel=mel, mel_len=ml,
                            fbank=fbank, fbank_len=fl))
        padded = np.zeros((p, PATCH), np.float32)
        padded[: len(patches)] = patches
        for k, v in (("caption", cap), ("video_patches", padded), ("video_grid_thw", g),
                     ("video_second_per_grid", spg), ("mel", mel), ("mel_len", ml), ("fbank", fbank),
                     ("fbank_len", fl)):
            batch[k].append(v)
    batch = {k: (v if k == "caption" else np.asarray(v)) for k, v in batch.items()}
    return batch, samples


def path_errors(ours: dict, reference, samples: list[dict], label: str = "float32") -> dict[str, float]:
    """Max abs error per path of our batch's unit-norm float32 embeddings against
    ``reference(path, sample)``, each sample run alone."""
    errors = {}
    for p in PATHS:
        want = np.stack([reference(p, s) for s in samples])
        got = np.asarray(ours[p])
        assert got.dtype == np.float32 and np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)
        errors[p] = float(np.abs(got - want).max())
    print(f"\nmax abs error per path ({label}): " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
    return errors


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    ref, thinker = make_reference(seed=11)
    path = tmp_path_factory.mktemp("wave") / "ckpt"
    path.mkdir()
    save_file(checkpoint_state(ref, thinker), str(path / "model.safetensors"))
    config = thinker.config.to_dict()
    config["beats_config"] = BEATS_TINY
    (path / "config.json").write_text(json.dumps(config))
    return ref, path, thinker


def test_seven_paths_match_reference(setup):
    ref, path, _ = setup
    model, report = load_wave(path, progress=False)
    batch, samples = make_batch(np.random.default_rng(0))
    inputs = prepare(batch, PATHS, model.cfg, TOKENS, ECFG)
    errors = path_errors(embed(model, inputs, ECFG), lambda p, s: ref_embed(ref, p, s), samples)
    assert max(errors.values()) <= TOL, errors


@pytest.mark.slow  # keeps the default run under 20 min on 2 cores
def test_bfloat16_paths_stay_close(setup):
    ref, path, _ = setup
    model, _ = load_wave(path, precision=Precision.from_names(compute="bfloat16"), progress=False)
    batch, samples = make_batch(np.random.default_rng(0))
    ours = embed(model, prepare(batch, PATHS, model.cfg, TOKENS, ECFG), ECFG)
    cos = {}
    for p in PATHS:
        want = np.stack([ref_embed(ref, p, s) for s in samples])
        cos[p] = float(np.min(np.sum(np.asarray(ours[p]) * want, axis=-1)))
    print("\nmin cosine per path (bfloat16 compute): " + ", ".join(f"{k}={v:.5f}" for k, v in cos.items()))
    assert min(cos.values()) >= 0.9999, cos


@pytest.mark.slow  # keeps the default run under 20 min on 2 cores
def test_towers_run_once_per_batch(setup, monkeypatch):
    _, path, _ = setup
    model, _ = load_wave(path, progress=False)
    batch, _ = make_batch(np.random.default_rng(1))
    calls = {"vision": 0, "audio": 0}
    for name, attr in (("vision", "encode_vision"), ("audio", "encode_audio_dual")):
        original = getattr(model, attr)

        def counted(*a, _o=original, _n=name, **k):
            calls[_n] += 1
            return _o(*a, **k)
        monkeypatch.setattr(model, attr, counted)
    E.embed_paths(model, prepare(batch, PATHS, model.cfg, TOKENS, ECFG), ECFG)
    assert calls == {"vision": 1, "audio": 1}


def test_text_fusion_head_switch(setup):
    """The paper's variant sends the text path through the fusion head too."""
    ref, path, _ = setup
    model, _ = load_wave(path, progress=False)
    batch, samples = make_batch(np.random.default_rng(2))
    ecfg = EmbedConfig(text_len=48, text_fusion_head=True)
    got = np.asarray(embed(model, prepare(batch, ("T",), model.cfg, TOKENS, ecfg), ecfg)["T"])
    want = np.stack([ref_embed(ref, "T", s, text_fusion_head=True) for s in samples])
    assert np.abs(got - want).max() <= TOL


def test_bad_inputs_are_named(setup, tmp_path):
    ref, path, _ = setup
    model, _ = load_wave(path, progress=False)
    batch, _ = make_batch(np.random.default_rng(3))
    with pytest.raises(ValueError, match="unknown embedding path.*'VT'"):
        prepare(batch, ("VT",), model.cfg, TOKENS, ECFG)
    empty = dict(batch, caption=["ok", "", "fine"])
    with pytest.raises(ValueError, match="sample 1: empty caption"):
        prepare(empty, ("TV",), model.cfg, TOKENS, ECFG)
    no_audio = {k: v for k, v in batch.items() if k not in ("mel", "mel_len")}
    with pytest.raises(KeyError, match="mel"):
        prepare(no_audio, ("A",), model.cfg, TOKENS, ECFG)
    long = dict(batch, caption=["word " * 40] * 3)
    with pytest.raises(ValueError, match="sample 0 \\(T path\\)"):
        prepare(long, ("T",), model.cfg, TOKENS, ECFG)
    # A plain thinker checkpoint has no WAVE heads.
    plain = tmp_path / "plain"
    setup[2].save_pretrained(plain)
    cfg = json.loads((plain / "config.json").read_text())
    cfg["beats_config"] = BEATS_TINY
    (plain / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="no '.*beats.\\*' tensors"):
        load_wave(plain, progress=False)


def test_wave_checkpoint_round_trip_bit_exact(setup, tmp_path):
    """HF -> Flax -> HF for the whole WAVE checkpoint: same keys, dtypes and bytes (BEATs' tied tables included)."""
    from omniret_jax.convert.tensors import TensorSource
    from omniret_jax.convert.to_torch import export_safetensors

    _, path, _ = setup
    model, _ = load_wave(path, progress=False)
    out = export_safetensors(model, tmp_path / "out", config_src=path, layout="transformers5")
    a, b = TensorSource(path), TensorSource(out)
    assert a.keys() == b.keys()
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), key
    reloaded, _ = load_wave(out, progress=False)  # beats_config travels in config.json
    assert reloaded.beats_cfg == model.beats_cfg
