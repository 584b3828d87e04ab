"""Hyper-parameter sweeps: a Ray Tune `Tuner` over the training driver, Optuna TPE, optional ASHA.

The three-function pattern of Ray Train V2: the per-worker loop; the driver (`train_fn_for_trial(cfg,
run_id)`, which calls `stence.train.driver.fit`, the same code path as a single run); and a Tuner over
a trial function that applies the sampled dotted overrides to the base config and calls the driver.

MLflow: one parent run per sweep and one nested child run per trial, found again by its trial-id tag
when a sweep resumes (no duplicates). The trial function ends its child run; a Tune callback on this
process ends the runs of trials the trial function could not end itself (stopped by ASHA: the trial
is killed, so nothing after fit() runs; or crashed), so no run is left RUNNING. A driver killed outright
(SIGKILL) ends nothing: `resume` first ends the runs it orphaned (tune/trial_runs.py `repair_runs`), as
`stence runs repair --sweep NAME` does for a sweep that will not be resumed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from stence.config import Config, apply_overrides, load_config, save_config, to_dict, update
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.lineage import log_cohort_input
from stence.tracking.owner import driver_identity
from stence.tracking.runs import NullTracker, Tracker, search_runs_by, start_run
from stence.tracking.spool import SPOOL_NAME
from stence.tracking.tags import (
    BEST_CHECKPOINT_TAG,
    BEST_OVERRIDES_TAG,
    BEST_TRIAL_TAG,
    DRIVER_TAG,
    FAILED_TRIALS_TAG,
    INTERRUPTED_TAG,
    KIND_TAG,
    PARENT_TAG,
    RESUMED_AT_TAG,
    SPACE_TAG,
    SPOOL_TAG,
    STOPPED_TAG,
    SWEEP_PATH_TAG,
    SWEEP_TAG,
    TRIAL_TAG,
)
from stence.train.driver import absolute_storage, ensure_ray
from stence.tune.search import (
    SEARCHES,
    default_concurrency,
    driver_resources,
    make_scheduler,
    make_searcher,
    startup_trials,
)
from stence.tune.spaces import SearchSpace, build_param_space, load_space, space_name
from stence.tune.summary import SUMMARY_DIR, write_summary
from stence.tune.sweep_state import SweepState
from stence.tune.trial_runs import (
    ChildRunCloser,
    flush_spools,
    make_trial_fn,
    repair_runs,
    trial_spools,
    tune_trial_states,
)

logger = logging.getLogger(__name__)

STATE_FILE = "stence_sweep.json"  # in the Tune experiment dir: parent run id and sweep settings
BASE_CONFIG_FILE = "stence_base_config.yaml"  # the resolved base config the trials override
SPACE_FILE = "space.yaml"  # in the Tune experiment dir: the space's YAML text, logged to the parent run


@dataclass
class SweepResult:
    best_overrides: dict[str, Any]  # the best trial's sampled values, dotted keys
    best_config: Config  # the base config with those overrides applied
    best_metric: float  # best value of `metric` reported by the best trial
    best_checkpoint: str | None  # path of that trial's checkpoint scoring best_metric
    best_trial_id: str
    parent_run_id: str | None
    results: pd.DataFrame  # one row per trial (last result, config/..., mlflow_run_id)
    path: str  # Tune experiment directory, the argument of a later `resume`
    complete: bool  # False when the sweep was interrupted (resume it with `resume=path`)
    summary: dict[str, Any] | None = None  # tune/summary.py: trials sorted, importances, best-so-far curve


TRIAL_MAX_FAILURES = 2


def _resolve_base(cfg: Config) -> Config:
    """Absolute storage and tracking URI: trials run with the trial directory as cwd."""
    cfg = update(cfg, train=update(cfg.train, storage_path=absolute_storage(cfg.train.storage_path)))
    if cfg.tracking.enabled:
        cfg = update(cfg, tracking=update(cfg.tracking, uri=resolve_tracking_uri(cfg)))
    return cfg


def _best_checkpoint(result: Any, metric: str, mode: str) -> str | None:
    """The checkpoint path (reported by TuneReportCallback) of the trial's best report that still exists."""
    df = result.metrics_dataframe
    if df is None or "checkpoint_path" not in df or metric not in df:
        return None
    df = df.dropna(subset=["checkpoint_path", metric]).sort_values(metric, ascending=(mode == "min"))
    for path in df["checkpoint_path"]:
        if "://" in str(path) or Path(path).exists():
            return str(path)
    return None


def _new_sweep(
    cfg: Config,
    space: SearchSpace | str,
    num_samples: int,
    scheduler: str,
    metric: str,
    mode: str,
    seed: int,
    name: str | None,
    search: str = "tpe",
) -> tuple[Path, Config, dict[str, Any]]:
    """Experiment dir, resolved base config and stored settings of a new sweep; opens the parent run and
    logs the space to it (the artifact space.yaml, the tag stence.space: its name, never a path)."""
    base = _resolve_base(cfg)
    space = load_space(space)  # a name, a file or a loaded space
    if space.fixed:
        if scheduler != "none":
            logger.warning("space %r is a fixed variant list: ASHA off, every variant runs to the end",
                           space.name)
        scheduler, num_samples = "none", len(space.data["variants"])
    sweep_name = name or f"{base.train.name}-sweep-{space.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    path = Path(base.train.storage_path) / sweep_name
    path.mkdir(parents=True, exist_ok=True)
    (path / SPACE_FILE).write_text(space.text, encoding="utf-8")
    state = {"name": sweep_name, "space": space.name, "metric": metric, "mode": mode,
             "num_samples": num_samples, "scheduler": scheduler, "search": search, "seed": seed,
             "parent_run_id": None}  # fmt: skip
    if base.tracking.enabled:
        state["parent_run_id"] = start_run(
            base,
            sweep_name,
            tags={SWEEP_TAG: sweep_name, KIND_TAG: "sweep", SPACE_TAG: space.name,
                  SWEEP_PATH_TAG: str(path)},
            params={f"sweep.{k}": v for k, v in state.items() if k not in ("name", "parent_run_id")},
            spool=path / SPOOL_NAME,
        )
        parent = Tracker(base.tracking.uri, state["parent_run_id"], spool=path / SPOOL_NAME)
        parent.log_artifact(path / SPACE_FILE)  # the YAML as the user wrote it, comments included
        log_cohort_input(base.tracking.uri, state["parent_run_id"], base.data.cohort, "train+val")  # its trials' data
    save_config(base, path / BASE_CONFIG_FILE)
    (path / STATE_FILE).write_text(json.dumps(state, indent=1))
    return path, base, state


def _resumed_sweep(resume: str, given: dict[str, Any]) -> tuple[Path, Config, dict[str, Any]]:
    """Experiment dir, stored base config and settings of an interrupted sweep; reopens the parent run."""
    path = Path(absolute_storage(resume))
    state = json.loads((path / STATE_FILE).read_text())
    state.setdefault("search", "tpe")  # sweeps started before `search` existed were TPE sweeps
    base = load_config(path / BASE_CONFIG_FILE)
    for key, value in given.items():
        if value != state[key]:
            logger.warning("resume: using the stored %s=%r, not %r", key, state[key], value)
    if state["parent_run_id"]:
        # a driver SIGKILLed left its runs RUNNING: end them as repair would (trials that resume reopen theirs)
        try:
            ended, _ = repair_runs(base.tracking.uri, base.tracking.experiment, sweep=state["name"],
                                   keep=(state["parent_run_id"],))  # reopened right below
        except Exception as e:  # noqa: BLE001 - the store is down: the sweep resumes all the same
            ended = []
            logger.warning("resume: cannot repair the runs of sweep %s (%s); once the tracking store is back, "
                           "run: stence runs repair --sweep %s", state["name"], e, state["name"])
        for r in ended:
            logger.info("resume: ended orphaned run %s (%s) %s: %s", r.name, r.run_id, r.status, r.reason)
        parent = Tracker(base.tracking.uri, state["parent_run_id"], spool=path / SPOOL_NAME)
        parent.set_tags({RESUMED_AT_TAG: time.strftime("%Y-%m-%dT%H:%M:%S"), DRIVER_TAG: driver_identity(),
                         SWEEP_PATH_TAG: str(path)})
        parent.reopen()
    return path, base, state


SNAPSHOT_EVERY_S = 1  # Tune's experiment snapshot period in a sweep (TUNE_GLOBAL_CHECKPOINT_S overrides)


def _new_tuner(
    trainable: Any,
    path: Path,
    base: Config,
    state: dict[str, Any],
    space: SearchSpace,
    max_concurrent: int | None,
    max_t: int,
    reduction_factor: float,
    n_startup_trials: int | None,
    callbacks: list[Any] | None,
    stop: Any = None,
) -> tune.Tuner:
    metric, mode, num_samples = state["metric"], state["mode"], state["num_samples"]
    param_space, points = build_param_space(space, base)
    fixed = space.fixed
    k = max_concurrent or default_concurrency(base)
    n_startup = n_startup_trials if n_startup_trials is not None else startup_trials(num_samples, k)
    scheduler = make_scheduler(state["scheduler"], metric, mode, max_t, reduction_factor)
    run_callbacks = [SweepState(scheduler, stop), *(callbacks or [])]  # rungs and budget survive a --resume
    if state["parent_run_id"]:
        run_callbacks.insert(0, ChildRunCloser(base.tracking.uri, base.tracking.experiment, state["name"],
                                               spool=path / SPOOL_NAME, parent_run_id=state["parent_run_id"],
                                               storage_path=absolute_storage(base.train.storage_path)))
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(fixed, points, metric, mode, state["seed"], n_startup, k,
                                 state.get("search", "tpe")),
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=None if fixed else k,
        ),
        run_config=tune.RunConfig(name=state["name"], storage_path=str(path.parent), callbacks=run_callbacks,
                                  stop=stop,  # e.g. tune.budget.TrialEpochBudget: ends the whole sweep
                                  # a trial whose node disappears is retried from its latest checkpoint
                                  failure_config=tune.FailureConfig(max_failures=TRIAL_MAX_FAILURES)),
    )


def run_sweep(
    train_fn_for_trial: Callable[[Config, str | None], Any],
    cfg: Config,
    *,
    space: str | os.PathLike | SearchSpace,
    num_samples: int,
    max_concurrent: int | None = None,
    scheduler: str = "asha",
    metric: str,
    mode: str = "max",
    resume: str | None = None,
    seed: int = 0,
    name: str | None = None,
    max_t: int = 100,
    reduction_factor: float = 4,
    n_startup_trials: int | None = None,
    callbacks: list[Any] | None = None,
    search: str = "tpe",
    stop: Any = None,
    interval: tuple[str, str, str] | None = None,
) -> SweepResult:
    """Run (or, with `resume=<experiment dir>`, resume) a sweep of `train_fn_for_trial` over `space` (a
    built-in name, a `.yaml`/`.yml` file or a loaded `SearchSpace`; a bad one fails before Ray starts).

    Optuna TPE (seeded) proposes the trials after the space's points_to_evaluate; ASHA (time_attr
    training_iteration, grace period 1) stops poor trials early. A fixed variant space (the ablation)
    runs each variant once with ASHA off; num_samples is then the number of variants. max_concurrent
    defaults to what the cluster's CPUs/GPUs allow. On resume the stored settings, base config and
    parent run are reused, and unfinished trials continue: their Train runs resume from their
    checkpoints and their child runs are reopened. `callbacks` are extra Tune callbacks.

    `search` picks the Optuna sampler: "tpe" (TPESampler) or "random" (RandomSampler, same seed, same
    OptunaSearch and points_to_evaluate); it is stored with the sweep, so a resume keeps it. `stop` goes
    to `tune.RunConfig(stop=...)` (a dict, a function or a `tune.Stopper`); a sweep ended by a Stopper
    whose `stop_all()` is true counts as complete, not interrupted. ASHA's rungs and a TrialEpochBudget's
    count are saved with Tune's experiment snapshots and come back on resume (tune/sweep_state.py).
    `interval` names (value, low, high) result columns the summary's trials table shows at each trial's best.
    """
    if scheduler not in ("asha", "none"):
        raise ValueError(f"scheduler must be 'asha' or 'none', got {scheduler!r}")
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    space = space if resume else load_space(space)  # a resumed sweep keeps its own (restored by Tune)
    # Tune snapshots the experiment (trials, Optuna, ASHA's rungs) at most every 10 s by default: a driver
    # killed in between loses the results since. Every second costs little and leaves at most each trial's
    # last epoch to the restored trials' re-report (stence.train.worker.report_restored). The user's wins.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(SNAPSHOT_EVERY_S))
    ensure_ray()
    if resume:
        path, base, state = _resumed_sweep(
            resume, {"space": space_name(space), "metric": metric, "mode": mode, "search": search}
        )
    else:
        path, base, state = _new_sweep(cfg, space, num_samples, scheduler, metric, mode, seed, name, search)
    trial_fn = make_trial_fn(train_fn_for_trial, to_dict(base), state["parent_run_id"], state["name"],
                             driver=driver_identity(), spool=path / SPOOL_NAME)
    trainable = tune.with_resources(trial_fn, driver_resources())  # Train workers ask for their own
    parent: Tracker | NullTracker = NullTracker()
    if state["parent_run_id"]:
        parent = Tracker(base.tracking.uri, state["parent_run_id"], spool=path / SPOOL_NAME)
    try:
        if resume:
            tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_unfinished=True)
            stop = restored_stop(tuner)  # the sweep's own stopper (its count comes back with SweepState)
        else:
            tuner = _new_tuner(
                trainable,
                path,
                base,
                state,
                space,
                max_concurrent,
                max_t,
                reduction_factor,
                n_startup_trials,
                callbacks,
                stop,
            )
        grid = tuner.fit()
    except BaseException:
        parent.end("FAILED")
        raise
    return _finish(grid, base, state, path, parent, stopped=_stopped_all(stop), interval=interval)


def _summary(grid: Any, df: pd.DataFrame, path: Path, metric: str, mode: str,
             parent: Tracker | NullTracker, interval: tuple[str, str, str] | None = None) -> dict[str, Any] | None:
    """The sweep's summary (tune/summary.py) in `<sweep folder>/summary/`, logged to the parent run; None (with
    a warning) when it cannot be made: the sweep's result stands without it."""
    try:
        summary = write_summary(grid, df, load_space(path / SPACE_FILE), metric, mode, path / SUMMARY_DIR,
                                interval=interval)
    except Exception as e:  # noqa: BLE001 - a summary is a view of the result, never a reason to fail it
        logger.warning("no sweep summary (%s: %s)", type(e).__name__, e)
        return None
    for f in summary["files"]:
        parent.log_artifact(f, SUMMARY_DIR)
    return summary


def restored_stop(tuner: tune.Tuner) -> Any:
    """The `stop` a restored sweep was started with (unpickled from its tuner.pkl)."""
    return tuner._local_tuner.get_run_config().stop  # Tuner keeps no public accessor for it


def _stopped_all(stop: Any) -> bool:
    """True when `stop` is a Tune Stopper that ended the whole experiment (e.g. a spent budget)."""
    return isinstance(stop, tune.Stopper) and bool(stop.stop_all())


def _flush_trials(base: Config, runs: list[Any]) -> None:
    """Replay what the trials' workers left in their spools (a worker killed or ended before its replay got
    through), so the trial runs hold every epoch Tune saw before the sweep's result is read against them."""
    uri, storage = base.tracking.uri, absolute_storage(base.train.storage_path)
    spools = [s for r in runs
              for s in trial_spools(uri, storage, r.data.tags.get(TRIAL_TAG, ""), r.data.tags.get(SPOOL_TAG))]
    flush_spools(list(dict.fromkeys(spools)))


def _finish(
    grid: Any, base: Config, state: dict, path: Path, parent: Tracker | NullTracker, stopped: bool = False,
    interval: tuple[str, str, str] | None = None,
) -> SweepResult:
    """Close orphaned runs, summarise, end the parent run (or mark it interrupted)."""
    metric, mode, sweep_name = state["metric"], state["mode"], state["name"]
    # A trial is over when it errored, its last result says done (finished or stopped by ASHA), or Tune's
    # final snapshot has it TERMINATED (a trial that finished before a resume: the snapshot keeps its last
    # result from before Tune marked it done); an interrupted sweep leaves trials that are none of these, or
    # fewer trials than num_samples.
    statuses = tune_trial_states(path)
    over = [r.error is not None or bool(r.metrics.get("done"))
            or statuses.get(str(r.metrics.get("trial_id"))) in ("TERMINATED", "ERROR") for r in grid]
    # A Stopper that ended the experiment (a spent budget) stopped it on purpose: complete, not interrupted.
    complete = stopped or (len(grid) >= state["num_samples"] and all(over))
    children: dict[str, str] = {}
    if parent.run_id:
        uri, exp = base.tracking.uri, base.tracking.experiment
        parent.flush()  # the trial ends the trial actors buffered come first
        try:
            runs = search_runs_by(uri, exp, {PARENT_TAG: parent.run_id})
            for run in runs:
                children.setdefault(run.data.tags.get(TRIAL_TAG, ""), run.info.run_id)
            _flush_trials(base, runs)
            # Every trial process is gone now: a child still RUNNING belongs to an interrupted trial, or to
            # one a Stopper ended with the experiment (Tune calls no on_trial_complete then): stopped early.
            for run in search_runs_by(uri, exp, {PARENT_TAG: parent.run_id}, status="RUNNING"):
                t = Tracker(uri, run.info.run_id, spool=parent.spool)
                if stopped:
                    t.set_tags({STOPPED_TAG: "true"})
                t.end("FINISHED" if stopped else "KILLED", if_running=True)
        except Exception as e:  # noqa: BLE001 - the store is down: the sweep's result does not depend on it
            logger.warning("tracking degraded: cannot list the trial runs of sweep %s (%s); once the store is "
                           "back, run: stence runs repair --sweep %s", sweep_name, e, sweep_name)

    df = grid.get_dataframe()
    if "trial_id" in df:
        df["mlflow_run_id"] = df["trial_id"].map(children)
    ok = [
        r
        for r in grid
        if r.error is None and r.metrics_dataframe is not None and metric in r.metrics_dataframe
    ]
    if not ok:
        parent.set_tags({INTERRUPTED_TAG: str(not complete).lower()})
        parent.end("KILLED" if not complete else "FAILED")
        raise RuntimeError(f"sweep {sweep_name}: no trial reported {metric!r} (results in {path})")
    best = grid.get_best_result(metric=metric, mode=mode, scope="all", filter_nan_and_inf=True)
    series = best.metrics_dataframe[metric].dropna()
    best_metric = float(series.max() if mode == "max" else series.min())
    overrides = {k: v for k, v in best.config.items()}
    best_cfg = apply_overrides(base, overrides)
    result = SweepResult(
        best_overrides=overrides,
        best_config=best_cfg,
        best_metric=best_metric,
        best_checkpoint=_best_checkpoint(best, metric, mode),
        best_trial_id=str(best.metrics.get("trial_id", "")),
        parent_run_id=parent.run_id,
        results=df,
        path=str(path),
        complete=complete,
    )
    n_failed = sum(r.error is not None for r in grid)
    parent.set_tags(
        {
            BEST_TRIAL_TAG: result.best_trial_id,
            BEST_OVERRIDES_TAG: json.dumps(overrides, sort_keys=True, default=str),
            BEST_CHECKPOINT_TAG: result.best_checkpoint or "",
            FAILED_TRIALS_TAG: n_failed,
            INTERRUPTED_TAG: str(not complete).lower(),
        }
    )
    if math.isfinite(best_metric):
        parent.log_metrics({f"best/{metric}": best_metric}, step=0)
    result.summary = _summary(grid, df, path, metric, mode, parent, interval)
    if not complete:
        logger.warning("sweep %s interrupted; resume with resume=%r", sweep_name, str(path))
        parent.end("KILLED")
    else:
        parent.end("FINISHED" if n_failed < len(grid) else "FAILED")
    return result


__all__ = ["SEARCHES", "ChildRunCloser", "SweepResult", "default_concurrency", "run_sweep"]
