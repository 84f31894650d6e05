"""The benchmark scripts run as a user runs them, with and without data worker processes.

- bench/data_pipeline.py: per-stage timing, then the grain pipeline with 0 (decoding in the
  process) and 2 workers; exits cleanly and writes its JSON.
- bench/soak.py (slow): a short soak with 0 and 2 workers reports RSS, worker RSS and live arrays.
- bench/report.py: the allocator a process runs on is named; a missing tcmalloc is a clear error.
"""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(script: str, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(REPO / "bench" / script), *map(str, args)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    # Not "leaked shared_memory": grain's worker processes can leave a block or two that the
    # resource tracker unlinks (with a warning) at exit, intermittently on a loaded machine.
    for bad in ("Traceback", "Exception ignored"):
        assert bad not in r.stderr, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("workers", [0, 2])
def test_data_pipeline_bench(tmp_path_factory, workers):
    out = tmp_path_factory.getbasetemp() / "bench_corpus"  # shared by both runs
    r = _bench("data_pipeline.py", "--n", 2, "--workers", workers, "--seconds", 2, "--size", 64, "--batches", 1,
               "--out", out)
    result = json.loads((out / "bench_data_pipeline.json").read_text())
    assert result["pipeline_workers"] == workers and result["pipeline_clips_per_s"] > 0
    assert set(result["stage_ms_per_clip"]) >= {"decode_video", "vision_patches", "whisper_mel", "beats_fbank"}
    print(r.stdout.strip().splitlines()[-2])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_soak_bench(tmp_path, workers):
    r = _bench("soak.py", "--steps", 12, "--every", 4, "--report", "8,12", "--workers", workers,
               "--ckpt-every", 6, "--out", tmp_path / "run", "--corpus", tmp_path / "corpus",
               "--set", "train.batch_size=2")
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["workers"] == workers and set(result["rss_mb"]) == {"8", "12"}
    assert (result["workers_mb"]["12"] > 0) == (workers > 0)
    # after the first checkpoint (update 6) nothing device-side piles up and nothing recompiles
    assert result["live_arrays"]["8"] == result["live_arrays"]["12"]
    assert result["compiles"]["8"] == result["compiles"]["12"]
    print(result)


def test_allocator_is_named_and_a_missing_tcmalloc_is_a_clear_error():
    """Each bench's JSON names the malloc it ran on (step times on CPU depend on it), and
    compare_torch's ``--malloc tcmalloc`` without the library says which package to install."""
    def probe(code: str, **env) -> subprocess.CompletedProcess:
        base = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        return subprocess.run([sys.executable, "-c", "from bench import report\n" + code], cwd=REPO,
                              capture_output=True, text=True, timeout=60, env=dict(base, **env))

    plain = probe("print(report.allocator())")
    assert plain.stdout.strip() == "glibc", plain.stderr
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib is not None:     # installed here: a process started on it says so
        pre = probe("print(report.allocator())", LD_PRELOAD=lib)
        assert pre.stdout.strip() == "tcmalloc", pre.stderr
    missing = probe("import ctypes.util\nctypes.util.find_library = lambda name: None\n"
                    "assert report.tcmalloc_preload(required=False) is None\n"
                    "report.tcmalloc_preload(required=True)")
    assert missing.returncode == 1 and "apt-get install libtcmalloc-minimal4" in missing.stderr, missing.stderr
