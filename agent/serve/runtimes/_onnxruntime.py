"""The onnxruntime adapter: one execution provider per session, the one the device chose."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy.typing as npt

from agent.bundle.manifest import ModelSpec
from agent.errors import HealthCheckError, RuntimeUnavailableError
from agent.serve.runtimes._base import Found, RuntimeOptions, check_signature, import_runtime

# onnxruntime's type strings -> numpy dtype names.
_DTYPES = {
    "tensor(bool)": "bool",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(uint16)": "uint16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(float16)": "float16",
    "tensor(float)": "float32",
    "tensor(double)": "float64",
}


class OnnxRuntimeBackend:
    """An ``onnxruntime.InferenceSession``; its ``run`` is thread-safe, so no lock."""

    runtime = "onnxruntime"

    def __init__(
        self,
        spec: ModelSpec,
        source: bytes | Path,
        options: RuntimeOptions,
        threads: int | None,
    ) -> None:
        """Create the session and check its signature against ``spec``.

        Raises:
            RuntimeUnavailableError: onnxruntime is not installed.
            HealthCheckError: the model does not load, or differs from the manifest.
        """
        ort = import_runtime(self.runtime, "onnxruntime")
        # Its pybind11 exception types (Fail, InvalidProtobuf, ...) derive from Exception
        # directly and vary between releases: collect them rather than list them.
        state = ort.capi.onnxruntime_pybind11_state
        self.errors: tuple[type[BaseException], ...] = (
            RuntimeError,
            ValueError,
            *(v for v in vars(state).values() if isinstance(v, type) and issubclass(v, Exception)),
        )
        so = ort.SessionOptions()
        so.log_severity_level = 3  # errors only: warnings go to stderr, not our logs
        if threads is not None:
            so.intra_op_num_threads = threads
        if options.inter_op_threads is not None:
            so.inter_op_num_threads = options.inter_op_threads
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        so.enable_cpu_mem_arena = options.cpu_mem_arena
        so.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if options.allow_spinning else "0"
        )
        if options.reference_kernels:
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.provider = options.provider_for(self.runtime)
        available = ort.get_available_providers()
        if self.provider not in available:
            raise RuntimeUnavailableError(
                f"this onnxruntime has no {self.provider}; it has {', '.join(available)}"
            )
        provider_options = dict(options.provider_options.get(self.provider, {}))
        load_errors: tuple[type[BaseException], ...] = (*self.errors, OSError)
        try:
            session = ort.InferenceSession(
                source if isinstance(source, bytes) else str(source),
                so,
                # The bare name unless there are options: with a (name, {}) pair,
                # onnxruntime 1.32 kept a thread started at the gate's lowered priority
                # serving after the reload at normal priority (tests/agent/install/test_gate.py).
                providers=[
                    (self.provider, provider_options) if provider_options else self.provider
                ],
            )
        except load_errors as exc:
            raise HealthCheckError(
                f"onnxruntime cannot load {spec.file} on {self.provider}: {exc}"
            ) from exc
        # onnxruntime may drop a provider that fails to initialise and run on the CPU
        # instead; the agent must serve on exactly the provider its health gate checked.
        if session.get_providers()[0] != self.provider:
            raise HealthCheckError(
                f"onnxruntime did not start {self.provider} for {spec.file} (it runs on"
                f" {', '.join(session.get_providers())})"
            )
        for kind, declared, nodes in (
            ("input", spec.inputs, session.get_inputs()),
            ("output", spec.outputs, session.get_outputs()),
        ):
            check_signature(
                spec.file,
                kind,
                declared,
                {
                    n.name: Found(
                        _DTYPES.get(n.type),
                        tuple(d if isinstance(d, int) else None for d in n.shape),
                    )
                    for n in nodes
                },
            )
        self._session: Any = session
        self.run: Any = fast_run(session, [o.name for o in spec.outputs], ort.RunOptions())

    def close(self) -> None:
        # Calls in flight keep the session alive through the bound method they hold; it is
        # freed when the last one returns. (Model.close stops new calls before this.)
        self.run = None
        self._session = None


def fast_run(
    session: Any, output_names: list[str], run_options: Any
) -> Callable[[dict[str, npt.NDArray[Any]]], list[npt.NDArray[Any]]]:
    """``feed -> outputs`` for ``session``, skipping work the agent has already done.

    ``InferenceSession.run`` re-checks the feed's names and output names in Python on
    every call (about 3 microseconds, a third of a small MLP's run) and then calls its
    compiled session ``_sess.run``. The validator has already checked the names against
    the session's signature, so call the compiled session directly when this
    onnxruntime has one (every release since 1.0), else the public method.
    """
    inner = getattr(getattr(session, "_sess", None), "run", None)
    if inner is None:
        return functools.partial(session.run, output_names)

    def run(feed: dict[str, npt.NDArray[Any]]) -> list[npt.NDArray[Any]]:
        return inner(output_names, feed, run_options)  # type: ignore[no-any-return]

    return run
