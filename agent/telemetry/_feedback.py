"""Ground truth for answers already given: which version was right, counted per version.

The request path remembers each answer under its request id (:meth:`FeedbackMemory.remember`),
keeping only what judging needs: the top-1 class of each row for a classifier, the watched
output's few values otherwise. When the caller later learns the truth it sends a label for
that request id (:meth:`FeedbackMemory.feedback`); every version that answered the request
(the serving one, and a candidate in shadow on the same request) is judged against it,
and per-version counters feed telemetry (:meth:`~FeedbackMemory.take_window`), the state
document and promotion rules (:meth:`~FeedbackMemory.totals`).

A request id is labelled once. A second label is refused rather than overwriting the
first: counts already went out in telemetry and cannot be taken back, MQTT may deliver
the same feedback twice, and a label that could be sent again would let one request count
as many. The memory is bounded: the oldest request ids are forgotten first.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Union

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import Manifest, Tolerance
from agent.errors import (
    AlreadyLabelledError,
    InvalidLabelError,
    InvalidRequestIdError,
    UnknownRequestError,
)
from agent.telemetry._observe import OutputKind, watched_output

__all__ = [
    "MAX_ANSWER_VALUES",
    "MAX_REQUEST_ID_CHARS",
    "FeedbackMemory",
    "Judge",
    "Tally",
    "check_request_id",
    "parse_label",
]

log = logging.getLogger("edgeship.agent")

MAX_REQUEST_ID_CHARS = 128
# Values kept per answer (rows of a classifier, numbers of a values output); a larger
# answer is not remembered, so memory stays max_requests * versions * this, at most.
MAX_ANSWER_VALUES = 64
# A label nested deeper than this is no tensor a model answers with here.
_MAX_LABEL_DEPTH = 8
_INT64 = (-(2**63), 2**63)

Number = Union[int, float]


def check_request_id(request_id: object) -> str:
    """``request_id`` if it is 1-128 printable characters.

    Raises:
        InvalidRequestIdError: anything else (another type, empty, too long, control
            characters).
    """
    if isinstance(request_id, str) and _valid_id(request_id):
        return request_id
    raise InvalidRequestIdError(
        f"a request id is a string of 1-{MAX_REQUEST_ID_CHARS} printable characters, "
        f"not {_show(request_id)}"
    )


def _valid_id(request_id: object) -> bool:
    return (
        isinstance(request_id, str)
        and 0 < len(request_id) <= MAX_REQUEST_ID_CHARS
        and request_id.isprintable()
    )


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Tally(NamedTuple):
    """Labelled answers of one version, and how many of them were right."""

    labels: int
    correct: int

    def to_json(self) -> dict[str, int]:
        return {"labels": self.labels, "correct": self.correct}


@dataclass(frozen=True)
class Judge:
    """How one version's answers are kept and judged against ground truth.

    ``output`` is the output telemetry watches. A classifier's answer is the top-1 class of
    each row (the last axis holds the scores), judged right where it equals the label: a
    class index, or a list of them, one per row; each row counts as one label. Otherwise the
    answer is the output's values, right when every one lies within ``tolerance`` of the
    label (numbers of the output's shape, or flat of its size); the request counts as one.
    """

    output: str
    classifier: bool
    tolerance: Tolerance
    classes: int | None = None  # None: the manifest leaves the number of classes open

    @classmethod
    def from_manifest(cls, manifest: Manifest, kind: OutputKind = "auto") -> Judge:
        """The judge of a version's answers; ``kind`` as telemetry's ``output_kind``."""
        output, classifier = watched_output(manifest, kind)
        spec = next(t for t in manifest.model.outputs if t.name == output)
        classes = spec.shape[-1] if spec.shape and isinstance(spec.shape[-1], int) else None
        health = manifest.health
        cases = health.cases
        tolerance = health.tolerance if cases is None else cases.tolerance(output, health.tolerance)
        return cls(output, classifier, tolerance, classes if classifier else None)

    def answer(self, outputs: Mapping[str, Any]) -> npt.NDArray[Any] | None:
        """What to keep of an answer to judge it later; None if it cannot or should not be
        kept (the output missing, not numeric, or more than :data:`MAX_ANSWER_VALUES`)."""
        value = outputs.get(self.output)
        if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
            return None
        if value.size == 0:
            return None
        if self.classifier:
            if value.ndim == 0:
                return None
            scores = value.reshape(-1, value.shape[-1])
            return None if len(scores) > MAX_ANSWER_VALUES else np.argmax(scores, axis=-1)
        if value.size > MAX_ANSWER_VALUES:
            return None
        return np.array(value, dtype=np.float64)

    def score(self, answer: npt.NDArray[Any], label: npt.NDArray[Any]) -> Tally:
        """Judge a kept ``answer`` against a label parsed by :func:`parse_label`.

        Raises:
            InvalidLabelError: the label does not fit this answer.
        """
        if self.classifier:
            return self._score_classes(answer, label)
        if label.shape != answer.shape and not (label.ndim <= 1 and label.size == answer.size):
            raise InvalidLabelError(
                f"the label of {self.output!r} must be {answer.size} number(s) of shape "
                f"{list(answer.shape)}, not shape {list(label.shape)}"
            )
        expected = label.astype(np.float64).reshape(answer.shape)
        bound = self.tolerance.atol + self.tolerance.rtol * np.abs(expected)
        return Tally(1, int(bool(np.all(np.abs(answer - expected) <= bound))))

    def _score_classes(self, answer: npt.NDArray[Any], label: npt.NDArray[Any]) -> Tally:
        rows = answer.size
        if label.dtype.kind != "i":
            raise InvalidLabelError(
                f"the label of classifier output {self.output!r} is an int class index "
                f"(a list of {rows}, one per row), not a float"
            )
        if label.shape != (rows,) and not (rows == 1 and label.ndim == 0):
            raise InvalidLabelError(
                f"the request had {rows} row(s): send a list of {rows} class indices "
                f"(or one index for one row), not shape {list(label.shape)}"
            )
        flat = label.reshape(-1)
        top = self.classes
        if flat.min() < 0 or (top is not None and flat.max() >= top):
            limit = "" if top is None else f" and below {top}"
            raise InvalidLabelError(
                f"a class index of {self.output!r} is >= 0{limit}, not {flat.tolist()}"
            )
        return Tally(rows, int(np.count_nonzero(answer == flat)))


def parse_label(label: object) -> npt.NDArray[Any]:
    """A label as an array: a real number, or (nested, rectangular) lists or tuples of them;
    int64 when every number is an int, float64 otherwise.

    Raises:
        InvalidLabelError: a bool, NaN, infinity, an int out of int64, another type, an
            empty or ragged list, or more than :data:`MAX_ANSWER_VALUES` numbers.
    """
    leaves: list[Number] = []
    shape = _walk(label, leaves, 0)
    # Explicit: numpy's default int is 32 bits on 32-bit devices.
    dtype = np.int64 if all(isinstance(x, int) for x in leaves) else np.float64
    return np.array(leaves, dtype=dtype).reshape(shape)


def _walk(value: object, leaves: list[Number], depth: int) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if not value or depth >= _MAX_LABEL_DEPTH or len(value) > MAX_ANSWER_VALUES:
            raise InvalidLabelError(
                f"a label list holds 1-{MAX_ANSWER_VALUES} numbers (or equal lists of them), "
                f"nested at most {_MAX_LABEL_DEPTH} deep"
            )
        shapes = {_walk(item, leaves, depth + 1) for item in value}
        if len(shapes) != 1:
            raise InvalidLabelError("a label's lists must all have the same shape")
        return (len(value), *shapes.pop())
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise InvalidLabelError(f"a label holds numbers, not {_show(value)}")
    number: Number = int(value) if isinstance(value, (int, np.integer)) else float(value)
    if isinstance(number, int) and not _INT64[0] <= number < _INT64[1]:
        raise InvalidLabelError(f"a label's integer {_show(number)} is out of range")
    if not math.isfinite(number):
        raise InvalidLabelError(f"a label holds finite numbers, not {number}")
    if len(leaves) >= MAX_ANSWER_VALUES:
        raise InvalidLabelError(f"a label holds at most {MAX_ANSWER_VALUES} numbers")
    leaves.append(number)
    return ()


class _Request:
    """The answers to one request, by version digest, and its label once it came."""

    __slots__ = ("answers", "label")

    def __init__(self) -> None:
        self.answers: dict[str, tuple[Judge, npt.NDArray[Any]]] = {}
        self.label: npt.NDArray[Any] | None = None


class FeedbackMemory:
    """The answers to the last ``max_requests`` request ids, and ground-truth counts per
    version. Thread-safe; :meth:`remember` is cheap enough for the request path."""

    def __init__(self, max_requests: int = 10_000) -> None:
        if max_requests < 1:
            raise ValueError(f"max_requests must be >= 1, not {max_requests}")
        self.max_requests = max_requests
        self._lock = threading.Lock()
        self._requests: OrderedDict[str, _Request] = OrderedDict()
        self._totals: dict[str, Tally] = {}
        self._window: dict[str, Tally] = {}

    def __len__(self) -> int:
        """The number of request ids remembered."""
        with self._lock:
            return len(self._requests)

    def remember(
        self, request_id: str, version: str, outputs: Mapping[str, Any], *, judge: Judge
    ) -> None:
        """Keep ``version``'s answer to ``request_id`` for a later label. Never raises on
        the request path: an invalid id or an answer too large to keep is skipped.

        An answer from a version that already answered this id means the id names a new
        request (the caller reused it): the old answers and label are dropped. An answer
        to a request already labelled (a shadow version answering late) is judged at once.
        """
        if not _valid_id(request_id):
            return
        answer = judge.answer(outputs)
        if answer is None:
            return
        with self._lock:
            request = self._requests.get(request_id)
            if request is None or version in request.answers:
                request = self._requests[request_id] = _Request()
                self._requests.move_to_end(request_id)
                while len(self._requests) > self.max_requests:
                    self._requests.popitem(last=False)
            request.answers[version] = (judge, answer)
            if request.label is not None:
                try:
                    self._count(version, judge.score(answer, request.label))
                except InvalidLabelError as exc:
                    log.debug("late answer of %s not judged: %s", version[:12], exc)

    def feedback(self, request_id: str, label: object) -> dict[str, Any]:
        """Judge every remembered answer to ``request_id`` against ``label`` and count it.

        Returns ``{"request_id": id, "versions": {digest: right}}``, ``right`` True when
        every row (a classifier's) or every value was right.

        Raises:
            InvalidRequestIdError: the id is not 1-128 printable characters.
            InvalidLabelError: the label does not fit an answer (nothing is counted).
            UnknownRequestError: no answer is remembered for the id (or no longer).
            AlreadyLabelledError: the request has its label already.
        """
        request_id = check_request_id(request_id)
        parsed = parse_label(label)
        with self._lock:
            request = self._requests.get(request_id)
            if request is None:
                raise UnknownRequestError(
                    f"no answer is remembered for request id {request_id!r}: it was not "
                    f"answered here, or is older than the last {self.max_requests} requests"
                )
            if request.label is not None:
                raise AlreadyLabelledError(
                    f"request id {request_id!r} is labelled already; a request counts once"
                )
            tallies = {
                v: judge.score(answer, parsed) for v, (judge, answer) in request.answers.items()
            }
            request.label = parsed
            for version, tally in tallies.items():
                self._count(version, tally)
        versions = {v: t.correct == t.labels for v, t in tallies.items()}
        return {"request_id": request_id, "versions": versions}

    def _count(self, version: str, tally: Tally) -> None:
        for counts in (self._totals, self._window):
            old = counts.get(version, Tally(0, 0))
            counts[version] = Tally(old.labels + tally.labels, old.correct + tally.correct)

    def take_window(self) -> dict[str, dict[str, int]]:
        """Per version, ``{"labels", "correct"}`` counted since the last call."""
        with self._lock:
            window, self._window = self._window, {}
        return {v: t.to_json() for v, t in window.items()}

    def totals(self) -> dict[str, dict[str, int]]:
        """Per version, ``{"labels", "correct"}`` counted since it was first labelled (or
        since :meth:`forget`)."""
        with self._lock:
            return {v: t.to_json() for v, t in self._totals.items()}

    def accuracy(self, version: str) -> Tally | None:
        """``version``'s cumulative (labels, correct); None before its first label."""
        with self._lock:
            return self._totals.get(version)

    def forget(self, version: str) -> None:
        """Drop ``version``'s counters and remembered answers: it serves no more."""
        with self._lock:
            self._totals.pop(version, None)
            self._window.pop(version, None)
            for request in self._requests.values():
                request.answers.pop(version, None)
