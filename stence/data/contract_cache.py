"""Per-contract caches of an ingested cohort: one ingest serves encoders with different input contracts.

Ingest keeps two arrays per ECG (stence/data/cohort_io.py): the decoded source at its own rate and the
deterministic part of the project contract at the `data.*` settings of the ingest. A contract with the same
`deterministic_key` reads the latter; any other gets `cache/contracts/<key>/` made from the sources on first
use (under a file lock, so that concurrent trials and workers make it once) and reused afterwards.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np

from stence.data.cohort_io import Cohort
from stence.data.contract import InputContract, project_contract
from stence.data.contract_apply import record_part

_DONE = "contract.json"


class OffsetTable(Mapping[str, tuple[int, int]]):
    """Read-only mapping ecg_id -> (offset, n_samples) held in three arrays instead of a dict of tuples
    (about 40 bytes per ECG rather than about 200): the ids as sorted UTF-8 bytes, the row of each in
    `table`, and the (N, 2) int64 table itself. A repeated id maps to its last row, as a dict built from
    the pairs would."""

    def __init__(self, ids: Iterable[str], table: np.ndarray):
        keys = np.array([str(i).encode() for i in ids], dtype=np.bytes_)  # (N,) S<w>
        table = np.asarray(table, dtype=np.int64).reshape(-1, 2)  # (N, 2) offset, n_samples
        if len(keys) != len(table):
            raise ValueError(f"{len(keys)} ids for {len(table)} offset rows")
        order = np.argsort(keys, kind="stable")  # equal ids keep their row order: the last one wins
        keys = keys[order]
        last = np.ones(len(keys), dtype=bool)
        last[:-1] = keys[:-1] != keys[1:]
        self._keys, self._rows, self._table = keys[last], order[last].astype(np.int64), table
        self._first = self._rows  # each id's first row: the order a dict iterates in
        if not last.all():
            first = np.ones(len(keys), dtype=bool)
            first[1:] = keys[1:] != keys[:-1]
            self._first = order[first].astype(np.int64)

    def _row(self, ecg_id: str) -> int:
        key = ecg_id.encode() if isinstance(ecg_id, str) else None
        if key is None or not len(self._keys):
            raise KeyError(ecg_id)
        i = int(np.searchsorted(self._keys, key))
        if i == len(self._keys) or self._keys[i] != key:  # also refuses ids longer than any stored one
            raise KeyError(ecg_id)
        return int(self._rows[i])

    def __getitem__(self, ecg_id: str) -> tuple[int, int]:
        off, n = self._table[self._row(ecg_id)]
        return int(off), int(n)

    def __contains__(self, ecg_id: object) -> bool:
        try:
            self._row(ecg_id)  # type: ignore[arg-type]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator[str]:  # in row order, as the dict iterated
        for j in np.argsort(self._first, kind="stable"):
            yield self._keys[j].decode()

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class ContractSignals:
    """Read access to the deterministic part of one contract for every ECG of a cohort (the memmap is opened
    on first use in each process and never pickled).

    `contract_signals` hands every caller in a process the same instance per cache file (see `_shared`), so
    the datasets of a process share one offset table and one memmap; an unpickled copy joins the instance
    of the receiving process the same way."""

    path: Path  # (12, total) float32 .npy
    offsets: Mapping[str, tuple[int, int]]  # ecg_id -> (offset, n_samples)
    stamp: tuple | None = field(default=None, compare=False, repr=False)  # file identity; None = not shared

    @cached_property
    def cache(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def signal(self, ecg_id: str) -> np.ndarray:
        off, n = self.offsets[ecg_id]
        return self.cache[:, off : off + n]  # (12, n) at the contract's rate

    def __reduce__(self) -> tuple:  # path, offsets and identity only: no memmap
        return _revive, (self.path, self.offsets, self.stamp)


_SHARED: weakref.WeakValueDictionary[tuple, ContractSignals] = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def _file_id(path: Path) -> tuple[int, int, int, int] | None:
    """What changes when a file is re-made (device, inode, mtime, size); None while it does not exist."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size


def _shared(path: Path, stamp: tuple, make: Callable[[], Mapping[str, tuple[int, int]]]) -> ContractSignals:
    """The process's instance for `path` at identity `stamp` (made by `make` on first request). A re-made
    file has another identity, so it is never served from a stale entry; an entry lives while any dataset
    holds it."""
    key = (str(Path(path).resolve()), stamp)
    with _SHARED_LOCK:
        sig = _SHARED.get(key)
        if sig is None:
            sig = ContractSignals(Path(path), make(), stamp)
            _SHARED[key] = sig
        return sig


def _revive(path: Path, offsets: Mapping[str, tuple[int, int]], stamp: tuple | None) -> ContractSignals:
    """Unpickling: the receiving process's shared instance for the same file identity, else this one."""
    if stamp is None:
        return ContractSignals(path, offsets)
    return _shared(path, stamp, lambda: offsets)


def output_length(n: int, fs: float, fs_out: float) -> int:
    """Samples after the contract's resampling of n samples (as scipy's resample_poly: ceil(n * up / down))."""
    if float(fs) == float(fs_out):
        return n
    frac = Fraction(float(fs_out) / float(fs)).limit_denominator(1000)
    return math.ceil(n * frac.numerator / frac.denominator)


def ingest_contract_key(cohort: Cohort) -> str:
    """Key of the contract whose deterministic part ingest wrote to cache/ecg.npy."""
    return project_contract(cohort.meta["data_config"]).deterministic_key()


def contract_signals(cohort: Cohort, contract: InputContract) -> ContractSignals:
    """The cached deterministic part of `contract` for `cohort`, made from the decoded sources if needed.
    One instance per cache file and process (see `ContractSignals`)."""
    if contract.deterministic_key() == ingest_contract_key(cohort):
        path = cohort.root / "cache" / "ecg.npy"

        def make() -> OffsetTable:
            ecgs = cohort.ecgs
            return OffsetTable(ecgs["ecg_id"], ecgs[["offset", "n_samples"]].to_numpy(np.int64))
    else:
        folder = cohort.root / "cache" / "contracts" / contract.deterministic_key()
        if not (folder / _DONE).exists():
            _build_locked(cohort, contract, folder)
        path = folder / "ecg.npy"

        def make() -> OffsetTable:
            return OffsetTable(cohort.ecgs["ecg_id"], np.load(folder / "index.npy"))  # (N, 2) in ecgs order
    # the offsets come from ecgs.parquet (ids, and the ingest cache's offsets) and the cache folder
    return _shared(path, (_file_id(path), _file_id(cohort.root / "ecgs.parquet")), make)


def _build_locked(cohort: Cohort, contract: InputContract, folder: Path) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder; the others wait and then read its result
        try:
            if not (folder / _DONE).exists():
                _build(cohort, contract, folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build(cohort: Cohort, contract: InputContract, folder: Path) -> None:
    ecgs = cohort.ecgs
    lengths = np.array([output_length(int(n), float(fs), contract.fs)
                        for n, fs in zip(ecgs["src_n_samples"], ecgs["fs_orig"], strict=True)], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else np.zeros(0, np.int64)
    tmp = folder.with_name(folder.name + f".{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover of an earlier crash (pid-named)
    tmp.mkdir(parents=True)
    mm = np.lib.format.open_memmap(tmp / "ecg.npy", mode="w+", dtype=np.float32,
                                   shape=(len(contract.leads), int(lengths.sum())))
    for ecg_id, off, n in zip(ecgs["ecg_id"], offsets, lengths, strict=True):
        src, fs = cohort.ecg_source(ecg_id)
        out = record_part(np.asarray(src), fs, contract)  # (12, T_src) -> (12, n)
        if out.shape[1] != n:
            raise RuntimeError(f"contract cache: {out.shape[1]} samples where {n} were expected")
        mm[:, off : off + n] = out
    mm.flush()
    del mm
    np.save(tmp / "index.npy", np.stack([offsets, lengths], axis=1))
    (tmp / _DONE).write_text(json.dumps(contract.to_dict(), indent=1) + "\n")
    if folder.exists():  # an incomplete folder without the done marker (a killed build of ours)
        shutil.rmtree(folder)
    os.replace(tmp, folder)


__all__ = ["ContractSignals", "OffsetTable", "contract_signals", "ingest_contract_key", "output_length"]
