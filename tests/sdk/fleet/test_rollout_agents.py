"""Rollouts against a real agent process that refuses the bundle or cannot download it.

The agent (``edgeship-agent run``, a subprocess) runs v2, sequence 2. Each rollout
bypasses the preflight (``--skip-preflight``) to reach the device with a bundle it must
refuse: a lower sequence, a bundle signed by a key it does not trust, a URL that answers
404. The device reports that at once, and the rollout halts within seconds, with the
device's reason in ``rollout status``, instead of waiting out its wave timeout. The
same bundles are stopped by the preflight when it runs, and nothing is published.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.install import Updater
from sdk.cli import main
from sdk.fleet.serve import BundleServer
from tests.agent.test_daemon import AGENT, agent_toml
from tests.sdk.fleet._rollouts import status
from tests.support.broker import Broker, Subscriber
from tests.support.bundles import make_key
from tests.support.lifecycle import POLICY, LifecycleBundle, make_model_bundle

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Far beyond what any of these rollouts may take: reaching it would mean the refusal
# was not seen.
WAVE_TIMEOUT_S = 60
QUICK_S = 30.0


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("bundles")
    made: dict[str, Any] = {
        "v1": make_model_bundle(d, seed=1, sequence=1),
        "v2": make_model_bundle(d, seed=2, sequence=2),
        "v3": make_model_bundle(d, seed=3, sequence=3),
        "foreign": make_model_bundle(d, seed=4, sequence=4, key=make_key("stranger")),
    }
    trust = d / "trust.toml"
    trust.write_bytes(POLICY.to_toml())
    # The agent's state with v2 committed, copied for each test.
    state = d / "state-v2"
    updater = Updater(state, POLICY)
    updater.install(str(made["v2"].path))
    updater.commit()
    with BundleServer(d) as server:
        server.start()
        yield {**made, "trust": trust, "state": state, "server": server}


@pytest.fixture
def agent(tmp_path: Path, broker: Broker, bundles: dict[str, Any]) -> Iterator[None]:
    """The agent as a real process, running v2, its state reported."""
    state_dir = tmp_path / "state"
    shutil.copytree(bundles["state"], state_dir)
    config = tmp_path / "agent.toml"
    config.write_text(agent_toml(state_dir, bundles["trust"], broker))
    with Subscriber(broker, "edgeship/v1/f/d1/state", clean=True) as sub:
        proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def reported(_: object) -> bool:
            docs = [json.loads(m.payload) for m in sub.snapshot() if m.payload]
            return any((d.get("current") or {}).get("sequence") == 2 for d in docs)

        try:
            assert sub.wait_for(reported, timeout_s=60), "the agent did not report its state"
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def rollout(
    broker: Broker,
    bundles: dict[str, Any],
    db: str,
    bundle: LifecycleBundle,
    *extra: str,
    url: str | None = None,
) -> tuple[int, float]:
    """``edgeship rollout`` of ``bundle`` to d1 in one wave; its exit code and duration."""
    argv = [
        "rollout", str(bundle.path), "--url", url or bundles["server"].url_for(bundle.path.name),
        "--fleet", "f", "--device", "d1", "--broker", f"mqtt://{broker.host}:{broker.port}",
        "--db", db, "--id", "r1", "--waves", "100%", "--max-failure-rate", "0",
        "--min-healthy-time", "0", "--wave-timeout", str(WAVE_TIMEOUT_S), "--poll", "0.1", *extra,
    ]  # fmt: skip
    started = time.monotonic()
    code = main(argv)
    return code, time.monotonic() - started


def halted_for(
    broker: Broker,
    bundles: dict[str, Any],
    db: str,
    capsys: pytest.CaptureFixture[str],
    bundle: LifecycleBundle,
    url: str | None = None,
) -> str:
    """Roll ``bundle`` out past the preflight; the device's reason, once it halted quickly."""
    code, took = rollout(broker, bundles, db, bundle, "--skip-preflight", url=url)
    assert (code, took < QUICK_S) == (2, True), took
    doc = status(db, capsys)
    assert doc["status"] == "halted"
    reason: str = doc["progress"]["d1"]["reason"]
    return reason


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "fleet.sqlite")


def test_a_bundle_below_the_device_floor_halts_the_wave_at_once_with_its_reason(
    broker: Broker, bundles: dict[str, Any], agent: None, db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    reason = halted_for(broker, bundles, db, capsys, bundles["v1"])
    assert reason.startswith("refused: bundle sequence 1 is below this device's floor 2")


def test_a_bundle_signed_by_an_untrusted_key_halts_the_wave_at_once_with_its_reason(
    broker: Broker, bundles: dict[str, Any], agent: None, db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    reason = halted_for(broker, bundles, db, capsys, bundles["foreign"])
    assert reason.startswith("failed (verifying):")
    assert "trust" in reason


def test_a_url_answering_404_halts_the_wave_at_once_with_its_reason(
    broker: Broker, bundles: dict[str, Any], agent: None, db: str,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    missing = bundles["server"].url_for("not-there.edgeship")
    reason = halted_for(broker, bundles, db, capsys, bundles["v3"], missing)
    assert reason.startswith("download refused:")
    assert "HTTP 404" in reason


@pytest.mark.parametrize(
    ("name", "url_name", "problem"),
    [
        ("v1", None, "d1: runs sequence 2; the bundle's 1 must be higher"),
        ("v3", "not-there.edgeship", "url: it does not serve this bundle: "),
    ],
)
def test_the_preflight_stops_what_the_device_would_refuse_and_publishes_nothing(
    broker: Broker, bundles: dict[str, Any], agent: None, db: str,
    capsys: pytest.CaptureFixture[str], name: str, url_name: str | None, problem: str,
) -> None:  # fmt: skip
    url = None if url_name is None else bundles["server"].url_for(url_name)
    with Subscriber(broker, "edgeship/v1/f/+/desired", clean=True) as sub:
        code, _ = rollout(
            broker, bundles, db, bundles[name], "--trust", str(bundles["trust"]), url=url
        )
        time.sleep(0.3)
        sent = sub.snapshot()
    assert code == 1
    err = capsys.readouterr().err
    assert "preflight failed, nothing was published" in err
    assert problem in err
    assert sent == []
    assert main(["rollout", "list", "--db", db, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []
