"""Checks of a single-file ECG export against `Limits`, made before it is parsed or its waveform decoded.

The wording follows `stence.data.wfdb_header`: details give the number, the limit and the config key that
raises it, never a value about the patient.
"""

from __future__ import annotations

import math
from pathlib import Path

from stence.data.limits import Limits
from stence.data.limits import read_bounded as _read_bounded
from stence.errors import ECG_BAD_HEADER, FILE_OVER_LIMIT, BadInputError

BYTES_PER_SAMPLE = 8  # decoded samples are held as int64 / float64 while converting
_MIB = float(1 << 20)


def read_bounded(path: Path, limits: Limits) -> bytes:
    """An export file's bytes, refused (FILE_OVER_LIMIT) when larger than `limits.max_header_bytes`."""
    return _read_bounded(path, limits, "export file")


def check_rate(fs: float, limits: Limits, written: str | None = None) -> None:
    """A sampling rate within [min_fs, max_fs] (ECG_BAD_HEADER otherwise)."""
    if not math.isfinite(fs) or not limits.min_fs <= fs <= limits.max_fs:
        raise BadInputError(
            ECG_BAD_HEADER,
            f"implausible sampling rate {written or f'{fs:g}'!r}: outside [{limits.min_fs:g}, "
            f"{limits.max_fs:g}] Hz (set by ingest.min_fs and ingest.max_fs)",
        )


def check_extent(fs: float, n_samples: int, n_channels: int, limits: Limits) -> None:
    """Rate, duration, channel count and decoded size of a waveform, from its declared numbers only."""
    check_rate(fs, limits)
    if n_channels > limits.max_channels:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"waveform has {n_channels} channels, over the limit of {limits.max_channels} "
            "(raise ingest.max_channels)",
        )
    duration = n_samples / fs
    if duration > limits.max_duration_s:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"record is {duration:.0f} s long ({n_samples} samples at {fs:g} Hz), over the limit of "
            f"{limits.max_duration_s:g} s (raise ingest.max_duration_s)",
        )
    need = n_channels * n_samples * BYTES_PER_SAMPLE
    if need > limits.max_decoded_bytes:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"decoding needs {need / _MIB:.0f} MiB ({n_channels} signals x {n_samples} samples x "
            f"{BYTES_PER_SAMPLE} B), over the limit of {limits.max_decoded_bytes / _MIB:g} MiB "
            "(raise ingest.max_decoded_mb)",
        )
