"""Hospital ECG exports through ingest: GE MUSE, Philips, HL7 aECG and DICOM ECG beside WFDB.

A mixed-vendor synthetic export must give the cohort of its WFDB twin (same pairs, splits and targets, the same
signals within each format's quantisation); the real vendor samples are read (their patients have no
angiogram here, so they end `ecg_unpaired`, never unsupported or silent) and none of their identifiers
reaches the cohort; hostile or broken XML is quarantined with its reason.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from stence.config import Config
from stence.data.cohort_io import Cohort
from stence.data.ecg_formats import read_ecg_file
from stence.data.ingest import ingest
from stence.data.pseudonym import Pseudonymizer
from stence.data.synth import SynthConfig, write_cohort
from tests.ingest_helpers import quarantine_with_paths, site_map

VENDOR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ecg_vendor"
QUANTUM_MV = {"wfdb": 0.0, "muse": 0.00488, "hl7": 0.0025, "dicom": 0.0}  # one step of each format
LIMB_DERIVED = (2, 3, 4, 5)  # III, aVR, aVL, aVF: MUSE stores I, II, V1-V6 only
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
<!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">]>
<RestingECG><PatientDemographics><PatientID>&lol9;</PatientID></PatientDemographics></RestingECG>
"""


def _real_samples() -> list[Path]:
    import pydicom.data

    if not VENDOR.is_dir():
        pytest.skip(f"vendor samples not found at {VENDOR} (a fresh clone has no ../shared)")
    return sorted(VENDOR.iterdir()) + [Path(pydicom.data.get_testdata_file("waveform_ecg.dcm"))]


def _salt() -> Pseudonymizer:
    return Pseudonymizer(os.environ["STENCE_SALT"])


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("vendor")
    synth = SynthConfig.preset("tiny", patients=12, seed=4)
    write_cohort(root / "wfdb", synth)
    write_cohort(root / "mixed", SynthConfig(**{**synth.__dict__, "ecg_format": "mixed"}))
    cohorts = {}
    for name in ("wfdb", "mixed"):
        cohorts[name] = root / f"{name}-cohort"
        ingest(root / name, cohorts[name], Config(), processes=2)
    return root, cohorts


def _by_patient_date(c: Cohort) -> pd.DataFrame:
    cols = ["patient", "study_id", "split", "max_stenosis"] + [k for k in c.manifest if k.startswith("t_")]
    return c.manifest[cols].sort_values(cols).reset_index(drop=True)


def test_mixed_vendor_export_gives_the_cohort_of_its_wfdb_twin(exports):
    root, cohorts = exports
    truth = json.loads((root / "mixed" / "synth_truth.json").read_text())
    formats = {e["format"] for p in truth["patients"] for e in p["ecgs"]}
    assert formats == {"wfdb", "muse", "hl7", "dicom"}
    wfdb, mixed = Cohort.open(cohorts["wfdb"]), Cohort.open(cohorts["mixed"])
    assert len(mixed.manifest) == len(wfdb.manifest) > 0
    pd.testing.assert_frame_equal(_by_patient_date(mixed), _by_patient_date(wfdb))
    q = quarantine_with_paths(cohorts["mixed"])
    assert not (q["reason"] == "ecg_unsupported_format").any()


def test_each_vendor_format_caches_the_same_signal_within_its_quantisation(exports):
    root, cohorts = exports
    truth = json.loads((root / "mixed" / "synth_truth.json").read_text())
    fmt_of = {e["record"]: e["format"] for p in truth["patients"] for e in p["ecgs"]}
    wfdb, mixed = Cohort.open(cohorts["wfdb"]), Cohort.open(cohorts["mixed"])
    paths = site_map(cohorts["mixed"]).set_index("file")["path"]
    seen = set()
    for _, row in mixed.ecgs.iterrows():
        rel = paths[row["file"]]
        fmt = fmt_of[rel.removesuffix(".hea")]
        twin = _salt().pseudonym(rel.split(".")[0], "ecg")  # the WFDB twin's record name has no extension
        got, fs = mixed.ecg_source(row["ecg_id"])
        want, fs_w = wfdb.ecg_source(twin)
        assert fs == fs_w and got.shape == want.shape
        stored = [k for k in range(12) if not (fmt == "muse" and k in LIMB_DERIVED)]
        np.testing.assert_allclose(got[stored], want[stored], rtol=0, atol=QUANTUM_MV[fmt] / 2 + 1e-6)
        if fmt == "muse":  # the limb leads MUSE does not store are derived from I and II (Einthoven, Goldberger)
            lead_i, lead_ii = got[0], got[1]
            np.testing.assert_allclose(got[2], lead_ii - lead_i, atol=1e-5)
            np.testing.assert_allclose(got[5], lead_ii - lead_i / 2, atol=1e-5)
        seen.add(fmt)
    assert seen == {"wfdb", "muse", "hl7", "dicom"}


def test_vendor_files_need_no_index_row_and_a_contradicting_row_is_quarantined(exports, tmp_path):
    root, cohorts = exports
    raw = tmp_path / "raw"
    shutil.copytree(root / "mixed", raw)
    (raw / ".stence-output.json").unlink()
    index = pd.read_csv(raw / "ecg_index.csv", dtype=str)
    vendor = index[index["record"].str.contains(r"\.(?:xml|dcm)$")]
    # rows dropped: the file's own patient ID and acquisition date pair it; one row contradicts its file
    liar = vendor.iloc[0]["record"]
    other = index[index["patient_id"] != vendor.iloc[0]["patient_id"]].iloc[0]["patient_id"]
    kept = index[~index["record"].isin(vendor["record"].iloc[1:])].copy()
    kept.loc[kept["record"] == liar, "patient_id"] = other
    kept.to_csv(raw / "ecg_index.csv", index=False)
    out = tmp_path / "cohort"
    ingest(raw, out, Config(), processes=2)
    q = quarantine_with_paths(out).set_index("path")
    assert q.loc[liar, "reason"] == "ecg_index_mismatch"
    assert other not in q.loc[liar, "detail"]
    c = Cohort.open(out)
    assert len(c.manifest) == len(Cohort.open(cohorts["mixed"]).manifest) - 1  # only the contradicted one lost


def test_real_vendor_samples_are_read_and_leave_no_identifier(shared_data, tmp_path):
    samples = _real_samples()
    raw = tmp_path / "raw"
    write_cohort(raw, SynthConfig.preset("tiny", patients=4, seed=2))
    (raw / ".stence-output.json").unlink()
    placed = {}
    for i, f in enumerate(samples):  # folders named like hospital exports: MRN and date in the path
        folder = raw / "ecg" / f"MRN{4711000 + i}_2020-09-23"
        folder.mkdir(parents=True)
        placed[f.name] = shutil.copy(f, folder / f.name)
    (raw / "ecg" / "bomb.xml").write_bytes(BILLION_LAUGHS)
    (raw / "ecg" / "orders.xml").write_text('<?xml version="1.0"?><OrderList><Order id="1"/></OrderList>\n')
    muse = (VENDOR / "MUSE_20200923_093504_79000_example.xml").read_bytes()
    (raw / "ecg" / "cut.xml").write_bytes(muse[: len(muse) // 2])
    out = tmp_path / "cohort"
    report = ingest(raw, out, Config(), processes=2)
    q = quarantine_with_paths(out).set_index("path")
    for name, path in placed.items():  # read, then set aside only because no angiogram of them exists here
        rel = str(Path(path).relative_to(raw))
        assert q.loc[rel, "reason"] == "ecg_unpaired", (name, q.loc[rel].to_dict())
    assert q.loc["ecg/bomb.xml", "reason"] == "ecg_xml_forbidden"
    assert q.loc["ecg/orders.xml", "reason"] == "ecg_unsupported_format"
    assert "OrderList" in q.loc["ecg/orders.xml", "detail"]
    assert q.loc["ecg/cut.xml", "reason"] == "ecg_bad_xml"
    assert report.identifier_hits == 0
    needles = set()
    for f in samples:
        ids = read_ecg_file(f).identifiers
        assert ids.get("patient_id"), f"{f.name}: no patient ID read"
        needles |= {v for k, v in ids.items() if k.split("_")[0] in ("patient", "name", "dob", "physician")
                    and len(v.strip()) >= 5}
    needles |= {f"MRN{4711000 + i}" for i in range(len(samples))}
    assert len(needles) >= 8
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".npy":
            blob = f.read_bytes()
            for needle in needles:
                assert needle.encode() not in blob, f"{needle!r} leaked into {f.relative_to(out)}"
