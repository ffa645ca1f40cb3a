"""The runtime adapters, each on a real runtime: answers, batching, quantized I/O, threads,
load-time checks."""

from __future__ import annotations

import subprocess
import sys
import threading
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import Manifest, ModelSpec, QuantParams, TensorSpec
from agent.errors import (
    HealthCheckError,
    InferenceError,
    InputValidationError,
    RuntimeUnavailableError,
)
from agent.serve.runtimes import (
    SMALL_MODEL_ELEMENTS,
    Model,
    RuntimeOptions,
    installed_runtimes,
    load_model,
    load_model_file,
)
from agent.serve.runtimes._base import threads_for
from agent.serve.runtimes._onnxruntime import fast_run
from tests.agent.serve.runtimes.conftest import (
    CONV_SIZE,
    Models,
    batch,
    mlp_spec,
    reference,
    require_runtime,
)
from tests.support.models import make_tflite_mlp

RUNTIME_OF = {"onnx": "onnxruntime", "tflite": "litert"}
pytestmark = pytest.mark.integration


def load(manifest: Manifest, models: Models, **kw: object) -> Model:
    runtime = RUNTIME_OF[manifest.model.format]
    require_runtime(runtime)
    return load_model(manifest, models.dir, runtime, **kw)  # type: ignore[arg-type]


# --- discovery -----------------------------------------------------------------------


def test_installed_runtimes_reports_versions_from_package_metadata() -> None:
    found = installed_runtimes()
    assert found["onnxruntime"] == metadata.version("onnxruntime")
    assert found["litert"] == metadata.version("ai-edge-litert")
    assert set(found) <= {"onnxruntime", "litert", "tflite-runtime"}


def test_installed_runtimes_imports_no_runtime() -> None:
    code = (
        "import sys, agent.serve.runtimes as r; r.installed_runtimes();"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('onnxruntime', 'ai_edge_litert', 'tflite_runtime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- answers -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp"])
def test_float_mlp_matches_numpy_reference_at_any_batch_size(models: Models, which: str) -> None:
    with load(getattr(models, which), models) as model:
        for n in (5, 1, 7, 5):  # TFLite resizes and reallocates on every change
            x = batch(n, seed=n)
            out = model.predict({"x": x})
            assert list(out) == ["probs"]
            assert out["probs"].dtype == np.float32
            np.testing.assert_allclose(out["probs"], reference(x), atol=1e-5)


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp"])
def test_model_loads_from_path_when_not_from_memory(models: Models, which: str) -> None:
    x = batch(3)
    with load(getattr(models, which), models, options=RuntimeOptions(load_from_memory=False)) as m:
        np.testing.assert_allclose(m.predict({"x": x})["probs"], reference(x), atol=1e-5)


def test_conv_model_returns_a_distribution_per_image(models: Models) -> None:
    x = np.random.default_rng(0).standard_normal((2, 3, CONV_SIZE, CONV_SIZE)).astype(np.float32)
    with load(models.onnx_conv, models) as model:
        probs = model.predict({"x": x})["probs"]
    assert probs.shape == (2, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    ("which", "out_q"),
    [
        ("onnx_int8", QuantParams(1 / 256, -128)),
        ("tflite_int8", QuantParams(1 / 256, -128)),
        ("tflite_uint8", QuantParams(1 / 256, 0)),
    ],
)
def test_quantized_io_takes_and_returns_float32(
    models: Models, which: str, out_q: QuantParams
) -> None:
    x = batch(6)
    with load(getattr(models, which), models) as model:
        probs = model.predict({"x": x})["probs"]
    assert probs.dtype == np.float32
    # The model sees x rounded to the input grid (scale 0.05) and answers on the output
    # grid: the answer is the reference on the rounded input, within half an output step.
    x_seen = np.clip(np.rint(x / 0.05), -128, 127) * 0.05
    np.testing.assert_allclose(probs, reference(x_seen), atol=out_q.scale / 2 + 1e-6)
    # Dequantized values lie on the output grid.
    steps = probs / out_q.scale + out_q.zero_point
    np.testing.assert_allclose(steps, np.rint(steps), atol=1e-3)


def test_quantized_input_saturates_beyond_the_integer_range(models: Models) -> None:
    x = np.full((1, 64), 1000.0, np.float32)  # 20000 steps: clipped to 127
    with load(models.tflite_int8, models) as model:
        probs = model.predict({"x": x})["probs"]
    np.testing.assert_allclose(
        probs, reference(np.full((1, 64), 127 * 0.05, np.float32)), atol=1 / 512 + 1e-6
    )


# --- threads -------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp", "tflite_int8"])
def test_concurrent_predictions_each_get_their_own_answer(models: Models, which: str) -> None:
    manifest = getattr(models, which)
    quantized = manifest.model.inputs[0].quantization is not None
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed: int, model: Model) -> None:
        try:
            start.wait()
            for i in range(40):
                x = batch(1 + (seed + i) % 4, seed=seed * 100 + i)  # mixed batch sizes
                got = model.predict({"x": x})["probs"]
                if quantized:
                    x_seen = np.clip(np.rint(x / 0.05), -128, 127) * 0.05
                    np.testing.assert_allclose(got, reference(x_seen), atol=1 / 512 + 1e-6)
                else:
                    np.testing.assert_allclose(got, reference(x), atol=1e-5)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread via the list
            errors.append(exc)

    with load(manifest, models) as model:
        threads = [threading.Thread(target=worker, args=(s, model)) for s in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []


def test_closed_model_refuses_predictions(models: Models) -> None:
    model = load(models.tflite_mlp, models)
    model.close()
    with pytest.raises(InferenceError, match="closed"):
        model.predict({"x": batch(1)})


# --- choosing and loading ------------------------------------------------------------


def test_unknown_runtime_is_unavailable(models: Models) -> None:
    with pytest.raises(RuntimeUnavailableError, match="unknown runtime 'tvm'"):
        load_model(models.onnx_mlp, models.dir, "tvm")


def test_runtime_for_another_format_is_unavailable(models: Models) -> None:
    with pytest.raises(RuntimeUnavailableError, match="litert cannot run a onnx model"):
        load_model(models.onnx_mlp, models.dir, "litert")


def test_missing_runtime_names_the_extra_to_install(models: Models) -> None:
    if "tflite-runtime" in installed_runtimes():
        pytest.skip("tflite-runtime is installed here; the legacy venv test covers it")
    with pytest.raises(RuntimeUnavailableError, match=r"edgeship\[tflite\]"):
        load_model(models.tflite_mlp, models.dir, "tflite-runtime")


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp"])
@pytest.mark.parametrize("from_memory", [True, False])
def test_missing_model_file_fails_the_health_check(
    models: Models, which: str, from_memory: bool
) -> None:
    manifest = getattr(models, which)
    gone = replace(manifest, model=replace(manifest.model, file="model/absent.bin"))
    with pytest.raises(HealthCheckError, match="absent"):
        load(gone, models, options=RuntimeOptions(load_from_memory=from_memory))


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp"])
def test_corrupt_model_file_fails_the_health_check(
    models: Models, which: str, tmp_path: Path
) -> None:
    manifest = getattr(models, which)
    data = (models.dir / manifest.model.file).read_bytes()
    (tmp_path / "model").mkdir()
    (tmp_path / manifest.model.file).write_bytes(data[: len(data) // 3])
    require_runtime(RUNTIME_OF[manifest.model.format])
    with pytest.raises(HealthCheckError, match="cannot load"):
        load_model(manifest, tmp_path, RUNTIME_OF[manifest.model.format])


def _retype(spec: ModelSpec, **changes: object) -> ModelSpec:
    return replace(spec, inputs=(replace(spec.inputs[0], **changes),))


MISMATCHES = [
    # (model, what the manifest gets wrong, expected message)
    ("onnx_mlp", {"name": "pixels"}, "declares inputs"),
    ("tflite_mlp", {"name": "pixels"}, "declares inputs"),
    ("onnx_mlp", {"dtype": "float64"}, "float32 in the model but float64"),
    ("tflite_mlp", {"dtype": "int8"}, "float32 in the model but int8"),
    ("onnx_mlp", {"shape": (None, 63)}, "shape"),
    ("tflite_mlp", {"shape": (None, 64, 1)}, "shape"),
    ("onnx_conv", {"shape": (None, None, CONV_SIZE, CONV_SIZE)}, "shape"),
    ("tflite_int8", {"quantization": QuantParams(0.1, 0)}, "quantized with scale"),
]


@pytest.mark.parametrize(("which", "changes", "message"), MISMATCHES)
def test_manifest_that_misdescribes_the_model_fails_the_health_check(
    models: Models, which: str, changes: dict[str, object], message: str
) -> None:
    manifest = getattr(models, which)
    wrong = replace(manifest, model=_retype(manifest.model, **changes))
    with pytest.raises(HealthCheckError, match=message):
        load(wrong, models)


def test_manifest_may_fix_a_dimension_the_model_leaves_dynamic(models: Models) -> None:
    fixed = replace(models.onnx_mlp, model=_retype(models.onnx_mlp.model, shape=(2, 64)))
    with load(fixed, models) as model:
        assert model.predict({"x": batch(2)})["probs"].shape == (2, 10)


def test_tflite_manifest_may_use_signature_names(models: Models, tmp_path: Path) -> None:
    # TensorFlow's converter names tensors "serving_default_x:0"; the signature keeps "x".
    make_tflite_mlp(tmp_path / "model/mlp.tflite", tensor_prefix="serving_default_")
    require_runtime("litert")
    x = batch(2)
    with load_model(models.tflite_mlp, tmp_path, "litert") as model:
        np.testing.assert_allclose(model.predict({"x": x})["probs"], reference(x), atol=1e-5)


def test_manifest_naming_an_input_twice_fails_the_health_check(models: Models) -> None:
    spec = models.tflite_mlp.model
    doubled = replace(spec, inputs=(*spec.inputs, TensorSpec("x", "float32", (None, 64))))
    with pytest.raises(HealthCheckError, match="name twice"):
        load(replace(models.tflite_mlp, model=doubled), models)


# --- a model file without a manifest (the SDK measuring a candidate) ------------------


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_int8"])
def test_model_file_loads_from_its_spec_and_answers_as_from_its_bundle(
    models: Models, which: str
) -> None:
    manifest = getattr(models, which)
    runtime = RUNTIME_OF[manifest.model.format]
    require_runtime(runtime)
    x = batch(5)
    path = models.dir / manifest.model.file
    with load_model_file(manifest.model, path, runtime) as bare, load(manifest, models) as bundled:
        np.testing.assert_array_equal(
            bare.predict({"x": x})["probs"], bundled.predict({"x": x})["probs"]
        )
        with pytest.raises(InputValidationError, match="NaN"):
            bare.predict({"x": np.full((1, 64), np.nan, np.float32)})


@pytest.mark.parametrize("from_memory", [True, False])
def test_missing_model_file_without_a_manifest_fails_to_load(
    models: Models, tmp_path: Path, from_memory: bool
) -> None:
    options = RuntimeOptions(load_from_memory=from_memory)
    with pytest.raises(HealthCheckError, match="absent"):
        load_model_file(models.onnx_mlp.model, tmp_path / "absent.onnx", "onnxruntime", options)


def test_model_file_in_a_runtime_for_another_format_is_unavailable(models: Models) -> None:
    path = models.dir / models.onnx_mlp.model.file
    with pytest.raises(RuntimeUnavailableError, match="litert cannot run a onnx model"):
        load_model_file(models.onnx_mlp.model, path, "litert")


# --- options -------------------------------------------------------------------------


def test_reference_kernels_turn_off_onnxruntime_graph_optimizations(models: Models) -> None:
    import onnxruntime as ort  # noqa: PLC0415 - the test inspects the session's options

    for reference_kernels, level in (
        (False, ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
        (True, ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
    ):
        options = RuntimeOptions(reference_kernels=reference_kernels)
        with load(models.onnx_int8, models, options=options) as model:
            # The session is the adapter's own: only it can say how it was configured.
            session = model._backend._session  # type: ignore[attr-defined]
            assert session.get_session_options().graph_optimization_level == level


def test_reference_kernels_run_tflite_without_the_xnnpack_delegate(models: Models) -> None:
    for reference_kernels, delegated in ((False, True), (True, False)):
        options = RuntimeOptions(reference_kernels=reference_kernels)
        with load(models.tflite_mlp, models, options=options) as model:
            # XNNPACK, when applied, shows as one DELEGATE node in the execution plan.
            interp = model._backend._interp  # type: ignore[attr-defined]
            ops = [d["op_name"] for d in interp._get_ops_details()]
            assert ("DELEGATE" in ops) == delegated


@pytest.mark.parametrize("which", ["onnx_mlp", "tflite_mlp", "onnx_int8", "tflite_int8"])
def test_reference_kernels_compute_the_same_answers(models: Models, which: str) -> None:
    manifest = getattr(models, which)
    x = batch(6)
    with (
        load(manifest, models) as fast,
        load(manifest, models, options=RuntimeOptions(reference_kernels=True)) as reference_model,
    ):
        got, want = reference_model.predict({"x": x}), fast.predict({"x": x})
    step = manifest.model.outputs[0].quantization
    np.testing.assert_allclose(got["probs"], want["probs"], atol=step.scale if step else 1e-5)


def test_threads_default_to_one_for_small_models_only() -> None:
    small = mlp_spec("onnx", "m.onnx")
    big = ModelSpec(
        format="onnx",
        file="c.onnx",
        inputs=(TensorSpec("x", "float32", (None, 3, 224, 224)),),
        outputs=(TensorSpec("probs", "float32", (None, 10)),),
    )
    assert 64 <= SMALL_MODEL_ELEMENTS < 3 * 224 * 224
    assert threads_for(small, RuntimeOptions()) == 1
    assert threads_for(big, RuntimeOptions()) is None
    assert threads_for(small, RuntimeOptions(threads=3)) == 3


def test_dynamic_spatial_dims_are_sized_by_a_real_request_not_counted_as_one() -> None:
    dynamic = ModelSpec(
        format="onnx",
        file="det.onnx",
        inputs=(TensorSpec("x", "float32", (None, 3, None, None)),),
        outputs=(TensorSpec("y", "float32", (None, 1, None, None)),),
    )
    assert threads_for(dynamic, RuntimeOptions()) is None  # unknown: the runtime's default
    sized = replace(dynamic, request_elements=3 * 640 * 640)
    assert threads_for(sized, RuntimeOptions()) is None
    assert threads_for(replace(dynamic, request_elements=3 * 32 * 32), RuntimeOptions()) == 1


@pytest.mark.parametrize("field", ["threads", "inter_op_threads"])
def test_thread_counts_below_one_are_refused(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RuntimeOptions(**{field: 0})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [
        RuntimeOptions(threads=2, allow_spinning=True),
        RuntimeOptions(inter_op_threads=2, cpu_mem_arena=False),
    ],
)
def test_onnxruntime_options_still_give_the_same_answer(
    models: Models, options: RuntimeOptions
) -> None:
    x = batch(4)
    with load(models.onnx_mlp, models, options=options) as model:
        np.testing.assert_allclose(model.predict({"x": x})["probs"], reference(x), atol=1e-5)


def test_fast_run_falls_back_to_the_public_run_without_a_compiled_session() -> None:
    calls = []

    class PublicOnly:
        def run(self, names: list[str], feed: dict[str, object]) -> list[str]:
            calls.append((names, feed))
            return ["y"]

    run = fast_run(PublicOnly(), ["probs"], run_options=None)
    assert run({"x": 1}) == ["y"]
    assert calls == [(["probs"], {"x": 1})]
