"""Tiny random Qwen2.5-Omni thinkers and Qwen2.5-VL models built with transformers, the parity oracles.

Every size is small enough for CPU, but each structural feature of the 7B model
is exercised: GQA (4 query heads over 2 KV heads), M-RoPE sections, window and
full-attention vision blocks, several audio chunks of ``n_window``. Both families
share the tiny vocabulary's special ids.
"""

from __future__ import annotations

import torch
from transformers import (Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration, Qwen2_5_VLConfig,
                          Qwen2_5_VLForConditionalGeneration)

# Token ids of the tiny vocabulary (300 entries); the real ones live in ThinkerConfig.
AUDIO_ID, IMAGE_ID, VIDEO_ID = 290, 291, 292
AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 293, 294, 295, 296
IM_END, IM_START = 297, 298


def tiny_hf_config(*, vision_act: str = "silu") -> Qwen2_5OmniThinkerConfig:
    return Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=112, hidden_act=vision_act,
        ),
        audio_config=dict(
            num_mel_bins=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
            d_model=32, output_dim=64, n_window=100, max_source_positions=1500,
        ),
        audio_token_index=AUDIO_ID, image_token_index=IMAGE_ID, video_token_index=VIDEO_ID,
        audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS,
        # Not a declared field of the thinker config, but get_rope_index reads it.
        vision_start_token_id=VISION_BOS, vision_end_token_id=VISION_EOS,
        position_id_per_seconds=25, seconds_per_chunk=2,
    )


def tiny_hf_vl_config(*, tokens_per_second: int = 2, tie: bool = False) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL of the thinker's tiny widths (fused vision qkv, no audio)."""
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=IM_END,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            fullatt_block_indexes=[1], window_size=112, tokens_per_second=tokens_per_second,
        ),
        image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VISION_BOS,
        vision_end_token_id=VISION_EOS, tie_word_embeddings=tie,
    )


def tiny_hf_thinker(seed: int = 0, **kw) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """A float32 eval-mode thinker whose weights are all random (norms included)."""
    torch.manual_seed(seed)
    return _randomised(Qwen2_5OmniThinkerForConditionalGeneration(tiny_hf_config(**kw)).eval())


def tiny_hf_vl(seed: int = 0, **kw) -> Qwen2_5_VLForConditionalGeneration:
    """A float32 eval-mode Qwen2.5-VL whose weights are all random (norms included)."""
    torch.manual_seed(seed)
    return _randomised(Qwen2_5_VLForConditionalGeneration(tiny_hf_vl_config(**kw)).eval())


def saved_tiny_vl(directory, seed: int):
    """tiny_hf_vl(seed) and the directory save_pretrained wrote it to (what the converter loads)."""
    hf = tiny_hf_vl(seed=seed)
    hf.save_pretrained(directory / "qwen_vl")
    return hf, directory / "qwen_vl"


def _randomised(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1 and biases at 0, which would hide
            # a swapped scale or a dropped bias; randomise every tensor.
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name or "ln" in name else 0.1 * torch.randn_like(p))
            # At initializer_range 0.02 the text attention is nearly uniform, so
            # position-id errors would barely move the outputs; sharpen it.
            if name.startswith("model.language_model.") and name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(5.0)
    return model


def load_torch_weights(module, torch_module: torch.nn.Module) -> None:
    """Copy a torch submodule's weights into the matching Flax tower, in place.

    Uses the converter's leaf rule (a path's final ``kernel`` is torch's ``weight``
    transposed); every key must match on both sides, with the same shape.
    """
    import jax.numpy as jnp
    from flax import nnx

    from omniret_jax.convert.keymap import hf_to_flax_array

    sd = {k: v.detach().numpy() for k, v in torch_module.state_dict().items()}
    state = nnx.state(module, nnx.Param)
    flat = nnx.to_flat_state(state)
    keys = {".".join([*map(str, p[:-1]), "weight" if str(p[-1]) == "kernel" else str(p[-1])]): (p, v)
            for p, v in flat}
    assert set(keys) == set(sd), f"unmatched keys: {sorted(set(keys) ^ set(sd))}"
    for key, (path, var) in keys.items():
        value = hf_to_flax_array(path, sd[key])
        assert value.shape == tuple(var.get_value().shape), (key, value.shape, var.get_value().shape)
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    nnx.update(module, state)


def make_bidirectional(model: Qwen2_5OmniThinkerForConditionalGeneration) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """Omni-Embed-Nemotron's change to the thinker, in place: every decoder layer non-causal. In
    transformers 5 that alone is not enough (its mask builder stays causal whenever the batch
    has padding): call it with ``bidirectional_mask`` and explicit position ids."""
    for layer in model.model.language_model.layers:
        layer.self_attn.is_causal = False
    return model


def bidirectional_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """The published model's 4-D padding-only mask [B, 1, S, S] from a 2-D one: additive, 0 where
    the key is real and the dtype's minimum where it is padding (a boolean 4-D mask would be
    added as 0/1 by eager attention)."""
    b, s = attention_mask.shape
    keep = attention_mask[:, None, None, :].bool().expand(b, 1, s, s)
    return torch.zeros(b, 1, s, s, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
