"""One small interface over the device's inference runtimes.

``onnxruntime`` runs ONNX models; ``litert`` (``ai_edge_litert``) and the legacy
``tflite-runtime`` run TFLite models. Runtimes are imported only when a model is loaded,
so the agent starts (and ``installed_runtimes`` answers) without any of them.

    model = load_model(manifest, model_dir, "onnxruntime")
    outputs = model.predict({"x": batch})

:func:`load_model_file` loads a model file that has no manifest yet (the SDK measures
candidates with it, exactly as a device will run them).

:func:`agent.bundle.check_compatibility` picks the runtime from the manifest and
:func:`installed_runtimes`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle.manifest import FORMAT_RUNTIMES, Manifest, ModelSpec
from agent.bundle.payload import read_payload
from agent.errors import ConfigError, HealthCheckError, RuntimeUnavailableError
from agent.serve._model import Backend, Model
from agent.serve._validation import InputPolicy
from agent.serve.runtimes._base import (
    CPU_PROVIDERS,
    DEFAULT_PROVIDERS,
    RUNTIME_EXTRAS,
    SMALL_MODEL_ELEMENTS,
    RuntimeOptions,
    installed_runtimes,
    provider_chain,
    threads_for,
)

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = [
    "CPU_PROVIDERS",
    "DEFAULT_PROVIDERS",
    "RUNTIME_EXTRAS",
    "SMALL_MODEL_ELEMENTS",
    "InputPolicy",
    "Model",
    "RuntimeOptions",
    "installed_runtimes",
    "load_model",
    "load_model_file",
    "provider_chain",
]


def load_model(
    manifest: Manifest,
    model_dir: Path,
    runtime: str,
    options: RuntimeOptions | None = None,
    *,
    policy: InputPolicy | None = None,
    key: DeviceKey | None = None,
) -> Model:
    """Load ``model_dir / manifest.model.file`` into ``runtime``, ready to predict.

    The model's inputs and outputs are checked against the manifest here, so a bundle whose
    model does not match its manifest fails at install time, not at the first request.

    Args:
        manifest: the verified manifest; its ``model`` section describes the file.
        model_dir: the directory the bundle's payload was extracted to.
        runtime: ``onnxruntime``, ``litert`` or ``tflite-runtime``.
        options: threads, memory and the execution provider or delegate (the first one
            preferred: loading never falls back; default :class:`RuntimeOptions()`).
        policy: limits for every request (default :class:`InputPolicy()`).
        key: the device key that opens an encrypted bundle; the model is decrypted in
            memory and never written anywhere.

    Raises:
        RuntimeUnavailableError: the runtime is unknown, cannot run this model format, or
            is not installed (the message names the extra to install); or the provider
            or delegate is not available.
        HealthCheckError: the file is missing or does not load, or its signature differs
            from the manifest's.
        MalformedManifestError: the manifest quantizes a non-integer tensor.
        NotForThisDeviceError, DecryptionError: an encrypted bundle this key cannot open.
        ConfigError: an encrypted bundle with ``options.load_from_memory`` off.
    """
    spec = manifest.model
    path = Path(model_dir) / spec.file
    if manifest.encryption is None:
        return load_model_file(spec, path, runtime, options, policy=policy)
    options = options or RuntimeOptions()
    _check_runtime(spec, runtime)
    if not options.load_from_memory:
        raise ConfigError(
            "an encrypted model is decrypted in memory; set runtime.load_from_memory = true"
        )
    try:
        source = read_payload(manifest, model_dir, spec.file, key)
    except OSError as exc:
        raise HealthCheckError(f"cannot read the model file {path}: {exc}") from exc
    return _open(spec, source, runtime, options, policy)


def load_model_file(
    spec: ModelSpec,
    path: Path,
    runtime: str,
    options: RuntimeOptions | None = None,
    *,
    policy: InputPolicy | None = None,
) -> Model:
    """Load the plain model file ``path``, which ``spec`` describes, into ``runtime``.

    What :func:`load_model` does for a bundle, for a model that has no manifest yet: the
    SDK measures a candidate (reading ``spec`` from the file itself) exactly as a device
    will run it, with the same checks, validation and quantized I/O.

    Raises:
        RuntimeUnavailableError: the runtime is unknown, cannot run this model format, or
            is not installed.
        HealthCheckError: the file is missing or does not load, or differs from ``spec``.
        MalformedManifestError: ``spec`` quantizes a non-integer tensor.
    """
    options = options or RuntimeOptions()
    _check_runtime(spec, runtime)
    try:
        source: bytes | Path = path.read_bytes() if options.load_from_memory else path
    except OSError as exc:
        raise HealthCheckError(f"cannot read the model file {path}: {exc}") from exc
    if not options.load_from_memory and not path.is_file():
        raise HealthCheckError(f"the model file {path} does not exist")
    return _open(spec, source, runtime, options, policy)


def _check_runtime(spec: ModelSpec, runtime: str) -> None:
    if runtime not in RUNTIME_EXTRAS:
        raise RuntimeUnavailableError(
            f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIME_EXTRAS)}"
        )
    if runtime not in FORMAT_RUNTIMES[spec.format]:
        raise RuntimeUnavailableError(
            f"{runtime} cannot run a {spec.format} model; use"
            f" {' or '.join(FORMAT_RUNTIMES[spec.format])}"
        )


def _open(
    spec: ModelSpec,
    source: bytes | Path,
    runtime: str,
    options: RuntimeOptions,
    policy: InputPolicy | None,
) -> Model:
    threads = threads_for(spec, options)
    backend: Backend
    if runtime == "onnxruntime":
        from agent.serve.runtimes._onnxruntime import OnnxRuntimeBackend  # noqa: PLC0415 - lazy

        backend = OnnxRuntimeBackend(spec, source, options, threads)
    else:
        from agent.serve.runtimes._tflite import TfliteBackend  # noqa: PLC0415 - lazy

        backend = TfliteBackend(runtime, spec, source, options, threads)
    try:
        return Model(spec, backend, policy)
    except BaseException:
        backend.close()
        raise
