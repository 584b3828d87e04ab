"""Shared by the vendor ECG reader tests: the real samples and a reader call that must be refused."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file

from stence.data.ecg_formats import read_ecg_file
from stence.data.limits import Limits
from stence.errors import BadInputError

MUSE = "MUSE_20200923_093504_79000_example.xml"
PHILIPS = "129DYPRG.XML"
HL7 = "ecg_hl7.xml"
DICOM = Path(get_testdata_file("waveform_ecg.dcm"))
# file -> (format, fs, samples per lead, quantum in mV: one step of the stored integers)
REAL = {
    MUSE: ("muse", 500.0, 5000, 4.88e-3),
    PHILIPS: ("philips", 500.0, 5500, 5e-3),
    HL7: ("hl7", 500.0, 5000, 2.5e-3),
    "dicom": ("dicom", 1000.0, 10000, 1.25e-3),
}


def sample_path(vendor: Path, name: str) -> Path:
    return DICOM if name == "dicom" else vendor / name


def refused(path: Path, reason: str, limits: Limits = Limits()) -> BadInputError:
    """Read `path`, expecting BadInputError(`reason`) within 2 s; returns the error."""
    t0 = time.perf_counter()
    with pytest.raises(BadInputError) as info:
        read_ecg_file(path, limits=limits)
    assert time.perf_counter() - t0 < 2.0
    assert info.value.reason == reason, str(info.value)
    return info.value
