"""WFDB reading on the real sample records, and the quarantine reasons on damaged copies of them."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import numpy as np
import pytest
import wfdb

from stence.config import STANDARD_LEADS
from stence.data.wfdb_io import parse_comments, read_ecg, validate_signal
from stence.errors import (
    ECG_BAD_HEADER,
    ECG_FLAT_LEAD,
    ECG_MISSING_LEADS,
    ECG_MISSING_SIGNAL_FILE,
    ECG_NAN,
    ECG_TRUNCATED,
    BadInputError,
)

HR_RECORDS = ["HR06000", "HR06001", "HR06002", "HR06003", "HR06004"]
HR_AGE_SEX = {
    "HR06000": (59, "F"),
    "HR06001": (78, "F"),
    "HR06002": (29, "M"),
    "HR06003": (46, "F"),
    "HR06004": (28, "M"),
}


@pytest.fixture(scope="module")
def wfdb_dir(shared_data: Path) -> Path:
    return shared_data / "ecg" / "wfdb"


def _copy_record(src_dir: Path, name: str, dst: Path) -> Path:
    for f in src_dir.glob(f"{name}.*"):
        shutil.copy(f, dst / f.name)
        (dst / f.name).chmod(0o644)
    return dst / name


def _edit_header(base: Path, old: str, new: str, count: int = 1) -> None:
    hea = base.with_name(base.name + ".hea")
    text = hea.read_text()
    assert old in text, f"{old!r} not in header"
    hea.write_text(text.replace(old, new, count))


@pytest.mark.parametrize("name", HR_RECORDS)
def test_ptbxl_records_read_as_12_by_5000_mv(wfdb_dir: Path, name: str) -> None:
    rec = read_ecg(wfdb_dir / f"{name}.hea")
    assert rec.signal.shape == (12, 5000) and rec.signal.dtype == np.float32
    assert rec.fs == 500.0 and rec.leads == STANDARD_LEADS
    ref = wfdb.rdrecord(str(wfdb_dir / name)).p_signal.T  # units "/mv": physical values are already mV
    np.testing.assert_allclose(rec.signal, ref, atol=1e-6)
    assert 0.05 < np.abs(rec.signal).max() < 10.0  # a real ECG in mV, not in µV or ADC counts
    age, sex = HR_AGE_SEX[name]
    assert rec.meta["age"] == age and rec.meta["sex"] == sex
    assert rec.meta["n_samples_orig"] == 5000 and rec.meta["fs_orig"] == 500.0
    assert any(c.startswith("Dx:") for c in rec.meta["comments_kept"])
    assert rec.identifiers == {}


def test_path_without_extension_gives_same_record(wfdb_dir: Path) -> None:
    a = read_ecg(wfdb_dir / "HR06001")
    b = read_ecg(str(wfdb_dir / "HR06001.hea"))
    np.testing.assert_array_equal(a.signal, b.signal)


def test_ptb_record_selects_12_lowercase_leads_and_ignores_frank_leads(wfdb_dir: Path) -> None:
    rec = read_ecg(wfdb_dir / "s0010_re")
    assert rec.signal.shape == (12, 38400) and rec.fs == 1000.0
    raw = wfdb.rdrecord(str(wfdb_dir / "s0010_re"))
    assert len(raw.sig_name) == 15
    for row, lead in enumerate(STANDARD_LEADS):
        col = raw.sig_name.index(lead.lower())
        np.testing.assert_allclose(rec.signal[row], raw.p_signal[:, col], atol=1e-6)
    frank = [raw.p_signal[:, raw.sig_name.index(n)] for n in ("vx", "vy", "vz")]
    for f in frank:  # none of the extra leads leaked into the output rows
        assert not any(np.allclose(r, f) for r in rec.signal)
    assert rec.meta["age"] == 81 and rec.meta["sex"] == "F"
    assert rec.meta["fs_orig"] == 1000.0 and rec.meta["n_samples_orig"] == 38400
    assert rec.meta["signal_files"] == ["s0010_re.dat", "s0010_re.xyz"]  # every file the header lists
    # dates in the PTB comments are quasi-identifiers: kept away from comments_kept
    assert rec.identifiers.get("date_ecgdate") == "01/10/1990"
    assert not any("1990" in c or "-90" in c for c in rec.meta["comments_kept"])


def test_shuffled_lead_order_permutes_rows(wfdb_dir: Path) -> None:
    std = read_ecg(wfdb_dir / "HR06002")
    order = np.random.default_rng(0).permutation(12)
    shuffled = tuple(STANDARD_LEADS[i].upper() for i in order)  # also any case
    rec = read_ecg(wfdb_dir / "HR06002", leads=shuffled)
    assert rec.leads == shuffled
    np.testing.assert_array_equal(rec.signal, std.signal[order])


def test_renamed_lead_raises_missing_leads_naming_it(wfdb_dir: Path, tmp_path: Path) -> None:
    base = _copy_record(wfdb_dir, "HR06000", tmp_path)
    _edit_header(base, " 0 aVL\n", " 0 XYZ\n")
    with pytest.raises(BadInputError) as e:
        read_ecg(base)
    assert e.value.reason == ECG_MISSING_LEADS
    assert "aVL" in str(e.value) and "aVR" not in e.value.detail.split(";")[0]


@pytest.mark.parametrize("name,keep", [("s0010_re", 500_000), ("HR06000", 60_000)])
def test_truncated_signal_file_raises_truncated(wfdb_dir: Path, tmp_path: Path, name: str, keep: int) -> None:
    base = _copy_record(wfdb_dir, name, tmp_path)
    sig_file = next(f for f in tmp_path.iterdir() if f.suffix in (".dat", ".mat"))
    sig_file.write_bytes(sig_file.read_bytes()[:keep])
    with pytest.raises(BadInputError) as e:
        read_ecg(base)
    assert e.value.reason == ECG_TRUNCATED


def test_header_naming_missing_file_raises_missing_signal_file(wfdb_dir: Path, tmp_path: Path) -> None:
    base = _copy_record(wfdb_dir, "s0010_re", tmp_path)
    _edit_header(base, "s0010_re.dat 16 2000 16 0 -88", "gone.dat 16 2000 16 0 -88")
    with pytest.raises(BadInputError) as e:
        read_ecg(base)
    assert e.value.reason == ECG_MISSING_SIGNAL_FILE and "gone.dat" in str(e.value)


def test_missing_extra_channel_file_does_not_matter(wfdb_dir: Path, tmp_path: Path) -> None:
    base = _copy_record(wfdb_dir, "s0010_re", tmp_path)
    (tmp_path / "s0010_re.xyz").unlink()  # only the Frank leads live there
    assert read_ecg(base).signal.shape == (12, 38400)


@pytest.mark.parametrize("unit,factor", [("uV", 1e-3), ("V", 1e3), ("mV", 1.0)])
def test_header_units_are_converted_to_mv(wfdb_dir: Path, tmp_path: Path, unit: str, factor: float) -> None:
    ref = read_ecg(wfdb_dir / "HR06003").signal
    base = _copy_record(wfdb_dir, "HR06003", tmp_path)
    _edit_header(base, "/mv", f"/{unit}", count=12)
    np.testing.assert_allclose(read_ecg(base).signal, ref * factor, rtol=1e-6, atol=1e-9)


def test_unknown_unit_and_garbage_header_raise_bad_header(wfdb_dir: Path, tmp_path: Path) -> None:
    base = _copy_record(wfdb_dir, "HR06004", tmp_path)
    _edit_header(base, "/mv", "/mmHg")
    with pytest.raises(BadInputError) as e:
        read_ecg(base)
    assert e.value.reason == ECG_BAD_HEADER and "mmHg" in str(e.value)
    (tmp_path / "junk.hea").write_text("this is not a header at all\n\x00\x01")
    with pytest.raises(BadInputError) as e:
        read_ecg(tmp_path / "junk")
    assert e.value.reason == ECG_BAD_HEADER
    with pytest.raises(BadInputError) as e:
        read_ecg(tmp_path / "absent.hea")
    assert e.value.reason == ECG_BAD_HEADER


def test_written_record_in_uv_with_base_date_and_nan(tmp_path: Path) -> None:
    fs, n = 250, 1000
    rng = np.random.default_rng(1)
    sig_mv = rng.normal(0, 0.3, size=(n, 12))
    sig_mv[100:120, 4] = np.nan
    order = list(reversed(STANDARD_LEADS))  # leads stored in reverse order in the file
    wfdb.wrsamp(
        "rec1", fs=fs, units=["uV"] * 12, sig_name=order, p_signal=sig_mv[:, ::-1] * 1000.0, fmt=["16"] * 12,
        adc_gain=[10.0] * 12, baseline=[0] * 12, comments=["age: 63", "sex: M"],
        base_time=dt.time(9, 30), base_date=dt.date(2021, 3, 4), write_dir=str(tmp_path),
    )  # fmt: skip
    rec = read_ecg(tmp_path / "rec1")
    assert rec.meta["base_date"] == dt.date(2021, 3, 4)
    assert rec.meta["age"] == 63 and rec.meta["sex"] == "M"
    assert rec.fs == fs and rec.signal.shape == (12, n)
    assert (
        np.isnan(rec.signal[4, 100:120]).all()
        and np.isfinite(np.delete(rec.signal[4], range(100, 120))).all()
    )
    ok = np.isfinite(sig_mv.T)
    np.testing.assert_allclose(rec.signal[ok], sig_mv.T[ok], atol=1e-4)  # 0.1 µV quantisation


def test_identifying_comments_are_separated_case_insensitively() -> None:
    comments = [
        "NAME: Jane Roe",
        "patientid: 123456",
        "MRN: X-99812",
        "Birth date: 1950-01-02",
        "Age: 71",
        "sex: F",
        "Dx: 164934002",
        "Acquisition date: 2020-05-06",
        "<age>: 70 <sex>: M",
        "Name: Unknown",  # a placeholder, not an identifier
    ]
    meta, ids = parse_comments(comments)
    assert ids["name"] == "Jane Roe" and ids["dob"] == "1950-01-02"
    assert "Unknown" not in ids.values() and "Name: Unknown" not in meta["comments_kept"]
    assert ids["patient_id"] == "123456" and ids["patient_id_mrn"] == "X-99812"
    assert any(v == "2020-05-06" for v in ids.values())
    kept = " ".join(meta["comments_kept"])
    for value in ("Jane", "123456", "X-99812", "1950", "2020-05-06"):
        assert value not in kept
    assert "Dx: 164934002" in meta["comments_kept"]
    assert meta["age"] == 71 and meta["sex"] == "F"  # the first age/sex line wins


def _good_signal() -> np.ndarray:
    t = np.arange(2000) / 500
    return np.stack([np.sin(2 * np.pi * (1 + i / 10) * t) for i in range(12)]).astype(np.float32)


def test_validate_signal_accepts_good_and_rejects_nan_and_flat() -> None:
    validate_signal(_good_signal(), 0.5)
    sig = _good_signal()
    sig[7, :1500] = np.nan  # V2 is 75 % NaN
    with pytest.raises(BadInputError) as e:
        validate_signal(sig, 0.5)
    assert e.value.reason == ECG_NAN and "V2" in str(e.value)
    sig = _good_signal()
    sig[9] = 0.25  # V4 constant
    with pytest.raises(BadInputError) as e:
        validate_signal(sig, 0.5)
    assert e.value.reason == ECG_FLAT_LEAD and "V4" in str(e.value) and "V3" not in str(e.value)
    sig = _good_signal()
    sig[0, :100] = np.nan  # a short gap is fine
    validate_signal(sig, 0.5)


def test_hospital_comment_keys_are_identifiers_and_never_kept() -> None:
    """The identifying keys hospitals write (people, carers, places, contacts, visit numbers, dates)."""
    identifying = {
        "Patient Name: Jane Roe": "Jane Roe",
        "Patient ID: 123456": "123456",
        "SSN: 078-05-1120": "078-05-1120",
        "Date of Birth: 02 March 1950": "02 March 1950",
        "Referring Physician: Dr. Gregory House": "Dr. Gregory House",
        "Doctor: James Wilson": "James Wilson",
        "Confirmed by = Lisa Cuddy": "Lisa Cuddy",
        "Physician: Allison Cameron": "Allison Cameron",
        "Physician: Robert Chase": "Robert Chase",  # a second value of a kind must not replace the first
        "Technician: Bob Tech": "Bob Tech",
        "Hospital: St. Mary Hospital": "St. Mary Hospital",
        "Site: Plainsboro Teaching": "Plainsboro Teaching",
        "Location: Ward 7B": "Ward 7B",
        "Address: 1 Main Street, Springfield": "1 Main Street, Springfield",
        "Home phone: +1 555 0100": "+1 555 0100",
        "E-mail: jane.roe@example.org": "jane.roe@example.org",
        "Accession Number: ACC-778899": "ACC-778899",
        "Visit ID: V-4411": "V-4411",
        "Acquired: 2020-05-06T10:32:00": "2020-05-06T10:32:00",
        "Exam: May 6, 2020": "May 6, 2020",
        "Admitted 29-Sep-90 from ER": "Admitted 29-Sep-90 from ER",
    }
    harmless = ["Dx: 164934002,426783006", "In hospital medication: ASA", "Device name: MAC55",
                "Lytic agent: Gamma-TPA", "Peripheral blood Pressure (syst/diast):  140/80 mmHg"]
    meta, ids = parse_comments([*identifying, *harmless])
    assert meta["comments_kept"] == harmless
    for value in identifying.values():
        assert value in ids.values(), value
    assert ids["patient_id"] == "123456" and ids["other_id"] == "078-05-1120"  # only the patient ID is the key
    assert ids["name"] == "Jane Roe" and ids["dob"] == "02 March 1950"
    assert ids["physician"] == "Dr. Gregory House" and ids["institution"] == "St. Mary Hospital"
    assert ids["accession_number"] == "ACC-778899" and ids["contact"] == "+1 555 0100"
    assert len(ids) == len(identifying)  # none overwritten


def test_identifier_keys_ignore_placeholders_and_keep_ptb_clinical_comments(wfdb_dir: Path) -> None:
    _, ids = parse_comments(["Physician: unknown", "Hospital: n/a", "Name: Anonymized"])
    assert ids == {}
    rec = read_ecg(wfdb_dir / "s0010_re")
    kept = rec.meta["comments_kept"]
    assert any(c.startswith("In hospital medication:") for c in kept)
    assert not any("-90" in c for c in kept)  # PTB's dates ("29-Sep-90") are identifiers
