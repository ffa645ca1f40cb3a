"""The health gate on the provider that will serve, and the fallback along the device's list.

Real LiteRT (XNNPACK on and off, and an external delegate that is not there), real
onnxruntime (asking for an execution provider this onnxruntime does not have) and the
real gate child. XNNPACK's float kernels round differently from TFLite's builtin ones
(by about 1e-7 on this MLP), so a bundle whose golden outputs come from the builtin
kernels, with a zero tolerance, makes XNNPACK miss the tolerance for real.
The OpenVINO execution provider, which needs its own venv, is tested in
test_openvino_providers.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from agent.bundle.manifest import Tolerance
from agent.config import parse_config
from agent.daemon import Agent
from agent.errors import ConfigError, HealthCheckError
from agent.install import Updater, UpdaterConfig
from agent.serve._slot import ModelSlot
from agent.serve.runtimes import RuntimeOptions, load_model_file
from tests.agent.serve.runtimes.conftest import mlp_spec, require_runtime
from tests.support.lifecycle import POLICY
from tests.support.models import make_onnx_mlp, make_tflite_mlp
from tests.support.provider_bundles import golden_batch, make_provider_bundle

pytestmark = pytest.mark.integration

N_IN = 64
EXACT = Tolerance(atol=0.0, rtol=0.0)
LOOSE = Tolerance(atol=1e-5, rtol=1e-4)


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, kind: str, fields: Mapping[str, Any], /) -> None:
        self.seen.append((kind, dict(fields)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.seen if k == kind]


def _answer(model_file: Path, delegates: tuple[str, ...]) -> npt.NDArray[Any]:
    options = RuntimeOptions(delegates=delegates)
    with load_model_file(mlp_spec("tflite", model_file.name), model_file, "litert", options) as m:
        return m.predict(golden_batch(N_IN))["probs"]


@pytest.fixture(scope="module")
def tflite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_runtime("litert")
    d = tmp_path_factory.mktemp("tflite")
    model = make_tflite_mlp(d / "mlp.tflite")
    builtin = _answer(model, ("cpu",))
    # The premise of the tolerance test: without it, the fallback below would prove nothing.
    assert np.abs(_answer(model, ("xnnpack",)) - builtin).max() > 0
    return {
        "exact": make_provider_bundle(
            d / "exact.bundle", model, expected=builtin, tolerance=EXACT, n_in=N_IN
        ),
        "loose": make_provider_bundle(
            d / "loose.bundle", model, expected=builtin, tolerance=LOOSE, n_in=N_IN
        ),
        "wrong": make_provider_bundle(
            d / "wrong.bundle",
            model,
            expected=builtin + 0.5,
            tolerance=LOOSE,
            n_in=N_IN,
            sequence=2,
        ),
    }


def _updater(state_dir: Path, options: RuntimeOptions, **kw: Any) -> Updater:
    return Updater(state_dir, POLICY, config=UpdaterConfig(runtime=options), **kw)


def _serving_provider(slot: ModelSlot) -> str:
    """The provider of the session that answers requests, read from the adapter itself."""
    entry: Any = slot._entry  # private: the test checks what really serves
    return str(entry.model._backend.provider)


def test_xnnpack_within_tolerance_serves_and_is_reported(
    tflite: dict[str, Path], tmp_path: Path
) -> None:
    events, slot = Events(), ModelSlot()
    u = _updater(tmp_path, RuntimeOptions(delegates=("xnnpack", "cpu")), slot=slot, events=events)
    result = u.install(str(tflite["loose"]))
    assert events.of("provider-fallback") == []
    assert events.of("health-check-passed")[0]["provider"] == "xnnpack"
    assert _serving_provider(slot) == "xnnpack"
    assert u.models.serving(result.digest) == {
        "digest": result.digest,
        "runtime": "litert",
        "provider": "xnnpack",
    }


def test_xnnpack_missing_the_tolerance_falls_back_to_builtin_kernels(
    tflite: dict[str, Path], tmp_path: Path
) -> None:
    events, slot = Events(), ModelSlot()
    u = _updater(tmp_path, RuntimeOptions(delegates=("xnnpack",)), slot=slot, events=events)
    result = u.install(str(tflite["exact"]))
    (fallback,) = events.of("provider-fallback")
    assert fallback["digest"] == result.digest
    assert (fallback["runtime"], fallback["provider"], fallback["next"]) == (
        "litert",
        "xnnpack",
        "cpu",  # appended: the chain always ends on the CPU path
    )
    assert "golden outputs do not match" in fallback["reason"]
    assert events.of("health-check-passed")[0]["provider"] == "cpu"
    assert _serving_provider(slot) == "cpu"

    # A restart serves it on the provider that passed, without gating it again...
    u.commit()
    events2, slot2 = Events(), ModelSlot()
    u2 = _updater(tmp_path, RuntimeOptions(delegates=("xnnpack",)), slot=slot2, events=events2)
    u2.start_serving()
    assert _serving_provider(slot2) == "cpu"
    assert events2.seen == []
    # ...and without the record, gates it again rather than trust the first preference.
    (tmp_path / "providers.json").unlink()
    events3, slot3 = Events(), ModelSlot()
    u3 = _updater(tmp_path, RuntimeOptions(delegates=("xnnpack",)), slot=slot3, events=events3)
    u3.start_serving()
    assert _serving_provider(slot3) == "cpu"
    assert [f["provider"] for f in events3.of("provider-fallback")] == ["xnnpack"]


def test_a_delegate_that_does_not_load_falls_back_with_an_event(
    tflite: dict[str, Path], tmp_path: Path
) -> None:
    events, slot = Events(), ModelSlot()
    options = RuntimeOptions(delegates=(str(tmp_path / "libmissing_delegate.so"), "xnnpack"))
    _updater(tmp_path, options, slot=slot, events=events).install(str(tflite["loose"]))
    (fallback,) = events.of("provider-fallback")
    assert fallback["next"] == "xnnpack"
    assert "cannot load the delegate" in fallback["reason"]
    assert _serving_provider(slot) == "xnnpack"


def test_failing_on_every_provider_fails_the_install_and_current_keeps_serving(
    tflite: dict[str, Path], tmp_path: Path
) -> None:
    events, slot = Events(), ModelSlot()
    u = _updater(tmp_path, RuntimeOptions(delegates=("xnnpack", "cpu")), slot=slot, events=events)
    current = u.install(str(tflite["loose"])).digest
    u.commit()
    with pytest.raises(HealthCheckError, match=r"on cpu, the last provider: golden outputs"):
        u.install(str(tflite["wrong"]))
    assert [f["provider"] for f in events.of("provider-fallback")] == ["xnnpack"]
    assert slot.digest == current
    assert _serving_provider(slot) == "xnnpack"


def test_an_execution_provider_onnxruntime_lacks_falls_back_and_the_agent_reports_it(
    tmp_path: Path,
) -> None:
    require_runtime("onnxruntime")
    assert "OpenVINOExecutionProvider" not in ort.get_available_providers()  # the main venv
    model = make_onnx_mlp(tmp_path / "mlp.onnx", n_in=N_IN)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = session.run(["probs"], golden_batch(N_IN))[0]
    bundle = make_provider_bundle(
        tmp_path / "b.bundle", model, expected=expected, tolerance=LOOSE, n_in=N_IN
    )
    (tmp_path / "policy.toml").write_bytes(POLICY.to_toml())
    config = parse_config(
        f"""
        device_id = "d1"
        state_dir = "{tmp_path / "state"}"
        trust_policy = "{tmp_path / "policy.toml"}"
        [runtime]
        providers = ["OpenVINOExecutionProvider"]
        [runtime.provider_options.OpenVINOExecutionProvider]
        device_type = "CPU"
        """
    )
    agent = Agent(config)
    agent.start()
    try:
        agent.updater.install(str(bundle))
        serving = agent.status()["serving"]
        model_info = agent.metrics.snapshot().to_json()["model"]
        answer = agent.predict(golden_batch(N_IN))["probs"]
    finally:
        agent.stop()
    assert serving["provider"] == "CPUExecutionProvider"
    assert (model_info["runtime"], model_info["provider"]) == (
        "onnxruntime",
        "CPUExecutionProvider",
    )
    np.testing.assert_allclose(answer, expected, atol=1e-6)


@pytest.mark.parametrize(
    ("runtime_table", "message"),
    [
        ('providers = ["OpenVINO"]', "not an onnxruntime execution provider name"),
        ('delegates = ["gpu"]', "is not xnnpack, cpu or the absolute path"),
        ("providers = 3", "runtime.providers"),
        (
            '[runtime.provider_options.CUDAExecutionProvider]\ndevice_id = "0"',
            "not in runtime.providers or runtime.delegates",
        ),
        (
            'providers = ["CUDAExecutionProvider"]\n'
            "[runtime.provider_options.CUDAExecutionProvider]\ndevice_id = [0]",
            "must be a string, number or boolean",
        ),
    ],
)
def test_bad_provider_settings_are_refused_naming_the_key(runtime_table: str, message: str) -> None:
    text = f'device_id = "d"\nstate_dir = "s"\ntrust_policy = "p"\n[runtime]\n{runtime_table}\n'
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_provider_settings_are_read_in_order_with_options_as_text() -> None:
    config = parse_config(
        'device_id = "d"\nstate_dir = "s"\ntrust_policy = "p"\n[runtime]\n'
        'providers = ["OpenVINOExecutionProvider", "CPUExecutionProvider"]\n'
        'delegates = ["cpu"]\n'
        "[runtime.provider_options.OpenVINOExecutionProvider]\n"
        'device_type = "CPU"\nnum_of_threads = 2\nenable_opencl_throttling = true\n'
    )
    assert config.runtime.providers == ("OpenVINOExecutionProvider", "CPUExecutionProvider")
    assert config.runtime.delegates == ("cpu",)
    assert config.runtime.provider_options == {
        "OpenVINOExecutionProvider": {
            "device_type": "CPU",
            "enable_opencl_throttling": "true",
            "num_of_threads": "2",
        }
    }
