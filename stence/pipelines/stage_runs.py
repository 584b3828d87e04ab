"""What every training pipeline shares: its MLflow run (started here, or a sweep trial's handed in), its export
folder, the checkpoint Ray Train selected, and the export of a pretrained encoder from it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stence.config import Config, to_dict
from stence.models.checkpoint import save_encoder, save_stence
from stence.models.registry import build_stence_model
from stence.outputs import claim_output
from stence.tracking.client import resolve_tracking_uri, run_spool
from stence.tracking.lineage import log_cohort_input
from stence.tracking.runs import Tracker, loop_tracking, start_run
from stence.tracking.tags import SPOOL_TAG, STAGE_TAG
from stence.train.driver import absolute_storage, run_name_for
from stence.train.features import extract_features
from stence.train.worker import METRICS_FILE, load_state, local_best_checkpoint


@dataclass(frozen=True)
class StageRun:
    """The MLflow side of one stage run: where it logs and spools, and whether this driver ends it."""

    uri: str | None = None
    run_id: str | None = None
    owned: bool = False  # started here (a single command), not handed in (a sweep trial ends its own)
    spool: Path | None = None  # the run's spool file, in its Ray Train run folder

    def tracker(self) -> Tracker:
        return Tracker(self.uri, self.run_id, spool=self.spool)

    def loop_tracking(self) -> dict[str, Any]:
        return loop_tracking(self.uri, self.run_id, self.spool)


def stage_run(cfg: Config, run_id: str | None, run_name: str, stage: str,
             parent_run_id: str | None = None, train_cfg: Config | None = None) -> StageRun:
    """Reuse a given run (a sweep trial) or start one for a single command. The run's spool lies in the
    folder of its Ray Train run (the one `fit(..., train_cfg or cfg, stage=stage)` names), so checkpoints and
    buffered tracking stay together."""
    if not cfg.tracking.enabled:
        return StageRun()
    uri = resolve_tracking_uri(cfg)
    spool = run_spool(absolute_storage(cfg.train.storage_path), run_name_for(train_cfg or cfg, stage))
    if run_id:
        run = StageRun(uri, run_id, False, spool)
        run.tracker().set_tags({SPOOL_TAG: spool})
        return run
    run_id = start_run(cfg, run_name, parent_run_id=parent_run_id, tags={STAGE_TAG: stage}, spool=spool)
    return StageRun(uri, run_id, True, spool)


def finish(run: StageRun, ok: bool) -> None:
    """End an owned run; in any case flush what the run's trackers buffered (bounded), naming the replay
    command for anything the store did not take."""
    if not (run.uri and run.run_id):
        return
    if run.owned:
        run.tracker().end("FINISHED" if ok else "FAILED")
    else:
        run.tracker().close()


EXPORT_KIND = "export"  # output kind in the ownership marker (stence/outputs.py)


def output_dir(cfg: Config, stage: str, run_name: str) -> Path:
    """`<storage>/exports/<stage>-<name>`, claimed as an export: the same run name re-writes (resumes) its own
    export; a folder there that stence did not write is refused (OutputRefused), never written into."""
    out = Path(absolute_storage(cfg.train.storage_path)) / "exports" / f"{stage}-{run_name}"
    claim_output(out, EXPORT_KIND, overwrite=True)
    return out


def best_state(result: Any, metric: str, mode: str = "max") -> tuple[dict, dict]:
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


def features_dir(cfg: Config) -> str:
    """The angiography feature cache of `cfg` (extracted, or found, by `stence features`' pipeline)."""
    return str(extract_features(cfg).root)


def training_run(cfg: Config, run_id: str | None, stage: str) -> StageRun:
    """The run of a training stage (`<stage>-<train.name>`), with the cohort it trains on (train, selected on
    val) logged as its dataset input."""
    run = stage_run(cfg, run_id, f"{stage}-{cfg.train.name}", stage)
    log_cohort_input(run.uri, run.run_id, cfg.data.cohort, "train+val")  # lineage; never raises
    return run


def export_pretrained(cfg: Config, state: dict, out: Path, extra: dict[str, Any] | None = None, *,
                      whole_model: bool = False) -> dict[str, Path]:
    """A pretraining state -> `out`/encoder.pt, the self-describing ECG encoder, and with `whole_model` also
    `out`/stence.pt, the whole StenCE model; `extra` (default: the state's epoch) is stored in both. The model
    is built without `model.angio_checkpoint` (the state holds every weight). The one export of a pretrained
    encoder: the sweep's best trial (tune/champion.py) and stage B. Returns {"checkpoint"?, "encoder"}."""
    model = build_stence_model(replace(cfg, model=replace(cfg.model, angio_checkpoint="")))
    model.load_state_dict(state["model"])
    extra = {"epoch": int(state["epoch"])} if extra is None else extra
    paths: dict[str, Path] = {}
    if whole_model:
        paths["checkpoint"] = out / "stence.pt"
        save_stence(paths["checkpoint"], model, to_dict(cfg), extra=extra)
    paths["encoder"] = out / "encoder.pt"
    save_encoder(paths["encoder"], model.ecg_encoder, to_dict(cfg), extra=extra)
    return paths
