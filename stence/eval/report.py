"""Results reporting: Markdown tables with CIs, a JSON record, the paper's Fig. 2 and ROC curves.

`results` everywhere is {model name -> {task name -> bootstrap dict from metrics.bootstrap_ci}}.
Figures are drawn on a bare Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve

from stence.config import THRESHOLD_TASKS
from stence.outputs import check_output, mark_output

TASK_LABELS: dict[str, str] = {
    "0_100": "(=0|=100)",
    "0_90": "(=0|≥90)",
    "lt70_ge70": "(<70|≥70)",
    "le50_ge99": "(≤50|≥99)",
}

Results = Mapping[str, Mapping[str, Mapping]]


def task_label(task: str) -> str:
    """Paper notation for a known threshold task, else the task name itself."""
    return TASK_LABELS.get(task, task)


def _md(text: str) -> str:
    """Escape a Markdown table cell (the paper's notation contains '|')."""
    return text.replace("|", "\\|")


def _num(x) -> float:
    return float("nan") if x is None else float(x)


def _ordered_tasks(results: Results) -> list[str]:
    """Known threshold tasks in config order first, then any other task in first-seen order."""
    seen: list[str] = []
    for per_task in results.values():
        seen += [t for t in per_task if t not in seen]
    return [t for t in THRESHOLD_TASKS if t in seen] + [t for t in seen if t not in THRESHOLD_TASKS]


def format_cell(d: Mapping | None, metric: str = "auroc") -> str:
    """One metric as "0.812 [0.77, 0.85]"; "—" when absent, "n/a" when undefined."""
    if d is None or metric not in d:
        return "—"
    v, lo, hi = _num(d[metric]), _num(d.get(f"{metric}_lo")), _num(d.get(f"{metric}_hi"))
    if math.isnan(v):
        return "n/a"
    if math.isnan(lo) or math.isnan(hi):
        return f"{v:.3f} [n/a]"
    return f"{v:.3f} [{lo:.2f}, {hi:.2f}]"


def threshold_table(results: Results, metric: str = "auroc", tasks: Sequence[str] | None = None) -> str:
    """Markdown table: one row per model, one column per task (paper notation), cells with 95 % CIs."""
    tasks = list(tasks) if tasks is not None else _ordered_tasks(results)
    header = "| model | " + " | ".join(_md(task_label(t)) for t in tasks) + " |"
    rule = "|---|" + "---|" * len(tasks)
    rows = [
        f"| {_md(model)} | " + " | ".join(format_cell(per_task.get(t), metric) for t in tasks) + " |"
        for model, per_task in results.items()
    ]
    return "\n".join([header, rule, *rows])


def counts_table(results: Results, tasks: Sequence[str] | None = None) -> str:
    """Markdown table of rows / positives / resampling units / valid resamples per model and task."""
    tasks = list(tasks) if tasks is not None else _ordered_tasks(results)
    lines = ["| model | task | n | n_pos | units | valid resamples | note |", "|---|---|---|---|---|---|---|"]
    for model, per_task in results.items():
        for t in tasks:
            d = per_task.get(t)
            if d is None:
                continue
            cells = [d.get(k, "") for k in ("n", "n_pos", "n_units", "n_boot_valid", "note")]
            lines.append(
                f"| {_md(model)} | {_md(task_label(t))} | " + " | ".join(_md(str(c)) for c in cells) + " |"
            )
    return "\n".join(lines)


def _jsonable(x):
    """Plain JSON: numpy scalars/arrays to Python, NaN/inf to null (strict JSON has no NaN)."""
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | np.ndarray):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _restore_nan(x):
    if isinstance(x, dict):
        return {k: _restore_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_restore_nan(v) for v in x]
    return float("nan") if x is None else x


def write_json(obj, path: str | Path) -> Path:
    """Strict JSON (NaN/inf as null, numpy as Python)."""
    Path(path).write_text(json.dumps(_jsonable(obj), indent=2, allow_nan=False) + "\n")
    return Path(path)


RESULTS_KIND = "results"  # output kind in the ownership marker (stence/outputs.py)
FIG2_FILE = "fig2_auroc_vs_threshold.png"
RESULT_FILES = ("results.json", "results.md", FIG2_FILE, "delong.json")  # what a results folder holds


def claim_results(out_dir: str | Path, inputs: Iterable[str | Path] = (), overwrite: bool = False) -> Path:
    """Claim `out_dir` for results (stence/outputs.py) before `write_results`: it must be new, empty, or (with
    `overwrite`) an earlier results folder, whose results files are then removed, and must not be, lie inside
    or contain any of `inputs`; anything else raises `OutputRefused` and touches nothing. Returns `out_dir`."""
    check_output(out_dir, RESULTS_KIND, inputs, overwrite)
    out = Path(out_dir)
    for name in RESULT_FILES:  # nothing stale from the earlier results (a delong.json of an earlier compare)
        if (out / name).is_file() or (out / name).is_symlink():
            (out / name).unlink()
    mark_output(out, RESULTS_KIND)
    return out


def write_results(results: Results, out_dir: str | Path, stem: str = "results") -> tuple[Path, Path]:
    """Write `<stem>.json` (strict JSON, NaN as null) and `<stem>.md` (AUROC, AUPRC and count tables).
    Commands claim the folder first with `claim_results`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    write_json(results, json_path)
    md = [
        "## AUROC [95 % bootstrap CI]",
        "",
        threshold_table(results, "auroc"),
        "",
        "## AUPRC (positive class) [95 % bootstrap CI]",
        "",
        threshold_table(results, "auprc"),
        "",
        "## Counts",
        "",
        counts_table(results),
        "",
    ]
    md_path.write_text("\n".join(md))
    return json_path, md_path


def read_results(path: str | Path) -> dict:
    """Read a `write_results` JSON back; null becomes NaN so it equals what was written."""
    return _restore_nan(json.loads(Path(path).read_text()))


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=150, bbox_inches="tight")
    return path


def plot_auroc_vs_threshold(
    results: Results,
    path: str | Path,
    tasks: Sequence[str] = ("0_100", "0_90", "lt70_ge70", "le50_ge99"),
    metric: str = "auroc",
) -> Path:
    """The paper's Fig. 2: AUROC per severity threshold, one line per model, CI error bars and band."""
    fig = Figure(figsize=(1.6 * len(tasks) + 2.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(tasks), dtype=np.float64)
    n_models = max(len(results), 1)
    offsets = (np.arange(n_models) - (n_models - 1) / 2) * min(0.08, 0.4 / n_models)  # avoid overlapping bars
    for i, (model, per_task) in enumerate(results.items()):
        cols = [per_task.get(t) or {} for t in tasks]
        v = np.array([_num(c.get(metric)) for c in cols])
        lo = np.array([_num(c.get(f"{metric}_lo")) for c in cols])
        hi = np.array([_num(c.get(f"{metric}_hi")) for c in cols])
        xi = x + offsets[i]
        err = np.vstack([np.nan_to_num(v - lo), np.nan_to_num(hi - v)])
        line = ax.errorbar(xi, v, yerr=err, marker="o", capsize=3, label=model)
        ax.fill_between(xi, lo, hi, alpha=0.12, color=line[0].get_color(), linewidth=0)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(x)
    ax.set_xticklabels([task_label(t) for t in tasks])
    ax.set_xlabel("stenosis severity task (negatives | positives)")
    ax.set_ylabel(f"{metric.upper()} (95 % CI)")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path) -> Path:
    """ROC curves, one per name, AUROC in the legend; a curve whose labels hold one class is skipped."""
    fig = Figure(figsize=(5, 5))
    ax = fig.add_subplot(1, 1, 1)
    for name, (y, p) in curves.items():
        y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
        keep = ~np.isnan(y)
        y, p = y[keep].astype(np.int64), p[keep]
        if np.unique(y).size < 2:
            ax.plot([], [], label=f"{name} (n/a: one class)")
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_aspect("equal")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)
