"""Installed distribution versions, read from the install folders' names.

``importlib.metadata`` answers the same question but keeps about 3 MiB resident (it
brings the email, zipfile and csv packages to parse METADATA), a third of what an idle
agent may cost over the bare runtime (bench/footprint.py). Installers write one
``<name>-<version>.dist-info`` folder per distribution (binary distribution format, names
normalised with "_"), older ones ``<name>-<version>[-pyX.Y].egg-info``; the first match
along ``sys.path`` is the one Python imports, as with ``importlib.metadata``.
"""

from __future__ import annotations

import os
import re
import sys

__all__ = ["installed_version"]

_SEPARATORS = re.compile(r"[-_.]+")


def _normal(name: str) -> str:
    return _SEPARATORS.sub("_", name).lower()


def installed_version(distribution: str) -> str | None:
    """The version of ``distribution`` installed on ``sys.path``, or None."""
    wanted = _normal(distribution)
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:  # a zip, a missing folder
            continue
        for name in names:
            stem, _, suffix = name.rpartition(".")
            if suffix not in ("dist-info", "egg-info"):
                continue
            project, _, version = stem.partition("-")
            if version and _normal(project) == wanted:
                return version.split("-")[0]
    return None
