"""Distribution versions from folder names agree with importlib.metadata."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest

from agent.serve.runtimes import installed_runtimes
from agent.serve.runtimes._dists import installed_version


def test_every_installed_distribution_has_the_version_importlib_metadata_reports() -> None:
    seen = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        seen.setdefault(name, dist.version)  # the first on sys.path wins, as for imports
    assert len(seen) > 50  # the dev environment: numpy, onnxruntime, pytest, ...
    assert {n: installed_version(n) for n in seen} == seen


def test_a_distribution_that_is_not_installed_has_no_version() -> None:
    assert installed_version("edgeship-no-such-runtime") is None


def test_names_match_however_separators_and_case_are_written() -> None:
    expected = metadata.version("onnxruntime")
    assert installed_version("ONNXRuntime") == expected
    assert installed_version("ai.edge-litert") == metadata.version("ai-edge-litert")


def test_egg_info_folders_are_read_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "tflite_runtime-2.14.0-py3.11.egg-info").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    assert installed_version("tflite-runtime") == "2.14.0"


def test_the_runtimes_found_are_the_installed_ones() -> None:
    assert installed_runtimes()["onnxruntime"] == metadata.version("onnxruntime")
