"""The HTML report: self-contained, buckets sized to the data, and rendered by a real
headless Chromium with every time chart's points spread over its axis."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sdk.cli import main
from sdk.fleet._report_data import bucket_for
from sdk.fleet.records import EventRecord, StatusRecord, TelemetryRecord
from sdk.fleet.report import render_report
from sdk.fleet.store import SqliteStore

T0 = 1_800_000_000.0


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
            chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--no-first-run", f"--user-data-dir={tmp_path / 'chromium-profile'}",
            "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", *args,
        ],
        capture_output=True, text=True, timeout=180, check=True,
    )  # fmt: skip


def telemetry(device: str, seq: int, ts: float, version: str, psi: list[float]) -> TelemetryRecord:
    raw = {"drift": {"inputs": [{"input": "x", "index": list(range(len(psi))), "psi": psi}]}}
    return TelemetryRecord(
        "f", device, seq, ts, "digits", version, 1, 100, seq % 3, 1.0, 2.0 + seq / 100, 3.0,
        "stable", max(psi), json.dumps(raw),
    )  # fmt: skip


def fill(path: Path, devices: int, messages: int, span_s: float) -> Path:
    """``devices`` devices, each with ``messages`` telemetry messages over ``span_s``
    (version 1.1.0 from half-way), a commit each and one failed install."""
    store = SqliteStore(path)
    records: list[Any] = []
    for i in range(devices):
        device = f"d{i:03d}"
        records.append(StatusRecord("f", device, T0, "online", {}, "{}"))
        for seq in range(1, messages + 1):
            version = "1.0.0" if seq <= messages // 2 else "1.1.0"
            psi = [0.001 * ((seq + j) % 50) for j in range(64)]
            ts = T0 + span_s * seq / messages
            records.append(telemetry(device, seq, ts, version, psi))
        commit = T0 + span_s / 2
        records.append(
            EventRecord("f", device, messages + 1, commit, "committed", "ab" * 32, None, "{}")
        )
    records.append(EventRecord("f", "d001", messages + 2, T0 + span_s * 0.6, "failed", "cd" * 32,
                               "health check: p95 9.1 ms over the 5 ms budget", "{}"))  # fmt: skip
    store.write(records, T0 + span_s)
    store.close()
    return path


def rendered(tmp_path: Path, page: Path) -> tuple[dict[str, Any], str]:
    """What the page's own check found after plotting, and Chromium's console lines."""
    done = headless(tmp_path, "--dump-dom", page.as_uri())
    found = re.search(r'<pre id="rendered"[^>]*>(.*?)</pre>', done.stdout, re.S)
    assert found is not None, done.stderr[-2000:]
    console = [line for line in done.stderr.splitlines() if ":CONSOLE" in line]
    return json.loads(found.group(1)), "\n".join(console)


def assert_spread(charts: dict[str, Any], min_points: int) -> None:
    """Every time chart has points, and they cover most of its time axis."""
    timed = {k: v for k, v in charts.items() if v["time"]}
    assert set(timed) == {"timeline", "latency", "errors", "drift"}
    for name, c in timed.items():
        lo, hi = c["axis"]
        assert c["points"] >= min_points, name
        assert (c["last"] - c["first"]) >= 0.6 * (hi - lo), name


def test_buckets_are_sized_to_the_span() -> None:
    assert bucket_for(20) == 1
    assert bucket_for(3600) == 30
    assert bucket_for(7 * 86400) == 7200


def test_the_report_is_self_contained(tmp_path: Path) -> None:
    db = fill(tmp_path / "fleet.sqlite", 2, 10, 20.0)
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", str(db), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<script src" not in page
    assert "<link" not in page
    assert "Plotly.newPlot" in page


def test_a_report_without_telemetry_says_so_and_loads_no_script(tmp_path: Path) -> None:
    page = render_report(SqliteStore(tmp_path / "fleet.sqlite"), now=T0)
    assert "no telemetry yet" in page
    assert "<script" not in page


@pytest.mark.integration
def test_a_20_second_demo_fills_every_chart_without_console_errors(tmp_path: Path) -> None:
    db = fill(tmp_path / "fleet.sqlite", 2, 10, 20.0)
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", str(db), "--out", str(out)]) == 0
    charts, console = rendered(tmp_path, out)
    assert_spread(charts, min_points=10)
    assert charts["drift"]["traces"] == 6  # the top 5 features and the largest of all
    assert console == ""
    shot = tmp_path / "report.png"
    headless(tmp_path, f"--screenshot={shot}", "--window-size=1300,2300", out.as_uri())
    assert shot.stat().st_size > 50_000
    if os.environ.get("EDGESHIP_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["EDGESHIP_KEEP_SCREENSHOT"])


@pytest.mark.integration
def test_a_week_of_500_devices_fills_every_chart_and_caps_the_timeline(tmp_path: Path) -> None:
    db = fill(tmp_path / "fleet.sqlite", 500, 24, 7 * 86400.0)
    out = tmp_path / "report.html"
    assert main(["fleet", "report", "--db", str(db), "--out", str(out)]) == 0
    page = out.read_text()
    assert "7200 s per chart point" in page
    assert "440 more devices without failures not shown" in page
    charts, console = rendered(tmp_path, out)
    assert_spread(charts, min_points=20)
    assert console == ""
    shot = tmp_path / "report-500.png"
    headless(tmp_path, f"--screenshot={shot}", "--window-size=1300,2600", out.as_uri())
    assert shot.stat().st_size > 50_000
