"""Ground-truth feedback: answers remembered per request id, judged per version once labelled."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.bundle.manifest import GoldenCases, Health, Manifest, ModelSpec, TensorSpec, Tolerance
from agent.errors import (
    AlreadyLabelledError,
    InvalidLabelError,
    InvalidRequestIdError,
    UnknownRequestError,
    error_code,
)
from agent.plumbing.compat import zip_strict
from agent.serve._model import Model
from agent.serve.runtimes import load_model
from agent.telemetry._feedback import (
    MAX_ANSWER_VALUES,
    FeedbackMemory,
    Judge,
    Tally,
    check_request_id,
)
from tests.support.bundles import EXPECTED_PATH, GOLDEN_PATH, make_manifest
from tests.support.models import make_onnx_mlp, mlp_reference, mlp_weights

N_IN, N_HIDDEN, N_CLASSES = 8, 16, 4
SEEDS = {"serving": 1, "candidate": 2}
DIGEST = {name: hashlib.sha256(name.encode()).hexdigest() for name in SEEDS}
A, B = DIGEST["serving"], DIGEST["candidate"]

X = TensorSpec("x", "float32", (None, N_IN))
PROBS = TensorSpec("probs", "float32", (None, N_CLASSES))
VALUE = TensorSpec("value", "float32", (None, 1))  # one number per row: not class scores


def _manifest(*outputs: TensorSpec, health: Health | None = None) -> Manifest:
    model = ModelSpec("onnx", "model/model.onnx", (X,), outputs)
    health = health or Health(GOLDEN_PATH, EXPECTED_PATH, Tolerance(atol=0.01, rtol=0.1))
    return make_manifest(model=model, health=health)


CLASSIFIER = Judge.from_manifest(_manifest(PROBS))
VALUES = Judge.from_manifest(_manifest(VALUE))


def _scores(*top1: int) -> dict[str, npt.NDArray[np.float32]]:
    """Class scores of a batch whose rows' top-1 classes are ``top1``."""
    scores = np.full((len(top1), N_CLASSES), 0.1, dtype=np.float32)
    scores[np.arange(len(top1)), top1] = 0.7
    return {"probs": scores}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Model]]:
    """Two real onnxruntime classifiers with different weights, as two versions serve them."""
    loaded = {}
    for name, seed in SEEDS.items():
        directory = tmp_path_factory.mktemp(name)
        make_onnx_mlp(
            Path(directory) / "model" / "model.onnx",
            n_in=N_IN,
            n_hidden=N_HIDDEN,
            n_out=N_CLASSES,
            seed=seed,
        )
        loaded[name] = load_model(_manifest(PROBS), directory, "onnxruntime")
    yield loaded
    for model in loaded.values():
        model.close()


def _requests(count: int, seed: int) -> list[npt.NDArray[np.float32]]:
    """Batches of 1 to 3 rows."""
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1 + i % 3, N_IN)).astype(np.float32) for i in range(count)]


def _truth(x: npt.NDArray[np.float32], i: int) -> list[int]:
    """Ground truth that agrees with the serving model's weights on some requests, the
    candidate's on others, and neither on the rest."""
    rng = np.random.default_rng(1000 + i)
    if i % 3 == 2:
        return [int(c) for c in rng.integers(0, N_CLASSES, len(x))]
    seed = SEEDS["serving"] if i % 3 == 0 else SEEDS["candidate"]
    return [int(c) for c in _top1(x, seed)]


def _top1(x: npt.NDArray[np.float32], seed: int) -> npt.NDArray[np.intp]:
    """The model's classes computed in numpy, independently of the runtime and the memory."""
    return np.argmax(mlp_reference(x, mlp_weights(N_IN, N_HIDDEN, N_CLASSES, seed)), axis=-1)


# --- accuracy per version ------------------------------------------------------------


@pytest.mark.integration
def test_accuracy_per_version_is_the_accuracy_computed_independently(
    models: dict[str, Model],
) -> None:
    memory = FeedbackMemory()
    judge = Judge.from_manifest(_manifest(PROBS))
    expected = {A: [0, 0], B: [0, 0]}
    for i, x in enumerate(_requests(300, seed=5)):
        request_id = f"req-{i}"
        # The serving version answers; a candidate in shadow answers the same request.
        for name, digest in DIGEST.items():
            memory.remember(request_id, digest, models[name].predict({"x": x}), judge=judge)
        label = _truth(x, i)
        right = {}
        for name, digest in DIGEST.items():
            hits = int(np.count_nonzero(_top1(x, SEEDS[name]) == label))
            expected[digest][0] += len(label)
            expected[digest][1] += hits
            right[digest] = hits == len(label)
        sent = label[0] if len(label) == 1 else label
        assert memory.feedback(request_id, sent) == {"request_id": request_id, "versions": right}
    assert memory.totals() == {d: {"labels": n, "correct": k} for d, (n, k) in expected.items()}
    assert memory.accuracy(A) == Tally(*expected[A])
    assert memory.accuracy(B) == Tally(*expected[B])
    # The data tell the two versions apart, and neither is trivially right or wrong.
    assert expected[A] != expected[B]
    assert all(0 < k < n for n, k in expected.values())


def test_a_request_answered_by_one_version_counts_for_it_alone() -> None:
    # An A/B split: each request goes to one version.
    memory = FeedbackMemory()
    memory.remember("to-serving", A, _scores(1), judge=CLASSIFIER)
    memory.remember("to-candidate", B, _scores(2, 3), judge=CLASSIFIER)
    assert memory.feedback("to-serving", 1)["versions"] == {A: True}
    assert memory.feedback("to-candidate", [2, 0])["versions"] == {B: False}
    assert memory.totals() == {A: {"labels": 1, "correct": 1}, B: {"labels": 2, "correct": 1}}
    assert memory.accuracy("never-labelled") is None


def test_a_shadow_answer_arriving_after_the_label_is_judged_on_arrival() -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, _scores(0), judge=CLASSIFIER)
    assert memory.feedback("r", 2) == {"request_id": "r", "versions": {A: False}}
    memory.remember("r", B, _scores(2), judge=CLASSIFIER)
    assert memory.totals() == {A: {"labels": 1, "correct": 0}, B: {"labels": 1, "correct": 1}}


def test_an_id_answered_again_by_the_same_version_names_a_new_request() -> None:
    memory = FeedbackMemory()
    memory.remember("reused", A, _scores(0), judge=CLASSIFIER)
    memory.remember("reused", B, _scores(0), judge=CLASSIFIER)
    memory.feedback("reused", 0)
    memory.remember("reused", A, _scores(3), judge=CLASSIFIER)
    # The new request has only the new answer, and takes a label of its own.
    assert memory.feedback("reused", 3)["versions"] == {A: True}
    assert memory.totals() == {A: {"labels": 2, "correct": 2}, B: {"labels": 1, "correct": 1}}


# --- values outputs ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "right"),
    [
        ([1.0, -2.0, 10.0], True),  # exact
        ([1.005, -2.2, 10.9], True),  # each within 0.01 + 0.1 * |label|
        ([[1.0], [-2.0], [10.0]], True),  # the output's own shape
        ([1.2, -2.0, 10.0], False),  # 0.2 > 0.01 + 0.12
        ([0.5, -2.0, 10.0], False),  # 0.5 > 0.01 + 0.05
        ([1.0, -2.0, 12.0], False),  # 2.0 > 0.01 + 1.2
        ([1, -2, 10], True),  # ints are numbers too
    ],
)
def test_a_values_answer_is_right_within_the_golden_tolerance(label: Any, right: bool) -> None:
    memory = FeedbackMemory()
    answer = {"value": np.array([[1.0], [-2.0], [10.0]], dtype=np.float32)}
    memory.remember("r", A, answer, judge=VALUES)
    assert memory.feedback("r", label)["versions"] == {A: right}
    assert memory.totals() == {A: {"labels": 1, "correct": int(right)}}


def test_a_values_output_uses_its_own_golden_case_tolerance() -> None:
    cases = GoldenCases(1, "health/cases_in.npz", "health/cases_out.npz", {"value": Tolerance(1.0)})
    loose = Health(GOLDEN_PATH, EXPECTED_PATH, Tolerance(atol=0.01), cases=cases)
    judge = Judge.from_manifest(_manifest(VALUE, health=loose))
    assert judge.tolerance == Tolerance(1.0)
    memory = FeedbackMemory()
    memory.remember("r", A, {"value": np.array([[1.0], [2.0], [3.0]])}, judge=judge)
    assert memory.feedback("r", [1.9, 2.0, 3.0])["versions"] == {A: True}


def test_the_judge_watches_the_scores_output_and_knows_its_classes() -> None:
    label_first = _manifest(TensorSpec("label", "int64", (None,)), PROBS)
    assert Judge.from_manifest(label_first) == Judge(
        "probs", True, Tolerance(atol=0.01, rtol=0.1), N_CLASSES
    )
    assert (VALUES.output, VALUES.classifier, VALUES.classes) == ("value", False, None)
    # telemetry's output_kind chooses the same way
    assert not Judge.from_manifest(label_first, "values").classifier


# --- bounded memory --------------------------------------------------------------------


def test_the_oldest_request_ids_are_forgotten_beyond_max_requests() -> None:
    memory = FeedbackMemory(max_requests=3)
    for i in range(3):
        memory.remember(f"r{i}", A, _scores(0), judge=CLASSIFIER)
    # A shadow answer to the oldest request does not make it younger.
    memory.remember("r0", B, _scores(0), judge=CLASSIFIER)
    memory.remember("r3", A, _scores(0), judge=CLASSIFIER)
    assert len(memory) == 3
    with pytest.raises(UnknownRequestError, match="last 3 requests"):
        memory.feedback("r0", 0)
    for i in (1, 2, 3):
        assert memory.feedback(f"r{i}", 0)["versions"] == {A: True}


@pytest.mark.parametrize(
    ("judge", "outputs"),
    [
        (CLASSIFIER, _scores(*[0] * (MAX_ANSWER_VALUES + 1))),
        (VALUES, {"value": np.zeros((MAX_ANSWER_VALUES + 1, 1), dtype=np.float32)}),
        (CLASSIFIER, {"other": np.zeros((1, N_CLASSES), dtype=np.float32)}),
        (CLASSIFIER, {"probs": np.zeros((0, N_CLASSES), dtype=np.float32)}),
        (CLASSIFIER, {"probs": np.array(["a", "b"])}),
    ],
)
def test_an_answer_too_large_or_without_the_watched_output_is_not_remembered(
    judge: Judge, outputs: Mapping[str, Any]
) -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, outputs, judge=judge)
    assert len(memory) == 0
    with pytest.raises(UnknownRequestError):
        memory.feedback("r", 0)


def test_the_largest_answer_kept_is_remembered() -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, _scores(*[1] * MAX_ANSWER_VALUES), judge=CLASSIFIER)
    memory.feedback("r", [1] * MAX_ANSWER_VALUES)
    assert memory.totals() == {A: {"labels": MAX_ANSWER_VALUES, "correct": MAX_ANSWER_VALUES}}


# --- refused feedback ------------------------------------------------------------------


def test_an_unknown_request_id_is_refused_with_its_code() -> None:
    memory = FeedbackMemory()
    with pytest.raises(UnknownRequestError, match="no answer is remembered") as caught:
        memory.feedback("never-seen", 1)
    assert error_code(caught.value) == "unknown-request"


def test_a_second_label_is_refused_and_counts_nothing() -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, _scores(1), judge=CLASSIFIER)
    memory.feedback("r", 1)
    for again in (1, 2):  # the same label redelivered, or a correction
        with pytest.raises(AlreadyLabelledError, match="labelled already") as caught:
            memory.feedback("r", again)
        assert error_code(caught.value) == "already-labelled"
    assert memory.totals() == {A: {"labels": 1, "correct": 1}}


BAD_LABELS = [
    (True, "numbers, not True"),
    ([1, False], "numbers, not False"),
    (np.bool_(True), "numbers"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    ([0.5], "int class index"),
    (1.0, "int class index"),
    ("1", "numbers, not '1'"),
    (None, "numbers, not None"),
    ({"label": 1}, "numbers"),
    ([], "1-64 numbers"),
    ([[1], [1, 2]], "same shape"),
    ([0] * (MAX_ANSWER_VALUES + 1), "1-64 numbers"),
    ([[[[[[[[[1]]]]]]]]], "nested at most 8"),
    (2**63, "out of range"),
    (-1, ">= 0 and below 4"),
    (N_CLASSES, ">= 0 and below 4"),
    ([1, 1], "had 1 row"),
    ([[1]], "had 1 row"),
]


@pytest.mark.parametrize(("label", "message"), BAD_LABELS)
def test_a_label_that_does_not_fit_is_refused_and_counts_nothing(
    label: object, message: str
) -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, _scores(1), judge=CLASSIFIER)
    memory.remember("r", B, _scores(2), judge=CLASSIFIER)
    with pytest.raises(InvalidLabelError, match=message) as caught:
        memory.feedback("r", label)
    assert error_code(caught.value) == "invalid-input"
    assert memory.totals() == {}
    # The request still takes a label that fits.
    assert memory.feedback("r", np.int64(2))["versions"] == {A: False, B: True}


@pytest.mark.parametrize(
    ("label", "message"),
    [(1, "had 3 row"), ([1, 2], "had 3 row"), ([0, 1, 2.5], "int class index")],
)
def test_a_batch_takes_one_class_index_per_row(label: object, message: str) -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, _scores(0, 1, 2), judge=CLASSIFIER)
    with pytest.raises(InvalidLabelError, match=message):
        memory.feedback("r", label)


@pytest.mark.parametrize(
    "label", [[1.0, 2.0], [1.0, 2.0, 3.0, 4.0], [[1.0, 2.0, 3.0]], float("nan"), 1.0]
)
def test_a_values_label_must_have_the_outputs_size(label: object) -> None:
    memory = FeedbackMemory()
    memory.remember("r", A, {"value": np.array([[1.0], [2.0], [3.0]])}, judge=VALUES)
    with pytest.raises(InvalidLabelError):
        memory.feedback("r", label)


@pytest.mark.parametrize(
    "request_id", ["", "x" * 129, "tab\there", "new\nline", "\x00", 7, b"bytes", None]
)
def test_an_invalid_request_id_is_refused_and_never_remembered(request_id: Any) -> None:
    with pytest.raises(InvalidRequestIdError, match="1-128 printable") as caught:
        check_request_id(request_id)
    assert error_code(caught.value) == "invalid-input"
    memory = FeedbackMemory()
    memory.remember(request_id, A, _scores(1), judge=CLASSIFIER)  # skipped, never raises
    assert len(memory) == 0
    with pytest.raises(InvalidRequestIdError):
        memory.feedback(request_id, 1)


@pytest.mark.parametrize("request_id", ["a", "x" * 128, "req 42/ü-€", "0b7e-4c1d"])
def test_a_printable_request_id_of_up_to_128_characters_is_taken(request_id: str) -> None:
    assert check_request_id(request_id) == request_id
    memory = FeedbackMemory()
    memory.remember(request_id, A, _scores(1), judge=CLASSIFIER)
    assert memory.feedback(request_id, 1)["versions"] == {A: True}


# --- windows, totals, forgetting ----------------------------------------------------------


def test_a_window_holds_the_counts_since_the_last_one_and_totals_keep_counting() -> None:
    memory = FeedbackMemory()
    for i in range(3):
        memory.remember(f"r{i}", A, _scores(1), judge=CLASSIFIER)
    memory.feedback("r0", 1)
    memory.feedback("r1", 1)
    assert memory.take_window() == {A: {"labels": 2, "correct": 2}}
    assert memory.take_window() == {}
    memory.feedback("r2", 0)
    assert memory.take_window() == {A: {"labels": 1, "correct": 0}}
    assert memory.totals() == {A: {"labels": 3, "correct": 2}}


def test_a_forgotten_version_loses_its_counters_and_its_answers() -> None:
    memory = FeedbackMemory()
    for request_id in ("r0", "r1"):
        memory.remember(request_id, A, _scores(1), judge=CLASSIFIER)
        memory.remember(request_id, B, _scores(1), judge=CLASSIFIER)
    memory.feedback("r0", 1)
    memory.forget(B)
    assert memory.totals() == {A: {"labels": 1, "correct": 1}}
    assert memory.take_window() == {A: {"labels": 1, "correct": 1}}
    assert memory.accuracy(B) is None
    # Its answer to r1 is gone too: a label judges the serving version alone.
    assert memory.feedback("r1", 1)["versions"] == {A: True}
    assert memory.accuracy(B) is None


@pytest.mark.integration
def test_counts_add_up_exactly_while_threads_remember_label_and_take_windows(
    models: dict[str, Model],
) -> None:
    threads, per_thread = 4, 150
    requests = _requests(threads * per_thread, seed=9)
    answers = {name: [models[name].predict({"x": x}) for x in requests] for name in DIGEST}
    labels = [_truth(x, i) for i, x in enumerate(requests)]
    memory = FeedbackMemory(max_requests=len(requests))
    windows: list[dict[str, dict[str, int]]] = []
    done = threading.Event()

    def work(first: int) -> None:
        for i in range(first, len(requests), threads):
            for name, digest in DIGEST.items():
                memory.remember(f"r{i}", digest, answers[name][i], judge=CLASSIFIER)
            memory.feedback(f"r{i}", labels[i])

    def report() -> None:
        while not done.is_set():
            windows.append(memory.take_window())

    reporter = threading.Thread(target=report)
    reporter.start()
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    reporter.join()
    windows.append(memory.take_window())
    expected = {}
    for name, digest in DIGEST.items():
        hits = sum(
            int(np.count_nonzero(_top1(x, SEEDS[name]) == y))
            for x, y in zip_strict(requests, labels)
        )
        expected[digest] = {"labels": sum(map(len, labels)), "correct": hits}
    assert memory.totals() == expected
    summed = {d: {"labels": 0, "correct": 0} for d in DIGEST.values()}
    for window in windows:
        for digest, counts in window.items():
            for key, value in counts.items():
                summed[digest][key] += value
    assert summed == expected
