"""Synthetic ECGs in hospital formats (GE MUSE XML, HL7 aECG, DICOM 12-lead): signals read back within each
format's quantisation, identifiers inside every file, and a mixed export equal to the WFDB one but for files."""

from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import xml.etree.ElementTree as ET
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import wfdb

from stence.cli import main
from stence.config import STANDARD_LEADS
from stence.data.synth import EcgRecord, SynthConfig, load_truth, make_record, plan_patients, write_cohort
from stence.data.synth_vendor import (
    ECG_SOP_CLASS,
    HL7_UV_PER_DIGIT,
    MEDIAN_SAMPLES,
    MUSE_LEADS,
    MUSE_UV_PER_BIT,
    RECORD_FORMATS,
    Person,
    person_for,
    record_format,
    write_ecg,
)
from stence.outputs import MARKER

CFG = SynthConfig.preset("tiny", seed=7)
VENDOR = ("muse", "hl7", "dicom")
HL7 = {"h": "urn:hl7-org:v3"}
MDC_TO_LEAD = {f"MDC_ECG_LEAD_{lead.upper()}": lead for lead in STANDARD_LEADS}


# --- readers written from the format specifications (independent of the writers) --------------------------


def parse_muse(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """Rhythm leads of a MUSE file in microvolts (lead -> (T,)), and the sampling rate."""
    root = ET.parse(path).getroot()
    rhythm = [w for w in root.iter("Waveform") if w.findtext("WaveformType") == "Rhythm"]
    assert len(rhythm) == 1
    fs = float(rhythm[0].findtext("SampleBase")) * 10 ** int(rhythm[0].findtext("SampleExponent"))
    leads = {}
    for ld in rhythm[0].findall("LeadData"):
        raw = base64.b64decode(ld.findtext("WaveFormData"))
        assert zlib.crc32(raw) == int(ld.findtext("LeadDataCRC32"))
        assert (
            len(raw) == int(ld.findtext("LeadByteCountTotal")) == 2 * int(ld.findtext("LeadSampleCountTotal"))
        )
        assert ld.findtext("LeadAmplitudeUnits") == "MICROVOLTS"
        per_bit = float(ld.findtext("LeadAmplitudeUnitsPerBit"))
        leads[ld.findtext("LeadID")] = np.frombuffer(raw, "<i2").astype(np.float64) * per_bit
    return leads, fs


def parse_hl7(path: Path) -> tuple[dict[str, np.ndarray], float, str]:
    """Leads of an aECG's RHYTHM series in microvolts, the rate and the head time (derivedSeries skipped)."""
    series = ET.parse(path).getroot().find("h:component/h:series", HL7)
    assert series.find("h:code", HL7).get("code") == "RHYTHM"
    leads, fs, head = {}, 0.0, ""
    for seq in series.findall("h:component/h:sequenceSet/h:component/h:sequence", HL7):
        code, value = seq.find("h:code", HL7).get("code"), seq.find("h:value", HL7)
        if code == "TIME_ABSOLUTE":
            head = value.find("h:head", HL7).get("value")
            fs = 1.0 / float(value.find("h:increment", HL7).get("value"))
            continue
        origin = float(value.find("h:origin", HL7).get("value"))
        scale = float(value.find("h:scale", HL7).get("value"))
        digits = np.array(value.findtext("h:digits", namespaces=HL7).split(), dtype=np.float64)
        leads[MDC_TO_LEAD[code]] = origin + scale * digits
    return leads, fs, head


def parse_dicom(path: Path) -> tuple[dict[str, np.ndarray], float]:
    """Leads of the first multiplex group in microvolts (pydicom applies the channel sensitivities)."""
    ds = pydicom.dcmread(path)
    wf = ds.WaveformSequence[0]
    names = [
        c.ChannelSourceSequence[0].CodeMeaning.removeprefix("Lead ") for c in wf.ChannelDefinitionSequence
    ]
    arr = ds.waveform_array(0)  # (T, channels)
    return {name: arr[:, k] for k, name in enumerate(names)}, float(wf.SamplingFrequency)


def parse(path: Path, fmt: str) -> tuple[dict[str, np.ndarray], float]:
    if fmt == "muse":
        return parse_muse(path)
    if fmt == "hl7":
        return parse_hl7(path)[:2]
    return parse_dicom(path)


def microvolts(rec: EcgRecord) -> dict[str, np.ndarray]:
    return {lead: rec.digital[:, k].astype(np.float64) for k, lead in enumerate(rec.leads)}  # 1 uV per unit


def derived_limb_leads(uv: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """III, aVR, aVL, aVF from I and II (Einthoven and Goldberger), as MUSE readers derive them."""
    i, ii = uv["I"], uv["II"]
    return {"III": ii - i, "aVR": -(i + ii) / 2, "aVL": i - ii / 2, "aVF": ii - i / 2}


# --- records ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patient():
    return plan_patients(CFG, 3)[2]


@pytest.fixture(scope="module")
def person(patient) -> Person:
    return person_for(patient)


@pytest.fixture(scope="module", params=["standard", "shuffled"])
def rec(request, patient) -> EcgRecord:
    rec = make_record(CFG, patient, "E000042", 0)
    assert rec.leads == STANDARD_LEADS
    if request.param == "shuffled":
        order = np.random.default_rng(0).permutation(len(rec.leads))
        rec = dataclasses.replace(rec, digital=np.ascontiguousarray(rec.digital[:, order]),
                                  leads=tuple(rec.leads[k] for k in order))  # fmt: skip
    return rec


def test_muse_reads_back_within_its_quantisation(tmp_path, rec, person):
    name = write_ecg(tmp_path, rec, "muse", person)
    assert name == "E000042.xml"
    raw = (tmp_path / name).read_bytes()
    assert raw.startswith(
        b'<?xml version="1.0" encoding="ISO-8859-1"?>\r\n<!DOCTYPE RestingECG SYSTEM "restecg.dtd">'
    )
    leads, fs = parse_muse(tmp_path / name)
    assert fs == rec.fs and tuple(leads) == MUSE_LEADS  # always I, II, V1-V6, whatever the record's order
    want = microvolts(rec)
    for lead in MUSE_LEADS:
        assert leads[lead].shape == want[lead].shape
        assert np.abs(leads[lead] - want[lead]).max() <= MUSE_UV_PER_BIT / 2 + 1e-9, lead
    # the four limb leads a reader derives agree with those the stored I and II imply, within 2 steps
    got, ref = derived_limb_leads(leads), derived_limb_leads(want)
    for lead in got:
        assert np.abs(got[lead] - ref[lead]).max() <= 2 * MUSE_UV_PER_BIT, lead
    median = [
        w
        for w in ET.parse(tmp_path / name).getroot().iter("Waveform")
        if w.findtext("WaveformType") == "Median"
    ]
    assert len(median) == 1
    assert {int(ld.findtext("LeadSampleCountTotal")) for ld in median[0].findall("LeadData")} == {
        MEDIAN_SAMPLES
    }


def test_hl7_reads_back_within_its_quantisation(tmp_path, rec, person):
    name = write_ecg(tmp_path, rec, "hl7", person)
    assert name == "E000042.xml"
    leads, fs, head = parse_hl7(tmp_path / name)
    assert fs == pytest.approx(rec.fs) and head == rec.when.strftime("%Y%m%d%H%M%S")
    assert tuple(leads) == rec.leads  # sequences follow the record's order, each labelled by its MDC code
    want = microvolts(rec)
    for lead in STANDARD_LEADS:
        assert np.abs(leads[lead] - want[lead]).max() <= HL7_UV_PER_DIGIT / 2 + 1e-9, lead
    beat = ET.parse(tmp_path / name).getroot().find("h:component/h:series/h:derivation/h:derivedSeries", HL7)
    assert beat.find("h:code", HL7).get("code") == "REPRESENTATIVE_BEAT"
    beat_digits = beat.findall(".//h:digits", HL7)
    assert len(beat_digits) == 12 and {len(d.text.split()) for d in beat_digits} == {MEDIAN_SAMPLES}


def test_dicom_reads_back_exactly(tmp_path, rec, person):
    name = write_ecg(tmp_path, rec, "dicom", person)
    assert name == "E000042.dcm"
    ds = pydicom.dcmread(tmp_path / name)
    assert ds.SOPClassUID == ECG_SOP_CLASS == ds.file_meta.MediaStorageSOPClassUID and ds.Modality == "ECG"
    wf = ds.WaveformSequence[0]
    assert wf.MultiplexGroupLabel == "RHYTHM" and wf.WaveformSampleInterpretation == "SS"
    assert wf.WaveformBitsAllocated == 16 and wf.NumberOfWaveformChannels == 12
    arr = ds.waveform_array(0)  # (T, 12) in uV
    assert arr.shape == rec.digital.shape and np.array_equal(arr, rec.digital.astype(np.float64))
    sources = [c.ChannelSourceSequence[0] for c in wf.ChannelDefinitionSequence]
    assert [s.CodeMeaning for s in sources] == [f"Lead {lead}" for lead in rec.leads]
    assert {s.CodingSchemeDesignator for s in sources} == {"SCPECG"}
    assert sources[rec.leads.index("I")].CodeValue == "5.6.3-9-1"
    assert sources[rec.leads.index("aVF")].CodeValue == "5.6.3-9-64"
    units = {c.ChannelSensitivityUnitsSequence[0].CodeValue for c in wf.ChannelDefinitionSequence}
    assert units == {"uV"} and ds.AcquisitionDateTime == rec.when.strftime("%Y%m%d%H%M%S")


@pytest.mark.parametrize("fmt", VENDOR)
def test_every_vendor_file_carries_identifiers(tmp_path, patient, person, fmt):
    rec = make_record(CFG, patient, "E000001", 1)
    path = tmp_path / write_ecg(tmp_path, rec, fmt, person)
    text = path.read_bytes().decode(
        "utf-8" if fmt == "hl7" else "latin-1"
    )  # MUSE, DICOM (ISO_IR 100): Latin-1
    birth = person.birth.strftime("%m-%d-%Y" if fmt == "muse" else "%Y%m%d")
    when = rec.when.strftime("%m-%d-%Y" if fmt == "muse" else "%Y%m%d")
    assert patient.name == f"{person.last}^{person.first}"
    for value in (
        person.first,
        person.last,
        person.patient_id,
        birth,
        person.physician_last,
        person.site,
        when,
    ):
        assert value in text, (fmt, value)
    assert any(ord(c) > 127 for c in person.site)  # the encodings are exercised
    staff = {person.physician_first, person.physician_last, person.tech_last}
    assert staff.isdisjoint({person.first, person.last})  # whose name survived de-identification is clear
    if fmt == "muse":
        assert person.site.encode("latin-1") in path.read_bytes()  # ISO-8859-1 as declared, not UTF-8
    if fmt == "dicom":
        ds = pydicom.dcmread(path)
        assert ds.InstitutionName == person.site and ds.PatientID == patient.patient_id
        assert (
            str(ds.PatientName) == patient.name
            and ds.ReferringPhysicianName.family_name == person.physician_last
        )


def test_writers_are_deterministic_and_reject_unknown_formats(tmp_path, patient, person):
    rec = make_record(CFG, patient, "E000003", 0)
    for fmt in VENDOR:
        a = (tmp_path / "a" / write_ecg(tmp_path / "a", rec, fmt, person)).read_bytes()
        b = (tmp_path / "b" / write_ecg(tmp_path / "b", rec, fmt, person)).read_bytes()
        assert a == b, fmt
    assert write_ecg(tmp_path / "w", rec, "wfdb", person) == "E000003"  # WFDB: the record name, no extension
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["E000003.dat", "E000003.hea"]
    for bad in ("mixed", "scp"):
        with pytest.raises(ValueError, match="ECG format"):
            write_ecg(tmp_path, rec, bad, person)
    with pytest.raises(ValueError, match="ecg_format"):
        SynthConfig(ecg_format="scp")
    assert [record_format("hl7", 0, n) for n in range(5)] == ["hl7"] * 5
    draws = [record_format("mixed", 0, n) for n in range(200)]
    assert draws == [record_format("mixed", 0, n) for n in range(200)] and set(draws) == set(RECORD_FORMATS)


def test_readers_of_the_platform_round_trip(tmp_path, patient, person):
    """Through stence.data.ecg_formats.read_ecg_file, where it exists (written alongside these writers)."""
    formats = pytest.importorskip("stence.data.ecg_formats")
    read_ecg_file = getattr(formats, "read_ecg_file", None)
    if read_ecg_file is None:
        pytest.skip("stence.data.ecg_formats.read_ecg_file is not there yet")
    from stence.data.limits import Limits

    rec = make_record(CFG, patient, "E000004", 0)
    stored = microvolts(rec)
    derived = {**stored, **derived_limb_leads(stored)}  # MUSE stores I, II, V1-V6: the other four follow I, II
    # worst case per format: MUSE's derived III carries two half steps of 4.88 uV; DICOM is exact
    tol = {"muse": MUSE_UV_PER_BIT, "hl7": HL7_UV_PER_DIGIT / 2, "dicom": 0.0}
    for fmt, tol_uv in tol.items():
        want = derived if fmt == "muse" else stored
        path = tmp_path / fmt / write_ecg(tmp_path / fmt, rec, fmt, person)
        got = read_ecg_file(path, STANDARD_LEADS, Limits())
        assert got.fs == pytest.approx(rec.fs) and got.signal.shape == (12, rec.digital.shape[0]), fmt
        for k, lead in enumerate(STANDARD_LEADS):
            assert np.abs(got.signal[k] * 1000.0 - want[lead]).max() <= tol_uv + 0.05, (fmt, lead)
        assert any(person.patient_id in str(v) for v in got.identifiers.values()), fmt


# --- whole cohorts ----------------------------------------------------------------------------------------


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def digests(root: Path, skip: tuple[str, ...]) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MARKER and not str(p.relative_to(root)).startswith(skip)
    }


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vendor")
    write_cohort(root / "wfdb", CFG)
    write_cohort(root / "mixed", dataclasses.replace(CFG, ecg_format="mixed"))
    return root / "wfdb", root / "mixed"


def test_mixed_export_writes_every_format(cohorts):
    _, mixed = cohorts
    ecgs = [e for p in load_truth(mixed)["patients"] for e in p["ecgs"]]
    assert {e["format"] for e in ecgs} == set(RECORD_FORMATS)
    index = read_csv(mixed / "ecg_index.csv")
    assert [r["record"] for r in index] == [e["record"] for e in ecgs]
    ext = {"wfdb": "", "muse": ".xml", "hl7": ".xml", "dicom": ".dcm"}
    for e in ecgs:
        assert Path(e["record"]).suffix == ext[e["format"]], e
        assert (mixed / (e["record"] + (".hea" if e["format"] == "wfdb" else ""))).is_file(), e
    names = {p.name for p in (mixed / "ecg").iterdir()}
    assert len(names) == len(ecgs) + sum(e["format"] == "wfdb" for e in ecgs)  # .hea + .dat, else one file


def test_mixed_export_equals_the_wfdb_export_but_for_files(cohorts):
    plain, mixed = cohorts
    a, b = load_truth(plain), load_truth(mixed)
    assert {**a["params"], "ecg_format": None} == {**b["params"], "ecg_format": None}

    def without_files(truth: dict) -> list[dict]:
        return [
            {**p, "ecgs": [{k: v for k, v in e.items() if k not in ("record", "format")} for e in p["ecgs"]]}
            for p in truth["patients"]
        ]

    assert without_files(a) == without_files(b)  # patients, dates, rates, studies, pairings, splits' inputs
    stem = [{**r, "record": r["record"].split(".")[0]} for r in read_csv(mixed / "ecg_index.csv")]
    assert stem == read_csv(plain / "ecg_index.csv")
    skip = ("ecg/", "ecg_index.csv", "synth_truth.json")
    assert digests(plain, skip) == digests(mixed, skip)  # angio, annotations untouched


def test_mixed_export_holds_the_wfdb_signals(cohorts):
    plain, mixed = cohorts
    steps = {"muse": MUSE_UV_PER_BIT / 2, "hl7": HL7_UV_PER_DIGIT / 2, "dicom": 0.0}
    for e in (e for p in load_truth(mixed)["patients"] for e in p["ecgs"]):
        ref = wfdb.rdrecord(str(plain / e["record"].split(".")[0]), physical=False)
        want = {lead: ref.d_signal[:, k].astype(np.float64) for k, lead in enumerate(ref.sig_name)}
        if e["format"] == "wfdb":
            for ext in (".hea", ".dat"):
                assert (mixed / (e["record"] + ext)).read_bytes() == (
                    plain / (e["record"] + ext)
                ).read_bytes()
            continue
        leads, fs = parse(mixed / e["record"], e["format"])
        assert fs == pytest.approx(ref.fs), e
        for lead, uv in leads.items():
            assert np.abs(uv - want[lead]).max() <= steps[e["format"]] + 1e-9, (e, lead)


# --- command line -------------------------------------------------------------------------------------------


def test_cli_writes_muse(tmp_path):
    out = tmp_path / "muse"
    assert main(["synth", str(out), "--size", "tiny", "--patients", "3", "--ecg-format", "muse"]) == 0
    index = read_csv(out / "ecg_index.csv")
    assert len(index) == 3 * CFG.ecgs_per_patient and all(r["record"].endswith(".xml") for r in index)
    assert sorted(p.name for p in (out / "ecg").iterdir()) == sorted(Path(r["record"]).name for r in index)
    for r in index:
        leads, _ = parse_muse(out / r["record"])
        assert tuple(leads) == MUSE_LEADS
    assert load_truth(out)["params"]["ecg_format"] == "muse"


def test_cli_rejects_an_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["synth", str(tmp_path / "x"), "--size", "tiny", "--ecg-format", "scp"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--ecg-format" in err and "invalid choice: 'scp'" in err and "mixed" in err
    assert not (tmp_path / "x").exists()
