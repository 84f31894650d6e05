"""The train step and the training loop on the tiny random-init WAVE (configs/tiny.py).

Runs on the 8 virtual CPU devices of conftest.py; the batch is omniret_jax.data.random_batch's
random batch in DataPipeline's format, or the synthetic corpus for train().
- Sharding: two jitted steps of the full preset (LoRA B non-zero, adapter dropout on; step 0
  has lr 0 under the warm-up, step 1 moves every trainable) on mesh 2x2x2 (8x1x1 and 1x4x2 in
  the slow run) equal the 1x1x1 run within 1e-5 relative: loss terms, grad norm, every
  trainable leaf and the Adam moments (relative = ||a - b|| / ||b|| per leaf).
- Negatives: the sharded loss equals the global-batch loss of the step's embeddings and is
  far from the mean of per-shard losses.
- Non-finite input: the update is skipped bitwise; train() skips such steps, resets the count
  after a good one and aborts after train.max_nonfinite consecutive ones (slow).
- Bad input: batch of 1 with L_T, mesh/batch mismatches, unknown CLI config key.
- Resume (slow; test_checkpoint.py's bitwise resume runs by default): step 2 of an uninterrupted
  run, continued by train() in a fresh workdir, ends bitwise equal at step 4; SIGTERM mid-run,
  then continue; CLI smoke (pairwise preset).
- The asynchronous loop (train.prefetch > 0, the default): the producer's order, exceptions (with
  the producer's frames) and shutdown; reads back two values per logged update, none per
  micro-batch; slow: bitwise the same run as train.prefetch=0 through a late-found NaN (rewind).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from omniret_jax import build, sharding
from omniret_jax import train as trainer
from omniret_jax.checkpoint import TrainCheckpointer
from omniret_jax.data import batch as batch_mod
from omniret_jax.data.batch import build_inputs
from omniret_jax.data.random_batch import random_batch
from omniret_jax.data.synth import SynthSettings, generate
from omniret_jax.losses import compute_losses, needed_views
from omniret_jax.model.lora import lora_modules, trainable_filter
from omniret_jax.step import StepConfig, embeddings, train_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.py"
TOL = 1e-5
B = 8


def _flat(tree) -> dict[str, np.ndarray]:
    """{dotted path: host array} of a state / optimizer tree."""
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
    return {jax.tree_util.keystr(p, simple=True, separator="."): np.asarray(x) for p, x in leaves}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| (Frobenius, per leaf)."""
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


# ----------------------------------------------------------------------------- the step on a mesh

def _config():
    """configs/tiny.py full preset over 4 steps (warm-up 1: lr 0 at step 0, the peak at step 1)."""
    return build.load_config(f"{TINY}:full", {"train.steps": 4})


@dataclasses.dataclass
class Setup:
    c: object
    model: object
    graphdef: object
    trainable: object
    frozen: object
    wrt: object
    tx: object
    cfg: StepConfig
    hosts: list      # TrainInputs of steps 0 and 1
    keys: list       # dropout keys of steps 0 and 1


def _lora_model(c, *, nonzero_b: bool):
    """The model exactly as train.py builds it; optionally with random LoRA B so every adapter gets gradient."""
    model = build.attach_lora(build.random_model(c), c, train=True)
    if nonzero_b:
        for i, (_, linear) in enumerate(sorted(lora_modules(model).items())):
            key = jax.random.fold_in(jax.random.key(123), i)
            linear.lora_b.set_value(0.05 * jax.random.normal(key, linear.lora_b.shape))
    return model, trainable_filter(build.lora_config(c))


@pytest.fixture(scope="module")
def setup() -> Setup:
    c = _config()
    model, wrt = _lora_model(c, nonzero_b=True)
    graphdef, trainable, frozen = build.split_state(model, build.lora_config(c), build.precision(c))
    lcfg, ecfg = build.loss_config(c), build.embed_config(c)
    hosts = [build_inputs(random_batch(c, B, seed=s), s, model.cfg, build.tokens_for(c), ecfg, needed_views(lcfg),
                          seed=c.train.seed) for s in (0, 1)]
    keys = [jax.random.fold_in(jax.random.key(c.train.seed), s) for s in (0, 1)]
    return Setup(c, model, graphdef, trainable, frozen, wrt, build.optimizer(c), StepConfig(ecfg=ecfg, loss=lcfg),
                 hosts, keys)


@dataclasses.dataclass
class MeshRun:
    fn: object           # the jitted step (donates parameters and optimizer state, as train.py)
    mesh: object
    shardings: tuple     # (trainable, optimizer state)
    frozen: object       # frozen state on the mesh
    params: list         # host trainables before step 0, after step 0, after step 1
    opts: list           # host optimizer states, likewise
    metrics: list        # host metrics of steps 0 and 1

    def __call__(self, params, opt, host_inputs, step, key):
        """One step from host trees; returns host (trainables, optimizer state, metrics)."""
        param_sh, opt_sh = self.shardings
        out = self.fn(jax.device_put(params, param_sh), self.frozen, jax.device_put(opt, opt_sh),
                      sharding.shard_batch(host_inputs, self.mesh), np.int32(step), key)
        return jax.device_get(out)


def _run_on_mesh(s: Setup, shape: tuple[int, int, int]) -> MeshRun:
    """Two steps placed and jitted the way train.py does it."""
    mesh = sharding.make_mesh(sharding.MeshConfig(*shape), jax.devices()[:math.prod(shape)])
    placed = build.place(s.model, s.c, mesh, tokens=build.tokens_for(s.c))
    trainable, frozen = placed.trainable, placed.frozen
    param_sh, frozen_sh = placed.trainable_shardings, placed.frozen_shardings
    replicated = NamedSharding(mesh, PartitionSpec())
    opt = jax.tree.map(lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated),
                       jax.jit(s.tx.init)(trainable))
    opt_sh = jax.tree.map(lambda x: x.sharding, opt)
    in_sh = jax.tree.map(lambda x: x.sharding, sharding.shard_batch(s.hosts[0], mesh))

    def step_fn(params, frozen_state, opt_state, inputs, step, key):
        return train_step(s.graphdef, params, frozen_state, opt_state, inputs, step, key, wrt=s.wrt, tx=s.tx,
                          cfg=s.cfg)

    fn = jax.jit(step_fn, in_shardings=(param_sh, frozen_sh, opt_sh, in_sh, replicated, replicated),
                 out_shardings=(param_sh, opt_sh, replicated), donate_argnums=(0, 2))
    run = MeshRun(fn, mesh, (param_sh, opt_sh), frozen, [jax.device_get(trainable)], [jax.device_get(opt)], [])
    for i, host in enumerate(s.hosts):
        p, o, m = run(run.params[-1], run.opts[-1], host, i, s.keys[i])
        run.params.append(p)
        run.opts.append(o)
        run.metrics.append({k: float(v) for k, v in m.items()})
    return run


@pytest.fixture(scope="module")
def runs(setup):
    cache: dict[tuple, MeshRun] = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = _run_on_mesh(setup, shape)
        return cache[shape]

    return get


@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2),
                                   pytest.param((1, 4, 2), marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(runs, shape):
    ref, got = runs((1, 1, 1)), runs(shape)
    for i in range(2):
        for k in ("loss", "grad_norm", "L_A", "L_D", "L_T"):
            err = abs(got.metrics[i][k] - ref.metrics[i][k]) / abs(ref.metrics[i][k])
            print(f"mesh {shape} step {i} {k}: {got.metrics[i][k]:.6f} vs {ref.metrics[i][k]:.6f} rel {err:.2e}")
            assert err <= TOL, (shape, i, k, err)
        assert got.metrics[i]["skipped"] == ref.metrics[i]["skipped"] == 0
    before, after_ref, after = _flat(ref.params[0]), _flat(ref.params[2]), _flat(got.params[2])
    assert after.keys() == after_ref.keys()
    lora_leaves = [k for k in after if "lora_" in k]
    assert len(lora_leaves) == 2 * 3 * 2, lora_leaves  # a and b on q/k/v of both layers
    worst, worst_update = 0.0, 0.0
    for k, ref_v in after_ref.items():
        moved = ref_v - before[k]
        assert np.any(moved != 0), f"{k} did not move in step 1"
        err, err_update = _rel(after[k], ref_v), _rel(after[k] - before[k], moved)
        assert err <= TOL, f"mesh {shape}: {k} differs by {err:.2e} (relative)"
        # Adam divides by |g|, which amplifies gradient rounding on near-zero entries: 10x looser.
        assert err_update <= 10 * TOL, f"mesh {shape}: the step-1 update of {k} differs by {err_update:.2e}"
        worst, worst_update = max(worst, err), max(worst_update, err_update)
    opt_ref, opt = _flat(ref.opts[2]), _flat(got.opts[2])
    worst_opt = max(_rel(opt[k], v) for k, v in opt_ref.items() if v.ndim)
    assert worst_opt <= TOL, f"mesh {shape}: Adam moments differ by {worst_opt:.2e}"
    print(f"mesh {shape}: {len(after)} trainable leaves, worst rel err {worst:.2e} (of the step-1 update "
          f"{worst_update:.2e}); Adam moments {worst_opt:.2e}")


@pytest.fixture(scope="module")
def step0_embeddings(setup) -> dict[str, np.ndarray]:
    """Step 0's embeddings without gradients (same merge, same dropout reseed), on one device."""
    @jax.jit
    def emb(trainable, frozen, inputs, key):
        model = nnx.merge(setup.graphdef, trainable, frozen)
        nnx.reseed(model, dropout=key)
        return embeddings(model, inputs, setup.cfg.ecfg)

    dev = jax.devices()[0]
    return jax.device_get(emb(jax.device_put(setup.trainable, dev), jax.device_put(setup.frozen, dev),
                              jax.device_put(setup.hosts[0], dev), setup.keys[0]))


@pytest.mark.parametrize("shape", [pytest.param((8, 1, 1), marks=pytest.mark.slow), (2, 2, 2)])
def test_negatives_span_global_batch(setup, runs, step0_embeddings, shape):
    emb = step0_embeddings
    global_loss = float(compute_losses(emb, 0, setup.cfg.loss)[0])
    shards = math.prod(shape[:2])
    rows = np.split(np.arange(B), shards)
    per_shard = float(np.mean([compute_losses({k: v[r] for k, v in emb.items()}, 0, setup.cfg.loss)[0]
                               for r in rows]))
    single, sharded = runs((1, 1, 1)).metrics[0]["loss"], runs(shape).metrics[0]["loss"]
    print(f"mesh {shape}: step loss {sharded:.6f}, single device {single:.6f}, global-batch loss of the "
          f"embeddings {global_loss:.6f}, mean of {shards} per-shard losses {per_shard:.6f}")
    assert abs(global_loss - single) <= TOL * abs(single)
    assert abs(sharded - global_loss) <= TOL * abs(global_loss)
    assert abs(sharded - per_shard) > 0.1 * abs(global_loss), "loss looks computed per shard"


@pytest.mark.parametrize("where", ["mel", "video_patches"])
def test_nonfinite_input_skips_update_bitwise(setup, runs, where):
    run = runs((1, 1, 1))
    host = setup.hosts[1]
    bad = getattr(host.anchor, where).copy()
    bad[3] = np.nan if where == "mel" else np.inf
    poisoned = dataclasses.replace(host, anchor=dataclasses.replace(host.anchor, **{where: bad}))
    params, opt = run.params[2], run.opts[2]
    new_params, new_opt, m = run(params, opt, poisoned, 2, setup.keys[1])
    print(f"{where} poisoned: loss {float(m['loss'])}, skipped {int(m['skipped'])}")
    assert not np.isfinite(m["loss"]) and int(m["skipped"]) == 1
    for name, new, old in (("trainables", new_params, params), ("optimizer state", new_opt, opt)):
        new, old = _flat(new), _flat(old)
        assert new.keys() == old.keys()
        for k in old:
            assert new[k].tobytes() == old[k].tobytes(), f"{name} leaf {k} changed on a skipped step"


def test_batch_of_one_has_no_derangement():
    c = _config()
    model = build.random_model(c)
    with pytest.raises(ValueError, match="batch of 1 is too small for a derangement"):
        build_inputs(random_batch(c, 1, seed=0), 0, model.cfg, build.tokens_for(c), build.embed_config(c),
                     needed_views(build.loss_config(c)), seed=0)


# ----------------------------------------------------------------------------- train()

@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    generate(str(out), 8, seed=0, settings=SynthSettings(seconds=2.0, size=64), progress=False)
    return out / "manifest.jsonl"


def _train_config(manifest: Path):
    """_config() on the 8-clip corpus: batch 8 on a 2x2x2 mesh, a metrics line and a stop poll every step."""
    c = _config()
    c.data.manifest = str(manifest)
    c.train.batch_size, c.train.log_every, c.train.ckpt_every, c.train.stop_every = B, 1, 100, 1
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    return c


def _metrics(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _poison(steps: set[int]):
    """build_inputs that puts NaN into the anchor's mel on the given steps."""
    def build(batch, step, *args, **kwargs):
        out = batch_mod.build_inputs(batch, step, *args, **kwargs)
        if step in steps:
            out.anchor.mel[0, :, :5] = np.nan
        return out
    return build


def _restored(c, workdir: Path, step: int):
    """A saved step, restored into trees built like train.py's."""
    model, wrt = _lora_model(c, nonzero_b=False)
    _, trainable, _ = build.split_state(model, build.lora_config(c), build.precision(c))
    opt = jax.jit(build.optimizer(c).init)(trainable)
    with TrainCheckpointer(workdir / "checkpoints") as ckpt:
        return ckpt.restore(step, trainable, opt)


def _restore(c, workdir: Path, step: int):
    """Host (trainables, optimizer state) of a saved step."""
    r = _restored(c, workdir, step)
    return _flat(r.trainables), _flat(r.opt_state)


def _saved_steps(workdir: Path) -> list[int]:
    with TrainCheckpointer(workdir / "checkpoints") as ckpt:
        return ckpt.all_steps()


def _assert_same_state(c, a: Path, b: Path, step: int) -> int:
    (pa, oa), (pb, ob) = _restore(c, a, step), _restore(c, b, step)
    assert pa.keys() == pb.keys() and oa.keys() == ob.keys()
    assert any("lora_b" in k and np.any(v != 0) for k, v in pa.items())  # training moved the adapters
    for k in pa:
        assert pa[k].tobytes() == pb[k].tobytes(), f"trainable {k} differs after resume"
    for k in oa:
        assert oa[k].tobytes() == ob[k].tobytes(), f"optimizer leaf {k} differs after resume"
    return len(pa)


@pytest.fixture(scope="module")
def straight(manifest, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run that saves steps 2 and 4."""
    c = _train_config(manifest)
    c.train.ckpt_every = 2
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train(c, workdir)
    assert _saved_steps(workdir) == [2, 4]
    assert [m["step"] for m in _metrics(workdir)] == [1, 2, 3, 4]
    return workdir


@pytest.mark.slow  # ~2 min on 2 cores with its fixture; test_checkpoint.py's bitwise resume is in the default run
def test_resume_is_bitwise(manifest, straight, tmp_path):
    """A fresh workdir holding only step 2 of the straight run trains on to step 4 bitwise equal."""
    c = _train_config(manifest)
    shutil.copytree(straight / "checkpoints" / "2", tmp_path / "checkpoints" / "2")
    trainer.train(c, tmp_path)
    assert _saved_steps(tmp_path) == [2, 4]
    a, b = _metrics(straight), _metrics(tmp_path)
    assert [(m["step"], m["loss"]) for m in a[2:]] == [(m["step"], m["loss"]) for m in b], (a, b)
    n = _assert_same_state(c, straight, tmp_path, 4)
    print(f"resume from step 2: losses {[round(m['loss'], 6) for m in a]}; {n} trainable leaves and the "
          "optimizer state bitwise equal at step 4")


@pytest.mark.slow
def test_sigterm_saves_then_resume_is_bitwise(manifest, straight, tmp_path, monkeypatch):
    """SIGTERM during step 1: train() saves step 2 and returns; a second train() finishes the run.
    The interrupted run is synchronous (train.prefetch=0: the producer thread would lay step 1 out,
    and send the signal, while step 0 runs); the resumed one asynchronous."""
    c = _train_config(manifest)
    c.train.prefetch = 0

    def stop_during_step_1(batch, step, *args, **kwargs):
        if step == 1:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler installed"
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_mod.build_inputs(batch, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_inputs", stop_during_step_1)
    trainer.train(c, tmp_path)
    assert _saved_steps(tmp_path) == [2]
    monkeypatch.setattr(trainer, "build_inputs", batch_mod.build_inputs)
    c.train.prefetch = 2
    trainer.train(c, tmp_path)
    assert _saved_steps(tmp_path) == [2, 4]
    a, b = _metrics(straight), _metrics(tmp_path)
    assert [(m["step"], m["loss"]) for m in a] == [(m["step"], m["loss"]) for m in b], (a, b)
    n = _assert_same_state(c, straight, tmp_path, 4)
    print(f"SIGTERM at step 1, resumed: {n} trainable leaves and the optimizer state bitwise equal at step 4")


@pytest.mark.slow
def test_train_skips_nonfinite_steps_and_aborts_after_max_nonfinite(manifest, tmp_path, monkeypatch):
    """NaN on micro-batches 0, 2, 3 with max_nonfinite=1: 0 is skipped, 1 makes update 1 (logged
    with its skipped micro-batch) and resets the count, 2 is skipped, 3 is the second
    consecutive one and aborts without saving."""
    c = _train_config(manifest)
    c.train.max_nonfinite = 1
    monkeypatch.setattr(trainer, "build_inputs", _poison({0, 2, 3}))
    with pytest.raises(FloatingPointError, match=r"2 consecutive steps .*train\.max_nonfinite=1"):
        trainer.train(c, tmp_path)
    logged = _metrics(tmp_path)
    assert [(m["step"], m["skipped"], m["micro_batches"]) for m in logged] == [(1, 1.0, 2.0)]
    assert np.isfinite(logged[0]["loss"])
    assert _saved_steps(tmp_path) == []


@pytest.mark.parametrize("mesh, batch, words", [
    ((3, 1, 1), 4, ["data=3", "device count 8"]),
    ((-1, 1, 1), 4, ["global batch 4", "data*fsdp = 8*1 = 8"]),
    ((2, 2, 2), 6, ["global batch 6", "data*fsdp = 2*2 = 4"]),
])
def test_train_rejects_bad_mesh(tmp_path, mesh, batch, words):
    c = build.load_config(f"{TINY}:pairwise")
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.train.batch_size = batch
    with pytest.raises(ValueError) as e:
        trainer.train(c, tmp_path)
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not (tmp_path / "corpus").exists()


def _cli(*args, devices: int = 1, timeout: int = 300):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "omniret_jax.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_unknown_config_key(tmp_path):
    r = _cli("--config", "configs/tiny.py", "--workdir", str(tmp_path / "x"), "--config.train.stepz=3")
    assert r.returncode != 0
    assert "stepz" in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_cli_smoke(tmp_path):
    """The CLI with 2 data workers on a corpus it synthesises; exits cleanly."""
    work = tmp_path / "run"
    r = _cli("--config", "configs/tiny.py:pairwise", "--workdir", str(work), "--config.train.steps=3",
             "--config.data.synth_n=8", "--config.train.batch_size=4", "--config.data.num_workers=2")
    assert r.returncode == 0, r.stderr[-3000:]
    # Not "leaked shared_memory": grain's worker processes can leave a block or two that the
    # resource tracker unlinks (with a warning) at exit, intermittently on a loaded machine.
    for bad in ("Traceback", "Exception ignored"):
        assert bad not in r.stderr, r.stderr[-3000:]
    logged = _metrics(work)
    assert logged[-1]["step"] == 3 and np.isfinite(logged[-1]["loss"]) and logged[-1]["skipped"] == 0
    assert {"L_A", "L_A/T-V", "L_A/T-A", "L_A/V-A", "grad_norm", "examples_per_s", "lr"} <= logged[-1].keys()
    assert list((work / "tensorboard").glob("events.out.tfevents.*"))
    assert (work / "corpus" / "manifest.jsonl").exists()
    print(f"CLI smoke: {logged[-1]}")


# ----------------------------------------------------------------------------- the schedule counts updates

def _applied_lrs(accumulate: int, updates: int, lr: float = 1e-3) -> np.ndarray:
    """The learning rate each update really applies, read off the parameters: with a constant
    gradient Adam's bias-corrected step is lr * g / (|g| + eps), and weight decay is off."""
    from omniret_jax.step import make_optimizer

    tx = make_optimizer(lr=lr, total_steps=updates, warmup_ratio=0.03, weight_decay=0.0, clip_norm=1e9,
                        accumulate=accumulate)
    params = {"w": np.zeros(3, np.float32)}
    grads = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
    opt = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for _ in range(updates):
        before = np.asarray(params["w"]).copy()
        for _ in range(accumulate):
            delta, opt = update(grads, opt, params)
            params = jax.tree.map(lambda p, d: p + d, params, delta)
        step = np.asarray(params["w"]) - before
        out.append(float(np.mean(-step / np.sign(grads["w"]))))
    return np.asarray(out)


def test_learning_rate_is_a_function_of_the_update_at_any_accumulation():
    """100 updates at accumulate 1, 2, 4: update u applies the same LR, warm-up is 3 updates
    (3 %), the peak comes at update 3, the last update's LR is 0."""
    from omniret_jax.step import lr_schedule, warmup_steps

    n, peak = 100, 1e-3
    want = np.asarray([float(lr_schedule(lr=peak, total_updates=n, warmup_ratio=0.03)(u)) for u in range(n)])
    assert warmup_steps(n, 0.03) == 3
    assert want[0] == 0.0 and want[3] == np.float32(peak) and want[-1] == 0.0 and want[2] < want[3] > want[4]
    for acc in (1, 2, 4):
        got = _applied_lrs(acc, n, peak)
        print(f"accumulate {acc}: LR of update 0 {got[0]:.3e}, 3 (warm-up end) {got[3]:.3e}, "
              f"50 {got[50]:.3e}, 99 (last) {got[99]:.3e}")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * peak)  # float32 parameter sums


# ----------------------------------------------------------------------------- accumulation in train()

def test_rotation_counts_updates_for_the_paper_and_micro_batches_for_the_released_recipe():
    from omniret_jax.losses import LossConfig

    paper, released = LossConfig(recipe="paper"), LossConfig(recipe="released")
    assert [trainer.rotation_count(paper, m, m // 8) for m in range(17)] == [m // 8 for m in range(17)]
    assert [trainer.rotation_count(released, m, m // 8) for m in range(17)] == list(range(17))
    assert trainer.rotation_count(LossConfig(recipe="released", rotation="update"), 9, 1) == 1


def _accumulating_config(manifest: Path):
    c = _train_config(manifest)
    c.train.steps, c.optim.accumulate = 3, 2
    return c


def _spy(calls: list):
    def build(batch, step, *args, **kwargs):
        calls.append((step, kwargs["counter"]))
        return batch_mod.build_inputs(batch, step, *args, **kwargs)
    return build


def _counting(reads: list):
    """trainer._fetch (the loop's only device-to-host reads), counted."""
    fetch = trainer._fetch

    def counted(tree):
        reads.append(1)
        return fetch(tree)
    return counted


@pytest.fixture(scope="module")
def accumulated(manifest, tmp_path_factory):
    """An uninterrupted run of 3 updates x 2 micro-batches, saving every update; its reads counted."""
    c = _accumulating_config(manifest)
    c.train.ckpt_every = 1
    workdir, calls, reads = tmp_path_factory.mktemp("accumulated"), [], []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_inputs", _spy(calls))
        mp.setattr(trainer, "_fetch", _counting(reads))
        trainer.train(c, workdir)
    return workdir, calls, len(reads)


def test_steps_count_updates_and_metrics_log_the_lr(manifest, accumulated):
    from omniret_jax.step import lr_schedule

    c = _accumulating_config(manifest)
    workdir, calls, reads = accumulated
    logged = _metrics(workdir)
    schedule = lr_schedule(lr=c.optim.lr, total_updates=3, warmup_ratio=c.optim.warmup_ratio)
    assert [(m["step"], m["micro_batches"]) for m in logged] == [(1, 2.0), (2, 4.0), (3, 6.0)]
    assert [m["lr"] for m in logged] == [float(schedule(u)) for u in range(3)]
    assert logged[0]["lr"] == 0.0 and logged[1]["lr"] == np.float32(c.optim.lr) and logged[-1]["lr"] == 0.0
    assert calls == [(m, m // 2) for m in range(6)]  # paper: the slot cycles with the update
    assert _saved_steps(workdir) == [1, 2, 3]
    # One read of the non-finite flag and one of the metrics per logged update, none per micro-batch.
    assert reads == 2 * 3, reads
    print(f"accumulate 2: lr per update {[m['lr'] for m in logged]}, losses {[round(m['loss'], 5) for m in logged]}")


@pytest.mark.slow
def test_resume_mid_accumulation_is_bitwise(manifest, accumulated, tmp_path, monkeypatch):
    """SIGTERM during micro-batch 2 (the first of update 2): the run finishes that update, saves it
    and stops; resumed, it trains update 3 bitwise equal to the uninterrupted run (interrupted
    synchronously, resumed asynchronously, as above)."""
    c = _accumulating_config(manifest)
    c.train.prefetch = 0
    straight, _, _ = accumulated
    calls: list = []

    def stop_in_micro_batch_2(batch, step, *args, **kwargs):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return _spy(calls)(batch, step, *args, **kwargs)

    monkeypatch.setattr(trainer, "build_inputs", stop_in_micro_batch_2)
    trainer.train(c, tmp_path)
    assert _saved_steps(tmp_path) == [2] and [m for m, _ in calls] == [0, 1, 2, 3]
    monkeypatch.setattr(trainer, "build_inputs", _spy(calls))
    c.train.prefetch = 2
    trainer.train(c, tmp_path)
    assert _saved_steps(tmp_path) == [2, 3] and calls == [(m, m // 2) for m in range(6)]
    a, b = _metrics(straight), _metrics(tmp_path)
    assert [(m["step"], m["loss"], m["lr"]) for m in a] == [(m["step"], m["loss"], m["lr"]) for m in b]
    n = _assert_same_state(c, straight, tmp_path, 3)
    print(f"SIGTERM in micro-batch 2 of 6 (accumulate 2): {n} trainable leaves and the optimizer state (with its "
          "gradient accumulator) bitwise equal at update 3")


# ----------------------------------------------------------------------------- the asynchronous loop

def test_schedule_lays_out_from_the_loops_position():
    """From update 1, micro-batch 3, one micro-batch of update 2 done (accumulate 2, 3 updates):
    micro-batches 3, 4, 5 with 1, 2, 2 updates done before them, and nothing past the last update."""
    assert list(trainer._schedule(trainer._Tally(1, 3, group=({},)), 2, 3)) == [(3, 1), (4, 2), (5, 2)]


def test_producer_keeps_order_raises_with_traceback_and_closes():
    def make(micro, updates, stop):
        if micro == 3:
            raise KeyError("layout of micro-batch 3")
        return trainer._Item(micro, updates, None, {}, 0.0)

    p = trainer._Producer(make, trainer._Tally(0, 0), 1, 10, depth=2)
    assert [p.get().micro for _ in range(3)] == [0, 1, 2]
    with pytest.raises(KeyError, match="micro-batch 3") as e:
        p.get()
    assert any(entry.name == "make" for entry in e.traceback), "the producer's frames are lost"
    p.close()
    p = trainer._Producer(make, trainer._Tally(0, 0), 1, 3, depth=2)  # closed with its queue full
    p.close()
    assert not [t for t in threading.enumerate() if t.name == "omniret-input"]


def test_train_raises_the_producers_exception(manifest, tmp_path, monkeypatch):
    def broken(batch, step, *args, **kwargs):
        raise RuntimeError(f"cannot lay out micro-batch {step}")

    monkeypatch.setattr(trainer, "build_inputs", broken)
    with pytest.raises(RuntimeError, match="cannot lay out micro-batch 0") as e:
        trainer.train(_train_config(manifest), tmp_path)
    assert any(entry.name == "broken" for entry in e.traceback)
    assert not [t for t in threading.enumerate() if t.name == "omniret-input"]


_TIMES = ("step_time_s", "examples_per_s", "host_s", "device_s")


@pytest.mark.slow
def test_async_loop_equals_synchronous_and_reads_only_at_logs(manifest, tmp_path, monkeypatch):
    """3 updates x 2 micro-batches, a log at the end only, micro-batch 1 non-finite. Synchronous
    (prefetch 0) and asynchronous runs: the same metrics, the same saved state and pipeline state,
    bitwise. The asynchronous run finds the NaN at the end, rewinds to micro-batch 2 and reads 5
    times in all (the NaN's flag and loss, one read after the rewind, the end's flag and metrics);
    the synchronous one reads every micro-batch."""
    fetched: list = []
    monkeypatch.setattr(trainer, "_fetch", _counting(fetched))
    monkeypatch.setattr(trainer, "build_inputs", _poison({1}))
    runs = {}
    for depth in (2, 0):
        c = _accumulating_config(manifest)
        c.train.log_every, c.train.prefetch = 3, depth
        fetched.clear()
        trainer.train(c, tmp_path / f"d{depth}")
        runs[depth] = len(fetched)
    assert runs == {2: 5, 0: 7 + 1 + 1}, runs
    a, b = (_metrics(tmp_path / f"d{d}") for d in (2, 0))
    strip = lambda lines: [{k: v for k, v in m.items() if k not in _TIMES} for m in lines]  # noqa: E731
    assert strip(a) == strip(b) and a[0]["skipped"] == 1.0 and a[0]["micro_batches"] == 7.0, (a, b)
    assert {"host_s", "device_s", "step_time_s"} <= a[0].keys()
    _assert_same_state(c, tmp_path / "d2", tmp_path / "d0", 3)
    data = [_restored(c, tmp_path / f"d{d}", 3).data_state for d in (2, 0)]
    assert data[0] == data[1] and data[0]["micro_batches"] == 7, data  # the consumed batches', not the prefetched
