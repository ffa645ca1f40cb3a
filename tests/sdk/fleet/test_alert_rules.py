"""The alert rules of examples/prometheus load in Prometheus and pass their unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.support.prometheus import binary

RULES = Path(__file__).resolve().parents[3] / "examples" / "prometheus"


def promtool(*args: str, cwd: Path = RULES) -> subprocess.CompletedProcess[str]:
    argv = [binary("promtool"), *args]
    return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_the_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", "edgeship.rules.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 11 rules found" in done.stdout


def test_every_alert_fires_and_stays_silent_as_its_unit_test_says() -> None:
    done = promtool("test", "rules", "edgeship.rules.test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_unit_test() -> None:
    rules = (RULES / "edgeship.rules.yml").read_text()
    tests = (RULES / "edgeship.rules.test.yml").read_text()
    alerts = [line.split(":", 1)[1].strip() for line in rules.splitlines() if "- alert:" in line]
    assert len(alerts) == 11
    assert [a for a in alerts if f"alertname: {a}" not in tests] == []


def test_the_scrape_config_example_is_valid(tmp_path: Path) -> None:
    for name in ("prometheus.yml", "edgeship.rules.yml"):
        shutil.copy(RULES / name, tmp_path)
    (tmp_path / "edgeship-agent.token").write_text("a-token-of-16-chars-or-more")
    done = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
