"""Honest binary-task metrics: AUROC / AUPRC with patient-level bootstrap CIs, paired DeLong, subgroups.

Every metric is computed per task on that task's own label column (the public code used one column for
every task). A metric that is undefined (one class only) is NaN with a warning saying why, never 0.5.
The bootstrap resamples patients when patient pseudonyms are given: several ECGs of one patient are one
unit, so duplicated or correlated rows do not fake a narrow interval.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import sparse
from scipy.stats import norm, rankdata
from sklearn import config_context
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

METRICS = ("auroc", "auprc")
KNN_WORKING_MB = 64  # scikit-learn's distance chunks in the kNN probe (its default, 1 GiB, grew peak memory with N)
_MAX_CELLS = 4_000_000  # resample-count matrix cells per chunk (B x units), ~32 MB of float64


class UndefinedMetricWarning(RuntimeWarning):
    """A metric is NaN because it is undefined on the given data (e.g. only one class present)."""


def _undefined(reason: str) -> float:
    warnings.warn(reason, UndefinedMetricWarning, stacklevel=3)
    return float("nan")


def _clean(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Drop rows with a NaN label; reject NaN scores (a model emitting NaN is a bug, not missing data)."""
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    if y.shape != p.shape:
        raise ValueError(f"labels and scores differ in length: {y.shape[0]} vs {p.shape[0]}")
    keep = ~np.isnan(y)
    if not np.isfinite(p[keep]).all():
        raise ValueError("scores contain NaN or inf on labelled rows")
    bad = ~np.isin(y[keep], (0.0, 1.0))
    if bad.any():
        raise ValueError(f"labels must be 0/1 (or NaN for missing); got {np.unique(y[keep][bad])[:5]}")
    return y[keep].astype(np.int64), p[keep], keep


def _clean_pair(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> tuple[np.ndarray, ...]:
    """`_clean` for two models' scores of the same rows: (y, p1, p2, keep), p2 checked like p1."""
    y, p1, keep = _clean(y, p1)
    p2 = np.asarray(p2, dtype=np.float64).ravel()
    if p2.shape != keep.shape:
        raise ValueError(f"p2 has {p2.shape[0]} entries for {keep.shape[0]} rows")
    p2 = p2[keep]
    if not np.isfinite(p2).all():
        raise ValueError("p2 contains NaN or inf on labelled rows")
    return y, p1, p2, keep


def _one_class_reason(y: np.ndarray) -> str | None:
    n_pos = int(y.sum())
    if y.size == 0:
        return "no labelled rows"
    if n_pos == 0 or n_pos == y.size:
        return f"only one class present (n={y.size}, n_pos={n_pos})"
    return None


def auroc(y: np.ndarray, p: np.ndarray) -> float:
    """Area under the ROC curve (sklearn); NaN with an UndefinedMetricWarning when a class is missing."""
    y, p, _ = _clean(y, p)
    reason = _one_class_reason(y)
    if reason:
        return _undefined(f"AUROC undefined: {reason}")
    return float(roc_auc_score(y, p))


def auprc(y: np.ndarray, p: np.ndarray) -> float:
    """Positive-class average precision (sklearn); NaN with an UndefinedMetricWarning when a class is missing."""
    y, p, _ = _clean(y, p)
    reason = _one_class_reason(y)
    if reason:
        return _undefined(f"AUPRC undefined: {reason}")
    return float(average_precision_score(y, p, pos_label=1))


# --- vectorised weighted metrics over score levels --------------------------------------------------


def _level_metrics(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted AUROC and AP from per-level class weights, levels in ascending score order.

    pos, neg: (B, L) weights of positives / negatives at each distinct score. Ties count one half in
    AUROC; AP is sklearn's step sum over distinct thresholds. Returns (B,) AUROC and (B,) AP.
    """
    n_pos = pos.sum(axis=1)  # (B,)
    n_neg = neg.sum(axis=1)
    neg_below = np.cumsum(neg, axis=1) - neg  # (B, L) negatives strictly below each level
    auc = (pos * (neg_below + 0.5 * neg)).sum(axis=1) / (n_pos * n_neg)
    pos_d, neg_d = pos[:, ::-1], neg[:, ::-1]  # descending thresholds
    tp = np.cumsum(pos_d, axis=1)
    called = tp + np.cumsum(neg_d, axis=1)
    precision = np.divide(tp, called, out=np.zeros_like(tp), where=called > 0)
    ap = (pos_d * precision).sum(axis=1) / n_pos  # recall step at a level = its positive weight / n_pos
    return auc, ap


def _unit_level_matrix(y: np.ndarray, p: np.ndarray, unit: np.ndarray, n_units: int) -> sparse.csr_matrix:
    """(U, 2L) sparse counts: for each resampling unit, its rows per (score level, class)."""
    _, level = np.unique(p, return_inverse=True)
    n_levels = int(level.max()) + 1
    col = level + n_levels * y  # negatives in [0, L), positives in [L, 2L)
    m = sparse.coo_matrix((np.ones(y.size), (unit, col)), shape=(n_units, 2 * n_levels))
    return m.tocsr()


def _resample_counts(n_units: int, n_boot: int, rng: np.random.Generator):
    """Yield (b, U) float counts of how often each unit is drawn, n_boot resamples in all, in chunks."""
    chunk = max(1, min(n_boot, _MAX_CELLS // max(n_units, 1)))
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        draw = rng.integers(0, n_units, size=(b, n_units))  # (b, U) sampled unit ids
        flat = (draw + n_units * np.arange(b)[:, None]).ravel()
        yield np.bincount(flat, minlength=b * n_units).reshape(b, n_units).astype(np.float64)


def _resampled_levels(unit_levels: sparse.csr_matrix, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(U, 2L) unit counts per (level, class) and (b, U) draw counts -> (b, L) negatives, (b, L) positives."""
    n_levels = unit_levels.shape[1] // 2
    lv = np.asarray((unit_levels.T @ counts.T).T)  # (b, 2L) resampled rows per (level, class)
    return lv[:, :n_levels], lv[:, n_levels:]


def _skipped_note(n_valid: int, n_boot: int) -> str:
    """Why some (or all) bootstrap resamples were not scored; empty when all were."""
    if n_valid == 0:
        return "no bootstrap resample contained both classes"
    return f"{n_boot - n_valid} of {n_boot} resamples lacked a class and were skipped" if n_valid < n_boot else ""


def _units(groups: np.ndarray | None, keep: np.ndarray, n_rows: int) -> np.ndarray:
    """(N,) resampling unit per kept row: the patient when groups are given, else the row itself."""
    if groups is None:
        return np.arange(n_rows)
    g = np.asarray(groups).ravel()
    if g.shape[0] != keep.shape[0]:
        raise ValueError(f"groups has {g.shape[0]} entries for {keep.shape[0]} rows")
    return np.unique(g[keep], return_inverse=True)[1]


def bootstrap_ci(
    y: np.ndarray,
    p: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    metrics: Sequence[str] = METRICS,
) -> dict:
    """Point estimates and percentile bootstrap CIs of AUROC / AUPRC.

    With `groups` (patient pseudonyms, one per row) whole patients are resampled; otherwise rows.
    Resamples lacking a class are skipped and `n_boot_valid` counts the rest. Rows with a NaN label
    are dropped first. Keys: metric, metric_lo, metric_hi per metric, n, n_pos, n_units (patients or
    rows), n_boot_valid, note (why a value is NaN; empty when all is well).
    """
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; valid: {list(METRICS)}")
    y, p, keep = _clean(y, p)
    unit = _units(groups, keep, y.size)
    n_units = int(unit.max()) + 1 if y.size else 0
    out: dict = {"n": int(y.size), "n_pos": int(y.sum()), "n_units": n_units, "n_boot_valid": 0, "note": ""}
    nan = float("nan")
    for m in metrics:
        out[m], out[f"{m}_lo"], out[f"{m}_hi"] = nan, nan, nan
    reason = _one_class_reason(y)
    if reason:
        out["note"] = reason
        warnings.warn(f"bootstrap metrics undefined: {reason}", UndefinedMetricWarning, stacklevel=2)
        return out
    point = {"auroc": roc_auc_score, "auprc": average_precision_score}
    for m in metrics:
        out[m] = float(point[m](y, p))

    unit_levels = _unit_level_matrix(y, p, unit, n_units)  # (U, 2L)
    aucs, aps = [], []
    for counts in _resample_counts(n_units, n_boot, np.random.default_rng(seed)):
        neg, pos = _resampled_levels(unit_levels, counts)
        ok = (pos.sum(axis=1) > 0) & (neg.sum(axis=1) > 0)
        auc, ap = _level_metrics(pos[ok], neg[ok])
        aucs.append(auc)
        aps.append(ap)
    boot = {"auroc": np.concatenate(aucs), "auprc": np.concatenate(aps)}
    out["n_boot_valid"] = int(boot["auroc"].size)
    out["note"] = _skipped_note(out["n_boot_valid"], n_boot)
    if out["n_boot_valid"] == 0:
        return out
    for m in metrics:
        lo, hi = np.quantile(boot[m], [alpha / 2, 1 - alpha / 2])
        out[f"{m}_lo"], out[f"{m}_hi"] = float(lo), float(hi)
    return out


def paired_bootstrap_diff(
    y: np.ndarray,
    p1: np.ndarray,
    p2: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict:
    """AUROC(p1) - AUROC(p2) on the same rows, with a paired bootstrap that resamples whole patients.

    Both models are scored on the same resamples, so their correlation is kept. Unlike DeLong's test, it
    does not assume the rows are independent: a patient's ECGs go in and out together. Keys: diff, diff_lo,
    diff_hi (percentile CI), p_value (two-sided: twice the smaller share of resampled differences on
    either side of 0, at most 1; the smallest level whose CI would exclude 0), n, n_pos, n_units,
    n_boot_valid, note.
    """
    y, p1, p2, keep = _clean_pair(y, p1, p2)
    unit = _units(groups, keep, y.size)
    n_units = int(unit.max()) + 1 if y.size else 0
    nan = float("nan")
    out: dict = {"n": int(y.size), "n_pos": int(y.sum()), "n_units": n_units, "n_boot_valid": 0, "note": "",
                 "diff": nan, "diff_lo": nan, "diff_hi": nan, "p_value": nan}
    reason = _one_class_reason(y)
    if reason:
        out["note"] = reason
        warnings.warn(f"paired bootstrap undefined: {reason}", UndefinedMetricWarning, stacklevel=2)
        return out
    out["diff"] = float(roc_auc_score(y, p1) - roc_auc_score(y, p2))
    levels = [_unit_level_matrix(y, p, unit, n_units) for p in (p1, p2)]  # 2 x (U, 2L_k)
    diffs = []
    for counts in _resample_counts(n_units, n_boot, np.random.default_rng(seed)):
        (neg1, pos1), (neg2, pos2) = (_resampled_levels(lv, counts) for lv in levels)
        ok = (pos1.sum(axis=1) > 0) & (neg1.sum(axis=1) > 0)  # class counts are the same for both models
        diffs.append(_level_metrics(pos1[ok], neg1[ok])[0] - _level_metrics(pos2[ok], neg2[ok])[0])
    d = np.concatenate(diffs)  # (valid resamples,)
    out["n_boot_valid"] = int(d.size)
    out["note"] = _skipped_note(d.size, n_boot)
    if d.size == 0:
        return out
    lo, hi = np.quantile(d, [alpha / 2, 1 - alpha / 2])
    out["diff_lo"], out["diff_hi"] = float(lo), float(hi)
    out["p_value"] = float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0))))  # all-zero d gives 1
    return out


# --- DeLong ------------------------------------------------------------------------------------------


def _delong_components(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fast DeLong (Sun & Xu 2014) via midranks. scores: (K, N). Returns (K,) AUCs and (K, K) covariance."""
    pos, neg = scores[:, y == 1], scores[:, y == 0]  # (K, m), (K, n)
    m, n = pos.shape[1], neg.shape[1]
    tx = rankdata(pos, axis=1)  # midranks within positives
    ty = rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks over all rows
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:, :m] - tx) / n  # (K, m) structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # (K, n) of the negatives
    sx = np.atleast_2d(np.cov(v01)) if m > 1 else np.zeros((scores.shape[0],) * 2)
    sy = np.atleast_2d(np.cov(v10)) if n > 1 else np.zeros((scores.shape[0],) * 2)
    return aucs, sx / m + sy / n


def delong_test(y: np.ndarray, p1: np.ndarray, p2: np.ndarray) -> dict:
    """Paired DeLong test of AUROC(p1) vs AUROC(p2) on the same rows (rows assumed independent).

    Returns auc1, auc2, diff (auc1 - auc2), z, two-sided p_value, var (variance of the difference),
    n, n_pos. Identical scores give diff 0, z 0, p 1. A missing class gives NaN with a warning.
    """
    y, p1, p2, _ = _clean_pair(y, p1, p2)
    out = {"n": int(y.size), "n_pos": int(y.sum())}
    reason = _one_class_reason(y)
    if reason:
        nan = _undefined(f"DeLong test undefined: {reason}")
        return {**out, "auc1": nan, "auc2": nan, "diff": nan, "z": nan, "p_value": nan, "var": nan}
    aucs, cov = _delong_components(y, np.stack([p1, p2]))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # identical rankings: no difference to test
        z, p_value = 0.0, 1.0
    else:
        z = diff / np.sqrt(var)
        p_value = float(2 * norm.sf(abs(z)))
    return {
        **out,
        "auc1": float(aucs[0]),
        "auc2": float(aucs[1]),
        "diff": diff,
        "z": float(z),
        "p_value": p_value,
        "var": max(var, 0.0),
    }


def delong_ci(y: np.ndarray, p: np.ndarray, alpha: float = 0.05) -> dict:
    """AUROC with its DeLong variance and normal-approximation CI (clipped to [0, 1])."""
    y, p, _ = _clean(y, p)
    reason = _one_class_reason(y)
    if reason:
        nan = _undefined(f"DeLong CI undefined: {reason}")
        return {"auroc": nan, "auroc_lo": nan, "auroc_hi": nan, "var": nan}
    aucs, cov = _delong_components(y, p[None, :])
    auc, var = float(aucs[0]), float(cov[0, 0])
    half = norm.ppf(1 - alpha / 2) * np.sqrt(max(var, 0.0))
    lo, hi = max(0.0, auc - float(half)), min(1.0, auc + float(half))
    return {"auroc": auc, "auroc_lo": lo, "auroc_hi": hi, "var": var}


# --- per task, per subgroup, kNN probe ---------------------------------------------------------------


def multilabel_metrics(
    Y: np.ndarray, P: np.ndarray, names: Sequence[str], groups: np.ndarray | None = None, **kwargs
) -> dict[str, dict]:
    """Bootstrap metrics per task: column k of P is scored against column k of Y only.

    Y, P: (N, K); rows with a NaN label in task k are skipped for that task. kwargs go to bootstrap_ci.
    """
    Y = np.asarray(Y, dtype=np.float64)
    P = np.asarray(P, dtype=np.float64)
    if Y.ndim != 2 or Y.shape != P.shape:
        raise ValueError(f"need matching (N, K) labels and scores, got {Y.shape} and {P.shape}")
    if len(names) != Y.shape[1]:
        raise ValueError(f"{len(names)} names for {Y.shape[1]} columns")
    g = None if groups is None else np.asarray(groups).ravel()
    return {name: bootstrap_ci(Y[:, k], P[:, k], groups=g, **kwargs) for k, name in enumerate(names)}


def _as_labels(values: np.ndarray) -> np.ndarray:
    """Subgroup values -> str labels; None / NaN become "unknown"."""
    out = []
    for v in np.asarray(values, dtype=object).ravel():
        missing = v is None or (isinstance(v, float | np.floating) and np.isnan(v))
        out.append("unknown" if missing else str(v))
    return np.asarray(out, dtype=object)


def subgroup_metrics(
    y: np.ndarray,
    p: np.ndarray,
    subgroups: Mapping[str, np.ndarray],
    groups: np.ndarray | None = None,
    **kwargs,
) -> dict[str, dict[str, dict]]:
    """Bootstrap metrics within each level of each subgroup variable, e.g. {"sex": ..., "age_band": ...}.

    Rows with a NaN label are dropped everywhere, so `n` over the levels of one variable adds up to
    the labelled total. Missing subgroup values form the level "unknown".
    """
    y = np.asarray(y, dtype=np.float64).ravel()
    p = np.asarray(p, dtype=np.float64).ravel()
    g = None if groups is None else np.asarray(groups).ravel()
    out: dict[str, dict[str, dict]] = {}
    for var, values in subgroups.items():
        labels = _as_labels(values)
        if labels.shape[0] != y.shape[0]:
            raise ValueError(f"subgroup {var!r} has {labels.shape[0]} values for {y.shape[0]} rows")
        out[var] = {}
        for level in sorted(set(labels.tolist())):
            m = labels == level
            out[var][level] = bootstrap_ci(y[m], p[m], groups=None if g is None else g[m], **kwargs)
    return out


def age_band(ages: np.ndarray) -> np.ndarray:
    """Ages in years -> bands "<50", "50-64", "65-79", ">=80"; NaN -> "unknown"."""
    a = np.asarray(ages, dtype=np.float64).ravel()
    out = np.full(a.shape, "unknown", dtype=object)
    ok = ~np.isnan(a)
    out[ok & (a < 50)] = "<50"
    out[ok & (a >= 50) & (a < 65)] = "50-64"
    out[ok & (a >= 65) & (a < 80)] = "65-79"
    out[ok & (a >= 80)] = ">=80"
    return out


def _l2(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _knn_probe(
    train_emb: np.ndarray, train_y: np.ndarray, val_emb: np.ndarray, val_y: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """(validation labels, P(class 1) = neighbour vote share) of a k-NN probe; None (with a warning) when
    the training or validation labels hold one class only."""
    ty = np.asarray(train_y).ravel().astype(np.int64)
    vy = np.asarray(val_y).ravel().astype(np.int64)
    reason = _one_class_reason(ty)
    if reason:
        _undefined(f"kNN AUROC undefined: training labels: {reason}")
        return None
    if _one_class_reason(vy):
        _undefined(f"kNN AUROC undefined: validation labels: {_one_class_reason(vy)}")
        return None
    clf = KNeighborsClassifier(n_neighbors=min(k, ty.size), metric="cosine", algorithm="brute")
    clf.fit(_l2(train_emb), ty)  # (N_train, D)
    with config_context(working_memory=KNN_WORKING_MB):  # (rows, N_train) distance blocks of <= 64 MiB
        proba = clf.predict_proba(_l2(val_emb))  # (N_val, n_classes)
    return vy, proba[:, list(clf.classes_).index(1)]  # (N_val,)


def knn_auroc(
    train_emb: np.ndarray, train_y: np.ndarray, val_emb: np.ndarray, val_y: np.ndarray, k: int = 5
) -> float:
    """AUROC of a k-NN probe (cosine on L2-normalised embeddings, P(class 1) = neighbour vote share).

    A cheap representation-quality signal during pretraining. NaN (with a warning) when the training
    or validation labels hold one class only.
    """
    probe = _knn_probe(train_emb, train_y, val_emb, val_y, k)
    return float("nan") if probe is None else float(roc_auc_score(*probe))


def knn_auroc_ci(
    train_emb: np.ndarray, train_y: np.ndarray, val_emb: np.ndarray, val_y: np.ndarray, k: int = 5,
    alpha: float = 0.05,
) -> dict[str, float]:
    """`knn_auroc` (the same value) with its DeLong (1 - alpha) interval: {"auroc", "auroc_lo", "auroc_hi"},
    all NaN when undefined."""
    probe = _knn_probe(train_emb, train_y, val_emb, val_y, k)
    if probe is None:
        return {"auroc": float("nan"), "auroc_lo": float("nan"), "auroc_hi": float("nan")}
    ci = delong_ci(*probe, alpha=alpha)
    return {"auroc": float(roc_auc_score(*probe)), "auroc_lo": ci["auroc_lo"], "auroc_hi": ci["auroc_hi"]}
