"""ECG file writers of the synthetic cohort: WFDB and three hospital formats, one record per file.

`write_ecg(ecg_dir, rec, fmt, person)` writes an `EcgRecord` (digital (T, n_leads) int16 at ECG_GAIN
units per mV, i.e. 1 uV per unit) as

- "wfdb": `<name>.hea` + `<name>.dat`, format 16 (identifiers in the header comments);
- "muse": `<name>.xml`, GE MUSE RestingECG XML, ISO-8859-1, 8 stored leads (I, II, V1-V6) at 4.88 uV/bit;
- "hl7": `<name>.xml`, HL7 aECG (urn:hl7-org:v3), 12 SLIST_PQ sequences at 2.5 uV per digit;
- "dicom": `<name>.dcm`, DICOM 12-lead ECG Waveform Storage, 12 interleaved int16 channels at 1 uV.

Each vendor file carries the identifiers a hospital export does (patient name, MRN, date of birth, an
ordering physician, the site, the acquisition date and time), so ingest must de-identify them. Lead labels
follow the record's (possibly shuffled) lead order. Files carry no creation timestamps and all ids derive
from the record, so the same record gives the same bytes.
"""

from __future__ import annotations

import base64
import datetime as dt
import uuid
import xml.etree.ElementTree as ET
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import wfdb
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from stence.data.synth_dicom import make_uid
from stence.data.synth_records import FIRST_NAMES_F, FIRST_NAMES_M, LAST_NAMES, EcgRecord, Patient

ECG_GAIN = 1000.0  # digital units per mV (format 16: +/- 32.7 mV), i.e. 1 uV per unit
RECORD_FORMATS = ("wfdb", "muse", "hl7", "dicom")  # what one record is written as
ECG_FORMATS = (*RECORD_FORMATS, "mixed")  # SynthConfig.ecg_format: "mixed" draws one per record
MUSE_LEADS = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")  # MUSE stores 8; readers derive the rest
MUSE_UV_PER_BIT = 4.88
HL7_UV_PER_DIGIT = 2.5
MEDIAN_SAMPLES = 600  # representative beat length (MUSE's Median waveform, HL7's derivedSeries)
ECG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.9.1.1"  # 12-lead ECG Waveform Storage
SCPECG_CODES = {  # SCP-ECG lead codes used by DICOM channel sources
    "I": "5.6.3-9-1", "II": "5.6.3-9-2", "V1": "5.6.3-9-3", "V2": "5.6.3-9-4", "V3": "5.6.3-9-5",
    "V4": "5.6.3-9-6", "V5": "5.6.3-9-7", "V6": "5.6.3-9-8", "III": "5.6.3-9-61", "aVR": "5.6.3-9-62",
    "aVL": "5.6.3-9-63", "aVF": "5.6.3-9-64",
}  # fmt: skip
SITES = ("Klinikum Süd", "Herzzentrum Östermalm", "Universitätsklinik Nordhavn")  # non-ASCII on purpose
LOCATIONS = ("Kardiologie Ambulanz", "Station 4B", "Notaufnahme")
_S_FORMAT = 11  # random stream of the "mixed" draw (synth.py uses 1-5, synth_corrupt 9)
_HL7_NS, _XSI_NS = "urn:hl7-org:v3", "http://www.w3.org/2001/XMLSchema-instance"
_MDC, _ACT = "2.16.840.1.113883.6.24", "2.16.840.1.113883.5.4"  # code systems: MDC, HL7 ActCode
_ORG_OID = "2.16.840.1.113883.3.999"  # the synthetic site's id root


@dataclass(frozen=True)
class Person:
    """The identifiers a vendor file carries: the patient, the ordering physician and the site."""

    first: str
    last: str
    patient_id: str  # the MRN that ecg_index.csv uses
    birth: dt.date
    sex: str  # "F" or "M"
    physician_first: str  # ordering / referring physician
    physician_last: str
    site: str  # institution
    location: str  # ward
    tech_last: str  # acquisition technician


def person_for(p: Patient) -> Person:
    """p's identifiers, with a physician, site and technician drawn deterministically from p.index (the staff
    never share a name part with the patient, so a test can tell whose name survived de-identification)."""
    last, first = p.name.split("^")
    i = p.index

    def pick(names: tuple[str, ...], k: int, avoid: str) -> str:
        return next(n for j in range(len(names)) if (n := names[(k + j) % len(names)]) != avoid)

    return Person(
        first=first, last=last, patient_id=p.patient_id, birth=p.birth, sex=p.sex,
        physician_first=pick(FIRST_NAMES_F + FIRST_NAMES_M, 7 * i + 3, first), physician_last=pick(LAST_NAMES, 5 * i + 11, last),
        site=SITES[i % len(SITES)], location=LOCATIONS[i % len(LOCATIONS)], tech_last=pick(LAST_NAMES, 3 * i + 1, last),
    )  # fmt: skip


def age_on(birth: dt.date, on: dt.date) -> int:
    """Age in whole years on a date."""
    return on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))


def record_format(ecg_format: str, seed: int, n_record: int) -> str:
    """The format record number n_record is written in; "mixed" draws from its own stream (seeded)."""
    if ecg_format != "mixed":
        return ecg_format
    rng = np.random.default_rng([seed, _S_FORMAT, n_record])  # keyed like synth.rng_for
    return RECORD_FORMATS[int(rng.integers(len(RECORD_FORMATS)))]


def write_ecg(ecg_dir: Path, rec: EcgRecord, fmt: str, person: Person) -> str:
    """Write rec under ecg_dir in one of RECORD_FORMATS; returns the file name relative to ecg_dir
    (WFDB: the record name without extension, as ecg_index.csv names WFDB records)."""
    ecg_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "wfdb":
        write_record(ecg_dir, rec)
        return rec.name
    writers = {"muse": (write_muse, ".xml"), "hl7": (write_hl7, ".xml"), "dicom": (write_dicom_ecg, ".dcm")}
    if fmt not in writers:
        raise ValueError(f"ECG format {fmt!r}: use one of {RECORD_FORMATS}")
    writer, ext = writers[fmt]
    writer(ecg_dir / f"{rec.name}{ext}", rec, person)
    return f"{rec.name}{ext}"


# --- WFDB ---------------------------------------------------------------------------------------------


def write_record(ecg_dir: Path, rec: EcgRecord) -> None:
    """Write one WFDB record: format 16, gain ECG_GAIN per mV, units mV, comments in the header.

    The bytes are exactly what `wfdb.wrsamp` writes for the same record (a test checks this); writing
    them directly avoids wrsamp's per-field validation, which costs ~0.15 s per record.
    """
    ecg_dir.mkdir(parents=True, exist_ok=True)
    digital = np.ascontiguousarray(rec.digital, dtype="<i2")  # (T, n_leads)
    n_samples, n_sig = digital.shape
    checksum = digital.sum(axis=0, dtype=np.int64) % 65536
    when = rec.when.strftime("%H:%M:%S %d/%m/%Y")
    lines = [f"{rec.name} {n_sig} {rec.fs} {n_samples} {when}"]
    lines += [
        f"{rec.name}.dat 16 {ECG_GAIN}(0)/mV 16 0 {int(digital[0, k])} {int(checksum[k])} 0 {lead}"
        for k, lead in enumerate(rec.leads)
    ]
    lines += [f"# {c}" for c in rec.comments]
    (ecg_dir / f"{rec.name}.hea").write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    (ecg_dir / f"{rec.name}.dat").write_bytes(digital.tobytes())


def write_record_wfdb(ecg_dir: Path, rec: EcgRecord) -> None:
    """The same record written by `wfdb.wrsamp` (reference for `write_record`; slow)."""
    ecg_dir.mkdir(parents=True, exist_ok=True)
    n = len(rec.leads)
    wfdb.wrsamp(
        rec.name, fs=rec.fs, units=["mV"] * n, sig_name=list(rec.leads), d_signal=rec.digital,
        fmt=["16"] * n, adc_gain=[ECG_GAIN] * n, baseline=[0] * n, comments=list(rec.comments),
        base_date=rec.when.date(), base_time=rec.when.time(), write_dir=str(ecg_dir),
    )  # fmt: skip


# --- shared helpers -----------------------------------------------------------------------------------


def _leads_uv(rec: EcgRecord, leads: tuple[str, ...]) -> np.ndarray:
    """The named leads of rec in microvolts, (T, n_leads) int16 -> (T, len(leads)) float64."""
    missing = [lead for lead in leads if lead not in rec.leads]
    if missing:
        raise ValueError(f"record {rec.name} lacks leads {missing}")
    idx = [rec.leads.index(lead) for lead in leads]
    return rec.digital[:, idx].astype(np.float64) * (1000.0 / ECG_GAIN)


def _quantise(uv: np.ndarray, step_uv: float) -> np.ndarray:
    """Microvolts -> int16 counts of step_uv, rounded to nearest (the format's quantisation)."""
    return np.clip(np.rint(uv / step_uv), -32768, 32767).astype(np.int16)


def _median_beat(uv: np.ndarray) -> np.ndarray:
    """A crude representative beat: the sample-wise median of consecutive windows, (T, n) -> (600, n)."""
    n_win = uv.shape[0] // MEDIAN_SAMPLES
    if n_win == 0:
        return np.pad(uv, ((0, MEDIAN_SAMPLES - uv.shape[0]), (0, 0)))
    windows = uv[: n_win * MEDIAN_SAMPLES].reshape(n_win, MEDIAN_SAMPLES, uv.shape[1])  # (W, 600, n)
    return np.median(windows, axis=0)


def _sub(parent: ET.Element, path: str, text: object = None, **attrs: str) -> ET.Element:
    """Append the elements of `path` ("a/b/c"), each inside the previous; returns the innermost."""
    for tag in path.split("/"):
        parent = ET.SubElement(parent, tag)
    parent.attrib.update(attrs)
    if text is not None:
        parent.text = str(text)
    return parent


def _fields(parent: ET.Element, tag: str, items: list[tuple[str, object]]) -> None:
    """A MUSE-style block: <tag> with one text child per (name, value)."""
    block = _sub(parent, tag)
    for name, value in items:
        _sub(block, name, value)


def _site_number(person: Person) -> int:
    return SITES.index(person.site) + 1 if person.site in SITES else 1


def _xml_text(root: ET.Element, prologue: str, indent: str) -> str:
    ET.indent(root, space=indent)
    return prologue + ET.tostring(root, encoding="unicode") + "\n"


# --- GE MUSE RestingECG XML ---------------------------------------------------------------------------


def write_muse(path: Path, rec: EcgRecord, person: Person) -> None:
    """GE MUSE RestingECG XML (ISO-8859-1, CRLF): demographics, a Median and a Rhythm waveform of 8 leads."""
    bits = _quantise(_leads_uv(rec, MUSE_LEADS), MUSE_UV_PER_BIT)  # (T, 8) int16 at 4.88 uV/bit
    root = ET.Element("RestingECG")
    _fields(root, "MuseInfo", [("MuseVersion", "9.0.10.18530")])
    _fields(root, "PatientDemographics", [
        ("PatientID", person.patient_id), ("PatientAge", age_on(person.birth, rec.when.date())),
        ("AgeUnits", "YEARS"), ("DateofBirth", person.birth.strftime("%m-%d-%Y")),
        ("Gender", "FEMALE" if person.sex == "F" else "MALE"),
        ("PatientLastName", person.last), ("PatientFirstName", person.first),
    ])  # fmt: skip
    _fields(root, "TestDemographics", [
        ("DataType", "RESTING"), ("Site", _site_number(person)),
        ("SiteName", person.site), ("AcquisitionDevice", "MAC5500"), ("Status", "CONFIRMED"),
        ("Location", 3), ("LocationName", person.location),
        ("AcquisitionTime", rec.when.strftime("%H:%M:%S")), ("AcquisitionDate", rec.when.strftime("%m-%d-%Y")),
        ("OrderingMDLastName", person.physician_last), ("OrderingMDFirstName", person.physician_first),
        ("AcquisitionTechLastName", person.tech_last),
    ])  # fmt: skip
    median = _quantise(_median_beat(bits.astype(np.float64)), 1.0)  # (600, 8), already in bits
    root.append(_muse_waveform("Median", 500, median))
    root.append(_muse_waveform("Rhythm", rec.fs, bits))
    prologue = '<?xml version="1.0" encoding="ISO-8859-1"?>\n<!DOCTYPE RestingECG SYSTEM "restecg.dtd">\n'
    text = _xml_text(root, prologue, "   ").replace("\n", "\r\n")
    path.write_bytes(text.encode("iso-8859-1", errors="xmlcharrefreplace"))


def _muse_waveform(kind: str, fs: int, bits: np.ndarray) -> ET.Element:
    """One <Waveform> of 8 <LeadData> blocks, bits (T, 8) int16, base64 wrapped at 68 columns as MUSE does."""
    wf = ET.Element("Waveform")
    for name, value in [
        ("WaveformType", kind), ("WaveformStartTime", 0), ("NumberofLeads", len(MUSE_LEADS)),
        ("SampleType", "CONTINUOUS_SAMPLES"), ("SampleBase", fs), ("SampleExponent", 0),
        ("HighPassFilter", 16), ("LowPassFilter", 150), ("ACFilter", "NONE"),
    ]:  # fmt: skip
        _sub(wf, name, value)
    for k, lead in enumerate(MUSE_LEADS):
        raw = np.ascontiguousarray(bits[:, k], dtype="<i2").tobytes()
        b64 = base64.b64encode(raw).decode("ascii")
        wrapped = "\n" + "\n".join(b64[i : i + 68] for i in range(0, len(b64), 68)) + "\n" + " " * 9
        _fields(wf, "LeadData", [
            ("LeadByteCountTotal", len(raw)), ("LeadTimeOffset", 0), ("LeadSampleCountTotal", bits.shape[0]),
            ("LeadAmplitudeUnitsPerBit", MUSE_UV_PER_BIT), ("LeadAmplitudeUnits", "MICROVOLTS"),
            ("LeadHighLimit", 32767), ("LeadLowLimit", -32768), ("LeadID", lead), ("LeadOffsetFirstSample", 0),
            ("FirstSampleBaseline", 0), ("LeadSampleSize", 2), ("LeadOff", "FALSE"), ("BaselineSway", "FALSE"),
            ("LeadDataCRC32", zlib.crc32(raw)), ("WaveFormData", wrapped),
        ])  # fmt: skip
    return wf


# --- HL7 aECG -----------------------------------------------------------------------------------------


def write_hl7(path: Path, rec: EcgRecord, person: Person) -> None:
    """HL7 aECG (UTF-8): subject, site and investigator; a RHYTHM series of 12 leads at 2.5 uV per digit,
    with a REPRESENTATIVE_BEAT derivedSeries that readers must skip."""
    ids = [
        str(uuid.uuid5(uuid.NAMESPACE_OID, f"stence-synth/hl7/{person.patient_id}/{rec.name}/{k}"))
        for k in range(3)
    ]
    start = rec.when.strftime("%Y%m%d%H%M%S")
    end = (rec.when + dt.timedelta(seconds=rec.digital.shape[0] / rec.fs)).strftime("%Y%m%d%H%M%S")
    root = ET.Element("AnnotatedECG", {"xmlns": _HL7_NS, "xmlns:xsi": _XSI_NS, "type": "Observation"})
    _sub(root, "id", root=ids[0])
    _sub(root, "code", code="93000", codeSystem="2.16.840.1.113883.6.12", codeSystemName="CPT-4")
    _sub(root, "effectiveTime/center", value=start)
    assignment = _sub(root, "componentOf/timepointEvent/componentOf/subjectAssignment")
    subject = _sub(assignment, "subject/trialSubject")
    _sub(subject, "id", root=_ORG_OID, extension=person.patient_id)
    demographics = _sub(subject, "subjectDemographicPerson")
    _hl7_name(demographics, person.first, person.last)
    _sub(demographics, "administrativeGenderCode", code=person.sex, codeSystem="2.16.840.1.113883.5.1")
    _sub(demographics, "birthTime", value=person.birth.strftime("%Y%m%d"))
    trial = _sub(assignment, "componentOf/clinicalTrial")
    _sub(trial, "id", root=_ORG_OID, extension="STENCE-SYNTH")
    site = _sub(trial, "location/trialSite")
    _sub(site, "id", root=_ORG_OID, extension=f"SITE-{_site_number(person)}")
    _sub(site, "location/name", person.site)
    _hl7_name(_sub(trial, "responsibleParty/trialInvestigator/investigatorPerson"),
              person.physician_first, person.physician_last)  # fmt: skip

    series = _sub(root, "component/series")
    _sub(series, "id", root=ids[1])
    _sub(series, "code", code="RHYTHM", codeSystem=_ACT, codeSystemName="ActCode")
    span = _sub(series, "effectiveTime")
    _sub(span, "low", value=start, inclusive="true")
    _sub(span, "high", value=end, inclusive="false")
    uv = _leads_uv(rec, rec.leads)  # (T, 12) in the record's own lead order
    _hl7_sequences(series, "TIME_ABSOLUTE", "GLIST_TS", {"value": start}, rec.fs, rec.leads, uv)
    beat = _sub(series, "derivation/derivedSeries")
    _sub(beat, "id", root=ids[2])
    _sub(beat, "code", code="REPRESENTATIVE_BEAT", codeSystem=_ACT, codeSystemName="ActCode")
    _hl7_sequences(
        beat, "TIME_RELATIVE", "GLIST_PQ", {"value": "0", "unit": "s"}, rec.fs, rec.leads, _median_beat(uv)
    )
    path.write_bytes(_xml_text(root, '<?xml version="1.0" encoding="UTF-8"?>\n', "  ").encode("utf-8"))


def _hl7_name(parent: ET.Element, given: str, family: str) -> None:
    name = _sub(parent, "name")
    _sub(name, "given", given)
    _sub(name, "family", family)


def _hl7_sequences(
    parent: ET.Element, time_code: str, time_type: str, head: dict[str, str], fs: int,
    leads: tuple[str, ...], uv: np.ndarray,
) -> None:  # fmt: skip
    """component/sequenceSet: a time sequence, then one SLIST_PQ per lead of uv (T, n_leads) microvolts."""
    seq_set = _sub(parent, "component/sequenceSet")
    time = _sub(seq_set, "component/sequence")
    _sub(time, "code", code=time_code, codeSystem=_ACT, codeSystemName="ActCode")
    value = _sub(time, "value", **{"xsi:type": time_type})
    _sub(value, "head", **head)
    _sub(value, "increment", value=f"{1 / fs:.10g}", unit="s")
    digits = _quantise(uv, HL7_UV_PER_DIGIT)  # (T, n_leads)
    for k, lead in enumerate(leads):
        seq = _sub(seq_set, "component/sequence")
        _sub(seq, "code", code=f"MDC_ECG_LEAD_{lead.upper()}", codeSystem=_MDC, codeSystemName="MDC")
        value = _sub(seq, "value", **{"xsi:type": "SLIST_PQ"})
        _sub(value, "origin", value="0", unit="uV")
        _sub(value, "scale", value=f"{HL7_UV_PER_DIGIT:g}", unit="uV")
        col = digits[:, k].tolist()
        _sub(value, "digits", "\n".join(" ".join(map(str, col[i : i + 25])) for i in range(0, len(col), 25)))


# --- DICOM 12-lead ECG --------------------------------------------------------------------------------


def write_dicom_ecg(path: Path, rec: EcgRecord, person: Person) -> None:
    """DICOM 12-lead ECG Waveform Storage: one RHYTHM multiplex group of int16 channels at 1 uV per unit."""
    key = (person.patient_id, rec.name)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = ECG_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = make_uid("ecg", "sop", *key)
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 100"  # Latin-1: the site names have umlauts
    ds.SOPClassUID, ds.SOPInstanceUID = ECG_SOP_CLASS, fm.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.ContentDate = rec.when.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = rec.when.strftime("%H%M%S")
    ds.AcquisitionDateTime = rec.when.strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = f"{zlib.crc32('/'.join(key).encode()) % 10**10:010d}"
    ds.Modality = "ECG"
    ds.Manufacturer = "StenCE synthetic"
    ds.InstitutionName = person.site
    ds.ReferringPhysicianName = f"{person.physician_last}^{person.physician_first}"
    ds.PatientName = f"{person.last}^{person.first}"
    ds.PatientID = person.patient_id
    ds.PatientBirthDate = person.birth.strftime("%Y%m%d")
    ds.PatientSex = person.sex
    ds.PatientAge = f"{age_on(person.birth, rec.when.date()):03d}Y"
    ds.StudyInstanceUID = make_uid("ecg", "study", *key)
    ds.SeriesInstanceUID = make_uid("ecg", "series", *key)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.WaveformSequence = [_dicom_multiplex(rec)]
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _dicom_multiplex(rec: EcgRecord) -> Dataset:
    """The RHYTHM multiplex group: channels in the record's lead order, each labelled by its SCP-ECG code."""
    wf = Dataset()
    wf.MultiplexGroupTimeOffset, wf.TriggerTimeOffset = 0, 0
    wf.WaveformOriginality = "ORIGINAL"
    wf.NumberOfWaveformChannels = len(rec.leads)
    wf.NumberOfWaveformSamples = rec.digital.shape[0]
    wf.SamplingFrequency = rec.fs
    wf.MultiplexGroupLabel = "RHYTHM"
    channels = []
    for lead in rec.leads:
        ch, src, unit = Dataset(), Dataset(), Dataset()
        src.CodeValue, src.CodeMeaning = SCPECG_CODES[lead], f"Lead {lead}"
        src.CodingSchemeDesignator = "SCPECG"
        unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "uV", "UCUM", "microvolt"
        ch.ChannelSourceSequence = [src]
        ch.ChannelSensitivity = 1000.0 / ECG_GAIN  # uV per unit
        ch.ChannelSensitivityUnitsSequence = [unit]
        ch.ChannelSensitivityCorrectionFactor, ch.ChannelBaseline, ch.ChannelSampleSkew = 1, 0, 0
        ch.WaveformBitsStored = 16
        channels.append(ch)
    wf.ChannelDefinitionSequence = channels
    wf.WaveformBitsAllocated = 16
    wf.WaveformSampleInterpretation = "SS"
    interleaved = np.ascontiguousarray(rec.digital, dtype="<i2")  # (T, 12): sample-major, channels inside
    wf.add_new(0x54001010, "OW", interleaved.tobytes())  # WaveformData
    return wf


__all__ = [
    "ECG_FORMATS",
    "ECG_GAIN",
    "MUSE_LEADS",
    "Person",
    "RECORD_FORMATS",
    "age_on",
    "person_for",
    "record_format",
    "write_dicom_ecg",
    "write_ecg",
    "write_hl7",
    "write_muse",
    "write_record",
    "write_record_wfdb",
]
