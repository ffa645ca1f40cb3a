"""Where the device keeps its trust: ``state_dir/trust/``.

::

    trust/root.json       the newest verified root (its envelope as received), atomic
    trust/heartbeat.json  the last verified heartbeat: a replay stays refused after a restart
    trust/.fetch-<N>      root N while it is fetched from the bundle server (then removed)

Nothing here is verified on reading: the files hold what :mod:`agent.install._trust`
verified before writing them, and the state directory is the device's own
(docs/threat-model.md). A damaged file reads as absent: the device falls back to its
bootstrap root and catches up again over the air.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from agent.bundle.root import TrustRoot, read_root
from agent.errors import DownloadError, HeartbeatError, RootError, StateError
from agent.install._config import FetchConfig
from agent.plumbing.files import atomic_write

if TYPE_CHECKING:
    from agent.bundle.heartbeat import Heartbeat
    from agent.install._fetch import Fetcher

__all__ = ["TrustFiles", "persisted_root"]

log = logging.getLogger("edgeship.agent")


class TrustFiles:
    """The trust files of one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "trust"

    def root(self) -> TrustRoot | None:
        """The persisted root; None when there is none or it is unreadable."""
        try:
            return read_root((self.dir / "root.json").read_bytes())[1]
        except FileNotFoundError:
            return None
        except (OSError, RootError) as exc:
            log.warning("ignoring the persisted trust root: %s", exc)
            return None

    def save_root(self, root: TrustRoot) -> None:
        """Replace the persisted root atomically.

        Raises:
            StateError: it cannot be written (the old file stays).
        """
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / "root.json", root.envelope)
        except OSError as exc:
            raise StateError(f"cannot persist trust root v{root.version}: {exc}") from None

    def heartbeat(self) -> Heartbeat | None:
        """The persisted heartbeat; None when there is none or it is unreadable."""
        try:
            data = (self.dir / "heartbeat.json").read_bytes()
        except OSError:
            return None  # the usual case: no freshness key; the reader is not even loaded
        from agent.bundle.heartbeat import read_heartbeat  # noqa: PLC0415

        with contextlib.suppress(HeartbeatError):
            return read_heartbeat(data)
        return None

    def save_heartbeat(self, data: bytes) -> None:
        """Persist a verified heartbeat; a failure only costs replay protection across a
        restart, so it is logged, not raised."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / "heartbeat.json", data)
        except OSError as exc:
            log.warning("cannot persist the heartbeat: %s", exc)

    def forget_heartbeat(self) -> None:
        with contextlib.suppress(OSError):
            (self.dir / "heartbeat.json").unlink(missing_ok=True)

    def fetch(self, fetcher: Fetcher, url: str, version: int, config: FetchConfig) -> bytes:
        """Root ``version`` from ``url``, through a file in the trust directory.

        Raises:
            DownloadError: the download failed or its file cannot be read.
        """
        dest = self.dir / f".fetch-{version}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fetcher.fetch(url, dest, sha256=None, config=config)
            return dest.read_bytes()
        except OSError as exc:
            raise DownloadError(f"cannot fetch {url}: {exc}") from None
        finally:
            dest.unlink(missing_ok=True)


def persisted_root(state_dir: Path) -> TrustRoot | None:
    """The root a device persisted in ``state_dir`` (None: none, or unreadable)."""
    return TrustFiles(state_dir).root()
