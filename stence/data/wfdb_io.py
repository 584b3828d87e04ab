"""WFDB ECG records -> (12, T) float32 mV in a requested lead order, plus metadata and raw identifiers.

Leads are selected by name (case-insensitive, whatever their order in the header); extra channels such as
Frank leads are ignored. Problems a user can act on raise `BadInputError` with a quarantine reason code.
Identifying header comments (name, patient ID, birth date, other dates) are returned separately in
`identifiers` so that only the pseudonymiser ever looks at them.
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
from stence.errors import (
    ECG_BAD_HEADER,
    ECG_FLAT_LEAD,
    ECG_MISSING_LEADS,
    ECG_MISSING_SIGNAL_FILE,
    ECG_NAN,
    ECG_TRUNCATED,
    BadInputError,
)

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

# Bits per sample of the WFDB storage formats with a fixed size (FLAC formats 508/516/524 are compressed
# and cannot be size-checked up front; they are checked after reading).
_FMT_BITS: dict[str, float] = {
    "8": 8,
    "16": 16,
    "24": 24,
    "32": 32,
    "61": 16,
    "80": 8,
    "160": 16,
    "212": 12,
    "310": 32 / 3,
    "311": 32 / 3,
}

# Comment keys (casefolded, non-alphanumerics removed) that identify a person -> identifier name.
_ID_KEYS: dict[str, str] = {
    "name": "name",
    "patientname": "name",
    "patient": "patient_id",
    "patientid": "patient_id",
    "id": "patient_id",
    "mrn": "patient_id",
    "medicalrecordnumber": "patient_id",
    "dob": "dob",
    "birthdate": "dob",
    "dateofbirth": "dob",
}
_DATE_RE = re.compile(r"\b\d{1,4}[./-]\d{1,2}[./-]\d{1,4}\b|\b\d{1,2}[-/ ][A-Za-z]{3}[-/ ]\d{2,4}\b")
_PAIR_RE = re.compile(r"<([^<>]+)>\s*:?\s*([^<]*)")  # "<age>: 60 <sex>: M" (older PhysioNet headers)
_KV_RE = re.compile(r"^\s*([^:]{1,60}?)\s*:\s*(.*)$")
_PLACEHOLDERS = {"unknown", "anonymized", "anonymised", "anonymous", "none", "n/a", "na", "null", "removed"}
_MALE = {"m", "male", "man", "masculine"}
_FEMALE = {"f", "female", "w", "woman", "feminine"}


@dataclass
class EcgRecord:
    """One decoded ECG. `identifiers` holds raw identifying values: only the pseudonymiser may read them."""

    signal: np.ndarray = field(repr=False)  # (12, T) float32 mV, rows in the requested lead order
    fs: float
    leads: tuple[str, ...]
    meta: dict[str, Any]  # age, sex, base_date, n_samples_orig, fs_orig, comments_kept
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


def parse_comments(comments: Sequence[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Header comment lines -> ({age, sex, comments_kept}, identifiers).

    Identifying lines (name, patient ID / MRN, birth date) and any line carrying a date go to
    `identifiers`; everything else (e.g. `Dx: ...`) is kept verbatim in `comments_kept`.
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
            if k in _ID_KEYS:
                name = _ID_KEYS[k]  # first of a kind wins; later ones (an MRN after an ID) get their own key
                if v and v.casefold() not in _PLACEHOLDERS:
                    ids[name if name not in ids else f"{name}_{k}"] = v
                identifying = True
            elif ("date" in k and re.search(r"\d", v)) or _DATE_RE.search(v):
                ids[f"date_{k or len(ids)}"] = v
                identifying = True
            elif k == "age" and age is None:
                age = _parse_age(v)
            elif k in ("sex", "gender") and sex is None:
                sex = _parse_sex(v)
        if not identifying:
            kept.append(line)
    return {"age": age, "sex": sex, "comments_kept": kept}, ids


def _read_header(base: Path) -> wfdb.Record:
    hea = base.parent / (base.name + ".hea")
    if not hea.is_file():
        raise BadInputError(ECG_BAD_HEADER, f"header file {hea.name} not found")
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


def _check_signal_files(base: Path, header: wfdb.Record, channels: Sequence[int]) -> None:
    """Each signal file holding a selected channel exists and is long enough for `sig_len` samples.

    wfdb may read a short file without complaint (or fail with an opaque reshape error), so the size is
    checked against the header before reading.
    """
    for fname in dict.fromkeys(header.file_name[c] for c in channels):
        path = base.parent / fname
        if fname == "~" or not path.is_file():
            raise BadInputError(
                ECG_MISSING_SIGNAL_FILE, f"signal file {fname} named in the header is missing"
            )
        in_file = [i for i, f in enumerate(header.file_name) if f == fname]
        fmts = {str(header.fmt[i]) for i in in_file}
        if not header.sig_len or not fmts <= set(_FMT_BITS):
            continue
        spf = header.samps_per_frame or [1] * header.n_sig
        frame_bits = sum(_FMT_BITS[str(header.fmt[i])] * (spf[i] or 1) for i in in_file)
        offset = (header.byte_offset[in_file[0]] if header.byte_offset else None) or 0
        need = offset + int(header.sig_len * frame_bits // 8)
        have = path.stat().st_size
        if have < need:
            raise BadInputError(
                ECG_TRUNCATED,
                f"signal file {fname} has {have} bytes; the header ({header.sig_len} samples) needs {need}",
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


def read_ecg(path: str | Path, leads: Sequence[str] = STANDARD_LEADS) -> EcgRecord:
    """Read a WFDB record (path of the .hea, with or without extension) as (len(leads), T) float32 mV.

    Rows follow `leads`; NaN (invalid samples) stays NaN. Raises `BadInputError` with ECG_BAD_HEADER,
    ECG_MISSING_LEADS, ECG_MISSING_SIGNAL_FILE or ECG_TRUNCATED.
    """
    base = _record_base(path)
    header = _read_header(base)
    channels = _select_channels(header, leads)
    _check_signal_files(base, header, channels)
    to_mv = _units_to_mv(header, channels)
    order = sorted(set(channels))
    try:
        rec = wfdb.rdrecord(str(base), channels=order, physical=True)
    except Exception as e:  # the files exist and are long enough, so the header misdescribes them
        raise BadInputError(
            ECG_BAD_HEADER,
            f"{base.name}: signal files do not decode as the header says ({type(e).__name__}: {e})",
        ) from e
    p = rec.p_signal
    if p is None or p.ndim != 2 or p.shape[0] == 0 or (header.sig_len and p.shape[0] < header.sig_len):
        got = 0 if p is None else p.shape[0]
        raise BadInputError(ECG_TRUNCATED, f"{base.name}: read {got} samples, header says {header.sig_len}")
    cols = [order.index(c) for c in channels]
    sig = (p[:, cols].T * to_mv[:, None]).astype(np.float32)  # (T, n_read) -> (len(leads), T)
    meta, identifiers = parse_comments(header.comments or [])
    base_date = header.base_date if isinstance(header.base_date, dt.date) else None
    meta.update(base_date=base_date, n_samples_orig=int(sig.shape[1]), fs_orig=float(header.fs))
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
