"""Which model answers a request: the names an agent serves, for its HTTP and MQTT endpoints.

A request names its model (``/v1/models/NAME/predict``, ``"model"`` in an MQTT request,
``Agent.predict(..., model=NAME)``) or not: then it goes to the model called ``default``,
or to the only model when there is just one. A name the agent does not serve is the
caller's error (:class:`~agent.errors.UnknownModelError`, ``unknown-model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy.typing as npt

from agent.errors import StateError, UnknownModelError
from agent.messages.desired import DEFAULT_MODEL
from agent.serve._cache import Predictor, predict_versioned

__all__ = ["Router", "Served"]

Outputs = dict[str, npt.NDArray[Any]]


class Served(Protocol):
    """What one served model offers the endpoints (:class:`agent._host.ModelHost`)."""

    @property
    def digest(self) -> str | None: ...

    @property
    def ready(self) -> bool: ...

    def predict_request(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[str | None, Outputs]: ...

    def feedback(self, request_id: str, label: object) -> dict[str, Any]: ...


class _Plain:
    """A bare predictor (a model, a slot, a cache) served as the one model."""

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    @property
    def digest(self) -> str | None:
        return getattr(self.predictor, "digest", None)

    @property
    def ready(self) -> bool:
        """A model is always ready; a slot once something serves."""
        return not hasattr(self.predictor, "digest") or self.digest is not None

    def predict_request(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[str | None, Outputs]:
        del key, request_id  # a bare predictor has no A/B split and no feedback memory
        return predict_versioned(self.predictor, inputs)

    def feedback(self, request_id: str, label: object) -> dict[str, Any]:
        raise StateError("feedback needs an edgeship agent; this endpoint serves a bare model")


class Router:
    """The models an endpoint serves, by name."""

    def __init__(self, models: Mapping[str, Served]) -> None:
        if not models:
            raise ValueError("a router needs at least one model")
        self.models = dict(models)
        self.default: str | None = None
        if DEFAULT_MODEL in models:
            self.default = DEFAULT_MODEL
        elif len(models) == 1:
            self.default = next(iter(models))

    @classmethod
    def of(cls, predictor: Predictor | Router) -> Router:
        """``predictor`` if it is a router, else a router serving it as the one model."""
        if isinstance(predictor, Router):
            return predictor
        return cls({DEFAULT_MODEL: _Plain(predictor)})

    def get(self, name: str | None) -> Served:
        """The model called ``name`` (None: the default model).

        Raises:
            UnknownModelError: no such model, or no name where there is no default.
        """
        if name is None:
            if self.default is None:
                raise UnknownModelError(
                    f"this agent serves several models ({', '.join(sorted(self.models))}); name one"
                )
            return self.models[self.default]
        served = self.models.get(name)
        if served is None:
            raise UnknownModelError(
                f"no model {name!r} here; this agent serves {', '.join(sorted(self.models))}"
            )
        return served
