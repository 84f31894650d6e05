"""The Colab notebooks run top to bottom (SMALL setting: tiny model, synthetic clips, CPU)."""

import json
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from omniret_jax.eval import retrieval

COLAB = Path(__file__).resolve().parents[1] / "colab"


def _execute(name: str, work: Path, timeout: int) -> nbformat.NotebookNode:
    nb = nbformat.read(COLAB / name, as_version=4)
    # A fresh kernel as a user gets it: no test-only device count or matmul precision.
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION")}
    env["OMNIRET_NOTEBOOK_WORK"] = str(work)
    t0 = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(COLAB)}}).execute(env=env)
    print(f"{name}: executed in {time.perf_counter() - t0:.1f} s")
    return nb


def _text(nb) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", ""))
            out.extend(str(v) for k, v in o.get("data", {}).items() if k in ("text/plain", "text/markdown"))
    return "\n".join(out)


@pytest.mark.slow  # keeps the default run under 20 min on 2 cores
def test_quickstart(tmp_path):
    nb = _execute("quickstart.ipynb", tmp_path, timeout=600)
    text = _text(nb)
    assert "CPU device(s)" in text and "AVG all (R@1)" in text
    res = json.loads((tmp_path / "quickstart" / "eval" / "results.json").read_text())
    assert list(res["directions"]) == list(retrieval.DIRECTIONS) and res["step"] == 20 and res["gallery"] == 16
    assert all(0.0 <= m["R@1"] <= 100.0 for m in res["directions"].values())


@pytest.mark.slow  # ~6 min on 2 cores: nine tiny runs and their evaluations
def test_ablations(tmp_path):
    # Two backbones: WAVE's five runs and Nemotron's four (~1.5x the WAVE-only notebook).
    nb = _execute("ablations.ipynb", tmp_path, timeout=1800)
    text = _text(nb)
    presets = ("frozen", "pairwise", "distill", "full")
    runs = [f"{b} {p}" for b in ("WAVE", "Nemotron") for p in presets] + ["WAVE full, l_D=2 l_T=0.5"]
    for run in runs:
        assert f"| {run} |" in text, run
    for preset in presets:  # the side-by-side stair-step
        assert f"| {preset} |" in text, preset
    evals = sorted((tmp_path / "ablations" / "runs").glob("*/eval/results.json"))
    assert len(evals) == len(runs)
    for path in evals:
        res = json.loads(path.read_text())
        assert list(res["directions"]) == list(retrieval.DIRECTIONS) and set(res["averages"]) == set(retrieval.AVERAGES)
        assert res["step"] in (None, 20), path
    nemotron = json.loads((tmp_path / "ablations" / "runs" / "Nemotron_full" / "eval" / "results.json").read_text())
    assert nemotron["dim"] == 64 and nemotron["step"] == 20
    print("\n".join(line for line in text.splitlines() if line.startswith("| ") or "(1, 1, 1)" in line))


@pytest.mark.slow  # three tiny WAVE runs of 384 examples and their evaluations: 20 min on 2 loaded CPU cores
def test_grad_cache(tmp_path):
    nb = _execute("grad_cache.ipynb", tmp_path, timeout=2400)
    text = _text(nb)
    runs = tmp_path / "grad_cache" / "runs"
    for b, updates in ((8, 48), (32, 12), (64, 6)):
        assert f"| {b} | 8 | {updates} | 384 |" in text, b
        res = json.loads((runs / f"contrastive_{b}" / "eval" / "results.json").read_text())
        assert list(res["directions"]) == list(retrieval.DIRECTIONS) and res["step"] == updates
    print("\n".join(line for line in text.splitlines() if line.startswith("| ") or line.startswith("seed ")))
