"""DICOM ECG waveforms (12-lead and General ECG Waveform Storage) -> `EcgRecord`.

The header is read through `BudgetedFile` (bounded element count) with large values deferred, so the
waveform bytes are read only after the chosen multiplex group passed the limits. The group is the one
labelled RHYTHM, else the longest with at least 12 channels (median beats are never preferred). Channels
are named from `ChannelSourceSequence` (code meaning "Lead I (Einthoven)" ..., or the SCP-ECG / MDC code
value); pydicom's `waveform_array` applies sensitivity, correction factor and baseline; the sensitivity
unit (uV / mV / V) converts to mV. Identifiers: `stence.data.dicom_ids` over the header (the waveform
sequence excluded), with the usual keywords renamed to the keys of `stence.data.wfdb_io` and person names
also split into their parts and joined as "Given Family".
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from stence.data.dicom_checks import BudgetedFile, HeaderTooLarge, as_float, check_file_size
from stence.data.dicom_ids import identifiers as dicom_identifiers
from stence.data.ecg_formats import _ids
from stence.data.ecg_formats._leads import build_record, canonical_lead
from stence.data.ecg_formats._limits import check_extent
from stence.data.ecg_formats.detect import DICOM_ECG_SOP_CLASSES
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord
from stence.errors import (
    DICOM_UNREADABLE,
    ECG_BAD_HEADER,
    ECG_BAD_WAVEFORM,
    ECG_UNSUPPORTED_FORMAT,
    FILE_OVER_LIMIT,
    BadInputError,
)

WAVEFORM_SEQUENCE = 0x54000100
_UNIT_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
# SCP-ECG ("5.6.3-9-<n>") and MDC ("2:<n>") lead code numbers (DICOM CID 3001) -> lead.
_LEAD_NUMBERS = {
    1: "I",
    2: "II",
    61: "III",
    62: "aVR",
    63: "aVL",
    64: "aVF",
    3: "V1",
    4: "V2",
    5: "V3",
    6: "V4",
    7: "V5",
    8: "V6",
}
_MEANING = re.compile(r"^\s*(?:lead\s+)?([a-z]+\d*)\b", re.IGNORECASE)
# Elements of coded entries (units, measurement names, lead codes): vocabulary, never about the patient;
# as leak-scan needles ("milliseconds", "QRS Duration") they would only raise false alarms.
_VOCABULARY = {
    "tag_CodeValue",
    "tag_CodingSchemeDesignator",
    "tag_CodingSchemeVersion",
    "tag_CodeMeaning",
    "tag_LongCodeValue",
    "tag_URNCodeValue",
    "tag_ContextIdentifier",
    "tag_MappingResource",
}
# dicom_ids names -> wfdb_io identifier kinds
_KINDS = {
    "patient_name": "name",
    "birth_date": "dob",
    "other_patient_ids": "other_id",
    "other_patient_names": "name",
    "patient_birth_name": "name",
    "patient_mother_birth_name": "name",
    "patient_address": "address",
    "patient_telephone": "contact",
    "institution_address": "address",
    "department": "location",
    "station_name": "location",
    "referring_physician": "physician",
    "performing_physician": "physician",
    "physicians_of_record": "physician",
    "reading_physician": "physician",
    "requesting_physician": "physician",
}


def _lead_name(channel: Dataset) -> str:
    """Standard lead name of a channel definition item ("Lead I (Einthoven)" -> "I", "2:64" -> "aVF")."""
    source = (channel.get("ChannelSourceSequence") or [Dataset()])[0]
    value = str(source.get("CodeValue", "") or "")
    if m := re.fullmatch(r"(?:5\.6\.3-9-|2:|MDC_ECG_LEAD_)(\w+)", value.strip(), re.IGNORECASE):
        number = m.group(1)
        return _LEAD_NUMBERS.get(int(number), number) if number.isdigit() else canonical_lead(number)
    m = _MEANING.match(str(source.get("CodeMeaning", "") or ""))
    return canonical_lead(m.group(1)) if m else value or "?"


def _pick(ds: Dataset) -> int:
    """Index of the rhythm multiplex group (see the module docstring)."""
    groups = list(ds.get("WaveformSequence") or [])
    if not groups:
        raise BadInputError(ECG_BAD_WAVEFORM, "no WaveformSequence")
    labels = [str(g.get("MultiplexGroupLabel", "") or "").upper() for g in groups]
    rhythm = [i for i, label in enumerate(labels) if "RHYTHM" in label]
    if rhythm:
        return rhythm[0]

    def duration(i: int) -> float:
        fs = as_float(groups[i].get("SamplingFrequency")) or 0.0
        return (as_float(groups[i].get("NumberOfWaveformSamples")) or 0.0) / fs if fs > 0 else 0.0

    wide = [i for i, g in enumerate(groups) if (as_float(g.get("NumberOfWaveformChannels")) or 0) >= 12]
    return max(wide or range(len(groups)), key=duration)


def _leads(ds: Dataset, limits: Limits) -> tuple[dict[str, np.ndarray], float]:
    index = _pick(ds)
    group = ds.WaveformSequence[index]
    fs = as_float(group.get("SamplingFrequency"))
    n, c = as_float(group.get("NumberOfWaveformSamples")), as_float(group.get("NumberOfWaveformChannels"))
    if fs is None or n is None or c is None or not n.is_integer() or not c.is_integer():
        raise BadInputError(ECG_BAD_HEADER, "sampling frequency, sample or channel count missing")
    check_extent(fs, int(n), int(c), limits)
    channels = list(group.get("ChannelDefinitionSequence") or [])
    if len(channels) != int(c):
        raise BadInputError(ECG_BAD_WAVEFORM, f"{len(channels)} channel definitions for {int(c)} channels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.waveform_array(index)  # (T, C) in the sensitivity units
    except Exception as e:  # pydicom: missing elements, data shorter than declared, unknown sample type
        raise BadInputError(
            ECG_BAD_WAVEFORM, f"waveform data cannot be decoded ({type(e).__name__})"
        ) from None
    named: dict[str, np.ndarray] = {}
    for j, ch in enumerate(channels):
        units = (ch.get("ChannelSensitivityUnitsSequence") or [Dataset()])[0]
        unit = str(units.get("CodeValue", "") or "").strip().casefold()
        if "ChannelSensitivity" not in ch or unit not in _UNIT_TO_MV:
            raise BadInputError(ECG_BAD_WAVEFORM, f"channel {j + 1}: no sensitivity in uV, mV or V")
        named.setdefault(_lead_name(ch), arr[:, j].astype(np.float64) * _UNIT_TO_MV[unit])
    return named, fs


def _identifiers(ds: Dataset, name: str) -> dict[str, str]:
    header = Dataset({tag: ds.get_item(tag) for tag in ds.keys() if tag != WAVEFORM_SEQUENCE})
    ids: dict[str, str] = {}
    _ids.add(ids, "patient_id", "PatientID", ds.get("PatientID"))
    for key, value in dicom_identifiers(header, name).items():
        base = re.sub(r"_\d+$", "", key)
        if base in _VOCABULARY:
            continue
        if base.startswith("tag_") and re.search(r"(Date|Time|DateTime)$", base):
            _ids.add_date(ids, base[4:], value)
            continue
        # a well-known keyword under its wfdb_io kind; any other text element numbered under its own name
        kind, field = (base, "") if base.startswith("tag_") else (_KINDS.get(base, base), base)
        _ids.add(ids, kind, field, value)
        for group in value.split("=") if "^" in value else ():  # a person name, per representation
            family, given, middle, prefix, suffix = [*group.split("^"), "", "", "", ""][:5]
            _ids.add_person(ids, kind, field, [prefix, given, middle, family, suffix])
    return ids


def _meta(ds: Dataset) -> dict[str, object]:
    stamp = str(ds.get("AcquisitionDateTime", "") or "")
    date = stamp[:8] or str(ds.get("ContentDate", "") or ds.get("StudyDate", "") or "")
    time = stamp[8:14] or str(ds.get("ContentTime", "") or ds.get("StudyTime", "") or "")
    age = str(ds.get("PatientAge", "") or "")
    units = {"D": "days", "W": "weeks", "M": "months", "Y": "years"}
    day = _ids.parse_date(date, ("%Y%m%d",))
    dob = _ids.parse_date(str(ds.get("PatientBirthDate", "") or ""), ("%Y%m%d",))
    return {
        "age": _ids.age_years(age, units.get(age[-1:].upper(), "years")) if age else _ids.age_at(dob, day),
        "sex": _ids.parse_sex(str(ds.get("PatientSex", "") or "")),
        "base_date": day,
        "acquisition_time": _ids.parse_time(time[:6]) if time else None,
    }


def read_dicom_ecg(path: Path, leads: Sequence[str], limits: Limits) -> EcgRecord:
    """Read a DICOM ECG waveform file; see the module docstring.

    The file is bounded by `limits.max_decoded_bytes` (as DICOM XA files are): a long waveform is not
    header text, so `max_header_bytes` does not apply.
    """
    check_file_size(path, limits)
    try:
        with BudgetedFile(path) as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh, defer_size="64 KB", stop_before_pixels=True)
            sop = str(ds.get("SOPClassUID", "") or "")
            if sop not in DICOM_ECG_SOP_CLASSES:
                raise BadInputError(
                    ECG_UNSUPPORTED_FORMAT, f"DICOM SOP class {sop[:64]!r} is not an ECG waveform"
                )
            named, fs = _leads(ds, limits)  # inside the `with`: the deferred waveform is read from `fh`
            ids, meta = _identifiers(ds, path.name), _meta(ds)
    except BadInputError:
        raise
    except HeaderTooLarge as e:
        raise BadInputError(FILE_OVER_LIMIT, f"DICOM header: {e}") from None
    except Exception as e:  # pydicom's errors on a broken file are of many types
        raise BadInputError(DICOM_UNREADABLE, f"not a readable DICOM file ({type(e).__name__})") from None
    return build_record(named, fs, leads, "dicom", meta, ids)
