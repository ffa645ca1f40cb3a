"""The fleet commands of ``edgeship``: serve, publish, collect, fleet status|report, rollout.

:func:`register` adds them to the parser that :mod:`sdk.cli` builds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.table import Table

from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, StateError
from agent.messages.topics import check_id
from agent.plumbing.broker import BrokerConfig, BrokerUrl
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.tls import TlsConfig
from agent.plumbing.transport import Transport
from sdk.cli._output import emit
from sdk.fleet._rollout_run import RolloutFiles, revert, run_rollout
from sdk.fleet.collect import Collector
from sdk.fleet.groups import discover_devices, load_groups, parse_where, select_devices
from sdk.fleet.publish import bundle_ref, publish_desired
from sdk.fleet.report import render_report
from sdk.fleet.rollout import Decision, Rollout, RolloutPlan, parse_waves, wave_order
from sdk.fleet.serve import BundleServer
from sdk.fleet.status import fleet_status
from sdk.fleet.store import open_store

__all__ = ["register"]

CommandFn = Callable[[str, Any, str], argparse.ArgumentParser]

_DEFAULT_BROKER = os.environ.get("EDGESHIP_BROKER", "mqtt://127.0.0.1:1883")
_DEFAULT_DB = "edgeship-fleet.sqlite"
_DEFAULT_ROLLOUTS = Path(".edgeship/rollouts")


@contextmanager
def _until_signal() -> Iterator[threading.Event]:
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


def _bundle(args: argparse.Namespace) -> Any:
    policy = None
    if args.trust is not None:
        try:
            policy = TrustPolicy.from_toml(args.trust.read_bytes())
        except OSError as e:
            raise ConfigError(f"cannot read trust policy {args.trust}: {e.strerror}") from None
    return bundle_ref(args.bundle, args.url, policy=policy, now=datetime.now(UTC))


# --- serve ---------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        server = BundleServer(args.dir, args.host, args.port)
    except (OSError, NotADirectoryError) as e:
        raise ConfigError(f"cannot serve {args.dir} on {args.host}:{args.port}: {e}") from None
    print(f"serving {args.dir} at {server.url} (Ctrl-C to stop)", flush=True)
    if args.host not in {"127.0.0.1", "::1", "localhost"}:
        print(f"warning: {args.dir} is reachable from the network at {server.url}", file=sys.stderr)
    with _until_signal() as stop:

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
        publish_desired(client, args.fleet, devices, ref)
    doc = {"bundle": ref.to_json(), "fleet": args.fleet, "devices": devices}
    emit(
        args,
        doc,
        f"published {ref.name} {ref.version} (sequence {ref.sequence}) to"
        f" {len(devices)} device(s): {', '.join(devices)}\ndigest {ref.digest}",
    )
    return 0


# --- collect -------------------------------------------------------------------------------


def cmd_collect(args: argparse.Namespace) -> int:
    client_id = args.client_id or f"edgeship-collector-{uuid.uuid4().hex[:8]}"
    # Mostly receiving: let the kernel coalesce the PUBACKs (see MqttClient).
    client = _client(
        args, client_id=client_id, session_expiry_s=args.session_expiry, tcp_nodelay=False
    )
    store = open_store(args.db)
    collector = Collector(client, store, fleet=args.fleet, share_group=args.group)
    # Subscribe before connecting: a persistent session's queue arrives right after the
    # CONNACK, and a message with no handler yet would be acknowledged and lost.
    collector.start()
    try:
        client.connect()
        if not args.json:
            print(f"collecting {args.fleet} from {client.config.url} into {args.db}", flush=True)
        with _until_signal() as stop:
            stop.wait(args.duration)
    finally:
        client.stop()
        collector.stop()
        store.close()
    emit(args, collector.stats.to_json(), json.dumps(collector.stats.to_json()))
    return 0


# --- fleet status ----------------------------------------------------------------------------


def _ago(ts: float | None, now: float) -> str:
    return "-" if ts is None else f"{max(0.0, now - ts):.0f}s ago"


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def cmd_fleet(args: argparse.Namespace) -> int:
    if args.view == "report":
        return _fleet_report(args)
    store = open_store(args.db)
    now = time.time()
    try:
        rows = fleet_status(store, now=now, fleet=args.fleet, window_s=args.window)
    finally:
        store.close()
    table = Table(title=f"fleet ({len(rows)} devices)")
    for col in ("fleet", "device", "online", "model", "last seen", "p95 ms", "errors", "drift"):
        table.add_column(col)
    for r in rows:
        online = "?" if r.online is None else ("yes" if r.online else "no")
        model = "-" if r.model is None else f"{r.model} {r.version or ''}".strip()
        drift = "-" if r.drift_band is None else f"{r.drift_band} ({_fmt(r.psi_max, '.3f')})"
        table.add_row(
            r.fleet,
            r.device,
            online,
            model,
            _ago(r.last_seen, now),
            _fmt(r.p95_ms, ".2f"),
            _fmt(r.error_rate, ".2%"),
            drift,
        )
    emit(args, [r.to_json() for r in rows], table)
    return 0


def _fleet_report(args: argparse.Namespace) -> int:
    if args.out is None:
        raise ConfigError("fleet report needs --out report.html")
    store = open_store(args.db)
    try:
        page = render_report(store, bucket_s=args.bucket)
    finally:
        store.close()
    try:
        args.out.write_text(page, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {args.out}: {e.strerror}") from None
    emit(args, {"out": str(args.out), "bytes": len(page)}, f"wrote {args.out}")
    return 0


# --- rollout -------------------------------------------------------------------------------


def _rollout_table(r: Rollout) -> Table:
    c = r.counts()
    table = Table(title=f"rollout {r.id}: {r.bundle.name} {r.bundle.version} -> {r.fleet}")
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", r.status + (f" ({r.reason})" if r.reason else ""))
    waves = ",".join(f"{w:.0%}" for w in r.plan.waves)
    table.add_row("wave", f"{r.wave + 1} of {len(r.plan.waves)} ({waves})")
    table.add_row(
        "devices",
        f"{c['published']}/{c['devices']} published, {c['succeeded']} succeeded,"
        f" {c['failed']} failed, {c['pending']} pending",
    )
    for device, p in sorted(r.progress.items()):
        if p.outcome == "failed":
            table.add_row(f"failed: {device}", p.reason or "")
    return table


def _drive(args: argparse.Namespace, files: RolloutFiles, rollout: Rollout) -> int:
    def on_change(r: Rollout, d: Decision) -> None:
        if not args.json:
            extra = f": {', '.join(d.devices)}" if d.devices else ""
            print(
                f"[{r.id}] {d.action}{extra}" + (f" ({d.reason})" if d.reason else ""), flush=True
            )

    with _client(args) as client, _until_signal() as stop:
        result = run_rollout(
            client, files, rollout, poll_s=args.poll, on_change=on_change, stop=stop
        )
    emit(args, result.to_json(), _rollout_table(result))
    return {"completed": 0, "running": 0, "halted": 2, "aborted": 3}[result.status]


def cmd_rollout(args: argparse.Namespace) -> int:
    files = RolloutFiles(args.state_dir)
    action, rest = args.target[0], args.target[1:]
    if action in {"status", "resume", "abort"}:
        if len(rest) != 1:
            raise ConfigError(f"usage: edgeship rollout {action} ID")
        rollout = files.load(rest[0])
        if action == "status":
            emit(args, rollout.to_json(), _rollout_table(rollout))
            return 0
        if action == "resume":
            if rollout.status != "running":
                raise StateError(f"rollout {rollout.id} is {rollout.status}; it cannot resume")
            return _drive(args, files, rollout)
        aborted = replace(rollout, status="aborted", reason="aborted by user")
        files.save(aborted)
        if args.revert_on_halt:
            with _client(args) as client:
                revert(client, aborted)
        emit(args, aborted.to_json(), _rollout_table(aborted))
        return 0
    if rest:
        raise ConfigError("usage: edgeship rollout BUNDLE --url URL --group NAME ...")
    if args.url is None or args.fleet is None:
        raise ConfigError("a new rollout needs --url and --fleet")
    args.bundle = Path(action)
    ref = _bundle(args)
    plan = RolloutPlan(
        waves=parse_waves(args.waves),
        max_failure_rate=args.max_failure_rate,
        min_healthy_s=args.min_healthy_time,
        wave_timeout_s=args.wave_timeout,
        revert_on_halt=args.revert_on_halt,
    )
    rollout_id = args.id or f"{ref.name}-{ref.version}-{uuid.uuid4().hex[:6]}"
    check_id("rollout", rollout_id)
    with _client(args) as client:
        devices = _select(args, client)
    rollout = Rollout(
        id=rollout_id,
        fleet=args.fleet,
        bundle=ref,
        devices=wave_order(rollout_id, tuple(devices)),
        plan=plan,
        created_at=time.time(),
    )
    files.save(rollout)
    if not args.json:
        print(f"rollout {rollout_id}: {len(devices)} devices, waves {args.waves}", flush=True)
    return _drive(args, files, rollout)


# --- registration ------------------------------------------------------------------------------


def register(command: CommandFn) -> None:
    """Add the fleet commands; ``command(name, func, help)`` makes one subcommand parser."""
    _register_serve_publish(command)
    _register_collect_fleet(command)
    _register_rollout(command)


def _register_serve_publish(command: CommandFn) -> None:
    p = command("serve", cmd_serve, "serve a folder of bundles over HTTP (Range support)")
    p.add_argument("dir", type=Path)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="port (0: any free port)")

    p = command("publish", cmd_publish, "set the retained desired bundle of devices")
    p.add_argument("bundle", type=Path)
    p.add_argument("--url", required=True, help="where devices download the bundle (http/https)")
    p.add_argument("--trust", type=Path, help="verify the bundle against this trust policy first")
    _mqtt_options(p)
    _selection_options(p)


def _register_collect_fleet(command: CommandFn) -> None:
    p = command("collect", cmd_collect, "store fleet telemetry, events and state in a database")
    _mqtt_options(p, fleet_required=False)
    p.add_argument("--fleet", default="+", help="fleet id (default: every fleet)")
    p.add_argument("--db", default=_DEFAULT_DB, help="SQLite path or postgresql:// URL")
    p.add_argument(
        "--group",
        default="edgeship-collectors",
        help="shared-subscription group: collectors in one group split the load",
    )
    p.add_argument("--client-id", help="fixed client id (keeps the broker session)")
    p.add_argument(
        "--session-expiry",
        type=int,
        default=0,
        metavar="S",
        help="keep the broker session this long while disconnected (needs --client-id)",
    )
    p.add_argument("--duration", type=float, help="stop after this many seconds")

    p = command("fleet", cmd_fleet, "fleet overview from the collector's database")
    p.add_argument(
        "view",
        choices=["status", "report"],
        help="status: a table of devices; report: a self-contained HTML page (--out)",
    )
    p.add_argument("--out", type=Path, help="report: the HTML file to write")
    p.add_argument("--bucket", type=float, default=60.0, help="report: seconds per chart point")
    p.add_argument("--db", default=_DEFAULT_DB, help="SQLite path or postgresql:// URL")
    p.add_argument("--fleet", help="only this fleet")
    p.add_argument("--window", type=float, default=900.0, help="error-rate window in seconds")


def _register_rollout(command: CommandFn) -> None:
    p = command(
        "rollout",
        cmd_rollout,
        "roll a bundle out in waves: rollout BUNDLE ... | rollout status|resume|abort ID",
    )
    p.add_argument("target", nargs="+", metavar="BUNDLE | status|resume|abort ID")
    p.add_argument("--url", help="where devices download the bundle")
    p.add_argument("--trust", type=Path, help="verify the bundle against this trust policy first")
    _mqtt_options(p, fleet_required=False)
    p.add_argument("--fleet", help="fleet id")
    _selection_options(p)
    p.add_argument("--waves", default="1%,10%,50%,100%", help="cumulative share per wave")
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="halt when failed / published devices exceeds R (default 0)",
    )
    p.add_argument(
        "--min-healthy-time",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a device stays committed before the next wave",
    )
    p.add_argument(
        "--wave-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a device not committed this long after publishing counts as failed",
    )
    p.add_argument(
        "--revert-on-halt",
        action="store_true",
        help="on a halt (or abort), restore the devices' previous desired state",
    )
    p.add_argument(
        "--state-dir",
        type=Path,
        default=_DEFAULT_ROLLOUTS,
        help="where rollout records are kept (default .edgeship/rollouts)",
    )
    p.add_argument("--id", help="rollout id (default NAME-VERSION-random)")
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)
