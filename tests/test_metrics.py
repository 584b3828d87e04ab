"""Properties of the evaluation metrics: sklearn parity, honest CIs, DeLong, per-task columns, subgroups."""

from __future__ import annotations

import time

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from stence.eval.metrics import (
    UndefinedMetricWarning,
    _level_metrics,
    _unit_level_matrix,
    age_band,
    auprc,
    auroc,
    bootstrap_ci,
    delong_ci,
    delong_test,
    knn_auroc,
    multilabel_metrics,
    paired_bootstrap_diff,
    subgroup_metrics,
)


def _data(n: int, seed: int = 0, effect: float = 1.0, prevalence: float = 0.4, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(np.int64)
    p = rng.normal(size=n) + effect * y
    if decimals is not None:  # coarse scores create ties
        p = np.round(p, decimals)
    return y, p


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 0)])
def test_auroc_auprc_equal_sklearn(seed: int, decimals: int | None) -> None:
    y, p = _data(500, seed, decimals=decimals)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auprc(y, p) == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_auprc_perfect_and_random() -> None:
    y, _ = _data(20000, 3, prevalence=0.2)
    assert auprc(y, y + 0.1 * np.random.default_rng(0).random(y.size)) == pytest.approx(1.0)
    random_ap = auprc(y, np.random.default_rng(1).random(y.size))
    assert random_ap == pytest.approx(y.mean(), abs=0.02)


def test_missing_class_is_nan_with_reason() -> None:
    y = np.zeros(50)
    p = np.random.default_rng(0).random(50)
    for fn in (auroc, auprc):
        with pytest.warns(UndefinedMetricWarning, match="one class"):
            assert np.isnan(fn(y, p))
    with pytest.warns(UndefinedMetricWarning):
        d = bootstrap_ci(y, p, n_boot=50)
    assert (
        np.isnan(d["auroc"])
        and np.isnan(d["auprc_hi"])
        and d["n_boot_valid"] == 0
        and "one class" in d["note"]
    )


def test_nan_labels_are_dropped_nan_scores_rejected() -> None:
    y, p = _data(200, 4)
    y_nan = y.astype(float)
    y_nan[:30] = np.nan
    assert auroc(y_nan, p) == pytest.approx(roc_auc_score(y[30:], p[30:]))
    assert bootstrap_ci(y_nan, p, n_boot=20)["n"] == 170
    p_bad = p.copy()
    p_bad[40] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        auroc(y, p_bad)


def test_vectorised_resample_metrics_equal_sklearn_on_that_resample() -> None:
    """The fast weighted path (used by the bootstrap) equals sklearn on explicitly resampled rows."""
    y, p = _data(300, 5, decimals=1)
    unit_levels = _unit_level_matrix(y, p, np.arange(y.size), y.size)
    n_levels = unit_levels.shape[1] // 2
    rng = np.random.default_rng(0)
    for _ in range(5):
        idx = rng.integers(0, y.size, y.size)
        counts = np.bincount(idx, minlength=y.size).astype(float)[None, :]  # (1, U)
        lv = np.asarray((unit_levels.T @ counts.T).T)
        auc, ap = _level_metrics(lv[:, n_levels:], lv[:, :n_levels])
        assert auc[0] == pytest.approx(roc_auc_score(y[idx], p[idx]), abs=1e-12)
        assert ap[0] == pytest.approx(average_precision_score(y[idx], p[idx]), abs=1e-12)


def test_bootstrap_ci_contains_point_narrows_and_is_deterministic() -> None:
    small = bootstrap_ci(*_data(200, 6), n_boot=500, seed=0)
    large = bootstrap_ci(*_data(2000, 6), n_boot=500, seed=0)
    for d in (small, large):
        for m in ("auroc", "auprc"):
            assert d[f"{m}_lo"] <= d[m] <= d[f"{m}_hi"]
        assert d["n_boot_valid"] == 500 and d["note"] == ""
    assert (large["auroc_hi"] - large["auroc_lo"]) < 0.5 * (small["auroc_hi"] - small["auroc_lo"])
    y, p = _data(300, 7)
    assert bootstrap_ci(y, p, seed=3, n_boot=200) == bootstrap_ci(y, p, seed=3, n_boot=200)
    assert (
        bootstrap_ci(y, p, seed=3, n_boot=200)["auroc_lo"]
        != bootstrap_ci(y, p, seed=4, n_boot=200)["auroc_lo"]
    )


def test_patient_resampling_is_not_fooled_by_duplicated_rows() -> None:
    y, p = _data(400, 8)
    patients = np.arange(y.size)
    k = 5
    y_k, p_k, g_k = np.tile(y, k), np.tile(p, k), np.tile(patients, k)  # every ECG seen k times

    def width(d: dict) -> float:
        return d["auroc_hi"] - d["auroc_lo"]

    base = width(bootstrap_ci(y, p, groups=patients, n_boot=1000, seed=1))
    by_patient = bootstrap_ci(y_k, p_k, groups=g_k, n_boot=1000, seed=1)
    by_row = bootstrap_ci(y_k, p_k, n_boot=1000, seed=1)
    assert by_patient["n"] == k * y.size and by_patient["n_units"] == y.size
    assert 0.8 < width(by_patient) / base < 1.25
    assert width(by_row) / base < 0.6  # ~1/sqrt(5): the overconfident answer patient resampling avoids


def test_resamples_lacking_a_class_are_skipped_and_counted() -> None:
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])
    p = np.linspace(0, 1, 8)
    d = bootstrap_ci(y, p, n_boot=300, seed=0)
    assert 0 < d["n_boot_valid"] < 300  # P(no positive drawn) = (7/8)^8 ~ 0.34
    assert "skipped" in d["note"]


def test_bootstrap_is_fast() -> None:
    y, p = _data(2000, 9)
    g = np.random.default_rng(0).integers(0, 800, y.size)
    t0 = time.perf_counter()
    bootstrap_ci(y, p, n_boot=1000)
    bootstrap_ci(y, p, groups=g, n_boot=1000)
    assert time.perf_counter() - t0 < 2.0


def _slow_delong_var(y: np.ndarray, p: np.ndarray) -> float:
    """Textbook DeLong (1988) with explicit O(m*n) placement values: the reference for the fast version."""
    pos, neg = p[y == 1], p[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])  # (m, n)
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size


def test_delong_variance_matches_reference_and_bootstrap() -> None:
    y, p = _data(400, 10, decimals=1)
    d = delong_ci(y, p)
    assert d["auroc"] == pytest.approx(roc_auc_score(y, p))
    assert d["var"] == pytest.approx(_slow_delong_var(y, p), rel=1e-9)
    rng = np.random.default_rng(0)  # independent bootstrap with sklearn on explicit resamples
    boots = [roc_auc_score(y[i], p[i]) for i in (rng.integers(0, y.size, y.size) for _ in range(1000))]
    assert d["var"] == pytest.approx(np.var(boots), rel=0.2)
    assert d["auroc_lo"] < d["auroc"] < d["auroc_hi"]


def test_delong_test_identical_different_and_symmetric() -> None:
    y, p = _data(600, 11)
    same = delong_test(y, p, p)
    assert same["diff"] == 0 and same["z"] == 0 and same["p_value"] == 1.0
    noise = p + 3.0 * np.random.default_rng(1).normal(size=p.size)  # a much weaker model
    ab, ba = delong_test(y, p, noise), delong_test(y, noise, p)
    assert ab["z"] > 4 and ab["p_value"] < 1e-4
    assert ba["z"] == pytest.approx(-ab["z"]) and ba["p_value"] == pytest.approx(ab["p_value"])
    assert ab["auc1"] == pytest.approx(roc_auc_score(y, p)) and ab["diff"] == pytest.approx(-ba["diff"])
    var_diff = _slow_delong_var(y, p) + _slow_delong_var(y, noise)  # upper part of the paired variance
    assert 0 < ab["var"] < var_diff  # positive correlation between the paired AUCs shrinks the variance


def test_paired_bootstrap_agrees_with_explicit_resamples_and_with_delong_on_independent_rows() -> None:
    y, p = _data(300, 14)
    weak = p + 1.5 * np.random.default_rng(2).normal(size=p.size)
    out = paired_bootstrap_diff(y, p, weak, n_boot=1000, seed=3)
    assert out["diff"] == pytest.approx(roc_auc_score(y, p) - roc_auc_score(y, weak))
    assert out["n_units"] == 300 and out["n_boot_valid"] == 1000
    # the same resamples drawn explicitly (the same generator calls), scored with sklearn
    rng = np.random.default_rng(3)
    draw = rng.integers(0, 300, size=(1000, 300))
    ref = [roc_auc_score(y[i], p[i]) - roc_auc_score(y[i], weak[i]) for i in draw]
    assert (out["diff_lo"], out["diff_hi"]) == pytest.approx(tuple(np.quantile(ref, [0.025, 0.975])), abs=1e-9)
    # rows independent: the bootstrap interval matches DeLong's normal interval of the difference
    d = delong_test(y, p, weak)
    half = 1.96 * np.sqrt(d["var"])
    assert out["diff_lo"] == pytest.approx(d["diff"] - half, abs=0.03)
    assert out["diff_hi"] == pytest.approx(d["diff"] + half, abs=0.03)
    same = paired_bootstrap_diff(y, p, p, n_boot=200)
    assert same["diff"] == 0 and same["diff_lo"] == same["diff_hi"] == 0 and same["p_value"] == 1.0


def test_patient_bootstrap_is_not_fooled_by_several_ecgs_per_patient() -> None:
    """Every patient's row copied three times (three ECGs that agree): DeLong, which takes rows as
    independent, turns a weak difference into a 'significant' one; the patient bootstrap does not."""
    y, p = _data(120, 15, effect=0.8)
    other = p + 1.0 * np.random.default_rng(4).normal(size=p.size)
    single = paired_bootstrap_diff(y, p, other, groups=np.arange(120), n_boot=2000, seed=0)
    y3, p3, o3, g3 = (np.repeat(a, 3) for a in (y, p, other, np.arange(120)))
    assert delong_test(y3, p3, o3)["p_value"] < delong_test(y, p, other)["p_value"] / 5
    tripled = paired_bootstrap_diff(y3, p3, o3, groups=g3, n_boot=2000, seed=0)
    assert tripled["n_units"] == 120 and tripled["diff"] == pytest.approx(single["diff"])
    assert tripled["p_value"] == pytest.approx(single["p_value"], abs=0.02)
    rows = paired_bootstrap_diff(y3, p3, o3, n_boot=2000, seed=0)  # ignoring patients: too narrow
    assert rows["diff_hi"] - rows["diff_lo"] < 0.7 * (tripled["diff_hi"] - tripled["diff_lo"])


def test_multilabel_scores_each_task_against_its_own_column() -> None:
    rng = np.random.default_rng(12)
    n = 600
    Y = (rng.random((n, 3)) < 0.4).astype(float)
    P = rng.random((n, 3))
    P[:, 2] = Y[:, 2] + 0.5 * rng.random(n)  # column 2 predicts task 2 perfectly
    Y[:50, 2] = np.nan  # task 2 unlabelled on some rows
    res = multilabel_metrics(Y, P, ["t0", "t1", "t2"], n_boot=100)
    assert res["t2"]["auroc"] == pytest.approx(1.0) and res["t2"]["n"] == n - 50
    assert abs(res["t0"]["auroc"] - 0.5) < 0.08
    # column 0 scored against task 2's labels would be chance: the implementation must not do that
    assert abs(auroc(Y[:, 2], P[:, 0]) - 0.5) < 0.08


def test_subgroup_counts_add_up_and_age_bands() -> None:
    rng = np.random.default_rng(13)
    n = 500
    y, p = _data(n, 113)  # own seed: sharing the ages stream would tie age to label
    y = y.astype(float)
    y[:20] = np.nan
    ages = rng.uniform(30, 95, n)
    ages[rng.random(n) < 0.05] = np.nan
    sex = rng.choice(np.array(["F", "M", None], dtype=object), n, p=[0.45, 0.5, 0.05])
    res = subgroup_metrics(y, p, {"sex": sex, "age_band": age_band(ages)}, n_boot=50)
    for levels in res.values():
        assert sum(d["n"] for d in levels.values()) == n - 20
        assert sum(d["n_pos"] for d in levels.values()) == int(np.nansum(y))
    assert set(res["sex"]) == {"F", "M", "unknown"}
    bands = age_band(np.array([49.9, 50, 64.9, 65, 79.9, 80, np.nan]))
    assert bands.tolist() == ["<50", "50-64", "50-64", "65-79", "65-79", ">=80", "unknown"]


def test_knn_auroc_separable_random_and_one_class() -> None:
    rng = np.random.default_rng(14)

    def clusters(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        centre = np.where(y[:, None] == 1, 1.0, -1.0) * np.ones((n, 16))
        return centre + 0.3 * rng.normal(size=(n, 16)), y

    assert knn_auroc(*clusters(200), *clusters(200)) > 0.99
    rand = knn_auroc(
        rng.normal(size=(500, 16)),
        rng.integers(0, 2, 500),
        rng.normal(size=(1000, 16)),
        rng.integers(0, 2, 1000),
        k=15,
    )
    assert abs(rand - 0.5) < 0.06
    with pytest.warns(UndefinedMetricWarning, match="training"):
        assert np.isnan(
            knn_auroc(
                rng.normal(size=(20, 4)), np.zeros(20), rng.normal(size=(10, 4)), rng.integers(0, 2, 10)
            )
        )
