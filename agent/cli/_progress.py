"""Download progress for ``edgeship-agent install`` on a terminal.

The fetcher writes the bundle into its partial file (``agent.install._store.partial_path``)
as it arrives; :class:`ProgressFetcher` wraps any :class:`~agent.install._fetch.Fetcher`
and, from a thread, shows that file's size and the rate on one rewritten stderr line. It
reads nothing the fetcher keeps to itself, and it changes nothing: a script (``--json``,
or output piped) never gets it.
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from agent.install._store import partial_path

if TYPE_CHECKING:
    from agent.install._config import FetchConfig
    from agent.install._fetch import Fetcher

__all__ = ["ProgressFetcher", "wants_progress"]

_MIB = 1024 * 1024


def wants_progress(as_json: bool) -> bool:
    """Progress only for a person at a terminal: not with ``--json``, not when piped."""
    return not as_json and sys.stderr.isatty() and sys.stdout.isatty()


class ProgressFetcher:
    """``inner``, with its progress on ``out`` every ``interval_s``."""

    def __init__(self, inner: Fetcher, out: TextIO, *, interval_s: float = 0.25) -> None:
        self.inner = inner
        self.out = out
        self.interval_s = interval_s

    def fetch(self, source: str, dest: Path, *, sha256: str | None, config: FetchConfig) -> str:
        """As ``inner.fetch``. Raises: DownloadError, as :meth:`Fetcher.fetch`."""
        stop = threading.Event()
        started = time.monotonic()
        partial = partial_path(dest)
        watcher = threading.Thread(
            target=self._watch, args=(partial, dest, started, stop), name="progress", daemon=True
        )
        watcher.start()
        try:
            digest = self.inner.fetch(source, dest, sha256=sha256, config=config)
        finally:
            stop.set()
            watcher.join()
            self.out.write("\n")
        return digest

    def _watch(self, partial: Path, dest: Path, started: float, stop: threading.Event) -> None:
        while not stop.wait(self.interval_s):
            self._line(partial, started, "downloading")
        self._line(dest if dest.exists() else partial, started, "downloaded")

    def _line(self, path: Path, started: float, verb: str) -> None:
        try:
            size = path.stat().st_size
        except OSError:  # not created yet, or failed and removed
            size = 0
        elapsed = max(time.monotonic() - started, 1e-6)
        self.out.write(
            f"\r{verb} {size / _MIB:.1f} MiB in {elapsed:.1f} s ({size / _MIB / elapsed:.1f} MiB/s)"
        )
        self.out.flush()
