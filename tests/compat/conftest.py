"""Deselect the interpreter runs nobody asked for (tests/compat/_interpreters.py)."""

from __future__ import annotations

import pytest

from tests.compat._interpreters import arm64_requested, python_selected


def _asked(item: pytest.Item) -> bool:
    module = item.module.__name__ if isinstance(item, pytest.Function) else ""
    if module.endswith("test_arm64"):
        return arm64_requested()
    if module.endswith("test_pythons") and isinstance(item, pytest.Function):
        version = getattr(item, "callspec", None) and item.callspec.params.get("version")
        if version is not None:
            return python_selected(version, cheap=getattr(item.function, "cheap", False))
    return True


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    dropped = [item for item in items if not _asked(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if _asked(item)]
