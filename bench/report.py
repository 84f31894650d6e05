"""The one output every bench writes: its result as one JSON line on stdout, and in --json's file."""

from __future__ import annotations

import json
from pathlib import Path


def emit(result: dict, json_path: str | None) -> None:
    """Prints ``result`` as one JSON line and, when ``json_path`` is set, writes the same line there."""
    line = json.dumps(result)
    print(line)
    if json_path:
        Path(json_path).write_text(line + "\n")
