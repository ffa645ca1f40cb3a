"""Execution providers and delegates at load time: exactly the first preferred, or an error."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agent.errors import RuntimeUnavailableError
from agent.serve.runtimes import RuntimeOptions, load_model, provider_chain
from tests.agent.serve.runtimes.conftest import Models, require_runtime


@pytest.mark.parametrize(
    ("runtime", "options", "chain"),
    [
        ("onnxruntime", RuntimeOptions(), ("CPUExecutionProvider",)),
        ("litert", RuntimeOptions(), ("xnnpack",)),
        (
            "onnxruntime",
            RuntimeOptions(providers=("OpenVINOExecutionProvider",)),
            ("OpenVINOExecutionProvider", "CPUExecutionProvider"),
        ),
        (
            "onnxruntime",
            RuntimeOptions(providers=("CPUExecutionProvider", "A", "CPUExecutionProvider")),
            ("CPUExecutionProvider", "A"),
        ),
        ("tflite-runtime", RuntimeOptions(delegates=("xnnpack",)), ("xnnpack", "cpu")),
        # onnxruntime's preference does not apply to TFLite models, nor the reverse.
        ("litert", RuntimeOptions(providers=("CUDAExecutionProvider",)), ("xnnpack",)),
    ],
)
def test_the_chain_is_the_preference_then_the_cpu_path(
    runtime: str, options: RuntimeOptions, chain: tuple[str, ...]
) -> None:
    assert provider_chain(runtime, options) == chain


def test_options_survive_the_trip_to_the_gate_child_as_json() -> None:
    options = RuntimeOptions(
        providers=("OpenVINOExecutionProvider",),
        delegates=("cpu",),
        provider_options={"OpenVINOExecutionProvider": {"device_type": "CPU"}},
    )
    again = RuntimeOptions(**json.loads(json.dumps(dataclasses.asdict(options))))
    assert again == options
    assert isinstance(again.providers, tuple)


def test_a_provider_this_onnxruntime_lacks_is_unavailable_naming_what_it_has(
    models: Models,
) -> None:
    require_runtime("onnxruntime")
    options = RuntimeOptions(providers=("NoSuchExecutionProvider", "CPUExecutionProvider"))
    # Loading never falls back by itself: that is the health gate's decision.
    with pytest.raises(RuntimeUnavailableError, match=r"no NoSuchExecutionProvider; it has .*CPU"):
        load_model(models.onnx_mlp, models.dir, "onnxruntime", options)


@pytest.mark.parametrize("delegate", ["gpu", "libedgetpu.so.1"])
def test_a_delegate_that_is_not_a_library_path_is_refused(models: Models, delegate: str) -> None:
    require_runtime("litert")
    with pytest.raises(RuntimeUnavailableError, match="xnnpack, cpu or the absolute path"):
        load_model(models.tflite_mlp, models.dir, "litert", RuntimeOptions(delegates=(delegate,)))


def test_a_missing_delegate_library_is_unavailable(models: Models, tmp_path: Path) -> None:
    require_runtime("litert")
    options = RuntimeOptions(delegates=(str(tmp_path / "libnone.so"),))
    with pytest.raises(RuntimeUnavailableError, match="cannot load the delegate"):
        load_model(models.tflite_mlp, models.dir, "litert", options)
