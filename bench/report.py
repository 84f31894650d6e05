"""What every bench reports besides its numbers: its result as one JSON line, and the allocator it ran with."""

from __future__ import annotations

import ctypes.util
import json
from pathlib import Path

# Allocators a process can run on besides glibc's, by name: the library each one maps in.
ALLOCATORS = {"tcmalloc": "tcmalloc_minimal", "jemalloc": "jemalloc"}


def emit(result: dict, json_path: str | None) -> None:
    """Prints ``result`` as one JSON line and, when ``json_path`` is set, writes the same line there."""
    line = json.dumps(result)
    print(line)
    if json_path:
        Path(json_path).write_text(line + "\n")


def allocator() -> str:
    """The malloc this process runs on: ``tcmalloc`` / ``jemalloc`` when one is mapped in, else ``glibc``.

    Step times on CPU depend on it: XLA:CPU allocates each execution's temporaries as one block
    (1.5 GiB for the small bench step), glibc serves a block that large with fresh mmap pages
    every step, and the page faults of touching them cost about a quarter of the step.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "unknown"
    for name, lib in ALLOCATORS.items():
        if f"lib{lib}" in maps:
            return name
    return "glibc"


def tcmalloc_preload(required: bool) -> str | None:
    """The tcmalloc library to LD_PRELOAD, or None when it is not installed and not ``required``.

    tcmalloc keeps freed blocks for the next step instead of unmapping them, which removes those
    page faults (jemalloc at its defaults did not: it returns large blocks to the kernel too).
    """
    lib = ctypes.util.find_library(ALLOCATORS["tcmalloc"])
    if lib is None and required:
        raise SystemExit("--malloc tcmalloc: libtcmalloc_minimal.so is not installed (Debian/Ubuntu: "
                         "apt-get install libtcmalloc-minimal4); pass --malloc system to run on glibc's malloc")
    return lib
