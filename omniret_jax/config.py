"""The bottom layer: configuration dataclasses that both ``data/`` (host) and ``model/`` (device) read.

- ``Precision``: the one mixed-precision policy (compute, trainable-parameter and
  frozen-parameter dtypes), named once in a config and honoured by every loader.
- ``ThinkerConfig`` (text, vision, audio towers and token ids), read from a Hugging Face
  ``config.json``: the full Qwen2.5-Omni config (``thinker_config`` nested inside), a
  thinker-only config or a WAVE config built on either. Unknown towers or missing fields
  fail with the field named.
- ``QwenVLConfig``: Qwen2.5-VL (GVE's backbone), the same decoder and ViT without the audio
  tower and with its own temporal position rule (``tokens_per_second``). ``family`` tells the
  two apart wherever a rule differs; ``backbone_config`` picks the class from ``model_type``.
- ``MediaPolicy``: which media a host layout accepts (checked before anything reaches jit).
- ``BEATsConfig`` (WAVE's second audio encoder) and ``EmbedConfig`` (how the seven
  embedding paths are laid out and pooled: lengths, turn template, prefixes, prompts, pooling,
  audio branch). WAVE and Omni-Embed-Nemotron are two ``EmbedConfig`` settings of one embedder.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar, Mapping, Sequence

import jax.numpy as jnp


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_from_name(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class Precision:
    """Mixed-precision policy: activations, trained parameters, frozen parameters.

    ``trainable`` covers what the optimizer updates (LoRA adapters, WAVE's fusion head and
    BEATs adaptor); ``frozen`` every other weight (the backbone, the towers, BEATs), which
    bfloat16 halves in memory. Loaders store each parameter in its dtype directly.
    """
    compute: Any = jnp.float32
    trainable: Any = jnp.float32
    frozen: Any = jnp.float32

    @classmethod
    def from_names(cls, compute: str = "float32", trainable: str = "float32", frozen: str = "float32"
                   ) -> "Precision":
        return cls(dtype_from_name(compute), dtype_from_name(trainable), dtype_from_name(frozen))


# config.json ``model_type`` of nvidia/omni-embed-nemotron-3b (its ``NVOmniEmbedConfig``, a thinker config).
NEMOTRON_MODEL_TYPE = "nvomniembed"


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
    causal: bool = True                 # False: bidirectional self-attention (padding-only mask)
    attention_impl: str | None = None   # None/"xla" or "cudnn" (jax.nn.dot_product_attention) or "blocked"

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
    attention_impl: str | None = None   # None: segment masks through jax.nn; "blocked": model.attention


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


class _Backbone:
    """What both backbone configs offer besides their fields."""

    def replace(self, **kw):
        return dataclasses.replace(self, **kw)

    @classmethod
    def from_pretrained(cls, path: str | Path, **kw):
        return cls.from_hf_dict(read_hf_config(path), **kw)


@dataclasses.dataclass(frozen=True)
class ThinkerConfig(_Backbone):
    family: ClassVar[str] = "qwen2_5_omni"

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
    precision: Precision = Precision()

    # -- Hugging Face config.json -------------------------------------------------
    @classmethod
    def from_hf_dict(cls, d: dict, *, precision: Precision = Precision()) -> "ThinkerConfig":
        if "thinker_config" in d:
            d = d["thinker_config"]
        for key in ("text_config", "vision_config", "audio_config"):
            if key not in d:
                raise ValueError(f"config has no {key!r}: not a Qwen2.5-Omni thinker config "
                                 f"(model_type={d.get('model_type')!r})")
        t, v, a = d["text_config"], d["vision_config"], d["audio_config"]
        text = _text_from_hf(t, tie=bool(d.get("tie_word_embeddings", False)), eps=1e-6)
        audio = AudioConfig(
            num_mel_bins=a.get("num_mel_bins", 128), encoder_layers=a["encoder_layers"],
            encoder_attention_heads=a["encoder_attention_heads"], encoder_ffn_dim=a["encoder_ffn_dim"],
            d_model=a["d_model"], activation_function=a.get("activation_function", "gelu"),
            scale_embedding=bool(a.get("scale_embedding", False)),
            max_source_positions=a.get("max_source_positions", 1500), n_window=a.get("n_window", 100),
            output_dim=a.get("output_dim", t["hidden_size"]),
        )
        if d.get("model_type") == NEMOTRON_MODEL_TYPE:
            # Omni-Embed-Nemotron's modeling file makes every decoder layer non-causal.
            text = dataclasses.replace(text, causal=False)
        return cls(
            text=text, vision=_vision_from_hf(v, t["hidden_size"]), audio=audio,
            audio_token_id=d.get("audio_token_index", d.get("audio_token_id", 151646)),
            image_token_id=d.get("image_token_index", d.get("image_token_id", 151655)),
            video_token_id=d.get("video_token_index", d.get("video_token_id", 151656)),
            audio_start_token_id=d.get("audio_start_token_id", 151647),
            audio_end_token_id=d.get("audio_end_token_id", 151648),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            position_id_per_seconds=d.get("position_id_per_seconds", 25),
            seconds_per_chunk=d.get("seconds_per_chunk", 2),
            precision=precision,
        )

    def to_hf_dict(self) -> dict:
        """The thinker ``config.json`` that transformers' ``Qwen2_5OmniThinkerConfig`` reads
        (the inverse of ``from_hf_dict``; the precision policy is not part of it).

        ``vision_start_token_id`` is written although the transformers config declares no
        such field: its ``get_rope_index`` reads it (architecture.md section 6).
        """
        t, v, a = self.text, self.vision, self.audio
        text = dict(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                    num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                    num_key_value_heads=t.num_key_value_heads, hidden_act=t.hidden_act, rms_norm_eps=t.rms_norm_eps,
                    tie_word_embeddings=t.tie_word_embeddings, use_sliding_window=False,
                    rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta,
                                     "mrope_section": list(t.mrope_section)})
        if t.head_dim is not None:
            text["head_dim"] = t.head_dim
        vision = dict(depth=v.depth, hidden_size=v.hidden_size, hidden_act=v.hidden_act,
                      intermediate_size=v.intermediate_size, num_heads=v.num_heads, in_channels=v.in_channels,
                      patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
                      temporal_patch_size=v.temporal_patch_size, window_size=v.window_size,
                      out_hidden_size=v.out_hidden_size, fullatt_block_indexes=list(v.fullatt_block_indexes),
                      rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
        audio = dict(num_mel_bins=a.num_mel_bins, encoder_layers=a.encoder_layers,
                     encoder_attention_heads=a.encoder_attention_heads, encoder_ffn_dim=a.encoder_ffn_dim,
                     d_model=a.d_model, activation_function=a.activation_function, scale_embedding=a.scale_embedding,
                     max_source_positions=a.max_source_positions, n_window=a.n_window, output_dim=a.output_dim)
        return dict(
            model_type="qwen2_5_omni_thinker", architectures=["Qwen2_5OmniThinkerForConditionalGeneration"],
            text_config=text, vision_config=vision, audio_config=audio,
            audio_token_index=self.audio_token_id, image_token_index=self.image_token_id,
            video_token_index=self.video_token_id, audio_start_token_id=self.audio_start_token_id,
            audio_end_token_id=self.audio_end_token_id, vision_start_token_id=self.vision_start_token_id,
            vision_end_token_id=self.vision_end_token_id, position_id_per_seconds=self.position_id_per_seconds,
            seconds_per_chunk=self.seconds_per_chunk, tie_word_embeddings=t.tie_word_embeddings,
        )


@dataclasses.dataclass(frozen=True)
class QwenVLConfig(_Backbone):
    """Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): text decoder, vision tower, LM head.

    The decoder and the ViT are the thinker's (the ViT's fused ``attn.qkv`` is a converter
    matter); what differs is the absent audio tower and the M-RoPE rule: a video's temporal
    index advances ``tokens_per_second * second_per_grid`` per grid, where the Omni thinker
    uses 25 per second. The default 2 is the released 7B/3B value; a config.json without the
    field gets transformers' dataclass default (4), as transformers would.
    """
    family: ClassVar[str] = "qwen2_5_vl"
    audio: ClassVar[None] = None          # no audio tower, no audio placeholders
    audio_token_id: ClassVar[None] = None

    text: TextConfig = TextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    tokens_per_second: float = 2
    precision: Precision = Precision()

    @classmethod
    def from_hf_dict(cls, d: dict, *, precision: Precision = Precision()) -> "QwenVLConfig":
        """transformers 5 writes the text fields under ``text_config``; 4.x configs (the released
        checkpoints) keep them at the top level, with ``rope_scaling`` and ``rope_theta`` there."""
        if d.get("model_type") != "qwen2_5_vl":
            raise ValueError(f"not a Qwen2.5-VL config: model_type={d.get('model_type')!r} (want 'qwen2_5_vl')")
        if "vision_config" not in d:
            raise ValueError("Qwen2.5-VL config has no 'vision_config'")
        t, v = d.get("text_config") or d, d["vision_config"]
        text = _text_from_hf(t, tie=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
                             eps=1e-5, outer=d)
        return cls(
            text=text, vision=_vision_from_hf(v, t["hidden_size"]),
            image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
            vision_start_token_id=d.get("vision_start_token_id", 151652),
            vision_end_token_id=d.get("vision_end_token_id", 151653),
            tokens_per_second=v.get("tokens_per_second", 4),
            precision=precision,
        )


# The backbones one embedder runs on; host code branches on ``cfg.family`` where their rules differ.
BackboneConfig = ThinkerConfig | QwenVLConfig


def read_hf_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise FileNotFoundError(f"no config.json at {cfg_file}")
    return json.loads(cfg_file.read_text())


def backbone_config(d: dict, *, precision: Precision = Precision()) -> BackboneConfig:
    """The backbone config of a Hugging Face config dict: Qwen2.5-VL by ``model_type``, else the Omni thinker."""
    cls = QwenVLConfig if d.get("model_type") == "qwen2_5_vl" else ThinkerConfig
    return cls.from_hf_dict(d, precision=precision)


def _text_from_hf(t: Mapping, *, tie: bool, eps: float, outer: Mapping | None = None) -> TextConfig:
    """The decoder fields; ``eps`` is the family's transformers default for ``rms_norm_eps``.
    ``outer`` is also searched for 4.x's top-level ``rope_scaling``/``rope_theta``."""
    outer = outer or {}
    rope = t.get("rope_parameters") or t.get("rope_scaling") or outer.get("rope_scaling") or {}
    if t.get("use_sliding_window"):
        raise ValueError("text_config.use_sliding_window=True is not supported (Qwen2.5 uses full attention)")
    return TextConfig(
        vocab_size=t["vocab_size"], hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"], num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=t["num_attention_heads"],
        num_key_value_heads=t.get("num_key_value_heads") or t["num_attention_heads"],
        head_dim=t.get("head_dim"), hidden_act=t.get("hidden_act", "silu"),
        rms_norm_eps=t.get("rms_norm_eps", eps),
        rope_theta=float(rope.get("rope_theta", t.get("rope_theta", outer.get("rope_theta", 1e6)))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=tie,
    )


def _vision_from_hf(v: Mapping, text_hidden: int) -> VisionConfig:
    vrope = v.get("rope_parameters") or {}
    return VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], hidden_act=v.get("hidden_act", "silu"),
        intermediate_size=v["intermediate_size"], num_heads=v["num_heads"],
        in_channels=v.get("in_channels", v.get("in_chans", 3)), patch_size=v.get("patch_size", 14),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        temporal_patch_size=v.get("temporal_patch_size", 2), window_size=v.get("window_size", 112),
        out_hidden_size=v.get("out_hidden_size", text_hidden),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        rope_theta=float(vrope.get("rope_theta", 10000.0)),
    )


THINKER_SIZES = ("7b", "3b")


def thinker_of_size(size: str, *, precision: Precision = Precision()) -> ThinkerConfig:
    """The published shapes of a Qwen2.5-Omni thinker, for random init without a checkpoint.

    "7b": the dataclass defaults (WAVE-7B's base). "3b": Omni-Embed-Nemotron-3B's base, text
    hidden 2048, 36 layers, 16 heads / 2 KV heads, intermediate 11008, vocab 151936 (spec
    architecture.md section 1); the ViT and the Whisper tower keep the 7B widths and project to
    2048 (as a Qwen2.5-Omni-3B thinker config.json has them).
    """
    if size not in THINKER_SIZES:
        raise ValueError(f"thinker size {size!r}: expected one of {THINKER_SIZES}")
    cfg = ThinkerConfig(precision=precision)
    if size == "3b":
        cfg = cfg.replace(
            text=dataclasses.replace(cfg.text, vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                     num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2),
            vision=dataclasses.replace(cfg.vision, out_hidden_size=2048),
            audio=dataclasses.replace(cfg.audio, output_dim=2048))
    return cfg


def qwen_vl_of_size(size: str, *, precision: Precision = Precision()) -> QwenVLConfig:
    """The published shapes of Qwen2.5-VL-7B / -3B-Instruct (GVE-7B / GVE-3B's bases), for random
    init without a checkpoint.

    "7b": the dataclass defaults (text 3584 wide, 28 layers, 28 / 4 heads, vocab 152064, untied).
    "3b": text 2048 wide, 36 layers, 16 / 2 heads, intermediate 11008, vocab 151936, tied head.
    Both keep the 32-block 1280-wide ViT (projecting to the text width) and tokens_per_second 2,
    as the released config.json files have them.
    """
    if size not in THINKER_SIZES:
        raise ValueError(f"Qwen2.5-VL size {size!r}: expected one of {THINKER_SIZES}")
    cfg = QwenVLConfig(precision=precision)
    if size == "3b":
        cfg = cfg.replace(
            text=dataclasses.replace(cfg.text, vocab_size=151936, hidden_size=2048, intermediate_size=11008,
                                     num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                                     tie_word_embeddings=True),
            vision=dataclasses.replace(cfg.vision, out_hidden_size=2048))
    return cfg


@dataclasses.dataclass(frozen=True)
class BEATsConfig:
    """Field names follow the unilm ``BEATsConfig``; defaults are BEATs iter3+."""

    input_patch_size: int = 16
    embed_dim: int = 512
    conv_bias: bool = False
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: str = "gelu"
    layer_norm_first: bool = False
    deep_norm: bool = True
    conv_pos: int = 128
    conv_pos_groups: int = 16
    relative_position_embedding: bool = True
    num_buckets: int = 320
    max_distance: int = 800
    gru_rel_pos: bool = True
    finetuned_model: bool = False
    predictor_class: int = 527

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"BEATsConfig: {msg}")

        for name in ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim",
                     "encoder_ffn_embed_dim", "encoder_attention_heads", "conv_pos", "conv_pos_groups"):
            need(int(getattr(self, name)) > 0, f"{name} must be positive, got {getattr(self, name)!r}")
        need(not self.layer_norm_first,
             "layer_norm_first=True (pre-LN BEATs) is not supported; iter3+ is post-LN")
        need(self.activation_fn in ("gelu", "relu"),
             f"activation_fn={self.activation_fn!r} is not supported (gelu, relu)")
        need(self.encoder_embed_dim % self.encoder_attention_heads == 0,
             f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
             f"encoder_attention_heads={self.encoder_attention_heads}")
        need(self.encoder_embed_dim % self.conv_pos_groups == 0,
             f"encoder_embed_dim={self.encoder_embed_dim} is not divisible by "
             f"conv_pos_groups={self.conv_pos_groups}")
        if self.relative_position_embedding:
            half = self.num_buckets // 2
            need(half >= 2 and self.max_distance > half // 2,
                 f"num_buckets={self.num_buckets} / max_distance={self.max_distance} give an empty "
                 "log-spaced bucket range")
        need(not self.gru_rel_pos or self.relative_position_embedding,
             "gru_rel_pos=True needs relative_position_embedding=True")

    @property
    def head_dim(self) -> int:
        return self.encoder_embed_dim // self.encoder_attention_heads

    @property
    def deep_norm_alpha(self) -> float:
        return math.pow(2 * self.encoder_layers, 0.25) if self.deep_norm else 1.0

    @classmethod
    def from_unilm_dict(cls, cfg: Mapping[str, Any]) -> "BEATsConfig":
        """Build from the ``cfg`` entry of a unilm checkpoint.

        Every architecture key must be present (unilm's own defaults differ from
        iter3+, so a silent default would change the model); dropout and
        gradient-decay keys are accepted and ignored; anything else is an error.
        """
        if not isinstance(cfg, Mapping):
            raise ValueError(f"BEATs cfg must be a dict, got {type(cfg).__name__}")
        optional = {"predictor_class"}
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - fields - _TRAINING_ONLY_KEYS)
        if unknown:
            raise ValueError(f"unknown BEATs cfg keys {unknown}")
        missing = sorted(fields - optional - set(cfg))
        if missing:
            raise ValueError(f"BEATs cfg lacks keys {missing}")
        return cls(**{k: v for k, v in cfg.items() if k in fields})


# unilm cfg entries that only matter for training.
_TRAINING_ONLY_KEYS = frozenset({
    "dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
    "layer_wise_gradient_decay_ratio", "predictor_dropout",
})


# ----------------------------------------------------------------------------- embedding paths

# The seven inputs OmniRetriever embeds: text, video, audio and their mixes.
PATHS = ("T", "V", "A", "AV", "TV", "TA", "TVA")
# GVE's image inputs: an image alone (I) and the composed query text + image (TI).
IMAGE_PATHS = ("I", "TI")
EMBED_PATHS = PATHS + IMAGE_PATHS   # every path the embedder lays out


def check_paths(paths: Sequence[str]) -> tuple[str, ...]:
    bad = [p for p in paths if p not in EMBED_PATHS]
    if bad or not paths:
        raise ValueError(f"unknown embedding path(s) {bad or list(paths)}; valid: {', '.join(EMBED_PATHS)}")
    return tuple(dict.fromkeys(paths))


MEDIA_KINDS = ("image", "video", "audio")

# How a path's sequence becomes one vector (EmbedConfig.pooling):
#   "fusion": WAVE. The last token of every layer through the all-layer fusion head on the media
#             paths; the text path takes the last token's final-norm state (or the head too, with
#             text_fusion_head).
#   "last":   the last real token's final-norm state on every path.
#   "mean":   Omni-Embed-Nemotron. The mean of the final-norm states over the sequence's real tokens.
POOLINGS = ("fusion", "last", "mean")
# The audio branch (EmbedConfig.audio_branch): Whisper alone, or Whisper + BEATs interleaved into
# two placeholders per Whisper token (WAVE).
AUDIO_BRANCHES = ("whisper", "whisper_beats")


@dataclasses.dataclass(frozen=True)
class EmbedConfig:
    """How the embedding paths are laid out and pooled.

    Every path is one turn: ``turn_start``, the content, ``turn_end``. The content is the media
    blocks (an image, or a video then audio) and the text: the path's prefix (``query_prefix`` on
    the text path, ``passage_prefix`` on every path with media) followed by the caption, or on
    V / I / A / AV by their fixed prompt; the text comes after the media, or before it with
    ``text_first``. Template strings may hold ``<|im_start|>`` / ``<|im_end|>`` /
    ``<|endoftext|>``, which become their special tokens (``data.tokens.Tokens.encode_text``).
    The defaults are WAVE's layout (architecture.md section 3: ``[media][PROMPT]<|im_end|>``, the
    text path ``caption<|im_end|>``); ``configs/common.nemotron`` sets Omni-Embed-Nemotron's and
    ``configs/common.gve`` GVE's. ``media_kinds`` / ``max_frames`` are the host's
    ``MediaPolicy``: an item of another kind, or a longer video, is an error before jit.

    Row lengths follow from the media shapes, the fixed tokens of the template and ``text_len``
    (``data.batch.path_length``). ``pack`` lists passes whose sequences are short next to their
    padded length as (path, sequences per row[, row length]): e.g. ("T", 2, 128) puts two
    captions in each row of 128 tokens, half the rows; a batch whose sequences do not fit runs
    that pass unpacked (a second program). The row length defaults to per_row times the path's
    length: never overflows, saves nothing, exercises the layout."""
    text_len: int = 64            # caption budget + 1: captions get text_len - 1 tokens (WAVE's text rows: text_len)
    length_multiple: int = 8      # every path's row length is rounded up to this
    pack: tuple[tuple, ...] = ()
    video_prompt: str = "Please describe the video."
    image_prompt: str = "Please describe the image."
    audio_prompt: str = "Please describe the audio."
    av_prompt: str = "Please describe the video and the audio."
    turn_start: str = ""
    turn_end: str = "<|im_end|>"
    text_first: bool = False
    query_prefix: str = ""
    passage_prefix: str = ""
    pooling: str = "fusion"
    audio_branch: str = "whisper_beats"
    text_fusion_head: bool = False
    audio_in_video: bool = False  # interleave a clip's audio into its video block (processor's use_audio_in_video)
    media_kinds: tuple[str, ...] = MEDIA_KINDS  # the media a layout accepts (MediaPolicy.kinds)
    max_frames: int | None = None               # most frames a video may have (MediaPolicy.max_frames)

    def __post_init__(self):
        pack = tuple((str(e[0]), *map(int, e[1:])) for e in self.pack)  # lists from configs are unhashable
        bad = [e for e in pack if e[0] not in EMBED_PATHS or len(e) not in (2, 3) or min(e[1:]) < 1]
        if bad or len({e[0] for e in pack}) != len(pack):
            raise ValueError(f"EmbedConfig.pack={self.pack!r}: entries must be (path in {EMBED_PATHS}, per_row >= 1"
                             f"[, row_len >= 1]), one per path; bad: {bad or pack}")
        if self.text_len < 2 or self.length_multiple < 1:
            raise ValueError(f"EmbedConfig: text_len={self.text_len} must be >= 2 and "
                             f"length_multiple={self.length_multiple} >= 1")
        if self.pooling not in POOLINGS:
            raise ValueError(f"EmbedConfig.pooling={self.pooling!r}: expected one of {POOLINGS}")
        if self.audio_branch not in AUDIO_BRANCHES:
            raise ValueError(f"EmbedConfig.audio_branch={self.audio_branch!r}: expected one of {AUDIO_BRANCHES}")
        if self.text_fusion_head and self.pooling != "fusion":
            raise ValueError(f"EmbedConfig.text_fusion_head=True sends the text path through WAVE's fusion head, "
                             f"but pooling={self.pooling!r} uses no head (set pooling='fusion' or drop it)")
        object.__setattr__(self, "pack", pack)
        object.__setattr__(self, "media_kinds", tuple(self.media_kinds))
        try:
            self.policy
        except ValueError as e:
            raise ValueError(str(e).replace("MediaPolicy.kinds", "EmbedConfig.media_kinds")
                             .replace("MediaPolicy.max_frames", "EmbedConfig.max_frames")) from None

    @property
    def policy(self) -> "MediaPolicy":
        return MediaPolicy(self.media_kinds, self.max_frames)

    @property
    def doubled_audio(self) -> bool:
        """Two audio placeholders per Whisper token (Whisper and BEATs features interleaved)."""
        return self.audio_branch == "whisper_beats"

    def packing(self, path: str) -> tuple[int, int | None]:
        """(sequences per row, row length or None for the default) of ``path``; (1, None) = unpacked."""
        entry = next((e for e in self.pack if e[0] == path), (path, 1))
        return entry[1], (entry[2] if len(entry) == 3 else None)


@dataclasses.dataclass(frozen=True)
class MediaPolicy:
    """Which media items a host layout accepts, and at most how many frames a video may have.

    A video's frame count is ``grid_t * temporal_patch_size`` (the processor pads an odd count
    by repeating the last frame). GVE's video path, for one, takes at most 8 frames of video
    and no image; anything else is a data error reported on the host, before jit.
    """
    kinds: tuple[str, ...] = ("image", "video", "audio")
    max_frames: int | None = None

    def __post_init__(self):
        bad = [k for k in self.kinds if k not in MEDIA_KINDS]
        if bad or isinstance(self.kinds, str):
            raise ValueError(f"MediaPolicy.kinds={self.kinds!r}: expected a tuple drawn from {MEDIA_KINDS}")
        if self.max_frames is not None and not (isinstance(self.max_frames, int) and self.max_frames > 0):
            raise ValueError(f"MediaPolicy.max_frames must be a positive int or None, got {self.max_frames!r}")



@dataclasses.dataclass(frozen=True)
class ViewPlan:
    """Which embeddings a train step computes: paths of the anchor view, paths of the augmented
    view, whether the hard-negative tuple (a TVA pass) is needed, and paths of the records'
    reference clips (``query``: a text + video query) (``losses.needed_views``)."""
    anchor: tuple[str, ...]
    aug: tuple[str, ...] = ()
    negative: bool = False
    query: tuple[str, ...] = ()
