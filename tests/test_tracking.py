"""MLflow tracking on a real SQLite database: URIs, runs, nesting, lookup, rank-0-only logging."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import yaml

from stence.config import flatten, load_config, to_dict
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.runs import (
    NullTracker,
    Tracker,
    find_run,
    loop_tracking,
    open_tracker,
    run_status,
    start_run,
    tracker_for_loop,
)
from tests.ray_fixture import shared_mlflow_db


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


def test_resolve_tracking_uri_is_always_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNE_ORIG_WORKING_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(load_config()) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert resolve_tracking_uri(load_config()).startswith("sqlite:////")  # four slashes: absolute
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert resolve_tracking_uri(load_config()) == "http://mlflow:5000"
    cfg = load_config(None, ["tracking.uri=sqlite:///rel/x.db"])  # the config wins over the env
    assert resolve_tracking_uri(cfg) == f"sqlite:///{tmp_path.resolve()}/rel/x.db"
    # inside a Tune trial the cwd is the trial dir; relative paths mean the original directory
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    monkeypatch.chdir(trial_dir)
    monkeypatch.setenv("TUNE_ORIG_WORKING_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(load_config()) == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    with pytest.raises(ValueError, match="no scheme"):
        resolve_tracking_uri(load_config(None, ["tracking.uri=./mlruns"]))


def test_start_run_logs_config_nests_and_is_found(mlflow_db: str) -> None:
    cfg = load_config(
        None, [f"tracking.uri={mlflow_db}", "tracking.experiment=tracking-test", "loss.w_sten=0.7"]
    )
    parent = start_run(cfg, "parent", tags={"stence.kind": "sweep"})
    child = start_run(cfg, "child", parent_run_id=parent, tags={"stence.trial_id": "abc_00001"},
                      params={"extra.note": "x"})  # fmt: skip
    client = mlflow.MlflowClient(mlflow_db)
    run = client.get_run(child)
    assert run.info.status == "RUNNING" and run.info.run_name == "child"
    assert run.data.tags["mlflow.parentRunId"] == parent
    params = run.data.params
    flat = flatten(to_dict(cfg))
    assert set(params) == set(flat) | {"extra.note"}
    assert params["loss.w_sten"] == "0.7" and params["data.leads"] == json.dumps(list(cfg.data.leads))
    # the resolved config as an artifact, stored beside the database (not in the cwd)
    exp = client.get_experiment(run.info.experiment_id)
    db_dir = Path(mlflow_db[len("sqlite:///") :]).parent
    assert exp.artifact_location == (db_dir / "mlartifacts" / "tracking-test").as_uri()
    local = client.download_artifacts(child, "config.yaml", dst_path=str(db_dir / "dl"))
    assert yaml.safe_load(Path(local).read_text()) == to_dict(cfg)
    assert Path(exp.artifact_location[len("file://") :]).is_dir()

    assert find_run(cfg, {"stence.trial_id": "abc_00001"}) == child
    assert find_run(cfg, {"stence.trial_id": "abc_00001", "mlflow.parentRunId": parent}) == child
    assert find_run(cfg, {"stence.trial_id": "nope"}) is None
    assert (
        find_run(load_config(None, [f"tracking.uri={mlflow_db}", "tracking.experiment=absent"]), {}) is None
    )
    for rid in (child, parent):
        Tracker(mlflow_db, rid).end()
        assert run_status(mlflow_db, rid) == "FINISHED"


def test_tracker_logs_history_and_null_tracker_logs_nothing(mlflow_db: str, tmp_path: Path) -> None:
    cfg = load_config(None, [f"tracking.uri={mlflow_db}", "tracking.experiment=tracker-test"])
    run_id = start_run(cfg, "r")
    assert isinstance(open_tracker(mlflow_db, run_id, rank=1), NullTracker)
    assert isinstance(open_tracker(mlflow_db, None, rank=0), NullTracker)
    assert isinstance(tracker_for_loop(loop_tracking(mlflow_db, run_id), rank=3), NullTracker)
    t = tracker_for_loop(loop_tracking(mlflow_db, run_id), rank=0)
    assert isinstance(t, Tracker)
    null = open_tracker(mlflow_db, run_id, rank=1)
    for epoch in range(3):
        t.log_metrics({"val/auroc_0_100": 0.5 + 0.1 * epoch, "train/loss": 1.0 / (epoch + 1)}, step=epoch)
        null.log_metrics({"val/auroc_0_100": -1.0, "rank1/only": 1.0}, step=epoch)
    t.log_params({"probe.k": 5})
    null.log_params({"probe.k": 7})
    t.set_tags({"stence.note": "ok"})
    null.set_tags({"stence.note": "rank1"})
    f = tmp_path / "table.csv"
    f.write_text("a,b\n1,2\n")
    t.log_artifact(f)
    t.log_dict({"auroc": 0.7}, "summary.json")
    null.log_artifact(f)
    null.end("FAILED")
    assert run_status(mlflow_db, run_id) == "RUNNING"
    t.end()

    client = mlflow.MlflowClient(mlflow_db)
    run = client.get_run(run_id)
    history = client.get_metric_history(run_id, "val/auroc_0_100")
    assert [(m.step, round(m.value, 6)) for m in history] == [(0, 0.5), (1, 0.6), (2, 0.7)]
    assert "rank1/only" not in run.data.metrics
    assert run.data.params["probe.k"] == "5" and run.data.tags["stence.note"] == "ok"
    assert {a.path for a in client.list_artifacts(run_id)} == {"config.yaml", "table.csv", "summary.json"}
    assert run.info.status == "FINISHED"
    t.reopen()  # a resumed sweep reopens its run
    assert run_status(mlflow_db, run_id) == "RUNNING"
    t.end("KILLED")
    assert run_status(mlflow_db, run_id) == "KILLED"


def test_find_run_with_quotes_in_tag_values(mlflow_db: str) -> None:
    cfg = load_config(None, [f"tracking.uri={mlflow_db}", "tracking.experiment=quotes"])
    run_id = start_run(cfg, "q", tags={"stence.note": "it's"})
    assert find_run(cfg, {"stence.note": "it's"}) == run_id
    Tracker(mlflow_db, run_id).end()
