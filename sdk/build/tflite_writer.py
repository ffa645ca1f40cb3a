"""Write a float32 multi-layer perceptron as a .tflite flatbuffer, from numpy weights.

No TensorFlow: the model is assembled with the flatbuffers object API that ships with
``ai_edge_litert`` (``schema_py_generated``). It carries a ``serving_default`` signature
so litert-quantizer can calibrate it. Layers follow the scikit-learn convention
(``coefs_[i]`` shaped ``[n_in, n_out]``, ``y = x @ W + b``), ReLU between layers and an
optional softmax at the end: exactly an ``MLPClassifier(activation="relu")``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["mlp_tflite_bytes", "write_mlp_tflite"]

Layer = tuple[npt.ArrayLike, npt.ArrayLike]


def write_mlp_tflite(
    path: Path | str,
    layers: Sequence[Layer],
    *,
    input_name: str = "x",
    output_name: str = "probs",
    softmax: bool = True,
) -> Path:
    """Write the MLP to ``path`` (see :func:`mlp_tflite_bytes`) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(
        mlp_tflite_bytes(layers, input_name=input_name, output_name=output_name, softmax=softmax)
    )
    return out


def mlp_tflite_bytes(
    layers: Sequence[Layer],
    *,
    input_name: str = "x",
    output_name: str = "probs",
    softmax: bool = True,
) -> bytes:
    """The flatbuffer of FULLY_CONNECTED (+RELU) layers, input ``[-1, n_in]`` float32.

    Raises:
        ValueError: no layers, or layer shapes that do not chain.
    """
    import flatbuffers  # noqa: PLC0415 - loaded when used
    from ai_edge_litert import schema_py_generated as s  # noqa: PLC0415 - loaded when used

    ws = [(np.asarray(w, np.float32), np.asarray(b, np.float32).reshape(-1)) for w, b in layers]
    if not ws:
        raise ValueError("an MLP needs at least one (W, b) layer")
    for i, (w, b) in enumerate(ws):
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ValueError(f"layer {i}: W {w.shape} and b {b.shape} do not fit x @ W + b")
        if i and ws[i - 1][0].shape[1] != w.shape[0]:
            raise ValueError(
                f"layer {i} takes {w.shape[0]} values, layer {i - 1} gives {ws[i - 1][0].shape[1]}"
            )

    tensors: list[Any] = []
    buffers: list[Any] = [s.BufferT()]  # buffer 0 is the empty sentinel the format requires
    opcodes: list[int] = []
    operators: list[Any] = []

    def tensor(name: str, width: int, data: npt.NDArray[Any] | None = None) -> int:
        t = s.TensorT()
        t.name = name
        t.type = s.TensorType.FLOAT32
        if data is None:  # an activation: dynamic batch
            t.shape, t.shapeSignature = [1, width], [-1, width]
        else:
            t.shape = list(data.shape)
            buf = s.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            buffers.append(buf)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def op(code: int, inputs: list[int], output: int, options: Any = None, kind: int = 0) -> None:
        if code not in opcodes:
            opcodes.append(code)
        o = s.OperatorT()
        o.opcodeIndex = opcodes.index(code)
        o.inputs, o.outputs = inputs, [output]
        if options is not None:
            o.builtinOptionsType, o.builtinOptions = kind, options
        operators.append(o)

    x = tensor(input_name, ws[0][0].shape[0])
    h = x
    for i, (w, b) in enumerate(ws):
        last = i == len(ws) - 1
        width = w.shape[1]
        # TFLite keeps FULLY_CONNECTED weights as [out, in].
        wt = tensor(f"dense{i}/weights", width, np.ascontiguousarray(w.T))
        bt = tensor(f"dense{i}/bias", width, b)
        out = tensor(output_name if last and not softmax else f"dense{i}", width)
        fc = s.FullyConnectedOptionsT()
        if not last:
            fc.fusedActivationFunction = s.ActivationFunctionType.RELU
        op(
            s.BuiltinOperator.FULLY_CONNECTED,
            [h, wt, bt],
            out,
            fc,
            s.BuiltinOptions.FullyConnectedOptions,
        )
        h = out
    if softmax:
        sm = s.SoftmaxOptionsT()
        sm.beta = 1.0
        probs = tensor(output_name, ws[-1][0].shape[1])
        op(s.BuiltinOperator.SOFTMAX, [h], probs, sm, s.BuiltinOptions.SoftmaxOptions)
        h = probs

    subgraph = s.SubGraphT()
    subgraph.tensors, subgraph.operators = tensors, operators
    subgraph.inputs, subgraph.outputs = [x], [h]
    subgraph.name = "main"
    codes = []
    for code in opcodes:
        oc = s.OperatorCodeT()
        oc.builtinCode = code
        oc.deprecatedBuiltinCode = min(code, 127)  # the legacy byte field caps at 127
        oc.version = 1
        codes.append(oc)
    signature = s.SignatureDefT()
    signature.signatureKey = "serving_default"
    signature.subgraphIndex = 0
    signature.inputs = [_tensor_map(s, input_name, x)]
    signature.outputs = [_tensor_map(s, output_name, h)]
    model = s.ModelT()
    model.version = 3
    model.description = "edgeship MLP"
    model.operatorCodes, model.subgraphs, model.buffers = codes, [subgraph], buffers
    model.signatureDefs = [signature]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(s: Any, name: str, index: int) -> Any:
    m = s.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m
