"""Golden cases: exact requests from a cases file, a data set or synthesis hints, built into
a bundle and replayed by the agent's health check."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.arrays import write_npz
from agent.bundle.manifest import MAX_GOLDEN_CASES, Manifest, TensorSpec
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, HealthCheckError
from agent.install import check_health
from agent.serve.runtimes import load_model
from sdk.build import BuildMetadata, SigningKey, build_bundle, generate_key
from sdk.build._cases import InputHint, merge_hints, parse_hints, synthesize_cases
from sdk.errors import BuildError
from tests.support.shape_models import STATE_SHAPE, make_onnx_dynamic_image, make_onnx_stateful

META = BuildMetadata(name="vad", version="1", sequence=1)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys") / "release", b"secret")


@pytest.fixture(scope="module")
def stateful(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_stateful(tmp_path_factory.mktemp("m") / "vad.onnx")


def _case(i: int, sr: int = 16000) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(i)
    return {
        f"{i}/x": rng.standard_normal((1, 16)).astype(np.float32),
        f"{i}/state": rng.standard_normal(STATE_SHAPE).astype(np.float32),
        f"{i}/sr": np.array(sr, np.int64),
    }


def _build(model: Path, out: Path, key: SigningKey, **kwargs: object) -> Manifest:
    result = build_bundle(model, out, metadata=META, keys=[key], **kwargs)  # type: ignore[arg-type]
    with result.path.open("rb") as f:
        verify_bundle(
            f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=out.parent / "x"
        )
    return result.manifest


def test_a_cases_file_becomes_requests_the_agent_replays_as_given(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    np.savez(tmp_path / "cases.npz", **_case(0), **_case(1, sr=8000), **_case(2))
    manifest = _build(stateful, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "cases.npz")
    cases = manifest.health.cases
    assert cases is not None
    assert cases.count == 3
    stored = np.load(tmp_path / "x" / cases.inputs)
    assert stored["1/state"].shape == STATE_SHAPE
    assert stored["1/sr"].shape == ()
    assert int(stored["1/sr"]) == 8000
    assert set(cases.tolerances) == {"prob", "state_out"}
    with load_model(manifest, tmp_path / "x", "onnxruntime") as model:
        report = check_health(model, manifest, tmp_path / "x", runs=3)
    assert report.runs == 3


def test_a_data_set_gives_one_sample_per_case_and_counts_the_request(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_onnx_dynamic_image(tmp_path / "img.onnx")
    data = np.random.default_rng(0).standard_normal((6, 3, 5, 7)).astype(np.float32)
    np.save(tmp_path / "data.npy", data)
    manifest = _build(
        model, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "data.npy", golden_count=3
    )
    assert manifest.health.cases is not None
    stored = np.load(tmp_path / "x" / manifest.health.cases.inputs)
    assert [stored[f"{i}/x"].shape for i in range(3)] == [(1, 3, 5, 7)] * 3
    assert manifest.model.request_elements == 3 * 5 * 7


def test_synthesis_hints_give_a_scalar_sample_rate_and_no_random_integers(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    meta = BuildMetadata(
        name="vad", version="1", sequence=1, input_hints={"sr": InputHint(value=16000)}
    )
    result = build_bundle(stateful, tmp_path / "b.edgeship", metadata=meta, keys=[key])
    assert result.manifest.health.cases is not None
    assert result.manifest.health.cases.count == 8


def test_an_integer_input_without_a_hint_is_refused_saying_what_to_pass(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    with pytest.raises(ConfigError, match=r"'sr' is int64.*--input-value"):
        build_bundle(stateful, tmp_path / "b.edgeship", metadata=META, keys=[key])
    assert not (tmp_path / "b.edgeship").exists()


def test_dynamic_spatial_dims_without_a_shape_hint_are_refused() -> None:
    spec = TensorSpec("x", "float32", (None, 3, None, None))
    with pytest.raises(ConfigError, match=r"dynamic dimension\(s\) \[2, 3\].*--input-shape"):
        synthesize_cases([spec], 1, {})
    (case,) = synthesize_cases([spec], 1, {"x": InputHint(shape=(1, 3, 32, 48))})
    assert case["x"].shape == (1, 3, 32, 48)


def test_a_case_the_model_rejects_is_a_one_line_build_error_naming_it(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    bad = _case(1)
    bad["1/x"] = np.zeros((2, 16), np.float32)  # the batch is fixed at 1
    np.savez(tmp_path / "cases.npz", **_case(0), **bad)
    with pytest.raises(BuildError, match=r"golden case 1 \(x \[2, 16\]") as err:
        _build(stateful, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "cases.npz")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({**_case(0), **_case(2)}, "without gaps"),
        ({k: v for k, v in _case(0).items() if k != "0/sr"}, r"has inputs \['state', 'x'\]"),
    ],
)
def test_a_malformed_cases_file_is_refused(
    tmp_path: Path, key: SigningKey, stateful: Path, arrays: dict[str, np.ndarray], match: str
) -> None:
    np.savez(tmp_path / "cases.npz", **arrays)
    with pytest.raises(ConfigError, match=match):
        _build(stateful, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "cases.npz")


def test_cli_hints_override_the_metadata_tables_field_by_field() -> None:
    table = parse_hints(table={"x": {"shape": [1, 3, 8, 8], "range": [0, 1]}})
    cli = parse_hints(shapes=["x=1,3,16,16"], values=["sr=16000"])
    merged = merge_hints(table, cli)
    assert merged["x"] == InputHint(shape=(1, 3, 16, 16), low=0.0, high=1.0)
    assert merged["sr"] == InputHint(value=16000.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shapes": ["x"]}, "not NAME=VALUE"),
        ({"ranges": ["x=2,1"]}, "LOW <= HIGH"),
        ({"table": {"x": {"shap": [1]}}}, r"unknown key\(s\) \['shap'\]"),
    ],
)
def test_malformed_hints_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_hints(**kwargs)  # type: ignore[arg-type]


def test_the_gate_names_the_golden_case_that_deviates(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    np.savez(tmp_path / "cases.npz", **_case(0), **_case(1), **_case(2))
    manifest = _build(stateful, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "cases.npz")
    assert manifest.health.cases is not None
    path = tmp_path / "x" / manifest.health.cases.expected
    expected = dict(np.load(path))
    expected["1/prob"] = expected["1/prob"] + np.float32(0.2)
    path.chmod(0o644)
    write_npz(path, expected)
    with (
        load_model(manifest, tmp_path / "x", "onnxruntime") as model,
        pytest.raises(HealthCheckError, match=r"^golden case 1: .*'prob' deviates by 0\.2"),
    ):
        check_health(model, manifest, tmp_path / "x", runs=1)


def test_more_golden_cases_than_a_manifest_takes_are_refused_before_building(
    tmp_path: Path, key: SigningKey, stateful: Path
) -> None:
    cases: dict[str, np.ndarray] = {}
    for i in range(MAX_GOLDEN_CASES + 1):
        cases |= {f"{i}/x": np.zeros((1, 16), np.float32)}
    np.savez(tmp_path / "cases.npz", **cases)
    with pytest.raises(ConfigError, match=f"at most {MAX_GOLDEN_CASES}"):
        _build(stateful, tmp_path / "b.edgeship", key, golden_inputs=tmp_path / "cases.npz")
    with pytest.raises(ConfigError, match="--golden-count must be 1 to"):
        _build(stateful, tmp_path / "b.edgeship", key, golden_count=MAX_GOLDEN_CASES + 1)
    assert not (tmp_path / "b.edgeship").exists()
