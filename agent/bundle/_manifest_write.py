"""The manifest's JSON form of its nested records (see :meth:`Manifest.to_json`)."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

    from agent.bundle.manifest import DriftReference, Encryption, Health, TensorSpec, Tolerance

__all__ = ["b64", "drift_json", "encryption_json", "health_json", "tensor_json", "tolerance_json"]


def tensor_json(t: TensorSpec) -> dict[str, Any]:
    out: dict[str, Any] = {"name": t.name, "dtype": t.dtype, "shape": list(t.shape)}
    out["quantization"] = (
        {"scale": t.quantization.scale, "zero_point": t.quantization.zero_point}
        if t.quantization
        else None
    )
    return out


def tolerance_json(t: Tolerance) -> dict[str, float]:
    return {"atol": t.atol, "rtol": t.rtol}


def tolerances_json(tolerances: Mapping[str, Tolerance]) -> dict[str, dict[str, float]]:
    return {name: tolerance_json(t) for name, t in sorted(tolerances.items())}


def health_json(h: Health, *, cases: bool, provider_tolerances: bool) -> dict[str, Any]:
    """The health section; ``cases`` and ``provider_tolerances`` say whether to write the
    fields of that name (left out of older minors, see ``Manifest._model_json``)."""
    out: dict[str, Any] = {
        "golden_inputs": h.golden_inputs,
        "expected_outputs": h.expected_outputs,
        "tolerance": tolerance_json(h.tolerance),
        "latency_budget_p95_ms": h.latency_budget_p95_ms,
        "probation": {
            "requests": h.probation.requests,
            "seconds": h.probation.seconds,
            "max_error_rate": h.probation.max_error_rate,
            "max_p95_ms": h.probation.max_p95_ms,
        },
    }
    if cases:
        out["cases"] = (
            None
            if h.cases is None
            else {
                "count": h.cases.count,
                "inputs": h.cases.inputs,
                "expected": h.cases.expected,
                "tolerances": tolerances_json(h.cases.tolerances),
            }
        )
    if provider_tolerances:
        out["provider_tolerances"] = {
            provider: tolerances_json(table)
            for provider, table in sorted(h.provider_tolerances.items())
        }
    return out


def drift_json(d: DriftReference | None) -> dict[str, Any] | None:
    if d is None:
        return None
    return {
        "sample_count": d.sample_count,
        "groups": dict(d.groups),
        "features": [
            {
                "input": f.input,
                "index": f.index,
                "edges": list(f.edges),
                "fractions": list(f.fractions),
                "mean": f.mean,
                "std": f.std,
            }
            for f in d.features
        ],
    }


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def encryption_json(e: Encryption) -> dict[str, Any]:
    return {
        "scheme": e.scheme,
        "recipients": [
            {
                "key_id": r.key_id,
                "ephemeral_public": b64(r.ephemeral_public),
                "wrapped_key": b64(r.wrapped_key),
            }
            for r in e.recipients
        ],
        "nonces": {path: b64(n) for path, n in sorted(e.nonces.items())},
    }
