"""DSSE envelopes, Ed25519 and ECDSA P-256 keys, k-of-n trust policies."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from typing import Literal

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.bundle.manifest import PAYLOAD_TYPE
from agent.bundle.signing import Envelope, PublicKey, Signature, TrustPolicy, pae, verify_envelope
from agent.errors import (
    BadSignatureError,
    ConfigError,
    KeyFileError,
    ThresholdError,
    UntrustedSignerError,
)
from sdk.build.keys import sign_envelope
from tests.support.bundles import make_key, make_policy

KeyType = Literal["ed25519", "ecdsa-p256"]
KEYTYPES: list[KeyType] = ["ed25519", "ecdsa-p256"]
PAYLOAD = b'{"name":"demo"}\n'


def test_pae_matches_the_dsse_spec_example() -> None:
    assert (
        pae("http://example.com/HelloWorld", b"hello world")
        == b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


@pytest.mark.parametrize("keytype", KEYTYPES)
def test_envelope_signed_by_a_trusted_key_returns_the_payload(keytype: KeyType) -> None:
    key = make_key("a", keytype)
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [key])
    assert verify_envelope(env, make_policy(key), PAYLOAD_TYPE) == PAYLOAD


@pytest.mark.parametrize("keytype", KEYTYPES)
def test_keyid_is_sha256_of_the_spki_der(keytype: KeyType) -> None:
    public = make_key("a", keytype).public
    der = serialization.load_pem_public_key(public.to_pem()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public.keyid == hashlib.sha256(der).hexdigest()
    assert public.keytype == keytype
    assert PublicKey.from_pem(public.to_pem()) == public


@pytest.mark.parametrize("keytype", KEYTYPES)
def test_tampered_payload_fails_with_bad_signature(keytype: KeyType) -> None:
    key = make_key("a", keytype)
    env = replace(sign_envelope(PAYLOAD_TYPE, PAYLOAD, [key]), payload=PAYLOAD + b" ")
    with pytest.raises(BadSignatureError):
        verify_envelope(env, make_policy(key), PAYLOAD_TYPE)


def test_signature_under_other_payload_type_is_refused() -> None:
    key = make_key()
    env = sign_envelope("text/plain", PAYLOAD, [key])
    with pytest.raises(BadSignatureError, match="payloadType"):
        verify_envelope(env, make_policy(key), PAYLOAD_TYPE)


def test_signature_by_an_unlisted_key_is_untrusted() -> None:
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [make_key("stranger")])
    with pytest.raises(UntrustedSignerError):
        verify_envelope(env, make_policy(make_key()), PAYLOAD_TYPE)


def test_two_of_three_accepts_two_distinct_signers_of_mixed_types() -> None:
    a, b, c = make_key("a"), make_key("b", "ecdsa-p256"), make_key("c")
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [a, b])
    assert verify_envelope(env, make_policy(a, b, c, threshold=2), PAYLOAD_TYPE) == PAYLOAD


def test_two_of_three_refuses_one_signer() -> None:
    a, b, c = make_key("a"), make_key("b"), make_key("c")
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [a, make_key("stranger")])
    with pytest.raises(ThresholdError, match="only 1"):
        verify_envelope(env, make_policy(a, b, c, threshold=2), PAYLOAD_TYPE)


def test_each_keyid_counts_once_however_often_it_signs() -> None:
    a, b = make_key("a"), make_key("b", "ecdsa-p256")
    # ECDSA signatures differ each time: three different valid signatures by one key.
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [b, b, b])
    assert len({s.sig for s in env.signatures}) == 3
    with pytest.raises(ThresholdError):
        verify_envelope(env, make_policy(a, b, threshold=2), PAYLOAD_TYPE)


def test_invalid_signature_from_one_trusted_key_is_ignored_when_threshold_is_met() -> None:
    a, b = make_key("a"), make_key("b")
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [a])
    env = replace(env, signatures=(*env.signatures, Signature(b.keyid, b"\0" * 64)))
    assert verify_envelope(env, make_policy(a, b), PAYLOAD_TYPE) == PAYLOAD


def test_signature_claiming_a_trusted_keyid_but_made_by_another_key_is_bad() -> None:
    a = make_key("a")
    forged = Signature(a.keyid, make_key("mallory").sign(pae(PAYLOAD_TYPE, PAYLOAD)))
    env = Envelope(PAYLOAD_TYPE, PAYLOAD, (forged,))
    with pytest.raises(BadSignatureError):
        verify_envelope(env, make_policy(a), PAYLOAD_TYPE)


def test_ed25519_signatures_are_deterministic_and_ecdsa_are_not() -> None:
    ed, ec_key = make_key("a"), make_key("b", "ecdsa-p256")
    assert sign_envelope(PAYLOAD_TYPE, PAYLOAD, [ed]) == sign_envelope(PAYLOAD_TYPE, PAYLOAD, [ed])
    assert sign_envelope(PAYLOAD_TYPE, PAYLOAD, [ec_key]) != sign_envelope(
        PAYLOAD_TYPE, PAYLOAD, [ec_key]
    )


def test_envelope_bytes_round_trip() -> None:
    env = sign_envelope(PAYLOAD_TYPE, PAYLOAD, [make_key("a"), make_key("b", "ecdsa-p256")])
    raw = env.to_bytes()
    assert Envelope.from_bytes(raw) == env
    assert Envelope.from_bytes(raw).to_bytes() == raw


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"[]",
        b'{"payload":"","payloadType":"t"}',
        b'{"payload":"","payloadType":"t","signatures":[]}',
        b'{"payload":"","payloadType":"t","signatures":[{"keyid":1,"sig":""}]}',
        b'{"payload":"!!","payloadType":"t","signatures":[{"keyid":"k","sig":""}]}',
        b'{"payload":"","payloadType":5,"signatures":[{"keyid":"k","sig":""}]}',
        b'{"payload":"","payloadType":"t","signatures":[{"keyid":"k","sig":""}],"x":1}',
        b"\xff",
        b"[" * 100_000,
        b"1" * 10_000,
    ],
)
def test_malformed_envelope_is_a_bad_signature(raw: bytes) -> None:
    with pytest.raises(BadSignatureError):
        Envelope.from_bytes(raw)


# --- trust policy files ---------------------------------------------------------------------


def test_trust_policy_toml_round_trip_with_both_key_types() -> None:
    policy = make_policy(make_key("a"), make_key("b", "ecdsa-p256"), make_key("c"), threshold=2)
    names = {make_key("a").keyid: 'release "A"'}
    text = policy.to_toml(names)
    assert b'name = "release \\"A\\""' in text
    assert TrustPolicy.from_toml(text) == policy


def _policy_toml(*entries: str, threshold: str = "1") -> bytes:
    return (f"threshold = {threshold}\n" + "".join(entries)).encode()


def _entry(pem: bytes, extra: str = "") -> str:
    return f'[[keys]]\n{extra}public_key = """\n{pem.decode()}"""\n'


def _rsa_pem() -> bytes:
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _p384_pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


PEM_A = make_key("a").public.to_pem()


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        (b"threshold = ", ConfigError, "not valid TOML"),
        (b"\xff", ConfigError, "not valid TOML"),
        (b"threshold = 1\n", ConfigError, "at least one"),
        (_policy_toml(_entry(PEM_A), threshold="0"), ConfigError, "between 1 and"),
        (_policy_toml(_entry(PEM_A), threshold="2"), ConfigError, "between 1 and"),
        (_policy_toml(_entry(PEM_A), threshold="true"), ConfigError, "integer"),
        (_policy_toml(_entry(PEM_A), threshold='"1"'), ConfigError, "integer"),
        (_policy_toml("[[keys]]\nname = 'x'\n"), ConfigError, "public_key"),
        (
            _policy_toml(_entry(PEM_A, 'keyid = "' + "0" * 64 + '"\n')),
            ConfigError,
            "does not match",
        ),
        (_policy_toml(_entry(b"not a pem\n")), KeyFileError, "not a PEM"),
        (_policy_toml(_entry(_p384_pem())), KeyFileError, "P-256"),
    ],
)
def test_invalid_trust_policy_file_is_a_config_error(
    text: bytes, error: type[ConfigError], message: str
) -> None:
    with pytest.raises(error, match=message):
        TrustPolicy.from_toml(text)


def test_rsa_keys_are_refused_in_a_policy() -> None:
    with pytest.raises(KeyFileError, match="Ed25519 and ECDSA P-256"):
        TrustPolicy.from_toml(_policy_toml(_entry(_rsa_pem())))


def test_the_same_key_listed_twice_counts_once() -> None:
    text = _policy_toml(_entry(PEM_A), _entry(PEM_A), threshold="2")
    with pytest.raises(ConfigError, match="between 1 and the number of keys \\(1\\)"):
        TrustPolicy.from_toml(text)


def test_empty_policy_is_refused() -> None:
    with pytest.raises(ConfigError):
        TrustPolicy(keys={})


def test_a_misspelled_policy_field_is_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        TrustPolicy.from_toml(_policy_toml(_entry(PEM_A)) + b"\ntreshold = 2\n")


def test_a_policy_keytype_that_does_not_match_its_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="keytype ecdsa-p256 does not match"):
        TrustPolicy.from_toml(_policy_toml(_entry(PEM_A, 'keytype = "ecdsa-p256"\n')))


def test_a_policy_written_by_to_toml_reads_back() -> None:
    policy = TrustPolicy.of([make_key("a").public, make_key("b", "ecdsa-p256").public], 2)
    assert TrustPolicy.from_toml(policy.to_toml({make_key("a").public.keyid: "release"})) == policy


@pytest.mark.parametrize("keytype", ["ed25519", "ecdsa-p256"])
def test_reading_a_pem_key_without_the_crypto_library_gives_the_same_key(
    keytype: Literal["ed25519", "ecdsa-p256"],
) -> None:
    key = make_key("pem", keytype).public
    der = serialization.load_pem_public_key(key.to_pem()).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert PublicKey.from_pem(key.to_pem()) == key
    assert key.spki_der == der


def test_an_ed25519_trust_policy_loads_without_importing_cryptography() -> None:
    code = (
        "import sys\n"
        "from agent.bundle.signing import TrustPolicy\n"
        f"TrustPolicy.from_toml({TrustPolicy.of([make_key('a').public]).to_toml()!r})\n"
        "print('cryptography' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
