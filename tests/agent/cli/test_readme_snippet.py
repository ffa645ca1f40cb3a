"""The README's embedded-app snippet runs as printed, and runs again (an app restarts)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from tests.support.bundles import make_policy
from tests.support.lifecycle import KEY, golden_inputs, make_model_bundle

README = Path(__file__).resolve().parents[3] / "README.md"


def test_the_embedded_app_snippet_runs_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [snippet] = [
        block
        for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if "verify_bundle" in block
    ]
    bundle = make_model_bundle(tmp_path / "build", seed=1, sequence=1)
    shutil.copy(bundle.path, tmp_path / "digits-1.0.0.edgeship")
    (tmp_path / "trust.toml").write_bytes(make_policy(KEY).to_toml())
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        scope = {"batch": golden_inputs()["x"]}
        exec(compile(snippet, "README.md", "exec"), scope)
        assert scope["outputs"]["probs"].shape == bundle.outputs.shape
