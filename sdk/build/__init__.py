"""The build side: turn a trained model into a signed, quantized bundle.

    from sdk.build import BuildMetadata, QuantizeOptions, build_bundle, load_signing_key

    key = load_signing_key(Path("release.key"), b"passphrase")
    result = build_bundle(
        Path("model.onnx"),
        Path("model.edgeship"),
        metadata=BuildMetadata(name="digits", version="1.0", sequence=1),
        keys=[key],
        quantize=QuantizeOptions("static", calibration=Path("calibration.npz")),
    )

Golden cases are exact requests (a cases file keyed ``<case>/<input>``, one data-set
sample per case, or synthesised with :class:`InputHint` hints in
``BuildMetadata.input_hints``); see docs/building.md.

The steps are usable on their own: :func:`quantize`, :func:`evaluate` (with
:class:`Gates`), :func:`derive_golden`, :func:`load_dataset`, :func:`read_signature`.
Every model is run through the agent's own runtime layer (:func:`open_model`), so what
the build measures is what a device computes.
"""

from sdk.build._bundle import BuildResult, Progress, QuantizeOptions, build_bundle
from sdk.build._bundle_provenance import ProvenanceOptions
from sdk.build._cases import InputHint
from sdk.build._evaluate import EvaluationReport, Gates, evaluate
from sdk.build._metadata import BuildMetadata, creation_time, load_metadata, parse_target
from sdk.build._quantize import QuantizationResult, Scheme, quantize
from sdk.build.datasets import Dataset, load_dataset
from sdk.build.drift_reference import drift_reference
from sdk.build.golden import Golden, derive_golden
from sdk.build.keys import SigningKey, generate_key, load_signing_key, sign_envelope
from sdk.build.model_io import open_model, read_signature, run_dataset

__all__ = [
    "BuildMetadata",
    "BuildResult",
    "Dataset",
    "EvaluationReport",
    "Gates",
    "Golden",
    "InputHint",
    "Progress",
    "ProvenanceOptions",
    "QuantizationResult",
    "QuantizeOptions",
    "Scheme",
    "SigningKey",
    "build_bundle",
    "creation_time",
    "derive_golden",
    "drift_reference",
    "evaluate",
    "generate_key",
    "load_dataset",
    "load_metadata",
    "load_signing_key",
    "open_model",
    "parse_target",
    "quantize",
    "read_signature",
    "run_dataset",
    "sign_envelope",
]
