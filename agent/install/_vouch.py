"""Does the device's trust root still vouch for what a model serves?

Checked by each model's desired-state worker after the trust changed (a new root, a key
expiring) and after the model's serving version changed (a commit, a rollback). When the
root no longer vouches for it (its signer revoked or expired, out of the key's scope,
below the signed floor): an ``unvouched`` event (once per reason), the reason in the
model's reported state (``trust.unvouched``), and, with the root's ``unvouched =
"roll-back"``, a rollback to the previous version when the root vouches for that one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from agent.install._policy import installed_vouch_problem

if TYPE_CHECKING:
    from agent.install._trust import TrustKeeper
    from agent.install._updater import Updater

__all__ = ["VouchCheck"]

log = logging.getLogger("edgeship.agent")


class VouchCheck:
    """The check for one model's updater; ``unvouched`` is its last finding (None: vouched)."""

    def __init__(
        self,
        trust: TrustKeeper,
        updater: Updater,
        *,
        emit: Callable[[str, Mapping[str, Any]], None],
        changed: Callable[[], None],
    ) -> None:
        self.trust = trust
        self.updater = updater
        self.unvouched: str | None = None
        self._emit = emit
        self._changed = changed
        self._checked = trust.generation  # what the agent started with was installed under it

    def serving_changed(self) -> None:
        """Check again on the next :meth:`check` (another version serves)."""
        self._checked = -1

    def check(self) -> None:
        """Check what serves, if the trust or the serving version changed since the last time."""
        generation = self.trust.generation
        if self._checked >= generation:
            return
        state = self.updater.status()
        if state.pending is not None and state.pending.phase == "probation":
            return  # the verdict comes first; then what serves is checked
        self._checked = generation
        if state.current is None:
            return
        trust, store = self.trust, self.updater.store
        root, now = trust.root, trust.now()
        problem = installed_vouch_problem(store, state.current, root, now, trust.slack_s)
        if problem is None:
            if self.unvouched is not None:
                self.unvouched = None
                self._changed()
            return
        action: str = root.unvouched
        if action == "roll-back" and (
            state.previous is None
            or installed_vouch_problem(store, state.previous, root, now, trust.slack_s) is not None
        ):
            action = "none-vouched"  # nothing to roll back to: keep serving, and say so
        if self.unvouched == problem:
            return
        self.unvouched = problem
        log.warning("unvouched: %s", problem)
        self._emit("unvouched", {"reason": problem, "digest": state.current, "action": action})
        self._changed()
        if action == "roll-back":
            self.updater.rollback(f"{root.label} no longer vouches for it: {problem}")
