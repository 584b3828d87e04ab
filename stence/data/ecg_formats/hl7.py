"""HL7 v3 annotated ECG (aECG, `<AnnotatedECG xmlns="urn:hl7-org:v3">`) -> `EcgRecord`.

The rhythm series (`component/series` with code RHYTHM) is read; its `derivation/derivedSeries`
(representative beats) never. In the series' first `sequenceSet`, the TIME_ABSOLUTE / TIME_RELATIVE
sequence (GLIST_TS / GLIST_PQ) gives the sample interval (`increment`, in s or ms) and each lead sequence
(MDC_ECG_LEAD_I ... MDC_ECG_LEAD_V6) an SLIST_PQ: physical = origin + scale x digit, in uV, mV or V.
Missing limb leads are derived from I and II. Identifiers: see `hl7_ids`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from xml.etree.ElementTree import Element

import numpy as np

from stence.data.ecg_formats import _ids
from stence.data.ecg_formats._leads import build_record, canonical_lead
from stence.data.ecg_formats._limits import check_extent, check_rate
from stence.data.ecg_formats._xml import child, children, local, parse_xml, text
from stence.data.ecg_formats.hl7_ids import identifiers
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord
from stence.errors import ECG_BAD_HEADER, ECG_BAD_WAVEFORM, BadInputError

_TO_MV = {"uv": 1e-3, "mv": 1.0, "v": 1e3, "nv": 1e-6}
_TO_S = {"s": 1.0, "ms": 1e-3, "us": 1e-6}
_LEAD_CODE = re.compile(r"MDC_ECG_LEAD_(\w+)", re.IGNORECASE)


def _quantity(elem: Element | None, units: dict[str, float], what: str) -> float:
    """value x unit factor of a PQ element (`<scale value="2.5" unit="uV"/>`)."""
    unit = ((elem.get("unit") if elem is not None else None) or "").casefold()
    try:
        value = float(elem.get("value", "")) if elem is not None else float("nan")
    except (ValueError, OverflowError):
        value = float("nan")
    if unit not in units or not np.isfinite(value):
        raise BadInputError(ECG_BAD_WAVEFORM, f"{what} missing, not a number, or in an unknown unit")
    return value * units[unit]


def _value(elem: Element | None, attr: str = "value") -> str:
    return (elem.get(attr) or "") if elem is not None else ""


def _code(elem: Element) -> str:
    return _value(child(elem, "code"), "code")


def _rhythm_sequences(root: Element) -> list[Element]:
    """The `sequence` elements of the first sequenceSet of the RHYTHM series."""
    series = [s for c in children(root, "component") if (s := child(c, "series")) is not None]
    for s in (s for s in series if _code(s).upper() == "RHYTHM"):
        sets = [ss for c in children(s, "component") if (ss := child(c, "sequenceSet")) is not None]
        if sets:
            return [q for c in children(sets[0], "component") if (q := child(c, "sequence")) is not None]
    raise BadInputError(ECG_BAD_WAVEFORM, "no rhythm series (component/series with code RHYTHM)")


def _leads(root: Element, limits: Limits) -> tuple[dict[str, np.ndarray], float]:
    seqs = _rhythm_sequences(root)
    time = next((s for s in seqs if _code(s).upper() in ("TIME_ABSOLUTE", "TIME_RELATIVE")), None)
    if time is None:
        raise BadInputError(ECG_BAD_HEADER, "rhythm series has no TIME_ABSOLUTE / TIME_RELATIVE sequence")
    step = _quantity(child(time, "value", "increment"), _TO_S, "sample increment")
    fs = 1.0 / step if step > 0 else float("inf")
    check_rate(fs, limits, f"increment {step:g} s")
    lead_seqs = [(m.group(1), s) for s in seqs if (m := _LEAD_CODE.fullmatch(_code(s)))]
    if not lead_seqs:
        raise BadInputError(ECG_BAD_WAVEFORM, "rhythm series has no lead sequences")
    digits = [(text(s, "value", "digits")).split() for _, s in lead_seqs]
    check_extent(fs, max(map(len, digits)), len(lead_seqs), limits)
    named: dict[str, np.ndarray] = {}
    for (code, seq), values in zip(lead_seqs, digits, strict=True):
        name = canonical_lead(code)
        value = child(seq, "value")
        origin = _quantity(child(value, "origin"), _TO_MV, f"lead {name}: origin")
        scale = _quantity(child(value, "scale"), _TO_MV, f"lead {name}: scale")
        if scale == 0:
            raise BadInputError(ECG_BAD_WAVEFORM, f"lead {name}: scale is zero")
        try:
            d = np.array(values, dtype=np.float64)  # (T,)
        except (ValueError, OverflowError):
            raise BadInputError(
                ECG_BAD_WAVEFORM, f"lead {name}: digits hold a value that is not a number"
            ) from None
        named.setdefault(name, origin + scale * d)
    return named, fs


def _meta(root: Element) -> dict[str, object]:
    """Age, sex and acquisition date/time (rhythm series effectiveTime, else the document's)."""
    person = next((e for e in root.iter() if local(e.tag) == "subjectDemographicPerson"), None)
    gender = child(person, "administrativeGenderCode")
    age = None
    for obs in (e for e in root.iter() if local(e.tag) == "relatedObservation"):
        code, value = child(obs, "code"), child(obs, "value")
        if code is not None and value is not None and code.get("code") == "21612-7":  # LOINC: reported age
            age = _ids.age_years(value.get("value", ""), value.get("unit", "a"))
    series = [s for c in children(root, "component") if (s := child(c, "series")) is not None]
    stamps = [_value(child(s, "effectiveTime", "low")) for s in series]
    stamps += [_value(child(root, "effectiveTime", name)) for name in ("low", "center")]
    stamp = next((s for s in stamps if s), "")
    m = re.match(r"(\d{8})(\d{4,6})?", stamp)
    day = _ids.parse_date(m.group(1), ("%Y%m%d",)) if m else None
    dob = _ids.parse_date(_value(child(person, "birthTime"))[:8], ("%Y%m%d",))
    return {
        "age": age if age is not None else _ids.age_at(dob, day),
        "sex": _ids.parse_sex(gender.get("code", "") if gender is not None else ""),
        "base_date": day,
        "acquisition_time": _ids.parse_time(m.group(2)) if m and m.group(2) else None,
    }


def read_hl7(path: Path, leads: Sequence[str], limits: Limits) -> EcgRecord:
    """Read an HL7 aECG file; see the module docstring."""
    root = parse_xml(path, limits)
    named, fs = _leads(root, limits)
    return build_record(named, fs, leads, "hl7", _meta(root), identifiers(root))
