"""Driver side of every stage: prepare inputs, `fit` the per-worker loop on Ray Train, export the selected
model, evaluate with confidence intervals, and track it all in MLflow.

`stence pretrain` calls `run_pretrain` once; a sweep calls the very same function per trial.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import Config, to_dict
from stence.outputs import MARKER, claim_output
from stence.tracking.client import resolve_tracking_uri, run_spool
from stence.tracking.lineage import log_cohort_input
from stence.tracking.runs import Tracker, loop_tracking, start_run
from stence.tracking.tags import ENCODER_PATH_TAG, SPOOL_TAG, STAGE_TAG
from stence.train.driver import absolute_storage, fit, run_name_for, tune_trial_id
from stence.train.worker import METRICS_FILE, load_state, local_best_checkpoint


@dataclass(frozen=True)
class _Run:
    """The MLflow side of one stage run: where it logs and spools, and whether this driver ends it."""

    uri: str | None = None
    run_id: str | None = None
    owned: bool = False  # started here (a single command), not handed in (a sweep trial ends its own)
    spool: Path | None = None  # the run's spool file, in its Ray Train run folder

    def tracker(self) -> Tracker:
        return Tracker(self.uri, self.run_id, spool=self.spool)

    def loop_tracking(self) -> dict[str, Any]:
        return loop_tracking(self.uri, self.run_id, self.spool)


def _tracker(cfg: Config, run_id: str | None, run_name: str, stage: str,
             parent_run_id: str | None = None, train_cfg: Config | None = None) -> _Run:
    """Reuse a given run (a sweep trial) or start one for a single command. The run's spool lies in the
    folder of its Ray Train run (the one `fit(..., train_cfg or cfg, stage=stage)` names), so checkpoints and
    buffered tracking stay together."""
    if not cfg.tracking.enabled:
        return _Run()
    uri = resolve_tracking_uri(cfg)
    spool = run_spool(absolute_storage(cfg.train.storage_path), run_name_for(train_cfg or cfg, stage))
    if run_id:
        run = _Run(uri, run_id, False, spool)
        run.tracker().set_tags({SPOOL_TAG: spool})
        return run
    run_id = start_run(cfg, run_name, parent_run_id=parent_run_id, tags={STAGE_TAG: stage}, spool=spool)
    return _Run(uri, run_id, True, spool)


def _finish(run: _Run, ok: bool) -> None:
    """End an owned run; in any case flush what the run's trackers buffered (bounded), naming the replay
    command for anything the store did not take."""
    if not (run.uri and run.run_id):
        return
    if run.owned:
        run.tracker().end("FINISHED" if ok else "FAILED")
    else:
        run.tracker().close()


EXPORT_KIND = "export"  # output kind in the ownership marker (stence/outputs.py)


def _output_dir(cfg: Config, stage: str, run_name: str) -> Path:
    """`<storage>/exports/<stage>-<name>`, claimed as an export: the same run name re-writes (resumes) its own
    export; a folder there that stence did not write is refused (OutputRefused), never written into."""
    out = Path(absolute_storage(cfg.train.storage_path)) / "exports" / f"{stage}-{run_name}"
    claim_output(out, EXPORT_KIND, overwrite=True)
    return out


def _best_state(result: Any, metric: str, mode: str = "max") -> tuple[dict, dict]:
    if result.error:
        raise RuntimeError(f"training failed: {result.error}") from result.error
    try:
        ckpt = result.get_best_checkpoint(metric, mode) or result.checkpoint
    except RuntimeError:  # local mode (workers=0): Ray keeps no checkpoints; the worker kept the best
        best_dir = local_best_checkpoint()
        if best_dir is None:
            raise RuntimeError("training reported no checkpoint") from None
        metrics = json.loads((best_dir / METRICS_FILE).read_text())
        return load_state(best_dir, weights_only=True), metrics
    if ckpt is None:
        raise RuntimeError("training reported no checkpoint")
    best_metrics = {}
    for c, m in result.best_checkpoints or []:
        if c.path == ckpt.path:
            best_metrics = m
    return load_state(ckpt, weights_only=True), best_metrics or dict(result.metrics or {})


def _features(cfg: Config) -> str:
    from stence.train.features import extract_features

    return str(extract_features(cfg).root)


def run_angio(cfg: Config, run_id: str | None = None) -> dict[str, Any]:
    """Stage A: train the aggregator on the 11 stenosis targets; export the best as aggregator.pt.

    Trained end to end (`feature.train_frame_encoder`, by default whenever no `feature.frame_checkpoint` is
    given), the frame encoder learns with it from the cached key frames and is exported too, as
    frame_encoder.pt; stage B then caches its features with `feature.frame_checkpoint=<frame_encoder.pt>`.
    """
    from stence.models.angio_e2e import build_angio_end_to_end, save_frame_encoder, trains_frame_encoder
    from stence.models.checkpoint import save_aggregator
    from stence.models.registry import build_aggregator
    from stence.train.angio_loop import ANGIO_METRIC, angio_loop

    name = cfg.train.name
    run = _tracker(cfg, run_id, f"angio-{name}", "angio")
    log_cohort_input(run.uri, run.run_id, cfg.data.cohort, "train+val")  # lineage; never raises
    ok = False
    try:
        end_to_end = trains_frame_encoder(cfg)
        inputs = {"end_to_end": True} if end_to_end else {"features_dir": _features(cfg)}
        result = fit(angio_loop, cfg, stage="angio", metric=ANGIO_METRIC,
                     loop_config={**inputs, **run.loop_tracking()})
        state, best = _best_state(result, ANGIO_METRIC)
        out = _output_dir(cfg, "angio", name)
        fresh = replace(cfg, model=replace(cfg.model, angio_checkpoint=""))
        paths = {"checkpoint": out / "aggregator.pt"}
        extra = {"metrics": best, "epoch": int(state["epoch"])}
        if end_to_end:
            model = build_angio_end_to_end(fresh)
            model.load_state_dict(state["model"])
            agg = model.aggregator
            paths["frame_encoder"] = save_frame_encoder(out / "frame_encoder.pt", model.frame_encoder.eval(),
                                                        to_dict(cfg), extra=extra)
        else:
            agg = build_aggregator(fresh)
            agg.load_state_dict(state["model"])
        save_aggregator(paths["checkpoint"], agg, to_dict(cfg), extra=extra)
        if run.run_id:
            t = run.tracker()
            for path in paths.values():
                t.log_artifact(path)
        ok = True
        return {**{k: str(v) for k, v in paths.items()}, "metrics": best, "run_id": run.run_id}
    finally:
        _finish(run, ok)


def run_pretrain(cfg: Config, run_id: str | None = None) -> dict[str, Any]:
    """Stage B: StenCE pretraining; exports the checkpoint with the best smoothed kNN AUROC (stence.pt) and
    its ECG encoder (encoder.pt), both self-describing."""
    from stence.models.checkpoint import save_encoder, save_stence
    from stence.models.registry import build_stence_model
    from stence.train.pretrain_loop import SELECT_METRIC, pretrain_loop

    name = cfg.train.name
    run = _tracker(cfg, run_id, f"pretrain-{name}", "pretrain")
    log_cohort_input(run.uri, run.run_id, cfg.data.cohort, "train+val")  # lineage; never raises
    ok = False
    try:
        feats = _features(cfg)
        result = fit(pretrain_loop, cfg, stage="pretrain", metric=SELECT_METRIC,
                     loop_config={"features_dir": feats, **run.loop_tracking()})
        state, best = _best_state(result, SELECT_METRIC)
        model = build_stence_model(replace(cfg, model=replace(cfg.model, angio_checkpoint="")))
        model.load_state_dict(state["model"])
        out = _output_dir(cfg, "pretrain", tune_trial_id() or name)  # one export per sweep trial
        extra = {"metrics": best, "epoch": int(state["epoch"])}
        save_stence(out / "stence.pt", model, to_dict(cfg), extra=extra)
        save_encoder(out / "encoder.pt", model.ecg_encoder, to_dict(cfg), extra=extra)
        if run.run_id:
            t = run.tracker()
            t.log_metrics({f"best/{k}": v for k, v in best.items() if isinstance(v, (int, float))}, step=0)
            t.set_tags({ENCODER_PATH_TAG: str(out / "encoder.pt")})
        ok = True
        return {"checkpoint": str(out / "stence.pt"), "encoder": str(out / "encoder.pt"), "metrics": best,
                "run_id": run.run_id}
    finally:
        _finish(run, ok)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:40]


def _inputs_key(cfg: Config) -> str:
    """Hash of the resolved config and the encoder file's bytes."""
    import hashlib

    from stence.config import config_hash

    h = hashlib.sha256(config_hash(cfg).encode())
    if cfg.downstream.encoder_checkpoint:
        h.update(Path(cfg.downstream.encoder_checkpoint).read_bytes())
    return h.hexdigest()[:8]


def _export_scorer(cfg: Config, model_state: dict, path: Path, metrics: dict) -> None:
    """Save the selected downstream model (encoder + head) as a self-describing scorer."""
    from stence.models.registry import build_downstream_model
    from stence.serving.scorer import save_scorer
    from stence.train.downstream_loop import load_downstream_encoder

    n_out = model_state["head.fc.weight"].shape[0] if "head.fc.weight" in model_state else 1
    model = build_downstream_model(cfg, load_downstream_encoder(cfg), n_out=n_out)
    model.load_state_dict(model_state)
    # the registry compares models on validation metrics; test metrics travel along, prefixed
    val = metrics.get("val", {}).get(cfg.downstream.task, {})
    plain = {k: v for k, v in val.items() if isinstance(v, (int, float))}
    plain.update({f"test_{k}": v for k, v in metrics.get(cfg.downstream.task, {}).items()
                  if isinstance(v, (int, float))})
    save_scorer(path, model.encoder, model.head, cfg.downstream.task, to_dict(cfg), plain)


def run_downstream(cfg: Config, run_id: str | None = None, label: str = "model",
                   parent_run_id: str | None = None) -> dict[str, Any]:
    """Stage C: probe or fine-tune on one task; test metrics with patient-level bootstrap intervals."""
    from stence.eval.metrics import bootstrap_ci, multilabel_metrics, subgroup_metrics
    from stence.eval.report import plot_roc
    from stence.train.downstream_loop import DOWNSTREAM_METRIC, build_datasets, downstream_loop

    d = cfg.downstream
    # the run name (hence resume) is tied to the exact inputs: another encoder or config is a new run
    name = f"{cfg.train.name}-{_slug(label)}-{d.mode}-{d.task}-{_inputs_key(cfg)}"
    named = replace(cfg, train=replace(cfg.train, name=name))
    run = _tracker(cfg, run_id, name, d.mode, parent_run_id, train_cfg=named)
    if d.task != "echonext":  # EchoNext reads downstream.echonext_root, not an ingested cohort
        for split in ("train", "val", "test"):  # trained on train, selected on val, reported on test
            log_cohort_input(run.uri, run.run_id, cfg.data.cohort, split)
    ok = False
    try:
        result = fit(downstream_loop, named, stage=d.mode, metric=DOWNSTREAM_METRIC,
                     loop_config=run.loop_tracking())
        if result.error:
            raise RuntimeError(f"training failed: {result.error}") from result.error
        final = load_state(result.checkpoint)
        test = {k: v.numpy() for k, v in final["test"].items()}
        val = {k: v.numpy() for k, v in final["val"].items()}
        sets = build_datasets(cfg)
        test_set = sets["test"]
        groups = test_set.patients[test["index"]] if test_set.patients is not None else None
        val_groups = sets["val"].patients[val["index"]] if sets["val"].patients is not None else None
        out = _output_dir(cfg, d.mode, name)
        if d.task == "echonext":
            from stence.data.echonext import ECHONEXT_TASKS

            metrics = multilabel_metrics(test["y"], test["p"], list(ECHONEXT_TASKS), groups=groups,
                                         n_boot=d.bootstrap, seed=cfg.train.seed)
        else:
            y, p = test["y"][:, 0], test["p"][:, 0]
            metrics = {d.task: bootstrap_ci(y, p, groups=groups, n_boot=d.bootstrap, seed=cfg.train.seed),
                       "val": {d.task: bootstrap_ci(val["y"][:, 0], val["p"][:, 0], groups=val_groups,
                                                    n_boot=d.bootstrap, seed=cfg.train.seed)}}
            rows = test_set.rows.iloc[test["index"]]
            from stence.eval.metrics import age_band

            metrics["subgroups"] = subgroup_metrics(
                y, p, {"sex": rows["sex"].fillna("unknown").astype(str).to_numpy(),
                       "age_band": age_band(rows["age"].to_numpy(dtype=float))},
                groups=groups, n_boot=min(d.bootstrap, 200), seed=cfg.train.seed)
            plot_roc({label: (y, p)}, out / "roc.png")
        _export_scorer(cfg, final["model"], out / "scorer.pt", metrics)
        # patients as a fixed-width string array: an object array would need pickle to load
        np.savez(out / "test_predictions.npz", **test,
                 patients=np.asarray(groups, dtype=str) if groups is not None else np.array([], dtype=str))
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float))
        if run.run_id:
            t = run.tracker()
            flat = {f"test/{k}": v for k, v in metrics.get(d.task, {}).items() if isinstance(v, (int, float))}
            flat.update({f"val_final/{k}": v for k, v in metrics.get("val", {}).get(d.task, {}).items()
                         if isinstance(v, (int, float))})
            t.log_metrics(flat, step=int(final["epoch"]))
            for f in out.iterdir():
                if f.name != MARKER:
                    t.log_artifact(f)
        ok = True
        return {"metrics": metrics, "test": test, "groups": groups, "out": str(out), "run_id": run.run_id,
                "scorer": str(out / "scorer.pt")}
    finally:
        _finish(run, ok)
