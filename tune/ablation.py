"""After an ablation sweep: probe every variant's exported encoder on the threshold tasks and write the
paper's ablation table (AUROC with 95 % CIs per variant and task), Fig. 2 for all variants, and paired
DeLong tests of each variant against the paper's setting on the same test rows."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from stence.config import Config, apply_overrides
from stence.pipelines.compare import compare_results
from stence.pipelines.downstream import evaluate_encoder
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.runs import Tracker
from stence.train.driver import absolute_storage

PAPER_POINT = {"loss.w_sten": 0.3, "model.contract": "paper"}  # the reference row: the paper's W_Sten and input


def variant_label(overrides: dict[str, Any], swept: list[str]) -> str:
    """A short row name from the variant's values, e.g. "W_Sten 0.3, frozen no CLS"."""
    parts = []
    for key in swept:
        value = overrides.get(key)
        if key == "loss.w_sten":
            parts.append(f"W_Sten {value:g}")
        elif key == "model.contract":
            parts.append(f"{value} input")
        elif value is True:
            parts.append(key.split(".")[-1].replace("_", " "))
    return ", ".join(parts) or "base"


def _variants(results: Any) -> list[tuple[str, dict[str, Any]]]:
    """(trial id, dotted overrides) per trial of the sweep's results frame, in trial order."""
    cols = [c for c in results.columns if c.startswith("config/")]
    rows = []
    for _, row in results.iterrows():
        overrides = {c.removeprefix("config/"): row[c] for c in cols}
        rows.append((str(row["trial_id"]), {k: (v.item() if hasattr(v, "item") else v) for k, v in overrides.items()}))
    return rows


def ablation_report(result: Any, cfg: Config, tasks: list[str], out_dir: str | Path | None = None) -> dict:
    """Probe each variant (its exported best encoder, `exports/pretrain-<trial id>/encoder.pt`) on `tasks`, one
    evaluation run per variant under the sweep's parent; write results.json/.md, fig2_auroc_vs_threshold.png
    and delong.json into `out_dir` (default: the sweep folder's `ablation/`) as a comparison run, and log them
    to the sweep's parent run too. The probes and the table go through the pipelines of `stence probe` and
    `stence probe --compare` (`evaluate_encoder`, `compare_results`). Returns the merged results."""
    variants = _variants(result.results)
    varied = [k for k in (variants[0][1] if variants else {}) if len({str(v[1].get(k)) for v in variants}) > 1]
    swept = ["loss.w_sten", *(k for k in varied if k != "loss.w_sten")]  # W_Sten named in every row
    exports = Path(absolute_storage(cfg.train.storage_path)) / "exports"
    merged: dict[str, dict] = {}
    reference = None
    for trial_id, overrides in variants:
        encoder = exports / f"pretrain-{trial_id}" / "encoder.pt"
        if not encoder.exists():  # a failed variant: say so in the table instead of hiding the row
            merged[variant_label(overrides, swept) + " (failed)"] = {}
            continue
        label = variant_label(overrides, swept)
        if all(overrides.get(k) == v for k, v in PAPER_POINT.items()) and not any(
            overrides.get(k) is True for k in swept
        ):
            reference = label
        vcfg = apply_overrides(cfg, overrides)
        vcfg = replace(vcfg, train=replace(vcfg.train, name=f"ablation-{trial_id}"))
        merged[label] = evaluate_encoder(vcfg, label, "probe", str(encoder), tasks,
                                         parent_run_id=result.parent_run_id).results[label]
    if reference is not None:  # reference first: the paired tests compare the first model with the others
        merged = {reference: merged[reference], **{k: v for k, v in merged.items() if k != reference}}
    done = compare_results(cfg, merged, Path(out_dir) if out_dir else Path(result.path) / "ablation",
                           overwrite=True, tasks=tasks, run_name="ablation-comparison",
                           parent_run_id=result.parent_run_id,
                           heading="Paired DeLong test and patient bootstrap against the paper's setting")
    out = done.out
    uri = resolve_tracking_uri(cfg)
    if result.parent_run_id and uri:
        t = Tracker(uri, result.parent_run_id)
        for f in ("results.json", "results.md", "fig2_auroc_vs_threshold.png", "delong.json"):
            t.log_artifact(out / f, "ablation")
    return {"results": merged, "out": str(out), "delong": done.delong}
