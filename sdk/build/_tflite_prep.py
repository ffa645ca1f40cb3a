"""Make a TFLite model as exporters write it quantizable by litert-quantizer.

* :func:`with_signature`: litert-quantizer's calibrator feeds a model through a signature
  runner only; many published .tflite files (converted before signatures existed, or by
  other tools) have none. The interpreter's own inputs and outputs (subgraph 0's, named by
  their tensors) make a ``serving_default`` signature; nothing else changes.
* :func:`float32_weights`: float16 models (MediaPipe's, TFLite's "float16 quantization")
  hold each weight as a float16 constant behind a DEQUANTIZE op, which the quantizer
  leaves alone: nothing would be quantized. The constant becomes the float32 tensor the
  op produced, and the op goes; the arithmetic is unchanged (float16 -> float32 is exact).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SIGNATURE_KEY", "float32_weights", "with_signature"]

SIGNATURE_KEY = "serving_default"


def with_signature(src: Path, out: Path) -> bool:
    """Write ``src`` with a ``serving_default`` SignatureDef over subgraph 0's inputs and
    outputs to ``out``; ``False`` (nothing written) when ``src`` has a signature already.

    Raises:
        ValueError: ``src`` is not a TFLite flatbuffer this reader understands.
    """
    from ai_edge_litert import schema_py_generated as s  # noqa: PLC0415 - loaded when used
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    if model.signatureDefs:
        return False
    graph = model.subgraphs[0]

    def tensor_maps(indices: list[int]) -> list[object]:
        maps = []
        for i in indices:
            m = s.TensorMapT()
            name = graph.tensors[i].name
            m.name = name.decode("utf-8") if isinstance(name, bytes) else name
            m.tensorIndex = i
            maps.append(m)
        return maps

    signature = s.SignatureDefT()
    signature.signatureKey = SIGNATURE_KEY
    signature.subgraphIndex = 0
    signature.inputs = tensor_maps(list(graph.inputs))
    signature.outputs = tensor_maps(list(graph.outputs))
    model.signatureDefs = [signature]
    out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return True


def float32_weights(src: Path, out: Path) -> int:
    """Write ``src`` with its float16 weights as float32 constants to ``out``; the number
    of weights converted (0: nothing written).

    Raises:
        ValueError: ``src`` is not a TFLite flatbuffer this reader understands.
    """
    import numpy as np  # noqa: PLC0415 - loaded when used
    from ai_edge_litert import schema_py_generated as s  # noqa: PLC0415
    from ai_edge_litert.tools import flatbuffer_utils  # noqa: PLC0415

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(src.read_bytes()))
    codes = [c.builtinCode for c in model.operatorCodes]
    converted = 0
    for graph in model.subgraphs:
        kept = []
        for op in graph.operators:
            source = graph.tensors[op.inputs[0]] if len(op.inputs) == 1 else None
            data = None if source is None else model.buffers[source.buffer].data
            if (
                codes[op.opcodeIndex] != s.BuiltinOperator.DEQUANTIZE
                or source is None
                or source.type != s.TensorType.FLOAT16
                or data is None
                or len(data) == 0
            ):
                kept.append(op)
                continue
            weights = np.frombuffer(bytes(data), np.float16).astype(np.float32)
            buffer = s.BufferT()
            buffer.data = np.frombuffer(weights.tobytes(), np.uint8)
            model.buffers.append(buffer)
            graph.tensors[op.outputs[0]].buffer = len(model.buffers) - 1
            # The float16 copy is now read by no op: drop its bytes (buffer 0 is empty).
            model.buffers[source.buffer] = s.BufferT()
            source.buffer = 0
            converted += 1
        graph.operators = kept
    if converted:
        out.write_bytes(bytes(flatbuffer_utils.convert_object_to_bytearray(model)))
    return converted
