"""Golden tolerances per execution provider, measured on the build machine.

A device may serve on an accelerator (an onnxruntime execution provider, a TFLite
delegate) whose kernels round differently from the path the expected outputs came from.
Asked to (``edgeship build --measure-provider NAME``), the build runs the golden cases
through the bundled model on each named provider, as a device loads it, measures each
output's largest deviation from the expected outputs, and records a tolerance that admits
it with a margin (:func:`provider_tolerance`) in the manifest's
``health.provider_tolerances``; the agent's health gate applies it on that provider.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.bundle.manifest import Health, Tolerance, is_provider_name
from agent.errors import ConfigError, InferenceError, RuntimeUnavailableError
from sdk.build._cases import request_elements
from sdk.build.golden import MAX_SHARE, Golden, max_deviation, run_cases
from sdk.build.model_io import open_model
from sdk.errors import BuildError, GateError

__all__ = [
    "MARGIN",
    "ProviderTolerances",
    "check_providers",
    "measure_providers",
    "provider_tolerance",
]

# The measured deviation is doubled: a device's copy of the provider (another CPU
# generation, another build of its plugin) rounds differently from the build machine's
# by about as much again as the build machine's differs from the expected outputs.
MARGIN = 2.0
_OPTION = "--measure-provider"


@dataclass(frozen=True)
class ProviderTolerances:
    """What the measurement gives: ``tables`` for the manifest (provider -> output ->
    tolerance) and ``details`` for the build report (``evaluation.golden.providers``)."""

    tables: Mapping[str, Mapping[str, Tolerance]]
    details: Mapping[str, Any]


def check_providers(names: Sequence[str], model_format: str, runtime: str) -> tuple[str, ...]:
    """The providers to measure, once each, checked before the build's long steps.

    Raises:
        ConfigError: a name a device could not list for this model format, or an
            execution provider this machine's onnxruntime does not have.
    """
    for name in names:
        if not isinstance(name, str) or not is_provider_name(name, model_format):
            what = (
                "an onnxruntime execution provider (such as OpenVINOExecutionProvider)"
                if model_format == "onnx"
                else "xnnpack, cpu or the absolute path of a delegate library"
            )
            raise ConfigError(f"{_OPTION} {name!r}: this {model_format} model needs {what}")
    if runtime == "onnxruntime" and names:
        import onnxruntime  # noqa: PLC0415 - only when asked to measure

        available = onnxruntime.get_available_providers()
        missing = [n for n in names if n not in available]
        if missing:
            raise ConfigError(
                f"{_OPTION} {', '.join(missing)}: not available on this build machine (its"
                f" onnxruntime has {', '.join(available)}); build where the provider is"
                " installed (onnxruntime-openvino for OpenVINOExecutionProvider, ...)"
            )
    return tuple(dict.fromkeys(names))


def provider_tolerance(
    deviation: float, plain: Tolerance, *, value_range: float, floor: float
) -> Tolerance | None:
    """An output's tolerance on a provider whose largest deviation from the expected
    outputs is ``deviation``; None when the provider computes something else. Pure.

    ``atol = max(plain.atol, min(MARGIN x deviation + floor, MAX_SHARE x range))`` with
    the plain tolerance's ``rtol``: never tighter than what every device is held to, a
    ``floor`` (one output step for int8 outputs, float noise otherwise: see
    :func:`sdk.build.golden.output_tolerance`) above the doubled deviation, and never
    wider than 5% of the output's range, beyond which a broken model could pass. A
    deviation beyond both that cap and the plain tolerance is not admitted at all.
    """
    cap = MAX_SHARE * value_range
    if not deviation <= max(cap, plain.atol):  # NaN and infinity included
        return None
    return Tolerance(atol=max(plain.atol, min(MARGIN * deviation + floor, cap)), rtol=plain.rtol)


def measure_providers(
    bundled: Path,
    golden: Golden,
    health: Health,
    *,
    runtime: str,
    providers: Sequence[str],
    report: Callable[[str, int, int], None] | None = None,
) -> ProviderTolerances:
    """Run ``golden``'s cases through ``bundled`` on each of ``providers`` and set a
    tolerance per output, from the one ``health`` gives it on any provider. ``report``
    is called with ``("provider tolerances", done, total)`` as providers are measured.

    Raises:
        ConfigError: a provider is not available here or fails to start.
        BuildError: the bundled model fails on a provider.
        GateError: a provider's outputs deviate beyond what may be admitted: nothing is
            recorded and no bundle is written.
    """
    outputs: Mapping[str, Mapping[str, Any]] = golden.details["outputs"]
    plain = health.tolerances_on(None)
    tables: dict[str, dict[str, Tolerance]] = {}
    details: dict[str, Any] = {}
    for n, provider in enumerate(providers):
        if report is not None:
            report("provider tolerances", n, len(providers))
        deviations = _deviations(bundled, golden, runtime, provider)
        table: dict[str, Tolerance] = {}
        measured: dict[str, Any] = {}
        for name, how in outputs.items():
            deviation, cap = deviations[name], MAX_SHARE * how["range"]
            allowed = plain.get(name, health.tolerance)
            tolerance = provider_tolerance(
                deviation, allowed, value_range=how["range"], floor=how["floor"]
            )
            if tolerance is None:
                raise GateError(
                    f"on {provider}, output {name!r} of the bundled model deviates from the"
                    f" expected outputs by {deviation:.6g} on the golden cases, beyond"
                    f" {MAX_SHARE:.0%} of its range ({cap:.6g}) and its tolerance"
                    f" ({allowed.atol:.6g}): that provider computes something else, and a"
                    f" device would fall back from it; build without {_OPTION} {provider},"
                    " or find out why it differs"
                )
            table[name] = tolerance
            measured[name] = {"deviation": deviation, "atol": tolerance.atol, "cap": cap}
        tables[provider] = table
        details[provider] = {"runtime": runtime, "outputs": measured}
    if report is not None:
        report("provider tolerances", len(providers), len(providers))
    return ProviderTolerances(
        tables=tables,
        details={
            "method": "per output: atol = max(plain atol, min(margin x deviation + floor,"
            " max_share x range)); deviation = the largest |output - expected| over the"
            " golden cases on that provider",
            "margin": MARGIN,
            "measured": details,
        },
    )


def _deviations(bundled: Path, golden: Golden, runtime: str, provider: str) -> dict[str, float]:
    """Per output, the largest |difference| from the expected outputs on ``provider``.

    Raises:
        ConfigError: the provider is not available or fails to start.
        BuildError: the model fails on the provider.
    """
    try:
        model = open_model(
            bundled,
            runtime=runtime,
            threads=0,
            request_elements=request_elements(golden.cases[0]),
            provider=provider,
        )
    except (ConfigError, RuntimeUnavailableError) as exc:
        raise ConfigError(f"{_OPTION} {provider}: {exc}") from None
    with model:
        try:
            answers = run_cases(model, golden.cases)
        except InferenceError as exc:
            raise BuildError(f"the bundled model fails on {provider}: {exc}") from None
    return max_deviation(golden.expected, answers)
