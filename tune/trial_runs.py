"""The MLflow side of a sweep's trials: the function Tune runs per trial (sampled overrides -> config ->
the training driver, inside a nested child run found again by its trial-id tag on resume), and the Tune
callback that ends the child runs a trial could not end itself (killed by ASHA, or crashed)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from ray import tune

from stence.config import Config, apply_overrides, from_dict
from stence.train.driver import tune_trial_id
from stence.train.tracking import NullTracker, Tracker, find_run_by, run_status, start_run

TRIAL_TAG = "stence.trial_id"
SWEEP_TAG = "stence.sweep"
STOPPED_TAG = "stence.stopped_early"


def make_trial_fn(
    train_fn_for_trial: Callable[[Config, str | None], Any],
    base: dict[str, Any],
    parent_run_id: str | None,
    sweep_name: str,
) -> Callable[[dict], None]:
    """The function Tune runs per trial (in a trial actor whose cwd is the trial directory)."""

    def stence_trial(config: dict) -> None:
        cfg = apply_overrides(from_dict(base), dict(config))
        trial_id = tune_trial_id()
        tracker: Tracker | NullTracker = NullTracker()
        if cfg.tracking.enabled and parent_run_id:
            uri = cfg.tracking.uri
            tags = {TRIAL_TAG: trial_id, SWEEP_TAG: sweep_name}
            run_id = find_run_by(uri, cfg.tracking.experiment, tags)
            if run_id is None:
                tags["stence.overrides"] = json.dumps(config, sort_keys=True, default=str)
                run_id = start_run(cfg, f"{sweep_name}-{trial_id}", parent_run_id=parent_run_id, tags=tags)
            tracker = Tracker(uri, run_id)
            tracker.reopen()  # a resumed trial logs on into its child run
        try:
            train_fn_for_trial(cfg, tracker.run_id)
        except BaseException:
            if tracker.run_id and run_status(tracker.uri, tracker.run_id) == "RUNNING":
                tracker.end("FAILED")
            raise
        if tracker.run_id and run_status(tracker.uri, tracker.run_id) == "RUNNING":
            tracker.end("FINISHED")

    return stence_trial


class ChildRunCloser(tune.Callback):
    """Ends the child runs the trial function could not end: ASHA-stopped trials are killed while in
    fit() (FINISHED, tagged stopped early); crashed trial processes end FAILED."""

    def __init__(self, uri: str, experiment: str, sweep_name: str):
        self.uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name

    def _running_child(self, trial: Any) -> str | None:
        run_id = find_run_by(
            self.uri, self.experiment, {TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name}
        )
        if run_id and run_status(self.uri, run_id) == "RUNNING":
            return run_id
        return None

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_child(trial)
        if run_id:
            t = Tracker(self.uri, run_id)
            t.set_tags({STOPPED_TAG: "true"})
            t.end("FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_child(trial)
        if run_id:
            Tracker(self.uri, run_id).end("FAILED")
