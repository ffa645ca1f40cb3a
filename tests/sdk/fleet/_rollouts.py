"""What the rollout tests share: a served bundle with its trust policy, simulated devices
that report a state from the start (as agents do on connect), the CLI in-process or as a
real subprocess, and what each device was told."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ConfigError
from sdk.cli import main
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.rollout import Rollout
from sdk.fleet.serve import BundleServer
from sdk.fleet.store import open_store
from tests.support.broker import Broker, Subscriber
from tests.support.bundles import BundleParts, make_key, make_manifest, make_policy
from tests.support.fake_device import FakeDevice

EDGESHIP = [sys.executable, "-c", "from sdk.cli import main; raise SystemExit(main())"]


@dataclass(frozen=True)
class Served:
    bundle: Path
    url: str
    trust: Path
    root: Path


def serve_bundle(tmp_path: Path) -> Iterator[Served]:
    """A bundle (sequence 7, signed by the default test key) over HTTP, and its policy."""
    root = tmp_path / "bundles"
    root.mkdir()
    bundle = root / "digits.edgeship"
    bundle.write_bytes(BundleParts(manifest=make_manifest(sequence=7)).to_bytes())
    trust = tmp_path / "trust.toml"
    trust.write_bytes(make_policy(make_key()).to_toml())
    with BundleServer(root) as server:
        server.start()
        yield Served(bundle, server.url_for(bundle.name), trust, root)


def devices(
    broker: Broker, names: list[str], *, state: dict[str, Any] | None = None, **kwargs: Any
) -> list[FakeDevice]:
    """Connected simulated devices, each with a retained state (``current``: ``state``)."""
    started = []
    for name in names:
        d = FakeDevice(broker.host, broker.port, "f", name, **kwargs).start()
        d.current = state
        d.publish_state()
        started.append(d)
    return started


def rollout_argv(
    broker: Broker, served: Served, db: str, names: list[str], *extra: str, rid: str = "r1"
) -> list[str]:
    groups = served.root.parent / "groups.toml"
    groups.write_text(f"[groups]\nall = {json.dumps(names)}\n")
    return [
        "rollout", str(served.bundle), "--url", served.url, "--trust", str(served.trust),
        "--fleet", "f", "--broker", f"mqtt://{broker.host}:{broker.port}",
        "--group", "all", "--groups", str(groups), "--id", rid, "--db", db,
        "--waves", "20%,100%", "--min-healthy-time", "0.2", "--wave-timeout", "20",
        "--poll", "0.05", *extra,
    ]  # fmt: skip


def status(db: str, capsys: pytest.CaptureFixture[str], rid: str = "r1") -> dict[str, Any]:
    capsys.readouterr()
    assert main(["rollout", "status", rid, "--db", db, "--json"]) == 0
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def wait_record(db: str, done: Callable[[Rollout], bool], timeout_s: float = 30.0) -> Rollout:
    """The rollout ``r1`` once ``done`` says so (read from the store as another host would)."""
    store = open_store(db)
    records = RolloutRecords(store)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            with contextlib.suppress(ConfigError):  # not created yet
                rollout = records.load("r1")[0]
                if done(rollout):
                    return rollout
            if time.monotonic() > deadline:
                raise AssertionError(f"rollout r1 did not get there in {timeout_s}s")
            time.sleep(0.05)
    finally:
        store.close()


def desired_counts(sub: Subscriber) -> Counter[str]:
    """How many desired states (not clears) each device was sent."""
    return Counter(m.topic.split("/")[3] for m in sub.snapshot() if m.payload)


def spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``edgeship ARGV`` as a real process (its output collected for the assertion messages)."""
    return subprocess.Popen(
        [*EDGESHIP, *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )
