"""How ``edgeship inspect`` shows a bundle to people: the manifest, the model card, the
files and the build's evaluation, as rich tables with numbers people can read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table

from agent.bundle.manifest import Manifest, format_time

__all__ = ["manifest_tables"]


def manifest_tables(manifest: Manifest, title: str) -> list[Table]:
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
        ("quantization", _quantization_text(manifest)),
        (
            "tolerance",
            f"atol {manifest.health.tolerance.atol:.4g}, rtol {manifest.health.tolerance.rtol:.4g}",
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
                f"scale {s.quantization.scale:.4g} zp {s.quantization.zero_point}"
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


def _quantization_text(manifest: Manifest) -> str:
    q = manifest.quantization
    coverage = q.details.get("coverage")
    if not isinstance(coverage, dict) or "quantized_share" not in coverage:
        return q.scheme
    accepted = ", accepted" if coverage.get("accepted_unquantized") else ""
    return f"{q.scheme} ({coverage['quantized_share']:.0%} of float weights int8{accepted})"


def _num(value: object) -> str:
    """A measured number as people read it: 4 significant digits, not 17."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


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
            table.add_row("top-1 accuracy", _num(original["accuracy"]), _num(bundled["accuracy"]))
        for a, b in zip(original.get("latency", []), bundled.get("latency", []), strict=False):
            label = f"p50 / p95 ms ({a.get('threads') or 'default'} threads)"
            table.add_row(
                label,
                f"{_num(a.get('p50_ms'))} / {_num(a.get('p95_ms'))}",
                f"{_num(b.get('p50_ms'))} / {_num(b.get('p95_ms'))}",
            )
    fidelity = ev.get("fidelity")
    if isinstance(fidelity, dict):
        for key, value in fidelity.items():
            table.add_row(f"fidelity: {key}", "", _num(value))
    for gate in ev.get("gates", []):
        verdict = "passed" if gate.get("passed") else "FAILED"
        table.add_row(
            f"gate {gate.get('name')}",
            f"limit {_num(gate.get('limit'))} {gate.get('unit')}",
            f"{_num(gate.get('measured'))} ({verdict}, margin {_num(gate.get('margin'))})",
        )
    vs = ev.get("vs_fp32")
    if isinstance(vs, dict):
        limits = vs.get("limits") or {}
        for what in ("size", "latency"):
            table.add_row(
                f"{what} vs fp32 (this machine)",
                f"limit {_num(limits.get(f'max_{what}_ratio'))}x",
                f"{_num(vs.get(f'{what}_ratio'))}x",
            )
    golden = ev.get("golden")
    outputs = golden.get("outputs") if isinstance(golden, dict) else None
    for name, how in (outputs or {}).items():
        if isinstance(how, dict):
            table.add_row(
                f"golden tolerance: {name}",
                f"range {how.get('range', 0):.4g}",
                f"atol {how.get('atol', 0):.4g} ({how.get('share_of_range', 0):.2%} of range)",
            )
    return table
