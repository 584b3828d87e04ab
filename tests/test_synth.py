"""The synthetic cohort: formats read back, determinism, the answer key, the planted signal, corrupt files."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import wfdb
from pydicom.pixels import get_decoder

from stence import errors
from stence.cli import main
from stence.config import STANDARD_LEADS, THRESHOLD_TASKS
from stence.data.labels import SEGMENTS, threshold_labels
from stence.data.synth import (
    SynthConfig,
    load_truth,
    make_record,
    plan_patients,
    write_cohort,
    write_record,
    write_record_wfdb,
)
from stence.data.synth_angio import render_view, sample_tree, standard_views, vessel_layers
from stence.data.synth_corrupt import DICOM_KINDS, ECG_KINDS, STUDY_KINDS
from stence.data.synth_dicom import NO_DECODER_SYNTAX, XA_SOP_CLASS
from stence.data.synth_ecg import TERRITORY_LEADS, sample_patient, simulate_ecg, st_levels
from stence.data.synth_echonext import (
    FLAG_COLUMNS,
    METADATA_FILE,
    SPLITS,
    echonext_row,
    plan_echonext,
    waveform_path,
)
from stence.outputs import MARKER, OutputRefused, output_kind

# a small cohort exercising every option: mixed rates, RLE, corrupt files, EchoNext
CFG = SynthConfig.preset("tiny", fs=(500, 250), compression="rle", corrupt_fraction=0.1, echonext=40, seed=3)


def tree_digest(root: Path) -> dict[str, str]:
    """Hashes of the cohort's files (not the ownership marker, which records when it was written)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER
    }


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "cohort"
    write_cohort(out, CFG)
    return out


@pytest.fixture(scope="module")
def truth(cohort: Path) -> dict:
    return load_truth(cohort)


def good_records(truth: dict) -> list[tuple[dict, dict]]:
    return [(p, e) for p in truth["patients"] for e in p["ecgs"]]


# --- determinism ---------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_other_seed_differs(cohort: Path, tmp_path: Path) -> None:
    write_cohort(tmp_path / "again", CFG)
    assert tree_digest(cohort) == tree_digest(tmp_path / "again")
    write_cohort(tmp_path / "other", dataclasses.replace(CFG, seed=4))
    a, b = tree_digest(cohort), tree_digest(tmp_path / "other")
    assert a["ecg_index.csv"] != b["ecg_index.csv"] and a["ecg/E000000.dat"] != b["ecg/E000000.dat"]
    assert {k for k in a if k.startswith("angio")} != {k for k in b if k.startswith("angio")}


def test_refuses_non_empty_folder_unless_overwrite(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    cfg = SynthConfig.preset("tiny", patients=6)
    write_cohort(out, cfg)
    assert output_kind(out) == "synth"
    before = tree_digest(out)
    marker = (out / MARKER).read_bytes()
    with pytest.raises(OutputRefused, match="--overwrite"):
        write_cohort(out, cfg)
    assert tree_digest(out) == before and (out / MARKER).read_bytes() == marker  # nothing touched
    write_cohort(out, cfg, overwrite=True)
    assert tree_digest(out) == before and output_kind(out) == "synth"


# --- ECG files -----------------------------------------------------------------------------------------


def test_ecg_records_read_back_with_promised_header(cohort: Path, truth: dict) -> None:
    index = {r["record"]: r for r in read_csv(cohort / "ecg_index.csv")}
    rates, shuffled = set(), 0
    for p, e in good_records(truth):
        rec = wfdb.rdrecord(str(cohort / e["record"]))
        assert rec.fs == e["fs"] and rec.sig_len == int(CFG.duration_s * e["fs"])
        assert sorted(rec.sig_name) == sorted(STANDARD_LEADS) and rec.n_sig == 12
        assert rec.units == ["mV"] * 12 and rec.fmt == ["16"] * 12
        assert np.isfinite(rec.p_signal).all() and 0.2 < np.abs(rec.p_signal).max() < 10  # mV range
        assert rec.base_date.isoformat() == e["date"] == index[e["record"]]["acquisition_date"]
        assert index[e["record"]]["patient_id"] == p["patient_id"]
        comments = dict(c.split(": ", 1) for c in rec.comments)
        assert comments["PatientID"] == p["patient_id"] and comments["Name"] == p["name"]
        assert comments["DOB"] == p["birth_date"] and comments["Sex"] == p["sex"]
        assert 30 <= int(comments["Age"]) <= 95
        assert (rec.sig_name != list(STANDARD_LEADS)) == e["leads_shuffled"]
        rates.add(rec.fs)
        shuffled += e["leads_shuffled"]
    assert rates == {500, 250}  # a cohort can mix rates
    assert 0 < shuffled < len(good_records(truth))


def test_record_writer_is_byte_identical_to_wfdb_wrsamp(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("tiny", fs=(500, 1000))
    p = plan_patients(cfg, 1)[0]
    rec = make_record(cfg, p, "R1", 0)
    nan_rec = dataclasses.replace(rec, name="R2", digital=rec.digital.copy())
    nan_rec.digital[10:400] = -32768
    for r in (rec, nan_rec):
        write_record(tmp_path / "ours", r)
        write_record_wfdb(tmp_path / "wfdb", r)
    assert tree_digest(tmp_path / "ours") == tree_digest(tmp_path / "wfdb")
    back = wfdb.rdrecord(str(tmp_path / "ours" / "R2"))
    assert np.isnan(back.p_signal[10:400]).all() and np.isfinite(back.p_signal[400:]).all()


def test_ecgs_lie_within_the_pairing_window(truth: dict) -> None:
    for p in truth["patients"]:
        study = dt.date.fromisoformat(p["studies"][0]["date"])
        for e in p["ecgs"]:
            assert abs((dt.date.fromisoformat(e["date"]) - study).days) <= 20


# --- DICOM files ---------------------------------------------------------------------------------------


def test_dicom_views_read_back_with_promised_header(cohort: Path, truth: dict) -> None:
    sop_uids, series_uids = set(), set()
    for p in truth["patients"]:
        study = p["studies"][0]
        assert p["patient_id"] not in study["folder"] and p["name"].split("^")[0] not in study["folder"]
        angles = set()
        for rel, (primary, secondary) in zip(study["views"], study["angles"], strict=True):
            ds = pydicom.dcmread(cohort / rel)
            assert ds.Modality == "XA" and ds.SOPClassUID == XA_SOP_CLASS
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
            assert (
                ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsAllocated == 8 and ds.BitsStored == 8
            )
            assert int(ds.NumberOfFrames) == CFG.frames and float(ds.FrameTime) > 0
            frames = ds.pixel_array
            assert frames.shape == (CFG.frames, CFG.image_size, CFG.image_size) and frames.dtype == np.uint8
            assert frames.std() > 5
            assert (
                float(ds.PositionerPrimaryAngle) == primary
                and float(ds.PositionerSecondaryAngle) == secondary
            )
            assert ds.StudyInstanceUID == study["study_uid"] and ds.StudyDate == study["date"].replace(
                "-", ""
            )
            assert ds.PatientID == p["patient_id"] and str(ds.PatientName) == p["name"]
            assert ds.PatientBirthDate == p["birth_date"].replace("-", "")
            assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
            sop_uids.add(ds.SOPInstanceUID)
            series_uids.add(ds.SeriesInstanceUID)
            angles.add((primary, secondary))
        assert len(angles) == len(study["views"])  # every view has its own angulation
    n_views = sum(len(p["studies"][0]["views"]) for p in truth["patients"])
    assert len(sop_uids) == len(series_uids) == n_views


def test_uncompressed_dicom_decodes_to_the_same_pixels_as_rle(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("tiny", patients=3)
    write_cohort(tmp_path / "raw", cfg)
    write_cohort(tmp_path / "rle", dataclasses.replace(cfg, compression="rle"))
    for rel in load_truth(tmp_path / "raw")["patients"][0]["studies"][0]["views"]:
        raw, rle = pydicom.dcmread(tmp_path / "raw" / rel), pydicom.dcmread(tmp_path / "rle" / rel)
        assert raw.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert np.array_equal(raw.pixel_array, rle.pixel_array)
        assert raw.SOPInstanceUID == rle.SOPInstanceUID


# --- answer key ----------------------------------------------------------------------------------------


def test_truth_matches_annotations_and_index(cohort: Path, truth: dict) -> None:
    rows: dict[str, dict[int, int]] = {}
    for r in read_csv(cohort / "annotations.csv"):
        rows.setdefault(r["study_uid"], {})[int(r["segment"])] = int(r["stenosis"])
    for p in truth["patients"]:
        study = p["studies"][0]
        assert rows[study["study_uid"]] == {int(s): d for s, d in study["segments"].items()}
        assert set(rows[study["study_uid"]]) == set(SEGMENTS)
        assert p["max_degree"] == max(study["segments"].values())
    index = {r["record"] for r in read_csv(cohort / "ecg_index.csv")}
    assert {e["record"] for _, e in good_records(truth)} <= index


@pytest.mark.parametrize("size", ["tiny", "demo"])
def test_every_threshold_task_has_both_classes(size: str) -> None:
    cfg = SynthConfig.preset(size)
    max_deg = np.array([max(p.segments.values()) for p in plan_patients(cfg, cfg.patients)])
    assert set(max_deg) == {0, 50, 70, 90, 99, 100}
    for task in THRESHOLD_TASKS:
        keep, y = threshold_labels(max_deg, task)
        assert 0 < y.sum() < keep.sum(), task


def test_lesions_are_mostly_absent_and_minor_ones_below_the_maximum() -> None:
    cfg = SynthConfig(patients=120)
    degrees = np.array([[p.segments[s] for s in SEGMENTS] for p in plan_patients(cfg, cfg.patients)])
    assert (degrees == 0).mean() > 0.8
    minor = degrees[(degrees > 0) & (degrees < degrees.max(axis=1, keepdims=True))]
    assert minor.size > 0 and set(minor) <= {30, 40, 50, 60}


# --- corrupt and awkward inputs -------------------------------------------------------------------------


def test_every_corrupt_kind_is_planted_and_broken_as_recorded(cohort: Path, truth: dict) -> None:
    items = truth["corrupt"]
    assert {c["kind"] for c in items} == set(ECG_KINDS + DICOM_KINDS + STUDY_KINDS)
    known = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, str)}
    assert {c["kind"] for c in items} <= known
    studies = {p["patient_id"]: dt.date.fromisoformat(p["studies"][0]["date"]) for p in truth["patients"]}
    index = {r["record"]: r for r in read_csv(cohort / "ecg_index.csv")}
    annotated = {r["study_uid"] for r in read_csv(cohort / "annotations.csv")}
    dicom_studies = {
        pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in cohort.rglob("*.dcm")
    }
    for c in items:
        path, kind = cohort / c["path"], c["kind"]
        if kind in ECG_KINDS:
            assert c["record"] in index and index[c["record"]]["patient_id"] == c["patient_id"]
        if kind == errors.ECG_TRUNCATED:
            with pytest.raises(ValueError):
                wfdb.rdrecord(str(path.with_suffix("")))
        elif kind == errors.ECG_MISSING_SIGNAL_FILE:
            assert path.exists() and not path.with_suffix(".dat").exists()
        elif kind == errors.ECG_MISSING_LEADS:
            rec = wfdb.rdrecord(str(path.with_suffix("")))
            assert rec.n_sig == 8 and "III" not in rec.sig_name
        elif kind == errors.ECG_NAN:
            assert np.isnan(wfdb.rdrecord(str(path.with_suffix(""))).p_signal).mean() > 0.5
        elif kind == errors.ECG_FLAT_LEAD:
            assert (np.ptp(wfdb.rdrecord(str(path.with_suffix(""))).p_signal, axis=0) == 0).sum() == 1
        elif kind == errors.ECG_BAD_HEADER:
            with pytest.raises(Exception):  # noqa: B017 - wfdb raises its own HeaderSyntaxError
                wfdb.rdheader(str(path.with_suffix("")))
        elif kind == errors.ECG_DUPLICATE:
            original = cohort / (c["duplicate_of"] + ".dat")
            assert path.with_suffix(".dat").read_bytes() == original.read_bytes()
            assert index[c["duplicate_of"]]["patient_id"] == c["patient_id"]
        elif kind == errors.ECG_UNPAIRED:
            assert abs((dt.date.fromisoformat(c["date"]) - studies[c["patient_id"]]).days) > 60
        elif kind in DICOM_KINDS:
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == c["study_uid"]
            if kind == errors.DICOM_NO_PIXELS:
                assert ds.Modality == "XA" and "PixelData" not in ds
            elif kind == errors.DICOM_NOT_XA:
                assert ds.Modality != "XA"
            else:
                assert ds.file_meta.TransferSyntaxUID == NO_DECODER_SYNTAX
                assert not get_decoder(NO_DECODER_SYNTAX).is_available
                with pytest.raises(RuntimeError, match="missing dependencies"):
                    _ = ds.pixel_array
        elif kind == errors.STUDY_NO_ANNOTATIONS:
            assert c["study_uid"] in dicom_studies and c["study_uid"] not in annotated
            assert all((cohort / v).exists() for v in c["views"])
        elif kind == errors.ANNOTATION_UNKNOWN_STUDY:
            assert c["study_uid"] in annotated and c["study_uid"] not in dicom_studies


def test_good_files_are_unaffected_by_corruption(cohort: Path, truth: dict, tmp_path: Path) -> None:
    clean = tmp_path / "clean"
    write_cohort(clean, dataclasses.replace(CFG, corrupt_fraction=0.0, echonext=0))
    a, b = tree_digest(cohort), tree_digest(clean)
    good = [e["record"] + ext for _, e in good_records(truth) for ext in (".hea", ".dat")]
    good += [v for p in truth["patients"] for v in p["studies"][0]["views"]]
    assert all(a[g] == b[g] for g in good)
    assert load_truth(clean)["patients"] == truth["patients"]
    n_good = len(good_records(truth))
    assert read_csv(cohort / "ecg_index.csv")[:n_good] == read_csv(clean / "ecg_index.csv")


# --- planted signal ------------------------------------------------------------------------------------


@pytest.mark.parametrize("territory,segment", [("rca", 2), ("lad", 7), ("lcx", 13)])
def test_stenosis_depresses_st_only_in_its_territory(territory: str, segment: int) -> None:
    base = sample_patient(np.random.default_rng(0), {})
    sick = sample_patient(np.random.default_rng(0), {segment: 99})
    st0 = st_levels(simulate_ecg(base, 500, 10, np.random.default_rng(1), noise=0))
    st1 = st_levels(simulate_ecg(sick, 500, 10, np.random.default_rng(1), noise=0))
    inside = [STANDARD_LEADS.index(lead) for lead in TERRITORY_LEADS[territory]]
    outside = [k for k in range(12) if k not in inside]
    assert (st1[inside] < st0[inside] - 0.05).all()
    np.testing.assert_allclose(st1[outside], st0[outside], atol=1e-9)


def test_st_depression_shows_across_noisy_patients_and_grows_with_degree() -> None:
    leads = [STANDARD_LEADS.index(lead) for lead in TERRITORY_LEADS["rca"]]

    def mean_st(segments: dict[int, int], effect: float = 1.0) -> float:
        out = []
        for i in range(30):
            p = sample_patient(np.random.default_rng([7, i]), segments)
            ecg = simulate_ecg(p, 500, 10, np.random.default_rng([8, i]), ecg_effect=effect)
            out.append(st_levels(ecg)[leads].mean())
        return float(np.mean(out))

    none, moderate, severe = mean_st({}), mean_st({1: 70}), mean_st({1: 100})
    assert severe < moderate < none and none - severe > 0.04
    assert mean_st({1: 100}, effect=0.0) == pytest.approx(none)


def test_narrowing_removes_vessel_pixels_and_occlusion_removes_the_distal_tree() -> None:
    tree = sample_tree(np.random.default_rng(0))
    for view in standard_views(3, np.random.default_rng(1)):
        full = vessel_layers(tree, {}, view, 64)[0]
        narrowed = vessel_layers(tree, {7: 70}, view, 64)[0]
        occluded = vessel_layers(tree, {6: 100}, view, 64)[0]
        assert narrowed.sum() < full.sum() - 2 and (narrowed <= full + 1e-12).all()
        assert occluded.sum() < narrowed.sum() - 20  # LAD beyond the lesion and its diagonals vanish
        # the same on noisy rendered frames: fewer dark pixels once contrast has filled the tree
        kw = dict(frames=6, size=64, noise=1.0)
        clean = render_view(tree, {}, view, rng=np.random.default_rng(2), **kw)[-1]
        lesion = render_view(tree, {7: 70}, view, rng=np.random.default_rng(2), **kw)[-1]
        thr = np.median(clean) - 40
        assert (lesion < thr).sum() < (clean < thr).sum()


def test_contrast_fills_the_tree_over_the_frames() -> None:
    tree = sample_tree(np.random.default_rng(0))
    view = standard_views(1, np.random.default_rng(1))[0]
    frames = render_view(tree, {}, view, frames=6, size=64, rng=np.random.default_rng(2), noise=0.0)
    dark = [(f < np.median(frames[-1]) - 40).sum() for f in frames]
    assert dark[0] < dark[2] < dark[-1] and vessel_layers(tree, {}, view, 64)[0].max() > 0.9


# --- EchoNext layout -----------------------------------------------------------------------------------


def test_echonext_layout_shapes_columns_and_split_alignment(cohort: Path) -> None:
    root = cohort / "echonext"
    meta = read_csv(root / METADATA_FILE)
    columns = list(meta[0])
    assert "patient_id" in columns and "split" in columns
    assert [c for c in columns if c.endswith("_flag")] == list(FLAG_COLUMNS)
    assert len(meta) == CFG.echonext and {r["split"] for r in meta} == set(SPLITS)
    patients, _ = plan_echonext(CFG.echonext, CFG.seed)
    for split in SPLITS:
        arr = np.load(waveform_path(root, split), mmap_mode="r")
        rows = [i for i, r in enumerate(meta) if r["split"] == split]
        assert arr.shape == (len(rows), 1, 2500, 12) and arr.dtype == np.float32
        np.testing.assert_allclose(arr[:, 0].mean(axis=1), 0.0, atol=1e-4)
        np.testing.assert_allclose(arr[:, 0].std(axis=1), 1.0, atol=1e-3)
        for k, i in enumerate(rows[:3]):  # row k of the array is the k-th metadata row of the split
            flags, wave = echonext_row(CFG.seed, i, patients[i], CFG.noise)
            assert np.array_equal(arr[k, 0], wave)
            assert [int(meta[i][c]) for c in FLAG_COLUMNS] == flags
    ids = {s: {r["patient_id"] for r in meta if r["split"] == s} for s in SPLITS}
    assert not ids["train"] & (ids["val"] | ids["test"] | ids["no_split"])
    assert not ids["val"] & ids["test"]
    assert ids["no_split"] <= ids["val"] | ids["test"]


# --- command line and presets ---------------------------------------------------------------------------


def test_cli_writes_a_cohort_and_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "raw"
    argv = [
        "synth",
        str(out),
        "--size",
        "tiny",
        "--patients",
        "6",
        "--fs",
        "500",
        "1000",
        "--corrupt-fraction",
        "0.1",
    ]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "patients 6, ECGs 12, studies 6, views 12" in text and "ecg_truncated" in text
    params = load_truth(out)["params"]
    assert params["fs"] == [500, 1000] and params["patients"] == 6 and params["views"] == 2
    assert main(argv) == 2  # refuses to overwrite silently
    with pytest.raises(SystemExit):
        main(["synth", "--help"])
    assert "example" in capsys.readouterr().out


def test_presets_and_validation() -> None:
    assert SynthConfig.preset("tiny").patients <= 16 < SynthConfig.preset("demo").patients
    assert SynthConfig.preset("bench").patients > SynthConfig.preset("demo").patients
    assert SynthConfig.preset("demo", seed=5).seed == 5
    with pytest.raises(ValueError, match="tiny"):
        SynthConfig.preset("huge")
    for bad in (dict(compression="jpeg"), dict(fs=()), dict(corrupt_fraction=2.0), dict(views=0)):
        with pytest.raises(ValueError):
            SynthConfig(**bad)


@pytest.mark.slow
def test_demo_preset_writes_its_240_ecgs_and_360_views(tmp_path: Path) -> None:
    summary = write_cohort(tmp_path / "demo", SynthConfig.preset("demo"))
    assert summary.ecgs == 240 and summary.views == 360
