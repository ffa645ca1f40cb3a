"""Hot swap under load: versions install, commit and roll back while threads call predict."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.bundle.manifest import Manifest
from agent.errors import EdgeshipError, StateError
from agent.install import UpdateConfig, Updater, UpdaterConfig
from agent.serve._slot import ModelSlot, ServingModel
from agent.serve.runtimes import load_model
from tests.support.lifecycle import POLICY, golden_inputs, make_model_bundle

THREADS = 4


class TrackedModel:
    """A real model that notes whether it was ever closed while a call was running."""

    def __init__(self, model: ServingModel, violations: list[str]) -> None:
        self._model = model
        self._lock = threading.Lock()
        self._inflight = 0
        self.closed = False
        self._violations = violations

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        with self._lock:
            if self.closed:
                self._violations.append("predict on a closed model")
            self._inflight += 1
        try:
            return self._model.predict(inputs)
        finally:
            with self._lock:
                self._inflight -= 1

    def close(self) -> None:
        with self._lock:
            if self._inflight:
                self._violations.append(f"closed with {self._inflight} calls in flight")
            if self.closed:
                self._violations.append("closed twice")
            self.closed = True
        self._model.close()


def test_swaps_under_concurrent_load_fail_no_call_and_never_mix_models(tmp_path: Path) -> None:
    bundles = [make_model_bundle(tmp_path / "b", seed=1 + i % 2, sequence=i + 1) for i in range(12)]
    violations: list[str] = []
    models: list[TrackedModel] = []

    def loader(manifest: Manifest, model_dir: Path, runtime: str) -> ServingModel:
        model = TrackedModel(load_model(manifest, model_dir, runtime), violations)
        models.append(model)
        return model

    slot = ModelSlot()
    updater = Updater(
        tmp_path / "state",
        POLICY,
        slot=slot,
        loader=loader,
        config=UpdaterConfig(update=UpdateConfig(health_runs=2)),
    )
    seed_of: dict[str, int] = {}
    outputs = {b.seed: b.outputs for b in bundles[:2]}
    assert not np.allclose(outputs[1], outputs[2], atol=1e-3)  # distinguishable models

    def install(index: int) -> None:
        result = updater.install(str(bundles[index].path))
        seed_of[result.digest] = bundles[index].seed
        verdict = updater.check_probation()
        assert verdict is not None
        assert verdict.state == "passed"

    install(0)
    stop = threading.Event()
    answers: list[list[tuple[str, npt.NDArray[Any]]]] = [[] for _ in range(THREADS)]
    failures: list[BaseException] = []
    x = golden_inputs()

    def client(out: list[tuple[str, npt.NDArray[Any]]]) -> None:
        while not stop.is_set():
            try:
                digest, result = slot.predict_versioned(x)
            except (EdgeshipError, RuntimeError) as exc:  # counted, not swallowed
                failures.append(exc)
                continue
            out.append((digest, result["probs"]))

    threads = [threading.Thread(target=client, args=(a,)) for a in answers]
    for t in threads:
        t.start()
    try:
        for i in range(1, len(bundles)):
            install(i)
            if i % 4 == 0:
                updater.rollback()  # back to the previous version, then on again
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert failures == []
    assert violations == []
    total = sum(len(a) for a in answers)
    assert total > len(bundles) * THREADS
    by_seed: dict[int, list[npt.NDArray[Any]]] = {1: [], 2: []}
    answered_by = set()
    for per_thread in answers:
        for digest, probs in per_thread:
            answered_by.add(digest)
            by_seed[seed_of[digest]].append(probs)
    for seed, got in by_seed.items():
        stacked = np.stack(got)
        # Every answer is the whole answer of the model that gave it, never the other's.
        assert np.abs(stacked - outputs[seed]).max() <= 1e-6
        assert np.abs(stacked - outputs[3 - seed]).max(axis=(1, 2)).min() > 1e-3
    assert len(answered_by) > 2  # several versions really served under load
    active = [m for m in models if not m.closed]
    assert len(active) == 1
    assert slot.digest == updater.status().current


def test_swap_closes_the_old_model_only_after_its_last_call() -> None:
    release = threading.Event()
    started = threading.Event()
    closed: list[str] = []

    class Slow:
        def __init__(self, name: str) -> None:
            self.name = name

        def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
            started.set()
            release.wait(5)
            return {"y": np.array([self.name == "old"])}

        def close(self) -> None:
            closed.append(self.name)

    slot = ModelSlot()
    slot.swap(Slow("old"), "a" * 64)
    result: list[tuple[str, dict[str, npt.NDArray[Any]]]] = []
    t = threading.Thread(target=lambda: result.append(slot.predict_versioned({})))
    t.start()
    started.wait(5)
    assert slot.swap(Slow("new"), "b" * 64) == "a" * 64
    assert closed == []  # the old model still has a call in flight
    release.set()
    t.join()
    assert closed == ["old"]
    assert result[0][0] == "a" * 64
    assert bool(result[0][1]["y"][0])
    assert slot.clear() == "b" * 64
    assert closed == ["old", "new"]


def test_empty_slot_refuses_predictions() -> None:
    with pytest.raises(StateError, match="no model is installed"):
        ModelSlot().predict({})


def test_stop_waits_for_calls_in_flight_then_refuses_new_ones() -> None:
    release = threading.Event()
    started = threading.Event()
    closed: list[bool] = []

    class Slow:
        def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
            started.set()
            release.wait(5)
            return {"y": np.zeros(1)}

        def close(self) -> None:
            closed.append(True)

    slot = ModelSlot()
    slot.swap(Slow(), "a" * 64)
    caller = threading.Thread(target=slot.predict, args=({},))
    caller.start()
    started.wait(5)
    assert slot.stop(timeout_s=0.05) is False  # the call is still running
    with pytest.raises(StateError, match="stopping"):
        slot.predict({})
    assert closed == []
    release.set()
    assert slot.stop(timeout_s=5) is True
    caller.join()
    assert closed == [True]
    with pytest.raises(StateError, match="stopped"):
        slot.swap(Slow(), "b" * 64)
