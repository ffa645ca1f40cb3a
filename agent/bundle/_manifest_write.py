"""The manifest's JSON form of its nested records (see :meth:`Manifest.to_json`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.bundle.manifest import DriftReference, TensorSpec, Tolerance

__all__ = ["drift_json", "tensor_json", "tolerance_json"]


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
