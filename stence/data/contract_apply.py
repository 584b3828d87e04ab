"""The one place an `InputContract` is applied (see stence/data/contract.py for the steps).

`record_part` is the deterministic, per-record part (cached per contract for an ingested cohort);
`window_part` cuts and finishes one window; `apply_contract` is both, with the first window, as evaluation,
`stence predict` and `stence embed` use it.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import butter, resample_poly, sosfiltfilt

from stence.data.contract import InputContract
from stence.data.preprocess import crop, normalise_crop, remove_baseline, resample


def bandpass(sig: np.ndarray, fs: float, low: float, high: float, fs_out: float) -> np.ndarray:
    """Zero-phase Butterworth band-pass (order 4, second-order sections) along time: (L, T) -> (L, T) float64.

    The high cut is limited to 0.45 x fs_out (anti-aliasing before resampling) and below Nyquist; NaN -> 0."""
    nyq = fs / 2.0
    hi = min(high, 0.45 * fs_out, 0.99 * nyq)
    x = np.nan_to_num(np.asarray(sig, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    sos = butter(4, (low / nyq, hi / nyq), btype="band", output="sos")
    return sosfiltfilt(sos, x, axis=-1)


def _resample_median(sig: np.ndarray, fs: float, fs_out: float) -> np.ndarray:
    """scipy `resample_poly` with Kaiser 5 and median padding: (L, T) -> (L, ceil(T * up / down)) float64."""
    if float(fs) == float(fs_out):
        return np.asarray(sig, dtype=np.float64)
    frac = Fraction(float(fs_out) / float(fs)).limit_denominator(1000)
    x = np.nan_to_num(np.asarray(sig, dtype=np.float64), nan=0.0)
    return resample_poly(x, frac.numerator, frac.denominator, axis=-1, window=("kaiser", 5.0), padtype="median")


def robust_record_normalise(sig: np.ndarray, outlier_sigma: float = 3.0, clamp: float = 3.0) -> np.ndarray:
    """OTIS upstream normalisation of one stored record: (L, T) -> (L, T) float64.

    Plain mean/std over all leads x time; points with |z| > outlier_sigma (z with std + 1e-9) are left out;
    mean and std again over the rest (count + 1e-9 in both denominators); (x - mean) / (std + 1e-9); clamp
    to +/- clamp. NaN samples are left out of the statistics and become 0."""
    x = np.asarray(sig, dtype=np.float64)
    ok = np.isfinite(x)
    vals = np.where(ok, x, 0.0)
    n = max(int(ok.sum()), 1)
    mean0 = vals.sum() / n
    std0 = np.sqrt((((vals - mean0) ** 2) * ok).sum() / n)
    mask = ok & (np.abs((vals - mean0) / (std0 + 1e-9)) <= outlier_sigma)
    count = mask.sum() + 1e-9
    mean = (vals * mask).sum() / count
    std = np.sqrt((((vals - mean) ** 2) * mask).sum() / count)
    out = np.clip((vals - mean) / (std + 1e-9), -clamp, clamp)
    return np.where(ok, out, 0.0)


def record_part(signal: np.ndarray, fs: float, c: InputContract) -> np.ndarray:
    """Steps 1-4 of the contract on a whole record: (L, T) mV at fs -> (L, T') float32 at c.fs.

    NaN (invalid samples) survives the zero-padded resampling and the ALS fit (which gives it zero weight);
    the band-pass, median-padded resampling and record normalisation turn it into 0."""
    x = np.asarray(signal, dtype=np.float64)
    if c.bandpass_hz is not None:
        x = bandpass(x, fs, c.bandpass_hz[0], c.bandpass_hz[1], c.fs)
    if c.resample_padding == "median":
        x = _resample_median(x, fs, c.fs)
    else:
        x, _ = resample(x, fs, c.fs)
    if c.baseline == "als":
        x = remove_baseline(x, c.als_lambda, c.als_p, c.als_iter)
    if c.normalise == "record_robust":
        x = robust_record_normalise(x, c.outlier_sigma, c.clamp)
    return np.asarray(x, dtype=np.float32)


def window_part(sig: np.ndarray, c: InputContract, start: int = 0) -> np.ndarray:
    """Steps 5-7: (L, T') cached record at c.fs -> (L, c.n_samples) float32 model input."""
    x = crop(np.asarray(sig, dtype=np.float32), c.n_samples, start)  # (L, W), zero-padded if short
    if c.normalise == "window_group_z":
        x = normalise_crop(x, c.clip_sigma)
    else:
        x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    if c.has_scaler:  # upstream scale_ecg: float32 arithmetic, scale clamped at 1e-8
        mean = np.asarray(c.scaler_mean, dtype=np.float32)[:, None]
        scale = np.maximum(np.asarray(c.scaler_scale, dtype=np.float32), np.float32(1e-8))[:, None]
        x = (x.astype(np.float32) - mean) / scale
    return x.astype(np.float32, copy=False)


def apply_contract(signal: np.ndarray, fs: float, c: InputContract) -> np.ndarray:
    """A whole record -> the model input of its first window: (L, T) mV at fs -> (L, c.n_samples) float32."""
    return window_part(record_part(signal, fs, c), c, 0)


__all__ = ["apply_contract", "bandpass", "record_part", "robust_record_normalise", "window_part"]
