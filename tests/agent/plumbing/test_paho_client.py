"""paho is imported without dnspython, which costs an idle agent ~11 MiB for a feature
(DNS SRV discovery) it never uses, and without urllib.request unless PySocks is there;
an application still gets both when it asks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _probe(code: str, env: dict[str, str] | None = None) -> str:
    """What ``code`` prints in a fresh interpreter (nothing imported before it)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return done.stdout


_PROBE = """
import sys
import agent.plumbing.mqtt
print("dns" in sys.modules, agent.plumbing.mqtt.paho.HAVE_DNS)
import dns.resolver
print(dns.resolver.Resolver is not None)
"""


def test_the_agent_loads_paho_without_dnspython_and_leaves_it_importable() -> None:
    # dnspython is in the dev extra so that this runs where paho would load it.
    out = _probe(_PROBE)
    assert out.split() == ["False", "False", "True"]


def test_an_application_that_imported_dnspython_first_keeps_it() -> None:
    probe = "import dns.resolver, agent.plumbing.mqtt as m; print(m.paho.HAVE_DNS)"
    out = _probe(probe)
    assert out.strip() == "True"


# paho imports urllib.request (with http.client and email: ~2 MiB) only to look for a
# proxy, which it does only when PySocks is installed.
_URLLIB_PROBE = """
import sys, types, urllib
import agent.plumbing.mqtt
print("urllib.request" in sys.modules, "http.client" in sys.modules, hasattr(urllib, "request"))
import urllib.request
print(type(urllib.request) is types.ModuleType, callable(urllib.request.getproxies))
"""


def test_the_agent_loads_paho_without_urllib_request_and_leaves_it_importable() -> None:
    out = _probe(_URLLIB_PROBE)
    assert out.split() == ["False", "False", "False", "True", "True"]


def test_an_application_that_imported_urllib_request_first_keeps_the_same_module() -> None:
    probe = (
        "import urllib.request as before, agent.plumbing.mqtt, urllib.request as after;"
        "print(before is after, after.getproxies is not None)"
    )
    out = _probe(probe)
    assert out.split() == ["True", "True"]


def test_with_pysocks_paho_still_reads_the_brokers_proxy_from_the_environment(
    tmp_path: Path,
) -> None:
    # PySocks as paho sees it: the module and its proxy type constants.
    (tmp_path / "socks.py").write_text("HTTP, SOCKS4, SOCKS5 = 3, 1, 2\n")
    probe = (
        "import sys, agent.plumbing.mqtt as m\n"
        "client = m.paho.Client(m.paho.CallbackAPIVersion.VERSION2)\n"
        "client._host = 'broker.example'\n"
        "print('urllib.request' in sys.modules, client._get_proxy())\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]),
        "MQTT_PROXY": "socks://proxy.example:1080",
    }
    env.pop("NO_PROXY", None)
    env.pop("no_proxy", None)
    out = _probe(probe, env)
    expected = "{'proxy_type': 2, 'proxy_addr': 'proxy.example', 'proxy_port': 1080}"
    assert out.strip() == f"True {expected}"
