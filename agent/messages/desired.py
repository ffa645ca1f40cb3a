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
import re
from dataclasses import dataclass
from typing import Any

from agent.bundle.manifest import SHA256_RE
from agent.plumbing.strict import Doc, load_json

__all__ = ["DESIRED_VERSION", "BundleRef", "Desired", "parse_desired"]

DESIRED_VERSION = 1
_URL_RE = re.compile(r"https?://[!-~]+")  # printable ASCII, no spaces


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
    doc = Doc(
        load_json(payload, what="desired state", error=ValueError), "desired", error=ValueError
    )
    if doc.raw("v") != DESIRED_VERSION:
        raise doc.bad("v", str(DESIRED_VERSION))
    for key, ours in (("fleet", fleet), ("device", device)):
        theirs = doc.opt(doc.text, key, max_len=128)
        if theirs is not None and theirs != ours:
            raise ValueError(f"desired state is for {key} {theirs!r}, not {ours!r}")
    b = doc.obj("bundle")
    ref = BundleRef(
        url=b.text("url", max_len=2048, pattern=_URL_RE, what="an http:// or https:// URL"),
        sha256=b.text("sha256", max_len=64, pattern=SHA256_RE, what="64 lowercase hex digits"),
        digest=b.text("digest", max_len=64, pattern=SHA256_RE, what="64 lowercase hex digits"),
        sequence=b.integer("sequence", minimum=0),
        name=b.text("name", max_len=128),
        version=b.text("version", max_len=64),
    )
    b.done()
    rollout = doc.opt(doc.text, "rollout", max_len=256)
    ts = doc.opt(doc.number, "ts")
    doc.done()
    return Desired(ref, rollout, ts)
