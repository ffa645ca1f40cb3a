"""The fleet at a glance, from the collector's database: one row per model of a device.

Besides presence, the serving version and telemetry, each row carries what the model's
reported state says (docs/mqtt.md, "state"): a candidate in shadow (its samples,
agreement and verdict so far), an A/B split (the candidate and its share), and the online
accuracy of each version from the feedback it received. Trust is the device's (one trust
root per agent), as any of its models' states reports it: the version of the root it
holds, and why it is held back if it is. A device is *behind* when it holds an older root
than the latest one: the one the operator names, or else the newest any device of its
fleet reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from agent.messages.desired import DEFAULT_MODEL
from sdk.fleet.store import Store

__all__ = ["DeviceStatus", "accuracy_text", "fleet_status", "stage_text"]

_ROWS_SQL = """
SELECT d.fleet, d.device, d.status, d.attributes, d.last_seen, m.model, m.state,
  m.current_name, m.current_version, t.p95_ms, t.drift_band, t.psi_max, t.model_name,
  t.model_version
FROM devices d
LEFT JOIN device_models m ON m.fleet = d.fleet AND m.device = d.device
LEFT JOIN telemetry t ON t.fleet = m.fleet AND t.device = m.device AND t.seq = m.telemetry_seq
WHERE (CAST(? AS TEXT) IS NULL OR d.fleet = ?) AND (CAST(? AS TEXT) IS NULL OR m.model = ?)
ORDER BY d.fleet, d.device, m.model
"""


@dataclass(frozen=True)
class DeviceStatus:
    fleet: str
    device: str
    model: str | None  # the model (agent.toml [models.NAME]); None: nothing reported yet
    online: bool | None  # None: no status message seen
    name: str | None  # the serving bundle's name and version
    version: str | None
    last_seen: float | None
    p95_ms: float | None  # of the latest telemetry message
    error_rate: float | None  # errors / requests over the window
    drift_band: str | None
    psi_max: float | None
    attributes: dict[str, Any] | None
    root_version: int | None = None  # the trust root it holds (None: not reported)
    root_behind: bool | None = None  # holds an older root than the latest
    held_back: str | None = None  # why it knows updates are withheld, if it does
    unvouched: str | None = None  # why its root no longer vouches for what it serves
    # state "shadow": digest, samples, agreement, latency_ratio, accuracy, verdict
    shadow: dict[str, Any] | None = None
    split: dict[str, Any] | None = None  # state "split": digest, share
    # state "feedback" per version digest: labels, correct, accuracy (correct / labels)
    feedback: dict[str, dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def fleet_status(
    store: Store,
    *,
    now: float,
    fleet: str | None = None,
    model: str | None = None,
    window_s: float = 900.0,
    latest_root: int | None = None,
) -> list[DeviceStatus]:
    """One row per model of a device (of ``fleet``, of ``model``), sorted by fleet,
    device and model; ``latest_root``: the version of the fleet's latest trust root
    (default: the newest a device of the same fleet reports)."""
    rows = store.query(_ROWS_SQL, [fleet, fleet, model, model])
    states = {id(r): _loads(r["state"]) for r in rows}
    trust: dict[tuple[str, str], tuple[int | None, str | None, str | None]] = {}
    for r in rows:  # the device's trust: its default model's report, else any model's
        found = _trust(states[id(r)])
        key = (r["fleet"], r["device"])
        if any(v is not None for v in found) and (key not in trust or r["model"] == DEFAULT_MODEL):
            trust[key] = found
    newest: dict[str, int] = {}
    for (f, _), (version, _, _) in trust.items():
        if version is not None:
            newest[f] = max(version, newest.get(f, version))
    errors = {
        (r["fleet"], r["device"], r["model"]): r
        for r in store.query(
            "SELECT fleet, device, model, SUM(requests) AS requests, SUM(error_count) AS errors"
            " FROM telemetry WHERE ts >= ? GROUP BY fleet, device, model",
            [now - window_s],
        )
    }
    out = []
    for r in rows:
        e = errors.get((r["fleet"], r["device"], r["model"]), {})
        requests = e.get("requests")
        root_version, held_back, unvouched = trust.get((r["fleet"], r["device"]), (None,) * 3)
        target = latest_root if latest_root is not None else newest.get(r["fleet"])
        state = states[id(r)]
        out.append(
            DeviceStatus(
                fleet=r["fleet"],
                device=r["device"],
                model=r["model"],
                online=None if r["status"] is None else r["status"] == "online",
                name=r["current_name"] or r["model_name"],
                version=r["current_version"] or r["model_version"],
                last_seen=r["last_seen"],
                p95_ms=r["p95_ms"],
                error_rate=(float(e["errors"] or 0) / float(requests)) if requests else None,
                drift_band=r["drift_band"],
                psi_max=r["psi_max"],
                attributes=json.loads(r["attributes"]) if r["attributes"] else None,
                root_version=root_version,
                root_behind=None
                if root_version is None or target is None
                else root_version < target,
                held_back=held_back,
                unvouched=unvouched,
                shadow=_section(state, "shadow"),
                split=_section(state, "split"),
                feedback=_feedback(state),
            )
        )
    return out


def _loads(text: str | None) -> dict[str, Any]:
    """A stored state document; {} when absent or not an object (the collector stores what
    devices send, unchecked)."""
    try:
        doc = json.loads(text) if text else None
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _section(state: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = state.get(key)
    return value if isinstance(value, dict) else None


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _feedback(state: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """Per version: the labels it got back, how many it had right, and the accuracy."""
    section = _section(state, "feedback")
    if section is None:
        return None
    out = {}
    for digest, counts in sorted(section.items()):
        c = counts if isinstance(counts, dict) else {}
        labels, correct = _count(c.get("labels")), _count(c.get("correct"))
        accuracy = correct / labels if labels and correct is not None else None
        out[digest] = {"labels": labels, "correct": correct, "accuracy": accuracy}
    return out


def _trust(state: dict[str, Any]) -> tuple[int | None, str | None, str | None]:
    """The root version, the held-back reason and the unvouched reason a reported state
    carries (None: absent or not what a device writes)."""
    trust = state.get("trust")
    if not isinstance(trust, dict):
        return None, None, None
    version, held, unvouched = (trust.get(k) for k in ("root_version", "held_back", "unvouched"))
    return (
        version if isinstance(version, int) and not isinstance(version, bool) else None,
        held if isinstance(held, str) else None,
        unvouched if isinstance(unvouched, str) else None,
    )


def _num(value: object, spec: str) -> str:
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    return format(value, spec) if ok else "-"


def stage_text(r: DeviceStatus) -> str:
    """A candidate's stage: ``shadow abc123 watching: 150 samples, 99.3% agree, x1.10``;
    ``A/B abc123 20%``; ``-``."""
    if r.shadow is not None:
        s = r.shadow
        return (
            f"shadow {str(s.get('digest') or '?')[:12]} {s.get('verdict') or '?'}:"
            f" {_num(s.get('samples'), 'd')} samples, {_num(s.get('agreement'), '.1%')} agree,"
            f" latency x{_num(s.get('latency_ratio'), '.2f')}"
        )
    if r.split is not None:
        share = _num(r.split.get("share"), ".0%")
        return f"A/B {str(r.split.get('digest') or '?')[:12]} {share}"
    return "-"


def accuracy_text(r: DeviceStatus) -> str:
    """Online accuracy per version from feedback: ``abc123 96.0% (250)`` each."""
    if not r.feedback:
        return "-"
    return ", ".join(
        f"{digest[:12]} {_num(f['accuracy'], '.1%')} ({f['labels'] or 0})"
        for digest, f in r.feedback.items()
    )
