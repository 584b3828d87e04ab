"""Compiled ALS baseline fit of all leads of a record at once (numba): the hot loop of ingest.

The system of each reweighting step, (diag(w) + lam * D2^T D2) z = w * y, is symmetric, positive definite and
pentadiagonal; it is solved by a banded Cholesky factorisation L L^T (L lower with two sub-diagonals) in one
pass down and one pass up, O(T) per lead and step, with no Python or LAPACK call per solve. A pivot that is
not positive (the matrix is numerically not positive definite) marks its lead as failed; the caller refits
that lead with the LAPACK path.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _solve_penta(a0: np.ndarray, a1: np.ndarray, a2: np.ndarray, b: np.ndarray, l0: np.ndarray,
                 l1: np.ndarray, l2: np.ndarray, z: np.ndarray) -> bool:
    """Solve A z = b for symmetric pentadiagonal A: a0[i] = A[i, i], a1[i] = A[i, i-1], a2[i] = A[i, i-2].

    l0, l1, l2 (T,) are scratch for the Cholesky factor (l0 holds 1 / L[i, i]); z (T,) receives the solution. False if a pivot is
    not positive (z is then undefined).
    """
    n = a0.shape[0]
    for i in range(n):  # factor and forward substitution (L y = b, y kept in z)
        v2 = 0.0
        v1 = 0.0
        if i >= 2:
            v2 = a2[i] * l0[i - 2]
        if i >= 1:
            v1 = a1[i]
            if i >= 2:
                v1 -= v2 * l1[i - 1]
            v1 *= l0[i - 1]
        d = a0[i] - v1 * v1 - v2 * v2
        if not d > 0.0:
            return False
        l0[i] = 1.0 / np.sqrt(d)  # the reciprocal of L[i, i]: one division per row
        l1[i] = v1
        l2[i] = v2
        acc = b[i]
        if i >= 1:
            acc -= v1 * z[i - 1]
        if i >= 2:
            acc -= v2 * z[i - 2]
        z[i] = acc * l0[i]
    for i in range(n - 1, -1, -1):  # back substitution (L^T z = y)
        acc = z[i]
        if i + 1 < n:
            acc -= l1[i + 1] * z[i + 1]
        if i + 2 < n:
            acc -= l2[i + 2] * z[i + 2]
        z[i] = acc * l0[i]
    return True


@njit(cache=True, nogil=True)
def als_leads(x: np.ndarray, g0: np.ndarray, g1: np.ndarray, g2: np.ndarray, lam: float, p: float,
              n_iter: int, base: np.ndarray, ok_lead: np.ndarray) -> None:
    """ALS baselines of (L, T) float64 `x` (NaN = no weight) into `base` (L, T); ok_lead[l] False where lead
    l's system was not positive definite.

    g0, g1, g2 (T,): D2^T D2's diagonal, first and second sub-diagonal (g1[i] = G[i, i-1], g2[i] = G[i, i-2]).
    """
    n_leads, n = x.shape
    a0 = np.empty(n)
    a1 = lam * g1
    a2 = lam * g2
    y = np.empty(n)
    w = np.empty(n)
    rhs = np.empty(n)
    l0 = np.empty(n)
    l1 = np.empty(n)
    l2 = np.empty(n)
    z = np.empty(n)
    ok = np.empty(n, dtype=np.bool_)
    for lead in range(n_leads):
        ok_lead[lead] = True
        for i in range(n):
            v = x[lead, i]
            ok[i] = np.isfinite(v)
            y[i] = v if ok[i] else 0.0
            w[i] = 1.0 if ok[i] else 0.0
        for i in range(n):
            base[lead, i] = 0.0  # n_iter = 0: no baseline
        for _ in range(n_iter):
            for i in range(n):
                a0[i] = lam * g0[i] + w[i]
                rhs[i] = w[i] * y[i]
            if not _solve_penta(a0, a1, a2, rhs, l0, l1, l2, z):
                ok_lead[lead] = False
                break
            for i in range(n):
                base[lead, i] = z[i]
                if ok[i]:
                    w[i] = p if y[i] > z[i] else 1.0 - p
