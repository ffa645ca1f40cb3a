"""What a person says about a bundle: metadata from a small TOML file and CLI options,
target runtimes, and the creation time (``SOURCE_DATE_EPOCH`` for reproducible builds).
"""

from __future__ import annotations

import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.bundle.manifest import (
    HUMAN_VERSION_RE,
    HUMAN_VERSION_WHAT,
    NAME_RE,
    NAME_WHAT,
    RUNTIMES,
    ModelCard,
    Probation,
    RuntimeRequirement,
)
from agent.errors import ConfigError
from sdk.build._cases import InputHint, parse_hints

__all__ = ["BuildMetadata", "check_metadata", "creation_time", "load_metadata", "parse_target"]

_TARGET_RE = re.compile(
    r"^(?P<name>[a-z-]+)(?:\s*>=\s*(?P<min>[\d.]+))?(?:\s*,?\s*<\s*(?P<max>[\d.]+))?$"
)


@dataclass(frozen=True)
class BuildMetadata:
    """What a person says about the bundle (from a TOML file and/or CLI options)."""

    name: str
    version: str
    sequence: int
    expires_in_days: float | None = None
    model_card: ModelCard = field(default_factory=ModelCard)
    arch: tuple[str, ...] = ()
    device_classes: tuple[str, ...] = ()
    # Fixed golden tolerance; None (the default) derives it from the measured spread.
    atol: float | None = None
    rtol: float | None = None
    latency_budget_p95_ms: float | None = None
    probation: Probation = field(default_factory=Probation)
    # Execution providers (or delegates) to measure golden tolerances on, as a device's
    # agent.toml names them (docs/building.md, "Tolerances per execution provider").
    measure_providers: tuple[str, ...] = ()
    # How to synthesise golden inputs, by input name (the TOML's [inputs.NAME] tables).
    input_hints: Mapping[str, InputHint] = field(default_factory=dict)
    # How the model was trained (the TOML's [training] table), for the provenance.
    training: Mapping[str, Any] = field(default_factory=dict)


def parse_target(text: str) -> RuntimeRequirement:
    """``onnxruntime``, ``litert>=2.0`` or ``tflite-runtime>=2.14,<2.15``.

    Raises:
        ConfigError: unknown runtime or malformed version range.
    """
    m = _TARGET_RE.match(text.strip())
    if not m or m.group("name") not in RUNTIMES:
        raise ConfigError(
            f"target {text!r} is not RUNTIME[>=MIN][,<MAX]; RUNTIME is one of {', '.join(RUNTIMES)}"
        )
    return RuntimeRequirement(m.group("name"), m.group("min"), m.group("max"))


def load_metadata(path: Path | None, overrides: Mapping[str, Any]) -> BuildMetadata:
    """Metadata from a small TOML file, with CLI options taking precedence.

    Raises:
        ConfigError: the file is unreadable or a field has the wrong type.
    """
    doc: dict[str, Any] = {}
    if path is not None:
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read metadata file {path}: {exc}") from None
    for key, value in overrides.items():
        if value is None:
            continue
        # "health.latency_budget_p95_ms" sets a key of a table.
        *tables, leaf = key.split(".")
        target = doc
        for table in tables:
            target = target.setdefault(table, {})
        target[leaf] = value
    _check_keys(doc)
    card = doc.pop("model_card", {})
    health = doc.pop("health", {})
    probation = health.pop("probation", {}) if isinstance(health, dict) else {}
    compat = doc.pop("compatibility", {})
    inputs = doc.pop("inputs", {})
    training = _training(doc.pop("training", {}))
    if not isinstance(inputs, dict):
        raise ConfigError("metadata [inputs] must hold one [inputs.NAME] table per input")
    try:
        meta = BuildMetadata(
            name=_req(doc, "name", str),
            version=_req(doc, "version", str),
            sequence=_req(doc, "sequence", int),
            expires_in_days=_opt(doc, "expires_in_days", float),
            model_card=ModelCard(
                description=_opt(card, "description", str) or "",
                intended_use=_opt(card, "intended_use", str) or "",
                data_sources=tuple(_opt(card, "data_sources", list) or ()),
                limitations=_opt(card, "limitations", str) or "",
                retraining_triggers=tuple(_opt(card, "retraining_triggers", list) or ()),
                owners=tuple(_opt(card, "owners", list) or ()),
                license=_opt(card, "license", str) or "",
            ),
            arch=tuple(_opt(compat, "arch", list) or ()),
            device_classes=tuple(_opt(compat, "device_classes", list) or ()),
            atol=_opt(health, "atol", float, BuildMetadata.atol),
            rtol=_opt(health, "rtol", float, BuildMetadata.rtol),
            latency_budget_p95_ms=_opt(health, "latency_budget_p95_ms", float),
            measure_providers=tuple(_opt(health, "measure_providers", list) or ()),
            probation=Probation(
                requests=_opt(probation, "requests", int, Probation.requests),
                seconds=_opt(probation, "seconds", float, Probation.seconds),
                max_error_rate=_opt(probation, "max_error_rate", float, Probation.max_error_rate),
                max_p95_ms=_opt(probation, "max_p95_ms", float),
            ),
            input_hints=parse_hints(table=inputs),
            training=training,
        )
    except (TypeError, AttributeError) as exc:
        raise ConfigError(f"metadata: {exc}") from None
    check_metadata(meta)
    return meta


# The keys a metadata file may hold, by table ("" is the top level).
_KEYS: Mapping[str, frozenset[str]] = {
    "": frozenset(
        {"name", "version", "sequence", "expires_in_days", "model_card", "health"}
        | {"compatibility", "inputs", "training"}
    ),
    "model_card": frozenset(
        {"description", "intended_use", "data_sources", "limitations"}
        | {"retraining_triggers", "owners", "license"}
    ),
    "health": frozenset(
        {"atol", "rtol", "latency_budget_p95_ms", "probation", "measure_providers"}
    ),
    "health.probation": frozenset({"requests", "seconds", "max_error_rate", "max_p95_ms"}),
    "compatibility": frozenset({"arch", "device_classes"}),
    "training": frozenset({"architecture", "data_version", "code_revision", "hyperparameters"}),
}

_Scalar = str | int | float | bool


def _training(table: Any) -> dict[str, Any]:
    """The [training] table: text fields and a flat [training.hyperparameters] table of
    scalars (JSON for the provenance: a TOML date or a nested table is refused).

    Raises:
        ConfigError: a field of the wrong type.
    """
    if not isinstance(table, dict):
        raise ConfigError("metadata [training] must be a table")
    for key in ("architecture", "data_version", "code_revision"):
        if key in table and not isinstance(table[key], str):
            raise ConfigError(f"metadata training.{key} must be a string")
    params = table.get("hyperparameters", {})
    if not isinstance(params, dict) or not all(
        isinstance(v, _Scalar) and not (isinstance(v, float) and not math.isfinite(v))
        for v in params.values()
    ):
        raise ConfigError(
            "metadata [training.hyperparameters] must map names to strings, numbers or booleans"
        )
    return dict(table)


def _check_keys(doc: Mapping[str, Any]) -> None:
    """Refuse a key the metadata does not have, suggesting the nearest one that it does.

    Raises:
        ConfigError: an unknown key (a typo would otherwise be silently ignored).
    """
    for table, known in _KEYS.items():
        section: Any = doc
        for part in filter(None, table.split(".")):
            section = section.get(part, {}) if isinstance(section, Mapping) else {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"metadata [{table}] must be a table")
        for key in sorted(set(section) - known):
            where = f"{table}.{key}" if table else key
            near = difflib.get_close_matches(key, sorted(known), n=1)
            hint = (
                f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(known))}"
            )
            raise ConfigError(f"metadata has unknown field {where!r}{hint}")


def check_metadata(meta: BuildMetadata) -> None:
    """The name and version grammars of the manifest, checked before anything is built.

    Raises:
        ConfigError: the name or version would not fit a manifest.
    """
    if not NAME_RE.fullmatch(meta.name):
        raise ConfigError(f"name {meta.name!r} is not {NAME_WHAT} (e.g. digits-int8)")
    if not HUMAN_VERSION_RE.fullmatch(meta.version):
        raise ConfigError(
            f"version {meta.version!r} is not {HUMAN_VERSION_WHAT} (e.g. 1.2.0 or 2026.11-rc1)"
        )
    if meta.sequence < 0:
        raise ConfigError(f"sequence {meta.sequence} must be 0 or more (a release counter)")


def _req(doc: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in doc:
        raise ConfigError(f"metadata needs {key!r} (in the TOML file or as --{key})")
    return _opt(doc, key, kind)


def _opt(doc: Mapping[str, Any], key: str, kind: type, default: Any = None) -> Any:
    value = doc.get(key)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"metadata {key!r} must be {kind.__name__}, not {type(value).__name__}")
    return value


def creation_time() -> datetime:
    """SOURCE_DATE_EPOCH when set (reproducible builds), else now; whole seconds, UTC.

    Raises:
        ConfigError: SOURCE_DATE_EPOCH is not an integer.
    """
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch is None:
        return datetime.now(UTC).replace(microsecond=0)
    try:
        return datetime.fromtimestamp(int(epoch), UTC)
    except ValueError:
        raise ConfigError(f"SOURCE_DATE_EPOCH={epoch!r} is not a whole number of seconds") from None
