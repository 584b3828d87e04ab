"""One ingested cohort serves encoders with different input contracts: per-contract caches made from the
decoded sources, keyed by the contract's deterministic part, built once and read by the datasets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.contract import echoingecg_contract, otis_contract, project_contract
from stence.data.contract_apply import record_part, window_part
from stence.data.contract_cache import contract_signals
from stence.data.datasets import EcgDataset
from stence.data.ingest import ingest
from stence.data.synth import SynthConfig, write_cohort
from stence.data.wfdb_io import read_ecg
from tests.ingest_helpers import site_map


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    raw = tmp_path_factory.mktemp("contracts") / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=8, fs=(250, 500), seed=5))
    out = raw.parent / "cohort"
    ingest(raw, out, Config(), processes=2)
    return Cohort.open(out)


def test_ingest_keeps_the_decoded_source_of_every_ecg(cohort):
    paths = site_map(cohort.root).set_index("file")["path"]
    raw = cohort.root.parent / "raw"
    for _, row in cohort.ecgs.head(4).iterrows():
        src, fs = cohort.ecg_source(row["ecg_id"])
        rec = read_ecg(raw / paths[row["file"]])
        assert fs == rec.fs and src.shape == rec.signal.shape
        np.testing.assert_array_equal(src, rec.signal)


def test_the_ingest_contract_reads_the_ingest_cache_and_others_get_their_own(cohort):
    contracts = cohort.root / "cache" / "contracts"
    same = contract_signals(cohort, project_contract(Config().data))
    assert same.path.name == "ecg.npy" and not contracts.exists()  # nothing recomputed for the ingest contract
    otis = otis_contract(500, 3.0)
    sig = contract_signals(cohort, otis)
    assert sig.path.parent.name == otis.deterministic_key()
    for ecg_id in cohort.ecgs["ecg_id"].head(3):
        src, fs = cohort.ecg_source(ecg_id)
        np.testing.assert_array_equal(sig.signal(ecg_id), record_part(np.asarray(src), fs, otis))
    stamp = (sig.path.stat().st_mtime_ns, sig.path.stat().st_ino)
    # built once: a second reader (another trial, another worker) opens the same files
    again = contract_signals(cohort, otis)
    assert (again.path.stat().st_mtime_ns, again.path.stat().st_ino) == stamp
    # the scaler and the window are per-window steps: contracts differing only there share one cache
    echo = echoingecg_contract()
    scaled = replace(echo, scaler_mean=(0.1,) * 12, scaler_scale=(2.0,) * 12)
    assert contract_signals(cohort, echo).path == contract_signals(cohort, scaled).path
    assert sorted(p.name for p in contracts.iterdir() if not p.name.startswith(".")) == sorted(
        {otis.deterministic_key(), echo.deterministic_key()})


def test_datasets_feed_each_encoder_its_own_contract(cohort):
    cfg = Config().data
    ids = None
    for c in (project_contract(cfg), otis_contract(500, 3.0), echoingecg_contract()):
        ds = EcgDataset(cohort, "train", cfg, "0_100", train=False, contract=c)
        item = ds[0]["ecg"].numpy()
        assert item.shape == (12, c.n_samples)
        src, fs = cohort.ecg_source(ds.rows.iloc[0]["ecg_id"])
        np.testing.assert_allclose(item, window_part(record_part(np.asarray(src), fs, c), c), rtol=0, atol=1e-6)
        ids = ids or list(ds.rows["ecg_id"])
        assert list(ds.rows["ecg_id"]) == ids  # the same ECGs, whatever the contract
    assert np.abs(EcgDataset(cohort, "train", cfg, "0_100", contract=otis_contract(500, 3.0))[0]["ecg"].numpy()).max() <= 3.0
