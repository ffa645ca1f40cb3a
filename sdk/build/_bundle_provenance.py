"""The build's provenance steps: check the source model's OpenSSF signature before anything
reads the model, then write the provenance statement (and, asked for, an OMS signature of
the bundled model) into the payload before it is encrypted and signed.

The documents themselves are :mod:`sdk.build.provenance` and :mod:`sdk.build.oms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from agent.bundle.manifest import Quantization, RuntimeRequirement
from agent.errors import ConfigError
from sdk.build._bundle_quant import QuantizeOptions
from sdk.build._metadata import BuildMetadata
from sdk.build.oms import UpstreamSignature, sign_model, verify_model_signature
from sdk.build.provenance import (
    OMS_SIGNATURE_PATH,
    PROVENANCE_PATH,
    BuildInputs,
    statement_bytes,
)

__all__ = ["Provenance", "ProvenanceOptions", "start_provenance"]

# What the provenance repeats of the evaluation: the outcome, not every measurement; and
# the tolerances measured per execution provider (evaluation.golden.providers), a gate too.
_RESULTS = ("passed", "gates", "accuracy_drop_points", "fidelity", "vs_fp32")


@dataclass(frozen=True)
class ProvenanceOptions:
    """Where the model came from and who vouches for it, beyond the bundle's signature.

    ``model_source``: the model's origin as the user names it (a registry URI, say);
    default the path it was read from. ``model_signature`` with ``model_key`` (a PEM
    public key) or ``model_certificates`` (the chain its signing certificate must lead
    to): an OpenSSF model signature the source model must carry. ``oms_key`` (an ECDSA
    private key file) and ``oms_password``: also sign the bundled model with OMS.
    ``builder``: who builds (default :func:`sdk.build.provenance.builder_id`).
    """

    model_source: str | None = None
    model_signature: Path | None = None
    model_key: Path | None = None
    model_certificates: tuple[Path, ...] = ()
    oms_key: Path | None = None
    oms_password: bytes | None = None
    builder: str | None = None


@dataclass(frozen=True)
class Provenance:
    """What a build's provenance knows before the build starts; :meth:`members` writes it
    once the payload exists."""

    options: ProvenanceOptions
    model: Path
    upstream: UpstreamSignature | None
    data: Mapping[str, Path]
    metadata: BuildMetadata
    created: datetime

    def members(  # noqa: PLR0917  (bound in order by functools.partial)
        self,
        stage: Path,
        model_member: str,
        runtimes: tuple[RuntimeRequirement, ...],
        quantization: Quantization,
        evaluation: Mapping[str, Any],
        payload: Mapping[str, Path],
    ) -> dict[str, Path]:
        """Write the OMS signature of the bundled model (when asked) and the provenance
        statement under ``stage``; return them by member path, to join the payload.

        Raises:
            ConfigError: an input cannot be read.
            ModelSignatureError, BuildError: the OMS signature cannot be written.
        """
        (stage / "provenance").mkdir()
        members: dict[str, Path] = {}
        if self.options.oms_key is not None:
            members[OMS_SIGNATURE_PATH] = stage / OMS_SIGNATURE_PATH
            sign_model(
                payload[model_member],
                members[OMS_SIGNATURE_PATH],
                private_key=self.options.oms_key,
                password=self.options.oms_password,
            )
        meta = self.metadata
        inputs = BuildInputs(
            model=self.model,
            model_source=self.options.model_source or str(self.model),
            data=self.data,
            parameters={
                "bundle": {"name": meta.name, "version": meta.version, "sequence": meta.sequence},
                "targets": [asdict(r) for r in runtimes],
                "quantization": {
                    "scheme": quantization.scheme,
                    "recipe": {k: v for k, v in quantization.details.items() if k != "tool_log"},
                },
            },
            training=meta.training,
            model_signature=self.upstream,
            builder=self.options.builder or "",
        )
        results = {k: evaluation[k] for k in _RESULTS if k in evaluation}
        if "providers" in evaluation.get("golden", {}):
            results["providers"] = evaluation["golden"]["providers"]
        statement = statement_bytes(
            inputs, subjects={**payload, **members}, created=self.created, results=results
        )
        (stage / PROVENANCE_PATH).write_bytes(statement)
        return {**members, PROVENANCE_PATH: stage / PROVENANCE_PATH}


def start_provenance(  # noqa: PLR0917  (the build's own arguments, in its order)
    model: Path,
    options: ProvenanceOptions | None,
    quantize: QuantizeOptions,
    golden: Path | None,
    metadata: BuildMetadata,
    created: datetime,
    encrypted: bool,
) -> Provenance:
    """Check the source model's OpenSSF signature (when the options name one) before
    anything reads the model; gather what the provenance will say.

    Raises:
        ModelSignatureError: the signature does not verify.
        ConfigError: a signer without a signature, or the other way round; ``--oms``
            for an encrypted bundle.
        BuildError: ``model-signing`` is not installed.
    """
    options = options or ProvenanceOptions()
    if options.oms_key is not None and encrypted:
        raise ConfigError("--oms signs a model anyone can extract; an encrypted bundle's cannot be")
    data = {"calibration": quantize.calibration, "validation": quantize.validation}
    data["golden"] = golden
    return Provenance(
        options=options,
        model=model,
        upstream=_check_source_signature(model, options),
        data={role: path for role, path in data.items() if path is not None},
        metadata=metadata,
        created=created,
    )


def _check_source_signature(model: Path, options: ProvenanceOptions) -> UpstreamSignature | None:
    """Verify the source model's signature, when the options name one.

    Raises:
        ModelSignatureError: it does not verify.
        BuildError: a signer without a signature, or the other way round; no
            ``model-signing`` installed.
    """
    signer_given = options.model_key is not None or bool(options.model_certificates)
    if options.model_signature is None:
        if signer_given:
            raise ConfigError("--model-key/--model-certificate need --model-signature SIG")
        return None
    if not signer_given:
        raise ConfigError("--model-signature needs the signer: --model-key or --model-certificate")
    return verify_model_signature(
        model,
        options.model_signature,
        key=options.model_key,
        certificate_chain=options.model_certificates,
    )
