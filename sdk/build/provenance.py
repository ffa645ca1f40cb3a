"""Where a bundle's model came from: an in-toto Statement (v1) with a SLSA provenance (v1)
predicate, carried inside the bundle as ``provenance/build.intoto.json``.

The statement is a payload member like the model: the signed manifest lists its digest,
so it is covered by the bundle's signature and cannot be changed without the bundle
failing verification; it is not signed again on its own. Its subjects are the bundle's
other payload files; its build definition names the source model (digest, where it was
read from, and the OpenSSF model signature checked, if any), the calibration, validation
and golden data, the quantization recipe and gates; its run details name the builder, the
tool versions and the gate results. Normative description: docs/bundle-format.md, section 9.

Encoding is canonical (sorted keys, no insignificant whitespace, UTF-8, one trailing
newline) and holds no wall-clock time but the bundle's ``created`` (SOURCE_DATE_EPOCH),
so two builds with the same inputs stay byte-identical.
"""

from __future__ import annotations

import getpass
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.bundle.manifest import format_time
from agent.errors import ConfigError
from agent.plumbing.files import file_sha256
from sdk.build.oms import UpstreamSignature

__all__ = [
    "BUILD_TYPE",
    "OMS_SIGNATURE_PATH",
    "PREDICATE_TYPE",
    "PROVENANCE_PATH",
    "STATEMENT_TYPE",
    "BuildInputs",
    "builder_id",
    "digest_path",
    "parse_statement",
    "statement_bytes",
    "subjects_of",
]

PROVENANCE_PATH = "provenance/build.intoto.json"
OMS_SIGNATURE_PATH = "provenance/model.sig"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
BUILD_TYPE = "urn:edgeship:build:bundle:v1"  # specified in docs/bundle-format.md section 9

# The packages whose versions decide what a build produces.
_TOOLS = (
    "edgeship",
    "numpy",
    "onnx",
    "onnxruntime",
    "ai-edge-litert",
    "litert-quantizer",
    "model-signing",
)


@dataclass(frozen=True)
class BuildInputs:
    """What a build read and how it was asked to run, for its provenance.

    ``model_source`` is the model's path or URI as the user gave it; ``data`` maps a role
    (``calibration``, ``validation``, ``golden``) to the path given for it; ``parameters``
    are the build's own options (quantization scheme and recipe, gates, targets); and
    ``training`` is what the user's metadata says about how the model was trained.
    """

    model: Path
    model_source: str
    data: Mapping[str, Path] = field(default_factory=dict)
    parameters: Mapping[str, Any] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)
    model_signature: UpstreamSignature | None = None
    builder: str = ""


def builder_id() -> str:
    """Who builds: ``EDGESHIP_BUILDER_ID`` (a CI job's URI, for instance), else
    ``local:USER@HOST``."""
    explicit = os.environ.get("EDGESHIP_BUILDER_ID")
    if explicit:
        return explicit
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry, as in some containers
        user = "unknown"
    return f"local:{user}@{socket.gethostname()}"


def digest_path(path: Path) -> str:
    """sha256 of a file; of a folder, sha256 over its sorted ``<sha256>  <relative path>``
    lines (files only, as ``sha256sum`` prints them), so renaming or changing any file in
    a data folder changes the digest.

    Raises:
        ConfigError: the path cannot be read.
    """
    try:
        if path.is_dir():
            lines = sorted(
                f"{file_sha256(p)}  {p.relative_to(path).as_posix()}\n"
                for p in path.rglob("*")
                if p.is_file()
            )
            return hashlib.sha256("".join(lines).encode()).hexdigest()
        return file_sha256(path)
    except OSError as exc:
        raise ConfigError(f"cannot read {path} for the provenance: {exc.strerror}") from None


def statement_bytes(
    inputs: BuildInputs,
    *,
    subjects: Mapping[str, Path],
    created: datetime,
    results: Mapping[str, Any],
) -> bytes:
    """The canonical in-toto statement for one build.

    ``subjects`` are the bundle's payload files by member path (their plaintext, when the
    bundle is encrypted); ``results`` is what the build measured (gate results).

    Raises:
        ConfigError: an input cannot be read, or a value is not JSON.
    """
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [
            {"name": name, "digest": {"sha256": digest_path(path)}}
            for name, path in sorted(subjects.items())
        ],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "model": inputs.model_source,
                    **{role: str(p) for role, p in sorted(inputs.data.items())},
                    **dict(inputs.parameters),
                    **({"training": dict(inputs.training)} if inputs.training else {}),
                },
                "internalParameters": {"python": platform.python_version()},
                "resolvedDependencies": _dependencies(inputs),
            },
            "runDetails": {
                "builder": {"id": inputs.builder or builder_id(), "version": _tool_versions()},
                "metadata": {"startedOn": format_time(created)},
                "byproducts": [
                    {"name": "build-results", "annotations": dict(results)},
                ],
            },
        },
    }
    try:
        text = json.dumps(
            statement, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the build's provenance is not JSON: {exc}") from None
    return text.encode("utf-8") + b"\n"


def _dependencies(inputs: BuildInputs) -> list[dict[str, Any]]:
    model: dict[str, Any] = {
        "name": "model",
        "digest": {"sha256": digest_path(inputs.model)},
        **_where(inputs.model_source),
    }
    if inputs.model_signature is not None:
        model["annotations"] = {"signature": inputs.model_signature.to_json()}
    data = [
        {"name": role, "digest": {"sha256": digest_path(path)}, **_where(str(path))}
        for role, path in sorted(inputs.data.items())
    ]
    return [model, *data]


def _where(source: str) -> dict[str, str]:
    """A URI stays a URI; a local path becomes a ``file:`` URI of the path as given
    (relative paths stay relative: the build's folder is not part of its identity)."""
    if "://" in source:
        return {"uri": source}
    return {"uri": "file:" + Path(source).as_posix()}


def _tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def parse_statement(data: bytes) -> dict[str, Any]:
    """A provenance member as JSON, for ``inspect`` and ``verify --json``.

    Raises:
        ConfigError: not a UTF-8 JSON in-toto statement with a SLSA provenance predicate.
    """
    try:
        statement = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{PROVENANCE_PATH} is not UTF-8 JSON") from None
    if (
        not isinstance(statement, dict)
        or statement.get("_type") != STATEMENT_TYPE
        or statement.get("predicateType") != PREDICATE_TYPE
    ):
        raise ConfigError(f"{PROVENANCE_PATH} is not an in-toto statement with SLSA provenance")
    return statement


def subjects_of(statement: Mapping[str, Any]) -> Sequence[tuple[str, str]]:
    """(name, sha256) of every subject, as the statement lists them."""
    return [(s["name"], s["digest"]["sha256"]) for s in statement.get("subject", [])]
