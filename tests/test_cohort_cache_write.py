"""Writing the ECG caches consumes the staged per-record arrays and leaves a fully allocated cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from stence.data.cohort_io import _concat_cache


def _stage(folder: Path, n_leads: int, lengths: list[int], seed: int = 0) -> tuple[list[Path], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths, arrays = [], []
    for i, n in enumerate(lengths):
        a = rng.standard_normal((n_leads, n)).astype(np.float32)
        np.save(folder / f"r{i}.npy", a)
        paths.append(folder / f"r{i}.npy")
        arrays.append(a)
    return paths, arrays


def test_cache_is_the_concatenation_and_the_staged_arrays_are_consumed(tmp_path: Path) -> None:
    lengths = [5000, 0, 3600, 7500, 1]
    paths, arrays = _stage(tmp_path / "records", 12, lengths)
    out = tmp_path / "ecg.npy"
    offsets = _concat_cache(out, pd.Series([str(p) for p in paths]), np.array(lengths, dtype=np.int64))
    cache = np.load(out, mmap_mode="r")
    assert cache.shape == (12, sum(lengths)) and cache.dtype == np.float32
    for a, off, n in zip(arrays, offsets, lengths, strict=True):
        np.testing.assert_array_equal(cache[:, off : off + n], a)
    assert not any(p.exists() for p in paths)
    st = os.stat(out)
    assert st.st_blocks * 512 >= st.st_size - 4096  # every block reserved: no sparse hole left to SIGBUS on


def test_a_staged_array_named_twice_is_copied_twice_and_removed_after_its_last_use(tmp_path: Path) -> None:
    paths, arrays = _stage(tmp_path / "records", 3, [10, 20])
    names = pd.Series([str(paths[0]), str(paths[1]), str(paths[0])])
    offsets = _concat_cache(tmp_path / "c.npy", names, np.array([10, 20, 10], dtype=np.int64))
    cache = np.load(tmp_path / "c.npy")
    np.testing.assert_array_equal(cache[:, offsets[2] : offsets[2] + 10], arrays[0])
    np.testing.assert_array_equal(cache[:, offsets[0] : offsets[0] + 10], arrays[0])
    assert not paths[0].exists() and not paths[1].exists()
