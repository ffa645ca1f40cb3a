"""Rollout records and the runner's lease in the fleet store, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from agent.errors import ConfigError, StateError
from sdk.errors import RolloutError, RunnerBusyError
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.publish import BundleRef
from sdk.fleet.rollout import DeviceProgress, Rollout, RolloutPlan, wave_order
from sdk.fleet.store import open_store

REF = BundleRef("http://h/b.edgeship", "a" * 64, "d" * 64, 7, "digits", "1.1.0")
DEVICES = tuple(f"d{i:02}" for i in range(5))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def records(db: str) -> Iterator[RolloutRecords]:
    store = open_store(db)
    yield RolloutRecords(store)
    store.close()


def another(db: str, *, ahead_s: float = 0.0) -> RolloutRecords:
    """The same database as seen by another process (whose clock may be ``ahead_s``)."""
    return RolloutRecords(open_store(db), clock=lambda: time.time() + ahead_s)


def make(rid: str = "r1", *, timeout_s: float = 30.0) -> Rollout:
    plan = RolloutPlan((0.4, 1.0), 0.2, 5.0, 60.0, True, runner_timeout_s=timeout_s)
    return Rollout(rid, "f", REF, wave_order(rid, DEVICES), plan, created_at=1000.0)


def published(r: Rollout, n: int, at: float = 1001.0) -> Rollout:
    progress = {d: DeviceProgress(d, 0, at, previous='{"v":1}') for d in r.devices[:n]}
    return replace(r, wave=0, progress=progress)


def test_a_saved_rollout_loads_back_as_it_was(records: RolloutRecords) -> None:
    r = make()
    with records.create(r) as runner:
        saved = published(r, 2)
        saved = replace(
            saved,
            acked_wave=0,
            progress={
                **saved.progress,
                saved.devices[0]: replace(
                    saved.progress[saved.devices[0]], outcome="failed", reason="refused: floor 9"
                ),
            },
        )
        assert runner.save(saved)
    assert records.load("r1")[0] == saved


def test_a_second_rollout_with_the_same_id_is_refused(records: RolloutRecords) -> None:
    with records.create(make()):
        pass
    with pytest.raises(ConfigError, match="exists in this database; choose another --id"):
        records.create(replace(make(), fleet="other"))
    assert records.load("r1")[0].fleet == "f"


def test_a_rollout_that_is_not_there_says_how_to_find_one(records: RolloutRecords) -> None:
    with pytest.raises(ConfigError, match="rollout list"):
        records.load("nope")


def test_taking_over_a_rollout_with_a_live_runner_is_refused_naming_it(
    records: RolloutRecords, db: str
) -> None:
    with records.create(make()) as runner:
        other = another(db)
        with pytest.raises(RunnerBusyError, match=runner.holder):
            other.take_over("r1")
        other.store.close()


def test_the_heartbeat_keeps_a_runner_alive_past_its_timeout(
    records: RolloutRecords, db: str
) -> None:
    with records.create(make(timeout_s=0.4)):
        time.sleep(1.0)
        other = another(db)
        with pytest.raises(RunnerBusyError):
            other.take_over("r1")
        other.store.close()


def test_a_runner_that_let_go_is_taken_over_at_once(records: RolloutRecords, db: str) -> None:
    with records.create(make()):
        pass
    assert "last runner stopped" in records.load("r1")[1].describe(time.time())
    other = another(db)
    with other.take_over("r1") as runner:
        assert records.load("r1")[1].holder == runner.holder
    other.store.close()


def test_a_silent_runner_is_gone_after_its_timeout_and_is_taken_over(
    records: RolloutRecords, db: str
) -> None:
    runner = records.create(make(timeout_s=5.0))  # never entered: no heartbeat
    later = another(db, ahead_s=6.0)
    info = later.load("r1")[1]
    assert not info.alive(time.time() + 6.0)
    assert f"{runner.holder} gone since" in info.describe(time.time() + 6.0)
    # The first runner lost its lease: it can write nothing more.
    with later.take_over("r1"), pytest.raises(RolloutError, match="lost rollout r1"):
        runner.save(published(make(), 2))
    assert records.load("r1")[0].progress == {}
    later.store.close()


def test_an_abort_stops_the_runner_at_its_next_save(records: RolloutRecords, db: str) -> None:
    with records.create(make()) as runner:
        other = another(db)
        aborted = other.abort("r1", "aborted by user", revert=True)
        other.store.close()
        assert (aborted.status, aborted.revert) == ("aborted", "pending")
        assert runner.aborted()
        assert runner.save(published(make(), 2)) is False
    stored = records.load("r1")[0]
    assert (stored.status, stored.progress) == ("aborted", {})


def test_a_completed_rollout_cannot_be_aborted(records: RolloutRecords) -> None:
    with records.create(make()) as runner:
        runner.save(replace(make(), status="completed"))
    with pytest.raises(StateError, match="completed; there is nothing to abort"):
        records.abort("r1", "too late", revert=False)


def test_the_list_counts_each_rollouts_devices_and_names_its_runner(
    records: RolloutRecords,
) -> None:
    with records.create(make("r1")) as runner:
        r = published(make("r1"), 2)
        progress = dict(r.progress)
        progress[r.devices[0]] = replace(progress[r.devices[0]], outcome="succeeded")
        runner.save(replace(r, progress=progress))
        with records.create(make("r2")):
            rows = records.summaries()
    assert [row["id"] for row in rows] == ["r1", "r2"]
    assert rows[0]["counts"] == {
        "devices": 5, "published": 2, "succeeded": 1, "failed": 0, "rejected": 0,
    }  # fmt: skip
    assert rows[0]["runner"]["alive"] is True
    assert records.summaries("another-fleet") == []
