"""A sweep budget in trial-epochs, a log of results in arrival order, and the best-so-far curve over them.

One reported result of a trial is one trial-epoch (the training loops report once per epoch), so the cost
of a sweep, with or without early stopping, is the number of results reported. `TrialEpochBudget` is a
Tune `Stopper` that ends the whole experiment once that number reaches a budget; `ResultLog` is a Tune
`Callback` that records every result as (cumulative trial-epochs, trial id, epoch, metric). The pure
functions below turn such a log into a best-so-far curve and find where it first comes within a
tolerance of a target (bench/bench_search.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

from ray import tune
from ray.tune.result import DONE, RESULT_DUPLICATE, TRAINING_ITERATION

from stence.train.worker import RESTORED_KEY


class TrialEpochBudget(tune.Stopper):
    """Ends the experiment once `budget` results (trial-epochs) were reported, counted over all trials.

    Ray 2.60 calls `__call__(trial_id, result)` for every processed result (before the scheduler), and
    `stop_all()` after each step of the experiment loop. When a trial's function returns, Tune hands the
    stopper that trial's last result once more, now with done=True (and without the RESULT_DUPLICATE
    marker it had internally; callbacks never see it): that is not a new epoch and is not counted, nor is
    a restored checkpoint's epoch reported again after a restart (`stence/restored`). The
    result that spends the budget also stops its trial; a result of another running trial that arrives
    in the same step is counted (it was paid for) and stops that trial too.
    """

    def __init__(self, budget: int):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 trial-epoch, got {budget}")
        self.budget = int(budget)
        self.spent = 0
        self._last_iteration: dict[str, Any] = {}  # trial id -> training_iteration of its last counted result

    def _is_repeat(self, trial_id: str, result: dict[str, Any]) -> bool:
        if RESULT_DUPLICATE in result or result.get(RESTORED_KEY):  # a restored epoch reported again: no training
            return True
        last = self._last_iteration.get(trial_id)
        return bool(result.get(DONE)) and last is not None and result.get(TRAINING_ITERATION) == last

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if not self._is_repeat(trial_id, result):
            self.spent += 1
            self._last_iteration[trial_id] = result.get(TRAINING_ITERATION)
        return self.spent >= self.budget

    def stop_all(self) -> bool:
        return self.spent >= self.budget


class ResultLog(tune.Callback):
    """Records every result in arrival order: {"trial_epochs", "trial_id", "epoch", "metric", "t"}.

    `trial_epochs` is the cumulative count of results (this one included), `epoch` the trial's
    `training_iteration`, `metric` the value of `metric` (NaN when missing) and `t` the seconds since the
    log was made. `configs` maps each trial id to its sampled config.
    """

    def __init__(self, metric: str):
        self.metric = metric
        self.records: list[dict[str, Any]] = []
        self.configs: dict[str, dict[str, Any]] = {}
        self._t0 = time.perf_counter()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if result.get(RESTORED_KEY):  # a restored checkpoint's epoch reported again: not a new trial-epoch
            return
        value = result.get(self.metric)
        self.records.append(
            {
                "trial_epochs": len(self.records) + 1,
                "trial_id": trial.trial_id,
                "epoch": int(result.get("training_iteration", 0)),
                "metric": float(value) if isinstance(value, (int, float)) else float("nan"),
                "t": round(time.perf_counter() - self._t0, 2),
            }
        )
        self.configs.setdefault(trial.trial_id, dict(trial.config))


def best_so_far(values: Sequence[float], mode: str = "max") -> list[float]:
    """Best value among the first i+1 results, for each i; NaN (or missing) values are skipped, and the
    curve is NaN until the first finite value."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    better = max if mode == "max" else min
    out: list[float] = []
    best = float("nan")
    for v in values:
        if v is not None and math.isfinite(v):
            best = v if math.isnan(best) else better(best, v)
        out.append(best)
    return out


def trial_epochs_to_within(
    curve: Sequence[float], target: float, tol: float, mode: str = "max"
) -> int | None:
    """Trial-epochs (1-based index into a best-so-far curve) at which the curve first comes within `tol`
    of `target` (>= target - tol for max, <= target + tol for min); None if it never does."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    for i, v in enumerate(curve):
        if math.isfinite(v) and (v >= target - tol if mode == "max" else v <= target + tol):
            return i + 1
    return None


__all__ = ["ResultLog", "TrialEpochBudget", "best_so_far", "trial_epochs_to_within"]
