"""DICOM XA reading on the real sample files, quarantine reasons on damaged copies, key-frame selection."""

from __future__ import annotations

import datetime as dt
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_decoder
from pydicom.sequence import Sequence
from pydicom.uid import UID, HTJ2KLossless, JPEG2000Lossless

from stence.data.dicom_io import (
    _find,
    parse_dicom_date,
    read_header,
    read_xa,
    resize_frames,
    select_key_frames,
)
from stence.errors import DICOM_NO_DECODER, DICOM_NO_PIXELS, DICOM_NOT_XA, DICOM_UNREADABLE, BadInputError

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "angio" / "dicom"


def _reason(fn, *args) -> str:
    with pytest.raises(BadInputError) as e:
        fn(*args)
    return e.value.reason


def test_catheter_cine_jpeg_lossless(dicom_dir: Path) -> None:
    v = read_xa(dicom_dir / "XA-MONO2-8-12x-catheter.dcm")
    assert v.frames.shape == (12, 512, 512) and v.frames.dtype == np.float32
    assert 0.0 <= v.frames.min() and v.frames.max() <= 1.0 and v.frames.std() > 0.01
    raw = pydicom.dcmread(dicom_dir / "XA-MONO2-8-12x-catheter.dcm").pixel_array
    np.testing.assert_allclose(v.frames, raw / 255.0, atol=1e-6)  # 8 bits stored -> value / 255
    assert v.study_date == dt.date(1994, 10, 16)  # stored as the non-standard "1994.10.16"
    assert v.transfer_syntax == "1.2.840.10008.1.2.4.70" and v.modality == "XA"
    assert v.meta["n_frames"] == 12 and v.meta["bits_stored"] == 8 and v.frame_time_ms == 33.0
    assert v.study_uid and v.series_uid and v.sop_uid
    assert "Anonymized" not in v.identifiers.values()  # placeholders are not identifiers (nor scan needles)
    assert v.identifiers["institution"] == "Community Hospital"


def test_phantom_angulation_and_identifiers(dicom_dir: Path) -> None:
    v = read_xa(dicom_dir / "phantom_IM8.dcm")
    assert v.frames.shape == (8, 512, 512)
    assert v.primary_angle == pytest.approx(30.7) and v.secondary_angle == pytest.approx(23.6)
    assert v.frame_time_ms == pytest.approx(66.6667, abs=1e-3)
    assert v.study_date == dt.date(2014, 10, 7)
    assert v.identifiers["patient_name"] == "fantom^as"
    assert v.identifiers["patient_id"] == "000000000000000"
    assert v.identifiers["birth_date"] == "19700413"
    assert "institution" in v.identifiers and "device_serial_number" not in v.identifiers  # it says "Unknown"
    text = repr(v) + str(v.meta)  # what a careless log line would print
    for value in ("fantom", "000000000000000", "19700413"):
        assert value not in text


def test_read_header_matches_read_xa_without_pixels(dicom_dir: Path) -> None:
    full = read_xa(dicom_dir / "phantom_IM8.dcm")
    head = read_header(dicom_dir / "phantom_IM8.dcm")
    assert head.frames is None
    assert (head.primary_angle, head.study_uid, head.sop_uid, head.study_date) == (
        full.primary_angle,
        full.study_uid,
        full.sop_uid,
        full.study_date,
    )
    assert head.identifiers == full.identifiers and head.meta["n_frames"] == 8


def test_three_transfer_syntaxes_decode_identically(dicom_dir: Path) -> None:
    views = {n: read_xa(dicom_dir / f"XA1_{n}.dcm") for n in ("UNC", "JPLL", "RLE")}
    ref = views["UNC"].frames
    assert ref.shape == (1, 1024, 1024)  # single frame -> a one-frame cine
    raw = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm").pixel_array
    np.testing.assert_allclose(ref[0], raw / 1023.0, atol=1e-7)  # 10 bits stored -> value / (2**10 - 1)
    assert ref.max() <= 1.0 and ref.max() > 0.4  # a 16-bit scaling would give max ~0.008
    for v in views.values():
        np.testing.assert_array_equal(v.frames, ref)
        assert v.modality == "XA"  # SOP class is Secondary Capture: accepted on Modality
    assert {v.transfer_syntax for v in views.values()} == {
        "1.2.840.10008.1.2.1",
        "1.2.840.10008.1.2.4.70",
        "1.2.840.10008.1.2.5",
    }


def test_monochrome1_is_inverted(dicom_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    ref = read_xa(dicom_dir / "XA1_UNC.dcm").frames
    np.testing.assert_allclose(read_xa(tmp_path / "m1.dcm").frames, 1.0 - ref, atol=1e-6)


def test_other_modality_is_not_xa() -> None:
    ct = pydicom.data.get_testdata_file("CT_small.dcm")
    assert _reason(read_xa, ct) == DICOM_NOT_XA
    assert _reason(read_header, ct) == DICOM_NOT_XA


def test_missing_pixel_data(dicom_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    assert _reason(read_xa, tmp_path / "nopix.dcm") == DICOM_NO_PIXELS
    assert read_header(tmp_path / "nopix.dcm").frames is None  # header-only reading does not need pixels


def _retag(src: Path, dst: Path, ts: UID) -> Path:
    ds = pydicom.dcmread(src)
    ds.file_meta.TransferSyntaxUID = ts
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51 not a codestream " * 8])
    ds["PixelData"].VR = "OB"
    ds.save_as(dst)
    return dst


def test_transfer_syntax_without_decoder(dicom_dir: Path, tmp_path: Path) -> None:
    # JPEG 2000 is the classic case, but Pillow (installed here) decodes it; HTJ2K needs
    # pylibjpeg-openjpeg. Use the first of them that has no decoder in this environment.
    candidates = [ts for ts in (JPEG2000Lossless, HTJ2KLossless) if not get_decoder(ts).is_available]
    if not candidates:
        pytest.skip("every candidate transfer syntax has an installed decoder here")
    path = _retag(dicom_dir / "XA1_UNC.dcm", tmp_path / "nodec.dcm", candidates[0])
    with pytest.raises(BadInputError) as e:
        read_xa(path)
    assert e.value.reason == DICOM_NO_DECODER
    assert candidates[0] in str(e.value) and "pip install" in str(e.value)
    assert read_header(path).transfer_syntax == candidates[0]  # grouping still works without a decoder


def test_garbage_jpeg2000_fragments_are_quarantined(dicom_dir: Path, tmp_path: Path) -> None:
    path = _retag(dicom_dir / "XA1_UNC.dcm", tmp_path / "j2k.dcm", JPEG2000Lossless)
    expected = DICOM_UNREADABLE if get_decoder(JPEG2000Lossless).is_available else DICOM_NO_DECODER
    assert _reason(read_xa, path) == expected


def test_random_bytes_are_unreadable(tmp_path: Path) -> None:
    p = tmp_path / "noise.dcm"
    p.write_bytes(os.urandom(4096))
    assert _reason(read_xa, p) == DICOM_UNREADABLE
    assert _reason(read_header, p) == DICOM_UNREADABLE
    (tmp_path / "empty.dcm").write_bytes(b"")
    assert _reason(read_xa, tmp_path / "empty.dcm") == DICOM_UNREADABLE


def test_file_without_preamble_is_still_read(dicom_dir: Path, tmp_path: Path) -> None:
    src = dicom_dir / "XA1_UNC.dcm"
    shutil.copy(src, tmp_path / "a.dcm")
    raw = (tmp_path / "a.dcm").read_bytes()
    assert raw[128:132] == b"DICM"
    (tmp_path / "b.dcm").write_bytes(raw[132:])  # no preamble, no "DICM": some exports do this
    assert read_xa(tmp_path / "b.dcm").frames.shape == (1, 1024, 1024)


@pytest.mark.parametrize(
    "value,expected",
    [
        ("19941016", dt.date(1994, 10, 16)),
        ("1994.10.16", dt.date(1994, 10, 16)),
        ("1994-10-16", dt.date(1994, 10, 16)),
        ("20141007120000", dt.date(2014, 10, 7)),
        ("", None),
        ("19941350", None),
        (None, None),
        ("unknown", None),
    ],
)
def test_tolerant_date_parsing(value, expected) -> None:
    assert parse_dicom_date(value) == expected


def test_angles_found_in_enhanced_functional_groups() -> None:
    inner = Dataset()
    inner.PositionerPrimaryAngle = -31.5
    inner.PositionerSecondaryAngle = 12.0
    group = Dataset()
    group.PositionerPositionSequence = Sequence([inner])
    ds = Dataset()
    ds.SharedFunctionalGroupsSequence = Sequence([group])
    assert _find(ds, "PositionerPrimaryAngle") == -31.5 and _find(ds, "PositionerSecondaryAngle") == 12.0


def _synthetic_cine(n_frames: int = 10, peak: int = 6, size: int = 256, seed: int = 0) -> np.ndarray:
    """Noisy background, a vessel whose iodine rises to a peak at frame `peak`, exposure flicker."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size] / size
    background = 0.55 + 0.15 * np.sin(3 * xx) * np.cos(2 * yy)  # smooth anatomy
    vessel = np.exp(-(((yy - 0.5 - 0.2 * np.sin(6 * xx)) / 0.012) ** 2))  # thin curved vessel
    fill = np.exp(-0.5 * ((np.arange(n_frames) - peak) / 1.5) ** 2)  # bolus in time
    gain = 1.0 + 0.08 * rng.standard_normal(n_frames)  # automatic exposure control flicker
    gain[0] = 0.8  # a dark settling frame, as in the real catheter cine
    frames = gain[:, None, None] * background * np.exp(-0.6 * fill[:, None, None] * vessel)
    frames += 0.02 * rng.standard_normal(frames.shape)
    return np.clip(frames, 0, 1).astype(np.float32)


def test_key_frames_are_the_most_filled_in_time_order() -> None:
    cine = _synthetic_cine(peak=6)
    one = select_key_frames(cine, 1)
    np.testing.assert_array_equal(one[0], cine[6])
    three = select_key_frames(cine, 3)
    picked = [int(np.flatnonzero([np.array_equal(f, c) for c in cine])[0]) for f in three]
    assert picked == sorted(picked) and set(picked) == {5, 6, 7}
    early = _synthetic_cine(peak=2, seed=3)
    np.testing.assert_array_equal(select_key_frames(early, 1)[0], early[2])


def test_key_frames_of_short_cines_and_real_file(dicom_dir: Path) -> None:
    single = np.random.default_rng(0).random((1, 32, 32)).astype(np.float32)
    assert select_key_frames(single, 1).shape == (1, 32, 32)
    rep = select_key_frames(single, 3)
    assert rep.shape == (3, 32, 32) and all(np.array_equal(r, single[0]) for r in rep)
    frames = read_xa(dicom_dir / "phantom_IM8.dcm").frames
    assert select_key_frames(frames, 2).shape == (2, 512, 512)


def test_resize_frames_shape_range_and_content() -> None:
    cine = _synthetic_cine(n_frames=3, size=200)
    out = resize_frames(cine, 64)
    assert out.shape == (3, 64, 64) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert abs(out.mean() - cine.mean()) < 0.01  # area-preserving up to interpolation
    const = np.full((1, 100, 140), 0.3, dtype=np.float32)
    np.testing.assert_allclose(resize_frames(const, 32), 0.3, atol=1e-6)
