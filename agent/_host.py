"""One model the agent serves, with everything that is its own.

An agent serves one model (a configuration without ``[models]`` tables: the model called
``default``) or several (``[models.NAME]``). Each :class:`ModelHost` holds one model's
state directory and installed versions, its updater and desired-state follower (so an
install, a probation or a rollback of one model never touches another), its serving slot,
cache, metrics and drift monitor, and its part of the reported state. The agent
(:mod:`agent.daemon`) shares the rest between them: one broker connection and outbox, one
trust root, one HTTP endpoint, one MQTT inference service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy.typing as npt

from agent.bundle import DeviceInfo
from agent.config import AgentConfig, ModelConfig
from agent.errors import StateError, error_code
from agent.install._config import UpdaterConfig
from agent.install._follower import DesiredFollower
from agent.install._stages import StagedUpdater
from agent.install._status import status_document
from agent.install._store import AgentState, Store
from agent.install._trust import TrustKeeper
from agent.messages.desired import Desired
from agent.serve._cache import PredictionCache, Predictor
from agent.serve._slot import ModelSlot, ProbationVerdict
from agent.telemetry._metrics import Metrics
from agent.telemetry._observe import ObservedPredictor

if TYPE_CHECKING:
    from agent._stage import Stages
    from agent.bundle.manifest import Manifest
    from agent.install._fetch import Fetcher
    from agent.install._gate_worker import GateWorkers
    from agent.install._store import Phase
    from agent.serve._slot import ServingModel
    from agent.telemetry._drift import DriftMonitor
    from agent.telemetry._feedback import FeedbackMemory, Judge

__all__ = ["ModelHost"]

log = logging.getLogger("edgeship.agent")

# (kind, fields): the agent's event sink, which adds the model's name.
Emit = Callable[[str, Mapping[str, Any]], None]


class ModelHost:
    """One named model: store, updater, follower, slot, cache, metrics, drift.

    ``emit`` receives this model's events (with ``model`` added); ``changed`` is called
    with this host whenever its reported state changed; ``stopping`` says when the agent
    no longer takes calls; ``gate_workers`` is the health gate's worker pool the agent's
    models share (one worker started ahead per device, not per model).

    Raises (constructor):
        KeyFileError: the configured device key is unusable.
    """

    def __init__(
        self,
        agent: AgentConfig,
        model: ModelConfig,
        *,
        trust: TrustKeeper,
        device: DeviceInfo,
        fetcher: Fetcher | None,
        emit: Emit,
        changed: Callable[[ModelHost], None],
        stopping: Callable[[], bool],
        gate_workers: GateWorkers | None = None,
    ) -> None:
        self.name = model.name
        self.config = model
        self._emit_to = emit
        self._changed = changed
        self._lock = threading.Lock()  # the reported state's own bookkeeping
        self._probation: dict[str, Any] | None = None
        self._candidate: str | None = None
        self.slot = ModelSlot()
        self.updater = StagedUpdater(
            model.state_dir,
            trust.install_policy,
            config=UpdaterConfig(
                update=agent.update,
                fetch=agent.fetch,
                runtime=model.runtime,
                decryption_key=agent.decryption_key,
            ),
            device=device,
            fetcher=fetcher,
            slot=self.slot,
            events=self._on_event,
        )
        if gate_workers is not None:  # the device's one worker started ahead, shared
            self.updater.models.gate_workers = gate_workers
        self.store: Store = self.updater.store
        self.follower = DesiredFollower(
            self.updater, emit=self.emit, changed=self.publish_state, trust=trust
        )
        inner: Predictor = self.slot
        self.cache: PredictionCache | None = None
        if model.cache.enabled:
            self.cache = PredictionCache(self.slot, model.cache)
            inner = self.cache
        self.metrics = Metrics()
        self.predictor = ObservedPredictor(
            inner,
            self.metrics,
            serving=lambda: self.slot.digest,
            output_kind=model.output_kind,
            stopping=stopping,
        )
        self.drift: DriftMonitor | None = None
        self._trust = trust
        # Feedback and stages are imported when first used: not on an idle agent's path.
        self._memory: FeedbackMemory | None = None
        self._manifests: dict[str, Manifest] = {}  # versions that answer: their judges' source
        self._judges: dict[str, Judge] = {}  # per version: how feedback scores its answers
        self._stage: Stages | None = None
        self.updater.stage = self._take

    # --- serving -------------------------------------------------------------------------

    @property
    def digest(self) -> str | None:
        """The version new calls go to (None: nothing is serving)."""
        return self.slot.digest

    @property
    def ready(self) -> bool:
        return self.slot.digest is not None

    def predict_request(
        self,
        inputs: Mapping[str, npt.ArrayLike],
        *,
        key: str | None = None,
        request_id: str | None = None,
    ) -> tuple[str | None, dict[str, npt.NDArray[Any]]]:
        """Answer one request; the version that answered, and its outputs.

        During an A/B split ``key`` (or chance, without one) picks the version; during a
        shadow stage the candidate gets a sampled copy, after the answer. With a
        ``request_id`` the answer is remembered for :meth:`feedback`.

        Raises:
            StateError, InputValidationError, InferenceError: as ``Agent.predict``.
        """
        if request_id is not None:
            from agent.telemetry._feedback import check_request_id  # noqa: PLC0415

            check_request_id(request_id)
        stage = self._stage
        if stage is None or (stage.split is None and stage.shadow is None):
            version, outputs = self.predictor.predict_versioned(inputs)
        elif (split := stage.split) is not None and split.router.choose(key):
            version, outputs = _timed(split.predictor, inputs, split.metrics)
        else:
            start = time.perf_counter()
            version, outputs = _timed(self.predictor, inputs, stage.serving_metrics)
            shadow = stage.shadow
            if shadow is not None:
                shadow.offer(inputs, outputs, time.perf_counter() - start, request_id)
        if request_id is not None and version:
            judge = self.judge(version)
            if judge is not None:
                self.feedback_memory.remember(request_id, version, outputs, judge=judge)
        return version, outputs

    def feedback(self, request_id: str, label: object) -> dict[str, Any]:
        """Score every version that answered ``request_id`` against ``label``.

        Raises:
            InvalidRequestIdError, InvalidLabelError: as sent, it fits nothing.
            UnknownRequestError: not remembered (never answered here, or too long ago).
            AlreadyLabelledError: that request has its label.
        """
        from agent.telemetry._feedback import check_request_id  # noqa: PLC0415

        return self.feedback_memory.feedback(check_request_id(request_id), label)

    @property
    def feedback_memory(self) -> FeedbackMemory:
        """The answers remembered for feedback, and accuracy per version."""
        if self._memory is None:
            from agent.telemetry._feedback import FeedbackMemory  # noqa: PLC0415

            self._memory = FeedbackMemory()
        return self._memory

    def _take(self, model: ServingModel, manifest: Manifest, digest: str) -> Phase | None:
        """The updater's stage hook: hold the candidate in a stage, or None: activate it."""
        if self._stage is None:
            from agent._stage import Stages  # noqa: PLC0415 - with a candidate only

            self._stage = Stages(self)
        return self._stage.take(model, manifest, digest)

    # --- lifetime ----------------------------------------------------------------------

    def resume(self) -> None:
        """Finish or abandon an interrupted install, then serve the committed version.

        Whatever a pending candidate does, the model serves what it runs; nothing here
        raises for the model's content (it is logged).

        Raises:
            StateError: the state file is corrupt (run ``edgeship-agent recover-state``).
        """
        state = self.updater.status()
        if state.current is not None:
            self._probation = {"digest": state.current, "passed": True}
        if state.pending is not None and state.pending.phase == "probation":
            self._candidate = state.pending.digest
        try:
            self.updater.resume()
        except Exception as exc:  # noqa: BLE001 - never kept from serving what it runs
            log.warning("model %s: resuming the interrupted install failed: %s", self.name, exc)
        try:
            self.updater.start_serving()
        except Exception as exc:  # noqa: BLE001
            log.error("model %s: cannot serve the current version: %s", self.name, exc)  # noqa: TRY400 - expected
        self.model_changed()

    def apply_desired(self, desired: Desired | None) -> bool:
        """Ask for ``desired`` (None clears it); False when it is what was asked already."""
        if not self.follower.apply(desired):
            return False
        log.info(
            "desired state",
            extra={
                "fields": {
                    "model": self.name,
                    "digest": None if desired is None else desired.digest,
                    "version": None if desired is None else desired.version,
                    "rollout": None if desired is None else desired.rollout,
                }
            },
        )
        self.publish_state()
        return True

    def stop_serving(self, timeout_s: float) -> bool:
        """Refuse new calls, let calls in flight finish; False if some still ran."""
        return self.slot.stop(timeout_s=timeout_s)

    def close(self) -> None:
        """End a stage without a decision (it resumes on the next start) and release what
        the updater keeps running (a warm health-gate worker)."""
        if self._stage is not None:
            self._stage.stop()
        self.updater.models.close()

    # --- events and state ----------------------------------------------------------------

    def emit(self, kind: str, fields: Mapping[str, Any]) -> None:
        self._emit_to(kind, {**fields, "model": self.name})

    def publish_state(self) -> None:
        self._changed(self)

    def _on_event(self, kind: str, fields: Mapping[str, Any], /) -> None:
        """The updater's event sink (called with the updater's lock held)."""
        self.emit(kind, fields)
        with self._lock:
            if kind == "activated":
                self._candidate = fields.get("digest")
            elif kind == "committed":
                self._probation = {"digest": fields.get("digest"), "passed": True}
                self._candidate = None
            elif kind == "rolled-back" and self._candidate is not None:
                self._probation = {"digest": self._candidate, "passed": False}
                self._candidate = None
        if kind in ("committed", "rolled-back") and self.follower.vouch is not None:
            self.follower.vouch.serving_changed()  # does the root vouch for the new one?
        if kind == "activated":
            self._watch_accuracy(fields.get("digest"))
        if kind == "failed" and fields.get("digest") is not None and self._stage is not None:
            self._stage.dropped(str(fields["digest"]), str(fields.get("reason", "")))
        if kind in ("activated", "rolled-back"):
            self.model_changed()
        self.publish_state()

    def _watch_accuracy(self, digest: object) -> None:
        """Ground truth in the candidate's probation, when its desired state asks for it."""
        desired, monitor = self.follower.desired, self.slot.monitor()
        if desired is None or desired.probation is None or monitor is None:
            return
        if desired.digest != digest:
            return
        rule = desired.probation

        def judge() -> ProbationVerdict | None:
            tally = None if self._memory is None else self._memory.accuracy(desired.digest)
            if tally is None or tally.labels < rule.min_feedback:
                return None
            if tally.correct >= rule.min_accuracy * tally.labels:
                return None
            return ProbationVerdict(
                "breached",
                f"accuracy {tally.correct / tally.labels:.1%} over {tally.labels} labelled"
                f" answers is below {rule.min_accuracy:.1%}",
            )

        monitor.extra = judge

    def model_changed(self) -> None:
        """A new version serves: name it in the metrics, give it its own drift monitor."""
        digest = self.slot.digest
        manifest = None
        if digest is not None:
            try:
                manifest = self.store.manifest(digest)
            except StateError as exc:
                log.warning("no telemetry reference for the serving model: %s", exc)
        self.drift = self.predictor.model_changed(
            digest, manifest, self.updater.models.serving(digest)
        )
        if digest is not None and manifest is not None:
            self._manifests[digest] = manifest
        staged = None if self._stage is None else self._stage.digest
        for gone in set(self._manifests) - {digest, staged}:
            del self._manifests[gone]
            self._judges.pop(gone, None)
            if self._memory is not None:
                self._memory.forget(gone)

    def add_judge(self, digest: str, manifest: Manifest) -> Judge:
        """How feedback scores the answers of version ``digest``."""
        from agent.telemetry._feedback import Judge  # noqa: PLC0415 - with feedback only

        self._manifests[digest] = manifest
        judge = self._judges[digest] = Judge.from_manifest(manifest, self.config.output_kind)
        return judge

    def judge(self, version: str) -> Judge | None:
        """Version ``version``'s judge (None: not a version this model runs)."""
        judge = self._judges.get(version)
        manifest = self._manifests.get(version)
        if judge is None and manifest is not None:
            judge = self.add_judge(version, manifest)
        return judge

    def state_document(self, state: AgentState | None = None) -> dict[str, Any]:
        """This model's reported state (docs/mqtt.md, "state").

        Raises:
            StateError: the state file is unreadable.
        """
        if state is None:
            state = self.updater.status()
        desired = self.follower.desired
        with self._lock:
            probation = self._probation
        doc = status_document(
            self.store,
            state,
            probation=probation,
            desired_digest=None if desired is None else desired.digest,
            trust=self._trust.document(),
            serving=self.updater.models.serving(self.slot.digest),
        )
        doc["model"] = self.name
        if doc["trust"] is not None and self.follower.vouch is not None:
            doc["trust"]["unvouched"] = self.follower.vouch.unvouched
        stage, memory = self._stage, self._memory
        doc.update({"shadow": None, "split": None} if stage is None else stage.document())
        doc["feedback"] = {} if memory is None else memory.totals()
        return doc

    def telemetry_section(self) -> dict[str, Any]:
        """This model's part of a telemetry message (metrics, drift)."""
        drift = self.drift
        metrics = self.metrics.snapshot().to_json()
        labels = {} if self._memory is None else self._memory.take_window()
        stage, serving = self._stage, self.slot.digest
        section = {
            "model": self.name,
            "metrics": metrics,
            "drift": None if drift is None else drift.snapshot(),
        }
        if stage is not None:
            return {
                **section,
                "versions": stage.versions(serving, metrics, labels),
                **stage.telemetry(),
            }
        versions = [] if serving is None else [version_entry(serving, "serving", metrics, labels)]
        return {**section, "versions": versions}


def version_entry(
    digest: str, role: str, numbers: Mapping[str, Any] | None, labels: Mapping[str, Any]
) -> dict[str, Any]:
    """One version's entry in telemetry's ``versions`` (docs/mqtt.md, "telemetry")."""
    out: dict[str, Any] = {"digest": digest, "role": role}
    if numbers is not None:
        lat = numbers.get("latency_ms")
        out["requests"] = numbers["requests"]
        out["error_count"] = numbers["error_count"]
        out["latency_ms"] = None if lat is None else {q: lat[q] for q in ("p50", "p95", "p99")}
    out["feedback"] = labels.get(digest, {"labels": 0, "correct": 0})
    return out


def _timed(
    predictor: ObservedPredictor, inputs: Mapping[str, npt.ArrayLike], metrics: Metrics | None
) -> tuple[str, dict[str, npt.NDArray[Any]]]:
    """``predictor``'s answer, also counted in a version's own ``metrics``."""
    if metrics is None:
        return predictor.predict_versioned(inputs)
    start = time.perf_counter()
    try:
        answer = predictor.predict_versioned(inputs)
    except Exception as exc:
        metrics.record(time.perf_counter() - start, error_code(exc))
        raise
    metrics.record(time.perf_counter() - start)
    return answer
