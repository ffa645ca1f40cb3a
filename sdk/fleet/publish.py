"""Desired state: which bundle a device should run, published retained per device.

The payload (docs/mqtt.md, "desired"):
``{"v":1,"fleet","device","ts","bundle":{"url","sha256","digest","sequence","name",
"version"},"rollout":<id or null>}``; an empty retained payload clears it. The transport
is untrusted: the device verifies the bundle's signature whatever the payload says.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.bundle import read_unverified, verify_bundle
from agent.errors import ConfigError, ManifestMismatchError
from agent.manifest import Manifest
from agent.signing import TrustPolicy
from agent.telemetry.outbox import encode_json
from agent.telemetry.topics import SCHEMA_VERSION, Topics
from sdk.fleet._client import FleetClient

__all__ = ["BundleRef", "bundle_ref", "clear_desired", "desired_payload", "publish_desired"]

_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class BundleRef:
    """What a device needs to fetch and recognise a bundle."""

    url: str
    sha256: str  # of the bundle file, checked while downloading
    digest: str  # of the signed manifest: the bundle's identity
    sequence: int
    name: str
    version: str

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "sha256": self.sha256,
            "digest": self.digest,
            "sequence": self.sequence,
            "name": self.name,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> BundleRef:
        """Raises: KeyError or TypeError when a field is missing or of the wrong type."""
        return cls(
            url=str(doc["url"]),
            sha256=str(doc["sha256"]),
            digest=str(doc["digest"]),
            sequence=int(doc["sequence"]),
            name=str(doc["name"]),
            version=str(doc["version"]),
        )


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


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
        sha256 = _file_sha256(path)
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
    fleet: str, device: str, ref: BundleRef, *, rollout: str | None, ts: float
) -> bytes:
    """The retained ``desired`` payload for one device."""
    return encode_json(
        {
            "v": SCHEMA_VERSION,
            "fleet": fleet,
            "device": device,
            "ts": round(ts, 3),
            "bundle": ref.to_json(),
            "rollout": rollout,
        }
    )


def publish_desired(
    client: FleetClient,
    fleet: str,
    devices: Iterable[str],
    ref: BundleRef,
    *,
    rollout: str | None = None,
    clock: Callable[[], float] = time.time,
) -> list[str]:
    """Publish the retained desired state to each device; returns the devices, in order.

    Raises:
        BrokerError: a publish was not acknowledged.
        ValueError: a device id cannot be a topic level.
    """
    done = []
    for device in devices:
        topic = Topics(fleet, device).desired
        client.publish(
            topic, desired_payload(fleet, device, ref, rollout=rollout, ts=clock()), retain=True
        )
        done.append(device)
    return done


def clear_desired(client: FleetClient, fleet: str, devices: Iterable[str]) -> None:
    """Remove the retained desired state (an empty retained payload).

    Raises:
        BrokerError: a publish was not acknowledged.
    """
    for device in devices:
        client.publish(Topics(fleet, device).desired, b"", retain=True)
