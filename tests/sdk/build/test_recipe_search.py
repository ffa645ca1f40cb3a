"""The static ONNX recipe search: alternates are tried only when the default recipe does
not pay, within the time budget, each measured and recorded; a faster recipe must not be
less faithful than the default by more than the slack."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sdk.build import BuildMetadata, QuantizeOptions, build_bundle, generate_key
from sdk.build._quantize import quantize
from sdk.build._quantize_onnx import Recipe, alternate_recipes
from sdk.build._recipe_search import relative_error, search_recipes
from sdk.build.datasets import Dataset
from sdk.build.model_io import open_model
from tests.support.models import make_onnx_conv

RNG = np.random.default_rng(7)


@pytest.fixture(scope="module")
def conv(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("conv")
    model = make_onnx_conv(work / "conv.onnx", size=32)
    x = RNG.random((16, 3, 32, 32), dtype=np.float32)
    calib = Dataset({"x": x})
    np.savez(work / "calib.npz", x=x)
    cases = [{"x": RNG.random((1, 3, 32, 32), dtype=np.float32)} for _ in range(3)]
    with open_model(model) as m:
        reference = [dict(m.predict(c)) for c in cases]
    return {
        "model": model,
        "calib": calib,
        "calib_path": work / "calib.npz",
        "cases": cases,
        "reference": reference,
        "work": work,
    }


def _search(conv: dict[str, Any], limits: tuple[float | None, float | None], budget: float) -> Any:
    def quantize_with(recipe: Recipe | None, out: Path) -> Any:
        return quantize(
            conv["model"], out, scheme="static", calibration=conv["calib"], recipe=recipe
        )

    first = quantize_with(None, conv["work"] / "default.onnx")
    return search_recipes(
        conv["model"],
        first,
        quantize_with=quantize_with,
        work=conv["work"],
        cases=conv["cases"],
        reference=conv["reference"],
        runtime="onnxruntime",
        limits=limits,
        budget_s=budget,
    )


def test_a_default_recipe_that_pays_is_kept_without_trying_others(conv: dict[str, Any]) -> None:
    result, record = _search(conv, (None, None), budget=120)
    assert record["chosen"] == "default"
    assert [t["recipe"] for t in record["tried"]] == ["default"]
    assert result.details["format"] == "QDQ"


def test_when_nothing_pays_every_alternate_is_tried_and_recorded(conv: dict[str, Any]) -> None:
    # No recipe is 10 000 times faster than fp32: every one misses the latency limit.
    result, record = _search(conv, (None, 1e-4), budget=600)
    names = [t["recipe"] for t in record["tried"]]
    assert names == [
        "default",
        *(r.name for r in alternate_recipes(bool(result.details["per_channel"]))),
    ]
    assert record["chosen"] == "default"
    measured = [t for t in record["tried"] if "failed" not in t]
    assert all(not t["pays"] and t["latency_ratio"] > 0 and t["error"] >= 0 for t in measured)
    # The alternates really differ: the QOperator ones hold integer operators.
    assert any(t["recipe"].startswith("QOperator") for t in measured[1:])


def test_the_time_budget_bounds_the_search(conv: dict[str, Any]) -> None:
    _, record = _search(conv, (None, 1e-4), budget=0)
    assert [t["recipe"] for t in record["tried"]] == ["default"]


def test_relative_error_is_the_mean_difference_over_each_outputs_range() -> None:
    reference = [{"y": np.array([0.0, 10.0])}, {"y": np.array([5.0, 5.0])}]
    candidate = [{"y": np.array([1.0, 10.0])}, {"y": np.array([5.0, 4.0])}]
    # |diff| means 0.5 and 0.5, range 10.
    assert relative_error(reference, candidate) == pytest.approx(0.05)


def test_a_build_records_the_search_in_the_manifest(conv: dict[str, Any], tmp_path: Path) -> None:
    key = generate_key(tmp_path / "release", b"secret")
    result = build_bundle(
        conv["model"],
        tmp_path / "conv.edgeship",
        metadata=BuildMetadata(name="conv", version="1", sequence=1),
        keys=[key],
        quantize=QuantizeOptions("static", calibration=conv["calib_path"], max_latency_ratio=None),
    )
    search = result.manifest.quantization.details["recipe_search"]
    assert search["chosen"] == "default"
    assert search["tried"][0]["pays"] is True
