"""Identifier collection and date parsing shared by the vendor readers.

Identifiers use the keys of `stence.data.wfdb_io` (`patient_id`, `name`, `dob`, `physician`, `operators`,
`institution`, `location`, `address`, `contact`, `accession_number`, `other_id`, `date_<field>`), plus
`free_text` for free-text order fields (reason for the test, comments) that may name a person. The first
value of a kind takes the plain key, later ones `<kind>_<field>`, then numbered (`wfdb_io._put`). They are
only read by the pseudonymiser and the leak scanner, so readers err on the side of collecting too much.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable

from stence.data.wfdb_io import _identifier_kind, _norm_key, _parse_sex, _put

_PLACEHOLDERS = {"unknown", "anonymized", "anonymised", "anonymous", "none", "n/a", "na", "null", "removed"}
_NO_VALUE = re.compile(r"[\s0:./-]*")  # "00:00:00", "0000-00-00", "0": no value, only noise as needles

# Word parts of a (normalised) field name -> the role of the person it names, tried in order.
_ROLES: tuple[tuple[str, str], ...] = (
    ("patient", "name"),
    ("subject", "name"),
    ("tech", "operators"),
    ("operator", "operators"),
    ("placer", "operators"),
    ("nurse", "operators"),
    ("md", "physician"),
    ("physician", "physician"),
    ("doctor", "physician"),
    ("overread", "physician"),
    ("editor", "physician"),
    ("attending", "physician"),
    ("referring", "physician"),
    ("ordering", "physician"),
    ("investigator", "physician"),
    ("confirm", "physician"),
)

# Free text that names the person who read, confirmed or signed the ECG ("Confirmed by Garg, R. M.D.").
PERSON_STATEMENT = re.compile(
    r"\b(?:confirmed|reviewed|read|over-?read|edited|signed|interpreted|verified|approved|reported|"
    r"acquired|ordered|requested|referred)\s+by\b|\bdr\.?\s+[a-z]|\bm\.?\s?d\.?(?:\W|$)",
    re.IGNORECASE,
)


def clean(value: object) -> str | None:
    """The value as a stripped string; None when empty, a placeholder or only zeros and separators."""
    v = str(value or "").strip()
    if not v or v.casefold() in _PLACEHOLDERS or _NO_VALUE.fullmatch(v):
        return None
    return v


def norm(key: str) -> str:
    """Field name casefolded, non-alphanumerics removed ("OrderingMDLastName" -> "orderingmdlastname")."""
    return _norm_key(key)


def role(key: str) -> str | None:
    """The identifier kind of the person a field name refers to ("orderingmd..." -> "physician")."""
    k = norm(key)
    return next((kind for stem, kind in _ROLES if stem in k), None)


def generic_kind(key: str) -> str | None:
    """The identifier kind `wfdb_io` gives a header comment key of this name, or None."""
    return _identifier_kind(norm(key))


def field_kind(key: str, kinds: dict[str, str]) -> str | None:
    """Identifier kind of a field: from the reader's table `kinds` (normalised names), else the role an
    ID field names ("OverreaderID" -> physician), else the `wfdb_io` rules; None when not identifying."""
    k = norm(key)
    return kinds.get(k) or (role(k) if k.endswith("id") else None) or generic_kind(k)


def add(ids: dict[str, str], kind: str, field: str, value: object) -> None:
    """Store `value` as an identifier of `kind` (found in `field`), unless empty or already stored.

    The first value of a kind is stored as `kind`, a later one as `kind_<field>` (numbered after that;
    numbered straight away when `field` is empty)."""
    v = clean(value)
    if v is None:
        return
    if any((k == kind or k.startswith(kind + "_")) and ids[k] == v for k in ids):
        return
    _put(ids, (kind, f"{kind}_{norm(field)}") if field else (kind,), v)


def add_date(ids: dict[str, str], field: str, value: object) -> None:
    """Store a date or time as written in the file under `date_<field>`."""
    v = clean(value)
    if v is not None and v not in ids.values():
        _put(ids, (f"date_{norm(field)}",), v)


def add_person(ids: dict[str, str], kind: str, field: str, parts: Iterable[object]) -> None:
    """Store a person's name parts (first, middle, last, ...) joined as the full name, then each part."""
    kept = [v for v in (clean(p) for p in parts) if v]
    if len(kept) > 1:
        add(ids, kind, field, " ".join(kept))
    for v in kept:
        add(ids, kind, field, v)


def parse_date(value: str, formats: Iterable[str]) -> dt.date | None:
    """The first of `formats` (strptime) that reads `value` fully, as a date; None otherwise."""
    v = value.strip()
    for fmt in formats:
        try:
            return dt.datetime.strptime(v, fmt).date()
        except ValueError:
            continue
    return None


def parse_time(value: str) -> str | None:
    """ "HH:MM:SS" from "09:03:32", "0903", "090332" or "09:03"; None when not a time of day."""
    m = re.fullmatch(r"(\d{1,2}):?(\d{2})(?::?(\d{2}))?(?:[.,]\d*)?", value.strip())
    if not m:
        return None
    h, mi, s = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    return f"{h:02d}:{mi:02d}:{s:02d}" if h < 24 and mi < 60 and s < 61 else None


def age_years(value: str, unit: str = "years") -> float | None:
    """Age in years from a number and its unit (years, months, weeks, days, hours; HL7 a, mo, wk, d)."""
    m = re.search(r"\d+(?:\.\d+)?", value or "")
    if not m:
        return None
    u = (unit or "years").strip().casefold()
    per_year = {"mo": 12.0, "wk": 52.1775, "d": 365.25, "h": 8766.0}
    for prefix, n in (("month", 12.0), ("week", 52.1775), ("day", 365.25), ("hour", 8766.0)):
        if u.startswith(prefix):
            return float(m.group()) / n
    return float(m.group()) / per_year.get(u, 1.0)


def age_at(dob: dt.date | None, day: dt.date | None) -> float | None:
    """Age in years on `day` of a person born on `dob`; None when either is unknown or out of order."""
    if dob is None or day is None or dob > day:
        return None
    return (day - dob).days / 365.25


def parse_sex(value: str) -> str | None:
    """ "M" / "F" from "MALE", "Female", "m", ...; None for other or unknown values."""
    return _parse_sex(value or "")
