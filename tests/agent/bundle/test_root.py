"""Trust roots: rotation, replay, chains, expiry, revocation, scopes and signed floors.

Pure: bytes, the device's current root and ``now`` in; a verified root, a policy or a typed
error out (agent.bundle.root, agent.bundle.trust). Every attack is signed with real keys.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.bundle import verify_bundle
from agent.bundle.root import ROOT_PAYLOAD_TYPE, TrustRoot, load_trust, read_root
from agent.bundle.signing import Envelope
from agent.bundle.trust import verify_bootstrap, verify_root, vouch_problem, walk_chain
from agent.errors import (
    ConfigError,
    RollbackError,
    RootError,
    RootExpiredError,
    RootVersionError,
    ThresholdError,
    UntrustedSignerError,
)
from sdk.build.keys import sign_envelope
from tests.support.bundles import BundleParts, make_manifest, make_policy
from tests.support.trust import (
    NOW,
    ONLINE,
    RELEASE,
    RELEASE_2,
    ROOT_A,
    ROOT_B,
    ROOT_C,
    ROOT_D,
    ROOT_E,
    YEAR,
    believed,
    first_root,
    next_root,
    signed,
)

GOLDEN = Path(__file__).parent / "golden"
SLACK = 300.0


@pytest.fixture(scope="module")
def v1() -> TrustRoot:
    """Root v1, 2-of-3 root keys, one release key: the device's current root."""
    return believed(
        signed(first_root(root_keys=(ROOT_A, ROOT_B, ROOT_C), root_threshold=2), ROOT_A, ROOT_B)
    )


def _rotated(v1: TrustRoot) -> TrustRoot:
    """v2: root key C replaced by D, threshold still 2."""
    return next_root(v1, remove=[ROOT_C.keyid], add_root=[ROOT_D.public])


# --- rotation ----------------------------------------------------------------------------


def test_rotation_signed_by_the_old_and_the_new_root_keys_is_accepted(v1: TrustRoot) -> None:
    v2 = _rotated(v1)
    new = verify_root(signed(v2, ROOT_A, ROOT_B, ROOT_D), v1)
    assert new.version == 2
    assert ROOT_D.keyid in new.root.keyids
    assert ROOT_C.keyid not in new.keys


def test_rotation_signed_only_by_the_old_keys_is_refused(v1: TrustRoot) -> None:
    # Root keys B and C leave; D and E come in: the old keys alone cannot make the new ones.
    v2 = next_root(v1, remove=[ROOT_B.keyid, ROOT_C.keyid], add_root=[ROOT_D.public, ROOT_E.public])
    # Old threshold met (A, B, C); of the new root keys (A, D, E) only A signed.
    with pytest.raises(RootError, match="itself"):
        verify_root(signed(v2, ROOT_A, ROOT_B, ROOT_C), v1)


def test_rotation_signed_only_by_the_new_keys_is_refused(v1: TrustRoot) -> None:
    v2 = next_root(
        v1,
        remove=[ROOT_A.keyid, ROOT_B.keyid, ROOT_C.keyid],
        add_root=[ROOT_D.public, ROOT_E.public],
    )
    with pytest.raises(RootError, match="predecessor"):
        verify_root(signed(v2, ROOT_D, ROOT_E), v1)


def test_rotation_below_the_old_threshold_is_refused(v1: TrustRoot) -> None:
    v2 = next_root(v1, root_threshold=1)  # its own threshold is 1: one signature is enough
    with pytest.raises(RootError, match="only 1 distinct"):
        verify_root(signed(v2, ROOT_A), v1)


def test_one_key_signing_twice_counts_once(v1: TrustRoot) -> None:
    data = signed(next_root(v1), ROOT_A)
    envelope = Envelope.from_bytes(data)
    doubled = Envelope(envelope.payload_type, envelope.payload, envelope.signatures * 2)
    with pytest.raises(RootError, match="only 1 distinct"):
        verify_root(doubled.to_bytes(), v1)


def test_bundle_keys_cannot_sign_a_root(v1: TrustRoot) -> None:
    with pytest.raises(RootError):
        verify_root(signed(next_root(v1), RELEASE, RELEASE_2), v1)


# --- versions and chains -----------------------------------------------------------------


def test_a_replayed_root_version_is_refused(v1: TrustRoot) -> None:
    v2 = next_root(v1)
    current = verify_root(signed(v2, ROOT_A, ROOT_B), v1)
    other_v2 = next_root(v1, min_sequence={"demo": 9})  # same version, other content
    with pytest.raises(RootVersionError, match="replayed or lowered"):
        verify_root(signed(other_v2, ROOT_A, ROOT_B), current)
    with pytest.raises(RootVersionError, match="replayed or lowered"):
        verify_root(signed(v2, ROOT_A, ROOT_B), current)


def test_a_lowered_root_version_is_refused(v1: TrustRoot) -> None:
    v3 = believed(signed(next_root(next_root(v1)), ROOT_A, ROOT_B))
    with pytest.raises(RootVersionError, match="not newer"):
        verify_root(v1.envelope, v3)


def test_two_skipped_versions_are_walked_as_a_chain(v1: TrustRoot) -> None:
    v2 = next_root(v1, remove=[ROOT_C.keyid], add_root=[ROOT_D.public])
    v3 = next_root(v2, remove=[ROOT_B.keyid], add_root=[ROOT_C.public])
    v4 = next_root(v3, min_sequence={"demo": 4})
    f2 = signed(v2, ROOT_A, ROOT_B, ROOT_D)
    f3 = signed(v3, ROOT_A, ROOT_D, ROOT_C)
    f4 = signed(v4, ROOT_A, ROOT_C)
    with pytest.raises(RootVersionError, match="v2 to v3"):
        verify_root(f4, v1)  # v4 alone cannot be checked against v1
    last = walk_chain(v1, [f2, f3, f4], fleet=None)
    assert (last.version, last.min_sequence) == (4, {"demo": 4})


def test_a_chain_with_a_forged_link_stops_at_that_link(v1: TrustRoot) -> None:
    v2 = next_root(v1)
    forged_v3 = next_root(v2, add_bundles=[RELEASE_2.public])
    with pytest.raises(RootError, match="v3"):
        walk_chain(v1, [signed(v2, ROOT_A, ROOT_B), signed(forged_v3, ROOT_A)], fleet=None)


def test_a_root_for_another_fleet_is_refused(v1: TrustRoot) -> None:
    with pytest.raises(RootError, match="fleet 'other'"):
        verify_root(signed(next_root(v1, fleet="other"), ROOT_A, ROOT_B), v1, fleet="f")
    assert verify_root(signed(next_root(v1, fleet="f"), ROOT_A, ROOT_B), v1, fleet="f")


# --- expiry ------------------------------------------------------------------------------


def test_an_expired_intermediate_root_is_walked_through(v1: TrustRoot) -> None:
    old = next_root(v1, expires=NOW - YEAR)
    fresh = next_root(old)
    last = walk_chain(v1, [signed(old, ROOT_A, ROOT_B), signed(fresh, ROOT_A, ROOT_B)], fleet=None)
    assert not last.expired(NOW, SLACK)


def test_an_expired_root_refuses_installs_but_still_vouches_for_what_runs(
    v1: TrustRoot,
) -> None:
    expired = believed(signed(next_root(v1, expires=NOW - timedelta(hours=1)), ROOT_A, ROOT_B))
    with pytest.raises(RootExpiredError, match="expired at"):
        expired.bundle_policy(NOW, SLACK)
    parts = BundleParts(keys=(RELEASE,))
    assert (
        vouch_problem(expired, parts.signature_member(), parts.manifest, now=NOW, slack_s=SLACK)
        is None
    )


def test_a_root_within_the_clock_slack_of_its_expiry_still_installs(v1: TrustRoot) -> None:
    root = believed(signed(next_root(v1, expires=NOW - timedelta(seconds=60)), ROOT_A, ROOT_B))
    assert root.bundle_policy(NOW, SLACK).keys


# --- revocation, key expiry, scopes, signed floors ---------------------------------------


def _verify(data: bytes, root: TrustRoot) -> Any:
    return verify_bundle(io.BytesIO(data), root.bundle_policy(NOW, SLACK), now=NOW)


def test_a_bundle_signed_by_a_revoked_key_is_refused(v1: TrustRoot) -> None:
    v2 = believed(
        signed(
            next_root(v1, remove=[RELEASE.keyid], add_bundles=[RELEASE_2.public]), ROOT_A, ROOT_B
        )
    )
    old_key = BundleParts(keys=(RELEASE,)).to_bytes()
    assert _verify(old_key, v1).manifest.name == "demo"
    with pytest.raises(UntrustedSignerError, match="trust root v2"):
        _verify(old_key, v2)
    assert _verify(BundleParts(keys=(RELEASE_2,)).to_bytes(), v2)


def test_a_bundle_signed_by_a_revoked_key_is_refused_on_a_device_that_missed_a_root(
    v1: TrustRoot,
) -> None:
    v2 = next_root(v1, remove=[RELEASE.keyid], add_bundles=[RELEASE_2.public])
    v3 = next_root(v2, min_sequence={"other": 1})
    last = walk_chain(v1, [signed(v2, ROOT_A, ROOT_B), signed(v3, ROOT_A, ROOT_B)], fleet=None)
    with pytest.raises(UntrustedSignerError):
        _verify(BundleParts(keys=(RELEASE,)).to_bytes(), last)


def test_a_bundle_signed_by_an_expired_key_is_refused(v1: TrustRoot) -> None:
    root = believed(
        signed(
            next_root(
                v1,
                add_bundles=[RELEASE_2.public],
                key_expiry={RELEASE.keyid: NOW - timedelta(days=1)},
            ),
            ROOT_A,
            ROOT_B,
        )
    )
    with pytest.raises(UntrustedSignerError, match="expired at"):
        _verify(BundleParts(keys=(RELEASE,)).to_bytes(), root)
    assert _verify(BundleParts(keys=(RELEASE_2,)).to_bytes(), root)
    problem = vouch_problem(
        root,
        BundleParts(keys=(RELEASE,)).signature_member(),
        make_manifest(),
        now=NOW,
        slack_s=SLACK,
    )
    assert problem is not None
    assert "expired at" in problem


def test_a_key_signs_only_the_model_names_in_its_scope(v1: TrustRoot) -> None:
    root = believed(
        signed(next_root(v1, scopes={RELEASE.keyid: ["kws-*", "digits"]}), ROOT_A, ROOT_B)
    )
    with pytest.raises(ThresholdError, match="scopes"):
        _verify(BundleParts(keys=(RELEASE,)).to_bytes(), root)  # named "demo"
    for name in ("digits", "kws-small"):
        parts = BundleParts(manifest=make_manifest(name=name), keys=(RELEASE,))
        assert _verify(parts.to_bytes(), root).manifest.name == name


def test_a_bundle_below_the_signed_floor_is_refused(v1: TrustRoot) -> None:
    root = believed(signed(next_root(v1, min_sequence={"demo": 5}), ROOT_A, ROOT_B))
    low = BundleParts(manifest=make_manifest(sequence=4), keys=(RELEASE,)).to_bytes()
    with pytest.raises(RollbackError, match="floor signed in trust root v2"):
        _verify(low, root)
    assert _verify(
        BundleParts(manifest=make_manifest(sequence=5), keys=(RELEASE,)).to_bytes(), root
    )


def test_the_online_key_alone_can_neither_install_nor_rotate(v1: TrustRoot) -> None:
    with_online = believed(signed(next_root(v1, add_freshness=[ONLINE.public]), ROOT_A, ROOT_B))
    with pytest.raises(UntrustedSignerError):
        _verify(BundleParts(keys=(ONLINE,)).to_bytes(), with_online)
    with pytest.raises(RootError):
        verify_root(signed(next_root(with_online), ONLINE), with_online)


# --- from a bare policy; the bootstrap ---------------------------------------------------


def test_a_bare_policy_moves_to_a_root_signed_by_its_keys_and_the_new_root_keys() -> None:
    v0 = TrustRoot.from_policy(make_policy(RELEASE))
    v1 = first_root(root_keys=(ROOT_A,), bundle_keys=(RELEASE,))
    assert verify_root(signed(v1, RELEASE, ROOT_A), v0).version == 1
    with pytest.raises(RootError, match="predecessor"):
        verify_root(signed(v1, ROOT_A), v0)
    with pytest.raises(RootError, match="itself"):
        verify_root(signed(v1, RELEASE), v0)


def test_a_bootstrap_root_must_be_signed_by_its_own_root_keys(tmp_path: Path) -> None:
    data = signed(first_root(), ROOT_A)
    assert verify_bootstrap(data).version == 1
    with pytest.raises(RootError, match="own root keys"):
        verify_bootstrap(signed(first_root(), ROOT_B))
    (tmp_path / "root.json").write_bytes(data)
    (tmp_path / "policy.toml").write_bytes(make_policy(RELEASE).to_toml())
    assert load_trust(tmp_path / "root.json").version == 1
    assert load_trust(tmp_path / "policy.toml").version == 0
    (tmp_path / "bad.json").write_bytes(data.replace(b'"payload"', b'"payload" '))
    with pytest.raises(ConfigError, match="not a valid trust root"):
        load_trust(tmp_path / "bad.json")


# --- the document --------------------------------------------------------------------------


def test_the_root_document_matches_its_golden_file() -> None:
    root = first_root(
        root_keys=(ROOT_A, ROOT_B),
        root_threshold=2,
        freshness=(ONLINE,),
        min_sequence={"digits": 3},
        scopes={RELEASE.keyid: ["digits"]},
        fleet="demo",
    )
    data = signed(root, ROOT_A, ROOT_B)  # Ed25519: deterministic
    golden = GOLDEN / "root_v1.json"
    assert data == golden.read_bytes()
    assert read_root(golden.read_bytes())[1] == root


def _resigned(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    doc = first_root(root_keys=(ROOT_A,), freshness=(ONLINE,)).to_json()
    mutate(doc)
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return sign_envelope(ROOT_PAYLOAD_TYPE, payload, [ROOT_A]).to_bytes()


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[p]
        if value is _DELETE:
            del doc[last]
        else:
            doc[last] = value

    return mutate


_DELETE = object()
_A, _R, _O = ROOT_A.keyid, RELEASE.keyid, ONLINE.keyid

# Signed properly by the right key, and still wrong: each must be refused when read.
MALFORMED: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown field", _set("extra", 1), "unknown key"),
    ("missing field", _set("fleet", _DELETE), "root.fleet is required"),
    ("newer schema", _set("schema_version", "2.0"), "upgrade the agent"),
    ("version 0", _set("version", 0), "root.version"),
    ("bad time", _set("expires", "2030-02-30T00:00:00Z"), "valid date"),
    ("threshold above keys", _set("roles.root.threshold", 2), "threshold"),
    ("duplicate key id in a role", _set("roles.root.keyids", [_A, _A]), "distinct"),
    ("unknown key in a role", _set("roles.bundles.keyids", ["0" * 64]), "ids of keys"),
    ("online key shared", _set("roles.freshness.keyids", [_A]), "nothing but heartbeats"),
    ("key in no role", _set("roles.freshness", None), "in no role"),
    ("scope for a root key", _set("roles.bundles.scopes", {_A: ["x"]}), "only bundle keys"),
    ("bad scope", _set("roles.bundles.scopes", {_R: ["a*b"]}), "prefixes ending in"),
    ("negative floor", _set("min_sequence", {"demo": -1}), "integer >= 0"),
    ("bad model name", _set("min_sequence", {"../x": 1}), "not a model name"),
    ("key id of another key", _set(f"keys.{_A}.keytype", "ecdsa-p256"), "keytype"),
    ("validity too long", _set("roles.freshness.max_validity_s", 10**9), "max_validity_s"),
    ("bad unvouched", _set("unvouched", "ignore"), "unvouched"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_root_is_refused_even_when_properly_signed(
    mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    v0 = TrustRoot.from_policy(make_policy(ROOT_A))
    with pytest.raises(RootError, match=message):
        verify_root(_resigned(mutate), v0)


def test_every_changed_byte_of_a_root_is_refused(v1: TrustRoot) -> None:
    data = signed(next_root(v1), ROOT_A, ROOT_B)
    assert verify_root(data, v1).version == 2
    refused = 0
    for i in range(len(data)):
        mutated = bytearray(data)
        mutated[i] ^= 0x01
        with pytest.raises(RootError):
            verify_root(bytes(mutated), v1)
        refused += 1
    assert refused == len(data)


def test_a_root_over_its_size_cap_is_refused_before_parsing(v1: TrustRoot) -> None:
    huge = b'{"payload":"' + base64.b64encode(b"x" * 300_000) + b'"}'
    with pytest.raises(RootError, match="at most"):
        verify_root(huge, v1)
