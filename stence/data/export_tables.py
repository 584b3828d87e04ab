"""The two tables of a raw export, read and validated before any file is decoded.

  ecg_index.csv    record,patient_id,acquisition_date   (record: the .hea path relative to RAW, with or
                   without the extension); optional when the WFDB headers carry patient and date
  annotations.csv  study_uid,segment,stenosis            (segment 1-16, degree 0-100 %)

Both may be UTF-8 (with or without BOM) or, as older hospital tools write them, Latin-1 / Windows-1252.
Dates are read in the formats of `ACCEPTED_DATE_FORMATS` only: a day-first or month-first date such as
09/02/2022 is ambiguous and its row is refused with a reason, never guessed. Rows that cannot be used are
quarantined one by one; a file that cannot be read at all raises `ExportTableError` (one line, naming it).
Messages never repeat a cell's value: identifiers and dates stay out of the quarantine.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stence import errors as E

ACCEPTED_DATE_FORMATS = (
    "YYYY-MM-DD",
    "YYYYMMDD",
    "YYYY/MM/DD",
    "YYYY.MM.DD",
    "YYYY-MM-DDTHH:MM[:SS[.ffffff]][Z|+HH:MM]",
    "YYYY-MM-DD HH:MM[:SS]",
)
_ISO = re.compile(
    r"^(\d{4})([-/.]?)(\d{2})\2(\d{2})"  # date, one separator used twice (or none)
    r"(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}:?\d{2})?)?$"
)
_DAY_OR_MONTH_FIRST = re.compile(r"^\d{1,2}[./\-]\d{1,2}[./\-]\d{2,4}(?:[T ].*)?$")


class ExportTableError(ValueError):
    """A table of the export cannot be read at all (the message names the file and what to fix)."""


class DateFormatError(ValueError):
    """A date cell is not in an accepted format (the message never repeats the value)."""


def parse_export_date(value: str) -> dt.date | None:
    """A date in one of ACCEPTED_DATE_FORMATS -> date; empty -> None; anything else -> DateFormatError."""
    s = (value or "").strip()
    if not s:
        return None
    m = _ISO.match(s)
    if m:
        try:
            return dt.date(int(m.group(1)), int(m.group(3)), int(m.group(4)))
        except ValueError as e:
            raise DateFormatError("not a valid calendar date") from e
    if _DAY_OR_MONTH_FIRST.match(s):
        raise DateFormatError("day-first or month-first order is ambiguous; write YYYY-MM-DD")
    raise DateFormatError(f"not in an accepted format ({', '.join(ACCEPTED_DATE_FORMATS)})")


def read_text_table(path: Path, required: set[str]) -> tuple[pd.DataFrame, str]:
    """CSV -> (all-string frame, encoding used). UTF-8 first, then Windows-1252/Latin-1."""
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ExportTableError(f"{path.name}: cannot be read ({e.strerror or e})") from e
    for enc in ("utf-8-sig", "cp1252", "latin-1"):
        try:
            text = blob.decode(enc)
            break
        except UnicodeDecodeError:
            continue
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, csv.Error) as e:
        raise ExportTableError(f"{path.name}: not a readable CSV table ({type(e).__name__})") from e
    df.columns = [str(c).strip() for c in df.columns]
    missing = required - set(df.columns)
    if missing:
        raise ExportTableError(
            f"{path.name}: missing column(s) {sorted(missing)}; expected {sorted(required)} (found {list(df.columns)})"
        )
    return df, enc


@dataclass
class EcgIndex:
    """Validated ecg_index.csv: record -> (patient id, acquisition date or None)."""

    rows: dict[str, tuple[str, dt.date | None]] = field(default_factory=dict)
    row_of: dict[str, str] = field(default_factory=dict)  # record -> "ecg_index.csv:N" (site-side lookup)
    quarantine: list[tuple[str, str, str, str]] = field(default_factory=list)  # (row label, reason, detail, record)
    invalid_records: dict[str, str] = field(default_factory=dict)  # record -> why its index row is unusable
    identifiers: list[tuple[str, str]] = field(default_factory=list)  # (kind, value) for the leak scan
    encoding: str = "utf-8"


def read_ecg_index(path: Path, name: str = "ecg_index.csv") -> EcgIndex:
    """Validate every row (see the module docstring); unusable rows are quarantined, not dropped."""
    df, enc = read_text_table(path, {"record", "patient_id", "acquisition_date"})
    out = EcgIndex(encoding=enc)
    for i, row in enumerate(df.itertuples(index=False), start=2):  # line 1 is the header
        label = f"{name}:{i}"
        rec = str(row.record).strip().replace("\\", "/").removesuffix(".hea")
        pid, raw_date = str(row.patient_id).strip(), str(row.acquisition_date).strip()
        if pid:
            out.identifiers.append(("ecg_index:patient_id", pid))
        if raw_date:
            out.identifiers.append(("ecg_index:acquisition_date", raw_date))
        if not rec:
            out.quarantine.append((label, E.ECG_INDEX_INVALID, "empty record column", ""))
            continue
        if rec in out.rows or rec in out.invalid_records:
            out.quarantine.append((label, E.ECG_INDEX_INVALID, "a second row for the same record", rec))
            continue
        out.row_of[rec] = label
        if not pid:
            out.invalid_records[rec] = "empty patient_id"
            out.quarantine.append((label, E.ECG_INDEX_INVALID, "empty patient_id", rec))
            continue
        try:
            date = parse_export_date(raw_date)
        except DateFormatError as e:
            out.invalid_records[rec] = f"acquisition_date {e}"
            out.quarantine.append((label, E.ECG_INDEX_INVALID, f"acquisition_date {e}", rec))
            continue
        out.rows[rec] = (pid, date)
    return out


@dataclass
class Annotations:
    """Validated annotations.csv: study UID -> {segment: worst degree}."""

    degrees: dict[str, dict[int, float]] = field(default_factory=dict)
    quarantine: list[tuple[str, str, str]] = field(default_factory=list)  # (row label, reason, detail)
    identifiers: list[tuple[str, str]] = field(default_factory=list)


def read_annotations(path: Path, name: str = "annotations.csv") -> Annotations:
    """Validate every row: a study UID, segment 1-16, degree 0-100; several rows of one segment keep the worst."""
    df, _ = read_text_table(path, {"study_uid", "segment", "stenosis"})
    out = Annotations()
    uid = df["study_uid"].str.strip()
    seg = pd.to_numeric(df["segment"], errors="coerce")
    deg = pd.to_numeric(df["stenosis"], errors="coerce")
    no_uid = (uid == "").to_numpy()
    bad = ~(seg.between(1, 16) & (seg == seg.round()) & deg.between(0, 100)).to_numpy() & ~no_uid
    for i in np.flatnonzero(no_uid):
        out.quarantine.append((f"{name}:{i + 2}", E.ANNOTATION_NO_STUDY, "empty study_uid: the row cannot be matched"))
    for i in np.flatnonzero(bad):
        out.quarantine.append((f"{name}:{i + 2}", E.ANNOTATION_INVALID,
                               f"segment {df['segment'].iloc[i]!r}, stenosis {df['stenosis'].iloc[i]!r}: "
                               "need segment 1-16, degree 0-100"))
    keep = ~(bad | no_uid)
    good = pd.DataFrame({"uid": uid[keep], "segment": seg[keep].astype(int), "stenosis": deg[keep].astype(float)})
    for u, g in good.groupby("uid"):
        out.degrees[str(u)] = g.groupby("segment")["stenosis"].max().to_dict()  # two lesions: the worst counts
    out.identifiers = [("annotations:study_uid", u) for u in out.degrees]
    return out
