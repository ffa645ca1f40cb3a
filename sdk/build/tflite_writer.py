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

from agent.plumbing.files import atomic_write

__all__ = ["mlp_tflite_bytes", "write_mlp_tflite"]

Layer = tuple[npt.ArrayLike, npt.ArrayLike]
_Weights = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]


def write_mlp_tflite(
    path: Path | str,
    layers: Sequence[Layer],
    *,
    input_name: str = "x",
    output_name: str = "probs",
    softmax: bool = True,
) -> Path:
    """Write the MLP to ``path`` (see :func:`mlp_tflite_bytes`) and return the path.

    Raises:
        ValueError: no layers, or layer shapes that do not chain.
        OSError: the file cannot be written.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out,
        mlp_tflite_bytes(layers, input_name=input_name, output_name=output_name, softmax=softmax),
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
    ws = _checked(layers)
    graph = _Graph()
    x = graph.tensor(input_name, ws[0][0].shape[0])
    h = x
    for i, layer in enumerate(ws):
        last = i == len(ws) - 1
        name = output_name if last and not softmax else f"dense{i}"
        h = graph.dense(i, h, layer, name, relu=not last)
    if softmax:
        h = graph.softmax(h, output_name, ws[-1][0].shape[1])
    return graph.finish((input_name, x), (output_name, h))


def _checked(layers: Sequence[Layer]) -> list[_Weights]:
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
    return ws


class _Graph:
    """One float32 subgraph under construction, in the schema's object API."""

    def __init__(self) -> None:
        from ai_edge_litert import schema_py_generated  # noqa: PLC0415 - loaded when used

        self.s: Any = schema_py_generated
        self.tensors: list[Any] = []
        self.buffers: list[Any] = [self.s.BufferT()]  # buffer 0: the format's empty sentinel
        self.opcodes: list[int] = []
        self.operators: list[Any] = []

    def tensor(self, name: str, width: int, data: npt.NDArray[Any] | None = None) -> int:
        t = self.s.TensorT()
        t.name = name
        t.type = self.s.TensorType.FLOAT32
        if data is None:  # an activation: dynamic batch
            t.shape, t.shapeSignature = [1, width], [-1, width]
        else:
            t.shape = list(data.shape)
            buf = self.s.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            self.buffers.append(buf)
            t.buffer = len(self.buffers) - 1
        self.tensors.append(t)
        return len(self.tensors) - 1

    def op(self, code: int, inputs: list[int], output: int, options: Any, kind: int) -> None:
        if code not in self.opcodes:
            self.opcodes.append(code)
        o = self.s.OperatorT()
        o.opcodeIndex = self.opcodes.index(code)
        o.inputs, o.outputs = inputs, [output]
        o.builtinOptionsType, o.builtinOptions = kind, options
        self.operators.append(o)

    def dense(self, i: int, h: int, layer: _Weights, name: str, *, relu: bool) -> int:
        """Layer ``i``: ``h @ w + b``, followed by ReLU when ``relu``."""
        w, b = layer
        s, width = self.s, w.shape[1]
        # TFLite keeps FULLY_CONNECTED weights as [out, in].
        wt = self.tensor(f"dense{i}/weights", width, np.ascontiguousarray(w.T))
        bt = self.tensor(f"dense{i}/bias", width, b)
        out = self.tensor(name, width)
        fc = s.FullyConnectedOptionsT()
        if relu:
            fc.fusedActivationFunction = s.ActivationFunctionType.RELU
        kind = s.BuiltinOptions.FullyConnectedOptions
        self.op(s.BuiltinOperator.FULLY_CONNECTED, [h, wt, bt], out, fc, kind)
        return out

    def softmax(self, h: int, name: str, width: int) -> int:
        sm = self.s.SoftmaxOptionsT()
        sm.beta = 1.0
        probs = self.tensor(name, width)
        self.op(
            self.s.BuiltinOperator.SOFTMAX, [h], probs, sm, self.s.BuiltinOptions.SoftmaxOptions
        )
        return probs

    def finish(self, x: tuple[str, int], y: tuple[str, int]) -> bytes:
        """The model's flatbuffer: this subgraph, input ``x`` and output ``y`` (name, tensor),
        and a ``serving_default`` signature naming them.
        """
        import flatbuffers  # noqa: PLC0415 - loaded when used

        s = self.s
        subgraph = s.SubGraphT()
        subgraph.tensors, subgraph.operators = self.tensors, self.operators
        subgraph.inputs, subgraph.outputs = [x[1]], [y[1]]
        subgraph.name = "main"
        codes = []
        for code in self.opcodes:
            oc = s.OperatorCodeT()
            oc.builtinCode = code
            oc.deprecatedBuiltinCode = min(code, 127)  # the legacy byte field caps at 127
            oc.version = 1
            codes.append(oc)
        signature = s.SignatureDefT()
        signature.signatureKey = "serving_default"
        signature.subgraphIndex = 0
        signature.inputs, signature.outputs = [_tensor_map(s, *x)], [_tensor_map(s, *y)]
        model = s.ModelT()
        model.version = 3
        model.description = "edgeship MLP"
        model.operatorCodes, model.subgraphs, model.buffers = codes, [subgraph], self.buffers
        model.signatureDefs = [signature]
        builder = flatbuffers.Builder(1024)
        builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
        return bytes(builder.Output())


def _tensor_map(s: Any, name: str, index: int) -> Any:
    m = s.TensorMapT()
    m.name, m.tensorIndex = name, index
    return m
