"""wfdb's header parsers re-bound by stence.data.wfdb_speed give exactly wfdb's own fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import wfdb
from wfdb.io import _header, header

from stence.data import wfdb_speed


def _header_lines(hea: Path) -> list[str]:
    lines, _ = header.parse_header_content(hea.read_text(encoding="ascii", errors="ignore"))
    return lines


def _headers(shared_data: Path, tmp_path: Path) -> list[Path]:
    real = sorted(shared_data.rglob("*.hea"))
    sig = np.random.default_rng(0).standard_normal((500, 3))
    wfdb.wrsamp("made", fs=360, units=["mV", "uV", "mV"], sig_name=["I", "II", "V1"], p_signal=sig,
                fmt=["16", "212", "16"], adc_gain=[200.0, 0.5, 100.0], baseline=[0, 12, -3], write_dir=str(tmp_path),
                comments=["age: 60"], base_date=None)
    return real + [tmp_path / "made.hea"]


def test_patch_is_installed_by_the_reader() -> None:
    import stence.data.wfdb_io  # noqa: F401

    assert wfdb_speed.installed()
    assert wfdb_speed.install()  # idempotent


def test_fast_parsers_equal_wfdbs_own(shared_data: Path, tmp_path: Path) -> None:
    wfdb_speed.install()
    heads = _headers(shared_data, tmp_path)
    assert len(heads) >= 5
    for hea in heads:
        lines = _header_lines(hea)
        rec_fast = _header._parse_record_line(lines[0])
        assert rec_fast == wfdb_speed.original("_parse_record_line")(lines[0]), hea.name
        if rec_fast["n_seg"] is None and len(lines) > 1:
            fast = _header._parse_signal_lines(lines[1:])
            assert fast == wfdb_speed.original("_parse_signal_lines")(lines[1:]), hea.name


def test_defaults_and_special_cases_match() -> None:
    """Empty fields take wfdb's read defaults, a gain of 0 becomes 200, a missing baseline takes ADC zero."""
    wfdb_speed.install()
    lines = ["x.dat 16 0/mV 12 5 0 0 0 I", "x.dat 16", "x.dat 212 100(7)/uV 12 3 -1 0 0 V1"]
    fast = _header._parse_signal_lines(lines)
    assert fast == wfdb_speed.original("_parse_signal_lines")(lines)
    assert fast["adc_gain"][0] == 200.0 and fast["baseline"][0] == 5
    rec = "r 3 360 1000 10:00:00 01/02/2003"
    assert _header._parse_record_line(rec) == wfdb_speed.original("_parse_record_line")(rec)
