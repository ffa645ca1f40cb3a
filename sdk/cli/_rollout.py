"""``edgeship rollout``: start, watch, resume, abort and list rollouts in waves.

Records live in the fleet store (``--db``, the collector's database), so every command
works from any host that reaches it. :func:`register` adds the command to the parser that
:mod:`sdk.cli` builds; the MQTT and device-selection options are the other fleet
commands' (:mod:`sdk.cli._fleet`).
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from rich.table import Table

from agent.bundle import DEFAULT_MAX_BUNDLE_BYTES
from agent.bundle.signing import TrustPolicy
from agent.errors import ConfigError, StateError
from agent.install._fetch import UrlFetcher
from agent.messages.topics import check_id
from agent.plumbing.mqtt import MqttClient
from agent.plumbing.tls import TlsConfig
from sdk.cli._fleet import (
    CommandFn,
    _client,
    _mqtt_options,
    _policy,
    _select,
    _selection_options,
    model_option,
    until_signal,
)
from sdk.cli._fleet_views import DEFAULT_DB
from sdk.cli._output import emit
from sdk.cli._rollout_stages import probation_rule, shadow_rule, split_plan, stage_options
from sdk.fleet._preflight import preflight
from sdk.fleet._rollout_lease import Runner, RunnerInfo
from sdk.fleet._rollout_run import FleetWatcher, finish_pending, run_rollout
from sdk.fleet._rollout_store import RolloutRecords
from sdk.fleet.publish import BundleRef, bundle_ref
from sdk.fleet.rollout import Decision, Rollout, RolloutPlan, parse_waves, wave_order
from sdk.fleet.store import open_store

__all__ = ["register"]

_EXIT = {"completed": 0, "running": 0, "halted": 2, "aborted": 3}


@contextmanager
def _records(args: argparse.Namespace) -> Iterator[RolloutRecords]:
    store = open_store(args.db)
    try:
        yield RolloutRecords(store)
    finally:
        store.close()


def _table(r: Rollout, runner: RunnerInfo, now: float) -> Table:
    c = r.counts()
    table = Table(
        title=f"rollout {r.id}: {r.bundle.name} {r.bundle.version} -> {r.fleet}, model {r.model}"
    )
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", r.status + (f" ({r.reason})" if r.reason else ""))
    waves = ",".join(f"{w:.0%}" for w in r.plan.waves)
    table.add_row("wave", f"{r.wave + 1} of {len(r.plan.waves)} ({waves})")
    if r.plan.shadow is not None:
        rule = r.plan.shadow
        table.add_row(
            "stage",
            f"shadow: {rule.min_samples} samples, agreement >= {rule.min_agreement:.1%},"
            f" latency <= x{rule.max_latency_ratio:g}",
        )
    if r.plan.split is not None:
        table.add_row(
            "stage", f"A/B: {r.plan.split.share:.0%} of requests, {r.plan.split.min_requests}"
            " requests to decide",
        )  # fmt: skip
    table.add_row(
        "devices",
        f"{c['published']}/{c['devices']} published, {c['succeeded']} succeeded,"
        f" {c['failed']} failed, {c['rejected']} rejected, {c['pending']} pending",
    )
    runner_text = runner.describe(now)
    if not runner.alive(now) and (r.status == "running" or r.revert == "pending"):
        runner_text += f"; continue it with: edgeship rollout resume {r.id}"
    table.add_row("runner", runner_text)
    if r.revert != "none":
        table.add_row("revert", r.revert)
    for device, p in sorted(r.progress.items()):
        if p.outcome in ("failed", "rejected"):
            table.add_row(f"{p.outcome}: {device}", p.reason or "")
        elif p.split is not None and p.split.stage == "promoted":
            table.add_row(f"promoted: {device}", p.split.verdict or "")
    return table


def _show(args: argparse.Namespace, records: RolloutRecords, rollout_id: str) -> Rollout:
    rollout, runner = records.load(rollout_id)
    now = time.time()
    emit(args, rollout.to_json() | {"runner": runner.to_json(now)}, _table(rollout, runner, now))
    return rollout


def _list(args: argparse.Namespace) -> int:
    with _records(args) as records:
        rows = records.summaries(args.fleet)
    table = Table(title=f"rollouts ({len(rows)})")
    columns = ("id", "fleet", "model", "bundle", "status", "devices", "succeeded", "failed")
    for col in (*columns, "runner"):
        table.add_column(col)
    for r in rows:
        c = r["counts"]
        table.add_row(
            r["id"],
            r["fleet"],
            r["model"],
            r["bundle"],
            r["status"],
            f"{c['published']}/{c['devices']}",
            str(c["succeeded"]),
            str(c["failed"] + c["rejected"]),
            r["runner"]["text"],
        )
    emit(args, rows, table)
    return 0


def _trust(args: argparse.Namespace) -> TrustPolicy | None:
    """The ``--trust`` policy; None only with ``--skip-preflight``.

    Raises:
        ConfigError: no ``--trust`` (nor ``--skip-preflight``), or it cannot be read.
    """
    policy = _policy(args)
    if policy is None and not args.skip_preflight:
        raise ConfigError(
            "a rollout needs --trust POLICY (the trust policy the devices hold) to check the"
            " bundle before publishing; --skip-preflight publishes without any check"
        )
    return policy


def _check(
    args: argparse.Namespace,
    ref: BundleRef,
    devices: Sequence[str],
    watcher: FleetWatcher,
    policy: TrustPolicy | None,
    *,
    resuming: bool,
) -> None:
    """Preflight before publishing, or say loudly that it is skipped.

    Raises:
        PreflightError: a check failed.
    """
    if policy is None or args.skip_preflight:
        print(
            "warning: --skip-preflight: nothing checked that the URL serves this bundle, that"
            " the devices' trust policy accepts it, or that its sequence is above theirs",
            file=sys.stderr,
        )
        return
    tls = None if args.url_ca_file is None else TlsConfig(ca_file=args.url_ca_file)
    fetcher = UrlFetcher.from_tls(tls, setting="--url-ca-file")
    # A new rollout verified its local file; the URL's bytes are then known to be the same.
    checked = preflight(
        ref,
        devices,
        watcher.state,
        fetcher,
        max_bytes=args.bundle.stat().st_size if not resuming else args.max_bundle_bytes,
        policy=policy if resuming else None,
        allow_unknown=args.allow_unknown_devices,
    )
    if not resuming:
        checked.insert(1, "the bundle verifies against the trust policy")
    if not args.json:
        print("\n".join(f"preflight: {line}" for line in checked), flush=True)


def _drive(
    args: argparse.Namespace, client: MqttClient, runner: Runner, watcher: FleetWatcher
) -> Rollout:
    def on_change(r: Rollout, d: Decision) -> None:
        if not args.json:
            extra = f": {', '.join(d.devices)}" if d.devices else ""
            reason = f" ({d.reason})" if d.reason else ""
            print(f"[{r.id}] {d.action}{extra}{reason}", flush=True)

    with until_signal() as stop:
        return run_rollout(
            client,
            runner,
            runner.rollout,
            watcher=watcher,
            poll_s=args.poll,
            on_change=on_change,
            stop=stop,
        )


def _start(args: argparse.Namespace) -> int:
    if args.url is None or args.fleet is None:
        raise ConfigError("a new rollout needs --url and --fleet")
    policy = _trust(args)
    ref = bundle_ref(args.bundle, args.url, policy=policy, now=datetime.now(UTC))
    plan = RolloutPlan(
        waves=parse_waves(args.waves),
        max_failure_rate=args.max_failure_rate,
        min_healthy_s=args.min_healthy_time,
        wave_timeout_s=args.wave_timeout,
        revert_on_halt=args.revert_on_halt,
        max_download_failures=args.download_failures,
        runner_timeout_s=args.runner_timeout,
        shadow=shadow_rule(args),
        split=split_plan(args),
        probation=probation_rule(args),
    )
    rollout_id = args.id or f"{ref.name}-{ref.version}-{uuid.uuid4().hex[:6]}"
    check_id("rollout", rollout_id)
    with _records(args) as records, _client(args) as client:
        devices = _select(args, client)
        watcher = FleetWatcher(client, args.fleet, model=args.model)
        watcher.settle()
        _check(args, ref, devices, watcher, policy, resuming=False)
        rollout = Rollout(
            id=rollout_id,
            fleet=args.fleet,
            bundle=ref,
            devices=wave_order(rollout_id, tuple(devices)),
            plan=plan,
            created_at=time.time(),
            model=args.model,
        )
        if not args.json:
            print(
                f"rollout {rollout_id}: model {args.model} of {len(devices)} devices,"
                f" waves {args.waves}",
                flush=True,
            )
        with records.create(rollout) as runner:
            result = _drive(args, client, runner, watcher)
        _show(args, records, result.id)
    return _EXIT[result.status]


def _resume(args: argparse.Namespace, rollout_id: str) -> int:
    with _records(args) as records:
        rollout, _ = records.load(rollout_id)
        if rollout.status != "running" and rollout.revert != "pending":
            raise StateError(f"rollout {rollout_id} is {rollout.status}; it cannot resume")
        with records.take_over(rollout_id) as runner, _client(args) as client:
            rollout = runner.rollout
            watcher = FleetWatcher(client, rollout.fleet, model=rollout.model)
            if rollout.progress:
                since = min(p.published_at for p in rollout.progress.values())
                watcher.replay(records.events_since(rollout.fleet, rollout.model, since))
            watcher.settle()
            remaining = rollout.devices[len(rollout.progress) :]
            if rollout.status == "running" and remaining:  # more to publish: check first
                _check(args, rollout.bundle, remaining, watcher, _trust(args), resuming=True)
            result = _drive(args, client, runner, watcher)
        _show(args, records, rollout_id)
    return _EXIT[result.status]


def _abort(args: argparse.Namespace, rollout_id: str) -> int:
    with _records(args) as records:
        aborted = records.abort(rollout_id, "aborted by user", revert=args.revert_on_halt)
        if aborted.revert == "pending" and args.revert_on_halt:
            # The runner, if alive, stops at its next step and lets go; then revert here.
            wait_s = aborted.plan.runner_timeout_s + 5.0
            with records.take_over(rollout_id, wait_s=wait_s) as runner, _client(args) as client:
                watcher = FleetWatcher(client, aborted.fleet, model=aborted.model)
                watcher.settle()
                finish_pending(client, runner, watcher, runner.rollout)
        _show(args, records, rollout_id)
    return 0


def cmd_rollout(args: argparse.Namespace) -> int:
    action, rest = args.target[0], args.target[1:]
    if action == "list":
        return _list(args)
    if action in {"status", "resume", "abort"}:
        if len(rest) != 1:
            raise ConfigError(f"usage: edgeship rollout {action} ID")
        if action == "status":
            with _records(args) as records:
                _show(args, records, rest[0])
            return 0
        return _resume(args, rest[0]) if action == "resume" else _abort(args, rest[0])
    if rest:
        raise ConfigError(
            "usage: edgeship rollout BUNDLE --url URL --trust POLICY --group NAME ..."
        )
    args.bundle = Path(action)
    return _start(args)


def register(command: CommandFn) -> None:
    """Add ``rollout``; ``command(name, func, help)`` makes one subcommand parser."""
    p = command(
        "rollout",
        cmd_rollout,
        "roll a bundle out in waves: rollout BUNDLE ... | rollout status|resume|abort ID"
        " | rollout list",
    )
    p.add_argument("target", nargs="+", metavar="BUNDLE | status|resume|abort ID | list")
    p.add_argument("--url", help="where devices download the bundle")
    p.add_argument(
        "--trust",
        type=Path,
        help="the trust policy the devices hold: the bundle must verify against it (required"
        " unless --skip-preflight)",
    )
    _mqtt_options(p, fleet_required=False)
    p.add_argument("--fleet", help="fleet id")
    _selection_options(p)
    p.add_argument(
        "--db",
        default=DEFAULT_DB,
        help="the fleet store: SQLite path or postgresql:// (default: %(default)s)",
    )
    p.add_argument("--id", help="rollout id (default NAME-VERSION-random)")
    model_option(p)
    _plan_options(p)
    stage_options(p)
    _preflight_options(p)
    p.add_argument("--poll", type=float, default=0.5, help=argparse.SUPPRESS)


def _plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--waves",
        default="1%,10%,50%,100%",
        help="cumulative share per wave (default: %(default)s)",
    )
    p.add_argument(
        "--max-failure-rate",
        type=float,
        default=0.0,
        metavar="R",
        help="halt when failed / published devices exceeds R (default: %(default)s)",
    )
    p.add_argument(
        "--min-healthy-time",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds a device stays committed before the next wave (default: %(default)s)",
    )
    p.add_argument(
        "--wave-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a device not committed this long after publishing counts as failed"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--download-failures",
        type=int,
        default=3,
        metavar="N",
        help="transient download failures a device may report before it counts as failed"
        " (default: %(default)s)",
    )
    p.add_argument(
        "--revert-on-halt",
        action="store_true",
        help="on a halt (or abort), restore the devices' previous desired state",
    )
    p.add_argument(
        "--runner-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="a runner without a heartbeat for this long is gone (resume may take over)"
        " (default: %(default)s)",
    )


def _preflight_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--skip-preflight",
        action="store_true",
        help="publish without checking the URL, the trust policy or the devices' sequences",
    )
    p.add_argument(
        "--allow-unknown-devices",
        action="store_true",
        help="roll out also to devices that report no state (their sequence is unknown)",
    )
    p.add_argument("--url-ca-file", type=Path, help="CA of an https:// bundle URL (preflight)")
    p.add_argument(
        "--max-bundle-bytes",
        type=int,
        default=DEFAULT_MAX_BUNDLE_BYTES,
        help="resume: the most the preflight downloads from the URL (default: %(default)s)",
    )
