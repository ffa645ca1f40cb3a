"""A hand-made device for one model, speaking the messages of the issue-14 design
(/tmp/design14.md, docs/mqtt.md): named-model topics, shadow verdicts, A/B splits with
per-version telemetry. It has no model; a test scripts what it reports.

It follows its model's desired topic (``Topics.desired_for(model)``) and answers:

- a plain desired state: ``install-started``, ``activated``, ``committed``, with a
  retained state after each step (as the updater does);
- one with ``"shadow"``: ``shadow-started`` and a state in phase ``shadow``; then, once
  :meth:`ModelDevice.verdict` is called (or at once with ``shadow_verdict``),
  ``shadow-passed`` + ``activated`` + ``committed``, or ``shadow-rejected`` + ``failed``
  (phase ``shadow``) with the numbers;
- one with ``"split"``: ``split-started``, a state with ``split``, and telemetry every
  ``telemetry_s`` with ``versions`` (the serving version's and the candidate's numbers
  per window, from ``serving_window`` / ``candidate_window``); a desired state for the
  same bundle without ``split`` promotes it (``split-ended`` promoted, then activated and
  committed), one naming the serving version drops it (``split-ended`` dropped).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from agent.messages.desired import DEFAULT_MODEL
from agent.messages.status import device_presence
from agent.messages.topics import Topics, encode_json
from agent.plumbing.broker import BrokerConfig
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.transport import Message
from tests.support.broker import Broker

__all__ = ["REJECTION", "SERVING", "ModelDevice", "Window"]

# What every device serves before a rollout: sequence 3 of "digits".
SERVING = {"digest": "aa" * 32, "name": "digits", "version": "1.0.0", "sequence": 3}
# The numbers of a shadow rejection (a device's own words).
REJECTION = {
    "reason": "agreement 0.620 can no longer reach 0.99 over 200 samples",
    "samples": 80,
    "agreement": 0.62,
    "latency_ratio": 1.05,
    "accuracy": None,
}


@dataclass(frozen=True)
class Window:
    """What one version did in one telemetry window."""

    requests: int
    errors: int = 0
    p95_ms: float = 2.0
    labels: int = 0
    correct: int = 0

    def entry(self, digest: str, role: str) -> dict[str, Any]:
        return {
            "digest": digest,
            "role": role,
            "requests": self.requests,
            "error_count": self.errors,
            "latency_ms": {"p50": self.p95_ms / 2, "p95": self.p95_ms, "p99": self.p95_ms * 1.5},
            "feedback": {"labels": self.labels, "correct": self.correct},
        }


class ModelDevice:
    def __init__(
        self,
        broker: Broker,
        fleet: str,
        device: str,
        model: str = DEFAULT_MODEL,
        *,
        shadow_verdict: str | None = None,
        serving_window: Window = Window(100),
        candidate_window: Window = Window(25),
        telemetry_s: float = 0.1,
    ) -> None:
        self.fleet, self.device, self.model = fleet, device, model
        self.topics = Topics(fleet, device)
        self.current: dict[str, Any] | None = dict(SERVING)
        self.pending: dict[str, Any] | None = None
        self.probation: dict[str, Any] | None = {"digest": SERVING["digest"], "passed": True}
        self.last_failure: dict[str, Any] | None = None
        self.shadow: dict[str, Any] | None = None
        self.split: dict[str, Any] | None = None
        self.serving_window, self.candidate_window = serving_window, candidate_window
        self.telemetry_s = telemetry_s
        self.events: list[dict[str, Any]] = []
        self.desired_seen: list[dict[str, Any]] = []
        self._shadow_verdict = shadow_verdict
        self._verdict_given = threading.Event()
        self._split_over = threading.Event()
        self._lock = threading.Lock()
        self._seq = 0
        # One connection per model (an agent has one for all): its own client id.
        self.transport = MqttClient(
            BrokerConfig(broker.url, backoff_initial_s=0.1, backoff_max_s=0.5),
            client_id=f"{fleet}-{device}-{model}",
            presence=device_presence(self.topics),
        )
        self.transport.subscribe(self.topics.desired_for(model), self._on_desired)

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> ModelDevice:
        self.transport.start()
        if not self.transport.wait_connected(10.0):
            raise RuntimeError(f"device {self.device} could not connect")
        self.publish_state()
        return self

    def stop(self) -> None:
        self._split_over.set()
        self._verdict_given.set()
        self.transport.stop()

    def verdict(self, verdict: str) -> None:
        """Let the device decide its shadow: "promote" or "reject"."""
        self._shadow_verdict = verdict
        self._verdict_given.set()

    # --- messages ----------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        with self._lock:
            self._seq += 1
            seq = self._seq
        return {
            "v": 1, "fleet": self.fleet, "device": self.device, "ts": round(time.time(), 3),
            "seq": seq, "model": self.model,
        }  # fmt: skip

    def event(self, kind: str, **fields: Any) -> None:
        body = {**self._header(), "event": kind, **fields}
        self.events.append(body)
        self.transport.publish(self.topics.events, encode_json(body))

    def publish_state(self) -> None:
        body = {
            "v": 1, "fleet": self.fleet, "device": self.device, "ts": round(time.time(), 3),
            "model": self.model, "current": self.current, "previous": None,
            "pending": self.pending, "last_failure": self.last_failure,
            "probation": self.probation, "floor": SERVING["sequence"],
        }  # fmt: skip
        if self.shadow is not None:
            body["shadow"] = self.shadow
        if self.split is not None:
            body["split"] = self.split
        self.transport.publish(self.topics.state_for(self.model), encode_json(body), retain=True)

    def telemetry(self, candidate: str) -> None:
        s, c = self.serving_window, self.candidate_window
        assert self.current is not None
        body = {
            **self._header(),
            "interval_s": self.telemetry_s,
            "metrics": {
                "window_s": self.telemetry_s,
                "requests": s.requests + c.requests,
                "error_count": s.errors + c.errors,
                "latency_ms": {"p50": 1.0, "p95": max(s.p95_ms, c.p95_ms), "p99": 5.0},
                "model": {k: self.current[k] for k in ("name", "version", "sequence")},
            },
            "versions": [
                s.entry(self.current["digest"], "serving"),
                c.entry(candidate, "candidate"),
            ],
        }
        self.transport.publish(self.topics.telemetry, encode_json(body))

    # --- what it does ------------------------------------------------------------------

    def _on_desired(self, msg: Message) -> None:
        if not msg.payload:
            return
        doc = json.loads(msg.payload)
        self.desired_seen.append(doc)
        bundle = doc["bundle"]
        digest = bundle["digest"]
        if self.split is not None and "split" not in doc:  # the fleet decides the split
            outcome = "promoted" if digest == self.split["digest"] else "dropped"
            target = self._promote_split if outcome == "promoted" else self._drop_split
            threading.Thread(target=target, daemon=True).start()
            return
        if self.current is not None and self.current["digest"] == digest:
            return
        if "shadow" in doc:
            target, args = self._run_shadow, (bundle, doc["shadow"])
        elif "split" in doc:
            target, args = self._run_split, (bundle, doc["split"]["share"])
        else:
            target, args = self._install, (bundle,)
        threading.Thread(target=target, args=args, daemon=True).start()

    def _install(self, bundle: dict[str, Any]) -> None:
        digest = bundle["digest"]
        self.event("install-started", digest=digest, sequence=bundle["sequence"])
        self._activate(bundle)

    def _activate(self, bundle: dict[str, Any]) -> None:
        digest = bundle["digest"]
        self.current = {k: bundle[k] for k in ("digest", "name", "version", "sequence")}
        self.pending = self.shadow = self.split = None
        self.probation = {"digest": digest, "passed": False}
        self.event("activated", digest=digest)
        self.publish_state()
        self.probation = {"digest": digest, "passed": True}
        self.event("committed", digest=digest)
        self.publish_state()

    def _run_shadow(self, bundle: dict[str, Any], rule: dict[str, Any]) -> None:
        digest = bundle["digest"]
        self.event("shadow-started", digest=digest, rule=rule)
        self.pending = {"sha256": bundle["sha256"], "digest": digest, "phase": "shadow"}
        self.shadow = {
            "digest": digest, "samples": 40, "agreement": 0.99, "latency_ratio": 1.1,
            "accuracy": None, "dropped": 0, "verdict": "watching",
        }  # fmt: skip
        self.publish_state()
        if self._shadow_verdict is None:
            self._verdict_given.wait()
        if self._shadow_verdict == "promote":
            numbers = {"samples": 200, "agreement": 0.995, "latency_ratio": 1.1, "accuracy": None}
            self.event("shadow-passed", digest=digest, **numbers)
            self._activate(bundle)
            return
        self.event("shadow-rejected", digest=digest, **REJECTION)
        self.event("failed", digest=digest, phase="shadow", reason=REJECTION["reason"])
        self.pending = self.shadow = None
        self.last_failure = {
            "digest": digest, "phase": "shadow", "outcome": "failed",
            "reason": REJECTION["reason"], "time": time.time(),
        }  # fmt: skip
        self.publish_state()

    def _run_split(self, bundle: dict[str, Any], share: float) -> None:
        digest = bundle["digest"]
        self._candidate = bundle
        self.event("split-started", digest=digest, share=share)
        self.pending = {"sha256": bundle["sha256"], "digest": digest, "phase": "split"}
        self.split = {"digest": digest, "share": share}
        self.publish_state()
        while not self._split_over.wait(self.telemetry_s):
            self.telemetry(digest)

    def _promote_split(self) -> None:
        self._split_over.set()
        self.event("split-ended", digest=self._candidate["digest"], outcome="promoted")
        self._activate(self._candidate)

    def _drop_split(self) -> None:
        self._split_over.set()
        self.event("split-ended", digest=self._candidate["digest"], outcome="dropped")
        self.pending = self.split = None
        self.publish_state()
