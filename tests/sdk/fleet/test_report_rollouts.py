"""The HTML report lists the rollouts: model, waves, status, halt reason, each device."""

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


def test_a_halted_rollout_shows_its_reason_and_each_devices_outcome(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "fleet.sqlite")
    plan = RolloutPlan((0.5, 1.0), 0.5, 0.0)
    rollout = Rollout("r<1>", "f", REF, ("d1", "d2", "d3"), plan, created_at=1.0)
    with RolloutRecords(store).create(rollout) as runner:
        done = {
            "d1": DeviceProgress("d1", 0, 2.0, outcome="succeeded"),
            "d2": DeviceProgress("d2", 0, 2.0, outcome="failed", reason="refused: floor 9"),
        }
        runner.save(replace(rollout, wave=0, acked_wave=0, progress=done, status="halted",
                            reason="1 of 2 devices failed"))  # fmt: skip
    page = render_report(store, now=10.0)
    store.close()
    table = re.search(r'<table id="rollouts">(.*?)</table>\s*<h2>', page, re.S)
    assert table is not None
    row = re.search(r'<tr class="halted">(.*)', table.group(1), re.S)
    assert row is not None
    cells = re.findall(r"<td>(.*?)</td>", row.group(1))
    assert cells[:7] == [
        "r&lt;1&gt;",
        "f",
        "default",
        "digits 1.1.0",
        "50%, 100%",
        "halted",
        "1 of 2 devices failed",
    ]
    assert "1 succeeded / 1 failed / 0 rejected / 0 pending / 1 waiting" in row.group(1)
    assert (
        '<tr class="failed"><td>d2</td><td>1</td><td>failed</td><td>refused: floor 9</td></tr>'
        in page
    )
