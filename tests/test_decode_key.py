"""The staging key of an ECG record looks at the record's own files only: one stat per named file."""

from __future__ import annotations

import os
from pathlib import Path

from stence.data.decode import _record_key


def _files(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "r1.hea").write_text("r1 1 500 10\nr1.dat 16 200 16 0 0 0 0 I\n")
    (folder / "r1.dat").write_bytes(b"\0" * 20)
    return folder / "r1.hea"


def test_key_changes_with_the_named_signal_file_only(tmp_path: Path) -> None:
    hea = _files(tmp_path)
    k0 = _record_key(hea, "ecg/r1.hea", ["r1.dat"])
    (tmp_path / "r1.atr").write_bytes(b"x")  # a file beside it that the header does not name
    for i in range(50):
        (tmp_path / f"other{i}.dat").write_bytes(b"y")
    assert _record_key(hea, "ecg/r1.hea", ["r1.dat"]) == k0
    (tmp_path / "r1.dat").write_bytes(b"\0" * 22)  # the record's own signal changed
    assert _record_key(hea, "ecg/r1.hea", ["r1.dat"]) != k0


def test_key_depends_on_path_header_and_missing_files(tmp_path: Path) -> None:
    hea = _files(tmp_path)
    k0 = _record_key(hea, "ecg/r1.hea", ["r1.dat"])
    assert _record_key(hea, "other/r1.hea", ["r1.dat"]) != k0
    assert _record_key(hea, "ecg/r1.hea", ["r1.dat", "gone.dat"]) != k0
    st = hea.stat()
    os.utime(hea, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert _record_key(hea, "ecg/r1.hea", ["r1.dat"]) != k0
