"""Model registry and serving on a real MLflow SQLite store: pyfunc logging and loading, champion
promotion rules, provenance tags, and `stence predict` / `register` / `models` / `ui` on real WFDB files."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import wfdb

from stence.cli import main
from stence.config import Config, config_hash, to_dict
from stence.models.heads import ClassifierHead
from stence.models.registry import create_ecg_encoder
from stence.models.scorer import load_scorer, save_scorer, scorer_metadata
from stence.serving import registry as reg
from stence.serving.fetch import load_champion
from stence.serving.predict import predict_records, prepare_record, preprocessing_for
from stence.tracking.runs import Tracker, start_run
from stence.tracking.tags import (
    CODE_COMMIT_TAG,
    COHORT_FINGERPRINT_TAG,
    CONFIG_HASH_TAG,
    INPUT_CONTRACT_TAG,
    METRIC_INTERVAL_TAG,
    METRIC_LO_TAG,
    METRIC_TAG,
    METRIC_VALUE_TAG,
    SEED_TAG,
    SWEEP_TAG,
)
from tests.ray_fixture import shared_mlflow_db

EXPERIMENT = "registry-test"
N_SAMPLES = 1500  # 3 s at 500 Hz, the default contract


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


def _cfg(db: str, **train: object) -> Config:
    cfg = Config()
    return replace(cfg, tracking=replace(cfg.tracking, uri=db, experiment=EXPERIMENT),
                   train=replace(cfg.train, **train))


def make_scorer(path: Path, seed: int, auroc: float, cfg: Config, cohort: str = "") -> Path:
    """A tiny real scorer (otis_tiny + linear head with non-trivial weights), saved like `stence probe`."""
    torch.manual_seed(seed)
    enc = create_ecg_encoder("otis_tiny", fs=500, n_samples=N_SAMPLES)
    head = ClassifierHead(enc.embed_dim, 1)
    torch.nn.init.normal_(head.fc.weight, std=0.5)
    d = to_dict(cfg)
    if cohort:
        d["data"]["cohort"] = cohort
    save_scorer(path, enc, head, "0_100", d, {"auroc": auroc, "auroc_lo": auroc - 0.05, "auroc_hi": auroc + 0.05,
                                             "auprc": 0.5, "n": 100, "n_pos": 30})
    return path


@pytest.fixture(scope="module")
def logged(mlflow_db: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One scorer logged as a pyfunc model of a run (logging takes seconds: done once per module)."""
    tmp = tmp_path_factory.mktemp("registry")
    cohort = tmp / "cohort"
    cohort.mkdir()
    (cohort / "cohort.json").write_text(json.dumps({"fingerprint": "cohortA"}))
    cfg = _cfg(mlflow_db, seed=7)
    scorer = make_scorer(tmp / "a" / "scorer.pt", seed=0, auroc=0.70, cfg=cfg, cohort=str(cohort))
    run_id = start_run(cfg, "registry-a", tags={"stence.sweep": "sweep-1"})
    model_uri = reg.log_scorer(scorer, run_id, mlflow_db)
    Tracker(mlflow_db, run_id).end()
    return {"scorer": scorer, "run_id": run_id, "model_uri": model_uri, "cfg": cfg, "tmp": tmp}


def _name() -> str:
    return f"stence-test-{uuid.uuid4().hex[:8]}"


def _outputs(scorer: torch.nn.Module, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.inference_mode():
        out = scorer(torch.from_numpy(x))
    return out["probability"].numpy(), out["embedding"].numpy()


def test_champion_loads_and_matches_scorer_file(logged: dict, mlflow_db: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    name = _name()
    meta = scorer_metadata(logged["scorer"])
    tags = reg.scorer_version_tags(meta)
    version = reg.register(logged["model_uri"], name, tags, uri=mlflow_db)
    assert reg.promote_if_better(name, version, tags[METRIC_TAG], 0.70, 0.65, tags[COHORT_FINGERPRINT_TAG],
                                 strict=False, uri=mlflow_db)  # a first version becomes champion
    x = reg.example_input(meta["input_spec"], n=4, seed=3)  # (4, 12, 1500)
    p_ref, e_ref = _outputs(load_scorer(logged["scorer"]), x)
    p_other, _ = _outputs(load_scorer(make_scorer(logged["tmp"] / "b.pt", 1, 0.7, logged["cfg"])), x)
    assert not np.allclose(p_ref, p_other, atol=1e-4)  # outputs depend on the weights: the check can fail

    for ref in (f"models:/{name}@champion", f"models:/{name}/{version}", f"runs:/{logged['run_id']}",
                logged["model_uri"], str(logged["scorer"])):
        champ = load_champion(ref, uri=mlflow_db)
        p, e = _outputs(champ, x)
        np.testing.assert_array_equal(p, p_ref, err_msg=ref)
        np.testing.assert_array_equal(e, e_ref, err_msg=ref)
        assert champ.metadata["input_spec"] == meta["input_spec"]

    # the real pyfunc, loaded by alias, with pickle deserialisation switched off (models from code)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    sig = model.metadata.signature
    spec = sig.inputs.to_dict()[0]["tensor-spec"]
    assert spec["dtype"] == "float32" and tuple(spec["shape"]) == (-1, 12, N_SAMPLES)
    assert [c["name"] for c in sig.outputs.to_dict()] == ["probability"]
    assert sig.params is not None and sig.params.to_dict()[0]["name"] == "output"
    np.testing.assert_allclose(model.predict(x)["probability"].to_numpy(), p_ref[:, 0], rtol=1e-6)
    emb = model.predict(x, params={"output": "embedding"})
    assert emb.shape == (4, e_ref.shape[1])
    np.testing.assert_allclose(emb.to_numpy(), e_ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match=r"12|1500"):  # wrong window length: the contract is enforced
        model.predict(x[:, :, :1000])
    local = mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(logged["tmp"] / "dl"))
    assert (Path(local) / "input_example.json").is_file()
    assert not list(Path(local).rglob("*.pkl"))  # nothing pickled: weights-only scorer + code entry file


def test_promotion_rules(logged: dict, mlflow_db: str) -> None:
    name, uri, m = _name(), logged["model_uri"], "0_100/auroc"

    def new(value: float, lo: float, cohort: str = "C", strict: bool = False, metric: str = m) -> tuple[str, bool]:
        v = reg.register(uri, name, {}, uri=mlflow_db)
        return v, reg.promote_if_better(name, v, metric, value, lo, cohort, strict, uri=mlflow_db)

    def champion() -> str:
        return str(reg.champion_version(name, uri=mlflow_db).version)

    v1, ok = new(0.70, 0.65)
    assert ok and champion() == v1  # first version: champion
    v2, ok = new(0.68, 0.60)
    assert not ok and champion() == v1  # worse: the alias stays
    v3, ok = new(0.75, 0.66, strict=True)
    assert not ok and champion() == v1  # strict: lower bound 0.66 does not beat 0.70
    v4, ok = new(0.75, 0.66)
    assert ok and champion() == v4  # better value: moves
    v5, ok = new(0.95, 0.90, cohort="D")
    assert not ok and champion() == v4  # another cohort: refused however good
    v6, ok = new(0.99, 0.95, metric="0_90/auroc")
    assert not ok and champion() == v4  # another metric: refused
    v7, ok = new(0.90, 0.80, strict=True)
    assert ok and champion() == v7  # strict and lower bound 0.80 beats 0.75

    rows = {r["version"]: r for r in reg.list_models(name, uri=mlflow_db)}
    assert [r["version"] for r in reg.list_models(name, uri=mlflow_db)] == list(range(7, 0, -1))
    assert rows[int(v7)]["aliases"] == ["champion"]
    assert all(r["aliases"] == [] for v, r in rows.items() if v != int(v7))
    assert rows[int(v7)]["run_id"] == logged["run_id"]
    assert "different cohort" in rows[int(v5)]["decision"] and "lower bound" in rows[int(v3)]["decision"]
    assert rows[int(v2)]["metric"].startswith("0_100/auroc")


def test_decide_promotion_refuses_unknown_or_undefined() -> None:
    champ = {METRIC_TAG: "t/auroc", METRIC_VALUE_TAG: "0.7", COHORT_FINGERPRINT_TAG: reg.UNKNOWN}
    assert reg.decide_promotion(None, None, "t/auroc", 0.1, 0.0, reg.UNKNOWN, True)[0]
    assert not reg.decide_promotion(champ, "1", "t/auroc", 0.9, 0.8, reg.UNKNOWN, False)[0]
    champ[COHORT_FINGERPRINT_TAG] = "C"
    assert reg.decide_promotion(champ, "1", "t/auroc", 0.9, 0.8, "C", False)[0]
    assert not reg.decide_promotion(champ, "1", "t/auroc", 0.9, math.nan, "C", True)[0]
    assert not reg.decide_promotion(champ, "1", "t/auroc", 0.7, 0.6, "C", False)[0]  # equal is not better


def test_version_tags(logged: dict) -> None:
    meta = scorer_metadata(logged["scorer"])
    tags = reg.scorer_version_tags(meta, sweep="sweep-1")
    assert tags[METRIC_TAG] == "0_100/auroc"
    assert float(tags[METRIC_VALUE_TAG]) == pytest.approx(0.70) and float(tags[METRIC_LO_TAG]) == pytest.approx(0.65)
    assert tags[METRIC_INTERVAL_TAG] == "0.7000 [0.6500, 0.7500]"
    assert tags[COHORT_FINGERPRINT_TAG] == "cohortA"  # read from the scorer config's cohort.json
    cfg = logged["cfg"]  # the scorer's config: the run's config with the cohort folder it trained on
    assert tags[CONFIG_HASH_TAG] == config_hash(replace(cfg, data=replace(cfg.data, cohort=meta["config"]["data"]["cohort"])))
    assert tags[SEED_TAG] == "7"
    assert json.loads(tags[INPUT_CONTRACT_TAG]) == meta["input_spec"]
    assert tags[SWEEP_TAG] == "sweep-1"
    git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(reg.__file__).parents[2], capture_output=True,
                         text=True)
    assert tags[CODE_COMMIT_TAG] == (git.stdout.strip() if git.returncode == 0 else "unknown")
    with pytest.raises(ValueError, match="no metric"):
        reg.scorer_version_tags(meta, metric="brier")


def test_register_and_models_cli(logged: dict, mlflow_db: str, capsys: pytest.CaptureFixture) -> None:
    name = _name()
    cfg = logged["cfg"]
    run_id = start_run(cfg, "registry-cli", tags={"stence.sweep": "sweep-9"})
    Tracker(mlflow_db, run_id).log_artifact(logged["scorer"])  # as run_downstream does: scorer.pt at the root
    Tracker(mlflow_db, run_id).end()
    common = ["--name", name, "--set", f"tracking.uri={mlflow_db}", f"tracking.experiment={EXPERIMENT}"]
    assert main(["register", run_id, *common]) == 0
    out = capsys.readouterr().out
    assert f"registered {name} version 1" in out and "promoted to champion" in out
    mv = mlflow.MlflowClient(mlflow_db).get_model_version(name, "1")
    assert mv.run_id == run_id
    for key in (METRIC_TAG, METRIC_INTERVAL_TAG, COHORT_FINGERPRINT_TAG, CONFIG_HASH_TAG, CODE_COMMIT_TAG, SEED_TAG,
                INPUT_CONTRACT_TAG):
        assert mv.tags.get(key), key
    assert mv.tags[SWEEP_TAG] == "sweep-9"
    # a worse scorer given as a file: registered as version 2, champion stays on 1
    worse = make_scorer(logged["tmp"] / "worse" / "scorer.pt", 2, 0.60, cfg, cohort=str(logged["tmp"] / "cohort"))
    assert main(["register", str(worse), *common]) == 0
    assert "not promoted to champion" in capsys.readouterr().out
    assert main(["models", "--json", *common]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["aliases"]) for r in rows] == [(2, []), (1, ["champion"])]
    assert main(["register", "0" * 32, *common]) == 1  # unknown run: a clear error, no traceback
    assert "cannot find a scorer" in capsys.readouterr().out


def _write_permuted_copy(src: Path, dst_dir: Path) -> Path:
    """The same record with its 12 channels in reverse order (same digital samples, gains and names)."""
    rec = wfdb.rdrecord(str(src.with_suffix("")), physical=False)
    order = list(range(rec.n_sig))[::-1]
    wfdb.wrsamp("permuted", fs=rec.fs, units=[rec.units[i] for i in order],
                sig_name=[rec.sig_name[i] for i in order], d_signal=rec.d_signal[:, order],
                fmt=["16"] * rec.n_sig, adc_gain=[rec.adc_gain[i] for i in order],
                baseline=[rec.baseline[i] for i in order], write_dir=str(dst_dir))
    return dst_dir / "permuted.hea"


def test_predict_on_real_records(logged: dict, mlflow_db: str, shared_data: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    name = _name()
    version = reg.register(logged["model_uri"], name, reg.scorer_version_tags(scorer_metadata(logged["scorer"])),
                           uri=mlflow_db)
    reg.set_alias(name, version, uri=mlflow_db)
    wf = shared_data / "ecg" / "wfdb"
    hr, ptb = wf / "HR06000.hea", wf / "s0010_re.hea"  # 500 Hz; 1000 Hz with 15 lower-case signals
    shutil.copy(hr, tmp_path / "broken.hea")
    (tmp_path / "broken.mat").write_bytes((wf / "HR06000.mat").read_bytes()[:2000])  # truncated signal
    (tmp_path / "broken.hea").write_text(hr.read_text().replace("HR06000", "broken"))
    broken = tmp_path / "broken.hea"
    args = ["predict", "--model", f"models:/{name}@champion", "--set", f"tracking.uri={mlflow_db}", "--"]

    assert main([*args[:-3], "--json", *args[-3:], str(hr), str(ptb), str(broken)]) == 1  # one record failed
    rows = json.loads(capsys.readouterr().out)
    assert [r["record"] for r in rows] == [str(hr), str(ptb), str(broken)]
    for r in rows[:2]:
        assert r["error"] is None and 0.0 <= r["probability"] <= 1.0
    assert rows[2]["probability"] is None and rows[2]["reason"] == "ecg_truncated"
    assert "broken.mat" in rows[2]["error"]
    assert main([*args, str(broken)]) == 1
    assert "ERROR ecg_truncated" in capsys.readouterr().out

    # the same record with its leads in another order scores identically (leads are picked by name)
    scorer = load_champion(f"models:/{name}@champion", uri=mlflow_db)
    permuted = _write_permuted_copy(hr, tmp_path)
    same = predict_records(scorer, [hr, permuted])
    assert same[0]["probability"] == pytest.approx(same[1]["probability"], abs=1e-6)
    # the model input follows the contract: 12 x 1500, finite, each lead group z-scored
    x = prepare_record(ptb, preprocessing_for(scorer))
    assert x.shape == (12, N_SAMPLES) and np.isfinite(x).all()
    for lo, hi in ((0, 3), (3, 6), (6, 12)):
        assert abs(float(x[lo:hi].mean())) < 1e-4 and float(x[lo:hi].std()) == pytest.approx(1.0, abs=1e-3)
    # the scorer's contract carries the baseline settings (a different ALS setting changes the input)
    prep = preprocessing_for(scorer)
    assert prep.contract == scorer.encoder.contract and prep.contract.kind == "project"
    other = replace(prep, contract=replace(prep.contract, als_iter=0))
    assert not np.allclose(prepare_record(ptb, other), x, atol=1e-3)


def test_ui_dry_run(mlflow_db: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["ui", "--dry-run", "--port", "5055", "--set", f"tracking.uri={mlflow_db}"]) == 0
    cmd = capsys.readouterr().out.split()
    db_dir = Path(mlflow_db[len("sqlite:///"):]).parent
    assert cmd[cmd.index("--backend-store-uri") + 1] == mlflow_db
    assert cmd[cmd.index("--default-artifact-root") + 1] == (db_dir / "mlartifacts").as_uri()
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and cmd[cmd.index("--port") + 1] == "5055"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ui_serves_the_registry_and_stops(logged: dict, mlflow_db: str) -> None:
    name = _name()
    reg.set_alias(name, reg.register(logged["model_uri"], name, {}, uri=mlflow_db), uri=mlflow_db)
    port = _free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_db}
    proc = subprocess.Popen([sys.executable, "-m", "stence.cli", "ui", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, ok = time.time() + 120, False
        while time.time() < deadline and proc.poll() is None and not ok:
            try:
                ok = urllib.request.urlopen(f"{base}/health", timeout=2).status == 200
            except OSError:
                time.sleep(1)
        assert ok, f"server did not come up (rc {proc.poll()})"
        q = f"{base}/api/2.0/mlflow/registered-models/alias?name={name}&alias=champion"
        assert json.loads(urllib.request.urlopen(q, timeout=10).read())["model_version"]["version"] == "1"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert f"MLflow UI: {base}" in out
    with pytest.raises(OSError):  # the server's process group is gone with it
        urllib.request.urlopen(f"{base}/health", timeout=2)
