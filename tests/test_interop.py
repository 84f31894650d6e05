"""``omniret-convert`` orbax / export / import: train in JAX, serve in PyTorch, and back.

Reference: tests/torch_wave.py's TorchWave (transformers thinker + openbeats BEATs + torch
heads, written from the spec) loaded from the export as a PyTorch user loads it, with
``peft.PeftModel.from_pretrained`` for the adapter; peft's own ``save_pretrained`` for the
adapter's key names. Tolerance: float32, max abs error <= 1e-5 per path (unit vectors).
The trainables of a workdir, exported and imported back, must be bit-identical.

Default run: a workdir written as the trainer writes it (trainables moved off their
init, no training steps), the commands in-process, bad input. Slow: the user's whole
round trip in separate processes (train -> export -> a fresh PyTorch process -> eval ->
import -> eval), on the tiny random-init run and on a synthetic 7B-width WAVE checkpoint
(2 layers per tower) converted to orbax first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open

from omniret_jax import build, interop, sharding
from omniret_jax.checkpoint import TrainCheckpointer
from omniret_jax.config import Precision, ThinkerConfig
from omniret_jax.convert.tensors import CheckpointError as ConversionError
from omniret_jax.convert.to_flax import HEADS, load_wave
from omniret_jax.convert.synthetic import write_synthetic_wave
from omniret_jax.convert.to_torch import export_safetensors
from omniret_jax.data.batch import prepare
from omniret_jax.data.random_batch import random_batch
from omniret_jax.data.tokens import TINY_IM_END
from omniret_jax.model import embedder as E
from tests.parity import with_kernel
from tests.torch_wave import TorchWave, clip_samples

ROOT = Path(__file__).resolve().parents[1]
TINY = f"{ROOT}/configs/tiny.py:pairwise"
TOL = 1e-5
STEP = 2
# In-process parity runs the text path and the full tuple (both towers, BEATs, the interleave);
# the slow round trip runs T, V, A and TVA in separate processes.
FAST_PATHS = ("T", "TVA")
embed = nnx.jit(E.embed_paths, static_argnames=("ecfg",))


def _flat(tree) -> dict[str, np.ndarray]:
    """{dotted parameter path: host array} of a state tree or a restored checkpoint item."""
    def host(x):
        return np.asarray(jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value"): host(x) for p, x in leaves}


def _read_trainables(step_dir: Path) -> dict[str, np.ndarray]:
    """A checkpoint step's trainables as saved (no abstract tree needed)."""
    with ocp.StandardCheckpointer() as ckptr:
        return _flat(ckptr.restore(step_dir / "trainables"))


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b), sorted(set(a) ^ set(b))
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes(), k


def _no_leftovers(parent: Path):
    assert not [p.name for p in parent.iterdir() if ".partial-" in p.name], "a temporary output was left behind"


def _one_device_mesh():
    return sharding.make_mesh(sharding.MeshConfig(), jax.devices()[:1])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir as omniret_jax.train writes it (checkpoints/<STEP>), with trainables of
    the trainer's tree, shapes and dtypes but random values, so that the adapter and the heads
    change every output (no training step: that is the slow round trip's job)."""
    c = build.load_config(TINY)
    _, abstract, _, _ = build.abstract_state(c, train=True)
    rng = np.random.default_rng(7)

    def value(path, x):
        noise = 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
        return jax.numpy.asarray(noise + 1 if "['beats_ln']['weight']" in jax.tree_util.keystr(path) else noise)

    trainable = jax.tree_util.tree_map_with_path(value, abstract)
    work = tmp_path_factory.mktemp("interop") / "run"
    with TrainCheckpointer(work / "checkpoints", config=c.to_dict()) as ckpt:
        ckpt.save(STEP, trainable, build.optimizer(c).init(trainable), rng=jax.random.key(0), force=True)
    return work


@pytest.fixture(scope="module")
def exported(workdir):
    out = workdir.parent / "export"
    interop.export_run(workdir, out, merged=True)
    return out


@pytest.fixture(scope="module")
def ours(workdir):
    """Our embeddings of a random batch on every path, with the workdir's trained trainables."""
    c, _ = build.saved_config(workdir / "checkpoints")
    state, _ = build.restore_trained(c, workdir / "checkpoints", _one_device_mesh())
    batch = random_batch(c, 2, seed=5, augment=False)
    ecfg = build.embed_config(c)
    out = embed(state.model(), prepare(batch, FAST_PATHS, state.cfg, state.tokens, ecfg), ecfg)
    return dict(c=c, state=state, batch=batch, emb={p: np.asarray(v) for p, v in out.items()})


def _torch_embed(wave, batch, c) -> dict[str, np.ndarray]:
    e = c.embed
    kw = dict(encode=lambda s: [b + 1 for b in s.encode()], im_end=TINY_IM_END,  # the tiny byte tokenizer
              prompts={"V": e.video_prompt, "A": e.audio_prompt, "AV": e.av_prompt})
    return {p: np.stack([wave.embed(p, s, **kw) for s in clip_samples(batch)]) for p in FAST_PATHS}


# ----------------------------------------------------------------------------- export

def test_export_writes_adapter_base_merged_and_configs(exported):
    from transformers import Qwen2_5OmniThinkerConfig

    info = json.loads((exported / "export.json").read_text())
    assert (info["step"], info["base"], info["merged"], info["tokenizer"]) == (STEP, "base", "merged", "bytes")
    assert sorted(p.name for p in exported.iterdir()) == ["adapter", "base", "export.json", "merged"]
    adapter = json.loads((exported / "adapter" / "adapter_config.json").read_text())
    assert adapter["modules_to_save"] == list(HEADS) and adapter["r"] == 4 and adapter["lora_alpha"] == 8.0
    assert adapter["base_model_name_or_path"] == str(exported / "base")
    for d in ("base", "merged"):
        raw = json.loads((exported / d / "config.json").read_text())
        hf = Qwen2_5OmniThinkerConfig.from_pretrained(exported / d)
        assert hf.vision_start_token_id == 305 and hf.video_token_index == 302  # the tiny ids (data/tokens.py)
        assert hf.vision_config.out_hidden_size == hf.text_config.hidden_size == 64
        assert raw["beats_config"]["encoder_layers"] == 2 and raw["omniret_tokenizer"] == "bytes"
        assert ThinkerConfig.from_hf_dict(raw) == ThinkerConfig.from_hf_dict(hf.to_dict())


@pytest.mark.parametrize("make", [lambda c: build._random_configs(c)[0], lambda c: ThinkerConfig()],
                         ids=["tiny", "7b"])
def test_thinker_config_json_round_trips_through_transformers(make):
    from transformers import Qwen2_5OmniThinkerConfig

    cfg = make(build.load_config(TINY))
    hf = Qwen2_5OmniThinkerConfig(**cfg.to_hf_dict())
    assert ThinkerConfig.from_hf_dict(json.loads(hf.to_json_string())) == with_kernel("xla")(cfg)


def test_thinker_layout_export_of_a_released_checkpoint_gets_a_thinker_config(tmp_path):
    """A base in the released layout (config.json nesting thinker_config) exported in the thinker
    layout (what export writes for an orbax base) gets the thinker config transformers reads."""
    from transformers import Qwen2_5OmniThinkerConfig

    cfg, beats = build._random_configs(build.load_config(TINY))
    src = write_synthetic_wave(tmp_path / "released", cfg, beats, layout="released", dtype=np.float32,
                               config_updates={build.TOKENIZER_KEY: build.BYTE_TOKENIZER})
    assert "thinker_config" in json.loads((src / "config.json").read_text())
    model, _ = load_wave(src, progress=False)
    out = export_safetensors(model, tmp_path / "thinker", config_src=src)
    raw = json.loads((out / "config.json").read_text())
    assert "thinker_config" not in raw and raw["beats_config"]["encoder_layers"] == 2
    assert raw[build.TOKENIZER_KEY] == build.BYTE_TOKENIZER
    stored = ThinkerConfig.from_hf_dict(Qwen2_5OmniThinkerConfig.from_pretrained(out).to_dict())
    assert stored == with_kernel("xla")(cfg)   # the kernel is a run-time choice, not in config.json
    reloaded, _ = load_wave(out, progress=False)
    _assert_bit_identical(_flat(nnx.state(reloaded)), _flat(nnx.state(model)))


def test_adapter_keys_are_what_peft_writes(exported, tmp_path):
    ours_dir = exported / "adapter"
    cfg = json.loads((ours_dir / "adapter_config.json").read_text())
    wave = TorchWave.from_checkpoint(exported / "base")
    theirs = get_peft_model(wave, LoraConfig(r=cfg["r"], lora_alpha=cfg["lora_alpha"], target_modules=cfg["target_modules"],
                                             modules_to_save=list(HEADS)))
    theirs.save_pretrained(tmp_path / "peft")
    with safe_open(str(ours_dir / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            x, y = a.get_tensor(k), b.get_tensor(k)
            assert (x.shape, x.dtype) == (y.shape, y.dtype), k
    peft_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "modules_to_save", "peft_type", "bias", "use_dora", "use_rslora"):
        assert cfg[key] == peft_cfg[key], key
    assert sorted(cfg["target_modules"]) == sorted(peft_cfg["target_modules"])


def test_peft_model_embeds_like_flax(exported, ours):
    """PeftModel.from_pretrained(TorchWave from base/, adapter/) and merged/ reproduce our 7 paths."""
    c = ours["c"]
    base = TorchWave.from_checkpoint(exported / "base")
    before = _torch_embed(base, ours["batch"], c)
    model = PeftModel.from_pretrained(base, str(exported / "adapter")).eval()
    trained = _flat(ours["state"].trainable)
    with torch.no_grad():
        got = model.base_model.model.classify_linear.modules_to_save["default"][0].weight.numpy()
    assert got.tobytes() == trained["classify_linear.0.kernel"].T.copy().tobytes()
    errors, moved = {}, {}
    for name, wave in (("adapter", base), ("merged", TorchWave.from_checkpoint(exported / "merged"))):
        want = _torch_embed(wave, ours["batch"], c)
        errors[name] = {p: float(np.abs(ours["emb"][p] - want[p]).max()) for p in FAST_PATHS}
    moved = {p: float(np.abs(ours["emb"][p] - before[p]).max()) for p in FAST_PATHS}
    for name, e in errors.items():
        print(f"\n{name} in PyTorch vs Flax, max abs error per path: " + ", ".join(f"{p}={v:.1e}" for p, v in e.items()))
    print("training moved the embeddings by: " + ", ".join(f"{p}={v:.1e}" for p, v in moved.items()))
    assert max(max(e.values()) for e in errors.values()) <= TOL, errors
    assert min(moved.values()) > 1e-2, moved


def test_export_bad_input(workdir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"workdir {tmp_path / 'nowhere'} does not exist"):
        interop.export_run(tmp_path / "nowhere", tmp_path / "o")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match=r"plain has no checkpoints/ directory"):
        interop.export_run(tmp_path / "plain", tmp_path / "o")
    (tmp_path / "plain" / "checkpoints").mkdir()
    with pytest.raises(Exception, match=r"no checkpoint step in .*plain/checkpoints"):
        interop.export_run(tmp_path / "plain", tmp_path / "o")
    with pytest.raises(ValueError, match=rf"no checkpoint step 99 in .*; available: \[{STEP}\]"):
        interop.export_run(workdir, tmp_path / "o", step=99)
    held = tmp_path / "held"
    held.mkdir()
    (held / "model.safetensors").write_bytes(b"x")
    with pytest.raises(FileExistsError, match=rf"{held} already holds model\.safetensors"):
        interop.export_run(workdir, held)
    # A failure halfway (the adapter after the base was written) leaves nothing behind.
    monkeypatch.setattr(interop, "export_peft", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        interop.export_run(workdir, tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert not (tmp_path / "o").exists()
    _no_leftovers(tmp_path)


def test_cli_reports_errors_with_exit_code_2(workdir, tmp_path, capsys):
    assert interop.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o"), "--step", "7"]) == 2
    assert f"no checkpoint step 7 in {workdir / 'checkpoints'}" in capsys.readouterr().err
    assert interop.main(["--src", "x", "--out", "y"]) == 2
    assert "omniret-convert orbax --src" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        interop.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / "o"), "--config.train.steps=3"])
    assert "unrecognized argument '--config.train.steps=3'" in capsys.readouterr().err
    assert interop.main(["import", "--adapter", "a", "--base", "b", "--out", str(tmp_path / "o"), "--config", TINY,
                         "--config.train.nope=3"]) == 2
    assert "train.nope" in capsys.readouterr().err
    _no_leftovers(tmp_path)


# ----------------------------------------------------------------------------- import

def test_import_gives_bit_identical_trainables(workdir, exported, ours, tmp_path):
    run = tmp_path / "back"
    assert interop.main(["import", "--adapter", str(exported / "adapter"), "--base", str(exported / "base"),
                         "--out", str(run), "--config", TINY, "--config.train.steps=7"]) == 0
    info = json.loads((run / "import.json").read_text())
    assert info["heads_from_base"] == [] and info["changed_from_config"] == []
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.json", "config.py", "import.json"]
    assert sorted(p.name for p in (run / "checkpoints" / "0").iterdir() if not p.name.startswith("_")) == [
        "commit_success.txt", "meta", "opt_state", "trainables"]
    _assert_bit_identical(_read_trainables(workdir / "checkpoints" / str(STEP)), _read_trainables(run / "checkpoints" / "0"))
    # The workdir's config file is the saved config; with it the model rebuilds from base/ and embeds
    # exactly like the original run (the evaluator's and the trainer's path).
    c = build.load_config(run / "config.py")
    assert c.to_dict() == build.saved_config(run / "checkpoints")[0].to_dict()
    assert (c.model.init, c.model.checkpoint, c.train.steps) == ("checkpoint", str(exported / "base"), 7)
    state, step = build.restore_trained(c, run / "checkpoints", _one_device_mesh())
    assert step == 0
    ecfg = build.embed_config(c)
    got = embed(state.model(), prepare(ours["batch"], FAST_PATHS, state.cfg, state.tokens, ecfg), ecfg)
    for p in FAST_PATHS:
        np.testing.assert_array_equal(np.asarray(got[p]), ours["emb"][p], err_msg=p)
    # Training resumes from it: the optimizer state matches the trainer's.
    tx = build.optimizer(c)
    with TrainCheckpointer(run / "checkpoints") as ckpt:
        r = ckpt.restore_latest(state.trainable, jax.eval_shape(tx.init, state.trainable))
    assert r.step == 0 and r.opt_state is not None


def _peft_adapter(exported, out, **lora_kw):
    """An adapter written by peft itself onto TorchWave (random A and B)."""
    torch.manual_seed(3)
    wave = TorchWave.from_checkpoint(exported / "base")
    pm = get_peft_model(wave, LoraConfig(init_lora_weights=False, **lora_kw))
    with torch.no_grad():
        for name in [n for n in lora_kw.get("modules_to_save") or () if n in HEADS]:
            for p in getattr(pm.base_model.model, name).modules_to_save["default"].parameters():
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(out)
    return pm.eval(), out


def test_import_reads_rank_alpha_targets_and_modules_to_save_from_the_adapter(exported, ours, tmp_path):
    pm, adapter = _peft_adapter(exported, tmp_path / "peft", r=2, lora_alpha=6, lora_dropout=0.0,
                                target_modules=["model.language_model.layers.1.self_attn.q_proj",
                                                "model.language_model.layers.1.self_attn.v_proj"],
                                modules_to_save=["classify_linear"])
    run = tmp_path / "run"
    info = interop.import_adapter(adapter, exported / "base", run, config=TINY)
    assert info["heads_from_base"] == ["beats_ln", "beats_proj"]
    assert "lora.rank 4 -> 2" in info["changed_from_config"] and "lora.alpha 8.0 -> 6.0" in info["changed_from_config"]
    c = build.load_config(run / "config.py")
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout) == (2, 6.0, 0.0)
    assert c.lora.target == r"^(?:language_model\.layers\.1\.self_attn\.q_proj|language_model\.layers\.1\.self_attn\.v_proj)$"
    state, _ = build.restore_trained(c, run / "checkpoints", _one_device_mesh())
    ecfg = build.embed_config(c)
    got = embed(state.model(), prepare(ours["batch"], FAST_PATHS, state.cfg, state.tokens, ecfg), ecfg)
    want = _torch_embed(pm.base_model.model, ours["batch"], c)
    errors = {p: float(np.abs(np.asarray(got[p]) - want[p]).max()) for p in FAST_PATHS}
    print("\npeft-written adapter imported, vs peft: " + ", ".join(f"{p}={v:.1e}" for p, v in errors.items()))
    assert max(errors.values()) <= TOL, errors


def test_import_bad_input(exported, tmp_path):
    # modules_to_save naming a module that does not train here (the embedding table is frozen)
    _, embed_tokens = _peft_adapter(exported, tmp_path / "embed_tokens", r=2, lora_alpha=4,
                                    target_modules=["model.language_model.layers.0.self_attn.q_proj"],
                                    modules_to_save=["embed_tokens"])
    with pytest.raises(ValueError, match=r"adapter_config\.json: modules_to_save \['embed_tokens'\] cannot be "
                                         r"imported: only \['classify_linear', 'beats_ln', 'beats_proj'\]"):
        interop.import_adapter(embed_tokens, exported / "base", tmp_path / "r1", config=TINY)
    # an adapter for another base model: the same names, other widths
    c = build.load_config(TINY, {"model.tiny.hidden_size": 32, "model.tiny.num_attention_heads": 2})
    other = write_synthetic_wave(tmp_path / "other_base", *build._random_configs(c), dtype=np.float32)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: model\.language_model\.layers\.0\.self_attn\.k_proj "
                                         r"lora_A \(4, 64\) / lora_B \(32, 4\), expected \(4, 32\)"):
        interop.import_adapter(exported / "adapter", other, tmp_path / "r2", config=TINY)
    with pytest.raises(FileNotFoundError, match=r"is not a PEFT adapter directory: adapter_config\.json is missing"):
        interop.import_adapter(exported / "base", exported / "base", tmp_path / "r3", config=TINY)
    with pytest.raises(FileNotFoundError, match=r"--base .*nowhere: no such directory"):
        interop.import_adapter(exported / "adapter", tmp_path / "nowhere", tmp_path / "r4", config=TINY)
    with pytest.raises(FileExistsError, match=r"already holds adapter"):
        interop.import_adapter(exported / "adapter", exported / "base", exported, config=TINY)
    for name in ("r1", "r2", "r3", "r4"):
        assert not (tmp_path / name).exists(), name
    _no_leftovers(tmp_path)
    _no_leftovers(exported.parent)


# ----------------------------------------------------------------------------- orbax

def test_orbax_is_accepted_by_config_model_checkpoint(exported, tmp_path):
    """Convert once (bf16 frozen weights), then build_state restores the whole WAVE from orbax
    straight into the mesh's shardings, equal to loading the safetensors."""
    orb = tmp_path / "orbax"
    r = interop.convert_orbax(exported / "base", orb, param_dtype="bfloat16")
    abstract = nnx.eval_shape(lambda: build.random_model(build.load_config(TINY)))
    assert r["tensors"] == len(jax.tree.leaves(nnx.state(abstract)))
    assert sorted(p.name for p in orb.iterdir()) == ["config.json", "state"]
    c = build.load_config(TINY, {"model.init": "checkpoint", "model.checkpoint": str(orb),
                                 "model.precision.frozen": "bfloat16"})
    mesh = sharding.make_mesh(sharding.MeshConfig(data=2, fsdp=4), jax.devices()[:8])
    from_orbax, tokens = build.build_model(c, mesh=mesh)  # what build_state (train, eval) calls
    assert tokens.im_end_id == TINY_IM_END  # the byte tokenizer, named in the copied config.json
    from_torch, _ = load_wave(exported / "base", precision=build.precision(c), mesh=mesh, progress=False)
    a, b = nnx.state(from_orbax), nnx.state(from_torch)
    _assert_bit_identical(_flat(a), _flat(b))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.sharding == y.sharding and x.dtype == y.dtype
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(a)), "nothing was sharded"
    assert from_orbax.classify_linear["0"].kernel.dtype == np.float32  # heads stay in the trainable dtype
    # A float32 policy reads the bf16 orbax weights as their exact upcast.
    model, report = load_wave(orb, progress=False)
    assert report.layout == "orbax"
    q = "language_model.layers.0.self_attn.q_proj.kernel"
    np.testing.assert_array_equal(_flat(nnx.state(model))[q], _flat(b)[q].astype(np.float32))
    assert _flat(b)[q].dtype == ml_dtypes.bfloat16
    with pytest.raises(ConversionError, match=r"orbax WAVE checkpoint, which holds BEATs already"):
        load_wave(orb, beats_checkpoint="/x/beats.pt", progress=False)
    with pytest.raises(FileExistsError, match="already holds config.json"):
        interop.convert_orbax(exported / "base", orb)
    assert interop.main(["orbax", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    _no_leftovers(tmp_path)


def test_orbax_of_another_shape_is_named(exported, tmp_path):
    orb = interop.convert_orbax(exported / "base", tmp_path / "orbax", param_dtype="float32")["out"]
    cfg = json.loads((Path(orb) / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 96
    (Path(orb) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"state: does not match .*config\.json"):
        load_wave(orb, precision=Precision(), progress=False)


# ----------------------------------------------------------------------------- the user's round trip

def _run(module, *args, timeout=3000):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")  # one copy of the weights
    p = subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"{module} {args}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


SEVEN_B_OVERRIDES = [  # the 7B recipe at synthetic 7B widths, float32 compute, tiny media, 2 steps
    "--config.model.precision.compute=float32", "--config.model.precision.frozen=bfloat16",
    "--config.model.remat=none", "--config.data.num_workers=0", "--config.data.num_frames=4",
    "--config.data.min_pixels=3136", "--config.data.max_pixels=3136", "--config.data.audio_seconds=2.0",
    "--config.data.max_caption_chars=120", "--config.embed.text_len=128", "--config.embed.seq_len=256",
    "--config.train.batch_size=2", "--config.optim.accumulate=1", "--config.optim.lr=1e-3"]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "7b-width"])
def test_user_round_trip(tmp_path, variant):
    """train -> omniret-convert export -> a fresh PyTorch process embeds T, V, A, TVA -> the same clips
    through python -m omniret_jax.eval: <= 1e-5 per path; import -> bit-identical trainables, same
    embeddings. The 7B-width run starts from a synthetic WAVE converted to orbax."""
    import time

    from omniret_jax.convert.synthetic import seven_b_widths, write_synthetic_wave
    from omniret_jax.data.manifest import read_manifest
    from omniret_jax.data.pipeline import DataPipeline
    from omniret_jax.data.synth import SynthSettings, generate
    from omniret_jax.eval.embed import eval_pipeline_config
    from omniret_jax.eval.store import load_embeddings
    from tests.torch_wave import save_clips

    times = {}

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        out = fn(*a, **k)
        times[name] = time.perf_counter() - t
        return out

    n_clips = 8 if variant == "tiny" else 4
    s = build.load_config(TINY).data
    generate(str(tmp_path / "corpus"), n_clips, seed=4, settings=SynthSettings(seconds=s.synth_seconds, size=s.synth_size),
             progress=False)
    manifest = tmp_path / "corpus" / "manifest.jsonl"
    run, export = tmp_path / "run", tmp_path / "export"
    if variant == "tiny":
        config, extra = TINY, ["--config.train.steps=3"]
        torch_paths, merged_paths = "T,V,A,TVA", "T,V,A,TVA"
    else:
        cfg, beats = seven_b_widths(2)
        timed("synthetic checkpoint", write_synthetic_wave, tmp_path / "wave7b", cfg, beats,
              config_updates={build.TOKENIZER_KEY: build.BYTE_TOKENIZER})
        timed("orbax", _run, "omniret_jax.interop", "orbax", "--src", tmp_path / "wave7b", "--out", tmp_path / "orbax")
        config = f"{ROOT}/configs/omniretriever_7b.py:pairwise"
        extra = [f"--config.model.checkpoint={tmp_path / 'orbax'}", "--config.train.steps=2", *SEVEN_B_OVERRIDES]
        torch_paths, merged_paths = "T,V,A,TVA", "TVA"
    timed("train", _run, "omniret_jax.train", "--config", config, "--workdir", run, f"--config.data.manifest={manifest}",
          "--config.train.log_every=1", *extra)
    timed("export", _run, "omniret_jax.interop", "export", "--workdir", run, "--out", export, "--merged")

    # The clips as the evaluator decodes them, for the PyTorch process.
    c, step = build.saved_config(run / "checkpoints")
    pipeline = DataPipeline(read_manifest(manifest), eval_pipeline_config(c, num_workers=0), process_index=0,
                            process_count=1)
    save_clips(tmp_path / "clips.npz", [clip_samples(b)[0] for b in pipeline])
    pipeline.close()
    timed("pytorch", _run, "tests.torch_export_embed", "--export", export, "--clips", tmp_path / "clips.npz",
          "--out", tmp_path / "torch.npz", "--paths", torch_paths, "--merged-paths", merged_paths,
          "--base-paths", "TVA")
    timed("eval", _run, "omniret_jax.eval", "--checkpoint", run, "--manifest", manifest, "--out", tmp_path / "eval",
          "--paths", "TVA")
    ours = load_embeddings(tmp_path / "eval" / "embeddings.safetensors", manifest=manifest).paths
    with np.load(tmp_path / "torch.npz") as z:
        theirs = dict(z)
    errors = {p: float(np.abs(ours[p] - theirs[p]).max()) for p in torch_paths.split(",")}
    merged = {p: float(np.min(np.sum(ours[p] * theirs[f"merged/{p}"], axis=1))) for p in merged_paths.split(",")}
    merged_err = {p: float(np.abs(ours[p] - theirs[f"merged/{p}"]).max()) for p in merged_paths.split(",")}
    moved = float(np.abs(ours["TVA"] - theirs["base/TVA"]).max())  # what the trained adapter and heads change

    # The tiny run comes back onto the exported base/, the 7B-width one onto the orbax base it trained from.
    base = export / "base" if variant == "tiny" else tmp_path / "orbax"
    timed("import", _run, "omniret_jax.interop", "import", "--adapter", export / "adapter", "--base", base,
          "--out", tmp_path / "back", "--config", config, *([] if variant == "tiny" else SEVEN_B_OVERRIDES))
    _assert_bit_identical(_read_trainables(run / "checkpoints" / str(step)),
                          _read_trainables(tmp_path / "back" / "checkpoints" / "0"))
    timed("eval imported", _run, "omniret_jax.eval", "--checkpoint", tmp_path / "back", "--manifest", manifest,
          "--out", tmp_path / "eval_back", "--paths", "TVA")
    back = load_embeddings(tmp_path / "eval_back" / "embeddings.safetensors", manifest=manifest).paths
    back_err = {p: float(np.abs(ours[p] - back[p]).max()) for p in ours}

    print(f"\n[{variant}] PyTorch (transformers + peft) vs python -m omniret_jax.eval, max abs error per path: "
          + ", ".join(f"{p}={v:.1e}" for p, v in errors.items()))
    print(f"[{variant}] the base alone (no adapter) differs by {moved:.1e} on TVA")
    print(f"[{variant}] merged checkpoint: max abs error " + ", ".join(f"{p}={v:.1e}" for p, v in merged_err.items())
          + "; min cosine " + ", ".join(f"{p}={v:.6f}" for p, v in merged.items()))
    print(f"[{variant}] imported workdir vs the original in eval: max abs "
          + ", ".join(f"{p}={v:.1e}" for p, v in back_err.items()))
    print(f"[{variant}] seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    assert max(errors.values()) <= TOL, errors
    assert moved > 100 * TOL, moved
    assert max(back_err.values()) <= TOL, back_err
    # float32 frozen weights merge exactly enough for the same tolerance; bf16 ones round the merged q/k/v.
    if variant == "tiny":
        assert max(merged_err.values()) <= TOL, merged_err
    else:
        assert min(merged.values()) >= 0.999, merged
