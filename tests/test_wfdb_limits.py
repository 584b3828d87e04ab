"""WFDB headers that ask for too much are refused from the header alone, before any sample is read.

Crafted headers are written into tmp_path (no mocks of wfdb). "Before reading" is shown by the signal file:
absent (a read would fail with a missing-file reason instead) or sparse and huge. The cases whose failure
would be a blow-up (10^6 signals, a sparse 432 MB signal file) run in a child process under an address-space
limit of about 1 GiB and a CPU-time limit, so that a regression fails the test instead of the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import wfdb

from stence.config import STANDARD_LEADS, IngestConfig
from stence.data.limits import Limits
from stence.data.wfdb_io import read_ecg
from stence.errors import ECG_BAD_HEADER, ECG_MISSING_SIGNAL_FILE, FILE_OVER_LIMIT, BadInputError

REPO = Path(__file__).resolve().parents[1]
FS, N = 500, 1000  # the small good record: 2 s at 500 Hz
TEN_HOURS = FS * 36_000


def _write_record(d: Path, name: str = "rec", extra: int = 0, comments: list[str] | None = None) -> Path:
    """A good 12-lead record (+ `extra` non-standard signals in the same file); returns the .hea path."""
    rng = np.random.default_rng(0)
    names = list(STANDARD_LEADS) + [f"x{i}" for i in range(extra)]
    sig = rng.normal(0, 0.3, size=(N, len(names)))
    wfdb.wrsamp(name, fs=FS, units=["mV"] * len(names), sig_name=names, p_signal=sig, fmt=["16"] * len(names),
                adc_gain=[1000.0] * len(names), baseline=[0] * len(names), comments=comments or [],
                write_dir=str(d))  # fmt: skip
    return d / f"{name}.hea"


def _set_record_line(hea: Path, line: str) -> None:
    lines = hea.read_text().splitlines(keepends=True)
    lines[0] = line + "\n"
    hea.write_text("".join(lines))


def _refusal(hea: Path, limits: Limits = Limits()) -> BadInputError:
    with pytest.raises(BadInputError) as e:
        read_ecg(hea, limits=limits)
    return e.value


_CHILD = r"""
import json, resource, sys
from stence.data.limits import Limits
from stence.data.wfdb_io import read_ecg
from stence.errors import BadInputError

with open("/proc/self/statm") as f:  # what the imports already hold, plus 1 GiB
    vm = int(f.read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), vm + (1 << 30)))
resource.setrlimit(resource.RLIMIT_CPU, (120, 120))
try:
    read_ecg(sys.argv[1], limits=Limits(**json.loads(sys.argv[2])))
    print(json.dumps({"reason": None, "detail": ""}))
except BadInputError as e:
    print(json.dumps({"reason": e.reason, "detail": e.detail}))
"""


def _refusal_bounded(hea: Path, limits: Limits = Limits()) -> dict:
    """read_ecg in a child process limited to ~1 GiB more address space and 120 s of CPU."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(hea), json.dumps(asdict(limits))], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert out.returncode == 0, f"child died (rc {out.returncode}): {out.stderr[-2000:]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_proc = pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc for rlimits")


def test_good_record_reads_under_the_default_and_configured_limits(tmp_path: Path) -> None:
    hea = _write_record(tmp_path)
    for limits in (Limits(), Limits.from_config(IngestConfig())):
        rec = read_ecg(hea, limits=limits)
        assert rec.signal.shape == (12, N) and rec.fs == FS


@pytest.mark.parametrize("fs,key", [("0.01", "ingest.min_fs"), ("1e9", "ingest.max_fs"), ("-500", "ingest.min_fs"),
                                    ("nan", "ingest.min_fs"), ("inf", "ingest.max_fs")])  # fmt: skip
def test_implausible_rate_is_refused_before_reading(tmp_path: Path, fs: str, key: str) -> None:
    hea = _write_record(tmp_path)
    _set_record_line(hea, f"rec 12 {fs} {N}")
    (tmp_path / "rec.dat").unlink()  # a read would say "missing signal file"
    e = _refusal(hea)
    assert e.reason == ECG_BAD_HEADER and "implausible sampling rate" in e.detail and fs in e.detail
    assert key in e.detail


@pytest.mark.parametrize("fs,read_as", [("1e9", "1"), ("5E2", "5"), ("1_000", "1")])
def test_rate_wfdb_misreads_is_refused_even_within_limits(tmp_path: Path, fs: str, read_as: str) -> None:
    """wfdb's record-line regex reads `1e9` as 1 Hz (and drops the length): the text and wfdb must agree."""
    hea = _write_record(tmp_path)
    _set_record_line(hea, f"rec 12 {fs} {N}")
    e = _refusal(hea, Limits(min_fs=0.5, max_fs=2e9))  # the rate itself is allowed here
    assert e.reason == ECG_BAD_HEADER and "implausible sampling rate" in e.detail
    assert f"reads it as {read_as} Hz" in e.detail


def test_record_line_forms_wfdb_allows_still_read(tmp_path: Path) -> None:
    hea = _write_record(tmp_path)
    _set_record_line(hea, f"rec 12 {FS}.0/1000(0) {N} 10:00:00 01/02/2020")  # counter frequency, time, date
    assert read_ecg(hea).signal.shape == (12, N)
    _set_record_line(hea, f"rec 12 {FS}")  # no length: inferred from the signal file
    assert read_ecg(hea).signal.shape == (12, N)
    _set_record_line(hea, "rec 12")  # no rate: the WFDB default, 250 Hz
    rec = read_ecg(hea)
    assert rec.fs == 250.0 and rec.signal.shape == (12, N)


def test_unreadable_record_line_fields_are_bad_headers(tmp_path: Path) -> None:
    hea = _write_record(tmp_path)
    for line, words in ((f"rec 12 {FS} 5e3", "not a whole number"), (f"rec 13 {FS} {N}", "13 signals"),
                        (f"rec 12x {FS} {N}", "number of signals"), (f"rec 12 fast {N}", "not a number")):  # fmt: skip
        _set_record_line(hea, line)
        e = _refusal(hea)
        assert e.reason == ECG_BAD_HEADER and words in e.detail, line


def test_ten_hour_header_is_refused_without_its_signal_file(tmp_path: Path) -> None:
    hea = _write_record(tmp_path)
    _set_record_line(hea, f"rec 12 {FS} {TEN_HOURS}")
    (tmp_path / "rec.dat").unlink()
    e = _refusal(hea)
    assert e.reason == FILE_OVER_LIMIT and "36000 s" in e.detail and "600 s" in e.detail
    assert "ingest.max_duration_s" in e.detail
    # allowed that long, it is still over the decoded-size limit: 12 signals x 18e6 samples x 8 B = 1648 MiB
    e = _refusal(hea, Limits(max_duration_s=86_400))
    assert e.reason == FILE_OVER_LIMIT and "1648 MiB" in e.detail and "ingest.max_decoded_mb" in e.detail
    # allowed both, the header passes and only then is the signal file looked for
    e = _refusal(hea, Limits(max_duration_s=86_400, max_decoded_bytes=4 << 30))
    assert e.reason == ECG_MISSING_SIGNAL_FILE


@needs_proc
def test_ten_hour_sparse_signal_file_without_a_length_is_refused_from_its_size(tmp_path: Path) -> None:
    hea = _write_record(tmp_path)
    _set_record_line(hea, f"rec 12 {FS}")  # no length: wfdb would infer 18e6 samples and read them all
    with open(tmp_path / "rec.dat", "r+b") as f:
        f.truncate(12 * 2 * TEN_HOURS)  # 432 MB, sparse
    got = _refusal_bounded(hea)
    assert got["reason"] == FILE_OVER_LIMIT and "ingest.max_duration_s" in got["detail"]
    assert f"{TEN_HOURS} samples" in got["detail"]


@needs_proc
def test_million_signal_header_is_refused_before_wfdb_parses_it(tmp_path: Path) -> None:
    hea = tmp_path / "big.hea"
    with open(hea, "w") as f:
        f.write(f"big 1000000 {FS} {N}\n")
        f.write("big.dat 16 1000/mV 16 0 0 0 0 s\n" * 1_000_000)  # 31 MB
    got = _refusal_bounded(hea)  # default limits: the header is over 1 MiB
    assert got["reason"] == FILE_OVER_LIMIT and "ingest.max_header_kb" in got["detail"]
    # with the header size allowed, the signal count refuses it (wfdb would parse for minutes)
    got = _refusal_bounded(hea, Limits(max_header_bytes=64 << 20))
    assert got["reason"] == FILE_OVER_LIMIT and "1000000 signals" in got["detail"]
    assert "ingest.max_channels" in got["detail"]


@needs_proc
def test_extra_signal_lines_under_a_small_signal_count_are_refused(tmp_path: Path) -> None:
    """10^5 signal lines fit in 1 MiB; wfdb parses every line whatever the record line says."""
    hea = tmp_path / "many.hea"
    with open(hea, "w") as f:
        f.write(f"many 12 {FS} {N}\n")
        f.write("m.dat 16\n" * 100_000)  # 900 kB
    got = _refusal_bounded(hea)
    assert got["reason"] == FILE_OVER_LIMIT and "100000 signal lines" in got["detail"]


def test_header_over_one_mib_is_refused_and_reads_when_allowed(tmp_path: Path) -> None:
    hea = _write_record(tmp_path, comments=["Name: Jane Roe"])
    with open(hea, "a") as f:
        f.write("# Note: filler\n" * 80_000)  # 1.2 MB of comments
    e = _refusal(hea)
    assert e.reason == FILE_OVER_LIMIT and "ingest.max_header_kb" in e.detail and "1024 KiB" in e.detail
    assert "Jane" not in e.detail  # the number and the limit, never a value from the header
    rec = read_ecg(hea, limits=Limits(max_header_bytes=4 << 20))
    assert rec.signal.shape == (12, N) and rec.identifiers["name"] == "Jane Roe"


def test_configured_limits_apply(tmp_path: Path) -> None:
    hea = _write_record(tmp_path, extra=4, comments=["Note: " + "x" * 1200])  # 16 signals in one file
    cases = [(IngestConfig(max_duration_s=1.0), "ingest.max_duration_s", "2 s"),
             (IngestConfig(max_channels=12), "ingest.max_channels", "16 signals"),
             (IngestConfig(min_fs=1000.0), "ingest.min_fs", "'500'"),
             (IngestConfig(max_header_kb=1), "ingest.max_header_kb", "bytes")]  # fmt: skip
    for cfg, key, words in cases:
        e = _refusal(hea, Limits.from_config(cfg))
        assert key in e.detail and words in e.detail, (key, e.detail)
    # the decoded size counts every signal of the file wfdb decodes: 16 x 1000 x 8 B = 128000 B
    e = _refusal(hea, Limits(max_decoded_bytes=120_000))
    assert e.reason == FILE_OVER_LIMIT and "16 signals x 1000 samples" in e.detail
    assert read_ecg(hea, limits=Limits(max_decoded_bytes=130_000)).signal.shape == (12, N)


def test_real_records_read_under_the_default_limits(shared_data: Path) -> None:
    wf = shared_data / "ecg" / "wfdb"
    limits = Limits.from_config(IngestConfig())
    for name in ("HR06000", "HR06004", "s0010_re"):
        assert read_ecg(wf / name, limits=limits).signal.shape[0] == 12
    e = _refusal(wf / "s0010_re", Limits(max_duration_s=30))  # 38.4 s at 1000 Hz
    assert e.reason == FILE_OVER_LIMIT and "38 s" in e.detail
