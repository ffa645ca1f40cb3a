"""The ``desired`` message: which bundle a device should run.

Retained on ``edgeship/v1/<fleet>/<device>/desired``; the fleet side writes it
(:meth:`Desired.to_payload`), the agent reads it (:func:`parse_desired`). One module holds
both so the two can never disagree (docs/mqtt.md, "desired")::

    {"v":1,"fleet":"f","device":"d1","ts":1795373687.123,"rollout":"r1"|null,
     "bundle":{"url":"https://...","sha256":"<bundle file>","digest":"<signed manifest>",
               "sequence":7,"name":"digits","version":"1.1.0"}}

A named model's desired state (agent.toml ``[models.NAME]``) is retained on
``edgeship/v1/<fleet>/<device>/models/<NAME>/desired`` and names its model (``"model"``);
the model called ``default`` (and a single-model agent) keeps the device-level topic.

A candidate may go through a stage before it serves everyone (never both):

* ``"shadow": {rule}``: once it passed its health gate the candidate runs on a sampled
  copy of live requests, off the request path, and the device promotes it or rejects it
  by the rule (:class:`PromotionRule`);
* ``"split": {"share": 0.1}``: the candidate serves that share of requests (sticky by
  the request key), the current version the rest, until the fleet side decides (a new
  desired state without ``split`` promotes it; one naming the current version drops it).

and, whatever the stage, ``"probation": {"min_accuracy": 0.9, "min_feedback": 20}`` adds
ground truth to its probation once it serves (:class:`ProbationRule`).

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

__all__ = [
    "DEFAULT_MODEL",
    "DESIRED_VERSION",
    "MODEL_RE",
    "BundleRef",
    "Desired",
    "ProbationRule",
    "PromotionRule",
    "Split",
    "parse_desired",
]

DESIRED_VERSION = 1
_URL_RE = re.compile(r"https?://[!-~]+")  # printable ASCII, no spaces
# A model name becomes a topic level and a directory name.
MODEL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
DEFAULT_MODEL = "default"


@dataclass(frozen=True)
class PromotionRule:
    """When a candidate running in shadow is promoted, and when it is rejected.

    It is promoted once it has answered ``min_samples`` sampled requests with an
    agreement of at least ``min_agreement`` with the serving version (top-1 agreement for
    class scores, otherwise the share of samples whose outputs all lie within the bundle's
    golden tolerance) and a median latency at most ``max_latency_ratio`` times the serving
    version's on the same requests; with ``min_accuracy``, it also needs that accuracy on
    at least ``min_feedback`` requests whose ground truth came back (feedback). It is
    rejected as soon as the agreement can no longer reach ``min_agreement`` over
    ``min_samples``, or when ``max_seconds`` (0: no limit) pass without a decision.
    ``sample_rate`` is the share of live requests copied to it.
    """

    min_samples: int = 200
    min_agreement: float = 0.99
    max_latency_ratio: float = 1.5
    sample_rate: float = 0.1
    max_seconds: float = 0.0
    min_accuracy: float | None = None
    min_feedback: int = 20

    def __post_init__(self) -> None:
        if self.min_samples < 1:
            raise ValueError(f"min_samples must be >= 1, not {self.min_samples}")
        for name in ("min_agreement", "min_accuracy"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {value}")
        if not self.max_latency_ratio > 0:
            raise ValueError(f"max_latency_ratio must be positive, not {self.max_latency_ratio}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], not {self.sample_rate}")
        if self.max_seconds < 0 or self.min_feedback < 0:
            raise ValueError("max_seconds and min_feedback must be >= 0")

    def to_json(self) -> dict[str, Any]:
        return {
            "min_samples": self.min_samples,
            "min_agreement": self.min_agreement,
            "max_latency_ratio": self.max_latency_ratio,
            "sample_rate": self.sample_rate,
            "max_seconds": self.max_seconds,
            "min_accuracy": self.min_accuracy,
            "min_feedback": self.min_feedback,
        }

    @classmethod
    def read(cls, d: Doc) -> PromotionRule:
        """Raises: ValueError (or ``d``'s error): a field missing its rule."""
        base = cls()
        try:
            rule = cls(
                min_samples=d.integer("min_samples", base.min_samples, minimum=1, maximum=10**7),
                min_agreement=d.number("min_agreement", base.min_agreement, minimum=0.0),
                max_latency_ratio=d.number(
                    "max_latency_ratio", base.max_latency_ratio, positive=True
                ),
                sample_rate=d.number("sample_rate", base.sample_rate, positive=True),
                max_seconds=d.number("max_seconds", base.max_seconds, minimum=0.0),
                min_accuracy=d.opt(d.number, "min_accuracy", minimum=0.0),
                min_feedback=d.integer("min_feedback", base.min_feedback, minimum=0, maximum=10**7),
            )
        except ValueError as exc:
            raise d.error(f"{d.where}: {exc}") from None
        d.done()
        return rule


@dataclass(frozen=True)
class ProbationRule:
    """Ground truth as a probation criterion: once the candidate serves, in probation, it is
    rolled back as soon as at least ``min_feedback`` of its answers were labelled
    (feedback) and fewer than ``min_accuracy`` of them were right. Without enough labels
    by the end of the manifest's probation window, the window decides as usual."""

    min_accuracy: float
    min_feedback: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_accuracy <= 1.0 or self.min_feedback < 1:
            raise ValueError("probation: min_accuracy in [0, 1] and min_feedback >= 1")

    def to_json(self) -> dict[str, Any]:
        return {"min_accuracy": self.min_accuracy, "min_feedback": self.min_feedback}

    @classmethod
    def read(cls, d: Doc) -> ProbationRule:
        """Raises: ValueError (or ``d``'s error): a field missing its rule."""
        accuracy = d.number("min_accuracy", minimum=0.0)
        feedback = d.integer("min_feedback", 20, minimum=1, maximum=10**7)
        d.done()
        try:
            return cls(accuracy, feedback)
        except ValueError as exc:
            raise d.error(f"{d.where}: {exc}") from None


@dataclass(frozen=True)
class Split:
    """An A/B split: ``share`` of requests (sticky by request key) go to the candidate."""

    share: float

    def __post_init__(self) -> None:
        if not 0.0 < self.share < 1.0:
            raise ValueError(f"split share must be strictly between 0 and 1, not {self.share}")

    def to_json(self) -> dict[str, Any]:
        return {"share": self.share}


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
    model: str = DEFAULT_MODEL
    shadow: PromotionRule | None = None
    split: Split | None = None
    probation: ProbationRule | None = None

    def __post_init__(self) -> None:
        if not MODEL_RE.fullmatch(self.model):
            raise ValueError(f"model name {self.model!r} must match {MODEL_RE.pattern}")
        if self.shadow is not None and self.split is not None:
            raise ValueError("a desired state has a shadow stage or an A/B split, not both")

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
        if self.model != DEFAULT_MODEL:
            doc["model"] = self.model
        if self.shadow is not None:
            doc["shadow"] = self.shadow.to_json()
        if self.split is not None:
            doc["split"] = self.split.to_json()
        if self.probation is not None:
            doc["probation"] = self.probation.to_json()
        return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def parse_desired(
    payload: bytes, *, fleet: str, device: str, model: str = DEFAULT_MODEL
) -> Desired | None:
    """Parse a ``desired`` payload for ``model``; None for an empty payload (desired state
    cleared). Pure.

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
    theirs = doc.text("model", DEFAULT_MODEL, max_len=64)
    if theirs != model:
        raise ValueError(f"desired state is for model {theirs!r}, not {model!r}")
    shadow = None if not doc.has("shadow") else PromotionRule.read(doc.obj("shadow"))
    split = None
    if doc.has("split"):
        s = doc.obj("split")
        share = s.number("share", positive=True)
        s.done()
        try:
            split = Split(share)
        except ValueError as exc:
            raise ValueError(f"desired state: {exc}") from None
    probation = None if not doc.has("probation") else ProbationRule.read(doc.obj("probation"))
    doc.seen.update(("shadow", "split", "probation"))
    doc.done()
    try:
        return Desired(
            ref, rollout, ts, model=model, shadow=shadow, split=split, probation=probation
        )
    except ValueError as exc:
        raise ValueError(f"desired state: {exc}") from None
