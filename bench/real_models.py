"""Real pretrained models from package wheels, built as they come: one report per model and
scheme. Prints one JSON document with the machine (bench/_machine.py).

Per build: the build time, the recipe the quantizer chose, what it quantized, size and p50
latency against fp32 on this machine (the build's own interleaved measurement), whether
the default "not larger, not slower than fp32" gates pass, the golden tolerance of each
output as a share of its range, and whether the device's real health gate (the agent's
child process) catches the model damaged two ways: 2% of every weight tensor moved by one
standard deviation, and the largest layer zeroed (each quantized like the original).

Models (tests/support/wheel_models.py: package, version, licence, sha256): silero-vad's
16 kHz ONNX (streaming: state with the batch on axis 1, scalar sample rate) and the
PaddleOCR PP-OCRv4 text detector from rapidocr-onnxruntime (dynamic height and width,
weights in Constant nodes), on pictures of text lines (tests/support/real_inputs.py).

    python bench/real_models.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bundle import verify_bundle
from agent.bundle.signing import TrustPolicy
from agent.errors import EdgeshipError, HealthCheckError
from agent.install import ChildGate, check_in_child
from bench._machine import machine
from sdk.build import BuildMetadata, QuantizeOptions, build_bundle, generate_key, quantize
from sdk.build._cost import cost_failures
from sdk.build.datasets import Dataset
from tests.support.mutations import perturb_weights, zero_largest_layer
from tests.support.real_inputs import silero_stream_cases, text_pages
from tests.support.wheel_models import RAPIDOCR_DET, SILERO_VAD, WheelModel, fetch

MODELS: dict[str, tuple[WheelModel, tuple[str, ...]]] = {
    "silero_vad_16k": (SILERO_VAD, ("none", "dynamic")),
    "ppocr_v4_det": (RAPIDOCR_DET, ("none", "dynamic", "static")),
}


def _cases(name: str, model: Path) -> dict[str, np.ndarray]:
    if name == "silero_vad_16k":
        return silero_stream_cases(model, 4)
    return text_pages(4, 96, 160)


def _caught(
    model: Path, bundle_dir: Path, manifest: Any, scheme: str, calib: Dataset | None
) -> dict[str, bool | str]:
    """Whether the device's gate fails each damaged copy of ``model``."""
    caught: dict[str, bool | str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mutate in (perturb_weights, zero_largest_layer):
            work = Path(tmp) / mutate.__name__
            shutil.copytree(bundle_dir, work)
            damaged = mutate(model, Path(tmp) / f"{mutate.__name__}.onnx")
            try:
                if scheme != "none":
                    damaged = quantize(
                        damaged,
                        Path(tmp) / "q.onnx",
                        scheme=scheme,  # type: ignore[arg-type]
                        calibration=calib,
                    ).path
            except EdgeshipError as exc:
                caught[mutate.__name__] = f"not built: {type(exc).__name__}"
                continue
            shutil.copyfile(damaged, work / manifest.model.file)
            try:
                check_in_child(manifest, work, ChildGate("onnxruntime"), runs=1)
                caught[mutate.__name__] = False
            except HealthCheckError:
                caught[mutate.__name__] = True
    return caught


def _report(name: str, wheel: WheelModel, scheme: str, work: Path, key: Any) -> dict[str, Any]:
    model = fetch(wheel)
    cases = _cases(name, model)
    np.savez(work / "cases.npz", **cases)
    calib = None
    if scheme == "static":
        calib = Dataset({"x": np.concatenate([v for k, v in cases.items()])})
        np.save(work / "calib.npy", calib.inputs["x"])
    options = QuantizeOptions(
        scheme,
        calibration=work / "calib.npy" if calib is not None else None,
        max_size_ratio=None,
        max_latency_ratio=None,
    )
    out = work / f"{name}-{scheme}.edgeship"
    start = time.perf_counter()
    try:
        result = build_bundle(
            model,
            out,
            metadata=BuildMetadata(name=name, version=wheel.version, sequence=1),
            keys=[key],
            golden_inputs=work / "cases.npz",
            quantize=options,
        )
    except EdgeshipError as exc:
        return {"scheme": scheme, "refused": f"{type(exc).__name__}: {exc}"}
    seconds = time.perf_counter() - start
    extracted = work / f"x-{scheme}"
    with out.open("rb") as f:
        verify_bundle(
            f, TrustPolicy.of([key.public]), now=result.manifest.created, extract_to=extracted
        )
    m = result.manifest
    ev = m.evaluation or {}
    vs = ev.get("vs_fp32")
    details = dict(m.quantization.details)
    golden = ev.get("golden", {}).get("outputs", {})
    return {
        "scheme": scheme,
        "build_seconds": round(seconds, 2),
        "recipe": {
            k: details.get(k)
            for k in ("format", "per_channel", "activation_type", "op_types", "folded_constants")
            if k in details
        },
        "recipe_search": details.get("recipe_search"),
        "coverage": details.get("coverage"),
        "size_ratio": None if vs is None else vs["size_ratio"],
        "latency_ratio": None if vs is None else vs["latency_by_threads"],
        "default_fp32_gates_pass": None if vs is None else not cost_failures(vs, 1.0, 1.0),
        "golden": {
            o: {
                "tolerance_share_of_range": h["share_of_range"],
                "qdiff_share_of_range": h["qdiff"] / h["range"] if h["range"] else None,
            }
            for o, h in golden.items()
        },
        "mutation_caught": _caught(model, extracted, m, scheme, calib),
    }


def main() -> None:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="edgeship-real-") as tmp:
        work = Path(tmp)
        key = generate_key(work / "release", b"bench")
        for name, (wheel, schemes) in MODELS.items():
            results[name] = {
                "package": f"{wheel.package}=={wheel.version}",
                "licence": wheel.licence,
                "model": wheel.member,
                "sha256": wheel.sha256,
                "builds": [],
            }
            for scheme in schemes:
                d = work / f"{name}-{scheme}"
                d.mkdir()
                results[name]["builds"].append(_report(name, wheel, scheme, d, key))
    print(
        json.dumps({"benchmark": "real_models", "machine": machine(), "results": results}, indent=2)
    )


if __name__ == "__main__":
    main()
