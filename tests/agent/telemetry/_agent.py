"""A tiny agent for the crash test: `python -m tests.agent.telemetry._agent STATE PORT MODE N`.

MODE "queue": connect to a broker that is down, store N events and one telemetry
message, print "queued", then idle until killed. MODE "drain": connect, wait until the
outbox is empty, print the next seq, exit.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.messages.status import device_presence
from agent.messages.topics import Topics
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.telemetry import Outbox, Reporter, TelemetryConfig


def main() -> None:
    state, port, mode, count = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    config = BrokerConfig(
        BrokerUrl("127.0.0.1", port, tls=False),
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
        connect_timeout_s=2,
    )
    transport = MqttClient(config, presence=device_presence(Topics("f", "d1")))
    outbox = Outbox(state / "outbox.db")
    reporter = Reporter(
        Topics("f", "d1"), outbox, transport, config=TelemetryConfig(interval_s=3600)
    )
    transport.start()
    reporter.start()
    if mode == "queue":
        for i in range(count):
            reporter.emit_event("download", i=i)
        reporter.report_now()
        print("queued", flush=True)
        while True:
            time.sleep(1)
    ok = reporter.flush(20)
    print(outbox.append("t", "event", {"probe": True}) if ok else "timeout", flush=True)
    reporter.stop()
    transport.stop()


if __name__ == "__main__":
    main()
