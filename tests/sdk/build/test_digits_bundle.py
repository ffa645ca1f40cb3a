"""The quickstart's digits bundle on a device: which output telemetry watches, and what
drift its validation traffic shows against the reference built from its calibration set.
"""

from __future__ import annotations

import runpy
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.serve import ModelSlot
from agent.serve.runtimes import load_model
from agent.telemetry import Metrics, ObservedPredictor
from agent.telemetry._drift import DriftMonitor, psi_band
from sdk.build import BuildMetadata, QuantizeOptions, build_bundle, generate_key, load_dataset

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
WINDOW_ROWS = 300  # the monitor's minimum: the quickstart's windows are about this size


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build = runpy.run_path(str(EXAMPLES / "digits" / "train.py"))["build"]
    paths: dict[str, Path] = build(tmp_path_factory.mktemp("digits"))
    return paths


@pytest.fixture(scope="module")
def bundle(
    digits: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Manifest, Path]:
    """The quickstart's v1: float32, drift reference from the calibration set, evaluated."""
    tmp = tmp_path_factory.mktemp("bundle")
    key = generate_key(tmp / "release", b"secret")
    result = build_bundle(
        digits["onnx"],
        tmp / "digits.edgeship",
        metadata=BuildMetadata(name="digits", version="1.0.0", sequence=1),
        keys=[key],
        quantize=QuantizeOptions(
            calibration=digits["calibration"], validation=digits["validation"]
        ),
    )
    with result.path.open("rb") as f:
        verified = verify_bundle(
            f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=tmp / "x"
        )
    return verified.manifest, tmp / "x"


def test_the_manifest_names_the_probabilities_not_the_label_as_the_scores_output(
    bundle: tuple[Manifest, Path],
) -> None:
    manifest, _ = bundle
    assert [o.name for o in manifest.model.outputs] == ["label", "probabilities"]
    assert manifest.model.scores_output == "probabilities"
    assert manifest.evaluation is not None
    assert manifest.evaluation["original"]["accuracy"] > 0.95


@pytest.mark.parametrize("declared", [True, False], ids=["schema-1.1", "schema-1.0"])
def test_the_agent_reports_the_confidence_of_the_digits_classifier(
    bundle: tuple[Manifest, Path], digits: dict[str, Path], declared: bool
) -> None:
    manifest, model_dir = bundle
    if not declared:  # as a bundle built before the field existed: the agent finds it
        manifest = replace(
            manifest, schema_version="1.0", model=replace(manifest.model, scores_output=None)
        )
    slot = ModelSlot()
    slot.swap(load_model(manifest, model_dir, "onnxruntime"), "digest")
    predictor = ObservedPredictor(slot, Metrics(), serving=lambda: slot.digest)
    drift = predictor.model_changed("digest", manifest)
    assert drift is not None
    x = load_dataset(digits["validation"]).inputs["x"]
    for row in x[:20]:
        predictor.predict({"x": row[None]})
    outputs = drift.snapshot()["outputs"]
    # Watching the label instead gave "values" with a mean of about 4.5.
    assert outputs["kind"] == "top_score"
    assert 0.9 < outputs["mean"] <= 1.0
    assert sum(outputs["histogram"]["counts"]) == outputs["n"] >= 1


def test_validation_traffic_against_the_calibration_reference_reads_stable(
    bundle: tuple[Manifest, Path], digits: dict[str, Path]
) -> None:
    manifest, _ = bundle
    assert manifest.drift_reference is not None
    assert manifest.drift_reference.sample_count == 300
    x = load_dataset(digits["validation"]).inputs["x"]
    monitor = DriftMonitor(manifest.drift_reference, max_rows_per_sample=1, max_samples_per_s=1e12)
    bands, classic = [], []
    for window in range(2 * len(x) // WINDOW_ROWS):  # the validation set, cycled twice
        for i in range(window * WINDOW_ROWS, (window + 1) * WINDOW_ROWS):
            monitor.observe({"x": x[i % len(x)][None]})
        snap = monitor.snapshot()
        bands.append(snap["band"])
        classic.append(psi_band(snap["inputs"][0]["psi_max"]))
    assert bands == ["stable"] * len(bands)
    # What the classic bands said of the same windows (worst-feature PSI up to ~0.14).
    assert "moderate" in classic
