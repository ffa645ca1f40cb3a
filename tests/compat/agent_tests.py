"""Which of the agent's test files run without the SDK, read from their imports.

The SDK needs Python 3.11; the agent runs from 3.9. A test file of tests/agent runs on
the older Pythons when neither it, nor its conftest.py files, nor the test modules they
import (tests.support and others, transitively) import ``sdk`` or a build-only package.
Read from the source, so a new test file joins the older-Python run by itself, and one
that starts to build bundles leaves it.

Usage: python -m tests.compat.agent_tests   prints one path per line
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

__all__ = ["BUILD_ONLY", "agent_only_test_files"]

ROOT = Path(__file__).resolve().parents[2]
# Packages the agent never depends on: the SDK and what only its build side installs.
BUILD_ONLY = frozenset({"sdk", "onnx", "skl2onnx", "sklearn", "litert_quantizer", "rich"})


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (also inside functions)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@functools.cache
def _needs_build_side(path: Path) -> bool:
    for name in _imports(path):
        if name.split(".")[0] in BUILD_ONLY:
            return True
        module = _test_module(name)
        if module is not None and _needs_build_side(module):
            return True
    return False


def _test_module(name: str) -> Path | None:
    """The file of a ``tests.`` module (or of the module a name is imported from)."""
    parts = name.split(".")
    if parts[0] != "tests":
        return None
    for end in range(len(parts), 1, -1):
        path = ROOT.joinpath(*parts[:end])
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None


def _conftests(test_file: Path) -> list[Path]:
    """The conftest.py files pytest loads for ``test_file``, from tests/ down."""
    here = test_file.parent
    dirs = [here, *here.parents[: len(here.relative_to(ROOT / "tests").parts)]]
    return [d / "conftest.py" for d in dirs if (d / "conftest.py").is_file()]


def agent_only_test_files() -> list[Path]:
    """The test files under tests/agent that import nothing of the SDK, sorted."""
    return sorted(
        p
        for p in (ROOT / "tests" / "agent").rglob("test_*.py")
        if not any(_needs_build_side(f) for f in [p, *_conftests(p)])
    )


if __name__ == "__main__":
    sys.stdout.write("".join(f"{p.relative_to(ROOT)}\n" for p in agent_only_test_files()))
