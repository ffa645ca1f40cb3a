"""A convolutional classifier on 1x3x224x224 input: what static int8 buys on a CPU.

Builds ``conv.onnx`` (opset 17, IR 8) with onnx.helper: a 4x4 stride-4 "patchify" stem
(3->64 channels, as in ConvNeXt), then six 3x3 conv + ReLU layers (128, 128, 256, 256,
512, 512 channels, stride 2 at each widening), global average pooling and a 1000-way
linear head: about 4.9 M parameters and 0.8 G multiply-adds. The weights are He-initialised
from a fixed seed, not trained (no training framework is needed): the example is about
size and latency, and fidelity to the float model is measured, not accuracy.

Writes into ``--out`` (default ``out/conv``) the model, ``calibration.npz`` and
``validation.npz`` (synthetic images: low-resolution noise upsampled 8x, so neighbouring
pixels correlate as in photos), then quantizes it (static int8, QDQ) with
``sdk.build.quantize`` and prints the ``sdk.build.evaluate`` report. Takes about 10-20 seconds.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console

from sdk.build import evaluate, quantize
from sdk.build.datasets import load_dataset

ONNX_OPSET = 17
ONNX_IR_VERSION = 8
SIZE = 224
STEM = (64, 4)  # channels, kernel = stride
STAGES = ((128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1))  # channels, stride
CLASSES = 1000
SEED = 0


def make_model(path: Path) -> Path:
    """Write the float32 conv net; input ``x`` [N, 3, 224, 224], output ``logits``."""
    rng = np.random.default_rng(SEED)
    nodes, inits = [], []

    def conv(name: str, x: str, c_in: int, c_out: int, *, k: int, stride: int, pad: int) -> str:
        w = rng.standard_normal((c_out, c_in, k, k)) * np.sqrt(2.0 / (c_in * k * k))
        b = rng.standard_normal(c_out) * 0.05
        inits.extend(
            [
                numpy_helper.from_array(w.astype(np.float32), f"{name}.w"),
                numpy_helper.from_array(b.astype(np.float32), f"{name}.b"),
            ]
        )
        nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [f"{name}.conv"],
                kernel_shape=[k, k],
                strides=[stride, stride],
                pads=[pad] * 4,
            )
        )
        nodes.append(helper.make_node("Relu", [f"{name}.conv"], [name]))
        return name

    h = conv("stem", "x", 3, STEM[0], k=STEM[1], stride=STEM[1], pad=0)
    c = STEM[0]
    for i, (c_out, stride) in enumerate(STAGES):
        h = conv(f"conv{i}", h, c, c_out, k=3, stride=stride, pad=1)
        c = c_out
    w = rng.standard_normal((c, CLASSES)) * np.sqrt(1.0 / c)
    inits.extend(
        [
            numpy_helper.from_array(w.astype(np.float32), "head.w"),
            numpy_helper.from_array(np.zeros(CLASSES, np.float32), "head.b"),
        ]
    )
    nodes.extend(
        [
            helper.make_node("GlobalAveragePool", [h], ["pool"]),
            helper.make_node("Flatten", ["pool"], ["flat"], axis=1),
            helper.make_node("Gemm", ["flat", "head.w", "head.b"], ["logits"]),
        ]
    )
    graph = helper.make_graph(
        nodes,
        "edgeship_conv_example",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="edgeship"
    )
    model.ir_version = ONNX_IR_VERSION  # onnx 1.23 would write IR 14, which onnxruntime rejects
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def images(count: int, seed: int) -> np.ndarray:
    """Synthetic images in [0, 1]: 28x28 noise upsampled 8x (correlated like photos)."""
    low = np.random.default_rng(seed).random((count, 3, SIZE // 8, SIZE // 8), dtype=np.float32)
    return low.repeat(8, axis=2).repeat(8, axis=3)


def build(out: Path, *, calibration: int = 32, validation: int = 16) -> dict[str, Path]:
    """Write the model and both data sets; returns their paths."""
    paths = {
        "onnx": make_model(out / "conv.onnx"),
        "calibration": out / "calibration.npz",
        "validation": out / "validation.npz",
    }
    np.savez(paths["calibration"], x=images(calibration, SEED + 1))
    np.savez(paths["validation"], x=images(validation, SEED + 2))
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/conv"))
    parser.add_argument("--latency-runs", type=int, default=30)
    args = parser.parse_args()
    paths = build(args.out)
    result = quantize(
        paths["onnx"],
        args.out / "conv.int8.onnx",
        scheme="static",
        calibration=load_dataset(paths["calibration"]),
        targets=["onnxruntime"],
    )
    report = evaluate(
        paths["onnx"],
        result.path,
        load_dataset(paths["validation"]),
        latency_runs=args.latency_runs,
    )
    Console().print(report.to_table())


if __name__ == "__main__":
    main()
