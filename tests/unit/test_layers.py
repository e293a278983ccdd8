"""Layers import only downward (../shared/DESIGN.md): every module's imports, read from its source.

    config -> data -> distributed -> models -> algorithms      (each may import those left of it)
    utils: may import config only, and is importable by models and algorithms.

An import inside a function counts the same as one at the top: it is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "nemo_rl"

# What each layer may import, besides itself.
ALLOWED = {
    "config": set(),
    "utils": {"config"},
    "data": {"config"},
    "distributed": {"config", "data"},
    "models": {"config", "data", "distributed", "utils"},
    "algorithms": {"config", "data", "distributed", "models", "utils"},
}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "nemo_rl" else None


def _module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every absolute and relative import in `path`."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.append((node.lineno, base))
    return found


def _violations() -> list[str]:
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(_module_name(path))
        if layer is None:  # nemo_rl/__init__.py
            continue
        assert layer in ALLOWED, f"{path}: layer {layer!r} is not in the layer table; add it to ALLOWED"
        for line, imported in _imports(path):
            target = _layer(imported)
            if target is not None and target != layer and target not in ALLOWED[layer]:
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {layer} imports {imported} ({target})")
    return problems


def test_no_layer_imports_a_higher_one():
    assert _violations() == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """A models module importing algorithms is reported with its file and line."""
    fake = tmp_path / "nemo_rl"
    (fake / "models").mkdir(parents=True)
    (fake / "algorithms").mkdir()
    (fake / "models" / "worker.py").write_text("import torch\n\nfrom nemo_rl.algorithms.loss_functions import NLLLoss\n")
    (fake / "algorithms" / "sft.py").write_text("from ..models import worker\n")
    monkeypatch.setitem(globals(), "PACKAGE", fake)
    assert _violations() == ["nemo_rl/models/worker.py:3: models imports nemo_rl.algorithms.loss_functions (algorithms)"]


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_every_layer_exists(layer):
    assert (PACKAGE / layer).is_dir()
