"""ECG preprocessing steps. The sampling rate travels with the signal: steps that change it take and
return `(sig, fs)`.

The deterministic part (resample, per-lead ALS baseline removal) runs once at ingest and is cached;
cropping and per-crop normalisation (NaN -> 0, clip, group-wise z-score) run at training time. NaN
(invalid samples) survives the cached part: resampling keeps a NaN mask, and the baseline fit gives NaN
samples zero weight, so gaps are bridged by the smoother instead of being fitted as zeros.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import sparse
from scipy.linalg import LinAlgError, solve_banded, solveh_banded
from scipy.signal import resample_poly

# Lead groups of the group-wise z-score: [I-III], [aVR-aVF], [V1-V6] (rows of the standard order).
LEAD_GROUPS: tuple[tuple[int, int], ...] = ((0, 3), (3, 6), (6, 12))


def _ratio(fs: float, fs_out: float, max_den: int = 1000) -> tuple[int, int]:
    frac = Fraction(float(fs_out) / float(fs)).limit_denominator(max_den)
    return frac.numerator, frac.denominator


def resample(sig: np.ndarray, fs: float, fs_out: float) -> tuple[np.ndarray, float]:
    """Polyphase resampling along the last axis: (..., T) at fs -> (..., ceil(T * up / down)) at fs_out.

    up/down is a rational approximation of fs_out / fs (denominator <= 1000). NaN samples are filled
    with 0 for filtering and restored afterwards at the nearest output positions (values right next to
    a gap are slightly pulled towards 0 by the filter).
    """
    if fs <= 0 or fs_out <= 0:
        raise ValueError(f"sampling rates must be positive, got fs={fs}, fs_out={fs_out}")
    if float(fs) == float(fs_out):
        return sig, fs_out
    up, down = _ratio(fs, fs_out)
    nan = ~np.isfinite(sig)
    x = np.where(nan, 0.0, sig).astype(np.float64)
    y = resample_poly(x, up, down, axis=-1)  # (..., T) -> (..., T')
    if nan.any():
        src = np.minimum((np.arange(y.shape[-1]) * down) // up, sig.shape[-1] - 1)
        y[nan[..., src]] = np.nan
    return y.astype(sig.dtype if np.issubdtype(sig.dtype, np.floating) else np.float32), fs_out


@lru_cache(maxsize=8)
def _second_diff_gram(n: int) -> np.ndarray:
    """Upper banded form (3, n) of D^T D for the (n-2, n) second-difference matrix D (read-only, cached)."""
    d = sparse.diags([1.0, -2.0, 1.0], [0, 1, 2], shape=(n - 2, n))
    gram = (d.T @ d).tocsr()
    ab = np.zeros((3, n))
    ab[0, 2:] = gram.diagonal(2)  # second super-diagonal
    ab[1, 1:] = gram.diagonal(1)  # first super-diagonal
    ab[2] = gram.diagonal(0)
    ab.flags.writeable = False
    return ab


@lru_cache(maxsize=8)
def _gram_lower(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """D^T D's diagonal, first and second sub-diagonal as (n,) arrays (entry i: G[i, i], G[i, i-1], G[i, i-2])."""
    ab = _second_diff_gram(n)
    return ab[2], ab[1], ab[0]


def _als_lapack(x: np.ndarray, lam: float, p: float, n_iter: int) -> np.ndarray:
    """One lead's ALS baseline with LAPACK's banded Cholesky (the fallback of the compiled path): (T,) -> (T,)."""
    n = x.shape[0]
    ok = np.isfinite(x)
    y = np.where(ok, x, 0.0)
    gram = lam * _second_diff_gram(n)
    w = ok.astype(np.float64)
    z = np.zeros(n)  # n_iter = 0: no baseline (removal switched off)
    for _ in range(n_iter):
        ab = gram.copy()
        ab[2] += w
        try:
            z = solveh_banded(ab, w * y, check_finite=False)
        except LinAlgError:  # numerically not positive definite: fall back to banded LU
            full = np.zeros((5, n))
            full[0], full[1], full[2] = ab[0], ab[1], ab[2]
            full[3, :-1], full[4, :-2] = ab[1, 1:], ab[0, 2:]
            z = solve_banded((2, 2), full, w * y, check_finite=False)
        w = np.where(y > z, p, 1.0 - p) * ok
    return z


def als_baselines(sig: np.ndarray, lam: float = 1e7, p: float = 0.3, n_iter: int = 5) -> np.ndarray:
    """Asymmetric least squares baseline (Eilers & Boelens 2005) of each lead: (n_leads, T) -> (n_leads, T) float64.

    Minimises sum w_i (x_i - z_i)^2 + lam * ||D2 z||^2, reweighting w = p above the fit and 1 - p
    below, `n_iter` times (0 = no baseline). The system is pentadiagonal: each solve is a banded Cholesky,
    O(T), compiled for all leads at once (stence/data/als_kernel.py). NaN samples get zero weight (the
    baseline bridges them); a lead with fewer than 3 finite samples gets a zero baseline.
    """
    x = np.atleast_2d(np.asarray(sig, dtype=np.float64))  # (L, T)
    n = x.shape[1]
    if n < 3:
        return np.where(np.isfinite(x), x, 0.0)
    finite = np.isfinite(x).sum(axis=1)  # (L,)
    base = np.zeros_like(x)
    ok_lead = np.ones(x.shape[0], dtype=bool)
    if n_iter > 0:
        from stence.data.als_kernel import als_leads  # numba: imported (and compiled) where ingest needs it

        base_t = np.empty((n, x.shape[0]))  # (T, L): the kernel interleaves the leads
        als_leads(np.ascontiguousarray(x.T), *_gram_lower(n), float(lam), float(p), int(n_iter), base_t, ok_lead)
        base = np.ascontiguousarray(base_t.T)
    for lead in np.flatnonzero(finite < 3):
        base[lead] = 0.0
    for lead in np.flatnonzero(~ok_lead & (finite >= 3)):  # numerically not positive definite
        base[lead] = _als_lapack(x[lead], lam, p, n_iter)
    return base


def als_baseline(x: np.ndarray, lam: float = 1e7, p: float = 0.3, n_iter: int = 5) -> np.ndarray:
    """ALS baseline of one lead: (T,) -> (T,) (see `als_baselines`)."""
    return als_baselines(np.asarray(x, dtype=np.float64)[None, :], lam, p, n_iter)[0]


def remove_baseline(sig: np.ndarray, lam: float = 1e7, p: float = 0.3, n_iter: int = 5) -> np.ndarray:
    """Subtract the per-lead ALS baseline: (n_leads, T) -> (n_leads, T); NaN stays NaN."""
    base = als_baselines(sig, lam, p, n_iter)
    return (sig - base).astype(sig.dtype if np.issubdtype(sig.dtype, np.floating) else np.float32)


def deterministic_ecg(
    rec_signal: np.ndarray, fs: float, fs_out: float, lam: float = 1e7, p: float = 0.3, n_iter: int = 5
) -> tuple[np.ndarray, float]:
    """The cached part of ECG preprocessing: resample to fs_out, then per-lead baseline removal.

    (12, T) mV at fs -> (12, T') float32 mV at fs_out.
    """
    sig, fs_new = resample(np.asarray(rec_signal, dtype=np.float64), fs, fs_out)
    sig = remove_baseline(sig, lam, p, n_iter)
    return sig.astype(np.float32), fs_new


def normalise_crop(x: np.ndarray, clip_sigma: float = 4.0) -> np.ndarray:
    """Per-crop normalisation, (12, W) -> (12, W) float32.

    NaN -> 0; clip to +/- clip_sigma * std of the whole crop (all leads x time); z-score over each lead
    group [I-III], [aVR-aVF], [V1-V6] with mean and variance over the group's leads x time (eps 1e-12).
    """
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    bound = clip_sigma * float(x.std())
    x = np.clip(x, -bound, bound)
    out = np.empty_like(x)
    for lo, hi in LEAD_GROUPS:
        g = x[lo:hi]
        out[lo:hi] = (g - g.mean()) / np.sqrt(g.var() + 1e-12)
    return out


def crop(sig: np.ndarray, n: int, start: int = 0) -> np.ndarray:
    """(n_leads, T) -> (n_leads, n): samples [start, start + n), zero-padded on the right if short."""
    if start < 0 or n <= 0:
        raise ValueError(f"crop needs start >= 0 and n > 0, got start={start}, n={n}")
    out = np.zeros((sig.shape[0], n), dtype=sig.dtype)
    piece = sig[:, start : start + n]
    out[:, : piece.shape[1]] = piece
    return out


def random_start(t: int, n: int, rng: np.random.Generator) -> int:
    """Uniform crop start in [0, t - n]; 0 when the record is not longer than the crop."""
    return 0 if t <= n else int(rng.integers(0, t - n + 1))
