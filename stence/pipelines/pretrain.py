"""Stage B pipeline: StenCE pretraining on Ray Train. `stence pretrain` calls `run_pretrain` once; a sweep
calls the very same function per trial."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from stence.config import Config, to_dict
from stence.models.checkpoint import save_encoder, save_stence
from stence.models.registry import build_stence_model
from stence.pipelines.stage_runs import best_state, features_dir, finish, output_dir, training_run
from stence.tracking.tags import ENCODER_PATH_TAG
from stence.train.driver import fit, tune_trial_id
from stence.train.pretrain_loop import SELECT_METRIC, pretrain_loop


def run_pretrain(cfg: Config, run_id: str | None = None) -> dict[str, Any]:
    """Stage B: StenCE pretraining; exports the checkpoint with the best smoothed kNN AUROC (stence.pt) and
    its ECG encoder (encoder.pt), both self-describing."""
    name = cfg.train.name
    run = training_run(cfg, run_id, "pretrain")
    ok = False
    try:
        feats = features_dir(cfg)
        result = fit(pretrain_loop, cfg, stage="pretrain", metric=SELECT_METRIC,
                     loop_config={"features_dir": feats, **run.loop_tracking()})
        state, best = best_state(result, SELECT_METRIC)
        model = build_stence_model(replace(cfg, model=replace(cfg.model, angio_checkpoint="")))
        model.load_state_dict(state["model"])
        out = output_dir(cfg, "pretrain", tune_trial_id() or name)  # one export per sweep trial
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
        finish(run, ok)
