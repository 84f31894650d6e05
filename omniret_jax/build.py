"""The one model factory: a config -> the model, its tokenizer and its state placed on a mesh.

Train, eval, bench, the notebooks and the tests all build models here:

- ``load_config("configs/tiny.py:distill", {"train.steps": 5})``: a config file as the CLIs read it;
- ``build_model(c)``: the backbone of ``model.backbone``, "wave" (thinker + BEATs + fusion head and
  BEATs adaptor), "nemotron" (the plain thinker: bidirectional by ``model.causal``, no BEATs, no
  heads) or "gve" (Qwen2.5-VL: no audio tower, no heads), from random init (``model.init =
  "random"``: the widths of ``model.tiny``, or the real shapes of ``model.size`` when the config
  has no ``model.tiny``) or from a checkpoint (WAVE / Qwen2.5-Omni / Omni-Embed-Nemotron /
  Qwen2.5-VL or GVE); ``check_backbone(c)`` rejects a WAVE-only option on the
  other backbone before anything is built;
- ``build_state(c, mesh)``: that model with fresh LoRA, split into trainable and frozen state,
  each in its dtype of the precision policy and placed in its sharding. Random weights are
  created inside one jit with the shardings as outputs and checkpoint tensors are placed as
  they are read, so no device ever holds an unsharded float32 copy;
- ``restore_trained(c, workdir, mesh=mesh)``: ``build_state`` plus the trainables of a training
  checkpoint, restored straight into their shardings.

The ``c.*`` sections are read here and nowhere else: ``precision``, ``lora_config``,
``loss_config`` and ``embed_config`` turn them into the typed configs the layers below take.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from omniret_jax import sharding
from omniret_jax.checkpoint import CheckpointError, TrainCheckpointer
from omniret_jax.config import (AudioConfig, BackboneConfig, BEATsConfig, EmbedConfig, Precision, QwenVLConfig,
                                TextConfig, ThinkerConfig, VisionConfig, backbone_config, qwen_vl_of_size,
                                read_hf_config, thinker_of_size)
from omniret_jax.data.tokens import TINY_IDS, Tokens, byte_tokens
from omniret_jax.losses import LossConfig
from omniret_jax.model.embedder import check_backbone as check_embedder
from omniret_jax.model.lora import DEFAULT_TARGET, DEFAULT_TRAINABLE_EXTRA, LoRAConfig, apply_lora, trainable_filter
from omniret_jax.model.text import scan_layers, unscan_layers
from omniret_jax.model.thinker import Thinker
from omniret_jax.model.wave import WAVE
from omniret_jax.step import make_optimizer

# The real shapes' tokenizer stand-in (no download): byte tokens under the real special ids.
QWEN_IM_END, QWEN_PAD, QWEN_IM_START, QWEN_ENDOFTEXT = 151645, 151643, 151644, 151643
# model.backbone -> the model class: WAVE, or the plain backbone (Omni-Embed-Nemotron's thinker,
# GVE's Qwen2.5-VL).
BACKBONES = {"wave": WAVE, "nemotron": Thinker, "gve": Thinker}
# ``model.tokenizer`` value (and config.json entry of an exported random-init base) for the stand-in.
BYTE_TOKENIZER, TOKENIZER_KEY = "bytes", "omniret_tokenizer"


# ----------------------------------------------------------------------------- configs

def define_config_flag() -> None:
    """``--config`` (a configs/*.py file, optionally ``:preset``) with ``--config.<key>=<value>`` overrides."""
    from absl import flags
    from ml_collections import config_flags

    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "a configs/*.py file (optionally :preset)")


def load_config(spec: str | Path, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """``path/to/config.py[:arg]`` -> its ``get_config(arg)``, with dotted ``overrides`` applied
    (``{"train.steps": 5}``), as ``--config`` and ``--config.<key>=<value>`` do on the command line."""
    path, _, arg = str(spec).partition(":")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    root = str(path.resolve().parents[1])  # configs import `configs.common`
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location(f"_omniret_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    c = module.get_config(arg) if arg else module.get_config()
    for key, value in (overrides or {}).items():
        node, *parts = key.split(".")
        target = c
        for name in [node, *parts][:-1]:
            if name not in target:
                raise KeyError(f"config override {key!r}: no section {name!r} in {path}")
            target = target[name]
        leaf = key.split(".")[-1]
        if leaf not in target:
            raise KeyError(f"config override {key!r}: {path} has no key {leaf!r} there")
        target[leaf] = value
    return c


def precision(c) -> Precision:
    p = c.model.precision
    return Precision.from_names(compute=p.compute, trainable=p.trainable, frozen=p.frozen)


def lora_config(c) -> LoRAConfig:
    """``c.lora``; an empty (or absent, in older saved configs) ``target`` is the default q/k/v."""
    return LoRAConfig(rank=c.lora.rank, alpha=c.lora.alpha, dropout=c.lora.dropout,
                      target=c.lora.get("target") or DEFAULT_TARGET,
                      trainable_extra=tuple(c.lora.get("trainable_extra", DEFAULT_TRAINABLE_EXTRA)))


def loss_config(c) -> LossConfig:
    return LossConfig.from_preset(
        c.loss.preset, recipe=c.loss.recipe, l_A=c.loss.l_A, l_D=c.loss.l_D, l_T=c.loss.l_T,
        temperature=c.loss.temperature, tuple_similarity=c.loss.tuple_similarity,
        hard_negative_pool=c.loss.hard_negative_pool or None, rotation=c.loss.get("rotation") or None,
        pairs=c.loss.get("pairs") or None)


def embed_config(c) -> EmbedConfig:
    return EmbedConfig(**c.embed.to_dict())


def backbone(c) -> str:
    """``model.backbone`` ("wave" unless set), checked."""
    name = c.model.get("backbone", "wave")
    if name not in BACKBONES:
        raise ValueError(f"config.model.backbone={name!r}: expected one of {sorted(BACKBONES)}")
    return name


def check_backbone(c) -> None:
    """Start-up validation of the backbone against the embedding and model options: a WAVE-only
    option (fusion head, BEATs branch, BEATs weights, head init) on a backbone without those
    modules, or more frames per clip than the embedding accepts, is a ValueError naming the option."""
    name = backbone(c)
    try:
        check_embedder(BACKBONES[name], embed_config(c))
    except ValueError as e:
        raise ValueError(f"config.model.backbone={name!r}: {str(e).replace('EmbedConfig.', 'config.embed.')}") from None
    max_frames = c.embed.get("max_frames")
    if max_frames is not None and "data" in c and c.data.num_frames > max_frames:
        raise ValueError(f"config.data.num_frames={c.data.num_frames} is above config.embed.max_frames={max_frames}: "
                         "every clip would be refused")
    if name != "wave":
        set_wave = [k for k in ("beats_checkpoint", "init_missing_heads") if c.model.get(k)]
        if set_wave:
            raise ValueError(f"config.model.backbone={name!r} has no BEATs branch and no WAVE heads, but "
                             + ", ".join(f"config.model.{k}={c.model[k]!r}" for k in set_wave) + " is set")


def with_attention(cfg: BackboneConfig, c) -> BackboneConfig:
    """The LLM's attention from the config: its kernel ``model.attention`` and its mask
    ``model.causal`` (False: bidirectional, padding-only). Kernels: xla (jax.nn), cudnn (GPU
    flash attention, bf16), blocked (``model.attention``: no fused kernel needed), auto (blocked
    on CPU, where XLA has no fused attention; xla elsewhere). The vision tower's window and
    frame attention takes the blocked kernel with the LLM's, else jax.nn with segment masks."""
    impl = c.model.get("attention", "auto") or "auto"
    if impl not in ("auto", "xla", "cudnn", "blocked"):
        raise ValueError(f"config.model.attention={impl!r}: expected 'auto', 'xla', 'cudnn' or 'blocked'")
    if impl == "auto":
        impl = "blocked" if jax.default_backend() == "cpu" else "xla"
    causal = bool(c.model.get("causal", cfg.text.causal))
    return cfg.replace(text=dataclasses.replace(cfg.text, attention_impl=None if impl == "xla" else impl,
                                                causal=causal),
                       vision=dataclasses.replace(cfg.vision, attention_impl="blocked" if impl == "blocked" else None))


def optimizer(c) -> optax.GradientTransformation:
    """``c.optim`` over ``c.train.steps`` updates: the AdamW schedule of ``step.make_optimizer``."""
    o = c.optim
    return make_optimizer(lr=o.lr, total_steps=int(c.train.steps), warmup_ratio=o.warmup_ratio,
                          weight_decay=o.weight_decay, clip_norm=o.clip_norm, accumulate=int(o.accumulate),
                          decay=o.get("decay", "all"))


def _random_configs(c) -> tuple[BackboneConfig, BEATsConfig]:
    """Model configs of a random-init model: ``model.tiny``'s widths, or without it the published
    shapes of ``model.size`` (7b | 3b); Qwen2.5-VL's for the "gve" backbone (``model.tiny`` then
    needs no audio or BEATs widths)."""
    prec = precision(c)
    vl = backbone(c) == "gve"
    if "tiny" not in c.model:
        of_size = qwen_vl_of_size if vl else thinker_of_size
        return with_attention(of_size(c.model.get("size", "7b"), precision=prec), c), BEATsConfig()
    t = c.model.tiny
    text = TextConfig(vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
                      num_key_value_heads=t.num_key_value_heads, mrope_section=tuple(t.mrope_section))
    vision = VisionConfig(depth=t.vision_depth, hidden_size=t.vision_hidden_size,
                          intermediate_size=t.vision_intermediate_size, num_heads=t.vision_num_heads,
                          out_hidden_size=t.hidden_size, fullatt_block_indexes=tuple(t.vision_fullatt_block_indexes))
    if vl:
        ids = {k: v for k, v in TINY_IDS.items() if not k.startswith("audio")}
        return with_attention(QwenVLConfig(text=text, vision=vision, precision=prec, **ids), c), BEATsConfig()
    cfg = ThinkerConfig(
        text=text, vision=vision,
        audio=AudioConfig(encoder_layers=t.audio_layers, d_model=t.audio_d_model, encoder_attention_heads=t.audio_heads,
                          encoder_ffn_dim=t.audio_ffn, output_dim=t.hidden_size),
        precision=prec, **TINY_IDS)
    cfg = with_attention(cfg, c)
    beats = BEATsConfig(encoder_layers=t.beats_layers, encoder_embed_dim=t.beats_dim,
                        encoder_attention_heads=t.beats_heads, encoder_ffn_embed_dim=t.beats_ffn,
                        embed_dim=t.beats_patch_dim, conv_pos=t.beats_conv_pos,
                        conv_pos_groups=t.beats_conv_pos_groups, num_buckets=t.beats_buckets,
                        max_distance=t.beats_max_distance)
    return cfg, beats


def byte_tokenizer(vocab_size: int) -> Tokens:
    """The stand-in tokenizer of random-init models: UTF-8 bytes + 1 under the tiny model's
    special ids, or under Qwen's for a Qwen-sized vocabulary."""
    if vocab_size > QWEN_IM_END:
        return byte_tokens(QWEN_IM_END, QWEN_PAD, QWEN_IM_START, QWEN_ENDOFTEXT)
    return byte_tokens()


def _marked_bytes(checkpoint: str) -> bool:
    """A checkpoint exported from a random-init run says so in its config.json (it has no tokenizer)."""
    f = Path(checkpoint) / "config.json"
    return f.is_file() and json.loads(f.read_text()).get(TOKENIZER_KEY) == BYTE_TOKENIZER


def tokenizer_spec(c) -> str:
    """``"bytes"`` (the byte stand-in) or the tokenizer directory the config's model uses: random
    init: bytes; a checkpoint: ``model.tokenizer``, else the checkpoint's own tokenizer, or the
    byte stand-in its config.json names."""
    if c.model.init == "random":
        return BYTE_TOKENIZER
    if c.model.tokenizer:
        return c.model.tokenizer
    return BYTE_TOKENIZER if _marked_bytes(c.model.checkpoint) else c.model.checkpoint


def tokens_for(c) -> Tokens:
    spec = tokenizer_spec(c)
    if spec != BYTE_TOKENIZER:
        return Tokens.from_pretrained(spec)
    cfg = _random_configs(c)[0] if c.model.init == "random" else backbone_config(read_hf_config(c.model.checkpoint))
    return byte_tokenizer(cfg.text.vocab_size)


# ----------------------------------------------------------------------------- models

def _check_init(c) -> None:
    if c.model.init not in ("random", "checkpoint"):
        raise ValueError(f"config.model.init={c.model.init!r}: expected 'checkpoint' or 'random'")
    if c.model.init == "checkpoint" and not c.model.checkpoint:
        raise ValueError("config.model.checkpoint is empty: point it at a WAVE-7B, Qwen2.5-Omni, "
                         "Omni-Embed-Nemotron, Qwen2.5-VL or GVE directory")
    check_backbone(c)


def random_model(c) -> Thinker:
    """The config's random-init backbone (parameters in the precision policy's dtypes)."""
    check_backbone(c)
    cfg, beats = _random_configs(c)
    rngs = nnx.Rngs(params=c.model.seed)
    if backbone(c) == "wave":
        return WAVE(cfg, beats, rngs=rngs, remat=c.model.remat)
    return Thinker(cfg, rngs=rngs, remat=c.model.remat)


def build_model(c, *, mesh: Mesh | None = None) -> tuple[Thinker, Tokens]:
    """The config's model without adapters (random init, or loaded into ``mesh``'s shardings)."""
    _check_init(c)
    if c.model.init == "random":
        return random_model(c), tokens_for(c)
    from omniret_jax.convert.to_flax import load_backbone, load_thinker, load_wave

    configure = lambda cfg: with_attention(cfg, c)  # noqa: E731
    if backbone(c) == "wave":
        model, _ = load_wave(c.model.checkpoint, beats_checkpoint=c.model.beats_checkpoint or None,
                             precision=precision(c), init_missing_heads=c.model.init_missing_heads,
                             seed=c.model.seed, mesh=mesh, remat=c.model.remat, configure=configure)
    else:
        load = load_thinker
        if backbone(c) == "gve":
            model_type = read_hf_config(c.model.checkpoint).get("model_type")
            if model_type != "qwen2_5_vl":
                raise ValueError(f"config.model.backbone='gve' runs on Qwen2.5-VL, but {c.model.checkpoint} has "
                                 f"model_type {model_type!r} (want 'qwen2_5_vl')")
            load = load_backbone
        model, _ = load(c.model.checkpoint, precision=precision(c), mesh=mesh, remat=c.model.remat,
                        configure=configure)
    return model, tokens_for(c)


def attach_lora(model: nnx.Module, c, *, train: bool, free: bool = False) -> nnx.Module:
    """Fresh adapters from the config (seeded like every run of it); dropout on in train mode.
    With ``model.scan_layers`` the decoder layers are then stacked for a scan (``free``: the
    per-layer arrays are deleted as they are stacked; the model must not share them)."""
    apply_lora(model, lora_config(c), nnx.Rngs(params=c.model.seed + 1, dropout=c.model.seed + 2),
               dtype=precision(c).trainable)
    model.train() if train else model.eval()
    if c.model.get("scan_layers", False):
        scan_layers(model, free=free)
    return model


def check_layer_layout(saved: Mapping[str, Any], c, where: str) -> None:
    """A checkpoint's trainables are stacked with ``model.scan_layers`` and per layer without:
    name the key rather than fail on the first leaf that differs."""
    was, now = bool(saved.get("model", {}).get("scan_layers", False)), bool(c.model.get("scan_layers", False))
    if was != now:
        raise ValueError(f"{where} was trained with model.scan_layers={was} and this config has {now}: its "
                         f"adapters are stored {'stacked' if was else 'per layer'}; set "
                         f"--config.model.scan_layers={was} to restore it")


@dataclasses.dataclass
class ModelState:
    """A model split once for jit: ``trainable`` (LoRA, plus WAVE's heads on that backbone) and
    ``frozen`` (everything else, RNG state included), each placed in its sharding."""
    graphdef: Any
    trainable: Any
    frozen: Any
    cfg: BackboneConfig
    tokens: Tokens
    lora: LoRAConfig

    @property
    def trainable_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.trainable)

    @property
    def frozen_shardings(self):
        return jax.tree.map(lambda x: x.sharding, self.frozen)

    def model(self) -> nnx.Module:
        """The merged model with its per-layer tree (scanned layers unstacked: exports, PEFT)."""
        return unscan_layers(nnx.merge(self.graphdef, self.trainable, self.frozen))


def _cast(tree, dtype):
    def one(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)
    return jax.tree.map(one, tree)


def split_state(model: nnx.Module, lora: LoRAConfig, prec: Precision):
    """(graphdef, trainable, frozen) with each float leaf in its dtype of the policy."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(lora), ...)
    return graphdef, _cast(trainable, prec.trainable), _cast(frozen, prec.frozen)


def place(model: nnx.Module, c, mesh: Mesh, *, tokens: Tokens, verbose: bool = False) -> ModelState:
    """Split ``model`` (adapters attached) by the trainable filter, cast by the policy, shard."""
    lora, prec = lora_config(c), precision(c)
    graphdef, trainable, frozen = split_state(model, lora, prec)
    if verbose:
        for fb in sharding.sharding_fallbacks(trainable, mesh) + sharding.sharding_fallbacks(frozen, mesh):
            print(f"sharding: {fb}")
    trainable, frozen = sharding.shard_state(trainable, mesh), sharding.shard_state(frozen, mesh)
    return ModelState(graphdef, trainable, frozen, model.cfg, tokens, lora)


def _random_split(c, *, train: bool):
    lora, prec = lora_config(c), precision(c)
    return lambda: split_state(attach_lora(random_model(c), c, train=train), lora, prec)


def abstract_state(c, *, train: bool = True) -> tuple[Any, Any, Any, BackboneConfig]:
    """(graphdef, trainable, frozen, model config) of the config's random-init model with LoRA,
    as ShapeDtypeStructs: shapes, dtypes and shardings without allocating a weight."""
    graphdef, trainable, frozen = nnx.eval_shape(_random_split(c, train=train))
    return graphdef, trainable, frozen, _random_configs(c)[0]


@functools.lru_cache(maxsize=4)
def _random_init(key: str, train: bool, mesh: Mesh):
    """(graphdef, abstract trainable, abstract frozen, jitted init) of a random-init model; cached
    by the config's model, lora and embed sections (the backbone check reads the embedding), so a process that builds the same model again
    (export, then restore; tests) compiles its initialisation once."""
    c = ml_collections.ConfigDict(json.loads(key))
    make = _random_split(c, train=train)
    graphdef, abstract_trainable, abstract_frozen = nnx.eval_shape(make)
    shardings = (sharding.state_shardings(abstract_trainable, mesh), sharding.state_shardings(abstract_frozen, mesh))
    return graphdef, abstract_trainable, abstract_frozen, jax.jit(lambda: make()[1:], out_shardings=shardings)


def build_state(c, mesh: Mesh, *, train: bool = True, verbose: bool = False) -> ModelState:
    """The config's model with fresh LoRA, split and placed on ``mesh`` (see the module docstring)."""
    _check_init(c)
    if c.model.init == "checkpoint":
        model, tokens = build_model(c, mesh=mesh)
        return place(attach_lora(model, c, train=train, free=True), c, mesh, tokens=tokens, verbose=verbose)
    check_backbone(c)  # with the whole config (the cache key below holds only what builds the model)
    key = json.dumps({k: c[k].to_dict() for k in ("model", "lora", "embed")}, sort_keys=True, default=list)
    graphdef, abstract_trainable, abstract_frozen, init = _random_init(key, train, mesh)
    if verbose:
        for fb in (sharding.sharding_fallbacks(abstract_trainable, mesh)
                   + sharding.sharding_fallbacks(abstract_frozen, mesh)):
            print(f"sharding: {fb}")
    trainable, frozen = init()
    cfg, _ = _random_configs(c)
    return ModelState(graphdef, trainable, frozen, cfg, tokens_for(c), lora_config(c))


def restore_trainables(state: ModelState, c, checkpoint_dir: str | Path, step: int | None = None) -> int:
    """Replace ``state.trainable`` by the trainables (adapters + heads) of a training checkpoint
    directory (``<workdir>/checkpoints``), restored straight into their shardings; ``step`` None
    takes the newest. Returns the restored step."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    ckpt = TrainCheckpointer(checkpoint_dir, keep=c.train.keep, save_every=c.train.ckpt_every)
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoint step in {checkpoint_dir}")
        check_layer_layout(ckpt.read_meta(step)["config"], c, f"checkpoint {checkpoint_dir}")
        restored = ckpt.restore(steps[-1] if step is None else step, state.trainable)
    finally:
        ckpt.close()
    state.trainable = restored.trainables
    saved, given = restored.config, json.loads(json.dumps(c.to_dict()))
    drift = [f"{section}.{k}" for section in ("model", "lora") for k in sorted(given.get(section, {}))
             if k in saved.get(section, {}) and saved[section][k] != given[section][k]]
    if drift:
        logging.warning("config differs from the one step %d was trained with: %s", restored.step,
                        ", ".join(drift))
    return restored.step


def restore_trained(c, checkpoint_dir: str | Path, mesh: Mesh, step: int | None = None) -> tuple[ModelState, int]:
    """The config's model in eval mode with the trainables of a training checkpoint (see
    ``restore_trainables``). Frozen weights come from the config: the checkpoint holds only what
    training changed. Returns (state, restored step)."""
    if not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    state = build_state(c, mesh, train=False)
    return state, restore_trainables(state, c, checkpoint_dir, step)


def saved_config(checkpoint_dir: str | Path, step: int | None = None) -> tuple[ml_collections.ConfigDict, int]:
    """(the config a training checkpoint step was saved with, that step); ``step`` None: the newest."""
    if not Path(checkpoint_dir).is_dir():
        raise FileNotFoundError(f"checkpoint directory {checkpoint_dir} does not exist")
    with TrainCheckpointer(checkpoint_dir) as ckpt:
        meta = ckpt.read_meta(step)
    return ml_collections.ConfigDict(meta["config"]), meta["step"]
