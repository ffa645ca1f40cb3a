"""``edgeship-agent install | resume | status | rollback | recover-state``.

Thin: parse, call :class:`agent.install.Updater` or :class:`agent.install.Store`, print.
A one-shot ``install`` serves no traffic, so it commits as soon as the health gate
passes; probation applies where the agent serves (``edgeship-agent run`` or a program
using :class:`agent.serve._slot.ModelSlot`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.bundle import DEFAULT_MAX_BUNDLE_BYTES
from agent.errors import ConfigError
from agent.install._status import status_document, version_info
from agent.install._store import AgentState, Store

if TYPE_CHECKING:
    from agent.install._updater import InstallResult, Updater

__all__ = ["register"]

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
# Where a device keeps them (examples/agent.toml, examples/systemd).
DEFAULT_CONFIG = Path("/etc/edgeship/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/edgeship")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the lifecycle commands to ``edgeship-agent``."""

    def state_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--state-dir",
            type=Path,
            help="the agent's state directory (default: state_dir of --config, else of"
            f" {DEFAULT_CONFIG} if it exists, else {DEFAULT_STATE_DIR})",
        )
        p.add_argument("--config", type=Path, help="the agent configuration whose state_dir to use")
        p.add_argument(
            "--model",
            help="the model (agent.toml [models.NAME]) whose state to use (default: the"
            " model called default, whose state is the state directory itself)",
        )

    def tls_files(p: argparse.ArgumentParser) -> None:
        p.add_argument("--ca-file", type=Path, help="https: trust this CA instead of the system's")
        p.add_argument("--cert-file", type=Path, help="https: client certificate (PEM)")
        p.add_argument("--key-file", type=Path, help="https: its private key (PEM)")
        p.add_argument(
            "--decryption-key",
            type=Path,
            help="the device key (edgeship-agent keygen) that opens encrypted bundles",
        )
        p.add_argument(
            "--max-bundle-bytes",
            type=int,
            default=DEFAULT_MAX_BUNDLE_BYTES,
            help="refuse larger bundles, as fetch.max_bundle_bytes (default: %(default)s)",
        )

    p = sub.add_parser("install", help="install a bundle from a path or http(s) URL")
    p.add_argument("source", help="bundle path or http(s) URL")
    state_dir(p)
    p.add_argument(
        "--trust", type=Path, required=True, help="trust root (JSON) or trust policy (TOML)"
    )
    p.add_argument("--sha256", help="the bundle file's expected sha256")
    tls_files(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_in_state_dir(_install))

    p = sub.add_parser("resume", help="finish or roll back an interrupted install")
    state_dir(p)
    p.add_argument(
        "--trust", type=Path, required=True, help="trust root (JSON) or trust policy (TOML)"
    )
    tls_files(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_in_state_dir(_resume))

    p = sub.add_parser("status", help="show current, previous, pending and the last failure")
    state_dir(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_in_state_dir(_status))

    p = sub.add_parser("rollback", help="roll back to the previous version at once")
    state_dir(p)
    p.add_argument("--reason", default="rolled back by hand", help="recorded with the rollback")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_in_state_dir(_rollback))

    p = sub.add_parser(
        "keygen",
        help="create this device's decryption key (X25519) for encrypted bundles",
        description="Write a new X25519 private key (PEM, mode 0600) and PATH.pub, the"
        " public key to give to whoever builds bundles (edgeship build --encrypt-for).",
    )
    p.add_argument("--out", type=Path, required=True, help="private key file to create")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_keygen)

    p = sub.add_parser("recover-state", help="restore a corrupt state file")
    state_dir(p)
    p.add_argument(
        "--floor",
        type=int,
        help="the anti-rollback floor to keep, if the recovery copy is also unusable",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=_in_state_dir(_recover))


def _in_state_dir(command: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """``command`` with ``args.state_dir`` resolved as ``--state-dir`` says (the agent's own
    one on a device where its configuration is in the default place).

    Raises (when called): ConfigError: the configuration is invalid, or a command that
    only reads finds no state directory there.
    """

    def resolved(args: argparse.Namespace) -> int:
        if args.state_dir is None:
            config = args.config
            if config is None and DEFAULT_CONFIG.is_file():
                config = DEFAULT_CONFIG
            if config is None:
                args.state_dir = DEFAULT_STATE_DIR
            else:
                from agent.config import load_config  # noqa: PLC0415 - only when needed

                args.state_dir = load_config(config).state_dir
        args.state_dir = _model_state_dir(args.state_dir, args.model)
        if command in (_status, _rollback) and not args.state_dir.is_dir():
            raise ConfigError(
                f"no agent state in {args.state_dir}: give the agent's --state-dir, or its"
                " --config (state_dir)"
            )
        return command(args)

    return resolved


def _model_state_dir(state_dir: Path, model: str | None) -> Path:
    """Where ``model`` keeps its state (docs/agent.md, "Several models").

    Raises:
        ConfigError: not a model name.
    """
    from agent.messages.desired import DEFAULT_MODEL, MODEL_RE  # noqa: PLC0415

    if model is None or model == DEFAULT_MODEL:
        return state_dir
    if not MODEL_RE.fullmatch(model):
        raise ConfigError(f"--model {model!r} must match {MODEL_RE.pattern}")
    return state_dir / "models" / model


def _print_result(result: InstallResult | None, updater: Updater, as_json: bool) -> None:
    state = updater.status()
    if as_json:
        doc: dict[str, Any] = {"result": None, "state": status_document(updater.store, state)}
        if result is not None:
            doc["result"] = {
                "digest": result.digest,
                "name": result.name,
                "version": result.version,
                "sequence": result.sequence,
                # A one-shot command commits what passed the health gate.
                "outcome": "committed" if result.outcome == "probation" else result.outcome,
            }
        print(json.dumps(doc, indent=2, sort_keys=True))
        return
    if result is None:
        print("nothing to resume" if state.last_failure is None else _failure_line(state))
        return
    verb = "already current" if result.outcome == "already-current" else "installed"
    print(f"{verb}: {result.name} {result.version} (sequence {result.sequence})")
    print(f"digest:    {result.digest}")
    if result.health is not None:
        print(
            f"health:    max deviation {result.health.max_abs_deviation:.3g},"
            f" p95 {result.health.p95_ms:.2f} ms over {result.health.runs} runs"
        )


def _keygen(args: argparse.Namespace) -> int:
    from agent.bundle.crypto import DeviceKey  # noqa: PLC0415 - what the command uses, when run

    key = DeviceKey.generate()
    try:
        key.save(args.out)
    except FileExistsError:
        raise ConfigError(f"{args.out} exists; refusing to overwrite a device key") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {args.out}: {exc}") from None
    if args.json:
        print(json.dumps({"key": str(args.out), "public": f"{args.out}.pub", "key_id": key.key_id}))
    else:
        print(f"wrote {args.out} (0600) and {args.out}.pub\nkey id {key.key_id}")
    return 0


def _updater(args: argparse.Namespace) -> Updater:
    """The updater ``install`` and ``resume`` run, with the TLS files and caps given."""
    # What the command uses, imported when it runs: `edgeship-agent run` stays light.
    from agent.cli._progress import ProgressFetcher, wants_progress  # noqa: PLC0415
    from agent.install._config import FetchConfig, UpdaterConfig  # noqa: PLC0415
    from agent.install._fetch import Fetcher, UrlFetcher  # noqa: PLC0415
    from agent.install._trust import TrustKeeper  # noqa: PLC0415
    from agent.install._updater import Updater  # noqa: PLC0415
    from agent.plumbing.tls import TlsConfig  # noqa: PLC0415

    if args.key_file is not None and args.cert_file is None:
        raise ConfigError("--key-file needs --cert-file")
    given = args.ca_file is not None or args.cert_file is not None
    tls = TlsConfig(args.ca_file, args.cert_file, args.key_file) if given else None
    # A person at the device chooses the bundle: the root's rules apply (keys, expiry,
    # signed floors), the fleet's freshness does not.
    trust = TrustKeeper(args.state_dir, args.trust, follow=False)
    fetcher: Fetcher = UrlFetcher.from_tls(tls, setting="the --ca-file / --cert-file / --key-file")
    if wants_progress(args.json):
        fetcher = ProgressFetcher(fetcher, sys.stderr)
    return Updater(
        args.state_dir,
        trust.install_policy,
        fetcher=fetcher,
        config=UpdaterConfig(
            fetch=FetchConfig(max_bundle_bytes=args.max_bundle_bytes),
            decryption_key=args.decryption_key,
        ),
    )


def _install(args: argparse.Namespace) -> int:
    if args.sha256 is not None and not _SHA256_RE.match(args.sha256):
        raise ConfigError("--sha256 must be 64 hex digits")
    updater = _updater(args)
    state = updater.status()
    if state.pending is not None and state.pending.phase == "probation":
        updater.resume()  # a one-shot install left in probation by a crash: roll it back
    result = updater.install(args.source, sha256=args.sha256 and args.sha256.lower())
    if result.outcome == "probation":
        updater.commit()
    _print_result(result, updater, args.json)
    return 0


def _resume(args: argparse.Namespace) -> int:
    updater = _updater(args)
    result = updater.resume()
    if result is not None and result.outcome == "probation":
        updater.commit()
    _print_result(result, updater, args.json)
    return 0


def _rollback(args: argparse.Namespace) -> int:
    from agent.install._updater import Updater  # noqa: PLC0415 - when run

    store = Store(args.state_dir)
    state = Updater(args.state_dir, None).rollback(args.reason)
    if args.json:
        print(json.dumps(status_document(store, state), indent=2, sort_keys=True))
    else:
        print(f"rolled back: current is now {_describe(store, state.current)}")
    return 0


def _recover(args: argparse.Namespace) -> int:
    store = Store(args.state_dir)
    store.init()
    with store.lock():
        state = store.recover(floor=args.floor)
    if args.json:
        print(json.dumps(status_document(store, state), indent=2, sort_keys=True))
    else:
        print(f"state restored; anti-rollback floor {state.floor}")
    return 0


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(store: Store, digest: str | None) -> str:
    info = version_info(store, digest)
    if info is None:
        return "-"
    if info["name"] is None:
        return f"{digest} (missing from the store)"
    return f"{info['name']} {info['version']} (sequence {info['sequence']}, {digest})"


def _failure_line(state: AgentState) -> str:
    f = state.last_failure
    if f is None:
        return "-"
    where = f" in {f.phase}" if f.phase else ""
    return f"{f.outcome}{where} at {_when(f.time)}: {f.reason}"


def _status(args: argparse.Namespace) -> int:
    from agent.install._providers import ProviderRecord  # noqa: PLC0415 - when run
    from agent.install._trust_files import persisted_root  # noqa: PLC0415 - when run

    store = Store(args.state_dir)
    state = store.load()
    root = persisted_root(args.state_dir)
    # The provider the current version passed its gate on, as the agent recorded it.
    passed = ProviderRecord(store.root / "providers.json").get(state.current)
    if args.json:
        # What the state directory knows; a running agent adds expiry and freshness.
        trust = None if root is None else {"root_version": root.version}
        serving = None if passed is None else {"digest": state.current, **passed.to_json()}
        doc = status_document(store, state, trust=trust, serving=serving)
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    p = state.pending
    rows = [
        ("current", _describe(store, state.current)),
        ("previous", _describe(store, state.previous)),
        (
            "pending",
            "-" if p is None else f"{p.phase}: {p.source}" + (f" ({p.digest})" if p.digest else ""),
        ),
        ("floor", "-" if state.floor is None else str(state.floor)),
        ("trust root", "the bootstrap file" if root is None else f"v{root.version} (persisted)"),
        ("serves on", "-" if passed is None else f"{passed.runtime} {passed.provider}"),
        ("last failure", _failure_line(state)),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key:<{width}}  {value}\n")
    return 0
