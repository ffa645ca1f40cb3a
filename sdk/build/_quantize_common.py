"""What quantizing ONNX and TFLite models shares: schemes, calibration samples, progress,
the per-channel choice and the check that the result loads.

Candidates are run through the agent's runtime layer (:func:`sdk.build.model_io.open_model`),
so the per-channel choice compares what a device would compute.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from agent.errors import ConfigError
from sdk.build.datasets import Dataset, Progress
from sdk.build.model_io import open_model, run_dataset
from sdk.errors import QuantizationError

Scheme = Literal["none", "dynamic", "static", "weight-only"]
SCHEMES: tuple[Scheme, ...] = ("none", "dynamic", "static", "weight-only")

# (format, scheme, weight granularity) -> runtimes known to compute wrong results with it.
KNOWN_BAD_RECIPES: Mapping[tuple[str, str, str], frozenset[str]] = {
    ("tflite", "dynamic", "per-channel"): frozenset({"tflite-runtime"}),
}
# Samples used to compare the per-tensor and per-channel variants.
CHOICE_SAMPLES = 64
# Per-channel weights cost a little size and, on x86, speed: they must be clearly better.
_PER_CHANNEL_GAIN = 0.9


def tool_version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, for the manifest's details."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def samples(
    data: Dataset, dtypes: Mapping[str, np.dtype[Any]], progress: Progress | None
) -> Iterator[dict[str, npt.NDArray[Any]]]:
    """One-sample batches cast to the model's input dtypes, reporting progress."""
    total = len(data)
    for i, batch in enumerate(data.batches(1)):
        yield {k: v.astype(dtypes.get(k, v.dtype), copy=False) for k, v in batch.items()}
        if progress is not None:
            progress("calibrate", i + 1, total)


def check_inputs(calib: Dataset, model_inputs: Sequence[str]) -> None:
    """Refuse a calibration set that lacks one of the model's inputs.

    Raises:
        ConfigError: an input is missing; the message lists what the set holds.
    """
    missing = sorted(set(model_inputs) - set(calib.inputs))
    if missing:
        raise ConfigError(
            f"calibration data set {calib.source} lacks model input(s) {missing}; it has"
            f" {sorted(calib.inputs)}"
        )


def part(progress: Progress | None, index: int, parts: int) -> Progress | None:
    """Progress of part ``index`` of ``parts`` equal passes, reported as one run."""
    if progress is None:
        return None
    report = progress

    def scaled(step: str, done: int, total: int) -> None:
        report(step, index * total + done, parts * total)

    return scaled


def choose_per_channel(
    reference: Path, candidates: Mapping[bool, Path], data: Dataset, details: dict[str, Any]
) -> bool:
    """Whether the per-channel candidate is kept: its outputs must be clearly closer to
    ``reference``'s (mean abs error, recorded in ``details``) than the per-tensor one's.

    Raises:
        ConfigError: a model does not load or does not take ``data``.
    """
    with open_model(reference) as model:
        ref = run_dataset(model, data)
    errors = {}
    for per_channel, path in candidates.items():
        with open_model(path) as model:
            errors[per_channel] = _mean_abs_error(ref, run_dataset(model, data))
    details["per_channel_mean_abs_error"] = {
        ("per-channel" if pc else "per-tensor"): e for pc, e in errors.items()
    }
    return errors[True] < _PER_CHANNEL_GAIN * errors[False]


def check_loads(path: Path, runtime: str, version: str | None) -> None:
    """Load the quantized model ``path`` in ``runtime`` as a device would.

    Raises:
        QuantizationError: it does not load.
        RuntimeUnavailableError: ``runtime`` is not installed.
    """
    try:
        open_model(path, runtime=runtime).close()
    except ConfigError as exc:
        raise QuantizationError(
            f"quantized model {path} does not load in {runtime} {version}: {exc}"
        ) from exc


def _mean_abs_error(reference: list[npt.NDArray[Any]], candidate: list[npt.NDArray[Any]]) -> float:
    diffs = [
        np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean()
        for a, b in zip(reference, candidate, strict=True)
    ]
    return float(np.mean(diffs))
