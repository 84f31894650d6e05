"""``python -m omniret_jax.eval [--config configs/<x>.py] --checkpoint WORKDIR|STEP_DIR|none
--manifest M.jsonl --out OUTDIR [--mode first|all] [--block 1024] [--compression] [--paths TVA]``.

Rebuilds the config's model (random tiny init, or load_wave for a real checkpoint), restores
the trained LoRA + heads from a training workdir (newest step), its checkpoints/ directory or
one step directory (``none`` evaluates the untrained "frozen" backbone), embeds the manifest's
gallery through every path the directions need, caches the vectors in
OUTDIR/embeddings.safetensors and writes OUTDIR/results.json and OUTDIR/results.md (12
directions: R@1/5/10, NDCG@10, MRR, MedR; AVG single/dual/all of R@1; optional compression
table). Config overrides work as in training: ``--config.embed.text_len=256``. Without
``--config`` the config saved with the checkpoint step is used (a training workdir, or one
written by ``omniret-convert import``). ``--paths`` embeds and caches more paths than the
directions need (TVA, which no direction scores). ``--by_task``: every task of a multi-task manifest
(and of benchmark manifests; several as a comma-separated --manifest) scored in its own direction,
grouped as UVRB reports it (eval.tasks: OUTDIR/results_tasks.json and .md).

COMMAND: python -m omniret_jax.eval --config configs/tiny.py --checkpoint /tmp/run --manifest /tmp/run/corpus/manifest.jsonl --out /tmp/run/eval
COMMAND: python -m omniret_jax.eval --checkpoint /tmp/run --manifest /tmp/run/corpus/manifest.jsonl --out /tmp/run/eval
COMMAND: python -m omniret_jax.eval --config configs/gve_tiny.py:pyramid --checkpoint /tmp/gve_pyramid --manifest /tmp/gve_pyramid/corpus/manifest.jsonl --out /tmp/gve_pyramid/eval --by_task
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from omniret_jax.build import define_config_flag, saved_config
from omniret_jax.checkpoint import CheckpointError
from omniret_jax.eval.embed import evaluate_checkpoint, resolve_checkpoint
from omniret_jax.eval.tasks import evaluate_tasks

define_config_flag()
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir, its checkpoints/ dir, one step dir, "
                                  "or 'none' for the untrained (frozen) model")
_MANIFEST = flags.DEFINE_string("manifest", None, "JSONL manifest of the gallery")
_OUT = flags.DEFINE_string("out", None, "output directory (embedding cache, results.json, results.md)")
_MODE = flags.DEFINE_enum("mode", "first", ["first", "all"], "first caption per clip, or every caption")
_BLOCK = flags.DEFINE_integer("block", 1024, "query rows scored at a time")
_BATCH = flags.DEFINE_integer("batch_size", None, "clips per embedding batch (default: config.train.batch_size)")
_DIRECTIONS = flags.DEFINE_list("directions", None, "subset of the 12 directions, e.g. T->V,V->T (default all)")
_COMPRESSION = flags.DEFINE_boolean("compression", False, "add the compression table (paper Appendix G)")
_SEEDS = flags.DEFINE_list("compression_seeds", ["0", "1", "2", "3", "4"], "seeds of the random dimension subsets")
_RECOMPUTE = flags.DEFINE_boolean("recompute", False, "ignore a cached embedding file in --out")
_BY_TASK = flags.DEFINE_boolean("by_task", False, "score each manifest task in its direction, grouped per query "
                                "kind and ability (UVRB); --manifest may list several, comma-separated")
_PATHS = flags.DEFINE_list("paths", [], "embedding paths to embed and cache beside the directions' (e.g. TVA)")


def _config(checkpoint: str):
    """--config, else the config the checkpoint step was saved with."""
    if flags.FLAGS.config is not None:
        return flags.FLAGS.config
    ref = resolve_checkpoint(checkpoint)
    if ref.directory is None:
        raise ValueError("--checkpoint none has no saved config: pass --config")
    return saved_config(ref.directory, ref.step)[0]


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [f"--{n}" for n, v in (("checkpoint", _CHECKPOINT.value), ("manifest", _MANIFEST.value),
                                     ("out", _OUT.value)) if v is None]
    if missing:
        raise app.UsageError(f"{', '.join(missing)} required")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    try:
        if _BY_TASK.value:
            result = evaluate_tasks(_config(_CHECKPOINT.value), _CHECKPOINT.value, _MANIFEST.value.split(","),
                                    _OUT.value, batch_size=_BATCH.value)
            for t, r in result["tasks"].items():
                print(f"{t} ({r['direction']}, {r['group']}, {r['ability']}): R@1 {r['R@1']:.2f}")
            for name, value in (result["groups"] | result["abilities"]).items():
                print(f"{name}: R@1 {value:.2f}")
            print(f"wrote {_OUT.value}/results_tasks.json and results_tasks.md")
            return
        seeds = [int(s) for s in _SEEDS.value]
        result = evaluate_checkpoint(
            _config(_CHECKPOINT.value), _CHECKPOINT.value, _MANIFEST.value, _OUT.value, mode=_MODE.value,
            block=_BLOCK.value, batch_size=_BATCH.value, directions=_DIRECTIONS.value, compression=_COMPRESSION.value,
            compression_seeds=seeds, recompute=_RECOMPUTE.value, extra_paths=_PATHS.value)
    except (ValueError, KeyError, FileNotFoundError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for name, value in result["averages"].items():
        print(f"{name}: R@1 {value:.2f}")
    print(f"wrote {_OUT.value}/results.json and results.md")


if __name__ == "__main__":
    app.run(main)
