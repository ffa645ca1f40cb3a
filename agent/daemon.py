"""The long-running agent: wiring only. Each part does its job; this module connects them.

:class:`Agent` builds the :class:`~agent.install.Updater` around a
:class:`~agent.serve.ModelSlot`, the desired-state follower, the observed predictor
(metrics and drift), and, when configured, the MQTT connection with the telemetry
reporter and its durable outbox, MQTT serving, the HTTP endpoint and the prediction
cache. ``edgeship-agent run --config agent.toml`` runs one with signal handling
(agent/cli/_run.py); an application embeds one in-process::

    with Agent(load_config(Path("agent.toml"))) as agent:
        outputs = agent.predict({"x": batch})

Parts a configuration does not use are never imported: no broker, no MQTT client or TLS;
no HTTP endpoint, no HTTP server.

Desired state arrives retained on ``edgeship/v1/<fleet>/<device>/desired`` and is handed
to the follower (:mod:`agent.install._follower`); the fleet's trust root and heartbeat
arrive retained on ``edgeship/v1/<fleet>/trust/root`` and ``.../trust/heartbeat``, are
subscribed first (so a root is in force before the desired state it may refuse) and
handed to the trust keeper (:mod:`agent.install._trust`), which the same worker consults.
The reported state (retained ``state``, :func:`agent.install._status.status_document`) is
re-published after every lifecycle event, desired-state change and trust change.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from agent.bundle import DeviceInfo
from agent.config import AgentConfig
from agent.errors import EdgeshipError, StateError
from agent.install._config import UpdaterConfig
from agent.install._follower import DesiredFollower
from agent.install._status import status_document
from agent.install._store import Store
from agent.install._trust import TrustKeeper
from agent.install._updater import Updater
from agent.messages.desired import Desired, parse_desired
from agent.messages.topics import Topics
from agent.serve._cache import PredictionCache, Predictor
from agent.serve._slot import ModelSlot
from agent.serve.runtimes import installed_runtimes
from agent.telemetry._metrics import Metrics
from agent.telemetry._observe import ObservedPredictor

if TYPE_CHECKING:
    from agent.install._fetch import Fetcher
    from agent.plumbing.transport import Message, Transport
    from agent.serve.http import HttpServer
    from agent.serve.mqtt import MqttInferenceServer
    from agent.telemetry._outbox import Outbox
    from agent.telemetry._reporter import Reporter

__all__ = ["Agent"]

log = logging.getLogger("edgeship.agent")


class Agent:
    """The device agent, in-process. Thread-safe; use as a context manager or call
    :meth:`start` / :meth:`stop`.

    Raises (from the constructor):
        ConfigError: the trust file or the MQTT settings are unusable.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        fetcher: Fetcher | None = None,
        transport: Transport | None = None,
    ) -> None:
        self.config = config
        self.topics = Topics(config.fleet, config.device_id)
        self.slot = ModelSlot()
        self.stopping = False
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()  # the reported state's own bookkeeping
        self._probation: dict[str, Any] | None = None
        self._candidate: str | None = None
        self._claim: int | None = None
        self.trust = TrustKeeper(
            config.state_dir,
            config.trust_policy,
            fleet=config.fleet,
            config=config.trust,
            fetch=config.fetch,
            slack_s=config.update.clock_slack_s,
            fetcher=lambda: self.updater.fetcher,
            events=self._emit,
            changed=self._publish_state,
        )
        self.updater = Updater(
            config.state_dir,
            self.trust.install_policy,
            config=UpdaterConfig(
                update=config.update,
                fetch=config.fetch,
                runtime=config.runtime,
                decryption_key=config.decryption_key,
            ),
            device=DeviceInfo(runtimes=installed_runtimes(), device_class=config.device_class),
            fetcher=fetcher,
            slot=self.slot,
            events=self._on_event,
        )
        self.store: Store = self.updater.store
        self.follower = DesiredFollower(
            self.updater, emit=self._emit, changed=self._publish_state, trust=self.trust
        )
        self.transport: Transport | None = transport
        if transport is None and config.broker is not None:
            self.transport = _mqtt_transport(config)
        self.reporter: Reporter | None = None
        self.outbox: Outbox | None = None
        inner: Predictor = self.slot
        self.cache = None
        if config.cache.enabled:
            self.cache = PredictionCache(self.slot, config.cache)
            inner = self.cache
        self.metrics = Metrics()
        self.predictor = ObservedPredictor(
            inner,
            self.metrics,
            serving=lambda: self.slot.digest,
            output_kind=config.telemetry.output_kind,
            stopping=lambda: self.stopping,
        )
        self.http: HttpServer | None = None
        self.mqtt_server: MqttInferenceServer | None = None

    # --- the public API ------------------------------------------------------------------

    @property
    def digest(self) -> str | None:
        """The version new calls go to (None: nothing is serving)."""
        return self.slot.digest

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        """Run the serving model (through the cache, if enabled), recorded in telemetry.

        Raises:
            StateError: no model is serving, or the agent is stopping.
            InputValidationError: the inputs do not match the model.
            InferenceError: the model failed.
        """
        return self.predictor.predict(inputs)

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        """Like :meth:`predict`, also naming the version (manifest digest) that answered.

        Raises:
            as :meth:`predict`.
        """
        return self.predictor.predict_versioned(inputs)

    def status(self) -> dict[str, Any]:
        """The reported state document (as published on ``state``).

        Raises:
            StateError: the state file is unreadable.
        """
        return self._state_document(self.updater.status())

    def apply_desired(self, desired: Desired | None) -> None:
        """Ask for ``desired`` (None clears it); the worker installs it in the background.

        This is what a message on the ``desired`` topic does; an application without a
        broker may call it directly.
        """
        if not self.follower.apply(desired):
            return
        log.info(
            "desired state",
            extra={
                "fields": {
                    "digest": None if desired is None else desired.digest,
                    "version": None if desired is None else desired.version,
                    "rollout": None if desired is None else desired.rollout,
                }
            },
        )
        self._publish_state()

    def start(self) -> None:
        """Resume, serve the current version, connect, report, listen for desired state.

        Raises:
            StateError: another agent runs on this state directory, or the state file is
                corrupt (run ``edgeship-agent recover-state``).
            ConfigError: the HTTP endpoint cannot listen.
        """
        if self._started:
            return
        self._claim = self.store.claim()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info(
            "agent started",
            extra={
                "fields": {
                    "device": self.config.device_id,
                    "fleet": self.config.fleet,
                    "serving": self.slot.digest,
                    "http": None if self.http is None else self.http.url,
                }
            },
        )

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, let calls in flight finish (bounded), flush, go offline.

        Returns False if calls were still running after the drain timeout.
        """
        if self._stopped:
            return True
        self._stopped = True
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout

        def left(low: float = 0.0, high: float = timeout) -> float:
            return max(low, min(high, deadline - time.monotonic()))

        if self.http is not None:
            # No new connections; requests already received finish and answer.
            self.http.stop(drain_timeout_s=left())
        if self.mqtt_server is not None:
            # Requests still queued get "unavailable"; the one running finishes and answers.
            self.mqtt_server.stop(timeout_s=left(0.1))
        self.stopping = True
        drained = self.slot.stop(timeout_s=left())
        self.follower.stop(left(0.1, 5.0))
        if self.reporter is not None:
            with contextlib.suppress(Exception):
                self.reporter.report_now()  # the last interval's numbers
            self.reporter.flush(left(0.1, 2.0))
            self.reporter.stop()
        if self.transport is not None:
            self.transport.stop()  # publishes status offline (reason "shutdown")
        if self.outbox is not None:
            self.outbox.close()
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None
        if self._started:
            log.info("agent stopped", extra={"fields": {"drained": drained}})
        self._started = False
        return drained

    def reload(self, config: AgentConfig) -> list[str]:
        """Apply what can change while running; returns what needs a restart instead.

        Reloaded: the trust file (always re-read: a bare policy replaces the one in force;
        a root replaces the current root only when it is newer), the telemetry interval.
        Logging is the caller's (the CLI reconfigures it).

        Raises:
            ConfigError: the new trust file is invalid (the trust in force stays).
        """
        self.trust.reload(config.trust_policy)
        log.info("trust file reloaded", extra={"fields": {"path": str(config.trust_policy)}})
        self.follower.wake()
        old = self.config
        interval_changed = config.telemetry.interval_s != old.telemetry.interval_s
        if interval_changed and self.reporter is not None:
            self.reporter.stop()
            self.reporter.config = replace(
                self.reporter.config, interval_s=config.telemetry.interval_s
            )
            self.reporter.start()
            log.info(
                "telemetry interval changed",
                extra={"fields": {"interval_s": config.telemetry.interval_s}},
            )
        reloadable = {"trust_policy", "logging", "telemetry"}
        restart = [
            name
            for name in AgentConfig.__dataclass_fields__
            if name not in reloadable and getattr(config, name) != getattr(old, name)
        ]
        if replace(config.telemetry, interval_s=0.0) != replace(old.telemetry, interval_s=0.0):
            restart.append("telemetry (other than interval_s)")
        self.config = replace(
            old,
            trust_policy=config.trust_policy,
            logging=config.logging,
            telemetry=replace(old.telemetry, interval_s=config.telemetry.interval_s),
        )
        return restart

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- wiring --------------------------------------------------------------------------

    def _start(self) -> None:
        cfg = self.config
        state = self.updater.status()  # raises StateError on a corrupt state file
        if state.current is not None:
            self._probation = {"digest": state.current, "passed": True}
        if state.pending is not None and state.pending.phase == "probation":
            self._candidate = state.pending.digest
        if self.transport is not None:
            self._start_reporter()
        # Whatever a pending candidate does, the agent starts and serves what it runs.
        try:
            self.updater.resume()
        except EdgeshipError as exc:
            log.warning("resuming the interrupted install failed: %s", exc)
        except Exception:
            log.exception("resuming the interrupted install failed unexpectedly")
        try:
            self.updater.start_serving()
        except EdgeshipError as exc:
            log.error("cannot serve the current version: %s", exc)  # noqa: TRY400 - expected; no traceback
        self._model_changed()
        self._publish_state()
        if self.transport is not None and self.reporter is not None:
            # Trust first: retained messages arrive in the order of the subscriptions.
            self.transport.subscribe(self.topics.trust_root, self._on_root)
            self.transport.subscribe(self.topics.trust_heartbeat, self._on_heartbeat)
            self.transport.subscribe(self.topics.desired, self._on_desired)
            self.transport.start()
            self.reporter.start()
            if cfg.mqtt_serving.enabled:
                from agent.serve.mqtt import MqttInferenceServer  # noqa: PLC0415 - when used

                self.mqtt_server = MqttInferenceServer(
                    self.predictor, self.transport, self.topics, cfg.mqtt_serving
                )
                self.mqtt_server.start()
        if cfg.http.enabled:
            from agent.serve.http import HttpServer  # noqa: PLC0415 - when used
            from agent.telemetry._exposition import exposition  # noqa: PLC0415

            self.http = HttpServer(
                self.predictor, cfg.http, metrics_text=lambda: exposition(self.metrics)
            )
            self.http.start()
        self.follower.start()

    def _start_reporter(self) -> None:
        from agent.telemetry._outbox import Outbox  # noqa: PLC0415 - with a broker only
        from agent.telemetry._reporter import Reporter  # noqa: PLC0415
        from agent.telemetry._system import SystemSampler  # noqa: PLC0415

        assert self.transport is not None  # the caller checked
        cfg = self.config
        self.outbox = Outbox(
            cfg.state_dir / "outbox.sqlite", max_bytes=cfg.telemetry.outbox_max_bytes
        )
        self.reporter = Reporter(
            self.topics,
            self.outbox,
            self.transport,
            metrics=self.metrics,
            system=SystemSampler(cfg.state_dir),
            config=cfg.telemetry,
        )

    def _on_desired(self, message: Message) -> None:
        # On the transport's network thread: parse and hand over, never block.
        try:
            desired = parse_desired(
                message.payload, fleet=self.config.fleet, device=self.config.device_id
            )
        except ValueError as exc:
            log.warning("ignoring a desired-state message: %s", exc)
            return
        self.apply_desired(desired)

    def _on_root(self, message: Message) -> None:
        # On the network thread: queue only; the worker verifies (and may fetch a chain).
        self.trust.offer_root(message.payload)
        self.follower.wake()

    def _on_heartbeat(self, message: Message) -> None:
        self.trust.offer_heartbeat(message.payload)
        self.follower.wake()

    def _on_event(self, kind: str, fields: Mapping[str, Any], /) -> None:
        """The updater's event sink (called with the updater's lock held)."""
        self._emit(kind, fields)
        with self._lock:
            if kind == "activated":
                self._candidate = fields.get("digest")
            elif kind == "committed":
                self._probation = {"digest": fields.get("digest"), "passed": True}
                self._candidate = None
            elif kind == "rolled-back" and self._candidate is not None:
                self._probation = {"digest": self._candidate, "passed": False}
                self._candidate = None
        if kind in ("activated", "rolled-back"):
            self._model_changed()
        self._publish_state()

    def _emit(self, kind: str, fields: Mapping[str, Any]) -> None:
        log.info(kind, extra={"fields": dict(fields)})
        if self.reporter is not None:
            self.reporter.event_sink(kind, fields)

    def _model_changed(self) -> None:
        digest = self.slot.digest
        manifest = None
        if digest is not None:
            try:
                manifest = self.store.manifest(digest)
            except StateError as exc:
                log.warning("no telemetry reference for the serving model: %s", exc)
        drift = self.predictor.model_changed(digest, manifest, self.updater.models.serving(digest))
        if self.reporter is not None:
            self.reporter.set_drift(drift)

    def _state_document(self, state: Any) -> dict[str, Any]:
        desired = self.follower.desired
        with self._lock:
            probation = self._probation
        return status_document(
            self.store,
            state,
            probation=probation,
            desired_digest=None if desired is None else desired.digest,
            trust=self.trust.document(),
            serving=self.updater.models.serving(self.slot.digest),
        )

    def _publish_state(self) -> None:
        if self.reporter is None:
            return
        try:
            self.reporter.set_state(self._state_document(self.store.load()))
        except (EdgeshipError, ValueError) as exc:
            log.error("cannot publish the reported state: %s", exc)  # noqa: TRY400 - expected; no traceback


def _mqtt_transport(config: AgentConfig) -> Transport:
    from agent import __version__  # noqa: PLC0415 - avoids a cycle at import time
    from agent.messages.status import device_presence  # noqa: PLC0415 - with a broker only
    from agent.plumbing.mqtt import MqttClient  # noqa: PLC0415 - with a broker only

    assert config.broker is not None  # the caller checked
    attributes = {"agent_version": __version__, **config.attributes}
    presence = device_presence(Topics(config.fleet, config.device_id), attributes)
    # Raises ConfigError itself when the TLS files or the password file are unusable.
    return MqttClient(config.broker, presence=presence)
