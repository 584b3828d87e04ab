"""On-disk cohort format: parquet tables and memory-mappable caches, written and read here only.

  manifest.parquet    one row per ECG-study pair (pair_id, patient, ecg_id, study_id, split, targets ...)
  ecgs.parquet        one row per ECG; `offset`/`n_samples` locate it in cache/ecg.npy
  studies.parquet     one row per angiography study (targets, segment degrees)
  views.parquet       one row per view; `cache_index` is its row in cache/frames.npy
  quarantine.parquet  file (pseudonym, or table row such as annotations.csv:7), reason, detail
  cache/ecg.npy       (12, total_samples) float32: every ECG after decode, resample and baseline removal
                      (the deterministic part of the project contract at ingest's data.* settings)
  cache/ecg_source.npy (12, total_source_samples) float32 mV: every ECG as decoded, at its own rate
                      (`src_offset`, `src_n_samples`, `fs_orig` in ecgs.parquet)
  cache/contracts/K/  the deterministic part of another input contract (key K), made from the sources on
                      first use (stence/data/contract_cache.py)
  cache/frames.npy    (n_views, key_frames, S, S) float16 in [0, 1]
  cohort.json, deid_report.json
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from stence.data.cohort_meta import COHORT_META_FILE, require_cohort


def write_table(path: Path, df: pd.DataFrame) -> None:
    pq.write_table(pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False), path)


def _open_cache(path: Path, dtype: type, shape: tuple[int, ...]) -> np.memmap:
    """A new .npy memmap whose disk blocks are reserved up front: a full disk raises OSError(ENOSPC) here,
    instead of a SIGBUS at the first write into a sparse page."""
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    with open(path, "r+b") as fh:
        os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
    return mm


def _pwrite_all(fd: int, data: bytes, pos: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, pos)
        view, pos = view[n:], pos + n


def _concat_cache(path: Path, arrays: pd.Series, lengths: np.ndarray) -> np.ndarray:
    """Concatenate per-record (L, n) float32 arrays along time into one .npy at `path`; returns the offsets.

    Each staged array is removed once copied (the last row naming it), and the cache's disk blocks are
    reserved record by record just before they are written: the disk holds about one copy of the ECGs
    throughout, not the staged arrays and the cache at once, and a full disk still raises OSError(ENOSPC)
    at the reservation instead of a SIGBUS at the first write into a sparse page.
    """
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    n_leads = int(np.load(arrays.iloc[0], mmap_mode="r").shape[0]) if len(arrays) else 12
    total = int(lengths.sum())
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_leads, total))  # header; sparse
    start, item = mm.offset, mm.dtype.itemsize
    del mm  # written with pwrite below: no mapped pages accumulate in this process's resident memory
    last = {p: i for i, p in enumerate(arrays)}
    with open(path, "r+b") as fh:
        fd = fh.fileno()
        for i, (p, off, n) in enumerate(zip(arrays, offsets, lengths, strict=True)):
            a = np.load(p)  # (L, n)
            if a.shape != (n_leads, n):
                raise ValueError(f"staged array {Path(p).name} has shape {a.shape}, expected {(n_leads, int(n))}")
            for lead in range(n_leads if n else 0):  # lead-major layout: the record lies in n_leads ranges
                pos = start + (lead * total + int(off)) * item
                os.posix_fallocate(fd, pos, int(n) * item)
                _pwrite_all(fd, np.ascontiguousarray(a[lead], dtype=np.float32).tobytes(), pos)
            if last[p] == i:
                Path(p).unlink()
        os.fsync(fd)
    return offsets


def write_ecg_cache(root: Path, ecgs: pd.DataFrame) -> None:
    """Concatenate per-record arrays into (12, total) memmaps: the ingest contract's cache (cache/ecg.npy,
    sets ecgs['offset']) and the decoded sources (cache/ecg_source.npy, sets ecgs['src_offset']). The staged
    per-record arrays are consumed (removed as they are copied)."""
    (root / "cache").mkdir(exist_ok=True)
    ecgs["offset"] = _concat_cache(root / "cache" / "ecg.npy", ecgs["array"],
                                   ecgs["n_samples"].to_numpy(dtype=np.int64))
    if "source_array" in ecgs:
        ecgs["src_offset"] = _concat_cache(root / "cache" / "ecg_source.npy", ecgs["source_array"],
                                           ecgs["src_n_samples"].to_numpy(dtype=np.int64))


def write_frame_cache(root: Path, views: pd.DataFrame, key_frames: int, size: int) -> None:
    """Stack per-view key frames into (n_views, K, S, S) float16; sets views['cache_index'] in place."""
    (root / "cache").mkdir(exist_ok=True)
    mm = _open_cache(root / "cache" / "frames.npy", np.float16, (len(views), key_frames, size, size))
    for i, path in enumerate(views["array"]):
        mm[i] = np.load(path)
    mm.flush()
    del mm
    views["cache_index"] = np.arange(len(views))


def fingerprint(root: Path) -> str:
    """Content hash of the cohort: its tables (which carry per-record content hashes) and the caches' shapes."""
    h = hashlib.sha256()
    for name in ("manifest", "ecgs", "studies", "views"):
        df = pd.read_parquet(root / f"{name}.parquet")
        h.update(name.encode())
        h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    for cache in ("ecg", "frames"):
        shape, dtype, sample = strided_sample(root / "cache" / f"{cache}.npy", 65536)
        h.update(f"{cache}{shape}{dtype}".encode())
        h.update(sample)
    return h.hexdigest()[:16]


def read_npy_header(fh) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy file open in binary `fh`, left positioned at the data."""
    major, _ = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(fh)


def strided_sample(path: Path, n: int) -> tuple[tuple[int, ...], np.dtype, bytes]:
    """(shape, dtype, the bytes of elements 0, step, 2 step, ... of the flattened array), step = max(1, size // n),
    of a C-order .npy file: the same bytes as `arr.reshape(-1)[::step]`, read with one pread per element.
    Nothing is memory-mapped, so a 50 GB cache adds no resident pages to the process that hashes it."""
    with open(path, "rb") as fh:
        shape, fortran, dtype = read_npy_header(fh)
        start = fh.tell()
        if fortran and len(shape) > 1:
            raise ValueError(f"{path.name}: a Fortran-order array; the caches are written in C order")
        size = int(np.prod(shape, dtype=np.int64))
        step, item = max(1, size // n), dtype.itemsize
        fd = fh.fileno()
        parts = [os.pread(fd, item, start + i * item) for i in range(0, size, step)]
    return tuple(shape), dtype, b"".join(parts)


@dataclass
class Cohort:
    """Read-only view of an ingested cohort; caches are memory-mapped on first use (safe across forks)."""

    root: Path

    @classmethod
    def open(cls, root: str | Path) -> Cohort:
        return cls(require_cohort(root))

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / COHORT_META_FILE).read_text())

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @cached_property
    def manifest(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "manifest.parquet")

    @cached_property
    def ecgs(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "ecgs.parquet").set_index("ecg_id", drop=False)

    @cached_property
    def studies(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "studies.parquet").set_index("study_id", drop=False)

    @cached_property
    def views(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "views.parquet")

    @cached_property
    def quarantine(self) -> pd.DataFrame:
        return pd.read_parquet(self.root / "quarantine.parquet")

    @cached_property
    def ecg_cache(self) -> np.ndarray:
        return np.load(self.root / "cache" / "ecg.npy", mmap_mode="r")  # (12, total)

    @cached_property
    def frame_cache(self) -> np.ndarray:
        return np.load(self.root / "cache" / "frames.npy", mmap_mode="r")  # (n_views, K, S, S)

    @cached_property
    def views_of_study(self) -> dict[str, np.ndarray]:
        """study_id -> row indices into `views` (and the frame cache), in view order."""
        return {k: g.index.to_numpy() for k, g in self.views.groupby("study_id", sort=False)}

    def ecg_signal(self, ecg_id: str) -> np.ndarray:
        """(12, n_samples) float32 view into the cache (baseline removed, at the cohort rate)."""
        row = self.ecgs.loc[ecg_id]
        off, n = int(row["offset"]), int(row["n_samples"])
        return self.ecg_cache[:, off : off + n]

    def ecg_source(self, ecg_id: str) -> tuple[np.ndarray, float]:
        """(12, T) float32 mV as decoded at ingest, and its rate (cohorts ingested before sources were kept
        raise FileNotFoundError naming the fix)."""
        path = self.root / "cache" / "ecg_source.npy"
        if not path.exists() or "src_offset" not in self.ecgs:
            raise FileNotFoundError(f"{self.root} keeps no decoded ECG sources (ingested by an older version): "
                                    "re-ingest it to use an input contract other than its own")
        row = self.ecgs.loc[ecg_id]
        off, n = int(row["src_offset"]), int(row["src_n_samples"])
        return self.source_cache[:, off : off + n], float(row["fs_orig"])

    @cached_property
    def source_cache(self) -> np.ndarray:
        return np.load(self.root / "cache" / "ecg_source.npy", mmap_mode="r")  # (12, total_source)

    def __getstate__(self) -> dict:  # memmaps and cached tables are reopened in the receiving process
        return {"root": self.root}

    def __setstate__(self, state: dict) -> None:
        self.root = state["root"]
