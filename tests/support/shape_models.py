"""Small ONNX models with the I/O shapes that real exports have and data sets cannot express:
a batch fixed at 1, a recurrent state with the batch on axis 1, a scalar integer input,
dynamic spatial dimensions, weights held in Constant nodes.

Built with ``onnx.helper`` at the opset / IR that :mod:`tests.support.models` uses.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from tests.support.models import _save_onnx, make_tflite_mlp

__all__ = [
    "STATE_SHAPE",
    "make_onnx_constant_mlp",
    "make_onnx_dynamic_image",
    "make_onnx_stateful",
    "make_tflite_float16_mlp",
]

STATE_SHAPE = (2, 1, 8)  # (layers, batch, hidden): the batch is on axis 1


def make_onnx_stateful(path: Path, *, seed: int = 0) -> Path:
    """A streaming model shaped like silero-vad: ``x`` float32 ``[1, 16]`` (batch fixed at
    1), ``state`` float32 ``[2, 1, 8]``, ``sr`` int64 scalar; outputs ``prob`` ``[1, 4]``
    (softmax, scaled by ``sr / 16000`` before it) and ``state_out`` ``[2, 1, 8]``."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((16, 8)) * 0.35).astype(np.float32)
    w2 = (rng.standard_normal((8, 4)) * 0.5).astype(np.float32)
    inits = [
        numpy_helper.from_array(w1, "W1"),
        numpy_helper.from_array(w2, "W2"),
        numpy_helper.from_array(np.array(16000.0, np.float32), "SR0"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Add", ["state", "h"], ["s"]),  # [2,1,8] + [1,8]
        helper.make_node("Tanh", ["s"], ["state_out"]),
        helper.make_node("ReduceMean", ["state_out"], ["m"], axes=[0], keepdims=0),
        helper.make_node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["srf", "SR0"], ["scale"]),
        helper.make_node("Mul", ["m", "scale"], ["ms"]),
        helper.make_node("MatMul", ["ms", "W2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=-1),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, list(STATE_SHAPE)),
        helper.make_tensor_value_info("sr", TensorProto.INT64, []),
    ]
    outputs = [
        helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 4]),
        helper.make_tensor_value_info("state_out", TensorProto.FLOAT, list(STATE_SHAPE)),
    ]
    return _save_onnx(nodes, inits, inputs, outputs, Path(path))


def make_onnx_dynamic_image(path: Path, *, seed: int = 0) -> Path:
    """``x`` float32 ``[N, 3, H, W]`` (height and width dynamic, as detector exports have
    them) -> ``y`` ``[N, 4, H, W]``: one 3x3 convolution whose weights sit in a Constant
    node, not an initializer (as some exporters write them)."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "Wc")),
        helper.make_node("Conv", ["x", "W"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])
    return _save_onnx(nodes, [], [x], [y], Path(path))


def make_onnx_constant_mlp(path: Path, *, seed: int = 0) -> Path:
    """``x`` float32 ``[N, 64]`` -> ``probs`` ``[N, 10]``: two MatMul layers whose weights
    sit in Constant nodes (as some exporters write them), which quantizers skip."""
    rng = np.random.default_rng(seed)
    nodes = []
    h = "x"
    for i, (a, b) in enumerate(((64, 32), (32, 10))):
        w = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        nodes += [
            helper.make_node("Constant", [], [f"W{i}"], value=numpy_helper.from_array(w, f"c{i}")),
            helper.make_node("MatMul", [h, f"W{i}"], [f"mm{i}"]),
        ]
        h = f"mm{i}"
        if i == 0:
            nodes.append(helper.make_node("Relu", [h], ["relu0"]))
            h = "relu0"
    nodes.append(helper.make_node("Softmax", [h], ["probs"], axis=-1))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])
    return _save_onnx(nodes, [], [x], [y], Path(path))


def make_tflite_float16_mlp(path: Path) -> Path:
    """The TFLite MLP of :func:`tests.support.models.make_tflite_mlp` with its weight
    matrices stored as float16 behind DEQUANTIZE ops, as TFLite's float16 conversion (and
    MediaPipe's models) write them."""
    from ai_edge_litert import schema_py_generated as s  # noqa: PLC0415 - loaded when used
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    src = make_tflite_mlp(Path(path).with_suffix(".f32.tflite"))
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    code = s.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = s.BuiltinOperator.DEQUANTIZE
    code.version = 2
    model.operatorCodes.append(code)
    graph = model.subgraphs[0]
    ops = []
    for op in graph.operators:
        for i in op.inputs:
            t = graph.tensors[i]
            data = model.buffers[t.buffer].data
            if data is None or len(data) == 0 or len(t.shape) != 2:
                continue
            half = s.BufferT()
            half.data = np.frombuffer(
                np.frombuffer(bytes(data), np.float32).astype(np.float16).tobytes(), np.uint8
            )
            model.buffers.append(half)
            t16 = s.TensorT()
            t16.name, t16.type, t16.shape = t.name + b"_fp16", s.TensorType.FLOAT16, list(t.shape)
            t16.buffer = len(model.buffers) - 1
            graph.tensors.append(t16)
            t.buffer = 0
            dq = s.OperatorT()
            dq.opcodeIndex = len(model.operatorCodes) - 1
            dq.inputs, dq.outputs = [len(graph.tensors) - 1], [i]
            ops.append(dq)
        ops.append(op)
    graph.operators = ops
    Path(path).write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return Path(path)
