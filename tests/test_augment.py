"""Training-time ECG augmentations and angiography view dropout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stence.data import augment as A

FS = 500.0


def _crop(seed: int = 0) -> np.ndarray:
    """(12, 1500) strictly positive, non-periodic signal so shifts and zeroed segments are identifiable."""
    rng = np.random.default_rng(seed)
    return (1.0 + 0.2 * rng.random((12, 1500))).astype(np.float32)


def _find_shift(x: np.ndarray, y: np.ndarray, max_shift: int) -> int | None:
    """The s with y == roll(x, s) and |s| <= max_shift, or None (x has unique columns)."""
    hits = np.flatnonzero(np.isclose(y, x[:, :1], atol=1e-6).all(axis=0))
    for j in hits:
        s = int(j) if j <= x.shape[1] // 2 else int(j) - x.shape[1]
        if abs(s) <= max_shift and np.allclose(np.roll(x, s, axis=1), y, atol=1e-6):
            return s
    return None


def test_shape_dtype_and_input_untouched() -> None:
    x = _crop()
    before = x.copy()
    out = A.augment_ecg(x, FS, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_array_equal(x, before)


def test_deterministic_given_seed() -> None:
    x = _crop()
    a = [A.augment_ecg(x, FS, np.random.default_rng(s)) for s in range(20)]
    b = [A.augment_ecg(x, FS, np.random.default_rng(s)) for s in range(20)]
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    assert not all(np.array_equal(a[0], u) for u in a[1:])


def test_shift_is_circular_and_within_one_second() -> None:
    x = _crop()
    shifts = []
    for s in range(40):
        out = A.augment_ecg(x, FS, np.random.default_rng(s), p_scale=0, p_noise=0, p_mask=0)
        found = _find_shift(x, out, int(A.SHIFT_MAX_S * FS))
        assert found is not None  # a pure circular shift of at most 1 s
        shifts.append(found)
    assert min(shifts) < -100 and max(shifts) > 100  # both directions, sizeable


def test_amplitude_scale_within_bounds_and_probability() -> None:
    x = _crop()
    ratios = []
    for s in range(400):
        out = A.augment_ecg(x, FS, np.random.default_rng(s), p_noise=0, p_mask=0)
        ratios.append(float(np.linalg.norm(out) / np.linalg.norm(x)))  # a roll keeps the norm
    r = np.array(ratios)
    lo, hi = A.SCALE_RANGE
    assert (r >= lo - 1e-6).all() and (r <= hi + 1e-6).all()
    scaled = np.abs(r - 1) > 1e-6
    assert abs(scaled.mean() - A.P_SCALE) < 0.07
    assert r.min() < lo + 0.05 and r.max() > hi - 0.05  # the whole range is used


def test_noise_level_when_forced() -> None:
    x = _crop()
    rng = np.random.default_rng(5)
    out = A.augment_ecg(x, FS, rng, p_scale=0, p_noise=1, p_mask=0)
    clean = A.augment_ecg(x, FS, np.random.default_rng(5), p_scale=0, p_noise=0, p_mask=0)  # same shift
    residual = out - clean
    assert residual.std() == pytest.approx(A.NOISE_STD, rel=0.05)


def test_zeroed_segments_exist_when_forced() -> None:
    x = _crop()
    seg = int(round(A.MASK_SEGMENT_S * FS))
    for s in range(10):
        out = A.augment_ecg(x, FS, np.random.default_rng(s), p_scale=0, p_noise=0, p_mask=1)
        zero_cols = (out == 0).all(axis=0)  # zeroed across all leads at once
        assert seg <= zero_cols.sum() <= A.MASK_SEGMENTS * seg
        runs = np.diff(np.flatnonzero(np.diff(np.r_[0, zero_cols.astype(int), 0])))[::2]
        assert len(runs) >= 1 and runs.min() >= seg
    none = A.augment_ecg(x, FS, np.random.default_rng(0), p_mask=0)
    assert not (none == 0).all(axis=0).any()


def test_drop_views_bounds() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5, 10):
        sizes = []
        for _ in range(300):
            keep = A.drop_views(n, 0.3, rng)
            assert keep.dtype == np.int64 and np.array_equal(keep, np.unique(keep))
            assert len(keep) >= 1 and len(keep) <= n and keep.min() >= 0 and keep.max() < n
            assert n - len(keep) <= math.ceil(0.3 * n)
            sizes.append(len(keep))
        if n >= 5:
            assert min(sizes) < n and max(sizes) == n  # sometimes drops, sometimes keeps all
    np.testing.assert_array_equal(A.drop_views(7, 0.0, rng), np.arange(7))
    np.testing.assert_array_equal(A.drop_views(1, 0.9, rng), [0])
    assert len(A.drop_views(4, 1.0, np.random.default_rng(1))) >= 1
    a = A.drop_views(10, 0.3, np.random.default_rng(42))
    b = A.drop_views(10, 0.3, np.random.default_rng(42))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        A.drop_views(0, 0.3, rng)
