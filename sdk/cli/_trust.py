"""``edgeship trust init | rotate | revoke | sign | show | publish | policy`` and
``edgeship heartbeat``: the fleet's trust root, for people who keep root keys offline.

A root is drafted (``init``, ``rotate``, ``revoke`` write it unsigned unless ``--sign``
is given), signed by each key holder on their own machine (``sign``, which also merges
the copies), checked (``show``) and published (``publish``: retained on
``edgeship/v1/<fleet>/trust/root`` and as ``root/<N>.json`` in the bundle server's
folder). ``heartbeat`` signs the short-lived freshness statement with the online key,
once or every ``--every`` seconds. ``policy`` writes a bare trust policy (what ``edgeship
trust KEY.pub...`` did before roots; that spelling still works).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from agent.bundle.heartbeat import read_heartbeat
from agent.bundle.root import UNVOUCHED, TrustRoot, load_trust, parse_time, read_root
from agent.bundle.signing import PublicKey, TrustPolicy
from agent.bundle.trust import verify_bootstrap, verify_root
from agent.errors import ConfigError, KeyFileError, RootError
from agent.plumbing.files import atomic_write
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.strict import Doc
from sdk.build import load_signing_key
from sdk.cli._build import _PASSPHRASE_HELP, _passphrase
from sdk.cli._fleet import _client, _mqtt_options, _until_signal
from sdk.cli._output import emit
from sdk.fleet.publish import publish_trust
from sdk.fleet.serve import add_root, served_root
from sdk.fleet.trust import (
    RoleKeys,
    RootChange,
    change_root,
    draft,
    make_heartbeat,
    make_root,
    merge_roots,
    root_report,
    sign_root,
)

__all__ = ["VERBS", "legacy_argv", "register"]

CommandFn = Callable[[str, Any, str], argparse.ArgumentParser]
VERBS = ("init", "rotate", "revoke", "sign", "show", "publish", "policy")


def legacy_argv(argv: list[str]) -> list[str]:
    """``edgeship trust KEY.pub...`` (before roots) means ``edgeship trust policy KEY.pub...``."""
    if len(argv) > 1 and argv[0] == "trust" and argv[1] not in VERBS and argv[1][:1] != "-":
        return ["trust", "policy", *argv[1:]]
    return argv


# --- reading what people type ------------------------------------------------------------


def _public(path: Path) -> PublicKey:
    try:
        return PublicKey.from_pem(path.read_bytes())
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None


def _keyid(ref: str, known: Sequence[str]) -> str:
    """A key named by its .pub file, its key id, or a unique prefix of it."""
    if Path(ref).is_file():
        return _public(Path(ref)).keyid
    matches = [k for k in known if k.startswith(ref.lower())] if len(ref) >= 8 else []
    if len(matches) != 1:
        raise ConfigError(
            f"{ref!r} names no key of the root: give its .pub file, its key id or a unique"
            " prefix of 8 or more hex digits"
        )
    return matches[0]


def _pairs(items: Sequence[str], what: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        left, sep, right = item.partition("=")
        if not sep or not left or not right:
            raise ConfigError(f"{what} takes LEFT=RIGHT, not {item!r}")
        out.append((left, right))
    return out


def _sequences(items: Sequence[str]) -> dict[str, int]:
    try:
        return {name: int(seq) for name, seq in _pairs(items, "--min-sequence / --latest")}
    except ValueError:
        raise ConfigError("a sequence must be an integer (NAME=N)") from None


def _when(text: str) -> datetime:
    return parse_time(Doc({"t": text}, "", error=ConfigError), "t")


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _write(path: Path, data: bytes) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


def _signing_keys(args: argparse.Namespace) -> list[Any]:
    if not args.sign:
        return []
    passphrase = _passphrase(args.passphrase_env, confirm=False)
    return [load_signing_key(path, passphrase) for path in args.sign]


def _expires(args: argparse.Namespace) -> datetime:
    if args.expires_in_days <= 0:
        raise ConfigError("--expires-in-days must be positive")
    return (datetime.now(UTC) + timedelta(days=args.expires_in_days)).replace(microsecond=0)


# --- commands ------------------------------------------------------------------------------


def _finish(args: argparse.Namespace, root: TrustRoot, previous: TrustRoot | None) -> int:
    """Write the drafted root (signed by ``--sign`` keys, if any) and say what it needs."""
    data = sign_root(draft(root), _signing_keys(args))
    _write(args.out, data)
    report = root_report(data, previous)
    emit(args, {"out": str(args.out), **report}, f"wrote {args.out}\n{_report_text(report)}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    roles = RoleKeys(
        root=[_public(p) for p in args.root_key],
        bundles=[_public(p) for p in args.bundle_key],
        freshness=[_public(p) for p in args.freshness_key],
        names={_public(p).keyid: p.name.removesuffix(".pub") for p in _all_pubs(args)},
    )
    known = [k.keyid for k in (*roles.root, *roles.bundles, *roles.freshness)]
    root = make_root(
        roles,
        expires=_expires(args),
        unvouched=args.unvouched or "keep-serving",
        **_settings(args, known),
        fleet=args.fleet,
    )
    previous = None if args.previous is None else load_trust(args.previous)
    return _finish(args, root, previous)


def _all_pubs(args: argparse.Namespace) -> list[Path]:
    return [
        *getattr(args, "root_key", []),
        *getattr(args, "bundle_key", []),
        *getattr(args, "freshness_key", []),
        *getattr(args, "add_root_key", []),
        *getattr(args, "add_bundle_key", []),
        *getattr(args, "add_freshness_key", []),
    ]


def _settings(args: argparse.Namespace, known: Sequence[str]) -> dict[str, Any]:
    """What ``init`` and ``rotate`` both set, as keyword arguments (None: keep as it was)."""
    pairs = _pairs(args.key_expires, "--key-expires")
    return {
        "root_threshold": args.root_threshold,
        "bundle_threshold": args.bundle_threshold,
        "freshness_threshold": args.freshness_threshold,
        "max_validity_s": args.max_heartbeat_s,
        "scopes": {_keyid(k, known): v.split(",") for k, v in _pairs(args.scope, "--scope")},
        "key_expiry": {_keyid(k, known): _when(t) for k, t in pairs},
        "min_sequence": _sequences(args.min_sequence),
    }


def cmd_rotate(args: argparse.Namespace) -> int:
    _, current = read_root(_read(args.current), unsigned=True)
    added = {p: _public(p) for p in _all_pubs(args)}
    known = [*current.keys, *(k.keyid for k in added.values())]
    change = RootChange(
        add_root=[added[p] for p in args.add_root_key],
        add_bundles=[added[p] for p in args.add_bundle_key],
        add_freshness=[added[p] for p in args.add_freshness_key],
        remove=[_keyid(k, list(current.keys)) for k in (*args.remove, *getattr(args, "keys", []))],
        names={k.keyid: p.name.removesuffix(".pub") for p, k in added.items()},
        no_freshness=args.no_freshness,
        unvouched=args.unvouched,
        **_settings(args, known),
        fleet=args.fleet,
    )
    return _finish(args, change_root(current, change, expires=_expires(args)), current)


def cmd_sign(args: argparse.Namespace) -> int:
    data = merge_roots([_read(args.file), *(_read(p) for p in args.merge)])
    data = sign_root(data, _signing_keys(args))
    out = args.out or args.file
    _write(out, data)
    previous = None if args.previous is None else load_trust(args.previous)
    report = root_report(data, previous)
    emit(args, {"out": str(out), **report}, f"wrote {out}\n{_report_text(report)}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    data = _read(args.file)
    _, root = read_root(data, unsigned=True)
    previous = None if args.previous is None else load_trust(args.previous)
    doc = {**root.to_json(), "report": root_report(data, previous)}
    names = {k: v.name or k[:16] for k, v in root.keys.items()}
    roles = [
        f"{label}: {role.threshold} of {', '.join(names[k] for k in role.keyids)}"
        for label, role in (
            ("root", root.root),
            ("bundles", root.bundles),
            ("freshness", root.freshness),
        )
        if role is not None
    ]
    text = "\n".join(
        [
            f"trust root v{root.version}, expires {doc['expires']}, fleet {root.fleet or 'any'}",
            *roles,
            f"min_sequence: {dict(root.min_sequence) or '-'}; unvouched: {root.unvouched}",
            _report_text(doc["report"]),
        ]
    )
    emit(args, doc, text)
    return 0


def _report_text(report: dict[str, Any]) -> str:
    lines = []
    for label in ("own_root_keys", "previous_root_keys"):
        if label in report:
            r = report[label]
            who = "its own" if label == "own_root_keys" else f"v{r['version']}'s"
            lines.append(
                f"signed by {len(r['signed'])} of {who} root keys (needs {r['threshold']})"
            )
    lines.append("ready to publish" if report["ready"] else "NOT ready: more signatures needed")
    return "\n".join(lines)


def cmd_publish(args: argparse.Namespace) -> int:
    data = _read(args.file)
    root = verify_bootstrap(data)  # a threshold of its own root keys
    previous = load_trust(args.previous) if args.previous is not None else None
    if previous is None and args.dir is not None and root.version > 1:
        prior = served_root(args.dir, root.version - 1)
        previous = None if prior is None else read_root(prior)[1]
    if previous is not None:
        verify_root(data, previous, fleet=args.fleet)  # what a device holding it will do
    elif root.version > 1:
        raise RootError(
            f"cannot check v{root.version} against v{root.version - 1}: give --previous, or a"
            f" --dir that serves root/{root.version - 1}.json (devices refuse a root its"
            " predecessor did not sign)"
        )
    doc: dict[str, Any] = {"version": root.version, "fleet": args.fleet}
    if args.dir is not None:
        doc["file"] = str(add_root(args.dir, root.version, data))
    if not args.no_mqtt:
        with _client(args) as client:
            doc["topic"] = publish_trust(client, args.fleet, "root", data)
    where = [f"served as {doc['file']}"] if "file" in doc else []
    where += [f"retained on {doc['topic']}"] if "topic" in doc else []
    text = f"published trust root v{root.version} for fleet {args.fleet}: {', '.join(where)}"
    emit(args, doc, text)
    return 0


def cmd_policy(args: argparse.Namespace) -> int:
    keys = [_public(path) for path in args.public_keys]
    policy = TrustPolicy.of(keys, threshold=args.threshold)
    names = {k.keyid: p.stem for k, p in zip(keys, args.public_keys, strict=True)}
    data = policy.to_toml(names)
    if args.out:
        args.out.write_bytes(data)
    else:
        sys.stdout.write(data.decode("ascii"))
    return 0


def cmd_heartbeat(args: argparse.Namespace) -> int:
    key = load_signing_key(args.online_key, _passphrase(args.passphrase_env, confirm=False))
    root = load_trust(args.root)
    if root.freshness is None or key.keyid not in root.freshness.keyids:
        raise ConfigError(
            f"{args.online_key} is not a freshness key of trust root v{root.version}: devices would"
            " refuse its heartbeats (add it with edgeship trust rotate --add-freshness-key)"
        )
    valid_for = args.valid_for or root.freshness.max_validity_s
    if args.every is not None and not 1.0 <= args.every < valid_for:
        raise ConfigError("--every must be at least 1 s and shorter than --valid-for")
    latest = _sequences(args.latest)
    client = None if args.no_mqtt else _client(args)
    with _until_signal() as stop:
        if client is not None:
            client.connect()
        try:
            sent = 0
            while not stop.is_set():
                beat = make_heartbeat(
                    key,
                    fleet=args.fleet,
                    root_version=root.version,
                    latest=latest,
                    valid_for_s=int(valid_for),
                    now=datetime.now(UTC),
                )
                _deliver(args, beat, client)
                sent += 1
                if args.every is None or (args.count and sent >= args.count):
                    break
                stop.wait(args.every)
        finally:
            if client is not None:
                client.stop()
    return 0


def _deliver(args: argparse.Namespace, data: bytes, client: MqttClient | None) -> None:
    """One heartbeat to every place asked: files, the bundle server's folder, the broker."""
    doc: dict[str, Any] = {"fleet": args.fleet, "issued": read_heartbeat(data).to_json()["issued"]}
    files = [args.out, None if args.dir is None else args.dir / "heartbeat.json"]
    doc["files"] = [str(path) for path in files if path is not None]
    for path in files:
        if path is not None:
            _write(path, data)
    if client is not None:
        doc["topic"] = publish_trust(client, args.fleet, "heartbeat", data)
    if args.json and args.every is not None:  # one JSON document per line, as it goes
        print(json.dumps(doc, sort_keys=True), flush=True)
        return
    emit(args, doc, f"heartbeat for fleet {args.fleet}, issued {doc['issued']}")


# --- parser -------------------------------------------------------------------------------


def register(command: CommandFn) -> None:
    """Add ``trust`` (with its verbs) and ``heartbeat`` through ``command``."""
    top = command("trust", None, "the fleet's signed trust root: keys, rotation, revocation")
    verbs = top.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, func: Any, text: str) -> argparse.ArgumentParser:
        p = verbs.add_parser(name, help=text, description=text)
        p.set_defaults(func=func)
        p.add_argument("--json", action="store_true", help="print JSON for scripts")
        return p

    p = verb("init", cmd_init, "draft root v1 (signed with --sign, else unsigned)")
    p.add_argument("--root-key", type=Path, action="append", required=True, metavar="KEY.pub")
    p.add_argument("--bundle-key", type=Path, action="append", required=True, metavar="KEY.pub")
    p.add_argument("--freshness-key", type=Path, action="append", default=[], metavar="KEY.pub")
    p.add_argument(
        "--previous",
        type=Path,
        help="the trust policy devices hold now: its keys must sign root v1 too",
    )
    _root_options(p, first=True)

    p = verb("rotate", cmd_rotate, "draft root N+1 from root N: keys in and out, thresholds")
    p.add_argument("current", type=Path, help="root N")
    _change_options(p)

    p = verb("revoke", cmd_rotate, "draft root N+1 without KEY(s): they sign nothing any more")
    p.add_argument("current", type=Path, help="root N")
    p.add_argument("keys", nargs="+", metavar="KEY", help="KEY.pub, key id or unique prefix")
    _change_options(p)

    p = verb("sign", cmd_sign, "add signatures to a root file; merge signed copies")
    p.add_argument("file", type=Path)
    p.add_argument("--sign", "--key", type=Path, action="append", default=[], metavar="KEY")
    p.add_argument("--merge", type=Path, action="append", default=[], metavar="COPY.json")
    p.add_argument("--previous", type=Path, help="root N (or the policy), to report on it")
    p.add_argument("--out", type=Path, help="file to write (default: FILE itself)")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)

    p = verb("show", cmd_show, "a root file: roles, floors, who signed, whether it is ready")
    p.add_argument("file", type=Path)
    p.add_argument("--previous", type=Path, help="root N (or the policy) it must follow")

    p = verb("publish", cmd_publish, "check a root, serve it as root/N.json, publish it retained")
    p.add_argument("file", type=Path)
    p.add_argument("--previous", type=Path, help="root N (default: --dir's root/N.json)")
    p.add_argument("--dir", type=Path, help="the bundle server's folder (edgeship serve DIR)")
    p.add_argument("--no-mqtt", action="store_true", help="only write the file into --dir")
    _mqtt_options(p)

    p = verb("policy", cmd_policy, "write a bare trust policy (TOML) from public keys")
    p.add_argument("public_keys", type=Path, nargs="+", metavar="KEY.pub")
    p.add_argument("--threshold", type=int, default=1, help="signatures needed (default 1)")
    p.add_argument("--out", type=Path, help="file to write (default: stdout)")

    _register_heartbeat(command)


def _root_options(p: argparse.ArgumentParser, *, first: bool) -> None:
    """What init and rotate set; in rotate an option left out keeps root N's value."""
    keep = None if not first else 1
    p.add_argument("--root-threshold", type=int, default=keep, metavar="N")
    p.add_argument("--bundle-threshold", type=int, default=keep, metavar="N")
    p.add_argument("--freshness-threshold", type=int, default=keep, metavar="N")
    p.add_argument(
        "--max-heartbeat-s",
        type=int,
        default=3600 if first else None,
        metavar="S",
        help="the longest a heartbeat may be valid (default 3600)",
    )
    p.add_argument("--scope", action="append", default=[], metavar="KEY=NAME,PREFIX*")
    p.add_argument("--key-expires", action="append", default=[], metavar="KEY=TIME")
    p.add_argument("--min-sequence", action="append", default=[], metavar="NAME=N")
    p.add_argument("--expires-in-days", type=float, default=365.0, help="(default 365)")
    p.add_argument("--fleet", help="only devices of this fleet accept it (default: any)")
    p.add_argument(
        "--unvouched",
        choices=UNVOUCHED,
        help="what a device does with a running model no trusted key vouches for any more"
        " (default keep-serving)",
    )
    p.add_argument("--sign", type=Path, action="append", default=[], metavar="KEY")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)
    p.add_argument("--out", type=Path, required=True, help="the root file to write")


def _change_options(p: argparse.ArgumentParser) -> None:
    for role in ("root", "bundle", "freshness"):
        p.add_argument(
            f"--add-{role}-key", type=Path, action="append", default=[], metavar="KEY.pub"
        )
    p.add_argument("--remove", action="append", default=[], metavar="KEY")
    p.add_argument("--no-freshness", action="store_true", help="drop the freshness role")
    _root_options(p, first=False)


def _register_heartbeat(command: CommandFn) -> None:
    p = command("heartbeat", cmd_heartbeat, "sign and publish the fleet's heartbeat (online key)")
    p.add_argument("--online-key", type=Path, required=True, help="the online freshness key")
    p.add_argument("--root", type=Path, required=True, help="the fleet's current trust root")
    p.add_argument("--latest", action="append", default=[], metavar="NAME=SEQ")
    p.add_argument("--valid-for", type=int, metavar="S", help="default: the root's maximum")
    p.add_argument("--every", type=float, metavar="S", help="sign a fresh one every S seconds")
    p.add_argument("--count", type=int, default=0, help="with --every: stop after N (0: never)")
    p.add_argument("--out", type=Path, help="also write it to this file")
    p.add_argument("--dir", type=Path, help="also as heartbeat.json in the bundle server's folder")
    p.add_argument("--no-mqtt", action="store_true", help="do not publish it to the broker")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)
    _mqtt_options(p)
