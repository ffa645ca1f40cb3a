"""Desired state: which bundle a model of a device should run, published retained per
device and model; and the fleet's trust documents, published retained per fleet.

The desired payload is defined, written and read by :mod:`agent.messages.desired`
(docs/mqtt.md, "desired"); an empty retained payload clears it. Model ``default`` (every
single-model agent) has its desired state on ``.../<device>/desired``, a model NAME on
``.../<device>/models/NAME/desired``, and its payload names it. The trust root and the
heartbeat travel as the signed files themselves (:func:`publish_trust`). The transport is
untrusted: the device verifies every signature whatever it receives.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

from agent.bundle import read_unverified, verify_bundle
from agent.bundle.manifest import Manifest
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, ManifestMismatchError
from agent.messages.desired import (
    DEFAULT_MODEL,
    BundleRef,
    Desired,
    ProbationRule,
    PromotionRule,
    Split,
)
from agent.messages.topics import Topics, trust_topic
from agent.plumbing.files import file_sha256
from agent.plumbing.transport import Transport, publish_many

__all__ = [
    "BundleRef",
    "bundle_ref",
    "clear_desired",
    "desired_payload",
    "publish_desired",
    "publish_trust",
]

_CHUNK_BYTES = 1 << 20


def bundle_ref(
    path: Path, url: str, *, policy: TrustPolicy | None = None, now: datetime | None = None
) -> BundleRef:
    """Read a bundle file and describe it for a desired state.

    With ``policy`` the bundle is fully verified first (a fleet should not be told to
    fetch a bundle its devices will refuse); without, only its head is parsed and the
    signed manifest checked to be the one in the bundle.

    Raises:
        ConfigError: the file cannot be read, or the URL is not http(s).
        BundleError: the bundle is malformed, or fails verification against ``policy``.
    """
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"bundle URL {url!r} must be http:// or https://")
    try:
        with path.open("rb") as f:
            if policy is not None:
                verified = verify_bundle(f, policy, now=now or datetime.now(UTC))
                manifest, digest = verified.manifest, verified.digest
            else:
                manifest, envelope = read_unverified(f)
                if Manifest.from_bytes(envelope.payload) != manifest:
                    raise ManifestMismatchError(
                        f"{path}: manifest.json is not the manifest that was signed"
                    )
                digest = hashlib.sha256(envelope.payload).hexdigest()
        sha256 = file_sha256(path)
    except OSError as e:
        raise ConfigError(f"cannot read bundle {path}: {e.strerror}") from None
    return BundleRef(
        url=url,
        sha256=sha256,
        digest=digest,
        sequence=manifest.sequence,
        name=manifest.name,
        version=manifest.version,
    )


def desired_payload(
    fleet: str,
    device: str,
    ref: BundleRef,
    *,
    rollout: str | None,
    ts: float,
    model: str = DEFAULT_MODEL,
    shadow: PromotionRule | None = None,
    split: Split | None = None,
    probation: ProbationRule | None = None,
) -> bytes:
    """The retained ``desired`` payload for one model of a device: run ``ref``, after a
    shadow stage by ``shadow`` or in an A/B ``split`` if given.

    Raises:
        ValueError: not a model name, or both a shadow stage and a split.
    """
    desired = Desired(
        ref, rollout=rollout, ts=ts, model=model, shadow=shadow, split=split, probation=probation
    )
    return desired.to_payload(fleet=fleet, device=device)


def publish_desired(
    transport: Transport,
    fleet: str,
    devices: Iterable[str],
    ref: BundleRef,
    *,
    rollout: str | None = None,
    model: str = DEFAULT_MODEL,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Publish the retained desired state of ``model`` to each device; returns the
    devices, in order.

    Raises:
        BrokerError: a publish was not acknowledged.
        ValueError: a device id cannot be a topic level, or not a model name.
    """
    done = list(devices)
    messages = [
        (
            Topics(fleet, device).desired_for(model),
            desired_payload(fleet, device, ref, rollout=rollout, ts=clock(), model=model),
        )
        for device in done
    ]
    publish_many(transport, messages, retain=True)
    return done


def clear_desired(
    transport: Transport, fleet: str, devices: Iterable[str], *, model: str = DEFAULT_MODEL
) -> None:
    """Remove the retained desired state of ``model`` (an empty retained payload).

    Raises:
        BrokerError: a publish was not acknowledged.
    """
    messages = [(Topics(fleet, device).desired_for(model), b"") for device in devices]
    publish_many(transport, messages, retain=True)


def publish_trust(transport: Transport, fleet: str, document: str, data: bytes) -> str:
    """Publish the fleet's trust ``root`` or ``heartbeat`` (the signed file), retained;
    returns the topic. Check the file before (devices refuse what does not verify).

    Raises:
        BrokerError: the publish was not acknowledged.
        ValueError: the fleet id cannot be a topic level, or the document is unknown.
    """
    topic = trust_topic(fleet, document)
    publish_many(transport, [(topic, data)], retain=True)
    return topic
