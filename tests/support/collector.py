"""``edgeship collect`` as a real subprocess, for crash and end-to-end tests.

Ready once the broker logged its shared subscription (the test broker logs subscribes);
:meth:`CollectorProcess.kill` is kill -9, :meth:`CollectorProcess.stop` is SIGTERM (the
collector stores and acknowledges what it has, prints its counts as JSON, exits).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import Broker

__all__ = ["COLLECT", "CollectorProcess", "collect_processes"]

ROOT = Path(__file__).resolve().parents[2]
COLLECT = [sys.executable, "-c", "from sdk.cli import main; raise SystemExit(main())", "collect"]


class CollectorProcess:
    """One ``edgeship collect --json`` writing its stderr to ``log``.

    Raises (constructor): RuntimeError when it exits or does not subscribe within 30 s.
    """

    def __init__(
        self, broker: Broker, db: str, log: Path, *, fleet: str = "f", options: tuple[str, ...] = ()
    ) -> None:
        self.log = log
        argv = [*COLLECT, "--broker", str(broker.url), "--fleet", fleet, "--db", db, "--json"]
        # The broker logs each subscription: "<client id> 1 $share/<group>/<filter>"; a
        # collector makes two shared ones (telemetry, events).
        marker = " 1 $share/"
        seen = broker.log().count(marker)
        with log.open("ab") as err:
            self.proc = subprocess.Popen(
                [*argv, *options], cwd=ROOT, stdout=subprocess.PIPE, stderr=err
            )
        deadline = time.monotonic() + 30
        while broker.log().count(marker) < seen + 2:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"collect did not subscribe: {self.stderr()}")
            time.sleep(0.05)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """kill -9: no clean shutdown, nothing flushed, nothing acknowledged."""
        self.proc.kill()
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def wait(self, timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
        """Its exit code and printed counts, once it exits."""
        out, _ = self.proc.communicate(timeout=timeout_s)
        return self.proc.returncode, json.loads(out) if out.strip() else {}

    def stop(self, timeout_s: float = 60.0) -> tuple[int, dict[str, Any]]:
        """SIGTERM; its exit code and printed counts."""
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout_s)


@pytest.fixture
def collect_processes() -> Iterator[Callable[..., CollectorProcess]]:
    """Start ``CollectorProcess(...)``; any still running at teardown is killed."""
    made: list[CollectorProcess] = []

    def start(*args: Any, **kwargs: Any) -> CollectorProcess:
        made.append(CollectorProcess(*args, **kwargs))
        return made[-1]

    yield start
    for c in made:
        if c.proc.poll() is None:
            c.kill()
        elif c.proc.stdout is not None:
            c.proc.stdout.close()
