"""paho-mqtt's client module, imported without dnspython.

paho imports dnspython whenever it is installed, only for ``connect_srv`` (broker
discovery by DNS SRV record), which edgeship never calls. On a device where another
package brought dnspython along, that import alone kept about 11 MiB resident in every
idle agent (bench/footprint.py). dnspython is hidden while paho loads and visible again
right after: an application that imports it before or after the agent gets it as usual.
"""

from __future__ import annotations

import sys

_hidden = "dns" not in sys.modules
if _hidden:
    sys.modules["dns"] = None  # type: ignore[assignment]  # "import dns..." now fails
try:
    import paho.mqtt.client as paho
finally:
    if _hidden and sys.modules.get("dns", False) is None:
        del sys.modules["dns"]

__all__ = ["paho"]
