"""PEFT adapter export/import against peft itself on the tiny transformers thinker.

Reference: ``peft.get_peft_model`` / ``save_pretrained`` / ``PeftModel.from_pretrained``
on ``Qwen2_5OmniThinkerForConditionalGeneration`` (tests/hf_tiny.py). Key names
are taken from what peft writes, never assumed. Parity tolerance: float32,
HIGHEST matmul precision, max abs error <= 1e-4 on every hidden state and the
logits (text-only and one image case, via tests/test_thinker_parity.py's runner);
import -> export is bit-exact on every tensor.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import save_file

from omniret_jax.convert.peft import export_peft, import_peft
from omniret_jax.convert.to_flax import load_thinker
from omniret_jax.data.layout import Image
from omniret_jax.model.lora import LoRAConfig, apply_lora, lora_modules
from tests.hf_tiny import tiny_hf_thinker
from tests.test_thinker_parity import _run

RANK, ALPHA = 4, 8.0
PEFT_TARGET = r".*language_model\.layers\.\d+\.self_attn\.(q|k|v)_proj"
ROWS = {"text": [([], 11), ([], 5)], "image": [([Image((1, 8, 8))], 6)]}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    hf = tiny_hf_thinker(seed=3)
    path = tmp_path_factory.mktemp("base") / "thinker"
    hf.save_pretrained(path)
    fx, _ = load_thinker(path, progress=False)
    return hf, fx


def _fresh_flax(base):
    """A new module tree over the same (immutable) arrays: adapters attach to it alone."""
    return nnx.merge(*nnx.split(base[1]))


@pytest.fixture(scope="module")
def peft_dir(base, tmp_path_factory):
    """An adapter saved by peft with random A and B (init_lora_weights=False)."""
    torch.manual_seed(0)
    pm = get_peft_model(copy.deepcopy(base[0]), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=PEFT_TARGET, init_lora_weights=False))
    path = tmp_path_factory.mktemp("peft") / "adapter"
    pm.save_pretrained(path)
    return path


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _peft_model(base, adapter_dir):
    return PeftModel.from_pretrained(copy.deepcopy(base[0]), str(adapter_dir)).eval()


def _randomised_flax(base, seed=0):
    fx = _fresh_flax(base)
    apply_lora(fx, LoRAConfig(rank=RANK, alpha=ALPHA), nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for linear in lora_modules(fx).values():
        for var in (linear.lora_a, linear.lora_b):
            var.set_value(np.asarray(rng.normal(0, 0.3, var.shape), np.float32))
    return fx


def test_export_writes_peft_names_and_config(base, peft_dir, tmp_path):
    fx = _randomised_flax(base)
    out = export_peft(fx, LoRAConfig(rank=RANK, alpha=ALPHA), tmp_path / "ours", base_model_name_or_path="tiny")
    ours, theirs = _tensors(out), _tensors(peft_dir)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype, k
    a, b = (json.loads((d / "adapter_config.json").read_text()) for d in (out, peft_dir))
    assert (a["r"], a["lora_alpha"], a["peft_type"]) == (b["r"], b["lora_alpha"], b["peft_type"])
    assert a["base_model_name_or_path"] == "tiny"
    # peft wrote its regex; our explicit list must name exactly the modules peft adapted.
    adapted = sorted({k.split("base_model.model.")[1].rsplit(".lora_", 1)[0] for k in theirs})
    assert a["target_modules"] == adapted


@pytest.mark.parametrize("rows", ["text", "image"])
def test_exported_adapter_runs_in_peft_like_flax(base, tmp_path, rows):
    fx = _randomised_flax(base)
    out = export_peft(fx, LoRAConfig(rank=RANK, alpha=ALPHA), tmp_path / "ours", base_model_name_or_path="tiny")
    pm = _peft_model(base, out)
    # The adapter must really be in use on the torch side: it moves the outputs.
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        moved = float((pm(input_ids=ids).logits - base[0](input_ids=ids).logits).abs().max())
    assert moved > 1e-2, f"adapter barely changes the peft model ({moved:.2e})"
    errors = _run((pm.get_base_model(), fx), ROWS[rows], np.random.default_rng(11))
    print(f"peft vs flax ({rows}): max abs error {max(errors.values()):.2e}, adapter moved logits {moved:.2e}")


def test_peft_import_export_round_trip_is_bit_exact(base, peft_dir, tmp_path):
    fx = _fresh_flax(base)
    cfg = import_peft(fx, peft_dir)
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (RANK, ALPHA, 0.05)
    assert len(lora_modules(fx)) == 9
    out = export_peft(fx, cfg, tmp_path / "again", base_model_name_or_path="tiny")
    ours, theirs = _tensors(out), _tensors(peft_dir)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert _bytes(ours[k]) == _bytes(theirs[k]), k
    # The imported adapter computes what peft computes.
    errors = _run((_peft_model(base, peft_dir).get_base_model(), fx), ROWS["text"], np.random.default_rng(12))
    print(f"imported adapter vs peft: max abs error {max(errors.values()):.2e}")

    # A requested config that matches is accepted; bf16 adapters stay bf16 through the trip.
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k).to(torch.bfloat16) for k in f.keys()}, str(bf16_dir / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
    (bf16_dir / "adapter_config.json").write_text((peft_dir / "adapter_config.json").read_text())
    fx16 = _fresh_flax(base)
    cfg16 = import_peft(fx16, bf16_dir, LoRAConfig(rank=RANK, alpha=ALPHA))
    out16 = export_peft(fx16, cfg16, tmp_path / "bf16_again", base_model_name_or_path="tiny")
    src16, got16 = _tensors(bf16_dir), _tensors(out16)
    assert sorted(src16) == sorted(got16)
    for k in src16:
        assert got16[k].dtype == torch.bfloat16 and got16[k].shape == src16[k].shape, k
        assert _bytes(got16[k]) == _bytes(src16[k]), k


def _edited_adapter(src, dst, *, config=None, rename=None):
    dst.mkdir()
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg.update(config or {})
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as f:
        tensors = {(rename or {}).get(k, k): f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    return dst


def test_mismatched_adapters_are_refused_by_name(base, peft_dir, tmp_path):
    fx = _fresh_flax(base)
    with pytest.raises(ValueError, match=r"adapter rank r=4 does not match the requested LoRAConfig\.rank=16"):
        import_peft(fx, peft_dir, LoRAConfig())
    with pytest.raises(ValueError, match=r"lora_alpha=8\.0 does not match the requested LoRAConfig\.alpha=32\.0"):
        import_peft(fx, peft_dir, LoRAConfig(rank=RANK))
    q_only = LoRAConfig(rank=RANK, alpha=ALPHA, target=r"language_model\.layers\.\d+\.self_attn\.q_proj$")
    with pytest.raises(ValueError, match=r"in the adapter but not selected by target: \['language_model\.layers\.0\.self_attn\.k_proj'"):
        import_peft(fx, peft_dir, q_only)
    key = "base_model.model.model.language_model.layers.1.self_attn.v_proj.lora_A.weight"
    moved = _edited_adapter(peft_dir, tmp_path / "moved", rename={key: key.replace("layers.1", "layers.7")})
    with pytest.raises(ValueError, match=r"do not map onto a Linear.*layers\.7\.self_attn\.v_proj\.lora_A"):
        import_peft(fx, moved)
    dora = _edited_adapter(peft_dir, tmp_path / "dora", config={"use_dora": True})
    with pytest.raises(ValueError, match=r"unsupported LoRA options use_dora=True"):
        import_peft(fx, dora)
    wrong_r = _edited_adapter(peft_dir, tmp_path / "r8", config={"r": 8})
    with pytest.raises(ValueError, match=r"lora_A \(4, 64\).*expected \(8, 64\)"):
        import_peft(fx, wrong_r)
    assert not lora_modules(fx), "a refused adapter must leave the model untouched"

    fx2 = _randomised_flax(base)
    with pytest.raises(ValueError, match="rank 4 and scale 2.0, but the config says rank 8"):
        export_peft(fx2, LoRAConfig(rank=8, alpha=16.0), tmp_path / "x", base_model_name_or_path="tiny")
    with pytest.raises(ValueError, match="selected by target but not with an adapter"):
        export_peft(fx2, LoRAConfig(rank=RANK, alpha=ALPHA, target=r"self_attn\.[qkvo]_proj$"), tmp_path / "y",
                    base_model_name_or_path="tiny")
