"""Crafted and unexpected DICOM files are refused with a reason from their header, before any decoding,
in bounded time: over-limit cines, bad frame counts, burned-in annotation, codestream bombs, JPEG
variants no installed plugin decodes; and every identifying header value reaches `identifiers`.

Files are real (../shared sample files, pydicom's own test files) or written with pydicom into tmp_path.
"""

from __future__ import annotations

import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_fragments
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import UID, RLELossless, generate_uid

from stence.data import dicom_io
from stence.data.dicom_checks import codestream_size, unsupported_hint
from stence.data.dicom_ids import MAX_DEPTH, MAX_VALUES, identifiers
from stence.data.dicom_io import read_header, read_xa
from stence.data.limits import Limits
from stence.errors import (
    DICOM_BAD_FRAME_COUNT,
    DICOM_BURNED_IN,
    DICOM_NO_DECODER,
    DICOM_UNREADABLE,
    FILE_OVER_LIMIT,
    BadInputError,
)

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR", "ignore:Value .* is not valid")

XA_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"
JPEG_EXTENDED = UID("1.2.840.10008.1.2.4.51")
MIB = 1 << 20


@pytest.fixture(scope="module")
def dicom_dir(shared_data: Path) -> Path:
    return shared_data / "angio" / "dicom"


def _refusal(fn, *args, **kwargs) -> BadInputError:
    with pytest.raises(BadInputError) as e:
        fn(*args, **kwargs)
    return e.value


def _xa_header(ts: UID, rows: int, cols: int, n_frames: int | None, bits: int = 16) -> Dataset:
    """A minimal XA image header (no pixel data) in transfer syntax `ts`."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = XA_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ts
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = XA_SOP_CLASS, fm.MediaStorageSOPInstanceUID, "XA"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID = "LIMIT-TEST-1"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if n_frames is not None:
        ds.NumberOfFrames = n_frames
    return ds


def _set_frames_raw(ds: Dataset, value: bytes) -> None:
    """NumberOfFrames written exactly as `value` (pydicom would refuse to set most invalid values)."""
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(value), value, 0, False, True)


# ---- header limits, checked before any pixel data is read ------------------------------------------------


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The files whose pixel data read_xa decoded (a spy on its decoding call, which still decodes)."""
    calls: list[str] = []

    def spy(ds, *args, **kwargs):
        calls.append(str(getattr(ds, "filename", ds)))
        return pixel_array(ds, *args, **kwargs)

    monkeypatch.setattr(dicom_io, "pixel_array", spy)
    return calls


def test_the_decoding_spy_sees_a_decode(dicom_dir: Path, decoded: list[str]) -> None:
    read_xa(dicom_dir / "XA1_RLE.dcm")
    assert len(decoded) == 1  # so an empty list below means: refused before any pixel was decoded


def test_rle_cine_claiming_gigabytes_is_refused_from_its_header(tmp_path: Path, decoded: list[str]) -> None:
    # 5000 frames of 2048 x 2048 x 16 bit would decode to 40 GiB; the file itself holds 2 MB of RLE
    ds = _xa_header(RLELossless, 2048, 2048, 5000)
    ds.PixelData = encapsulate([b"\x02\x00\x00\x00" + bytes(60) + b"\x81\x00" * 4096] * 256)
    ds["PixelData"].VR = "OB"
    path = tmp_path / "bomb.dcm"
    ds.save_as(path, enforce_file_format=True)
    for limits in (Limits(), Limits(max_frames=10_000)):  # refused on frames, then on decoded size
        err = _refusal(read_xa, path, limits)
        assert decoded == [], "refused after decoding"
        assert err.reason == FILE_OVER_LIMIT
        assert _refusal(read_header, path, limits).reason == FILE_OVER_LIMIT
    assert "5000 frames" in err.detail and "ingest.max_decoded_mb" in err.detail and "MiB" in err.detail
    assert "LIMIT-TEST-1" not in err.detail  # details never carry header identifiers
    assert "ingest.max_frames" in _refusal(read_xa, path).detail


def test_frame_limit_on_a_real_cine(dicom_dir: Path) -> None:
    cine = dicom_dir / "XA-MONO2-8-12x-catheter.dcm"
    err = _refusal(read_xa, cine, Limits(max_frames=10))
    assert err.reason == FILE_OVER_LIMIT and "12 frames" in err.detail and "10" in err.detail
    assert "ingest.max_frames" in err.detail
    assert read_xa(cine, Limits(max_frames=12)).frames.shape == (12, 512, 512)


def test_decoded_and_float32_sizes_and_file_size_are_limited(dicom_dir: Path) -> None:
    image = dicom_dir / "XA1_UNC.dcm"  # 2.0 MB file, 1024 x 1024 x 2 B = 2 MiB decoded, 4 MiB as float32
    err = _refusal(read_xa, image, Limits(max_decoded_bytes=3 * MIB))
    assert err.reason == FILE_OVER_LIMIT and "float32" in err.detail and "ingest.max_decoded_mb" in err.detail
    assert _refusal(read_header, image, Limits(max_decoded_bytes=3 * MIB)).reason == FILE_OVER_LIMIT
    err = _refusal(read_xa, image, Limits(max_decoded_bytes=MIB))
    assert err.reason == FILE_OVER_LIMIT and "file of 2.0 MiB" in err.detail
    assert read_xa(image, Limits(max_decoded_bytes=4 * MIB)).frames.shape == (1, 1024, 1024)


@pytest.mark.parametrize("value", [b"0 ", b"-3", b"abc ", b"1.5 ", b"2\\3 "])
def test_bad_frame_count(dicom_dir: Path, tmp_path: Path, value: bytes) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    _set_frames_raw(ds, value)
    ds.save_as(tmp_path / "nf.dcm")
    err = _refusal(read_xa, tmp_path / "nf.dcm")
    assert err.reason == DICOM_BAD_FRAME_COUNT and "NumberOfFrames" in err.detail
    assert _refusal(read_header, tmp_path / "nf.dcm").reason == DICOM_BAD_FRAME_COUNT


def test_frame_count_beyond_the_native_pixel_data(dicom_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")  # one uncompressed frame
    ds.NumberOfFrames = 3
    ds.save_as(tmp_path / "short.dcm")
    assert read_header(tmp_path / "short.dcm").meta["n_frames"] == 3  # the header alone cannot tell
    err = _refusal(read_xa, tmp_path / "short.dcm")
    assert err.reason == DICOM_BAD_FRAME_COUNT and "3 frame(s)" in err.detail


def test_burned_in_annotation_is_quarantined(dicom_dir: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    err = _refusal(read_xa, tmp_path / "burned.dcm")
    assert err.reason == DICOM_BURNED_IN
    assert _refusal(read_header, tmp_path / "burned.dcm").reason == DICOM_BURNED_IN
    ds.BurnedInAnnotation = "NO"
    ds.save_as(tmp_path / "clean.dcm")
    assert read_xa(tmp_path / "clean.dcm").frames.shape == (1, 1024, 1024)


def test_header_of_very_many_elements_is_refused_while_parsing(dicom_dir: Path, tmp_path: Path) -> None:
    # 120 000 private 10-byte elements (1.1 MB) would become ~150 MB of Python objects and minutes of work
    raw = (dicom_dir / "XA1_UNC.dcm").read_bytes()
    at = raw.index(b"\x10\x00\x10\x00PN")  # PatientName, the first element of group 0010
    n = 120_000
    groups = [0x0009 + 2 * (i // 0xF000) for i in range(n)]  # private groups 0009, 000B: before 0010
    many = b"".join(struct.pack("<HH2sHH", g, 0x1000 + i % 0xF000, b"US", 2, 0) for i, g in enumerate(groups))
    (tmp_path / "many.dcm").write_bytes(raw[:at] + many + raw[at:])
    tracemalloc.start()
    try:
        err = _refusal(read_header, tmp_path / "many.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.reason == FILE_OVER_LIMIT and "header elements" in err.detail
    assert peak < 40e6, peak  # refused while parsing: the elements never became ~150 MB of objects


# ---- pixel data that cannot match its header: refused before decoding --------------------------------------


def test_jpeg_frame_declaring_a_huge_image_is_refused(dicom_dir: Path, tmp_path: Path, decoded: list[str]) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA-MONO2-8-12x-catheter.dcm")
    frames = list(generate_fragments(ds.PixelData))[1:]
    assert codestream_size(frames[0]) == (512, 512)
    sof = frames[0].index(b"\xff\xc3")  # lossless JPEG frame header: FFC3, length, precision, Y, X
    frames[0] = frames[0][: sof + 5] + b"\xff\xff\xff\xff" + frames[0][sof + 9 :]  # 65535 x 65535: 8 GiB
    ds.PixelData = encapsulate(frames)
    ds.save_as(tmp_path / "jpeg_bomb.dcm")
    err = _refusal(read_xa, tmp_path / "jpeg_bomb.dcm")
    assert decoded == []
    assert err.reason == DICOM_UNREADABLE and "65535 x 65535" in err.detail


def test_rle_frame_longer_than_any_encoding_is_refused(dicom_dir: Path, tmp_path: Path, decoded: list[str]) -> None:
    ds = pydicom.dcmread(dicom_dir / "XA1_RLE.dcm")  # 1024 x 1024, 16 bit: 2 segments of 1 MiB decoded
    n = 1_200_000  # repeat runs of 128 bytes: each segment would expand to 154 MB before any check
    bomb = (2).to_bytes(4, "little") + (64).to_bytes(4, "little") + (64 + 2 * n).to_bytes(4, "little")
    bomb = bomb + bytes(52) + b"\x81\x00" * n + b"\x81\x00" * n
    ds.PixelData = encapsulate([bomb])
    ds.save_as(tmp_path / "rle_bomb.dcm")
    err = _refusal(read_xa, tmp_path / "rle_bomb.dcm")
    assert decoded == []
    assert err.reason == DICOM_UNREADABLE and "RLE frame" in err.detail


# ---- JPEG Extended (12 bit): a variant without a decoder is DICOM_NO_DECODER, broken data is UNREADABLE --------


def _as_xa(name: str, dst: Path) -> Path:
    """One of pydicom's own test files (an NM image) relabelled as XA."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    ds.Modality, ds.SOPClassUID = "XA", XA_SOP_CLASS
    ds.file_meta.MediaStorageSOPClassUID = XA_SOP_CLASS
    ds.save_as(dst)
    return dst


def test_jpeg_extended_with_nonconformant_scan_header_has_no_decoder(tmp_path: Path) -> None:
    # pydicom's JPEG-lossy.dcm: 12-bit JPEG Extended whose SOS says Se=0 (not 63), like the NEMA WG04
    # *_JPLY files. pylibjpeg-libjpeg refuses it; Pillow and pydicom's GDCM plugin have no 12-bit JPEG.
    path = _as_xa("JPEG-lossy.dcm", tmp_path / "jply.dcm")
    err = _refusal(read_xa, path)
    assert err.reason == DICOM_NO_DECODER
    assert "Se=0" in err.detail and "gdcmconv" in err.detail and JPEG_EXTENDED in err.detail
    assert read_header(path).transfer_syntax == JPEG_EXTENDED  # grouping still works


def test_conformant_jpeg_extended_decodes(tmp_path: Path) -> None:
    # JPGExtended.dcm is the same codestream with Se=63: pylibjpeg-libjpeg decodes it
    from pydicom.pixels import get_decoder

    path = _as_xa("JPGExtended.dcm", tmp_path / "jpext.dcm")
    if not {"pylibjpeg", "gdcm"} & set(get_decoder(JPEG_EXTENDED).available_plugins):
        assert _refusal(read_xa, path).reason == DICOM_NO_DECODER  # Pillow alone: no 12-bit JPEG
        return
    v = read_xa(path)
    raw = pydicom.dcmread(path).pixel_array
    assert v.frames.shape == (1, 1024, 256)
    np.testing.assert_allclose(v.frames[0], raw / 4095.0, atol=1e-6)  # 12 bits stored


def test_broken_jpeg_extended_data_is_unreadable(dicom_dir: Path, tmp_path: Path) -> None:
    from pydicom.pixels import get_decoder

    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.file_meta.TransferSyntaxUID = JPEG_EXTENDED
    ds.BitsStored, ds.HighBit = 12, 11
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 4])  # SOI, then no JPEG
    ds["PixelData"].VR = "OB"
    ds.save_as(tmp_path / "broken.dcm")
    supported = {"pylibjpeg", "gdcm"} & set(get_decoder(JPEG_EXTENDED).available_plugins)
    assert _refusal(read_xa, tmp_path / "broken.dcm").reason == (
        DICOM_UNREADABLE if supported else DICOM_NO_DECODER
    )


def test_plugin_failure_classification() -> None:
    head = "Unable to decode as exceptions were raised by all available plugins:\n"
    pillow = "  pillow: Pillow does not support 'JPEG Extended' for samples with 12-bit precision\n"
    se0 = "  pylibjpeg: libjpeg error code '-1038' returned from Decode(): A misplaced marker segment was found - "
    se0 += "scan start must be zero and scan stop must be 63 for the sequential operating modes\n"
    eof = "  pylibjpeg: libjpeg error code '-1038' returned from Decode(): ... unexpected EOF while parsing\n"
    gdcm = "  gdcm: GDCM does not support 'JPEG Extended' for samples with 12-bit precision\n"
    assert "pylibjpeg-libjpeg" in (unsupported_hint(RuntimeError(head + pillow + gdcm)) or "")  # no libjpeg
    assert "gdcmconv" in (unsupported_hint(RuntimeError(head + se0 + pillow + gdcm)) or "")  # most specific
    assert "pip install" in (unsupported_hint(RuntimeError(head + "  x: HTJ2K is not supported\n")) or "")
    assert unsupported_hint(RuntimeError(head + eof + pillow)) is None  # a capable plugin failed: broken
    assert unsupported_hint(ValueError("could not broadcast input array")) is None


def test_real_files_pass_the_default_limits(dicom_dir: Path) -> None:
    for path in sorted(dicom_dir.glob("*.dcm")):
        v = read_xa(path)
        assert v.frames.ndim == 3 and read_header(path).meta["n_frames"] == v.frames.shape[0]


# ---- identifiers: every identifying value, anywhere in the header ----------------------------------------


def _identifying_xa(dicom_dir: Path) -> Dataset:
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.PatientID = "PID-000123"
    ds.OtherPatientIDs = ["OLD-ID-4711", "OLD-ID-4712"]
    ds.AccessionNumber = "ACC-99887766"
    ds.InstitutionName = "St Elsewhere General"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyTime = "101530.25"
    ds.PatientComments = "Seen by Dr Quincy on the night shift"  # LT free text
    ds.OperatorsName = "ANONYMIZED"  # a placeholder: no needle
    ds.PositionerPrimaryAngle = "31.5"  # numeric: what the platform writes, never an identifier
    deep = Dataset()
    deep.PersonName = "Deepest^Nested"
    inner = Dataset()
    inner.ScheduledPerformingPhysicianName = "Nested^Norbert"
    inner.PatientID = "PID-NESTED-1"  # a nested PatientID must not become the view's patient
    inner.ReferencedSOPInstanceUID = generate_uid()
    inner.ContentSequence = Sequence([deep])
    second = Dataset()
    second.ScheduledPerformingPhysicianName = "Nested^Nora"
    ds.RequestAttributesSequence = Sequence([inner, second])
    block = ds.private_block(0x0029, "ACME IMAGING 1.0", create=True)
    block.add_new(0x10, "LO", "PRIVATE-NAME-7788")
    block.add_new(0x11, "UN", b"Hidden^Harriet ")
    block.add_new(0x12, "OB", bytes(range(256)))  # binary: not text, not a needle
    block.add_new(0x13, "UI", "1.2.3.4.5.6.7.8")  # a UID: ingest handles those itself
    return ds


def test_identifiers_cover_nested_private_and_free_text_values(dicom_dir: Path, tmp_path: Path) -> None:
    _identifying_xa(dicom_dir).save_as(tmp_path / "ids.dcm")
    view = read_xa(tmp_path / "ids.dcm")
    ids = view.identifiers
    values = set(ids.values())
    for expected in (
        "PID-000123",
        "OLD-ID-4711",
        "OLD-ID-4712",  # a multi-valued element gives one value each
        "ACC-99887766",
        "St Elsewhere General",
        "Referrer^Rita",
        "101530.25",
        "Seen by Dr Quincy on the night shift",
        "Nested^Norbert",
        "Nested^Nora",  # the same keyword in a second sequence item is kept too
        "Deepest^Nested",
        "PID-NESTED-1",
        "PRIVATE-NAME-7788",
        "Hidden^Harriet",  # private bytes, decoded as latin-1
    ):
        assert expected in values, expected
    assert ids["patient_id"] == "PID-000123" and ids["accession_number"] == "ACC-99887766"
    assert ids["institution"] == "St Elsewhere General" and ids["referring_physician"] == "Referrer^Rita"
    assert {ids["other_patient_ids"], ids["other_patient_ids_2"]} == {"OLD-ID-4711", "OLD-ID-4712"}
    assert ids["tag_StudyTime"] == "101530.25" and ids["tag_0029,1010"] == "PRIVATE-NAME-7788"
    assert {ids["tag_ScheduledPerformingPhysicianName"], ids["tag_ScheduledPerformingPhysicianName_2"]} == {
        "Nested^Norbert",
        "Nested^Nora",
    }
    assert "ANONYMIZED" not in values and "ACME IMAGING 1.0" not in values  # placeholder, private creator
    assert not any(v.startswith("1.2.") for v in values)  # no UIDs (study, series, SOP, private UI)
    assert "31.5" not in values and view.primary_angle == pytest.approx(31.5)
    assert read_header(tmp_path / "ids.dcm").identifiers == ids


def test_private_values_of_an_implicit_vr_file(dicom_dir: Path, tmp_path: Path) -> None:
    # implicit VR: unknown private elements are read back as VR UN bytes
    ds = _identifying_xa(dicom_dir)
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2")
    ds.save_as(tmp_path / "implicit.dcm", implicit_vr=True, little_endian=True)
    values = set(read_header(tmp_path / "implicit.dcm").identifiers.values())
    assert {
        "PRIVATE-NAME-7788",
        "Hidden^Harriet",
        "Nested^Norbert",
        "Seen by Dr Quincy on the night shift",
    } <= values


def test_identifier_walk_is_depth_bounded() -> None:
    ds = Dataset()
    ds.PatientName = "Top^Level"
    node = ds
    for depth in range(1, 40):  # a crafted header can nest far deeper than any real one
        child = Dataset()
        child.PersonName = f"Depth^{depth}"
        node.ContentSequence = Sequence([child])
        node = child
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no recursion trouble, no warning
        ids = identifiers(ds)
    assert ids["patient_name"] == "Top^Level"
    assert f"Depth^{MAX_DEPTH}" in ids.values() and f"Depth^{MAX_DEPTH + 1}" not in ids.values()


def test_identifier_count_is_bounded() -> None:
    ds = Dataset()
    ds.OtherPatientIDs = [f"ID-{i:06d}" for i in range(MAX_VALUES + 5)]  # each value would be a needle
    with pytest.raises(BadInputError) as e:
        identifiers(ds, "many.dcm")
    assert e.value.reason == DICOM_UNREADABLE
    assert "ID-000001" not in e.value.detail


# ---- damaged headers: a reason, never a crash ------------------------------------------------------------


def test_unknown_value_representation(dicom_dir: Path, tmp_path: Path) -> None:
    raw = (dicom_dir / "XA1_UNC.dcm").read_bytes()  # explicit VR little endian
    at = raw.index(b"\x10\x00\x20\x00LO")  # PatientID
    (tmp_path / "pid.dcm").write_bytes(raw[: at + 4] + b"ZZ" + raw[at + 6 :])
    # an identifying element pydicom cannot convert is still read, from its bytes, for the leak scan
    assert read_header(tmp_path / "pid.dcm").identifiers["patient_id"] == "20XA1"
    at = raw.index(b"\x28\x00\x10\x00US")  # Rows: needed to check and decode the image
    (tmp_path / "rows.dcm").write_bytes(raw[: at + 4] + b"ZZ" + raw[at + 6 :])
    for fn in (read_header, read_xa):
        err = _refusal(fn, tmp_path / "rows.dcm")
        assert err.reason == DICOM_UNREADABLE and "(0028,0010)" in err.detail


def test_mutated_headers_are_refused_with_a_reason_never_a_crash(dicom_dir: Path, tmp_path: Path) -> None:
    # random byte changes in the headers of the real files: each read ends in a view or a BadInputError
    rng = np.random.default_rng(3)
    sources = [
        (dicom_dir / n).read_bytes()
        for n in ("phantom_IM8.dcm", "XA-MONO2-8-12x-catheter.dcm", "XA1_RLE.dcm")
    ]
    reasons: set[str] = set()
    for i in range(90):
        data = bytearray(sources[i % len(sources)])
        for pos in rng.integers(132, 1500, size=int(rng.integers(1, 6))):
            data[pos] = int(rng.integers(256))
        path = tmp_path / f"m{i}.dcm"
        path.write_bytes(bytes(data))
        for fn in (read_header, read_xa):
            try:
                fn(path)
            except BadInputError as e:
                reasons.add(e.reason)
    assert DICOM_UNREADABLE in reasons  # the mutations did damage something


def test_header_values_never_reach_details_warnings_or_logs(
    dicom_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # pydicom warns about invalid values quoting them; a quarantine detail is written to the cohort
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    _set_frames_raw(ds, b"SECRET-PID-42 ")
    ds.save_as(tmp_path / "frames.dcm")
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.Modality = "Doe^John"
    ds.save_as(tmp_path / "modality.dcm")
    caplog.set_level("DEBUG")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        frames = _refusal(read_xa, tmp_path / "frames.dcm")
        modality = _refusal(read_header, tmp_path / "modality.dcm")
    assert frames.reason == DICOM_BAD_FRAME_COUNT and "SECRET" not in frames.detail
    assert modality.reason == "dicom_not_xa" and "JOHN" not in modality.detail.upper()
    assert not [w for w in seen if "SECRET" in str(w.message)]
    assert "SECRET" not in caplog.text


@pytest.mark.parametrize("compressed", [False, True])
def test_peak_memory_is_the_decoded_array_and_its_float32_copy(
    dicom_dir: Path, tmp_path: Path, compressed: bool
) -> None:
    import tracemalloc

    n, side = 16, 256
    pixels = np.random.default_rng(0).integers(0, 1024, (n, side, side)).astype(np.uint16)
    ds = pydicom.dcmread(dicom_dir / "XA1_UNC.dcm")
    ds.Rows = ds.Columns = side
    ds.NumberOfFrames = n
    ds.PixelData = pixels.tobytes()
    if compressed:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "cine.dcm")
    native, as_float32 = pixels.nbytes, pixels.size * 4
    file_size = (tmp_path / "cine.dcm").stat().st_size
    tracemalloc.start()
    try:
        view = read_xa(tmp_path / "cine.dcm")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_allclose(view.frames, pixels / 1023.0, atol=1e-6)  # 10 bits stored
    bound = max(file_size + native, native + as_float32)  # the module docstring's bound
    assert peak < 1.1 * bound + MIB, (peak, bound)
