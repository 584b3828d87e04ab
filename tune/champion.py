"""After a sweep: export the best trial's ECG encoder, probe it on the registration task, log the scorer
(encoder + stenosis head) to MLflow from the driver, register it and move `champion` only if it wins."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from stence.config import Config
from stence.models.scorer import scorer_metadata
from stence.pipelines.downstream import run_downstream
from stence.pipelines.register import register_and_promote
from stence.pipelines.stage_runs import export_pretrained, output_dir
from stence.tracking.tags import BEST_KNN_AUROC_TAG, SWEEP_TAG, TRIAL_TAG
from stence.train.worker import load_state


def export_best_encoder(best_checkpoint: str, cfg: Config, out_dir: Path) -> Path:
    """The best trial's best checkpoint -> a self-describing encoder.pt."""
    return export_pretrained(cfg, load_state(best_checkpoint), out_dir)["encoder"]


def register_best(result: Any, cfg: Config, *, task: str | None = None, strict: bool = False,
                  sweep_name: str = "") -> dict[str, Any]:
    """Probe, log, register and (maybe) promote the sweep's best encoder. Returns what happened."""
    if not result.best_checkpoint:
        raise RuntimeError("the sweep produced no checkpoint to register")
    best = result.best_config
    task = task or best.downstream.task
    out_dir = output_dir(best, "sweep", sweep_name or best.train.name)  # the sweep's own, re-written on a re-run
    encoder = export_best_encoder(result.best_checkpoint, best, out_dir)
    probe_cfg = replace(best, downstream=replace(best.downstream, mode="probe", task=task,
                                                 encoder_checkpoint=str(encoder)),
                        train=replace(best.train, name=f"{sweep_name or best.train.name}-champion"))
    probe = run_downstream(probe_cfg, label="sweep-best", parent_run_id=result.parent_run_id)
    extra = {TRIAL_TAG: result.best_trial_id, BEST_KNN_AUROC_TAG: repr(float(result.best_metric))}  # what ranked
    if sweep_name:
        extra[SWEEP_TAG] = sweep_name
    done = register_and_promote(cfg, probe["scorer"], probe["run_id"], cfg.tracking.registered_model,
                                extra_tags=extra, strict=strict)
    m = scorer_metadata(probe["scorer"])["metrics"]
    return {"model_uri": done.model_uri, "name": done.name, "version": done.version, "promoted": done.promoted,
            "val_auroc": m["auroc"], "val_auroc_lo": m.get("auroc_lo"), "val_auroc_hi": m.get("auroc_hi"),
            "test_auroc": m.get("test_auroc"), "scorer": probe["scorer"], "encoder": str(encoder)}
