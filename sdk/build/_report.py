"""The evaluation report: both models side by side, and the build gates applied to it.

Plain frozen data with two renderings: :meth:`EvaluationReport.to_json` for the
manifest's ``evaluation`` field and ``--json``, :meth:`EvaluationReport.to_table` for
people. :func:`sdk.build.evaluate` fills it in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "EvaluationReport",
    "Fidelity",
    "GateResult",
    "Gates",
    "LatencyStats",
    "ModelMeasurement",
    "apply_gates",
]


@dataclass(frozen=True)
class LatencyStats:
    """Single-sample latency of ``runs`` timed runs, through the agent's ``Model.predict``.

    ``threads=0`` is the agent's default threading (one thread for small models, the
    runtime's default otherwise). Percentiles are nearest rank
    (:func:`agent.plumbing.stats.percentile`): each is the time of a run that happened.
    """

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

    agreement: float | None  # top-1 agreement on the class scores output, else None
    max_abs_diff: float
    mean_cosine: float
    min_cosine: float


@dataclass(frozen=True)
class Gates:
    """Build gates. Accuracy drop is in percentage points, agreement a fraction in [0, 1].

    ``max_p95_ms`` applies to the quantized model's single-threaded p95, the setting
    closest to a small device, defined as the device's health gate and probation define
    it (nearest rank); ``max_size_mb`` to its file size (MB = 10^6 bytes).
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
