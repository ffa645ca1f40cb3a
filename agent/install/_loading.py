"""How the updater loads models: the runtime layer (with the device's key) or a custom
loader, and the health gate around a candidate's load.

Separate from the state machine (:mod:`agent.install._updater`): this part decides how a
model gets into memory; the updater decides when, and persists the decision first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from agent.bundle import DeviceInfo, check_compatibility
from agent.bundle.manifest import Manifest
from agent.install._config import UpdaterConfig
from agent.install._gate import ChildGate, load_and_check
from agent.install._health import HealthReport
from agent.serve._slot import ServingModel
from agent.serve.runtimes import load_model

if TYPE_CHECKING:
    from agent.bundle.crypto import DeviceKey

__all__ = ["GateResult", "ModelLoader", "ModelLoading"]

ModelLoader = Callable[[Manifest, Path, str], ServingModel]


@dataclass(frozen=True)
class GateResult:
    """A candidate that passed the health gate, loaded here and ready to swap in."""

    model: ServingModel
    report: HealthReport
    gate: Literal["process", "thread"]
    seconds: float  # the gate and the load, together


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
    ) -> None:
        self.config = config
        self._device = device
        self.key: DeviceKey | None = None
        if config.decryption_key is not None:
            from agent.bundle.crypto import DeviceKey  # noqa: PLC0415 - with a device key only

            self.key = DeviceKey.load(config.decryption_key)
        self._custom = loader is not None
        self.loader: ModelLoader = loader or self._default

    def load(self, manifest: Manifest, model_dir: Path) -> ServingModel:
        """Load a stored version to serve it.

        Raises:
            EdgeshipError: incompatible with this device, or it does not load.
        """
        return self.loader(manifest, model_dir, check_compatibility(manifest, self._device()))

    def gate(self, manifest: Manifest, model_dir: Path) -> GateResult:
        """Load a candidate and run the health gate on it (in a child process by default).

        Raises:
            EdgeshipError: incompatible, does not load, or fails the gate.
        """
        update = self.config.update
        started = time.monotonic()
        runtime = check_compatibility(manifest, self._device())
        child = None
        if update.health_gate == "process" and not self._custom:
            child = ChildGate(
                runtime,
                self.config.runtime,
                update.health_gate_timeout_s,
                self.config.decryption_key,
            )
        model, report = load_and_check(
            lambda: self.loader(manifest, model_dir, runtime),
            manifest,
            model_dir,
            runs=update.health_runs,
            priority=update.health_gate_priority,
            child=child,
            key=self.key,
        )
        return GateResult(
            model,
            report,
            "process" if child is not None else "thread",
            round(time.monotonic() - started, 3),
        )

    def _default(self, manifest: Manifest, model_dir: Path, runtime: str) -> ServingModel:
        return load_model(manifest, model_dir, runtime, self.config.runtime, key=self.key)
