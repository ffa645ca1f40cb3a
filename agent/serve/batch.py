"""Offline batches: run a model over a file of inputs and write a file of outputs.

What ``edgeship-agent predict`` does (:func:`predict_files`, and the readers and writers
it uses), as a library: an application or the installed-agent flow can call it with a
store directory.

Input files: ``.npz`` (one array per input name), ``.json`` (an object mapping input names
to nested lists, or a bare nested list for a single-input model), ``.npy`` (one array, for
a single-input model). Output files take the same forms, ``.npy`` only for a single-output
model. Arrays are loaded without pickle.
"""

from __future__ import annotations

import json
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.bundle import DeviceInfo, check_compatibility
from agent.bundle.manifest import Manifest, ModelSpec
from agent.errors import (
    CompatibilityError,
    InferenceError,
    InputValidationError,
    RuntimeUnavailableError,
)
from agent.plumbing.files import atomic_replace
from agent.serve._model import Model
from agent.serve._validation import InputPolicy
from agent.serve.runtimes import RuntimeOptions, installed_runtimes, load_model

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = [
    "PredictSummary",
    "choose_runtime",
    "predict_batches",
    "predict_files",
    "read_inputs",
    "write_outputs",
]

Arrays = dict[str, npt.NDArray[Any]]
_SUFFIXES = (".npy", ".npz", ".json")


@dataclass(frozen=True)
class PredictSummary:
    runtime: str
    rows: int  # length of the first dimension of the first input
    outputs: tuple[str, ...]
    seconds: float


def choose_runtime(manifest: Manifest) -> str:
    """The first runtime in the manifest's preference order that is installed here.

    Architecture and device class are not checked: installing does that; this is for
    running an already-installed or extracted bundle.

    Raises:
        RuntimeUnavailableError: none of the runtimes the manifest allows is installed
            (at a compatible version); the message names the extras to install.
    """
    relaxed = replace(
        manifest, compatibility=replace(manifest.compatibility, arch=(), device_classes=())
    )
    try:
        return check_compatibility(relaxed, DeviceInfo(runtimes=installed_runtimes()))
    except CompatibilityError as exc:
        raise RuntimeUnavailableError(str(exc)) from exc


def read_inputs(path: Path, spec: ModelSpec) -> Arrays:
    """The arrays in an input file, keyed by input name (not yet validated).

    Raises:
        InputValidationError: unreadable file, unknown suffix, or content that is not
            arrays keyed by input names.
    """
    suffix = path.suffix.lower()
    names = [s.name for s in spec.inputs]
    try:
        if suffix == ".npy":
            if len(names) != 1:
                raise InputValidationError(
                    f"{path}: a .npy file holds one array but the model takes inputs"
                    f" {', '.join(names)}; use .npz or .json"
                )
            return {names[0]: np.load(path, allow_pickle=False)}
        if suffix == ".npz":
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise InputValidationError(f"{path} is not an .npz archive")
            with loaded:
                return {key: loaded[key] for key in loaded.files}
        if suffix == ".json":
            with path.open("rb") as f:
                doc = json.load(f)
            if isinstance(doc, list) and len(names) == 1:
                doc = {names[0]: doc}
            if not isinstance(doc, dict):
                raise InputValidationError(
                    f"{path}: expected a JSON object mapping input names"
                    f" ({', '.join(names)}) to nested lists"
                )
            return {str(key): _json_array(path, key, value) for key, value in doc.items()}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        # json.JSONDecodeError is a ValueError; so is numpy's refusal to unpickle.
        raise InputValidationError(f"cannot read inputs from {path}: {exc}") from exc
    raise InputValidationError(f"{path}: input files must end in {', '.join(_SUFFIXES)}")


def _json_array(path: Path, key: str, value: object) -> npt.NDArray[Any]:
    try:
        a = np.asarray(value)
    except ValueError as exc:
        raise InputValidationError(f"{path}: input {key!r} is not a rectangular array") from exc
    if a.dtype.kind not in "biuf":
        raise InputValidationError(f"{path}: input {key!r} must hold numbers only")
    return a


def write_outputs(path: Path, outputs: Mapping[str, npt.NDArray[Any]]) -> None:
    """Write ``outputs`` atomically (temp file, fsync, rename) in the suffix's format.

    Raises:
        InferenceError: unknown suffix, .npy for several outputs, or the file cannot be
            written.
    """
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InferenceError(f"{path}: output files must end in {', '.join(_SUFFIXES)}")
    if suffix == ".npy" and len(outputs) != 1:
        raise InferenceError(
            f"{path}: the model has outputs {', '.join(outputs)}; a .npy file holds one,"
            " use .npz or .json"
        )
    path = path.absolute()
    try:
        with atomic_replace(path) as f:
            if suffix == ".npy":
                np.save(f, next(iter(outputs.values())), allow_pickle=False)
            elif suffix == ".npz":
                # What np.savez writes, without its keyword arguments, which an output
                # named "file" or "allow_pickle" would collide with.
                with zipfile.ZipFile(f, "w") as zf:
                    for name, array in outputs.items():
                        with zf.open(f"{name}.npy", "w") as member:
                            np.lib.format.write_array(member, array, allow_pickle=False)
            else:
                f.write(json.dumps({k: v.tolist() for k, v in outputs.items()}).encode())
    except OSError as exc:
        raise InferenceError(f"cannot write outputs to {path}: {exc}") from exc


def predict_batches(model: Model, inputs: Arrays, batch_size: int | None = None) -> Arrays:
    """Run ``model`` over ``inputs``, ``batch_size`` rows (first dimension) at a time.

    Raises:
        InputValidationError: batching a model whose first dimension is not dynamic, or
            inputs of different lengths; or any request the model's validation refuses.
        InferenceError: the runtime failed.
    """
    if batch_size is None:
        return model.predict(inputs)
    if batch_size < 1:
        raise InputValidationError("the batch size must be at least 1")
    tensors = model.spec.inputs + model.spec.outputs
    fixed = [t.name for t in tensors if not t.shape or t.shape[0] is not None]
    if fixed:
        raise InputValidationError(
            f"cannot split into batches: {', '.join(fixed)} has no dynamic first dimension"
        )
    lengths = {len(a) if a.ndim else 0 for a in inputs.values()}
    if len(lengths) != 1:
        raise InputValidationError(
            "cannot split into batches: inputs have different lengths along the first"
            f" dimension ({', '.join(f'{k}: {a.shape}' for k, a in inputs.items())})"
        )
    rows = lengths.pop()
    parts: dict[str, list[npt.NDArray[Any]]] = {o.name: [] for o in model.spec.outputs}
    for start in range(0, rows, batch_size):
        result = model.predict({k: a[start : start + batch_size] for k, a in inputs.items()})
        for name, part in result.items():
            parts[name].append(part)
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def predict_files(
    manifest: Manifest,
    model_dir: Path,
    input_path: Path,
    output_path: Path,
    *,
    runtime: str | None = None,
    options: RuntimeOptions | None = None,
    policy: InputPolicy | None = None,
    batch_size: int | None = None,
    key: DeviceKey | None = None,
) -> PredictSummary:
    """Load the model, predict on ``input_path``, write ``output_path``.

    Raises:
        RuntimeUnavailableError: no usable runtime (see :func:`choose_runtime`).
        HealthCheckError: the model file does not load or does not match the manifest.
        InputValidationError: the input file is unreadable or does not fit the model.
        InferenceError: the runtime failed, or the output cannot be written.
    """
    start = time.perf_counter()
    runtime = runtime or choose_runtime(manifest)
    inputs = read_inputs(input_path, manifest.model)
    with load_model(manifest, model_dir, runtime, options, policy=policy, key=key) as model:
        outputs = predict_batches(model, inputs, batch_size)
    write_outputs(output_path, outputs)
    first = next(iter(inputs.values()), None)
    return PredictSummary(
        runtime=runtime,
        rows=len(first) if first is not None and first.ndim else 0,
        outputs=tuple(outputs),
        seconds=time.perf_counter() - start,
    )
