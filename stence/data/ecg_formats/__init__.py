"""Readers for hospital ECG exports behind one interface: `sniff(path)` and `read_ecg_file(path, leads)`.

Formats: WFDB records ("wfdb", through `stence.data.wfdb_io`), GE MUSE XML ("muse"), Philips SierraECG
XML ("philips"), HL7 aECG ("hl7") and DICOM ECG waveforms ("dicom"). Every reader returns an `EcgRecord`
(signal (len(leads), T) float32 mV in the requested lead order, fs, meta, identifiers) and refuses bad
input only with `BadInputError(reason, detail)`: a malformed, hostile or over-limit file is quarantined
with a reason, never a crash, a hang, a network or file fetch, or a memory blow-up.

meta: age (years | None), sex ("M" / "F" | None), base_date (acquisition date | None), acquisition_time
("HH:MM:SS" | None), n_samples_orig, fs_orig, format, signal_files ([] for single-file formats),
comments_kept ([]), derived_leads (limb leads computed from I and II). identifiers: raw identifying values
under the keys of `stence.data.wfdb_io` (see `_ids`); `patient_id` is the file's patient ID / MRN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from stence.config import STANDARD_LEADS
from stence.data.ecg_formats.detect import sniff, xml_root
from stence.data.ecg_formats.dicom_ecg import read_dicom_ecg
from stence.data.ecg_formats.hl7 import read_hl7
from stence.data.ecg_formats.muse import read_muse
from stence.data.ecg_formats.philips import read_philips
from stence.data.limits import Limits
from stence.data.wfdb_io import EcgRecord, read_ecg
from stence.errors import ECG_BAD_HEADER, ECG_BAD_WAVEFORM, ECG_UNSUPPORTED_FORMAT, BadInputError

FORMATS: tuple[str, ...] = ("wfdb", "muse", "philips", "hl7", "dicom")

_READERS: dict[str, Callable[[Path, Sequence[str], Limits], EcgRecord]] = {
    "wfdb": read_ecg,
    "muse": read_muse,
    "philips": read_philips,
    "hl7": read_hl7,
    "dicom": read_dicom_ecg,
}

__all__ = ["FORMATS", "EcgRecord", "describe_unsupported", "read_ecg_file", "sniff"]


def describe_unsupported(path: Path) -> str:
    """A short description of an unrecognised file, for the quarantine detail (no file content)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError as e:
        return f"cannot be read ({type(e).__name__})"
    if head[128:132] == b"DICM":
        return "DICOM file that is not a 12-lead or general ECG waveform: not a supported ECG export"
    root = xml_root(head)
    if root is not None:
        return f"XML with root <{root[:40]}>: not a supported ECG export"
    return "not a recognised ECG export (WFDB header, MUSE / Philips / HL7 aECG XML, DICOM ECG)"


def read_ecg_file(
    path: str | Path, leads: Sequence[str] = STANDARD_LEADS, limits: Limits = Limits()
) -> EcgRecord:
    """Read any supported ECG export as (len(leads), T) float32 mV, dispatching on its content (`sniff`).

    Raises `BadInputError` only: ECG_UNSUPPORTED_FORMAT, ECG_BAD_XML, ECG_XML_FORBIDDEN,
    ECG_BAD_WAVEFORM, ECG_BAD_HEADER, ECG_MISSING_LEADS, FILE_OVER_LIMIT, DICOM_UNREADABLE (and WFDB's
    own reasons). OSError (a vanished file, a full disk) is left to the caller.
    """
    p = Path(path)
    fmt = sniff(p)
    if fmt is None:
        raise BadInputError(ECG_UNSUPPORTED_FORMAT, describe_unsupported(p))
    try:
        return _READERS[fmt](p, leads, limits)
    except (BadInputError, OSError):  # an OSError is the file system's (a full disk), not the file's
        raise
    except Exception as e:  # a reader's unforeseen failure on odd input is still a reason, never a crash
        reason = ECG_BAD_HEADER if fmt == "wfdb" else ECG_BAD_WAVEFORM
        raise BadInputError(reason, f"{fmt} reader failed on this file ({type(e).__name__})") from None
