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
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import numpy as np

from stence.data.cohort_io import Cohort
from stence.data.contract import InputContract, project_contract
from stence.data.contract_apply import record_part

_DONE = "contract.json"


@dataclass
class ContractSignals:
    """Read access to the deterministic part of one contract for every ECG of a cohort (the memmap is opened
    on first use in each process and never pickled)."""

    path: Path  # (12, total) float32 .npy
    offsets: dict[str, tuple[int, int]]  # ecg_id -> (offset, n_samples)

    @cached_property
    def cache(self) -> np.ndarray:
        return np.load(self.path, mmap_mode="r")

    def signal(self, ecg_id: str) -> np.ndarray:
        off, n = self.offsets[ecg_id]
        return self.cache[:, off : off + n]  # (12, n) at the contract's rate

    def __getstate__(self) -> dict:
        return {"path": self.path, "offsets": self.offsets}


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
    """The cached deterministic part of `contract` for `cohort`, made from the decoded sources if needed."""
    ecgs = cohort.ecgs
    if contract.deterministic_key() == ingest_contract_key(cohort):
        pairs = zip(ecgs["offset"].astype(int), ecgs["n_samples"].astype(int), strict=True)
        offsets = dict(zip(ecgs["ecg_id"], pairs, strict=True))
        return ContractSignals(cohort.root / "cache" / "ecg.npy", offsets)
    folder = cohort.root / "cache" / "contracts" / contract.deterministic_key()
    if not (folder / _DONE).exists():
        _build_locked(cohort, contract, folder)
    index = np.load(folder / "index.npy")  # (N, 2) offset, n_samples in ecgs order
    offsets = {e: (int(o), int(n)) for e, (o, n) in zip(ecgs["ecg_id"], index, strict=True)}
    return ContractSignals(folder / "ecg.npy", offsets)


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


__all__ = ["ContractSignals", "contract_signals", "ingest_contract_key", "output_length"]
