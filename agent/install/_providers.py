"""Which execution provider (or delegate) each stored version passed the health gate on.

The gate tries the device's providers in order and the first one that passes serves
(:meth:`agent.install._loading.ModelLoading.gate`). A version loaded again later without
a gate (on start, on rollback) must load on that same provider, never on one the gate
did not pass: this record, ``providers.json`` in the state directory, remembers it
across restarts. It is advisory: a missing or unreadable record only means the version
is gated again before it serves.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.plumbing.files import atomic_write

__all__ = ["Passed", "ProviderRecord"]

_log = logging.getLogger("edgeship.agent")
# Versions remembered: the store holds at most current, previous and a candidate; a few
# more cost nothing and cover versions a rollback may bring back.
_KEEP = 8


@dataclass(frozen=True)
class Passed:
    """The runtime and provider a version passed the gate on."""

    runtime: str
    provider: str

    def to_json(self) -> dict[str, Any]:
        return {"runtime": self.runtime, "provider": self.provider}


class ProviderRecord:
    """Digest -> :class:`Passed`, in memory and (with a path) in a JSON file."""

    def __init__(self, path: Path | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._passed: dict[str, Passed] | None = None

    def get(self, digest: str | None) -> Passed | None:
        """What ``digest`` passed the gate on, if known."""
        if digest is None:
            return None
        with self._lock:
            return self._load().get(digest)

    def put(self, digest: str | None, passed: Passed) -> None:
        """Record that ``digest`` passed on ``passed`` (the latest versions only).

        A record that cannot be written is logged and kept in memory: the version then
        only goes through the gate again after a restart.
        """
        if digest is None:
            return
        with self._lock:
            record = self._load()
            record.pop(digest, None)
            record[digest] = passed  # last: the oldest entries go first
            for gone in list(record)[:-_KEEP]:
                del record[gone]
            if self._path is None:
                return
            doc = {d: p.to_json() for d, p in record.items()}
            try:
                atomic_write(self._path, json.dumps(doc, indent=1).encode())
            except OSError as exc:
                _log.warning("cannot record the provider that passed the gate: %s", exc)

    def _load(self) -> dict[str, Passed]:
        if self._passed is not None:
            return self._passed
        self._passed = {}
        if self._path is None:
            return self._passed
        try:
            doc = json.loads(self._path.read_bytes())
            self._passed = {
                str(d): Passed(str(p["runtime"]), str(p["provider"])) for d, p in doc.items()
            }
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            _log.warning("ignoring the unreadable provider record %s: %s", self._path, exc)
        return self._passed
