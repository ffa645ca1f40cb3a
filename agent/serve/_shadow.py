"""A candidate version in shadow: it answers a sampled copy of live requests off the request
path, and a promotion rule (:func:`judge_shadow`) decides whether it replaces the serving one.

The request path only calls :meth:`ShadowRunner.offer`: a sampling draw and an append to a
bounded queue. A worker at idle CPU priority runs the candidate, compares (:class:`Comparison`)
and times it. Latency compares like with like: on one sample in :data:`REFERENCE_EVERY` the
worker also runs the serving version, in alternating order, both timed by the thread's CPU
time. The served call's wall time would not do: at idle priority the worker waits for CPUs,
and a version called now and then runs on colder caches than one called all the time (1.5-2x
for an identical copy, see bench/shadow.py). A thread at idle priority that holds or waits
for the interpreter lock while normal threads keep the CPUs busy makes the serving threads
wait in turn, so the worker paces itself: after a sample it pauses :data:`MIN_GAP_S`, or
longer to stay under :data:`MAX_DUTY` of its wall time (which counts its waits for a CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import Manifest, Tolerance, scores_output
from agent.errors import StateError
from agent.messages.desired import PromotionRule
from agent.plumbing.compat import zip_strict
from agent.plumbing.files import atomic_write, open_regular
from agent.plumbing.sched import GatePriority, lower_this_thread
from agent.plumbing.strict import Doc, load_json
from agent.serve._slot import ServingModel

__all__ = ["Agreement", "Comparison", "ShadowRunner", "ShadowVerdict", "judge_shadow"]

log = logging.getLogger("edgeship.agent")

STATE_VERSION = 1
LATENCY_PAIRS = 512  # latest (served, shadow) latencies kept: bounds memory and the file
SAVE_EVERY = 50  # samples, or every second, whichever comes first
MAX_STATE_BYTES = 1 << 20
STOP_TIMEOUT_S = 1.0  # a starved worker may take this long to see it must stop
MIN_GAP_S = 0.2  # between two samples, at least: 5 samples a second at most
MAX_DUTY = 0.1  # of the worker's wall time spent on samples, at most
REFERENCE_EVERY = 4  # the serving version is timed beside the candidate on one sample in 4

Outputs = Mapping[str, Any]
Predict = Callable[[Mapping[str, npt.ArrayLike]], Outputs]
_Sample = tuple[Mapping[str, npt.ArrayLike], Outputs, float, Optional[str]]  # as offered


class Agreement(NamedTuple):  # one sample compared
    agree: bool
    max_abs_diff: float = 0.0  # over the outputs both have in the same numeric shape
    mean_abs_diff: float = 0.0


def _numeric(value: object) -> npt.NDArray[np.float64] | None:
    array = np.asarray(value)
    return array.astype(np.float64) if array.dtype.kind in "biuf" else None


@dataclass(frozen=True)
class Comparison:
    """When a shadow answer agrees: with a ``scores`` output, when every row has the same
    top-1 class (argmax over the last axis); otherwise when every output lies within its
    golden tolerance, ``|shadow - served| <= atol + rtol * |served|``."""

    scores: str | None = None
    tolerance: Tolerance = field(default_factory=lambda: Tolerance(atol=0.0))
    tolerances: Mapping[str, Tolerance] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> Comparison:
        """The comparison the candidate's manifest implies (its scores, its tolerances)."""
        named = manifest.model.scores_output
        if named is None:
            found = scores_output(manifest.model.outputs)
            named = None if found is None else found.name
        health = manifest.health
        tolerances = {} if health.cases is None else dict(health.cases.tolerances)
        return cls(scores=named, tolerance=health.tolerance, tolerances=tolerances)

    def compare(self, served: Outputs, shadow: Outputs) -> Agreement:
        """Compare two answers; never raises (anything incomparable disagrees)."""
        try:
            return self._compare(served, shadow)
        except (ValueError, TypeError, IndexError):  # odd outputs: objects, ragged lists
            return Agreement(False)

    def _compare(self, served: Outputs, shadow: Outputs) -> Agreement:
        agree = True
        worst, means = 0.0, []
        for name, value in served.items():
            other = shadow.get(name)
            want, got = _numeric(value), _numeric(other)
            if want is None or got is None or want.shape != got.shape:
                # Other shapes, a missing output, or not numbers: equal or not at all.
                same = want is None and other is not None and np.array_equal(value, other)
                agree = agree and bool(same)
                continue
            finite = np.isfinite(want) & np.isfinite(got)
            # NaN and infinities must be where they were, and the same.
            same_finite = np.array_equal(
                np.where(finite, 0.0, want), np.where(finite, 0.0, got), equal_nan=True
            )
            with np.errstate(invalid="ignore"):  # inf - inf: masked right away
                dev = np.where(finite, np.abs(got - want), 0.0)
            if dev.size:
                worst = max(worst, float(dev.max()))
                means.append(float(dev.mean()))
            if self.scores is None:
                tol = self.tolerances.get(name, self.tolerance)
                within = dev <= tol.atol + tol.rtol * np.abs(np.where(finite, want, 0.0))
                agree = agree and bool(same_finite) and bool(within.all())
        if self.scores is not None:  # the same top-1 class in every row, or not
            want, got = _numeric(served.get(self.scores)), _numeric(shadow.get(self.scores))
            agree = (
                want is not None
                and got is not None
                and want.shape == got.shape
                and want.ndim > 0
                and np.array_equal(np.isfinite(want), np.isfinite(got))
                and np.array_equal(np.argmax(want, -1), np.argmax(got, -1))
            )
        return Agreement(bool(agree), worst, sum(means) / len(means) if means else 0.0)


@dataclass(frozen=True)
class ShadowVerdict:
    state: Literal["watching", "promote", "reject"]
    reason: str
    samples: int
    agreement: float | None  # None: no sample yet
    latency_ratio: float | None  # candidate's median latency / the serving version's
    accuracy: float | None  # the candidate's, from feedback; None: no labels given


def judge_shadow(
    rule: PromotionRule,
    *,
    samples: int,
    agreed: int,
    latency_ratio: float | None,
    elapsed_s: float,
    accuracy: tuple[int, int] | None = None,
) -> ShadowVerdict:
    """Decide a shadow stage from what was observed so far. Pure.

    ``accuracy``: ``(labels, correct)`` of the candidate, from feedback. Rejects as soon as
    the agreement cannot reach ``min_agreement`` over ``min_samples``; from ``min_samples``
    on, rejects a latency ratio over the limit or (with ``min_accuracy``, once
    ``min_feedback`` labels came back) an accuracy under it, else promotes; rejects when
    ``max_seconds`` pass without a decision.
    """
    labels, correct = accuracy if accuracy is not None else (0, 0)
    acc = correct / labels if labels else None
    agreement = agreed / samples if samples else None
    verdict = partial(ShadowVerdict, samples=samples, agreement=agreement, accuracy=acc)
    verdict = partial(verdict, latency_ratio=latency_ratio)
    n, least, disagreed = rule.min_samples, rule.min_agreement, samples - agreed
    if max(samples, n) - disagreed < least * max(samples, n) - 1e-9:
        if samples >= n:
            why = f"agreement {agreed / samples:.4g} over {samples} samples is below {least:g}"
            return verdict("reject", why)
        why = f"{disagreed} of {samples} samples disagree with the serving version:"
        return verdict("reject", f"{why} agreement can no longer reach {least:g} over {n} samples")
    ratio, most = latency_ratio, rule.max_latency_ratio
    if samples >= n and ratio is not None:  # no ratio yet: the serving version failed
        if ratio > most:
            why = f"median latency is {ratio:.3g}x the serving version's over {samples} samples"
            return verdict("reject", f"{why}; at most {most:g}x is allowed")
        done = f"agreement {agreed / samples:.4g} over {samples} samples, latency {ratio:.3g}x"
        if rule.min_accuracy is None:
            return verdict("promote", done)
        if acc is not None and labels >= rule.min_feedback:
            if acc >= rule.min_accuracy:
                return verdict("promote", f"{done}, accuracy {acc:.4g} on {labels} labels")
            why = f"accuracy {acc:.4g} on {labels} labels is below {rule.min_accuracy:g}"
            return verdict("reject", why)
    if rule.max_seconds and elapsed_s >= rule.max_seconds:
        waiting = f"{samples} of {n} samples"
        if rule.min_accuracy is not None:
            waiting += f", {labels} of {rule.min_feedback} labels"
        why = f"no decision after {elapsed_s:.0f} s (at most {rule.max_seconds:g} s)"
        return verdict("reject", f"{why}: {waiting}")
    return verdict("watching", "")


@dataclass
class _Counters:
    samples: int = 0
    agreed: int = 0
    errors: int = 0  # the candidate raised: each is also a disagreement
    dropped: int = 0  # before this run: the runner adds its own
    max_abs_diff: float = 0.0
    sum_mean_abs_diff: float = 0.0  # over the samples the candidate answered
    elapsed_s: float = 0.0  # at the last save
    # (served_s, shadow_s) of the latest samples timed.
    pairs: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=LATENCY_PAIRS))

    def to_bytes(self, digest: str) -> bytes:
        doc: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)[:-1]}
        doc.update(v=STATE_VERSION, digest=digest)
        doc.update(served_s=[p[0] for p in self.pairs], shadow_s=[p[1] for p in self.pairs])
        return json.dumps(doc, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, digest: str) -> _Counters:
        """Raises: ValueError: not a state file of this digest's shadow stage."""
        d = Doc(load_json(data, what="the file", error=ValueError), "", error=ValueError)
        d.integer("v", minimum=STATE_VERSION, maximum=STATE_VERSION)
        if d.text("digest", max_len=64) != digest:
            raise ValueError(f"it is the state of another version ({d.raw('digest')})")
        c = cls()
        for f in fields(c)[:-1]:  # ints, then floats (annotations are strings here)
            read = d.integer if f.type == "int" else d.number
            setattr(c, f.name, read(f.name, minimum=0))
        served = d.numbers("served_s", max_len=LATENCY_PAIRS)
        c.pairs.extend(zip_strict(served, d.numbers("shadow_s", max_len=LATENCY_PAIRS)))
        d.done()
        if c.agreed + c.errors > c.samples:
            raise ValueError("its counts do not add up")
        return c


def _latency(pairs: Iterable[tuple[float, float]]) -> tuple[float, float, float | None]:
    """Median served and shadow seconds over ``pairs`` (0 if none), and shadow / served."""
    served, shadow = (statistics.median(side) for side in zip(*(list(pairs) or [(0.0, 0.0)])))
    return served, shadow, (shadow / served if served > 0 else None)


def _time_reference(reference: Predict, inputs: Mapping[str, Any]) -> float | None:
    """CPU seconds the serving version takes in this thread; None if it failed."""
    start = time.thread_time()
    try:
        reference(inputs)
    except Exception:  # noqa: BLE001 - the serving version's failure is not the candidate's
        return None
    return time.thread_time() - start


def _read_state(path: Path, digest: str) -> _Counters:
    """The counters saved for ``digest`` at ``path``; fresh ones if there are none that fit."""
    try:
        with open_regular(path) as f:
            return _Counters.from_bytes(f.read(MAX_STATE_BYTES), digest)  # cut short: invalid
    except FileNotFoundError:
        return _Counters()
    except (OSError, ValueError) as exc:  # NotRegularFileError included
        log.warning("ignoring the shadow state %s: %s; the shadow stage starts over", path, exc)
        return _Counters()


class ShadowRunner:
    """Runs a candidate on sampled live requests in a worker thread and judges it.

    ``reference`` runs the serving version (the slot's ``predict``) for the latency ratio;
    without it the candidate's CPU time is compared with the served calls' wall time, which
    favours the serving version. ``on_result(request_id, outputs)`` receives the candidate's
    answer to each sampled request that carries an id. With ``state_path`` the counters are
    saved there (atomically, at most every second or :data:`SAVE_EVERY` samples, and when
    stopped); a runner for the same digest resumes from them, one for another (or a file it
    cannot read) starts over with a warning.
    """

    def __init__(
        self,
        candidate: ServingModel,
        digest: str,
        rule: PromotionRule,
        comparison: Comparison,
        *,
        state_path: Path | None = None,
        queue_size: int = 8,
        priority: GatePriority = "idle",
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_result: Callable[[str, dict[str, npt.NDArray[Any]]], None] | None = None,
        reference: Predict | None = None,
        min_gap_s: float = MIN_GAP_S,
    ) -> None:
        self.digest, self.rule = digest, rule
        self._model, self._comparison, self._reference = candidate, comparison, reference
        self._queue_size, self._priority, self._min_gap_s = max(1, queue_size), priority, min_gap_s
        self._clock, self._on_result = clock, on_result
        self._rng = rng if rng is not None else random.Random()  # noqa: S311 - not secret
        self._state_path = None if state_path is None else Path(state_path)
        self._c = _Counters() if state_path is None else _read_state(Path(state_path), digest)
        self._started = clock() - self._c.elapsed_s
        # The worker and readers hold _lock. The request path takes no lock the worker
        # ever holds: a worker descheduled at idle priority must not hold up a request.
        self._lock, self._drop_lock, self._save_lock = (threading.Lock() for _ in range(3))
        self._dropped = 0  # in this run; _c.dropped before it
        self._saved = (clock(), self._c.samples)
        self._pending: deque[_Sample] = deque()
        # Binary semaphores (releasing a plain lock never blocks): work came; stop.
        self._wake, self._halt = threading.Lock(), threading.Lock()
        self._wake.acquire()
        self._halt.acquire()
        self._stopping = self._taken = self._closed = False
        self._final: ShadowVerdict | None = None
        self._accuracy: tuple[int, int] | None = None
        self._thread = threading.Thread(target=self._work, name="edgeship-shadow", daemon=True)
        self._thread.start()

    def offer(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        outputs: Outputs,
        latency_s: float,
        request_id: str | None = None,
    ) -> None:
        """A request the serving version answered in ``latency_s`` (wall time).

        Sampled at the rule's ``sample_rate`` and queued by reference: neither ``inputs``
        nor ``outputs`` may be changed afterwards. Never blocks, never raises; a sample
        that finds the queue full is dropped and counted.
        """
        if self._stopping or self._final is not None:
            return
        rate = self.rule.sample_rate
        if rate < 1.0 and self._rng.random() >= rate:
            return
        if len(self._pending) >= self._queue_size:
            with self._drop_lock:  # only offering threads take it
                self._dropped += 1
            return
        self._pending.append((inputs, outputs, latency_s, request_id))
        with contextlib.suppress(RuntimeError):  # already released: it will see the sample
            self._wake.release()

    def _work(self) -> None:
        lower_this_thread(self._priority)
        while not self._stopping:
            self._wake.acquire()
            while self._pending and not self._stopping:
                sample = self._pending.popleft()
                if self._final is not None:
                    continue
                start = time.perf_counter()
                self._run(sample)
                at, samples = self._saved
                if self._c.samples >= samples + SAVE_EVERY or self._clock() >= at + 1.0:
                    self._save()
                busy = time.perf_counter() - start
                if self._halt.acquire(timeout=max(self._min_gap_s, busy / MAX_DUTY - busy)):
                    return

    def _run(self, sample: _Sample) -> None:
        inputs, served, offered_s, request_id = sample
        reference = self._reference if self._c.samples % REFERENCE_EVERY == 0 else None
        first = self._c.samples % (2 * REFERENCE_EVERY) == 0  # the first finds colder caches
        served_s = offered_s if self._reference is None else None
        if reference is not None and first:
            served_s = _time_reference(reference, inputs)
        start = time.thread_time()
        try:
            outputs: dict[str, npt.NDArray[Any]] | None = self._model.predict(inputs)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is counted, not fatal
            log.debug("shadow candidate %s failed: %s", self.digest[:12], exc)
            outputs = None
        shadow_s = time.thread_time() - start
        if reference is not None and not first:
            served_s = _time_reference(reference, inputs)
        found = Agreement(False) if outputs is None else self._comparison.compare(served, outputs)
        with self._lock:
            c = self._c
            c.samples += 1
            c.errors += outputs is None
            c.agreed += found.agree
            c.max_abs_diff = max(c.max_abs_diff, found.max_abs_diff)
            c.sum_mean_abs_diff += found.mean_abs_diff
            if served_s is not None and outputs is not None:
                c.pairs.append((served_s, shadow_s))
        if outputs is not None and request_id is not None and self._on_result is not None:
            try:
                self._on_result(request_id, outputs)
            except Exception:  # feedback bookkeeping must not stop the shadow stage
                log.warning("keeping the shadow answer to %s failed", request_id, exc_info=True)
        # Judging sorts the latencies: only when a decision may be due.
        if not found.agree or c.samples >= self.rule.min_samples:
            self.verdict()

    def verdict(self, accuracy: tuple[int, int] | None = None) -> ShadowVerdict:
        """The rule's verdict now; a decision ("promote", "reject") is final.

        ``accuracy``: ``(labels, correct)`` of the candidate, from feedback; the last one
        given counts until another is.
        """
        if accuracy is not None:
            self._accuracy = accuracy
        with self._lock:
            if self._final is not None:
                return self._final
            samples, agreed, ratio = self._c.samples, self._c.agreed, _latency(self._c.pairs)[2]
        verdict = judge_shadow(
            self.rule,
            samples=samples,
            agreed=agreed,
            latency_ratio=ratio,
            elapsed_s=self._clock() - self._started,
            accuracy=self._accuracy,
        )
        if verdict.state == "watching":
            return verdict
        with self._lock:
            if self._final is None:
                self._final = verdict
                log.info("shadow of %s: %s, %s", self.digest[:12], verdict.state, verdict.reason)
            return self._final

    def stats(self) -> dict[str, Any]:
        """The shadow stage so far, JSON-able (for telemetry and the state document)."""
        verdict = self.verdict()
        with self._lock:
            c = replace(self._c, pairs=deque(self._c.pairs))
        served, shadow, ratio = _latency(c.pairs)
        answered = c.samples - c.errors
        return {
            "digest": self.digest,
            "samples": c.samples,
            "agreed": c.agreed,
            "agreement": c.agreed / c.samples if c.samples else None,
            "latency_ratio": ratio,
            "served_ms": served * 1000 if c.pairs else None,
            "shadow_ms": shadow * 1000 if c.pairs else None,
            "max_abs_diff": c.max_abs_diff,
            "mean_abs_diff": c.sum_mean_abs_diff / answered if answered else None,
            "errors": c.errors,
            "dropped": c.dropped + self._dropped,
            "accuracy": verdict.accuracy,
            "verdict": verdict.state,
        }

    def _save(self) -> None:
        with self._save_lock:
            path = self._state_path
            if path is None:
                return
            with self._lock:
                c, now = self._c, self._clock()
                snapshot = replace(c, pairs=deque(c.pairs), dropped=c.dropped + self._dropped)
            snapshot.elapsed_s, self._saved = now - self._started, (now, snapshot.samples)
            try:
                atomic_write(path, snapshot.to_bytes(self.digest))
            except OSError as exc:
                log.warning("cannot save the shadow state to %s: %s", path, exc)

    def clear(self) -> None:
        """Delete the state file and save no more (the shadow stage is over).

        Raises:
            OSError: the file exists and cannot be removed.
        """
        with self._save_lock:
            path, self._state_path = self._state_path, None
        if path is not None:
            path.unlink(missing_ok=True)

    def _stop(self) -> None:
        self._stopping = True  # only the worker takes samples: what is queued stays
        for lock in (self._wake, self._halt):
            with contextlib.suppress(RuntimeError):
                lock.release()
        self._thread.join(STOP_TIMEOUT_S)  # a call in the worker may still run: it may finish
        self._save()

    def take_model(self) -> ServingModel:
        """Stop the worker and hand over the candidate, open (it is promoted).

        Raises:
            StateError: the runner was closed, and the candidate with it.
        """
        with self._lock:
            if self._closed and not self._taken:
                raise StateError("the shadow runner was closed, and its candidate with it")
            self._taken = True
        self._stop()
        return self._model

    def close(self) -> None:
        """Stop the worker and close the candidate (a call in flight finishes), unless taken."""
        with self._lock:
            closed, self._closed = self._closed, True
        if not closed:
            self._stop()
            if not self._taken:
                self._model.close()
