"""Checks of a WFDB header against `Limits`, made before wfdb parses the header or reads any sample.

wfdb trusts its header: it parses every signal line (with a pandas lookup per field: 10^6 signals take
minutes), reads every sample the record line asks for, and its record-line regex silently misreads some
numbers (a rate written `1e9` becomes 1 Hz, see `check_wfdb_agrees`). So the header text is read here
first, bounded by `Limits.max_header_bytes`, and its record line is tokenised independently. What is over
a limit raises `BadInputError(FILE_OVER_LIMIT)`, an implausible sampling rate ECG_BAD_HEADER. Details give
the number, the limit and the config key that raises it, never a value about the patient.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import wfdb

from stence.data.limits import Limits, read_bounded
from stence.errors import ECG_BAD_HEADER, ECG_MISSING_SIGNAL_FILE, FILE_OVER_LIMIT, BadInputError

# Bits per sample of the WFDB storage formats with a fixed size. FLAC formats (508/516/524) are compressed:
# their length cannot be inferred from the file size, so they need a signal length in the header.
FMT_BITS: dict[str, float] = {
    "8": 8,
    "16": 16,
    "24": 24,
    "32": 32,
    "61": 16,
    "80": 8,
    "160": 16,
    "212": 12,
    "310": 32 / 3,
    "311": 32 / 3,
}

# Peak bytes per decoded sample: wfdb holds samples as int64 / float64 while converting.
BYTES_PER_SAMPLE = 8

_WFDB_DEFAULT_FS = 250.0  # what the WFDB format (and wfdb) assume when the record line gives no rate


@dataclass(frozen=True)
class RecordLine:
    """The record line's fields as the header text writes them, before wfdb interprets them."""

    n_sig: int
    n_signal_lines: int  # non-comment lines after the record line (wfdb parses every one of them)
    fs_token: str | None  # the sampling-rate token as written; None when absent (WFDB's 250 Hz applies)
    fs: float  # the rate that token denotes (float() of its number part), or 250 when absent
    sig_len: int | None  # samples per signal, None when absent or 0 (then inferred from the signal file)


def _bad_rate(token: str, why: str) -> BadInputError:
    return BadInputError(ECG_BAD_HEADER, f"implausible sampling rate {token!r}: {why}")


def read_header_text(hea: Path, limits: Limits) -> str:
    """The header text, refused (FILE_OVER_LIMIT) when larger than `limits.max_header_bytes`.

    The size is checked before any read, and the read itself is bounded too (the file may grow in between).
    Decoded as wfdb decodes it (ASCII, other bytes dropped) so that both see the same lines.
    """
    raw = read_bounded(hea, limits, "header")
    return raw.decode("ascii", errors="ignore")


def _header_lines(text: str) -> Iterator[str]:
    """Non-comment, non-empty lines, split exactly as `wfdb.io.header.parse_header_content` splits them."""
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def parse_record_line(text: str) -> RecordLine:
    """Tokenise the record line `NAME[/SEGMENTS] N_SIG [FS[/COUNTER[(BASE)]] [SIG_LEN [TIME [DATE]]]]`.

    Strict where wfdb's regex is lenient (it stops at the first character it does not expect and keeps
    what it matched so far): an unreadable signal count, rate or length is ECG_BAD_HEADER here.
    """
    lines = _header_lines(text)
    record = next(lines, None)
    if record is None:
        raise BadInputError(ECG_BAD_HEADER, "no record line")
    n_signal_lines = sum(1 for _ in lines)
    tokens = record.split()
    if "/" in tokens[0]:
        raise BadInputError(ECG_BAD_HEADER, "multi-segment records are not supported")
    if len(tokens) < 2 or not tokens[1].isdigit():
        raise BadInputError(ECG_BAD_HEADER, "the record line gives no readable number of signals")
    fs_token = tokens[2] if len(tokens) > 2 else None
    fs = _WFDB_DEFAULT_FS
    if fs_token is not None:
        number = re.match(r"[^/(]*", fs_token).group()  # FS before /COUNTER_FREQ(BASE_COUNTER)
        try:
            fs = float(number)
        except ValueError:
            raise _bad_rate(fs_token, "not a number") from None
    sig_len = None
    if len(tokens) > 3:
        if not tokens[3].isdigit():
            raise BadInputError(ECG_BAD_HEADER, f"signal length {tokens[3]!r} is not a whole number")
        sig_len = int(tokens[3]) or None
    return RecordLine(int(tokens[1]), n_signal_lines, fs_token, fs, sig_len)


def check_record_line(line: RecordLine, limits: Limits) -> None:
    """Signal count and sampling rate against the limits, before wfdb parses the signal lines."""
    for what, n in (("signals", line.n_sig), ("signal lines", line.n_signal_lines)):
        if n > limits.max_channels:
            raise BadInputError(
                FILE_OVER_LIMIT,
                f"header has {n} {what}, over the limit of {limits.max_channels} (raise ingest.max_channels)",
            )
    if line.n_signal_lines != line.n_sig:
        raise BadInputError(
            ECG_BAD_HEADER, f"record line says {line.n_sig} signals but {line.n_signal_lines} signal lines follow"
        )
    if not math.isfinite(line.fs) or not limits.min_fs <= line.fs <= limits.max_fs:
        raise _bad_rate(
            line.fs_token or str(line.fs),
            f"outside [{limits.min_fs:g}, {limits.max_fs:g}] Hz (set by ingest.min_fs and ingest.max_fs)",
        )


def check_wfdb_agrees(header: wfdb.Record, line: RecordLine) -> None:
    """wfdb read the rate and length the text writes.

    wfdb's record-line regex takes the rate as `\\d*\\.?\\d*` and matches without anchoring the end: for
    `1e9` it takes "1" and silently drops the rest of the line (so the length is lost too), and for
    `-500` it matches no rate and falls back to 250 Hz. Any such disagreement is refused.
    """
    if header.fs is None or not math.isclose(float(header.fs), line.fs, rel_tol=1e-9):
        raise _bad_rate(
            line.fs_token or "", f"WFDB reads it as {header.fs} Hz; write the rate as a plain decimal number"
        )
    if line.sig_len is not None and header.sig_len != line.sig_len:
        raise BadInputError(
            ECG_BAD_HEADER, f"WFDB reads {header.sig_len} samples where the record line writes {line.sig_len}"
        )


def _spf(header: wfdb.Record, i: int) -> int:
    spf = header.samps_per_frame
    return int((spf[i] if spf else 1) or 1)


def signals_in_files(header: wfdb.Record, channels: Sequence[int]) -> dict[str, list[int]]:
    """Signal file -> every signal it holds, for the files holding a selected channel (wfdb decodes all the
    signals of a file it reads, selected or not)."""
    files = dict.fromkeys(header.file_name[c] for c in channels)
    return {f: [i for i, g in enumerate(header.file_name) if g == f] for f in files}


def frame_bits(header: wfdb.Record, in_file: Sequence[int]) -> float | None:
    """Bits of one frame of a signal file (its signals x samples per frame), None for compressed formats."""
    if not {str(header.fmt[i]) for i in in_file} <= set(FMT_BITS):
        return None
    return sum(FMT_BITS[str(header.fmt[i])] * _spf(header, i) for i in in_file)


def length_from_first_file(base: Path, header: wfdb.Record) -> int:
    """Samples per signal when the header gives none, inferred as wfdb infers it: from the size of the
    record's first signal file (selected or not), computed here so that it is bounded before wfdb reads."""
    fname = header.file_name[0]
    in_file = [i for i, g in enumerate(header.file_name) if g == fname]
    path = base.parent / fname
    if fname == "~" or not path.is_file():
        raise BadInputError(
            ECG_MISSING_SIGNAL_FILE,
            f"signal file {fname}, from which the record length is inferred, is missing",
        )
    bits = frame_bits(header, in_file)
    if bits is None:
        raise BadInputError(
            ECG_BAD_HEADER,
            f"signal file {fname} is compressed and the header gives no signal length: its decoded "
            "size cannot be bounded before decoding",
        )
    offset = (header.byte_offset[in_file[0]] if header.byte_offset else None) or 0
    return int(max(path.stat().st_size - offset, 0) * 8 // bits)


def check_extent(header: wfdb.Record, channels: Sequence[int], n: int, limits: Limits) -> None:
    """Duration (`n` samples at the header's rate) and decoded size of the files read, against the limits.

    The decoded size counts every signal of every file holding a selected channel, times its samples per
    frame, at 8 bytes: what wfdb holds while decoding. The resampled size at the model rate is the
    caller's, and bounded by the duration.
    """
    duration = n / float(header.fs)
    if duration > limits.max_duration_s:
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"record is {duration:.0f} s long ({n} samples at {float(header.fs):g} Hz), over the limit of "
            f"{limits.max_duration_s:g} s (raise ingest.max_duration_s)",
        )
    n_read = sum(_spf(header, i) for sigs in signals_in_files(header, channels).values() for i in sigs)
    need = n_read * n * BYTES_PER_SAMPLE
    if need > limits.max_decoded_bytes:
        mib = 1 << 20
        raise BadInputError(
            FILE_OVER_LIMIT,
            f"decoding needs {need / mib:.0f} MiB ({n_read} signals x {n} samples x {BYTES_PER_SAMPLE} B), "
            f"over the limit of {limits.max_decoded_bytes / mib:g} MiB (raise ingest.max_decoded_mb)",
        )
