"""The package layering (issue 15): every import inside ``model/`` points down, and ``model/`` never imports
``evaluation/``.

Layers, bottom to top: ``utils`` → ``adapters``, ``jobs``, ``maps``, ``sam`` → ``attention`` → ``vis`` → the entry
points at the top of ``model/`` (API, settings, stage drivers, cache, web demo) and ``selftest``. A module may import
its own subpackage and any lower layer. Imports under ``if TYPE_CHECKING:`` are annotations only, never executed, so
they are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "model"
#: subpackage → its layer; anything else in model/ (the top-level modules and selftest/) is the top layer
LAYERS = {"utils": 0, "adapters": 1, "jobs": 1, "maps": 1, "sam": 1, "attention": 2, "vis": 3}
TOP = 4


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def runtime_imports(tree: ast.AST) -> list[str]:
    """First-party modules a file imports when it runs (``if TYPE_CHECKING:`` blocks skipped)."""
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return [name for name in found if name.split(".")[0] in ("model", "evaluation")]


def test_model_imports_point_down_and_never_into_evaluation():
    upward, into_evaluation = [], []
    for path in sorted(MODEL.rglob("*.py")):
        module = ".".join(path.relative_to(MODEL.parent).with_suffix("").parts)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for imported in runtime_imports(tree):
            if imported.startswith("evaluation"):
                into_evaluation.append(f"{module} → {imported}")
            elif imported.split(".")[:2] != module.split(".")[:2] and layer_of(imported) >= layer_of(module) \
                    and layer_of(module) < TOP:
                upward.append(f"{module} → {imported}")
    assert not into_evaluation, into_evaluation
    assert not upward, upward


def test_no_relative_imports_in_model():
    """Absolute imports only: a moved module keeps its imports readable and greppable."""
    relative = [str(path.relative_to(MODEL.parent)) for path in MODEL.rglob("*.py")
                if any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(ast.parse(path.read_text())))]
    assert not relative, relative
