"""The HTML report: self-contained, charts present, rendered by a real headless Chromium."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from sdk.cli import main
from sdk.fleet.records import EventRecord, StatusRecord, TelemetryRecord
from sdk.fleet.report import line_chart
from sdk.fleet.store import SqliteStore


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium not found (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium(), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}", *args,
        ],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.sqlite"
    store = SqliteStore(path)
    records: list = []  # type: ignore[type-arg]
    for device in ("d1", "d2"):
        records.append(StatusRecord("f", device, 1.0, "online", {}, "{}"))
        for seq in range(1, 11):
            version = "1.0.0" if seq <= 5 else "1.1.0"
            raw = {"drift": {"inputs": [{"input": "x", "index": [0, 3], "psi": [0.01 * seq, 0.2]}]}}
            records.append(
                TelemetryRecord(
                    "f", device, seq, 1_800_000_000.0 + 60 * seq, "digits", version, seq,
                    100, seq % 3, 1.0, 2.0 + seq / 10, 3.0 + seq / 10, "stable", 0.2,
                    json.dumps(raw),
                )
            )  # fmt: skip
        records.append(
            EventRecord("f", device, 11, 1_800_000_400.0, "committed", "ab" * 32, None, "{}")
        )
    store.write(records, 1_800_000_700.0)
    store.close()
    return path


def test_a_chart_without_points_says_so() -> None:
    assert "no data" in line_chart("empty", {})


def test_a_chart_has_one_polyline_per_series() -> None:
    svg = line_chart("t", {"a": [(0, 1), (1, 2)], "b<&>": [(0, 3)]})
    assert svg.count("<polyline") == 2
    assert "b&lt;&amp;&gt;" in svg


def test_the_report_is_self_contained(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", str(db), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<script" not in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "<link" not in page


@pytest.mark.integration
def test_the_report_renders_its_charts_in_a_headless_browser(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", str(db), "--out", str(out)]) == 0
    dom = headless(tmp_path, "--dump-dom", out.as_uri()).stdout
    assert dom.count('<svg class="chart"') == 4
    assert 'data-series="digits 1.0.0 p95"' in dom
    assert 'data-series="digits 1.1.0 p95"' in dom
    assert 'data-series="x[3]"' in dom
    assert "no data" not in dom
    assert "<td>d2</td>" in dom
    shot = tmp_path / "report.png"
    headless(tmp_path, f"--screenshot={shot}", "--window-size=900,1600", out.as_uri())
    assert shot.stat().st_size > 10_000
    if os.environ.get("EDGESHIP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["EDGESHIP_KEEP_SCREENSHOT"])
