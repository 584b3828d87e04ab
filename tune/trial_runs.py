"""The MLflow side of a sweep's trials: the function Tune runs per trial (sampled overrides -> config ->
the training driver, inside a nested child run found again by its trial-id tag on resume), the Tune
callback that ends the child runs a trial could not end itself (killed by ASHA, or crashed), and the repair
of a sweep whose driver died (SIGKILL): its parent and trial runs are ended in the state Tune left them in.

Every run of a sweep names the sweep driver as its driver (`stence.driver`): a trial's child run is orphaned
when the sweep driver is gone, whatever its trial actors do. Tracking calls go through the sweep's spool
(`<sweep folder>/mlflow_spool.jsonl`), so a tracking store that is down never fails a trial at its end.

A trial's Train workers log its epochs through their own spool (`trial_spools`). A worker whose store was slow
or locked leaves its lines there for its background replay, and a worker that is killed (ASHA stopped its
trial) or ends before that replay got through takes the replay with it: the trial's end, the callback and the
sweep's end replay those spools (`flush_spools`), so the run holds every epoch Tune saw before anyone reads it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune

from stence.config import Config, apply_overrides, from_dict
from stence.tracking.client import default_spool, resolve_tracking_uri, tracking_client
from stence.tracking.repair import Repair, end_orphans, find_orphans, replay_spools
from stence.tracking.replay import replay
from stence.tracking.runs import NullTracker, Tracker, find_run_by, run_status, start_run
from stence.tracking.spool import FLUSH_LOCK_WAIT_S, SPOOL_NAME, pending_records, replay_command
from stence.tracking.tags import (
    DRIVER_TAG,
    HEARTBEAT_TAG,
    OVERRIDES_TAG,
    PARENT_TAG,
    SPOOL_TAG,
    STOPPED_TAG,
    SWEEP_PATH_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)
from stence.train.driver import tune_trial_id
from stence.train.worker import latest_tracked_stamp

logger = logging.getLogger(__name__)

LAST_EPOCH_GRACE_S = 10.0  # how long a stopped trial's worker may still take to log its last epoch
HEARTBEAT_EVERY_S = 60.0  # the sweep driver refreshes its parent run's heartbeat at most this often


def trial_spools(uri: str, storage_path: str | None, trial_id: str, tagged: str | None = None) -> list[Path]:
    """The spool files a trial's trackers may have buffered to: the one its run names (`tagged`, SPOOL_TAG), the
    ones in its Ray Train run folders (`<storage>/<stage>-<trial id>/`, where a pipeline's workers spool) and the
    store's default one (where a tracker given no spool buffers)."""
    spools = [Path(tagged)] if tagged else []
    if storage_path and trial_id and "://" not in storage_path:
        spools += sorted(Path(storage_path).glob(f"*-{trial_id}/{SPOOL_NAME}"))
    spools.append(default_spool(uri))
    return list(dict.fromkeys(spools))


def flush_spools(spools: list[Path], wait_s: float = FLUSH_LOCK_WAIT_S) -> int:
    """Replay, in this thread, what is pending in `spools` (lines of any process; a step a run has is skipped),
    waiting at most `wait_s` for another process's replay of the same file; returns how many lines remain (a
    warning names the replay command for them)."""
    left = 0
    for spool in spools:
        if not (spool.exists() and pending_records(spool)):
            continue
        stats = replay(spool, wait_s)
        if stats.pending:
            logger.warning("tracking degraded: %d items buffered in %s are not in the store yet (%s); when it is "
                           "back, run: %s", stats.pending, spool, stats.error, replay_command(spool))
        left += stats.pending
    return left


def _end_trial_run(tracker: Tracker | NullTracker, status: str, storage_path: str, trial_id: str) -> None:
    """End the trial's run (if still RUNNING) once what its workers buffered is in it."""
    if tracker.run_id:
        flush_spools(trial_spools(tracker.uri, storage_path, trial_id))
    tracker.end(status, if_running=True)


def make_trial_fn(
    train_fn_for_trial: Callable[[Config, str | None], Any],
    base: dict[str, Any],
    parent_run_id: str | None,
    sweep_name: str,
    driver: str = "",
    spool: str | Path | None = None,
) -> Callable[[dict], None]:
    """The function Tune runs per trial (in a trial actor whose cwd is the trial directory). `driver` is the
    sweep driver's identity, recorded on the child run; `spool` the sweep's spool file."""

    def stence_trial(config: dict) -> None:
        cfg = apply_overrides(from_dict(base), dict(config))
        trial_id = tune_trial_id()
        tracker: Tracker | NullTracker = NullTracker()
        if cfg.tracking.enabled and parent_run_id:
            uri = cfg.tracking.uri
            tags = {TRIAL_TAG: trial_id, SWEEP_TAG: sweep_name}
            run_id = find_run_by(uri, cfg.tracking.experiment, tags)
            if run_id is None:
                tags.update({OVERRIDES_TAG: json.dumps(config, sort_keys=True, default=str),
                             **({DRIVER_TAG: driver} if driver else {})})
                run_id = start_run(cfg, f"{sweep_name}-{trial_id}", parent_run_id=parent_run_id, tags=tags)
                tracker = Tracker(uri, run_id, spool=spool)
            else:
                tracker = Tracker(uri, run_id, spool=spool)
                if driver:  # the new sweep driver first: a repair meanwhile must not take the run for orphaned
                    tracker.set_tags({DRIVER_TAG: driver})
                tracker.reopen()  # a resumed trial logs on into its child run
        try:
            train_fn_for_trial(cfg, tracker.run_id)
        except BaseException:
            _end_trial_run(tracker, "FAILED", cfg.train.storage_path, trial_id or "")
            raise
        _end_trial_run(tracker, "FINISHED", cfg.train.storage_path, trial_id or "")

    return stence_trial


class ChildRunCloser(tune.Callback):
    """Ends the child runs the trial function could not end: ASHA-stopped trials are killed while in
    fit() (FINISHED, tagged stopped early); crashed trial processes end FAILED. Before that, the trial's last
    checkpointed epoch is logged if its worker was killed before logging it (a worker logs an epoch after its
    report, and the report is what lets ASHA stop the trial). Also refreshes the parent run's heartbeat. A
    tracking store that is down is only logged: `stence runs repair` catches up."""

    def __init__(self, uri: str, experiment: str, sweep_name: str, spool: str | Path | None = None,
                 parent_run_id: str | None = None, storage_path: str | Path | None = None):
        self.uri = uri
        self.experiment = experiment
        self.sweep_name = sweep_name
        self.spool = spool
        self.parent_run_id = parent_run_id
        self.storage_path = str(storage_path) if storage_path else None  # where the trials' Train runs are
        self._beat = 0.0

    def _flush_workers(self, tracker: Tracker, trial_id: str) -> None:
        """Replay what the trial's killed workers buffered (their earlier epochs: a worker logs an epoch before it
        reports the next one, so all of them are in its spool by now). Bounded by LAST_EPOCH_GRACE_S per spool,
        not to hold Tune up: what is left is replayed when the sweep ends."""
        tagged = tracking_client(self.uri).get_run(tracker.run_id).data.tags.get(SPOOL_TAG)
        spools = trial_spools(self.uri, getattr(self, "storage_path", None), trial_id, tagged)
        flush_spools(spools, LAST_EPOCH_GRACE_S)

    def _log_last_epoch(self, tracker: Tracker, trial_id: str) -> None:
        """Log the metrics of the trial's newest checkpoint unless its run has them. The trial's own worker may
        still be writing them: wait for that first (at most LAST_EPOCH_GRACE_S); the log skips every step the
        run has by then."""
        storage = getattr(self, "storage_path", None)  # absent in callbacks pickled by older versions
        if not storage:
            return
        stamp = None
        for run_dir in Path(storage).glob(f"*-{trial_id}"):
            stamp = latest_tracked_stamp(run_dir) or stamp
        if not stamp or stamp.get("run_id") != tracker.run_id or not stamp.get("metrics"):
            return
        key, step = next(iter(stamp["metrics"])), int(stamp["step"])
        client = tracking_client(self.uri)
        deadline = time.monotonic() + LAST_EPOCH_GRACE_S
        while time.monotonic() < deadline:
            if step in {m.step for m in client.get_metric_history(tracker.run_id, key)}:
                return
            time.sleep(0.2)
        tracker.refill(stamp)

    def _running_child(self, trial: Any) -> str | None:
        try:
            run_id = find_run_by(self.uri, self.experiment, {TRIAL_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name})
            if run_id and run_status(self.uri, run_id) == "RUNNING":
                return run_id
        except Exception as e:  # noqa: BLE001 - the store is down: repair ends the run later
            logger.warning("tracking degraded: cannot look up the run of trial %s (%s); `stence runs repair "
                           "--sweep %s` ends it once the store is back", trial.trial_id, e, self.sweep_name)
        return None

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if self.parent_run_id and time.monotonic() - self._beat > HEARTBEAT_EVERY_S:
            self._beat = time.monotonic()
            Tracker(self.uri, self.parent_run_id, spool=self.spool).set_tags({HEARTBEAT_TAG: int(time.time())})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_child(trial)
        if run_id:
            t = Tracker(self.uri, run_id, spool=self.spool)
            self._last_epoch_logged(t, trial.trial_id)
            t.set_tags({STOPPED_TAG: "true"})
            t.end("FINISHED", if_running=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        run_id = self._running_child(trial)
        if run_id:
            t = Tracker(self.uri, run_id, spool=self.spool)
            self._last_epoch_logged(t, trial.trial_id)
            t.end("FAILED", if_running=True)

    def _last_epoch_logged(self, tracker: Tracker, trial_id: str) -> None:
        try:
            self._flush_workers(tracker, trial_id)
            self._log_last_epoch(tracker, trial_id)
        except Exception as e:  # noqa: BLE001 - the store is down: the run is ended (and repaired) anyway
            logger.warning("tracking degraded: cannot check the last epoch of trial %s (%s)", trial_id, e)


# ---------------------------------------------------------------------------------------------------
# repair of a sweep whose driver died

TUNE_TO_MLFLOW = {"TERMINATED": "FINISHED", "ERROR": "FAILED"}  # anything else (RUNNING, PENDING...) KILLED


def tune_trial_states(sweep_path: str | Path) -> dict[str, str]:
    """{trial id: Tune status} from the newest experiment state file of a sweep folder ({} if none)."""
    states = sorted(Path(sweep_path).glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
        trials = [json.loads(t) for t, _ in data.get("trial_data", [])]
        return {t["trial_id"]: t["status"] for t in trials}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class SweepStatus:
    """The state an orphaned run of a sweep is ended in. A parent is KILLED (interrupted: `stence tune
    --resume` reopens it). A trial's child takes its trial's state in the sweep's Tune state: FINISHED if
    Tune had it terminated (ASHA stopped it, or it ended just before the kill), FAILED if errored, KILLED
    if it was still running or pending (its Train run resumes from its checkpoint with --resume)."""

    def __init__(self, uri: str):
        self.uri = uri
        self._paths: dict[str, str] = {}
        self._states: dict[str, dict[str, str]] = {}

    def _sweep_path(self, parent_id: str) -> str:
        if parent_id not in self._paths:
            try:
                tags = tracking_client(self.uri).get_run(parent_id).data.tags
                self._paths[parent_id] = tags.get(SWEEP_PATH_TAG, "")
            except Exception:  # noqa: BLE001 - a deleted parent: KILLED is the safe default
                self._paths[parent_id] = ""
        return self._paths[parent_id]

    def __call__(self, run: Any) -> str:
        tags = run.data.tags
        trial_id, parent = tags.get(TRIAL_TAG), tags.get(PARENT_TAG)
        if not trial_id or not parent:
            return "KILLED"
        path = self._sweep_path(parent)
        if path and path not in self._states:
            self._states[path] = tune_trial_states(path)
        return TUNE_TO_MLFLOW.get(self._states.get(path, {}).get(trial_id, ""), "KILLED")


def repair_runs(uri: str, experiment: str, sweep: str | None = None, older_than_min: float | None = None,
                dry_run: bool = False, keep: tuple[str, ...] = ()) -> tuple[list[Repair], list[tuple[Any, str]]]:
    """End the orphaned RUNNING runs of `experiment` (of one sweep with `sweep`; never the run ids in `keep`):
    children before parents, after replaying their spools. Returns (what was ended, [(run, why it was left
    alone)])."""
    tags = {SWEEP_TAG: sweep} if sweep else {}
    if sweep and not dry_run:  # the sweep's own spool first: it holds the trial ends its actors buffered
        verdicts = find_orphans(uri, experiment, tags, older_than_min)
        replay_spools([v.run for v in verdicts if v.orphan and PARENT_TAG not in v.run.data.tags])
    verdicts = find_orphans(uri, experiment, tags, older_than_min)
    verdicts = [v for v in verdicts if v.run.info.run_id not in keep]
    orphans = sorted((v for v in verdicts if v.orphan), key=lambda v: PARENT_TAG not in v.run.data.tags)
    kept = [(v.run, v.reason) for v in verdicts if not v.orphan]
    return end_orphans(uri, orphans, SweepStatus(uri), dry_run=dry_run), kept


def repair_configured(cfg: Config, experiment: str | None = None, sweep: str | None = None,
                      older_than_min: float | None = None,
                      dry_run: bool = False) -> tuple[str, list[Repair], list[tuple[Any, str]]]:
    """`stence runs repair`: `repair_runs` on the config's tracking store and experiment (or `experiment`);
    returns (the experiment, what was ended, what was left alone and why)."""
    experiment = experiment or cfg.tracking.experiment
    ended, kept = repair_runs(resolve_tracking_uri(cfg), experiment, sweep=sweep, older_than_min=older_than_min,
                              dry_run=dry_run)
    return experiment, ended, kept


__all__ = ["ChildRunCloser", "SweepStatus", "flush_spools", "make_trial_fn", "repair_configured", "repair_runs",
           "trial_spools", "tune_trial_states"]
