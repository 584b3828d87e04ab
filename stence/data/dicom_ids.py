"""Identifying values in a DICOM header, for the pseudonymiser and the leak scan (never for outputs).

`identifiers(ds)` walks the whole dataset, nested sequences included (to a bounded depth), and returns
every value that can name or date a person or a site: the well-known keywords under stable names
(`patient_id`, `patient_name`, ...; ingest pairs views with ECGs on `identifiers["patient_id"]`), every
other element whose VR holds names, IDs, dates, times or free text (PN, LO, SH, DA, TM, DT, LT, ST, UT, UC)
under `tag_<Keyword>` (or `tag_gggg,eeee` without a keyword), and every private element's text (vendors
put names and IDs there). The leak scan searches the platform's outputs for all of these values, so a
value missed here is a leak that cannot be detected. UIDs (VR UI) are not included: ingest handles them
itself. Numeric VRs (angles, frame time, rows, columns: what the platform writes) are never included.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName

from stence.errors import DICOM_UNREADABLE, BadInputError

# Header keywords that identify a person or a site (after DICOM PS3.15 Basic Profile) -> identifier name.
# Only top-level elements get these names: a PatientID nested in a sequence (e.g. Other Patient IDs
# Sequence) must not replace the patient the view is paired on.
IDENTIFYING_KEYWORDS: dict[str, str] = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "birth_date",
    "OtherPatientIDs": "other_patient_ids",
    "OtherPatientNames": "other_patient_names",
    "PatientBirthName": "patient_birth_name",
    "PatientMotherBirthName": "patient_mother_birth_name",
    "PatientAddress": "patient_address",
    "PatientTelephoneNumbers": "patient_telephone",
    "MedicalRecordLocator": "medical_record_locator",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "AccessionNumber": "accession_number",
    "InstitutionName": "institution",
    "InstitutionAddress": "institution_address",
    "InstitutionalDepartmentName": "department",
    "ReferringPhysicianName": "referring_physician",
    "PerformingPhysicianName": "performing_physician",
    "PhysiciansOfRecord": "physicians_of_record",
    "NameOfPhysiciansReadingStudy": "reading_physician",
    "OperatorsName": "operators",
    "RequestingPhysician": "requesting_physician",
    "StationName": "station_name",
    "DeviceSerialNumber": "device_serial_number",
}

# VRs whose values are names, IDs, dates, times or free text (DICOM PS3.5 6.2).
IDENTIFYING_VRS = frozenset({"PN", "LO", "SH", "DA", "TM", "DT", "LT", "ST", "UT", "UC"})

# Values that say "nothing here": not identifiers, and useless (even harmful) as leak-scan needles.
_PLACEHOLDERS = {"unknown", "anonymized", "anonymised", "anonymous", "none", "n/a", "na", "null", "removed"}

MAX_DEPTH = 8  # sequence nesting followed; real headers nest 2-4 deep, a crafted one could nest thousands
MAX_VALUES = 10_000  # identifying values in one header; real ones have tens (each becomes a leak-scan needle)
_MAX_PRIVATE_BYTES = 1 << 16  # a longer private byte value is a binary blob (a vendor table), not text


def identifiers(ds: Dataset, name: str = "") -> dict[str, str]:
    """Every identifying value in `ds` -> {key: value}; one entry per value of a multi-valued element.

    Repeated names (a keyword in several sequence items, a second value) get a suffix: `tag_X`, `tag_X_2`.
    Raises `BadInputError(DICOM_UNREADABLE)` past MAX_VALUES values (a crafted header, not a real one).
    """
    out: dict[str, str] = {}
    seen: dict[str, int] = {}  # values per name so far: the same keyword again (another item, value)
    for key, value in _walk(ds, depth=0):
        if len(out) >= MAX_VALUES:
            raise BadInputError(
                DICOM_UNREADABLE,
                f"{name}: more than {MAX_VALUES} identifying header values: not a plausible header",
            )
        n = seen[key] = seen.get(key, 0) + 1
        out[key if n == 1 else f"{key}_{n}"] = value
    return out


def _walk(ds: Dataset, depth: int) -> Iterator[tuple[str, str]]:
    """(name, value) for the identifying elements of `ds` and of its sequences, depth first.

    An element is converted only when it may hold identifiers or items (decided from its tag and VR):
    converting every value of a large header would cost more than the whole rest of reading it.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = raw.VR or dictionary_vr(tag)  # a raw element of an implicit-VR file has no VR of its own
        name = _name(BaseTag(tag), vr, top_level=depth == 0)
        if vr != "SQ" and name is None:
            continue
        elem = _element(ds, tag)
        if elem is None:
            continue
        if elem.VR == "SQ":  # also a private sequence of an implicit-VR file, found on conversion
            if depth < MAX_DEPTH:
                for item in elem.value or ():
                    yield from _walk(item, depth + 1)
        elif name is not None:
            for value in _values(elem):
                yield name, value


def _element(ds: Dataset, tag: BaseTag) -> DataElement | RawDataElement | None:
    """The element at `tag`; its raw (undecoded) form when its value cannot be converted.

    A malformed value must not hide the element from the leak scan, nor crash the reader.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid values are expected in crafted headers
            return ds[tag]
    except Exception:
        try:
            return ds.get_item(tag)
        except Exception:
            return None


def _name(tag: BaseTag, vr: str, top_level: bool) -> str | None:
    """The identifier name of the element `tag` of VR `vr`, or None when it holds no identifying value."""
    if vr == "UI":
        return None  # UIDs: ingest collects and pseudonymises them itself
    if tag.is_private:
        # Private creator elements (gggg,0010-00FF) name a vendor's dictionary ("GEMS_ACQU_01"),
        # not a person; as needles they would only raise false leak alarms.
        return None if tag.is_private_creator else f"tag_{tag.group:04x},{tag.element:04x}"
    keyword = keyword_for_tag(tag)
    if top_level and keyword in IDENTIFYING_KEYWORDS:
        return IDENTIFYING_KEYWORDS[keyword]
    if vr in IDENTIFYING_VRS or keyword in IDENTIFYING_KEYWORDS:
        return f"tag_{keyword}" if keyword else f"tag_{tag.group:04x},{tag.element:04x}"
    return None


def dictionary_vr(tag: BaseTag) -> str:
    """The VR the DICOM dictionary gives `tag` ("" for unknown tags)."""
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _values(elem: DataElement | RawDataElement) -> Iterator[str]:
    """The text values of `elem`, multi-valued elements split; placeholders and empty values skipped."""
    raw: Any = elem.value
    items = list(raw) if isinstance(raw, (MultiValue, list, tuple)) else [raw]
    for item in items:
        if isinstance(item, (bytes, bytearray)):
            # undecoded (private VR UN, or a value pydicom could not convert): DICOM text is
            # backslash-separated; keep it only if it reads as text
            for part in _bytes_text(bytes(item)):
                if _meaningful(part):
                    yield part
        elif isinstance(item, (str, PersonName)):
            text = str(item).strip(" \x00")
            if _meaningful(text):
                yield text
        # numbers (private US/FL/DS values) and nested datasets are not text: skipped


def _bytes_text(data: bytes) -> list[str]:
    """Printable latin-1 text of a byte value, split at backslashes; [] for binary data."""
    if len(data) > _MAX_PRIVATE_BYTES:
        return []
    text = data.decode("latin-1").strip(" \x00")
    if not text or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return []
    return [p.strip(" \x00") for p in text.split("\\")]


def _meaningful(text: str) -> bool:
    """False for empty values, empty person names ("^^^^") and placeholders such as "Anonymized"."""
    bare = text.replace("^", "").replace("\\", "").strip()
    return bool(bare) and bare.casefold() not in _PLACEHOLDERS
