"""The Python API for predictions: :class:`Model`, one loaded model behind any runtime.

A :class:`Model` validates every request against the manifest (:mod:`agent.serve._validation`),
quantizes float inputs and dequantizes outputs of int8/uint8 tensors that carry
quantization parameters in the manifest, and calls the runtime. Everything that depends
only on the manifest is computed at load time; a call on an unquantized model costs the
validation and one dictionary more than the raw runtime call.

Models are created by :func:`agent.serve.runtimes.load_model`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import ModelSpec, QuantParams
from agent.errors import InferenceError, MalformedManifestError
from agent.plumbing.compat import zip_strict
from agent.serve._validation import InputPolicy, InputValidator

__all__ = ["Backend", "Model"]

Arrays = dict[str, npt.NDArray[Any]]


class Backend(Protocol):
    """What a runtime adapter provides: a run function over validated model-dtype arrays."""

    @property
    def runtime(self) -> str:
        """The runtime's name (``onnxruntime``, ``litert``, ``tflite-runtime``)."""
        ...

    @property
    def provider(self) -> str:
        """The execution provider (onnxruntime) or delegate (TFLite) it runs on."""
        ...

    @property
    def errors(self) -> tuple[type[BaseException], ...]:
        """Exception types the runtime raises for a failed run."""
        ...

    def run(self, feed: Arrays) -> Sequence[npt.NDArray[Any]]:
        """The outputs, in the order of the model spec's outputs. Thread-safe."""
        ...

    def close(self) -> None:
        """Release the runtime's resources; calls in flight may finish first."""
        ...


class Model:
    """A loaded model. ``predict`` is thread-safe; ``close`` releases the runtime.

    Attributes:
        spec: the manifest's model section (file, inputs and outputs).
        runtime: the name of the runtime executing it.
        provider: the execution provider or delegate it runs on.
        policy: the input limits every request is checked against.
    """

    def __init__(self, spec: ModelSpec, backend: Backend, policy: InputPolicy | None = None):
        """Wrap ``backend``, which runs the model ``spec`` describes.

        Raises:
            MalformedManifestError: a non-integer tensor carries quantization parameters.
        """
        self.spec = spec
        self.runtime = backend.runtime
        self.provider = backend.provider
        self._backend = backend
        self._validate = InputValidator(spec.inputs, policy)
        self.policy = self._validate.policy
        self._errors = backend.errors
        self._output_names = tuple(o.name for o in spec.outputs)
        self._quant_in = tuple(
            (s.name, s.quantization, _int_range(s.dtype))
            for s in spec.inputs
            if s.quantization is not None
        )
        self._quant_out = tuple(
            (s.name, s.quantization) for s in spec.outputs if s.quantization is not None
        )
        self._run = backend.run

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """Run the model on one request: input name -> array, output name -> array.

        Quantized tensors are exchanged as float32 (real values); every other tensor in
        its manifest dtype.

        Raises:
            InputValidationError: the request does not fit the model's input signature.
            InferenceError: the runtime failed, or the model is closed.
        """
        feed = self._validate(inputs)
        for name, q, (dtype, lo, hi) in self._quant_in:
            feed[name] = _quantize(feed[name], q, dtype, lo, hi)
        try:
            outputs = self._run(feed)
        except self._errors as exc:
            raise InferenceError(f"{self.runtime} failed to run {self.spec.file}: {exc}") from exc
        result = dict(zip_strict(self._output_names, outputs))
        for name, q in self._quant_out:
            result[name] = _dequantize(result[name], q)
        return result

    def close(self) -> None:
        """Release the runtime. Calls already running finish; later calls raise."""
        self._run = _closed
        self._backend.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.spec.file!r}, runtime={self.runtime!r})"


def _closed(feed: Arrays) -> NoReturn:
    raise InferenceError("the model is closed; load it again")


def _int_range(dtype: str) -> tuple[np.dtype[Any], int, int]:
    dt = np.dtype(dtype)
    if dt.kind not in "iu":
        raise MalformedManifestError(
            f"the manifest gives quantization parameters for a {dtype} tensor;"
            " only int8/uint8/int16/... tensors can be quantized"
        )
    info = np.iinfo(dt)
    return dt, int(info.min), int(info.max)


def _quantize(
    a: npt.NDArray[Any], q: QuantParams, dtype: np.dtype[Any], lo: int, hi: int
) -> npt.NDArray[Any]:
    # real = scale * (q - zero_point); values beyond the integer range saturate, as the
    # runtimes' own QUANTIZE ops do.
    scaled = np.rint(a / np.float32(q.scale)) + np.float32(q.zero_point)
    return np.clip(scaled, lo, hi).astype(dtype)


def _dequantize(a: npt.NDArray[Any], q: QuantParams) -> npt.NDArray[np.float32]:
    return (a.astype(np.float32) - np.float32(q.zero_point)) * np.float32(q.scale)
