"""Fuzz the bundle reader: raw bundle bytes in, verified into a staging directory.

Each input is a whole bundle (tar framing, manifest, envelope, payload); the seeds are
canonical signed bundles, so mutations reach the tar reader, the head members, the
envelope and the payload checks. Invariants: ``verify_bundle`` returns or raises a
``BundleError``; on failure its staging directory is gone; whatever it accepts or refuses,
nothing is written outside it; what it accepts is the signed manifest, with printable
text; ``read_unverified`` (what ``edgeship inspect`` shows) is as clean.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from pathlib import Path

from tests.fuzz._fuzz import instrumented, run
from tests.support.hostile import assert_printable

with instrumented():
    from agent.bundle import Limits, read_unverified, verify_bundle
    from agent.bundle.manifest import MANIFEST_PATH, SIGNATURE_PATH
    from agent.errors import BundleError

from tests.support.bundles import NOW, make_key, make_policy

POLICY = make_policy(make_key())
HEAD = {MANIFEST_PATH, SIGNATURE_PATH}
LIMITS = Limits(max_bundle_bytes=1 << 20, max_manifest_bytes=1 << 16)
_ROOT = Path(tempfile.mkdtemp(prefix="fuzz-bundle-"))


def _tree(root: Path) -> set[str]:
    return {str(Path(d, f).relative_to(root)) for d, _, files in os.walk(root) for f in files}


def _remove(tree: Path) -> None:
    # Verified members are made read-only, directories included.
    for d, _, _ in os.walk(tree):
        Path(d).chmod(0o700)
    shutil.rmtree(tree)


def target(data: bytes) -> None:
    staging = _ROOT / "staging"
    before = _tree(_ROOT)
    try:
        verified = verify_bundle(
            io.BytesIO(data), POLICY, now=NOW, limits=LIMITS, extract_to=staging
        )
    except BundleError:
        assert not staging.exists()
        assert _tree(_ROOT) == before
    else:
        assert_printable(verified.manifest.to_json())
        written = {p.removeprefix("staging/") for p in _tree(_ROOT) - before}
        assert written <= {f.path for f in verified.manifest.files} | HEAD, written
        _remove(staging)
    try:
        manifest, _ = read_unverified(io.BytesIO(data), LIMITS)
    except BundleError:
        return
    assert_printable(manifest.to_json())


if __name__ == "__main__":
    run(target, "bundle", max_len=16384)
