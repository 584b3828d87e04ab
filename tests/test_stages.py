"""Stages B and C on real Ray: a 2-worker gloo DDP StenCE pretraining run, then a probe with intervals."""

import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from stence.config import Config, apply_overrides
from stence.models.scorer import load_scorer
from stence.pipelines.downstream import run_downstream
from stence.pipelines.pretrain import run_pretrain
from stence.train.features import extract_features
from stence.train.pretrain_loop import SELECT_METRIC, smoothed
from tests.ray_fixture import shared_mlflow_db

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_smoothed_knn_is_the_mean_of_the_last_n_and_ranks_an_unscored_run_last():
    assert smoothed([], 3) == 0.0
    assert smoothed([0.9], 3) == pytest.approx(0.9)
    assert smoothed([0.2, 0.9, 0.5, 0.7], 3) == pytest.approx(0.7)
    assert smoothed([0.2, 0.9], 1) == pytest.approx(0.9)
    # a lucky spike does not outrank a run that stays good
    assert smoothed([0.5, 0.5, 0.95], 3) < smoothed([0.7, 0.75, 0.72], 3)


@pytest.fixture(scope="module")
def cfg(tiny_cohort, ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("storage")
    c = apply_overrides(Config(), {
        "data.cohort": str(tiny_cohort), "train.storage_path": str(storage), "tracking.uri":
        shared_mlflow_db(tmp_path_factory), "tracking.experiment": "test-stages", "optim.epochs": 2,
        "optim.batch_size": 8, "downstream.epochs": 2, "downstream.bootstrap": 100, "feature.variants": 1,
    })
    extract_features(c)
    return c


@pytest.fixture(scope="module")
def pretrained(cfg):
    return run_pretrain(apply_overrides(cfg, {"train.workers": 2, "train.name": "ddp"}))


def test_pretraining_is_real_ddp(pretrained, cfg):
    m = pretrained["metrics"]
    assert m["ddp/world_size"] == 2 and m["ddp/distinct_pids"] == 2 and m["ddp/wrapped"] == 1
    assert m["ddp/param_spread"] < 1e-6  # replicas hold identical weights after the steps
    assert 0 <= m["val/knn_auroc"] <= 1 and math.isfinite(m["val/clip_loss"])
    client = mlflow.MlflowClient(cfg.tracking.uri)
    run = client.get_run(pretrained["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["loss.w_sten"] == str(cfg.loss.w_sten)
    history = client.get_metric_history(pretrained["run_id"], "val/knn_auroc")
    assert [h.step for h in history] == [1, 2]
    # checkpoints are ranked by the mean of the last train.knn_smooth (3) kNN AUROCs: here both epochs
    knn = [h.value for h in sorted(history, key=lambda h: h.step)]
    smooth = {h.step: h.value for h in client.get_metric_history(pretrained["run_id"], SELECT_METRIC)}
    assert smooth == pytest.approx({1: knn[0], 2: (knn[0] + knn[1]) / 2})
    assert m[SELECT_METRIC] == pytest.approx(max(smooth.values()))  # the export is the best-ranked epoch


def test_rerun_with_same_name_resumes(pretrained, cfg):
    from stence.models.checkpoint import load_encoder

    again = run_pretrain(apply_overrides(cfg, {"train.workers": 2, "train.name": "ddp"}))
    client = mlflow.MlflowClient(cfg.tracking.uri)
    # it found its finished checkpoints: no epoch was trained again, the same best weights were exported
    assert client.get_metric_history(again["run_id"], "train/loss") == []
    a, b = load_encoder(pretrained["encoder"]).state_dict(), load_encoder(again["encoder"]).state_dict()
    assert all(a[k].equal(b[k]) for k in a)


def test_probe_gives_intervals_and_a_scorer(pretrained, cfg):
    probe_cfg = apply_overrides(cfg, {"downstream.encoder_checkpoint": pretrained["encoder"],
                                      "train.workers": 0, "downstream.task": "0_100", "downstream.min_steps": 7})
    out = run_downstream(probe_cfg, label="stence")
    # the tiny cohort gives one step per pass: min_steps 7 over the 2 configured epochs makes 4 passes each
    client = mlflow.MlflowClient(cfg.tracking.uri)
    assert sorted(h.step for h in client.get_metric_history(out["run_id"], "train/loss")) == [1, 2]
    assert [h.value for h in client.get_metric_history(out["run_id"], "train/passes_per_epoch")] == [4.0, 4.0]
    r = out["metrics"]["0_100"]
    assert r["auroc_lo"] <= r["auroc"] <= r["auroc_hi"] and r["n_pos"] > 0 and r["n"] > r["n_pos"]
    assert "sex" in out["metrics"]["subgroups"]
    scorer = load_scorer(out["scorer"])
    assert scorer.input_spec["fs"] == 500 and scorer.task == "0_100"
    # the probe scored test from cached frozen embeddings: the scorer's full forward gives the same numbers
    from stence.data.cohort_io import Cohort
    from stence.data.datasets import EcgDataset

    test_ds = EcgDataset(Cohort.open(probe_cfg.data.cohort), "test", probe_cfg.data, "0_100", train=False)
    order = np.asarray(out["test"]["index"])
    with torch.no_grad():
        p = scorer.eval()(torch.stack([test_ds[int(i)]["ecg"] for i in order]))["probability"]
    np.testing.assert_allclose(p.numpy().reshape(-1), np.asarray(out["test"]["p"]).reshape(-1), rtol=1e-4, atol=1e-6)
    # the saved predictions carry each row's patient pseudonym and load without pickle (for --compare)
    with np.load(Path(out["out"]) / "test_predictions.npz", allow_pickle=False) as z:
        assert z["patients"].tolist() == test_ds.patients[order].tolist()
        assert len(set(z["patients"].tolist())) < len(order)  # two ECGs per patient: fewer units than rows
    # the encoder inside the scorer is the pretrained one, not a fresh init (probe froze it)
    from stence.models.checkpoint import load_encoder

    enc = load_encoder(pretrained["encoder"])
    for (k, a), (_, b) in zip(enc.state_dict().items(), scorer.encoder.state_dict().items(), strict=True):
        assert a.equal(b), k


def test_probe_command_is_one_evaluation_tree_and_compare_links_the_trees(pretrained, cfg, tmp_path, capsys):
    """`stence probe` on two tasks is one evaluation run with a nested run per task; `--compare` is a run of
    its own holding the table, paired tests and Fig. 2, tagged with the evaluation runs it compared."""
    from stence.cli import main
    from stence.tracking.tags import COMPARED_TAG

    sets = [f"data.cohort={cfg.data.cohort}", f"train.storage_path={cfg.train.storage_path}",
            f"tracking.uri={cfg.tracking.uri}", "tracking.experiment=test-eval-trees", "downstream.epochs=1",
            "downstream.bootstrap=50"]
    common = ["--workers", "0", "--tasks", "0_100", "lt70_ge70", "--set", *sets]
    assert main(["probe", "--encoder", pretrained["encoder"], "--label", "stence", "--out", str(tmp_path / "a"),
                 *common]) == 0
    assert main(["probe", "--label", "baseline", "--out", str(tmp_path / "b"), *common]) == 0
    assert main(["probe", "--compare", str(tmp_path / "a" / "results.json"), str(tmp_path / "b" / "results.json"),
                 "--out", str(tmp_path / "c"), "--set", *sets]) == 0
    client = mlflow.MlflowClient(cfg.tracking.uri)
    exp = client.get_experiment_by_name("test-eval-trees").experiment_id
    runs = client.search_runs([exp])
    evals = {r.data.tags["stence.label"]: r for r in runs if r.data.tags.get("stence.stage") == "evaluation"}
    assert set(evals) == {"stence", "baseline"}
    for ev in evals.values():
        assert ev.info.status == "FINISHED" and "mlflow.parentRunId" not in ev.data.tags  # a top-level tree
        kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == ev.info.run_id]
        assert sorted(r.data.tags["stence.stage"] for r in kids) == ["probe", "probe"]
        assert {"0_100/auroc", "lt70_ge70/auroc"} <= set(ev.data.metrics)
        arts = {a.path for a in client.list_artifacts(ev.info.run_id)}
        assert {"results.json", "results.md", "fig2_auroc_vs_threshold.png"} <= arts
    assert evals["stence"].data.tags["stence.encoder"].endswith("/encoder.pt")
    assert str(tmp_path) not in evals["stence"].data.tags["stence.encoder"]  # no local path in MLflow
    (cmp_run,) = [r for r in runs if r.data.tags.get("stence.stage") == "comparison"]
    assert sorted(json.loads(cmp_run.data.tags[COMPARED_TAG])) == sorted(r.info.run_id for r in evals.values())
    assert cmp_run.data.tags["stence.compared.stence"] == evals["stence"].info.run_id
    arts = {a.path for a in client.list_artifacts(cmp_run.info.run_id)}
    assert {"results.md", "fig2_auroc_vs_threshold.png", "delong.json"} <= arts
    # the results table names the runs, so a comparison made later still links them
    table = json.loads((tmp_path / "a" / "results.json").read_text())
    assert table["stence"]["0_100"]["evaluation_run_id"] == evals["stence"].info.run_id


def _committed_epoch(run_dir: Path) -> int:
    """The epoch of the latest checkpoint Ray Train has on record for a run (0 before the first)."""
    try:
        snap = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snap["latest_checkpoint_result"]["metrics"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def _train_worker_pids() -> list[int]:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return sorted(int(a.pid) for a in actors)


def test_killed_worker_resumes_the_real_pretraining_from_its_checkpoint(cfg):
    """SIGKILL one of the two StenCE pretraining workers (found by PID through Ray's state API) in the
    epoch after the first committed checkpoint: the run finishes every epoch, resumed from that checkpoint,
    and each epoch's train/loss is logged once, even one trained twice."""
    epochs = 5
    run_cfg = apply_overrides(cfg, {"train.workers": 2, "train.name": "ddp-kill", "optim.epochs": epochs,
                                    "train.max_failures": 2, "train.knn_smooth": epochs})
    run_dir = Path(run_cfg.train.storage_path) / "ddp-kill-pretrain"
    box: dict = {}

    def run() -> None:
        try:
            box["result"] = run_pretrain(run_cfg)
        except BaseException as e:  # surfaced by the assertions below
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 240
    while _committed_epoch(run_dir) < 1 and thread.is_alive():
        assert time.monotonic() < deadline, "no checkpoint committed in time"
        time.sleep(0.2)
    killed_after = _committed_epoch(run_dir)
    assert thread.is_alive() and killed_after < epochs, "the run ended before the kill: make epochs longer"
    pids = _train_worker_pids()
    assert len(pids) == 2 and os.getpid() not in pids
    os.kill(pids[-1], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")

    result = box["result"]
    assert _train_worker_pids() == []  # the restarted group is gone too
    client = mlflow.MlflowClient(cfg.tracking.uri)
    steps = [h.step for h in client.get_metric_history(result["run_id"], "train/loss")]
    assert sorted(set(steps)) == list(range(1, epochs + 1))  # every epoch finished
    assert len(steps) == len(set(steps))  # an epoch trained twice is logged once (the tracker's dedupe)
    assert steps.count(1) == 1  # no restart from scratch: the first epoch came from the checkpoint
    assert client.get_run(result["run_id"]).info.status == "FINISHED"
    assert _committed_epoch(run_dir) == epochs
    # the kNN history behind the smoothed ranking came back with the checkpoint: smoothing over every epoch,
    # the last one's value is the mean of all five kNN AUROCs, epoch 1's logged before the kill
    def latest(key: str) -> dict[int, float]:
        hist = sorted(client.get_metric_history(result["run_id"], key), key=lambda h: h.timestamp)
        return {h.step: h.value for h in hist}
    knn, smooth = latest("val/knn_auroc"), latest(SELECT_METRIC)
    assert smooth[epochs] == pytest.approx(np.mean([knn[e] for e in range(1, epochs + 1)]))
