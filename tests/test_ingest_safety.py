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


# ---- every file accounted for; crafted files quarantined in bounded memory --------------------------------

def _signal_lines(name: str, n: int) -> str:
    leads = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    return "".join(f"{name}.dat 16 200/mV 16 0 0 0 0 {leads[i % 12]}\n" for i in range(n))


def _crafted_export(base: Path, root: Path) -> tuple[Path, dict[str, str]]:
    """The base export plus one crafted or unexpected file per problem; returns (raw, path -> expected reason)."""
    raw = _copy(base, root / "raw")
    ecg, angio = raw / "ecg", raw / "angio"
    expect: dict[str, str] = {}
    (ecg / "bad_fs.hea").write_text("bad_fs 12 0.01 100\n" + _signal_lines("bad_fs", 12))  # asks for 22 GiB
    (ecg / "bad_fs.dat").write_bytes(b"\0" * 2400)
    expect["ecg/bad_fs.hea"] = "ecg_bad_header"
    (ecg / "fs_1e9.hea").write_text("fs_1e9 12 1e9 5000\n" + _signal_lines("fs_1e9", 12))  # wfdb reads 1 Hz
    expect["ecg/fs_1e9.hea"] = "ecg_bad_header"
    with open(ecg / "ten_hours.hea", "w") as fh:  # 10 h at 500 Hz, a sparse 432 MB signal file
        fh.write("ten_hours 12 500 18000000\n" + _signal_lines("ten_hours", 12))
    with open(ecg / "ten_hours.dat", "wb") as fh:
        fh.truncate(12 * 2 * 18_000_000)
    expect["ecg/ten_hours.hea"] = "file_over_limit"
    with open(ecg / "million.hea", "w") as fh:  # a 30 MB header with 10^6 signals
        fh.write("million 1000000 500 5000\n")
        fh.write(_signal_lines("million", 12) * (1_000_000 // 12))
    expect["ecg/million.hea"] = "file_over_limit"
    shutil.copy(pydicom.data.get_testdata_file("waveform_ecg.dcm"), ecg / "waveform.dcm")
    expect["ecg/waveform.dcm"] = "ecg_unpaired"  # read as a DICOM ECG; its patient has no angiogram here
    (ecg / "notes.txt").write_text("nothing to see")
    expect["ecg/notes.txt"] = "unrecognised_file"
    (raw / "export_log.pdf").write_bytes(b"%PDF-1.4")
    expect["export_log.pdf"] = "unrecognised_file"
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret.hea").write_text("x")
    os.symlink(outside / "secret.hea", ecg / "linked.hea")
    os.symlink(outside, angio / "linked_study")
    expect["ecg/linked.hea"] = expect["angio/linked_study"] = "symlink_outside_export"

    views = _dicoms(raw)
    ds = pydicom.dcmread(views[0])  # a cine claiming 5000 frames of 2048 x 2048 (42 GB decoded)
    ds.NumberOfFrames, ds.Rows, ds.Columns = 5000, 2048, 2048
    (angio / "huge").mkdir()
    ds.save_as(angio / "huge" / "cine.dcm")
    expect["angio/huge/cine.dcm"] = "file_over_limit"
    ds = pydicom.dcmread(views[1])
    ds.NumberOfFrames = 0
    (angio / "zero").mkdir()
    ds.save_as(angio / "zero" / "cine.dcm")
    expect["angio/zero/cine.dcm"] = "dicom_bad_frame_count"
    burned = views[2]
    _edit_dicom(burned, BurnedInAnnotation="YES")
    expect[str(burned.relative_to(raw))] = "dicom_burned_in"

    idx = pd.read_csv(raw / "ecg_index.csv", dtype=str)
    recs = list(idx["record"])
    idx.loc[idx["record"] == recs[2], "acquisition_date"] = "09/02/2022"  # day or month first: ambiguous
    idx.loc[idx["record"] == recs[3], "acquisition_date"] = "23.03.2021"
    iso = idx.loc[idx["record"] == recs[4], "acquisition_date"].iloc[0]
    idx.loc[idx["record"] == recs[4], "acquisition_date"] = f"{iso}T13:33:00"  # an ISO datetime is fine
    idx.loc[idx["record"] == recs[5], "patient_id"] = "Müller-778812"  # Latin-1 below; no study: unpaired
    idx.loc[len(idx)] = ["ecg/not_there", "1234567", "2020-01-01"]
    (raw / "ecg_index.csv").write_bytes(idx.to_csv(index=False).encode("latin-1"))
    expect[recs[2] + ".hea"] = expect[recs[3] + ".hea"] = "ecg_index_invalid"
    expect[recs[5] + ".hea"] = "ecg_unpaired"
    hea = raw / f"{recs[6]}.hea"
    hea.write_text(hea.read_text().replace("# Age:", "# Age: 95\n# Old age:"))
    with open(raw / "annotations.csv", "a") as fh:
        fh.write(",3,50\n")
    return raw, expect


def test_crafted_and_unexpected_files_are_quarantined_in_bounded_memory(base_export, tmp_path):
    """One ingest of an export full of crafted files, through the real command, in a process whose data
    segment is capped at 1.5 GiB (decode workers inherit the cap): each file gets its own reason, the
    rest of the batch is ingested."""
    raw, expect = _crafted_export(base_export, tmp_path)
    out = tmp_path / "cohort"
    cap = 3 << 29
    code = (f"import resource, sys; resource.setrlimit(resource.RLIMIT_DATA, ({cap}, {cap})); "
            "from stence.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "ingest", str(raw), "--out", str(out), "--processes", "2"],
                          capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    q = quarantine_with_paths(out)
    by_path = dict(zip(q["path"], q["reason"], strict=True))
    for path, reason in expect.items():
        assert by_path.get(path) == reason, f"{path}: expected {reason}, got {by_path.get(path)}"
    table_rows = q[q["file"].str.startswith(("ecg_index.csv:", "annotations.csv:"))]
    assert {"ecg_index_invalid", "ecg_index_missing_file"} <= set(table_rows["reason"])
    assert "annotation_no_study_uid" in set(table_rows["reason"])
    c = Cohort.open(out)
    assert c.ecgs["age"].max() == 90  # Safe Harbor: 95 is written as 90 (90 or older)
    assert len(c.manifest) >= 8 and "unexpected_error" not in set(q["reason"])
    iso_rec = site_map(out).set_index("path").loc[
        pd.read_csv(raw / "ecg_index.csv", encoding="latin-1")["record"].iloc[4] + ".hea"]
    assert iso_rec["status"] == "used"


# ---- failures that must not hang or half-write ------------------------------------------------------------

def test_a_dying_decode_worker_fails_its_file_and_the_batch_goes_on():
    from stence.data.pool import run_jobs
    from tests.pool_jobs import kill_on_three

    out = run_jobs(kill_on_three, list(range(8)), 2, "test", on_death=lambda j: {"died": j}, progress=False)
    assert out == [{"x": i} if i != 3 else {"died": 3} for i in range(8)]


def _can_mount_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs a private mount namespace to fill a small tmpfs")
def test_a_full_disk_ends_with_one_line_and_leaves_the_earlier_cohort_intact(base_export, tmp_path):
    raw = _copy(base_export, tmp_path / "raw")
    cohort = tmp_path / "cohort"
    ingest(raw, cohort, Config(), processes=1)
    size_kb = sum(p.stat().st_size for p in cohort.rglob("*") if p.is_file()) // 1024 + 1500
    disk = tmp_path / "disk"
    disk.mkdir()
    script = f"""
set -e
mount -t tmpfs -o size={size_kb}k tmpfs {disk}
cp -a {cohort} {disk}/cohort
(cd {disk}/cohort && find . -type f | sort | xargs sha256sum) > {tmp_path}/before.txt
set +e
{sys.executable} -m stence.cli ingest {raw} --out {disk}/cohort --overwrite --processes 1 2> {tmp_path}/err.txt
echo $? > {tmp_path}/rc.txt
(cd {disk}/cohort && find . -type f | sort | xargs sha256sum) > {tmp_path}/after.txt
"""
    proc = subprocess.run(["unshare", "-m", "bash", "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rc.txt").read_text().strip() == "1"
    err = (tmp_path / "err.txt").read_text()
    last = [line for line in err.splitlines() if line.startswith("stence ingest:")]
    assert len(last) == 1 and "disk full" in last[0] and "Traceback" not in err, err[-2000:]
    assert (tmp_path / "before.txt").read_text() == (tmp_path / "after.txt").read_text()


class _PoolBrokenAtSubmit:
    """A stand-in for ProcessPoolExecutor that runs jobs in-process and, at its n-th submit, says the pool broke
    (a worker died between the last wait and this submit): the race real pools show on a loaded machine."""

    submits = 0

    def __init__(self, processes: int, mp_context=None):  # noqa: ANN001 - the executor's signature
        self.n = processes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, job):  # noqa: ANN001
        from concurrent.futures import Future
        from concurrent.futures.process import BrokenProcessPool

        type(self).submits += 1
        if type(self).submits == 3:
            raise BrokenProcessPool("a worker died")
        fut: Future = Future()
        fut.set_result(fn(job))
        return fut


def test_a_pool_found_broken_at_submit_reruns_its_jobs_and_loses_none(monkeypatch):
    """Deterministic: the pool reports itself broken while a job is being submitted (not through a future);
    the jobs in flight are re-run alone, the rest in a new pool, and every job gets its result once."""
    import stence.data.pool as pool

    monkeypatch.setattr(pool, "ProcessPoolExecutor", _PoolBrokenAtSubmit)
    out = pool.run_jobs(lambda x: {"x": x}, list(range(6)), 2, "test", on_death=lambda j: {"died": j},
                        progress=False)
    assert out == [{"x": i} for i in range(6)]
