"""DICOM X-ray angiography views -> frames in [0, 1], C-arm angulation, dates and UIDs.

A single-frame image is read as a one-frame cine. Raw identifying header values are returned separately
in `identifiers`, which only the pseudonymiser may read. Problems a user can act on raise
`BadInputError` with a quarantine reason code.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import get_decoder
from pydicom.uid import UID, ImplicitVRLittleEndian
from scipy.ndimage import binary_erosion, uniform_filter

from stence.errors import DICOM_NO_DECODER, DICOM_NO_PIXELS, DICOM_NOT_XA, DICOM_UNREADABLE, BadInputError

XA_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image Storage
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image Storage
}

# Header keywords that identify a person or a site (after DICOM PS3.15 Basic Profile) -> identifier name.
IDENTIFYING_KEYWORDS: dict[str, str] = {
    "PatientName": "patient_name",
    "PatientID": "patient_id",
    "PatientBirthDate": "birth_date",
    "OtherPatientIDs": "other_patient_ids",
    "OtherPatientNames": "other_patient_names",
    "PatientBirthName": "patient_birth_name",
    "PatientMotherBirthName": "patient_mother_birth_name",
    "PatientAddress": "patient_address",
    "PatientTelephoneNumbers": "patient_telephone",
    "MedicalRecordLocator": "medical_record_locator",
    "IssuerOfPatientID": "issuer_of_patient_id",
    "AccessionNumber": "accession_number",
    "InstitutionName": "institution",
    "InstitutionAddress": "institution_address",
    "InstitutionalDepartmentName": "department",
    "ReferringPhysicianName": "referring_physician",
    "PerformingPhysicianName": "performing_physician",
    "PhysiciansOfRecord": "physicians_of_record",
    "NameOfPhysiciansReadingStudy": "reading_physician",
    "OperatorsName": "operators",
    "RequestingPhysician": "requesting_physician",
    "StationName": "station_name",
    "DeviceSerialNumber": "device_serial_number",
}

# Values that say "nothing here": not identifiers, and useless (even harmful) as leak-scan needles.
_PLACEHOLDERS = {"unknown", "anonymized", "anonymised", "anonymous", "none", "n/a", "na", "null", "removed"}

# Transfer syntaxes and the pixel-data plugins that decode them, for the "install a decoder" hint.
_DECODER_HINT = (
    "install a pydicom pixel-data plugin for it, e.g. `pip install pylibjpeg pylibjpeg-libjpeg "
    "pylibjpeg-openjpeg` (JPEG, JPEG-LS, JPEG 2000, HTJ2K) or `pip install python-gdcm`"
)


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
    for elem in ds:
        if elem.VR == "SQ" and elem.value:
            found = _find(elem.value[0], keyword, depth - 1)
            if found is not None:
                return found
    return None


def _as_float(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        value = value[0] if len(value) else None
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _frame_time_ms(ds: Dataset) -> float | None:
    ft = _as_float(_find(ds, "FrameTime"))
    if ft:
        return ft
    ftv = ds.get("FrameTimeVector")
    if ftv is not None and len(ftv) > 1:
        return float(np.mean([float(v) for v in list(ftv)[1:]]))
    for kw in ("CineRate", "RecommendedDisplayFrameRate"):
        rate = _as_float(ds.get(kw))
        if rate:
            return 1000.0 / rate
    return None


def _text(value: Any) -> str:
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def _identifiers(ds: Dataset) -> dict[str, str]:
    out: dict[str, str] = {}
    for kw, name in IDENTIFYING_KEYWORDS.items():
        v = ds.get(kw)
        if v is None:
            continue
        text = _text(v)
        bare = text.replace("^", "").replace("\\", "").strip()  # "^^^^" is an empty person name
        if bare and bare.casefold() not in _PLACEHOLDERS:
            out[name] = text
    return out


def _read_dataset(path: str | Path, stop_before_pixels: bool) -> Dataset:
    p = Path(path)
    try:
        return pydicom.dcmread(p, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble / "DICM" marker: retry leniently below
    except Exception as e:
        raise BadInputError(DICOM_UNREADABLE, f"{p.name}: {type(e).__name__}: {e}") from e
    try:
        ds = pydicom.dcmread(p, stop_before_pixels=stop_before_pixels, force=True)
        if not any(k in ds for k in ("SOPClassUID", "Modality", "StudyInstanceUID")):
            raise InvalidDicomError("no DICOM image attributes found")
        return ds
    except Exception as e:
        raise BadInputError(DICOM_UNREADABLE, f"{p.name}: not a readable DICOM file ({e})") from e


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    return str(ts) if ts else str(ImplicitVRLittleEndian)


def _check_xa(ds: Dataset, name: str) -> str:
    modality = str(ds.get("Modality", "") or "").strip().upper()
    sop = str(ds.get("SOPClassUID", "") or "")
    if modality == "XA" or (not modality and sop in XA_SOP_CLASSES):
        return "XA"
    sop_name = UID(sop).name if sop else "unknown SOP class"
    raise BadInputError(DICOM_NOT_XA, f"{name}: Modality {modality or 'missing'!s} ({sop_name}), expected XA")


def _view_from_header(ds: Dataset, frames: np.ndarray | None) -> XaView:
    primary = _as_float(_find(ds, "PositionerPrimaryAngle"))
    secondary = _as_float(_find(ds, "PositionerSecondaryAngle"))
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
        identifiers=_identifiers(ds),
        meta={
            "rows": int(ds.get("Rows", 0) or 0),
            "cols": int(ds.get("Columns", 0) or 0),
            "n_frames": int(ds.get("NumberOfFrames", 1) or 1),
            "bits_stored": int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 8) or 8),
            "manufacturer": str(ds.get("Manufacturer", "") or ""),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "sop_class_uid": str(ds.get("SOPClassUID", "") or ""),
        },
    )


def read_header(path: str | Path) -> XaView:
    """Header only (frames=None): fast grouping of views into studies. Raises DICOM_UNREADABLE / NOT_XA."""
    ds = _read_dataset(path, stop_before_pixels=True)
    _check_xa(ds, Path(path).name)
    return _view_from_header(ds, None)


def _decode(ds: Dataset, name: str) -> np.ndarray:
    ts = _transfer_syntax(ds)
    ts_name = UID(ts).name
    try:
        decoder = get_decoder(UID(ts))
    except NotImplementedError as e:
        raise BadInputError(DICOM_NO_DECODER, f"{name}: no pixel decoder exists for {ts_name} ({ts})") from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin installed"
        raise BadInputError(
            DICOM_NO_DECODER, f"{name}: no installed decoder for {ts_name} ({ts}): {missing}; {_DECODER_HINT}"
        )
    try:
        return np.asarray(ds.pixel_array)
    except Exception as e:
        raise BadInputError(
            DICOM_UNREADABLE,
            f"{name}: pixel data could not be decoded as {ts_name} ({type(e).__name__}: {e})",
        ) from e


def _to_unit_range(px: np.ndarray, ds: Dataset, n_frames: int) -> np.ndarray:
    """Stored values -> (F, H, W) float32 in [0, 1] by the stored bit depth; MONOCHROME1 inverted."""
    if px.ndim == 4 or (px.ndim == 3 and n_frames == 1 and int(ds.get("SamplesPerPixel", 1) or 1) > 1):
        px = px.mean(axis=-1)  # colour (rare for XA): average the samples  (..., H, W, 3) -> (..., H, W)
    if px.ndim == 2:
        px = px[None]  # (H, W) -> (1, H, W): a single frame is a one-frame cine
    bits = int(ds.get("BitsStored", 0) or ds.get("BitsAllocated", 8) or 8)
    x = px.astype(np.float32)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        x += np.float32(2 ** (bits - 1))  # signed -> offset binary
    x = np.clip(x / np.float32(2**bits - 1), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        x = 1.0 - x
    return x


def read_xa(path: str | Path) -> XaView:
    """Read one XA view with its decoded frames (F, H, W) float32 in [0, 1].

    Raises `BadInputError`: DICOM_UNREADABLE, DICOM_NOT_XA, DICOM_NO_PIXELS, DICOM_NO_DECODER.
    """
    name = Path(path).name
    ds = _read_dataset(path, stop_before_pixels=False)
    _check_xa(ds, name)
    if "PixelData" not in ds:
        raise BadInputError(DICOM_NO_PIXELS, f"{name}: no PixelData element")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = _to_unit_range(_decode(ds, name), ds, n_frames)
    view = _view_from_header(ds, frames)
    view.meta["n_frames"] = int(frames.shape[0])
    return view


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
