"""What a device reports about one bundle, from its retained state and its events. Pure.

The rollout runner (:mod:`sdk.fleet._rollout_run`) parses the ``state`` and ``events``
messages it receives (and, on resume, the events a collector stored meanwhile) with
:func:`parse_state` and :func:`parse_event`; :func:`device_view` turns them into the
:class:`~sdk.fleet.rollout.DeviceView` of one device for the rollout's bundle. A device
*fails* the bundle, at once, when it reports:

- ``desired-refused`` for the digest: the agent will not even download it (sequence
  below its floor, loop budget used up);
- ``download-failed`` for the bundle file (its ``sha256``) with ``permanent``: the server
  gave an answer a retry would repeat (HTTP 4xx such as 404, another file, over the size
  cap, TLS refused). A transient one (network, HTTP 5xx) counts only once the device has
  reported ``max_download_failures`` of them: the agent retries with backoff meanwhile;
- ``failed`` for the digest or the file (verification, compatibility, health check), or
  ``rolled-back`` naming the digest;
- in its retained state, a ``last_failure`` naming the digest, or a verification failure
  while the bundle was its desired one (this covers events missed while no runner ran).

Only what a device reported after it was published in this rollout counts: events by
the time the runner received them, the state's ``last_failure.time`` by the device's
clock (device clocks are assumed to be synchronised, as bundle expiry needs anyway).

In a shadow rollout a device's verdict on the candidate counts too: ``shadow-passed``
(or its state's ``shadow.verdict`` ``promote``) lets it succeed once it commits;
``shadow-rejected`` (or ``shadow.verdict`` ``reject``) rejects the candidate, with the
device's reason and numbers. A device that runs the bundle without having committed it
since it was published ran it before and needs no verdict. Events and states are of one
model: events carry ``"model"`` (absent: ``default``), and the runner reads the state
topic of its rollout's model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from agent.messages.desired import DEFAULT_MODEL, MODEL_RE
from agent.messages.topics import SCHEMA_VERSION
from agent.plumbing.strict import Doc, load_json
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import DeviceView

__all__ = ["ReportedState", "Signal", "device_view", "parse_event", "parse_state"]

# The events that decide a rollout; the others (install-started, downloaded, ...) only
# say that something is happening.
SIGNAL_EVENTS = (
    "committed", "desired-refused", "download-failed", "failed", "rolled-back", "shadow-passed",
    "shadow-rejected",
)  # fmt: skip
_FAILURE_TEXT = {
    "desired-refused": "refused",
    "download-failed": "download refused",
    "failed": "failed",
    "rolled-back": "rolled back",
}


@dataclass(frozen=True)
class Signal:
    """One event that matters to a rollout."""

    event: str
    received_at: float  # by the runner's (or the collector's) clock
    seq: int | None = None
    digest: str | None = None
    sha256: str | None = None
    phase: str | None = None
    reason: str | None = None
    permanent: bool = False
    model: str = DEFAULT_MODEL
    shadow: str | None = None  # shadow verdicts: the numbers, as text

    def names(self, ref: BundleRef) -> bool:
        """Whether the event is about ``ref`` (by digest, or by file before verification)."""
        return self.digest == ref.digest or (self.sha256 is not None and self.sha256 == ref.sha256)


@dataclass(frozen=True)
class ReportedState:
    """The parts of a device's retained ``state`` a rollout reads (docs/agent.md)."""

    current_digest: str | None = None
    current_sequence: int | None = None
    floor: int | None = None  # the highest sequence the device ever committed
    probation_digest: str | None = None
    probation_passed: bool = False
    desired_digest: str | None = None
    pending_sha256: str | None = None
    pending_phase: str | None = None
    failure_outcome: str | None = None
    failure_digest: str | None = None
    failure_phase: str | None = None
    failure_reason: str | None = None
    failure_time: float | None = None
    shadow_digest: str | None = None  # "shadow": the candidate in shadow, its verdict
    shadow_verdict: str | None = None
    shadow_numbers: str | None = None

    @property
    def running_sequence(self) -> int | None:
        """What a new bundle's sequence must be above: the device refuses anything lower."""
        known = [s for s in (self.current_sequence, self.floor) if s is not None]
        return max(known) if known else None


def _header(payload: bytes, what: str, device: str) -> Doc:
    """The document, once it is a v1 message from ``device``. Raises: ValueError."""
    doc = Doc(load_json(payload, what=what, error=ValueError), what, error=ValueError, strict=False)
    if doc.raw("v") != SCHEMA_VERSION:
        raise doc.bad("v", str(SCHEMA_VERSION))
    sender = doc.opt(doc.text, "device", max_len=128)
    if sender is not None and sender != device:
        raise ValueError(f"{what} from device {sender!r} arrived on the topic of {device!r}")
    return doc


def _digest(d: Doc, key: str) -> str | None:
    return d.opt(d.text, key, max_len=64)


def parse_state(payload: bytes, device: str) -> ReportedState:
    """The rollout's view of a ``state`` payload.

    Raises:
        ValueError: not a v1 state document of ``device``, or a field of the wrong type.
    """
    doc = _header(payload, "state", device)
    current = doc.opt(doc.obj, "current")
    probation = doc.opt(doc.obj, "probation")
    pending = doc.opt(doc.obj, "pending")
    failure = doc.opt(doc.obj, "last_failure")
    shadow = doc.opt(doc.obj, "shadow")
    return ReportedState(
        current_digest=None if current is None else _digest(current, "digest"),
        current_sequence=None if current is None else current.opt(current.integer, "sequence"),
        floor=doc.opt(doc.integer, "floor"),
        probation_digest=None if probation is None else _digest(probation, "digest"),
        probation_passed=probation is not None and probation.boolean("passed", False),
        desired_digest=_digest(doc, "desired_digest"),
        pending_sha256=None if pending is None else _digest(pending, "sha256"),
        pending_phase=None if pending is None else pending.opt(pending.text, "phase", max_len=32),
        failure_outcome=None if failure is None else failure.opt(failure.text, "outcome"),
        failure_digest=None if failure is None else _digest(failure, "digest"),
        failure_phase=None if failure is None else failure.opt(failure.text, "phase"),
        failure_reason=None if failure is None else failure.opt(failure.text, "reason"),
        failure_time=None if failure is None else failure.opt(failure.number, "time"),
        shadow_digest=None if shadow is None else _digest(shadow, "digest"),
        shadow_verdict=None if shadow is None else shadow.opt(shadow.text, "verdict", max_len=32),
        shadow_numbers=None if shadow is None else _numbers(shadow),
    )


def _numbers(d: Doc) -> str:
    """``200 samples, agreement 99.5%, latency x1.10, accuracy 97.0%`` of a shadow verdict."""

    def num(key: str, spec: str) -> str:
        value = d.opt(d.number, key)
        return "?" if value is None else format(value, spec)

    text = (
        f"{num('samples', '.0f')} samples, agreement {num('agreement', '.1%')},"
        f" latency x{num('latency_ratio', '.2f')}"
    )
    return (
        text
        if d.opt(d.number, "accuracy") is None
        else f"{text}, accuracy {num('accuracy', '.1%')}"
    )


def parse_event(payload: bytes, device: str, received_at: float) -> Signal | None:
    """The signal an ``events`` payload carries; None for an event no rollout waits for.

    Raises:
        ValueError: not a v1 event of ``device``, or a field of the wrong type.
    """
    doc = _header(payload, "event", device)
    event = doc.text("event", max_len=64)
    if event not in SIGNAL_EVENTS:
        return None
    shadow = event.startswith("shadow-")
    return Signal(
        event=event,
        received_at=received_at,
        seq=doc.opt(doc.integer, "seq", minimum=1),
        digest=_digest(doc, "digest"),
        sha256=_digest(doc, "sha256"),
        phase=doc.opt(doc.text, "phase", max_len=32),
        reason=doc.opt(doc.text, "reason"),
        permanent=doc.boolean("permanent", False),
        model=doc.text("model", DEFAULT_MODEL, max_len=64, pattern=MODEL_RE, what="a model name"),
        shadow=_numbers(doc) if shadow else None,
    )


def _state_failure(ref: BundleRef, state: ReportedState, since: float) -> str | None:
    if state.failure_time is None or state.failure_time < since:
        return None
    reason = state.failure_reason or "no reason given"
    if state.failure_digest == ref.digest:
        return f"{state.failure_outcome or 'failed'}: {reason}"
    # A bundle that failed verification has no digest yet; it was the desired one.
    if (
        state.failure_digest is None
        and state.failure_phase == "verifying"
        and state.desired_digest == ref.digest
    ):
        return f"failed (verifying): {reason}"
    return None


def _shadow(
    ref: BundleRef, state: ReportedState | None, signals: list[Signal], committed: bool
) -> tuple[bool, str | None]:
    """Whether the device passed the candidate in shadow, and why it rejected it."""
    for s in signals:
        if s.event == "shadow-rejected":
            return False, f"shadow rejected: {s.reason or 'no reason given'} ({s.shadow})"
    if any(s.event == "shadow-passed" for s in signals):
        return True, None
    if state is None:
        return False, None
    if state.shadow_digest == ref.digest and state.shadow_verdict == "reject":
        return False, f"shadow rejected ({state.shadow_numbers})"
    verdict = state.shadow_digest == ref.digest and state.shadow_verdict == "promote"
    # Running it without a commit since it was published: it ran it before.
    return verdict or (state.current_digest == ref.digest and not committed), None


def device_view(
    ref: BundleRef,
    state: ReportedState | None,
    signals: Iterable[Signal],
    *,
    since: float,
    max_download_failures: int,
) -> DeviceView:
    """What the device reports about ``ref`` since ``since`` (when it was published)."""
    failure = note = None
    committed = False
    transient = 0
    mine = [s for s in signals if s.received_at >= since and s.names(ref)]
    for s in mine:
        if s.event == "committed":
            committed = True
        elif s.event.startswith("shadow-"):
            continue
        elif s.event == "download-failed" and not s.permanent:
            transient += 1
            note = f"{transient} failed download(s), the last: {s.reason or 'no reason given'}"
            if transient >= max_download_failures and failure is None:
                failure = f"download failed {transient} times: {s.reason or 'no reason given'}"
        elif failure is None:
            where = f" ({s.phase})" if s.event == "failed" and s.phase else ""
            failure = f"{_FAILURE_TEXT[s.event]}{where}: {s.reason or 'no reason given'}"
    if state is not None and failure is None:
        failure = _state_failure(ref, state, since)
    if state is not None and note is None and state.pending_sha256 == ref.sha256:
        note = f"installing ({state.pending_phase})"
        if state.failure_phase == "downloading" and (state.failure_time or 0.0) >= since:
            note += f", the last download failed: {state.failure_reason}"
    runs = state is not None and state.current_digest == ref.digest
    passed = committed or (
        state is not None and state.probation_digest == ref.digest and state.probation_passed
    )
    shadow_passed, rejected = _shadow(ref, state, mine, committed)
    return DeviceView(
        current=ref.digest if runs else None,
        probation_passed=runs and passed,
        failure=failure,
        note=note,
        shadow_passed=shadow_passed,
        rejected=rejected,
    )
