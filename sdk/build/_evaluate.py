"""Evaluate a quantized model against its float original and apply the build gates.

:func:`evaluate` runs both models on a validation set through the agent's own runtime
layer (:func:`sdk.build.model_io.open_model`: the device's input validation and int8
quantize / dequantize) and reports, side by side: top-1 accuracy (with labels), fidelity
(top-1 agreement, max abs difference, cosine similarity of outputs), file size and the
single-sample latency of ``Model.predict``, p50/p95, single-threaded and with the agent's
default threads. Latency runs of the two models are interleaved so that background load
on the machine hits both alike, and their percentiles are nearest rank
(:func:`agent.plumbing.stats.percentile`), so ``--max-p95-ms`` means what the device's
health gate and probation mean by p95. :class:`Gates` turn the report into pass/fail with
margins (:mod:`sdk.build._report`).

Golden outputs and their tolerance are derived in :mod:`sdk.build.golden`.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import TensorSpec, scores_output
from agent.errors import ConfigError
from agent.plumbing.stats import percentile
from agent.serve.runtimes import Model, installed_runtimes
from sdk.build._report import (
    EvaluationReport,
    Fidelity,
    GateResult,
    Gates,
    LatencyStats,
    ModelMeasurement,
    apply_gates,
)
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import open_model, run_dataset

__all__ = [
    "DEFAULT_LATENCY_RUNS",
    "EvaluationReport",
    "Fidelity",
    "GateResult",
    "Gates",
    "LatencyStats",
    "ModelMeasurement",
    "apply_gates",
    "evaluate",
]

DEFAULT_LATENCY_RUNS = 100
_WARMUP_RUNS = 5
_BATCH = 64

Outputs = list[npt.NDArray[np.float64]]


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

    ``threads`` are the intra-op thread counts latency is measured with (0: the agent's
    default); outputs are computed with the first.

    Raises:
        ConfigError: the data set does not fit the models, or the models' outputs differ
            in number or shape.
        InputValidationError: the samples break the model's input rules (a device would
            refuse them too).
    """
    if len(validation) == 0:
        raise ConfigError(f"validation data set {validation.source} is empty")
    paths = (Path(original), Path(quantized))
    with contextlib.ExitStack() as stack:
        models = tuple(stack.enter_context(open_model(p, threads=threads[0])) for p in paths)
        data = validation.bind([s.name for s in models[0].spec.inputs])
        ref, out = _outputs(models[0], models[1], data, progress)
        sample = {k: v[:1] for k, v in data.inputs.items()}
        latencies = _latencies(
            paths, models, sample, threads=threads, runs=latency_runs, progress=progress
        )
    if [r.shape for r in ref] != [o.shape for o in out]:
        raise ConfigError(
            f"original and quantized models produce different outputs:"
            f" {[r.shape for r in ref]} vs {[o.shape for o in out]}"
        )
    scores = scores_index(models[0].spec.outputs, ref)
    accuracy = _accuracy(paths[0], ref, out, data.labels, scores)
    measured = [
        ModelMeasurement(str(p), p.stat().st_size, acc, tuple(lat))
        for p, acc, lat in zip(paths, accuracy, latencies, strict=True)
    ]
    report = EvaluationReport(
        samples=len(data),
        labelled=data.labels is not None,
        original=measured[0],
        quantized=measured[1],
        fidelity=_fidelity(ref, out, scores),
        environment=_environment(),
    )
    return replace(report, gates=apply_gates(report, gates or Gates()))


def _outputs(
    original: Model, quantized: Model, data: Dataset, progress: Progress | None
) -> tuple[Outputs, Outputs]:
    """Both models' outputs on every sample, as float64 for the comparisons."""
    total = math.ceil(len(data) / _BATCH)
    parts: tuple[list[Outputs], list[Outputs]] = ([], [])
    for i, batch in enumerate(data.batches(_BATCH)):
        for model, done in zip((original, quantized), parts, strict=True):
            done.append([o.astype(np.float64) for o in run_dataset(model, Dataset(batch), _BATCH)])
        if progress is not None:
            progress("evaluate", i + 1, total)
    ref, out = ([np.concatenate(p) for p in zip(*runs, strict=True)] for runs in parts)
    return ref, out


def _accuracy(
    original: Path,
    ref: Outputs,
    out: Outputs,
    labels: npt.NDArray[np.integer] | None,
    scores: int | None,
) -> tuple[float | None, float | None]:
    """Top-1 accuracy of both models on output ``scores``; ``None`` without labels.

    Raises:
        ConfigError: labels, but no classifier output to compare them with.
    """
    if labels is None:
        return None, None
    if scores is None:
        raise ConfigError(
            f"labels need a classifier output of shape (N, classes); {original} has"
            f" {[r.shape for r in ref]}"
        )
    return (
        float(np.mean(ref[scores].argmax(axis=1) == labels)),
        float(np.mean(out[scores].argmax(axis=1) == labels)),
    )


def _latencies(
    paths: tuple[Path, Path],
    models: tuple[Model, ...],
    sample: Mapping[str, npt.NDArray[Any]],
    *,
    threads: Sequence[int],
    runs: int,
    progress: Progress | None,
) -> tuple[list[LatencyStats], list[LatencyStats]]:
    """Latency of both models at each thread count (reusing ``models`` for the first)."""
    stats: tuple[list[LatencyStats], list[LatencyStats]] = ([], [])
    for n, t in enumerate(threads):
        with contextlib.ExitStack() as stack:
            pair = (
                models
                if t == threads[0]
                else tuple(stack.enter_context(open_model(p, threads=t)) for p in paths)
            )
            measured = interleaved_latency(pair, sample, runs)
        for s, (p50, p95) in zip(stats, measured, strict=True):
            s.append(LatencyStats(t, runs, p50, p95))
        if progress is not None:
            progress("latency", n + 1, len(threads))
    return stats


def interleaved_latency(
    models: tuple[Model, ...], sample: Mapping[str, npt.NDArray[Any]], runs: int
) -> list[tuple[float, float]]:
    """p50/p95 in ms of each model's ``predict``, timed alternately so load hits all alike."""
    for _ in range(_WARMUP_RUNS):
        for m in models:
            m.predict(sample)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for m, t in zip(models, times, strict=True):
            start = time.perf_counter()
            m.predict(sample)
            t.append((time.perf_counter() - start) * 1e3)
    return [(percentile(t, 0.5), percentile(t, 0.95)) for t in times]


def scores_index(specs: Sequence[TensorSpec], outputs: Sequence[npt.NDArray[Any]]) -> int | None:
    """Which of a model's ``outputs`` (in the order of ``specs``) carries class scores.

    :func:`agent.bundle.manifest.scores_output` decides, on the shapes the model actually
    produced (a file may leave the class dimension dynamic).
    """
    actual = [replace(s, shape=o.shape) for s, o in zip(specs, outputs, strict=True)]
    found = scores_output(actual)
    return None if found is None else actual.index(found)


def _fidelity(ref: Outputs, out: Outputs, scores: int | None) -> Fidelity:
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
    runtimes = installed_runtimes()
    return {
        "machine": platform.machine(),
        "processor": _cpu_model(),
        "cpus": os.cpu_count(),
        "onnxruntime": runtimes.get("onnxruntime"),
        "ai-edge-litert": runtimes.get("litert"),
    }
