"""Public faces that import nothing until a name is used (PEP 562).

Each subpackage of ``agent`` names its public API in its ``__init__``; importing the
package must stay cheap, because the agent imports only what its configuration uses (no
broker: no MQTT client or TLS; nothing to install: no HTTP client, no signature
library) and the health gate's child process must lower its CPU priority before numpy
or a runtime is imported. A package's ``__init__`` therefore maps each public name to
the private module that defines it and lets :func:`exports` import that module on first
use; type checkers see the same names through ``if TYPE_CHECKING:`` imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping

__all__ = ["exports"]


def exports(package: str, names: Mapping[str, str]) -> Callable[[str], object]:
    """A module ``__getattr__`` that resolves ``names`` (public name -> module) lazily.

    Raises (from the returned function):
        AttributeError: ``name`` is not a public name of ``package``.
    """

    def resolve(name: str) -> object:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    return resolve
