"""Training plumbing on a toy loop: worker helpers, schedule, local mode, and a REAL 2-worker gloo DDP
run with checkpoints, best-checkpoint selection, resume by name, and recovery from a killed worker."""

from __future__ import annotations

import json
import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from stence.config import Config, flatten, load_config, to_dict
from stence.tracking.runs import Tracker, start_run
from stence.train.driver import fit
from stence.train.schedule import param_groups, warmup_cosine
from stence.train.worker import (
    METRICS_FILE,
    all_gather_arrays,
    all_reduce_mean,
    all_reduce_sum,
    load_state,
    local_best_checkpoint,
    seed_everything,
    worker_info,
)
from tests.ray_fixture import shared_mlflow_db
from tests.toy_loop import METRIC, N_VAL, collectives_probe, toy_loop, toy_train_fn


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


# ---------------------------------------------------------------------------------------------------
# worker helpers


def test_helpers_outside_ray_are_single_process_noops() -> None:
    info = worker_info()
    assert (info.rank, info.world_size, info.local_rank) == (0, 1, 0)
    assert all_reduce_sum({"a": 2.0, "b": 3}) == {"a": 2.0, "b": 3.0}
    assert all_reduce_mean({"loss": 0.5}, weight=7) == {"loss": 0.5}
    x = np.arange(6).reshape(3, 2)
    out = all_gather_arrays(x)
    assert np.array_equal(out, x) and out is not x


def test_collectives_on_a_real_gloo_group(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(collectives_probe, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    expected = [[0, 0], [1, 1], [2, 2], [1, 1], [2, 2], [3, 3], [4, 4], [5, 5]]
    for rank in (0, 1):
        res = json.loads((tmp_path / f"r{rank}.json").read_text())
        assert res["gathered"] == expected  # rank order, padding removed, same on every rank
        assert res["flags"] == [True] * 3 + [False] * 5
        assert res["sum"] == {"rank": 1.0, "one": 2.0}
        assert res["mean"]["m"] == pytest.approx(2.25)


def test_seed_everything_differs_per_rank_and_repeats() -> None:
    seed_everything(3, rank=0)
    a = torch.rand(3)
    seed_everything(3, rank=1)
    b = torch.rand(3)
    seed_everything(3, rank=0)
    assert torch.equal(a, torch.rand(3)) and not torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# schedule and parameter groups


def test_warmup_cosine_shape_per_group_and_state_round_trip() -> None:
    w = nn.Parameter(torch.zeros(2))
    v = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [w], "lr": 1e-2}, {"params": [v], "lr": 1e-4}])
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, start_factor=1e-3, min_lr=1e-6)
    lrs = []
    for _ in range(110):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    lrs.append([g["lr"] for g in opt.param_groups])
    first = [lr[0] for lr in lrs]
    assert first[0] == pytest.approx(1e-5)  # start_factor x lr
    assert first[10] == pytest.approx(1e-2)  # peak after warm-up
    assert all(a < b for a, b in zip(first[:10], first[1:11], strict=True))  # rising warm-up
    assert all(a >= b for a, b in zip(first[10:], first[11:], strict=False))  # decaying afterwards
    assert first[110] == pytest.approx(1e-6)  # min_lr at the end
    assert lrs[10][1] == pytest.approx(1e-4) and lrs[110][1] == pytest.approx(1e-6)  # own base lr
    assert first[60] == pytest.approx(1e-6 + (1e-2 - 1e-6) * 0.5)  # cosine midpoint

    # round trip at step 37: a fresh optimizer + scheduler continues identically
    opt2 = torch.optim.SGD([{"params": [w], "lr": 1e-2}, {"params": [v], "lr": 1e-4}])
    s1 = warmup_cosine(opt2, 10, 110)
    for _ in range(37):
        opt2.step()
        s1.step()
    state = s1.state_dict()
    opt3 = torch.optim.SGD([{"params": [w], "lr": 1e-2}, {"params": [v], "lr": 1e-4}])
    s2 = warmup_cosine(opt3, 1, 2)  # settings come back from the state dict
    s2.load_state_dict(state)
    opt3.load_state_dict(opt2.state_dict())
    opt2.step(), s1.step(), opt3.step(), s2.step()
    assert [g["lr"] for g in opt3.param_groups] == pytest.approx([g["lr"] for g in opt2.param_groups])
    assert s2.last_epoch == 38


class _Tower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos = nn.Parameter(torch.zeros(1, 8, 4))  # 3-D, not matched by name: named by no_weight_decay
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return {"pos"}


class _TwoTower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tower = _Tower()
        self.head = nn.Linear(4, 2, bias=False)
        self.logit_scale = nn.Parameter(torch.ones([]))
        self.temperature = nn.Parameter(torch.ones([]))


def test_param_groups_zero_decay_for_norms_biases_tokens_temperature() -> None:
    m = _TwoTower()
    groups = param_groups(m, lr=1e-3, weight_decay=0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    by_group = {g["name"]: {names[id(p)] for p in g["params"]} for g in groups}
    assert by_group["decay"] == {"tower.proj.weight", "head.weight"}
    assert by_group["no_decay"] == {
        "tower.embed.weight",
        "tower.proj.bias",
        "tower.norm.weight",
        "tower.norm.bias",
        "tower.cls_token",
        "tower.pos",
        "logit_scale",
        "temperature",
    }
    assert all(g["lr"] == 1e-3 for g in groups)
    assert {g["name"]: g["weight_decay"] for g in groups} == {"decay": 0.05, "no_decay": 0.0}
    torch.optim.AdamW(groups)  # a valid optimizer spec; frozen parameters left out
    assert not any("frozen" in n for g in by_group.values() for n in g)


# ---------------------------------------------------------------------------------------------------
# local mode (num_workers=0): the loop runs in this process with the same API


def _cfg(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [f"train.storage_path={tmp_path / 'ray'}", "optim.batch_size=32", "optim.epochs=2", *overrides],
    )


def test_local_mode_fit_reports_and_checkpoints(
    tmp_path: Path, mlflow_db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, "train.workers=0", f"tracking.uri={mlflow_db}", "tracking.experiment=local-mode")
    run_id = start_run(cfg, "local")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    result = toy_train_fn(cfg, run_id, log_dir=str(tmp_path))
    Tracker(mlflow_db, run_id).end()
    # Ray keeps only the last local-mode checkpoint; the worker keeps it and the best by METRIC, no other
    best = local_best_checkpoint()
    kept = {p.name for p in scratch.glob("stence-local-ckpt-*")}
    assert kept == {Path(result.checkpoint.path).name, best.name}
    history = mlflow.MlflowClient(mlflow_db).get_metric_history(run_id, METRIC)
    best_metrics = json.loads((best / METRICS_FILE).read_text())
    assert best_metrics[METRIC] == pytest.approx(max(m.value for m in history))

    assert result.metrics["epoch"] == 1 and METRIC in result.metrics
    state = load_state(result.checkpoint)
    assert state["epoch"] == 1 and state["config"] == to_dict(cfg)
    saved = json.loads(Path(result.checkpoint.path, METRICS_FILE).read_text())
    assert saved[METRIC] == pytest.approx(result.metrics[METRIC])
    facts = [json.loads(x) for x in (tmp_path / "facts_rank0.jsonl").read_text().splitlines()]
    assert (
        [f["world_size"] for f in facts] == [1, 1]
        and not facts[0]["ddp"]
        and facts[0]["tracker"] == "Tracker"
    )
    assert facts[0]["n_gathered"] == N_VAL
    history = mlflow.MlflowClient(mlflow_db).get_metric_history(run_id, METRIC)
    assert [m.step for m in history] == [0, 1]


# ---------------------------------------------------------------------------------------------------
# real Ray Train: 2 workers, gloo DDP


def _facts(log_dir: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (log_dir / f"facts_rank{rank}.jsonl").read_text().splitlines()]


def _events(log_dir: Path) -> list[str]:
    return (log_dir / "events.log").read_text().splitlines()


@pytest.fixture(scope="module")
def ddp_run(ray_session: None, mlflow_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One real 2-worker run (2 epochs) with tracking, shared by the DDP assertions below."""
    root = tmp_path_factory.mktemp("ddp")
    log_dir = root / "logs"
    log_dir.mkdir()
    cfg = _cfg(
        root, "train.workers=2", f"tracking.uri={mlflow_db}", "tracking.experiment=ddp", "train.name=ddp"
    )
    run_id = start_run(cfg, "ddp")
    t0 = time.monotonic()
    result = toy_train_fn(cfg, run_id, log_dir=str(log_dir))
    Tracker(mlflow_db, run_id).end()
    return {"cfg": cfg, "result": result, "run_id": run_id, "log_dir": log_dir, "root": root,
            "uri": mlflow_db, "seconds": time.monotonic() - t0}  # fmt: skip


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_is_real(ddp_run: dict) -> None:
    log_dir = ddp_run["log_dir"]
    f0, f1 = _facts(log_dir, 0), _facts(log_dir, 1)
    assert len(f0) == len(f1) == 2
    for a, b in zip(f0, f1, strict=True):
        assert a["world_size"] == b["world_size"] == 2
        assert a["pid"] != b["pid"] and os.getpid() not in (a["pid"], b["pid"])
        assert a["backend"] == b["backend"] == "gloo"
        assert a["ddp"] and b["ddp"] and a["sampler"] == "DistributedSampler"
        assert a["rank_sum"] == b["rank_sum"] == 1.0  # all-reduce of the ranks 0 + 1
        assert a["checksum"] == pytest.approx(b["checksum"], abs=1e-6)  # in sync after the steps
        assert a["n_gathered"] == b["n_gathered"] == N_VAL  # unequal shards gathered whole
        assert a[METRIC] == b[METRIC]  # all-reduced, so the same on both ranks
        assert a["val/mse"] == pytest.approx(a["val/mse_gathered"], rel=1e-5)  # weighted mean == global
    assert f0[0]["checksum"] != f0[1]["checksum"]  # and it did train


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_checkpoints_carry_state_and_metrics(ddp_run: dict) -> None:
    result = ddp_run["result"]
    assert result.error is None and result.metrics["epoch"] == 1
    state = load_state(result.checkpoint)
    assert state["epoch"] == 1 and set(state) >= {"model", "optimizer", "scheduler", "config"}
    assert state["config"] == to_dict(ddp_run["cfg"])
    # every checkpoint carries its metrics (Ray's record and our metrics.json agree)
    assert len(result.best_checkpoints) == ddp_run["cfg"].train.keep_checkpoints == 2
    for ckpt, metrics in result.best_checkpoints:
        saved = json.loads(Path(ckpt.path, METRICS_FILE).read_text())
        assert saved[METRIC] == pytest.approx(metrics[METRIC]) and saved["epoch"] == metrics["epoch"]
        assert load_state(ckpt)["epoch"] == metrics["epoch"]
    best = result.get_best_checkpoint(METRIC, "max")
    best_value = max(m[METRIC] for _, m in result.best_checkpoints)
    assert json.loads(Path(best.path, METRICS_FILE).read_text())[METRIC] == best_value
    worst = result.get_best_checkpoint(METRIC, "min")
    assert worst.path != best.path


@pytest.mark.ray
@pytest.mark.slow
def test_ddp_tracking_rank0_only(ddp_run: dict) -> None:
    client = mlflow.MlflowClient(ddp_run["uri"])
    run = client.get_run(ddp_run["run_id"])
    assert run.info.status == "FINISHED"
    expected = {k: str(v) if not isinstance(v, (list, tuple)) else json.dumps(v) for k, v in
                flatten(to_dict(ddp_run["cfg"])).items()}  # fmt: skip
    assert run.data.params == expected
    for key in (METRIC, "train/loss", "val/mse"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [0, 1]  # one value per epoch: rank 1 logged nothing
    assert [f["tracker"] for f in _facts(ddp_run["log_dir"], 1)] == ["NullTracker"] * 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location.endswith("/mlartifacts/ddp")  # beside the database, not in the cwd
    running = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert not running


def _latest_epoch(snapshot: Path) -> int | None:
    try:
        return json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _wait_for(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.ray
@pytest.mark.slow
def test_same_name_resumes_then_survives_a_killed_worker(ddp_run: dict) -> None:
    """A second fit with the run's name continues after its last epoch (1); mid-run, a worker is
    SIGKILLed after epoch 2's report and the restarted group continues from epoch 2's checkpoint."""
    log_dir, hold = ddp_run["log_dir"], ddp_run["root"] / "hold"
    hold.write_text("")  # the loop waits after each report while this exists
    before = len(_events(log_dir))
    cfg = _cfg(ddp_run["root"], "train.workers=2", "optim.epochs=4", "train.name=ddp", "tracking.enabled=false",
               "train.max_failures=2")  # fmt: skip
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = fit(
                toy_loop, cfg, stage="toy", loop_config={"log_dir": str(log_dir), "hold_file": str(hold)},
                metric=METRIC,
            )  # fmt: skip
        except BaseException as e:  # surfaced by the assertions below
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    try:
        new = lambda: _events(log_dir)[before:]  # noqa: E731
        _wait_for(lambda: sum(e.startswith("end epoch=2 ") for e in new()) == 2, 180, "epoch 2 on both ranks")
        # The controller commits a reported checkpoint when it next polls the workers (every
        # RAY_TRAIN_HEALTH_CHECK_INTERVAL_S: 2 s by default, 0.5 s in the tests, tests/ray_fixture.py); a
        # worker dying before that loses the report. Kill only once epoch 2's checkpoint is on record.
        snapshot = Path(ddp_run["result"].path) / "checkpoint_manager_snapshot.json"
        _wait_for(lambda: _latest_epoch(snapshot) == 2, 60, "epoch 2's checkpoint to be committed")
        victim = int((log_dir / "pid_rank1.txt").read_text())
        os.kill(victim, signal.SIGKILL)
    finally:
        hold.unlink()
        thread.join(timeout=300)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    result = box["result"]
    assert result.metrics["epoch"] == 3 and load_state(result.checkpoint)["epoch"] == 3
    assert Path(result.path) == Path(ddp_run["result"].path)  # the same run directory

    events = _events(log_dir)[before:]
    begins = [e for e in events if e.startswith("begin")]
    assert sorted(b.split()[-1] for b in begins) == ["start=2", "start=2", "start=3", "start=3"]
    pids_after = {int(re.search(r"pid=(\d+)", b).group(1)) for b in begins if "start=3" in b}
    assert victim not in pids_after
    for epoch in (2, 3):  # every epoch finished on both ranks
        assert sum(e.startswith(f"end epoch={epoch} ") for e in events) >= 2
    assert not any(re.search(r"epoch=[01] ", e) for e in events)  # nothing before the checkpoint redone
    rank0_starts = [int(re.search(r"epoch=(\d+)", e).group(1)) for e in events
                    if e.startswith("start") and "rank=0" in e]  # fmt: skip
    assert len(rank0_starts) - len(set(rank0_starts)) <= 1  # at most one epoch redone
    assert rank0_starts.count(2) == 1  # epoch 2 was not redone: its checkpoint was used


@pytest.mark.ray
@pytest.mark.slow
def test_resource_starved_run_fails_with_a_message(
    ray_session: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.train

    monkeypatch.setenv("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "2")
    cfg = _cfg(tmp_path, "train.workers=8", "train.name=starved")  # 8 CPUs on a 4-CPU instance
    t0 = time.monotonic()
    with pytest.raises(ray.train.TrainingFailedError) as err:
        fit(toy_loop, cfg, stage="toy", loop_config={}, metric=METRIC)
    assert time.monotonic() - t0 < 120
    assert re.search(r"time(d)? ?out|timeout", str(err.value), re.IGNORECASE), str(err.value)


def test_min_steps_sets_the_passes_per_epoch_of_a_short_downstream_run() -> None:
    from stence.train.downstream_loop import passes_per_epoch

    assert passes_per_epoch(10, 0, 3) == 1  # the paper's recipe: one pass per epoch
    assert passes_per_epoch(10, 150, 1) == 15 and passes_per_epoch(10, 151, 1) == 16  # ceil(150 / 10)
    assert passes_per_epoch(10, 150, 4) == 4  # 10 epochs x 4 passes x 4 steps = 160 >= 150
    assert passes_per_epoch(50, 150, 5) == 1  # enough steps already
    assert passes_per_epoch(2, 5, 0) == 3  # an empty loader still counts one step per pass
