"""What quantization actually changed: the weights that became integers, and the ops that
now compute with them.

A quantizer that finds nothing it can quantize (weights in float16, weights held by
Constant nodes instead of initializers, ops it does not handle) still writes a model and
reports success. :func:`weight_coverage` compares the float original with the quantized
model so the build can say what happened, and refuse a "quantized" bundle that is not.

Weights are the constant tensors of at least :data:`MIN_WEIGHT_ELEMENTS` elements (scales,
zero points and shape constants are not weights): ONNX initializers and Constant-node
values; TFLite tensors that no op produces and that are not graph inputs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from sdk.build.model_io import detect_format

__all__ = ["MIN_QUANTIZED_SHARE", "MIN_WEIGHT_ELEMENTS", "weight_coverage"]

MIN_WEIGHT_ELEMENTS = 16
# Below this share of the float weights turned int8, a build is "almost nothing quantized".
MIN_QUANTIZED_SHARE = 0.1
_INT = {"int8", "uint8", "int4", "uint4"}
_FLOAT = {"float32", "float16", "float64", "bfloat16"}


def weight_coverage(original: Path, quantized: Path) -> dict[str, Any]:
    """How much of ``original``'s float weights ``quantized`` holds as integers, and which
    ops consume integer weights (JSON-ready, for the manifest's quantization details).

    Raises:
        ConfigError: a file is not a model this reader understands.
    """
    before = _weights(original)
    after = _weights(quantized)
    float_bytes = sum(b for kind, _, b in before["tensors"] if kind in _FLOAT)
    float_elems = sum(n for kind, n, _ in before["tensors"] if kind in _FLOAT)
    int_elems = sum(n for kind, n, _ in after["tensors"] if kind in _INT)
    left = sum(b for kind, _, b in after["tensors"] if kind in _FLOAT)
    return {
        "float_weight_bytes": float_bytes,
        "int8_weight_bytes": sum(b for kind, _, b in after["tensors"] if kind in _INT),
        "float_weight_bytes_left": left,
        "float16_weight_bytes": sum(b for kind, _, b in before["tensors"] if kind == "float16"),
        "quantized_share": (min(1.0, int_elems / float_elems) if float_elems else 0.0),
        "quantized_ops": dict(sorted(after["ops"].items())),
    }


def _weights(path: Path) -> dict[str, Any]:
    return _onnx_weights(path) if detect_format(path) == "onnx" else _tflite_weights(path)


def _onnx_weights(path: Path) -> dict[str, Any]:
    import onnx  # noqa: PLC0415 - loaded when used
    from onnx import helper  # noqa: PLC0415

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = a.t
    kinds: dict[str, tuple[str, int]] = {}
    out = []
    for name, t in tensors.items():
        n = int(np.prod(t.dims)) if t.dims else 1
        kind = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).name
        kinds[name] = (kind, n)
        if n >= MIN_WEIGHT_ELEMENTS:
            out.append((kind, n, n * np.dtype(kind).itemsize))
    # An int8 weight reaches its op directly (QOperator, MatMulInteger) or through a
    # DequantizeLinear (QDQ): either way the op computes with quantized weights.
    int_weights = {k for k, (kind, n) in kinds.items() if kind in _INT and n >= MIN_WEIGHT_ELEMENTS}
    dequantized = {
        n.output[0]
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input and n.input[0] in int_weights
    }
    ops: Counter[str] = Counter(
        n.op_type
        for n in graph.node
        if n.op_type != "DequantizeLinear" and set(n.input) & (int_weights | dequantized)
    )
    return {"tensors": out, "ops": ops}


def _tflite_weights(path: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter  # noqa: PLC0415 - loaded when used

    interpreter = Interpreter(model_path=str(path))
    ops = interpreter._get_ops_details()
    produced = {int(i) for op in ops for i in op["outputs"]}
    read = {int(i) for op in ops for i in op["inputs"]}
    graph_inputs = {d["index"] for d in interpreter.get_input_details()}
    consts = {}
    for t in interpreter.get_tensor_details():
        # A weight is read by an op, made by none, and not fed by the caller.
        if t["index"] in produced or t["index"] in graph_inputs or t["index"] not in read:
            continue
        n = int(np.prod(t["shape"])) if len(t["shape"]) else 1
        consts[t["index"]] = (np.dtype(t["dtype"]).name, n)
    out = [
        (kind, n, n * np.dtype(kind).itemsize)
        for kind, n in consts.values()
        if n >= MIN_WEIGHT_ELEMENTS
    ]
    int_weights = {
        i for i, (kind, n) in consts.items() if kind in _INT and n >= MIN_WEIGHT_ELEMENTS
    }
    counted: Counter[str] = Counter(
        op["op_name"] for op in ops if {int(i) for i in op["inputs"]} & int_weights
    )
    return {"tensors": out, "ops": counted}
