"""Replay a sweep on a recorded table of learning curves, through the live sweep's own searcher and scheduler.

A curve table (bench/record_curves.py) holds, for every configuration of a grid over a search space and for
one or more training seeds, the objective after each epoch. `replay` runs one sweep arm on it: the
Optuna-backed `OptunaSearch` and Ray's `ASHAScheduler` built by `stence.tune.search` (the objects `stence
tune` uses) propose configurations and stop trials, exactly as Tune drives them (`suggest`, `on_trial_add`,
`on_trial_result`, `on_trial_complete`), while the table answers in place of training. A proposed
configuration is snapped to the nearest grid level of each parameter (on a log scale for log-uniform
parameters); when the table holds several seeds of it, the replay's own random stream picks one, so a trial
sees one noisy realisation as a live trial would.

Time is simulated as in a live sweep with `concurrency` trials at once, every epoch taking one unit: each step,
the running trial whose next epoch finishes first reports it, and a freed slot starts a new trial at once. One reported result is one trial-epoch; the arm stops
proposing once `budget` trial-epochs are spent, and the trials still running report until the budget is
reached (as a Tune Stopper ends the experiment).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from ray.tune.schedulers import TrialScheduler

from stence.tune.budget import best_so_far
from stence.tune.search import make_scheduler, make_searcher
from stence.tune.spaces import SearchSpace, build_param_space

ARMS = {  # arm -> (Optuna sampler, scheduler)
    "tpe_asha": ("tpe", "asha"),
    "tpe": ("tpe", "none"),
    "random_asha": ("random", "asha"),
    "random": ("random", "none"),
}


@dataclass
class CurveTable:
    """Learning curves keyed by grid configuration: `curves[config][seed]` is the objective per epoch."""

    params: dict[str, dict[str, Any]]  # dotted key -> space spec (type, low, high)
    levels: dict[str, np.ndarray]  # dotted key -> sorted grid levels
    curves: dict[tuple[float, ...], list[np.ndarray]]
    epochs: int

    @classmethod
    def from_frame(cls, df: pd.DataFrame, space: SearchSpace, objective: str) -> CurveTable:
        """From a long table: one row per (config, seed, epoch) with a column per parameter and `objective`."""
        params = dict(space.data["params"])
        missing = [k for k in params if k not in df] + ([objective] if objective not in df else [])
        if missing:
            raise ValueError(f"curve table lacks the columns {missing}")
        levels = {k: np.sort(df[k].unique().astype(float)) for k in params}
        curves: dict[tuple[float, ...], list[np.ndarray]] = {}
        for key, g in df.sort_values("epoch").groupby([*params, "seed"], sort=True):  # key: (*params, seed)
            curves.setdefault(tuple(float(v) for v in key[:-1]), []).append(g[objective].to_numpy(dtype=float))
        epochs = {len(c) for runs in curves.values() for c in runs}
        if len(epochs) != 1:
            raise ValueError(f"curves of unequal length in the table: {sorted(epochs)}")
        return cls(params, levels, curves, epochs.pop())

    def snap(self, config: dict[str, Any]) -> tuple[float, ...]:
        """The grid configuration nearest to a proposed one, parameter by parameter."""
        out = []
        for key, spec in self.params.items():
            lv, v = self.levels[key], float(config[key])
            if spec["type"] == "loguniform":
                i = int(np.argmin(np.abs(np.log(lv) - math.log(v))))
            else:
                i = int(np.argmin(np.abs(lv - v)))
            out.append(float(lv[i]))
        return tuple(out)

    def best(self, mode: str = "max") -> float:
        """The best value any run of the table reaches at any epoch: the target of the replay."""
        values = [float(np.nanmax(c) if mode == "max" else np.nanmin(c)) for runs in self.curves.values()
                  for c in runs]
        return max(values) if mode == "max" else min(values)


@dataclass
class _Trial:
    """What Ray's schedulers read of a trial: its id (a stand-in for ray.tune.experiment.Trial)."""

    trial_id: str
    config: dict[str, Any]
    curve: np.ndarray
    start: int = 0  # simulated time the trial started; every epoch takes one unit
    done: int = 0
    last: dict[str, Any] = field(default_factory=dict)


@dataclass
class ReplayRun:
    arm: str
    seed: int
    values: list[float]  # the objective of each trial-epoch, in the order reported
    trials: int
    stopped_early: int

    @property
    def curve(self) -> list[float]:
        return best_so_far(self.values)


def replay(table: CurveTable, space: SearchSpace, arm: str, seed: int, budget: int, *, concurrency: int = 2,
           n_startup: int = 3, reduction_factor: float = 4, metric: str = "objective",
           mode: str = "max", points: list[dict[str, Any]] | None = None) -> ReplayRun:
    """One arm of a sweep replayed on `table` with sampler seed `seed` (see the module docstring).

    `points` (complete configurations, as `build_param_space(space, cfg)[1]` gives them) are proposed first,
    as a live sweep evaluates its space's points_to_evaluate; by default none are."""
    sampler, sched_name = ARMS[arm]
    param_space, _ = build_param_space(space)
    searcher = make_searcher(False, list(points or []), metric, mode, seed, n_startup, concurrency, sampler)
    searcher.set_search_properties(metric, mode, param_space)
    scheduler = make_scheduler(sched_name, metric, mode, table.epochs, reduction_factor)
    np.random.seed(seed)  # ASHA picks a bracket with numpy's global stream (one bracket here: no draw matters)
    pick = random.Random(seed)  # which recorded seed of a configuration a trial replays
    running: list[_Trial] = []
    started: list[_Trial] = []
    values: list[float] = []
    n_trials = stopped = now = 0

    def start() -> None:
        nonlocal n_trials
        tid = f"t{n_trials:04d}"
        config = searcher.suggest(tid)
        runs = table.curves[table.snap(config)]
        trial = _Trial(tid, config, runs[pick.randrange(len(runs))], start=now)
        if scheduler is not None:
            scheduler.on_trial_add(None, trial)
        running.append(trial)
        started.append(trial)
        n_trials += 1

    def complete(trial: _Trial) -> None:  # in Tune's order: the scheduler, then the searcher
        if scheduler is not None:
            scheduler.on_trial_complete(None, trial, trial.last)
        searcher.on_trial_complete(trial.trial_id, result=trial.last)
        running.remove(trial)

    while len(values) < budget:
        while len(running) < concurrency:
            start()
        trial = min(running, key=lambda t: (t.start + t.done + 1, t.trial_id))  # the next epoch to finish
        now = trial.start + trial.done + 1
        value = float(trial.curve[trial.done])
        trial.done += 1
        trial.last = {metric: value, "training_iteration": trial.done}
        values.append(value)
        searcher.on_trial_result(trial.trial_id, trial.last)
        action = TrialScheduler.CONTINUE
        if scheduler is not None:
            action = scheduler.on_trial_result(None, trial, trial.last)
        if action == TrialScheduler.STOP or trial.done >= table.epochs:
            stopped += trial.done < table.epochs
            complete(trial)
    return ReplayRun(arm, seed, values, sum(t.done > 0 for t in started), stopped)  # trials that reported


__all__ = ["ARMS", "CurveTable", "ReplayRun", "replay"]
