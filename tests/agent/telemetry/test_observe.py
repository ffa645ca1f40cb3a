"""Which model output telemetry watches, and how it summarises it."""

from __future__ import annotations

import pytest

from agent.bundle.manifest import ModelSpec, QuantParams, TensorSpec
from agent.telemetry._observe import OutputKind, watched_output
from tests.support.bundles import make_manifest

X = TensorSpec("x", "float32", (None, 64))
LABEL = TensorSpec("label", "int64", (None,))
PROBS = TensorSpec("probabilities", "float32", (None, 10))
VALUE = TensorSpec("value", "float32", (None, 1))
LOGITS_INT8 = TensorSpec("logits", "int8", (None, 10), QuantParams(0.1, 0))


def _model(*outputs: TensorSpec, scores: str | None = None) -> ModelSpec:
    return ModelSpec("onnx", "model/model.onnx", (X,), outputs, scores_output=scores)


@pytest.mark.parametrize(
    ("model", "kind", "watched"),
    [
        # The manifest names it (schema 1.1): even where the shapes say nothing.
        (_model(VALUE, TensorSpec("p", "float32", (None, None)), scores="p"), "auto", ("p", True)),
        # Older bundles: the first output shaped like class scores, not the label before it.
        (_model(LABEL, PROBS), "auto", ("probabilities", True)),
        (_model(VALUE, LOGITS_INT8), "auto", ("logits", True)),
        # No class scores anywhere: the first output's values.
        (_model(VALUE, LABEL), "auto", ("value", False)),
        # [telemetry] output_kind decides the summary, of the same output.
        (_model(LABEL, PROBS, scores="probabilities"), "values", ("probabilities", False)),
        (_model(LABEL, PROBS), "values", ("probabilities", False)),
        (_model(VALUE, LABEL), "top_score", ("value", True)),
    ],
)
def test_the_watched_output_is_the_scores_output_when_there_is_one(
    model: ModelSpec, kind: OutputKind, watched: tuple[str, bool]
) -> None:
    assert watched_output(make_manifest(model=model), kind) == watched
