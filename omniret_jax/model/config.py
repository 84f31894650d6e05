"""Model configuration read from a Hugging Face ``config.json``.

Accepts the full Qwen2.5-Omni config (``thinker_config`` nested inside), a
thinker-only config (``model_type == "qwen2_5_omni_thinker"``) or a WAVE config
built on either. Unknown towers or missing fields fail with the field named.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax.numpy as jnp


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0


@dataclasses.dataclass(frozen=True)
class AudioConfig:
    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    scale_embedding: bool = False
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584


@dataclasses.dataclass(frozen=True)
class ThinkerConfig:
    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    audio: AudioConfig = AudioConfig()
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int = 2
    # Compute dtype of activations and dtype parameters are stored in.
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def replace(self, **kw) -> "ThinkerConfig":
        return dataclasses.replace(self, **kw)

    # -- Hugging Face config.json -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, *, dtype="float32", param_dtype="float32") -> "ThinkerConfig":
        if "thinker_config" in d:
            d = d["thinker_config"]
        for key in ("text_config", "vision_config", "audio_config"):
            if key not in d:
                raise ValueError(f"config has no {key!r}: not a Qwen2.5-Omni thinker config "
                                 f"(model_type={d.get('model_type')!r})")
        t, v, a = d["text_config"], d["vision_config"], d["audio_config"]
        rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
        text = TextConfig(
            vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
            intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
            num_attention_heads=t["num_attention_heads"],
            num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
            head_dim=t.get("head_dim"), hidden_act=t.get("hidden_act", "silu"),
            rms_norm_eps=t.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope.get("rope_theta", t.get("rope_theta", 1e6))),
            mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        )
        if t.get("use_sliding_window"):
            raise ValueError("text_config.use_sliding_window=True is not supported (Qwen2.5-Omni uses full attention)")
        vrope = v.get("rope_parameters") or {}
        vision = VisionConfig(
            depth=v["depth"], hidden_size=v["hidden_size"], hidden_act=v.get("hidden_act", "silu"),
            intermediate_size=v["intermediate_size"], num_heads=v["num_heads"],
            in_channels=v.get("in_channels", 3), patch_size=v.get("patch_size", 14),
            spatial_merge_size=v.get("spatial_merge_size", 2),
            temporal_patch_size=v.get("temporal_patch_size", 2), window_size=v.get("window_size", 112),
            out_hidden_size=v.get("out_hidden_size", t["hidden_size"]),
            fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
            rope_theta=float(vrope.get("rope_theta", 10000.0)),
        )
        audio = AudioConfig(
            num_mel_bins=a.get("num_mel_bins", 128), encoder_layers=a["encoder_layers"],
            encoder_attention_heads=a["encoder_attention_heads"], encoder_ffn_dim=a["encoder_ffn_dim"],
            d_model=a["d_model"], activation_function=a.get("activation_function", "gelu"),
            scale_embedding=bool(a.get("scale_embedding", False)),
            max_source_positions=a.get("max_source_positions", 1500), n_window=a.get("n_window", 100),
            output_dim=a.get("output_dim", t["hidden_size"]),
        )
        return cls(
            text=text, vision=vision, audio=audio,
            audio_token_id=d.get("audio_token_index", d.get("audio_token_id", 151646)),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 151655)),
            video_token_id=d.get("video_token_index", d.get("video_token_id", 151656)),
            audio_start_token_id=d.get("audio_start_token_id", 151647),
            audio_end_token_id=d.get("audio_end_token_id", 151648),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            position_id_per_seconds=d.get("position_id_per_seconds", 25),
            seconds_per_chunk=d.get("seconds_per_chunk", 2),
            dtype=dtype_from_name(dtype), param_dtype=dtype_from_name(param_dtype),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw) -> "ThinkerConfig":
        path = Path(path)
        cfg_file = path / "config.json" if path.is_dir() else path
        if not cfg_file.is_file():
            raise FileNotFoundError(f"no config.json at {cfg_file}")
        return cls.from_hf_dict(json.loads(cfg_file.read_text()), **kw)
