"""``edgeship-agent run --config agent.toml``: the agent as a service.

Thin: read the configuration, set up logging, run an :class:`agent.daemon.Agent` until
SIGTERM or SIGINT; SIGHUP reloads what can be reloaded. Logs go to stderr, one JSON
object per line by default (``ts``, ``level``, ``logger``, ``event``, and the event's
fields), which journald and log shippers take as is.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.config import AgentConfig, LoggingConfig
    from agent.daemon import Agent

__all__ = ["JsonFormatter", "configure_logging", "register", "run"]

log = logging.getLogger("edgeship.agent")

# Attributes every LogRecord has; anything else came in through ``extra=``.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, ``fields``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            doc["fields"] = fields
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, separators=(",", ":"))


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict) and fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        return line


def configure_logging(config: LoggingConfig) -> None:
    """(Re)configure the root logger: one stderr handler in the configured format."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level.upper())


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` to ``edgeship-agent``."""
    p = sub.add_parser("run", help="run the agent as a service (see docs/agent.md)")
    p.add_argument("--config", type=Path, required=True, help="the agent configuration (TOML)")
    p.add_argument(
        "--check", action="store_true", help="check the configuration and exit (0: valid)"
    )
    p.add_argument("--json", action="store_true", help="--check: print the result as JSON")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from agent.config import load_config  # noqa: PLC0415 - keeps `edgeship-agent --help` light

    config = load_config(args.config)
    if args.check:
        from agent.cli._trust import check_trust_file  # noqa: PLC0415 - loads the signature library

        trust = check_trust_file(config.trust_policy)
        if args.json:
            print(json.dumps({"config": str(args.config), "valid": True, "trust": trust}))
        else:
            print(f"{args.config}: valid")
            print(trust)
        return 0
    configure_logging(config.logging)
    return run(config, args.config)


def run(config: AgentConfig, path: Path) -> int:
    """Run the agent until SIGTERM / SIGINT; SIGHUP re-reads ``path`` and reloads.

    Raises:
        EdgeshipError: the agent could not start.
    """
    from agent.daemon import Agent  # noqa: PLC0415 - keeps `edgeship-agent --help` light

    wake = threading.Event()
    signals: list[int] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        wake.set()

    previous = {
        s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    }
    agent = Agent(config)
    try:
        agent.start()
        while True:
            wake.wait(1.0)  # a timeout keeps the main thread responsive to signals
            wake.clear()
            while signals:
                signum = signals.pop(0)
                if signum == signal.SIGHUP:
                    _reload(agent, path)
                    continue
                log.info("stopping", extra={"fields": {"signal": signal.Signals(signum).name}})
                started = time.monotonic()
                drained = agent.stop()
                log.info(
                    "exiting",
                    extra={
                        "fields": {
                            "drained": drained,
                            "seconds": round(time.monotonic() - started, 3),
                        }
                    },
                )
                return 0
    finally:
        agent.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _reload(agent: Agent, path: Path) -> None:
    from agent.config import load_config  # noqa: PLC0415 - see _run

    try:
        config = load_config(path)
    except ConfigError as exc:
        log.error(  # noqa: TRY400 - the message is the whole story
            "reload refused: the configuration is invalid; the running one stays",
            extra={"fields": {"reason": str(exc)}},
        )
        return
    configure_logging(config.logging)
    try:
        restart = agent.reload(config)
    except ConfigError as exc:
        log.error(  # noqa: TRY400 - the message is the whole story
            "reload refused", extra={"fields": {"reason": str(exc)}}
        )
        return
    log.info(
        "configuration reloaded",
        extra={
            "fields": {
                "reloaded": ["trust_policy", "logging", "telemetry.interval_s"],
                "needs_restart": restart,
            }
        },
    )
