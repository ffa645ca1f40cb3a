"""Serving on the device: runtimes, the validated model, hot swap, probation, endpoints.

:func:`load_model` loads a verified bundle's model into onnxruntime, LiteRT or the legacy
tflite-runtime; :class:`Model` validates every request against the manifest and converts
int8 tensors; :class:`ModelSlot` swaps models without failing a call and watches a
candidate's probation; :class:`PredictionCache` optionally answers repeated inputs; the
HTTP endpoint (:class:`HttpServer`) and MQTT request/response
(:class:`MqttInferenceServer`) serve remote callers, with :mod:`agent.serve.codec` as
their wire format. Nothing here writes the state directory or installs anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from agent.plumbing.lazy import exports

if TYPE_CHECKING:
    from agent.serve._cache import CacheConfig, PredictionCache, Predictor, predict_versioned
    from agent.serve._http_config import HttpServerConfig, ServerTls
    from agent.serve._slot import ModelSlot, ProbationMonitor, ProbationVerdict, ServingModel
    from agent.serve.http import HttpServer
    from agent.serve.mqtt import MqttInferenceServer, MqttServingConfig
    from agent.serve.runtimes import (
        InputPolicy,
        Model,
        RuntimeOptions,
        installed_runtimes,
        load_model,
    )

__all__ = [
    "CacheConfig",
    "HttpServer",
    "HttpServerConfig",
    "InputPolicy",
    "Model",
    "ModelSlot",
    "MqttInferenceServer",
    "MqttServingConfig",
    "PredictionCache",
    "Predictor",
    "ProbationMonitor",
    "ProbationVerdict",
    "RuntimeOptions",
    "ServerTls",
    "ServingModel",
    "installed_runtimes",
    "load_model",
    "predict_versioned",
]

__getattr__ = exports(
    __name__,
    {
        "CacheConfig": "agent.serve._cache",
        "PredictionCache": "agent.serve._cache",
        "Predictor": "agent.serve._cache",
        "predict_versioned": "agent.serve._cache",
        "HttpServerConfig": "agent.serve._http_config",
        "ServerTls": "agent.serve._http_config",
        "ModelSlot": "agent.serve._slot",
        "ProbationMonitor": "agent.serve._slot",
        "ProbationVerdict": "agent.serve._slot",
        "ServingModel": "agent.serve._slot",
        "HttpServer": "agent.serve.http",
        "MqttInferenceServer": "agent.serve.mqtt",
        "MqttServingConfig": "agent.serve.mqtt",
        "InputPolicy": "agent.serve.runtimes",
        "Model": "agent.serve.runtimes",
        "RuntimeOptions": "agent.serve.runtimes",
        "installed_runtimes": "agent.serve.runtimes",
        "load_model": "agent.serve.runtimes",
    },
)
