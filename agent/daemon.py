"""The long-running agent: serve the current model, follow the desired state, report.

:class:`Agent` composes the parts: the :class:`~agent.install._updater.Updater` and its
:class:`~agent.serve._slot.ModelSlot`, telemetry (:class:`~agent.telemetry.Reporter` with
its durable outbox, metrics and drift), the MQTT transport, MQTT and HTTP serving and the
optional prediction cache. ``edgeship-agent run --config agent.toml`` runs one with
signal handling (agent/cli/_run.py); an application embeds one in-process::

    with Agent(load_config(Path("agent.toml"))) as agent:
        outputs = agent.predict({"x": batch})

Desired state arrives retained on ``edgeship/v1/<fleet>/<device>/desired``. It is
untrusted: the updater's signature check is the trust, the message only says what to
fetch. Installs run in ONE background worker, never on the transport's network thread;
messages are coalesced (only the latest desired matters) and a bundle that failed for
good is not tried again for the same desired message (a re-publish with a new ``ts`` is
an explicit retry, still bounded by the updater's loop budget). After an install the
worker watches the candidate's probation, which commits it or rolls it back.

The reported state (retained ``state``) is re-published after every lifecycle event and
desired-state change; see :func:`state_document`.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy.typing as npt

from agent.bundle._verify import DeviceInfo, Limits
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.config import AgentConfig, TelemetryConfig
from agent.errors import (
    BundleError,
    ConfigError,
    EdgeshipError,
    FetchError,
    InferenceError,
    InputValidationError,
    OverloadedError,
    StateError,
)
from agent.install._fetch import Fetcher, UrlFetcher
from agent.install._store import AgentState, Store
from agent.install._updater import Updater, UpdaterConfig, check_acceptance
from agent.messages.desired import Desired, parse_desired
from agent.messages.topics import Topics
from agent.plumbing.mqtt import MqttTransport
from agent.plumbing.transport import Message, Transport
from agent.serve._cache import PredictionCache, Predictor, predict_versioned
from agent.serve._slot import ModelSlot
from agent.serve.http import HttpServer
from agent.serve.mqtt import MqttInferenceServer
from agent.serve.runtimes import installed_runtimes
from agent.telemetry import DriftMonitor, Metrics, Outbox, Reporter, ReporterConfig, SystemSampler

__all__ = ["Agent", "load_policy", "state_document"]

log = logging.getLogger("edgeship.agent")


def load_policy(path: Path) -> TrustPolicy:
    """Read the trust policy file.

    Raises:
        ConfigError: unreadable or invalid.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read trust policy {path}: {exc.strerror}") from None
    return TrustPolicy.from_toml(data)


def _version(store: Store, digest: str | None) -> dict[str, Any] | None:
    if digest is None:
        return None
    try:
        m = store.manifest(digest)
    except StateError:
        return {"digest": digest, "name": None, "version": None, "sequence": None}
    return {"digest": digest, "name": m.name, "version": m.version, "sequence": m.sequence}


def state_document(
    store: Store,
    state: AgentState,
    *,
    probation: Mapping[str, Any] | None,
    desired_digest: str | None,
) -> dict[str, Any]:
    """The reported ``state`` fields (the reporter adds ``v``, ``fleet``, ``device``, ``ts``)."""
    p, f = state.pending, state.last_failure
    return {
        "current": _version(store, state.current),
        "previous": _version(store, state.previous),
        "pending": None if p is None else {"digest": p.digest, "phase": p.phase},
        "last_failure": None
        if f is None
        else {
            "digest": f.digest,
            "reason": f.reason,
            "ts": round(f.time, 3),
            "outcome": f.outcome,
            "phase": f.phase,
        },
        "probation": None if probation is None else dict(probation),
        "desired_digest": desired_digest,
        "floor": state.floor,
    }


def _error_kind(exc: BaseException) -> str:
    if isinstance(exc, InputValidationError):
        return "invalid-input"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, StateError):
        return "unavailable"
    if isinstance(exc, InferenceError):
        return "inference-failed"
    return "internal"


def _is_classifier(manifest: Manifest, kind: str) -> bool:
    if kind != "auto":
        return kind == "top_score"
    out = manifest.model.outputs[0]
    shape = out.shape
    return (
        out.dtype.startswith("float")
        and len(shape) == 2
        and isinstance(shape[1], int)
        and shape[1] >= 2
    )


class _Instrumented:
    """The agent's predictor: every call is timed and counted; sampled calls feed drift."""

    def __init__(self, agent: Agent, inner: Predictor) -> None:
        self._agent = agent
        self._inner = inner

    @property
    def digest(self) -> str | None:
        return self._agent.slot.digest

    def predict(self, inputs: Mapping[str, npt.ArrayLike]) -> dict[str, npt.NDArray[Any]]:
        return self.predict_versioned(inputs)[1]

    def predict_versioned(
        self, inputs: Mapping[str, npt.ArrayLike]
    ) -> tuple[str, dict[str, npt.NDArray[Any]]]:
        agent = self._agent
        metrics = agent.metrics
        start = time.perf_counter()
        if agent.stopping:
            metrics.record(0.0, "unavailable")
            raise StateError("the agent is stopping; retry against another instance")
        try:
            version, outputs = predict_versioned(self._inner, inputs)
        except Exception as exc:
            metrics.record(time.perf_counter() - start, _error_kind(exc))
            raise
        metrics.record(time.perf_counter() - start)
        watch = agent.drift_for
        if watch is not None and watch[0] == version:
            _, drift, output_name = watch
            try:
                drift.observe(inputs, outputs.get(output_name))  # type: ignore[arg-type]
            except (ValueError, TypeError, IndexError) as exc:
                # Telemetry must never fail a prediction the model answered.
                log.debug("drift observation skipped: %s", exc)
        return version or "", outputs


class Agent:
    """The device agent, in-process. Thread-safe; use as a context manager or call
    :meth:`start` / :meth:`stop`.

    Raises (from the constructor):
        ConfigError: the trust policy or the MQTT settings are unusable.
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
        self.metrics = Metrics()
        self.drift_for: tuple[str, DriftMonitor, str] | None = None
        self.stopping = False
        self._started = False
        self._stopped = False
        self._lock = threading.Lock()  # state publishing and desired bookkeeping
        self._wake = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._desired: Desired | None = None
        self._desired_gen = 0
        self._given_up: dict[Desired, None] = {}  # insertion-ordered: oldest first
        self._retry_at: float | None = None
        self._retry_delay_s = config.fetch.retry_initial_s
        self._probation: dict[str, Any] | None = None
        self._candidate: str | None = None
        self._lock_fd: int | None = None
        policy = load_policy(config.trust_policy)
        self.updater = Updater(
            config.state_dir,
            policy,
            config=UpdaterConfig(
                max_attempts=config.update.max_attempts,
                fetch=config.fetch.limits(),
                bundle=Limits(
                    max_bundle_bytes=config.fetch.max_bundle_bytes,
                    clock_slack_seconds=config.update.clock_slack_s,
                ),
                health_runs=config.update.health_runs,
                health_gate=config.update.health_gate,
                health_gate_priority=config.update.health_gate_priority,
                health_gate_timeout_s=config.update.health_gate_timeout_s,
                runtime_options=config.runtime,
                decryption_key=config.decryption_key,
            ),
            device=DeviceInfo(runtimes=installed_runtimes(), device_class=config.device_class),
            fetcher=fetcher or UrlFetcher.from_tls(config.fetch.tls, setting="fetch"),
            slot=self.slot,
            events=self._on_event,
        )
        self.store: Store = self.updater.store
        self.transport: Transport | None = transport
        if transport is None and config.broker is not None:
            try:
                self.transport = MqttTransport(
                    config.broker.mqtt_config(
                        config.fleet,
                        config.device_id,
                        {"agent_version": _agent_version(), **config.attributes},
                    )
                )
            except OSError as exc:  # ssl.SSLError is an OSError
                raise ConfigError(f"broker TLS files are unusable: {exc}") from None
        self.reporter: Reporter | None = None
        self.outbox: Outbox | None = None
        inner: Predictor = self.slot
        self.cache = None
        if config.cache.enabled:
            self.cache = PredictionCache(self.slot, config.cache)
            inner = self.cache
        self.predictor = _Instrumented(self, inner)
        self.http: HttpServer | None = None
        self.mqtt_server: MqttInferenceServer | None = None
        self._worker: threading.Thread | None = None

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
        with self._lock:
            desired = self._desired
            probation = self._probation
        return state_document(
            self.store,
            self.updater.status(),
            probation=probation,
            desired_digest=None if desired is None else desired.digest,
        )

    def apply_desired(self, desired: Desired | None) -> None:
        """Ask for ``desired`` (None clears it); the worker installs it in the background.

        This is what a message on the ``desired`` topic does; an application without a
        broker may call it directly.
        """
        with self._wake:
            if desired == self._desired:
                return  # a retained message delivered again on reconnect: already known
            self._desired = desired
            self._desired_gen += 1
            self._retry_at = None
            self._retry_delay_s = self.config.fetch.retry_initial_s
            self._wake.notify_all()
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
        cfg = self.config
        self.store.init()
        self._take_daemon_lock()
        try:
            self._start(cfg)
        except BaseException:
            self.stop()
            raise
        self._started = True
        log.info(
            "agent started",
            extra={
                "fields": {
                    "device": cfg.device_id,
                    "fleet": cfg.fleet,
                    "serving": self.slot.digest,
                    "http": None if self.http is None else self.http.url,
                }
            },
        )

    def _start(self, cfg: AgentConfig) -> None:
        state = self.updater.status()  # raises StateError on a corrupt state file
        if state.current is not None:
            self._probation = {"digest": state.current, "passed": True}
        if state.pending is not None and state.pending.phase == "probation":
            self._candidate = state.pending.digest
        if self.transport is not None:
            self.outbox = Outbox(
                cfg.state_dir / "outbox.sqlite", max_bytes=cfg.telemetry.outbox_max_bytes
            )
            self.reporter = Reporter(
                self.topics,
                self.outbox,
                self.transport,
                metrics=self.metrics,
                system=SystemSampler(cfg.state_dir),
                config=_reporter_config(cfg.telemetry),
            )
        try:
            self.updater.resume()
        except EdgeshipError as exc:
            # The interrupted install failed again; the current version still serves.
            log.warning("resuming the interrupted install failed: %s", exc)
        try:
            self.updater.start_serving()
        except EdgeshipError as exc:
            log.error("cannot serve the current version: %s", exc)  # noqa: TRY400 - expected; no traceback
        self._model_changed()
        self._publish_state()
        if self.transport is not None and self.reporter is not None:
            self.transport.subscribe(self.topics.desired, self._on_desired)
            self.transport.start()
            self.reporter.start()
            if cfg.mqtt_serving_enabled:
                self.mqtt_server = MqttInferenceServer(
                    self.predictor, self.transport, self.topics, cfg.mqtt_serving
                )
                self.mqtt_server.start()
        if cfg.http.enabled:
            self.http = HttpServer(self.predictor, cfg.http)
            self.http.start()
        self._worker = threading.Thread(target=self._work, name="edgeship-updater", daemon=True)
        self._worker.start()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop taking requests, let calls in flight finish (bounded), flush, go offline.

        Returns False if calls were still running after the drain timeout.
        """
        if self._stopped:
            return True
        self._stopped = True
        timeout = self.config.drain_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if self.http is not None:
            # No new connections; requests already received finish and answer.
            self.http.stop(drain_timeout_s=max(0.0, deadline - time.monotonic()))
        if self.mqtt_server is not None:
            # Requests still queued get "unavailable"; the one running finishes and answers.
            self.mqtt_server.stop(timeout_s=max(0.1, deadline - time.monotonic()))
        self.stopping = True
        with self._wake:
            self._stop.set()
            self._wake.notify_all()
        drained = self.slot.stop(timeout_s=max(0.0, deadline - time.monotonic()))
        if self._worker is not None:
            # An install in progress is safe to abandon: the updater persisted its phase.
            self._worker.join(max(0.1, min(5.0, deadline - time.monotonic())))
        if self.reporter is not None:
            with contextlib.suppress(Exception):
                self.reporter.report_now()  # the last interval's numbers
            self.reporter.flush(max(0.1, min(2.0, deadline - time.monotonic())))
            self.reporter.stop()
        if self.transport is not None:
            self.transport.stop()  # publishes status offline (reason "shutdown")
        if self.outbox is not None:
            self.outbox.close()
        self._release_daemon_lock()
        if self._started:
            log.info("agent stopped", extra={"fields": {"drained": drained}})
        self._started = False
        return drained

    def reload(self, config: AgentConfig) -> list[str]:
        """Apply what can change while running; returns what needs a restart instead.

        Reloaded: the trust policy file (always re-read), the telemetry interval. Logging
        is the caller's (the CLI reconfigures it).

        Raises:
            ConfigError: the new trust policy is invalid (the old one stays in force).
        """
        self.updater.policy = load_policy(config.trust_policy)
        log.info("trust policy reloaded", extra={"fields": {"path": str(config.trust_policy)}})
        old = self.config
        if config.telemetry.interval_s != old.telemetry.interval_s and self.reporter is not None:
            self.reporter.stop()
            self.reporter.config = _reporter_config(config.telemetry)
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
        if config.telemetry.interval_s == old.telemetry.interval_s and replace(
            config.telemetry, interval_s=0.0
        ) != replace(old.telemetry, interval_s=0.0):
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

    # --- desired state and the worker --------------------------------------------------

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

    def _work(self) -> None:
        handled = -1
        while not self._stop.is_set():
            self._watch_probation()
            with self._wake:
                while not self._stop.is_set():
                    due = self._retry_at is not None and time.monotonic() >= self._retry_at
                    if self._desired_gen != handled or due:
                        break
                    wait = None if self._retry_at is None else self._retry_at - time.monotonic()
                    self._wake.wait(wait)
                if self._stop.is_set():
                    return
                handled = self._desired_gen
                desired = self._desired
                self._retry_at = None
            if desired is not None:
                try:
                    self._install(desired)
                except Exception:
                    # The worker must survive anything; the next desired deserves a try.
                    log.exception("install of %s failed unexpectedly", desired.digest[:12])
                    self._give_up(desired)

    def _give_up(self, desired: Desired) -> None:
        with self._lock:
            self._given_up[desired] = None
            # Bounded memory: only recent desired messages matter.
            while len(self._given_up) > 64:
                del self._given_up[next(iter(self._given_up))]

    def _install(self, desired: Desired) -> None:
        with self._lock:
            if desired in self._given_up:
                return
        state = self.updater.status()
        if desired.digest == state.current and state.pending is None:
            return
        try:
            # The sequence is untrusted here; this only saves a pointless download.
            check_acceptance(
                state,
                sequence=desired.sequence,
                digest=desired.digest,
                max_attempts=self.config.update.max_attempts,
            )
        except EdgeshipError as exc:
            log.warning(
                "desired bundle not installed",
                extra={"fields": {"digest": desired.digest, "reason": str(exc)}},
            )
            self._emit("desired-refused", digest=desired.digest, reason=str(exc))
            self._give_up(desired)
            return
        log.info(
            "installing the desired bundle",
            extra={"fields": {"digest": desired.digest, "url": desired.url}},
        )
        try:
            result = self.updater.install(desired.url, sha256=desired.sha256)
        except FetchError as exc:
            with self._wake:
                delay = self._retry_delay_s
                self._retry_delay_s = min(delay * 2, self.config.fetch.retry_max_s)
                if self._desired == desired:
                    self._retry_at = time.monotonic() + delay
            log.warning(
                "download failed; retrying later",
                extra={"fields": {"digest": desired.digest, "retry_s": delay, "reason": str(exc)}},
            )
            return
        except (BundleError, StateError) as exc:
            log.warning(
                "install refused",
                extra={"fields": {"digest": desired.digest, "reason": str(exc)}},
            )
            self._give_up(desired)
            self._publish_state()
            return
        with self._lock:
            self._retry_delay_s = self.config.fetch.retry_initial_s
        if result.digest != desired.digest:
            log.warning(
                "the installed bundle is not the one the desired state named",
                extra={"fields": {"desired": desired.digest, "installed": result.digest}},
            )

    def _watch_probation(self) -> None:
        if self.slot.monitor() is None:
            return
        try:
            self.updater.watch_probation(self._stop)
        except EdgeshipError as exc:
            log.error("probation could not be decided: %s", exc)  # noqa: TRY400 - expected; no traceback

    # --- events, state, telemetry --------------------------------------------------------

    def _on_event(self, kind: str, fields: Mapping[str, Any], /) -> None:
        """The updater's event sink (called with the updater's lock held)."""
        log.info(kind, extra={"fields": dict(fields)})
        if self.reporter is not None:
            self.reporter.event_sink(kind, fields)
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

    def _emit(self, kind: str, **fields: Any) -> None:
        log.info(kind, extra={"fields": fields})
        if self.reporter is not None:
            self.reporter.event_sink(kind, fields)

    def _model_changed(self) -> None:
        """Name the serving model in metrics and give it a drift monitor of its own."""
        digest = self.slot.digest
        drift: DriftMonitor | None = None
        if digest is None:
            self.drift_for = None
        else:
            try:
                manifest = self.store.manifest(digest)
            except StateError as exc:
                log.warning("no telemetry reference for the serving model: %s", exc)
                self.drift_for = None
            else:
                self.metrics.set_model(manifest.name, manifest.version, manifest.sequence)
                drift = DriftMonitor(
                    manifest.drift_reference,
                    classifier=_is_classifier(manifest, self.config.telemetry.output_kind),
                )
                self.drift_for = (digest, drift, manifest.model.outputs[0].name)
        if self.reporter is not None:
            self.reporter.set_drift(drift)

    def _publish_state(self) -> None:
        if self.reporter is None:
            return
        try:
            with self._lock:
                doc = state_document(
                    self.store,
                    self.store.load(),
                    probation=self._probation,
                    desired_digest=None if self._desired is None else self._desired.digest,
                )
                self.reporter.set_state(doc)
        except (EdgeshipError, ValueError) as exc:
            log.error("cannot publish the reported state: %s", exc)  # noqa: TRY400 - expected; no traceback

    # --- one agent per state directory ---------------------------------------------------

    def _take_daemon_lock(self) -> None:
        path = self.config.state_dir / "agent.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise StateError(
                f"another edgeship agent is running on {self.config.state_dir}; stop it first"
            ) from None
        self._lock_fd = fd

    def _release_daemon_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _reporter_config(t: TelemetryConfig) -> ReporterConfig:
    return ReporterConfig(interval_s=t.interval_s, telemetry_ttl_s=t.ttl_s)


def _agent_version() -> str:
    from agent import __version__  # noqa: PLC0415 - avoids a cycle at import time

    return __version__
