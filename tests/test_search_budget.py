"""The trial-epoch budget (a Tune Stopper), the result log, search="random", and the bench's curve maths."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import mlflow
import pytest
from ray import tune
from ray.tune.result import RESULT_DUPLICATE

from bench.bench_search import bench_space, compare_arms, median_ratio
from stence.config import Config, load_config
from stence.tracking.tags import STOPPED_TAG, SWEEP_TAG
from stence.tune import spaces
from stence.tune.budget import ResultLog, TrialEpochBudget, best_so_far, trial_epochs_to_within
from stence.tune.search import make_searcher
from stence.tune.sweep import STATE_FILE, _new_sweep, _resumed_sweep, run_sweep
from tests.ray_fixture import shared_mlflow_db

METRIC = "val/score"
EPOCHS = 3


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------
# pure: curves, thresholds, comparison


def test_best_so_far_skips_nan_and_follows_mode() -> None:
    nan = float("nan")
    curve = best_so_far([nan, 0.5, 0.4, nan, 0.7, 0.6], "max")
    assert math.isnan(curve[0]) and curve[1:] == [0.5, 0.5, 0.5, 0.7, 0.7]
    assert best_so_far([3.0, 1.0, 2.0], "min") == [3.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        best_so_far([1.0], "up")


def test_trial_epochs_to_within() -> None:
    curve = best_so_far([0.50, 0.60, 0.60, 0.685, 0.70])
    assert trial_epochs_to_within(curve, 0.70, 0.01) == 5  # 0.685 is 0.015 short
    assert trial_epochs_to_within(curve, 0.70, 0.02) == 4
    assert trial_epochs_to_within(curve, 0.80, 0.01) is None
    assert trial_epochs_to_within([float("nan"), 0.7], 0.70, 0.0) == 2
    assert trial_epochs_to_within(best_so_far([5.0, 2.0], "min"), 1.995, 0.01, "min") == 2


def test_compare_arms_on_a_hand_made_sequence() -> None:
    random = [0.50, 0.60, 0.55, 0.70, 0.65, 0.72, 0.71, 0.80, 0.99]  # the 9th is over the budget
    tpe = [0.60, 0.795, 0.50, 0.52, 0.66, 0.70, 0.74, 0.75]
    out = compare_arms({"random": random, "tpe_asha": tpe}, budget=8, tol=0.01)
    assert out["target"] == 0.80  # 0.99 came after the budget: not counted
    assert out["arms"]["random"]["curve"] == [0.50, 0.60, 0.60, 0.70, 0.70, 0.72, 0.72, 0.80]
    assert out["arms"]["random"]["best"] == 0.80 and out["arms"]["tpe_asha"]["best"] == 0.795
    assert out["arms"]["random"]["to_within"] == 8 and out["arms"]["tpe_asha"]["to_within"] == 2
    assert out["ratio"] == pytest.approx(2 / 8) and not out["random_censored"]

    # TPE finds the best; random never comes within 0.01 of it: censored at its 8 trial-epochs
    out = compare_arms({"random": random[:8], "tpe_asha": [0.6, 0.9]}, budget=8, tol=0.01)
    assert out["target"] == 0.9 and out["arms"]["random"]["to_within"] is None
    assert out["random_censored"] and out["ratio"] == pytest.approx(2 / 8)
    # random finds the best, TPE never gets close: no ratio
    out = compare_arms({"random": [0.9], "tpe_asha": [0.5, 0.6]}, budget=8, tol=0.01)
    assert out["ratio"] is None and out["arms"]["random"]["to_within"] == 1
    with pytest.raises(ValueError):
        compare_arms({"random": [float("nan")], "tpe_asha": []}, budget=8)


def test_median_ratio_counts_failures_as_infinite() -> None:
    assert median_ratio([0.2, 0.5, 0.3]) == pytest.approx(0.3)
    assert median_ratio([0.2, None, 0.3]) == pytest.approx(0.3)
    assert median_ratio([None, None, 0.3]) is None
    assert median_ratio([]) is None


def test_bench_space_drops_or_keeps_the_paper_point() -> None:
    assert spaces.build_param_space(bench_space("default", "keep"))[1]  # the paper point is there
    name = bench_space("default", "drop")
    space, points = spaces.build_param_space(name)
    assert points == [] and set(space) == set(spaces.build_param_space("default")[0])
    spaces.SPACES.pop(name)


# ---------------------------------------------------------------------------------------------------
# the stopper and the searcher, without a sweep


def test_budget_counts_results_not_repeats() -> None:
    stop = TrialEpochBudget(4)
    assert not stop("a", {METRIC: 0.1, "training_iteration": 1, "done": False}) and not stop.stop_all()
    # the trial's function returned: Tune hands over its last result again, done=True: not an epoch
    assert not stop("a", {METRIC: 0.1, "training_iteration": 1, "done": True})
    assert not stop("a", {METRIC: 0.1, "training_iteration": 1, RESULT_DUPLICATE: True})
    assert stop.spent == 1
    assert not stop("b", {METRIC: 0.2, "training_iteration": 1, "done": False})
    # a new epoch that says done (a trainable reporting done itself) is an epoch
    assert not stop("b", {METRIC: 0.2, "training_iteration": 2, "done": True}) and stop.spent == 3
    # a restored trial reporting an epoch again pays for it again
    assert stop("a", {METRIC: 0.3, "training_iteration": 1, "done": False}) and stop.stop_all()
    assert stop.spent == 4
    with pytest.raises(ValueError):
        TrialEpochBudget(0)


def test_random_search_is_the_same_optuna_search_with_another_sampler() -> None:
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    rnd = make_searcher(False, [], METRIC, "max", 3, 10, 2, search="random")
    tpe = make_searcher(False, [], METRIC, "max", 3, 10, 2, search="tpe")
    assert isinstance(rnd, OptunaSearch) and isinstance(tpe, OptunaSearch)
    assert isinstance(rnd._sampler, optuna.samplers.RandomSampler)
    assert isinstance(tpe._sampler, optuna.samplers.TPESampler)
    with pytest.raises(ValueError, match="search must be"):
        run_sweep(lambda c, r: None, Config(), space="default", num_samples=1, metric=METRIC, search="grid")


def test_search_is_stored_and_kept_on_resume(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.storage_path={tmp_path}", "tracking.enabled=false"])
    path, _, state = _new_sweep(cfg, "default", 4, "asha", METRIC, "max", 0, "s", "random")
    assert json.loads((path / STATE_FILE).read_text())["search"] == "random" == state["search"]
    _, _, resumed = _resumed_sweep(
        str(path), {"space": "default", "metric": METRIC, "mode": "max", "search": "tpe"}
    )
    assert resumed["search"] == "random"  # the stored sampler wins over the one given on resume
    old = {k: v for k, v in state.items() if k != "search"}  # a state written before `search` existed
    (path / STATE_FILE).write_text(json.dumps(old))
    assert (
        _resumed_sweep(str(path), {"space": "default", "metric": METRIC, "mode": "max"})[2]["search"] == "tpe"
    )


def test_cli_has_search_flag() -> None:
    from stence.cli import build_parser

    args = build_parser().parse_args(["tune", "--search", "random"])
    assert args.search == "random"
    assert build_parser().parse_args(["tune"]).search == "tpe"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--search", "grid"])


# ---------------------------------------------------------------------------------------------------
# real sweeps (Ray Tune, Optuna, MLflow) ended by the budget

BUDGET_SPACE = {
    "kind": "search",
    "params": {
        "loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0},
        "optim.lr_ecg": {"type": "loguniform", "low": 1e-3, "high": 1e-1},
    },
    "points_to_evaluate": [],
}


def epochs_trainable(cfg: Config, run_id: str | None) -> None:
    """A stand-in for the training driver: reports EPOCHS results straight to Tune (one per epoch)."""
    for epoch in range(EPOCHS):
        time.sleep(0.3)
        tune.report({METRIC: -abs(cfg.loss.w_sten - 0.3) + 0.01 * epoch, "epoch": epoch + 1})


def _children(uri: str, experiment: str, parent: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")


@pytest.mark.ray
@pytest.mark.slow
def test_random_sweep_ends_at_the_budget(
    ray_session: None, mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(spaces.SPACES, "budget", BUDGET_SPACE)
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_db}",
                             "tracking.experiment=budget-random"])  # fmt: skip
    stop, log = TrialEpochBudget(7), ResultLog(METRIC)
    result = run_sweep(epochs_trainable, cfg, space="budget", num_samples=10, max_concurrent=1,
                       scheduler="none", search="random", metric=METRIC, mode="max", seed=0,
                       name="budget-random",
                       callbacks=[log], stop=stop)  # fmt: skip
    # one trial at a time, 3 epochs each: 3 + 3 + 1 results, then the whole sweep stops
    assert stop.spent == 7 == len(log.records)
    assert [r["trial_epochs"] for r in log.records] == list(range(1, 8))
    trials = list(dict.fromkeys(r["trial_id"] for r in log.records))
    assert len(trials) == 3 and len(result.results) == 3  # 10 samples asked, 3 started
    assert [r["epoch"] for r in log.records] == [1, 2, 3, 1, 2, 3, 1]
    assert all(math.isfinite(r["metric"]) for r in log.records)
    assert result.complete  # ended by its stopping rule, not interrupted
    state = json.loads((Path(result.path) / STATE_FILE).read_text())
    assert state["search"] == "random" and state["scheduler"] == "none"
    # random sampling: three distinct configs inside the bounds
    configs = [log.configs[t] for t in trials]
    assert len({c["loss.w_sten"] for c in configs}) == 3
    assert all(0 <= c["loss.w_sten"] <= 1 and 1e-3 <= c["optim.lr_ecg"] <= 1e-1 for c in configs)

    client = mlflow.MlflowClient(mlflow_db)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.params["sweep.search"] == "random"
    assert (
        parent.data.tags[SWEEP_TAG] == "budget-random" and parent.data.tags["stence.interrupted"] == "false"
    )
    children = _children(mlflow_db, "budget-random", result.parent_run_id)
    assert len(children) == 3 and {c.info.status for c in children} == {"FINISHED"}
    cut = [c for c in children if c.data.tags.get(STOPPED_TAG) == "true"]
    assert [c.data.tags["stence.trial_id"] for c in cut] == [trials[-1]]  # only the trial cut by the budget


@pytest.mark.ray
@pytest.mark.slow
def test_tpe_asha_sweep_with_concurrency_ends_at_the_budget(
    ray_session: None, mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(spaces.SPACES, "budget", BUDGET_SPACE)
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_db}",
                             "tracking.experiment=budget-tpe"])  # fmt: skip
    stop, log = TrialEpochBudget(8), ResultLog(METRIC)
    result = run_sweep(epochs_trainable, cfg, space="budget", num_samples=20, max_concurrent=2,
                       scheduler="asha", search="tpe", metric=METRIC, mode="max", seed=0, name="budget-tpe",
                       max_t=EPOCHS,
                       reduction_factor=2, n_startup_trials=2, callbacks=[log], stop=stop)  # fmt: skip
    # a second running trial may land one result in the step that spends the budget; never more
    assert 8 <= stop.spent == len(log.records) <= 9
    assert result.complete and len(result.results) < 20
    state = json.loads((Path(result.path) / STATE_FILE).read_text())
    assert state["search"] == "tpe" and state["scheduler"] == "asha"
    children = _children(mlflow_db, "budget-tpe", result.parent_run_id)
    assert children and "RUNNING" not in {c.info.status for c in children}
    assert mlflow.MlflowClient(mlflow_db).get_run(result.parent_run_id).info.status == "FINISHED"
