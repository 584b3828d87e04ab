"""Ingest as a hospital export meets it: identifiers in folder and file names and in many header fields,
outputs that must not be destroyed, files of every kind under RAW, crafted files that ask for too much,
a dying worker, a full disk. Real files and the real `stence ingest` command throughout."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset

from stence.cli import main as cli
from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.ingest import NothingUsableError, ingest
from stence.data.synth import SynthConfig, write_cohort
from tests.ingest_helpers import quarantine_with_paths, site_map

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base_export(tmp_path_factory) -> Path:
    """A clean synthetic export (8 patients, 2 ECGs and 2 views each), copied by each test that changes it."""
    raw = tmp_path_factory.mktemp("base") / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=8, seed=5))
    return raw


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` (folders too) with the hash of its contents: equal snapshots = untouched."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _dicoms(raw: Path) -> list[Path]:
    return sorted((raw / "angio").rglob("*.dcm"))


def _edit_dicom(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.save_as(path)


def _rename_record(raw: Path, rec: str, folder: str, name: str, comments: str = "") -> None:
    """Move WFDB record `rec` (e.g. ecg/E000000) to ecg/<folder>/<name>, header and index updated."""
    old = Path(rec).name
    dest = raw / "ecg" / folder
    dest.mkdir(parents=True, exist_ok=True)
    hea = raw / f"{rec}.hea"
    (dest / f"{name}.hea").write_text(hea.read_text().replace(old, name) + comments)
    hea.unlink()
    for f in (raw / "ecg").glob(f"{old}.*"):
        f.rename(dest / f"{name}{f.suffix}")
    idx = pd.read_csv(raw / "ecg_index.csv", dtype=str)
    idx.loc[idx["record"] == rec, "record"] = f"ecg/{folder}/{name}"
    idx.to_csv(raw / "ecg_index.csv", index=False)


# ---- identifiers in names and headers ------------------------------------------------------------------

HOSPITAL_VALUES = ["4471029", "MRN-4471029", "20230510", "E000000_20230510", "ACC-20231234_MRN4471029",
                   "IMG_20230510_1", "OTH-5566778", "ACC20231234", "St Elsewhere Hospital", "Hibbert", "Julius",
                   "PRIVATE-ID-99812", "SPS-99123", "Riviera", "Anna", "Springfield General", "Nurse^Bailey"]


@pytest.fixture(scope="module")
def hospital_export(base_export, tmp_path_factory):
    """The base export laid out as a hospital names things: an MRN folder, dates and accession numbers in
    names, identifiers in many DICOM elements (nested and private too) and WFDB comments; one patient
    called "Field"."""
    raw = _copy(base_export, tmp_path_factory.mktemp("hosp") / "raw")
    _rename_record(raw, "ecg/E000000", "MRN-4471029", "E000000_20230510",
                   "# Physician: Hibbert^Julius\n# Hospital: Springfield General\n# MRN: 4471029\n")
    study = sorted(p for p in (raw / "angio").iterdir())[0]
    renamed = raw / "angio" / "ACC-20231234_MRN4471029"
    study.rename(renamed)
    for i, f in enumerate(sorted(renamed.glob("*.dcm")), start=1):
        f.rename(renamed / f"IMG_20230510_{i}.dcm")
    for f in _dicoms(raw):
        ds = pydicom.dcmread(f)
        ds.OtherPatientIDs = "OTH-5566778"
        ds.AccessionNumber = "ACC20231234"
        ds.InstitutionName = "St Elsewhere Hospital"
        ds.ReferringPhysicianName = "Hibbert^Julius"
        ds.ImageComments = "reviewed by Hibbert^Julius"
        block = ds.private_block(0x0009, "ACME HOSPITAL", create=True)
        block.add_new(0x01, "LO", "PRIVATE-ID-99812")
        item = Dataset()
        item.ScheduledProcedureStepID = "SPS-99123"
        item.PersonName = "Riviera^Nick"
        ds.RequestAttributesSequence = [item]
        ds.save_as(f)
    field_patient = sorted((raw / "angio").iterdir())[1]
    for f in field_patient.glob("*.dcm"):
        _edit_dicom(f, PatientName="Field^Anna", OperatorsName="Nurse^Bailey")
    out = raw.parent / "cohort"
    assert cli(["ingest", str(raw), "--out", str(out), "--processes", "2"]) == 0
    return raw, out


def test_no_identifier_from_names_or_headers_reaches_the_cohort(hospital_export):
    raw, out = hospital_export
    for f in out.rglob("*"):
        if not f.is_file():
            continue
        blob = f.read_bytes().lower()
        if f.suffix == ".parquet":
            blob += pd.read_parquet(f).to_csv().encode().lower()
        leaked = [v for v in HOSPITAL_VALUES if v.lower().encode() in blob]
        assert not leaked, f"{leaked} found in {f.relative_to(out)}"
    c = Cohort.open(out)
    assert "source" not in c.ecgs.columns and "source" not in c.views.columns
    assert set(c.quarantine.columns) == {"file", "reason", "detail"}
    # the renamed record and study are in the cohort, under pseudonyms
    m = site_map(out).set_index("path")
    assert m.loc["ecg/MRN-4471029/E000000_20230510.hea", "status"] == "used"
    assert m.loc["ecg/MRN-4471029/E000000_20230510.hea", "file"] in set(c.ecgs["file"])
    assert m.loc["angio/ACC-20231234_MRN4471029/IMG_20230510_1.dcm", "status"] == "used"


def test_the_scan_knew_the_values_it_looked_for(hospital_export):
    """The leak scan's needles include header elements beyond name and ID, private tags and path parts."""
    raw, out = hospital_export
    deid = json.loads((out / "deid_report.json").read_text())
    kinds = set(deid["identifier_kinds_found"])
    assert "file or folder name" in kinds and "ecg_index:patient_id" in kinds
    assert any(k.startswith("xa:") and "accession" in k.lower() for k in kinds), kinds
    assert any(k.startswith("xa:") and "0009" in k for k in kinds), kinds  # the private tag
    assert any(k.startswith("ecg:") and "physician" in k.lower() for k in kinds), kinds


def test_site_map_finds_every_quarantined_and_used_file(hospital_export):
    raw, out = hospital_export
    m = site_map(out)
    files = {str(p.relative_to(raw)) for p in raw.rglob("*") if p.is_file()}
    assert files == set(m["path"]), "every file under RAW is in the site-side map"
    q = quarantine_with_paths(out)
    assert q["path"].notna().all()
    assert not (out / "paths_by_pseudonym.csv").exists() and not list(out.rglob("*.csv"))


# ---- outputs are never destroyed ------------------------------------------------------------------------

def test_out_refusals_leave_every_folder_byte_identical(base_export, tmp_path, capsys):
    raw = _copy(base_export, tmp_path / "raw")
    unrelated = tmp_path / "thesis"
    unrelated.mkdir()
    (unrelated / "chapter1.tex").write_text("precious")
    before_raw, before_unrelated = snapshot(raw), snapshot(unrelated)
    for out in (unrelated, raw, raw / "ecg" / "cohort", tmp_path):
        assert cli(["ingest", str(raw), "--out", str(out), "--processes", "1"]) != 0
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "stence ingest:" in err, err
    assert snapshot(raw) == before_raw and snapshot(unrelated) == before_unrelated
    assert not (raw / "ecg" / "cohort").exists()

    cohort = tmp_path / "cohort"
    assert cli(["ingest", str(raw), "--out", str(cohort), "--processes", "1"]) == 0
    first = snapshot(cohort)
    assert cli(["ingest", str(raw), "--out", str(cohort), "--processes", "1"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert snapshot(cohort) == first
    assert cli(["ingest", str(raw), "--out", str(cohort), "--processes", "1", "--overwrite"]) == 0
    assert Cohort.open(cohort).fingerprint == json.loads(first and (cohort / "cohort.json").read_text())["fingerprint"]
    assert not cohort.with_name("cohort.old").exists() and not cohort.with_name("cohort.partial").exists()


def test_an_ingest_that_pairs_nothing_never_touches_the_existing_cohort(base_export, tmp_path):
    raw = _copy(base_export, tmp_path / "raw")
    cohort = tmp_path / "cohort"
    ingest(raw, cohort, Config(), processes=1)
    before = snapshot(cohort)
    (raw / "annotations.csv").write_text("study_uid,segment,stenosis\n9.9.9,1,50\n")  # pairs nothing
    with pytest.raises(NothingUsableError, match="nothing was written"):
        ingest(raw, cohort, Config(), processes=1, overwrite=True)
    assert snapshot(cohort) == before
    q = pd.read_parquet(cohort.with_name("cohort.partial") / "quarantine.parquet")
    assert (q["reason"] == "study_no_annotations").sum() == len(_dicoms(raw))


def test_tables_are_validated_before_any_decoding(base_export, tmp_path, capsys):
    raw = _copy(base_export, tmp_path / "raw")
    (raw / "annotations.csv").unlink()
    assert cli(["ingest", str(raw), "--out", str(tmp_path / "c"), "--processes", "1"]) == 1
    assert "annotations.csv not found" in capsys.readouterr().err
    assert not (tmp_path / "c.partial").exists()  # refused before a single file was decoded
    raw2 = _copy(base_export, tmp_path / "raw2")
    (raw2 / "ecg_index.csv").write_text("record;patient\nx;y\n")
    assert cli(["ingest", str(raw2), "--out", str(tmp_path / "c2"), "--processes", "1"]) == 1
    err = capsys.readouterr().err
    assert "ecg_index.csv" in err and "missing column" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c2.partial").exists()
