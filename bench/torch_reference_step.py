"""PyTorch reference train step of the OmniRetriever recipe (WAVE + LoRA, "full" preset, paper recipe).

The side-by-side benchmark's PyTorch side: the fastest honest PyTorch version of one optimizer
step, written from shared/spec (architecture.md s.1-3, method.md) with transformers' thinker,
peft and openbeats (bench/torch_wave.py), never from our JAX code.

Model (random init, widths of configs/bench.py:tiny|small, or --widths 7b): transformers'
Qwen2_5OmniThinkerForConditionalGeneration (attn_implementation="sdpa", LM head dropped: no logits
are computed), openbeats' ESPnet BeatsEncoder (iter3+ layout at the beats_* widths of
configs/tiny.py; its sdpa attention path on CUDA, its eager path on CPU, where it is faster),
and WAVE's heads: classify_linear = Linear(L*D, D) ->
exact GELU -> Linear(D, D) over the last-position states of hidden_states[1..L] (the last one is
the final-norm output), beats_ln LayerNorm(C), beats_proj Linear(C, D) -> GELU -> Linear(D, D).
peft LoRA (r16 / alpha 32 / dropout 0.05) on q/k/v of every LLM decoder layer, not the towers.
Trainable: LoRA + classify_linear + beats_ln + beats_proj. Frozen: everything else (embedding
table, decoder, vision tower, Whisper tower, BEATs).

One step (the timed unit), on the batch of omniret_jax/data/random_batch.py (anchor view + augmented view):
- per view, vision tower, Whisper tower and BEATs run once under torch.no_grad over the whole
  batch (transformers' packed cu_seqlens / feature_attention_mask paths, BEATs with a padding
  mask); BEATs tokens are cut or zero-padded to 2*N_w per clip, avg-pooled in pairs, then
  beats_ln + beats_proj WITH grad; Whisper and BEATs tokens interleave W0,B0,W1,B1,...
- six LLM passes of B rows: T (caption + <|im_end|>, final-norm state, no fusion head unless
  embed.text_fusion_head), V, A, TVA, TVA of the augmented view (with grad) and the hard-negative
  TVA (no_grad; the anchor's tower outputs with one slot -- text, audio, video cycling with the
  step, period 3 -- taken from another row by a seeded derangement). Media passes use the fusion
  head; every embedding is L2-normalised in float32.
- loss L_A + L_D + L_T (method.md paper recipe; weights loss.l_A/l_D/l_T, temperature
  loss.temperature), backward, clip grad norm optim.clip_norm, AdamW (fused; optim.lr, weight
  decay optim.weight_decay on matrices, none on biases / LayerNorm as HF Trainer does; constant lr:
  configs/bench.py inherits optim.lr 1e-3 from configs/tiny.py, --widths 7b uses 1e-5).

Padding: each pass is LEFT-padded to its own longest row (dynamic padding, as an HF collator does),
so the pooled token is the last position; position ids come from the thinker's get_rope_index
with the 2-D mask (pads get position 1, text of a row starts at 0), audio_seqlens = 8*N_w (WAVE's
doubled audio run). Host-side collation (token ids, masks, position ids, packing the video
patches, the hard negative's gather indices) is done before timing, as a DataLoader worker does
and as the JAX bench builds its inputs once; --collate-in-step times it inside the step instead.
Timing: median of --steps steps after --warmup; CPU runs use torch's default thread count
(--threads overrides it). On a shared CPU the default (one OpenMP thread per core) is very
sensitive to other processes: with another job busy on a 2-core machine a tiny step went from
0.22 s to ~14 s at 2 threads, 0.47 s at 1; compare the two sides on an idle machine.

--embed: inference throughput (eval mode, torch.inference_mode, LoRA merged into the weights)
of the eval embedding of the joint AV path (towers + adaptor + one LLM pass with
"Please describe the video and the audio." and the fusion head) and of the T path; clips/s
over B clips per batch.

--widths 7b: Qwen2.5-Omni-7B thinker shapes (architecture.md s.1; vision 1280 wide, not
transformers' 3584 default), BEATs iter3+, real special token ids (pad 151643, <|im_end|> 151645),
batch 8, 8 frames at 224x224, 8 s audio, 48-token captions; random weights built directly on the
device, frozen base bfloat16, trainables float32, per-decoder-layer gradient checkpointing
(--remat full, the JAX 7B config's default; --remat none keeps every activation, an estimated
~120 GB at batch 8, which with ~24 GB of weights and optimizer state does not fit an H200). UNTESTED ON A GPU: only checked on CPU with --layers 1 (same widths, one layer per stack)
and on the meta device (--abstract: shapes and parameter counts, nothing allocated).

--check: after the run, verifies the trainable-parameter count (LoRA r on q/k/v + heads), that a
step moves the LoRA B matrices and no frozen weight, that the loss is finite, and that every
left-padded batched embedding equals the same sample run alone unpadded (eval mode).

Output: one JSON line on stdout (everything else goes to stderr).

COMMAND: python bench/torch_reference_step.py --config configs/bench.py:tiny --steps 10 --warmup 2
COMMAND: python bench/torch_reference_step.py --config configs/bench.py:small --steps 3 --warmup 1 --check
COMMAND: python bench/torch_reference_step.py --config configs/bench.py:tiny --embed
COMMAND: python bench/torch_reference_step.py --widths 7b --device cuda --steps 5 --warmup 2   (one H100 / H200)
COMMAND: python bench/torch_reference_step.py --widths 7b --device cpu --layers 1 --batch 2 --steps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import torch_wave as W  # noqa: E402
from bench.report import allocator  # noqa: E402
from omniret_jax.data.random_batch import random_batch  # noqa: E402

PASSES = ("T", "V", "A", "TVA", "TVA_aug", "TVA_neg")


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config

def load_config(spec: str):
    path, _, arg = spec.partition(":")
    p = Path(path)
    if not p.is_absolute():
        p = ROOT / p
    mod_spec = importlib.util.spec_from_file_location(f"_cfg_{p.stem}", p)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.get_config(arg) if arg else mod.get_config()


def apply_overrides(c, overrides: list[str]) -> None:
    for item in overrides:
        key, _, raw = item.partition("=")
        node = c
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        old = node[leaf]
        if isinstance(old, bool):
            val = raw.lower() in ("1", "true", "yes")
        elif isinstance(old, (int, float)):
            val = type(old)(ast.literal_eval(raw))
        elif isinstance(old, str):
            val = raw
        else:
            val = ast.literal_eval(raw)
        node[leaf] = val


# ----------------------------------------------------------------------------- the step

def make_optimizer(wave, lr: float, weight_decay: float):
    decay, no_decay = [], []
    for name, p in wave.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "beats_ln" in name else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True), "fused"
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True), "foreach"


def forward_loss(wave, x: dict, c):
    p = x["passes"]
    with torch.no_grad():
        ta = wave.towers(x["anchor"])
        tb = wave.towers(x["aug"])
    aud_a = wave.audio_tokens(ta["whisper"], ta["beats"])      # adaptor: with grad
    aud_b = wave.audio_tokens(tb["whisper"], tb["beats"])
    z = dict(
        T=wave.embed(p["T"], fusion=wave.text_fusion_head),
        V=wave.embed(p["V"], vis=ta["vis"]),
        A=wave.embed(p["A"], aud=aud_a),
        TVA=wave.embed(p["TVA"], vis=ta["vis"], aud=aud_a),
        TVA_aug=wave.embed(p["TVA_aug"], vis=tb["vis"], aud=aud_b),
    )
    with torch.no_grad():
        z["TVA_neg"] = wave.embed(p["TVA_neg"], vis=ta["vis"], aud=aud_a.detach())
    loss, parts = W.paper_loss(z, c.loss.temperature, (c.loss.l_A, c.loss.l_D, c.loss.l_T))
    return loss, parts, z


def train_step(wave, opt, params, x: dict, c) -> torch.Tensor:
    loss, _, _ = forward_loss(wave, x, c)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, c.optim.clip_norm, foreach=True)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory(device) -> dict:
    if device.type == "cuda":
        return dict(peak_device_mb=W.mb(torch.cuda.max_memory_allocated(device)))
    return dict(peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))


def timing(times: list[float]) -> dict:
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times))


# ----------------------------------------------------------------------------- checks

def run_checks(wave, c, batch, collator, widths, beats_cfg, rank, device) -> dict:
    """Correctness checks of the reference itself (see the module docstring)."""
    out = {}
    params = wave.trainable_parameters()
    want = W.expected_trainable(widths, beats_cfg, rank)
    got = W.count(params)
    lora_n = W.count(p for n, p in wave.named_parameters() if "lora_" in n and p.requires_grad)
    out["trainable_params"] = got
    out["trainable_params_expected"] = want["total"]
    out["lora_params"] = lora_n
    out["lora_params_expected"] = want["lora"]
    n_lora_mods = sum(1 for n, _ in wave.named_parameters() if n.endswith("lora_A.default.weight"))
    out["lora_matrices"] = n_lora_mods
    assert got == want["total"] and lora_n == want["lora"], (got, want, lora_n)
    assert n_lora_mods == 3 * widths["text"]["num_hidden_layers"], n_lora_mods

    # One step from a fresh optimizer: LoRA B moves, frozen weights do not, loss finite.
    frozen = {n: p.detach().clone() for n, p in wave.named_parameters() if not p.requires_grad}
    lora_b = {n: p.detach().clone() for n, p in wave.named_parameters() if "lora_B" in n}
    opt, _ = make_optimizer(wave, c.optim.lr, c.optim.weight_decay)
    wave.train()
    wave.beats.eval()
    loss = train_step(wave, opt, params, collator.train_inputs(batch, step=0, seed=c.train.seed), c)
    out["check_loss"] = float(loss)
    assert math.isfinite(float(loss)), loss
    moved = sum(int(not torch.equal(p, lora_b[n])) for n, p in wave.named_parameters() if n in lora_b)
    out["lora_B_moved"] = f"{moved}/{len(lora_b)}"
    assert moved == len(lora_b), out["lora_B_moved"]
    changed = [n for n, p in wave.named_parameters() if n in frozen and not torch.equal(p, frozen[n])]
    out["frozen_changed"] = len(changed)
    out["frozen_tensors"] = len(frozen)
    assert not changed, changed[:5]
    del frozen, lora_b, opt

    # Batched left-padded embeddings vs each sample alone and unpadded (eval mode: no LoRA dropout).
    wave.eval()
    errs = {}
    with torch.no_grad():
        for step in range(3):           # all three hard-negative slots
            x = collator.train_inputs(batch, step=step, seed=c.train.seed)
            _, _, z = forward_loss(wave, x, c)
            perm, slot = x["perm"], x["slot"]
            for i in range(len(batch["caption"])):
                single = W.pack_single(batch, i)
                anchor, meta = collator.view(single)
                t1 = wave.towers(anchor)
                aud1 = wave.audio_tokens(t1["whisper"], t1["beats"])
                p1 = collator.passes(meta, ("T", "V", "A", "TVA"))
                ref = dict(T=wave.embed(p1["T"], fusion=wave.text_fusion_head), V=wave.embed(p1["V"], vis=t1["vis"]),
                           A=wave.embed(p1["A"], aud=aud1), TVA=wave.embed(p1["TVA"], vis=t1["vis"], aud=aud1))
                sa = W.pack_single(batch["aug"], i)
                a2, m2 = collator.view(sa)
                t2 = wave.towers(a2)
                ref["TVA_aug"] = wave.embed(collator.passes(m2, ("TVA",))["TVA"], vis=t2["vis"],
                                            aud=wave.audio_tokens(t2["whisper"], t2["beats"]))
                # The hard negative of row i: its own triple with one slot from row perm[i].
                j = int(perm[i])
                mixed = dict(single)
                other = W.pack_single(batch, j)
                keys = {"text": ("caption",), "audio": ("mel", "mel_len", "fbank", "fbank_len"),
                        "video": ("video_patches", "video_grid_thw", "video_second_per_grid")}[slot]
                mixed.update({k: other[k] for k in keys})
                a3, m3 = collator.view(mixed)
                t3 = wave.towers(a3)
                ref["TVA_neg"] = wave.embed(collator.passes(m3, ("TVA",))["TVA"], vis=t3["vis"],
                                            aud=wave.audio_tokens(t3["whisper"], t3["beats"]))
                for k, v in ref.items():
                    if step > 0 and k != "TVA_neg":
                        continue
                    key = k if k != "TVA_neg" else f"TVA_neg[{slot}]"
                    errs[key] = max(errs.get(key, 0.0), float((z[k][i] - v[0]).abs().max()))
    out["batched_vs_single_max_abs"] = {k: float(f"{v:.2e}") for k, v in errs.items()}
    tol = 1e-4 if wave.llm_dtype == torch.float32 else 3e-2
    assert max(errs.values()) <= tol, errs
    log(f"checks passed: {out}")
    return out


# ----------------------------------------------------------------------------- main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/bench.py:tiny", help="path:arg of a config file (get_config(arg))")
    p.add_argument("--widths", default=None, help="tiny | small (from --config) | 7b (real Qwen2.5-Omni-7B shapes)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--embed", action="store_true", help="inference throughput of the AV and T eval embeddings")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda for 7b, else cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="override the batch size")
    p.add_argument("--remat", default=None, choices=("none", "full"),
                   help="per-decoder-layer gradient checkpointing (default: the config's model.remat; 7b: full)")
    p.add_argument("--layers", type=int, default=None, help="cut every stack to N layers (smoke tests of 7b shapes)")
    p.add_argument("--collate-in-step", action="store_true", help="time host-side collation inside the step")
    p.add_argument("--check", action="store_true", help="run the correctness checks after the timing")
    p.add_argument("--abstract", action="store_true", help="build on the meta device and count parameters only")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own default)")
    args, rest = p.parse_known_args(argv)
    overrides = []
    for r in rest:
        if not r.startswith("--config.") or "=" not in r:
            p.error(f"unrecognised argument {r!r} (overrides look like --config.optim.lr=1e-5)")
        overrides.append(r[len("--config."):])

    seven_b = args.widths == "7b"
    c = load_config("configs/bench.py:small" if seven_b and args.config == "configs/bench.py:tiny" else args.config)
    if seven_b:
        c.train.batch_size = 8
        c.bench.caption_tokens = 48
        c.bench.widths = "7b"
        c.model.remat = "full"
        c.optim.lr = 1e-5
        c.loss.temperature = 0.01
    elif args.widths is not None and args.widths != c.bench.widths:
        p.error(f"--widths {args.widths} disagrees with --config {args.config} (widths {c.bench.widths})")
    apply_overrides(c, overrides)
    if c.loss.preset != "full" or c.loss.recipe != "paper" or c.loss.tuple_similarity != "joint":
        raise SystemExit("this reference implements the full preset of the paper recipe (joint tuple similarity) only")
    device = torch.device(args.device or ("cuda" if seven_b else "cpu"))
    remat = args.remat or c.model.remat
    b = args.batch or c.train.batch_size
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)

    if seven_b:
        widths, beats_cfg, ids = W.SEVEN_B, dict(W.BEATS_ITER3_PLUS), W.REAL_IDS
        frozen_dtype = torch.bfloat16
    else:
        widths, beats_cfg, ids = W.widths_from_config(c), W.beats_from_config(c), W.TINY_IDS
        frozen_dtype = torch.float32
    if args.layers:
        widths, beats_cfg = W.with_layers(widths, beats_cfg, args.layers)
    if device.type == "cuda" and not torch.cuda.is_available() and not args.abstract:
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")

    build = dict(lora_rank=c.lora.rank, lora_alpha=c.lora.alpha, lora_dropout=c.lora.dropout,
                 frozen_dtype=frozen_dtype, text_fusion_head=c.embed.text_fusion_head, seed=args.seed)
    if args.abstract:
        wave = W.build_wave(widths, beats_cfg, ids, device="meta", **build)
        groups = {}
        for n, prm in wave.named_parameters():
            key = ("lora" if "lora_" in n else n.split(".")[0] if not n.startswith("thinker.") else
                   n.split(".")[2] if n.startswith("thinker.model.") else n.split(".")[1])
            groups[key] = groups.get(key, 0) + prm.numel()
        want = W.expected_trainable(widths, beats_cfg, c.lora.rank)
        got = W.count(wave.trainable_parameters())
        print(json.dumps(dict(side="torch", mode="abstract", widths=c.bench.widths, params=groups,
                              trainable_params=got, trainable_params_expected=want["total"],
                              frozen_bytes=sum(x.numel() * x.element_size() for x in wave.parameters()
                                               if not x.requires_grad))))
        return 0 if got == want["total"] else 1

    t0 = time.perf_counter()
    wave = W.build_wave(widths, beats_cfg, ids, device=device, **build)
    log(f"built {c.bench.widths} WAVE on {device} in {time.perf_counter() - t0:.1f} s; "
        f"{W.count(wave.parameters()) / 1e6:.2f} M params, "
        f"{W.count(wave.trainable_parameters()) / 1e6:.3f} M trainable; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if remat == "full":
        wave.thinker.model.language_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    collator = W.Collator(wave, c, device)
    batch = random_batch(c, b, seed=args.seed, augment=True, caption_tokens=c.bench.caption_tokens, bucketed=True)
    common = dict(side="torch", widths=c.bench.widths, batch=b, device=str(device),
                  dtype=str(frozen_dtype).replace("torch.", ""), threads=torch.get_num_threads(), warmup=args.warmup,
                  malloc=allocator())

    if args.embed:
        result = run_embed(wave, collator, batch, args, device)
        result = dict(common, mode="embed", steps=args.steps, **result, **peak_memory(device),
                      load_avg_1m=round(os.getloadavg()[0], 2))
        print(json.dumps(result))
        return 0

    params = wave.trainable_parameters()
    opt, opt_kind = make_optimizer(wave, c.optim.lr, c.optim.weight_decay)
    wave.train()
    wave.beats.eval()
    n = args.warmup + args.steps
    t0 = time.perf_counter()
    inputs = None if args.collate_in_step else [collator.train_inputs(batch, i, c.train.seed) for i in range(n)]
    log(f"collated {0 if inputs is None else n} steps' inputs in {time.perf_counter() - t0:.2f} s (untimed)")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, losses, toks = [], [], []
    for i in range(n):
        sync(device)
        t0 = time.perf_counter()
        x = collator.train_inputs(batch, i, c.train.seed) if inputs is None else inputs[i]
        loss = float(train_step(wave, opt, params, x, c))   # .item() waits for the step
        sync(device)
        dt = time.perf_counter() - t0
        losses.append(loss)
        if i >= args.warmup:
            times.append(dt)
            toks.append((sum(x["passes"][k]["tokens_real"] for k in PASSES),
                         sum(x["passes"][k]["tokens_padded"] for k in PASSES)))
        log(f"step {i} ({x['slot']} slot){' [warmup]' if i < args.warmup else ''}: {dt:.3f} s, loss {loss:.4f}")
        if inputs is not None:
            inputs[i] = None
    result = dict(common, steps=len(times), **timing(times), examples_per_s=b / statistics.median(times),
                  tokens_real=round(statistics.mean(t[0] for t in toks)),
                  tokens_padded=round(statistics.mean(t[1] for t in toks)),
                  **peak_memory(device), loss=losses[-1], remat=remat, optimizer=f"AdamW ({opt_kind})",
                  lr=c.optim.lr, trainable_params=W.count(params), collate_in_step=args.collate_in_step,
                  load_avg_1m=round(os.getloadavg()[0], 2))
    if args.check:
        result["checks"] = run_checks(wave, c, batch, collator, widths, beats_cfg, c.lora.rank, device)
    print(json.dumps(result))
    return 0


def run_embed(wave, collator, batch, args, device) -> dict:
    wave.thinker.model.language_model.gradient_checkpointing_disable()
    wave.eval()
    merged = 0
    for mod in wave.thinker.modules():           # peft LoRA layers: fold the adapters into the weights
        if hasattr(mod, "merge") and hasattr(mod, "lora_A"):
            mod.merge()
            merged += int(bool(mod.merged))
    assert merged == 3 * wave.thinker.config.text_config.num_hidden_layers, merged
    anchor, meta = collator.view(batch)
    passes = collator.passes(meta, ("AV", "T"))
    fusion_t = wave.text_fusion_head

    def av():
        t = wave.towers(anchor)
        return wave.embed(passes["AV"], vis=t["vis"], aud=wave.audio_tokens(t["whisper"], t["beats"]))

    def text():
        return wave.embed(passes["T"], fusion=fusion_t)

    out = {}
    with torch.inference_mode():
        for name, fn in (("AV", av), ("T", text)):
            times = []
            for i in range(args.warmup + args.steps):
                sync(device)
                t0 = time.perf_counter()
                z = fn()
                float(z.sum())
                sync(device)
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
            tm = timing(times)
            out[f"clips_per_s_{name}"] = len(batch["caption"]) / tm["median_s"]
            out.update({f"{k}_{name}": v for k, v in tm.items()})
            out[f"tokens_real_{name}"] = passes[name]["tokens_real"]
            out[f"tokens_padded_{name}"] = passes[name]["tokens_padded"]
            log(f"embed {name}: median {tm['median_s']:.4f} s per batch of {len(batch['caption'])}")
    out["lora_merged"] = True
    return out


if __name__ == "__main__":
    sys.exit(main())
