"""Host time, device time and their overlap in the training loop: the synchronous loop against
the asynchronous one.

Runs ``omniret_jax.train.train`` on ``--config`` (with ``--config.<key>=<value>`` overrides, as
the trainer takes them) for ``--updates`` updates twice, in fresh workdirs on one synthetic
corpus: ``train.prefetch=0`` (build, step, read back, every micro-batch) and
``train.prefetch=--prefetch`` (a producer thread runs ahead, metrics read at log steps only).
Per run it takes the trainer's own metrics.jsonl figures, each the median over its log window,
and reports their median over the windows after the first (which compiles):
- host_s: producer seconds per micro-batch (pipeline + layout + transfer to the devices);
- device_s: seconds of a step started on an idle device (dispatch to ready), per micro-batch;
- wall_s: seconds per update (``step_time_s``), over ``optim.accumulate`` micro-batches.
overlap = (host + device - wall_async) / min(host, device), with host and device of the
synchronous run (measured without the other competing): 1 when the shorter one hides entirely
behind the longer, 0 when the asynchronous loop is no faster than doing one after the other.
With accumulate 1 a step is a micro-batch. On CPU the "device" is the same cores the host
work runs on, so the overlap there is bounded by the spare cores. The last line is one JSON object.

COMMAND: python bench/train_loop.py --config configs/tiny.py --updates 40
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from omniret_jax import build  # noqa: E402
from omniret_jax import train as trainer  # noqa: E402
from bench.report import emit  # noqa: E402

build.define_config_flag()
flags.DEFINE_integer("updates", 40, "optimizer updates per run")
flags.DEFINE_integer("log_every", 5, "updates per metrics window (the asynchronous loop reads back only there)")
flags.DEFINE_integer("prefetch", 2, "train.prefetch of the asynchronous run")
flags.DEFINE_string("workdir", None, "runs go here (default: a temporary directory)")
flags.DEFINE_string("json", None, "also write the JSON result here")


def run(c, workdir: Path) -> dict[str, float]:
    trainer.train(c, workdir)
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()][1:]
    if not lines:
        raise ValueError(f"--updates={c.train.steps} gives one metrics window (--log_every={c.train.log_every}); "
                         "the first compiles: run at least two")
    pick = lambda key: statistics.median(m[key] for m in lines if key in m)  # noqa: E731
    return {"host_s": pick("host_s"), "device_s": pick("device_s"), "wall_s": pick("step_time_s")}


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    base = flags.FLAGS.config
    if base is None:
        raise app.UsageError("--config configs/<x>.py is required")
    out = Path(flags.FLAGS.workdir or tempfile.mkdtemp(prefix="train_loop_"))
    corpus = trainer.manifest_path(base, out)   # generated once, read by both runs
    result: dict[str, object] = {"config": config_flags.get_config_filename(flags.FLAGS["config"]),
                                 "updates": flags.FLAGS.updates, "accumulate": int(base.optim.accumulate),
                                 "batch_size": int(base.train.batch_size)}
    for name, depth in (("sync", 0), ("async", flags.FLAGS.prefetch)):
        c = base.copy_and_resolve_references()
        c.data.manifest = str(corpus)
        c.train.steps, c.train.log_every, c.train.prefetch = flags.FLAGS.updates, flags.FLAGS.log_every, depth
        c.train.ckpt_every = flags.FLAGS.updates   # one save, at the end
        for k, v in run(c, out / name).items():
            result[f"{name}_{k}"] = round(v, 5)
    host, device = result["sync_host_s"], result["sync_device_s"]
    result["overlap"] = round((host + device - result["async_wall_s"]) / min(host, device), 3)
    result["speedup"] = round(result["sync_wall_s"] / result["async_wall_s"], 3)
    emit(result, flags.FLAGS.json)


if __name__ == "__main__":
    app.run(main)
