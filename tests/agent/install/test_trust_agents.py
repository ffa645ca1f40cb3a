"""Trust over the air, end to end: a real agent process, a real mosquitto, real keys.

The device boots from root v1 (two release keys). The fleet revokes one release key in
root v2, which only the bundle server holds (``root/2.json``), and publishes root v3,
retained, with a signed floor: the device walks the chain, reports v3 in its state and
refuses a bundle signed by the revoked key. Then its state directory is wiped: the
retained root brings the signed floor back and a bundle below it is refused. With a
freshness key, a desired state older than what the heartbeat says exists is refused and
the device reports that it is being held back.

Roots and heartbeats go through ``edgeship trust publish`` and ``edgeship heartbeat``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from sdk.cli import main
from sdk.fleet.serve import BundleServer
from tests.agent.test_daemon import AGENT, agent_toml
from tests.support.broker import Broker, Subscriber
from tests.support.lifecycle import make_model_bundle
from tests.support.trust import (
    ONLINE,
    RELEASE,
    RELEASE_2,
    ROOT_A,
    believed,
    first_root,
    next_root,
    signed,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET, DEVICE = "f", "d1"
WAIT_S = 60.0
Doc = dict[str, Any]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("trust-agents")
    v1 = first_root(bundle_keys=(RELEASE, RELEASE_2), fleet=FLEET)
    v2 = next_root(v1, remove=[RELEASE.keyid])
    v3 = next_root(v2, min_sequence={"mlp": 3})
    fresh = first_root(bundle_keys=(RELEASE_2,), freshness=(ONLINE,), fleet=FLEET)
    made: dict[str, Any] = {
        "revoked": make_model_bundle(d / "b", seed=1, sequence=4, key=RELEASE),
        "below": make_model_bundle(d / "b", seed=2, sequence=2, key=RELEASE_2),
        "dir": d / "b",
    }
    for name, root in (("v1", v1), ("v2", v2), ("v3", v3), ("fresh", fresh)):
        made[name] = d / f"{name}.json"
        made[name].write_bytes(signed(root, ROOT_A))
    assert believed(made["v3"].read_bytes()).version == 3
    with BundleServer(d / "b") as server:
        server.start()
        yield {**made, "server": server}


class Device:
    """The agent as a subprocess, and what it publishes (state, events)."""

    def __init__(self, tmp: Path, broker: Broker, boot: Path, server_url: str) -> None:
        self.state_dir = tmp / "state"
        self.config = tmp / "agent.toml"
        extra = f'[trust]\nserver_url = "{server_url}"\n'
        self.config.write_text(agent_toml(self.state_dir, boot, broker, extra))
        self.sub = Subscriber(broker, f"edgeship/v1/{FLEET}/{DEVICE}/#", clean=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen = 0  # messages before this index are from an earlier run

    def start(self) -> None:
        self.seen = len(self.sub.snapshot())
        self.proc = subprocess.Popen(
            [*AGENT, "run", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def docs(self, leaf: str) -> list[Doc]:
        topic = f"edgeship/v1/{FLEET}/{DEVICE}/{leaf}"
        got = self.sub.snapshot()[self.seen :]
        return [json.loads(m.payload) for m in got if m.topic == topic and m.payload]

    def wait_state(self, ok: Callable[[Doc], bool]) -> Doc:
        """The first reported state for which ``ok`` holds (fails after a minute)."""
        assert self.sub.wait_for(lambda _: any(ok(d) for d in self.docs("state")), WAIT_S), (
            self.docs("state")[-1:]
        )
        return next(d for d in self.docs("state") if ok(d))

    def wait_event(self, kind: str, reason: str = "") -> Doc:
        """The first event ``kind`` whose reason holds ``reason``."""

        def found() -> list[Doc]:
            return [
                e
                for e in self.docs("events")
                if e.get("event") == kind and reason in str(e.get("reason"))
            ]

        assert self.sub.wait_for(lambda _: bool(found()), WAIT_S), self.docs("events")
        return found()[0]


@pytest.fixture
def device(
    tmp_path: Path, broker: Broker, files: dict[str, Any]
) -> Iterator[Callable[[Path], Device]]:
    made: list[Device] = []

    def make(boot: Path) -> Device:
        dev = Device(tmp_path, broker, boot, files["server"].url_for(""))
        dev.sub.__enter__()
        made.append(dev)
        dev.start()
        return dev

    yield make
    for dev in made:
        dev.stop()
        dev.sub.__exit__(None, None, None)


def _cli(*argv: str) -> None:
    assert main(list(argv)) == 0


def _broker_args(broker: Broker) -> list[str]:
    return ["--broker", f"mqtt://{broker.host}:{broker.port}", "--fleet", FLEET]


def _desire(broker: Broker, files: dict[str, Any], name: str) -> None:
    path = files[name].path
    _cli("publish", str(path), "--url", files["server"].url_for(path.name),
         "--device", DEVICE, *_broker_args(broker))  # fmt: skip


def _trust(state: Doc) -> Doc:
    return state.get("trust") or {}


def test_a_revoked_key_is_refused_after_a_missed_root_and_the_floor_survives_a_wipe(
    broker: Broker, files: dict[str, Any], device: Callable[[Path], Device]
) -> None:
    # root v2 only on the bundle server: the device missed it.
    _cli("trust", "publish", str(files["v2"]), "--previous", str(files["v1"]),
         "--dir", str(files["dir"]), "--no-mqtt", "--fleet", FLEET)  # fmt: skip
    _cli("trust", "publish", str(files["v3"]), "--dir", str(files["dir"]), *_broker_args(broker))
    dev = device(files["v1"])
    dev.wait_state(lambda s: _trust(s).get("root_version") == 3)
    updated = [e for e in dev.docs("events") if e.get("event") == "root-updated"]
    assert [e["version"] for e in updated][:2] == [2, 3]  # the chain, walked in order

    _desire(broker, files, "revoked")
    dev.wait_event("failed", "no signature on this bundle comes from a key trust root v3 trusts")

    # Wiped: the bootstrap (v1) knows no floor; the retained v3 brings it back first.
    dev.stop()
    shutil.rmtree(dev.state_dir)
    dev.start()
    _desire(broker, files, "below")
    dev.wait_event("desired-refused", "floor signed in trust root v3")
    assert (dev.state_dir / "trust" / "root.json").read_bytes() == files["v3"].read_bytes()


def test_a_desired_state_older_than_the_heartbeat_says_exists_is_held_back(
    broker: Broker,
    files: dict[str, Any],
    device: Callable[[Path], Device],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = tmp_path / "online.key"
    key.write_bytes(
        ONLINE.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    monkeypatch.setenv("ONLINE_PW", "pw")
    dev = device(files["fresh"])
    dev.wait_state(lambda s: _trust(s).get("root_version") == 1)
    _cli("heartbeat", "--online-key", str(key), "--passphrase-env", "ONLINE_PW",
         "--root", str(files["fresh"]), "--latest", "mlp=5", *_broker_args(broker))  # fmt: skip
    _desire(broker, files, "below")
    event = dev.wait_event("held-back", "the desired state is stale")
    assert event["sequence"] == 2
    state = dev.wait_state(lambda s: "sequence 5" in str(_trust(s).get("held_back")))
    assert state["current"] is None  # nothing was fetched
