"""Tracking never costs training: real pretrainings against a real `mlflow server` that is killed and brought
back, and against a SQLite store held locked; the replay of a spool; and the repair of runs orphaned by a
SIGKILLed sweep driver (a real `stence tune` in a subprocess).

The outages are driven at known epochs, not by timing: a gate wraps the pretraining loop's `report` (the
real one runs first), records the epoch and waits for the test to act, before that epoch's metrics are
logged. It is a closure, so Ray pickles it by value into the Train workers; files carry the handshake.
"""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import mlflow
import pytest

from stence.cli import main
from stence.config import Config, apply_overrides, load_config
from stence.pipelines import pretrain as pretrain_pipeline
from stence.pipelines.pretrain import run_pretrain
from stence.tracking.owner import driver_identity
from stence.tracking.runs import start_run
from stence.tracking.spool import SPOOL_NAME, append_records, new_record, pending_records
from stence.tracking.tags import DRIVER_TAG, REPAIRED_TAG, SPOOL_TAG
from stence.train import pretrain_loop as pretrain_module
from stence.train.pretrain_loop import SELECT_METRIC
from tests.cluster_fixtures import VENV_BIN, free_port, pids_mentioning, stop_process_group, tail, wait_until
from tests.ray_fixture import ray_test_settings

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 5
DOWN_AT, BACK_AT = 2, 4  # the store fails after epoch 1's metrics and is back two epochs later


# ---------------------------------------------------------------------------------------------------
# helpers


class SqliteMlflowServer:
    """`mlflow server` on 127.0.0.1 with a SQLite store; `kill()` SIGKILLs it like a crash, `start()` brings
    it back on the same port and store."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = root / "server.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        import requests

        cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
               "--port", str(self.port), "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_until(lambda: requests.get(f"{self.uri}/health", timeout=2).status_code == 200, 180,
                   "the MLflow server", (self.log,))  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None

    def stop(self) -> None:
        stop_process_group(self.proc, grace_s=5.0)
        self.proc = None


def gated_report(real_report: Callable, gate: Path) -> Callable:
    """`report` that, on rank 0, records the checkpointed epoch in gate/epochs.log and then waits for the test
    to write gate/go-<epoch> (the epoch's metrics are logged after report returns)."""

    def report(metrics: dict, state: dict | None = None, iteration: int | None = None) -> None:
        from stence.train.worker import worker_info

        real_report(metrics, state, iteration=iteration)
        if worker_info().rank != 0:
            return
        epoch = int(metrics["epoch"])
        with open(gate / "epochs.log", "a") as f:
            f.write(f"{epoch}\n")
        (gate / f"reported-{epoch}").touch()
        deadline = time.monotonic() + 600
        while not (gate / f"go-{epoch}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    return report


def gated_loop(gate: Path) -> Callable[[dict], None]:
    """For Ray Train workers: the pretraining loop of the worker's own (unpatched) module, its `report`
    gated. The test process only swaps the loop that run_pretrain hands to Ray."""

    def loop(loop_config: dict) -> None:
        from stence.train import pretrain_loop as module

        module.report = gated_report(module.report, gate)
        module.pretrain_loop(loop_config)

    return loop


class Conductor(threading.Thread):
    """Lets each gated epoch go, after running the action planned for it (`times`: when each action ended)."""

    def __init__(self, gate: Path, actions: dict[int, Callable[[], None]]) -> None:
        super().__init__(daemon=True)
        self.gate, self.actions, self.error = gate, actions, None
        self.times: dict[int, int] = {}

    def run(self) -> None:
        try:
            for epoch in range(1, EPOCHS + 1):
                wait_until(lambda e=epoch: (self.gate / f"reported-{e}").exists(), 600, f"epoch {epoch}")
                if epoch in self.actions:
                    self.actions[epoch]()
                    self.times[epoch] = int(time.time() * 1000)
                (self.gate / f"go-{epoch}").touch()
        except BaseException as e:  # surfaced by the test
            self.error = e
            for epoch in range(1, EPOCHS + 1):
                (self.gate / f"go-{epoch}").touch()


def pretrain_through(cfg: Config, gate: Path, actions: dict[int, Callable[[], None]],
                     monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict[int, int]]:
    """run_pretrain (the real driver) with a gated `report` and the conductor playing `actions`. In local mode
    the loop runs in this process: its module's `report` is gated here; Ray workers gate their own."""
    gate.mkdir(parents=True)
    if cfg.train.workers == 0:
        monkeypatch.setattr(pretrain_module, "report", gated_report(pretrain_module.report, gate))
    else:
        monkeypatch.setattr(pretrain_pipeline, "pretrain_loop", gated_loop(gate))  # what run_pretrain hands Ray
    conductor = Conductor(gate, actions)
    conductor.start()
    try:
        out = run_pretrain(cfg)
    finally:
        conductor.join(timeout=60)
    assert conductor.error is None, conductor.error
    assert not conductor.is_alive(), "training ended before every epoch went through the gate"
    return out, conductor.times


def assert_tracked_once(uri: str, run_id: str, gate: Path, back_ms: int) -> None:
    """No epoch trained twice, every metric of every epoch logged exactly once, the run FINISHED, nothing
    left in its spool; the epochs of the outage were buffered (their values carry their own time, from
    before the store came back at `back_ms`)."""
    epochs = [int(x) for x in (gate / "epochs.log").read_text().split()]
    assert epochs == list(range(1, EPOCHS + 1))  # each epoch checkpointed once: none trained twice
    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    keys = [k for k in run.data.metrics if not k.startswith("best/")]
    assert {SELECT_METRIC, "train/loss", "val/clip_loss", "epoch"} <= set(keys)
    for key in keys:
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    history = client.get_metric_history(run_id, "epoch")
    assert {m.step: m.value for m in history} == {e: float(e) for e in range(1, EPOCHS + 1)}
    assert all(m.timestamp < back_ms for m in history if DOWN_AT <= m.step < BACK_AT)
    assert [m.step for m in client.get_metric_history(run_id, f"best/{SELECT_METRIC}")] == [0]
    spool = Path(run.data.tags[SPOOL_TAG])
    assert spool.parent.name == f"{run.data.params['train.name']}-pretrain"  # in the run's own folder
    assert pending_records(spool) == []


def degraded_then_recovered(caplog: pytest.LogCaptureFixture) -> None:
    messages = [r.getMessage() for r in caplog.records if r.name == "stence.tracking"]
    assert any(m.startswith("tracking degraded") for m in messages), messages
    assert any(m.startswith("tracking recovered") for m in messages), messages


@pytest.fixture(scope="module")
def base_cfg(tiny_cohort: Path, ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The smallest pretraining that still runs real epochs (tiny cohort and encoder), features cached."""
    from stence.train.features import extract_features

    storage = tmp_path_factory.mktemp("resilience")
    cfg = apply_overrides(Config(), {
        "data.cohort": str(tiny_cohort), "train.storage_path": str(storage / "ray"), "optim.epochs": EPOCHS,
        "optim.batch_size": 8, "feature.variants": 1, "model.ecg": "echoingecg_tiny", "train.knn_smooth": EPOCHS,
    })  # fmt: skip
    extract_features(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------
# the tracking server killed for two epochs; a locked SQLite store


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.ray)])
def test_pretraining_goes_on_while_the_tracking_server_is_down(
    base_cfg: Config, workers: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    server = SqliteMlflowServer(tmp_path / "server")
    server.start()
    try:
        cfg = apply_overrides(base_cfg, {"tracking.uri": server.uri, "tracking.experiment": "outage",
                                         "train.name": f"outage-{workers}", "train.workers": workers})  # fmt: skip
        caplog.set_level(logging.WARNING, logger="stence.tracking")
        out, times = pretrain_through(cfg, tmp_path / "gate", {DOWN_AT: server.kill, BACK_AT: server.start},
                                      monkeypatch)
        assert_tracked_once(server.uri, out["run_id"], tmp_path / "gate", times[BACK_AT])
        if workers == 0:  # the worker's log records reach this process only in local mode
            degraded_then_recovered(caplog)
    finally:
        server.stop()


@pytest.mark.slow
def test_pretraining_goes_on_while_the_sqlite_store_is_locked(
    base_cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    cfg = apply_overrides(base_cfg, {"tracking.uri": uri, "tracking.experiment": "locked", "train.name": "locked",
                                     "train.workers": 0})  # fmt: skip
    held: dict[str, sqlite3.Connection] = {}

    def lock() -> None:  # an exclusive transaction: every other connection gets "database is locked"
        conn = sqlite3.connect(db, timeout=60, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        held["conn"] = conn

    def unlock() -> None:
        held.pop("conn").execute("COMMIT")

    caplog.set_level(logging.WARNING, logger="stence.tracking")
    try:
        out, times = pretrain_through(cfg, tmp_path / "gate", {DOWN_AT: lock, BACK_AT: unlock}, monkeypatch)
    finally:
        if "conn" in held:
            held["conn"].close()
    assert_tracked_once(uri, out["run_id"], tmp_path / "gate", times[BACK_AT])
    degraded_then_recovered(caplog)


# ---------------------------------------------------------------------------------------------------
# replay and repair


def test_replay_applies_a_spool_once_and_sets_the_status(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=replay"])
    spool = tmp_path / "ray" / "r-pretrain" / SPOOL_NAME
    run_id = start_run(cfg, "replayed", spool=spool)
    client = mlflow.MlflowClient(uri)
    client.log_metric(run_id, "train/loss", 0.9, step=1)  # applied just before the process died
    ts = int(time.time() * 1000)
    append_records(spool, [
        new_record(uri, run_id, "metrics", metrics=[["train/loss", 0.9, ts, 1], ["val/auroc", 0.6, ts, 1]]),
        new_record(uri, run_id, "metrics", metrics=[["train/loss", 0.8, ts, 2], ["val/auroc", 0.7, ts, 2]]),
        new_record(uri, run_id, "metrics", metrics=[["train/loss", 0.85, ts + 1, 2]]),  # the same step again
        new_record(uri, run_id, "params", params={"extra.note": "x"}),
        new_record(uri, run_id, "tags", tags={"stence.note": "buffered"}),
        new_record(uri, run_id, "status", status="FINISHED", end_time=ts, if_running=True),
    ])  # fmt: skip
    assert main(["runs", "replay", str(tmp_path / "ray")]) == 0
    assert "applied 6 items" in capsys.readouterr().out
    for key, values in (("train/loss", {1: 0.9, 2: 0.8}), ("val/auroc", {1: 0.6, 2: 0.7})):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2]  # every step once
        assert {m.step: round(m.value, 6) for m in history} == values
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["stence.note"] == "buffered"
    assert run.data.params["extra.note"] == "x" and pending_records(spool) == []
    assert main(["runs", "replay", str(spool)]) == 0  # a second replay has nothing to do
    assert "nothing pending" in capsys.readouterr().out


def test_a_restore_refills_its_checkpoints_metrics_and_logs_no_step_twice(tmp_path: Path) -> None:
    """Metrics are logged after their checkpoint: a worker restarted from that checkpoint logs them if the
    crash came in between, and skips every step the run has (an epoch trained again is not logged twice)."""
    from stence.tracking.runs import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = start_run(load_config(None, [f"tracking.uri={uri}", "tracking.experiment=refill"]), "r")
    spool = tmp_path / "r-pretrain" / SPOOL_NAME
    before = Tracker(uri, run_id, spool=spool)  # the worker that crashed
    before.log_metrics({"train/loss": 1.0}, step=1)
    stamp2 = before.stamp({"train/loss": 0.9, "epoch": 2}, step=2)  # epoch 2 checkpointed, then the crash
    after = Tracker(uri, run_id, spool=spool)  # the restarted worker, restored from epoch 2's checkpoint
    after.refill(stamp2)
    after.refill(stamp2)  # restored twice
    after.log_metrics({"train/loss": 0.85}, step=2)  # epoch 2 trained again (its checkpoint was not committed)
    after.log_metrics({"train/loss": 0.8}, step=3)
    Tracker(uri, run_id, spool=spool).refill(Tracker(uri, "another-run").stamp({"x": 1.0}, step=1))  # not ours
    after.end()
    client = mlflow.MlflowClient(uri)
    history = {m.step: round(m.value, 6) for m in client.get_metric_history(run_id, "train/loss")}
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]
    assert history == {1: 1.0, 2: 0.9, 3: 0.8}
    assert [m.step for m in client.get_metric_history(run_id, "epoch")] == [2]
    assert "x" not in client.get_run(run_id).data.metrics and pending_records(spool) == []


def _dead_driver() -> str:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    identity = driver_identity(proc.pid)
    proc.kill()
    proc.wait()
    return identity


def test_repair_ends_only_runs_whose_driver_is_gone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = ["--set", f"tracking.uri={uri}", "tracking.experiment=repair"]
    cfg = load_config(None, sets[1:])
    dead = start_run(cfg, "dead", tags={DRIVER_TAG: _dead_driver()})
    alive = start_run(cfg, "alive")  # this process drives it
    remote = start_run(cfg, "remote", tags={DRIVER_TAG: "elsewhere|42|boot|1"})
    client = mlflow.MlflowClient(uri)

    assert main(["runs", "repair", "--dry-run", *sets]) == 0
    assert {client.get_run(r).info.status for r in (dead, alive, remote)} == {"RUNNING"}  # a dry run
    assert main(["runs", "repair", *sets]) == 0
    out = capsys.readouterr().out
    assert "cannot be checked from here" in out
    status = {r: client.get_run(r).info.status for r in (dead, alive, remote)}
    assert status == {dead: "KILLED", alive: "RUNNING", remote: "RUNNING"}
    assert "is gone" in client.get_run(dead).data.tags[REPAIRED_TAG]
    # another host's run needs --older-than; a live driver's never ends, however idle
    assert main(["runs", "repair", "--older-than", "0", *sets]) == 0
    status = {r: client.get_run(r).info.status for r in (dead, alive, remote)}
    assert status == {dead: "KILLED", alive: "RUNNING", remote: "KILLED"}
    client.set_terminated(alive)


def test_resume_ends_the_runs_its_dead_driver_orphaned_then_reopens_the_parent(tmp_path: Path) -> None:
    """`stence tune --resume` (run_sweep(resume=...)) first ends the RUNNING runs of the sweep whose driver is
    gone, as repair would, then reopens the parent under the new driver; trials reopen their own runs."""
    import json

    from stence.config import save_config
    from stence.tracking.tags import SWEEP_TAG, TRIAL_TAG
    from stence.tune.sweep import BASE_CONFIG_FILE, STATE_FILE, _resumed_sweep

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = load_config(None, [f"tracking.uri={uri}", "tracking.experiment=resumed", f"train.storage_path={tmp_path}"])
    path = tmp_path / "swept"
    path.mkdir()
    dead = _dead_driver()
    parent = start_run(base, "swept", tags={SWEEP_TAG: "swept", DRIVER_TAG: dead})
    child = start_run(base, "swept-t1", parent_run_id=parent,
                      tags={SWEEP_TAG: "swept", TRIAL_TAG: "t1", DRIVER_TAG: dead})  # fmt: skip
    state = {"name": "swept", "space": "smoke", "metric": SELECT_METRIC, "mode": "max", "num_samples": 2,
             "scheduler": "none", "search": "tpe", "seed": 0, "parent_run_id": parent}  # fmt: skip
    (path / STATE_FILE).write_text(json.dumps(state))
    save_config(base, path / BASE_CONFIG_FILE)
    _resumed_sweep(str(path), {"space": "smoke", "metric": SELECT_METRIC, "mode": "max", "search": "tpe"})
    client = mlflow.MlflowClient(uri)
    assert client.get_run(child).info.status == "KILLED"  # interrupted: its trial reopens it if it resumes
    reopened = client.get_run(parent)
    assert reopened.info.status == "RUNNING" and reopened.data.tags[DRIVER_TAG] == driver_identity()
    assert REPAIRED_TAG not in reopened.data.tags and REPAIRED_TAG in client.get_run(child).data.tags
    client.set_terminated(parent)


# ---------------------------------------------------------------------------------------------------
# a sweep driver SIGKILLed mid-sweep, repaired without resuming


def _sweep_runs(uri: str, experiment: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


@pytest.mark.slow
@pytest.mark.ray
def test_sigkilled_sweep_driver_is_repaired_without_resume(
    base_cfg: Config, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    uri, experiment = f"sqlite:///{tmp_path / 'mlflow.db'}", "killed-sweep"
    sets = [f"data.cohort={base_cfg.data.cohort}", f"train.storage_path={tmp_path / 'ray'}", f"tracking.uri={uri}",
            f"tracking.experiment={experiment}", "train.workers=1", "optim.epochs=50", "optim.batch_size=8",
            "feature.variants=1", "model.ecg=echoingecg_tiny"]  # fmt: skip
    ray_tmp = Path(tempfile.mkdtemp(prefix="stk-", dir="/tmp"))  # its own Ray instance, found again by path
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_TMPDIR=str(ray_tmp), MLFLOW_DISABLE_TELEMETRY="true", **ray_test_settings())
    log = tmp_path / "tune.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "stence.cli", "tune", "--space", "smoke", "--num-samples", "2",
             "--max-concurrent", "2", "--scheduler", "none", "--sweep-name", "killed", "--no-register",
             "--set", *sets],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        client = mlflow.MlflowClient(uri)

        def mid_training() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"stence tune exited early:\n{tail(log)}")
            children = [r for r in _sweep_runs(uri, experiment) if "mlflow.parentRunId" in r.data.tags]
            return (len(children) == 2 and all(r.info.status == "RUNNING" for r in children)
                    and any(client.get_metric_history(r.info.run_id, "train/loss") for r in children))

        wait_until(mid_training, 400, "two trials in training", (log,))
        os.kill(proc.pid, signal.SIGKILL)  # the sweep driver, nothing else
        proc.wait(timeout=30)
        assert {r.info.status for r in _sweep_runs(uri, experiment)} == {"RUNNING"}  # 1 parent + 2 children

        args = ["runs", "repair", "--sweep", "killed", "--set", f"tracking.uri={uri}", f"tracking.experiment={experiment}"]
        assert main(args) == 0
        runs = _sweep_runs(uri, experiment)
        assert len(runs) == 3 and not [r for r in runs if r.info.status == "RUNNING"]
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert parent.info.status == "KILLED" and "is gone" in parent.data.tags[REPAIRED_TAG]
        for child in (r for r in runs if r is not parent):  # both trials were mid-training: interrupted
            assert child.info.status == "KILLED" and child.data.tags[DRIVER_TAG] == parent.data.tags[DRIVER_TAG]
        before = {r.info.run_id: (r.info.status, r.info.end_time) for r in runs}
        capsys.readouterr()
        assert main(args) == 0  # a second repair changes nothing
        assert "nothing to repair" in capsys.readouterr().out
        assert {r.info.run_id: (r.info.status, r.info.end_time) for r in _sweep_runs(uri, experiment)} == before
    finally:
        stop_process_group(proc, grace_s=5.0)
        for pid in pids_mentioning(str(ray_tmp)):  # the dead driver's Ray instance
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
