"""The shadow runner: a candidate answers sampled live requests off the request path and is
promoted or rejected by the promotion rule; real onnxruntime models wherever one fits."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import helper, numpy_helper

from agent.bundle.manifest import GoldenCases, Health, Manifest, ModelSpec, TensorSpec, Tolerance
from agent.errors import InferenceError, StateError
from agent.messages.desired import PromotionRule
from agent.serve._shadow import Comparison, ShadowRunner, judge_shadow
from agent.serve.runtimes import load_model
from tests.support.bundles import make_manifest
from tests.support.models import make_onnx_mlp, mlp_reference, mlp_weights

DIGEST = "a" * 64
OTHER = "b" * 64
N_IN, N_OUT = 4, 4
WEIGHTS = mlp_weights(N_IN, 8, N_OUT, seed=3)


def manifest_for(file: str) -> Manifest:
    return make_manifest(
        model=ModelSpec(
            format="onnx",
            file=file,
            inputs=(TensorSpec("x", "float32", (None, N_IN)),),
            outputs=(TensorSpec("probs", "float32", (None, N_OUT)),),
        )
    )


def write_golden_only(served: Path, path: Path) -> None:
    """The served MLP where every |x| < 1 (the golden region); elsewhere its class scores
    reversed, so that its top-1 class is always another (4 classes: i -> 3 - i)."""
    model = onnx.load(str(served))
    model.graph.node[-1].output[0] = "p"  # the softmax
    for name, value, dtype in (("start", [-1], np.int64), ("end", [-(2**62)], np.int64)):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
    model.graph.initializer.append(numpy_helper.from_array(np.array([1], np.int64), "axis"))
    model.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "one"))
    model.graph.node.extend(
        [
            helper.make_node("Slice", ["p", "start", "end", "axis", "start"], ["reversed"]),
            helper.make_node("Abs", ["x"], ["ax"]),
            helper.make_node("ReduceMax", ["ax"], ["biggest"], axes=[1], keepdims=1),  # opset 17
            helper.make_node("Less", ["biggest", "one"], ["golden"]),
            helper.make_node("Where", ["golden", "p", "reversed"], ["probs"]),
        ]
    )
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture
def models(tmp_path: Path) -> Iterator[Callable[[str], Any]]:
    """Loads ``served`` (the MLP) or ``golden_only`` as the agent serves it."""
    served = make_onnx_mlp(tmp_path / "model" / "served.onnx", weights=WEIGHTS)
    write_golden_only(served, tmp_path / "model" / "golden_only.onnx")
    loaded: list[Any] = []

    def load(name: str) -> Any:
        model = load_model(manifest_for(f"model/{name}.onnx"), tmp_path, "onnxruntime")
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


def rows(seed: int, n: int, scale: float) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).uniform(-scale, scale, (n, N_IN)).astype(np.float32)


def wait_until(condition: Callable[[], bool], what: str) -> None:
    """Waits for the worker (never a speed assertion: the bound only ends a stuck test)."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.002)


def quick(*args: Any, **kwargs: Any) -> ShadowRunner:  # no pause between samples
    return ShadowRunner(*args, min_gap_s=0.0, **kwargs)


def ran(runner: ShadowRunner, samples: int) -> Callable[[], bool]:
    return lambda: bool(runner.stats()["samples"] >= samples)


def serve_and_offer(
    runner: ShadowRunner, served: Any, inputs: list[npt.NDArray[np.float32]], ids: bool = False
) -> None:
    """Serve each request, offer it, and wait until the worker took it (queue never full)."""
    for i, x in enumerate(inputs):
        before = runner.stats()["samples"]
        feed = {"x": x[None, :]}
        start = time.perf_counter()
        outputs = served.predict(feed)
        runner.offer(feed, outputs, time.perf_counter() - start, f"r{i}" if ids else None)
        if runner.stats()["verdict"] != "watching":
            return
        wait_until(ran(runner, before + 1), "the sample was run")


RULE = PromotionRule(min_samples=20, min_agreement=0.9, max_latency_ratio=100.0, sample_rate=1.0)


def test_identical_candidate_is_promoted_after_min_samples(models: Any) -> None:
    served = models("served")
    runner = quick(models("served"), DIGEST, RULE, Comparison.from_manifest(manifest_for("m")))
    try:
        serve_and_offer(runner, served, list(rows(1, 19, 3.0)))
        assert runner.verdict().state == "watching"
        serve_and_offer(runner, served, list(rows(2, 1, 3.0)))
        verdict = runner.verdict()
        stats = runner.stats()
    finally:
        runner.close()
    assert verdict.state == "promote", verdict.reason
    assert (verdict.samples, verdict.agreement) == (20, 1.0)
    assert stats["samples"] == stats["agreed"] == 20
    assert stats["max_abs_diff"] == 0.0
    assert stats["served_ms"] > 0
    assert stats["shadow_ms"] > 0
    assert stats["verdict"] == "promote"
    json.dumps(stats, allow_nan=False)


def test_serving_version_is_timed_beside_the_candidate_on_one_sample_in_four(
    models: Any,
) -> None:
    served, calls = models("served"), []

    def reference(inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        calls.append(inputs)
        return served.predict(inputs)  # type: ignore[no-any-return]

    runner = quick(models("served"), DIGEST, RULE, Comparison(), reference=reference)
    try:
        serve_and_offer(runner, served, list(rows(1, 9, 3.0)))
        stats = runner.stats()
    finally:
        runner.close()
    assert len(calls) == 3  # samples 0, 4 and 8
    assert stats["served_ms"] > 0
    assert stats["latency_ratio"] > 0


def test_failing_serving_version_is_not_held_against_the_candidate(models: Any) -> None:
    def reference(inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        raise InferenceError("the serving version failed")

    served = models("served")
    runner = quick(models("served"), DIGEST, RULE, Comparison(), reference=reference)
    try:
        serve_and_offer(runner, served, list(rows(1, 20, 3.0)))
        stats, verdict = runner.stats(), runner.verdict()
    finally:
        runner.close()
    assert (stats["samples"], stats["agreed"], stats["errors"]) == (20, 20, 0)
    assert stats["latency_ratio"] is None
    assert verdict.state == "watching"  # no latency to judge yet: promotion waits


def test_candidate_right_only_on_golden_inputs_is_rejected_on_live_traffic(models: Any) -> None:
    served, candidate = models("served"), models("golden_only")
    golden = rows(7, 16, 0.9)
    # It would pass the health gate: on the golden region it is the served model.
    np.testing.assert_array_equal(
        candidate.predict({"x": golden})["probs"], served.predict({"x": golden})["probs"]
    )
    rule = PromotionRule(min_samples=200, min_agreement=0.99, sample_rate=1.0)
    runner = quick(candidate, DIGEST, rule, Comparison.from_manifest(manifest_for("m")))
    try:
        live = rows(8, 50, 4.0)
        assert (np.abs(live).max(axis=1) >= 1.0).all()
        serve_and_offer(runner, served, list(live))
        verdict = runner.verdict()
        stats = runner.stats()
    finally:
        runner.close()
    # The 3rd disagreement makes 0.99 over 200 samples unreachable.
    assert verdict.state == "reject"
    assert (verdict.samples, verdict.agreement) == (3, 0.0)
    assert verdict.reason == (
        "3 of 3 samples disagree with the serving version: agreement can no longer reach"
        " 0.99 over 200 samples"
    )
    assert stats["verdict"] == "reject"
    assert stats["max_abs_diff"] > 0.0


class BlockingModel:
    """Blocks in predict until released (the worker stays busy as long as the test wants),
    then echoes its input, or raises if told to."""

    def __init__(self, fails: bool = False) -> None:
        self.entered, self.release = threading.Event(), threading.Event()
        if fails:
            self.release.set()
        self.calls, self.closed, self.fails = 0, False, fails

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        self.calls += 1
        self.entered.set()
        self.release.wait()
        if self.fails:
            raise InferenceError("the candidate's runtime failed")
        return {"y": np.asarray(inputs["x"], np.float32)}

    def close(self) -> None:
        self.closed = True


def test_full_queue_drops_and_counts_without_blocking() -> None:
    model = BlockingModel()
    rule = PromotionRule(min_samples=1000, sample_rate=1.0)
    runner = quick(model, DIGEST, rule, Comparison(), queue_size=3)
    x = {"x": np.zeros((1, 2), np.float32)}
    y = {"y": np.zeros((1, 2), np.float32)}
    try:
        runner.offer(x, y, 0.001)
        assert model.entered.wait(60)
        for _ in range(3 + 5):  # three fill the queue, five find it full
            runner.offer(x, y, 0.001)
        assert runner.stats()["dropped"] == 5
        model.release.set()
        wait_until(lambda: runner.stats()["samples"] == 4, "the queued samples were run")
        assert model.calls == 4
        assert runner.stats()["agreed"] == 4
    finally:
        model.release.set()
        runner.close()
    assert model.closed


def test_raising_candidate_counts_errors_and_is_rejected() -> None:
    rule = PromotionRule(min_samples=10, min_agreement=0.9, sample_rate=1.0)
    runner = quick(BlockingModel(fails=True), DIGEST, rule, Comparison())
    x, y = {"x": np.zeros((1, 2), np.float32)}, {"y": np.zeros((1, 2), np.float32)}
    try:
        runner.offer(x, y, 0.001)
        wait_until(lambda: runner.stats()["samples"] == 1, "the first sample was run")
        assert runner.verdict().state == "watching"  # 9 of 10 may still agree
        runner.offer(x, y, 0.001)
        wait_until(lambda: runner.stats()["samples"] == 2, "the second sample was run")
        stats, verdict = runner.stats(), runner.verdict()
    finally:
        runner.close()
    assert (stats["errors"], stats["agreed"]) == (2, 0)
    assert verdict.state == "reject"
    assert "2 of 2 samples disagree" in verdict.reason


def test_state_file_resumes_counters_in_a_new_runner(models: Any, tmp_path: Path) -> None:
    served, state = models("served"), tmp_path / "shadow.json"
    rule = PromotionRule(min_samples=30, min_agreement=0.5, max_seconds=100, sample_rate=1.0)
    now = [1000.0]
    comparison = Comparison.from_manifest(manifest_for("m"))
    first = quick(
        models("golden_only"), DIGEST, rule, comparison, state_path=state, clock=lambda: now[0]
    )
    serve_and_offer(first, served, [*rows(1, 4, 0.5), *rows(2, 2, 3.0)])
    now[0] += 40
    first.close()
    assert json.loads(state.read_text())["samples"] == 6

    now[0] = 5.0  # another boot: the monotonic clock starts over
    second = quick(
        models("golden_only"), DIGEST, rule, comparison, state_path=state, clock=lambda: now[0]
    )
    try:
        assert (second.stats()["samples"], second.stats()["agreed"]) == (6, 4)
        assert second.stats()["shadow_ms"] is not None  # the latencies came back too
        serve_and_offer(second, served, list(rows(3, 3, 0.5)))
        assert (second.stats()["samples"], second.stats()["agreed"]) == (9, 7)
        assert second.verdict().state == "watching"
        now[0] += 60  # 40 s before the restart and 60 s after: max_seconds is over
        verdict = second.verdict()
    finally:
        second.close()
    assert verdict.state == "reject"
    assert verdict.reason.startswith("no decision after 100 s (at most 100 s): 9 of 30 samples")
    second.clear()
    assert not state.exists()


@pytest.mark.parametrize(
    ("content", "warning"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b"[1, 2]", "must be an object"),
        (None, "another version"),
        (b'{"v": 2}', "v must be"),
    ],
)
def test_state_of_another_digest_or_corrupt_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes | None, warning: str
) -> None:
    state = tmp_path / "shadow.json"
    if content is None:  # a valid file, for another version
        writer = quick(BlockingModel(), OTHER, RULE, Comparison(), state_path=state)
        writer.close()
        assert json.loads(state.read_text())["digest"] == OTHER
    else:
        state.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="edgeship.agent"):
        runner = quick(BlockingModel(), DIGEST, RULE, Comparison(), state_path=state)
    runner.close()
    assert runner.stats()["samples"] == 0
    assert warning in caplog.text
    assert json.loads(state.read_text())["digest"] == DIGEST  # started over, saved anew


def test_take_model_hands_over_an_open_candidate_and_close_then_spares_it(models: Any) -> None:
    candidate = models("served")
    runner = quick(candidate, DIGEST, RULE, Comparison())
    taken = runner.take_model()
    assert taken is candidate
    assert runner.take_model() is candidate  # idempotent
    runner.close()
    assert taken.predict({"x": rows(1, 2, 1.0)})["probs"].shape == (2, N_OUT)


def test_close_closes_the_candidate_and_refuses_to_hand_it_over(models: Any) -> None:
    candidate = models("served")
    runner = quick(candidate, DIGEST, RULE, Comparison())
    runner.close()
    runner.close()  # idempotent
    with pytest.raises(InferenceError, match="closed"):
        candidate.predict({"x": rows(1, 2, 1.0)})
    with pytest.raises(StateError, match="closed"):
        runner.take_model()
    runner.offer({"x": rows(1, 1, 1.0)}, {}, 0.001)  # after close: ignored, no error


def test_on_result_receives_the_candidates_outputs_by_request_id(models: Any) -> None:
    served, candidate = models("served"), models("golden_only")
    got: dict[str, dict[str, npt.NDArray[Any]]] = {}
    rule = PromotionRule(min_samples=20, min_agreement=0.0, sample_rate=1.0)  # never rejects
    runner = quick(
        candidate, DIGEST, rule, Comparison(), on_result=lambda rid, out: got.update({rid: out})
    )
    live = list(rows(5, 3, 3.0))
    try:
        serve_and_offer(runner, served, live, ids=True)
        runner.offer({"x": live[0][None, :]}, served.predict({"x": live[0][None, :]}), 0.001)
        wait_until(lambda: runner.stats()["samples"] == 4, "the sample without an id was run")
    finally:
        runner.close()
    assert sorted(got) == ["r0", "r1", "r2"]
    for i, x in enumerate(live):  # outside the golden region: the MLP's scores reversed
        expected = mlp_reference(x[None, :], WEIGHTS)[:, ::-1]
        np.testing.assert_allclose(got[f"r{i}"]["probs"], expected, rtol=1e-5)


def test_sampling_follows_the_rate_with_the_given_rng() -> None:
    model = BlockingModel()
    model.release.set()
    rule = PromotionRule(min_samples=1000, sample_rate=0.25)
    runner = quick(model, DIGEST, rule, Comparison(), rng=random.Random(42), queue_size=200)
    x = {"x": np.zeros((1, 2), np.float32)}
    draws = random.Random(42)
    expected = sum(draws.random() < 0.25 for _ in range(100))
    try:
        for _ in range(100):
            runner.offer(x, {"y": x["x"]}, 0.001)
        wait_until(lambda: runner.stats()["samples"] == expected, "the sampled requests ran")
    finally:
        runner.close()
    assert 0 < expected < 100
    assert model.calls == expected


# --- comparisons on arrays ---------------------------------------------------------

SCORES = Comparison(scores="probs")
TOLERANT = Comparison(
    tolerance=Tolerance(atol=0.01), tolerances={"wide": Tolerance(atol=0.0, rtol=0.5)}
)


@pytest.mark.parametrize(
    ("comparison", "served", "shadow", "agree"),
    [
        (SCORES, [[0.1, 0.9], [0.8, 0.2]], [[0.4, 0.6], [0.51, 0.49]], True),
        (SCORES, [[0.1, 0.9], [0.8, 0.2]], [[0.4, 0.6], [0.49, 0.51]], False),  # row 2 flips
        (SCORES, [[0.1, 0.9]], [[0.1, 0.9], [0.1, 0.9]], False),  # another shape
        (SCORES, [[0.1, 0.9]], [[np.nan, 0.9]], False),
        (SCORES, [[0.1, 0.9]], [["a", "b"]], False),
        (TOLERANT, [1.0, 2.0], [1.009, 1.991], True),
        (TOLERANT, [1.0, 2.0], [1.011, 2.0], False),
        (TOLERANT, [1.0, np.inf], [1.0, np.inf], True),
        (TOLERANT, [1.0, np.inf], [1.0, -np.inf], False),
        (TOLERANT, [1.0, np.nan], [1.0, np.nan], True),
        (TOLERANT, [1.0, 2.0], [1.0, np.nan], False),
        (TOLERANT, [1.0, 2.0], [[1.0, 2.0]], False),
        (TOLERANT, [1.0, 2.0], None, False),  # the output is missing
    ],
)
def test_comparison_of_arrays(
    comparison: Comparison, served: Any, shadow: Any, agree: bool
) -> None:
    name = "probs" if comparison.scores else "y"
    other = {} if shadow is None else {name: np.asarray(shadow)}
    assert comparison.compare({name: np.asarray(served)}, other).agree is agree


def test_tolerance_is_per_output_and_differences_are_recorded() -> None:
    served = {"y": np.array([1.0, 2.0]), "wide": np.array([10.0, 10.0])}
    found = TOLERANT.compare(served, {"y": np.array([1.0, 2.005]), "wide": np.array([14.0, 6.0])})
    assert found.agree  # |4| <= 0.5 * 10 on "wide", |0.005| <= 0.01 on "y"
    assert found.max_abs_diff == pytest.approx(4.0)
    assert found.mean_abs_diff == pytest.approx((0.0025 + 4.0) / 2)
    assert not TOLERANT.compare(served, {"y": served["y"], "wide": np.array([16.0, 10.0])}).agree


def test_top1_ignores_outputs_other_than_the_scores() -> None:
    served = {"probs": np.array([[0.2, 0.8]]), "label": np.array([1])}
    assert SCORES.compare(served, {"probs": np.array([[0.4, 0.6]]), "label": np.array([0])}).agree


def test_comparison_follows_the_manifest() -> None:
    assert Comparison.from_manifest(manifest_for("m")).scores == "probs"
    cases = GoldenCases(2, "i.npz", "o.npz", {"y": Tolerance(atol=0.5)})
    health = Health("g.npz", "e.npz", Tolerance(atol=0.1), cases=cases)
    x, y = TensorSpec("x", "float32", (None, 4)), TensorSpec("y", "float32", (None, 1))
    spec = ModelSpec("onnx", "m.onnx", (x,), (y,))  # y is no class scores: tolerance applies
    comparison = Comparison.from_manifest(make_manifest(health=health, model=spec))
    assert comparison == Comparison(None, Tolerance(atol=0.1), {"y": Tolerance(atol=0.5)})


R200 = PromotionRule(min_samples=200, min_agreement=0.99)
R10 = PromotionRule(min_samples=10, min_agreement=0.9, max_latency_ratio=1.5, max_seconds=60)
ACC = PromotionRule(min_samples=10, min_agreement=0.9, min_accuracy=0.8, min_feedback=20)


@pytest.mark.parametrize(
    ("rule", "samples", "agreed", "kw", "state", "reason"),
    [
        (R200, 10, 8, {}, "watching", ""),  # 198 of 200 may still agree
        (R200, 10, 7, {}, "reject", "3 of 10 samples disagree"),
        (R200, 199, 197, {}, "watching", ""),
        (R200, 200, 198, {}, "promote", "agreement 0.99 over 200 samples, latency 1x"),
        (R10, 50, 31, {}, "reject", "agreement 0.62 over 50 samples is below 0.9"),
        (R10, 9, 9, {"latency_ratio": 3.0}, "watching", ""),  # judged at min_samples
        (R10, 10, 10, {"latency_ratio": 1.6}, "reject", "1.6x the serving version's over 10"),
        (R10, 10, 10, {"latency_ratio": 1.5}, "promote", "over 10 samples, latency 1.5x"),
        (R10, 10, 10, {"latency_ratio": None}, "watching", ""),  # the serving version failed
        (R10, 3, 3, {"elapsed_s": 59.9}, "watching", ""),
        (R10, 3, 3, {"elapsed_s": 60}, "reject", "no decision after 60 s (at most 60 s): 3 of"),
        (R200, 3, 3, {"elapsed_s": 1e9}, "watching", ""),  # max_seconds 0: no limit
        (ACC, 10, 10, {}, "watching", ""),
        (ACC, 10, 10, {"accuracy": (19, 19)}, "watching", ""),
        (ACC, 10, 10, {"accuracy": (20, 16)}, "promote", "1x, accuracy 0.8 on 20 labels"),
        (ACC, 10, 10, {"accuracy": (20, 15)}, "reject", "accuracy 0.75 on 20 labels is below 0.8"),
        (ACC, 3, 3, {"accuracy": (20, 15), "elapsed_s": 9}, "watching", ""),
    ],
)
def test_promotion_rule(
    rule: PromotionRule, samples: int, agreed: int, kw: dict[str, Any], state: str, reason: str
) -> None:
    kw = {"latency_ratio": 1.0, "elapsed_s": 0.0, **kw}
    verdict = judge_shadow(rule, samples=samples, agreed=agreed, **kw)
    assert verdict.state == state
    assert reason in verdict.reason
    assert (verdict.samples, verdict.latency_ratio) == (samples, kw["latency_ratio"])


def test_a_decision_is_final_and_stops_sampling() -> None:
    model = BlockingModel()
    model.release.set()
    rule = PromotionRule(min_samples=2, min_agreement=1.0, sample_rate=1.0)
    runner = quick(model, DIGEST, rule, Comparison())
    x = {"x": np.zeros((1, 2), np.float32)}
    try:
        runner.offer(x, {"y": x["x"] + 1}, 0.001)  # disagrees: 1.0 is out of reach
        wait_until(lambda: runner.stats()["verdict"] == "reject", "the rejection")
        runner.offer(x, {"y": x["x"]}, 0.001)
        assert runner.verdict(accuracy=(100, 100)).state == "reject"
    finally:
        runner.close()
    assert model.calls == 1
