"""Every file under a raw export, classified before anything is decoded: each one is used or quarantined.

Layout (README, "Bring your own data"):
  RAW/ecg/**        WFDB records (.hea + the signal files its header names); vendor ECG exports
                    (GE MUSE, Philips, HL7 aECG XML, DICOM 12-lead ECG) are recognised by content and
                    quarantined as `ecg_unsupported_format` until they are read
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
from stence.outputs import MARKER

INDEX_FILE, ANNOTATIONS_FILE = "ecg_index.csv", "annotations.csv"
# files a synthetic export carries beside the data (the generator's answer key): recognised, not read
IGNORED_FILES = {
    "synth_truth.json": "the synthetic generator's answer key (ingest never reads it)",
    MARKER: "the marker of a folder stence wrote (stence synth)",
}
LAYOUT_NAMES = frozenset({"ecg", "angio", INDEX_FILE, ANNOTATIONS_FILE, *IGNORED_FILES})

_SNIFF_BYTES = 4096
# root elements of vendor XML ECG exports -> format name
_XML_ROOTS = {
    b"<restingecg": "GE MUSE RestingECG XML",
    b"<restingecgdata": "Philips SierraECG XML",
    b"<annotatedecg": "HL7 aECG (AnnotatedECG) XML",
}
_DICOM_ECG_SOP = {
    b"1.2.840.10008.5.1.4.1.1.9.1.1": "DICOM 12-lead ECG waveform",
    b"1.2.840.10008.5.1.4.1.1.9.1.2": "DICOM general ECG waveform",
    b"1.2.840.10008.5.1.4.1.1.9.1.3": "DICOM ambulatory ECG waveform",
}


@dataclass
class Inventory:
    """What a raw export holds: files to decode, files used alongside them, and files set aside."""

    headers: list[str] = field(default_factory=list)  # WFDB .hea paths relative to RAW
    dicoms: list[str] = field(default_factory=list)  # candidate XA files relative to RAW
    ecg_other: list[str] = field(default_factory=list)  # other files under ecg/ (signal files, unknown)
    rejected: list[tuple[str, str, str]] = field(default_factory=list)  # (rel path, reason, detail)
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (rel path, why it is not read)
    index: str | None = None  # rel path of ecg_index.csv if present
    annotations: str | None = None

    @property
    def all_paths(self) -> list[str]:
        """Every file accounted for (the site-side path map covers these)."""
        out = self.headers + self.dicoms + self.ecg_other + [r[0] for r in self.rejected]
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


def sniff_ecg_format(path: Path) -> str | None:
    """Name of a vendor ECG export format recognised from the file's first bytes, or None."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
    except OSError:
        return None
    low = head.lower()
    if low.lstrip().startswith((b"<?xml", b"<!doctype", b"<")) or low.startswith(b"\xef\xbb\xbf<"):
        for root, name in _XML_ROOTS.items():
            if root + b">" in low or root + b" " in low:
                return name
    if head[128:132] == b"DICM" or path.suffix.lower() == ".dcm":
        for uid, name in _DICOM_ECG_SOP.items():
            if uid in head:
                return name
    return None


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
        fmt = sniff_ecg_format(raw / rel)
        if fmt:
            inv.rejected.append((rel, E.ECG_UNSUPPORTED_FORMAT, f"{fmt}: this format is not read yet"))
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
