"""The replay benchmark (bench/replay.py) drives the live sweep's searcher and scheduler on a curve table."""

from __future__ import annotations

import itertools
import math
import statistics

import numpy as np
import pandas as pd
import pytest

from bench.bench_replay import compare
from bench.curve_noise import noise_report
from bench.record_curves import grid_levels
from bench.replay import CurveTable, replay
from stence.tune.budget import trial_epochs_to_within
from stence.tune.spaces import load_space

SPACE = load_space("default")
PARAMS = list(SPACE.data["params"])
EPOCHS = 8


def _table(noise: float = 0.0, seeds: int = 1) -> pd.DataFrame:
    """A 3-level grid whose final value rises with every parameter's level index (best: the top corner)."""
    axes = {k: grid_levels(spec, 3) for k, spec in SPACE.data["params"].items()}
    rng = np.random.default_rng(0)
    rows = []
    for idx in itertools.product(range(3), repeat=len(axes)):
        quality = sum(idx) / (2 * len(axes))  # 0 .. 1
        for seed in range(seeds):
            for e in range(1, EPOCHS + 1):
                value = 0.5 + 0.45 * quality * (1 - math.exp(-e / 2)) + noise * rng.standard_normal()
                rows.append({**{k: axes[k][i] for k, i in zip(axes, idx, strict=True)}, "seed": seed,
                             "epoch": e, "val/knn_auroc_smooth": value})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def table() -> CurveTable:
    return CurveTable.from_frame(_table(), SPACE, "val/knn_auroc_smooth")


def test_snap_takes_the_nearest_level_on_the_parameter_scale(table: CurveTable) -> None:
    lv = table.levels["optim.lr_ecg"]  # log-uniform: the geometric midpoint decides
    near_low = {k: table.levels[k][0] for k in PARAMS} | {"optim.lr_ecg": math.sqrt(lv[0] * lv[1]) * 0.99}
    assert table.snap(near_low)[PARAMS.index("optim.lr_ecg")] == lv[0]
    near_mid = near_low | {"optim.lr_ecg": math.sqrt(lv[0] * lv[1]) * 1.01}
    assert table.snap(near_mid)[PARAMS.index("optim.lr_ecg")] == lv[1]
    assert len(table.curves) == 81 and table.epochs == EPOCHS


def test_a_replay_is_deterministic_and_spends_its_budget(table: CurveTable) -> None:
    a = replay(table, SPACE, "tpe_asha", seed=3, budget=64)
    b = replay(table, SPACE, "tpe_asha", seed=3, budget=64)
    assert a.values == b.values and len(a.values) == 64


def test_asha_stops_trials_at_its_rungs_and_random_search_runs_every_trial_to_the_end(table: CurveTable) -> None:
    full = replay(table, SPACE, "random", seed=1, budget=64)
    assert full.stopped_early == 0 and full.trials == 64 // EPOCHS  # 8 trials of 8 epochs, two at a time
    asha = replay(table, SPACE, "random_asha", seed=1, budget=64)
    assert asha.stopped_early > 0 and asha.trials > full.trials


def test_random_and_tpe_start_from_the_same_configurations(table: CurveTable) -> None:
    """A paired design: with one seed, TPE's random start-up draws what random search draws."""
    r = replay(table, SPACE, "random", seed=5, budget=2 * EPOCHS, n_startup=3)
    t = replay(table, SPACE, "tpe", seed=5, budget=2 * EPOCHS, n_startup=3)
    assert r.values == t.values


def test_tpe_with_asha_reaches_a_clear_optimum_sooner_than_random_search(table: CurveTable) -> None:
    res = compare(table, SPACE, seeds=8, budget=160, concurrency=2, n_startup=3, reduction_factor=4, tol=0.05)
    arms = res["arms"]
    assert arms["tpe_asha"]["trial_epochs_to_within"]["median"] < arms["random"]["trial_epochs_to_within"]["median"]
    assert res["ratio_tpe_asha_vs_random"] < 1


def test_trial_epochs_to_within_counts_from_one() -> None:
    assert trial_epochs_to_within([0.5, 0.7, 0.9], 0.9, 0.01) == 3
    assert trial_epochs_to_within([0.5, 0.7], 0.9, 0.01) is None


def test_noise_report_sets_seed_noise_against_the_spread_between_configurations() -> None:
    df = _table(noise=0.02, seeds=3)
    rep = noise_report(df, PARAMS)["val/knn_auroc_smooth"]
    assert rep["configs"] == 81 and rep["configs_with_seeds"] == 81
    assert rep["seed_sd"] == pytest.approx(0.02, rel=0.2)
    spread = statistics.stdev(df[(df.epoch == EPOCHS) & (df.seed == 0)]["val/knn_auroc_smooth"])
    assert rep["config_sd"] == pytest.approx(spread) and rep["noise_to_spread"] < 0.3
