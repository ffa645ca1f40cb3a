"""Real pretrained models from package wheels, built into bundles as they come, gated by
the device's real health gate: the original passes, a damaged one fails.

silero-vad is a streaming audio model: a fixed chunk of 512 samples, a recurrent state
with the batch on axis 1 and a scalar int64 sample rate; the golden cases are three chunks
of one stream, each case carrying the state the previous one returned. The PaddleOCR text
detector (rapidocr-onnxruntime) has dynamic height and width and its weights in Constant
nodes: its golden inputs are pictures of text lines (on synthesised noise it detects
nothing, and the build refuses). Models are downloaded once from PyPI and cached
(tests/support/wheel_models.py). Heavier sweeps are in bench/real_models.py.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from agent.bundle import verify_bundle
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.errors import HealthCheckError
from agent.install import ChildGate, check_in_child
from sdk.build import BuildMetadata, SigningKey, build_bundle, generate_key, quantize
from sdk.build._cases import InputHint
from sdk.build.datasets import Dataset
from sdk.errors import BuildError, QuantizationError
from tests.support.mutations import zero_largest_layer
from tests.support.real_inputs import silero_stream_cases, text_pages
from tests.support.wheel_models import RAPIDOCR_DET, SILERO_VAD, fetch


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys") / "release", b"secret")


def _build_and_extract(
    model: Path, tmp: Path, key: SigningKey, meta: BuildMetadata, **kwargs: object
) -> tuple[Manifest, Path]:
    result = build_bundle(model, tmp / "b.edgeship", metadata=meta, keys=[key], **kwargs)  # type: ignore[arg-type]
    with result.path.open("rb") as f:
        verify_bundle(f, TrustPolicy.of([key.public]), now=datetime.now(UTC), extract_to=tmp / "x")
    return result.manifest, tmp / "x"


def _damaged_copy(manifest: Manifest, extracted: Path, model: Path, tmp: Path) -> Path:
    target = tmp / "damaged"
    shutil.copytree(extracted, target)
    zero_largest_layer(model, target / manifest.model.file)
    return target


def test_silero_vad_streams_as_exact_requests_and_its_gate_has_teeth(
    tmp_path: Path, key: SigningKey
) -> None:
    model = fetch(SILERO_VAD)
    np.savez(tmp_path / "cases.npz", **silero_stream_cases(model, 3))
    manifest, extracted = _build_and_extract(
        model,
        tmp_path,
        key,
        BuildMetadata(name="silero-vad", version="6.2.3", sequence=1),
        golden_inputs=tmp_path / "cases.npz",
    )
    assert manifest.health.cases is not None
    assert manifest.health.cases.count == 3
    gate = ChildGate("onnxruntime")
    check_in_child(manifest, extracted, gate, runs=2)
    damaged = _damaged_copy(manifest, extracted, model, tmp_path)
    with pytest.raises(HealthCheckError, match="golden outputs do not match"):
        check_in_child(manifest, damaged, gate, runs=1)


def test_a_detector_on_synthesised_noise_is_refused_for_testing_nothing(
    tmp_path: Path, key: SigningKey
) -> None:
    meta = BuildMetadata(
        name="ppocr-det",
        version="4",
        sequence=1,
        input_hints={"x": InputHint(shape=(1, 3, 64, 96), low=-1.0, high=1.0)},
    )
    with pytest.raises(BuildError, match=r"nearly constant at zero .*--golden-inputs"):
        build_bundle(fetch(RAPIDOCR_DET), tmp_path / "b.edgeship", metadata=meta, keys=[key])


def test_a_detector_with_dynamic_height_and_width_gates_on_real_looking_pages(
    tmp_path: Path, key: SigningKey
) -> None:
    model = fetch(RAPIDOCR_DET)
    np.savez(tmp_path / "pages.npz", **text_pages(2, 64, 96))
    meta = BuildMetadata(name="ppocr-det", version="4", sequence=1)
    manifest, extracted = _build_and_extract(
        model, tmp_path, key, meta, golden_inputs=tmp_path / "pages.npz"
    )
    assert manifest.model.request_elements == 3 * 64 * 96
    gate = ChildGate("onnxruntime")
    check_in_child(manifest, extracted, gate, runs=2)
    damaged = _damaged_copy(manifest, extracted, model, tmp_path)
    with pytest.raises(HealthCheckError, match="golden outputs do not match"):
        check_in_child(manifest, damaged, gate, runs=1)


def test_static_quantization_of_the_detector_leaves_nothing_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # onnxruntime's shape inference gives up on this export and saves its work into the
    # current directory; the build must keep that in its scratch space.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    pages = np.concatenate(list(text_pages(2, 64, 96).values()))
    result = quantize(
        fetch(RAPIDOCR_DET), tmp_path / "q.onnx", scheme="static", calibration=Dataset({"x": pages})
    )
    assert result.details["pre_process"].startswith("skipped")  # where the files came from
    assert list(cwd.iterdir()) == []


def test_calibration_data_the_detector_cannot_take_is_a_one_line_quantization_error(
    tmp_path: Path,
) -> None:
    pages = np.concatenate(list(text_pages(1, 32, 48).values()))  # not multiples of 32
    with pytest.raises(QuantizationError, match=r"broadcast.*calibration data fits") as err:
        quantize(
            fetch(RAPIDOCR_DET),
            tmp_path / "q.onnx",
            scheme="static",
            calibration=Dataset({"x": pages}),
        )
    assert "\n" not in str(err.value)
