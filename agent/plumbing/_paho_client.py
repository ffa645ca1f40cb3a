"""paho-mqtt's client module, imported without dnspython and without ``urllib.request``.

paho imports dnspython whenever it is installed, only for ``connect_srv`` (broker
discovery by DNS SRV record), which edgeship never calls. On a device where another
package brought dnspython along, that import alone kept about 11 MiB resident in every
idle agent (bench/footprint.py). dnspython is hidden while paho loads and visible again
right after: an application that imports it before or after the agent gets it as usual.

paho also imports ``urllib.request`` at module level (with ``http.client`` and the
``email`` package behind it: about 2 MiB resident), but reads it only to look for a proxy
for the broker, and only when PySocks is installed. While paho loads, ``urllib.request``
is a stand-in that imports the real module the moment anything reads from it. After, when
paho found no PySocks, the stand-in is taken out again and the process is as it was;
with PySocks, the real module is imported then.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
import urllib

_REQUEST = "urllib.request"


class _Deferred(types.ModuleType):
    """``urllib.request`` until something reads a name from it."""

    def __getattr__(self, name: str) -> object:
        return getattr(_real_request(self), name)


def _real_request(stand_in: types.ModuleType) -> types.ModuleType:
    if sys.modules.get(_REQUEST) is stand_in:
        del sys.modules[_REQUEST]
    return importlib.import_module(_REQUEST)  # also sets urllib.request


def _stand_in() -> types.ModuleType | None:
    """A stand-in for ``urllib.request`` in ``sys.modules``, unless it is imported."""
    if _REQUEST in sys.modules:
        return None
    module = _Deferred(_REQUEST)
    # What `import urllib.request` reads of a module it finds in sys.modules.
    module.__spec__ = importlib.util.find_spec(_REQUEST)
    sys.modules[_REQUEST] = module
    urllib.request = module  # as the import system does for a submodule
    return module


def _settle(stand_in: types.ModuleType, socks: object) -> None:
    """Take the stand-in out again; import the real module if paho can read it."""
    if sys.modules.get(_REQUEST) is stand_in:
        del sys.modules[_REQUEST]
    if vars(urllib).get("request") is stand_in:
        delattr(urllib, "request")
    if socks is not None:
        importlib.import_module(_REQUEST)


_hidden = "dns" not in sys.modules
if _hidden:
    sys.modules["dns"] = None  # type: ignore[assignment]  # "import dns..." now fails
_deferred = _stand_in()
try:
    import paho.mqtt.client as paho
finally:
    if _hidden and sys.modules.get("dns", False) is None:
        del sys.modules["dns"]
    if _deferred is not None:
        _settle(_deferred, getattr(sys.modules.get("paho.mqtt.client"), "socks", None))
    del _deferred

__all__ = ["paho"]
