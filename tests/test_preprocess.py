"""ECG preprocessing: resampling, ALS baseline removal, per-crop normalisation, cropping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.bench_data import published_als  # the formula as the public OTIS/StenCE code writes it
from stence.data.preprocess import (
    als_baseline,
    crop,
    deterministic_ecg,
    normalise_crop,
    random_start,
    remove_baseline,
    resample,
)


def _ecg_like(fs: float = 500.0, seconds: float = 10.0, seed: int = 0) -> np.ndarray:
    """(12, T) mV: narrow QRS spikes and broad T waves at ~72 bpm, different per lead, small noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(fs * seconds)) / fs
    beats = np.arange(0.3, seconds, 60 / 72)
    qrs = sum(np.exp(-0.5 * ((t - b) / 0.012) ** 2) for b in beats)
    twave = sum(np.exp(-0.5 * ((t - b - 0.3) / 0.05) ** 2) for b in beats)
    amp = rng.uniform(0.5, 1.5, size=(12, 1))
    return (amp * qrs + 0.25 * amp * twave + 0.01 * rng.standard_normal((12, t.size))).astype(np.float64)


def test_resample_keeps_frequency_and_amplitude() -> None:
    fs, f0, amp = 1000.0, 7.0, 1.3
    t = np.arange(10_000) / fs
    x = np.stack([amp * np.sin(2 * np.pi * f0 * t), 0.5 * np.cos(2 * np.pi * 2 * f0 * t)])
    y, fs_out = resample(x, fs, 500.0)
    assert fs_out == 500.0 and y.shape == (2, 5000)
    spec = np.abs(np.fft.rfft(y[0]))
    freqs = np.fft.rfftfreq(y.shape[1], 1 / fs_out)
    assert freqs[spec.argmax()] == pytest.approx(f0, abs=0.1)
    t_out = np.arange(5000) / fs_out
    inner = slice(200, -200)  # away from the filter's edge transients
    np.testing.assert_allclose(y[0, inner], amp * np.sin(2 * np.pi * f0 * t_out[inner]), atol=5e-3)
    np.testing.assert_allclose(y[1, inner], 0.5 * np.cos(2 * np.pi * 2 * f0 * t_out[inner]), atol=5e-3)


def test_resample_odd_ratio_length_and_identity() -> None:
    x = np.random.default_rng(0).standard_normal((12, 3600)).astype(np.float32)
    y, fs = resample(x, 360.0, 500.0)
    assert fs == 500.0 and y.shape == (12, 5000) and y.dtype == np.float32
    same, fs2 = resample(x, 500.0, 500.0)
    assert fs2 == 500.0 and same is x


def test_resample_restores_nan_gap() -> None:
    x = np.ones((1, 2000))
    x[0, 1000:1200] = np.nan
    y, _ = resample(x, 1000.0, 500.0)
    nan = np.isnan(y[0])
    assert nan[505:595].all() and nan.sum() == 100  # the gap, halved
    assert np.isfinite(y[0, :490]).all() and np.isfinite(y[0, 610:]).all()


def test_als_matches_reference_formulation() -> None:
    y = _ecg_like(seconds=2.0)[0] + np.linspace(0, 0.7, 1000)
    for lam, p, niter in [(1e7, 0.3, 5), (1e5, 0.05, 10)]:
        np.testing.assert_allclose(
            als_baseline(y, lam, p, niter), published_als(y, lam, p, niter), atol=1e-6
        )


def test_baseline_removal_removes_drift() -> None:
    fs = 500.0
    clean = _ecg_like(fs)
    t = np.arange(clean.shape[1]) / fs
    phase = np.linspace(0, 2, 12)[:, None]
    drift = 0.8 * np.sin(2 * np.pi * 0.15 * t + phase) + 0.3 * t / t[-1]  # respiration-like + electrode creep
    out = remove_baseline(clean + drift)
    residual = out - clean
    residual -= residual.mean(axis=1, keepdims=True)  # ALS with p = 0.3 leaves a constant offset
    assert np.sqrt((residual**2).mean()) < 0.1 * np.sqrt((drift**2).mean())
    # the QRS peaks survive: correlation with the clean signal stays high
    assert min(np.corrcoef(o, c)[0, 1] for o, c in zip(out, clean, strict=True)) > 0.97


def test_baseline_bridges_nan_and_keeps_them() -> None:
    x = _ecg_like(seconds=4.0)[:2] + 1.0
    x[0, 500:700] = np.nan
    base = als_baseline(x[0])
    assert np.isfinite(base).all()
    out = remove_baseline(x)
    assert np.isnan(out[0, 500:700]).all() and np.isfinite(np.delete(out[0], range(500, 700))).all()
    assert np.isfinite(out[1]).all()


def test_deterministic_ecg_on_real_record(shared_data: Path) -> None:
    from stence.data.wfdb_io import read_ecg

    rec = read_ecg(shared_data / "ecg" / "wfdb" / "s0010_re")
    sig, fs = deterministic_ecg(rec.signal, rec.fs, 500.0, 1e7, 0.3, 5)
    assert fs == 500.0 and sig.shape == (12, 19200) and sig.dtype == np.float32
    assert np.isfinite(sig).all()

    # baseline removed: the wander of each lead's 2-s moving median shrinks several-fold vs resampling alone
    def wander(x: np.ndarray) -> np.ndarray:
        trend = np.array([[np.median(r[i : i + 1000]) for i in range(0, x.shape[1] - 1000, 250)] for r in x])
        return trend.max(axis=1) - trend.min(axis=1)

    before = wander(deterministic_ecg(rec.signal, rec.fs, 500.0, 1e7, 0.3, 0)[0])  # 0 iterations: no fit
    after = wander(sig)
    assert before.mean() > 0.15  # this record really wanders (mV)
    assert after.mean() < 0.25 * before.mean() and after.max() < 0.1


def _reference_normalise(x: np.ndarray) -> np.ndarray:
    """The public OTIS/StenCE per-sample normalisation without the baseline step."""
    x = np.nan_to_num(x)
    s = x.std()
    x = np.clip(x, -4 * s, 4 * s)
    out = np.empty_like(x)
    for lo, hi in ((0, 3), (3, 6), (6, 12)):
        out[lo:hi] = (x[lo:hi] - x[lo:hi].mean()) / np.sqrt(x[lo:hi].var() + 1e-12)
    return out


def test_normalise_crop_group_stats_nan_and_clipping() -> None:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((12, 1500)) * rng.uniform(0.1, 3, (12, 1)) + rng.uniform(-1, 1, (12, 1))).astype(
        np.float32
    )
    x[4, 100:150] = np.nan
    x[8, 700] = 500.0  # an artefact spike
    out = normalise_crop(x)
    assert out.shape == (12, 1500) and out.dtype == np.float32 and np.isfinite(out).all()
    for lo, hi in ((0, 3), (3, 6), (6, 12)):
        assert abs(out[lo:hi].mean()) < 1e-4 and out[lo:hi].var() == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(out, _reference_normalise(x.astype(np.float64)), atol=1e-4)
    # clipping: the spike was cut to 4 std of the crop before the z-score
    filled = np.nan_to_num(x)
    bound = 4 * filled.std()
    g = np.clip(filled, -bound, bound)[6:12]
    assert out[8, 700] == pytest.approx((bound - g.mean()) / g.std(), rel=1e-4)
    assert out[8, 700] < 10  # unclipped it would be ~ (500 - mean) / std of the group, far larger


def test_normalise_crop_of_all_zero_crop_is_zero() -> None:
    np.testing.assert_array_equal(normalise_crop(np.zeros((12, 100), np.float32)), 0.0)


def test_crop_pads_and_random_start_is_in_range() -> None:
    sig = np.arange(2 * 1000, dtype=np.float32).reshape(2, 1000) + 1
    c = crop(sig, 1500, 0)
    assert c.shape == (2, 1500) and (c[:, 1000:] == 0).all() and np.array_equal(c[:, :1000], sig)
    np.testing.assert_array_equal(crop(sig, 100, 250), sig[:, 250:350])
    tail = crop(sig, 100, 950)
    assert np.array_equal(tail[:, :50], sig[:, 950:]) and (tail[:, 50:] == 0).all()
    rng = np.random.default_rng(0)
    starts = [random_start(1000, 300, rng) for _ in range(500)]
    assert min(starts) >= 0 and max(starts) <= 700 and len(set(starts)) > 100
    assert random_start(200, 300, rng) == 0 and random_start(300, 300, rng) == 0
    with pytest.raises(ValueError):
        crop(sig, 10, -1)
