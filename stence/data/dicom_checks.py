"""Checks that refuse a DICOM file from its header, before its pixel data is decoded.

A crafted or broken header can ask for gigabytes: a 13 MB RLE cine whose header claims 5000 frames of
2048 x 2048 decodes to 40 GiB; a small JPEG frame can declare 65535 x 65535 pixels. These checks bound
what decoding may allocate by `Limits` (stence/data/limits.py), so that such a file is quarantined with a
reason instead of exhausting the decode worker. Details name numbers and limits, never header values
that could identify a patient.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue
from pydicom.uid import UID, RLELossless

from stence.data.limits import Limits
from stence.errors import (
    DICOM_BAD_FRAME_COUNT,
    DICOM_BURNED_IN,
    DICOM_UNREADABLE,
    FILE_OVER_LIMIT,
    BadInputError,
)

DECODER_HINT = (
    "install a pydicom pixel-data plugin for it, e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg` (JPEG, JPEG-LS, JPEG 2000, HTJ2K) or `pip install python-gdcm`"
)
# Plugin failures that mean "this plugin cannot decode this variant", not "the data is broken", with the
# hint a user can act on; the most specific first (the first that matches any plugin's failure is given).
# 1. A JPEG Extended stream whose scan header says Se=0 instead of 63, as written by some older encoders
#    (the NEMA WG04 *_JPLY files, pydicom's JPEG-lossy.dcm): pylibjpeg-libjpeg refuses it, pydicom's GDCM
#    plugin has no 12-bit JPEG Extended at all, but GDCM's own converter reads it (with a warning).
# 2. 12-bit JPEG Extended: Pillow and pydicom's GDCM plugin refuse it, pylibjpeg-libjpeg decodes it.
_UNSUPPORTED_VARIANTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (
        re.compile(r"scan start must be zero and scan stop must be 63"),
        "its JPEG scan header is non-conformant (Se=0, written by some older encoders); no pydicom plugin "
        "decodes it (pylibjpeg-libjpeg refuses the header, the GDCM plugin has no 12-bit JPEG): transcode it "
        "first with `gdcmconv --raw IN OUT` (from `pip install python-gdcm`)",
    ),
    (
        re.compile(r"does not support 'JPEG Extended' for samples with 12-bit precision"),
        "12-bit JPEG Extended needs `pip install pylibjpeg pylibjpeg-libjpeg` (Pillow and pydicom's GDCM "
        "plugin do not decode it)",
    ),
    (re.compile(r"does not support|not supported|unsupported", re.IGNORECASE), DECODER_HINT),
)
_MAX_BITS = 64  # largest BitsAllocated pydicom decodes
# pydicom reads a header element in about 2 calls and builds a few Python objects for it (~1 KiB): a
# crafted header of 10-byte elements would take ~100 x its size in memory and minutes to parse. Real XA
# headers have hundreds of elements, an Enhanced XA cine with per-frame groups some tens of thousands.
MAX_HEADER_READS = 200_000
_MIB = float(1 << 20)


def as_float(value: Any) -> float | None:
    """A header number as float (first of several); None when absent or not a number."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def int_or(ds: Dataset, keyword: str, default: int) -> int:
    """A header integer, `default` when absent, empty or malformed (for metadata, not for limits)."""
    v = as_float(ds.get(keyword))
    return int(v) if v is not None and v.is_integer() else default


class HeaderTooLarge(Exception):
    """Raised by `BudgetedFile` when a header needs more reads than its budget."""


class BudgetedFile(io.FileIO):
    """A file that can be read in at most `budget` calls, to bound what pydicom builds from a header."""

    def __init__(self, path: Path, budget: int = MAX_HEADER_READS):
        super().__init__(path, "rb")
        self.left = budget

    def read(self, size: int | None = -1) -> bytes:
        self.left -= 1
        if self.left < 0:
            raise HeaderTooLarge(f"more than {MAX_HEADER_READS // 2} header elements")
        return super().read(-1 if size is None else size)


def check_file_size(path: Path, limits: Limits) -> None:
    """Refuse a file larger than max_decoded_bytes before reading it (its bytes are held while decoding)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        raise BadInputError(DICOM_UNREADABLE, f"{path.name}: {type(e).__name__}: {e.strerror}") from e
    if size > limits.max_decoded_bytes:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"{path.name}: file of {size / _MIB:.1f} MiB is over the limit of "
            f"{limits.max_decoded_bytes / _MIB:.0f} MiB (raise ingest.max_decoded_mb to read it)",
        )


def frame_count(ds: Dataset, name: str) -> int:
    """NumberOfFrames as a positive integer (1 when absent or empty); DICOM_BAD_FRAME_COUNT otherwise."""
    if "NumberOfFrames" not in ds:
        return 1
    raw = ds["NumberOfFrames"].value  # IS; a malformed value stays a str (or ISfloat, or several values)
    if raw is None or raw == "":
        return 1  # empty: pydicom decodes one frame too
    try:
        n = int(str(raw).strip()) if isinstance(raw, (str, int)) else None
    except ValueError:
        n = None
    if n is None:  # the value itself is not echoed: a crafted header could put anything there
        kind = (
            f"{len(raw)} values" if isinstance(raw, (list, MultiValue)) else "a value that is not an integer"
        )
        raise BadInputError(
            DICOM_BAD_FRAME_COUNT, f"{name}: NumberOfFrames must be a positive integer, got {kind}"
        )
    if n <= 0:
        raise BadInputError(
            DICOM_BAD_FRAME_COUNT, f"{name}: NumberOfFrames must be a positive integer, got {n}"
        )
    return n


def _header_uint(ds: Dataset, keyword: str, default: int, name: str) -> int:
    """An image-module integer (Rows, BitsAllocated, ...) that must be one non-negative integer."""
    v = ds.get(keyword)
    if v is None or v == "":
        return default
    if not isinstance(v, int) or v < 0:
        raise BadInputError(DICOM_UNREADABLE, f"{name}: {keyword} is not one non-negative integer")
    return int(v)


def check_header(ds: Dataset, name: str, limits: Limits) -> int:
    """Check the header against `limits` before any pixel data is read; returns the frame count.

    Raises DICOM_BAD_FRAME_COUNT, FILE_OVER_LIMIT (naming the config key that raises the limit),
    DICOM_UNREADABLE (an impossible image module) or DICOM_BURNED_IN.
    """
    n_frames = frame_count(ds, name)
    if n_frames > limits.max_frames:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"{name}: {n_frames} frames, over the limit of {limits.max_frames} (raise ingest.max_frames to read it)",
        )
    rows, cols = _header_uint(ds, "Rows", 0, name), _header_uint(ds, "Columns", 0, name)
    samples = _header_uint(ds, "SamplesPerPixel", 1, name)
    bits = _header_uint(ds, "BitsAllocated", 16, name)
    if not 1 <= bits <= _MAX_BITS or not 0 <= int_or(ds, "BitsStored", bits) <= bits:
        raise BadInputError(DICOM_UNREADABLE, f"{name}: BitsAllocated {bits} or BitsStored out of range")
    nbytes = -(-bits // 8)  # BitsAllocated 1 is unpacked to 1 byte per sample
    native = n_frames * rows * cols * samples * nbytes
    as_float32 = n_frames * rows * cols * 4  # the reader's float32 copy, samples averaged
    if max(native, as_float32) > limits.max_decoded_bytes:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"{name}: {n_frames} frames x {rows} x {cols} x {samples} sample(s) x {nbytes} B decode to "
            f"{native / _MIB:.1f} MiB ({as_float32 / _MIB:.1f} MiB as float32), over the limit of "
            f"{limits.max_decoded_bytes / _MIB:.0f} MiB (raise ingest.max_decoded_mb to read it)",
        )
    if str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES":
        raise BadInputError(
            DICOM_BURNED_IN,
            f"{name}: BurnedInAnnotation is YES: the pixels may show identifiers, and they cannot be masked yet",
        )
    return n_frames


def codestream_size(fragment: bytes) -> tuple[int, int] | None:
    """(rows, cols) a JPEG, JPEG-LS or JPEG 2000 codestream declares in its header; None if not found."""
    if fragment[:4] == b"\xff\x4f\xff\x51" and len(fragment) >= 24:  # J2K / HTJ2K: SOC, then SIZ
        xsiz, ysiz, x0, y0 = struct.unpack(">4I", fragment[8:24])
        return max(ysiz - y0, 0), max(xsiz - x0, 0)
    if fragment[:2] != b"\xff\xd8":  # not the start of a JPEG codestream (or a continuation fragment)
        return None
    pos, end = 2, min(len(fragment), 1 << 16)  # the frame header comes within the first segments
    while pos + 9 <= end and fragment[pos] == 0xFF:
        marker = fragment[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if (0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)) or marker == 0xF7:  # SOFn, SOF55
            rows, cols = struct.unpack(">HH", fragment[pos + 5 : pos + 9])
            return rows, cols
        if marker == 0xDA:  # scan data before any frame header
            return None
        pos += 2 + int.from_bytes(fragment[pos + 2 : pos + 4], "big")
    return None


def check_pixel_data(ds: Dataset, name: str, n_frames: int, transfer_syntax: str) -> None:
    """Refuse pixel data that cannot match its (already checked) header, before decoding it.

    Native data shorter than its frames need -> DICOM_BAD_FRAME_COUNT. An encapsulated frame whose
    codestream declares more pixels than Rows x Columns (a decompression bomb: a small JPEG can decode to
    gigabytes), or an RLE frame longer than any encoding of one frame -> DICOM_UNREADABLE.
    """
    rows, cols = int_or(ds, "Rows", 0), int_or(ds, "Columns", 0)
    samples, bits = int_or(ds, "SamplesPerPixel", 1), int_or(ds, "BitsAllocated", 16)
    ts = UID(transfer_syntax)
    data = ds.PixelData
    if not ts.is_encapsulated:
        need = -(-n_frames * rows * cols * samples * bits // 8)
        if len(data) < need:
            raise BadInputError(
                DICOM_BAD_FRAME_COUNT,
                f"{name}: {n_frames} frame(s) of {rows} x {cols} need {need} bytes of pixel data, "
                f"the file has {len(data)}",
            )
        return
    # pydicom's RLE decoder expands a whole segment (up to 64x: 2 bytes can say "repeat 128 times") before
    # checking its length. An encoder needs at most 2 bytes per decoded byte (1-byte literal runs), so a
    # longer frame is no RLE frame of this size, and the transient stays under ~128 x one frame plane.
    rle_max = 64 + samples * -(-bits // 8) * 2 * (rows * cols + 1)
    try:
        fragments = list(generate_fragments(data))[1:]  # the first item is the basic offset table
    except Exception:
        return  # malformed encapsulation: the decoder reports it (DICOM_UNREADABLE)
    for frag in fragments:
        size = codestream_size(frag)
        if size is not None and size[0] * size[1] > rows * cols:
            raise BadInputError(
                DICOM_UNREADABLE,
                f"{name}: a frame's codestream declares {size[0]} x {size[1]} pixels, the header {rows} x {cols}",
            )
        if ts == RLELossless and len(frag) > rle_max:
            raise BadInputError(
                DICOM_UNREADABLE,
                f"{name}: an RLE frame of {len(frag)} bytes is longer than any {rows} x {cols} frame",
            )


def unsupported_hint(err: Exception) -> str | None:
    """The install hint when every plugin failed because it cannot decode this variant; else None.

    pydicom's error lists one "plugin: message" line per plugin it tried, after a first summary line.
    """
    failures = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()] or [str(err)]
    matched: list[int] = []
    for msg in failures:
        i = next((i for i, (pattern, _) in enumerate(_UNSUPPORTED_VARIANTS) if pattern.search(msg)), None)
        if i is None:
            return None  # a plugin that supports the variant failed too: the data is broken
        matched.append(i)
    return _UNSUPPORTED_VARIANTS[min(matched)][1]  # the most specific explanation
