"""Crash-consistent sweeps: a SIGKILLed sweep driver resumed with --resume, and a Train worker SIGKILLed
mid-epoch inside a trial. Real Ray Tune, Optuna TPE, ASHA, Ray Train (gloo) and MLflow (SQLite).

What must hold afterwards: every trial's MLflow run has each metric step once and ends FINISHED; ASHA decided
on every epoch as an uninterrupted sweep would have on the same values (its rung records came back with the
resume); Optuna's study holds each trial once, with its config and its final value.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pytest
from ray.tune.schedulers import TrialScheduler
from ray.tune.search.optuna import OptunaSearch

from stence.config import load_config
from stence.tracking.tags import STOPPED_TAG, TRIAL_TAG
from stence.tune.budget import TrialEpochBudget
from stence.tune.search import make_scheduler
from stence.tune.sweep import run_sweep
from stence.tune.sweep_state import SweepState
from tests.cluster_fixtures import pids_mentioning, tail, wait_until
from tests.crash_sweep_driver import CRASH_SPACE, EPOCHS, NUM_SAMPLES, SWEEP_KWARGS
from tests.ray_fixture import ray_test_settings, shared_mlflow_db
from tests.toy_loop import METRIC, toy_train_fn

REPO = Path(__file__).resolve().parents[1]


def _trial(tid: str) -> Any:
    return SimpleNamespace(trial_id=tid)


def _feed(asha: Any, tid: str, values: list[float]) -> list[str]:
    """ASHA's decision on each epoch of one trial, as Tune's controller asks for them."""
    decisions = []
    for epoch, v in enumerate(values, start=1):
        decisions.append(asha.on_trial_result(None, _trial(tid), {"training_iteration": epoch, METRIC: v}))
        if decisions[-1] == TrialScheduler.STOP:
            break
    return decisions


# ---------------------------------------------------------------------------------------------------
# the state itself


def test_sweep_state_brings_back_asha_rungs_and_the_budget_count() -> None:
    asha = make_scheduler("asha", METRIC, "max", 4, 2)
    budget = TrialEpochBudget(100)
    keeper = SweepState(asha, budget)
    for tid, values in (("a", [0.5, 0.6, 0.7, 0.8]), ("b", [0.9, 0.95, 0.97, 0.99])):
        asha.on_trial_add(None, _trial(tid))
        for e, v in enumerate(values, start=1):
            budget(tid, {"training_iteration": e, METRIC: v})
        _feed(asha, tid, values)
    asha.on_trial_add(None, _trial("c"))  # live at the snapshot
    saved = pickle.loads(pickle.dumps(keeper.get_state()))  # Tune pickles it into callback-states-*.pkl

    # what Tuner.restore does: the objects of tuner.pkl (fresh rungs, zero count), then set_state
    fresh_asha, fresh_budget = make_scheduler("asha", METRIC, "max", 4, 2), TrialEpochBudget(100)
    SweepState(fresh_asha, fresh_budget).set_state(saved)
    assert fresh_budget.spent == budget.spent == 8 and fresh_budget._last_iteration == {"a": 4, "b": 4}
    fresh_asha.on_trial_add(None, _trial("c"))
    # a poor trial after the restore meets the same cutoff as without the restart: stopped at the first rung
    assert _feed(fresh_asha, "c", [0.1, 0.2]) == _feed(asha, "c", [0.1, 0.2]) == [TrialScheduler.STOP]
    # ... where an ASHA rebuilt without the state would have let it go on
    empty = make_scheduler("asha", METRIC, "max", 4, 2)
    empty.on_trial_add(None, _trial("c"))
    assert _feed(empty, "c", [0.1, 0.2]) == [TrialScheduler.CONTINUE, TrialScheduler.CONTINUE]
    # a restored epoch reported again does not spend the budget a second time
    assert not fresh_budget("a", {"training_iteration": 4, METRIC: 0.8, "stence/restored": 1.0})
    assert fresh_budget.spent == 8


def test_the_callback_holds_the_objects_tune_uses_after_unpickling() -> None:
    """tuner.pkl pickles the scheduler, the stopper and the callbacks in one go: references survive."""
    asha, budget = make_scheduler("asha", METRIC, "max", 4, 2), TrialEpochBudget(10)
    tune_config, run_config = pickle.loads(pickle.dumps(({"scheduler": asha}, {"stop": budget,
                                                                                "callbacks": [SweepState(asha, budget)]})))
    keeper = run_config["callbacks"][0]
    assert keeper.scheduler is tune_config["scheduler"] and keeper.stopper is run_config["stop"]


# ---------------------------------------------------------------------------------------------------
# the sweep driver SIGKILLed, then resumed


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id], order_by=["start_time ASC"])


def _driver(args: list[str], root: Path, uri: str, log: Path) -> tuple[int, Path]:
    """Run tests/crash_sweep_driver.py in its own process and Ray instance; returns (exit code, Ray tmp)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="crs-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), MLFLOW_DISABLE_TELEMETRY="true", **ray_test_settings())
    with open(log, "a") as out:
        proc = subprocess.run([sys.executable, "-m", "tests.crash_sweep_driver", "--root", str(root), "--uri", uri,
                               *args], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              start_new_session=True, timeout=900)  # fmt: skip
    return proc.returncode, ray_tmp


def _kill_ray(ray_tmp: Path) -> None:
    for pid in pids_mentioning(str(ray_tmp)):  # a dead driver's Ray instance
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_sweep_driver_resumes_where_asha_and_optuna_were(tmp_path: Path) -> None:
    uri, log = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "driver.log"
    arm = tmp_path / "arm"
    arm.write_text("")
    rc, ray_tmp = _driver(["--kill-at", f"1:2:{arm}"], tmp_path, uri, log)
    _kill_ray(ray_tmp)
    assert rc == -signal.SIGKILL and not arm.exists(), f"the driver was not killed where planned:\n{tail(log)}"
    before = _runs(uri, "crash")
    children_before = {r.data.tags[TRIAL_TAG]: r for r in before if "mlflow.parentRunId" in r.data.tags}
    assert len(children_before) == 2 and {r.info.status for r in before} == {"RUNNING", "FINISHED"}

    sweep = tmp_path / "ray" / "crash"
    rc, ray_tmp = _driver(["--resume", str(sweep)], tmp_path, uri, log)
    _kill_ray(ray_tmp)
    assert rc == 0, tail(log)
    outcome = json.loads(log.read_text().strip().splitlines()[-1])
    assert outcome["complete"] and len(outcome["trials"]) == NUM_SAMPLES

    runs = _runs(uri, "crash")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == NUM_SAMPLES  # no trial started twice, no orphan
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing RUNNING, nothing KILLED
    assert sorted(r.data.tags[TRIAL_TAG] for r in children) == outcome["trials"]
    for tid, before_run in children_before.items():  # the trials of before the kill kept their runs and configs
        after = next(r for r in children if r.data.tags[TRIAL_TAG] == tid)
        assert after.info.run_id == before_run.info.run_id and after.data.params == before_run.data.params

    # each step of every metric at most once, from epoch 0 on; ASHA's decisions are those an uninterrupted
    # sweep makes on the same values, trial after trial (one at a time)
    client = mlflow.MlflowClient(uri)
    replayed = make_scheduler("asha", METRIC, "max", SWEEP_KWARGS["max_t"], SWEEP_KWARGS["reduction_factor"])
    finals: dict[str, float] = {}
    for child in children:
        tid = child.data.tags[TRIAL_TAG]
        for key in (METRIC, "train/loss", "val/mse"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
            assert sorted(steps) == list(range(len(steps))), (tid, key, steps)
        values = [m.value for m in sorted(client.get_metric_history(child.info.run_id, METRIC), key=lambda m: m.step)]
        replayed.on_trial_add(None, _trial(tid))
        decisions = _feed(replayed, tid, values)
        assert len(decisions) == len(values), f"trial {tid} ran on after ASHA's stop: {decisions}"
        stopped_early = decisions[-1] == TrialScheduler.STOP and len(values) < EPOCHS
        assert stopped_early == (child.data.tags.get(STOPPED_TAG) == "true")
        assert len(values) == EPOCHS or stopped_early
        replayed.on_trial_complete(None, _trial(tid), {"training_iteration": len(values), METRIC: values[-1]})
        finals[tid] = values[-1]
    # the bad point, first trial after the kill, was stopped at the first rung: the rungs came back
    bad = next(c for c in children if float(c.data.params["loss.w_sten"]) == CRASH_SPACE["points_to_evaluate"][2]["loss.w_sten"])
    assert bad.data.tags.get(STOPPED_TAG) == "true"
    assert len(client.get_metric_history(bad.info.run_id, METRIC)) == 1

    # Optuna's study: one trial per Tune trial, its config and final value, all complete
    search = OptunaSearch()
    search.restore_from_dir(str(sweep))
    study = search._ot_study
    assert len(study.trials) == NUM_SAMPLES and {t.state.name for t in study.trials} == {"COMPLETE"}
    for child in children:
        tid = child.data.tags[TRIAL_TAG]
        frozen = study.trials[search._ot_trials[tid].number]
        assert frozen.params == pytest.approx({k: float(child.data.params[k]) for k in frozen.params})
        assert frozen.value == pytest.approx(finals[tid])


# ---------------------------------------------------------------------------------------------------
# a Train worker SIGKILLed mid-epoch inside a trial


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


def _committed_epoch(root: Path) -> int | None:
    """The epoch of the latest committed checkpoint of the (only) Train run under `root`."""
    for snap in root.rglob("checkpoint_manager_snapshot.json"):
        try:
            return json.loads(snap.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return None


@pytest.mark.slow
@pytest.mark.ray
def test_killed_worker_inside_a_sweep_trial_logs_each_step_once(
    ray_session: None, mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stence.tune import spaces

    monkeypatch.setitem(spaces.SPACES, "toy-worker-kill", {"kind": "variants", "variants": [{"loss.w_sten": 0.3}]})
    log_dir, hold = tmp_path / "events", tmp_path / "hold"
    log_dir.mkdir()
    hold.write_text("")  # the loop waits mid-epoch 2 (after its first batch) while this exists: the kill lands there
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", "train.workers=2", "optim.epochs=4",
                             "optim.batch_size=32", f"tracking.uri={mlflow_db}", "tracking.experiment=worker-kill",
                             "train.max_failures=2"])  # fmt: skip
    train_fn = lambda c, run_id: toy_train_fn(c, run_id, log_dir=str(log_dir), hold_mid_file=str(hold),  # noqa: E731
                                              hold_mid_epoch=2)  # epoch 1 runs through (no hold_max_s wait)
    box: dict = {}

    def sweep() -> None:
        try:
            box["result"] = run_sweep(train_fn, cfg, space="toy-worker-kill", num_samples=1, scheduler="none",
                                      metric=METRIC, mode="max", name="worker-kill", max_t=4)  # fmt: skip
        except BaseException as e:  # surfaced below
            box["error"] = e

    thread = threading.Thread(target=sweep)
    thread.start()
    try:
        events = log_dir / "events.log"
        wait_until(lambda: events.exists() and "mid epoch=2 rank=1 " in events.read_text(), 240,
                   "rank 1 in the middle of epoch 2", (events,))  # fmt: skip
        # epochs 0 and 1 are done and logged; kill once epoch 1's checkpoint is committed (the controller
        # commits when it next polls), so the restart's start is known
        wait_until(lambda: _committed_epoch(tmp_path / "ray") == 1, 60, "epoch 1's checkpoint")
        victim = int((log_dir / "pid_rank1.txt").read_text())
        os.kill(victim, signal.SIGKILL)  # rank 1 dies in the middle of epoch 2
    finally:
        hold.unlink()
        thread.join(timeout=400)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    result = box["result"]
    assert result.complete

    client = mlflow.MlflowClient(mlflow_db)
    (child,) = [r for r in _runs(mlflow_db, "worker-kill") if "mlflow.parentRunId" in r.data.tags]
    assert child.info.status == "FINISHED"
    for key in (METRIC, "train/loss", "val/mse"):
        steps = [m.step for m in client.get_metric_history(child.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, steps)  # every epoch, each once
    events = (log_dir / "events.log").read_text().splitlines()
    begins = [e for e in events if e.startswith("begin")]
    # 2 ranks, started twice: the worker group was restarted from epoch 1's checkpoint, epoch 2 done again
    assert sorted(b.split()[-1] for b in begins) == ["start=0", "start=0", "start=2", "start=2"]
    assert sum(e.startswith("end epoch=2 ") for e in events) == 2 and victim not in {
        int(e.split("pid=")[1].split()[0]) for e in begins if "start=2" in e}
    # Tune saw each epoch as its own training_iteration; the restart's repeats are marked restored
    history = result.results  # one row per trial
    assert int(history["training_iteration"].iloc[0]) == 4
