"""Training checkpoints: bitwise resume, SIGTERM stop + resume, damaged steps, keep-N, keys.

The resume tests train a tiny nnx model (a frozen Linear standing in for the converted base
weights, then two trainable Linears) with optax AdamW on batches from the real DataPipeline
over a 4-clip synthetic corpus; an RNG key adds input noise each step, so the key, the
optimizer state and the pipeline state all have to round-trip for the results to match.

Run as a script (`python tests/test_checkpoint.py child WORKDIR MANIFEST`) it is the child
process of the SIGTERM test.
"""

import functools
import logging
import os
import select
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from omniret_jax.checkpoint import (CORRUPT_DIR, CheckpointError, NonFiniteError, TrainCheckpointer,
                                    assert_finite)
from omniret_jax.data import synth
from omniret_jax.data.manifest import read_manifest
from omniret_jax.data.pipeline import DataPipeline, PipelineConfig

PIPE_CFG = PipelineConfig(batch_size=2, seed=3, num_frames=2, min_pixels=28 * 28,
                          max_pixels=28 * 28, audio_seconds=1.0, num_epochs=None,
                          sample_timeout_s=None)
TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-2, weight_decay=0.1))
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("base")))
CONFIG = {"model": "tiny", "lr": 3e-2, "layers": [16, 16, 4]}
LOG = "omniret_jax.checkpoint"


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.base = nnx.Linear(128, 16, rngs=rngs)  # frozen: never in a training checkpoint
        self.l1 = nnx.Linear(16, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.gelu(self.l1(self.base(x))))


def _setup():
    """graphdef, trainables, frozen, opt_state, key: the state at step 0."""
    graphdef, train, frozen = nnx.split(Tiny(nnx.Rngs(0)), TRAINABLE, nnx.Param)
    return graphdef, train, frozen, TX.init(train), jax.random.key(7)


@functools.partial(jax.jit, static_argnums=0)
def _step(graphdef, train, frozen, opt_state, key, x, y):
    key, sub = jax.random.split(key)
    x = x + 0.05 * jax.random.normal(sub, x.shape)

    def loss_fn(train):
        return jnp.mean((nnx.merge(graphdef, train, frozen)(x) - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = TX.update(grads, opt_state, train)
    return optax.apply_updates(train, updates), opt_state, key, loss


def _train(pipe, graphdef, train, frozen, opt_state, key, start, stop):
    for _ in range(start, stop):
        batch = next(pipe)
        x, y = batch["mel"].mean(-1), batch["fbank"].mean(1)[:, :4]
        train, opt_state, key, loss = _step(graphdef, train, frozen, opt_state, key, x, y)
    return train, opt_state, key, float(loss)


def _abstract(train):
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), train)
    return abstract, jax.eval_shape(TX.init, abstract)


def _assert_bitwise(a, b, what):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b), what
    assert len(la) == len(lb) > 0
    for x, y in zip(la, lb):
        assert np.array_equal(np.asarray(x), np.asarray(y)), f"{what} differs"


def _assert_same_run(ref, got):
    (r_train, r_opt, r_key, r_data), (g_train, g_opt, g_key, g_data) = ref, got
    _assert_bitwise(r_train, g_train, "trainables")
    _assert_bitwise(r_opt, g_opt, "optimizer state")
    assert g_key.dtype == r_key.dtype
    assert np.array_equal(jax.random.key_data(r_key), jax.random.key_data(g_key)), "rng key"
    assert r_data == g_data, "data pipeline state"


def _resume(workdir, manifest, stop):
    """Fresh objects: base weights from init (the converted checkpoint's stand-in),
    everything trainable, the key and the input position from the checkpoint."""
    graphdef, train0, frozen, _, _ = _setup()
    ckpt = TrainCheckpointer(workdir, config=CONFIG)
    r = ckpt.restore_latest(*_abstract(train0))
    assert isinstance(r.trainables, nnx.State) and set(r.trainables.keys()) == {"l1", "l2"}
    with DataPipeline(read_manifest(manifest), PIPE_CFG, process_index=0, process_count=1) as pipe:
        pipe.set_state(r.data_state)
        train, opt_state, key, _ = _train(pipe, graphdef, r.trainables, frozen, r.opt_state, r.rng,
                                          r.step, stop)
        state = pipe.get_state()
    ckpt.close()
    return r, (train, opt_state, key, state)


def _uninterrupted(manifest, stop):
    graphdef, train, frozen, opt_state, key = _setup()
    with DataPipeline(read_manifest(manifest), PIPE_CFG, process_index=0, process_count=1) as pipe:
        train, opt_state, key, _ = _train(pipe, graphdef, train, frozen, opt_state, key, 0, stop)
        return train, opt_state, key, pipe.get_state()


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_corpus")
    synth.generate(str(out), 4, seed=0, settings=synth.SynthSettings(seconds=2.0, size=64),
                   progress=False)
    return str(out / "manifest.jsonl")


def test_bitwise_resume(manifest, tmp_path):
    n, k = 7, 3
    ref = _uninterrupted(manifest, n)

    graphdef, train, frozen, opt_state, key = _setup()
    with (TrainCheckpointer(tmp_path, keep=2, save_every=k, config=CONFIG) as ckpt,
          DataPipeline(read_manifest(manifest), PIPE_CFG, process_index=0, process_count=1) as pipe):
        for step in range(1, k + 1):
            train, opt_state, key, loss = _train(pipe, graphdef, train, frozen, opt_state, key,
                                                 step - 1, step)
            saved = ckpt.save(step, train, opt_state, rng=key, data_state=pipe.get_state(),
                              metrics={"loss": loss, "lr": np.float32(3e-2)})
            assert saved == (step == k)
        assert ckpt.all_steps() == [k]

    r, got = _resume(tmp_path, manifest, n)
    assert r.step == k and r.config == CONFIG and r.metrics["loss"] == loss
    assert r.data_state["summary"]["yielded"] == k * PIPE_CFG.batch_size
    _assert_same_run(ref, got)

    # The frozen base weights are not in the checkpoint: asking for them names the leaf.
    full = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.state(Tiny(nnx.Rngs(0)), nnx.Param))
    with TrainCheckpointer(tmp_path) as ckpt, pytest.raises(ValueError, match="'base.bias'"):
        ckpt.restore(k, full)
    assert not (tmp_path / CORRUPT_DIR).exists()


def _child(workdir, manifest):
    """Trains until SIGTERM, then saves that step and exits 0."""
    graphdef, train, frozen, opt_state, key = _setup()
    ckpt = TrainCheckpointer(workdir, save_every=1000, config=CONFIG)
    ckpt.install_sigterm_handler()
    assert ckpt.restore_latest(*_abstract(train)) is None
    with DataPipeline(read_manifest(manifest), PIPE_CFG, process_index=0, process_count=1) as pipe:
        for step in range(1, 100_000):
            train, opt_state, key, loss = _train(pipe, graphdef, train, frozen, opt_state, key,
                                                 step - 1, step)
            stop = ckpt.should_stop()
            ckpt.save(step, train, opt_state, rng=key, data_state=pipe.get_state(),
                      metrics={"loss": loss}, force=stop)
            if stop:
                ckpt.close()
                print(f"stopped at {step}", flush=True)
                sys.exit(0)
            print(f"step {step}", flush=True)
            time.sleep(0.05)


def test_sigterm_saves_and_resume_continues(manifest, tmp_path):
    err_path = tmp_path / "child.stderr"
    workdir = tmp_path / "run"
    with open(err_path, "w") as err_file:  # a file: a full stderr pipe would block the child
        proc = subprocess.Popen([sys.executable, __file__, "child", str(workdir), manifest],
                                stdout=subprocess.PIPE, stderr=err_file, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline, line = time.monotonic() + 120, ""
        while line.strip() != "step 2":
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert ready and proc.poll() is None, f"child did not reach step 2:\n{err_path.read_text()}"
            line = proc.stdout.readline()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err_path.read_text()
    assert "stop requested (SIGTERM)" in err_path.read_text()
    k = int(out.strip().splitlines()[-1].removeprefix("stopped at "))
    assert k >= 2
    r, got = _resume(workdir, manifest, k + 2)
    assert r.step == k and r.metrics["loss"] > 0
    _assert_same_run(_uninterrupted(manifest, k + 2), got)


# ------------------------------------------------------------------------ damaged steps
def _params(scale):
    return {"enc": {"kernel": jnp.full((4, 3), scale, jnp.float32)}, "head": jnp.arange(5.0) * scale}


def _save_steps(workdir, steps):
    with TrainCheckpointer(workdir, keep=10) as ckpt:
        for s in steps:
            p = _params(float(s))
            ckpt.save(s, p, TX.init(p), rng=jax.random.key(s), data_state={"next": s}, force=True)


def _truncate_data_files(item_dir):
    files = [p for p in item_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        data = p.read_bytes()
        p.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "missing item 'opt_state'": lambda d: __import__("shutil").rmtree(d / "opt_state"),
    "item 'meta' is missing or unreadable": lambda d: [
        p.write_text("{not json") for p in (d / "meta").iterdir() if p.is_file()],
    "unreadable or truncated": lambda d: _truncate_data_files(d / "trainables"),
}


# A failed orbax read leaves tensorstore callbacks that hit orbax's closed event loop
# ("Event loop is closed", ignored inside orbax); that noise is not what is tested here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("problem", list(DAMAGE))
def test_damaged_latest_falls_back_to_previous(tmp_path, caplog, problem):
    _save_steps(tmp_path, [1, 2, 3])
    DAMAGE[problem](tmp_path / "3")
    abstract = _abstract(_params(0.0))
    with TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(CheckpointError, match="step 3"):
            ckpt.restore(3, *abstract)  # an explicit step is reported, not moved
        assert (tmp_path / "3").is_dir()
        with caplog.at_level(logging.WARNING, logger=LOG):
            r = ckpt.restore_latest(*abstract)
        assert r.step == 2 and r.data_state == {"next": 2}
        _assert_bitwise(r.trainables, _params(2.0), "trainables")
        _assert_bitwise(r.opt_state, TX.init(_params(2.0)), "optimizer state")
        assert np.array_equal(jax.random.key_data(r.rng), jax.random.key_data(jax.random.key(2)))
        warning = " ".join(m.getMessage() for m in caplog.records)
        print(warning)
        assert "step 3" in warning and problem.removeprefix("missing ") in warning
        assert "falling back to step 2" in warning and str(tmp_path / CORRUPT_DIR / "3") in warning
        assert (tmp_path / CORRUPT_DIR / "3").is_dir() and not (tmp_path / "3").exists()
        assert problem.removeprefix("missing ") in (tmp_path / CORRUPT_DIR / "3.reason.txt").read_text()
        assert ckpt.all_steps() == [1, 2]
        assert ckpt.save(3, r.trainables, r.opt_state, force=True)  # the run goes on
        assert ckpt.all_steps() == [1, 2, 3]


def test_crash_leftover_tmp_dir_is_moved_aside(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    leftover = tmp_path / "3.orbax-checkpoint-tmp-1712345678"
    (leftover / "trainables").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger=LOG), TrainCheckpointer(tmp_path) as ckpt:
        r = ckpt.restore_latest(*_abstract(_params(0.0)))
    warning = " ".join(m.getMessage() for m in caplog.records)
    print(warning)
    assert r.step == 2 and "unfinished save of step 3" in warning and leftover.name in warning
    assert (tmp_path / CORRUPT_DIR / leftover.name / "trainables").is_dir() and not leftover.exists()


def test_no_good_step_is_a_clear_error(tmp_path, caplog):
    _save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        DAMAGE["missing item 'opt_state'"](tmp_path / str(s))
    with TrainCheckpointer(tmp_path) as ckpt, caplog.at_level(logging.WARNING, logger=LOG):
        with pytest.raises(CheckpointError, match=r"no usable checkpoint.*step 2: item 'opt_state' "
                                                  r"is missing; step 1: item 'opt_state' is missing"):
            ckpt.restore_latest(*_abstract(_params(0.0)))
        assert ckpt.all_steps() == []
    assert sorted(p.name for p in (tmp_path / CORRUPT_DIR).iterdir() if p.is_dir()) == ["1", "2"]


def test_mismatched_trees_are_errors_not_corruption(tmp_path):
    _save_steps(tmp_path, [1])
    bad = _params(0.0)
    bad["head"] = jnp.zeros(6)
    with TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"trainables leaf 'head' is \(5,\) float32 in the "
                                             r"checkpoint but \(6,\) float32"):
            ckpt.restore_latest(*_abstract(bad))
        # Shardings the arrays cannot take (5 rows over 8 devices): readable step, caller error.
        mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
        sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharded),
                                _params(0.0))
        with pytest.raises(ValueError, match="readable, but not into the given abstract trees"):
            ckpt.restore_latest(abstract)
        assert ckpt.all_steps() == [1] and not (tmp_path / CORRUPT_DIR).exists()
        r = ckpt.restore_latest(_abstract(_params(0.0))[0])  # trainables only (eval/export)
        assert r.opt_state is None
        _assert_bitwise(r.trainables, _params(1.0), "trainables")


def test_sharded_round_trip(tmp_path):
    """Arrays sharded over the 8 host devices come back with the shardings asked for."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
    rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params = {"w": jax.device_put(jnp.arange(48.0).reshape(16, 3), rows),
              "b": jax.device_put(jnp.ones(3), replicated)}
    opt_state = TX.init(params)
    with TrainCheckpointer(tmp_path) as ckpt:
        ckpt.save(1, params, opt_state, force=True)
        r = ckpt.restore_latest(params, opt_state)  # concrete arrays work as the abstract trees
    assert r.trainables["w"].sharding == rows and r.trainables["b"].sharding == replicated
    assert r.opt_state[1][0].mu["w"].sharding == rows
    _assert_bitwise(r.trainables, params, "trainables")
    _assert_bitwise(r.opt_state, opt_state, "optimizer state")


# ------------------------------------------------------- keep-N, keys, async, save policy
@pytest.mark.parametrize("async_save", [False, True])
def test_keep_n_keys_and_save_policy(tmp_path, async_save):
    keys = {1: jax.random.key(1, impl="rbg"), 2: jax.random.PRNGKey(2), 3: jax.random.key(3),
            4: jax.random.split(jax.random.key(4), 3), 5: jax.random.key(5, impl="unsafe_rbg")}
    with TrainCheckpointer(tmp_path, keep=2, save_every=2, async_save=async_save) as ckpt:
        assert ckpt.restore_latest(*_abstract(_params(0.0))) is None
        for s in range(1, 6):
            p = _params(float(s))
            saved = ckpt.save(s, p, TX.init(p), rng=keys[s], data_state={"epoch": s, "pos": [s]},
                              force=s % 2 == 1)
            assert saved
        assert not ckpt.save(7, p, TX.init(p))  # not a multiple of save_every
        assert not ckpt.save(5, p, TX.init(p), force=True)  # already saved (e.g. stop at a save step)
        with pytest.raises(ValueError, match="already holds step 5"):
            ckpt.save(4, p, TX.init(p), force=True)
        with pytest.raises(ValueError, match=r"data_state\.arr: ndarray is not JSON"):
            ckpt.save(6, p, TX.init(p), data_state={"arr": np.zeros(3)})
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == [4, 5]
        for s in (4, 5):
            r = ckpt.restore(s, *_abstract(_params(0.0)))
            assert r.rng.dtype == keys[s].dtype and r.rng.shape == keys[s].shape
            assert np.array_equal(_key_words(r.rng), _key_words(keys[s]))
            assert r.data_state == {"epoch": s, "pos": [s]}
        for s in (2, 3):  # the dropped steps' keys (raw uint32, threefry), saved again alone
            config = ml_collections.ConfigDict({"model": {"dim": s, "heads": (2, 4)}})
            with TrainCheckpointer(tmp_path / f"k{s}", config=config) as c2:
                c2.save(1, p, TX.init(p), rng=keys[s], force=True)
                r = c2.restore_latest(*_abstract(_params(0.0)))
            got = r.rng
            assert r.config == {"model": {"dim": s, "heads": [2, 4]}}
            assert got.dtype == keys[s].dtype
            assert np.array_equal(_key_words(got), _key_words(keys[s]))


def _key_words(key):
    return jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def test_assert_finite_names_the_leaf_and_blocks_saving(tmp_path):
    graphdef, train, frozen, opt_state, key = _setup()
    assert_finite(train, "trainables")
    assert_finite({"count": jnp.int32(3), "key": key}, "ints and keys are skipped")
    bad = jax.tree.map(lambda x: x, train)
    bad["l2"]["kernel"][...] = bad["l2"]["kernel"][...].at[1, 2].set(jnp.nan).at[0, 0].set(jnp.inf)
    with pytest.raises(NonFiniteError, match=r"trainables: leaf 'l2.kernel' \(16, 4\) float32 has "
                                             r"1 NaN and 1 Inf of 64"):
        assert_finite(bad, "trainables")
    bad_opt = TX.init(bad)
    bad_opt = jax.tree.map(lambda x: x, bad_opt)
    mu = bad_opt[1][0].mu
    mu["l1"]["bias"][...] = mu["l1"]["bias"][...].at[3].set(-jnp.inf)
    with TrainCheckpointer(tmp_path) as ckpt:
        with pytest.raises(NonFiniteError, match=r"optimizer state: leaf '1.0.mu.l1.bias'"):
            ckpt.save(1, train, bad_opt, force=True)
        with pytest.raises(NonFiniteError, match="trainables: leaf 'l2.kernel'"):
            ckpt.save(1, bad, opt_state, force=True)
        ckpt.wait_until_finished()
        assert ckpt.all_steps() == []
    assert not any(p.name[0].isdigit() for p in tmp_path.iterdir())


if __name__ == "__main__" and sys.argv[1:2] == ["child"]:
    _child(sys.argv[2], sys.argv[3])
