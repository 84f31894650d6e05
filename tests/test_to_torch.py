"""Flax -> PyTorch safetensors export: bit-exact round trips in every layout, sharding, merged LoRA.

Sources are written independently of the key map (transformers' save_pretrained,
its in-memory state_dict, and a hand-renamed released layout), loaded with
``to_flax`` and written back with ``export_safetensors``; the files are read
with the safetensors library. Round trips must give the same key set, dtypes and
bytes. The merged-LoRA export is checked against peft's ``merge_and_unload``
(max abs error <= 1e-6 on the merged weights) and, loaded by transformers,
against the Flax model with its adapters (max abs error <= 1e-4, float32).
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import Qwen2_5OmniThinkerForConditionalGeneration

from omniret_jax.config import Precision
from omniret_jax.convert.keymap import THINKER_LAYOUTS
from omniret_jax.convert.peft import export_peft
from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.convert.to_torch import export_safetensors
from omniret_jax.model.lora import LoRAConfig, apply_lora, lora_modules
from tests.hf_tiny import tiny_hf_thinker
from tests.test_thinker_parity import _run
from tests.torch_wave import read_safetensors

MERGE_TOL = 1e-6


@pytest.fixture(scope="module")
def hf():
    return tiny_hf_thinker(seed=5)


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
    """save_pretrained output per dtype (the 'thinker' layout)."""
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        path = tmp_path_factory.mktemp(name) / "thinker"
        copy.deepcopy(hf).to(dtype).save_pretrained(path)
        out[name] = path
    return out


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _source(layout: str, saved_dir, dst):
    """A checkpoint of ``layout`` built without the key map under test."""
    if layout == "thinker":
        return saved_dir
    sd = read_safetensors(saved_dir)  # thinker layout: model.*, visual.*, audio_tower.*, lm_head.*
    cfg = json.loads((saved_dir / "config.json").read_text())
    if layout == "nemotron":  # the thinker's keys under Omni-Embed-Nemotron's config
        rename = {p: p for p in ("model.", "visual.", "audio_tower.", "lm_head.")}
        cfg = dict(cfg, model_type="nvomniembed", architectures=["NVOmniEmbedModel"])
    elif layout == "transformers5":
        rename = {"model.": "model.language_model.", "visual.": "model.visual.",
                  "audio_tower.": "model.audio_tower.", "lm_head.": "lm_head."}
    else:  # released
        rename = {"model.": "thinker.model.", "visual.": "thinker.visual.",
                  "audio_tower.": "thinker.audio_tower.", "lm_head.": "thinker.lm_head."}
        cfg = {"model_type": "qwen2_5_omni", "thinker_config": cfg}
    tensors = {}
    for k, v in sd.items():
        prefix = next(p for p in rename if k.startswith(p))
        tensors[rename[prefix] + k[len(prefix):]] = v
    dst.mkdir(parents=True)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _assert_same_files(src, out):
    a, b = read_safetensors(src), read_safetensors(out)
    assert sorted(a) == sorted(b), f"key sets differ: {sorted(set(a) ^ set(b))[:5]}"
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert _bytes(a[k]) == _bytes(b[k]), k
    assert (src / "config.json").read_bytes() == (out / "config.json").read_bytes()
    return len(a)


def test_every_layout_has_a_source_builder():
    assert sorted(THINKER_LAYOUTS) == ["nemotron", "released", "thinker", "transformers5"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("layout", sorted(THINKER_LAYOUTS))
def test_hf_flax_hf_round_trip_is_bit_exact(saved, tmp_path, layout, dtype):
    src = _source(layout, saved[dtype], tmp_path / "src")
    model, report = load_thinker(src, precision=Precision.from_names(frozen=dtype), progress=False)
    assert report.layout == layout
    out = export_safetensors(model, tmp_path / "out", layout=layout, config_src=src)
    n = _assert_same_files(src, out)
    print(f"\n{layout}/{dtype}: {n} tensors bit-exact")


def test_sharded_export_loads_in_transformers(hf, saved, tmp_path):
    model, _ = load_thinker(saved["float32"], progress=False)
    limit = 200_000
    out = export_safetensors(model, tmp_path / "out", config_src=saved["float32"], max_shard_bytes=limit)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    sizes = {s: (out / s).stat().st_size for s in shards}
    tensors = read_safetensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for s in shards:
        with safe_open(str(out / s), "pt") as f:
            keys = list(f.keys())
            data = sum(f.get_tensor(k).numel() * 4 for k in keys)
        assert data <= limit or len(keys) == 1, f"{s}: {data} bytes in {len(keys)} tensors ({sizes[s]} on disk)"
    reloaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out)
    want, got = hf.state_dict(), reloaded.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k


def test_merged_lora_export(hf, saved, tmp_path):
    model, _ = load_thinker(saved["float32"], progress=False)
    cfg = LoRAConfig(rank=4, alpha=8.0)
    apply_lora(model, cfg, nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for linear in lora_modules(model).values():
        for var in (linear.lora_a, linear.lora_b):
            var.set_value(np.asarray(rng.normal(0, 0.3, var.shape), np.float32))

    with pytest.raises(ValueError, match="carry LoRA adapters.*merge_lora=True.*export_peft"):
        export_safetensors(model, tmp_path / "refused", config_src=saved["float32"])
    # In-memory names, to compare with peft's merge of the same adapter key by key.
    out = export_safetensors(model, tmp_path / "merged", layout="transformers5", config_src=saved["float32"],
                             merge_lora=True)
    assert len(lora_modules(model)) == 9, "exporting must not merge the model itself"
    merged = read_safetensors(out)
    assert not [k for k in merged if "lora" in k]
    export_peft(model, cfg, tmp_path / "adapter", base_model_name_or_path="tiny")
    ref = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "adapter")).merge_and_unload().state_dict()
    assert sorted(merged) == sorted(ref)
    err = max(float((merged[k] - v).abs().max()) for k, v in ref.items())
    print(f"\nmerged weights vs peft merge_and_unload: max abs error {err:.2e}")
    assert err <= MERGE_TOL

    reloaded = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(out).eval()
    errors = _run((reloaded, model), [([], 11), ([], 5)], np.random.default_rng(1))
    print(f"merged checkpoint in transformers vs Flax with adapters: max abs error {max(errors.values()):.2e}")


def test_bad_requests(saved, tmp_path):
    model, _ = load_thinker(saved["float32"], progress=False)
    with pytest.raises(ValueError, match="unknown layout 'hf'"):
        export_safetensors(model, tmp_path / "a", layout="hf", config_src=saved["float32"])
    with pytest.raises(FileNotFoundError, match="config_src"):
        export_safetensors(model, tmp_path / "b", config_src=tmp_path / "nowhere")
    out = export_safetensors(model, tmp_path / "c", config_src=saved["float32"],
                             config_updates={"beats_config": {"encoder_layers": 2}})
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["beats_config"] == {"encoder_layers": 2} and "text_config" in cfg
    with pytest.raises(FileExistsError, match="model.safetensors exists"):
        export_safetensors(model, out, config_src=saved["float32"])
    shutil.rmtree(out)
