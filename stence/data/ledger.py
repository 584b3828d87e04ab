"""Ingest's account of every input: used, quarantined (with a reason) or ignored, and the identifiers seen.

Nothing in a cohort names an original file. Hospital exports put MRNs, accession numbers and dates in
folder and file names, so every file is referred to by a keyed pseudonym (`F-...`), and quarantine
details are scrubbed of the file's own path parts and of every identifier value seen anywhere in the
export. The mapping back (pseudonym -> original path) is for the site alone: `site_frame()` is written
outside the cohort folder, into a folder named as holding identifiers.

Identifiers collected here (header values, index cells, UIDs and path components, each with its kind)
are the needles of the final leak scan of everything written.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pandas as pd

from stence.data.inventory import LAYOUT_NAMES
from stence.data.pseudonym import Pseudonymizer, Redactor

_TOKEN_SPLIT = re.compile(r"[^0-9A-Za-z]+")
_MASK = "<file>"
_QUARANTINE_COLUMNS = ("file", "reason", "detail")
_SITE_COLUMNS = ("file", "path", "status", "reason", "record")


def path_needles(rel: str) -> set[str]:
    """Identifier candidates in a relative path: each folder and file name (with and without extensions)
    and each digit-bearing token of >= 6 characters in them (dates, MRNs, accession numbers); the export
    layout's own names (ecg, angio, ...) excepted. Purely numeric names shorter than 6 digits are skipped:
    they also stand for counts and years."""
    out: set[str] = set()
    for part in Path(rel).parts:
        if part in LAYOUT_NAMES:
            continue
        for cand in {part, part.split(".")[0], Path(part).stem}:
            if cand and not (cand.isdigit() and len(cand) < 6):
                out.add(cand)
        out.update(t for t in _TOKEN_SPLIT.split(part) if len(t) >= 6 and any(c.isdigit() for c in t))
    return out


class Ledger:
    """Quarantine rows, the site-side path map, and the identifier needles of one ingest.

    Rows are kept as tuples (a few per file of the export, so their size is ingest's memory per record)."""

    def __init__(self, pseudo: Pseudonymizer):
        self.pseudo = pseudo
        self.rows: list[tuple[str, str, str]] = []  # quarantine: _QUARANTINE_COLUMNS
        self.site: list[tuple[str, str, str, str, str]] = []  # the site map: _SITE_COLUMNS
        self.needles: dict[str, str] = {}  # identifier value -> kind (e.g. "dicom:patient_name", "path")
        self._registered: set[str] = set()  # rel paths whose path needles are in `needles`

    # ---- identifiers -------------------------------------------------------------------------------
    def identifier(self, kind: str, value: object) -> None:
        v = str(value or "").strip()
        if v:
            self.needles.setdefault(v, kind)

    def path(self, rel: str) -> str:
        """Register a file of the export (its path parts become needles); returns its pseudonym."""
        if rel not in self._registered:
            self._registered.add(rel)
            for n in path_needles(rel):
                self.needles.setdefault(n, "file or folder name")
        return self.file_id(rel)

    def file_id(self, rel: str) -> str:
        return self.pseudo.pseudonym(rel, "file")

    # ---- accounting --------------------------------------------------------------------------------
    def quarantine(self, rel: str, reason: str, detail: str = "", *, label: str | None = None,
                   record: str = "") -> None:
        """One quarantined file (`rel`), or one table row (`label` like "annotations.csv:7", `rel` the table)."""
        fid = label or self.path(rel)
        if label:
            self.path(rel)
        self.rows.append((fid, reason, self._scrub(detail, rel)))
        self.site.append((fid, rel, "quarantined", reason, record))

    def used(self, rel: str, record: str = "") -> None:
        self.site.append((self.path(rel), rel, "used", "", record))

    def ignored(self, rel: str, why: str) -> None:
        self.site.append((self.path(rel), rel, "ignored", why, ""))

    def follows(self, rel: str, reason: str, record_rel: str) -> None:
        """A site-map row for a file that shares the fate of the quarantined record `record_rel` (a signal
        file of it); not a quarantine row of its own."""
        self.site.append((self.path(rel), rel, "quarantined", reason, self.file_id(record_rel)))

    def _scrub(self, detail: str, rel: str) -> str:
        """Remove the file's own path parts (longest first) from a reader's message."""
        text = str(detail or "")
        for part in sorted(path_needles(rel) | {Path(rel).name}, key=len, reverse=True):
            text = text.replace(part, _MASK)
        return text

    # ---- outputs -----------------------------------------------------------------------------------
    def quarantine_frame(self) -> tuple[pd.DataFrame, Counter]:
        """The quarantine table with every identifier seen redacted from the details, and what was redacted
        (kind -> count)."""
        redacted: Counter = Counter()
        rows = []
        redact = Redactor(self.needles)
        for fid, reason, text in self.rows:
            detail, found = redact(text)
            redacted.update(self.needles[n] for n in found)
            rows.append((fid, reason, detail))
        return pd.DataFrame(rows, columns=list(_QUARANTINE_COLUMNS)), redacted

    def site_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.site, columns=list(_SITE_COLUMNS)).sort_values(
            ["status", "path"], kind="stable").reset_index(drop=True)

    @property
    def reasons(self) -> Counter:
        return Counter(r[1] for r in self.rows)
