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

The model comes from the config exactly as the trainer builds it (``omniret_jax.build``), so any
width set is one command line: ``--config configs/bench.py:small`` (the side-by-side widths),
``--config configs/omniretriever_7b.py --config.model.init=random`` (the real WAVE-7B shapes,
random weights created on the devices, frozen weights bfloat16; needs ~40 GB of device memory
and stops with a message if the weights and optimizer state alone do not fit). ``--abstract``
prints the FLOP and memory accounting without allocating anything. The last line of output is
one JSON object (also written to ``--json``).

COMMAND: python bench/train_step.py --config configs/bench.py:tiny
COMMAND: python bench/train_step.py --config configs/omniretriever_7b.py --config.model.init=random --abstract
COMMAND: python bench/train_step.py --config configs/omniretriever_7b.py --config.model.init=random --batch 8
COMMAND: python bench/train_step.py --config configs/omniretriever_7b.py --config.model.init=random --compile_only --batch 8 --config.model.attention=xla
COMMAND: python bench/train_step.py --config configs/nemotron_3b.py --config.model.init=random --abstract
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omniret_jax import build, sharding  # noqa: E402
from omniret_jax.data.batch import build_inputs  # noqa: E402
from omniret_jax.data.random_batch import random_batch  # noqa: E402
from omniret_jax.losses import needed_views  # noqa: E402
from omniret_jax.model.lora import trainable_filter  # noqa: E402
from omniret_jax.step import StepConfig, train_step  # noqa: E402
from bench.report import allocator, emit  # noqa: E402

GiB = 2**30
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # bf16 dense, per device


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
        b = len(p.pool_index)  # sequences (a packed pass has fewer rows)
        t_real, t_pad = int((mask > 0).sum()), int(mask.size)  # packed rows hold segment ids
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


# ----------------------------------------------------------------------------- main

build.define_config_flag()
_BATCH = flags.DEFINE_integer("batch", None, "global batch (default: the config's train.batch_size)")
_STEPS = flags.DEFINE_integer("steps", 10, "timed steps")
_WARMUP = flags.DEFINE_integer("warmup", 2, "untimed steps first (the first compiles)")
_PEAK = flags.DEFINE_float("peak_tflops", None, "peak FLOP/s per device, in TFLOP/s")
_CAPTION_CHARS = flags.DEFINE_integer("caption_chars", 48, "mean random caption length (bytes = tokens), "
                                      "unless the config sets bench.caption_tokens")
_ABSTRACT = flags.DEFINE_boolean("abstract", False, "accounting only: allocate nothing")
_COMPILE_ONLY = flags.DEFINE_boolean("compile_only", False, "compile the step on abstract weights and report its "
                                     "compile time and memory analysis, allocate no weight (the 7B shapes on a CPU)")
_JSON = flags.DEFINE_string("json", None, "also write the result here")
_PROFILE = flags.DEFINE_string("profile", None, "write a jax.profiler trace of the timed steps here "
                               "(TensorBoard / xprof; bench/profile_ops.py sums it per XLA op)")


def run(c) -> dict:
    mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
    n_dev = mesh.devices.size
    b = _BATCH.value or c.train.batch_size
    sharding.batch_sharding(mesh, b)  # clear error if the batch does not divide
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    if not lcfg.terms:
        raise SystemExit(f"preset {c.loss.preset!r} trains nothing; pick pairwise, distill or full")
    dev = mesh.devices.flat[0]

    # -- model (abstract first: parameter groups, memory check) --------------------------------
    graphdef, trainable, frozen, model_cfg = build.abstract_state(c, train=True)
    tokens = build.tokens_for(c)
    groups = param_groups(nnx.merge(graphdef, trainable, frozen))
    tr_sh, fr_sh = sharding.state_shardings(trainable, mesh), sharding.state_shardings(frozen, mesh)
    weights = per_device_bytes(frozen, fr_sh) + per_device_bytes(trainable, tr_sh)
    adam = 2 * per_device_bytes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), trainable), tr_sh)
    have = device_memory(dev)

    caption_tokens = c.bench.caption_tokens if "bench" in c else None
    chars = _CAPTION_CHARS.value
    plan = needed_views(lcfg)
    batch = random_batch(c, b, seed=0, augment=bool(plan.aug), caption_chars=(chars // 2, chars * 3 // 2),
                         caption_tokens=caption_tokens, bucketed=True)
    host = build_inputs(batch, 1, model_cfg, tokens, ecfg, plan, seed=c.train.seed)
    flops = step_flops(groups, host, batch, lcfg, ecfg)

    n_params = sum(groups.values())
    whisper = groups["conv1"] + groups["conv2"] + groups["whisper"] + groups["whisper_out"]
    print(f"{build.backbone(c)} backbone, preset {c.loss.preset} ({' + '.join(lcfg.terms)}, {lcfg.recipe} recipe), "
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
    result = dict(config=c.get("bench", {}).get("widths", None) or "config", preset=c.loss.preset, batch=b,
                  devices=n_dev, device_kind=dev.device_kind, mesh=dict(mesh.shape), remat=c.model.remat,
                  params=groups, tflop_per_step_real=flops["real"] / 1e12,
                  tflop_per_step_padded=flops["padded"] / 1e12, padding_ratio=flops["padded"] / flops["real"],
                  passes=flops["passes"], weights_gib=weights / GiB, adam_gib=adam / GiB, device_gib=have / GiB,
                  malloc=allocator())
    short = weights + adam > 0.9 * have
    if _ABSTRACT.value:
        print(f"a real run {'would stop here: too little memory' if short else 'passes the memory check'}")
        return result
    tx = build.optimizer(c)
    replicated = NamedSharding(mesh, PartitionSpec())
    step_cfg, wrt = StepConfig(ecfg=ecfg, loss=lcfg), trainable_filter(build.lora_config(c))

    def compile_step(trainable, frozen, tr_sh, fr_sh, opt, opt_sh, inputs):
        def step_fn(params, frozen_state, opt_state, inputs, step, key):
            return train_step(graphdef, params, frozen_state, opt_state, inputs, step, key, wrt=wrt, tx=tx,
                              cfg=step_cfg)

        in_sh = jax.tree.map(lambda x: x.sharding, inputs)
        jitted = jax.jit(step_fn, in_shardings=(tr_sh, fr_sh, opt_sh, in_sh, replicated, replicated),
                         out_shardings=(tr_sh, opt_sh, replicated), donate_argnums=(0, 2))
        t0 = time.perf_counter()
        compiled = jitted.lower(trainable, frozen, opt, inputs, jnp.int32(1), jax.random.key(0)).compile()
        result["compile_s"] = compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        if mem is None or getattr(mem, "temp_size_in_bytes", None) is None:
            print(f"compiled in {compile_s:.1f} s")
            return compiled
        need = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
        result["step_memory_gib"], result["temp_gib"] = need / GiB, mem.temp_size_in_bytes / GiB
        print(f"compiled in {compile_s:.1f} s; step memory per device {need / GiB:.2f} GiB "
              f"(temporaries {mem.temp_size_in_bytes / GiB:.2f} GiB)")
        if need > have and not _COMPILE_ONLY.value:
            raise SystemExit(f"not enough memory: the compiled step needs {need / GiB:.1f} GiB per device, the device "
                             f"has {have / GiB:.1f} GiB; lower --batch, use --config.model.remat=full or shard over "
                             "more devices")
        return compiled

    if _COMPILE_ONLY.value:
        abstract_opt = jax.eval_shape(tx.init, trainable)
        compile_step(trainable, frozen, tr_sh, fr_sh, abstract_opt, sharding.state_shardings(abstract_opt, mesh),
                     sharding.shard_batch(host, mesh))
        return result
    if short:
        raise SystemExit(f"not enough memory: the weights and optimizer state alone need {(weights + adam) / GiB:.1f} "
                         f"GiB per device, the device has {have / GiB:.1f} GiB (the 7B step needs ~40 GB with "
                         "activations). Use a bigger accelerator or shard over more devices (--config.mesh.fsdp=-1).")

    # -- materialise, place, compile -------------------------------------------------------------
    state = build.build_state(c, mesh, train=True)
    trainable, frozen = state.trainable, state.frozen
    opt_sh = sharding.state_shardings(jax.eval_shape(tx.init, trainable), mesh)
    opt = jax.jit(tx.init, out_shardings=opt_sh)(trainable)
    inputs = sharding.shard_batch(host, mesh)
    compiled = compile_step(trainable, frozen, state.trainable_shardings, state.frozen_shardings, opt, opt_sh, inputs)
    step, key = jnp.int32(1), jax.random.key(0)

    times = []
    skipped = 0
    for i in range(_WARMUP.value + _STEPS.value):
        if i == _WARMUP.value and _PROFILE.value:
            jax.profiler.start_trace(_PROFILE.value)
        t0 = time.perf_counter()
        trainable, opt, metrics = compiled(trainable, frozen, opt, inputs, step, key)
        jax.block_until_ready((trainable, opt, metrics))
        if i >= _WARMUP.value:
            times.append(time.perf_counter() - t0)
            skipped += int(metrics["skipped"])
    if _PROFILE.value:
        jax.profiler.stop_trace()
        print(f"profile of the {_STEPS.value} timed steps in {_PROFILE.value} (the trace slows them a little)")
    dt = statistics.median(times)
    peak, peak_src = peak_flops(dev, _PEAK.value)
    # Virtual CPU devices share the host whose whole matmul rate was measured.
    total_peak = peak if dev.platform == "cpu" and not _PEAK.value else peak * n_dev
    mfu, hfu = flops["real"] / dt / total_peak, flops["padded"] / dt / total_peak
    print(f"step time {1000 * dt:.1f} ms (median of {len(times)}; min {1000 * min(times):.1f}, max "
          f"{1000 * max(times):.1f}); {b / dt:.2f} examples/s; loss {float(metrics['loss']):.4f}"
          f"{f', {skipped} timed steps skipped as non-finite' if skipped else ''}")
    print(f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_src}); MFU {100 * mfu:.2f} % on real tokens, "
          f"{100 * hfu:.2f} % on padded tokens")
    result.update(median_s=dt, min_s=min(times), max_s=max(times), examples_per_s=b / dt,
                  peak_tflops=peak / 1e12, peak_source=peak_src, mfu=mfu, mfu_padded=hfu,
                  loss=float(metrics["loss"]), skipped=skipped)
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if flags.FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/bench.py:tiny")
    result = run(flags.FLAGS.config)
    emit(result, _JSON.value)


if __name__ == "__main__":
    app.run(main)
