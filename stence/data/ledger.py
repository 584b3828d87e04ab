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
    """Quarantine rows, the site-side path map, and the identifier needles of one ingest."""

    def __init__(self, pseudo: Pseudonymizer):
        self.pseudo = pseudo
        self.rows: list[dict[str, str]] = []  # quarantine: file (pseudonym or table row), reason, detail
        self.site: list[dict[str, str]] = []  # file, path, status, reason, record
        self.needles: dict[str, str] = {}  # identifier value -> kind (e.g. "dicom:patient_name", "path")
        self._paths: dict[str, set[str]] = {}  # rel path -> its own path needles (for scrubbing details)

    # ---- identifiers -------------------------------------------------------------------------------
    def identifier(self, kind: str, value: object) -> None:
        v = str(value or "").strip()
        if v:
            self.needles.setdefault(v, kind)

    def path(self, rel: str) -> str:
        """Register a file of the export (its path parts become needles); returns its pseudonym."""
        if rel not in self._paths:
            self._paths[rel] = path_needles(rel)
            for n in self._paths[rel]:
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
        self.rows.append({"file": fid, "reason": reason, "detail": self._scrub(detail, rel)})
        self.site.append({"file": fid, "path": rel, "status": "quarantined", "reason": reason, "record": record})

    def used(self, rel: str, record: str = "") -> None:
        self.site.append({"file": self.path(rel), "path": rel, "status": "used", "reason": "", "record": record})

    def ignored(self, rel: str, why: str) -> None:
        self.site.append({"file": self.path(rel), "path": rel, "status": "ignored", "reason": why, "record": ""})

    def _scrub(self, detail: str, rel: str) -> str:
        """Remove the file's own path parts (longest first) from a reader's message."""
        text = str(detail or "")
        for part in sorted(self._paths.get(rel, set()) | {Path(rel).name}, key=len, reverse=True):
            text = text.replace(part, _MASK)
        return text

    # ---- outputs -----------------------------------------------------------------------------------
    def quarantine_frame(self) -> tuple[pd.DataFrame, Counter]:
        """The quarantine table with every identifier seen redacted from the details, and what was redacted
        (kind -> count)."""
        redacted: Counter = Counter()
        rows = []
        redact = Redactor(self.needles)
        for r in self.rows:
            detail, found = redact(r["detail"])
            redacted.update(self.needles[n] for n in found)
            rows.append({**r, "detail": detail})
        return pd.DataFrame(rows, columns=["file", "reason", "detail"]), redacted

    def site_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.site, columns=["file", "path", "status", "reason", "record"]).sort_values(
            ["status", "path"], kind="stable").reset_index(drop=True)

    @property
    def reasons(self) -> Counter:
        return Counter(r["reason"] for r in self.rows)
