"""The build-side commands of ``edgeship``: keygen, build, inspect, verify.

:func:`register` adds them to the parser that :mod:`sdk.cli` builds.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from agent.bundle import read_unverified, verify_bundle
from agent.bundle.crypto import load_public_key
from agent.bundle.root import load_trust
from agent.cli._output import error_code
from agent.errors import ConfigError, KeyFileError
from agent.plumbing.files import NotRegularFileError, open_regular
from sdk.build import (
    BuildMetadata,
    EvaluationReport,
    Gates,
    QuantizeOptions,
    SigningKey,
    build_bundle,
    generate_key,
    load_metadata,
    load_signing_key,
    parse_target,
)
from sdk.build import Progress as ProgressFn
from sdk.build._cases import merge_hints, parse_hints
from sdk.cli import _provenance
from sdk.cli._inspect_view import manifest_tables
from sdk.cli._output import emit
from sdk.errors import GateError

__all__ = ["register"]

CommandFn = Callable[[str, Any, str], argparse.ArgumentParser]

_PASSPHRASE_HELP = "name of an environment variable holding the passphrase (else: prompt)"  # noqa: S105 - help text, not a secret


def _passphrase(env_name: str | None, *, confirm: bool) -> bytes:
    if env_name:
        value = os.environ.get(env_name)
        if value is None:
            raise KeyFileError(f"environment variable {env_name} (--passphrase-env) is not set")
        return value.encode("utf-8")
    if not sys.stdin.isatty():
        raise KeyFileError("no terminal to ask for the passphrase: use --passphrase-env NAME")
    first = getpass.getpass("Passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise KeyFileError("the passphrases do not match")
    return first.encode("utf-8")


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressFn | None]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        tasks: dict[str, Any] = {}

        def update(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total)
            bar.update(tasks[step], completed=done, total=total)

        yield update


def cmd_keygen(args: argparse.Namespace) -> int:
    key = generate_key(args.out, _passphrase(args.passphrase_env, confirm=True), args.type)
    doc = {
        "private_key": str(args.out),
        "public_key": f"{args.out}.pub",
        "keyid": key.keyid,
        "keytype": key.public.keytype,
    }
    emit(args, doc, f"wrote {args.out} (0600, encrypted) and {args.out}.pub\nkeyid {key.keyid}")
    return 0


def _ratio(text: str) -> float | None:
    if text == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number or 'off'")
    return value


def _load_keys(args: argparse.Namespace) -> tuple[list[SigningKey], bytes]:
    if not args.key:
        raise ConfigError("give at least one signing key with --key PATH")
    passphrase = _passphrase(args.passphrase_env, confirm=False)
    return [load_signing_key(path, passphrase) for path in args.key], passphrase


def cmd_build(args: argparse.Namespace) -> int:
    overrides = {
        "name": args.name,
        "version": args.version,
        "sequence": args.sequence,
        "expires_in_days": args.expires_in_days,
        "health.latency_budget_p95_ms": args.latency_budget_ms,
        "health.measure_providers": args.measure_provider or None,
    }
    metadata: BuildMetadata = load_metadata(args.metadata, overrides)
    cli_hints = parse_hints(args.input_shape, args.input_value, args.input_range)
    metadata = replace(metadata, input_hints=merge_hints(metadata.input_hints, cli_hints))
    keys, passphrase = _load_keys(args)
    targets = [parse_target(t) for t in args.target]
    options = QuantizeOptions(
        scheme=args.quantize,
        calibration=args.calibration,
        validation=args.validation,
        gates=Gates(
            max_accuracy_drop=args.max_accuracy_drop,
            min_agreement=args.min_agreement,
            max_p95_ms=args.max_p95_ms,
            max_size_mb=args.max_size_mb,
        ),
        accept_unquantized=args.accept_unquantized,
        max_size_ratio=args.max_size_ratio,
        max_latency_ratio=args.max_latency_ratio,
        recipe_budget_s=args.recipe_budget_s,
    )
    recipients = [load_public_key(k) for k in args.encrypt_for]
    out = args.out or Path(f"{metadata.name}-{metadata.version}.edgeship")
    try:
        with _progress(not args.json and sys.stderr.isatty()) as progress:
            result = build_bundle(
                args.model,
                out,
                metadata=metadata,
                keys=keys,
                targets=targets,
                golden_inputs=args.golden_inputs,
                golden_count=args.golden_count,
                quantize=options,
                progress=progress,
                encrypt_for=recipients,
                overwrite=args.force,
                provenance=_provenance.options(args, keys, passphrase),
            )
    except GateError as exc:
        report = exc.report
        if args.json:
            # One JSON document, the error convention of every command, with the report.
            error: dict[str, Any] = {"code": error_code(exc), "message": str(exc)}
            if isinstance(report, EvaluationReport):
                error["evaluation"] = report.to_json()
            print(json.dumps({"error": error}, sort_keys=True))
            return 1
        if isinstance(report, EvaluationReport):
            Console(stderr=True).print(report.to_table())
        raise
    m = result.manifest
    doc = {
        "ok": True,
        "bundle": str(result.path),
        "digest": result.digest,
        "size": result.size,
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "quantization": m.quantization.scheme,
        "evaluation": m.evaluation,
    }
    text = f"built {result.path} ({result.size} bytes)\ndigest {result.digest}"
    if m.health.provider_tolerances:
        text += f"\ntolerances measured on {', '.join(m.health.provider_tolerances)}"
    emit(args, doc, text)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        with open_regular(args.bundle) as f:
            manifest, envelope = read_unverified(f)
    except NotRegularFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {args.bundle}: {exc.strerror}") from None
    keyids = [s.keyid for s in envelope.signatures]
    statement = _provenance.from_unverified(args.bundle)
    if args.json:
        doc = {"manifest": manifest.to_json(), "signed_by": keyids, "verified": False}
        print(json.dumps(doc | {"provenance": statement}, indent=2, sort_keys=True))
        return 0
    console = Console()
    for table in manifest_tables(manifest, f"{args.bundle} (NOT verified: use edgeship verify)"):
        console.print(table)
    if statement is not None:
        console.print(_provenance.table(statement))
    console.print(f"signed by key id(s): {', '.join(keyids)}")
    if manifest.encryption is not None:
        ids = ", ".join(r.key_id for r in manifest.encryption.recipients)
        console.print(
            f"payload encrypted ({manifest.encryption.scheme}) for device key id(s): {ids}"
        )
    return 0


def _refuse_a_key_as_trust(path: Path) -> None:
    """A public key where a trust policy belongs is the usual first mistake: say so.

    Raises:
        ConfigError: ``path`` holds a PEM key.
    """
    try:
        with path.open("rb") as f:
            head = f.read(64)
    except OSError:
        return  # the trust reader says what is wrong with it
    if head.lstrip().startswith(b"-----BEGIN"):
        raise ConfigError(
            f"{path} is a key, not a trust policy; write one with"
            f" `edgeship trust {path} --out trust.toml` and pass --trust trust.toml"
        )


def cmd_verify(args: argparse.Namespace) -> int:
    _refuse_a_key_as_trust(args.trust)
    policy = load_trust(args.trust).bundle_policy(datetime.now(UTC), slack_s=300.0)
    try:
        with open_regular(args.bundle) as f:
            verified = verify_bundle(
                f, policy, now=datetime.now(UTC), min_sequence=args.min_sequence
            )
    except NotRegularFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {args.bundle}: {exc.strerror}") from None
    m = verified.manifest
    statement = _provenance.from_verified(args.bundle, m)
    doc = {
        "ok": True,
        "digest": verified.digest,
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
        "provenance": statement,
    }
    emit(
        args,
        doc,
        f"OK {args.bundle}: {m.name} {m.version} (sequence {m.sequence})\ndigest {verified.digest}"
        + _provenance.source_line(statement),
    )
    return 0


# --- parser -----------------------------------------------------------------------------


def register(command: CommandFn) -> None:
    """Add the build-side commands through ``command(name, function, help)``."""
    p = command("keygen", cmd_keygen, "create a signing key pair (private key encrypted, 0600)")
    p.add_argument("out", type=Path, help="private key path; the public key goes to OUT.pub")
    p.add_argument("--type", choices=["ed25519", "ecdsa-p256"], default="ed25519")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)

    _build_options(
        command("build", cmd_build, "build and sign a bundle from an ONNX or .tflite model")
    )

    p = command("inspect", cmd_inspect, "show a bundle's manifest, model card and files")
    p.add_argument("bundle", type=Path)

    p = command("verify", cmd_verify, "verify a bundle fully without installing it")
    p.add_argument("bundle", type=Path)
    p.add_argument(
        "--trust", type=Path, required=True, help="trust root (JSON) or trust policy (TOML)"
    )
    p.add_argument("--min-sequence", type=int, help="refuse sequences below this floor")


def _build_options(p: argparse.ArgumentParser) -> None:
    """The arguments and options of ``edgeship build``."""
    p.add_argument("model", type=Path)
    p.add_argument("--out", "-o", type=Path, help="bundle path (default NAME-VERSION.edgeship)")
    p.add_argument(
        "--metadata", type=Path, help="TOML file with name, version, sequence, model card..."
    )
    p.add_argument("--name")
    p.add_argument("--version", dest="version")
    p.add_argument("--sequence", type=int, help="monotonic release counter (anti-rollback)")
    p.add_argument("--expires-in-days", type=float)
    p.add_argument(
        "--latency-budget-ms",
        type=float,
        help="p95 latency on the golden inputs that the device's health check enforces",
    )
    p.add_argument("--key", type=Path, action="append", help="signing key (repeat for k-of-n)")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)
    p.add_argument(
        "--encrypt-for",
        type=Path,
        action="append",
        default=[],
        metavar="DEVICE.pub",
        help="encrypt the payload for this device key (edgeship-agent keygen; repeat)",
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="RUNTIME[>=MIN][,<MAX]",
        help="runtime the bundle runs on (repeat; default: all for the format)",
    )
    p.add_argument(
        "--golden-inputs",
        type=Path,
        help="golden cases (.npz keyed <case>/<input>) or a batch-major data set, one"
        " sample per case (default: synthetic)",
    )
    p.add_argument(
        "--golden-count", type=int, default=8, help="golden cases to embed (from a data set)"
    )
    p.add_argument(
        "--measure-provider",
        action="append",
        default=[],
        metavar="NAME",
        help="run the golden cases on this onnxruntime execution provider (or TFLite"
        " delegate: xnnpack, cpu, a library path) here and record a tolerance for it"
        " (repeat; replaces the metadata's health.measure_providers)",
    )
    hints = p.add_argument_group("hints to synthesise golden inputs (without --golden-inputs)")
    for option, form in (("shape", "D0,D1,..."), ("value", "V"), ("range", "LO,HI")):
        hints.add_argument(
            f"--input-{option}",
            action="append",
            default=[],
            metavar=f"NAME={form}",
            help=f"the input's {option} (repeat per input)",
        )
    _quantize_options(p)
    _provenance.add_options(p)


def _quantize_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["none", "dynamic", "static", "weight-only"],
        default="none",
        help="quantization scheme (static needs --calibration)",
    )
    p.add_argument("--calibration", type=Path, help="calibration data: .npy, .npz or a folder")
    p.add_argument(
        "--validation",
        type=Path,
        help="validation data (.npz with inputs and optional 'labels'): evaluates the"
        " bundled model against the original and applies the gates",
    )
    gates = p.add_argument_group("gates (a build that misses one writes no bundle)")
    gates.add_argument("--max-accuracy-drop", type=float, metavar="POINTS")
    gates.add_argument("--min-agreement", type=float, metavar="FRACTION")
    gates.add_argument(
        "--max-p95-ms",
        type=float,
        metavar="MS",
        help="p95 latency of one sample on one thread (nearest rank, as devices measure it)",
    )
    gates.add_argument("--max-size-mb", type=float, metavar="MB")
    for what in ("size", "latency"):
        gates.add_argument(
            f"--max-{what}-ratio",
            type=_ratio,
            default=1.0,
            metavar="R|off",
            help=f"quantized {what} / fp32 {what} on this machine (default 1: int8 must pay);"
            " a changed limit is recorded in the bundle",
        )
    p.add_argument(
        "--recipe-budget-s",
        type=float,
        default=120.0,
        metavar="S",
        help="static ONNX: when the default recipe does not pay, seconds to try others"
        " (QDQ/QOperator, int8/uint8 activations, compute ops only; 0: do not)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle file")
    p.add_argument(
        "--accept-unquantized",
        action="store_true",
        help="ship a quantized bundle even when (almost) no weights became int8 (recorded)",
    )
