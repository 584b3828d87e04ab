"""ASHA's rung records and the trial-epoch budget's count, kept in Tune's experiment snapshot.

Ray 2.60 saves the searcher (Optuna's study and sampler) and the callbacks with every experiment snapshot,
but not the scheduler nor the stopper: `Tuner.restore` rebuilds both from `tuner.pkl`, written when the sweep
started (ray-project/ray#30838). A resumed ASHA would start with empty rungs (promoting whatever comes next,
stopping nothing until the rungs refill) and a resumed budget would count from zero. `SweepState` is a Tune
callback holding the sweep's scheduler and stopper: Tune saves its `get_state()` in the same snapshot as the
trials and the searcher, and calls `set_state()` on restore before the restored trials are added again, so
rungs, budget, trials and study all continue from the same instant.

The callback, the scheduler and the stopper are pickled together in `tuner.pkl` (one pickle), so after a
restore the callback still holds the very objects Tune uses.
"""

from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler

from stence.tune.budget import TrialEpochBudget


def asha_state(scheduler: AsyncHyperBandScheduler) -> dict[str, Any]:
    """Rung records per bracket ([[milestone, {trial id: reward}], ...]), each live trial's bracket, the count
    of stopped trials."""
    brackets = scheduler._brackets
    return {
        "rungs": [[[milestone, dict(recorded)] for milestone, recorded in b._rungs] for b in brackets],
        "trials": {tid: brackets.index(b) for tid, b in scheduler._trial_info.items()},
        "num_stopped": int(scheduler._num_stopped),
    }


def set_asha_state(scheduler: AsyncHyperBandScheduler, state: dict[str, Any]) -> None:
    brackets = scheduler._brackets
    if len(state["rungs"]) != len(brackets):
        raise ValueError(f"saved ASHA state has {len(state['rungs'])} brackets, the scheduler {len(brackets)}")
    for b, rungs in zip(brackets, state["rungs"], strict=True):
        milestones = [m for m, _ in b._rungs]
        if milestones != [m for m, _ in rungs]:
            raise ValueError(f"saved ASHA rungs at {[m for m, _ in rungs]}, the scheduler's at {milestones}")
        b._rungs = [(m, dict(recorded)) for m, recorded in rungs]
    scheduler._trial_info = {tid: brackets[i] for tid, i in state["trials"].items()}
    scheduler._num_stopped = int(state["num_stopped"])


class SweepState(tune.Callback):
    """Saves and restores the scheduler's rungs (ASHA) and the stopper's count (TrialEpochBudget) with Tune's
    experiment snapshot; other schedulers and stoppers are left alone."""

    def __init__(self, scheduler: Any = None, stopper: Any = None):
        self.scheduler = scheduler
        self.stopper = stopper

    def get_state(self) -> dict[str, Any] | None:
        state: dict[str, Any] = {}
        if isinstance(self.scheduler, AsyncHyperBandScheduler):
            state["asha"] = asha_state(self.scheduler)
        if isinstance(self.stopper, TrialEpochBudget):
            state["budget"] = {"spent": self.stopper.spent, "last": dict(self.stopper._last_iteration)}
        return state or None

    def set_state(self, state: dict[str, Any]) -> None:
        if "asha" in state and isinstance(self.scheduler, AsyncHyperBandScheduler):
            set_asha_state(self.scheduler, state["asha"])
        if "budget" in state and isinstance(self.stopper, TrialEpochBudget):
            self.stopper.spent = int(state["budget"]["spent"])
            self.stopper._last_iteration = dict(state["budget"]["last"])
