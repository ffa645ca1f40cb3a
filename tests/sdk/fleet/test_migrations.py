"""The fleet store's versioned migrations, on SQLite and a real PostgreSQL."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.errors import ConfigError
from sdk.fleet._migrations import MIGRATIONS, SCHEMA
from sdk.fleet.store import open_store
from tests.sdk.fleet.test_store_concurrency import open_at_once

LATEST = [version for version, _, _ in MIGRATIONS]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "fleet.sqlite")
    return str(request.getfixturevalue("postgres_url"))


def versions(db: str) -> list[tuple[int, float]]:
    store = open_store(db)
    try:
        rows = store.query("SELECT version, applied_at FROM schema_version ORDER BY version")
    finally:
        store.close()
    return [(int(r["version"]), float(r["applied_at"])) for r in rows]


def run_sql(db: str, statements: list[str]) -> None:
    """Statements on the raw database, as an older edgeship or another tool would."""
    if db.startswith("postgresql://"):
        import psycopg  # noqa: PLC0415 - optional dependency

        with psycopg.connect(db, autocommit=True) as conn:
            for s in statements:
                conn.execute(s)  # type: ignore[arg-type]
        return
    with sqlite3.connect(db) as conn:
        for s in statements:
            conn.execute(s)


def test_a_new_database_gets_every_migration_in_order(db: str) -> None:
    assert [v for v, _ in versions(db)] == LATEST


def test_opening_again_applies_nothing_again(db: str) -> None:
    first = versions(db)
    assert versions(db) == first


def test_a_collector_database_from_before_versioning_is_adopted_with_its_rows(db: str) -> None:
    run_sql(db, [s for s in SCHEMA.split(";") if s.strip()])
    run_sql(
        db,
        [
            "INSERT INTO events (fleet, device, seq, ts, received_at, event, raw)"
            " VALUES ('f', 'd1', 1, 1.0, 1.0, 'committed', '{}')"
        ],
    )
    assert [v for v, _ in versions(db)] == LATEST
    store = open_store(db)
    try:
        assert len(store.query("SELECT * FROM events")) == 1
        assert store.query("SELECT COUNT(*) AS n FROM rollouts") == [{"n": 0}]
    finally:
        store.close()


def test_a_schema_newer_than_this_edgeship_is_refused_and_left_alone(db: str) -> None:
    before = versions(db)
    run_sql(
        db,
        ["INSERT INTO schema_version (version, name, applied_at) VALUES (99, 'future', 1.0)"],
    )
    with pytest.raises(ConfigError, match="schema version 99, newer than this edgeship"):
        open_store(db)
    run_sql(db, ["DELETE FROM schema_version WHERE version = 99"])
    assert versions(db) == before


def test_two_processes_opening_a_new_database_apply_each_migration_once(db: str) -> None:
    assert open_at_once(db) == []
    assert [v for v, _ in versions(db)] == LATEST
