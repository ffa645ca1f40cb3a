"""A verified, extracted bundle of a real model, for the health gate's tests."""

from __future__ import annotations

from pathlib import Path

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest
from agent.serve.runtimes import Model, load_model
from tests.support.bundles import NOW
from tests.support.lifecycle import POLICY, make_model_bundle


def staged(tmp_path: Path, **kwargs: object) -> tuple[Model, Manifest, Path]:
    bundle = make_model_bundle(tmp_path / "src", seed=1, sequence=1, **kwargs)  # type: ignore[arg-type]
    target = tmp_path / "v"
    with bundle.path.open("rb") as f:
        verified = verify_bundle(f, POLICY, now=NOW, extract_to=target)
    return load_model(verified.manifest, target, "onnxruntime"), verified.manifest, target


def staged_files(tmp_path: Path, **kwargs: object) -> tuple[Manifest, Path]:
    """A verified, extracted bundle, for checks that load the model themselves."""
    model, manifest, target = staged(tmp_path, **kwargs)
    model.close()
    return manifest, target
