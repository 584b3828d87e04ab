"""Per-file decode jobs run in worker processes during ingest.

Each job reads one raw file, applies the deterministic preprocessing, writes its array into the staging
folder and returns a small dict. Identifiers read from headers travel back to the parent process only so
that ingest can pseudonymise them and scan its outputs for them; they are never written.
"""

from __future__ import annotations

import errno
import hashlib
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stence.data.contract import InputContract
from stence.data.contract_apply import record_part
from stence.data.dicom_io import read_xa, resize_frames, select_key_frames
from stence.data.ecg_formats import read_ecg_file
from stence.data.limits import Limits
from stence.data.wfdb_io import validate_signal
from stence.errors import BadInputError

_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # not a file's fault: raised, never quarantined


@dataclass(frozen=True)
class DecodeSettings:
    """What a decode job needs; picklable, no config object crosses the process boundary."""

    raw: str
    staging: str
    contract: InputContract  # the project contract of the ingest's data.* settings: its per-record part is cached
    min_valid_fraction: float
    frame_size: int
    key_frames: int
    limits: Limits = Limits()


def source_key(path: Path) -> str:
    """Cache key of a raw file: its path, size and modification time (resume reuses matching results)."""
    st = path.stat()
    return hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, arr)
    os.replace(tmp, path)


def _record_key(path: Path, rel: str, signal_files: list[str]) -> str:
    """Staging key of an ECG record: its path, and the size and modification time of the file and of each
    signal file its header names (a WFDB record is several files; only those named are looked at, so the
    cost does not grow with the number of files beside it)."""
    parts = [rel]
    for f in [path, *(path.parent / name for name in sorted(signal_files))]:
        try:
            st = f.stat()
        except OSError:  # a missing optional file: part of the key as such
            parts.append(f"{f.name}|-")
            continue
        parts.append(f"{f.name}|{st.st_size}|{st.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def decode_ecg(args: tuple[str, DecodeSettings]) -> dict[str, Any]:
    """ECG record (WFDB or a vendor export) -> cached (12, T) float32 at the model rate, baseline removed,
    and the decoded source (12, T_src) float32 mV at the file's rate, from which the caches of other input
    contracts are made."""
    rel, s = args
    path = Path(s.raw) / rel
    out: dict[str, Any] = {"kind": "ecg", "rel": rel}
    try:
        rec = read_ecg_file(path, s.contract.leads, limits=s.limits)
        key = _record_key(path, rel, list(rec.meta.get("signal_files") or ()))
        arr_path = Path(s.staging) / "records" / f"{key}.npy"
        validate_signal(rec.signal, s.min_valid_fraction)
        # duplicate detection on the decoded source signal (before any processing)
        raw_sig = np.nan_to_num(rec.signal.astype(np.float32), nan=0.0)
        content_hash = hashlib.sha256(raw_sig.tobytes() + str(rec.fs).encode()).hexdigest()[:32]
        src_path = arr_path.with_name(f"{key}.src.npy")
        if not (arr_path.exists() and src_path.exists()):
            sig = record_part(rec.signal, rec.fs, s.contract)  # resample, ALS baseline
            _save_atomic(src_path, rec.signal.astype(np.float32))  # (12, T) mV at the file's rate, NaN kept
            _save_atomic(arr_path, sig.astype(np.float32))  # last: its presence means both are complete
        n = int(np.load(arr_path, mmap_mode="r").shape[1])
        meta = rec.meta
        out.update(
            ok=True,
            array=str(arr_path),
            n_samples=n,
            source_array=str(src_path),
            src_n_samples=int(rec.signal.shape[1]),
            content_hash=content_hash,
            fs_orig=float(meta.get("fs_orig", rec.fs)),
            age=meta.get("age"),
            sex=meta.get("sex"),
            base_date=meta.get("base_date"),
            identifiers=dict(rec.identifiers),
            signal_files=list(rec.meta.get("signal_files") or ()),
            format=str(meta.get("format") or "wfdb"),
        )
    except BadInputError as e:
        out.update(ok=False, reason=e.reason, detail=e.detail)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise
        out.update(ok=False, reason="unexpected_error", detail=f"{type(e).__name__}: {e}")
    except Exception as e:  # an unexpected failure is still one quarantined file, never a crashed batch
        out.update(ok=False, reason="unexpected_error", detail=f"{type(e).__name__}: {e}")
        out["trace"] = traceback.format_exc(limit=3)
    return out


def decode_xa(args: tuple[str, DecodeSettings]) -> dict[str, Any]:
    """DICOM XA view -> key frames resized to frame_size, float16 in [0, 1], plus header metadata."""
    rel, s = args
    path = Path(s.raw) / rel
    out: dict[str, Any] = {"kind": "xa", "rel": rel}
    try:
        arr_path = Path(s.staging) / "views" / f"{source_key(path)}.npy"
        view = read_xa(path, limits=s.limits)
        frames = select_key_frames(view.frames, min(s.key_frames, view.frames.shape[0]))
        if frames.shape[0] < s.key_frames:  # a short cine repeats its last key frame
            pad = np.repeat(frames[-1:], s.key_frames - frames.shape[0], axis=0)
            frames = np.concatenate([frames, pad], axis=0)
        small = resize_frames(frames, s.frame_size).astype(np.float16)  # (K, S, S)
        tmp = arr_path.with_name(arr_path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.save(f, small)
        os.replace(tmp, arr_path)
        out.update(
            ok=True,
            array=str(arr_path),
            study_uid=view.study_uid,
            series_uid=view.series_uid,
            sop_uid=view.sop_uid,
            study_date=view.study_date,
            primary_angle=view.primary_angle,
            secondary_angle=view.secondary_angle,
            frame_time_ms=view.frame_time_ms,
            n_frames=int(view.frames.shape[0]),
            rows=int(view.frames.shape[1]),
            cols=int(view.frames.shape[2]),
            transfer_syntax=str(view.transfer_syntax),
            identifiers=dict(view.identifiers),
        )
    except BadInputError as e:
        out.update(ok=False, reason=e.reason, detail=e.detail)
    except OSError as e:
        if e.errno in _DISK_FULL:
            raise
        out.update(ok=False, reason="unexpected_error", detail=f"{type(e).__name__}: {e}")
    except Exception as e:
        out.update(ok=False, reason="unexpected_error", detail=f"{type(e).__name__}: {e}")
    return out


def decode_file(job: tuple[str, tuple[str, DecodeSettings]]) -> dict[str, Any]:
    """("ecg" | "xa", decode job) -> `decode_ecg` or `decode_xa` of it: one worker pool serves both kinds."""
    kind, args = job
    return decode_ecg(args) if kind == "ecg" else decode_xa(args)
