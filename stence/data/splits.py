"""Patient-level splits: seeded, stratified on the maximum stenosis degree, checked for leakage."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
# strata of the patient maximum degree: every threshold task sees both classes in every split
STRATA_EDGES = (0.5, 50, 70, 90, 99, 99.5)


def stratified_patient_split(
    patient_max: pd.Series, fractions: tuple[float, float, float], seed: int
) -> dict[str, str]:
    """patient -> split. Patients are shuffled within strata, then dealt to the split furthest below its
    share (deficit round-robin), so every stratum is spread over the splits in the given proportions."""
    frac = np.asarray(fractions, dtype=float)
    if frac.shape != (3,) or (frac < 0).any() or frac.sum() <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions}")
    frac = frac / frac.sum()
    rng = np.random.default_rng(seed)
    patients = np.asarray(sorted(patient_max.index))
    strata = np.digitize(patient_max.loc[patients].to_numpy(dtype=float), STRATA_EDGES)
    order = np.lexsort((rng.permutation(len(patients)), strata))
    counts = np.zeros(3)
    out: dict[str, str] = {}
    for i, idx in enumerate(order):
        k = int(np.argmax(frac * (i + 1) - counts))
        counts[k] += 1
        out[str(patients[idx])] = SPLITS[k]
    return out


def check_no_leakage(manifest: pd.DataFrame) -> None:
    """Raise if any patient appears in more than one split."""
    n = manifest.groupby("patient")["split"].nunique()
    leaked = n[n > 1]
    if len(leaked):
        raise AssertionError(f"{len(leaked)} patient(s) appear in several splits, e.g. {list(leaked.index[:3])}")
