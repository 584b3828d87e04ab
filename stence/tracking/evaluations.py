"""The MLflow side of evaluations, as users compare them in the UI.

- One `stence probe` / `stence finetune` invocation is one **evaluation run** (tags: model label, mode,
  encoder source, cohort fingerprint) with one nested run per task (`run_downstream(parent_run_id=...)`);
  the evaluation run holds the results table, Fig. 2 and one metric per task.
- One comparison (`stence probe --compare`, the ablation sweep's table) is one **comparison run** holding
  the table, the paired tests and Fig. 2, linked to the evaluation runs it compared (`stence.compared_runs`
  and one `stence.compared.<label>` tag each).

Tracking never stops an evaluation: a store that cannot be reached gives a warning and no run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from stence.config import Config
from stence.data.cohort_meta import read_cohort_meta
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.lineage import log_cohort_input
from stence.tracking.runs import Tracker, start_run
from stence.tracking.tags import (
    COHORT_TAG,
    COMPARED_PREFIX,
    COMPARED_TAG,
    ENCODER_TAG,
    LABEL_TAG,
    MODE_TAG,
    STAGE_TAG,
)

log = logging.getLogger(__name__)

EVALUATION, COMPARISON = "evaluation", "comparison"  # values of the stage tag
RESULT_FILES = ("results.json", "results.md", "fig2_auroc_vs_threshold.png", "delong.json")


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:n] or "model"


def describe_encoder(encoder: str) -> str:
    """What an evaluation's encoder was, without a local path: a registry/run URI as given, a file as its
    folder and name (exports are named by run, never by patient), "" for the configured random init."""
    if not encoder:
        return ""
    if "://" in encoder or encoder.startswith(("models:/", "runs:/")):
        return encoder
    p = Path(encoder)
    return f"{p.parent.name}/{p.name}" if p.parent.name else p.name


def _cohort_fingerprint(cfg: Config) -> str:
    try:
        return read_cohort_meta(cfg.data.cohort)["fingerprint"]
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return ""


def start_evaluation(cfg: Config, label: str, mode: str, encoder: str,
                     parent_run_id: str | None = None) -> str | None:
    """The evaluation run of one probe / fine-tune invocation (nested under `parent_run_id`, e.g. a sweep),
    or None when tracking is off or the store cannot be reached (a warning says so)."""
    if not cfg.tracking.enabled:
        return None
    tags = {STAGE_TAG: EVALUATION, LABEL_TAG: label, MODE_TAG: mode, ENCODER_TAG: describe_encoder(encoder),
            COHORT_TAG: _cohort_fingerprint(cfg)}
    try:
        run_id = start_run(cfg, f"eval-{_slug(label)}-{mode}", parent_run_id=parent_run_id, tags=tags)
    except Exception as e:  # the evaluation itself goes on; its task runs try the store again
        log.warning("MLflow: no evaluation run (%s: %s); the task runs are logged on their own", type(e).__name__, e)
        return None
    _log_cohort(cfg, run_id, "test")
    return run_id


def _log_cohort(cfg: Config, run_id: str, context: str) -> None:
    """The cohort as the run's dataset input (name, fingerprint digest, no path); never raises."""
    if cfg.downstream.task != "echonext":
        log_cohort_input(resolve_tracking_uri(cfg), run_id, cfg.data.cohort, context)


def finish_evaluation(cfg: Config, run_id: str | None, results: Mapping[str, Any], out_dir: Path | None = None,
                      ok: bool = True) -> None:
    """Log one metric per task (`<task>/auroc`, `..._lo`, `..._hi`, `/auprc`) and the table and Fig. 2 in
    `out_dir` (if given), and end the run FINISHED (FAILED when `ok` is False)."""
    if not run_id:
        return
    t = Tracker(resolve_tracking_uri(cfg), run_id)
    metrics: dict[str, float] = {}
    for per_task in results.values():
        for task, r in per_task.items():
            if isinstance(r, Mapping):
                metrics.update({f"{task}/{k}": float(r[k]) for k in ("auroc", "auroc_lo", "auroc_hi", "auprc")
                                if isinstance(r.get(k), (int, float))})
    if metrics:
        t.log_metrics(metrics, step=0)
    for name in RESULT_FILES if out_dir is not None else ():
        if (out_dir / name).is_file():
            t.log_artifact(out_dir / name)
    t.end("FINISHED" if ok else "FAILED")


def evaluation_runs(results: Mapping[str, Any]) -> dict[str, str]:
    """label -> evaluation run id, read from the `evaluation_run_id` each task entry of a results table
    carries (tables written before evaluation runs existed give none)."""
    out: dict[str, str] = {}
    for label, per_task in results.items():
        for r in per_task.values():
            if isinstance(r, Mapping) and r.get("evaluation_run_id"):
                out[label] = str(r["evaluation_run_id"])
                break
    return out


def log_comparison(cfg: Config, results: Mapping[str, Any], out_dir: Path, name: str = "",
                   parent_run_id: str | None = None, extra_files: Iterable[Path] = ()) -> str | None:
    """One comparison run: the table, paired tests and Fig. 2 in `out_dir`, tagged with the evaluation runs it
    compared. Returns its id (None when tracking is off or the store cannot be reached)."""
    if not cfg.tracking.enabled:
        return None
    compared = evaluation_runs(results)
    tags: dict[str, Any] = {STAGE_TAG: COMPARISON, COMPARED_TAG: json.dumps(list(compared.values())),
                            **{f"{COMPARED_PREFIX}{_slug(label, 60)}": rid for label, rid in compared.items()}}
    run_name = name or "compare-" + "-vs-".join(_slug(label, 16) for label in results)[:80]
    try:
        run_id = start_run(cfg, run_name, parent_run_id=parent_run_id, tags=tags)
    except Exception as e:
        log.warning("MLflow: the comparison is not logged (%s: %s); its files are in %s", type(e).__name__, e,
                    out_dir)
        return None
    _log_cohort(cfg, run_id, "test")  # the test rows the compared models were scored on
    t = Tracker(resolve_tracking_uri(cfg), run_id)
    for f in [*(out_dir / n for n in RESULT_FILES), *extra_files]:
        if Path(f).is_file():
            t.log_artifact(f)
    t.end("FINISHED")
    return run_id


__all__ = ["COMPARISON", "EVALUATION", "describe_encoder", "evaluation_runs", "finish_evaluation", "log_comparison",
           "start_evaluation"]
