"""The prediction cache: bounded LRU keyed by input digest and model version, thread-safe."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pytest

from agent.errors import InputValidationError
from agent.serve._cache import CacheConfig, PredictionCache, input_digest
from agent.serve._model import Model
from agent.serve._slot import ModelSlot
from tests.support.models import load_onnx_mlp


class _Counting:
    """A pure-logic stand-in model: output = sum of inputs + offset; counts its calls."""

    def __init__(self, offset: float = 0.0, out_elements: int = 1) -> None:
        self.offset = offset
        self.out_elements = out_elements
        self.calls = 0
        self._lock = threading.Lock()

    def predict(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        with self._lock:
            self.calls += 1
        if "x" not in inputs or np.asarray(inputs["x"]).dtype.kind not in "biuf":
            raise InputValidationError("input 'x' missing or not numeric")
        total = float(np.asarray(inputs["x"]).sum()) + self.offset
        return {"y": np.full(self.out_elements, total, np.float64)}

    def close(self) -> None:
        pass


def _x(value: float, dtype: str = "float32") -> dict[str, np.ndarray]:
    return {"x": np.full((1, 4), value, dtype)}


def test_repeated_input_is_answered_from_the_cache() -> None:
    model = _Counting()
    cache = PredictionCache(model)
    first = cache.predict(_x(1.0))
    second = cache.predict(_x(1.0))
    assert model.calls == 1
    np.testing.assert_array_equal(first["y"], second["y"])
    assert cache.stats().hits == 1
    assert cache.stats().misses == 1


@pytest.mark.parametrize(
    "other",
    [
        {"x": np.full((1, 4), 2.0, np.float32)},  # other bytes
        {"x": np.full((1, 4), 1.0, np.float64)},  # other dtype
        {"x": np.full((4, 1), 1.0, np.float32)},  # other shape
        {"x": np.full((1, 4), 1.0, ">f4")},  # other byte order
        {"z": np.full((1, 4), 1.0, np.float32)},  # other name
        {"x": np.full((1, 4), 1.0, np.float32), "w": np.zeros(1, np.float32)},  # extra input
    ],
    ids=["bytes", "dtype", "shape", "byte order", "name", "extra input"],
)
def test_input_digest_differs_for_any_difference(other: dict[str, np.ndarray]) -> None:
    assert input_digest(_x(1.0)) != input_digest(other)


def test_input_digest_ignores_dict_order_and_memory_layout() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.asfortranarray(a).copy(order="C")
    assert input_digest({"a": a, "b": a}) == input_digest({"b": b, "a": b})


def test_least_recently_used_entry_is_evicted_beyond_max_entries() -> None:
    model = _Counting()
    cache = PredictionCache(model, CacheConfig(enabled=True, max_entries=2))
    cache.predict(_x(1.0))
    cache.predict(_x(2.0))
    cache.predict(_x(1.0))  # 1.0 is now the most recent
    cache.predict(_x(3.0))  # evicts 2.0
    calls = model.calls
    cache.predict(_x(1.0))
    assert model.calls == calls
    cache.predict(_x(2.0))
    assert model.calls == calls + 1
    assert cache.stats().evictions == 2


def test_cache_stays_within_max_bytes() -> None:
    model = _Counting(out_elements=100)  # 800 bytes per answer
    cache = PredictionCache(model, CacheConfig(enabled=True, max_entries=100, max_bytes=4000))
    for v in range(10):
        cache.predict(_x(float(v)))
    stats = cache.stats()
    assert stats.bytes <= 4000
    assert stats.entries == 5


def test_answer_larger_than_a_quarter_of_the_budget_is_not_cached() -> None:
    model = _Counting(out_elements=200)  # 1600 bytes
    cache = PredictionCache(model, CacheConfig(enabled=True, max_bytes=4000))
    cache.predict(_x(1.0))
    cache.predict(_x(1.0))
    assert model.calls == 2
    assert cache.stats().entries == 0


def test_failed_predictions_are_not_cached() -> None:
    model = _Counting()
    cache = PredictionCache(model)
    for _ in range(2):
        with pytest.raises(InputValidationError):
            cache.predict({"q": np.ones(2)})
    assert model.calls == 2
    assert cache.stats().entries == 0


def test_non_numeric_inputs_bypass_the_cache_to_the_validator() -> None:
    model = _Counting()
    cache = PredictionCache(model)
    with pytest.raises(InputValidationError, match="not numeric"):
        cache.predict({"x": ["a", "b"]})
    assert model.calls == 1
    assert cache.stats().misses == 0


def test_cached_outputs_are_read_only() -> None:
    cache = PredictionCache(_Counting())
    cache.predict(_x(1.0))
    hit = cache.predict(_x(1.0))
    with pytest.raises(ValueError, match="read-only"):
        hit["y"][0] = 42.0


def test_hot_swap_never_serves_the_previous_models_answers() -> None:
    slot = ModelSlot()
    old, new = _Counting(offset=0.0), _Counting(offset=100.0)
    slot.swap(old, "digest-old")
    cache = PredictionCache(slot)
    assert cache.predict(_x(1.0))["y"][0] == 4.0
    slot.swap(new, "digest-new")
    version, answer = cache.predict_versioned(_x(1.0))
    assert (version, answer["y"][0]) == ("digest-new", 104.0)
    slot.swap(old, "digest-old")  # a rollback: entries computed by "new" must not leak
    assert cache.predict(_x(1.0))["y"][0] == 4.0
    assert cache.predict(_x(1.0))["y"][0] == 4.0
    assert old.calls == 2


def test_concurrent_callers_get_correct_answers() -> None:
    model = _Counting()
    cache = PredictionCache(model, CacheConfig(enabled=True, max_entries=8))
    errors: list[str] = []

    def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(300):
            v = float(rng.integers(0, 16))
            got = cache.predict(_x(v))["y"][0]
            if got != 4 * v:
                errors.append(f"{v} -> {got}")

    threads = [threading.Thread(target=caller, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stats = cache.stats()
    assert errors == []
    assert stats.hits + stats.misses == 1800
    assert stats.entries <= 8


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Model]:
    with load_onnx_mlp(tmp_path_factory.mktemp("cache-model")) as m:
        yield m


@pytest.mark.integration
def test_cache_in_front_of_a_real_model_returns_its_exact_answers(onnx_model: Model) -> None:
    cache = PredictionCache(onnx_model)
    x = {"x": np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)}
    direct = onnx_model.predict(x)["probs"]
    np.testing.assert_array_equal(cache.predict(x)["probs"], direct)
    np.testing.assert_array_equal(cache.predict(x)["probs"], direct)
    assert cache.stats().hits == 1
    with pytest.raises(InputValidationError):
        cache.predict({"x": np.ones((1, 3), np.float32)})


def test_cache_is_off_by_default() -> None:
    assert CacheConfig().enabled is False
