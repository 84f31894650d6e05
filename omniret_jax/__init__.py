"""omniret_jax: a JAX/Flax trainer for unified audio-video-text retrieval embedders.

Layers, each importing only from those below it (tests/test_layers.py enforces it):
``train``/``eval`` (entry points) -> ``build`` (model factory, placement on a mesh) ->
``convert``/``step``/``checkpoint`` -> ``losses``/``sharding`` -> ``data`` (host) | ``model``
(device) -> ``config``/``inputs`` (the dataclasses both sides read).
"""

import os as _os

_ONEDNN = "--xla_cpu_experimental_onednn_custom_call"


def _cpu_matmuls_through_onednn() -> None:
    """Route XLA's CPU float32 matmuls through oneDNN, the kernels PyTorch's CPU ops use: 2.5x
    faster on the T path at the small bench widths, parity tests unchanged (BUILD_NOTES). Set
    before any backend starts; a flag in XLA_FLAGS already (``=false`` to opt out) wins. Only when
    this jaxlib knows the flag: XLA aborts on an unknown one."""
    flags = _os.environ.get("XLA_FLAGS", "")
    if _ONEDNN in flags or _os.environ.get("OMNIRET_ONEDNN", "1") == "0":
        return
    try:
        import mmap

        import jaxlib
        lib = _os.path.join(_os.path.dirname(jaxlib.__file__), "libjax_common.so")
        with open(lib, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            known = m.find(_ONEDNN[2:].encode()) >= 0
    except (ImportError, OSError, ValueError):
        return
    if known:
        _os.environ["XLA_FLAGS"] = f"{flags} {_ONEDNN}=true".strip()


_cpu_matmuls_through_onednn()
