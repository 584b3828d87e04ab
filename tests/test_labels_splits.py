"""Targets, threshold tasks and patient splits."""

import numpy as np
import pandas as pd
import pytest

from stence.data.labels import TARGET_NAMES, parse_task, targets_from_segments, threshold_labels
from stence.data.splits import check_no_leakage, stratified_patient_split


def test_targets_follow_the_method():
    t = dict(zip(TARGET_NAMES, targets_from_segments({2: 75, 4: 99, 11: 69.9}), strict=True))
    assert t["patient"] == 1 and t["rca"] == 1 and t["lca"] == 0 and t["seg2"] == 1 and t["seg11"] == 0
    # segment 4 is RCA but not major: it does not count for patient or RCA
    t = dict(zip(TARGET_NAMES, targets_from_segments({4: 100, 12: 90}), strict=True))
    assert sum(t.values()) == 0
    t = dict(zip(TARGET_NAMES, targets_from_segments({13: 70}), strict=True))
    assert t["patient"] == t["lca"] == t["seg13"] == 1 and t["rca"] == 0


@pytest.mark.parametrize(
    "task,neg,pos,dropped",
    [("0_100", [0], [100], [1, 50, 99]), ("0_90", [0], [90, 99, 100], [1, 89]),
     ("lt70_ge70", [0, 50, 69], [70, 100], []), ("le50_ge99", [0, 50], [99, 100], [51, 98])],
)
def test_threshold_tasks(task, neg, pos, dropped):
    vals = np.array(neg + pos + dropped, dtype=float)
    keep, y = threshold_labels(vals, task)
    assert keep.sum() == len(neg) + len(pos)
    assert list(y) == [0] * len(neg) + [1] * len(pos)


def test_custom_and_unknown_tasks():
    assert parse_task("30_80") == (30.0, 80.0)
    with pytest.raises(ValueError, match="unknown task"):
        parse_task("severe")


def test_split_is_by_patient_stratified_and_seeded():
    rng = np.random.default_rng(0)
    levels = np.array([0, 50, 70, 90, 99, 100])
    pm = pd.Series(rng.choice(levels, 300), index=[f"P{i}" for i in range(300)])
    s1 = stratified_patient_split(pm, (0.6, 0.2, 0.2), seed=1)
    assert s1 == stratified_patient_split(pm, (0.6, 0.2, 0.2), seed=1)
    assert s1 != stratified_patient_split(pm, (0.6, 0.2, 0.2), seed=2)
    df = pd.DataFrame({"patient": list(s1), "split": list(s1.values())})
    frac = df["split"].value_counts(normalize=True)
    assert abs(frac["train"] - 0.6) < 0.02 and abs(frac["test"] - 0.2) < 0.02
    for level in levels:  # every stratum lands in every split
        assert {s1[p] for p in pm.index[pm == level]} == {"train", "val", "test"}
    leaky = pd.DataFrame({"patient": ["a", "a"], "split": ["train", "test"]})
    with pytest.raises(AssertionError):
        check_no_leakage(leaky)
