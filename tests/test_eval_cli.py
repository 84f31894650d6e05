"""End to end: train the tiny model for 2 steps, evaluate it with `python -m omniret_jax.eval`,
reuse the embedding cache, mode "all", the frozen baseline, and the CLI's error cases.

Both CLIs run with 2 data worker processes (and must exit without tracebacks or leaked shared
memory); the in-process evaluations run without workers and must give the same vectors."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from omniret_jax.build import load_config
from omniret_jax.data.manifest import ManifestError, read_manifest, write_manifest
from omniret_jax.data.synth import SynthSettings, generate
from omniret_jax.eval import retrieval
from omniret_jax.eval.embed import (EMBEDDINGS_FILE, FINGERPRINT_FILE, evaluate_checkpoint, paths_for,
                                    resolve_checkpoint)
from omniret_jax.eval.store import load_embeddings, write_embeddings

ROOT = Path(__file__).resolve().parents[1]
N_CLIPS, STEPS, PRESET = 10, 2, "pairwise"


def _config(manifest):
    c = load_config(f"{ROOT}/configs/tiny.py:{PRESET}")
    c.data.manifest = str(manifest)
    return c


def _run(module, *args, devices=None):
    env = dict(os.environ)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _assert_clean_exit(stderr: str) -> None:
    # Not "leaked shared_memory": grain's worker processes can leave a block or two that the
    # resource tracker unlinks (with a warning) at exit, intermittently on a loaded machine.
    for bad in ("Traceback", "Exception ignored"):
        assert bad not in stderr, f"{bad!r} in stderr:\n{stderr[-3000:]}"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A synthetic corpus, a 2-step training workdir and one CLI evaluation of it."""
    base = tmp_path_factory.mktemp("eval_cli")
    s = load_config(f"{ROOT}/configs/tiny.py:{PRESET}").data
    generate(str(base / "corpus"), N_CLIPS, seed=3, settings=SynthSettings(seconds=s.synth_seconds, size=s.synth_size),
             progress=False)
    manifest = base / "corpus" / "manifest.jsonl"
    work = base / "work"
    # The trainer runs as a user runs it, in its own process on one CPU device.
    p = _run("omniret_jax.train", "--config", f"configs/tiny.py:{PRESET}", "--workdir", work,
             f"--config.data.manifest={manifest}", f"--config.train.steps={STEPS}", "--config.train.log_every=1",
             "--config.data.num_workers=2", devices=1)
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_clean_exit(p.stderr)
    out = base / "eval"
    # Evaluation on 8 devices (conftest's XLA_FLAGS): batches of 8 sharded over the mesh.
    p = _run("omniret_jax.eval", "--config", f"configs/tiny.py:{PRESET}", "--checkpoint", work, "--manifest",
             manifest, "--out", out, "--compression", f"--config.data.manifest={manifest}",
             "--config.data.num_workers=2")
    assert p.returncode == 0, p.stderr[-3000:]
    _assert_clean_exit(p.stderr)
    return dict(base=base, manifest=manifest, work=work, out=out, stdout=p.stdout)


def test_cli_results(run):
    res = json.loads((run["out"] / "results.json").read_text())
    assert list(res["directions"]) == list(retrieval.DIRECTIONS)
    dim = load_config(f"{ROOT}/configs/tiny.py").model.tiny.hidden_size
    assert res["step"] == STEPS and res["gallery"] == N_CLIPS and res["dim"] == dim
    for d, m in res["directions"].items():
        assert m["queries"] == m["gallery"] == N_CLIPS, d
        for k in ("R@1", "R@5", "R@10", "NDCG@10", "MRR"):
            assert 0.0 <= m[k] <= 100.0, (d, k, m[k])
        assert m["R@1"] <= m["R@5"] <= m["R@10"], d
        assert 1.0 <= m["MedR"] <= N_CLIPS, d
        # With N_CLIPS = 10 every gold item is within the top 10.
        assert m["R@10"] == 100.0, d
    r1 = {d: m["R@1"] for d, m in res["directions"].items()}
    assert res["averages"]["AVG all"] == pytest.approx(np.mean(list(r1.values())))
    assert res["averages"]["AVG single"] == pytest.approx(np.mean([r1[d] for d in retrieval.SINGLE_DIRECTIONS]))
    assert res["embeddings"]["cached"] is False
    assert [s["name"] for s in res["compression"]["settings"]] == [
        "fp32", "int8/18", "bin/9", "int8/18 first-d", "bin/9 first-d"]  # D = 64: the paper's fractions of 3584
    fp32 = res["compression"]["settings"][0]["averages"]["AVG all"]["mean"]
    assert fp32 == pytest.approx(res["averages"]["AVG all"])
    md = (run["out"] / "results.md").read_text()
    assert "| T->V |" in md and "AVG all (R@1)" in md and "## Compression" in md
    assert "AVG all: R@1" in run["stdout"]
    emb = load_embeddings(run["out"] / EMBEDDINGS_FILE, manifest=run["manifest"])
    assert sorted(emb.paths) == sorted(paths_for(retrieval.DIRECTIONS))
    for p, x in emb.paths.items():
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5, err_msg=p)
    print(f"AVG single/dual/all R@1 after {STEPS} steps: "
          + ", ".join(f"{v:.2f}" for v in res["averages"].values()))


def test_cache_reuse_and_step_dir(run):
    """A second run (via the step directory, the same checkpoint) reuses the cache untouched."""
    emb_file = run["out"] / EMBEDDINGS_FILE
    before = emb_file.stat().st_mtime_ns
    first = json.loads((run["out"] / "results.json").read_text())
    res = evaluate_checkpoint(_config(run["manifest"]), run["work"] / "checkpoints" / str(STEPS), run["manifest"],
                              run["out"], progress=False)
    assert res["embeddings"]["cached"] is True
    assert emb_file.stat().st_mtime_ns == before
    assert res["directions"] == first["directions"]
    assert res["embeddings"]["fingerprint"] == first["embeddings"]["fingerprint"]


@pytest.mark.slow  # keeps the default run under 20 min on 2 cores
def test_mode_all_and_frozen(run, tmp_path):
    """Mode "all" embeds every caption; text rows of equal captions agree across batches and
    passes; the untrained ("none") model gives different vectors than the trained one."""
    recs = read_manifest(run["manifest"])
    # Clip 0 gets clip 1's caption as a second one, clip 2 gets two extra captions.
    recs[0] = dataclasses.replace(recs[0], meta={"captions": [recs[0].caption, recs[1].caption]})
    recs[2] = dataclasses.replace(recs[2], meta={"captions": [recs[2].caption, "a quiet grey screen", "noise"]})
    manifest = tmp_path / "multi.jsonl"
    write_manifest(manifest, recs)
    out = tmp_path / "all"
    res = evaluate_checkpoint(_config(run["manifest"]), run["work"], manifest, out, mode="all", progress=False)
    n_captions = N_CLIPS + 3
    assert res["mode"] == "all"
    assert res["directions"]["T->V"]["queries"] == n_captions and res["directions"]["T->V"]["gallery"] == N_CLIPS
    assert res["directions"]["V->T"]["queries"] == N_CLIPS and res["directions"]["V->T"]["gallery"] == n_captions
    emb = load_embeddings(out / EMBEDDINGS_FILE, manifest=manifest)
    row = {cid: i for i, cid in enumerate(emb.caption_ids)}
    t = emb.paths["T"]
    err = float(np.abs(t[row[recs[0].id + "#1"]] - t[row[recs[1].id + "#0"]]).max())
    print(f"T row of the same caption in two passes: max abs diff {err:.2e}")
    assert err <= 1e-5
    # Clip-level paths and first captions equal the mode-"first" run's vectors.
    first = load_embeddings(run["out"] / EMBEDDINGS_FILE)
    firsts = [row[f"{r.id}#0"] for r in recs]
    for p in ("V", "AV"):
        np.testing.assert_allclose(emb.paths[p], first.paths[p], atol=1e-5, err_msg=p)
    for p in ("T", "TV", "TA"):
        np.testing.assert_allclose(emb.paths[p][firsts], first.paths[p], atol=1e-5, err_msg=p)

    frozen = evaluate_checkpoint(_config(run["manifest"]), "none", run["manifest"], tmp_path / "frozen",
                                 directions=["T->V", "V->T"], progress=False)
    assert list(frozen["directions"]) == ["T->V", "V->T"] and frozen["averages"] == {}
    assert frozen["checkpoint"].startswith("none") and frozen["step"] is None
    f = load_embeddings(tmp_path / "frozen" / EMBEDDINGS_FILE)
    assert sorted(f.paths) == ["T", "V"]
    assert np.abs(f.paths["V"] - first.paths["V"]).max() > 1e-3  # training moved the vectors


def test_errors(run, tmp_path):
    c, manifest = _config(run["manifest"]), run["manifest"]
    with pytest.raises(ValueError, match=r"unknown direction 'T->X'"):
        evaluate_checkpoint(c, run["work"], manifest, tmp_path / "x", directions=["T->V", "T->X"])
    with pytest.raises(ValueError, match="no training checkpoint in"):
        evaluate_checkpoint(c, tmp_path, manifest, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no such directory"):
        resolve_checkpoint(tmp_path / "missing")

    # Duplicate gallery ids: a clear error from the CLI (exit code 2, no traceback).
    lines = manifest.read_text().splitlines()
    dup = tmp_path / "dup.jsonl"
    dup.write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(ManifestError, match="duplicate id"):
        evaluate_checkpoint(c, run["work"], dup, tmp_path / "x")
    p = _run("omniret_jax.eval", "--config", f"configs/tiny.py:{PRESET}", "--checkpoint", run["work"],
             "--manifest", dup, "--out", tmp_path / "x", devices=1)
    assert p.returncode == 2 and "duplicate id" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]

    # The manifest's ids do not match the cached embeddings (same model and config).
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"ids do not match the manifest(.|\n)*--recompute"):
        evaluate_checkpoint(c, run["work"], fewer, run["out"])

    # A cache whose width is not the model's.
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / FINGERPRINT_FILE).write_text((run["out"] / FINGERPRINT_FILE).read_text())
    ids = [r.id for r in read_manifest(manifest)]
    x = np.random.default_rng(0).normal(size=(len(ids), 32)).astype(np.float32)
    write_embeddings(wrong / EMBEDDINGS_FILE, {p: x for p in paths_for(retrieval.DIRECTIONS)}, ids)
    with pytest.raises(ValueError, match="D=32 but expected_dim=64"):
        evaluate_checkpoint(c, run["work"], manifest, wrong)

    # A clip the pipeline cannot load makes the gallery incomplete.
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video")
    bad = json.loads(lines[0])
    bad.update(id="broken", video=str(broken))
    bad_manifest = tmp_path / "bad.jsonl"
    bad_manifest.write_text("\n".join([json.dumps(bad)] + [
        json.dumps({**json.loads(line), "video": str(run["base"] / "corpus" / json.loads(line)["video"])})
        for line in lines]) + "\n")
    with pytest.raises(ValueError, match=r"could not load 1 gallery clip\(s\) \('broken'\)"):
        evaluate_checkpoint(c, run["work"], bad_manifest, tmp_path / "bad", progress=False)
