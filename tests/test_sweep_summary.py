"""The sweep summary on hand-made trial histories: trials sorted by the objective, the interval read at each
trial's best epoch, restored repeats not counted as epochs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from stence.train.worker import RESTORED_KEY
from stence.tune.spaces import load_space
from stence.tune.summary import write_summary

OBJ, VAL, LO, HI = "val/knn_auroc_smooth", "val/knn_auroc", "val/knn_auroc_lo", "val/knn_auroc_hi"


def _trial(tid: str, rows: list[tuple[int, float, float, float, float, float]], t0: int = 0) -> SimpleNamespace:
    df = pd.DataFrame(rows, columns=["training_iteration", OBJ, VAL, LO, HI, RESTORED_KEY])
    df["timestamp"] = range(t0, t0 + len(df))  # the order results arrived in
    return SimpleNamespace(metrics_dataframe=df, metrics={"trial_id": tid})


def test_trials_table_shows_the_interval_at_the_best_epoch_and_skips_restored_repeats(tmp_path: Path) -> None:
    nan = float("nan")
    grid = [
        # a: best at epoch 2 (0.70); epoch 2 reported again after a restore (marked): still 3 epochs
        _trial("a", [(1, 0.60, 0.60, 0.40, 0.80, nan), (2, 0.70, 0.80, 0.62, 0.98, nan),
                     (2, 0.70, 0.80, 0.62, 0.98, 1.0), (3, 0.65, 0.50, 0.30, 0.70, nan)]),
        _trial("b", [(1, 0.90, 0.90, 0.75, 1.00, nan)], t0=10),  # stopped early, but the best
    ]
    results = pd.DataFrame({"trial_id": ["a", "b"], "config/loss.w_sten": [0.3, 0.9]})
    out = write_summary(grid, results, load_space("default"), OBJ, "max", tmp_path, interval=(VAL, LO, HI))
    trials = out["trials"]
    assert list(trials["trial_id"]) == ["b", "a"] and list(trials["epochs"]) == [1, 3]
    a = trials.set_index("trial_id").loc["a"]
    assert (a["objective"], a["at_best"], a["at_best_lo"], a["at_best_hi"]) == pytest.approx((0.70, 0.80, 0.62, 0.98))
    lines = (tmp_path / "trials.md").read_text().splitlines()
    assert lines[0].endswith(f"| {VAL} (95 % CI) there |")
    assert lines[2].startswith("| b |") and lines[2].endswith("| 0.900 [0.750, 1.000] |")
    assert lines[3].endswith("| 0.800 [0.620, 0.980] |")
    curve = pd.read_csv(tmp_path / "best_so_far.csv")
    assert list(curve["trial_epochs"]) == [1, 2, 3, 4]  # 4 epochs trained, the repeat is not one
    assert list(curve["best"]) == pytest.approx([0.60, 0.70, 0.70, 0.90])


def test_without_an_interval_the_table_keeps_its_columns(tmp_path: Path) -> None:
    grid = [_trial("a", [(1, 0.6, 0.6, 0.4, 0.8, float("nan"))])]
    results = pd.DataFrame({"trial_id": ["a"], "config/loss.w_sten": [0.3]})
    write_summary(grid, results, load_space("default"), OBJ, "max", tmp_path)
    header = (tmp_path / "trials.md").read_text().splitlines()[0]
    assert header == f"| trial | loss.w_sten | best {OBJ} | epochs |"
