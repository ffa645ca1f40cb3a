"""The device's trust keeper: persisted roots, chains from a real bundle server, hostile
documents that change nothing, heartbeats across restarts, and what serves when a key is
revoked (real bundles, real onnxruntime)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.bundle.root import TrustRoot
from agent.errors import HeldBackError, RollbackError, RootExpiredError, UntrustedSignerError
from agent.install import UpdateConfig, Updater, UpdaterConfig
from agent.install._config import TrustConfig
from agent.install._fetch import UrlFetcher
from agent.install._trust import TrustKeeper
from agent.install._vouch import VouchCheck
from sdk.build.keys import SigningKey
from sdk.fleet.serve import BundleServer, add_root
from tests.support.lifecycle import make_model_bundle
from tests.support.trust import (
    FLEET,
    NOW,
    ONLINE,
    ONLINE_2,
    RELEASE,
    RELEASE_2,
    ROOT_A,
    believed,
    first_root,
    heartbeat,
    next_root,
    signed,
)


@dataclass
class Events:
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def __call__(self, kind: str, fields: Mapping[str, Any], /) -> None:
        self.seen.append((kind, dict(fields)))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [f for k, f in self.seen if k == kind]


@dataclass(frozen=True)
class Chain:
    """Roots v1..v4 of one fleet: v2 revokes the release key (RELEASE_2 replaces it), v3
    adds an online key, v4 raises the floor of "mlp" to 3."""

    files: dict[int, bytes]

    def root(self, version: int) -> TrustRoot:
        return believed(self.files[version])


@pytest.fixture(scope="module")
def chain() -> Chain:
    v1 = first_root(fleet=FLEET)
    v2 = next_root(v1, remove=[RELEASE.keyid], add_bundles=[RELEASE_2.public])
    v3 = next_root(v2, add_freshness=[ONLINE.public])
    v4 = next_root(v3, min_sequence={"mlp": 3})
    roots = (v1, v2, v3, v4)
    return Chain({r.version: signed(r, ROOT_A) for r in roots})


def _keeper(state: Path, bootstrap: Path, **kw: Any) -> TrustKeeper:
    kw.setdefault("fleet", FLEET)
    kw.setdefault("wall_clock", lambda: NOW)
    kw.setdefault("fetcher", UrlFetcher)
    return TrustKeeper(state, bootstrap, **kw)


@pytest.fixture
def boot(tmp_path: Path, chain: Chain) -> Path:
    path = tmp_path / "root-1.json"
    path.write_bytes(chain.files[1])
    return path


def test_a_newer_root_is_persisted_and_in_force_after_a_restart(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    events = Events()
    keeper = _keeper(tmp_path / "state", boot, events=events)
    keeper.offer_root(chain.files[2])
    assert keeper.process()
    assert keeper.root.version == 2
    assert (tmp_path / "state" / "trust" / "root.json").read_bytes() == chain.files[2]
    assert events.of("root-updated") == [
        {"version": 2, "previous": 1, "expires": keeper.root.to_json()["expires"]}
    ]
    assert _keeper(tmp_path / "state", boot).root.version == 2  # the bootstrap is older
    keeper.offer_root(chain.files[2])  # the retained root again, on a reconnect
    assert not keeper.process()


def test_a_newer_bootstrap_placed_by_hand_replaces_the_persisted_root(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    _keeper(tmp_path / "state", boot).apply_root(chain.files[2])
    boot.write_bytes(chain.files[3])
    assert _keeper(tmp_path / "state", boot).root.version == 3


def test_a_hostile_root_changes_nothing_and_is_reported(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    events = Events()
    keeper = _keeper(tmp_path / "state", boot, events=events)
    keeper.apply_root(chain.files[2])
    persisted = (tmp_path / "state" / "trust" / "root.json").read_bytes()
    forged = signed(next_root(chain.root(2), add_bundles=[RELEASE.public]), RELEASE)
    flipped = bytearray(chain.files[3])
    flipped[len(flipped) // 2] ^= 1
    for hostile in (b"{", b"\xff" * 100, forged, bytes(flipped), chain.files[1], chain.files[2]):
        keeper.offer_root(hostile)
        keeper.process()
    assert keeper.root.version == 2
    assert (tmp_path / "state" / "trust" / "root.json").read_bytes() == persisted
    reasons = [e["reason"] for e in events.of("root-refused")]
    assert len(reasons) == 5  # the current root again is no news
    assert any("not newer" in r for r in reasons)


def test_a_device_that_missed_versions_walks_the_chain_from_the_bundle_server(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    served = tmp_path / "served"
    for version in (2, 3):
        add_root(served, version, chain.files[version])
    with BundleServer(served) as server:
        server.start()
        events = Events()
        keeper = _keeper(
            tmp_path / "state", boot, events=events, config=TrustConfig(server_url=server.url)
        )
        keeper.offer_root(chain.files[4])
        assert keeper.process()
    assert keeper.root.version == 4
    assert [e["version"] for e in events.of("root-updated")] == [2, 3, 4]
    assert keeper.root.min_sequence == {"mlp": 3}


def test_a_chain_that_cannot_be_fetched_yet_is_tried_again(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    events = Events()
    with BundleServer(served) as server:
        server.start()
        config = TrustConfig(server_url=server.url, retry_initial_s=0.1, retry_max_s=0.1)
        keeper = _keeper(tmp_path / "state", boot, events=events, config=config)
        keeper.offer_root(chain.files[3])
        keeper.process()
        assert keeper.root.version == 1
        assert "retrying later" in events.of("root-refused")[0]["reason"]
        add_root(served, 2, chain.files[2])
        deadline = time.monotonic() + 10
        while keeper.root.version < 3 and time.monotonic() < deadline:
            time.sleep(keeper.wait_s() or 0.05)
            keeper.process()
    assert keeper.root.version == 3


def test_without_a_bundle_server_a_gap_is_reported_not_guessed(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    events = Events()
    keeper = _keeper(tmp_path / "state", boot, events=events)
    keeper.offer_root(chain.files[3])
    keeper.process()
    assert keeper.root.version == 1
    assert "server_url" in events.of("root-refused")[0]["reason"]
    assert keeper.wait_s() is None or keeper.wait_s() > 0  # nothing to retry in a loop


def test_the_signed_floor_holds_after_the_state_directory_is_wiped(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    state = tmp_path / "state"
    keeper = _keeper(state, boot)
    for version in (2, 3, 4):
        keeper.apply_root(chain.files[version])
    shutil.rmtree(state)
    # The wiped device starts from its bootstrap; the retained root brings the floor back,
    # and its heartbeat requirement holds installs until then.
    wiped = _keeper(state, boot)
    assert wiped.root.version == 1
    wiped.check_desired("mlp", 2, "0" * 64)  # the bootstrap alone knows no floor
    for version in (2, 3, 4):
        wiped.apply_root(chain.files[version])
    with pytest.raises(HeldBackError, match="no heartbeat"):
        wiped.check_desired("mlp", 2, "0" * 64)
    wiped.offer_heartbeat(heartbeat(root_version=4))
    wiped.process()
    with pytest.raises(RollbackError, match="floor signed in trust root v4"):
        wiped.check_desired("mlp", 2, "0" * 64)
    wiped.check_desired("mlp", 3, "0" * 64)


def test_with_a_freshness_key_nothing_installs_until_a_heartbeat_arrives(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    events = Events()
    keeper = _keeper(
        tmp_path / "state", boot, events=events, config=TrustConfig(startup_grace_s=0.0)
    )
    keeper.apply_root(chain.files[2])
    keeper.apply_root(chain.files[3])
    keeper.process()
    assert "no heartbeat" in events.of("held-back")[0]["reason"]
    with pytest.raises(HeldBackError):
        keeper.install_policy(NOW)
    keeper.offer_heartbeat(heartbeat(root_version=3, latest={"mlp": 4}))
    assert keeper.process()
    assert keeper.document()["held_back"] is None
    with pytest.raises(HeldBackError, match="held back"):
        keeper.check_desired("mlp", 3, "1" * 64)
    assert keeper.document()["held_back"] is not None
    keeper.check_desired("mlp", 4, "2" * 64)
    assert keeper.document()["held_back"] is None


def test_a_replayed_heartbeat_stays_refused_after_a_restart(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    keeper = _keeper(tmp_path / "state", boot)
    for version in (2, 3):
        keeper.apply_root(chain.files[version])
    old, new = heartbeat(issued=NOW - timedelta(seconds=60)), heartbeat(issued=NOW)
    keeper.offer_heartbeat(new)
    keeper.process()
    events = Events()
    restarted = _keeper(tmp_path / "state", boot, events=events)
    restarted.offer_heartbeat(old)
    assert not restarted.process()
    assert "replayed" in events.of("heartbeat-refused")[0]["reason"]
    assert restarted.heartbeat is not None
    assert restarted.heartbeat.envelope == new


def test_new_online_keys_start_a_new_heartbeat_history(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    keeper = _keeper(tmp_path / "state", boot)
    for version in (2, 3):
        keeper.apply_root(chain.files[version])
    keeper.offer_heartbeat(heartbeat(issued=NOW))
    keeper.process()
    v4 = next_root(chain.root(3), remove=[ONLINE.keyid], add_freshness=[ONLINE_2.public])
    keeper.apply_root(signed(v4, ROOT_A))
    assert keeper.heartbeat is None
    keeper.offer_heartbeat(heartbeat(key=ONLINE_2, root_version=4, issued=NOW))
    assert keeper.process()


def test_a_heartbeat_naming_a_newer_root_makes_the_device_catch_up(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    served = tmp_path / "served"
    for version in (2, 3, 4):
        add_root(served, version, chain.files[version])
    with BundleServer(served) as server:
        server.start()
        keeper = _keeper(tmp_path / "state", boot, config=TrustConfig(server_url=server.url))
        keeper.apply_root(chain.files[2])
        keeper.apply_root(chain.files[3])
        keeper.offer_heartbeat(heartbeat(root_version=4))
        keeper.process()
    assert keeper.root.version == 4


def test_an_expired_root_is_reported_once_and_refuses_installs(
    tmp_path: Path, boot: Path, chain: Chain
) -> None:
    events = Events()
    keeper = _keeper(
        tmp_path / "state", boot, events=events, wall_clock=lambda: NOW + timedelta(days=800)
    )
    keeper.process()
    keeper.process()
    assert len(events.of("root-expired")) == 1
    assert keeper.document()["root_expired"] is True
    with pytest.raises(RootExpiredError):
        keeper.check_desired("mlp", 9, "0" * 64)


# --- what serves when its signer is revoked -------------------------------------------------


def _device(
    tmp_path: Path, chain: Chain, *, unvouched: str, signer_of_previous: SigningKey
) -> tuple[TrustKeeper, Updater, Events, TrustRoot]:
    """A device running mlp v2 (signed by RELEASE) over v1 (``signer_of_previous``), root v1
    trusting both keys; returns it and root v2, which revokes RELEASE."""
    v1 = first_root(bundle_keys=(RELEASE, RELEASE_2), fleet=FLEET)
    boot = tmp_path / "boot.json"
    boot.write_bytes(signed(v1, ROOT_A))
    events = Events()
    keeper = _keeper(tmp_path / "state", boot, events=events)
    updater = Updater(
        tmp_path / "state",
        keeper.install_policy,
        config=UpdaterConfig(update=UpdateConfig(health_gate="thread", health_runs=2)),
        events=events,
    )
    made = tmp_path / "bundles"
    for seq, key in ((1, signer_of_previous), (2, RELEASE)):
        updater.install(str(make_model_bundle(made, seed=seq, sequence=seq, key=key).path))
        updater.commit()
    v2 = next_root(v1, remove=[RELEASE.keyid], unvouched=unvouched)
    return keeper, updater, events, believed(signed(v2, ROOT_A))


def test_a_revoked_signer_of_what_serves_is_reported_and_serving_goes_on(
    tmp_path: Path, chain: Chain
) -> None:
    keeper, updater, events, v2 = _device(
        tmp_path, chain, unvouched="keep-serving", signer_of_previous=RELEASE_2
    )
    current = updater.status().current
    check = VouchCheck(keeper, updater, emit=events, changed=lambda: None)
    keeper.offer_root(v2.envelope)
    keeper.process()
    check.check()
    (event,) = events.of("unvouched")
    assert (event["digest"], event["action"]) == (current, "keep-serving")
    assert "trust root v2" in event["reason"]
    assert updater.status().current == current
    assert check.unvouched == event["reason"]  # what fleet status shows
    with pytest.raises(UntrustedSignerError):  # and it cannot be installed again
        updater.install(str(next(tmp_path.glob("bundles/bundle-2-*"))))


def test_a_revoked_signer_rolls_back_to_a_version_still_vouched_for(
    tmp_path: Path, chain: Chain
) -> None:
    keeper, updater, events, v2 = _device(
        tmp_path, chain, unvouched="roll-back", signer_of_previous=RELEASE_2
    )
    previous = updater.status().previous
    check = VouchCheck(keeper, updater, emit=events, changed=lambda: None)
    keeper.offer_root(v2.envelope)
    keeper.process()
    check.check()
    assert events.of("unvouched")[0]["action"] == "roll-back"
    assert events.of("rolled-back")[0]["current"] == previous
    assert updater.status().current == previous


def test_with_nothing_vouched_for_the_device_keeps_serving_and_says_so(
    tmp_path: Path, chain: Chain
) -> None:
    keeper, updater, events, v2 = _device(
        tmp_path, chain, unvouched="roll-back", signer_of_previous=RELEASE
    )
    current = updater.status().current
    check = VouchCheck(keeper, updater, emit=events, changed=lambda: None)
    keeper.offer_root(v2.envelope)
    keeper.process()
    check.check()
    assert events.of("unvouched")[0]["action"] == "none-vouched"
    assert updater.status().current == current
    assert not events.of("rolled-back")
