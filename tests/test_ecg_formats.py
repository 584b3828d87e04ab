"""Vendor ECG exports (MUSE, Philips, HL7 aECG, DICOM) behind `read_ecg_file`: the real samples read to
plausible 12-lead signals with their identifiers, and hostile or broken files are refused with a reason.

Properties, not snapshots: rates and lengths, amplitude ranges, Einthoven's law, derived-lead formulas,
parity with sierraecg where it is correct, identifiers read independently from the raw file, and for bad
input the reason code within 2 s (never another exception).
"""

from __future__ import annotations

import base64
import re
import struct
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import sierraecg
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

MUSE = "MUSE_20200923_093504_79000_example.xml"
PHILIPS = "129DYPRG.XML"
HL7 = "ecg_hl7.xml"
DICOM = Path(get_testdata_file("waveform_ecg.dcm"))
# file -> (format, fs, samples per lead, quantum in mV: one step of the stored integers)
REAL = {
    MUSE: ("muse", 500.0, 5000, 4.88e-3),
    PHILIPS: ("philips", 500.0, 5500, 5e-3),
    HL7: ("hl7", 500.0, 5000, 2.5e-3),
    "dicom": ("dicom", 1000.0, 10000, 1.25e-3),
}


@pytest.fixture(scope="module")
def vendor(shared_data: Path) -> Path:
    d = shared_data / "ecg_vendor"
    if not d.is_dir():
        pytest.skip(f"vendor ECG samples not found at {d}")
    return d


def _path(vendor: Path, name: str) -> Path:
    return DICOM if name == "dicom" else vendor / name


def _refused(path: Path, reason: str, limits: Limits = Limits()) -> BadInputError:
    """Read `path`, expecting BadInputError(`reason`) within 2 s; returns the error."""
    t0 = time.perf_counter()
    with pytest.raises(BadInputError) as info:
        read_ecg_file(path, limits=limits)
    assert time.perf_counter() - t0 < 2.0
    assert info.value.reason == reason, str(info.value)
    return info.value


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
    path = _path(vendor, name)
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
    rec = read_ecg_file(_path(vendor, name))
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
    _refused(tmp_path / "b.xml", ECG_BAD_WAVEFORM)


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


# ---- Philips: XLI written here, read back; sierraecg's numpy-2 pitfalls ------------------------------


def _lzw_encode(data: bytes, bits: int = 10) -> bytes:
    """LZW with `bits`-bit codes packed MSB first: the inverse of sierraecg's `LzwDecoder`."""
    table, next_code, max_code = {bytes([i]): i for i in range(256)}, 256, (1 << bits) - 2
    codes, w = [], b""
    for byte in data:
        wc = w + bytes([byte])
        if wc in table:
            w = wc
            continue
        codes.append(table[w])
        if next_code <= max_code:
            table[wc], next_code = next_code, next_code + 1
        w = bytes([byte])
    codes += [table[w]] if w else []
    acc, n_bits, out = 0, 0, bytearray()
    for c in codes:
        acc, n_bits = (acc << bits) | c, n_bits + bits
        while n_bits >= 8:
            n_bits -= 8
            out.append((acc >> n_bits) & 0xFF)
    if n_bits:
        out.append((acc << (8 - n_bits)) & 0xFF)
    return bytes(out)


def _xli_lead(s: np.ndarray, size: int | None = None) -> bytes:
    """One XLI chunk holding samples `s` (second differences + 64, high bytes then low bytes)."""
    s = s.astype(np.int64)
    d = np.zeros(len(s), np.int64)
    d[:2], first = s[:2], int(2 * s[1] - s[0] - s[2])
    d[2:-1] = 2 * s[2:-1] - s[1:-2] - s[3:] + 64
    u = (d & 0xFFFF).astype(np.uint16)
    comp = _lzw_encode((u >> 8).astype(np.uint8).tobytes() + (u & 0xFF).astype(np.uint8).tobytes())
    return struct.pack("<iHh", len(comp) if size is None else size, 0, first) + comp


def _stored(true: np.ndarray) -> np.ndarray:
    """(12, T) true leads -> what XLI stores: III, aVR, aVL, aVF as residuals from I and II."""
    i, ii, iii, avr, avl, avf = true[:6]
    out = true.copy()
    out[2], out[3] = ii - i - iii, -avr - (i + ii) // 2
    out[4], out[5] = (i - iii) // 2 - avl, (ii + iii) // 2 - avf
    return out


def _true_leads(i: np.ndarray, ii: np.ndarray) -> np.ndarray:
    """(12, T) int64 leads in units of 5 uV from I and II, limb leads as the cart computes them."""
    iii = ii - i
    chest = [np.roll(i, 7 * k) + 10 * k for k in range(6)]
    return np.stack([i, ii, iii, -(i + ii) // 2, (i - iii) // 2, (ii + iii) // 2, *chest])


def _ecg_like(n: int = 5000, fs: int = 500, amp: int = 200, base: int = 0) -> np.ndarray:
    t = np.arange(n) / fs
    beats = sum(np.exp(-(((t - c) / 0.02) ** 2)) for c in np.arange(0.3, n / fs, 0.8))
    return (base + amp * beats + 10 * np.sin(2 * np.pi * 0.3 * t)).astype(np.int64)


def _philips_file(
    path: Path,
    chunks: bytes,
    n: int,
    fs: int = 500,
    extra: str = "",
    version: str = "1.03",
    attrs: str = 'compressflag="True" compressmethod="XLI" dataencoding="Base64"',
    body: str | None = None,
) -> Path:
    """A SierraECG 1.03 (or PhilipsECG 1.04) file around the waveform `chunks` (or the text `body`)."""
    doc, res = ("SierraECG", "signalresolution") if version == "1.03" else ("PhilipsECG", "resolution")
    body = base64.encodebytes(chunks).decode() if body is None else body
    path.write_text(
        f"""<?xml version="1.0" encoding="UTF-8"?>
<restingecgdata xmlns="http://www3.medical.philips.com">
 <documentinfo><documentname>doc-1234.xml</documentname><documenttype>{doc}</documenttype>
  <documentversion>{version}</documentversion></documentinfo>
 <reportinfo date="2020-01-02" time="10:11:12"/>
 <dataacquisition date="2020-01-02" time="10:11:12"><acquirer><operatorid>TECH-9</operatorid>
  <institutionname>St Elsewhere</institutionname><departmentname>Cardio 3</departmentname></acquirer>
  <signalcharacteristics><samplingrate>{fs}</samplingrate><{res}>5</{res}>
  <acquisitiontype>STD-12</acquisitiontype><numberchannelsallocated>12</numberchannelsallocated>
  <numberchannelsvalid>12</numberchannelsvalid></signalcharacteristics></dataacquisition>
 <patient><generalpatientdata><patientid>PX-77</patientid><name><lastname>Doe</lastname>
  <firstname>Jane</firstname></name><age><dateofbirth>1960-03-04</dateofbirth></age><sex>Female</sex>
 </generalpatientdata></patient>{extra}
 <waveforms><parsedwaveforms {attrs} durationperchannel="{n * 1000 // fs}">{body}</parsedwaveforms></waveforms>
</restingecgdata>""",
        "utf-8",
    )
    return path


def test_philips_matches_sierraecg_on_the_real_file(vendor: Path) -> None:
    ref = sierraecg.read_file(str(vendor / PHILIPS))  # correct here: no sample leaves int16
    ints = np.stack([lead.samples.astype(np.int64) for lead in ref.leads])  # (12, 5500)
    rec = read_ecg_file(vendor / PHILIPS)
    np.testing.assert_allclose(rec.signal, ints * 5e-3, atol=1e-6)


def test_philips_written_here_round_trips_with_identifiers(tmp_path: Path) -> None:
    true = _true_leads(_ecg_like(), _ecg_like(amp=300))
    path = _philips_file(tmp_path / "p.xml", b"".join(_xli_lead(s) for s in _stored(true)), 5000)
    ref = np.stack([lead.samples.astype(np.int64) for lead in sierraecg.read_file(str(path)).leads])
    np.testing.assert_array_equal(ref, true)  # the encoder above is what sierraecg decodes
    rec = read_ecg_file(path)
    np.testing.assert_allclose(rec.signal, true * 5e-3, atol=1e-6)
    ids = set(rec.identifiers.values())
    assert rec.identifiers["patient_id"] == "PX-77"
    assert {
        "Jane Doe",
        "Doe",
        "Jane",
        "1960-03-04",
        "TECH-9",
        "St Elsewhere",
        "Cardio 3",
        "doc-1234.xml",
    } <= ids
    assert rec.meta["sex"] == "F" and 59 < rec.meta["age"] < 60 and rec.meta["acquisition_time"] == "10:11:12"


def test_philips_1_04_and_uncompressed_variants(tmp_path: Path) -> None:
    true = _true_leads(_ecg_like(1000), _ecg_like(1000, amp=300))  # (12, 1000) in units of 5 uV
    xli = b"".join(_xli_lead(s) for s in _stored(true))
    labels = 'numberofleads="12" leadlabels="I II III aVR aVL aVF V1 V2 V3 V4 V5 V6"'
    v104 = _philips_file(
        tmp_path / "a.xml",
        xli,
        1000,
        version="1.04",
        attrs=f'compression="XLI" dataencoding="Base64" {labels}',
    )
    raw16 = true.astype("<i2").tobytes()  # uncompressed: every lead stored as it is
    plain = _philips_file(tmp_path / "b.xml", raw16, 1000, attrs='compressflag="False" dataencoding="Base64"')
    text = _philips_file(
        tmp_path / "c.xml", b"", 1000, attrs='dataencoding="Plain"', body=" ".join(map(str, true.ravel()))
    )
    for path in (v104, plain, text):
        np.testing.assert_allclose(read_ecg_file(path).signal, true * 5e-3, atol=1e-6)
    _refused(_philips_file(tmp_path / "d.xml", xli, 1000, version="1.02"), ECG_UNSUPPORTED_FORMAT)
    _refused(
        _philips_file(tmp_path / "e.xml", raw16[:-2], 1000, attrs='dataencoding="Base64"'), ECG_BAD_WAVEFORM
    )


def test_philips_limb_leads_beyond_int16_are_exact_where_sierraecg_wraps(tmp_path: Path) -> None:
    i = -_ecg_like(amp=2000, base=18000)  # I + II and II - I leave int16: III reaches ~40000 units
    true = _true_leads(i, -i)
    stored = _stored(true)
    assert np.abs(stored).max() < 2**15 <= np.abs(true).max()  # storable, though the leads are not
    path = _philips_file(tmp_path / "p.xml", b"".join(_xli_lead(s) for s in stored), 5000)
    rec = read_ecg_file(path)
    np.testing.assert_allclose(rec.signal, true * 5e-3, rtol=1e-6, atol=1e-4)
    with warnings.catch_warnings():  # sierraecg 0.4.0 under numpy 2: int16 scalars wrap around
        warnings.simplefilter("ignore")
        wrapped = sierraecg.read_file(str(path)).leads[2].samples.astype(np.int64)
    assert not np.array_equal(wrapped, true[2])


def test_philips_corrupt_xli_is_refused_not_crashed(tmp_path: Path) -> None:
    n, good = 500, [_xli_lead(s) for s in _stored(_true_leads(_ecg_like(500), _ecg_like(500)))]
    out_of_range = np.concatenate(([30000, 32000, 39000], np.full(n - 3, 39000)))  # decodes beyond int16
    bad = _philips_file(tmp_path / "a.xml", _xli_lead(out_of_range) + b"".join(good[1:]), n)
    with pytest.raises(OverflowError):  # what sierraecg 0.4.0 does under numpy 2
        sierraecg.read_file(str(bad))
    _refused(bad, ECG_BAD_WAVEFORM)
    # a negative chunk size steps sierraecg's chunk loop backwards (IndexError / OverflowError there)
    _refused(
        _philips_file(tmp_path / "b.xml", _xli_lead(_ecg_like(n), size=-16) + b"".join(good[1:]), n),
        ECG_BAD_WAVEFORM,
    )
    _refused(_philips_file(tmp_path / "c.xml", b"".join(good[:11]), n), ECG_BAD_WAVEFORM)  # 11 of 12 leads
    _refused(_philips_file(tmp_path / "d.xml", b"".join(good), 400), ECG_BAD_WAVEFORM)  # more than declared
    _refused(_philips_file(tmp_path / "e.xml", b"".join(good), n, fs=5), ECG_BAD_HEADER)


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
    _refused(DICOM, FILE_OVER_LIMIT, Limits(max_duration_s=5))
    _refused(DICOM, FILE_OVER_LIMIT, Limits(max_channels=8))
    ds = pydicom.dcmread(DICOM)
    ds.WaveformSequence[0].SamplingFrequency = 1e9
    ds.save_as(tmp_path / "a.dcm")
    _refused(tmp_path / "a.dcm", ECG_BAD_HEADER)
    ds = pydicom.dcmread(DICOM)
    ds.WaveformSequence[0].NumberOfWaveformSamples = 20000  # more than the data holds
    ds.save_as(tmp_path / "b.dcm")
    _refused(tmp_path / "b.dcm", ECG_BAD_WAVEFORM)


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
    err = _refused(tmp_path / "foo.xml", ECG_UNSUPPORTED_FORMAT)
    assert "<Foo>" in err.detail
    (tmp_path / "empty.xml").write_bytes(b"")
    _refused(tmp_path / "empty.xml", ECG_UNSUPPORTED_FORMAT)


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
    _refused(tmp_path / "laughs.xml", ECG_XML_FORBIDDEN)
    secret = tmp_path / "secret.txt"
    secret.write_text("SECRET-CONTENT-8d1f")
    muse = (vendor / MUSE).read_text("latin-1")
    xxe = muse.replace(
        '<!DOCTYPE RestingECG SYSTEM "restecg.dtd">',
        f'<!DOCTYPE RestingECG [<!ENTITY x SYSTEM "file://{secret}">]>',
    )
    xxe = xxe.replace("<PatientLastName>MUSE", "<PatientLastName>&x;")
    (tmp_path / "xxe.xml").write_text(xxe, "latin-1")
    err = _refused(tmp_path / "xxe.xml", ECG_XML_FORBIDDEN)
    assert "SECRET-CONTENT" not in str(err) and str(secret) not in str(err)
    # an external DTD (as MUSE writes) is accepted but never fetched: the record holds nothing of it
    ext = muse.replace('"restecg.dtd"', f'"file://{secret}"')
    (tmp_path / "dtd.xml").write_text(ext, "latin-1")
    rec = read_ecg_file(tmp_path / "dtd.xml")
    assert not any("SECRET" in v for v in rec.identifiers.values())


def test_broken_xml_is_refused_with_its_reason(vendor: Path, tmp_path: Path) -> None:
    muse = (vendor / MUSE).read_bytes()
    (tmp_path / "half.xml").write_bytes(muse[: len(muse) // 2])
    _refused(tmp_path / "half.xml", ECG_BAD_XML)
    latin = muse.replace(b"<PatientLastName>MUSE", b"<PatientLastName>M\xdcLLER")
    (tmp_path / "latin.xml").write_bytes(latin)
    assert "M\u00dcLLER" in read_ecg_file(tmp_path / "latin.xml").identifiers.values()
    (tmp_path / "utf8.xml").write_bytes(latin.replace(b"ISO-8859-1", b"UTF-8"))  # \xdc is no UTF-8
    _refused(tmp_path / "utf8.xml", ECG_BAD_XML)
    rhythm = muse.index(b"<WaveformType>Rhythm")
    bad64 = muse[:rhythm] + muse[rhythm:].replace(b"<WaveFormData>", b"<WaveFormData>*%", 1)
    (tmp_path / "b64.xml").write_bytes(bad64)
    _refused(tmp_path / "b64.xml", ECG_BAD_WAVEFORM)
    flipped = bytearray(muse)
    k = muse.index(b"<WaveFormData>", rhythm) + 40
    flipped[k] = ord("A") if flipped[k] != ord("A") else ord("B")  # still base64, but the CRC-32 fails
    (tmp_path / "crc.xml").write_bytes(bytes(flipped))
    _refused(tmp_path / "crc.xml", ECG_BAD_WAVEFORM)
    _refused(vendor / MUSE, FILE_OVER_LIMIT, Limits(max_header_bytes=100_000))
    for base, reason in ((b"1", ECG_BAD_HEADER), (b"1000000000", ECG_BAD_HEADER), (b"abc", ECG_BAD_HEADER)):
        (tmp_path / "rate.xml").write_bytes(
            muse.replace(b"<SampleBase>500</SampleBase>", b"<SampleBase>" + base + b"</SampleBase>")
        )
        _refused(tmp_path / "rate.xml", reason)
    _refused(vendor / MUSE, FILE_OVER_LIMIT, Limits(max_duration_s=5))
    hl7 = (
        (vendor / HL7)
        .read_text("utf-8")
        .replace('<increment value="0.002" unit="s"/>', '<increment value="0" unit="s"/>')
    )
    (tmp_path / "hl7.xml").write_text(hl7, "utf-8")
    _refused(tmp_path / "hl7.xml", ECG_BAD_HEADER)


@pytest.mark.parametrize("name", list(REAL))
def test_damaged_copies_read_or_refused_never_crash(vendor: Path, tmp_path: Path, name: str) -> None:
    data = _path(vendor, name).read_bytes()
    rng = np.random.default_rng(0)
    suffix = ".dcm" if name == "dicom" else ".xml"
    for k in range(12):
        b = bytearray(data[: int(rng.integers(len(data) // 2, len(data)))] if k % 3 == 0 else data)
        for pos in rng.integers(0, len(b), size=int(rng.integers(1, 20))):
            b[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"{k}{suffix}"
        path.write_bytes(bytes(b))
        t0 = time.perf_counter()
        try:
            rec = read_ecg_file(path)
            assert rec.signal.shape[0] == 12 and np.isfinite(rec.signal).all()
        except BadInputError as e:
            assert e.reason and e.detail
        assert time.perf_counter() - t0 < 2.0
