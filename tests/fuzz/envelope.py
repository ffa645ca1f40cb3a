"""Fuzz the DSSE envelope parser and signature check.

Each input is a ``manifest.sig`` member; the seeds are envelopes over a fixed manifest
signed by one, two and three keys (Ed25519 and ECDSA P-256). Invariants: parsing returns
or raises a ``BundleError``; verifying against a 2-of-3 policy returns the signed bytes
or raises a ``BundleError``; what verifies carries signatures from at least two trusted
keys over exactly the bytes returned.
"""

from __future__ import annotations

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.bundle.manifest import PAYLOAD_TYPE
    from agent.bundle.signing import Envelope, verify_envelope
    from agent.errors import BundleError

from tests.support.bundles import make_key, make_policy

KEYS = (make_key("a"), make_key("b", "ecdsa-p256"), make_key("c"))
POLICY = make_policy(*KEYS, threshold=2)
TRUSTED = {k.keyid for k in KEYS}


def target(data: bytes) -> None:
    try:
        envelope = Envelope.from_bytes(data)
        signed = verify_envelope(envelope, POLICY, PAYLOAD_TYPE)
    except BundleError:
        return
    assert signed == envelope.payload
    assert len({s.keyid for s in envelope.signatures} & TRUSTED) >= 2


if __name__ == "__main__":
    run(target, "envelope")
