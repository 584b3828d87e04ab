"""`stence probe --compare`: merged table, Fig. 2, and paired tests (DeLong, patient bootstrap) on the same
test rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stence.cli import main
from stence.eval.compare import paired_delong
from stence.eval.metrics import bootstrap_ci, delong_test, paired_bootstrap_diff
from stence.eval.report import write_results


def _model(tmp: Path, name: str, y: np.ndarray, p: np.ndarray, index: np.ndarray,
           patients: np.ndarray | None = None) -> Path:
    d = tmp / name
    d.mkdir()
    np.savez(d / "test_predictions.npz", y=y[:, None], p=p[:, None], index=index,
             patients=patients if patients is not None else np.array([]))
    entry = {**bootstrap_ci(y, p, n_boot=50, seed=0), "predictions": str(d / "test_predictions.npz")}
    return write_results({name: {"0_100": entry}}, d)[0]


def test_compare_writes_a_paired_delong_test(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(120) < 0.4).astype(np.float64)
    good = y + rng.normal(0, 0.5, 120)  # informative
    noise = rng.normal(0, 1, 120)  # chance
    idx = np.arange(120)
    patients = np.array([f"P{i // 2:03d}" for i in range(120)])  # two ECGs per patient
    a = _model(tmp_path, "stence", y, good, idx, patients)
    b = _model(tmp_path, "baseline", y[::-1], noise[::-1], idx[::-1], patients[::-1])  # same rows, another order
    out = tmp_path / "cmp"
    assert main(["probe", "--compare", str(a), str(b), "--out", str(out)]) == 0
    rows = json.loads((out / "delong.json").read_text())
    assert len(rows) == 1 and rows[0]["model_a"] == "stence" and rows[0]["model_b"] == "baseline"
    expected = delong_test(y, good, noise)
    assert rows[0]["p_value"] == pytest.approx(expected["p_value"]) and rows[0]["p_value"] < 0.01
    assert rows[0]["diff"] == pytest.approx(expected["diff"]) and rows[0]["diff"] > 0
    # beside DeLong, the paired bootstrap over the 60 patients (the first model's row order)
    boot = paired_bootstrap_diff(y, good, noise, groups=patients, n_boot=2000)
    assert rows[0]["boot_units"] == "patients" and rows[0]["n_units"] == 60
    assert (rows[0]["boot_diff_lo"], rows[0]["boot_diff_hi"]) == pytest.approx((boot["diff_lo"], boot["diff_hi"]))
    assert 0 < rows[0]["boot_diff_lo"] < rows[0]["diff"] < rows[0]["boot_diff_hi"]
    assert rows[0]["boot_p_value"] == pytest.approx(boot["p_value"]) and rows[0]["boot_p_value"] < 0.01
    assert "Paired DeLong" in (out / "results.md").read_text() and (out / "fig2_auroc_vs_threshold.png").exists()
    assert "Paired DeLong" in capsys.readouterr().out


def test_compare_refuses_different_test_sets(tmp_path: Path) -> None:
    y = np.array([0, 1, 0, 1, 1, 0], dtype=np.float64)
    p = np.linspace(0, 1, 6)
    a = _model(tmp_path, "a", y, p, np.arange(6))
    b = _model(tmp_path, "b", 1 - y, p, np.arange(6))
    from stence.eval.report import read_results

    merged = {**read_results(a), **read_results(b)}
    with pytest.raises(ValueError, match="not the same test set"):
        paired_delong(merged)


def test_compare_never_unpickles_and_says_when_it_resamples_rows(tmp_path: Path) -> None:
    """Predictions saved with patients as an object array (older probes) would need pickle: compare loads
    them without patients and resamples rows, and says so."""
    rng = np.random.default_rng(1)
    y = (rng.random(40) < 0.5).astype(np.float64)
    idx = np.arange(40)
    legacy = np.array([f"P{i // 2}" for i in range(40)], dtype=object)
    a = _model(tmp_path, "a", y, y + rng.normal(0, 1, 40), idx, legacy)
    b = _model(tmp_path, "b", y, rng.normal(0, 1, 40), idx, legacy)
    from stence.eval.report import read_results

    rows = paired_delong({**read_results(a), **read_results(b)})
    assert rows[0]["boot_units"] == "rows" and rows[0]["n_units"] == 40
