"""Device groups: named lists in a TOML file, or devices whose birth attributes match.

Groups file::

    [groups]
    canary = ["d1", "d2"]
    lab = ["d3"]

Attributes come from the retained ``status`` birth messages (``attributes`` there is what
each agent was configured with), so ``arch=aarch64`` selects the devices that said so.
"""

from __future__ import annotations

import json
import threading
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import ConfigError
from agent.messages.topics import PREFIX, check_id
from agent.plumbing.transport import Message, Transport

__all__ = ["discover_devices", "load_groups", "matches", "parse_where", "select_devices"]


def load_groups(path: Path) -> dict[str, tuple[str, ...]]:
    """The ``[groups]`` table of a TOML file.

    Raises:
        ConfigError: unreadable, not TOML, or a group is not a list of valid device ids.
    """
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read groups file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"groups file {path} is not valid TOML: {e}") from None
    table = doc.get("groups")
    if not isinstance(table, dict):
        raise ConfigError(f'groups file {path} needs a [groups] table: name = ["device", ...]')
    groups: dict[str, tuple[str, ...]] = {}
    for name, members in table.items():
        if not isinstance(members, list) or not all(isinstance(m, str) for m in members):
            raise ConfigError(f"group {name!r} in {path} must be a list of device ids")
        try:
            groups[name] = tuple(dict.fromkeys(check_id("device", m) for m in members))
        except ValueError as e:
            raise ConfigError(f"group {name!r} in {path}: {e}") from None
    return groups


def parse_where(expressions: Iterable[str]) -> dict[str, str]:
    """``["arch=aarch64", "site=lab"]`` -> ``{"arch": "aarch64", "site": "lab"}``.

    Raises:
        ConfigError: an expression without ``=``.
    """
    where = {}
    for expr in expressions:
        key, sep, value = expr.partition("=")
        if not sep or not key:
            raise ConfigError(f"--where {expr!r} must be KEY=VALUE")
        where[key.strip()] = value.strip()
    return where


def matches(attributes: Mapping[str, Any], where: Mapping[str, str]) -> bool:
    """True when every ``key=value`` holds (values compared as text)."""
    return all(k in attributes and str(attributes[k]) == v for k, v in where.items())


def discover_devices(
    transport: Transport, fleet: str, *, quiet_s: float = 0.5, max_wait_s: float = 5.0
) -> dict[str, dict[str, Any]]:
    """The retained ``status`` of every device of ``fleet`` the broker knows.

    Retained messages arrive right after subscribing; this returns once none arrived for
    ``quiet_s`` (or after ``max_wait_s``).
    """
    found: dict[str, dict[str, Any]] = {}
    last = [time.monotonic()]
    lock = threading.Lock()

    def on_status(msg: Message) -> None:
        device = msg.topic.split("/")[3]
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(doc, dict):
            with lock:
                found[device] = doc
                last[0] = time.monotonic()

    transport.subscribe(f"{PREFIX}/{fleet}/+/status", on_status)
    deadline = time.monotonic() + max_wait_s
    while time.monotonic() < deadline:
        with lock:
            if time.monotonic() - last[0] >= quiet_s:
                break
        time.sleep(0.05)
    with lock:
        return dict(found)


def select_devices(
    *,
    devices: Iterable[str] = (),
    group: str | None = None,
    groups: Mapping[str, tuple[str, ...]] | None = None,
    where: Mapping[str, str] | None = None,
    known: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """The devices named, in a group, and/or matching ``where`` — sorted, no duplicates.

    ``known`` maps device ids to their retained status (see :func:`discover_devices`);
    with ``where``, the selection is narrowed to devices whose attributes match (or,
    with nothing else given, it is every known device that matches).

    Raises:
        ConfigError: an unknown group, an invalid device id, or an empty selection.
    """
    chosen: list[str] = []
    try:
        chosen += [check_id("device", d) for d in devices]
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if group is not None:
        if groups is None or group not in groups:
            names = ", ".join(sorted(groups or {})) or "none defined"
            raise ConfigError(f"unknown device group {group!r} (groups: {names})")
        chosen += groups[group]
    if where:
        statuses = known or {}
        if not chosen:
            chosen = list(statuses)
        chosen = [
            d
            for d in chosen
            if isinstance(a := statuses.get(d, {}).get("attributes"), dict) and matches(a, where)
        ]
    result = sorted(set(chosen))
    if not result:
        raise ConfigError("no device selected: give --device, --group or a --where that matches")
    return result
