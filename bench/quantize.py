"""fp32 vs int8: size, latency and accuracy for the digits MLP and the 224x224 conv net.

Prints one JSON document. Ratios are int8 / fp32 measured in the same run, with the two
models' runs interleaved (sdk.build.evaluate, through the agent's own runtime layer, with
nearest-rank percentiles as on a device), so machine load affects both alike. Targets
(issue 5): conv int8 p50 latency <= 0.45x fp32 and size <= 0.30x; digits accuracy drop
<= 0.5 points.

    python bench/quantize.py [--runs-conv 50] [--runs-digits 200]
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._machine import machine
from sdk.build import EvaluationReport, evaluate, load_dataset, quantize

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TARGETS = {"conv_p50_ratio": 0.45, "conv_size_ratio": 0.30, "digits_accuracy_drop_points": 0.5}


def _ratios(report: EvaluationReport) -> dict[str, Any]:
    o, q = report.original, report.quantized

    def p50(threads: int) -> dict[str, float | None]:
        a, b = o.p50_ms(threads), q.p50_ms(threads)
        return {
            "fp32_p50_ms": a,
            "int8_p50_ms": b,
            "ratio": None if a is None or b is None else round(b / a, 3),
        }

    return {
        "size_bytes": {"fp32": o.size_bytes, "int8": q.size_bytes},
        "size_ratio": round(q.size_bytes / o.size_bytes, 3),
        "latency_1_thread": p50(1),
        "latency_default_threads": p50(0),
        "accuracy": {"fp32": o.accuracy, "int8": q.accuracy},
        "accuracy_drop_points": report.accuracy_drop_points,
        "agreement": report.fidelity.agreement,
        "mean_cosine": round(report.fidelity.mean_cosine, 6),
    }


def _case(
    model: Path, calibration: Path, validation: Path, out: Path, runs: int
) -> tuple[dict[str, Any], Mapping[str, Any]]:
    """The case's figures, and the machine the evaluation ran on."""
    start = time.perf_counter()
    result = quantize(model, out, scheme="static", calibration=load_dataset(calibration))
    quantize_s = time.perf_counter() - start
    report = evaluate(model, result.path, load_dataset(validation), latency_runs=runs)
    figures = {
        **_ratios(report),
        "per_channel": result.details.get("per_channel"),
        "quantize_seconds": round(quantize_s, 2),
    }
    return figures, report.environment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-conv", type=int, default=50)
    parser.add_argument("--runs-digits", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        work = Path(tmp)
        digits = runpy.run_path(str(EXAMPLES / "digits" / "train.py"))["build"](work / "digits")
        conv = runpy.run_path(str(EXAMPLES / "conv" / "conv.py"))["build"](work / "conv")
        cases = {
            "digits_onnx": _case(
                digits["onnx"],
                digits["calibration"],
                digits["validation"],
                work / "digits.int8.onnx",
                args.runs_digits,
            ),
            "digits_tflite": _case(
                digits["tflite"],
                digits["calibration"],
                digits["validation"],
                work / "digits.int8.tflite",
                args.runs_digits,
            ),
            "conv_onnx_224": _case(
                conv["onnx"],
                conv["calibration"],
                conv["validation"],
                work / "conv.int8.onnx",
                args.runs_conv,
            ),
        }
    results = {name: figures for name, (figures, _) in cases.items()}
    c = results["conv_onnx_224"]
    drops = [results[k]["accuracy_drop_points"] for k in ("digits_onnx", "digits_tflite")]
    checks = {
        "conv_p50_ratio_1_thread": c["latency_1_thread"]["ratio"] <= TARGETS["conv_p50_ratio"],
        "conv_p50_ratio_default_threads": c["latency_default_threads"]["ratio"]
        <= TARGETS["conv_p50_ratio"],
        "conv_size_ratio": c["size_ratio"] <= TARGETS["conv_size_ratio"],
        "digits_accuracy_drop": max(drops) <= TARGETS["digits_accuracy_drop_points"],
    }
    print(
        json.dumps(
            {
                "benchmark": "quantize",
                "scheme": "static int8",
                "machine": machine(),
                "targets": TARGETS,
                "results": results,
                "checks": checks,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
