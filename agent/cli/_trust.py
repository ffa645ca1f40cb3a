"""``edgeship-agent trust show | update``: the device's trust root, seen and moved by hand.

``show`` says which root is in force on this device (its bootstrap file, or a newer one
that arrived over the air and was persisted) and checks the signatures on it. ``update``
applies root files given on the command line, in version order, each verified against the
one before (a device without a broker or bundle server: roots carried by hand).
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError, RootError

if TYPE_CHECKING:
    from agent.bundle.root import Role, TrustRoot

__all__ = ["check_trust_file", "register"]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``trust`` to ``edgeship-agent``."""
    p = sub.add_parser("trust", help="show this device's trust root, or apply newer roots")
    verbs = p.add_subparsers(dest="verb", required=True, metavar="show|update")
    for name, func, text in (
        ("show", _show, "the root in force here: version, expiry, keys per role, floors"),
        ("update", _update, "apply newer root files (each verified against the one before)"),
    ):
        v = verbs.add_parser(name, help=text, description=text)
        v.add_argument("--state-dir", type=Path, required=True, help="the agent's state directory")
        v.add_argument(
            "--trust", type=Path, required=True, help="the bootstrap trust file (agent.toml)"
        )
        v.add_argument("--json", action="store_true", help="print JSON")
        v.set_defaults(func=func)
        if name == "update":
            v.add_argument("roots", type=Path, nargs="+", metavar="ROOT.json")


def check_trust_file(path: Path) -> str:
    """What ``run --check`` says about the trust file; a root must be signed by a threshold
    of its own root keys.

    Raises:
        ConfigError: unreadable, malformed, or a root its own keys did not sign.
    """
    from agent.bundle.root import load_trust  # noqa: PLC0415 - when run

    root = load_trust(path)
    if root.version == 0:
        return f"{path}: a trust policy (root v0: {len(root.keys)} key(s))"
    problem = _signature_problem(root.envelope)
    if problem is not None:
        raise ConfigError(f"{path}: {problem}")
    return f"{path}: trust root v{root.version}, signed by its root keys"


def _signature_problem(envelope: bytes) -> str | None:
    """Why a root is not signed by a threshold of its own root keys; None if it is."""
    from agent.bundle.trust import verify_bootstrap  # noqa: PLC0415 - when run

    try:
        verify_bootstrap(envelope)
    except RootError as exc:
        return str(exc)
    return None


def _describe(root: TrustRoot, source: str) -> dict[str, Any]:
    from agent.bundle.manifest import format_time  # noqa: PLC0415 - when run

    def role(r: Role) -> dict[str, Any]:
        names = [root.keys[k].name or k[:16] for k in r.keyids]
        return {"keys": names, "keyids": list(r.keyids), "threshold": r.threshold}

    fresh = root.freshness
    return {
        "source": source,
        "version": root.version,
        "expires": None if root.expires is None else format_time(root.expires),
        "expired": root.expires is not None and datetime.now(timezone.utc) > root.expires,
        "fleet": root.fleet,
        "root": role(root.root),
        "bundles": {**role(root.bundles), "scopes": {k: list(v) for k, v in root.scopes.items()}},
        "freshness": None
        if fresh is None
        else {**role(fresh), "max_validity_s": fresh.max_validity_s},
        "min_sequence": dict(root.min_sequence),
        "unvouched": root.unvouched,
    }


def _print(doc: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    for key in ("source", "version", "expires", "fleet", "min_sequence", "unvouched"):
        print(f"{key:<13} {doc[key]}")
    for role in ("root", "bundles", "freshness"):
        r = doc[role]
        text = "-" if r is None else f"{r['threshold']} of {', '.join(r['keys'])}"
        print(f"{role:<13} {text}")


def _show(args: argparse.Namespace) -> int:
    from agent.install._trust import TrustKeeper  # noqa: PLC0415 - when run

    keeper = TrustKeeper(args.state_dir, args.trust, follow=False)
    root = keeper.root
    source = "bootstrap file" if keeper.files.root() is None else "persisted (arrived later)"
    doc = _describe(root, source if root.version else f"{args.trust} (a trust policy)")
    if root.version:
        doc["signatures"] = _signature_problem(root.envelope) or "ok"
    _print(doc, args.json)
    return 0


def _update(args: argparse.Namespace) -> int:
    from agent.bundle.root import read_root  # noqa: PLC0415 - when run
    from agent.install._trust import TrustKeeper  # noqa: PLC0415

    keeper = TrustKeeper(args.state_dir, args.trust, follow=False)
    try:
        chain = sorted((read_root(p.read_bytes())[1].version, p) for p in args.roots)
    except OSError as exc:
        raise ConfigError(f"cannot read a root file: {exc}") from None
    before = keeper.root.version
    for version, path in chain:
        if version > keeper.root.version:
            keeper.apply_root(path.read_bytes())
    doc = _describe(keeper.root, "persisted")
    doc["previous_version"] = before
    _print(doc, args.json)
    return 0
