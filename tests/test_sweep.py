"""Sweeps with real Ray Tune, Optuna TPE, ASHA and MLflow (SQLite) on the toy loop."""

from __future__ import annotations

import functools
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
from ray import tune

from stence.config import Config, ConfigError, apply_overrides, load_config
from stence.tracking.client import default_spool
from stence.tracking.runs import start_run
from stence.tracking.spool import SPOOL_NAME, append_records, new_record, pending_records
from stence.tracking.tags import STOPPED_TAG, SWEEP_TAG, TRIAL_TAG
from stence.train.worker import METRICS_FILE, load_state
from stence.tune import spaces
from stence.tune.search import default_concurrency
from stence.tune.spaces import SPACES, build_param_space, is_fixed
from stence.tune.sweep import TRIAL_MAX_FAILURES, run_sweep
from stence.tune.trial_runs import flush_spools, trial_spools
from tests.ray_fixture import shared_mlflow_db
from tests.toy_loop import METRIC, TOY_PARAMS, toy_train_fn


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------
# spaces as data


def test_default_space_and_paper_point() -> None:
    space, points = build_param_space("default")
    assert set(space) == {"loss.w_sten", "loss.temperature", "optim.lr_ecg", "optim.lr_angio"}
    assert isinstance(space["loss.w_sten"].get_sampler(), tune.search.sample.Float._Uniform)
    assert isinstance(space["loss.temperature"].get_sampler(), tune.search.sample.Float._LogUniform)
    assert (space["loss.temperature"].lower, space["loss.temperature"].upper) == (0.02, 0.5)
    assert (space["optim.lr_ecg"].lower, space["optim.lr_ecg"].upper) == (1e-5, 1e-3)
    defaults = Config()
    assert points == [
        {"loss.w_sten": 0.3, "loss.temperature": 0.2, "optim.lr_ecg": defaults.optim.lr_ecg,
         "optim.lr_angio": defaults.optim.lr_angio}
    ]  # fmt: skip
    assert not is_fixed("default")


def test_points_and_variants_take_unswept_values_from_the_sweeps_config() -> None:
    base = apply_overrides(Config(), {"optim.lr_ecg": 1e-3, "optim.lr_angio": 3e-4, "model.frozen_no_cls": True})
    _, points = build_param_space("default", base)
    assert points == [{"loss.w_sten": 0.3, "loss.temperature": 0.2, "optim.lr_ecg": 1e-3, "optim.lr_angio": 3e-4}]
    _, variants = build_param_space("ablation", base)
    assert variants[0]["loss.w_sten"] == 0.0 and variants[0]["model.frozen_no_cls"] is True  # from base


def test_ablation_is_a_fixed_variant_list() -> None:
    space, variants = build_param_space("ablation")
    assert is_fixed("ablation")
    assert [v["loss.w_sten"] for v in variants][:3] == [0.0, 0.3, 1.0]
    assert {"loss.w_sten": 0.3, "model.frozen_no_cls": True, "loss.learnable_temperature": False,
            "model.contract": "paper"} in variants
    assert {v["model.contract"] for v in variants} == {"paper", "native"}  # the input contract is a variant
    assert all(set(v) == set(space) for v in variants)  # every variant states every key
    assert all(not isinstance(v, tune.search.sample.Domain) for v in space.values())  # nothing to sample
    assert len({json.dumps(v, sort_keys=True) for v in variants}) == len(variants)


def test_unknown_or_bad_spaces_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="ablation, default, smoke"):
        build_param_space("nope")
    monkeypatch.setitem(SPACES, "bad", {"kind": "variants", "variants": [{"loss.w_stn": 1.0}]})
    with pytest.raises(ConfigError, match="loss.w_stn"):
        build_param_space("bad")
    build_param_space("smoke")


# ---------------------------------------------------------------------------------------------------
# a real sweep: TPE (seeded) + ASHA, 3 trials x 2 epochs, interrupted and resumed

TOY_SPACE = {
    "kind": "search",
    "params": TOY_PARAMS,
    # a good point, then a bad one that ASHA (reduction factor 2) stops at the first rung
    "points_to_evaluate": [
        {"loss.w_sten": 0.3, "optim.lr_ecg": 3e-2},
        {"loss.w_sten": 1.0, "optim.lr_ecg": 1e-3},
    ],
}


class InterruptOnFirstResult(tune.Callback):
    """Sends the Tune driver SIGUSR1 (Tune's "stop and save" signal) at the first result, once."""

    def __init__(self, arm: str):
        self.arm = arm

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        if os.path.exists(self.arm):
            os.remove(self.arm)
            Path(self.arm + ".trial").write_text(trial.trial_id)
            os.kill(os.getpid(), signal.SIGUSR1)


def _runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=["start_time ASC"])


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_tpe_asha_interrupted_and_resumed(
    ray_session: None,
    mlflow_db: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(spaces.SPACES, "toy", TOY_SPACE)
    arm, hold = tmp_path / "arm", tmp_path / "hold"
    arm.write_text("")
    hold.write_text("")  # trials wait after each report while it exists: the interrupt lands mid-trial
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", "train.workers=1", "optim.epochs=2",
                             "optim.batch_size=32", f"tracking.uri={mlflow_db}", "tracking.experiment=sweep",
                             "train.keep_checkpoints=1"])  # fmt: skip
    train_fn = functools.partial(toy_train_fn, hold_file=str(hold))
    kwargs = dict(space="toy", num_samples=3, max_concurrent=1, scheduler="asha", metric=METRIC, mode="max",
                  seed=0, reduction_factor=2)  # fmt: skip

    first = run_sweep(train_fn, cfg, resume=None, name="toy-sweep", callbacks=[InterruptOnFirstResult(str(arm))],
                      **kwargs)  # fmt: skip
    assert not first.complete
    interrupted = Path(str(arm) + ".trial").read_text()
    runs = _runs(mlflow_db, "sweep")
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]  # parent + the interrupted trial's child
    assert runs[1].data.tags[TRIAL_TAG] == interrupted

    hold.unlink()
    result = run_sweep(train_fn, cfg, resume=first.path, **kwargs)
    assert result.complete and result.parent_run_id == first.parent_run_id

    runs = _runs(mlflow_db, "sweep")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.parent_run_id]
    assert len(parents) == 1 and parents[0].info.run_id == result.parent_run_id
    assert parents[0].data.tags[SWEEP_TAG] == "toy-sweep" and parents[0].data.params["sweep.space"] == "toy"
    assert len(children) == 3 == len(runs) - 1  # no duplicate child for the resumed trial
    assert {r.info.status for r in runs} == {"FINISHED"}  # nothing RUNNING, nothing KILLED any more
    trial_ids = [r.data.tags[TRIAL_TAG] for r in children]
    assert len(set(trial_ids)) == 3 and set(trial_ids) == set(result.results["trial_id"])

    # points_to_evaluate ran first (children in start order), then a TPE sample inside the bounds
    params = [r.data.params for r in children]
    assert (params[0]["loss.w_sten"], params[0]["optim.lr_ecg"]) == ("0.3", "0.03")
    assert (params[1]["loss.w_sten"], params[1]["optim.lr_ecg"]) == ("1.0", "0.001")
    assert 0.0 <= float(params[2]["loss.w_sten"]) <= 1.0 and 1e-3 <= float(params[2]["optim.lr_ecg"]) <= 1e-1
    assert params[2]["loss.w_sten"] not in ("0.3", "1.0")
    assert all(p["optim.epochs"] == "2" and p["train.workers"] == "1" for p in params)  # flattened config

    client = mlflow.MlflowClient(mlflow_db)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, METRIC)]
        assert steps and len(steps) == len(set(steps)) and set(steps) <= {0, 1}  # nothing logged twice
    # the interrupted trial resumed from its epoch-0 checkpoint and finished epoch 1 (logged once each)
    resumed = next(c for c in children if c.data.tags[TRIAL_TAG] == interrupted)
    assert sorted(m.step for m in client.get_metric_history(resumed.info.run_id, METRIC)) == [0, 1]
    # ASHA stopped the bad point at the first rung; its run ended FINISHED and says so
    stopped = children[1]
    assert stopped.data.tags.get(STOPPED_TAG) == "true"
    row = result.results.set_index("trial_id").loc[stopped.data.tags[TRIAL_TAG]]
    assert row["training_iteration"] == 1
    assert STOPPED_TAG not in resumed.data.tags

    # the best trial, its metric and its best checkpoint agree with what was logged
    best_child = next(c for c in children if c.data.tags[TRIAL_TAG] == result.best_trial_id)
    logged = [m.value for m in client.get_metric_history(best_child.info.run_id, METRIC)]
    assert result.best_metric == pytest.approx(max(logged))
    all_best = max(m.value for c in children for m in client.get_metric_history(c.info.run_id, METRIC))
    assert result.best_metric == pytest.approx(all_best)
    assert result.best_checkpoint and Path(result.best_checkpoint).is_dir()
    saved = json.loads((Path(result.best_checkpoint) / METRICS_FILE).read_text())
    assert saved[METRIC] == pytest.approx(result.best_metric)
    assert (
        load_state(result.best_checkpoint)["config"]["loss"]["w_sten"] == result.best_overrides["loss.w_sten"]
    )
    assert result.best_config.loss.w_sten == result.best_overrides["loss.w_sten"]
    assert parents[0].data.tags["stence.best_trial_id"] == result.best_trial_id
    assert parents[0].data.metrics[f"best/{METRIC}"] == pytest.approx(result.best_metric)
    assert set(result.results["mlflow_run_id"]) == {c.info.run_id for c in children}


def test_epochs_a_killed_worker_left_in_its_spools_reach_the_trials_run(tmp_path: Path) -> None:
    """A Train worker logs an epoch through its spool and its background replay; one the store kept waiting (slow,
    SQLite locked) goes on training, and when ASHA stops the trial it is killed with the replay undone. The sweep
    replays the spools the trial's trackers use (the store's default one, as the toy's tracker given none; its
    Train run folder's, as a pipeline's; the one its run names), each epoch once, another trial's left alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=spools"])
    run_id, other_id = start_run(cfg, "trial"), start_run(cfg, "other")
    storage, tagged = tmp_path / "ray", tmp_path / "tagged" / SPOOL_NAME
    mine, other = storage / "toy-abc123" / SPOOL_NAME, storage / "toy-def456" / SPOOL_NAME
    client = mlflow.MlflowClient(uri)
    client.log_metric(run_id, METRIC, -0.5, step=0)  # applied just before the kill, its acknowledgement was not
    ts = int(time.time() * 1000)
    append_records(default_spool(uri), [new_record(uri, run_id, "metrics", metrics=[[METRIC, -0.5, ts, 0]]),
                                        new_record(uri, run_id, "metrics", metrics=[[METRIC, -4.2, ts, 1]])])
    append_records(mine, [new_record(uri, run_id, "metrics", metrics=[[METRIC, -3.0, ts, 2]])])
    append_records(tagged, [new_record(uri, run_id, "metrics", metrics=[[METRIC, -2.0, ts, 3]])])
    append_records(other, [new_record(uri, other_id, "metrics", metrics=[[METRIC, -9.0, ts, 0]])])

    spools = trial_spools(uri, str(storage), "abc123", str(tagged))
    assert set(spools) == {default_spool(uri), mine, tagged}
    assert flush_spools(spools) == 0 and flush_spools(spools) == 0  # a second flush has nothing to do
    history = client.get_metric_history(run_id, METRIC)
    assert sorted(m.step for m in history) == [0, 1, 2, 3]  # every epoch, once
    assert {m.step: round(m.value, 6) for m in history} == {0: -0.5, 1: -4.2, 2: -3.0, 3: -2.0}
    assert all(pending_records(s) == [] for s in spools)
    assert client.get_metric_history(other_id, METRIC) == [] and len(pending_records(other)) == 1


# ---------------------------------------------------------------------------------------------------
# the ablation: a fixed variant list, each run once, ASHA off


def report_variant(cfg: Config, run_id: str | None, log: str) -> None:
    """A stand-in for the training driver that reports one result straight to Tune; the learnable-tau
    variant fails, to show a failed trial's run ends FAILED while the sweep goes on."""
    t0 = time.time()
    time.sleep(1.0)
    with open(log, "a") as f:
        f.write(f"{t0} {time.time()}\n")
    if cfg.loss.learnable_temperature:
        raise RuntimeError("this variant fails on purpose")
    tune.report({METRIC: -abs(cfg.loss.w_sten - 0.3) - 0.1 * cfg.model.frozen_no_cls
                 - 0.05 * (cfg.model.contract == "native")})


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    depth = best = 0
    for _, step in points:
        depth += step
        best = max(best, depth)
    return best


@pytest.mark.ray
@pytest.mark.slow
def test_ablation_runs_every_variant_once_failed_ones_end_failed(ray_session: None, mlflow_db: str, tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={mlflow_db}",
                             "tracking.experiment=ablation", "train.workers=1"])  # fmt: skip
    assert default_concurrency(cfg) == 2  # 4 logical CPUs / (1 trial driver + 1 worker)
    _, variants = build_param_space("ablation")
    log = tmp_path / "intervals.txt"
    result = run_sweep(functools.partial(report_variant, log=str(log)), cfg, space="ablation", num_samples=1,
                       max_concurrent=None, scheduler="asha", metric=METRIC, mode="max", resume=None, seed=0)  # fmt: skip
    assert result.complete
    assert result.best_overrides == {
        "loss.learnable_temperature": False,
        "loss.w_sten": 0.3,
        "model.contract": "paper",
        "model.frozen_no_cls": False,
    }
    intervals = [tuple(map(float, line.split())) for line in log.read_text().splitlines()]
    # each variant runs once; the failing one is retried TRIAL_MAX_FAILURES times before it is given up
    assert len(intervals) == len(variants) + TRIAL_MAX_FAILURES
    assert _max_overlap(intervals) <= 2  # the concurrency limit holds
    runs = _runs(mlflow_db, "ablation")
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r is not parent]
    ran = [{k: r.data.params[k] for k in variants[0]} for r in children]
    assert sorted(map(json.dumps, ran)) == sorted(
        json.dumps({k: str(v) for k, v in x.items()}) for x in variants
    )
    status = {r.data.params["loss.learnable_temperature"]: set() for r in children}
    for r in children:
        status[r.data.params["loss.learnable_temperature"]].add(r.info.status)
    assert status == {"False": {"FINISHED"}, "True": {"FAILED"}}
    assert parent.info.status == "FINISHED" and parent.data.tags["stence.failed_trials"] == "1"


def test_tpe_startup_is_sized_to_the_concurrency_and_concurrent_trials_are_not_all_random() -> None:
    """The sweep's own searcher object (OptunaSearch over a seeded multivariate TPE with constant liar), driven
    as Tune drives it with 4 trials at a time: the random start-up stays within min(10, n // 2) trials, and
    once it ends the trials running side by side are TPE's, not random ones."""
    from ray import tune as ray_tune

    from stence.tune.search import make_searcher, startup_trials

    n, k = 16, 4
    assert startup_trials(n, 1) == 8 and startup_trials(n, k) == 5 and startup_trials(4, 8) == 1
    searcher = make_searcher(False, [], METRIC, "max", seed=0, n_startup=startup_trials(n, k), max_concurrent=k)
    searcher.set_search_properties(METRIC, "max", {"x": ray_tune.uniform(0.0, 1.0), "y": ray_tune.uniform(0.0, 1.0)})
    sampler = searcher._ot_study.sampler
    random_calls: list[str] = []
    inner = sampler._random_sampler.sample_independent

    def counted(study, trial, name, dist):  # noqa: ANN001 - Optuna's signature
        random_calls.append(trial.number)
        return inner(study, trial, name, dist)

    sampler._random_sampler.sample_independent = counted
    running, done, random_trials = [], 0, set()
    for i in range(n):
        if len(running) == k:  # a slot frees: the oldest trial finishes
            tid, cfg = running.pop(0)
            searcher.on_trial_complete(tid, {METRIC: -((cfg["x"] - 0.3) ** 2 + (cfg["y"] - 0.7) ** 2)})
            done += 1
        before = len(random_calls)
        cfg = searcher.suggest(f"t{i}")
        if len(random_calls) > before:
            random_trials.add(i)
        running.append((f"t{i}", cfg))
    assert len(random_trials) <= min(10, n // 2)  # the start-up budget holds under concurrency
    assert len(random_trials) < n and not set(range(n - k, n)) <= random_trials  # the last wave is TPE's
    assert set(range(k)) <= random_trials  # the first wave, with nothing finished, is the random start-up
