"""Several hosts: two processes on this machine (jax.distributed on 127.0.0.1, CPU collectives,
4 virtual CPU devices each) against one process with 8 devices, on a data=8 mesh.

- Quick (default run): tests/multihost_worker.py in each process builds its rows of 3 global
  batches (pipeline, augmentations, host layouts with the hard negatives of all three slots from
  the exchanged row metadata), gathers rows across processes on the devices, places replicated
  and sharded values; the two halves concatenated equal the one-process arrays exactly. The
  corpus holds one sliver clip: its global batch takes the larger patch bucket in both processes.
- Slow: the train CLI with --config.distributed.* in two processes vs the CLI in one process:
  same losses (1e-6 relative) and trainables (1e-5 relative), printed with the wall times; the
  same for the GVE curriculum (configs/gve_tiny.py:pyramid), its two-process run stopped and
  resumed, with the same probe scores (1e-5 absolute) and task sequence.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from omniret_jax.data.manifest import ManifestRecord, read_manifest, write_manifest
from omniret_jax.data.synth import SynthSettings, generate, write_mp4
from tests import multihost_worker

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=str(REPO))
    return env


def _run_all(commands: list[list[str]], devices: int, timeout: int, cwd=REPO) -> tuple[list[str], float]:
    """Starts the commands together, waits for all (killing all on timeout); returns their outputs."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=cwd, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for cmd in commands]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    elapsed = time.perf_counter() - t0
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, f"exit {p.returncode}:\n{text[-4000:]}"
    return outputs, elapsed


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    """16 synthetic 64x64 clips and one 24x72 sliver that smart_resize rounds up to 64 patch rows
    (the tiny config's buckets are 32 and 232): a global batch holding it takes the larger bucket
    in both processes, though only one of them has the sliver."""
    out = tmp_path_factory.mktemp("mh_corpus")
    generate(str(out), 16, seed=3, settings=SynthSettings(seconds=2.0, size=64), progress=False)
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (20, 24, 72, 3), dtype=np.uint8)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)).astype(np.float32)
    write_mp4(str(out / "clips" / "sliver.mp4"), frames, tone)
    records = read_manifest(out / "manifest.jsonl") + [
        ManifestRecord(id="sliver", caption="a thin strip of noise with a tone", video=str(out / "clips" / "sliver.mp4"))]
    write_manifest(out / "manifest.jsonl", records)
    return str(out / "manifest.jsonl")


def test_two_processes_build_the_same_global_batch(manifest, tmp_path):
    port = _free_port()
    worker = str(REPO / "tests" / "multihost_worker.py")
    outputs, elapsed = _run_all([[sys.executable, worker, str(port), str(i), str(tmp_path), manifest]
                                 for i in range(2)], devices=4, timeout=600)
    print("".join(o.splitlines()[-1] + "\n" for o in outputs) + f"two processes: {elapsed:.1f} s")
    halves = [dict(np.load(tmp_path / f"p{i}.npz")) for i in range(2)]
    assert jax.device_count() == 8
    whole = multihost_worker.compute(manifest)
    assert halves[0]["rows"].tolist() == [0, 4] and halves[1]["rows"].tolist() == [4, 8]
    assert whole["rows"].tolist() == [0, 8]
    keys = sorted(k for k in whole if k not in ("rows", "reduced"))
    assert keys == sorted(k for k in halves[0] if k not in ("rows", "reduced"))
    for key in keys:
        np.testing.assert_array_equal(np.concatenate([halves[0][key], halves[1][key]]), whole[key], err_msg=key)
    for half in halves:
        np.testing.assert_array_equal(half["reduced"], whole["reduced"])
    # the hard negatives really cross the process boundary: some rows of process 0 take another's
    cross = [k for k in range(multihost_worker.BATCHES) if (halves[0][f"b{k}.neg_rows"] >= 4).any()]
    assert cross, "no hard negative of process 0 came from process 1's rows"
    # the patch bucket is the global batch's: both processes cut to 232 where only one holds the sliver
    sizes = [whole[f"b{k}.video_patches"].shape[1] for k in range(multihost_worker.BATCHES)]
    assert set(sizes) == {32, 232}, sizes
    alone = [k for k in range(multihost_worker.BATCHES) if sizes[k] == 232 and
             min(np.prod(h[f"b{k}.video_grid_thw"], axis=1).max() for h in halves) <= 32]
    assert alone, "no batch where only one process needed the larger patch bucket"
    print(f"{len(keys)} arrays equal; micro-batches with cross-process negatives: {cross}; patch rows per "
          f"micro-batch {sizes} (one process alone needed 232 in {alone})")


def _train_cmd(workdir: Path, manifest: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omniret_jax.train", "--config", "configs/tiny.py", "--workdir", str(workdir),
            f"--config.data.manifest={manifest}", "--config.train.steps=3", "--config.train.batch_size=8",
            "--config.train.log_every=1", "--config.train.ckpt_every=3", "--config.mesh.data=8", *extra]


def _trainables(workdir: Path, step: int, config: str) -> dict[str, np.ndarray]:
    from omniret_jax import build
    from omniret_jax.checkpoint import TrainCheckpointer

    c = build.load_config(f"{REPO / 'configs'}/{config}")
    _, trainable, _ = build.split_state(build.attach_lora(build.random_model(c), c, train=True),
                                        build.lora_config(c), build.precision(c))
    with TrainCheckpointer(workdir / "checkpoints") as ckpt:
        r = ckpt.restore(step, trainable)
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(r.trainables))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _trainables_differ(one: Path, two: Path, step: int, config: str = "tiny.py") -> tuple[int, str, float]:
    """(leaves, the worst leaf, its relative L2 difference) of two workdirs' trainables at ``step``."""
    p1, p2 = _trainables(one, step, config), _trainables(two, step, config)
    assert p1.keys() == p2.keys()
    rel = {k: float(np.linalg.norm(p2[k] - p1[k]) / max(np.linalg.norm(p1[k]), 1e-30)) for k in p1}
    worst = max(rel, key=rel.get)
    return len(rel), worst, rel[worst]


@pytest.mark.slow
def test_two_process_training_matches_one_process(manifest, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _, t_one = _run_all([_train_cmd(one, manifest)], devices=8, timeout=1200)
    port = _free_port()
    _, t_two = _run_all([_train_cmd(two, manifest, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                                    "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}")
                         for i in range(2)], devices=4, timeout=1200)
    m1, m2 = _metrics(one), _metrics(two)
    assert [m["step"] for m in m1] == [m["step"] for m in m2] == [1, 2, 3]
    worst_loss = 0.0
    for a, b in zip(m1, m2):
        for k in ("loss", "L_A", "L_D", "L_T", "grad_norm"):
            rel = abs(a[k] - b[k]) / abs(a[k])
            worst_loss = max(worst_loss, rel)
            assert rel <= 1e-6, (a["step"], k, a[k], b[k])
    n, worst, rel = _trainables_differ(one, two, 3)
    print(f"losses {[round(m['loss'], 6) for m in m1]} vs {[round(m['loss'], 6) for m in m2]}: worst relative "
          f"difference {worst_loss:.2e}; {n} trainable leaves, worst {rel:.2e} ({worst}); wall time "
          f"one process {t_one:.0f} s, two processes {t_two:.0f} s")
    assert rel <= 1e-5


def _curriculum_cmd(workdir: Path, corpus: str, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "omniret_jax.train", "--config", "configs/gve_tiny.py:pyramid", "--workdir",
            str(workdir), f"--config.data.manifest={corpus}", f"--config.train.steps={steps}",
            "--config.train.batch_size=8", "--config.train.log_every=1", "--config.train.ckpt_every=2",
            "--config.curriculum.probe_every=2", "--config.curriculum.unlock_threshold=-1.0", "--config.mesh.data=8",
            *extra]


@pytest.mark.slow
def test_two_process_curriculum_matches_one_process(tmp_path):
    """The Modality Pyramid in two processes (every process embeds the probe subsets' rows it holds,
    the embeddings are gathered, each process scores and draws the same tasks), stopped at update 2
    and resumed to 4, against one process straight to 4: the same probes, tasks, losses and
    trainables."""
    from omniret_jax.data.synth import SynthSettings, generate_tasks

    generate_tasks(str(tmp_path / "corpus"), 8, settings=SynthSettings(seconds=1.0, size=64), progress=False)
    corpus = str(tmp_path / "corpus" / "manifest.jsonl")
    one, two = tmp_path / "one", tmp_path / "two"
    _, t_one = _run_all([_curriculum_cmd(one, corpus, 4)], devices=8, timeout=1200)
    t_two = 0.0
    for steps in (2, 4):
        port = _free_port()
        outputs, t = _run_all([_curriculum_cmd(two, corpus, steps, "--config.distributed.coordinator_address="
                                               f"127.0.0.1:{port}", "--config.distributed.num_processes=2",
                                               f"--config.distributed.process_id={i}") for i in range(2)],
                              devices=4, timeout=1200)
        t_two += t
    assert "resumed from update 2" in outputs[0]
    m1, m2 = _metrics(one), _metrics(two)
    probes = [[(m["step"], {k: v for k, v in m.items() if k.startswith("probe/")}) for m in ms
               if "probe/t2v/alignment" in m] for ms in (m1, m2)]
    assert [u for u, _ in probes[0]] == [u for u, _ in probes[1]] == [0, 2]
    worst_probe = 0.0
    for (_, a), (_, b) in zip(*probes):
        assert a.keys() == b.keys()
        worst_probe = max([worst_probe] + [abs(a[k] - b[k]) for k in a])
    assert worst_probe <= 1e-5, probes
    steps = [[m for m in ms if "loss" in m] for ms in (m1, m2)]
    tasks = [[next(k for k in m if k.startswith("L_A/")) for m in ms] for ms in steps]
    assert tasks[0] == tasks[1] and len(tasks[0]) == 4
    worst_loss = max(abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(*steps))
    assert worst_loss <= 1e-6, steps
    n, worst, rel = _trainables_differ(one, two, 4, "gve_tiny.py:pyramid")
    print(f"tasks {tasks[0]}; probe scores worst abs difference {worst_probe:.1e}, losses {worst_loss:.1e} relative; "
          f"{n} trainable leaves, worst {rel:.1e} ({worst}); wall time one process {t_one:.0f} s, "
          f"two processes (2 + resumed 2 updates) {t_two:.0f} s")
    assert rel <= 1e-5
