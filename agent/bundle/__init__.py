"""The bundle: its format, and its verification — the device's trust core.

Pure: a file object, a trust policy and ``now`` in; a verified manifest or a typed
:class:`~agent.errors.BundleError` out (:func:`verify_bundle`). No network, no state; it
writes only into the fresh directory a caller names for extraction. The format is
normative in docs/bundle-format.md: :mod:`agent.bundle.manifest` (the signed manifest),
:mod:`agent.bundle.signing` (DSSE envelopes, keys, trust policy),
:mod:`agent.bundle.crypto` (encrypted payloads), :mod:`agent.bundle.arrays` (golden
input and output files), :mod:`agent.bundle.drift` (the drift feature definition). The
SDK writes bundles with :func:`write_bundle`; the device is the authority on what it
accepts, so the format lives here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.plumbing.lazy import exports

if TYPE_CHECKING:
    from agent.bundle._compat import DeviceInfo, check_compatibility, version_tuple
    from agent.bundle._verify import (
        DEFAULT_MAX_BUNDLE_BYTES,
        Limits,
        VerifiedBundle,
        read_unverified,
        verify_bundle,
    )
    from agent.bundle._write import write_bundle
    from agent.bundle.manifest import Manifest
    from agent.bundle.signing import Envelope, PublicKey, TrustPolicy

__all__ = [
    "DEFAULT_MAX_BUNDLE_BYTES",
    "DeviceInfo",
    "Envelope",
    "Limits",
    "Manifest",
    "PublicKey",
    "TrustPolicy",
    "VerifiedBundle",
    "check_compatibility",
    "read_unverified",
    "verify_bundle",
    "version_tuple",
    "write_bundle",
]

__getattr__ = exports(
    __name__,
    {
        "DeviceInfo": "agent.bundle._compat",
        "check_compatibility": "agent.bundle._compat",
        "version_tuple": "agent.bundle._compat",
        "DEFAULT_MAX_BUNDLE_BYTES": "agent.bundle._verify",
        "Limits": "agent.bundle._verify",
        "VerifiedBundle": "agent.bundle._verify",
        "read_unverified": "agent.bundle._verify",
        "verify_bundle": "agent.bundle._verify",
        "write_bundle": "agent.bundle._write",
        "Manifest": "agent.bundle.manifest",
        "Envelope": "agent.bundle.signing",
        "PublicKey": "agent.bundle.signing",
        "TrustPolicy": "agent.bundle.signing",
    },
)
