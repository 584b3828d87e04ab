"""The compiled ALS baseline fit equals LAPACK's banded Cholesky path, lead by lead, in every regime."""

from __future__ import annotations

import numpy as np
import pytest

from stence.data.preprocess import _als_lapack, als_baseline, als_baselines


def _leads(n_leads: int = 12, n: int = 5000, seed: int = 0) -> np.ndarray:
    """(L, T) ECG-like leads with a random-walk wander and spikes."""
    rng = np.random.default_rng(seed)
    wander = np.cumsum(rng.standard_normal((n_leads, n)), axis=1) * 0.01
    spikes = (rng.random((n_leads, n)) < 0.01) * rng.uniform(0.5, 2.0, (n_leads, n))
    return wander + spikes + 0.05 * rng.standard_normal((n_leads, n))


def _lapack(x: np.ndarray, lam: float, p: float, n_iter: int) -> np.ndarray:
    return np.stack([_als_lapack(row, lam, p, n_iter) for row in x])


@pytest.mark.parametrize("lam, p, n_iter", [(1e7, 0.3, 5), (1e5, 0.05, 10), (1e3, 0.5, 1), (1e7, 0.3, 0)])
def test_kernel_equals_lapack(lam: float, p: float, n_iter: int) -> None:
    x = _leads()
    got, ref = als_baselines(x, lam, p, n_iter), _lapack(x, lam, p, n_iter)
    assert got.shape == x.shape and got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-7 * max(1.0, np.abs(ref).max()))


def test_nan_gaps_and_sparse_leads() -> None:
    x = _leads(4, 3000, seed=1)
    x[0, 100:900] = np.nan  # a gap: bridged
    x[1, :] = np.nan  # nothing finite: zero baseline
    x[2, 2:] = np.nan  # two finite samples: zero baseline
    x[3, ::2] = np.nan  # every other sample
    got = als_baselines(x)
    assert np.isfinite(got).all()
    assert (got[1] == 0).all() and (got[2] == 0).all()
    for lead in (0, 3):
        np.testing.assert_allclose(got[lead], _als_lapack(x[lead], 1e7, 0.3, 5), atol=1e-7)


def test_weights_that_reach_zero_come_back() -> None:
    """p = 0 sets the weight of samples above the fit to 0 for one step only, as in the LAPACK path."""
    x = _leads(3, 2000, seed=2)
    np.testing.assert_allclose(als_baselines(x, 1e4, 0.0, 4), _lapack(x, 1e4, 0.0, 4), atol=1e-7)


def test_short_and_single_lead_inputs() -> None:
    assert np.array_equal(als_baselines(np.array([[1.0, np.nan]])), np.array([[1.0, 0.0]]))
    y = _leads(1, 800, seed=3)[0]
    np.testing.assert_allclose(als_baseline(y), _als_lapack(y, 1e7, 0.3, 5), atol=1e-7)


def test_not_positive_definite_lead_falls_back_to_lapack() -> None:
    """At lam = 1e16 the compiled Cholesky meets a non-positive pivot (cancellation): the lead is refitted by
    the LAPACK path, so the result is LAPACK's exactly."""
    from stence.data.als_kernel import als_leads
    from stence.data.preprocess import _gram_lower

    x = np.cumsum(np.random.default_rng(4).standard_normal((2, 500)), axis=1) * 0.01
    raw, ok = np.zeros((500, 2)), np.ones(2, dtype=bool)
    als_leads(np.ascontiguousarray(x.T), *_gram_lower(500), 1e16, 0.3, 2, raw, ok)
    assert not ok.any()  # the kernel itself gave up on both leads
    np.testing.assert_array_equal(als_baselines(x, 1e16, 0.3, 2), _lapack(x, 1e16, 0.3, 2))
