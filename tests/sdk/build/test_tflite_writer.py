"""The .tflite MLP writer: LiteRT computes what numpy computes."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from sdk.build.model_io import open_model
from sdk.build.tflite_writer import write_mlp_tflite


def _numpy_mlp(
    x: np.ndarray, layers: list[tuple[np.ndarray, np.ndarray]], softmax: bool
) -> np.ndarray:
    h = x.astype(np.float64)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0)
    if softmax:
        e = np.exp(h - h.max(axis=1, keepdims=True))
        h = e / e.sum(axis=1, keepdims=True)
    return h


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("widths", [(8, 3), (20, 16, 12, 5)])
def test_litert_output_matches_numpy(
    tmp_path: Path, widths: tuple[int, ...], softmax: bool
) -> None:
    rng = np.random.default_rng(sum(widths))
    layers = [
        (
            rng.standard_normal((a, b)).astype(np.float32) * 0.5,
            rng.standard_normal(b).astype(np.float32),
        )
        for a, b in itertools.pairwise(widths)
    ]
    path = write_mlp_tflite(
        tmp_path / "m.tflite", layers, input_name="inp", output_name="out", softmax=softmax
    )
    x = rng.standard_normal((7, widths[0])).astype(np.float32)
    with open_model(path) as model:
        assert [s.name for s in model.spec.inputs] == ["inp"]
        assert [s.name for s in model.spec.outputs] == ["out"]
        out = model.predict({"inp": x})["out"]
    np.testing.assert_allclose(out, _numpy_mlp(x, layers, softmax), atol=2e-5)


def test_layers_that_do_not_chain_are_refused(tmp_path: Path) -> None:
    layers = [(np.zeros((4, 3)), np.zeros(3)), (np.zeros((5, 2)), np.zeros(2))]
    with pytest.raises(ValueError, match="layer 1 takes 5"):
        write_mlp_tflite(tmp_path / "m.tflite", layers)
