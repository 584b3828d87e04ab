"""Stage C pipeline: probe or fine-tune an encoder on one task, with patient-level bootstrap intervals, and
export the selected model as a scorer; one evaluation of several tasks (`evaluate_encoder`: the ablation's
variants) and `stence probe` / `stence finetune` as a whole (`probe_pipeline`)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from stence.config import Config, config_hash, to_dict
from stence.data.echonext import ECHONEXT_TASKS
from stence.eval.metrics import age_band, bootstrap_ci, multilabel_metrics, subgroup_metrics
from stence.eval.report import RESULTS_KIND, claim_results, plot_auroc_vs_threshold, plot_roc, write_results
from stence.models.registry import build_downstream_model
from stence.models.scorer import save_scorer
from stence.outputs import MARKER, check_output
from stence.pipelines.stage_runs import finish, output_dir, stage_run
from stence.serving.fetch import fetch_scorer
from stence.tracking.client import resolve_tracking_uri
from stence.tracking.evaluations import finish_evaluation, start_evaluation
from stence.tracking.lineage import log_cohort_input
from stence.train.downstream_loop import (
    DOWNSTREAM_METRIC,
    build_datasets,
    downstream_loop,
    load_downstream_encoder,
)
from stence.train.driver import absolute_storage, fit
from stence.train.worker import load_state

TaskReport = Callable[[str, dict, dict], None]  # (task, its test metrics, run_downstream's outcome)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:40]


def _inputs_key(cfg: Config) -> str:
    """Hash of the resolved config and the encoder file's bytes."""
    h = hashlib.sha256(config_hash(cfg).encode())
    if cfg.downstream.encoder_checkpoint:
        h.update(Path(cfg.downstream.encoder_checkpoint).read_bytes())
    return h.hexdigest()[:8]


def _export_scorer(cfg: Config, model_state: dict, path: Path, metrics: dict) -> None:
    """Save the selected downstream model (encoder + head) as a self-describing scorer."""
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
    d = cfg.downstream
    # the run name (hence resume) is tied to the exact inputs: another encoder or config is a new run
    name = f"{cfg.train.name}-{_slug(label)}-{d.mode}-{d.task}-{_inputs_key(cfg)}"
    named = replace(cfg, train=replace(cfg.train, name=name))
    run = stage_run(cfg, run_id, name, d.mode, parent_run_id, train_cfg=named)
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
        out = output_dir(cfg, d.mode, name)
        if d.task == "echonext":
            metrics = multilabel_metrics(test["y"], test["p"], list(ECHONEXT_TASKS), groups=groups,
                                         n_boot=d.bootstrap, seed=cfg.train.seed)
        else:
            y, p = test["y"][:, 0], test["p"][:, 0]
            metrics = {d.task: bootstrap_ci(y, p, groups=groups, n_boot=d.bootstrap, seed=cfg.train.seed),
                       "val": {d.task: bootstrap_ci(val["y"][:, 0], val["p"][:, 0], groups=val_groups,
                                                    n_boot=d.bootstrap, seed=cfg.train.seed)}}
            rows = test_set.rows.iloc[test["index"]]
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
        finish(run, ok)


def evaluate(cfg: Config, label: str, mode: str, encoder: str, tasks: list[str],
             parent_run_id: str | None = None, encoder_ref: str = "",
             report: TaskReport | None = None) -> tuple[dict[str, dict], str | None]:
    """One evaluation: `run_downstream` on each task, as one MLflow evaluation run with a nested run per task.

    Returns ({label: {task: metrics with intervals, the test predictions file, the task and evaluation run
    ids}}, the evaluation run id). The evaluation run is left open for `close_evaluation`, which logs the
    table and Fig. 2 once they are written. `report(task, metrics, outcome)` is called after each task."""
    results: dict[str, dict] = {label: {}}
    evaluation = start_evaluation(cfg, label, mode, encoder_ref or encoder, parent_run_id=parent_run_id)
    try:
        for task in tasks:
            d = replace(cfg.downstream, mode=mode, task=task, encoder_checkpoint=encoder)
            out = run_downstream(replace(cfg, downstream=d), label=label, parent_run_id=evaluation or parent_run_id)
            results[label].update({k: v for k, v in out["metrics"].items() if k not in ("subgroups", "val")})
            if task in results[label]:  # for paired tests later (`--compare`), and the runs to link there
                results[label][task].update(predictions=str(Path(out["out"]).resolve() / "test_predictions.npz"),
                                            run_id=out["run_id"], evaluation_run_id=evaluation)
            if report is not None:
                report(task, out["metrics"].get(task, {}), out)
    except BaseException:
        finish_evaluation(cfg, evaluation, results, None, ok=False)
        raise
    return results, evaluation


def close_evaluation(cfg: Config, evaluation: str | None, results: dict, out_dir: Path | None = None) -> None:
    """Log the evaluation's per-task metrics (and the table and Fig. 2 in `out_dir`) and end its run."""
    finish_evaluation(cfg, evaluation, results, out_dir, ok=True)


@dataclass
class Evaluation:
    """One evaluation of an encoder: its label, the results ({label: {task: metrics with intervals}}), its
    MLflow evaluation run and, when it wrote them, the results folder, results.json and results.md."""

    label: str
    results: dict[str, dict] = field(default_factory=dict)
    run_id: str | None = None
    out: Path | None = None
    results_json: Path | None = None
    results_md: Path | None = None


def evaluate_encoder(cfg: Config, label: str, mode: str, encoder: str, tasks: Sequence[str], *,
                     parent_run_id: str | None = None, encoder_ref: str = "", report: TaskReport | None = None,
                     out: str | Path | None = None, inputs: Iterable[str | Path] = (),
                     overwrite: bool = False) -> Evaluation:
    """`evaluate` the encoder on `tasks`; with `out`, claim it for results once every task has trained (new,
    empty, or an earlier results folder with `overwrite`; never one of `inputs`: OutputRefused) and write
    results.json/.md and Fig. 2 there; then log them to the evaluation run and end it (`close_evaluation`).
    `stence probe` / `stence finetune` (`probe_pipeline`) and the ablation's variants go through here."""
    results, run_id = evaluate(cfg, label, mode, encoder, list(tasks), parent_run_id=parent_run_id,
                               encoder_ref=encoder_ref, report=report)
    done = Evaluation(label, results, run_id)
    if out is not None:
        done.out = claim_results(out, inputs, overwrite)
        done.results_json, done.results_md = write_results(results, done.out)
        plot_auroc_vs_threshold(results, done.out / "fig2_auroc_vs_threshold.png")
    close_evaluation(cfg, run_id, results, done.out)
    return done


def fetch_registered_encoder(cfg: Config, ref: str) -> Path:
    """The scorer a registry or run reference names (models:/NAME@ALIAS, runs:/..., a run id), downloaded
    into `<storage>/fetched/<ref>` (re-fetched there on a later call) from the configured tracking store."""
    dst = Path(absolute_storage(cfg.train.storage_path)) / "fetched" / ref.replace(":/", "_").replace("/", "_")
    return fetch_scorer(ref, dst, uri=resolve_tracking_uri(cfg))


def default_results_dir(cfg: Config, label: str) -> Path:
    """Where `stence probe` writes the results of `label` without --out: `<storage>/exports/results-<label>`."""
    return Path(absolute_storage(cfg.train.storage_path)) / "exports" / f"results-{label}"


def probe_pipeline(cfg: Config, mode: str, encoder_ref: str = "", tasks: Sequence[str] | None = None,
                   label: str | None = None, out: str | Path | None = None, overwrite: bool = False,
                   report: Callable[[str, str, dict], None] | None = None) -> Evaluation:
    """`stence probe` / `stence finetune`: evaluate one encoder on `tasks` and write its results folder.

    The encoder is `encoder_ref` (a file, or a registered model / run, fetched first), else the configured
    `downstream.encoder_checkpoint`, else none (the random-init baseline). Defaults: `tasks` the configured
    `downstream.task`; `label` the encoder's folder name (`<model.ecg>-baseline` without one); `out` the
    label's own `default_results_dir`, replaced on a re-run, while an explicit `out` must be new or empty, or
    an earlier results folder with `overwrite`, and is checked before any training (OutputRefused), never
    being or holding the cohort or the encoder. `report(label, task, metrics)` is called after each task."""
    encoder = encoder_ref or cfg.downstream.encoder_checkpoint
    inputs = [p for p in (cfg.data.cohort, encoder) if p and Path(p).exists()]  # what `out` must stay clear of
    if out:  # refuse a bad out before any training
        check_output(out, RESULTS_KIND, inputs, overwrite)
    if encoder and not Path(encoder).exists():  # models:/NAME@ALIAS, runs:/...: fetch the registered scorer
        encoder = str(fetch_registered_encoder(cfg, encoder))
        inputs.append(encoder)
    label = label or (Path(encoder).parent.name if encoder else f"{cfg.model.ecg}-baseline")
    tasks = list(tasks) if tasks else [cfg.downstream.task]
    out_dir, overwrite = (Path(out), overwrite) if out else (default_results_dir(cfg, label), True)
    per_task = None if report is None else (lambda task, metrics, _outcome: report(label, task, metrics))
    return evaluate_encoder(cfg, label, mode, encoder, tasks, encoder_ref=encoder_ref or encoder,
                            report=per_task, out=out_dir, inputs=inputs, overwrite=overwrite)


__all__ = ["Evaluation", "close_evaluation", "default_results_dir", "evaluate", "evaluate_encoder",
           "fetch_registered_encoder", "probe_pipeline", "run_downstream"]
