"""WFDB ECG records -> (12, T) float32 mV in a requested lead order, plus metadata and raw identifiers.

Leads are selected by name (case-insensitive, whatever their order in the header); extra channels such as
Frank leads are ignored. Problems a user can act on raise `BadInputError` with a quarantine reason code.
Identifying header comments (name, patient ID, birth date, other dates, physicians, sites, addresses,
phone numbers, accession numbers) are returned separately in `identifiers` so that only the pseudonymiser
and the leak scanner ever look at them. Headers are checked against `Limits` (stence/data/wfdb_header.py)
before any sample is read.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import wfdb

from stence.config import STANDARD_LEADS
from stence.data import wfdb_speed
from stence.data.limits import Limits
from stence.data.wfdb_header import (
    check_extent,
    check_record_line,
    check_wfdb_agrees,
    frame_bits,
    length_from_first_file,
    parse_record_line,
    read_header_text,
    signals_in_files,
)
from stence.errors import (
    ECG_BAD_HEADER,
    ECG_FLAT_LEAD,
    ECG_MISSING_LEADS,
    ECG_MISSING_SIGNAL_FILE,
    ECG_NAN,
    ECG_TRUNCATED,
    BadInputError,
)

wfdb_speed.install()  # wfdb's header parsing without per-field pandas lookups (same results)

# Physical units -> factor to millivolts. WFDB's default when a header gives no units is mV.
_UNIT_TO_MV: dict[str, float] = {
    "": 1.0,
    "mv": 1.0,
    "millivolt": 1.0,
    "millivolts": 1.0,
    "uv": 1e-3,
    "\u00b5v": 1e-3,  # micro sign
    "\u03bcv": 1e-3,  # Greek mu
    "microvolt": 1e-3,
    "microvolts": 1e-3,
    "nv": 1e-6,
    "v": 1e3,
    "volt": 1e3,
    "volts": 1e3,
}

# Comment keys (casefolded, non-alphanumerics removed) that identify a person, a carer, a place or a visit
# -> identifier name. Names follow dicom_io.IDENTIFYING_KEYWORDS where one exists. Only "patient_id" is
# used as the patient key by ingest (when there is no ecg_index.csv): other numbers never go there.
_ID_GROUPS: dict[str, tuple[str, ...]] = {
    "name": ("name", "patientname", "patientsname", "fullname", "firstname", "lastname", "surname",
             "givenname", "familyname", "forename", "middlename", "maidenname", "birthname", "mothersname"),
    "patient_id": ("patient", "patientid", "patientnumber", "patientno", "patientidentifier", "pid", "id",
                   "mrn", "medicalrecordnumber", "medicalrecordno", "medicalrecord", "hospitalnumber",
                   "hospitalno", "hospitalid", "chartnumber"),
    "other_id": ("ssn", "socialsecuritynumber", "nhsnumber", "insurancenumber", "insuranceid",
                 "healthcardnumber", "nationalid", "passport"),
    "dob": ("dob", "birthdate", "dateofbirth", "birthday", "born"),
    "physician": ("physician", "doctor", "referringphysician", "orderingphysician", "attendingphysician",
                  "requestingphysician", "readingphysician", "performingphysician", "referringdoctor",
                  "referrer", "referredby", "orderedby", "requestedby", "cardiologist", "confirmedby",
                  "overreadby", "reviewedby", "editedby", "interpretedby", "readby", "signedby"),
    "operators": ("operator", "technician", "tech", "nurse", "acquiredby", "recordedby"),
    "institution": ("hospital", "institution", "site", "sitename", "hospitalname", "institutionname",
                    "clinic", "facility", "center", "centre"),
    "location": ("department", "ward", "location", "locationname", "room", "bed", "station", "stationname"),
    "address": ("address", "street", "city", "town", "zip", "zipcode", "postcode", "postalcode",
                "homeaddress", "patientaddress"),
    "contact": ("phone", "telephone", "tel", "phonenumber", "mobile", "cell", "fax", "email", "emailaddress"),
    "accession_number": ("accession", "accessionnumber", "accessionno", "orderid", "ordernumber", "orderno",
                         "requestid", "requestnumber", "encounter", "encounterid", "encounternumber",
                         "visit", "visitid", "visitnumber", "admissionid", "admissionnumber", "caseid",
                         "casenumber"),
}
_ID_KEYS: dict[str, str] = {key: ident for ident, keys in _ID_GROUPS.items() for key in keys}
# Word parts that make any longer key identifying ("Referring physician name", "Home phone"), tried in
# order after the exact table; "name" last, and not for things that are not people. ("hospital" is no stem:
# PTB writes "In hospital medication: ...".)
_ID_STEMS: tuple[tuple[str, str], ...] = (
    ("birth", "dob"), ("physician", "physician"), ("doctor", "physician"), ("technician", "operators"),
    ("operator", "operators"), ("institution", "institution"),
    ("address", "address"), ("phone", "contact"), ("email", "contact"), ("accession", "accession_number"),
    ("patientid", "patient_id"), ("mrn", "patient_id"), ("name", "name"),
)
_NOT_PERSON = ("device", "lead", "file", "signal", "test", "protocol", "software", "program", "cart", "model",
               "drug", "medication", "diagnos", "dx", "record", "study", "filter")
_MONTH = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
          r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?")
_DATE_RE = re.compile(
    r"\b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}(?!\d)"  # 2020-05-06, 06/05/2020, 2020-05-06T10:32 (no \b before T)
    rf"|\b\d{{1,2}}(?:st|nd|rd|th)?[-/ .]{_MONTH}[-/ .,]*\d{{2,4}}\b"  # 6-May-2020, 06 March 2020
    rf"|\b{_MONTH} \d{{1,2}}(?:st|nd|rd|th)?,? \d{{4}}\b",  # May 6, 2020
    re.IGNORECASE,
)
_PAIR_RE = re.compile(r"<([^<>]+)>\s*:?\s*([^<]*)")  # "<age>: 60 <sex>: M" (older PhysioNet headers)
_KV_RE = re.compile(r"^\s*([^:=]{1,60}?)\s*[:=]\s*(.*)$")  # "Key: value" or "Key = value"
_PLACEHOLDERS = {"unknown", "anonymized", "anonymised", "anonymous", "none", "n/a", "na", "null", "removed"}
_MALE = {"m", "male", "man", "masculine"}
_FEMALE = {"f", "female", "w", "woman", "feminine"}


@dataclass
class EcgRecord:
    """One decoded ECG. `identifiers` holds raw identifying values: only the pseudonymiser may read them."""

    signal: np.ndarray = field(repr=False)  # (12, T) float32 mV, rows in the requested lead order
    fs: float
    leads: tuple[str, ...]
    meta: dict[str, Any]  # age, sex, base_date, n_samples_orig, fs_orig, comments_kept, signal_files
    identifiers: dict[str, str] = field(default_factory=dict, repr=False)


def _norm_lead(name: str) -> str:
    return name.strip().casefold()


def _norm_key(key: str) -> str:
    return re.sub(r"[^0-9a-z]", "", key.casefold())


def _record_base(path: str | Path) -> Path:
    p = Path(path)
    return p.with_suffix("") if p.suffix.lower() == ".hea" else p


def _parse_age(value: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", value)
    return float(m.group()) if m else None


def _parse_sex(value: str) -> str | None:
    words = value.strip().casefold().split()
    if not words:
        return None
    if words[0] in _MALE:
        return "M"
    if words[0] in _FEMALE:
        return "F"
    return None


def _identifier_kind(key: str) -> str | None:
    """Identifier name for a normalised comment key ("referringphysician" -> "physician"), else None."""
    if key in _ID_KEYS:
        return _ID_KEYS[key]
    for stem, kind in _ID_STEMS:
        if stem in key and not (kind == "name" and any(w in key for w in _NOT_PERSON)):
            return kind
    return None


def _put(ids: dict[str, str], names: Sequence[str], value: str) -> None:
    """Store `value` under the first free name of `names` (then numbered): a second value of a kind must
    not replace the first, since the leak scanner looks for every one of them."""
    for name in names:
        if name not in ids:
            ids[name] = value
            return
    n = 2
    while f"{names[-1]}_{n}" in ids:
        n += 1
    ids[f"{names[-1]}_{n}"] = value


def parse_comments(comments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Header comment lines -> ({age, sex, comments_kept}, identifiers).

    Identifying lines (name, patient ID / MRN, other ID numbers, birth date, physician / operator,
    institution / location, address, phone / e-mail, accession / visit number; see `_ID_GROUPS`) and
    any line carrying a date go to `identifiers`; everything else (e.g. `Dx: ...`) is kept verbatim in
    `comments_kept`. Lines are `Key: value`, `Key = value` or `<key>: value <key>: value`.
    """
    age: float | None = None
    sex: str | None = None
    kept: list[str] = []
    ids: dict[str, str] = {}
    for raw in comments:
        line = raw.strip()
        if not line:
            continue
        pairs = _PAIR_RE.findall(line) if line.startswith("<") else []
        if not pairs:
            m = _KV_RE.match(line)
            pairs = [(m.group(1), m.group(2))] if m else [("", line)]
        identifying = False
        for key, value in pairs:
            k, v = _norm_key(key), value.strip()
            kind = _identifier_kind(k) if k else None
            if kind:  # first of a kind wins the plain name; later ones (an MRN after an ID) get their own
                if v and v.casefold() not in _PLACEHOLDERS:
                    _put(ids, (kind, f"{kind}_{k}"), v)
                identifying = True
            elif ("date" in k and re.search(r"\d", v)) or _DATE_RE.search(v):
                _put(ids, (f"date_{k or len(ids)}",), v)
                identifying = True
            elif k == "age" and age is None:
                age = _parse_age(v)
            elif k in ("sex", "gender") and sex is None:
                sex = _parse_sex(v)
        if not identifying:
            kept.append(line)
    return {"age": age, "sex": sex, "comments_kept": kept}, ids


def _read_header(base: Path, limits: Limits) -> wfdb.Record:
    """The parsed header, after its size, signal count and sampling rate passed the limits.

    The text is checked before wfdb parses it (wfdb's cost grows with the signal lines), and wfdb's
    reading of the rate and length is compared with the text's (its regex misreads some numbers).
    """
    hea = base.parent / (base.name + ".hea")
    if not hea.is_file():
        raise BadInputError(ECG_BAD_HEADER, f"header file {hea.name} not found")
    line = parse_record_line(read_header_text(hea, limits))
    check_record_line(line, limits)
    try:
        header = wfdb.rdheader(str(base))
    except Exception as e:  # wfdb raises a mix of ValueError/IndexError/TypeError on malformed headers
        raise BadInputError(
            ECG_BAD_HEADER, f"{hea.name}: cannot parse header ({type(e).__name__}: {e})"
        ) from e
    if isinstance(header, wfdb.MultiRecord):
        raise BadInputError(ECG_BAD_HEADER, f"{hea.name}: multi-segment records are not supported")
    if not header.n_sig or not header.fs or header.fs <= 0 or not header.sig_name or not header.file_name:
        raise BadInputError(ECG_BAD_HEADER, f"{hea.name}: no signals, no sampling rate or no signal files")
    check_wfdb_agrees(header, line)
    return header


def _select_channels(header: wfdb.Record, leads: Sequence[str]) -> list[int]:
    """Channel index of each requested lead (first occurrence if a name repeats)."""
    index: dict[str, int] = {}
    for i, name in enumerate(header.sig_name):
        index.setdefault(_norm_lead(name or ""), i)
    missing = [lead for lead in leads if _norm_lead(lead) not in index]
    if missing:
        raise BadInputError(
            ECG_MISSING_LEADS,
            f"missing lead(s) {', '.join(missing)}; header has {', '.join(map(str, header.sig_name))}",
        )
    return [index[_norm_lead(lead)] for lead in leads]


def _check_signal_files(base: Path, header: wfdb.Record, channels: Sequence[int], n: int) -> None:
    """Each signal file holding a selected channel exists and is long enough for `n` samples.

    wfdb may read a short file without complaint (or fail with an opaque reshape error), so the size is
    checked against the header before reading.
    """
    for fname, in_file in signals_in_files(header, channels).items():
        path = base.parent / fname
        if fname == "~" or not path.is_file():
            raise BadInputError(
                ECG_MISSING_SIGNAL_FILE, f"signal file {fname} named in the header is missing"
            )
        bits = frame_bits(header, in_file)
        if bits is None:  # compressed: checked after reading
            continue
        offset = (header.byte_offset[in_file[0]] if header.byte_offset else None) or 0
        need = offset + int(n * bits // 8)
        have = path.stat().st_size
        if have < need:
            raise BadInputError(
                ECG_TRUNCATED, f"signal file {fname} has {have} bytes; {n} samples need {need}"
            )


def _units_to_mv(header: wfdb.Record, channels: Sequence[int]) -> np.ndarray:
    units = header.units or [""] * header.n_sig
    factors = []
    for c in channels:
        u = (units[c] or "").strip().casefold()
        if u not in _UNIT_TO_MV:
            raise BadInputError(
                ECG_BAD_HEADER, f"lead {header.sig_name[c]}: unknown physical unit {units[c]!r}"
            )
        factors.append(_UNIT_TO_MV[u])
    return np.asarray(factors, dtype=np.float64)


def _bounded_length(base: Path, header: wfdb.Record, channels: Sequence[int], limits: Limits) -> int:
    """Samples per signal wfdb will read, checked against the duration and decoded-size limits first.

    With a length in the header the check needs no signal file (a 10 h header is refused even when its
    files are absent); without one the length is inferred from the first signal file's size, as wfdb does.
    """
    n = int(header.sig_len or 0)
    if n:
        check_extent(header, channels, n, limits)
    else:
        n = length_from_first_file(base, header)
        check_extent(header, channels, n, limits)
    _check_signal_files(base, header, channels, n)
    return n


def read_ecg(path: str | Path, leads: Sequence[str] = STANDARD_LEADS, limits: Limits = Limits()) -> EcgRecord:
    """Read a WFDB record (path of the .hea, with or without extension) as (len(leads), T) float32 mV.

    Rows follow `leads`; NaN (invalid samples) stays NaN. Before any sample is read, the header is checked
    against `limits` (size, signals, sampling rate, duration, decoded size), so peak memory is bounded by
    the limits, not by the file. Raises `BadInputError` with FILE_OVER_LIMIT, ECG_BAD_HEADER (also for an
    implausible sampling rate), ECG_MISSING_LEADS, ECG_MISSING_SIGNAL_FILE or ECG_TRUNCATED.
    """
    base = _record_base(path)
    header = _read_header(base, limits)
    channels = _select_channels(header, leads)
    n = _bounded_length(base, header, channels, limits)
    to_mv = _units_to_mv(header, channels)
    order = sorted(set(channels))
    try:  # wfdb reads header.sig_len samples, or infers the n checked above (it refuses sampto without one)
        rec = wfdb.rdrecord(str(base), channels=order, physical=True)
    except Exception as e:  # the files exist and are long enough, so the header misdescribes them
        raise BadInputError(
            ECG_BAD_HEADER,
            f"{base.name}: signal files do not decode as the header says ({type(e).__name__}: {e})",
        ) from e
    p = rec.p_signal
    if p is None or p.ndim != 2 or p.shape[0] == 0 or p.shape[0] < n:
        got = 0 if p is None else p.shape[0]
        raise BadInputError(ECG_TRUNCATED, f"{base.name}: read {got} samples, header says {n}")
    cols = [order.index(c) for c in channels]
    sig = (p[:, cols].T * to_mv[:, None]).astype(np.float32)  # (T, n_read) -> (len(leads), T)
    meta, identifiers = parse_comments(header.comments or [])
    base_date = header.base_date if isinstance(header.base_date, dt.date) else None
    meta.update(base_date=base_date, n_samples_orig=int(sig.shape[1]), fs_orig=float(header.fs),
                signal_files=sorted({f for f in header.file_name if f and f != "~"}))
    return EcgRecord(signal=sig, fs=float(header.fs), leads=tuple(leads), meta=meta, identifiers=identifiers)


def validate_signal(
    sig: np.ndarray,
    min_valid_fraction: float,
    leads: Sequence[str] = STANDARD_LEADS,
    flat_std: float = 1e-3,
) -> None:
    """Reject a (n_leads, T) signal with too little finite data per lead (ECG_NAN) or a flat lead.

    A lead counts as flat (ECG_FLAT_LEAD) when the standard deviation of its finite samples is below
    `flat_std` (mV; real leads have tens to hundreds of µV).
    """
    finite = np.isfinite(sig)
    frac = finite.mean(axis=1) if sig.shape[1] else np.zeros(sig.shape[0])
    bad = [leads[i] for i in np.flatnonzero(frac < min_valid_fraction)]
    if bad:
        raise BadInputError(
            ECG_NAN,
            f"lead(s) {', '.join(bad)} have less than {min_valid_fraction:.0%} finite samples "
            f"(overall {finite.mean():.1%})",
        )
    stds = np.array([np.std(row[ok]) for row, ok in zip(sig, finite, strict=True)])
    flat = [leads[i] for i in np.flatnonzero(stds < flat_std)]
    if flat:
        raise BadInputError(ECG_FLAT_LEAD, f"flat lead(s) {', '.join(flat)} (std < {flat_std} mV)")
