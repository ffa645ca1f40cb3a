"""The TFLite adapter, for LiteRT (``ai_edge_litert``) and the legacy ``tflite_runtime``.

Both expose the same ``Interpreter`` API. An interpreter is not thread-safe and holds one
set of tensor shapes, so calls are serialized by a lock and a batch of a new size resizes
the inputs (and reallocates) first. One lock rather than one interpreter per thread: a
device usually has few cores, which the runtime's own threads already use, and every extra
interpreter costs the model's activation memory again.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.bundle.manifest import ModelSpec, QuantParams
from agent.errors import HealthCheckError, InferenceError, RuntimeUnavailableError
from agent.serve.runtimes._base import (
    Found,
    RuntimeOptions,
    check_signature,
    cpu_count,
    import_runtime,
)

_MODULES = {"litert": "ai_edge_litert.interpreter", "tflite-runtime": "tflite_runtime.interpreter"}


class TfliteBackend:
    """A TFLite ``Interpreter`` behind a lock."""

    errors: tuple[type[BaseException], ...] = (RuntimeError, ValueError)

    def __init__(
        self,
        runtime: str,
        spec: ModelSpec,
        source: bytes | Path,
        options: RuntimeOptions,
        threads: int | None,
    ) -> None:
        """Create the interpreter and check its signature against ``spec``.

        Manifest names may be the model's tensor names or the names of its (single, or
        ``serving_default``) signature, which converters keep cleaner
        (``x`` rather than ``serving_default_x:0``).

        Raises:
            RuntimeUnavailableError: the runtime is not installed.
            HealthCheckError: the model does not load, or differs from the manifest.
        """
        self.runtime = runtime
        module = import_runtime(runtime, _MODULES[runtime])
        kwargs: dict[str, Any] = (
            {"model_content": source} if isinstance(source, bytes) else {"model_path": str(source)}
        )
        self.provider = options.provider_for(runtime)
        if options.reference_kernels:
            kwargs["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_REF
        elif self.provider == "cpu":
            kwargs["experimental_op_resolver_type"] = (
                module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
            )
        elif self.provider != "xnnpack":
            kwargs["experimental_delegates"] = [
                _delegate(module, self.provider, options.provider_options.get(self.provider))
            ]
        load_errors: tuple[type[BaseException], ...] = (*self.errors, OSError)
        try:
            interp = module.Interpreter(
                **kwargs, num_threads=threads if threads is not None else cpu_count()
            )
            interp.allocate_tensors()
        except load_errors as exc:
            raise HealthCheckError(
                f"{runtime} cannot load {spec.file} with {self.provider}: {exc}"
            ) from exc
        inputs = _resolve(
            interp, interp.get_input_details(), "input", [s.name for s in spec.inputs]
        )
        outputs = _resolve(
            interp, interp.get_output_details(), "output", [s.name for s in spec.outputs]
        )
        for kind, declared, found in (
            ("input", spec.inputs, inputs),
            ("output", spec.outputs, outputs),
        ):
            check_signature(spec.file, kind, declared, {n: _found(d) for n, d in found.items()})
        self._inputs = tuple((s.name, int(inputs[s.name]["index"])) for s in spec.inputs)
        self._outputs = tuple(int(outputs[s.name]["index"]) for s in spec.outputs)
        self._shapes: dict[int, tuple[int, ...]] = {
            int(d["index"]): tuple(int(x) for x in d["shape"]) for d in inputs.values()
        }
        self._interp: Any = interp
        self._lock = threading.Lock()

    def run(self, feed: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        with self._lock:
            interp = self._interp
            if interp is None:
                raise InferenceError("the model is closed; load it again")
            shapes = self._shapes
            resized = False
            for name, index in self._inputs:
                shape = feed[name].shape
                if shape != shapes[index]:
                    if not resized:
                        # Until allocation succeeds the recorded shapes are unknown; an
                        # empty record makes the next call resize every input again.
                        self._shapes = shapes = dict.fromkeys(shapes, ())
                        resized = True
                    interp.resize_tensor_input(index, shape, strict=True)
            if resized:
                interp.allocate_tensors()
                self._shapes = {index: feed[name].shape for name, index in self._inputs}
            for name, index in self._inputs:
                interp.set_tensor(index, feed[name])
            interp.invoke()
            # get_tensor copies, so the result stays valid after the lock is released.
            return [interp.get_tensor(index) for index in self._outputs]

    def close(self) -> None:
        with self._lock:  # waits for the call in flight
            self._interp = None


def _delegate(module: Any, library: str, options: Mapping[str, str] | None) -> Any:
    """An external delegate (an accelerator's TFLite delegate library) to load with.

    Raises:
        RuntimeUnavailableError: the library is missing or refuses these options.
    """
    if not Path(library).is_absolute():
        raise RuntimeUnavailableError(
            f"unknown delegate {library!r}: use xnnpack, cpu or the absolute path of a"
            " delegate library"
        )
    if not Path(library).is_file():
        # Checked here: LiteRT's Delegate object raises again when collected after a
        # failed load, which would only add noise to the error.
        raise RuntimeUnavailableError(f"cannot load the delegate {library}: no such file")
    try:
        return module.load_delegate(library, dict(options or {}))
    except (ValueError, RuntimeError, OSError) as exc:
        raise RuntimeUnavailableError(f"cannot load the delegate {library}: {exc}") from exc


def _resolve(
    interp: Any, details: list[dict[str, Any]], kind: str, declared: list[str]
) -> dict[str, dict[str, Any]]:
    """The model's input (or output) tensors keyed by the names the manifest uses.

    A declared name matches a tensor name or a signature name; tensors nobody declared
    appear under their signature (else tensor) name, for check_signature to report.
    """
    by_index = {int(d["index"]): d for d in details}
    aliases: dict[str, int] = {d["name"]: int(d["index"]) for d in details}
    signatures = interp.get_signature_list()
    key = "serving_default" if "serving_default" in signatures else None
    if key is None and len(signatures) == 1:
        key = next(iter(signatures))
    signature_names: dict[int, str] = {}
    if key is not None:
        runner = interp.get_signature_runner(key)
        sig = runner.get_input_details() if kind == "input" else runner.get_output_details()
        signature_names = {int(d["index"]): name for name, d in sig.items()}
        aliases.update((name, index) for index, name in signature_names.items())
    resolved: dict[str, dict[str, Any]] = {}
    used: set[int] = set()
    for name in declared:
        # A tensor declared twice (under its tensor and its signature name) counts once.
        if name in aliases and aliases[name] not in used:
            resolved[name] = by_index[aliases[name]]
            used.add(aliases[name])
    for index, d in by_index.items():
        if index not in used:
            resolved[signature_names.get(index, d["name"])] = d
    return resolved


def _found(d: dict[str, Any]) -> Found:
    sig = d.get("shape_signature")
    dims = sig if sig is not None and len(sig) else d["shape"]
    q = d.get("quantization_parameters") or {}
    scales, zero_points = q.get("scales", ()), q.get("zero_points", ())
    quant = (
        QuantParams(float(scales[0]), int(zero_points[0]))
        if len(scales) == 1 and len(zero_points) == 1 and scales[0] != 0
        else None
    )
    return Found(
        dtype=np.dtype(d["dtype"]).name,
        shape=tuple(None if int(x) < 0 else int(x) for x in dims),
        quantization=quant,
    )
