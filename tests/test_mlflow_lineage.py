"""MLflow lineage on a real SQLite store: the cohort a run reads is a dataset input (digest = fingerprint,
context = split, a source without the cohort's location), wired into the pretraining and stage A drivers;
a registered scorer declares its input `ecg` and output `probability` with a contract-prepared input example
and the input contract in its metadata."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import re
import threading
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from stence.config import Config, apply_overrides, to_dict
from stence.data.cohort_io import Cohort
from stence.data.contract import echoingecg_contract
from stence.models.heads import ClassifierHead
from stence.models.registry import create_ecg_encoder
from stence.models.scorer import load_scorer, save_scorer, scorer_metadata
from stence.pipelines import angio as angio_pipeline
from stence.pipelines import pretrain as pretrain_pipeline
from stence.serving import registry as reg
from stence.serving.pyfunc import INPUT_NAME, scorer_signature
from stence.tracking.client import artifact_location, tracking_client
from stence.tracking.lineage import SOURCE_TYPE, log_cohort_input
from stence.tracking.tags import DATASET_CONTEXT_TAG, INPUT_CONTRACT_TAG
from tests.ray_fixture import shared_mlflow_db

EXPERIMENT = "lineage-test"
# folder names as a user might choose them: a name and an MRN; none may reach MLflow
PARENT_DIR, COHORT_DIR = "Doe_Jane_MRN12345678", "cohort_Smith_John_1987"


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    return shared_mlflow_db(tmp_path_factory)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic cohort ingested under identifying-looking folder names."""
    from stence.data.ingest import ingest
    from stence.data.synth import SynthConfig, write_cohort

    root = tmp_path_factory.mktemp("lineage") / PARENT_DIR
    write_cohort(root / "raw", SynthConfig.preset("tiny", patients=8))
    ingest(root / "raw", root / COHORT_DIR, Config(), processes=2)
    return root / COHORT_DIR


def _new_run(uri: str) -> str:
    client = tracking_client(uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    # artifacts beside the store (never ./mlruns in the working directory)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT, artifact_location=artifact_location(uri, EXPERIMENT))
    return client.create_run(exp_id, run_name=f"lineage-{uuid.uuid4().hex[:6]}").info.run_id


def _inputs(uri: str, run_id: str) -> dict[str, object]:
    """{context: Dataset} of a run's dataset inputs."""
    out = {}
    for di in tracking_client(uri).get_run(run_id).inputs.dataset_inputs:
        (context,) = [t.value for t in di.tags if t.key == DATASET_CONTEXT_TAG]
        out[context] = di.dataset
    return out


def _assert_anonymous(dataset: object, cohort: Path) -> None:
    """Nothing of the cohort's location in what MLflow stores: no path, no folder name, no number but the digest."""
    text = json.dumps([dataset.name, dataset.source, dataset.profile])
    where = json.loads(dataset.source)["uri"]
    assert where.startswith("cohort://") and "/" not in where[len("cohort://"):]  # no path, no file:// URI
    assert str(cohort) not in text and str(Path.home()) not in text
    for part in cohort.resolve().parts[1:]:  # every folder name on the way, the cohort's own included
        assert part not in text, part
    for word in ("Doe", "Jane", "Smith", "John", "MRN"):
        assert word not in text, word
    assert where == f"cohort://{dataset.digest}" and not re.search(r"\d", dataset.name)  # no number of the user's


# ---------------------------------------------------------------------------------------------------
# A: the cohort as a dataset input


def test_cohort_input_has_fingerprint_context_and_no_location(cohort: Path, mlflow_db: str) -> None:
    run_id = _new_run(mlflow_db)
    assert log_cohort_input(mlflow_db, run_id, cohort, "train")
    assert log_cohort_input(mlflow_db, run_id, str(cohort), "val")
    assert log_cohort_input(mlflow_db, run_id, cohort, "train")  # again (a resumed trial): nothing added
    meta = Cohort.open(cohort).meta
    fp = Cohort.open(cohort).fingerprint
    got = _inputs(mlflow_db, run_id)
    assert sorted(got) == ["train", "val"]  # one input per context (MLflow keeps one per name and digest)
    for context, ds in got.items():
        assert ds.digest == fp
        assert ds.name == f"cohort-{context}"
        assert ds.source_type == SOURCE_TYPE and json.loads(ds.source) == {"uri": f"cohort://{fp}"}
        profile = json.loads(ds.profile)
        assert profile["pairs"] == meta["pairs_by_split"][context] > 0
        assert profile["patients"] == meta["splits"][context] > 0
        _assert_anonymous(ds, cohort)


def test_tracking_failures_only_warn(cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                     mlflow_db: str) -> None:
    caplog.set_level(logging.WARNING, logger="stence.tracking")
    assert not log_cohort_input("http://127.0.0.1:9", "0" * 32, cohort, "train")  # nothing listens there
    assert "not logged" in caplog.text
    caplog.clear()
    with _failing_server() as (url, requests):  # a store that answers 503: MLflow retries it
        assert not log_cohort_input(url, "0" * 32, cohort, "train")
    assert "not logged" in caplog.text
    assert requests == [1, 1]  # one request, retried once (MLflow's default: 7 retries over minutes)
    caplog.clear()
    not_a_cohort = tmp_path / PARENT_DIR
    not_a_cohort.mkdir()
    assert not log_cohort_input(mlflow_db, _new_run(mlflow_db), not_a_cohort, "test")
    assert "not logged" in caplog.text and PARENT_DIR not in caplog.text  # the warning names no folder
    caplog.clear()
    assert not log_cohort_input(None, None, cohort, "train")  # tracking disabled: nothing, silently
    assert not log_cohort_input(mlflow_db, None, cohort, "train")
    assert caplog.text == ""
    with pytest.raises(ValueError, match="context"):  # a caller's bug is not a tracking problem
        log_cohort_input(mlflow_db, "x", cohort, "")


@contextlib.contextmanager
def _failing_server() -> Iterator[tuple[str, list[int]]]:
    """A local HTTP server that answers every request with 503; yields its URL and a list that gets one
    entry per request."""
    requests: list[int] = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def _answer(self) -> None:
            requests.append(1)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()


class _Stop(Exception):
    """Raised instead of training: the wiring is tested up to `fit`, without a training run."""


def _no_training(*args: object, **kwargs: object) -> None:
    raise _Stop


@pytest.mark.parametrize("stage", ["pretrain", "angio"])
def test_stage_runs_log_their_cohort(stage: str, cohort: Path, mlflow_db: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`run_pretrain` / `run_angio` (single commands, and sweep trials, which hand in their run id) log the
    cohort as train+val before training; the run is real, only `fit` (and feature extraction) is cut."""
    pipeline = pretrain_pipeline if stage == "pretrain" else angio_pipeline
    monkeypatch.setattr(pipeline, "fit", _no_training)
    monkeypatch.setattr(pipeline, "features_dir", lambda cfg: str(tmp_path / "features"))
    cfg = apply_overrides(Config(), {"tracking.uri": mlflow_db, "tracking.experiment": EXPERIMENT,
                                     "data.cohort": str(cohort), "train.storage_path": str(tmp_path / "ray"),
                                     "train.name": f"wiring-{stage}", "train.workers": 0})
    run_fn = pipeline.run_pretrain if stage == "pretrain" else pipeline.run_angio
    with pytest.raises(_Stop):
        run_fn(cfg)  # starts its own run
    client = tracking_client(mlflow_db)
    exp_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    (run,) = client.search_runs([exp_id], f"tags.`stence.stage` = '{stage}' and "
                                          f"attributes.run_name = '{stage}-wiring-{stage}'")
    trial_run = _new_run(mlflow_db)
    with pytest.raises(_Stop):
        run_fn(cfg, run_id=trial_run)  # a sweep trial's child run
    for run_id in (run.info.run_id, trial_run):
        got = _inputs(mlflow_db, run_id)
        assert list(got) == ["train+val"]
        assert got["train+val"].digest == Cohort.open(cohort).fingerprint
        _assert_anonymous(got["train+val"], cohort)


# ---------------------------------------------------------------------------------------------------
# B: the registered scorer's signature, input example and contract


N_SAMPLES = 1500  # 3 s at 500 Hz, the default contract


def test_registered_scorer_declares_signature_example_and_contract(
    mlflow_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = Config()
    cfg = replace(cfg, tracking=replace(cfg.tracking, uri=mlflow_db, experiment=EXPERIMENT))
    torch.manual_seed(0)
    enc = create_ecg_encoder("otis_tiny", fs=500, n_samples=N_SAMPLES)
    head = ClassifierHead(enc.embed_dim, 1)
    torch.nn.init.normal_(head.fc.weight, std=0.5)
    path = tmp_path / "scorer.pt"
    save_scorer(path, enc, head, "0_100", to_dict(cfg), {"auroc": 0.7, "auroc_lo": 0.6, "auroc_hi": 0.8})
    scorer = load_scorer(path)
    run_id = _new_run(mlflow_db)
    name = f"stence-lineage-{uuid.uuid4().hex[:8]}"
    meta = scorer_metadata(path)
    version = reg.register(reg.log_scorer(path, run_id, mlflow_db), name, reg.scorer_version_tags(meta),
                           uri=mlflow_db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    uri = f"models:/{name}/{version}"

    info = mlflow.models.get_model_info(uri)
    (spec,) = info.signature.inputs.inputs
    assert spec.name == INPUT_NAME == "ecg"
    assert spec.type == np.dtype(np.float32) and spec.shape == (-1, 12, N_SAMPLES)
    assert info.signature.outputs.input_names() == ["probability"]
    assert info.signature.params.to_dict()[0]["name"] == "output"
    contract = scorer.input_spec["contract"]
    assert info.metadata["input_spec"]["contract"] == contract and info.metadata["task"] == "0_100"
    assert info.metadata["input_spec"]["leads"] == list(scorer.input_spec["leads"])  # the model's lead order

    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.metadata == info.metadata
    version_tags = tracking_client(mlflow_db).get_model_version(name, version).tags
    assert json.loads(version_tags[INPUT_CONTRACT_TAG]) == info.metadata["input_spec"]  # one source, one JSON

    example = model.input_example[INPUT_NAME]
    assert example.shape == (1, 12, N_SAMPLES) and example.dtype == np.float32
    assert np.abs(example).max() > 0.5 and np.isfinite(example).all()  # a real signal, not zeros
    # prepared by the contract: clipped and z-scored per lead group [I-III], [aVR-aVF], [V1-V6]
    for group in (slice(0, 3), slice(3, 6), slice(6, 12)):
        assert abs(float(example[0, group].mean())) < 1e-3 and abs(float(example[0, group].std()) - 1) < 1e-2
    np.testing.assert_allclose(example, reg.example_input(scorer.input_spec), rtol=1e-6)
    with torch.inference_mode():
        ref = scorer(torch.from_numpy(example))["probability"].numpy()[:, 0]
    np.testing.assert_allclose(model.predict(example)["probability"].to_numpy(), ref, rtol=1e-6)
    np.testing.assert_allclose(model.predict({"ecg": example})["probability"].to_numpy(), ref, rtol=1e-6)


def test_signature_and_example_follow_the_contract() -> None:
    """A multi-label head has one probability column per task; another contract (EchoingECG: 100 Hz, 10 s)
    gives its own shape; examples differ by seed and are never constant."""
    c = echoingecg_contract()
    spec = {"fs": c.fs, "n_samples": c.n_samples, "leads": list(c.leads), "lead_order": "standard",
            "contract": c.to_dict()}
    sig = scorer_signature(spec, n_out=3)
    assert sig.inputs.inputs[0].shape == (-1, 12, 1000)
    assert sig.outputs.input_names() == ["probability_0", "probability_1", "probability_2"]
    x = reg.example_input(spec, n=2, seed=1)
    assert x.shape == (2, 12, 1000) and x.dtype == np.float32
    assert not np.allclose(x[0], x[1]) and (x.std(axis=-1) > 0).all()
