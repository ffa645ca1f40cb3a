"""Quantization that tells the truth: what became int8 is reported, a build that
quantized (almost) nothing is refused unless accepted, and int8 must not be larger or
slower than fp32 unless the limits are changed (and then that is recorded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdk.build import BuildMetadata, QuantizeOptions, SigningKey, build_bundle, generate_key
from sdk.build._cases import InputHint
from sdk.build._cost import cost_failures
from sdk.errors import GateError, QuantizationError
from tests.support.models import make_onnx_mlp
from tests.support.shape_models import (
    make_onnx_constant_mlp,
    make_onnx_dynamic_image,
    make_tflite_float16_mlp,
)

META = BuildMetadata(name="m", version="1", sequence=1)
IMAGE_META = BuildMetadata(
    name="img", version="1", sequence=1, input_hints={"x": InputHint(shape=(1, 3, 8, 8))}
)
# Tiny models: int8 does not pay on them, and that gate is tested on its own below.
NO_SPEED_GATE = {"max_latency_ratio": None}


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> SigningKey:
    return generate_key(tmp_path_factory.mktemp("keys") / "release", b"secret")


def test_weights_in_constant_nodes_are_folded_and_quantized(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_onnx_constant_mlp(tmp_path / "c.onnx")
    result = build_bundle(
        model,
        tmp_path / "b.edgeship",
        metadata=META,
        keys=[key],
        quantize=QuantizeOptions("dynamic", **NO_SPEED_GATE),  # type: ignore[arg-type]
    )
    details = result.manifest.quantization.details
    assert details["folded_constants"] == 2
    assert details["coverage"]["quantized_share"] == 1.0
    assert details["coverage"]["quantized_ops"] == {"MatMulInteger": 2}


def test_a_build_that_quantized_nothing_is_refused_saying_what_to_do(
    tmp_path: Path, key: SigningKey
) -> None:
    # onnxruntime's dynamic quantization leaves convolutions in float (see _quantize.py).
    model = make_onnx_dynamic_image(tmp_path / "img.onnx")
    with pytest.raises(QuantizationError, match=r"turned 0% .*--accept-unquantized") as err:
        build_bundle(
            model,
            tmp_path / "b.edgeship",
            metadata=IMAGE_META,
            keys=[key],
            quantize=QuantizeOptions("dynamic"),
        )
    assert "\n" not in str(err.value)
    assert not (tmp_path / "b.edgeship").exists()


def test_accepting_an_unquantized_build_is_recorded_in_the_bundle(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_onnx_dynamic_image(tmp_path / "img.onnx")
    result = build_bundle(
        model,
        tmp_path / "b.edgeship",
        metadata=IMAGE_META,
        keys=[key],
        quantize=QuantizeOptions(
            "dynamic", accept_unquantized=True, max_size_ratio=None, max_latency_ratio=None
        ),
    )
    coverage = result.manifest.quantization.details["coverage"]
    assert coverage["accepted_unquantized"] is True
    assert coverage["quantized_share"] == 0.0


def test_int8_larger_than_allowed_is_refused_by_the_default_style_gate(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_onnx_mlp(tmp_path / "mlp.onnx")
    options = QuantizeOptions("dynamic", max_size_ratio=0.01, max_latency_ratio=None)
    with pytest.raises(GateError, match=r"does not pay on this machine: size 0\.\d+x fp32"):
        build_bundle(model, tmp_path / "b.edgeship", metadata=META, keys=[key], quantize=options)
    assert not (tmp_path / "b.edgeship").exists()


def test_a_changed_limit_is_recorded_with_the_measured_ratios(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_onnx_mlp(tmp_path / "mlp.onnx")
    options = QuantizeOptions("dynamic", max_latency_ratio=None)
    result = build_bundle(
        model, tmp_path / "b.edgeship", metadata=META, keys=[key], quantize=options
    )
    assert result.manifest.evaluation is not None
    vs = result.manifest.evaluation["vs_fp32"]
    assert vs["overridden"] is True
    assert vs["limits"] == {"max_size_ratio": 1.0, "max_latency_ratio": None}
    assert 0 < vs["size_ratio"] <= 1.0
    assert set(vs["latency_by_threads"]) == {"1", "default"}


def test_cost_gates_name_each_ratio_over_its_limit() -> None:
    cost = {"size_ratio": 1.29, "latency_ratio": 2.5}
    assert cost_failures(cost, 1.0, 1.0) == [
        "size 1.29x fp32 (limit 1x)",
        "p50 latency 2.50x fp32 (limit 1x)",
    ]
    assert cost_failures(cost, None, 3.0) == []


def test_float16_tflite_weights_are_widened_and_then_quantized(
    tmp_path: Path, key: SigningKey
) -> None:
    model = make_tflite_float16_mlp(tmp_path / "f16.tflite")
    result = build_bundle(
        model,
        tmp_path / "b.edgeship",
        metadata=META,
        keys=[key],
        quantize=QuantizeOptions("dynamic", max_latency_ratio=None),
    )
    details = result.manifest.quantization.details
    assert details["float16_weights_converted"] == 2
    assert details["coverage"]["float16_weight_bytes"] > 0
    assert details["coverage"]["quantized_share"] > 0.9
    assert details["coverage"]["quantized_ops"] == {"FULLY_CONNECTED": 2}
