"""Evaluation side by side, gates with margins, and golden tolerances from measurement."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
from ai_edge_litert.interpreter import Interpreter
from rich.console import Console

from agent.bundle.manifest import Manifest, TensorSpec
from agent.errors import ConfigError, InputValidationError
from agent.plumbing.stats import percentile
from sdk.build import Gates, evaluate, quantize
from sdk.build._evaluate import scores_index
from sdk.build.datasets import Dataset
from sdk.build.model_io import open_model
from tests.support.bundles import make_manifest
from tests.support.models import make_onnx_mlp, make_tflite_mlp

RUNS = 5  # latency runs: enough to exercise the code, timing is not asserted here


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval")
    calib = Dataset({"x": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)})
    paths = {
        "onnx": make_onnx_mlp(d / "mlp.onnx"),
        "other": make_onnx_mlp(d / "other.onnx", seed=7),  # unrelated weights
        "tflite": make_tflite_mlp(d / "mlp.tflite"),
    }
    paths["onnx_q"] = quantize(
        paths["onnx"], d / "q.onnx", scheme="dynamic", calibration=calib
    ).path
    paths["onnx_static"] = quantize(
        paths["onnx"], d / "qs.onnx", scheme="static", calibration=calib
    ).path
    paths["tflite_q"] = quantize(
        paths["tflite"], d / "q.tflite", scheme="static", calibration=calib
    ).path
    return paths


@pytest.fixture(scope="module")
def inputs() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((150, 64)).astype(np.float32)


def _labelled_by(model: Path, x: np.ndarray) -> Dataset:
    """Labels = the model's own top-1: its accuracy is exactly 1."""
    with open_model(model) as m:
        labels = m.predict({"x": x})["probs"].argmax(axis=1)
    return Dataset({"x": x}, labels)


def test_accuracy_and_agreement_are_measured_side_by_side(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(
        work["tflite"], work["tflite_q"], _labelled_by(work["tflite"], inputs), latency_runs=RUNS
    )
    assert report.original.accuracy == 1.0
    assert report.fidelity.agreement is not None
    assert report.quantized.accuracy == pytest.approx(report.fidelity.agreement)
    assert report.accuracy_drop_points == pytest.approx(100 * (1 - report.fidelity.agreement))
    assert report.samples == 150
    assert report.quantized.size_bytes < report.original.size_bytes


def test_identical_models_have_perfect_fidelity(work: dict[str, Path], inputs: np.ndarray) -> None:
    report = evaluate(work["onnx"], work["onnx"], Dataset({"x": inputs}), latency_runs=RUNS)
    assert report.fidelity.agreement == 1.0
    assert report.fidelity.max_abs_diff == 0.0
    assert report.fidelity.min_cosine == pytest.approx(1.0)
    assert report.original.accuracy is None


def test_latency_is_reported_for_one_and_default_threads(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(work["onnx"], work["onnx_q"], Dataset({"x": inputs}), latency_runs=RUNS)
    for m in (report.original, report.quantized):
        assert [s.threads for s in m.latency] == [1, 0]
        for s in m.latency:
            assert s.runs == RUNS
            assert 0 < s.p50_ms <= s.p95_ms


def test_a_model_that_disagrees_fails_the_agreement_gate_by_its_margin(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(
        work["onnx"],
        work["other"],
        _labelled_by(work["onnx"], inputs),
        gates=Gates(min_agreement=0.99, max_accuracy_drop=0.5, max_size_mb=1.0),
        latency_runs=RUNS,
    )
    assert not report.passed
    failed = {g.name: g for g in report.failed_gates}
    assert set(failed) == {"min_agreement", "max_accuracy_drop"}
    agreement = failed["min_agreement"]
    assert agreement.measured == report.fidelity.agreement
    assert agreement.margin == pytest.approx(report.fidelity.agreement - 0.99)
    drop = failed["max_accuracy_drop"]
    assert drop.margin == pytest.approx(0.5 - report.accuracy_drop_points)
    assert drop.margin < 0
    size = next(g for g in report.gates if g.name == "max_size_mb")
    assert size.passed
    assert size.margin == pytest.approx(1.0 - report.quantized.size_bytes / 1e6)


def test_size_and_latency_gates_fail_when_the_limit_is_below_the_measurement(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(
        work["onnx"],
        work["onnx_q"],
        Dataset({"x": inputs}),
        gates=Gates(max_size_mb=0.000001, max_p95_ms=0.0),
        latency_runs=RUNS,
    )
    assert {g.name for g in report.failed_gates} == {"max_size_mb", "max_p95_ms"}
    p95 = next(g for g in report.gates if g.name == "max_p95_ms")
    assert p95.measured == report.quantized.p95_ms(1)


def test_accuracy_gate_without_labels_fails_rather_than_passing_silently(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(
        work["onnx"],
        work["onnx"],
        Dataset({"x": inputs}),
        gates=Gates(max_accuracy_drop=1.0),
        latency_runs=RUNS,
    )
    (gate,) = report.gates
    assert not gate.passed
    assert gate.measured is None


def test_report_json_is_plain_and_fits_the_manifest(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    report = evaluate(
        work["tflite"],
        work["tflite_q"],
        _labelled_by(work["tflite"], inputs),
        gates=Gates(min_agreement=0.5),
        latency_runs=RUNS,
    )
    doc = report.to_json()
    assert json.loads(json.dumps(doc, allow_nan=False)) == doc
    assert doc["passed"] is True
    assert doc["gates"][0]["name"] == "min_agreement"
    manifest = make_manifest(evaluation=doc)
    assert Manifest.from_bytes(manifest.to_bytes()).evaluation == doc


def test_table_shows_the_failed_gate(work: dict[str, Path], inputs: np.ndarray) -> None:
    report = evaluate(
        work["onnx"],
        work["other"],
        Dataset({"x": inputs}),
        gates=Gates(min_agreement=0.99),
        latency_runs=RUNS,
    )
    console = Console(record=True, width=200)
    console.print(report.to_table())
    text = console.export_text()
    assert "FAIL" in text
    assert "top-1 agreement" in text


def test_evaluation_reports_progress(work: dict[str, Path], inputs: np.ndarray) -> None:
    seen: list[tuple[str, int, int]] = []
    evaluate(
        work["onnx"],
        work["onnx_q"],
        Dataset({"x": inputs}),
        latency_runs=RUNS,
        progress=lambda *a: seen.append(a),
    )
    assert ("evaluate", 3, 3) in seen  # 150 samples in batches of 64
    assert seen[-1] == ("latency", 2, 2)


def test_empty_or_mismatched_validation_data_is_a_config_error(work: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="empty"):
        evaluate(work["onnx"], work["onnx"], Dataset({"x": np.zeros((0, 64), np.float32)}))
    with pytest.raises(ConfigError, match="expects"):
        evaluate(
            work["onnx"], work["onnx"], Dataset({"a": np.zeros((2, 64)), "b": np.zeros((2, 1))})
        )


def test_int8_io_is_quantized_and_dequantized_in_float32_as_the_agent_does(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    interp = Interpreter(model_path=str(work["tflite_q"]))
    interp.resize_tensor_input(0, inputs.shape)
    interp.allocate_tensors()
    (inp,), (out,) = interp.get_input_details(), interp.get_output_details()
    (s_in, zp_in), (s_out, zp_out) = inp["quantization"], out["quantization"]
    q = np.rint(inputs / np.float32(s_in)) + np.float32(zp_in)
    interp.set_tensor(inp["index"], np.clip(q, -128, 127).astype(np.int8))
    interp.invoke()
    raw = interp.get_tensor(out["index"])
    with open_model(work["tflite_q"]) as model:
        probs = model.predict({"x": inputs})["probs"]
    assert probs.dtype == np.float32
    np.testing.assert_array_equal(
        probs, (raw.astype(np.float32) - np.float32(zp_out)) * np.float32(s_out)
    )


def test_samples_a_device_would_refuse_are_refused_by_the_evaluation(
    work: dict[str, Path], inputs: np.ndarray
) -> None:
    x = inputs.copy()
    x[3, 5] = np.nan
    with pytest.raises(InputValidationError, match="NaN"):
        evaluate(work["onnx"], work["onnx_q"], Dataset({"x": x}), latency_runs=RUNS)


class _Clock:
    """A ``time`` stand-in whose timed calls (a start and an end reading) last as scripted."""

    def __init__(self, durations_s: list[float]) -> None:
        self._durations = iter(durations_s)
        self._now = 0.0
        self._ending = False

    def perf_counter(self) -> float:
        if self._ending:
            self._now += next(self._durations)
        self._ending = not self._ending
        return self._now


def test_latency_percentiles_are_nearest_rank_as_on_the_device(
    work: dict[str, Path], inputs: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = 20
    original_ms = np.random.default_rng(0).permutation(np.arange(1.0, runs + 1))
    # Runs alternate between the two models: original, quantized, original, ...
    scripted = [d / 1e3 for pair in zip(original_ms, 2 * original_ms, strict=True) for d in pair]
    monkeypatch.setattr(importlib.import_module("sdk.build._evaluate"), "time", _Clock(scripted))
    report = evaluate(
        work["onnx"], work["onnx_q"], Dataset({"x": inputs[:4]}), latency_runs=runs, threads=(1,)
    )
    (o,), (q,) = report.original.latency, report.quantized.latency
    # Nearest rank: the 10th and 19th of 20 sorted runs (np.percentile would say 10.5, 19.05).
    assert (o.p50_ms, o.p95_ms) == pytest.approx((10.0, 19.0))
    assert (q.p50_ms, q.p95_ms) == pytest.approx((20.0, 38.0))
    assert o.p95_ms == pytest.approx(percentile(original_ms.tolist(), 0.95))


def test_the_scores_output_is_found_on_the_shapes_the_model_produced() -> None:
    # An integer output of the right shape is no scores output, and a class dimension the
    # file leaves dynamic is known once the model has run.
    specs = (TensorSpec("ids", "int64", (None, 10)), TensorSpec("p", "float32", (None, None)))
    outputs = [np.zeros((4, 10), np.int64), np.zeros((4, 3), np.float32)]
    assert scores_index(specs, outputs) == 1
    assert scores_index(specs[:1], outputs[:1]) is None
