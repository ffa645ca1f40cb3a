"""The agent stays light: it never imports the SDK, build-only packages, or a runtime eagerly."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import agent

AGENT_DIR = Path(agent.__file__).parent
BUILD_ONLY = {"sdk", "onnx", "litert_quantizer", "rich", "sklearn", "skl2onnx", "sympy"}
RUNTIMES = {"onnxruntime", "ai_edge_litert", "tflite_runtime"}


def _sources() -> list[Path]:
    return sorted(AGENT_DIR.rglob("*.py"))


def _imports(tree: ast.AST, *, module_level_only: bool) -> set[str]:
    found: set[str] = set()
    nodes = tree.body if module_level_only and isinstance(tree, ast.Module) else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(AGENT_DIR)))
def test_agent_module_never_imports_sdk_or_build_only_packages(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not _imports(tree, module_level_only=False) & BUILD_ONLY


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(AGENT_DIR)))
def test_agent_module_imports_runtimes_only_lazily(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    assert not _imports(tree, module_level_only=True) & RUNTIMES


def test_importing_every_agent_module_loads_no_sdk_build_or_runtime_package() -> None:
    names = [m.name for m in pkgutil.walk_packages([str(AGENT_DIR)], prefix="agent.")]
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120
    )
    loaded = set(json.loads(out.stdout))
    assert len(names) > 10
    assert not loaded & (BUILD_ONLY | RUNTIMES)
