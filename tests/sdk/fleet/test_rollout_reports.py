"""What a device's reports mean for a rollout's bundle: one table of reports, each with
the failure it must count as (or none). Pure: no broker, no store."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdk.fleet._reported import ReportedState, device_view, parse_event, parse_state
from sdk.fleet.publish import BundleRef

SHA, DIGEST, OTHER = "a" * 64, "d" * 64, "e" * 64
REF = BundleRef("http://h/b.edgeship", SHA, DIGEST, 7, "digits", "1.1.0")
PUBLISHED = 100.0  # when the device was published in the rollout


def event(kind: str, seq: int = 1, **fields: Any) -> bytes:
    doc = {"v": 1, "fleet": "f", "device": "d1", "ts": 1.0, "seq": seq, "event": kind, **fields}
    return json.dumps(doc).encode()


def state(**fields: Any) -> bytes:
    return json.dumps({"v": 1, "fleet": "f", "device": "d1", "ts": 1.0, **fields}).encode()


def view_of(events: list[bytes], state_doc: bytes | None = None, *, at: float = 110.0) -> Any:
    signals = [s for p in events if (s := parse_event(p, "d1", at)) is not None]
    reported = None if state_doc is None else parse_state(state_doc, "d1")
    return device_view(REF, reported, signals, since=PUBLISHED, max_download_failures=3)


REFUSED = event("desired-refused", digest=DIGEST, reason="bundle sequence 7 is below the floor 9")
NOT_FOUND = event(
    "download-failed", sha256=SHA, permanent=True, reason="http://h/b.edgeship: HTTP 404"
)
UNTRUSTED = event(
    "failed", digest=None, sha256=SHA, phase="verifying", reason="signed by an untrusted key"
)
ROLLED_BACK = event("rolled-back", digest=DIGEST, current=OTHER, reason="p95 over budget")
LAST_FAILURE = {"outcome": "failed", "digest": DIGEST, "phase": "health-check", "time": 105.0}

FAILURES = [
    ([REFUSED], None, "refused: bundle sequence 7 is below the floor 9"),
    ([NOT_FOUND], None, "download refused: http://h/b.edgeship: HTTP 404"),
    ([UNTRUSTED], None, "failed (verifying): signed by an untrusted key"),
    ([ROLLED_BACK], None, "rolled back: p95 over budget"),
    (
        [
            event("download-failed", seq=i, sha256=SHA, permanent=False, reason="HTTP 503")
            for i in (1, 2, 3)
        ],
        None,
        "download failed 3 times: HTTP 503",
    ),
    (
        [],
        state(last_failure=LAST_FAILURE | {"reason": "golden outputs differ"}),
        "failed: golden outputs differ",
    ),
    (
        [],
        state(
            desired_digest=DIGEST,
            last_failure={
                "outcome": "failed",
                "digest": None,
                "phase": "verifying",
                "time": 105.0,
                "reason": "expired",
            },
        ),
        "failed (verifying): expired",
    ),
]


@pytest.mark.parametrize(("events", "state_doc", "failure"), FAILURES)
def test_a_report_that_fails_the_bundle_counts_at_once(
    events: list[bytes], state_doc: bytes | None, failure: str
) -> None:
    assert view_of(events, state_doc).failure == failure


NOT_FAILURES = [
    # Another bundle's trouble.
    [event("desired-refused", digest=OTHER, reason="loop budget")],
    [event("download-failed", sha256="b" * 64, permanent=True, reason="HTTP 404")],
    [event("rolled-back", digest=OTHER, current=DIGEST, reason="breach")],
    # Transient download failures under the limit.
    [
        event("download-failed", seq=i, sha256=SHA, permanent=False, reason="refused")
        for i in (1, 2)
    ],
    # Events an agent sends on its way; not decisions.
    [event("install-started", source="http://h/b.edgeship"), event("activated", digest=DIGEST)],
]


@pytest.mark.parametrize("events", NOT_FAILURES)
def test_a_report_about_something_else_or_still_in_progress_is_no_failure(
    events: list[bytes],
) -> None:
    assert view_of(events).failure is None


def test_events_received_before_the_device_was_published_do_not_count() -> None:
    assert view_of([REFUSED, NOT_FOUND], at=PUBLISHED - 1).failure is None


def test_a_last_failure_from_before_the_device_was_published_does_not_count() -> None:
    old = state(last_failure=LAST_FAILURE | {"time": PUBLISHED - 30, "reason": "old"})
    assert view_of([], old).failure is None


def test_transient_download_failures_under_the_limit_leave_a_note_for_the_timeout() -> None:
    events = [
        event("download-failed", seq=i, sha256=SHA, reason="connection refused") for i in (1, 2)
    ]
    assert view_of(events).note == "2 failed download(s), the last: connection refused"


def test_a_device_that_runs_the_bundle_after_probation_passed() -> None:
    doc = state(
        current={"digest": DIGEST, "sequence": 7}, probation={"digest": DIGEST, "passed": True}
    )
    view = view_of([], doc)
    assert (view.current, view.probation_passed, view.failure) == (DIGEST, True, None)


def test_a_committed_event_counts_as_probation_passed() -> None:
    doc = state(current={"digest": DIGEST, "sequence": 7})
    assert view_of([event("committed", digest=DIGEST)], doc).probation_passed is True


def test_the_running_sequence_is_the_highest_of_current_and_floor() -> None:
    doc = parse_state(state(current={"digest": OTHER, "sequence": 4}, floor=6), "d1")
    assert doc.running_sequence == 6
    assert ReportedState().running_sequence is None


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        json.dumps({"v": 2, "device": "d1", "event": "failed"}).encode(),
        json.dumps({"v": 1, "device": "d2", "event": "failed"}).encode(),
        event("failed", reason=["not", "text"]),
        event("download-failed", permanent="yes"),
    ],
)
def test_a_malformed_event_is_a_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by defect
        parse_event(payload, "d1", 0.0)


def test_a_state_with_a_field_of_the_wrong_type_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"current\.sequence"):
        parse_state(state(current={"digest": DIGEST, "sequence": "7"}), "d1")
