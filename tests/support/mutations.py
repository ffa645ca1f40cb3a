"""Damage an ONNX model's weights a little, as a corrupted download, a wrong export or a
bad merge would: the health gate must notice (tests/sdk/build/test_golden_mutation.py,
bench/real_models.py).

Weights are the float initializers and Constant-node values of at least 16 elements, in
the main graph and in every subgraph (``If`` / ``Loop`` branches hold the weights of some
exports).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["perturb_weights", "zero_largest_layer"]

_MIN_ELEMENTS = 16


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(a.g)
            for g in a.graphs:
                yield from _graphs(g)


def _weights(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    tensors = [t for g in _graphs(model.graph) for t in g.initializer]
    # Some exporters (PaddlePaddle's) hold every weight in a Constant node.
    tensors += [
        a.t
        for g in _graphs(model.graph)
        for n in g.node
        if n.op_type == "Constant"
        for a in n.attribute
        if a.name == "value"
    ]
    return [
        t
        for t in tensors
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
        and int(np.prod(t.dims)) >= _MIN_ELEMENTS
    ]


def _set(t: onnx.TensorProto, array: np.ndarray) -> None:
    t.CopyFrom(numpy_helper.from_array(array.astype(numpy_helper.to_array(t).dtype), t.name))


def perturb_weights(src: Path, dst: Path, *, share: float = 0.02, seed: int = 3) -> Path:
    """``share`` of every weight tensor's elements moved by one standard deviation of
    that tensor, up or down at random."""
    model = onnx.load(str(src))
    rng = np.random.default_rng(seed)
    for t in _weights(model):
        w = numpy_helper.to_array(t).astype(np.float32).copy()
        flat = w.reshape(-1)
        idx = rng.choice(flat.size, max(1, int(flat.size * share)), replace=False)
        flat[idx] += np.float32(w.std() or 1.0) * rng.choice([-1.0, 1.0], idx.size)
        _set(t, w)
    onnx.save(model, str(dst))
    return dst


def zero_largest_layer(src: Path, dst: Path) -> Path:
    """The largest weight tensor set to zero: one layer that computes nothing."""
    model = onnx.load(str(src))
    largest = max(_weights(model), key=lambda t: int(np.prod(t.dims)))
    _set(largest, np.zeros(tuple(largest.dims), np.float32))
    onnx.save(model, str(dst))
    return dst
