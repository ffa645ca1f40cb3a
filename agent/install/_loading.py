"""How the updater loads models: the runtime layer (with the device's key) or a custom
loader, and the health gate around a candidate's load.

Separate from the state machine (:mod:`agent.install._updater`): this part decides how a
model gets into memory; the updater decides when, and persists the decision first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.bundle import DeviceInfo, check_compatibility
from agent.bundle.manifest import Manifest
from agent.errors import HealthCheckError
from agent.install._config import UpdaterConfig
from agent.install._gate import ChildGate, load_and_check
from agent.install._gate_worker import GateWorkers
from agent.install._health import HealthReport
from agent.install._providers import Passed, ProviderRecord
from agent.plumbing.sched import GatePriority
from agent.serve._slot import ServingModel
from agent.serve.runtimes import CPU_PROVIDERS, DEFAULT_PROVIDERS, load_model, provider_chain

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = ["GateResult", "ModelLoader", "ModelLoading"]

ModelLoader = Callable[[Manifest, Path, str], ServingModel]
# Lifecycle events (the updater's EventSink): kind, fields.
Events = Callable[[str, Mapping[str, Any]], None]

_log = logging.getLogger("edgeship.agent")


@dataclass(frozen=True)
class GateResult:
    """A candidate that passed the health gate, loaded here and ready to swap in."""

    model: ServingModel
    report: HealthReport
    gate: Literal["process", "thread"]
    seconds: float  # the gate (on every provider tried) and the load, together
    provider: str | None = None  # what it passed (and serves) on; None: a custom loader

    def event_fields(self) -> dict[str, Any]:
        """The ``health-check-passed`` event's fields (docs/mqtt.md)."""
        return {
            "p95_ms": self.report.p95_ms,
            "gate": self.gate,
            "seconds": self.seconds,
            "provider": self.provider,
        }


class ModelLoading:
    """Loads models for one updater: by default through :func:`agent.serve.load_model`
    with the configured runtime options and device key; or with a custom ``loader``, which
    cannot be repeated in a child process, so its candidates are gated in a thread.

    Raises (constructor):
        KeyFileError: the configured device key is unusable.
    """

    def __init__(
        self,
        config: UpdaterConfig,
        device: Callable[[], DeviceInfo],
        loader: ModelLoader | None = None,
        record: Path | None = None,
        events: Events | None = None,
    ) -> None:
        self.config = config
        # Which provider each version passed the gate on (kept in ``record``, if given).
        self.passed = ProviderRecord(record)
        self._events = events
        self._device = device
        self.key: DeviceKey | None = None
        if config.decryption_key is not None:
            from agent.bundle.crypto import DeviceKey  # noqa: PLC0415 - with a device key only

            self.key = DeviceKey.load(config.decryption_key)
        self._custom = loader is not None
        self.loader: ModelLoader = loader or self._default
        # The health gate's worker processes: none until the first gate in a process,
        # then one started ahead for the next (agent.install._gate_worker).
        self.gate_workers = GateWorkers()

    def close(self) -> None:
        """Stop the health-gate worker started ahead for the next install, if any.

        Call it when the agent stops. Loading still works afterwards; a gate then starts
        its worker process on demand, and none ahead.
        """
        self.gate_workers.close()

    def load(self, manifest: Manifest, model_dir: Path, digest: str | None = None) -> ServingModel:
        """Load a stored version to serve it, on the provider it passed the gate on.

        A version the record does not know, on a device with providers to fall back
        along, goes through the gate again first: it never serves on a provider the gate
        did not pass.

        Raises:
            EdgeshipError: incompatible with this device, or it does not load.
        """
        runtime = check_compatibility(manifest, self._device())
        if self._custom:
            return self.loader(manifest, model_dir, runtime)
        passed = self.passed.get(digest)
        chain = provider_chain(runtime, self.config.runtime)
        if passed is None or passed.runtime != runtime or passed.provider not in chain:
            if len(chain) > 1:
                return self.gate(manifest, model_dir, digest).model
            passed = Passed(runtime, chain[0])
        model = self._load_on(manifest, model_dir, passed)
        self.passed.put(digest, passed)  # the one provider the gate would have run on
        return model

    def gate(
        self,
        manifest: Manifest,
        model_dir: Path,
        digest: str | None = None,
    ) -> GateResult:
        """Load a candidate and run the health gate on it (in a child process by default).

        The gate runs on each of the device's providers in turn
        (:func:`agent.serve.runtimes.provider_chain`) until one passes; the candidate is
        then loaded here on exactly that one. Each provider given up is reported in a
        ``provider-fallback`` event that says why.

        Raises:
            EdgeshipError: incompatible, does not load, or fails the gate on every provider.
        """
        started = time.monotonic()
        runtime = check_compatibility(manifest, self._device())
        chain: tuple[str | None, ...] = (
            (None,) if self._custom else provider_chain(runtime, self.config.runtime)
        )
        for n, provider in enumerate(chain):
            try:
                model, report, where = self._check_on(manifest, model_dir, runtime, provider)
            except HealthCheckError as exc:
                if n + 1 == len(chain):
                    if len(chain) == 1:
                        raise
                    raise HealthCheckError(f"on {provider}, the last provider: {exc}") from None
                self._fell_back(digest, runtime, provider, chain[n + 1], exc)
                continue
            if provider is not None:
                self.passed.put(digest, Passed(runtime, provider))
            return GateResult(model, report, where, round(time.monotonic() - started, 3), provider)
        raise AssertionError("unreachable: the chain is never empty")  # pragma: no cover

    def serving(self, digest: str | None) -> dict[str, str] | None:
        """The version ``digest`` as it serves: its runtime and provider, when known."""
        passed = self.passed.get(digest)
        if digest is None or passed is None:
            return None
        return {"digest": digest, **passed.to_json()}

    def _fell_back(
        self,
        digest: str | None,
        runtime: str,
        provider: str | None,
        after: str | None,
        exc: Exception,
    ) -> None:
        _log.warning("the candidate fails on %s; trying %s: %s", provider, after, exc)
        if self._events is not None:
            fields = {"digest": digest, "runtime": runtime, "provider": provider, "next": after}
            self._events("provider-fallback", {**fields, "reason": str(exc)})

    def _check_on(
        self, manifest: Manifest, model_dir: Path, runtime: str, provider: str | None
    ) -> tuple[ServingModel, HealthReport, Literal["process", "thread"]]:
        update = self.config.update
        options = self.config.runtime
        if provider is not None:
            options = options.pinned(runtime, provider)
        child = None
        if update.health_gate == "process" and not self._custom:
            child = ChildGate(
                runtime,
                options,
                update.health_gate_timeout_s,
                self.config.decryption_key,
                # Whatever the load here runs at (see _priority), the child runs lowered.
                priority=update.health_gate_priority,
                workers=self.gate_workers,
            )

        def load() -> ServingModel:
            if provider is None:
                return self.loader(manifest, model_dir, runtime)
            return self._load_on(manifest, model_dir, Passed(runtime, provider))

        model, report = load_and_check(
            load,
            manifest,
            model_dir,
            runs=update.health_runs,
            priority=_priority(update.health_gate_priority, runtime, provider),
            child=child,
            key=self.key,
        )
        return model, report, "process" if child is not None else "thread"

    def _load_on(self, manifest: Manifest, model_dir: Path, passed: Passed) -> ServingModel:
        options = self.config.runtime.pinned(passed.runtime, passed.provider)
        return load_model(manifest, model_dir, passed.runtime, options, key=self.key)

    def _default(self, manifest: Manifest, model_dir: Path, runtime: str) -> ServingModel:
        return load_model(manifest, model_dir, runtime, self.config.runtime, key=self.key)


def _priority(wanted: GatePriority, runtime: str, provider: str | None) -> GatePriority:
    """The priority to load a candidate at here (the child gate runs at the configured one).

    An accelerator's runtime (OpenVINO, a delegate library) may start process-wide thread
    pools on its first load that outlive the session; started at a lowered priority they
    would serve at it for good, which the reload of :func:`load_and_check` cannot undo.
    The runtimes' own CPU paths start their threads per session, which it can.
    """
    if provider is None or provider in (CPU_PROVIDERS.get(runtime), DEFAULT_PROVIDERS.get(runtime)):
        return wanted
    return "normal"
