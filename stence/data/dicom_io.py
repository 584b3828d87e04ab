"""DICOM X-ray angiography views -> frames in [0, 1], C-arm angulation, dates and UIDs.

A single-frame image is read as a one-frame cine. Raw identifying header values are returned separately
in `identifiers` (see `stence.data.dicom_ids`), which only the pseudonymiser and the leak scan may read.
Problems a user can act on raise `BadInputError` with a quarantine reason code; a crafted or unexpected
file is refused with a reason, never a crash, a hang or a memory blow-up.

Memory bound. Before any pixel data is read, the file size and the header are checked against `Limits`:
file size <= max_decoded_bytes, frames <= max_frames, and both the decoded array (frames x rows x cols x
samples x bytes per sample) and the float32 copy (frames x rows x cols x 4 B) <= max_decoded_bytes.
Encapsulated frames whose codestream header declares more pixels than the DICOM header are refused
before decoding. Peak memory of `read_xa` is then about 2 x max_decoded_bytes: the file's pixel data
with the decoded array while decoding, then the decoded array with the float32 copy (the pixel data is
dropped first), plus one frame being decoded. One exception: pydicom's RLE decoder expands a segment
before checking its length, so an RLE frame (whose encoded size is checked: at most 2 bytes per decoded
byte) can transiently take up to ~128 x one frame plane (rows x cols bytes).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from scipy.ndimage import binary_erosion, uniform_filter

from stence.data.dicom_checks import (
    DECODER_HINT,
    BudgetedFile,
    HeaderTooLarge,
    as_float,
    check_file_size,
    check_header,
    check_pixel_data,
    int_or,
    unsupported_hint,
)
from stence.data.dicom_ids import IDENTIFYING_KEYWORDS as IDENTIFYING_KEYWORDS  # re-exported
from stence.data.dicom_ids import dictionary_vr, identifiers
from stence.data.limits import Limits
from stence.errors import (
    DICOM_NO_DECODER,
    DICOM_NO_PIXELS,
    DICOM_NOT_XA,
    DICOM_UNREADABLE,
    FILE_OVER_LIMIT,
    BadInputError,
)

_QUOTED = re.compile(r"b?'[^']*'|b?\"[^\"]*\"")  # a quoted value (or bytes) in an error message

XA_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image Storage
}


@dataclass
class XaView:
    """One angiography view (cine run). `identifiers` holds raw identifying values (pseudonymiser only)."""

    frames: np.ndarray | None = field(repr=False)  # (F, H, W) float32 in [0, 1]; None from read_header
    primary_angle: float | None
    secondary_angle: float | None
    frame_time_ms: float | None
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: dt.date | None
    modality: str
    transfer_syntax: str
    identifiers: dict[str, str] = field(default_factory=dict, repr=False)
    meta: dict[str, Any] = field(default_factory=dict)  # rows, cols, n_frames, bits_stored, manufacturer


def parse_dicom_date(value: Any) -> dt.date | None:
    """Parse "19941016", "1994.10.16" or "1994-10-16" (time may follow) to a date; None if invalid."""
    if value is None:
        return None
    m = re.match(r"\s*(\d{4})[.\-/]?(\d{2})[.\-/]?(\d{2})", str(value))
    if not m:
        return None
    try:
        return dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def _find(ds: Dataset, keyword: str, depth: int = 3) -> Any:
    """First value of `keyword` at top level or nested in sequences (Enhanced XA functional groups)."""
    if keyword in ds:
        return ds.get(keyword)
    if depth == 0:
        return None
    for tag in ds.keys():  # only sequences are converted: converting every element is slow on big headers
        if (ds.get_item(tag).VR or dictionary_vr(tag)) == "SQ" and (items := ds[tag].value):
            found = _find(items[0], keyword, depth - 1)
            if found is not None:
                return found
    return None


def _frame_time_ms(ds: Dataset) -> float | None:
    ft = as_float(_find(ds, "FrameTime"))
    if ft:
        return ft
    ftv = ds.get("FrameTimeVector")
    if isinstance(ftv, pydicom.multival.MultiValue) and len(ftv) > 1:
        steps = [as_float(v) for v in list(ftv)[1:]]
        return float(np.mean(steps)) if None not in steps else None
    for kw in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = as_float(ds.get(kw))
        if rate:
            return 1000.0 / rate
    return None


def _scrub(err: Exception) -> str:
    """An error message fit for a quarantine detail: quoted values (header bytes) replaced, length capped.

    Quarantine details are written to the cohort, and a quoted header value may identify the patient.
    """
    return _QUOTED.sub("'...'", str(err))[:300]


def _read_dataset(path: Path, stop_before_pixels: bool) -> Dataset:
    """The parsed file (header only with `stop_before_pixels`); files without preamble are read leniently.

    The header-only read, which comes first, is read through a `BudgetedFile`: a crafted header of very
    many tiny elements is refused (FILE_OVER_LIMIT) before pydicom has built them all.
    """
    for force in (False, True):  # without preamble / "DICM" marker: retry leniently
        try:
            with BudgetedFile(path) if stop_before_pixels else open(path, "rb") as fh:
                ds = pydicom.dcmread(fh, stop_before_pixels=stop_before_pixels, force=force)
        except HeaderTooLarge as e:
            raise BadInputError(
                FILE_OVER_LIMIT,
                f"{path.name}: {e} (a fixed bound, MAX_HEADER_READS in stence/data/dicom_checks.py)",
            ) from e
        except InvalidDicomError:
            if not force:
                continue
            raise BadInputError(DICOM_UNREADABLE, f"{path.name}: not a readable DICOM file") from None
        except Exception as e:
            what = "not a readable DICOM file" if force else type(e).__name__
            raise BadInputError(DICOM_UNREADABLE, f"{path.name}: {what} ({_scrub(e)})") from e
        if force and not any(k in ds for k in ("SOPClassUID", "Modality", "StudyInstanceUID")):
            raise BadInputError(
                DICOM_UNREADABLE, f"{path.name}: not a readable DICOM file (no DICOM image attributes)"
            )
        return ds
    raise AssertionError("unreachable")


def _transfer_syntax(ds: Dataset) -> str:
    """The file's transfer syntax; for a file without meta header, the encoding it was read with."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts:
        return str(ts)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit is False:
        return str(ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    return str(ImplicitVRLittleEndian)


def _check_xa(ds: Dataset, name: str) -> str:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    if modality == "XA" or (not modality and sop in XA_SOP_CLASSES):
        return "XA"
    sop_name = UID(sop).name if sop else "unknown SOP class"
    if modality and not re.fullmatch(r"[A-Z0-9 _]{1,16}", modality):  # not a code string: never echoed
        modality = "(not a modality code)"
    raise BadInputError(DICOM_NOT_XA, f"{name}: Modality {modality or 'missing'} ({sop_name}), expected XA")


def _view_from_header(ds: Dataset, name: str, frames: np.ndarray | None, n_frames: int) -> XaView:
    primary = as_float(_find(ds, "PositionerPrimaryAngle"))
    secondary = as_float(_find(ds, "PositionerSecondaryAngle"))
    return XaView(
        frames=frames,
        primary_angle=primary,
        secondary_angle=secondary,
        frame_time_ms=_frame_time_ms(ds),
        study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_uid=str(ds.get("SOPInstanceUID", "") or ""),
        study_date=parse_dicom_date(ds.get("StudyDate")) or parse_dicom_date(ds.get("SeriesDate")),
        modality=str(ds.get("Modality", "") or "XA"),
        transfer_syntax=_transfer_syntax(ds),
        identifiers=identifiers(ds, name),
        meta={
            "rows": int_or(ds, "Rows", 0),
            "cols": int_or(ds, "Columns", 0),
            "n_frames": n_frames,
            "bits_stored": int_or(ds, "BitsStored", 0) or int_or(ds, "BitsAllocated", 8) or 8,
            "manufacturer": str(ds.get("Manufacturer", "") or ""),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
        },
    )


@contextmanager
def _reading(name: str) -> Iterator[None]:
    """Read a file quietly, and turn any failure to read a header value into DICOM_UNREADABLE.

    pydicom warns about (and logs) invalid values quoting them, and a header value may identify the
    patient: those warnings are dropped. pydicom converts values when they are first used, so a damaged
    element (an unknown VR, a value of the wrong length) fails where it is read; the detail names the
    exception and the tag, never the value.
    """
    logger = logging.getLogger("pydicom")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except BadInputError:
        raise
    except Exception as e:
        tag = re.search(r"\([0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\)", str(e))
        where = f" in {tag.group(0)}" if tag else ""
        raise BadInputError(
            DICOM_UNREADABLE, f"{name}: a header value cannot be read ({type(e).__name__}{where})"
        ) from e
    finally:
        logger.disabled = was_disabled


def _read_checked_header(p: Path, limits: Limits) -> tuple[Dataset, int]:
    """File size, then the header alone (no pixel data read): XA, frame count, limits, burned-in."""
    check_file_size(p, limits)
    ds = _read_dataset(p, stop_before_pixels=True)
    _check_xa(ds, p.name)
    return ds, check_header(ds, p.name, limits)


def read_header(path: str | Path, limits: Limits = Limits()) -> XaView:
    """Header only (frames=None): fast grouping of views into studies.

    Raises `BadInputError`: DICOM_UNREADABLE, DICOM_NOT_XA, DICOM_BAD_FRAME_COUNT, FILE_OVER_LIMIT,
    DICOM_BURNED_IN (the same header checks as `read_xa`).
    """
    p = Path(path)
    with _reading(p.name):
        ds, n_frames = _read_checked_header(p, limits)
        return _view_from_header(ds, p.name, None, n_frames)


def _decode(ds: Dataset, name: str, n_frames: int) -> np.ndarray:
    """Decoded pixel data (native dtype); DICOM_NO_DECODER when no installed plugin can decode it."""
    ts = _transfer_syntax(ds)
    ts_name = UID(ts).name
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError as e:
        raise BadInputError(DICOM_NO_DECODER, f"{name}: no pixel decoder exists for {ts_name} ({ts})") from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise BadInputError(
            DICOM_NO_DECODER, f"{name}: no installed decoder for {ts_name} ({ts}): {missing}; {DECODER_HINT}"
        )
    check_pixel_data(ds, name, n_frames, ts)
    if not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta = getattr(ds, "file_meta", None) or FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = UID(ts)  # pixel_array needs it; a file without meta header
    try:
        px = np.asarray(pixel_array(ds))  # unlike ds.pixel_array, not cached on `ds`
    except Exception as e:
        hint = unsupported_hint(e)
        if hint:
            raise BadInputError(
                DICOM_NO_DECODER, f"{name}: no installed decoder reads this {ts_name} ({ts}) data: {hint}"
            ) from e
        raise BadInputError(
            DICOM_UNREADABLE,
            f"{name}: pixel data could not be decoded as {ts_name} ({type(e).__name__}: {_scrub(e)})",
        ) from e
    del ds["PixelData"]  # the encoded bytes are not needed any more: free them before the float32 copy
    return px


def _to_unit_range(px: np.ndarray, ds: Dataset, n_frames: int) -> np.ndarray:
    """Stored values -> (F, H, W) float32 in [0, 1] by the stored bit depth; MONOCHROME1 inverted.

    Works in place on one float32 array: the peak is the decoded array plus its float32 copy.
    """
    if px.ndim == 4 or (px.ndim == 3 and n_frames == 1 and int_or(ds, "SamplesPerPixel", 1) > 1):
        x = px.mean(axis=-1, dtype=np.float32)  # colour (rare for XA): average samples -> (..., H, W)
    else:
        x = px.astype(np.float32)
    if x.ndim == 2:
        x = x[None]  # (H, W) -> (1, H, W): a single frame is a one-frame cine
    bits = int_or(ds, "BitsStored", 0) or int_or(ds, "BitsAllocated", 8) or 8
    if int_or(ds, "PixelRepresentation", 0) == 1:
        x += np.float32(2 ** (bits - 1))  # signed -> offset binary
    np.divide(x, np.float32(2**bits - 1), out=x)
    np.clip(x, 0.0, 1.0, out=x)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        np.subtract(np.float32(1.0), x, out=x)
    return x


def read_xa(path: str | Path, limits: Limits = Limits()) -> XaView:
    """Read one XA view with its decoded frames (F, H, W) float32 in [0, 1].

    The header is checked against `limits` before any pixel data is read (see the module docstring).
    Raises `BadInputError`: DICOM_UNREADABLE, DICOM_NOT_XA, DICOM_BAD_FRAME_COUNT, FILE_OVER_LIMIT,
    DICOM_BURNED_IN, DICOM_NO_PIXELS, DICOM_NO_DECODER.
    """
    p = Path(path)
    with _reading(p.name):
        _, n_frames = _read_checked_header(p, limits)
        ds = _read_dataset(p, stop_before_pixels=False)
        if "PixelData" not in ds:
            raise BadInputError(DICOM_NO_PIXELS, f"{p.name}: no PixelData element")
        frames = _to_unit_range(_decode(ds, p.name, n_frames), ds, n_frames)
        return _view_from_header(ds, p.name, frames, int(frames.shape[0]))


def _frame_scores(frames: np.ndarray, max_side: int = 128) -> np.ndarray:
    """Contrast-filling score per frame, (F, H, W) -> (F,).

    Why this score: iodine attenuates X-rays multiplicatively (I = I0 exp(-mu d)), so in log intensity
    the contrast agent adds a term and exposure changes add a smooth offset. In a cine the agent arrives
    after a few frames, so the per-pixel maximum over time (brightest = least iodine, MONOCHROME2 sense)
    approximates the contrast-free mask image, as in digital subtraction angiography, and
    `log(mask) - log(frame)` is the iodine signal. Vessels are thin, so a spatial high-pass (minus a local
    mean) keeps vessel-scale structure and drops regional changes (automatic exposure control settling,
    motion of large organs); since vessels cover a small part of the image, the score is the mean of
    the top 5 % of the high-passed difference inside the field of view. Frames are block-averaged to at
    most `max_side` pixels first (suppresses quantum noise, keeps it cheap); collimated (near-black)
    pixels and the rim of the field of view are ignored.
    """
    f, h, w = frames.shape
    step = max(1, int(np.ceil(max(h, w) / max_side)))
    hh, ww = (h // step) * step, (w // step) * step
    small = frames[:, :hh, :ww].reshape(f, hh // step, step, ww // step, step).mean(axis=(2, 4))
    mask = small.max(axis=0)  # (h, w) contrast-free estimate
    fov = binary_erosion(mask > 0.05 * max(float(mask.max()), 1e-6), iterations=2)
    if fov.sum() < 16:
        return np.zeros(f)
    eps = 1e-3
    diff = np.log(mask + eps) - np.log(small + eps)  # (F, h, w) iodine in log units, >= 0
    high = (diff - uniform_filter(diff, size=(1, 9, 9), mode="nearest"))[:, fov]  # (F, n_fov)
    top = np.quantile(high, 0.95, axis=1, keepdims=True)
    sel = high >= top
    return np.where(sel, high, 0.0).sum(axis=1) / np.maximum(sel.sum(axis=1), 1)


def select_key_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """The k frames with the most contrast filling, in time order: (F, H, W) -> (k, H, W).

    With F <= k, frames are repeated (evenly spread indices) to make k.
    """
    f = frames.shape[0]
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if f <= k:
        idx = np.round(np.linspace(0, f - 1, k)).astype(int)
    else:
        scores = _frame_scores(frames)
        idx = np.sort(np.argsort(-scores, kind="stable")[:k])
    return frames[idx]


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """Antialiased bilinear resize, (k, H, W) -> (k, size, size) float32 (non-square inputs are stretched)."""
    x = torch.from_numpy(np.ascontiguousarray(frames, dtype=np.float32))[:, None]  # (k, 1, H, W)
    y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return y[:, 0].clamp_(0.0, 1.0).numpy()  # (k, size, size)
