"""Checkpoint conversion: every key layout, sharding, dtypes, bad checkpoints (the orbax output: test_interop.py)."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from omniret_jax.convert.keymap import detect_layout, flax_to_hf_array, flax_to_hf_key
from omniret_jax.convert.tensors import CheckpointError, TensorSource
from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.config import Precision
from tests.hf_tiny import tiny_hf_thinker


@pytest.fixture(scope="module")
def hf_model():
    return tiny_hf_thinker(seed=1)


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory):
    """save_pretrained output: the 'thinker' layout of transformers 5.23."""
    path = tmp_path_factory.mktemp("hf") / "thinker"
    hf_model.save_pretrained(path)
    return path


def _flat(model) -> dict[str, np.ndarray]:
    """The model's parameters as a torch-layout state dict (transformers-5 names)."""
    return {flax_to_hf_key(p, "transformers5"): flax_to_hf_array(p, np.asarray(v.get_value()))
            for p, v in nnx.to_flat_state(nnx.state(model))}


def _write(dirpath, tensors: dict[str, torch.Tensor], config_src, *, config: dict | None = None):
    dirpath.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dirpath / "model.safetensors"))
    if config is None:
        shutil.copyfile(config_src / "config.json", dirpath / "config.json")
    else:
        (dirpath / "config.json").write_text(json.dumps(config))
    return dirpath


def test_save_pretrained_layout_loads_every_tensor_exactly(hf_model, saved):
    model, report = load_thinker(saved, progress=False)
    assert report.layout == "thinker"
    sd = hf_model.state_dict()
    flat = _flat(model)
    assert set(flat) == set(sd), "the Flax state must hold exactly the thinker's tensors"
    for key, value in flat.items():
        np.testing.assert_array_equal(value, sd[key].numpy(), err_msg=key)


@pytest.mark.parametrize("layout", ["released", "transformers5"])
def test_other_layouts_give_identical_parameters(hf_model, saved, tmp_path, layout):
    sd = hf_model.state_dict()  # in-memory names = the transformers5 layout
    if layout == "released":
        rename = {"model.language_model.": "thinker.model.", "model.visual.": "thinker.visual.",
                  "model.audio_tower.": "thinker.audio_tower.", "lm_head.": "thinker.lm_head."}
        tensors = {}
        for k, v in sd.items():
            prefix = next(p for p in rename if k.startswith(p))
            tensors[rename[prefix] + k[len(prefix):]] = v
        tensors["talker.model.norm.weight"] = torch.ones(8)
        tensors["token2wav.code_embedding.weight"] = torch.zeros(3, 2)
        thinker_cfg = json.loads((saved / "config.json").read_text())
        config = {"model_type": "qwen2_5_omni", "thinker_config": thinker_cfg}
    else:
        tensors, config = dict(sd), None
    src = _write(tmp_path / layout, tensors, saved, config=config)
    model, report = load_thinker(src, progress=False)
    assert report.layout == layout
    if layout == "released":
        assert report.ignored == {"talker.": 1, "token2wav.": 1}
    reference, _ = load_thinker(saved, progress=False)
    a, b = _flat(model), _flat(reference)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sharded_checkpoint_with_index(hf_model, saved, tmp_path):
    sd = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    shutil.copyfile(saved / "config.json", tmp_path / "config.json")
    model, report = load_thinker(tmp_path, progress=False)
    assert report.loaded == len(keys)
    ref, _ = load_thinker(saved, progress=False)
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, _flat(ref)[k], err_msg=k)


def test_bfloat16_checkpoint_and_param_dtype(hf_model, saved, tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in hf_model.state_dict().items()}
    src = _write(tmp_path / "bf16", sd, saved)
    model, _ = load_thinker(src, precision=Precision(frozen=jnp.bfloat16), progress=False)
    flat = _flat(model)
    assert all(v.dtype == ml_dtypes.bfloat16 for v in flat.values())
    ref = sd["model.language_model.layers.0.self_attn.q_proj.weight"].float().numpy()
    got = flat["model.language_model.layers.0.self_attn.q_proj.weight"].astype(np.float32)
    np.testing.assert_array_equal(got, ref)
    # float32 parameters from a bf16 file are the exact upcast.
    model32, _ = load_thinker(src, precision=Precision(), progress=False)
    got32 = _flat(model32)["model.language_model.embed_tokens.weight"]
    np.testing.assert_array_equal(got32, sd["model.language_model.embed_tokens.weight"].float().numpy())


def test_unknown_missing_and_misshaped_keys_are_named(hf_model, saved, tmp_path):
    sd = dict(hf_model.state_dict())
    extra = dict(sd, **{"model.language_model.layers.0.self_attn.extra.weight": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"unknown key\(s\): model\.language_model\.layers\.0\.self_attn\.extra\.weight"):
        load_thinker(_write(tmp_path / "extra", extra, saved), layout="transformers5", progress=False)

    missing = {k: v for k, v in sd.items() if k != "model.visual.merger.ln_q.weight"}
    with pytest.raises(CheckpointError, match=r"missing key\(s\): model\.visual\.merger\.ln_q\.weight"):
        load_thinker(_write(tmp_path / "missing", missing, saved), progress=False)

    bad = dict(sd)
    bad["model.language_model.layers.1.mlp.up_proj.weight"] = torch.zeros(127, 64)
    with pytest.raises(CheckpointError, match=r"layers\.1\.mlp\.up_proj\.weight.*\(127, 64\).*\(128, 64\)"):
        load_thinker(_write(tmp_path / "shape", bad, saved), progress=False)


def test_pickles_refused_unless_allowed(hf_model, saved, tmp_path):
    src = tmp_path / "bin"
    src.mkdir()
    torch.save(hf_model.state_dict(), src / "pytorch_model.bin")
    shutil.copyfile(saved / "config.json", src / "config.json")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_thinker(src, progress=False)
    model, _ = load_thinker(src, allow_pickle=True, progress=False)
    ref, _ = load_thinker(saved, progress=False)
    for k, v in _flat(model).items():
        np.testing.assert_array_equal(v, _flat(ref)[k], err_msg=k)


def test_layout_detection_explains_failure():
    assert detect_layout(["thinker.model.norm.weight"]) == "released"
    assert detect_layout(["model.language_model.norm.weight", "model.visual.x"]) == "transformers5"
    assert detect_layout(["model.layers.0.mlp.up_proj.weight"]) == "thinker"
    with pytest.raises(ValueError, match="cannot tell the checkpoint layout"):
        detect_layout(["encoder.layers.0.weight"])


def test_truncated_safetensors_is_reported(saved, tmp_path):
    data = (saved / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    source = TensorSource(tmp_path)  # the header is intact, the data is not
    with pytest.raises(CheckpointError, match="truncated"):
        for k in source.keys():
            source.read(k)
