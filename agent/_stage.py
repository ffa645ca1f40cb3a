"""A model's candidate held in a stage before it serves everyone: shadow or A/B split.

The updater hands a candidate that passed its health gate to :meth:`Stages.take` (its
:data:`~agent.install._stages.StageHook`); when the desired state asks for a stage, the
candidate stays here instead of swapping in:

* **shadow**: a :class:`~agent.serve._shadow.ShadowRunner` answers a sampled copy of live
  requests off the request path; a judge thread applies the desired state's promotion
  rule (with the candidate's accuracy from feedback) and promotes the candidate
  (``shadow-passed``, then ``activated`` in probation) or rejects it (``shadow-rejected``,
  then ``failed`` in phase ``shadow``);
* **split**: the candidate answers its share of requests, sticky by request key (a
  :class:`~agent.serve._split.SplitRouter` salted with its digest, so a key keeps its side
  across restarts), each version counted on its own; the fleet side decides
  (``split-ended`` ``promoted`` or ``dropped``).

What stage a candidate is in is kept in ``stage.json`` beside ``state.json``, so that a
restart puts it back in the same stage before the desired state arrives again; a shadow
also resumes its counters (``shadow.json``).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any, Optional, Union

from agent._host import version_entry
from agent.bundle.manifest import FORMAT_RUNTIMES, Manifest
from agent.errors import EdgeshipError
from agent.install._store import Phase
from agent.messages.desired import PromotionRule, Split
from agent.plumbing.files import atomic_write
from agent.plumbing.strict import Doc, load_json
from agent.serve._slot import ModelSlot, ServingModel
from agent.telemetry._metrics import Metrics
from agent.telemetry._observe import ObservedPredictor

if TYPE_CHECKING:
    from agent._host import ModelHost
    from agent.serve._shadow import ShadowRunner
    from agent.serve._split import SplitRouter

__all__ = ["Stages"]

log = logging.getLogger("edgeship.agent")

JUDGE_EVERY_S = 0.25
_Wanted = Optional[tuple[Phase, Union[PromotionRule, Split]]]


class _SplitCandidate:
    """The A/B candidate: its own slot, its own numbers, the model's metrics too."""

    def __init__(self, host: ModelHost, model: ServingModel, digest: str, share: float) -> None:
        from agent.serve._split import SplitRouter  # noqa: PLC0415 - with a split only

        self.digest = digest
        self.share = share
        self.router: SplitRouter = SplitRouter(share, salt=bytes.fromhex(digest))
        self.slot = ModelSlot()
        self.slot.swap(model, digest)
        self.metrics = Metrics()
        self.predictor = ObservedPredictor(
            self.slot, host.metrics, serving=lambda: digest, output_kind=host.config.output_kind
        )

    def close(self) -> None:
        self.slot.stop(timeout_s=5.0)


class Stages:
    """The stage of one model's candidate, if it is in one."""

    def __init__(self, host: ModelHost) -> None:
        self.host = host
        self.split: _SplitCandidate | None = None
        self.shadow: ShadowRunner | None = None
        self.serving_metrics: Metrics | None = None  # the serving version's own, in a stage
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._judge: threading.Thread | None = None
        self._path = host.store.root / "stage.json"

    @property
    def digest(self) -> str | None:
        held = self.split or self.shadow
        return None if held is None else held.digest

    # --- entering a stage (the updater's hook, with its lock held) -------------------------

    def take(self, model: ServingModel, manifest: Manifest, digest: str) -> Phase | None:
        """Hold the candidate in the stage its desired state asks for; None: activate it."""
        wanted = self._wanted(digest)
        before = self.split
        self._end()  # a candidate staged before (a restart, a repeated desired) makes way
        if before is not None:
            outcome = "promoted" if wanted is None and before.digest == digest else "dropped"
            self.host.emit("split-ended", {"digest": before.digest, "outcome": outcome})
        if wanted is None:
            self._forget()
            return None
        judge = self.host.add_judge(digest, manifest)
        kind, how = wanted
        self.serving_metrics = Metrics()
        if isinstance(how, PromotionRule):
            from agent.serve._shadow import Comparison, ShadowRunner  # noqa: PLC0415

            host = self.host
            memory = host.feedback_memory
            # The serving version, timed beside the candidate on the same inputs (a fair
            # latency ratio); not a TFLite one, whose interpreter lock the idle worker
            # would hold against serving calls.
            serving = host.updater.models.serving(host.slot.digest) or {}
            litert = serving.get("runtime") in FORMAT_RUNTIMES["tflite"]
            runner = ShadowRunner(
                model,
                digest,
                how,
                Comparison.from_manifest(manifest),
                state_path=host.store.root / "shadow.json",
                priority=host.updater.config.update.health_gate_priority,
                reference=None if litert else host.slot.predict,
                on_result=lambda rid, out: memory.remember(rid, digest, out, judge=judge),
            )
            with self._lock:
                self.shadow = runner
            self._start_judge(runner)
            self._keep(digest, {"shadow": how.to_json()})
            self.host.emit("shadow-started", {"digest": digest, "rule": how.to_json()})
        else:
            with self._lock:
                self.split = _SplitCandidate(self.host, model, digest, how.share)
            self._keep(digest, {"split": how.to_json()})
            self.host.emit("split-started", {"digest": digest, "share": how.share})
        return kind

    def _wanted(self, digest: str) -> _Wanted:
        """The stage the desired state (or, before it arrived, ``stage.json``) asks for."""
        desired = self.host.follower.desired
        if desired is not None:
            if desired.digest != digest:
                return None
            if desired.shadow is not None:
                return ("shadow", desired.shadow)
            return None if desired.split is None else ("split", desired.split)
        try:
            data = self._path.read_bytes()
            doc = Doc(load_json(data, what="stage", error=ValueError), "stage", error=ValueError)
            if doc.text("digest", max_len=64) != digest:
                return None
            if doc.has("shadow"):
                return ("shadow", PromotionRule.read(doc.obj("shadow")))
            return ("split", Split(doc.obj("split").number("share", positive=True)))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self._path, exc)
            return None

    def _keep(self, digest: str, stage: dict[str, Any]) -> None:
        try:
            atomic_write(self._path, json.dumps({"digest": digest, **stage}).encode())
        except OSError as exc:
            log.warning("cannot keep the stage in %s: %s", self._path, exc)

    def _forget(self) -> None:
        try:
            self._path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot remove %s: %s", self._path, exc)

    # --- leaving it ------------------------------------------------------------------------

    def dropped(self, digest: str, reason: str) -> None:
        """The staged install of ``digest`` failed (superseded, or rejected)."""
        if self.digest != digest:
            return
        was_split = self.split is not None
        runner = self.shadow
        self._end()
        if runner is not None:
            runner.clear()
        self._forget()
        if was_split:
            self.host.emit(
                "split-ended", {"digest": digest, "outcome": "dropped", "reason": reason}
            )

    def _end(self) -> None:
        """Close whatever is staged (a shadow keeps its counters for a later start)."""
        with self._lock:
            split, runner = self.split, self.shadow
            self.split = self.shadow = None
            self.serving_metrics = None
        if split is not None:
            split.close()
        if runner is not None:
            runner.close()

    def stop(self) -> None:
        """The agent stops: end the stage undecided; it resumes on the next start."""
        self._stop.set()
        if self._judge is not None:
            self._judge.join(5.0)
        self._end()

    # --- the shadow's judge ----------------------------------------------------------------

    def _start_judge(self, runner: ShadowRunner) -> None:
        self._judge = threading.Thread(
            target=self._watch,
            args=(runner,),
            name=f"edgeship-shadow-{self.host.name}",
            daemon=True,
        )
        self._judge.start()

    def _watch(self, runner: ShadowRunner) -> None:
        while not self._stop.wait(JUDGE_EVERY_S):
            if self.shadow is not runner:
                return
            tally = self.host.feedback_memory.accuracy(runner.digest)
            verdict = runner.verdict(None if tally is None else (tally.labels, tally.correct))
            if verdict.state != "watching":
                self._decide(runner, verdict.state, verdict.reason)
                return

    def _decide(self, runner: ShadowRunner, state: str, reason: str) -> None:
        with self._lock:
            if self.shadow is not runner:
                return
            self.shadow = None
            self.serving_metrics = None
        stats = runner.stats()
        numbers = {k: stats[k] for k in ("samples", "agreement", "latency_ratio", "accuracy")}
        digest, host = runner.digest, self.host
        try:
            if state == "promote":
                host.emit("shadow-passed", {"digest": digest, **numbers})
                model = runner.take_model()
                runner.clear()
                self._forget()
                host.updater.promote(model, digest)
                host.follower.wake()  # its worker watches the probation that follows
            else:
                host.emit("shadow-rejected", {"digest": digest, "reason": reason, **numbers})
                runner.close()
                runner.clear()
                self._forget()
                host.updater.reject(digest, f"rejected in shadow: {reason}")
        except EdgeshipError as exc:
            log.error("model %s: the shadow verdict could not be applied: %s", host.name, exc)  # noqa: TRY400 - expected
        host.publish_state()

    # --- what it reports -------------------------------------------------------------------

    def document(self) -> dict[str, Any]:
        """The reported state's ``shadow`` and ``split`` (null outside a stage)."""
        runner, split = self.shadow, self.split
        return {
            "shadow": None if runner is None else runner.stats(),
            "split": None if split is None else {"digest": split.digest, "share": split.share},
        }

    def telemetry(self) -> dict[str, Any]:
        doc = self.document()
        return {k: v for k, v in doc.items() if v is not None}

    def versions(
        self, serving: str | None, metrics: dict[str, Any], labels: dict[str, dict[str, int]]
    ) -> list[dict[str, Any]]:
        """Telemetry's ``versions``: each version that answered or shadowed this window."""

        split, runner, own = self.split, self.shadow, self.serving_metrics
        found = []
        if serving is not None:
            numbers = metrics if own is None else own.snapshot().to_json()
            found.append(version_entry(serving, "serving", numbers, labels))
        if split is not None:
            candidate = split.metrics.snapshot().to_json()
            found.append(version_entry(split.digest, "candidate", candidate, labels))
        if runner is not None:
            found.append(version_entry(runner.digest, "shadow", None, labels))  # see "shadow"
        return found
