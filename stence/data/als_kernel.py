"""Compiled ALS baseline fit of all leads of a record at once (numba): the hot loop of ingest.

The system of each reweighting step, (diag(w) + lam * D2^T D2) z = w * y, is symmetric, positive definite and
pentadiagonal; it is solved by a banded Cholesky factorisation L L^T (L lower with two sub-diagonals) in one
pass down and one pass up, O(T) per lead and step, with no Python or LAPACK call per solve. The leads are
interleaved in the inner loop: the row recurrence of one lead is a chain of dependent divisions and square
roots, and twelve independent chains keep the processor busy while each waits. A pivot that is not positive
(the matrix is numerically not positive definite) marks its lead as failed; the caller refits that lead with
the LAPACK path.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def als_leads(xt: np.ndarray, g0: np.ndarray, g1: np.ndarray, g2: np.ndarray, lam: float, p: float,
              n_iter: int, base: np.ndarray, ok_lead: np.ndarray) -> None:
    """ALS baselines of (T, L) float64 `xt` (time-major; NaN = no weight) into `base` (T, L); ok_lead (L,)
    False where a lead's system was not positive definite (its column of `base` is then meaningless).

    g0, g1, g2 (T,): D2^T D2's diagonal, first and second sub-diagonal (g1[i] = G[i, i-1], g2[i] = G[i, i-2]).
    """
    n, n_leads = xt.shape
    y = np.empty((n, n_leads))
    w = np.empty((n, n_leads))
    ok = np.empty((n, n_leads), dtype=np.bool_)
    r0 = np.empty((n, n_leads))  # 1 / L[i, i]
    l1 = np.empty((n, n_leads))  # L[i, i-1]
    l2 = np.empty((n, n_leads))  # L[i, i-2]
    z = np.empty((n, n_leads))
    for lead in range(n_leads):
        ok_lead[lead] = True
    for i in range(n):
        for lead in range(n_leads):
            v = xt[i, lead]
            f = np.isfinite(v)
            ok[i, lead] = f
            y[i, lead] = v if f else 0.0
            w[i, lead] = 1.0 if f else 0.0
            base[i, lead] = 0.0  # n_iter = 0: no baseline
    for _ in range(n_iter):
        for i in range(n):  # factor and forward substitution (L u = w y, u kept in z)
            a0, a1, a2 = lam * g0[i], lam * g1[i], lam * g2[i]
            for lead in range(n_leads):
                v2 = 0.0
                v1 = 0.0
                if i >= 2:
                    v2 = a2 * r0[i - 2, lead]
                if i >= 1:
                    v1 = a1
                    if i >= 2:
                        v1 -= v2 * l1[i - 1, lead]
                    v1 *= r0[i - 1, lead]
                d = a0 + w[i, lead] - v1 * v1 - v2 * v2
                if not d > 0.0:
                    ok_lead[lead] = False
                    d = 1.0  # keeps the other leads' arithmetic clean; this lead is refitted by the caller
                r = 1.0 / np.sqrt(d)
                r0[i, lead] = r
                l1[i, lead] = v1
                l2[i, lead] = v2
                acc = w[i, lead] * y[i, lead]
                if i >= 1:
                    acc -= v1 * z[i - 1, lead]
                if i >= 2:
                    acc -= v2 * z[i - 2, lead]
                z[i, lead] = acc * r
        for i in range(n - 1, -1, -1):  # back substitution (L^T z = u)
            for lead in range(n_leads):
                acc = z[i, lead]
                if i + 1 < n:
                    acc -= l1[i + 1, lead] * z[i + 1, lead]
                if i + 2 < n:
                    acc -= l2[i + 2, lead] * z[i + 2, lead]
                z[i, lead] = acc * r0[i, lead]
        for i in range(n):  # reweight: p above the fit, 1 - p below; missing samples keep weight 0
            for lead in range(n_leads):
                base[i, lead] = z[i, lead]
                if ok[i, lead]:
                    w[i, lead] = p if y[i, lead] > z[i, lead] else 1.0 - p
