"""The fleet commands of ``edgeship``: serve, publish, collect.

:func:`register` adds them to the parser that :mod:`sdk.cli` builds, with ``fleet
status|report|metrics`` from :mod:`sdk.cli._fleet_views`; ``rollout`` is in
:mod:`sdk.cli._rollout`, which shares the MQTT and device-selection options defined here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.bundle.root import load_trust
from agent.bundle.signing import TrustPolicy
from agent.cli._output import error_code
from agent.errors import ConfigError
from agent.messages.desired import DEFAULT_MODEL, MODEL_RE
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.tls import TlsConfig
from agent.plumbing.transport import Transport
from sdk.cli import _fleet_views
from sdk.cli._output import emit
from sdk.errors import StoreError
from sdk.fleet.collect import MAX_HELD, Collector
from sdk.fleet.groups import discover_devices, load_groups, parse_where, select_devices
from sdk.fleet.publish import BundleRef, bundle_ref, publish_desired
from sdk.fleet.serve import BundleServer
from sdk.fleet.store import open_store

__all__ = ["register"]

CommandFn = Callable[[str, Any, str], argparse.ArgumentParser]

_DEFAULT_BROKER = os.environ.get("EDGESHIP_BROKER", "mqtt://127.0.0.1:1883")
# How long the broker keeps a collector's session (with --client-id) while it is away.
_KEPT_SESSION_S = 3600


@contextmanager
def until_signal() -> Iterator[threading.Event]:
    """An event set by SIGINT or SIGTERM (handlers restored afterwards)."""
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals reach only the main thread (e.g. main() called from a test)
        return
    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# The name sdk.cli._trust imports.
_until_signal = until_signal


def _broker(args: argparse.Namespace) -> BrokerConfig:
    """The connection settings of ``--broker`` and the options around it.

    Raises:
        ConfigError: the URL breaks the broker URL rule, or options do not fit together.
    """
    url = BrokerUrl.parse(args.broker, setting="--broker")
    tls = None
    if args.ca_file or args.cert or args.key:
        if not url.tls:
            raise ConfigError("--ca-file, --cert and --key need an mqtts:// --broker URL")
        if args.key and not args.cert:
            raise ConfigError("--key needs --cert (the client certificate it belongs to)")
        tls = TlsConfig(ca_file=args.ca_file, cert_file=args.cert, key_file=args.key)
    if args.password_file is not None and args.username is None:
        raise ConfigError("--password-file needs --username")
    return BrokerConfig(url, tls=tls, username=args.username, password_file=args.password_file)


def _client(
    args: argparse.Namespace,
    *,
    client_id: str | None = None,
    session_expiry_s: int = 0,
    tcp_nodelay: bool = True,
) -> MqttClient:
    """A fleet-side client, not connected yet: ``with`` it (or :meth:`MqttClient.connect`).

    Raises:
        ConfigError: as :func:`_broker`, or the TLS or password file is unusable.
    """
    return MqttClient(
        _broker(args),
        client_id=client_id,
        session_expiry_s=session_expiry_s,
        tcp_nodelay=tcp_nodelay,
    )


def _mqtt_options(p: argparse.ArgumentParser, *, fleet_required: bool = True) -> None:
    p.add_argument(
        "--broker",
        default=_DEFAULT_BROKER,
        help="mqtt://host:port or mqtts://host:port"
        " (default $EDGESHIP_BROKER or mqtt://127.0.0.1:1883)",
    )
    if fleet_required:
        p.add_argument("--fleet", required=True, help="fleet id (a topic level)")
    p.add_argument("--username", help="user name at the broker (never in the URL)")
    p.add_argument(
        "--password-file", type=Path, help="file holding the broker password (needs --username)"
    )
    p.add_argument("--ca-file", type=Path, help="CA certificate of the broker (mqtts)")
    p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="client key (mutual TLS)")


def _selection_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", action="append", default=[], help="device id (repeat)")
    p.add_argument("--group", help="device group from --groups")
    p.add_argument(
        "--groups",
        type=Path,
        default=Path("edgeship-groups.toml"),
        help="TOML file with [groups] name = [devices] (default edgeship-groups.toml)",
    )
    p.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only devices whose birth attributes match (repeat)",
    )


def _select(args: argparse.Namespace, transport: Transport) -> list[str]:
    groups = load_groups(args.groups) if args.group is not None else None
    where = parse_where(args.where)
    known = discover_devices(transport, args.fleet) if where else None
    return select_devices(
        devices=args.device, group=args.group, groups=groups, where=where, known=known
    )


def _policy(args: argparse.Namespace) -> TrustPolicy | None:
    """What ``--trust`` (a root or a policy) lets devices install now, if given.

    Raises:
        ConfigError: it cannot be read.
        RootExpiredError: the root has expired (devices install nothing under it).
    """
    if args.trust is None:
        return None
    return load_trust(args.trust).bundle_policy(datetime.now(UTC), slack_s=0.0)


def _bundle(args: argparse.Namespace) -> BundleRef:
    return bundle_ref(args.bundle, args.url, policy=_policy(args), now=datetime.now(UTC))


# --- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        server = BundleServer(args.dir, args.host, args.port)
    except (OSError, NotADirectoryError) as e:
        raise ConfigError(f"cannot serve {args.dir} on {args.host}:{args.port}: {e}") from None
    if args.json:  # one line a script can read while the server runs
        print(json.dumps({"serving": str(args.dir), "url": server.url}), flush=True)
    else:
        print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)", flush=True)
    if args.host not in {"127.0.0.1", "::1", "localhost"}:
        print(f"warning: {args.dir} is reachable from the network at {server.url}", file=sys.stderr)
    with until_signal() as stop:

        def stopper() -> None:
            stop.wait()
            server.shutdown()

        threading.Thread(target=stopper, daemon=True).start()
        server.serve_forever()
    return 0


# --- publish -------------------------------------------------------------------------------


def cmd_publish(args: argparse.Namespace) -> int:
    ref = _bundle(args)
    with _client(args) as client:
        devices = _select(args, client)
        publish_desired(client, args.fleet, devices, ref, model=args.model)
    doc = {"bundle": ref.to_json(), "fleet": args.fleet, "model": args.model, "devices": devices}
    emit(
        args,
        doc,
        f"published {ref.name} {ref.version} (sequence {ref.sequence}) as model {args.model}"
        f" to {len(devices)} device(s): {', '.join(devices)}\ndigest {ref.digest}",
    )
    return 0


# --- collect -------------------------------------------------------------------------------


def _collector_client(args: argparse.Namespace) -> MqttClient:
    """The collector's client: acknowledging only what is stored, holding at most MAX_HELD.

    Raises:
        ConfigError: as :func:`_broker`, or ``--session-expiry`` without ``--client-id``.
    """
    if args.session_expiry is not None and args.client_id is None:
        raise ConfigError("--session-expiry needs --client-id: a broker session is a client id's")
    if args.connect_timeout <= 0:
        raise ConfigError("--connect-timeout must be positive")
    expiry = args.session_expiry
    if expiry is None:
        expiry = _KEPT_SESSION_S if args.client_id else 0
    return MqttClient(
        # Back within ~0.1 s of a broker restart: mosquitto 2.0.11 drops what is published
        # to a shared subscription until a member subscribes again (docs/scaling.md).
        replace(_broker(args), connect_timeout_s=args.connect_timeout, backoff_initial_s=0.1),
        client_id=args.client_id or f"edgeship-collector-{uuid.uuid4().hex[:8]}",
        session_expiry_s=expiry,
        # Mostly receiving: let the kernel coalesce the PUBACKs (see MqttClient).
        tcp_nodelay=False,
        manual_ack=True,
        max_unacked=MAX_HELD,
    )


def cmd_collect(args: argparse.Namespace) -> int:
    client = _collector_client(args)
    store = open_store(args.db)
    try:
        stop_metrics = _fleet_views.start_metrics(
            args, fleet=None if args.fleet == "+" else args.fleet
        )
    except BaseException:
        store.close()
        raise
    with until_signal() as stop:
        collector = Collector(
            client, store, fleet=args.fleet, share_group=args.group, on_fatal=lambda _: stop.set()
        )
        # Subscribe before connecting: a persistent session's queue arrives right after
        # the CONNACK, and a message with no handler yet would be acknowledged and lost.
        collector.start()
        try:
            client.connect()
            if not args.json:
                print(
                    f"collecting {args.fleet} from {client.config.url} into {args.db}"
                    f" (group {collector.share_group})",
                    flush=True,
                )
            stop.wait(args.duration)
        finally:
            collector.stop()  # stores and acknowledges what came, then disconnects
            store.close()
            if stop_metrics is not None:
                stop_metrics()
    stats = collector.stats.to_json()
    if collector.fatal is not None and args.json:
        # One document: the counts (what was stored before) and the error, as every --json.
        error = StoreError(collector.fatal)
        print(json.dumps(stats | {"error": {"code": error_code(error), "message": str(error)}}))
        return 1
    emit(args, stats, json.dumps(stats))
    if collector.fatal is not None:
        raise StoreError(collector.fatal)
    return 0


# --- registration ------------------------------------------------------------------------------


def register(command: CommandFn) -> None:
    """Add the fleet commands; ``command(name, func, help)`` makes one subcommand parser."""
    _register_serve_publish(command)
    _register_collect(command)
    _fleet_views.register(command)


def _register_serve_publish(command: CommandFn) -> None:
    p = command("serve", cmd_serve, "serve a folder of bundles over HTTP (Range support)")
    p.add_argument("dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")

    p = command("publish", cmd_publish, "set the retained desired bundle of devices")
    p.add_argument("bundle", type=Path)
    p.add_argument("--url", required=True, help="where devices download the bundle (http/https)")
    p.add_argument(
        "--trust", type=Path, help="verify the bundle against this trust root or policy first"
    )
    model_option(p)
    _mqtt_options(p)
    _selection_options(p)


def model_option(p: argparse.ArgumentParser) -> None:
    """``--model NAME``: which model of the devices (agent.toml ``[models.NAME]``)."""
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        type=_model_name,
        help="the model of the devices to set (agent.toml [models.NAME]; default: %(default)s,"
        " the only model of a single-model agent)",
    )


def _model_name(text: str) -> str:
    if not MODEL_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is no model name ({MODEL_RE.pattern})")
    return text


def _register_collect(command: CommandFn) -> None:
    p = command("collect", cmd_collect, "store fleet telemetry, events and state in a database")
    _mqtt_options(p, fleet_required=False)
    p.add_argument("--fleet", default="+", help="fleet id (default: every fleet)")
    p.add_argument("--db", default=_fleet_views.DEFAULT_DB, help="SQLite path or postgresql:// URL")
    p.add_argument(
        "--group",
        help="shared-subscription group: collectors in one group split the messages"
        " (default: named after --db, so collectors writing one database share the work"
        " and collectors writing different ones each get every message)",
    )
    p.add_argument(
        "--client-id",
        help="fixed client id, one per collector and the same across its restarts: the"
        " broker keeps its session, queueing its messages while it is away, and delivers"
        " again what it held unstored when it was killed",
    )
    p.add_argument(
        "--session-expiry",
        type=int,
        metavar="S",
        help=f"how long the broker keeps the session while the collector is away"
        f" (needs --client-id; default {_KEPT_SESSION_S} with one)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="give up when the broker does not answer within this (default 10)",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    _fleet_views.metrics_options(p, default_port=None)
