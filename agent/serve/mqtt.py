"""Streaming inference over MQTT: requests in, answers out, through a bounded queue.

Requests arrive on ``edgeship/v1/<fleet>/<device>/infer/request`` in either encoding of
:mod:`agent.serve.codec` (told apart by the binary magic). Where the answer goes:

* **MQTT 5**: to the request's *response topic*, with its *correlation data* echoed as
  the answer's correlation data.
* **MQTT 3.1.1** (no properties): the request carries ``"reply_to"`` and
  ``"correlation_id"`` as top-level JSON fields (binary: fields of its header); the
  answer goes to ``reply_to`` and carries the same ``"correlation_id"``.
* Neither given: the device's ``infer/response`` topic.

A ``correlation_id`` in the payload is echoed under MQTT 5 too. A reply topic must be a
plain topic (no wildcards, not ``$...``); inside the ``edgeship/`` namespace only
``edgeship/v1/<fleet>/<device>/infer/response[/...]`` is allowed, so a requester cannot
make the device publish on its own status, state or telemetry topics. A request with a
reply topic outside these rules is dropped (and counted): there is no safe place to
answer it.

A request may name its model (``"model": "<name>"``; else the model called ``default``, or
the only one), carry a ``"key"`` (keeps a caller on one side of an A/B split) and a
``"request_id"`` (for feedback later). Answers: ``{"outputs": {...}, "model": <version>,
"correlation_id": ...}`` in the request's encoding (``model`` names the version that
answered, as it always has); errors are always JSON ``{"error": {"code": ..., "message":
...}, "correlation_id": ...}`` with codes ``invalid-input``, ``unknown-model``,
``overloaded``, ``unavailable`` (no model, or stopping), ``inference-failed`` and
``internal``.

The transport delivers on its network thread, which must not block: the handler only
checks the size and puts the message in a bounded queue; worker threads decode, predict
and answer. When the queue is full the request is answered at once with ``overloaded``
instead of being held, so memory stays bounded under any load.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import threading
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EdgeshipError, InputValidationError, error_code
from agent.messages.topics import PREFIX, Topics
from agent.plumbing.transport import Message, Transport
from agent.serve._cache import Predictor
from agent.serve._router import Router
from agent.serve.codec import (
    CodecLimits,
    decode,
    encode_binary,
    encode_json,
    is_binary,
    message_fields,
)

__all__ = ["MqttInferenceServer", "MqttServingConfig", "ServingStats", "check_reply_topic"]

log = logging.getLogger(__name__)

MAX_TOPIC_BYTES = 1024
MAX_CORRELATION_CHARS = 256
_EDGESHIP_RESPONSE = re.compile(re.escape(PREFIX) + r"/[^/]+/[^/]+/infer/response(/.*)?")


@dataclass(frozen=True)
class MqttServingConfig:
    """Settings of MQTT inference; units in the names.

    Attributes:
        enabled: serve inference over MQTT (needs a broker).
        queue_size: requests waiting for a worker; beyond it they get ``overloaded``.
        workers: threads running predictions. One suits most devices: the runtime
            itself may use several cores per call.
        max_request_bytes: largest request payload; larger ones are refused unread
            (set the broker's ``message_size_limit`` to match).
        qos: QoS of the request subscription and of the answers.
        response_expiry_s: MQTT 5 message expiry of answers (None: never expire), so a
            requester that went away does not get stale answers queued at the broker.
        limits: bounds on the decoded tensors.
    """

    enabled: bool = False
    queue_size: int = 64
    workers: int = 1
    max_request_bytes: int = 4 * 1024 * 1024
    qos: int = 1
    response_expiry_s: float | None = 60.0
    limits: CodecLimits = field(default_factory=CodecLimits)

    def __post_init__(self) -> None:
        if self.queue_size < 1 or self.workers < 1 or self.max_request_bytes < 1:
            raise ValueError("queue_size, workers and max_request_bytes must be at least 1")
        if self.qos not in (0, 1, 2):
            raise ValueError("qos must be 0, 1 or 2")


@dataclass(frozen=True)
class ServingStats:
    """Counters since start. ``dropped``: no valid reply topic, or the answer not sent."""

    received: int = 0
    answered: int = 0
    errors: int = 0
    overloaded: int = 0
    dropped: int = 0


def check_reply_topic(topic: object) -> str:
    """``topic`` if the device may answer on it (see the module docstring).

    Raises:
        InputValidationError: not a string, empty, too long, a wildcard or ``$`` topic, or
            an edgeship topic other than an ``infer/response`` one.
    """
    if not isinstance(topic, str) or not topic:
        raise InputValidationError("reply_to must be a non-empty topic string")
    if len(topic.encode("utf-8", "replace")) > MAX_TOPIC_BYTES:
        raise InputValidationError(f"reply topic longer than {MAX_TOPIC_BYTES} bytes")
    if any(c in topic for c in "+#\0") or topic.startswith("$"):
        raise InputValidationError(f"reply topic {topic!r} contains a wildcard, NUL or starts $")
    if topic.split("/", 1)[0] == PREFIX.split("/", 1)[0] and not _EDGESHIP_RESPONSE.fullmatch(
        topic
    ):
        raise InputValidationError(
            f"reply topic {topic!r} is an edgeship topic other than"
            f" {PREFIX}/<fleet>/<device>/infer/response; answers go only there"
        )
    return topic


@dataclass
class _Route:
    topic: str | None
    correlation_data: bytes | None
    correlation_id: str | int | None


class MqttInferenceServer:
    """Answers prediction requests arriving through ``transport``. Thread-safe.

    ``predictor`` is anything with ``predict`` (a Model, the model slot, a cache; when
    it reports versions (``predict_versioned``), answers name the version) or the agent's
    models by name (a :class:`~agent.serve._router.Router`).
    """

    def __init__(
        self,
        predictor: Predictor | Router,
        transport: Transport,
        topics: Topics,
        config: MqttServingConfig | None = None,
    ) -> None:
        self.router = Router.of(predictor)
        self.transport = transport
        self.topics = topics
        self.config = config or MqttServingConfig()
        self._queue: queue.Queue[Message | None] = queue.Queue(self.config.queue_size)
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(("received", "answered", "errors", "overloaded", "dropped"), 0)

    def start(self) -> None:
        """Start the workers and subscribe to the request topic (on every connection)."""
        if self._workers:
            return
        self._stopping.clear()
        for i in range(self.config.workers):
            worker = threading.Thread(target=self._work, name=f"edgeship-infer-{i}", daemon=True)
            worker.start()
            self._workers.append(worker)
        self.transport.subscribe(self.topics.infer_request, self._on_message, qos=self.config.qos)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving: queued and later requests are answered ``unavailable``."""
        self._stopping.set()
        for _ in self._workers:
            self._queue.put(None)  # the workers drain fast once stopping
        for worker in self._workers:
            worker.join(timeout_s)
        self._workers = []

    def stats(self) -> ServingStats:
        with self._lock:
            return ServingStats(**self._counts)

    # --- on the transport's thread: never block -------------------------------------------

    def _on_message(self, message: Message) -> None:
        self._count("received")
        if len(message.payload) > self.config.max_request_bytes:
            self._reply_error(
                self._early_route(message, parse=False),
                "invalid-input",
                f"the request is {len(message.payload)} bytes; at most"
                f" {self.config.max_request_bytes} are accepted",
            )
            return
        if self._stopping.is_set():
            self._reply_error(self._early_route(message), "unavailable", "inference is stopping")
            return
        try:
            self._queue.put_nowait(message)
        except queue.Full:
            self._count("overloaded")
            self._reply_error(
                self._early_route(message),
                "overloaded",
                f"{self.config.queue_size} requests are already waiting; retry later",
            )

    # --- workers -----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            if message is None:
                return
            if self._stopping.is_set():
                self._reply_error(
                    self._early_route(message), "unavailable", "inference is stopping"
                )
                continue
            try:
                self._serve(message)
            except Exception:
                # A worker must survive anything: the next request deserves an answer.
                log.exception("MQTT inference request on %s failed", message.topic)
                self._reply_error(
                    self._early_route(message), "internal", "internal error; see the log"
                )

    def _serve(self, message: Message) -> None:
        try:
            request = decode(message.payload, "inputs", self.config.limits)
        except InputValidationError as exc:
            self._reply_error(self._early_route(message), "invalid-input", str(exc))
            return
        route = self._route(message, request.meta)
        if route.topic is None:
            return
        fields = request.meta if isinstance(request.meta, dict) else {}
        try:
            served = self.router.get(_text(fields, "model"))
            version, outputs = served.predict_request(
                request.tensors, key=_text(fields, "key"), request_id=_text(fields, "request_id")
            )
        except EdgeshipError as exc:
            code = error_code(exc)
            if code == "inference-failed":
                log.warning("prediction failed: %s", exc)
            self._reply_error(route, code, str(exc))
            return
        meta: dict[str, Any] = {} if version is None else {"model": version}
        if route.correlation_id is not None:
            meta["correlation_id"] = route.correlation_id
        if is_binary(message.payload):
            payload = encode_binary(outputs, meta)
        else:
            payload = encode_json(outputs, "outputs", meta)
        if self._publish(route, payload):
            self._count("answered")

    # --- answers -----------------------------------------------------------------------

    def _route(self, message: Message, meta: Any) -> _Route:
        """Where to answer; ``topic`` None (and counted dropped) when nowhere is safe."""
        fields = meta if isinstance(meta, dict) else {}
        correlation_id = fields.get("correlation_id")
        if not (
            (isinstance(correlation_id, str) and len(correlation_id) <= MAX_CORRELATION_CHARS)
            or (type(correlation_id) is int)
        ):
            correlation_id = None
        topic = message.response_topic or fields.get("reply_to") or self.topics.infer_response
        try:
            checked: str | None = check_reply_topic(topic)
        except InputValidationError as exc:
            log.warning("dropping an inference request from %s: %s", message.topic, exc)
            self._count("dropped")
            checked = None
        return _Route(checked, message.correlation_data, correlation_id)

    def _early_route(self, message: Message, *, parse: bool = True) -> _Route:
        """The route of a request not (successfully) decoded: from its MQTT 5 properties,
        else from its top-level fields when ``parse`` (3.1.1), else the default topic."""
        fields: Any = {}
        if parse and message.response_topic is None:
            fields = _payload_fields(message.payload, self.config.limits)
        return self._route(message, fields)

    def _reply_error(self, route: _Route, code: str, text: str) -> None:
        if route.topic is None:
            return
        body: dict[str, Any] = {"error": {"code": code, "message": text}}
        if route.correlation_id is not None:
            body["correlation_id"] = route.correlation_id
        if code != "overloaded":
            self._count("errors")
        self._publish(route, json.dumps(body).encode())

    def _publish(self, route: _Route, payload: bytes) -> bool:
        assert route.topic is not None
        sent = self.transport.publish(
            route.topic,
            payload,
            qos=self.config.qos,
            expiry_s=self.config.response_expiry_s,
            correlation_data=route.correlation_data,
        )
        if not sent:
            self._count("dropped")
        return sent

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1


def _payload_fields(payload: bytes, limits: CodecLimits) -> Any:
    """Top-level fields of a request that may be malformed (to find where to answer); with
    the decoder's bounds, so that an answer to a hostile request costs no more memory."""
    try:
        return message_fields(payload, "inputs", limits)
    except InputValidationError:
        return {}


def _text(fields: dict[str, Any], key: str) -> str | None:
    """A request's text field; None when absent. Raises: InputValidationError: not text."""
    value = fields.get(key)
    if value is None or (isinstance(value, str) and 0 < len(value) <= 128):
        return value
    raise InputValidationError(f"{key!r} must be a string of 1 to 128 characters")
