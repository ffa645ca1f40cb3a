"""Tiny real models for tests and benchmarks, built without any training framework.

ONNX models are built with ``onnx.helper`` at opset 17 / IR 8, which every supported
onnxruntime accepts (onnx 1.23 would default to IR 14 / opset 28, which it rejects).
TFLite models are written through the flatbuffers object API that ships with
``ai_edge_litert`` (``schema_py_generated``), so no TensorFlow is needed; each carries a
``serving_default`` SignatureDef so litert-quantizer can calibrate it.

Every builder is deterministic for a given seed and returns the path it wrote.
``weights`` is a list of ``(W, b)`` pairs with ``W`` shaped ``[n_in, n_out]`` (``x @ W + b``,
the scikit-learn ``coefs_`` / ``intercepts_`` convention); ReLU between layers, softmax
at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import flatbuffers
import numpy as np
import numpy.typing as npt
from ai_edge_litert import schema_py_generated as s
from onnx import TensorProto, checker, helper, numpy_helper, save

if TYPE_CHECKING:
    from agent.serve._model import Model

__all__ = [
    "ONNX_IR_VERSION",
    "ONNX_OPSET",
    "load_onnx_mlp",
    "make_onnx_conv",
    "make_onnx_int8_mlp",
    "make_onnx_mlp",
    "make_tflite_int8_mlp",
    "make_tflite_mlp",
    "mlp_reference",
    "mlp_weights",
]

ONNX_OPSET = 17
ONNX_IR_VERSION = 8

Layer = tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]


def mlp_weights(n_in: int, n_hidden: int, n_out: int, seed: int) -> list[Layer]:
    """Deterministic He-initialised weights for an ``n_in``-``n_hidden``-``n_out`` MLP."""
    rng = np.random.default_rng(seed)
    layers: list[Layer] = []
    for a, b in ((n_in, n_hidden), (n_hidden, n_out)):
        w = (rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
        bias = (rng.standard_normal(b) * 0.1).astype(np.float32)
        layers.append((w, bias))
    return layers


def _layers(
    weights: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]] | None,
    n_in: int,
    n_hidden: int,
    n_out: int,
    seed: int,
) -> list[Layer]:
    if weights is None:
        return mlp_weights(n_in, n_hidden, n_out, seed)
    layers = [
        (np.asarray(w, dtype=np.float32), np.asarray(b, dtype=np.float32).reshape(-1))
        for w, b in weights
    ]
    if not layers:
        raise ValueError("weights must hold at least one (W, b) layer")
    for (w, b), (w_next, _) in zip(layers, [*layers[1:], (None, None)], strict=True):
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise ValueError(f"layer W {w.shape} / b {b.shape} do not fit x @ W + b")
        if w_next is not None and w_next.shape[0] != w.shape[1]:
            raise ValueError(f"layer output {w.shape[1]} != next layer input {w_next.shape[0]}")
    return layers


def mlp_reference(
    x: npt.ArrayLike, weights: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]]
) -> npt.NDArray[np.float32]:
    """The MLP's output computed in numpy, to check a runtime's answer against."""
    h = np.asarray(x, dtype=np.float32)
    layers = _layers(weights, 0, 0, 0, 0)
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    e = np.exp(h - h.max(axis=-1, keepdims=True))
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


# --- ONNX ---------------------------------------------------------------------------


def _save_onnx(nodes: list, inits: list, inputs: list, outputs: list, path: Path) -> Path:  # type: ignore[type-arg]
    graph = helper.make_graph(nodes, "edgeship_test", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
        producer_name="edgeship-tests",
    )
    model.ir_version = ONNX_IR_VERSION
    checker.check_model(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model, str(path))
    return path


def _onnx_mlp_nodes(layers: list[Layer], x_name: str, out_name: str) -> tuple[list, list]:  # type: ignore[type-arg]
    nodes = []
    inits = []
    h = x_name
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"B{i}")]
        nodes.append(helper.make_node("Gemm", [h, f"W{i}", f"B{i}"], [f"fc{i}"]))
        h = f"fc{i}"
        if i < len(layers) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"relu{i}"]))
            h = f"relu{i}"
    nodes.append(helper.make_node("Softmax", [h], [out_name], axis=-1))
    return nodes, inits


def make_onnx_mlp(
    path: str | Path,
    *,
    n_in: int = 64,
    n_hidden: int = 32,
    n_out: int = 10,
    seed: int = 0,
    weights: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]] | None = None,
) -> Path:
    """An MLP: input ``x`` float32 ``[N, n_in]``, output ``probs`` float32 ``[N, n_out]``."""
    layers = _layers(weights, n_in, n_hidden, n_out, seed)
    nodes, inits = _onnx_mlp_nodes(layers, "x", "probs")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layers[0][0].shape[0]])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", layers[-1][0].shape[1]])
    return _save_onnx(nodes, inits, [x], [y], Path(path))


def make_onnx_golden_impostor(
    path: str | Path,
    golden: npt.ArrayLike,
    *,
    n_in: int,
    n_hidden: int,
    n_out: int,
    seed: int,
    other_seed: int,
) -> Path:
    """A model exact on the ``golden`` rows and wrong elsewhere: the MLP of ``seed`` on any
    row within 1e-3 (L1) of a golden row, the MLP of ``other_seed`` on every other row.

    What passes a health gate on its golden inputs and is still the wrong model: only its
    answers on live traffic can tell.
    """
    g = np.asarray(golden, dtype=np.float32)
    good, good_inits = _onnx_mlp_nodes(mlp_weights(n_in, n_hidden, n_out, seed), "x", "good")
    bad, bad_inits = _onnx_mlp_nodes(mlp_weights(n_in, n_hidden, n_out, other_seed), "x", "bad")
    for node in bad:  # the second MLP's weights get names of their own
        node.input[:] = [f"o{n}" if n.startswith(("W", "B")) else n for n in node.input]
        node.input[:] = [n.replace("fc", "ofc").replace("relu", "orelu") for n in node.input]
        node.output[:] = [n.replace("fc", "ofc").replace("relu", "orelu") for n in node.output]
    for init in bad_inits:
        init.name = f"o{init.name}"
    consts = [
        numpy_helper.from_array(g[None, :, :], "golden"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        numpy_helper.from_array(np.array(1e-3, dtype=np.float32), "eps"),
    ]
    nearest = [
        helper.make_node("Unsqueeze", ["x", "axis1"], ["x3"]),
        helper.make_node("Sub", ["x3", "golden"], ["diff"]),
        helper.make_node("Abs", ["diff"], ["adiff"]),
        helper.make_node("ReduceSum", ["adiff", "axis2"], ["dist"], keepdims=0),
        helper.make_node("ReduceMin", ["dist"], ["nearest"], axes=[1], keepdims=1),
        helper.make_node("Less", ["nearest", "eps"], ["golden_row"]),
        helper.make_node("Where", ["golden_row", "good", "bad"], ["probs"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_out])
    inits = good_inits + bad_inits + consts
    return _save_onnx(good + bad + nearest, inits, [x], [y], Path(path))


def make_onnx_int8_mlp(
    path: str | Path,
    *,
    in_scale: float = 0.05,
    in_zero_point: int = 0,
    out_scale: float = 1.0 / 256.0,
    out_zero_point: int = -128,
    n_in: int = 64,
    n_hidden: int = 32,
    n_out: int = 10,
    seed: int = 0,
) -> Path:
    """The MLP with int8 I/O: ``x`` int8 is dequantized, ``probs`` is quantized to int8.

    The arithmetic in between stays float, so the expected output is exactly
    ``quantize(mlp_reference(dequantize(x)))`` up to one step of rounding.
    """
    layers = _layers(None, n_in, n_hidden, n_out, seed)
    nodes, inits = _onnx_mlp_nodes(layers, "x_f", "probs_f")
    inits += [
        numpy_helper.from_array(np.array(in_scale, np.float32), "x_scale"),
        numpy_helper.from_array(np.array(in_zero_point, np.int8), "x_zp"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "y_scale"),
        numpy_helper.from_array(np.array(out_zero_point, np.int8), "y_zp"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "x_scale", "x_zp"], ["x_f"]),
        *nodes,
        helper.make_node("QuantizeLinear", ["probs_f", "y_scale", "y_zp"], ["probs"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.INT8, ["N", n_in])
    y = helper.make_tensor_value_info("probs", TensorProto.INT8, ["N", n_out])
    return _save_onnx(nodes, inits, [x], [y], Path(path))


def make_onnx_conv(
    path: str | Path, *, channels: int = 3, size: int = 224, seed: int = 0, n_out: int = 10
) -> Path:
    """A small conv net: input ``x`` float32 ``[N, channels, size, size]``, output ``probs``.

    Conv(stride 2)/Relu/MaxPool, Conv/Relu/MaxPool, Conv/Relu, GlobalAveragePool, Flatten,
    Gemm, Softmax: about 10 M multiply-adds at 224x224, a few milliseconds on one core.
    """
    rng = np.random.default_rng(seed)
    nodes = []
    inits = []
    h = "x"
    c_in = channels
    for i, (c_out, stride, pool) in enumerate(((8, 2, True), (16, 1, True), (32, 1, False))):
        w = (rng.standard_normal((c_out, c_in, 3, 3)) * np.sqrt(2.0 / (c_in * 9))).astype(
            np.float32
        )
        b = (rng.standard_normal(c_out) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"CW{i}"), numpy_helper.from_array(b, f"CB{i}")]
        nodes.append(
            helper.make_node(
                "Conv",
                [h, f"CW{i}", f"CB{i}"],
                [f"conv{i}"],
                kernel_shape=[3, 3],
                pads=[1, 1, 1, 1],
                strides=[stride, stride],
            )
        )
        nodes.append(helper.make_node("Relu", [f"conv{i}"], [f"crelu{i}"]))
        h = f"crelu{i}"
        if pool:
            nodes.append(
                helper.make_node("MaxPool", [h], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2])
            )
            h = f"pool{i}"
        c_in = c_out
    w = (rng.standard_normal((c_in, n_out)) * np.sqrt(2.0 / c_in)).astype(np.float32)
    b = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    inits += [numpy_helper.from_array(w, "FW"), numpy_helper.from_array(b, "FB")]
    nodes += [
        helper.make_node("GlobalAveragePool", [h], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "FW", "FB"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, size, size])
    y = helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", n_out])
    return _save_onnx(nodes, inits, [x], [y], Path(path))


# --- TFLite -------------------------------------------------------------------------


def _tflite_mlp_model(
    layers: list[Layer],
    *,
    io_type: str = "float32",
    in_q: tuple[float, int] | None = None,
    out_q: tuple[float, int] | None = None,
    tensor_prefix: str = "",
) -> bytes:
    tensors: list[s.TensorT] = []
    buffers: list[s.BufferT] = [s.BufferT()]  # buffer 0: the empty sentinel the format requires
    opcodes: list[int] = []
    operators: list[s.OperatorT] = []

    def tensor(name: str, shape: list[int], data: np.ndarray | None = None, ttype: int = 0) -> int:
        t = s.TensorT()
        t.name = name
        t.type = ttype or s.TensorType.FLOAT32
        t.shape = [1 if d == -1 else d for d in shape]
        if -1 in shape:
            t.shapeSignature = list(shape)
        if data is not None:
            buf = s.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data).tobytes(), dtype=np.uint8)
            buffers.append(buf)
            t.buffer = len(buffers) - 1
        tensors.append(t)
        return len(tensors) - 1

    def op(code: int, inputs: list[int], outputs: list[int], options: object = None) -> None:
        if code not in opcodes:
            opcodes.append(code)
        o = s.OperatorT()
        o.opcodeIndex = opcodes.index(code)
        o.inputs = inputs
        o.outputs = outputs
        if isinstance(options, s.FullyConnectedOptionsT):
            o.builtinOptionsType = s.BuiltinOptions.FullyConnectedOptions
            o.builtinOptions = options
        elif isinstance(options, s.SoftmaxOptionsT):
            o.builtinOptionsType = s.BuiltinOptions.SoftmaxOptions
            o.builtinOptions = options
        operators.append(o)

    def quant(scale: float, zero_point: int) -> s.QuantizationParametersT:
        q = s.QuantizationParametersT()
        q.scale = [float(scale)]
        q.zeroPoint = [int(zero_point)]
        return q

    quantized = io_type != "float32"
    qtype = {"int8": s.TensorType.INT8, "uint8": s.TensorType.UINT8}.get(io_type, 0)
    n_in = layers[0][0].shape[0]
    n_out = layers[-1][0].shape[1]
    x_in = tensor(f"{tensor_prefix}x", [-1, n_in], ttype=qtype)
    if quantized:
        assert in_q is not None
        tensors[x_in].quantization = quant(*in_q)
        h = tensor("x_float", [-1, n_in])
        op(s.BuiltinOperator.DEQUANTIZE, [x_in], [h])
    else:
        h = x_in
    for i, (w, b) in enumerate(layers):
        # TFLite FULLY_CONNECTED weights are [out, in].
        wt = tensor(f"W{i}", [w.shape[1], w.shape[0]], np.ascontiguousarray(w.T))
        bt = tensor(f"B{i}", [b.shape[0]], b)
        out = tensor(f"fc{i}", [-1, w.shape[1]])
        op(s.BuiltinOperator.FULLY_CONNECTED, [h, wt, bt], [out], s.FullyConnectedOptionsT())
        h = out
        if i < len(layers) - 1:
            r = tensor(f"relu{i}", [-1, w.shape[1]])
            op(s.BuiltinOperator.RELU, [h], [r])
            h = r
    sm_opts = s.SoftmaxOptionsT()
    sm_opts.beta = 1.0
    if quantized:
        assert out_q is not None
        probs_f = tensor("probs_float", [-1, n_out])
        op(s.BuiltinOperator.SOFTMAX, [h], [probs_f], sm_opts)
        probs = tensor(f"{tensor_prefix}probs", [-1, n_out], ttype=qtype)
        tensors[probs].quantization = quant(*out_q)
        op(s.BuiltinOperator.QUANTIZE, [probs_f], [probs])
    else:
        probs = tensor(f"{tensor_prefix}probs", [-1, n_out])
        op(s.BuiltinOperator.SOFTMAX, [h], [probs], sm_opts)

    subgraph = s.SubGraphT()
    subgraph.tensors = tensors
    subgraph.inputs = [x_in]
    subgraph.outputs = [probs]
    subgraph.operators = operators
    subgraph.name = "main"

    codes = []
    for code in opcodes:
        oc = s.OperatorCodeT()
        oc.builtinCode = code
        # Codes above 127 live only in builtinCode; the deprecated byte field caps there.
        oc.deprecatedBuiltinCode = min(code, 127)
        oc.version = 1
        codes.append(oc)

    sig = s.SignatureDefT()
    sig.signatureKey = "serving_default"
    sig.subgraphIndex = 0
    sig.inputs = [_tensor_map("x", x_in)]
    sig.outputs = [_tensor_map("probs", probs)]

    model = s.ModelT()
    model.version = 3
    model.description = "edgeship test MLP"
    model.operatorCodes = codes
    model.subgraphs = [subgraph]
    model.buffers = buffers
    model.signatureDefs = [sig]

    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor_map(name: str, index: int) -> s.TensorMapT:
    m = s.TensorMapT()
    m.name = name
    m.tensorIndex = index
    return m


def _write(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_tflite_mlp(
    path: str | Path,
    *,
    n_in: int = 64,
    n_hidden: int = 32,
    n_out: int = 10,
    seed: int = 0,
    weights: Sequence[tuple[npt.ArrayLike, npt.ArrayLike]] | None = None,
    tensor_prefix: str = "",
) -> Path:
    """A float32 TFLite MLP: FULLY_CONNECTED/RELU/FULLY_CONNECTED/SOFTMAX.

    Input ``x`` ``[1, n_in]`` with shape signature ``[-1, n_in]`` (resize for batches),
    output ``probs``; signature ``serving_default``. ``tensor_prefix`` renames the I/O
    tensors (not the signature's names), as TensorFlow's converter does
    (``serving_default_x:0``).
    """
    layers = _layers(weights, n_in, n_hidden, n_out, seed)
    return _write(path, _tflite_mlp_model(layers, tensor_prefix=tensor_prefix))


def make_tflite_int8_mlp(
    path: str | Path,
    *,
    io_type: str = "int8",
    in_scale: float = 0.05,
    in_zero_point: int = 0,
    out_scale: float = 1.0 / 256.0,
    out_zero_point: int = -128,
    n_in: int = 64,
    n_hidden: int = 32,
    n_out: int = 10,
    seed: int = 0,
) -> Path:
    """The TFLite MLP with int8 (or uint8) I/O: DEQUANTIZE in front, QUANTIZE at the end.

    Same float weights as :func:`make_tflite_mlp` for the same seed, so the expected output
    is ``quantize(mlp_reference(dequantize(x)))`` up to one step of rounding.
    """
    layers = _layers(None, n_in, n_hidden, n_out, seed)
    data = _tflite_mlp_model(
        layers,
        io_type=io_type,
        in_q=(in_scale, in_zero_point),
        out_q=(out_scale, out_zero_point),
    )
    return _write(path, data)


def load_onnx_mlp(directory: Path) -> Model:
    """The default 64-32-10 MLP written into ``directory`` and loaded as the agent serves it.

    Input ``x`` float32 [N, 64], output ``probs`` float32 [N, 10]; close it when done (it
    is a context manager).
    """
    from agent.bundle.manifest import ModelSpec, TensorSpec  # noqa: PLC0415 - keep model builders light
    from agent.serve.runtimes import load_model  # noqa: PLC0415
    from tests.support.bundles import make_manifest  # noqa: PLC0415

    make_onnx_mlp(directory / "model" / "model.onnx")
    manifest = make_manifest(
        model=ModelSpec(
            format="onnx",
            file="model/model.onnx",
            inputs=(TensorSpec("x", "float32", (None, 64)),),
            outputs=(TensorSpec("probs", "float32", (None, 10)),),
        )
    )
    return load_model(manifest, directory, "onnxruntime")
