"""Bounds on what one input file may ask of the machine, checked from its header before decoding.

A crafted or broken header can ask for gigabytes (a sampling rate of 0.01 Hz resampled to 500 Hz, a 10 h
record, 10^6 channels, a 13 MB RLE cine that decodes to 6 GB). Readers check these bounds from the header
alone and raise `BadInputError(FILE_OVER_LIMIT)` (or ECG_BAD_HEADER for an implausible rate), so peak
memory is bounded by the limits, not by the input.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stence.errors import FILE_OVER_LIMIT, BadInputError


@dataclass(frozen=True)
class Limits:
    """Per-file bounds (defaults suit resting 12-lead ECGs and coronary cines)."""

    min_fs: float = 50.0  # Hz; an ECG sampled slower is implausible (a typo or a crafted header)
    max_fs: float = 20_000.0  # Hz
    max_duration_s: float = 600.0  # longest ECG record read (Holter-length records are refused)
    max_channels: int = 64  # signals in one ECG record
    max_header_bytes: int = 1 << 20  # size of a WFDB header / XML export read as text
    max_frames: int = 2_000  # frames of one XA cine
    max_decoded_bytes: int = 1 << 30  # decoded size of one file: samples x channels x 8 B, frames x rows x cols x bytes

    @classmethod
    def from_config(cls, ingest_cfg: Any) -> Limits:
        """The limits set in an `IngestConfig` (fields of the same names, `max_decoded_mb` in MiB)."""
        return cls(
            min_fs=float(ingest_cfg.min_fs),
            max_fs=float(ingest_cfg.max_fs),
            max_duration_s=float(ingest_cfg.max_duration_s),
            max_channels=int(ingest_cfg.max_channels),
            max_header_bytes=int(ingest_cfg.max_header_kb) << 10,
            max_frames=int(ingest_cfg.max_frames),
            max_decoded_bytes=int(float(ingest_cfg.max_decoded_mb) * (1 << 20)),
        )


def read_bounded(path: Path, limits: Limits, what: str = "file") -> bytes:
    """The file's bytes, refused (FILE_OVER_LIMIT) when larger than `limits.max_header_bytes` (headers and XML
    exports are read whole as text). The size is checked before the read, and the read itself is bounded
    too (the file may grow in between)."""
    size = path.stat().st_size
    data = b""
    if size <= limits.max_header_bytes:
        with open(path, "rb") as f:
            data = f.read(limits.max_header_bytes + 1)
        size = len(data)
    if size > limits.max_header_bytes:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"{what} is {size} bytes, over the limit of {limits.max_header_bytes} bytes "
            f"({limits.max_header_bytes / 1024:g} KiB; raise ingest.max_header_kb)",
        )
    return data
