"""Fuzz what a signer may write: any manifest bytes, validly signed, in a canonical bundle.

The audit's lesson: content under a good signature was trusted too much. Here the input
is the manifest member itself; the harness signs it with a trusted key and lays out a
bundle with the default payload, so every input passes the signature and reaches the
manifest reader and what follows it (payload listing, digests, compatibility, expiry).
Invariants: ``verify_bundle`` returns or raises a ``BundleError``; what it accepts has
printable text and is the canonical encoding of itself (reading its own bytes back gives
the same manifest).
"""

from __future__ import annotations

import io

from tests.fuzz._fuzz import instrumented, run
from tests.support.hostile import assert_printable

with instrumented():
    from agent.bundle import Limits, verify_bundle
    from agent.bundle.manifest import Manifest
    from agent.errors import BundleError

from tests.support.bundles import NOW, BundleParts, make_key, make_policy

KEY = make_key()
POLICY = make_policy(KEY)
LIMITS = Limits(max_bundle_bytes=1 << 20, max_manifest_bytes=1 << 16)


def target(data: bytes) -> None:
    bundle = BundleParts(keys=(KEY,), manifest_bytes=data).to_bytes()
    try:
        manifest = verify_bundle(io.BytesIO(bundle), POLICY, now=NOW, limits=LIMITS).manifest
    except BundleError:
        return
    assert_printable(manifest.to_json())
    assert Manifest.from_bytes(manifest.to_bytes()) == manifest


if __name__ == "__main__":
    run(target, "signed_manifest", max_len=16384)
