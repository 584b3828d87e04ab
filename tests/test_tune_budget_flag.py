"""`stence tune --budget TRIAL_EPOCHS`: parsed, refused below 1 (argparse, exit code 2), and wired through
`sweep_pipeline` to `run_sweep` as a `TrialEpochBudget` stopper. Cheap: no Ray, no features, no training."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

import stence.tune.pipeline as pipeline
from stence.cli import build_parser
from stence.config import Config, apply_overrides
from stence.tune.budget import TrialEpochBudget
from stence.tune.spaces import load_space


def _cfg() -> Config:
    return apply_overrides(Config(), {"tracking.enabled": False, "optim.epochs": 8})


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """sweep_pipeline with run_sweep and extract_features replaced: what they were called with."""
    seen: dict[str, Any] = {"features": 0}

    def fake_features(cfg: Config, *a: Any, **kw: Any) -> None:
        seen["features"] += 1

    def fake_run_sweep(fn: Any, cfg: Config, **kw: Any) -> Any:
        seen["run_sweep"] = kw
        return SimpleNamespace(complete=False)  # an interrupted sweep: no ablation, no registration

    monkeypatch.setattr(pipeline, "extract_features", fake_features)
    monkeypatch.setattr(pipeline, "run_sweep", fake_run_sweep)
    return seen


def _run(budget: int | None, resume: str | None = None) -> None:
    pipeline.sweep_pipeline(_cfg(), load_space("default"), name="s", num_samples=64, max_concurrent=2,
                            scheduler="asha", search="tpe", seed=0, resume=resume, tasks=[], register=False,
                            register_task=None, strict=False, budget=budget)  # fmt: skip


def test_the_flag_parses_and_defaults_to_no_budget() -> None:
    parser = build_parser()
    assert parser.parse_args(["tune", "--budget", "64"]).budget == 64
    assert parser.parse_args(["tune"]).budget is None


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "many"])
def test_a_budget_below_one_or_not_a_whole_number_is_refused_with_exit_code_2(
    value: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["tune", "--budget", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--budget" in err and ("at least 1 trial-epoch" in err or "not a whole number" in err)


def test_the_help_explains_the_budget() -> None:
    sub = next(a for a in build_parser()._subparsers._group_actions if a.choices)  # noqa: SLF001
    text = " ".join(sub.choices["tune"].format_help().split())
    assert "--budget TRIAL_EPOCHS" in text and "early-stopped trials cost only the epochs they ran" in text
    assert "--budget 64" in text  # the example in the epilog


def test_sweep_pipeline_hands_run_sweep_a_trial_epoch_budget(calls: dict[str, Any]) -> None:
    _run(64)
    stop = calls["run_sweep"]["stop"]
    assert isinstance(stop, TrialEpochBudget) and stop.budget == 64 and stop.spent == 0
    assert calls["run_sweep"]["num_samples"] == 64 and calls["run_sweep"]["max_t"] == 8
    assert calls["features"] == 1


def test_no_budget_means_no_stopper(calls: dict[str, Any]) -> None:
    _run(None)
    assert calls["run_sweep"]["stop"] is None


def test_sweep_pipeline_refuses_a_budget_below_one_before_any_work(calls: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="budget must be >= 1"):
        _run(0)
    assert calls["features"] == 0 and "run_sweep" not in calls


def test_a_resumed_sweep_ignores_the_budget_with_a_warning(calls: dict[str, Any],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="stence.tune.pipeline"):
        _run(64, resume="runs/ray/sweeps/s")
    assert calls["run_sweep"]["stop"] is None and calls["run_sweep"]["resume"] == "runs/ray/sweeps/s"
    assert calls["features"] == 0 and "ignored on resume" in caplog.text
