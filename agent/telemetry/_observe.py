"""Watching the serving path: every call timed and counted, sampled calls fed to drift.

:class:`ObservedPredictor` wraps whatever serves (the model slot, through the cache if
enabled) and is what the agent's Python API, HTTP and MQTT endpoints call. Telemetry must
never fail a prediction the model answered: a drift observation that cannot be made is
skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy.typing as npt

from agent.bundle.manifest import Manifest, scores_output
from agent.errors import StateError, error_code
from agent.serve._cache import Predictor, predict_versioned
from agent.telemetry._drift import DriftMonitor
from agent.telemetry._metrics import Metrics

__all__ = ["ObservedPredictor", "OutputKind", "watched_output"]

log = logging.getLogger("edgeship.agent")

OutputKind = Literal["auto", "top_score", "values"]


def watched_output(manifest: Manifest, kind: OutputKind) -> tuple[str, bool]:
    """The output telemetry summarises, and whether as class scores (a top-score histogram).

    The manifest's ``model.scores_output`` names it; without one (a bundle older than
    schema 1.1), the first output shaped like class scores
    (:func:`agent.bundle.manifest.scores_output`); failing both, the first output. With
    ``auto`` an output of class scores is summarised as such, anything else as values;
    ``top_score`` and ``values`` choose the summary whatever the output.
    """
    model = manifest.model
    named = model.scores_output
    if named is None:
        found = scores_output(model.outputs)
        named = None if found is None else found.name
    name = model.outputs[0].name if named is None else named
    return name, (named is not None if kind == "auto" else kind == "top_score")


class ObservedPredictor:
    """Times and counts every call in ``metrics``; sampled calls feed the drift monitor.

    ``serving`` names the version new calls go to (the slot's digest: ``inner`` may be a
    cache in front of it); ``stopping`` says when the agent no longer takes calls (they
    fail ``unavailable``).
    """

    def __init__(
        self,
        inner: Predictor,
        metrics: Metrics,
        *,
        serving: Callable[[], str | None],
        output_kind: OutputKind = "auto",
        stopping: Callable[[], bool] = lambda: False,
    ) -> None:
        self._inner = inner
        self._serving = serving
        self.metrics = metrics
        self._output_kind = output_kind
        self._stopping = stopping
        # (version digest, its monitor, the output it watches): swapped as one reference.
        self._drift: tuple[str, DriftMonitor, str] | None = None

    @property
    def digest(self) -> str | None:
        return self._serving()

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        return self.predict_versioned(inputs)[1]

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        metrics = self.metrics
        start = time.perf_counter()
        if self._stopping():
            metrics.record(0.0, "unavailable")
            raise StateError("the agent is stopping; retry against another instance")
        try:
            version, outputs = predict_versioned(self._inner, inputs)
        except Exception as exc:
            metrics.record(time.perf_counter() - start, error_code(exc))
            raise
        metrics.record(time.perf_counter() - start)
        watch = self._drift
        if watch is not None and watch[0] == version:
            _, drift, output_name = watch
            try:
                drift.observe(inputs, outputs.get(output_name))  # type: ignore[arg-type]
            except (ValueError, TypeError, IndexError) as exc:
                log.debug("drift observation skipped: %s", exc)
        return version or "", outputs

    def model_changed(
        self,
        digest: str | None,
        manifest: Manifest | None,
        serving: Mapping[str, str] | None = None,
    ) -> DriftMonitor | None:
        """Name the serving model in the metrics and give it a drift monitor of its own.

        ``serving`` names the runtime and provider it runs on (``runtime``, ``provider``).

        Returns the new monitor (None when nothing serves or its manifest is unknown).
        """
        if digest is None or manifest is None:
            self._drift = None
            return None
        budget = manifest.health.latency_budget_p95_ms
        self.metrics.set_model(manifest.name, manifest.version, manifest.sequence, budget, serving)
        output, classifier = watched_output(manifest, self._output_kind)
        drift = DriftMonitor(manifest.drift_reference, classifier=classifier)
        self._drift = (digest, drift, output)
        return drift
