"""``fleet_status``: each device's trust root as its reported state says, flagged when behind.

The state messages go through the collector's parser into a real SQLite store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdk.fleet.collect import parse_message
from sdk.fleet.status import fleet_status
from sdk.fleet.store import open_store


def _state(device: str, trust: Any) -> bytes:
    doc = {"v": 1, "fleet": "f", "device": device, "ts": 5.0, "current": None, "trust": trust}
    return json.dumps(doc).encode()


def test_devices_holding_an_older_root_are_flagged_behind(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "fleet.sqlite"))
    try:
        held = "no heartbeat signed by the freshness key of trust root v2 has arrived"
        revoked = "no signature on it comes from a key trust root v3 trusts"
        states = {
            "d1": {"root_version": 3, "held_back": None},
            "d2": {"root_version": 2, "held_back": held},
            "d3": None,  # an agent from before trust roots
            "d4": {"root_version": True, "held_back": 7},  # not what an agent writes
            "d5": {"root_version": 3, "held_back": None, "unvouched": revoked},
        }
        records = [
            parse_message(f"edgeship/v1/f/{d}/state", _state(d, t)) for d, t in states.items()
        ]
        store.write([r for r in records if r is not None], received_at=6.0)
        rows = {r.device: r for r in fleet_status(store, now=7.0)}
        seen = {
            d: (r.root_version, r.root_behind, r.held_back, r.unvouched) for d, r in rows.items()
        }
        assert seen == {
            "d1": (3, False, None, None),
            "d2": (2, True, held, None),
            "d3": (None, None, None, None),
            "d4": (None, None, None, None),
            "d5": (3, False, None, revoked),
        }
        # The operator names the latest root: everyone below it is behind.
        rows = {r.device: r for r in fleet_status(store, now=7.0, latest_root=4)}
        assert (rows["d1"].root_behind, rows["d2"].root_behind) == (True, True)
    finally:
        store.close()
