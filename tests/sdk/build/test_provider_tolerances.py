"""Golden tolerances measured per execution provider: the rule, and real builds.

The build machine's onnxruntime has the CPU execution provider only (OpenVINO needs the
``onnxruntime-openvino`` venv, which has no ``onnx`` for the build to read models with),
so ONNX builds measure ``CPUExecutionProvider``; LiteRT's builtin kernels (``cpu``) are a
second real implementation next to XNNPACK. A provider that computes something else is
played by expected outputs shifted by a known share of their range: real sessions, only
the numbers are chosen.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import GoldenCases, Health, Tolerance
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError
from agent.install import check_health
from agent.serve.runtimes import RuntimeOptions, load_model
from sdk.build import (
    BuildMetadata,
    SigningKey,
    build_bundle,
    derive_golden,
    generate_key,
    load_metadata,
)
from sdk.build._provider_tolerances import MARGIN, measure_providers, provider_tolerance
from sdk.build.golden import MAX_SHARE, Golden
from sdk.cli import main
from sdk.errors import GateError
from tests.support.models import make_onnx_mlp, make_tflite_mlp

CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"


def _meta(*providers: str) -> BuildMetadata:
    return BuildMetadata(name="mlp", version="1", sequence=1, measure_providers=providers)


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys") / "release", b"secret")


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_onnx_mlp(tmp_path_factory.mktemp("m") / "mlp.onnx")


# --- the rule ---------------------------------------------------------------------------

PLAIN = Tolerance(atol=0.002, rtol=0.0001)


@pytest.mark.parametrize(
    ("deviation", "atol"),
    [
        (0.0, 0.002),  # never tighter than every device's tolerance
        (0.0005, 0.002),  # 2 x 0.0005 + 0.001 = 0.002: still the plain one
        (0.003, MARGIN * 0.003 + 0.001),  # beyond the plain tolerance: doubled, plus floor
        (0.04, 0.05),  # within 5% of the range, but the margin is capped there
        (0.05, 0.05),  # exactly the cap: admitted without margin
    ],
)
def test_a_provider_tolerance_doubles_the_deviation_plus_a_floor_within_the_cap(
    deviation: float, atol: float
) -> None:
    got = provider_tolerance(deviation, PLAIN, value_range=1.0, floor=0.001)
    assert got == Tolerance(atol=pytest.approx(atol), rtol=PLAIN.rtol)
    assert got.atol >= deviation


@pytest.mark.parametrize("deviation", [0.0501, 0.5, float("inf"), float("nan")])
def test_a_provider_beyond_5_percent_of_the_range_is_not_admitted(deviation: float) -> None:
    assert provider_tolerance(deviation, PLAIN, value_range=1.0, floor=0.001) is None


def test_a_wide_fixed_tolerance_still_admits_what_it_admits_on_any_provider() -> None:
    fixed = Tolerance(atol=0.2)  # the metadata's, wider than 5% of the range
    assert provider_tolerance(0.1, fixed, value_range=1.0, floor=0.001) == fixed
    assert provider_tolerance(0.3, fixed, value_range=1.0, floor=0.001) is None


# --- measuring for real -----------------------------------------------------------------


def _golden(model: Path) -> tuple[Golden, Health]:
    rng = np.random.default_rng(3)
    cases = [{"x": rng.standard_normal((1, 64)).astype(np.float32)} for _ in range(4)]
    golden = derive_golden(model, cases, runtime="onnxruntime")
    paths = GoldenCases(len(cases), "c/in.npz", "c/out.npz", golden.tolerances)
    return golden, Health("g/in.npz", "g/out.npz", golden.tolerance, cases=paths)


def _shifted(golden: Golden, share: float) -> Golden:
    """``golden`` with its expected outputs moved by ``share`` of their range."""
    spread = golden.details["outputs"]["probs"]["range"]
    moved = tuple({"probs": e["probs"] + np.float32(share * spread)} for e in golden.expected)
    return replace(golden, expected=moved)


def test_a_provider_that_moves_an_output_by_2_percent_gets_a_measured_tolerance(
    onnx_model: Path,
) -> None:
    golden, health = _golden(onnx_model)
    shifted = _shifted(golden, 0.02)
    measured = measure_providers(
        onnx_model, shifted, health, runtime="onnxruntime", providers=(CPU,)
    )
    how = golden.details["outputs"]["probs"]
    (outputs,) = [m["outputs"] for m in measured.details["measured"].values()]
    deviation = outputs["probs"]["deviation"]
    assert deviation == pytest.approx(0.02 * how["range"], rel=1e-3)
    atol = measured.tables[CPU]["probs"].atol
    assert atol == pytest.approx(min(MARGIN * deviation + how["floor"], MAX_SHARE * how["range"]))
    assert health.tolerance.atol < deviation < atol


def test_a_provider_that_moves_an_output_by_10_percent_fails_the_build_naming_it(
    onnx_model: Path,
) -> None:
    golden, health = _golden(onnx_model)
    with pytest.raises(GateError, match=rf"on {CPU}, output 'probs' .* beyond 5% of its range"):
        measure_providers(
            onnx_model, _shifted(golden, 0.1), health, runtime="onnxruntime", providers=(CPU,)
        )


# --- builds -----------------------------------------------------------------------------


def _extract(path: Path, key: SigningKey, to: Path) -> None:
    with path.open("rb") as f:
        verify_bundle(f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=to)


def test_an_onnx_build_records_the_cpu_providers_tolerance_and_the_agent_applies_it(
    tmp_path: Path, key: SigningKey, onnx_model: Path
) -> None:
    result = build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=_meta(CPU), keys=[key])
    health = result.manifest.health
    assert health.cases is not None
    # The expected outputs come from this very provider: nothing to widen.
    assert health.provider_tolerances == {CPU: health.cases.tolerances}
    assert result.manifest.evaluation is not None
    providers = result.manifest.evaluation["golden"]["providers"]
    assert providers["measured"][CPU]["outputs"]["probs"]["deviation"] == 0.0
    assert providers["margin"] == MARGIN
    _extract(result.path, key, tmp_path / "x")
    statement = json.loads((tmp_path / "x" / "provenance/build.intoto.json").read_bytes())
    (byproduct,) = statement["predicate"]["runDetails"]["byproducts"]
    assert byproduct["annotations"]["providers"] == providers
    options = RuntimeOptions(providers=(CPU,))
    with load_model(result.manifest, tmp_path / "x", "onnxruntime", options) as model:
        check_health(model, result.manifest, tmp_path / "x", runs=1, provider=CPU)


def test_a_tflite_build_measures_the_builtin_kernels_next_to_xnnpack(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_tflite_mlp(tmp_path / "mlp.tflite")
    meta = _meta("cpu", "xnnpack", "cpu")  # named twice: measured once
    result = build_bundle(model, tmp_path / "b.edgeship", metadata=meta, keys=[key])
    health = result.manifest.health
    assert list(health.provider_tolerances) == ["cpu", "xnnpack"]
    assert result.manifest.evaluation is not None
    golden = result.manifest.evaluation["golden"]
    (name,) = golden["outputs"]
    how = golden["outputs"][name]
    measured = golden["providers"]["measured"]
    assert measured["xnnpack"]["outputs"][name]["deviation"] == 0.0  # the expected outputs' path
    deviation = measured["cpu"]["outputs"][name]["deviation"]
    assert deviation < 1e-5  # another implementation of float kernels, rounding differently
    plain = health.tolerance.atol
    assert health.provider_tolerances["cpu"][name].atol == max(
        plain, MARGIN * deviation + how["floor"]
    )
    _extract(result.path, key, tmp_path / "x")
    options = RuntimeOptions(delegates=("cpu",))
    with load_model(result.manifest, tmp_path / "x", "litert", options) as loaded:
        check_health(loaded, result.manifest, tmp_path / "x", runs=1, provider="cpu")


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        (OPENVINO, f"--measure-provider {OPENVINO}: not available on this build machine"),
        ("xnnpack", "'xnnpack': this onnx model needs an onnxruntime execution provider"),
        ("OpenVINO", "'OpenVINO': this onnx model needs an onnxruntime execution provider"),
    ],
)
def test_a_provider_the_build_cannot_measure_is_refused_before_anything_is_built(
    tmp_path: Path, key: SigningKey, onnx_model: Path, provider: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_bundle(onnx_model, tmp_path / "b.edgeship", metadata=_meta(provider), keys=[key])
    assert not (tmp_path / "b.edgeship").exists()


def test_the_cli_option_measures_each_provider_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGESHIP_TEST_PASSPHRASE", "correct horse")
    monkeypatch.chdir(tmp_path)
    make_onnx_mlp(tmp_path / "mlp.onnx")
    assert main(["keygen", "k", "--passphrase-env", "EDGESHIP_TEST_PASSPHRASE"]) == 0
    argv = [
        *("build", "mlp.onnx", "--name", "mlp", "--version", "1", "--sequence", "1"),
        *("--key", "k", "--passphrase-env", "EDGESHIP_TEST_PASSPHRASE"),
        *("--measure-provider", CPU),
    ]
    capsys.readouterr()
    assert main(argv) == 0
    assert f"tolerances measured on {CPU}" in capsys.readouterr().out
    assert main([*argv, "--force", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert list(doc["evaluation"]["golden"]["providers"]["measured"]) == [CPU]


def test_the_metadata_names_providers_to_measure_and_the_option_replaces_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "meta.toml"
    path.write_text(
        'name = "mlp"\nversion = "1"\nsequence = 1\n'
        f'[health]\nmeasure_providers = ["{OPENVINO}", "{CPU}"]\n'
    )
    assert load_metadata(path, {}).measure_providers == (OPENVINO, CPU)
    overridden = load_metadata(path, {"health.measure_providers": [CPU]})
    assert overridden.measure_providers == (CPU,)
