"""Every file under a raw export, classified before anything is decoded: each one is used or quarantined.

Layout (README, "Bring your own data"):
  RAW/ecg/**        WFDB records (.hea + the signal files its header names) and vendor ECG exports
                    (GE MUSE, Philips, HL7 aECG XML, DICOM 12-lead ECG), recognised by content whatever
                    their file names; any other XML or DICOM file is `ecg_unsupported_format`
  RAW/angio/**      DICOM XA views (any file name; DICOMDIR and other non-XA DICOMs are quarantined later)
  RAW/ecg_index.csv, RAW/annotations.csv
Anything else is `unrecognised_file`. A symbolic link pointing outside RAW is never followed
(`symlink_outside_export`); one pointing inside is read where it points (duplicates are caught later).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from stence import errors as E
from stence.data.ecg_formats import describe_unsupported, sniff
from stence.outputs import MARKER

INDEX_FILE, ANNOTATIONS_FILE = "ecg_index.csv", "annotations.csv"
# files a synthetic export carries beside the data (the generator's answer key): recognised, not read
IGNORED_FILES = {
    "synth_truth.json": "the synthetic generator's answer key (ingest never reads it)",
    MARKER: "the marker of a folder stence wrote (stence synth)",
}
LAYOUT_NAMES = frozenset({"ecg", "angio", INDEX_FILE, ANNOTATIONS_FILE, *IGNORED_FILES})

@dataclass
class Inventory:
    """What a raw export holds: files to decode, files used alongside them, and files set aside."""

    headers: list[str] = field(default_factory=list)  # WFDB .hea paths relative to RAW
    vendor: list[str] = field(default_factory=list)  # vendor ECG exports (MUSE, Philips, HL7, DICOM) relative to RAW
    dicoms: list[str] = field(default_factory=list)  # candidate XA files relative to RAW
    ecg_other: list[str] = field(default_factory=list)  # other files under ecg/ (signal files, unknown)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (rel path, reason, detail)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel path, why it is not read)
    index: str | None = None  # rel path of ecg_index.csv if present
    annotations: str | None = None

    @property
    def all_paths(self) -> list[str]:
        """Every file accounted for (the site-side path map covers these)."""
        out = self.headers + self.vendor + self.dicoms + self.ecg_other + [r[0] for r in self.rejected]
        out += [i[0] for i in self.ignored] + [p for p in (self.index, self.annotations) if p]
        return sorted(set(out))


def _walk(raw: Path, sub: str, inv: Inventory) -> list[str]:
    """Relative paths of the regular files under RAW/sub (links inside RAW resolved, outside refused)."""
    top = raw / sub
    if top.is_symlink() and not _inside(top, raw):
        inv.rejected.append((sub, E.SYMLINK_OUTSIDE_EXPORT, "a link to a folder outside the export; not followed"))
        return []
    if not top.is_dir():
        return []
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        here = Path(dirpath)
        for d in list(dirnames):
            p = here / d
            if p.is_symlink():
                rel = str(p.relative_to(raw))
                dirnames.remove(d)
                if _inside(p, raw):
                    inv.ignored.append((rel, "a link to a folder inside the export; its files are read there"))
                else:
                    inv.rejected.append((rel, E.SYMLINK_OUTSIDE_EXPORT,
                                         "a link to a folder outside the export; not followed"))
        for name in filenames:
            p = here / name
            rel = str(p.relative_to(raw))
            if p.is_symlink() and not _inside(p, raw):
                inv.rejected.append((rel, E.SYMLINK_OUTSIDE_EXPORT, "a link to a file outside the export; not read"))
            elif not p.is_file():
                inv.rejected.append((rel, E.UNRECOGNISED_FILE, "not a regular file (broken link, device, pipe)"))
            else:
                found.append(rel)
    return sorted(found)


def _inside(path: Path, raw: Path) -> bool:
    try:
        path.resolve().relative_to(raw.resolve())
        return True
    except (ValueError, OSError, RuntimeError):
        return False


def _looks_like_export(path: Path) -> bool:
    """An XML or DICOM file (the kinds vendor ECG exports come in), judged from its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError:
        return False
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    return text.startswith(b"<") or head[128:132] == b"DICM"


def take_inventory(raw: Path) -> Inventory:
    """Classify every file under RAW (see the module docstring)."""
    inv = Inventory()
    ecg_files = _walk(raw, "ecg", inv)
    inv.dicoms = _walk(raw, "angio", inv)
    heads = {rel for rel in ecg_files if rel.lower().endswith(".hea")}
    inv.headers = sorted(heads)
    for rel in ecg_files:
        if rel in heads:
            continue
        fmt = sniff(raw / rel)
        if fmt is not None and fmt != "wfdb":
            inv.vendor.append(rel)
        elif _looks_like_export(raw / rel):  # XML or DICOM that is no ECG export the platform reads
            inv.rejected.append((rel, E.ECG_UNSUPPORTED_FORMAT, describe_unsupported(raw / rel)))
        else:  # a signal file of some record, or nothing: settled once the headers are decoded
            inv.ecg_other.append(rel)
    for entry in sorted(os.listdir(raw)):
        p = raw / entry
        if entry in ("ecg", "angio"):
            continue
        if entry == INDEX_FILE and p.is_file() and _inside(p, raw):
            inv.index = entry
        elif entry == ANNOTATIONS_FILE and p.is_file() and _inside(p, raw):
            inv.annotations = entry
        elif entry in IGNORED_FILES and p.is_file():
            inv.ignored.append((entry, IGNORED_FILES[entry]))
        elif p.is_symlink() and not _inside(p, raw):
            inv.rejected.append((entry, E.SYMLINK_OUTSIDE_EXPORT, "a link pointing outside the export; not followed"))
        elif p.is_dir():
            for dirpath, _, filenames in os.walk(p, followlinks=False):
                for name in filenames:
                    rel = str((Path(dirpath) / name).relative_to(raw))
                    inv.rejected.append((rel, E.UNRECOGNISED_FILE, "outside ecg/ and angio/: not part of the layout"))
        else:
            inv.rejected.append((entry, E.UNRECOGNISED_FILE, "not part of the export layout"))
    return inv
