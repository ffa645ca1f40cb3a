"""The install side's settings: the ``[fetch]`` and ``[update]`` tables of agent.toml.

The TOML reader (:mod:`agent.config`) builds these dataclasses directly, and the parts use
them as they are: one name and one unit per setting, wherever it is read. This module
imports nothing heavy, so reading a configuration costs no network or TLS imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from agent.bundle import DEFAULT_MAX_BUNDLE_BYTES
from agent.plumbing.sched import GatePriority
from agent.plumbing.tls import TlsConfig
from agent.serve.runtimes import RuntimeOptions

__all__ = ["FetchConfig", "TrustConfig", "UpdateConfig", "UpdaterConfig"]


@dataclass(frozen=True)
class FetchConfig:
    """``[fetch]``: downloading bundles (and retrying a failed download of the desired one)."""

    max_bundle_bytes: int = DEFAULT_MAX_BUNDLE_BYTES
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 30.0
    max_resumes: int = 5  # interruptions survived within one fetch
    min_free_bytes: int = 32 * 1024**2  # left free on the disk once the bundle is written
    # A failed download of the desired bundle is retried after this, doubling up to max.
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    # https:// bundle URLs: the CA to trust instead of the system's; a client certificate.
    tls: TlsConfig | None = None
    chunk_bytes: int = 256 * 1024  # not in agent.toml: tests use small chunks
    max_redirects: int = 5  # not in agent.toml


@dataclass(frozen=True)
class UpdateConfig:
    """``[update]``: the install state machine and its health gate."""

    max_attempts: int = 3  # loop budget: health-check attempts (incl. crashes) per digest
    health_runs: int = 20  # latency samples taken by the health gate
    # Where the gate runs: a child process (nothing of it shares the serving process's
    # interpreter lock, and a candidate that crashes its runtime only fails the gate) or a
    # thread of this process. A custom model loader cannot be repeated in a child
    # process, so an Updater given one always uses a thread.
    health_gate: Literal["process", "thread"] = "process"
    # CPU priority of the gate and of loading the candidate here.
    health_gate_priority: GatePriority = "idle"
    health_gate_timeout_s: float = 300.0  # a child gate that takes longer fails
    clock_slack_s: float = 300.0  # how far past its expiry a bundle is still accepted


@dataclass(frozen=True)
class TrustConfig:
    """``[trust]``: where a device that missed trust root versions fetches them."""

    # The bundle server: root N is at <server_url>root/<N>.json. None: roots arrive only
    # over MQTT, and a device that missed a version waits for an operator.
    server_url: str | None = None
    # How long after a failed fetch of the chain it is tried again (doubling up to max).
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    # After a start, how long a missing heartbeat goes unreported (the retained one is on
    # its way); installs wait for it all the same. Not in agent.toml: tests shorten it.
    startup_grace_s: float = 30.0


@dataclass(frozen=True)
class UpdaterConfig:
    """Everything an :class:`~agent.install.Updater` needs, as the tables that set it."""

    update: UpdateConfig = field(default_factory=UpdateConfig)
    fetch: FetchConfig = field(default_factory=FetchConfig)
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    # The device's X25519 private key (PEM): opens bundles encrypted for this device.
    decryption_key: Path | None = None
