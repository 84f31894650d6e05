"""``omniret-convert``: checkpoints between PyTorch and this trainer. Train in JAX, serve in PyTorch, and back.

    omniret-convert orbax  --src CKPT --out DIR [--param-dtype bfloat16]
        A WAVE checkpoint (or Qwen2.5-Omni with --init-missing-heads --beats-checkpoint X.pt; or a
        Qwen2.5-VL / Omni-Embed-Nemotron backbone, converted alone) in PyTorch safetensors ->
        DIR/state (orbax) + DIR/config.json (+ the tokenizer files).
        ``config.model.checkpoint=DIR`` then restores the whole WAVE model straight into the
        mesh shardings ("convert once, load fast").
    omniret-convert export --workdir RUN [--step N] --out DIR [--merged]
        A training workdir -> what PyTorch loads:
        DIR/adapter/   PEFT adapter: LoRA plus the trained heads classify_linear, beats_ln and
                       beats_proj as ``modules_to_save`` (as OmniRetriever's training saves them)
        DIR/base/      only when PyTorch cannot load the run's base (random init, an orbax
                       base): the base weights + config.json in the thinker layout
        DIR/merged/    --merged: one full checkpoint, LoRA folded in, heads included
        DIR/export.json  what was written, from which step, and the run's config
    omniret-convert import --adapter DIR --base WEIGHTS --out RUN [--config configs/x.py[:preset]]
                           [--config.<key>=<value> ...]
        A PEFT adapter (+ heads) for WAVE / OmniRetriever -> a training workdir:
        RUN/checkpoints/0/{trainables,opt_state,meta} (fresh optimizer state: training from it
        fine-tunes, step 0 of the config's schedule), RUN/config.py (+ config.json) with the
        base and the adapter's rank, alpha, dropout and targets. Evaluate with
        ``python -m omniret_jax.eval --checkpoint RUN ...``, train on with
        ``python -m omniret_jax.train --config RUN/config.py --workdir RUN``.

Every command writes into a temporary directory beside ``--out`` and renames it when done,
refuses an ``--out`` that is not empty, and exits 2 with the file, key or value named.

COMMAND: omniret-convert export --workdir /tmp/run --out /tmp/run_torch --merged
COMMAND: omniret-convert import --adapter /tmp/run_torch/adapter --base /tmp/run_torch/base --out /tmp/run_back --config configs/tiny.py
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import jax
from flax import nnx

from omniret_jax import build, sharding
from omniret_jax.checkpoint import CheckpointError, TrainCheckpointer
from omniret_jax.config import NEMOTRON_MODEL_TYPE, Precision, read_hf_config
from omniret_jax.convert.orbax_io import is_orbax, save_module
from omniret_jax.convert.peft import export_peft, import_peft, read_adapter_config
from omniret_jax.convert.tensors import CheckpointError as ConversionError
from omniret_jax.convert.to_flax import FAMILY_LAYOUTS, HEADS, load_backbone, load_heads, load_wave, wave_configs
from omniret_jax.convert.to_torch import export_safetensors, wave_config
from omniret_jax.model.lora import DEFAULT_TARGET, lora_modules, select_targets
from omniret_jax.model.wave import WAVE

EXPORT_FORMAT = 1
# Checkpoints converted as the backbone alone (no WAVE heads, no BEATs).
BACKBONE_ONLY = ("qwen2_5_vl", NEMOTRON_MODEL_TYPE)
DEFAULT_IMPORT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "omniretriever_7b.py"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json")
_CONFIG_PY = '''"""The config of this workdir, written by `omniret-convert import` (the JSON beside this file).

COMMAND: python -m omniret_jax.train --config {run}/config.py --workdir {run} --config.train.steps=100
COMMAND: python -m omniret_jax.eval --config {run}/config.py --checkpoint {run} --manifest M.jsonl --out OUT
"""

import json
from pathlib import Path

import ml_collections


def get_config(arg=None):
    return ml_collections.ConfigDict(json.loads(Path(__file__).with_name("config.json").read_text()))
'''


# ----------------------------------------------------------------------------- output

@contextlib.contextmanager
def staged_output(out: str | Path) -> Iterator[Path]:
    """A temporary directory beside ``out``, renamed to ``out`` when the block succeeds and removed
    when it fails; ``out`` must not exist or be empty."""
    out = Path(out).absolute()
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"output {out} exists and is not a directory")
        held = sorted(p.name for p in out.iterdir())
        if held:
            raise FileExistsError(f"output directory {out} already holds {', '.join(held[:5])}"
                                  f"{' ...' if len(held) > 5 else ''}; choose a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for the temporary name only
    try:
        yield tmp
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _copy_tokenizer(src: str | Path, dst: Path) -> list[str]:
    src = Path(src)
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    for n in copied:
        shutil.copyfile(src / n, dst / n)
    return copied


# ----------------------------------------------------------------------------- orbax

def convert_orbax(src, out, *, param_dtype: str = "bfloat16", trainable_dtype: str = "float32",
                  beats_checkpoint=None, init_missing_heads: bool = False, layout: str | None = None,
                  allow_pickle: bool = False) -> dict:
    """A PyTorch WAVE checkpoint -> ``out/state`` (orbax) + ``out/config.json`` (see the module doc).
    A backbone without WAVE's heads (Qwen2.5-VL, Omni-Embed-Nemotron: ``BACKBONE_ONLY`` model
    types) is converted as the backbone alone, its config.json copied."""
    precision = Precision.from_names(trainable=trainable_dtype, frozen=param_dtype)
    hf = read_hf_config(src)
    with staged_output(out) as tmp:
        if hf.get("model_type") in BACKBONE_ONLY:
            model, report = load_backbone(src, precision=precision, layout=layout, allow_pickle=allow_pickle)
            save_module(model, tmp, hf)
        else:
            model, report = load_wave(src, beats_checkpoint=beats_checkpoint, precision=precision, layout=layout,
                                      init_missing_heads=init_missing_heads, allow_pickle=allow_pickle)
            save_module(model, tmp, wave_config(model, src))
        tokenizer = _copy_tokenizer(src, tmp)
    return dict(out=str(Path(out).absolute()), tensors=report.loaded, gib=report.nbytes / 2**30, layout=report.layout,
                ignored=report.ignored, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- export

def _checkpoint_dir(workdir: Path) -> Path:
    if not workdir.is_dir():
        raise FileNotFoundError(f"workdir {workdir} does not exist")
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{workdir} has no checkpoints/ directory: not a training workdir "
                                "(omniret_jax.train writes <workdir>/checkpoints/<step>)")
    return ckpt_dir


def export_run(workdir, out, *, step: int | None = None, merged: bool = False) -> dict:
    """A training workdir -> ``out/adapter`` (+ ``out/base``, ``out/merged``); see the module doc."""
    workdir, out = Path(workdir).absolute(), Path(out).absolute()
    ckpt_dir = _checkpoint_dir(workdir)
    c, step = build.saved_config(ckpt_dir, step)
    random_init = c.model.init == "random"
    base_is_torch = not random_init and not is_orbax(c.model.checkpoint)
    with staged_output(out) as tmp:
        mesh = sharding.make_mesh(sharding.MeshConfig(**c.mesh.to_dict()))
        state = build.build_state(c, mesh, train=False)
        marker = {build.TOKENIZER_KEY: build.BYTE_TOKENIZER} if random_init else None
        config_src = None if random_init else c.model.checkpoint
        if base_is_torch:
            base = c.model.checkpoint
        else:  # PyTorch cannot load the run's base: write it (fresh adapters dropped, the heads before training)
            export_safetensors(state.model(), tmp / "base", config_src=config_src, drop_lora=True,
                               config_updates=marker)
            if not random_init:
                _copy_tokenizer(c.model.checkpoint, tmp / "base")
            base = str(out / "base")
        build.restore_trainables(state, c, ckpt_dir, step)
        model = state.model()
        lora = build.lora_config(c)
        export_peft(model, lora, tmp / "adapter", base_model_name_or_path=base, modules_to_save=HEADS)
        if merged:
            export_safetensors(model, tmp / "merged", config_src=config_src, merge_lora=True, config_updates=marker)
            if not random_init:
                _copy_tokenizer(c.model.checkpoint, tmp / "merged")
        info = {"format": EXPORT_FORMAT, "workdir": str(workdir), "step": step, "adapter": "adapter",
                "base": "base" if not base_is_torch else base, "merged": "merged" if merged else None,
                "tokenizer": build.tokenizer_spec(c),
                "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                         "modules": len(lora_modules(model))},
                "modules_to_save": list(HEADS), "config": json.loads(json.dumps(c.to_dict()))}
        (tmp / "export.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# ----------------------------------------------------------------------------- import

def _describe_changes(c, lora) -> list[str]:
    changes = []
    for name, old, new in (("rank", c.lora.rank, lora.rank), ("alpha", c.lora.alpha, lora.alpha),
                           ("dropout", c.lora.dropout, lora.dropout)):
        if float(old) != float(new):
            changes.append(f"lora.{name} {old} -> {new}")
    return changes


def import_adapter(adapter, base, out, *, config=DEFAULT_IMPORT_CONFIG, overrides: dict | None = None,
                   beats_checkpoint: str | None = None) -> dict:
    """A PEFT adapter directory (+ heads as modules_to_save) on the WAVE checkpoint ``base`` ->
    a training workdir ``out`` (see the module doc); ``overrides`` ({"embed.seq_len": 256}) apply
    to ``config`` as ``--config.<key>=<value>`` do. Returns what was taken from where."""
    adapter, base, out = Path(adapter).absolute(), Path(base).absolute(), Path(out).absolute()
    if not Path(str(config).partition(":")[0]).is_file():
        raise FileNotFoundError(f"config file {str(config).partition(':')[0]} does not exist; pass --config")
    try:
        c = build.load_config(config, overrides)
    except TypeError as e:  # ConfigDict refuses a value of another type
        raise ValueError(f"--config override: {e}") from None
    ac = read_adapter_config(adapter)          # names the file on any problem
    if not base.is_dir():
        raise FileNotFoundError(f"--base {base}: no such directory (a WAVE checkpoint: config.json + "
                                "safetensors, or an omniret-convert orbax directory)")
    prec = build.precision(c)
    cfg, beats_cfg = wave_configs(base, precision=prec)
    with staged_output(out) as tmp:
        model = nnx.eval_shape(lambda: WAVE(cfg, beats_cfg, rngs=nnx.Rngs(c.model.seed), remat=c.model.remat))
        lora = import_peft(model, adapter, allowed_modules_to_save=HEADS)
        from_base = tuple(h for h in HEADS if h not in ac.modules_to_save)
        if from_base:
            try:
                heads = load_heads(base, from_base, precision=prec)
            except ConversionError as e:
                raise ConversionError(f"{e}; the adapter ({ac.file}) does not carry them in modules_to_save "
                                      "either") from None
            for name, module in heads.items():
                setattr(model, name, module)
        default = set(select_targets(model, DEFAULT_TARGET)) == set(lora_modules(model))
        changes = _describe_changes(c, lora)
        if not default:
            changes.append(f"lora.target -> the adapter's {len(lora_modules(model))} modules")
        c.lora.rank, c.lora.alpha, c.lora.dropout = lora.rank, float(lora.alpha), float(lora.dropout)
        c.lora.target = "" if default else lora.target
        c.model.init, c.model.checkpoint = "checkpoint", str(base)
        if beats_checkpoint:
            c.model.beats_checkpoint = str(Path(beats_checkpoint).absolute())
        # A base without heads (a plain Qwen2.5-Omni) loads with random ones; the checkpoint's replace them.
        c.model.init_missing_heads = bool(c.model.init_missing_heads or not from_base and _lacks_heads(base))
        try:
            build.tokens_for(c)
        except (OSError, ValueError) as e:
            raise ValueError(f"--base {base}: no tokenizer found there ({type(e).__name__}: {e}); set "
                             "model.tokenizer in --config (a tokenizer directory, or 'bytes')") from None

        _, trainable, _ = build.split_state(model, build.lora_config(c), prec)
        trainable = jax.tree.map(jax.numpy.asarray, trainable)
        opt_state = build.optimizer(c).init(trainable)
        with TrainCheckpointer(tmp / "checkpoints", keep=c.train.keep, save_every=c.train.ckpt_every,
                               config=c.to_dict()) as ckpt:
            ckpt.save(0, trainable, opt_state, rng=jax.random.key(c.train.seed), force=True)
        (tmp / "config.json").write_text(json.dumps(json.loads(json.dumps(c.to_dict())), indent=1) + "\n")
        (tmp / "config.py").write_text(_CONFIG_PY.format(run=out))
        info = {"format": EXPORT_FORMAT, "adapter": str(adapter), "base": str(base), "config": str(config),
                "overrides": dict(overrides or {}),
                "modules_to_save": list(ac.modules_to_save), "heads_from_base": list(from_base),
                "lora": {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                         "modules": len(lora_modules(model)), "default_target": default},
                "changed_from_config": changes, "step": 0}
        (tmp / "import.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _lacks_heads(base: Path) -> bool:
    """A safetensors base without WAVE's heads (an orbax directory always holds them)."""
    if is_orbax(base):
        return False
    try:
        load_heads(base, HEADS[:1])
    except ConversionError:
        return True
    return False


# ----------------------------------------------------------------------------- CLI

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omniret-convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True, metavar="{orbax,export,import}")
    o = sub.add_parser("orbax", help="PyTorch WAVE checkpoint -> orbax directory that train/eval load fast")
    o.add_argument("--src", required=True, help="WAVE (or Qwen2.5-Omni) checkpoint directory: config.json + safetensors")
    o.add_argument("--out", required=True, help="output directory (new or empty)")
    o.add_argument("--param-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the frozen weights (backbone, towers, BEATs)")
    o.add_argument("--trainable-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype of WAVE's trained heads")
    o.add_argument("--beats-checkpoint", default=None, help="unilm BEATs .pt when --src has no beats.* tensors")
    o.add_argument("--init-missing-heads", action="store_true",
                   help="start the fusion head and BEATs adaptor from random init (a plain Qwen2.5-Omni --src)")
    o.add_argument("--layout", default=None, choices=sorted(sum(FAMILY_LAYOUTS.values(), ())),
                   help="key layout (default: detected)")
    o.add_argument("--allow-pickle", action="store_true",
                   help="accept PyTorch .bin pickles (loaded with torch.load(weights_only=True))")
    e = sub.add_parser("export", help="training workdir -> PEFT adapter (+ base, + merged checkpoint) for PyTorch")
    e.add_argument("--workdir", required=True, help="training workdir (holds checkpoints/)")
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    e.add_argument("--out", required=True, help="output directory (new or empty)")
    e.add_argument("--merged", action="store_true", help="also write one full checkpoint with LoRA folded in")
    i = sub.add_parser("import", help="PEFT adapter (+ heads) on a WAVE base -> training workdir")
    i.add_argument("--adapter", required=True, help="PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
    i.add_argument("--base", required=True, help="the WAVE checkpoint the adapter belongs to (safetensors or orbax)")
    i.add_argument("--out", required=True, help="workdir to write (new or empty)")
    i.add_argument("--config", default=str(DEFAULT_IMPORT_CONFIG),
                   help="config file[:preset] of the run (default: configs/omniretriever_7b.py), with "
                        "--config.<key>=<value> overrides as in training; its model and lora sections are set "
                        "from --base and the adapter")
    i.add_argument("--beats-checkpoint", default=None, help="unilm BEATs .pt when --base has no beats.* tensors")
    return p


def _literal(text: str):
    """A --config.<key>=<value> value: a Python literal (256, 1e-5, True, (2, 3)) or else the string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("--src"):
        print("error: omniret-convert takes a command now: orbax | export | import "
              "(the old form is `omniret-convert orbax --src ... --out ...`)", file=sys.stderr)
        return 2
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides = {}
    for arg in rest:
        key, eq, value = arg.partition("=")
        if args.command != "import" or not key.startswith("--config.") or not eq:
            parser.error(f"unrecognized argument {arg!r}" + ("" if args.command != "import" else
                                                               " (overrides are --config.<key>=<value>)"))
        overrides[key[len("--config."):]] = _literal(value)
    t0 = time.perf_counter()
    try:
        if args.command == "orbax":
            r = convert_orbax(args.src, args.out, param_dtype=args.param_dtype, trainable_dtype=args.trainable_dtype,
                              beats_checkpoint=args.beats_checkpoint, init_missing_heads=args.init_missing_heads,
                              layout=args.layout, allow_pickle=args.allow_pickle)
            ignored = ", ".join(f"{k}* ({n})" for k, n in r["ignored"].items()) or "none"
            print(f"converted {r['tensors']} tensors ({r['gib']:.2f} GiB, layout {r['layout']}); ignored: {ignored}; "
                  f"wrote {r['out']} in {time.perf_counter() - t0:.1f} s")
        elif args.command == "export":
            r = export_run(args.workdir, args.out, step=args.step, merged=args.merged)
            parts = ["adapter/"] + (["base/"] if r["base"] == "base" else []) + (["merged/"] if r["merged"] else [])
            print(f"exported step {r['step']} of {r['workdir']}: {', '.join(parts)} in {Path(args.out).absolute()} "
                  f"({r['lora']['modules']} LoRA modules, heads {', '.join(r['modules_to_save'])}; base "
                  f"{r['base']}) in {time.perf_counter() - t0:.1f} s")
        else:
            r = import_adapter(args.adapter, args.base, args.out, config=args.config, overrides=overrides,
                               beats_checkpoint=args.beats_checkpoint)
            print(f"imported {r['lora']['modules']} LoRA modules (r={r['lora']['rank']}, alpha={r['lora']['alpha']}) "
                  f"and heads {', '.join(r['modules_to_save']) or 'none'} from the adapter"
                  f"{', ' + ', '.join(r['heads_from_base']) + ' from the base' if r['heads_from_base'] else ''}; "
                  f"changed from {r['config']}: {'; '.join(r['changed_from_config']) or 'nothing'}; wrote "
                  f"{Path(args.out).absolute()} (step 0) in {time.perf_counter() - t0:.1f} s")
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
