"""The fleet in Prometheus: ``/metrics`` served from the fleet store, read at scrape time.

A custom collector (:class:`FleetCollector`) answers each scrape from two queries on the
store (:mod:`sdk.fleet.views`): the devices with their latest telemetry, and the rollouts
still running, halted or changed within ``rollout_window_s``. Nothing is kept between
scrapes and no gauge is set per message, so every scrape is one consistent reading of
the store, whichever collectors (one or many, on this host or others) write it.

Series per device, labelled ``fleet`` and ``device`` (docs/fleet.md, "Prometheus"):
online, last-seen age, trust root version, heartbeat expiry, held back (at most
:data:`DEVICE_SERIES`); and per model of the device, labelled ``model`` too: version
info, requests and errors (counters), latency p50/p95/p99, the bundle's p95 budget, drift
PSI (the worst feature) and band, confidence, feedback accuracy and, while a candidate is
held in shadow or A/B, its stage and numbers (at most :data:`MODEL_SERIES`), plus
``top_k`` (the highest-PSI features, labelled ``input`` and ``feature``). Telemetry older
than ``max_age_s`` is not exported: a silent device shows only its online state and
last-seen age, not numbers that would keep an alert firing on stale data.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from agent.errors import ConfigError
from sdk.errors import StoreError
from sdk.fleet.store import Store
from sdk.fleet.views import DRIFT_BANDS, DeviceView, RolloutView, device_views, rollout_views

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["DEVICE_SERIES", "MODEL_SERIES", "FleetCollector", "MetricsServer"]

log = logging.getLogger(__name__)

# Series per device, and per model of a device besides its top-k drift features (the
# documented bounds).
DEVICE_SERIES = 5
MODEL_SERIES = 15
_DEVICE = ("fleet", "device")
_MODEL = ("fleet", "device", "model")
_QUANTILES = (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms"))
_OUTCOMES = ("succeeded", "failed", "rejected", "pending", "waiting")


def _gauge(name: str, doc: str, *extra: str, unit: str = "") -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=[*_DEVICE, *extra], unit=unit)


def _model_gauge(name: str, doc: str, *extra: str, unit: str = "") -> GaugeMetricFamily:
    return _gauge(name, doc, "model", *extra, unit=unit)


class FleetCollector(Collector):
    """Reads the devices and rollouts of ``store`` (of ``fleet``, or all) at every scrape.

    ``top_k``: drift features exported per device (0: none). ``max_age_s``: telemetry
    older than this is not exported. ``rollout_window_s``: completed and aborted rollouts
    are exported this long after their last change. A store that fails a scrape yields
    only ``edgeship_fleet_store_up 0`` (an alert, not a failed scrape).
    """

    def __init__(
        self,
        store: Store,
        *,
        fleet: str | None = None,
        top_k: int = 3,
        max_age_s: float = 900.0,
        rollout_window_s: float = 86_400.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if top_k < 0 or max_age_s <= 0 or rollout_window_s < 0:
            raise ConfigError("top-k must be >= 0, max age positive, rollout window >= 0")
        self.store = store
        self.fleet = fleet
        self.top_k = top_k
        self.max_age_s = max_age_s
        self.rollout_window_s = rollout_window_s
        self._clock = clock
        # One store connection, and scrapes may come at once: one reading at a time.
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        now = self._clock()
        up = GaugeMetricFamily("edgeship_fleet_store_up", "1 if the fleet store answered")
        try:
            with self._lock:
                devices = device_views(self.store, fleet=self.fleet, top_k=self.top_k)
                rollouts = rollout_views(
                    self.store, fleet=self.fleet, since=now - self.rollout_window_s
                )
        except StoreError as e:
            log.warning("metrics: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _device_families(devices, now, self.max_age_s)
        yield from _rollout_families(rollouts)
        took = GaugeMetricFamily(
            "edgeship_fleet_scrape_duration_seconds", "time to read the store for this scrape"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took


def _device_families(views: list[DeviceView], now: float, max_age_s: float) -> Iterator[Metric]:
    online = _gauge("edgeship_device_online", "1 online, 0 offline (absent: never seen)")
    seen = _gauge(
        "edgeship_device_last_seen_age", "seconds since the collector last heard", unit="seconds"
    )
    devices = {(v.fleet, v.device): v for v in reversed(views)}  # one (the first) per device
    for d in devices.values():
        key = [d.fleet, d.device]
        if d.online is not None:
            online.add_metric(key, 1.0 if d.online else 0.0)
        if d.last_seen is not None:
            seen.add_metric(key, max(0.0, now - d.last_seen))
    yield from (online, seen)
    yield from _trust_families(views)
    models = [v for v in views if v.model is not None]
    yield from _model_families(models)
    fresh = [d for d in models if d.telemetry_ts is not None and now - d.telemetry_ts <= max_age_s]
    yield from _telemetry_families(fresh)


def _model_families(models: list[DeviceView]) -> Iterator[Metric]:
    info = _model_gauge(
        "edgeship_device_version_info",
        "the installed version of the model (1)",
        "name",
        "version",
        "sequence",
        "digest",
    )
    requests = CounterMetricFamily(
        "edgeship_device_requests", "predictions reported", labels=list(_MODEL)
    )
    errors = CounterMetricFamily(
        "edgeship_device_errors", "failed predictions reported", labels=list(_MODEL)
    )
    for d in models:
        key = [d.fleet, d.device, d.model or ""]
        if d.version is not None:
            info.add_metric(
                [*key, d.name or "", d.version, str(d.sequence or ""), d.digest or ""], 1.0
            )
        requests.add_metric(key, d.requests_total)
        errors.add_metric(key, d.errors_total)
    yield from (info, requests, errors)


def _trust_families(views: list[DeviceView]) -> Iterator[Metric]:
    """The device's trust, as the first of its models that reports one says (one root per
    agent: every model reports the same)."""
    root = _gauge("edgeship_device_trust_root_version", "version of the trust root in force")
    beat = _gauge(
        "edgeship_device_trust_heartbeat_expiry_timestamp",
        "when the device's latest fleet heartbeat expires (Unix time)",
        unit="seconds",
    )
    held = _gauge("edgeship_device_updates_held_back", "1 when the device holds updates back")
    done: set[tuple[str, str]] = set()
    for d in views:
        if (d.fleet, d.device) in done or d.trust_root_version is None:
            continue
        done.add((d.fleet, d.device))
        key = [d.fleet, d.device]
        root.add_metric(key, d.trust_root_version)
        held.add_metric(key, 0.0 if d.held_back is None else 1.0)
        if d.heartbeat_expires is not None:
            beat.add_metric(key, d.heartbeat_expires)
    yield from (root, beat, held)


def _telemetry_families(devices: list[DeviceView]) -> Iterator[Metric]:
    latency = _model_gauge(
        "edgeship_device_latency",
        "prediction latency quantile over the latest telemetry window",
        "quantile",
        unit="seconds",
    )
    budget = _model_gauge(
        "edgeship_device_latency_budget",
        "the serving bundle's p95 latency budget (manifest health.latency_budget_p95_ms)",
        unit="seconds",
    )
    psi = _model_gauge("edgeship_device_drift_psi_max", "the largest PSI of any input feature")
    band = _model_gauge(
        "edgeship_device_drift_band", "drift band: 0 stable, 1 moderate, 2 significant"
    )
    top = _model_gauge(
        "edgeship_device_drift_feature_psi", "PSI of the top-k features", "input", "feature"
    )
    confidence = _model_gauge(
        "edgeship_device_confidence", "mean top class score of sampled outputs"
    )
    accuracy = _model_gauge("edgeship_device_feedback_accuracy", "accuracy on labelled feedback")
    yield from _stage_families(devices)
    for d in devices:
        key = [d.fleet, d.device, d.model or ""]
        for quantile, field in _QUANTILES:
            value = getattr(d, field)
            if value is not None:
                latency.add_metric([*key, quantile], value / 1e3)
        if d.latency_budget_ms is not None:
            budget.add_metric(key, d.latency_budget_ms / 1e3)
        if d.psi_max is not None:
            psi.add_metric(key, d.psi_max)
        if d.drift_band in DRIFT_BANDS:
            band.add_metric(key, DRIFT_BANDS.index(d.drift_band))
        for f in d.top_features:
            top.add_metric([*key, f.input, str(f.index)], f.psi)
        if d.confidence is not None:
            confidence.add_metric(key, d.confidence)
        if d.feedback_accuracy is not None:
            accuracy.add_metric(key, d.feedback_accuracy)
    yield from (latency, budget, psi, band, top, confidence, accuracy)


def _rollout_families(rollouts: list[RolloutView]) -> Iterator[Metric]:
    status = GaugeMetricFamily(
        "edgeship_rollout_status",
        "1 for the rollout's status (running, halted, completed, aborted)",
        labels=["fleet", "rollout", "model", "name", "version", "status"],
    )
    devices = GaugeMetricFamily(
        "edgeship_rollout_devices",
        "devices of the rollout by outcome (succeeded, failed, rejected, pending, waiting)",
        labels=["fleet", "rollout", "outcome"],
    )
    for r in rollouts:
        status.add_metric([r.fleet, r.id, r.model, r.name, r.version, r.status], 1.0)
        for outcome in _OUTCOMES:
            devices.add_metric([r.fleet, r.id, outcome], r.count(outcome))
    yield from (status, devices)


class MetricsServer:
    """``/metrics`` for ``collector`` on ``host:port`` (prometheus-client's HTTP server, in
    a thread). Loopback by default: the metrics name every device of the fleet.

    Raises (constructor):
        ConfigError: the address cannot be bound.
    """

    def __init__(self, collector: FleetCollector, host: str = "127.0.0.1", port: int = 9470):
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise ConfigError(
                f"cannot serve metrics on {host}:{port}: {e.strerror}; choose another"
                " --metrics-port"
            ) from None
        self._server: WSGIServer = server
        self._thread = thread
        self.host = host
        self.port = int(server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def _stage_families(devices: list[DeviceView]) -> Iterator[Metric]:
    """A candidate held in shadow or A/B: which, and how it does so far."""
    stage = _model_gauge(
        "edgeship_device_stage_info", "1 for a candidate held in shadow or A/B", "stage", "digest"
    )
    samples = _model_gauge("edgeship_device_shadow_samples", "requests the shadow candidate ran")
    agreement = _model_gauge(
        "edgeship_device_shadow_agreement", "share of its answers agreeing with serving's"
    )
    ratio = _model_gauge(
        "edgeship_device_shadow_latency_ratio", "its median latency over serving's, same inputs"
    )
    share = _model_gauge("edgeship_device_split_share", "the A/B candidate's share of requests")
    for d in devices:
        s = d.stage
        if s is None:
            continue
        key = [d.fleet, d.device, d.model or ""]
        stage.add_metric([*key, s.kind, s.digest], 1.0)
        for family, value in (
            (samples, s.samples),
            (agreement, s.agreement),
            (ratio, s.latency_ratio),
            (share, s.share),
        ):
            if value is not None:
                family.add_metric(key, value)
    yield from (stage, samples, agreement, ratio, share)
