"""The Qwen2.5-VL backbone against transformers' Qwen2_5_VLForConditionalGeneration (5.24).

Reference: a tiny random Qwen2.5-VL built here (tests/hf_tiny.py, every tensor randomised,
text q/k sharpened), saved with ``save_pretrained`` and loaded through the converter (its
fused vision ``attn.qkv`` split into our q/k/v). Both sides get the same token layout and
pixels; the reference computes its own M-RoPE ids in ``forward`` from ``mm_token_type_ids``
(text 0, image 1, video 2, as its processor writes them) and ``second_per_grid_ts``
(float32, the processor's dtype). Checked: position ids equal ``get_rope_index`` exactly;
max abs error <= 1e-4 (float32, HIGHEST) on every hidden state and the logits at real
tokens (tests/parity.py); the converter's export equals what save_pretrained wrote, bit for
bit; PEFT adapters move both sides alike (``PeftModel.from_pretrained``).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, get_peft_model

from omniret_jax.config import QwenVLConfig, backbone_config, read_hf_config
from omniret_jax import interop
from omniret_jax.convert.keymap import detect_layout
from omniret_jax.convert.orbax_io import restore_module
from omniret_jax.convert.peft import export_peft, import_peft
from omniret_jax.convert.tensors import MappingSource, TensorSource
from omniret_jax.convert.to_flax import load_backbone, load_module, load_thinker
from omniret_jax.convert.to_torch import export_safetensors
from omniret_jax.data.layout import Image, Video, batch_media, expand_turn, pad_batch, rope_index
from omniret_jax.inputs import IMAGE, VIDEO
from omniret_jax.model.lora import LoRAConfig, lora_modules
from omniret_jax.model.thinker import Thinker
from tests.hf_tiny import IM_END, IMAGE_ID, VIDEO_ID, saved_tiny_vl, tiny_hf_vl
from tests.parity import compare, flax_forward, vision_inputs, vision_items
from tests.test_peft import ALPHA, PEFT_TARGET, RANK, _bytes, _fresh_flax, _peft_model, _randomised_flax, _tensors


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return saved_tiny_vl(tmp_path_factory.mktemp("vl"), seed=5)


@pytest.fixture(scope="module")
def models(saved):
    hf, path = saved
    return hf, load_backbone(path, progress=False)[0]


def mm_token_type_ids(input_ids: np.ndarray) -> np.ndarray:
    """The processor's token types: image 1, video 2, everything else 0."""
    return np.where(input_ids == IMAGE_ID, 1, np.where(input_ids == VIDEO_ID, 2, 0))


def hf_rope(hf, batch, meta):
    g = lambda x, dtype: None if x is None else torch.tensor(x, dtype=dtype)  # noqa: E731
    with torch.no_grad():
        pos, delta = hf.model.get_rope_index(
            torch.tensor(batch.input_ids, dtype=torch.long), torch.tensor(mm_token_type_ids(batch.input_ids)),
            image_grid_thw=g(meta["image_grid_thw"], torch.long), video_grid_thw=g(meta["video_grid_thw"], torch.long),
            second_per_grid_ts=g(meta["second_per_grid"], torch.float32),
            attention_mask=torch.tensor(batch.attention_mask))
    return pos.numpy(), delta.numpy().reshape(-1)


def _run(models, rows, rng, side="left"):
    """rows: list of (media items, prompt length). Returns the measured errors."""
    hf, fx = models
    cfg = fx.cfg
    layouts = [expand_turn(media, [int(t) for t in rng.integers(0, 280, size=n)] + [IM_END], cfg)
               for media, n in rows]
    batch = pad_batch([lay.input_ids for lay in layouts], max(len(lay.input_ids) for lay in layouts) + 2,
                      pad_id=0, side=side)
    meta = batch_media(layouts)
    images, videos = vision_items(rng, meta["image_grid_thw"]), vision_items(rng, meta["video_grid_thw"])

    kw = dict(input_ids=torch.tensor(batch.input_ids, dtype=torch.long),
              attention_mask=torch.tensor(batch.attention_mask, dtype=torch.long),
              mm_token_type_ids=torch.tensor(mm_token_type_ids(batch.input_ids)), output_hidden_states=True)
    if images:
        kw.update(pixel_values=torch.tensor(np.concatenate(images)), image_grid_thw=torch.tensor(meta["image_grid_thw"]))
    if videos:
        kw.update(pixel_values_videos=torch.tensor(np.concatenate(videos)),
                  video_grid_thw=torch.tensor(meta["video_grid_thw"]),
                  second_per_grid_ts=torch.tensor(meta["second_per_grid"], dtype=torch.float32))
    with torch.no_grad():
        ref = hf(**kw)

    pos, deltas = rope_index(batch.input_ids, batch.attention_mask, cfg, **meta)
    ref_pos, ref_deltas = hf_rope(hf, batch, meta)
    np.testing.assert_array_equal(pos, ref_pos, err_msg="M-RoPE position ids differ from get_rope_index")
    np.testing.assert_array_equal(deltas, ref_deltas)

    vis_in, n_valid, capacity = vision_inputs(cfg, {IMAGE: (images, meta["image_grid_thw"]),
                                                    VIDEO: (videos, meta["video_grid_thw"])})
    states, logits = flax_forward(fx, batch, pos, vis_in, n_valid, capacity)
    return compare(ref, states, logits, batch.attention_mask, f"qwen2.5-vl, {side}-padded")


# -- forward parity --------------------------------------------------------------------

CASES = {
    "text_only": [([], 11), ([], 5)],
    "one_image": [([Image((1, 8, 8))], 6)],
    "two_images": [([Image((1, 8, 8)), Image((1, 6, 10))], 4)],
    "video": [([Video((3, 8, 12), second_per_grid=2.5)], 5)],
    "video_and_image": [([Video((2, 4, 8), second_per_grid=0.5), Image((1, 6, 4))], 3)],
}
MIXED = [
    ([], 9),
    ([Image((1, 8, 8))], 3),
    ([Video((2, 8, 12), second_per_grid=1.0)], 4),
    ([Image((1, 4, 4)), Video((4, 4, 4), second_per_grid=2.5)], 2),
]


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_matches_transformers(models, case):
    _run(models, CASES[case], np.random.default_rng(sorted(CASES).index(case)))


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_mixed_batch(models, side):
    _run(models, MIXED, np.random.default_rng(9), side=side)


def test_tied_embeddings(tmp_path):
    """Qwen2.5-VL-3B ties its LM head to the embedding table: no lm_head in the model or the checkpoint."""
    hf = tiny_hf_vl(seed=6, tie=True)
    hf.save_pretrained(tmp_path / "tied")
    fx, report = load_backbone(tmp_path / "tied", progress=False)
    assert fx.lm_head is None and fx.cfg.text.tie_word_embeddings
    assert not any(k.startswith("lm_head") for k in TensorSource(tmp_path / "tied").keys())
    _run((hf, fx), CASES["one_image"], np.random.default_rng(20))


# -- converter ---------------------------------------------------------------------------

def test_layouts_are_what_transformers_writes_and_holds(saved, models, tmp_path):
    hf, path = saved
    keys = TensorSource(path).keys()
    # save_pretrained of transformers 5.24 writes the pre-5 names, with the vision qkv fused.
    assert detect_layout(keys) == "qwen2_5_vl"
    assert "visual.blocks.0.attn.qkv.weight" in keys and "model.layers.0.self_attn.q_proj.weight" in keys
    assert not any(".attn.q." in k for k in keys)
    memory = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    assert detect_layout(memory) == "qwen2_5_vl_transformers5"
    from_memory, report = load_module(lambda: Thinker(models[1].cfg, rngs=nnx.Rngs(0)), MappingSource(memory),
                                      progress=False)
    assert report.layout == "qwen2_5_vl_transformers5" and report.loaded == len(memory)
    a, b = nnx.to_flat_state(nnx.state(models[1])), dict(nnx.to_flat_state(nnx.state(from_memory)))
    for p, v in a:
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[p].get_value()), err_msg=str(p))
    # q, k, v are the row thirds of the fused weight, in that order.
    qkv = memory["model.visual.blocks.1.attn.qkv.weight"]
    attn = models[1].visual.blocks[1].attn
    np.testing.assert_array_equal(np.asarray(attn.k.kernel.get_value()), qkv[32:64].T)

    with pytest.raises(ValueError, match="Qwen2.5-VL checkpoint, not a Qwen2.5-Omni thinker"):
        load_thinker(path, progress=False)


def test_export_is_bit_exact_with_save_pretrained(saved, models, tmp_path):
    _, path = saved
    out = export_safetensors(models[1], tmp_path / "out", config_src=path)
    ours, theirs = TensorSource(out), TensorSource(path)
    assert sorted(ours.keys()) == sorted(theirs.keys())
    for k in theirs.keys():
        a, b = ours.read(k), theirs.read(k)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), k
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2_5_vl"


def test_cli_converts_a_qwen_vl_checkpoint(saved, models, tmp_path, capsys):
    _, path = saved
    assert interop.main(["orbax", "--src", str(path), "--out", str(tmp_path / "flax"), "--param-dtype", "float32"]) == 0
    assert "layout qwen2_5_vl" in capsys.readouterr().out
    cfg = backbone_config(read_hf_config(tmp_path / "flax"))
    restored = restore_module(lambda: Thinker(cfg, rngs=nnx.Rngs(0)), tmp_path / "flax")
    b = dict(nnx.to_flat_state(nnx.state(restored)))
    for p, v in nnx.to_flat_state(nnx.state(models[1])):
        np.testing.assert_array_equal(np.asarray(v.get_value()), np.asarray(b[p].get_value()), err_msg=str(p))


def test_config_of_the_released_4x_format_matches_transformers():
    """A 4.x config.json (text fields at the top, rope_scaling/rope_theta there, in_chans):
    our parse agrees with what transformers 5.24 makes of the same dict."""
    from transformers import Qwen2_5_VLConfig

    d = dict(model_type="qwen2_5_vl", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=5e5, vocab_size=300,
             rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=True,
             image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=295, vision_end_token_id=296,
             vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, in_chans=3,
                                out_hidden_size=64, fullatt_block_indexes=[1], tokens_per_second=2))
    ours, theirs = QwenVLConfig.from_hf_dict(d), QwenVLConfig.from_hf_dict(Qwen2_5_VLConfig(**d).to_dict())
    assert ours == theirs
    assert ours.text.rope_theta == 5e5 and ours.text.mrope_section == (2, 3, 3) and ours.text.tie_word_embeddings
    assert ours.tokens_per_second == 2 and ours.vision.depth == 2 and ours.family == "qwen2_5_vl"
    # Without tokens_per_second transformers uses its dataclass default, 4 (the released configs say 2).
    del d["vision_config"]["tokens_per_second"]
    assert QwenVLConfig.from_hf_dict(d).tokens_per_second == Qwen2_5_VLConfig(**d).vision_config.tokens_per_second


# -- LoRA <-> PEFT ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base(models):
    return models


def test_exported_adapter_runs_in_peft_like_flax(base, tmp_path):
    fx = _randomised_flax(base)
    assert len(lora_modules(fx)) == 9  # q/k/v of 3 text layers; the vision q/k/v are not targets
    out = export_peft(fx, LoRAConfig(rank=RANK, alpha=ALPHA), tmp_path / "ours", base_model_name_or_path="tiny-vl")
    names = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert names[0] == "model.language_model.layers.0.self_attn.k_proj"
    pm = _peft_model(base, out)
    ids = torch.tensor([[5, 17, 42, 7]])
    with torch.no_grad():
        moved = float((pm(input_ids=ids).logits - base[0](input_ids=ids).logits).abs().max())
    assert moved > 1e-2, f"adapter barely changes the peft model ({moved:.2e})"
    errors = _run((pm.get_base_model(), fx), MIXED, np.random.default_rng(13))
    print(f"peft vs flax (qwen2.5-vl): max abs error {max(errors.values()):.2e}, adapter moved logits {moved:.2e}")


def test_peft_adapter_imports_and_exports_bit_exact(base, tmp_path):
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base[0]), LoraConfig(
        r=RANK, lora_alpha=ALPHA, lora_dropout=0.05, target_modules=PEFT_TARGET, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "peft")
    fx = _fresh_flax(base)
    cfg = import_peft(fx, tmp_path / "peft")
    assert len(lora_modules(fx)) == 9
    out = export_peft(fx, cfg, tmp_path / "again", base_model_name_or_path="tiny-vl")
    ours, theirs = _tensors(out), _tensors(tmp_path / "peft")
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert _bytes(ours[k]) == _bytes(theirs[k]), k
    _run((pm.eval().get_base_model(), fx), CASES["video_and_image"], np.random.default_rng(14))
