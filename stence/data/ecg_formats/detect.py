"""Which ECG export format a file holds, decided from its first bytes (its content, not its name).

XML exports are told apart by their root element, found after any byte-order mark, XML declaration,
comments, processing instructions and DOCTYPE; DICOM files by the SOP class in their file meta group.
Only a WFDB header is recognised by its extension (`.hea`): its content is free text.
"""

from __future__ import annotations

import codecs
import re
import struct
from pathlib import Path

SNIFF_BYTES = 8192

# Local name of the XML root element (casefolded) -> format.
XML_ROOTS = {"restingecg": "muse", "restingecgdata": "philips", "annotatedecg": "hl7"}
DICOM_ECG_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.9.1.1",  # 12-lead ECG Waveform Storage
    "1.2.840.10008.5.1.4.1.1.9.1.2",  # General ECG Waveform Storage
}

# What may precede the root element: whitespace, the declaration and other PIs, comments, a DOCTYPE
# (with an internal subset in brackets).
_PROLOG_ITEM = re.compile(
    r"\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE(?:[^\[>]*\[.*?\])?[^>]*>", re.DOTALL | re.IGNORECASE
)
_ROOT = re.compile(r"<(?:[A-Za-z_][\w.-]*:)?([A-Za-z_][\w.-]*)[\s/>]")
_EXPLICIT_LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}


def xml_root(head: bytes) -> str | None:
    """Local name of the root element of the XML document starting with `head`, or None."""
    for bom, enc in (
        (codecs.BOM_UTF8, "utf-8"),
        (codecs.BOM_UTF16_LE, "utf-16-le"),
        (codecs.BOM_UTF16_BE, "utf-16-be"),
    ):
        if head.startswith(bom):
            text = head[len(bom) :].decode(enc, errors="ignore")
            break
    else:  # the prolog and tag names are ASCII in every single-byte and UTF-8 export
        text = head.decode("latin-1")
    pos = 0
    while m := _PROLOG_ITEM.match(text, pos):
        pos = m.end()
    m = _ROOT.match(text, pos)
    return m.group(1) if m else None


def dicom_sop_class(head: bytes) -> str | None:
    """MediaStorageSOPClassUID from the file meta group of a DICOM file starting with `head`, or None.

    The meta group is always explicit VR little endian, right after the 128-byte preamble and "DICM".
    """
    if head[128:132] != b"DICM":
        return None
    pos = 132
    while pos + 8 <= len(head):
        group, elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            return None
        vr = head[pos + 4 : pos + 6]
        if vr in _EXPLICIT_LONG_VRS:
            if pos + 12 > len(head):
                return None
            length, pos = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, pos = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if elem == 0x0002:
            return head[pos : pos + length].decode("ascii", errors="replace").rstrip("\x00 ")
        pos += length
    return None


def sniff(path: Path) -> str | None:
    """The ECG export format of `path` ("wfdb", "muse", "philips", "hl7", "dicom"), or None.

    Reads at most the first SNIFF_BYTES bytes. An unreadable file is None (the reader says why).
    """
    path = Path(path)
    if path.suffix.lower() == ".hea":
        return "wfdb"
    try:
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError:
        return None
    if dicom_sop_class(head) in DICOM_ECG_SOP_CLASSES:
        return "dicom"
    root = xml_root(head)
    return XML_ROOTS.get(root.casefold()) if root else None
