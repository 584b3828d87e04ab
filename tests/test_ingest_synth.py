"""Ingest of a synthetic export with mixed sampling rates, RLE pixels and 10 % corrupt files, checked
against the generator's answer key (which ingest itself never reads)."""

import json
import os

import numpy as np
import pandas as pd
import pytest

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.ingest import ingest
from stence.data.labels import TARGET_NAMES, targets_from_segments
from stence.data.pseudonym import Pseudonymizer
from stence.data.synth import SynthConfig, write_cohort
from tests.ingest_helpers import quarantine_with_paths, site_map


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    raw = tmp_path_factory.mktemp("synth") / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=24, fs=(250, 500, 1000), compression="rle",
                                          corrupt_fraction=0.1, seed=3))
    truth = json.loads((raw / "synth_truth.json").read_text())
    out = raw.parent / "cohort"
    report = ingest(raw, out, Config(), processes=2)
    return raw, out, truth, report


def test_every_corrupt_file_quarantined_with_its_reason(built):
    raw, out, truth, report = built
    q = quarantine_with_paths(out)
    assert q["path"].notna().all(), "every quarantine row is found in the site-side map"
    explained = set()
    for c in truth["corrupt"]:
        stem = c["path"].rsplit(".", 1)[0] if c["kind"] != "study_no_annotations" else c["path"] + "/"
        rows = q[(q["path"] == c["path"]) | q["path"].str.startswith(stem)]
        assert c["kind"] in set(rows["reason"]), f"{c['path']}: expected {c['kind']}, got {list(rows['reason'])}"
        explained |= set(rows[rows["reason"] == c["kind"]].index)
    assert explained == set(q.index), q.drop(index=list(explained)).to_string()  # nothing quarantined by mistake
    assert all(q["detail"].str.len() > 0)


def test_no_good_record_lost_and_pairs_targets_right(built):
    raw, out, truth, report = built
    c = Cohort.open(out)
    pseudo = Pseudonymizer(os.environ["STENCE_SALT"])
    good_ecgs = {e["record"] for p in truth["patients"] for e in p["ecgs"]}
    paths = site_map(out).set_index("file")["path"]
    assert set(c.ecgs["file"].map(paths).str.removesuffix(".hea")) == good_ecgs
    assert set(c.ecgs["fs_orig"]) == {250.0, 500.0, 1000.0}
    assert (c.ecgs["n_samples"] == 5000).all()  # 10 s at the model's 500 Hz whatever the source rate
    m = c.manifest.set_index("ecg_id")
    for p in truth["patients"]:
        (study,) = p["studies"]
        t = targets_from_segments({int(k): v for k, v in study["segments"].items()})
        for e in p["ecgs"]:
            row = m.loc[pseudo.pseudonym(e["record"], "ecg")]
            assert row["patient"] == pseudo.pseudonym(p["patient_id"], "patient")
            assert row["max_stenosis"] == p["max_degree"]
            np.testing.assert_array_equal(row[[f"t_{n}" for n in TARGET_NAMES]].to_numpy(float), t)
            assert row["n_views"] == len(study["views"])
    assert report.n_pairs == len(good_ecgs)


def test_splits_by_patient_and_both_classes(built):
    raw, out, truth, report = built
    m = Cohort.open(out).manifest
    assert (m.groupby("patient")["split"].nunique() == 1).all()
    assert set(m["split"]) == {"train", "val", "test"}
    for split in ("train", "val", "test"):
        ms = m[m["split"] == split]["max_stenosis"]
        assert (ms == 0).any() and (ms == 100).any(), f"{split} lacks a class of (=0|=100)"


def test_no_name_or_id_in_any_output(built):
    raw, out, truth, report = built
    needles = [p["patient_id"] for p in truth["patients"]] + [p["name"] for p in truth["patients"]]
    needles += [part for p in truth["patients"] for part in p["name"].split("^") if len(part) >= 4]
    for f in out.rglob("*"):
        if f.is_file():
            blob = f.read_bytes()
            if f.suffix == ".parquet":
                blob += pd.read_parquet(f).to_csv().encode()
            leaked = [n for n in needles if n.encode() in blob]
            assert not leaked, f"{leaked[:3]} found in {f.name}"
    deid = json.loads((out / "deid_report.json").read_text())
    assert deid["hits"] == 0 and deid["identifier_values_scanned"] >= len(truth["patients"])


def test_rerun_redoes_cleanly_and_is_deterministic(built, tmp_path, monkeypatch):
    raw, out, truth, report = built
    again = ingest(raw, out, Config(), processes=1, overwrite=True)
    assert again.fingerprint == report.fingerprint
    assert not out.with_name(out.name + ".partial").exists()
    # a different window pairs fewer ECGs; a different salt gives other pseudonyms
    monkeypatch.setenv("STENCE_SALT", "another-site-secret")
    other = ingest(raw, tmp_path / "c2", Config(), processes=1)
    assert set(Cohort.open(tmp_path / "c2").manifest["patient"]).isdisjoint(Cohort.open(out).manifest["patient"])
    assert other.n_pairs == report.n_pairs


def test_interrupted_ingest_leaves_no_cohort(built, tmp_path, monkeypatch):
    raw, out, truth, report = built
    from stence.data import cohort_io

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated interruption while writing caches")

    monkeypatch.setattr(cohort_io, "write_frame_cache", boom)
    with pytest.raises(KeyboardInterrupt):
        ingest(raw, tmp_path / "c3", Config(), processes=1)
    assert not (tmp_path / "c3").exists()
    with pytest.raises(FileNotFoundError, match="not a complete cohort"):
        Cohort.open(tmp_path / "c3.partial")
    monkeypatch.undo()
    ingest(raw, tmp_path / "c3", Config(), processes=1)  # resumes from the staged per-file results
    assert Cohort.open(tmp_path / "c3").fingerprint == report.fingerprint
