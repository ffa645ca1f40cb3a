"""bench/fleet.py --quick as a smoke test: it runs, prints its JSON, and loses nothing.

No speed is asserted here (the numbers are compared as ratios in the bench's own output);
only that every phase ran to the end and every published message was counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import mosquitto_path
from tests.support.postgres import require_postgres

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
PHASES = (
    "ingest_sqlite_1_collector",
    "ingest_sqlite_2_collectors",
    "catchup_sqlite_1_collector",
    "catchup_sqlite_2_collectors",
)


@pytest.fixture(scope="module")
def result() -> dict[str, Any]:
    mosquitto_path()  # skips without mosquitto, fails when CI=true
    require_postgres()  # the fault run restarts a PostgreSQL
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_the_quick_run_reports_the_machine_and_broker_settings(result: dict[str, Any]) -> None:
    assert result["machine"]["cpus"] >= 1
    assert "max_queued_messages 1000000" in result["broker"]["settings"]
    assert "max_inflight_messages 20" in result["broker"]["settings"]


@pytest.mark.parametrize("phase", PHASES)
def test_the_bare_subscriber_counts_every_published_message(
    result: dict[str, Any], phase: str
) -> None:
    run = result[phase]
    published = run.get("published", run.get("backlog_messages"))
    assert published == 20 * 3  # 20 devices, 3 messages/s, 1 s
    assert run["bare"]["distinct"] == published
    assert run["bare"]["complete"] is True


@pytest.mark.parametrize("phase", PHASES)
def test_the_collectors_store_every_published_message(result: dict[str, Any], phase: str) -> None:
    run = result[phase]
    published = run.get("published", run.get("backlog_messages"))
    assert run["collector"]["stored"] == published
    assert run["collector"]["complete"] is True
    assert run["ratio_collector_to_bare"] > 0
    expected_collectors = 2 if phase.endswith("2_collectors") else 1
    assert len(run["collector"]["stats"]) == expected_collectors
    for usage in run["collector"]["processes"]:
        assert usage["cpu_s"] > 0
        assert usage["peak_rss_mib"] > 0


def test_live_phases_report_broker_usage_and_no_outbox_loss(result: dict[str, Any]) -> None:
    for phase in PHASES[:2]:
        run = result[phase]
        assert run["all_acked_by_broker"] is True
        assert run["outbox_dropped"] == 0
        assert run["broker"]["peak_rss_mib"] > 0


def test_the_rollout_reaches_every_device_in_four_waves(result: dict[str, Any]) -> None:
    rollout = result["rollout"]
    assert rollout["status"] == "completed"
    assert rollout["counts"]["succeeded"] == rollout["devices"] == 20
    waves = rollout["per_wave"]
    assert [w["wave"] for w in waves] == [0, 1, 2, 3]
    assert sum(w["new_devices"] for w in waves) == 20
    assert all(w["all_committed_after_s"] is not None for w in waves)
    assert rollout["total_s"] >= sum(w["wave_s"] for w in waves)


def test_the_fault_run_loses_no_message_the_broker_acknowledged(result: dict[str, Any]) -> None:
    run = result["faults_postgres"]
    assert run["published"] == 20 * 3 * 6  # 20 devices, 3 messages/s, 6 s
    assert run["all_acked_by_broker"] is True
    assert (run["lost"], run["unexpected"]) == (0, 0)
    assert run["collector"]["exit_code"] == 0


def test_the_fault_run_restarted_the_store_and_killed_the_collector(result: dict[str, Any]) -> None:
    run = result["faults_postgres"]
    faults = run["faults"]
    assert faults["store_stopped_s"] < faults["store_started_s"] < faults["collector_killed_s"]
    # The first collector logged the outage once, and its end once.
    assert (run["collector"]["outages_logged"], run["collector"]["recoveries_logged"]) == (1, 1)
    assert run["ratio_collector_to_bare"] > 0
