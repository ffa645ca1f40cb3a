"""What the runtime adapters share: options, installed-runtime lookup, signature checks."""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import ModuleType

from agent.bundle.manifest import ModelSpec, QuantParams, TensorSpec
from agent.errors import HealthCheckError, RuntimeUnavailableError
from agent.plumbing.compat import zip_strict
from agent.serve.runtimes._dists import installed_version

# Runtime name -> the pip extra that installs it.
RUNTIME_EXTRAS: Mapping[str, str] = {
    "onnxruntime": "onnx",
    "litert": "litert",
    "tflite-runtime": "tflite",
}
# Runtime name -> the distributions that provide its import package, in preference order.
_DISTRIBUTIONS: Mapping[str, tuple[str, ...]] = {
    "onnxruntime": (
        "onnxruntime",
        "onnxruntime-gpu",
        "onnxruntime-openvino",
        "onnxruntime-directml",
        "onnxruntime-qnn",
    ),
    "litert": ("ai-edge-litert", "ai-edge-litert-nightly"),
    "tflite-runtime": ("tflite-runtime",),
}
# A model whose inputs hold at most this many elements per sample runs single-threaded
# unless told otherwise. Measured on the 64-32-10 MLP (64 elements, 2-core AMD EPYC VM,
# onnxruntime 1.32, LiteRT 2.3): one thread is as fast as two at batch 1, ~1.5x faster at
# batch 256 (onnxruntime) and ~3x faster with LiteRT, because waking a thread pool costs
# more than the work. On the 224x224 conv model two threads are ~1.3-1.6x faster.
# `bench/predict.py` reprints the comparison on the machine at hand.
SMALL_MODEL_ELEMENTS = 16_384
# The CPU path each runtime falls back to: onnxruntime's own kernels, and TFLite's builtin
# kernels without the XNNPACK delegate that LiteRT and tflite-runtime apply by default.
CPU_PROVIDERS: Mapping[str, str] = {
    "onnxruntime": "CPUExecutionProvider",
    "litert": "cpu",
    "tflite-runtime": "cpu",
}
# What a runtime runs on when the device names nothing: what it always ran on.
DEFAULT_PROVIDERS: Mapping[str, str] = {
    "onnxruntime": "CPUExecutionProvider",
    "litert": "xnnpack",
    "tflite-runtime": "xnnpack",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How a runtime executes a model. The defaults suit a small shared device.

    Attributes:
        threads: threads inside one operator. ``None`` (auto): 1 for small models
            (at most :data:`SMALL_MODEL_ELEMENTS` input elements per sample), where a thread
            pool costs more than it gains; otherwise the runtime's default for onnxruntime
            (one per physical core) and one per CPU for LiteRT / tflite-runtime.
        inter_op_threads: onnxruntime only: threads running independent operators in
            parallel. Setting it switches onnxruntime to its parallel execution mode, which
            helps only graphs with parallel branches.
        load_from_memory: read the model file into memory and load it from there, so the
            runtime never reopens the file (it may be replaced or removed afterwards, and a
            decrypted model never has to touch the disk). ``False`` lets the runtime open
            the path itself; TFLite then memory-maps it, which saves RAM on large models.
        cpu_mem_arena: onnxruntime only: keep its memory arena (faster repeated calls);
            ``False`` returns memory after each call, for devices short of RAM.
        allow_spinning: onnxruntime only: idle pool threads busy-wait for the next
            operator. Saves microseconds per call with several threads, but keeps cores
            busy; off by default on devices.
        reference_kernels: run each operator's reference implementation instead of the
            optimised kernels: TFLite's ``BUILTIN_REF`` op resolver (no XNNPACK), and
            onnxruntime without graph optimizations (a QDQ model runs as separate
            quantize, float and dequantize ops instead of fused integer kernels). Much
            slower, and not an ``agent.toml`` setting: it exists for the SDK, which runs a
            model once more this way, as a second implementation of the same arithmetic
            standing in for a device's kernels, to measure how far outputs may differ
            before it sets the health check's tolerance.
        providers: onnxruntime execution providers (``OpenVINOExecutionProvider``, ...),
            best first. A model loads on the first one only, never on another in its
            place; the health gate falls back along the list (:func:`provider_chain`).
            Empty: ``CPUExecutionProvider``.
        delegates: the same for LiteRT / tflite-runtime: ``xnnpack`` (the runtime's
            default), ``cpu`` (builtin kernels, no delegate) or the absolute path of a
            delegate library. Empty: ``xnnpack``.
        provider_options: options per provider or delegate name, passed to it as strings.
    """

    threads: int | None = None
    inter_op_threads: int | None = None
    load_from_memory: bool = True
    cpu_mem_arena: bool = True
    allow_spinning: bool = False
    reference_kernels: bool = False
    providers: tuple[str, ...] = ()
    delegates: tuple[str, ...] = ()
    provider_options: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("threads", "inter_op_threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for the default)")
        # Lists arrive from JSON (the gate's child) and TOML: keep the frozen form.
        object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "delegates", tuple(self.delegates))

    def provider_for(self, runtime: str) -> str:
        """The provider (or delegate) ``runtime`` loads a model on: the first preferred."""
        preferred = self.providers if runtime == "onnxruntime" else self.delegates
        return preferred[0] if preferred else DEFAULT_PROVIDERS.get(runtime, "")

    def pinned(self, runtime: str, provider: str) -> RuntimeOptions:
        """These options with ``provider`` alone for ``runtime``: what the gate passed."""
        if runtime == "onnxruntime":
            return replace(self, providers=(provider,))
        return replace(self, delegates=(provider,))


def provider_chain(runtime: str, options: RuntimeOptions) -> tuple[str, ...]:
    """The providers (or delegates) to try for ``runtime``, best first, CPU last.

    The device's preference, then the runtime's CPU path if the preference leaves it out:
    a provider that fails must never leave the device without a way to serve. With no
    preference, only what the runtime always ran on.
    """
    preferred = options.providers if runtime == "onnxruntime" else options.delegates
    if not preferred:
        return (DEFAULT_PROVIDERS.get(runtime, ""),)
    cpu = CPU_PROVIDERS.get(runtime)
    chain = tuple(dict.fromkeys(preferred))
    return chain if cpu is None or cpu in chain else (*chain, cpu)


def installed_runtimes() -> dict[str, str]:
    """Installed runtimes and their versions, from package metadata (imports nothing)."""
    found = {}
    for runtime, dists in _DISTRIBUTIONS.items():
        version = next(filter(None, map(installed_version, dists)), None)
        if version is not None:
            found[runtime] = version
    return found


def import_runtime(runtime: str, module: str) -> ModuleType:
    """Import a runtime's module.

    Raises:
        RuntimeUnavailableError: it is not installed or cannot be imported here.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise RuntimeUnavailableError(
            f"the {runtime} runtime is not usable here ({exc}); install it with"
            f" pip install 'edgeship[{RUNTIME_EXTRAS[runtime]}]'"
        ) from exc


def threads_for(spec: ModelSpec, options: RuntimeOptions) -> int | None:
    """The intra-op thread count to configure; ``None`` leaves the runtime's default.

    A model is small when one request holds at most :data:`SMALL_MODEL_ELEMENTS` input
    elements. Where every dimension but a leading batch is fixed, the shapes say it (per
    sample); otherwise the manifest's ``request_elements`` (counted by the SDK on a real
    golden request) does. With neither, the size is unknown and the runtime's default is
    kept: counting dynamic dimensions as 1 made image models with dynamic height and width
    run on one thread, which costs more than a thread pool costs a small model.
    """
    if options.threads is not None:
        return options.threads
    if all(None not in s.shape[1:] for s in spec.inputs):
        elements: int | None = sum(math.prod(d or 1 for d in s.shape) for s in spec.inputs)
    else:
        elements = spec.request_elements
    return 1 if elements is not None and elements <= SMALL_MODEL_ELEMENTS else None


def cpu_count() -> int:
    return os.cpu_count() or 1


@dataclass(frozen=True)
class Found:
    """A tensor as the runtime describes it. ``None`` dims are dynamic."""

    dtype: str | None  # numpy dtype name; None when numpy has no equivalent
    shape: tuple[int | None, ...]
    quantization: QuantParams | None = None


def check_signature(
    file: str, kind: str, declared: Sequence[TensorSpec], found: Mapping[str, Found]
) -> None:
    """Refuse a model whose inputs or outputs differ from what the manifest declares.

    Input dims must agree exactly where the model fixes them and the manifest may fix a
    dynamic one; output dims are compared only where both fix them (runtimes often report
    dynamic output shapes loosely).

    Raises:
        HealthCheckError: a name, dtype, rank, dimension or quantization differs.
    """
    names = {s.name for s in declared}
    if len(names) != len(declared):
        raise HealthCheckError(f"{file}: the manifest declares an {kind} name twice")
    if names != set(found):
        raise HealthCheckError(
            f"{file}: the manifest declares {kind}s {sorted(names)} but the model has"
            f" {sorted(found)}; rebuild the bundle from this model"
        )
    for spec in declared:
        f = found[spec.name]
        where = f"{file}: {kind} {spec.name!r}"
        if f.dtype != spec.dtype:
            raise HealthCheckError(
                f"{where} is {f.dtype or 'an unsupported type'} in the model but"
                f" {spec.dtype} in the manifest"
            )
        if len(f.shape) != len(spec.shape) or any(
            m is not None and (d != m if kind == "input" else d not in (None, m))
            for d, m in zip_strict(spec.shape, f.shape)
        ):
            raise HealthCheckError(
                f"{where} has shape {list(f.shape)} in the model but {list(spec.shape)} in"
                " the manifest (null = dynamic)"
            )
        q, fq = spec.quantization, f.quantization
        if (
            q is not None
            and fq is not None
            and (not math.isclose(q.scale, fq.scale, rel_tol=1e-6) or q.zero_point != fq.zero_point)
        ):
            raise HealthCheckError(
                f"{where} is quantized with scale {fq.scale}, zero point {fq.zero_point} in"
                f" the model but scale {q.scale}, zero point {q.zero_point} in the manifest"
            )
