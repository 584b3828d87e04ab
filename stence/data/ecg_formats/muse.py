"""GE MUSE XML exports (`<RestingECG>`) -> `EcgRecord`.

The rhythm waveform (`WaveformType` Rhythm, 10 s) is read, never the median beat. Each `LeadData` holds
little-endian int16 samples in base64 (`WaveFormData`, line-wrapped), `LeadAmplitudeUnitsPerBit` in
`LeadAmplitudeUnits` (MICROVOLTS / MILLIVOLTS), `LeadSampleCountTotal` and `LeadDataCRC32` (the zlib
CRC-32 of the decoded bytes, checked when present); the rate is `SampleBase` x 10^`SampleExponent`. MUSE
stores 8 leads (I, II, V1-V6): III, aVR, aVL and aVF are derived. Identifiers come from the patient, test
and order blocks (people, places, IDs, dates, order text) and from diagnosis statements naming a person.
"""

from __future__ import annotations

import base64
import binascii
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from stence.data.ecg_formats import _ids
from stence.data.ecg_formats._leads import build_record, canonical_lead
from stence.data.ecg_formats._limits import check_extent, check_rate
from stence.data.ecg_formats._xml import children, local, parse_xml, text, walk
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord
from stence.errors import ECG_BAD_HEADER, ECG_BAD_WAVEFORM, BadInputError

_UNIT_TO_MV = {
    "microvolts": 1e-3,
    "microvolt": 1e-3,
    "uv": 1e-3,
    "millivolts": 1.0,
    "millivolt": 1.0,
    "mv": 1.0,
}
_ID_BLOCKS = ("PatientDemographics", "TestDemographics", "Order")
_NAME_PART = re.compile(r"(?i)(last|first|middle)name$")
# Fields (normalised) that are not identifiers although a generic rule would say so.
_NOT_IDS = frozenset(
    (
        "patientage ageunits gender race heightcm weightkg heightin weightlbs datatype status "
        "editliststatus priority acquisitiondevice cartnumber acquisitionsoftwareversion "
        "analysissoftwareversion hisstatus histesttype hisdisposition"
    ).split()
)
# Fields (normalised) -> identifier kind, where the name alone does not tell.
_KINDS = {
    "patientid": "patient_id",
    "site": "institution",
    "sitename": "institution",
    "location": "location",
    "locationname": "location",
    "roomid": "location",
    "hislocation": "location",
    "requisitionnumber": "accession_number",
    "hisaccountnumber": "accession_number",
    "admitnumber": "accession_number",
    "ordernumber": "accession_number",
    "testreason": "free_text",
    "reasonfortest": "free_text",
    "ordercomment": "free_text",
    "comments": "free_text",
    "secondaryid": "other_id",
    "pharmauniqueecgid": "other_id",
}


def _rate(waveform: Element) -> float:
    base, exp = text(waveform, "SampleBase"), text(waveform, "SampleExponent") or "0"
    try:
        fs = float(base) * 10.0 ** int(exp)
    except (ValueError, OverflowError):
        raise BadInputError(ECG_BAD_HEADER, "SampleBase / SampleExponent is not a number") from None
    return fs


def _lead(ld: Element, n: int) -> tuple[str, np.ndarray]:
    """(lead name, (n,) float64 mV) of one LeadData, its base64, length, CRC and scale checked."""
    name = canonical_lead(text(ld, "LeadID"))
    raw = re.sub(r"\s+", "", text(ld, "WaveFormData"))
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise BadInputError(ECG_BAD_WAVEFORM, f"lead {name}: WaveFormData is not valid base64") from None
    if len(data) != 2 * n:
        raise BadInputError(ECG_BAD_WAVEFORM, f"lead {name}: {len(data) // 2} samples, the file says {n}")
    crc = text(ld, "LeadDataCRC32")
    if crc.isdigit() and int(crc) != zlib.crc32(data):
        raise BadInputError(ECG_BAD_WAVEFORM, f"lead {name}: CRC-32 does not match (corrupted data)")
    unit = text(ld, "LeadAmplitudeUnits").casefold() or "microvolts"
    try:
        per_bit = float(text(ld, "LeadAmplitudeUnitsPerBit") or "nan")
    except ValueError:
        per_bit = float("nan")
    if unit not in _UNIT_TO_MV or not np.isfinite(per_bit) or per_bit <= 0:
        raise BadInputError(ECG_BAD_WAVEFORM, f"lead {name}: no usable amplitude scale (units per bit, unit)")
    return name, np.frombuffer(data, dtype="<i2").astype(np.float64) * (per_bit * _UNIT_TO_MV[unit])


def _rhythm_leads(root: Element, limits: Limits) -> tuple[dict[str, np.ndarray], float]:
    rhythm = [w for w in children(root, "Waveform") if text(w, "WaveformType").casefold() == "rhythm"]
    if not rhythm:
        raise BadInputError(
            ECG_BAD_WAVEFORM, "no Waveform of WaveformType Rhythm (median beats are not read)"
        )
    wf = rhythm[0]
    fs = _rate(wf)
    check_rate(fs, limits)
    lead_data = children(wf, "LeadData")
    counts = [text(ld, "LeadSampleCountTotal") for ld in lead_data]
    if not lead_data or not all(c.isdigit() for c in counts):
        raise BadInputError(ECG_BAD_WAVEFORM, "rhythm waveform without leads or sample counts")
    check_extent(fs, max(map(int, counts)), len(lead_data), limits)
    named: dict[str, np.ndarray] = {}
    for ld, n in zip(lead_data, counts, strict=True):
        name, mv = _lead(ld, int(n))
        named.setdefault(name, mv)
    return named, fs


def _person_kind(prefix: str) -> str:
    """Kind of the person (or place) whose name parts start with `prefix` ("OrderingMD" -> physician)."""
    k = _ids.norm(prefix)
    if role := _ids.role(k):
        return role
    return "institution" if "site" in k else "location" if "location" in k or "room" in k else "name"


def _identifiers(root: Element) -> dict[str, str]:
    ids: dict[str, str] = {}
    _ids.add(ids, "patient_id", "PatientID", text(root, "PatientDemographics", "PatientID"))
    for block in (b for name in _ID_BLOCKS for b in children(root, name)):
        people: dict[str, list[str]] = {}  # name prefix ("OrderingMD") -> [first, middle, last]
        for elem, _ in walk(block):
            tag, value = local(elem.tag), (elem.text or "").strip()
            k = _ids.norm(tag)
            if not value or k in _NOT_IDS or len(elem):
                continue
            if part := _NAME_PART.search(tag):
                slot = ("first", "middle", "last").index(part.group(1).lower())
                people.setdefault(tag[: part.start()], ["", "", ""])[slot] = value
            elif k == "dateofbirth":
                _ids.add(ids, "dob", tag, value)
            elif k.endswith(("date", "time")):
                _ids.add_date(ids, tag, value)
            elif kind := _ids.field_kind(tag, _KINDS):
                _ids.add(ids, kind, tag, value)
        for prefix, parts in people.items():
            _ids.add_person(ids, _person_kind(prefix), prefix + "Name", parts)
    for stmt in root.iter("StmtText"):  # diagnosis text is kept out, unless it names a person
        if _ids.PERSON_STATEMENT.search(stmt.text or ""):
            _ids.add(ids, "physician", "statement", stmt.text)
    for elem in root.iter("PharmaUniqueECGID"):
        _ids.add(ids, "other_id", "PharmaUniqueECGID", elem.text)
    return ids


def _meta(root: Element) -> dict[str, object]:
    pd, td = "PatientDemographics", "TestDemographics"
    formats = ("%m-%d-%Y", "%m/%d/%Y", "%Y-%m-%d")
    day = _ids.parse_date(text(root, td, "AcquisitionDate"), formats)
    age = text(root, pd, "PatientAge")
    return {
        "age": _ids.age_years(age, text(root, pd, "AgeUnits"))
        if age
        else _ids.age_at(_ids.parse_date(text(root, pd, "DateofBirth"), formats), day),
        "sex": _ids.parse_sex(text(root, pd, "Gender")),
        "base_date": day,
        "acquisition_time": _ids.parse_time(text(root, td, "AcquisitionTime")),
    }


def read_muse(path: Path, leads: Sequence[str], limits: Limits) -> EcgRecord:
    """Read a GE MUSE XML export; see the module docstring."""
    root = parse_xml(path, limits)
    named, fs = _rhythm_leads(root, limits)
    return build_record(named, fs, leads, "muse", _meta(root), _identifiers(root))
