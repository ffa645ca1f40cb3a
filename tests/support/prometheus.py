"""A real Prometheus (Debian's ``prometheus`` package) on a free loopback port, and its
``promtool``; missing binaries skip the test, or fail it when ``CI=true``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.broker import free_port

__all__ = ["Prometheus", "binary"]


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found (apt-get install prometheus)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


class Prometheus:
    """Prometheus scraping ``jobs`` (scrape_config dicts) every ``interval_s``, rules
    evaluated as often. Use with ``with``; :meth:`query` asks its HTTP API."""

    def __init__(
        self,
        directory: Path,
        jobs: list[dict[str, Any]],
        *,
        rule_files: tuple[Path, ...] = (),
        interval_s: float = 0.5,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = directory / "prometheus.log"
        every = f"{int(interval_s * 1000)}ms"
        config = {
            "global": {"scrape_interval": every, "evaluation_interval": every},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": jobs,
        }
        # JSON is YAML: no YAML writer needed.
        (directory / "prometheus.yml").write_text(json.dumps(config))
        self.argv = [
            binary("prometheus"),
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        self.wait(lambda: self._get("/-/ready") is not None, "ready")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _get(self, path: str) -> bytes | None:
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            return None

    def query(self, promql: str) -> list[dict[str, Any]]:
        """The instant vector ``promql`` evaluates to now (``/api/v1/query``)."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
        if body is None:
            return []
        doc = json.loads(body)
        assert doc["status"] == "success", doc
        return list(doc["data"]["result"])

    def wait(self, done: Callable[[], object], what: str, timeout_s: float = 30.0) -> None:
        """Poll until ``done()`` is truthy. Raises: AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not done():
            assert self.proc is not None
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus: not {what}: {self.log.read_text()[-2000:]}")
            time.sleep(0.1)
