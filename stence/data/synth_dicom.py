"""DICOM writers for the synthetic cohort: XA cine runs and the broken files ingest must quarantine.

Files carry no creation timestamps and UIDs derive from the caller's seed, so the same inputs give the
same bytes.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, HTJ2KLossless, RLELossless

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage
CT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage
# A transfer syntax that no installed plugin decodes. JPEG 2000 (1.2.840.10008.1.2.4.90) is *not* used:
# Pillow, installed with matplotlib, decodes it, so garbage there would be a corrupt file, not a missing
# decoder. HTJ2K needs pylibjpeg-openjpeg or GDCM, neither of which the platform installs.
NO_DECODER_SYNTAX = HTJ2KLossless
COMPRESSIONS = ("none", "rle")


def make_uid(*keys: object) -> str:
    """Deterministic UID "2.25.<UUID as integer>" from the given keys (seed, role, index ...).

    (pydicom's `generate_uid(prefix=None, ...)` ignores its entropy sources and is random.)
    """
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, '/'.join(['stence-synth', *map(str, keys)])).int}"


@dataclass(frozen=True)
class XaMeta:
    """Header fields of one view; dates are YYYYMMDD, angles in degrees."""

    patient_name: str
    patient_id: str
    birth_date: str
    sex: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str
    study_time: str
    series_number: int
    primary_angle: float
    secondary_angle: float
    frame_time_ms: float = 66.7  # 15 frames per second


def _base(meta: XaMeta, sop_class: str, modality: str, syntax: str) -> Dataset:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = sop_class
    fm.MediaStorageSOPInstanceUID = meta.sop_uid
    fm.TransferSyntaxUID = syntax
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.sop_uid
    ds.Modality = modality
    ds.Manufacturer = "StenCE synthetic"
    ds.PatientName = meta.patient_name
    ds.PatientID = meta.patient_id
    ds.PatientBirthDate = meta.birth_date
    ds.PatientSex = meta.sex
    ds.StudyInstanceUID = meta.study_uid
    ds.SeriesInstanceUID = meta.series_uid
    ds.StudyDate = meta.study_date
    ds.SeriesDate = meta.study_date
    ds.ContentDate = meta.study_date
    ds.StudyTime = meta.study_time
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesNumber = meta.series_number
    ds.InstanceNumber = 1
    return ds


def _image_module(ds: Dataset, n_frames: int, rows: int, cols: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if n_frames > 0:
        ds.NumberOfFrames = n_frames


def _xa_header(meta: XaMeta, n_frames: int, rows: int, cols: int, syntax: str) -> Dataset:
    ds = _base(meta, XA_SOP_CLASS, "XA", syntax)
    _image_module(ds, n_frames, rows, cols)
    ds.FrameTime = f"{meta.frame_time_ms:.1f}"
    ds.FrameIncrementPointer = Tag(0x0018, 0x1063)  # FrameTime
    ds.PositionerPrimaryAngle = f"{meta.primary_angle:.1f}"
    ds.PositionerSecondaryAngle = f"{meta.secondary_angle:.1f}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "SINGLE PLANE"]
    return ds


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_xa(path: Path, frames: np.ndarray, meta: XaMeta, compression: str = "none") -> None:
    """Write a multi-frame XA cine, frames (F, H, W) uint8, uncompressed or RLE Lossless."""
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression {compression!r}: use one of {COMPRESSIONS}")
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    f, h, w = frames.shape
    ds = _xa_header(meta, f, h, w, ExplicitVRLittleEndian)
    ds.PixelData = frames.tobytes()
    if compression == "rle":
        ds.compress(RLELossless, frames, encoding_plugin="pydicom", generate_instance_uid=False)
    _save(ds, path)


def write_xa_without_pixels(path: Path, meta: XaMeta, n_frames: int, size: int) -> None:
    """An XA header that promises frames but has no PixelData element."""
    _save(_xa_header(meta, n_frames, size, size, ExplicitVRLittleEndian), path)


def write_xa_undecodable(
    path: Path, meta: XaMeta, n_frames: int, size: int, rng: np.random.Generator
) -> None:
    """An XA cine in NO_DECODER_SYNTAX whose encapsulated fragments are random bytes."""
    ds = _xa_header(meta, n_frames, size, size, NO_DECODER_SYNTAX)
    fragments = [rng.integers(0, 256, size * size // 3, dtype=np.uint8).tobytes() for _ in range(n_frames)]
    ds.PixelData = encapsulate(fragments)
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "00"
    _save(ds, path)


def write_ct(path: Path, meta: XaMeta, image: np.ndarray) -> None:
    """A single-frame CT image (another modality filed among the angiograms), image (H, W) uint8."""
    ds = _base(meta, CT_SOP_CLASS, "CT", ExplicitVRLittleEndian)
    image = np.ascontiguousarray(image, dtype=np.uint8)
    _image_module(ds, 0, *image.shape)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "8"
    ds.SliceThickness = "1.0"
    ds.PixelData = image.tobytes()
    _save(ds, path)


__all__ = [
    "COMPRESSIONS",
    "CT_SOP_CLASS",
    "NO_DECODER_SYNTAX",
    "XA_SOP_CLASS",
    "XaMeta",
    "make_uid",
    "write_ct",
    "write_xa",
    "write_xa_undecodable",
    "write_xa_without_pixels",
]
