"""One error hierarchy for all of edgeship.

Two roots matter to callers:

* :class:`BundleError` — the bundle itself is bad (signature, digest, rollback,
  expired, malformed). Retrying the same bytes will fail the same way.
* :class:`FetchError` — we could not get something (download, broker). Retrying
  later may succeed.

and one for the device's trust in its signers: :class:`TrustError` — a trust root or
heartbeat that does not verify, or a trust state that allows no install now (an expired
root, updates being withheld). It is neither: the bundle may be fine, and what fixes it is
a new signed root or heartbeat, not a retry of the same download.

Every message says what to do about the problem. The CLIs catch only
:class:`EdgeshipError` and print its text, never a traceback.
"""

from __future__ import annotations

__all__ = [
    "AlreadyLabelledError",
    "BadSignatureError",
    "BrokerError",
    "BundleError",
    "BundleTooLargeError",
    "CompatibilityError",
    "ConfigError",
    "DecryptionError",
    "DigestMismatchError",
    "DownloadError",
    "DownloadRefusedError",
    "DuplicateMemberError",
    "EdgeshipError",
    "ExpiredError",
    "ExtraMemberError",
    "FeedbackError",
    "FetchError",
    "HealthCheckError",
    "HeartbeatError",
    "HeldBackError",
    "InferenceError",
    "InputValidationError",
    "InvalidLabelError",
    "InvalidRequestIdError",
    "KeyFileError",
    "MalformedManifestError",
    "ManifestMismatchError",
    "MemberOrderError",
    "MissingMemberError",
    "NotATarError",
    "NotForThisDeviceError",
    "OverloadedError",
    "RollbackError",
    "RootError",
    "RootExpiredError",
    "RootVersionError",
    "RuntimeUnavailableError",
    "SchemaVersionError",
    "SizeMismatchError",
    "StateError",
    "ThresholdError",
    "TruncatedBundleError",
    "TrustError",
    "UnknownModelError",
    "UnknownRequestError",
    "UnsafeMemberError",
    "UntrustedSignerError",
    "error_code",
]


class EdgeshipError(Exception):
    """Root of every error edgeship raises on purpose."""


# --- the bundle is bad -----------------------------------------------------------


class BundleError(EdgeshipError):
    """The bundle is not acceptable. The same bytes will always be refused."""


class NotATarError(BundleError):
    """The file is not a bundle: not an uncompressed POSIX (ustar) tar."""


class TruncatedBundleError(BundleError):
    """The bundle ends before its structure says it should."""


class BundleTooLargeError(BundleError):
    """The bundle or one of its members is larger than the configured limit."""


class UnsafeMemberError(BundleError):
    """A member is not a plain regular file with a safe relative path."""


class DuplicateMemberError(BundleError):
    """Two members have the same path."""


class MemberOrderError(BundleError):
    """Members are not in the order the format fixes."""


class MissingMemberError(BundleError):
    """A member the manifest lists (or the format requires) is absent."""


class ExtraMemberError(BundleError):
    """A member is present that the manifest does not list."""


class SizeMismatchError(BundleError):
    """A member's size differs from the size the manifest declares."""


class DigestMismatchError(BundleError):
    """A member's sha256 differs from the digest the manifest declares."""


class ManifestMismatchError(BundleError):
    """manifest.json is not byte-for-byte the payload that was signed."""


class BadSignatureError(BundleError):
    """A signature from a trusted key id does not verify, or the envelope is malformed."""


class UntrustedSignerError(BundleError):
    """No signature comes from a key the trust policy lists."""


class ThresholdError(BundleError):
    """Fewer distinct trusted keys signed than the trust policy's threshold."""


class MalformedManifestError(BundleError):
    """The manifest is not valid UTF-8 JSON or does not follow the schema."""


class SchemaVersionError(MalformedManifestError):
    """The manifest uses a newer major schema version than this agent reads."""


class CompatibilityError(BundleError):
    """The bundle's compatibility section excludes this device."""


class RollbackError(BundleError):
    """The bundle's sequence is below the device's anti-rollback floor."""


class ExpiredError(BundleError):
    """The bundle's expiry time has passed (beyond the allowed clock slack)."""


class HealthCheckError(BundleError):
    """The model failed its on-device health check (golden outputs or latency)."""


class NotForThisDeviceError(BundleError):
    """The bundle is encrypted, and not for this device's key (or the agent has none)."""


class DecryptionError(BundleError):
    """An encrypted bundle's key entry or payload does not decrypt."""


# --- we could not get it ---------------------------------------------------------


class FetchError(EdgeshipError):
    """Something could not be obtained. Retrying later may succeed."""


class DownloadError(FetchError):
    """A bundle download failed (network, HTTP status, size limit, timeout)."""


class DownloadRefusedError(DownloadError):
    """The source answered, and retrying will get the same answer: an HTTP 4xx, a file
    other than the one named, one over the size cap, a refused TLS handshake, a bad URL.

    Someone has to fix the URL or the server; a rollout counts it as the device's failure
    at once (a plain :class:`DownloadError` is a network failure that may pass).
    """


class BrokerError(FetchError):
    """The MQTT broker could not be reached or refused the connection."""


# --- the device's trust in its signers ------------------------------------------------


class TrustError(EdgeshipError):
    """The device's trust root refuses: a root or heartbeat that does not verify, or a trust
    state in which nothing may be installed now.

    Not a :class:`BundleError`: the bundle may be fine, and a refused root or heartbeat
    changes nothing on the device. What fixes it is a new signed document.
    """


class RootError(TrustError):
    """A trust root document does not verify: malformed, or not signed by a threshold of
    the current root's root keys and of its own."""


class RootVersionError(RootError):
    """A trust root's version is not the next one: replayed, lowered, or versions missing."""


class RootExpiredError(TrustError):
    """The device's trust root has expired (or every bundle-signing key in it has): nothing
    new is installed until a fresh root arrives; what runs keeps serving."""


class HeartbeatError(TrustError):
    """A heartbeat does not verify: malformed, not signed by the freshness key, for another
    fleet, expired, or older than one already seen."""


class HeldBackError(TrustError):
    """Updates are being withheld: no fresh heartbeat although the root names a freshness
    key, or the desired state is older than the latest release the heartbeat names."""


# --- everything else ---------------------------------------------------------------


class ConfigError(EdgeshipError):
    """A configuration file, key file or trust policy is invalid."""


class KeyFileError(ConfigError):
    """A key file cannot be read, decrypted or used."""


class StateError(EdgeshipError):
    """The agent's persistent state is inconsistent or an operation is not allowed now."""


class RuntimeUnavailableError(EdgeshipError):
    """The inference runtime the bundle needs is not installed on this device."""


class InferenceError(EdgeshipError):
    """A prediction could not be computed."""


class InputValidationError(InferenceError):
    """The request does not match the model's input signature; it never reached the runtime."""


class OverloadedError(InferenceError):
    """The agent's request queue is full; retry later."""


class InvalidRequestIdError(InputValidationError):
    """A request id is not 1-128 printable characters; it names no request (``invalid-input``)."""


class InvalidLabelError(InputValidationError):
    """A ground-truth label does not fit the model's answer: a class index where the model
    classifies (one per row of a batch), numbers of the output's size where it returns
    values; never a bool, NaN or infinity (``invalid-input``). Send the label again, fixed."""


class FeedbackError(EdgeshipError):
    """Ground truth for a request cannot be taken as sent."""


class UnknownRequestError(FeedbackError):
    """No answer is remembered for this request id (``unknown-request``): it was never
    answered here, its answer was too large to keep, or it is older than the agent's
    memory of recent requests. Send feedback sooner, and with the id the answer was for."""


class AlreadyLabelledError(FeedbackError):
    """The request already has its label (``already-labelled``): a request counts once,
    so a second label (a retry, or a correction) is refused, not counted again."""


class UnknownModelError(InputValidationError):
    """The request names a model this agent does not serve (agent.toml ``[models]``)."""


def error_code(exc: BaseException) -> str:
    """The stable code of a failed prediction, as callers and telemetry see it.

    ``invalid-input`` (the request does not fit the model; never retry as is),
    ``overloaded`` and ``unavailable`` (retry shortly, or elsewhere), ``inference-failed``
    (the model failed on this request) and ``internal`` (not an edgeship error: a bug).
    A request naming a model the agent does not serve is ``unknown-model``.
    Feedback on an answer adds ``unknown-request`` (no answer remembered for its request
    id) and ``already-labelled`` (that request has its label). The HTTP and MQTT endpoints
    answer with it, and the telemetry counts errors by it.
    """
    if isinstance(exc, UnknownModelError):
        return "unknown-model"
    if isinstance(exc, InputValidationError):
        return "invalid-input"
    if isinstance(exc, UnknownRequestError):
        return "unknown-request"
    if isinstance(exc, AlreadyLabelledError):
        return "already-labelled"
    if isinstance(exc, OverloadedError):
        return "overloaded"
    if isinstance(exc, StateError):
        return "unavailable"
    if isinstance(exc, EdgeshipError):
        return "inference-failed"
    return "internal"
