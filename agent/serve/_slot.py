"""The model that answers requests, and how it is replaced while it serves.

:class:`ModelSlot` holds one reference to the active model. ``predict`` takes the
reference (and counts itself in-flight) under a short lock, then runs outside it; a swap
replaces the reference under the same lock. Calls that started on the old model finish
on it, and the old model is closed by whichever call leaves it last, so no call ever
sees a closed model, and no answer mixes two models.

During probation a :class:`ProbationMonitor` is attached to the new model: every call
on it is recorded (success, latency) and :func:`judge_probation` turns the record into
a verdict against the window and thresholds of the signed manifest.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy.typing as npt

from agent.bundle.manifest import Probation
from agent.errors import InferenceError, InputValidationError, StateError
from agent.plumbing.stats import percentile_ms

__all__ = [
    "ModelSlot",
    "ProbationMonitor",
    "ProbationVerdict",
    "ServingModel",
    "judge_probation",
]

MAX_LATENCY_SAMPLES = 10_000  # bounds a probation monitor's memory


class ServingModel(Protocol):
    """What the slot needs of a loaded model (agent.serve.runtimes' ``Model`` provides it)."""

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ProbationVerdict:
    state: Literal["watching", "passed", "breached"]
    reason: str = ""


def judge_probation(
    window: Probation,
    *,
    requests: int,
    errors: int,
    latencies_s: Sequence[float],
    elapsed_s: float,
) -> ProbationVerdict:
    """Decide a probation from what was observed so far. Pure.

    The window ends after ``window.requests`` calls or ``window.seconds``, whichever
    comes first (a zero disables that bound). An error rate that is already certain to
    exceed the threshold over the whole window breaches at once; error rate and p95
    latency are otherwise judged at the end of the window.
    """
    limit = window.max_error_rate
    if window.requests and errors > limit * window.requests:
        return ProbationVerdict(
            "breached",
            f"{errors} failed calls in probation; at most {limit:.1%} of {window.requests}"
            " are allowed",
        )
    ended = (window.requests == 0 and window.seconds == 0) or (
        (window.requests > 0 and requests >= window.requests)
        or (window.seconds > 0 and elapsed_s >= window.seconds)
    )
    if not ended:
        return ProbationVerdict("watching")
    if requests and errors / requests > limit:
        return ProbationVerdict(
            "breached",
            f"error rate {errors / requests:.1%} over {requests} calls exceeds {limit:.1%}",
        )
    if window.max_p95_ms is not None and latencies_s:
        observed = percentile_ms(latencies_s, 0.95)
        if observed > window.max_p95_ms:
            return ProbationVerdict(
                "breached",
                f"p95 latency {observed:.3g} ms over {len(latencies_s)} calls exceeds the"
                f" budget of {window.max_p95_ms:.3g} ms",
            )
    return ProbationVerdict("passed", f"{requests} calls, {errors} failed")


class ProbationMonitor:
    """Thread-safe record of a model's calls during its probation window."""

    def __init__(self, window: Probation, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._requests = 0
        self._errors = 0
        self._latencies: list[float] = []
        # A further criterion (ground truth from feedback): a breach it reports ends the
        # probation at once; None from it leaves the window to decide.
        self.extra: Callable[[], ProbationVerdict | None] | None = None

    def record(self, ok: bool, latency_s: float) -> None:
        with self._lock:
            self._requests += 1
            if not ok:
                self._errors += 1
            elif len(self._latencies) < MAX_LATENCY_SAMPLES:
                self._latencies.append(latency_s)

    def verdict(self) -> ProbationVerdict:
        extra = None if self.extra is None else self.extra()
        if extra is not None and extra.state == "breached":
            return extra
        with self._lock:
            requests, errors, latencies = self._requests, self._errors, list(self._latencies)
        return judge_probation(
            self.window,
            requests=requests,
            errors=errors,
            latencies_s=latencies,
            elapsed_s=self._clock() - self._started,
        )


class _Entry:
    __slots__ = ("digest", "inflight", "model", "monitor", "retired")

    def __init__(self, model: ServingModel, digest: str, monitor: ProbationMonitor | None) -> None:
        self.model = model
        self.digest = digest
        self.monitor = monitor
        self.inflight = 0
        self.retired = False


class ModelSlot:
    """One reference to the serving model; swapped atomically while calls are in flight."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)  # notified when no call is in flight
        self._entry: _Entry | None = None
        self._inflight = 0  # over all entries, for a clean shutdown
        self._stopping = False

    @property
    def digest(self) -> str | None:
        """The digest of the version that new calls go to, if any."""
        entry = self._entry
        return None if entry is None else entry.digest

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """Run the active model.

        Raises:
            StateError: no model is active.
            InferenceError: the model failed (counted against it during probation);
                :class:`InputValidationError` is the caller's fault and is not counted.
        """
        return self.predict_versioned(inputs)[1]

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        """Like :meth:`predict`, also naming the version that answered.

        Raises:
            StateError, InferenceError: as :meth:`predict`.
        """
        with self._lock:
            entry = self._entry
            if entry is None:
                if self._stopping:
                    raise StateError("the agent is stopping; retry against another instance")
                raise StateError("no model is installed; install a bundle first")
            entry.inflight += 1
            self._inflight += 1
        start = time.perf_counter()
        ok: bool | None = False
        try:
            outputs = entry.model.predict(inputs)
            ok = True
        except InputValidationError:
            ok = None
            raise
        except InferenceError:
            raise
        except Exception as exc:
            # A runtime failing in an unforeseen way is the model's failure: it must count
            # against the model in probation and reach the caller as an InferenceError.
            raise InferenceError(f"model {entry.digest[:12]} failed: {exc}") from exc
        finally:
            if ok is not None and entry.monitor is not None:
                entry.monitor.record(ok, time.perf_counter() - start)
            self._release(entry)
        return entry.digest, outputs

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.inflight -= 1
            self._inflight -= 1
            close = entry.retired and entry.inflight == 0
            if not self._inflight:
                self._idle.notify_all()
        if close:
            entry.model.close()

    def swap(
        self, model: ServingModel, digest: str, monitor: ProbationMonitor | None = None
    ) -> str | None:
        """Make ``model`` answer all new calls; the old one closes once its calls are done.

        Returns the digest that was active before, if any.

        Raises:
            StateError: the slot was stopped.
        """
        return self._replace(_Entry(model, digest, monitor))

    def clear(self) -> str | None:
        """Stop serving; the old model closes once its calls are done."""
        return self._replace(None)

    def stop(self, timeout_s: float | None = None) -> bool:
        """Refuse new calls, let calls in flight finish, close the model.

        Returns False if calls were still running after ``timeout_s`` (their model is
        then closed by the last of them, as after a swap).
        """
        with self._lock:
            self._stopping = True
        self._replace(None)
        with self._lock:
            return self._idle.wait_for(lambda: not self._inflight, timeout_s)

    def _replace(self, new: _Entry | None) -> str | None:
        with self._lock:
            if new is not None and self._stopping:
                raise StateError("the model slot is stopped; no model can be activated")
            old, self._entry = self._entry, new
            if old is None:
                return None
            old.retired = True
            close = old.inflight == 0
        if close:
            old.model.close()
        return old.digest

    def monitor(self) -> ProbationMonitor | None:
        entry = self._entry
        return None if entry is None else entry.monitor

    def end_probation(self) -> None:
        """Stop recording calls of the active model (it was committed)."""
        with self._lock:
            if self._entry is not None:
                self._entry.monitor = None
