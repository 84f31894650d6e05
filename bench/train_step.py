"""Time the jitted train step; report examples/s and model FLOPs utilisation (MFU).

The step is built exactly as ``omniret_jax.train`` builds it (LoRA, trainable/frozen split,
mesh shardings, AdamW, donation) and run on one fixed random batch in the pipeline's format;
the time is the median of ``--steps`` runs after ``--warmup`` (the first one compiles).

FLOPs per step (a multiply-add is 2 FLOPs):
  LLM pass over T tokens, N = decoder parameters (no embedding table: a lookup; no LM head:
  logits are never computed), N_lora = adapter parameters, N_head = fusion head parameters:
    with gradient     4 N T + 6 N_lora T + 6 N_head per sequence
                      (2 N forward + 2 N backward through the activations: the base is frozen,
                      so no weight gradients; adapters and head pay forward + both gradients)
    without gradient  2 N T + 2 N_lora T + 2 N_head per sequence
                      (the hard-negative tuple, and the L_D teacher when L_T is off)
    The text path T has no fusion head unless embed.text_fusion_head.
  Towers (frozen, forward only, once per view; the hard negative reuses the anchor's):
    2 x params x positions they run on: vision blocks on patches, its merger on merged tokens;
    Whisper conv1 on mel frames, conv2 + layers on frames / 2, ln_post + proj on frames / 4;
    BEATs on its 16x16 fbank patches. BEATs adaptor (trainable): 6 x params per audio token.
  Passes per step with the full preset (joint tuple similarity): T, V, A, TVA, TVA_aug (with
  gradient) and TVA_neg (without) = 6 LLM passes, 2 tower runs.
  Not counted: attention scores (QK^T, AV: 4 x layers x d x context per token, a few % here),
  norms, softmax, rotary.
Counted twice: on real tokens (attention-mask sums: model FLOPs, the MFU numerator) and on
padded tokens (what the device computes; remat "full" adds another 2 N T per gradient pass).
MFU = model FLOPs per step / step time / (peak FLOP/s per device x devices). Peak: --peak-tflops,
else a table (H100 / H200 bf16 dense 989 TFLOP/s, A100 312), else on CPU the measured rate of a
2048^3 float32 matmul on one device (so CPU "MFU" is relative to what XLA's matmul reaches;
virtual CPU devices share that one host rate).

--size 7b builds the real WAVE-7B shapes (Qwen2.5-Omni-7B thinker + BEATs iter3, frozen weights
bfloat16, trainables float32) with random weights directly on the devices (no download); it
needs ~40 GB of device memory and stops with a message if the weights and optimizer state alone
do not fit. --abstract prints the FLOP and memory accounting without allocating anything.

COMMAND: python bench/train_step.py --size tiny
COMMAND: python bench/train_step.py --size 7b --abstract
COMMAND: python bench/train_step.py --size 7b   (one H100 / H200)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import omniretriever_7b, tiny  # noqa: E402
from omniret_jax import sharding  # noqa: E402
from omniret_jax import train as trainer  # noqa: E402
from omniret_jax.data import features  # noqa: E402
from omniret_jax.data.pipeline import SAMPLE_RATE, PipelineConfig  # noqa: E402
from omniret_jax.model.beats import BEATsConfig  # noqa: E402
from omniret_jax.model.config import ThinkerConfig, dtype_from_name  # noqa: E402
from omniret_jax.model.embedder import Tokens  # noqa: E402
from omniret_jax.model.lora import apply_lora, trainable_filter  # noqa: E402
from omniret_jax.model.wave import WAVE  # noqa: E402
from omniret_jax.step import StepConfig, build_inputs, make_optimizer, train_step  # noqa: E402

GiB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, per device
WORDS = "a the red blue small loud quiet dog cat bird piano river street rain sings runs barks plays".split()


# ----------------------------------------------------------------------------- a random batch

def random_view(rng: np.random.Generator, c, b: int, caption_chars: tuple[int, int] = (12, 60)) -> dict:
    """One view in DataPipeline's batch format for config ``c``; even rows are full-length clips,
    odd rows have half the frames and 3/5 of the audio (zero-padded like the pipeline)."""
    pcfg = PipelineConfig(num_frames=c.data.num_frames, min_pixels=c.data.min_pixels, max_pixels=c.data.max_pixels)
    side = math.isqrt(c.data.max_pixels) // pcfg.patch_size
    t_full = pcfg.num_patches // (side * side)
    samples = int(round(c.data.audio_seconds * SAMPLE_RATE))
    n_mel, t_mel = features.whisper_log_mel(np.zeros(samples, np.float32)).shape
    t_fb, n_fb = features.beats_fbank(np.zeros(samples, np.float32)).shape
    grid = np.array([[t_full if i % 2 == 0 else max(1, t_full // 2), side, side] for i in range(b)], np.int32)
    n_patch = grid.prod(axis=1)
    width = 3 * pcfg.temporal_patch_size * pcfg.patch_size**2
    patches = rng.standard_normal((b, pcfg.num_patches, width)).astype(np.float32)
    patches[np.arange(pcfg.num_patches)[None, :] >= n_patch[:, None]] = 0.0
    mel_len = np.array([t_mel if i % 2 == 0 else t_mel * 3 // 5 for i in range(b)], np.int32)
    win, hop = SAMPLE_RATE * 25 // 1000, SAMPLE_RATE // 100
    fbank_len = np.minimum(t_fb, 1 + (mel_len * hop - win) // hop).astype(np.int32)
    fbank = rng.standard_normal((b, t_fb, n_fb)).astype(np.float32)
    fbank[np.arange(t_fb)[None, :] >= fbank_len[:, None]] = 0.0

    def caption() -> str:
        words = []
        while len(" ".join(words)) < int(rng.integers(*caption_chars)):
            words.append(str(rng.choice(WORDS)))
        return " ".join(words)

    return {
        "caption": [caption() for _ in range(b)],
        "video_patches": patches,
        "video_num_patches": n_patch.astype(np.int32),
        "video_grid_thw": grid,
        "video_second_per_grid": np.full(b, 1.0, np.float32),
        "mel": (0.5 * rng.standard_normal((b, n_mel, t_mel))).astype(np.float32),
        "mel_len": mel_len,
        "fbank": fbank,
        "fbank_len": fbank_len,
    }


def random_batch(c, b: int, seed: int = 0, *, augment: bool = True, caption_chars=(12, 60)) -> dict:
    """A DataPipeline-format batch of random arrays, with the augmented view under ``aug``."""
    rng = np.random.default_rng(seed)
    batch = {"id": [f"clip{i}" for i in range(b)], **random_view(rng, c, b, caption_chars)}
    if augment:
        batch["aug"] = random_view(rng, c, b, caption_chars)
    return batch


# ----------------------------------------------------------------------------- FLOP accounting

def param_groups(model) -> dict[str, int]:
    """Parameter counts of the groups the FLOP formula uses (works on abstract models)."""
    groups = {"llm": 0, "lora": 0, "head": 0, "adaptor": 0, "vision": 0, "merger": 0, "conv1": 0,
              "conv2": 0, "whisper": 0, "whisper_out": 0, "beats": 0, "unused": 0}
    prefixes = [("classify_linear.", "head"), ("beats_ln.", "adaptor"), ("beats_proj.", "adaptor"),
                ("visual.merger.", "merger"), ("visual.", "vision"), ("audio_tower.conv1.", "conv1"),
                ("audio_tower.conv2.", "conv2"), ("audio_tower.layers.", "whisper"),
                ("audio_tower.ln_post.", "whisper_out"), ("audio_tower.proj.", "whisper_out"),
                ("beats.", "beats"), ("language_model.layers.", "llm"), ("language_model.norm.", "llm")]
    for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        n = math.prod(v.shape)
        if ".lora_a" in name or ".lora_b" in name:
            groups["lora"] += n
            continue
        groups[next((g for p, g in prefixes if name.startswith(p)), "unused")] += n
    return groups


def grad_passes(lcfg) -> set[str]:
    """LLM passes whose embedding reaches the loss with gradient (the rest run forward only)."""
    g = set()
    if {"L_A", "L_D"} & set(lcfg.terms):
        g |= {"T", "V", "A"}
    if "L_T" in lcfg.terms:
        g |= {"TVA", "TVA_aug"} if lcfg.tuple_similarity == "joint" else {"T", "V", "A", "T_aug", "V_aug", "A_aug"}
    return g


def step_flops(groups: dict[str, int], host, batch: dict, lcfg, ecfg) -> dict:
    """Model FLOPs of one step on real and on padded tokens, plus the pass table."""
    passes = {p: pi for p, pi in host.anchor.paths.items()}
    if host.aug is not None:
        passes.update({p + "_aug": pi for p, pi in host.aug.paths.items()})
    if host.neg is not None:
        passes["TVA_neg"] = host.neg
    with_grad = grad_passes(lcfg)
    table, real, padded = [], 0.0, 0.0
    for name, p in passes.items():
        mask = np.asarray(p.attention_mask)
        b = mask.shape[0]
        t_real, t_pad = int(mask.sum()), int(mask.size)
        grad = name in with_grad
        k = 6 if grad else 2
        head = b * (k * groups["head"] if name.split("_")[0] != "T" or ecfg.text_fusion_head else 0)
        per_token = (4 if grad else 2) * groups["llm"] + k * groups["lora"]
        real += per_token * t_real + head
        padded += per_token * t_pad + head
        table.append(dict(path=name, grad=grad, tokens_real=t_real, tokens_padded=t_pad,
                          tflop_real=(per_token * t_real + head) / 1e12))
    views = [batch] + ([batch["aug"]] if host.aug is not None else [])
    tower = {"real": 0.0, "padded": 0.0}
    for v in views:
        unit = 4  # spatial merge 2x2
        p_real = float(np.prod(v["video_grid_thw"], axis=1).sum())
        p_pad = float(np.prod(v["video_patches"].shape[:2]))
        mel_real = float(np.sum(v["mel_len"]))
        mel_pad = float(np.shape(v["mel"])[0] * np.shape(v["mel"])[2])
        fb_real = float(np.sum(np.asarray(v["fbank_len"]) // 16) * (np.shape(v["fbank"])[2] // 16))
        fb_pad = float(len(v["mel_len"]) * (np.shape(v["fbank"])[1] // 16) * (np.shape(v["fbank"])[2] // 16))
        for key, (patches, mel, fb) in (("real", (p_real, mel_real, fb_real)), ("padded", (p_pad, mel_pad, fb_pad))):
            tower[key] += 2 * (groups["vision"] * patches + groups["merger"] * patches / unit
                               + groups["conv1"] * mel + (groups["conv2"] + groups["whisper"]) * mel / 2
                               + groups["whisper_out"] * mel / 4 + groups["beats"] * fb)
            tower[key] += 6 * groups["adaptor"] * mel / 4
    return dict(real=real + tower["real"], padded=padded + tower["padded"], llm_real=real, llm_padded=padded,
                towers_real=tower["real"], towers_padded=tower["padded"], passes=table)


# ----------------------------------------------------------------------------- devices

def device_memory(dev) -> int:
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    # CPU devices share the host's memory.
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // len(jax.local_devices())


def peak_flops(dev, override: float | None) -> tuple[float, str]:
    if override:
        return override * 1e12, "--peak-tflops"
    for key, tflops in PEAK_TFLOPS.items():
        if key in dev.device_kind:
            return tflops * 1e12, f"{key} bf16 dense (table)"
    if dev.platform == "cpu":
        a = jax.device_put(jnp.ones((2048, 2048), jnp.float32), dev)
        f = jax.jit(lambda x: x @ x)
        f(a).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            f(a).block_until_ready()
            times.append(time.perf_counter() - t0)
        return 2 * 2048**3 / statistics.median(times), "measured 2048^3 float32 matmul on one CPU device"
    raise SystemExit(f"no peak FLOP/s known for {dev.device_kind!r}: pass --peak-tflops")


def per_device_bytes(tree, shardings) -> int:
    """Bytes one device holds of ``tree`` (concrete or abstract) under ``shardings``."""
    leaves = jax.tree.leaves(tree)
    shs = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    return sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in zip(leaves, shs, strict=True))


# ----------------------------------------------------------------------------- model

def _si(x: float, unit: str = "") -> str:
    """(1234567, "FLOP") -> '1.23 MFLOP' (counts and FLOPs at both the tiny and the 7B scale)."""
    for div, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".rstrip()


def get_config(size: str, preset: str):
    return (tiny if size == "tiny" else omniretriever_7b).get_config(preset)


def make_model(c, size: str):
    """The model in train mode with fresh LoRA, as train.py builds it (random weights for 7b)."""
    if size == "tiny":
        model = trainer.tiny_model(c, nnx.Rngs(params=c.model.seed))
    else:
        cfg = ThinkerConfig(dtype=dtype_from_name(c.model.dtype), param_dtype=dtype_from_name(c.model.frozen_dtype))
        model = WAVE(cfg, BEATsConfig(), rngs=nnx.Rngs(params=c.model.seed), remat=c.model.remat)
    apply_lora(model, trainer.lora_config(c), nnx.Rngs(params=c.model.seed + 1, dropout=c.model.seed + 2))
    model.train()
    return model


def split_states(model, c):
    """(graphdef, trainable in param_dtype, frozen in frozen_dtype)."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(trainer.lora_config(c)), ...)

    def cast(tree, dtype):
        def one(x):
            if not jnp.issubdtype(x.dtype, jnp.floating):
                return x
            return jax.ShapeDtypeStruct(x.shape, dtype) if isinstance(x, jax.ShapeDtypeStruct) else x.astype(dtype)
        return jax.tree.map(one, tree)

    return (graphdef, cast(trainable, dtype_from_name(c.model.param_dtype)),
            cast(frozen, dtype_from_name(c.model.frozen_dtype)))


def seven_b_tokens() -> Tokens:
    """No tokenizer download: captions and prompts as byte tokens under the real special ids."""
    return Tokens(encode=lambda s: [b + 1 for b in s.encode()], im_end_id=151645, pad_id=151643)


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=("tiny", "7b"), default="tiny")
    p.add_argument("--preset", default="full", help="frozen | pairwise | distill | full")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: tiny 8, 7b 8 per device)")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the first compiles)")
    p.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor sizes (-1 fills)")
    p.add_argument("--remat", default=None, help="override model.remat: none | full | dots")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak FLOP/s per device, in TFLOP/s")
    p.add_argument("--caption-chars", type=int, default=48, help="mean random caption length (bytes = tokens)")
    p.add_argument("--abstract", action="store_true", help="accounting only: allocate nothing (7b)")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args(argv)

    c = get_config(args.size, args.preset)
    if args.remat is not None:
        c.model.remat = args.remat
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = sharding.make_mesh(sharding.MeshConfig(data=data, fsdp=fsdp, tensor=tensor))
    n_dev = mesh.devices.size
    b = args.batch or (c.train.batch_size if args.size == "tiny" else 8 * n_dev)
    sharding.batch_sharding(mesh, b)  # clear error if the batch does not divide
    lcfg, ecfg = trainer.loss_config(c), trainer.embed_config(c)
    if not lcfg.terms:
        raise SystemExit(f"preset {args.preset!r} trains nothing; pick pairwise, distill or full")
    dev = mesh.devices.flat[0]

    # -- model (abstract first: parameter groups, memory check) --------------------------------
    if args.size == "tiny":
        model = make_model(c, "tiny")
        graphdef, trainable, frozen = split_states(model, c)
        model_cfg, tokens = model.cfg, trainer.byte_tokens()
        abstract_model = model
    else:
        abstract_model = nnx.eval_shape(lambda: make_model(c, "7b"))
        graphdef, trainable, frozen = split_states(abstract_model, c)  # ShapeDtypeStruct leaves
        model_cfg, tokens = abstract_model.cfg, seven_b_tokens()
    groups = param_groups(abstract_model)
    tr_sh, fr_sh = sharding.state_shardings(trainable, mesh), sharding.state_shardings(frozen, mesh)
    weights = per_device_bytes(frozen, fr_sh) + per_device_bytes(trainable, tr_sh)
    adam = 2 * per_device_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable), tr_sh)
    have = device_memory(dev)

    batch = random_batch(c, b, seed=0, augment="L_T" in lcfg.terms,
                         caption_chars=(args.caption_chars // 2, args.caption_chars * 3 // 2))
    host = build_inputs(batch, 1, model_cfg, tokens, ecfg, lcfg, seed=c.train.seed)
    flops = step_flops(groups, host, batch, lcfg, ecfg)

    n_params = sum(groups.values())
    whisper = groups["conv1"] + groups["conv2"] + groups["whisper"] + groups["whisper_out"]
    print(f"{args.size} WAVE, preset {args.preset} ({' + '.join(lcfg.terms)}, {lcfg.recipe} recipe), "
          f"global batch {b} on {n_dev} x {dev.device_kind} mesh {dict(mesh.shape)}, remat {c.model.remat}")
    print(f"params: {_si(n_params)} total; LLM decoder N = {_si(groups['llm'])}, LoRA {_si(groups['lora'])}, "
          f"fusion head {_si(groups['head'])}, vision {_si(groups['vision'] + groups['merger'])}, whisper "
          f"{_si(whisper)}, BEATs {_si(groups['beats'])} + adaptor {_si(groups['adaptor'])}, not run by the "
          f"step (embedding table, LM head) {_si(groups['unused'])}")
    print("LLM passes:  path       grad  tokens real / padded   FLOP (real tokens)")
    for row in flops["passes"]:
        print(f"             {row['path']:9s}  {'yes' if row['grad'] else 'no ':4s}  {row['tokens_real']:>8d} / "
              f"{row['tokens_padded']:<8d}   {_si(row['tflop_real'] * 1e12, 'FLOP')}")
    print(f"model FLOPs per step: {_si(flops['real'], 'FLOP')} on real tokens (LLM {_si(flops['llm_real'], 'FLOP')}, "
          f"towers + adaptor {_si(flops['towers_real'], 'FLOP')}); {_si(flops['padded'], 'FLOP')} on padded tokens")
    print(f"memory per device: weights {weights / GiB:.2f} GiB + Adam moments {adam / GiB:.2f} GiB; "
          f"device has {have / GiB:.1f} GiB")
    result = dict(size=args.size, preset=args.preset, batch=b, devices=n_dev, device_kind=dev.device_kind,
                  mesh=dict(mesh.shape), remat=c.model.remat, params=groups,
                  tflop_per_step_real=flops["real"] / 1e12, tflop_per_step_padded=flops["padded"] / 1e12,
                  passes=flops["passes"], weights_gib=weights / GiB, adam_gib=adam / GiB, device_gib=have / GiB)
    short = weights + adam > 0.9 * have
    if args.abstract:
        print(f"a real run {'would stop here: too little memory' if short else 'passes the memory check'}")
        _write(args.json, result)
        return 0
    if short:
        raise SystemExit(f"not enough memory: the weights and optimizer state alone need {(weights + adam) / GiB:.1f} "
                         f"GiB per device, the device has {have / GiB:.1f} GiB (the 7b step needs ~40 GB with "
                         "activations). Use a bigger accelerator or shard over more devices (--mesh 1,-1,1).")

    # -- materialise, place, compile -------------------------------------------------------------
    if args.size == "7b":
        def states():
            return split_states(make_model(c, "7b"), c)[1:]
        trainable, frozen = jax.jit(states, out_shardings=(tr_sh, fr_sh))()
    else:
        trainable, frozen = jax.device_put(trainable, tr_sh), jax.device_put(frozen, fr_sh)
    tx = make_optimizer(lr=c.optim.lr, total_steps=c.train.steps, warmup_ratio=c.optim.warmup_ratio,
                        weight_decay=c.optim.weight_decay, clip_norm=c.optim.clip_norm, accumulate=c.optim.accumulate)
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                       jax.jit(tx.init)(trainable))
    opt_sh = jax.tree.map(lambda x: x.sharding, opt)
    inputs = sharding.shard_batch(host, mesh)
    in_sh = jax.tree.map(lambda x: x.sharding, inputs)
    step_cfg, wrt = StepConfig(ecfg=ecfg, loss=lcfg), trainable_filter(trainer.lora_config(c))

    def step_fn(params, frozen_state, opt_state, inputs, step, key):
        return train_step(graphdef, params, frozen_state, opt_state, inputs, step, key, wrt=wrt, tx=tx, cfg=step_cfg)

    jitted = jax.jit(step_fn, in_shardings=(tr_sh, fr_sh, opt_sh, in_sh, replicated, replicated),
                     out_shardings=(tr_sh, opt_sh, replicated), donate_argnums=(0, 2))
    step, key = jnp.int32(1), jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jitted.lower(trainable, frozen, opt, inputs, step, key).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    if mem is not None and getattr(mem, "temp_size_in_bytes", None) is not None:
        need = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        result["step_memory_gib"] = need / GiB
        print(f"compiled in {compile_s:.1f} s; step memory per device {need / GiB:.2f} GiB "
              f"(temporaries {mem.temp_size_in_bytes / GiB:.2f} GiB)")
        if need > have:
            raise SystemExit(f"not enough memory: the compiled step needs {need / GiB:.1f} GiB per device, the device "
                             f"has {have / GiB:.1f} GiB; lower --batch, use --remat full or shard over more devices")
    else:
        print(f"compiled in {compile_s:.1f} s")

    times = []
    skipped = 0
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        trainable, opt, metrics = compiled(trainable, frozen, opt, inputs, step, key)
        jax.block_until_ready((trainable, opt, metrics))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            skipped += int(metrics["skipped"])
    dt = statistics.median(times)
    peak, peak_src = peak_flops(dev, args.peak_tflops)
    # Virtual CPU devices share the host whose whole matmul rate was measured.
    total_peak = peak if dev.platform == "cpu" and not args.peak_tflops else peak * n_dev
    mfu, hfu = flops["real"] / dt / total_peak, flops["padded"] / dt / total_peak
    print(f"step time {1000 * dt:.1f} ms (median of {len(times)}; min {1000 * min(times):.1f}, max "
          f"{1000 * max(times):.1f}); {b / dt:.2f} examples/s; loss {float(metrics['loss']):.4f}"
          f"{f', {skipped} timed steps skipped as non-finite' if skipped else ''}")
    print(f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_src}); MFU {100 * mfu:.2f} % on real tokens, "
          f"{100 * hfu:.2f} % on padded tokens")
    result.update(compile_s=compile_s, step_ms=1000 * dt, examples_per_s=b / dt, peak_tflops=peak / 1e12,
                  peak_source=peak_src, mfu=mfu, mfu_padded=hfu, loss=float(metrics["loss"]), skipped=skipped)
    _write(args.json, result)
    return 0


def _write(path, result) -> None:
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
