"""Ingest of the real sample files (../shared/data) laid out as a hospital export.

No public source pairs an ECG with an angiogram of the same patient: this test pairs unrelated real
records ON PURPOSE (through ecg_index.csv) to exercise real decoding, pairing and pseudonymisation.
"""

import shutil

import pandas as pd
import pytest

from stence.config import Config, apply_overrides
from stence.data.cohort_io import Cohort
from stence.data.ingest import ingest
from tests.ingest_helpers import quarantine_with_paths, site_map

PHANTOM_ID, XA1_ID = "000000000000000", "20XA1"
IDENTIFIERS = [PHANTOM_ID, "fantom^as", "fantom", XA1_ID, "CompressedSamples^XA1", "CompressedSamples"]


@pytest.fixture(scope="module")
def real_cohort(shared_data, tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw")
    (raw / "ecg").mkdir()
    for f in (shared_data / "ecg" / "wfdb").iterdir():
        shutil.copy(f, raw / "ecg" / f.name)
    dcm = shared_data / "angio" / "dicom"
    layout = {"a": ["phantom_IM8.dcm"], "b": ["XA1_UNC.dcm", "XA1_JPLL.dcm"], "c": ["XA1_RLE.dcm"],
              "d": ["XA-MONO2-8-12x-catheter.dcm"]}
    for folder, files in layout.items():
        (raw / "angio" / folder).mkdir(parents=True)
        for f in files:
            shutil.copy(dcm / f, raw / "angio" / folder / f)
    pd.DataFrame(
        [("ecg/HR06000", PHANTOM_ID, "2014-10-01"), ("ecg/HR06001", PHANTOM_ID, "2014-10-20"),
         ("ecg/HR06002", XA1_ID, "2004-08-20"), ("ecg/HR06003", XA1_ID, "2004-09-01"),
         ("ecg/s0010_re", XA1_ID, "2003-12-10"), ("ecg/HR06004", XA1_ID, "2010-01-01")],
        columns=["record", "patient_id", "acquisition_date"],
    ).to_csv(raw / "ecg_index.csv", index=False)
    studies = {
        "phantom": "1.2.840.113619.2.269.53248654815094251807.1412661850.12292.11",
        "xa1": "1.3.6.1.4.1.5962.1.2.20.20040826185059.5457",
        "rle": "1.3.6.1.4.1.5962.1.2.20.20031208063649.855",
    }
    rows = [(studies["phantom"], 1, 90), (studies["xa1"], 6, 100), (studies["rle"], 2, 0), (studies["rle"], 3, 140)]
    pd.DataFrame(rows, columns=["study_uid", "segment", "stenosis"]).to_csv(raw / "annotations.csv", index=False)
    cfg = apply_overrides(Config(), ["data.split_fractions=[0.5, 0.5, 0.0]"])
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    report = ingest(raw, out, cfg, processes=1)
    return raw, out, report


def test_real_files_pair_and_decode(real_cohort):
    raw, out, report = real_cohort
    c = Cohort.open(out)
    assert report.n_pairs == 5 and report.n_patients == 2 and report.n_views == 4
    assert c.ecg_cache.shape[0] == 12
    ecgs = c.ecgs.assign(path=c.ecgs["file"].map(site_map(out).set_index("file")["path"])).set_index("path")
    assert set(ecgs["fs_orig"]) == {500.0, 1000.0}
    # s0010_re: 38.4 s at 1000 Hz -> 500 Hz
    assert ecgs.loc["ecg/s0010_re.hea", "n_samples"] == 19200
    assert ecgs.loc["ecg/HR06000.hea", "n_samples"] == 5000
    q = quarantine_with_paths(out).set_index("path")
    assert q.loc["ecg/HR06004.hea", "reason"] == "ecg_unpaired"
    assert q.loc["angio/d/XA-MONO2-8-12x-catheter.dcm", "reason"] == "dicom_no_patient"
    assert (c.quarantine["reason"] == "annotation_invalid").sum() == 1  # degree 140
    assert c.frame_cache.shape[1:] == (1, 64, 64)
    # targets: phantom study seg1 90 % -> patient/RCA/seg1 severe
    st = c.studies.set_index("n_views")
    assert c.studies["max_stenosis"].max() == 100
    assert st.loc[1].shape[0] >= 1
    assert set(c.manifest["split"]) <= {"train", "val"}


def test_no_identifier_in_any_output(real_cohort):
    raw, out, report = real_cohort
    assert report.identifier_hits == 0
    for f in out.rglob("*"):
        if f.is_file() and f.suffix != ".npy":
            blob = f.read_bytes()
            for ident in IDENTIFIERS:
                assert ident.encode() not in blob, f"{ident} leaked into {f}"
    deid = (out / "deid_report.json").read_text()
    assert '"hits": 0' in deid and "xa:patient_name" in deid.replace("'", '"')
