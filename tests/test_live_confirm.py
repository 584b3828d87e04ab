"""bench/live_confirm.py's pure parts: the live best-so-far curve against replayed ones, and the live sweep's
trial counts. Cheap: no Ray, no sweep, no replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.live_confirm import compare_to_replay, live_trial_counts, markdown, read_trials, report_budgets


def _replays(finals: list[float], n: int = 8) -> list[list[float]]:
    """Best-so-far curves of length n: 0.5 for the first half, then `final`."""
    return [[0.5] * (n // 2) + [f] * (n - n // 2) for f in finals]


def test_the_report_budgets_are_bench_replays() -> None:
    assert report_budgets(64) == [16, 32, 64]
    assert report_budgets(3) == [1, 3]


def test_the_live_value_is_set_against_the_replays_spread_at_each_budget() -> None:
    finals = [0.60 + 0.01 * i for i in range(21)]  # 0.60 .. 0.80: median 0.70, quartiles 0.65/0.75
    live = [0.4, 0.5, 0.55, 0.55, 0.7, 0.7, 0.7, 0.83]
    res = compare_to_replay(live, _replays(finals), [4, 8], live_trials=5, live_stopped=3,
                            replay_trials=[4, 5, 6], replay_stopped=[2, 2, 4])  # fmt: skip
    at4, at8 = res["budgets"]["4"], res["budgets"]["8"]
    assert at4["live"] == 0.55 and at4["replay"]["median"] == pytest.approx(0.5)
    assert at4["replay"]["p5"] == at4["replay"]["p95"] == pytest.approx(0.5)
    assert not at4["inside_5_95"] and at4["rank"] == 1.0  # above every replay: outside all the same
    s = at8["replay"]
    assert (s["median"], s["q1"], s["q3"]) == pytest.approx((0.70, 0.65, 0.75))
    assert (s["p5"], s["p95"]) == pytest.approx((0.61, 0.79))  # numpy's linear percentiles
    assert at8["live"] == 0.83 and not at8["inside_5_95"] and res["inside_5_95_at_budget"] is False
    assert at8["live_trial_epochs"] == 8
    assert res["trials"] == {"live": 5, "replay": pytest.approx({"median": 5, "q1": 4.5, "q3": 5.5, "p5": 4.1,
                                                                 "p95": 5.9})}  # fmt: skip
    assert res["stopped_early"]["live"] == 3 and res["stopped_early"]["replay"]["median"] == 2


def test_inside_is_inclusive_and_rank_counts_ties() -> None:
    finals = [0.7] * 10
    res = compare_to_replay([0.7] * 8, _replays(finals), [8])
    assert res["budgets"]["8"]["inside_5_95"] and res["budgets"]["8"]["rank"] == 1.0
    assert "trials" not in res and "stopped_early" not in res  # no counts given, none reported
    mid = compare_to_replay([0.65] * 8, _replays([0.6, 0.7] * 10), [8])["budgets"]["8"]
    assert mid["inside_5_95"] and mid["rank"] == 0.5


def test_a_live_curve_that_ended_early_reports_its_last_value_and_length() -> None:
    res = compare_to_replay([0.6, 0.72, 0.72], _replays([0.7, 0.75, 0.8]), [2, 8])
    assert res["budgets"]["2"]["live"] == 0.72 and res["budgets"]["2"]["live_trial_epochs"] == 2
    assert res["budgets"]["8"]["live"] == 0.72 and res["budgets"]["8"]["live_trial_epochs"] == 3


def test_nothing_to_compare_is_refused() -> None:
    with pytest.raises(ValueError, match="no result"):
        compare_to_replay([], _replays([0.7]), [8])
    with pytest.raises(ValueError, match="no replay"):
        compare_to_replay([0.7], [], [8])
    with pytest.raises(ValueError, match="shorter than the budget 16"):
        compare_to_replay([0.7], _replays([0.7]), [16])


def test_the_markdown_table_names_a_value_outside_the_range() -> None:
    cmp = compare_to_replay([0.9] * 8, _replays([0.7, 0.75, 0.8]), [4, 8], live_trials=3, live_stopped=1,
                            replay_trials=[3, 4], replay_stopped=[1, 2])  # fmt: skip
    text = markdown({"comparison": cmp, "comparison_reference": cmp})
    rows = text.splitlines()
    assert rows[0].startswith("| trial-epochs |") and len(rows) == 2 + 2 + 2
    assert "| 8 | 0.900 | 0.750 [0.725, 0.775] | 0.705-0.795 | NO |" in text
    assert rows[-2].startswith("| trials | 3 |") and rows[-1].startswith("| early-stopped trials | 1 |")


def test_live_trial_counts_tell_asha_stops_from_the_budget() -> None:
    # a: ran its 4 epochs to the end (max_t 4); b: stopped by ASHA at 1; c: stopped at 2, but by the budget
    # (its STOP is on the 8th result, the one that spent it); d: still running when the budget ran out;
    # e: reported only after the budget (same step), not counted
    ids = ["a", "b", "a", "c", "a", "d", "a", "c", "e"]
    trials = {"a": (4, False), "b": (1, True), "c": (2, True), "d": (1, False), "e": (1, True)}
    out = live_trial_counts(ids, trials, budget=8, max_t=4)
    assert out["trials"] == 4 and out["stopped_early"] == 1 and out["cut_by_budget"] == 2
    assert out["epochs_per_trial"] == {"a": 4, "b": 1, "c": 2, "d": 1}
    # a trial without a result.json falls back to its results in the curve, and is never counted as stopped
    assert live_trial_counts(["x", "x", "y"], {}, budget=3, max_t=8)["cut_by_budget"] == 2


def test_read_trials_takes_epochs_and_the_last_done_flag(tmp_path: Path) -> None:
    for name, rows in {"t1": [(1, False), (2, False), (3, True)], "t2": [(1, False)]}.items():
        d = tmp_path / f"stence_trial_{name}_x"
        d.mkdir()
        (d / "result.json").write_text("".join(json.dumps({"trial_id": name, "training_iteration": it,
                                                           "done": done}) + "\n" for it, done in rows))
    (tmp_path / "summary").mkdir()  # folders without result.json are skipped
    assert read_trials(tmp_path) == {"t1": (3, True), "t2": (1, False)}


def test_spread_matches_numpys_percentiles() -> None:
    from bench.live_confirm import spread

    xs = list(np.linspace(0, 1, 11))
    assert spread(xs) == pytest.approx({"median": 0.5, "q1": 0.25, "q3": 0.75, "p5": 0.05, "p95": 0.95})


def test_table_agreement_sets_live_values_against_the_table_mean_at_the_snapped_point() -> None:
    from bench.live_confirm import table_agreement
    from bench.replay import CurveTable

    table = CurveTable(params={"loss.w_sten": {"type": "uniform", "low": 0.0, "high": 1.0}},
                       levels={"loss.w_sten": np.array([0.25, 0.75])},
                       curves={(0.25,): [np.array([0.5, 0.6]), np.array([0.7, 0.8])],  # mean 0.6, 0.7
                               (0.75,): [np.array([0.9, 0.9])]}, epochs=2)  # fmt: skip
    rows = [({"loss.w_sten": 0.3}, 1, 0.6), ({"loss.w_sten": 0.3}, 2, 0.8), ({"loss.w_sten": 0.9}, 1, 0.8),
            ({"loss.w_sten": 0.9}, 2, float("nan")), ({"loss.w_sten": 0.9}, 3, 0.5)]  # NaN, beyond: skipped
    out = table_agreement(rows, table)
    assert out["n"] == 3 and out["mean"] == pytest.approx(0.0) and out["mean_abs"] == pytest.approx(0.2 / 3)
    assert out["median"] == pytest.approx(0.0)
    assert table_agreement([], table)["n"] == 0
