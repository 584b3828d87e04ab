"""Vendor ECG exports (MUSE, Philips, HL7 aECG, DICOM) behind `read_ecg_file`: the real samples read to
plausible 12-lead signals with their identifiers, and hostile or broken files are refused with a reason.

Properties, not snapshots: rates and lengths, amplitude ranges, Einthoven's law, derived-lead formulas,
parity with sierraecg where it is correct, identifiers read independently from the raw file, and for bad
input the reason code within 2 s (never another exception).
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from stence.config import STANDARD_LEADS
from stence.data.ecg_formats import FORMATS, read_ecg_file, sniff
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord, read_ecg
from stence.errors import (
    ECG_BAD_HEADER,
    ECG_BAD_WAVEFORM,
    ECG_BAD_XML,
    ECG_MISSING_LEADS,
    ECG_UNSUPPORTED_FORMAT,
    ECG_XML_FORBIDDEN,
    FILE_OVER_LIMIT,
    BadInputError,
)
from tests.ecg_format_helpers import DICOM, HL7, MUSE, PHILIPS, REAL, refused, sample_path


def _qrs_p2p(sig: np.ndarray, fs: float) -> np.ndarray:
    """(n_leads,) median over 1 s windows of the peak-to-peak amplitude: one QRS per window, robust to a
    calibration pulse or an artefact in one of them."""
    w = int(fs)
    wins = sig[:, : sig.shape[1] // w * w].reshape(sig.shape[0], -1, w)  # (L, T) -> (L, n_windows, fs)
    return np.median(wins.max(axis=2) - wins.min(axis=2), axis=1)


def _raw_identifiers(vendor: Path, name: str) -> dict[str, str]:
    """Identifying values read from the raw file with regexes / pydicom, independently of the readers."""
    if name == "dicom":
        ds = pydicom.dcmread(DICOM)
        return {
            "patient_id": ds.PatientID,
            "dob": ds.PatientBirthDate,
            "institution": ds.InstitutionName,
            "accession": ds.AccessionNumber,
            "referring": str(ds.ReferringPhysicianName),
        }
    raw = (vendor / name).read_text("latin-1")

    def tag(t: str) -> str:
        return re.search(rf"<{t}>([^<]+)</{t}>", raw).group(1).strip()

    if name == MUSE:
        return {
            "patient_id": tag("PatientID"),
            "last": tag("PatientLastName"),
            "first": tag("PatientFirstName"),
            "dob": tag("DateofBirth"),
            "site": tag("SiteName"),
            "ordering": tag("OrderingMDLastName"),
            "overreader": tag("OverreaderLastName"),
            "tech": tag("AcquisitionTechLastName"),
            "date": tag("AcquisitionDate"),
            "order": tag("RequisitionNumber"),
            "room": tag("LocationName"),
        }
    if name == PHILIPS:
        return {"patient_id": tag("patientid"), "institution": tag("institutionname")}
    subject = re.search(r"<trialSubject>\s*<id [^>]*extension=\"([^\"]+)\"", raw).group(1)
    return {
        "patient_id": subject,
        "name": re.search(r"<subjectDemographicPerson>\s*<name>([^<]+)", raw).group(1),
        "dob": re.search(r"<birthTime value=\"(\d+)\"", raw).group(1),
        "investigator": re.search(r"<investigatorPerson>\s*<name>([^<]+)", raw).group(1),
        "site": re.search(r"<trialSite>.*?<name>([^<]+)", raw, re.DOTALL).group(1),
    }


# ---- real samples ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(REAL))
def test_real_sample_reads_to_plausible_12_lead(vendor: Path, name: str) -> None:
    fmt, fs, n, quantum = REAL[name]
    path = sample_path(vendor, name)
    assert sniff(path) == fmt and fmt in FORMATS
    rec = read_ecg_file(path)
    assert isinstance(rec, EcgRecord) and rec.leads == STANDARD_LEADS
    assert rec.signal.shape == (12, n) and rec.signal.dtype == np.float32 and rec.fs == fs
    assert rec.meta["format"] == fmt and rec.meta["n_samples_orig"] == n and rec.meta["fs_orig"] == fs
    assert rec.meta["signal_files"] == [] and rec.meta["comments_kept"] == []
    assert np.isfinite(rec.signal).all() and (np.abs(rec.signal).max(axis=1) > 0).all()
    p2p = _qrs_p2p(rec.signal, fs)
    assert ((p2p > 0.3) & (p2p < 3.0)).sum() >= 10, p2p
    i, ii, iii = (rec.signal[k].astype(np.float64) for k in range(3))
    # Einthoven within 2 quanta on nearly every sample (Philips has a 1 mV calibration pulse in every lead)
    assert np.mean(np.abs(iii - (ii - i)) <= 2 * quantum + 1e-6) > 0.97


@pytest.mark.parametrize("name", list(REAL))
def test_real_sample_identifiers_and_dates(vendor: Path, name: str) -> None:
    rec = read_ecg_file(sample_path(vendor, name))
    raw = _raw_identifiers(vendor, name)
    values = set(rec.identifiers.values())
    missing = {k: v for k, v in raw.items() if v not in values}
    assert not missing, f"identifiers not collected: {missing}"
    assert rec.identifiers["patient_id"] == raw["patient_id"]
    expected = {MUSE: (2020, 9, 22), PHILIPS: (2011, 12, 1), HL7: (2002, 11, 22), "dicom": (2013, 1, 25)}[
        name
    ]
    assert (rec.meta["base_date"].year, rec.meta["base_date"].month, rec.meta["base_date"].day) == expected
    assert re.fullmatch(r"\d\d:\d\d:\d\d", rec.meta["acquisition_time"])
    assert rec.meta["sex"] in ("M", "F") and 0 < rec.meta["age"] < 120


def test_muse_reads_rhythm_and_derives_limb_leads(vendor: Path) -> None:
    rec = read_ecg_file(vendor / MUSE)
    assert rec.signal.shape[1] == 5000  # the rhythm strip, not the 600-sample median beat
    s = {lead: rec.signal[k].astype(np.float64) for k, lead in enumerate(rec.leads)}
    assert sorted(rec.meta["derived_leads"]) == ["III", "aVF", "aVL", "aVR"]
    np.testing.assert_allclose(s["III"], s["II"] - s["I"], atol=1e-5)
    np.testing.assert_allclose(s["aVR"], -(s["I"] + s["II"]) / 2, atol=1e-5)
    np.testing.assert_allclose(s["aVL"], s["I"] - s["II"] / 2, atol=1e-5)
    np.testing.assert_allclose(s["aVF"], s["II"] - s["I"] / 2, atol=1e-5)
    # stored leads are the int16 samples x 4.88 uV
    raw = (vendor / MUSE).read_text("latin-1")
    rhythm = raw[raw.index("<WaveformType>Rhythm") :]
    v1 = re.search(r"<LeadID>V1</LeadID>.*?<WaveFormData>([^<]+)", rhythm, re.DOTALL).group(1)
    ints = np.frombuffer(base64.b64decode("".join(v1.split())), dtype="<i2")
    np.testing.assert_allclose(s["V1"], ints * 4.88e-3, atol=1e-5)


def test_leads_follow_the_requested_order_case_insensitively(vendor: Path) -> None:
    full = read_ecg_file(vendor / MUSE)
    rec = read_ecg_file(vendor / MUSE, leads=("v6", "AVR", "i"))
    assert rec.signal.shape == (3, 5000) and rec.leads == ("v6", "AVR", "i")
    np.testing.assert_array_equal(rec.signal, full.signal[[11, 3, 0]])
    with pytest.raises(BadInputError) as info:
        read_ecg_file(vendor / MUSE, leads=("I", "V7"))
    assert info.value.reason == ECG_MISSING_LEADS


def test_hl7_uses_rhythm_series_with_origin_and_scale(vendor: Path, tmp_path: Path) -> None:
    raw = (vendor / HL7).read_text("utf-8")
    rec = read_ecg_file(vendor / HL7)
    assert rec.signal.shape[1] == 5000  # not the 599-sample representative beat of derivedSeries
    first_i = re.search(r"MDC_ECG_LEAD_I\".*?<digits>([^<]+)", raw, re.DOTALL).group(1).split()
    np.testing.assert_allclose(rec.signal[0], np.array(first_i, float) * 2.5e-3, atol=1e-6)
    # origin and scale of lead I changed: 0.1 mV + 5 uV x digit
    block = re.search(r"MDC_ECG_LEAD_I\".*?</sequence>", raw, re.DOTALL)
    patched = block.group(0).replace('<origin value="0" unit="uV"/>', '<origin value="0.1" unit="mV"/>')
    patched = patched.replace('<scale value="2.5" unit="uV"/>', '<scale value="5" unit="uV"/>')
    (tmp_path / "a.xml").write_text(raw[: block.start()] + patched + raw[block.end() :], "utf-8")
    rec2 = read_ecg_file(tmp_path / "a.xml")
    np.testing.assert_allclose(rec2.signal[0], 0.1 + np.array(first_i, float) * 5e-3, atol=1e-5)
    np.testing.assert_array_equal(rec2.signal[1:], rec.signal[1:])
    # without its own rhythm series the file is refused, never read from the median beats
    no_rhythm = raw.replace('code="RHYTHM"', 'code="OTHER"')
    (tmp_path / "b.xml").write_text(no_rhythm, "utf-8")
    refused(tmp_path / "b.xml", ECG_BAD_WAVEFORM)


def test_hl7_derives_missing_limb_leads(vendor: Path, tmp_path: Path) -> None:
    raw = (vendor / HL7).read_text("utf-8")
    full = read_ecg_file(vendor / HL7)
    for lead in ("III", "AVR", "AVL", "AVF"):  # drop the stored limb leads of the rhythm set only
        raw = re.sub(
            rf"<component>\s*<sequence>\s*<code code=\"MDC_ECG_LEAD_{lead}\".*?</component>",
            "",
            raw,
            count=1,
            flags=re.DOTALL,
        )
    (tmp_path / "a.xml").write_text(raw, "utf-8")
    rec = read_ecg_file(tmp_path / "a.xml")
    assert sorted(rec.meta["derived_leads"]) == ["III", "aVF", "aVL", "aVR"]
    np.testing.assert_allclose(rec.signal[:6], full.signal[:6], atol=2.5e-3)  # derived vs stored: rounding


# ---- DICOM ------------------------------------------------------------------------------------------


def test_dicom_picks_rhythm_group_and_converts_units(tmp_path: Path) -> None:
    rec = read_ecg_file(DICOM)
    ds = pydicom.dcmread(DICOM)
    np.testing.assert_allclose(rec.signal, ds.waveform_array(0).T * 1e-3, atol=1e-6)  # uV -> mV
    ds.WaveformSequence = pydicom.Sequence(list(reversed(ds.WaveformSequence)))  # median beat first
    for ch in ds.WaveformSequence[1].ChannelDefinitionSequence:
        ch.ChannelSensitivity = ch.ChannelSensitivity / 1000
        ch.ChannelSensitivityUnitsSequence[0].CodeValue = "mV"
    ds.save_as(tmp_path / "a.bin")
    assert sniff(tmp_path / "a.bin") == "dicom"
    np.testing.assert_allclose(read_ecg_file(tmp_path / "a.bin").signal, rec.signal, atol=1e-6)
    for g in ds.WaveformSequence:  # no labels: the longest group with 12 channels, never the median beat
        del g.MultiplexGroupLabel
    ds.save_as(tmp_path / "b.dcm")
    assert read_ecg_file(tmp_path / "b.dcm").signal.shape == (12, 10000)


def test_dicom_channels_named_from_code_values_when_meaning_is_missing(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM)
    channels = ds.WaveformSequence[0].ChannelDefinitionSequence
    mdc = {"I": "2:1", "II": "2:2", "III": "2:61", "aVR": "2:62", "aVL": "2:63", "aVF": "2:64"}
    for k, ch in enumerate(channels):  # stored order I, II, V1-V6, III, aVR, aVL, aVF
        src = ch.ChannelSourceSequence[0]
        meaning = str(src.CodeMeaning)
        del src.CodeMeaning
        lead = re.match(r"Lead (\w+)", meaning).group(1)
        if k % 2:
            src.CodeValue = mdc.get(lead, f"2:{int(lead[1:]) + 2}" if lead.startswith("V") else "?")
    ds.save_as(tmp_path / "a.dcm")
    np.testing.assert_array_equal(read_ecg_file(tmp_path / "a.dcm").signal, read_ecg_file(DICOM).signal)


def test_dicom_person_names_are_split_and_joined(tmp_path: Path) -> None:
    ds = pydicom.dcmread(DICOM)
    ds.PatientName, ds.OperatorsName = "Rossi^Maria^Grazia", "Bianchi^Luca"
    del ds.PatientAge  # then the age comes from the birth date and the acquisition date
    ds.save_as(tmp_path / "a.dcm")
    rec = read_ecg_file(tmp_path / "a.dcm")
    ids = rec.identifiers
    assert ids["name"] == "Rossi^Maria^Grazia" and ids["patient_id"] == "642341"
    assert {"Maria Grazia Rossi", "Maria", "Grazia", "Rossi", "Luca Bianchi", "Bianchi"} <= set(ids.values())
    assert 41.9 < rec.meta["age"] < 42.1  # born 1971-01-23, recorded 2013-01-25


def test_dicom_limits_come_before_the_waveform_is_read(tmp_path: Path) -> None:
    refused(DICOM, FILE_OVER_LIMIT, Limits(max_duration_s=5))
    refused(DICOM, FILE_OVER_LIMIT, Limits(max_channels=8))
    ds = pydicom.dcmread(DICOM)
    ds.WaveformSequence[0].SamplingFrequency = 1e9
    ds.save_as(tmp_path / "a.dcm")
    refused(tmp_path / "a.dcm", ECG_BAD_HEADER)
    ds = pydicom.dcmread(DICOM)
    ds.WaveformSequence[0].NumberOfWaveformSamples = 20000  # more than the data holds
    ds.save_as(tmp_path / "b.dcm")
    refused(tmp_path / "b.dcm", ECG_BAD_WAVEFORM)


# ---- sniffing by content ----------------------------------------------------------------------------


def test_sniff_by_content(vendor: Path, tmp_path: Path) -> None:
    muse = (vendor / MUSE).read_bytes()
    (tmp_path / "renamed.txt").write_bytes(muse)
    assert sniff(tmp_path / "renamed.txt") == "muse"
    assert read_ecg_file(tmp_path / "renamed.txt").signal.shape == (12, 5000)
    (tmp_path / "bom.xml").write_bytes(b"\xef\xbb\xbf" + muse.replace(b"ISO-8859-1", b"UTF-8"))
    assert sniff(tmp_path / "bom.xml") == "muse"
    assert read_ecg_file(tmp_path / "bom.xml").signal.shape == (12, 5000)
    (tmp_path / "utf16.xml").write_bytes("\ufeff<?xml version='1.0'?>\n<RestingECG/>".encode("utf-16-le"))
    assert sniff(tmp_path / "utf16.xml") == "muse"
    prolog = b'<?xml version="1.0"?>\n<!-- <RestingECG> --><?pi x?>\n<!DOCTYPE x [<!ELEMENT x ANY>]>\n'
    (tmp_path / "v3.xml").write_bytes(prolog + b'<v3:AnnotatedECG xmlns:v3="urn:hl7-org:v3"/>')
    assert sniff(tmp_path / "v3.xml") == "hl7"
    (tmp_path / "p.dat").write_bytes((vendor / PHILIPS).read_bytes())
    assert sniff(tmp_path / "p.dat") == "philips"
    (tmp_path / "r.hea").write_text("r 1 500 10\n")
    assert sniff(tmp_path / "r.hea") == "wfdb"
    assert sniff(Path(get_testdata_file("CT_small.dcm"))) is None  # DICOM, but no ECG
    (tmp_path / "foo.xml").write_bytes(b'<?xml version="1.0"?>\n<!-- x --><Foo><RestingECG/></Foo>')
    assert sniff(tmp_path / "foo.xml") is None
    err = refused(tmp_path / "foo.xml", ECG_UNSUPPORTED_FORMAT)
    assert "<Foo>" in err.detail
    (tmp_path / "empty.xml").write_bytes(b"")
    refused(tmp_path / "empty.xml", ECG_UNSUPPORTED_FORMAT)


def test_wfdb_is_delegated_to_wfdb_io(tmp_path: Path) -> None:
    import wfdb

    sig = np.stack([np.sin(np.arange(2000) / 50 + k) for k in range(12)], axis=1)  # (T, 12) mV
    wfdb.wrsamp(
        "r",
        fs=500,
        units=["mV"] * 12,
        sig_name=list(STANDARD_LEADS),
        p_signal=sig,
        fmt=["16"] * 12,
        write_dir=str(tmp_path),
    )
    rec = read_ecg_file(tmp_path / "r.hea")
    np.testing.assert_array_equal(rec.signal, read_ecg(tmp_path / "r.hea").signal)
    assert rec.signal.shape == (12, 2000) and rec.fs == 500


# ---- hostile and broken input -----------------------------------------------------------------------


def test_entities_are_refused_and_never_expanded_or_fetched(vendor: Path, tmp_path: Path) -> None:
    lol = "".join(f'<!ENTITY l{k} "{f"&l{k - 1};" * 10}">' for k in range(1, 12))
    (tmp_path / "laughs.xml").write_text(
        f'<?xml version="1.0"?><!DOCTYPE RestingECG [<!ENTITY l0 "lol">{lol}]><RestingECG>&l11;</RestingECG>'
    )
    refused(tmp_path / "laughs.xml", ECG_XML_FORBIDDEN)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT-8d1f")
    muse = (vendor / MUSE).read_text("latin-1")
    xxe = muse.replace(
        '<!DOCTYPE RestingECG SYSTEM "restecg.dtd">',
        f'<!DOCTYPE RestingECG [<!ENTITY x SYSTEM "file://{secret}">]>',
    )
    xxe = xxe.replace("<PatientLastName>MUSE", "<PatientLastName>&x;")
    (tmp_path / "xxe.xml").write_text(xxe, "latin-1")
    err = refused(tmp_path / "xxe.xml", ECG_XML_FORBIDDEN)
    assert "SECRET-CONTENT" not in str(err) and str(secret) not in str(err)
    # an external DTD (as MUSE writes) is accepted but never fetched: the record holds nothing of it
    ext = muse.replace('"restecg.dtd"', f'"file://{secret}"')
    (tmp_path / "dtd.xml").write_text(ext, "latin-1")
    rec = read_ecg_file(tmp_path / "dtd.xml")
    assert not any("SECRET" in v for v in rec.identifiers.values())


def test_broken_xml_is_refused_with_its_reason(vendor: Path, tmp_path: Path) -> None:
    muse = (vendor / MUSE).read_bytes()
    (tmp_path / "half.xml").write_bytes(muse[: len(muse) // 2])
    refused(tmp_path / "half.xml", ECG_BAD_XML)
    latin = muse.replace(b"<PatientLastName>MUSE", b"<PatientLastName>M\xdcLLER")
    (tmp_path / "latin.xml").write_bytes(latin)
    assert "M\u00dcLLER" in read_ecg_file(tmp_path / "latin.xml").identifiers.values()
    (tmp_path / "utf8.xml").write_bytes(latin.replace(b"ISO-8859-1", b"UTF-8"))  # \xdc is no UTF-8
    refused(tmp_path / "utf8.xml", ECG_BAD_XML)
    rhythm = muse.index(b"<WaveformType>Rhythm")
    bad64 = muse[:rhythm] + muse[rhythm:].replace(b"<WaveFormData>", b"<WaveFormData>*%", 1)
    (tmp_path / "b64.xml").write_bytes(bad64)
    refused(tmp_path / "b64.xml", ECG_BAD_WAVEFORM)
    flipped = bytearray(muse)
    k = muse.index(b"<WaveFormData>", rhythm) + 40
    flipped[k] = ord("A") if flipped[k] != ord("A") else ord("B")  # still base64, but the CRC-32 fails
    (tmp_path / "crc.xml").write_bytes(bytes(flipped))
    refused(tmp_path / "crc.xml", ECG_BAD_WAVEFORM)
    refused(vendor / MUSE, FILE_OVER_LIMIT, Limits(max_header_bytes=100_000))
    for base, reason in ((b"1", ECG_BAD_HEADER), (b"1000000000", ECG_BAD_HEADER), (b"abc", ECG_BAD_HEADER)):
        (tmp_path / "rate.xml").write_bytes(
            muse.replace(b"<SampleBase>500</SampleBase>", b"<SampleBase>" + base + b"</SampleBase>")
        )
        refused(tmp_path / "rate.xml", reason)
    refused(vendor / MUSE, FILE_OVER_LIMIT, Limits(max_duration_s=5))
    hl7 = (
        (vendor / HL7)
        .read_text("utf-8")
        .replace('<increment value="0.002" unit="s"/>', '<increment value="0" unit="s"/>')
    )
    (tmp_path / "hl7.xml").write_text(hl7, "utf-8")
    refused(tmp_path / "hl7.xml", ECG_BAD_HEADER)


@pytest.mark.parametrize("name", list(REAL))
def test_damaged_copies_read_or_refused_never_crash(vendor: Path, tmp_path: Path, name: str) -> None:
    data = sample_path(vendor, name).read_bytes()
    rng = np.random.default_rng(0)
    suffix = ".dcm" if name == "dicom" else ".xml"
    for k in range(12):
        b = bytearray(data[: int(rng.integers(len(data) // 2, len(data)))] if k % 3 == 0 else data)
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 20))):
            b[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"{k}{suffix}"
        path.write_bytes(bytes(b))
        try:
            rec = read_ecg_file(path)
            assert rec.signal.shape[0] == 12 and np.isfinite(rec.signal).all()
        except BadInputError as e:
            assert e.reason and e.detail
