"""``edgeship-agent predict`` in-process: file formats in and out, batching, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.bundle.manifest import (
    MANIFEST_PATH,
    Compatibility,
    ModelSpec,
    RuntimeRequirement,
    TensorSpec,
)
from agent.cli import main
from agent.serve.runtimes import installed_runtimes
from tests.agent.serve.runtimes.conftest import batch, reference, require_runtime
from tests.support.bundles import EXPECTED_PATH, GOLDEN_PATH, make_manifest
from tests.support.models import make_onnx_mlp, make_tflite_mlp

pytestmark = pytest.mark.integration


def write_bundle_dir(
    d: Path, fmt: str = "onnx", runtimes: tuple[str, ...] = ("onnxruntime",)
) -> Path:
    """An extracted bundle: manifest.json at the root, the payload beside it."""
    file = f"model/mlp.{fmt}"
    (make_onnx_mlp if fmt == "onnx" else make_tflite_mlp)(d / file)
    payload = {
        file: d / file,
        GOLDEN_PATH: b"golden",
        EXPECTED_PATH: b"expected",
    }
    for path, value in payload.items():
        if isinstance(value, bytes):
            (d / path).parent.mkdir(parents=True, exist_ok=True)
            (d / path).write_bytes(value)
    manifest = make_manifest(
        payload,
        model=ModelSpec(
            format=fmt,  # type: ignore[arg-type]
            file=file,
            inputs=(TensorSpec("x", "float32", (None, 64)),),
            outputs=(TensorSpec("probs", "float32", (None, 10)),),
        ),
        compatibility=Compatibility(runtimes=tuple(RuntimeRequirement(r) for r in runtimes)),
    )
    (d / MANIFEST_PATH).write_bytes(manifest.to_bytes())
    return d


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    require_runtime("onnxruntime")
    return write_bundle_dir(tmp_path / "bundle")


def predict(bundle: Path, src: Path, dst: Path, *extra: str) -> int:
    return main(
        ["predict", "--bundle-dir", str(bundle), "--input", str(src), "--output", str(dst), *extra]
    )


def test_npy_in_npy_out(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = batch(5)
    np.save(tmp_path / "x.npy", x)
    assert predict(bundle_dir, tmp_path / "x.npy", tmp_path / "y.npy") == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference(x), atol=1e-5)
    assert "5 rows" in capsys.readouterr().out


def test_npz_in_npz_out(bundle_dir: Path, tmp_path: Path) -> None:
    x = batch(3)
    np.savez(tmp_path / "x.npz", x=x)
    assert predict(bundle_dir, tmp_path / "x.npz", tmp_path / "y.npz") == 0
    with np.load(tmp_path / "y.npz") as out:
        assert out.files == ["probs"]
        np.testing.assert_allclose(out["probs"], reference(x), atol=1e-5)


@pytest.mark.parametrize("named", [True, False])
def test_json_in_json_out(bundle_dir: Path, tmp_path: Path, named: bool) -> None:
    x = batch(2)
    doc = {"x": x.tolist()} if named else x.tolist()  # a bare list feeds the single input
    (tmp_path / "x.json").write_text(json.dumps(doc))
    assert predict(bundle_dir, tmp_path / "x.json", tmp_path / "y.json") == 0
    out = json.loads((tmp_path / "y.json").read_text())
    np.testing.assert_allclose(np.array(out["probs"]), reference(x), atol=1e-5)


def test_batches_give_the_same_answer_as_one_call(
    bundle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    x = batch(10)
    np.save(tmp_path / "x.npy", x)
    assert (
        predict(bundle_dir, tmp_path / "x.npy", tmp_path / "y.npy", "--batch-size", "3", "--json")
        == 0
    )
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference(x), atol=1e-5)
    summary = json.loads(capsys.readouterr().out)
    assert summary["rows"] == 10
    assert summary["runtime"] == "onnxruntime"


def test_tflite_bundle_uses_the_first_installed_runtime_in_manifest_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_runtime("litert")
    bundle = write_bundle_dir(tmp_path / "b", "tflite", ("tflite-runtime", "litert"))
    x = batch(2)
    np.save(tmp_path / "x.npy", x)
    assert predict(bundle, tmp_path / "x.npy", tmp_path / "y.npy", "--json") == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), reference(x), atol=1e-5)
    expected = "tflite-runtime" if "tflite-runtime" in installed_runtimes() else "litert"
    assert json.loads(capsys.readouterr().out)["runtime"] == expected


BAD_CALLS = [
    # (what is wrong, input file name, its content, output name, message)
    ("wrong shape", "x.npy", np.zeros((2, 63), np.float32), "y.npy", "dimension 1 must be 64"),
    ("NaN", "x.npy", np.full((1, 64), np.nan, np.float32), "y.npy", "NaN"),
    ("unknown input name", "x.npz", {"pixels": np.zeros((1, 64))}, "y.npz", "missing input"),
    ("not JSON", "x.json", b"{not json", "y.json", "cannot read inputs"),
    ("ragged JSON", "x.json", b'{"x": [[1, 2], [3]]}', "y.json", "not a rectangular"),
    ("pickled array", "x.npy", np.array([{}], dtype=object), "y.npy", "cannot read inputs"),
    ("npy named npz", "x.npz", np.zeros((1, 64), np.float32), "y.npz", "not an .npz"),
    ("unknown input suffix", "x.csv", b"1,2,3", "y.npy", "must end in"),
    ("unknown output suffix", "x.npy", np.zeros((1, 64), np.float32), "y.csv", "must end in"),
]


@pytest.mark.parametrize(
    ("name", "content", "out", "message"),
    [pytest.param(n, c, o, m, id=label) for label, n, c, o, m in BAD_CALLS],
)
def test_bad_input_file_exits_1_with_a_clear_error(
    bundle_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: object,
    out: str,
    message: str,
) -> None:
    src = tmp_path / name
    if isinstance(content, bytes):
        src.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(src, **content)
    else:
        with src.open("wb") as f:
            np.save(f, content, allow_pickle=True)  # the pickled case must be refused on load
    assert predict(bundle_dir, src, tmp_path / out) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert not (tmp_path / out).exists()


def test_missing_manifest_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "x.npy", batch(1))
    assert predict(tmp_path, tmp_path / "x.npy", tmp_path / "y.npy") == 1
    assert "extracted bundle" in capsys.readouterr().err


def test_missing_runtime_exits_1_naming_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_runtime("onnxruntime")
    if "tflite-runtime" in installed_runtimes():
        pytest.skip("tflite-runtime is installed here")
    bundle = write_bundle_dir(tmp_path / "b", "tflite", ("tflite-runtime",))
    np.save(tmp_path / "x.npy", batch(1))
    assert predict(bundle, tmp_path / "x.npy", tmp_path / "y.npy") == 1
    assert "edgeship[tflite]" in capsys.readouterr().err


def test_nonpositive_batch_size_is_a_usage_error(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        predict(bundle_dir, tmp_path / "x.npy", tmp_path / "y.npy", "--batch-size", "0")
    assert exc.value.code == 2
