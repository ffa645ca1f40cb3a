"""The HTML report lists the rollouts recorded in the fleet store."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.publish import BundleRef
from sdk.fleet.report import render_report
from sdk.fleet.rollout import DeviceProgress, Rollout, RolloutPlan
from sdk.fleet.store import SqliteStore

REF = BundleRef("http://h/b.edgeship", "a" * 64, "d" * 64, 7, "digits", "1.1.0")


def cells(page: str) -> list[list[str]]:
    table = re.search(r'<table id="rollouts">(.*?)</table>', page, re.S)
    assert table is not None
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    return [re.findall(r"<td>(.*?)</td>", row) for row in rows if "<td>" in row]


def test_the_report_shows_each_rollout_with_its_counts_status_and_runner(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    records = RolloutRecords(store)
    plan = RolloutPlan((1.0,), 0.5, 0.0)
    rollout = Rollout("r<1>", "f", REF, ("d1", "d2", "d3"), plan, created_at=1.0)
    with records.create(rollout) as runner:
        done = {
            "d1": DeviceProgress("d1", 0, 2.0, outcome="succeeded"),
            "d2": DeviceProgress("d2", 0, 2.0, outcome="failed", reason="refused: floor 9"),
        }
        runner.save(replace(rollout, wave=0, acked_wave=0, progress=done, status="halted",
                            reason="1 of 2 devices failed"))  # fmt: skip
    page = render_report(store, now=10.0)
    store.close()
    [row] = cells(page)
    assert row[:7] == [
        "r&lt;1&gt;", "f", "digits 1.1.0", "halted (1 of 2 devices failed)", "2/3", "1", "1",
    ]  # fmt: skip
    assert row[7].startswith("none since")
