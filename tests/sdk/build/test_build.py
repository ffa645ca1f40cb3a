"""Building bundles from real models with the real runtimes."""

from __future__ import annotations

import io
import stat
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import RuntimeRequirement
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, KeyFileError
from agent.install import check_health
from agent.serve.runtimes import load_model
from sdk.build import (
    BuildMetadata,
    EvaluationReport,
    Gates,
    QuantizeOptions,
    SigningKey,
    build_bundle,
    generate_key,
    load_dataset,
    load_metadata,
    load_signing_key,
    parse_target,
)
from sdk.errors import GateError
from tests.support.models import make_onnx_mlp, make_tflite_mlp

META = BuildMetadata(name="digits", version="1.0.0", sequence=1)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys") / "release", b"secret")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_mlp(tmp_path_factory.mktemp("m") / "mlp.onnx")


def _verify(path: Path, key: SigningKey, tmp: Path) -> object:
    with path.open("rb") as f:
        return verify_bundle(
            f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=tmp / "x"
        )


def _run_onnx(model: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


def test_keygen_writes_encrypted_private_key_with_mode_0600(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", b"pw", "ecdsa-p256")
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o600
    assert b"ENCRYPTED" in (tmp_path / "k").read_bytes()
    assert (tmp_path / "k.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert load_signing_key(tmp_path / "k", b"pw").public.keytype == "ecdsa-p256"


def test_load_signing_key_with_wrong_passphrase_raises_key_file_error(tmp_path: Path) -> None:
    generate_key(tmp_path / "k", b"pw")
    with pytest.raises(KeyFileError, match="passphrase"):
        load_signing_key(tmp_path / "k", b"nope")


def test_keygen_refuses_empty_passphrase_and_existing_files(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError):
        generate_key(tmp_path / "k", b"")
    generate_key(tmp_path / "k", b"pw")
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key(tmp_path / "k", b"pw")


def test_onnx_bundle_verifies_and_expected_outputs_match_onnxruntime(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    verified = _verify(result.path, key, tmp_path)
    manifest = result.manifest
    assert verified.digest == result.digest  # type: ignore[attr-defined]
    assert manifest.model.format == "onnx"
    assert manifest.model.inputs[0].shape == (None, 64)
    golden = np.load(tmp_path / "x" / manifest.health.golden_inputs)
    expected = np.load(tmp_path / "x" / manifest.health.expected_outputs)
    np.testing.assert_allclose(
        expected["probs"], _run_onnx(onnx_model, golden["x"]), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize(("n_out", "scores"), [(10, "probs"), (1, None)])
def test_the_manifest_names_the_class_scores_output_if_the_model_has_one(
    tmp_path: Path, key: SigningKey, n_out: int, scores: str | None
) -> None:
    model = make_onnx_mlp(tmp_path / "mlp.onnx", n_out=n_out)
    result = build_bundle(model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    assert result.manifest.model.scores_output == scores
    assert result.manifest.to_json()["model"]["scores_output"] == scores  # null when none


def test_tflite_bundle_verifies_with_litert_outputs(tmp_path: Path, key: SigningKey) -> None:
    model = make_tflite_mlp(tmp_path / "mlp.tflite")
    result = build_bundle(model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    _verify(result.path, key, tmp_path)
    assert result.manifest.model.format == "tflite"
    assert [r.name for r in result.manifest.compatibility.runtimes] == ["litert", "tflite-runtime"]
    expected = np.load(tmp_path / "x" / result.manifest.health.expected_outputs)
    out = expected[result.manifest.model.outputs[0].name]
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)  # softmax rows


def test_same_inputs_key_and_source_date_epoch_give_identical_bytes(
    tmp_path: Path, key: SigningKey, onnx_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1767225600")
    a = build_bundle(onnx_model, tmp_path / "a.edgeship", metadata=META, keys=[key])
    b = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.manifest.created == datetime(2026, 1, 1, tzinfo=UTC)


def test_golden_files_are_deflated_and_pass_the_agents_health_check(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    _verify(result.path, key, tmp_path)
    manifest = result.manifest
    for member in (manifest.health.golden_inputs, manifest.health.expected_outputs):
        with zipfile.ZipFile(tmp_path / "x" / member) as zf:
            assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
    with load_model(manifest, tmp_path / "x", "onnxruntime") as model:
        report = check_health(model, manifest, tmp_path / "x", runs=3)
    assert report.max_abs_deviation <= manifest.health.tolerance.atol


def test_golden_inputs_are_picked_evenly_from_a_given_file(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    data = np.arange(100 * 64, dtype=np.float32).reshape(100, 64) / 6400
    np.save(tmp_path / "inputs.npy", data)
    result = build_bundle(
        onnx_model,
        tmp_path / "b.edgeship",
        metadata=META,
        keys=[key],
        golden_inputs=tmp_path / "inputs.npy",
        golden_count=5,
    )
    _verify(result.path, key, tmp_path)
    cases = result.manifest.health.cases
    assert cases is not None
    assert cases.count == 5
    golden = np.load(tmp_path / "x" / cases.inputs)
    # One request per case, each a batch of one sample.
    picked = np.concatenate([golden[f"{i}/x"] for i in range(5)])
    assert all(golden[f"{i}/x"].shape == (1, 64) for i in range(5))
    np.testing.assert_array_equal(picked, data[[0, 25, 50, 74, 99]])


def test_golden_inputs_missing_a_model_input_is_a_config_error(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    np.savez(tmp_path / "inputs.npz", other=np.zeros((2, 64), np.float32))
    with pytest.raises(ConfigError, match="model expects"):
        build_bundle(
            onnx_model,
            tmp_path / "b.edgeship",
            metadata=META,
            keys=[key],
            golden_inputs=tmp_path / "inputs.npz",
        )
    assert not (tmp_path / "b.edgeship").exists()


def test_target_that_cannot_run_the_format_is_refused(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    with pytest.raises(ConfigError, match="cannot run"):
        build_bundle(
            onnx_model,
            tmp_path / "b.edgeship",
            metadata=META,
            keys=[key],
            targets=[RuntimeRequirement("litert")],
        )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("onnxruntime", RuntimeRequirement("onnxruntime")),
        ("litert>=2.0", RuntimeRequirement("litert", "2.0")),
        ("tflite-runtime>=2.14,<2.15", RuntimeRequirement("tflite-runtime", "2.14", "2.15")),
    ],
)
def test_parse_target_reads_name_and_version_range(text: str, expected: RuntimeRequirement) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", ["tensorflow", "onnxruntime>=x", ""])
def test_parse_target_refuses_unknown_runtimes(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_target(text)


def test_metadata_toml_is_read_and_cli_options_override_it(tmp_path: Path) -> None:
    (tmp_path / "meta.toml").write_text(
        'name = "digits"\nversion = "1.0.0"\nsequence = 3\n'
        '[model_card]\nintended_use = "demo"\ndata_sources = ["sklearn digits"]\n'
        "[health.probation]\nrequests = 0\n"
    )
    meta = load_metadata(tmp_path / "meta.toml", {"version": "1.1.0", "sequence": None})
    assert (meta.name, meta.version, meta.sequence) == ("digits", "1.1.0", 3)
    assert meta.model_card.data_sources == ("sklearn digits",)
    assert meta.probation.requests == 0


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('version = "1"\nsequence = 1\n', "needs 'name'"),
        ('name = "a"\nversion = "1"\nsequence = "one"\n', "must be int"),
        ('name = "a"\nversion = "1"\nsequence = 1\nsurprise = 2\n', "unknown field"),
        ("name = ", "cannot read"),
    ],
)
def test_bad_metadata_is_a_config_error(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "meta.toml").write_text(toml)
    with pytest.raises(ConfigError, match=message):
        load_metadata(tmp_path / "meta.toml", {})


def test_rebuilding_replaces_the_bundle_and_leaves_no_temporary_file(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    out = tmp_path / "out" / "b.edgeship"
    first = build_bundle(onnx_model, out, metadata=META, keys=[key])
    second = build_bundle(
        onnx_model, out, metadata=BuildMetadata("digits", "1.0.1", 2), keys=[key], overwrite=True
    )
    assert list(out.parent.iterdir()) == [out]
    assert second.digest != first.digest
    assert second.size == out.stat().st_size


def test_bundle_file_is_not_left_behind_when_the_build_fails(
    tmp_path: Path, key: SigningKey
) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ConfigError):
        build_bundle(tmp_path / "broken.onnx", tmp_path / "b.edgeship", metadata=META, keys=[key])
    assert list(tmp_path.iterdir()) == [tmp_path / "broken.onnx"]


def test_build_output_streams_through_verify_from_memory(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    verify_bundle(
        io.BytesIO(result.path.read_bytes()), TrustPolicy.of([key.public]), now=datetime.now(UTC)
    )


# --- quantized builds, gates, derived tolerance ---------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(1)
    np.savez(d / "calibration.npz", x=rng.standard_normal((64, 64)).astype(np.float32))
    np.savez(d / "validation.npz", x=rng.standard_normal((96, 64)).astype(np.float32))
    return d / "calibration.npz", d / "validation.npz"


def test_static_onnx_bundle_records_scheme_calibration_digest_evaluation_and_drift(
    tmp_path: Path, key: SigningKey, onnx_model: Path, data: tuple[Path, Path]
) -> None:
    calibration, validation = data
    result = build_bundle(
        onnx_model,
        tmp_path / "b.edgeship",
        metadata=META,
        keys=[key],
        quantize=QuantizeOptions("static", calibration, validation, max_latency_ratio=None),
    )
    _verify(result.path, key, tmp_path)
    m = result.manifest
    assert m.quantization.scheme == "static"
    assert m.quantization.calibration_sha256 == load_dataset(calibration).sha256
    assert m.evaluation is not None
    assert m.evaluation["fidelity"]["agreement"] > 0.8
    assert m.drift_reference is not None
    assert m.drift_reference.groups == {"x": 64}


def test_static_tflite_bundle_declares_int8_io_and_agent_reproduces_expected_outputs(
    tmp_path: Path, key: SigningKey, data: tuple[Path, Path]
) -> None:
    calibration, validation = data
    model = make_tflite_mlp(tmp_path / "mlp.tflite")
    result = build_bundle(
        model,
        tmp_path / "b.edgeship",
        metadata=META,
        keys=[key],
        quantize=QuantizeOptions("static", calibration, validation, max_latency_ratio=None),
    )
    _verify(result.path, key, tmp_path)
    spec = result.manifest.model
    assert spec.inputs[0].dtype == "int8"
    assert spec.inputs[0].quantization is not None
    assert spec.outputs[0].quantization is not None
    assert spec.scores_output == spec.outputs[0].name  # int8, but callers receive floats
    manifest = result.manifest
    with load_model(manifest, tmp_path / "x", "litert") as agent_model:
        golden = np.load(tmp_path / "x" / manifest.health.golden_inputs)
        expected = np.load(tmp_path / "x" / manifest.health.expected_outputs)
        out = agent_model.predict({k: golden[k] for k in golden.files})
    name = spec.outputs[0].name
    assert np.max(np.abs(out[name] - expected[name])) <= manifest.health.tolerance.atol


def test_float_golden_tolerance_is_a_small_share_of_each_outputs_range(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=META, keys=[key])
    cases = result.manifest.health.cases
    assert cases is not None
    assert result.manifest.evaluation is not None
    how = result.manifest.evaluation["golden"]["outputs"]
    for name, tol in cases.tolerances.items():
        assert 0 < tol.atol <= 1e-3 * how[name]["range"] + 1e-5  # float noise, not a guess


def test_fixed_tolerance_in_metadata_overrides_the_derived_one(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    meta = BuildMetadata(name="digits", version="1", sequence=1, atol=0.01)
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=meta, keys=[key])
    assert result.manifest.health.tolerance.atol == 0.01
    assert result.manifest.health.cases is not None
    assert result.manifest.health.cases.tolerances == {}


def test_missed_gate_writes_no_bundle_and_reports_the_margin(
    tmp_path: Path, key: SigningKey, onnx_model: Path, data: tuple[Path, Path]
) -> None:
    calibration, validation = data
    with pytest.raises(GateError, match="max_size_mb") as err:
        build_bundle(
            onnx_model,
            tmp_path / "b.edgeship",
            metadata=META,
            keys=[key],
            quantize=QuantizeOptions(
                "dynamic", calibration, validation, gates=Gates(max_size_mb=0.000001)
            ),
        )
    report = err.value.report
    assert isinstance(report, EvaluationReport)
    (failed,) = report.failed_gates
    assert failed.margin is not None
    assert failed.margin < 0
    assert not (tmp_path / "b.edgeship").exists()


def test_gates_without_validation_data_are_a_config_error(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    with pytest.raises(ConfigError, match="validation"):
        build_bundle(
            onnx_model,
            tmp_path / "b.edgeship",
            metadata=META,
            keys=[key],
            quantize=QuantizeOptions(gates=Gates(min_agreement=0.99)),
        )


def test_dotted_override_sets_a_key_inside_a_metadata_table(tmp_path: Path) -> None:
    (tmp_path / "meta.toml").write_text(
        'name = "d"\nversion = "1"\nsequence = 1\n[health]\nlatency_budget_p95_ms = 50.0\n'
    )
    meta = load_metadata(tmp_path / "meta.toml", {"health.latency_budget_p95_ms": 0.5})
    assert meta.latency_budget_p95_ms == 0.5
