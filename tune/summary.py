"""What a user looks at after a sweep: best-so-far against trial-epochs, Optuna's parameter importances, and the
trials sorted by the objective. Written into `<sweep folder>/summary/` and logged to the sweep's parent run."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from stence.train.worker import RESTORED_KEY
from stence.tune.spaces import SearchSpace

logger = logging.getLogger(__name__)
SUMMARY_DIR = "summary"


def _histories(grid: Any, metric: str, extra: tuple[str, ...] = ()) -> pd.DataFrame:
    """Every reported epoch of every trial: trial_id, training_iteration, timestamp, metric (and the `extra`
    columns a trial has). Epochs a restored trial reported again (`stence/restored`) are not new epochs."""
    frames = []
    for r in grid:
        df = r.metrics_dataframe
        if df is None or df.empty or metric not in df:
            continue
        if RESTORED_KEY in df:
            df = df[df[RESTORED_KEY].fillna(0) == 0]
        keep = [c for c in ("trial_id", "training_iteration", "timestamp", "time_total_s", *extra) if c in df]
        frames.append(df[keep + [metric]].assign(trial_id=str(r.metrics.get("trial_id", ""))))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", metric])


def best_so_far(history: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """Best value reported so far against the trial-epochs spent so far (all trials, in the order reported)."""
    order = [c for c in ("timestamp", "time_total_s", "trial_id", "training_iteration") if c in history]
    h = history.dropna(subset=[metric]).sort_values(order, kind="stable").reset_index(drop=True)
    values = h[metric].to_numpy(dtype=float)
    best = np.maximum.accumulate(values) if mode == "max" else np.minimum.accumulate(values)
    return pd.DataFrame({"trial_epochs": np.arange(1, len(h) + 1), "best": best, "trial_id": h["trial_id"]})


def _distributions(space: SearchSpace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in space.data.get("params", {}).items():
        kind = spec["type"]
        if kind == "categorical":
            out[key] = optuna.distributions.CategoricalDistribution(list(spec["values"]))
        elif kind == "int":
            out[key] = optuna.distributions.IntDistribution(int(spec["low"]), int(spec["high"]))
        else:
            out[key] = optuna.distributions.FloatDistribution(float(spec["low"]), float(spec["high"]),
                                                              log=kind == "loguniform")
    return out


def importances(trials: pd.DataFrame, space: SearchSpace, metric: str, mode: str) -> dict[str, float]:
    """Optuna's parameter importances (fANOVA) over the trials' best values; {} for a variant list or when
    fewer than two trials finished with different values."""
    if space.fixed or len(trials) < 2 or trials["objective"].nunique() < 2:
        return {}
    dists = _distributions(space)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    for _, row in trials.iterrows():
        params = {k: row[f"config/{k}"] for k in dists if f"config/{k}" in row and pd.notna(row[f"config/{k}"])}
        if len(params) != len(dists):
            continue
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(row["objective"])))
    try:
        return {k: float(v) for k, v in optuna.importance.get_param_importances(study, target=None).items()}
    except (RuntimeError, ValueError) as e:  # too few distinct trials for the evaluator
        logger.info("no parameter importances for %s: %s", metric, e)
        return {}


def _at_best(history: pd.DataFrame, metric: str, mode: str, interval: tuple[str, str, str] | None) -> pd.DataFrame:
    """Per trial: its best `metric` ("objective"), the epochs it reported, and (with `interval` = (value,
    low, high) columns) that value and interval at the epoch of its best."""
    ordered = history.dropna(subset=[metric]).sort_values(metric, ascending=mode != "max", kind="stable")
    best = ordered.groupby("trial_id", sort=False).head(1).set_index("trial_id")
    out = best[[metric]].rename(columns={metric: "objective"})
    out["epochs"] = history.groupby("trial_id").size()
    if interval and set(interval) <= set(best.columns):
        out[["at_best", "at_best_lo", "at_best_hi"]] = best[list(interval)].to_numpy(dtype=float)
    return out


def write_summary(grid: Any, results: pd.DataFrame, space: SearchSpace, metric: str, mode: str,
                  out: Path, interval: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """Write best_so_far.csv/.png, trials.md and importances.json into `out`; returns what they hold.

    `interval` names a (value, low, high) triple of result columns (the kNN AUROC and its 95 % interval);
    the table shows them at each trial's best epoch."""
    out.mkdir(parents=True, exist_ok=True)
    history = _histories(grid, metric, interval or ())
    curve = best_so_far(history, metric, mode)
    curve.to_csv(out / "best_so_far.csv", index=False)
    _plot(curve, metric, out / "best_so_far.png")
    cols = ["trial_id"] + [c for c in results if c.startswith("config/")]
    trials = results[cols].merge(_at_best(history, metric, mode, interval), left_on="trial_id", right_index=True)
    trials = trials.sort_values("objective", ascending=mode != "max").reset_index(drop=True)
    imp = importances(trials, space, metric, mode)
    (out / "importances.json").write_text(json.dumps(imp, indent=1) + "\n")
    shown = "at_best" in trials
    header = ["trial", *[c.removeprefix("config/") for c in cols[1:]], f"best {metric}", "epochs"]
    header += [f"{interval[0]} (95 % CI) there"] if shown and interval else []
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in trials.iterrows():
        vals = [str(r["trial_id"]), *(_fmt(r[c]) for c in cols[1:]), f"{r['objective']:.4f}", str(int(r["epochs"]))]
        if shown:
            vals.append(f"{r['at_best']:.3f} [{r['at_best_lo']:.3f}, {r['at_best_hi']:.3f}]")
        lines.append("| " + " | ".join(vals) + " |")
    if imp:
        lines += ["", "Parameter importances (Optuna fANOVA): "
                  + ", ".join(f"{k} {v:.2f}" for k, v in sorted(imp.items(), key=lambda kv: -kv[1]))]
    (out / "trials.md").write_text("\n".join(lines) + "\n")
    return {"trials": trials, "importances": imp, "best_so_far": curve, "files": sorted(out.iterdir())}


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _plot(curve: pd.DataFrame, metric: str, path: Path) -> None:
    fig = Figure(figsize=(5.5, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.step(curve["trial_epochs"], curve["best"], where="post")
    ax.set_xlabel("trial-epochs spent")
    ax.set_ylabel(f"best {metric} so far")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
