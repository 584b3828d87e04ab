"""After a sweep: export the best trial's ECG encoder, probe it on the registration task, log the scorer
(encoder + stenosis head) to MLflow from the driver, register it and move `champion` only if it wins."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from stence.config import Config, to_dict
from stence.data.cohort_io import Cohort
from stence.outputs import claim_output
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.tags import BEST_KNN_AUROC_TAG, TRIAL_TAG
from stence.train.driver import absolute_storage
from stence.train.worker import load_state


def export_best_encoder(best_checkpoint: str, cfg: Config, out_dir: Path) -> Path:
    """The best trial's best checkpoint -> a self-describing encoder.pt."""
    from stence.models.checkpoint import save_encoder
    from stence.models.registry import build_stence_model

    state = load_state(best_checkpoint)
    model = build_stence_model(replace(cfg, model=replace(cfg.model, angio_checkpoint="")))
    model.load_state_dict(state["model"])
    path = out_dir / "encoder.pt"
    save_encoder(path, model.ecg_encoder, to_dict(cfg), extra={"epoch": int(state["epoch"])})
    return path


def register_best(result: Any, cfg: Config, *, task: str | None = None, strict: bool = False,
                  sweep_name: str = "") -> dict[str, Any]:
    """Probe, log, register and (maybe) promote the sweep's best encoder. Returns what happened."""
    from stence.models.scorer import scorer_metadata
    from stence.pipelines.downstream import run_downstream
    from stence.pipelines.stage_runs import EXPORT_KIND
    from stence.serving.registry import log_scorer, promote_if_better, register, scorer_version_tags

    if not result.best_checkpoint:
        raise RuntimeError("the sweep produced no checkpoint to register")
    best = result.best_config
    task = task or best.downstream.task
    out_dir = Path(absolute_storage(best.train.storage_path)) / "exports" / f"sweep-{sweep_name or best.train.name}"
    claim_output(out_dir, EXPORT_KIND, overwrite=True)  # the sweep's own export, re-written on a re-run
    encoder = export_best_encoder(result.best_checkpoint, best, out_dir)
    probe_cfg = replace(best, downstream=replace(best.downstream, mode="probe", task=task,
                                                 encoder_checkpoint=str(encoder)),
                        train=replace(best.train, name=f"{sweep_name or best.train.name}-champion"))
    probe = run_downstream(probe_cfg, label="sweep-best", parent_run_id=result.parent_run_id)
    uri = resolve_tracking_uri(cfg)
    model_uri = log_scorer(probe["scorer"], probe["run_id"], uri)
    meta = scorer_metadata(probe["scorer"])
    cohort = Cohort.open(best.data.cohort).fingerprint
    tags = scorer_version_tags(meta, cohort=cohort, sweep=sweep_name or None)
    tags[TRIAL_TAG] = result.best_trial_id
    tags[BEST_KNN_AUROC_TAG] = repr(float(result.best_metric))  # what ranked the trials
    name = cfg.tracking.registered_model
    version = register(model_uri, name, tags, uri=uri)
    m = meta["metrics"]
    promoted = promote_if_better(name, version, f"{task}/auroc", m["auroc"], m.get("auroc_lo", float("nan")),
                                 cohort, strict, uri=uri)
    return {"model_uri": model_uri, "name": name, "version": version, "promoted": promoted,
            "val_auroc": m["auroc"], "val_auroc_lo": m.get("auroc_lo"), "val_auroc_hi": m.get("auroc_hi"),
            "test_auroc": m.get("test_auroc"), "scorer": probe["scorer"], "encoder": str(encoder)}
