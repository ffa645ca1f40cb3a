"""Checks before a rollout publishes anything (and before ``resume`` publishes more).

1. The URL serves exactly the bundle: it is downloaded with the agent's own downloader
   (:class:`~agent.install._fetch.UrlFetcher`, capped at the bundle's size) and its
   sha256 compared with the bundle's.
2. The bundle verifies against the trust policy the devices hold. A new rollout verifies
   the local file (:func:`sdk.fleet.publish.bundle_ref`), which (1) shows the URL serves;
   ``resume`` has no local file and verifies what the URL serves.
3. Its sequence is above what each target device reports running (its retained
   ``state``: the highest of ``current.sequence`` and ``floor``), else the device would
   refuse it. A device that runs this very bundle already is fine; one that reports no
   state is *unknown*, and fails the check unless the operator allows unknown devices.

Every problem is collected, then one :class:`~sdk.errors.PreflightError` lists them all.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from agent.bundle import verify_bundle
from agent.bundle.signing import TrustPolicy
from agent.errors import BundleError, DownloadError
from agent.install import FetchConfig
from agent.install._fetch import Fetcher
from sdk.errors import PreflightError
from sdk.fleet._reported import ReportedState
from sdk.fleet.publish import BundleRef

__all__ = ["check_sequences", "check_url", "preflight"]

Problems = list[tuple[str, str]]


def check_url(
    ref: BundleRef,
    fetcher: Fetcher,
    *,
    max_bytes: int,
    policy: TrustPolicy | None,
    now: datetime,
) -> Problems:
    """Problems with what ``ref.url`` serves: not the bundle's bytes, or (with ``policy``)
    not a bundle that verifies as ``ref.digest``."""
    config = FetchConfig(max_bundle_bytes=max_bytes, min_free_bytes=0, max_resumes=2)
    with tempfile.TemporaryDirectory(prefix="edgeship-preflight-") as tmp:
        dest = Path(tmp) / "bundle"
        try:
            fetcher.fetch(ref.url, dest, sha256=ref.sha256, config=config)
        except DownloadError as e:
            return [("url", f"it does not serve this bundle: {e}")]
        if policy is None:
            return []
        try:
            with dest.open("rb") as f:
                digest = verify_bundle(f, policy, now=now).digest
        except BundleError as e:
            return [("trust", f"the bundle at {ref.url} does not verify: {e}")]
    if digest != ref.digest:
        return [("trust", f"the bundle at {ref.url} is {digest}, not the rollout's {ref.digest}")]
    return []


def check_sequences(
    ref: BundleRef,
    devices: Sequence[str],
    state_of: Callable[[str], ReportedState | None],
    *,
    allow_unknown: bool,
) -> tuple[Problems, list[str]]:
    """Devices that would refuse ``ref`` for its sequence, and those that report nothing."""
    problems: Problems = []
    unknown = []
    for device in devices:
        state = state_of(device)
        if state is None:
            unknown.append(device)
            if not allow_unknown:
                problems.append(
                    (device, "reports no state, so its sequence is unknown"
                     " (--allow-unknown-devices to roll out to it anyway)")
                )  # fmt: skip
            continue
        running = state.running_sequence
        if state.current_digest != ref.digest and running is not None and running >= ref.sequence:
            problems.append(
                (device, f"runs sequence {running}; the bundle's {ref.sequence} must be higher"
                 " or the device refuses it (build it with a higher --sequence)")
            )  # fmt: skip
    return problems, unknown


def preflight(
    ref: BundleRef,
    devices: Sequence[str],
    state_of: Callable[[str], ReportedState | None],
    fetcher: Fetcher,
    *,
    max_bytes: int,
    policy: TrustPolicy | None,
    allow_unknown: bool,
    now: datetime | None = None,
) -> list[str]:
    """Run every check; returns what was checked, one line each, for the operator.

    Raises:
        PreflightError: a check failed (``problems`` names each URL, trust or device
            problem); nothing should be published.
    """
    problems = check_url(
        ref, fetcher, max_bytes=max_bytes, policy=policy, now=now or datetime.now(UTC)
    )
    device_problems, unknown = check_sequences(ref, devices, state_of, allow_unknown=allow_unknown)
    problems += device_problems
    if problems:
        lines = "\n".join(f"  {subject}: {why}" for subject, why in problems)
        raise PreflightError(f"preflight failed, nothing was published:\n{lines}", problems)
    done = [f"{ref.url} serves the bundle (sha256 {ref.sha256[:12]})"]
    if policy is not None:
        done.append(f"it verifies against the trust policy as {ref.digest[:12]}")
    known = len(devices) - len(unknown)
    done.append(f"{known} device(s) run a sequence below {ref.sequence}, this bundle, or none")
    if unknown:
        done.append(f"{len(unknown)} device(s) report no state: {', '.join(unknown[:10])}")
    return done
