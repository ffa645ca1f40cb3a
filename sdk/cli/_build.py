"""The build-side commands of ``edgeship``: keygen, trust, build, inspect, verify.

:func:`register` adds them to the parser that :mod:`sdk.cli` builds.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from agent.bundle import read_unverified, verify_bundle
from agent.bundle.crypto import load_public_key
from agent.bundle.manifest import Manifest, format_time
from agent.bundle.signing import PublicKey, TrustPolicy
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


def cmd_trust(args: argparse.Namespace) -> int:
    keys = []
    for path in args.public_keys:
        try:
            keys.append(PublicKey.from_pem(path.read_bytes()))
        except OSError as exc:
            raise KeyFileError(f"cannot read {path}: {exc.strerror}") from None
    policy = TrustPolicy.of(keys, threshold=args.threshold)
    names = {k.keyid: p.stem for k, p in zip(keys, args.public_keys, strict=True)}
    data = policy.to_toml(names)
    if args.out:
        args.out.write_bytes(data)
    else:
        sys.stdout.write(data.decode("ascii"))
    return 0


def _load_keys(args: argparse.Namespace) -> list[SigningKey]:
    if not args.key:
        raise ConfigError("give at least one signing key with --key PATH")
    passphrase = _passphrase(args.passphrase_env, confirm=False)
    return [load_signing_key(path, passphrase) for path in args.key]


def cmd_build(args: argparse.Namespace) -> int:
    overrides = {
        "name": args.name,
        "version": args.version,
        "sequence": args.sequence,
        "expires_in_days": args.expires_in_days,
        "health.latency_budget_p95_ms": args.latency_budget_ms,
    }
    metadata: BuildMetadata = load_metadata(args.metadata, overrides)
    keys = _load_keys(args)
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
            )
    except GateError as exc:
        report = exc.report
        if isinstance(report, EvaluationReport):
            if args.json:
                print(json.dumps({"ok": False, "evaluation": report.to_json()}, indent=2))
            else:
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
    emit(args, doc, f"built {result.path} ({result.size} bytes)\ndigest {result.digest}")
    return 0


def _manifest_tables(manifest: Manifest, title: str) -> list[Table]:
    overview = Table(title=title, show_header=False)
    overview.add_column("field", style="bold")
    overview.add_column("value")
    rows = [
        ("name", manifest.name),
        ("version", manifest.version),
        ("sequence", str(manifest.sequence)),
        ("created", format_time(manifest.created)),
        ("expires", format_time(manifest.expires) if manifest.expires else "never"),
        ("model", f"{manifest.model.format} {manifest.model.file}"),
        (
            "runtimes",
            ", ".join(
                r.name
                + (f" >={r.min_version}" if r.min_version else "")
                + (f" <{r.max_version}" if r.max_version else "")
                for r in manifest.compatibility.runtimes
            ),
        ),
        ("arch", ", ".join(manifest.compatibility.arch) or "any"),
        ("quantization", manifest.quantization.scheme),
        (
            "tolerance",
            f"atol {manifest.health.tolerance.atol:g}, rtol {manifest.health.tolerance.rtol:g}",
        ),
        (
            "latency budget p95",
            f"{manifest.health.latency_budget_p95_ms} ms"
            if manifest.health.latency_budget_p95_ms
            else "none",
        ),
        (
            "drift reference",
            f"{len(manifest.drift_reference.features)} features"
            if manifest.drift_reference
            else "none",
        ),
    ]
    for field, value in rows:
        overview.add_row(field, value)

    io = Table(title="inputs and outputs")
    for col in ("", "name", "dtype", "shape", "quantization"):
        io.add_column(col)
    for kind, specs in (("in", manifest.model.inputs), ("out", manifest.model.outputs)):
        for s in specs:
            shape = "[" + ", ".join("?" if d is None else str(d) for d in s.shape) + "]"
            q = (
                f"scale {s.quantization.scale:g} zp {s.quantization.zero_point}"
                if s.quantization
                else ""
            )
            io.add_row(kind, s.name, s.dtype, shape, q)

    card = Table(title="model card", show_header=False)
    card.add_column("field", style="bold")
    card.add_column("value")
    mc = manifest.model_card
    for field, value in (
        ("description", mc.description),
        ("intended use", mc.intended_use),
        ("data sources", ", ".join(mc.data_sources)),
        ("limitations", mc.limitations),
        ("retraining triggers", ", ".join(mc.retraining_triggers)),
        ("owners", ", ".join(mc.owners)),
        ("license", mc.license),
    ):
        card.add_row(field, value or "-")

    files = Table(title="files")
    for col in ("path", "size", "sha256"):
        files.add_column(col)
    for f in manifest.files:
        files.add_row(f.path, str(f.size), f.sha256)
    tables = [overview, io, card, files]
    if manifest.evaluation:
        tables.append(_evaluation_table(manifest.evaluation))
    return tables


def _evaluation_table(ev: Mapping[str, Any]) -> Table:
    """The build's evaluation report as embedded in the manifest."""
    table = Table(title="evaluation (at build time)")
    table.add_column("metric", style="bold")
    table.add_column("original")
    table.add_column("bundled")
    original, bundled = ev.get("original"), ev.get("quantized")
    if isinstance(original, dict) and isinstance(bundled, dict):
        table.add_row("size", f"{original.get('size_bytes')} B", f"{bundled.get('size_bytes')} B")
        if original.get("accuracy") is not None:
            table.add_row("top-1 accuracy", str(original["accuracy"]), str(bundled["accuracy"]))
        for a, b in zip(original.get("latency", []), bundled.get("latency", []), strict=False):
            label = f"p50 / p95 ms ({a.get('threads') or 'default'} threads)"
            table.add_row(
                label,
                f"{a.get('p50_ms')} / {a.get('p95_ms')}",
                f"{b.get('p50_ms')} / {b.get('p95_ms')}",
            )
    fidelity = ev.get("fidelity")
    if isinstance(fidelity, dict):
        for key, value in fidelity.items():
            table.add_row(f"fidelity: {key}", "", str(value))
    for gate in ev.get("gates", []):
        verdict = "passed" if gate.get("passed") else "FAILED"
        table.add_row(
            f"gate {gate.get('name')}",
            f"limit {gate.get('limit')} {gate.get('unit')}",
            f"{gate.get('measured')} ({verdict}, margin {gate.get('margin')})",
        )
    golden = ev.get("golden")
    if isinstance(golden, dict):
        table.add_row("golden spread", "", str(golden.get("spread")))
    return table


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        with open_regular(args.bundle) as f:
            manifest, envelope = read_unverified(f)
    except NotRegularFileError as exc:
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {args.bundle}: {exc.strerror}") from None
    keyids = [s.keyid for s in envelope.signatures]
    if args.json:
        print(
            json.dumps(
                {"manifest": manifest.to_json(), "signed_by": keyids, "verified": False},
                indent=2,
                sort_keys=True,
            )
        )
        return 0
    console = Console()
    for table in _manifest_tables(manifest, f"{args.bundle} (NOT verified: use edgeship verify)"):
        console.print(table)
    console.print(f"signed by key id(s): {', '.join(keyids)}")
    if manifest.encryption is not None:
        ids = ", ".join(r.key_id for r in manifest.encryption.recipients)
        console.print(
            f"payload encrypted ({manifest.encryption.scheme}) for device key id(s): {ids}"
        )
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    policy = TrustPolicy.load(args.trust)
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
    doc = {
        "ok": True,
        "digest": verified.digest,
        "name": m.name,
        "version": m.version,
        "sequence": m.sequence,
    }
    emit(
        args,
        doc,
        f"OK {args.bundle}: {m.name} {m.version} (sequence {m.sequence})\ndigest {verified.digest}",
    )
    return 0


# --- parser -----------------------------------------------------------------------------


def register(command: CommandFn) -> None:
    """Add the build-side commands through ``command(name, function, help)``."""
    p = command("keygen", cmd_keygen, "create a signing key pair (private key encrypted, 0600)")
    p.add_argument("out", type=Path, help="private key path; the public key goes to OUT.pub")
    p.add_argument("--type", choices=["ed25519", "ecdsa-p256"], default="ed25519")
    p.add_argument("--passphrase-env", metavar="NAME", help=_PASSPHRASE_HELP)

    p = command("trust", cmd_trust, "write a trust policy from public keys")
    p.add_argument("public_keys", type=Path, nargs="+", metavar="KEY.pub")
    p.add_argument("--threshold", type=int, default=1, help="signatures needed (default 1)")
    p.add_argument("--out", type=Path, help="file to write (default: stdout)")

    _build_options(
        command("build", cmd_build, "build and sign a bundle from an ONNX or .tflite model")
    )

    p = command("inspect", cmd_inspect, "show a bundle's manifest, model card and files")
    p.add_argument("bundle", type=Path)

    p = command("verify", cmd_verify, "verify a bundle fully without installing it")
    p.add_argument("bundle", type=Path)
    p.add_argument("--trust", type=Path, required=True, help="trust policy TOML")
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
        help=".npz/.npy inputs; samples are picked from it (default: synthetic)",
    )
    p.add_argument("--golden-count", type=int, default=8, help="golden samples to embed")
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
