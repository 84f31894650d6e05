"""The package's layers import only downwards; tests import only the package and tests/ helpers.

Walks every module with ``ast`` (imports inside functions included) and fails naming the
file, the line and the import that points up or sideways:

    6  omniret_jax.train                          the training CLI (its curriculum probes with eval.tasks)
    5  omniret_jax.eval, .interop                 entry points (CLI loops; interop = omniret-convert)
    4  omniret_jax.build                          the model factory and placement on a mesh
    3  omniret_jax.convert, .step, .checkpoint    weight loaders/writers; the pure step; checkpoints
    2  omniret_jax.losses, omniret_jax.sharding
    1  omniret_jax.data (host), omniret_jax.model (device): never each other
    0  omniret_jax.config, omniret_jax.inputs     the dataclasses both sides read
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "omniret_jax"
RANKS = {
    "config": 0, "inputs": 0,
    "data": 1, "model": 1,
    "losses": 2, "sharding": 2,
    "convert": 3, "step": 3, "checkpoint": 3,
    "build": 4,
    "eval": 5, "interop": 5,
    "train": 6,
}


def _unit(module: str) -> str | None:
    """'omniret_jax.data.layout' -> 'data'; None outside the package."""
    parts = module.split(".")
    if parts[0] != "omniret_jax":
        return None
    if len(parts) == 1:
        raise AssertionError("import of the bare package")
    return parts[1]


def _imports(path: Path, own: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path`` (``own`` = its dotted name)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = own.split(".")[: -node.level]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            # "from omniret_jax import build" imports the submodule omniret_jax.build.
            if mod == "omniret_jax":
                out += [(node.lineno, f"omniret_jax.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        yield path, name


# Parsed once at collection, before any test starts a thread: on CPython 3.11 the ast module keeps
# its recursion counter per interpreter, so an ast.parse racing one in another thread (a jaxtyping
# import hook in a leftover worker thread, say) fails with "AST constructor recursion depth
# mismatch" (gh-106905). Seen in full runs, never with this test alone.
IMPORTS = {path: _imports(path, name) for path, name in _modules()}
IMPORTS |= {path: _imports(path, f"tests.{path.stem}") for path in sorted((ROOT / "tests").glob("*.py"))}


def test_every_unit_has_a_rank():
    units = {_unit(name) for _, name in _modules() if name != "omniret_jax"}
    assert units == set(RANKS), f"modules without a layer: {sorted(units - set(RANKS))}"


def test_imports_point_only_down():
    problems = []
    for path, name in _modules():
        if name == "omniret_jax":
            continue
        me = _unit(name)
        for line, mod in IMPORTS[path]:
            other = _unit(mod)
            if other is None or other == me:
                continue
            if RANKS[other] >= RANKS[me]:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {me} (layer {RANKS[me]}) imports {mod} "
                                f"(layer {RANKS[other]})")
    assert not problems, "imports that do not point down:\n" + "\n".join(problems)


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda p: p.name)
def test_tests_import_only_the_package_and_test_helpers(path):
    local = {p.name for p in ROOT.iterdir() if p.is_dir() or p.suffix == ".py"} - {"omniret_jax", "tests"}
    bad = [f"{path.name}:{line}: {mod}" for line, mod in IMPORTS[path]
           if mod.split(".")[0] in local]
    assert not bad, "tests import repository code outside the package and tests/: " + ", ".join(bad)
