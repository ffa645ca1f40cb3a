"""Fuzz the agent's config reader (agent.toml).

Invariants: ``parse_config`` returns or raises ``ConfigError``; what it accepts parses the
same way twice (no hidden state).
"""

from __future__ import annotations

from pathlib import Path

from tests.fuzz._fuzz import instrumented, run

with instrumented():
    from agent.config import parse_config
    from agent.errors import ConfigError

BASE = Path("/nonexistent/edgeship-fuzz")  # relative paths resolve here; nothing is opened


def target(data: bytes) -> None:
    try:
        config = parse_config(data, base_dir=BASE)
    except ConfigError:
        return
    assert parse_config(data, base_dir=BASE) == config


if __name__ == "__main__":
    run(target, "config")
