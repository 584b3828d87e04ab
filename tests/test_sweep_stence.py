"""The real StenCE sweep, end to end as a user runs it: `stence tune` over the pretraining driver (every
trial a Ray Train run on the tiny synthetic cohort), Optuna TPE, MLflow on SQLite, the best encoder probed,
registered and made champion, the champion scoring a real WFDB record; and the ablation table."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from stence.cli import main
from stence.config import from_dict
from stence.eval.report import read_results
from stence.models.checkpoint import load_encoder
from stence.serving import registry as reg
from stence.serving.fetch import load_champion
from stence.tracking.tags import SWEEP_TAG, TRIAL_TAG
from stence.train.pretrain_loop import KNN_METRIC, SELECT_METRIC
from stence.train.worker import load_state
from stence.tune import spaces
from stence.tune.champion import export_best_encoder
from tests.ray_fixture import shared_mlflow_db

pytestmark = [pytest.mark.ray, pytest.mark.slow]
MODEL = "stence-test-sweep-encoder"


@pytest.fixture(scope="module")
def sweep(tiny_cohort: Path, ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("stence-sweep")
    db = shared_mlflow_db(tmp_path_factory)
    sets = [f"data.cohort={tiny_cohort}", f"train.storage_path={root / 'ray'}", f"tracking.uri={db}",
            "tracking.experiment=stence-sweep", f"tracking.registered_model={MODEL}", "train.workers=1",
            "optim.epochs=2", "optim.batch_size=8", "downstream.epochs=2", "downstream.bootstrap=100",
            "feature.variants=1", "model.ecg=echoingecg_tiny"]  # fmt: skip
    code = main(["tune", "--space", "default", "--num-samples", "3", "--max-concurrent", "2",
                 "--sweep-name", "real-sweep", "--register-task", "0_100", "--set", *sets])  # fmt: skip
    return {"code": code, "db": db, "sets": sets, "root": root}


def test_sweep_runs_are_nested_finished_and_complete(sweep: dict) -> None:
    assert sweep["code"] == 0
    client = mlflow.MlflowClient(sweep["db"])
    exp = client.get_experiment_by_name("stence-sweep")
    runs = client.search_runs([exp.experiment_id])
    parent = [r for r in runs if r.data.tags.get(SWEEP_TAG) == "real-sweep" and "mlflow.parentRunId" not in r.data.tags]
    assert len(parent) == 1
    pid = parent[0].info.run_id
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid and TRIAL_TAG in r.data.tags]
    assert len(children) == 3 and len({c.data.tags[TRIAL_TAG] for c in children}) == 3
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # what a user looks at after the sweep, in its parent run: best-so-far, importances, trials sorted
    arts = {a.path for a in client.list_artifacts(pid, "summary")}
    assert {"summary/best_so_far.png", "summary/best_so_far.csv", "summary/trials.md",
            "summary/importances.json"} <= arts
    sweep_dir = sweep["root"] / "ray" / "real-sweep"  # the sweep folder itself (its champion probe is "real-sweep-…")
    assert (sweep_dir / "stence_sweep.json").is_file()
    curve = np.loadtxt(sweep_dir / "summary" / "best_so_far.csv", delimiter=",", skiprows=1, usecols=(0, 1))
    assert (np.diff(curve[:, 1]) >= 0).all() and curve[-1, 0] == len(curve)  # a running best per trial-epoch
    lines = [line for line in (sweep_dir / "summary" / "trials.md").read_text().splitlines() if line.startswith("| ")]
    header, rows = [c.strip() for c in lines[0].split("|")], [[c.strip() for c in r.split("|")] for r in lines[1:]]
    best = [float(r[header.index(f"best {SELECT_METRIC}")]) for r in rows]
    assert len(best) == 3 and best == sorted(best, reverse=True)
    # each trial's kNN AUROC at its best epoch, inside its DeLong 95 % interval
    for r in rows:
        value, _, interval = r[header.index(f"{KNN_METRIC} (95 % CI) there")].partition(" ")
        lo, hi = (float(x) for x in interval.strip("[]").split(","))
        assert 0.0 <= lo <= float(value) <= hi <= 1.0
    imp = json.loads((sweep_dir / "summary" / "importances.json").read_text())
    assert set(imp) <= {"loss.w_sten", "loss.temperature", "optim.lr_ecg", "optim.lr_angio"}
    for c in children:
        assert c.info.status == "FINISHED"
        assert {"loss.w_sten", "loss.temperature", "optim.lr_ecg", "optim.lr_angio"} <= set(c.data.params)
        steps = [m.step for m in client.get_metric_history(c.info.run_id, KNN_METRIC)]
        assert steps and len(steps) == len(set(steps)) and set(steps) <= {1, 2}
        assert client.get_metric_history(c.info.run_id, "train/loss")
    # the paper's point was one of the trials (points_to_evaluate)
    assert any(float(c.data.params["loss.w_sten"]) == 0.3 and float(c.data.params["loss.temperature"]) == 0.2
               for c in children)


def test_the_pseudonymisation_secret_reaches_no_run_checkpoint_or_model(sweep: dict) -> None:
    """The sweep ran with STENCE_SALT in every process's environment: no byte of the MLflow store, its
    artifacts (scorers, configs), the checkpoints or the Ray storage holds it."""
    import os

    secret = os.environ["STENCE_SALT"].encode()
    store = Path(sweep["db"][len("sqlite:///"):]).parent  # mlflow.db and mlartifacts/
    files = [p for root in (store, sweep["root"]) for p in Path(root).rglob("*") if p.is_file()]
    assert len(files) > 20
    assert not [p for p in files if secret in p.read_bytes()]


def test_champion_is_the_best_checkpoint_and_scores_a_real_record(
    sweep: dict, shared_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    client = mlflow.MlflowClient(sweep["db"])
    version = client.get_model_version_by_alias(MODEL, "champion")
    exp = client.get_experiment_by_name("stence-sweep")
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'real-sweep'"
                                   " and tags.`stence.best_checkpoint` != ''")  # fmt: skip
    assert version.tags["stence.trial_id"] == parent.data.tags["stence.best_trial_id"]
    best_ckpt = parent.data.tags["stence.best_checkpoint"]
    assert best_ckpt and Path(best_ckpt).is_dir()
    cfg = from_dict(load_state(best_ckpt)["config"])
    encoder = load_encoder(export_best_encoder(best_ckpt, cfg, tmp_path)).eval()
    champion = load_champion(f"models:/{MODEL}@champion", uri=sweep["db"]).eval()
    x = reg.example_input(champion.input_spec, n=3, seed=0)  # (3, 12, T)
    with torch.inference_mode():
        ref = encoder(torch.from_numpy(x)).numpy()
        out = champion(torch.from_numpy(x))
    np.testing.assert_allclose(out["embedding"].numpy(), ref, rtol=1e-5, atol=1e-6)

    record = shared_data / "ecg" / "wfdb" / "HR06000.hea"
    assert main(["predict", "--json", "--model", f"models:/{MODEL}@champion", "--set",
                 f"tracking.uri={sweep['db']}", "--", str(record)]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["error"] is None and 0.0 <= rows[0]["probability"] <= 1.0


def test_ablation_sweep_writes_the_table_figure_and_paired_tests(
    sweep: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`stence tune --space ablation`: a fixed-variant sweep (cut to two variants here: the paper's setting
    and the same with the backbone's native input contract), each variant's encoder probed under its own
    contract; table, Fig. 2 and DeLong."""
    variants = [{"loss.w_sten": 0.3, "model.contract": "paper"}, {"loss.w_sten": 0.3, "model.contract": "native"}]
    monkeypatch.setitem(spaces.SPACES, "ablation", {"kind": "variants", "variants": variants})
    assert main(["tune", "--space", "ablation", "--sweep-name", "real-ablation", "--tasks", "0_100",
                 "--no-register", "--max-concurrent", "2", "--set", *sweep["sets"]]) == 0  # fmt: skip
    out = sweep["root"] / "ray" / "real-ablation" / "ablation"
    rows = read_results(out / "results.json")
    assert set(rows) == {"W_Sten 0.3, paper input", "W_Sten 0.3, native input"}
    for r in rows.values():
        assert r["0_100"]["auroc_lo"] <= r["0_100"]["auroc"] <= r["0_100"]["auroc_hi"]
    assert (out / "fig2_auroc_vs_threshold.png").stat().st_size > 1000
    (d,) = json.loads((out / "delong.json").read_text())
    assert d["model_a"] == "W_Sten 0.3, paper input" and 0.0 <= d["p_value"] <= 1.0
    assert "Paired DeLong" in (out / "results.md").read_text() and "Paired DeLong" in capsys.readouterr().out
    client = mlflow.MlflowClient(sweep["db"])
    exp = client.get_experiment_by_name("stence-sweep")
    (parent,) = client.search_runs([exp.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = 'real-ablation'"
                                   " and tags.`stence.best_checkpoint` != ''")  # fmt: skip
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "ablation")}
    assert "ablation/results.md" in arts and "ablation/fig2_auroc_vs_threshold.png" in arts


def test_mlflow_ui_shows_the_sweep_the_evaluation_trees_and_the_comparison(sweep: dict, tmp_path: Path) -> None:
    """The MLflow UI in headless Chromium, after the sweep and the ablation's evaluations above: the sweep's parent
    with its trials, each evaluation run with its task runs, and the comparison run with its Fig. 2 artifact.
    With STENCE_UI_SCREENSHOTS=DIR set, the pages are also saved there as PNGs (the README's screenshots)."""
    import os

    from tests.mlflow_ui import CHROMIUM, artifacts_page, chromium, mlflow_server, page_text, runs_page

    if CHROMIUM is None:
        pytest.fail("chromium is not installed: `make test` installs it (cluster/ci_install.sh)")
    shots = Path(os.environ["STENCE_UI_SCREENSHOTS"]) if os.environ.get("STENCE_UI_SCREENSHOTS") else None

    def shot(name: str) -> Path | None:
        return shots / name if shots else None

    client = mlflow.MlflowClient(sweep["db"])
    exp = client.get_experiment_by_name("stence-sweep").experiment_id
    runs = client.search_runs([exp])
    name = {r.info.run_id: r.info.run_name for r in runs}
    parent = next(r for r in runs if r.data.tags.get(SWEEP_TAG) == "real-sweep" and "mlflow.parentRunId" not in r.data.tags)
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id and TRIAL_TAG in r.data.tags]
    evals = [r for r in runs if r.data.tags.get("stence.stage") == "evaluation"]
    (comparison,) = [r for r in runs if r.data.tags.get("stence.stage") == "comparison"]
    assert len(trials) == 3 and len(evals) == 2
    with mlflow_server(sweep["db"], tmp_path) as base, chromium() as browser:
        # the sweep: one parent run; unfolded (the "+" a user clicks), its trials beneath it
        want = [name[r.info.run_id] for r in [parent, *trials]]
        text = page_text(browser, runs_page(base, exp, "tags.`stence.sweep` = 'real-sweep'"), want, expand=True,
                         screenshot=shot("mlflow_sweep_runs.png"))
        for r in [parent, *trials]:
            assert name[r.info.run_id] in text, f"sweep run {name[r.info.run_id]} not shown"
        # the ablation sweep: one evaluation run per variant and the comparison run, beneath its parent
        ablation = next(r for r in runs if r.data.tags.get(SWEEP_TAG) == "real-ablation"
                        and "mlflow.parentRunId" not in r.data.tags)
        want = [name[r.info.run_id] for r in [*evals, comparison]]
        text = page_text(browser, runs_page(base, exp, f"tags.`mlflow.parentRunId` = '{ablation.info.run_id}'"),
                         want, expand=True, screenshot=shot("mlflow_ablation.png"))
        assert all(w in text for w in want), "an evaluation or the comparison run is not shown"
        # each evaluation: its task runs beneath it
        for i, ev in enumerate(evals):
            tasks = [name[r.info.run_id] for r in runs if r.data.tags.get("mlflow.parentRunId") == ev.info.run_id]
            text = page_text(browser, runs_page(base, exp, f"tags.`mlflow.parentRunId` = '{ev.info.run_id}'"),
                             [name[ev.info.run_id], *tasks], expand=True,
                             screenshot=shot("mlflow_evaluation.png") if i == 0 else None)
            assert tasks and all(t in text for t in [name[ev.info.run_id], *tasks]), "task runs are not shown"
        # the comparison run: its table, paired tests and Fig. 2
        text = page_text(browser, artifacts_page(base, exp, comparison.info.run_id),
                         ["fig2_auroc_vs_threshold.png", "delong.json"], screenshot=shot("mlflow_comparison.png"))
        assert "fig2_auroc_vs_threshold.png" in text and "delong.json" in text
