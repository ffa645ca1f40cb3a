"""Evaluate a quantized model against its float original, apply gates, derive tolerances.

:func:`evaluate` runs both models on a validation set with the SDK-side runtimes
(onnxruntime, LiteRT) and reports, side by side: top-1 accuracy (with labels), fidelity
(top-1 agreement, max abs difference, cosine similarity of outputs), file size and
single-sample latency p50/p95 single-threaded and with the runtime's default threads.
Latency runs of the two models are interleaved so that background load on the machine
hits both alike. :class:`Gates` turn the report into pass/fail with margins.

:func:`derive_golden` computes a bundle's golden outputs and the tolerance the agent's
health check uses; see its docstring for how the tolerance follows from measurement.
"""

from __future__ import annotations

import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError
from agent.bundle.manifest import QuantParams, Tolerance
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import ModelFormat, detect_format
from sdk.build.quantize import _version

__all__ = [
    "EvaluationReport",
    "Fidelity",
    "GateResult",
    "Gates",
    "Golden",
    "LatencyStats",
    "ModelMeasurement",
    "ModelRunner",
    "apply_gates",
    "derive_golden",
    "evaluate",
    "open_model",
]

Array = npt.NDArray[Any]
DEFAULT_LATENCY_RUNS = 100
_WARMUP_RUNS = 5
_BATCH = 64


# --- running models --------------------------------------------------------------------


@dataclass(frozen=True)
class _IO:
    name: str
    dtype: np.dtype[Any]
    batch_dim: int | None  # the first dimension if fixed, None if dynamic
    quant: QuantParams | None  # set for int8/uint8 tensors of a quantized interface


class ModelRunner:
    """One model in one runtime with a fixed thread count, exchanging float arrays.

    int8 inputs and outputs (static TFLite) are quantized / dequantized with the model's
    own scale and zero point, exactly as the agent does with the manifest's parameters.
    """

    def __init__(
        self, path: Path, fmt: ModelFormat, threads: int, *, reference_kernels: bool = False
    ) -> None:
        self.path = path
        self.format = fmt
        self.threads = threads
        self._resized: int | None = None
        if fmt == "onnx":
            import onnxruntime as ort  # noqa: PLC0415 - loaded when used

            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            if reference_kernels:
                # No fusion: QDQ runs as separate (de)quantize + float ops, the reference
                # semantics, instead of fused integer kernels.
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            try:
                self._ort = ort.InferenceSession(
                    str(path), options, providers=["CPUExecutionProvider"]
                )
            except Exception as exc:  # onnxruntime raises untyped pybind errors
                raise ConfigError(f"onnxruntime cannot load {path}: {exc}") from exc
            self.inputs = tuple(
                _IO(i.name, _ort_dtype(i.type), _fixed(i.shape), None)
                for i in self._ort.get_inputs()
            )
            self.outputs = tuple(
                _IO(o.name, _ort_dtype(o.type), None, None) for o in self._ort.get_outputs()
            )
        else:
            from ai_edge_litert.interpreter import (  # noqa: PLC0415 - loaded when used
                Interpreter,
                OpResolverType,
            )

            resolver = OpResolverType.BUILTIN_REF if reference_kernels else OpResolverType.AUTO
            try:
                self._tfl = Interpreter(
                    model_path=str(path),
                    num_threads=threads or None,
                    experimental_op_resolver_type=resolver,
                )
                self._tfl.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ConfigError(f"LiteRT cannot load {path}: {exc}") from exc
            self._in_details = self._tfl.get_input_details()
            self._out_details = self._tfl.get_output_details()
            self.inputs = tuple(_tfl_io(d) for d in self._in_details)
            self.outputs = tuple(_tfl_io(d) for d in self._out_details)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def run(self, feeds: Mapping[str, Array]) -> list[npt.NDArray[np.float64]]:
        """Run one batch; outputs in model order, dequantized, as float64.

        Raises:
            ConfigError: an input is missing or the runtime rejects the batch.
        """
        missing = [i.name for i in self.inputs if i.name not in feeds]
        if missing:
            raise ConfigError(f"no data for model input(s) {missing} of {self.path}")
        batch = len(next(iter(feeds.values())))
        if any(i.batch_dim == 1 for i in self.inputs) and batch > 1:
            # A model exported for batch 1: run sample by sample.
            parts = [self.run({k: v[j : j + 1] for k, v in feeds.items()}) for j in range(batch)]
            return [np.concatenate(p) for p in zip(*parts, strict=True)]
        prepared = {i.name: _to_model(feeds[i.name], i) for i in self.inputs}
        try:
            raw = self._run_ort(prepared) if self.format == "onnx" else self._run_tfl(prepared)
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"running {self.path} failed: {exc}") from exc
        return [_from_model(r, o) for r, o in zip(raw, self.outputs, strict=True)]

    def run_dataset(self, data: Dataset, batch_size: int = _BATCH) -> list[npt.NDArray[np.float64]]:
        """All samples of ``data``, outputs concatenated along the sample axis."""
        parts = [self.run(b) for b in data.batches(batch_size)]
        return [np.concatenate(p) for p in zip(*parts, strict=True)]

    def _run_ort(self, feeds: dict[str, Array]) -> list[Array]:
        return [np.asarray(o) for o in self._ort.run(None, feeds)]

    def _run_tfl(self, feeds: dict[str, Array]) -> list[Array]:
        batch = len(next(iter(feeds.values())))
        if self._resized != batch and all(i.batch_dim is None for i in self.inputs):
            for d in self._in_details:
                self._tfl.resize_tensor_input(d["index"], [batch, *d["shape"][1:]])
            self._tfl.allocate_tensors()
            self._resized = batch
        for d in self._in_details:
            self._tfl.set_tensor(d["index"], feeds[d["name"]])
        self._tfl.invoke()
        return [self._tfl.get_tensor(d["index"]).copy() for d in self._out_details]


def open_model(
    path: Path | str, *, threads: int = 1, reference_kernels: bool = False
) -> ModelRunner:
    """A runner for a .onnx (onnxruntime) or .tflite (LiteRT) model; ``threads=0`` = default.

    ``reference_kernels`` selects a second, independent implementation of the same
    arithmetic: LiteRT's reference kernels (no XNNPACK), or onnxruntime without graph
    fusion. :func:`derive_golden` uses it to measure how much kernels may disagree.

    Raises:
        ConfigError: unknown format or the runtime cannot load the model.
    """
    p = Path(path)
    return ModelRunner(p, detect_format(p), threads, reference_kernels=reference_kernels)


def _fixed(shape: Sequence[Any]) -> int | None:
    return shape[0] if shape and isinstance(shape[0], int) else None


_ORT_DTYPES: Mapping[str, np.dtype[Any]] = {
    "tensor(float)": np.dtype(np.float32),
    "tensor(double)": np.dtype(np.float64),
    "tensor(float16)": np.dtype(np.float16),
    "tensor(int8)": np.dtype(np.int8),
    "tensor(uint8)": np.dtype(np.uint8),
    "tensor(int32)": np.dtype(np.int32),
    "tensor(int64)": np.dtype(np.int64),
    "tensor(bool)": np.dtype(np.bool_),
}


def _ort_dtype(type_name: str) -> np.dtype[Any]:
    return _ORT_DTYPES.get(type_name, np.dtype(np.float32))


def _tfl_io(d: Mapping[str, Any]) -> _IO:
    dtype = np.dtype(d["dtype"])
    scale, zero_point = d["quantization"]
    quant = (
        QuantParams(float(scale), int(zero_point))
        if dtype in (np.dtype(np.int8), np.dtype(np.uint8)) and scale > 0
        else None
    )
    signature = d.get("shape_signature")
    dims = list(signature) if signature is not None and len(signature) else list(d["shape"])
    batch_dim = None if not dims or dims[0] == -1 else int(dims[0])
    return _IO(d["name"], dtype, batch_dim, quant)


def _to_model(x: Array, io: _IO) -> Array:
    if io.quant is None:
        return np.ascontiguousarray(x, dtype=io.dtype)
    info = np.iinfo(io.dtype)
    q = np.round(np.asarray(x, np.float64) / io.quant.scale) + io.quant.zero_point
    return np.clip(q, info.min, info.max).astype(io.dtype)


def _from_model(y: Array, io: _IO) -> npt.NDArray[np.float64]:
    if io.quant is None:
        return np.asarray(y, np.float64)
    return (np.asarray(y, np.float64) - io.quant.zero_point) * io.quant.scale


# --- the report ------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyStats:
    """Single-sample latency of ``runs`` timed runs; ``threads=0`` is the runtime default."""

    threads: int
    runs: int
    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class ModelMeasurement:
    path: str
    size_bytes: int
    accuracy: float | None  # top-1, fraction of samples, with labels only
    latency: tuple[LatencyStats, ...]

    def p95_ms(self, threads: int) -> float | None:
        return next((s.p95_ms for s in self.latency if s.threads == threads), None)

    def p50_ms(self, threads: int) -> float | None:
        return next((s.p50_ms for s in self.latency if s.threads == threads), None)


@dataclass(frozen=True)
class Fidelity:
    """How closely the quantized model's outputs follow the original's."""

    agreement: float | None  # top-1 agreement on the first (N, classes) output, else None
    max_abs_diff: float
    mean_cosine: float
    min_cosine: float


@dataclass(frozen=True)
class Gates:
    """Build gates. Accuracy drop is in percentage points, agreement a fraction in [0, 1].

    ``max_p95_ms`` applies to the quantized model's single-threaded p95, the setting
    closest to a small device; ``max_size_mb`` to its file size (MB = 10^6 bytes).
    """

    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    max_p95_ms: float | None = None
    max_size_mb: float | None = None


@dataclass(frozen=True)
class GateResult:
    """``margin`` is how far inside the limit the measurement is; negative = failed by."""

    name: str
    measured: float | None
    limit: float
    passed: bool
    margin: float | None
    unit: str


@dataclass(frozen=True)
class EvaluationReport:
    samples: int
    labelled: bool
    original: ModelMeasurement
    quantized: ModelMeasurement
    fidelity: Fidelity
    gates: tuple[GateResult, ...] = ()
    environment: Mapping[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    @property
    def failed_gates(self) -> tuple[GateResult, ...]:
        return tuple(g for g in self.gates if not g.passed)

    @property
    def accuracy_drop_points(self) -> float | None:
        if self.original.accuracy is None or self.quantized.accuracy is None:
            return None
        return 100.0 * (self.original.accuracy - self.quantized.accuracy)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data (finite numbers only) for the manifest's ``evaluation`` field."""

        def model(m: ModelMeasurement) -> dict[str, Any]:
            return {
                "file": Path(m.path).name,
                "size_bytes": m.size_bytes,
                "accuracy": _num(m.accuracy),
                "latency": [
                    {
                        "threads": s.threads,
                        "runs": s.runs,
                        "p50_ms": _num(s.p50_ms),
                        "p95_ms": _num(s.p95_ms),
                    }
                    for s in m.latency
                ],
            }

        return {
            "samples": self.samples,
            "labelled": self.labelled,
            "original": model(self.original),
            "quantized": model(self.quantized),
            "accuracy_drop_points": _num(self.accuracy_drop_points),
            "fidelity": {
                "agreement": _num(self.fidelity.agreement),
                "max_abs_diff": _num(self.fidelity.max_abs_diff),
                "mean_cosine": _num(self.fidelity.mean_cosine),
                "min_cosine": _num(self.fidelity.min_cosine),
            },
            "gates": [
                {
                    "name": g.name,
                    "measured": _num(g.measured),
                    "limit": g.limit,
                    "passed": g.passed,
                    "margin": _num(g.margin),
                    "unit": g.unit,
                }
                for g in self.gates
            ],
            "passed": self.passed,
            "environment": dict(self.environment),
        }

    def to_table(self) -> Any:
        """A rich Table for people: both models side by side, then the gates."""
        from rich.table import Table  # noqa: PLC0415 - loaded when used

        table = Table(title="evaluation", show_lines=False)
        table.add_column("metric")
        table.add_column("original", justify="right")
        table.add_column("quantized", justify="right")
        table.add_column("gate", justify="right")
        gates = {g.name: g for g in self.gates}

        def gate_cell(name: str) -> str:
            g = gates.get(name)
            if g is None:
                return ""
            verdict = "[green]pass[/green]" if g.passed else "[bold red]FAIL[/bold red]"
            margin = "n/a" if g.margin is None else f"{g.margin:+.4g} {g.unit}"
            return f"{verdict} (limit {g.limit:g} {g.unit}, margin {margin})"

        o, q = self.original, self.quantized
        table.add_row("size", _mb(o.size_bytes), _mb(q.size_bytes), gate_cell("max_size_mb"))
        if self.labelled:
            drop = self.accuracy_drop_points
            table.add_row(
                "top-1 accuracy",
                _pct(o.accuracy),
                f"{_pct(q.accuracy)} ({'' if drop is None else f'{-drop:+.2f} pts'})",
                gate_cell("max_accuracy_drop"),
            )
        f = self.fidelity
        table.add_row("top-1 agreement", "", _pct(f.agreement), gate_cell("min_agreement"))
        table.add_row("max abs diff", "", f"{f.max_abs_diff:.3g}", "")
        table.add_row("cosine (mean / min)", "", f"{f.mean_cosine:.5f} / {f.min_cosine:.5f}", "")
        for s in o.latency:
            label = "1 thread" if s.threads == 1 else "default threads"
            qs = q.p50_ms(s.threads), q.p95_ms(s.threads)
            table.add_row(
                f"latency p50 / p95 ({label})",
                f"{s.p50_ms:.3f} / {s.p95_ms:.3f} ms",
                f"{qs[0]:.3f} / {qs[1]:.3f} ms" if qs[0] is not None and qs[1] is not None else "",
                gate_cell("max_p95_ms") if s.threads == 1 else "",
            )
        return table


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _mb(n: int) -> str:
    return f"{n / 1e6:.3f} MB"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# --- evaluation ------------------------------------------------------------------------


def evaluate(
    original: Path | str,
    quantized: Path | str,
    validation: Dataset,
    *,
    gates: Gates | None = None,
    latency_runs: int = DEFAULT_LATENCY_RUNS,
    threads: Sequence[int] = (1, 0),
    progress: Progress | None = None,
) -> EvaluationReport:
    """Measure ``quantized`` against ``original`` on ``validation`` and apply ``gates``.

    Raises:
        ConfigError: the data set does not fit the models, or the models' outputs differ
            in number or shape.
    """
    if len(validation) == 0:
        raise ConfigError(f"validation data set {validation.source} is empty")
    orig, quant = (
        open_model(original, threads=threads[0]),
        open_model(quantized, threads=threads[0]),
    )
    data = validation.bind(orig.input_names)
    total_batches = math.ceil(len(data) / _BATCH)
    ref_parts: list[list[npt.NDArray[np.float64]]] = []
    q_parts: list[list[npt.NDArray[np.float64]]] = []
    for i, batch in enumerate(data.batches(_BATCH)):
        ref_parts.append(orig.run(batch))
        q_parts.append(quant.run(batch))
        if progress is not None:
            progress("evaluate", i + 1, total_batches)
    ref = [np.concatenate(p) for p in zip(*ref_parts, strict=True)]
    out = [np.concatenate(p) for p in zip(*q_parts, strict=True)]
    if [r.shape for r in ref] != [o.shape for o in out]:
        raise ConfigError(
            f"original and quantized models produce different outputs:"
            f" {[r.shape for r in ref]} vs {[o.shape for o in out]}"
        )
    fidelity = _fidelity(ref, out)
    labels = data.labels
    scores = _scores_index(ref)
    if labels is not None and scores is None:
        raise ConfigError(
            f"labels need a classifier output of shape (N, classes); {original} has"
            f" {[r.shape for r in ref]}"
        )
    acc_o = acc_q = None
    if labels is not None and scores is not None:
        acc_o = float(np.mean(ref[scores].argmax(axis=1) == labels))
        acc_q = float(np.mean(out[scores].argmax(axis=1) == labels))

    latencies: dict[str, list[LatencyStats]] = {"o": [], "q": []}
    sample = {k: v[:1] for k, v in data.inputs.items()}
    for n, t in enumerate(threads):
        runners = (
            (orig, quant)
            if t == threads[0]
            else (open_model(original, threads=t), open_model(quantized, threads=t))
        )
        lo, lq = _interleaved_latency(runners, sample, latency_runs)
        latencies["o"].append(LatencyStats(t, latency_runs, *lo))
        latencies["q"].append(LatencyStats(t, latency_runs, *lq))
        if progress is not None:
            progress("latency", n + 1, len(threads))

    def measurement(path: Path | str, acc: float | None, key: str) -> ModelMeasurement:
        return ModelMeasurement(str(path), Path(path).stat().st_size, acc, tuple(latencies[key]))

    report = EvaluationReport(
        samples=len(data),
        labelled=labels is not None,
        original=measurement(original, acc_o, "o"),
        quantized=measurement(quantized, acc_q, "q"),
        fidelity=fidelity,
        environment=_environment(),
    )
    return replace(report, gates=apply_gates(report, gates or Gates()))


def apply_gates(report: EvaluationReport, gates: Gates) -> tuple[GateResult, ...]:
    """Gate results for ``report``; a gate whose measurement is unavailable fails."""
    results = []

    def upper(name: str, measured: float | None, limit: float, unit: str) -> None:
        margin = None if measured is None else limit - measured
        results.append(
            GateResult(name, measured, limit, margin is not None and margin >= 0, margin, unit)
        )

    if gates.max_accuracy_drop is not None:
        upper("max_accuracy_drop", report.accuracy_drop_points, gates.max_accuracy_drop, "pts")
    if gates.min_agreement is not None:
        agreement = report.fidelity.agreement
        margin = None if agreement is None else agreement - gates.min_agreement
        results.append(
            GateResult(
                "min_agreement",
                agreement,
                gates.min_agreement,
                margin is not None and margin >= 0,
                margin,
                "",
            )
        )
    if gates.max_p95_ms is not None:
        upper("max_p95_ms", report.quantized.p95_ms(1), gates.max_p95_ms, "ms")
    if gates.max_size_mb is not None:
        upper("max_size_mb", report.quantized.size_bytes / 1e6, gates.max_size_mb, "MB")
    return tuple(results)


def _scores_index(outputs: Sequence[npt.NDArray[np.float64]]) -> int | None:
    """The first (N, classes) output: a converter may put a label output before it."""
    return next(
        (i for i, o in enumerate(outputs) if o.ndim == 2 and o.shape[1] > 1),
        None,
    )


def _fidelity(ref: list[npt.NDArray[np.float64]], out: list[npt.NDArray[np.float64]]) -> Fidelity:
    scores = _scores_index(ref)
    agreement = (
        None
        if scores is None
        else float(np.mean(ref[scores].argmax(axis=1) == out[scores].argmax(axis=1)))
    )
    max_abs = max(float(np.max(np.abs(r - o), initial=0.0)) for r, o in zip(ref, out, strict=True))
    # Cosine per sample over all outputs flattened together.
    r = np.concatenate([x.reshape(len(x), -1) for x in ref], axis=1)
    o = np.concatenate([x.reshape(len(x), -1) for x in out], axis=1)
    norms = np.linalg.norm(r, axis=1) * np.linalg.norm(o, axis=1)
    both_zero = norms == 0
    cos = np.where(both_zero, 1.0, (r * o).sum(axis=1) / np.where(both_zero, 1.0, norms))
    return Fidelity(agreement, max_abs, float(cos.mean()), float(cos.min()))


def _interleaved_latency(
    runners: tuple[ModelRunner, ModelRunner], sample: Mapping[str, Array], runs: int
) -> tuple[tuple[float, float], tuple[float, float]]:
    """p50/p95 in ms of both runners, timed alternately so load changes hit both."""
    for _ in range(_WARMUP_RUNS):
        for r in runners:
            r.run(sample)
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for r, t in zip(runners, times, strict=True):
            start = time.perf_counter()
            r.run(sample)
            t.append((time.perf_counter() - start) * 1e3)
    a, b = (np.asarray(t) for t in times)
    return (
        (float(np.percentile(a, 50)), float(np.percentile(a, 95))),
        (float(np.percentile(b, 50)), float(np.percentile(b, 95))),
    )


def _cpu_model() -> str | None:
    """The CPU's marketing name: latency numbers mean little without it."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _environment() -> dict[str, Any]:
    return {
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "onnxruntime": _version("onnxruntime"),
        "ai-edge-litert": _version("ai-edge-litert"),
    }


# --- golden outputs and their tolerance ------------------------------------------------


@dataclass(frozen=True)
class Golden:
    """Golden inputs and expected outputs for the health check, with their tolerance.

    ``spread`` is the largest deviation measured between equivalent executions of the
    model (see :func:`derive_golden`); ``details`` records how the tolerance was set.
    """

    inputs: Mapping[str, Array]
    expected: Mapping[str, npt.NDArray[np.float32]]
    tolerance: Tolerance
    spread: float
    details: Mapping[str, Any]


DEFAULT_SAFETY_FACTOR = 4.0
# Float noise floor, in units of float32 epsilon times the outputs' magnitude.
_FLOAT_FLOOR_EPS = 64


def derive_golden(
    model: Path | str,
    inputs: Dataset,
    *,
    count: int = 8,
    repeats: int = 3,
    threads: Sequence[int] = (1, 0),
    reference_outputs: Mapping[str, Array] | None = None,
    safety_factor: float = DEFAULT_SAFETY_FACTOR,
) -> Golden:
    """Golden inputs (the first ``count`` samples), expected outputs and a tolerance.

    The expected outputs are the model's single-threaded, one-sample-at-a-time outputs
    in the runtime the bundle targets (float, int8 outputs dequantized). The tolerance
    is measured, not picked: the same inputs are run again ``repeats`` times with each
    thread count in ``threads``, sample by sample and as one batch (kernels may pick a
    different blocking or accumulation order for each), once with the runtime's
    reference kernels (a second implementation, standing in for a device's), and, when
    given, ``reference_outputs`` from another runtime are compared too. ``spread`` is the
    largest absolute deviation from the expected outputs seen in all of that. Then

        atol = max(safety_factor * spread, floor)

    where ``floor`` is one output quantization step for int8 outputs (a requantizing
    kernel may round the other way) and otherwise ``64 * eps(float32) * max|expected|``,
    so that bit-identical runs on the build machine still leave room for a device's
    different SIMD width. ``rtol`` is 0: ``atol`` already scales with the outputs.

    Raises:
        ConfigError: the data set does not fit the model.
    """
    base = open_model(model, threads=1)
    data = inputs.bind(base.input_names).take(count)
    golden_inputs = dict(data.inputs)
    expected = _run_each(base, data)
    deviations: dict[str, float] = {}

    def note(label: str, outputs: Sequence[npt.NDArray[np.float64]]) -> None:
        worst = max(
            float(np.max(np.abs(o - e), initial=0.0))
            for o, e in zip(outputs, expected, strict=True)
        )
        deviations[label] = max(worst, deviations.get(label, 0.0))

    for t in threads:
        runner = base if t == 1 else open_model(model, threads=t)
        for _ in range(repeats):
            note(f"threads={t} per-sample", _run_each(runner, data))
            note(f"threads={t} batched", runner.run(data.inputs))
    # Another kernel implementation stands in for the device's (other SIMD width,
    # other rounding of int8 requantization).
    note("reference kernels", _run_each(open_model(model, reference_kernels=True), data))
    if reference_outputs is not None:
        note(
            "reference runtime",
            [np.asarray(reference_outputs[n], np.float64) for n in base.output_names],
        )
    spread = max(deviations.values(), default=0.0)
    steps = [o.quant.scale for o in base.outputs if o.quant is not None]
    magnitude = max(float(np.max(np.abs(e), initial=0.0)) for e in expected)
    float_floor = _FLOAT_FLOOR_EPS * float(np.finfo(np.float32).eps) * max(magnitude, 1.0)
    floor = max([*steps, float_floor])
    atol = max(safety_factor * spread, floor)
    return Golden(
        inputs=golden_inputs,
        expected={
            name: e.astype(np.float32) for name, e in zip(base.output_names, expected, strict=True)
        },
        tolerance=Tolerance(atol=atol, rtol=0.0),
        spread=spread,
        details={
            "method": "max abs deviation across repeats, thread counts, batching,"
            " reference kernels"
            + (", reference runtime" if reference_outputs is not None else "")
            + f"; atol = max({safety_factor:g} x spread, floor)",
            "deviations": deviations,
            "safety_factor": safety_factor,
            "floor": floor,
            "samples": len(data),
        },
    )


def _run_each(runner: ModelRunner, data: Dataset) -> list[npt.NDArray[np.float64]]:
    return runner.run_dataset(data, batch_size=1)
