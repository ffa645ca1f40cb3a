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
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from agent._host import ModelHost
from agent.bundle import DeviceInfo
from agent.config import AgentConfig
from agent.errors import EdgeshipError
from agent.install._gate_worker import GateWorkers
from agent.install._store import Store
from agent.install._trust import TrustKeeper
from agent.messages.desired import Desired, parse_desired
from agent.messages.topics import Topics
from agent.serve._router import Router
from agent.serve.runtimes import installed_runtimes

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
        self.stopping = False
        self._started = False
        self._stopped = False
        self._claim: int | None = None
        self._root = Store(config.state_dir)  # the agent's claim; the default model's store
        self.trust = TrustKeeper(
            config.state_dir,
            config.trust_policy,
            fleet=config.fleet,
            config=config.trust,
            fetch=config.fetch,
            slack_s=config.update.clock_slack_s,
            fetcher=lambda: self.updater.fetcher,
            events=self._emit,
            changed=self._publish_all,
        )
        device = DeviceInfo(runtimes=installed_runtimes(), device_class=config.device_class)
        workers = GateWorkers()  # one health-gate worker started ahead, whatever the models
        self.hosts: dict[str, ModelHost] = {}
        for model in config.model_configs():
            self.hosts[model.name] = ModelHost(
                config,
                model,
                trust=self.trust,
                device=device,
                fetcher=fetcher,
                emit=self._emit,
                changed=self._publish_host,
                stopping=lambda: self.stopping,
                gate_workers=workers,
            )
        self.router = Router(self.hosts)
        # The default model (or the first): what the one-model API and attributes name.
        first = self.hosts[self.router.default or next(iter(self.hosts))]
        self.slot = first.slot
        self.updater = first.updater
        self.store: Store = first.store
        self.follower = first.follower
        self.cache = first.cache
        self.metrics = first.metrics
        self.predictor = first.predictor
        self.transport: Transport | None = transport
        if transport is None and config.broker is not None:
            self.transport = _mqtt_transport(config)
        self.reporter: Reporter | None = None
        self.outbox: Outbox | None = None
        self.http: HttpServer | None = None
        self.mqtt_server: MqttInferenceServer | None = None

    # --- the public API ------------------------------------------------------------------

    @property
    def models(self) -> list[str]:
        """The names of the models this agent serves."""
        return list(self.hosts)

    def host(self, model: str | None = None) -> ModelHost:
        """The model called ``model`` (None: the default model).

        Raises:
            UnknownModelError: this agent serves no such model (or several, and none named).
        """
        served = self.router.get(model)
        assert isinstance(served, ModelHost)  # the agent's router holds its hosts
        return served

    @property
    def digest(self) -> str | None:
        """The version new calls of the default model go to (None: nothing is serving)."""
        return self.router.get(None).digest

    def predict(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        model: str | None = None,
        key: str | None = None,
        request_id: str | None = None,
    ) -> dict[str, npt.NDArray[Any]]:
        """Run a model (through its cache, if enabled), recorded in telemetry.

        ``model`` names it (None: the default model); ``key`` keeps a caller on one side of
        an A/B split; ``request_id`` lets :meth:`feedback` give its ground truth later.

        Raises:
            UnknownModelError: no such model.
            StateError: no model is serving, or the agent is stopping.
            InputValidationError: the inputs do not match the model.
            InferenceError: the model failed.
        """
        return self.predict_versioned(inputs, model=model, key=key, request_id=request_id)[1]

    def predict_versioned(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        model: str | None = None,
        key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        """Like :meth:`predict`, also naming the version (manifest digest) that answered.

        Raises:
            as :meth:`predict`.
        """
        version, outputs = self.host(model).predict_request(inputs, key=key, request_id=request_id)
        return version or "", outputs

    def feedback(
        self, request_id: str, label: object, *, model: str | None = None
    ) -> dict[str, Any]:
        """The ground truth for an earlier request: scores each version that answered it.

        Raises:
            UnknownModelError: no such model.
            UnknownRequestError: the request id is unknown, or too old to be remembered.
            InputValidationError: the label does not fit the model's output.
        """
        return self.host(model).feedback(request_id, label)

    def status(self, model: str | None = None) -> dict[str, Any]:
        """A model's reported state document (as published on its ``state`` topic).

        Raises:
            UnknownModelError: no such model.
            StateError: the state file is unreadable.
        """
        return self.host(model).state_document()

    def apply_desired(self, desired: Desired | None, *, model: str | None = None) -> None:
        """Ask for ``desired`` (None clears it); the model's worker installs it in the
        background. The model is the desired state's own (``desired.model``) or ``model``.

        This is what a message on a ``desired`` topic does; an application without a
        broker may call it directly.

        Raises:
            UnknownModelError: this agent serves no such model.
        """
        name = desired.model if desired is not None else model
        self.host(name).apply_desired(desired)

    def start(self) -> None:
        """Resume, serve the current version, connect, report, listen for desired state.

        Raises:
            StateError: another agent runs on this state directory, or the state file is
                corrupt (run ``edgeship-agent recover-state``).
            ConfigError: the HTTP endpoint cannot listen.
        """
        if self._started:
            return
        self._claim = self._root.claim()
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
                    "serving": {name: h.slot.digest for name, h in self.hosts.items()},
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
        drained = True
        for host in self.hosts.values():  # every one, whatever the one before did
            drained = host.stop_serving(left()) and drained
        for host in self.hosts.values():
            host.follower.stop(left(0.1, 5.0))
            host.close()
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
        self._wake_all()
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
        for host in self.hosts.values():
            host.updater.status()  # raises StateError on a corrupt state file
        if self.transport is not None:
            self._start_reporter()
        for host in self.hosts.values():
            host.resume()
        self._publish_all()
        if self.transport is not None and self.reporter is not None:
            # Trust first: retained messages arrive in the order of the subscriptions.
            self.transport.subscribe(self.topics.trust_root, self._on_root)
            self.transport.subscribe(self.topics.trust_heartbeat, self._on_heartbeat)
            for name in self.hosts:
                self.transport.subscribe(self.topics.desired_for(name), self._desired_handler(name))
            self.transport.subscribe(self.topics.feedback, self._on_feedback)
            self.transport.start()
            self.reporter.start()
            if cfg.mqtt_serving.enabled:
                from agent.serve.mqtt import MqttInferenceServer  # noqa: PLC0415 - when used

                self.mqtt_server = MqttInferenceServer(
                    self.router, self.transport, self.topics, cfg.mqtt_serving
                )
                self.mqtt_server.start()
        if cfg.http.enabled:
            from agent.serve.http import HttpServer  # noqa: PLC0415 - when used
            from agent.telemetry._exposition import exposition  # noqa: PLC0415

            # One model: its series as they always were; several: each labelled model="NAME".
            named = {name: h.metrics for name, h in self.hosts.items()}
            metrics = self.metrics if len(named) == 1 else named
            self.http = HttpServer(self.router, cfg.http, metrics_text=lambda: exposition(metrics))
            self.http.start()
        for host in self.hosts.values():
            host.follower.start()

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
            sections=lambda: [host.telemetry_section() for host in self.hosts.values()],
        )

    def _desired_handler(self, name: str) -> Callable[[Message], None]:
        def on_desired(message: Message) -> None:
            # On the transport's network thread: parse and hand over, never block.
            try:
                desired = parse_desired(
                    message.payload,
                    fleet=self.config.fleet,
                    device=self.config.device_id,
                    model=name,
                )
            except ValueError as exc:
                log.warning("ignoring a desired-state message: %s", exc)
                return
            self.hosts[name].apply_desired(desired)

        return on_desired

    def _on_feedback(self, message: Message) -> None:
        from agent.messages.feedback import parse_feedback  # noqa: PLC0415 - with a broker only

        try:
            item = parse_feedback(message.payload)
            self.host(item.model).feedback(item.request_id, item.label)
        except (ValueError, EdgeshipError) as exc:
            log.info("feedback not taken: %s", exc)

    def _on_root(self, message: Message) -> None:
        # On the network thread: queue only; the worker verifies (and may fetch a chain).
        self.trust.offer_root(message.payload)
        self._wake_all()

    def _on_heartbeat(self, message: Message) -> None:
        self.trust.offer_heartbeat(message.payload)
        self._wake_all()

    def _wake_all(self) -> None:
        for host in self.hosts.values():
            host.follower.wake()

    def _emit(self, kind: str, fields: Mapping[str, Any]) -> None:
        log.info(kind, extra={"fields": dict(fields)})
        if self.reporter is not None:
            self.reporter.event_sink(kind, fields)

    def _publish_host(self, host: ModelHost) -> None:
        if self.reporter is None:
            return
        try:
            self.reporter.set_state(host.state_document(), self.topics.state_for(host.name))
        except (EdgeshipError, ValueError) as exc:
            log.error("cannot publish the reported state of model %s: %s", host.name, exc)  # noqa: TRY400 - expected; no traceback

    def _publish_all(self) -> None:
        for host in self.hosts.values():
            self._publish_host(host)


def _mqtt_transport(config: AgentConfig) -> Transport:
    from agent import __version__  # noqa: PLC0415 - avoids a cycle at import time
    from agent.messages.status import device_presence  # noqa: PLC0415 - with a broker only
    from agent.plumbing.mqtt import MqttClient  # noqa: PLC0415 - with a broker only

    assert config.broker is not None  # the caller checked
    attributes = {"agent_version": __version__, **config.attributes}
    presence = device_presence(Topics(config.fleet, config.device_id), attributes)
    # Raises ConfigError itself when the TLS files or the password file are unusable.
    return MqttClient(config.broker, presence=presence)
