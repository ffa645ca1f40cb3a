"""The ``desired`` message: which bundle a device should run.

Retained on ``edgeship/v1/<fleet>/<device>/desired``; the fleet side writes it
(:meth:`Desired.to_payload`), the agent reads it (:func:`parse_desired`). One module holds
both so the two can never disagree (docs/mqtt.md, "desired")::

    {"v":1,"fleet":"f","device":"d1","ts":1795373687.123,"rollout":"r1"|null,
     "bundle":{"url":"https://...","sha256":"<bundle file>","digest":"<signed manifest>",
               "sequence":7,"name":"digits","version":"1.1.0"}}

An empty payload clears the desired state. The transport is untrusted: the bundle's
signature, checked by the updater, is the trust; these checks only keep nonsense out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["DESIRED_VERSION", "BundleRef", "Desired", "parse_desired"]

DESIRED_VERSION = 1
_HEX = frozenset("0123456789abcdef")


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


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


@dataclass(frozen=True)
class Desired:
    """A desired-state message: which bundle this device should run."""

    bundle: BundleRef
    rollout: str | None = None
    ts: float | None = None

    # The agent mostly asks about the bundle.
    @property
    def url(self) -> str:
        return self.bundle.url

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @property
    def digest(self) -> str:
        return self.bundle.digest

    @property
    def sequence(self) -> int:
        return self.bundle.sequence

    @property
    def version(self) -> str:
        return self.bundle.version

    def to_payload(self, *, fleet: str, device: str) -> bytes:
        """The retained payload for ``device``: compact, key-sorted JSON."""
        doc = {
            "v": DESIRED_VERSION,
            "fleet": fleet,
            "device": device,
            "ts": None if self.ts is None else round(self.ts, 3),
            "bundle": self.bundle.to_json(),
            "rollout": self.rollout,
        }
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def parse_desired(payload: bytes, *, fleet: str, device: str) -> Desired | None:
    """Parse a ``desired`` payload; None for an empty payload (desired state cleared). Pure.

    Raises:
        ValueError: not a v1 desired document for this device (the message says why).
    """
    if not payload:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"desired state is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != DESIRED_VERSION:
        raise ValueError(f"desired state must be an object with v={DESIRED_VERSION}")
    for key, ours in (("fleet", fleet), ("device", device)):
        if key in doc and doc[key] != ours:
            raise ValueError(f"desired state is for {key} {doc[key]!r}, not {ours!r}")
    bundle = doc.get("bundle")
    if not isinstance(bundle, dict):
        raise ValueError("desired state has no bundle object")  # noqa: TRY004 - one error type for any bad message
    url = bundle.get("url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("desired bundle.url must be an http:// or https:// URL")
    for key in ("sha256", "digest"):
        if not _is_digest(bundle.get(key)):
            raise ValueError(f"desired bundle.{key} must be 64 lowercase hex digits")
    sequence = bundle.get("sequence")
    if isinstance(sequence, bool) or not isinstance(sequence, int) or sequence < 0:
        raise ValueError("desired bundle.sequence must be an integer >= 0")
    name, version = bundle.get("name"), bundle.get("version")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ValueError(  # noqa: TRY004 - one error type for any bad message
            "desired bundle.name and bundle.version must be strings"
        )
    rollout = doc.get("rollout")
    if rollout is not None and not isinstance(rollout, str):
        raise ValueError("desired rollout must be a string or null")
    ts = doc.get("ts")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int | float)):
        raise ValueError("desired ts must be a number")
    ref = BundleRef(url, bundle["sha256"], bundle["digest"], sequence, name, version)
    return Desired(ref, rollout, None if ts is None else float(ts))
