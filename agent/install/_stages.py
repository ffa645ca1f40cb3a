"""Stages between the health gate and activation: shadow and A/B split.

A candidate that passed its health gate normally swaps in at once, in probation. When its
desired state asks for a stage (:mod:`agent.messages.desired`), the owner's ``stage``
callback takes the loaded candidate instead and the install is held in that phase
(``shadow`` or ``split``, persisted in ``state.json``) until the owner decides:

* :meth:`StagedUpdater.promote` swaps the candidate in, in probation, as if it had just
  passed its gate (the shadow verdict was "promote");
* :meth:`StagedUpdater.reject` fails the install with the reason and numbers (a shadow
  verdict "reject", or a fleet that dropped an A/B candidate).

A restart in a stage gates the candidate again and hands it back to its stage (a shadow
resumes from its persisted counters); it does not count as another attempt. A desired
state for another bundle supersedes a staged install like any pending one (``failed``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Literal, Optional

from agent.bundle.manifest import Manifest
from agent.errors import StateError
from agent.install._health import HealthReport
from agent.install._store import STAGES, AgentState, Pending, Phase
from agent.install._updater import InstallResult, Updater
from agent.serve._slot import ServingModel

__all__ = ["StageHook", "StagedUpdater"]

# (candidate, its manifest, its digest) -> the stage that took it, or None: activate now.
StageHook = Callable[[ServingModel, Manifest, str], Optional[Phase]]


class StagedUpdater(Updater):
    """An :class:`~agent.install._updater.Updater` whose candidates may be held in a stage."""

    stage: StageHook | None = None

    def _activate(
        self,
        state: AgentState,
        p: Pending,
        manifest: Manifest,
        model: ServingModel,
        report: HealthReport | None,
    ) -> InstallResult:
        digest = p.digest
        assert digest is not None  # verified before it was gated
        stage = None if self.stage is None else self.stage(model, manifest, digest)
        if stage is None:
            return super()._activate(state, p, manifest, model, report)
        self._save(replace(state, pending=replace(p, phase=stage)))
        outcome: Literal["shadow", "split"] = "shadow" if stage == "shadow" else "split"
        return InstallResult(
            digest, manifest.name, manifest.version, manifest.sequence, outcome, report
        )

    def promote(self, model: ServingModel, digest: str) -> None:
        """Swap the staged candidate ``model`` in, in probation (``activated``).

        Raises:
            StateError: ``digest`` is no longer held in a stage (``model`` is closed).
        """
        with self._lock, self.store.lock():
            state = self.store.load()
            p = state.pending
            if p is None or p.digest != digest or p.phase not in STAGES:
                model.close()
                raise StateError(f"version {digest[:12]} is no longer held in a stage")
            self._activate_now(state, p, model)

    def _activate_now(self, state: AgentState, p: Pending, model: ServingModel) -> None:
        assert p.digest is not None
        Updater._activate(self, state, p, self.store.manifest(p.digest), model, None)

    def reject(self, digest: str, reason: str) -> bool:
        """Fail the staged install of ``digest`` with ``reason``; False if it is not staged."""
        with self._lock, self.store.lock():
            state = self.store.load()
            p = state.pending
            if p is None or p.digest != digest or p.phase not in STAGES:
                return False
            self._fail(state, reason)
            return True
