"""paho is imported without dnspython, which costs an idle agent ~11 MiB for a feature
(DNS SRV discovery) it never uses; an application still gets dnspython when it asks."""

from __future__ import annotations

import subprocess
import sys

_PROBE = """
import sys
import agent.plumbing.mqtt
print("dns" in sys.modules, agent.plumbing.mqtt.paho.HAVE_DNS)
import dns.resolver
print(dns.resolver.Resolver is not None)
"""


def test_the_agent_loads_paho_without_dnspython_and_leaves_it_importable() -> None:
    # dnspython is in the dev extra so that this runs where paho would load it.
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.split() == ["False", "False", "True"]


def test_an_application_that_imported_dnspython_first_keeps_it() -> None:
    probe = "import dns.resolver, agent.plumbing.mqtt as m; print(m.paho.HAVE_DNS)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "True"
